/*
 * attention_gpu.cu — attention latency of one Llama-3.1-8B layer (32 query heads, 8 KV heads,
 * head_dim 128, bf16 K/V, batch 1) on the GPU, side by side in one run:
 *   decode at T = 128K .. 4M:  (a) HiP, mask reused       = cuda_hip_bsa
 *                              (b) HiP, full mask refresh = cuda_hip_mask_estimate + cuda_hip_bsa
 *                              (c) dense                  = cuda_attn_dense
 *                              (a2) (a) with IHIP_ATTN_DECODE=v2 (the fp32 BSA kernel instead
 *                                  of the tensor-core one; its note gives the relative L2
 *                                  difference of the two outputs)
 *                              (d) (a) and (c) with IHIP_ATTN_DECODE=v1 (first decode kernels),
 *                                  (c) with IHIP_ATTN_DECODE=v3 (v2 at 4 blocks per SM) and v4
 *                                  (v2 loading the next step's K/V early; its note gives the
 *                                  largest |v4 - v2| of the output)
 *   prefill of one 32K chunk at 1M context: HiP (estimate + BSA) vs dense (1-3 reps); BSA
 *   alone with the tensor-core and the fp32 prefill kernels; dense with the tensor-core kernel
 *   (the fp32 dense one takes ~26 s: only with --prefill-fp32). The kernel is chosen through
 *   IHIP_ATTN_PREFILL (mma / fp32), which this program sets itself;
 *   machine ceilings: device-to-device cudaMemcpy bandwidth (read + write) and a cuBLAS bf16
 *   GEMM 8192^3.
 * Timing: cudaEvent around each call, warm-up, median of --reps. Inputs: random (hash kernel).
 * "GB/s" = bytes the kernel must read (K and V rows of its key set; queries/outputs ignored)
 * divided by the median time.
 * Two timings of every decode row:
 *   "single call"  events around ONE call on the default stream: includes the host work of the
 *                  call (argument checks, launch API calls) while the GPU waits, plus the
 *                  launch latency; the same rows repeat the same data, so a BSA key set of a
 *                  few MB stays in L2 between reps.
 *   "graph"        (rows "... [graph]") 32 back-to-back calls captured in one CUDA graph on a
 *                  non-default stream, like the 32 layers of one decode step of Llama-8B as a
 *                  serving engine replays it; events around one replay, median over
 *                  --graph-reps replays, divided by 32 = GPU time per call. Call i reads the
 *                  K/V of "layer" i: the K/V base moved by i * 8192 tokens, so the key sets of
 *                  consecutive calls do not share L2 lines (a BSA key set is < 8192 tokens); all
 *                  calls write the same output. A call that is not capture-safe (a synchronous
 *                  copy, a cudaMalloc...) makes the capture fail: the row prints why.
 *
 *   attention_gpu [--sizes 128K,256K,512K,1M,2M,4M] [--reps 20] [--graph-reps 10] [--no-graph]
 *                 [--prefill-reps 1] [--no-prefill] [--prefill-fp32] [--special] [--csv PATH]
 */
#include "backend/cuda/cuda-hip.h"
#include "backend/cuda/cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

#define H 32
#define HKV 8
#define D 128
#define MAX_ROWS 128
#define GRAPH_CALLS 32     /* calls per captured graph: the layers of one decode step */
#define LAYER_SHIFT 8192LL /* tokens between the K/V bases of consecutive graph calls */

static __global__ void fill_bf16(uint16_t *p, size_t n, uint64_t seed, float amp)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float f = ((float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * amp;
        uint32_t u = __float_as_uint(f);
        u += 0x7fffu + ((u >> 16) & 1u);
        p[i] = (uint16_t)(u >> 16);
    }
}

static __global__ void fill_f32(float *p, size_t n, uint64_t seed, float amp)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        p[i] = ((float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * amp;
    }
}

typedef struct row {
    char op[48];
    long long T, n_tok;
    double ms, bytes, flops;
    int reps;
    char note[96];
} row;

static row g_rows[MAX_ROWS];
static int g_nrows;
static FILE *g_csv;

static void add_row(const char *op, long long T, long long n_tok, double ms, double bytes,
                    double flops, int reps, const char *note)
{
    if (g_nrows >= MAX_ROWS) return;
    row *r = &g_rows[g_nrows++];
    snprintf(r->op, sizeof r->op, "%s", op);
    r->T = T;
    r->n_tok = n_tok;
    r->ms = ms;
    r->bytes = bytes;
    r->flops = flops;
    r->reps = reps;
    snprintf(r->note, sizeof r->note, "%s", note ? note : "");
    printf("  %-36s T %8lld n_tok %6lld  %10.4f ms", op, T, n_tok, ms);
    if (ms > 0 && bytes > 0) printf("  %8.1f GB/s", bytes / (ms * 1e-3) / 1e9);
    if (ms > 0 && flops > 0) printf("  %8.1f TFLOP/s", flops / (ms * 1e-3) / 1e12);
    printf("%s%s\n", note && *note ? "  " : "", note ? note : "");
    fflush(stdout);
    if (g_csv)
        fprintf(g_csv, "%s,%lld,%lld,%.6f,%.0f,%.3f,%.3f,%d,%s\n", op, T, n_tok, ms, bytes,
                ms > 0 && bytes > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0,
                ms > 0 && flops > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0, reps, note ? note : "");
}

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Median time in ms of `reps` runs of fn after `warm` warm-up runs; < 0 when a run failed. */
typedef int (*bench_fn)(void *ctx);
static double time_median(bench_fn fn, void *ctx, int warm, int reps)
{
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < warm; i++)
        if (fn(ctx)) return -1;
    CK(cudaDeviceSynchronize());
    float *t = (float *)malloc(sizeof(float) * (size_t)reps);
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a, 0));
        int rc = fn(ctx);
        CK(cudaEventRecord(b, 0));
        CK(cudaEventSynchronize(b));
        if (rc) {
            fprintf(stderr, "  call failed: %d\n", rc);
            free(t);
            return -1;
        }
        CK(cudaEventElapsedTime(&t[i], a, b));
    }
    qsort(t, (size_t)reps, sizeof(float), cmp_f);
    double m = reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
    free(t);
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return m;
}

typedef struct ctx {
    cuda_hip_args args;
    cpu_attn_shape shape;
    const cuda_rope *rope;
    cuda_kv_view kv;
    const float *q;
    float *out;
    int64_t pos0, n_tok;
    cuda_hip_mask *m;
    cuda_hip_work *w;
    cudaStream_t st; /* stream of the calls (NULL: default stream) */
    /* ceilings */
    void *dst, *src;
    size_t bytes;
    cublasHandle_t blas;
    void *A, *B, *C;
} ctx;

static int run_dense(void *p)
{
    ctx *c = (ctx *)p;
    return cuda_attn_dense(&c->shape, c->rope, &c->kv, c->q, c->pos0, c->n_tok, c->out, c->w,
                           c->st);
}
static int run_bsa(void *p)
{
    ctx *c = (ctx *)p;
    return cuda_hip_bsa(&c->args, c->q, c->pos0, c->n_tok, c->m, c->out, c->w, c->st);
}
static int run_hip_full(void *p)
{
    ctx *c = (ctx *)p;
    int rc = cuda_hip_mask_estimate(&c->args, c->q, c->pos0, c->n_tok, 0, c->m, c->w, c->st);
    if (rc) return rc;
    return cuda_hip_bsa(&c->args, c->q, c->pos0, c->n_tok, c->m, c->out, c->w, c->st);
}
static int run_memcpy(void *p)
{
    ctx *c = (ctx *)p;
    return cudaMemcpyAsync(c->dst, c->src, c->bytes, cudaMemcpyDeviceToDevice, 0) == cudaSuccess ? 0 : -1;
}
static int run_gemm(void *p)
{
    ctx *c = (ctx *)p;
    const float one = 1.0f, zero = 0.0f;
    const int n = 8192;
    cublasStatus_t s = cublasGemmEx(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, c->A,
                                    CUDA_R_16BF, n, c->B, CUDA_R_16BF, n, &zero, c->C, CUDA_R_16BF,
                                    n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return s == CUBLAS_STATUS_SUCCESS ? 0 : -1;
}

/* The view of graph call i ("layer" i): K/V bases moved by i * LAYER_SHIFT tokens. */
static void layer_view(ctx *l, const ctx *c, int i)
{
    size_t off = (size_t)i * (size_t)LAYER_SHIFT * HKV * D;
    l->kv.k_dev = (const uint16_t *)c->kv.k_dev + off;
    l->kv.v_dev = (const uint16_t *)c->kv.v_dev + off;
    l->args.kv = l->kv;
}

/* Per-call GPU time in ms of fn inside a CUDA graph of GRAPH_CALLS back-to-back calls (see the
 * header): median over `reps` replays of (replay time / GRAPH_CALLS). < 0 when the capture or a
 * call failed; `why` then says what happened. */
static double time_graph(bench_fn fn, const ctx *c, cudaStream_t st, int reps, char *why,
                         size_t why_n)
{
    ctx l = *c;
    l.st = st;
    why[0] = 0;
    /* warm-up outside the capture: scratch grown, attributes and caches set */
    for (int i = 0; i < 2; i++) {
        layer_view(&l, c, i);
        int rc = fn(&l);
        if (rc) {
            snprintf(why, why_n, "warm-up call failed: %d", rc);
            return -1;
        }
    }
    CK(cudaStreamSynchronize(st));
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    if (e != cudaSuccess) {
        snprintf(why, why_n, "cudaStreamBeginCapture: %s", cudaGetErrorString(e));
        return -1;
    }
    int rc = 0, bad = -1;
    for (int i = 0; i < GRAPH_CALLS && !rc; i++) {
        layer_view(&l, c, i);
        rc = fn(&l);
        if (rc) bad = i;
    }
    cudaError_t ee = cudaStreamEndCapture(st, &g);
    if (rc || ee != cudaSuccess) {
        snprintf(why, why_n, "capture failed: call %d returned %d, cudaStreamEndCapture: %s", bad,
                 rc, cudaGetErrorString(ee));
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        cudaStreamSynchronize(st);
        return -1;
    }
    cudaGraphExec_t ge = NULL;
    e = cudaGraphInstantiate(&ge, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        snprintf(why, why_n, "cudaGraphInstantiate: %s", cudaGetErrorString(e));
        cudaGetLastError();
        return -1;
    }
    CK(cudaGraphUpload(ge, st));
    for (int i = 0; i < 2; i++) CK(cudaGraphLaunch(ge, st));
    CK(cudaStreamSynchronize(st));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float *t = (float *)malloc(sizeof(float) * (size_t)reps);
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&t[i], a, b));
        t[i] /= (float)GRAPH_CALLS;
    }
    qsort(t, (size_t)reps, sizeof(float), cmp_f);
    double m = reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
    free(t);
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    CK(cudaGraphExecDestroy(ge));
    return m;
}

static long long parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (*end == 'K' || *end == 'k') v *= 1024;
    else if (*end == 'M' || *end == 'm') v *= 1024 * 1024;
    return (long long)v;
}

static void fill(uint16_t *p, size_t n, uint64_t seed, float amp)
{
    fill_bf16<<<4096, 256>>>(p, n, seed, amp);
    CK(cudaGetLastError());
}

/* One call of fn with IHIP_ATTN_DECODE = a (NULL: unset), one with b, same inputs; note = how
 * far b's output is from a's (largest |b - a| against the largest |a|, relative L2). */
static void compare_versions(int (*fn)(void *), ctx *c, const char *a, const char *b, char *note,
                             size_t n)
{
    static float oa[H * D], ob[H * D];
    const char *v[2] = {a, b};
    float *o[2] = {oa, ob};
    int rc[2];
    for (int i = 0; i < 2; i++) {
        if (v[i]) setenv("IHIP_ATTN_DECODE", v[i], 1);
        else unsetenv("IHIP_ATTN_DECODE");
        rc[i] = fn(c);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(o[i], c->out, sizeof oa, cudaMemcpyDeviceToHost));
    }
    double md = 0, mx = 0, num = 0, den = 0;
    for (int j = 0; j < H * D; j++) {
        const double d = (double)ob[j] - oa[j];
        md = fmax(md, fabs(d));
        mx = fmax(mx, fabs((double)oa[j]));
        num += d * d;
        den += (double)oa[j] * oa[j];
    }
    const char *na = a ? a : "default";
    if (rc[0] || rc[1]) snprintf(note, n, "%s call %d, %s call %d", na, rc[0], b, rc[1]);
    else snprintf(note, n, "max |%s - %s| %.2e (max %.2e), rel L2 %.2e", b, na, md, mx,
                  den > 0 ? sqrt(num / den) : 0.0);
}

int main(int argc, char **argv)
{
    const char *sizes = "128K,256K,512K,1M,2M,4M", *csv = NULL;
    int reps = 20, prefill_reps = 1, graph_reps = 10;
    bool prefill = true, special = false, prefill_fp32 = false, graph = true;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sizes") && i + 1 < argc) sizes = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--prefill-reps") && i + 1 < argc) prefill_reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--graph-reps") && i + 1 < argc) graph_reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-graph")) graph = false;
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else if (!strcmp(argv[i], "--no-prefill")) prefill = false;
        else if (!strcmp(argv[i], "--prefill-fp32")) prefill_fp32 = true;
        else if (!strcmp(argv[i], "--special")) special = true;
        else {
            fprintf(stderr,
                    "usage: %s [--sizes 128K,256K,512K,1M,2M,4M] [--reps N] [--graph-reps N] "
                    "[--no-graph] [--prefill-reps N] [--no-prefill] [--prefill-fp32] [--special] "
                    "[--csv PATH]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    if (prefill_reps < 1) prefill_reps = 1;
    if (graph_reps < 1) graph_reps = 1;
    if (cuda_device_count() == 0) {
        fprintf(stderr, "no CUDA device\n");
        return 77;
    }
    char desc[256];
    cuda_device_describe(0, desc, sizeof desc);
    printf("device: %s\n", desc);
    if (csv) {
        g_csv = fopen(csv, "w");
        if (!g_csv) {
            fprintf(stderr, "cannot write %s\n", csv);
            return 1;
        }
        fprintf(g_csv, "op,T,n_tok,median_ms,bytes,GB_per_s,TFLOP_per_s,reps,note\n");
    }

    long long T_list[16];
    int n_T = 0;
    long long T_max = 0;
    {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", sizes);
        for (char *tok = strtok(buf, ","); tok && n_T < 16; tok = strtok(NULL, ",")) {
            long long v = parse_size(tok);
            if (v < 2) {
                fprintf(stderr, "bad size %s\n", tok);
                return 2;
            }
            T_list[n_T++] = v;
            if (v > T_max) T_max = v;
        }
    }
    const long long PF_T = 1 << 20, PF_N = 32768;
    if (prefill && PF_T > T_max) T_max = PF_T;

    /* ---- machine ceilings ---------------------------------------------------------------- */
    ctx c;
    memset(&c, 0, sizeof c);
    printf("ceilings:\n");
    c.bytes = (size_t)1 << 32;
    CK(cudaMalloc(&c.src, c.bytes));
    CK(cudaMalloc(&c.dst, c.bytes));
    fill((uint16_t *)c.src, c.bytes / 2, 1, 1.0f);
    double ms = time_median(run_memcpy, &c, 2, 10);
    add_row("memcpy d2d (read+write)", 0, 0, ms, 2.0 * (double)c.bytes, 0, 10, "4 GiB");
    CK(cudaFree(c.src));
    CK(cudaFree(c.dst));
    {
        const size_t n = 8192;
        if (cublasCreate(&c.blas) == CUBLAS_STATUS_SUCCESS) {
            CK(cudaMalloc(&c.A, n * n * 2));
            CK(cudaMalloc(&c.B, n * n * 2));
            CK(cudaMalloc(&c.C, n * n * 2));
            fill((uint16_t *)c.A, n * n, 2, 1.0f);
            fill((uint16_t *)c.B, n * n, 3, 1.0f);
            ms = time_median(run_gemm, &c, 3, 10);
            add_row("cublas bf16 gemm 8192^3", 0, 0, ms, 0, 2.0 * n * n * n, 10, "");
            cudaFree(c.A);
            cudaFree(c.B);
            cudaFree(c.C);
            cublasDestroy(c.blas);
        } else {
            printf("  cublasCreate failed: no GEMM ceiling\n");
        }
    }

    /* ---- inputs -------------------------------------------------------------------------- */
    /* room for the K/V bases of the graph calls (layer_view) */
    const size_t kv_el = (size_t)(T_max + (GRAPH_CALLS - 1) * LAYER_SHIFT) * HKV * D;
    uint16_t *k_dev, *v_dev;
    CK(cudaMalloc(&k_dev, kv_el * 2));
    CK(cudaMalloc(&v_dev, kv_el * 2));
    fill(k_dev, kv_el, 11, 1.5f);
    fill(v_dev, kv_el, 12, 1.0f);
    const size_t q_el = (size_t)(prefill ? PF_N : 1) * H * D;
    float *q_dev, *out_dev;
    CK(cudaMalloc(&q_dev, q_el * 4));
    CK(cudaMalloc(&out_dev, q_el * 4));
    fill_f32<<<4096, 256>>>(q_dev, q_el, 13, 2.5f);
    CK(cudaGetLastError());

    cpu_rope rope;
    if (cpu_rope_init(&rope, CPU_ROPE_NORM, D, D, 500000.0, 1.0, NULL, 1)) return 1;
    cuda_rope crope;
    if (cuda_rope_init(&crope, &rope)) return 1;
    hip_config cfg;
    hip_config_default(&cfg);
    hip_layer_config lc;
    hip_layer_config_default(&lc, special);
    cuda_hip_work *w = cuda_hip_work_init();

    c.shape.n_head = H;
    c.shape.n_head_kv = HKV;
    c.shape.head_dim = D;
    c.shape.scale = 1.0f / sqrtf((float)D);
    c.rope = &crope;
    c.kv.k_dev = k_dev;
    c.kv.v_dev = v_dev;
    c.kv.dtype = CUDA_KV_BF16;
    c.kv.k_scale = c.kv.v_scale = 1.0f;
    c.q = q_dev;
    c.out = out_dev;
    c.w = w;
    c.args.layer = &lc;
    c.args.block_size_q = cfg.block_sparse_block_size_q;
    c.args.block_size_k = cfg.block_sparse_block_size_k;
    c.args.using_extend = cfg.using_extend;
    c.args.score_bf16 = false;
    c.args.shape = c.shape;
    c.args.rope = &crope;

    const int max_qblk = (int)((PF_N + c.args.block_size_q - 1) / c.args.block_size_q);
    cuda_hip_mask m;
    memset(&m, 0, sizeof m);
    int mrc = cuda_hip_mask_init(&m, &lc, prefill ? max_qblk : 1);
    if (mrc) {
        fprintf(stderr, "cuda_hip_mask_init: %d\n", mrc);
        return 1;
    }
    c.m = &m;
    const double row_bytes = (double)HKV * D * 2 * 2; /* K + V of one token, all KV heads */
    char note[96];
    snprintf(note, sizeof note, "%s layer, k=%lld", special ? "special" : "normal",
             (long long)lc.second_stage_k);

    /* ---- decode ---------------------------------------------------------------------------- */
    printf("decode (1 query, %d heads / %d KV heads, d %d, bf16):\n", H, HKV, D);
    /* dec[i]: single call (hip reuse, hip refresh, dense); decg[i]: per call in a graph (the
     * same three, then hip reuse v1, dense v1, dense v3) */
    double dec[16][3], decg[16][9];
    cudaStream_t gst = NULL;
    if (graph) CK(cudaStreamCreateWithFlags(&gst, cudaStreamNonBlocking));
    char gnote[96];
    snprintf(gnote, sizeof gnote, "per call, %d-call graph", GRAPH_CALLS);
    for (int i = 0; i < n_T; i++) {
        long long T = T_list[i];
        c.kv.n_kv = T;
        c.args.kv = c.kv;
        c.pos0 = T - 1;
        c.n_tok = 1;
        long long n_bsa = lc.sink_token_size + lc.second_stage_k + lc.sliding_window_size;
        if (n_bsa > T) n_bsa = T;
        const double b_bsa = n_bsa * row_bytes, b_dense = (double)T * row_bytes;
        int rc = cuda_hip_mask_estimate(&c.args, c.q, c.pos0, 1, 0, &m, w, NULL);
        CK(cudaDeviceSynchronize());
        if (rc) fprintf(stderr, "  cuda_hip_mask_estimate failed: %d\n", rc);
        for (int j = 0; j < 9; j++) decg[i][j] = -1;
        /* the graph row of fn (after its single-call row); prints why when it cannot run */
#define GRAPH_ROW(j, name, fn, bytes)                                                            \
    do {                                                                                          \
        if (!graph) break;                                                                        \
        char why_[160];                                                                           \
        decg[i][j] = time_graph(fn, &c, gst, graph_reps, why_, sizeof why_);                      \
        if (decg[i][j] < 0) printf("  %-36s T %8lld: %s\n", name " [graph]", T, why_);           \
        else add_row(name " [graph]", T, 1, decg[i][j], bytes, 0, graph_reps, gnote);            \
    } while (0)
        dec[i][0] = rc ? -1 : time_median(run_bsa, &c, 5, reps);
        add_row("hip bsa (mask reused)", T, 1, dec[i][0], b_bsa, 0, reps, note);
        if (!rc) GRAPH_ROW(0, "hip bsa (mask reused)", run_bsa, b_bsa);
        dec[i][1] = time_median(run_hip_full, &c, 3, reps);
        add_row("hip estimate+bsa (refresh)", T, 1, dec[i][1], 0, 0, reps, note);
        GRAPH_ROW(1, "hip estimate+bsa (refresh)", run_hip_full, 0);
        dec[i][2] = time_median(run_dense, &c, 3, reps);
        add_row("dense", T, 1, dec[i][2], b_dense, 0, reps, "");
        GRAPH_ROW(2, "dense", run_dense, b_dense);
        /* the first decode kernels (IHIP_ATTN_DECODE=v1) and v3 for comparison in the same run;
         * the rows above use the variable as given (unset = v2). A graph keeps the kernels of
         * the version set when it was captured. */
        const char *dv = getenv("IHIP_ATTN_DECODE");
        char dv_saved[16];
        snprintf(dv_saved, sizeof dv_saved, "%s", dv ? dv : "");
        if (!rc) {
            /* the fp32 BSA kernel (v2) against the default (tensor-core) one on the same call */
            char n2[128];
            compare_versions(run_bsa, &c, NULL, "v2", n2, sizeof n2);
            double b2 = time_median(run_bsa, &c, 5, reps);
            add_row("hip bsa (mask reused) v2", T, 1, b2, b_bsa, 0, reps, n2);
            GRAPH_ROW(7, "hip bsa (mask reused) v2", run_bsa, b_bsa);
        }
        setenv("IHIP_ATTN_DECODE", "v1", 1);
        double b1 = rc ? -1 : time_median(run_bsa, &c, 5, reps);
        add_row("hip bsa (mask reused) v1", T, 1, b1, b_bsa, 0, reps, note);
        if (!rc) GRAPH_ROW(3, "hip bsa (mask reused) v1", run_bsa, b_bsa);
        double d1 = time_median(run_dense, &c, 3, reps);
        add_row("dense v1", T, 1, d1, b_dense, 0, reps, "");
        GRAPH_ROW(4, "dense v1", run_dense, b_dense);
        setenv("IHIP_ATTN_DECODE", "v3", 1);
        double d3 = time_median(run_dense, &c, 3, reps);
        add_row("dense v3", T, 1, d3, b_dense, 0, reps, "v2, 128 regs");
        GRAPH_ROW(5, "dense v3", run_dense, b_dense);
        {
            /* v4 against v2 on the same call: same per-key arithmetic, other split count */
            char n4[128];
            compare_versions(run_dense, &c, "v2", "v4", n4, sizeof n4);
            double d4 = time_median(run_dense, &c, 3, reps);
            add_row("dense v4", T, 1, d4, b_dense, 0, reps, n4);
            GRAPH_ROW(6, "dense v4", run_dense, b_dense);
        }
#undef GRAPH_ROW
        if (dv) setenv("IHIP_ATTN_DECODE", dv_saved, 1);
        else unsetenv("IHIP_ATTN_DECODE");
    }
    if (gst) CK(cudaStreamDestroy(gst));

    /* ---- prefill ------------------------------------------------------------------------- */
    double pf_hip = -1, pf_dense = -1;
    if (prefill) {
        printf("prefill (%lld queries at %lld..%lld):\n", PF_N, PF_T - PF_N, PF_T - 1);
        c.kv.n_kv = PF_T;
        c.args.kv = c.kv;
        c.pos0 = PF_T - PF_N;
        c.n_tok = PF_N;
        /* dense FLOPs: 4·d per (query, key, head), keys ≤ position */
        double keys = (double)PF_N * (double)(PF_T - PF_N) + (double)PF_N * (PF_N + 1) / 2.0;
        double fl_dense = 4.0 * D * H * keys;
        long long per_q = lc.sink_token_size + lc.second_stage_k + lc.sliding_window_size + 64;
        double fl_bsa = 4.0 * D * H * (double)PF_N * (double)per_q;
        setenv("IHIP_ATTN_PREFILL", "mma", 1);
        pf_hip = time_median(run_hip_full, &c, 1, 3);
        add_row("hip estimate+bsa prefill", PF_T, PF_N, pf_hip, 0, fl_bsa, 3, note);
        /* BSA alone on the mask of the last estimate: tensor-core and fp32 kernels */
        double pf_bsa = time_median(run_bsa, &c, 1, 5);
        add_row("hip bsa prefill (mma)", PF_T, PF_N, pf_bsa, 0, fl_bsa, 5, "bf16 mma.sync tiles");
        setenv("IHIP_ATTN_PREFILL", "fp32", 1);
        double pf_bsa32 = time_median(run_bsa, &c, 1, 3);
        add_row("hip bsa prefill (fp32)", PF_T, PF_N, pf_bsa32, 0, fl_bsa, 3, "fp32 FMA tiles");
        /* dense: warm the kernel on a small chunk, then time the full one */
        for (int v = 0; v < (prefill_fp32 ? 2 : 1); v++) {
            setenv("IHIP_ATTN_PREFILL", v ? "fp32" : "mma", 1);
            c.n_tok = 64;
            c.pos0 = PF_T - 64;
            if (run_dense(&c) == 0) CK(cudaDeviceSynchronize());
            c.n_tok = PF_N;
            c.pos0 = PF_T - PF_N;
            double t = time_median(run_dense, &c, 0, prefill_reps);
            add_row(v ? "dense prefill (fp32)" : "dense prefill (mma)", PF_T, PF_N, t,
                    (double)PF_T * row_bytes, fl_dense, prefill_reps,
                    v ? "fp32 FMA tiles" : "bf16 mma.sync tiles");
            if (v == 0) pf_dense = t;
        }
    }

    /* ---- summary -------------------------------------------------------------------------- */
    printf("\nsummary (median ms; one layer, batch 1):\n");
    printf("  single call = events around one call (its host work and launch latency inside);\n"
           "  graph = GPU time per call in a %d-call CUDA graph (the layers of one decode step;\n"
           "  -1 = not run or capture failed); best dense = fastest of our dense v2/v1/v3/v4 in\n"
           "  the graph; dense / hip reuse: single = dense v2 / hip reuse, both single call;\n"
           "  graph = best dense / hip reuse, both graph\n",
           GRAPH_CALLS);
    printf("%10s | %-25s | %-25s | %-25s | %-23s | %s\n", "", "hip reuse", "hip refresh",
           "dense (v2)", "best dense (graph)", "dense / hip reuse");
    printf("%10s | %12s %12s | %12s %12s | %12s %12s | %10s %12s | %8s %8s\n", "T",
           "single call", "graph", "single call", "graph", "single call", "graph", "ms", "GB/s",
           "single", "graph");
    for (int i = 0; i < n_T; i++) {
        double best = -1;
        for (int j = 2; j < 7; j++)
            if (j != 3 && decg[i][j] > 0 && (best < 0 || decg[i][j] < best)) best = decg[i][j];
        double gbs = best > 0 ? (double)T_list[i] * row_bytes / (best * 1e-3) / 1e9 : 0;
        printf("%10lld | %12.4f %12.4f | %12.4f %12.4f | %12.4f %12.4f | %10.4f %12.1f | %8.1f "
               "%8.1f\n",
               T_list[i], dec[i][0], decg[i][0], dec[i][1], decg[i][1], dec[i][2], decg[i][2],
               best, gbs, dec[i][0] > 0 ? dec[i][2] / dec[i][0] : 0.0,
               best > 0 && decg[i][0] > 0 ? best / decg[i][0] : 0.0);
    }
    if (prefill)
        printf("prefill 32K @ 1M: hip %.2f ms, dense (mma) %.2f ms (x%.1f)\n", pf_hip, pf_dense,
               pf_hip > 0 ? pf_dense / pf_hip : 0.0);

    cuda_hip_mask_free(&m);
    cuda_hip_work_free(w);
    cuda_rope_free(&crope);
    cpu_rope_free(&rope);
    cudaFree(k_dev);
    cudaFree(v_dev);
    cudaFree(q_dev);
    cudaFree(out_dev);
    if (g_csv) fclose(g_csv);
    return 0;
}
