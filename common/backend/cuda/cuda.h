/*
 * cuda.h — the CUDA backend's C interface (kernels live in the .cu files of this folder only).
 * Compiled when the build has CUDA on (IHIP_HAVE_CUDA); everything else builds without it.
 */
#ifndef CUDA_BACKEND_H
#define CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices visible (0 when there is no driver or GPU); never fails. */
int cuda_device_count(void);
/* One line describing device `dev` into buf (name, SMs, memory); 0 or -ENODEV. */
int cuda_device_describe(int dev, char *buf, size_t cap);

/* y[r][i] = x[r][i] / sqrt(mean(x[r]^2) + eps) * g[i] for n_rows rows of n f32, on `stream`
 * (a cudaStream_t; NULL = default stream). Device pointers. Returns 0 or a negative
 * cudaError_t. */
int cuda_rms_norm_f32(const float *x, const float *g, float *y, int64_t n_rows, int64_t n, float eps,
                      void *stream);

#ifdef __cplusplus
}
#endif
#endif /* CUDA_BACKEND_H */
