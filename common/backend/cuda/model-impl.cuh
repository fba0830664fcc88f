/*
 * model-impl.cuh — internals shared by model-load.cu and model-forward.cu (not a public header).
 */
#ifndef CUDA_MODEL_IMPL_CUH
#define CUDA_MODEL_IMPL_CUH

#include "cuda-hip-impl.h"
#include "cuda-model.h"

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

typedef __nv_bfloat16 bf16;

/* One layer on the GPU. Matrices are row-major [n_out][n_in] bf16 like GGUF's rows; fused:
 * wqkv = Wq ‖ Wk ‖ Wv (rows), wgu = Wgate ‖ Wup (rows), so one GEMM computes q, k, v (and one
 * gate, up). */
struct cuda_layer {
    float *attn_norm; /* [n_embd] */
    float *ffn_norm;  /* [n_embd] */
    bf16 *wqkv;       /* [n_head*hd + 2*n_head_kv*hd][n_embd] */
    bf16 *wo;         /* [n_embd][n_head*hd] */
    bf16 *wgu;        /* [2*n_ff][n_embd] */
    bf16 *wdown;      /* [n_embd][n_ff] */
};

struct cuda_model {
    mdl_hparams hp;
    int dev;
    float *rope_freqs;         /* host [n_rot/2] or NULL */
    bf16 *tok_embd;            /* [n_vocab][n_embd] */
    bf16 *output;              /* [n_vocab][n_embd]; == tok_embd when tied (not freed twice) */
    float *output_norm;        /* [n_embd] */
    struct cuda_layer *layers; /* host array [n_layer] of device pointers */
    size_t bytes;
};


#include <cublas_v2.h>

/* Paged KV state of a context (model-paged.cu). Per (sequence, layer) five page tables of
 * max_pages device addresses each (PT_*): the home of a page (host page bound or flushed, or its
 * GPU ring slot) for K and V, the K and V the attention kernels read (a K‖V cache slot or the
 * home), and the K the mask kernels read (a keys-only cache slot or the home). */
enum { PT_HOME_K = 0, PT_HOME_V, PT_SA_K, PT_SA_V, PT_MK_K, PT_N };

struct cuda_cache {            /* one LRU page cache of every layer */
    int slots;                 /* per layer (0 = none) */
    size_t slot_bytes;         /* a whole page (K‖V) or its K half */
    uint8_t *data;             /* [n_layer][slots][slot_bytes] */
    long long *owner;          /* [n_layer][slots] seq * max_pages + page, or -1 */
    uint32_t *tick;            /* [n_layer][slots] last refresh that needed it */
    int32_t *slot_of;          /* [n_seq][n_layer][max_pages] or -1 */
    uint32_t *need;            /* [n_seq][n_layer][max_pages] tick of the last refresh needing it */
    int32_t *list;             /* [max_pages + 1] scratch: count, then missing pages */
    int32_t *assign;           /* [slots + 1] scratch: count, then (slot) per missing page */
};

struct cuda_paged {
    int pt;                    /* page tokens */
    int64_t max_pages;         /* per sequence: ceil(n_ctx / pt) */
    int64_t ring;              /* GPU ring pages per (sequence, layer) */
    size_t page_bytes, half_bytes;
    uint8_t *ring_dev;         /* [n_seq][n_layer][ring][page_bytes] */
    unsigned long long *tab;   /* [n_seq][n_layer][PT_N][max_pages] */
    int64_t *tail0;            /* host [n_seq]: pages >= tail0 live in the ring (home) */
    int64_t *ring_lo;          /* host [n_seq]: flushed pages [ring_lo, tail0) are still read
                                * from their ring copy (write-through until the slot is reused) */
    struct cuda_cache sa, mk;
    uint32_t tick;             /* refresh counter (0 never used) */
    unsigned long long *stat_dev; /* [16] device counters */
    cuda_offload_stats st;     /* host part */
    cuda_page_sink_fn sink;
    void *sink_user;
    unsigned long long *fix_dev;  /* [cap][2] (table index, value) scatter list */
    unsigned long long *fix_host; /* pinned mirror */
    int64_t fix_cap;
    /* the keys-only cache is updated after a full refresh on mk_stream, overlapping the rest of
     * the step (only later refreshes of that layer read it): mk_done[il] is waited for before
     * the next mask estimation of layer il (paged_before_mask) */
    cudaStream_t mk_stream;
    cudaEvent_t mk_go;
    cudaEvent_t *mk_done;  /* [n_layer] */
    bool *mk_pending;      /* [n_layer] */
    /* stage-0 probe cache (probe_cache_tokens > 0; cuda_kv_view.pc_*): per sequence, per layer
     * [pc_chunks[il]][CUDA_PC_SLOTS][n_head_kv][row bytes] at pc_off[il], flags at pc_okoff[il] */
    uint8_t *pc_dev, *pc_ok;
    size_t pc_seq_bytes, pc_seq_ok;
    size_t *pc_off, *pc_okoff; /* host [n_layer] */
    int64_t *pc_chunks, *pc_base; /* host [n_layer] */
    int *pc_lc;                   /* host [n_layer] */
    /* the page sink's copies (and its table updates) run on sk_stream after the chunk that
     * computed the pages (sk_chunk), overlapping the next chunk; at most one sink is in flight
     * (sk_done: pages [sk_lo, ...) of sequence sk_seq); a ring slot of those pages is reused
     * only after it (paged_prepare) */
    cudaStream_t sk_stream;
    cudaEvent_t sk_chunk, sk_done;
    int sk_seq;
    int64_t sk_lo;
    bool sk_pending;
    /* prefill prefix staging (stage_pages > 0): two buffers of stage_pages pages; layer l's
     * prefix pages [st_p0, st_p1) are copied into buffer l % 2 on st_stream while layer l - 1
     * computes */
    int64_t stage_pages;
    uint8_t *stage_dev[2];
    cudaStream_t st_stream;
    cudaEvent_t st_copied[2], st_free[2];
    int64_t st_p0, st_p1;
    int st_seq;
    bool st_on;
    bool prof;
    cudaEvent_t ev[4];
    double prof_ms[3];
};

/* A context (model-forward.cu). */
struct cuda_ctx {
    const cuda_model *m;
    int64_t n_ctx, n_chunk;
    int n_seq;
    int64_t rows; /* scratch rows: max(n_chunk, n_seq) */
    cudaStream_t stream;
    cublasHandle_t blas;
    cuda_rope rope;
    cpu_attn_shape shape;
    cuda_hip_work *work;
    int64_t *n_past; /* host [n_seq] */
    void **k, **v;   /* host [n_layer] → device [n_seq][n_ctx][n_head_kv][head_dim] of kv_dtype */
    int kv_dtype;    /* enum cuda_kv_dtype */
    size_t kv_elem;  /* bytes of one K/V element: 2 (bf16) or 1 (fp8) */
    float k_scale, v_scale; /* fp8: value = stored × scale (1 for bf16) */
    size_t kv_bytes;        /* all layers, K and V */

    /* scratch (device), rows × ... */
    float *x;           /* [rows][E] residual stream */
    bf16 *xn;           /* [rows][E] normed input of a GEMM */
    float *qkv;         /* [rows][qd + 2 kvd] */
    float *q;           /* [rows][qd] un-rotated queries */
    float *ao;          /* [rows][qd] attention output */
    bf16 *aob;          /* [rows][qd] */
    float *gu;          /* [rows][2 F] gate ‖ up */
    bf16 *h;            /* [rows][F] */
    float *logits;      /* [n_seq][V] */
    int32_t *tok_dev;   /* [rows] */
    int64_t *slot_dev;  /* [rows] cache slot of each row */
    int32_t *tok_host;  /* [rows] (pageable: copies from it complete before the call returns) */
    int64_t *slot_host; /* [rows] */

    /* HiP (NULL hip = dense) */
    hip_config *hip;
    int64_t hip_ctx_len; /* model_context_length in effect */
    cuda_hip_mask *dec;  /* [n_seq][n_layer] decode masks with the stage caches */
    bool *dec_valid;     /* [n_seq][n_layer] */
    int64_t *step;       /* [n_seq][n_layer] decode counter */
    cuda_hip_mask *pre;  /* [n_layer] prefill masks (one chunk) */

    /* paged KV (page_tokens > 0; model-paged.cu); NULL when not paged */
    struct cuda_paged *pg;
};

/* One K/V element into the cache: bf16 (inv_scale unused), or fp8 e4m3 of x · inv_scale
 * (round to nearest even, saturating to ±448 rather than NaN). */
static __device__ __forceinline__ void kv_put(bf16 *p, float x, float)
{
    *p = __float2bfloat16_rn(x);
}

static __device__ __forceinline__ void kv_put(uint8_t *p, float x, float inv_scale)
{
    *p = (uint8_t)__nv_cvt_float_to_fp8(x * inv_scale, __NV_SATFINITE, __NV_E4M3);
}

/* Benchmark fill: element i of rows [0, n) of one layer's K and V ← roughly N(0, 1): the sum
 * of the four 16-bit quarters of one 64-bit hash, each uniform in [-1, 1), times sqrt(3)/2
 * (Irwin–Hall with 4 terms: variance 1, |x| ≤ 3.47). */
static __device__ __forceinline__ float fill_value(uint64_t key, int64_t i)
{
    uint64_t h = key + (uint64_t)i * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    float s = 0.0f;
    for (int j = 0; j < 4; j++)
        s += (float)((h >> (16 * j)) & 0xffffu) * (1.0f / 32768.0f) - 1.0f;
    return s * 0.8660254f;
}

/* ---- model-paged.cu, for model-forward.cu ---- */
int paged_init(cuda_ctx *c, const cuda_ctx_params *p, cm_err *err);
void paged_free(cuda_ctx *c);
void paged_reset(cuda_ctx *c, int seq);
/* Wait for the page sink in flight (model-paged.cu), if any. */
int sink_wait(cuda_ctx *c);
/* The view attention (sa = true) or mask estimation reads for (seq, layer). */
cuda_kv_view paged_view(const cuda_ctx *c, int il, int seq, int64_t n_kv, bool sa);
/* Row destinations: check that tokens [pos0, pos0 + n) of seq fit the ring (-CM_ELIMIT). */
int paged_check_room(const cuda_ctx *c, int seq, int64_t pos0, int64_t n, cm_err *err);
/* Store the K/V of rows (slot = seq * n_ctx + pos) of layer il into their pages. */
void paged_store(cuda_ctx *c, int il, const float *qkv, int64_t n);
/* Before a mask estimation of layer il: wait for its keys-only cache update in flight. */
int paged_before_mask(cuda_ctx *c, int il);
/* After a decode refresh of (seq, layer) starting at stage fs: update the caches. */
int paged_after_refresh(cuda_ctx *c, int il, int seq, int fs, const cuda_hip_mask *m,
                        int64_t n_kv);
/* Before rows at [pos0, pos0 + n) of seq are stored: flushed pages whose ring slots they reuse
 * are read from host memory from now on. */
int paged_prepare(cuda_ctx *c, int seq, int64_t pos0, int64_t n);
/* Prefix staging around the layers of one prefill chunk of seq (no-ops when off). */
int paged_stage_begin(cuda_ctx *c, int seq);
int paged_stage_before(cuda_ctx *c, int il);
int paged_stage_after(cuda_ctx *c, int il);
/* After a prefill chunk: hand complete pages to the sink. */
int paged_after_chunk(cuda_ctx *c, int seq, bool all, cm_err *err);
void paged_prof_mark(cuda_ctx *c, int i);
void paged_prof_collect(cuda_ctx *c);

/* Where a logical tensor lives: device pointer, element count, and whether it is f32. */
int cuda_model_tensor_locate(const cuda_model *m, int layer, int kind, void **ptr, int64_t *n,
                             bool *is_f32);

#endif /* CUDA_MODEL_IMPL_CUH */
