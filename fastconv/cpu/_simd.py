"""Explicit-SIMD building blocks written in LLVM IR (through ``numba.extending.intrinsic``).

Plain Numba loops leave two things to LLVM's auto-vectoriser that it does badly here:

* a register-blocked GEMM micro-kernel (accumulators held in vector registers across the whole
  reduction): Numba arrays live in memory and LLVM does not promote them, so the plain
  kernels of :mod:`._gemm` stream their accumulator rows through L1 on every step;
* element-wise small-matrix transforms over many streams at run-time offsets (Winograd's
  ``B^T d B``, ``A^T m A``): with a dozen streams LLVM gives up on the run-time alias checks.

Both are written here as IR over ``<16 x float>`` vectors, which LLVM lowers to whatever the
machine has (one AVX-512 register, two AVX registers, four SSE registers). Arithmetic is
explicit and in a fixed order (no fast-math flags), so results do not depend on how a loop is
split into vectors: every lane computes the same IEEE operations, and NaN/inf propagate.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "LANES",
    "MR",
    "NR",
    "make_apply",
    "make_program",
    "gemm_block",
    "gemm_block16",
    "gemm_packed",
    "gemm_row_panels1",
    "gemm_row_panels2",
    "copy_row",
    "copy_block",
    "run_sum",
    "run_sq_dev",
    "run_grad_sums",
    "fetch_add",
    "load_transposed",
    "store_transposed",
]

LANES = 16  # floats per vector
MR = 8  # rows of C per micro-kernel call
NR = 2 * LANES  # columns of C per micro-kernel call

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VTY = ir.VectorType(_F32, LANES)
_MASK = ir.VectorType(ir.IntType(1), LANES)
_IVEC = ir.VectorType(_I32, LANES)


def _data(context, builder, aty, a):
    """Data pointer of a Numba array value."""
    return context.make_array(aty)(context, builder, a).data


def _function(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _splat(builder, value, vty=_VTY, ity=_I32):
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ity, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(vec, ir.Constant(vty, ir.Undefined), zeros)


def _vector_at(builder, row, pos):
    return builder.bitcast(builder.gep(row, [pos]), _VTY.as_pointer())


class _Ops:
    """Vector arithmetic for stream programs: explicit IEEE operations in the order written."""

    def __init__(self, builder):
        self._b = builder
        self._fma = _function(builder, "llvm.fma.v16f32", _VTY, [_VTY] * 3)

    @staticmethod
    def _const(c):
        return ir.Constant(_VTY, [float(c)] * LANES)

    def add(self, a, b):
        return self._b.fadd(a, b)

    def sub(self, a, b):
        return self._b.fsub(a, b)

    def neg(self, a):
        return self._b.fneg(a)

    def scale(self, c, a):
        return self._b.fmul(self._const(c), a)

    def fma(self, c, a, b):
        """c * a + b with one rounding."""
        return self._b.call(self._fma, [self._const(c), a, b])


def make_program(n_in, n_out, program, used=None):
    """An intrinsic ``apply(src, soffs, dst, doffs, length)``: for every p in [0, length),
    ``dst[doffs[i] + p] = program(ins)[i]`` with ``ins[j] = src[soffs[j] + p]``.

    ``program(ops, ins)`` builds the outputs from the input vectors with :class:`_Ops`
    (inputs not in ``used`` are not loaded and are None). ``src``/``dst`` are float32 arrays,
    ``soffs``/``doffs`` int64 arrays of element offsets of the input and output streams. The
    last ``length % LANES`` positions use masked loads and stores, so nothing outside the
    streams is read or written.
    """
    used = [True] * n_in if used is None else list(used)

    @intrinsic
    def apply(typingctx, src, soffs, dst, doffs, length):
        sig = types.void(src, soffs, dst, doffs, length)

        def codegen(context, builder, signature, args):
            src, soffs, dst, doffs, length = args
            sty, oty, dty, doty, _ = signature.args
            s_ptr, d_ptr = _data(context, builder, sty, src), _data(context, builder, dty, dst)
            so, do = _data(context, builder, oty, soffs), _data(context, builder, doty, doffs)

            def row(base, offs, k):
                return builder.gep(base, [builder.load(builder.gep(offs, [ir.Constant(_I64, k)]))])

            s_rows = [row(s_ptr, so, j) if used[j] else None for j in range(n_in)]
            d_rows = [row(d_ptr, do, i) for i in range(n_out)]
            vptr = _VTY.as_pointer()
            mload = _function(
                builder, "llvm.masked.load.v16f32.p0", _VTY, [vptr, _I32, _MASK, _VTY]
            )
            mstore = _function(
                builder, "llvm.masked.store.v16f32.p0", ir.VoidType(), [_VTY, vptr, _I32, _MASK]
            )
            align = ir.Constant(_I32, 4)
            ops = _Ops(builder)

            def body(pos, mask):
                ins = [None] * n_in
                for j in range(n_in):
                    if used[j]:
                        p = _vector_at(builder, s_rows[j], pos)
                        ins[j] = (
                            builder.load(p, align=4)
                            if mask is None
                            else builder.call(mload, [p, align, mask, ir.Constant(_VTY, None)])
                        )
                outs = program(ops, ins)
                for i in range(n_out):
                    p = _vector_at(builder, d_rows[i], pos)
                    if mask is None:
                        builder.store(outs[i], p, align=4)
                    else:
                        builder.call(mstore, [outs[i], p, align, mask])

            lanes = ir.Constant(_I64, LANES)
            full = builder.mul(builder.sdiv(length, lanes), lanes)
            with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), full, lanes) as (pos, _):
                body(pos, None)
            rest = builder.sub(length, full)
            with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(_I64, 0))):
                index = ir.Constant(_IVEC, list(range(LANES)))
                mask = builder.icmp_unsigned(
                    "<", index, _splat(builder, builder.trunc(rest, _I32), _IVEC, _I32)
                )
                body(full, mask)
            return context.get_dummy_value()

        return sig, codegen

    return apply


def make_apply(matrix):
    """:func:`make_program` for ``out[i] = sum_j matrix[i][j] * in[j]``: terms added in
    ascending ``j``; coefficients +-1 are an add or a subtract, others a multiply then an add
    (no contraction), zero coefficients skipped."""
    mat = [[float(v) for v in row] for row in matrix]
    n_out, n_in = len(mat), len(mat[0])
    used = [any(mat[i][j] != 0.0 for i in range(n_out)) for j in range(n_in)]

    def program(ops, ins):
        outs = []
        for i in range(n_out):
            acc = None
            for j in range(n_in):
                c = mat[i][j]
                if c == 0.0:
                    continue
                v = ins[j] if abs(c) == 1.0 else ops.scale(c, ins[j])
                if acc is None:
                    acc = ops.neg(v) if c == -1.0 else v
                else:
                    acc = ops.sub(acc, v) if c == -1.0 else ops.add(acc, v)
            outs.append(ops.scale(0.0, ins[0]) if acc is None else acc)
        return outs

    return make_program(n_in, n_out, program, used)


def _make_gemm_block(nv):
    """The micro-kernel for NR = nv * LANES columns (see :func:`gemm_block`)."""

    @intrinsic
    def block(typingctx, a, a_off, lda, b, b_off, ldb, k, c, c_off, ldc, accumulate):
        sig = types.void(a, a_off, lda, b, b_off, ldb, k, c, c_off, ldc, accumulate)
        return sig, _gemm_block_codegen(nv)

    return block


def _gemm_block_codegen(nv):
    def codegen(context, builder, signature, args):
        a, a_off, lda, b, b_off, ldb, k, c, c_off, ldc, accumulate = args
        aty, bty, cty = signature.args[0], signature.args[3], signature.args[7]
        a_ptr = _data(context, builder, aty, a)
        b_ptr = _data(context, builder, bty, b)
        c_rows = _c_rows(builder, _data(context, builder, cty, c), c_off, ldc, MR)
        a_rows = _c_rows(builder, a_ptr, a_off, lda, MR)  # (the same address arithmetic)
        _register_tile(
            builder, MR, nv, c_rows, accumulate, k,
            lambda kk, r: builder.gep(a_rows[r], [kk]),
            lambda kk: builder.gep(b_ptr, [builder.add(b_off, builder.mul(kk, ldb))]),
        )  # fmt: skip
        return context.get_dummy_value()

    return codegen


def _make_gemm_packed(mr, nv):
    """The packed-operand micro-kernel for ``mr`` rows x ``nv * LANES`` columns."""

    @intrinsic
    def block(typingctx, ap, a_off, bp, b_off, k, c, c_off, ldc, accumulate):
        sig = types.void(ap, a_off, bp, b_off, k, c, c_off, ldc, accumulate)
        return sig, _gemm_packed_codegen(mr, nv)

    return block


def _register_tile(builder, mr, nv, c_rows, accumulate, k, a_at, b_row_at, b_vector_at=None):
    """The body every GEMM micro-kernel shares: ``mr x nv`` vector accumulators loaded from
    the C rows (``accumulate``) or zero, ``acc = fma(A[r, kk], B[kk, :], acc)`` for kk < k in
    ascending order (``a_at(kk, r)``: the address of A[r, kk], ``b_row_at(kk)``: of B's row
    kk, whose vector j lies ``j * LANES`` further unless ``b_vector_at(b_row, j)`` says where),
    stored back."""
    fma = _function(builder, "llvm.fma.v16f32", _VTY, [_VTY] * 3)

    def const(v):
        return ir.Constant(_I64, v)

    acc = [[cgutils.alloca_once(builder, _VTY) for _ in range(nv)] for _ in range(mr)]
    with builder.if_else(cgutils.as_bool_bit(builder, accumulate)) as (load_c, zero_c):
        with load_c:
            for r in range(mr):
                for j in range(nv):
                    v = builder.load(_vector_at(builder, c_rows[r], const(j * LANES)), align=4)
                    builder.store(v, acc[r][j])
        with zero_c:
            for r in range(mr):
                for j in range(nv):
                    builder.store(ir.Constant(_VTY, None), acc[r][j])
    with cgutils.for_range(builder, k) as loop:
        kk = loop.index
        b_row = b_row_at(kk)
        at = b_vector_at or (lambda row, j: _vector_at(builder, row, const(j * LANES)))
        bv = [builder.load(at(b_row, j), align=4) for j in range(nv)]
        for r in range(mr):
            av = _splat(builder, builder.load(a_at(kk, r)))
            for j in range(nv):
                builder.store(builder.call(fma, [av, bv[j], builder.load(acc[r][j])]), acc[r][j])
    for r in range(mr):
        for j in range(nv):
            p = _vector_at(builder, c_rows[r], const(j * LANES))
            builder.store(builder.load(acc[r][j]), p, align=4)


def _i64(v):
    return ir.Constant(_I64, v)


def _c_rows(builder, c_ptr, c_off, ldc, mr):
    return [
        builder.gep(c_ptr, [builder.add(c_off, builder.mul(ir.Constant(_I64, r), ldc))])
        for r in range(mr)
    ]


def _gemm_packed_codegen(mr, nv):
    nr = nv * LANES

    def codegen(context, builder, signature, args):
        ap, a_off, bp, b_off, k, c, c_off, ldc, accumulate = args
        aty, bty, cty = signature.args[0], signature.args[2], signature.args[5]
        a_ptr = builder.gep(_data(context, builder, aty, ap), [a_off])
        b_ptr = builder.gep(_data(context, builder, bty, bp), [b_off])
        c_rows = _c_rows(builder, _data(context, builder, cty, c), c_off, ldc, mr)
        _register_tile(
            builder, mr, nv, c_rows, accumulate, k,
            lambda kk, r: builder.gep(a_ptr, [builder.add(builder.mul(kk, _i64(mr)), _i64(r))]),
            lambda kk: builder.gep(b_ptr, [builder.mul(kk, _i64(nr))]),
        )  # fmt: skip
        return context.get_dummy_value()

    return codegen


def _make_gemm_row_panels(panels):
    """The one-row micro-kernel over ``panels`` packed B panels side by side (see
    :func:`gemm_row_panels2`)."""

    @intrinsic
    def block(typingctx, a, a_off, bp, b_off, panel_stride, k, c, c_off):
        sig = types.void(a, a_off, bp, b_off, panel_stride, k, c, c_off)
        return sig, _gemm_row_panels_codegen(panels)

    return block


def _gemm_row_panels_codegen(panels):
    per_panel = NR // LANES

    def codegen(context, builder, signature, args):
        a, a_off, bp, b_off, panel_stride, k, c, c_off = args
        aty, bty, cty = signature.args[0], signature.args[2], signature.args[6]
        a_ptr = builder.gep(_data(context, builder, aty, a), [a_off])
        b_ptr = builder.gep(_data(context, builder, bty, bp), [b_off])
        c_row = builder.gep(_data(context, builder, cty, c), [c_off])

        def b_vector_at(row, j):
            pos = builder.add(builder.mul(panel_stride, _i64(j // per_panel)),
                              _i64(j % per_panel * LANES))  # fmt: skip
            return _vector_at(builder, row, pos)

        _register_tile(
            builder, 1, panels * per_panel, [c_row], cgutils.false_bit, k,
            lambda kk, r: builder.gep(a_ptr, [kk]),
            lambda kk: builder.gep(b_ptr, [builder.mul(kk, _i64(NR))]),
            b_vector_at,
        )  # fmt: skip
        return context.get_dummy_value()

    return codegen


def _make_gemm_rows(mr, nv):
    """The micro-kernel for ``mr`` packed rows of A and B rows read in place (offsets)."""

    @intrinsic
    def block(typingctx, ap, a_off, src, offsets, o_off, j0, k, c, c_off, ldc, accumulate):
        sig = types.void(ap, a_off, src, offsets, o_off, j0, k, c, c_off, ldc, accumulate)
        return sig, _gemm_rows_codegen(mr, nv)

    return block


def _gemm_rows_codegen(mr, nv):
    def codegen(context, builder, signature, args):
        ap, a_off, src, offsets, o_off, j0, k, c, c_off, ldc, accumulate = args
        aty, sty, oty, cty = (signature.args[i] for i in (0, 2, 3, 7))
        a_ptr = builder.gep(_data(context, builder, aty, ap), [a_off])
        s_ptr = builder.gep(_data(context, builder, sty, src), [j0])
        o_ptr = builder.gep(_data(context, builder, oty, offsets), [o_off])
        c_rows = _c_rows(builder, _data(context, builder, cty, c), c_off, ldc, mr)
        _register_tile(
            builder, mr, nv, c_rows, accumulate, k,
            lambda kk, r: builder.gep(a_ptr, [builder.add(builder.mul(kk, _i64(mr)), _i64(r))]),
            lambda kk: builder.gep(s_ptr, [builder.load(builder.gep(o_ptr, [kk]))]),
        )  # fmt: skip
        return context.get_dummy_value()

    return codegen


gemm_block = _make_gemm_block(NR // LANES)
gemm_block.__doc__ = """C[MR x NR] (+)= A[MR x k] @ B[k x NR], float32, accumulated in registers.

``A`` rows at ``a[a_off + r*lda + kk]``; ``B`` row ``kk`` at ``b[b_off + kk*ldb :][:NR]``;
``C`` row ``r`` at ``c[c_off + r*ldc :][:NR]``. With ``accumulate`` False the block starts
from zero instead of C. One fused multiply-add per term, in ascending ``kk``. The caller
guarantees that every row read or written holds NR values. Signature
``gemm_block(a, a_off, lda, b, b_off, ldb, k, c, c_off, ldc, accumulate)``.
"""
gemm_block16 = _make_gemm_block(1)
gemm_block16.__doc__ = "As :func:`gemm_block` for NR = LANES (16) columns."
gemm_packed = _make_gemm_packed(MR, NR // LANES)
gemm_packed.__doc__ = """C[MR x NR] (+)= A @ B from packed panels, float32 (registers).

``A[r, kk]`` at ``ap[a_off + kk*MR + r]`` (an MR-row panel, column after column), ``B[kk, j]``
at ``bp[b_off + kk*NR + j]`` (an NR-column panel, row after row), ``C`` row
``r`` at ``c[c_off + r*ldc :][:NR]``. With ``accumulate`` C is loaded first and the chain goes
on from it, so splitting k into blocks gives the same bits as one call: every element is the
chain ``acc = fma(A[r, kk], B[kk, j], acc)`` over ascending ``kk``. Signature
``gemm_packed(ap, a_off, bp, b_off, k, c, c_off, ldc, accumulate)``.
"""

gemm_row_panels2 = _make_gemm_row_panels(2)
gemm_row_panels2.__doc__ = """C[1 x 2*NR] = a[1 x k] @ B over two packed NR-column panels, float32.

The product of one row with two panels side by side: ``a[kk]`` at ``a[a_off + kk]`` (a
row read in place, float32), ``B[kk, j]`` of panel ``p`` at ``bp[b_off + p*panel_stride +
kk*NR + j]``, ``C`` at ``c[c_off :][:2*NR]``, from zero. Each element is the chain
``acc = fma(a[kk], B[kk, j], acc)`` over ascending ``kk``: the bits of
:func:`gemm_packed`'s for that row. One row has one chain per column, so the latency of the
FMA bounds it, not the loads: the two panels give four independent chains where one panel
gives two (a batch-1 Dense layer). Signature ``gemm_row_panels2(a, a_off, bp, b_off,
panel_stride, k, c, c_off)``.
"""
gemm_row_panels1 = _make_gemm_row_panels(1)
gemm_row_panels1.__doc__ = "As :func:`gemm_row_panels2` over one panel (``panel_stride`` unused)."


# --- 16 x 16 transposes between image-major and image-innermost layouts -------------------------

_LIMIT = float(2.0**50)  # keep in step with _winograd.LIMIT


def _lane_mask(builder, count):
    """<16 x i1>: lanes below ``count`` (an i64)."""
    index = ir.Constant(_IVEC, list(range(LANES)))
    return builder.icmp_unsigned(
        "<", index, _splat(builder, builder.trunc(count, _I32), _IVEC, _I32)
    )


def _transpose16(builder, rows):
    """Transpose 16 <16 x float> rows (butterfly exchange of off-diagonal blocks, 64 shuffles)."""
    rows = list(rows)
    for s in (8, 4, 2, 1):
        lo = ir.Constant(_IVEC, [l if not l & s else LANES + l - s for l in range(LANES)])
        hi = ir.Constant(_IVEC, [l + s if not l & s else LANES + l for l in range(LANES)])
        for r in range(LANES):
            if r & s:
                continue
            a, b = rows[r], rows[r + s]
            rows[r], rows[r + s] = (
                builder.shuffle_vector(a, b, lo),
                builder.shuffle_vector(a, b, hi),
            )
    return rows


def _is_half(aty):
    return aty.dtype == types.uint16


def _masked_load(builder, aty, ptr, mask):
    """<16 x float> from a float32 or half-bits (uint16) array element pointer, masked."""
    align = ir.Constant(_I32, 2 if _is_half(aty) else 4)
    if _is_half(aty):
        ity = ir.VectorType(ir.IntType(16), LANES)
        fn = _function(
            builder, "llvm.masked.load.v16i16.p0", ity, [ity.as_pointer(), _I32, _MASK, ity]
        )
        bits = builder.call(
            fn, [builder.bitcast(ptr, ity.as_pointer()), align, mask, ir.Constant(ity, None)]
        )
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), LANES)), _VTY)
    fn = _function(
        builder, "llvm.masked.load.v16f32.p0", _VTY, [_VTY.as_pointer(), _I32, _MASK, _VTY]
    )
    return builder.call(
        fn, [builder.bitcast(ptr, _VTY.as_pointer()), align, mask, ir.Constant(_VTY, None)]
    )


def _masked_store(builder, aty, value, ptr, mask):
    """Store <16 x float> into a float32 or half-bits array (rounded to nearest even), masked."""
    if _is_half(aty):
        ity = ir.VectorType(ir.IntType(16), LANES)
        fn = _function(
            builder,
            "llvm.masked.store.v16i16.p0",
            ir.VoidType(),
            [ity, ity.as_pointer(), _I32, _MASK],
        )
        bits = builder.bitcast(builder.fptrunc(value, ir.VectorType(ir.HalfType(), LANES)), ity)
        builder.call(fn, [bits, builder.bitcast(ptr, ity.as_pointer()), ir.Constant(_I32, 2), mask])
        return
    fn = _function(
        builder,
        "llvm.masked.store.v16f32.p0",
        ir.VoidType(),
        [_VTY, _VTY.as_pointer(), _I32, _MASK],
    )
    builder.call(fn, [value, builder.bitcast(ptr, _VTY.as_pointer()), ir.Constant(_I32, 4), mask])


@intrinsic
def fetch_add(typingctx, counter, value):
    """Atomically add ``value`` to ``counter[0]`` (an int64 array) and return the old value:
    threads taking work items from a shared counter (dynamic scheduling)."""
    sig = types.int64(counter, value)

    def codegen(context, builder, signature, args):
        counter, value = args
        ptr = _data(context, builder, signature.args[0], counter)
        return builder.atomic_rmw("add", ptr, value, "seq_cst")

    return sig, codegen


@intrinsic
def copy_row(typingctx, src, s_off, dst, d_off, n):
    """``dst[d_off + p] = float(src[s_off + p])`` for p < n: a float32 or half-bits (uint16)
    source of any dimension (flat offsets into its data), a float32 destination. Whole
    vectors, then one masked vector for the last ``n % 16`` values."""
    sig = types.void(src, s_off, dst, d_off, n)

    def codegen(context, builder, signature, args):
        src, s_off, dst, d_off, n = args
        sty, dty = signature.args[0], signature.args[2]
        s_ptr = builder.gep(_data(context, builder, sty, src), [s_off])
        d_ptr = builder.gep(_data(context, builder, dty, dst), [d_off])
        lanes = ir.Constant(_I64, LANES)
        full = builder.mul(builder.sdiv(n, lanes), lanes)
        all_lanes = ir.Constant(_MASK, [1] * LANES)
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), full, lanes) as (pos, _):
            v = _masked_load(builder, sty, builder.gep(s_ptr, [pos]), all_lanes)
            builder.store(v, _vector_at(builder, d_ptr, pos), align=4)
        rest = builder.sub(n, full)
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(_I64, 0))):
            mask = _lane_mask(builder, rest)
            v = _masked_load(builder, sty, builder.gep(s_ptr, [full]), mask)
            _masked_store(builder, dty, v, builder.gep(d_ptr, [full]), mask)
        return context.get_dummy_value()

    return sig, codegen


# --- reductions in a fixed order -------------------------------------------------------------
# A sum left to LLVM under fast-math "reassoc" is vectorised however its cost model decides that
# day: measured, the batch norm statistics of one Numba build (a fresh compile) and of another
# (the same source loaded from Numba's cache, where the callee was inlined into the parallel
# kernel before object emission) differed by an ulp in some variances, so a model's results
# depended on whether the cache was warm. These sums fix the order instead: lane l of one
# <16 x float> accumulator adds elements l, l + 16, l + 32, ... in turn, a masked vector takes
# the last n % 16, and the 16 lanes are added as a tree (8 + 8, 4 + 4, 2 + 2, 1 + 1).


def _hsum(builder, v):
    """Lanes of a <16 x float> added as a fixed tree: the same bits wherever it is compiled."""
    width = LANES
    while width > 1:
        width //= 2
        halves = (list(range(width)), list(range(width, 2 * width)))
        lo, hi = (
            builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), half))
            for half in halves
        )
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _reduce_runs(builder, n, body, count):
    """``count`` fixed-order sums over positions 0..n-1: ``body(pos, mask)`` returns one
    <16 x float> term per sum for the 16 positions from ``pos`` (lanes off ``mask`` zero)."""
    zero = ir.Constant(_VTY, None)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(count)]
    lanes = ir.Constant(_I64, LANES)
    full = builder.mul(builder.sdiv(n, lanes), lanes)
    all_lanes = ir.Constant(_MASK, [1] * LANES)

    def add(terms):
        for acc, term in zip(accs, terms, strict=True):
            builder.store(builder.fadd(builder.load(acc), term), acc)

    with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), full, lanes) as (pos, _):
        add(body(pos, all_lanes))
    rest = builder.sub(n, full)
    with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(_I64, 0))):
        mask = _lane_mask(builder, rest)
        add([builder.select(mask, t, zero) for t in body(full, mask)])
    return [_hsum(builder, builder.load(acc)) for acc in accs]


def _run_pointer(context, builder, aty, a, off):
    return builder.gep(_data(context, builder, aty, a), [off])


@intrinsic
def run_sum(typingctx, src, off, n):
    """``sum(src[off:off + n])`` in float32 (float32 or half-bits source), in the fixed order
    described above."""
    sig = types.float32(src, off, n)

    def codegen(context, builder, signature, args):
        src, off, n = args
        sty = signature.args[0]
        ptr = _run_pointer(context, builder, sty, src, off)

        def body(pos, mask):
            return [_masked_load(builder, sty, builder.gep(ptr, [pos]), mask)]

        return _reduce_runs(builder, n, body, 1)[0]

    return sig, codegen


@intrinsic
def run_sq_dev(typingctx, src, off, n, mu):
    """``sum((src[off:off + n] - mu)**2)`` in float32 (a subtraction, a multiplication and an
    addition per element, each rounded: no fused multiply-add), in the fixed order."""
    sig = types.float32(src, off, n, types.float32)

    def codegen(context, builder, signature, args):
        src, off, n, mu = args
        sty = signature.args[0]
        ptr = _run_pointer(context, builder, sty, src, off)
        mu_v = _splat(builder, mu)

        def body(pos, mask):
            d = builder.fsub(_masked_load(builder, sty, builder.gep(ptr, [pos]), mask), mu_v)
            return [builder.fmul(d, d)]

        return _reduce_runs(builder, n, body, 1)[0]

    return sig, codegen


@intrinsic
def run_grad_sums(typingctx, dy, x, y, has_y, off, n, mu):
    """``(sum(d), sum(d * (x - mu)))`` over ``off:off + n`` with ``d = dy * (y > 0 ? 1 : 0)``
    when ``has_y`` (a fused ReLU: NaN and inf in dy still propagate), else ``d = dy``; each
    operation rounded to float32, both sums in the fixed order."""
    sig = types.UniTuple(types.float32, 2)(dy, x, y, has_y, off, n, types.float32)

    def codegen(context, builder, signature, args):
        dy, x, y, has_y, off, n, mu = args
        dty, xty, yty = signature.args[:3]
        dy_p = _run_pointer(context, builder, dty, dy, off)
        x_p = _run_pointer(context, builder, xty, x, off)
        y_p = _run_pointer(context, builder, yty, y, off)
        mu_v = _splat(builder, mu)
        one = ir.Constant(_VTY, [1.0] * LANES)
        zero = ir.Constant(_VTY, None)
        flag = builder.icmp_unsigned("!=", has_y, ir.Constant(has_y.type, 0))

        def body(pos, mask):
            d = _masked_load(builder, dty, builder.gep(dy_p, [pos]), mask)
            # y is read only when the forward fused a ReLU (it may be a dummy otherwise)
            y_mask = builder.and_(mask, _splat_bool(builder, flag))
            yv = _masked_load(builder, yty, builder.gep(y_p, [pos]), y_mask)
            gate = builder.select(builder.fcmp_ordered(">", yv, zero), one, zero)
            d = builder.select(flag, builder.fmul(d, gate), d)
            xc = builder.fsub(_masked_load(builder, xty, builder.gep(x_p, [pos]), mask), mu_v)
            return [d, builder.fmul(d, xc)]

        s1, s2 = _reduce_runs(builder, n, body, 2)
        return context.make_tuple(builder, signature.return_type, [s1, s2])

    return sig, codegen


@intrinsic
def copy_block(typingctx, src, s_off, s_stride, dst, d_off, d_stride, rows, cols):
    """``dst[d_off + r*d_stride + c] = float(src[s_off + r*s_stride + c])`` for r < rows,
    c < cols <= 16: one masked vector per row, the mask made once (a loop of :func:`copy_row`
    calls measured ~40 cycles per 8-value row)."""
    sig = types.void(src, s_off, s_stride, dst, d_off, d_stride, rows, cols)

    def codegen(context, builder, signature, args):
        src, s_off, s_stride, dst, d_off, d_stride, rows, cols = args
        sty, dty = signature.args[0], signature.args[3]
        s_ptr = builder.gep(_data(context, builder, sty, src), [s_off])
        d_ptr = builder.gep(_data(context, builder, dty, dst), [d_off])
        mask = _lane_mask(builder, cols)
        with cgutils.for_range(builder, rows) as loop:
            r = loop.index
            v = _masked_load(builder, sty, builder.gep(s_ptr, [builder.mul(r, s_stride)]), mask)
            _masked_store(builder, dty, v, builder.gep(d_ptr, [builder.mul(r, d_stride)]), mask)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load_transposed(typingctx, src, s_off, s_stride, rows, cols, dst, d_base, d_offs, d_idx):
    """Gather a block into image-innermost order: for r < rows, c < cols,

        dst[d_base + d_offs[d_idx + c] + r] = src[s_off + r*s_stride + c]

    (``src`` float32 or half bits, ``dst`` float32; rows, cols <= 16). Returns how many of
    the copied values are not finite or not below 2**50 (see ``_winograd.LIMIT``).
    """
    sig = types.int64(src, s_off, s_stride, rows, cols, dst, d_base, d_offs, d_idx)

    def codegen(context, builder, signature, args):
        src, s_off, s_stride, rows, cols, dst, d_base, d_offs, d_idx = args
        sty, dty, oty = signature.args[0], signature.args[5], signature.args[7]
        s_ptr = _data(context, builder, sty, src)
        d_ptr = _data(context, builder, dty, dst)
        o_ptr = _data(context, builder, oty, d_offs)
        col_mask = _lane_mask(builder, cols)
        row_mask = _lane_mask(builder, rows)
        fabs = _function(builder, "llvm.fabs.v16f32", _VTY, [_VTY])
        ctpop = _function(builder, "llvm.ctpop.i16", ir.IntType(16), [ir.IntType(16)])
        limit = ir.Constant(_VTY, [_LIMIT] * LANES)
        zero = ir.Constant(_VTY, None)
        vecs = []
        bad = ir.Constant(_I64, 0)
        for r in range(LANES):
            ok_row = builder.icmp_signed("<", ir.Constant(_I64, r), rows)
            mask = builder.select(ok_row, col_mask, ir.Constant(_MASK, None))
            # Rows past ``rows`` load nothing, but from row 0's address: a masked load whose
            # masked-off lanes fall on an unmapped page needs a microcode assist (measured
            # ~15x slower copies when the last image block was partial).
            row = builder.select(ok_row, ir.Constant(_I64, r), ir.Constant(_I64, 0))
            off = builder.add(s_off, builder.mul(row, s_stride))
            v = _masked_load(builder, sty, builder.gep(s_ptr, [off]), mask)
            good = builder.fcmp_ordered("<", builder.call(fabs, [v]), limit)
            flagged = builder.and_(builder.not_(good), mask)
            count = builder.call(ctpop, [builder.bitcast(flagged, ir.IntType(16))])
            bad = builder.add(bad, builder.zext(count, _I64))
            vecs.append(builder.select(mask, v, zero))
        cols_t = _transpose16(builder, vecs)
        for c in range(LANES):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, c), cols)):
                off = builder.load(builder.gep(o_ptr, [builder.add(d_idx, ir.Constant(_I64, c))]))
                ptr = builder.gep(d_ptr, [builder.add(d_base, off)])
                _masked_store(builder, dty, cols_t[c], ptr, row_mask)
        return bad

    return sig, codegen


@intrinsic
def store_transposed(
    typingctx, src, s_base, s_offs, s_idx, rows, cols, bias, relu, dst, d_off, d_stride
):
    """Scatter a block back to image-major order, adding ``bias`` (a float32) and applying
    ReLU (NaN kept) on the way: for r < rows, c < cols,

        dst[d_off + c*d_stride + r] = act(src[s_base + s_offs[s_idx + r] + c] + bias)

    (``src`` float32, ``dst`` float32 or half bits, rounded to nearest even; rows, cols <= 16).
    """
    sig = types.void(src, s_base, s_offs, s_idx, rows, cols, bias, relu, dst, d_off, d_stride)

    def codegen(context, builder, signature, args):
        src, s_base, s_offs, s_idx, rows, cols, bias, relu, dst, d_off, d_stride = args
        sty, oty, dty = signature.args[0], signature.args[2], signature.args[8]
        s_ptr = _data(context, builder, sty, src)
        o_ptr = _data(context, builder, oty, s_offs)
        d_ptr = _data(context, builder, dty, dst)
        col_mask = _lane_mask(builder, cols)
        row_mask = _lane_mask(builder, rows)
        zero = ir.Constant(_VTY, None)
        bias_v = _splat(builder, bias)
        use_relu = cgutils.as_bool_bit(builder, relu)
        vecs = []
        for r in range(LANES):
            ok_row = builder.icmp_signed("<", ir.Constant(_I64, r), rows)
            mask = builder.select(ok_row, col_mask, ir.Constant(_MASK, None))
            # Rows past ``rows`` read nothing (masked) but still need a valid address.
            idx = builder.select(ok_row, builder.add(s_idx, ir.Constant(_I64, r)), s_idx)
            off = builder.load(builder.gep(o_ptr, [idx]))
            v = _masked_load(builder, sty, builder.gep(s_ptr, [builder.add(s_base, off)]), mask)
            v = builder.fadd(v, bias_v)
            neg = builder.fcmp_ordered("<", v, zero)  # false for NaN: NaN is kept
            v = builder.select(builder.and_(neg, _splat_bool(builder, use_relu)), zero, v)
            vecs.append(v)
        rows_t = _transpose16(builder, vecs)
        for c in range(LANES):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, c), cols)):
                off = builder.add(d_off, builder.mul(ir.Constant(_I64, c), d_stride))
                _masked_store(builder, dty, rows_t[c], builder.gep(d_ptr, [off]), row_mask)
        return context.get_dummy_value()

    return sig, codegen


def _splat_bool(builder, bit):
    vec = builder.insert_element(ir.Constant(_MASK, ir.Undefined), bit, ir.Constant(_I32, 0))
    zeros = ir.Constant(_IVEC, [0] * LANES)
    return builder.shuffle_vector(vec, ir.Constant(_MASK, ir.Undefined), zeros)


gemm_rows = _make_gemm_rows(MR, NR // LANES)
gemm_rows.__doc__ = """:func:`gemm_packed` with B read in place: ``B[kk, j]`` at
``src[offsets[o_off + kk] + j0 + j]`` (the shifted views of a stacked image, no packing).
The caller guarantees NR readable values at each such row start (results of columns past the
valid ones are not used). Same chain, so the same bits, as :func:`gemm_packed`. Signature
``gemm_rows(ap, a_off, src, offsets, o_off, j0, k, c, c_off, ldc, accumulate)``.
"""
