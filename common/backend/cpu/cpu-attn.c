/*
 * cpu-attn.c — dense causal attention over a KV cache of un-rotated keys (CPU reference).
 *
 * Work items are (query block of QB tokens, KV head, key split). An item loads its queries,
 * rotates them to their true positions and folds in the logit scale, then walks its key range
 * in tiles of KT keys: each tile is converted to f32 and rotated once and reused by every query
 * row and every query head of the GQA group. Softmax is online (running max m, sum l, acc), so
 * the cache is read once. Decode (one query) splits the keys across threads and merges the
 * partial results with log-sum-exp. Items are taken from an atomic counter: later query blocks
 * see more keys, and a static split would leave a thread idle.
 */
#define _POSIX_C_SOURCE 200809L
#include "cpu.h"
#include "cpu-impl.h"
#include "../../tensor/tensor.h"

#include <math.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <string.h>

#define QB 16  /* query rows per item */
#define KT 64  /* keys per tile (tile_scores is written for 64) */
#define MAX_G 16 /* largest GQA group supported */
#define MAX_D 256

struct attn_job {
    const cpu_attn_shape *s;
    const cpu_rope *rope;
    const cpu_kv_layer *kv;
    const float *q;
    int64_t pos0, n_tok;
    float *out;
    int n_qblk, n_split, G, d;
    int64_t n_items;
    _Atomic int64_t next;
    float *part;      /* [n_items][QB][G][d + 2]: m, l, acc */
    char *tls;        /* per-thread tile buffers */
    size_t tls_bytes;
};

static size_t part_floats(int G, int d)
{
    return (size_t)QB * G * (d + 2);
}

size_t cpu_attn_scratch_size(const cpu_attn_shape *s, int n_threads, int64_t n_tok, int64_t n_kv)
{
    (void)n_kv;
    int G = s->n_head / s->n_head_kv, d = s->head_dim;
    int64_t n_qblk = (n_tok + QB - 1) / QB;
    int64_t max_split = 4 * (int64_t)n_threads;
    int64_t n_items = n_qblk * s->n_head_kv * (n_qblk == 1 ? max_split : 1);
    size_t tls = sizeof(float) * ((size_t)KT * d * 3 + (size_t)QB * G * d + KT) + 256;
    return sizeof(float) * (size_t)n_items * part_floats(G, d) + tls * (size_t)n_threads + 256;
}

static void load_tile(const struct attn_job *j, int g, int64_t k0, int nk, float *kt, float *vt)
{
    const cpu_kv_layer *kv = j->kv;
    int d = j->d;
    for (int i = 0; i < nk; i++) {
        int64_t t = k0 + i;
        const char *kr = (const char *)kv->k + (size_t)t * kv->row_bytes;
        const char *vr = (const char *)kv->v + (size_t)t * kv->row_bytes;
        float *kd = kt + (size_t)i * d, *vd = vt + (size_t)i * d;
        if (kv->kv_type == CPU_KV_F32) {
            memcpy(kd, (const float *)kr + (size_t)g * d, sizeof(float) * d);
            memcpy(vd, (const float *)vr + (size_t)g * d, sizeof(float) * d);
        } else {
            const uint16_t *kh = (const uint16_t *)kr + (size_t)g * d;
            const uint16_t *vh = (const uint16_t *)vr + (size_t)g * d;
            int e = 0;
#if CPU_HAVE_AVX2
            for (; e + 8 <= d; e += 8) {
                _mm256_storeu_ps(kd + e, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kh + e))));
                _mm256_storeu_ps(vd + e, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + e))));
            }
#endif
            for (; e < d; e++) {
                kd[e] = tn_fp16_to_fp32(kh[e]);
                vd[e] = tn_fp16_to_fp32(vh[e]);
            }
        }
        if (!kv->k_rotated) cpu_rope_apply(j->rope, kd, t);
    }
}

/* sc[i] = q · k_i for the n ≤ KT keys of a transposed tile ktT[d][KT]. */
static void tile_scores(const float *q, const float *ktT, int d, int n, float *sc)
{
#if CPU_HAVE_AVX2
    /* all KT/8 accumulators, padded keys included: a constant trip count keeps them in registers */
    (void)n;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (int e = 0; e < d; e++) {
        __m256 qe = _mm256_set1_ps(q[e]);
        const float *row = ktT + (size_t)e * KT;
        s0 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 0), s0);
        s1 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 8), s1);
        s2 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 16), s2);
        s3 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 24), s3);
        s4 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 32), s4);
        s5 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 40), s5);
        s6 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 48), s6);
        s7 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(row + 56), s7);
    }
    _mm256_storeu_ps(sc + 0, s0);
    _mm256_storeu_ps(sc + 8, s1);
    _mm256_storeu_ps(sc + 16, s2);
    _mm256_storeu_ps(sc + 24, s3);
    _mm256_storeu_ps(sc + 32, s4);
    _mm256_storeu_ps(sc + 40, s5);
    _mm256_storeu_ps(sc + 48, s6);
    _mm256_storeu_ps(sc + 56, s7);
#else
    for (int i = 0; i < n; i++) sc[i] = 0.0f;
    for (int e = 0; e < d; e++)
        for (int i = 0; i < n; i++) sc[i] += q[e] * ktT[(size_t)e * KT + i];
#endif
}

/* acc[0..d) = acc * corr + sum_i p[i] * v_i, accumulating 64 dims at a time in registers. */
static void tile_pv(float *acc, float corr, const float *p, const float *vt, int d, int n)
{
#if CPU_HAVE_AVX2
    if (d % 64 == 0) {
        __m256 c = _mm256_set1_ps(corr);
        for (int e0 = 0; e0 < d; e0 += 64) {
            __m256 a[8];
            for (int k = 0; k < 8; k++) a[k] = _mm256_mul_ps(c, _mm256_loadu_ps(acc + e0 + 8 * k));
            for (int i = 0; i < n; i++) {
                __m256 pi = _mm256_set1_ps(p[i]);
                const float *v = vt + (size_t)i * d + e0;
                for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(pi, _mm256_loadu_ps(v + 8 * k), a[k]);
            }
            for (int k = 0; k < 8; k++) _mm256_storeu_ps(acc + e0 + 8 * k, a[k]);
        }
        return;
    }
#endif
    for (int e = 0; e < d; e++) acc[e] *= corr;
    for (int i = 0; i < n; i++) cpu_axpy(acc, p[i], vt + (size_t)i * d, d);
}

static void attn_item(struct attn_job *j, int64_t item, float *kt, float *vt, float *ktT, float *qr,
                      float *sc)
{
    const cpu_attn_shape *s = j->s;
    int G = j->G, d = j->d;
    int64_t split = item % j->n_split;
    int64_t rest = item / j->n_split;
    int g = (int)(rest % s->n_head_kv);
    int64_t qblk = rest / s->n_head_kv;
    int64_t t_lo = qblk * QB, t_hi = CM_MIN(t_lo + QB, j->n_tok);
    int nr = (int)(t_hi - t_lo);
    int64_t kend = j->pos0 + t_hi; /* exclusive: keys any row of the block may see */
    int64_t k_lo, k_hi;
    cm_split_range(kend, (int)split, j->n_split, &k_lo, &k_hi);

    float *part = j->part + (size_t)item * part_floats(G, d);
    for (int r = 0; r < nr; r++)
        for (int h = 0; h < G; h++) {
            const float *src = j->q + ((size_t)(t_lo + r) * s->n_head + (size_t)g * G + h) * d;
            float *dst = qr + ((size_t)r * G + h) * d;
            memcpy(dst, src, sizeof(float) * d);
            cpu_rope_apply(j->rope, dst, j->pos0 + t_lo + r);
            for (int e = 0; e < d; e++) dst[e] *= s->scale;
            float *pm = part + ((size_t)r * G + h) * (d + 2);
            pm[0] = -INFINITY;
            pm[1] = 0.0f;
            memset(pm + 2, 0, sizeof(float) * d);
        }

    for (int64_t k0 = k_lo; k0 < k_hi; k0 += KT) {
        int nk = (int)CM_MIN(KT, k_hi - k0);
        load_tile(j, g, k0, nk, kt, vt);
        /* Many query rows (prefill): transpose keys to [d][KT] (zero-padded) so the scores of 8
         * keys come from one FMA chain. One row (decode): the transpose would cost more than
         * it saves; dot each key directly. */
        bool transposed = nr * G >= 8;
        if (transposed)
            for (int e = 0; e < d; e++) {
                float *row = ktT + (size_t)e * KT;
                for (int i = 0; i < nk; i++) row[i] = kt[(size_t)i * d + e];
                for (int i = nk; i < KT; i++) row[i] = 0.0f;
            }
        for (int r = 0; r < nr; r++) {
            int64_t p = j->pos0 + t_lo + r; /* this row sees keys ≤ p */
            if (k0 > p) continue;
            int n = (int)CM_MIN((int64_t)nk, p + 1 - k0);
            for (int h = 0; h < G; h++) {
                const float *qv = qr + ((size_t)r * G + h) * d;
                float *pm = part + ((size_t)r * G + h) * (d + 2);
                if (transposed)
                    tile_scores(qv, ktT, d, n, sc);
                else
                    for (int i = 0; i < n; i++) sc[i] = cpu_dot_f32(qv, kt + (size_t)i * d, d);
                float mx = -INFINITY;
                for (int i = 0; i < n; i++)
                    if (sc[i] > mx) mx = sc[i];
                float m_new = mx > pm[0] ? mx : pm[0];
                float corr = pm[0] == -INFINITY ? 0.0f : expf(pm[0] - m_new);
                float sum = cpu_exp_sub_sum(sc, sc, m_new, n);
                pm[1] = pm[1] * corr + sum;
                pm[0] = m_new;
                tile_pv(pm + 2, corr, sc, vt, d, n);
            }
        }
    }
}

static void attn_worker(void *p, int ith, int nth)
{
    struct attn_job *j = p;
    (void)nth;
    char *tls = j->tls + (size_t)ith * j->tls_bytes;
    float *kt = (float *)tls;
    float *vt = kt + (size_t)KT * j->d;
    float *ktT = vt + (size_t)KT * j->d;
    float *qr = ktT + (size_t)KT * j->d;
    float *sc = qr + (size_t)QB * j->G * j->d;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (it >= j->n_items) break;
        attn_item(j, it, kt, vt, ktT, qr, sc);
    }
}

static void attn_merge(void *p, int ith, int nth)
{
    struct attn_job *j = p;
    const cpu_attn_shape *s = j->s;
    int G = j->G, d = j->d;
    int64_t n_rows = j->n_tok * s->n_head;
    int64_t lo, hi;
    cm_split_range(n_rows, ith, nth, &lo, &hi);
    for (int64_t row = lo; row < hi; row++) {
        int64_t t = row / s->n_head;
        int head = (int)(row % s->n_head), g = head / G, h = head % G;
        int64_t qblk = t / QB;
        int r = (int)(t % QB);
        float *o = j->out + (size_t)row * d;
        float M = -INFINITY;
        for (int sp = 0; sp < j->n_split; sp++) {
            int64_t item = (qblk * s->n_head_kv + g) * j->n_split + sp;
            const float *pm = j->part + (size_t)item * part_floats(G, d) + ((size_t)r * G + h) * (d + 2);
            if (pm[0] > M) M = pm[0];
        }
        float L = 0;
        memset(o, 0, sizeof(float) * d);
        for (int sp = 0; sp < j->n_split; sp++) {
            int64_t item = (qblk * s->n_head_kv + g) * j->n_split + sp;
            const float *pm = j->part + (size_t)item * part_floats(G, d) + ((size_t)r * G + h) * (d + 2);
            if (pm[0] == -INFINITY) continue;
            float w = expf(pm[0] - M);
            L += pm[1] * w;
            cpu_axpy(o, w, pm + 2, d);
        }
        float inv = L > 0 ? 1.0f / L : 0.0f;
        for (int e = 0; e < d; e++) o[e] *= inv;
    }
}

void cpu_attn_dense(cm_pool *pool, const cpu_attn_shape *s, const cpu_rope *rope,
                    const cpu_kv_layer *kv, const float *q, int64_t pos0, int64_t n_tok,
                    float *out, void *scratch)
{
    int nth = cm_pool_size(pool);
    int G = s->n_head / s->n_head_kv, d = s->head_dim;
    CM_ASSERT(G >= 1 && G <= MAX_G && d <= MAX_D && s->n_head % s->n_head_kv == 0);
    struct attn_job j = {
        .s = s, .rope = rope, .kv = kv, .q = q, .pos0 = pos0, .n_tok = n_tok, .out = out,
        .G = G, .d = d,
    };
    j.n_qblk = (int)((n_tok + QB - 1) / QB);
    j.n_split = 1;
    if (j.n_qblk == 1) {
        /* one query block: split the keys so every thread has work; ≥ 256 keys per split */
        int64_t n_keys = pos0 + n_tok;
        int want = (4 * nth + s->n_head_kv - 1) / s->n_head_kv;
        int64_t cap = n_keys / 256 > 0 ? n_keys / 256 : 1;
        j.n_split = (int)CM_MIN((int64_t)CM_MAX(want, 1), cap);
        j.n_split = CM_MIN(j.n_split, 4 * nth);
    }
    j.n_items = (int64_t)j.n_qblk * s->n_head_kv * j.n_split;
    atomic_init(&j.next, 0);
    j.part = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    size_t part_bytes = sizeof(float) * (size_t)j.n_items * part_floats(G, d);
    j.tls = (char *)j.part + ((part_bytes + 63) & ~(size_t)63);
    j.tls_bytes = (sizeof(float) * ((size_t)KT * d * 3 + (size_t)QB * G * d + KT) + 63) & ~(size_t)63;
    cm_pool_run(pool, attn_worker, &j);
    cm_pool_run(pool, attn_merge, &j);
}
