/*
 * model-load.c — turn a validated GGUF into an mdl_model: hyper-parameters from metadata, and
 * every tensor checked for presence, shape and a supported type before any forward runs.
 */
#define _POSIX_C_SOURCE 200809L
#include "model.h"
#include "../tensor/tensor.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *supported_archs[] = {"llama", "mistral", NULL};

static int get_u(const gguf_file *f, const char *arch, const char *suffix, int64_t *out,
                 bool required, cm_err *err)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint64_t v;
    int rc = gguf_get_u64(f, key, &v, err);
    if (rc == -ENOENT) {
        if (!required) return 0;
        return cm_err_set(err, -CM_EFORMAT, "model: missing metadata key '%s'", key);
    }
    if (rc < 0) return rc;
    if (v > (uint64_t)1 << 40) return cm_err_set(err, -CM_EFORMAT, "model: %s = %llu is absurd", key, (unsigned long long)v);
    *out = (int64_t)v;
    return 0;
}

static int get_f(const gguf_file *f, const char *arch, const char *suffix, double *out,
                 bool required, cm_err *err)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    double v;
    int rc = gguf_get_f64(f, key, &v, err);
    if (rc == -ENOENT) {
        if (!required) return 0;
        return cm_err_set(err, -CM_EFORMAT, "model: missing metadata key '%s'", key);
    }
    if (rc < 0) return rc;
    *out = v;
    return 0;
}

/* Find a weight matrix [n_out][n_in] of a supported type. */
static int get_weight(const gguf_file *f, const char *name, int64_t n_in, int64_t n_out,
                      cpu_weight *w, cm_err *err)
{
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) return cm_err_set(err, -CM_EFORMAT, "model: missing tensor '%s'", name);
    if (t->n_dims > 2 || (int64_t)t->ne[0] != n_in || (int64_t)t->ne[1] != n_out)
        return cm_err_set(err, -CM_EFORMAT,
                          "model: tensor '%s' has shape [%llu, %llu], expected [%lld, %lld]", name,
                          (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                          (long long)n_in, (long long)n_out);
    if (!tn_type_supported((int)t->type)) {
        const char *tn = tn_type_name((int)t->type);
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "model: tensor '%s' has quantisation type %s (id %u), which is not supported",
                          name, tn ? tn : "unknown", t->type);
    }
    int64_t rb = tn_row_size((int)t->type, n_in);
    if (rb <= 0 || (uint64_t)rb * (uint64_t)n_out != t->nbytes)
        return cm_err_set(err, -CM_EFORMAT, "model: tensor '%s' size does not match its shape", name);
    w->data = t->data;
    w->type = (int)t->type;
    w->n_in = n_in;
    w->n_out = n_out;
    w->row_bytes = (size_t)rb;
    return 0;
}

static int get_vec(const gguf_file *f, const char *name, int64_t n, const float **out, cm_err *err)
{
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) return cm_err_set(err, -CM_EFORMAT, "model: missing tensor '%s'", name);
    if (t->type != TN_F32)
        return cm_err_set(err, -CM_EUNSUPPORTED, "model: tensor '%s' must be F32, is %s", name,
                          tn_type_name((int)t->type) ? tn_type_name((int)t->type) : "unknown");
    if ((int64_t)t->ne[0] != n || t->ne[1] != 1 || t->ne[2] != 1 || t->ne[3] != 1)
        return cm_err_set(err, -CM_EFORMAT, "model: tensor '%s' has %llu elements, expected %lld",
                          name, (unsigned long long)t->ne[0], (long long)n);
    if (((uintptr_t)t->data & 3) != 0)
        return cm_err_set(err, -CM_EFORMAT, "model: tensor '%s' data is misaligned", name);
    *out = t->data;
    return 0;
}

mdl_model *mdl_model_load(const char *path, cm_err *err)
{
    int rc = 0;
    mdl_model *m = calloc(1, sizeof(*m));
    if (!m) {
        cm_err_set(err, -ENOMEM, "model: out of memory");
        return NULL;
    }
    m->file = gguf_open(path, err);
    if (!m->file) goto fail;
    const gguf_file *f = m->file;
    mdl_hparams *hp = &m->hp;

    gguf_str arch;
    rc = gguf_get_str(f, "general.architecture", &arch, err);
    if (rc == -ENOENT) {
        cm_err_set(err, -CM_EFORMAT, "model: missing metadata key 'general.architecture'");
        goto fail;
    }
    if (rc < 0) goto fail;
    if (arch.len >= sizeof(hp->arch)) arch.len = sizeof(hp->arch) - 1;
    memcpy(hp->arch, arch.ptr, arch.len);
    hp->arch[arch.len] = '\0';
    bool ok = false;
    for (int i = 0; supported_archs[i]; i++)
        if (strcmp(hp->arch, supported_archs[i]) == 0) ok = true;
    if (!ok) {
        cm_err_set(err, -CM_EUNSUPPORTED,
                   "model: unsupported architecture '%s' (supported: llama, mistral)", hp->arch);
        goto fail;
    }
    const char *a = hp->arch;
    if (get_u(f, a, "block_count", &hp->n_layer, true, err) ||
        get_u(f, a, "context_length", &hp->n_ctx_train, true, err) ||
        get_u(f, a, "embedding_length", &hp->n_embd, true, err) ||
        get_u(f, a, "feed_forward_length", &hp->n_ff, true, err) ||
        get_u(f, a, "attention.head_count", &hp->n_head, true, err))
        goto fail;
    hp->n_head_kv = hp->n_head;
    if (get_u(f, a, "attention.head_count_kv", &hp->n_head_kv, false, err)) goto fail;
    if (hp->n_layer <= 0 || hp->n_embd <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_ff <= 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_embd % hp->n_head != 0 ||
        hp->n_layer > 4096) {
        cm_err_set(err, -CM_EFORMAT, "model: inconsistent hyper-parameters (layers %lld, embd %lld, "
                   "heads %lld/%lld, ff %lld)", (long long)hp->n_layer, (long long)hp->n_embd,
                   (long long)hp->n_head, (long long)hp->n_head_kv, (long long)hp->n_ff);
        goto fail;
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    if (get_u(f, a, "attention.key_length", &hp->head_dim, false, err)) goto fail;
    hp->n_rot = hp->head_dim;
    if (get_u(f, a, "rope.dimension_count", &hp->n_rot, false, err)) goto fail;
    if (hp->head_dim > 256 || hp->head_dim % 8 != 0 || hp->n_rot <= 0 || hp->n_rot > hp->head_dim ||
        hp->n_rot % 2 != 0 || hp->n_head / hp->n_head_kv > 16) {
        cm_err_set(err, -CM_EUNSUPPORTED, "model: head_dim %lld / n_rot %lld / GQA group %lld not supported",
                   (long long)hp->head_dim, (long long)hp->n_rot, (long long)(hp->n_head / hp->n_head_kv));
        goto fail;
    }
    hp->rope_base = 10000.0;
    if (get_f(f, a, "rope.freq_base", &hp->rope_base, false, err)) goto fail;
    double eps = 1e-5;
    if (get_f(f, a, "attention.layer_norm_rms_epsilon", &eps, true, err)) goto fail;
    hp->rms_eps = (float)eps;
    hp->rope_linear_scale = 1.0;
    hp->rope_style = CPU_ROPE_NORM; /* llama GGUFs permute q/k rows for adjacent pairs */
    {
        char key[128];
        snprintf(key, sizeof(key), "%s.rope.scaling.type", a);
        gguf_str st;
        rc = gguf_get_str(f, key, &st, err);
        if (rc == 0 && !gguf_str_eq(st, "none")) {
            if (gguf_str_eq(st, "linear")) {
                double fac = 1.0;
                if (get_f(f, a, "rope.scaling.factor", &fac, true, err)) goto fail;
                if (!(fac > 0)) {
                    cm_err_set(err, -CM_EFORMAT, "model: rope.scaling.factor %g is invalid", fac);
                    goto fail;
                }
                hp->rope_linear_scale = fac;
            } else {
                cm_err_set(err, -CM_EUNSUPPORTED, "model: rope scaling type '%.*s' is not supported",
                           (int)CM_MIN(st.len, 64), st.ptr);
                goto fail;
            }
        } else if (rc < 0 && rc != -ENOENT) {
            goto fail;
        }
    }

    const gguf_tensor *te = gguf_find_tensor(f, "token_embd.weight");
    if (!te) {
        cm_err_set(err, -CM_EFORMAT, "model: missing tensor 'token_embd.weight'");
        goto fail;
    }
    hp->n_vocab = (int64_t)te->ne[1];
    if (get_weight(f, "token_embd.weight", hp->n_embd, hp->n_vocab, &m->tok_embd, err)) goto fail;
    if (get_vec(f, "output_norm.weight", hp->n_embd, &m->output_norm, err)) goto fail;
    if (gguf_find_tensor(f, "output.weight")) {
        if (get_weight(f, "output.weight", hp->n_embd, hp->n_vocab, &m->output, err)) goto fail;
    } else {
        m->output = m->tok_embd;
        hp->tied_output = true;
    }
    if (gguf_find_tensor(f, "rope_freqs.weight"))
        if (get_vec(f, "rope_freqs.weight", hp->n_rot / 2, &m->rope_freqs, err)) goto fail;

    m->layers = calloc((size_t)hp->n_layer, sizeof(mdl_layer));
    if (!m->layers) {
        cm_err_set(err, -ENOMEM, "model: out of memory");
        goto fail;
    }
    int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    for (int64_t il = 0; il < hp->n_layer; il++) {
        mdl_layer *L = &m->layers[il];
        char nm[96];
#define NAME(s) (snprintf(nm, sizeof(nm), "blk.%lld." s, (long long)il), nm)
        if (get_vec(f, NAME("attn_norm.weight"), E, &L->attn_norm, err) ||
            get_weight(f, NAME("attn_q.weight"), E, qd, &L->wq, err) ||
            get_weight(f, NAME("attn_k.weight"), E, kvd, &L->wk, err) ||
            get_weight(f, NAME("attn_v.weight"), E, kvd, &L->wv, err) ||
            get_weight(f, NAME("attn_output.weight"), qd, E, &L->wo, err) ||
            get_vec(f, NAME("ffn_norm.weight"), E, &L->ffn_norm, err) ||
            get_weight(f, NAME("ffn_gate.weight"), E, hp->n_ff, &L->w_gate, err) ||
            get_weight(f, NAME("ffn_up.weight"), E, hp->n_ff, &L->w_up, err) ||
            get_weight(f, NAME("ffn_down.weight"), hp->n_ff, E, &L->w_down, err))
            goto fail;
#undef NAME
    }
    return m;
fail:
    cm_err_prefix(err, "%s: ", path);
    mdl_model_free(m);
    return NULL;
}

void mdl_model_free(mdl_model *m)
{
    if (!m) return;
    free(m->layers);
    gguf_close(m->file);
    free(m);
}

int64_t mdl_model_n_vocab(const mdl_model *m)
{
    return m->hp.n_vocab;
}

const gguf_file *mdl_model_gguf(const mdl_model *m)
{
    return m->file;
}
