"""fastconv: hand-written CNN kernels (Numba on the CPU, CuPy on the GPU) in float32 and float16."""

# Imported eagerly so that the CPU backend picks Numba's threading layer before any user code
# can start Numba's thread pool (after that the choice is fixed for the process).
from . import cpu as _cpu  # noqa: F401
from .ops import (
    avg_pool2d,
    avg_pool2d_backward,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    batch_norm_inference_backward,
    clear_conv_algorithm_choices,
    col2im,
    conv2d,
    conv2d_backward,
    conv_algorithm_choices,
    dense,
    dense_backward,
    fold_batch_norm,
    get_conv_algorithm,
    global_avg_pool2d,
    global_avg_pool2d_backward,
    gpu_available,
    im2col,
    max_pool2d,
    max_pool2d_backward,
    relu,
    relu_backward,
    set_conv_algorithm,
    to_cpu,
    to_gpu,
)

__version__ = "0.1.0"

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
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_inference_backward",
    "fold_batch_norm",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "dense",
    "dense_backward",
    "relu",
    "relu_backward",
    "gpu_available",
    "to_gpu",
    "to_cpu",
]
