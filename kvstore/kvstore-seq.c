/*
 * kvstore-seq.c — sequences, blocks, leases, prefix lookup and validated block reads.
 *
 * Every function that changes the segment does so under the segment lock and in the write
 * order kvs_rebuild expects (kvstore-impl.h): a new sequence is marked WRITING (with its
 * owner already filled) before it gets manifest entries; a block is fully set up (ref,
 * location) before the manifest entry naming it is stored; n_tblocks grows before an entry
 * past it is stored; a lease's state is set last and cleared first; a sequence is marked
 * FREEING before its blocks are released. A process killed between any two stores leaves a
 * state that rebuild completes or undoes.
 *
 * Block reads take no lock: see kvs_block_copy and the seqlock note in kvstore-impl.h.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define CORRUPT(...) cm_err_set(err, -KVSTORE_ECORRUPT, __VA_ARGS__)

/* ---- free stacks ----------------------------------------------------------------------------- */

static void stack_of(kvstore *kv, int which, uint32_t **stack, uint32_t **top, uint32_t *cap)
{
    switch (which) {
    case KVS_STACK_BLOCKS:
        *stack = kv->free_blocks, *top = &kv->hdr->mut.free_blocks_top, *cap = kv->L.n_blocks;
        break;
    case KVS_STACK_RAM:
        *stack = kv->free_ram, *top = &kv->hdr->mut.free_ram_top, *cap = kv->L.n_ram;
        break;
    default:
        *stack = kv->free_spill, *top = &kv->hdr->mut.free_spill_top, *cap = kv->L.n_spill;
        break;
    }
}

static const char *stack_name[3] = {"block", "RAM slot", "spill slot"};

int kvs_push_locked(kvstore *kv, int which, uint32_t v, cm_err *err)
{
    uint32_t *stack, *top, cap;
    stack_of(kv, which, &stack, &top, &cap);
    uint32_t t = *top;
    if (t >= cap || v >= cap)
        return CORRUPT("kvstore %s: free %s stack top %u (cap %u) cannot take %u", kv->name,
                       stack_name[which], t, cap, v);
    stack[t] = v;
    *top = t + 1;
    return 0;
}

int kvs_pop_locked(kvstore *kv, int which, uint32_t *v, cm_err *err)
{
    uint32_t *stack, *top, cap;
    stack_of(kv, which, &stack, &top, &cap);
    uint32_t t = *top;
    if (t > cap)
        return CORRUPT("kvstore %s: free %s stack top %u exceeds %u", kv->name,
                       stack_name[which], t, cap);
    if (t == 0) return 1;
    uint32_t x = stack[t - 1];
    if (x >= cap)
        return CORRUPT("kvstore %s: free %s stack holds %u, limit %u", kv->name,
                       stack_name[which], x, cap);
    *top = t - 1;
    *v = x;
    return 0;
}

static uint32_t stack_top(kvstore *kv, int which)
{
    uint32_t *stack, *top, cap;
    stack_of(kv, which, &stack, &top, &cap);
    return *top <= cap ? *top : 0;
}

/* ---- blocks ------------------------------------------------------------------------------------ */

/* Give block b's slots back and put it on the free stack (its last reference is gone). */
static int block_release_locked(kvstore *kv, uint32_t b, cm_err *err)
{
    struct kvs_block *k = &kv->blocks[b];
    uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
    uint32_t tier = kvs_locw_tier(w), slot = kvs_locw_slot(w);
    int rc = 0;
    if (k->flags & KVS_BLOCK_MOVING) {
        /* A mover is writing this block to spill slot move_slot without the lock. Neither that
         * slot nor the block record may be reused before its write has landed, or the late
         * write would overwrite another block's data: give back the RAM slot only, and leave
         * the block MOVING with no location ("orphaned"); the mover (or gc, when the mover
         * died) frees the record and the spill slot. */
        if (k->move_slot >= kv->L.n_spill)
            return CORRUPT("kvstore %s: block %u move slot %u", kv->name, b, k->move_slot);
        atomic_store_explicit(&k->locw, kvs_locw_make(kvs_locw_version(w) + 1, KVS_TIER_NONE, 0),
                              memory_order_release);
        k->hash = 0;
        if (tier != KVS_TIER_RAM || slot >= kv->L.n_ram)
            return CORRUPT("kvstore %s: moving block %u is not in RAM", kv->name, b);
        return kvs_push_locked(kv, KVS_STACK_RAM, slot, err);
    }
    k->flags = 0;
    /* bump the version before the slot can be reused: a concurrent reader notices */
    atomic_store_explicit(&k->locw, kvs_locw_make(kvs_locw_version(w) + 1, KVS_TIER_NONE, 0),
                          memory_order_release);
    if (tier == KVS_TIER_RAM) {
        if (slot >= kv->L.n_ram) return CORRUPT("kvstore %s: block %u in RAM slot %u", kv->name, b, slot);
        rc = kvs_push_locked(kv, KVS_STACK_RAM, slot, err);
    } else if (tier == KVS_TIER_SPILL) {
        if (slot >= kv->L.n_spill)
            return CORRUPT("kvstore %s: block %u in spill slot %u", kv->name, b, slot);
        rc = kvs_push_locked(kv, KVS_STACK_SPILL, slot, err);
    } else {
        return CORRUPT("kvstore %s: referenced block %u holds no slot", kv->name, b);
    }
    if (rc) return rc;
    k->hash = 0;
    atomic_fetch_add_explicit(&kv->hdr->mut.n_free, 1, memory_order_relaxed);
    return kvs_push_locked(kv, KVS_STACK_BLOCKS, b, err);
}

static int block_unref_locked(kvstore *kv, uint32_t b, cm_err *err)
{
    struct kvs_block *k = &kv->blocks[b];
    if (k->ref == 0)
        return CORRUPT("kvstore %s: block %u released more often than referenced", kv->name, b);
    if (--k->ref) return 0;
    return block_release_locked(kv, b, err);
}

/* ---- sequences ------------------------------------------------------------------------------- */

int kvs_seq_free_locked(kvstore *kv, uint32_t s, cm_err *err)
{
    struct kvs_seq *q = &kv->seqs[s];
    const uint32_t nl = kv->L.geom.n_layers;
    if (q->n_tblocks > kv->max_tblocks)
        return CORRUPT("kvstore %s: sequence %u has %u token blocks, max %u", kv->name, s,
                       q->n_tblocks, kv->max_tblocks);
    atomic_store_explicit(&q->state, KVSTORE_SEQ_FREEING, memory_order_relaxed);
    _Atomic uint32_t *row = kvs_row(kv, s);
    for (uint64_t i = 0; i < (uint64_t)q->n_tblocks * nl; i++) {
        uint32_t e = kvs_ld32(&row[i]);
        if (!e) continue;
        if (e > kv->L.n_blocks)
            return CORRUPT("kvstore %s: sequence %u entry %llu names block %u", kv->name, s,
                           (unsigned long long)i, e - 1);
        int rc = block_unref_locked(kv, e - 1, err);
        if (rc) return rc;
        kvs_st32(&row[i], 0);
    }
    q->n_tblocks = 0;
    q->n_tokens = 0;
    q->n_leases = 0;
    q->n_prefix_tblocks = 0;
    atomic_store_explicit(&q->state, KVSTORE_SEQ_FREE, memory_order_release);
    return 0;
}

/* The sequence `ref` names, in state `want` (0 = any non-free). */
static int seq_get_locked(kvstore *kv, kvstore_seq_ref ref, uint32_t want, struct kvs_seq **out,
                          cm_err *err)
{
    if (ref.id >= kv->L.max_seqs)
        return cm_err_set(err, -EINVAL, "kvstore %s: no sequence id %u (max %u)", kv->name,
                          ref.id, kv->L.max_seqs);
    struct kvs_seq *q = &kv->seqs[ref.id];
    uint32_t st = atomic_load_explicit(&q->state, memory_order_relaxed);
    if (q->gen != ref.gen || st == KVSTORE_SEQ_FREE || st == KVSTORE_SEQ_FREEING)
        return cm_err_set(err, -KVSTORE_ESTALE, "kvstore %s: sequence %u/%u no longer exists",
                          kv->name, ref.id, ref.gen);
    if (st > KVSTORE_SEQ_FREEING)
        return CORRUPT("kvstore %s: sequence %u has state %u", kv->name, ref.id, st);
    if (q->n_tblocks > kv->max_tblocks)
        return CORRUPT("kvstore %s: sequence %u has %u token blocks, max %u", kv->name, ref.id,
                       q->n_tblocks, kv->max_tblocks);
    if (want && st != want)
        return cm_err_set(err, -KVSTORE_ESTATE, "kvstore %s: sequence %u is %s, not %s",
                          kv->name, ref.id, kvstore_seq_state_name(st),
                          kvstore_seq_state_name(want));
    *out = q;
    return 0;
}

static int seq_mine_locked(kvstore *kv, const struct kvs_seq *q, kvstore_seq_ref ref, cm_err *err)
{
    if (kv->owner < 0 || q->owner != (uint32_t)kv->owner || q->owner_gen != kv->owner_gen)
        return cm_err_set(err, -KVSTORE_ESTATE, "kvstore %s: sequence %u is written by another "
                          "process", kv->name, ref.id);
    return 0;
}

/* ---- leases ------------------------------------------------------------------------------------ */

static int lease_take_locked(kvstore *kv, uint32_t s, kvstore_lease *out, cm_err *err)
{
    uint32_t n = kv->L.max_leases, start = kv->lease_hint % n;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = (start + k) % n;
        struct kvs_lease *l = &kv->leases[i];
        if (atomic_load_explicit(&l->state, memory_order_relaxed) != 0) continue;
        uint32_t gen = atomic_load_explicit(&l->gen, memory_order_relaxed) + 1;
        atomic_store_explicit(&l->gen, gen, memory_order_relaxed);
        l->seq = s;
        l->seq_gen = kv->seqs[s].gen;
        l->owner = (uint32_t)kv->owner;
        l->owner_gen = kv->owner_gen;
        l->acquired_ns = kvs_now_ns();
        atomic_store_explicit(&l->state, 1, memory_order_release); /* last */
        kv->seqs[s].n_leases++;
        kv->lease_hint = i + 1;
        out->slot = i;
        out->gen = gen;
        out->seq.id = s;
        out->seq.gen = kv->seqs[s].gen;
        return 0;
    }
    return cm_err_set(err, -KVSTORE_EFULL, "kvstore %s: all %u leases are held", kv->name, n);
}

static int lease_drop_locked(kvstore *kv, uint32_t i, kvstore_gc_result *res, cm_err *err)
{
    struct kvs_lease *l = &kv->leases[i];
    atomic_store_explicit(&l->state, 0, memory_order_release); /* first */
    if (l->seq >= kv->L.max_seqs)
        return CORRUPT("kvstore %s: lease %u names sequence %u", kv->name, i, l->seq);
    struct kvs_seq *q = &kv->seqs[l->seq];
    if (q->gen != l->seq_gen ||
        atomic_load_explicit(&q->state, memory_order_relaxed) != KVSTORE_SEQ_READY)
        return 0; /* stale lease of an already freed sequence (rebuild cleans these) */
    if (q->n_leases) q->n_leases--;
    if (q->n_leases == 0) {
        if (res) res->seqs_freed++;
        return kvs_seq_free_locked(kv, l->seq, err);
    }
    return 0;
}

int kvs_lease_check_locked(kvstore *kv, const kvstore_lease *l, cm_err *err)
{
    if (l->slot >= kv->L.max_leases)
        return cm_err_set(err, -EINVAL, "kvstore %s: no lease slot %u", kv->name, l->slot);
    struct kvs_lease *r = &kv->leases[l->slot];
    if (atomic_load_explicit(&r->state, memory_order_relaxed) != 1 ||
        atomic_load_explicit(&r->gen, memory_order_relaxed) != l->gen || r->seq != l->seq.id ||
        r->seq_gen != l->seq.gen)
        return cm_err_set(err, -KVSTORE_ESTALE, "kvstore %s: lease %u/%u is not held", kv->name,
                          l->slot, l->gen);
    struct kvs_seq *q;
    return seq_get_locked(kv, l->seq, KVSTORE_SEQ_READY, &q, err);
}

/* Lock-free: is the lease still held? (acquire: pairs with the release stores of state) */
static bool lease_valid(kvstore *kv, const kvstore_lease *l)
{
    if (l->slot >= kv->L.max_leases) return false;
    struct kvs_lease *r = &kv->leases[l->slot];
    return atomic_load_explicit(&r->state, memory_order_acquire) == 1 &&
           atomic_load_explicit(&r->gen, memory_order_acquire) == l->gen;
}

int kvs_reap_owner_locked(kvstore *kv, uint32_t o, kvstore_gc_result *res)
{
    cm_err tmp = {0}, *err = &tmp;
    uint32_t gen = kv->owners[o].gen;
    int rc = 0;
    for (uint32_t i = 0; i < kv->L.max_leases && !rc; i++) {
        struct kvs_lease *l = &kv->leases[i];
        if (atomic_load_explicit(&l->state, memory_order_relaxed) == 1 && l->owner == o &&
            l->owner_gen == gen) {
            res->leases_released++;
            rc = lease_drop_locked(kv, i, res, err);
        }
    }
    for (uint32_t s = 0; s < kv->L.max_seqs && !rc; s++) {
        struct kvs_seq *q = &kv->seqs[s];
        if (atomic_load_explicit(&q->state, memory_order_relaxed) == KVSTORE_SEQ_WRITING &&
            q->owner == o && q->owner_gen == gen) {
            res->seqs_freed++;
            rc = kvs_seq_free_locked(kv, s, err);
        }
    }
    for (uint32_t b = 0; b < kv->L.n_blocks && !rc; b++) {
        struct kvs_block *k = &kv->blocks[b];
        if ((k->flags & KVS_BLOCK_MOVING) && k->move_owner == o && k->move_owner_gen == gen) {
            k->flags &= ~(uint32_t)KVS_BLOCK_MOVING;
            res->moves_cancelled++;
            if (k->move_slot < kv->L.n_spill)
                rc = kvs_push_locked(kv, KVS_STACK_SPILL, k->move_slot, err);
            uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
            if (!rc && k->ref == 0 && kvs_locw_tier(w) == KVS_TIER_NONE) {
                /* orphaned while moving (see block_release_locked): free the record now */
                k->flags = 0;
                atomic_fetch_add_explicit(&kv->hdr->mut.n_free, 1, memory_order_relaxed);
                rc = kvs_push_locked(kv, KVS_STACK_BLOCKS, b, err);
            }
        }
    }
    kv->owners[o].state = 0;
    if (rc) CM_LOG_ERROR("kvstore %s: reaping owner %u: %s", kv->name, o, tmp.msg);
    return rc;
}

/* ---- public: sequences -------------------------------------------------------------------------- */

int kvstore_seq_create(kvstore *kv, const kvstore_lease *prefix, uint32_t n_prefix_tblocks,
                       kvstore_seq_ref *out, cm_err *err)
{
    int rc = kvs_owner_ensure(kv, err);
    if (rc) return rc;
    if ((rc = kvs_lock(kv, err))) return rc;
    struct kvs_seq *src = NULL;
    if (prefix && n_prefix_tblocks) {
        if ((rc = kvs_lease_check_locked(kv, prefix, err))) goto out;
        src = &kv->seqs[prefix->seq.id];
        uint32_t full = src->n_tokens / kv->L.geom.tokens_per_block;
        if (n_prefix_tblocks > full || n_prefix_tblocks > src->n_tblocks) {
            rc = cm_err_set(err, -EINVAL, "kvstore %s: prefix of %u token blocks, source has %u "
                            "full ones", kv->name, n_prefix_tblocks, full);
            goto out;
        }
    }
    uint32_t found = UINT32_MAX;
    for (uint32_t s = 0; s < kv->L.max_seqs; s++)
        if (atomic_load_explicit(&kv->seqs[s].state, memory_order_relaxed) == KVSTORE_SEQ_FREE) {
            found = s;
            break;
        }
    if (found == UINT32_MAX) {
        rc = cm_err_set(err, -KVSTORE_EFULL, "kvstore %s: all %u sequences are in use",
                        kv->name, kv->L.max_seqs);
        goto out;
    }
    struct kvs_seq *q = &kv->seqs[found];
    q->gen++;
    q->owner = (uint32_t)kv->owner;
    q->owner_gen = kv->owner_gen;
    q->n_tokens = 0;
    q->n_tblocks = 0;
    q->n_leases = 0;
    q->n_prefix_tblocks = 0;
    q->created_ns = kvs_now_ns();
    q->published_ns = 0;
    atomic_store_explicit(&q->last_use, q->created_ns, memory_order_relaxed);
    atomic_store_explicit(&q->state, KVSTORE_SEQ_WRITING, memory_order_release);
    if (src) {
        const uint32_t nl = kv->L.geom.n_layers;
        _Atomic uint32_t *srow = kvs_row(kv, prefix->seq.id), *drow = kvs_row(kv, found);
        q->n_tblocks = n_prefix_tblocks;
        q->n_prefix_tblocks = n_prefix_tblocks;
        for (uint64_t i = 0; i < (uint64_t)n_prefix_tblocks * nl; i++) {
            uint32_t e = kvs_ld32(&srow[i]);
            if (!e || e > kv->L.n_blocks) {
                rc = CORRUPT("kvstore %s: READY sequence %u entry %llu is %u", kv->name,
                             prefix->seq.id, (unsigned long long)i, e);
                goto out;
            }
            kv->blocks[e - 1].ref++;
            kvs_st32(&drow[i], e);
        }
    }
    out->id = found;
    out->gen = q->gen;
out:
    kvs_unlock(kv);
    return rc;
}

/* Set up a fresh block for (seq s, entry i); 1 if the pool has no room. */
static int block_new_locked(kvstore *kv, uint32_t s, uint32_t tb, uint64_t i, void **data,
                            cm_err *err)
{
    if (stack_top(kv, KVS_STACK_BLOCKS) == 0 || stack_top(kv, KVS_STACK_RAM) == 0) return 1;
    uint32_t b = 0, r = 0;
    int rc = kvs_pop_locked(kv, KVS_STACK_BLOCKS, &b, err);
    if (rc) return rc < 0 ? rc : 1;
    struct kvs_block *k = &kv->blocks[b];
    uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
    if (k->ref != 0 || kvs_locw_tier(w) != KVS_TIER_NONE)
        return CORRUPT("kvstore %s: free block %u is in use (ref %u)", kv->name, b, k->ref);
    rc = kvs_pop_locked(kv, KVS_STACK_RAM, &r, err);
    if (rc) return rc < 0 ? rc : 1;
    k->ref = 1;
    k->flags = 0;
    k->hash = 0;
    atomic_store_explicit(&k->last_use, kvs_now_ns(), memory_order_relaxed);
    atomic_store_explicit(&k->locw, kvs_locw_make(kvs_locw_version(w) + 1, KVS_TIER_RAM, r),
                          memory_order_release);
    struct kvs_seq *q = &kv->seqs[s];
    if (q->n_tblocks < tb + 1) q->n_tblocks = tb + 1; /* before the entry past it */
    kvs_st32(&kvs_row(kv, s)[i], b + 1);              /* last */
    atomic_fetch_add_explicit(&kv->hdr->mut.n_alloc, 1, memory_order_relaxed);
    *data = kv->pool + (uint64_t)r * kv->L.slot_stride;
    return 0;
}

int kvstore_block_alloc(kvstore *kv, kvstore_seq_ref ref, uint32_t tb, uint32_t layer,
                        void **data, cm_err *err)
{
    *data = NULL;
    if (layer >= kv->L.geom.n_layers || tb >= kv->max_tblocks)
        return cm_err_set(err, -EINVAL, "kvstore %s: token block %u / layer %u out of range "
                          "(max %u / %u)", kv->name, tb, layer, kv->max_tblocks,
                          kv->L.geom.n_layers);
    int rc = kvs_owner_ensure(kv, err);
    if (rc) return rc;
    const uint64_t i = (uint64_t)tb * kv->L.geom.n_layers + layer;
    bool gc_done = !kv->p.gc_on_pressure;
    for (int attempt = 0; attempt < 8; attempt++) {
        if ((rc = kvs_lock(kv, err))) return rc;
        struct kvs_seq *q;
        if ((rc = seq_get_locked(kv, ref, KVSTORE_SEQ_WRITING, &q, err)) ||
            (rc = seq_mine_locked(kv, q, ref, err))) {
            kvs_unlock(kv);
            return rc;
        }
        uint32_t e = kvs_ld32(&kvs_row(kv, ref.id)[i]);
        if (e) {
            /* already there: hand it out again unless it is a shared prefix block */
            rc = 0;
            if (e > kv->L.n_blocks) {
                rc = CORRUPT("kvstore %s: sequence %u names block %u", kv->name, ref.id, e - 1);
            } else {
                struct kvs_block *k = &kv->blocks[e - 1];
                uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
                if (k->ref != 1 || (k->flags & KVS_BLOCK_SEALED))
                    rc = cm_err_set(err, -KVSTORE_ESTATE, "kvstore %s: block (%u, %u) is a "
                                    "shared prefix block (read-only)", kv->name, tb, layer);
                else if (kvs_locw_tier(w) != KVS_TIER_RAM || kvs_locw_slot(w) >= kv->L.n_ram)
                    rc = CORRUPT("kvstore %s: block %u of a WRITING sequence is not in RAM",
                                 kv->name, e - 1);
                else
                    *data = kv->pool + (uint64_t)kvs_locw_slot(w) * kv->L.slot_stride;
            }
            kvs_unlock(kv);
            return rc;
        }
        rc = block_new_locked(kv, ref.id, tb, i, data, err);
        kvs_unlock(kv);
        if (rc <= 0) return rc;
        /* no room: reap dead processes first, then spill cold blocks */
        if (!gc_done) {
            gc_done = true;
            kvstore_gc_result gr;
            bool any = false;
            if ((rc = kvs_gc_reap(kv, &gr, &any, err))) return rc;
            if (any) continue;
        }
        if (kv->L.n_spill) {
            uint32_t moved = 0;
            if ((rc = kvs_spill_evict(kv, kv->p.spill_batch, &moved, err))) return rc;
            if (moved) continue;
        }
        break;
    }
    return cm_err_set(err, -KVSTORE_EFULL, "kvstore %s: no free block (RAM pool of %u full%s)",
                      kv->name, kv->L.n_ram, kv->L.n_spill ? ", spill tier full" : "");
}

int kvstore_block_write(kvstore *kv, kvstore_seq_ref seq, uint32_t tb, uint32_t layer,
                        const void *src, size_t len, cm_err *err)
{
    if (len > kv->L.geom.bytes_per_block)
        return cm_err_set(err, -EINVAL, "kvstore %s: %zu bytes into a %llu-byte block", kv->name,
                          len, (unsigned long long)kv->L.geom.bytes_per_block);
    void *d;
    int rc = kvstore_block_alloc(kv, seq, tb, layer, &d, err);
    if (rc) return rc;
    memcpy(d, src, len);
    memset((uint8_t *)d + len, 0, kv->L.geom.bytes_per_block - len);
    return 0;
}

int kvstore_seq_publish(kvstore *kv, kvstore_seq_ref ref, const int32_t *tokens, uint32_t n_tokens,
                        kvstore_lease *lease, cm_err *err)
{
    if (!lease) return cm_err_set(err, -EINVAL, "kvstore: publish needs a lease to fill");
    const uint32_t tpb = kv->L.geom.tokens_per_block, nl = kv->L.geom.n_layers;
    if (n_tokens == 0) return cm_err_set(err, -EINVAL, "kvstore: publish of zero tokens");
    uint64_t ntb = ((uint64_t)n_tokens + tpb - 1) / tpb;
    if (ntb > kv->max_tblocks)
        return cm_err_set(err, -CM_ELIMIT, "kvstore %s: %u tokens need %llu token blocks, max %u",
                          kv->name, n_tokens, (unsigned long long)ntb, kv->max_tblocks);
    uint32_t nh = 0;
    uint64_t *H = NULL;
    if (tokens) {
        nh = n_tokens / tpb;
        H = malloc(((size_t)nh + 1) * sizeof(uint64_t));
        if (!H) return cm_err_set(err, -ENOMEM, "kvstore: out of memory");
        kvstore_prefix_hashes(kv->L.geom.model_fingerprint, tpb, tokens, n_tokens, H, nh);
    }
    int rc = kvs_lock(kv, err);
    if (rc) {
        free(H);
        return rc;
    }
    struct kvs_seq *q;
    if ((rc = seq_get_locked(kv, ref, KVSTORE_SEQ_WRITING, &q, err)) ||
        (rc = seq_mine_locked(kv, q, ref, err)))
        goto out;
    if (q->n_tblocks > ntb) {
        rc = cm_err_set(err, -EINVAL, "kvstore %s: sequence %u has blocks for %u token blocks, "
                        "%u tokens fill %llu", kv->name, ref.id, q->n_tblocks, n_tokens,
                        (unsigned long long)ntb);
        goto out;
    }
    _Atomic uint32_t *row = kvs_row(kv, ref.id);
    for (uint64_t i = 0; i < ntb * nl; i++) {
        uint32_t e = i < (uint64_t)q->n_tblocks * nl ? kvs_ld32(&row[i]) : 0;
        if (!e) {
            rc = cm_err_set(err, -KVSTORE_EINCOMPLETE, "kvstore %s: sequence %u misses token "
                            "block %llu layer %llu", kv->name, ref.id,
                            (unsigned long long)(i / nl), (unsigned long long)(i % nl));
            goto out;
        }
        if (e > kv->L.n_blocks) {
            rc = CORRUPT("kvstore %s: sequence %u names block %u", kv->name, ref.id, e - 1);
            goto out;
        }
        uint32_t tb = (uint32_t)(i / nl);
        if (tb < q->n_prefix_tblocks && H) {
            uint64_t want = tb < nh ? H[tb] : 0;
            if (kv->blocks[e - 1].hash != want) {
                rc = cm_err_set(err, -EINVAL, "kvstore %s: tokens of token block %u differ from "
                                "the shared prefix", kv->name, tb);
                goto out;
            }
        }
    }
    /* take the lease slot first so that nothing changes if the table is full */
    kvstore_lease tmp;
    if ((rc = lease_take_locked(kv, ref.id, &tmp, err))) goto out;
    for (uint64_t i = 0; i < ntb * nl; i++) {
        uint32_t tb = (uint32_t)(i / nl);
        struct kvs_block *k = &kv->blocks[kvs_ld32(&row[i]) - 1];
        if (tb >= q->n_prefix_tblocks) k->hash = (H && tb < nh) ? H[tb] : 0;
        k->flags |= KVS_BLOCK_SEALED;
    }
    q->n_tokens = n_tokens;
    q->published_ns = kvs_now_ns();
    atomic_store_explicit(&q->last_use, q->published_ns, memory_order_relaxed);
    atomic_store_explicit(&q->state, KVSTORE_SEQ_READY, memory_order_release);
    atomic_fetch_add_explicit(&kv->hdr->mut.n_published, 1, memory_order_relaxed);
    *lease = tmp;
out:
    kvs_unlock(kv);
    free(H);
    return rc;
}

int kvstore_seq_abort(kvstore *kv, kvstore_seq_ref ref, cm_err *err)
{
    int rc = kvs_lock(kv, err);
    if (rc) return rc;
    struct kvs_seq *q;
    if (!(rc = seq_get_locked(kv, ref, KVSTORE_SEQ_WRITING, &q, err)) &&
        !(rc = seq_mine_locked(kv, q, ref, err)))
        rc = kvs_seq_free_locked(kv, ref.id, err);
    kvs_unlock(kv);
    return rc;
}

int kvstore_lease_acquire(kvstore *kv, kvstore_seq_ref ref, kvstore_lease *out, cm_err *err)
{
    int rc = kvs_owner_ensure(kv, err);
    if (rc) return rc;
    if ((rc = kvs_lock(kv, err))) return rc;
    struct kvs_seq *q;
    if (!(rc = seq_get_locked(kv, ref, KVSTORE_SEQ_READY, &q, err)))
        rc = lease_take_locked(kv, ref.id, out, err);
    kvs_unlock(kv);
    return rc;
}

int kvstore_lease_release(kvstore *kv, const kvstore_lease *l, cm_err *err)
{
    int rc = kvs_lock(kv, err);
    if (rc) return rc;
    if (!(rc = kvs_lease_check_locked(kv, l, err))) rc = lease_drop_locked(kv, l->slot, NULL, err);
    kvs_unlock(kv);
    return rc;
}

static void fill_info(kvstore *kv, uint32_t s, kvstore_seq_info *o, uint64_t now)
{
    struct kvs_seq *q = &kv->seqs[s];
    memset(o, 0, sizeof(*o));
    o->ref.id = s;
    o->ref.gen = q->gen;
    o->state = atomic_load_explicit(&q->state, memory_order_relaxed);
    o->n_tokens = q->n_tokens;
    o->n_tblocks = q->n_tblocks;
    o->n_prefix_tblocks = q->n_prefix_tblocks;
    o->n_leases = q->n_leases;
    o->owner_pid = q->owner < kv->L.max_owners ? kv->owners[q->owner].pid : 0;
    o->age_ms = now > q->created_ns ? (now - q->created_ns) / 1000000u : 0;
}

int kvstore_seq_list(kvstore *kv, kvstore_seq_info *out, uint32_t max, uint32_t *n_out,
                     cm_err *err)
{
    int rc = kvs_lock(kv, err);
    if (rc) return rc;
    uint32_t n = 0;
    uint64_t now = kvs_now_ns();
    for (uint32_t s = 0; s < kv->L.max_seqs; s++) {
        if (atomic_load_explicit(&kv->seqs[s].state, memory_order_relaxed) == KVSTORE_SEQ_FREE)
            continue;
        if (n < max) fill_info(kv, s, &out[n], now);
        n++;
    }
    kvs_unlock(kv);
    *n_out = n;
    return 0;
}

int kvstore_seq_get_info(kvstore *kv, kvstore_seq_ref ref, kvstore_seq_info *out, cm_err *err)
{
    int rc = kvs_lock(kv, err);
    if (rc) return rc;
    struct kvs_seq *q;
    if (!(rc = seq_get_locked(kv, ref, 0, &q, err))) fill_info(kv, ref.id, out, kvs_now_ns());
    kvs_unlock(kv);
    return rc;
}

/* ---- reads ------------------------------------------------------------------------------------- */

/* Lock-free: block id of (tb, layer) of the leased sequence. */
int kvs_block_resolve(kvstore *kv, const kvstore_lease *l, uint32_t tb, uint32_t layer,
                      uint32_t *block, cm_err *err)
{
    if (l->seq.id >= kv->L.max_seqs || layer >= kv->L.geom.n_layers || tb >= kv->max_tblocks)
        return cm_err_set(err, -EINVAL, "kvstore %s: block (%u, %u) of sequence %u out of range",
                          kv->name, tb, layer, l->seq.id);
    if (!lease_valid(kv, l))
        return cm_err_set(err, -KVSTORE_ESTALE, "kvstore %s: lease %u/%u is not held", kv->name,
                          l->slot, l->gen);
    /* n_tblocks of a READY sequence does not change while it is leased */
    uint32_t ntb = ((volatile struct kvs_seq *)&kv->seqs[l->seq.id])->n_tblocks;
    if (tb >= ntb)
        return cm_err_set(err, -EINVAL, "kvstore %s: token block %u past the %u of sequence %u",
                          kv->name, tb, ntb, l->seq.id);
    uint32_t e = kvs_ld32(&kvs_row(kv, l->seq.id)[(uint64_t)tb * kv->L.geom.n_layers + layer]);
    if (!e || e > kv->L.n_blocks) {
        if (!lease_valid(kv, l))
            return cm_err_set(err, -KVSTORE_ESTALE, "kvstore %s: lease %u/%u expired", kv->name,
                              l->slot, l->gen);
        return CORRUPT("kvstore %s: READY sequence %u entry (%u, %u) is %u", kv->name, l->seq.id,
                       tb, layer, e);
    }
    *block = e - 1;
    return 0;
}

int kvs_block_copy(kvstore *kv, kvs_io *io, const kvstore_lease *l, uint32_t tb, uint32_t layer,
                   void *dst, cm_err *err)
{
    const uint64_t bpb = kv->L.geom.bytes_per_block;
    for (int attempt = 0; attempt < 16; attempt++) {
        uint32_t b;
        int rc = kvs_block_resolve(kv, l, tb, layer, &b, err);
        if (rc) return rc;
        struct kvs_block *k = &kv->blocks[b];
        uint64_t w1 = atomic_load_explicit(&k->locw, memory_order_acquire);
        uint32_t tier = kvs_locw_tier(w1), slot = kvs_locw_slot(w1);
        if (tier == KVS_TIER_RAM) {
            if (slot >= kv->L.n_ram)
                return CORRUPT("kvstore %s: block %u in RAM slot %u of %u", kv->name, b, slot,
                               kv->L.n_ram);
            memcpy(dst, kv->pool + (uint64_t)slot * kv->L.slot_stride, bpb);
        } else if (tier == KVS_TIER_SPILL) {
            rc = kvs_spill_read(kv, io, w1, dst, err);
            if (rc < 0 && atomic_load_explicit(&k->locw, memory_order_acquire) == w1) return rc;
        } else {
            continue; /* freed under us: the lease check below decides */
        }
        atomic_thread_fence(memory_order_acquire);
        uint64_t w2 = atomic_load_explicit(&k->locw, memory_order_relaxed);
        if (w1 != w2) continue;
        if (!lease_valid(kv, l))
            return cm_err_set(err, -KVSTORE_ESTALE, "kvstore %s: lease %u/%u expired during the "
                              "copy", kv->name, l->slot, l->gen);
        uint64_t now = kvs_now_ns();
        atomic_store_explicit(&k->last_use, now, memory_order_relaxed);
        atomic_store_explicit(&kv->seqs[l->seq.id].last_use, now, memory_order_relaxed);
        if (tier == KVS_TIER_SPILL)
            atomic_fetch_add_explicit(&kv->hdr->mut.n_spill_in, 1, memory_order_relaxed);
        return 0;
    }
    if (!lease_valid(kv, l))
        return cm_err_set(err, -KVSTORE_ESTALE, "kvstore %s: lease %u/%u expired", kv->name,
                          l->slot, l->gen);
    return cm_err_set(err, -EAGAIN, "kvstore %s: block (%u, %u) kept moving during 16 reads",
                      kv->name, tb, layer);
}

int kvstore_block_read(kvstore *kv, const kvstore_lease *lease, uint32_t tb, uint32_t layer,
                       void *dst, cm_err *err)
{
    return kvs_block_copy(kv, NULL, lease, tb, layer, dst, err);
}

/* ---- prefix reuse ------------------------------------------------------------------------------ */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

uint32_t kvstore_prefix_hashes(uint64_t fingerprint, uint32_t tpb, const int32_t *tokens,
                               uint32_t n_tokens, uint64_t *out, uint32_t max_out)
{
    if (!tpb) return 0;
    /* the running state h chains through every token; each block's hash is a finalisation of
     * it, so equal hashes at block i mean equal tokens [0, (i+1)*tpb) (up to 2^-64) */
    uint64_t h = mix64(fingerprint ^ UINT64_C(0x9e3779b97f4a7c15)) ^ mix64(tpb);
    uint32_t n = 0;
    for (uint32_t t = 0; t < n_tokens && n < max_out; t++) {
        h ^= (uint64_t)(uint32_t)tokens[t];
        h *= UINT64_C(0x9e3779b97f4a7c15);
        h = (h << 29) | (h >> 35);
        if ((t + 1) % tpb == 0) {
            uint64_t f = mix64(h + n);
            out[n++] = f ? f : 1;
        }
    }
    return n;
}

int kvstore_prefix_lookup(kvstore *kv, const int32_t *tokens, uint32_t n_tokens,
                          kvstore_lease *lease, uint32_t *n_tblocks, cm_err *err)
{
    *n_tblocks = 0;
    const uint32_t tpb = kv->L.geom.tokens_per_block, nl = kv->L.geom.n_layers;
    uint32_t T = n_tokens / tpb;
    if (T > kv->max_tblocks) T = kv->max_tblocks;
    if (T == 0)
        return cm_err_set(err, -KVSTORE_ENOTFOUND, "kvstore: prompt shorter than one block");
    uint64_t *H = malloc((size_t)T * sizeof(uint64_t));
    if (!H) return cm_err_set(err, -ENOMEM, "kvstore: out of memory");
    kvstore_prefix_hashes(kv->L.geom.model_fingerprint, tpb, tokens, n_tokens, H, T);
    int rc = kvs_owner_ensure(kv, err);
    if (rc || (rc = kvs_lock(kv, err))) {
        free(H);
        return rc;
    }
    uint32_t best_s = UINT32_MAX, best_n = 0;
    for (uint32_t s = 0; s < kv->L.max_seqs; s++) {
        struct kvs_seq *q = &kv->seqs[s];
        if (atomic_load_explicit(&q->state, memory_order_relaxed) != KVSTORE_SEQ_READY) continue;
        uint32_t lim = q->n_tokens / tpb;
        if (lim > q->n_tblocks) lim = q->n_tblocks;
        if (lim > kv->max_tblocks) lim = kv->max_tblocks;
        if (lim > T) lim = T;
        if (lim <= best_n) continue;
        _Atomic uint32_t *row = kvs_row(kv, s);
        /* hashes chain, so matches form a prefix: binary search the last matching block */
        int64_t lo = -1, hi = (int64_t)lim - 1;
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            uint32_t e = kvs_ld32(&row[(uint64_t)mid * nl]);
            if (!e || e > kv->L.n_blocks) {
                rc = CORRUPT("kvstore %s: READY sequence %u entry %lld is %u", kv->name, s,
                             (long long)mid * nl, e);
                goto out;
            }
            if (kv->blocks[e - 1].hash == H[mid])
                lo = mid;
            else
                hi = mid - 1;
        }
        if (lo + 1 > (int64_t)best_n) {
            best_n = (uint32_t)(lo + 1);
            best_s = s;
        }
    }
    if (best_s == UINT32_MAX) {
        rc = cm_err_set(err, -KVSTORE_ENOTFOUND, "kvstore %s: no sequence shares a prefix",
                        kv->name);
        goto out;
    }
    if ((rc = lease_take_locked(kv, best_s, lease, err))) goto out;
    *n_tblocks = best_n;
    atomic_fetch_add_explicit(&kv->hdr->mut.n_prefix_hits, 1, memory_order_relaxed);
out:
    kvs_unlock(kv);
    free(H);
    return rc;
}
