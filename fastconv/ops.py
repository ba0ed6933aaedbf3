"""Public kernels: validate once, then dispatch on array type (NumPy -> ``cpu``, CuPy -> ``gpu``).

Each backend module exposes the same functions taking already validated, C-contiguous
arrays and a :class:`~fastconv._checks.Geometry`; this module is the only caller, so
validation cannot be skipped on the way to a kernel that does no bounds checks.
"""

from __future__ import annotations

import numpy as np

from . import _checks as chk

__all__ = [
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "warp_bilinear",
    "gaussian_blur",
    "gpu_available",
    "to_gpu",
    "to_cpu",
]


def _backend(x):
    if chk.is_cupy_array(x):
        from . import gpu

        return gpu
    from . import cpu

    return cpu


def _launch(be, kernel, *args, **kwargs):
    """Run a backend kernel under the backend's launch guard (thread safety, see
    :mod:`fastconv.cpu._workspace`)."""
    with be.launch_guard():
        return getattr(be, kernel)(*args, **kwargs)


def _contiguous(backend, *arrays):
    return tuple(None if a is None else backend.ascontiguous(a) for a in arrays)


def im2col(x, kh, kw, stride=1, pad=0):
    """Unfold sliding windows into a matrix.

    Parameters
    ----------
    x : ndarray, (N, C, H, W), float32 or float16
    kh, kw : int
        Window height and width.
    stride, pad : int or (int, int)

    Returns
    -------
    ndarray, (N*OH*OW, C*kh*kw), same dtype as ``x``
        Rows ordered (n, oh, ow), columns (c, i, j), as in the book.
    """
    g = chk.validate_im2col(x, kh, kw, stride, pad)
    be = _backend(x)
    (x,) = _contiguous(be, x)
    return _launch(be, "im2col", x, g)


def col2im(cols, x_shape, kh, kw, stride=1, pad=0):
    """Adjoint of :func:`im2col`: sum every column entry back into its image pixel.

    Returns
    -------
    ndarray, ``x_shape``, same dtype as ``cols``
    """
    g = chk.validate_col2im(cols, x_shape, kh, kw, stride, pad)
    be = _backend(cols)
    (cols,) = _contiguous(be, cols)
    return _launch(be, "col2im", cols, g)


def conv2d(x, w, b=None, stride=1, pad=0, activation=None):
    """2-D cross-correlation (the deep-learning "convolution").

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
    w : ndarray, (F, C, kh, kw)
    b : ndarray, (F,), optional
    stride, pad : int or (int, int)
    activation : None or "relu"
        Fused epilogue applied after the bias.

    Returns
    -------
    ndarray, (N, F, OH, OW), same dtype as ``x``
    """
    g = chk.validate_conv2d(x, w, b, stride, pad, activation)
    be = _backend(x)
    x, w, b = _contiguous(be, x, w, b)
    return _launch(be, "conv2d", x, w, b, g, activation)


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True):
    """Gradients of :func:`conv2d` (without activation).

    Parameters
    ----------
    need_dx : bool
        False skips computing ``dx`` (e.g. for a network's first layer, whose input needs no
        gradient) and returns None in its place.

    Returns
    -------
    dx : ndarray, (N, C, H, W), or None when ``need_dx`` is False
    dw : ndarray, (F, C, kh, kw)
    db : ndarray, (F,)
    """
    g = chk.validate_conv2d_backward(dy, x, w, stride, pad)
    if not isinstance(need_dx, (bool, np.bool_)):
        raise TypeError(f"need_dx must be a bool, got {type(need_dx).__name__}")
    be = _backend(x)
    dy, x, w = _contiguous(be, dy, x, w)
    return _launch(be, "conv2d_backward", dy, x, w, g, need_dx=bool(need_dx))


def max_pool2d(x, size=2, stride=None, pad=0):
    """Max pooling; ``stride`` defaults to ``size`` and padding never wins the max.

    Returns
    -------
    ndarray, (N, C, OH, OW), same dtype as ``x``
    """
    g = chk.validate_pool(x, size, stride, pad, max_pool=True)
    be = _backend(x)
    (x,) = _contiguous(be, x)
    return _launch(be, "max_pool2d", x, g)


def max_pool2d_backward(dy, x, size=2, stride=None, pad=0):
    """Gradient of :func:`max_pool2d`, sent to the first maximum of each window (as PyTorch)."""
    g = chk.validate_max_pool_backward(dy, x, size, stride, pad)
    be = _backend(x)
    dy, x = _contiguous(be, dy, x)
    return _launch(be, "max_pool2d_backward", dy, x, g)


def avg_pool2d(x, size=2, stride=None, pad=0):
    """Average pooling; zero padding counts in the divisor (PyTorch's default)."""
    g = chk.validate_pool(x, size, stride, pad, max_pool=False)
    be = _backend(x)
    (x,) = _contiguous(be, x)
    return _launch(be, "avg_pool2d", x, g)


def avg_pool2d_backward(dy, x_shape, size=2, stride=None, pad=0):
    """Gradient of :func:`avg_pool2d` with respect to an input of shape ``x_shape``."""
    g = chk.validate_avg_pool_backward(dy, x_shape, size, stride, pad)
    be = _backend(dy)
    (dy,) = _contiguous(be, dy)
    return _launch(be, "avg_pool2d_backward", dy, g)


# --- augmentation ------------------------------------------------------------------------------


def _launch_serial(be, kernel, *args):
    """Run a backend kernel without the launch guard. Only for kernels with no parallel region
    (the CPU augmentation kernels): they are safe from any thread, and the batch loader's
    thread must not wait for the training step's kernels to finish."""
    return getattr(be, kernel)(*args)


def warp_bilinear(x, theta, flow=None, out_size=None):
    """Resample each image through its own affine map (and displacement field), bilinearly.

    Parameters
    ----------
    x : ndarray, (N, C, H, W), float32 or float16
    theta : ndarray, (N, 2, 3), float32
        Per sample, the map from output pixel ``(j, i)`` (column, row) to the source point
        ``(sx, sy) = theta[n] @ (j, i, 1)``, in pixel units (pixel centres at integers).
    flow : ndarray, (N, 2, OH, OW), float32, optional
        Displacements ``(dx, dy)`` added to the source point of each output pixel.
    out_size : int or (int, int), optional
        ``(OH, OW)``; default ``(H, W)``.

    Returns
    -------
    ndarray, (N, C, OH, OW), same dtype as ``x``
        Source points outside the image read as 0. Integer source points copy the pixel
        exactly (a neighbour with bilinear weight 0 is never read).
    """
    out_hw = chk.validate_warp(x, theta, flow, out_size)
    be = _backend(x)
    x, theta, flow = _contiguous(be, x, theta, flow)
    return _launch_serial(be, "warp_bilinear", x, theta, flow, out_hw)


def gaussian_taps(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """Normalised float32 Gaussian taps of ``sigma`` (radius ``ceil(truncate * sigma)``)."""
    radius = max(1, int(np.ceil(truncate * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (t / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def gaussian_blur(fields, sigma):
    """Separable Gaussian blur of float32 planes ``fields`` (P, H, W), zero outside each plane
    (``scipy.ndimage.gaussian_filter(mode="constant", truncate=3)`` per plane)."""
    sigma = chk.validate_blur(fields, sigma)
    be = _backend(fields)
    (fields,) = _contiguous(be, fields)
    taps = gaussian_taps(sigma)
    if chk.is_cupy_array(fields):
        import cupy

        taps = cupy.asarray(taps)
    return _launch_serial(be, "gaussian_blur", fields, taps)


# --- devices -----------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device is usable. Never raises."""
    try:
        from . import gpu

        return gpu.available()
    except Exception:
        return False


def to_gpu(x):
    """Copy a NumPy array to the current CUDA device (a CuPy array is returned as is).

    Raises
    ------
    RuntimeError
        Saying why no GPU can be used (CuPy missing, no device, driver too old).
    """
    from . import gpu

    return gpu.to_gpu(x)


def to_cpu(x):
    """Return ``x`` as a NumPy array (copying from the GPU if needed)."""
    if chk.is_cupy_array(x):
        return x.get()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"x must be a numpy.ndarray or cupy.ndarray, got {type(x).__name__}")

# INTERIM (removed when the kernels branch lands): array-code stand-ins for the new ops.
from ._interim_ops import *  # noqa: E402,F401,F403
