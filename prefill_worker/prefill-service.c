/*
 * prefill-service.c — the Prefiller.Prefill service of ihip-prefill-worker.
 *
 * Admission runs on the RPC thread and never blocks: it validates the request
 * (INVALID_ARGUMENT, FAILED_PRECONDITION for another segment or model), enforces
 * --max-prompt-tokens and --max-concurrent (RESOURCE_EXHAUSTED with retry-delay-ms), resolves
 * the attention overrides, and queues the job. Each context slot (one context per concurrent
 * prefill) has a thread that takes jobs from the queue and runs them. The flow below is shared;
 * what touches the context is a prefill_backend (prefill-impl.h): the CPU one here (an mdl_ctx,
 * steps as written), or the GPU one of prefill-cuda.c (--device cuda: the prefix bound in place,
 * pages written into blocks by a page sink):
 *
 *   1. prefix reuse: kvstore_prefix_lookup leases the READY sequence sharing the most full token
 *      blocks; the new WRITING sequence adopts those blocks (kvstore_seq_create with the
 *      prefix) and their K/V is loaded into the context's cache (kvstore_kvcache_load), so the
 *      model continues at n_past = cached tokens instead of recomputing them. At least one
 *      token is always computed (the last one gives the logits).
 *   2. chunked prefill (dense or HiP) of the rest: mdl_prefill calls back after every chunk;
 *      the callback writes the chunk's K/V rows of every layer into the sequence
 *      (kvstore_kvcache_store), sends a progress event when one is due, and cancels on client
 *      cancel, deadline or shutdown. Any failure aborts the WRITING sequence, so nothing leaks.
 *   3. publish (READY) and reply with the handle, the decode seed state and timings.
 *
 * Hand-over: the lease that kvstore_seq_publish returns is kept by the worker for --handoff-ms
 * after the reply (a table reaped by the main thread), which covers the decode worker taking
 * its own lease (kvstore_lease_acquire on the handle's sequence id + generation). Then it is
 * released: if the decode worker never came the sequence is freed, else the decode worker's
 * lease keeps it. While held, the sequence also serves as a prefix for the next prompts. If the
 * worker dies, its leases expire with it (kvstore_gc).
 */
#define _POSIX_C_SOURCE 200809L

#include "prefill-impl.h"

#include "infinitehip/v1/prefiller.pb-c.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

typedef Infinitehip__V1__PrefillRequest PrefillReq;

#define PREFILL_SEED_MAGIC 0x44534849u /* "IHSD" */
#define PREFILL_SEED_VERSION 1u
#define PREFILL_SEED_MAX_TAIL 65536u

/* ---- small helpers ---------------------------------------------------------------------------- */

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

/* CRC-32C (Castagnoli), bitwise: the seed state is small. */
static uint32_t crc32c(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= b[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1u)));
    }
    return ~c;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void job_free(prefill_job *j)
{
    if (!j)
        return;
    if (j->call)
        rpc_call_unref(j->call);
    free(j->tokens);
    free(j->hc);
    free(j);
}

/* Record the status the job ends with; slot_main sends it after the accounting, so a client
 * that sees the status can start its next prefill at once (no RESOURCE_EXHAUSTED race). */
static void job_status(prefill_job *j, int code, const char *fmt, ...) CM_PRINTF(3, 4);
static void job_status(prefill_job *j, int code, const char *fmt, ...)
{
    if (j->code >= 0)
        return; /* the first status wins */
    j->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->msg, sizeof(j->msg), fmt, ap);
    va_end(ap);
}

/* ---- attention ------------------------------------------------------------------------------- */

int prefill_attention_resolve(const prefill_worker *w, const char *preset, const char *config_json,
                              int using_extend, bool *dense, hip_config **hc_out, char *digest,
                              size_t digest_cap, cm_err *err)
{
    *hc_out = NULL;
    const char *p = preset && *preset ? preset : NULL;
    const char *js = config_json && *config_json ? config_json : NULL;
    if (!p && !js && using_extend < 0 && w) {
        /* the worker default */
        *dense = w->default_dense;
        if (!*dense) {
            *hc_out = malloc(sizeof(hip_config));
            if (!*hc_out)
                return cm_err_set(err, -ENOMEM, "out of memory");
            memcpy(*hc_out, &w->default_hc, sizeof(hip_config));
        }
        snprintf(digest, digest_cap, "%s", w->default_digest);
        return 0;
    }
    if (p && !strcmp(p, "dense")) {
        if (js)
            return cm_err_set(err, -EINVAL,
                              "attention.config_json: not allowed with preset \"dense\"");
        *dense = true;
        snprintf(digest, digest_cap, "dense");
        return 0;
    }
    hip_config *hc = malloc(sizeof(*hc));
    if (!hc)
        return cm_err_set(err, -ENOMEM, "out of memory");
    memset(hc, 0, sizeof(*hc));
    /* start from the worker's HiP default when the request only adds keys */
    if (!p && w && !w->default_dense)
        memcpy(hc, &w->default_hc, sizeof(*hc));
    else
        hip_config_default(hc);
    cm_err e = {0};
    if (p && hip_config_preset(hc, p, &e) < 0) {
        free(hc);
        return cm_err_set(err, -EINVAL, "attention.preset: %s", e.msg);
    }
    if (js && hip_config_parse(hc, js, &e) < 0) {
        free(hc);
        return cm_err_set(err, -EINVAL, "attention.config_json: %s", e.msg);
    }
    if (using_extend >= 0)
        hc->using_extend = using_extend != 0;
    int n_layer = w && w->model ? (int)w->model->hp.n_layer : 0;
    if (hip_config_validate(hc, n_layer, &e) < 0) {
        free(hc);
        return cm_err_set(err, -EINVAL, "attention: %s", e.msg);
    }
    *dense = false;
    *hc_out = hc;
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    h = fnv1a(h, p ? p : "", p ? strlen(p) + 1 : 1);
    h = fnv1a(h, js ? js : "", js ? strlen(js) + 1 : 1);
    unsigned char ue = (unsigned char)(using_extend + 1);
    h = fnv1a(h, &ue, 1);
    snprintf(digest, digest_cap, "hip:%016" PRIx64, h);
    return 0;
}

/* ---- hand-over leases ------------------------------------------------------------------------ */

static int handoff_add(prefill_worker *w, const kvstore_lease *l)
{
    pthread_mutex_lock(&w->mu);
    if (w->n_handoffs == w->cap_handoffs) {
        int cap = w->cap_handoffs ? 2 * w->cap_handoffs : 16;
        prefill_handoff *n = realloc(w->handoffs, (size_t)cap * sizeof(*n));
        if (!n) {
            pthread_mutex_unlock(&w->mu);
            return -ENOMEM;
        }
        w->handoffs = n;
        w->cap_handoffs = cap;
    }
    w->handoffs[w->n_handoffs].lease = *l;
    w->handoffs[w->n_handoffs].expires_ns =
        cm_time_ns() + (uint64_t)w->cfg.handoff_ms * UINT64_C(1000000);
    w->n_handoffs++;
    pthread_mutex_unlock(&w->mu);
    return 0;
}

void prefill_handoff_reap(prefill_worker *w, bool all)
{
    uint64_t now = cm_time_ns();
    for (;;) {
        kvstore_lease l;
        bool found = false;
        pthread_mutex_lock(&w->mu);
        for (int i = 0; i < w->n_handoffs; i++)
            if (all || w->handoffs[i].expires_ns <= now) {
                l = w->handoffs[i].lease;
                w->handoffs[i] = w->handoffs[--w->n_handoffs];
                found = true;
                break;
            }
        pthread_mutex_unlock(&w->mu);
        if (!found)
            return;
        cm_err err = {0};
        int rc = kvstore_lease_release(w->kv, &l, &err);
        if (rc < 0 && rc != -KVSTORE_ESTALE)
            CM_LOG_WARN("prefill: releasing the hand-over lease of sequence %u: %s",
                        (unsigned)l.seq.id, err.msg);
        else
            CM_LOG_DEBUG("prefill: hand-over lease of sequence %u/%u released",
                         (unsigned)l.seq.id, (unsigned)l.seq.gen);
    }
}

/* ---- one prefill ----------------------------------------------------------------------------- */

static bool job_should_stop(prefill_worker *w, prefill_job *j)
{
    return atomic_load(&w->stopping) || rpc_call_is_cancelled(j->call) ||
           rpc_call_deadline_ms(j->call) <= 0;
}

static void send_progress(prefill_run *r, bool force)
{
    uint64_t now = cm_time_ns();
    uint64_t iv = (uint64_t)(r->j->progress_interval_ms ? r->j->progress_interval_ms : 1000);
    /* half the interval: a chunk that ends just after a missed beat still keeps the gap */
    if (!force && now - r->last_progress_ns < iv * UINT64_C(500000))
        return;
    Infinitehip__V1__PrefillProgress pg = INFINITEHIP__V1__PREFILL_PROGRESS__INIT;
    pg.tokens_done = r->stored;
    pg.tokens_total = r->j->n_tokens;
    pg.cached_tokens = r->cached;
    pg.elapsed_us = (now - r->j->t_arrive) / 1000;
    Infinitehip__V1__PrefillResponse resp = INFINITEHIP__V1__PREFILL_RESPONSE__INIT;
    resp.event_case = INFINITEHIP__V1__PREFILL_RESPONSE__EVENT_PROGRESS;
    resp.progress = &pg;
    /* -EAGAIN (slow reader): skip this beat, the next one goes */
    if (rpc_call_send(r->j->call, &resp.base) == 0)
        r->last_progress_ns = now;
}

int prefill_run_chunk_done(prefill_run *r, uint32_t stored)
{
    r->stored = stored;
    if (job_should_stop(r->w, r->j))
        return 1;
    send_progress(r, false);
    return 0;
}

/* ---- the CPU backend: an mdl_ctx per slot, K/V rows copied into blocks after each chunk ------- */

/* Put the job's attention on the slot's context (a new provider when the digest differs). */
static int cpu_begin(prefill_run *r, cm_err *err)
{
    prefill_slot *s = r->s;
    const prefill_job *j = r->j;
    if (strcmp(s->digest, j->digest) != 0) {
        if (j->dense) {
            mdl_ctx_set_attn(s->ctx, NULL);
        } else {
            mdl_attn attn;
            int rc = hip_attn_provider_init(&attn, r->w->model, j->hc, err);
            if (rc < 0) {
                cm_err_prefix(err, "attention: ");
                return rc;
            }
            mdl_ctx_set_attn(s->ctx, &attn);
        }
        snprintf(s->digest, sizeof(s->digest), "%s", j->digest);
    }
    mdl_ctx_reset(s->ctx);
    r->elem_type = s->ctx->params.kv_type == CPU_KV_F32 ? KVSTORE_DTYPE_F32 : KVSTORE_DTYPE_F16;
    return 0;
}

/* The prefix's rows are copied into the context's cache (kvstore_kvcache_load). */
static int cpu_load_prefix(prefill_run *r, const kvstore_lease *pl, uint32_t n, bool *keep,
                           cm_err *err)
{
    mdl_ctx *c = r->s->ctx;
    int rc = 0;
    *keep = false;
    for (int il = 0; il < (int)c->model->hp.n_layer && rc == 0; il++)
        rc = kvstore_kvcache_load(r->w->kv, pl, (uint32_t)il, 0, n, c->k_cache[il],
                                  c->v_cache[il], c->kv_row_bytes, r->elem_type, err);
    c->n_past = rc == 0 ? n : 0;
    return rc;
}

/* After every chunk of mdl_prefill: store its K/V, report, and decide whether to go on. */
static int cpu_on_chunk(void *user, int64_t done, int64_t total)
{
    (void)total;
    prefill_run *r = user;
    mdl_ctx *c = r->s->ctx;
    uint32_t t0 = r->stored, t1 = r->start + (uint32_t)done;
    CM_ASSERT(t1 >= t0 && (int64_t)t1 == c->n_past);
    for (int il = 0; il < (int)c->model->hp.n_layer && t1 > t0; il++) {
        const unsigned char *k = (const unsigned char *)c->k_cache[il] + (size_t)t0 * c->kv_row_bytes;
        const unsigned char *v = (const unsigned char *)c->v_cache[il] + (size_t)t0 * c->kv_row_bytes;
        int rc = kvstore_kvcache_store(r->w->kv, r->seq, (uint32_t)il, k, v, c->kv_row_bytes,
                                       r->elem_type, t0, t1 - t0, &r->store_err);
        if (rc < 0) {
            r->store_rc = rc;
            return 1;
        }
    }
    return prefill_run_chunk_done(r, t1);
}

static int cpu_compute(prefill_run *r, cm_err *err)
{
    return mdl_prefill(r->s->ctx, r->j->tokens + r->start, (int64_t)(r->j->n_tokens - r->start),
                       NULL, cpu_on_chunk, r, err);
}

static float *cpu_logits(const prefill_run *r)
{
    return r->s->ctx->logits;
}

const prefill_backend prefill_backend_cpu = {
    .name = "cpu",
    .what = "prefill",
    .begin = cpu_begin,
    .load_prefix = cpu_load_prefix,
    .compute = cpu_compute,
    .logits = cpu_logits,
};

/* Build the decode seed state (format 1, little-endian):
 *   u32 magic "IHSD", u32 version, u64 n_past, u64 n_tokens, u64 FNV-1a of the token ids (int32
 *   LE), u32 n_tail, i32 tail[n_tail] = the last min(n_tokens, 65536) token ids. */
static unsigned char *seed_build(const prefill_job *j, size_t *len)
{
    uint32_t n_tail = j->n_tokens < PREFILL_SEED_MAX_TAIL ? j->n_tokens : PREFILL_SEED_MAX_TAIL;
    size_t n = 36 + (size_t)n_tail * 4;
    unsigned char *p = malloc(n);
    if (!p)
        return NULL;
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (uint32_t i = 0; i < j->n_tokens; i++) {
        unsigned char b[4];
        put_u32(b, (uint32_t)j->tokens[i]);
        h = fnv1a(h, b, 4);
    }
    put_u32(p, PREFILL_SEED_MAGIC);
    put_u32(p + 4, PREFILL_SEED_VERSION);
    put_u64(p + 8, j->n_tokens);
    put_u64(p + 16, j->n_tokens);
    put_u64(p + 24, h);
    put_u32(p + 32, n_tail);
    for (uint32_t i = 0; i < n_tail; i++)
        put_u32(p + 36 + 4 * (size_t)i, (uint32_t)j->tokens[j->n_tokens - n_tail + i]);
    *len = n;
    return p;
}

/* Send the result (waiting out a full send queue) and finish OK. */
static void send_result(prefill_worker *w, float *logits, prefill_job *j,
                        kvstore_lease lease, uint32_t cached, uint64_t t_start)
{
    Infinitehip__V1__KvHandle h = INFINITEHIP__V1__KV_HANDLE__INIT;
    h.segment = w->kv_path;
    h.segment_id = kvstore_segment_id(w->kv);
    h.sequence_id = lease.seq.id;
    h.generation = lease.seq.gen;
    h.n_tokens = j->n_tokens;
    h.n_cached_tokens = cached;
    h.tokens_per_block = kvstore_get_geometry(w->kv)->tokens_per_block;
    h.model_fingerprint = w->fingerprint_hex;
    /* our lease (slot+1, generation): held for --handoff-ms; the decode worker takes its own */
    h.lease_id = ((uint64_t)lease.gen << 32) | ((uint64_t)lease.slot + 1);

    Infinitehip__V1__DecodeSeedState sd = INFINITEHIP__V1__DECODE_SEED_STATE__INIT;
    size_t seed_len = 0;
    unsigned char *seed = seed_build(j, &seed_len);
    uint32_t steps[HIP_MAX_STAGES] = {0};
    sd.format_version = PREFILL_SEED_VERSION;
    sd.data.data = seed;
    sd.data.len = seed ? seed_len : 0;
    sd.size = sd.data.len;
    sd.crc32c = seed ? crc32c(seed, seed_len) : 0;
    sd.n_layer = (uint32_t)w->model->hp.n_layer;
    sd.last_block_pos = (j->n_tokens - 1) / 64 * 64;
    if (!j->dense && j->hc) {
        /* the HiP stage caches are not shipped: every stage refreshes on the first step */
        sd.n_steps_to_refresh = (size_t)j->hc->n_refresh;
        sd.steps_to_refresh = steps;
    }
    sd.attention_digest = j->digest;

    Infinitehip__V1__PrefillResult res = INFINITEHIP__V1__PREFILL_RESULT__INIT;
    res.handle = &h;
    res.seed = &sd;
    if (j->return_logits) {
        res.last_logits.data = (uint8_t *)logits;
        res.last_logits.len = sizeof(float) * (size_t)w->model->hp.n_vocab;
    }
    res.queue_us = (t_start - j->t_arrive) / 1000;
    res.prefill_us = (cm_time_ns() - t_start) / 1000;
    Infinitehip__V1__PrefillResponse resp = INFINITEHIP__V1__PREFILL_RESPONSE__INIT;
    resp.event_case = INFINITEHIP__V1__PREFILL_RESPONSE__EVENT_RESULT;
    resp.result = &res;
    int rc;
    while ((rc = rpc_call_send(j->call, &resp.base)) == -EAGAIN && !atomic_load(&w->stopping))
        sleep_ms(2);
    free(seed);
    if (rc == 0)
        job_status(j, RPC_OK, "%s", "");
    else if (rc == -EAGAIN)
        job_status(j, RPC_UNAVAILABLE, "worker shutting down");
    else
        job_status(j, RPC_CANCELLED, "the call ended before the result was sent");
}

/* The status for a job that stopped early. */
static void fail_stopped(prefill_worker *w, prefill_job *j, const char *what)
{
    if (atomic_load(&w->stopping))
        job_status(j, RPC_UNAVAILABLE, "prefill worker shutting down (%s)", what);
    else if (rpc_call_deadline_ms(j->call) <= 0)
        job_status(j, RPC_DEADLINE_EXCEEDED, "deadline exceeded during prefill (%s)",
                        what);
    else
        job_status(j, RPC_CANCELLED, "prefill cancelled (%s)", what);
}

/* A kvstore error → status (the one place these are mapped). */
static void fail_kv(prefill_worker *w, prefill_job *j, int rc, const cm_err *err)
{
    if (rc == -KVSTORE_EFULL) {
        rpc_call_set_retry_delay(j->call, w->cfg.retry_delay_ms);
        job_status(j, RPC_RESOURCE_EXHAUSTED, "KV store full: %s", err->msg);
    } else if (rc == -KVSTORE_EGEOMETRY) {
        job_status(j, RPC_FAILED_PRECONDITION, "KV store: %s", err->msg);
    } else {
        job_status(j, RPC_INTERNAL, "KV store: %s", err->msg);
    }
}

/* One attempt at the job; r is zeroed by the caller, which releases r->prefix when it is held.
 * Returns true when the job ended OK; false with r->retry when it must run again without prefix
 * reuse (no status set), else false with the job's status set. */
static bool job_run_once(prefill_worker *w, prefill_slot *s, prefill_job *j, prefill_run *r,
                         uint64_t t_start)
{
    const kvstore_geometry *g = kvstore_get_geometry(w->kv);
    const prefill_backend *be = w->be;
    cm_err err = {0};
    int rc;
    if (job_should_stop(w, j)) {
        fail_stopped(w, j, "before start");
        return false;
    }
    r->w = w;
    r->s = s;
    r->j = j;
    if ((rc = be->begin(r, &err)) < 0) {
        job_status(j, rpc_code_from_err(rc), "%s", err.msg);
        return false;
    }
    bool have_seq = false;
    const uint32_t tpb = g->tokens_per_block;

    /* 1. prefix reuse (full blocks only, and never the last token: it gives the logits) */
    if (!j->no_prefix_reuse && j->n_tokens > tpb) {
        kvstore_lease pl;
        uint32_t ntb = 0;
        rc = kvstore_prefix_lookup(w->kv, j->tokens, j->n_tokens, &pl, &ntb, &err);
        if (rc == 0) {
            bool keep = false;
            uint32_t cap = (j->n_tokens - 1) / tpb;
            if (ntb > cap)
                ntb = cap;
            if (ntb > 0 && kvstore_seq_create(w->kv, &pl, ntb, &r->seq, &err) == 0) {
                have_seq = true;
                uint32_t n = ntb * tpb;
                rc = be->load_prefix(r, &pl, n, &keep, &err);
                if (rc == 0) {
                    r->cached = r->stored = n;
                } else {
                    /* cannot read the prefix: recompute everything in a fresh sequence */
                    CM_LOG_WARN("prefill %s: prefix not readable (%s), recomputing",
                                j->request_id, err.msg);
                    kvstore_seq_abort(w->kv, r->seq, NULL);
                    have_seq = false;
                    keep = false;
                }
            }
            if (keep) {
                r->prefix = pl;
                r->have_prefix = true;
            } else {
                kvstore_lease_release(w->kv, &pl, NULL);
            }
        } else if (rc != -KVSTORE_ENOTFOUND) {
            CM_LOG_WARN("prefill %s: prefix lookup: %s", j->request_id, err.msg);
        }
    }
    /* admission by KV blocks: the blocks still to write plus those of reserve_decode_tokens
     * must be free now (a check, not a reservation: concurrent writers may still race) */
    {
        /* decode cannot go past a context like ours: a larger reservation is clamped */
        uint64_t reserve = j->reserve_decode_tokens;
        uint64_t room = (uint64_t)w->n_ctx > j->n_tokens ? (uint64_t)w->n_ctx - j->n_tokens : 0;
        if (reserve > room)
            reserve = room;
        uint64_t tb_total = ((uint64_t)j->n_tokens + reserve + tpb - 1) / tpb;
        uint64_t need = (tb_total - r->cached / tpb) * g->n_layers;
        kvstore_stats st;
        if (tb_total * g->n_layers > UINT32_MAX ||
            (kvstore_get_stats(w->kv, &st, NULL) == 0 &&
             tb_total * g->n_layers > st.max_blocks_per_seq)) {
            if (have_seq)
                kvstore_seq_abort(w->kv, r->seq, NULL);
            job_status(j, RPC_RESOURCE_EXHAUSTED,
                       "%u prompt + %u decode tokens need more blocks than a sequence may have",
                       (unsigned)j->n_tokens, (unsigned)reserve);
            return false;
        }
        if (kvstore_get_stats(w->kv, &st, NULL) == 0 &&
            (uint64_t)st.ram_free + st.spill_free < need) {
            /* dead processes may hold blocks: reap them once before giving up */
            kvstore_gc(w->kv, NULL, NULL);
            if (kvstore_get_stats(w->kv, &st, NULL) == 0 &&
                (uint64_t)st.ram_free + st.spill_free < need) {
                if (have_seq)
                    kvstore_seq_abort(w->kv, r->seq, NULL);
                rpc_call_set_retry_delay(j->call, w->cfg.retry_delay_ms);
                job_status(j, RPC_RESOURCE_EXHAUSTED,
                           "KV store full: %" PRIu64 " blocks needed, %u free", need,
                           (unsigned)(st.ram_free + st.spill_free));
                return false;
            }
        }
    }
    if (!have_seq) {
        rc = kvstore_seq_create(w->kv, NULL, 0, &r->seq, &err);
        if (rc < 0) {
            fail_kv(w, j, rc, &err);
            return false;
        }
        have_seq = true;
    }
    r->start = r->stored;
    send_progress(r, true);

    /* 2. chunked prefill of the rest; the backend stores each chunk */
    rc = be->compute(r, &err);
    if (rc < 0) {
        kvstore_seq_abort(w->kv, r->seq, NULL);
        if (r->retry)
            CM_LOG_WARN("prefill %s: %s; recomputing without prefix reuse", j->request_id,
                        err.msg);
        else if (r->store_rc < 0)
            fail_kv(w, j, r->store_rc, &r->store_err);
        else if (rc == -ECANCELED)
            fail_stopped(w, j, err.msg);
        else
            job_status(j, rpc_code_from_err(rc), "%s: %s", be->what, err.msg);
        return false;
    }

    /* 3. publish and reply */
    kvstore_lease lease;
    rc = kvstore_seq_publish(w->kv, r->seq, j->tokens, j->n_tokens, &lease, &err);
    if (rc < 0) {
        kvstore_seq_abort(w->kv, r->seq, NULL);
        fail_kv(w, j, rc, &err);
        return false;
    }
    if (handoff_add(w, &lease) < 0) {
        kvstore_lease_release(w->kv, &lease, NULL);
        job_status(j, rpc_code_from_err(-ENOMEM), "out of memory");
        return false;
    }
    pthread_mutex_lock(&w->mu);
    w->tokens_computed += j->n_tokens - r->cached;
    w->tokens_cached += r->cached;
    pthread_mutex_unlock(&w->mu);
    CM_LOG_INFO("prefill %s: %u tokens (%u cached) -> sequence %u/%u in %.1f ms%s", j->request_id,
                (unsigned)j->n_tokens, (unsigned)r->cached, (unsigned)lease.seq.id,
                (unsigned)lease.seq.gen, (double)(cm_time_ns() - t_start) / 1e6,
                be == &prefill_backend_cpu ? "" : " (GPU)");
    send_result(w, be->logits(r), j, lease, r->cached, t_start);
    return true;
}

/* Returns true when the job ended OK. A job whose adopted prefix could not be used after all
 * (r.retry) runs once more, without prefix reuse. */
static bool job_run(prefill_worker *w, prefill_slot *s, prefill_job *j)
{
    uint64_t t_start = cm_time_ns();
    for (;;) {
        prefill_run r = {0};
        bool ok = job_run_once(w, s, j, &r, t_start);
        if (r.have_prefix)
            kvstore_lease_release(w->kv, &r.prefix, NULL);
        if (!r.retry)
            return ok;
        if (j->no_prefix_reuse) { /* retry is only asked for when a prefix was adopted */
            job_status(j, RPC_INTERNAL, "prefill: retry asked for without a prefix");
            return false;
        }
        j->no_prefix_reuse = true;
    }
}

static void *slot_main(void *arg)
{
    prefill_slot *s = arg;
    prefill_worker *w = s->w;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->queue_head && !atomic_load(&w->stopping))
            pthread_cond_wait(&w->cv, &w->mu);
        prefill_job *j = w->queue_head;
        if (!j) {
            pthread_mutex_unlock(&w->mu);
            break;
        }
        w->queue_head = j->next;
        if (!w->queue_head)
            w->queue_tail = NULL;
        pthread_mutex_unlock(&w->mu);

        j->code = -1;
        bool ok = job_run(w, s, j);
        if (j->code < 0)
            job_status(j, RPC_INTERNAL, "prefill ended without a status");
        bool cancelled = !ok && rpc_call_is_cancelled(j->call);
        pthread_mutex_lock(&w->mu);
        w->n_admitted--;
        if (ok)
            w->n_ok++;
        else if (cancelled)
            w->n_cancelled++;
        else
            w->n_failed++;
        pthread_mutex_unlock(&w->mu);
        if (j->code == RPC_OK)
            rpc_call_finish(j->call, RPC_OK, NULL);
        else
            rpc_call_finish(j->call, j->code, "%s", j->msg);
        job_free(j);
    }
    return NULL;
}

/* ---- admission (RPC thread) ------------------------------------------------------------------ */

/* kv_segment names our segment: its name, its path, or another path to the same file. */
static bool same_segment(const prefill_worker *w, const char *seg)
{
    if (!strcmp(seg, w->kv_path) || !strcmp(seg, w->cfg.kv_name))
        return true;
    struct stat a, b;
    return stat(seg, &a) == 0 && stat(w->kv_path, &b) == 0 && a.st_dev == b.st_dev &&
           a.st_ino == b.st_ino;
}

static void on_prefill(rpc_call *call, const ProtobufCMessage *msg, void *user)
{
    prefill_worker *w = user;
    const PrefillReq *r = (const PrefillReq *)msg;
    cm_err err = {0};
    if (!atomic_load(&w->ready) || atomic_load(&w->stopping)) {
        rpc_call_finish(call, RPC_UNAVAILABLE,
                        atomic_load(&w->stopping) ? "prefill worker shutting down"
                                                  : "prefill worker not ready (loading)");
        return;
    }
    if (rpc_message_check_utf8(msg, &err) < 0) {
        rpc_call_finish(call, RPC_INVALID_ARGUMENT, "%s", err.msg);
        return;
    }
    if (r->n_token_ids == 0) {
        rpc_call_finish(call, RPC_INVALID_ARGUMENT, "token_ids: empty prompt");
        return;
    }
    int64_t n_vocab = w->model->hp.n_vocab;
    for (size_t i = 0; i < r->n_token_ids; i++)
        if (r->token_ids[i] < 0 || r->token_ids[i] >= n_vocab) {
            rpc_call_finish(call, RPC_INVALID_ARGUMENT,
                            "token_ids[%zu]: %" PRId32 " is not in [0, %" PRId64 ")", i,
                            r->token_ids[i], n_vocab);
            return;
        }
    if (r->n_token_ids > (size_t)w->cfg.max_prompt_tokens) {
        pthread_mutex_lock(&w->mu);
        w->n_rejected++;
        pthread_mutex_unlock(&w->mu);
        rpc_call_set_retry_delay(call, w->cfg.retry_delay_ms);
        rpc_call_finish(call, RPC_RESOURCE_EXHAUSTED,
                        "token_ids: %zu tokens is over the limit of %ld (--max-prompt-tokens)",
                        r->n_token_ids, w->cfg.max_prompt_tokens);
        return;
    }
    if (r->kv_segment_id && r->kv_segment_id != kvstore_segment_id(w->kv)) {
        rpc_call_finish(call, RPC_FAILED_PRECONDITION,
                        "kv_segment_id: this worker's segment %s has id %" PRIu64 ", not %" PRIu64
                        " (another segment with the same path: a worker of another pod/node?)",
                        w->kv_path, kvstore_segment_id(w->kv), (uint64_t)r->kv_segment_id);
        return;
    }
    if (r->kv_segment[0] && !same_segment(w, r->kv_segment)) {
        rpc_call_finish(call, RPC_FAILED_PRECONDITION,
                        "kv_segment: this worker is attached to %s, not %s", w->kv_path,
                        r->kv_segment);
        return;
    }
    if (r->model_fingerprint[0] && strcmp(r->model_fingerprint, w->fingerprint_hex) != 0) {
        rpc_call_finish(call, RPC_FAILED_PRECONDITION,
                        "model_fingerprint: this worker's model is %s, not %s",
                        w->fingerprint_hex, r->model_fingerprint);
        return;
    }
    if (r->attention && r->attention->config_json[0] &&
        r->attention->config_json[strspn(r->attention->config_json, " \t\r\n")] != '{') {
        /* JSON text only: a request must not make the worker open a file (a FIFO would block
         * this RPC thread for good). */
        rpc_call_finish(call, RPC_INVALID_ARGUMENT, "attention.config_json must be a JSON object");
        return;
    }
    prefill_job *j = calloc(1, sizeof(*j));
    if (!j || !(j->tokens = malloc(r->n_token_ids * sizeof(int32_t)))) {
        free(j);
        rpc_call_fail(call, -ENOMEM, "out of memory");
        return;
    }
    const Infinitehip__V1__AttentionOverrides *a = r->attention;
    int ue = -1;
    if (a && a->opt_using_extend_case ==
                 INFINITEHIP__V1__ATTENTION_OVERRIDES__OPT_USING_EXTEND_USING_EXTEND)
        ue = a->using_extend ? 1 : 0;
    if (prefill_attention_resolve(w, a ? a->preset : NULL, a ? a->config_json : NULL, ue,
                                  &j->dense, &j->hc, j->digest, sizeof(j->digest), &err) < 0) {
        job_free(j);
        rpc_call_fail(call, err.code, "%s", err.msg);
        return;
    }
    memcpy(j->tokens, r->token_ids, r->n_token_ids * sizeof(int32_t));
    j->n_tokens = (uint32_t)r->n_token_ids;
    j->no_prefix_reuse = r->no_prefix_reuse;
    j->return_logits = r->return_last_logits;
    j->progress_interval_ms = r->progress_interval_ms;
    j->reserve_decode_tokens = r->reserve_decode_tokens;
    j->t_arrive = cm_time_ns();
    snprintf(j->request_id, sizeof(j->request_id), "%s",
             r->request_id[0] ? r->request_id : "-");

    pthread_mutex_lock(&w->mu);
    if (w->n_admitted >= w->cfg.max_concurrent) {
        w->n_rejected++;
        pthread_mutex_unlock(&w->mu);
        job_free(j);
        rpc_call_set_retry_delay(call, w->cfg.retry_delay_ms);
        rpc_call_finish(call, RPC_RESOURCE_EXHAUSTED,
                        "%ld prefills are running (--max-concurrent)", w->cfg.max_concurrent);
        return;
    }
    rpc_call_ref(call);
    j->call = call;
    w->n_admitted++;
    if (w->queue_tail)
        w->queue_tail->next = j;
    else
        w->queue_head = j;
    w->queue_tail = j;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void prefill_service_method(prefill_worker *w, rpc_method *out)
{
    memset(out, 0, sizeof(*out));
    out->path = "/infinitehip.v1.Prefiller/Prefill";
    out->kind = RPC_KIND_SERVER_STREAM;
    out->request = &infinitehip__v1__prefill_request__descriptor;
    out->handler = on_prefill;
    out->on_cancel = NULL; /* the slot threads poll rpc_call_is_cancelled after every chunk */
    out->user = w;
}

int prefill_service_start(prefill_worker *w, cm_err *err)
{
    for (int i = 0; i < (int)w->cfg.max_concurrent; i++) {
        prefill_slot *s = &w->slots[i];
        if (pthread_create(&s->thread, NULL, slot_main, s) != 0)
            return cm_err_set(err, -EAGAIN, "cannot start context thread %d", i);
        s->started = true;
    }
    return 0;
}

void prefill_service_stop(prefill_worker *w)
{
    pthread_mutex_lock(&w->mu);
    atomic_store(&w->stopping, true);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < (int)w->cfg.max_concurrent; i++)
        if (w->slots && w->slots[i].started) {
            pthread_join(w->slots[i].thread, NULL);
            w->slots[i].started = false;
        }
}
