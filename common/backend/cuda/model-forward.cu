/*
 * model-forward.cu — contexts and the forward pass on the GPU: prefill(chunk), decode(step) and
 * batched decode (one token of each of B sequences).
 *
 * One forward over n rows (the tokens of one prefill chunk, or one token of each of B sequences):
 *   x = embed(tokens)                                             f32 [n][E]
 *   per layer:  xn = bf16(rmsnorm(x) * attn_norm)
 *               qkv = xn · Wqkvᵀ  (one GEMM)                      f32 [n][qd + 2 kvd]
 *               q ← qkv[:, :qd];  K/V cache[slot(row)] ← bf16(k), bf16(v)  (keys un-rotated;
 *               an fp8 cache stores e4m3(k / k_scale), e4m3(v / v_scale) instead)
 *               ao = attention(q) per sequence (cuda_attn_dense, or HiP mask + BSA)
 *               x += bf16(ao) · Woᵀ  (GEMM with beta = 1: the residual add is free)
 *               xn = bf16(rmsnorm(x) * ffn_norm);  gu = xn · [Wgate ‖ Wup]ᵀ
 *               h = bf16(silu(gate) * up);  x += h · Wdownᵀ
 *   logits = bf16(rmsnorm(x[rows wanted])) · Woutᵀ                 f32
 * Row r's K/V go to cache slot seq(r) * n_ctx + pos(r) of each layer, so a prefill chunk and a
 * batch of sequences are the same code. All GEMMs: cuBLAS bf16 × bf16 → f32, fp32 compute.
 * Everything runs on the context's own stream; buffers are allocated at init only (the HiP
 * and attention scratch in cuda_hip_work grows on first use).
 *
 * HiP: the same schedule as common/hip's provider (hip-attn.c): a prefill chunk (n_tok > 1)
 * runs every stage and resets the layer's step counter (its last query block gets the
 * near-dense window when prefill_last_block_dense); a decode step at counter c starts from
 * hip_refresh_stage(c) (a full run when the layer has no valid mask since the reset), then BSA.
 * State (stage caches, counter) is per sequence and layer.
 */
#include "model-impl.cuh"

#include <cublas_v2.h>
#include <cuda_fp8.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_CHUNK 512



/* ---- kernels --------------------------------------------------------------------------------- */

static __device__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* x[t] = embedding row tok[t]; one block per row. */
static __global__ void embed_kernel(const int32_t *__restrict__ tok, const bf16 *__restrict__ emb,
                                    float *__restrict__ x, int64_t E)
{
    const bf16 *r = emb + (int64_t)tok[blockIdx.x] * E;
    float *o = x + (int64_t)blockIdx.x * E;
    for (int64_t i = threadIdx.x; i < E; i += blockDim.x)
        o[i] = __bfloat162float(r[i]);
}

/* y = bf16(x / sqrt(mean(x²) + eps) * g), one block (256 threads) per row. */
static __global__ void rms_norm_bf16_kernel(const float *__restrict__ x,
                                            const float *__restrict__ g, bf16 *__restrict__ y,
                                            int64_t E, float eps)
{
    const float *xr = x + (int64_t)blockIdx.x * E;
    bf16 *yr = y + (int64_t)blockIdx.x * E;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < E; i += blockDim.x)
        s += xr[i] * xr[i];
    s = warp_sum(s);
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) part[0] = s;
    }
    __syncthreads();
    float scale = 1.0f / sqrtf(part[0] / (float)E + eps);
    for (int64_t i = threadIdx.x; i < E; i += blockDim.x)
        yr[i] = __float2bfloat16_rn(xr[i] * scale * g[i]);
}

/* Row t of qkv: q → q[t] (f32), k and v → cache slot slot[t] (T = bf16 or fp8 bytes; keys NOT
 * rotated). */
template <typename T>
static __global__ void qkv_store_kernel(const float *__restrict__ qkv,
                                        const int64_t *__restrict__ slot, float *__restrict__ q,
                                        T *__restrict__ kc, T *__restrict__ vc, int64_t qd,
                                        int64_t kvd, float k_inv, float v_inv)
{
    const int64_t t = blockIdx.x;
    const float *r = qkv + t * (qd + 2 * kvd);
    for (int64_t j = threadIdx.x; j < qd; j += blockDim.x)
        q[t * qd + j] = r[j];
    const int64_t s = slot[t];
    for (int64_t j = threadIdx.x; j < kvd; j += blockDim.x) {
        kv_put(&kc[s * kvd + j], r[qd + j], k_inv);
        kv_put(&vc[s * kvd + j], r[qd + kvd + j], v_inv);
    }
}


template <typename T>
static __global__ void kv_fill_kernel(T *__restrict__ kc, T *__restrict__ vc, int64_t n,
                                      uint64_t k_key, uint64_t v_key, float k_inv, float v_inv)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        kv_put(&kc[i], fill_value(k_key, i), k_inv);
        kv_put(&vc[i], fill_value(v_key, i), v_inv);
    }
}

static __global__ void to_bf16_kernel(const float *__restrict__ a, bf16 *__restrict__ b, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        b[i] = __float2bfloat16_rn(a[i]);
}

/* h[t][i] = bf16(silu(g) * u), g = gu[t][i], u = gu[t][F + i]. */
static __global__ void swiglu_kernel(const float *__restrict__ gu, bf16 *__restrict__ h, int64_t n,
                                     int64_t F)
{
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n * F;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = idx / F, i = idx - t * F;
        float g = gu[t * 2 * F + i], u = gu[t * 2 * F + F + i];
        h[idx] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
    }
}

static unsigned grid_for(int64_t n)
{
    return (unsigned)CM_MIN((n + 255) / 256, (int64_t)8192);
}

static int cuerr(cudaError_t e)
{
    return e == cudaSuccess ? 0 : CUDA_ERR(e);
}

static int blas_fail(cublasStatus_t s, const char *what, int line)
{
    fprintf(stderr, "cuda model: %s failed: cuBLAS status %d (%s:%d)\n", what, (int)s, __FILE__,
            line);
    return CUBLAS_ERR(s);
}

/* Y[t][o] (row stride ldy) = beta·Y + Σ_i W[o][i] X[t][i]; W [n_out][n_in] bf16, X [n][n_in] bf16.
 * Column-major view: Y = Wᵀ·X with W an n_in × n_out matrix (lda n_in). */
static int gemm(cuda_ctx *c, const bf16 *W, int64_t n_out, int64_t n_in, const bf16 *X, int64_t n,
                float *Y, int64_t ldy, float beta)
{
    const float alpha = 1.0f;
    cublasStatus_t s =
        cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n, (int)n_in, &alpha, W,
                     CUDA_R_16BF, (int)n_in, X, CUDA_R_16BF, (int)n_in, &beta, Y, CUDA_R_32F,
                     (int)ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_fail(s, "cublasGemmEx", __LINE__);
    return 0;
}

/* ---- attention ------------------------------------------------------------------------------- */

static cuda_kv_view kv_view(const cuda_ctx *c, int il, int seq, int64_t n_kv)
{
    if (c->pg) return paged_view(c, il, seq, n_kv, true);
    const mdl_hparams *hp = &c->m->hp;
    size_t off = (size_t)seq * (size_t)c->n_ctx * (size_t)(hp->n_head_kv * hp->head_dim) *
                 c->kv_elem; /* bytes */
    cuda_kv_view kv;
    memset(&kv, 0, sizeof(kv));
    kv.k_dev = (const char *)c->k[il] + off;
    kv.v_dev = (const char *)c->v[il] + off;
    kv.dtype = c->kv_dtype;
    kv.k_scale = c->k_scale;
    kv.v_scale = c->v_scale;
    kv.page_dev = NULL;
    kv.page_tokens = 0;
    kv.n_kv = n_kv;
    return kv;
}

/* n_tok queries of sequence seq at pos0.. (their K/V already stored) → out. */
static int attend(cuda_ctx *c, int il, int seq, const float *q, int64_t pos0, int64_t n_tok,
                  float *out)
{
    const int n_layer = (int)c->m->hp.n_layer;
    cuda_kv_view kv = kv_view(c, il, seq, pos0 + n_tok);
    if (!c->hip)
        return cuda_attn_dense(&c->shape, &c->rope, &kv, q, pos0, n_tok, out, c->work, c->stream);

    const bool decode = n_tok == 1;
    hip_args ha;
    hip_args_from_config(&ha, c->hip, il, n_layer, !decode);
    cuda_hip_args a;
    memset(&a, 0, sizeof(a));
    a.layer = ha.layer;
    a.block_size_q = ha.block_size_q;
    a.block_size_k = ha.block_size_k;
    a.using_extend = ha.using_extend;
    a.score_bf16 = ha.score_bf16;
    a.shape = c->shape;
    a.rope = &c->rope;
    a.kv = kv;
    const size_t si = (size_t)seq * (size_t)n_layer + (size_t)il;
    int rc;
    if (c->pg) a.kv = paged_view(c, il, seq, pos0 + n_tok, false); /* keys-only cache */
    if (decode) {
        int fs = hip_refresh_stage(c->hip, a.layer->n_stages, c->step[si]);
        if (!c->dec_valid[si]) fs = 0;
        if (c->pg && (rc = paged_before_mask(c, il)) != 0) return rc;
        paged_prof_mark(c, 0);
        rc = cuda_hip_mask_estimate(&a, q, pos0, 1, fs, &c->dec[si], c->work, c->stream);
        paged_prof_mark(c, 1);
        if (c->pg) {
            c->pg->st.refresh[CM_MIN(fs, 3)]++;
            if (rc == 0 && fs < a.layer->n_stages)
                rc = paged_after_refresh(c, il, seq, fs, &c->dec[si], pos0 + 1);
        }
        paged_prof_mark(c, 2);
        a.kv = kv;
        if (rc == 0) rc = cuda_hip_bsa(&a, q, pos0, 1, &c->dec[si], out, c->work, c->stream);
        paged_prof_mark(c, 3);
        paged_prof_collect(c);
        if (rc == 0) {
            c->dec_valid[si] = true;
            c->step[si]++;
        }
        return rc;
    }
    c->step[si] = 0;
    c->dec_valid[si] = false;
    a.kv = kv; /* prefill reads K and V through the attention tables (K‖V cache or home) */
    const hip_layer_config *lc = a.layer;
    const int bq = a.block_size_q;
    const int64_t wide = c->hip_ctx_len - lc->sink_token_size - lc->second_stage_k - bq;
    if (c->hip->prefill_last_block_dense && n_tok >= 2 * bq && wide > lc->sliding_window_size) {
        /* the last query block gets the near-dense window, as in hip-attn.c */
        const int64_t n1 = n_tok - bq;
        const size_t row = (size_t)c->shape.n_head * (size_t)c->shape.head_dim;
        rc = cuda_hip_mask_estimate(&a, q, pos0, n1, 0, &c->pre[il], c->work, c->stream);
        if (rc == 0) rc = cuda_hip_bsa(&a, q, pos0, n1, &c->pre[il], out, c->work, c->stream);
        if (rc) return rc;
        hip_layer_config w = *lc;
        w.sliding_window_size = wide;
        a.layer = &w;
        rc = cuda_hip_mask_estimate(&a, q + n1 * row, pos0 + n1, bq, 0, &c->pre[il], c->work,
                                    c->stream);
        if (rc == 0)
            rc = cuda_hip_bsa(&a, q + n1 * row, pos0 + n1, bq, &c->pre[il], out + n1 * row, c->work,
                              c->stream);
        return rc;
    }
    rc = cuda_hip_mask_estimate(&a, q, pos0, n_tok, 0, &c->pre[il], c->work, c->stream);
    if (rc == 0) rc = cuda_hip_bsa(&a, q, pos0, n_tok, &c->pre[il], out, c->work, c->stream);
    return rc;
}

/* ---- forward --------------------------------------------------------------------------------- */

/* The queries of one sequence inside a forward: rows [row0, row0 + n) at positions pos0.. */
struct att_group {
    int seq;
    int64_t row0, n, pos0;
};

/* Forward n rows (c->tok_host / c->slot_host filled); logits of rows [lrow0, lrow0 + lrows)
 * into c->logits (lrows = 0: none). Enqueues only (the copies from pageable memory return when
 * the host arrays have been read). */
static int forward(cuda_ctx *c, int64_t n, const struct att_group *g, int n_g, int64_t lrow0,
                   int64_t lrows, cm_err *err)
{
    const cuda_model *m = c->m;
    const mdl_hparams *hp = &m->hp;
    const int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim,
                  kvd = hp->n_head_kv * hp->head_dim;
    const int64_t F = hp->n_ff, V = hp->n_vocab, W = qd + 2 * kvd;
    cudaStream_t st = c->stream;
    int rc;
#define TRY(call)                                                                                  \
    do {                                                                                           \
        if ((rc = (call)) != 0) goto fail;                                                         \
    } while (0)
    TRY(cuerr(cudaMemcpyAsync(c->tok_dev, c->tok_host, sizeof(int32_t) * (size_t)n,
                              cudaMemcpyHostToDevice, st)));
    TRY(cuerr(cudaMemcpyAsync(c->slot_dev, c->slot_host, sizeof(int64_t) * (size_t)n,
                              cudaMemcpyHostToDevice, st)));
    embed_kernel<<<(unsigned)n, 256, 0, st>>>(c->tok_dev, m->tok_embd, c->x, E);
    TRY(cuerr(cudaGetLastError()));
    if (c->pg && n_g == 1 && g[0].n > 1) TRY(paged_stage_begin(c, g[0].seq));

    for (int il = 0; il < (int)hp->n_layer; il++) {
        const struct cuda_layer *L = &m->layers[il];
        rms_norm_bf16_kernel<<<(unsigned)n, 256, 0, st>>>(c->x, L->attn_norm, c->xn, E,
                                                          hp->rms_eps);
        TRY(gemm(c, L->wqkv, W, E, c->xn, n, c->qkv, W, 0.0f));
        if (c->pg)
            paged_store(c, il, c->qkv, n);
        else if (c->kv_dtype == CUDA_KV_FP8)
            qkv_store_kernel<<<(unsigned)n, 256, 0, st>>>(
                c->qkv, c->slot_dev, c->q, (uint8_t *)c->k[il], (uint8_t *)c->v[il], qd, kvd,
                1.0f / c->k_scale, 1.0f / c->v_scale);
        else
            qkv_store_kernel<<<(unsigned)n, 256, 0, st>>>(
                c->qkv, c->slot_dev, c->q, (bf16 *)c->k[il], (bf16 *)c->v[il], qd, kvd, 1.0f, 1.0f);
        TRY(cuerr(cudaGetLastError()));
        if (c->pg) TRY(paged_stage_before(c, il));
        for (int i = 0; i < n_g; i++) {
            rc = attend(c, il, g[i].seq, c->q + g[i].row0 * qd, g[i].pos0, g[i].n,
                        c->ao + g[i].row0 * qd);
            if (rc) {
                cm_err_set(err, rc,
                           "cuda model: %s attention failed in layer %d (sequence %d, "
                           "%lld queries at %lld): error %d%s",
                           c->hip ? "HiP" : "dense", il, g[i].seq, (long long)g[i].n,
                           (long long)g[i].pos0, rc,
                           rc == -EINVAL ? " (invalid arguments: head_dim, GQA group or config "
                                           "outside what the attention kernels support?)"
                                         : "");
                return rc;
            }
        }
        if (c->pg) TRY(paged_stage_after(c, il));
        to_bf16_kernel<<<grid_for(n * qd), 256, 0, st>>>(c->ao, c->aob, n * qd);
        TRY(gemm(c, L->wo, E, qd, c->aob, n, c->x, E, 1.0f));
        rms_norm_bf16_kernel<<<(unsigned)n, 256, 0, st>>>(c->x, L->ffn_norm, c->xn, E, hp->rms_eps);
        TRY(gemm(c, L->wgu, 2 * F, E, c->xn, n, c->gu, 2 * F, 0.0f));
        swiglu_kernel<<<grid_for(n * F), 256, 0, st>>>(c->gu, c->h, n, F);
        TRY(cuerr(cudaGetLastError()));
        TRY(gemm(c, L->wdown, E, F, c->h, n, c->x, E, 1.0f));
    }
    if (lrows > 0) {
        rms_norm_bf16_kernel<<<(unsigned)lrows, 256, 0, st>>>(c->x + lrow0 * E, m->output_norm,
                                                              c->xn, E, hp->rms_eps);
        TRY(gemm(c, m->output, V, E, c->xn, lrows, c->logits, V, 0.0f));
    }
    TRY(cuerr(cudaGetLastError()));
    return 0;
#undef TRY
fail:
    return cm_err_set(err, rc, "cuda model: forward failed: error %d%s%s", rc,
                      rc <= -1000 && rc > -3000 ? ": " : "",
                      rc <= -1000 && rc > -3000 ? cudaGetErrorString((cudaError_t)(-rc - 1000))
                                                : "");
}

/* Wait for the stream; copy logits out. */
static int finish(cuda_ctx *c, float *logits, int64_t rows, cm_err *err)
{
    const int64_t V = c->m->hp.n_vocab;
    cudaError_t e = cudaSuccess;
    if (logits)
        e = cudaMemcpyAsync(logits, c->logits, sizeof(float) * (size_t)(rows * V),
                            cudaMemcpyDeviceToHost, c->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "cuda model: %s", cudaGetErrorString(e));
    return 0;
}

/* ---- public ---------------------------------------------------------------------------------- */

extern "C" cuda_ctx_params cuda_ctx_default_params(void)
{
    cuda_ctx_params p;
    memset(&p, 0, sizeof(p));
    return p;
}

static int dalloc(void **p, size_t bytes)
{
    if (cudaMalloc(p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();
        *p = NULL;
        return -ENOMEM;
    }
    return 0;
}

extern "C" cuda_ctx *cuda_ctx_init(const cuda_model *m, const cuda_ctx_params *pp, cm_err *err)
{
    if (!m) {
        cm_err_set(err, -EINVAL, "cuda context: no model");
        return NULL;
    }
    const mdl_hparams *hp = &m->hp;
    cuda_ctx_params p = pp ? *pp : cuda_ctx_default_params();
    if (p.n_ctx <= 0) p.n_ctx = hp->n_ctx_train;
    if (p.n_chunk <= 0) p.n_chunk = DEFAULT_CHUNK;
    if (p.n_chunk > p.n_ctx) p.n_chunk = p.n_ctx;
    if (p.n_seq <= 0) p.n_seq = 1;
    if (p.n_ctx > ((int64_t)1 << 32) || p.n_seq > 4096 || p.n_chunk > (1 << 20)) {
        cm_err_set(err, -CM_ELIMIT,
                   "cuda context: n_ctx %lld, n_seq %d or n_chunk %lld out of "
                   "range",
                   (long long)p.n_ctx, p.n_seq, (long long)p.n_chunk);
        return NULL;
    }
    if (p.kv_dtype != CUDA_KV_BF16 && p.kv_dtype != CUDA_KV_FP8) {
        cm_err_set(err, -EINVAL, "cuda context: unknown KV dtype %d (0 = bf16, 1 = fp8 e4m3)",
                   p.kv_dtype);
        return NULL;
    }
    if (p.kv_k_scale == 0.0f) p.kv_k_scale = CUDA_KV_FP8_SCALE;
    if (p.kv_v_scale == 0.0f) p.kv_v_scale = CUDA_KV_FP8_SCALE;
    if (p.kv_dtype == CUDA_KV_FP8 && !(p.kv_k_scale > 1e-30f && p.kv_k_scale < 1e30f &&
                                       p.kv_v_scale > 1e-30f && p.kv_v_scale < 1e30f)) {
        cm_err_set(err, -EINVAL, "cuda context: fp8 KV scales must be positive and finite (%g, %g)",
                   (double)p.kv_k_scale, (double)p.kv_v_scale);
        return NULL;
    }
    const int n_layer = (int)hp->n_layer;
    if (p.hip && hip_config_validate(p.hip, n_layer, err) < 0) return NULL;
    if (cudaSetDevice(m->dev) != cudaSuccess) {
        cudaGetLastError();
        cm_err_set(err, -ENODEV, "cuda context: cannot use device %d", m->dev);
        return NULL;
    }
    cuda_ctx *c = (cuda_ctx *)calloc(1, sizeof(*c));
    const int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim,
                  kvd = hp->n_head_kv * hp->head_dim;
    const int64_t F = hp->n_ff, V = hp->n_vocab;
    size_t R, kv_bytes = 0;
    const size_t kv_elem = p.kv_dtype == CUDA_KV_FP8 ? 1 : 2;
    cpu_rope cr;
    const char *what = "host memory";
    int rc;
    if (!c) goto oom;
    c->m = m;
    c->n_ctx = p.n_ctx;
    c->n_chunk = p.n_chunk;
    c->n_seq = p.n_seq;
    c->kv_dtype = p.kv_dtype;
    c->kv_elem = kv_elem;
    c->k_scale = p.kv_dtype == CUDA_KV_FP8 ? p.kv_k_scale : 1.0f;
    c->v_scale = p.kv_dtype == CUDA_KV_FP8 ? p.kv_v_scale : 1.0f;
    c->rows = CM_MAX(p.n_chunk, (int64_t)p.n_seq);
    R = (size_t)c->rows;
    c->shape.n_head = (int)hp->n_head;
    c->shape.n_head_kv = (int)hp->n_head_kv;
    c->shape.head_dim = (int)hp->head_dim;
    c->shape.scale = 1.0f / sqrtf((float)hp->head_dim);
    if (cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking) != cudaSuccess) {
        cudaGetLastError();
        c->stream = NULL;
        what = "a CUDA stream";
        goto oom;
    }
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
        c->blas = NULL;
        what = "a cuBLAS handle";
        goto oom;
    }
    cublasSetStream(c->blas, c->stream);
    if (cpu_rope_init(&cr, hp->rope_style, (int)hp->head_dim, (int)hp->n_rot, hp->rope_base,
                      hp->rope_linear_scale, m->rope_freqs, 0) < 0)
        goto oom;
    rc = cuda_rope_init(&c->rope, &cr);
    cpu_rope_free(&cr);
    if (rc < 0) {
        what = "the RoPE table";
        goto oom;
    }
    c->work = cuda_hip_work_init();
    c->n_past = (int64_t *)calloc((size_t)p.n_seq, sizeof(int64_t));
    c->k = (void **)calloc((size_t)n_layer, sizeof(void *));
    c->v = (void **)calloc((size_t)n_layer, sizeof(void *));
    c->tok_host = (int32_t *)malloc(sizeof(int32_t) * R);
    c->slot_host = (int64_t *)malloc(sizeof(int64_t) * R);
    if (!c->work || !c->n_past || !c->k || !c->v || !c->tok_host || !c->slot_host) goto oom;
    /* the KV cache: 2 × n_layer buffers of n_seq × n_ctx tokens, allocated here only */
    kv_bytes = kv_elem * (size_t)p.n_seq * (size_t)p.n_ctx * (size_t)kvd; /* one layer's K */
    c->kv_bytes = 2 * (size_t)n_layer * kv_bytes;
    if (p.page_tokens != 0) c->kv_bytes = 0; /* paged: see paged_init */
    for (int il = 0; il < n_layer && p.page_tokens == 0; il++)
        for (int kv = 0; kv < 2; kv++) {
            void **dst = kv ? &c->v[il] : &c->k[il];
            cudaError_t e = cudaMalloc(dst, kv_bytes);
            if (e != cudaSuccess) {
                cudaGetLastError();
                *dst = NULL;
                size_t fr = 0, tot = 0;
                cudaMemGetInfo(&fr, &tot);
                cm_err_set(err, -ENOMEM,
                           "cuda context: cannot allocate the %s KV cache: %zu bytes (%.2f GiB = "
                           "%d layers × K,V × %d sequences × %lld tokens × %lld × %zu B; failed "
                           "at layer %d %s, %.2f GiB of %.2f GiB free on the GPU%s): %s",
                           kv_elem == 1 ? "fp8" : "bf16", c->kv_bytes,
                           (double)c->kv_bytes / 1073741824.0, n_layer, p.n_seq, (long long)p.n_ctx,
                           (long long)kvd, kv_elem, il, kv ? "V" : "K", (double)fr / 1073741824.0,
                           (double)tot / 1073741824.0,
                           kv_elem == 2 ? "; an fp8 cache takes half" : "", cudaGetErrorString(e));
                cuda_ctx_free(c);
                return NULL;
            }
        }
    what = "GPU memory for the scratch";
    if (dalloc((void **)&c->x, 4 * R * E) || dalloc((void **)&c->xn, 2 * R * E) ||
        dalloc((void **)&c->qkv, 4 * R * (size_t)(qd + 2 * kvd)) ||
        dalloc((void **)&c->q, 4 * R * qd) || dalloc((void **)&c->ao, 4 * R * qd) ||
        dalloc((void **)&c->aob, 2 * R * qd) || dalloc((void **)&c->gu, 4 * R * 2 * F) ||
        dalloc((void **)&c->h, 2 * R * F) ||
        dalloc((void **)&c->logits, 4 * (size_t)p.n_seq * (size_t)V) ||
        dalloc((void **)&c->tok_dev, 4 * R) || dalloc((void **)&c->slot_dev, 8 * R))
        goto oom;
    if (p.hip) {
        what = "the HiP masks";
        c->hip = (hip_config *)malloc(sizeof(hip_config));
        if (!c->hip) goto oom;
        *c->hip = *p.hip;
        c->hip_ctx_len =
            p.hip->model_context_length > 0 ? p.hip->model_context_length : hp->n_ctx_train;
        size_t ns = (size_t)p.n_seq * (size_t)n_layer;
        c->dec = (cuda_hip_mask *)calloc(ns, sizeof(cuda_hip_mask));
        c->dec_valid = (bool *)calloc(ns, sizeof(bool));
        c->step = (int64_t *)calloc(ns, sizeof(int64_t));
        c->pre = (cuda_hip_mask *)calloc((size_t)n_layer, sizeof(cuda_hip_mask));
        if (!c->dec || !c->dec_valid || !c->step || !c->pre) goto oom;
        const int bq = c->hip->block_sparse_block_size_q;
        const int max_qblk = (int)((p.n_chunk + bq - 1) / bq);
        for (int il = 0; il < n_layer; il++) {
            if (cuda_hip_mask_init(&c->pre[il], hip_config_layer(c->hip, il, n_layer, true),
                                   max_qblk))
                goto oom;
            for (int s = 0; s < p.n_seq; s++)
                if (cuda_hip_mask_init(&c->dec[(size_t)s * n_layer + il],
                                       hip_config_layer(c->hip, il, n_layer, false), 1))
                    goto oom;
        }
    }
    if (p.page_tokens != 0 && paged_init(c, &p, err) != 0) {
        cuda_ctx_free(c);
        return NULL;
    }
    return c;
oom:
    cm_err_set(err, -ENOMEM,
               "cuda context: cannot allocate %s (n_ctx %lld × %d sequences: KV "
               "cache %.1f MiB)",
               what, (long long)p.n_ctx, p.n_seq,
               (double)n_layer * 2 * (double)kvd * (double)kv_elem * (double)p.n_ctx * p.n_seq /
                   1048576.0);
    cuda_ctx_free(c);
    return NULL;
}

extern "C" void cuda_ctx_free(cuda_ctx *c)
{
    if (!c) return;
    cudaSetDevice(c->m->dev);
    if (c->stream) cudaStreamSynchronize(c->stream);
    const int n_layer = (int)c->m->hp.n_layer;
    if (c->hip) {
        for (int il = 0; il < n_layer; il++) {
            if (c->pre) cuda_hip_mask_free(&c->pre[il]);
            for (int s = 0; s < c->n_seq && c->dec; s++)
                cuda_hip_mask_free(&c->dec[(size_t)s * n_layer + il]);
        }
    }
    paged_free(c);
    free(c->dec);
    free(c->dec_valid);
    free(c->step);
    free(c->pre);
    free(c->hip);
    for (int il = 0; il < n_layer; il++) {
        if (c->k) cudaFree(c->k[il]);
        if (c->v) cudaFree(c->v[il]);
    }
    free(c->k);
    free(c->v);
    cudaFree(c->x);
    cudaFree(c->xn);
    cudaFree(c->qkv);
    cudaFree(c->q);
    cudaFree(c->ao);
    cudaFree(c->aob);
    cudaFree(c->gu);
    cudaFree(c->h);
    cudaFree(c->logits);
    cudaFree(c->tok_dev);
    cudaFree(c->slot_dev);
    free(c->tok_host);
    free(c->slot_host);
    free(c->n_past);
    cuda_hip_work_free(c->work);
    cuda_rope_free(&c->rope);
    if (c->blas) cublasDestroy(c->blas);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

extern "C" void cuda_ctx_reset(cuda_ctx *c, int seq)
{
    const int n_layer = (int)c->m->hp.n_layer;
    for (int s = 0; s < c->n_seq; s++) {
        if (seq >= 0 && s != seq) continue;
        c->n_past[s] = 0;
        if (c->pg) paged_reset(c, s);
        if (c->hip)
            for (int il = 0; il < n_layer; il++) {
                c->dec_valid[(size_t)s * n_layer + il] = false;
                c->step[(size_t)s * n_layer + il] = 0;
            }
    }
}

extern "C" int64_t cuda_ctx_n_past(const cuda_ctx *c, int seq)
{
    return c && seq >= 0 && seq < c->n_seq ? c->n_past[seq] : -1;
}

extern "C" const char *cuda_ctx_attn_name(const cuda_ctx *c)
{
    return c->hip ? "hip" : "dense";
}

extern "C" size_t cuda_ctx_kv_bytes(const cuda_ctx *c)
{
    return c ? c->kv_bytes : 0;
}

extern "C" int cuda_ctx_fill_synthetic(cuda_ctx *c, int seq, int64_t n_tokens, uint64_t seed,
                                       cm_err *err)
{
    if (!c) return cm_err_set(err, -EINVAL, "no context");
    if (seq < 0 || seq >= c->n_seq)
        return cm_err_set(err, -EINVAL, "sequence %d is outside [0, %d)", seq, c->n_seq);
    if (n_tokens < 0 || n_tokens > c->n_ctx)
        return cm_err_set(err, -CM_ELIMIT, "synthetic fill of %lld tokens outside [0, n_ctx %lld]",
                          (long long)n_tokens, (long long)c->n_ctx);
    if (c->pg)
        return cm_err_set(err, -EINVAL,
                          "paged context: fill host pages (cuda_ctx_fill_host_synthetic) and bind "
                          "them (cuda_ctx_bind_host) instead");
    if (cudaSetDevice(c->m->dev) != cudaSuccess)
        return cm_err_set(err, -ENODEV, "cannot use the GPU");
    const mdl_hparams *hp = &c->m->hp;
    const int n_layer = (int)hp->n_layer;
    const int64_t kvd = hp->n_head_kv * hp->head_dim, n = n_tokens * kvd;
    const size_t off = (size_t)seq * (size_t)c->n_ctx * (size_t)kvd * c->kv_elem;
    const float k_inv = 1.0f / c->k_scale, v_inv = 1.0f / c->v_scale;
    cudaError_t e = cudaSuccess;
    for (int il = 0; il < n_layer && n > 0 && e == cudaSuccess; il++) {
        uint64_t key = seed * 0xD1B54A32D192ED03ULL + (uint64_t)il * 0x2545F4914F6CDD1DULL;
        if (c->kv_dtype == CUDA_KV_FP8)
            kv_fill_kernel<<<grid_for(n), 256, 0, c->stream>>>(
                (uint8_t *)c->k[il] + off, (uint8_t *)c->v[il] + off, n, key, ~key, k_inv, v_inv);
        else
            kv_fill_kernel<<<grid_for(n), 256, 0, c->stream>>>((bf16 *)((char *)c->k[il] + off),
                                                               (bf16 *)((char *)c->v[il] + off), n,
                                                               key, ~key, 1.0f, 1.0f);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "synthetic KV fill: %s", cudaGetErrorString(e));
    cuda_ctx_reset(c, seq);
    c->n_past[seq] = n_tokens;
    return 0;
}

static int check_tokens(const cuda_ctx *c, int seq, const int32_t *tokens, int64_t n, cm_err *err)
{
    if (seq < 0 || seq >= c->n_seq)
        return cm_err_set(err, -EINVAL, "sequence %d is outside [0, %d)", seq, c->n_seq);
    if (n <= 0 || !tokens) return cm_err_set(err, -EINVAL, "no tokens to process");
    if (c->n_past[seq] + n > c->n_ctx)
        return cm_err_set(err, -CM_ELIMIT,
                          "context full: %lld tokens in the cache + %lld new > n_ctx %lld "
                          "(raise --ctx)",
                          (long long)c->n_past[seq], (long long)n, (long long)c->n_ctx);
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->m->hp.n_vocab)
            return cm_err_set(err, -EINVAL,
                              "token id %d at index %lld is outside the vocabulary "
                              "[0, %lld)",
                              tokens[i], (long long)i, (long long)c->m->hp.n_vocab);
    if (c->pg) /* with a page sink, prefill flushes the ring after every chunk */
        return paged_check_room(c, seq, c->n_past[seq],
                                c->pg->sink ? CM_MIN(n, c->n_chunk) : n, err);
    return 0;
}

extern "C" int cuda_prefill(cuda_ctx *c, int seq, const int32_t *tokens, int64_t n, float *logits,
                            mdl_progress_fn progress, void *user, cm_err *err)
{
    if (!c) return cm_err_set(err, -EINVAL, "no context");
    int rc = check_tokens(c, seq, tokens, n, err);
    if (rc < 0) return rc;
    if (cudaSetDevice(c->m->dev) != cudaSuccess)
        return cm_err_set(err, -ENODEV, "cannot use the GPU");
    for (int64_t done = 0; done < n;) {
        const int64_t k = CM_MIN(c->n_chunk, n - done), pos0 = c->n_past[seq];
        for (int64_t t = 0; t < k; t++) {
            c->tok_host[t] = tokens[done + t];
            c->slot_host[t] = (int64_t)seq * c->n_ctx + pos0 + t;
        }
        struct att_group g = {seq, 0, k, pos0};
        const bool last = done + k == n;
        if (c->pg && (rc = paged_prepare(c, seq, pos0, k)) < 0)
            return cm_err_set(err, rc, "cuda model: page table update failed");
        rc = forward(c, k, &g, 1, k - 1, last ? 1 : 0, err);
        if (rc == 0 && (last || progress)) rc = finish(c, last ? logits : NULL, 1, err);
        if (rc < 0) return rc;
        c->n_past[seq] += k;
        done += k;
        if (c->pg && (rc = paged_after_chunk(c, seq, false, err)) < 0) return rc;
        if (progress && progress(user, done, n) != 0)
            return cm_err_set(err, -ECANCELED, "prefill cancelled after %lld of %lld tokens",
                              (long long)done, (long long)n);
    }
    return 0;
}

static int decode_batch(cuda_ctx *c, int B, const int *seqs, const int32_t *tokens,
                        float *logits, cm_err *err);

/* A decode step; on a paged context its host time is added to the kind of the deepest HiP mask
 * work it did (full refresh, from stage 1, from stage 2, reuse), for cuda_ctx_offload_stats. */
extern "C" int cuda_decode_batch(cuda_ctx *c, int B, const int *seqs, const int32_t *tokens,
                                 float *logits, cm_err *err)
{
    if (!c || !c->pg) return decode_batch(c, B, seqs, tokens, logits, err);
    cuda_offload_stats *st = &c->pg->st;
    uint64_t before[4];
    memcpy(before, st->refresh, sizeof(before));
    const uint64_t t0 = cm_time_ns();
    int rc = decode_batch(c, B, seqs, tokens, logits, err);
    if (rc == 0)
        for (int k = 0; k < 4; k++)
            if (st->refresh[k] > before[k]) {
                st->step_ms[k] += (double)(cm_time_ns() - t0) / 1e6;
                st->steps[k]++;
                break;
            }
    return rc;
}

static int decode_batch(cuda_ctx *c, int B, const int *seqs, const int32_t *tokens,
                        float *logits, cm_err *err)
{
    if (!c) return cm_err_set(err, -EINVAL, "no context");
    if (B < 1 || B > c->n_seq || !seqs || !tokens)
        return cm_err_set(err, -EINVAL, "decode batch of %d sequences (the context holds %d)", B,
                          c->n_seq);
    for (int i = 0; i < B; i++) {
        int rc = check_tokens(c, seqs[i], &tokens[i], 1, err);
        if (rc < 0) return rc;
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                return cm_err_set(err, -EINVAL, "sequence %d appears twice in a decode batch",
                                  seqs[i]);
    }
    if (cudaSetDevice(c->m->dev) != cudaSuccess)
        return cm_err_set(err, -ENODEV, "cannot use the GPU");
    struct att_group gs[64];
    struct att_group *g = B <= 64 ? gs : (struct att_group *)malloc(sizeof(*g) * (size_t)B);
    if (!g) return cm_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < B; i++) {
        c->tok_host[i] = tokens[i];
        c->slot_host[i] = (int64_t)seqs[i] * c->n_ctx + c->n_past[seqs[i]];
        g[i].seq = seqs[i];
        g[i].row0 = i;
        g[i].n = 1;
        g[i].pos0 = c->n_past[seqs[i]];
        int rc = c->pg ? paged_prepare(c, seqs[i], g[i].pos0, 1) : 0;
        if (rc < 0) {
            if (g != gs) free(g);
            return cm_err_set(err, rc, "cuda model: page table update failed");
        }
    }
    if (c->pg) {
        const char *pe = getenv("IHIP_OFFLOAD_PROFILE");
        c->pg->prof = pe && atoi(pe) > 0; /* read per step: a benchmark toggles it */
    }
    int rc = forward(c, B, g, B, 0, B, err);
    if (g != gs) free(g);
    if (c->pg) c->pg->st.decode_steps++;
    if (rc == 0) rc = finish(c, logits, B, err);
    if (rc < 0) return rc;
    for (int i = 0; i < B; i++)
        c->n_past[seqs[i]]++;
    return 0;
}

extern "C" int cuda_decode(cuda_ctx *c, int seq, int32_t token, float *logits, cm_err *err)
{
    return cuda_decode_batch(c, 1, &seq, &token, logits, err);
}
