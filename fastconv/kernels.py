"""The kernel interface: what every backend implements.

The op table is :mod:`fastconv.ops`: each public op there is decorated with
:func:`kernel_op`, which lists its name in :data:`OPS`. A backend is one object, a subclass of
:class:`Kernels`, with a method of that name for every op; :mod:`fastconv.ops` calls it after
validation (:mod:`fastconv._checks`) with C-contiguous arrays of one dtype (float32 or
float16; float32 for statistics and augmentation parameters) and the
:class:`~fastconv._checks.Geometry` (or channel/dense geometry) that validation returned, as
the launch line of each public op shows. Results are new arrays in the input's dtype unless
an ``out`` is given.

Three implementations exist, each one object:

- :data:`fastconv.cpu.KERNELS`, the Numba kernels (each kernel module declares its methods);
- :class:`fastconv.gpu._kernel_ops.KernelOps`, the CUDA kernels (CuPy on a device, or the g++
  emulation of the same sources in the tests);
- :data:`fastconv.reference.KERNELS`, the float64 NumPy oracle, rounded to the input's dtype.

:func:`missing_ops` names the ops a backend lacks; the conformance test
(tests/kernels/test_kernel_interface.py) asserts it is empty for every backend and walks every
op of :data:`OPS` over each of them. Optimizer updates have a default here (array expressions
over ``xp``) that a backend may replace with a fused kernel.

Adding an op: docs/architecture.md, "Adding an op".
"""

from __future__ import annotations

import numpy as np

from ._checks import _may_overlap

__all__ = ["Kernels", "OPS", "kernel_op", "missing_ops", "fusable_update"]

#: every op of the interface, in the order :mod:`fastconv.ops` defines them (filled by
#: :func:`kernel_op` as that module is imported, which ``import fastconv`` does first)
OPS: list[str] = []


def kernel_op(public_function):
    """Mark a public function of :mod:`fastconv.ops` as an op of the interface: every backend
    has a method of the same name. Returns the function unchanged."""
    if public_function.__name__ not in OPS:  # (a reloaded fastconv.ops registers again)
        OPS.append(public_function.__name__)
    return public_function


def missing_ops(kernel_set) -> list[str]:
    """The ops of :data:`OPS` that ``kernel_set`` has no method for (empty for a backend)."""
    return [op for op in OPS if not callable(getattr(kernel_set, op, None))]


def clamp6(y, xp=np):
    """``y = min(y, 6)`` in place, NaN kept: the upper half of ReLU6 after a fused ReLU, with
    the clip kernel's bits (6 is exact in float16). ``xp`` the array module of ``y``."""
    xp.minimum(y, y.dtype.type(6.0), out=y)
    return y


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


class Kernels:
    """Base of every backend: a method per op of :data:`OPS` (see the module docstring for
    the calling rules), plus the defaults below."""

    #: CPU convolution algorithms this backend can be asked for by name (``algorithm=``);
    #: empty where there is one implementation.
    conv_algorithms: tuple[str, ...] = ()
    #: activations the conv2d and grouped_conv2d methods take (ops fuses ReLU and clamps
    #: after for a "relu6" that is not listed)
    conv_activations: tuple = (None, "relu")

    #: the array module (``numpy`` or ``cupy``) of this backend's arrays
    xp = np

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
