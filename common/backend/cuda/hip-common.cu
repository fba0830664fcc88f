/*
 * hip-common.cu — pieces every HiP kernel file shares: the RoPE upload and the scratch pool.
 */
#include "cuda-hip-impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

int cuda_hip_fail(cudaError_t e, const char *what, const char *file, int line)
{
    fprintf(stderr, "cuda: %s failed: %s (%s:%d)\n", what, cudaGetErrorString(e), file, line);
    return CUDA_ERR(e);
}

int cuda_rope_init(cuda_rope *r, const cpu_rope *cpu)
{
    if (!r || !cpu || cpu->n_rot <= 0 || cpu->n_rot > cpu->head_dim || (cpu->n_rot & 1))
        return -EINVAL;
    r->style = cpu->style;
    r->head_dim = cpu->head_dim;
    r->n_rot = cpu->n_rot;
    double *d = NULL;
    size_t bytes = (size_t)(cpu->n_rot / 2) * sizeof(double);
    CUDA_TRY(cudaMalloc(&d, bytes));
    cudaError_t e = cudaMemcpy(d, cpu->inv_freq, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        cudaFree(d);
        return cuda_hip_fail(e, "cudaMemcpy(inv_freq)", __FILE__, __LINE__);
    }
    r->inv_freq_dev = d;
    return 0;
}

void cuda_rope_free(cuda_rope *r)
{
    if (!r) return;
    cudaFree((void *)r->inv_freq_dev);
    r->inv_freq_dev = NULL;
}

cuda_hip_work *cuda_hip_work_init(void)
{
    return (cuda_hip_work *)calloc(1, sizeof(cuda_hip_work));
}

void cuda_hip_work_free(cuda_hip_work *w)
{
    if (!w) return;
    for (int i = 0; i < CUDA_SLOT_COUNT; i++) cudaFree(w->buf[i]);
    free(w);
}

void *cuda_hip_work_get(cuda_hip_work *w, int slot, size_t bytes)
{
    if (!w || slot < 0 || slot >= CUDA_SLOT_COUNT) return NULL;
    if (bytes == 0) bytes = 1;
    if (w->cap[slot] >= bytes) return w->buf[slot];
    cudaFree(w->buf[slot]);
    w->buf[slot] = NULL;
    w->cap[slot] = 0;
    size_t want = bytes + bytes / 4; /* some headroom so slowly growing sizes do not realloc */
    if (cudaMalloc(&w->buf[slot], want) != cudaSuccess) return NULL;
    w->cap[slot] = want;
    return w->buf[slot];
}
