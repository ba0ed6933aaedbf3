"""Test doubles of the GPU backend, for the tests and ``bench/gpu_check.py --dry-run``: they live
in the source tree only (a wheel holds no part of them).

- :mod:`fastconv_testing.emulation`: the CUDA kernel sources built with g++ (``host_shim.h``
  stands in for the CUDA runtime) and launched through ctypes, optionally under ASan + UBSan;
- :mod:`fastconv_testing.cupy_standin`: a stand-in CuPy on NumPy arrays that runs those
  kernels and a model of cuBLAS, so the whole GPU code path runs on a CPU;
- ``standin_path/``: put on ``PYTHONPATH``, it makes ``import cupy`` return the stand-in in a
  child process.
"""
