"""The kernel interface, written once: what every backend implements.

:class:`Kernels` lists every op a backend provides, with the signature :mod:`fastconv.ops`
calls it with: arrays already validated (:mod:`fastconv._checks`), C-contiguous, of one dtype
(float32 or float16, float32 for statistics and augmentation parameters), plus the
:class:`~fastconv._checks.Geometry` (or channel/dense geometry) that validation returned.
Results are new arrays in the input's dtype unless an ``out`` is given.

Three implementations exist, each one object:

- :data:`fastconv.cpu.KERNELS`, the Numba kernels;
- :class:`fastconv.gpu._kernel_ops.KernelOps`, the CUDA kernels (CuPy on a device, or the g++
  emulation of the same sources in the tests);
- :data:`fastconv.reference.KERNELS`, the float64 NumPy oracle, rounded to the input's dtype.

Every op is an abstract method, so a backend that lacks one cannot be instantiated, and the
conformance test (tests/kernels/test_kernel_interface.py) walks :data:`OPS` over every backend.
Optimizer updates have a default here (array expressions over ``xp``) that a backend may
replace with a fused kernel.

Adding an op: its abstract method here, its implementation in each backend, its public
function in :mod:`fastconv.ops` (validate -> device -> ``device.kernels.<op>``), and its case
in the conformance test (docs/architecture.md, "Adding an op").
"""

from __future__ import annotations

import abc

import numpy as np

from ._checks import _may_overlap

__all__ = ["Kernels", "OPS", "fusable_update"]


def fusable_update(p, *others) -> bool:
    """May a fused optimizer kernel update ``p`` from ``others``? Float32 C-contiguous arrays of
    one shape and one library, ``p`` writable and sharing memory with none of the others (the
    kernels read each element once, so an alias would read an already updated value)."""
    arrays = (p, *others)
    return (
        all(type(a) is type(p) for a in arrays)
        and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
        and all(a.shape == p.shape for a in others)
        and getattr(p.flags, "writeable", True)  # CuPy arrays have no read-only flag
        and not any(_may_overlap(p, a) for a in others)
    )


class Kernels(abc.ABC):
    """The ops every backend implements (see the module docstring for the calling rules)."""

    #: CPU convolution algorithms this backend can be asked for by name (``algorithm=``);
    #: empty where there is one implementation.
    conv_algorithms: tuple[str, ...] = ()

    #: the array module (``numpy`` or ``cupy``) of this backend's arrays
    xp = np

    # --- unfolding and convolution --------------------------------------------------------

    @abc.abstractmethod
    def im2col(self, x, g):
        """``(N*OH*OW, C*kh*kw)``: rows (n, oh, ow), columns (c, i, j), as in the book."""

    @abc.abstractmethod
    def col2im(self, cols, g):
        """The adjoint of :meth:`im2col`: ``(N, C, H, W)``."""

    @abc.abstractmethod
    def conv2d(self, x, w, b, g, activation, algorithm=None):
        """``(N, F, OH, OW)``, bias (``b`` or None) and ``activation`` (None or "relu")
        fused; ``algorithm`` names one of :attr:`conv_algorithms` (or "auto"/None)."""

    @abc.abstractmethod
    def conv2d_backward(self, dy, x, w, g, need_dx=True, algorithm=None):
        """``(dx or None, dw, db)`` of :meth:`conv2d` without activation."""

    # --- pooling ----------------------------------------------------------------------------

    @abc.abstractmethod
    def max_pool2d(self, x, g):
        """Max over each window; padding never wins; NaN propagates."""

    @abc.abstractmethod
    def max_pool2d_backward(self, dy, x, g):
        """Each window's gradient to its first maximum."""

    @abc.abstractmethod
    def avg_pool2d(self, x, g):
        """Mean over each window, zero padding counted in the divisor."""

    @abc.abstractmethod
    def avg_pool2d_backward(self, dy, g):
        """The adjoint of :meth:`avg_pool2d`: ``(N, C, H, W)``."""

    # --- normalisation, global pooling, dense, activations ------------------------------------

    @abc.abstractmethod
    def batch_norm_forward(self, x, gamma, beta, g, eps, relu):
        """``(y, mean, var)`` with batch statistics (float32, biased variance)."""

    @abc.abstractmethod
    def batch_norm_inference(self, x, gamma, beta, mean, var, g, eps, relu):
        """``y`` with the given statistics."""

    @abc.abstractmethod
    def batch_norm_backward(self, dy, x, gamma, mean, var, g, eps, y=None):
        """``(dx, dgamma, dbeta)``; ``y`` given: the fused ReLU's mask."""

    @abc.abstractmethod
    def batch_norm_inference_backward(self, dy, gamma, var, g, eps, y=None):
        """``dx`` of :meth:`batch_norm_inference` (frozen statistics)."""

    @abc.abstractmethod
    def global_avg_pool2d(self, x, g):
        """``(N, C)``: the mean over each plane."""

    @abc.abstractmethod
    def global_avg_pool2d_backward(self, dy, g):
        """``(N, C, H, W)``: each plane's gradient spread evenly."""

    @abc.abstractmethod
    def dense(self, x, w, b, g, relu):
        """``x @ w + b`` (``w`` is ``(in, out)``), ReLU fused."""

    @abc.abstractmethod
    def dense_backward(self, dy, x, w, g, need_dx=True):
        """``(dx or None, dw, db)`` of :meth:`dense` without activation."""

    @abc.abstractmethod
    def relu(self, x):
        """``max(x, 0)``; NaN and -0.0 kept as they are."""

    @abc.abstractmethod
    def relu_backward(self, dy, y, out=None):
        """``dy * (y > 0)``, into ``out`` when given."""

    @abc.abstractmethod
    def leaky_relu(self, x, alpha):
        """``x`` where ``x > 0`` (its bits copied), else ``alpha * x`` (``alpha``: float32)."""

    @abc.abstractmethod
    def leaky_relu_backward(self, dy, x, alpha, out=None):
        """``dy`` where ``x > 0``, else ``alpha * dy``, into ``out`` when given."""

    # --- augmentation (no parallel region: run outside the launch guard) ---------------------

    @abc.abstractmethod
    def warp_bilinear(self, x, theta, flow, out_hw):
        """Bilinear resampling through per-sample affine maps (and displacement fields)."""

    @abc.abstractmethod
    def gaussian_blur(self, fields, taps):
        """Separable blur of float32 planes with normalised ``taps``, zero outside."""

    # --- optimizer updates: array expressions, which a backend may fuse ----------------------
    # (the scalars are float32, prepared by fastconv.ops as the expressions round them)

    def adam_update(self, p, g, m, v, c1, c2, lr_t, eps):
        """In place: ``m += c1*(g - m);  v += c2*(g*g - v);  p -= lr_t*m / (sqrt(v) + eps)``
        (float32 scalars)."""
        m += c1 * (g - m)
        v += c2 * (g * g - v)
        p -= lr_t * m / (self.xp.sqrt(v) + eps)

    def momentum_update(self, p, g, v, momentum, lr):
        """In place: ``v = momentum*v - lr*g;  p += v`` (float32 scalars)."""
        v *= momentum
        v -= lr * g
        p += v

    def sgd_update(self, p, g, lr):
        """In place: ``p -= lr*g``."""
        p -= lr * g

    def nesterov_update(self, p, g, v, m, lr, mm, c):
        """In place: ``v = m*v - lr*g;  p += mm*v;  p -= c*g`` (``mm = m*m``,
        ``c = (1 + m)*lr``: the book's Nesterov form)."""
        v *= m
        v -= lr * g
        p += mm * v
        p -= c * g

    def adagrad_update(self, p, g, h, lr, eps):
        """In place: ``h += g*g;  p -= lr*g / (sqrt(h) + eps)``."""
        h += g * g
        p -= lr * g / (self.xp.sqrt(h) + eps)

    def rmsprop_update(self, p, g, h, d, c, lr, eps):
        """In place: ``h = d*h + c*g*g;  p -= lr*g / (sqrt(h) + eps)`` (``c = 1 - d``)."""
        h *= d
        h += c * g * g
        p -= lr * g / (self.xp.sqrt(h) + eps)


#: every op of the interface, in the order above
OPS: tuple[str, ...] = tuple(
    name for name, value in vars(Kernels).items() if getattr(value, "__isabstractmethod__", False)
)
