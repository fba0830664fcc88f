/*
 * attn-bsa.cu — HiP block-sparse attention on the GPU (shared/HIP.md §3): cuda_hip_bsa, equal
 * to hip_bsa. The key list of a query block is sink ∪ selected blocks ∪ window with the
 * streaming position layout (attn-kernels.cuh, ak_bsa_key, mirrors bsa_block_keys). One query
 * -> split-K over the list + log-sum-exp merge (tensor-core kernel of attn-decode-mma.cu, or
 * the fp32 one with IHIP_ATTN_DECODE=v1/v2 or an unsupported shape); several -> one tile row
 * per query block.
 */
#include "attn-kernels.cuh"
#include "attn-prefill.cuh"

extern "C" int cuda_hip_bsa(const cuda_hip_args *a, const float *q_dev, int64_t pos0,
                            int64_t n_tok, const cuda_hip_mask *m, float *out_dev,
                            cuda_hip_work *w, void *stream)
{
    if (!a || !a->layer || !m || !m->idx_dev || !m->ks_dev || !q_dev || !out_dev || !w)
        return -EINVAL;
    if (n_tok < 1 || pos0 < 0 || a->kv.n_kv < pos0 + n_tok || a->block_size_q < 1 ||
        a->block_size_k < 1 || m->kb < 0)
        return -EINVAL;
    const hip_layer_config *lc = a->layer;
    if (lc->sliding_window_size < 0 || lc->sink_token_size < 0) return -EINVAL;
    const int64_t bq = a->block_size_q, n_qblk = (n_tok + bq - 1) / bq;
    if (n_qblk > m->max_qblk) return -EINVAL;
    attn_params P;
    int rc = ak_setup(&P, &a->shape, a->rope, &a->kv);
    if (rc) return rc;
    P.q = q_dev;
    P.out = out_dev;
    P.pos0 = pos0;
    P.n_tok = n_tok;
    P.idx = (const long long *)m->idx_dev;
    P.ks = m->ks_dev;
    P.kb = m->kb;
    P.bk = a->block_size_k;
    P.bq = a->block_size_q;
    P.n_sink = lc->sink_token_size;
    P.n_stream = lc->sliding_window_size;
    P.using_extend = a->using_extend ? 1 : 0;
    cudaStream_t st = (cudaStream_t)stream;
    if (n_tok == 1) {
        /* upper bound of the list: the device reads ks */
        int64_t n_sink = CM_MIN(lc->sink_token_size, a->kv.n_kv);
        int64_t w0 = CM_MAX(0, pos0 - lc->sliding_window_size + 1);
        int64_t n_max = n_sink + (int64_t)m->kb * a->block_size_k + (pos0 - w0 + 1);
        if (ak_decode_version() == 0) {
            rc = ak_bsa_decode_mma(&P, n_max, w, st);
            if (rc != -ENOTSUP) return rc;
        }
        return ak_launch_decode<false>(P, n_max, w, st);
    }
    if (ak_prefill_mode() == AK_PF_MMA) {
        rc = ak_prefill_mma(&P, 0, st);
        if (rc != -ENOTSUP) return rc;
    }
    int qt = ATTN_ROWS / P.G;
    int nsub = (int)((bq + qt - 1) / qt);
    long long nx = n_qblk * nsub;
    if (nx > 0x7fffffffLL) return -EINVAL;
    return ak_launch_prefill<false>(P, (unsigned)nx, qt, nsub, st);
}
