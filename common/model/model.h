/*
 * model.h — the Llama-family forward (Llama 2/3/3.x, SmolLM, Mistral-as-llama) on the CPU.
 *
 * A model (weights, borrowed from the GGUF mapping: nothing is dequantised to f32 up front) is
 * shared by any number of contexts. A context owns a KV cache of UN-ROTATED keys (see
 * shared/HIP.md §4: every consumer rotates on the fly) and the scratch of one forward; it runs
 * prefill(chunk...) and decode(step). Attention is a pluggable provider (dense now, HiP later).
 */
#ifndef MDL_MODEL_H
#define MDL_MODEL_H

#include "../base/cm.h"
#include "../gguf/gguf.h"
#include "../backend/cpu/cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mdl_hparams {
    char arch[32];
    int64_t n_vocab;
    int64_t n_ctx_train;
    int64_t n_embd;
    int64_t n_layer;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t n_ff;
    int64_t n_rot;        /* rotated dims per head */
    double rope_base;
    double rope_linear_scale; /* 1 = none */
    int rope_style;       /* enum cpu_rope_style */
    float rms_eps;
    bool tied_output;     /* output projection is token_embd */
} mdl_hparams;

typedef struct mdl_layer {
    const float *attn_norm; /* [n_embd] */
    cpu_weight wq, wk, wv, wo;
    const float *ffn_norm;  /* [n_embd] */
    cpu_weight w_gate, w_up, w_down;
} mdl_layer;

typedef struct mdl_model {
    gguf_file *file;       /* owned */
    mdl_hparams hp;
    cpu_weight tok_embd;   /* [n_vocab][n_embd] */
    const float *output_norm;
    cpu_weight output;     /* [n_vocab][n_embd]; == tok_embd when tied */
    const float *rope_freqs; /* [n_rot/2] or NULL */
    mdl_layer *layers;     /* [n_layer] */
} mdl_model;

/* Open and validate a GGUF model: architecture, hyper-parameters, every tensor's presence,
 * shape and type. Errors name the problem (missing tensor, unsupported architecture or type).
 * Returns NULL with err filled. Free with mdl_model_free. */
CM_API mdl_model *mdl_model_load(const char *path, cm_err *err);
CM_API void mdl_model_free(mdl_model *m);

struct mdl_ctx;

/* Attention provider: computes attention for n_tok queries at positions pos0.. of layer il,
 * whose K/V are already in the context's cache (un-rotated keys).
 * q: [n_tok][n_head][head_dim] un-rotated f32; out: [n_tok][n_head][head_dim]. */
typedef struct mdl_attn {
    const char *name;
    int (*attend)(void *self, struct mdl_ctx *ctx, int il, const float *q, int64_t pos0,
                  int64_t n_tok, float *out);
    void (*reset)(void *self); /* (optional) a new sequence starts: drop cached state */
    void (*free)(void *self);  /* (optional) */
    void *self;
} mdl_attn;

typedef struct mdl_ctx_params {
    int64_t n_ctx;     /* KV capacity in tokens (0 = the model's trained length) */
    int n_threads;     /* 0 = number of CPUs */
    int kv_type;       /* CPU_KV_F16 (default) or CPU_KV_F32 */
    int64_t n_chunk;   /* prefill chunk size in tokens (0 = default 512) */
} mdl_ctx_params;

CM_API mdl_ctx_params mdl_ctx_default_params(void);

/* Return nonzero to cancel a prefill (it then fails with -ECANCELED). */
typedef int (*mdl_progress_fn)(void *user, int64_t done, int64_t total);

typedef struct mdl_ctx {
    const mdl_model *model;
    mdl_ctx_params params;
    cm_pool *pool;
    cpu_rope rope;
    int64_t n_past;        /* tokens in the cache */
    size_t kv_row_bytes;   /* bytes of one token's K (or V) row in one layer */
    void **k_cache;        /* [n_layer] → [n_ctx][n_head_kv*head_dim] */
    void **v_cache;
    mdl_attn attn;
    /* scratch for one chunk (n_chunk tokens), allocated once */
    float *x, *xn, *q, *k, *v, *ao, *gate, *up;
    float *logits;         /* [n_vocab] of the last token of the last call */
    void *mm_scratch;
    void *attn_scratch;
    size_t attn_scratch_bytes;
} mdl_ctx;

CM_API mdl_ctx *mdl_ctx_init(const mdl_model *m, const mdl_ctx_params *p, cm_err *err);
CM_API void mdl_ctx_free(mdl_ctx *c);
/* Forget the sequence (n_past = 0) and reset the attention provider. */
CM_API void mdl_ctx_reset(mdl_ctx *c);
/* Replace the attention provider (the context takes ownership; NULL restores dense). */
CM_API void mdl_ctx_set_attn(mdl_ctx *c, const mdl_attn *a);

/* Append n tokens (in chunks of n_chunk) and compute the logits of the last one into
 * c->logits (and into `logits` if non-NULL). Errors: -EINVAL (bad token id, n ≤ 0),
 * -CM_ELIMIT (would exceed n_ctx), -ECANCELED (progress returned nonzero). */
CM_API int mdl_prefill(mdl_ctx *c, const int32_t *tokens, int64_t n, float *logits,
                       mdl_progress_fn progress, void *user, cm_err *err);
/* One decode step: append one token, logits of it. Same errors. */
CM_API int mdl_decode(mdl_ctx *c, int32_t token, float *logits, cm_err *err);

/* ---- batched decode across sequences ---------------------------------------------------------
 * One decode step for n independent sequences at once: their hidden states go through every
 * weight matmul together (one cpu_matmul of n tokens, so each quantised weight is streamed once
 * per step, not n times); attention runs per sequence with that context's own provider, cache
 * and thread pool; each sequence gets its own logits. A batch holds the scratch of up to
 * max_seqs tokens and the thread pool of the matmuls, allocated once by mdl_batch_init; a
 * context whose n_threads equals the batch's also runs its attention on that pool during the
 * call (its own pool's spinning workers would compete for the cores otherwise). */
typedef struct mdl_batch mdl_batch;

/* Scratch for batches of up to max_seqs (1..4096) sequences of model m, with a pool of n_threads
 * (0 = number of CPUs) for the matmuls. m must outlive the batch. NULL with err filled.
 * Free with mdl_batch_free. */
CM_API mdl_batch *mdl_batch_init(const mdl_model *m, int max_seqs, int n_threads, cm_err *err);
CM_API void mdl_batch_free(mdl_batch *b);
/* Exact (default true) or fast mode, see mdl_decode_batch. */
CM_API void mdl_batch_set_exact(mdl_batch *b, bool exact);

/* Append tokens[i] to ctxs[i] (n distinct contexts, all of the batch's model) and compute its
 * logits into ctxs[i]->logits (and logits[i] when logits and logits[i] are non-NULL).
 * Exactness: cpu_matmul dots every (row, token) pair with tn_vec_dot below 4 tokens, but from 4
 * tokens on uses the 4-token kernels (tn_vec_dot4) of Q4_1 / Q8_0 weights, which sum in another
 * order. In exact mode (the default) the batch therefore goes through each matmul in groups of
 * at most 3 tokens (each weight streamed ceil(n/3) times per step) and every sequence's logits
 * are bit-identical to mdl_decode's, whatever else is in the batch. In fast mode
 * (mdl_batch_set_exact false) all n tokens go through one matmul: one weight pass, logits equal
 * to mdl_decode's up to float summation order (~1e-7 relative per dot, which the SmolLM2 Q4_1
 * model amplifies to up to ~0.45 in the logits after one step, and which compounds along a
 * sequence through its cache: greedy outputs then depend on what was batched with them).
 * Errors (nothing is changed): -EINVAL (n outside 1..max_seqs, a NULL or repeated context, a
 * context of another model, a bad token id), -CM_ELIMIT (a context is full). An attention
 * provider failing mid-step fails the call and leaves every context of the batch with a partial
 * step (n_past unchanged, but cache rows past n_past and provider state advanced for some
 * layers): those sequences must be dropped (or mdl_ctx_reset). */
CM_API int mdl_decode_batch(mdl_batch *b, mdl_ctx *const *ctxs, const int32_t *tokens, int n,
                            float *const *logits, cm_err *err);

/* Convenience for ctypes tests: pointer to the last logits and counts. */
CM_API const float *mdl_ctx_logits(const mdl_ctx *c);
CM_API int64_t mdl_ctx_n_past(const mdl_ctx *c);
CM_API int64_t mdl_model_n_vocab(const mdl_model *m);
CM_API const gguf_file *mdl_model_gguf(const mdl_model *m);

#ifdef __cplusplus
}
#endif
#endif /* MDL_MODEL_H */
