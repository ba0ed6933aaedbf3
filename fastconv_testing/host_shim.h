// Host emulation of the tiny CUDA subset the fastconv kernels use, so that g++ compiles the SAME
// .cu sources into a shared library the tests call through ctypes. A launch runs every
// (block, thread) pair of the grid sequentially; that is a faithful execution because the kernels
// use no shared memory, no synchronisation and no atomics, and each thread writes only its own
// outputs (the grid-stride loop partitions the index space).
#pragma once
#define FASTCONV_HOST_SHIM 1

#include <cmath>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

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

// The device compiles with -ftz=true (CuPy adds it to every NVRTC compile): float32 subnormal
// inputs and results of arithmetic flush to sign-preserving zero. SSE's DAZ (bit 6) and FTZ
// (bit 15) do the same to the host's float arithmetic, for the duration of a launch only (the
// MXCSR is per thread and restored, so NumPy around it is unaffected). Half<->float conversions
// are unaffected on both sides (every half value is a normal float).
struct fc_flush_denormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned saved;
    fc_flush_denormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
    ~fc_flush_denormals() { _mm_setcsr(saved); }
#else
#error "the CUDA emulation models -ftz=true with x86 MXCSR; port fc_flush_denormals"
#endif
};

// kernel<<<grid, block>>>(args...) as nested loops over blocks and threads.
template <typename... Params, typename... Args>
static void fc_launch(void (*kernel)(Params...), unsigned grid, unsigned block, Args... args) {
    fc_flush_denormals ftz;
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
