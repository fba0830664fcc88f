/*
 * kvstore-impl.h — on-segment layout and internals shared by the kvstore-*.c files.
 *
 * ---- layout of a segment (all offsets from the start of the file, native little-endian) ----
 *
 *   [0, 4096)            header: immutable part (magic "IHIPKVS1", version, geometry, table
 *                        counts and offsets, spill file path, layout_hash over all of it),
 *                        then at 1024 the process-shared robust mutex, then the mutable part
 *                        (free-list tops, counters)
 *   off_blocks           n_blocks × struct kvs_block   (logical blocks: ref count, location)
 *   off_seqs             max_seqs × struct kvs_seq      (sequence table)
 *   off_leases           max_leases × struct kvs_lease
 *   off_owners           max_owners × struct kvs_owner  (attached processes)
 *   off_free_blocks      n_blocks × u32   stack of free logical block ids
 *   off_free_ram         n_ram × u32      stack of free RAM slots
 *   off_free_spill       n_spill × u32    stack of free spill slots
 *   off_manifests        max_seqs × max_blocks_per_seq × u32: entry [tb * n_layers + layer]
 *                        = block id + 1, 0 = none. Entries at or past n_tblocks * n_layers are
 *                        always 0, so untouched manifest pages of a tmpfs file stay holes.
 *   off_pool             n_ram × slot_stride bytes (4096-aligned): the RAM tier
 *
 * A logical block (what manifests name) lives in a RAM slot or a spill slot; spilling moves
 * it without changing its id, so manifests of READY sequences never change.
 *
 * ---- concurrency ----
 *
 * All metadata changes happen under one process-shared robust mutex. Critical sections are
 * short (no I/O, no block data copies). A process killed while holding it leaves it
 * EOWNERDEAD; the next locker runs kvs_rebuild, which recomputes everything derived (free
 * stacks, reference counts, lease counts) from the primary records (sequences with their
 * manifests, leases, owners, block locations) and finishes half-done frees. Every multi-step
 * operation writes primary records in an order that rebuild can interpret (e.g. a lease's
 * state is set last; a manifest entry is written only after its block is fully set up; a
 * sequence being freed is marked FREEING first), so a crash at any instruction loses
 * nothing and leaks nothing. A kill during rebuild leaves EOWNERDEAD again: rebuild is
 * idempotent.
 *
 * Lock-free paths:
 *  - heartbeats: each owner's heartbeat_ns is a relaxed atomic store; gc reads it.
 *  - block reads: a READY sequence's manifest is immutable while leased (the lease was taken
 *    under the lock after publish, which gives happens-before on the manifest and the block
 *    data). The block's location word `locw` (version:32 | tier:2 | slot:30) is one atomic
 *    64-bit word, changed only under the lock, its version bumped on every change (spill,
 *    free). A reader loads locw (acquire), copies the slot, issues an acquire fence and loads
 *    locw again: if it is unchanged the copy is good (seqlock). The slot can only be reused
 *    after locw changed (the free push follows the locw store under the lock, and the next
 *    user pops under the lock), so a copy that raced a reuse sees a different locw.
 *    The copy itself is a plain memcpy of memory another process may write (the classic
 *    seqlock data race); its result is discarded whenever that can have happened.
 *  - last_use (LRU for the spill tier): relaxed atomic stores, read by the evictor.
 *  - counters: relaxed atomic adds.
 *
 * ---- trust ----
 *
 * The immutable header is validated once at open (magic, version, layout hash, offsets
 * recomputed from the counts, file size) and copied into the handle; later code uses only the
 * copy. Every mutable value read from the segment (ids, counts, stack tops, slots, states) is
 * checked against the copied limits before use; failures return -KVSTORE_ECORRUPT with a
 * message naming the field.
 */
#ifndef KVSTORE_IMPL_H
#define KVSTORE_IMPL_H

#include "kvstore.h"
#include "io/kvstore-io.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>

#define KVS_MAGIC UINT64_C(0x3153564B50494849) /* "IHIPKVS1" read as little-endian u64 */
#define KVS_VERSION 1u
#define KVS_HEADER_SIZE 4096u
#define KVS_LOCK_OFFSET 1024u
#define KVS_PAGE 4096u
#define KVS_NAME_MAX 64
#define KVS_SPILL_PATH_MAX 256

/* Hard ceilings so that offset arithmetic cannot overflow (all well above sane configs). */
#define KVS_MAX_BLOCKS (1u << 30)  /* slot ids are 30 bits in locw */
#define KVS_MAX_SEQS (1u << 20)
#define KVS_MAX_LEASES (1u << 22)
#define KVS_MAX_OWNERS (1u << 16)
#define KVS_MAX_MANIFEST (1u << 26)
#define KVS_MAX_BLOCK_BYTES (UINT64_C(1) << 32)

/* ---- block location word -------------------------------------------------------------------- */

enum kvs_tier { KVS_TIER_NONE = 0, KVS_TIER_RAM = 1, KVS_TIER_SPILL = 2 };

static inline uint64_t kvs_locw_make(uint32_t version, uint32_t tier, uint32_t slot)
{
    return ((uint64_t)version << 32) | ((uint64_t)(tier & 3u) << 30) | (slot & 0x3fffffffu);
}
static inline uint32_t kvs_locw_version(uint64_t w) { return (uint32_t)(w >> 32); }
static inline uint32_t kvs_locw_tier(uint64_t w) { return (uint32_t)(w >> 30) & 3u; }
static inline uint32_t kvs_locw_slot(uint64_t w) { return (uint32_t)w & 0x3fffffffu; }

/* ---- on-segment records ---------------------------------------------------------------------- */

/* Immutable after create; covered by layout_hash (FNV-1a 64 of the bytes before it). */
struct kvs_imm {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t total_size;
    kvstore_geometry geom;
    uint32_t n_ram, n_spill, n_blocks; /* n_blocks = n_ram + n_spill */
    uint32_t max_seqs, max_blocks_per_seq, max_leases, max_owners, reserved0;
    uint64_t lease_ttl_ns;
    uint64_t slot_stride;  /* bytes between RAM slots (bytes_per_block rounded up) */
    uint64_t spill_stride; /* bytes between spill slots (rounded to 4096 for O_DIRECT) */
    uint64_t off_blocks, off_seqs, off_leases, off_owners;
    uint64_t off_free_blocks, off_free_ram, off_free_spill, off_manifests, off_pool;
    uint64_t created_unix_ns;
    char spill_path[KVS_SPILL_PATH_MAX]; /* "" = no spill tier; NUL-terminated */
    uint64_t layout_hash;
};

/* Mutable header fields. Tops are written under the lock only; counters are atomics. */
struct kvs_mut {
    uint32_t free_blocks_top; /* entries [0, top) of the free-block stack are free ids */
    uint32_t free_ram_top;
    uint32_t free_spill_top;
    uint32_t rebuilds;        /* times kvs_rebuild ran */
    _Atomic uint64_t n_alloc, n_free, n_spill_out, n_spill_in, n_lock_recoveries;
    _Atomic uint64_t n_owners_reaped, n_published, n_prefix_hits;
};

struct kvs_hdr {
    struct kvs_imm imm;
    uint8_t pad0[KVS_LOCK_OFFSET - sizeof(struct kvs_imm)];
    union {
        pthread_mutex_t m;
        uint8_t raw[128];
    } lock;
    struct kvs_mut mut;
};

enum kvs_block_flags {
    KVS_BLOCK_SEALED = 1u, /* part of a READY sequence: read-only, may spill */
    KVS_BLOCK_MOVING = 2u, /* being copied to spill slot move_slot by owner move_owner */
};

struct kvs_block {
    _Atomic uint64_t locw;     /* version | tier | slot; see above */
    uint64_t hash;             /* prefix hash through this token block, 0 = none */
    _Atomic uint64_t last_use; /* monotonic ns of the last write/read */
    uint32_t ref;              /* manifests naming this block (derived; rebuilt) */
    uint32_t flags;            /* enum kvs_block_flags */
    uint32_t move_slot;        /* spill slot reserved while MOVING */
    uint32_t move_owner;       /* owner slot doing the move */
    uint32_t move_owner_gen;
    uint32_t reserved;
};

struct kvs_seq {
    _Atomic uint32_t state; /* enum kvstore_seq_state; stored under the lock */
    uint32_t gen;           /* bumped on every create */
    uint32_t owner;         /* writer's owner slot (WRITING) */
    uint32_t owner_gen;
    uint32_t n_tokens;      /* set at publish */
    uint32_t n_tblocks;     /* manifest rows in use: [0, n_tblocks * n_layers) */
    uint32_t n_leases;      /* derived from the lease table; rebuilt */
    uint32_t n_prefix_tblocks;
    uint64_t created_ns;    /* monotonic */
    uint64_t published_ns;
    _Atomic uint64_t last_use;
    uint64_t reserved;
};

struct kvs_lease {
    /* state and gen are read lock-free by block readers to detect a lease that was reaped
     * under them; written under the lock (state set last when taking, first when releasing) */
    _Atomic uint32_t state; /* 0 free, 1 held */
    _Atomic uint32_t gen;
    uint32_t seq, seq_gen;
    uint32_t owner, owner_gen;
    uint64_t acquired_ns;
};

struct kvs_owner {
    uint32_t state; /* 0 free, 1 attached */
    uint32_t gen;
    int32_t pid;
    uint32_t reserved;
    uint64_t starttime; /* /proc/PID/stat field 22 (clock ticks since boot) */
    uint64_t pidns;     /* inode of /proc/self/ns/pid: pid checks only within one namespace */
    _Atomic uint64_t heartbeat_ns; /* monotonic */
    uint64_t attached_ns;
    char comm[16];
};

/* ---- the process-local handle ---------------------------------------------------------------- */

struct kvstore {
    char name[KVS_NAME_MAX + 1];
    char path[PATH_MAX];
    int fd;                /* segment file, -1 for an in-memory segment */
    uint8_t *base;         /* mapping */
    size_t size;
    bool mem_mode;         /* in-memory segment (tests, fuzzing): process-local lock */
    pthread_mutex_t mem_lock;

    struct kvs_imm L;      /* validated copy of the immutable header */
    kvstore_geometry geom_pub; /* what kvstore_get_geometry returns */
    uint32_t max_tblocks;  /* max_blocks_per_seq / n_layers */

    struct kvs_hdr *hdr;
    struct kvs_block *blocks;
    struct kvs_seq *seqs;
    struct kvs_lease *leases;
    struct kvs_owner *owners;
    uint32_t *free_blocks, *free_ram, *free_spill;
    _Atomic uint32_t *manifests;
    uint8_t *pool;

    kvstore_params p;
    char dir[PATH_MAX];

    /* this process's owner slot; registered on first use */
    pthread_mutex_t local_mu; /* guards owner registration and the I/O context */
    int32_t owner;            /* -1 until registered */
    uint32_t owner_gen;
    pid_t pid;
    uint64_t starttime, pidns;
    uint32_t lease_hint;      /* where the next lease search starts (under the segment lock) */

    pthread_t hb_thread;
    bool hb_running;
    pthread_mutex_t hb_mu;
    pthread_cond_t hb_cv;
    bool hb_quit;

    /* spill tier */
    int spill_fd;         /* buffered */
    int spill_fd_direct;  /* O_DIRECT, or -1 where the file system refuses it */
    kvs_io *io;           /* for spill writes and synchronous reads; guarded by local_mu */
};

/* ---- internal functions (kvstore-segment.c) --------------------------------------------------- */

uint64_t kvs_fnv1a(const void *p, size_t n, uint64_t h);
int kvs_layout(struct kvs_imm *imm, cm_err *err);
int kvs_validate_imm(const struct kvs_imm *imm, uint64_t file_size, cm_err *err);
void kvs_format(void *base, const struct kvs_imm *imm, bool pshared_lock);
int kvs_attach(kvstore *kv, void *base, size_t size, cm_err *err);
int kvs_lock(kvstore *kv, cm_err *err);
void kvs_unlock(kvstore *kv);
uint64_t kvs_now_ns(void);
int kvs_rebuild(kvstore *kv, bool fix, cm_err *err);
int kvs_owner_ensure(kvstore *kv, cm_err *err);
/* Map an in-memory segment image (tests, fuzzing): process-local lock, no owner liveness. */
int kvs_open_mem(void *base, size_t size, const kvstore_params *p, kvstore **out, cm_err *err);
bool kvs_owner_alive_locked(kvstore *kv, uint32_t o, uint32_t gen);

/* kvstore-seq.c */
int kvs_seq_free_locked(kvstore *kv, uint32_t s, cm_err *err);
/* Release everything owner slot o holds (leases, WRITING sequences, spill moves), free it. */
int kvs_reap_owner_locked(kvstore *kv, uint32_t o, kvstore_gc_result *res);
/* Stack helpers for the three free stacks (bounds-checked). */
int kvs_push_locked(kvstore *kv, int which, uint32_t v, cm_err *err);
int kvs_pop_locked(kvstore *kv, int which, uint32_t *v, cm_err *err); /* 1 = empty */
enum { KVS_STACK_BLOCKS = 0, KVS_STACK_RAM = 1, KVS_STACK_SPILL = 2 };
int kvs_lease_check_locked(kvstore *kv, const kvstore_lease *l, cm_err *err);
int kvs_gc_reap(kvstore *kv, kvstore_gc_result *res, bool *any_dead, cm_err *err);
int kvs_block_resolve(kvstore *kv, const kvstore_lease *l, uint32_t tb, uint32_t layer,
                      uint32_t *block, cm_err *err);

/* kvstore-spill.c */
int kvs_spill_open(kvstore *kv, cm_err *err);
void kvs_spill_close(kvstore *kv);
int kvs_spill_evict(kvstore *kv, uint32_t want, uint32_t *moved, cm_err *err);
/* Read block `b` (located by the caller's snapshot w) from the spill file into dst using io.
 * Returns 0, or a negative code. Does not validate w afterwards. */
int kvs_spill_read(kvstore *kv, kvs_io *io, uint64_t w, void *dst, cm_err *err);

/* Seqlock read of one block into dst, RAM or spill (kvstore-seq.c). */
int kvs_block_copy(kvstore *kv, kvs_io *io, const kvstore_lease *l, uint32_t tb, uint32_t layer,
                   void *dst, cm_err *err);

/* Manifest row of sequence s (s < max_seqs, checked by the caller). */
static inline _Atomic uint32_t *kvs_row(kvstore *kv, uint32_t s)
{
    return kv->manifests + (size_t)s * kv->L.max_blocks_per_seq;
}
static inline uint32_t kvs_ld32(_Atomic uint32_t *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}
static inline void kvs_st32(_Atomic uint32_t *p, uint32_t v)
{
    atomic_store_explicit(p, v, memory_order_relaxed);
}

#endif /* KVSTORE_IMPL_H */
