/*
 * tensor-impl.h — internals of the tensor module: GGUF block layouts, half-precision helpers and
 * the per-SIMD-level dot product tables that tensor-types.c dispatches through.
 *
 * Block structs mirror GGUF's on-disk blocks byte for byte (the _Static_asserts pin the sizes).
 * Every field is naturally aligned inside its block and every block size is even, so a row that
 * starts 2-byte aligned (4 for Q8_K) keeps all fields aligned; GGUF data is 32-byte aligned.
 */
#ifndef TN_TENSOR_IMPL_H
#define TN_TENSOR_IMPL_H

#include "tensor.h"

#include <math.h>
#include <string.h>

#define TN_QK4_0 32
#define TN_QK4_1 32
#define TN_QK5_0 32
#define TN_QK5_1 32
#define TN_QK8_0 32
#define TN_QK8_1 32
#define TN_K_SCALE_SIZE 12 /* 6-bit packed scales + mins of Q4_K / Q5_K */

typedef struct {
    uint16_t d;      /* fp16 scale */
    uint8_t qs[16];  /* element j: low nibble of qs[j]; element j+16: high nibble */
} tn_block_q4_0;

typedef struct {
    uint16_t d;      /* fp16 scale */
    uint16_t m;      /* fp16 minimum */
    uint8_t qs[16];  /* as Q4_0 */
} tn_block_q4_1;

typedef struct {
    uint16_t d;      /* fp16 scale */
    uint8_t qh[4];   /* bit j (little-endian u32) = 5th bit of element j */
    uint8_t qs[16];  /* low 4 bits as Q4_0 */
} tn_block_q5_0;

typedef struct {
    uint16_t d;      /* fp16 scale */
    uint16_t m;      /* fp16 minimum */
    uint8_t qh[4];
    uint8_t qs[16];
} tn_block_q5_1;

typedef struct {
    uint16_t d;      /* fp16 scale */
    int8_t qs[32];
} tn_block_q8_0;

typedef struct {
    uint16_t d;      /* fp16 scale */
    uint16_t s;      /* fp16 of d * sum(qs) */
    int8_t qs[32];
} tn_block_q8_1;

typedef struct {
    uint8_t scales[16]; /* per 16 elements: low nibble scale, high nibble min */
    uint8_t qs[64];     /* 2-bit quants: element 128g + 32s + l = bits 2s.. of qs[32g + l] */
    uint16_t d;         /* fp16 super-block scale of the scales */
    uint16_t dmin;      /* fp16 super-block scale of the mins */
} tn_block_q2_K;

typedef struct {
    uint8_t hmask[32];  /* element 32i + l: bit i of hmask[l]; set means no -4 offset */
    uint8_t qs[64];     /* low 2 bits, laid out as Q2_K */
    uint8_t scales[12]; /* 16 6-bit scales, biased by 32 */
    uint16_t d;         /* fp16 super-block scale */
} tn_block_q3_K;

typedef struct {
    uint16_t d;         /* fp16 super-block scale of the scales */
    uint16_t dmin;      /* fp16 super-block scale of the mins */
    uint8_t scales[TN_K_SCALE_SIZE]; /* 8 6-bit scales and 8 6-bit mins, one per 32 elements */
    uint8_t qs[128];    /* element 64g + 32s + l = nibble s of qs[32g + l] */
} tn_block_q4_K;

typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[TN_K_SCALE_SIZE];
    uint8_t qh[32];     /* element 32i + l: 5th bit = bit i of qh[l] */
    uint8_t qs[128];    /* low 4 bits as Q4_K */
} tn_block_q5_K;

typedef struct {
    uint8_t ql[128];    /* element 128g + 64s + l (l < 64): nibble s of ql[64g + l] */
    uint8_t qh[64];     /* element 128g + 32s + l (l < 32): bits 2s..2s+1 of qh[32g + l] */
    int8_t scales[16];  /* one per 16 elements */
    uint16_t d;         /* fp16 super-block scale */
} tn_block_q6_K;

typedef struct {
    float d;              /* scale (float, not fp16) */
    int8_t qs[TN_QK_K];
    int16_t bsums[TN_QK_K / 16]; /* sum of each 16 quants */
} tn_block_q8_K;

_Static_assert(sizeof(tn_block_q4_0) == 18, "q4_0 layout");
_Static_assert(sizeof(tn_block_q4_1) == 20, "q4_1 layout");
_Static_assert(sizeof(tn_block_q5_0) == 22, "q5_0 layout");
_Static_assert(sizeof(tn_block_q5_1) == 24, "q5_1 layout");
_Static_assert(sizeof(tn_block_q8_0) == 34, "q8_0 layout");
_Static_assert(sizeof(tn_block_q8_1) == 36, "q8_1 layout");
_Static_assert(sizeof(tn_block_q2_K) == 84, "q2_K layout");
_Static_assert(sizeof(tn_block_q3_K) == 110, "q3_K layout");
_Static_assert(sizeof(tn_block_q4_K) == 144, "q4_K layout");
_Static_assert(sizeof(tn_block_q5_K) == 176, "q5_K layout");
_Static_assert(sizeof(tn_block_q6_K) == 210, "q6_K layout");
_Static_assert(sizeof(tn_block_q8_K) == 292, "q8_K layout");

/* ---- half precision (software; F16C gives the same bits for every non-NaN input) --------- */

static inline uint32_t tn_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float tn_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline float tn_h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f) return tn_bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24 is exact in float */
        float v = (float)mant * (1.0f / 16777216.0f);
        return tn_bits_f32(sign | tn_f32_bits(v));
    }
    return tn_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

static inline uint16_t tn_f2h(float f)
{
    uint32_t x = tn_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | ((x >> 13) & 0x3ff)); /* quiet NaN */
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* ≥ 65520 rounds to inf */
    if (x < 0x38800000u) {
        /* below 2^-14: a half subnormal, m * 2^(e-126) units of 2^-24 */
        uint32_t e = x >> 23;
        if (e < 102) return sign; /* < 2^-25: rounds to zero (2^-25 itself ties to 0) */
        uint32_t m = (x & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((x >> 23) - 112) << 10 | ((x >> 13) & 0x3ff);
    uint32_t rem = x & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++; /* carry into the exponent is right */
    return (uint16_t)(sign | r);
}

static inline float tn_bf2f(uint16_t h) { return tn_bits_f32((uint32_t)h << 16); }

static inline uint16_t tn_f2bf(float f)
{
    uint32_t x = tn_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

/* Round half to even, what both x86's vroundps (nearest) and llama.cpp's nearest_int do. rintf
 * (default rounding mode) compiles to one vroundss; unlike the 1.5*2^23 addition trick, its
 * argument is always a rounded float, so no FMA contraction (-ffp-contract=fast in GNU C modes)
 * can fold a preceding multiply into it. */
static inline int tn_round_even(float x) { return (int)rintf(x); }

/* ---- dot products ----------------------------------------------------------------------- */

typedef tn_vec_dot_fn tn_dot_fn;

/* One table per SIMD level, indexed by weight type; NULL = fall back to the level below.
 * Filled by tn_dot_table_{scalar,avx2,avx512}() in the tensor-dot-*.c files; `vnni` picks the
 * AVX512-VNNI flavour of the AVX-512 kernels. */
void tn_dot_table_scalar(tn_dot_fn table[TN_TYPE_MAX]);
void tn_dot_table_avx2(tn_dot_fn table[TN_TYPE_MAX]);
typedef tn_vec_dot4_fn tn_dot4_fn;
/* Multi-activation kernels (AVX2) for the types that have one; others use a generic loop. */
void tn_dot4_table_avx2(tn_dot4_fn table[TN_TYPE_MAX]);
void tn_dot_table_avx512(tn_dot_fn table[TN_TYPE_MAX], bool vnni);

/* Unpack the 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block. */
static inline void tn_k4_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Unpack the 16 signed scales (-32..31) of a Q3_K super-block. */
static inline void tn_k3_scales(const uint8_t *s, int8_t out[16])
{
    for (int i = 0; i < 16; i++) {
        int lo = (s[i & 7] >> (4 * (i >> 3))) & 0x0f;
        int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 0x03;
        out[i] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

/* ---- AVX2 helpers shared by the AVX2 and AVX-512 kernels -------------------------------- */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

static inline uint32_t tn_ld32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline float tn_hsum8(__m256 v)
{
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 32 nibbles of 16 bytes: element j = low nibble of byte j, element j+16 = high nibble. The
 * 16 bytes are broadcast-loaded to both halves and the upper half shifted, which avoids a
 * lane-crossing insert (port 5 on Intel, already busy with the scale shuffles). */
static inline __m256i tn_nibbles32(const uint8_t *p)
{
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xf0),
                            _mm256_set1_epi8(0x0f));
}

/* The fp16 pairs at p0..p3 (4 bytes each, e.g. Q4_1's d,m) as [a0,b0,a1,b1,a2,b2,a3,b3]:
 * one conversion for four blocks instead of four. */
static inline __m256 tn_h2x4(const void *p0, const void *p1, const void *p2, const void *p3)
{
    __m128i h = _mm_cvtsi32_si128((int)tn_ld32(p0));
    h = _mm_insert_epi32(h, (int)tn_ld32(p1), 1);
    h = _mm_insert_epi32(h, (int)tn_ld32(p2), 2);
    h = _mm_insert_epi32(h, (int)tn_ld32(p3), 3);
    return _mm256_cvtph_ps(h);
}

/* Products a_k * b_k of four fp16 pairs in lanes 0..3 (upper lanes undefined). */
static inline __m256 tn_hmul4(uint16_t a0, uint16_t a1, uint16_t a2, uint16_t a3, uint16_t b0,
                              uint16_t b1, uint16_t b2, uint16_t b3)
{
    __m128i h = _mm_cvtsi32_si128(a0);
    h = _mm_insert_epi16(h, a1, 1);
    h = _mm_insert_epi16(h, a2, 2);
    h = _mm_insert_epi16(h, a3, 3);
    h = _mm_insert_epi16(h, b0, 4);
    h = _mm_insert_epi16(h, b1, 5);
    h = _mm_insert_epi16(h, b2, 6);
    h = _mm_insert_epi16(h, b3, 7);
    const __m256 f = _mm256_cvtph_ps(h);
    return _mm256_castps128_ps256(_mm_mul_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1)));
}

/* fp16 a times fp16 b, as a float. */
static inline float tn_hmul(uint16_t a, uint16_t b)
{
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)a | ((uint32_t)b << 16))));
    return _mm_cvtss_f32(_mm_mul_ss(v, _mm_movehdup_ps(v)));
}

/* Lane k of v in all 8 lanes. */
static inline __m256 tn_lane(__m256 v, int k) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(k)); }

/* Sum of the odd lanes of v (the m*s terms of tn_h2x4 products). */
static inline float tn_hsum_odd(__m256 v)
{
    return tn_hsum8(_mm256_and_ps(v, _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1))));
}
#endif

#endif /* TN_TENSOR_IMPL_H */
