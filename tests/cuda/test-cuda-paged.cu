/*
 * test-cuda-paged.cu — the page-pointer addressing of cuda_kv_view (kptr_dev / vptr_dev,
 * cuda-hip.h) in every kernel that reads K or V.
 *
 * Every case draws random K/V codes (bf16 or fp8 e4m3) and queries and builds two views of the
 * same tokens: (a) contiguous [T][n_head_kv][head_dim], (b) page pointers: pages of page_tokens
 * tokens laid out [n_head_kv][page_tokens][head_dim] (the kvstore block layout), K and V pages
 * at shuffled positions of one GPU pool, every third page in mapped host memory
 * (cudaHostAlloc(cudaHostAllocMapped) + cudaHostGetDevicePointer, read over the bus); the
 * rest of the pool and the tail of the last page hold garbage. Then every kernel runs through
 * both views with the same inputs and must give BIT-IDENTICAL results (the arithmetic does not
 * depend on the addressing):
 *   - cuda_hip_mask_estimate, prefill (n_tok > 1) and decode (first_stage 0, then 1 and the
 *     last stage from the caches of the previous step), with the default scan kernel,
 *     IHIP_MASK_SCAN=old and =fast1 and, in prefill, IHIP_MASK_PREFILL=mma: idx, ks and the stage caches
 *     equal (the page-pointer view has no V: mask estimation reads only K);
 *   - cuda_hip_bsa decode (every IHIP_ATTN_DECODE version) and prefill (IHIP_ATTN_PREFILL mma
 *     and fp32) on the estimated masks: outputs memcmp-equal;
 *   - cuda_attn_dense decode and prefill likewise.
 * Outputs and masks are poisoned before each run. Cases cover page_tokens 16 and 64, T not a
 * multiple of the page, GQA 32/8 d 128 and 9/3 d 64, both pruning RoPE modes (normal layer:
 * relative; special: chunk-indexed). One dense decode through page pointers is also compared
 * with cpu_attn_dense (rel. L2 error <= 2e-3, the bound of test-cuda-attn). Argument checks:
 * page pointers without page_tokens, or without V pointers for attention, are -EINVAL.
 *
 *   test-cuda-paged [--quick] [--seed N]
 * Exit 0 pass, 1 fail, 77 no GPU.
 */
#include "backend/cuda/cuda-hip.h"
#include "backend/cuda/cuda.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "FATAL %s:%d: %s: %s\n", __FILE__, __LINE__, #call,                     \
                    cudaGetErrorString(e_));                                                       \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define REQ(cond, ...)                                                                             \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FATAL %s:%d: ", __FILE__, __LINE__);                                  \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static int n_fail;
static cm_pool *g_pool;

/* ---- random numbers (splitmix64) ------------------------------------------------------------ */

static uint64_t rng_state;
static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rndf(void) /* uniform [-1, 1) */
{
    return (float)((double)(rnd() >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float from_fp8(uint8_t b) /* e4m3 */
{
    int e = (b >> 3) & 15, m = b & 7;
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return (b & 0x80) ? -v : v;
}
static uint8_t rnd_fp8(void) /* exponent 4..9, any mantissa and sign: no NaN codes */
{
    uint64_t r = rnd();
    return (uint8_t)(((r & 1) << 7) | ((4 + (r >> 1) % 6) << 3) | ((r >> 8) & 7));
}

/* ---- the two views of one K/V ----------------------------------------------------------------- */

typedef struct kvpair {
    int64_t T;
    int Hkv, d, dtype, pt;
    size_t esz, row;        /* bytes per element, per token (all heads) */
    void *kraw, *vraw;      /* host [T][Hkv][d] codes */
    float *kf, *vf;         /* host f32 values (CPU reference) */
    void *k_dev, *v_dev;    /* (a) contiguous */
    void *pool_dev;         /* (b) GPU page pool */
    void *host_pool;        /* (b) mapped host pages */
    uint64_t *kptr_dev, *vptr_dev;
    int64_t n_pages, n_host;
    cuda_kv_view flat, paged;
} kvpair;

/* page p of K (which = 0) or V (1), copied into its block layout at dst */
static void page_fill(const kvpair *kv, int which, int64_t p, uint8_t *dst)
{
    const uint8_t *src = (const uint8_t *)(which ? kv->vraw : kv->kraw);
    const size_t hd = (size_t)kv->d * kv->esz;
    memset(dst, 0x7b, (size_t)kv->Hkv * kv->pt * hd); /* tail of the last page: garbage */
    for (int r = 0; r < kv->pt; r++) {
        int64_t t = p * kv->pt + r;
        if (t >= kv->T) break;
        for (int h = 0; h < kv->Hkv; h++)
            memcpy(dst + ((size_t)h * kv->pt + r) * hd, src + (size_t)t * kv->row + (size_t)h * hd, hd);
    }
}

static void kv_make(kvpair *kv, int64_t T, int Hkv, int d, int dtype, int pt)
{
    memset(kv, 0, sizeof(*kv));
    kv->T = T;
    kv->Hkv = Hkv;
    kv->d = d;
    kv->dtype = dtype;
    kv->pt = pt;
    kv->esz = dtype == CUDA_KV_BF16 ? 2 : 1;
    kv->row = (size_t)Hkv * d * kv->esz;
    const size_t n_el = (size_t)T * Hkv * d;
    const float k_scale = dtype == CUDA_KV_FP8 ? 0.5f : 1.0f, v_scale = dtype == CUDA_KV_FP8 ? 0.25f : 1.0f;
    kv->kraw = malloc(n_el * kv->esz);
    kv->vraw = malloc(n_el * kv->esz);
    kv->kf = (float *)malloc(n_el * sizeof(float));
    kv->vf = (float *)malloc(n_el * sizeof(float));
    REQ(kv->kraw && kv->vraw && kv->kf && kv->vf, "out of host memory");
    float bias = 0.0f; /* per-97-token bias: some regions score higher, like real attention */
    for (size_t i = 0; i < n_el; i++) {
        if (i % ((size_t)Hkv * d) == 0 && (i / ((size_t)Hkv * d)) % 97 == 0) bias = rndf();
        if (dtype == CUDA_KV_BF16) {
            uint16_t a = to_bf16(rndf() * 1.5f + bias), b = to_bf16(rndf());
            ((uint16_t *)kv->kraw)[i] = a;
            ((uint16_t *)kv->vraw)[i] = b;
            kv->kf[i] = from_bf16(a);
            kv->vf[i] = from_bf16(b);
        } else {
            uint8_t a = rnd_fp8(), b = rnd_fp8();
            ((uint8_t *)kv->kraw)[i] = a;
            ((uint8_t *)kv->vraw)[i] = b;
            kv->kf[i] = from_fp8(a) * k_scale;
            kv->vf[i] = from_fp8(b) * v_scale;
        }
    }
    /* (a) contiguous */
    CK(cudaMalloc(&kv->k_dev, n_el * kv->esz));
    CK(cudaMalloc(&kv->v_dev, n_el * kv->esz));
    CK(cudaMemcpy(kv->k_dev, kv->kraw, n_el * kv->esz, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(kv->v_dev, kv->vraw, n_el * kv->esz, cudaMemcpyHostToDevice));
    kv->flat.k_dev = kv->k_dev;
    kv->flat.v_dev = kv->v_dev;
    kv->flat.dtype = dtype;
    kv->flat.k_scale = k_scale;
    kv->flat.v_scale = v_scale;
    kv->flat.n_kv = T;

    /* (b) page pointers: 2 * n_pages K/V pages; every third one in mapped host memory, the
     * others at a shuffled permutation of 2 * n_pages + 5 GPU page slots */
    const int64_t np = (T + pt - 1) / pt, n_all = 2 * np;
    const size_t pbytes = (size_t)Hkv * pt * d * kv->esz; /* a multiple of 16 */
    kv->n_pages = np;
    int64_t n_host = 0;
    for (int64_t i = 0; i < n_all; i++) n_host += i % 3 == 1;
    const int64_t n_slots = n_all - n_host + 5;
    int64_t *perm = (int64_t *)malloc(sizeof(int64_t) * (size_t)n_slots);
    uint64_t *kp = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)np);
    uint64_t *vp = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)np);
    uint8_t *gpu_img = (uint8_t *)malloc((size_t)n_slots * pbytes);
    REQ(perm && kp && vp && gpu_img, "out of host memory");
    for (int64_t i = 0; i < n_slots; i++) perm[i] = i;
    for (int64_t i = n_slots - 1; i > 0; i--) {
        int64_t j = (int64_t)(rnd() % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    memset(gpu_img, 0x7b, (size_t)n_slots * pbytes); /* unused slots: garbage */
    CK(cudaMalloc(&kv->pool_dev, (size_t)n_slots * pbytes));
    uint8_t *hp = NULL, *hp_dev = NULL;
    if (n_host > 0) {
        CK(cudaHostAlloc(&kv->host_pool, (size_t)n_host * pbytes, cudaHostAllocMapped));
        CK(cudaHostGetDevicePointer((void **)&hp_dev, kv->host_pool, 0));
        hp = (uint8_t *)kv->host_pool;
    }
    int64_t gi = 0, hi = 0;
    for (int64_t i = 0; i < n_all; i++) { /* i = 2p (K of page p) or 2p + 1 (V) */
        const int64_t p = i / 2;
        const int which = (int)(i % 2);
        uint64_t addr;
        if (i % 3 == 1) {
            page_fill(kv, which, p, hp + (size_t)hi * pbytes);
            addr = (uint64_t)(uintptr_t)(hp_dev + (size_t)hi * pbytes);
            hi++;
        } else {
            const int64_t s = perm[gi++];
            page_fill(kv, which, p, gpu_img + (size_t)s * pbytes);
            addr = (uint64_t)(uintptr_t)((uint8_t *)kv->pool_dev + (size_t)s * pbytes);
        }
        (which ? vp : kp)[p] = addr;
    }
    kv->n_host = n_host;
    CK(cudaMemcpy(kv->pool_dev, gpu_img, (size_t)n_slots * pbytes, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&kv->kptr_dev, sizeof(uint64_t) * (size_t)np));
    CK(cudaMalloc(&kv->vptr_dev, sizeof(uint64_t) * (size_t)np));
    CK(cudaMemcpy(kv->kptr_dev, kp, sizeof(uint64_t) * (size_t)np, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(kv->vptr_dev, vp, sizeof(uint64_t) * (size_t)np, cudaMemcpyHostToDevice));
    kv->paged = kv->flat;
    kv->paged.k_dev = kv->paged.v_dev = NULL; /* unused in this mode: must not be needed */
    kv->paged.page_tokens = pt;
    kv->paged.kptr_dev = kv->kptr_dev;
    kv->paged.vptr_dev = kv->vptr_dev;
    free(perm);
    free(kp);
    free(vp);
    free(gpu_img);
}

static void kv_free(kvpair *kv)
{
    free(kv->kraw);
    free(kv->vraw);
    free(kv->kf);
    free(kv->vf);
    cudaFree(kv->k_dev);
    cudaFree(kv->v_dev);
    cudaFree(kv->pool_dev);
    cudaFree(kv->kptr_dev);
    cudaFree(kv->vptr_dev);
    if (kv->host_pool) cudaFreeHost(kv->host_pool);
    memset(kv, 0, sizeof(*kv));
}

/* ---- comparisons ---------------------------------------------------------------------------- */

static void report(bool ok, const char *label, const char *what, const char *why)
{
    printf("%s %-44s %s%s%s\n", ok ? "ok  " : "FAIL", label, what, why[0] ? ": " : "", why);
    if (!ok) n_fail++;
}

static void poison_mask(cuda_hip_mask *m, int from_stage)
{
    CK(cudaMemset(m->idx_dev, 0x3c, sizeof(int64_t) * (size_t)m->max_qblk * m->kb));
    CK(cudaMemset(m->ks_dev, 0xc3, sizeof(int32_t) * (size_t)m->max_qblk));
    for (int s = from_stage + 1; s < m->n_stages; s++) {
        CK(cudaMemset(m->cand_L_dev[s], 0x3c, sizeof(int64_t) * (size_t)m->max_qblk * m->cand_cap[s]));
        CK(cudaMemset(m->cand_R_dev[s], 0x3c, sizeof(int64_t) * (size_t)m->max_qblk * m->cand_cap[s]));
        CK(cudaMemset(m->cand_n_dev[s], 0xc3, sizeof(int32_t) * (size_t)m->max_qblk));
    }
}

/* Both masks (same geometry) downloaded and compared whole; the flat one must be a real mask
 * (every row's ks in [0, kb], at least one block selected). */
static void compare_masks(const char *label, const char *what, const cuda_hip_mask *a,
                          const cuda_hip_mask *b, const hip_layer_config *lc, int n_qblk)
{
    hip_mask ha, hb;
    REQ(hip_mask_init(&ha, lc, a->max_qblk) == 0 && hip_mask_init(&hb, lc, a->max_qblk) == 0, "mask");
    REQ(cuda_hip_mask_download(a, &ha, NULL) == 0 && cuda_hip_mask_download(b, &hb, NULL) == 0, "download");
    char why[160] = "";
    bool ok = true;
    int64_t sel = 0;
    for (int q = 0; q < n_qblk; q++) {
        if (ha.ks[q] < 0 || ha.ks[q] > ha.kb) {
            snprintf(why, sizeof why, "flat ks[%d] = %d not in [0, %d]", q, ha.ks[q], ha.kb);
            ok = false;
        }
        sel += ha.ks[q] > 0 ? ha.ks[q] : 0;
    }
    if (ok && sel == 0) {
        snprintf(why, sizeof why, "flat mask selects nothing");
        ok = false;
    }
    const size_t mq = (size_t)ha.max_qblk;
    if (ok && memcmp(ha.idx, hb.idx, sizeof(int64_t) * mq * ha.kb)) {
        snprintf(why, sizeof why, "idx differs");
        ok = false;
    }
    if (ok && memcmp(ha.ks, hb.ks, sizeof(int32_t) * mq)) {
        snprintf(why, sizeof why, "ks differs");
        ok = false;
    }
    for (int s = 1; ok && s < ha.n_stages; s++) {
        const size_t cap = (size_t)ha.cand_cap[s];
        if (memcmp(ha.cand_L[s], hb.cand_L[s], sizeof(int64_t) * mq * cap) ||
            memcmp(ha.cand_R[s], hb.cand_R[s], sizeof(int64_t) * mq * cap) ||
            memcmp(ha.cand_n[s], hb.cand_n[s], sizeof(int32_t) * mq)) {
            snprintf(why, sizeof why, "stage-%d cache differs", s);
            ok = false;
        }
    }
    char what2[96];
    snprintf(what2, sizeof what2, "%s (%lld blocks)", what, (long long)sel);
    report(ok, label, what2, why);
    hip_mask_free(&ha);
    hip_mask_free(&hb);
}

/* Two output buffers of n floats: both fully written (finite), memcmp-equal. */
static void compare_out(const char *label, const char *what, int rc_a, int rc_b, const float *a_dev,
                        const float *b_dev, size_t n)
{
    float *a = (float *)malloc(n * sizeof(float)), *b = (float *)malloc(n * sizeof(float));
    REQ(a && b, "out of host memory");
    CK(cudaMemcpy(a, a_dev, n * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b, b_dev, n * sizeof(float), cudaMemcpyDeviceToHost));
    char why[160] = "";
    bool ok = true;
    if (rc_a || rc_b) {
        snprintf(why, sizeof why, "rc %d / %d", rc_a, rc_b);
        ok = false;
    }
    for (size_t i = 0; ok && i < n; i++)
        if (!isfinite(a[i])) {
            snprintf(why, sizeof why, "flat output %zu not finite", i);
            ok = false;
        }
    if (ok && memcmp(a, b, n * sizeof(float))) {
        size_t i = 0;
        while (i < n && !memcmp(&a[i], &b[i], sizeof(float))) i++;
        snprintf(why, sizeof why, "first difference at %zu: %.9g vs %.9g", i, a[i], b[i]);
        ok = false;
    }
    report(ok, label, what, why);
    free(a);
    free(b);
}

/* ---- one case ------------------------------------------------------------------------------- */

typedef struct pcase {
    int64_t T;
    int n_tok; /* prefill queries */
    int H, Hkv, d, dtype, pt;
    bool special;
    int style;
} pcase;

static const char *const mask_scan[] = {NULL, "old", "fast1"}; /* IHIP_MASK_SCAN */
static const char *const decode_ver[] = {NULL, "v1", "v2", "v3", "v4"}; /* IHIP_ATTN_DECODE */
static const char *const prefill_ker[] = {"mma", "fp32"};        /* IHIP_ATTN_PREFILL */

static void set_env(const char *name, const char *v)
{
    if (v) setenv(name, v, 1);
    else unsetenv(name);
}

static void run_case(const pcase *c, cuda_hip_work *w)
{
    const int64_t T = c->T;
    const int H = c->H, Hkv = c->Hkv, d = c->d;
    char label[128];
    snprintf(label, sizeof label, "T %lld H %d/%d d %d %s page %d %s %s", (long long)T, H, Hkv, d,
             c->dtype == CUDA_KV_BF16 ? "bf16" : "fp8", c->pt, c->special ? "special" : "normal",
             c->style == CPU_ROPE_NEOX ? "neox" : "norm");
    kvpair kv;
    kv_make(&kv, T, Hkv, d, c->dtype, c->pt);

    cpu_rope rope;
    REQ(cpu_rope_init(&rope, c->style, d, d, c->style == CPU_ROPE_NEOX ? 10000.0 : 500000.0, 1.0,
                      NULL, 4096) == 0, "rope");
    cuda_rope crope;
    REQ(cuda_rope_init(&crope, &rope) == 0, "cuda rope");
    hip_layer_config lc;
    hip_layer_config_default(&lc, c->special);
    hip_config cfg;
    hip_config_default(&cfg);

    const int64_t nq_tok = c->n_tok > 2 ? c->n_tok : 2;
    const size_t nq = (size_t)nq_tok * H * d;
    float *q = (float *)malloc(nq * sizeof(float));
    REQ(q, "out of host memory");
    for (size_t i = 0; i < nq; i++) q[i] = rndf() * 2.5f;
    float *q_dev, *oa_dev, *ob_dev;
    CK(cudaMalloc(&q_dev, nq * sizeof(float)));
    CK(cudaMalloc(&oa_dev, nq * sizeof(float)));
    CK(cudaMalloc(&ob_dev, nq * sizeof(float)));
    CK(cudaMemcpy(q_dev, q, nq * sizeof(float), cudaMemcpyHostToDevice));

    cuda_hip_args ga, gb;
    memset(&ga, 0, sizeof ga);
    ga.layer = &lc;
    ga.block_size_q = cfg.block_sparse_block_size_q;
    ga.block_size_k = cfg.block_sparse_block_size_k;
    ga.using_extend = true;
    ga.shape.n_head = H;
    ga.shape.n_head_kv = Hkv;
    ga.shape.head_dim = d;
    ga.shape.scale = 1.0f / sqrtf((float)d);
    ga.rope = &crope;
    gb = ga;
    ga.kv = kv.flat;
    gb.kv = kv.paged;
    const int max_qblk = (int)((c->n_tok + ga.block_size_q - 1) / ga.block_size_q);
    cuda_hip_mask ma, mb;
    REQ(cuda_hip_mask_init(&ma, &lc, max_qblk) == 0 && cuda_hip_mask_init(&mb, &lc, max_qblk) == 0,
        "cuda mask");
    const size_t n1 = (size_t)H * d, np = (size_t)c->n_tok * H * d;
    char what[96];
    int ra, rb;
#define BOTH(call_a, call_b)                                                                       \
    do {                                                                                           \
        ra = (call_a);                                                                             \
        rb = (call_b);                                                                             \
    } while (0)

    /* ---- prefill: mask (each scan variant, then the tensor-core scan), BSA, dense ---- */
    const int64_t pos0 = T - c->n_tok;
    for (int v = 0; v < 4; v++) {
        set_env("IHIP_MASK_SCAN", v < 3 ? mask_scan[v] : NULL);
        set_env("IHIP_MASK_PREFILL", v == 3 ? "mma" : NULL);
        poison_mask(&ma, 0);
        poison_mask(&mb, 0);
        gb.kv.vptr_dev = NULL; /* mask estimation reads K only */
        BOTH(cuda_hip_mask_estimate(&ga, q_dev, pos0, c->n_tok, 0, &ma, w, NULL),
             cuda_hip_mask_estimate(&gb, q_dev, pos0, c->n_tok, 0, &mb, w, NULL));
        gb.kv.vptr_dev = kv.paged.vptr_dev;
        CK(cudaDeviceSynchronize());
        snprintf(what, sizeof what, "mask prefill n_tok %d %s", c->n_tok,
                 v == 0 ? "fast scan" : v == 1 ? "scan=old" : v == 2 ? "scan=fast1" : "prefill=mma");
        if (ra || rb) {
            char why[64];
            snprintf(why, sizeof why, "rc %d / %d", ra, rb);
            report(false, label, what, why);
        } else {
            compare_masks(label, what, &ma, &mb, &lc, max_qblk);
        }
    }
    set_env("IHIP_MASK_SCAN", NULL);
    set_env("IHIP_MASK_PREFILL", NULL);
    /* BSA prefill on the last mask (the tensor-core one: only its content matters here) */
    for (int k = 0; k < 2; k++) {
        setenv("IHIP_ATTN_PREFILL", prefill_ker[k], 1);
        CK(cudaMemset(oa_dev, 0xff, np * sizeof(float))); /* NaN poison */
        CK(cudaMemset(ob_dev, 0xff, np * sizeof(float)));
        BOTH(cuda_hip_bsa(&ga, q_dev, pos0, c->n_tok, &ma, oa_dev, w, NULL),
             cuda_hip_bsa(&gb, q_dev, pos0, c->n_tok, &ma, ob_dev, w, NULL));
        CK(cudaDeviceSynchronize());
        snprintf(what, sizeof what, "bsa prefill %s", prefill_ker[k]);
        compare_out(label, what, ra, rb, oa_dev, ob_dev, np);
        CK(cudaMemset(oa_dev, 0xff, np * sizeof(float)));
        CK(cudaMemset(ob_dev, 0xff, np * sizeof(float)));
        BOTH(cuda_attn_dense(&ga.shape, &crope, &ga.kv, q_dev, pos0, c->n_tok, oa_dev, w, NULL),
             cuda_attn_dense(&gb.shape, &crope, &gb.kv, q_dev, pos0, c->n_tok, ob_dev, w, NULL));
        CK(cudaDeviceSynchronize());
        snprintf(what, sizeof what, "dense prefill %s", prefill_ker[k]);
        compare_out(label, what, ra, rb, oa_dev, ob_dev, np);
    }
    unsetenv("IHIP_ATTN_PREFILL");

    /* ---- decode: step 1 at T-2 over T-1 keys (full), step 2 at T-1 from stage 1, step 3 from
     * the last stage; each scan variant; then BSA and dense decode ---- */
    cuda_hip_mask da, db;
    REQ(cuda_hip_mask_init(&da, &lc, 1) == 0 && cuda_hip_mask_init(&db, &lc, 1) == 0, "cuda mask");
    for (int v = 0; v < 3; v++) {
        set_env("IHIP_MASK_SCAN", mask_scan[v]);
        const int steps[3][2] = {{0, 1}, {1, 0}, {lc.n_stages - 1, 0}}; /* first_stage, T - 1? */
        for (int s = 0; s < 3; s++) {
            const int fs = steps[s][0];
            const int64_t n_kv = steps[s][1] ? T - 1 : T, p = n_kv - 1;
            ga.kv.n_kv = gb.kv.n_kv = n_kv;
            gb.kv.vptr_dev = NULL;
            poison_mask(&da, fs);
            poison_mask(&db, fs);
            const float *qs = q_dev + (size_t)(s % 2) * n1;
            BOTH(cuda_hip_mask_estimate(&ga, qs, p, 1, fs, &da, w, NULL),
                 cuda_hip_mask_estimate(&gb, qs, p, 1, fs, &db, w, NULL));
            gb.kv.vptr_dev = kv.paged.vptr_dev;
            CK(cudaDeviceSynchronize());
            snprintf(what, sizeof what, "mask decode first_stage %d%s%s", fs, v ? " scan=" : "",
                     v ? mask_scan[v] : "");
            if (ra || rb) {
                char why[64];
                snprintf(why, sizeof why, "rc %d / %d", ra, rb);
                report(false, label, what, why);
            } else {
                compare_masks(label, what, &da, &db, &lc, 1);
            }
        }
    }
    set_env("IHIP_MASK_SCAN", NULL);
    ga.kv.n_kv = gb.kv.n_kv = T;
    for (int v = 0; v < (int)(sizeof decode_ver / sizeof decode_ver[0]); v++) {
        set_env("IHIP_ATTN_DECODE", decode_ver[v]);
        CK(cudaMemset(oa_dev, 0xff, n1 * sizeof(float)));
        CK(cudaMemset(ob_dev, 0xff, n1 * sizeof(float)));
        BOTH(cuda_hip_bsa(&ga, q_dev, T - 1, 1, &da, oa_dev, w, NULL),
             cuda_hip_bsa(&gb, q_dev, T - 1, 1, &da, ob_dev, w, NULL));
        CK(cudaDeviceSynchronize());
        snprintf(what, sizeof what, "bsa decode %s", decode_ver[v] ? decode_ver[v] : "default");
        compare_out(label, what, ra, rb, oa_dev, ob_dev, n1);
        CK(cudaMemset(oa_dev, 0xff, n1 * sizeof(float)));
        CK(cudaMemset(ob_dev, 0xff, n1 * sizeof(float)));
        BOTH(cuda_attn_dense(&ga.shape, &crope, &ga.kv, q_dev, T - 1, 1, oa_dev, w, NULL),
             cuda_attn_dense(&gb.shape, &crope, &gb.kv, q_dev, T - 1, 1, ob_dev, w, NULL));
        CK(cudaDeviceSynchronize());
        snprintf(what, sizeof what, "dense decode %s", decode_ver[v] ? decode_ver[v] : "default");
        compare_out(label, what, ra, rb, oa_dev, ob_dev, n1);
    }
    set_env("IHIP_ATTN_DECODE", NULL);
#undef BOTH

    cuda_hip_mask_free(&ma);
    cuda_hip_mask_free(&mb);
    cuda_hip_mask_free(&da);
    cuda_hip_mask_free(&db);
    cudaFree(q_dev);
    cudaFree(oa_dev);
    cudaFree(ob_dev);
    free(q);
    cuda_rope_free(&crope);
    cpu_rope_free(&rope);
    kv_free(&kv);
}

/* ---- page pointers against the CPU reference ------------------------------------------------- */

static void check_reference(cuda_hip_work *w)
{
    const int64_t T = 3001;
    const int H = 9, Hkv = 3, d = 64;
    kvpair kv;
    kv_make(&kv, T, Hkv, d, CUDA_KV_BF16, 16);
    cpu_rope rope;
    REQ(cpu_rope_init(&rope, CPU_ROPE_NORM, d, d, 500000.0, 1.0, NULL, 4096) == 0, "rope");
    cuda_rope crope;
    REQ(cuda_rope_init(&crope, &rope) == 0, "cuda rope");
    cpu_attn_shape shape = {H, Hkv, d, 1.0f / sqrtf((float)d)};
    const size_t n = (size_t)H * d;
    float *q = (float *)malloc(n * sizeof(float)), *ref = (float *)malloc(n * sizeof(float));
    float *got = (float *)malloc(n * sizeof(float));
    REQ(q && ref && got, "out of host memory");
    for (size_t i = 0; i < n; i++) q[i] = rndf() * 2.5f;
    float *q_dev, *o_dev;
    CK(cudaMalloc(&q_dev, n * sizeof(float)));
    CK(cudaMalloc(&o_dev, n * sizeof(float)));
    CK(cudaMemcpy(q_dev, q, n * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemset(o_dev, 0xff, n * sizeof(float)));
    int rc = cuda_attn_dense(&shape, &crope, &kv.paged, q_dev, T - 1, 1, o_dev, w, NULL);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(got, o_dev, n * sizeof(float), cudaMemcpyDeviceToHost));
    cpu_kv_layer kvl = {kv.kf, kv.vf, CPU_KV_F32, (size_t)Hkv * d * sizeof(float), false};
    size_t scr = cpu_attn_scratch_size(&shape, cm_pool_size(g_pool), 1, T);
    void *scratch = cm_alloc_aligned(scr, 64);
    REQ(scratch, "out of host memory");
    cpu_attn_dense(g_pool, &shape, &rope, &kvl, q, T - 1, 1, ref, scratch);
    cm_free_aligned(scratch);
    double num = 0, den = 0;
    bool finite = true;
    for (size_t i = 0; i < n; i++) {
        finite &= isfinite(got[i]) != 0;
        double df = (double)got[i] - ref[i];
        num += df * df;
        den += (double)ref[i] * ref[i];
    }
    double err = den > 0 ? sqrt(num / den) : 1.0;
    char why[96];
    snprintf(why, sizeof why, "rc %d, rel err %.2e (bound 2e-3)%s", rc, err, finite ? "" : ", not finite");
    report(rc == 0 && finite && err <= 2e-3, "T 3001 H 9/3 d 64 bf16 page 16",
           "dense decode via page pointers vs cpu_attn_dense", why);
    cudaFree(q_dev);
    cudaFree(o_dev);
    free(q);
    free(ref);
    free(got);
    cuda_rope_free(&crope);
    cpu_rope_free(&rope);
    kv_free(&kv);
}

/* ---- bad arguments ---------------------------------------------------------------------------- */

static void check_bad_args(cuda_hip_work *w)
{
    hip_layer_config lc;
    hip_layer_config_default(&lc, false);
    cuda_hip_mask m;
    REQ(cuda_hip_mask_init(&m, &lc, 1) == 0, "cuda mask");
    float *q_dev;
    uint64_t *ptr_dev;
    CK(cudaMalloc(&q_dev, sizeof(float) * 32 * 128));
    CK(cudaMalloc(&ptr_dev, sizeof(uint64_t) * 4));
    cuda_hip_args ga;
    memset(&ga, 0, sizeof ga);
    ga.layer = &lc;
    ga.block_size_q = 64;
    ga.block_size_k = 8;
    ga.using_extend = true;
    ga.shape.n_head = 32;
    ga.shape.n_head_kv = 8;
    ga.shape.head_dim = 128;
    ga.shape.scale = 0.088f;
    ga.kv.dtype = CUDA_KV_BF16;
    ga.kv.k_scale = ga.kv.v_scale = 1.0f;
    ga.kv.n_kv = 100;
    ga.kv.kptr_dev = ptr_dev;
    ga.kv.vptr_dev = ptr_dev;
    ga.kv.page_tokens = 0; /* page pointers without a page size */
    int bad = 0;
    bad += cuda_hip_mask_estimate(&ga, q_dev, 99, 1, 0, &m, w, NULL) != -EINVAL;
    bad += cuda_hip_bsa(&ga, q_dev, 99, 1, &m, q_dev, w, NULL) != -EINVAL;
    bad += cuda_attn_dense(&ga.shape, NULL, &ga.kv, q_dev, 99, 1, q_dev, w, NULL) != -EINVAL;
    ga.kv.page_tokens = 64;
    ga.kv.vptr_dev = NULL; /* attention reads V */
    bad += cuda_hip_bsa(&ga, q_dev, 99, 1, &m, q_dev, w, NULL) != -EINVAL;
    bad += cuda_attn_dense(&ga.shape, NULL, &ga.kv, q_dev, 99, 1, q_dev, w, NULL) != -EINVAL;
    ga.kv.kptr_dev = NULL; /* neither k_dev nor kptr_dev */
    bad += cuda_hip_mask_estimate(&ga, q_dev, 99, 1, 0, &m, w, NULL) != -EINVAL;
    bad += cuda_attn_dense(&ga.shape, NULL, &ga.kv, q_dev, 99, 1, q_dev, w, NULL) != -EINVAL;
    char why[32] = "";
    if (bad) snprintf(why, sizeof why, "%d accepted", bad);
    report(bad == 0, "argument checks", "page pointers without page_tokens / V", why);
    cudaFree(q_dev);
    cudaFree(ptr_dev);
    cuda_hip_mask_free(&m);
}

int main(int argc, char **argv)
{
    bool quick = false;
    uint64_t seed = (uint64_t)time(NULL);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--quick] [--seed N]\n", argv[0]);
            return 1;
        }
    }
    if (cuda_device_count() == 0) {
        printf("test-cuda-paged: no CUDA device: skip\n");
        return 77;
    }
    rng_state = seed;
    printf("test-cuda-paged: seed %llu%s\n", (unsigned long long)seed, quick ? " (quick)" : "");
    long nth = sysconf(_SC_NPROCESSORS_ONLN);
    g_pool = cm_pool_init(nth > 0 ? (int)(nth > 64 ? 64 : nth) : 1);
    REQ(g_pool, "thread pool");
    cuda_hip_work *w = cuda_hip_work_init();
    REQ(w, "work");
    check_bad_args(w);
    check_reference(w);
    const int BF = CUDA_KV_BF16, F8 = CUDA_KV_FP8, NORM = CPU_ROPE_NORM, NEOX = CPU_ROPE_NEOX;
    static const pcase cases[] = {
        /* T, n_tok, H, Hkv, d, dtype, page_tokens, special, style */
        {4100, 200, 32, 8, 128, BF, 16, false, NEOX},
        {5003, 130, 9, 3, 64, F8, 64, true, NORM},
        {2050, 65, 9, 3, 64, BF, 64, true, NEOX},
        {33001, 256, 32, 8, 128, F8, 64, false, NORM},
        {20007, 100, 32, 8, 128, BF, 16, true, NORM},
        {12289, 192, 9, 3, 64, F8, 16, false, NEOX},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (quick && cases[i].T > 10000) continue;
        run_case(&cases[i], w);
    }
    cuda_hip_work_free(w);
    cm_pool_free(g_pool);
    printf("test-cuda-paged: %s (%d failures)\n", n_fail ? "FAILED" : "all passed", n_fail);
    return n_fail ? 1 : 0;
}
