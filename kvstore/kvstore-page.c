/*
 * kvstore-page.c — the paging API: "copy these blocks of this leased sequence into these
 * CPU buffers", asynchronously, with completion.
 *
 * A pager is one worker thread with its own I/O ring and a FIFO of caller-owned batches.
 * For each batch the worker copies RAM-tier blocks directly (memcpy, validated by the
 * block's location word, see kvstore-impl.h) and gathers the spill-tier ones into one I/O
 * submission (io_uring: up to io_queue_depth reads in flight), then validates those the same
 * way; a block that moved during its copy is copied again on the synchronous path. Then the
 * batch's callback runs (on the worker thread) and waiters wake.
 *
 * The CUDA destination is in kvstore-cuda.c.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { BATCH_QUEUED = 1, BATCH_DONE = 2 };

struct kvstore_pager {
    kvstore *kv;
    kvs_io *io;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    kvstore_batch *head, *tail; /* FIFO, under mu */
    bool quit;
    /* scratch for one chunk of spill reads (worker thread only) */
    uint32_t cap;
    kvs_io_op *ops;
    uint32_t *idx, *blk;
    uint64_t *wsnap;
};

static void run_batch(kvstore_pager *pg, kvstore_batch *b)
{
    kvstore *kv = pg->kv;
    b->status = 0;
    const uint64_t bpb = kv->L.geom.bytes_per_block;
    uint32_t i = 0;
    while (i < b->n_copies) {
        /* one chunk: RAM blocks copied as they come, spill blocks queued (up to cap) */
        uint32_t n = 0;
        for (; i < b->n_copies && n < pg->cap; i++) {
            kvstore_copy *c = &b->copies[i];
            uint32_t blk;
            cm_err e = {0};
            int rc = kvs_block_resolve(kv, &b->lease, c->tb, c->layer, &blk, &e);
            if (rc) {
                c->status = rc;
                continue;
            }
            uint64_t w = atomic_load_explicit(&kv->blocks[blk].locw, memory_order_acquire);
            if (kvs_locw_tier(w) == KVS_TIER_SPILL && kvs_locw_slot(w) < kv->L.n_spill &&
                kv->spill_fd >= 0) {
                pg->ops[n] = (kvs_io_op){
                    .fd = (kv->spill_fd_direct >= 0 && (uintptr_t)c->dst % KVS_PAGE == 0 &&
                           bpb % KVS_PAGE == 0)
                              ? kv->spill_fd_direct
                              : kv->spill_fd,
                    .write = false,
                    .buf = c->dst,
                    .len = bpb,
                    .off = (uint64_t)kvs_locw_slot(w) * kv->L.spill_stride,
                    .buf_index = -1,
                };
                pg->idx[n] = i;
                pg->blk[n] = blk;
                pg->wsnap[n] = w;
                n++;
            } else {
                c->status = kvs_block_copy(kv, pg->io, &b->lease, c->tb, c->layer, c->dst, &e);
            }
        }
        if (n) {
            kvs_io_run(pg->io, pg->ops, n);
            atomic_thread_fence(memory_order_acquire);
            for (uint32_t j = 0; j < n; j++) {
                kvstore_copy *c = &b->copies[pg->idx[j]];
                uint64_t w2 =
                    atomic_load_explicit(&kv->blocks[pg->blk[j]].locw, memory_order_relaxed);
                cm_err e = {0};
                if (pg->ops[j].result == 0 && w2 == pg->wsnap[j]) {
                    atomic_fetch_add_explicit(&kv->hdr->mut.n_spill_in, 1, memory_order_relaxed);
                    atomic_store_explicit(&kv->blocks[pg->blk[j]].last_use, kvs_now_ns(),
                                          memory_order_relaxed);
                    c->status = 0;
                } else {
                    c->status = kvs_block_copy(kv, pg->io, &b->lease, c->tb, c->layer, c->dst, &e);
                }
            }
            /* a lease reaped during the batch makes every copy suspect */
            cm_err e = {0};
            uint32_t blk;
            if (kvs_block_resolve(kv, &b->lease, 0, 0, &blk, &e) == -KVSTORE_ESTALE)
                for (uint32_t j = 0; j < n; j++) b->copies[pg->idx[j]].status = -KVSTORE_ESTALE;
        }
    }
    for (uint32_t k = 0; k < b->n_copies; k++)
        if (b->copies[k].status && !b->status) b->status = b->copies[k].status;
}

static void *pager_main(void *arg)
{
    kvstore_pager *pg = arg;
    pthread_mutex_lock(&pg->mu);
    for (;;) {
        while (!pg->head && !pg->quit) pthread_cond_wait(&pg->work_cv, &pg->mu);
        if (!pg->head) break; /* quit with an empty queue */
        kvstore_batch *b = pg->head;
        pg->head = b->next_;
        if (!pg->head) pg->tail = NULL;
        pthread_mutex_unlock(&pg->mu);
        run_batch(pg, b);
        if (b->done) b->done(b, b->user);
        pthread_mutex_lock(&pg->mu);
        b->state_ = BATCH_DONE;
        pthread_cond_broadcast(&pg->done_cv);
    }
    pthread_mutex_unlock(&pg->mu);
    return NULL;
}

int kvstore_pager_init(kvstore *kv, kvstore_pager **out, cm_err *err)
{
    *out = NULL;
    kvstore_pager *pg = calloc(1, sizeof(*pg));
    if (!pg) return cm_err_set(err, -ENOMEM, "kvstore pager: out of memory");
    pg->kv = kv;
    pg->cap = kv->p.io_queue_depth ? kv->p.io_queue_depth : 64;
    pg->ops = calloc(pg->cap, sizeof(*pg->ops));
    pg->idx = calloc(pg->cap, sizeof(*pg->idx));
    pg->blk = calloc(pg->cap, sizeof(*pg->blk));
    pg->wsnap = calloc(pg->cap, sizeof(*pg->wsnap));
    int rc = 0;
    if (!pg->ops || !pg->idx || !pg->blk || !pg->wsnap) {
        rc = cm_err_set(err, -ENOMEM, "kvstore pager: out of memory");
        goto fail;
    }
    if ((rc = kvs_io_init(kv->p.io_backend, pg->cap, &pg->io, err))) goto fail;
    pthread_mutex_init(&pg->mu, NULL);
    pthread_cond_init(&pg->work_cv, NULL);
    pthread_cond_init(&pg->done_cv, NULL);
    if ((rc = pthread_create(&pg->thread, NULL, pager_main, pg)) != 0) {
        rc = cm_err_set(err, -rc, "kvstore pager: thread: %s", strerror(rc));
        pthread_mutex_destroy(&pg->mu);
        pthread_cond_destroy(&pg->work_cv);
        pthread_cond_destroy(&pg->done_cv);
        goto fail;
    }
    CM_LOG_DEBUG("kvstore %s: pager with %s I/O", kv->name, kvs_io_name(pg->io));
    *out = pg;
    return 0;
fail:
    kvs_io_free(pg->io);
    free(pg->ops);
    free(pg->idx);
    free(pg->blk);
    free(pg->wsnap);
    free(pg);
    return rc;
}

void kvstore_pager_free(kvstore_pager *pg)
{
    if (!pg) return;
    pthread_mutex_lock(&pg->mu);
    pg->quit = true;
    pthread_cond_signal(&pg->work_cv);
    pthread_mutex_unlock(&pg->mu);
    pthread_join(pg->thread, NULL);
    pthread_mutex_destroy(&pg->mu);
    pthread_cond_destroy(&pg->work_cv);
    pthread_cond_destroy(&pg->done_cv);
    kvs_io_free(pg->io);
    free(pg->ops);
    free(pg->idx);
    free(pg->blk);
    free(pg->wsnap);
    free(pg);
}

int kvstore_pager_submit(kvstore_pager *pg, kvstore_batch *b)
{
    if (!b || (b->n_copies && !b->copies)) return -EINVAL;
    for (uint32_t i = 0; i < b->n_copies; i++) b->copies[i].status = -EINPROGRESS;
    b->status = -EINPROGRESS;
    b->next_ = NULL;
    pthread_mutex_lock(&pg->mu);
    if (pg->quit) {
        pthread_mutex_unlock(&pg->mu);
        return -ESHUTDOWN;
    }
    b->state_ = BATCH_QUEUED;
    if (pg->tail)
        pg->tail->next_ = b;
    else
        pg->head = b;
    pg->tail = b;
    pthread_cond_signal(&pg->work_cv);
    pthread_mutex_unlock(&pg->mu);
    return 0;
}

int kvstore_pager_wait(kvstore_pager *pg, kvstore_batch *b, int timeout_ms)
{
    struct timespec ts;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t add = (uint64_t)timeout_ms * 1000000u + (uint64_t)ts.tv_nsec;
        ts.tv_sec += (time_t)(add / 1000000000u);
        ts.tv_nsec = (long)(add % 1000000000u);
    }
    pthread_mutex_lock(&pg->mu);
    while (b->state_ != BATCH_DONE) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&pg->done_cv, &pg->mu);
        } else if (pthread_cond_timedwait(&pg->done_cv, &pg->mu, &ts) == ETIMEDOUT &&
                   b->state_ != BATCH_DONE) {
            pthread_mutex_unlock(&pg->mu);
            return -ETIMEDOUT;
        }
    }
    pthread_mutex_unlock(&pg->mu);
    return b->status;
}
