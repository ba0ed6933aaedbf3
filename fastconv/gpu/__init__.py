"""GPU backend: CUDA kernels compiled by CuPy (NVRTC) plus cuBLAS GEMMs through ``cupy.matmul``.

Called only from :mod:`fastconv.ops`, after validation, with C-contiguous CuPy arrays of one
dtype (float32 or float16). Importing this module never imports CuPy; :func:`available` tells
whether a GPU can be used and :func:`to_gpu` says why not when it cannot.
"""

from __future__ import annotations

import contextlib
import functools

from ._kernel_ops import KernelOps

__all__ = [
    "available",
    "unavailable_reason",
    "to_gpu",
    "ascontiguous",
    "launch_guard",
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
]

_INSTALL_HINT = (
    "install the CuPy wheel matching your CUDA driver: pip install 'fastconv[gpu]' (CUDA 13, "
    "cupy-cuda13x) or 'fastconv[gpu-cuda12]' (CUDA 12, cupy-cuda12x)"
)


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the GPU backend cannot run here, or None when it can. Never raises."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e}); {_INSTALL_HINT}"
    except Exception as e:  # a broken install (e.g. two CuPy wheels) raises other errors
        return f"CuPy failed to import: {type(e).__name__}: {e}"
    try:
        runtime = cupy.cuda.runtime
        try:
            driver = runtime.driverGetVersion()
        except Exception as e:
            return f"no usable NVIDIA driver ({type(e).__name__}: {e})"
        if driver == 0:
            return "no NVIDIA driver is installed"
        compiled_for = runtime.runtimeGetVersion()
        if driver < compiled_for:
            return (
                f"the NVIDIA driver is too old: it supports CUDA {_version(driver)} but this CuPy "
                f"wheel needs CUDA {_version(compiled_for)}; update the driver or {_INSTALL_HINT}"
            )
        count = runtime.getDeviceCount()
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "InsufficientDriver" in text:
            return f"the NVIDIA driver is too old for this CuPy wheel ({text}); {_INSTALL_HINT}"
        if "NoDevice" in text:
            return f"no CUDA device found ({text})"
        return f"CUDA initialisation failed ({text})"
    if count < 1:
        return "no CUDA device found"
    return None


def available() -> bool:
    """True when CuPy is installed and a CUDA device is usable. Never raises."""
    try:
        return unavailable_reason() is None
    except Exception:
        return False


def to_gpu(x):
    """Copy ``x`` to the current CUDA device; raise RuntimeError saying why when impossible."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot use the GPU: {reason}")
    import cupy

    return cupy.asarray(x)


@functools.lru_cache(maxsize=1)
def _ops() -> KernelOps:
    import cupy

    from . import _module

    return KernelOps(cupy, _module.launch, cupy.matmul)


def launch_guard():
    """CuPy launches from several host threads are safe: nothing to serialise."""
    return contextlib.nullcontext()


def ascontiguous(a):
    return _ops().ascontiguous(a)


def im2col(x, g):
    return _ops().im2col(x, g)


def col2im(cols, g):
    return _ops().col2im(cols, g)


def conv2d(x, w, b, g, activation):
    return _ops().conv2d(x, w, b, g, activation)


def conv2d_backward(dy, x, w, g, need_dx=True):
    return _ops().conv2d_backward(dy, x, w, g, need_dx)


def max_pool2d(x, g):
    return _ops().max_pool2d(x, g)


def max_pool2d_backward(dy, x, g):
    return _ops().max_pool2d_backward(dy, x, g)


def avg_pool2d(x, g):
    return _ops().avg_pool2d(x, g)


def avg_pool2d_backward(dy, g):
    return _ops().avg_pool2d_backward(dy, g)


def warp_bilinear(x, theta, flow, out_hw):
    return _ops().warp_bilinear(x, theta.reshape(x.shape[0], 6), flow, out_hw)


def gaussian_blur(fields, taps):
    return _ops().gaussian_blur(fields, taps)
