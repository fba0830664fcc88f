/*
 * kvstore-spill.c — the spill tier: cold blocks of READY sequences move from the RAM pool to
 * a spill file on local disk, and are read back from it on demand.
 *
 * Eviction runs in the process that needs room (kvstore_block_alloc finding the pool full),
 * in three steps so that no I/O happens under the segment lock:
 *   1. under the lock: choose up to spill_batch least-recently-used blocks that are sealed,
 *      resident and not already moving; reserve a spill slot for each and mark it MOVING with
 *      our owner slot. The block stays readable in RAM meanwhile (READY data is immutable).
 *   2. no lock: write the RAM slots to the spill slots (one batch through the I/O shim).
 *   3. under the lock: for each block still MOVING by us with an unchanged location, switch
 *      its location word to the spill slot (version bump: readers that copied from RAM across
 *      this point retry) and only then free the RAM slot. A block freed meanwhile had its
 *      reservation returned by the freer (it clears MOVING), so we skip it. If we die between
 *      1 and 3, gc (or rebuild) cancels our moves: the block is still in RAM, intact.
 *
 * Reads of spilled blocks go straight from the spill file into the destination (no
 * promotion back into RAM, which would need a free RAM slot exactly when RAM is short):
 * O_DIRECT when the file system allows it and the destination and block size are 4096-
 * aligned, buffered otherwise. The I/O backend (io_uring or pread) is chosen at open and
 * logged.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef O_DIRECT
#define O_DIRECT 040000 /* Linux value; glibc hides it without _GNU_SOURCE */
#endif

int kvs_spill_open(kvstore *kv, cm_err *err)
{
    const char *path = kv->L.spill_path;
    kv->spill_fd = open(path, O_RDWR);
    if (kv->spill_fd < 0)
        return cm_err_set(err, -errno, "kvstore %s: open spill file %s: %s", kv->name, path,
                          strerror(errno));
    struct stat st;
    if (fstat(kv->spill_fd, &st) != 0 ||
        (uint64_t)st.st_size < kv->L.spill_stride * kv->L.n_spill)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore %s: spill file %s is shorter than "
                          "%u blocks", kv->name, path, kv->L.n_spill);
    kv->spill_fd_direct = open(path, O_RDWR | O_DIRECT); /* tmpfs refuses: buffered only */
    int rc = kvs_io_init(kv->p.io_backend, kv->p.io_queue_depth, &kv->io, err);
    if (rc) {
        cm_err_prefix(err, "kvstore %s: spill I/O: ", kv->name);
        return rc;
    }
    CM_LOG_INFO("kvstore %s: spill tier %s (%u blocks), I/O backend %s, O_DIRECT %s", kv->name,
                path, kv->L.n_spill, kvs_io_name(kv->io), kv->spill_fd_direct >= 0 ? "on" : "off");
    return 0;
}

void kvs_spill_close(kvstore *kv)
{
    kvs_io_free(kv->io);
    kv->io = NULL;
    if (kv->spill_fd >= 0) close(kv->spill_fd);
    if (kv->spill_fd_direct >= 0) close(kv->spill_fd_direct);
    kv->spill_fd = kv->spill_fd_direct = -1;
}

static bool aligned(const void *p, uint64_t n)
{
    return ((uintptr_t)p % KVS_PAGE) == 0 && n % KVS_PAGE == 0;
}

int kvs_spill_read(kvstore *kv, kvs_io *io, uint64_t w, void *dst, cm_err *err)
{
    uint32_t slot = kvs_locw_slot(w);
    if (slot >= kv->L.n_spill || kv->spill_fd < 0)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore %s: block in spill slot %u of %u",
                          kv->name, slot, kv->L.n_spill);
    uint64_t bpb = kv->L.geom.bytes_per_block;
    kvs_io_op op = {
        .fd = (kv->spill_fd_direct >= 0 && aligned(dst, bpb)) ? kv->spill_fd_direct : kv->spill_fd,
        .write = false,
        .buf = dst,
        .len = bpb,
        .off = (uint64_t)slot * kv->L.spill_stride,
        .buf_index = -1,
    };
    int rc;
    if (io) {
        rc = kvs_io_run(io, &op, 1);
    } else {
        pthread_mutex_lock(&kv->local_mu);
        rc = kvs_io_run(kv->io, &op, 1);
        pthread_mutex_unlock(&kv->local_mu);
    }
    if (rc) return cm_err_set(err, rc, "kvstore %s: read spill slot %u: %s", kv->name, slot,
                              strerror(-rc));
    return 0;
}

struct victim {
    uint32_t block;
    uint64_t last_use;
};

/* max-heap on last_use: the root is the newest of the `want` oldest seen so far */
static void heap_sift_down(struct victim *h, uint32_t n, uint32_t i)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && h[l].last_use > h[m].last_use) m = l;
        if (r < n && h[r].last_use > h[m].last_use) m = r;
        if (m == i) return;
        struct victim t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

static void heap_sift_up(struct victim *h, uint32_t i)
{
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (h[p].last_use >= h[i].last_use) return;
        struct victim t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

int kvs_spill_evict(kvstore *kv, uint32_t want, uint32_t *moved, cm_err *err)
{
    *moved = 0;
    if (!kv->L.n_spill || !kv->io || kv->owner < 0) return 0;
    if (want == 0) want = 1;
    if (want > 1024) want = 1024;
    struct victim *h = malloc(want * sizeof(*h));
    kvs_io_op *ops = malloc(want * sizeof(*ops));
    uint64_t *wsnap = malloc(want * sizeof(*wsnap));
    uint32_t *sslot = malloc(want * sizeof(*sslot));
    int rc = 0;
    if (!h || !ops || !wsnap || !sslot) {
        rc = cm_err_set(err, -ENOMEM, "kvstore: out of memory");
        goto out;
    }
    const uint32_t me = (uint32_t)kv->owner, me_gen = kv->owner_gen;
    const uint64_t bpb = kv->L.geom.bytes_per_block;

    /* 1. choose and reserve */
    if ((rc = kvs_lock(kv, err))) goto out;
    uint32_t n = 0;
    for (uint32_t b = 0; b < kv->L.n_blocks; b++) {
        struct kvs_block *k = &kv->blocks[b];
        if (!k->ref || k->flags != KVS_BLOCK_SEALED) continue;
        uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
        if (kvs_locw_tier(w) != KVS_TIER_RAM) continue;
        struct victim v = {b, atomic_load_explicit(&k->last_use, memory_order_relaxed)};
        if (n < want) {
            h[n] = v;
            heap_sift_up(h, n++);
        } else if (v.last_use < h[0].last_use) {
            h[0] = v;
            heap_sift_down(h, n, 0);
        }
    }
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t s;
        int r = kvs_pop_locked(kv, KVS_STACK_SPILL, &s, err);
        if (r < 0) {
            rc = r;
            break;
        }
        if (r > 0) break; /* spill tier full */
        struct kvs_block *k = &kv->blocks[h[i].block];
        uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
        if (kvs_locw_slot(w) >= kv->L.n_ram) {
            kvs_push_locked(kv, KVS_STACK_SPILL, s, NULL);
            rc = cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore %s: block %u in RAM slot %u",
                            kv->name, h[i].block, kvs_locw_slot(w));
            break;
        }
        k->move_slot = s;
        k->move_owner = me;
        k->move_owner_gen = me_gen;
        k->flags |= KVS_BLOCK_MOVING;
        h[m] = h[i];
        wsnap[m] = w;
        sslot[m] = s;
        m++;
    }
    kvs_unlock(kv);
    if (m == 0) goto out;

    /* 2. write, no lock held */
    for (uint32_t i = 0; i < m; i++) {
        void *src = kv->pool + (uint64_t)kvs_locw_slot(wsnap[i]) * kv->L.slot_stride;
        ops[i] = (kvs_io_op){
            .fd = (kv->spill_fd_direct >= 0 && aligned(src, bpb)) ? kv->spill_fd_direct
                                                                 : kv->spill_fd,
            .write = true,
            .buf = src,
            .len = bpb,
            .off = (uint64_t)sslot[i] * kv->L.spill_stride,
            .buf_index = -1,
        };
    }
    pthread_mutex_lock(&kv->local_mu);
    kvs_io_run(kv->io, ops, m);
    pthread_mutex_unlock(&kv->local_mu);

    /* 3. switch locations */
    int lrc = kvs_lock(kv, err);
    if (lrc) {
        rc = lrc; /* our moves stay reserved until gc cancels them */
        goto out;
    }
    for (uint32_t i = 0; i < m; i++) {
        struct kvs_block *k = &kv->blocks[h[i].block];
        uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
        if ((k->flags & KVS_BLOCK_MOVING) && k->move_owner == me && k->move_owner_gen == me_gen &&
            k->move_slot == sslot[i] && k->ref == 0 && kvs_locw_tier(w) == KVS_TIER_NONE) {
            /* freed while we wrote it: its record and spill slot waited for our write */
            k->flags = 0;
            int r = kvs_push_locked(kv, KVS_STACK_SPILL, sslot[i], err);
            if (!r) r = kvs_push_locked(kv, KVS_STACK_BLOCKS, h[i].block, err);
            if (r) {
                rc = r;
                break;
            }
            atomic_fetch_add_explicit(&kv->hdr->mut.n_free, 1, memory_order_relaxed);
            continue;
        }
        if (!(k->flags & KVS_BLOCK_MOVING) || k->move_owner != me || k->move_owner_gen != me_gen ||
            k->move_slot != sslot[i] || w != wsnap[i])
            continue; /* freed or cancelled meanwhile; its reservation went back already */
        k->flags &= ~(uint32_t)KVS_BLOCK_MOVING;
        if (ops[i].result != 0) {
            CM_LOG_WARN("kvstore %s: spill write failed: %s", kv->name, strerror(-ops[i].result));
            kvs_push_locked(kv, KVS_STACK_SPILL, sslot[i], NULL);
            continue;
        }
        atomic_store_explicit(&k->locw,
                              kvs_locw_make(kvs_locw_version(w) + 1, KVS_TIER_SPILL, sslot[i]),
                              memory_order_release);
        int r = kvs_push_locked(kv, KVS_STACK_RAM, kvs_locw_slot(w), err);
        if (r) {
            rc = r;
            break;
        }
        (*moved)++;
        atomic_fetch_add_explicit(&kv->hdr->mut.n_spill_out, 1, memory_order_relaxed);
    }
    kvs_unlock(kv);
out:
    free(h);
    free(ops);
    free(wsnap);
    free(sslot);
    return rc;
}
