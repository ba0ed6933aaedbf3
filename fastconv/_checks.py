"""Argument validation shared by every backend: one place, one wording.

Every public kernel validates here before any backend runs. Numba kernels do no
bounds checks, so a shape that slips through would read or write out of bounds;
hence every check a kernel relies on lives here and is exercised by tests.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _type_name(obj) -> str:
    cls = type(obj)
    return (
        f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__
    )


def is_cupy_array(x) -> bool:
    """True for a ``cupy.ndarray``, without importing CuPy."""
    return type(x).__module__.startswith("cupy") and type(x).__name__ == "ndarray"


def is_array(x) -> bool:
    """True for a NumPy or CuPy array (what every fastconv function takes)."""
    return isinstance(x, np.ndarray) or is_cupy_array(x)


def check_array(x, name: str, ndim: int | None = None):
    """Check that ``x`` is a float32/float16 NumPy or CuPy array of ``ndim`` dims."""
    if not is_array(x):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {_type_name(x)}")
    if np.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float16, got {np.dtype(x.dtype)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(x.shape)}")
    return x


def check_same_kind(reference_name: str, reference, **others) -> None:
    """All arrays share dtype and array library (NumPy or CuPy) with ``reference``."""
    ref_gpu = is_cupy_array(reference)
    for name, arr in others.items():
        if arr is None:
            continue
        if is_cupy_array(arr) != ref_gpu:
            where = "cupy.ndarray" if ref_gpu else "numpy.ndarray"
            raise TypeError(
                f"{name} must be a {where} like {reference_name}, got {_type_name(arr)}"
            )
        if arr.dtype != reference.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {reference_name} "
                f"({np.dtype(reference.dtype)}), got {np.dtype(arr.dtype)}"
            )


def as_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_seed(value, name: str = "seed"):
    """None or an int >= 0 (what :func:`numpy.random.default_rng` takes as a seed), with the
    argument's name in the message rather than NumPy's "expected non-negative integer"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be None or an int >= 0, got {_type_name(value)}")
    if value < 0:
        raise ValueError(f"{name} must be None or an int >= 0, got {value}")
    return int(value)


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse, before allocating, an array larger than this machine's memory: NumPy would
    raise a bare MemoryError, or (with overcommit) the kernel kill the process while the
    array is being filled."""
    ram = physical_memory()
    if ram is not None and nbytes > ram:
        raise ValueError(
            f"{what} needs {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB), more than this "
            f"machine's memory ({ram / 2**30:,.1f} GiB)"
        )


def as_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or an ``(h, w)`` pair of ints, each at least ``minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        return as_int(value[0], f"{name}[0]", minimum), as_int(value[1], f"{name}[1]", minimum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a pair (h, w) of ints, got {_type_name(value)}")
    v = as_int(value, name, minimum)
    return v, v


def _output_size(
    size: int, k: int, stride: int, pad: int, axis: str, what: str, ceil_mode: bool = False
) -> int:
    padded = size + 2 * pad
    if k > padded:
        raise ValueError(
            f"{what} {axis} {k} exceeds the padded input {axis} {padded} (input {size}, pad {pad})"
        )
    if not ceil_mode:
        return (padded - k) // stride + 1
    # ceil_mode (pooling): a last, partial window covers the rows the floor would drop; as in
    # PyTorch it must start inside the input or its left/top padding, so it is never empty.
    out = -(-(padded - k) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


def as_pads(value, name: str = "pad") -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` from an int, an ``(h, w)`` pair or a 4-tuple of ints
    >= 0 (the order of ONNX's ``pads`` is ``(top, left, bottom, right)``: reorder it)."""
    if isinstance(value, (tuple, list)) and len(value) == 4:
        return tuple(as_int(v, f"{name}[{i}]", 0) for i, v in enumerate(value))
    if isinstance(value, (tuple, list)) and len(value) != 2:
        raise ValueError(
            f"{name} must be an int, a pair (h, w) or (top, bottom, left, right), got {value!r}"
        )
    if not isinstance(value, (tuple, list)) and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral)
    ):
        raise TypeError(
            f"{name} must be an int, a pair (h, w) or (top, bottom, left, right) of ints, got "
            f"{_type_name(value)}"
        )
    ph, pw = as_pair(value, name, 0)
    return ph, ph, pw, pw


def symmetric(pads) -> bool:
    """Do ``(top, bottom, left, right)`` pads equal the kernels' symmetric form?"""
    return pads[0] == pads[1] and pads[2] == pads[3]


def split_pads(pads):
    """``(extra, (ph, pw))``: the rows/columns to add explicitly on each side
    ``(top, bottom, left, right)``, and the symmetric pad the kernels take for the rest."""
    t, b, left, r = pads
    ph, pw = min(t, b), min(left, r)
    return (t - ph, b - ph, left - pw, r - pw), (ph, pw)


class Geometry(NamedTuple):
    """A validated sliding-window problem; every backend receives this."""

    N: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    OH: int
    OW: int

    @property
    def x_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def out_hw(self):
        return (self.OH, self.OW)


def window_geometry(
    x_shape, kernel, stride, pad, what: str = "kernel", ceil_mode: bool = False
) -> Geometry:
    """The validated geometry; ``ceil_mode`` (pooling) rounds the output size up, the windows
    past the bottom/right edge being clipped there (as PyTorch's ``ceil_mode=True``)."""
    if x_shape[2] < 1 or x_shape[3] < 1:
        # A 0-pixel image would leave windows with no pixel, which the kernels would read anyway.
        raise ValueError(f"x must have height and width >= 1, got shape {tuple(x_shape)}")
    N, C, H, W = x_shape
    kh, kw = kernel
    sh, sw = as_pair(stride, "stride", 1)
    ph, pw = as_pair(pad, "pad", 0)
    OH = _output_size(H, kh, sh, ph, "height", what, ceil_mode)
    OW = _output_size(W, kw, sw, pw, "width", what, ceil_mode)
    return Geometry(N, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW)


def check_shape(arr, name: str, expected) -> None:
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(arr.shape)}")


def check_x_shape(x_shape, name: str = "x_shape") -> tuple[int, int, int, int]:
    """A 4-tuple (N, C, H, W) of ints; N may be 0 (an empty batch, as the forward ops accept)."""
    if not isinstance(x_shape, (tuple, list)) or len(x_shape) != 4:
        raise ValueError(f"{name} must be a 4-tuple (N, C, H, W), got {x_shape!r}")
    return tuple(as_int(v, f"{name}[{i}]", 0 if i == 0 else 1) for i, v in enumerate(x_shape))


# --- per-operation validators ---------------------------------------------------------------


def validate_im2col(x, kh, kw, stride, pad) -> Geometry:
    check_array(x, "x", 4)
    kernel = (as_int(kh, "kh", 1), as_int(kw, "kw", 1))
    return window_geometry(x.shape, kernel, stride, pad)


def validate_col2im(cols, x_shape, kh, kw, stride, pad) -> Geometry:
    check_array(cols, "cols", 2)
    x_shape = check_x_shape(x_shape)
    kernel = (as_int(kh, "kh", 1), as_int(kw, "kw", 1))
    g = window_geometry(x_shape, kernel, stride, pad)
    check_shape(cols, "cols", (g.N * g.OH * g.OW, g.C * g.kh * g.kw))
    return g


ACTIVATIONS = (None, "relu")
CONV_ACTIVATIONS = (None, "relu", "relu6")  # convolutions also take MobileNet's ReLU6


class ConvProblem(NamedTuple):
    """A validated convolution with every feature: ``pads`` ``(top, bottom, left, right)``,
    ``dilation`` ``(dh, dw)`` and ``groups``. :attr:`plain` problems go to the kernels'
    symmetric :class:`Geometry` directly; :attr:`depthwise` ones to the depthwise kernels."""

    N: int
    C: int
    H: int
    W: int
    F: int
    kh: int
    kw: int
    sh: int
    sw: int
    pads: tuple
    dh: int
    dw: int
    groups: int
    OH: int
    OW: int

    @property
    def plain(self) -> bool:
        """One group, no dilation, the same padding on opposite sides."""
        return self.groups == 1 and (self.dh, self.dw) == (1, 1) and symmetric(self.pads)

    @property
    def depthwise(self) -> bool:
        """Each input channel convolved on its own (``groups == C``, ``F`` a multiple of it)."""
        return self.groups == self.C and self.C > 1

    @property
    def extent(self) -> tuple[int, int]:
        """The dilated kernel's height and width."""
        return (self.kh - 1) * self.dh + 1, (self.kw - 1) * self.dw + 1

    def geometry(self) -> Geometry:
        """The symmetric :class:`Geometry` of a :attr:`plain` problem."""
        t, _, left, _ = self.pads
        return Geometry(self.N, self.C, self.H, self.W, self.kh, self.kw, self.sh, self.sw,
                        t, left, self.OH, self.OW)  # fmt: skip


def _conv_out(size, extent, stride, before, after, axis, dilated) -> int:
    padded = size + before + after
    if extent > padded:
        what = "kernel (dilated)" if dilated else "kernel"
        pad = before if before == after else f"{before} + {after}"
        raise ValueError(
            f"{what} {axis} {extent} exceeds the padded input {axis} {padded} (input {size}, "
            f"pad {pad})"
        )
    return (padded - extent) // stride + 1


def as_groups(groups, C: int, F: int) -> int:
    """``groups``: an int >= 1 dividing the input channels ``C`` and the filters ``F``."""
    groups = as_int(groups, "groups", 1)
    if C % groups or F % groups:
        raise ValueError(
            f"groups must divide the input channels {C} and the output channels {F}, got {groups}"
        )
    return groups


def validate_conv(x, w, b, stride, pad, activation=None, groups=1, dilation=1) -> ConvProblem:
    """Every argument of :func:`fastconv.ops.conv2d`; ``w`` is ``(F, C // groups, kh, kw)``."""
    check_array(x, "x", 4)
    check_array(w, "w", 4)
    if b is not None:
        check_array(b, "b", 1)
    check_same_kind("x", x, w=w, b=b)
    N, C, H, W = x.shape
    F, Cg, kh, kw = w.shape
    if kh < 1 or kw < 1:
        raise ValueError(f"w must have kernel height and width >= 1, got shape {tuple(w.shape)}")
    if H < 1 or W < 1:
        raise ValueError(f"x must have height and width >= 1, got shape {tuple(x.shape)}")
    groups = as_groups(groups, C, F)
    if Cg * groups != C:
        raise ValueError(
            f"w must have {C} input channels (w.shape[1]) to match x.shape[1], got {Cg}"
            if groups == 1
            else f"w must have {C // groups} input channels (w.shape[1] = x.shape[1] / groups "
            f"= {C} / {groups}), got {Cg}"
        )
    if b is not None and b.shape[0] != F:
        raise ValueError(f"b must have length {F} (w.shape[0]), got {b.shape[0]}")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be None, 'relu' or 'relu6', got {activation!r}")
    sh, sw = as_pair(stride, "stride", 1)
    dh, dw = as_pair(dilation, "dilation", 1)
    pads = as_pads(pad)
    OH = _conv_out(H, (kh - 1) * dh + 1, sh, pads[0], pads[1], "height", dh > 1)
    OW = _conv_out(W, (kw - 1) * dw + 1, sw, pads[2], pads[3], "width", dw > 1)
    return ConvProblem(N, C, H, W, F, kh, kw, sh, sw, pads, dh, dw, groups, OH, OW)


def validate_conv_backward(dy, x, w, stride, pad, groups=1, dilation=1) -> ConvProblem:
    p = validate_conv(x, w, None, stride, pad, None, groups, dilation)
    check_array(dy, "dy", 4)
    check_same_kind("x", x, dy=dy)
    check_shape(dy, "dy", (p.N, p.F, p.OH, p.OW))
    return p


def validate_conv2d(x, w, b, stride, pad, activation=None) -> Geometry:
    """A plain convolution (one group, no dilation, an int or ``(h, w)`` pad) as the kernels'
    :class:`Geometry`."""
    if isinstance(pad, (tuple, list)) and len(pad) != 2:
        as_pair(pad, "pad", 0)  # its error: this form takes no four-sided pads
    return validate_conv(x, w, b, stride, pad, activation).geometry()


def check_ceil_mode(ceil_mode) -> bool:
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {_type_name(ceil_mode)}")
    return bool(ceil_mode)


def validate_pool(x, size, stride, pad, max_pool: bool, ceil_mode=False) -> Geometry:
    check_array(x, "x", 4)
    kernel = as_pair(size, "size", 1)
    stride = kernel if stride is None else stride
    ceil_mode = check_ceil_mode(ceil_mode)
    g = window_geometry(x.shape, kernel, stride, pad, what="window", ceil_mode=ceil_mode)
    if max_pool and (2 * g.ph > g.kh or 2 * g.pw > g.kw):
        # Beyond half the window some windows hold only padding and would have no maximum.
        raise ValueError(f"pad must be at most half the window size {kernel}, got {(g.ph, g.pw)}")
    return g


def check_count_include_pad(value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"count_include_pad must be a bool, got {_type_name(value)}")
    return bool(value)


def _plain(value) -> bool:
    """An int (not a bool), None, or a tuple of ints: arguments whose equality and hash say
    everything validation looks at (True == 1 would not)."""
    t = type(value)
    if t is int or value is None:
        return True
    if t is not tuple:
        return False
    for v in value:  # (a loop, not all() over a generator: half the time, every pool call)
        if type(v) is not int:
            return False
    return True


_POOL_GEOMETRIES: dict = {}  # plain arguments -> pool_pads' result (validated before)


def pool_pads(x_shape, size, stride, pad, max_pool, ceil_mode, count_include_pad=True):
    """:func:`_pool_pads`, remembered for plain arguments (a layer validates the same
    geometry on every call: ~5 us of a 14 us batch-1 pooling call)."""
    args = (x_shape, size, stride, pad, max_pool, ceil_mode, count_include_pad)
    key = None
    if (
        _plain(x_shape)
        and _plain(size)
        and _plain(stride)
        and _plain(pad)
        and type(max_pool) is bool
        and type(ceil_mode) is bool
        and type(count_include_pad) is bool
    ):
        key = args
        found = _POOL_GEOMETRIES.get(key)
        if found is not None:
            return found
    found = _pool_pads(*args)
    if key is not None and len(_POOL_GEOMETRIES) < 4096:
        _POOL_GEOMETRIES[key] = found
    return found


def _pool_pads(x_shape, size, stride, pad, max_pool, ceil_mode, count_include_pad=True):
    """Pooling with ``pad`` an int, a pair or ``(top, bottom, left, right)``: returns
    ``(pads, extra, g)``: the four pads, the zeros (-inf for max) to add on each side
    explicitly, and the :class:`Geometry` of the kernels' symmetric problem on the input so
    padded. Refuses a side padded past half the window (a window of padding only: no maximum,
    no real cell to average) and ceil_mode with asymmetric padding."""
    kernel = as_pair(size, "size", 1)
    stride = kernel if stride is None else stride
    ceil_mode = check_ceil_mode(ceil_mode)
    count_include_pad = check_count_include_pad(count_include_pad)
    pads = as_pads(pad)
    if (max_pool or not count_include_pad) and (
        2 * max(pads[:2]) > kernel[0] or 2 * max(pads[2:]) > kernel[1]
    ):
        what = "pad" if symmetric(pads) else "each pad"
        shown = (pads[0], pads[2]) if symmetric(pads) else pads
        raise ValueError(f"{what} must be at most half the window size {kernel}, got {shown}")
    if symmetric(pads):
        g = window_geometry(x_shape, kernel, stride, (pads[0], pads[2]), "window", ceil_mode)
        return pads, (0, 0, 0, 0), g
    if ceil_mode:
        raise ValueError(
            f"ceil_mode=True needs the same padding on opposite sides, got pad {pads} "
            "(top, bottom, left, right)"
        )
    extra, sym = split_pads(pads)
    N, C, H, W = x_shape
    padded = (N, C, H + extra[0] + extra[1], W + extra[2] + extra[3])
    return pads, extra, window_geometry(padded, kernel, stride, sym, "window")


def validate_max_pool_backward(dy, x, size, stride, pad, ceil_mode=False) -> Geometry:
    g = validate_pool(x, size, stride, pad, max_pool=True, ceil_mode=ceil_mode)
    check_array(dy, "dy", 4)
    check_same_kind("x", x, dy=dy)
    check_shape(dy, "dy", (g.N, g.C, g.OH, g.OW))
    return g


def validate_avg_pool_backward(dy, x_shape, size, stride, pad, ceil_mode=False) -> Geometry:
    check_array(dy, "dy", 4)
    x_shape = check_x_shape(x_shape)
    kernel = as_pair(size, "size", 1)
    stride = kernel if stride is None else stride
    ceil_mode = check_ceil_mode(ceil_mode)
    g = window_geometry(x_shape, kernel, stride, pad, what="window", ceil_mode=ceil_mode)
    check_shape(dy, "dy", (g.N, g.C, g.OH, g.OW))
    return g


# --- normalisation, global pooling, dense, activations ----------------------------------------


class ChannelGeometry(NamedTuple):
    """An (N, C) or (N, C, H, W) tensor seen as (N, C, P): P = H*W pixels per channel (1 for 2-D).

    ``M = N*P`` values per channel: what batch statistics and global pooling reduce over.
    """

    N: int
    C: int
    P: int
    shape: tuple

    @property
    def M(self) -> int:
        return self.N * self.P


class DenseGeometry(NamedTuple):
    N: int  # rows (samples)
    K: int  # input features (w.shape[0])
    F: int  # output features (w.shape[1])


def check_eps(eps) -> float:
    """A finite, non-negative real number (the variance floor of batch normalisation)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {_type_name(eps)}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def channel_geometry(x, name: str = "x") -> ChannelGeometry:
    """``x`` must be (N, C) or (N, C, H, W) with H, W >= 1; N and C may be 0."""
    check_array(x, name)
    shape = tuple(x.shape)
    if len(shape) == 2:
        return ChannelGeometry(shape[0], shape[1], 1, shape)
    if len(shape) != 4:
        raise ValueError(
            f"{name} must be 2-dimensional (N, C) or 4-dimensional (N, C, H, W), got shape {shape}"
        )
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"{name} must have height and width >= 1, got shape {shape}")
    return ChannelGeometry(shape[0], shape[1], shape[2] * shape[3], shape)


def _is_like(a, x, shape, dtype) -> bool:
    """Fast acceptance: ``a`` is an array of x's exact type with this shape and dtype. The
    full checks (with their messages) run only when this says no; this keeps the validation
    of a small batch-norm call at a few microseconds."""
    return type(a) is type(x) and a.shape == shape and a.dtype == dtype


def check_channel_params(x_name: str, x, C: int, **params) -> None:
    """Per-channel parameters (gamma, beta): 1-D of length C, x's dtype and array library."""
    for name, a in params.items():
        if a is None or _is_like(a, x, (C,), x.dtype):
            continue
        check_array(a, name, 1)
        check_same_kind(x_name, x, **{name: a})
        check_shape(a, name, (C,))


_F32 = np.dtype(np.float32)


def check_statistics(x_name: str, x, C: int, **stats) -> None:
    """Running/batch statistics (mean, var): float32 (C,) in x's array library, whatever x's
    dtype (float32 statistics in every model dtype, as cuDNN requires)."""
    for name, a in stats.items():
        if _is_like(a, x, (C,), _F32):
            continue
        if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
            raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {_type_name(a)}")
        if is_cupy_array(a) != is_cupy_array(x):
            where = "cupy.ndarray" if is_cupy_array(x) else "numpy.ndarray"
            raise TypeError(f"{name} must be a {where} like {x_name}, got {_type_name(a)}")
        if np.dtype(a.dtype) != np.float32:
            raise TypeError(
                f"{name} must have dtype float32 (batch-norm statistics are float32 for every "
                f"model dtype), got {np.dtype(a.dtype)}"
            )
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-dimensional, got shape {tuple(a.shape)}")
        check_shape(a, name, (C,))


def _check_like(x_name: str, x, /, **others) -> None:
    """Arrays of exactly x's shape, dtype and array library (dy, y)."""
    for name, a in others.items():
        if a is None or _is_like(a, x, x.shape, x.dtype):
            continue
        check_array(a, name)
        check_same_kind(x_name, x, **{name: a})
        check_shape(a, name, x.shape)


def _check_batch_variance(g: ChannelGeometry, what: str) -> None:
    if g.M == 1:
        dims = "N" if len(g.shape) == 2 else "N*H*W"
        raise ValueError(
            f"{what}: x must hold more than 1 value per channel in training ({dims} = 1, "
            f"shape {g.shape}): the batch variance is undefined"
        )


def validate_batch_norm(x, gamma, beta, eps, activation) -> tuple[ChannelGeometry, float]:
    """Training-mode forward: (N, C[, H, W]) with N*H*W != 1."""
    g = channel_geometry(x)
    check_channel_params("x", x, g.C, gamma=gamma, beta=beta)
    eps = check_eps(eps)
    check_activation(activation)
    _check_batch_variance(g, "batch_norm_forward")
    return g, eps


def validate_batch_norm_inference(x, gamma, beta, mean, var, eps, activation):
    g = channel_geometry(x)
    check_channel_params("x", x, g.C, gamma=gamma, beta=beta)
    check_statistics("x", x, g.C, mean=mean, var=var)
    eps = check_eps(eps)
    check_activation(activation)
    return g, eps


def validate_batch_norm_backward(dy, x, gamma, mean, var, eps, y):
    g = channel_geometry(x)
    _check_like("x", x, dy=dy, y=y)
    check_channel_params("x", x, g.C, gamma=gamma)
    check_statistics("x", x, g.C, mean=mean, var=var)
    eps = check_eps(eps)
    _check_batch_variance(g, "batch_norm_backward")
    return g, eps


def validate_batch_norm_inference_backward(dy, gamma, var, eps, y):
    g = channel_geometry(dy, "dy")
    _check_like("dy", dy, y=y)
    check_channel_params("dy", dy, g.C, gamma=gamma)
    check_statistics("dy", dy, g.C, var=var)
    return g, check_eps(eps)


def validate_fold_batch_norm(w, b, gamma, beta, mean, var, eps):
    """``w`` (F, C, kh, kw) of a conv or (in, F) of a dense layer; returns (F, eps)."""
    check_array(w, "w")
    if w.ndim == 4:
        F = int(w.shape[0])
    elif w.ndim == 2:
        F = int(w.shape[1])
    else:
        raise ValueError(
            "w must be a conv kernel (F, C, kh, kw) or a dense kernel (in, out), "
            f"got shape {tuple(w.shape)}"
        )
    check_channel_params("w", w, F, b=b, gamma=gamma, beta=beta)
    check_statistics("w", w, F, mean=mean, var=var)
    return F, check_eps(eps)


def validate_global_avg_pool(x) -> ChannelGeometry:
    check_array(x, "x", 4)
    return channel_geometry(x)


def validate_global_avg_pool_backward(dy, x_shape) -> ChannelGeometry:
    check_array(dy, "dy", 2)
    N, C, H, W = check_x_shape(x_shape)
    check_shape(dy, "dy", (N, C))
    return ChannelGeometry(N, C, H * W, (N, C, H, W))


def validate_dense(x, w, b, activation) -> DenseGeometry:
    check_array(x, "x", 2)
    check_array(w, "w", 2)
    if b is not None:
        check_array(b, "b", 1)
    check_same_kind("x", x, w=w, b=b)
    N, K = (int(s) for s in x.shape)
    if w.shape[0] != K:
        raise ValueError(
            f"w must have {K} rows (w.shape[0], Keras layout (in, out)) to match x.shape[1], "
            f"got shape {tuple(w.shape)}"
        )
    F = int(w.shape[1])
    if b is not None and b.shape[0] != F:
        raise ValueError(f"b must have length {F} (w.shape[1]), got {b.shape[0]}")
    check_activation(activation)
    return DenseGeometry(N, K, F)


def validate_dense_backward(dy, x, w, need_dx) -> DenseGeometry:
    g = validate_dense(x, w, None, None)
    check_array(dy, "dy", 2)
    check_same_kind("x", x, dy=dy)
    check_shape(dy, "dy", (g.N, g.F))
    if not isinstance(need_dx, (bool, np.bool_)):
        raise TypeError(f"need_dx must be a bool, got {_type_name(need_dx)}")
    return g


# --- elementwise ops: any shape; what an elementwise op composes its validation from ----------


def validate_elementwise(x, name: str = "x") -> None:
    """Any shape, a float32/float16 array."""
    check_array(x, name)


def validate_elementwise_backward(dy, saved, out, saved_name: str) -> None:
    """``dy`` and the array the forward saved (its ``y`` or ``x``: ``saved_name``) alike;
    ``out`` alike, C-contiguous and sharing memory with neither."""
    check_array(dy, "dy")
    _check_like("dy", dy, **{saved_name: saved})
    if out is None:
        return
    _check_like("dy", dy, out=out)
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    for name, a in (("dy", dy), (saved_name, saved)):
        if _may_overlap(out, a):
            raise ValueError(f"out must not share memory with {name}")


def as_finite_float32(value, name: str) -> np.float32:
    """A real scalar (a slope, a clip bound...), finite in float32, the kernels' type."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    with np.errstate(over="ignore"):
        result = np.float32(value)
    if not np.isfinite(result):
        raise ValueError(f"{name} must be finite in float32, got {value!r}")
    return result


def _memory_bounds(a):
    """[low, high) byte addresses an array's elements can touch (NumPy's and CuPy's
    ``may_share_memory`` test), or None when it is empty."""
    if a.size == 0:
        return None
    low = high = a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]
    for n, stride in zip(a.shape, a.strides, strict=True):
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + a.itemsize


def _may_overlap(a, b) -> bool:
    ba, bb = _memory_bounds(a), _memory_bounds(b)
    return ba is not None and bb is not None and ba[0] < bb[1] and bb[0] < ba[1]


# --- convolution algorithms (CPU backend) ---------------------------------------------------

CONV_ALGORITHMS = ("direct", "unfolded", "winograd4x4", "winograd2x2")
CONV_ALGORITHM_ALIASES = {"winograd": "winograd4x4"}
CONV_ALGORITHM_MODES = ("auto", "benchmark")


def check_conv_algorithm(algorithm, modes=("auto",)) -> str:
    """Canonical name of ``algorithm`` (an algorithm, an alias, or one of ``modes``)."""
    allowed = modes + CONV_ALGORITHMS + tuple(CONV_ALGORITHM_ALIASES)
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a str (one of {allowed}), got {_type_name(algorithm)}")
    if algorithm not in allowed:
        raise ValueError(f"algorithm must be one of {allowed}, got {algorithm!r}")
    return CONV_ALGORITHM_ALIASES.get(algorithm, algorithm)


def check_conv_algorithm_applies(name: str, g: Geometry) -> None:
    """ValueError unless algorithm ``name`` can run the layer of geometry ``g``."""
    if name == "direct" and (g.sh, g.sw) != (1, 1):
        raise ValueError(f"algorithm 'direct' needs stride 1, got stride {(g.sh, g.sw)}")
    if name.startswith("winograd"):
        if (g.kh, g.kw) != (3, 3) or (g.sh, g.sw) != (1, 1) or max(g.ph, g.pw) > 2:
            raise ValueError(
                f"algorithm {name!r} needs a 3x3 kernel, stride 1 and pad <= 2, got a "
                f"{g.kh}x{g.kw} kernel, stride {(g.sh, g.sw)}, pad {(g.ph, g.pw)}"
            )


# --- augmentation -------------------------------------------------------------------------------


def _check_float32_param(a, name, shape, reference):
    """A float32 array of ``shape`` on the same library (NumPy/CuPy) as ``reference``."""
    if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {_type_name(a)}")
    if is_cupy_array(a) != is_cupy_array(reference):
        where = "cupy.ndarray" if is_cupy_array(reference) else "numpy.ndarray"
        raise TypeError(f"{name} must be a {where} like x, got {_type_name(a)}")
    if np.dtype(a.dtype) != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {np.dtype(a.dtype)}")
    check_shape(a, name, shape)


def validate_warp(x, theta, flow, out_size) -> tuple[int, int]:
    """Arguments of :func:`fastconv.ops.warp_bilinear`; returns the output ``(OH, OW)``."""
    check_array(x, "x", 4)
    N, _, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"x must have height and width >= 1, got shape {tuple(x.shape)}")
    out_hw = (H, W) if out_size is None else as_pair(out_size, "out_size", 1)
    _check_float32_param(theta, "theta", (N, 2, 3), x)
    if flow is not None:
        _check_float32_param(flow, "flow", (N, 2, *out_hw), x)
    return out_hw


def validate_blur(fields, sigma) -> float:
    """Arguments of :func:`fastconv.ops.gaussian_blur`: float32 planes (P, H, W), sigma > 0."""
    if not is_array(fields):
        raise TypeError(f"fields must be a numpy.ndarray or cupy.ndarray, got {_type_name(fields)}")
    if np.dtype(fields.dtype) != np.float32:
        raise TypeError(f"fields must have dtype float32, got {np.dtype(fields.dtype)}")
    if fields.ndim != 3:
        raise ValueError(f"fields must be 3-dimensional (P, H, W), got shape {fields.shape}")
    ok = isinstance(sigma, numbers.Real) and not isinstance(sigma, bool)
    if not ok or not 0 < sigma < np.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    return float(sigma)
