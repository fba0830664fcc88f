/*
 * cuda-model.h — the Llama-family forward (common/model) on one GPU.
 *
 * A cuda_model holds every weight on the GPU in bf16 (matrices) and f32 (norm vectors): either
 * uploaded from an already-loaded CPU model (each GGUF tensor dequantised on the host with the
 * tn_* functions of common/tensor, then rounded to bf16), or generated on the GPU from a hash of
 * (seed, tensor, index) for benchmarking without a file. A cuda_ctx owns the KV caches of up to
 * n_seq sequences (bf16 or fp8 e4m3, keys UN-ROTATED, shared/HIP.md §4) and the scratch of one
 * forward; it runs prefill (chunks of up to n_chunk tokens of one sequence), decode (one token of
 * one sequence) and batched decode (one token of each of B sequences: every GEMM has B rows,
 * attention runs per sequence). Attention is cuda_attn_dense (cuda-hip.h), or HiP
 * (cuda_hip_mask_estimate + cuda_hip_bsa with the refresh schedule of common/hip's provider)
 * when the context is given a hip_config.
 *
 * Numerics: GEMMs are cuBLAS bf16 × bf16 with fp32 accumulation and an fp32 residual stream;
 * the activations entering a GEMM (normed x, attention output, SwiGLU output) are rounded to
 * bf16; RMSNorm, SwiGLU, softmax and logits are fp32.
 *
 * Errors: 0 or a negative code: -EINVAL (bad argument), -ENOMEM, -CM_ELIMIT (context full),
 * -ENODEV (no GPU), -CM_EUNSUPPORTED, or CUDA_ERR(e) = -(1000 + cudaError_t) / -(3000 + a
 * cublasStatus_t) for a failed CUDA / cuBLAS call; `err` (may be NULL) names the problem.
 * Every call that returns logits synchronizes the context's stream; nothing else blocks.
 * Threads: a context is used by one thread at a time; a model may be shared by contexts.
 */
#ifndef CUDA_MODEL_H
#define CUDA_MODEL_H

#include "../../base/cm.h"
#include "../../hip/hip.h"
#include "../../model/model.h"
#include "cuda-hip.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CUBLAS_ERR(s) (-(3000 + (int)(s))) /* a cublasStatus_t as our negative return value */

typedef struct cuda_model cuda_model;

/* Upload a loaded CPU model (the CPU model may be freed afterwards: nothing is borrowed).
 * Uses device `dev` (made current on the calling thread). Returns NULL with err filled. */
CM_API cuda_model *cuda_model_load(const mdl_model *cpu_model, int dev, cm_err *err);

/* A model of a known shape with weights generated on the GPU (no file, no tokenizer):
 *   "llama3-8b"     32 layers, 4096 embd, 32/8 heads, head_dim 128, ff 14336, vocab 128256,
 *                   rope base 500000 with Llama-3.1 scaling factors (factor 8, low 1, high 4,
 *                   original context 8192), untied output
 *   "llama3-1b"     16 layers, 2048 embd, 32/8 heads, head_dim 64, ff 8192, vocab 128256,
 *                   rope base 500000 with Llama-3.2 scaling (factor 32), tied output
 *   "smollm2-135m"  30 layers, 576 embd, 9/3 heads, head_dim 64, ff 1536, vocab 49152,
 *                   rope base 100000, plain, tied output
 *   "tiny"          4 layers, 512 embd, 4/2 heads, head_dim 128, ff 1024, vocab 4096,
 *                   rope base 500000 with the llama3-8b scaling factors, untied (tests)
 * Every matrix with n_in inputs is uniform with standard deviation 1/sqrt(n_in) (embedding and
 * output: 1/sqrt(n_embd), so tied and untied logits are both of order one); norm weights are
 * uniform in [0.8, 1.2]; so activations stay of order one. Uniform, not normal: a hash gives it
 * in three exact float operations, identical on host and GPU (cuda_model_synth_value).
 * Returns NULL with err filled. */
CM_API cuda_model *cuda_model_synthetic(const char *shape, uint64_t seed, int dev, cm_err *err);
CM_API void cuda_model_free(cuda_model *m);

/* Hyper-parameters (arch "llama"; for synthetic models n_ctx_train is the shape's trained
 * length). Valid while m lives. */
CM_API const mdl_hparams *cuda_model_hparams(const cuda_model *m);
/* Llama-3 style per-frequency divisors [n_rot/2] or NULL (valid while m lives). */
CM_API const float *cuda_model_rope_freqs(const cuda_model *m);
/* Bytes of GPU memory the weights take. */
CM_API size_t cuda_model_bytes(const cuda_model *m);

/* Logical tensors (GGUF names: token_embd, output_norm, output, blk.L.attn_norm, ...). */
enum cuda_tensor {
    CUDA_T_TOK_EMBD = 0, /* [n_vocab][n_embd] */
    CUDA_T_OUTPUT_NORM,  /* [n_embd] f32 */
    CUDA_T_OUTPUT,       /* [n_vocab][n_embd] (tied: the embedding) */
    CUDA_T_ATTN_NORM,    /* per layer [n_embd] f32 */
    CUDA_T_WQ,           /* [n_head*head_dim][n_embd] */
    CUDA_T_WK,           /* [n_head_kv*head_dim][n_embd] */
    CUDA_T_WV,           /* [n_head_kv*head_dim][n_embd] */
    CUDA_T_WO,           /* [n_embd][n_head*head_dim] */
    CUDA_T_FFN_NORM,     /* [n_embd] f32 */
    CUDA_T_GATE,         /* [n_ff][n_embd] */
    CUDA_T_UP,           /* [n_ff][n_embd] */
    CUDA_T_DOWN,         /* [n_embd][n_ff] */
    CUDA_T_COUNT
};

/* Elements of a logical tensor (layer ignored for the first three), 0 for a bad kind/layer. */
CM_API int64_t cuda_model_tensor_numel(const cuda_model *m, int layer, int kind);
/* Copy a logical tensor to host f32 (bf16 widened exactly); n must equal its numel.
 * Synchronous. For tests. */
CM_API int cuda_model_tensor_download(const cuda_model *m, int layer, int kind, float *out,
                                      int64_t n);
/* The value a synthetic model of `seed` holds at element i of tensor (layer, kind) before the
 * bf16 rounding of matrices (f32 norms are stored as is); needs the shape's hyper-parameters. */
CM_API float cuda_model_synth_value(const mdl_hparams *hp, uint64_t seed, int layer, int kind,
                                    int64_t i);
/* The bf16 rounding (nearest even) the GPU applies when it stores a weight or activation. */
CM_API float cuda_model_round_bf16(float x);

/* ---- contexts -------------------------------------------------------------------------------- */

typedef struct cuda_ctx_params {
    int64_t n_ctx;         /* KV capacity per sequence in tokens (0 = the model's trained length) */
    int64_t n_chunk;       /* prefill chunk (rows of one forward) (0 = 512) */
    int n_seq;             /* sequences (KV caches) of the context, also the largest decode batch
                            * (0 = 1) */
    const hip_config *hip; /* NULL = dense attention; else HiP with this config (copied) */
    /* KV cache element type: CUDA_KV_BF16 (default) or CUDA_KV_FP8 (e4m3, half the memory:
     * what lets 1M tokens of an 8B model fit on one GPU). fp8 stores round(k / k_scale) with
     * saturation to ±448, so |k| up to 448·k_scale is representable with a relative error
     * ≤ 2^-4; values below 2^-6·k_scale lose relative precision (subnormals). */
    int kv_dtype;     /* enum cuda_kv_dtype (cuda-hip.h) */
    float kv_k_scale; /* fp8 only: value = stored × scale (0 = CUDA_KV_FP8_SCALE) */
    float kv_v_scale; /* fp8 only (0 = CUDA_KV_FP8_SCALE) */

    /* Paged KV (issue 7; shared/HIP.md §7). page_tokens = 0: the KV cache above, n_seq × n_ctx
     * tokens in GPU memory. page_tokens > 0: no such cache. The KV of a sequence is a list of
     * pages of page_tokens tokens in the kvstore block layout ([K|V][kv_head][token][head_dim]):
     *  - pages the caller binds from host memory the GPU can read (cuda_ctx_bind_host: the
     *    blocks of a kvstore sequence in a cudaHostRegister'ed segment), read over the bus or
     *    copied into the two GPU caches below;
     *  - pages of tokens the context computes (prefill chunks, decode steps), in a GPU ring of
     *    tail_tokens per sequence and layer; a page sink (cuda_ctx_set_page_sink) copies
     *    complete pages out to host memory after each prefill chunk (prefill into the
     *    kvstore); the kernels keep reading a flushed page's ring copy until its ring slot is
     *    reused, then read it from host memory. So prefill GPU memory is tail_tokens whatever
     *    the prompt length: the last tail_tokens tokens are read from the GPU, older ones over
     *    the bus (tail_tokens ≥ the prompt: everything from the GPU).
     * HiP decode then keeps, per layer, a K‖V cache (sa_cache_tokens) of the pages block-sparse
     * attention reads (mask-selected blocks, sink, window) and a keys-only cache
     * (mask_cache_tokens) of the pages the cached mask stages rescan (the stage-1 candidates);
     * both LRU, updated on the GPU after every mask refresh; what is not cached is read from
     * host memory directly (the miss path). Dense attention reads through the same pages. */
    int page_tokens;           /* 0 = not paged; else a power of two in [8, 4096] */
    int64_t tail_tokens;       /* GPU ring per sequence and layer (0 = 2 × n_chunk + page_tokens,
                                * and at least 4096) */
    int64_t sa_cache_tokens;   /* per layer (0 = 32768; < 0: no cache) */
    int64_t mask_cache_tokens; /* per layer (0 = 65536; < 0: no cache) */
    /* Prefill prefix staging (HIP.md §6 "prefill with offload"): before each layer of a prefill
     * chunk, the prefix pages that are only in host memory (older than the ring) are copied,
     * for that layer only, into one of two GPU buffers of stage_tokens tokens (the next layer's
     * copy overlaps this layer's compute on a second stream), so prefill attention reads them
     * from the GPU instead of over the bus. Prefixes longer than stage_tokens stage their most
     * recent stage_tokens and read the rest over the bus. GPU memory: 2 × stage_tokens tokens of
     * ONE layer's K and V. 0 = off. */
    int64_t stage_tokens;
    /* HiP decode from host pages: a GPU copy of the keys the first three descent levels of a
     * full mask refresh probe in every complete stage-0 chunk (14 of every 256 keys with the
     * default chunk of 256, ~5.5 % of K), filled when host pages are bound
     * (cuda_ctx_bind_host), for up to probe_cache_tokens tokens per sequence; those probes then
     * read GPU memory instead of the bus. 0 = off. */
    int64_t probe_cache_tokens;
} cuda_ctx_params;

/* Default fp8 per-tensor scale: K/V of order one (what RMS-normed activations times 1/sqrt(n_in)
 * weights give) keep full relative precision, and magnitudes up to 28 fit. */
#define CUDA_KV_FP8_SCALE (1.0f / 16.0f)

CM_API cuda_ctx_params cuda_ctx_default_params(void);

typedef struct cuda_ctx cuda_ctx;

/* A context on the model's device. The model must outlive it. NULL with err filled. */
CM_API cuda_ctx *cuda_ctx_init(const cuda_model *m, const cuda_ctx_params *p, cm_err *err);
CM_API void cuda_ctx_free(cuda_ctx *c);
/* Forget sequence seq (its n_past = 0 and its HiP state); seq < 0 resets every sequence. */
CM_API void cuda_ctx_reset(cuda_ctx *c, int seq);
/* Tokens in the KV cache of sequence seq (-1 for a bad seq). */
CM_API int64_t cuda_ctx_n_past(const cuda_ctx *c, int seq);
/* The attention in use: "dense" or "hip". */
CM_API const char *cuda_ctx_attn_name(const cuda_ctx *c);
/* Bytes of GPU memory the KV caches take (all layers, K and V, n_seq × n_ctx tokens). */
CM_API size_t cuda_ctx_kv_bytes(const cuda_ctx *c);

/* FOR BENCHMARKS ONLY. Fill rows [0, n_tokens) of sequence seq's KV cache, in every layer, with
 * deterministic pseudo-random K and V (a hash of seed, layer, K/V and index: roughly N(0, 1),
 * like the K/V of this model's forward; not a real prompt's cache), then set n_past = n_tokens
 * and reset the sequence's HiP state so that the next decode step runs a full mask refresh.
 * This is the allowance of issue 7 ("a benchmark tool may fill the store with synthetic K/V of
 * the right geometry directly — say so in the results"): it lets a decode benchmark start at
 * 1M tokens without a 1M-token prefill. Results obtained this way must say so.
 * Errors: -EINVAL (bad seq), -CM_ELIMIT (n_tokens outside [0, n_ctx]), CUDA errors.
 * Synchronizes the context's stream. */
CM_API int cuda_ctx_fill_synthetic(cuda_ctx *c, int seq, int64_t n_tokens, uint64_t seed,
                                   cm_err *err);

/* Append n tokens to sequence seq (chunks of n_chunk) and copy the f32 logits of the last one
 * to logits[n_vocab] (may be NULL). Errors: -EINVAL (bad seq, token id or n ≤ 0), -CM_ELIMIT
 * (n_past + n > n_ctx), -ECANCELED (progress returned nonzero), CUDA errors. A failed call
 * leaves n_past as it was before the chunk that failed. */
CM_API int cuda_prefill(cuda_ctx *c, int seq, const int32_t *tokens, int64_t n, float *logits,
                        mdl_progress_fn progress, void *user, cm_err *err);
/* One decode step of sequence seq: logits[n_vocab] of the new token (may be NULL). */
CM_API int cuda_decode(cuda_ctx *c, int seq, int32_t token, float *logits, cm_err *err);
/* One decode step of B distinct sequences seqs[0..B) with tokens[0..B): one forward of B rows;
 * logits [B][n_vocab] (may be NULL). B ≤ n_seq. Same errors (checked before any work). */
CM_API int cuda_decode_batch(cuda_ctx *c, int B, const int *seqs, const int32_t *tokens,
                             float *logits, cm_err *err);

/* ---- paged contexts (page_tokens > 0) ----------------------------------------------------- */

/* Make tokens [0, n_tokens) of sequence seq the K/V held in host pages: for layer l and page
 * p < ceil(n_tokens / page_tokens), K at k_addr[l * n_pages + p] and V at v_addr[...], device
 * addresses of host memory the GPU can read (cudaHostRegister'ed, e.g. a kvstore segment's
 * block pool), 16-byte aligned, each [kv_head][page_tokens][head_dim] of the context's KV
 * dtype. The memory must stay valid and unchanged until the sequence is reset or rebound. A
 * partial last page is copied into the GPU ring (decode appends after it). Sets n_past =
 * n_tokens and resets the HiP state (the next decode step refreshes fully). Synchronizes.
 * Errors: -EINVAL (not paged, bad seq, NULL/misaligned address), -CM_ELIMIT (n_tokens > n_ctx). */
CM_API int cuda_ctx_bind_host(cuda_ctx *c, int seq, int64_t n_tokens, const uint64_t *k_addr,
                              const uint64_t *v_addr, cm_err *err);

/* Where complete pages computed by the context go (paged contexts). cuda_prefill calls it after
 * each chunk, for every layer of every page that the chunk completed (in layer-major order), and
 * cuda_ctx_flush for the last partial page: the sink returns device addresses of host memory
 * (as in cuda_ctx_bind_host) to copy the page's K and V to, or a negative code to fail the
 * prefill. The context copies the page there and from then on reads it there (its ring slot is
 * free again). NULL fn: pages stay in the ring (the ring must hold the whole sequence). */
typedef int (*cuda_page_sink_fn)(void *user, int seq, int layer, int64_t page, uint64_t *k_addr,
                                 uint64_t *v_addr, cm_err *err);
CM_API int cuda_ctx_set_page_sink(cuda_ctx *c, cuda_page_sink_fn fn, void *user);
/* Copy the remaining ring pages of seq (the partial last page included) to the sink; waits for
 * every copy. */
CM_API int cuda_ctx_flush(cuda_ctx *c, int seq, cm_err *err);

/* FOR BENCHMARKS ONLY: fill host pages (addresses as in cuda_ctx_bind_host, n_addr of each)
 * with the same kind of pseudo-random K/V as cuda_ctx_fill_synthetic, writing over the bus. */
CM_API int cuda_ctx_fill_host_synthetic(cuda_ctx *c, const uint64_t *k_addr,
                                        const uint64_t *v_addr, int64_t n_addr, uint64_t seed,
                                        cm_err *err);

/* Offload counters since the context was made (or cuda_ctx_offload_reset). "Needed" pages are
 * host pages a refresh will read: a hit is already in the GPU cache, an install is copied in now,
 * an overflow does not fit (read over the bus each time). Per-phase times are measured only when
 * the environment has IHIP_OFFLOAD_PROFILE=1 (CUDA events around each phase; costs a little). */
typedef struct cuda_offload_stats {
    uint64_t sa_updates, sa_needed, sa_hits, sa_installs, sa_overflow;
    uint64_t mk_updates, mk_needed, mk_hits, mk_installs, mk_overflow;
    uint64_t bytes_h2d;            /* cache installs (the bus reads of misses are not counted) */
    uint64_t bytes_d2h;            /* pages written to the sink */
    uint64_t bytes_h2d_stage;      /* prefill prefix staging copies */
    uint64_t decode_steps;         /* cuda_decode_batch calls */
    uint64_t refresh[4];           /* decode layer-steps by first stage run: 0, 1, 2, none */
    uint64_t steps[4];             /* decode steps (calls) by their deepest mask work: a full
                                    * refresh in some layer, else from stage 1, 2, else reuse */
    double step_ms[4];             /* their host time (the call returns with the logits) */
    double ms_mask, ms_cache, ms_attn; /* summed over decode layer-steps (profile only) */
    size_t gpu_kv_bytes;           /* ring + caches (+ probe cache), all layers */
    uint64_t pc_chunks;            /* stage-0 chunks copied into the probe cache */
} cuda_offload_stats;
CM_API int cuda_ctx_offload_stats(cuda_ctx *c, cuda_offload_stats *out);
CM_API void cuda_ctx_offload_reset(cuda_ctx *c);

#ifdef __cplusplus
}
#endif
#endif /* CUDA_MODEL_H */
