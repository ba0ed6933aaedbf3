"""The public im2col / col2im kernels (book layout: rows (n, oh, ow), columns (c, i, j)).

Convolution does not go through them: a whole-batch column matrix is tens of MB and writing
it alone costs more than PyTorch's whole layer (docs/kernels.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._gemm import FASTMATH
from ._half import bits_view, load, store_value

__all__ = ["im2col", "col2im"]


@njit(cache=True, parallel=True)
def _im2col_kernel(x, out, g):
    # Each output row is written whole and in order (contiguous stores); rows of one image
    # row go to one thread. A plain copy: half bits are copied as they are.
    N, C, H, W = x.shape
    kh, kw, sh, sw, ph, pw, OH, OW = g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW
    for row_block in prange(N * OH):
        n = row_block // OH
        oh = row_block - n * OH
        for ow in range(OW):
            dst = out[row_block * OW + ow]
            iw0 = ow * sw - pw
            for c in range(C):
                for i in range(kh):
                    ih = oh * sh - ph + i
                    seg = dst[(c * kh + i) * kw : (c * kh + i + 1) * kw]
                    if ih < 0 or ih >= H:
                        seg[:] = 0
                        continue
                    xrow = x[n, c, ih]
                    for j in range(kw):
                        iw = iw0 + j
                        seg[j] = xrow[iw] if 0 <= iw < W else 0


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _col2im_kernel(cols, out, g):
    # A gather: every output pixel sums its own contributions in a fixed order, so the result is
    # deterministic and threads never write the same element.
    N, C, H, W = out.shape
    kh, kw, sh, sw, ph, pw, OH, OW = g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW
    for plane in prange(N * C):
        n = plane // C
        c = plane - n * C
        for h in range(H):
            for w in range(W):
                acc = np.float32(0.0)
                for i in range(kh):
                    oh_num = h + ph - i
                    if oh_num < 0 or oh_num % sh != 0:
                        continue
                    oh = oh_num // sh
                    if oh >= OH:
                        continue
                    for j in range(kw):
                        ow_num = w + pw - j
                        if ow_num < 0 or ow_num % sw != 0:
                            continue
                        ow = ow_num // sw
                        if ow >= OW:
                            continue
                        acc += load(cols[(n * OH + oh) * OW + ow, (c * kh + i) * kw + j])
                out[n, c, h, w] = store_value(out, acc)


def im2col(x, g):
    """Backend im2col: ``(N*OH*OW, C*kh*kw)`` in ``x``'s dtype (see :func:`fastconv.im2col`)."""
    out = np.empty((g.N * g.OH * g.OW, g.C * g.kh * g.kw), dtype=x.dtype)
    _im2col_kernel(bits_view(x), bits_view(out), g)
    return out


def col2im(cols, g):
    """Backend col2im, the exact adjoint of :func:`im2col`, in ``cols``' dtype."""
    out = np.empty(g.x_shape, dtype=cols.dtype)
    _col2im_kernel(bits_view(cols), bits_view(out), g)
    return out


class UnfoldKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    im2col = staticmethod(im2col)
    col2im = staticmethod(col2im)
