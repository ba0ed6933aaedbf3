"""This machine's float32 FMA peak, measured from Numba, on 1 and 2 threads (or --threads).

Two numbers per thread count:

* ``fma peak``: independent chains of fused multiply-adds on 16-float vectors, emitted as LLVM
  IR (``llvm.fma.v16f32``) so that nothing but FMAs runs in the loop: the hardware limit
  (2 flops per lane per FMA). 12 chains per thread hide the FMA latency on current x86 cores.
* ``micro-kernel``: fastconv's register-blocked GEMM micro-kernel (:mod:`fastconv.cpu._simd`,
  8 x 32 accumulators) on operands that stay in L1: the best any fastconv product can do.

Usage::

    python -m bench.fma_peak [--threads 1,2] [--seconds 0.5] [--repeats 5]

Reports the best of ``--repeats`` timed runs and the load average. Time is CPU time per
thread (process CPU time / threads): on a machine shared with other busy processes, wall time
measures the share of the cores this process got, CPU time what the cores do while it runs
(``--wall`` for wall time). Used by ``bench/roofline.py`` for the roofline in docs/kernels.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

import fastconv.cpu  # noqa: E402,F401  (threading layer first)
from fastconv.cpu._simd import MR, NR, gemm_block  # noqa: E402

LANES, CHAINS = 16, 12


@intrinsic
def _fma_chains(typingctx, n, seed):
    """n iterations of CHAINS independent vector FMAs; returns a lane of their sum."""

    def codegen(context, builder, signature, args):
        n, seed = args
        vty = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{LANES}f32"
        )
        seed_v = builder.insert_element(
            ir.Constant(vty, [1.0] * LANES), seed, ir.Constant(ir.IntType(32), 0)
        )
        slots = []
        for k in range(CHAINS):
            slot = cgutils.alloca_once(builder, vty)
            builder.store(builder.fmul(ir.Constant(vty, [1.0 + 1e-3 * k] * LANES), seed_v), slot)
            slots.append(slot)
        a = ir.Constant(vty, [0.999999] * LANES)
        b = ir.Constant(vty, [1e-7] * LANES)
        with cgutils.for_range(builder, n):
            for slot in slots:
                builder.store(builder.call(fma, [builder.load(slot), a, b]), slot)
        total = builder.load(slots[0])
        for slot in slots[1:]:
            total = builder.fadd(total, builder.load(slot))
        return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))

    return types.float32(types.int64, types.float32), codegen


@njit(parallel=True)
def _fma_kernel(n, out):
    for t in prange(out.size):
        out[t] = _fma_chains(n, np.float32(1.0 + t))


@njit
def _micro_loop(a, b, c, k, reps):
    for _ in range(reps):
        gemm_block(a, 0, k, b, 0, NR, k, c, 0, NR, False)


@njit(parallel=True)
def _micro_kernel(a, b, c, k, reps):
    for t in prange(a.shape[0]):
        _micro_loop(a[t], b[t], c[t], k, reps)


_USE_WALL = False


def _elapsed(t0, threads):
    if _USE_WALL:
        return time.perf_counter() - t0[0]
    return (time.process_time() - t0[1]) / threads


def _now():
    return time.perf_counter(), time.process_time()


def _best(run, repeats):
    best = 0.0
    for _ in range(repeats):
        best = max(best, run())
    return best


def fma_peak(threads, seconds=0.5, repeats=5):
    """GFLOP/s of pure vector FMAs on ``threads`` threads (best of ``repeats`` runs)."""
    out = np.zeros(threads, np.float32)
    _fma_kernel(10, out)
    n = 1_000_000
    t0 = time.perf_counter()
    _fma_kernel(n, out)
    n = max(n, int(n * seconds / max(time.perf_counter() - t0, 1e-6)))

    def run():
        t0 = _now()
        _fma_kernel(n, out)
        return threads * n * CHAINS * LANES * 2 / _elapsed(t0, threads) / 1e9

    return _best(run, repeats)


def micro_kernel_rate(threads, seconds=0.5, repeats=5, k=64):
    """GFLOP/s of the 8 x 32 GEMM micro-kernel with L1-resident operands."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((threads, MR * k)).astype(np.float32)
    b = rng.standard_normal((threads, k * NR)).astype(np.float32)
    c = np.zeros((threads, MR * NR), np.float32)
    _micro_kernel(a, b, c, k, 10)
    reps = 10_000
    t0 = time.perf_counter()
    _micro_kernel(a, b, c, k, reps)
    reps = max(reps, int(reps * seconds / max(time.perf_counter() - t0, 1e-6)))

    def run():
        t0 = _now()
        _micro_kernel(a, b, c, k, reps)
        return threads * reps * 2 * MR * NR * k / _elapsed(t0, threads) / 1e9

    return _best(run, repeats)


def measure(thread_counts=(1, 2), seconds=0.5, repeats=5):
    """``{threads: (fma_peak, micro_kernel)}`` in GFLOP/s."""
    return {
        t: (fma_peak(t, seconds, repeats), micro_kernel_rate(t, seconds, repeats))
        for t in thread_counts
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best is kept")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args(argv)
    global _USE_WALL
    _USE_WALL = args.wall
    counts = [int(t) for t in args.threads.split(",")]
    if max(counts) > numba.config.NUMBA_NUM_THREADS:
        parser.error(f"at most {numba.config.NUMBA_NUM_THREADS} threads here")
    numba.set_num_threads(max(counts))
    print(f"Numba {numba.__version__}, threading layer {numba.threading_layer()}")
    for t, (peak, micro) in measure(counts, args.seconds, args.repeats).items():
        print(
            f"{t} thread(s): FMA peak {peak:6.1f} GFLOP/s, "
            f"GEMM micro-kernel {micro:6.1f} GFLOP/s ({micro / peak:.0%} of peak)"
        )
    clock = "wall time" if args.wall else "CPU time per thread"
    print(f"{clock}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
