/*
 * hip-bsa.c — block-sparse attention over sink ∪ selected blocks ∪ sliding window
 * (shared/HIP.md §3), one softmax over the union.
 *
 * Key sets for a query at position p (first position of its block p0, last p_last):
 *   window   p - n_stream < t ≤ p, at its true position t;
 *   sink     0 ≤ t < n_sink with t ≤ p - n_stream;
 *   selected the ks blocks of the mask, tokens with n_sink ≤ t ≤ p - n_stream;
 * disjoint by construction. With using_extend (the "streaming" layout, §3.3) the sink and
 * selected tokens are laid out contiguously just before the window, based on p0 and the
 * selected count M = ks·bk: the n-th listed token (masked ones included) at
 * p0 + 1 - n_stream - M + n, sink token t at p0 + 1 - n_stream - M - n_sink + t (clamped at 0).
 * The query is rotated at p. GQA: the heads of a KV group share the rotated keys.
 *
 * Work is split over (query block, KV head) tasks; each task rotates its keys once into a
 * per-thread tile, then runs an exact two-pass softmax per (query, head).
 */
#define _POSIX_C_SOURCE 200809L
#include "hip-impl.h"

#include <errno.h>
#include <float.h>
#include <stdlib.h>

/* Upper bound of the keys of one query block. */
static int64_t bsa_cap(const hip_args *a, const hip_mask *m)
{
    const hip_layer_config *lc = a->layer;
    int64_t win = CM_MIN(lc->sliding_window_size + a->block_size_q, a->n_kv);
    return CM_MIN(lc->sink_token_size, a->n_kv) + (int64_t)m->kb * a->block_size_k + win + 1;
}

/* The keys query block b (queries p0..p_last) may attend, with their rotation positions. */
static int64_t bsa_block_keys(const hip_args *a, const hip_mask *m, int b, int64_t p0,
                              int64_t plast, hip_key_ref *out)
{
    const hip_layer_config *lc = a->layer;
    const int64_t n_sink = lc->sink_token_size, n_stream = lc->sliding_window_size;
    const int64_t T = a->n_kv, bk = a->block_size_k, thr = plast - n_stream;
    const int32_t ks = m->ks[b];
    const int64_t *idx = m->idx + (size_t)b * (size_t)m->kb;
    const int64_t M = (int64_t)ks * bk;
    const int64_t base = p0 + 1 - n_stream - M; /* virtual position of selected token #0 */
    int64_t n = 0;
    for (int64_t t = 0; t < n_sink && t <= thr && t < T; t++) {
        out[n].t = t;
        out[n].vpos = a->using_extend ? CM_MAX(0, base - n_sink + t) : t;
        out[n].set = HIP_SET_SINK;
        n++;
    }
    for (int32_t i = 0; i < ks; i++) {
        if (idx[i] < 0 || idx[i] >= T) continue;
        for (int64_t j = 0; j < bk; j++) {
            int64_t t = idx[i] + j;
            if (t < n_sink || t > thr || t >= T) continue; /* masked: still holds its slot */
            out[n].t = t;
            out[n].vpos = a->using_extend ? CM_MAX(0, base + (int64_t)i * bk + j) : t;
            out[n].set = HIP_SET_SELECTED;
            n++;
        }
    }
    for (int64_t t = CM_MAX(0, p0 - n_stream + 1); t <= plast; t++) {
        out[n].t = t;
        out[n].vpos = t;
        out[n].set = HIP_SET_WINDOW;
        n++;
    }
    return n;
}

static inline bool bsa_valid(const hip_key_ref *k, int64_t p, int64_t n_stream)
{
    if (k->set == HIP_SET_WINDOW) return k->t > p - n_stream && k->t <= p;
    return k->t <= p - n_stream;
}

int64_t hip_bsa_keys(const hip_args *a, const hip_mask *m, int64_t pos0, int64_t n_tok, int64_t p,
                     hip_key_ref *keys, int64_t cap)
{
    CM_ASSERT(p >= pos0 && p < pos0 + n_tok);
    const int64_t bq = a->block_size_q, b = (p - pos0) / bq, p0 = pos0 + b * bq;
    const int64_t plast = CM_MIN(p0 + bq, pos0 + n_tok) - 1;
    hip_key_ref *all = malloc(sizeof(hip_key_ref) * (size_t)bsa_cap(a, m));
    CM_ASSERT(all);
    int64_t n = bsa_block_keys(a, m, (int)b, p0, plast, all), out = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!bsa_valid(&all[i], p, a->layer->sliding_window_size)) continue;
        if (out < cap) keys[out] = all[i];
        out++;
    }
    free(all);
    return out;
}

/* Byte offsets of the per-thread tiles (each 64-byte aligned); off[6] (returned) = total. */
static size_t bsa_layout(int64_t cap, int d, size_t *off)
{
    const size_t sizes[6] = {
        sizeof(float) * (size_t)cap * (size_t)d, sizeof(float) * (size_t)cap * (size_t)d,
        sizeof(float) * (size_t)cap, sizeof(float) * (size_t)d, sizeof(float) * (size_t)d,
        sizeof(hip_key_ref) * (size_t)cap,
    };
    size_t o = 0;
    for (int i = 0; i < 6; i++) {
        off[i] = o;
        o += (sizes[i] + 63) & ~(size_t)63;
    }
    return o;
}

struct bsa_job {
    const hip_args *a;
    const hip_mask *m;
    const float *q;
    float *out;
    int64_t pos0, n_tok, n_qblk;
    int64_t cap;        /* keys per block, upper bound */
    size_t thread_bytes;
    char *scratch;      /* [nth][thread_bytes] */
};

static void bsa_fn(void *ctx, int ith, int nth)
{
    struct bsa_job *j = ctx;
    const hip_args *a = j->a;
    const int H = a->shape.n_head, Hkv = a->shape.n_head_kv, G = H / Hkv, d = a->shape.head_dim;
    const int64_t bq = a->block_size_q, n_stream = a->layer->sliding_window_size;
    char *mine = j->scratch + (size_t)ith * j->thread_bytes;
    size_t off[6];
    bsa_layout(j->cap, d, off);
    float *kbuf = (float *)(mine + off[0]);        /* [cap][d] rotated keys */
    float *vbuf = (float *)(mine + off[1]);        /* [cap][d] values */
    float *logit = (float *)(mine + off[2]);       /* [cap] */
    float *qr = (float *)(mine + off[3]);          /* [d] rotated query */
    float *acc = (float *)(mine + off[4]);         /* [d] */
    hip_key_ref *keys = (hip_key_ref *)(mine + off[5]); /* [cap] */
    int64_t lo, hi;
    cm_split_range(j->n_qblk * Hkv, ith, nth, &lo, &hi);
    for (int64_t task = lo; task < hi; task++) {
        const int b = (int)(task / Hkv), g = (int)(task % Hkv);
        const int64_t p0 = j->pos0 + b * bq, nq = CM_MIN(bq, j->n_tok - b * bq);
        const int64_t n = bsa_block_keys(a, j->m, b, p0, p0 + nq - 1, keys);
        CM_ASSERT(n <= j->cap);
        for (int64_t i = 0; i < n; i++) {
            float *kr = kbuf + (size_t)i * (size_t)d;
            hip_load_row(&a->kv, a->kv.k, keys[i].t, g, d, kr);
            if (a->rope) cpu_rope_apply(a->rope, kr, keys[i].vpos);
            hip_load_row(&a->kv, a->kv.v, keys[i].t, g, d, vbuf + (size_t)i * (size_t)d);
        }
        for (int hh = 0; hh < G; hh++) {
            const int h = g * G + hh;
            for (int64_t qi = 0; qi < nq; qi++) {
                const int64_t p = p0 + qi, row = b * bq + qi;
                const float *src = j->q + ((size_t)row * (size_t)H + (size_t)h) * (size_t)d;
                float *dst = j->out + ((size_t)row * (size_t)H + (size_t)h) * (size_t)d;
                for (int e = 0; e < d; e++) qr[e] = src[e] * a->shape.scale;
                if (a->rope) cpu_rope_apply(a->rope, qr, p);
                float mx = -FLT_MAX;
                bool any = false;
                for (int64_t i = 0; i < n; i++) {
                    if (!bsa_valid(&keys[i], p, n_stream)) continue;
                    float s = hip_dot(qr, kbuf + (size_t)i * (size_t)d, d);
                    logit[i] = s;
                    if (s > mx) mx = s;
                    any = true;
                }
                memset(acc, 0, sizeof(float) * (size_t)d);
                if (!any) { /* no key at all (cannot happen for p ≥ 0: the window has p) */
                    memset(dst, 0, sizeof(float) * (size_t)d);
                    continue;
                }
                double sum = 0.0;
                for (int64_t i = 0; i < n; i++) {
                    if (!bsa_valid(&keys[i], p, n_stream)) continue;
                    float e = expf(logit[i] - mx);
                    sum += e;
                    hip_axpy(acc, e, vbuf + (size_t)i * (size_t)d, d);
                }
                float inv = (float)(1.0 / sum);
                for (int e = 0; e < d; e++) dst[e] = acc[e] * inv;
            }
        }
    }
}

int hip_bsa(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok, const hip_mask *m,
            float *out, hip_work *w, cm_pool *pool, cm_err *err)
{
    if (!a->layer || n_tok < 1 || pos0 < 0 || a->n_kv < pos0 + n_tok)
        return cm_err_set(err, -EINVAL, "hip bsa: bad call (n_tok %lld, pos0 %lld, T %lld)",
                          (long long)n_tok, (long long)pos0, (long long)a->n_kv);
    if (a->shape.n_head < 1 || a->shape.n_head_kv < 1 || a->shape.n_head % a->shape.n_head_kv ||
        a->shape.head_dim < 1 || a->block_size_q < 1 || a->block_size_k < 1)
        return cm_err_set(err, -EINVAL, "hip bsa: bad shape");
    const int64_t n_qblk = (n_tok + a->block_size_q - 1) / a->block_size_q;
    if (n_qblk > m->max_qblk)
        return cm_err_set(err, -EINVAL, "hip bsa: %lld query blocks, mask holds %d",
                          (long long)n_qblk, m->max_qblk);
    const int d = a->shape.head_dim;
    const int nth = pool ? cm_pool_size(pool) : 1;
    struct bsa_job j = {.a = a, .m = m, .q = q, .out = out, .pos0 = pos0, .n_tok = n_tok,
                        .n_qblk = n_qblk, .cap = bsa_cap(a, m)};
    size_t off[6];
    j.thread_bytes = bsa_layout(j.cap, d, off);
    if (hip_buf_reserve(&w->buf[HIP_BUF_BSA], j.thread_bytes * (size_t)nth))
        return cm_err_set(err, -ENOMEM, "hip bsa: out of memory (%zu bytes of scratch)",
                          j.thread_bytes * (size_t)nth);
    j.scratch = w->buf[HIP_BUF_BSA].p;
    hip_run(pool, bsa_fn, &j);
    return 0;
}

int hip_attention(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok, hip_mask *m,
                  float *out, hip_work *w, cm_pool *pool, cm_err *err)
{
    int rc = hip_mask_estimate(a, q, pos0, n_tok, 0, m, w, pool, err);
    if (rc) return rc;
    return hip_bsa(a, q, pos0, n_tok, m, out, w, pool, err);
}
