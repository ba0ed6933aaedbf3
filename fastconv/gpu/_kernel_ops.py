"""The GPU backend's composition logic, written once over an array module and a kernel launcher.

:class:`KernelOps` is what :mod:`fastconv.gpu` runs with ``cupy`` + the CuPy ``RawModule``
launcher + ``cupy.matmul`` (cuBLAS). The emulation tests run the very same methods with
``numpy`` + the g++-compiled kernels + a float32-accumulating NumPy matmul, so buffer shapes,
layouts, argument order and the GEMM wiring are all proven without a GPU.

A launcher is ``launch(kernel_name, n_threads, *args)``: ``args`` follow
:data:`fastconv.gpu._source.SIGNATURES`, the element type is taken from the first array.
"""

from __future__ import annotations

import numpy as np

ROWS = 0  # book layout: (N*OH*OW, C*kh*kw)
BATCH = 1  # Caffe layout: (N, C*kh*kw, OH*OW), one GEMM operand per image

# Below this reduction length (C*kh*kw) the direct kernel beats im2col + GEMM: the column buffer
# would be K times the input for a GEMM too thin to keep the tensor cores busy (conv1: K = 9).
DIRECT_MAX_K = 32

# Threads per channel in the first pass of the bias gradient: F * 256 threads keep a GPU busy
# where one thread per channel (F = 16) would sum 78,400 values serially for MNIST's conv1.
BIAS_GRAD_SLICES = 256


class KernelOps:
    """Backend interface of :mod:`fastconv.ops` on top of raw kernels and a matmul."""

    def __init__(self, xp, launch, matmul, direct_max_k: int = DIRECT_MAX_K):
        self.xp = xp
        self.launch = launch
        self.matmul = matmul
        self.direct_max_k = direct_max_k

    def ascontiguous(self, a):
        return self.xp.ascontiguousarray(a)

    # --- im2col / col2im ------------------------------------------------------------------------

    def im2col(self, x, g, layout: int = ROWS):
        K, P = g.C * g.kh * g.kw, g.OH * g.OW
        shape = (g.N * P, K) if layout == ROWS else (g.N, K, P)
        cols = self.xp.empty(shape, dtype=x.dtype)
        self.launch("im2col", cols.size, x, cols, *g, layout)
        return cols

    def col2im(self, cols, g, layout: int = ROWS):
        x = self.xp.empty(g.x_shape, dtype=cols.dtype)
        self.launch("col2im", x.size, cols, x, *g, layout)
        return x

    # --- convolution ----------------------------------------------------------------------------

    def conv2d(self, x, w, b, g, activation):
        F = w.shape[0]
        K, P = g.C * g.kh * g.kw, g.OH * g.OW
        has_bias, relu = int(b is not None), int(activation == "relu")
        if K <= self.direct_max_k:
            y = self.xp.empty((g.N, F, g.OH, g.OW), dtype=x.dtype)
            bias = b if b is not None else w  # any valid pointer; unread when has_bias == 0
            self.launch("conv2d_direct", y.size, x, w, bias, y, g.N, g.C, g.H, g.W, F, *g[4:],
                        has_bias, relu)  # fmt: skip
            return y
        cols = self.im2col(x, g, BATCH)  # (N, K, P)
        y = self.matmul(w.reshape(F, K), cols)  # broadcast batched GEMM -> (N, F, P) = NCHW
        y = self.xp.ascontiguousarray(y)  # kernels index flat buffers; a no-op for cuBLAS output
        if has_bias or relu:
            bias = b if b is not None else y
            self.launch("bias_act", y.size, y, bias, g.N, F, P, has_bias, relu)
        return y.reshape(g.N, F, g.OH, g.OW)

    def conv2d_backward(self, dy, x, w, g, need_dx=True):
        xp = self.xp
        F = w.shape[0]
        K, P = g.C * g.kh * g.kw, g.OH * g.OW
        # Book layout turns both gradients into single 2-D GEMMs whose reduction runs over the
        # whole batch (N*P for dW), instead of N small GEMMs followed by a sum.
        dy_rows = xp.ascontiguousarray(dy.reshape(g.N, F, P).transpose(0, 2, 1)).reshape(-1, F)
        cols = self.im2col(x, g, ROWS)  # (N*P, K)
        dw = self.matmul(dy_rows.T, cols).reshape(w.shape)  # (F, K)
        if not need_dx:
            return None, dw, self.bias_grad(dy, g.N, F, P)
        dcols = xp.ascontiguousarray(self.matmul(dy_rows, w.reshape(F, K)))  # (N*P, K)
        dx = self.col2im(dcols, g, ROWS)
        return dx, dw, self.bias_grad(dy, g.N, F, P)

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
        y = self.xp.empty((g.N, g.C, g.OH, g.OW), dtype=x.dtype)
        self.launch("max_pool2d", y.size, x, y, *g)
        return y

    def max_pool2d_backward(self, dy, x, g):
        dx = self.xp.empty(g.x_shape, dtype=x.dtype)
        self.launch("max_pool2d_backward", dx.size, dy, x, dx, *g)
        return dx

    def avg_pool2d(self, x, g):
        y = self.xp.empty((g.N, g.C, g.OH, g.OW), dtype=x.dtype)
        self.launch("avg_pool2d", y.size, x, y, *g)
        return y

    def avg_pool2d_backward(self, dy, g):
        dx = self.xp.empty(g.x_shape, dtype=dy.dtype)
        self.launch("avg_pool2d_backward", dx.size, dy, dx, *g)
        return dx

    # --- augmentation ---------------------------------------------------------------------------

    def warp_bilinear(self, x, theta, flow, out_hw):
        """Bilinear warp of ``x`` (N, C, H, W) through ``theta`` (N, 2, 3) float32 and an
        optional displacement ``flow`` (N, 2, OH, OW) float32 -> (N, C, OH, OW)."""
        N, C, H, W = x.shape
        OH, OW = out_hw
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


def numpy_matmul_fp32_accumulate(a, b):
    """NumPy stand-in for cuBLAS under CuPy's default compute type (CUBLAS_COMPUTE_32F):
    half operands are multiplied and summed in float32, the result rounded once to half."""
    if a.dtype == np.float16:
        return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)
    return np.matmul(a, b)
