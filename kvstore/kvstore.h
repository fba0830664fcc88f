/*
 * kvstore.h — the shared host-memory KV block store (public API).
 *
 * A segment is one file (default /dev/shm/ihip-NAME) mapped by every process of a node. It
 * holds the KV cache of whole prompts as fixed-size blocks: one block is the K and V of one
 * layer for `tokens_per_block` consecutive tokens (suggested byte layout inside a block:
 * [K|V][kv_head][token][head_dim] in `dtype`; the store never interprets the bytes). A
 * sequence is the manifest of one prompt: for each token block `tb` and layer `l`, the id of
 * the block that holds it.
 *
 * Lifecycle: a prefill writer creates a sequence (WRITING, owned by the writer's process),
 * allocates/writes its blocks in any order, then publishes it (READY) in one atomic step and
 * receives a lease. Readers take leases on READY sequences and release them; the sequence is
 * freed when its last lease is released. Processes are identified by pid + start time and
 * heartbeat; when one dies (kill -9 included) its leases expire and its unpublished
 * sequences are freed (kvstore_gc, also run automatically when the pool runs out).
 *
 * When the RAM pool is full and a spill directory is configured, the least-recently-used
 * blocks of READY sequences move to a spill file and are read back on demand (io_uring, or
 * pread where io_uring is unavailable). Block reads are validated against concurrent moves
 * (a per-block version, see kvstore-impl.h), so readers never see a block that was moved or
 * reused under them.
 *
 * Prefix reuse: at publish, every full token block records a hash of all tokens up to its
 * end, seeded by the model fingerprint; kvstore_prefix_lookup finds the READY sequence that
 * shares the longest prefix with a new prompt and leases it; kvstore_seq_create can then
 * adopt those blocks (shared, reference-counted) instead of recomputing them.
 *
 * Errors: 0 / negative code (-errno or -KVSTORE_E*), with an optional cm_err for the reason.
 * "No capacity, retry later" is -KVSTORE_EFULL, distinct from errors. Every index, length and
 * offset read from the segment is bounds-checked: a corrupt segment gives -KVSTORE_ECORRUPT.
 *
 * Threads: a kvstore handle may be used from several threads at once. A handle must not be
 * used in a child after fork().
 */
#ifndef KVSTORE_H
#define KVSTORE_H

#include "base/cm.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- error codes (negated in return values) ---------------------------------------------- */

enum kvstore_errcode {
    KVSTORE_EFULL = 6001,       /* no free block / sequence / lease / owner slot: retry later */
    KVSTORE_ECORRUPT = 6002,    /* segment metadata is invalid (another process wrote junk) */
    KVSTORE_EGEOMETRY = 6003,   /* segment geometry differs from what the caller expects */
    KVSTORE_ESTALE = 6004,      /* sequence or lease no longer exists (freed, expired, reused) */
    KVSTORE_ESTATE = 6005,      /* operation not allowed in the sequence's or block's state */
    KVSTORE_EVERSION = 6006,    /* segment written by an incompatible version of this code */
    KVSTORE_ELOCK = 6007,       /* the segment lock was not obtained within lock_timeout_ms */
    KVSTORE_EINCOMPLETE = 6008, /* publish of a sequence with missing blocks */
    KVSTORE_ENOTFOUND = 6009,   /* no segment of that name / no matching prefix */
};

/* A static string for a kvstore code or any code cm_strerror knows. */
CM_API const char *kvstore_strerror(int code);

/* ---- geometry and parameters ------------------------------------------------------------- */

/* Element types (numbering follows tn_type / GGUF so it can be passed through unchanged). */
enum kvstore_dtype {
    KVSTORE_DTYPE_F32 = 0,
    KVSTORE_DTYPE_F16 = 1,
    KVSTORE_DTYPE_BF16 = 30,
    KVSTORE_DTYPE_F8_E4M3 = 100, /* fp8 e4m3 bytes (GPU workers; value = byte × the fixed scale
                                    CUDA_KV_FP8_SCALE of cuda-model.h); the CPU path reads only
                                    F32/F16/BF16 */
};

typedef struct kvstore_geometry {
    uint64_t model_fingerprint; /* identifies model + KV layout; seeds the prefix hashes */
    uint32_t n_layers;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t tokens_per_block;
    uint32_t dtype;             /* enum kvstore_dtype, or any id when bytes_per_block is set */
    uint32_t reserved;
    uint64_t bytes_per_block;   /* 0 at create: 2 (K,V) * kv_heads * tokens * head_dim * size */
} kvstore_geometry;

enum kvstore_io_backend {
    KVSTORE_IO_AUTO = 0,  /* io_uring when it works, else pread */
    KVSTORE_IO_URING = 1, /* io_uring or fail */
    KVSTORE_IO_PREAD = 2, /* pread/pwrite always */
};

/* Every limit of the store. Fields marked (create) are fixed in the segment when it is made;
 * the others are per process and may differ between the processes of a node. */
typedef struct kvstore_params {
    const char *dir;             /* directory of segments (default "/dev/shm") */
    const char *spill_dir;       /* (create) spill file directory; NULL or "" = no spill tier */
    uint32_t n_ram_blocks;       /* (create) blocks in the RAM pool (default 1024) */
    uint32_t n_spill_blocks;     /* (create) blocks in the spill file (default 0) */
    uint32_t max_seqs;           /* (create) sequence table size (default 256) */
    uint32_t max_blocks_per_seq; /* (create) manifest entries per sequence, = token blocks *
                                    layers (default 65536; untouched manifest pages cost no
                                    memory in tmpfs) */
    uint32_t max_leases;         /* (create) lease table size (default 4096) */
    uint32_t max_owners;         /* (create) processes attached at once (default 256) */
    uint64_t lease_ttl_ms;       /* (create) a process whose heartbeat is older is dead
                                    (default 60000) */
    uint32_t lock_timeout_ms;    /* wait for the segment lock at most this long (default 5000) */
    uint32_t spill_batch;        /* blocks moved to the spill tier per eviction (default 32) */
    uint32_t io_queue_depth;     /* io_uring submission queue entries (default 64) */
    int io_backend;              /* enum kvstore_io_backend (default AUTO) */
    bool heartbeat_thread;       /* renew this process's leases from a thread every ttl/4
                                    (default true; else call kvstore_heartbeat yourself) */
    bool gc_on_pressure;         /* reap dead owners when allocation finds no room (default true) */
} kvstore_params;

CM_API kvstore_params kvstore_default_params(void);

/* Fill bytes_per_block for F32/F16/BF16 when it is 0; -EINVAL for other dtypes. */
CM_API int kvstore_geometry_finish(kvstore_geometry *g, cm_err *err);

/* ---- segments ---------------------------------------------------------------------------- */

typedef struct kvstore kvstore;

/* Create segment NAME ([A-Za-z0-9._-], 1..64 chars) in p->dir; -EEXIST if it exists. The
 * file appears complete or not at all (made under a temporary name, then linked). */
CM_API int kvstore_create(const char *name, const kvstore_geometry *g, const kvstore_params *p,
                          cm_err *err);
/* Map an existing segment and validate its header. `expect` (may be NULL) must match the
 * segment's geometry, else -KVSTORE_EGEOMETRY. Caller frees with kvstore_close. */
CM_API int kvstore_open(const char *name, const kvstore_params *p, const kvstore_geometry *expect,
                        kvstore **out, cm_err *err);
/* Release this handle's leases, free its unpublished sequences, unmap. NULL is a no-op. */
CM_API void kvstore_close(kvstore *kv);
/* Remove the segment file and its spill file. Processes that have it mapped keep working on
 * the unlinked copy until they close it. */
CM_API int kvstore_destroy(const char *name, const kvstore_params *p, cm_err *err);

/* Valid while kv is open. */
CM_API const kvstore_geometry *kvstore_get_geometry(const kvstore *kv);
/* The segment's identity: fixed at creation (its creation time in ns since the epoch, never 0),
 * the same for every process that opens it, different for segments created at different times
 * even when they have the same path (e.g. /kv/ihip-ihip in every pod). A KV handle carries it so
 * a worker never reads a sequence id of another segment. */
CM_API uint64_t kvstore_segment_id(const kvstore *kv);
/* Blocks moved to the spill tier since the segment was created, by any process. A reader that
 * reads blocks in place (kvstore_cuda_block_addr) compares it across its reads: unchanged means
 * none of its blocks moved. Lock-free. */
CM_API uint64_t kvstore_spill_count(kvstore *kv);
/* Name of the spill I/O backend this handle uses ("io_uring", "pread", or "none"). */
CM_API const char *kvstore_io_name(const kvstore *kv);
/* Renew this process's heartbeat (lock-free). */
CM_API void kvstore_heartbeat(kvstore *kv);

/* ---- sequences, blocks, leases ----------------------------------------------------------- */

/* Names a sequence across processes (send it over RPC); gen changes each time the slot is
 * reused, so an old ref never reaches a new sequence. */
typedef struct kvstore_seq_ref {
    uint32_t id;
    uint32_t gen;
} kvstore_seq_ref;

/* A reader's claim on a READY sequence; caller releases with kvstore_lease_release. */
typedef struct kvstore_lease {
    uint32_t slot;
    uint32_t gen;
    kvstore_seq_ref seq;
} kvstore_lease;

/* Create a WRITING sequence owned by this process. With prefix != NULL, the first
 * n_prefix_tblocks token blocks (all layers) of the leased READY sequence are shared into the
 * new one (no copy); they must be full token blocks. */
CM_API int kvstore_seq_create(kvstore *kv, const kvstore_lease *prefix, uint32_t n_prefix_tblocks,
                              kvstore_seq_ref *out, cm_err *err);
/* Allocate (or find again) the block of token block `tb`, layer `layer` of a WRITING sequence
 * of this process; *data points at bytes_per_block bytes to fill, valid until publish/abort.
 * Shared prefix blocks are read-only: -KVSTORE_ESTATE. May spill cold blocks or reap dead
 * processes to make room; -KVSTORE_EFULL if there is none. */
CM_API int kvstore_block_alloc(kvstore *kv, kvstore_seq_ref seq, uint32_t tb, uint32_t layer,
                               void **data, cm_err *err);
/* kvstore_block_alloc + copy of len ≤ bytes_per_block bytes (the rest is zeroed). */
CM_API int kvstore_block_write(kvstore *kv, kvstore_seq_ref seq, uint32_t tb, uint32_t layer,
                               const void *src, size_t len, cm_err *err);
/* Publish: WRITING → READY atomically. n_tokens tokens (tokens may be NULL: no prefix
 * hashes) must be covered: every layer of token blocks 0..ceil(n_tokens/tpb)-1 allocated,
 * else -KVSTORE_EINCOMPLETE. On success *lease (required) holds the sequence for the
 * caller: hand the ref to readers, who take their own leases, then release it. */
CM_API int kvstore_seq_publish(kvstore *kv, kvstore_seq_ref seq, const int32_t *tokens,
                               uint32_t n_tokens, kvstore_lease *lease, cm_err *err);
/* Drop a WRITING sequence of this process and its blocks. */
CM_API int kvstore_seq_abort(kvstore *kv, kvstore_seq_ref seq, cm_err *err);

/* Take a lease on a READY sequence (-KVSTORE_ESTALE if gone, -KVSTORE_ESTATE if WRITING). */
CM_API int kvstore_lease_acquire(kvstore *kv, kvstore_seq_ref seq, kvstore_lease *out,
                                 cm_err *err);
/* Release; the sequence is freed with its last lease. */
CM_API int kvstore_lease_release(kvstore *kv, const kvstore_lease *lease, cm_err *err);

typedef struct kvstore_seq_info {
    kvstore_seq_ref ref;
    uint32_t state;           /* enum kvstore_seq_state */
    uint32_t n_tokens;        /* set at publish */
    uint32_t n_tblocks;       /* token blocks with at least one layer allocated */
    uint32_t n_prefix_tblocks;/* shared from another sequence at create */
    uint32_t n_leases;
    int32_t owner_pid;        /* writer (WRITING) */
    uint64_t age_ms;          /* since create */
} kvstore_seq_info;

enum kvstore_seq_state {
    KVSTORE_SEQ_FREE = 0,
    KVSTORE_SEQ_WRITING = 1,
    KVSTORE_SEQ_READY = 2,
    KVSTORE_SEQ_FREEING = 3, /* transient, under the lock */
};
CM_API const char *kvstore_seq_state_name(uint32_t state);

/* Snapshot of the non-free sequences: fills up to max entries, *n_out = how many exist. */
CM_API int kvstore_seq_list(kvstore *kv, kvstore_seq_info *out, uint32_t max, uint32_t *n_out,
                            cm_err *err);
CM_API int kvstore_seq_get_info(kvstore *kv, kvstore_seq_ref seq, kvstore_seq_info *out,
                                cm_err *err);

/* Copy one block of a leased sequence into dst (bytes_per_block bytes), from RAM or the
 * spill file, validated against concurrent moves. Synchronous. */
CM_API int kvstore_block_read(kvstore *kv, const kvstore_lease *lease, uint32_t tb, uint32_t layer,
                              void *dst, cm_err *err);

/* ---- prefix reuse ------------------------------------------------------------------------ */

/* Chained hashes of the full token blocks of tokens[0..n): out[i] covers tokens
 * [0, (i+1)*tpb) and the fingerprint. Returns the number of hashes written (n / tpb, at most
 * max_out). Never returns 0 as a hash value. */
CM_API uint32_t kvstore_prefix_hashes(uint64_t fingerprint, uint32_t tokens_per_block,
                                      const int32_t *tokens, uint32_t n_tokens, uint64_t *out,
                                      uint32_t max_out);
/* Find the READY sequence sharing the most full token blocks with tokens[0..n) and lease it:
 * *n_tblocks = token blocks that match (≥ 1). -KVSTORE_ENOTFOUND if none does. */
CM_API int kvstore_prefix_lookup(kvstore *kv, const int32_t *tokens, uint32_t n_tokens,
                                 kvstore_lease *lease, uint32_t *n_tblocks, cm_err *err);

/* ---- maintenance ------------------------------------------------------------------------- */

typedef struct kvstore_gc_result {
    uint32_t owners_reaped;   /* dead processes removed */
    uint32_t leases_released; /* their leases */
    uint32_t seqs_freed;      /* sequences freed (unpublished of dead writers + unleased) */
    uint32_t moves_cancelled; /* spill moves of dead processes undone */
} kvstore_gc_result;

/* Reap dead processes (pid gone or restarted, or heartbeat older than the lease TTL), then
 * rebuild the derived tables (free lists, reference and lease counts) from the sequences and
 * leases. */
CM_API int kvstore_gc(kvstore *kv, kvstore_gc_result *res, cm_err *err);

/* Full consistency check (read-only): reference counts match the manifests, free lists hold
 * exactly the free blocks and slots, lease counts match the lease table. */
CM_API int kvstore_check(kvstore *kv, cm_err *err);

typedef struct kvstore_stats {
    kvstore_geometry geom;
    uint32_t n_ram_blocks, n_spill_blocks, max_seqs, max_leases, max_owners;
    uint32_t max_blocks_per_seq;
    uint64_t lease_ttl_ms;
    uint64_t segment_bytes;
    /* blocks (logical): */
    uint32_t blocks_used;     /* referenced by at least one sequence */
    uint32_t blocks_shared;   /* referenced by two or more */
    uint32_t blocks_ram;      /* used and resident in RAM */
    uint32_t blocks_spilled;  /* used and in the spill file */
    uint32_t blocks_moving;   /* being written to the spill file */
    uint32_t ram_free;        /* free RAM slots */
    uint32_t spill_free;      /* free spill slots */
    /* tables: */
    uint32_t seqs_writing, seqs_ready, seqs_freeing;
    uint32_t leases;
    uint32_t owners;
    /* counters since create: */
    uint64_t n_alloc, n_free, n_spill_out, n_spill_in, n_lock_recoveries, n_owners_reaped;
    uint64_t n_published, n_prefix_hits;
} kvstore_stats;

CM_API int kvstore_get_stats(kvstore *kv, kvstore_stats *st, cm_err *err);

/* ---- paging (asynchronous copies to consumers) ------------------------------------------- */

typedef struct kvstore_copy {
    uint32_t tb;     /* token block */
    uint32_t layer;
    void *dst;       /* bytes_per_block bytes (CPU memory) */
    int status;      /* out: 0 or a negative code */
} kvstore_copy;

typedef struct kvstore_batch kvstore_batch;
typedef void (*kvstore_batch_done_fn)(kvstore_batch *b, void *user);

/* One request: caller-owned, untouched by the caller from submit until done. */
struct kvstore_batch {
    kvstore_lease lease;       /* sequence to copy from (held by the caller throughout) */
    kvstore_copy *copies;
    uint32_t n_copies;
    kvstore_batch_done_fn done; /* (optional) called on the pager thread when finished */
    void *user;
    int status;                 /* out: 0, or the first failing copy's code */
    /* private to the pager: */
    int state_;
    kvstore_batch *next_;
};

typedef struct kvstore_pager kvstore_pager;

/* A pager owns one worker thread and one I/O ring. Free with kvstore_pager_free (waits for
 * submitted batches). */
CM_API int kvstore_pager_init(kvstore *kv, kvstore_pager **out, cm_err *err);
CM_API void kvstore_pager_free(kvstore_pager *pg);
/* Queue a batch; returns at once. */
CM_API int kvstore_pager_submit(kvstore_pager *pg, kvstore_batch *b);
/* Wait until b is done (timeout_ms < 0: forever). Returns b->status, or -ETIMEDOUT. */
CM_API int kvstore_pager_wait(kvstore_pager *pg, kvstore_batch *b, int timeout_ms);

/* ---- CUDA destination (kvstore-cuda.c; only in builds with IHIP_HAVE_CUDA) ------------------- */

/* Copies into GPU memory: RAM-tier blocks go by cudaMemcpyAsync straight from the segment
 * (registered with cudaHostRegister, so the DMA engine reads it at bus speed); spill-tier
 * blocks are read (io_uring, registered buffers) into pinned staging buffers first. Every
 * copy is validated against concurrent moves when it has completed (kvstore_cuda_wait); a
 * block that moved is copied again synchronously. One kvstore_cuda per stream user; not
 * thread-safe. For many small blocks prefer a gather kernel reading the registered segment
 * (DESIGN.md: one cudaMemcpyAsync per 2 KiB block runs at under 1 GB/s). */
typedef struct kvstore_cuda kvstore_cuda;

/* Register kv's RAM pool and allocate n_staging pinned staging blocks (≥ 1). */
CM_API int kvstore_cuda_init(kvstore *kv, uint32_t n_staging, kvstore_cuda **out, cm_err *err);
/* Unregister and free (waits for outstanding copies). */
CM_API void kvstore_cuda_free(kvstore_cuda *c);
/* Queue copies of (tb, layer) blocks of the leased sequence to device pointers copies[i].dst
 * on `stream` (a cudaStream_t). Returns once all are queued; copies[i].status is final only
 * after kvstore_cuda_wait. The lease must be held until then. */
CM_API int kvstore_cuda_page(kvstore_cuda *c, const kvstore_lease *lease, kvstore_copy *copies,
                             uint32_t n, void *stream, cm_err *err);
/* Wait for the queued copies, validate them, redo the ones whose block moved. Returns 0 or
 * the first failing copy's code. */
CM_API int kvstore_cuda_wait(kvstore_cuda *c, cm_err *err);
/* The device address (for kernels that read host memory over the bus) of block (tb, layer) of
 * a leased sequence, when it is in the RAM tier: the segment pool is registered by
 * kvstore_cuda_init. -KVSTORE_ESTATE when the block is in the spill tier (read it with the pager
 * into memory of your own). The address stays valid while the lease is held and the block is not
 * spilled: a decode worker that reads blocks in place keeps the RAM tier large enough for the
 * sequences it serves (the store spills least-recently-used blocks only under pressure). */
CM_API int kvstore_cuda_block_addr(kvstore_cuda *c, const kvstore_lease *lease, uint32_t tb,
                                   uint32_t layer, uint64_t *dev_addr, cm_err *err);

/* The device addresses of every block of the first n_tb token blocks of a leased sequence, for
 * kernels that read host memory over the bus: addr[layer * n_tb + tb]. RAM-tier blocks are read
 * in place (kvstore_cuda_block_addr); blocks in the spill tier are read back (a pager: io_uring,
 * validated against concurrent moves) into one pinned, GPU-mapped buffer allocated here, at most
 * max_stage_bytes (else -ENOSPC), and their addresses point into it. *staging: that buffer
 * (NULL when nothing was spilled; keep it while the addresses are used, then
 * kvstore_cuda_staging_free); *n_staged: blocks read back. Synchronous. */
CM_API int kvstore_cuda_seq_addrs(kvstore_cuda *c, const kvstore_lease *lease, uint32_t n_tb,
                                  uint64_t *addr, uint64_t max_stage_bytes, void **staging,
                                  uint32_t *n_staged, cm_err *err);
CM_API void kvstore_cuda_staging_free(void *staging);
/* After kvstore_cuda_seq_addrs (addr, staging and n_staged as it returned them): 0 when every
 * block it resolved in the RAM tier is still there, at the same address; -EAGAIN with a message
 * when one has moved to the spill tier since (its RAM slot may hold other data now, so what was
 * read from it is void). Blocks read into the staging cannot move. Cost: one lookup per block;
 * call it when kvstore_spill_count has changed. */
CM_API int kvstore_cuda_seq_check(kvstore_cuda *c, const kvstore_lease *lease, uint32_t n_tb,
                                  const uint64_t *addr, void *staging, uint32_t n_staged,
                                  cm_err *err);

#ifdef __cplusplus
}
#endif
#endif /* KVSTORE_H */
