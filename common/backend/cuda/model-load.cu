/*
 * model-load.cu — putting a model's weights on the GPU: upload of a loaded GGUF model, and
 * synthetic weights generated on the GPU for benchmarks and tests.
 *
 * Upload dequantises on the HOST with tn_dequant_row (common/tensor) and rounds to bf16 there,
 * then copies. Why not raw blocks + GPU dequantisation: the host path gives, for every type
 * common/tensor supports (all the legacy and K-quants), exactly the values the CPU engine
 * computes with, with one implementation of each format to keep right; loading is a one-off
 * (SmolLM2: 0.1 s; an 8B Q4 model: a few seconds on 16 threads) and the GPU keeps bf16 anyway.
 * Rows are dequantised in slices of ≤ 32 MiB of bf16 by a thread pool, so host memory stays
 * small whatever the model size.
 */
#include "../../tensor/tensor.h"
#include "model-impl.cuh"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLICE_BYTES ((size_t)32 << 20)

/* ---- bf16 ------------------------------------------------------------------------------------ */

static uint16_t f32_to_bf16_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static float bf16_bits_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

extern "C" float cuda_model_round_bf16(float x)
{
    return bf16_bits_to_f32(f32_to_bf16_bits(x));
}

/* ---- synthetic values ------------------------------------------------------------------------ */

__host__ __device__ static inline uint64_t synth_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* mean + amp * (2u - 1), u = 24 hash bits / 2^24: (float)(h >> 40) and 2u - 1 are exact and
 * fmaf rounds once on both sides, so host and device agree bit for bit. */
__host__ __device__ static inline float synth_at(uint64_t key, int64_t i, float mean, float amp)
{
    uint64_t h = synth_mix(key + synth_mix((uint64_t)i));
    float u = (float)(h >> 40) * (1.0f / 16777216.0f);
    return fmaf(amp, 2.0f * u - 1.0f, mean);
}

static uint64_t synth_key(uint64_t seed, int layer, int kind)
{
    uint64_t tid = (uint64_t)(layer + 1) * 64u + (uint64_t)kind;
    return synth_mix(seed ^ (tid * 0x9E3779B97F4A7C15ULL));
}

static bool is_global(int kind)
{
    return kind == CUDA_T_TOK_EMBD || kind == CUDA_T_OUTPUT_NORM || kind == CUDA_T_OUTPUT;
}

static bool is_norm(int kind)
{
    return kind == CUDA_T_OUTPUT_NORM || kind == CUDA_T_ATTN_NORM || kind == CUDA_T_FFN_NORM;
}

/* Shape of a logical tensor: rows (n_out) × n_in; norms are 1 × n_embd. */
static bool tensor_shape(const mdl_hparams *hp, int kind, int64_t *n_out, int64_t *n_in)
{
    int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    switch (kind) {
    case CUDA_T_TOK_EMBD:
    case CUDA_T_OUTPUT:
        *n_out = hp->n_vocab;
        *n_in = E;
        return true;
    case CUDA_T_OUTPUT_NORM:
    case CUDA_T_ATTN_NORM:
    case CUDA_T_FFN_NORM:
        *n_out = 1;
        *n_in = E;
        return true;
    case CUDA_T_WQ:
        *n_out = qd;
        *n_in = E;
        return true;
    case CUDA_T_WK:
    case CUDA_T_WV:
        *n_out = kvd;
        *n_in = E;
        return true;
    case CUDA_T_WO:
        *n_out = E;
        *n_in = qd;
        return true;
    case CUDA_T_GATE:
    case CUDA_T_UP:
        *n_out = hp->n_ff;
        *n_in = E;
        return true;
    case CUDA_T_DOWN:
        *n_out = E;
        *n_in = hp->n_ff;
        return true;
    default:
        return false;
    }
}

static void synth_params(const mdl_hparams *hp, int kind, float *mean, float *amp)
{
    int64_t n_out = 0, n_in = 1;
    tensor_shape(hp, kind, &n_out, &n_in);
    if (is_norm(kind)) {
        *mean = 1.0f;
        *amp = 0.2f;
    } else {
        *mean = 0.0f;
        *amp = (float)sqrt(3.0 / (double)n_in); /* uniform [-a, a) has std a/sqrt(3) */
    }
}

extern "C" float cuda_model_synth_value(const mdl_hparams *hp, uint64_t seed, int layer, int kind,
                                        int64_t i)
{
    float mean, amp;
    if (kind == CUDA_T_OUTPUT && hp->tied_output) kind = CUDA_T_TOK_EMBD;
    synth_params(hp, kind, &mean, &amp);
    return synth_at(synth_key(seed, is_global(kind) ? -1 : layer, kind), i, mean, amp);
}

static __global__ void synth_bf16_kernel(bf16 *dst, int64_t n, uint64_t key, float mean, float amp)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(synth_at(key, i, mean, amp));
}

static __global__ void synth_f32_kernel(float *dst, int64_t n, uint64_t key, float mean, float amp)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = synth_at(key, i, mean, amp);
}

/* ---- allocation ------------------------------------------------------------------------------ */

int cuda_model_tensor_locate(const cuda_model *m, int layer, int kind, void **ptr, int64_t *n,
                             bool *is_f32)
{
    const mdl_hparams *hp = &m->hp;
    int64_t n_out, n_in;
    if (!tensor_shape(hp, kind, &n_out, &n_in)) return -EINVAL;
    if (!is_global(kind) && (layer < 0 || layer >= hp->n_layer)) return -EINVAL;
    int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    const struct cuda_layer *L = is_global(kind) ? NULL : &m->layers[layer];
    *n = n_out * n_in;
    *is_f32 = is_norm(kind);
    switch (kind) {
    case CUDA_T_TOK_EMBD:
        *ptr = m->tok_embd;
        break;
    case CUDA_T_OUTPUT_NORM:
        *ptr = m->output_norm;
        break;
    case CUDA_T_OUTPUT:
        *ptr = m->output;
        break;
    case CUDA_T_ATTN_NORM:
        *ptr = L->attn_norm;
        break;
    case CUDA_T_FFN_NORM:
        *ptr = L->ffn_norm;
        break;
    case CUDA_T_WQ:
        *ptr = L->wqkv;
        break;
    case CUDA_T_WK:
        *ptr = L->wqkv + qd * E;
        break;
    case CUDA_T_WV:
        *ptr = L->wqkv + (qd + kvd) * E;
        break;
    case CUDA_T_WO:
        *ptr = L->wo;
        break;
    case CUDA_T_GATE:
        *ptr = L->wgu;
        break;
    case CUDA_T_UP:
        *ptr = L->wgu + hp->n_ff * E;
        break;
    case CUDA_T_DOWN:
        *ptr = L->wdown;
        break;
    default:
        return -EINVAL;
    }
    return 0;
}

extern "C" int64_t cuda_model_tensor_numel(const cuda_model *m, int layer, int kind)
{
    void *p;
    int64_t n;
    bool f;
    return m && cuda_model_tensor_locate(m, layer, kind, &p, &n, &f) == 0 ? n : 0;
}

extern "C" int cuda_model_tensor_download(const cuda_model *m, int layer, int kind, float *out,
                                          int64_t n)
{
    void *p;
    int64_t numel;
    bool f32;
    if (!m || !out || cuda_model_tensor_locate(m, layer, kind, &p, &numel, &f32) || n != numel)
        return -EINVAL;
    CUDA_TRY(cudaSetDevice(m->dev));
    if (f32) {
        CUDA_TRY(cudaMemcpy(out, p, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost));
        return 0;
    }
    uint16_t *tmp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)n);
    if (!tmp) return -ENOMEM;
    cudaError_t e = cudaMemcpy(tmp, p, sizeof(uint16_t) * (size_t)n, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        free(tmp);
        return cuda_hip_fail(e, "cudaMemcpy(tensor)", __FILE__, __LINE__);
    }
    for (int64_t i = 0; i < n; i++)
        out[i] = bf16_bits_to_f32(tmp[i]);
    free(tmp);
    return 0;
}

static int dmalloc(cuda_model *m, void **p, size_t bytes, cm_err *err)
{
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = NULL;
        cudaGetLastError();
        return cm_err_set(err, -ENOMEM,
                          "cuda model: cannot allocate %.1f MiB of GPU memory "
                          "(%.2f GiB already taken by weights): %s",
                          (double)bytes / 1048576.0, (double)m->bytes / 1073741824.0,
                          cudaGetErrorString(e));
    }
    m->bytes += bytes;
    return 0;
}

static int alloc_all(cuda_model *m, cm_err *err)
{
    const mdl_hparams *hp = &m->hp;
    size_t E = (size_t)hp->n_embd, V = (size_t)hp->n_vocab, F = (size_t)hp->n_ff;
    size_t qd = (size_t)(hp->n_head * hp->head_dim), kvd = (size_t)(hp->n_head_kv * hp->head_dim);
    m->layers = (struct cuda_layer *)calloc((size_t)hp->n_layer, sizeof(struct cuda_layer));
    if (!m->layers) return cm_err_set(err, -ENOMEM, "cuda model: out of memory");
    int rc;
    if ((rc = dmalloc(m, (void **)&m->tok_embd, 2 * V * E, err))) return rc;
    if (hp->tied_output)
        m->output = m->tok_embd;
    else if ((rc = dmalloc(m, (void **)&m->output, 2 * V * E, err)))
        return rc;
    if ((rc = dmalloc(m, (void **)&m->output_norm, 4 * E, err))) return rc;
    for (int64_t il = 0; il < hp->n_layer; il++) {
        struct cuda_layer *L = &m->layers[il];
        if ((rc = dmalloc(m, (void **)&L->attn_norm, 4 * E, err)) ||
            (rc = dmalloc(m, (void **)&L->ffn_norm, 4 * E, err)) ||
            (rc = dmalloc(m, (void **)&L->wqkv, 2 * (qd + 2 * kvd) * E, err)) ||
            (rc = dmalloc(m, (void **)&L->wo, 2 * E * qd, err)) ||
            (rc = dmalloc(m, (void **)&L->wgu, 2 * 2 * F * E, err)) ||
            (rc = dmalloc(m, (void **)&L->wdown, 2 * E * F, err)))
            return rc;
    }
    return 0;
}

extern "C" void cuda_model_free(cuda_model *m)
{
    if (!m) return;
    cudaSetDevice(m->dev);
    if (m->layers) {
        for (int64_t il = 0; il < m->hp.n_layer; il++) {
            struct cuda_layer *L = &m->layers[il];
            cudaFree(L->attn_norm);
            cudaFree(L->ffn_norm);
            cudaFree(L->wqkv);
            cudaFree(L->wo);
            cudaFree(L->wgu);
            cudaFree(L->wdown);
        }
    }
    if (m->output != m->tok_embd) cudaFree(m->output);
    cudaFree(m->tok_embd);
    cudaFree(m->output_norm);
    free(m->layers);
    free(m->rope_freqs);
    free(m);
}

extern "C" const mdl_hparams *cuda_model_hparams(const cuda_model *m)
{
    return &m->hp;
}

extern "C" const float *cuda_model_rope_freqs(const cuda_model *m)
{
    return m->rope_freqs;
}

extern "C" size_t cuda_model_bytes(const cuda_model *m)
{
    return m->bytes;
}

static int check_device(int dev, cm_err *err)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        return cm_err_set(err, -ENODEV, "no CUDA device is visible%s%s",
                          e != cudaSuccess ? ": " : "",
                          e != cudaSuccess ? cudaGetErrorString(e) : "");
    }
    if (dev < 0 || dev >= n)
        return cm_err_set(err, -ENODEV, "CUDA device %d does not exist (%d visible)", dev, n);
    e = cudaSetDevice(dev);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "cudaSetDevice(%d): %s", dev, cudaGetErrorString(e));
    return 0;
}

static int check_hparams(const mdl_hparams *hp, cm_err *err)
{
    if (hp->n_layer <= 0 || hp->n_embd <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_head % hp->n_head_kv || hp->head_dim <= 0 || hp->head_dim > 256 || hp->head_dim % 8 ||
        hp->n_ff <= 0 || hp->n_vocab <= 0 || hp->n_vocab > INT32_MAX || hp->n_rot <= 0 ||
        hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "cuda model: hyper-parameters not supported "
                          "(heads %lld/%lld, head_dim %lld, n_rot %lld)",
                          (long long)hp->n_head, (long long)hp->n_head_kv, (long long)hp->head_dim,
                          (long long)hp->n_rot);
    return 0;
}

/* ---- upload of a CPU model ------------------------------------------------------------------- */

struct deq_job {
    const cpu_weight *w;
    int64_t r0, r1; /* rows of this slice */
    uint16_t *dst;  /* [r1 - r0][n_in] bf16 bits */
    float *rowbuf;  /* [nth][n_in] */
};

static void deq_rows(void *p, int ith, int nth)
{
    struct deq_job *j = (struct deq_job *)p;
    int64_t lo, hi, n_in = j->w->n_in;
    cm_split_range(j->r1 - j->r0, ith, nth, &lo, &hi);
    float *row = j->rowbuf + (size_t)ith * (size_t)n_in;
    for (int64_t r = lo; r < hi; r++) {
        tn_dequant_row(j->w->type, (const char *)j->w->data + (size_t)(j->r0 + r) * j->w->row_bytes,
                       row, n_in);
        uint16_t *d = j->dst + (size_t)r * (size_t)n_in;
        for (int64_t i = 0; i < n_in; i++)
            d[i] = f32_to_bf16_bits(row[i]);
    }
}

struct uploader {
    cm_pool *pool;
    uint16_t *stage; /* SLICE_BYTES */
    float *rowbuf;
    int64_t rowbuf_n; /* floats per thread */
};

static int upload_weight(struct uploader *u, const cpu_weight *w, bf16 *dst, const char *name,
                         cm_err *err)
{
    if (w->n_in > u->rowbuf_n)
        return cm_err_set(err, -CM_EUNSUPPORTED, "cuda model: %s rows of %lld are too long", name,
                          (long long)w->n_in);
    int64_t rows_per = (int64_t)(SLICE_BYTES / (2 * (size_t)w->n_in));
    if (rows_per < 1) rows_per = 1;
    for (int64_t r0 = 0; r0 < w->n_out; r0 += rows_per) {
        struct deq_job j = {w, r0, CM_MIN(r0 + rows_per, w->n_out), u->stage, u->rowbuf};
        cm_pool_run(u->pool, deq_rows, &j);
        cudaError_t e =
            cudaMemcpy(dst + (size_t)r0 * (size_t)w->n_in, u->stage,
                       2 * (size_t)(j.r1 - r0) * (size_t)w->n_in, cudaMemcpyHostToDevice);
        if (e != cudaSuccess)
            return cm_err_set(err, CUDA_ERR(e), "cuda model: upload of %s: %s", name,
                              cudaGetErrorString(e));
    }
    return 0;
}

static int upload_vec(const float *src, float *dst, int64_t n, const char *name, cm_err *err)
{
    cudaError_t e = cudaMemcpy(dst, src, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "cuda model: upload of %s: %s", name,
                          cudaGetErrorString(e));
    return 0;
}

extern "C" cuda_model *cuda_model_load(const mdl_model *cm, int dev, cm_err *err)
{
    if (!cm) {
        cm_err_set(err, -EINVAL, "cuda model: no CPU model");
        return NULL;
    }
    if (check_device(dev, err) || check_hparams(&cm->hp, err)) return NULL;
    cuda_model *m = (cuda_model *)calloc(1, sizeof(*m));
    struct uploader u = {};
    const mdl_hparams *hp = &cm->hp;
    int64_t E = hp->n_embd, qd = hp->n_head * hp->head_dim, kvd = hp->n_head_kv * hp->head_dim;
    if (!m) goto oom;
    m->hp = *hp;
    m->dev = dev;
    if (cm->rope_freqs) {
        m->rope_freqs = (float *)malloc(sizeof(float) * (size_t)(hp->n_rot / 2));
        if (!m->rope_freqs) goto oom;
        memcpy(m->rope_freqs, cm->rope_freqs, sizeof(float) * (size_t)(hp->n_rot / 2));
    }
    if (alloc_all(m, err)) goto fail;
    u.pool = cm_pool_init(cm_num_cpus());
    u.stage = (uint16_t *)malloc(SLICE_BYTES);
    u.rowbuf_n = CM_MAX(CM_MAX(E, qd), hp->n_ff);
    u.rowbuf = (float *)malloc(sizeof(float) * (size_t)u.rowbuf_n *
                               (size_t)(u.pool ? cm_pool_size(u.pool) : 1));
    if (!u.pool || !u.stage || !u.rowbuf) goto oom;
    if (upload_weight(&u, &cm->tok_embd, m->tok_embd, "token_embd", err) ||
        (!hp->tied_output && upload_weight(&u, &cm->output, m->output, "output", err)) ||
        upload_vec(cm->output_norm, m->output_norm, E, "output_norm", err))
        goto fail;
    for (int64_t il = 0; il < hp->n_layer; il++) {
        const mdl_layer *S = &cm->layers[il];
        struct cuda_layer *L = &m->layers[il];
        char nm[64];
        snprintf(nm, sizeof(nm), "layer %lld", (long long)il);
        if (upload_vec(S->attn_norm, L->attn_norm, E, nm, err) ||
            upload_vec(S->ffn_norm, L->ffn_norm, E, nm, err) ||
            upload_weight(&u, &S->wq, L->wqkv, nm, err) ||
            upload_weight(&u, &S->wk, L->wqkv + qd * E, nm, err) ||
            upload_weight(&u, &S->wv, L->wqkv + (qd + kvd) * E, nm, err) ||
            upload_weight(&u, &S->wo, L->wo, nm, err) ||
            upload_weight(&u, &S->w_gate, L->wgu, nm, err) ||
            upload_weight(&u, &S->w_up, L->wgu + hp->n_ff * E, nm, err) ||
            upload_weight(&u, &S->w_down, L->wdown, nm, err))
            goto fail;
    }
    cm_pool_free(u.pool);
    free(u.stage);
    free(u.rowbuf);
    return m;
oom:
    cm_err_set(err, -ENOMEM, "cuda model: out of host memory");
fail:
    if (u.pool) cm_pool_free(u.pool);
    free(u.stage);
    free(u.rowbuf);
    cuda_model_free(m);
    return NULL;
}

/* ---- synthetic models ------------------------------------------------------------------------ */

/* Llama-3 style frequency divisors (the values GGUF stores as rope_freqs.weight). */
static void llama3_factors(float *out, int n_rot, double base, double factor, double low,
                           double high, double orig_ctx)
{
    const double lo_wl = orig_ctx / low, hi_wl = orig_ctx / high;
    for (int i = 0; i < n_rot / 2; i++) {
        double freq = pow(base, -2.0 * i / (double)n_rot);
        double wl = 2.0 * M_PI / freq;
        double f;
        if (wl < hi_wl)
            f = 1.0;
        else if (wl > lo_wl)
            f = factor;
        else {
            double s = (orig_ctx / wl - low) / (high - low);
            f = 1.0 / ((1.0 - s) / factor + s);
        }
        out[i] = (float)f;
    }
}

static int synth_fill(const cuda_model *m, uint64_t seed, int layer, int kind, cm_err *err)
{
    void *p;
    int64_t n;
    bool f32;
    if (cuda_model_tensor_locate(m, layer, kind, &p, &n, &f32)) return -EINVAL;
    float mean, amp;
    synth_params(&m->hp, kind, &mean, &amp);
    uint64_t key = synth_key(seed, is_global(kind) ? -1 : layer, kind);
    unsigned blocks = (unsigned)CM_MIN((n + 255) / 256, (int64_t)65536);
    if (f32)
        synth_f32_kernel<<<blocks, 256>>>((float *)p, n, key, mean, amp);
    else
        synth_bf16_kernel<<<blocks, 256>>>((bf16 *)p, n, key, mean, amp);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "cuda model: synthetic weights: %s",
                          cudaGetErrorString(e));
    return 0;
}

extern "C" cuda_model *cuda_model_synthetic(const char *shape, uint64_t seed, int dev, cm_err *err)
{
    mdl_hparams hp;
    memset(&hp, 0, sizeof(hp));
    snprintf(hp.arch, sizeof(hp.arch), "llama");
    hp.rope_style = CPU_ROPE_NORM;
    hp.rope_linear_scale = 1.0;
    hp.rms_eps = 1e-5f;
    double factor = 0; /* llama3 rope scaling factor, 0 = plain */
    if (shape && !strcmp(shape, "llama3-8b")) {
        hp.n_layer = 32;
        hp.n_embd = 4096;
        hp.n_head = 32;
        hp.n_head_kv = 8;
        hp.head_dim = 128;
        hp.n_ff = 14336;
        hp.n_vocab = 128256;
        hp.rope_base = 500000.0;
        hp.n_ctx_train = 131072;
        factor = 8;
    } else if (shape && !strcmp(shape, "llama3-1b")) {
        hp.n_layer = 16;
        hp.n_embd = 2048;
        hp.n_head = 32;
        hp.n_head_kv = 8;
        hp.head_dim = 64;
        hp.n_ff = 8192;
        hp.n_vocab = 128256;
        hp.rope_base = 500000.0;
        hp.n_ctx_train = 131072;
        hp.tied_output = true;
        factor = 32;
    } else if (shape && !strcmp(shape, "smollm2-135m")) {
        hp.n_layer = 30;
        hp.n_embd = 576;
        hp.n_head = 9;
        hp.n_head_kv = 3;
        hp.head_dim = 64;
        hp.n_ff = 1536;
        hp.n_vocab = 49152;
        hp.rope_base = 100000.0;
        hp.n_ctx_train = 8192;
        hp.tied_output = true;
    } else if (shape && !strcmp(shape, "tiny")) {
        hp.n_layer = 4;
        hp.n_embd = 512;
        hp.n_head = 4;
        hp.n_head_kv = 2;
        hp.head_dim = 128;
        hp.n_ff = 1024;
        hp.n_vocab = 4096;
        hp.rope_base = 500000.0;
        hp.n_ctx_train = 8192;
        factor = 8;
    } else {
        cm_err_set(err, -EINVAL,
                   "unknown synthetic shape '%s' (llama3-8b, llama3-1b, "
                   "smollm2-135m, tiny)",
                   shape ? shape : "(null)");
        return NULL;
    }
    hp.n_rot = hp.head_dim;
    if (check_device(dev, err)) return NULL;
    cuda_model *m = (cuda_model *)calloc(1, sizeof(*m));
    if (!m) {
        cm_err_set(err, -ENOMEM, "cuda model: out of host memory");
        return NULL;
    }
    m->hp = hp;
    m->dev = dev;
    if (factor > 0) {
        m->rope_freqs = (float *)malloc(sizeof(float) * (size_t)(hp.n_rot / 2));
        if (!m->rope_freqs) {
            cm_err_set(err, -ENOMEM, "cuda model: out of host memory");
            goto fail;
        }
        llama3_factors(m->rope_freqs, (int)hp.n_rot, hp.rope_base, factor, 1.0, 4.0, 8192.0);
    }
    if (alloc_all(m, err)) goto fail;
    if (synth_fill(m, seed, -1, CUDA_T_TOK_EMBD, err) ||
        (!hp.tied_output && synth_fill(m, seed, -1, CUDA_T_OUTPUT, err)) ||
        synth_fill(m, seed, -1, CUDA_T_OUTPUT_NORM, err))
        goto fail;
    for (int il = 0; il < (int)hp.n_layer; il++)
        for (int k = CUDA_T_ATTN_NORM; k < CUDA_T_COUNT; k++)
            if (synth_fill(m, seed, il, k, err)) goto fail;
    {
        cudaError_t e = cudaDeviceSynchronize();
        if (e != cudaSuccess) {
            cm_err_set(err, CUDA_ERR(e), "cuda model: synthetic weights: %s",
                       cudaGetErrorString(e));
            goto fail;
        }
    }
    return m;
fail:
    cuda_model_free(m);
    return NULL;
}
