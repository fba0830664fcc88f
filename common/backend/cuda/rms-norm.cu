/*
 * rms-norm.cu — RMSNorm over rows on the GPU, the CUDA counterpart of cpu_rms_norm.
 * One block per row; the sum of squares is reduced in fp32 per warp, then across warps.
 * Also holds the device probe used by `ihip version` and the GPU checks.
 */
#include "cuda.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>

static __device__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __global__ void rms_norm_kernel(const float *__restrict__ x, const float *__restrict__ g,
                                       float *__restrict__ y, int64_t n, float eps)
{
    const float *xr = x + blockIdx.x * n;
    float *yr = y + blockIdx.x * n;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += xr[i] * xr[i];
    s = warp_sum(s);
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) part[0] = s;
    }
    __syncthreads();
    float scale = rsqrtf(part[0] / (float)n + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * g[i];
}

static int launch_rms_norm(const float *x, const float *g, float *y, int64_t n_rows, int64_t n,
                           float eps, cudaStream_t stream)
{
    if (n_rows <= 0 || n <= 0) return 0;
    rms_norm_kernel<<<(unsigned)n_rows, 256, 0, stream>>>(x, g, y, n, eps);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : -(int)e;
}

extern "C" int cuda_rms_norm_f32(const float *x, const float *g, float *y, int64_t n_rows, int64_t n,
                                 float eps, void *stream)
{
    return launch_rms_norm(x, g, y, n_rows, n, eps, (cudaStream_t)stream);
}

extern "C" int cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" error */
        return 0;
    }
    return n;
}

extern "C" int cuda_device_describe(int dev, char *buf, size_t cap)
{
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, dev) != cudaSuccess) {
        cudaGetLastError();
        return -ENODEV;
    }
    snprintf(buf, cap, "%s (sm_%d%d, %d SMs, %.1f GiB)", p.name, p.major, p.minor,
             p.multiProcessorCount, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return 0;
}
