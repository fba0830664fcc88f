/*
 * cuda-hip-impl.h — internals shared by the HiP .cu files of this folder (not a public header).
 */
#ifndef CUDA_HIP_IMPL_H
#define CUDA_HIP_IMPL_H

#include "cuda-hip.h"

#include <cuda_runtime.h>

/* Scratch slots of a cuda_hip_work: each kernel family uses its own slots so that buffers of
 * the mask kernels and of BSA never alias within one call sequence. */
enum cuda_hip_slot {
    CUDA_SLOT_MASK0 = 0, /* mask estimation: 0 .. 7 */
    CUDA_SLOT_ATTN0 = 8, /* BSA / dense attention: 8 .. 15 */
    CUDA_SLOT_COUNT = 16,
};

struct cuda_hip_work {
    void *buf[CUDA_SLOT_COUNT];
    size_t cap[CUDA_SLOT_COUNT];
    /* what the BSA decode cos/sin table (attn-kernels.cuh, slot CUDA_SLOT_ATTN0 + 2) was built
     * for: the rope's inv_freq_dev, n_rot and the device (key NULL = not built) */
    const void *cs_key;
    int cs_nrot, cs_dev;
};

/* Device buffer of slot `slot` with at least `bytes` bytes (grown with cudaMalloc, contents not
 * kept across growth). NULL on allocation failure. Growth synchronizes the device (cudaFree). */
void *cuda_hip_work_get(cuda_hip_work *w, int slot, size_t bytes);

/* Return CUDA_ERR(e) for a failed call, after logging where (file, line, the call's text). */
int cuda_hip_fail(cudaError_t e, const char *what, const char *file, int line);
#define CUDA_TRY(call)                                                                            \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) return cuda_hip_fail(e_, #call, __FILE__, __LINE__);               \
    } while (0)

#endif /* CUDA_HIP_IMPL_H */
