// Max and average pooling, forward and backward. Backward passes are gathers (one thread per
// input pixel, no atomics): deterministic and race-free even when windows overlap.
#include "common.cuh"

// Row-major position (i*kw + j) of the FIRST maximum of window (oh, ow) of plane `xc`; padding
// positions are skipped (never win) and the first NaN wins, as in fastconv.reference and numpy's
// argmax. Validation guarantees pad <= size/2, so every window holds at least one real pixel.

template <typename T>
__device__ __forceinline__ int window_argmax(const T* xc, int H, int W, int kh, int kw, int sh,
                                             int sw, int ph, int pw, int oh, int ow,
                                             float* best_out) {
    int best_k = -1;
    float best = 0.0f;
    for (int i = 0; i < kh; ++i) {
        int h = oh * sh - ph + i;
        if (h < 0 || h >= H) continue;
        for (int j = 0; j < kw; ++j) {
            int w = ow * sw - pw + j;
            if (w < 0 || w >= W) continue;
            float v = load_f(xc, (long long)h * W + w);
            if (best_k < 0 || (!is_nan(best) && (v > best || is_nan(v)))) {
                best = v;
                best_k = i * kw + j;
            }
        }
    }
    *best_out = best;
    return best_k;
}

template <typename T>
__global__ void max_pool2d(const T* __restrict__ x, T* __restrict__ y, int N, int C, int H, int W,
                           int kh, int kw, int sh, int sw, int ph, int pw, int OH, int OW) {
    const long long total = (long long)N * C * OH * OW;
    FC_GRID_STRIDE_LOOP(t, total) {
        int ow = t % OW;
        int oh = (t / OW) % OH;
        long long plane = t / ((long long)OH * OW);
        float best;
        window_argmax(x + plane * H * W, H, W, kh, kw, sh, sw, ph, pw, oh, ow, &best);
        store_f(y, t, best);
    }
}

// Each input pixel scans the windows that contain it and takes dy of those whose first maximum
// is this pixel, so ties and overlapping windows route exactly as in the forward pass.
template <typename T>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ dx, int N, int C, int H, int W, int kh, int kw,
                                    int sh, int sw, int ph, int pw, int OH, int OW) {
    const long long total = (long long)N * C * H * W;
    FC_GRID_STRIDE_LOOP(t, total) {
        int w = t % W;
        int h = (t / W) % H;
        long long plane = t / ((long long)H * W);
        const T* xc = x + plane * H * W;
        const T* dyc = dy + plane * OH * OW;
        float acc = 0.0f;
        int oh1 = last_window(h, sh, ph, OH), ow1 = last_window(w, sw, pw, OW);
        for (int oh = first_window(h, kh, sh, ph); oh <= oh1; ++oh) {
            for (int ow = first_window(w, kw, sw, pw); ow <= ow1; ++ow) {
                float best;
                int k = window_argmax(xc, H, W, kh, kw, sh, sw, ph, pw, oh, ow, &best);
                if (k == (h - (oh * sh - ph)) * kw + (w - (ow * sw - pw)))
                    acc += load_f(dyc, (long long)oh * OW + ow);
            }
        }
        store_f(dx, t, acc);
    }
}

// Cells of a window starting at `start` inside the zero-padded input: k, except for a ceil-mode
// window running past the padding, which does not count (as in PyTorch).
__device__ __forceinline__ int padded_extent(int start, int k, int size, int pad) {
    int end = start + k < size + pad ? start + k : size + pad;
    return end - start;
}

// Zero padding counts in the divisor (PyTorch's count_include_pad=True default).
template <typename T>
__global__ void avg_pool2d(const T* __restrict__ x, T* __restrict__ y, int N, int C, int H, int W,
                           int kh, int kw, int sh, int sw, int ph, int pw, int OH, int OW) {
    const long long total = (long long)N * C * OH * OW;
    FC_GRID_STRIDE_LOOP(t, total) {
        int ow = t % OW;
        int oh = (t / OW) % OH;
        const T* xc = x + (t / ((long long)OH * OW)) * H * W;
        const float scale = 1.0f / (float)(padded_extent(oh * sh - ph, kh, H, ph) *
                                           padded_extent(ow * sw - pw, kw, W, pw));
        float acc = 0.0f;
        for (int i = 0; i < kh; ++i) {
            int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < kw; ++j) {
                int w = ow * sw - pw + j;
                if (w >= 0 && w < W) acc += load_f(xc, (long long)h * W + w);
            }
        }
        store_f(y, t, acc * scale);
    }
}

template <typename T>
__global__ void avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, int N, int C,
                                    int H, int W, int kh, int kw, int sh, int sw, int ph, int pw,
                                    int OH, int OW) {
    const long long total = (long long)N * C * H * W;
    FC_GRID_STRIDE_LOOP(t, total) {
        int w = t % W;
        int h = (t / W) % H;
        const T* dyc = dy + (t / ((long long)H * W)) * OH * OW;
        float acc = 0.0f;
        int oh1 = last_window(h, sh, ph, OH), ow1 = last_window(w, sw, pw, OW);
        for (int oh = first_window(h, kh, sh, ph); oh <= oh1; ++oh) {
            const float rows = (float)padded_extent(oh * sh - ph, kh, H, ph);
            for (int ow = first_window(w, kw, sw, pw); ow <= ow1; ++ow)
                acc += load_f(dyc, (long long)oh * OW + ow) /
                       (rows * (float)padded_extent(ow * sw - pw, kw, W, pw));
        }
        store_f(dx, t, acc);
    }
}
