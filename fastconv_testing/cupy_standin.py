"""A stand-in for the part of CuPy that fastconv uses, so the GPU code path runs on a CPU.

Test support, not a backend. Arrays are NumPy-backed but of a distinct type,
``cupy.ndarray`` as far as fastconv can tell (``type(x).__module__ == "cupy"``), and behave
like CuPy's where it matters for catching bugs: mixing them with NumPy arrays in arithmetic or
ufuncs raises ``TypeError``, and so does any implicit conversion to NumPy (``np.asarray(x)``,
indexing a NumPy array with one), exactly as with real CuPy; ``.get()`` / ``cupy.asnumpy``
copy back. Each array belongs to a device (two stand-in devices), selected as in CuPy with
``cupy.cuda.Device(i)`` as a context manager or ``.use()``.

``RawModule`` "compiles" by building the g++ emulation of the same ``.cu`` sources
(:mod:`fastconv_testing.emulation`); its functions take ``(grid, block, args)`` like CuPy's and
run the emulated kernel with exactly that grid, checking that every pointer argument is a
C-contiguous stand-in array of the kernel's element type and every scalar an exact ``int32``
(a Python ``int`` reaches a real kernel as 64 bits and is read wrong). ``cupy.cuda.cublas``'s
``gemmEx`` / ``gemmStridedBatchedEx`` are a column-major model of cuBLAS reading raw device
pointers: wrong ``m/n/k``, leading dimensions, strides or transposes give wrong results (or
an out-of-allocation error), as they would on a GPU; half operands accumulate in float32.

``install()`` puts the stand-in into ``sys.modules`` (``uninstall()`` undoes it); a process
started with ``PYTHONPATH`` containing :data:`PATH_DIR` gets it from ``import cupy``.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
import types
import weakref
from pathlib import Path

import numpy as np

from fastconv.gpu import _source

__version__ = "0.0-standin"
PATH_DIR = str(Path(__file__).parent / "standin_path")  # holds cupy.py -> install()
NUM_DEVICES = 2
MULTIPROCESSOR_COUNT = 1  # grid cap 32 blocks: the grid-stride loops run several rounds

# What tests can set: an exception RawModule.compile() raises (to test the availability
# reason), and counters that prove caching.
config = types.SimpleNamespace(compile_error=None)
stats = types.SimpleNamespace(modules=[], get_function=0, launches=[], gemm_calls=[],
                              allocators=[])  # fmt: skip

_state = threading.local()
_allocs: dict[int, tuple[int, int, weakref.ref]] = {}  # start -> (nbytes, device, owner ref)
_alloc_lock = threading.Lock()


def _current() -> int:
    return getattr(_state, "device", 0)


class CUDARuntimeError(RuntimeError):
    pass


# --- arrays ------------------------------------------------------------------------------------


class _Flags:
    def __init__(self, a: np.ndarray):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[key]  # fmt: skip


class MemoryPointer:
    def __init__(self, ptr: int, device_id: int):
        self.ptr = ptr
        self.device_id = device_id


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _register(a: np.ndarray, device: int) -> None:
    root = _root(a)
    start = root.__array_interface__["data"][0]
    with _alloc_lock:
        if start not in _allocs or _allocs[start][2]() is not root:
            _allocs[start] = (root.nbytes, device, weakref.ref(root))
            for k in [k for k, v in _allocs.items() if v[2]() is None]:
                del _allocs[k]


def _allocation(ptr: int, nbytes: int) -> tuple[int, int]:
    """(start, device) of the live stand-in allocation holding ``[ptr, ptr + nbytes)``."""
    with _alloc_lock:
        for start, (size, device, ref) in _allocs.items():
            if ref() is not None and start <= ptr and ptr + nbytes <= start + size:
                return start, device
    raise RuntimeError(
        f"cuBLAS stand-in: access [{ptr:#x}, +{nbytes}) is outside every device allocation "
        "(an illegal address on a GPU)"
    )


_NO_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
    "NumPy array explicitly."
)


def _unwrap(v, device_box):
    if isinstance(v, ndarray):
        if device_box[0] is None:
            device_box[0] = v._device
        elif v._device != device_box[0]:
            raise ValueError(
                f"arrays on different devices ({device_box[0]} and {v._device}) in one operation"
            )
        return v._a
    if isinstance(v, np.ndarray):
        raise TypeError(f"Unsupported type {type(v)}")
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(x, device_box) for x in v)
    return v


def _wrap(r, device):
    if isinstance(r, np.ndarray):
        return ndarray(r, device)
    if isinstance(r, np.generic):
        return ndarray(np.asarray(r), device)
    if isinstance(r, tuple):
        return tuple(_wrap(x, device) for x in r)
    return r


def _call(fn, *args, **kwargs):
    box = [None]
    args = [_unwrap(a, box) for a in args]
    kwargs = {k: _unwrap(v, box) for k, v in kwargs.items()}
    return _wrap(fn(*args, **kwargs), _current() if box[0] is None else box[0])


def _binary(name):
    op = getattr(np.ndarray, name)

    def method(self, other):
        return _call(op, self, other)

    method.__name__ = name
    return method


def _inplace(name):
    op = getattr(np.ndarray, name)

    def method(self, other):
        box = [self._device]
        op(self._a, _unwrap(other, box))
        return self

    method.__name__ = name
    return method


def _method(name):
    def method(self, *args, **kwargs):
        return _call(getattr(np.ndarray, name), self, *args, **kwargs)

    method.__name__ = name
    return method


class ndarray:  # noqa: N801 - CuPy's spelling
    """A device array of the stand-in (NumPy memory, CuPy's rules)."""

    __array_ufunc__ = None  # NumPy defers to our reflected operators, which refuse NumPy arrays
    __hash__ = None

    def __init__(self, a: np.ndarray, device: int | None = None):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"stand-in ndarray wraps a numpy.ndarray, got {type(a).__name__}")
        self._a = a
        self._device = _current() if device is None else device

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: ndarray(self._a.T, self._device))
    device = property(lambda self: cuda.Device(self._device))

    @property
    def data(self) -> MemoryPointer:
        _register(self._a, self._device)
        return MemoryPointer(self._a.__array_interface__["data"][0], self._device)

    def __array__(self, *args, **kwargs):
        raise TypeError(_NO_IMPLICIT)

    def get(self, stream=None, order="C", out=None):
        return np.array(self._a, order=order)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(row, self._device) for row in self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap_index(key, self._device)], self._device)  # 0-d, not scalar

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):  # CuPy copies a host array in (a transfer, allowed)
            value = ndarray(value, self._device)
        box = [self._device]
        self._a[_unwrap_index(key, self._device)] = _unwrap(value, box)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"array({np.array2string(self._a)}, device={self._device})"

    def astype(self, dtype, copy=True, **kwargs):
        if not copy and self._a.dtype == np.dtype(dtype):
            return self
        return ndarray(self._a.astype(dtype, **kwargs), self._device)

    def reshape(self, *shape, order="C"):
        return ndarray(self._a.reshape(*shape, order=order), self._device)

    def transpose(self, *axes):
        return ndarray(self._a.transpose(*axes), self._device)

    def ravel(self, order="C"):
        return ndarray(self._a.ravel(order), self._device)

    def copy(self, order="C"):
        return ndarray(self._a.copy(order), self._device)

    def fill(self, value):
        self._a.fill(value)

    def view(self, dtype=None):
        return ndarray(self._a.view(dtype), self._device)

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __neg__(self):
        return _wrap(-self._a, self._device)

    def __pos__(self):
        return self

    def __abs__(self):
        return _wrap(abs(self._a), self._device)

    def __invert__(self):
        return _wrap(~self._a, self._device)


for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "any", "all", "prod", "std",
              "var", "cumsum", "clip", "dot", "nonzero", "squeeze", "swapaxes", "flatten",
              "round"):  # fmt: skip
    setattr(ndarray, _name, _method(_name))
for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
            "xor", "lshift", "rshift"):  # fmt: skip
    for _fmt in ("__{}__", "__r{}__"):
        setattr(ndarray, _fmt.format(_op), _binary(_fmt.format(_op)))
    setattr(ndarray, f"__i{_op}__", _inplace(f"__i{_op}__"))
for _op in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(ndarray, f"__{_op}__", _binary(f"__{_op}__"))
ndarray.__module__ = "cupy"
ndarray.__qualname__ = "ndarray"


def _unwrap_index(key, device):
    def one(k):
        if isinstance(k, ndarray):
            return _unwrap(k, [device])
        return k  # ints, slices, Ellipsis, None and NumPy index arrays (CuPy accepts those)

    return tuple(one(k) for k in key) if isinstance(key, tuple) else one(key)


# --- module-level functions --------------------------------------------------------------------


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        if a._device != _current():
            return ndarray(np.array(a._a, dtype=dtype, order=order or "C"), _current())
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    return ndarray(np.array(a, dtype=dtype, order=order or "K"), _current())


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(np.array(a._a, dtype=dtype, order=order), _current())
    return ndarray(np.array(a, dtype=dtype, order=order), _current())


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    if a._a.flags.c_contiguous and (dtype is None or a.dtype == np.dtype(dtype)):
        return a
    return ndarray(np.ascontiguousarray(a._a, dtype=dtype), a._device)


def _creator(fn):
    def make(*args, **kwargs):
        return ndarray(fn(*args, **kwargs), _current())

    make.__name__ = fn.__name__
    return make


def empty(shape, dtype=np.float64, order="C"):
    # Garbage, as on a device: NaN, so an element a kernel forgets to write is visible.
    a = np.empty(shape, dtype=dtype, order=order)
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    return ndarray(a, _current())


def empty_like(a, dtype=None):
    return empty(a.shape, dtype or a.dtype)


zeros = _creator(np.zeros)
ones = _creator(np.ones)
full = _creator(np.full)
arange = _creator(np.arange)
eye = _creator(np.eye)
linspace = _creator(np.linspace)


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def ones_like(a, dtype=None):
    return ones(a.shape, dtype or a.dtype)


def _function(name):
    fn = getattr(np, name)

    def wrapped(*args, **kwargs):
        return _call(fn, *args, **kwargs)

    wrapped.__name__ = name
    return wrapped


_FUNCTIONS = (
    "maximum", "minimum", "exp", "log", "log1p", "expm1", "sqrt", "abs", "absolute", "where",
    "clip", "isnan", "isinf", "isfinite", "sum", "mean", "max", "min", "argmax", "argmin",
    "concatenate", "stack", "reshape", "transpose", "square", "tanh", "sign", "equal",
    "not_equal", "less", "greater", "logical_and", "logical_or", "logical_not", "multiply",
    "add", "subtract", "divide", "power", "dot", "einsum", "allclose", "array_equal", "any",
    "all", "count_nonzero", "nan_to_num", "floor", "ceil", "prod", "cumsum", "sort",
    "argsort", "unique", "take", "broadcast_to", "expand_dims", "squeeze", "tensordot",
)  # fmt: skip
# Kept out of this module's globals (they would shadow min, max, sum, abs... here); module()
# puts them on the ``cupy`` module object.
_FUNCTION_TABLE = {name: _function(name) for name in _FUNCTIONS}


def matmul(a, b):
    """``cupy.matmul``: half operands accumulate in float32 here (cuBLAS compute 32F)."""
    box = [None]
    x, y = _unwrap(a, box), _unwrap(b, box)
    if x.dtype == np.float16:
        r = np.matmul(x.astype(np.float32), y.astype(np.float32)).astype(np.float16)
    else:
        r = np.matmul(x, y)
    return _wrap(r, box[0])


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, bool_, dtype, newaxis, nan, inf = np.uint8, np.bool_, np.dtype, np.newaxis, np.nan, np.inf


# --- random ------------------------------------------------------------------------------------


class _Generator:
    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def random(self, size=None, dtype=np.float64):
        return ndarray(np.asarray(self._g.random(size, dtype=dtype)), _current())

    def standard_normal(self, size=None, dtype=np.float64):
        return ndarray(np.asarray(self._g.standard_normal(size, dtype=dtype)), _current())

    def integers(self, low, high=None, size=None, dtype=np.int64):
        return ndarray(np.asarray(self._g.integers(low, high, size, dtype=dtype)), _current())

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return ndarray(np.asarray(self._g.uniform(low, high, size)).astype(dtype), _current())

    def permutation(self, n):
        return ndarray(self._g.permutation(n), _current())


random = types.ModuleType("cupy.random")
_global_rng = [_Generator(0)]
random.default_rng = _Generator
random.seed = lambda seed=None: _global_rng.__setitem__(0, _Generator(seed))
random.random = lambda size=None, dtype=np.float64: _global_rng[0].random(size, dtype)
random.rand = lambda *size: _global_rng[0].random(size or None)
random.randn = lambda *size: _global_rng[0].standard_normal(size or None)
random.standard_normal = lambda size=None, dtype=np.float64: _global_rng[0].standard_normal(
    size, dtype
)
random.uniform = lambda low=0.0, high=1.0, size=None, dtype=np.float64: _global_rng[0].uniform(
    low, high, size, dtype
)
random.permutation = lambda n: _global_rng[0].permutation(n)
random.Generator = _Generator


# --- cuda: devices, streams, events, runtime --------------------------------------------------


class Device:
    def __init__(self, device=None):
        self.id = _current() if device is None else int(device)
        if not 0 <= self.id < NUM_DEVICES:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.attributes = {"MultiProcessorCount": MULTIPROCESSOR_COUNT}
        self.compute_capability = "90"
        self._prev = []

    def use(self):
        _state.device = self.id

    def __enter__(self):
        self._prev.append(_current())
        _state.device = self.id
        return self

    def __exit__(self, *exc):
        _state.device = self._prev.pop()

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.ptr = 0 if null else id(self)
        self._prev = []

    def use(self):
        _state.stream = self
        return self

    def __enter__(self):
        self._prev.append(get_current_stream())
        _state.stream = self
        return self

    def __exit__(self, *exc):
        _state.stream = self._prev.pop()

    def synchronize(self):
        pass


Stream.null = Stream(null=True)


def get_current_stream():
    return getattr(_state, "stream", Stream.null)


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def get_elapsed_time(start, stop):
    return (stop.t - start.t) * 1e3


class _MemoryPool:
    """CuPy's default memory pool as far as fastconv's tools read it: the stand-in keeps its
    arrays in host memory, so the pool holds nothing."""

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_memory_pool = _MemoryPool()


def get_default_memory_pool():
    return _memory_pool


def _set_allocator(allocator=None):
    """``cupy.cuda.set_allocator``: recorded (``None`` = no pool, every allocation a
    cudaMalloc; what gpu_check's sanitizer tour asks for)."""
    stats.allocators.append(allocator)


runtime = types.ModuleType("cupy.cuda.runtime")
runtime.CUDARuntimeError = CUDARuntimeError
runtime.CUDA_R_32F, runtime.CUDA_R_16F = 0, 2
runtime.getDevice = _current
runtime.setDevice = lambda d: Device(d).use()
runtime.getDeviceCount = lambda: NUM_DEVICES
runtime.driverGetVersion = lambda: 13000
runtime.runtimeGetVersion = lambda: 13000
runtime.deviceSynchronize = lambda: None
runtime.memGetInfo = lambda: (16 * 2**30, 16 * 2**30)
runtime.getDeviceProperties = lambda d: {
    "name": b"fastconv stand-in (NumPy + g++ emulation)",
    "totalGlobalMem": 16 * 2**30,
    "multiProcessorCount": MULTIPROCESSOR_COUNT,
    "major": 9,
    "minor": 0,
}

nvrtc = types.ModuleType("cupy.cuda.nvrtc")
nvrtc.getVersion = lambda: (0, 0)


# --- RawModule -> the g++ emulation -----------------------------------------------------------

_lib_cache: dict[str, object] = {}


def _kernel_library():
    from . import emulation as _emulation

    lib = _lib_cache.get("lib")
    if lib is None:
        lib = _lib_cache["lib"] = _emulation.KernelLibrary(_emulation.build_library())
    return lib


class RawKernel:
    def __init__(self, module, name, kernel, dtype_name):
        self.module, self.name = module, name
        self.kernel, self.dtype_name = kernel, dtype_name
        self.sig = _source.SIGNATURES[kernel]

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        grid = grid if isinstance(grid, tuple) else (grid,)
        block = block if isinstance(block, tuple) else (block,)
        if len(grid) != 1 or len(block) != 1 or not 1 <= block[0] <= 1024 or grid[0] < 1:
            raise ValueError(f"{self.name}: bad launch configuration {grid}, {block}")
        if not isinstance(args, tuple) or len(args) != len(self.sig):
            raise TypeError(f"{self.name}: expected a tuple of {len(self.sig)} arguments")
        dev = _current()
        c_args = []
        for pos, (code, a) in enumerate(zip(self.sig, args, strict=True)):
            if code == "i":
                if type(a) is not np.int32:
                    raise TypeError(
                        f"{self.name}: argument {pos} must be numpy.int32 (a {type(a).__name__} "
                        "would reach the kernel with another width)"
                    )
                c_args.append(int(a))
                continue
            want = self.dtype_name if code in "rw" else "float32"
            if not (isinstance(a, ndarray) and a._a.flags.c_contiguous and a.dtype == want):
                raise TypeError(f"{self.name}: argument {pos} must be a C-contiguous {want} array")
            if a._device != dev:
                raise RuntimeError(
                    f"{self.name}: argument {pos} lives on device {a._device}, the launch runs "
                    f"on device {dev} (an illegal address on a GPU)"
                )
            c_args.append(a.data.ptr)
        stats.launches.append((self.kernel, self.dtype_name, grid[0], block[0], dev))
        _kernel_library().run(self.kernel, self.dtype_name, c_args, grid[0], block[0])


class RawModule:
    def __init__(self, code=None, path=None, options=(), backend="nvrtc", name_expressions=None,
                 **kwargs):  # fmt: skip
        self.code, self.options = code, tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        self.device = _current()
        self.compiled = False
        stats.modules.append(self)

    def compile(self, log_stream=None):
        if config.compile_error is not None:
            raise config.compile_error
        if self.code != _source.module_source():
            raise RuntimeError("stand-in RawModule: only fastconv's own kernel module compiles")
        _kernel_library()
        self.compiled = True

    def get_function(self, name):
        stats.get_function += 1
        if not self.compiled:
            self.compile()
        if name not in self.name_expressions:
            raise KeyError(f"{name!r} is not one of the module's name expressions")
        kernel, ctype = name[:-1].split("<")
        dtype_name = {v: k for k, v in _source.CTYPES.items()}[ctype]
        return RawKernel(self, name, kernel, dtype_name)


# --- cuBLAS: a column-major model reading raw device pointers ----------------------------------

cublas = types.ModuleType("cupy.cuda.cublas")
cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T = 0, 1
cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
cublas.CUBLAS_GEMM_DEFAULT = -1
cublas.CUBLAS_DEFAULT_MATH, cublas.CUBLAS_TF32_TENSOR_OP_MATH = 0, 3
cublas.CUBLAS_POINTER_MODE_HOST, cublas.CUBLAS_POINTER_MODE_DEVICE = 0, 1
_handles: dict[int, dict] = {}
_DTYPES = {0: np.dtype(np.float32), 2: np.dtype(np.float16)}


def _create():
    h = len(_handles) + 1
    _handles[h] = {"math": 0, "pointer": 0, "device": _current(), "stream": 0}
    return h


def _handle(h):
    if h not in _handles:
        raise RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED: unknown cuBLAS handle")
    state = _handles[h]
    if state["device"] != _current():
        raise RuntimeError("cuBLAS handle used on another device than the one it was made on")
    return state


def _ordered(state) -> None:
    """A GEMM must run on the stream of the kernels around it: on a GPU a handle bound to
    another stream (the default one, while CuPy's current stream is a non-blocking one) runs
    the GEMM unordered with them, a race. The stand-in refuses it."""
    if state["stream"] != get_current_stream().ptr:
        raise RuntimeError(
            f"cuBLAS handle bound to stream {state['stream']:#x}, CuPy's current stream is "
            f"{get_current_stream().ptr:#x}: the GEMM would race the kernels (cublasSetStream)"
        )


cublas.create = _create
cublas.destroy = lambda h: _handles.pop(h)
cublas.setMathMode = lambda h, mode: _handle(h).__setitem__("math", mode)
cublas.getMathMode = lambda h: _handle(h)["math"]
cublas.setPointerMode = lambda h, mode: _handle(h).__setitem__("pointer", mode)
cublas.getPointerMode = lambda h: _handle(h)["pointer"]
cublas.setStream = lambda h, s: _handle(h).__setitem__("stream", s)
cublas.getStream = lambda h: _handle(h)["stream"]


def _matrix(ptr, dtype, rows, cols, ld, dev, what):
    """The column-major ``rows x cols`` matrix at ``ptr`` with leading dimension ``ld``."""
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), dtype)
    extent = ((cols - 1) * ld + rows) * dtype.itemsize
    _, device = _allocation(ptr, extent)
    if device != dev:
        raise RuntimeError(f"cuBLAS stand-in: {what} lives on device {device}, not {dev}")
    buf = np.frombuffer((ctypes.c_char * extent).from_address(ptr), dtype=dtype)
    return np.lib.stride_tricks.as_strided(
        buf, shape=(rows, cols), strides=(dtype.itemsize, ld * dtype.itemsize), writeable=True
    )


def _gemm_one(state, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
              Ctype, ldc, computeType):  # fmt: skip
    if not (Atype == Btype == Ctype) or Atype not in _DTYPES:
        raise ValueError(f"CUBLAS_STATUS_NOT_SUPPORTED: types {Atype}, {Btype}, {Ctype}")
    if computeType != cublas.CUBLAS_COMPUTE_32F:
        raise ValueError(f"stand-in models CUBLAS_COMPUTE_32F only, got {computeType}")
    if min(m, n, k) < 0 or transa not in (0, 1) or transb not in (0, 1):
        raise ValueError("CUBLAS_STATUS_INVALID_VALUE: bad size or operation")
    a_rows = m if transa == 0 else k
    b_rows = k if transb == 0 else n
    if lda < max(1, a_rows) or ldb < max(1, b_rows) or ldc < max(1, m):
        raise ValueError(
            f"CUBLAS_STATUS_INVALID_VALUE: lda={lda} (>= {a_rows}), ldb={ldb} (>= {b_rows}), "
            f"ldc={ldc} (>= {m})"
        )
    dt, dev = _DTYPES[Atype], state["device"]
    a = _matrix(A, dt, a_rows, k if transa == 0 else m, lda, dev, "A")
    b = _matrix(B, dt, b_rows, n if transb == 0 else k, ldb, dev, "B")
    c = _matrix(C, dt, m, n, ldc, dev, "C")
    opa = a.astype(np.float32) if transa == 0 else a.T.astype(np.float32)
    opb = b.astype(np.float32) if transb == 0 else b.T.astype(np.float32)
    r = alpha * (opa @ opb) if k else np.zeros((m, n), np.float32)
    if beta != 0:  # beta == 0: C is write-only (it may hold NaN garbage), as in cuBLAS
        r = r + beta * c.astype(np.float32)
    c[...] = r.astype(dt)


def _scalar(ptr):
    return np.float32(ctypes.c_float.from_address(ptr).value)


def _gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
            Ctype, ldc, computeType, algo):  # fmt: skip
    state = _handle(handle)
    _ordered(state)
    stats.gemm_calls.append(("gemmEx", state["math"], computeType, Atype, (m, n, k)))
    _gemm_one(state, transa, transb, m, n, k, _scalar(alpha), A, Atype, lda, B, Btype, ldb,
              _scalar(beta), C, Ctype, ldc, computeType)  # fmt: skip


def _gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B,
                          Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                          computeType, algo):  # fmt: skip
    state = _handle(handle)
    _ordered(state)
    stats.gemm_calls.append(
        ("gemmStridedBatchedEx", state["math"], computeType, Atype, (m, n, k, batchCount))
    )
    if batchCount < 0 or (batchCount > 1 and strideC < ldc * n):
        raise ValueError("CUBLAS_STATUS_INVALID_VALUE: output batches overlap (a race on a GPU)")
    size = _DTYPES.get(Atype, np.dtype(np.float32)).itemsize
    al, be = _scalar(alpha), _scalar(beta)
    for i in range(batchCount):
        _gemm_one(state, transa, transb, m, n, k, al, A + i * strideA * size, Atype, lda,
                  B + i * strideB * size, Btype, ldb, be, C + i * strideC * size, Ctype, ldc,
                  computeType)  # fmt: skip


cublas.gemmEx = _gemmEx
cublas.gemmStridedBatchedEx = _gemmStridedBatchedEx


# --- the module tree ---------------------------------------------------------------------------

cuda = types.ModuleType("cupy.cuda")
cuda.Device, cuda.Stream, cuda.Event = Device, Stream, Event
cuda.get_current_stream, cuda.get_elapsed_time = get_current_stream, get_elapsed_time
cuda.runtime, cuda.cublas, cuda.nvrtc = runtime, cublas, nvrtc
cuda.MemoryPointer = MemoryPointer
cuda.set_allocator = _set_allocator
cuda.is_available = lambda: True

_MODULES = {
    "cupy": None,
    "cupy.cuda": cuda,
    "cupy.cuda.runtime": runtime,
    "cupy.cuda.cublas": cublas,
    "cupy.cuda.nvrtc": nvrtc,
    "cupy.random": random,
}
_saved: list[dict] = []


def module() -> types.ModuleType:
    """The stand-in as a module object named ``cupy``."""
    m = _MODULES.get("cupy")
    if m is None:
        m = types.ModuleType("cupy", __doc__)
        this = sys.modules[__name__]
        for name in dir(this):
            if not name.startswith("__") or name == "__version__":
                setattr(m, name, getattr(this, name))
        for name, fn in _FUNCTION_TABLE.items():
            setattr(m, name, fn)
        m.matmul = matmul
        _MODULES["cupy"] = m
    return m


def install() -> types.ModuleType:
    """Make ``import cupy`` (and ``cupy.cuda``, ``cupy.cuda.cublas``...) give the stand-in."""
    m = module()
    _saved.append({name: sys.modules.get(name) for name in _MODULES})
    for name, mod in _MODULES.items():
        sys.modules[name] = mod if mod is not None else m
    return m


def uninstall() -> None:
    """Undo the last :func:`install`."""
    for name, mod in _saved.pop().items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


def reset_stats() -> None:
    stats.modules.clear()
    stats.launches.clear()
    stats.gemm_calls.clear()
    stats.allocators.clear()
    stats.get_function = 0
    config.compile_error = None


def is_standin(mod) -> bool:
    return getattr(mod, "__version__", "") == __version__ and isinstance(mod, types.ModuleType)


@contextlib.contextmanager
def activated():
    """``with activated() as cupy:`` the stand-in is ``cupy`` and fastconv's GPU backend starts
    afresh (availability, module, function and handle caches); both are restored after."""
    from fastconv import gpu

    m = install()
    reset_stats()
    gpu.reset()
    try:
        yield m
    finally:
        uninstall()
        gpu.reset()
        reset_stats()
