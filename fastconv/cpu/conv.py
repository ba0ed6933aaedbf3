"""CPU convolution: planning, workspaces and the backend entry points.

The kernels live in modules with one concern each (see ``docs/kernels.md`` for the
measurements behind them):

* :mod:`.im2col` -- the public im2col / col2im (book layout);
* :mod:`._gemm` -- GEMM micro-kernels over rows that are slices of one flat buffer;
* :mod:`._layout` -- aligned buffers, images stacked per channel, packed weights, epilogue;
* :mod:`._direct` -- the direct path (stride 1, shifted views of stacked images) and the
  parallel kernels of both GEMM paths;
* :mod:`._unfolded` -- the unfolded (im2col-GEMM) path: any stride, any values.

This module decides per call which path runs and how many images go into one GEMM
(:func:`_plan`), builds the operands and the per-thread workspaces (taken with
:func:`~fastconv.cpu._workspace.checkout`) and launches the kernel. Bias and ReLU are fused
into the epilogue that writes NCHW output; float16 arrays are read and written as uint16 bits
through :mod:`fastconv.cpu._half`, everything is computed and accumulated in float32.
"""

from __future__ import annotations

import numpy as np

from ._direct import (
    BackwardWork,
    ForwardWork,
    GemmPlan,
    backward_kernel,
    forward_kernel,
    reduce_partials,
)
from ._half import bits_view
from ._layout import aligned_empty, packed_weights, round_up, stack_layout, tap_offsets, threads
from ._workspace import checkout
from .im2col import col2im, im2col

__all__ = ["im2col", "col2im", "conv2d", "conv2d_backward"]

# Images per GEMM: stack until a row of the product holds about this many values (long
# vectorised rows, few passes over the weights). 1024 measured best among 256..2048 on the
# deep-MNIST layers (5-10% over 512); the stacked images of one block stay within L2.
_TARGET_COLUMNS = 1024


def _plan(g, F, backward):
    """(direct, nb): which path a shape takes, and how many images go into one GEMM.

    Measured on the deep-MNIST layers (docs/kernels.md): with images stacked, the direct path
    (stride 1) beat the unfolded one on every layer, although it computes up to 1.3x too many
    outputs (8x8 images): unfolding writes K = C*kh*kw copies of every pixel in short row
    segments. The direct dx is a GEMM with C rows, too few to block when C < 4 (conv1: C = 1),
    where dcol = W^T @ dy with K rows is faster.
    Images are stacked until a GEMM row holds about _TARGET_COLUMNS values.
    """
    direct = g.sh == 1 and g.sw == 1 and (not backward or g.C >= 4)
    if direct:
        rows, stride, _ = stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, 1)
        per_image = rows * stride
    else:
        per_image = g.OH * g.OW
    nb = max(1, min(g.N, -(-_TARGET_COLUMNS // per_image)))
    return direct, nb


def conv2d(x, w, b, g, activation):
    """Backend conv2d: ``(N, F, OH, OW)`` in ``x``'s dtype, bias and ReLU fused."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = threads(g.N)
    direct, nb = _plan(g, F, backward=False)
    x_layout = stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, nb)
    if direct:
        buf_len, acc_len = g.C * x_layout.cstride, round_up(nb * x_layout.rows * x_layout.stride)
        offsets = tap_offsets(g.C, g.kh, g.kw, x_layout.cstride, x_layout.stride)
    else:
        buf_len, acc_len = K * nb * P, round_up(nb * P)
        offsets = np.arange(K, dtype=np.int64) * (nb * P)
    plan = GemmPlan(bool(direct), nb, offsets, offsets)
    w_fk, _, _, _ = packed_weights(w)
    bias = np.zeros(F, np.float32)
    if b is not None:
        bias[:] = b  # F values: the epilogue adds them in fp32
    y = np.empty((g.N, F, g.OH, g.OW), dtype=x.dtype)
    with checkout(
        ("fwd", buf_len, acc_len, F, nt),
        lambda: ForwardWork(aligned_empty((nt, buf_len)), aligned_empty((nt, F, acc_len))),
    ) as ws:
        forward_kernel(
            bits_view(x), w_fk, bias, activation == "relu", bits_view(y), ws, plan, x_layout, g
        )  # fmt: skip
    return y


def conv2d_backward(dy, x, w, g, need_dx=True):
    """Backend conv2d gradients ``(dx, dw, db)``, each in ``x``'s dtype; ``dx`` is None (and
    not computed) when ``need_dx`` is False."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = threads(g.N)
    direct, nb = _plan(g, F, backward=True)
    _, w_kf, w_flip, finite_w = packed_weights(w)
    # Non-finite weights would leak through the zero padding of dy on the direct dx path.
    direct = bool(direct and finite_w)
    x_layout = stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, nb)
    dy_layout = stack_layout(g.OH, g.OW, g.kh - 1 - g.ph, g.kw - 1 - g.pw, g.kh, g.kw, nb)
    plan = GemmPlan(
        direct,
        nb,
        tap_offsets(g.C, g.kh, g.kw, x_layout.cstride, x_layout.stride),
        tap_offsets(F, g.kh, g.kw, dy_layout.cstride, dy_layout.stride),
    )
    # The unfolded path's buffers also serve the direct path, one image at a time, for
    # images with non-finite values.
    L = P if direct else nb * P
    shapes = BackwardWork(
        xbuf=(g.C * x_layout.cstride,) if direct else (1,),
        dybuf=(F * dy_layout.cstride,) if direct else (1,),
        acc=(g.C, round_up(nb * dy_layout.rows * dy_layout.stride)) if direct else (1, 1),
        col=(K * L,),
        dcol=(K * L,),
        dyn=(F * max(L, x_layout.cstride if direct else 0),),
        dx_acc=(g.C, g.H, g.W),
        dw_part=(F, K),
        db_part=(F,),
    )
    # Without dx the kernel never touches it: a 1-element stand-in keeps the signature typed.
    dx = np.empty(g.x_shape if need_dx else (1, 1, 1, 1), dtype=x.dtype)
    dw = np.empty(w.shape, dtype=x.dtype)
    db = np.empty(F, dtype=x.dtype)
    with checkout(
        ("bwd", F, direct, nb, *g, nt),
        lambda: BackwardWork(*(aligned_empty((nt, *s)) for s in shapes)),
    ) as ws:
        backward_kernel(
            bits_view(dy), bits_view(x), w_kf, w_flip, need_dx, bits_view(dx), ws, plan,
            x_layout, dy_layout, g,
        )  # fmt: skip
        reduce_partials(ws.dw_part, ws.db_part, bits_view(dw), bits_view(db))
    return (dx if need_dx else None), dw, db
