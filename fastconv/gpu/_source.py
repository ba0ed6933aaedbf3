"""The CUDA sources and the table of kernel signatures: one source of truth for every consumer.

The same table drives the CuPy ``RawModule`` name expressions, the explicit template
instantiations of the nvcc compile test, the ``extern "C"`` wrappers of the g++ emulation and
the argument conversion of both launchers, so a signature drift fails to compile in CI.

Signature codes: ``r`` = ``const T*`` (read), ``w`` = ``T*`` (written), ``R``/``W`` = the same
for ``float`` whatever ``T`` is (fp32 scratch), ``i`` = ``int``. ``T`` is the dtype of the first
``r``/``w`` argument.
"""

from __future__ import annotations

import re
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"
SOURCE_FILES = ("im2col.cu", "pool.cu", "conv.cu", "augment.cu")

_GEOM = "i" * 12  # N, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW

SIGNATURES: dict[str, str] = {
    "im2col": "rw" + _GEOM + "i",  # + layout
    "col2im": "rw" + _GEOM + "i",  # + layout
    "max_pool2d": "rw" + _GEOM,
    "max_pool2d_backward": "rrw" + _GEOM,
    "avg_pool2d": "rw" + _GEOM,
    "avg_pool2d_backward": "rw" + _GEOM,
    "bias_act": "wr" + "iii" + "ii",  # N, F, P, has_bias, relu
    "bias_grad_partial": "rW" + "iiii",  # N, F, P, S
    "bias_grad_finish": "Rw" + "ii",  # F, S
    # N, C, H, W, F, kh, kw, sh, sw, ph, pw, OH, OW, has_bias, relu
    "conv2d_direct": "rrrw" + "i" * 13 + "ii",
    # x, theta (N, 6), flow (N, 2, OH, OW), y; N, C, H, W, OH, OW, has_flow
    "warp_bilinear": "rRRw" + "i" * 7,
    # src, dst, taps; P, H, W, radius, axis
    "blur_axis": "rwR" + "i" * 5,
}

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
