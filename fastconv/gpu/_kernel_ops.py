"""The GPU backend's composition logic, written once over an array module, a kernel launcher
and a GEMM.

:class:`KernelOps` is what :mod:`fastconv.gpu` runs with ``cupy`` + the CuPy ``RawModule``
launcher + cuBLAS (:func:`fastconv.gpu._module.gemm`). The emulation tests run the very same
methods with ``numpy`` + the g++-compiled kernels + a float32-accumulating NumPy GEMM, and the
stand-in CuPy (:mod:`fastconv_testing.cupy_standin`) runs them with a model of the cuBLAS calls, so
buffer shapes, layouts, argument order and the GEMM wiring are all proven without a GPU.

A launcher is ``launch(kernel_name, n_threads, *args)``: ``args`` follow
:data:`fastconv.gpu._source.SIGNATURES`, the element type is taken from the first array.
A GEMM is ``gemm(a, b, trans_a=False, trans_b=False)`` -> ``op(a) @ op(b)`` in the dtype of
``a`` with float32 accumulation; a 3-D ``b`` is a batch sharing ``a``.
"""

from __future__ import annotations

import numpy as np

from ..kernels import Kernels, fusable_update
from . import _random

ROWS = 0  # book layout: (N*OH*OW, C*kh*kw)
BATCH = 1  # Caffe layout: (N, C*kh*kw, OH*OW), one GEMM operand per image

# Below this reduction length (C*kh*kw) the direct kernel beats im2col + GEMM: the column buffer
# would be K times the input for a GEMM too thin to keep the tensor cores busy (conv1: K = 9).
DIRECT_MAX_K = 32

# Threads per channel in the first pass of the bias gradient: F * 256 threads keep a GPU busy
# where one thread per channel (F = 16) would sum 78,400 values serially for MNIST's conv1.
BIAS_GRAD_SLICES = 256

# Slices per channel in the first pass of the batch-norm reductions (same reasoning).
BN_SLICES = 256

# The most bytes a convolution's unfolded (im2col) buffer may take at once: larger batches are
# cut into chunks of images. VGG-16's first layers at batch 128 would otherwise unfold into
# 14.8 GB (K = 576 taps x 50,176 pixels x 4 bytes per image); with this bound a call's extra
# memory stays under ~3x it (the buffer, its GEMM's output and dy's transposed chunk).
WORKSPACE_BYTES = 512 << 20


def eps_bits(eps: float) -> int:
    """``eps`` (or any float32 scalar) as the int holding its float32 bits (the kernels take
    ints and arrays only)."""
    return int(np.asarray(eps, dtype=np.float32).view(np.int32))


INT32_MAX = 2**31 - 1


def elementwise(launcher):
    """Mark a :class:`KernelOps` method as an elementwise op: its array parameters (``x``,
    ``y``, ``dy``) share one shape, every other parameter but ``out`` is a float32 scalar.
    bench/gpu_check.py's kernel tour runs every such method (a new one needs no line there)."""
    launcher.elementwise = True
    return launcher


def elementwise_ops(kernel_ops) -> list[str]:
    """The names of ``kernel_ops``'s methods marked :func:`elementwise`."""
    cls = type(kernel_ops)
    return sorted(n for n in dir(cls) if getattr(getattr(cls, n), "elementwise", False))


def check_index_range(g) -> None:
    """Refuse geometries whose 32-bit index arithmetic inside the kernels could overflow.

    Flat offsets are 64-bit in every kernel; what stays ``int`` (cheap on a GPU, where 64-bit
    division is a long software sequence) is window arithmetic whose largest intermediate is
    bounded by these sums: ``oh*sh - ph + i`` and ``h + ph - i`` (< H + 2*ph), ``first_window``'s
    ``h + p - k + s`` (< H + 2*p + s), and the in-window position ``i*kw + j`` (< kh*kw).
    """
    for what, value in (
        ("height + 2*pad + stride", g.H + 2 * g.ph + g.sh),
        ("width + 2*pad + stride", g.W + 2 * g.pw + g.sw),
        ("window height * window width", g.kh * g.kw),
    ):
        if value > INT32_MAX:
            raise ValueError(
                f"{what} = {value} exceeds the GPU kernels' 32-bit index range (2^31 - 1); "
                f"geometry {tuple(g)}"
            )


class KernelOps(Kernels):
    """The :class:`~fastconv.kernels.Kernels` interface on top of raw kernels and a GEMM."""

    def __init__(
        self, xp, launch, gemm, direct_max_k: int = DIRECT_MAX_K, workspace_bytes=WORKSPACE_BYTES
    ):
        self.xp = xp
        self.launch = launch
        self.gemm = gemm
        self.direct_max_k = direct_max_k
        self.workspace_bytes = workspace_bytes

    def _chunks(self, g, itemsize):
        """``(n0, n1)`` image ranges whose unfolded buffers fit in ``workspace_bytes``."""
        per_image = g.C * g.kh * g.kw * g.OH * g.OW * itemsize
        step = max(1, min(g.N, self.workspace_bytes // max(per_image, 1)))
        return [(n0, min(n0 + step, g.N)) for n0 in range(0, g.N, step)]

    def ascontiguous(self, a):
        return self.xp.ascontiguousarray(a)

    # --- im2col / col2im ------------------------------------------------------------------------

    def im2col(self, x, g, layout: int = ROWS):
        check_index_range(g)
        K, P = g.C * g.kh * g.kw, g.OH * g.OW
        shape = (g.N * P, K) if layout == ROWS else (g.N, K, P)
        cols = self.xp.empty(shape, dtype=x.dtype)
        self.launch("im2col", cols.size, x, cols, *g, layout)
        return cols

    def col2im(self, cols, g, layout: int = ROWS):
        check_index_range(g)
        x = self.xp.empty(g.x_shape, dtype=cols.dtype)
        self.launch("col2im", x.size, cols, x, *g, layout)
        return x

    # --- convolution ----------------------------------------------------------------------------

    def conv2d(self, x, w, b, g, activation, algorithm=None):
        # One implementation (conv_algorithms is empty): ops refuses any named algorithm.
        F = w.shape[0]
        K, P = g.C * g.kh * g.kw, g.OH * g.OW
        has_bias, relu = int(b is not None), int(activation == "relu")
        check_index_range(g)
        if K <= self.direct_max_k:
            y = self.xp.empty((g.N, F, g.OH, g.OW), dtype=x.dtype)
            bias = b if b is not None else w  # any valid pointer; unread when has_bias == 0
            self.launch("conv2d_direct", y.size, x, w, bias, y, g.N, g.C, g.H, g.W, F, *g[4:],
                        has_bias, relu)  # fmt: skip
            return y
        chunks = self._chunks(g, x.dtype.itemsize)
        if len(chunks) == 1:
            cols = self.im2col(x, g, BATCH)  # (N, K, P)
            y = self.gemm(w.reshape(F, K), cols)  # strided-batched GEMM, W shared: NCHW
        else:
            y = self.xp.empty((g.N, F, P), dtype=x.dtype)
            for n0, n1 in chunks:
                cols = self.im2col(x[n0:n1], g._replace(N=n1 - n0), BATCH)
                y[n0:n1] = self.gemm(w.reshape(F, K), cols)
                del cols
        if has_bias or relu:
            bias = b if b is not None else y
            self.launch("bias_act", y.size, y, bias, g.N, F, P, has_bias, relu)
        return y.reshape(g.N, F, g.OH, g.OW)

    def conv2d_backward(self, dy, x, w, g, need_dx=True, algorithm=None):
        xp = self.xp
        F = w.shape[0]
        K, P = g.C * g.kh * g.kw, g.OH * g.OW
        db = self.bias_grad(dy, g.N, F, P)
        dw32 = dx = None
        chunks = self._chunks(g, x.dtype.itemsize)
        if need_dx and len(chunks) > 1:
            dx = xp.empty(g.x_shape, dtype=x.dtype)
        for n0, n1 in chunks:
            gc = g._replace(N=n1 - n0)
            # Book layout turns both gradients into 2-D GEMMs whose reduction runs over the
            # chunk's images and pixels (N*P for dW), instead of one small GEMM per image.
            dy_rows = xp.ascontiguousarray(dy[n0:n1].reshape(gc.N, F, P).transpose(0, 2, 1))
            dy_rows = dy_rows.reshape(-1, F)
            cols = self.im2col(x[n0:n1], gc, ROWS)  # (n*P, K)
            part = self.gemm(dy_rows, cols, trans_a=True)  # (F, K)
            del cols
            if len(chunks) == 1:
                dw = part.reshape(w.shape)
            else:  # chunks' partial sums added in float32, in chunk order (deterministic)
                part = part.astype(np.float32)
                dw32 = part if dw32 is None else dw32 + part
            if need_dx:
                dcols = self.gemm(dy_rows, w.reshape(F, K))  # (n*P, K)
                dx_part = self.col2im(dcols, gc, ROWS)
                if len(chunks) == 1:
                    dx = dx_part
                else:
                    dx[n0:n1] = dx_part
        if dw32 is not None:
            dw = dw32.astype(x.dtype).reshape(w.shape)
        return dx, dw, db

    # --- direct grouped convolution (any stride, dilation, padding: _checks.ConvProblem) ------

    def _grouped_args(self, p):
        check_index_range(p.geometry()._replace(ph=max(p.pads[:2]), pw=max(p.pads[2:])))
        return (p.N, p.C, p.H, p.W, p.F, p.groups, p.kh, p.kw, p.sh, p.sw, p.pads[0],
                p.pads[2], p.dh, p.dw, p.OH, p.OW)  # fmt: skip

    def grouped_conv2d(self, x, w, b, p, activation):
        y = self.xp.empty((p.N, p.F, p.OH, p.OW), dtype=x.dtype)
        bias = b if b is not None else w  # any valid pointer; unread when has_bias == 0
        self.launch("grouped_forward", y.size, x, w, bias, y, *self._grouped_args(p),
                    int(b is not None), int(activation == "relu"))  # fmt: skip
        return y

    def grouped_conv2d_backward(self, dy, x, w, p, need_dx=True):
        args = self._grouped_args(p)
        slices = min(BIAS_GRAD_SLICES, p.N * p.OH * p.OW)
        taps = w.size
        partial = self.xp.empty((taps * slices,), dtype=np.float32)
        self.launch("grouped_backward_weight", partial.size, dy, x, partial, *args, slices)
        dw = self.xp.empty(w.shape, dtype=w.dtype)
        self.launch("bias_grad_finish", taps, partial, dw, taps, slices)
        db = self.bias_grad(dy, p.N, p.F, p.OH * p.OW)
        dx = None
        if need_dx:
            dx = self.xp.empty(x.shape, dtype=x.dtype)
            self.launch("grouped_backward_data", dx.size, dy, w, dx, *args)
        return dx, dw, db

    def bias_grad(self, dy, N: int, F: int, P: int):
        """db = dy.sum over (n, p), with float accumulation and a fixed order (bit-reproducible)."""
        slices = min(BIAS_GRAD_SLICES, N * P)
        partial = self.xp.empty((F * slices,), dtype=np.float32)
        self.launch("bias_grad_partial", partial.size, dy, partial, N, F, P, slices)
        db = self.xp.empty((F,), dtype=dy.dtype)
        self.launch("bias_grad_finish", F, partial, db, F, slices)
        return db

    # --- pooling --------------------------------------------------------------------------------

    def max_pool2d(self, x, g):
        check_index_range(g)
        y = self.xp.empty((g.N, g.C, g.OH, g.OW), dtype=x.dtype)
        self.launch("max_pool2d", y.size, x, y, *g)
        return y

    def max_pool2d_backward(self, dy, x, g):
        check_index_range(g)
        dx = self.xp.empty(g.x_shape, dtype=x.dtype)
        self.launch("max_pool2d_backward", dx.size, dy, x, dx, *g)
        return dx

    def avg_pool2d(self, x, g):
        check_index_range(g)
        y = self.xp.empty((g.N, g.C, g.OH, g.OW), dtype=x.dtype)
        self.launch("avg_pool2d", y.size, x, y, *g)
        return y

    def avg_pool2d_backward(self, dy, g):
        check_index_range(g)
        dx = self.xp.empty(g.x_shape, dtype=dy.dtype)
        self.launch("avg_pool2d_backward", dx.size, dy, dx, *g)
        return dx

    # --- augmentation ---------------------------------------------------------------------------

    def warp_bilinear(self, x, theta, flow, out_hw):
        """Bilinear warp of ``x`` (N, C, H, W) through ``theta`` (N, 2, 3) float32 and an
        optional displacement ``flow`` (N, 2, OH, OW) float32 -> (N, C, OH, OW)."""
        N, C, H, W = x.shape
        OH, OW = out_hw
        theta = theta.reshape(N, 6)  # the kernel reads 6 floats a sample
        y = self.xp.empty((N, C, OH, OW), dtype=x.dtype)
        has_flow = int(flow is not None)
        f = flow if has_flow else theta  # any valid float pointer; unread when has_flow == 0
        self.launch("warp_bilinear", N * OH * OW, x, theta, f, y, N, C, H, W, OH, OW, has_flow)
        return y

    def gaussian_blur(self, fields, taps):
        """Separable blur of float32 planes ``fields`` (P, H, W): rows, then columns."""
        P, H, W = fields.shape
        radius = (taps.shape[0] - 1) // 2
        tmp = self.xp.empty(fields.shape, dtype=fields.dtype)
        out = self.xp.empty(fields.shape, dtype=fields.dtype)
        self.launch("blur_axis", fields.size, fields, tmp, taps, P, H, W, radius, 1)
        self.launch("blur_axis", fields.size, tmp, out, taps, P, H, W, radius, 0)
        return out

    # --- batch normalisation (g: ChannelGeometry, N >= 1, C >= 1) -------------------------------

    def batch_norm_forward(self, x, gamma, beta, g, eps, relu):
        xp = self.xp
        S = min(BN_SLICES, g.M)
        part = xp.empty((2 * g.C * S,), dtype=np.float32)
        self.launch("bn_stats_partial", g.C * S, x, part, g.N, g.C, g.P, S)
        mean = xp.empty((g.C,), dtype=np.float32)
        var = xp.empty((g.C,), dtype=np.float32)
        coef = xp.empty((2 * g.C,), dtype=np.float32)
        self.launch("bn_stats_finish", g.C, part, gamma, beta, mean, var, coef,
                    g.N, g.C, g.P, S, eps_bits(eps))  # fmt: skip
        y = xp.empty(g.shape, dtype=x.dtype)
        self.launch("bn_apply", y.size, x, y, coef, g.N, g.C, g.P, int(relu))
        return y, mean, var

    def _inference_coef(self, gamma, beta, mean, var, C, eps):
        coef = self.xp.empty((2 * C,), dtype=np.float32)
        has_beta = int(beta is not None)
        self.launch("bn_inference_coef", C, gamma, beta if has_beta else gamma, mean, var, coef,
                    C, eps_bits(eps), has_beta)  # fmt: skip
        return coef

    def batch_norm_inference(self, x, gamma, beta, mean, var, g, eps, relu):
        coef = self._inference_coef(gamma, beta, mean, var, g.C, eps)
        y = self.xp.empty(g.shape, dtype=x.dtype)
        self.launch("bn_apply", y.size, x, y, coef, g.N, g.C, g.P, int(relu))
        return y

    def batch_norm_backward(self, dy, x, gamma, mean, var, g, eps, y=None):
        xp = self.xp
        S = min(BN_SLICES, g.M)
        has_y = int(y is not None)
        y_arg = y if has_y else dy  # any valid pointer; unread when has_y == 0
        part = xp.empty((2 * g.C * S,), dtype=np.float32)
        self.launch("bn_backward_partial", g.C * S, dy, x, y_arg, mean, part,
                    g.N, g.C, g.P, S, has_y)  # fmt: skip
        dgamma = xp.empty((g.C,), dtype=x.dtype)
        dbeta = xp.empty((g.C,), dtype=x.dtype)
        coef = xp.empty((4 * g.C,), dtype=np.float32)
        self.launch("bn_backward_finish", g.C, part, gamma, var, dgamma, dbeta, coef,
                    g.N, g.C, g.P, S, eps_bits(eps))  # fmt: skip
        dx = xp.empty(g.shape, dtype=x.dtype)
        self.launch("bn_backward_apply", dx.size, dy, x, y_arg, mean, coef, dx,
                    g.N, g.C, g.P, has_y)  # fmt: skip
        return dx, dgamma, dbeta

    def batch_norm_inference_backward(self, dy, gamma, var, g, eps, y=None):
        coef = self._inference_coef(gamma, None, var, var, g.C, eps)  # shift unused
        has_y = int(y is not None)
        dx = self.xp.empty(g.shape, dtype=dy.dtype)
        self.launch("bn_scale_grad", dx.size, dy, y if has_y else dy, coef, dx,
                    g.N, g.C, g.P, has_y)  # fmt: skip
        return dx

    # --- global average pooling -----------------------------------------------------------------

    def global_avg_pool2d(self, x, g):
        y = self.xp.empty((g.N, g.C), dtype=x.dtype)
        self.launch("global_avg_pool2d", y.size, x, y, g.N * g.C, g.P)
        return y

    def global_avg_pool2d_backward(self, dy, g):
        dx = self.xp.empty(g.shape, dtype=dy.dtype)
        self.launch("global_avg_pool2d_backward", dx.size, dy, dx, g.N * g.C, g.P)
        return dx

    # --- dense (cuBLAS GEMM + the conv epilogue kernels) and ReLU -------------------------------

    def dense(self, x, w, b, g, relu):
        y = self.gemm(x, w)  # (N, F)
        has_bias = int(b is not None)
        if has_bias or relu:
            # bias_act views y as (N, F, P) with P = 1: y[n, f] += b[f], then ReLU.
            self.launch("bias_act", y.size, y, b if has_bias else y, g.N, g.F, 1, has_bias,
                        int(relu))  # fmt: skip
        return y

    def dense_backward(self, dy, x, w, g, need_dx=True):
        dw = self.gemm(x, dy, trans_a=True)  # (K, F)
        db = self.bias_grad(dy, g.N, g.F, 1)
        dx = self.gemm(dy, w, trans_b=True) if need_dx else None  # (N, K)
        return dx, dw, db

    # --- dropout ---------------------------------------------------------------------------------

    def dropout(self, x, key, rate):
        """``x * mask`` with the Philox mask of ``key`` (two 31-bit words) and ``rate``
        (:mod:`fastconv.gpu._random`): one launch, nothing stored; the same key gives the same
        mask for any array of the same size."""
        keep_bits, scale_bits = _random.kernel_scalars(rate, x.dtype)
        y = self.xp.empty(x.shape, dtype=x.dtype)
        self.launch("dropout", -(-x.size // 4), x, y, x.size, int(key[0]), int(key[1]),
                    keep_bits, scale_bits)  # fmt: skip
        return y

    # --- optimizer updates (float32 p, g and state of one shape, C-contiguous) ------------------

    def adam_update(self, p, g, m, v, c1, c2, lr_t, eps):
        """In place: ``m += c1*(g - m);  v += c2*(g*g - v);  p -= lr_t*m / (sqrt(v) + eps)``;
        the fused kernel where :func:`~fastconv.kernels.fusable_update` allows."""
        if not fusable_update(p, g, m, v):
            return super().adam_update(p, g, m, v, c1, c2, lr_t, eps)
        self.fused_adam(p, g, m, v, c1, c2, lr_t, eps)

    def fused_adam(self, p, g, m, v, c1, c2, lr_t, eps):
        """The ``adam_update`` kernel itself: ``p``, ``g`` in T (float32, or half: updated in
        float32, rounded once), ``m``, ``v`` float32, C-contiguous, one shape, no aliasing."""
        self.launch("adam_update", p.size, p, g, m, v, p.size, eps_bits(c1), eps_bits(c2),
                    eps_bits(lr_t), eps_bits(eps))  # fmt: skip

    def momentum_update(self, p, g, v, momentum, lr):
        """In place: ``v = momentum*v - lr*g;  p += v`` (fused as :meth:`adam_update`)."""
        if not fusable_update(p, g, v):
            return super().momentum_update(p, g, v, momentum, lr)
        self.fused_momentum(p, g, v, momentum, lr)

    def fused_momentum(self, p, g, v, momentum, lr):
        """The ``momentum_update`` kernel itself (arguments as :meth:`fused_adam`'s)."""
        self.launch("momentum_update", p.size, p, g, v, p.size, eps_bits(momentum), eps_bits(lr))

    @elementwise
    def relu(self, x):
        y = self.xp.empty(x.shape, dtype=x.dtype)
        self.launch("relu_forward", x.size, x, y, x.size)
        return y

    @elementwise
    def relu_backward(self, dy, y, out=None):
        if out is None:
            out = self.xp.empty(dy.shape, dtype=dy.dtype)
        self.launch("relu_backward", dy.size, dy, y, out, dy.size)
        return out

    @elementwise
    def leaky_relu(self, x, alpha):
        y = self.xp.empty(x.shape, dtype=x.dtype)
        self.launch("leaky_relu_forward", x.size, x, y, x.size, eps_bits(alpha))
        return y

    @elementwise
    def leaky_relu_backward(self, dy, x, alpha, out=None):
        if out is None:
            out = self.xp.empty(dy.shape, dtype=dy.dtype)
        self.launch("leaky_relu_backward", dy.size, dy, x, out, dy.size, eps_bits(alpha))
        return out

    @elementwise
    def clip(self, x, lo, hi):
        y = self.xp.empty(x.shape, dtype=x.dtype)
        self.launch("clip_forward", x.size, x, y, x.size, eps_bits(lo), eps_bits(hi))
        return y

    @elementwise
    def clip_backward(self, dy, x, lo, hi, out=None):
        if out is None:
            out = self.xp.empty(dy.shape, dtype=dy.dtype)
        self.launch("clip_backward", dy.size, dy, x, out, dy.size, eps_bits(lo), eps_bits(hi))
        return out


def numpy_gemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """NumPy model of :func:`fastconv.gpu._module.gemm` (cuBLAS with CUBLAS_COMPUTE_32F): half
    operands are multiplied and summed in float32, the result rounded once to the dtype."""
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float16):
        raise TypeError(f"gemm: a and b must share dtype float32/float16, got {a.dtype}, {b.dtype}")
    if b.ndim == 3 and (trans_a or trans_b):
        raise ValueError("gemm: the batched form takes no transposes")
    a32 = a.astype(np.float32).T if trans_a else a.astype(np.float32)
    b32 = b.astype(np.float32).T if trans_b else b.astype(np.float32)
    return np.ascontiguousarray(np.matmul(a32, b32).astype(a.dtype))
