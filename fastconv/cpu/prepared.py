"""Prepared convolution weights for inference on the CPU (called only from
:mod:`fastconv.prepared`, after validation).

:func:`fastconv.conv2d` redoes per call what depends only on the weights: the float32 bias, the
Winograd weight transform ``U = G g G^T`` (2.5 ms per 3x3 ResNet-18 layer) or the packed GEMM
operand (``packed_weights`` also builds the two backward operands, 2.7 ms per layer), and the
per-shape planning. :class:`ConvWeights` computes each once, when first needed, and
:class:`ConvPlan` holds what one input shape needs (algorithm, geometry, Winograd plan or
stack layout, workspace key, serial or parallel kernel). Both are immutable once built, so one
prepared object serves several threads (workspaces still come from the thread-safe pool).

The kernels are the unprepared path's own (:func:`fastconv.cpu._winograd.forward_residual`,
:func:`fastconv.cpu._direct.forward_residual`): the same work items in the same order, so the
results are bitwise those of :func:`fastconv.cpu.conv.conv2d` with the same algorithm. They
take an optional residual added in the epilogue (ResNet's ``relu(bn(conv(x)) + shortcut)``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from ..kernels import clamp6
from . import _outputs as outputs
from . import _select
from . import _winograd as wg
from ._direct import forward_residual as gemm_parallel
from ._direct import forward_residual_serial as gemm_serial
from ._direct import forward_split, forward_split_serial
from ._entry import Entries, array_key
from ._half import bits_view
from ._layout import ACTIVATION_CODES, NO_ACTIVATION, RELU6, threads
from ._matmul import matmul_panels, pack_filters, pack_panels, pointwise
from ._workspace import checkout
from .conv import (
    SplitTimer,
    _gemm_setup,
    _winograd_setup,
    filter_operands,
    is_flat,
    is_pointwise,
    split_mode,
)

__all__ = ["SERIAL_CONV_FLOPS", "ACTIVATION_CODES", "ConvWeights", "ConvPlan", "make_plan",
           "conv2d_prepared"]  # fmt: skip

# Direct-convolution FLOPs below which a call runs on the calling thread (no parallel region),
# and up to which a SplitTimer chooses call by call between the plan for every thread and the
# plan for one (their bits are the same). Measured when this was one fixed limit of 2e7, on
# the deep-MNIST layers at batch 1 (3.6 MFLOP each): the serial twin took 25-60 us where the
# parallel kernel took 60-170 us on the shared 2-core host (the pool's wake-up, before
# OpenMP's spin was capped). With the timer from 1e6 (2026-12-07, 2 threads, medians of 400
# calls): deep-MNIST at batch 4 1056 -> ~820 us and LeNet-5 at batch 8 310 -> ~290 us idle,
# level with one thread under a CPU hog (the parallel kernels alone there: 2.1 ms against
# 1.06). A batch-100 layer (360 MFLOP) keeps both threads.
PARALLEL_MIN_FLOPS = 1_000_000
SERIAL_CONV_FLOPS = 20_000_000


class ConvWeights:
    """One convolution's weights, prepared lazily for every algorithm that asks.

    ``w`` (F, C, kh, kw) and ``b`` (F,) or None: validated, C-contiguous NumPy arrays of one
    dtype (float32 or float16). The arrays are the prepared object's own (a folded copy or
    the layer's), and must not change while it is in use: that is what the weights version
    of :mod:`fastconv.nn` guarantees.
    """

    def __init__(self, w, b):
        self.w = w
        self.F = int(w.shape[0])
        self.bias = np.zeros(self.F, np.float32)
        if b is not None:
            self.bias[:] = b  # the epilogue adds them in float32
        self._u: dict = {}  # (m, Fp) -> (U, ok)
        self._fk: dict = {}  # packed -> (w_fk, wp) of the GEMM paths
        self._pw = None  # packed filters of a 1x1 convolution
        self._flat = None  # W^T in column panels (a window covering the input)

    def winograd(self, m, rows_padded):
        """``(U, ok)`` of :func:`fastconv.cpu._winograd.transform_weights`, computed once."""
        key = (m, rows_padded)
        found = self._u.get(key)
        if found is None:
            found = self._u[key] = wg.transform_weights(bits_view(self.w), m, rows_padded)
        return found

    def pointwise(self):
        """The filters of a 1x1 convolution packed for :func:`~fastconv.cpu._matmul.pointwise`,
        once."""
        if self._pw is None:
            self._pw = pack_filters(self.w.reshape(self.F, math.prod(self.w.shape[1:])))
        return self._pw

    def flat(self):
        """W^T (K x F) in the GEMM layer's column panels, for a window covering the input
        (:func:`~fastconv.cpu.conv.is_flat`), packed once."""
        if self._flat is None:
            wt = np.ascontiguousarray(self.w.reshape(self.F, math.prod(self.w.shape[1:])).T)
            self._flat = pack_panels(wt)
        return self._flat

    def gemm(self, plan):
        """``(w_fk, wp)`` of the GEMM paths for a plan (:func:`~fastconv.cpu.conv.filter_operands`),
        made once per kind."""
        found = self._fk.get(plan.packed)
        if found is None:
            found = self._fk[plan.packed] = filter_operands(self.w, plan)
        return found


class ConvPlan(NamedTuple):
    """What one input shape needs (built once per shape by :func:`make_plan`)."""

    g: tuple  # the validated Geometry
    name: str  # algorithm (winograd4x4, winograd2x2, direct, unfolded)
    source: str  # how it was chosen (see fastconv.conv_algorithm_choices)
    serial: bool  # run on the calling thread
    y_shape: tuple
    wino: tuple | None  # (m, setup) of a Winograd plan
    gemm: tuple | None  # (GemmPlan, x_layout, workspace key, make) of a GEMM plan
    pointwise: bool  # a 1x1 convolution on the direct path: one product over all pixels
    flat: bool  # one window covering the input: a Dense product (conv.is_flat)
    split: int  # 0, or how the threads share each image (_direct.SPLIT_COLUMNS / _FILTERS)
    entries: Entries  # the kernels' compiled entry points for this plan (_entry)
    timer: SplitTimer | None  # with ``split`` or ``alt``: whether a call shares the threads now
    alt: ConvPlan | None  # a small plan's one-thread twin (the timer chooses between them)
    tally: tuple  # the key its calls are counted under (_select.record_key: built once)
    runners: dict  # (activation code, residual?) -> its GEMM-path call (_gemm_runner)


def make_plan(g, weights, name, source, serial=None):
    """The :class:`ConvPlan` of geometry ``g`` (validated) with algorithm ``name`` (``serial``:
    force the one-thread plan)."""
    F = weights.F
    tally = _select.record_key("forward", weights.w.dtype, g, F, name, source)
    flops = 2 * g.N * F * g.C * g.kh * g.kw * g.OH * g.OW
    forced = serial is not None
    if not forced:
        serial = flops < SERIAL_CONV_FLOPS
    nt = 1 if serial else threads(g.N)
    wino = gemm = None
    if not name.startswith("winograd") and is_flat(g):
        return ConvPlan(g, name, source, serial, (g.N, F, 1, 1), None, None, False, True, 0,
                        Entries(), None, None, tally, {})  # fmt: skip
    if name == "direct" and is_pointwise(g):
        return ConvPlan(g, name, source, serial, (g.N, F, g.OH, g.OW), None, None, True, False, 0,
                        Entries(), None, None, tally, {})  # fmt: skip
    split = 0 if forced else split_mode(g, F, name == "direct" and g.sh == 1 and g.sw == 1)
    if split:
        gemm = _gemm_setup(g, F, True, numba.get_num_threads(), split)
        return ConvPlan(g, name, source, False, (g.N, F, g.OH, g.OW), None, gemm, False, False,
                        split, Entries(), SplitTimer(), None, tally, {})  # fmt: skip
    # Between the two limits a Winograd or GEMM plan runs on every thread or on one, as its
    # timer finds (the flat and pointwise products above keep the fixed limit).
    adaptive = not forced and flops >= PARALLEL_MIN_FLOPS and serial and threads(g.N) > 1
    if adaptive:
        serial, nt = False, threads(g.N)
    if name.startswith("winograd"):
        m = 4 if name == "winograd4x4" else 2
        wino = (m, _winograd_setup(g.N, g.C, F, g.OH, g.OW, m, nt, g.ph, g.pw, g.W, False))
    # Winograd plans keep a GEMM plan for the calls it sends back (non-finite or huge values).
    gemm = _gemm_setup(g, F, g.sh == 1 and g.sw == 1 and name != "unfolded", nt)
    if adaptive:
        return ConvPlan(g, name, source, False, (g.N, F, g.OH, g.OW), wino, gemm, False, False,
                        0, Entries(), SplitTimer(),
                        make_plan(g, weights, name, source, serial=True), tally, {})  # fmt: skip
    return ConvPlan(g, name, source, serial, (g.N, F, g.OH, g.OW), wino, gemm, False, False, 0,
                    Entries(), None, None, tally, {})  # fmt: skip


def choose(g, weights, dtype):
    """``(name, source)`` for a prepared call, or ``(None, source)`` in benchmark mode before
    the shape was measured (the caller runs the unprepared path once, which measures)."""
    return _select.choose("forward", dtype, g, weights.F, None)


def conv2d_prepared(x, weights, plan, relu, res):
    """``act(conv(x) + bias [+ res])`` in x's dtype by ``plan``; ``relu`` an activation code
    (:data:`ACTIVATION_CODES`; ReLU6 without ``res``); ``res`` None or an array of the
    output's shape and dtype (validated, C-contiguous)."""
    if plan.alt is None:
        return _conv2d_plan(x, weights, plan, relu, res)
    return plan.timer.run(
        lambda shared: _conv2d_plan(x, weights, plan if shared else plan.alt, relu, res)
    )


def _conv2d_plan(x, weights, plan, relu, res):
    has_res = res is not None
    if plan.wino is None and not plan.flat and not plan.pointwise:
        return _gemm_runner(plan, weights, relu, has_res)(x, res)
    g = plan.g
    y = outputs.empty(plan.y_shape, x.dtype)
    yb, xb = bits_view(y), bits_view(x)
    rb = bits_view(res) if has_res else yb
    if plan.flat:
        out = (g.N, weights.F)
        matmul_panels(xb.reshape(g.N, -1), weights.flat(), yb.reshape(out), weights.bias,
                      relu != NO_ACTIVATION, rb.reshape(out) if has_res else None)  # fmt: skip
        _select.record_by_key(plan.tally)
        return clamp6(y) if relu == RELU6 else y
    if plan.pointwise:
        rows = (g.N, g.C, g.H * g.W)
        out = (g.N, weights.F, g.OH * g.OW)
        pointwise(weights.pointwise(), xb.reshape(rows), yb.reshape(out), weights.bias, relu,
                  rb.reshape(out) if has_res else None, plan.serial)  # fmt: skip
        _select.record_by_key(plan.tally)
        return y
    m, (wplan, key, make) = plan.wino
    u, ok = weights.winograd(m, wplan.Fp)
    if ok:
        # What fixes the kernels' argument types besides the plan (see _entry): x's and the
        # residual's arrays (y and the workspaces are always fresh C-contiguous arrays).
        arrays = (array_key(xb), array_key(rb) if has_res else None)
        flags = np.zeros(wplan.items, np.int64)
        kernel = wg.forward_residual_serial if plan.serial else wg.forward_residual
        with checkout(key, make) as ws:
            plan.entries.call(kernel, ("winograd", arrays), xb, u, weights.bias,
                              relu != NO_ACTIVATION, yb, wplan, ws, flags, rb,
                              has_res)  # fmt: skip
        if not flags.any():
            _select.record_by_key(plan.tally)
            return clamp6(y) if relu == RELU6 else y
    # Values the Winograd transforms must not see: the exact GEMM path redoes the call.
    return _gemm_runner(plan, weights, relu, has_res)(x, res, True)


def _gemm_runner(plan, weights, relu, has_res):
    """The GEMM-path call of ``plan`` for one activation code and residual flag, made on
    first use (:func:`_bind_gemm`)."""
    run = plan.runners.get((relu, has_res))
    if run is None:
        run = plan.runners[(relu, has_res)] = _bind_gemm(plan, weights, relu, has_res)
    return run


def _bind_gemm(plan, weights, relu, has_res):
    """``run(x, res, fell_back=False) -> y``: the GEMM path of ``plan`` with everything that
    does not change between calls looked up once (filter operands, kernel, workspace key,
    the record's key): ~1 us of a batch-1 call. The rest stays per call: a prepared call of
    64 -> 64 channels on 7x7 took 35.4 us against 30.4 for its kernel with an output and a
    workspace alone (2026-12-07): the prepared object's checks, the split timer, the
    record, the entry lookup."""
    g, split, tally, y_shape = plan.g, plan.split, plan.tally, plan.y_shape
    gplan, x_layout, key, make = plan.gemm
    w_fk, wp = weights.gemm(gplan)
    bias, entries, timer = weights.bias, plan.entries, plan.timer
    kernel = gemm_serial if plan.serial else gemm_parallel

    def run(x, res, fell_back=False):
        y = outputs.empty(y_shape, x.dtype)
        xb, yb = bits_view(x), bits_view(y)
        rb = bits_view(res) if has_res else yb
        # What fixes the kernels' argument types besides the plan (see _entry): x's and the
        # residual's arrays (y and the workspaces are always fresh C-contiguous arrays).
        arrays = (array_key(xb), array_key(rb) if has_res else None)
        with checkout(key, make) as ws:
            if split:
                args = (xb, wp, bias, relu, yb, ws, gplan, x_layout, g, rb, has_res, split)
                timer.run(
                    lambda shared: entries.call(
                        forward_split if shared else forward_split_serial, (shared, arrays), *args
                    )
                )
            else:
                entries.call(kernel, ("gemm", arrays), xb, w_fk, wp, bias, relu, yb, ws, gplan,
                             x_layout, g, rb, has_res)  # fmt: skip
        _select.record_by_key(tally, fell_back)
        return y

    return run
