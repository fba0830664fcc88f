/*
 * tensor-dot-avx2.c — AVX2 + FMA + F16C dot products (the library's baseline ISA).
 *
 * Integer blocks use the maddubs/madd pair: _mm256_maddubs_epi16 multiplies unsigned bytes by
 * signed bytes and adds neighbours into int16 — never saturating, since the unsigned side is a
 * 4..6-bit quant, or |x| <= 128 for Q8_0 whose sign moves onto the activation (2*128*127 <
 * 32767) — and _mm256_madd_epi16 against ones (or the sub-block scales) widens to int32. A
 * block's int32 lanes are converted to float once and FMA'd with the block's scale product, as
 * in the scalar reference.
 *
 * The 32-blocks of decode's hot types (Q4_0, Q4_1, Q8_0) go four at a time: their fp16 scales
 * convert in one instruction and each block's product is broadcast with vpermps. Per-block
 * scalar conversions had made ports 0/1 the bottleneck on Intel (about 20% slower); the nibble
 * unpack uses a broadcast load + blend for the same reason. Two accumulators hide FMA latency.
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor-impl.h"

/* Two adjacent fp16 values (d, m) or (d, s) as floats in lanes 0 and 1. */
static inline __m128 tn_h2x2(const void *p) { return _mm_cvtph_ps(_mm_cvtsi32_si128((int)tn_ld32(p))); }

/* 32 bits to 32 bytes: byte j = 0x10 if bit j of x is set, else 0. */
static inline __m256i tn_bits32(uint32_t x)
{
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL,
                                            0x0202020202020202LL, 0x0303030303030303LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* Sum over pairs of unsigned u (0..255) times signed s, widened: 8 int32 lanes. */
static inline __m256i tn_dot_us(__m256i u, __m256i s)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* Signed x signed bytes (|x| <= 128, |y| <= 127): move x's sign onto y. */
static inline __m256i tn_dot_ss(__m256i x, __m256i y)
{
    return tn_dot_us(_mm256_abs_epi8(x), _mm256_sign_epi8(y, x));
}

/* ---- float types ------------------------------------------------------------------------- */

static float tn_dot_f32_avx2(int64_t n, const void *w, const void *a)
{
    const float *x = w, *y = a;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
    float s = tn_hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

static float tn_dot_f16_avx2(int64_t n, const void *w, const void *a)
{
    const uint16_t *x = w, *y = a;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define TN_LDH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(TN_LDH(x + i), TN_LDH(y + i), s0);
        s1 = _mm256_fmadd_ps(TN_LDH(x + i + 8), TN_LDH(y + i + 8), s1);
        s2 = _mm256_fmadd_ps(TN_LDH(x + i + 16), TN_LDH(y + i + 16), s2);
        s3 = _mm256_fmadd_ps(TN_LDH(x + i + 24), TN_LDH(y + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(TN_LDH(x + i), TN_LDH(y + i), s0);
#undef TN_LDH
    float s = tn_hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += tn_h2f(x[i]) * tn_h2f(y[i]);
    return s;
}

static inline __m256 tn_ldbf(const uint16_t *p)
{
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static float tn_dot_bf16_avx2(int64_t n, const void *w, const void *a)
{
    const uint16_t *x = w, *y = a;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(tn_ldbf(x + i), tn_ldbf(y + i), s0);
        s1 = _mm256_fmadd_ps(tn_ldbf(x + i + 8), tn_ldbf(y + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(tn_ldbf(x + i), tn_ldbf(y + i), s0);
    float s = tn_hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += tn_bf2f(x[i]) * tn_bf2f(y[i]);
    return s;
}

/* ---- 32-blocks ----------------------------------------------------------------------------- */

/* Q8_0 x Q8_0 and Q4_0 x Q8_0 share the loop: four blocks per step, their eight fp16 scales
 * converted at once and each block's product broadcast with vpermps. */
static inline __m256i tn_q8_0_sumi(const tn_block_q8_0 *x, const tn_block_q8_0 *y)
{
    return tn_dot_ss(_mm256_loadu_si256((const __m256i *)x->qs), _mm256_loadu_si256((const __m256i *)y->qs));
}

static inline __m256i tn_q4_0_sumi(const tn_block_q4_0 *x, const tn_block_q8_0 *y)
{
    const __m256i q = _mm256_sub_epi8(tn_nibbles32(x->qs), _mm256_set1_epi8(8));
    return tn_dot_ss(q, _mm256_loadu_si256((const __m256i *)y->qs));
}

#define TN_DOT_D_LOOP(SUMI)                                                                    \
    const int64_t nb = n / 32;                                                                 \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                             \
    int64_t i = 0;                                                                             \
    for (; i + 4 <= nb; i += 4) {                                                              \
        const __m256 d = tn_hmul4(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d, y[i].d,          \
                                  y[i + 1].d, y[i + 2].d, y[i + 3].d);                         \
        acc0 = _mm256_fmadd_ps(tn_lane(d, 0), _mm256_cvtepi32_ps(SUMI(&x[i], &y[i])), acc0);   \
        acc1 = _mm256_fmadd_ps(tn_lane(d, 1), _mm256_cvtepi32_ps(SUMI(&x[i + 1], &y[i + 1])), acc1); \
        acc0 = _mm256_fmadd_ps(tn_lane(d, 2), _mm256_cvtepi32_ps(SUMI(&x[i + 2], &y[i + 2])), acc0); \
        acc1 = _mm256_fmadd_ps(tn_lane(d, 3), _mm256_cvtepi32_ps(SUMI(&x[i + 3], &y[i + 3])), acc1); \
    }                                                                                          \
    for (; i < nb; i++)                                                                        \
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(tn_hmul(x[i].d, y[i].d)),                        \
                               _mm256_cvtepi32_ps(SUMI(&x[i], &y[i])), acc0);                  \
    return tn_hsum8(_mm256_add_ps(acc0, acc1))

static float tn_dot_q8_0_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q8_0 *x = w;
    const tn_block_q8_0 *y = a;
    TN_DOT_D_LOOP(tn_q8_0_sumi);
}

static float tn_dot_q4_0_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_0 *x = w;
    const tn_block_q8_0 *y = a;
    TN_DOT_D_LOOP(tn_q4_0_sumi);
}

/* Q4_1 x Q8_1: four blocks per step; (d, m) of the weights and (d, s) of the activations
 * convert as two vectors, whose product holds d*d8 in even lanes and m*s in odd lanes. */
static float tn_dot_q4_1_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_1 *x = w;
    const tn_block_q8_1 *y = a;
    const int64_t nb = n / 32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
#define TN_Q4_1_SUMI(k)                                                                        \
    _mm256_cvtepi32_ps(tn_dot_us(tn_nibbles32(x[i + (k)].qs), _mm256_loadu_si256((const __m256i *)y[i + (k)].qs)))
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m256 ds = _mm256_mul_ps(tn_h2x4(&x[i].d, &x[i + 1].d, &x[i + 2].d, &x[i + 3].d),
                                        tn_h2x4(&y[i].d, &y[i + 1].d, &y[i + 2].d, &y[i + 3].d));
        accm = _mm256_add_ps(accm, ds);
        acc0 = _mm256_fmadd_ps(tn_lane(ds, 0), TN_Q4_1_SUMI(0), acc0);
        acc1 = _mm256_fmadd_ps(tn_lane(ds, 2), TN_Q4_1_SUMI(1), acc1);
        acc0 = _mm256_fmadd_ps(tn_lane(ds, 4), TN_Q4_1_SUMI(2), acc0);
        acc1 = _mm256_fmadd_ps(tn_lane(ds, 6), TN_Q4_1_SUMI(3), acc1);
    }
    __m128 accm1 = _mm_setzero_ps();
    for (; i < nb; i++) {
        const __m128 ds = _mm_mul_ps(tn_h2x2(&x[i].d), tn_h2x2(&y[i].d));
        accm1 = _mm_add_ps(accm1, ds);
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(ds), TN_Q4_1_SUMI(0), acc0);
    }
#undef TN_Q4_1_SUMI
    return tn_hsum8(_mm256_add_ps(acc0, acc1)) + tn_hsum_odd(accm) + _mm_cvtss_f32(_mm_movehdup_ps(accm1));
}

static float tn_dot_q5_0_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q5_0 *x = w;
    const tn_block_q8_0 *y = a;
    const int64_t nb = n / 32;
    const __m256i off = _mm256_set1_epi8(16);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i q = _mm256_or_si256(tn_nibbles32(x[i].qs), tn_bits32(tn_ld32(x[i].qh)));
        q = _mm256_sub_epi8(q, off);
        const __m256i p = tn_dot_ss(q, _mm256_loadu_si256((const __m256i *)y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(tn_hmul(x[i].d, y[i].d)), _mm256_cvtepi32_ps(p), acc);
    }
    return tn_hsum8(acc);
}

static float tn_dot_q5_1_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q5_1 *x = w;
    const tn_block_q8_1 *y = a;
    const int64_t nb = n / 32;
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256i q = _mm256_or_si256(tn_nibbles32(x[i].qs), tn_bits32(tn_ld32(x[i].qh)));
        const __m256i p = tn_dot_us(q, _mm256_loadu_si256((const __m256i *)y[i].qs));
        const __m128 ds = _mm_mul_ps(tn_h2x2(&x[i].d), tn_h2x2(&y[i].d));
        accm = _mm_add_ps(accm, ds);
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(ds), _mm256_cvtepi32_ps(p), acc);
    }
    return tn_hsum8(acc) + _mm_cvtss_f32(_mm_movehdup_ps(accm));
}

/* ---- K-quants ---------------------------------------------------------------------------- */

/* The 8 scales and 8 mins of a Q4_K / Q5_K super-block as bytes (scales in sc[0..7]). */
static inline void tn_k4_unpack(const uint8_t *s, uint8_t sc[8], uint8_t mn[8])
{
    const uint32_t u0 = tn_ld32(s), u1 = tn_ld32(s + 4), u2 = tn_ld32(s + 8);
    const uint32_t v[4] = {
        u0 & 0x3f3f3f3fu,
        (u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4),
        u1 & 0x3f3f3f3fu,
        ((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4),
    };
    memcpy(sc, v, 8);
    memcpy(mn, v + 2, 8);
}

/* 8 mins times the Q8_K bsums (summed in pairs): 8 int32 lanes whose total is sum(mn*bsum). */
static inline __m256i tn_k4_mins(const uint8_t mn[8], const int16_t *bsums)
{
    const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mn));
    const __m256i m2 = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
    return _mm256_madd_epi16(m2, _mm256_loadu_si256((const __m256i *)bsums));
}

static float tn_dot_q4_K_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_K *x = w;
    const tn_block_q8_K *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        uint8_t sc[8], mn[8];
        tn_k4_unpack(x[i].scales, sc, mn);
        const float yd = y[i].d;
        const __m256i mins = tn_k4_mins(mn, y[i].bsums);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * j));
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            __m256i pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j)));
            __m256i ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j + 32)));
            pl = _mm256_madd_epi16(pl, _mm256_set1_epi16(sc[2 * j]));
            ph = _mm256_madd_epi16(ph, _mm256_set1_epi16(sc[2 * j + 1]));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(tn_h2f(x[i].d) * yd), _mm256_cvtepi32_ps(sumi), acc);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(tn_h2f(x[i].dmin) * yd), _mm256_cvtepi32_ps(mins), accm);
    }
    return tn_hsum8(acc) - tn_hsum8(accm);
}

static float tn_dot_q5_K_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q5_K *x = w;
    const tn_block_q8_K *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        uint8_t sc[8], mn[8];
        tn_k4_unpack(x[i].scales, sc, mn);
        const float yd = y[i].d;
        const __m256i mins = tn_k4_mins(mn, y[i].bsums);
        __m256i hb = _mm256_loadu_si256((const __m256i *)x[i].qh);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * j));
            __m256i lo = _mm256_and_si256(q, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
            hb = _mm256_srli_epi16(hb, 1);
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
            hb = _mm256_srli_epi16(hb, 1);
            __m256i pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j)));
            __m256i ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j + 32)));
            pl = _mm256_madd_epi16(pl, _mm256_set1_epi16(sc[2 * j]));
            ph = _mm256_madd_epi16(ph, _mm256_set1_epi16(sc[2 * j + 1]));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(tn_h2f(x[i].d) * yd), _mm256_cvtepi32_ps(sumi), acc);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(tn_h2f(x[i].dmin) * yd), _mm256_cvtepi32_ps(mins), accm);
    }
    return tn_hsum8(acc) - tn_hsum8(accm);
}

/* vpshufb controls: byte k eight times, then byte k+1 eight times (k = 0, 2, ..., 14) — the
 * int16 scale vector of a 32-element maddubs result that spans two 16-element sub-blocks */
static const uint8_t tn_pick2[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
    {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

/* Scales k, k+1 (k = 2*pair) of 16 signed bytes as int16 [k x8 | k+1 x8]. */
static inline __m256i tn_scale_pair(__m128i sc8, int pair)
{
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_loadu_si128((const __m128i *)tn_pick2[pair])));
}

static float tn_dot_q2_K_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q2_K *x = w;
    const tn_block_q8_K *y = a;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)x[i].scales);
        const __m128i sc8 = _mm_and_si128(raw, m4);                     /* 0..15 */
        const __m128i mn8 = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);  /* 0..15 */
        const __m256i mins = _mm256_madd_epi16(_mm256_cvtepu8_epi16(mn8),
                                               _mm256_loadu_si256((const __m256i *)y[i].bsums));
        __m256i sumi = _mm256_setzero_si256();
        for (int g = 0; g < 2; g++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * g));
            for (int s = 0; s < 4; s++) {
                const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m3);
                const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 128 * g + 32 * s));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q2, q8),
                                                                tn_scale_pair(sc8, 4 * g + s)));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * tn_h2f(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * tn_h2f(x[i].dmin)), _mm256_cvtepi32_ps(mins), accm);
    }
    return tn_hsum8(acc) - tn_hsum8(accm);
}

/* The 16 signed scales of a Q3_K super-block: low nibbles from bytes 0..7 (scale i < 8: low
 * nibble of byte i, i >= 8: high nibble of byte i-8), 2 high bits from bytes 8..11 (scale i:
 * bits 2*(i/4) of byte 8 + i%4), biased by 32. Whole 32-bit words at a time. */
static inline __m128i tn_k3_scales16(const uint8_t *s)
{
    const uint32_t a0 = tn_ld32(s), a1 = tn_ld32(s + 4), h = tn_ld32(s + 8);
    const uint32_t m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    const __m128i v = _mm_setr_epi32((int)((a0 & m4) | ((h & m2) << 4)), (int)((a1 & m4) | (((h >> 2) & m2) << 4)),
                                     (int)(((a0 >> 4) & m4) | (((h >> 4) & m2) << 4)),
                                     (int)(((a1 >> 4) & m4) | (((h >> 6) & m2) << 4)));
    return _mm_sub_epi8(v, _mm_set1_epi8(32));
}

/* Q3_K: q = low2 - 4*(1 - hbit); maddubs needs unsigned, so dot (q + 4) = low2 + 4*hbit and
 * take 4 * sum(scale_k * bsum_k) off afterwards. */
static float tn_dot_q3_K_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q3_K *x = w;
    const tn_block_q8_K *y = a;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        const __m128i sc8 = tn_k3_scales16(x[i].scales);
        const __m256i corr = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8),
                                               _mm256_loadu_si256((const __m256i *)y[i].bsums));
        const __m256i hm = _mm256_loadu_si256((const __m256i *)x[i].hmask);
        __m256i sumi = _mm256_setzero_si256();
        for (int g = 0; g < 2; g++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * g));
            for (int s = 0; s < 4; s++) {
                const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * g + s), one);
                const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m3),
                                                   _mm256_slli_epi16(hb, 2));
                const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 128 * g + 32 * s));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q3, q8),
                                                                tn_scale_pair(sc8, 4 * g + s)));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(corr, 2));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(tn_h2f(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return tn_hsum8(acc);
}

static float tn_dot_q6_K_avx2(int64_t n, const void *w, const void *a)
{
    const tn_block_q6_K *x = w;
    const tn_block_q8_K *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[i].scales);
        /* sum(scale_k * 32 * bsum_k): the -32 offset of every quant, taken out at once */
        const __m256i corr = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8),
                                               _mm256_loadu_si256((const __m256i *)y[i].bsums));
        __m256i sumi = _mm256_setzero_si256();
        for (int g = 0; g < 2; g++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(x[i].ql + 64 * g));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(x[i].ql + 64 * g + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(x[i].qh + 32 * g));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m2));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
            for (int s = 0; s < 4; s++) {
                const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 128 * g + 32 * s));
                const __m256i scv = tn_scale_pair(sc8, 4 * g + s);
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[s], q8), scv);
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(corr, 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(tn_h2f(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return tn_hsum8(acc);
}

void tn_dot_table_avx2(tn_dot_fn t[TN_TYPE_MAX])
{
    t[TN_F32] = tn_dot_f32_avx2;
    t[TN_F16] = tn_dot_f16_avx2;
    t[TN_BF16] = tn_dot_bf16_avx2;
    t[TN_Q4_0] = tn_dot_q4_0_avx2;
    t[TN_Q4_1] = tn_dot_q4_1_avx2;
    t[TN_Q5_0] = tn_dot_q5_0_avx2;
    t[TN_Q5_1] = tn_dot_q5_1_avx2;
    t[TN_Q8_0] = tn_dot_q8_0_avx2;
    t[TN_Q2_K] = tn_dot_q2_K_avx2;
    t[TN_Q3_K] = tn_dot_q3_K_avx2;
    t[TN_Q4_K] = tn_dot_q4_K_avx2;
    t[TN_Q5_K] = tn_dot_q5_K_avx2;
    t[TN_Q6_K] = tn_dot_q6_K_avx2;
}

/* ---- one weight row × up to 4 activation rows (prefill) ----------------------------------- */
/*
 * Prefill multiplies every weight row with many tokens: unpacking a row's quants and loading its
 * scales once per block for 4 tokens instead of once per token saves a third of the work of
 * the hot Q4_1 and Q8_0 kernels. Results equal tn_vec_dot's up to float summation order.
 */
#define TN_X4_ACT(t) ((const void *)((const char *)a + (size_t)(t) * a_stride))

static void tn_dot4_q4_1_avx2(int64_t n, const void *w, const void *a, size_t a_stride, int n_act,
                              float *out)
{
    const tn_block_q4_1 *x = w;
    const tn_block_q8_1 *y[4];
    __m256 acc[4];
    float accm[4] = {0, 0, 0, 0};
    for (int t = 0; t < 4; t++) {
        y[t] = TN_X4_ACT(t < n_act ? t : 0);
        acc[t] = _mm256_setzero_ps();
    }
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; i++) {
        const __m256i q = tn_nibbles32(x[i].qs);
        const __m128 dm = tn_h2x2(&x[i].d); /* d, m */
        const float wd = _mm_cvtss_f32(dm), wm = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        for (int t = 0; t < 4; t++) {
            const __m128 ds = tn_h2x2(&y[t][i].d); /* d, s */
            const __m256i p = tn_dot_us(q, _mm256_loadu_si256((const __m256i *)y[t][i].qs));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(wd * _mm_cvtss_f32(ds)), _mm256_cvtepi32_ps(p), acc[t]);
            accm[t] += wm * _mm_cvtss_f32(_mm_movehdup_ps(ds));
        }
    }
    for (int t = 0; t < n_act; t++) out[t] = tn_hsum8(acc[t]) + accm[t];
}

static void tn_dot4_q8_0_avx2(int64_t n, const void *w, const void *a, size_t a_stride, int n_act,
                              float *out)
{
    const tn_block_q8_0 *x = w;
    const tn_block_q8_0 *y[4];
    __m256 acc[4];
    for (int t = 0; t < 4; t++) {
        y[t] = TN_X4_ACT(t < n_act ? t : 0);
        acc[t] = _mm256_setzero_ps();
    }
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; i++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i aq = _mm256_abs_epi8(q);
        const float wd = tn_fp16_to_fp32(x[i].d);
        for (int t = 0; t < 4; t++) {
            const __m256i p = tn_dot_us(aq, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)y[t][i].qs), q));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(wd * tn_fp16_to_fp32(y[t][i].d)), _mm256_cvtepi32_ps(p), acc[t]);
        }
    }
    for (int t = 0; t < n_act; t++) out[t] = tn_hsum8(acc[t]);
}
#undef TN_X4_ACT

void tn_dot4_table_avx2(tn_dot4_fn table[TN_TYPE_MAX])
{
    table[TN_Q4_1] = tn_dot4_q4_1_avx2;
    table[TN_Q8_0] = tn_dot4_q8_0_avx2;
}
