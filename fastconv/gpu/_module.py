"""CuPy side of the backend: the compiled ``RawModule``, the kernel launcher and cuBLAS GEMMs.

Launch configuration (every kernel): 256 threads per block and
``blocks = min(ceil(n / 256), 32 * multiprocessor_count)``. Each kernel walks its ``n`` outputs
with a grid-stride loop, so capping the grid is always correct; the cap (e.g. 4224 blocks on a
132-SM H100) keeps huge problems from launching millions of short-lived blocks while small ones
get one thread per output.

Host cost per launch matters (50-100 launches per training step): the module, every
``get_function`` result and the grid cap are looked up once per device and kept in a dict, so a
launch is an argument check, a dict lookup and CuPy's own kernel call.

GEMMs go to cuBLAS through CuPy's bindings (``gemmEx`` / ``gemmStridedBatchedEx``) on a cuBLAS
handle of our own per device and host thread, with the compute type pinned to
``CUBLAS_COMPUTE_32F`` and the math mode to ``CUBLAS_DEFAULT_MATH``: float16 operands are read
as half and accumulated in float32 (tensor cores allowed), float32 GEMMs are full FP32 (no TF32:
cuBLAS uses TF32 only under ``CUBLAS_TF32_TENSOR_OP_MATH`` or ``COMPUTE_32F_FAST_TF32``, and
``CUPY_TF32`` only affects ``cupy.matmul``, which this backend does not call). No float32 copy
of a half operand is ever made.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _checks as chk
from . import _source

THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 32
INT32_MAX = 2**31 - 1

# Per device id: the compiled RawModule, the grid cap and the kernel functions.
_modules: dict[int, object] = {}
_max_blocks: dict[int, int] = {}
_functions: dict[tuple[int, str, str], object] = {}
_compile_lock = threading.Lock()

# cudaDataType values (library_types.h) and cuBLAS enums, as in CuPy's bindings.
CUDA_R_32F = 0
CUDA_R_16F = 2
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_DEFAULT_MATH = 0
CUBLAS_POINTER_MODE_HOST = 0
_DATA_TYPE = {"float32": CUDA_R_32F, "float16": CUDA_R_16F}
# alpha = 1, beta = 0 for CUBLAS_COMPUTE_32F are float32 host scalars, read during the call.
_ONE = np.ones(1, np.float32)
_ZERO = np.zeros(1, np.float32)


def reset() -> None:
    """Forget every compiled module, function and handle (tests swap CuPy implementations)."""
    with _compile_lock:
        _modules.clear()
        _max_blocks.clear()
        _functions.clear()
        _tls.__dict__.clear()


def _device_id() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def get_module(dev: int | None = None):
    """The ``RawModule`` holding ``kernel<float>`` and ``kernel<__half>`` of every kernel in
    :data:`~fastconv.gpu._source.SIGNATURES`, compiled by NVRTC once per device with
    :data:`~fastconv.gpu._source.NVRTC_OPTIONS` (CuPy also caches the binary on disk).
    Compilation is forced here, so a missing header fails now with CuPy's compile log."""
    import cupy

    dev = _device_id() if dev is None else dev
    mod = _modules.get(dev)
    if mod is not None:
        return mod
    with _compile_lock:
        mod = _modules.get(dev)
        if mod is None:
            mod = cupy.RawModule(
                code=_source.module_source(),
                options=_source.NVRTC_OPTIONS,
                name_expressions=_source.name_expressions(),
            )
            mod.compile()
            sms = cupy.cuda.Device(dev).attributes["MultiProcessorCount"]
            _max_blocks[dev] = BLOCKS_PER_SM * sms
            _modules[dev] = mod
    return mod


def get_function(kernel: str, dtype_name: str, dev: int | None = None):
    """``kernel<T>`` on device ``dev`` (current by default), looked up once and kept."""
    dev = _device_id() if dev is None else dev
    key = (dev, kernel, dtype_name)
    fn = _functions.get(key)
    if fn is None:
        fn = get_module(dev).get_function(_source.name_expression(kernel, dtype_name))
        _functions[key] = fn
    return fn


def _describe(a) -> str:
    if chk.is_cupy_array(a):
        layout = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
        return f"a {layout} {np.dtype(a.dtype)} cupy.ndarray on device {a.data.device_id}"
    return f"a {type(a).__module__}.{type(a).__qualname__}"


def check_args(kernel: str, args, dev: int) -> tuple:
    """Check ``args`` against the kernel's parameter list; give ints an explicit ``int32``.

    Array arguments must be C-contiguous CuPy arrays on device ``dev``, of the kernel's element
    type ``T`` (the dtype of its first ``T*`` argument) or float32 for ``float*`` scratch. The
    kernels index flat buffers with no bounds checks, so anything else is refused before the
    launch, with the parameter's name.
    """
    sig = _source.SIGNATURES.get(kernel)
    if sig is None:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(_source.SIGNATURES)}")
    if len(args) != len(sig):
        raise TypeError(f"{kernel} takes {len(sig)} arguments, got {len(args)}")
    dtype_name = None
    out = []
    for pos, (code, a) in enumerate(zip(sig, args, strict=True)):
        if code == "i":
            if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
                raise TypeError(
                    f"{kernel}: argument {_param_name(kernel, pos)} must be an int, got "
                    f"{type(a).__name__}"
                )
            v = int(a)
            if not -INT32_MAX <= v <= INT32_MAX:
                raise ValueError(
                    f"{kernel}: argument {_param_name(kernel, pos)} = {v} exceeds the kernels' "
                    f"32-bit int range"
                )
            out.append(np.int32(v))
            continue
        if not chk.is_cupy_array(a):
            raise TypeError(
                f"{kernel}: argument {_param_name(kernel, pos)} must be a cupy.ndarray, got "
                f"{_describe(a)}"
            )
        if code in "rw" and dtype_name is None:
            dtype_name = np.dtype(a.dtype).name
            if dtype_name not in _source.CTYPES:
                raise TypeError(
                    f"{kernel}: argument {_param_name(kernel, pos)} must be float32 or float16, "
                    f"got {dtype_name}"
                )
        want = dtype_name if code in "rw" else "float32"
        if np.dtype(a.dtype).name != want or not a.flags.c_contiguous or a.data.device_id != dev:
            raise TypeError(
                f"{kernel}: argument {_param_name(kernel, pos)} must be a C-contiguous {want} "
                f"cupy.ndarray on device {dev}, got {_describe(a)}"
            )
        out.append(a)
    if dtype_name is None:
        raise TypeError(f"{kernel} has no T-typed array argument")
    return dtype_name, tuple(out)


def _param_name(kernel: str, pos: int) -> str:
    try:
        return f"{pos} ({_source.kernel_params(kernel)[pos][1]})"
    except (KeyError, IndexError, ValueError):
        return str(pos)


def launch(kernel: str, n: int, *args) -> None:
    """Run ``kernel`` over ``n`` outputs on the current device and stream."""
    if n == 0:
        return
    dev = _device_id()
    dtype_name, args = check_args(kernel, args, dev)
    fn = get_function(kernel, dtype_name, dev)
    blocks = min(-(-n // THREADS_PER_BLOCK), _max_blocks[dev])
    fn((blocks,), (THREADS_PER_BLOCK,), args)


# --- cuBLAS ------------------------------------------------------------------------------------

_tls = threading.local()


def _cublas_handle(dev: int):
    """A cuBLAS handle of our own for (this host thread, device ``dev``), bound to CuPy's
    current stream: its math mode stays ours whatever CuPy or the user set on CuPy's handle
    (cuBLAS handles are per thread in CuPy too, since setting a handle's stream is not
    thread-safe). The stream is re-bound whenever CuPy's current stream changed since the last
    GEMM: a handle left on the default stream would run the GEMM unordered with the kernels
    around it on a non-blocking stream (im2col's buffer read before it is written)."""
    from cupy.cuda import cublas

    handles = _tls.__dict__.setdefault("handles", {})
    h = handles.get(dev)
    if h is None:
        h = cublas.create()
        cublas.setMathMode(h, CUBLAS_DEFAULT_MATH)
        cublas.setPointerMode(h, CUBLAS_POINTER_MODE_HOST)
        handles[dev] = h
    streams = _tls.__dict__.setdefault("streams", {})
    stream = _current_stream_ptr()
    if streams.get(dev) != stream:
        cublas.setStream(h, stream)
        streams[dev] = stream
    return h


def _current_stream_ptr() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr


def _gemm_operand(a, name: str, ndim: int, dtype, dev: int):
    if not chk.is_cupy_array(a):
        raise TypeError(f"gemm: {name} must be a cupy.ndarray, got {_describe(a)}")
    if a.ndim != ndim:
        raise ValueError(f"gemm: {name} must be {ndim}-dimensional, got shape {tuple(a.shape)}")
    if a.dtype != dtype or not a.flags.c_contiguous or a.data.device_id != dev:
        raise TypeError(
            f"gemm: {name} must be a C-contiguous {np.dtype(dtype)} cupy.ndarray on device "
            f"{dev}, got {_describe(a)}"
        )


def _check_dims(**dims) -> None:
    for name, v in dims.items():
        if v > INT32_MAX:
            raise ValueError(f"gemm: {name} = {v} exceeds cuBLAS's 32-bit int dimensions")


def gemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` for C-contiguous float32/float16 CuPy arrays, where ``op`` transposes
    when asked. ``b`` may be 3-D ``(B, K, P)`` (then ``a`` is 2-D, untransposed and shared by the
    batch: one strided-batched call, stride 0 for ``a``). Output: a new array, dtype of ``a``.

    Row-major operands are handed to column-major cuBLAS as their transposes:
    ``C^T = op(b)^T @ op(a)^T``, so ``b`` is cuBLAS's first operand and no copy is made.
    """
    import cupy
    from cupy.cuda import cublas

    dev = _device_id()
    dtype = a.dtype if chk.is_cupy_array(a) else None
    if dtype is None or np.dtype(dtype).name not in _DATA_TYPE:
        raise TypeError(f"gemm: a must be a float32 or float16 cupy.ndarray, got {_describe(a)}")
    dt = _DATA_TYPE[np.dtype(dtype).name]
    _gemm_operand(a, "a", 2, dtype, dev)
    handle = _cublas_handle(dev)
    if chk.is_cupy_array(b) and b.ndim == 3:
        if trans_a or trans_b:
            raise ValueError("gemm: the batched form takes no transposes")
        _gemm_operand(b, "b", 3, dtype, dev)
        (M, K), (B, K2, P) = a.shape, b.shape
        if K != K2:
            raise ValueError(f"gemm: a {tuple(a.shape)} and b {tuple(b.shape)} do not chain")
        _check_dims(M=M, K=K, P=P, batch=B)
        c = cupy.empty((B, M, P), dtype=dtype)
        if c.size == 0:
            return c
        if K == 0:
            c.fill(0)
            return c
        cublas.gemmStridedBatchedEx(
            handle, CUBLAS_OP_N, CUBLAS_OP_N, P, M, K,
            _ONE.ctypes.data, b.data.ptr, dt, P, K * P, a.data.ptr, dt, K, 0,
            _ZERO.ctypes.data, c.data.ptr, dt, P, M * P, B,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip
        return c
    _gemm_operand(b, "b", 2, dtype, dev)
    M, K = a.shape[::-1] if trans_a else a.shape
    K2, N = b.shape[::-1] if trans_b else b.shape
    if K != K2:
        raise ValueError(
            f"gemm: op(a) {(M, K)} and op(b) {(K2, N)} do not chain (a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}, trans_a={trans_a}, trans_b={trans_b})"
        )
    _check_dims(M=M, N=N, K=K)
    c = cupy.empty((M, N), dtype=dtype)
    if c.size == 0:
        return c
    if K == 0:
        c.fill(0)
        return c
    cublas.gemmEx(
        handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
        N, M, K, _ONE.ctypes.data, b.data.ptr, dt, b.shape[1], a.data.ptr, dt, a.shape[1],
        _ZERO.ctypes.data, c.data.ptr, dt, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT,
    )  # fmt: skip
    return c
