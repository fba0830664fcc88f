/*
 * ihip-maskq.c — `ihip mask-quality`: how much of the exact softmax attention mass of real
 * queries falls inside the key set HiP attends (sink ∪ selected blocks ∪ window), per layer.
 *
 * The text's first N-64 tokens are prefilled with dense attention; the last 64 tokens (one HiP
 * query block) are then run through a probe provider that, per layer, computes the dense output
 * (so the forward is the ordinary one), estimates HiP's prefill mask for that block, and for every
 * query and head sums the exact (true-position) softmax probabilities of the keys in HiP's set.
 * One decode step after that measures the decode-mode mask the same way.
 */
#define _POSIX_C_SOURCE 200809L
#include "cli.h"
#include "model/model.h"
#include "tensor/tensor.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QBLOCK 64

struct layer_stats {
    double sum[2], min[2]; /* [0] prefill block, [1] decode query */
    int64_t n[2];
    int64_t keys[2];       /* attended keys of the last query */
};

struct probe {
    hip_config hc;
    int n_layer;
    hip_work *w;
    struct layer_stats *ls;
    float *krot;           /* [T][d] rotated keys of one KV head */
    double *sc;            /* [T] */
    hip_key_ref *keys;
    int64_t keys_cap;
    uint8_t *mark;         /* [T] */
    int64_t cap_T;
    int failed;
    cm_err err;
};

static float kv_elem(const mdl_ctx *c, const void *base, int64_t t, int64_t off)
{
    const char *row = (const char *)base + (size_t)t * c->kv_row_bytes;
    if (c->params.kv_type == CPU_KV_F16) return tn_fp16_to_fp32(((const uint16_t *)row)[off]);
    return ((const float *)row)[off];
}

static int probe_attend(void *self, mdl_ctx *c, int il, const float *q, int64_t pos0, int64_t n_tok,
                        float *out)
{
    struct probe *pr = self;
    const mdl_hparams *hp = &c->model->hp;
    int H = (int)hp->n_head, Hkv = (int)hp->n_head_kv, d = (int)hp->head_dim, G = H / Hkv;
    cpu_attn_shape shape = {.n_head = H, .n_head_kv = Hkv, .head_dim = d,
                            .scale = 1.0f / sqrtf((float)d)};
    cpu_kv_layer kv = {.k = c->k_cache[il], .v = c->v_cache[il], .kv_type = c->params.kv_type,
                       .row_bytes = c->kv_row_bytes};
    cpu_attn_dense(c->pool, &shape, &c->rope, &kv, q, pos0, n_tok, out, c->attn_scratch);

    int mode = n_tok > 1 ? 0 : 1;
    hip_args a;
    hip_args_from_config(&a, &pr->hc, il, pr->n_layer, mode == 0);
    a.shape = shape;
    a.rope = &c->rope;
    a.kv = kv;
    a.n_kv = pos0 + n_tok;
    hip_mask m;
    int nq = (int)((n_tok + QBLOCK - 1) / QBLOCK);
    if (hip_mask_init(&m, a.layer, nq) < 0) return -ENOMEM;
    int rc = hip_mask_estimate(&a, q, pos0, n_tok, 0, &m, pr->w, c->pool, &pr->err);
    if (rc < 0) {
        hip_mask_free(&m);
        pr->failed = 1;
        return rc;
    }
    int64_t T = pos0 + n_tok;
    struct layer_stats *ls = &pr->ls[il];
    float qr[512];
    for (int g = 0; g < Hkv; g++) {
        for (int64_t t = 0; t < T; t++) {
            float *k = pr->krot + (size_t)t * d;
            for (int e = 0; e < d; e++) k[e] = kv_elem(c, c->k_cache[il], t, (int64_t)g * d + e);
            cpu_rope_apply(&c->rope, k, t);
        }
        for (int64_t r = 0; r < n_tok; r++) {
            int64_t p = pos0 + r;
            int64_t nk = hip_bsa_keys(&a, &m, pos0, n_tok, p, pr->keys, pr->keys_cap);
            if (nk > pr->keys_cap) nk = pr->keys_cap;
            memset(pr->mark, 0, (size_t)T);
            for (int64_t i = 0; i < nk; i++)
                if (pr->keys[i].t >= 0 && pr->keys[i].t < T) pr->mark[pr->keys[i].t] = 1;
            ls->keys[mode] = nk;
            for (int h = 0; h < G; h++) {
                const float *qs = q + ((size_t)r * H + (size_t)g * G + h) * d;
                memcpy(qr, qs, sizeof(float) * d);
                cpu_rope_apply(&c->rope, qr, p);
                double mx = -INFINITY, sum = 0, in = 0;
                for (int64_t t = 0; t <= p; t++) {
                    double s = 0;
                    const float *k = pr->krot + (size_t)t * d;
                    for (int e = 0; e < d; e++) s += (double)qr[e] * k[e];
                    pr->sc[t] = s * shape.scale;
                    if (pr->sc[t] > mx) mx = pr->sc[t];
                }
                for (int64_t t = 0; t <= p; t++) {
                    double e = exp(pr->sc[t] - mx);
                    sum += e;
                    if (pr->mark[t]) in += e;
                }
                double frac = in / sum;
                ls->sum[mode] += frac;
                ls->n[mode]++;
                if (frac < ls->min[mode]) ls->min[mode] = frac;
            }
        }
    }
    hip_mask_free(&m);
    return 0;
}

int cmd_mask_quality(int argc, char **argv)
{
    struct opts o;
    if (cli_parse_opts(argc, argv, &o)) return 2;
    cm_err err = {0};
    int64_t N = o.tokens ? o.tokens : 8192;
    size_t len;
    char *text = cli_get_prompt(&o, &len);
    if (!text) return 1;
    int ret = 1;
    mdl_model *m = NULL;
    tok_vocab *v = NULL;
    mdl_ctx *c = NULL;
    int32_t *ids = NULL;
    struct probe pr = {0};

    m = mdl_model_load(o.model, &err);
    if (!m) {
        die("%s", err.msg);
        goto out;
    }
    v = tok_vocab_init(mdl_model_gguf(m), &err);
    if (!v) {
        die("%s", err.msg);
        goto out;
    }
    int64_t n;
    ids = cli_tokenize_all(v, text, len, tok_add_bos(v), false, &n);
    if (!ids) goto out;
    if (n < N + 1) {
        die("the text has %lld tokens; mask-quality needs --tokens + 1 = %lld", (long long)n,
            (long long)(N + 1));
        goto out;
    }
    if (cli_hip_config(&o, &pr.hc, &err) < 0 ||
        hip_config_validate(&pr.hc, (int)m->hp.n_layer, &err) < 0) {
        die("HiP configuration: %s", err.msg);
        goto out;
    }
    mdl_ctx_params cp = mdl_ctx_default_params();
    cp.n_ctx = N + 1;
    cp.n_threads = (int)o.threads;
    cp.n_chunk = o.chunk;
    c = mdl_ctx_init(m, &cp, &err);
    if (!c) {
        die("%s", err.msg);
        goto out;
    }
    pr.n_layer = (int)m->hp.n_layer;
    pr.w = hip_work_init();
    pr.ls = calloc((size_t)pr.n_layer, sizeof(*pr.ls));
    pr.cap_T = N + 1;
    pr.krot = malloc(sizeof(float) * (size_t)pr.cap_T * (size_t)m->hp.head_dim);
    pr.sc = malloc(sizeof(double) * (size_t)pr.cap_T);
    pr.mark = malloc((size_t)pr.cap_T);
    pr.keys_cap = pr.cap_T + 64;
    pr.keys = malloc(sizeof(hip_key_ref) * (size_t)pr.keys_cap);
    if (!pr.w || !pr.ls || !pr.krot || !pr.sc || !pr.mark || !pr.keys) {
        die("out of memory");
        goto out;
    }
    for (int il = 0; il < pr.n_layer; il++)
        pr.ls[il].min[0] = pr.ls[il].min[1] = 1.0;

    int64_t n_dense = N - QBLOCK;
    uint64_t t0 = cm_time_ns();
    if (mdl_prefill(c, ids, n_dense, NULL, NULL, NULL, &err) < 0) {
        die("prefill: %s", err.msg);
        goto out;
    }
    if (!o.quiet)
        fprintf(stderr, "mask-quality: %lld tokens prefilled (dense) in %.1f s\n", (long long)n_dense,
                (double)(cm_time_ns() - t0) / 1e9);
    mdl_attn probe = {.name = "mask-quality probe", .attend = probe_attend, .self = &pr};
    mdl_ctx_set_attn(c, &probe);
    if (mdl_prefill(c, ids + n_dense, QBLOCK, NULL, NULL, NULL, &err) < 0 ||
        mdl_decode(c, ids[N], NULL, &err) < 0) {
        die("probe: %s", pr.failed ? pr.err.msg : err.msg);
        goto out;
    }

    double all = 0;
    if (o.json) printf("{\"tokens\": %lld, \"layers\": [", (long long)N);
    else
        printf("layer special  prefill-block mean   min   | decode mean   min   | keys (prefill/decode)\n");
    for (int il = 0; il < pr.n_layer; il++) {
        struct layer_stats *ls = &pr.ls[il];
        double pm = ls->sum[0] / (double)(ls->n[0] ? ls->n[0] : 1);
        double dm = ls->sum[1] / (double)(ls->n[1] ? ls->n[1] : 1);
        all += pm;
        bool sp = hip_config_is_special(&pr.hc, il, pr.n_layer);
        if (o.json)
            printf("%s{\"layer\": %d, \"special\": %s, \"prefill_mean\": %.6f, \"prefill_min\": %.6f, "
                   "\"decode_mean\": %.6f, \"decode_min\": %.6f, \"keys_prefill\": %lld, \"keys_decode\": %lld}",
                   il ? ", " : "", il, sp ? "true" : "false", pm, ls->min[0], dm, ls->min[1],
                   (long long)ls->keys[0], (long long)ls->keys[1]);
        else
            printf("%5d %7s  %18.4f %6.4f | %11.4f %6.4f | %lld / %lld\n", il, sp ? "yes" : "", pm,
                   ls->min[0], dm, ls->min[1], (long long)ls->keys[0], (long long)ls->keys[1]);
    }
    if (o.json) printf("], \"mean\": %.6f}\n", all / pr.n_layer);
    else printf("mean over layers (prefill block): %.4f\n", all / pr.n_layer);
    ret = 0;
out:
    if (c) mdl_ctx_set_attn(c, NULL);
    hip_work_free(pr.w);
    free(pr.ls);
    free(pr.krot);
    free(pr.sc);
    free(pr.mark);
    free(pr.keys);
    free(ids);
    free(text);
    mdl_ctx_free(c);
    tok_vocab_free(v);
    mdl_model_free(m);
    return ret;
}
