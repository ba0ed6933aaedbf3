"""GPU backend: CUDA kernels compiled by CuPy (NVRTC) plus cuBLAS GEMMs through CuPy's bindings.

Called only from :mod:`fastconv.ops`, after validation, with C-contiguous CuPy arrays of one
dtype (float32 or float16). Importing this module never imports CuPy; :func:`available` tells
whether a GPU can be used (CuPy, driver, device, and the kernel module compiled by NVRTC) and
:func:`to_gpu` says why not when it cannot.
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
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_inference_backward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "dense_forward",
    "dense_backward",
    "relu",
    "relu_backward",
    "dropout",
    "adam_update",
    "momentum_update",
    "zeros",
    "full",
    "warp_bilinear",
    "gaussian_blur",
]

_INSTALL_HINT = (
    "install the CuPy wheel matching your CUDA driver with the CUDA headers and NVRTC: "
    "pip install 'fastconv[gpu]' (CUDA 13: cupy-cuda13x[ctk]) or 'fastconv[gpu-cuda12]' "
    "(CUDA 12: cupy-cuda12x[ctk])"
)


def _toolkit_hint(runtime_version: int | None) -> str:
    major = (runtime_version or 13000) // 1000
    extra, wheel = ("gpu-cuda12", "cupy-cuda12x") if major == 12 else ("gpu", "cupy-cuda13x")
    return (
        f"pip install 'fastconv[{extra}]' (installs {wheel}[ctk]: cuda-toolkit[cudart,nvrtc]=="
        f"{major}.*, the runtime headers and NVRTC from PyPI), or point CUDA_PATH at a CUDA "
        f"{major} toolkit whose include/ has cuda_fp16.h"
    )


def _compile_problem(e: BaseException, runtime_version: int | None) -> str:
    """Why the kernel module did not compile, in words that say what to install."""
    text = f"{type(e).__name__}: {e}"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    low = text.lower()
    if "cuda_fp16.h" in low or "failed to find cuda headers" in low or "cuda_runtime.h" in low:
        return (
            "NVRTC cannot find the CUDA headers (cuda_fp16.h), so the kernel module does not "
            f"compile; {_toolkit_hint(runtime_version)} [{first}]"
        )
    if "nvrtc" in low and any(w in low for w in ("load", "not found", "no such file", "failure")):
        return f"NVRTC (libnvrtc) cannot be loaded; {_toolkit_hint(runtime_version)} [{first}]"
    return f"the CUDA kernel module failed to compile: {text.strip()[:2000]}"


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
        # CUDA minor-version compatibility: any driver of the runtime's major version works.
        if driver // 1000 < compiled_for // 1000:
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
    # Every kernel lives in one NVRTC module: compile it now (once; CuPy also caches it on
    # disk), so a missing header or NVRTC is reported here instead of at the first launch.
    try:
        from . import _module

        _module.get_module()
    except Exception as e:
        return _compile_problem(e, compiled_for)
    return None


def available() -> bool:
    """True when CuPy is installed, a CUDA device is usable and the kernels compile. Never
    raises."""
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

    return KernelOps(cupy, _module.launch, _module.gemm)


def reset() -> None:
    """Forget the cached availability, kernel module, functions and handles (tests use it to
    swap the CuPy implementation)."""
    from . import _module

    unavailable_reason.cache_clear()
    _ops.cache_clear()
    _module.reset()


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


def batch_norm_forward(x, gamma, beta, g, eps, relu):
    return _ops().batch_norm_forward(x, gamma, beta, g, eps, relu)


def batch_norm_inference(x, gamma, beta, mean, var, g, eps, relu):
    return _ops().batch_norm_inference(x, gamma, beta, mean, var, g, eps, relu)


def batch_norm_backward(dy, x, gamma, mean, var, g, eps, y):
    return _ops().batch_norm_backward(dy, x, gamma, mean, var, g, eps, y)


def batch_norm_inference_backward(dy, gamma, var, g, eps, y):
    return _ops().batch_norm_inference_backward(dy, gamma, var, g, eps, y)


def global_avg_pool2d(x, g):
    return _ops().global_avg_pool2d(x, g)


def global_avg_pool2d_backward(dy, g):
    return _ops().global_avg_pool2d_backward(dy, g)


def dense_forward(x, w, b, g, relu):
    return _ops().dense(x, w, b, g, relu)


def dense_backward(dy, x, w, g, need_dx=True):
    return _ops().dense_backward(dy, x, w, g, need_dx)


def relu(x):
    return _ops().relu(x)


def relu_backward(dy, y, out=None):
    return _ops().relu_backward(dy, y, out)


def dropout(x, key, rate):
    """``x * mask``, the mask drawn by Philox from ``key`` (see :mod:`fastconv.gpu._random`)."""
    return _ops().dropout(_ops().ascontiguous(x), key, rate)


def adam_update(p, g, m, v, c1, c2, lr_t, eps):
    _ops().adam_update(p, g, m, v, c1, c2, lr_t, eps)


def momentum_update(p, g, v, momentum, lr):
    _ops().momentum_update(p, g, v, momentum, lr)


def zeros(shape, dtype):
    """A zero-filled result (empty-batch shortcuts in :mod:`fastconv.ops`)."""
    return _ops().xp.zeros(shape, dtype=dtype)


def full(shape, value, dtype):
    return _ops().xp.full(shape, value, dtype=dtype)


def warp_bilinear(x, theta, flow, out_hw):
    return _ops().warp_bilinear(x, theta.reshape(x.shape[0], 6), flow, out_hw)


def gaussian_blur(fields, taps):
    return _ops().gaussian_blur(fields, taps)
