/*
 * hip-attn.c — HiP attention as a model attention provider (mdl_attn), with the decode-time
 * mask refresh schedule of shared/HIP.md §5 and the prefill of §6.
 *
 * State per layer: the decode mask (one query block) holding the stage caches (the candidate
 * lists that entered stages 1, 2) and the final block lists, the layer's decode counter, and a
 * prefill mask sized for one chunk. Each layer counts its own decode steps; every layer sees the
 * same sequence of calls, so the counters agree, and no layer depends on the order in which the
 * model calls them. A prefill chunk resets the counter, so the first decode step after a prompt
 * always recomputes everything (c = 0).
 *
 * Prefill chunks of ≥ 2 query blocks compute their last block in a second call with a window of
 * model_context_length - n_sink - k3 - bq (the reference's "last block near-dense"). Unlike the
 * reference, whose pruning for that call runs with a magic in-kernel window of 521, the second
 * call prunes with its own (enlarged) window, i.e. it selects blocks from before that window.
 */
#define _POSIX_C_SOURCE 200809L
#include "hip-impl.h"

#include <errno.h>
#include <stdlib.h>

typedef struct hip_provider {
    hip_config cfg;
    int n_layer;
    int64_t ctx_len;          /* model_context_length in effect */
    int max_qblk;             /* prefill mask capacity (0 until the first call) */
    hip_mask *dec;            /* [n_layer] */
    hip_mask *pre;            /* [n_layer] */
    bool *dec_valid;          /* [n_layer] the decode mask holds a full run since the reset */
    hip_attn_stats *stats;    /* [n_layer] */
    hip_layer_config *wide;   /* [n_layer] prefill config with the near-dense window */
    hip_work *work;
} hip_provider;

static void prov_free_masks(hip_provider *p)
{
    for (int il = 0; il < p->n_layer; il++) {
        if (p->dec) hip_mask_free(&p->dec[il]);
        if (p->pre) hip_mask_free(&p->pre[il]);
    }
    p->max_qblk = 0;
}

static void prov_free(void *self)
{
    hip_provider *p = self;
    if (!p) return;
    prov_free_masks(p);
    free(p->dec);
    free(p->pre);
    free(p->dec_valid);
    free(p->stats);
    free(p->wide);
    hip_work_free(p->work);
    free(p);
}

static void prov_reset(void *self)
{
    hip_provider *p = self;
    for (int il = 0; il < p->n_layer; il++) {
        p->dec_valid[il] = false;
        p->stats[il].step = 0;
    }
}

static int prov_alloc(hip_provider *p, const mdl_ctx *ctx)
{
    const int bq = p->cfg.block_sparse_block_size_q;
    int max_qblk = (int)((ctx->params.n_chunk + bq - 1) / bq);
    if (max_qblk <= p->max_qblk) return 0;
    prov_free_masks(p);
    for (int il = 0; il < p->n_layer; il++) {
        const hip_layer_config *dl = hip_config_layer(&p->cfg, il, p->n_layer, false);
        const hip_layer_config *pl = hip_config_layer(&p->cfg, il, p->n_layer, true);
        if (hip_mask_init(&p->dec[il], dl, 1) || hip_mask_init(&p->pre[il], pl, max_qblk)) {
            prov_free_masks(p);
            return -ENOMEM;
        }
        p->dec_valid[il] = false;
    }
    p->max_qblk = max_qblk;
    return 0;
}

static int prov_attend(void *self, mdl_ctx *ctx, int il, const float *q, int64_t pos0,
                       int64_t n_tok, float *out)
{
    hip_provider *p = self;
    const mdl_hparams *hp = &ctx->model->hp;
    cm_err err = {0};
    int rc = prov_alloc(p, ctx);
    if (rc) {
        CM_LOG_ERROR("hip attention: out of memory for the masks");
        return rc;
    }
    const bool decode = n_tok == 1;
    hip_args a;
    hip_args_from_config(&a, &p->cfg, il, p->n_layer, !decode);
    a.shape.n_head = (int)hp->n_head;
    a.shape.n_head_kv = (int)hp->n_head_kv;
    a.shape.head_dim = (int)hp->head_dim;
    a.shape.scale = 1.0f / sqrtf((float)hp->head_dim);
    a.rope = &ctx->rope;
    a.kv.k = ctx->k_cache[il];
    a.kv.v = ctx->v_cache[il];
    a.kv.kv_type = ctx->params.kv_type;
    a.kv.row_bytes = ctx->kv_row_bytes;
    a.n_kv = pos0 + n_tok;
    hip_attn_stats *st = &p->stats[il];
    const int bq = a.block_size_q;

    if (decode) {
        const int S = a.layer->n_stages;
        int fs = hip_refresh_stage(&p->cfg, S, st->step);
        if (!p->dec_valid[il]) fs = 0;
        rc = hip_mask_estimate(&a, q, pos0, 1, fs, &p->dec[il], p->work, ctx->pool, &err);
        if (rc == 0) rc = hip_bsa(&a, q, pos0, 1, &p->dec[il], out, p->work, ctx->pool, &err);
        if (rc == 0) {
            p->dec_valid[il] = true;
            st->last_first_stage = fs;
            st->n_decode[fs]++;
            st->step++;
        }
    } else {
        st->step = 0;
        p->dec_valid[il] = false;
        st->last_first_stage = -1;
        st->n_prefill++;
        const hip_layer_config *lc = a.layer;
        const int64_t wide = p->ctx_len - lc->sink_token_size - lc->second_stage_k - bq;
        if (p->cfg.prefill_last_block_dense && n_tok >= 2 * bq && wide > lc->sliding_window_size) {
            const int64_t n1 = n_tok - bq;
            const size_t row = (size_t)hp->n_head * (size_t)hp->head_dim;
            rc = hip_attention(&a, q, pos0, n1, &p->pre[il], out, p->work, ctx->pool, &err);
            if (rc == 0) {
                p->wide[il] = *lc;
                p->wide[il].sliding_window_size = wide;
                a.layer = &p->wide[il];
                rc = hip_attention(&a, q + (size_t)n1 * row, pos0 + n1, bq, &p->pre[il],
                                   out + (size_t)n1 * row, p->work, ctx->pool, &err);
                st->n_last_block++;
            }
        } else {
            rc = hip_attention(&a, q, pos0, n_tok, &p->pre[il], out, p->work, ctx->pool, &err);
        }
    }
    if (rc) CM_LOG_ERROR("hip attention, layer %d: %s", il, err.msg);
    return rc;
}

int hip_attn_provider_init(mdl_attn *out, const mdl_model *m, const hip_config *c, cm_err *err)
{
    const int n_layer = (int)m->hp.n_layer;
    int rc = hip_config_validate(c, n_layer, err);
    if (rc) return rc;
    if (m->hp.head_dim > 512 || m->hp.n_head % m->hp.n_head_kv)
        return cm_err_set(err, -CM_EUNSUPPORTED, "hip attention: head layout not supported");
    hip_provider *p = calloc(1, sizeof(*p));
    if (!p) return cm_err_set(err, -ENOMEM, "hip attention: out of memory");
    p->cfg = *c;
    p->n_layer = n_layer;
    p->ctx_len = c->model_context_length > 0 ? c->model_context_length : m->hp.n_ctx_train;
    p->dec = calloc((size_t)n_layer, sizeof(hip_mask));
    p->pre = calloc((size_t)n_layer, sizeof(hip_mask));
    p->dec_valid = calloc((size_t)n_layer, sizeof(bool));
    p->stats = calloc((size_t)n_layer, sizeof(hip_attn_stats));
    p->wide = calloc((size_t)n_layer, sizeof(hip_layer_config));
    p->work = hip_work_init();
    if (!p->dec || !p->pre || !p->dec_valid || !p->stats || !p->wide || !p->work) {
        prov_free(p);
        return cm_err_set(err, -ENOMEM, "hip attention: out of memory");
    }
    for (int il = 0; il < n_layer; il++) {
        p->stats[il].last_first_stage = -1;
        p->stats[il].n_stages = hip_config_layer(c, il, n_layer, false)->n_stages;
    }
    memset(out, 0, sizeof(*out));
    out->name = "hip";
    out->attend = prov_attend;
    out->reset = prov_reset;
    out->free = prov_free;
    out->self = p;
    return 0;
}

int hip_attn_provider_stats(const mdl_attn *a, int il, hip_attn_stats *out)
{
    if (!a || a->attend != prov_attend) return -EINVAL;
    const hip_provider *p = a->self;
    if (il < 0 || il >= p->n_layer) return -EINVAL;
    *out = p->stats[il];
    return 0;
}
