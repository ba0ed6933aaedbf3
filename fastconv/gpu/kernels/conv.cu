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

// ---- direct grouped convolution (few channels per group; depthwise: groups == C) ------------
// Filter f of group g = f / (F / groups) reads channels g*Cg .. g*Cg + Cg - 1 (Cg = C / groups);
// w is (F, Cg, kh, kw). Any stride, dilation (dh, dw) and padding: top/left here, bottom/right
// are in OH/OW. One thread per output; the taps are summed after the bias in (c, i, j) order,
// as the CPU kernel.
template <typename T>
__global__ void grouped_forward(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ b, T* __restrict__ y, int N, int C, int H,
                                int W, int F, int groups, int kh, int kw, int sh, int sw, int top,
                                int left, int dh, int dw, int OH, int OW, int has_bias, int relu) {
    const long long total = (long long)N * F * OH * OW;
    const int Cg = C / groups, Fg = F / groups;
    FC_GRID_STRIDE_LOOP(t, total) {
        const int ox = t % OW;
        const int oy = (t / OW) % OH;
        const int f = (t / ((long long)OW * OH)) % F;
        const long long n = t / ((long long)OW * OH * F);
        const int c0 = (f / Fg) * Cg;
        float acc = has_bias ? load_f(b, f) : 0.0f;
        for (int c = 0; c < Cg; ++c) {
            const long long xc = (n * C + c0 + c) * H * W;
            const long long wc = ((long long)f * Cg + c) * kh * kw;
            for (int i = 0; i < kh; ++i) {
                const int iy = oy * sh - top + i * dh;
                if (iy < 0 || iy >= H) continue;
                for (int j = 0; j < kw; ++j) {
                    const int ix = ox * sw - left + j * dw;
                    if (ix < 0 || ix >= W) continue;
                    acc += load_f(w, wc + i * kw + j) * load_f(x, xc + (long long)iy * W + ix);
                }
            }
        }
        if (relu && acc < 0.0f) acc = 0.0f;
        store_f(y, t, acc);
    }
}

// dx of grouped_forward: one thread per input pixel, gathering every (filter of its group, tap,
// output) that read it, in (m, i, j) order.
template <typename T>
__global__ void grouped_backward_data(const T* __restrict__ dy, const T* __restrict__ w,
                                      T* __restrict__ dx, int N, int C, int H, int W, int F,
                                      int groups, int kh, int kw, int sh, int sw, int top,
                                      int left, int dh, int dw, int OH, int OW) {
    const long long total = (long long)N * C * H * W;
    const int Cg = C / groups, Fg = F / groups;
    FC_GRID_STRIDE_LOOP(t, total) {
        const int ix = t % W;
        const int iy = (t / W) % H;
        const int ci = (t / ((long long)W * H)) % C;
        const long long n = t / ((long long)W * H * C);
        const int g = ci / Cg, c = ci % Cg;
        float acc = 0.0f;
        for (int m = 0; m < Fg; ++m) {
            const int f = g * Fg + m;
            const long long dyf = (n * F + f) * OH * OW;
            const long long wc = ((long long)f * Cg + c) * kh * kw;
            for (int i = 0; i < kh; ++i) {
                const int ty = iy + top - i * dh;
                if (ty < 0 || ty % sh != 0 || ty / sh >= OH) continue;
                for (int j = 0; j < kw; ++j) {
                    const int tx = ix + left - j * dw;
                    if (tx < 0 || tx % sw != 0 || tx / sw >= OW) continue;
                    acc += load_f(dy, dyf + (long long)(ty / sh) * OW + tx / sw) *
                           load_f(w, wc + i * kw + j);
                }
            }
        }
        store_f(dx, t, acc);
    }
}

// dw of grouped_forward, first pass: thread (f, c, i, j, s) sums the products of slice s of the
// (n, oy, ox) positions (every S-th); bias_grad_finish adds the S partials in order.
template <typename T>
__global__ void grouped_backward_weight(const T* __restrict__ dy, const T* __restrict__ x,
                                        float* __restrict__ partial, int N, int C, int H, int W,
                                        int F, int groups, int kh, int kw, int sh, int sw,
                                        int top, int left, int dh, int dw, int OH, int OW,
                                        int S) {
    const long long count = (long long)N * OH * OW;
    const int Cg = C / groups, Fg = F / groups;
    FC_GRID_STRIDE_LOOP(t, (long long)F * Cg * kh * kw * S) {
        const int s = t % S;
        const int j = (t / S) % kw;
        const int i = (t / ((long long)S * kw)) % kh;
        const int c = (t / ((long long)S * kw * kh)) % Cg;
        const int f = t / ((long long)S * kw * kh * Cg);
        const int ci = (f / Fg) * Cg + c;
        float acc = 0.0f;
        for (long long e = s; e < count; e += S) {
            const int ox = e % OW;
            const int oy = (e / OW) % OH;
            const long long n = e / ((long long)OW * OH);
            const int iy = oy * sh - top + i * dh, ix = ox * sw - left + j * dw;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            acc += load_f(dy, ((n * F + f) * OH + oy) * OW + ox) *
                   load_f(x, ((n * C + ci) * H + iy) * (long long)W + ix);
        }
        partial[t] = acc;
    }
}
