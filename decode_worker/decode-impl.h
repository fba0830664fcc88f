/*
 * decode-impl.h — internals shared by the files of the decode worker (ihip-decode-worker).
 *
 * The decode worker is the front door of the service: Generator.Generate arrives here, the
 * prompt's K/V is built by a prefill worker (Prefiller.Prefill) into the node's kvstore segment,
 * and this worker pages it into a per-sequence model context and decodes, streaming tokens.
 *
 *   decode-main.c      configuration table (flags, IHIP_* env, dump), model + store set-up,
 *                      Tokenize / ModelInfo / Admin.GetStats, signals and shutdown;
 *   decode-generate.c  Generate: validation and admission (RPC thread), the per-request
 *                      prefill thread (prefill-worker choice, Prefill call, lease, paging),
 *                      and the scheduler thread that owns every active sequence and advances
 *                      each by one decode step per round (continuous batching; the steps
 *                      of a round go through one batched forward);
 *   decode-retain.c    finished sequences' K/V written back to the store and kept (leased)
 *                      as prefixes for follow-up prompts, released under pressure / by age;
 *   decode-gpu.c       --device cuda: one paged GPU context whose slots read the prompt's
 *                      K/V in place from the segment (bind instead of paging), batched GPU
 *                      decode, offload counters.
 *
 * Threads: RPC threads run handlers (never block); one short-lived "prefill" thread per
 * admitted request (blocking client call to a prefill worker, then loading the blocks); one
 * scheduler thread (all decode steps). The global `decode_g` is written once at start-up,
 * except the fields under `mu`.
 */
#ifndef DECODE_IMPL_H
#define DECODE_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/cm.h"
#include "hip/hip.h"
#include "kvstore.h"
#include "model/model.h"
#include "rpc/rpc.h"
#include "tokenizer/tokenizer.h"

#define DECODE_VERSION "0.1.0"
#define DECODE_MAX_PREFILL 16 /* prefill worker addresses in --prefill */

/* The effective configuration (decode-main.c's table fills it). */
typedef struct decode_config {
    const char *model;
    const char *listen;
    const char *prefill; /* comma-separated list as given */
    const char *kv_name;
    const char *kv_dir;
    int64_t kv_blocks; /* RAM blocks of a segment this worker creates */
    int64_t kv_tpb;    /* tokens per block of a segment this worker creates */
    int64_t threads;   /* CPU threads per sequence context */
    int64_t rpc_threads;
    const char *attention;      /* "dense" or "hip" */
    const char *hip_preset;     /* "" = the HiP default ("fast") */
    const char *hip_config;     /* JSON text or a file holding it; "" = none */
    int64_t max_seqs;           /* sequences admitted at once (prefilling + decoding) */
    int64_t max_kv_bytes;       /* sum of admitted sequences' KV bytes (context caches) */
    int64_t max_tokens_limit;   /* largest GenerateRequest.max_tokens */
    int64_t default_max_tokens; /* max_tokens when a request leaves it 0 */
    int64_t max_prompt_tokens;  /* 0 = ctx - 1 */
    int64_t max_upload_bytes;   /* GenerateStream: prompt bytes uploaded as text / chat */
    int64_t ctx;                /* per-sequence context capacity (prompt + generated) */
    int64_t retry_delay_ms;     /* retry-delay-ms of RESOURCE_EXHAUSTED */
    int64_t health_timeout_ms;  /* health Check of a prefill worker */
    int64_t grace_ms;           /* shutdown grace for in-flight streams */
    int64_t drain_ms;           /* SIGTERM: refuse new calls, let running ones finish this long */
    int64_t prefill_logits;     /* 1: ask Prefill for the last logits; 0: decode the last
                                   prompt token here instead */
    const char *decode_batch;   /* "exact", "fast" or "off": how a round's steps are batched
                                   (mdl_decode_batch exact / fast mode, or one mdl_decode each) */
    const char *kv_retain;      /* "finished" or "none": keep finished sequences' K/V */
    int64_t kv_retain_max_seqs; /* retained sequences at most (oldest released first) */
    int64_t kv_retain_ms;       /* a retained sequence is released after this long unused */
    const char *device;         /* "cpu" or "cuda" (decode-gpu.c) */
    int64_t gpu;                /* CUDA device index */
    int64_t gpu_sa_cache_tokens;   /* K‖V page cache per layer in tokens (< 0: none) */
    int64_t gpu_mask_cache_tokens; /* keys-only page cache per layer in tokens (< 0: none) */
    int64_t gpu_probe_cache_tokens; /* stage-0 probe cache per slot in tokens (0: off) */
    int64_t gpu_tail_tokens; /* GPU ring per slot and layer (0 = max-tokens-limit + 2 blocks) */
    int64_t gpu_spill_max_bytes; /* pinned host staging for one sequence's spilled blocks */
    bool verbose;
} decode_config;

typedef struct decode_global {
    decode_config cfg;
    rpc_server *server;
    mdl_model *model;
    tok_vocab *vocab;
    kvstore *kv;
    char kv_path[512];      /* segment file path (PrefillRequest.kv_segment) */
    char fingerprint[32];   /* ModelInfo.fingerprint: 16 hex digits of the geometry's */
    uint32_t kv_elem_type;  /* row type of our contexts (CPU_KV_F16 = kvstore F16) */
    hip_config hip_default; /* --hip-preset + --hip-config applied */
    char *hip_config_text;  /* --hip-config's JSON text (file read), forwarded to prefill */
    bool hip_on;            /* --attention hip */
    int batch_mode;         /* enum decode_batch_mode (--decode-batch) */
    bool retain_on;         /* --kv-retain finished */
    bool gpu_on;            /* --device cuda */
    int n_prefill;
    char *prefill_addr[DECODE_MAX_PREFILL];
    uint64_t t_start;

    pthread_mutex_t mu;   /* guards everything below */
    pthread_cond_t cv;    /* scheduler wake-up */
    atomic_bool ready;    /* model loaded and store attached */
    atomic_bool stopping; /* shutdown began (read without the lock by the engine threads) */
    atomic_bool draining; /* SIGTERM with --drain-ms: new calls refused, running ones finish */
    unsigned rr;          /* round-robin cursor over prefill_addr */
    int n_admitted;       /* sequences admitted and not yet freed */
    int64_t kv_bytes;     /* their reserved context bytes */
    int n_threads_live;   /* prefill threads running */
    /* counters */
    uint64_t n_completed, n_cancelled, n_failed, n_rejected, n_tokens, n_stalls, n_rounds;
    uint64_t n_prefill_unavailable;
    uint64_t n_batched_steps; /* decode steps that went through mdl_decode_batch (n ≥ 2) */
} decode_global;

enum decode_batch_mode { DECODE_BATCH_OFF = 0, DECODE_BATCH_EXACT = 1, DECODE_BATCH_FAST = 2 };

extern decode_global decode_g;

/* decode-generate.c */
void decode_on_generate(rpc_call *c, const ProtobufCMessage *req, void *user);
/* on_cancel of Generate / GenerateStream: cancels the call's Prefill call at once. */
void decode_on_generate_cancel(rpc_call *c, void *user);
/* GenerateStream (bidi): header, prompt chunks, half-close → the same stream as Generate. */
void decode_on_generate_stream(rpc_call *c, const ProtobufCMessage *req, void *user);
/* Start / stop the scheduler thread (stop: every sequence ends, leases are released). */
int decode_sched_start(cm_err *err);
void decode_sched_stop(void);
/* Active sequences in the scheduler (for stats). */
int decode_sched_active(void);

/* decode-retain.c: finished sequences' K/V kept in the store as prefixes for follow-ups */
typedef struct decode_retain_stats {
    uint64_t n_retained;      /* held now */
    uint64_t n_published;     /* sequences written back (prompt + generated blocks) */
    uint64_t n_reused_prompt; /* retained as the prompt's own sequence (no new full block) */
    uint64_t n_released_pressure, n_released_ttl, n_released_cap, n_released_superseded;
    uint64_t n_failed;        /* write-back failed (store full, ...): nothing retained */
    uint64_t tokens_written;  /* token rows written back (generated, and the prompt's
                                 partial last block) */
    uint64_t write_us;        /* time spent writing them (scheduler thread) */
} decode_retain_stats;
/* After a sequence finished: keep its tokens ids[0..ctx->n_past) in the store — a new sequence
 * adopting the full token blocks of the leased prompt sequence `prompt` plus the context's
 * rows of the following full token blocks, published and leased by this process — so that a
 * later prompt extending it reuses it as a prefix. Best effort: failures are logged and
 * counted, never reported to the client. Called with no lock held. */
void decode_retain_add(const kvstore_lease *prompt, const mdl_ctx *ctx, const int32_t *ids,
                       const char *request_id);
/* Before asking for a prefill of tokens[0..n) needing `need_blocks` free blocks: mark the
 * retained sequences that share a full block with it as used now, then release retained
 * sequences, least recently used first, until that many blocks are free (or none is left). */
void decode_retain_make_room(const int32_t *tokens, int64_t n, uint64_t need_blocks);
/* Release retained sequences unused for longer than --kv-retain-ms. */
void decode_retain_expire(void);
/* Release every retained sequence (shutdown). */
void decode_retain_clear(void);
void decode_retain_get_stats(decode_retain_stats *out);

/* decode-gpu.c: --device cuda. One paged cuda_ctx with --max-seqs slots; every call but
 * decode_gpu_get_stats is made only when decode_g.gpu_on. In a build without CUDA they fail
 * with a message saying so. Errors: 0 or a negative code with err filled (CUDA errors are
 * CUDA_ERR codes, INTERNAL for the client). */
typedef struct decode_gpu_stats {
    uint64_t sa_needed, sa_hits, sa_installs, sa_overflow; /* K‖V cache (block-sparse attention) */
    uint64_t mk_needed, mk_hits, mk_installs, mk_overflow; /* keys cache (mask estimation) */
    uint64_t bytes_h2d;      /* cache installs, host → GPU */
    uint64_t decode_steps;   /* batched decode calls */
    uint64_t tokens_decoded; /* rows of those calls */
    uint64_t binds, tokens_bound; /* sequences bound from the store, their tokens */
    uint64_t failures;       /* decode calls that failed */
    uint64_t kv_bytes;       /* GPU memory of the KV: ring + caches */
    uint64_t model_bytes;    /* GPU memory of the weights */
    uint64_t spill_blocks;   /* spilled prompt blocks read back (io_uring) into pinned staging */
    uint64_t kv_moved;       /* sequences failed: a block read in place was spilled meanwhile */
    uint64_t refresh[4];     /* decode layer-steps by HiP mask work: full refresh, from the
                                stage-1 cache, from the stage-2 cache, mask reused */
    uint64_t steps[4];       /* decode steps by their deepest mask work (same kinds) */
    double step_ms[4];       /* their summed time */
} decode_gpu_stats;
/* Upload the model, register the segment, make the context (needs model, store, attention). */
int decode_gpu_init(cm_err *err);
void decode_gpu_free(void);
/* Bind tokens [0, n_tokens) of the leased sequence to a free slot (*slot); the lease must be
 * held until decode_gpu_release. Blocks in the spill tier are read back (kvstore pager:
 * io_uring) into pinned host staging of the slot, up to --gpu-spill-max-bytes per sequence
 * (-ENOSPC beyond). */
int decode_gpu_bind(const kvstore_lease *lease, int64_t n_tokens, int *slot, cm_err *err);
/* Forget the slot's pages (the lease may be released afterwards) and free the slot. */
void decode_gpu_release(int slot);
/* One decode step of n distinct slots with toks; logits of row i: decode_gpu_logits(i), valid
 * until the next call (scheduler thread only). */
int decode_gpu_decode(int n, const int *slots, const int32_t *toks, cm_err *err);
const float *decode_gpu_logits(int row);
/* After decode_gpu_decode: true (and err set, -EAGAIN) when a block the slot reads in place was
 * moved to the spill tier since it was bound; the slot's last step is void. */
bool decode_gpu_moved(int slot, cm_err *err);
void decode_gpu_get_stats(decode_gpu_stats *out);

/* decode-main.c */
/* KV bytes of a context of n_ctx tokens (K and V of every layer). */
int64_t decode_ctx_bytes(int64_t n_ctx);

#endif /* DECODE_IMPL_H */
