/*
 * cpu-ops.c — RMSNorm, SwiGLU, RoPE tables and the quantised matmul of the CPU backend.
 *
 * Matmul work split: activations are quantised in parallel (one row per token), then each
 * thread takes a contiguous range of weight rows and walks it in tiles of MM_ROWS rows ×
 * MM_TOKS tokens, so a tile of weight rows stays in L1 while the tokens stream past it. For
 * decode (one token) this degenerates to a row split, which is what a memory-bound GEMV wants.
 */
#define _POSIX_C_SOURCE 200809L
#include "cpu.h"
#include "cpu-impl.h"
#include "../../tensor/tensor.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MM_ROWS 8
#define MM_TOKS 32

static size_t act_row_bytes(int64_t n_in)
{
    /* the largest activation format is F32 (4 bytes/element); round rows to 64 bytes */
    return ((size_t)n_in * 4 + 63) & ~(size_t)63;
}

size_t cpu_matmul_scratch_size(int64_t n_in, int64_t n_tok)
{
    return act_row_bytes(n_in) * (size_t)n_tok;
}

struct mm_job {
    const cpu_weight *w;
    const float *x;
    int64_t n_tok;
    float *y;
    char *act;
    size_t act_stride;
    int act_type;
};

static void mm_quantize(void *p, int ith, int nth)
{
    struct mm_job *j = p;
    int64_t lo, hi;
    cm_split_range(j->n_tok, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        tn_quantize_row(j->act_type, j->x + t * j->w->n_in, j->act + t * j->act_stride, j->w->n_in);
}

static void mm_compute(void *p, int ith, int nth)
{
    struct mm_job *j = p;
    const cpu_weight *w = j->w;
    int64_t lo, hi;
    /* split rows in units of MM_ROWS so tiles stay whole */
    int64_t n_units = (w->n_out + MM_ROWS - 1) / MM_ROWS;
    cm_split_range(n_units, ith, nth, &lo, &hi);
    lo *= MM_ROWS;
    hi = CM_MIN(hi * MM_ROWS, w->n_out);
    const char *wd = w->data;
    tn_vec_dot_fn dot = tn_vec_dot_func(w->type);
    tn_vec_dot4_fn dot4 = j->n_tok >= 4 ? tn_vec_dot4_func(w->type) : NULL;
    for (int64_t r0 = lo; r0 < hi; r0 += MM_ROWS) {
        int64_t r1 = CM_MIN(r0 + MM_ROWS, hi);
        for (int64_t t0 = 0; t0 < j->n_tok; t0 += MM_TOKS) {
            int64_t t1 = CM_MIN(t0 + MM_TOKS, j->n_tok);
            int64_t t = t0;
            if (dot4) {
                float o[4];
                for (; t + 4 <= t1; t += 4) {
                    const char *a = j->act + t * j->act_stride;
                    for (int64_t r = r0; r < r1; r++) {
                        dot4(w->n_in, wd + r * w->row_bytes, a, j->act_stride, 4, o);
                        for (int k = 0; k < 4; k++) j->y[(t + k) * w->n_out + r] = o[k];
                    }
                }
            }
            for (; t < t1; t++) {
                const char *a = j->act + t * j->act_stride;
                float *yt = j->y + t * w->n_out;
                for (int64_t r = r0; r < r1; r++) yt[r] = dot(w->n_in, wd + r * w->row_bytes, a);
            }
        }
    }
}

void cpu_matmul(cm_pool *pool, const cpu_weight *w, const float *x, int64_t n_tok, float *y,
                void *scratch)
{
    struct mm_job j = {
        .w = w,
        .x = x,
        .n_tok = n_tok,
        .y = y,
        .act = scratch,
        .act_stride = act_row_bytes(w->n_in),
        .act_type = tn_vec_dot_type(w->type),
    };
    if (n_tok == 1)
        mm_quantize(&j, 0, 1);
    else
        cm_pool_run(pool, mm_quantize, &j);
    cm_pool_run(pool, mm_compute, &j);
}

void cpu_rms_norm(const float *x, const float *g, float *y, int64_t n, float eps)
{
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
    float mean = (float)(sum / (double)n);
    float scale = 1.0f / sqrtf(mean + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * g[i];
}

void cpu_swiglu(float *gate, const float *up, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float v = gate[i];
        gate[i] = v / (1.0f + expf(-v)) * up[i];
    }
}

/* ---- RoPE ------------------------------------------------------------------------------------- */

int cpu_rope_init(cpu_rope *r, int style, int head_dim, int n_rot, double base,
                  double linear_scale, const float *freq_factors, int64_t n_pos)
{
    memset(r, 0, sizeof(*r));
    CM_ASSERT(n_rot > 0 && n_rot <= head_dim && n_rot % 2 == 0);
    r->style = style;
    r->head_dim = head_dim;
    r->n_rot = n_rot;
    r->n_pos = n_pos;
    int half = n_rot / 2;
    r->inv_freq = malloc(sizeof(double) * (size_t)half);
    r->cs = cm_alloc_aligned(sizeof(float) * 2 * (size_t)half * (size_t)(n_pos > 0 ? n_pos : 1), 64);
    if (!r->inv_freq || !r->cs) {
        cpu_rope_free(r);
        return -ENOMEM;
    }
    for (int i = 0; i < half; i++) {
        double f = pow(base, -2.0 * i / (double)n_rot) / linear_scale;
        if (freq_factors) f /= (double)freq_factors[i];
        r->inv_freq[i] = f;
    }
    for (int64_t p = 0; p < n_pos; p++) {
        float *row = r->cs + p * 2 * half;
        for (int i = 0; i < half; i++) {
            double th = (double)p * r->inv_freq[i];
            row[2 * i] = (float)cos(th);
            row[2 * i + 1] = (float)sin(th);
        }
    }
    return 0;
}

void cpu_rope_free(cpu_rope *r)
{
    free(r->inv_freq);
    cm_free_aligned(r->cs);
    r->inv_freq = NULL;
    r->cs = NULL;
}

void cpu_rope_apply(const cpu_rope *r, float *x, int64_t pos)
{
    int half = r->n_rot / 2;
    float tmp[512];
    const float *cs;
    if (pos >= 0 && pos < r->n_pos) {
        cs = r->cs + pos * 2 * half;
    } else {
        CM_ASSERT(half <= 256);
        for (int i = 0; i < half; i++) {
            double th = (double)pos * r->inv_freq[i];
            tmp[2 * i] = (float)cos(th);
            tmp[2 * i + 1] = (float)sin(th);
        }
        cs = tmp;
    }
    if (r->style == CPU_ROPE_NEOX) {
        for (int i = 0; i < half; i++) {
            float a = x[i], b = x[i + half], c = cs[2 * i], s = cs[2 * i + 1];
            x[i] = a * c - b * s;
            x[i + half] = a * s + b * c;
        }
    } else {
        int i = 0;
#if CPU_HAVE_AVX2
        /* x = (a0 b0 a1 b1 ..), cs = (c0 s0 c1 s1 ..): even lanes a*c - b*s, odd lanes b*c + a*s,
         * i.e. fmaddsub(x, dup(c), swap(x) * dup(s)) — same products and roundings as below */
        for (; 2 * i + 8 <= 2 * half; i += 4) {
            __m256 xv = _mm256_loadu_ps(x + 2 * i), csv = _mm256_loadu_ps(cs + 2 * i);
            __m256 sw = _mm256_permute_ps(xv, 0xB1);
            __m256 rv = _mm256_fmaddsub_ps(xv, _mm256_moveldup_ps(csv),
                                          _mm256_mul_ps(sw, _mm256_movehdup_ps(csv)));
            _mm256_storeu_ps(x + 2 * i, rv);
        }
#endif
        for (; i < half; i++) {
            float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
            x[2 * i] = a * c - b * s;
            x[2 * i + 1] = a * s + b * c;
        }
    }
}

void cpu_kv_store(void *k_base, void *v_base, int kv_type, size_t row_bytes, const float *k,
                  const float *v, int64_t pos0, int64_t n_tok, int64_t dim)
{
    for (int64_t t = 0; t < n_tok; t++) {
        char *kr = (char *)k_base + (size_t)(pos0 + t) * row_bytes;
        char *vr = (char *)v_base + (size_t)(pos0 + t) * row_bytes;
        const float *ks = k + t * dim, *vs = v + t * dim;
        if (kv_type == CPU_KV_F32) {
            memcpy(kr, ks, sizeof(float) * (size_t)dim);
            memcpy(vr, vs, sizeof(float) * (size_t)dim);
        } else {
            uint16_t *kh = (uint16_t *)kr, *vh = (uint16_t *)vr;
            for (int64_t i = 0; i < dim; i++) {
                kh[i] = tn_fp32_to_fp16(ks[i]);
                vh[i] = tn_fp32_to_fp16(vs[i]);
            }
        }
    }
}
