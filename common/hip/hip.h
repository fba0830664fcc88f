/*
 * hip.h — HiP attention (InfiniteHiP) on the CPU: configuration, mask estimation (the
 * hierarchical pruning of shared/HIP.md §2), block-sparse attention over sink + selected blocks +
 * sliding window (§3), and an attention provider for the model with the decode-time mask
 * refresh schedule of §5.
 *
 * This is the reference implementation the CUDA kernels are checked against, so it follows
 * HIP.md literally (probe midpoints, strict '>' ties, max over all query heads, exact top-k,
 * realign + split, the StreamingLLM layout of BSA). The descent runs ceil(log2(lc)) + 1 passes
 * like the reference (its last pass re-probes the survivor; the test vectors confirm it counts).
 * Two deliberate choices:
 *   - the stage-0 chunk grid uses the LIVE key count T (the reference pads to the configured
 *     maximum context on its paged path; with dense K, as in the test vectors, it uses T too);
 *   - scores are compared in fp32 (the reference rounds dot products to bf16; set
 *     hip_args.score_bf16 to emulate that).
 *
 * Keys in the cache are NOT rotated (HIP.md §4); every consumer here rotates on the fly with a
 * cpu_rope table (any style: NeoX for the reference vectors, NORM for GGUF llama models).
 *
 * Ownership: hip_config is a plain value (no pointers; ~70 KB because of the per-layer lists,
 * so keep it off small stacks). hip_mask and hip_work own heap memory:
 * init/free pairs. Nothing here keeps pointers to the caller's q/K/V after a call returns.
 */
#ifndef HIP_HIP_H
#define HIP_HIP_H

#include "../backend/cpu/cpu.h"
#include "../base/cm.h"
#include "../model/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define HIP_MAX_STAGES 4
#define HIP_MAX_LAYERS 256       /* entries of a per-layer "layers" list */
#define HIP_MAX_DENSE_LAYERS 64  /* entries of "dense_layers" */

/* ---- configuration (HIP.md §1) ----------------------------------------------------------------- */

/* Pruning-time RoPE ("scan_extend_backend", §2.4). */
enum hip_scan_rope {
    HIP_SCAN_RELATIVE = 0, /* "relative": q rows at sw+1, left probe key at 0, right at 1 */
    HIP_SCAN_CHUNK = 1,    /* "streaming": key at its chunk's index, q at min(pos, CC + sw) */
};

/* BSA-time RoPE ("sa_extend_backend", §3.3). */
enum hip_sa_rope {
    HIP_SA_STREAMING = 0, /* "streaming": sink + selected laid out just before the window */
};

/* One pruning stage, in the code's numbering (§0): splits its input candidates into chunks of
 * chunk_size and keeps one representative per chunk. */
typedef struct hip_stage {
    int block_size_q;   /* queries sharing one mask (64) */
    int block_stride_q; /* consecutive queries mean-pooled into one probe row (4, 4, 1) */
    int chunk_size;     /* lc (256, 32, 8) */
    int64_t stage_k;    /* tokens of this stage's INPUT candidate set; 0 = everything (stage 0) */
    int stage_stride;   /* only 1 is supported */
} hip_stage;

typedef struct hip_layer_config {
    int64_t second_stage_k;      /* tokens kept by the last stage (2048; 4096 in special layers) */
    int64_t sliding_window_size; /* n_stream (1024) */
    int64_t sink_token_size;     /* n_sink (256) */
    int sa_rope;                 /* enum hip_sa_rope */
    int scan_rope;               /* enum hip_scan_rope (special layers: HIP_SCAN_CHUNK) */
    int n_stages;
    hip_stage stages[HIP_MAX_STAGES];
} hip_layer_config;

typedef struct hip_config {
    /* "dense_layers": the special layers (k3 = 4096, chunk-indexed pruning RoPE). Negative
     * entries count from the end (-1 = last layer). Default {0, 1, 2, -1}: the paper's first three
     * layers plus the reference's last one (its hard-coded {0,1,2,3,31} assumes 32 layers). */
    int n_dense_layers;
    int dense_layers[HIP_MAX_DENSE_LAYERS];
    /* "layers": either the pair [special, normal] (n_per_layer == 0) or one entry per layer. */
    hip_layer_config special, normal;
    int n_per_layer;
    hip_layer_config per_layer[HIP_MAX_LAYERS];
    /* "prefill_layers": same shape, used for prefill when has_prefill_layers. */
    bool has_prefill_layers;
    hip_layer_config prefill_special, prefill_normal;
    int n_prefill_per_layer;
    hip_layer_config prefill_per_layer[HIP_MAX_LAYERS];

    int block_sparse_block_size_q; /* BSA query block (64); must equal every stage's block_size_q */
    int block_sparse_block_size_k; /* BSA key block (8); not a JSON key */
    int metadata_cache_max_batch_size; /* 32; accepted, the CPU provider keeps one sequence */
    int n_refresh;                     /* entries of mask_refresh_interval (= stages refreshed) */
    int mask_refresh_interval[HIP_MAX_STAGES]; /* decode steps between runs of stage i (32,16,8) */
    bool using_extend; /* true: pruning/BSA positions of §2.4/§3.3; false: true positions */
    bool score_bf16;   /* round pruning dot products to bf16 like the reference; not a JSON key */
    /* Prefill chunks of ≥ 2 query blocks: the last block_size_q queries get a sliding window of
     * model_context_length - n_sink - second_stage_k - block_size_q ("last block near-dense",
     * HIP.md §6; reference default on). model_context_length 0 = the model's trained length.
     * Not JSON keys. */
    bool prefill_last_block_dense;
    int64_t model_context_length;
} hip_config;

/* The defaults of HIP.md §1 ("fast" refresh preset). */
CM_API void hip_config_default(hip_config *c);
/* Defaults of one layer kind (special = the "dense_layers" entry of the pair). */
CM_API void hip_layer_config_default(hip_layer_config *lc, bool special);
/* Refresh-interval presets: "3k" (16,8,4), "fast" (32,16,8), "flash" (96,24,8).
 * Returns 0 or -EINVAL (unknown name). */
CM_API int hip_config_preset(hip_config *c, const char *name, cm_err *err);
/* Apply a JSON configuration (the keys of HIP.md §1) on top of *c. `json_or_path` is JSON text
 * if its first non-blank character is '{', else the path of a file holding it. Strict JSON;
 * unknown keys are an error (-CM_EFORMAT naming the key), deprecated keys (apply_v_dot,
 * prefill_always_dense, decode_always_dense, force_dense, prefill_dense_threshold) are ignored
 * with a warning. On error *c is left unchanged. */
CM_API int hip_config_parse(hip_config *c, const char *json_or_path, cm_err *err);
/* Check consistency for a model of n_layer layers (≤ 0: skip layer-count checks): stage
 * geometry, block sizes, per-layer list length. Returns 0 or -CM_EFORMAT / -CM_EUNSUPPORTED. */
CM_API int hip_config_validate(const hip_config *c, int n_layer, cm_err *err);
/* Whether layer il of n_layer is a special ("dense_layers") layer. */
CM_API bool hip_config_is_special(const hip_config *c, int il, int n_layer);
/* The parameters of layer il (prefill: those of "prefill_layers" when given). */
CM_API const hip_layer_config *hip_config_layer(const hip_config *c, int il, int n_layer,
                                                bool prefill);
/* Write a one-line human-readable summary of a layer config into buf. */
CM_API void hip_layer_config_str(const hip_layer_config *lc, char *buf, size_t n);

/* ---- one call's inputs ------------------------------------------------------------------------- */

typedef struct hip_args {
    const hip_layer_config *layer; /* borrowed */
    int block_size_q;      /* query block of masks and BSA (= config block_sparse_block_size_q) */
    int block_size_k;      /* BSA key block (8): the selected unit of the final list */
    bool using_extend;     /* see hip_config */
    bool score_bf16;       /* see hip_config */
    cpu_attn_shape shape;  /* heads, KV heads, head dim, logit scale (applied to q) */
    const cpu_rope *rope;  /* borrowed; NULL = rotate nothing (q and K already rotated) */
    cpu_kv_layer kv;       /* the layer's cache: row t = token t, n_head_kv × head_dim, un-rotated */
    int64_t n_kv;          /* live length T: keys [0, T) exist; must be ≥ pos0 + n_tok */
} hip_args;

/* Fill a hip_args from a config for layer il (prefill or decode) of a model. */
CM_API void hip_args_from_config(hip_args *a, const hip_config *c, int il, int n_layer,
                                 bool prefill);

/* ---- masks (HIP.md §2) ------------------------------------------------------------------------- */

/* The selected key blocks of each query block, and the stage caches (§5): the candidate list
 * that entered each stage s ≥ 1, per query block. */
typedef struct hip_mask {
    int max_qblk;    /* capacity in query blocks */
    int kb;          /* row length of idx: second_stage_k / last chunk size */
    int n_stages;
    int cand_cap[HIP_MAX_STAGES]; /* capacity of the stage-s input list (0 for s = 0) */

    /* valid after hip_mask_estimate: */
    int n_qblk;      /* query blocks of the last call (ceil(n_tok / block_size_q)) */
    int64_t pos0;    /* first query position of the last call */
    int64_t *idx;    /* [max_qblk][kb] key-block starts, ascending, padded with INT64_MAX */
    int32_t *ks;     /* [max_qblk] valid entries of each idx row */
    int64_t *cand_L[HIP_MAX_STAGES]; /* [max_qblk][cand_cap[s]] stage-s input, ascending */
    int64_t *cand_R[HIP_MAX_STAGES];
    int32_t *cand_n[HIP_MAX_STAGES]; /* [max_qblk] entries */
} hip_mask;

/* Allocate a mask for up to max_qblk query blocks of layer config lc. Returns 0 or -ENOMEM. */
CM_API int hip_mask_init(hip_mask *m, const hip_layer_config *lc, int max_qblk);
CM_API void hip_mask_free(hip_mask *m);

/* Scratch of the kernels; grows on demand (allocation happens only when a call needs more than
 * any call before). One per thread that calls hip_* concurrently. */
typedef struct hip_work hip_work;
CM_API hip_work *hip_work_init(void);
CM_API void hip_work_free(hip_work *w);

/* Estimate the mask of n_tok queries at positions pos0..pos0+n_tok-1.
 * q: [n_tok][n_head][head_dim] un-rotated, not yet multiplied by shape.scale.
 * first_stage: 0 runs every stage; s > 0 starts from m's cached stage-s input of query block 0
 * (decode refresh, §5; requires n_tok ≤ block_size_q). The stage inputs computed on the way are
 * stored in m (the stage caches), the final lists in m->idx / m->ks.
 * pool may be NULL (single thread). Returns 0, -EINVAL (bad arguments), -ENOMEM. */
CM_API int hip_mask_estimate(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok,
                             int first_stage, hip_mask *m, hip_work *w, cm_pool *pool,
                             cm_err *err);

/* ---- block-sparse attention (HIP.md §3) ------------------------------------------------------- */

/* Attention of n_tok queries at pos0.. over sink ∪ selected blocks ∪ window, one softmax.
 * The mask's query block b serves queries [b*bq, (b+1)*bq) of THIS call (its idx/ks may come
 * from an earlier call: decode reuse); the streaming layout uses this call's block positions.
 * out: [n_tok][n_head][head_dim]. Returns 0, -EINVAL, -ENOMEM. */
CM_API int hip_bsa(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok,
                   const hip_mask *m, float *out, hip_work *w, cm_pool *pool, cm_err *err);

/* Mask estimation (all stages) then BSA. */
CM_API int hip_attention(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok,
                         hip_mask *m, float *out, hip_work *w, cm_pool *pool, cm_err *err);

/* The key set one query sees (for tests and debugging): the same layout code the BSA kernel
 * uses. For the query at position p (in query block qblk of a call starting at pos0), writes
 * up to cap entries and returns the number of attended keys (may exceed cap). */
enum hip_key_set { HIP_SET_SINK = 0, HIP_SET_SELECTED = 1, HIP_SET_WINDOW = 2 };
typedef struct hip_key_ref {
    int64_t t;    /* token (row of the cache) */
    int64_t vpos; /* position the key is rotated to */
    int set;      /* enum hip_key_set */
} hip_key_ref;
CM_API int64_t hip_bsa_keys(const hip_args *a, const hip_mask *m, int64_t pos0, int64_t n_tok,
                            int64_t p, hip_key_ref *keys, int64_t cap);

/* ---- NumPy .npy arrays (the reference test vectors, shared/testdata/hip-ref) -------------------- */

typedef struct hip_npy {
    char descr[8];     /* e.g. "<u2", "|i1", "<i8", "<f8" (little-endian or byte types only) */
    int ndim;
    int64_t shape[8];
    int64_t n;         /* elements */
    size_t elem;       /* bytes per element */
    void *data;        /* owned; n * elem bytes, C order */
} hip_npy;

/* Read a version 1.x/2.x .npy file (C order). Returns 0, -ENOENT, -EIO, -ENOMEM, or -CM_EFORMAT
 * (bad magic, unsupported dtype or fortran order, size mismatch). Free with hip_npy_free. */
CM_API int hip_npy_load(const char *path, hip_npy *out, cm_err *err);
CM_API void hip_npy_free(hip_npy *a);

/* ---- attention provider for the model (HIP.md §5, §6) ---------------------------------------- */

/* The HiP attention provider: plug into a context with mdl_ctx_set_attn (which takes
 * ownership). Per layer it keeps the decode-time stage caches and final block lists (§5):
 *   prefill chunk (n_tok > 1): all stages, the layer's step counter reset to 0;
 *   decode step (n_tok == 1) at counter c: hip_refresh_stage(c) decides whether to run all
 *   stages, start from the cached stage-1/2 input, or reuse the last final lists; c += 1.
 * (A 1-token prefill chunk is indistinguishable from a decode step and is treated as one.)
 * Buffers are sized on the first call from the context (n_chunk). The config is copied and
 * validated for the model. Returns 0, -CM_EFORMAT / -CM_EUNSUPPORTED (config), -ENOMEM. */
CM_API int hip_attn_provider_init(mdl_attn *out, const mdl_model *m, const hip_config *c,
                                  cm_err *err);

/* Per-layer counters of a HiP provider (for tests and /Stats). */
typedef struct hip_attn_stats {
    int64_t step;            /* decode counter c of the next decode step of this layer */
    int last_first_stage;    /* last decode call: 0..n_stages-1 = first stage run, n_stages =
                              * lists reused; -1 = the last call was a prefill chunk */
    int n_stages;
    int64_t n_decode[HIP_MAX_STAGES + 1]; /* decode calls per branch (index as above) */
    int64_t n_prefill;       /* prefill chunks */
    int64_t n_last_block;    /* prefill chunks whose last block used the near-dense window */
} hip_attn_stats;

/* Returns 0, or -EINVAL when a is not a HiP provider or il is out of range. */
CM_API int hip_attn_provider_stats(const mdl_attn *a, int il, hip_attn_stats *out);

/* Which stage a decode step starts from under intervals (n0, n1, n2, ...) at step counter c:
 * 0 = full refresh, s = start from the cached stage-s input, n_stages = reuse the final lists
 * (BSA only). c == 0 is always a full refresh. */
CM_API int hip_refresh_stage(const hip_config *c, int n_stages, int64_t step);

#ifdef __cplusplus
}
#endif
#endif /* HIP_HIP_H */
