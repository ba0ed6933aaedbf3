"""The CUDA sources and the table of kernel signatures: one source of truth for every consumer.

:data:`SIGNATURES` is read from the ``__global__`` declarations of the ``.cu`` files, so a kernel
is declared once, in its source. The table drives the CuPy ``RawModule`` name expressions, the
explicit template instantiations of the nvcc compile test, the ``extern "C"`` wrappers of the
g++ emulation and the argument conversion of both launchers.

Signature codes: ``r`` = ``const T*`` (read), ``w`` = ``T*`` (written), ``R``/``W`` = the same
for ``float`` whatever ``T`` is (fp32 scratch), ``i`` = ``int``. ``T`` is the dtype of the first
``r``/``w`` argument. A parameter of any other type is refused when the table is read.
"""

from __future__ import annotations

import re
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"
SOURCE_FILES = (
    "im2col.cu",
    "pool.cu",
    "conv.cu",
    "batchnorm.cu",
    "global_pool.cu",
    "activation.cu",
    "augment.cu",
    "dropout.cu",
    "optim.cu",
)

# NVRTC options of the RawModule. CuPy appends -ftz=true to every compile whatever we pass
# (cupy/cuda/compiler.py), so float32 subnormals flush to zero on the device; we ask for it
# explicitly so the compile tests see the same flags, and the host emulation flushes too
# (host_shim.h sets MXCSR FTZ/DAZ during a launch). -fmad=false stops NVRTC from contracting
# a*b+c into one FMA (its default), so the device rounds each product and sum exactly as the
# g++ emulation (-ffp-contract=off) does: the non-GEMM kernels agree bit for bit.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=true", "-fmad=false", "-prec-div=true", "-prec-sqrt=true")

# C++ spelling of each element type, keyed by numpy dtype name.
CTYPES = {"float32": "float", "float16": "__half"}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"common\.cuh"\s*$', re.MULTILINE)


def read(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


def module_source() -> str:
    """``common.cuh`` followed by every kernel file, as one translation unit.

    NVRTC compiles a string with no include path to our directory, so the local include is
    inlined here instead (``#pragma once`` would make the real include a no-op after this one).
    """
    parts = [read("common.cuh").replace("#pragma once", "", 1)]
    parts += [f"// ---- {name}\n" + _INCLUDE.sub("", read(name)) for name in SOURCE_FILES]
    return "\n".join(parts)


def c_params(sig: str, ctype: str) -> list[str]:
    table = {"r": f"const {ctype}*", "w": f"{ctype}*", "R": "const float*", "W": "float*",
             "i": "int"}  # fmt: skip
    return [table[code] for code in sig]


def element_dtype(kernel: str, args) -> str:
    """Name of ``T`` for a launch: the dtype of the first ``r``/``w`` argument."""
    for code, a in zip(SIGNATURES[kernel], args, strict=True):
        if code in "rw":
            return a.dtype.name
    raise TypeError(f"{kernel} has no T-typed array argument")


_PARAM_CODES = {"const T*": "r", "T*": "w", "const float*": "R", "float*": "W", "int": "i"}


def kernel_params(kernel: str) -> list[tuple[str, str]]:
    """``[(code, name), ...]`` of ``kernel`` parsed from its ``__global__`` declaration.

    Gives the launchers' error messages the parameter names, and lets a test check every
    :data:`SIGNATURES` entry against the source without a CUDA compiler.
    """
    src = "\n".join(read(name) for name in SOURCE_FILES)
    m = re.search(rf"__global__\s+void\s+{re.escape(kernel)}\s*\(([^)]*)\)", src)
    if m is None:
        raise KeyError(f"no __global__ kernel named {kernel!r} in {SOURCE_FILES}")
    out = []
    for param in m.group(1).split(","):
        param = " ".join(param.replace("__restrict__", "").split())
        decl, name = param.rsplit(" ", 1)
        while name.startswith("*"):  # "T *x" spelling
            decl, name = decl + "*", name[1:]
        decl = decl.replace(" *", "*")
        out.append((_PARAM_CODES.get(decl, "?" + decl), name))
    return out


_GLOBAL = re.compile(r"__global__\s+void\s+(\w+)\s*\(")


def _read_signatures() -> dict[str, str]:
    """``{kernel: codes}`` of every ``__global__`` kernel, in source order."""
    table = {}
    for name in SOURCE_FILES:
        for kernel in _GLOBAL.findall(read(name)):
            codes = "".join(code for code, _ in kernel_params(kernel))
            if "?" in codes or kernel in table:
                raise ValueError(
                    f"kernel {kernel} in {name}: parameters must be const T*, T*, const float*, "
                    f"float* or int, and names unique; got {kernel_params(kernel)}"
                )
            table[kernel] = codes
    return table


#: kernel name -> signature codes, from the sources (see the module docstring)
SIGNATURES: dict[str, str] = _read_signatures()


def name_expression(kernel: str, dtype_name: str) -> str:
    return f"{kernel}<{CTYPES[dtype_name]}>"


def name_expressions() -> list[str]:
    return [name_expression(k, d) for k in SIGNATURES for d in CTYPES]


def explicit_instantiations() -> str:
    """``template __global__ void k<T>(...);`` for every kernel and precision."""
    lines = []
    for kernel, sig in SIGNATURES.items():
        for ctype in CTYPES.values():
            params = ", ".join(c_params(sig, ctype))
            lines.append(f"template __global__ void {kernel}<{ctype}>({params});")
    return "\n".join(lines) + "\n"
