/*
 * hip-mask.c — HiP mask estimation (shared/HIP.md §2): which 8-token key blocks each block of
 * 64 queries attends, besides the sink and the sliding window.
 *
 * Per query block (first position p0), stage by stage:
 *   stage 0 candidates = chunks of lc0 tokens from n_sink up to T - (n_stream - lc0);
 *   every candidate chunk [L, R) is walked down by binary descent, per query head: probe the
 *   middle of each half with the pooled, RoPE'd probe rows, keep the half whose probe scores
 *   higher (strict '>', ties go right, to the newer half), the chunk score being the best probe
 *   on the path; a chunk is active only while L ≤ p0 - (n_stream - lc0);
 *   scores are max-reduced over all query heads; between stages the exact top-k chunks are
 *   realigned to their grid cell, sorted by position and split into the next stage's chunks;
 *   the last stage keeps the best second_stage_k / lc chunks and emits their 8-token blocks.
 * Keys are un-rotated in the cache and rotated here to the pruning positions of §2.4.
 *
 * Threads split the candidate chunks of a stage; the query blocks of a prefill run one after
 * another (each block's stages depend on its own previous stage).
 */
#define _POSIX_C_SOURCE 200809L
#include "hip-impl.h"

#include <errno.h>
#include <float.h>
#include <stdlib.h>

#define HIP_SCORE_INIT (-32000.0f) /* score of a chunk no probe reached (inactive) */
#define HIP_KEY_MEMO 8             /* rotated probe keys remembered per thread */
#define HIP_MAX_HEAD_DIM 512

static int64_t floordiv(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

int hip_mask_init(hip_mask *m, const hip_layer_config *lc, int max_qblk)
{
    memset(m, 0, sizeof(*m));
    CM_ASSERT(lc->n_stages >= 1 && lc->n_stages <= HIP_MAX_STAGES && max_qblk >= 1);
    m->max_qblk = max_qblk;
    m->n_stages = lc->n_stages;
    m->kb = (int)(lc->second_stage_k / lc->stages[lc->n_stages - 1].chunk_size);
    m->idx = malloc(sizeof(int64_t) * (size_t)max_qblk * (size_t)m->kb);
    m->ks = calloc((size_t)max_qblk, sizeof(int32_t));
    if (!m->idx || !m->ks) goto oom;
    for (int s = 1; s < lc->n_stages; s++) {
        int64_t kept = lc->stages[s].stage_k / lc->stages[s - 1].chunk_size;
        int64_t split = lc->stages[s - 1].chunk_size / lc->stages[s].chunk_size;
        m->cand_cap[s] = (int)(kept * split);
        size_t n = (size_t)max_qblk * (size_t)m->cand_cap[s];
        m->cand_L[s] = malloc(sizeof(int64_t) * n);
        m->cand_R[s] = malloc(sizeof(int64_t) * n);
        m->cand_n[s] = calloc((size_t)max_qblk, sizeof(int32_t));
        if (!m->cand_L[s] || !m->cand_R[s] || !m->cand_n[s]) goto oom;
    }
    return 0;
oom:
    hip_mask_free(m);
    return -ENOMEM;
}

void hip_mask_free(hip_mask *m)
{
    free(m->idx);
    free(m->ks);
    for (int s = 0; s < HIP_MAX_STAGES; s++) {
        free(m->cand_L[s]);
        free(m->cand_R[s]);
        free(m->cand_n[s]);
    }
    memset(m, 0, sizeof(*m));
}

/* ---- probe rows (§2.3) -------------------------------------------------------------------------- */

/* Rotate-and-pool the nq queries of one block for one stage: rows[h][r] = mean over the valid
 * queries i of group r (stride queries each) of RoPE(scale * q[i][h], qpos(i)). */
static int prep_rows(const hip_args *a, const float *qb, int64_t p0, int nq, int stride, int64_t cc,
                     int64_t sw, float *rows)
{
    const int H = a->shape.n_head, d = a->shape.head_dim;
    const int nrow = (nq + stride - 1) / stride;
    float tmp[HIP_MAX_HEAD_DIM];
    for (int h = 0; h < H; h++) {
        for (int r = 0; r < nrow; r++) {
            float *row = rows + ((size_t)h * (size_t)nrow + (size_t)r) * (size_t)d;
            memset(row, 0, sizeof(float) * (size_t)d);
            int i0 = r * stride, i1 = CM_MIN(nq, i0 + stride);
            for (int i = i0; i < i1; i++) {
                const float *src = qb + ((size_t)i * (size_t)H + (size_t)h) * (size_t)d;
                for (int e = 0; e < d; e++) tmp[e] = src[e] * a->shape.scale;
                if (a->rope) {
                    int64_t p = p0 + i, qp;
                    if (!a->using_extend) qp = p;
                    else if (a->layer->scan_rope == HIP_SCAN_RELATIVE) qp = sw + 1;
                    else qp = CM_MIN(p, cc + sw);
                    cpu_rope_apply(a->rope, tmp, qp);
                }
                for (int e = 0; e < d; e++) row[e] += tmp[e];
            }
            float inv = 1.0f / (float)(i1 - i0);
            for (int e = 0; e < d; e++) row[e] *= inv;
        }
    }
    return nrow;
}

/* ---- the descent (§2.5) ------------------------------------------------------------------------- */

struct scan_job {
    const hip_args *a;
    const int64_t *L, *R; /* [n] candidate chunks, ascending */
    int64_t n;
    const float *rows;    /* [H][nrow][d] */
    int nrow;
    int64_t thr;          /* a chunk is active while its L ≤ thr (= max(0, p0 - sw)) */
    float *score;         /* [n] out: max over heads */
    int64_t *rep;         /* [n] out */
};

typedef struct key_memo {
    int64_t t, pos;
    int g;
    int used;
    float v[HIP_MAX_HEAD_DIM];
} key_memo;

/* The rotated key t of KV head g at pruning position pos, through a tiny per-thread memo:
 * all heads of a group probe the same two keys in the first iteration of every chunk. */
static const float *probe_key(const hip_args *a, key_memo *memo, int *next, int64_t t, int g,
                              int64_t pos)
{
    for (int i = 0; i < HIP_KEY_MEMO; i++)
        if (memo[i].used && memo[i].t == t && memo[i].g == g && memo[i].pos == pos) return memo[i].v;
    key_memo *e = &memo[*next];
    *next = (*next + 1) % HIP_KEY_MEMO;
    hip_load_row(&a->kv, a->kv.k, t, g, a->shape.head_dim, e->v);
    if (a->rope) cpu_rope_apply(a->rope, e->v, pos);
    e->t = t;
    e->g = g;
    e->pos = pos;
    e->used = 1;
    return e->v;
}

static float probe_score(const hip_args *a, const float *rows, int nrow, const float *k)
{
    const int d = a->shape.head_dim;
    float best = -FLT_MAX;
    for (int r = 0; r < nrow; r++) {
        float s = hip_dot(rows + (size_t)r * (size_t)d, k, d);
        if (a->score_bf16) s = hip_round_bf16(s);
        if (s > best) best = s;
    }
    return best;
}

static void scan_fn(void *ctx, int ith, int nth)
{
    struct scan_job *j = ctx;
    const hip_args *a = j->a;
    const int H = a->shape.n_head, G = a->shape.n_head / a->shape.n_head_kv, d = a->shape.head_dim;
    const bool relative = a->layer->scan_rope == HIP_SCAN_RELATIVE;
    key_memo memo[HIP_KEY_MEMO];
    for (int i = 0; i < HIP_KEY_MEMO; i++) memo[i].used = 0;
    int next = 0;
    int64_t lo, hi;
    cm_split_range(j->n, ith, nth, &lo, &hi);
    for (int64_t c = lo; c < hi; c++) {
        float cbest = HIP_SCORE_INIT;
        int64_t crep = j->L[c];
        bool have = false;
        for (int h = 0; h < H; h++) {
            const int g = h / G;
            const float *rows = j->rows + (size_t)h * (size_t)j->nrow * (size_t)d;
            int64_t l = j->L[c], r = j->R[c];
            float best = HIP_SCORE_INIT;
            bool any = false;
            /* ceil(log2(R - L)) + 1 passes, as the reference: the last pass (size 1) probes the
             * survivor as both halves and, with relative RoPE, adds its score at the right-half
             * position to the chunk score. (Leaving it out drops the overlap with the reference's
             * final lists from 0.996 to 0.961 on the test vectors.) */
            int64_t n_pass = 1;
            while (((int64_t)1 << (n_pass - 1)) < r - l) n_pass++;
            for (int64_t it = 0; it < n_pass; it++) {
                if (!(l <= j->thr && l < r && l >= 0)) break; /* activity, re-tested each pass */
                int64_t mid = (l + r) / 2, pl = (l + mid) / 2, pr = (mid + r) / 2;
                int64_t posl, posr;
                if (!a->using_extend) {
                    posl = pl;
                    posr = pr;
                } else if (relative) {
                    posl = 0;
                    posr = 1;
                } else {
                    posl = posr = c; /* the chunk's index in the (ascending) candidate list */
                }
                float sl = -INFINITY, sr = -INFINITY;
                if (pl < a->n_kv) sl = probe_score(a, rows, j->nrow, probe_key(a, memo, &next, pl, g, posl));
                if (pr < a->n_kv) sr = probe_score(a, rows, j->nrow, probe_key(a, memo, &next, pr, g, posr));
                float win;
                if (sl > sr) {
                    r = mid;
                    win = sl;
                } else {
                    l = mid;
                    win = sr;
                }
                if (!any || win > best) best = win;
                any = true;
            }
            if (any && (!have || best > cbest)) {
                cbest = best;
                crep = l;
                have = true;
            }
        }
        j->score[c] = cbest;
        j->rep[c] = crep;
    }
}

/* ---- selection ------------------------------------------------------------------------------------ */

struct ord {
    float s;
    int32_t i;
};

static int cmp_ord(const void *x, const void *y)
{
    const struct ord *a = x, *b = y;
    if (a->s != b->s) return a->s > b->s ? -1 : 1; /* descending score */
    return (a->i > b->i) - (a->i < b->i);           /* ties: older chunk first */
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

struct lr {
    int64_t L, R;
};

static int cmp_lr(const void *x, const void *y)
{
    const struct lr *a = x, *b = y;
    return (a->L > b->L) - (a->L < b->L);
}

/* ---- one query block ---------------------------------------------------------------------------- */

static int mask_block(const hip_args *a, const float *qb, int64_t p0, int nq, int first_stage,
                      hip_mask *m, int b, hip_work *w, cm_pool *pool)
{
    const hip_layer_config *lc = a->layer;
    const int S = lc->n_stages, H = a->shape.n_head, d = a->shape.head_dim;
    const int64_t T = a->n_kv, n_sink = lc->sink_token_size, n_stream = lc->sliding_window_size;
    const int64_t lc0 = lc->stages[0].chunk_size, sw = n_stream - lc0;
    const int bq = a->block_size_q, bk = a->block_size_k;

    /* the candidate list entering the first stage run */
    int64_t n;
    if (first_stage == 0) {
        n = T - n_sink - n_stream > 0 ? (T - n_sink - n_stream + lc0 - 1) / lc0 : 0;
    } else {
        n = m->cand_n[first_stage][b];
    }
    int64_t cap = CM_MAX(n, 1);
    for (int s = 1; s < S; s++) cap = CM_MAX(cap, m->cand_cap[s]);
    if (hip_buf_reserve(&w->buf[HIP_BUF_CAND_L], sizeof(int64_t) * (size_t)cap) ||
        hip_buf_reserve(&w->buf[HIP_BUF_CAND_R], sizeof(int64_t) * (size_t)cap) ||
        hip_buf_reserve(&w->buf[HIP_BUF_NEXT_L], sizeof(struct lr) * (size_t)cap) ||
        hip_buf_reserve(&w->buf[HIP_BUF_SCORE], sizeof(float) * (size_t)cap) ||
        hip_buf_reserve(&w->buf[HIP_BUF_REP], sizeof(int64_t) * (size_t)cap) ||
        hip_buf_reserve(&w->buf[HIP_BUF_ORDER], sizeof(struct ord) * (size_t)cap) ||
        hip_buf_reserve(&w->buf[HIP_BUF_ROWS], sizeof(float) * (size_t)H * (size_t)bq * (size_t)d))
        return -ENOMEM;
    int64_t *L = w->buf[HIP_BUF_CAND_L].p, *R = w->buf[HIP_BUF_CAND_R].p;
    struct lr *nx = w->buf[HIP_BUF_NEXT_L].p;
    float *score = w->buf[HIP_BUF_SCORE].p;
    int64_t *rep = w->buf[HIP_BUF_REP].p;
    struct ord *ord = w->buf[HIP_BUF_ORDER].p;
    float *rows = w->buf[HIP_BUF_ROWS].p;

    if (first_stage == 0) {
        for (int64_t j = 0; j < n; j++) {
            L[j] = n_sink + j * lc0;
            R[j] = CM_MIN(L[j] + lc0, T - sw);
        }
    } else {
        const int64_t *cl = m->cand_L[first_stage] + (size_t)b * (size_t)m->cand_cap[first_stage];
        const int64_t *cr = m->cand_R[first_stage] + (size_t)b * (size_t)m->cand_cap[first_stage];
        memcpy(L, cl, sizeof(int64_t) * (size_t)n);
        memcpy(R, cr, sizeof(int64_t) * (size_t)n);
    }

    for (int s = first_stage; s < S; s++) {
        const hip_stage *st = &lc->stages[s];
        if (s > first_stage) {
            /* the stage cache: this stage's input, kept for decode refreshes (§5) */
            CM_ASSERT(n <= m->cand_cap[s]);
            int64_t *cl = m->cand_L[s] + (size_t)b * (size_t)m->cand_cap[s];
            int64_t *cr = m->cand_R[s] + (size_t)b * (size_t)m->cand_cap[s];
            memcpy(cl, L, sizeof(int64_t) * (size_t)n);
            memcpy(cr, R, sizeof(int64_t) * (size_t)n);
            m->cand_n[s][b] = (int32_t)n;
        }
        int nrow = prep_rows(a, qb, p0, nq, st->block_stride_q, n, sw, rows);
        struct scan_job job = {
            .a = a, .L = L, .R = R, .n = n, .rows = rows, .nrow = nrow,
            .thr = CM_MAX(0, p0 - sw), .score = score, .rep = rep,
        };
        if (n > 0) {
            if (pool && n >= 64) hip_run(pool, scan_fn, &job);
            else scan_fn(&job, 0, 1);
        }
        for (int64_t c = 0; c < n; c++) {
            ord[c].s = score[c];
            ord[c].i = (int32_t)c;
        }
        if (s < S - 1) {
            /* exact top-k, realign to this stage's grid, sort by position, split (§2.7) */
            const int64_t lcs = st->chunk_size, lcn = lc->stages[s + 1].chunk_size;
            int64_t k = CM_MIN(n, lc->stages[s + 1].stage_k / lcs);
            qsort(ord, (size_t)n, sizeof(ord[0]), cmp_ord);
            for (int64_t i = 0; i < k; i++) {
                int64_t rp = rep[ord[i].i];
                nx[i].L = n_sink + floordiv(rp - n_sink, lcs) * lcs;
                nx[i].R = nx[i].L + lcs;
            }
            qsort(nx, (size_t)k, sizeof(nx[0]), cmp_lr);
            const int64_t split = lcs / lcn;
            int64_t nn = 0;
            for (int64_t i = 0; i < k; i++) {
                int64_t Lj = nx[i].L, Rj = nx[i].R, len = Rj - Lj;
                for (int64_t t = 0; t < split; t++) {
                    L[nn] = Lj + floordiv(t * len, split);
                    R[nn] = Rj - floordiv((split - 1 - t) * len, split);
                    nn++;
                }
            }
            n = nn;
        } else {
            /* final: best second_stage_k / lc chunks → sorted, de-duplicated blocks (§2.8) */
            int64_t *row = m->idx + (size_t)b * (size_t)m->kb;
            int64_t k = CM_MIN(n, (int64_t)m->kb);
            qsort(ord, (size_t)n, sizeof(ord[0]), cmp_ord);
            for (int64_t i = 0; i < k; i++) row[i] = floordiv(rep[ord[i].i], bk) * bk;
            qsort(row, (size_t)k, sizeof(int64_t), cmp_i64);
            int64_t u = 0;
            for (int64_t i = 0; i < k; i++)
                if (u == 0 || row[i] != row[u - 1]) row[u++] = row[i];
            int32_t ks = 0;
            for (int64_t i = 0; i < u; i++)
                if (row[i] < p0 + bq) ks++;
            for (int64_t i = u; i < m->kb; i++) row[i] = INT64_MAX;
            m->ks[b] = ks;
        }
    }
    return 0;
}

int hip_mask_estimate(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok,
                      int first_stage, hip_mask *m, hip_work *w, cm_pool *pool, cm_err *err)
{
    const hip_layer_config *lc = a->layer;
    if (!lc || n_tok < 1 || pos0 < 0 || a->n_kv < pos0 + n_tok)
        return cm_err_set(err, -EINVAL, "hip mask: bad call (n_tok %lld, pos0 %lld, T %lld)",
                          (long long)n_tok, (long long)pos0, (long long)a->n_kv);
    if (a->shape.n_head < 1 || a->shape.n_head_kv < 1 || a->shape.n_head % a->shape.n_head_kv ||
        a->shape.head_dim < 1 || a->shape.head_dim > HIP_MAX_HEAD_DIM || a->block_size_q < 1 ||
        a->block_size_k < 1)
        return cm_err_set(err, -EINVAL, "hip mask: bad shape");
    const int64_t bq = a->block_size_q, n_qblk = (n_tok + bq - 1) / bq;
    if (n_qblk > m->max_qblk || m->n_stages != lc->n_stages ||
        m->kb != (int)(lc->second_stage_k / lc->stages[lc->n_stages - 1].chunk_size))
        return cm_err_set(err, -EINVAL, "hip mask: mask buffer does not fit this call");
    for (int s = 0; s < lc->n_stages; s++)
        if (lc->stages[s].block_size_q != bq)
            return cm_err_set(err, -EINVAL, "hip mask: stage %d block_size_q %d != %lld", s,
                              lc->stages[s].block_size_q, (long long)bq);
    if (first_stage < 0 || first_stage > lc->n_stages || (first_stage > 0 && n_qblk != 1))
        return cm_err_set(err, -EINVAL, "hip mask: bad first stage %d", first_stage);
    if (first_stage == lc->n_stages) return 0; /* reuse the final lists as they are */
    const int H = a->shape.n_head, d = a->shape.head_dim;
    for (int64_t b = 0; b < n_qblk; b++) {
        int nq = (int)CM_MIN(bq, n_tok - b * bq);
        int rc = mask_block(a, q + (size_t)(b * bq) * (size_t)H * (size_t)d, pos0 + b * bq, nq,
                            first_stage, m, (int)b, w, pool);
        if (rc) return cm_err_set(err, rc, "hip mask: out of memory");
    }
    m->n_qblk = (int)n_qblk;
    m->pos0 = pos0;
    return 0;
}
