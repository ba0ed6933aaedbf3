// ReLU and its gradient, elementwise over flat buffers of n elements.
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
