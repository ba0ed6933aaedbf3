"""Run the CUDA kernel sources on the CPU: g++ + ``host_shim.h`` (beside this file) + ctypes.

Test and debugging support, not a backend: a launch executes every (block, thread) of the grid
sequentially. :func:`emulated_ops` returns the GPU backend's own :class:`KernelOps` wired to
NumPy arrays, these kernels and a float32-accumulating GEMM (as cuBLAS with
``CUBLAS_COMPUTE_32F``), so the whole GPU code path except CuPy itself runs here; the stand-in
CuPy (:mod:`fastconv.gpu._standin`) covers the CuPy glue too.

The library can also be built with AddressSanitizer + UndefinedBehaviorSanitizer
(``FASTCONV_EMULATION_SANITIZE=1`` or ``sanitize=True``); it must then be loaded into a process
started with :func:`sanitizer_env` (libasan preloaded), which is what
``tests/gpu/test_gpu_sanitize.py`` does.

Built libraries are cached by source hash in a directory only the current user can write
(``$FASTCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastconv`` or ``~/.cache/fastconv``), never
under a predictable shared path such as ``/tmp`` where another user could plant a library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from fastconv.gpu import _source
from fastconv.gpu._kernel_ops import KernelOps, numpy_gemm

# -ffp-contract=off: no FMA contraction (the device compiles with -fmad=false); x86-64 float math
# is SSE, whose FTZ/DAZ host_shim.h sets during a launch (the device compiles with -ftz=true).
CXX_FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
SANITIZE_FLAGS = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",  # every finding is fatal: a test cannot pass over one
    "-fno-omit-frame-pointer",
    "-g",
)
_SUFFIX = {"float32": "f32", "float16": "f16"}
SANITIZE_ENV = "FASTCONV_EMULATION_SANITIZE"
LOG_ENV = "FASTCONV_EMULATION_LOG"  # file that gets one "kernel dtype" line per launch


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


def cache_dir() -> Path:
    """A directory for built libraries that only this user can write (created 0700)."""
    base = os.environ.get("FASTCONV_CACHE_DIR")
    if base:
        root = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "fastconv" if xdg else Path.home() / ".cache" / "fastconv"
    d = root / "gpu-emulation"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_private(d)
    except (OSError, PermissionError):
        # No usable home (read-only, foreign owner): a fresh private directory for this process.
        d = Path(tempfile.mkdtemp(prefix="fastconv-gpu-emulation-"))
    return d


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{path} is not private to this user (owner uid {st.st_uid}, mode "
            f"{stat.filemode(st.st_mode)}); refusing to load a library from it"
        )


_HOST_SHIM = Path(__file__).parent / "host_shim.h"


def _sources(mutate) -> dict[str, str]:
    texts = {"host_shim.h": _HOST_SHIM.read_text()}  # the harness's own header, then the sources
    texts.update({name: _source.read(name) for name in ("common.cuh", *_source.SOURCE_FILES)})
    if mutate is not None:
        texts = {name: mutate(name, text) for name, text in texts.items()}
    return texts


def build_library(cxx: str | None = None, sanitize: bool | None = None, mutate=None) -> Path:
    """Compile (once per source hash and flags) and return the shared library.

    ``sanitize`` (default: ``$FASTCONV_EMULATION_SANITIZE``) adds ASan + UBSan. ``mutate``,
    ``(file_name, text) -> text``, edits the sources first (tests use it to break a bound on
    purpose and check that the sanitizer catches it).
    """
    cxx = cxx or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ is required to emulate the CUDA kernels on the CPU")
    if sanitize is None:
        sanitize = os.environ.get(SANITIZE_ENV, "") not in ("", "0")
    flags = CXX_FLAGS + (SANITIZE_FLAGS if sanitize else ())
    src = wrapper_source()
    texts = _sources(mutate)
    digest = hashlib.sha256()
    for name, text in texts.items():
        digest.update(name.encode() + b"\0" + text.encode())
    digest.update(src.encode())
    digest.update(" ".join(flags).encode())
    digest.update(cxx.encode())
    tag = digest.hexdigest()[:16] + ("-asan" if sanitize else "")
    root = cache_dir()
    lib = root / f"libfastconv_gpu_emulation-{tag}.so"
    if lib.exists():
        _check_private(lib)
        return lib
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        for name, text in texts.items():
            (work / name).write_text(text)
        cpp = work / "emulation.cpp"
        cpp.write_text(src)
        tmp = work / "lib.so"
        cmd = [cxx, *flags, f"-I{work}", str(cpp), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"g++ failed on the kernel sources:\n{done.stderr}")
        os.replace(tmp, lib)  # atomic: concurrent sessions never load a half-written file
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def sanitizer_env(cxx: str | None = None) -> dict[str, str]:
    """Environment for a process that loads the sanitized library: libasan preloaded (ASan must
    come first in the process), leaks not reported (CPython keeps objects alive at exit)."""
    cxx = cxx or shutil.which("g++") or "g++"
    asan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = asan.stdout.strip()
    if not path or not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"libasan.so not found by {cxx} -print-file-name ({path!r})")
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=path,
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
    )
    env[SANITIZE_ENV] = "1"
    return env


class KernelLibrary:
    """The ``extern "C"`` launchers of one built library, with their ctypes signatures."""

    seen: set[tuple[str, str]] = set()  # (kernel, dtype) launched in this process, any library

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        self._fns: dict[str, object] = {}
        self._log = os.environ.get(LOG_ENV)

    def function(self, kernel: str, dtype_name: str):
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

    def run(self, kernel: str, dtype_name: str, c_args, grid: int, block: int) -> None:
        """``kernel<T><<<grid, block>>>(c_args)``: ints and raw addresses, already checked."""
        KernelLibrary.seen.add((kernel, dtype_name))
        if self._log:
            with open(self._log, "a") as f:
                f.write(f"{kernel} {dtype_name}\n")
        self.function(kernel, dtype_name)(*c_args, grid, block)


class EmulatedLauncher:
    """``launch(kernel, n, *args)`` on NumPy arrays through the compiled host library.

    ``block`` threads per block and ``min(ceil(n / block), max_blocks)`` blocks, exactly the
    formula of the CuPy launcher; a small ``max_blocks`` makes the grid smaller than ``n`` so the
    grid-stride loops run several iterations. ``launches`` records (kernel, grid, n) for tests.
    """

    def __init__(self, lib_path: Path, block: int = 256, max_blocks: int | None = 3):
        self.kernels = KernelLibrary(lib_path)
        self.block = block
        self.max_blocks = max_blocks
        self.launches: list[tuple[str, int, int]] = []

    def _fn(self, kernel: str, dtype_name: str):
        return self.kernels.function(kernel, dtype_name)

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
        self.kernels.run(kernel, dtype_name, c_args, grid, self.block)


class PoisonedNumpy:
    """``numpy`` whose ``empty`` is filled with NaN: an output element a kernel forgets to write
    then shows up as NaN instead of as plausible leftover memory."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype=dtype)


def emulated_ops(
    launcher: EmulatedLauncher, direct_max_k: int | None = None, xp=None, workspace_bytes=None
) -> KernelOps:
    """The GPU backend's :class:`KernelOps` on NumPy arrays and the emulated kernels."""
    kwargs = {} if direct_max_k is None else {"direct_max_k": direct_max_k}
    if workspace_bytes is not None:
        kwargs["workspace_bytes"] = workspace_bytes
    return KernelOps(xp or PoisonedNumpy(), launcher, numpy_gemm, **kwargs)
