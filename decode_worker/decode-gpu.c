/*
 * decode-gpu.c — --device cuda: the decode worker decodes on one GPU while the prompt's K/V stays
 * in the kvstore segment in host memory (HiP's KV offloading, issue 7; shared/HIP.md §7).
 *
 * At start: the loaded CPU model is uploaded (cuda_model_load), the segment's RAM pool is
 * registered with CUDA (kvstore_cuda_init), and ONE paged cuda_ctx is made with a slot (sequence)
 * per admitted sequence (--max-seqs). A kvstore block is exactly one page of the context
 * ([K|V][kv_head][token][head_dim], page_tokens = the segment's tokens per block, bf16 or fp8
 * e4m3), so a prefilled sequence is "loaded" by resolving each block's device address on the
 * lease (kvstore_cuda_block_addr) and binding them to a free slot (cuda_ctx_bind_host): nothing
 * is copied but the partial last page; the GPU reads the blocks in place (over the bus, or from
 * its K‖V and keys caches). The lease is therefore held until the slot is released.
 *
 * Threads: the context is used by one thread at a time (cuda-model.h): bind (prefill threads),
 * the batched decode step and slot release (scheduler thread) take `gpu.mu`. Address
 * resolution runs outside it (read-only on the store). Offload counters are copied out after
 * decode steps (at most every 200 ms) so that Admin.GetStats never waits for the GPU.
 *
 * Without CUDA in the build every entry point fails with a message saying so (decode_gpu_init
 * at start-up: the worker refuses --device cuda).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "decode-impl.h"

#ifdef IHIP_HAVE_CUDA

#include <cuda_runtime_api.h>

#include "backend/cuda/cuda-model.h"
#include "backend/cuda/cuda.h"

static struct {
    pthread_mutex_t mu; /* the context, the slot table and the logits */
    cuda_model *model;
    kvstore_cuda *kc;
    cuda_ctx *ctx;
    int dev;
    int n_slots;
    bool *slot_used;   /* [n_slots] */
    void **spill_buf;  /* [n_slots] pinned staging of the slot's spilled blocks, or NULL */
    /* per slot, to check that no block read in place has been spilled meanwhile
     * (kvstore_cuda_seq_check, run when kvstore_spill_count changes) */
    struct bound {
        kvstore_lease lease;
        uint32_t n_tb, n_staged;
        uint64_t *addr; /* [n_layer][n_tb] as bound */
        bool moved;     /* a block moved: the sequence's steps since are void */
    } *bound;          /* [n_slots] */
    uint64_t spill_seen; /* kvstore_spill_count at the last check */
    float *logits;     /* [n_slots][n_vocab]: rows of the last decode_gpu_decode */
    size_t half_bytes; /* K (or V) bytes of one block: V = K + half_bytes */
    uint64_t t_snap;
    pthread_mutex_t st_mu; /* guards st */
    decode_gpu_stats st;
} gpu = {.mu = PTHREAD_MUTEX_INITIALIZER,
       .st_mu = PTHREAD_MUTEX_INITIALIZER};

int decode_gpu_init(cm_err *err)
{
    const decode_config *c = &decode_g.cfg;
    const mdl_hparams *hp = &decode_g.model->hp;
    const kvstore_geometry *g = kvstore_get_geometry(decode_g.kv);
    int kv_dtype;
    size_t elem;
    if (g->dtype == KVSTORE_DTYPE_BF16)
        kv_dtype = CUDA_KV_BF16, elem = 2;
    else if (g->dtype == KVSTORE_DTYPE_F8_E4M3)
        kv_dtype = CUDA_KV_FP8, elem = 1;
    else
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "--device cuda: kvstore segment %s holds %s K/V; the GPU reads blocks in "
                          "place and needs bf16 or fp8 e4m3 (make the segment with one of these "
                          "dtypes, e.g. let a --device cuda worker create it)",
                          c->kv_name,
                          g->dtype == KVSTORE_DTYPE_F16   ? "f16"
                          : g->dtype == KVSTORE_DTYPE_F32 ? "f32"
                                                          : "unknown-dtype");
    const uint32_t tpb = g->tokens_per_block;
    if (tpb < 8 || tpb > 4096 || (tpb & (tpb - 1)))
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "--device cuda: the segment's %u tokens per block must be a power of two "
                          "in [8, 4096] (one block = one GPU page)",
                          tpb);
    gpu.half_bytes = (size_t)g->n_kv_heads * tpb * g->head_dim * elem;
    if (g->bytes_per_block != 2 * gpu.half_bytes)
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "--device cuda: the segment's blocks have %" PRIu64 " bytes, not the "
                          "%zu of [K|V][kv_head][token][head_dim]",
                          g->bytes_per_block, 2 * gpu.half_bytes);
    const int n_dev = cuda_device_count();
    if (c->gpu >= n_dev)
        return cm_err_set(err, -ENODEV, "--device cuda: --gpu %" PRId64 " but %d GPU(s) visible",
                          c->gpu, n_dev);
    gpu.dev = (int)c->gpu;
    char desc[256] = "";
    cuda_device_describe(gpu.dev, desc, sizeof(desc));

    uint64_t t0 = cm_time_ns();
    if (!(gpu.model = cuda_model_load(decode_g.model, gpu.dev, err)))
        return err->code ? err->code : -ENOMEM;
    int rc = kvstore_cuda_init(decode_g.kv, 1, &gpu.kc, err);
    if (rc < 0) return rc;

    /* Capacity: the longest prompt plus the most new tokens (page tables only: the KV of bound
     * pages stays in the segment); the ring holds what decode appends after the partial last
     * page (no page sink here). */
    int64_t n_ctx = c->max_prompt_tokens + c->max_tokens_limit;
    if (n_ctx > c->ctx) n_ctx = c->ctx;
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = n_ctx;
    p.n_chunk = tpb; /* no prefill here: the scratch needs only max(n_chunk, n_seq) rows */
    p.n_seq = (int)c->max_seqs;
    p.hip = decode_g.hip_on ? &decode_g.hip_default : NULL;
    p.kv_dtype = kv_dtype;
    p.page_tokens = (int)tpb;
    p.tail_tokens =
        c->gpu_tail_tokens > 0 ? c->gpu_tail_tokens : c->max_tokens_limit + 2 * (int64_t)tpb;
    p.sa_cache_tokens = c->gpu_sa_cache_tokens;
    p.mask_cache_tokens = c->gpu_mask_cache_tokens;
    p.probe_cache_tokens = c->gpu_probe_cache_tokens;
    if (!(gpu.ctx = cuda_ctx_init(gpu.model, &p, err))) return err->code ? err->code : -ENOMEM;
    gpu.n_slots = p.n_seq;
    gpu.slot_used = calloc((size_t)gpu.n_slots, sizeof(bool));
    gpu.spill_buf = calloc((size_t)gpu.n_slots, sizeof(void *));
    gpu.bound = calloc((size_t)gpu.n_slots, sizeof(*gpu.bound));
    gpu.spill_seen = kvstore_spill_count(decode_g.kv);
    gpu.logits = malloc(sizeof(float) * (size_t)gpu.n_slots * (size_t)hp->n_vocab);
    if (!gpu.slot_used || !gpu.spill_buf || !gpu.bound || !gpu.logits)
        return cm_err_set(err, -ENOMEM, "out of memory");
    gpu.st.kv_bytes = cuda_ctx_kv_bytes(gpu.ctx);
    gpu.st.model_bytes = cuda_model_bytes(gpu.model);
    CM_LOG_INFO("decode: GPU %d (%s): model %.2f GiB uploaded in %.2f s; paged %s context, %s "
                "attention, %d slots, page %u tokens, n_ctx %" PRId64 ", ring %" PRId64
                " tokens, caches %" PRId64 " / %" PRId64 " tokens per layer; GPU KV (ring + "
                "caches) %.1f MiB; prompt K/V read in place from segment %s",
                gpu.dev, desc, (double)gpu.st.model_bytes / 1073741824.0,
                (double)(cm_time_ns() - t0) / 1e9, kv_dtype == CUDA_KV_FP8 ? "fp8" : "bf16",
                cuda_ctx_attn_name(gpu.ctx), gpu.n_slots, tpb, n_ctx, p.tail_tokens,
                p.sa_cache_tokens, p.mask_cache_tokens, (double)gpu.st.kv_bytes / 1048576.0,
                decode_g.kv_path);
    return 0;
}

void decode_gpu_free(void)
{
    cuda_ctx_free(gpu.ctx);
    gpu.ctx = NULL;
    for (int i = 0; gpu.spill_buf && i < gpu.n_slots; i++)
        kvstore_cuda_staging_free(gpu.spill_buf[i]);
    free(gpu.spill_buf);
    gpu.spill_buf = NULL;
    for (int i = 0; gpu.bound && i < gpu.n_slots; i++) free(gpu.bound[i].addr);
    free(gpu.bound);
    gpu.bound = NULL;
    kvstore_cuda_free(gpu.kc); /* unregisters the pool: before the segment is closed */
    gpu.kc = NULL;
    cuda_model_free(gpu.model);
    gpu.model = NULL;
    free(gpu.slot_used);
    gpu.slot_used = NULL;
    free(gpu.logits);
    gpu.logits = NULL;
}

/* With gpu.mu held: mark slot s when a block it reads in place has moved to the spill tier
 * since it was bound (kvstore_cuda_seq_check); its steps since read whatever the RAM slot held. */
static void check_slot_locked(int s)
{
    struct bound *b = &gpu.bound[s];
    if (!gpu.slot_used[s] || !b->addr || b->moved) return;
    cm_err e = {0};
    if (kvstore_cuda_seq_check(gpu.kc, &b->lease, b->n_tb, b->addr, gpu.spill_buf[s],
                               b->n_staged, &e) < 0) {
        b->moved = true; /* its next step fails it (decode_gpu_moved) */
        CM_LOG_WARN("decode: GPU slot %d: %s", s, e.msg);
    }
}

int decode_gpu_bind(const kvstore_lease *lease, int64_t n_tokens, int *slot, cm_err *err)
{
    const kvstore_geometry *g = kvstore_get_geometry(decode_g.kv);
    const int n_layer = (int)decode_g.model->hp.n_layer;
    const int64_t n_pages = (n_tokens + g->tokens_per_block - 1) / g->tokens_per_block;
    const size_t n_addr = (size_t)n_layer * (size_t)n_pages;
    uint64_t *ka = n_addr ? malloc(sizeof(uint64_t) * n_addr) : NULL;
    uint64_t *va = n_addr ? malloc(sizeof(uint64_t) * n_addr) : NULL;
    int rc = 0;
    void *staging = NULL; /* pinned copies of spilled blocks (kvstore_cuda_seq_addrs) */
    *slot = -1;
    if (n_addr && (!ka || !va)) {
        rc = cm_err_set(err, -ENOMEM, "out of memory for %zu block addresses", n_addr);
        goto out;
    }
    /* [layer][page] device addresses of the blocks, read in place while the lease is held;
     * blocks in the spill tier (HIP.md §7, DESIGN.md) are read back with io_uring into one
     * pinned, GPU-mapped buffer of the slot, and the GPU reads them like RAM-tier blocks (over
     * the bus, or copied into its page caches) */
    uint32_t n_staged = 0;
    cudaSetDevice(gpu.dev);
    const uint64_t sc0 = kvstore_spill_count(decode_g.kv); /* before the addresses are read */
    rc = kvstore_cuda_seq_addrs(gpu.kc, lease, (uint32_t)n_pages, ka,
                                (uint64_t)decode_g.cfg.gpu_spill_max_bytes, &staging, &n_staged,
                                err);
    if (rc == -ENOSPC) {
        char why[sizeof(err->msg)];
        snprintf(why, sizeof(why), "%s", err->msg);
        cm_err_set(err, rc, "%s (--gpu-spill-max-bytes; or keep the segment's RAM pool large "
                   "enough)", why);
    }
    for (size_t i = 0; rc == 0 && i < n_addr; i++) va[i] = ka[i] + gpu.half_bytes;
    if (rc == 0 && n_staged) {
        pthread_mutex_lock(&gpu.st_mu);
        gpu.st.spill_blocks += n_staged;
        pthread_mutex_unlock(&gpu.st_mu);
    }
    if (rc < 0) goto out;
    pthread_mutex_lock(&gpu.mu);
    int s = -1;
    for (int i = 0; i < gpu.n_slots && s < 0; i++)
        if (!gpu.slot_used[i]) s = i;
    if (s < 0) {
        rc = cm_err_set(err, -EAGAIN, "every GPU context slot is in use (--max-seqs %d)",
                        gpu.n_slots);
    } else if ((rc = cuda_ctx_bind_host(gpu.ctx, s, n_tokens, ka, va, err)) == 0) {
        gpu.slot_used[s] = true;
        gpu.spill_buf[s] = staging; /* freed when the slot is released */
        staging = NULL;
        free(gpu.bound[s].addr);
        gpu.bound[s] = (struct bound){*lease, (uint32_t)n_pages, n_staged, ka, false};
        ka = NULL; /* kept for the checks */
        *slot = s;
        /* a spill between reading the addresses and now may have been checked (and counted as
         * seen) before this slot was registered: check it here */
        if (kvstore_spill_count(decode_g.kv) != sc0) check_slot_locked(s);
    } else {
        cudaSetDevice(gpu.dev);
        cuda_ctx_reset(gpu.ctx, s);
    }
    pthread_mutex_unlock(&gpu.mu);
    if (rc == 0) {
        pthread_mutex_lock(&gpu.st_mu);
        gpu.st.binds++;
        gpu.st.tokens_bound += (uint64_t)n_tokens;
        pthread_mutex_unlock(&gpu.st_mu);
    }
out:
    kvstore_cuda_staging_free(staging);
    free(ka);
    free(va);
    return rc;
}

/* Copy the context's offload counters (with gpu.mu held). */
static void stats_snapshot_locked(void)
{
    cuda_offload_stats os;
    if (cuda_ctx_offload_stats(gpu.ctx, &os) < 0) {
        cudaGetLastError();
        return;
    }
    pthread_mutex_lock(&gpu.st_mu);
    gpu.st.sa_needed = os.sa_needed;
    gpu.st.sa_hits = os.sa_hits;
    gpu.st.sa_installs = os.sa_installs;
    gpu.st.sa_overflow = os.sa_overflow;
    gpu.st.mk_needed = os.mk_needed;
    gpu.st.mk_hits = os.mk_hits;
    gpu.st.mk_installs = os.mk_installs;
    gpu.st.mk_overflow = os.mk_overflow;
    gpu.st.bytes_h2d = os.bytes_h2d;
    gpu.st.decode_steps = os.decode_steps;
    for (int i = 0; i < 4; i++) {
        gpu.st.refresh[i] = os.refresh[i];
        gpu.st.steps[i] = os.steps[i];
        gpu.st.step_ms[i] = os.step_ms[i];
    }
    gpu.st.kv_bytes = os.gpu_kv_bytes;
    pthread_mutex_unlock(&gpu.st_mu);
}

void decode_gpu_release(int slot)
{
    if (slot < 0 || slot >= gpu.n_slots) return;
    pthread_mutex_lock(&gpu.mu);
    /* Forget the slot's pages (nothing on the stream reads them any more: every decode step
     * synchronizes), so the caller may release the lease. */
    cudaSetDevice(gpu.dev);
    cuda_ctx_reset(gpu.ctx, slot);
    gpu.slot_used[slot] = false;
    free(gpu.bound[slot].addr);
    memset(&gpu.bound[slot], 0, sizeof(gpu.bound[slot]));
    if (gpu.spill_buf[slot]) { /* nothing reads it any more (reset synchronizes) */
        kvstore_cuda_staging_free(gpu.spill_buf[slot]);
        gpu.spill_buf[slot] = NULL;
    }
    stats_snapshot_locked(); /* so that GetStats counts every finished sequence's steps */
    pthread_mutex_unlock(&gpu.mu);
}

/* With gpu.mu held: when the store has spilled blocks since the last check, check every bound
 * slot. */
static void check_moved_locked(void)
{
    const uint64_t sc = kvstore_spill_count(decode_g.kv);
    if (sc == gpu.spill_seen) return;
    gpu.spill_seen = sc; /* spills during the checks are seen by the next one */
    for (int s = 0; s < gpu.n_slots; s++) check_slot_locked(s);
}

bool decode_gpu_moved(int slot, cm_err *err)
{
    if (slot < 0 || slot >= gpu.n_slots || !gpu.bound || !gpu.bound[slot].moved) return false;
    pthread_mutex_lock(&gpu.st_mu);
    gpu.st.kv_moved++; /* once: the caller fails the sequence, which frees the slot */
    pthread_mutex_unlock(&gpu.st_mu);
    cm_err_set(err, -EAGAIN,
               "a K/V block of this sequence was moved to the store's spill tier while the GPU "
               "read it in place (the segment's RAM pool is too small for the sequences it "
               "serves); the tokens after it are void — retry, or give the store more RAM");
    return true;
}

int decode_gpu_decode(int n, const int *slots, const int32_t *toks, cm_err *err)
{
    pthread_mutex_lock(&gpu.mu);
    int rc = cuda_decode_batch(gpu.ctx, n, slots, toks, gpu.logits, err);
    if (rc == 0) check_moved_locked(); /* after the step: before its tokens are used */
    uint64_t now = cm_time_ns();
    if (rc == 0 && now - gpu.t_snap > UINT64_C(200000000)) {
        gpu.t_snap = now;
        stats_snapshot_locked();
    }
    pthread_mutex_unlock(&gpu.mu);
    pthread_mutex_lock(&gpu.st_mu);
    if (rc == 0)
        gpu.st.tokens_decoded += (uint64_t)n;
    else
        gpu.st.failures++;
    pthread_mutex_unlock(&gpu.st_mu);
    return rc;
}

const float *decode_gpu_logits(int row)
{
    return gpu.logits + (size_t)row * (size_t)decode_g.model->hp.n_vocab;
}

void decode_gpu_get_stats(decode_gpu_stats *out)
{
    pthread_mutex_lock(&gpu.st_mu);
    *out = gpu.st;
    pthread_mutex_unlock(&gpu.st_mu);
}

#else /* no CUDA in this build */

static int no_cuda(cm_err *err)
{
    return cm_err_set(err, -EOPNOTSUPP,
                      "--device cuda: this ihip-decode-worker was built without CUDA "
                      "(configure with -DIHIP_CUDA=ON on a machine with nvcc)");
}

int decode_gpu_init(cm_err *err)
{
    return no_cuda(err);
}

void decode_gpu_free(void) {}

int decode_gpu_bind(const kvstore_lease *lease, int64_t n_tokens, int *slot, cm_err *err)
{
    (void)lease;
    (void)n_tokens;
    *slot = -1;
    return no_cuda(err);
}

void decode_gpu_release(int slot)
{
    (void)slot;
}

bool decode_gpu_moved(int slot, cm_err *err)
{
    (void)slot;
    (void)err;
    return false;
}

int decode_gpu_decode(int n, const int *slots, const int32_t *toks, cm_err *err)
{
    (void)n;
    (void)slots;
    (void)toks;
    return no_cuda(err);
}

const float *decode_gpu_logits(int row)
{
    (void)row;
    return NULL;
}

void decode_gpu_get_stats(decode_gpu_stats *out)
{
    memset(out, 0, sizeof(*out));
}

#endif
