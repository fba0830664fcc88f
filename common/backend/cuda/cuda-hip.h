/*
 * cuda-hip.h — HiP attention on the GPU: mask estimation (shared/HIP.md §2), block-sparse
 * attention for prefill and decode (§3), and the dense attention kernels that are our own
 * baseline. The CPU reference in common/hip (hip.h) defines what every function here computes:
 * same arguments, same key sets, same streaming position layout, same tie rules; the tests in
 * tests/cuda compare them on random inputs.
 *
 * Conventions
 *   - Every pointer named *_dev is device memory; the rest is host memory.
 *   - Keys are stored UN-ROTATED (HIP.md §4); kernels rotate keys and queries on the fly with a
 *     cuda_rope (double-precision angles reduced before sincos, like cpu_rope, so positions up to
 *     millions stay exact to fp32 rounding).
 *   - K/V: bf16 (default) or fp8 e4m3 with one scale per tensor; accumulation in fp32.
 *   - Queries and outputs are f32 [n_tok][n_head][head_dim] (queries un-rotated, not scaled).
 *   - Functions enqueue work on `stream` (a cudaStream_t; NULL = the default stream) and return
 *     0 or a negative error (-EINVAL for bad arguments, -ENOMEM, or -(1000 + cudaError_t) for a
 *     CUDA failure). They never synchronize unless said so.
 */
#ifndef CUDA_HIP_H
#define CUDA_HIP_H

#include <stddef.h>
#include <stdint.h>

#include "../../hip/hip.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CUDA_ERR(e) (-(1000 + (int)(e))) /* a cudaError_t as our negative return value */

enum cuda_kv_dtype {
    CUDA_KV_BF16 = 0,
    CUDA_KV_FP8 = 1, /* e4m3; value = stored * scale */
};

/* One layer's K and V as the kernels read them. Three addressings:
 *  - contiguous (page_dev == NULL, kptr_dev == NULL): token t, KV head h at element
 *    (t * n_head_kv + h) * head_dim of k_dev / v_dev;
 *  - slot pages (page_dev != NULL): the same with t replaced by
 *    page_dev[t / page_tokens] * page_tokens + t % page_tokens;
 *  - page pointers (kptr_dev != NULL; k_dev, v_dev, page_dev unused): page p = t / page_tokens
 *    holds its K at device-accessible address kptr_dev[p] and its V at vptr_dev[p], each laid out
 *    [n_head_kv][page_tokens][head_dim] (the kvstore block layout, kvstore.h), so token t, head h
 *    is element (h * page_tokens + t % page_tokens) * head_dim from there. An address may be GPU
 *    memory (a cache slot) or host memory the GPU can read (a cudaHostRegister'ed kvstore
 *    segment, read over the bus): this is how the offloaded KV of issue 7 is reached. Addresses
 *    are aligned to 16 bytes. vptr_dev may be NULL for a view only mask estimation reads.
 * Keys are un-rotated. */
typedef struct cuda_kv_view {
    const void *k_dev;
    const void *v_dev;
    int dtype;             /* enum cuda_kv_dtype */
    float k_scale, v_scale; /* fp8 only (1 for bf16) */
    const int32_t *page_dev; /* may be NULL */
    int page_tokens;        /* tokens per page when page_dev or kptr_dev != NULL */
    int64_t n_kv;           /* live length T: tokens [0, T) exist */
    const uint64_t *kptr_dev; /* [ceil(T / page_tokens)] or NULL */
    const uint64_t *vptr_dev; /* [ceil(T / page_tokens)] or NULL */
    /* Optional, mask estimation only: a GPU copy of the keys the first three descent levels of
     * stage 0 probe (HIP.md §2.5: offsets o of a chunk of pc_lc tokens starting at
     * pc_base + j * pc_lc with o a multiple of pc_lc / 16 but not of pc_lc / 2), for the chunks j
     * whose pc_ok_dev[j] is set: [pc_chunks][14][n_head_kv][head_dim] raw K elements. The same
     * bytes as the keys' homes, so it only changes where they are read from. NULL = none. */
    const void *pc_dev;
    const uint8_t *pc_ok_dev;
    int64_t pc_base, pc_chunks;
    int pc_lc;
} cuda_kv_view;

/* RoPE for the kernels: same meaning as cpu_rope (style, head_dim, n_rot, inv_freq in double). */
typedef struct cuda_rope {
    int style;                /* enum cpu_rope_style */
    int head_dim;
    int n_rot;
    const double *inv_freq_dev; /* [n_rot/2] */
} cuda_rope;

/* Upload cpu_rope's inv_freq; free with cuda_rope_free. Returns 0 or a negative error. */
int cuda_rope_init(cuda_rope *r, const cpu_rope *cpu);
void cuda_rope_free(cuda_rope *r);

/* What one call needs: the GPU mirror of hip_args. */
typedef struct cuda_hip_args {
    const hip_layer_config *layer; /* host, borrowed */
    int block_size_q;
    int block_size_k;
    bool using_extend;
    bool score_bf16;
    cpu_attn_shape shape;          /* heads, KV heads, head dim, logit scale */
    const cuda_rope *rope;         /* NULL = rotate nothing */
    cuda_kv_view kv;
} cuda_hip_args;

/* Masks on the GPU, the same content as hip_mask (idx padded with INT64_MAX, ascending;
 * ks = valid entries per query block; the stage caches cand_* of stages s ≥ 1). The struct
 * itself is host memory; the arrays are device memory. */
typedef struct cuda_hip_mask {
    int max_qblk;
    int kb;
    int n_stages;
    int cand_cap[HIP_MAX_STAGES];
    int n_qblk;
    int64_t pos0;
    int64_t *idx_dev;                    /* [max_qblk][kb] */
    int32_t *ks_dev;                     /* [max_qblk] */
    int64_t *cand_L_dev[HIP_MAX_STAGES]; /* [max_qblk][cand_cap[s]] */
    int64_t *cand_R_dev[HIP_MAX_STAGES];
    int32_t *cand_n_dev[HIP_MAX_STAGES]; /* [max_qblk] */
} cuda_hip_mask;

int cuda_hip_mask_init(cuda_hip_mask *m, const hip_layer_config *lc, int max_qblk);
void cuda_hip_mask_free(cuda_hip_mask *m);
/* Copy a GPU mask to a CPU hip_mask of the same geometry (synchronizes `stream`), and back. */
int cuda_hip_mask_download(const cuda_hip_mask *m, hip_mask *out, void *stream);
int cuda_hip_mask_upload(cuda_hip_mask *m, const hip_mask *in, void *stream);

/* Device scratch of the kernels (grows on demand, like hip_work). One per stream. */
typedef struct cuda_hip_work cuda_hip_work;
cuda_hip_work *cuda_hip_work_init(void);
void cuda_hip_work_free(cuda_hip_work *w);

/* hip_mask_estimate on the GPU (same arguments; q_dev un-rotated f32). */
int cuda_hip_mask_estimate(const cuda_hip_args *a, const float *q_dev, int64_t pos0,
                           int64_t n_tok, int first_stage, cuda_hip_mask *m, cuda_hip_work *w,
                           void *stream);

/* hip_bsa on the GPU: n_tok == 1 uses the split-K flash-decoding kernel with a log-sum-exp
 * merge; n_tok > 1 the FlashAttention-2-style tiled kernel. */
int cuda_hip_bsa(const cuda_hip_args *a, const float *q_dev, int64_t pos0, int64_t n_tok,
                 const cuda_hip_mask *m, float *out_dev, cuda_hip_work *w, void *stream);

/* Dense causal attention (the baseline and the model's ordinary path): n_tok queries at
 * pos0.. over keys [0, pos0 + n_tok) rotated to their true positions; equals cpu_attn_dense.
 * n_tok == 1: split-K flash-decoding; n_tok > 1: tiled FlashAttention-2-style. */
int cuda_attn_dense(const cpu_attn_shape *s, const cuda_rope *rope, const cuda_kv_view *kv,
                    const float *q_dev, int64_t pos0, int64_t n_tok, float *out_dev,
                    cuda_hip_work *w, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* CUDA_HIP_H */
