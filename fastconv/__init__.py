"""fastconv: hand-written CNN kernels (Numba on the CPU, CuPy on the GPU) in float32 and float16."""

# Imported eagerly so that the CPU backend picks Numba's threading layer before any user code
# can start Numba's thread pool (after that the choice is fixed for the process).
from . import cpu as _cpu  # noqa: F401
from . import ops
from .ops import *  # noqa: F403  (the public kernels: their list is ops.__all__, written once)

__version__ = "0.1.0"

__all__ = list(ops.__all__)
