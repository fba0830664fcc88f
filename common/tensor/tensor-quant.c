/*
 * tensor-quant.c — dequantisation of every supported block format, quantisation of activations
 * (Q8_0, Q8_1, Q8_K, F16, BF16, F32) and a plain round-to-nearest weight quantiser.
 *
 * Dequantisation is bit-exact with the gguf Python package (gguf/quants.py): each element is
 * computed with the same float32 operations in the same order, e.g. Q4_1 = (d*q) + m and
 * K-quants = (d*scale)*q - (dmin*min), never fused. Every product and sum is its own statement
 * so no compiler contracts them into an FMA (clang's default -ffp-contract=on fuses within one
 * expression; GCC in ISO C mode does not fuse at all).
 *
 * Activation quantisation follows what llama.cpp runs on x86 (AVX2/AVX-512 builds), so our
 * matmuls see the same int8 activations as llama.cpp's:
 *   Q8_0/Q8_1: d = amax/127, id = 127/amax (not 1/d), q = round-half-even(x*id) (vroundps),
 *              d stored fp16; Q8_1 adds s = fp16(d * sum(q)).
 *   Q8_K:      the value of largest |x| keeps its sign, iscale = -127/max,
 *              q = min(127, nearest_int(iscale*x)) (half-even), d = 1/iscale (float), bsums.
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor-impl.h"

#include <immintrin.h>
#include <math.h>

/* ---- dequantisation ---------------------------------------------------------------------- */

static void tn_dq_q4_0(const tn_block_q4_0 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += 32) {
        const float d = tn_h2f(x->d);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((x->qs[j] & 0x0f) - 8);
            y[j + 16] = d * (float)((x->qs[j] >> 4) - 8);
        }
    }
}

static void tn_dq_q4_1(const tn_block_q4_1 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += 32) {
        const float d = tn_h2f(x->d), m = tn_h2f(x->m);
        for (int j = 0; j < 16; j++) {
            float lo = d * (float)(x->qs[j] & 0x0f);
            float hi = d * (float)(x->qs[j] >> 4);
            y[j] = lo + m;
            y[j + 16] = hi + m;
        }
    }
}

static void tn_dq_q5_0(const tn_block_q5_0 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += 32) {
        const float d = tn_h2f(x->d);
        uint32_t qh;
        memcpy(&qh, x->qh, 4);
        for (int j = 0; j < 16; j++) {
            int q0 = (x->qs[j] & 0x0f) | (int)(((qh >> j) & 1) << 4);
            int q1 = (x->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            y[j] = d * (float)(q0 - 16);
            y[j + 16] = d * (float)(q1 - 16);
        }
    }
}

static void tn_dq_q5_1(const tn_block_q5_1 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += 32) {
        const float d = tn_h2f(x->d), m = tn_h2f(x->m);
        uint32_t qh;
        memcpy(&qh, x->qh, 4);
        for (int j = 0; j < 16; j++) {
            int q0 = (x->qs[j] & 0x0f) | (int)(((qh >> j) & 1) << 4);
            int q1 = (x->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            float lo = d * (float)q0;
            float hi = d * (float)q1;
            y[j] = lo + m;
            y[j + 16] = hi + m;
        }
    }
}

static void tn_dq_q8_0(const tn_block_q8_0 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += 32) {
        const float d = tn_h2f(x->d);
        for (int j = 0; j < 32; j++) y[j] = (float)x->qs[j] * d;
    }
}

static void tn_dq_q8_1(const tn_block_q8_1 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += 32) {
        const float d = tn_h2f(x->d);
        for (int j = 0; j < 32; j++) y[j] = (float)x->qs[j] * d;
    }
}

static void tn_dq_q8_K(const tn_block_q8_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += TN_QK_K)
        for (int j = 0; j < TN_QK_K; j++) y[j] = (float)x->qs[j] * x->d;
}

static void tn_dq_q2_K(const tn_block_q2_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += TN_QK_K) {
        const float d = tn_h2f(x->d), dmin = tn_h2f(x->dmin);
        for (int e = 0; e < TN_QK_K; e++) {
            const int k = e >> 4; /* sub-block of 16 */
            const float dl = d * (float)(x->scales[k] & 0x0f);
            const float ml = dmin * (float)(x->scales[k] >> 4);
            const int q = (x->qs[32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3;
            const float t = dl * (float)q;
            y[e] = t - ml;
        }
    }
}

static void tn_dq_q3_K(const tn_block_q3_K *x, float *y, int64_t nb)
{
    int8_t sc[16];
    for (int64_t i = 0; i < nb; i++, x++, y += TN_QK_K) {
        const float d = tn_h2f(x->d);
        tn_k3_scales(x->scales, sc);
        for (int e = 0; e < TN_QK_K; e++) {
            const float dl = d * (float)sc[e >> 4];
            int q = (x->qs[32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3;
            if (!((x->hmask[e & 31] >> (e >> 5)) & 1)) q -= 4;
            y[e] = dl * (float)q;
        }
    }
}

static void tn_dq_q4_K(const tn_block_q4_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += TN_QK_K) {
        const float d = tn_h2f(x->d), dmin = tn_h2f(x->dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            tn_k4_scale_min(x->scales, j, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            const uint8_t *q = x->qs + 32 * (j >> 1);
            const int shift = 4 * (j & 1);
            for (int l = 0; l < 32; l++) {
                const float t = d1 * (float)((q[l] >> shift) & 0x0f);
                y[32 * j + l] = t - m1;
            }
        }
    }
}

static void tn_dq_q5_K(const tn_block_q5_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += TN_QK_K) {
        const float d = tn_h2f(x->d), dmin = tn_h2f(x->dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            tn_k4_scale_min(x->scales, j, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            const uint8_t *q = x->qs + 32 * (j >> 1);
            const int shift = 4 * (j & 1);
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> shift) & 0x0f) | (((x->qh[l] >> j) & 1) << 4);
                const float t = d1 * (float)v;
                y[32 * j + l] = t - m1;
            }
        }
    }
}

static void tn_dq_q6_K(const tn_block_q6_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x++, y += TN_QK_K) {
        const float d = tn_h2f(x->d);
        for (int e = 0; e < TN_QK_K; e++) {
            const int g = e >> 7, o = e & 127;
            const float dl = d * (float)x->scales[e >> 4];
            const int lo = (x->ql[64 * g + (o & 63)] >> (4 * (o >> 6))) & 0x0f;
            const int hi = (x->qh[32 * g + (o & 31)] >> (2 * (o >> 5))) & 0x03;
            y[e] = dl * (float)((lo | (hi << 4)) - 32);
        }
    }
}

void tn_dequant_row(int type, const void *src, float *dst, int64_t n)
{
    const int bs = tn_type_block(type);
    CM_ASSERT(bs > 0 && n >= 0 && n % bs == 0);
    const int64_t nb = n / bs;
    switch (type) {
    case TN_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case TN_F16: {
        /* F16C eight at a time; groups holding inf/NaN take the software path, which keeps
         * NaN payloads bit for bit (as numpy does) where vcvtph2ps would quiet them */
        const uint16_t *h = src;
        const __m128i expm = _mm_set1_epi16(0x7c00);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(h + i));
            if (_mm_movemask_epi8(_mm_cmpeq_epi16(_mm_and_si128(v, expm), expm))) {
                for (int j = 0; j < 8; j++) dst[i + j] = tn_h2f(h[i + j]);
            } else {
                _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(v));
            }
        }
        for (; i < n; i++) dst[i] = tn_h2f(h[i]);
        break;
    }
    case TN_BF16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; i++) dst[i] = tn_bf2f(h[i]);
        break;
    }
    case TN_Q4_0: tn_dq_q4_0(src, dst, nb); break;
    case TN_Q4_1: tn_dq_q4_1(src, dst, nb); break;
    case TN_Q5_0: tn_dq_q5_0(src, dst, nb); break;
    case TN_Q5_1: tn_dq_q5_1(src, dst, nb); break;
    case TN_Q8_0: tn_dq_q8_0(src, dst, nb); break;
    case TN_Q8_1: tn_dq_q8_1(src, dst, nb); break;
    case TN_Q2_K: tn_dq_q2_K(src, dst, nb); break;
    case TN_Q3_K: tn_dq_q3_K(src, dst, nb); break;
    case TN_Q4_K: tn_dq_q4_K(src, dst, nb); break;
    case TN_Q5_K: tn_dq_q5_K(src, dst, nb); break;
    case TN_Q6_K: tn_dq_q6_K(src, dst, nb); break;
    case TN_Q8_K: tn_dq_q8_K(src, dst, nb); break;
    default: CM_ABORT("tn_dequant_row: unsupported type %d (%s)", type, tn_type_name(type));
    }
}

/* ---- activation quantisation ------------------------------------------------------------- */

/* One Q8_0/Q8_1 block: returns the float scale d, fills qs and the int sum of the quants. */
static float tn_q8_block(const float *x, int8_t *qs, int *sum)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) {
        const float ax = fabsf(x[j]);
        amax = ax > amax ? ax : amax;
    }
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int s = 0;
    for (int j = 0; j < 32; j++) {
        const int q = tn_round_even(x[j] * id);
        qs[j] = (int8_t)q;
        s += q;
    }
    *sum = s;
    return d;
}

static void tn_quant_q8_0(const float *x, tn_block_q8_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32, y++) {
        int sum;
        y->d = tn_f2h(tn_q8_block(x, y->qs, &sum));
    }
}

static void tn_quant_q8_1(const float *x, tn_block_q8_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32, y++) {
        int sum;
        const float d = tn_q8_block(x, y->qs, &sum);
        y->d = tn_f2h(d);
        y->s = tn_f2h(d * (float)sum);
    }
}

static void tn_quant_q8_K(const float *x, tn_block_q8_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += TN_QK_K, y++) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < TN_QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            memset(y, 0, sizeof(*y));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < TN_QK_K; j++) {
            const int v = tn_round_even(iscale * x[j]);
            y->qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int k = 0; k < TN_QK_K / 16; k++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += y->qs[16 * k + j];
            y->bsums[k] = (int16_t)s;
        }
        y->d = 1.0f / iscale;
    }
}

void tn_quantize_row(int act_type, const float *src, void *dst, int64_t n)
{
    const int bs = tn_type_block(act_type);
    CM_ASSERT(bs > 0 && n >= 0 && n % bs == 0);
    const int64_t nb = n / bs;
    switch (act_type) {
    case TN_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case TN_F16: {
        /* vcvtps2ph rounds to nearest even and quiets NaNs exactly as tn_f2h does */
        uint16_t *h = dst;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(h + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) h[i] = tn_f2h(src[i]);
        break;
    }
    case TN_BF16: {
        uint16_t *h = dst;
        for (int64_t i = 0; i < n; i++) h[i] = tn_f2bf(src[i]);
        break;
    }
    case TN_Q8_0: tn_quant_q8_0(src, dst, nb); break;
    case TN_Q8_1: tn_quant_q8_1(src, dst, nb); break;
    case TN_Q8_K: tn_quant_q8_K(src, dst, nb); break;
    default: CM_ABORT("tn_quantize_row: %d (%s) is not an activation type", act_type,
                      tn_type_name(act_type));
    }
}

/* ---- weight quantisation (plain round to nearest) ---------------------------------------- */

static void tn_minmax(const float *x, int n, float *mn, float *mx, float *amax)
{
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    *mn = lo;
    *mx = hi;
    *amax = fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);
}

static int tn_clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* q = clamp(round((x - off) / step), lo, hi), 0 when step is 0. */
static int tn_qstep(float x, float off, float step, int lo, int hi)
{
    if (step == 0.0f) return tn_clampi(0, lo, hi);
    float v = (x - off) / step;
    v = v < -1e6f ? -1e6f : v > 1e6f ? 1e6f : v; /* keep tn_round_even in its range */
    return tn_clampi(tn_round_even(v), lo, hi);
}

/* Symmetric 32-blocks: q in [-qmax, qmax] stored with offset `bias`. */
static void tn_wq_sym32(const float *x, uint16_t *d_out, int *q, int qmax)
{
    float mn, mx, amax;
    tn_minmax(x, 32, &mn, &mx, &amax);
    const uint16_t dh = tn_f2h(amax / (float)qmax);
    const float d = tn_h2f(dh);
    for (int j = 0; j < 32; j++) q[j] = tn_qstep(x[j], 0.0f, d, -qmax, qmax);
    *d_out = dh;
}

/* Asymmetric 32-blocks: q in [0, qmax], x ≈ d*q + m. */
static void tn_wq_asym32(const float *x, uint16_t *d_out, uint16_t *m_out, int *q, int qmax)
{
    float mn, mx, amax;
    tn_minmax(x, 32, &mn, &mx, &amax);
    const uint16_t dh = tn_f2h((mx - mn) / (float)qmax), mh = tn_f2h(mn);
    const float d = tn_h2f(dh), m = tn_h2f(mh);
    for (int j = 0; j < 32; j++) q[j] = tn_qstep(x[j], m, d, 0, qmax);
    *d_out = dh;
    *m_out = mh;
}

/* Scale of each sub-block quantised against a super-block scale: sc = ceil(s / d) so the
 * sub-block's range still fits (no clipping), clamped to scmax. Returns the fp16 super scale. */
static uint16_t tn_wq_superscale(const float *s, int nsub, int scmax, int *sc)
{
    float smax = 0.0f;
    for (int j = 0; j < nsub; j++) smax = s[j] > smax ? s[j] : smax;
    const uint16_t dh = tn_f2h(smax / (float)scmax);
    const float d = tn_h2f(dh);
    for (int j = 0; j < nsub; j++)
        sc[j] = d == 0.0f ? 0 : tn_clampi((int)ceilf(s[j] / d), 0, scmax);
    return dh;
}

/* K-quant with mins: nsub sub-blocks of `len`, q in [0, qmax], scales and mins in [0, scmax].
 * Fills sc/mn (ints), q[256] and the fp16 d/dmin. x ≈ d*sc*q - dmin*mn. */
static void tn_wq_kmin(const float *x, int nsub, int len, int qmax, int scmax, int *sc, int *mn,
                       int *q, uint16_t *d_out, uint16_t *dmin_out)
{
    float neg[16], span[16];
    for (int j = 0; j < nsub; j++) {
        float lo, hi, amax;
        tn_minmax(x + j * len, len, &lo, &hi, &amax);
        neg[j] = lo < 0.0f ? -lo : 0.0f;
        span[j] = hi > 0.0f ? hi : 0.0f;
    }
    *dmin_out = tn_wq_superscale(neg, nsub, scmax, mn);
    const float dmin = tn_h2f(*dmin_out);
    for (int j = 0; j < nsub; j++) span[j] = (span[j] + dmin * (float)mn[j]) / (float)qmax;
    *d_out = tn_wq_superscale(span, nsub, scmax, sc);
    const float d = tn_h2f(*d_out);
    for (int j = 0; j < nsub; j++) {
        const float step = d * (float)sc[j], off = -(dmin * (float)mn[j]);
        for (int l = 0; l < len; l++) q[j * len + l] = tn_qstep(x[j * len + l], off, step, 0, qmax);
    }
}

/* Symmetric K-quant: q in [-qmax, qmax], signed scales in [0, scmax]. */
static uint16_t tn_wq_ksym(const float *x, int nsub, int len, int qmax, int scmax, int *sc, int *q)
{
    float s[16];
    for (int j = 0; j < nsub; j++) {
        float lo, hi, amax;
        tn_minmax(x + j * len, len, &lo, &hi, &amax);
        s[j] = amax / (float)qmax;
    }
    const uint16_t dh = tn_wq_superscale(s, nsub, scmax, sc);
    const float d = tn_h2f(dh);
    for (int j = 0; j < nsub; j++)
        for (int l = 0; l < len; l++)
            q[j * len + l] = tn_qstep(x[j * len + l], 0.0f, d * (float)sc[j], -qmax, qmax);
    return dh;
}

static void tn_pack_k4_scales(const int *sc, const int *mn, uint8_t *s)
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
}

void tn_quantize_weight_row(int type, const float *x, void *dst, int64_t n)
{
    const int bs = tn_type_block(type);
    CM_ASSERT(tn_type_supported(type) && n >= 0 && n % bs == 0);
    const int64_t nb = n / bs;
    int q[TN_QK_K], sc[16], mn[16];

    switch (type) {
    case TN_F32:
    case TN_F16:
    case TN_BF16: tn_quantize_row(type, x, dst, n); return;
    case TN_Q4_0:
        for (int64_t i = 0; i < nb; i++, x += 32) {
            tn_block_q4_0 *y = (tn_block_q4_0 *)dst + i;
            tn_wq_sym32(x, &y->d, q, 7);
            for (int j = 0; j < 16; j++) y->qs[j] = (uint8_t)((q[j] + 8) | ((q[j + 16] + 8) << 4));
        }
        return;
    case TN_Q5_0:
        for (int64_t i = 0; i < nb; i++, x += 32) {
            tn_block_q5_0 *y = (tn_block_q5_0 *)dst + i;
            tn_wq_sym32(x, &y->d, q, 15);
            uint32_t qh = 0;
            for (int j = 0; j < 32; j++) qh |= (uint32_t)(((q[j] + 16) >> 4) & 1) << j;
            memcpy(y->qh, &qh, 4);
            for (int j = 0; j < 16; j++)
                y->qs[j] = (uint8_t)(((q[j] + 16) & 15) | (((q[j + 16] + 16) & 15) << 4));
        }
        return;
    case TN_Q8_0:
        for (int64_t i = 0; i < nb; i++, x += 32) {
            tn_block_q8_0 *y = (tn_block_q8_0 *)dst + i;
            tn_wq_sym32(x, &y->d, q, 127);
            for (int j = 0; j < 32; j++) y->qs[j] = (int8_t)q[j];
        }
        return;
    case TN_Q4_1:
        for (int64_t i = 0; i < nb; i++, x += 32) {
            tn_block_q4_1 *y = (tn_block_q4_1 *)dst + i;
            tn_wq_asym32(x, &y->d, &y->m, q, 15);
            for (int j = 0; j < 16; j++) y->qs[j] = (uint8_t)(q[j] | (q[j + 16] << 4));
        }
        return;
    case TN_Q5_1:
        for (int64_t i = 0; i < nb; i++, x += 32) {
            tn_block_q5_1 *y = (tn_block_q5_1 *)dst + i;
            tn_wq_asym32(x, &y->d, &y->m, q, 31);
            uint32_t qh = 0;
            for (int j = 0; j < 32; j++) qh |= (uint32_t)((q[j] >> 4) & 1) << j;
            memcpy(y->qh, &qh, 4);
            for (int j = 0; j < 16; j++) y->qs[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
        }
        return;
    case TN_Q2_K:
        for (int64_t i = 0; i < nb; i++, x += TN_QK_K) {
            tn_block_q2_K *y = (tn_block_q2_K *)dst + i;
            tn_wq_kmin(x, 16, 16, 3, 15, sc, mn, q, &y->d, &y->dmin);
            for (int k = 0; k < 16; k++) y->scales[k] = (uint8_t)(sc[k] | (mn[k] << 4));
            memset(y->qs, 0, sizeof(y->qs));
            for (int e = 0; e < TN_QK_K; e++)
                y->qs[32 * (e >> 7) + (e & 31)] |= (uint8_t)(q[e] << (2 * ((e >> 5) & 3)));
        }
        return;
    case TN_Q3_K:
        for (int64_t i = 0; i < nb; i++, x += TN_QK_K) {
            tn_block_q3_K *y = (tn_block_q3_K *)dst + i;
            y->d = tn_wq_ksym(x, 16, 16, 3, 31, sc, q);
            memset(y->scales, 0, sizeof(y->scales));
            for (int k = 0; k < 16; k++) {
                const int v = sc[k] + 32;
                y->scales[k & 7] |= (uint8_t)((v & 15) << (4 * (k >> 3)));
                y->scales[8 + (k & 3)] |= (uint8_t)((v >> 4) << (2 * (k >> 2)));
            }
            memset(y->qs, 0, sizeof(y->qs));
            memset(y->hmask, 0, sizeof(y->hmask));
            for (int e = 0; e < TN_QK_K; e++) {
                const int v = q[e] + 4; /* 1..7: bit 2 is the hmask bit (set = no -4) */
                y->qs[32 * (e >> 7) + (e & 31)] |= (uint8_t)((v & 3) << (2 * ((e >> 5) & 3)));
                y->hmask[e & 31] |= (uint8_t)(((v >> 2) & 1) << (e >> 5));
            }
        }
        return;
    case TN_Q4_K:
    case TN_Q5_K:
        for (int64_t i = 0; i < nb; i++, x += TN_QK_K) {
            const int q5 = type == TN_Q5_K;
            uint16_t d, dmin;
            tn_wq_kmin(x, 8, 32, q5 ? 31 : 15, 63, sc, mn, q, &d, &dmin);
            uint8_t *scales, *qs;
            if (q5) {
                tn_block_q5_K *y = (tn_block_q5_K *)dst + i;
                y->d = d;
                y->dmin = dmin;
                scales = y->scales;
                qs = y->qs;
                memset(y->qh, 0, sizeof(y->qh));
                for (int e = 0; e < TN_QK_K; e++)
                    y->qh[e & 31] |= (uint8_t)(((q[e] >> 4) & 1) << (e >> 5));
            } else {
                tn_block_q4_K *y = (tn_block_q4_K *)dst + i;
                y->d = d;
                y->dmin = dmin;
                scales = y->scales;
                qs = y->qs;
            }
            tn_pack_k4_scales(sc, mn, scales);
            memset(qs, 0, 128);
            for (int e = 0; e < TN_QK_K; e++)
                qs[32 * (e >> 6) + (e & 31)] |= (uint8_t)((q[e] & 15) << (4 * ((e >> 5) & 1)));
        }
        return;
    case TN_Q6_K:
        for (int64_t i = 0; i < nb; i++, x += TN_QK_K) {
            tn_block_q6_K *y = (tn_block_q6_K *)dst + i;
            y->d = tn_wq_ksym(x, 16, 16, 31, 127, sc, q);
            for (int k = 0; k < 16; k++) y->scales[k] = (int8_t)sc[k];
            memset(y->ql, 0, sizeof(y->ql));
            memset(y->qh, 0, sizeof(y->qh));
            for (int e = 0; e < TN_QK_K; e++) {
                const int g = e >> 7, o = e & 127, v = q[e] + 32;
                y->ql[64 * g + (o & 63)] |= (uint8_t)((v & 15) << (4 * (o >> 6)));
                y->qh[32 * g + (o & 31)] |= (uint8_t)((v >> 4) << (2 * (o >> 5)));
            }
        }
        return;
    default: CM_ABORT("tn_quantize_weight_row: unsupported type %d", type);
    }
}
