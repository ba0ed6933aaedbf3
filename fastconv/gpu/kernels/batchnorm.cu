// Batch normalisation: training statistics, the normalising affine map, and both backward passes.
// Per-channel reductions run in two deterministic passes (no atomics, no shared memory), as the
// bias gradient in conv.cu: pass 1 has thread (c, s) reduce entries s, s + S, s + 2S, ... of
// channel c's M = N*P values (neighbouring threads read neighbouring addresses: coalesced), pass 2
// has one thread per channel combine its S partials in a fixed order. Arithmetic is float.
#include "common.cuh"

// 1 / sqrt(var + eps), spelled as on the CPU backend.
__device__ __forceinline__ float bn_inv_std(float var, float eps) {
    return 1.0f / sqrtf(var + eps);
}

// dy * (y > 0) in float when the forward fused a ReLU (has_y), else dy. NaN/inf dy times 0 is NaN,
// exactly as the product dy * (y > 0) of the reference.
template <typename T>
__device__ __forceinline__ float bn_masked(const T* dy, const T* y, long long i, int has_y) {
    float d = load_f(dy, i);
    if (has_y) d *= (load_f(y, i) > 0.0f) ? 1.0f : 0.0f;
    return d;
}

// Pass 1 of the batch statistics: Welford's update over the thread's slice, giving the slice's
// mean and sum of squared deviations (one read of x, no E[x^2] - E[x]^2 cancellation).
// part: (2, C, S) = slice means, slice M2s.
template <typename T>
__global__ void bn_stats_partial(const T* __restrict__ x, float* __restrict__ part, int N, int C,
                                 int P, int S) {
    const long long M = (long long)N * P;
    FC_GRID_STRIDE_LOOP(t, (long long)C * S) {
        const int c = t / S, s = t % S;
        float mean = 0.0f, m2 = 0.0f, count = 0.0f;
        for (long long e = s; e < M; e += S) {
            const long long n = e / P, p = e % P;
            const float v = load_f(x, (n * C + c) * P + p);
            count += 1.0f;
            const float d = v - mean;
            mean += d / count;
            m2 += d * (v - mean);
        }
        part[t] = mean;
        part[(long long)C * S + t] = m2;
    }
}

// Pass 2: one thread per channel merges its S slices in order (Chan et al.), then writes the
// batch mean, the biased variance and the affine coefficients coef = (scale, shift), (2, C).
template <typename T>
__global__ void bn_stats_finish(const float* __restrict__ part, const T* __restrict__ gamma,
                                const T* __restrict__ beta, float* __restrict__ mean_out,
                                float* __restrict__ var_out, float* __restrict__ coef, int N,
                                int C, int P, int S, int eps_bits) {
    const long long M = (long long)N * P;
    const float eps = float_from_bits(eps_bits);
    FC_GRID_STRIDE_LOOP(c, (long long)C) {
        float mean = 0.0f, m2 = 0.0f, n_a = 0.0f;
        for (int s = 0; s < S; ++s) {
            const float n_b = (float)((M - s + S - 1) / S);  // entries of slice s (S <= M)
            const float n = n_a + n_b;
            const float delta = part[c * (long long)S + s] - mean;
            mean += delta * (n_b / n);
            m2 += part[((long long)C + c) * S + s] + delta * delta * (n_a * n_b / n);
            n_a = n;
        }
        const float var = m2 / (float)M;
        const float scale = load_f(gamma, c) * bn_inv_std(var, eps);
        mean_out[c] = mean;
        var_out[c] = var;
        coef[c] = scale;
        coef[C + c] = load_f(beta, c) - mean * scale;
    }
}

// Inference coefficients from running statistics: coef = (scale, shift), (2, C).
// has_beta = 0: shift is not needed (the inference backward), beta is any valid pointer.
template <typename T>
__global__ void bn_inference_coef(const T* __restrict__ gamma, const T* __restrict__ beta,
                                  const float* __restrict__ mean, const float* __restrict__ var,
                                  float* __restrict__ coef, int C, int eps_bits, int has_beta) {
    const float eps = float_from_bits(eps_bits);
    FC_GRID_STRIDE_LOOP(c, (long long)C) {
        const float scale = load_f(gamma, c) * bn_inv_std(var[c], eps);
        coef[c] = scale;
        coef[C + c] = (has_beta ? load_f(beta, c) : 0.0f) - mean[c] * scale;
    }
}

// y = act(x * scale[c] + shift[c]), one thread per element; ReLU lets NaN through.
template <typename T>
__global__ void bn_apply(const T* __restrict__ x, T* __restrict__ y,
                         const float* __restrict__ coef, int N, int C, int P, int relu) {
    const long long total = (long long)N * C * P;
    FC_GRID_STRIDE_LOOP(t, total) {
        const int c = (t / P) % C;
        float v = load_f(x, t) * coef[c] + coef[C + c];
        if (relu && v < 0.0f) v = 0.0f;
        store_f(y, t, v);
    }
}

// Backward pass 1: per slice, sum(dy) and sum(dy * (x - mean)); part: (2, C, S).
template <typename T>
__global__ void bn_backward_partial(const T* __restrict__ dy, const T* __restrict__ x,
                                    const T* __restrict__ y, const float* __restrict__ mean,
                                    float* __restrict__ part, int N, int C, int P, int S,
                                    int has_y) {
    const long long M = (long long)N * P;
    FC_GRID_STRIDE_LOOP(t, (long long)C * S) {
        const int c = t / S, s = t % S;
        const float mu = mean[c];
        float sum_dy = 0.0f, sum_dy_xc = 0.0f;
        for (long long e = s; e < M; e += S) {
            const long long i = ((e / P) * C + c) * P + e % P;
            const float d = bn_masked(dy, y, i, has_y);
            sum_dy += d;
            sum_dy_xc += d * (load_f(x, i) - mu);
        }
        part[t] = sum_dy;
        part[(long long)C * S + t] = sum_dy_xc;
    }
}

// Backward pass 2: per channel, dbeta = sum(dy), dgamma = sum(dy * xhat), and the coefficients
// of dx: coef = (gamma*invstd/M, sum(dy), sum(dy*xhat), invstd), (4, C).
template <typename T>
__global__ void bn_backward_finish(const float* __restrict__ part, const T* __restrict__ gamma,
                                   const float* __restrict__ var, T* __restrict__ dgamma,
                                   T* __restrict__ dbeta, float* __restrict__ coef, int N, int C,
                                   int P, int S, int eps_bits) {
    const float eps = float_from_bits(eps_bits);
    const float M = (float)((long long)N * P);
    FC_GRID_STRIDE_LOOP(c, (long long)C) {
        float sum_dy = 0.0f, sum_dy_xc = 0.0f;
        for (int s = 0; s < S; ++s) {
            sum_dy += part[c * (long long)S + s];
            sum_dy_xc += part[((long long)C + c) * S + s];
        }
        const float inv_std = bn_inv_std(var[c], eps);
        const float sum_dy_xhat = sum_dy_xc * inv_std;
        coef[c] = load_f(gamma, c) * inv_std / M;
        coef[C + c] = sum_dy;
        coef[2 * C + c] = sum_dy_xhat;
        coef[3 * C + c] = inv_std;
        store_f(dgamma, c, sum_dy_xhat);
        store_f(dbeta, c, sum_dy);
    }
}

// dx = gamma*invstd/M * (M*dy - sum(dy) - xhat*sum(dy*xhat)), one thread per element.
template <typename T>
__global__ void bn_backward_apply(const T* __restrict__ dy, const T* __restrict__ x,
                                  const T* __restrict__ y, const float* __restrict__ mean,
                                  const float* __restrict__ coef, T* __restrict__ dx, int N, int C,
                                  int P, int has_y) {
    const long long total = (long long)N * C * P;
    const float M = (float)((long long)N * P);
    FC_GRID_STRIDE_LOOP(t, total) {
        const int c = (t / P) % C;
        const float xhat = (load_f(x, t) - mean[c]) * coef[3 * C + c];
        const float d = bn_masked(dy, y, t, has_y);
        store_f(dx, t, coef[c] * (M * d - coef[C + c] - xhat * coef[2 * C + c]));
    }
}

// Inference backward: dx = dy * scale[c] (dy masked by y > 0 when has_y).
template <typename T>
__global__ void bn_scale_grad(const T* __restrict__ dy, const T* __restrict__ y,
                              const float* __restrict__ coef, T* __restrict__ dx, int N, int C,
                              int P, int has_y) {
    const long long total = (long long)N * C * P;
    FC_GRID_STRIDE_LOOP(t, total) {
        const int c = (t / P) % C;
        store_f(dx, t, bn_masked(dy, y, t, has_y) * coef[c]);
    }
}
