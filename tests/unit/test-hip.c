/*
 * test-hip.c — HiP attention on the CPU (common/hip) against the reference implementation's
 * own test vectors (shared/testdata/hip-ref, see its README "How a C test should compare") and
 * against plain double-precision references written here:
 *   vectors      masks (planted blocks, |S|, overlap, stage-1/2 candidates), BSA on the
 *                reference's mask (≤ 0.03), end to end (≤ 0.05), BSA vs a double-precision
 *                model of the streaming layout;
 *   equivalence  budgets covering the whole context → HiP equals dense attention (prefill and
 *                decode; no RoPE, RoPE with true positions, and a window covering everything);
 *   invariants   every relative distance ≤ sink + kept + window (+ block), the three key sets
 *                disjoint, nothing from the future, masks sorted/unique/causal;
 *   caches       a decode refresh from the stage-1 / stage-2 caches reproduces the full run;
 *                a query block's mask does not depend on the other blocks of the call.
 * Vector data: $IHIP_HIP_REF, else $IHIP_SRC/../shared/testdata/hip-ref, else
 * /work/shared/testdata/hip-ref; when absent the vector part is skipped (exit 77 if all else
 * passes).
 */
#define _POSIX_C_SOURCE 200809L
#include "base/cm.h"
#include "hip/hip.h"
#include "tensor/tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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

static uint64_t rs = 0x9E3779B97F4A7C15ull;
static double urand(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (double)(rs >> 11) / 9007199254740992.0;
}
static float nrand(void)
{
    double u = urand() + 1e-12, v = urand();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

static float bf16_to_f32(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round a double once to bf16 (8 significant bits, nearest even), as the README's tables. */
static float bf16_from_double(double x)
{
    if (x == 0.0) return 0.0f;
    int e;
    double m = frexp(x, &e); /* x = m * 2^e, 0.5 ≤ |m| < 1 */
    return (float)ldexp(nearbyint(m * 256.0), e - 8);
}

static double relerr(const float *a, const float *b, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

static double relerr_d(const float *a, const double *b, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* ---- double-precision references ------------------------------------------------------------- */

/* Rotate x[d] in double to position pos; style NEOX pairs (i, i+d/2), NORM pairs (2i, 2i+1);
 * style < 0: no rotation. If tab (bf16-valued cos/sin rows [pos][d/2][2]) is given it is used,
 * else the angles pos * base^(-2i/d) are computed in double. */
static void rot_d(double *x, int d, int style, double base, int64_t pos, const float *tab)
{
    if (style < 0) return;
    static double inv[512], inv_base;
    static int inv_d;
    int half = d / 2;
    if (!tab && (inv_d != d || inv_base != base)) {
        for (int i = 0; i < half; i++) inv[i] = pow(base, -2.0 * i / (double)d);
        inv_d = d;
        inv_base = base;
    }
    for (int i = 0; i < half; i++) {
        double c, s;
        if (tab) {
            c = tab[(size_t)pos * (size_t)d + 2 * (size_t)i];
            s = tab[(size_t)pos * (size_t)d + 2 * (size_t)i + 1];
        } else {
            double th = (double)pos * inv[i];
            c = cos(th);
            s = sin(th);
        }
        int i0 = style == CPU_ROPE_NEOX ? i : 2 * i, i1 = style == CPU_ROPE_NEOX ? i + half : 2 * i + 1;
        double a = x[i0], b = x[i1];
        x[i0] = a * c - b * s;
        x[i1] = a * s + b * c;
    }
}

/* Causal dense attention in double: queries at pos0.. over keys [0, p], true positions. */
static void dense_ref(const float *q, const float *K, const float *V, int64_t pos0, int64_t n_tok,
                      int H, int Hkv, int d, double scale, int style, double base, double *out)
{
    int G = H / Hkv;
    int64_t T = pos0 + n_tok;
    double *kr = malloc(sizeof(double) * (size_t)T * Hkv * d); /* keys rotated once */
    for (int64_t t = 0; t < T; t++)
        for (int g = 0; g < Hkv; g++) {
            double *k = kr + ((size_t)t * Hkv + g) * d;
            for (int e = 0; e < d; e++) k[e] = K[((size_t)t * Hkv + g) * d + e];
            rot_d(k, d, style, base, t, NULL);
        }
    double *qd = malloc(sizeof(double) * (size_t)d), *lg = malloc(sizeof(double) * (size_t)T);
    for (int64_t i = 0; i < n_tok; i++) {
        int64_t p = pos0 + i;
        for (int h = 0; h < H; h++) {
            int g = h / G;
            for (int e = 0; e < d; e++) qd[e] = q[((size_t)i * H + h) * d + e] * scale;
            rot_d(qd, d, style, base, p, NULL);
            double mx = -INFINITY;
            for (int64_t t = 0; t <= p; t++) {
                const double *k = kr + ((size_t)t * Hkv + g) * d;
                double s = 0;
                for (int e = 0; e < d; e++) s += qd[e] * k[e];
                lg[t] = s;
                if (s > mx) mx = s;
            }
            double sum = 0;
            double *o = out + ((size_t)i * H + h) * d;
            for (int e = 0; e < d; e++) o[e] = 0;
            for (int64_t t = 0; t <= p; t++) {
                double w = exp(lg[t] - mx);
                sum += w;
                const float *v = V + ((size_t)t * Hkv + g) * d;
                for (int e = 0; e < d; e++) o[e] += w * v[e];
            }
            for (int e = 0; e < d; e++) o[e] /= sum;
        }
    }
    free(kr);
    free(qd);
    free(lg);
}

/* ---- the reference vectors ---------------------------------------------------------------------- */

static char ref_dir[1024];

static bool find_ref_dir(void)
{
    struct stat st;
    const char *env = getenv("IHIP_HIP_REF");
    const char *src = getenv("IHIP_SRC");
    char cand[3][512];
    int nc = 0;
    if (env && *env) snprintf(cand[nc++], sizeof(cand[0]), "%.480s", env);
    if (src && *src) snprintf(cand[nc++], sizeof(cand[0]), "%.450s/../shared/testdata/hip-ref", src);
    snprintf(cand[nc++], sizeof(cand[0]), "/work/shared/testdata/hip-ref");
    for (int i = 0; i < nc; i++) {
        char f[600];
        snprintf(f, sizeof(f), "%.512s/k_codes.npy", cand[i]);
        if (stat(f, &st) == 0) {
            snprintf(ref_dir, sizeof(ref_dir), "%.512s", cand[i]);
            return true;
        }
    }
    return false;
}

static int load(const char *rel, hip_npy *a, const char *descr, int64_t n_expect)
{
    char path[1200];
    cm_err err = {0};
    snprintf(path, sizeof(path), "%s/%s", ref_dir, rel);
    int rc = hip_npy_load(path, a, &err);
    CHECK(rc == 0, "load %s: %s", rel, err.msg);
    if (rc) return rc;
    CHECK(strcmp(a->descr, descr) == 0 && (n_expect < 0 || a->n == n_expect),
          "%s: dtype %s n %lld (want %s %lld)", rel, a->descr, (long long)a->n, descr,
          (long long)n_expect);
    return strcmp(a->descr, descr) == 0 && (n_expect < 0 || a->n == n_expect) ? 0 : -1;
}

#define RT 65536
#define RD 128
#define RH 4

static float *rK, *rV;      /* [RT][RD] */
static float *rtab;         /* [RT][RD/2][2] bf16-valued cos/sin */
static cpu_rope rrope;
static int32_t planted[48];

static double pct_overlap(const int64_t *a, int na, const int64_t *b, int nb)
{
    int hit = 0;
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < na; j++)
            if (a[j] == b[i]) {
                hit++;
                break;
            }
    return nb ? (double)hit / nb : 1.0;
}

static bool load_shared(void)
{
    hip_npy kc, vc, rows, cosr, sinr, pl;
    if (load("k_codes.npy", &kc, "|i1", (int64_t)RT * RD) ||
        load("v_codes.npy", &vc, "|i1", (int64_t)RT * RD) || load("rope_rows.npy", &rows, "<i4", 8192) ||
        load("rope_cos_rows.npy", &cosr, "<u2", 8192 * 64) ||
        load("rope_sin_rows.npy", &sinr, "<u2", 8192 * 64) ||
        load("planted_blocks.npy", &pl, "<i4", 48))
        return false;
    rK = malloc(sizeof(float) * RT * RD);
    rV = malloc(sizeof(float) * RT * RD);
    const int8_t *k8 = kc.data, *v8 = vc.data;
    for (int64_t i = 0; i < (int64_t)RT * RD; i++) {
        rK[i] = (float)k8[i] / 32.0f;
        rV[i] = (float)v8[i] / 16.0f;
    }
    memcpy(planted, pl.data, sizeof(planted));
    /* the reference's bf16 tables, rebuilt from the README's formula and checked bit for bit */
    CM_ASSERT(cpu_rope_init(&rrope, CPU_ROPE_NEOX, RD, RD, 10000.0, 1.0, NULL, RT) == 0);
    rtab = rrope.cs;
    for (int64_t p = 0; p < RT; p++)
        for (int i = 0; i < RD / 2; i++) {
            double a = (double)p * (1.0 / pow(10000.0, (2.0 * i) / 128.0));
            rtab[(size_t)p * RD + 2 * i] = bf16_from_double(cos(a));
            rtab[(size_t)p * RD + 2 * i + 1] = bf16_from_double(sin(a));
        }
    int64_t mism = 0;
    const int32_t *rp = rows.data;
    const uint16_t *cb = cosr.data, *sb = sinr.data;
    for (int r = 0; r < 8192; r++)
        for (int i = 0; i < 64; i++) {
            float c = rtab[(size_t)rp[r] * RD + 2 * i], s = rtab[(size_t)rp[r] * RD + 2 * i + 1];
            if (c != bf16_to_f32(cb[r * 64 + i]) || s != bf16_to_f32(sb[r * 64 + i])) mism++;
        }
    printf("rope tables: %lld of %d stored bf16 entries differ from ours\n", (long long)mism,
           8192 * 64 * 2);
    CHECK(mism == 0, "rope table rows differ in %lld entries", (long long)mism);
    hip_npy_free(&kc);
    hip_npy_free(&vc);
    hip_npy_free(&rows);
    hip_npy_free(&cosr);
    hip_npy_free(&sinr);
    hip_npy_free(&pl);
    return true;
}

/* Double-precision BSA on a given mask with the streaming layout of the README (written
 * independently of hip-bsa.c), keys rotated with the same bf16 table values. */
static void bsa_ref_d(const float *q, int64_t pos0, int64_t n_tok, const int64_t *idx, int kb,
                      const int32_t *ks, int n_sink, int n_stream, double *out)
{
    double qd[RD], kd[RD];
    for (int64_t i = 0; i < n_tok; i++) {
        int64_t p = pos0 + i, b = i / 64, p0 = pos0 + b * 64;
        int64_t M = (int64_t)ks[b] * 8;
        /* gather (token, position) */
        int64_t cap = n_sink + M + n_stream, n = 0;
        int64_t *tk = malloc(sizeof(int64_t) * (size_t)cap), *ps = malloc(sizeof(int64_t) * (size_t)cap);
        for (int t = 0; t < n_sink; t++)
            if (t <= p - n_stream) {
                tk[n] = t;
                ps[n++] = CM_MAX(0, p0 + 1 - n_stream - n_sink - M + t);
            }
        for (int64_t m = 0; m < M; m++) {
            int64_t t = idx[b * kb + m / 8] + m % 8;
            if (t >= n_sink && t <= p - n_stream) {
                tk[n] = t;
                ps[n++] = CM_MAX(0, p0 + 1 - n_stream - M + m);
            }
        }
        for (int64_t t = p - n_stream + 1; t <= p; t++)
            if (t >= 0) {
                tk[n] = t;
                ps[n++] = t;
            }
        for (int h = 0; h < RH; h++) {
            for (int e = 0; e < RD; e++) qd[e] = q[((size_t)i * RH + h) * RD + e];
            rot_d(qd, RD, CPU_ROPE_NEOX, 0, p, rtab);
            double *lg = malloc(sizeof(double) * (size_t)n), mx = -INFINITY, sum = 0;
            for (int64_t j = 0; j < n; j++) {
                for (int e = 0; e < RD; e++) kd[e] = rK[(size_t)tk[j] * RD + e];
                rot_d(kd, RD, CPU_ROPE_NEOX, 0, ps[j], rtab);
                double s = 0;
                for (int e = 0; e < RD; e++) s += qd[e] * kd[e];
                lg[j] = s;
                if (s > mx) mx = s;
            }
            double *o = out + ((size_t)i * RH + h) * RD;
            for (int e = 0; e < RD; e++) o[e] = 0;
            for (int64_t j = 0; j < n; j++) {
                double w = exp(lg[j] - mx);
                sum += w;
                for (int e = 0; e < RD; e++) o[e] += w * rV[(size_t)tk[j] * RD + e];
            }
            for (int e = 0; e < RD; e++) o[e] /= sum;
            free(lg);
        }
        free(tk);
        free(ps);
    }
}

struct vcase {
    const char *dir;
    int64_t pos0, n_tok;
    int scan;
    int64_t k3;
};

static void run_case(const struct vcase *vc, cm_pool *pool)
{
    char rel[256];
    hip_npy q, out, ind, ksn, s1, s2;
    int64_t n_tok = vc->n_tok, QB = (n_tok + 63) / 64, KB = vc->k3 / 8;
    int fails0 = n_fail;
    printf("== %s (queries %lld..%lld, %s pruning RoPE, k3 %lld)\n", vc->dir, (long long)vc->pos0,
           (long long)(vc->pos0 + n_tok - 1), vc->scan == HIP_SCAN_CHUNK ? "chunk-indexed" : "relative",
           (long long)vc->k3);
#define LD(name, arr, descr, n)                                                                    \
    snprintf(rel, sizeof(rel), "%s/%s", vc->dir, name);                                            \
    if (load(rel, arr, descr, n)) return;
    LD("q.npy", &q, "<u2", n_tok * RH * RD);
    LD("out.npy", &out, "<u2", n_tok * RH * RD);
    LD("indices.npy", &ind, "<i8", RH * QB * KB);
    LD("ks.npy", &ksn, "<i8", RH * QB);
    LD("stage1_left.npy", &s1, "<i8", QB * RH * 1024);
    LD("stage2_left.npy", &s2, "<i8", QB * RH * 1024);
#undef LD
    size_t nel = (size_t)n_tok * RH * RD;
    float *qf = malloc(sizeof(float) * nel), *of = malloc(sizeof(float) * nel);
    float *mine = malloc(sizeof(float) * nel);
    double *dref = calloc(nel, sizeof(double));
    for (size_t i = 0; i < nel; i++) {
        qf[i] = bf16_to_f32(((uint16_t *)q.data)[i]);
        of[i] = bf16_to_f32(((uint16_t *)out.data)[i]);
    }
    const int64_t *ridx = ind.data, *rks = ksn.data, *r1 = s1.data, *r2 = s2.data;
    /* the reference's heads carry identical lists (head reduction) */
    bool same = true;
    for (int h = 1; h < RH; h++)
        if (memcmp(ridx, ridx + (size_t)h * QB * KB, sizeof(int64_t) * (size_t)(QB * KB))) same = false;
    CHECK(same, "%s: reference heads differ", vc->dir);

    hip_layer_config lc;
    hip_layer_config_default(&lc, false);
    lc.second_stage_k = vc->k3;
    lc.scan_rope = vc->scan;
    hip_args a = {
        .layer = &lc, .block_size_q = 64, .block_size_k = 8, .using_extend = true,
        .shape = {.n_head = RH, .n_head_kv = 1, .head_dim = RD, .scale = 1.0f},
        .rope = &rrope,
        .kv = {.k = rK, .v = rV, .kv_type = CPU_KV_F32, .row_bytes = RD * sizeof(float)},
        .n_kv = RT,
    };
    hip_mask m;
    CM_ASSERT(hip_mask_init(&m, &lc, (int)QB) == 0);
    hip_work *w = hip_work_init();
    cm_err err = {0};
    uint64_t t0 = cm_time_ns();
    int rc = hip_mask_estimate(&a, qf, vc->pos0, n_tok, 0, &m, w, pool, &err);
    double t_mask = (cm_time_ns() - t0) / 1e6;
    CHECK(rc == 0, "mask: %s", err.msg);
    /* 1. masks */
    for (int64_t b = 0; b < QB; b++) {
        const int64_t *S = m.idx + b * m.kb, *Sref = ridx + b * KB; /* head 0 */
        int ks = m.ks[b], ksr = (int)rks[b];
        int found = 0;
        for (int i = 0; i < 48; i++)
            for (int j = 0; j < ks; j++)
                if (S[j] == planted[i]) {
                    found++;
                    break;
                }
        double ov = pct_overlap(S, ks, Sref, ksr);
        double ov1 = pct_overlap(m.cand_L[1] + b * m.cand_cap[1], m.cand_n[1][b], r1 + b * RH * 1024, 1024);
        double ov2 = pct_overlap(m.cand_L[2] + b * m.cand_cap[2], m.cand_n[2][b], r2 + b * RH * 1024, 1024);
        printf("  block %lld: planted %d/48, |S| %d (ref ks %d), overlap %.4f, stage-1 candidates "
               "%.4f (n %d), stage-2 candidates %.4f (n %d)\n",
               (long long)b, found, ks, ksr, ov, ov1, m.cand_n[1][b], ov2, m.cand_n[2][b]);
        CHECK(found == 48, "%s block %lld: %d of 48 planted blocks selected", vc->dir, (long long)b, found);
        CHECK(ks == ksr, "%s block %lld: |S| %d != ks %d", vc->dir, (long long)b, ks, ksr);
        CHECK(ov >= 0.85, "%s block %lld: overlap %.4f < 0.85", vc->dir, (long long)b, ov);
    }
    /* the same with dot products rounded to bf16 before comparisons, as the reference does
     * (informational: the reference also rounds rotated q/k, so this is not bit-exact either) */
    {
        hip_args ab = a;
        ab.score_bf16 = true;
        hip_mask mb;
        CM_ASSERT(hip_mask_init(&mb, &lc, (int)QB) == 0);
        rc = hip_mask_estimate(&ab, qf, vc->pos0, n_tok, 0, &mb, w, pool, &err);
        CHECK(rc == 0, "mask (bf16 scores): %s", err.msg);
        printf("  with bf16-rounded scores: overlap");
        for (int64_t b = 0; b < QB; b++) {
            double ov = pct_overlap(mb.idx + b * mb.kb, mb.ks[b], ridx + b * KB, (int)rks[b]);
            printf(" %.4f", ov);
            CHECK(ov >= 0.85, "%s block %lld: overlap with bf16 scores %.4f", vc->dir, (long long)b, ov);
        }
        printf("\n");
        hip_mask_free(&mb);
    }
    /* 2. BSA on the reference's mask */
    hip_mask rm;
    CM_ASSERT(hip_mask_init(&rm, &lc, (int)QB) == 0);
    for (int64_t b = 0; b < QB; b++) {
        memcpy(rm.idx + b * rm.kb, ridx + b * KB, sizeof(int64_t) * (size_t)KB);
        rm.ks[b] = (int32_t)rks[b];
    }
    t0 = cm_time_ns();
    rc = hip_bsa(&a, qf, vc->pos0, n_tok, &rm, mine, w, pool, &err);
    double t_bsa = (cm_time_ns() - t0) / 1e6;
    CHECK(rc == 0, "bsa: %s", err.msg);
    double e_bsa = relerr(mine, of, (int64_t)nel);
    int32_t rks32[16];
    for (int64_t b = 0; b < QB; b++) rks32[b] = (int32_t)rks[b];
    bsa_ref_d(qf, vc->pos0, n_tok, ridx, (int)KB, rks32, 256, 1024, dref);
    double e_dref = relerr_d(of, dref, (int64_t)nel);
    double e_kern = relerr_d(mine, dref, (int64_t)nel);
    printf("  BSA on the reference mask: relerr %.4f vs out.npy (bound 0.03); double model of the "
           "layout vs out.npy %.4f; our kernel vs that double model %.2e\n", e_bsa, e_dref, e_kern);
    CHECK(e_bsa <= 0.03, "%s: BSA on the reference mask relerr %.4f > 0.03", vc->dir, e_bsa);
    CHECK(e_kern <= 1e-4, "%s: BSA kernel vs double layout model %.2e", vc->dir, e_kern);
    /* 3. end to end */
    rc = hip_bsa(&a, qf, vc->pos0, n_tok, &m, mine, w, pool, &err);
    CHECK(rc == 0, "bsa: %s", err.msg);
    double e_e2e = relerr(mine, of, (int64_t)nel);
    printf("  end to end: relerr %.4f (bound 0.05); mask %.0f ms, BSA %.0f ms\n", e_e2e, t_mask, t_bsa);
    CHECK(e_e2e <= 0.05, "%s: end-to-end relerr %.4f > 0.05", vc->dir, e_e2e);
    printf("  %s\n", n_fail == fails0 ? "ok" : "FAILED");
    hip_mask_free(&m);
    hip_mask_free(&rm);
    hip_work_free(w);
    free(qf);
    free(of);
    free(mine);
    free(dref);
    hip_npy_free(&q);
    hip_npy_free(&out);
    hip_npy_free(&ind);
    hip_npy_free(&ksn);
    hip_npy_free(&s1);
    hip_npy_free(&s2);
}

/* ---- synthetic: equivalence, invariants, caches ------------------------------------------------- */

struct syn {
    int H, Hkv, d;
    int64_t T, rows;  /* live length, allocated rows (≥ T; rows beyond T are NaN) */
    float *K, *V;     /* [rows][Hkv][d] f32 (equal to the f16 copies when f16) */
    uint16_t *Kh, *Vh;
    float *q;         /* [T][H][d]: row i is a query at position i */
};

static void syn_make(struct syn *s, int H, int Hkv, int d, int64_t T, int64_t rows)
{
    s->H = H;
    s->Hkv = Hkv;
    s->d = d;
    s->T = T;
    s->rows = rows;
    size_t nk = (size_t)rows * Hkv * d, nq = (size_t)T * H * d;
    s->K = malloc(sizeof(float) * nk);
    s->V = malloc(sizeof(float) * nk);
    s->Kh = malloc(sizeof(uint16_t) * nk);
    s->Vh = malloc(sizeof(uint16_t) * nk);
    s->q = malloc(sizeof(float) * nq);
    /* not uniform attention: some strong keys and a shared direction with the queries */
    for (size_t i = 0; i < nk; i++) {
        s->K[i] = 0.7f * nrand();
        s->V[i] = nrand();
    }
    for (int64_t t = 0; t < rows; t += 97)
        for (int e = 0; e < 4; e++) s->K[(size_t)t * Hkv * d + e] += 3.0f;
    for (size_t i = 0; i < nq; i++) s->q[i] = 0.7f * nrand() + ((i % (size_t)d) < 4 ? 2.0f : 0.0f);
    for (size_t i = 0; i < nk; i++) {
        if (i >= (size_t)T * Hkv * d) { /* rows past the live length: poison */
            s->K[i] = s->V[i] = NAN;
        }
        s->Kh[i] = tn_fp32_to_fp16(s->K[i]);
        s->Vh[i] = tn_fp32_to_fp16(s->V[i]);
    }
}

/* make the f32 copies hold exactly the f16 values (so references see the stored data) */
static void syn_round_f16(struct syn *s)
{
    for (size_t i = 0; i < (size_t)s->rows * s->Hkv * s->d; i++) {
        s->K[i] = tn_fp16_to_fp32(s->Kh[i]);
        s->V[i] = tn_fp16_to_fp32(s->Vh[i]);
    }
}

static void syn_free(struct syn *s)
{
    free(s->K);
    free(s->V);
    free(s->q);
    free(s->Kh);
    free(s->Vh);
}

static void syn_args(hip_args *a, const struct syn *s, const hip_layer_config *lc, const cpu_rope *rope,
                     bool f16)
{
    memset(a, 0, sizeof(*a));
    a->layer = lc;
    a->block_size_q = lc->stages[0].block_size_q;
    a->block_size_k = 8;
    a->using_extend = true;
    a->shape.n_head = s->H;
    a->shape.n_head_kv = s->Hkv;
    a->shape.head_dim = s->d;
    a->shape.scale = 1.0f / sqrtf((float)s->d);
    a->rope = rope;
    a->kv.k = f16 ? (const void *)s->Kh : (const void *)s->K;
    a->kv.v = f16 ? (const void *)s->Vh : (const void *)s->V;
    a->kv.kv_type = f16 ? CPU_KV_F16 : CPU_KV_F32;
    a->kv.row_bytes = (size_t)s->Hkv * s->d * (f16 ? 2 : 4);
    a->n_kv = s->T;
}

/* a small config whose budgets cover everything: every chunk survives every stage */
static void full_budget(hip_layer_config *lc, int64_t T, int64_t n_sink, int64_t n_stream)
{
    hip_layer_config_default(lc, false);
    lc->sink_token_size = n_sink;
    lc->sliding_window_size = n_stream;
    lc->n_stages = 3;
    lc->stages[0] = (hip_stage){.block_size_q = 32, .block_stride_q = 4, .chunk_size = 64, .stage_k = 0, .stage_stride = 1};
    lc->stages[1] = (hip_stage){.block_size_q = 32, .block_stride_q = 2, .chunk_size = 16, .stage_k = T + 64, .stage_stride = 1};
    lc->stages[2] = (hip_stage){.block_size_q = 32, .block_stride_q = 1, .chunk_size = 8, .stage_k = T + 64, .stage_stride = 1};
    lc->second_stage_k = T + 64;
}

static int run_hip(const hip_args *a, const float *q, int64_t pos0, int64_t n_tok, float *out,
                   hip_mask *keep, cm_pool *pool)
{
    hip_mask m;
    CM_ASSERT(hip_mask_init(&m, a->layer, (int)((n_tok + a->block_size_q - 1) / a->block_size_q)) == 0);
    hip_work *w = hip_work_init();
    cm_err err = {0};
    int rc = hip_attention(a, q, pos0, n_tok, &m, out, w, pool, &err);
    CHECK(rc == 0, "hip_attention: %s", err.msg);
    hip_work_free(w);
    if (keep) *keep = m;
    else hip_mask_free(&m);
    return rc;
}

static bool all_finite(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return false;
    return true;
}

/* Budgets covering the whole context: HiP must equal dense attention. */
static void test_equivalence(cm_pool *pool)
{
    const int H = 4, Hkv = 2, d = 64;
    const double base = 10000.0;
    enum { NO_ROPE, TRUE_POS, WIDE_WINDOW };
    static const char *mode_name[] = {"no RoPE", "RoPE at true positions (using_extend off)",
                                      "RoPE, window covering everything"};
    double worst = 0;
    for (int f16 = 0; f16 <= 1; f16++) {
        for (int mode = NO_ROPE; mode <= WIDE_WINDOW; mode++) {
            const int64_t T = mode == WIDE_WINDOW ? 700 : 1500;
            struct syn s;
            syn_make(&s, H, Hkv, d, T, T + 64);
            if (f16) syn_round_f16(&s);
            int style = mode == TRUE_POS ? CPU_ROPE_NORM : CPU_ROPE_NEOX;
            cpu_rope rope;
            CM_ASSERT(cpu_rope_init(&rope, style, d, d, base, 1.0, NULL, T) == 0);
            hip_layer_config lc;
            full_budget(&lc, T, 64, mode == WIDE_WINDOW ? 4096 : 256);
            hip_args a;
            syn_args(&a, &s, &lc, mode == NO_ROPE ? NULL : &rope, f16);
            a.using_extend = mode != TRUE_POS;
            const int64_t calls[3][2] = {{T - 200, 200}, {T - 1, 1}, {0, 300}}; /* pos0, n_tok */
            for (int c = 0; c < 3; c++) {
                int64_t pos0 = calls[c][0], n = calls[c][1];
                size_t nel = (size_t)n * H * d;
                float *out = malloc(sizeof(float) * nel);
                double *ref = malloc(sizeof(double) * nel);
                hip_args ac = a;
                ac.n_kv = pos0 + n;
                run_hip(&ac, s.q + (size_t)pos0 * H * d, pos0, n, out, NULL, pool);
                dense_ref(s.q + (size_t)pos0 * H * d, s.K, s.V, pos0, n, H, Hkv, d, 1.0 / sqrt(d),
                          mode == NO_ROPE ? -1 : style, base, ref);
                double e = relerr_d(out, ref, (int64_t)nel);
                if (e > worst) worst = e;
                CHECK(e <= 2e-5, "equivalence (%s, %s, %s %lld queries at %lld): relerr %.2e",
                      f16 ? "f16" : "f32", mode_name[mode], n == 1 ? "decode" : "prefill",
                      (long long)n, (long long)pos0, e);
                free(out);
                free(ref);
            }
            cpu_rope_free(&rope);
            syn_free(&s);
        }
    }
    printf("equivalence with dense attention (full budgets; f32/f16 KV; no RoPE, true-position "
           "RoPE, window ≥ T; prefill, decode, first chunk): worst relerr %.2e (bound 2e-5)\n", worst);
}

static int cmp_keyref_t(const void *x, const void *y)
{
    const hip_key_ref *a = x, *b = y;
    return (a->t > b->t) - (a->t < b->t);
}

/* Real default configs on a 40K context: mask and key-set invariants, the streaming positions
 * recomputed here, BSA vs a double-precision attention over the same key set, stage caches,
 * block independence, and no reads past the live length (rows there are NaN). */
static void test_invariants(cm_pool *pool)
{
    const int H = 4, Hkv = 2, d = 64;
    const int64_t T = 40000;
    struct syn s;
    syn_make(&s, H, Hkv, d, T, T + 512);
    cpu_rope rope;
    CM_ASSERT(cpu_rope_init(&rope, CPU_ROPE_NORM, d, d, 10000.0, 1.0, NULL, T) == 0);
    int64_t n_keys_checked = 0, max_dist = 0, max_bound = 0;
    double worst_bsa = 0;
    for (int special = 0; special <= 1; special++) {
        hip_layer_config lc;
        hip_layer_config_default(&lc, special);
        hip_args a;
        syn_args(&a, &s, &lc, &rope, true);
        const int64_t n_sink = lc.sink_token_size, n_stream = lc.sliding_window_size;
        const int64_t calls[2][2] = {{T - 130, 130}, {T - 1, 1}};
        for (int c = 0; c < 2; c++) {
            int64_t pos0 = calls[c][0], n = calls[c][1], QB = (n + 63) / 64;
            size_t nel = (size_t)n * H * d;
            float *out = malloc(sizeof(float) * nel);
            hip_mask m;
            run_hip(&a, s.q + (size_t)pos0 * H * d, pos0, n, out, &m, pool);
            CHECK(all_finite(out, nel), "non-finite output (rows past T are NaN: read past T?)");
            /* mask invariants */
            for (int64_t b = 0; b < QB; b++) {
                const int64_t *row = m.idx + b * m.kb, p0 = pos0 + b * 64;
                int ks = m.ks[b];
                bool ok = ks >= 0 && ks <= m.kb;
                for (int i = 0; i < ks && ok; i++) {
                    ok = row[i] % 8 == 0 && row[i] >= n_sink && row[i] < p0 + 64 &&
                         (i == 0 || row[i] > row[i - 1]);
                }
                for (int i = ks; i < m.kb && ok; i++) ok = row[i] >= p0 + 64;
                CHECK(ok, "mask block %lld: not sorted/unique/aligned/causal (ks %d)", (long long)b, ks);
                CHECK(ks == m.kb, "mask block %lld: ks %d, expected the full %d at T=40000",
                      (long long)b, ks, m.kb);
                for (int st = 1; st < lc.n_stages; st++) {
                    const int64_t *cl = m.cand_L[st] + b * m.cand_cap[st];
                    bool asc = m.cand_n[st][b] == m.cand_cap[st];
                    for (int i = 1; i < m.cand_n[st][b] && asc; i++) asc = cl[i] > cl[i - 1];
                    CHECK(asc, "stage-%d candidates of block %lld not full/ascending", st, (long long)b);
                }
            }
            /* key sets of every query */
            hip_key_ref *keys = malloc(sizeof(hip_key_ref) * 8192);
            for (int64_t i = 0; i < n; i++) {
                int64_t p = pos0 + i, b = i / 64, p0 = pos0 + b * 64;
                int64_t M = (int64_t)m.ks[b] * 8;
                int64_t nk = hip_bsa_keys(&a, &m, pos0, n, p, keys, 8192);
                CM_ASSERT(nk <= 8192);
                n_keys_checked += nk;
                int64_t n_win = 0, bound = n_sink + M + n_stream - 1 + (p - p0);
                bool ok_set = true, ok_dist = true, ok_pos = true;
                for (int64_t j = 0; j < nk; j++) {
                    const hip_key_ref *k = &keys[j];
                    int64_t dist = p - k->vpos;
                    if (dist > max_dist) max_dist = dist;
                    if (bound > max_bound) max_bound = bound;
                    if (k->t < 0 || k->t > p) ok_set = false; /* nothing from the future */
                    if (dist < 0 || dist > bound || dist > n_sink + lc.second_stage_k + n_stream + 64)
                        ok_dist = false;
                    switch (k->set) {
                    case HIP_SET_SINK:
                        if (!(k->t < n_sink && k->t <= p - n_stream)) ok_set = false;
                        if (k->vpos != p0 + 1 - n_stream - M - n_sink + k->t) ok_pos = false;
                        if (dist < n_stream) ok_dist = false;
                        break;
                    case HIP_SET_SELECTED: {
                        if (!(k->t >= n_sink && k->t <= p - n_stream)) ok_set = false;
                        int blk = -1;
                        for (int q = 0; q < m.ks[b]; q++)
                            if (m.idx[b * m.kb + q] == k->t / 8 * 8) blk = q;
                        if (blk < 0) ok_set = false;
                        else if (k->vpos != p0 + 1 - n_stream - M + (int64_t)blk * 8 + k->t % 8)
                            ok_pos = false;
                        if (dist < n_stream) ok_dist = false;
                        break;
                    }
                    case HIP_SET_WINDOW:
                        n_win++;
                        if (!(k->t > p - n_stream && k->t <= p)) ok_set = false;
                        if (k->vpos != k->t) ok_pos = false;
                        break;
                    default: ok_set = false;
                    }
                }
                qsort(keys, (size_t)nk, sizeof(keys[0]), cmp_keyref_t);
                bool disjoint = true;
                for (int64_t j = 1; j < nk; j++)
                    if (keys[j].t == keys[j - 1].t) disjoint = false;
                CHECK(disjoint, "query %lld: a token appears in two key sets", (long long)p);
                CHECK(ok_set, "query %lld: a key outside its set's range or from the future", (long long)p);
                CHECK(ok_dist, "query %lld: a relative distance out of bounds", (long long)p);
                CHECK(ok_pos, "query %lld: a virtual position differs from §3.3's formula", (long long)p);
                CHECK(n_win == CM_MIN(n_stream, p + 1), "query %lld: window has %lld keys", (long long)p,
                      (long long)n_win);
                /* BSA output of this query vs double-precision attention over this key set */
                if (i % 16 == 0 || i == n - 1) {
                    for (int h = 0; h < H; h++) {
                        int g = h / (H / Hkv);
                        double qd[64], kd[64], o[64] = {0}, mx = -INFINITY, sum = 0;
                        double *lg = malloc(sizeof(double) * (size_t)nk);
                        for (int e = 0; e < d; e++) qd[e] = s.q[((size_t)p * H + h) * d + e] / sqrt(d);
                        rot_d(qd, d, CPU_ROPE_NORM, 10000.0, p, NULL);
                        for (int64_t j = 0; j < nk; j++) {
                            for (int e = 0; e < d; e++) kd[e] = tn_fp16_to_fp32(s.Kh[((size_t)keys[j].t * Hkv + g) * d + e]);
                            rot_d(kd, d, CPU_ROPE_NORM, 10000.0, keys[j].vpos, NULL);
                            lg[j] = 0;
                            for (int e = 0; e < d; e++) lg[j] += qd[e] * kd[e];
                            if (lg[j] > mx) mx = lg[j];
                        }
                        for (int64_t j = 0; j < nk; j++) {
                            double wgt = exp(lg[j] - mx);
                            sum += wgt;
                            for (int e = 0; e < d; e++) o[e] += wgt * tn_fp16_to_fp32(s.Vh[((size_t)keys[j].t * Hkv + g) * d + e]);
                        }
                        for (int e = 0; e < d; e++) o[e] /= sum;
                        double er = relerr_d(out + ((size_t)i * H + h) * d, o, d);
                        if (er > worst_bsa) worst_bsa = er;
                        free(lg);
                    }
                }
            }
            free(keys);
            /* stage caches: a decode refresh from stage 1 / stage 2 with the same query gives the
             * same lists; block independence for prefill */
            hip_work *w = hip_work_init();
            cm_err err = {0};
            if (n == 1) {
                hip_mask m2;
                CM_ASSERT(hip_mask_init(&m2, &lc, 1) == 0);
                for (int fs = 1; fs <= lc.n_stages; fs++) {
                    int rc = hip_mask_estimate(&a, s.q + (size_t)pos0 * H * d, pos0, 1, fs, &m, w, pool, &err);
                    CHECK(rc == 0, "refresh from stage %d: %s", fs, err.msg);
                    rc = hip_mask_estimate(&a, s.q + (size_t)pos0 * H * d, pos0, 1, 0, &m2, w, pool, &err);
                    CHECK(m.ks[0] == m2.ks[0] && memcmp(m.idx, m2.idx, sizeof(int64_t) * (size_t)m.kb) == 0,
                          "refresh from stage %d differs from a full run", fs);
                }
                hip_mask_free(&m2);
            } else {
                hip_mask m1;
                CM_ASSERT(hip_mask_init(&m1, &lc, 1) == 0);
                int rc = hip_mask_estimate(&a, s.q + (size_t)(pos0 + 64) * H * d, pos0 + 64, 64, 0, &m1, w, pool, &err);
                CHECK(rc == 0 && m1.ks[0] == m.ks[1] &&
                          memcmp(m1.idx, m.idx + m.kb, sizeof(int64_t) * (size_t)m.kb) == 0 &&
                          memcmp(m1.cand_L[1], m.cand_L[1] + m.cand_cap[1], sizeof(int64_t) * (size_t)m.cand_cap[1]) == 0,
                      "block 1 of a prefill differs from the same block alone");
                hip_mask_free(&m1);
            }
            hip_work_free(w);
            hip_mask_free(&m);
            free(out);
        }
    }
    printf("invariants (default normal + special layer configs, T=40000, f16 KV, GQA 4/2, NORM RoPE, "
           "prefill 130 + decode): %lld key references checked; max relative distance %lld (bound "
           "sink+kept+window+block = %lld); BSA vs double attention over the same key sets: worst "
           "relerr %.2e\n", (long long)n_keys_checked, (long long)max_dist, (long long)max_bound, worst_bsa);
    CHECK(worst_bsa <= 1e-4, "BSA vs double over its own key set: %.2e", worst_bsa);
    cpu_rope_free(&rope);
    syn_free(&s);
}

/* GQA: the same keys given as 2 KV heads shared by pairs of query heads, or duplicated into 4
 * KV heads, must give identical masks and outputs (the reference vectors have one KV head). */
static void test_gqa(cm_pool *pool)
{
    const int H = 4, d = 64;
    const int64_t T = 12000, n = 100, pos0 = T - n;
    struct syn s;
    syn_make(&s, H, 2, d, T, T);
    float *K4 = malloc(sizeof(float) * (size_t)T * 4 * d), *V4 = malloc(sizeof(float) * (size_t)T * 4 * d);
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < 4; h++) {
            memcpy(K4 + ((size_t)t * 4 + h) * d, s.K + ((size_t)t * 2 + h / 2) * d, sizeof(float) * d);
            memcpy(V4 + ((size_t)t * 4 + h) * d, s.V + ((size_t)t * 2 + h / 2) * d, sizeof(float) * d);
        }
    cpu_rope rope;
    CM_ASSERT(cpu_rope_init(&rope, CPU_ROPE_NORM, d, d, 10000.0, 1.0, NULL, T) == 0);
    hip_layer_config lc;
    hip_layer_config_default(&lc, false);
    lc.sink_token_size = 64;
    lc.sliding_window_size = 512;
    lc.second_stage_k = 1024;
    lc.stages[1].stage_k = 4096;
    lc.stages[2].stage_k = 2048;
    bool same = true;
    for (int mode = 0; mode < 2; mode++) {
        lc.scan_rope = mode ? HIP_SCAN_CHUNK : HIP_SCAN_RELATIVE;
        hip_args a2, a4;
        syn_args(&a2, &s, &lc, &rope, false);
        a4 = a2;
        a4.shape.n_head_kv = 4;
        a4.kv.k = K4;
        a4.kv.v = V4;
        a4.kv.row_bytes = (size_t)4 * d * sizeof(float);
        size_t nel = (size_t)n * H * d;
        float *o2 = malloc(sizeof(float) * nel), *o4 = malloc(sizeof(float) * nel);
        hip_mask m2, m4;
        run_hip(&a2, s.q + (size_t)pos0 * H * d, pos0, n, o2, &m2, pool);
        run_hip(&a4, s.q + (size_t)pos0 * H * d, pos0, n, o4, &m4, pool);
        for (int b = 0; b < m2.n_qblk; b++)
            if (m2.ks[b] != m4.ks[b] || memcmp(m2.idx + b * m2.kb, m4.idx + b * m4.kb, sizeof(int64_t) * (size_t)m2.kb))
                same = false;
        double e = relerr(o2, o4, (int64_t)nel);
        CHECK(same && e == 0.0, "GQA 4/2 vs 4/4 (%s): masks %s, output relerr %.2e", mode ? "chunk" : "relative",
              same ? "equal" : "differ", e);
        hip_mask_free(&m2);
        hip_mask_free(&m4);
        free(o2);
        free(o4);
    }
    printf("GQA: 4 query heads on 2 KV heads == the same keys duplicated into 4 KV heads (masks and "
           "outputs, both pruning RoPE modes): %s\n", same ? "identical" : "DIFFERENT");
    cpu_rope_free(&rope);
    free(K4);
    free(V4);
    syn_free(&s);
}

int main(void)
{
    int nth = CM_MIN(2, cm_num_cpus());
    cm_pool *pool = cm_pool_init(nth);
    test_equivalence(pool);
    test_invariants(pool);
    test_gqa(pool);
    bool have = find_ref_dir();
    if (have && load_shared()) {
        printf("reference vectors: %s\n", ref_dir);
        const struct vcase cases[3] = {
            {"case1_decode_relative", 65535, 1, HIP_SCAN_RELATIVE, 2048},
            {"case2_decode_streaming", 65535, 1, HIP_SCAN_CHUNK, 4096},
            {"case3_prefill256_relative", 65280, 256, HIP_SCAN_RELATIVE, 2048},
        };
        for (int i = 0; i < 3; i++) run_case(&cases[i], pool);
    } else if (!have) {
        printf("reference vectors not found (IHIP_HIP_REF / IHIP_SRC/../shared/testdata/hip-ref)\n");
    }
    cm_pool_free(pool);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    if (n_fail) return 1;
    return have ? 0 : 77;
}
