/*
 * prefill-impl.h — internals of the prefill worker (ihip-prefill-worker), shared by
 * prefill-main.c (configuration, start-up, signals, shutdown) and prefill-service.c (the
 * Prefiller.Prefill service: admission, the per-context worker threads, the kvstore writes and
 * the hand-over of published sequences, and the CPU compute backend) and prefill-cuda.c (the GPU
 * compute backend of --device cuda).
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
    long kv_type;             /* 1 = f16 cache (default), 0 = f32 (cpu) */
    uint32_t kv_create_dtype; /* enum kvstore_dtype of a segment made by --kv-create */
    const char *device;       /* "cpu" or "cuda" */
    long gpu;                 /* CUDA device index (--device cuda) */
    long gpu_stage_tokens;    /* --device cuda: prefix staging per layer (0 = max prompt) */
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

/* A context slot: one context (an mdl_ctx, or a cuda_ctx with --device cuda) and the thread
 * that runs its jobs. */
typedef struct prefill_slot {
    struct prefill_worker *w;
    int index;
    mdl_ctx *ctx;             /* (cpu) */
    char digest[64];          /* (cpu) attention configuration currently set on ctx */
    struct prefill_cuda_slot *gpu; /* (cuda) prefill-cuda.c */
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
    const struct prefill_backend *be; /* the compute device of every slot */
    struct prefill_cuda *gpu; /* (cuda) the GPU model and the registered segment pool */

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

/* One job on one slot, on the slot's thread: the state both compute backends share. */
typedef struct prefill_run {
    prefill_worker *w;
    prefill_slot *s;
    prefill_job *j;
    kvstore_seq_ref seq;      /* the WRITING sequence */
    uint32_t start;           /* tokens in the context when the compute began (= cached) */
    uint32_t stored;          /* tokens whose K/V are in the store */
    uint32_t cached;          /* tokens adopted from a READY prefix */
    uint32_t elem_type;       /* (cpu) the context's rows as a kvstore dtype */
    uint64_t last_progress_ns;
    int store_rc;             /* first kvstore error of a chunk callback or page sink */
    cm_err store_err;
    kvstore_lease prefix;     /* the prefix lease, when the backend reads the prefix blocks in
                               * place during the compute (released after the job) */
    bool have_prefix;
    bool retry;               /* the job must run again without prefix reuse (set by compute) */
} prefill_run;

/* A compute device for the slots. Every member is required. The shared job flow
 * (prefill-service.c: job_run) calls begin, then load_prefix when a prefix was adopted, then
 * compute, then reads logits. */
typedef struct prefill_backend {
    const char *name;         /* "cpu" or "cuda" (logs) */
    const char *what;         /* status message prefix of compute errors ("prefill") */
    /* Put the job's attention on the slot's context and empty it. */
    int (*begin)(prefill_run *r, cm_err *err);
    /* Make tokens [0, n) (whole blocks) of the leased READY sequence pl the context's first n
     * tokens. *keep: the context reads the blocks in place during compute, so the lease must be
     * kept until the job ends. On error the job recomputes everything in a fresh sequence (the
     * backend leaves its context empty). */
    int (*load_prefix)(prefill_run *r, const kvstore_lease *pl, uint32_t n, bool *keep,
                       cm_err *err);
    /* Compute tokens [r->start, n_tokens) and put all their K/V into r->seq; calls
     * prefill_run_chunk_done after each chunk (nonzero: stop with -ECANCELED); kvstore errors go
     * to r->store_rc / r->store_err. */
    int (*compute)(prefill_run *r, cm_err *err);
    /* The last token's logits [n_vocab] after a successful compute. */
    float *(*logits)(const prefill_run *r);
} prefill_backend;

extern const prefill_backend prefill_backend_cpu;

/* After a chunk: `stored` tokens are in the store now; checks cancellation / deadline /
 * shutdown (returns 1: stop) and sends a progress event when one is due (returns 0). */
int prefill_run_chunk_done(prefill_run *r, uint32_t stored);

/* --device cuda (prefill-cuda.c). Init: the GPU model, the segment pool registered, one paged
 * cuda_ctx per slot; sets w->be. Builds without CUDA return -CM_EUNSUPPORTED with the reason.
 * Free: everything init made (safe after a failed or no init). */
int prefill_cuda_init(prefill_worker *w, cm_err *err);
void prefill_cuda_free(prefill_worker *w);
/* Whether this build has the CUDA backend. */
bool prefill_cuda_built(void);

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
