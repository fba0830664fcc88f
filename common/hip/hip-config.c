/*
 * hip-config.c — HiP configuration: the defaults of shared/HIP.md §1 as values, the refresh
 * presets, the JSON configuration (--hip-attention-config) and its validation.
 *
 * JSON shape (HIP.md §1): top-level keys dense_layers, block_sparse_block_size_q,
 * metadata_cache_max_batch_size, mask_refresh_interval (int or list per stage), using_extend,
 * layers, prefill_layers. "layers" is either [special, normal] (2 entries) or one entry per
 * layer; missing keys of an entry take the defaults of its kind (per-layer lists: "normal"). A
 * "stages" list replaces the stages; missing keys of stage i take default stage i's values.
 * An int mask_refresh_interval n means every stage is refreshed every n decode steps.
 */
#define _POSIX_C_SOURCE 200809L
#include "hip-impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

static const hip_stage hip_default_stages[3] = {
    {.block_size_q = 64, .block_stride_q = 4, .chunk_size = 256, .stage_k = 0, .stage_stride = 1},
    {.block_size_q = 64, .block_stride_q = 4, .chunk_size = 32, .stage_k = 32768, .stage_stride = 1},
    {.block_size_q = 64, .block_stride_q = 1, .chunk_size = 8, .stage_k = 8192, .stage_stride = 1},
};

void hip_layer_config_default(hip_layer_config *lc, bool special)
{
    memset(lc, 0, sizeof(*lc));
    lc->second_stage_k = special ? 4096 : 2048;
    lc->sliding_window_size = 1024;
    lc->sink_token_size = 256;
    lc->sa_rope = HIP_SA_STREAMING;
    lc->scan_rope = special ? HIP_SCAN_CHUNK : HIP_SCAN_RELATIVE;
    lc->n_stages = 3;
    for (int i = 0; i < 3; i++) lc->stages[i] = hip_default_stages[i];
}

void hip_config_default(hip_config *c)
{
    memset(c, 0, sizeof(*c));
    c->n_dense_layers = 4;
    c->dense_layers[0] = 0;
    c->dense_layers[1] = 1;
    c->dense_layers[2] = 2;
    c->dense_layers[3] = -1;
    hip_layer_config_default(&c->special, true);
    hip_layer_config_default(&c->normal, false);
    hip_layer_config_default(&c->prefill_special, true);
    hip_layer_config_default(&c->prefill_normal, false);
    c->block_sparse_block_size_q = 64;
    c->block_sparse_block_size_k = 8;
    c->metadata_cache_max_batch_size = 32;
    c->n_refresh = 3;
    c->mask_refresh_interval[0] = 32;
    c->mask_refresh_interval[1] = 16;
    c->mask_refresh_interval[2] = 8;
    c->using_extend = true;
    c->score_bf16 = false;
    c->prefill_last_block_dense = true;
    c->model_context_length = 0;
}

int hip_config_preset(hip_config *c, const char *name, cm_err *err)
{
    static const struct {
        const char *name;
        int n[3];
    } presets[] = {{"3k", {16, 8, 4}}, {"fast", {32, 16, 8}}, {"flash", {96, 24, 8}}};
    for (size_t i = 0; i < CM_ARRAY_LEN(presets); i++) {
        if (name && strcmp(name, presets[i].name) == 0) {
            c->n_refresh = 3;
            for (int s = 0; s < 3; s++) c->mask_refresh_interval[s] = presets[i].n[s];
            return 0;
        }
    }
    return cm_err_set(err, -EINVAL, "hip config: unknown preset \"%s\" (3k, fast, flash)",
                      name ? name : "(null)");
}

/* ---- JSON → config ---------------------------------------------------------------------------- */

static const char *const hip_deprecated_keys[] = {
    "apply_v_dot", "prefill_always_dense", "decode_always_dense", "force_dense",
    "prefill_dense_threshold",
};

static bool hip_is_deprecated(const char *key)
{
    for (size_t i = 0; i < CM_ARRAY_LEN(hip_deprecated_keys); i++)
        if (strcmp(key, hip_deprecated_keys[i]) == 0) return true;
    return false;
}

static int bad(cm_err *err, const hj_node *n, const char *path, const char *what)
{
    return cm_err_set(err, -CM_EFORMAT, "hip config: %s (line %d column %d): %s", path, n->line,
                      n->col, what);
}

static int get_int(const hj_node *n, const char *path, int64_t lo, int64_t hi, int64_t *out,
                   cm_err *err)
{
    if (n->type != HJ_NUMBER || !n->is_int) {
        char msg[96];
        snprintf(msg, sizeof(msg), "expected an integer, got %s",
                 n->type == HJ_NUMBER ? "a non-integer number" : hj_type_name(n->type));
        return bad(err, n, path, msg);
    }
    if (n->i < lo || n->i > hi) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%lld is out of range [%lld, %lld]", (long long)n->i,
                 (long long)lo, (long long)hi);
        return bad(err, n, path, msg);
    }
    *out = n->i;
    return 0;
}

static int get_int32(const hj_node *n, const char *path, int64_t lo, int64_t hi, int *out,
                     cm_err *err)
{
    int64_t v;
    int rc = get_int(n, path, lo, hi, &v, err);
    if (rc == 0) *out = (int)v;
    return rc;
}

static int parse_stage(const hj_node *o, const char *path, hip_stage *st, cm_err *err)
{
    char sub[256];
    if (o->type != HJ_OBJECT) return bad(err, o, path, "a stage must be an object");
    for (const hj_node *m = o->child; m; m = m->next) {
        snprintf(sub, sizeof(sub), "%.120s.%.100s", path, m->key);
        int rc = 0;
        if (strcmp(m->key, "stage_block_size_q") == 0) {
            rc = get_int32(m, sub, 1, 1 << 16, &st->block_size_q, err);
        } else if (strcmp(m->key, "stage_block_stride_q") == 0) {
            rc = get_int32(m, sub, 1, 1 << 16, &st->block_stride_q, err);
        } else if (strcmp(m->key, "stage_chunk_size") == 0) {
            rc = get_int32(m, sub, 1, 1 << 20, &st->chunk_size, err);
        } else if (strcmp(m->key, "stage_k") == 0) {
            if (m->type == HJ_NULL) st->stage_k = 0;
            else rc = get_int(m, sub, 1, (int64_t)1 << 40, &st->stage_k, err);
        } else if (strcmp(m->key, "stage_stride") == 0) {
            rc = get_int32(m, sub, 1, 1 << 16, &st->stage_stride, err);
        } else if (strcmp(m->key, "kind") == 0) {
            /* present in configs dumped from the reference; only scan stages exist */
            if (m->type != HJ_STRING || strcmp(m->str, "ScanStage") != 0)
                rc = bad(err, m, sub, "only \"ScanStage\" is supported");
        } else {
            rc = bad(err, m, sub, "unknown key");
        }
        if (rc) return rc;
    }
    return 0;
}

static int parse_layer(const hj_node *o, const char *path, hip_layer_config *lc, cm_err *err)
{
    char sub[256];
    if (o->type != HJ_OBJECT) return bad(err, o, path, "a layer entry must be an object");
    for (const hj_node *m = o->child; m; m = m->next) {
        snprintf(sub, sizeof(sub), "%.120s.%.100s", path, m->key);
        int rc = 0;
        if (strcmp(m->key, "second_stage_k") == 0) {
            rc = get_int(m, sub, 1, (int64_t)1 << 32, &lc->second_stage_k, err);
        } else if (strcmp(m->key, "sliding_window_size") == 0) {
            rc = get_int(m, sub, 0, (int64_t)1 << 40, &lc->sliding_window_size, err);
        } else if (strcmp(m->key, "sink_token_size") == 0) {
            rc = get_int(m, sub, 0, (int64_t)1 << 32, &lc->sink_token_size, err);
        } else if (strcmp(m->key, "sa_extend_backend") == 0) {
            if (m->type != HJ_STRING) rc = bad(err, m, sub, "expected a string");
            else if (strcmp(m->str, "streaming") == 0) lc->sa_rope = HIP_SA_STREAMING;
            else rc = cm_err_set(err, -CM_EUNSUPPORTED,
                                 "hip config: %s: \"%s\" is not supported (only \"streaming\")",
                                 sub, m->str);
        } else if (strcmp(m->key, "scan_extend_backend") == 0) {
            if (m->type != HJ_STRING) rc = bad(err, m, sub, "expected a string");
            else if (strcmp(m->str, "relative") == 0) lc->scan_rope = HIP_SCAN_RELATIVE;
            else if (strcmp(m->str, "streaming") == 0) lc->scan_rope = HIP_SCAN_CHUNK;
            else rc = cm_err_set(err, -CM_EUNSUPPORTED,
                                 "hip config: %s: \"%s\" is not supported (\"relative\" or "
                                 "\"streaming\")", sub, m->str);
        } else if (strcmp(m->key, "stages") == 0) {
            if (m->type != HJ_ARRAY || m->n < 1 || m->n > HIP_MAX_STAGES) {
                char msg[96];
                snprintf(msg, sizeof(msg), "expected a list of 1 to %d stages", HIP_MAX_STAGES);
                rc = bad(err, m, sub, msg);
            } else {
                int i = 0;
                for (const hj_node *s = m->child; s && !rc; s = s->next, i++) {
                    char spath[288];
                    snprintf(spath, sizeof(spath), "%.240s[%d]", sub, i);
                    lc->stages[i] = hip_default_stages[i < 3 ? i : 2];
                    rc = parse_stage(s, spath, &lc->stages[i], err);
                }
                lc->n_stages = m->n;
            }
        } else if (hip_is_deprecated(m->key)) {
            CM_LOG_WARN("hip config: %s is deprecated and ignored", sub);
        } else {
            rc = bad(err, m, sub, "unknown key");
        }
        if (rc) return rc;
    }
    return 0;
}

/* "layers" / "prefill_layers": [special, normal] or one entry per layer. */
static int parse_layer_list(const hj_node *a, const char *path, hip_layer_config *special,
                            hip_layer_config *normal, hip_layer_config *per_layer, int *n_per,
                            cm_err *err)
{
    if (a->type != HJ_ARRAY || a->n < 1)
        return bad(err, a, path, "expected a non-empty list of layer objects");
    if (a->n > HIP_MAX_LAYERS) return bad(err, a, path, "too many layer entries");
    char sub[256];
    int i = 0;
    if (a->n == 2) {
        hip_layer_config_default(special, true);
        hip_layer_config_default(normal, false);
        for (const hj_node *e = a->child; e; e = e->next, i++) {
            snprintf(sub, sizeof(sub), "%.200s[%d]", path, i);
            int rc = parse_layer(e, sub, i == 0 ? special : normal, err);
            if (rc) return rc;
        }
        *n_per = 0;
        return 0;
    }
    for (const hj_node *e = a->child; e; e = e->next, i++) {
        snprintf(sub, sizeof(sub), "%.200s[%d]", path, i);
        hip_layer_config_default(&per_layer[i], false);
        int rc = parse_layer(e, sub, &per_layer[i], err);
        if (rc) return rc;
    }
    *n_per = a->n;
    return 0;
}

static int parse_root(const hj_node *root, hip_config *c, cm_err *err)
{
    if (root->type != HJ_OBJECT) return bad(err, root, "(top level)", "expected an object");
    for (const hj_node *m = root->child; m; m = m->next) {
        const char *k = m->key;
        int rc = 0;
        if (strcmp(k, "dense_layers") == 0) {
            if (m->type != HJ_ARRAY || m->n > HIP_MAX_DENSE_LAYERS) {
                rc = bad(err, m, k, "expected a list of layer indices");
            } else {
                int i = 0;
                for (const hj_node *e = m->child; e && !rc; e = e->next, i++)
                    rc = get_int32(e, k, -HIP_MAX_LAYERS, 1 << 20, &c->dense_layers[i], err);
                c->n_dense_layers = m->n;
            }
        } else if (strcmp(k, "block_sparse_block_size_q") == 0) {
            rc = get_int32(m, k, 1, 1 << 16, &c->block_sparse_block_size_q, err);
        } else if (strcmp(k, "metadata_cache_max_batch_size") == 0) {
            rc = get_int32(m, k, 1, 1 << 20, &c->metadata_cache_max_batch_size, err);
        } else if (strcmp(k, "mask_refresh_interval") == 0) {
            if (m->type == HJ_NUMBER) {
                int v = 0;
                rc = get_int32(m, k, 1, 1 << 30, &v, err);
                c->n_refresh = HIP_MAX_STAGES;
                for (int s = 0; s < HIP_MAX_STAGES; s++) c->mask_refresh_interval[s] = v;
            } else if (m->type == HJ_ARRAY && m->n >= 1 && m->n <= HIP_MAX_STAGES) {
                int i = 0;
                for (const hj_node *e = m->child; e && !rc; e = e->next, i++)
                    rc = get_int32(e, k, 1, 1 << 30, &c->mask_refresh_interval[i], err);
                c->n_refresh = m->n;
            } else {
                rc = bad(err, m, k, "expected an integer or a list of 1 to 4 integers");
            }
        } else if (strcmp(k, "using_extend") == 0) {
            if (m->type != HJ_BOOL) rc = bad(err, m, k, "expected true or false");
            else c->using_extend = m->b;
        } else if (strcmp(k, "layers") == 0) {
            rc = parse_layer_list(m, k, &c->special, &c->normal, c->per_layer, &c->n_per_layer,
                                  err);
        } else if (strcmp(k, "prefill_layers") == 0) {
            rc = parse_layer_list(m, k, &c->prefill_special, &c->prefill_normal,
                                  c->prefill_per_layer, &c->n_prefill_per_layer, err);
            c->has_prefill_layers = true;
        } else if (hip_is_deprecated(k)) {
            CM_LOG_WARN("hip config: %s is deprecated and ignored", k);
        } else {
            rc = bad(err, m, k, "unknown key");
        }
        if (rc) return rc;
    }
    return 0;
}

static int read_file(const char *path, char **out, size_t *len, cm_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) return cm_err_set(err, -ENOENT, "hip config: cannot open \"%s\"", path);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        return cm_err_set(err, -ENOMEM, "hip config: out of memory");
    }
    for (;;) {
        if (n == cap) {
            if (cap >= ((size_t)1 << 26)) {
                free(buf);
                fclose(f);
                return cm_err_set(err, -CM_ELIMIT, "hip config: \"%s\" is too large", path);
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                return cm_err_set(err, -ENOMEM, "hip config: out of memory");
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int ferr = ferror(f);
    fclose(f);
    if (ferr) {
        free(buf);
        return cm_err_set(err, -EIO, "hip config: error reading \"%s\"", path);
    }
    *out = buf;
    *len = n;
    return 0;
}

int hip_config_parse(hip_config *c, const char *json_or_path, cm_err *err)
{
    if (!json_or_path) return cm_err_set(err, -EINVAL, "hip config: no JSON given");
    const char *s = json_or_path;
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
    char *file = NULL;
    size_t len = 0;
    const char *text;
    if (*s == '{') {
        text = json_or_path;
        len = strlen(json_or_path);
    } else {
        int rc = read_file(json_or_path, &file, &len, err);
        if (rc) return rc;
        text = file;
    }
    hj_node *root = NULL;
    int prc = hj_parse(text, len, &root, err);
    if (prc) {
        free(file);
        if (*s != '{') cm_err_prefix(err, "hip config %s: ", json_or_path);
        else cm_err_prefix(err, "hip config: ");
        return prc;
    }
    /* parse into a copy so that *c stays unchanged on error */
    hip_config *tmp = malloc(sizeof(*tmp));
    if (!tmp) {
        hj_free(root);
        free(file);
        return cm_err_set(err, -ENOMEM, "hip config: out of memory");
    }
    *tmp = *c;
    int rc = parse_root(root, tmp, err);
    if (rc == 0) *c = *tmp;
    free(tmp);
    hj_free(root);
    free(file);
    return rc;
}

/* ---- validation and lookup -------------------------------------------------------------------- */

static int validate_layer(const hip_config *c, const hip_layer_config *lc, const char *name,
                          cm_err *err)
{
    if (lc->n_stages < 1 || lc->n_stages > HIP_MAX_STAGES)
        return cm_err_set(err, -CM_EFORMAT, "hip config: %s: %d stages (1..%d)", name,
                          lc->n_stages, HIP_MAX_STAGES);
    if (lc->sink_token_size < 0 || lc->sliding_window_size < 0)
        return cm_err_set(err, -CM_EFORMAT, "hip config: %s: negative sink or window", name);
    for (int s = 0; s < lc->n_stages; s++) {
        const hip_stage *st = &lc->stages[s];
        if (st->chunk_size < 1 || st->block_size_q < 1 || st->block_stride_q < 1 ||
            st->block_stride_q > st->block_size_q)
            return cm_err_set(err, -CM_EFORMAT, "hip config: %s: stage %d has a bad size", name, s);
        if (st->stage_stride != 1)
            return cm_err_set(err, -CM_EUNSUPPORTED,
                              "hip config: %s: stage %d: stage_stride %d (only 1 is supported)",
                              name, s, st->stage_stride);
        if (st->block_size_q != c->block_sparse_block_size_q)
            return cm_err_set(err, -CM_EUNSUPPORTED,
                              "hip config: %s: stage %d block_size_q %d differs from "
                              "block_sparse_block_size_q %d (not supported)",
                              name, s, st->block_size_q, c->block_sparse_block_size_q);
        if (s == 0 && st->stage_k != 0)
            return cm_err_set(err, -CM_EFORMAT,
                              "hip config: %s: stage 0 must have stage_k null (it takes all keys)",
                              name);
        if (s > 0) {
            const hip_stage *pv = &lc->stages[s - 1];
            if (pv->chunk_size % st->chunk_size != 0)
                return cm_err_set(err, -CM_EFORMAT,
                                  "hip config: %s: stage %d chunk %d does not divide stage %d "
                                  "chunk %d", name, s, st->chunk_size, s - 1, pv->chunk_size);
            if (st->stage_k < pv->chunk_size)
                return cm_err_set(err, -CM_EFORMAT,
                                  "hip config: %s: stage %d stage_k %lld is below one chunk of "
                                  "stage %d", name, s, (long long)st->stage_k, s - 1);
        }
    }
    if (lc->second_stage_k < lc->stages[lc->n_stages - 1].chunk_size)
        return cm_err_set(err, -CM_EFORMAT, "hip config: %s: second_stage_k %lld below one chunk",
                          name, (long long)lc->second_stage_k);
    if (lc->sliding_window_size < lc->stages[0].chunk_size)
        return cm_err_set(err, -CM_EFORMAT,
                          "hip config: %s: sliding_window_size %lld is smaller than the stage-0 "
                          "chunk %d (the pruning window n_stream - lc0 would be negative)",
                          name, (long long)lc->sliding_window_size, lc->stages[0].chunk_size);
    return 0;
}

int hip_config_validate(const hip_config *c, int n_layer, cm_err *err)
{
    int rc;
    if (c->block_sparse_block_size_q < 1 || c->block_sparse_block_size_k < 1)
        return cm_err_set(err, -CM_EFORMAT, "hip config: bad block sizes");
    if (c->n_refresh < 1 || c->n_refresh > HIP_MAX_STAGES)
        return cm_err_set(err, -CM_EFORMAT, "hip config: bad mask_refresh_interval");
    for (int s = 0; s < c->n_refresh; s++)
        if (c->mask_refresh_interval[s] < 1)
            return cm_err_set(err, -CM_EFORMAT, "hip config: mask_refresh_interval must be ≥ 1");
    if ((rc = validate_layer(c, &c->special, "layers[0] (special)", err))) return rc;
    if ((rc = validate_layer(c, &c->normal, "layers[1] (normal)", err))) return rc;
    if (c->has_prefill_layers) {
        if ((rc = validate_layer(c, &c->prefill_special, "prefill_layers[0]", err))) return rc;
        if ((rc = validate_layer(c, &c->prefill_normal, "prefill_layers[1]", err))) return rc;
    }
    char name[64];
    for (int i = 0; i < c->n_per_layer; i++) {
        snprintf(name, sizeof(name), "layers[%d]", i);
        if ((rc = validate_layer(c, &c->per_layer[i], name, err))) return rc;
    }
    for (int i = 0; i < c->n_prefill_per_layer; i++) {
        snprintf(name, sizeof(name), "prefill_layers[%d]", i);
        if ((rc = validate_layer(c, &c->prefill_per_layer[i], name, err))) return rc;
    }
    if (n_layer > 0) {
        if (c->n_per_layer > 0 && c->n_per_layer != n_layer)
            return cm_err_set(err, -CM_EFORMAT,
                              "hip config: \"layers\" has %d entries; the model has %d layers "
                              "(give 2 entries [special, normal] or one per layer)",
                              c->n_per_layer, n_layer);
        if (c->has_prefill_layers && c->n_prefill_per_layer > 0 &&
            c->n_prefill_per_layer != n_layer)
            return cm_err_set(err, -CM_EFORMAT,
                              "hip config: \"prefill_layers\" has %d entries; the model has %d "
                              "layers", c->n_prefill_per_layer, n_layer);
        for (int i = 0; i < c->n_dense_layers; i++) {
            int l = c->dense_layers[i];
            if (l >= n_layer || l < -n_layer)
                return cm_err_set(err, -CM_EFORMAT,
                                  "hip config: dense_layers entry %d is outside the model's %d "
                                  "layers", l, n_layer);
        }
    }
    return 0;
}

bool hip_config_is_special(const hip_config *c, int il, int n_layer)
{
    for (int i = 0; i < c->n_dense_layers; i++) {
        int l = c->dense_layers[i];
        if (l < 0) l += n_layer;
        if (l == il) return true;
    }
    return false;
}

const hip_layer_config *hip_config_layer(const hip_config *c, int il, int n_layer, bool prefill)
{
    if (prefill && c->has_prefill_layers) {
        if (c->n_prefill_per_layer > 0) {
            CM_ASSERT(il >= 0 && il < c->n_prefill_per_layer);
            return &c->prefill_per_layer[il];
        }
        return hip_config_is_special(c, il, n_layer) ? &c->prefill_special : &c->prefill_normal;
    }
    if (c->n_per_layer > 0) {
        CM_ASSERT(il >= 0 && il < c->n_per_layer);
        return &c->per_layer[il];
    }
    return hip_config_is_special(c, il, n_layer) ? &c->special : &c->normal;
}

void hip_layer_config_str(const hip_layer_config *lc, char *buf, size_t n)
{
    int off = snprintf(buf, n, "sink %lld window %lld k3 %lld scan %s stages", (long long)lc->sink_token_size,
                       (long long)lc->sliding_window_size, (long long)lc->second_stage_k,
                       lc->scan_rope == HIP_SCAN_CHUNK ? "streaming" : "relative");
    for (int s = 0; s < lc->n_stages && off > 0 && (size_t)off < n; s++)
        off += snprintf(buf + off, n - (size_t)off, " (lc %d k %lld bq %d/%d)",
                        lc->stages[s].chunk_size, (long long)lc->stages[s].stage_k,
                        lc->stages[s].block_size_q, lc->stages[s].block_stride_q);
}

void hip_args_from_config(hip_args *a, const hip_config *c, int il, int n_layer, bool prefill)
{
    memset(a, 0, sizeof(*a));
    a->layer = hip_config_layer(c, il, n_layer, prefill);
    a->block_size_q = c->block_sparse_block_size_q;
    a->block_size_k = c->block_sparse_block_size_k;
    a->using_extend = c->using_extend;
    a->score_bf16 = c->score_bf16;
}

int hip_refresh_stage(const hip_config *c, int n_stages, int64_t step)
{
    if (step == 0) return 0;
    int n = CM_MIN(c->n_refresh, n_stages);
    for (int s = 0; s < n; s++)
        if (step % c->mask_refresh_interval[s] == 0) return s;
    return n_stages;
}
