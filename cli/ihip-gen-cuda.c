/*
 * ihip-gen-cuda.c — `ihip generate --device cuda`: the same generation loop as the CPU path of
 * ihip-main.c, on the GPU forward of common/backend/cuda (cuda-model.h), with a real GGUF model
 * or a synthetic one (`--synthetic SHAPE`: random weights and random prompt ids, for
 * benchmarking). Builds without CUDA answer with a clear error.
 */
#define _POSIX_C_SOURCE 200809L
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef IHIP_HAVE_CUDA
#include "backend/cuda/cuda-model.h"
#include "backend/cuda/cuda.h"

static int on_progress(void *user, int64_t done, int64_t total)
{
    const uint64_t *t0 = user;
    if (total >= 4096) {
        double s = (double)(cm_time_ns() - *t0) / 1e9;
        fprintf(stderr, "\rprefill: %lld / %lld tokens (%.0f%%, %.1f tok/s)", (long long)done,
                (long long)total, 100.0 * (double)done / (double)total,
                (double)done / (s > 0 ? s : 1e-9));
        if (done == total) fputc('\n', stderr);
    }
    return 0;
}

int cli_generate_cuda(const struct opts *o, const mdl_model *cm, const tok_vocab *v,
                      const int32_t *prompt, int64_t n_prompt)
{
    if (o->kv_type != CPU_KV_F16)
        return die("--kv-type is a --device cpu option (the GPU's KV cache is bf16)");
    int n_dev = cuda_device_count();
    if (n_dev <= 0)
        return die("--device cuda: no CUDA device is visible (no GPU, no driver, or "
                   "CUDA_VISIBLE_DEVICES hides it); use --device cpu");
    int ret = 1;
    cm_err err = {0};
    cuda_model *m = NULL;
    cuda_ctx *c = NULL;
    smp_sampler *smp = NULL;
    int32_t *ids = NULL;
    uint64_t t_load = cm_time_ns();
    if (o->synthetic) {
        m = cuda_model_synthetic(o->synthetic, o->sp.seed, 0, &err);
        if (!m) return die("--synthetic: %s", err.msg);
        n_prompt = o->tokens > 0 ? o->tokens : 512;
    } else {
        m = cuda_model_load(cm, 0, &err);
        if (!m) return die("--device cuda: %s", err.msg);
    }
    const mdl_hparams *hp = cuda_model_hparams(m);
    ids = malloc(sizeof(int32_t) * (size_t)(n_prompt + o->n_predict));
    if (!ids) {
        die("out of memory");
        goto out;
    }
    if (o->synthetic) {
        uint64_t s = o->sp.seed * 2654435761u + 1;
        for (int64_t i = 0; i < n_prompt; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ids[i] = (int32_t)(s % (uint64_t)hp->n_vocab);
        }
    } else {
        memcpy(ids, prompt, sizeof(int32_t) * (size_t)n_prompt);
    }
    cuda_ctx_params cp = cuda_ctx_default_params();
    cp.n_ctx = o->n_ctx > 0 ? o->n_ctx : o->synthetic ? n_prompt + o->n_predict : hp->n_ctx_train;
    cp.n_chunk = o->chunk;
    if (n_prompt >= cp.n_ctx) {
        die("the prompt has %lld tokens, which does not fit the context of %lld tokens "
            "(raise --ctx)",
            (long long)n_prompt, (long long)cp.n_ctx);
        goto out;
    }
    hip_config *hc = NULL;
    if (o->hip) {
        hc = malloc(sizeof(*hc));
        if (!hc || cli_hip_config(o, hc, &err) < 0) {
            die("HiP attention: %s", hc ? err.msg : "out of memory");
            free(hc);
            goto out;
        }
        cp.hip = hc;
    }
    c = cuda_ctx_init(m, &cp, &err);
    free(hc);
    if (!c) {
        die("--device cuda: %s", err.msg);
        goto out;
    }
    smp = smp_init(&o->sp, hp->n_vocab);
    float *logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
    if (!smp || !logits) {
        free(logits);
        die("out of memory");
        goto out;
    }
    t_load = cm_time_ns() - t_load;
    char dname[256] = "";
    cuda_device_describe(0, dname, sizeof(dname));
    if (!o->quiet)
        fprintf(stderr,
                "ihip: %s (%lld layers, %.2f GiB bf16) on %s, %lld prompt tokens, ctx %lld, "
                "%s attention\n",
                o->synthetic ? o->synthetic : o->model, (long long)hp->n_layer,
                (double)cuda_model_bytes(m) / 1073741824.0, dname, (long long)n_prompt,
                (long long)cp.n_ctx, cuda_ctx_attn_name(c));

    uint64_t t0 = cm_time_ns();
    if (cuda_prefill(c, 0, ids, n_prompt, logits, o->quiet ? NULL : on_progress, &t0, &err) < 0) {
        die("prefill: %s", err.msg);
        free(logits);
        goto out;
    }
    uint64_t t_prefill = cm_time_ns() - t0;
    char pend[64];
    size_t npend = 0;
    int64_t n_gen = 0, n_hist = n_prompt;
    const char *finish = "length";
    uint64_t t1 = cm_time_ns();
    for (;;) {
        int32_t tok = smp_sample(smp, logits, ids, n_hist);
        ids[n_hist++] = tok;
        n_gen++;
        if (v && !o->ignore_eos && tok_is_eog(v, tok)) {
            finish = "stop";
            break;
        }
        if (v) {
            char piece[256];
            int64_t pl = tok_piece(v, tok, false, piece, sizeof(piece));
            if (pl > (int64_t)sizeof(piece)) pl = sizeof(piece);
            for (int64_t i = 0; i < pl; i++) {
                if (npend == sizeof(pend)) {
                    fwrite(pend, 1, npend, stdout);
                    npend = 0;
                }
                pend[npend++] = piece[i];
            }
            size_t ok = tok_utf8_complete(pend, npend);
            if (ok) {
                fwrite(pend, 1, ok, stdout);
                memmove(pend, pend + ok, npend - ok);
                npend -= ok;
                fflush(stdout);
            }
        } else {
            printf("%s%d", n_gen > 1 ? " " : "", tok);
            fflush(stdout);
        }
        if (n_gen >= o->n_predict) break;
        if (cuda_ctx_n_past(c, 0) + 1 > cp.n_ctx) {
            finish = "context";
            break;
        }
        if (cuda_decode(c, 0, tok, logits, &err) < 0) {
            die("decode: %s", err.msg);
            free(logits);
            goto out;
        }
    }
    free(logits);
    if (npend) fwrite(pend, 1, npend, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    uint64_t t_decode = cm_time_ns() - t1;
    if (!o->quiet) {
        double ps = (double)t_prefill / 1e9, ds = (double)t_decode / 1e9;
        fprintf(stderr,
                "ihip: load %.2f s | prefill %lld tokens in %.3f s (%.1f tok/s) | "
                "decode %lld tokens in %.3f s (%.1f tok/s) | finish: %s\n",
                (double)t_load / 1e9, (long long)n_prompt, ps,
                (double)n_prompt / (ps > 0 ? ps : 1e-9), (long long)n_gen, ds,
                (double)(n_gen > 1 ? n_gen - 1 : 0) / (ds > 0 ? ds : 1e-9), finish);
    }
    ret = 0;
out:
    smp_free(smp);
    cuda_ctx_free(c);
    cuda_model_free(m);
    free(ids);
    return ret;
}

#else

int cli_generate_cuda(const struct opts *o, const mdl_model *cm, const tok_vocab *v,
                      const int32_t *prompt, int64_t n_prompt)
{
    (void)o;
    (void)cm;
    (void)v;
    (void)prompt;
    (void)n_prompt;
    return die("--device cuda: this build has no CUDA backend (configure with -DIHIP_CUDA=ON "
               "where nvcc is installed); use --device cpu");
}

#endif
