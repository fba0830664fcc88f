/*
 * cpu.h — the threaded CPU kernels of the model forward: RMSNorm, quantised matmul, RoPE
 * tables, SwiGLU, and dense attention over a KV cache of un-rotated keys.
 *
 * Matmul follows the scheme of common/tensor: activations are quantised once per call to the
 * weight's vec_dot type, then every (row, token) pair is one tn_vec_dot, tiled so that a tile
 * of weight rows stays in cache while a tile of tokens streams past it.
 */
#ifndef CPU_CPU_H
#define CPU_CPU_H

#include "../../base/cm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A weight matrix in GGUF layout: n_out rows of n_in elements, each row row_bytes long.
 * Data is borrowed (usually the model file's mapping). */
typedef struct cpu_weight {
    const void *data;
    int type;        /* enum tn_type */
    int64_t n_in;    /* row length (elements) */
    int64_t n_out;   /* number of rows */
    size_t row_bytes;
} cpu_weight;

/* Bytes of scratch cpu_matmul needs for n_tok tokens of n_in elements of any weight type. */
CM_API size_t cpu_matmul_scratch_size(int64_t n_in, int64_t n_tok);
/* y[t][o] = sum_i W[o][i] * x[t][i]; x is [n_tok][n_in] f32, y is [n_tok][n_out] f32.
 * scratch: at least cpu_matmul_scratch_size(n_in, n_tok) bytes, 64-byte aligned. */
CM_API void cpu_matmul(cm_pool *pool, const cpu_weight *w, const float *x, int64_t n_tok, float *y,
                       void *scratch);

/* y = x / sqrt(mean(x^2) + eps) * g, n elements (sum of squares in double). */
CM_API void cpu_rms_norm(const float *x, const float *g, float *y, int64_t n, float eps);
/* In place: gate[i] = silu(gate[i]) * up[i]. */
CM_API void cpu_swiglu(float *gate, const float *up, int64_t n);

/* ---- RoPE ------------------------------------------------------------------------------------ */

enum cpu_rope_style {
    CPU_ROPE_NORM = 0, /* pairs (x[2i], x[2i+1]): GGUF llama (q/k rows permuted by converter) */
    CPU_ROPE_NEOX = 2, /* pairs (x[i], x[i+d/2]): "rotate half" */
};

/* Rotation tables: inv_freq[i] = 1 / (base^(2i/n_rot) * factor_i), computed in double. */
typedef struct cpu_rope {
    int style;
    int head_dim;
    int n_rot;            /* rotated dims (≤ head_dim); the rest pass through */
    double *inv_freq;     /* [n_rot/2] */
    int64_t n_pos;        /* table rows */
    float *cs;            /* [n_pos][n_rot/2][2] = cos, sin at each position (double → float) */
} cpu_rope;

/* Build tables for positions [0, n_pos). freq_factors may be NULL (else n_rot/2 divisors, as
 * llama-3 style rope_freqs), linear_scale 1 for none. Returns 0 or -ENOMEM. */
CM_API int cpu_rope_init(cpu_rope *r, int style, int head_dim, int n_rot, double base,
                         double linear_scale, const float *freq_factors, int64_t n_pos);
CM_API void cpu_rope_free(cpu_rope *r);
/* Rotate one head vector x[head_dim] in place to position pos (any pos ≥ 0: positions outside the
 * table are computed on the fly in double). */
CM_API void cpu_rope_apply(const cpu_rope *r, float *x, int64_t pos);

/* ---- dense attention --------------------------------------------------------------------------- */

enum cpu_kv_type { CPU_KV_F32 = 0, CPU_KV_F16 = 1 };

/* One layer's K and V cache: row t (token position) at k + t * row_bytes holds n_head_kv head
 * vectors of head_dim elements of kv_type; keys are NOT rotated. */
typedef struct cpu_kv_layer {
    const void *k;
    const void *v;
    int kv_type;
    size_t row_bytes;
    bool k_rotated; /* keys are already rotated to their true positions (a provider's derived
                       copy, see the dense provider in model.c); only queries are rotated */
} cpu_kv_layer;

typedef struct cpu_attn_shape {
    int n_head;
    int n_head_kv;
    int head_dim;
    float scale; /* logit scale, usually 1/sqrt(head_dim) */
} cpu_attn_shape;

/* Causal dense attention for n_tok queries at positions pos0 .. pos0+n_tok-1 over keys
 * [0, pos0+n_tok). q: [n_tok][n_head][head_dim] un-rotated; keys and queries are rotated on the
 * fly with `rope` at their true positions. out: [n_tok][n_head][head_dim].
 * scratch: cpu_attn_scratch_size() bytes. */
CM_API size_t cpu_attn_scratch_size(const cpu_attn_shape *s, int n_threads, int64_t n_tok,
                                    int64_t n_kv);
CM_API void cpu_attn_dense(cm_pool *pool, const cpu_attn_shape *s, const cpu_rope *rope,
                           const cpu_kv_layer *kv, const float *q, int64_t pos0, int64_t n_tok,
                           float *out, void *scratch);

/* Store n_tok rows of K and V (f32 [n_tok][n_head_kv*head_dim]) at positions pos0.. of a cache
 * layer (converting to kv_type). */
CM_API void cpu_kv_store(void *k_base, void *v_base, int kv_type, size_t row_bytes,
                         const float *k, const float *v, int64_t pos0, int64_t n_tok, int64_t dim);

#ifdef __cplusplus
}
#endif
#endif /* CPU_CPU_H */
