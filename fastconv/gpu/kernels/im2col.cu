// im2col / col2im. Two layouts of the column matrix, chosen by `layout`:
//   0 "rows"  (book):  cols[(n*OH + oh)*OW + ow][(c*kh + i)*kw + j], shape (N*OH*OW, C*kh*kw)
//   1 "batch" (Caffe): cols[n][(c*kh + i)*kw + j][oh*OW + ow],       shape (N, C*kh*kw, OH*OW)
// Layout 1 lets conv2d run as one batched GEMM W(F,K) @ cols[n](K,P) that lands directly in NCHW.
#include "common.cuh"

__device__ __forceinline__ long long col_index(int layout, int n, int c, int i, int j, int oh,
                                               int ow, int C, int kh, int kw, int OH, int OW) {
    long long K = (long long)C * kh * kw;
    long long k = ((long long)c * kh + i) * kw + j;
    if (layout == 0) return (((long long)n * OH + oh) * OW + ow) * K + k;
    return ((long long)n * K + k) * ((long long)OH * OW) + (long long)oh * OW + ow;
}

// One thread per column entry; padding reads as zero.
template <typename T>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, int N, int C, int H, int W,
                       int kh, int kw, int sh, int sw, int ph, int pw, int OH, int OW,
                       int layout) {
    const long long total = (long long)N * C * kh * kw * OH * OW;
    FC_GRID_STRIDE_LOOP(t, total) {
        // Decompose t in the order of the destination so that writes are coalesced.
        long long r = t;
        int n, c, i, j, oh, ow;
        if (layout == 0) {
            j = r % kw; r /= kw;
            i = r % kh; r /= kh;
            c = r % C; r /= C;
            ow = r % OW; r /= OW;
            oh = r % OH; r /= OH;
            n = (int)r;
        } else {
            ow = r % OW; r /= OW;
            oh = r % OH; r /= OH;
            j = r % kw; r /= kw;
            i = r % kh; r /= kh;
            c = r % C; r /= C;
            n = (int)r;
        }
        int h = oh * sh - ph + i;
        int w = ow * sw - pw + j;
        float v = 0.0f;
        if (h >= 0 && h < H && w >= 0 && w < W)
            v = load_f(x, (((long long)n * C + c) * H + h) * W + w);
        store_f(cols, t, v);
    }
}

// Adjoint of im2col as a GATHER: one thread per image pixel sums, in a fixed order, every column
// entry that was read from it. No atomics, so the result is deterministic run to run.
template <typename T>
__global__ void col2im(const T* __restrict__ cols, T* __restrict__ x, int N, int C, int H, int W,
                       int kh, int kw, int sh, int sw, int ph, int pw, int OH, int OW,
                       int layout) {
    const long long total = (long long)N * C * H * W;
    FC_GRID_STRIDE_LOOP(t, total) {
        long long r = t;
        int w = r % W; r /= W;
        int h = r % H; r /= H;
        int c = r % C; r /= C;
        int n = (int)r;
        float acc = 0.0f;
        for (int i = 0; i < kh; ++i) {
            int hp = h + ph - i;  // = oh * sh when pixel row h is tap i of window row oh
            if (hp < 0 || hp % sh != 0) continue;
            int oh = hp / sh;
            if (oh >= OH) continue;
            for (int j = 0; j < kw; ++j) {
                int wp = w + pw - j;
                if (wp < 0 || wp % sw != 0) continue;
                int ow = wp / sw;
                if (ow >= OW) continue;
                acc += load_f(cols, col_index(layout, n, c, i, j, oh, ow, C, kh, kw, OH, OW));
            }
        }
        store_f(x, t, acc);
    }
}
