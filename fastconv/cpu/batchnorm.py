"""Batch normalisation on the CPU: Numba kernels, float32 and float16 (as uint16 bits).

Layout: an (N, C) or (N, C, H, W) input is seen as rows of ``L = C*P`` *lanes* (``P = H*W``,
1 for 2-D input): lane ``j`` of row ``n`` is pixel ``j % P`` of channel ``j // P``, and each row
is contiguous. A task owns a block of adjacent channels, i.e. a contiguous slice of lanes.

* Training statistics, planes of fewer than ``_SEGMENT_P`` pixels (8x8 and smaller): the task
  adds its rows into one float32 accumulator per lane (an elementwise loop over the whole
  slice: long, contiguous and vectorised, where a loop over one channel's 16 pixels is too
  short for that), then each channel adds its P lane sums. Larger planes sum each (image,
  channel) segment in registers (long enough to vectorise, and no accumulator traffic), then
  add the N segment sums. Either way every channel's sum is taken in a fixed order that
  depends on neither the block size, the thread count nor the compilation (16 vector lanes,
  then a fixed tree: :func:`._simd.run_sum`), so results are bit-reproducible, and the float32
  rounding error stays near ``(N + P)`` ulps rather than ``N*P``.
* The variance takes a second pass (squared deviations from the mean), not
  ``E[x^2] - E[x]^2``, which cancels catastrophically in float32.
* The passes of one training step (forward: mean, variance, normalise; backward: the two sums,
  then dx) run back to back on one block, sized (``_BLOCK_ELEMS``) so that its data stays in
  the 1 MB L2 cache between passes: the tensor comes from memory about once per step.
* Per-channel coefficients are expanded to per-lane vectors, so the normalising pass is also
  one long elementwise loop.
* Inference (an affine map per channel) and its gradient are elementwise: ``prange`` over N.
* Statistics and coefficients are float32; ``mean``/``var`` are float32 for both dtypes,
  ``gamma``/``beta``/``dgamma``/``dbeta`` are in x's dtype.

Small problems (under ``_PARALLEL_MIN`` elements) call the block functions directly from
Python: no parallel region at all. Even a one-task ``prange`` wakes the whole thread team, and
under load that wait reached 16 ms (p90, measured) for a call whose work takes 1 us. The block
functions are compiled anyway (the parallel kernels call them), so this costs no compile time,
and the result is the same bits (one block of every channel).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._half import bits_view, load, store_value
from ._simd import run_grad_sums, run_sq_dev, run_sum

__all__ = [
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_inference_backward",
]

# No fast-math flags anywhere. The sums run in a fixed order through the explicit-SIMD
# reductions of ._simd (run_sum, run_sq_dev, run_grad_sums): under "reassoc" LLVM vectorised
# them differently in a fresh compile and in the same kernel loaded from Numba's cache, and the
# variances differed by an ulp between the two (measured 2026-12-07). Elementwise loops over a
# block's lanes need no flag to vectorise, and with "contract" or "reassoc" LLVM rewrote their
# vector body and scalar remainder differently. NaN and inf propagate.
_PARALLEL_MIN = 1 << 15  # elements; smaller problems run serially, without a parallel region
_BLOCK_ELEMS = 1 << 16  # elements of x per task: x, dy and y of a block stay in L2 (1 MB)
_SEGMENT_P = 32  # planes of at least this many pixels are reduced segment by segment


@njit(inline="always")
def _inv_std(var, eps):
    return np.float32(1.0) / np.sqrt(var + np.float32(eps))


@njit(inline="always")
def _relu(v):
    # v < 0 is False for NaN, so NaN passes through (as torch.relu and np.maximum).
    return np.float32(0.0) if v < np.float32(0.0) else v


@njit(inline="always")
def _masked(dy, y, has_y, j):
    """dy * (y > 0) in float32 when the forward fused a ReLU (``has_y``), else dy.

    A runtime flag rather than ``y=None``: a None argument would compile every backward kernel
    twice (Numba specialises on it), doubling their compile time; LLVM hoists the test out of
    the loops (measured: no slower).
    """
    d = load(dy[j])
    if has_y:
        d = d * (np.float32(1.0) if load(y[j]) > np.float32(0.0) else np.float32(0.0))
    return d


@njit(inline="always")
def _fill(a, start, count, value):
    # An explicit loop: array expressions inside a prange body become nested parfors.
    for i in range(start, start + count):
        a[i] = value


# Loops below index one row slice at a time (``x[n, lo:hi]``): LLVM vectorises those, but not
# ``x[n, lo + j]`` (measured 5-10x slower), whose offset it cannot prove non-negative.


@njit(cache=True)
def _forward_lanes(x, gamma, beta, y, mean, var, eps, relu, P, c0, c1):
    N = x.shape[0]
    lo, hi = c0 * P, c1 * P
    width = hi - lo
    M = np.float32(N * P)
    acc = np.empty(width, dtype=np.float32)
    _fill(acc, 0, width, np.float32(0.0))
    for n in range(N):
        xr = x[n, lo:hi]
        for j in range(width):
            acc[j] += load(xr[j])
    lane_a = np.empty(width, dtype=np.float32)  # mean, then scale
    for c in range(c0, c1):
        mu = run_sum(acc, (c - c0) * P, P) / M
        mean[c] = mu
        _fill(lane_a, (c - c0) * P, P, mu)
    _fill(acc, 0, width, np.float32(0.0))
    for n in range(N):
        xr = x[n, lo:hi]
        for j in range(width):
            d = load(xr[j]) - lane_a[j]
            acc[j] += d * d
    lane_b = np.empty(width, dtype=np.float32)  # shift
    for c in range(c0, c1):
        v = run_sum(acc, (c - c0) * P, P) / M
        var[c] = v
        scale = load(gamma[c]) * _inv_std(v, eps)
        _fill(lane_b, (c - c0) * P, P, load(beta[c]) - mean[c] * scale)
        _fill(lane_a, (c - c0) * P, P, scale)
    for n in range(N):
        xr = x[n, lo:hi]
        yr = y[n, lo:hi]
        for j in range(width):
            out = load(xr[j]) * lane_a[j] + lane_b[j]
            yr[j] = store_value(yr, _relu(out) if relu else out)


@njit(cache=True)
def _backward_lanes(dy, x, y, has_y, gamma, mean, var, dx, dgamma, dbeta, eps, P, c0, c1):
    N = x.shape[0]
    lo, hi = c0 * P, c1 * P
    width = hi - lo
    M = np.float32(N * P)
    mu = np.empty(width, dtype=np.float32)
    sum_dy = np.empty(width, dtype=np.float32)
    sum_dy_xc = np.empty(width, dtype=np.float32)
    for c in range(c0, c1):
        _fill(mu, (c - c0) * P, P, mean[c])
    _fill(sum_dy, 0, width, np.float32(0.0))
    _fill(sum_dy_xc, 0, width, np.float32(0.0))
    for n in range(N):
        xr, dyr = x[n, lo:hi], dy[n, lo:hi]
        yr = y[n, lo:hi]
        for j in range(width):
            d = _masked(dyr, yr, has_y, j)
            sum_dy[j] += d
            sum_dy_xc[j] += d * (load(xr[j]) - mu[j])
    # Per-lane coefficients of dx = gamma*invstd/M * (M*dy - sum(dy) - xhat*sum(dy*xhat)).
    k = np.empty(width, dtype=np.float32)
    inv_std = np.empty(width, dtype=np.float32)
    for c in range(c0, c1):
        start = (c - c0) * P
        s_dy = run_sum(sum_dy, start, P)
        istd = _inv_std(var[c], eps)
        s_dy_xhat = run_sum(sum_dy_xc, start, P) * istd
        dgamma[c] = store_value(dgamma, s_dy_xhat)
        dbeta[c] = store_value(dbeta, s_dy)
        _fill(k, start, P, load(gamma[c]) * istd / M)
        _fill(inv_std, start, P, istd)
        _fill(sum_dy, start, P, s_dy)
        _fill(sum_dy_xc, start, P, s_dy_xhat)
    for n in range(N):
        xr, dyr, dxr = x[n, lo:hi], dy[n, lo:hi], dx[n, lo:hi]
        yr = y[n, lo:hi]
        for j in range(width):
            xhat = (load(xr[j]) - mu[j]) * inv_std[j]
            d = _masked(dyr, yr, has_y, j)
            dxr[j] = store_value(dxr, k[j] * (M * d - sum_dy[j] - xhat * sum_dy_xc[j]))


@njit(cache=True)
def _forward_segments(x, gamma, beta, y, mean, var, eps, relu, P, c0, c1):
    # Planes of P >= _SEGMENT_P pixels: each (image, channel) segment is long enough to
    # vectorise on its own, and summing it in registers saves the lane accumulators' traffic.
    N, L = x.shape
    M = np.float32(N * P)
    for c in range(c0, c1):
        lo, hi = c * P, (c + 1) * P
        total = np.float32(0.0)
        for n in range(N):
            total += run_sum(x, n * L + lo, P)
        mu = total / M
        total = np.float32(0.0)
        for n in range(N):
            total += run_sq_dev(x, n * L + lo, P, mu)
        v = total / M
        scale = load(gamma[c]) * _inv_std(v, eps)
        shift = load(beta[c]) - mu * scale
        for n in range(N):
            xr, yr = x[n, lo:hi], y[n, lo:hi]
            for p in range(P):
                out = load(xr[p]) * scale + shift
                yr[p] = store_value(yr, _relu(out) if relu else out)
        mean[c] = mu
        var[c] = v


@njit(cache=True)
def _backward_segments(dy, x, y, has_y, gamma, mean, var, dx, dgamma, dbeta, eps, P, c0, c1):
    N, L = x.shape
    M = np.float32(N * P)
    for c in range(c0, c1):
        lo, hi = c * P, (c + 1) * P
        mu = mean[c]
        inv_std = _inv_std(var[c], eps)
        sum_dy = np.float32(0.0)
        sum_dy_xc = np.float32(0.0)
        for n in range(N):
            s1, s2 = run_grad_sums(dy, x, y, has_y, n * L + lo, P, mu)
            sum_dy += s1
            sum_dy_xc += s2
        sum_dy_xhat = sum_dy_xc * inv_std
        k = load(gamma[c]) * inv_std / M
        for n in range(N):
            xr, dyr, dxr = x[n, lo:hi], dy[n, lo:hi], dx[n, lo:hi]
            yr = y[n, lo:hi]
            for p in range(P):
                xhat = (load(xr[p]) - mu) * inv_std
                d = _masked(dyr, yr, has_y, p)
                dxr[p] = store_value(dxr, k * (M * d - sum_dy - xhat * sum_dy_xhat))
        dgamma[c] = store_value(dgamma, sum_dy_xhat)
        dbeta[c] = store_value(dbeta, sum_dy)


# --- training: parallel over channel blocks --------------------------------------------------
# The prange bodies only call the block functions (not inlined): Numba's parfor passes then work
# on a few lines instead of every loop, which cut these kernels' compile time several-fold.


@njit(parallel=True, cache=True)
def _forward(x, gamma, beta, y, mean, var, eps, relu, P, block):
    C = gamma.shape[0]
    for b in prange((C + block - 1) // block):
        c0, c1 = b * block, min(C, (b + 1) * block)
        if P >= _SEGMENT_P:
            _forward_segments(x, gamma, beta, y, mean, var, eps, relu, P, c0, c1)
        else:
            _forward_lanes(x, gamma, beta, y, mean, var, eps, relu, P, c0, c1)


@njit(parallel=True, cache=True)
def _backward(dy, x, y, has_y, gamma, mean, var, dx, dgamma, dbeta, eps, P, block):
    C = gamma.shape[0]
    for b in prange((C + block - 1) // block):
        c0, c1 = b * block, min(C, (b + 1) * block)
        if P >= _SEGMENT_P:
            _backward_segments(dy, x, y, has_y, gamma, mean, var, dx, dgamma, dbeta, eps, P, c0, c1)
        else:
            _backward_lanes(dy, x, y, has_y, gamma, mean, var, dx, dgamma, dbeta, eps, P, c0, c1)


# --- inference: a per-channel affine map, and its gradient -----------------------------------


@njit(cache=True)
def _affine_rows(x, scale, shift, y, relu, n0, n1):
    for n in range(n0, n1):
        xr, yr = x[n], y[n]
        for j in range(xr.shape[0]):
            out = load(xr[j]) * scale[j] + shift[j]
            yr[j] = store_value(yr, _relu(out) if relu else out)


@njit(parallel=True, cache=True)
def _affine(x, scale, shift, y, relu, rows):
    N = x.shape[0]
    for b in prange((N + rows - 1) // rows):
        _affine_rows(x, scale, shift, y, relu, b * rows, min(N, (b + 1) * rows))


@njit(cache=True)
def _scale_grad_rows(dy, y, has_y, scale, dx, n0, n1):
    for n in range(n0, n1):
        dyr, dxr, yr = dy[n], dx[n], y[n]
        for j in range(dyr.shape[0]):
            dxr[j] = store_value(dxr, _masked(dyr, yr, has_y, j) * scale[j])


@njit(parallel=True, cache=True)
def _scale_grad(dy, y, has_y, scale, dx, rows):
    N = dy.shape[0]
    for b in prange((N + rows - 1) // rows):
        _scale_grad_rows(dy, y, has_y, scale, dx, b * rows, min(N, (b + 1) * rows))


@njit(cache=True)
def _lane_coefficients(gamma, beta, mean, var, eps, P, scale, shift):
    """Per-lane (C*P) scale and shift of the inference map, float32, in the expression order
    of the training forward's coefficients."""
    for c in range(gamma.shape[0]):
        a = load(gamma[c]) * _inv_std(var[c], eps)
        b = load(beta[c]) - mean[c] * a
        for p in range(P):
            scale[c * P + p] = a
            shift[c * P + p] = b


# --- backend entry points (validated, C-contiguous, N >= 1, C >= 1) ---------------------------


def _rows(a, g):
    """(N, C[, H, W]) -> kernel view (N, C*P) of lanes, half as uint16 bits."""
    return bits_view(a).reshape(g.N, g.C * g.P)


def _block(g) -> int:
    """Channels per task: small enough for the block's data to stay in L2, and at least as many
    tasks as threads. Results do not depend on it (see the module docstring)."""
    per_channel = g.N * g.P
    by_cache = max(1, _BLOCK_ELEMS // per_channel)
    by_threads = -(-g.C // numba.config.NUMBA_NUM_THREADS)
    return min(by_cache, by_threads)


def _serial(g) -> bool:
    return g.N * g.C * g.P < _PARALLEL_MIN


def _row_block(g) -> int:
    """Rows per task of the elementwise kernels: a task per thread."""
    return -(-g.N // numba.config.NUMBA_NUM_THREADS)


def batch_norm_forward(x, gamma, beta, g, eps, relu):
    """Backend of :func:`fastconv.batch_norm_forward`: ``(y, mean, var)``."""
    y = np.empty(g.shape, dtype=x.dtype)
    mean = np.empty(g.C, dtype=np.float32)
    var = np.empty(g.C, dtype=np.float32)
    if _serial(g):
        block = _forward_segments if g.P >= _SEGMENT_P else _forward_lanes
        block(_rows(x, g), bits_view(gamma), bits_view(beta), _rows(y, g), mean, var, eps, relu,
              g.P, 0, g.C)  # fmt: skip
        return y, mean, var
    _forward(_rows(x, g), bits_view(gamma), bits_view(beta), _rows(y, g), mean, var, eps, relu,
           g.P, _block(g))  # fmt: skip
    return y, mean, var


def batch_norm_backward(dy, x, gamma, mean, var, g, eps, y):
    """Backend of :func:`fastconv.batch_norm_backward`: ``(dx, dgamma, dbeta)``."""
    dx = np.empty(g.shape, dtype=x.dtype)
    dgamma = np.empty(g.C, dtype=x.dtype)
    dbeta = np.empty(g.C, dtype=x.dtype)
    dyv = _rows(dy, g)
    if _serial(g):
        block = _backward_segments if g.P >= _SEGMENT_P else _backward_lanes
        block(dyv, _rows(x, g), dyv if y is None else _rows(y, g), y is not None,
              bits_view(gamma), mean, var, _rows(dx, g), bits_view(dgamma), bits_view(dbeta), eps,
              g.P, 0, g.C)  # fmt: skip
        return dx, dgamma, dbeta
    _backward(dyv, _rows(x, g), dyv if y is None else _rows(y, g), y is not None, bits_view(gamma),
           mean, var, _rows(dx, g), bits_view(dgamma), bits_view(dbeta), eps, g.P,
           _block(g))  # fmt: skip
    return dx, dgamma, dbeta


def _coefficients(gamma, beta, mean, var, g, eps):
    scale = np.empty(g.C * g.P, dtype=np.float32)
    shift = np.empty_like(scale)
    beta = gamma if beta is None else beta  # shift unused by the caller then
    _lane_coefficients(bits_view(gamma), bits_view(beta), mean, var, eps, g.P, scale, shift)
    return scale, shift


def batch_norm_inference(x, gamma, beta, mean, var, g, eps, relu):
    """Backend of :func:`fastconv.batch_norm_inference`."""
    scale, shift = _coefficients(gamma, beta, mean, var, g, eps)
    y = np.empty(g.shape, dtype=x.dtype)
    if _serial(g):
        _affine_rows(_rows(x, g), scale, shift, _rows(y, g), relu, 0, g.N)
    else:
        _affine(_rows(x, g), scale, shift, _rows(y, g), relu, _row_block(g))
    return y


def batch_norm_inference_backward(dy, gamma, var, g, eps, y):
    """Backend of :func:`fastconv.batch_norm_inference_backward`: ``dy * gamma / sqrt(var+eps)``
    (masked by ``y > 0`` when given)."""
    scale, _ = _coefficients(gamma, None, var, var, g, eps)  # the shift is not needed
    dx = np.empty(g.shape, dtype=dy.dtype)
    dyv = _rows(dy, g)
    yv = dyv if y is None else _rows(y, g)  # any array of dy's shape when there is no y
    if _serial(g):
        _scale_grad_rows(dyv, yv, y is not None, scale, _rows(dx, g), 0, g.N)
    else:
        _scale_grad(dyv, yv, y is not None, scale, _rows(dx, g), _row_block(g))
    return dx


class BatchNormKernels:
    """This module's ops as methods of the CPU kernel set (:class:`fastconv.cpu.CpuKernels`
    inherits them): adding an op here registers it there."""

    batch_norm_forward = staticmethod(batch_norm_forward)
    batch_norm_inference = staticmethod(batch_norm_inference)
    batch_norm_backward = staticmethod(batch_norm_backward)
    batch_norm_inference_backward = staticmethod(batch_norm_inference_backward)
