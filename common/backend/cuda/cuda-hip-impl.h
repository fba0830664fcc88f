/*
 * cuda-hip-impl.h — internals shared by the HiP .cu files of this folder (not a public header).
 */
#ifndef CUDA_HIP_IMPL_H
#define CUDA_HIP_IMPL_H

#include "cuda-hip.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>

/* ---- K/V addressing (the three modes of cuda_kv_view, cuda-hip.h) ---------------------------- */

/* The addressing part of a cuda_kv_view as the kernels carry it (passed by value). */
struct cuda_kv_addr {
    const uint8_t *k, *v;                    /* contiguous / slot pages */
    const int32_t *page;                     /* slot pages, or NULL */
    const unsigned long long *kptr, *vptr;   /* page pointers, or NULL (vptr: K-only readers) */
    int page_tokens;
    int hkv;
    int row_bytes;                           /* head_dim * element size */
};

/* Fill from a view (host); esize = bytes per element. */
static inline cuda_kv_addr cuda_kv_addr_of(const cuda_kv_view *kv, int hkv, int head_dim,
                                           int esize)
{
    cuda_kv_addr a;
    a.k = (const uint8_t *)kv->k_dev;
    a.v = (const uint8_t *)kv->v_dev;
    a.page = kv->page_dev;
    a.kptr = (const unsigned long long *)kv->kptr_dev;
    a.vptr = (const unsigned long long *)kv->vptr_dev;
    a.page_tokens = kv->page_tokens;
    a.hkv = hkv;
    a.row_bytes = head_dim * esize;
    return a;
}

#ifdef __CUDACC__
/* t / n and t % n for t >= 0, n >= 1, in 32 bits when t fits (the usual case: a 64-bit
 * division is a long subroutine on the GPU). */
static __device__ __forceinline__ long long cuda_kv_divmod(long long t, int n, int *rem)
{
    if ((unsigned long long)t <= 0xffffffffull) {
        unsigned q = (unsigned)t / (unsigned)n;
        *rem = (int)((unsigned)t - q * (unsigned)n);
        return (long long)q;
    }
    long long q = t / n;
    *rem = (int)(t - q * n);
    return q;
}

/* Byte addresses of element 0 of the K row (*kp) and, when vp != NULL, the V row (*vp) of token
 * t, KV head h; every kernel that reads K or V goes through this:
 *   contiguous:    base + (t * hkv + h) * row_bytes
 *   slot pages:    base + ((page[t / pt] * pt + t % pt) * hkv + h) * row_bytes
 *   page pointers: ptr[t / pt] + (h * pt + t % pt) * row_bytes
 * Rows are 16-byte aligned in every mode when the bases / page addresses are and row_bytes is a
 * multiple of 16. */
static __device__ __forceinline__ void cuda_kv_rows(const cuda_kv_addr &a, long long t, int h,
                                                    const uint8_t **kp, const uint8_t **vp)
{
    if (a.kptr) {
        int r;
        const long long pg = cuda_kv_divmod(t, a.page_tokens, &r);
        const size_t off = ((size_t)h * (size_t)a.page_tokens + (size_t)r) * (size_t)a.row_bytes;
        *kp = (const uint8_t *)(uintptr_t)__ldg(a.kptr + pg) + off;
        if (vp) *vp = (const uint8_t *)(uintptr_t)__ldg(a.vptr + pg) + off;
        return;
    }
    long long slot = t;
    if (a.page) {
        int r;
        const long long pg = cuda_kv_divmod(t, a.page_tokens, &r);
        slot = (long long)a.page[pg] * a.page_tokens + r;
    }
    const size_t off = ((size_t)slot * (size_t)a.hkv + (size_t)h) * (size_t)a.row_bytes;
    *kp = a.k + off;
    if (vp) *vp = a.v + off;
}

/* The K row alone. */
static __device__ __forceinline__ const uint8_t *cuda_kv_krow(const cuda_kv_addr &a, long long t,
                                                              int h)
{
    const uint8_t *kp;
    cuda_kv_rows(a, t, h, &kp, (const uint8_t **)0);
    return kp;
}
#endif

/* Host check of a view's addressing (n_kv and dtype are checked by the callers): contiguous
 * needs k_dev (and v_dev when need_v), slot pages page_tokens >= 1, page pointers
 * page_tokens >= 1 (and vptr_dev when need_v). 0 or -EINVAL. */
static inline int cuda_kv_check(const cuda_kv_view *kv, bool need_v)
{
    if (kv->kptr_dev) {
        if (kv->page_tokens < 1 || (need_v && !kv->vptr_dev)) return -EINVAL;
        return 0;
    }
    if (!kv->k_dev || (need_v && !kv->v_dev)) return -EINVAL;
    if (kv->page_dev && kv->page_tokens < 1) return -EINVAL;
    return 0;
}

/* ---- stage-0 probe cache layout (cuda_kv_view.pc_*) ----------------------------------------- */

/* A chunk of lc tokens keeps CUDA_PC_SLOTS keys: the probes of the first three descent levels
 * (HIP.md §2.5), at offsets m * lc / 16 for m in 1..15 without 8 (slot = m - 1, minus one past
 * 8). The model fills it (model-paged.cu), the mask kernels read it (hip-mask.cu). */
#define CUDA_PC_SLOTS 14

/* A chunk size the layout serves (offsets in 1/16 steps, three levels above single keys). */
static inline __host__ __device__ bool cuda_pc_lc_ok(int lc)
{
    return lc >= 32 && lc % 16 == 0;
}

/* Offset in the chunk of slot's key. */
static inline __host__ __device__ int cuda_pc_offset(int slot, int lc)
{
    return (slot + 1 + (slot >= 7 ? 1 : 0)) * (lc / 16);
}

/* Byte offset in a probe cache ([chunks][CUDA_PC_SLOTS][hkv][row_bytes]) of the row of chunk j,
 * slot, KV head g. */
static inline __host__ __device__ size_t cuda_pc_row_off(long long j, int slot, int hkv, int g,
                                                        int row_bytes)
{
    return (((size_t)j * CUDA_PC_SLOTS + (size_t)slot) * (size_t)hkv + (size_t)g) *
           (size_t)row_bytes;
}

/* Slot of the key at offset o of a chunk, or -1 when the cache does not keep it. */
static inline __host__ __device__ int cuda_pc_slot(unsigned o, int lc)
{
    const unsigned step = (unsigned)lc / 16u;
    if (o % step != 0 || o % (8u * step) == 0) return -1; /* not a probe, or offset 0 or lc/2 */
    const unsigned m = o / step; /* 1..15 without 8 */
    return (int)(m - 1u - (m > 8u ? 1u : 0u));
}

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
