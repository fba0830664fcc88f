/*
 * pf-kv-compare.c — test tool for tests/integration/test_prefill_worker.py: takes its own lease
 * on a sequence a prefill worker published (as a decode worker does at hand-over), reads the K/V
 * rows of every layer back through kvstore_kvcache_load, runs the same prompt through a local
 * model context (dense attention), and compares the two caches row by row.
 *
 * usage: pf-kv-compare --model GGUF --kv-dir DIR --kv-name NAME --seq ID --gen GEN
 *                      --tokens FILE (int32 little-endian) [--ctx N] [--threads N] [--chunk N]
 *                      [--kv-type f16|f32]
 * Prints one JSON line: {"tokens":N,"layers":L,"k_rows_differ":..,"v_rows_differ":..,
 * "max_abs_diff":..}. Exit 0 when compared (whatever the result), 1 on errors.
 */
#define _POSIX_C_SOURCE 200809L

#include "base/cm.h"
#include "kvstore-kvcache.h"
#include "kvstore.h"
#include "model/model.h"
#include "tensor/tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float elem(const void *row, size_t i, int kv_type)
{
    return kv_type == CPU_KV_F32 ? ((const float *)row)[i]
                                 : tn_fp16_to_fp32(((const uint16_t *)row)[i]);
}

int main(int argc, char **argv)
{
    const char *model = NULL, *dir = NULL, *name = NULL, *tokfile = NULL;
    long id = -1, gen = -1, n_ctx = 1024, threads = 2, chunk = 64;
    int kv_type = CPU_KV_F16;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--kv-dir")) dir = v;
        else if (!strcmp(a, "--kv-name")) name = v;
        else if (!strcmp(a, "--tokens")) tokfile = v;
        else if (!strcmp(a, "--seq")) id = atol(v);
        else if (!strcmp(a, "--gen")) gen = atol(v);
        else if (!strcmp(a, "--ctx")) n_ctx = atol(v);
        else if (!strcmp(a, "--threads")) threads = atol(v);
        else if (!strcmp(a, "--chunk")) chunk = atol(v);
        else if (!strcmp(a, "--kv-type")) kv_type = !strcmp(v, "f32") ? CPU_KV_F32 : CPU_KV_F16;
        else {
            fprintf(stderr, "pf-kv-compare: unknown flag %s\n", a);
            return 1;
        }
    }
    if (!model || !dir || !name || !tokfile || id < 0 || gen < 0) {
        fprintf(stderr, "usage: pf-kv-compare --model GGUF --kv-dir DIR --kv-name NAME --seq ID "
                        "--gen GEN --tokens FILE [--ctx N] [--threads N] [--chunk N]\n");
        return 1;
    }
    int status = 1;
    cm_err err = {0};
    kvstore *kv = NULL;
    mdl_model *m = NULL;
    mdl_ctx *c = NULL;
    int32_t *toks = NULL;
    unsigned char *kr = NULL, *vr = NULL;
    bool leased = false;
    kvstore_lease lease;

    FILE *f = fopen(tokfile, "rb");
    long n = 0;
    if (!f || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f) / 4) <= 0 || fseek(f, 0, SEEK_SET)) {
        fprintf(stderr, "pf-kv-compare: cannot read %s\n", tokfile);
        goto out;
    }
    toks = malloc((size_t)n * 4);
    if (!toks || fread(toks, 4, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "pf-kv-compare: cannot read %s\n", tokfile);
        goto out;
    }

    kvstore_params p = kvstore_default_params();
    p.dir = dir;
    if (kvstore_open(name, &p, NULL, &kv, &err) < 0) goto fail;
    kvstore_seq_ref ref = {(uint32_t)id, (uint32_t)gen};
    if (kvstore_lease_acquire(kv, ref, &lease, &err) < 0) goto fail;
    leased = true;
    kvstore_seq_info info;
    if (kvstore_seq_get_info(kv, ref, &info, &err) < 0) goto fail;
    if ((long)info.n_tokens != n) {
        fprintf(stderr, "pf-kv-compare: sequence has %u tokens, the file %ld\n",
                (unsigned)info.n_tokens, n);
        goto out;
    }

    if (!(m = mdl_model_load(model, &err))) goto fail;
    mdl_ctx_params cp = mdl_ctx_default_params();
    cp.n_ctx = n_ctx;
    cp.n_threads = (int)threads;
    cp.kv_type = kv_type;
    cp.n_chunk = chunk;
    if (!(c = mdl_ctx_init(m, &cp, &err))) goto fail;
    if (mdl_prefill(c, toks, n, NULL, NULL, NULL, &err) < 0) goto fail;

    uint32_t et = kv_type == CPU_KV_F32 ? KVSTORE_DTYPE_F32 : KVSTORE_DTYPE_F16;
    size_t rb = c->kv_row_bytes, nel = (size_t)(m->hp.n_head_kv * m->hp.head_dim);
    kr = malloc((size_t)n * rb);
    vr = malloc((size_t)n * rb);
    if (!kr || !vr) goto out;
    long k_diff = 0, v_diff = 0;
    double max_abs = 0;
    for (int il = 0; il < (int)m->hp.n_layer; il++) {
        if (kvstore_kvcache_load(kv, &lease, (uint32_t)il, 0, (uint32_t)n, kr, vr, rb, et,
                                 &err) < 0)
            goto fail;
        for (long t = 0; t < n; t++) {
            const unsigned char *ks = kr + t * rb, *vs = vr + t * rb;
            const unsigned char *kc = (const unsigned char *)c->k_cache[il] + t * rb;
            const unsigned char *vc = (const unsigned char *)c->v_cache[il] + t * rb;
            if (memcmp(ks, kc, rb)) k_diff++;
            if (memcmp(vs, vc, rb)) v_diff++;
            for (size_t e = 0; e < nel; e++) {
                double dk = fabs((double)elem(ks, e, kv_type) - elem(kc, e, kv_type));
                double dv = fabs((double)elem(vs, e, kv_type) - elem(vc, e, kv_type));
                if (dk > max_abs) max_abs = dk;
                if (dv > max_abs) max_abs = dv;
            }
        }
    }
    printf("{\"tokens\":%ld,\"layers\":%d,\"k_rows_differ\":%ld,\"v_rows_differ\":%ld,"
           "\"max_abs_diff\":%g}\n",
           n, (int)m->hp.n_layer, k_diff, v_diff, max_abs);
    status = 0;
    goto out;
fail:
    fprintf(stderr, "pf-kv-compare: %s\n", err.msg);
out:
    if (f) fclose(f);
    if (leased) kvstore_lease_release(kv, &lease, NULL);
    kvstore_close(kv);
    mdl_ctx_free(c);
    mdl_model_free(m);
    free(toks);
    free(kr);
    free(vr);
    return status;
}
