"""``import cupy`` -> fastconv's stand-in CuPy (``fastconv.gpu._standin``), for processes started
with this directory on ``PYTHONPATH`` (``bench/gpu_check.py --dry-run`` and its tests)."""

from fastconv.gpu import _standin

_standin.install()  # replaces this module in sys.modules; `import cupy` returns the stand-in
