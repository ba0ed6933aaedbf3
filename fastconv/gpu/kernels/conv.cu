// Convolution helpers around the cuBLAS GEMMs, plus a direct convolution for layers whose
// reduction (C*kh*kw) is too short for an im2col buffer + GEMM to pay (conv1 of MNIST: C=1).
#include "common.cuh"

// Fused epilogue, in place on y viewed as (N, F, P): y = act(y + b[f]).
// has_bias=0 ignores b (the caller passes any valid pointer); relu=1 applies max(v, 0)
// while letting NaN through (v < 0 is false for NaN), as torch.relu does.
template <typename T>
__global__ void bias_act(T* __restrict__ y, const T* __restrict__ b, int N, int F, int P,
                         int has_bias, int relu) {
    const long long total = (long long)N * F * P;
    FC_GRID_STRIDE_LOOP(t, total) {
        float v = load_f(y, t);
        if (has_bias) v += load_f(b, (t / P) % F);
        if (relu && v < 0.0f) v = 0.0f;
        store_f(y, t, v);
    }
}

// db[f] = sum over n, p of dy[n, f, p], in two deterministic passes (no atomics, no shared
// memory). Pass 1: thread (f, s) sums entries s, s + S, s + 2S, ... of channel f's N*P values
// into a float partial; neighbouring threads read neighbouring addresses, so loads coalesce.
template <typename T>
__global__ void bias_grad_partial(const T* __restrict__ dy, float* __restrict__ partial, int N,
                                  int F, int P, int S) {
    const long long count = (long long)N * P;
    FC_GRID_STRIDE_LOOP(t, (long long)F * S) {
        const int f = t / S, s = t % S;
        float acc = 0.0f;
        for (long long e = s; e < count; e += S) {
            const long long n = e / P, p = e % P;
            acc += load_f(dy, (n * F + f) * P + p);
        }
        partial[t] = acc;
    }
}

// Pass 2: one thread per channel adds its S partials in a fixed order and stores T.
template <typename T>
__global__ void bias_grad_finish(const float* __restrict__ partial, T* __restrict__ db, int F,
                                 int S) {
    FC_GRID_STRIDE_LOOP(f, (long long)F) {
        float acc = 0.0f;
        for (int s = 0; s < S; ++s) acc += partial[f * (long long)S + s];
        store_f(db, f, acc);
    }
}

// Direct convolution, one thread per output element, with the bias + ReLU epilogue fused.
template <typename T>
__global__ void conv2d_direct(const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ b, T* __restrict__ y, int N, int C, int H,
                              int W, int F, int kh, int kw, int sh, int sw, int ph, int pw, int OH,
                              int OW, int has_bias, int relu) {
    const long long total = (long long)N * F * OH * OW;
    FC_GRID_STRIDE_LOOP(t, total) {
        int ow = t % OW;
        int oh = (t / OW) % OH;
        int f = (t / ((long long)OW * OH)) % F;
        long long n = t / ((long long)OW * OH * F);
        float acc = has_bias ? load_f(b, f) : 0.0f;
        for (int c = 0; c < C; ++c) {
            const long long xc = (n * C + c) * H * W;
            const long long wc = ((long long)f * C + c) * kh * kw;
            for (int i = 0; i < kh; ++i) {
                int h = oh * sh - ph + i;
                if (h < 0 || h >= H) continue;
                for (int j = 0; j < kw; ++j) {
                    int ww = ow * sw - pw + j;
                    if (ww < 0 || ww >= W) continue;
                    acc += load_f(x, xc + (long long)h * W + ww) * load_f(w, wc + i * kw + j);
                }
            }
        }
        if (relu && acc < 0.0f) acc = 0.0f;
        store_f(y, t, acc);
    }
}
