/*
 * model-impl.cuh — internals shared by model-load.cu and model-forward.cu (not a public header).
 */
#ifndef CUDA_MODEL_IMPL_CUH
#define CUDA_MODEL_IMPL_CUH

#include "cuda-hip-impl.h"
#include "cuda-model.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

typedef __nv_bfloat16 bf16;

/* One layer on the GPU. Matrices are row-major [n_out][n_in] bf16 like GGUF's rows; fused:
 * wqkv = Wq ‖ Wk ‖ Wv (rows), wgu = Wgate ‖ Wup (rows), so one GEMM computes q, k, v (and one
 * gate, up). */
struct cuda_layer {
    float *attn_norm; /* [n_embd] */
    float *ffn_norm;  /* [n_embd] */
    bf16 *wqkv;       /* [n_head*hd + 2*n_head_kv*hd][n_embd] */
    bf16 *wo;         /* [n_embd][n_head*hd] */
    bf16 *wgu;        /* [2*n_ff][n_embd] */
    bf16 *wdown;      /* [n_embd][n_ff] */
};

struct cuda_model {
    mdl_hparams hp;
    int dev;
    float *rope_freqs;         /* host [n_rot/2] or NULL */
    bf16 *tok_embd;            /* [n_vocab][n_embd] */
    bf16 *output;              /* [n_vocab][n_embd]; == tok_embd when tied (not freed twice) */
    float *output_norm;        /* [n_embd] */
    struct cuda_layer *layers; /* host array [n_layer] of device pointers */
    size_t bytes;
};

/* Where a logical tensor lives: device pointer, element count, and whether it is f32. */
int cuda_model_tensor_locate(const cuda_model *m, int layer, int kind, void **ptr, int64_t *n,
                             bool *is_f32);

#endif /* CUDA_MODEL_IMPL_CUH */
