// Data augmentation: bilinear warping through per-sample affine maps (plus an optional
// displacement field, for elastic distortion) and the separable Gaussian blur that smooths
// those fields. Same float32 arithmetic, in the same order, as fastconv/cpu/augment.py.
#include "common.cuh"

// One thread per output pixel (n, i, j), looping over the channels: the source coordinate
//   (sx, sy) = (a0 j + a1 i + a2, a3 j + a4 i + a5) (+ flow[n, :, i, j])
// is computed once for all channels. Pixels outside the source read as 0; a neighbour whose
// bilinear weight is exactly 0 is never read, so integer coordinates copy pixels exactly.
template <typename T>
__global__ void warp_bilinear(const T* __restrict__ x, const float* __restrict__ theta,
                              const float* __restrict__ flow, T* __restrict__ y, int N, int C,
                              int H, int W, int OH, int OW, int has_flow) {
    const long long total = (long long)N * OH * OW;
    FC_GRID_STRIDE_LOOP(t, total) {
        int j = t % OW;
        int i = (t / OW) % OH;
        long long n = t / ((long long)OH * OW);
        const float* a = theta + n * 6;
        float fi = (float)i, fj = (float)j;
        float sx = a[0] * fj + a[1] * fi + a[2];
        float sy = a[3] * fj + a[4] * fi + a[5];
        if (has_flow) {
            long long plane = (long long)OH * OW;
            sx = sx + flow[(n * 2) * plane + (long long)i * OW + j];
            sy = sy + flow[(n * 2 + 1) * plane + (long long)i * OW + j];
        }
        // floor() by truncation of the coordinate clamped to [-2, size + 1] (far outside stays
        // outside, no int overflow): the CPU kernel's formula, so both give the same bits.
        float cx = fminf(fmaxf(sx, -2.0f), (float)(W + 1));
        float cy = fminf(fmaxf(sy, -2.0f), (float)(H + 1));
        int x0 = (int)cx;
        int y0 = (int)cy;
        x0 -= (float)x0 > cx;
        y0 -= (float)y0 > cy;
        float fx = sx - (float)x0, fy = sy - (float)y0;
        float w00 = (1.0f - fx) * (1.0f - fy);
        float w01 = fx * (1.0f - fy);
        float w10 = (1.0f - fx) * fy;
        float w11 = fx * fy;
        bool ok_x0 = (x0 >= 0) & (x0 < W);
        bool ok_x1 = (x0 + 1 >= 0) & (x0 + 1 < W) & (fx != 0.0f);
        bool ok_y0 = (y0 >= 0) & (y0 < H);
        bool ok_y1 = (y0 + 1 >= 0) & (y0 + 1 < H) & (fy != 0.0f);
        for (int c = 0; c < C; ++c) {
            const T* src = x + (n * C + c) * (long long)H * W;
            float acc = 0.0f;
            if (ok_y0 & ok_x0) acc += w00 * load_f(src, (long long)y0 * W + x0);
            if (ok_y0 & ok_x1) acc += w01 * load_f(src, (long long)y0 * W + x0 + 1);
            if (ok_y1 & ok_x0) acc += w10 * load_f(src, (long long)(y0 + 1) * W + x0);
            if (ok_y1 & ok_x1) acc += w11 * load_f(src, (long long)(y0 + 1) * W + x0 + 1);
            store_f(y, ((n * C + c) * OH + i) * (long long)OW + j, acc);
        }
    }
}

// 1-D convolution of each (H, W) plane of `src` with the centred odd-length `taps`
// (2 * radius + 1) along W (axis 1) or H (axis 0), zero outside the plane. The Gaussian blur
// of elastic distortion runs it twice (rows, then columns) through a scratch buffer.
template <typename T>
__global__ void blur_axis(const T* __restrict__ src, T* __restrict__ dst,
                          const float* __restrict__ taps, int P, int H, int W, int radius,
                          int axis) {
    const long long total = (long long)P * H * W;
    FC_GRID_STRIDE_LOOP(t, total) {
        int j = t % W;
        int i = (t / W) % H;
        long long base = t - ((long long)i * W + j);  // start of the plane
        float acc = 0.0f;
        if (axis == 1) {
            int lo = -radius > -j ? -radius : -j;
            int hi = radius < W - 1 - j ? radius : W - 1 - j;
            for (int k = lo; k <= hi; ++k)
                acc += taps[k + radius] * load_f(src, base + (long long)i * W + j + k);
        } else {
            int lo = -radius > -i ? -radius : -i;
            int hi = radius < H - 1 - i ? radius : H - 1 - i;
            for (int k = lo; k <= hi; ++k)
                acc += taps[k + radius] * load_f(src, base + (long long)(i + k) * W + j);
        }
        store_f(dst, t, acc);
    }
}
