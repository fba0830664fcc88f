/*
 * offload_gpu.cu — decode of the synthetic Llama-3-8B with its KV in HOST memory (issue 7): the
 * GPU holds the weights, a ring of recent pages and the two HiP page caches (cuda-model.h, "Paged
 * KV"); everything else is read from host memory over PCIe or copied into the caches when a mask
 * refresh selects it.
 *
 * Where the KV lives, per context length:
 *   store   a real kvstore segment (kvstore_create in --store-dir, default /dev/shm) holding one
 *           block per (token block, layer); its pool is registered with CUDA (kvstore_cuda_init)
 *           and the decode context binds the blocks' device addresses (kvstore_cuda_block_addr),
 *           as a decode worker does; the bind is the "hand-off" time reported;
 *   alias   when the KV is larger than the host can hold (--store-max-gib, default 75 % of
 *           MemAvailable: 3M tokens of an 8B model are 192 GiB in fp8, the H200 machine has
 *           128 GiB), a pinned host buffer of --alias-gib holds physical pages and the logical
 *           pages of the sequence map onto them round-robin: same geometry, same addresses
 *           read over the same bus, same cache behaviour per logical page, but many logical pages
 *           share contents. Results say which mode ran.
 * K/V contents are synthetic in both modes (cuda_ctx_fill_host_synthetic: the benchmark
 * allowance of issue 7, "a benchmark tool may fill the store with synthetic K/V"); no prefill
 * runs in the decode rows. --prefill-list runs a REAL GPU prefill of random tokens into a fresh
 * kvstore segment (page sink → blocks) and reports its time.
 *
 * Per decode row: bind, --warmup steps (the first is timed apart: cold caches, a full refresh
 * read entirely over the bus), --steps timed steps (host time around cuda_decode, which returns
 * with the logits on the host), then --prof-steps more with IHIP_OFFLOAD_PROFILE=1 for the split
 * of layer time into mask estimation / cache update / attention (events synchronize each layer,
 * so that pass is slower; the split is reported as fractions of the per-step time of the timed
 * pass). Hit ratios are over the timed steps.
 *
 *   offload_gpu [--ctx-list 262144,1048576] [--kv fp8|bf16] [--steps 64] [--warmup 9]
 *               [--prof-steps 16] [--page 64] [--sa-cache 32768] [--mask-cache 65536]
 *               [--store-dir /dev/shm] [--store-max-gib G] [--alias-gib 24]
 *               [--prefill-list 131072] [--prefill-chunk 32768] [--prefill-ring N|all]
 *               [--spill-gib 0] [--spill-dir /tmp] [--probe-cache 0] [--preset fast] [--dev 0]
 * --prefill-ring: GPU ring of the prefill context in tokens (0 = the default, two chunks: the
 * prefix older than that is read from the store over the bus; all = the whole prompt stays on
 * the GPU too, while every page is still written to the store after its chunk).
 * --prefill-stage: per-layer prefix staging buffers in tokens (0 = none; all = the prompt):
 * the prefix older than the ring is copied back per layer, overlapped with the previous layer.
 * --probe-cache 1: the decode context keeps the stage-0 probe cache (cuda_ctx_params
 * probe_cache_tokens = the context), filled at the hand-off.
 * --spill-gib G (store mode): G GiB of the sequence's blocks are pushed into the segment's spill
 * file in --spill-dir (local disk) before the hand-off, which reads them back with the kvstore
 * pager into pinned staging (kvstore_cuda_seq_addrs, as the decode worker does) and reports the
 * time; the decode then reads those blocks from the staging.
 * --prefill-resident 1: the same prefill with a non-paged context (whole KV on the GPU, no
 * store): the baseline.
 * Sizes take a K or M suffix. Exit 0, 1 on an error, 77 without a GPU.
 */
#include "backend/cuda/cuda-model.h"
#include "backend/cuda/cuda.h"
#include "bench-util.h"
#include "kvstore.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_CTX 16
#define GiB 1073741824.0

struct opts {
    int64_t ctx[MAX_CTX], pre[MAX_CTX];
    int n_ctx, n_pre;
    int kv_dtype;
    int steps, warmup, prof_steps, page;
    int64_t sa_cache, mask_cache, prefill_chunk, prefill_ring, prefill_stage;
    bool prefill_resident;
    const char *store_dir, *spill_dir;
    double store_max_gib, alias_gib, spill_gib;
    int probe_cache;
    int dev;
};

struct row {
    int64_t ctx;
    const char *mode;
    bool ok;
    char why[512];
    double fill_s, register_s, handoff_ms, first_ms, ms_mean, kind_ms[4];
    double spill_gib, stage_s; /* --spill-gib: blocks in the spill tier, time to read them back */
    int kind_n[4];
    double frac_mask, frac_cache, frac_attn;
    cuda_offload_stats st;
    size_t gpu_kv, dense_kv;
    double host_gib;
};

static int parse_list(const char *v, int64_t *out, int *n)
{
    *n = 0;
    char *e = (char *)v;
    while (*e && *n < MAX_CTX) {
        out[*n] = parse_size(e, &e);
        if (out[*n] <= 0 || (*e && *e != ',')) return -1;
        (*n)++;
        if (*e == ',') e++;
    }
    return 0;
}

/* Bytes of the K (or V) half of one page / block. */
static size_t half_bytes(const mdl_hparams *hp, const struct opts *o)
{
    return (size_t)hp->n_head_kv * o->page * hp->head_dim * (o->kv_dtype == CUDA_KV_FP8 ? 1 : 2);
}

static double mem_available_gib(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb / 1048576.0;
}

static int64_t argmax(const float *a, int64_t n)
{
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (a[i] > a[b]) b = i;
    return b;
}

/* Host pages of one sequence: a kvstore segment or an aliased pinned buffer. */
struct host_kv {
    kvstore *kv;
    kvstore_cuda *kc;
    kvstore_lease lease;
    char name[64];
    const char *dir, *spill_dir;
    void *alias;
    void *staging; /* spilled blocks read back (kvstore_cuda_seq_addrs) */
    uint64_t *ka, *va; /* [n_layer][n_pages] */
};

static void host_kv_free(struct host_kv *h)
{
    cm_err err = {};
    kvstore_cuda_staging_free(h->staging);
    if (h->kc) kvstore_cuda_free(h->kc);
    if (h->kv) {
        if (h->lease.seq.gen) kvstore_lease_release(h->kv, &h->lease, &err);
        kvstore_close(h->kv);
        kvstore_params p = kvstore_default_params();
        p.dir = h->dir;
        p.spill_dir = h->spill_dir;
        kvstore_destroy(h->name, &p, &err);
    }
    if (h->alias) cudaFreeHost(h->alias);
    free(h->ka);
    free(h->va);
    memset(h, 0, sizeof(*h));
}

static int make_segment(struct host_kv *h, const mdl_hparams *hp, const struct opts *o,
                        uint32_t n_blocks, uint32_t n_spill, uint32_t max_per_seq, cm_err *err)
{
    kvstore_geometry g;
    memset(&g, 0, sizeof(g));
    g.model_fingerprint = 0x8b5e7e7ULL;
    g.n_layers = (uint32_t)hp->n_layer;
    g.n_kv_heads = (uint32_t)hp->n_head_kv;
    g.head_dim = (uint32_t)hp->head_dim;
    g.tokens_per_block = (uint32_t)o->page;
    g.dtype = o->kv_dtype == CUDA_KV_FP8 ? KVSTORE_DTYPE_F8_E4M3 : KVSTORE_DTYPE_BF16;
    kvstore_params p = kvstore_default_params();
    p.dir = o->store_dir;
    p.n_ram_blocks = n_blocks;
    if (n_spill) {
        p.spill_dir = o->spill_dir;
        p.n_spill_blocks = n_spill;
        p.spill_batch = 1024;
        h->spill_dir = o->spill_dir;
    }
    p.max_seqs = 4;
    p.max_blocks_per_seq = max_per_seq;
    snprintf(h->name, sizeof(h->name), "ihip-offload-bench-%d", (int)getpid());
    h->dir = o->store_dir;
    kvstore_destroy(h->name, &p, NULL);
    int rc = kvstore_create(h->name, &g, &p, err);
    if (rc == 0) rc = kvstore_open(h->name, &p, &g, &h->kv, err);
    if (rc == 0) rc = kvstore_cuda_init(h->kv, 1, &h->kc, err);
    return rc;
}

/* Allocate the blocks of pages [p0, p1) of seq and fill them with synthetic K/V. */
static int store_write(struct host_kv *h, cuda_ctx *c, kvstore_seq_ref seq, int n_layer,
                       int64_t n_pages, int64_t p0, int64_t p1, size_t half, cm_err *err)
{
    int rc = 0;
    for (int64_t p = p0; p < p1 && rc == 0; p++)
        for (int l = 0; l < n_layer && rc == 0; l++) {
            void *data = NULL;
            rc = kvstore_block_alloc(h->kv, seq, (uint32_t)p, (uint32_t)l, &data, err);
            void *dp = NULL;
            if (rc == 0 && cudaHostGetDevicePointer(&dp, data, 0) != cudaSuccess)
                rc = cm_err_set(err, -EIO, "cudaHostGetDevicePointer of a block failed");
            h->ka[(size_t)l * n_pages + p] = (uint64_t)(uintptr_t)dp;
            h->va[(size_t)l * n_pages + p] = (uint64_t)(uintptr_t)dp + half;
        }
    /* fill what was allocated: [p0, p1) of every layer */
    for (int l = 0; l < n_layer && rc == 0; l++)
        rc = cuda_ctx_fill_host_synthetic(c, h->ka + (size_t)l * n_pages + p0,
                                          h->va + (size_t)l * n_pages + p0, p1 - p0,
                                          7 + (uint64_t)l * 131 + (uint64_t)p0, err);
    return rc;
}

/* Create a segment holding ctx tokens of synthetic K/V, publish it, keep a lease. With
 * --spill-gib S: the RAM pool is S GiB smaller than the KV; the first pages are written and
 * published as a sequence of their own, and the full sequence adopts them as its prefix, so
 * writing the rest pushes the prefix's least recently used blocks into the spill file; the
 * hand-off then reads those back into pinned staging (kvstore_cuda_seq_addrs, as the decode
 * worker does). */
static int store_fill(struct host_kv *h, cuda_ctx *c, const mdl_hparams *hp, const struct opts *o,
                      int64_t ctx, struct row *r, cm_err *err)
{
    const int n_layer = (int)hp->n_layer;
    const int64_t n_pages = (ctx + o->page - 1) / o->page;
    const uint64_t nb = (uint64_t)n_pages * n_layer;
    const size_t half = half_bytes(hp, o);
    uint64_t n_spill = (uint64_t)(o->spill_gib * GiB / (2.0 * half));
    if (n_spill >= nb / 2) n_spill = nb / 2;
    /* prefix pages: enough blocks to spill n_spill of them, whole pages */
    const int64_t pre_pages = n_spill ? CM_MIN(n_pages - 1, (int64_t)((n_spill + 1024) / n_layer + 2)) : 0;
    uint64_t t0 = cm_time_ns();
    int rc = make_segment(h, hp, o, (uint32_t)(nb - n_spill), (uint32_t)(n_spill ? n_spill + 2048 : 0),
                          (uint32_t)nb, err);
    r->register_s = (double)(cm_time_ns() - t0) / 1e9;
    if (rc) return rc;
    kvstore_seq_ref seq;
    kvstore_lease pub = {}, pre = {};
    t0 = cm_time_ns();
    if (pre_pages > 0) {
        kvstore_seq_ref ps;
        rc = kvstore_seq_create(h->kv, NULL, 0, &ps, err);
        if (rc == 0) rc = store_write(h, c, ps, n_layer, n_pages, 0, pre_pages, half, err);
        if (rc == 0) rc = kvstore_seq_publish(h->kv, ps, NULL, (uint32_t)(pre_pages * o->page), &pre, err);
        if (rc == 0) rc = kvstore_seq_create(h->kv, &pre, (uint32_t)pre_pages, &seq, err);
    } else {
        rc = kvstore_seq_create(h->kv, NULL, 0, &seq, err);
    }
    if (rc == 0) rc = store_write(h, c, seq, n_layer, n_pages, pre_pages, n_pages, half, err);
    r->fill_s = (double)(cm_time_ns() - t0) / 1e9;
    if (rc == 0) rc = kvstore_seq_publish(h->kv, seq, NULL, (uint32_t)ctx, &pub, err);
    if (pre.seq.gen) kvstore_lease_release(h->kv, &pre, NULL);
    if (rc) return rc;
    if (n_spill) {
        kvstore_stats ks;
        memset(&ks, 0, sizeof(ks));
        kvstore_get_stats(h->kv, &ks, err);
        r->spill_gib = (double)ks.blocks_spilled * 2.0 * (double)half / GiB;
    }
    /* the hand-off as a decode worker does it: lease the READY sequence, resolve each block's
     * device address (reading spilled blocks back), bind (page tables uploaded, partial page
     * copied) */
    t0 = cm_time_ns();
    rc = kvstore_lease_acquire(h->kv, pub.seq, &h->lease, err);
    kvstore_lease_release(h->kv, &pub, NULL);
    uint32_t staged = 0;
    if (rc == 0)
        rc = kvstore_cuda_seq_addrs(h->kc, &h->lease, (uint32_t)n_pages, h->ka, UINT64_MAX,
                                    &h->staging, &staged, err);
    r->stage_s = staged ? (double)(cm_time_ns() - t0) / 1e9 : 0;
    for (uint64_t i = 0; rc == 0 && i < nb; i++) h->va[i] = h->ka[i] + half;
    if (rc == 0) rc = cuda_ctx_bind_host(c, 0, ctx, h->ka, h->va, err);
    r->handoff_ms = (double)(cm_time_ns() - t0) / 1e6;
    return rc;
}

static int alias_fill(struct host_kv *h, cuda_ctx *c, const mdl_hparams *hp, const struct opts *o,
                      int64_t ctx, struct row *r, cm_err *err)
{
    const int n_layer = (int)hp->n_layer;
    const int64_t n_pages = (ctx + o->page - 1) / o->page;
    const size_t half = half_bytes(hp, o);
    const int64_t phys = (int64_t)(o->alias_gib * GiB / (2.0 * half));
    if (phys < 1) return cm_err_set(err, -EINVAL, "--alias-gib too small");
    uint64_t t0 = cm_time_ns();
    if (cudaHostAlloc(&h->alias, (size_t)phys * 2 * half,
                      cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
        h->alias = NULL;
        cudaGetLastError();
        return cm_err_set(err, -ENOMEM, "cannot pin %.1f GiB of host memory", o->alias_gib);
    }
    r->register_s = (double)(cm_time_ns() - t0) / 1e9;
    void *dp = NULL;
    cudaHostGetDevicePointer(&dp, h->alias, 0);
    const uint64_t base = (uint64_t)(uintptr_t)dp;
    uint64_t *pk = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)phys);
    uint64_t *pv = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)phys);
    if (!pk || !pv) {
        free(pk);
        free(pv);
        return cm_err_set(err, -ENOMEM, "out of memory");
    }
    for (int64_t i = 0; i < phys; i++) {
        pk[i] = base + (uint64_t)i * 2 * half;
        pv[i] = pk[i] + half;
    }
    t0 = cm_time_ns();
    int rc = cuda_ctx_fill_host_synthetic(c, pk, pv, phys, 7, err);
    r->fill_s = (double)(cm_time_ns() - t0) / 1e9;
    free(pk);
    free(pv);
    for (int l = 0; l < n_layer; l++)
        for (int64_t p = 0; p < n_pages; p++) {
            const int64_t ph = ((int64_t)l * n_pages + p) % phys;
            h->ka[(size_t)l * n_pages + p] = base + (uint64_t)ph * 2 * half;
            h->va[(size_t)l * n_pages + p] = base + (uint64_t)ph * 2 * half + half;
        }
    t0 = cm_time_ns();
    if (rc == 0) rc = cuda_ctx_bind_host(c, 0, ctx, h->ka, h->va, err);
    r->handoff_ms = (double)(cm_time_ns() - t0) / 1e6;
    return rc;
}

static void decode_row(const cuda_model *m, const hip_config *hc, const struct opts *o,
                       int64_t ctx, struct row *r)
{
    const mdl_hparams *hp = cuda_model_hparams(m);
    const int n_layer = (int)hp->n_layer;
    const int n_stages = hip_config_layer(hc, n_layer - 1, n_layer, false)->n_stages;
    const int64_t V = hp->n_vocab, n_pages = (ctx + o->page - 1) / o->page;
    const size_t elem = o->kv_dtype == CUDA_KV_FP8 ? 1 : 2;
    cm_err err = {};
    memset(r, 0, sizeof(*r));
    r->ctx = ctx;
    r->dense_kv = (size_t)n_layer * 2 * (size_t)ctx * (size_t)(hp->n_head_kv * hp->head_dim) * elem;
    r->host_gib = (double)n_layer * (double)n_pages * 2.0 * hp->n_head_kv * o->page *
                  hp->head_dim * (double)elem / GiB;
    const bool store = r->host_gib <= o->store_max_gib;
    r->mode = store ? "store" : "alias";
    printf("\n== ctx %lld, KV %s in host memory (%s, %.1f GiB) ==\n", (long long)ctx,
           elem == 1 ? "fp8" : "bf16", r->mode, r->host_gib);
    fflush(stdout);
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = ctx + o->warmup + o->steps + o->prof_steps + 8;
    p.n_chunk = 64;
    p.hip = hc;
    p.kv_dtype = o->kv_dtype;
    p.page_tokens = o->page;
    p.sa_cache_tokens = o->sa_cache;
    p.mask_cache_tokens = o->mask_cache;
    p.probe_cache_tokens = o->probe_cache ? p.n_ctx : 0;
    p.tail_tokens = o->warmup + o->steps + o->prof_steps + 2 * o->page + 64;
    struct host_kv h;
    memset(&h, 0, sizeof(h));
    float *lg = (float *)malloc(sizeof(float) * (size_t)V);
    h.ka = (uint64_t *)calloc((size_t)n_pages * n_layer, sizeof(uint64_t));
    h.va = (uint64_t *)calloc((size_t)n_pages * n_layer, sizeof(uint64_t));
    cuda_ctx *c = lg && h.ka && h.va ? cuda_ctx_init(m, &p, &err) : NULL;
    int rc = c ? 0 : -ENOMEM;
    if (c) {
        r->gpu_kv = cuda_ctx_kv_bytes(c);
        rc = store ? store_fill(&h, c, hp, o, ctx, r, &err) : alias_fill(&h, c, hp, o, ctx, r, &err);
    }
    if (rc == 0 && r->spill_gib > 0)
        printf("  spill tier: %.2f GiB of the KV in the spill file (%s, %s I/O), read back into "
               "pinned staging at the hand-off in %.2f s = %.2f GB/s\n",
               r->spill_gib, o->spill_dir, kvstore_io_name(h.kv), r->stage_s,
               r->stage_s > 0 ? r->spill_gib * GiB / 1e9 / r->stage_s : 0.0);
    if (rc == 0)
        printf("  host KV: pin/register %.2f s, synthetic fill %.2f s, hand-off (lease + "
               "addresses + bind) %.1f ms; GPU KV (ring, caches, probe cache) %.2f GiB = %.2f %% of the "
               "dense %.2f GiB\n",
               r->register_s, r->fill_s, r->handoff_ms, (double)r->gpu_kv / GiB,
               100.0 * (double)r->gpu_kv / (double)r->dense_kv, (double)r->dense_kv / GiB);
    int32_t tok = 1;
    for (int s = 0; s < o->warmup && rc == 0; s++) {
        uint64_t t0 = cm_time_ns();
        rc = cuda_decode(c, 0, tok, lg, &err);
        if (s == 0) r->first_ms = (double)(cm_time_ns() - t0) / 1e6;
        if (rc == 0) tok = (int32_t)argmax(lg, V);
    }
    if (rc == 0) printf("  first step (cold caches, full refresh over the bus): %.1f ms\n",
                        r->first_ms);
    if (rc == 0) cuda_ctx_offload_reset(c);
    double total = 0;
    for (int s = 0; s < o->steps && rc == 0; s++) {
        const int kind = hip_refresh_stage(hc, n_stages, o->warmup + s);
        uint64_t t0 = cm_time_ns();
        rc = cuda_decode(c, 0, tok, lg, &err);
        const double ms = (double)(cm_time_ns() - t0) / 1e6;
        if (rc) break;
        tok = (int32_t)argmax(lg, V);
        total += ms;
        r->kind_ms[CM_MIN(kind, 3)] += ms;
        r->kind_n[CM_MIN(kind, 3)]++;
    }
    if (rc == 0) {
        r->ms_mean = total / o->steps;
        cuda_ctx_offload_stats(c, &r->st);
    }
    if (rc == 0 && o->prof_steps > 0) {
        setenv("IHIP_OFFLOAD_PROFILE", "1", 1);
        cuda_ctx_offload_reset(c);
        double pt = 0;
        for (int s = 0; s < o->prof_steps && rc == 0; s++) {
            uint64_t t0 = cm_time_ns();
            rc = cuda_decode(c, 0, tok, lg, &err);
            pt += (double)(cm_time_ns() - t0) / 1e6;
            if (rc == 0) tok = (int32_t)argmax(lg, V);
        }
        unsetenv("IHIP_OFFLOAD_PROFILE");
        cuda_offload_stats ps;
        if (rc == 0 && cuda_ctx_offload_stats(c, &ps) == 0 && pt > 0) {
            r->frac_mask = ps.ms_mask / pt;
            r->frac_cache = ps.ms_cache / pt;
            r->frac_attn = ps.ms_attn / pt;
        }
    }
    if (rc) {
        snprintf(r->why, sizeof(r->why), "%s", err.msg[0] ? err.msg : "out of memory");
        printf("  FAILED: %s\n", r->why);
    } else {
        r->ok = true;
        const cuda_offload_stats *st = &r->st;
        printf("  => %.2f ms/step, %.2f tokens/s\n", r->ms_mean, 1000.0 / r->ms_mean);
        printf("     K‖V cache: %llu refreshes, needed %llu pages, hit %.1f %%, installed %llu, "
               "overflow %llu; keys cache: %llu refreshes, needed %llu, hit %.1f %%, installed "
               "%llu, overflow %llu; host→GPU %.2f MiB/token\n",
               (unsigned long long)st->sa_updates, (unsigned long long)st->sa_needed,
               st->sa_needed ? 100.0 * st->sa_hits / st->sa_needed : 0.0,
               (unsigned long long)st->sa_installs, (unsigned long long)st->sa_overflow,
               (unsigned long long)st->mk_updates, (unsigned long long)st->mk_needed,
               st->mk_needed ? 100.0 * st->mk_hits / st->mk_needed : 0.0,
               (unsigned long long)st->mk_installs, (unsigned long long)st->mk_overflow,
               (double)st->bytes_h2d / 1048576.0 / o->steps);
        for (int k = 0; k < 4; k++)
            if (r->kind_n[k])
                printf("     %-6s %3d steps, mean %.2f ms\n",
                       k == 0 ? "full" : k == 1 ? "stage1" : k == 2 ? "stage2" : "reuse",
                       r->kind_n[k], r->kind_ms[k] / r->kind_n[k]);
        printf("     split (profiled pass): mask %.0f %%, cache update %.0f %%, attention "
               "%.0f %%, rest %.0f %%\n",
               100 * r->frac_mask, 100 * r->frac_cache, 100 * r->frac_attn,
               100 * (1 - r->frac_mask - r->frac_cache - r->frac_attn));
    }
    fflush(stdout);
    cuda_ctx_free(c);
    host_kv_free(&h);
    free(lg);
}

/* Page sink of the prefill rows: a block of the WRITING sequence per (page, layer). */
struct sink_user {
    struct host_kv *h;
    kvstore_seq_ref seq;
    size_t half;
};

static int bench_sink(void *user, int seq, int layer, int64_t page, uint64_t *k, uint64_t *v,
                      cm_err *err)
{
    (void)seq;
    struct sink_user *u = (struct sink_user *)user;
    void *data = NULL, *dp = NULL;
    int rc = kvstore_block_alloc(u->h->kv, u->seq, (uint32_t)page, (uint32_t)layer, &data, err);
    if (rc) return rc;
    if (cudaHostGetDevicePointer(&dp, data, 0) != cudaSuccess)
        return cm_err_set(err, -EIO, "cudaHostGetDevicePointer of a block failed");
    *k = (uint64_t)(uintptr_t)dp;
    *v = *k + u->half;
    return 0;
}

static int prefill_progress(void *user, int64_t done, int64_t total)
{
    const uint64_t *t0 = (const uint64_t *)user;
    printf("    prefill %lld / %lld tokens, %.1f s\n", (long long)done, (long long)total,
           (double)(cm_time_ns() - *t0) / 1e9);
    fflush(stdout);
    return 0;
}

static void prefill_row(const cuda_model *m, const hip_config *hc, const struct opts *o, int64_t n)
{
    const mdl_hparams *hp = cuda_model_hparams(m);
    const int n_layer = (int)hp->n_layer;
    const int64_t n_pages = (n + o->page - 1) / o->page;
    cm_err err = {};
    printf("\n== real GPU prefill of %lld random tokens into a kvstore segment (%s KV) ==\n",
           (long long)n, o->kv_dtype == CUDA_KV_FP8 ? "fp8" : "bf16");
    struct host_kv h;
    memset(&h, 0, sizeof(h));
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = n + 64;
    p.n_chunk = o->prefill_chunk;
    p.hip = hc;
    p.kv_dtype = o->kv_dtype;
    p.page_tokens = o->page;
    p.sa_cache_tokens = -1;
    p.mask_cache_tokens = -1;
    p.tail_tokens = o->prefill_ring < 0 ? n + 64 : o->prefill_ring;
    p.stage_tokens = o->prefill_stage < 0 ? n : o->prefill_stage;
    if (o->prefill_resident) { /* the baseline: KV resident on the GPU, no store */
        p.page_tokens = 0;
        p.tail_tokens = p.stage_tokens = 0;
        printf("  (baseline: non-paged context, whole KV on the GPU, nothing written out)\n");
    }
    cuda_ctx *c = cuda_ctx_init(m, &p, &err);
    int32_t *tok = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    float *lg = (float *)malloc(sizeof(float) * (size_t)hp->n_vocab);
    int rc = c && tok && lg ? 0 : -ENOMEM;
    uint64_t x = 88172645463325252ULL; /* the same random prompt in both variants */
    for (int64_t i = 0; i < n && tok; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tok[i] = (int32_t)(x % (uint64_t)hp->n_vocab);
    }
    if (rc == 0 && o->prefill_resident) {
        uint64_t t0 = cm_time_ns();
        rc = cuda_prefill(c, 0, tok, n, lg, prefill_progress, &t0, &err);
        const double s = (double)(cm_time_ns() - t0) / 1e9;
        if (rc == 0)
            printf("  => %lld tokens in %.2f s (%.0f tokens/s), chunk %lld, KV resident on the "
                   "GPU (%.2f GiB)\n",
                   (long long)n, s, (double)n / s, (long long)o->prefill_chunk,
                   (double)cuda_ctx_kv_bytes(c) / GiB);
        else
            printf("  FAILED: %s\n", err.msg);
        cuda_ctx_free(c);
        free(tok);
        free(lg);
        return;
    }
    if (rc == 0)
        rc = make_segment(&h, hp, o, (uint32_t)(n_pages * n_layer), 0, (uint32_t)(n_pages * n_layer),
                          &err);
    struct sink_user su;
    su.h = &h;
    su.half = half_bytes(hp, o);
    if (rc == 0) rc = kvstore_seq_create(h.kv, NULL, 0, &su.seq, &err);
    if (rc == 0) rc = cuda_ctx_set_page_sink(c, bench_sink, &su);
    uint64_t t0 = cm_time_ns();
    if (rc == 0) rc = cuda_prefill(c, 0, tok, n, lg, prefill_progress, &t0, &err);
    if (rc == 0) rc = cuda_ctx_flush(c, 0, &err);
    const double s = (double)(cm_time_ns() - t0) / 1e9;
    kvstore_lease pub;
    if (rc == 0) rc = kvstore_seq_publish(h.kv, su.seq, tok, (uint32_t)n, &pub, &err);
    if (rc == 0) {
        kvstore_lease_release(h.kv, &pub, NULL);
        cuda_offload_stats st;
        cuda_ctx_offload_stats(c, &st);
        printf("  => %lld tokens in %.2f s (%.0f tokens/s), chunk %lld; %.2f GiB written to the "
               "store, %.2f GiB staged back; GPU KV (ring + staging) %.2f GiB = %.1f %% of the "
               "prompt's KV; published\n",
               (long long)n, s, (double)n / s, (long long)o->prefill_chunk,
               (double)st.bytes_d2h / GiB, (double)st.bytes_h2d_stage / GiB,
               (double)cuda_ctx_kv_bytes(c) / GiB,
               100.0 * (double)cuda_ctx_kv_bytes(c) / (double)st.bytes_d2h);
    } else {
        printf("  FAILED: %s\n", err.msg);
    }
    cuda_ctx_free(c);
    host_kv_free(&h);
    free(tok);
    free(lg);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: offload_gpu [--ctx-list 262144,1048576] [--kv fp8|bf16] [--steps 64] "
            "[--warmup 9] [--prof-steps 16] [--page 64] [--sa-cache N] [--mask-cache N] "
            "[--store-dir DIR] [--store-max-gib G] [--alias-gib G] [--prefill-list N,...] "
            "[--prefill-chunk N] [--prefill-ring N|all] [--prefill-stage N|all] "
            "[--prefill-resident 0|1] [--spill-gib G] [--spill-dir DIR] [--probe-cache 0|1] "
            "[--preset fast|3k|flash] [--dev N]\n");
}

int main(int argc, char **argv)
{
    static struct opts o;
    o.ctx[0] = 262144;
    o.ctx[1] = 1048576;
    o.n_ctx = 2;
    o.kv_dtype = CUDA_KV_FP8;
    o.steps = 64;
    o.warmup = 9;
    o.prof_steps = 16;
    o.page = 64;
    o.sa_cache = 32768;
    o.mask_cache = 65536;
    o.prefill_chunk = 32768;
    o.prefill_ring = 0;
    o.prefill_stage = -1;
    o.store_dir = "/dev/shm";
    o.spill_dir = "/tmp";
    o.store_max_gib = 0.75 * mem_available_gib();
    o.alias_gib = 24;
    const char *preset = "fast";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 1;
        }
        i++;
        char *e;
        if (!strcmp(a, "--ctx-list")) {
            if (parse_list(v, o.ctx, &o.n_ctx)) return usage(), 1;
        } else if (!strcmp(a, "--prefill-list")) {
            if (parse_list(v, o.pre, &o.n_pre)) return usage(), 1;
        } else if (!strcmp(a, "--kv")) {
            if (!strcmp(v, "fp8")) o.kv_dtype = CUDA_KV_FP8;
            else if (!strcmp(v, "bf16")) o.kv_dtype = CUDA_KV_BF16;
            else return usage(), 1;
        } else if (!strcmp(a, "--steps")) {
            o.steps = atoi(v);
        } else if (!strcmp(a, "--warmup")) {
            o.warmup = atoi(v);
        } else if (!strcmp(a, "--prof-steps")) {
            o.prof_steps = atoi(v);
        } else if (!strcmp(a, "--page")) {
            o.page = atoi(v);
        } else if (!strcmp(a, "--sa-cache")) {
            o.sa_cache = parse_size(v, &e);
        } else if (!strcmp(a, "--mask-cache")) {
            o.mask_cache = parse_size(v, &e);
        } else if (!strcmp(a, "--prefill-resident")) {
            o.prefill_resident = atoi(v) != 0;
        } else if (!strcmp(a, "--prefill-stage")) {
            o.prefill_stage = !strcmp(v, "all") ? -1 : parse_size(v, &e);
        } else if (!strcmp(a, "--prefill-ring")) {
            o.prefill_ring = !strcmp(v, "all") ? -1 : parse_size(v, &e);
        } else if (!strcmp(a, "--prefill-chunk")) {
            o.prefill_chunk = parse_size(v, &e);
        } else if (!strcmp(a, "--store-dir")) {
            o.store_dir = v;
        } else if (!strcmp(a, "--store-max-gib")) {
            o.store_max_gib = atof(v);
        } else if (!strcmp(a, "--alias-gib")) {
            o.alias_gib = atof(v);
        } else if (!strcmp(a, "--probe-cache")) {
            o.probe_cache = atoi(v) != 0;
        } else if (!strcmp(a, "--spill-gib")) {
            o.spill_gib = atof(v);
        } else if (!strcmp(a, "--spill-dir")) {
            o.spill_dir = v;
        } else if (!strcmp(a, "--preset")) {
            preset = v;
        } else if (!strcmp(a, "--dev")) {
            o.dev = atoi(v);
        } else {
            usage();
            return 1;
        }
    }
    if (o.steps < 1 || o.warmup < 1 || o.prof_steps < 0 || o.page < 8) {
        usage();
        return 1;
    }
    cm_err err = {};
    static hip_config hc;
    hip_config_default(&hc);
    if (hip_config_preset(&hc, preset, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    if (cuda_device_count() <= o.dev) {
        printf("skip: no CUDA device %d visible\n", o.dev);
        return 77;
    }
    char desc[256] = "";
    if (cuda_device_describe(o.dev, desc, sizeof(desc)) == 0) printf("device: %s\n", desc);
    cudaSetDevice(o.dev);
    cuda_model *m = cuda_model_synthetic("llama3-8b", 1, o.dev, &err);
    if (!m) {
        fprintf(stderr, "model: %s\n", err.msg);
        return 1;
    }
    printf("model: synthetic llama3-8b (%.2f GiB bf16 weights on the GPU); KV %s in host memory, "
           "pages of %d tokens; caches per layer: K‖V %lld tokens, keys %lld tokens; HiP preset "
           "%s; host memory available %.1f GiB, store used up to %.1f GiB, else alias %.1f GiB\n",
           (double)cuda_model_bytes(m) / GiB, o.kv_dtype == CUDA_KV_FP8 ? "fp8" : "bf16", o.page,
           (long long)o.sa_cache, (long long)o.mask_cache, preset, mem_available_gib(),
           o.store_max_gib, o.alias_gib);
    static struct row rows[MAX_CTX];
    for (int i = 0; i < o.n_ctx; i++) decode_row(m, &hc, &o, o.ctx[i], &rows[i]);
    for (int i = 0; i < o.n_pre; i++) prefill_row(m, &hc, &o, o.pre[i]);

    printf("\n## offloaded decode, synthetic llama3-8b, batch 1, KV in host memory (synthetic "
           "K/V, no prefill)\n%s\n",
           desc);
    printf("| ctx | host KV | tokens/s | ms/step | first step ms | full | stage1 | stage2 | "
           "reuse | K‖V hit %% | keys hit %% | MiB h2d/token | mask/cache/attn %% | GPU KV GiB "
           "(%% dense) | hand-off ms |\n");
    printf("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    int bad = 0;
    for (int i = 0; i < o.n_ctx; i++) {
        const struct row *r = &rows[i];
        if (!r->ok) {
            bad++;
            printf("| %lld | %s %.0f GiB | failed: %s |\n", (long long)r->ctx, r->mode,
                   r->host_gib, r->why);
            continue;
        }
        char k[4][16];
        for (int j = 0; j < 4; j++)
            if (r->kind_n[j]) snprintf(k[j], sizeof(k[j]), "%.1f", r->kind_ms[j] / r->kind_n[j]);
            else snprintf(k[j], sizeof(k[j]), "—");
        const cuda_offload_stats *st = &r->st;
        printf("| %lld | %s %.0f GiB | %.1f | %.2f | %.0f | %s | %s | %s | %s | %.1f | %.1f | "
               "%.2f | %.0f/%.0f/%.0f | %.2f (%.1f %%) | %.0f |\n",
               (long long)r->ctx, r->mode, r->host_gib, 1000.0 / r->ms_mean, r->ms_mean,
               r->first_ms, k[0], k[1], k[2], k[3],
               st->sa_needed ? 100.0 * st->sa_hits / st->sa_needed : 0.0,
               st->mk_needed ? 100.0 * st->mk_hits / st->mk_needed : 0.0,
               (double)st->bytes_h2d / 1048576.0 / o.steps, 100 * r->frac_mask,
               100 * r->frac_cache, 100 * r->frac_attn, (double)r->gpu_kv / GiB,
               100.0 * (double)r->gpu_kv / (double)r->dense_kv, r->handoff_ms);
    }
    cuda_model_free(m);
    return bad ? 1 : 0;
}
