/*
 * model.c — contexts and the forward pass: prefill(chunk) and decode(step).
 *
 * One forward over n tokens (n ≤ n_chunk) at positions n_past..:
 *   x = embed(tokens)
 *   per layer: x += Wo · attn(rope(Wq·norm(x)), K, V)  with K/V of this chunk appended first
 *              x += Wdown · (silu(Wgate·norm(x)) * Wup·norm(x))
 *   logits = Wout · norm(x[last])
 * The K cache holds un-rotated keys; the attention provider rotates keys and queries itself.
 * All buffers are sized for n_chunk tokens at init; nothing is allocated in the token loop.
 */
#define _POSIX_C_SOURCE 200809L
#include "model.h"
#include "../tensor/tensor.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MDL_DEFAULT_CHUNK 512

mdl_ctx_params mdl_ctx_default_params(void)
{
    mdl_ctx_params p = {.n_ctx = 0, .n_threads = 0, .kv_type = CPU_KV_F16, .n_chunk = 0};
    return p;
}

/* ---- the dense attention provider ------------------------------------------------------------ */
/*
 * The cache holds un-rotated keys (HIP.md §4). Dense attention sees every key at its true
 * position, so rotating all T keys on every decode step would cost as much as the dot products;
 * the dense provider therefore keeps its own derived copy of the keys rotated at their true
 * positions (same element type), filled as tokens are appended. `n_valid[il]` counts the leading
 * rows of layer il that are current: rows written behind the provider's back (a KV load from the
 * store after a reset) are rotated on the next call. The copy is allocated on first use, once.
 */
struct dense_state {
    void **krot;       /* [n_layer] → [n_ctx][n_head_kv*head_dim] rotated keys, or NULL */
    int64_t *n_valid;  /* [n_layer] */
    int64_t n_layer;
};

static void dense_free(void *self)
{
    struct dense_state *d = self;
    if (!d) return;
    if (d->krot)
        for (int64_t il = 0; il < d->n_layer; il++) cm_free_aligned(d->krot[il]);
    free(d->krot);
    free(d->n_valid);
    free(d);
}

static void dense_reset(void *self)
{
    struct dense_state *d = self;
    if (d && d->n_valid) memset(d->n_valid, 0, sizeof(int64_t) * (size_t)d->n_layer);
}

struct rot_job {
    mdl_ctx *c;
    const void *src;
    void *dst;
    int64_t lo, hi;
};

static void rotate_rows(void *p, int ith, int nth)
{
    struct rot_job *j = p;
    const mdl_hparams *hp = &j->c->model->hp;
    int64_t kvd = hp->n_head_kv * hp->head_dim, lo, hi;
    cm_split_range(j->hi - j->lo, ith, nth, &lo, &hi);
    float row[4096];
    CM_ASSERT(kvd <= 4096);
    for (int64_t t = j->lo + lo; t < j->lo + hi; t++) {
        const char *sr = (const char *)j->src + (size_t)t * j->c->kv_row_bytes;
        char *dr = (char *)j->dst + (size_t)t * j->c->kv_row_bytes;
        if (j->c->params.kv_type == CPU_KV_F16) tn_dequant_row(TN_F16, sr, row, kvd);
        else memcpy(row, sr, sizeof(float) * (size_t)kvd);
        for (int64_t h = 0; h < hp->n_head_kv; h++) cpu_rope_apply(&j->c->rope, row + h * hp->head_dim, t);
        if (j->c->params.kv_type == CPU_KV_F16) tn_quantize_row(TN_F16, row, dr, kvd);
        else memcpy(dr, row, sizeof(float) * (size_t)kvd);
    }
}

static int dense_attend(void *self, mdl_ctx *c, int il, const float *q, int64_t pos0,
                        int64_t n_tok, float *out)
{
    struct dense_state *d = self;
    const mdl_hparams *hp = &c->model->hp;
    if (!d->krot) {
        d->n_layer = hp->n_layer;
        d->krot = calloc((size_t)hp->n_layer, sizeof(void *));
        d->n_valid = calloc((size_t)hp->n_layer, sizeof(int64_t));
        if (!d->krot || !d->n_valid) return -ENOMEM;
        for (int64_t l = 0; l < hp->n_layer; l++) {
            d->krot[l] = cm_alloc_aligned(c->kv_row_bytes * (size_t)c->params.n_ctx, 64);
            if (!d->krot[l]) return -ENOMEM;
        }
    }
    int64_t from = CM_MIN(d->n_valid[il], pos0);
    struct rot_job rj = {.c = c, .src = c->k_cache[il], .dst = d->krot[il], .lo = from,
                         .hi = pos0 + n_tok};
    if (rj.hi - rj.lo > 1) cm_pool_run(c->pool, rotate_rows, &rj);
    else rotate_rows(&rj, 0, 1);
    d->n_valid[il] = pos0 + n_tok;

    cpu_attn_shape s = {
        .n_head = (int)hp->n_head,
        .n_head_kv = (int)hp->n_head_kv,
        .head_dim = (int)hp->head_dim,
        .scale = 1.0f / sqrtf((float)hp->head_dim),
    };
    cpu_kv_layer kv = {
        .k = d->krot[il], .v = c->v_cache[il], .kv_type = c->params.kv_type,
        .row_bytes = c->kv_row_bytes, .k_rotated = true,
    };
    cpu_attn_dense(c->pool, &s, &c->rope, &kv, q, pos0, n_tok, out, c->attn_scratch);
    return 0;
}

/* A fresh dense provider (its rotated-key copy is allocated on first use). */
static int dense_provider_init(mdl_attn *a)
{
    struct dense_state *d = calloc(1, sizeof(*d));
    if (!d) return -ENOMEM;
    *a = (mdl_attn){.name = "dense", .attend = dense_attend, .reset = dense_reset,
                    .free = dense_free, .self = d};
    return 0;
}

/* ---- context --------------------------------------------------------------------------------- */

mdl_ctx *mdl_ctx_init(const mdl_model *m, const mdl_ctx_params *pp, cm_err *err)
{
    const mdl_hparams *hp = &m->hp;
    mdl_ctx_params p = pp ? *pp : mdl_ctx_default_params();
    if (p.n_ctx <= 0) p.n_ctx = hp->n_ctx_train;
    if (p.n_threads <= 0) p.n_threads = cm_num_cpus();
    if (p.n_chunk <= 0) p.n_chunk = MDL_DEFAULT_CHUNK;
    if (p.n_chunk > p.n_ctx) p.n_chunk = p.n_ctx;
    if (p.kv_type != CPU_KV_F16 && p.kv_type != CPU_KV_F32) {
        cm_err_set(err, -EINVAL, "context: unknown KV type %d", p.kv_type);
        return NULL;
    }
    if (p.n_ctx > ((int64_t)1 << 32) || p.n_threads > 1024) {
        cm_err_set(err, -CM_ELIMIT, "context: n_ctx %lld or threads %d out of range",
                   (long long)p.n_ctx, p.n_threads);
        return NULL;
    }
    mdl_ctx *c = calloc(1, sizeof(*c));
    if (!c) goto oom;
    c->model = m;
    c->params = p;
    if (dense_provider_init(&c->attn) < 0) goto oom;
    c->pool = cm_pool_init(p.n_threads);
    if (!c->pool) goto oom;
    if (cpu_rope_init(&c->rope, hp->rope_style, (int)hp->head_dim, (int)hp->n_rot, hp->rope_base,
                      hp->rope_linear_scale, m->rope_freqs, p.n_ctx) < 0)
        goto oom;

    int64_t kvd = hp->n_head_kv * hp->head_dim;
    c->kv_row_bytes = (size_t)kvd * (p.kv_type == CPU_KV_F16 ? 2 : 4);
    c->k_cache = calloc((size_t)hp->n_layer, sizeof(void *));
    c->v_cache = calloc((size_t)hp->n_layer, sizeof(void *));
    if (!c->k_cache || !c->v_cache) goto oom;
    for (int64_t il = 0; il < hp->n_layer; il++) {
        c->k_cache[il] = cm_alloc_aligned(c->kv_row_bytes * (size_t)p.n_ctx, 64);
        c->v_cache[il] = cm_alloc_aligned(c->kv_row_bytes * (size_t)p.n_ctx, 64);
        if (!c->k_cache[il] || !c->v_cache[il]) goto oom;
    }
    size_t n = (size_t)p.n_chunk;
    int64_t qd = hp->n_head * hp->head_dim;
    int64_t widest = CM_MAX(CM_MAX(hp->n_embd, qd), hp->n_ff);
    c->x = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_embd, 64);
    c->xn = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_embd, 64);
    c->q = cm_alloc_aligned(sizeof(float) * n * (size_t)qd, 64);
    c->k = cm_alloc_aligned(sizeof(float) * n * (size_t)kvd, 64);
    c->v = cm_alloc_aligned(sizeof(float) * n * (size_t)kvd, 64);
    c->ao = cm_alloc_aligned(sizeof(float) * n * (size_t)CM_MAX(qd, hp->n_embd), 64);
    c->gate = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_ff, 64);
    c->up = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_ff, 64);
    c->logits = cm_alloc_aligned(sizeof(float) * (size_t)hp->n_vocab, 64);
    c->mm_scratch = cm_alloc_aligned(cpu_matmul_scratch_size(widest, (int64_t)n), 64);
    cpu_attn_shape s = {.n_head = (int)hp->n_head, .n_head_kv = (int)hp->n_head_kv,
                        .head_dim = (int)hp->head_dim};
    c->attn_scratch_bytes = CM_MAX(cpu_attn_scratch_size(&s, p.n_threads, (int64_t)n, p.n_ctx),
                                   cpu_attn_scratch_size(&s, p.n_threads, 1, p.n_ctx));
    c->attn_scratch = cm_alloc_aligned(c->attn_scratch_bytes, 64);
    if (!c->x || !c->xn || !c->q || !c->k || !c->v || !c->ao || !c->gate || !c->up ||
        !c->logits || !c->mm_scratch || !c->attn_scratch)
        goto oom;
    return c;
oom:
    cm_err_set(err, -ENOMEM, "context: out of memory (n_ctx %lld: KV cache %.1f MiB)",
               (long long)p.n_ctx,
               (double)hp->n_layer * 2 * (double)(hp->n_head_kv * hp->head_dim) *
                   (p.kv_type == CPU_KV_F16 ? 2 : 4) * (double)p.n_ctx / 1048576.0);
    mdl_ctx_free(c);
    return NULL;
}

void mdl_ctx_free(mdl_ctx *c)
{
    if (!c) return;
    if (c->attn.free) c->attn.free(c->attn.self);
    if (c->k_cache)
        for (int64_t il = 0; il < c->model->hp.n_layer; il++) cm_free_aligned(c->k_cache[il]);
    if (c->v_cache)
        for (int64_t il = 0; il < c->model->hp.n_layer; il++) cm_free_aligned(c->v_cache[il]);
    free(c->k_cache);
    free(c->v_cache);
    cm_free_aligned(c->x);
    cm_free_aligned(c->xn);
    cm_free_aligned(c->q);
    cm_free_aligned(c->k);
    cm_free_aligned(c->v);
    cm_free_aligned(c->ao);
    cm_free_aligned(c->gate);
    cm_free_aligned(c->up);
    cm_free_aligned(c->logits);
    cm_free_aligned(c->mm_scratch);
    cm_free_aligned(c->attn_scratch);
    cpu_rope_free(&c->rope);
    cm_pool_free(c->pool);
    free(c);
}

void mdl_ctx_reset(mdl_ctx *c)
{
    c->n_past = 0;
    if (c->attn.reset) c->attn.reset(c->attn.self);
}

void mdl_ctx_set_attn(mdl_ctx *c, const mdl_attn *a)
{
    if (c->attn.free) c->attn.free(c->attn.self);
    memset(&c->attn, 0, sizeof(c->attn));
    if (a) c->attn = *a;
    else if (dense_provider_init(&c->attn) < 0) CM_ABORT("out of memory for the dense provider");
}

const float *mdl_ctx_logits(const mdl_ctx *c)
{
    return c->logits;
}

int64_t mdl_ctx_n_past(const mdl_ctx *c)
{
    return c->n_past;
}

/* ---- forward --------------------------------------------------------------------------------- */

struct rows_job {
    mdl_ctx *c;
    int64_t n;
    const float *g; /* norm weight, or NULL for swiglu */
};

static void norm_rows(void *p, int ith, int nth)
{
    struct rows_job *j = p;
    const mdl_hparams *hp = &j->c->model->hp;
    int64_t lo, hi;
    cm_split_range(j->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        cpu_rms_norm(j->c->x + t * hp->n_embd, j->g, j->c->xn + t * hp->n_embd, hp->n_embd,
                     hp->rms_eps);
}

static void swiglu_rows(void *p, int ith, int nth)
{
    struct rows_job *j = p;
    int64_t F = j->c->model->hp.n_ff, lo, hi;
    cm_split_range(j->n * F, ith, nth, &lo, &hi);
    cpu_swiglu(j->c->gate + lo, j->c->up + lo, hi - lo);
}

static void add_into(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* Forward n ≤ n_chunk tokens at positions c->n_past.. ; logits of the last one if want. */
static int forward(mdl_ctx *c, const int32_t *tokens, int64_t n, bool want_logits, cm_err *err)
{
    const mdl_model *m = c->model;
    const mdl_hparams *hp = &m->hp;
    int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    int64_t pos0 = c->n_past;

    for (int64_t t = 0; t < n; t++)
        tn_dequant_row(m->tok_embd.type,
                       (const char *)m->tok_embd.data + (size_t)tokens[t] * m->tok_embd.row_bytes,
                       c->x + t * E, E);

    for (int64_t il = 0; il < hp->n_layer; il++) {
        const mdl_layer *L = &m->layers[il];
        struct rows_job rj = {.c = c, .n = n, .g = L->attn_norm};
        cm_pool_run(c->pool, norm_rows, &rj);
        cpu_matmul(c->pool, &L->wq, c->xn, n, c->q, c->mm_scratch);
        cpu_matmul(c->pool, &L->wk, c->xn, n, c->k, c->mm_scratch);
        cpu_matmul(c->pool, &L->wv, c->xn, n, c->v, c->mm_scratch);
        cpu_kv_store(c->k_cache[il], c->v_cache[il], c->params.kv_type, c->kv_row_bytes, c->k,
                     c->v, pos0, n, kvd);
        int rc = c->attn.attend(c->attn.self, c, (int)il, c->q, pos0, n, c->ao);
        if (rc < 0) return cm_err_set(err, rc, "attention provider '%s' failed in layer %lld",
                                      c->attn.name, (long long)il);
        cpu_matmul(c->pool, &L->wo, c->ao, n, c->xn, c->mm_scratch);
        add_into(c->x, c->xn, n * E);

        rj.g = L->ffn_norm;
        cm_pool_run(c->pool, norm_rows, &rj);
        cpu_matmul(c->pool, &L->w_gate, c->xn, n, c->gate, c->mm_scratch);
        cpu_matmul(c->pool, &L->w_up, c->xn, n, c->up, c->mm_scratch);
        cm_pool_run(c->pool, swiglu_rows, &rj);
        cpu_matmul(c->pool, &L->w_down, c->gate, n, c->xn, c->mm_scratch);
        add_into(c->x, c->xn, n * E);
        (void)qd;
    }
    c->n_past += n;
    if (want_logits) {
        cpu_rms_norm(c->x + (n - 1) * E, m->output_norm, c->xn, E, hp->rms_eps);
        cpu_matmul(c->pool, &m->output, c->xn, 1, c->logits, c->mm_scratch);
    }
    return 0;
}

static int check_tokens(const mdl_ctx *c, const int32_t *tokens, int64_t n, cm_err *err)
{
    if (n <= 0) return cm_err_set(err, -EINVAL, "no tokens to process");
    if (c->n_past + n > c->params.n_ctx)
        return cm_err_set(err, -CM_ELIMIT,
                          "context full: %lld tokens in the cache + %lld new > n_ctx %lld "
                          "(raise --ctx)",
                          (long long)c->n_past, (long long)n, (long long)c->params.n_ctx);
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->model->hp.n_vocab)
            return cm_err_set(err, -EINVAL, "token id %d at index %lld is outside the vocabulary "
                              "[0, %lld)", tokens[i], (long long)i, (long long)c->model->hp.n_vocab);
    return 0;
}

int mdl_prefill(mdl_ctx *c, const int32_t *tokens, int64_t n, float *logits,
                mdl_progress_fn progress, void *user, cm_err *err)
{
    int rc = check_tokens(c, tokens, n, err);
    if (rc < 0) return rc;
    for (int64_t done = 0; done < n;) {
        int64_t k = CM_MIN(c->params.n_chunk, n - done);
        rc = forward(c, tokens + done, k, done + k == n, err);
        if (rc < 0) return rc;
        done += k;
        if (progress && progress(user, done, n) != 0)
            return cm_err_set(err, -ECANCELED, "prefill cancelled after %lld of %lld tokens",
                              (long long)done, (long long)n);
    }
    if (logits) memcpy(logits, c->logits, sizeof(float) * (size_t)c->model->hp.n_vocab);
    return 0;
}

int mdl_decode(mdl_ctx *c, int32_t token, float *logits, cm_err *err)
{
    int rc = check_tokens(c, &token, 1, err);
    if (rc < 0) return rc;
    rc = forward(c, &token, 1, true, err);
    if (rc < 0) return rc;
    if (logits) memcpy(logits, c->logits, sizeof(float) * (size_t)c->model->hp.n_vocab);
    return 0;
}

/* ---- batched decode across sequences --------------------------------------------------------- */
/*
 * The per-token work of a decode step is almost all weight matmuls; for n concurrent sequences
 * they become one matmul of n tokens (the weight tile stays in cache while the n tokens stream
 * past it), while attention, the only part that reads a sequence's own state, runs per sequence
 * on its own context. Row i of every batch buffer is sequence i.
 */
struct mdl_batch {
    const mdl_model *model;
    int max_n;
    cm_pool *pool;    /* the matmuls' threads */
    float *x, *xn;    /* [max_n][n_embd] residual stream, normed / projected */
    float *q, *ao;    /* [max_n][n_head*head_dim] queries, attention output */
    float *k, *v;     /* [max_n][n_head_kv*head_dim] the step's keys and values */
    float *gate, *up; /* [max_n][n_ff] */
    float *logits;    /* [max_n][n_vocab] */
    void *mm_scratch; /* cpu_matmul_scratch_size(widest input, max_n) */
    int64_t *pos;     /* [max_n] position of each sequence's token */
    bool exact;       /* matmuls in groups of ≤ MDL_EXACT_GROUP tokens (see model.h) */
};

/* Below 4 tokens cpu_matmul uses the single-token dot for every pair (bit-identical to decode). */
#define MDL_EXACT_GROUP 3

void mdl_batch_set_exact(mdl_batch *b, bool exact)
{
    b->exact = exact;
}

/* y[n][w->n_out] = W x[n][w->n_in], in exact or fast mode. */
static void batch_matmul(mdl_batch *b, const cpu_weight *w, const float *x, int64_t n, float *y)
{
    int64_t g = b->exact ? MDL_EXACT_GROUP : n;
    for (int64_t t = 0; t < n; t += g)
        cpu_matmul(b->pool, w, x + t * w->n_in, CM_MIN(g, n - t), y + t * w->n_out, b->mm_scratch);
}

void mdl_batch_free(mdl_batch *b)
{
    if (!b) return;
    cm_pool_free(b->pool);
    cm_free_aligned(b->x);
    cm_free_aligned(b->xn);
    cm_free_aligned(b->q);
    cm_free_aligned(b->ao);
    cm_free_aligned(b->k);
    cm_free_aligned(b->v);
    cm_free_aligned(b->gate);
    cm_free_aligned(b->up);
    cm_free_aligned(b->logits);
    cm_free_aligned(b->mm_scratch);
    free(b->pos);
    free(b);
}

mdl_batch *mdl_batch_init(const mdl_model *m, int max_seqs, int n_threads, cm_err *err)
{
    if (!m || max_seqs < 1 || max_seqs > 4096 || n_threads < 0 || n_threads > 1024) {
        cm_err_set(err, -EINVAL, "batch: max_seqs %d (1..4096) or threads %d out of range",
                   max_seqs, n_threads);
        return NULL;
    }
    const mdl_hparams *hp = &m->hp;
    mdl_batch *b = calloc(1, sizeof(*b));
    if (!b) goto oom;
    b->model = m;
    b->max_n = max_seqs;
    b->exact = true;
    b->pool = cm_pool_init(n_threads > 0 ? n_threads : cm_num_cpus());
    size_t n = (size_t)max_seqs;
    int64_t qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    int64_t widest = CM_MAX(CM_MAX(hp->n_embd, qd), hp->n_ff);
    b->x = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_embd, 64);
    b->xn = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_embd, 64);
    b->q = cm_alloc_aligned(sizeof(float) * n * (size_t)qd, 64);
    b->ao = cm_alloc_aligned(sizeof(float) * n * (size_t)qd, 64);
    b->k = cm_alloc_aligned(sizeof(float) * n * (size_t)kvd, 64);
    b->v = cm_alloc_aligned(sizeof(float) * n * (size_t)kvd, 64);
    b->gate = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_ff, 64);
    b->up = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_ff, 64);
    b->logits = cm_alloc_aligned(sizeof(float) * n * (size_t)hp->n_vocab, 64);
    b->mm_scratch = cm_alloc_aligned(cpu_matmul_scratch_size(widest, (int64_t)n), 64);
    b->pos = calloc(n, sizeof(int64_t));
    if (!b->pool || !b->x || !b->xn || !b->q || !b->ao || !b->k || !b->v || !b->gate || !b->up ||
        !b->logits || !b->mm_scratch || !b->pos)
        goto oom;
    return b;
oom:
    cm_err_set(err, -ENOMEM, "batch: out of memory for %d sequences", max_seqs);
    mdl_batch_free(b);
    return NULL;
}

struct batch_rows_job {
    mdl_batch *b;
    int64_t n;
    const float *g;
};

static void batch_norm_rows(void *p, int ith, int nth)
{
    struct batch_rows_job *j = p;
    int64_t E = j->b->model->hp.n_embd, lo, hi;
    cm_split_range(j->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        cpu_rms_norm(j->b->x + t * E, j->g, j->b->xn + t * E, E, j->b->model->hp.rms_eps);
}

static void batch_swiglu_rows(void *p, int ith, int nth)
{
    struct batch_rows_job *j = p;
    int64_t F = j->b->model->hp.n_ff, lo, hi;
    cm_split_range(j->n * F, ith, nth, &lo, &hi);
    cpu_swiglu(j->b->gate + lo, j->b->up + lo, hi - lo);
}

int mdl_decode_batch(mdl_batch *b, mdl_ctx *const *ctxs, const int32_t *tokens, int n,
                     float *const *logits, cm_err *err)
{
    if (!b || !ctxs || !tokens)
        return cm_err_set(err, -EINVAL, "decode batch: NULL batch, contexts or tokens");
    if (n < 1 || n > b->max_n)
        return cm_err_set(err, -EINVAL, "decode batch: %d sequences (the batch holds 1..%d)", n,
                          b->max_n);
    const mdl_model *m = b->model;
    const mdl_hparams *hp = &m->hp;
    for (int i = 0; i < n; i++) {
        if (!ctxs[i]) return cm_err_set(err, -EINVAL, "decode batch: context %d is NULL", i);
        if (ctxs[i]->model != m)
            return cm_err_set(err, -EINVAL,
                              "decode batch: context %d belongs to another model than the batch",
                              i);
        for (int j = 0; j < i; j++)
            if (ctxs[j] == ctxs[i])
                return cm_err_set(err, -EINVAL, "decode batch: contexts %d and %d are the same", j,
                                  i);
        int rc = check_tokens(ctxs[i], &tokens[i], 1, err);
        if (rc < 0) {
            cm_err_prefix(err, "decode batch: sequence %d: ", i);
            return rc;
        }
    }
    int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    for (int i = 0; i < n; i++) {
        b->pos[i] = ctxs[i]->n_past;
        tn_dequant_row(m->tok_embd.type,
                       (const char *)m->tok_embd.data + (size_t)tokens[i] * m->tok_embd.row_bytes,
                       b->x + i * E, E);
    }
    struct batch_rows_job rj = {.b = b, .n = n};
    for (int64_t il = 0; il < hp->n_layer; il++) {
        const mdl_layer *L = &m->layers[il];
        rj.g = L->attn_norm;
        cm_pool_run(b->pool, batch_norm_rows, &rj);
        batch_matmul(b, &L->wq, b->xn, n, b->q);
        batch_matmul(b, &L->wk, b->xn, n, b->k);
        batch_matmul(b, &L->wv, b->xn, n, b->v);
        for (int i = 0; i < n; i++) {
            mdl_ctx *c = ctxs[i];
            cpu_kv_store(c->k_cache[il], c->v_cache[il], c->params.kv_type, c->kv_row_bytes,
                         b->k + i * kvd, b->v + i * kvd, b->pos[i], 1, kvd);
            /* Attention runs on the batch's pool when it has the context's thread count (same
             * work split, so the same results): switching between pools would leave the idle
             * pool's workers spinning on the cores the busy one needs. */
            cm_pool *own = c->pool;
            if (cm_pool_size(b->pool) == c->params.n_threads) c->pool = b->pool;
            int rc = c->attn.attend(c->attn.self, c, (int)il, b->q + i * qd, b->pos[i], 1,
                                    b->ao + i * qd);
            c->pool = own;
            if (rc < 0)
                return cm_err_set(err, rc,
                                  "decode batch: sequence %d: attention provider '%s' "
                                  "failed in layer %lld",
                                  i, c->attn.name, (long long)il);
        }
        batch_matmul(b, &L->wo, b->ao, n, b->xn);
        add_into(b->x, b->xn, n * E);

        rj.g = L->ffn_norm;
        cm_pool_run(b->pool, batch_norm_rows, &rj);
        batch_matmul(b, &L->w_gate, b->xn, n, b->gate);
        batch_matmul(b, &L->w_up, b->xn, n, b->up);
        cm_pool_run(b->pool, batch_swiglu_rows, &rj);
        batch_matmul(b, &L->w_down, b->gate, n, b->xn);
        add_into(b->x, b->xn, n * E);
    }
    for (int i = 0; i < n; i++)
        cpu_rms_norm(b->x + i * E, m->output_norm, b->xn + i * E, E, hp->rms_eps);
    batch_matmul(b, &m->output, b->xn, n, b->logits);
    size_t lb = sizeof(float) * (size_t)hp->n_vocab;
    for (int i = 0; i < n; i++) {
        ctxs[i]->n_past++;
        memcpy(ctxs[i]->logits, b->logits + (size_t)i * (size_t)hp->n_vocab, lb);
        if (logits && logits[i]) memcpy(logits[i], ctxs[i]->logits, lb);
    }
    return 0;
}
