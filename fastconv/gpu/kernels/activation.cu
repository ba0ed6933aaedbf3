// ReLU and leaky ReLU with their gradients, elementwise over flat buffers of n elements.
#include "common.cuh"

// y = x where x is not below zero (x's bits copied: -0.0 and NaN kept, as torch.relu), else +0.
template <typename T>
__global__ void relu_forward(const T* __restrict__ x, T* __restrict__ y, int n) {
    FC_GRID_STRIDE_LOOP(t, (long long)n) {
        if (load_f(x, t) < 0.0f)
            store_f(y, t, 0.0f);
        else
            y[t] = x[t];
    }
}

// dx = dy * (y > 0) computed as a float product, so NaN/inf in dy where y <= 0 gives NaN.
template <typename T>
__global__ void relu_backward(const T* __restrict__ dy, const T* __restrict__ y,
                              T* __restrict__ dx, int n) {
    FC_GRID_STRIDE_LOOP(t, (long long)n) {
        store_f(dx, t, load_f(dy, t) * (load_f(y, t) > 0.0f ? 1.0f : 0.0f));
    }
}

// y = x where x > 0 (x's bits copied), else alpha * x in float (NaN stays NaN), as torch's
// leaky_relu; alpha arrives as its float32 bits (float_from_bits, common.cuh).
template <typename T>
__global__ void leaky_relu_forward(const T* __restrict__ x, T* __restrict__ y, int n,
                                   int alpha_bits) {
    const float alpha = float_from_bits(alpha_bits);
    FC_GRID_STRIDE_LOOP(t, (long long)n) {
        const float v = load_f(x, t);
        if (v > 0.0f)
            y[t] = x[t];
        else
            store_f(y, t, v * alpha);
    }
}

// dx = dy where x > 0, else alpha * dy: torch's leaky_relu_backward, through the input.
template <typename T>
__global__ void leaky_relu_backward(const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ dx, int n, int alpha_bits) {
    const float alpha = float_from_bits(alpha_bits);
    FC_GRID_STRIDE_LOOP(t, (long long)n) {
        const float g = load_f(dy, t);
        store_f(dx, t, load_f(x, t) > 0.0f ? g : g * alpha);
    }
}

// y = lo where x < lo, hi where x > hi, else x (its bits copied: NaN stays NaN), as torch.clamp
// and hardtanh; the bounds arrive as float32 bits and are rounded once to T.
template <typename T>
__global__ void clip_forward(const T* __restrict__ x, T* __restrict__ y, int n, int lo_bits,
                             int hi_bits) {
    const float lo = float_from_bits(lo_bits), hi = float_from_bits(hi_bits);
    FC_GRID_STRIDE_LOOP(t, (long long)n) {
        const float v = load_f(x, t);
        if (v < lo)
            store_f(y, t, lo);
        else if (v > hi)
            store_f(y, t, hi);
        else
            y[t] = x[t];
    }
}

// dx = dy (bits copied) where lo < x < hi, else 0 (the kinks and a NaN input included): torch's
// hardtanh_backward, through the input.
template <typename T>
__global__ void clip_backward(const T* __restrict__ dy, const T* __restrict__ x,
                              T* __restrict__ dx, int n, int lo_bits, int hi_bits) {
    const float lo = float_from_bits(lo_bits), hi = float_from_bits(hi_bits);
    FC_GRID_STRIDE_LOOP(t, (long long)n) {
        const float v = load_f(x, t);
        if (v > lo && v < hi)
            dx[t] = dy[t];
        else
            store_f(dx, t, 0.0f);
    }
}
