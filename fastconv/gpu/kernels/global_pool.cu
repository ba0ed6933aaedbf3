// Global average pooling: (N, C, H, W) -> (N, C) and its gradient, on planes of P = H*W pixels.
#include "common.cuh"

// One thread per (n, c) output sums its plane in order (deterministic, float accumulation).
// Global pooling follows the last convolution, where planes are small (7x7, 4x4): a serial sum
// per output is short, and NC threads are plenty.
template <typename T>
__global__ void global_avg_pool2d(const T* __restrict__ x, T* __restrict__ y, int NC, int P) {
    FC_GRID_STRIDE_LOOP(t, (long long)NC) {
        const long long base = t * P;
        float acc = 0.0f;
        for (int p = 0; p < P; ++p) acc += load_f(x, base + p);
        store_f(y, t, acc / (float)P);
    }
}

// One thread per input pixel: dx = dy[plane] / P (a gather, no atomics).
template <typename T>
__global__ void global_avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, int NC,
                                           int P) {
    const long long total = (long long)NC * P;
    FC_GRID_STRIDE_LOOP(t, total) { store_f(dx, t, load_f(dy, t / P) / (float)P); }
}
