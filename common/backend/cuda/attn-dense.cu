/*
 * attn-dense.cu — dense causal attention on the GPU (our baseline and the model's ordinary
 * path): cuda_attn_dense, equal to cpu_attn_dense. The kernels are in attn-kernels.cuh: one
 * query -> split-K flash-decoding + log-sum-exp merge; several -> FlashAttention-2-style tiles.
 */
#include "attn-kernels.cuh"
#include "attn-prefill.cuh"

extern "C" int cuda_attn_dense(const cpu_attn_shape *s, const cuda_rope *rope,
                               const cuda_kv_view *kv, const float *q_dev, int64_t pos0,
                               int64_t n_tok, float *out_dev, cuda_hip_work *w, void *stream)
{
    if (!q_dev || !out_dev || !w || n_tok < 1 || pos0 < 0 || !kv || kv->n_kv < pos0 + n_tok)
        return -EINVAL;
    attn_params P;
    int rc = ak_setup(&P, s, rope, kv);
    if (rc) return rc;
    P.q = q_dev;
    P.out = out_dev;
    P.pos0 = pos0;
    P.n_tok = n_tok;
    cudaStream_t st = (cudaStream_t)stream;
    if (n_tok == 1) {
        return ak_launch_decode<true>(P, pos0 + 1, w, st);
    }
    if (ak_prefill_mode() == AK_PF_MMA) {
        rc = ak_prefill_mma(&P, 1, st);
        if (rc != -ENOTSUP) return rc;
    }
    int qt = ATTN_ROWS / P.G;
    long long nx = (n_tok + qt - 1) / qt;
    if (nx > 0x7fffffffLL) return -EINVAL;
    return ak_launch_prefill<true>(P, (unsigned)nx, qt, 1, st);
}
