/*
 * kvstore-cuda.c — the CUDA paging destination: copy blocks of a leased sequence into GPU
 * memory on a caller's stream. Plain C against the CUDA runtime API; compiled only with
 * IHIP_HAVE_CUDA (kvstore/CMakeLists.txt adds it when the CUDA backend is on).
 *
 * RAM tier: the segment's block pool is registered once with cudaHostRegister (portable),
 * so cudaMemcpyAsync reads it directly with the copy engine; no staging, no CPU copy.
 * Spill tier: blocks are read with the I/O shim (io_uring with the staging buffers
 * registered as fixed buffers; O_DIRECT when the file system allows it, which the page-
 * aligned pinned buffers satisfy) into pinned staging slots, then copied asynchronously. A
 * staging slot is reused only after the stream has drained the copies out of it.
 *
 * Validation follows the seqlock rule of kvstore-impl.h: each copy remembers the block's
 * location word from before the copy was issued; after the stream has completed
 * (kvstore_cuda_wait), a copy whose block location word is unchanged read stable data;
 * one that changed (the block spilled or was freed meanwhile) is redone synchronously
 * through staging with the CPU path (kvs_block_copy).
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-impl.h"

#ifdef IHIP_HAVE_CUDA

#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct pending {
    uint32_t copy;  /* index into the caller's copies */
    uint32_t block; /* block id the copy read */
    uint64_t w;     /* its location word before the copy */
};

struct kvstore_cuda {
    kvstore *kv;
    bool registered;
    uint8_t *pool_dev; /* the registered pool's device address */
    uint8_t *staging;  /* n_staging × staging_stride pinned bytes */
    uint64_t staging_stride;
    uint32_t n_staging;
    kvs_io *io;
    kvs_io_op *ops;
    struct pending *spill_pend; /* n_staging entries: blocks read into staging */
    /* the batch being paged (between kvstore_cuda_page and kvstore_cuda_wait) */
    const kvstore_lease *lease;
    kvstore_copy *copies;
    uint32_t n_copies;
    cudaStream_t stream;
    cudaEvent_t done;
    struct pending *pend; /* one per copy issued */
    uint32_t n_pend, cap_pend;
};

static int cuda_fail(cm_err *err, cudaError_t e, const char *what)
{
    return cm_err_set(err, -EIO, "kvstore cuda: %s: %s", what, cudaGetErrorString(e));
}

int kvstore_cuda_init(kvstore *kv, uint32_t n_staging, kvstore_cuda **out, cm_err *err)
{
    *out = NULL;
    if (n_staging == 0) n_staging = 1;
    kvstore_cuda *c = calloc(1, sizeof(*c));
    if (!c) return cm_err_set(err, -ENOMEM, "kvstore cuda: out of memory");
    c->kv = kv;
    c->n_staging = n_staging;
    c->staging_stride = kv->L.spill_stride; /* page-aligned: O_DIRECT reads land here */
    int rc = 0;
    cudaError_t e = cudaHostRegister(kv->pool, (size_t)kv->L.n_ram * kv->L.slot_stride,
                                     cudaHostRegisterPortable);
    if (e != cudaSuccess) {
        rc = cuda_fail(err, e, "cudaHostRegister of the segment pool");
        goto fail;
    }
    c->registered = true;
    e = cudaHostGetDevicePointer((void **)&c->pool_dev, kv->pool, 0);
    if (e != cudaSuccess) {
        rc = cuda_fail(err, e, "cudaHostGetDevicePointer of the segment pool");
        goto fail;
    }
    e = cudaHostAlloc((void **)&c->staging, (size_t)n_staging * c->staging_stride,
                      cudaHostAllocPortable);
    if (e != cudaSuccess) {
        c->staging = NULL;
        rc = cuda_fail(err, e, "cudaHostAlloc of staging");
        goto fail;
    }
    e = cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        rc = cuda_fail(err, e, "cudaEventCreate");
        goto fail;
    }
    c->ops = calloc(n_staging, sizeof(*c->ops));
    c->spill_pend = calloc(n_staging, sizeof(*c->spill_pend));
    if (!c->ops || !c->spill_pend) {
        rc = cm_err_set(err, -ENOMEM, "kvstore cuda: out of memory");
        goto fail;
    }
    if (kv->L.n_spill) {
        if ((rc = kvs_io_init(kv->p.io_backend, n_staging, &c->io, err))) goto fail;
        /* fixed buffers save pinning pages per read; failure only costs that */
        void **bufs = calloc(n_staging, sizeof(void *));
        size_t *lens = calloc(n_staging, sizeof(size_t));
        if (bufs && lens) {
            for (uint32_t i = 0; i < n_staging; i++) {
                bufs[i] = c->staging + (size_t)i * c->staging_stride;
                lens[i] = c->staging_stride;
            }
            if (kvs_io_register(c->io, bufs, lens, n_staging) != 0)
                CM_LOG_DEBUG("kvstore cuda: staging buffers not registered with io_uring");
        }
        free(bufs);
        free(lens);
    }
    *out = c;
    return 0;
fail:
    kvstore_cuda_free(c);
    return rc;
}

int kvstore_cuda_block_addr(kvstore_cuda *c, const kvstore_lease *lease, uint32_t tb,
                            uint32_t layer, uint64_t *dev_addr, cm_err *err)
{
    kvstore *kv = c->kv;
    uint32_t b = 0;
    int rc = kvs_block_resolve(kv, lease, tb, layer, &b, err);
    if (rc) return rc;
    uint64_t w = atomic_load_explicit(&kv->blocks[b].locw, memory_order_acquire);
    uint32_t tier = kvs_locw_tier(w), slot = kvs_locw_slot(w);
    if (tier != KVS_TIER_RAM || slot >= kv->L.n_ram)
        return cm_err_set(err, -KVSTORE_ESTATE,
                          "kvstore cuda: block (token block %u, layer %u) is not in the RAM tier",
                          tb, layer);
    *dev_addr = (uint64_t)(uintptr_t)(c->pool_dev + (uint64_t)slot * kv->L.slot_stride);
    return 0;
}

int kvstore_cuda_seq_addrs(kvstore_cuda *c, const kvstore_lease *lease, uint32_t n_tb,
                           uint64_t *addr, uint64_t max_stage_bytes, void **staging,
                           uint32_t *n_staged, cm_err *err)
{
    *staging = NULL;
    *n_staged = 0;
    kvstore *kv = c->kv;
    const uint32_t n_layer = kv->L.geom.n_layers;
    const uint64_t bpb = kv->L.geom.bytes_per_block, n = (uint64_t)n_layer * n_tb;
    uint64_t n_spilled = 0;
    for (uint32_t l = 0; l < n_layer; l++)
        for (uint32_t tb = 0; tb < n_tb; tb++) {
            uint64_t a = 0;
            cm_err be = {0};
            int rc = kvstore_cuda_block_addr(c, lease, tb, l, &a, &be);
            if (rc == -KVSTORE_ESTATE) {
                n_spilled++;
                a = 0;
            } else if (rc < 0) {
                return cm_err_set(err, rc, "%s", be.msg);
            }
            addr[(uint64_t)l * n_tb + tb] = a;
        }
    if (!n_spilled) return 0;
    const uint64_t bytes = n_spilled * bpb;
    if (bytes > max_stage_bytes)
        return cm_err_set(err, -ENOSPC,
                          "%llu of the sequence's K/V blocks are in the spill tier (%.1f MiB); "
                          "staging allows %.1f MiB",
                          (unsigned long long)n_spilled, (double)bytes / 1048576.0,
                          (double)max_stage_bytes / 1048576.0);
    uint8_t *buf = NULL;
    cudaError_t e = cudaHostAlloc((void **)&buf, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return cm_err_set(err, -ENOSPC, "pinned staging of %.1f MiB for spilled blocks: %s",
                          (double)bytes / 1048576.0, cudaGetErrorString(e));
    }
    void *dbuf = NULL;
    e = cudaHostGetDevicePointer(&dbuf, buf, 0);
    kvstore_copy *cp = calloc(n_spilled, sizeof(*cp));
    int rc = e == cudaSuccess && cp ? 0
                                    : cm_err_set(err, -ENOMEM, "staging spilled blocks: %s",
                                                 cudaGetErrorString(e));
    uint64_t k = 0;
    for (uint64_t i = 0; i < n && rc == 0; i++) {
        if (addr[i]) continue;
        cp[k].tb = (uint32_t)(i % n_tb);
        cp[k].layer = (uint32_t)(i / n_tb);
        cp[k].dst = buf + k * bpb;
        addr[i] = (uint64_t)(uintptr_t)dbuf + k * bpb;
        k++;
    }
    kvstore_pager *pg = NULL;
    cm_err pe = {0};
    if (rc == 0 && (rc = kvstore_pager_init(kv, &pg, &pe)) < 0)
        cm_err_set(err, rc, "spill staging: %s", pe.msg);
    /* in batches of at most 2^20 copies (kvstore_batch counts in 32 bits) */
    for (uint64_t i = 0; i < k && rc == 0; i += 1u << 20) {
        kvstore_batch b;
        memset(&b, 0, sizeof(b));
        b.lease = *lease;
        b.copies = cp + i;
        b.n_copies = (uint32_t)(k - i < (1u << 20) ? k - i : (1u << 20));
        rc = kvstore_pager_submit(pg, &b);
        if (rc == 0) rc = kvstore_pager_wait(pg, &b, -1);
        if (rc < 0)
            cm_err_set(err, rc, "reading %llu spilled K/V blocks back: %s",
                       (unsigned long long)k, kvstore_strerror(rc));
    }
    kvstore_pager_free(pg);
    free(cp);
    if (rc < 0) {
        cudaFreeHost(buf);
        return rc;
    }
    *staging = buf;
    *n_staged = (uint32_t)k;
    return 0;
}

void kvstore_cuda_staging_free(void *staging)
{
    if (staging) cudaFreeHost(staging);
}

int kvstore_cuda_seq_check(kvstore_cuda *c, const kvstore_lease *lease, uint32_t n_tb,
                           const uint64_t *addr, void *staging, uint32_t n_staged,
                           cm_err *err)
{
    kvstore *kv = c->kv;
    const uint32_t n_layer = kv->L.geom.n_layers;
    uint64_t s0 = 0, s1 = 0;
    if (staging && n_staged) {
        void *d = NULL;
        if (cudaHostGetDevicePointer(&d, staging, 0) != cudaSuccess) {
            cudaGetLastError();
            return cm_err_set(err, -EINVAL, "kvstore cuda: staging is not GPU-mapped memory");
        }
        s0 = (uint64_t)(uintptr_t)d;
        s1 = s0 + (uint64_t)n_staged * kv->L.geom.bytes_per_block;
    }
    for (uint32_t l = 0; l < n_layer; l++)
        for (uint32_t tb = 0; tb < n_tb; tb++) {
            const uint64_t a = addr[(uint64_t)l * n_tb + tb];
            if (a >= s0 && a < s1) continue; /* a staged copy */
            uint64_t now = 0;
            cm_err be = {0};
            int rc = kvstore_cuda_block_addr(c, lease, tb, l, &now, &be);
            if (rc == -KVSTORE_ESTATE || (rc == 0 && now != a))
                return cm_err_set(err, -EAGAIN,
                                  "K/V block (token block %u, layer %u) was moved to the spill "
                                  "tier while it was read in place (the store's RAM pool is too "
                                  "small for the sequences it serves)",
                                  tb, l);
            if (rc < 0) return cm_err_set(err, rc, "%s", be.msg);
        }
    return 0;
}

void kvstore_cuda_free(kvstore_cuda *c)
{
    if (!c) return;
    if (c->n_copies) kvstore_cuda_wait(c, NULL);
    if (c->done) cudaEventDestroy(c->done);
    if (c->staging) cudaFreeHost(c->staging);
    if (c->registered) cudaHostUnregister(c->kv->pool);
    kvs_io_free(c->io);
    free(c->ops);
    free(c->spill_pend);
    free(c->pend);
    free(c);
}

/* Read the queued spill blocks into staging, validate the reads, queue their H2D copies,
 * then let the stream drain so the staging slots can be reused. */
static int flush_spill(kvstore_cuda *c, uint32_t n)
{
    if (!n) return 0;
    kvstore *kv = c->kv;
    kvs_io_run(c->io, c->ops, n);
    atomic_thread_fence(memory_order_acquire);
    for (uint32_t i = 0; i < n; i++) {
        struct pending *p = &c->spill_pend[i];
        kvstore_copy *cp = &c->copies[p->copy];
        uint64_t w2 = atomic_load_explicit(&kv->blocks[p->block].locw, memory_order_relaxed);
        uint8_t *stage = c->staging + (size_t)i * c->staging_stride;
        if (c->ops[i].result != 0 || w2 != p->w) {
            cm_err e = {0};
            cp->status = kvs_block_copy(kv, c->io, c->lease, cp->tb, cp->layer, stage, &e);
            if (cp->status) continue;
        }
        cudaError_t ce = cudaMemcpyAsync(cp->dst, stage, kv->L.geom.bytes_per_block,
                                         cudaMemcpyHostToDevice, c->stream);
        cp->status = ce == cudaSuccess ? 0 : -EIO;
    }
    /* staging is reused by the next chunk: wait until the stream has read it */
    return cudaStreamSynchronize(c->stream) == cudaSuccess ? 0 : -EIO;
}

int kvstore_cuda_page(kvstore_cuda *c, const kvstore_lease *lease, kvstore_copy *copies,
                      uint32_t n, void *stream, cm_err *err)
{
    kvstore *kv = c->kv;
    if (c->n_copies)
        return cm_err_set(err, -EBUSY, "kvstore cuda: previous batch not waited for");
    if (n > c->cap_pend) {
        struct pending *np = realloc(c->pend, n * sizeof(*np));
        if (!np) return cm_err_set(err, -ENOMEM, "kvstore cuda: out of memory");
        c->pend = np;
        c->cap_pend = n;
    }
    c->lease = lease;
    c->copies = copies;
    c->n_copies = n;
    c->stream = (cudaStream_t)stream;
    c->n_pend = 0;
    const uint64_t bpb = kv->L.geom.bytes_per_block;
    uint32_t n_spill = 0;
    int rc = 0;
    for (uint32_t i = 0; i < n; i++) {
        kvstore_copy *cp = &copies[i];
        uint32_t b;
        cm_err e = {0};
        cp->status = kvs_block_resolve(kv, lease, cp->tb, cp->layer, &b, &e);
        if (cp->status) continue;
        uint64_t w = atomic_load_explicit(&kv->blocks[b].locw, memory_order_acquire);
        uint32_t tier = kvs_locw_tier(w), slot = kvs_locw_slot(w);
        if (tier == KVS_TIER_RAM && slot < kv->L.n_ram) {
            cudaError_t ce = cudaMemcpyAsync(cp->dst, kv->pool + (uint64_t)slot * kv->L.slot_stride,
                                             bpb, cudaMemcpyHostToDevice, c->stream);
            if (ce != cudaSuccess) {
                cp->status = -EIO;
                if (!rc) rc = cuda_fail(err, ce, "cudaMemcpyAsync");
                continue;
            }
            c->pend[c->n_pend++] = (struct pending){i, b, w};
            cp->status = -EINPROGRESS;
        } else if (tier == KVS_TIER_SPILL && slot < kv->L.n_spill && c->io) {
            uint8_t *stage = c->staging + (size_t)n_spill * c->staging_stride;
            c->ops[n_spill] = (kvs_io_op){
                .fd = kv->spill_fd_direct >= 0 && bpb % KVS_PAGE == 0 ? kv->spill_fd_direct
                                                                      : kv->spill_fd,
                .write = false,
                .buf = stage,
                .len = bpb,
                .off = (uint64_t)slot * kv->L.spill_stride,
                .buf_index = (int)n_spill,
            };
            c->spill_pend[n_spill++] = (struct pending){i, b, w};
            cp->status = -EINPROGRESS;
            if (n_spill == c->n_staging) {
                if (flush_spill(c, n_spill) && !rc)
                    rc = cm_err_set(err, -EIO, "kvstore cuda: stream failed");
                n_spill = 0;
            }
        } else {
            /* moving or freed right now: the synchronous path sorts it out */
            uint8_t *stage = c->staging;
            if (n_spill) { /* staging slot 0 is busy: drain first */
                flush_spill(c, n_spill);
                n_spill = 0;
            }
            cp->status = kvs_block_copy(kv, c->io, lease, cp->tb, cp->layer, stage, &e);
            if (!cp->status &&
                cudaMemcpy(cp->dst, stage, bpb, cudaMemcpyHostToDevice) != cudaSuccess)
                cp->status = -EIO;
        }
    }
    if (flush_spill(c, n_spill) && !rc) rc = cm_err_set(err, -EIO, "kvstore cuda: stream failed");
    cudaError_t ce = cudaEventRecord(c->done, c->stream);
    if (ce != cudaSuccess && !rc) rc = cuda_fail(err, ce, "cudaEventRecord");
    return rc;
}

int kvstore_cuda_wait(kvstore_cuda *c, cm_err *err)
{
    kvstore *kv = c->kv;
    int rc = 0;
    cudaError_t ce = cudaEventSynchronize(c->done);
    if (ce != cudaSuccess) rc = cuda_fail(err, ce, "cudaEventSynchronize");
    atomic_thread_fence(memory_order_acquire);
    const uint64_t bpb = kv->L.geom.bytes_per_block;
    for (uint32_t i = 0; i < c->n_pend; i++) {
        struct pending *p = &c->pend[i];
        kvstore_copy *cp = &c->copies[p->copy];
        if (ce != cudaSuccess) {
            cp->status = -EIO;
            continue;
        }
        uint64_t w2 = atomic_load_explicit(&kv->blocks[p->block].locw, memory_order_relaxed);
        if (w2 == p->w) {
            cp->status = 0;
            atomic_store_explicit(&kv->blocks[p->block].last_use, kvs_now_ns(),
                                  memory_order_relaxed);
            continue;
        }
        cm_err e = {0};
        cp->status = kvs_block_copy(kv, c->io, c->lease, cp->tb, cp->layer, c->staging, &e);
        if (!cp->status && cudaMemcpy(cp->dst, c->staging, bpb, cudaMemcpyHostToDevice) != cudaSuccess)
            cp->status = -EIO;
    }
    /* a lease reaped while the copies ran makes every copy suspect */
    uint32_t b;
    cm_err e = {0};
    if (c->n_copies && kvs_block_resolve(kv, c->lease, c->copies[0].tb, c->copies[0].layer, &b,
                                         &e) == -KVSTORE_ESTALE)
        for (uint32_t i = 0; i < c->n_copies; i++) c->copies[i].status = -KVSTORE_ESTALE;
    for (uint32_t i = 0; i < c->n_copies && !rc; i++)
        if (c->copies[i].status) rc = cm_err_set(err, c->copies[i].status,
                                                 "kvstore cuda: copy %u failed: %s", i,
                                                 kvstore_strerror(c->copies[i].status));
    c->n_copies = 0;
    c->n_pend = 0;
    return rc;
}

#endif /* IHIP_HAVE_CUDA */
