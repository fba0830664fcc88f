/*
 * prefill-cuda.c — --device cuda: the GPU compute backend of ihip-prefill-worker.
 *
 * At start the CPU model (already loaded for the fingerprint and the vocabulary) is uploaded once
 * (cuda_model_load), the segment's block pool is registered with CUDA once (kvstore_cuda_init),
 * and each slot gets a paged cuda_ctx (cuda-model.h) of one sequence whose pages ARE kvstore
 * blocks: page_tokens = the segment's tokens per block, the block layout [K|V][kv_head][token]
 * [head_dim] in the segment's dtype (bf16, or fp8 e4m3 with the fixed scale CUDA_KV_FP8_SCALE).
 * A job then runs on the GPU:
 *
 *   - an adopted prefix (the shared flow of prefill-service.c adopts whole blocks of a READY
 *     sequence) is bound in place: the device address of each adopted block, resolved on the
 *     prefix's lease (kvstore_cuda_block_addr), goes to cuda_ctx_bind_host, so the GPU reads
 *     those blocks over the bus and never writes them (sink pages start after them);
 *   - cuda_prefill computes the rest in chunks; after each chunk the page sink (prefill_sink)
 *     receives every page the chunk completed, allocates that block of the WRITING sequence
 *     (kvstore_block_alloc) and returns its device address: the context copies the page there
 *     and frees its ring slot, so GPU memory holds about two chunks whatever the prompt length;
 *     cuda_ctx_flush writes the partial last page;
 *   - a bound prefix block may have been spilled by the store meanwhile (sealed blocks of READY
 *     sequences may move under memory pressure, and the freed RAM slot be reused): after the
 *     prefill every bound address is resolved again; blocks never move back into RAM, so one
 *     still at its address was there throughout. Otherwise the job runs again without prefix
 *     reuse (prefill_run.retry).
 *
 * Threads: each slot's context is used by its slot thread only; the model is shared (allowed by
 * cuda-model.h); kvstore_cuda is used by the slot threads for kvstore_cuda_block_addr only, which
 * reads the registered pool's address and the segment (no state of its own changes).
 * The decode seed state is the same as the CPU path's: nothing GPU-specific is handed over (the
 * first decode step on the GPU runs a full HiP mask refresh).
 */
#define _POSIX_C_SOURCE 200809L

#include "prefill-impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef IHIP_HAVE_CUDA

#include "backend/cuda/cuda-model.h"
#include "backend/cuda/cuda.h"

#include <cuda_runtime_api.h>

/* The worker's GPU state. */
struct prefill_cuda {
    cuda_model *model;  /* the weights on the GPU, shared by the slots' contexts */
    kvstore_cuda *kc;   /* the segment pool, registered: device addresses of blocks */
    cuda_ctx_params cp; /* the slots' context parameters (hip set per context) */
    size_t half;        /* bytes of a block's K (= of its V): kv_heads × tpb × head_dim × elem */
};

/* A slot's GPU state. */
struct prefill_cuda_slot {
    cuda_ctx *ctx;           /* paged, one sequence (0); NULL after a CUDA error: made again */
    char digest[64];         /* attention ctx was made with */
    float *logits;           /* [n_vocab] of the last prefill */
    uint64_t *ka, *va;       /* [n_layer][n_prefix_pages] device addresses bound for the prefix */
    size_t cap;              /* entries of ka and va */
    uint32_t n_prefix_pages; /* pages bound by the current job (0: none) */
};

bool prefill_cuda_built(void)
{
    return true;
}

/* A failed CUDA or cuBLAS call (cuda-hip.h CUDA_ERR, cuda-model.h CUBLAS_ERR): the context may be
 * unusable. */
static bool gpu_error(int rc)
{
    return (rc <= -1000 && rc > -2000) || (rc <= -3000 && rc > -4000);
}

/* Make the slot's context for the job's attention (a context's HiP configuration is fixed when
 * it is made) and empty its sequence. */
static int gpu_begin(prefill_run *r, cm_err *err)
{
    struct prefill_cuda *gp = r->w->gpu;
    struct prefill_cuda_slot *g = r->s->gpu;
    const prefill_job *j = r->j;
    g->n_prefix_pages = 0;
    if (!g->ctx || strcmp(g->digest, j->digest) != 0) {
        cuda_ctx_free(g->ctx); /* first: GPU memory for one context at a time */
        g->ctx = NULL;
        cuda_ctx_params p = gp->cp;
        p.hip = j->dense ? NULL : j->hc;
        g->ctx = cuda_ctx_init(gp->model, &p, err);
        if (!g->ctx) {
            cm_err_prefix(err, "GPU context for this attention: ");
            return err && err->code ? err->code : -ENOMEM;
        }
        snprintf(g->digest, sizeof(g->digest), "%s", j->digest);
    }
    cuda_ctx_reset(g->ctx, 0);
    return 0;
}

/* Bind the adopted blocks in place: addresses [n_layer][n / tpb] on the prefix's lease. */
static int gpu_load_prefix(prefill_run *r, const kvstore_lease *pl, uint32_t n, bool *keep,
                           cm_err *err)
{
    struct prefill_cuda *gp = r->w->gpu;
    struct prefill_cuda_slot *g = r->s->gpu;
    const uint32_t tpb = kvstore_get_geometry(r->w->kv)->tokens_per_block;
    const int n_layer = (int)r->w->model->hp.n_layer;
    const uint32_t np = n / tpb;
    const size_t need = (size_t)n_layer * np;
    *keep = false;
    if (need > g->cap) {
        uint64_t *ka = realloc(g->ka, need * sizeof(*ka));
        if (ka)
            g->ka = ka;
        uint64_t *va = ka ? realloc(g->va, need * sizeof(*va)) : NULL;
        if (va)
            g->va = va;
        if (!ka || !va)
            return cm_err_set(err, -ENOMEM, "out of memory");
        g->cap = need;
    }
    for (int il = 0; il < n_layer; il++)
        for (uint32_t p = 0; p < np; p++) {
            uint64_t a = 0;
            int rc = kvstore_cuda_block_addr(gp->kc, pl, p, (uint32_t)il, &a, err);
            if (rc < 0)
                return rc; /* e.g. spilled: the shared flow recomputes without the prefix */
            g->ka[(size_t)il * np + p] = a;
            g->va[(size_t)il * np + p] = a + gp->half;
        }
    int rc = cuda_ctx_bind_host(g->ctx, 0, (int64_t)n, g->ka, g->va, err);
    if (rc < 0) {
        cuda_ctx_reset(g->ctx, 0);
        return rc;
    }
    g->n_prefix_pages = np;
    *keep = true; /* the GPU reads the blocks during compute: the lease stays until the end */
    return 0;
}

/* The page sink: page `page` of layer `layer` is block (page, layer) of the WRITING sequence. The
 * context only sinks pages from the first one it did not bind, so adopted blocks are never
 * asked for (kvstore_block_alloc would refuse them: shared blocks are read-only). */
static int prefill_sink(void *user, int seq, int layer, int64_t page, uint64_t *k_addr,
                        uint64_t *v_addr, cm_err *err)
{
    (void)seq;
    prefill_run *r = user;
    if (page < 0 || page > (int64_t)UINT32_MAX)
        return cm_err_set(err, -EINVAL, "page %lld is outside the store's range", (long long)page);
    void *data = NULL, *dp = NULL;
    int rc = kvstore_block_alloc(r->w->kv, r->seq, (uint32_t)page, (uint32_t)layer, &data,
                                 &r->store_err);
    if (rc < 0) {
        if (!r->store_rc)
            r->store_rc = rc; /* mapped to a status by the shared flow (fail_kv) */
        return cm_err_set(err, rc, "%s", r->store_err.msg);
    }
    cudaError_t e = cudaHostGetDevicePointer(&dp, data, 0);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "device address of block (%lld, layer %d): %s",
                          (long long)page, layer, cudaGetErrorString(e));
    *k_addr = (uint64_t)(uintptr_t)dp;
    *v_addr = *k_addr + r->w->gpu->half;
    return 0;
}

/* After each chunk (its completed pages are in the store by now): whole blocks are stored. */
static int gpu_on_chunk(void *user, int64_t done, int64_t total)
{
    (void)total;
    prefill_run *r = user;
    const uint32_t tpb = kvstore_get_geometry(r->w->kv)->tokens_per_block;
    uint32_t stored = (r->start + (uint32_t)done) / tpb * tpb;
    return prefill_run_chunk_done(r, stored > r->stored ? stored : r->stored);
}

/* Every bound prefix block still where it was bound (see the top of the file). */
static int check_prefix(prefill_run *r, cm_err *err)
{
    struct prefill_cuda *gp = r->w->gpu;
    struct prefill_cuda_slot *g = r->s->gpu;
    const uint32_t np = g->n_prefix_pages;
    if (!np || !r->have_prefix)
        return 0;
    for (int il = 0; il < (int)r->w->model->hp.n_layer; il++)
        for (uint32_t p = 0; p < np; p++) {
            uint64_t a = 0;
            int rc = kvstore_cuda_block_addr(gp->kc, &r->prefix, p, (uint32_t)il, &a, NULL);
            if (rc < 0 || a != g->ka[(size_t)il * np + p]) {
                r->retry = true;
                return cm_err_set(err, -KVSTORE_ESTALE,
                                  "adopted prefix block (token block %u, layer %d) left RAM "
                                  "during the GPU prefill",
                                  p, il);
            }
        }
    return 0;
}

static int gpu_compute(prefill_run *r, cm_err *err)
{
    struct prefill_cuda_slot *g = r->s->gpu;
    const prefill_job *j = r->j;
    cuda_ctx_set_page_sink(g->ctx, prefill_sink, r);
    int rc = cuda_prefill(g->ctx, 0, j->tokens + r->start, (int64_t)(j->n_tokens - r->start),
                          g->logits, gpu_on_chunk, r, err);
    if (rc == 0)
        rc = cuda_ctx_flush(g->ctx, 0, err); /* the partial last page; waits for every copy */
    if (rc == 0)
        rc = check_prefix(r, err);
    if (rc < 0 && !gpu_error(rc))
        /* page copies into the sequence's blocks may still be queued: they must land before the
         * shared flow aborts the sequence and its blocks go to other writers (binding nothing
         * resets the sequence and waits for the context's stream) */
        cuda_ctx_bind_host(g->ctx, 0, 0, NULL, NULL, NULL);
    cuda_ctx_set_page_sink(g->ctx, NULL, NULL);
    if (gpu_error(rc)) {
        /* a failed CUDA call may leave the context unusable: the next job makes a new one. Wait
         * for the device first, for the same reason as above (it may fail too: then no copy
         * is running any more either). */
        CM_LOG_WARN("prefill %s: GPU error (%s); the slot's context is made again", j->request_id,
                    err ? err->msg : "");
        cudaDeviceSynchronize();
        cuda_ctx_free(g->ctx);
        g->ctx = NULL;
        g->digest[0] = 0;
    }
    if (rc == 0)
        r->stored = j->n_tokens;
    return rc;
}

static float *gpu_logits(const prefill_run *r)
{
    return r->s->gpu->logits;
}

static const prefill_backend prefill_backend_cuda = {
    .name = "cuda",
    .what = "GPU prefill",
    .begin = gpu_begin,
    .load_prefix = gpu_load_prefix,
    .compute = gpu_compute,
    .logits = gpu_logits,
};

int prefill_cuda_init(prefill_worker *w, cm_err *err)
{
    const kvstore_geometry *g = kvstore_get_geometry(w->kv);
    const mdl_hparams *hp = &w->model->hp;
    const int dev = (int)w->cfg.gpu;
    int n_dev = cuda_device_count();
    if (n_dev <= 0)
        return cm_err_set(err, -ENODEV,
                          "--device cuda: no CUDA device is visible (no GPU, no driver, or "
                          "CUDA_VISIBLE_DEVICES hides it); use --device cpu");
    if (dev >= n_dev)
        return cm_err_set(err, -ENODEV, "--gpu %d: only %d CUDA device(s) are visible", dev,
                          n_dev);
    if (g->dtype != KVSTORE_DTYPE_BF16 && g->dtype != KVSTORE_DTYPE_F8_E4M3)
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "--device cuda: the KV segment's dtype %u is not bf16 or fp8",
                          (unsigned)g->dtype);
    const uint32_t tpb = g->tokens_per_block;
    if (tpb < 8 || tpb > 4096 || (tpb & (tpb - 1)))
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "--device cuda: the GPU page is one KV block, a power of two in "
                          "[8, 4096] tokens; segment %s has %u tokens per block",
                          w->cfg.kv_name, (unsigned)tpb);
    const bool fp8 = g->dtype == KVSTORE_DTYPE_F8_E4M3;
    struct prefill_cuda *gp = calloc(1, sizeof(*gp));
    if (!gp)
        return cm_err_set(err, -ENOMEM, "out of memory");
    w->gpu = gp;
    gp->half = (size_t)g->n_kv_heads * tpb * g->head_dim * (fp8 ? 1 : 2);
    if (g->bytes_per_block < 2 * (uint64_t)gp->half)
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "--device cuda: segment %s has blocks of %llu bytes; K and V of %u "
                          "tokens need %zu",
                          w->cfg.kv_name, (unsigned long long)g->bytes_per_block, (unsigned)tpb,
                          2 * gp->half);

    uint64_t t0 = cm_time_ns();
    gp->model = cuda_model_load(w->model, dev, err);
    if (!gp->model) {
        cm_err_prefix(err, "--device cuda: uploading the model: ");
        return err->code ? err->code : -ENOMEM;
    }
    int rc = kvstore_cuda_init(w->kv, 1, &gp->kc, err);
    if (rc < 0) {
        cm_err_prefix(err, "--device cuda: registering the KV segment with CUDA: ");
        return rc;
    }
    gp->cp = cuda_ctx_default_params();
    gp->cp.n_ctx = w->cfg.max_prompt_tokens; /* no prompt is longer (admission) */
    gp->cp.n_chunk = w->cfg.chunk;
    gp->cp.n_seq = 1;
    gp->cp.kv_dtype = fp8 ? CUDA_KV_FP8 : CUDA_KV_BF16;
    gp->cp.kv_k_scale = CUDA_KV_FP8_SCALE; /* the store's fixed fp8 scale (kvstore.h) */
    gp->cp.kv_v_scale = CUDA_KV_FP8_SCALE;
    gp->cp.page_tokens = (int)tpb;
    gp->cp.sa_cache_tokens = -1; /* the decode-side page caches: prefill does not use them */
    gp->cp.mask_cache_tokens = -1;
    /* prefix staging: each layer's prefix older than the ring is copied back to the GPU while
     * the previous layer computes (2 buffers of one layer's KV of the longest prompt) */
    gp->cp.stage_tokens = w->cfg.gpu_stage_tokens > 0 ? w->cfg.gpu_stage_tokens
                                                      : w->cfg.max_prompt_tokens;
    for (int i = 0; i < (int)w->cfg.max_concurrent; i++) {
        prefill_slot *s = &w->slots[i];
        struct prefill_cuda_slot *sg = calloc(1, sizeof(*sg));
        if (!sg)
            return cm_err_set(err, -ENOMEM, "out of memory");
        s->gpu = sg;
        sg->logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
        if (!sg->logits)
            return cm_err_set(err, -ENOMEM, "out of memory");
        cuda_ctx_params p = gp->cp;
        p.hip = w->default_dense ? NULL : &w->default_hc;
        sg->ctx = cuda_ctx_init(gp->model, &p, err);
        if (!sg->ctx) {
            cm_err_prefix(err, "--device cuda: context %d: ", i);
            return err->code ? err->code : -ENOMEM;
        }
        snprintf(sg->digest, sizeof(sg->digest), "%s", w->default_digest);
    }
    char desc[256] = "";
    cuda_device_describe(dev, desc, sizeof(desc));
    CM_LOG_INFO("prefill: GPU %d (%s): weights %.2f GiB, KV pages of %u tokens (%s) written into "
                "the segment's blocks, %.1f MiB of GPU KV per context, ready in %.0f ms",
                dev, desc, (double)cuda_model_bytes(gp->model) / (1024.0 * 1024.0 * 1024.0),
                (unsigned)tpb, fp8 ? "fp8" : "bf16",
                (double)cuda_ctx_kv_bytes(w->slots[0].gpu->ctx) / (1024.0 * 1024.0),
                (double)(cm_time_ns() - t0) / 1e6);
    w->be = &prefill_backend_cuda;
    return 0;
}

void prefill_cuda_free(prefill_worker *w)
{
    for (int i = 0; w->slots && i < (int)w->cfg.max_concurrent; i++) {
        struct prefill_cuda_slot *sg = w->slots[i].gpu;
        if (!sg)
            continue;
        cuda_ctx_free(sg->ctx);
        free(sg->logits);
        free(sg->ka);
        free(sg->va);
        free(sg);
        w->slots[i].gpu = NULL;
    }
    if (w->gpu) {
        kvstore_cuda_free(w->gpu->kc); /* unregisters the pool: before the store is closed */
        cuda_model_free(w->gpu->model);
        free(w->gpu);
        w->gpu = NULL;
    }
}

#else /* no CUDA backend in this build */

bool prefill_cuda_built(void)
{
    return false;
}

int prefill_cuda_init(prefill_worker *w, cm_err *err)
{
    (void)w;
    return cm_err_set(err, -CM_EUNSUPPORTED,
                      "--device cuda: this build has no CUDA backend (configure with "
                      "-DIHIP_CUDA=ON where nvcc is installed); use --device cpu");
}

void prefill_cuda_free(prefill_worker *w)
{
    (void)w;
}

#endif
