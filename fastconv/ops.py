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
    "set_conv_algorithm",
    "get_conv_algorithm",
    "conv_algorithm_choices",
    "clear_conv_algorithm_choices",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
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


def _conv_algorithm(algorithm, g, be):
    """Keyword arguments for the backend: ``{}`` (the process-wide choice, and always on the
    GPU, which has one implementation) or ``{"algorithm": canonical name or "auto"}``."""
    if algorithm is None:
        return {}
    name = chk.check_conv_algorithm(algorithm)
    if be.__name__.endswith(".gpu"):
        if name == "auto":
            return {}
        raise ValueError(
            f"algorithm={algorithm!r} selects a CPU convolution algorithm; the GPU backend has "
            "one implementation (use algorithm=None or 'auto' with CuPy arrays)"
        )
    if name != "auto":
        chk.check_conv_algorithm_applies(name, g)
    return {"algorithm": name}


def conv2d(x, w, b=None, stride=1, pad=0, activation=None, algorithm=None):
    """2-D cross-correlation (the deep-learning "convolution").

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
    w : ndarray, (F, C, kh, kw)
    b : ndarray, (F,), optional
    stride, pad : int or (int, int)
    activation : None or "relu"
        Fused epilogue applied after the bias.
    algorithm : None or str
        CPU algorithm for this call: ``"direct"`` (stride 1), ``"unfolded"`` (any layer),
        ``"winograd4x4"`` (alias ``"winograd"``) or ``"winograd2x2"`` (3x3, stride 1,
        pad <= 2), or ``"auto"`` (the fixed rule of :func:`set_conv_algorithm`). None
        (default) uses :func:`set_conv_algorithm`'s setting. An algorithm that cannot run
        the layer raises ValueError. The GPU backend has one implementation: there only None
        and ``"auto"`` are accepted.

    Returns
    -------
    ndarray, (N, F, OH, OW), same dtype as ``x``
    """
    g = chk.validate_conv2d(x, w, b, stride, pad, activation)
    be = _backend(x)
    choice = _conv_algorithm(algorithm, g, be)
    x, w, b = _contiguous(be, x, w, b)
    return _launch(be, "conv2d", x, w, b, g, activation, **choice)


def conv2d_backward(dy, x, w, stride=1, pad=0, need_dx=True, algorithm=None):
    """Gradients of :func:`conv2d` (without activation).

    Parameters
    ----------
    need_dx : bool
        False skips computing ``dx`` (e.g. for a network's first layer, whose input needs no
        gradient) and returns None in its place.
    algorithm : None or str
        As for :func:`conv2d`.

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
    choice = _conv_algorithm(algorithm, g, be)
    dy, x, w = _contiguous(be, dy, x, w)
    return _launch(be, "conv2d_backward", dy, x, w, g, need_dx=bool(need_dx), **choice)


def set_conv_algorithm(algorithm="auto"):
    """Choose the CPU convolution algorithm process-wide; returns the previous setting.

    ``"auto"`` (default): a fixed rule per layer shape (Winograd F(4x4,3x3) for 3x3 stride-1
    layers with at least 8 input and output channels, else direct for stride 1, else
    unfolded), so results never depend on timing. ``"benchmark"``: on the first call of each
    shape and pass, time every applicable algorithm and keep the fastest (cached; the choice
    may differ between runs, and with it the rounding of the results). An algorithm name
    (see :func:`conv2d`): used for every layer it can run; other layers keep the ``"auto"``
    rule. A call's own ``algorithm=`` argument overrides this setting. Every choice is
    recorded: :func:`conv_algorithm_choices`.
    """
    from .cpu import _select

    name = chk.check_conv_algorithm(algorithm, modes=chk.CONV_ALGORITHM_MODES)
    return _select.set_global(name)


def get_conv_algorithm():
    """The process-wide CPU convolution algorithm setting (see :func:`set_conv_algorithm`)."""
    from .cpu import _select

    return _select.get_global()


def conv_algorithm_choices():
    """Which algorithm each CPU convolution ran, per shape and pass.

    Returns
    -------
    list of ConvAlgorithmChoice
        Named tuples ``(pass_, dtype, x_shape, w_shape, stride, pad, algorithm, source, calls,
        fallbacks)``, in order of first use; ``pass_`` is ``"forward"``, ``"backward"`` or
        ``"backward_weights"`` (``need_dx=False``), ``source`` how the algorithm was chosen
        (``"argument"``, ``"global"``, ``"measured"`` or ``"rule"``), ``fallbacks`` how many
        of the calls were redone on an exact GEMM path because the inputs or weights held
        NaN, inf or values of magnitude >= 2**50 (Winograd's transforms would spread or
        overflow them).
    """
    from .cpu import _select

    return _select.choices()


def clear_conv_algorithm_choices():
    """Forget the recorded choices and the ``"benchmark"`` measurements."""
    from .cpu import _select

    _select.clear()


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
