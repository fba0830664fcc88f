/*
 * attn-prefill.cuh — the tensor-core prefill kernel (attn-prefill.cu) used by cuda_attn_dense
 * and cuda_hip_bsa when n_tok > 1, and the tensor-core BSA decode kernel (attn-decode-mma.cu)
 * used by cuda_hip_bsa when n_tok == 1. Not a public header.
 *
 * It walks the same key lists as the fp32 kernel of attn-kernels.cuh (ak_bsa_block, ak_bsa_key,
 * ak_valid) with bf16 mma.sync tiles; see attn-prefill.cu for the design and fragment layouts.
 * Environment IHIP_ATTN_PREFILL=fp32 selects the fp32 FMA kernel instead (comparison and
 * fallback); unset or "mma" selects the tensor-core kernel.
 */
#ifndef ATTN_PREFILL_CUH
#define ATTN_PREFILL_CUH

#include "attn-kernels.cuh"

enum { AK_PF_MMA = 0, AK_PF_FP32 = 1 };

/* Which prefill kernel to use, from IHIP_ATTN_PREFILL (read on every call). */
int ak_prefill_mode(void);

/* Launch the tensor-core prefill over all n_tok queries of P (dense != 0: causal dense list;
 * else the BSA list of P.idx/P.ks). P comes from ak_setup (d 64 or 128, G <= 8); -ENOTSUP for
 * NEOX RoPE over part of the head (n_rot < d): the caller then uses the fp32 kernel. */
int ak_prefill_mma(const attn_params *P, int dense, cudaStream_t st);

/* BSA decode (n_tok 1) on tensor cores (attn-decode-mma.cu) over n_keys (an upper bound of the
 * list length); -ENOTSUP when the shape is not supported (d other than 64/128, G > 8, NEOX RoPE
 * or n_rot < d): the caller then uses the fp32 kernel. */
int ak_bsa_decode_mma(attn_params *P, long long n_keys, cuda_hip_work *w, cudaStream_t st);

#endif /* ATTN_PREFILL_CUH */
