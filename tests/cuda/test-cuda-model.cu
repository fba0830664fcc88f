/*
 * test-cuda-model.cu — the GPU model forward (cuda-model.h) against CPU references.
 *
 * Host part (runs without a GPU): the host bf16 rounding equals common/tensor's, the synthetic
 * weight generator has the documented distribution.
 * GPU part (exit 77 without a GPU):
 *   1. real SmolLM2 (skipped when IHIP_MODEL is absent): uploaded weights equal tn_dequant_row
 *      rounded to bf16; greedy 16 tokens of a fixed prompt on the CPU engine (mdl_*, dense) vs
 *      the GPU teacher-forced on the CPU's tokens: the GPU's argmax must be the CPU's token at
 *      every step except where the CPU's top-2 gap < 0.25 (counted as a tie: the CPU quantises
 *      activations to 8 bits, the GPU rounds them to bf16); max|Δlogit| and KL are printed per
 *      step; a free-running GPU greedy run is printed too;
 *   2. synthetic "tiny" and "smollm2-135m" models: GPU logits vs a plain C forward over exactly
 *      the same (downloaded) bf16 weights, rounding activations to bf16 at the same points,
 *      within a relative bound, through chunked prefill and decode steps;
 *   3. batched decode of 3 sequences equals each sequence decoded alone;
 *   4. HiP in the forward (real SmolLM2): equal to dense while sink + window cover the context,
 *      retrieval beyond the window with a scaled-down config, the fast refresh schedule;
 *   5. fp8 KV cache ("tiny"): GPU logits vs the plain C forward with its K/V rounded to e4m3
 *      the same way, and vs the GPU's bf16 KV; cuda_ctx_fill_synthetic + decode;
 *   and a timing of the synthetic llama3-8b at KV 4K (prefill and decode tokens/s).
 * Prints "N passed, N failed".
 */
#include "backend/cuda/cuda-model.h"
#include "backend/cuda/cuda.h"
#include "model/model.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_pass, n_fail;
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                            \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

static uint64_t rng_state = 0x1234567887654321ULL;
static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int64_t argmax(const float *a, int64_t n)
{
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (a[i] > a[b]) b = i;
    return b;
}

static float top2_gap(const float *a, int64_t n)
{
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (a[i] > b1) {
            b2 = b1;
            b1 = a[i];
        } else if (a[i] > b2) {
            b2 = a[i];
        }
    }
    return b1 - b2;
}

static double max_abs_diff(const float *a, const float *b, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

static double rms(const float *a, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)a[i] * a[i];
    return sqrt(s / (double)n);
}

/* KL(softmax(p) || softmax(q)) in nats. */
static double kl_div(const float *p, const float *q, int64_t n)
{
    double mp = -INFINITY, mq = -INFINITY, sp = 0, sq = 0, kl = 0;
    for (int64_t i = 0; i < n; i++) {
        mp = fmax(mp, p[i]);
        mq = fmax(mq, q[i]);
    }
    for (int64_t i = 0; i < n; i++) {
        sp += exp(p[i] - mp);
        sq += exp(q[i] - mq);
    }
    double lp = log(sp), lq = log(sq);
    for (int64_t i = 0; i < n; i++) {
        double a = p[i] - mp - lp, b = q[i] - mq - lq;
        kl += exp(a) * (a - b);
    }
    return kl;
}

/* ---- host checks ----------------------------------------------------------------------------- */

static float e4m3_round(float x);

static void test_host(void)
{
    int bad = 0;
    const float special[] = {0.0f,     -0.0f,         1.0f,   -1.0f,    1.00390625f, 1.01171875f,
                             65504.0f, 3.3895314e38f, 1e-40f, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
        if (cuda_model_round_bf16(special[i]) != tn_bf16_to_fp32(tn_fp32_to_bf16(special[i])))
            bad++;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)rng();
        float x;
        memcpy(&x, &u, 4);
        if (isnan(x)) continue;
        if (cuda_model_round_bf16(x) != tn_bf16_to_fp32(tn_fp32_to_bf16(x))) bad++;
    }
    CHECK(bad == 0, "host bf16 rounding differs from tn_fp32_to_bf16 in %d cases", bad);

    /* synthetic values: uniform, mean/std as documented */
    mdl_hparams hp;
    memset(&hp, 0, sizeof(hp));
    hp.n_layer = 2;
    hp.n_embd = 256;
    hp.n_head = 4;
    hp.n_head_kv = 2;
    hp.head_dim = 64;
    hp.n_ff = 512;
    hp.n_vocab = 1000;
    hp.n_rot = 64;
    double s = 0, s2 = 0, mx = 0;
    const int N = 1 << 18;
    for (int i = 0; i < N; i++) {
        double v = cuda_model_synth_value(&hp, 7, 1, CUDA_T_DOWN, i);
        s += v;
        s2 += v * v;
        mx = fmax(mx, fabs(v));
    }
    double mean = s / N, sd = sqrt(s2 / N - mean * mean), want = 1.0 / sqrt(512.0);
    CHECK(fabs(mean) < 0.01 * want && fabs(sd - want) < 0.01 * want &&
              mx <= sqrt(3.0) * want * 1.0001,
          "synthetic ffn_down: mean %g sd %g (want 0, %g), max %g", mean, sd, want, mx);
    double n1 = 0;
    for (int i = 0; i < 4096; i++) {
        float v = cuda_model_synth_value(&hp, 7, 0, CUDA_T_ATTN_NORM, i);
        if (v < 0.8f || v > 1.2f) n1++;
    }
    CHECK(n1 == 0, "norm weights outside [0.8, 1.2]: %g", n1);
    CHECK(cuda_model_synth_value(&hp, 7, 0, CUDA_T_WQ, 5) !=
                  cuda_model_synth_value(&hp, 8, 0, CUDA_T_WQ, 5) &&
              cuda_model_synth_value(&hp, 7, 0, CUDA_T_WQ, 5) !=
                  cuda_model_synth_value(&hp, 7, 1, CUDA_T_WQ, 5),
          "synthetic values depend on seed and layer");
    /* the reference's fp8 rounding (part 5) equals CUDA's conversion, host side */
    int bad8 = 0;
    for (int i = 0; i < 1000000; i++) {
        float x = ldexpf((float)(int32_t)(uint32_t)rng() / 2147483648.0f, (int)(rng() % 32) - 22);
        __half_raw h =
            __nv_cvt_fp8_to_halfraw(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3), __NV_E4M3);
        if (__half2float(__half(h)) != e4m3_round(x)) bad8++;
    }
    CHECK(bad8 == 0, "e4m3_round differs from __nv_cvt_float_to_fp8 in %d of 1M cases", bad8);
    printf("host: bf16 rounding, fp8 rounding and synthetic generator ok (ffn_down sd %.5f, want "
           "%.5f)\n",
           sd, want);
}

/* ---- plain C reference forward over downloaded weights --------------------------------------- */

struct ref {
    mdl_hparams hp;
    float *emb, *out, *onorm;
    float *w[64][CUDA_T_COUNT]; /* per layer */
    cpu_rope rope;
    int64_t n_ctx, n_past;
    float *kc, *vc; /* [n_layer][n_ctx][kvd], bf16-rounded values (fp8: e4m3 × scale) */
    bool kv_fp8;    /* store K/V as the GPU's fp8 cache does, with scales ks, vs */
    float ks, vs;
};

/* Round to fp8 e4m3 (3 mantissa bits, exponents -6..8, subnormal step 2^-9), nearest even,
 * saturating at ±448: what __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) computes, written
 * from the format's definition. */
static float e4m3_round(float x)
{
    if (isnan(x)) return x;
    float a = fabsf(x);
    if (a >= 448.0f) return copysignf(448.0f, x);
    int e;
    frexpf(a, &e); /* a in [2^(e-1), 2^e) */
    const float step = ldexpf(1.0f, CM_MAX(e - 1, -6) - 3);
    return copysignf(nearbyintf(a / step) * step, x);
}

static void round_kv(const struct ref *r, float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = r->kv_fp8 ? e4m3_round(x[i] * (1.0f / scale)) * scale : cuda_model_round_bf16(x[i]);
}

static float *download(const cuda_model *m, int layer, int kind)
{
    int64_t n = cuda_model_tensor_numel(m, layer, kind);
    float *p = (float *)malloc(sizeof(float) * (size_t)n);
    if (p && cuda_model_tensor_download(m, layer, kind, p, n) != 0) {
        free(p);
        return NULL;
    }
    return p;
}

static int ref_init(struct ref *r, const cuda_model *m, int64_t n_ctx)
{
    memset(r, 0, sizeof(*r));
    r->hp = *cuda_model_hparams(m);
    if (r->hp.n_layer > 64) return -1;
    r->emb = download(m, -1, CUDA_T_TOK_EMBD);
    r->out = download(m, -1, CUDA_T_OUTPUT);
    r->onorm = download(m, -1, CUDA_T_OUTPUT_NORM);
    if (!r->emb || !r->out || !r->onorm) return -1;
    for (int il = 0; il < r->hp.n_layer; il++)
        for (int k = CUDA_T_ATTN_NORM; k < CUDA_T_COUNT; k++)
            if (!(r->w[il][k] = download(m, il, k))) return -1;
    r->n_ctx = n_ctx;
    size_t kvd = (size_t)(r->hp.n_head_kv * r->hp.head_dim);
    r->kc = (float *)calloc((size_t)r->hp.n_layer * (size_t)n_ctx * kvd, sizeof(float));
    r->vc = (float *)calloc((size_t)r->hp.n_layer * (size_t)n_ctx * kvd, sizeof(float));
    if (!r->kc || !r->vc) return -1;
    return cpu_rope_init(&r->rope, r->hp.rope_style, (int)r->hp.head_dim, (int)r->hp.n_rot,
                         r->hp.rope_base, r->hp.rope_linear_scale, cuda_model_rope_freqs(m), n_ctx);
}

static void ref_free(struct ref *r)
{
    free(r->emb);
    free(r->out);
    free(r->onorm);
    for (int il = 0; il < 64; il++)
        for (int k = 0; k < CUDA_T_COUNT; k++)
            free(r->w[il][k]);
    free(r->kc);
    free(r->vc);
    cpu_rope_free(&r->rope);
}

static void matvec(const float *W, const float *x, int64_t n_out, int64_t n_in, float *y)
{
    for (int64_t o = 0; o < n_out; o++) {
        const float *w = W + o * n_in;
        double s = 0;
        for (int64_t i = 0; i < n_in; i++)
            s += (double)w[i] * x[i];
        y[o] = (float)s;
    }
}

static void round_vec(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = cuda_model_round_bf16(x[i]);
}

/* One token at position n_past; logits (if non-NULL) of it. */
static void ref_token(struct ref *r, int32_t tok, float *logits)
{
    const mdl_hparams *hp = &r->hp;
    const int64_t E = hp->n_embd, H = hp->n_head, Hk = hp->n_head_kv, d = hp->head_dim;
    const int64_t qd = H * d, kvd = Hk * d, F = hp->n_ff, pos = r->n_past, T = pos + 1;
    float *x = (float *)malloc(sizeof(float) * E), *xn = (float *)malloc(sizeof(float) * E);
    float *q = (float *)malloc(sizeof(float) * qd), *ao = (float *)malloc(sizeof(float) * qd);
    float *tmp = (float *)malloc(sizeof(float) * E), *g = (float *)malloc(sizeof(float) * F);
    float *u = (float *)malloc(sizeof(float) * F), *sc = (float *)malloc(sizeof(float) * T);
    float *kr = (float *)malloc(sizeof(float) * d);
    memcpy(x, r->emb + (size_t)tok * E, sizeof(float) * E);
    for (int il = 0; il < hp->n_layer; il++) {
        float **w = r->w[il];
        float *kc = r->kc + (size_t)il * r->n_ctx * kvd, *vc = r->vc + (size_t)il * r->n_ctx * kvd;
        cpu_rms_norm(x, w[CUDA_T_ATTN_NORM], xn, E, hp->rms_eps);
        round_vec(xn, E);
        matvec(w[CUDA_T_WQ], xn, qd, E, q);
        matvec(w[CUDA_T_WK], xn, kvd, E, kc + pos * kvd);
        matvec(w[CUDA_T_WV], xn, kvd, E, vc + pos * kvd);
        round_kv(r, kc + pos * kvd, kvd, r->ks);
        round_kv(r, vc + pos * kvd, kvd, r->vs);
        for (int64_t h = 0; h < H; h++) {
            int64_t hk = h / (H / Hk);
            float *qh = q + h * d;
            cpu_rope_apply(&r->rope, qh, pos);
            float m = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                memcpy(kr, kc + t * kvd + hk * d, sizeof(float) * d);
                cpu_rope_apply(&r->rope, kr, t);
                double s = 0;
                for (int64_t e = 0; e < d; e++)
                    s += (double)qh[e] * kr[e];
                sc[t] = (float)(s / sqrt((double)d));
                m = fmaxf(m, sc[t]);
            }
            double l = 0;
            for (int64_t t = 0; t < T; t++)
                l += (sc[t] = expf(sc[t] - m));
            for (int64_t e = 0; e < d; e++) {
                double a = 0;
                for (int64_t t = 0; t < T; t++)
                    a += (double)sc[t] * vc[t * kvd + hk * d + e];
                ao[h * d + e] = (float)(a / l);
            }
        }
        round_vec(ao, qd);
        matvec(w[CUDA_T_WO], ao, E, qd, tmp);
        for (int64_t i = 0; i < E; i++)
            x[i] += tmp[i];
        cpu_rms_norm(x, w[CUDA_T_FFN_NORM], xn, E, hp->rms_eps);
        round_vec(xn, E);
        matvec(w[CUDA_T_GATE], xn, F, E, g);
        matvec(w[CUDA_T_UP], xn, F, E, u);
        for (int64_t i = 0; i < F; i++)
            g[i] = cuda_model_round_bf16(g[i] / (1.0f + expf(-g[i])) * u[i]);
        matvec(w[CUDA_T_DOWN], g, E, F, tmp);
        for (int64_t i = 0; i < E; i++)
            x[i] += tmp[i];
    }
    if (logits) {
        cpu_rms_norm(x, r->onorm, xn, E, hp->rms_eps);
        round_vec(xn, E);
        matvec(r->out, xn, hp->n_vocab, E, logits);
    }
    r->n_past++;
    free(x);
    free(xn);
    free(q);
    free(ao);
    free(tmp);
    free(g);
    free(u);
    free(sc);
    free(kr);
}

/* ---- 1. real SmolLM2 ------------------------------------------------------------------------- */

static void test_real(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("skip part 1: no model at %s (set IHIP_MODEL)\n", path);
        return;
    }
    fclose(f);
    cm_err err = {};
    mdl_model *cm = mdl_model_load(path, &err);
    CHECK(cm != NULL, "load %s: %s", path, err.msg);
    if (!cm) return;
    tok_vocab *voc = tok_vocab_init(mdl_model_gguf(cm), &err);
    CHECK(voc != NULL, "tokenizer: %s", err.msg);
    uint64_t t0 = cm_time_ns();
    cuda_model *gm = cuda_model_load(cm, 0, &err);
    CHECK(gm != NULL, "cuda_model_load: %s", err.msg);
    if (!gm || !voc) goto out;
    printf("part 1: uploaded %s in %.2f s (%.1f MiB on the GPU)\n", path,
           (double)(cm_time_ns() - t0) / 1e9, (double)cuda_model_bytes(gm) / 1048576.0);
    {
        /* uploaded weights == tn_dequant_row rounded to bf16, for a few tensors */
        const cpu_weight *ws[3] = {&cm->tok_embd, &cm->layers[0].wq,
                                   &cm->layers[cm->hp.n_layer - 1].w_down};
        const int kinds[3] = {CUDA_T_TOK_EMBD, CUDA_T_WQ, CUDA_T_DOWN};
        const int layers[3] = {-1, 0, (int)cm->hp.n_layer - 1};
        for (int k = 0; k < 3; k++) {
            const cpu_weight *w = ws[k];
            int64_t n = w->n_in * w->n_out, bad = 0;
            float *got = download(gm, layers[k], kinds[k]);
            float *row = (float *)malloc(sizeof(float) * (size_t)w->n_in);
            CHECK(got && row && cuda_model_tensor_numel(gm, layers[k], kinds[k]) == n,
                  "download %d", k);
            if (got && row)
                for (int64_t r = 0; r < w->n_out; r++) {
                    tn_dequant_row(w->type, (const char *)w->data + (size_t)r * w->row_bytes, row,
                                   w->n_in);
                    for (int64_t i = 0; i < w->n_in; i++)
                        if (got[r * w->n_in + i] != cuda_model_round_bf16(row[i])) bad++;
                }
            CHECK(bad == 0, "tensor kind %d (type %s): %lld values differ from tn_dequant_row→bf16",
                  kinds[k], tn_type_name(w->type), (long long)bad);
            free(got);
            free(row);
        }
    }
    {
        const char *text = "The capital of France is Paris. The capital of Germany is";
        int32_t ids[128];
        int64_t n = tok_encode(voc, text, strlen(text), tok_add_bos(voc), false, ids, 128, &err);
        CHECK(n > 0 && n < 100, "tokenize: %lld", (long long)n);
        if (n <= 0 || n >= 100) goto out;
        const int N_GEN = 16;
        const int64_t V = cm->hp.n_vocab;
        mdl_ctx_params cp = mdl_ctx_default_params();
        cp.n_ctx = 256;
        cp.n_threads = 4;
        mdl_ctx *cc = mdl_ctx_init(cm, &cp, &err);
        cuda_ctx_params gp = cuda_ctx_default_params();
        gp.n_ctx = 256;
        cuda_ctx *gc = cuda_ctx_init(gm, &gp, &err);
        CHECK(cc && gc, "contexts: %s", err.msg);
        float *lc = (float *)malloc(sizeof(float) * V * (N_GEN + 1));
        float *lg = (float *)malloc(sizeof(float) * V);
        int32_t ctoks[32], gtoks[32];
        if (cc && gc && lc && lg) {
            /* CPU greedy */
            int rc = mdl_prefill(cc, ids, n, lc, NULL, NULL, &err);
            for (int s = 0; s < N_GEN && rc == 0; s++) {
                ctoks[s] = (int32_t)argmax(lc + s * V, V);
                rc = mdl_decode(cc, ctoks[s], lc + (s + 1) * V, &err);
            }
            CHECK(rc == 0, "cpu: %s", err.msg);
            /* GPU teacher-forced on the CPU tokens */
            rc = cuda_prefill(gc, 0, ids, n, lg, NULL, NULL, &err);
            int ties = 0, hard = 0;
            double worst = 0, worst_kl = 0;
            printf(
                "part 1: step  cpu-token gpu-argmax  cpu-top2-gap  max|dlogit|   KL(cpu||gpu)\n");
            for (int s = 0; s < N_GEN && rc == 0; s++) {
                const float *ref = lc + s * V;
                int64_t ga = argmax(lg, V);
                float gap = top2_gap(ref, V);
                double d = max_abs_diff(ref, lg, V), kl = kl_div(ref, lg, V);
                worst = fmax(worst, d);
                worst_kl = fmax(worst_kl, kl);
                const char *verdict = "";
                if (ga != ctoks[s]) {
                    if (gap < 0.25f) {
                        ties++;
                        verdict = "  (differs: tie, CPU gap < 0.25)";
                    } else {
                        hard++;
                        verdict = "  (DIFFERS)";
                    }
                }
                printf("part 1: %4d  %9d %10lld  %12.4f  %11.4f  %13.6f%s\n", s, ctoks[s],
                       (long long)ga, gap, d, kl, verdict);
                rc = cuda_decode(gc, 0, ctoks[s], lg, &err);
            }
            CHECK(rc == 0, "gpu: %s", err.msg);
            CHECK(hard == 0, "%d greedy tokens differ where the CPU's top-2 gap is ≥ 0.25", hard);
            CHECK(ties <= 2, "%d ties (at most 2 allowed)", ties);
            /* A host emulation of the GPU arithmetic (this file's reference forward over the
             * model's weights rounded to bf16) against mdl_* on a 12-token prompt + 4 steps
             * measured KL up to 0.017 and max|dlogit| up to 1.4 (mostly a common shift); 0.1 leaves
             * room for the GPU's fp32 summation order and still fails any real bug (KL ≫ 1). */
            CHECK(worst_kl < 0.1, "KL(cpu||gpu) up to %g", worst_kl);
            printf("part 1: greedy %d tokens: %d equal, %d ties, %d different; max|dlogit| %.4f, "
                   "max KL %.6f\n",
                   N_GEN, N_GEN - ties - hard, ties, hard, worst, worst_kl);
            /* GPU free-running greedy, for the record */
            cuda_ctx_reset(gc, 0);
            rc = cuda_prefill(gc, 0, ids, n, lg, NULL, NULL, &err);
            int part = -1;
            for (int s = 0; s < N_GEN && rc == 0; s++) {
                gtoks[s] = (int32_t)argmax(lg, V);
                if (part < 0 && gtoks[s] != ctoks[s]) part = s;
                rc = cuda_decode(gc, 0, gtoks[s], lg, &err);
            }
            CHECK(rc == 0, "gpu free run: %s", err.msg);
            char a[512], b[512];
            int64_t la = tok_decode(voc, ctoks, N_GEN, false, a, sizeof(a) - 1);
            int64_t lb = tok_decode(voc, gtoks, N_GEN, false, b, sizeof(b) - 1);
            a[la < 0 ? 0 : CM_MIN(la, (int64_t)sizeof(a) - 1)] = '\0';
            b[lb < 0 ? 0 : CM_MIN(lb, (int64_t)sizeof(b) - 1)] = '\0';
            printf("part 1: cpu: %s|\npart 1: gpu: %s|\npart 1: free runs %s\n", a, b,
                   part < 0 ? "identical" : "part ways (see steps above)");
            if (part >= 0) printf("part 1: free runs part at step %d\n", part);
            /* errors */
            int32_t badtok = (int32_t)V;
            CHECK(cuda_decode(gc, 0, badtok, NULL, &err) == -EINVAL, "bad token id accepted");
            CHECK(cuda_decode(gc, 5, 1, NULL, &err) == -EINVAL, "bad sequence accepted");
            int32_t big[300];
            for (int i = 0; i < 300; i++)
                big[i] = 1;
            CHECK(cuda_prefill(gc, 0, big, 300, NULL, NULL, NULL, &err) == -CM_ELIMIT,
                  "overflow accepted");
        }
        free(lc);
        free(lg);
        mdl_ctx_free(cc);
        cuda_ctx_free(gc);
    }
out:
    cuda_model_free(gm);
    tok_vocab_free(voc);
    mdl_model_free(cm);
}

/* ---- 2. synthetic vs the plain C reference --------------------------------------------------- */

static void test_synthetic(const char *shape, int64_t n_prompt, int n_dec, int64_t chunk)
{
    cm_err err = {};
    const uint64_t seed = 42;
    uint64_t t0 = cm_time_ns();
    cuda_model *m = cuda_model_synthetic(shape, seed, 0, &err);
    CHECK(m != NULL, "synthetic %s: %s", shape, err.msg);
    if (!m) return;
    const mdl_hparams *hp = cuda_model_hparams(m);
    const int64_t V = hp->n_vocab;
    struct ref r;
    int rc = ref_init(&r, m, 256);
    CHECK(rc == 0, "reference init");
    if (rc) {
        ref_free(&r);
        cuda_model_free(m);
        return;
    }
    /* the GPU generator equals the host one (after bf16 rounding of matrices) */
    int64_t bad = 0;
    for (int k = CUDA_T_ATTN_NORM; k < CUDA_T_COUNT; k++)
        for (int i = 0; i < 1000; i++) {
            int il = (int)(rng() % (uint64_t)hp->n_layer);
            int64_t n = cuda_model_tensor_numel(m, il, k), j = (int64_t)(rng() % (uint64_t)n);
            float want = cuda_model_synth_value(hp, seed, il, k, j);
            if (k != CUDA_T_ATTN_NORM && k != CUDA_T_FFN_NORM) want = cuda_model_round_bf16(want);
            if (r.w[il][k][j] != want) bad++;
        }
    for (int i = 0; i < 1000; i++) {
        int64_t j = (int64_t)(rng() % (uint64_t)(V * hp->n_embd));
        if (r.emb[j] !=
                cuda_model_round_bf16(cuda_model_synth_value(hp, seed, -1, CUDA_T_TOK_EMBD, j)) ||
            r.out[j] !=
                cuda_model_round_bf16(cuda_model_synth_value(hp, seed, -1, CUDA_T_OUTPUT, j)))
            bad++;
    }
    CHECK(bad == 0, "%s: %lld synthetic weights differ from the host generator", shape,
          (long long)bad);

    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = 256;
    p.n_chunk = chunk;
    cuda_ctx *c = cuda_ctx_init(m, &p, &err);
    CHECK(c != NULL, "ctx: %s", err.msg);
    int32_t toks[256];
    for (int i = 0; i < n_prompt + n_dec; i++)
        toks[i] = (int32_t)(rng() % (uint64_t)V);
    float *lg = (float *)malloc(sizeof(float) * V), *lr = (float *)malloc(sizeof(float) * V);
    double worst = 0;
    int mism = 0;
    if (c && lg && lr) {
        rc = cuda_prefill(c, 0, toks, n_prompt, lg, NULL, NULL, &err);
        CHECK(rc == 0, "%s prefill: %s", shape, err.msg);
        for (int64_t t = 0; t < n_prompt; t++)
            ref_token(&r, toks[t], t == n_prompt - 1 ? lr : NULL);
        for (int s = 0; rc == 0 && s <= n_dec; s++) {
            double d = max_abs_diff(lg, lr, V), rr = rms(lr, V);
            worst = fmax(worst, d / rr);
            if (argmax(lg, V) != argmax(lr, V) && top2_gap(lr, V) > 0.02f) mism++;
            printf("part 2: %s step %d (pos %lld): max|dlogit| %.5f, rms(ref) %.3f, rel %.2e, "
                   "argmax %lld/%lld\n",
                   shape, s, (long long)(n_prompt + s - 1), d, rr, d / rr, (long long)argmax(lg, V),
                   (long long)argmax(lr, V));
            if (s == n_dec) break;
            rc = cuda_decode(c, 0, toks[n_prompt + s], lg, &err);
            CHECK(rc == 0, "%s decode: %s", shape, err.msg);
            ref_token(&r, toks[n_prompt + s], lr);
        }
        /* Bound: measured 1.7e-2 .. 3.3e-2 on the H200 (2026-11-28). Both sides round every
         * activation to bf16 between operations; a last-bit difference in an fp32 sum (cuBLAS vs
         * the C loop) flips a bf16 rounding now and then, and 30 layers amplify it to a few % of
         * the logits' rms — the same effect the CPU engine shows with 8-bit activations. A bug
         * (wrong index, missing term) moves logits by O(rms), far above this. */
        CHECK(worst < 0.06, "%s: GPU logits differ from the bf16 reference by %.3g of their rms",
              shape, worst);
        CHECK(mism == 0, "%s: %d argmax mismatches", shape, mism);
    }
    printf(
        "part 2: %s: %lld-token prefill (chunks of %lld) + %d decode steps, worst max|dlogit|/rms "
        "%.2e (bound 6e-2) in %.1f s\n",
        shape, (long long)n_prompt, (long long)chunk, n_dec, worst,
        (double)(cm_time_ns() - t0) / 1e9);
    free(lg);
    free(lr);
    cuda_ctx_free(c);
    ref_free(&r);
    cuda_model_free(m);
}

/* ---- 3. batched decode ----------------------------------------------------------------------- */

static void test_batch(void)
{
    cm_err err = {};
    cuda_model *m = cuda_model_synthetic("smollm2-135m", 9, 0, &err);
    CHECK(m != NULL, "synthetic: %s", err.msg);
    if (!m) return;
    const int64_t V = cuda_model_hparams(m)->n_vocab;
    const int B = 3, STEPS = 6;
    const int64_t len[3] = {5, 17, 30};
    int32_t prompts[3][32], gen[3][STEPS];
    for (int b = 0; b < B; b++)
        for (int i = 0; i < 32; i++)
            prompts[b][i] = (int32_t)(rng() % (uint64_t)V);
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = 128;
    p.n_seq = B;
    cuda_ctx *cb = cuda_ctx_init(m, &p, &err);
    p.n_seq = 1;
    cuda_ctx *c1 = cuda_ctx_init(m, &p, &err);
    float *lb = (float *)malloc(sizeof(float) * V * B * (STEPS + 1));
    float *l1 = (float *)malloc(sizeof(float) * V);
    CHECK(cb && c1 && lb && l1, "contexts: %s", err.msg);
    if (cb && c1 && lb && l1) {
        int rc = 0;
        /* batched: prefill each, then STEPS batched steps (greedy) */
        int seqs[3] = {2, 0, 1}; /* rows in another order than the sequences */
        for (int b = 0; b < B && rc == 0; b++)
            rc = cuda_prefill(cb, b, prompts[b], len[b], lb + (size_t)b * V, NULL, NULL, &err);
        int32_t cur[3];
        for (int s = 0; s < STEPS && rc == 0; s++) {
            for (int i = 0; i < B; i++) {
                int b = seqs[i];
                const float *prev = s == 0 ? lb + (size_t)b * V : lb + ((size_t)s * B + i) * V;
                gen[b][s] = cur[i] = (int32_t)argmax(prev, V);
            }
            rc = cuda_decode_batch(cb, B, seqs, cur, lb + (size_t)(s + 1) * B * V, &err);
        }
        CHECK(rc == 0, "batched: %s", err.msg);
        int dup[2] = {1, 1};
        int32_t two[2] = {1, 2};
        CHECK(cuda_decode_batch(cb, 2, dup, two, NULL, &err) == -EINVAL,
              "duplicate sequence accepted");
        /* each alone, teacher-forced on the same tokens */
        double worst = 0;
        int mism = 0;
        for (int b = 0; b < B && rc == 0; b++) {
            int i = 0;
            while (seqs[i] != b)
                i++;
            cuda_ctx_reset(c1, -1);
            rc = cuda_prefill(c1, 0, prompts[b], len[b], l1, NULL, NULL, &err);
            for (int s = 0; s < STEPS && rc == 0; s++) {
                rc = cuda_decode(c1, 0, gen[b][s], l1, &err);
                const float *bl = lb + ((size_t)(s + 1) * B + i) * V;
                double d = max_abs_diff(l1, bl, V) / rms(l1, V);
                worst = fmax(worst, d);
                if (argmax(l1, V) != argmax(bl, V) && top2_gap(l1, V) > 0.02f) mism++;
            }
        }
        CHECK(rc == 0, "alone: %s", err.msg);
        CHECK(worst < 5e-3, "batched vs alone: max|dlogit|/rms %.3g", worst);
        CHECK(mism == 0, "batched vs alone: %d argmax mismatches", mism);
        printf(
            "part 3: batch of %d sequences (prompts 5, 17, 30), %d steps: max|dlogit|/rms vs alone "
            "%.2e (bound 5e-3), argmax mismatches %d\n",
            B, STEPS, worst, mism);
    }
    free(lb);
    free(l1);
    cuda_ctx_free(cb);
    cuda_ctx_free(c1);
    cuda_model_free(m);
}

/* ---- 4. HiP attention in the GPU forward (real SmolLM2) -------------------------------------- */

/* A scaled-down HiP (the one of tests/unit/test-hip-attn.c: sink 32, window 128, chunks 64/16/8,
 * k 128) so that a few hundred tokens exercise the whole pipeline. */
static void small_hip_config(hip_config *c)
{
    hip_config_default(c);
    hip_layer_config *lcs[2] = {&c->special, &c->normal};
    for (int i = 0; i < 2; i++) {
        hip_layer_config *lc = lcs[i];
        lc->sink_token_size = 32;
        lc->sliding_window_size = 128;
        lc->stages[0].chunk_size = 64;
        lc->stages[1].chunk_size = 16;
        lc->stages[1].stage_k = 4096;
        lc->stages[2].chunk_size = 8;
        lc->stages[2].stage_k = 4096;
        lc->second_stage_k = 128;
    }
}

static cuda_ctx *hip_ctx(const cuda_model *m, const hip_config *hc)
{
    cm_err err = {};
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = 512;
    p.n_chunk = 128;
    p.hip = hc;
    cuda_ctx *c = cuda_ctx_init(m, &p, &err);
    CHECK(c != NULL, "ctx (%s): %s", hc ? "hip" : "dense", err.msg);
    return c;
}

static void test_hip(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("skip part 4: no model at %s\n", path);
        return;
    }
    fclose(f);
    cm_err err = {};
    mdl_model *cm = mdl_model_load(path, &err);
    cuda_model *m = cm ? cuda_model_load(cm, 0, &err) : NULL;
    CHECK(m != NULL, "load: %s", err.msg);
    hip_config *hc = (hip_config *)malloc(sizeof(hip_config));
    if (!m || !hc) goto out;
    {
        const int64_t V = cm->hp.n_vocab, src = 200, n_prompt = 320, n_dec = 40;
        int32_t seq[400];
        for (int64_t i = 0; i < src; i++)
            seq[i] = (int32_t)(rng() % (uint64_t)V);
        for (int64_t i = src; i < 400; i++)
            seq[i] = seq[i - src];
        float *ld = (float *)malloc(sizeof(float) * V), *lh = (float *)malloc(sizeof(float) * V);

        /* (a) default HiP at T < sink + window: every key is in sink ∪ window, so HiP = dense */
        hip_config_default(hc);
        cuda_ctx *cd = hip_ctx(m, NULL), *ch = hip_ctx(m, hc);
        double worst = 0;
        int rc = -1, flips = 0;
        if (cd && ch && ld && lh) {
            rc = cuda_prefill(cd, 0, seq, n_prompt, ld, NULL, NULL, &err);
            if (rc == 0) rc = cuda_prefill(ch, 0, seq, n_prompt, lh, NULL, NULL, &err);
            for (int64_t s = 0; rc == 0; s++) {
                worst = fmax(worst, max_abs_diff(ld, lh, V) / rms(ld, V));
                if (argmax(ld, V) != argmax(lh, V) && top2_gap(ld, V) >= 0.25f) flips++;
                if (s == 20) break;
                rc = cuda_decode(cd, 0, seq[n_prompt + s], ld, &err);
                if (rc == 0) rc = cuda_decode(ch, 0, seq[n_prompt + s], lh, &err);
            }
        }
        CHECK(rc == 0, "HiP (default config): %s", err.msg);
        /* Same keys, different kernels (BSA vs dense: fp32 sums in another order and, in BSA
         * decode, keys rotated by the relative angle; rel 1e-6 per call, see test-cuda-attn),
         * amplified by bf16 activations through the layers as in part 2: measured 2.9e-2 with
         * absolute angles, 6.8e-2 with relative ones (H200, 2026-11-28). A wrong key set or
         * position moves logits by O(rms). Plus: no argmax may differ where dense's top-2 gap is
         * >= 0.25. */
        CHECK(worst < 0.15, "HiP with sink+window covering the context differs from dense: %.3g",
              worst);
        CHECK(flips == 0, "HiP vs dense: %d argmax differences at a top-2 gap >= 0.25", flips);
        printf(
            "part 4: default HiP at T %lld..%lld (sink+window cover all keys; 3 prefill chunks of "
            "128 with the near-dense last block) vs dense: max|dlogit|/rms %.2e (bound 0.15), "
            "argmax flips at gap >= 0.25: %d\n",
            (long long)n_prompt, (long long)n_prompt + 20, worst, flips);
        cuda_ctx_free(ch);

        /* (b) scaled-down HiP, mask every step: retrieval from 200 tokens back (beyond the
         * 128-token window) must mostly survive the pruning, as on the CPU */
        small_hip_config(hc);
        hc->n_refresh = 3;
        hc->mask_refresh_interval[0] = hc->mask_refresh_interval[1] = hc->mask_refresh_interval[2] =
            1;
        ch = hip_ctx(m, hc);
        int ok_d = 0, ok_h = 0, agree = 0;
        rc = -1;
        if (cd && ch) {
            cuda_ctx_reset(cd, -1);
            rc = cuda_prefill(cd, 0, seq, n_prompt, ld, NULL, NULL, &err);
            if (rc == 0) rc = cuda_prefill(ch, 0, seq, n_prompt, lh, NULL, NULL, &err);
            for (int64_t s = 0; rc == 0; s++) {
                int64_t pd = argmax(ld, V), ph = argmax(lh, V), want = seq[n_prompt + s];
                ok_d += pd == want;
                ok_h += ph == want;
                agree += pd == ph;
                if (s == n_dec) break;
                rc = cuda_decode(cd, 0, seq[n_prompt + s], ld, &err);
                if (rc == 0) rc = cuda_decode(ch, 0, seq[n_prompt + s], lh, &err);
            }
        }
        int n = (int)n_dec + 1;
        CHECK(rc == 0, "HiP (small config): %s", err.msg);
        CHECK(ok_d >= n / 4, "dense does not copy (%d/%d): the check is meaningless", ok_d, n);
        CHECK(ok_h * 3 >= ok_d * 2, "HiP copies much worse than dense (%d vs %d)", ok_h, ok_d);
        printf(
            "part 4: scaled-down HiP (sink 32, k 128, window 128; mask every step), copy from 200 "
            "tokens back: next-token accuracy dense %d/%d, HiP %d/%d, same argmax %d/%d\n",
            ok_d, n, ok_h, n, agree, n);
        cuda_ctx_free(ch);

        /* (c) the same with the "fast" refresh schedule (32, 16, 8): every branch runs */
        hc->mask_refresh_interval[0] = 32;
        hc->mask_refresh_interval[1] = 16;
        hc->mask_refresh_interval[2] = 8;
        ch = hip_ctx(m, hc);
        rc = -1;
        int finite = 1;
        if (ch) {
            rc = cuda_prefill(ch, 0, seq, n_prompt, lh, NULL, NULL, &err);
            for (int64_t s = 0; s < n_dec && rc == 0; s++) {
                rc = cuda_decode(ch, 0, seq[n_prompt + s], lh, &err);
                for (int64_t i = 0; i < V; i++)
                    finite &= isfinite(lh[i]) ? 1 : 0;
            }
        }
        CHECK(rc == 0 && finite, "HiP fast schedule: %s (finite %d)", err.msg, finite);
        printf("part 4: scaled-down HiP with the fast (32,16,8) schedule: %lld decode steps ok\n",
               (long long)n_dec);
        cuda_ctx_free(ch);
        cuda_ctx_free(cd);
        free(ld);
        free(lh);
    }
out:
    free(hc);
    cuda_model_free(m);
    mdl_model_free(cm);
}

/* ---- 5. fp8 KV cache ------------------------------------------------------------------------ */

static void test_fp8(void)
{
    cm_err err = {};
    const uint64_t seed = 42;
    const int64_t n_prompt = 29, chunk = 8;
    const int n_dec = 8;
    cuda_model *m = cuda_model_synthetic("tiny", seed, 0, &err);
    CHECK(m != NULL, "synthetic tiny: %s", err.msg);
    if (!m) return;
    const int64_t V = cuda_model_hparams(m)->n_vocab;
    struct ref r;
    int rc = ref_init(&r, m, 64);
    CHECK(rc == 0, "reference init");
    r.kv_fp8 = true;
    r.ks = r.vs = CUDA_KV_FP8_SCALE;
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = 64;
    p.n_chunk = chunk;
    cuda_ctx *cb = cuda_ctx_init(m, &p, &err);
    p.kv_dtype = CUDA_KV_FP8;
    cuda_ctx *cf = cuda_ctx_init(m, &p, &err);
    CHECK(cb && cf, "contexts: %s", err.msg);
    p.kv_dtype = 7;
    CHECK(cuda_ctx_init(m, &p, &err) == NULL && err.code == -EINVAL, "KV dtype 7 accepted");
    p.kv_dtype = CUDA_KV_FP8;
    p.kv_k_scale = -1.0f;
    CHECK(cuda_ctx_init(m, &p, &err) == NULL && err.code == -EINVAL, "negative fp8 scale accepted");
    float *lb = (float *)malloc(sizeof(float) * V), *lf = (float *)malloc(sizeof(float) * V);
    float *lr = (float *)malloc(sizeof(float) * V);
    double worst_ref = 0, worst_bf = 0, worst_bf_rms = 0;
    int agree = 0, n_cmp = 0, hard = 0;
    if (rc == 0 && cb && cf && lb && lf && lr) {
        CHECK(cuda_ctx_kv_bytes(cf) * 2 == cuda_ctx_kv_bytes(cb) &&
                  cuda_ctx_kv_bytes(cb) == (size_t)4 * 2 * 64 * 256 * 2,
              "KV bytes: bf16 %zu, fp8 %zu", cuda_ctx_kv_bytes(cb), cuda_ctx_kv_bytes(cf));
        int32_t toks[64];
        for (int64_t i = 0; i < n_prompt; i++)
            toks[i] = (int32_t)(rng() % (uint64_t)V);
        rc = cuda_prefill(cb, 0, toks, n_prompt, lb, NULL, NULL, &err);
        if (rc == 0) rc = cuda_prefill(cf, 0, toks, n_prompt, lf, NULL, NULL, &err);
        for (int64_t t = 0; t < n_prompt; t++)
            ref_token(&r, toks[t], t == n_prompt - 1 ? lr : NULL);
        for (int s = 0; rc == 0; s++) {
            const double dr = max_abs_diff(lf, lr, V) / rms(lr, V);
            const double db = max_abs_diff(lf, lb, V) / rms(lb, V);
            double q = 0;
            for (int64_t i = 0; i < V; i++)
                q += ((double)lf[i] - lb[i]) * ((double)lf[i] - lb[i]);
            const double dq = sqrt(q / (double)V) / rms(lb, V);
            worst_ref = fmax(worst_ref, dr);
            worst_bf = fmax(worst_bf, db);
            worst_bf_rms = fmax(worst_bf_rms, dq);
            const bool same = argmax(lf, V) == argmax(lb, V);
            agree += same;
            hard += !same && top2_gap(lb, V) >= 0.25f;
            n_cmp++;
            printf("part 5: step %d: fp8 vs fp8 reference: max %.2e of rms; fp8 vs bf16: max %.2e, "
                   "rms %.2e of rms; argmax fp8 %lld bf16 %lld (bf16 top-2 gap %.3f)\n",
                   s, dr, db, dq, (long long)argmax(lf, V), (long long)argmax(lb, V),
                   top2_gap(lb, V));
            if (s == n_dec) break;
            const int32_t next = (int32_t)argmax(lb, V); /* greedy on bf16, both fed the same */
            rc = cuda_decode(cb, 0, next, lb, &err);
            if (rc == 0) rc = cuda_decode(cf, 0, next, lf, &err);
            ref_token(&r, next, lr);
        }
        CHECK(rc == 0, "fp8 run: %s", err.msg);
        /* GPU fp8 vs the C forward with the same e4m3 rounding of K/V (e4m3_round equals
         * __nv_cvt_float_to_fp8 on 1M random floats: test_host): the part-2 effects
         * (bf16 flips from fp32 summation order, amplified by the random weights) plus, rarely,
         * an e4m3 rounding flipped the same way; 0.08 leaves room over part 2's 3.3e-2 and stays
         * far below what storing bf16 instead of fp8 gives (≥ 0.22, below), a wrong or missing
         * scale (O(10)) or a wrong index (O(1)). */
        CHECK(worst_ref < 0.08, "fp8 KV: GPU differs from the fp8 reference by %.3g of rms",
              worst_ref);
        /* fp8 vs bf16 KV. e4m3 keeps 3 mantissa bits (rounding error ≤ 2^-4 relative, rms
         * ≈ 3.6% per element) and the random-weight model amplifies every perturbation, so the
         * gap is large: the C reference with bf16 vs e4m3 K/V on this model (30 random prompts of
         * 29 tokens + 8 greedy steps, on the host, 2026-11-28) gave max|dlogit| 0.22 .. 0.36 and
         * rms(dlogit) 0.058 .. 0.094 of the logits' rms. Bounds 0.5 and 0.15; at least 0.01 (the
         * fp8 path is really taken). The synthetic model's logits are flat (top-2 gaps often
         * < 0.1), so argmax flips where they nearly tie: 5..9 of 9 equal, every flip at a top-2
         * gap ≤ 0.12; we require equality wherever the bf16 gap is ≥ 0.25. */
        CHECK(worst_bf < 0.5 && worst_bf_rms < 0.15,
              "fp8 KV vs bf16 KV: logits differ by max %.3g, rms %.3g of rms (bounds 0.5, 0.15)",
              worst_bf, worst_bf_rms);
        CHECK(worst_bf_rms > 0.01, "fp8 KV gives the bf16 logits (%.3g): fp8 not used?",
              worst_bf_rms);
        CHECK(hard == 0, "fp8 vs bf16 KV: %d argmax differences at a top-2 gap ≥ 0.25", hard);
        printf("part 5: tiny, %lld-token prefill (chunks of %lld) + %d decode steps: fp8 KV vs "
               "fp8 reference %.2e (bound 8e-2); vs bf16 KV max %.2e (bound 0.5), rms %.2e (bound "
               "0.15), argmax equal %d/%d\n",
               (long long)n_prompt, (long long)chunk, n_dec, worst_ref, worst_bf, worst_bf_rms,
               agree, n_cmp);

        /* synthetic fill (benchmarks): n_past, a decode step with finite logits that depend on
         * the filled K/V (another seed gives other logits), bad arguments */
        cuda_ctx *cs[2] = {cb, cf};
        for (int i = 0; i < 2; i++) {
            float *l1 = i ? lf : lb;
            rc = cuda_ctx_fill_synthetic(cs[i], 0, 50, 7, &err);
            CHECK(rc == 0 && cuda_ctx_n_past(cs[i], 0) == 50, "fill (%s): %s", i ? "fp8" : "bf16",
                  err.msg);
            if (rc == 0) rc = cuda_decode(cs[i], 0, 3, l1, &err);
            int finite = 1;
            for (int64_t j = 0; j < V; j++)
                finite &= isfinite(l1[j]) ? 1 : 0;
            CHECK(rc == 0 && finite && cuda_ctx_n_past(cs[i], 0) == 51 && rms(l1, V) > 0.1,
                  "decode after fill (%s): %s (finite %d, rms %g)", i ? "fp8" : "bf16", err.msg,
                  finite, rms(l1, V));
            if (rc == 0) rc = cuda_ctx_fill_synthetic(cs[i], 0, 50, 8, &err);
            if (rc == 0) rc = cuda_decode(cs[i], 0, 3, lr, &err);
            CHECK(rc == 0 && max_abs_diff(l1, lr, V) > 1e-3 * rms(l1, V),
                  "fill (%s): seeds 7 and 8 give the same logits (%s)", i ? "fp8" : "bf16",
                  err.msg);
        }
        CHECK(cuda_ctx_fill_synthetic(cf, 0, 65, 1, &err) == -CM_ELIMIT, "fill beyond n_ctx");
        CHECK(cuda_ctx_fill_synthetic(cf, 1, 10, 1, &err) == -EINVAL, "fill of sequence 1");
        CHECK(cuda_ctx_fill_synthetic(cf, 0, 64, 1, &err) == 0 &&
                  cuda_decode(cf, 0, 1, NULL, &err) == -CM_ELIMIT,
              "decode after filling the whole context");
        printf("part 5: cuda_ctx_fill_synthetic + decode ok (bf16 and fp8)\n");
    }
    free(lb);
    free(lf);
    free(lr);
    cuda_ctx_free(cb);
    cuda_ctx_free(cf);
    ref_free(&r);
    cuda_model_free(m);
}

/* ---- timing ---------------------------------------------------------------------------------- */

static void timing(void)
{
    cm_err err = {};
    uint64_t t0 = cm_time_ns();
    cuda_model *m = cuda_model_synthetic("llama3-8b", 1, 0, &err);
    if (!m) {
        printf("timing: skipped (%s)\n", err.msg);
        return;
    }
    double t_gen = (double)(cm_time_ns() - t0) / 1e9;
    const int64_t V = cuda_model_hparams(m)->n_vocab, N = 2048, STEPS = 64;
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = 4096;
    p.n_chunk = 512;
    p.n_seq = 8;
    cuda_ctx *c = cuda_ctx_init(m, &p, &err);
    CHECK(c != NULL, "llama3-8b ctx: %s", err.msg);
    int32_t *toks = (int32_t *)malloc(sizeof(int32_t) * N);
    float *lg = (float *)malloc(sizeof(float) * V * 8);
    if (c && toks && lg) {
        for (int64_t i = 0; i < N; i++)
            toks[i] = (int32_t)(rng() % (uint64_t)V);
        int rc = cuda_prefill(c, 0, toks, 512, lg, NULL, NULL, &err); /* warm-up */
        cuda_ctx_reset(c, 0);
        uint64_t a = cm_time_ns();
        if (rc == 0) rc = cuda_prefill(c, 0, toks, N, lg, NULL, NULL, &err);
        double tp = (double)(cm_time_ns() - a) / 1e9;
        a = cm_time_ns();
        for (int s = 0; s < STEPS && rc == 0; s++)
            rc = cuda_decode(c, 0, (int32_t)argmax(lg, V), lg, &err);
        double td = (double)(cm_time_ns() - a) / 1e9;
        /* batch of 8 sequences, each with a 512-token prompt */
        for (int b = 1; b < 8 && rc == 0; b++)
            rc = cuda_prefill(c, b, toks, 512, NULL, NULL, NULL, &err);
        int seqs[8];
        int32_t cur[8];
        for (int b = 0; b < 8; b++) {
            seqs[b] = b;
            cur[b] = toks[b];
        }
        a = cm_time_ns();
        for (int s = 0; s < 16 && rc == 0; s++)
            rc = cuda_decode_batch(c, 8, seqs, cur, lg, &err);
        double tb = (double)(cm_time_ns() - a) / 1e9;
        CHECK(rc == 0, "timing run: %s", err.msg);
        printf("timing: synthetic llama3-8b (%.1f GiB bf16, generated in %.2f s), KV 4096: prefill "
               "%lld "
               "tokens (chunks of 512) %.0f tok/s | decode %lld steps at ~%lld ctx %.1f tok/s "
               "(%.2f ms/step) | batched decode B=8: %.1f tok/s (%.2f ms/step)\n",
               (double)cuda_model_bytes(m) / 1073741824.0, t_gen, (long long)N, (double)N / tp,
               (long long)STEPS, (long long)N, (double)STEPS / td, 1000.0 * td / STEPS,
               8.0 * 16 / tb, 1000.0 * tb / 16);
    }
    free(toks);
    free(lg);
    cuda_ctx_free(c);
    cuda_model_free(m);
}

int main(void)
{
    test_host();
    if (cuda_device_count() <= 0) {
        printf("skip: no CUDA device visible\n%d passed, %d failed, 1 skipped\n", n_pass, n_fail);
        return n_fail ? 1 : 77;
    }
    char desc[256];
    if (cuda_device_describe(0, desc, sizeof(desc)) == 0) printf("device: %s\n", desc);
    cm_err err = {};
    CHECK(cuda_model_synthetic("nope", 1, 0, &err) == NULL && strstr(err.msg, "nope"),
          "unknown shape: %s", err.msg);
    const char *path = getenv("IHIP_MODEL");
    if (!path) path = "models/SmolLM2-135M-Instruct-Q4_1.gguf";
    test_real(path);
    test_synthetic("tiny", 37, 5, 16);
    test_synthetic("smollm2-135m", 21, 4, 8);
    test_batch();
    test_hip(path);
    test_fp8();
    if (!getenv("IHIP_TEST_NO_TIMING")) timing();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
