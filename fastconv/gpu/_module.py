"""CuPy side of the kernels: one compiled ``RawModule`` per device and the launcher.

Launch configuration (every kernel): 256 threads per block and
``blocks = min(ceil(n / 256), 32 * multiprocessor_count)``. Each kernel walks its ``n`` outputs
with a grid-stride loop, so capping the grid is always correct; the cap (e.g. 4224 blocks on a
132-SM H100, i.e. up to 8 resident blocks of 256 threads per SM several times over) keeps huge
problems from launching millions of short-lived blocks while small ones get one thread per output.
"""

from __future__ import annotations

import numpy as np

from . import _source

THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 32
_INT32_MAX = 2**31 - 1

_modules: dict[int, object] = {}  # device id -> cupy.RawModule
_max_blocks: dict[int, int] = {}


def get_module():
    """The ``RawModule`` holding ``kernel<float>`` and ``kernel<__half>`` of every kernel,
    compiled by NVRTC once per device (CuPy also caches the binary on disk)."""
    import cupy

    dev = cupy.cuda.Device().id
    mod = _modules.get(dev)
    if mod is None:
        mod = cupy.RawModule(
            code=_source.module_source(),
            options=("-std=c++17",),
            name_expressions=_source.name_expressions(),
        )
        _modules[dev] = mod
        sms = cupy.cuda.Device(dev).attributes["MultiProcessorCount"]
        _max_blocks[dev] = BLOCKS_PER_SM * sms
    return mod


def get_function(kernel: str, dtype):
    return get_module().get_function(_source.name_expression(kernel, np.dtype(dtype).name))


def convert_args(kernel: str, args) -> tuple:
    """Check ``args`` against the kernel's signature and give ints an explicit C type."""
    sig = _source.SIGNATURES[kernel]
    if len(args) != len(sig):
        raise TypeError(f"{kernel} takes {len(sig)} arguments, got {len(args)}")
    out = []
    for code, a in zip(sig, args, strict=True):
        if code == "i":
            v = int(a)
            if not -_INT32_MAX <= v <= _INT32_MAX:
                raise ValueError(f"{kernel}: size {v} exceeds the kernels' 32-bit int arguments")
            out.append(np.int32(v))
        else:
            out.append(a)
    return tuple(out)


def launch(kernel: str, n: int, *args) -> None:
    """Run ``kernel`` over ``n`` outputs on the current device and stream."""
    if n == 0:
        return
    import cupy

    args = convert_args(kernel, args)
    fn = get_function(kernel, _source.element_dtype(kernel, args))
    dev = cupy.cuda.Device().id
    blocks = min(-(-n // THREADS_PER_BLOCK), _max_blocks[dev])
    fn((blocks,), (THREADS_PER_BLOCK,), args)
