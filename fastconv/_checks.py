"""Argument validation shared by every backend: one place, one wording.

Every public kernel validates here before any backend runs. Numba kernels do no
bounds checks, so a shape that slips through would read or write out of bounds;
hence every check a kernel relies on lives here and is exercised by tests.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _type_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__


def is_cupy_array(x) -> bool:
    """True for a ``cupy.ndarray``, without importing CuPy."""
    return type(x).__module__.startswith("cupy") and type(x).__name__ == "ndarray"


def check_array(x, name: str, ndim: int | None = None):
    """Check that ``x`` is a float32/float16 NumPy or CuPy array of ``ndim`` dims."""
    if not (isinstance(x, np.ndarray) or is_cupy_array(x)):
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
            raise TypeError(f"{name} must be a {where} like {reference_name}, got {_type_name(arr)}")
        if arr.dtype != reference.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {reference_name} ({np.dtype(reference.dtype)}), "
                f"got {np.dtype(arr.dtype)}"
            )


def as_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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


def _output_size(size: int, k: int, stride: int, pad: int, axis: str, what: str) -> int:
    padded = size + 2 * pad
    if k > padded:
        raise ValueError(
            f"{what} {axis} {k} exceeds the padded input {axis} {padded} (input {size}, pad {pad})"
        )
    return (padded - k) // stride + 1


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


def window_geometry(x_shape, kernel, stride, pad, what: str = "kernel") -> Geometry:
    if x_shape[2] < 1 or x_shape[3] < 1:
        # A 0-pixel image would leave windows with no pixel, which the kernels would read anyway.
        raise ValueError(f"x must have height and width >= 1, got shape {tuple(x_shape)}")
    N, C, H, W = x_shape
    kh, kw = kernel
    sh, sw = as_pair(stride, "stride", 1)
    ph, pw = as_pair(pad, "pad", 0)
    OH = _output_size(H, kh, sh, ph, "height", what)
    OW = _output_size(W, kw, sw, pw, "width", what)
    return Geometry(N, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW)


def check_shape(arr, name: str, expected) -> None:
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(arr.shape)}")


def check_x_shape(x_shape, name: str = "x_shape") -> tuple[int, int, int, int]:
    if not isinstance(x_shape, (tuple, list)) or len(x_shape) != 4:
        raise ValueError(f"{name} must be a 4-tuple (N, C, H, W), got {x_shape!r}")
    return tuple(as_int(v, f"{name}[{i}]", 1) for i, v in enumerate(x_shape))


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


def validate_conv2d(x, w, b, stride, pad, activation=None) -> Geometry:
    check_array(x, "x", 4)
    check_array(w, "w", 4)
    if b is not None:
        check_array(b, "b", 1)
    check_same_kind("x", x, w=w, b=b)
    F, C, kh, kw = w.shape
    if kh < 1 or kw < 1:
        raise ValueError(f"w must have kernel height and width >= 1, got shape {tuple(w.shape)}")
    if C != x.shape[1]:
        raise ValueError(
            f"w must have {x.shape[1]} input channels (w.shape[1]) to match x.shape[1], got {C}"
        )
    if b is not None and b.shape[0] != F:
        raise ValueError(f"b must have length {F} (w.shape[0]), got {b.shape[0]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return window_geometry(x.shape, (kh, kw), stride, pad)


def validate_conv2d_backward(dy, x, w, stride, pad) -> Geometry:
    g = validate_conv2d(x, w, None, stride, pad)
    check_array(dy, "dy", 4)
    check_same_kind("x", x, dy=dy)
    check_shape(dy, "dy", (g.N, w.shape[0], g.OH, g.OW))
    return g


def validate_pool(x, size, stride, pad, max_pool: bool) -> Geometry:
    check_array(x, "x", 4)
    kernel = as_pair(size, "size", 1)
    stride = kernel if stride is None else stride
    g = window_geometry(x.shape, kernel, stride, pad, what="window")
    if max_pool and (2 * g.ph > g.kh or 2 * g.pw > g.kw):
        # Beyond half the window some windows hold only padding and would have no maximum.
        raise ValueError(f"pad must be at most half the window size {kernel}, got {(g.ph, g.pw)}")
    return g


def validate_max_pool_backward(dy, x, size, stride, pad) -> Geometry:
    g = validate_pool(x, size, stride, pad, max_pool=True)
    check_array(dy, "dy", 4)
    check_same_kind("x", x, dy=dy)
    check_shape(dy, "dy", (g.N, g.C, g.OH, g.OW))
    return g


def validate_avg_pool_backward(dy, x_shape, size, stride, pad) -> Geometry:
    check_array(dy, "dy", 4)
    x_shape = check_x_shape(x_shape)
    kernel = as_pair(size, "size", 1)
    stride = kernel if stride is None else stride
    g = window_geometry(x_shape, kernel, stride, pad, what="window")
    check_shape(dy, "dy", (g.N, g.C, g.OH, g.OW))
    return g


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
    if not (isinstance(fields, np.ndarray) or is_cupy_array(fields)):
        raise TypeError(
            f"fields must be a numpy.ndarray or cupy.ndarray, got {_type_name(fields)}"
        )
    if np.dtype(fields.dtype) != np.float32:
        raise TypeError(f"fields must have dtype float32, got {np.dtype(fields.dtype)}")
    if fields.ndim != 3:
        raise ValueError(f"fields must be 3-dimensional (P, H, W), got shape {fields.shape}")
    ok = isinstance(sigma, numbers.Real) and not isinstance(sigma, bool)
    if not ok or not 0 < sigma < np.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    return float(sigma)
