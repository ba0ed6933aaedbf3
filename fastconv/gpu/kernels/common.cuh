// Shared helpers for every fastconv kernel. Included first in the NVRTC module (CuPy) and in the
// host emulation (g++ through host_shim.h, which defines FASTCONV_HOST_SHIM and __half).
#pragma once

#ifndef FASTCONV_HOST_SHIM
#include <cuda_fp16.h>
#else
#include <cstring>
#endif

// fp16 policy: load half, compute in float, store half with round-to-nearest-even.
__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }

// A float32 scalar (eps, a probability, a slope) travels as its bits in an int argument: the launchers
// pass only ints and arrays, and a one-element device array would cost an allocation and a copy
// on every call.
__device__ __forceinline__ float float_from_bits(int bits) {
#ifdef FASTCONV_HOST_SHIM
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#else
    return __int_as_float(bits);
#endif
}

// v != v rather than isnan(): identical in NVRTC, nvcc and g++. No -use_fast_math anywhere, but
// not IEEE-exact either: the device compiles with -ftz=true (CuPy forces it; float32 subnormals
// flush to zero, mirrored by host_shim.h in the emulation) and -fmad=false (no FMA contraction,
// as g++ -ffp-contract=off); see _source.NVRTC_OPTIONS.
__device__ __forceinline__ bool is_nan(float v) { return v != v; }

// Grid-stride loop over [0, n): correct for any grid size, so the launcher may cap the grid.
#define FC_GRID_STRIDE_LOOP(i, n)                                                        \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);        \
         i += (long long)blockDim.x * gridDim.x)

// First window index (along one axis) whose span [o*s - p, o*s - p + k) contains pixel h.
__device__ __forceinline__ int first_window(int h, int k, int s, int p) {
    int t = h + p - k + 1;
    return t <= 0 ? 0 : (t + s - 1) / s;
}

// Last window index containing pixel h, clipped to the output size.
__device__ __forceinline__ int last_window(int h, int s, int p, int out) {
    int o = (h + p) / s;
    return o < out - 1 ? o : out - 1;
}
