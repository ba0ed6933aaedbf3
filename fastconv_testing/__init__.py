"""What the tests and the benchmarks share that users do not need: the GPU backend's test doubles
(for the tests and ``python -m bench.gpu_check --dry-run``) and test helpers. It lives in the
source tree only (a wheel holds no part of it).

- :mod:`fastconv_testing.emulation`: the CUDA kernel sources built with g++ (``host_shim.h``
  stands in for the CUDA runtime) and launched through ctypes, optionally under ASan + UBSan;
- :mod:`fastconv_testing.cupy_standin`: a stand-in CuPy on NumPy arrays that runs those
  kernels and a model of cuBLAS, so the whole GPU code path runs on a CPU;
- ``standin_path/``: put on ``PYTHONPATH``, it makes ``import cupy`` return the stand-in in a
  child process;
- :mod:`fastconv_testing.winograd`: the magnitude that bounds Winograd's rounding error (the
  tests' bounds, ``bench.winograd_error``).
"""
