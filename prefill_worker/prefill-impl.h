/*
 * prefill-impl.h — internals of the prefill worker (ihip-prefill-worker), shared by
 * prefill-main.c (configuration, start-up, signals, shutdown) and prefill-service.c (the
 * Prefiller.Prefill service: admission, the per-context worker threads, the kvstore writes and
 * the hand-over of published sequences).
 */
#ifndef PREFILL_IMPL_H
#define PREFILL_IMPL_H

#include "base/cm.h"
#include "hip/hip.h"
#include "kvstore-kvcache.h"
#include "kvstore.h"
#include "model/model.h"
#include "rpc/rpc.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* Every setting of the worker; one row of prefill-main.c's table each. */
typedef struct prefill_config {
    const char *model;        /* GGUF path */
    const char *listen;       /* ADDR:PORT (port 0 = ephemeral) */
    const char *kv_name;      /* segment name */
    const char *kv_dir;       /* segment directory */
    bool kv_create;           /* create the segment (geometry from the model) if missing */
    long kv_blocks;           /* (create) RAM blocks */
    long kv_block_tokens;     /* (create) tokens per block */
    long kv_max_seqs;         /* (create) sequence table size */
    long threads;             /* CPU threads per context */
    long rpc_threads;         /* RPC threads (completion queues) */
    long ctx;                 /* KV capacity of each context in tokens (0 = trained length) */
    long chunk;               /* prefill chunk in tokens; K/V is stored after each chunk */
    const char *attention;    /* "dense" or "hip" (worker default) */
    const char *hip_preset;   /* default HiP preset */
    const char *hip_config;   /* default HiP JSON (text or path) */
    long max_prompt_tokens;   /* longer prompts: RESOURCE_EXHAUSTED (0 = ctx) */
    long max_concurrent;      /* prefills at once = contexts = worker threads */
    long retry_delay_ms;      /* retry-delay-ms sent with RESOURCE_EXHAUSTED */
    long grace_ms;            /* shutdown grace for calls in flight */
    long handoff_ms;          /* how long the publish lease is kept for the decode worker */
    long kv_type;             /* 1 = f16 cache (default), 0 = f32 */
    bool verbose;
} prefill_config;

/* One Prefill call, from admission to its status. */
typedef struct prefill_job {
    rpc_call *call;           /* referenced while the job lives */
    int32_t *tokens;          /* [n_tokens] (malloc) */
    uint32_t n_tokens;
    bool no_prefix_reuse, return_logits;
    uint32_t progress_interval_ms;
    uint32_t reserve_decode_tokens; /* blocks for these must be free at admission */
    bool dense;               /* effective attention: dense, or HiP with hc */
    hip_config *hc;           /* (malloc) when !dense */
    char digest[64];          /* attention digest (equal digests = equal configuration) */
    char request_id[64];
    uint64_t t_arrive;        /* cm_time_ns at admission */
    int code;                 /* status to finish with (enum rpc_code; -1 = none yet) */
    char msg[256];            /* its message */
    struct prefill_job *next;
} prefill_job;

/* A published sequence whose lease the worker still holds for the decode worker. */
typedef struct prefill_handoff {
    kvstore_lease lease;
    uint64_t expires_ns;
} prefill_handoff;

/* A context slot: one mdl_ctx and the thread that runs its jobs. */
typedef struct prefill_slot {
    struct prefill_worker *w;
    int index;
    mdl_ctx *ctx;
    char digest[64];          /* attention configuration currently set on ctx */
    pthread_t thread;
    bool started;
} prefill_slot;

/* The worker's state (one per process). */
typedef struct prefill_worker {
    prefill_config cfg;
    rpc_server *server;
    mdl_model *model;
    uint64_t fingerprint;
    char fingerprint_hex[24];
    kvstore *kv;
    char kv_path[512];        /* segment file path (KvHandle.segment) */
    hip_config default_hc;    /* worker default HiP configuration */
    bool default_dense;
    char default_digest[64];
    int64_t n_ctx;            /* tokens per context */
    prefill_slot *slots;      /* [max_concurrent] */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    prefill_job *queue_head, *queue_tail; /* admitted, not yet started (under mu) */
    int n_admitted;           /* queued + running (under mu) */
    atomic_bool ready;        /* model, store and contexts up */
    atomic_bool stopping;     /* shutdown: cancel everything */
    prefill_handoff *handoffs; /* (under mu) */
    int n_handoffs, cap_handoffs;

    /* counters (under mu) */
    uint64_t n_ok, n_failed, n_cancelled, n_rejected, tokens_computed, tokens_cached;
} prefill_worker;

/* The Prefill method table entry (handler + cancel hook), user = the worker. */
void prefill_service_method(prefill_worker *w, rpc_method *out);
/* Start the context threads (after model, store and contexts are ready). */
int prefill_service_start(prefill_worker *w, cm_err *err);
/* Cancel queued and running jobs, join the threads (call after setting w->stopping). */
void prefill_service_stop(prefill_worker *w);
/* Release hand-over leases that expired (all of them with `all`). */
void prefill_handoff_reap(prefill_worker *w, bool all);
/* The effective attention for overrides (NULL: the worker default): fills dense / hc / digest.
 * *hc_out is malloc'd when !dense (caller frees). Returns 0 or -EINVAL with err set. */
int prefill_attention_resolve(const prefill_worker *w, const char *preset, const char *config_json,
                              int using_extend /* -1 unset, 0, 1 */, bool *dense,
                              hip_config **hc_out, char *digest, size_t digest_cap, cm_err *err);

#endif /* PREFILL_IMPL_H */
