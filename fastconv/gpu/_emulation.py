"""Run the CUDA kernel sources on the CPU: g++ + ``kernels/host_shim.h`` + ctypes.

Test and debugging support, not a backend: a launch executes every (block, thread) of the grid
sequentially. :func:`emulated_ops` returns the GPU backend's own :class:`KernelOps` wired to
NumPy arrays, these kernels and a float32-accumulating matmul (as cuBLAS under CuPy's default
compute type), so the whole GPU code path except CuPy itself runs here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import _source
from ._kernel_ops import KernelOps, numpy_matmul_fp32_accumulate

CXX_FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-fno-fast-math")
_SUFFIX = {"float32": "f32", "float16": "f16"}


def wrapper_source() -> str:
    """The translation unit: shim, the unmodified .cu files, one extern "C" launcher per kernel
    and precision taking the kernel arguments followed by (grid, block)."""
    lines = ['#include "host_shim.h"']
    lines += [f'#include "{name}"' for name in _source.SOURCE_FILES]
    lines.append('extern "C" {')
    for kernel, sig in _source.SIGNATURES.items():
        for dtype_name, ctype in _source.CTYPES.items():
            params = _source.c_params(sig, ctype)
            decl = ", ".join(f"{p} a{i}" for i, p in enumerate(params))
            call = ", ".join(f"a{i}" for i in range(len(params)))
            lines.append(
                f"void fc_{kernel}_{_SUFFIX[dtype_name]}({decl}, unsigned grid, unsigned block) "
                f"{{ fc_launch(&{kernel}<{ctype}>, grid, block, {call}); }}"
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def build_library(cxx: str | None = None) -> Path:
    """Compile (once per source hash, cached in the temp dir) and return the shared library."""
    cxx = cxx or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ is required to emulate the CUDA kernels on the CPU")
    src = wrapper_source()
    digest = hashlib.sha256()
    for name in ("host_shim.h", "common.cuh", *_source.SOURCE_FILES):
        digest.update(_source.read(name).encode())
    digest.update(src.encode())
    digest.update(" ".join(CXX_FLAGS).encode())
    cache = Path(tempfile.gettempdir()) / f"fastconv-gpu-emulation-{digest.hexdigest()[:16]}"
    lib = cache / "libfastconv_gpu_emulation.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cpp = cache / f"emulation-{os.getpid()}.cpp"
    cpp.write_text(src)
    tmp = cache / f"lib-{os.getpid()}.so"
    cmd = [cxx, *CXX_FLAGS, f"-I{_source.KERNEL_DIR}", str(cpp), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"g++ failed on the kernel sources:\n{done.stderr}")
    os.replace(tmp, lib)  # atomic: concurrent test sessions never load a half-written file
    return lib


class EmulatedLauncher:
    """``launch(kernel, n, *args)`` on NumPy arrays through the compiled host library.

    ``block`` threads per block and ``min(ceil(n / block), max_blocks)`` blocks, exactly the
    formula of the CuPy launcher; a small ``max_blocks`` makes the grid smaller than ``n`` so the
    grid-stride loops run several iterations. ``launches`` records (kernel, grid, n) for tests.
    """

    def __init__(self, lib_path: Path, block: int = 256, max_blocks: int | None = 3):
        self.lib = ctypes.CDLL(str(lib_path))
        self.block = block
        self.max_blocks = max_blocks
        self.launches: list[tuple[str, int, int]] = []
        self._fns: dict[str, object] = {}

    def _fn(self, kernel: str, dtype_name: str):
        key = f"fc_{kernel}_{_SUFFIX[dtype_name]}"
        fn = self._fns.get(key)
        if fn is None:
            fn = getattr(self.lib, key)
            sig = _source.SIGNATURES[kernel]
            fn.argtypes = [ctypes.c_int if c == "i" else ctypes.c_void_p for c in sig] + [
                ctypes.c_uint,
                ctypes.c_uint,
            ]
            fn.restype = None
            self._fns[key] = fn
        return fn

    def __call__(self, kernel: str, n: int, *args) -> None:
        if n == 0:
            return
        sig = _source.SIGNATURES[kernel]
        if len(args) != len(sig):
            raise TypeError(f"{kernel} takes {len(sig)} arguments, got {len(args)}")
        dtype_name = _source.element_dtype(kernel, args)
        c_args = []
        for code, a in zip(sig, args, strict=True):
            if code == "i":
                c_args.append(int(a))
                continue
            # The kernels index flat C-order buffers of one dtype; anything else is a wrapper bug.
            want = dtype_name if code in "rw" else "float32"
            if not (isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype == want):
                raise TypeError(f"{kernel}: pointer argument must be a C-contiguous {want}")
            c_args.append(a.ctypes.data)
        grid = -(-n // self.block)
        if self.max_blocks is not None:
            grid = min(grid, self.max_blocks)
        self.launches.append((kernel, grid, n))
        self._fn(kernel, dtype_name)(*c_args, grid, self.block)


class PoisonedNumpy:
    """``numpy`` whose ``empty`` is filled with NaN: an output element a kernel forgets to write
    then shows up as NaN instead of as plausible leftover memory."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype=dtype)


def emulated_ops(launcher: EmulatedLauncher, direct_max_k: int | None = None, xp=None) -> KernelOps:
    """The GPU backend's :class:`KernelOps` on NumPy arrays and the emulated kernels."""
    kwargs = {} if direct_max_k is None else {"direct_max_k": direct_max_k}
    return KernelOps(xp or PoisonedNumpy(), launcher, numpy_matmul_fp32_accumulate, **kwargs)
