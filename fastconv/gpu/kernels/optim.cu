// Fused optimizer updates, one thread per parameter element: the same float32 operations in the
// same order as the CPU's fused kernels (fastconv/cpu/optim.py), which are bit-identical to the
// array expressions of fastconv.nn.optimizers. The device compiles with -fmad=false and IEEE
// division and square root (-prec-div=true -prec-sqrt=true), so the results are bit-identical to
// the CPU's too, except that float32 subnormals flush to zero here (-ftz=true, see
// _source.NVRTC_OPTIONS). One launch replaces the 7 (Adam) or 3 (momentum) elementwise launches
// and the parameter-sized temporaries of the expressions.
//
// State (m, v) is float32. T is the parameter's type: float in the optimizer, which updates
// half parameters through a float32 master copy; like every kernel, the half instantiation also
// exists (p and g loaded and stored through load_f/store_f) and is tested in the emulation.
// Scalars travel as float32 bits (float_from_bits, common.cuh).
#include "common.cuh"

// m += c1*(g - m);  v += c2*(g*g - v);  p -= lr*m / (sqrt(v) + eps)   (c1 = 1 - beta1, ...)
template <typename T>
__global__ void adam_update(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, int n, int c1_bits, int c2_bits, int lr_bits,
                            int eps_bits) {
    const float c1 = float_from_bits(c1_bits), c2 = float_from_bits(c2_bits);
    const float lr = float_from_bits(lr_bits), eps = float_from_bits(eps_bits);
    FC_GRID_STRIDE_LOOP(i, (long long)n) {
        const float gi = load_f(g, i);
        const float mi = m[i] + c1 * (gi - m[i]);
        const float vi = v[i] + c2 * (gi * gi - v[i]);
        m[i] = mi;
        v[i] = vi;
        store_f(p, i, load_f(p, i) - lr * mi / (sqrtf(vi) + eps));
    }
}

// v = momentum*v - lr*g;  p += v
template <typename T>
__global__ void momentum_update(T* __restrict__ p, const T* __restrict__ g,
                                float* __restrict__ v, int n, int momentum_bits, int lr_bits) {
    const float momentum = float_from_bits(momentum_bits), lr = float_from_bits(lr_bits);
    FC_GRID_STRIDE_LOOP(i, (long long)n) {
        const float vi = v[i] * momentum - lr * load_f(g, i);
        v[i] = vi;
        store_f(p, i, load_f(p, i) + vi);
    }
}
