"""CPU convolution: algorithm choice, planning, workspaces and the backend entry points.

The kernels live in modules with one concern each (see ``docs/kernels.md`` for the
measurements behind them):

* :mod:`.im2col` -- the public im2col / col2im (book layout);
* :mod:`._gemm` -- GEMM micro-kernels over rows that are slices of one flat buffer;
* :mod:`._simd` -- explicit-SIMD pieces in LLVM IR (register-blocked GEMM micro-kernel,
  small-matrix stream transforms, 16x16 transposes);
* :mod:`._layout` -- aligned buffers, images stacked per channel, packed weights, epilogue;
* :mod:`._direct` -- the direct path (stride 1, shifted views of stacked images) and the
  parallel kernels of both GEMM paths;
* :mod:`._unfolded` -- the unfolded (im2col-GEMM) path: any stride, any values;
* :mod:`._winograd` -- Winograd F(4x4,3x3) and F(2x2,3x3) for 3x3 stride-1 layers;
* :mod:`._select` -- which algorithm a call runs, and the record of every choice.

This module asks :mod:`._select` for the algorithm, builds the operands and the per-thread
workspaces (taken with :func:`~fastconv.cpu._workspace.checkout`) and launches the kernels.
Bias and ReLU are fused into the epilogues that write NCHW output; float16 arrays are read and
written as uint16 bits through :mod:`fastconv.cpu._half`, everything is computed and
accumulated in float32.
"""

from __future__ import annotations

import functools
import math
import time

import numba
import numpy as np
from numba import njit, prange

from ..kernels import clamp6
from . import _outputs as outputs
from . import _select
from . import _winograd as wg
from ._direct import (
    SPLIT_COLUMNS,
    SPLIT_FILTERS,
    BackwardWork,
    ForwardWork,
    GemmPlan,
    backward_kernel,
    forward_residual,
    forward_split,
    forward_split_serial,
    reduce_partials,
)
from ._half import bits_view, load, store_value
from ._layout import (
    ACTIVATION_CODES,
    packed_weights,
    row_stride,
    stack_layout,
    tap_offsets,
    threads,
)
from ._matmul import OFFSETS_NC, PackedA, _pointwise_blocks, matmul, pack_filters, pointwise
from ._simd import MR, NR
from ._unfolded import fold_image, unfold_image
from ._workspace import checkout
from .im2col import col2im, im2col

__all__ = ["im2col", "col2im", "conv2d", "conv2d_backward"]

# Images per GEMM: stack until a row of the product holds about this many values (long
# vectorised rows, few passes over the weights). 1024 measured best among 256..2048 on the
# deep-MNIST layers (5-10% over 512); the stacked images of one block stay within L2.
_TARGET_COLUMNS = 1024


def _images_per_block(g, direct):
    """Images stacked (direct) or unfolded side by side in one GEMM: until a row of the
    product holds about ``_TARGET_COLUMNS`` values."""
    if direct:
        rows, stride, _ = stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, 1)
        per_image = rows * stride
    else:
        per_image = g.OH * g.OW
    return max(1, min(g.N, -(-_TARGET_COLUMNS // per_image)))


# --- GEMM paths (direct, unfolded) ---------------------------------------------------------------


# The forward product of the direct and unfolded paths runs on the GEMM layer's packed
# micro-kernel (_matmul.gemm_offsets) for outputs of at most this many pixels and reductions
# of at least PACKED_MIN_K, else on the row-streaming gemm_nn. One thread, 2026-12-07: batch-1
# deep-MNIST layers on 14x14, 16x16 and 8x8 maps 0.44-0.88 of gemm_nn's time, a 28x28 map
# 1.04, 224x224 inputs (7x7/2, 11x11/4) 1.05-1.18, and K = 9 (conv1 at batch 100) 1.6.
PACKED_MAX_PIXELS = 256
PACKED_MIN_K = 32


def filter_operands(w, plan):
    """``(w_fk, wp)`` of a forward GEMM plan: the float32 (F, K) filters for gemm_nn, or the
    packed ones; the other a placeholder of its type (Numba compiles one signature)."""
    F = w.shape[0]
    K = math.prod(w.shape[1:])
    if plan.packed:
        return _NO_FK, pack_filters(w.reshape(F, K))
    return packed_weights(w)[0], _NO_PACKED


_NO_FK = np.zeros((1, 1), np.float32)
_NO_PACKED = PackedA(np.zeros(1, np.float32), 8, 1, 0, 0)


# Fewer images than threads (batch-1 latency): a direct convolution of at least this many
# FLOPs has the threads share each image's product (_direct.forward_split), each thread
# taking a band of at least SPLIT_MIN_COLUMNS columns of it, else a band of filters (MR at
# least). Batch-1 deep-MNIST layers, 2 threads: see docs/kernels.md ("Batch 1").
SPLIT_MIN_FLOPS = 1_000_000
SPLIT_MIN_COLUMNS = 128


def split_mode(g, F, direct, n_threads=None):
    """How ``n_threads`` (None: Numba's count) share a forward product of fewer images than
    threads: 0 (they do not: one image a thread), ``SPLIT_COLUMNS`` or ``SPLIT_FILTERS``."""
    n_threads = numba.get_num_threads() if n_threads is None else n_threads
    flops = 2 * g.N * F * g.C * g.kh * g.kw * g.OH * g.OW
    if not direct or g.N >= n_threads or flops < SPLIT_MIN_FLOPS:
        return 0
    rows, stride, _ = stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, _images_per_block(g, True))
    length = (g.N - 1) * rows * stride + (g.OH - 1) * stride + g.OW
    if length >= n_threads * SPLIT_MIN_COLUMNS:
        return SPLIT_COLUMNS
    if F >= n_threads * MR:
        return SPLIT_FILTERS
    return 0


# While sharing an image's product is slower than one thread alone (another process holds a
# core: the parallel region waits for its time slice), calls run the bands on the calling
# thread for a while before trying to share again: 10 ms at first, doubling while the load
# lasts, up to 1 s. Deep-MNIST batch-1 predict with one core spinning, 2 threads: p50
# 1.20 ms always sharing, 0.42 ms never (docs/kernels.md).
SPLIT_BACKOFF_S = (0.01, 1.0)

# After the process left the kernels idle, the other threads sleep (OpenMP's spin is capped,
# see cpu/__init__.py) and on this VM host waking one can take a scheduler tick: a parallel
# region's end waits for it. Deep-MNIST batch-1 predict, 2 threads, one call after each gap
# (2026-12-07, 40 calls each): gap 0.5 ms p50 0.42 ms; 5 ms 0.79 ms (p90 1.08); 20 ms p50
# 1.04 ms but p90 11.9 ms; 100 ms p50 11.6 ms (two regions of ~6.7 and ~3.9 ms), against
# 1.05-1.10 ms (max 1.3) on one thread; ONNX Runtime 0.5 ms (its caller runs the work its
# sleeping threads have not taken). So a call that comes more than SPLIT_IDLE_S after the
# previous timed call ended runs on one thread, and so do the next SPLIT_WARM_CALLS calls
# that follow closely: sporadic requests never wait for a sleeping thread, a burst shares
# again from its third predict.
SPLIT_IDLE_S = 0.01
SPLIT_WARM_CALLS = 10


class _Load:
    """Whether other work holds the cores, as the timers last saw it: one state for the
    process (the load is the machine's, not a layer's), so one detection sends every plan's
    calls to one thread and the probes do not multiply with the layers. It also holds when
    the last timed call ended and how many calls have followed closely since an idle gap."""

    __slots__ = ("serial_until", "slow", "backoff", "last_end", "close_calls")

    def __init__(self):
        self.serial_until = 0.0
        self.slow = 0
        self.backoff = SPLIT_BACKOFF_S[0]
        self.last_end = -math.inf
        self.close_calls = 0


_LOAD = _Load()


class SplitTimer:
    """Whether a call that can share the threads does so now: its first two calls run on one
    thread (the second, compiled, sets the serial time); afterwards it shares unless two
    shared calls in a row (of any plan) took over 1.5x their best serial time (one slow call
    is noise), which sends every plan's calls of the next back-off period
    (``SPLIT_BACKOFF_S``) to one thread, or unless the calls are just back from idle
    (``SPLIT_IDLE_S``, ``SPLIT_WARM_CALLS``). Attribute races only change which kernel runs
    (the same bits either way)."""

    __slots__ = ("serial_calls", "serial_best")

    def __init__(self):
        self.serial_calls = 0
        self.serial_best = math.inf

    def run(self, call):
        """``call(shared)``: run the parallel kernel (``shared``) or its serial twin; returns
        what it returns."""
        load = _LOAD
        start = time.perf_counter()
        if start - load.last_end > SPLIT_IDLE_S:
            load.close_calls = 0
        else:
            load.close_calls += 1
        shared = (
            self.serial_calls >= 2
            and start >= load.serial_until
            and load.close_calls > SPLIT_WARM_CALLS
        )
        result = call(shared)
        end = time.perf_counter()
        load.last_end = end
        elapsed = end - start
        if not shared:
            self.serial_calls += 1
            self.serial_best = min(self.serial_best, elapsed)
        elif elapsed <= 1.5 * self.serial_best:
            load.slow = 0
            load.backoff = SPLIT_BACKOFF_S[0]
        else:
            load.slow += 1
            if load.slow >= 2:
                load.slow = 0
                load.serial_until = start + elapsed + load.backoff
                load.backoff = min(2 * load.backoff, SPLIT_BACKOFF_S[1])
        return result


_SPLIT_TIMERS: dict = {}  # the unprepared path's, by geometry


def split_timer(g, F):
    """The :class:`SplitTimer` of the unprepared path for a geometry."""
    timer = _SPLIT_TIMERS.get((g, F))
    if timer is None:
        if len(_SPLIT_TIMERS) >= 256:
            _SPLIT_TIMERS.clear()
        timer = _SPLIT_TIMERS[(g, F)] = SplitTimer()
    return timer


def _gemm_setup(g, F, direct, nt, split=0):
    """The forward GEMM plan of geometry ``g`` on ``nt`` threads: ``(plan, x_layout,
    workspace key, make)`` (the prepared path plans once per shape with it). With ``split``
    (:func:`split_mode`) the threads share each image's product, which then always runs on
    the packed micro-kernel (its bits do not depend on the bands)."""
    nb = _images_per_block(g, direct)
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    x_layout = stack_layout(g.H, g.W, g.ph, g.pw, g.kh, g.kw, nb)
    if direct:
        # NR values of slack: the packed product reads whole NR-column rows in place
        buf_len = g.C * x_layout.cstride + NR
        acc_len = row_stride(nb * x_layout.rows * x_layout.stride)
        offsets = tap_offsets(g.C, g.kh, g.kw, x_layout.cstride, x_layout.stride)
    else:
        buf_len, acc_len = K * nb * P, row_stride(nb * P)
        offsets = np.arange(K, dtype=np.int64) * (nb * P)
    packed = bool(split) or (g.OH * g.OW <= PACKED_MAX_PIXELS and K >= PACKED_MIN_K)
    plan = GemmPlan(bool(direct), nb, offsets, offsets, packed)
    key = ("fwd", buf_len, acc_len, F, nt)  # one pool for both paths

    MC, KC = _pointwise_blocks(F, K)
    key = (*key, MC, KC)

    def make(alloc):
        return ForwardWork(
            alloc((nt, buf_len)), alloc((nt, F, acc_len)), alloc((nt, KC * OFFSETS_NC)),
            alloc((nt, MC * OFFSETS_NC)),
        )  # fmt: skip

    return plan, x_layout, key, make


def _gemm_forward(x, w, b, g, activation, direct):
    F = w.shape[0]
    split = split_mode(g, F, direct)
    nt = numba.get_num_threads() if split else threads(g.N)
    plan, x_layout, key, make = _gemm_setup(g, F, direct, nt, split)
    w_fk, wp = filter_operands(w, plan)
    bias = np.zeros(F, np.float32)
    if b is not None:
        bias[:] = b  # F values: the epilogue adds them in fp32
    y = outputs.empty((g.N, F, g.OH, g.OW), x.dtype)
    relu = ACTIVATION_CODES[activation]
    with checkout(key, make) as ws:
        yb = bits_view(y)
        if split:
            xb = bits_view(x)
            split_timer(g, F).run(
                lambda shared: (forward_split if shared else forward_split_serial)(
                    xb, wp, bias, relu, yb, ws, plan, x_layout, g, yb, False, split
                )
            )
        else:
            forward_residual(bits_view(x), w_fk, wp, bias, relu, yb, ws, plan, x_layout, g, yb,
                             False)  # fmt: skip
    return y


def _gemm_backward(dy, x, w, g, need_dx, direct):
    F = w.shape[0]
    if _backward_by_gemm_layer(g, F):
        out = _weight_grad_gemm(dy, x, w, g, need_dx)
        return out if need_dx else (None, *out)
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    nt = threads(g.N)
    nb = _images_per_block(g, direct)
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
        False,  # (the forward product's choice; not read by the backward kernels)
    )
    # The unfolded path's buffers also serve the direct path, one image at a time, for
    # images with non-finite values.
    L = P if direct else nb * P
    shapes = BackwardWork(
        xbuf=(g.C * x_layout.cstride,) if direct else (1,),
        dybuf=(F * dy_layout.cstride,) if direct else (1,),
        acc=(g.C, row_stride(nb * dy_layout.rows * dy_layout.stride)) if direct else (1, 1),
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
        lambda alloc: BackwardWork(*(alloc((nt, *s)) for s in shapes)),
    ) as ws:
        backward_kernel(
            bits_view(dy), bits_view(x), w_kf, w_flip, need_dx, bits_view(dx), ws, plan,
            x_layout, dy_layout, g,
        )  # fmt: skip
        reduce_partials(ws.dw_part, ws.db_part, bits_view(dw), bits_view(db))
    return (dx if need_dx else None), dw, db


# --- Winograd ------------------------------------------------------------------------------------


def _winograd_setup(N, C, F, OH, OW, m, n_threads, top, left, W_in, weights):
    """``(plan, workspace key, make)`` for a Winograd launch, cached per shape (the planning
    and the workspace description cost tens of microseconds a call otherwise)."""
    # The planning constants are part of the key, so that changing them (tests) replans.
    return _cached_setup(
        N, C, F, OH, OW, m, n_threads, top, left, W_in, weights, wg._MAX_GROUP,
        wg._TARGET_COLUMNS, wg._MIN_BLOCK_FILTERS,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _cached_setup(N, C, F, OH, OW, m, n_threads, top, left, W_in, weights, *_constants):
    plan = wg.make_plan(N, C, F, OH, OW, m, n_threads, top, left, split_filters=not weights)
    nt = threads(plan.items)
    shapes = wg.work_shapes(plan, C, F, W_in, OW, weights)
    key = ("wino", weights, plan, C, F, W_in, OW, nt)

    def make(alloc):
        # V zeroed: its columns past the last tile of a work item (and rows past C) are read
        # by the products and must hold finite values. The others are written before they
        # are read (the phase copies clear xq and dq themselves), so an arena taken over from
        # another set (cpu/_workspace.py) zeroes only V.
        arrays = [
            alloc((nt, *s), np.int64 if name == "offs" else np.float32, zero=name == "v")
            for name, s in zip(wg.WinogradWork._fields, shapes, strict=True)
        ]
        return wg.WinogradWork(*arrays)

    return plan, key, make


def _winograd_conv(x_bits, u, bias, relu, y_bits, setup):
    """One Winograd convolution launch; returns False if the input held values the
    transforms must not see (outputs then incomplete)."""
    plan, key, make = setup
    flags = np.zeros(plan.items, np.int64)
    with checkout(key, make) as ws:
        wg.forward_residual(x_bits, u, bias, relu, y_bits, plan, ws, flags, y_bits, False)
    return not flags.any()


def _winograd_forward(x, w, b, g, activation, m):
    """y by Winograd F(m x m, 3x3), or None when the data or weights need the exact path."""
    F = w.shape[0]
    y = outputs.empty((g.N, F, g.OH, g.OW), x.dtype)
    if g.N == 0:
        return y
    setup = _winograd_setup(g.N, g.C, F, g.OH, g.OW, m, threads(g.N), g.ph, g.pw, g.W, False)
    u, ok = wg.transform_weights(bits_view(w), m, setup[0].Fp)
    if not ok:
        return None
    bias = np.zeros(F, np.float32)
    if b is not None:
        bias[:] = b
    if not _winograd_conv(bits_view(x), u, bias, activation == "relu", bits_view(y), setup):
        return None
    return y


def _winograd_backward(dy, x, w, g, need_dx, m):
    """(dx, dw, db) by Winograd, or None when the data or weights need the exact path."""
    F = w.shape[0]
    if g.N == 0:
        dx = np.empty(g.x_shape, dtype=x.dtype) if need_dx else None
        return dx, np.zeros(w.shape, dtype=x.dtype), np.zeros(F, dtype=x.dtype)
    nt = threads(g.N)
    dx = None
    if need_dx:
        # dx = conv(dy padded by 2 - pad, flipped and transposed filters): a forward pass.
        dsetup = _winograd_setup(g.N, F, g.C, g.H, g.W, m, nt, 2 - g.ph, 2 - g.pw, g.OW, False)
        u, ok = wg.transform_weights(bits_view(w), m, dsetup[0].Fp, for_dx=True)
        if not ok:
            return None
        dx = np.empty(g.x_shape, dtype=x.dtype)
        no_bias = np.zeros(g.C, np.float32)
        if not _winograd_conv(bits_view(dy), u, no_bias, False, bits_view(dx), dsetup):
            return None
        # Not alive next to the weight gradient's partial sums: both are 4x the weights
        # (ResNet's and VGG-16's 512-channel layers: 38 MB and 75 MB, at the step's peak).
        del u
    if _dw_by_gemm(g, F):  # exact for any values, like the unfolded path
        return (dx, *_weight_grad_gemm(dy, x, w, g))
    plan, key, make = _winograd_setup(g.N, g.C, F, g.OH, g.OW, m, nt, g.ph, g.pw, g.W, True)
    items = plan.items  # one filter block: the items sum into the same partials
    a = m + 2
    # One partial sum per workspace thread (the kernel runs threads(items) of them).
    du_part = np.empty((threads(items), a * a, plan.Cr, plan.FN), np.float32)
    db_part = np.empty((threads(items), plan.FN), np.float32)
    flags = np.zeros(items, np.int64)
    with checkout(key, make) as ws:
        wg.weight_grad_kernel(bits_view(x), bits_view(dy), plan, ws, du_part, db_part, flags)
    if flags.any():
        return None
    dw = np.empty(w.shape, dtype=x.dtype)
    db = np.empty(F, dtype=x.dtype)
    wg.weight_grad_finish(du_part, db_part, m, bits_view(dw), bits_view(db))
    return dx, dw, db


# --- the weight gradient of small maps as one GEMM-layer product ---------------------------------


# Winograd's weight gradient sums a*a products of (F x tiles) @ (tiles x C) into per-thread
# partials dU of 4x the weights' size (36*C*F values), which dominate where there are few
# tiles to sum over: ResNet's 7x7 512-channel layers at batch 8 took 42 ms for dW against 17
# ms for the whole forward pass (one thread). There dW is one product on the GEMM layer
# instead, dW (F x K) = dy (F x N*P) @ col^T (N*P x K), over the images unfolded once (9*C*N*P
# values). Chosen when the partials are at least twice the unfolded images (2F >= N*P);
# measured, one thread, time of the product / Winograd's: 4F/(N*P) = 41.8: 0.10, 10.4: 0.30,
# 5.2: 0.60, 2.6: 0.66-1.00; 1.3: 1.44, 0.65: 1.88, deep-MNIST layers at batch 100: 3.7-4.2.
def _dw_by_gemm(g, F) -> bool:
    return 2 * F >= g.N * g.OH * g.OW


# The direct and unfolded paths' backward as two GEMM-layer products over all images (dW =
# dy @ col^T, dcol = W^T @ dy, folded back) instead of per-thread blocks with gemm_nt/gemm_nn
# and partial dW sums, where 8F >= N*P, and for 1x1 convolutions (whose col is x itself,
# re-laid) where 16F >= N*P. Time / the blocks', batch 8: unfolded, one thread, ResNet's
# strided layers: 8F/(N*P) = 10.4: 0.54-0.58, 1.3: 0.81-0.85; 0.16: 1.02-1.21 (kept on the
# blocks). Direct, 2 threads, GoogLeNet's layers (2026-12-07): 1x1 8F/(N*P) = 5.2: 0.34-0.40,
# 2.6: 0.40-0.42, 0.98: 0.56-0.70, 0.57: 0.72, 0.49: 0.51-0.68, 0.33: 0.87-0.90, 0.08:
# 1.14-1.49; 5x5 2.6: 0.59-0.66, 0.33: 1.06-1.14.
def _backward_by_gemm_layer(g, F) -> bool:
    pixels = g.N * g.OH * g.OW
    return 8 * F >= pixels or (is_pointwise(g) and 16 * F >= pixels)


@njit(cache=True, parallel=True)
def _dw_operands(x, dy, col, dyt, g):
    """col (K x N*P) <- the unfolded images; dyt (F x N*P) <- dy in float32, image after
    image (the column order of col). One image per task: each writes its own columns."""
    N = x.shape[0]
    F, P = dy.shape[1], dy.shape[2] * dy.shape[3]
    L = N * P
    for n in prange(N):
        unfold_image(x, n, col.reshape(-1), L, n * P, g)
        for f in range(F):
            src = dy[n, f].reshape(-1)
            dst = dyt[f, n * P : (n + 1) * P]
            for p in range(P):
                dst[p] = load(src[p])


@njit(cache=True)
def _row_sums(a, out):
    """out[f] = sum of row f of a, in column order (deterministic), stored in out's dtype."""
    for f in range(a.shape[0]):
        s = np.float32(0.0)
        row = a[f]
        for q in range(row.shape[0]):
            s += row[q]
        out[f] = store_value(out, s)


def _weight_grad_gemm(dy, x, w, g, need_dx=False):
    """(dw, db), or (dx, dw, db) with ``need_dx``, of any convolution through the unfolded
    images and products on the GEMM layer: dW = dy @ col^T, and dcol = W^T @ dy folded back
    image by image (each value one FMA chain in a fixed order: deterministic)."""
    F = w.shape[0]
    K, P = g.C * g.kh * g.kw, g.OH * g.OW
    L = g.N * P
    col = np.empty((K, L), np.float32)
    dyt = np.empty((F, L), np.float32)
    _dw_operands(bits_view(x), bits_view(dy), col, dyt, g)
    dw32 = matmul(dyt, col, np.empty((F, K), np.float32), trans_b=True)
    dw = dw32.reshape(w.shape) if x.dtype == np.float32 else dw32.astype(x.dtype).reshape(w.shape)
    db = np.empty(F, dtype=x.dtype)
    _row_sums(dyt, bits_view(db))
    if not need_dx:
        return dw, db
    del col
    dcol = matmul(bits_view(w).reshape(F, K), dyt, np.empty((K, L), np.float32), trans_a=True)
    dx = np.empty(g.x_shape, dtype=x.dtype)
    _fold_all(dcol, bits_view(dx), g)
    return dx, dw, db


@njit(cache=True, parallel=True)
def _fold_all(dcol, dx, g):
    """dx[n] <- image n's columns of dcol folded back (:func:`fold_image`), one image a task."""
    N, C, H, W = dx.shape
    L = dcol.shape[1]
    P = g.OH * g.OW
    for n in prange(N):
        acc = np.empty((C, H, W), np.float32)
        fold_image(dcol.reshape(-1), L, n * P, acc, g)
        out = dx[n].reshape(-1)
        flat = acc.reshape(-1)
        for q in range(out.shape[0]):
            out[q] = store_value(out, flat[q])


# --- entry points --------------------------------------------------------------------------------


def fuses_relu6(name, g) -> bool:
    """Whether algorithm ``name``'s epilogue applies ReLU6 for geometry ``g`` (the direct,
    unfolded and pointwise stores); Winograd's and the flat product's apply the ReLU, and
    :func:`fastconv.kernels.clamp6` the upper bound after."""
    return not name.startswith("winograd") and not is_flat(g)


def _forward_with(name, x, w, b, g, activation):
    """(y, fell_back) computed by algorithm ``name``."""
    if activation == "relu6" and not fuses_relu6(name, g):
        y, fell_back = _forward_with(name, x, w, b, g, "relu")
        return clamp6(y), fell_back
    if name.startswith("winograd"):
        y = _winograd_forward(x, w, b, g, activation, 4 if name == "winograd4x4" else 2)
        if y is not None:
            return y, False
        return _gemm_forward(x, w, b, g, activation, g.sh == 1 and g.sw == 1), True
    if is_flat(g):
        return _flat_forward(x, w, b, g, activation), False
    if name == "direct" and is_pointwise(g):
        return _pointwise_forward(x, w, b, g, activation), False
    return _gemm_forward(x, w, b, g, activation, name == "direct"), False


def is_flat(g) -> bool:
    """One window covering the whole unpadded input (LeNet-5's C5: 5x5 on 5x5): the layer is
    a Dense layer on the flattened images, ``y = x.reshape(N, K) @ W.reshape(F, K).T``. The
    direct path computed every stacked position (25 for one), the unfolded one unfolded a
    column per tap: 195 and 121 us for C5 at batch 8, where the product takes ~20."""
    return g.OH == 1 and g.OW == 1 and g.ph == 0 and g.pw == 0 and g.kh == g.H and g.kw == g.W


def _flat_forward(x, w, b, g, activation):
    F, K = w.shape[0], g.C * g.kh * g.kw
    y = outputs.empty((g.N, F, 1, 1), x.dtype)
    matmul(x.reshape(g.N, K), w.reshape(F, K), y.reshape(g.N, F), trans_b=True, bias=b,
           relu=activation == "relu")  # fmt: skip
    return y


# A 1x1 convolution on maps of at most this many pixels runs as one product over every
# image's pixels; larger maps keep the stacked direct GEMM. One thread, batch 8, time of the
# product / the direct GEMM (2026-12-07): 7x7 maps 0.34-0.39, 14x14 0.58-0.64, 28x28
# 0.84-0.96, 32x32 0.87; 56x56 1.12-1.34 and 112x112 1.00-1.06 (long rows already fill the
# direct kernel's vectors; the product's packing and output buffer cost more than they save).
POINTWISE_MAX_PIXELS = 1024


def is_pointwise(g) -> bool:
    """A 1x1 convolution without stride or padding on a map of at most
    ``POINTWISE_MAX_PIXELS``: the direct path runs it as one product over every image's
    pixels (:func:`~fastconv.cpu._matmul.pointwise`)."""
    return (
        g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and g.ph == 0 and g.pw == 0
        and g.H * g.W <= POINTWISE_MAX_PIXELS
    )  # fmt: skip


def _pointwise_forward(x, w, b, g, activation):
    F = w.shape[0]
    bias = np.zeros(F, np.float32)
    if b is not None:
        bias[:] = b  # F values: the epilogue adds them in fp32
    y = outputs.empty((g.N, F, g.OH, g.OW), x.dtype)
    filters = pack_filters(w.reshape(F, g.C))
    pointwise(filters, x.reshape(g.N, g.C, g.H * g.W), y.reshape(g.N, F, g.OH * g.OW), bias,
              ACTIVATION_CODES[activation])  # fmt: skip
    return y


def _backward_with(name, dy, x, w, g, need_dx):
    """((dx, dw, db), fell_back) computed by algorithm ``name``."""
    if name.startswith("winograd"):
        out = _winograd_backward(dy, x, w, g, need_dx, 4 if name == "winograd4x4" else 2)
        if out is not None:
            return out, False
        return _gemm_backward(dy, x, w, g, need_dx, g.C >= 4), True
    return _gemm_backward(dy, x, w, g, need_dx, name == "direct"), False


def _measure(pass_, run, g):
    """Benchmark mode: time every applicable algorithm on this call (each once to compile and
    warm up, then once timed) and keep the fastest; returns (name, its result)."""
    best = None
    for name in _select.candidates(g):
        run(name)
        t0 = time.perf_counter()
        result = run(name)
        elapsed = time.perf_counter() - t0
        if best is None or elapsed < best[0]:
            best = (elapsed, name, result)
    return best[1], best[2]


def conv2d(x, w, b, g, activation, algorithm=None):
    """Backend conv2d: ``(N, F, OH, OW)`` in ``x``'s dtype, bias and ReLU fused.

    ``algorithm``: None (the process-wide choice), ``"auto"`` (the rule) or a validated
    canonical algorithm name.
    """
    F = w.shape[0]
    name, source = _select.choose("forward", x.dtype, g, F, algorithm)
    if name is None:
        name, (y, fell_back) = _measure(
            "forward", lambda n: _forward_with(n, x, w, b, g, activation), g
        )
        _select.remember_measurement("forward", x.dtype, g, F, name)
    else:
        y, fell_back = _forward_with(name, x, w, b, g, activation)
    _select.record("forward", x.dtype, g, F, name, source, fell_back)
    return y


def conv2d_backward(dy, x, w, g, need_dx=True, algorithm=None):
    """Backend conv2d gradients ``(dx, dw, db)``, each in ``x``'s dtype; ``dx`` is None (and
    not computed) when ``need_dx`` is False. ``algorithm`` as for :func:`conv2d`."""
    F = w.shape[0]
    pass_ = "backward" if need_dx else "backward_weights"
    name, source = _select.choose(pass_, x.dtype, g, F, algorithm)
    if name is None:
        name, (out, fell_back) = _measure(
            pass_, lambda n: _backward_with(n, dy, x, w, g, need_dx), g
        )
        _select.remember_measurement(pass_, x.dtype, g, F, name)
    else:
        out, fell_back = _backward_with(name, dy, x, w, g, need_dx)
    _select.record(pass_, x.dtype, g, F, name, source, fell_back)
    return out


class ConvKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    conv2d = staticmethod(conv2d)
    conv2d_backward = staticmethod(conv2d_backward)
