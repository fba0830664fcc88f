/*
 * test-tensor.c — the tensor module: type table, fp16/bf16 conversions, weight quantise →
 * dequantise error bounds, activation quantisation (llama.cpp's x86 rounding), and every dot
 * product at every SIMD level this CPU has against the scalar reference and against a double
 * precision dot of the dequantised operands. Levels the CPU lacks are skipped, not failed.
 *
 * Independent references: F16C hardware conversions (_cvtsh_ss / _cvtss_sh), nearest-even by
 * nearbyintf, doubles. Block layout facts used here (offsets of the fp16 scales) come from the
 * GGUF format, not from the library's headers.
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor/tensor.h"

#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_pass, n_fail, n_skip;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (cond) {                                                                            \
            n_pass++;                                                                          \
        } else {                                                                               \
            n_fail++;                                                                          \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                        \
            printf(__VA_ARGS__);                                                               \
            printf("\n");                                                                      \
        }                                                                                      \
    } while (0)

/* ---- helpers ----------------------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t rng_u64(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dULL;
}
static uint32_t rng_u32(void) { return (uint32_t)(rng_u64() >> 32); }
static float rng_unif(void) { return (float)((double)(rng_u64() >> 11) / 9007199254740992.0) * 2.0f - 1.0f; }
static float rng_normal(void)
{
    double u1 = ((double)(rng_u64() >> 11) + 1.0) / 9007199254740993.0;
    double u2 = (double)(rng_u64() >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static const int weight_types[] = {TN_F32, TN_F16, TN_BF16, TN_Q4_0, TN_Q4_1, TN_Q5_0, TN_Q5_1,
                                   TN_Q8_0, TN_Q2_K, TN_Q3_K, TN_Q4_K, TN_Q5_K, TN_Q6_K};

/* Byte offsets of a block's fp16 super-scales (GGUF layout), -1 = none. */
static void fp16_fields(int type, int off[2])
{
    off[0] = off[1] = -1;
    switch (type) {
    case TN_Q4_0: case TN_Q5_0: case TN_Q8_0: off[0] = 0; break;
    case TN_Q4_1: case TN_Q5_1: case TN_Q4_K: case TN_Q5_K: off[0] = 0; off[1] = 2; break;
    case TN_Q2_K: off[0] = 80; off[1] = 82; break;
    case TN_Q3_K: off[0] = 108; break;
    case TN_Q6_K: off[0] = 208; break;
    default: break;
    }
}

/* ---- type table ----------------------------------------------------------------------------- */

static void test_types(void)
{
    static const struct { int id; const char *name; int block; int size; } known[] = {
        {0, "F32", 1, 4}, {1, "F16", 1, 2}, {2, "Q4_0", 32, 18}, {3, "Q4_1", 32, 20},
        {6, "Q5_0", 32, 22}, {7, "Q5_1", 32, 24}, {8, "Q8_0", 32, 34}, {9, "Q8_1", 32, 36},
        {10, "Q2_K", 256, 84}, {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144},
        {13, "Q5_K", 256, 176}, {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292},
        {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74}, {18, "IQ3_XXS", 256, 98},
        {19, "IQ1_S", 256, 50}, {20, "IQ4_NL", 32, 18}, {21, "IQ3_S", 256, 110},
        {22, "IQ2_S", 256, 82}, {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1}, {25, "I16", 1, 2},
        {26, "I32", 1, 4}, {27, "I64", 1, 8}, {28, "F64", 1, 8}, {29, "IQ1_M", 256, 56},
        {30, "BF16", 1, 2}, {34, "TQ1_0", 256, 54}, {35, "TQ2_0", 256, 66}, {39, "MXFP4", 32, 17},
    };
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
        const char *nm = tn_type_name(known[i].id);
        CHECK(nm && strcmp(nm, known[i].name) == 0, "name of %d: %s", known[i].id, nm ? nm : "NULL");
        CHECK(tn_type_block(known[i].id) == known[i].block && tn_type_size(known[i].id) == (size_t)known[i].size,
              "%s block/size %d/%zu", known[i].name, tn_type_block(known[i].id), tn_type_size(known[i].id));
    }
    static const int unknown[] = {-1, 4, 5, 31, 32, 33, 36, 37, 38, 40, 63, 64, 1000};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        const int t = unknown[i];
        CHECK(!tn_type_name(t) && tn_type_block(t) == 0 && tn_type_size(t) == 0 && !tn_type_supported(t) &&
                  tn_row_size(t, 32) == -1,
              "unknown id %d", t);
    }
    int n_supported = 0;
    for (int t = 0; t < TN_TYPE_MAX; t++) n_supported += tn_type_supported(t);
    CHECK(n_supported == 13, "13 supported weight types, got %d", n_supported);
    for (size_t i = 0; i < sizeof(weight_types) / sizeof(weight_types[0]); i++)
        CHECK(tn_type_supported(weight_types[i]), "%s supported", tn_type_name(weight_types[i]));
    CHECK(!tn_type_supported(TN_Q8_1) && !tn_type_supported(TN_Q8_K) && !tn_type_supported(16),
          "Q8_1/Q8_K/IQ2_XXS are not weight types");
    CHECK(tn_row_size(TN_Q4_1, 576) == 360 && tn_row_size(TN_Q8_0, 576) == 612 &&
              tn_row_size(TN_F32, 7) == 28 && tn_row_size(TN_Q6_K, 512) == 420,
          "row sizes");
    CHECK(tn_row_size(TN_Q4_1, 33) == -1 && tn_row_size(TN_Q4_K, 576) == -1 && tn_row_size(TN_F32, -1) == -1,
          "bad row sizes");
    CHECK(tn_vec_dot_type(TN_F32) == TN_F32 && tn_vec_dot_type(TN_F16) == TN_F16 &&
              tn_vec_dot_type(TN_BF16) == TN_BF16 && tn_vec_dot_type(TN_Q4_0) == TN_Q8_0 &&
              tn_vec_dot_type(TN_Q5_0) == TN_Q8_0 && tn_vec_dot_type(TN_Q8_0) == TN_Q8_0 &&
              tn_vec_dot_type(TN_Q4_1) == TN_Q8_1 && tn_vec_dot_type(TN_Q5_1) == TN_Q8_1 &&
              tn_vec_dot_type(TN_Q2_K) == TN_Q8_K && tn_vec_dot_type(TN_Q6_K) == TN_Q8_K,
          "vec_dot types");
}

/* ---- fp16 / bf16 ------------------------------------------------------------------------------- */

static int is_nan_h(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff); }

static void test_fp16(void)
{
    int bad_hw = 0, bad_val = 0, bad_rt = 0, bad_nan = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = tn_fp16_to_fp32((uint16_t)h);
        if (is_nan_h((uint16_t)h)) {
            if (!isnan(f)) bad_nan++;
            if (!is_nan_h(tn_fp32_to_fp16(f))) bad_nan++;
            continue;
        }
        if (f2u(f) != f2u(_cvtsh_ss((unsigned short)h))) bad_hw++;
        /* independent value: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024 */
        const int e = (h >> 10) & 31, m = h & 1023;
        double v = e == 0 ? ldexp(m, -24) : e == 31 ? INFINITY : ldexp(1024 + m, e - 25);
        if (h & 0x8000) v = -v;
        if ((double)f != v || (signbit(f) != 0) != ((h & 0x8000) != 0)) bad_val++;
        if (tn_fp32_to_fp16(f) != h) bad_rt++;
    }
    CHECK(bad_hw == 0, "fp16->fp32 differs from F16C for %d values", bad_hw);
    CHECK(bad_val == 0, "fp16->fp32 wrong value for %d values", bad_val);
    CHECK(bad_rt == 0, "fp16 round trip broken for %d values", bad_rt);
    CHECK(bad_nan == 0, "NaN handling broken for %d values", bad_nan);

    /* fp32 -> fp16 vs F16C: every tie point between neighbouring halves (and ±1 ulp), plus
     * random bit patterns */
    int bad = 0;
    for (uint32_t h = 0; h < 0x7c00; h++) {
        const double lo = (double)tn_fp16_to_fp32((uint16_t)h);
        const double hi = h + 1 == 0x7c00 ? 65536.0 : (double)tn_fp16_to_fp32((uint16_t)(h + 1));
        const float mid = (float)((lo + hi) / 2); /* exact in float */
        for (int k = -1; k <= 1; k++) {
            const float f = u2f(f2u(mid) + (uint32_t)k);
            for (int sgn = 0; sgn < 2; sgn++) {
                const float g = sgn ? -f : f;
                if (tn_fp32_to_fp16(g) != _cvtss_sh(g, _MM_FROUND_TO_NEAREST_INT)) bad++;
            }
        }
    }
    for (int i = 0; i < 2000000; i++) {
        const float f = u2f(rng_u32());
        const uint16_t hw = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT), sw = tn_fp32_to_fp16(f);
        if (sw != hw) bad++; /* NaNs too: both quiet them and keep the top payload bits */
    }
    CHECK(bad == 0, "fp32->fp16 differs from F16C in %d cases", bad);
    CHECK(tn_fp32_to_fp16(1.0f + 0x1p-11f) == 0x3c00 && tn_fp32_to_fp16(1.0f + 3 * 0x1p-11f) == 0x3c02,
          "ties to even");
    CHECK(tn_fp32_to_fp16(65504.0f) == 0x7bff && tn_fp32_to_fp16(65519.996f) == 0x7bff &&
              tn_fp32_to_fp16(65520.0f) == 0x7c00 && tn_fp32_to_fp16(-INFINITY) == 0xfc00,
          "overflow to inf");
    CHECK(tn_fp32_to_fp16(0x1p-25f) == 0 && tn_fp32_to_fp16(0x1.000002p-25f) == 1 &&
              tn_fp32_to_fp16(0x1p-24f) == 1 && tn_fp32_to_fp16(3 * 0x1p-25f) == 2 &&
              tn_fp32_to_fp16(-0.0f) == 0x8000,
          "subnormal rounding");
    CHECK(is_nan_h(tn_fp32_to_fp16(NAN)) && isnan(tn_fp16_to_fp32(0x7e00)), "NaN");

    /* row conversions (vectorised) agree with the scalar ones on every value; NaN payloads
     * survive dequantisation bit for bit (the gguf package / numpy keep them) */
    uint16_t *hall = malloc(65536 * 2);
    float *fall = malloc(65536 * 4);
    uint16_t *hback = malloc(65536 * 2);
    for (uint32_t h = 0; h < 65536; h++) hall[h] = (uint16_t)h;
    tn_dequant_row(TN_F16, hall, fall, 65536);
    tn_quantize_row(TN_F16, fall, hback, 65536);
    int bad_row = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const uint32_t want = is_nan_h((uint16_t)h)
                                  ? ((h & 0x8000u) << 16) | 0x7f800000u | ((h & 0x3ffu) << 13)
                                  : f2u(tn_fp16_to_fp32((uint16_t)h));
        if (f2u(fall[h]) != want) bad_row++;
        if (hback[h] != tn_fp32_to_fp16(fall[h])) bad_row++;
        if (!is_nan_h((uint16_t)h) && hback[h] != h) bad_row++;
    }
    CHECK(bad_row == 0, "F16 row conversions: %d mismatches", bad_row);
    free(hall);
    free(fall);
    free(hback);

    /* bf16: all values round-trip; fp32->bf16 is the nearest (ties even) by an independent
     * distance computation */
    int bad_bf = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = tn_bf16_to_fp32((uint16_t)h);
        if (f2u(f) != h << 16) bad_bf++;
        if (isnan(f) ? !isnan(tn_bf16_to_fp32(tn_fp32_to_bf16(f))) : tn_fp32_to_bf16(f) != h) bad_bf++;
    }
    CHECK(bad_bf == 0, "bf16 round trip broken for %d values", bad_bf);
    bad_bf = 0;
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = rng_u32();
        if (i & 1) u = (u & 0xffff0000u) | 0x8000u; /* exact ties */
        const float f = u2f(u);
        const uint16_t got = tn_fp32_to_bf16(f);
        if (isnan(f)) {
            if (!isnan(tn_bf16_to_fp32(got))) bad_bf++;
            continue;
        }
        const uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
        const double vlo = fabs((double)tn_bf16_to_fp32(lo));
        const double vhi = (hi & 0x7fff) == 0x7f80 ? ldexp(1.0, 128) : fabs((double)tn_bf16_to_fp32(hi));
        const double dl = fabs(fabs((double)f) - vlo), dh = fabs(vhi - fabs((double)f));
        const uint16_t want = dl < dh ? lo : dh < dl ? hi : (lo & 1) ? hi : lo;
        if (got != want) bad_bf++;
    }
    CHECK(bad_bf == 0, "fp32->bf16 not nearest-even in %d cases", bad_bf);
}

/* ---- weight quantisation ------------------------------------------------------------------------ */

/* qmax, scmax (0 = no sub-block scales), asym (has mins) */
static void type_params(int type, int *qmax, int *scmax, int *asym)
{
    *scmax = 0;
    *asym = 0;
    switch (type) {
    case TN_Q4_0: *qmax = 7; break;
    case TN_Q5_0: *qmax = 15; break;
    case TN_Q8_0: *qmax = 127; break;
    case TN_Q4_1: *qmax = 15; *asym = 1; break;
    case TN_Q5_1: *qmax = 31; *asym = 1; break;
    case TN_Q2_K: *qmax = 3; *scmax = 15; *asym = 1; break;
    case TN_Q3_K: *qmax = 3; *scmax = 31; break;
    case TN_Q4_K: *qmax = 15; *scmax = 63; *asym = 1; break;
    case TN_Q5_K: *qmax = 31; *scmax = 63; *asym = 1; break;
    case TN_Q6_K: *qmax = 31; *scmax = 127; break;
    default: *qmax = 0; break;
    }
}

enum { GEN_UNIF, GEN_NORMAL_SPIKES, GEN_ZERO_BLOCKS, GEN_LARGE, GEN_SMALL, GEN_CONST, GEN_POSITIVE, GEN_N };

static void gen_data(int kind, float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        switch (kind) {
        case GEN_UNIF: x[i] = rng_unif(); break;
        case GEN_NORMAL_SPIKES: x[i] = rng_normal() * ((rng_u32() % 61) == 0 ? 20.0f : 1.0f); break;
        case GEN_ZERO_BLOCKS: x[i] = ((i / 32) % 3 == 1) ? 0.0f : rng_unif(); break;
        case GEN_LARGE: x[i] = rng_unif() * 3000.0f; break;
        case GEN_SMALL: x[i] = rng_unif() * 0.05f; break; /* typical weight scale */
        case GEN_CONST: x[i] = ((i / 256) & 1) ? -0.75f : 0.5f; break;
        case GEN_POSITIVE: x[i] = 2.0f + rng_unif(); break;
        }
    }
}

static void test_weight_quant(void)
{
    const int64_t n = 4096;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    uint8_t *q = malloc((size_t)tn_row_size(TN_F32, n));
    for (size_t ti = 0; ti < sizeof(weight_types) / sizeof(weight_types[0]); ti++) {
        const int type = weight_types[ti];
        const int bs = tn_type_block(type);
        for (int kind = 0; kind < GEN_N; kind++) {
            gen_data(kind, x, n);
            memset(y, 0xff, n * sizeof(float));
            tn_quantize_weight_row(type, x, q, n);
            tn_dequant_row(type, q, y, n);
            int qmax, scmax, asym;
            type_params(type, &qmax, &scmax, &asym);
            int bad = 0;
            double worst = 0;
            for (int64_t b = 0; b < n / bs; b++) {
                float mn = x[b * bs], mx = x[b * bs], amax = 0;
                for (int j = 0; j < bs; j++) {
                    const float v = x[b * bs + j];
                    mn = v < mn ? v : mn;
                    mx = v > mx ? v : mx;
                    amax = fabsf(v) > amax ? fabsf(v) : amax;
                }
                for (int j = 0; j < bs; j++) {
                    const double xv = x[b * bs + j], err = fabs((double)y[b * bs + j] - xv);
                    double bound;
                    if (type == TN_F32) bound = 0;
                    else if (type == TN_F16) bound = fabs(xv) * 0x1p-11 + 0x1p-25; /* subnormal halves */
                    else if (type == TN_BF16) bound = fabs(xv) * 0x1p-8;
                    else if (!scmax && !asym) bound = 0.5 * amax / qmax * 1.001;
                    else if (!scmax) bound = 0.5 * (mx - mn) / qmax * 1.001 + (fabs(mn) + (mx - mn)) * 1e-3;
                    else if (!asym) bound = 0.5 * amax / qmax * (1.0 + 1.0 / scmax) * 1.001 + amax * 1e-4;
                    else bound = amax / qmax * (1.0 + 2.0 / scmax) * 1.01 + amax * 4e-3;
                    if (!(err <= bound + 1e-30)) {
                        if (!bad) printf("  %s kind %d elem %lld: x=%g y=%g bound=%g\n", tn_type_name(type),
                                         kind, (long long)(b * bs + j), xv, (double)y[b * bs + j], bound);
                        bad++;
                    }
                    if (amax > 0 && err / amax > worst) worst = err / amax;
                }
            }
            CHECK(bad == 0, "%s data kind %d: %d elements beyond the error bound", tn_type_name(type), kind, bad);
            if (kind == GEN_ZERO_BLOCKS) {
                int nz = 0;
                for (int64_t i = 0; i < n; i++) nz += ((i / 32) % 3 == 1 && bs == 32 && y[i] != 0.0f);
                CHECK(nz == 0, "%s: all-zero blocks dequantise to %d non-zeros", tn_type_name(type), nz);
            }
        }
    }
    free(x);
    free(y);
    free(q);
}

/* ---- activation quantisation -------------------------------------------------------------------- */

static void test_act_quant(void)
{
    const int64_t n = 1024;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    uint8_t *buf = malloc(4096);
    for (int kind = 0; kind < GEN_N; kind++) {
        gen_data(kind, x, n);
        if (kind == GEN_CONST) { /* exact .5 ties: amax 127 makes id = 1 */
            for (int64_t i = 0; i < n; i++) x[i] = (i % 32 == 0) ? ((i / 32) & 1 ? 127.0f : -127.0f)
                                                                 : (float)((int)(i % 9) - 4) + 0.5f;
        }
        /* Q8_0 and Q8_1 */
        for (int t = 0; t < 2; t++) {
            const int type = t ? TN_Q8_1 : TN_Q8_0;
            const int bsz = t ? 36 : 34, qoff = t ? 4 : 2;
            tn_quantize_row(type, x, buf, n);
            int bad = 0;
            for (int64_t b = 0; b < n / 32; b++) {
                const uint8_t *blk = buf + b * bsz;
                float amax = 0;
                for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
                uint16_t d16, s16;
                memcpy(&d16, blk, 2);
                memcpy(&s16, blk + 2, 2);
                const float d = amax / 127.0f, id = amax != 0 ? 127.0f / amax : 0.0f;
                if (d16 != tn_fp32_to_fp16(d)) bad++;
                int sum = 0;
                for (int j = 0; j < 32; j++) {
                    const int want = (int)nearbyintf(x[b * 32 + j] * id);
                    const int got = (int8_t)blk[qoff + j];
                    if (got != want) bad++;
                    sum += got;
                }
                if (t && s16 != tn_fp32_to_fp16(d * (float)sum)) bad++;
            }
            CHECK(bad == 0, "%s kind %d: %d mismatches", tn_type_name(type), kind, bad);
            tn_dequant_row(type, buf, y, n);
            int bad_dq = 0;
            for (int64_t i = 0; i < n; i++) {
                uint16_t d16;
                memcpy(&d16, buf + (i / 32) * bsz, 2);
                if (y[i] != (float)(int8_t)buf[(i / 32) * bsz + qoff + i % 32] * tn_fp16_to_fp32(d16)) bad_dq++;
            }
            CHECK(bad_dq == 0, "%s dequant kind %d", tn_type_name(type), kind);
        }
        /* Q8_K */
        tn_quantize_row(TN_Q8_K, x, buf, n);
        int bad = 0;
        for (int64_t b = 0; b < n / 256; b++) {
            const uint8_t *blk = buf + b * 292;
            float amax = 0, max = 0, d;
            for (int j = 0; j < 256; j++)
                if (fabsf(x[b * 256 + j]) > amax) { amax = fabsf(x[b * 256 + j]); max = x[b * 256 + j]; }
            memcpy(&d, blk, 4);
            const float iscale = amax != 0 ? -127.0f / max : 0.0f;
            if (amax != 0 ? d != 1.0f / iscale : d != 0.0f) bad++;
            for (int k = 0; k < 16; k++) {
                int sum = 0;
                for (int l = 0; l < 16; l++) {
                    const int j = 16 * k + l;
                    int want = (int)nearbyintf(iscale * x[b * 256 + j]);
                    want = want > 127 ? 127 : want;
                    const int got = (int8_t)blk[4 + j];
                    if (got != want) bad++;
                    sum += got;
                }
                int16_t bsum;
                memcpy(&bsum, blk + 260 + 2 * k, 2);
                if (bsum != sum) bad++;
            }
        }
        CHECK(bad == 0, "Q8_K kind %d: %d mismatches", kind, bad);
        tn_dequant_row(TN_Q8_K, buf, y, n);
        int bad_dq = 0;
        for (int64_t i = 0; i < n; i++) {
            float d;
            memcpy(&d, buf + (i / 256) * 292, 4);
            if (y[i] != (float)(int8_t)buf[(i / 256) * 292 + 4 + i % 256] * d) bad_dq++;
        }
        CHECK(bad_dq == 0, "Q8_K dequant kind %d", kind);
        /* F16 / BF16 / F32 */
        tn_quantize_row(TN_F16, x, buf, n);
        int bad_h = 0;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, buf + 2 * i, 2);
            bad_h += h != tn_fp32_to_fp16(x[i]);
        }
        tn_quantize_row(TN_BF16, x, buf, n);
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, buf + 2 * i, 2);
            bad_h += h != tn_fp32_to_bf16(x[i]);
        }
        tn_quantize_row(TN_F32, x, buf, n);
        bad_h += memcmp(buf, x, n * 4) != 0;
        CHECK(bad_h == 0, "F16/BF16/F32 activations kind %d", kind);
    }
    /* explicit ties: llama.cpp's x86 quantiser rounds half to even (vroundps / nearest_int) */
    float t[256];
    for (int j = 0; j < 256; j++) t[j] = 0;
    t[0] = 127.0f; t[1] = 2.5f; t[2] = 3.5f; t[3] = -2.5f; t[4] = 0.5f;
    tn_quantize_row(TN_Q8_0, t, buf, 32);
    CHECK((int8_t)buf[2] == 127 && (int8_t)buf[3] == 2 && (int8_t)buf[4] == 4 && (int8_t)buf[5] == -2 &&
              (int8_t)buf[6] == 0,
          "Q8_0 ties to even: %d %d %d %d", (int8_t)buf[3], (int8_t)buf[4], (int8_t)buf[5], (int8_t)buf[6]);
    t[0] = -127.0f;
    tn_quantize_row(TN_Q8_K, t, buf, 256);
    CHECK((int8_t)buf[4] == -127 && (int8_t)buf[5] == 2 && (int8_t)buf[6] == 4 && (int8_t)buf[7] == -2,
          "Q8_K ties to even");
    /* an all-zero Q8_K block has d = 0, zero quants and zero bsums */
    memset(t, 0, sizeof(t));
    memset(buf, 0xab, 292);
    tn_quantize_row(TN_Q8_K, t, buf, 256);
    int nz = 0;
    for (int j = 0; j < 292; j++) nz += buf[j] != 0;
    CHECK(nz == 0, "all-zero Q8_K block: %d non-zero bytes", nz);
    free(x);
    free(y);
    free(buf);
}

/* ---- dot products ------------------------------------------------------------------------------- */

/* Random weight row: from floats through the quantiser, or raw random bytes with sane fp16
 * scales (covers every bit pattern, e.g. Q8_0's -128 and all 6-bit K scales). With `unit`,
 * scales are 1.0 so every product is an exact small integer. */
static void make_weights(int type, int mode, uint8_t *w, int64_t n, float *tmp)
{
    const int64_t rs = tn_row_size(type, n);
    if (mode == 0 || type == TN_F32 || type == TN_F16 || type == TN_BF16) {
        for (int64_t i = 0; i < n; i++)
            tmp[i] = mode == 2 ? (float)((int)(rng_u32() % 15) - 7) : rng_normal();
        tn_quantize_weight_row(type, tmp, w, n);
        return;
    }
    for (int64_t i = 0; i < rs; i++) w[i] = (uint8_t)rng_u32();
    int off[2];
    fp16_fields(type, off);
    const int64_t bsz = (int64_t)tn_type_size(type);
    for (int64_t b = 0; b < rs / bsz; b++)
        for (int k = 0; k < 2; k++)
            if (off[k] >= 0)
                put16(w + b * bsz + off[k], mode == 2 ? 0x3c00 : tn_fp32_to_fp16(rng_unif() * 0.05f));
}

static void test_dots(void)
{
    const int64_t nmax = 4128;
    float *xf = malloc(nmax * 4), *af = malloc(nmax * 4), *wd = malloc(nmax * 4), *ad = malloc(nmax * 4);
    uint8_t *w = malloc(nmax * 8), *a = malloc(nmax * 8);
    const int64_t lens32[] = {32, 64, 96, 576, 1536, 4128};
    const int64_t lensK[] = {256, 512, 1536, 4096};
    const int64_t lensF[] = {1, 7, 33, 576, 1000, 4099};
    const int top = tn_simd_force(TN_SIMD_AVX512);
    printf("simd: best level on this CPU is %s\n", tn_simd_name(top));
    if (top < TN_SIMD_AVX512) {
        printf("skip: AVX-512 comparisons (CPU lacks avx512f/bw/vl)\n");
        n_skip++;
    }
    if (top < TN_SIMD_AVX2) {
        printf("skip: AVX2 comparisons\n");
        n_skip++;
    }

    for (size_t ti = 0; ti < sizeof(weight_types) / sizeof(weight_types[0]); ti++) {
        const int type = weight_types[ti], atype = tn_vec_dot_type(type);
        const int bs = tn_type_block(type);
        const int64_t *lens = bs == 1 ? lensF : bs == 32 ? lens32 : lensK;
        const int one_tol = type == TN_Q4_1 || type == TN_Q5_1; /* fp16 s of Q8_1 */
        int bad_lvl = 0, bad_ref = 0, bad_exact = 0, bad_func = 0, ncase = 0;
        double worst_lvl = 0, worst_ref = 0;
        for (int li = 0; li < 6 && !(bs == 256 && li >= 4); li++) {
            const int64_t n = lens[li];
            for (int mode = 0; mode < 3; mode++) {
                for (int rep = 0; rep < 4; rep++) {
                    make_weights(type, mode, w, n, xf);
                    if (mode == 2) { /* integer activations whose quantisation is exact */
                        for (int64_t i = 0; i < n; i++) af[i] = (float)((int)(rng_u32() % 7) - 3);
                        for (int64_t i = 0; i < n; i += (bs == 256 ? 256 : 32))
                            af[i] = (rng_u32() & 1) ? 127.0f : -127.0f;
                    } else {
                        for (int64_t i = 0; i < n; i++) af[i] = rng_normal() * (rep == 3 ? 100.0f : 1.0f);
                    }
                    tn_quantize_row(atype, af, a, n);
                    tn_dequant_row(type, w, wd, n);
                    tn_dequant_row(atype, a, ad, n);
                    double ref = 0, mag = 0;
                    for (int64_t b = 0; b < n / bs; b++) {
                        double wmax = 0, asum = 0;
                        for (int j = 0; j < bs; j++) {
                            const int64_t i = b * bs + j;
                            ref += (double)wd[i] * ad[i];
                            mag += fabs((double)wd[i] * ad[i]);
                            wmax = fmax(wmax, fabs(wd[i]));
                            asum += fabs(ad[i]);
                        }
                        if (bs > 1) mag += wmax * asum;
                    }
                    tn_simd_force(TN_SIMD_SCALAR);
                    const float s_ref = tn_vec_dot(type, n, w, a);
                    ncase++;
                    const double tol_ref = (one_tol ? 1e-3 : 2e-5) * mag + 1e-30;
                    if (!(fabs(s_ref - ref) <= tol_ref)) {
                        if (!bad_ref) printf("  %s n=%lld mode %d: scalar %.9g vs double %.9g (mag %g)\n",
                                             tn_type_name(type), (long long)n, mode, s_ref, ref, mag);
                        bad_ref++;
                    }
                    if (mag > 0) worst_ref = fmax(worst_ref, fabs(s_ref - ref) / mag);
                    if (mode == 2 && (double)s_ref != ref) {
                        if (!bad_exact) printf("  %s n=%lld exact: scalar %.9g vs %.9g\n", tn_type_name(type),
                                               (long long)n, s_ref, ref);
                        bad_exact++;
                    }
                    for (int lvl = TN_SIMD_AVX2; lvl <= top; lvl++) {
                        tn_simd_force(lvl);
                        const float s = tn_vec_dot(type, n, w, a);
                        tn_vec_dot_fn fn = tn_vec_dot_func(type);
                        if (!fn || fn(n, w, a) != s) bad_func++;
                        if (!(fabs((double)s - s_ref) <= 1e-5 * mag + 1e-30)) {
                            if (!bad_lvl) printf("  %s n=%lld mode %d %s: %.9g vs scalar %.9g (mag %g)\n",
                                                 tn_type_name(type), (long long)n, mode, tn_simd_name(lvl), s,
                                                 s_ref, mag);
                            bad_lvl++;
                        }
                        if (mag > 0) worst_lvl = fmax(worst_lvl, fabs((double)s - s_ref) / mag);
                        if (mode == 2 && (double)s != ref) {
                            if (!bad_exact) printf("  %s n=%lld exact %s: %.9g vs %.9g\n", tn_type_name(type),
                                                   (long long)n, tn_simd_name(lvl), s, ref);
                            bad_exact++;
                        }
                    }
                }
            }
        }
        CHECK(bad_ref == 0, "%s: scalar dot vs double dot of dequantised rows: %d/%d bad", tn_type_name(type),
              bad_ref, ncase);
        CHECK(bad_lvl == 0, "%s: SIMD dot vs scalar: %d bad", tn_type_name(type), bad_lvl);
        CHECK(bad_exact == 0, "%s: integer-exact dots: %d not exact", tn_type_name(type), bad_exact);
        CHECK(bad_func == 0, "%s: tn_vec_dot_func disagrees with tn_vec_dot", tn_type_name(type));
        printf("  %-5s %3d cases: max |scalar-double|/mag %.2e, max |simd-scalar|/mag %.2e\n",
               tn_type_name(type), ncase, worst_ref, worst_lvl);
    }
    tn_simd_force(TN_SIMD_AVX512);
    CHECK(tn_simd_level() == top, "level restored");
    CHECK(tn_vec_dot_func(TN_Q8_K) == NULL && tn_vec_dot_func(16) == NULL, "no dot for activation/IQ types");
    free(xf);
    free(af);
    free(wd);
    free(ad);
    free(w);
    free(a);
}

int main(void)
{
    test_types();
    test_fp16();
    test_weight_quant();
    test_act_quant();
    test_dots();
    if (n_skip) printf("%d group(s) skipped\n", n_skip);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
