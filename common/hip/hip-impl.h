/*
 * hip-impl.h — internals shared by the files of common/hip: a small strict JSON reader (for the
 * configuration) and SIMD helpers of the kernels. Not part of the public API.
 */
#ifndef HIP_IMPL_H
#define HIP_IMPL_H

#include "hip.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HIP_HAVE_AVX2 1
#endif

/* ---- JSON (hip-json.c) ------------------------------------------------------------------------ */

enum hj_type { HJ_NULL, HJ_BOOL, HJ_NUMBER, HJ_STRING, HJ_ARRAY, HJ_OBJECT };

typedef struct hj_node {
    int type;            /* enum hj_type */
    bool b;              /* HJ_BOOL */
    double num;          /* HJ_NUMBER */
    bool is_int;         /* HJ_NUMBER written without fraction/exponent and fits int64 */
    int64_t i;           /* HJ_NUMBER when is_int */
    char *str;           /* HJ_STRING: NUL-terminated UTF-8 (embedded NULs rejected) */
    char *key;           /* member name when this node is an object member */
    struct hj_node *child; /* first element / member */
    struct hj_node *next;  /* next sibling */
    int n;               /* number of elements / members */
    int line, col;       /* where the value starts (1-based) */
} hj_node;

/* Parse exactly one JSON value (RFC 8259; no comments, no trailing commas, duplicate member
 * names rejected, depth ≤ 64) into *out (free with hj_free). Returns 0, or -CM_EFORMAT naming
 * line and column, or -ENOMEM. */
int hj_parse(const char *text, size_t len, hj_node **out, cm_err *err);
void hj_free(hj_node *n);
const char *hj_type_name(int type);

/* ---- kernels helpers ---------------------------------------------------------------------------- */

static inline float hip_dot(const float *a, const float *b, int n)
{
#if HIP_HAVE_AVX2
    if ((n & 15) == 0) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        }
        __m256 s = _mm256_add_ps(s0, s1);
        __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
        lo = _mm_add_ps(lo, hi);
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
        return _mm_cvtss_f32(lo);
    }
#endif
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += w * x over n floats */
static inline void hip_axpy(float *y, float w, const float *x, int n)
{
#if HIP_HAVE_AVX2
    if ((n & 7) == 0) {
        __m256 vw = _mm256_set1_ps(w);
        for (int i = 0; i < n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        return;
    }
#endif
    for (int i = 0; i < n; i++) y[i] += w * x[i];
}

/* Round a float to bf16 precision (nearest even) and back. */
static inline float hip_round_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* Load head g (of head_dim d) of cache row t of `base` (kv->k or kv->v) as floats. */
void hip_load_row(const cpu_kv_layer *kv, const void *base, int64_t t, int g, int d, float *dst);

/* ---- scratch (hip-work.c) ------------------------------------------------------------------------ */

/* A growable 64-byte-aligned buffer. */
typedef struct hip_buf {
    void *p;
    size_t cap;
} hip_buf;

/* Make b hold at least `bytes`; contents are not kept. Returns 0 or -ENOMEM. */
int hip_buf_reserve(hip_buf *b, size_t bytes);

enum {
    HIP_BUF_ROWS,     /* probe rows [n_head][rows][d] */
    HIP_BUF_CAND_L,   /* candidate lists of the running stage and the next one */
    HIP_BUF_CAND_R,
    HIP_BUF_NEXT_L,
    HIP_BUF_NEXT_R,
    HIP_BUF_SCORE,    /* [n_cand] head-reduced chunk scores */
    HIP_BUF_REP,      /* [n_cand] representatives */
    HIP_BUF_ORDER,    /* [n_cand] sort scratch */
    HIP_BUF_BSA,      /* per-thread BSA key/value tiles */
    HIP_BUF_COUNT
};

struct hip_work {
    hip_buf buf[HIP_BUF_COUNT];
};

/* Run fn on the pool, or inline as thread 0 of 1 when pool is NULL. */
static inline void hip_run(cm_pool *pool, cm_pool_fn fn, void *ctx)
{
    if (pool) cm_pool_run(pool, fn, ctx);
    else fn(ctx, 0, 1);
}

#endif /* HIP_IMPL_H */
