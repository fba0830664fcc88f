/*
 * tensor-types.c — the GGUF type table, half-precision conversions and the SIMD dispatch of
 * tn_vec_dot.
 *
 * The dispatch table is built once (pthread_once) from the scalar table overlaid with the AVX2
 * table and then the AVX-512 table, as far as the CPU supports them, so a type without a SIMD
 * kernel at some level silently uses the level below. The AVX-512 level uses the VNNI flavour
 * of its kernels when the CPU has avx512vnni (unless IHIP_TN_NO_VNNI=1, for testing).
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor-impl.h"

#include <pthread.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <immintrin.h>

/* ---- type table ------------------------------------------------------------------------- */

struct tn_type_info {
    const char *name; /* NULL: unknown / removed id */
    int block;        /* elements per block */
    size_t size;      /* bytes per block */
    bool supported;   /* dequantise + dot as weights */
    int dot_type;     /* activation type it is dotted with, -1 if none */
};

/* Ids 4, 5 (Q4_2, Q4_3), 31-33 (Q4_0_4_4...) and 36-38 (IQ4_NL_4_4...) were removed from ggml
 * and never appear in valid GGUF files, so they read as unknown. */
static const struct tn_type_info tn_types[TN_TYPE_MAX] = {
    [TN_F32] = {"F32", 1, 4, true, TN_F32},
    [TN_F16] = {"F16", 1, 2, true, TN_F16},
    [TN_Q4_0] = {"Q4_0", 32, 18, true, TN_Q8_0},
    [TN_Q4_1] = {"Q4_1", 32, 20, true, TN_Q8_1},
    [TN_Q5_0] = {"Q5_0", 32, 22, true, TN_Q8_0},
    [TN_Q5_1] = {"Q5_1", 32, 24, true, TN_Q8_1},
    [TN_Q8_0] = {"Q8_0", 32, 34, true, TN_Q8_0},
    [TN_Q8_1] = {"Q8_1", 32, 36, false, -1},
    [TN_Q2_K] = {"Q2_K", 256, 84, true, TN_Q8_K},
    [TN_Q3_K] = {"Q3_K", 256, 110, true, TN_Q8_K},
    [TN_Q4_K] = {"Q4_K", 256, 144, true, TN_Q8_K},
    [TN_Q5_K] = {"Q5_K", 256, 176, true, TN_Q8_K},
    [TN_Q6_K] = {"Q6_K", 256, 210, true, TN_Q8_K},
    [TN_Q8_K] = {"Q8_K", 256, 292, false, -1},
    [16] = {"IQ2_XXS", 256, 66, false, -1},
    [17] = {"IQ2_XS", 256, 74, false, -1},
    [18] = {"IQ3_XXS", 256, 98, false, -1},
    [19] = {"IQ1_S", 256, 50, false, -1},
    [20] = {"IQ4_NL", 32, 18, false, -1},
    [21] = {"IQ3_S", 256, 110, false, -1},
    [22] = {"IQ2_S", 256, 82, false, -1},
    [23] = {"IQ4_XS", 256, 136, false, -1},
    [24] = {"I8", 1, 1, false, -1},
    [25] = {"I16", 1, 2, false, -1},
    [26] = {"I32", 1, 4, false, -1},
    [27] = {"I64", 1, 8, false, -1},
    [28] = {"F64", 1, 8, false, -1},
    [29] = {"IQ1_M", 256, 56, false, -1},
    [TN_BF16] = {"BF16", 1, 2, true, TN_BF16},
    [34] = {"TQ1_0", 256, 54, false, -1},
    [35] = {"TQ2_0", 256, 66, false, -1},
    [39] = {"MXFP4", 32, 17, false, -1},
};

static const struct tn_type_info *tn_info(int type)
{
    if (type < 0 || type >= TN_TYPE_MAX || !tn_types[type].name) return NULL;
    return &tn_types[type];
}

const char *tn_type_name(int type)
{
    const struct tn_type_info *t = tn_info(type);
    return t ? t->name : NULL;
}

int tn_type_block(int type)
{
    const struct tn_type_info *t = tn_info(type);
    return t ? t->block : 0;
}

size_t tn_type_size(int type)
{
    const struct tn_type_info *t = tn_info(type);
    return t ? t->size : 0;
}

bool tn_type_supported(int type)
{
    const struct tn_type_info *t = tn_info(type);
    return t && t->supported;
}

int64_t tn_row_size(int type, int64_t n)
{
    const struct tn_type_info *t = tn_info(type);
    if (!t || n < 0 || n % t->block != 0) return -1;
    int64_t blocks = n / t->block;
    if (blocks > INT64_MAX / (int64_t)t->size) return -1;
    return blocks * (int64_t)t->size;
}

int tn_vec_dot_type(int type)
{
    const struct tn_type_info *t = tn_info(type);
    return t ? t->dot_type : -1;
}

/* ---- half precision ---------------------------------------------------------------------- */

/* F16C for finite values (one instruction; the KV cache converts per element); inf/NaN keep
 * their payload bits through the software path, as numpy does (vcvtph2ps would quiet them). */
float tn_fp16_to_fp32(uint16_t h) { return (h & 0x7c00) != 0x7c00 ? _cvtsh_ss(h) : tn_h2f(h); }
uint16_t tn_fp32_to_fp16(float f) { return tn_f2h(f); }
float tn_bf16_to_fp32(uint16_t h) { return tn_bf2f(h); }
uint16_t tn_fp32_to_bf16(float f) { return tn_f2bf(f); }

/* ---- SIMD dispatch ----------------------------------------------------------------------- */

static pthread_once_t tn_once = PTHREAD_ONCE_INIT;
static int tn_cpu_level;                 /* best level the CPU supports */
static _Atomic int tn_level;             /* level in effect */
static tn_dot_fn tn_dots[3][TN_TYPE_MAX]; /* per level, already overlaid */
static tn_dot4_fn tn_dot4s[TN_TYPE_MAX];  /* AVX2 multi-activation kernels (AVX2 and above) */

static void tn_simd_init(void)
{
    tn_dot_fn t[TN_TYPE_MAX];

    memset(t, 0, sizeof(t));
    tn_dot_table_scalar(t);
    memcpy(tn_dots[TN_SIMD_SCALAR], t, sizeof(t));

    tn_dot_fn over[TN_TYPE_MAX];
    memset(over, 0, sizeof(over));
    tn_dot_table_avx2(over);
    for (int i = 0; i < TN_TYPE_MAX; i++)
        if (over[i]) t[i] = over[i];
    memcpy(tn_dots[TN_SIMD_AVX2], t, sizeof(t));
    tn_dot4_table_avx2(tn_dot4s);

    __builtin_cpu_init();
    const char *no_vnni = getenv("IHIP_TN_NO_VNNI");
    const bool vnni = __builtin_cpu_supports("avx512vnni") && !(no_vnni && no_vnni[0] == '1');
    memset(over, 0, sizeof(over));
    tn_dot_table_avx512(over, vnni);
    for (int i = 0; i < TN_TYPE_MAX; i++)
        if (over[i]) t[i] = over[i];
    memcpy(tn_dots[TN_SIMD_AVX512], t, sizeof(t));

    int level = TN_SIMD_SCALAR;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        level = TN_SIMD_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl"))
            level = TN_SIMD_AVX512;
    }
    tn_cpu_level = level;
    atomic_store(&tn_level, level);
}

tn_vec_dot4_fn tn_vec_dot4_func(int type)
{
    if (type < 0 || type >= TN_TYPE_MAX || tn_simd_level() < TN_SIMD_AVX2) return NULL;
    return tn_dot4s[type];
}

int tn_simd_level(void)
{
    pthread_once(&tn_once, tn_simd_init);
    return atomic_load_explicit(&tn_level, memory_order_relaxed);
}

const char *tn_simd_name(int level)
{
    switch (level) {
    case TN_SIMD_SCALAR: return "scalar";
    case TN_SIMD_AVX2: return "avx2";
    case TN_SIMD_AVX512: return "avx512";
    default: return "unknown";
    }
}

int tn_simd_force(int level)
{
    pthread_once(&tn_once, tn_simd_init);
    if (level < TN_SIMD_SCALAR) level = TN_SIMD_SCALAR;
    if (level > tn_cpu_level) level = tn_cpu_level;
    atomic_store(&tn_level, level);
    return level;
}

tn_vec_dot_fn tn_vec_dot_func(int type)
{
    int level = tn_simd_level();
    if (type < 0 || type >= TN_TYPE_MAX) return NULL;
    return tn_dots[level][type];
}

float tn_vec_dot(int type, int64_t n, const void *w, const void *a)
{
    int level = tn_simd_level();
    CM_ASSERT(type >= 0 && type < TN_TYPE_MAX && tn_dots[level][type]);
    CM_ASSERT(n % tn_types[type].block == 0);
    return tn_dots[level][type](n, w, a);
}
