/*
 * tensor-dot-avx512.c — AVX-512 dot products for the hottest types (F32, F16, Q4_1, Q8_0).
 *
 * The library is built for the AVX2 baseline; these functions carry target attributes and are
 * only entered when tn_simd_init() saw avx512f/bw/vl at run time.
 *
 * Two flavours of the quantised kernels:
 *  - with AVX512-VNNI (Cascade Lake and later, Zen 4): 256-bit EVEX vpdpbusd does maddubs +
 *    madd in one instruction. Staying at 256 bits keeps port 1's vector ALU usable on Intel and
 *    measured fastest on a Sapphire Rapids host (Q4_1 n=576: ~31 ns vs ~35 ns for 512-bit).
 *  - without VNNI: 512-bit F/BW kernels, two 32-blocks per vector (one per 256-bit half) FMA'd
 *    with a scale vector whose halves hold the two blocks' scale products. BW has no vpsignb,
 *    so Q8_0's sign trick is a masked subtract.
 * Both convert four blocks' fp16 scales at once, like the AVX2 kernels.
 *
 * IHIP_TN_NO_VNNI=1 in the environment picks the non-VNNI flavour (to test it on VNNI CPUs).
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor-impl.h"

#if defined(__GNUC__) && defined(__x86_64__)

#define TN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define TN_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

TN_AVX512 static inline float tn_hsum16(__m512 v)
{
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return tn_hsum8(h);
}

TN_AVX512 static inline __m512i tn_cat256(__m256i lo, __m256i hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* ---- float types ------------------------------------------------------------------------- */

TN_AVX512 static float tn_dot_f32_avx512(int64_t n, const void *w, const void *a)
{
    const float *x = w, *y = a;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(y + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(y + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), s0);
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i), s1);
    }
    return tn_hsum16(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

TN_AVX512 static float tn_dot_f16_avx512(int64_t n, const void *w, const void *a)
{
    const uint16_t *x = w, *y = a;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
#define TN_LDH16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(TN_LDH16(x + i), TN_LDH16(y + i), s0);
        s1 = _mm512_fmadd_ps(TN_LDH16(x + i + 16), TN_LDH16(y + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(TN_LDH16(x + i), TN_LDH16(y + i), s0);
#undef TN_LDH16
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        const __m512 xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, x + i));
        const __m512 yv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, y + i));
        s1 = _mm512_fmadd_ps(xv, yv, s1);
    }
    return tn_hsum16(_mm512_add_ps(s0, s1));
}

/* ---- one-block tails (AVX2), shared by both flavours ------------------------------------ */

static inline __m256 tn_q8_0_block(const tn_block_q8_0 *x, const tn_block_q8_0 *y)
{
    const __m256i qx = _mm256_loadu_si256((const __m256i *)x->qs);
    const __m256i qy = _mm256_loadu_si256((const __m256i *)y->qs);
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(qx), _mm256_sign_epi8(qy, qx)),
                                        _mm256_set1_epi16(1));
    return _mm256_mul_ps(_mm256_set1_ps(tn_hmul(x->d, y->d)), _mm256_cvtepi32_ps(p));
}

/* d*d8*sumi in 8 lanes; *ms += m*s */
static inline __m256 tn_q4_1_block(const tn_block_q4_1 *x, const tn_block_q8_1 *y, float *ms)
{
    const __m256i p = _mm256_madd_epi16(
        _mm256_maddubs_epi16(tn_nibbles32(x->qs), _mm256_loadu_si256((const __m256i *)y->qs)),
        _mm256_set1_epi16(1));
    *ms += tn_hmul(x->m, y->s);
    return _mm256_mul_ps(_mm256_set1_ps(tn_hmul(x->d, y->d)), _mm256_cvtepi32_ps(p));
}

/* ---- VNNI flavour (256-bit) ---------------------------------------------------------------- */

TN_AVX512VNNI static float tn_dot_q8_0_vnni(int64_t n, const void *w, const void *a)
{
    const tn_block_q8_0 *x = w;
    const tn_block_q8_0 *y = a;
    const int64_t nb = n / 32;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m256 d = tn_hmul4(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d, y[i].d, y[i + 1].d,
                                  y[i + 2].d, y[i + 3].d);
        for (int k = 0; k < 4; k++) {
            const __m256i qx = _mm256_loadu_si256((const __m256i *)x[i + k].qs);
            const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i + k].qs);
            const __m256i p = _mm256_dpbusd_epi32(zero, _mm256_abs_epi8(qx), _mm256_sign_epi8(qy, qx));
            if (k & 1) acc1 = _mm256_fmadd_ps(tn_lane(d, k), _mm256_cvtepi32_ps(p), acc1);
            else acc0 = _mm256_fmadd_ps(tn_lane(d, k), _mm256_cvtepi32_ps(p), acc0);
        }
    }
    for (; i < nb; i++) acc0 = _mm256_add_ps(acc0, tn_q8_0_block(&x[i], &y[i]));
    return tn_hsum8(_mm256_add_ps(acc0, acc1));
}

TN_AVX512VNNI static float tn_dot_q4_1_vnni(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_1 *x = w;
    const tn_block_q8_1 *y = a;
    const int64_t nb = n / 32;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m256 ds = _mm256_mul_ps(tn_h2x4(&x[i].d, &x[i + 1].d, &x[i + 2].d, &x[i + 3].d),
                                        tn_h2x4(&y[i].d, &y[i + 1].d, &y[i + 2].d, &y[i + 3].d));
        accm = _mm256_add_ps(accm, ds);
        for (int k = 0; k < 4; k++) {
            const __m256i p = _mm256_dpbusd_epi32(zero, tn_nibbles32(x[i + k].qs),
                                                  _mm256_loadu_si256((const __m256i *)y[i + k].qs));
            if (k & 1) acc1 = _mm256_fmadd_ps(tn_lane(ds, 2 * k), _mm256_cvtepi32_ps(p), acc1);
            else acc0 = _mm256_fmadd_ps(tn_lane(ds, 2 * k), _mm256_cvtepi32_ps(p), acc0);
        }
    }
    float ms = 0.0f;
    for (; i < nb; i++) acc0 = _mm256_add_ps(acc0, tn_q4_1_block(&x[i], &y[i], &ms));
    return tn_hsum8(_mm256_add_ps(acc0, acc1)) + tn_hsum_odd(accm) + ms;
}

/* ---- F/BW flavour (512-bit) ---------------------------------------------------------------- */

/* sum over pairs of u (unsigned bytes) * s (signed bytes), widened to 16 int32 lanes */
TN_AVX512 static inline __m512i tn_dot_us512(__m512i u, __m512i s)
{
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}

TN_AVX512 static float tn_dot_q8_0_avx512(int64_t n, const void *w, const void *a)
{
    const tn_block_q8_0 *x = w;
    const tn_block_q8_0 *y = a;
    const int64_t nb = n / 32;
    const __m512i zero = _mm512_setzero_si512();
    /* scale lanes: blocks (0,1) and (2,3) of the four products in lanes 0..3 */
    const __m512i i01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i i23 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m512 d = _mm512_castps256_ps512(tn_hmul4(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d, y[i].d,
                                                         y[i + 1].d, y[i + 2].d, y[i + 3].d));
        for (int h = 0; h < 2; h++) {
            const int64_t b = i + 2 * h;
            const __m512i qx = tn_cat256(_mm256_loadu_si256((const __m256i *)x[b].qs),
                                         _mm256_loadu_si256((const __m256i *)x[b + 1].qs));
            const __m512i qy = tn_cat256(_mm256_loadu_si256((const __m256i *)y[b].qs),
                                         _mm256_loadu_si256((const __m256i *)y[b + 1].qs));
            const __m512i sy = _mm512_mask_sub_epi8(qy, _mm512_movepi8_mask(qx), zero, qy);
            const __m512i p = tn_dot_us512(_mm512_abs_epi8(qx), sy);
            const __m512 sc = _mm512_permutexvar_ps(h ? i23 : i01, d);
            if (h) acc1 = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc1);
            else acc0 = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc0);
        }
    }
    __m256 tail = _mm256_setzero_ps();
    for (; i < nb; i++) tail = _mm256_add_ps(tail, tn_q8_0_block(&x[i], &y[i]));
    return tn_hsum16(_mm512_add_ps(acc0, acc1)) + tn_hsum8(tail);
}

TN_AVX512 static float tn_dot_q4_1_avx512(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_1 *x = w;
    const tn_block_q8_1 *y = a;
    const int64_t nb = n / 32;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    /* the d*d8 products sit in even lanes of the tn_h2x4 product: blocks (0,1) and (2,3) */
    const __m512i i01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i i23 = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m256 ds = _mm256_mul_ps(tn_h2x4(&x[i].d, &x[i + 1].d, &x[i + 2].d, &x[i + 3].d),
                                        tn_h2x4(&y[i].d, &y[i + 1].d, &y[i + 2].d, &y[i + 3].d));
        accm = _mm256_add_ps(accm, ds);
        const __m512 dz = _mm512_castps256_ps512(ds);
        for (int h = 0; h < 2; h++) {
            const int64_t b = i + 2 * h;
            /* [x0 | x0 | x1 | x1] by broadcast loads, upper copy of each shifted: nibbles of
             * block b in the low 256 bits, of block b+1 in the high, in element order */
            __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x[b].qs));
            v = _mm512_mask_broadcast_i32x4(v, (__mmask16)0xff00, _mm_loadu_si128((const __m128i *)x[b + 1].qs));
            v = _mm512_and_si512(_mm512_mask_blend_epi64((__mmask8)0xcc, v, _mm512_srli_epi16(v, 4)), m4);
            const __m512i q8 = tn_cat256(_mm256_loadu_si256((const __m256i *)y[b].qs),
                                         _mm256_loadu_si256((const __m256i *)y[b + 1].qs));
            const __m512i p = tn_dot_us512(v, q8);
            const __m512 sc = _mm512_permutexvar_ps(h ? i23 : i01, dz);
            if (h) acc1 = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc1);
            else acc0 = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc0);
        }
    }
    float ms = 0.0f;
    __m256 tail = _mm256_setzero_ps();
    for (; i < nb; i++) tail = _mm256_add_ps(tail, tn_q4_1_block(&x[i], &y[i], &ms));
    return tn_hsum16(_mm512_add_ps(acc0, acc1)) + tn_hsum8(tail) + tn_hsum_odd(accm) + ms;
}

void tn_dot_table_avx512(tn_dot_fn t[TN_TYPE_MAX], bool vnni)
{
    t[TN_F32] = tn_dot_f32_avx512;
    t[TN_F16] = tn_dot_f16_avx512;
    t[TN_Q8_0] = vnni ? tn_dot_q8_0_vnni : tn_dot_q8_0_avx512;
    t[TN_Q4_1] = vnni ? tn_dot_q4_1_vnni : tn_dot_q4_1_avx512;
}

#else

void tn_dot_table_avx512(tn_dot_fn t[TN_TYPE_MAX], bool vnni)
{
    (void)t;
    (void)vnni;
}

#endif
