// Dropout from a counter-based generator: Philox4x32-10 (Salmon, Moraes, Dror and Shaw,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), the generator behind cuRAND's
// Philox4_32_10 and CuPy's Philox4x3210. A counter-based generator is a pure function of
// (counter, key): there is no generator state to set up or keep, so a dropout mask costs one
// launch, and the backward pass regenerates the forward's mask from the same key instead of
// storing it.
#include "common.cuh"

struct fc_philox_words {
    unsigned x, y, z, w;
};

// Full 32x32 -> 64-bit product; NVRTC turns it into mul.lo/mul.hi, g++ into one multiply.
__device__ __forceinline__ unsigned fc_mulhilo(unsigned a, unsigned b, unsigned* hi) {
    const unsigned long long p = (unsigned long long)a * b;
    *hi = (unsigned)(p >> 32);
    return (unsigned)p;
}

// Ten Philox rounds on counter c under key (k0, k1). Round r uses the key bumped r times by
// the Weyl constants (Random123's philox4x32_R; its known-answer vectors are tested against
// the NumPy twin in fastconv/gpu/_random.py, and this kernel against that twin).
__device__ __forceinline__ fc_philox_words fc_philox4x32_10(fc_philox_words c, unsigned k0,
                                                          unsigned k1) {
    for (int r = 0; r < 10; ++r) {
        unsigned hi0, hi1;
        const unsigned lo0 = fc_mulhilo(0xD2511F53u, c.x, &hi0);
        const unsigned lo1 = fc_mulhilo(0xCD9E8D57u, c.z, &hi1);
        c = fc_philox_words{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c;
}

// y = x * mask where mask[i] = scale if u[i] < keep else 0, elementwise over n elements.
// u[i] = (word >> 8) * 2^-24: the top 24 bits of word i % 4 of Philox(counter = (i / 4, 0, 0, 0),
// key = (key0, key1)), so every u is a float32 in [0, 1) on a 2^-24 grid (as NumPy's float32
// random()). keep and scale arrive as the bits of float32 values (the kernels take ints and
// arrays only); scale is 1/keep already rounded to T by the caller, so the product is rounded
// once, as NumPy's x * mask is. A product rather than a select: NaN * 0 stays NaN, as on the
// CPU. One thread per group of four elements (one Philox call gives four words).
template <typename T>
__global__ void dropout(const T* __restrict__ x, T* __restrict__ y, int n, int key0, int key1,
                        int keep_bits, int scale_bits) {
    const float keep = float_from_bits(keep_bits);
    const float scale = float_from_bits(scale_bits);
    const long long groups = ((long long)n + 3) / 4;
    FC_GRID_STRIDE_LOOP(g, groups) {
        const fc_philox_words r = fc_philox4x32_10(
            fc_philox_words{(unsigned)g, (unsigned)(g >> 32), 0u, 0u}, (unsigned)key0,
            (unsigned)key1);
        const unsigned words[4] = {r.x, r.y, r.z, r.w};
        for (int j = 0; j < 4; ++j) {
            const long long i = 4 * g + j;
            if (i >= n) break;
            const float u = (float)(words[j] >> 8) * 5.9604644775390625e-8f;  // 2^-24
            store_f(y, i, load_f(x, i) * (u < keep ? scale : 0.0f));
        }
    }
}
