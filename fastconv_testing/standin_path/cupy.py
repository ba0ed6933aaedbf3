"""``import cupy`` -> fastconv's stand-in CuPy (``fastconv_testing.cupy_standin``), for processes
started with this directory on ``PYTHONPATH`` (``bench/gpu_check.py --dry-run`` and its tests)."""

from fastconv_testing import cupy_standin as _standin

_standin.install()  # replaces this module in sys.modules; `import cupy` returns the stand-in
