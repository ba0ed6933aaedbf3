// Host emulation of the tiny CUDA subset the fastconv kernels use, so that g++ compiles the SAME
// .cu sources into a shared library the tests call through ctypes. A launch runs every
// (block, thread) pair of the grid sequentially; that is a faithful execution because the kernels
// use no shared memory, no synchronisation and no atomics, and each thread writes only its own
// outputs (the grid-stride loop partitions the index space).
#pragma once
#define FASTCONV_HOST_SHIM 1

#include <cmath>

struct fc_dim3 {
    unsigned x, y, z;
};

// The launch state a kernel body reads; one copy per host thread.
static thread_local fc_dim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// __half is IEEE binary16 on both sides; GCC's _Float16 converts with round-to-nearest-even,
// the same rounding as __float2half_rn.
typedef _Float16 __half;
static inline float __half2float(__half h) { return static_cast<float>(h); }
static inline __half __float2half_rn(float f) { return static_cast<__half>(f); }

using std::fmaxf;
using std::fminf;

// kernel<<<grid, block>>>(args...) as nested loops over blocks and threads.
template <typename... Params, typename... Args>
static void fc_launch(void (*kernel)(Params...), unsigned grid, unsigned block, Args... args) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
    }
}
