/*
 * decode-retain.c — keeping finished sequences' K/V in the store (--kv-retain finished).
 *
 * The store holds a sequence as long as someone leases it, and the prefill worker reuses the
 * full token blocks of any READY sequence whose prefix hashes match a new prompt
 * (kvstore_prefix_lookup). The prompt's sequence is published by the prefill worker and only
 * covers the prompt; the generated tokens' K/V lives in this worker's context. When a sequence
 * finishes, this file writes it back so that a follow-up prompt that extends prompt + answer
 * (multi-turn chat) reuses all of it:
 *
 *   new WRITING sequence = the prompt sequence's full token blocks (adopted: shared, no copy)
 *                        + the context's rows of the following full token blocks (written)
 *   published with the token ids → prefix hashes; its lease is kept here ("retained").
 *
 * Only full token blocks are written: prefix lookup matches full blocks only, so a partial
 * last block could never be reused. If the generated tokens complete no new full block, the
 * prompt sequence itself is retained (one more lease on it). The K/V is the decode's own: rows
 * the prefill wrote, then rows decode computed token by token (equal to what a prefill of the
 * same tokens computes up to float summation order, see the README).
 *
 * Retention never blocks new prompts: a write-back that would leave less than a quarter of the
 * pool free is skipped (prefill admission checks free blocks without reserving them), and
 * before each Prefill call the request's worst-case block
 * need is made free by releasing retained sequences, least recently used first (a retained
 * sequence sharing a prefix with the prompt counts as used now, so it goes last). Besides,
 * at most --kv-retain-max-seqs are held, each for at most --kv-retain-ms unused, and one that
 * a newer retained sequence extends (same tokens on its whole length: the next turn of the
 * same chat) is released at once. The leases belong to this process: if it dies, kvstore_gc
 * reaps them like any other.
 *
 * Threads: the scheduler adds, prefill threads make room, both expire; a mutex guards the list;
 * store writes happen outside it.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "decode-impl.h"
#include "kvstore-kvcache.h"

typedef struct retained {
    kvstore_lease lease;
    int32_t *tokens; /* [n_tokens] the ids whose full blocks the sequence holds */
    int64_t n_tokens;
    uint64_t t_used; /* cm_time_ns of the last add / touch */
} retained;

static struct {
    pthread_mutex_t mu;
    retained *v; /* [n], unordered */
    int n, cap;
    decode_retain_stats st;
} R = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* Release entry i (under R.mu); the last entry moves into its place. */
static void drop_locked(int i, uint64_t *counter)
{
    cm_err e = {0};
    if (kvstore_lease_release(decode_g.kv, &R.v[i].lease, &e) < 0)
        CM_LOG_WARN("decode: releasing a retained sequence: %s", e.msg);
    free(R.v[i].tokens);
    R.v[i] = R.v[--R.n];
    (*counter)++;
}

static int oldest_locked(void)
{
    int o = -1;
    for (int i = 0; i < R.n; i++)
        if (o < 0 || R.v[i].t_used < R.v[o].t_used) o = i;
    return o;
}

static bool is_prefix(const int32_t *a, int64_t na, const int32_t *b, int64_t nb)
{
    return na <= nb && memcmp(a, b, sizeof(int32_t) * (size_t)na) == 0;
}

/* Write tokens [from, to) of every layer from the context into the WRITING sequence. */
static int write_rows(kvstore_seq_ref seq, const mdl_ctx *ctx, uint32_t from, uint32_t to,
                      cm_err *e)
{
    for (int il = 0; il < ctx->model->hp.n_layer; il++) {
        const char *k = (const char *)ctx->k_cache[il] + (size_t)from * ctx->kv_row_bytes;
        const char *v = (const char *)ctx->v_cache[il] + (size_t)from * ctx->kv_row_bytes;
        int rc = kvstore_kvcache_store(decode_g.kv, seq, (uint32_t)il, k, v, ctx->kv_row_bytes,
                                       decode_g.kv_elem_type, from, to - from, e);
        if (rc < 0) return rc;
    }
    return 0;
}

void decode_retain_add(const kvstore_lease *prompt, const mdl_ctx *ctx, const int32_t *ids,
                       const char *request_id)
{
    if (!decode_g.retain_on || !decode_g.kv) return;
    uint64_t t0 = cm_time_ns();
    cm_err e = {0};
    const uint32_t tpb = kvstore_get_geometry(decode_g.kv)->tokens_per_block;
    kvstore_seq_info pi;
    if (kvstore_seq_get_info(decode_g.kv, prompt->seq, &pi, &e) < 0) {
        CM_LOG_WARN("decode %s: retain: prompt sequence: %s", request_id, e.msg);
        goto failed;
    }
    /* The context holds ids[0..n_past): the prompt, then every generated token but the last
     * (sampled, never decoded). */
    uint32_t n_full = (uint32_t)(ctx->n_past / tpb);
    uint32_t p_full = pi.n_tokens / tpb;
    if (p_full > n_full) p_full = n_full;
    if (n_full == 0) return; /* shorter than a block: nothing a prefix lookup could use */
    retained r = {.n_tokens = (int64_t)n_full * tpb, .t_used = cm_time_ns()};
    r.tokens = malloc(sizeof(int32_t) * (size_t)r.n_tokens);
    if (!r.tokens) goto failed;
    memcpy(r.tokens, ids, sizeof(int32_t) * (size_t)r.n_tokens);
    bool published = false;
    if (n_full == p_full) {
        /* no new full block: keep the prompt's own sequence */
        if (kvstore_lease_acquire(decode_g.kv, prompt->seq, &r.lease, &e) < 0) {
            CM_LOG_DEBUG("decode %s: retain: lease on the prompt: %s", request_id, e.msg);
            free(r.tokens);
            goto failed;
        }
    } else {
        /* Prefill admission checks free blocks without reserving them: never take the last
         * quarter of the pool, which prompts admitted meanwhile may be about to fill. */
        kvstore_stats ks;
        uint64_t need = (uint64_t)(n_full - p_full) * kvstore_get_geometry(decode_g.kv)->n_layers;
        if (kvstore_get_stats(decode_g.kv, &ks, &e) < 0 ||
            (uint64_t)ks.ram_free + ks.spill_free <
                need + (ks.n_ram_blocks + ks.n_spill_blocks) / 4) {
            CM_LOG_DEBUG("decode %s: retain: skipped, the store is nearly full", request_id);
            free(r.tokens);
            goto failed;
        }
        kvstore_seq_ref seq;
        int rc = kvstore_seq_create(decode_g.kv, p_full ? prompt : NULL, p_full, &seq, &e);
        if (rc == 0) {
            rc = write_rows(seq, ctx, p_full * tpb, n_full * tpb, &e);
            if (rc == 0)
                rc = kvstore_seq_publish(decode_g.kv, seq, ids, n_full * tpb, &r.lease, &e);
            if (rc < 0) kvstore_seq_abort(decode_g.kv, seq, NULL);
        }
        if (rc < 0) {
            /* a full store is normal here: retention is best effort */
            CM_LOG_DEBUG("decode %s: retain: writing %u tokens back: %s", request_id,
                         (unsigned)((n_full - p_full) * tpb), e.msg);
            free(r.tokens);
            goto failed;
        }
        published = true;
    }
    pthread_mutex_lock(&R.mu);
    /* the new sequence extends the ones that are its prefix (earlier turns of this chat) */
    for (int i = 0; i < R.n;) {
        if (is_prefix(R.v[i].tokens, R.v[i].n_tokens, r.tokens, r.n_tokens))
            drop_locked(i, &R.st.n_released_superseded);
        else
            i++;
    }
    while (R.n >= decode_g.cfg.kv_retain_max_seqs && R.n > 0)
        drop_locked(oldest_locked(), &R.st.n_released_cap);
    if (R.n == R.cap) {
        int nc = R.cap ? 2 * R.cap : 16;
        retained *nv = realloc(R.v, sizeof(*nv) * (size_t)nc);
        if (!nv) {
            pthread_mutex_unlock(&R.mu);
            kvstore_lease_release(decode_g.kv, &r.lease, NULL);
            free(r.tokens);
            goto failed;
        }
        R.v = nv;
        R.cap = nc;
    }
    R.v[R.n++] = r;
    if (published) {
        R.st.n_published++;
        R.st.tokens_written += (uint64_t)(n_full - p_full) * tpb;
        R.st.write_us += (cm_time_ns() - t0) / 1000;
    } else {
        R.st.n_reused_prompt++;
    }
    pthread_mutex_unlock(&R.mu);
    CM_LOG_DEBUG("decode %s: retained %" PRId64 " tokens (%u of them adopted from the prompt) "
                 "in %.2f ms",
                 request_id, r.n_tokens, (unsigned)(p_full * tpb),
                 (double)(cm_time_ns() - t0) / 1e6);
    return;
failed:
    pthread_mutex_lock(&R.mu);
    R.st.n_failed++;
    pthread_mutex_unlock(&R.mu);
}

void decode_retain_make_room(const int32_t *tokens, int64_t n, uint64_t need_blocks)
{
    if (!decode_g.kv) return;
    const uint32_t tpb = kvstore_get_geometry(decode_g.kv)->tokens_per_block;
    pthread_mutex_lock(&R.mu);
    uint64_t now = cm_time_ns();
    for (int i = 0; i < R.n; i++) /* shares at least one full block with the prompt */
        if (n >= tpb && R.v[i].n_tokens >= tpb &&
            memcmp(R.v[i].tokens, tokens, sizeof(int32_t) * tpb) == 0)
            R.v[i].t_used = now;
    while (R.n > 0) {
        kvstore_stats st;
        if (kvstore_get_stats(decode_g.kv, &st, NULL) < 0 ||
            (uint64_t)st.ram_free + st.spill_free >= need_blocks)
            break;
        drop_locked(oldest_locked(), &R.st.n_released_pressure);
    }
    pthread_mutex_unlock(&R.mu);
}

void decode_retain_expire(void)
{
    uint64_t ttl_ns = (uint64_t)decode_g.cfg.kv_retain_ms * UINT64_C(1000000);
    pthread_mutex_lock(&R.mu);
    uint64_t now = cm_time_ns();
    for (int i = 0; i < R.n;) {
        if (now - R.v[i].t_used >= ttl_ns)
            drop_locked(i, &R.st.n_released_ttl);
        else
            i++;
    }
    pthread_mutex_unlock(&R.mu);
}

void decode_retain_clear(void)
{
    uint64_t n = 0;
    pthread_mutex_lock(&R.mu);
    while (R.n > 0)
        drop_locked(R.n - 1, &n);
    free(R.v);
    R.v = NULL;
    R.cap = 0;
    pthread_mutex_unlock(&R.mu);
}

void decode_retain_get_stats(decode_retain_stats *out)
{
    pthread_mutex_lock(&R.mu);
    *out = R.st;
    out->n_retained = (uint64_t)R.n;
    pthread_mutex_unlock(&R.mu);
}
