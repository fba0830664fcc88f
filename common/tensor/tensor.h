/*
 * tensor.h — dtypes, dequantisation and the quantised dot products of the CPU matmul.
 *
 * Type ids are GGUF's (ggml's) numeric ids so a tensor's type read from a file is used as is.
 * Block formats follow GGUF's on-disk layout exactly (little-endian, packed).
 *
 * Matmul scheme (the same one llama.cpp uses, so our logits track its logits closely): a weight
 * row of type W is dotted with an activation row first quantised to tn_vec_dot_type(W):
 *   F32→F32, F16→F16, BF16→BF16, Q4_0/Q5_0/Q8_0→Q8_0, Q4_1/Q5_1→Q8_1, Q*_K→Q8_K.
 * tn_vec_dot() picks the fastest implementation this CPU supports (AVX-512, AVX2+FMA, scalar)
 * once at first use; tn_simd_force() pins one level for tests and benchmarks.
 *
 * Rows passed in must start 2-byte aligned (4 for F32 and Q8_K), as GGUF's 32-byte aligned
 * tensor data and row sizes guarantee; the kernels use unaligned vector loads otherwise.
 */
#ifndef TN_TENSOR_H
#define TN_TENSOR_H

#include "../base/cm.h"

#ifdef __cplusplus
extern "C" {
#endif

enum tn_type {
    TN_F32 = 0,
    TN_F16 = 1,
    TN_Q4_0 = 2,
    TN_Q4_1 = 3,
    TN_Q5_0 = 6,
    TN_Q5_1 = 7,
    TN_Q8_0 = 8,
    TN_Q8_1 = 9,
    TN_Q2_K = 10,
    TN_Q3_K = 11,
    TN_Q4_K = 12,
    TN_Q5_K = 13,
    TN_Q6_K = 14,
    TN_Q8_K = 15,
    TN_BF16 = 30,
    TN_TYPE_MAX = 64 /* ids at or above this are rejected outright */
};

#define TN_QK_K 256 /* super-block size of the K-quants */

/* Name of a type id ("Q4_K"), or NULL if the id is not a known GGUF type. Known-but-unsupported
 * types (e.g. IQ2_XXS) have a name but tn_type_supported() is false. */
CM_API const char *tn_type_name(int type);
/* Elements per block and bytes per block; 0 for unknown ids. */
CM_API int tn_type_block(int type);
CM_API size_t tn_type_size(int type);
/* true if we can dequantise this type and dot it (as weights). */
CM_API bool tn_type_supported(int type);
/* Bytes of a row of n elements; -1 if n is not a multiple of the block or the type unknown. */
CM_API int64_t tn_row_size(int type, int64_t n);

/* Half-precision conversions (round to nearest even). */
CM_API float tn_fp16_to_fp32(uint16_t h);
CM_API uint16_t tn_fp32_to_fp16(float f);
CM_API float tn_bf16_to_fp32(uint16_t h);
CM_API uint16_t tn_fp32_to_bf16(float f);

/* Dequantise n elements (a multiple of the block size) of a supported type into dst. */
CM_API void tn_dequant_row(int type, const void *src, float *dst, int64_t n);

/* The activation format a weight of `type` is dotted with (see above). */
CM_API int tn_vec_dot_type(int type);
/* Quantise n floats into an activation format (F32, F16, BF16, Q8_0, Q8_1 or Q8_K); n must be a
 * multiple of its block size. */
CM_API void tn_quantize_row(int act_type, const float *src, void *dst, int64_t n);
/* sum_i w[i] * a[i] over n elements: w a row of weight type `type`, a the same row quantised
 * with tn_quantize_row(tn_vec_dot_type(type), ...). */
CM_API float tn_vec_dot(int type, int64_t n, const void *w, const void *a);
/* The function tn_vec_dot would call for weight `type` at the current SIMD level (skips the
 * per-call dispatch in hot loops; re-fetch after tn_simd_force). NULL if the type has no dot. */
typedef float (*tn_vec_dot_fn)(int64_t n, const void *w, const void *a);
CM_API tn_vec_dot_fn tn_vec_dot_func(int type);
/* One weight row dotted with n_act (1..4) activation rows at a, a + a_stride, ... (bytes):
 * out[k] = tn_vec_dot(type, n, w, a_k) up to float summation order. Prefill's matmul uses it to
 * unpack each weight block once for several tokens. NULL when the type (or the SIMD level in
 * effect) has no such kernel: then call the single dot per activation row. */
typedef void (*tn_vec_dot4_fn)(int64_t n, const void *w, const void *a, size_t a_stride, int n_act,
                               float *out);
CM_API tn_vec_dot4_fn tn_vec_dot4_func(int type);

/* Quantise n floats into any supported weight type (a multiple of its block) with a plain
 * round-to-nearest quantiser — not llama.cpp's error-minimising search. For tests and synthetic
 * models; activation formats go through tn_quantize_row. */
CM_API void tn_quantize_weight_row(int type, const float *src, void *dst, int64_t n);

enum tn_simd { TN_SIMD_SCALAR = 0, TN_SIMD_AVX2 = 1, TN_SIMD_AVX512 = 2 };
/* The level tn_vec_dot uses now. */
CM_API int tn_simd_level(void);
CM_API const char *tn_simd_name(int level);
/* Force a level (clamped to what the CPU supports); returns the level in effect. */
CM_API int tn_simd_force(int level);

#ifdef __cplusplus
}
#endif
#endif /* TN_TENSOR_H */
