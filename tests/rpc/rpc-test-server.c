/*
 * rpc-test-server.c — a demo infinitehip.v1 worker over common/rpc, for tests/rpc/test_rpc.py.
 *
 * It serves the real protos with a toy model so the RPC layer can be tested without weights:
 *   Generator.Generate       validates like a worker (INVALID_ARGUMENT, RESOURCE_EXHAUSTED with
 *                            retry-delay-ms), sends one Progress, then streams the prompt's words
 *                            back one per --step-ms from an engine thread (the shape of the real
 *                            decode loop: the engine owns call references, polls cancellation once
 *                            per step, and never waits on gRPC), then a Finished message;
 *   Generator.GenerateStream the same after a client-streamed upload (prompts > 4 MiB);
 *   Generator.Tokenize       splits on white space; ids are a hash of the word;
 *   Generator.ModelInfo      fixed values;
 *   Admin.GetStats           rpc.* counters of the server plus demo.* counters of the engine.
 * Health: everything starts NOT_SERVING and becomes SERVING after --ready-ms; SIGUSR1 sets
 * NOT_SERVING, SIGUSR2 SERVING; SIGINT / SIGTERM shut down cleanly (exit 0).
 *
 * Prints "PORT <n>" on stdout once listening (port 0 = ephemeral).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/cm.h"
#include "infinitehip/v1/admin.pb-c.h"
#include "infinitehip/v1/generator.pb-c.h"
#include "rpc/rpc.h"

typedef Infinitehip__V1__GenerateRequest GenReq;

/* One generation in the engine. */
typedef struct demo_seq {
    rpc_call *call; /* referenced */
    char *text;     /* the prompt (malloc) */
    size_t cursor;  /* where the next word starts */
    uint32_t max_tokens, produced;
    char **stop; /* stop words (malloc) */
    int n_stop;
    uint64_t prompt_tokens;
    uint64_t t_arrive, t_first, t_last, next_at;
    int finish_reason; /* set once the end is reached; Finished is (re)sent until it fits */
    char *stop_hit;    /* the stop word that matched (points into stop[]) */
    char request_id[64];
} demo_seq;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    demo_seq **seqs;
    int n_seqs, cap_seqs;
    bool stop;
    rpc_server *server;
    uint64_t step_ns;
    int max_streams;
    uint64_t max_prompt_words;
    uint64_t t_start;
    /* counters */
    uint64_t n_completed, n_cancelled, n_stalls, n_rejected;
    int64_t last_deadline_ms; /* rpc_call_deadline_ms() of the last Generate (-1: none) */
} demo = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static bool is_space(char c)
{
    return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

static uint64_t count_words(const char *s)
{
    uint64_t n = 0;
    for (bool in = false; *s; s++) {
        bool sp = is_space(*s);
        if (!sp && !in) n++;
        in = !sp;
    }
    return n;
}

static int32_t word_id(const char *w, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)w[i]) * 16777619u;
    return (int32_t)(h % 49152u);
}

static void seq_free(demo_seq *q)
{
    if (!q) return;
    if (q->call) rpc_call_unref(q->call);
    for (int i = 0; i < q->n_stop; i++)
        free(q->stop[i]);
    free(q->stop);
    free(q->text);
    free(q);
}

/* ---- validation (what a real worker checks before admitting) -----------------------------------
 */

static int validate(const GenReq *r, cm_err *e)
{
    const Infinitehip__V1__SamplingParams *sp = r->sampling;
    if (sp) {
        if (sp->opt_temperature_case &&
            (isnan(sp->temperature) || sp->temperature < 0 || sp->temperature > 100))
            return cm_err_set(e, -EINVAL, "sampling.temperature must be in [0, 100], got %g",
                              (double)sp->temperature);
        if (sp->opt_top_k_case && sp->top_k < 0)
            return cm_err_set(e, -EINVAL, "sampling.top_k must be >= 0, got %d", sp->top_k);
        if (sp->opt_top_p_case && !(sp->top_p > 0 && sp->top_p <= 1))
            return cm_err_set(e, -EINVAL, "sampling.top_p must be in (0, 1], got %g",
                              (double)sp->top_p);
        if (sp->opt_min_p_case && !(sp->min_p >= 0 && sp->min_p < 1))
            return cm_err_set(e, -EINVAL, "sampling.min_p must be in [0, 1), got %g",
                              (double)sp->min_p);
    }
    if (r->max_tokens > 4096)
        return cm_err_set(e, -EINVAL, "max_tokens must be <= 4096, got %u", r->max_tokens);
    if (r->n_stop > 16) return cm_err_set(e, -EINVAL, "at most 16 stop strings");
    for (size_t i = 0; i < r->n_stop; i++)
        if (!r->stop[i][0] || strlen(r->stop[i]) > 256)
            return cm_err_set(e, -EINVAL, "stop[%zu] must have 1..256 bytes", i);
    return 0;
}

/* The prompt as one string of words (malloc), or NULL with the reason in e. */
static char *prompt_text(const GenReq *r, cm_err *e)
{
    size_t cap = 64, len = 0;
    char *s = NULL;
    switch (r->prompt_case) {
    case INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_TEXT:
        s = strdup(r->text);
        break;
    case INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_CHAT:
        for (size_t i = 0; i < r->chat->n_messages; i++)
            cap += strlen(r->chat->messages[i]->content) + 1;
        if ((s = malloc(cap)))
            for (size_t i = 0; i < r->chat->n_messages; i++)
                len += (size_t)sprintf(s + len, "%s ", r->chat->messages[i]->content);
        if (s) s[len] = 0;
        break;
    case INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_TOKENS:
        cap += r->tokens->n_ids * 13;
        if ((s = malloc(cap))) {
            s[0] = 0;
            for (size_t i = 0; i < r->tokens->n_ids; i++) {
                if (r->tokens->ids[i] < 0 || r->tokens->ids[i] >= 49152) {
                    free(s);
                    cm_err_set(e, -EINVAL, "tokens.ids[%zu] = %d is out of range", i,
                               r->tokens->ids[i]);
                    return NULL;
                }
                len += (size_t)sprintf(s + len, "t%d ", r->tokens->ids[i]);
            }
        }
        break;
    default:
        cm_err_set(e, -EINVAL, "the prompt is not set");
        return NULL;
    }
    if (!s) cm_err_set(e, -ENOMEM, "out of memory");
    return s;
}

/* ---- Generate ----------------------------------------------------------------------------------
 */

/* Admit a generation (takes `text`). Called on an RPC thread. */
static void start_generation(rpc_call *c, const GenReq *r, char *text)
{
    uint64_t now = cm_time_ns();
    uint64_t words = count_words(text);
    if (words == 0) {
        free(text);
        rpc_call_fail(c, -EINVAL, "the prompt is empty");
        return;
    }
    if (words > demo.max_prompt_words) {
        free(text);
        rpc_call_fail(c, -CM_ELIMIT, "the prompt has %" PRIu64 " tokens, the limit is %" PRIu64,
                      words, demo.max_prompt_words);
        return;
    }
    demo_seq *q = calloc(1, sizeof(*q));
    if (!q || !(q->stop = calloc(r->n_stop + 1, sizeof(char *)))) {
        free(q);
        free(text);
        rpc_call_fail(c, -ENOMEM, "out of memory");
        return;
    }
    q->text = text;
    q->max_tokens = r->max_tokens ? r->max_tokens : 16;
    for (size_t i = 0; i < r->n_stop; i++)
        if ((q->stop[q->n_stop] = strdup(r->stop[i]))) q->n_stop++;
    q->prompt_tokens = words;
    q->t_arrive = now;
    snprintf(q->request_id, sizeof(q->request_id), "%s", r->request_id[0] ? r->request_id : "demo");

    pthread_mutex_lock(&demo.mu);
    if (demo.n_seqs >= demo.max_streams) {
        demo.n_rejected++;
        pthread_mutex_unlock(&demo.mu);
        seq_free(q);
        rpc_call_set_retry_delay(c, 250);
        rpc_call_fail(c, -EAGAIN, "%d sequences are running (the limit)", demo.max_streams);
        return;
    }
    if (demo.n_seqs == demo.cap_seqs) {
        int cap = demo.cap_seqs ? 2 * demo.cap_seqs : 16;
        demo_seq **n = realloc(demo.seqs, (size_t)cap * sizeof(*n));
        if (!n) {
            pthread_mutex_unlock(&demo.mu);
            seq_free(q);
            rpc_call_fail(c, -ENOMEM, "out of memory");
            return;
        }
        demo.seqs = n;
        demo.cap_seqs = cap;
    }
    /* Prefill is instant here: one Progress message says so. */
    Infinitehip__V1__Progress pg = INFINITEHIP__V1__PROGRESS__INIT;
    pg.phase = INFINITEHIP__V1__PROGRESS__PHASE__PHASE_PREFILL;
    pg.prompt_tokens_done = pg.prompt_tokens_total = words;
    Infinitehip__V1__GenerateResponse resp = INFINITEHIP__V1__GENERATE_RESPONSE__INIT;
    resp.event_case = INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_PROGRESS;
    resp.progress = &pg;
    rpc_call_send(c, &resp.base);
    rpc_call_ref(c);
    q->call = c;
    q->next_at = now + demo.step_ns;
    demo.seqs[demo.n_seqs++] = q;
    pthread_cond_signal(&demo.cv);
    pthread_mutex_unlock(&demo.mu);
}

static void on_generate(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    const GenReq *r = (const GenReq *)msg;
    cm_err e = {0};
    int64_t left = rpc_call_deadline_ms(c);
    pthread_mutex_lock(&demo.mu);
    demo.last_deadline_ms = left == INT64_MAX ? -1 : left;
    pthread_mutex_unlock(&demo.mu);
    char *text;
    if (validate(r, &e) < 0 || !(text = prompt_text(r, &e))) {
        rpc_call_fail(c, e.code, "%s", e.msg);
        return;
    }
    start_generation(c, r, text);
}

/* GenerateStream: the header, then chunks, then the half-close starts generation. */
typedef struct upload {
    GenReq *hdr; /* deep copy in the call arena */
    char *buf;
    size_t len, cap;
} upload;

static void upload_free(void *p)
{
    upload *u = p;
    if (u) free(u->buf);
    free(u);
}

static int upload_append(upload *u, const char *s, size_t n)
{
    if (u->len + n + 2 > u->cap) {
        size_t cap = u->cap ? u->cap : 1 << 16;
        while (cap < u->len + n + 2)
            cap *= 2;
        char *b = realloc(u->buf, cap);
        if (!b) return -ENOMEM;
        u->buf = b;
        u->cap = cap;
    }
    memcpy(u->buf + u->len, s, n);
    u->len += n;
    u->buf[u->len] = 0;
    return 0;
}

static void on_generate_stream(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    upload *u = rpc_call_data(c);
    if (!msg) { /* half-close */
        if (!u) {
            rpc_call_fail(c, -EINVAL, "no header was sent");
            return;
        }
        char *text = u->buf ? u->buf : strdup("");
        u->buf = NULL;
        start_generation(c, u->hdr, text);
        return;
    }
    const Infinitehip__V1__GenerateStreamRequest *r =
        (const Infinitehip__V1__GenerateStreamRequest *)msg;
    cm_err e = {0};
    if (r->part_case == INFINITEHIP__V1__GENERATE_STREAM_REQUEST__PART_HEADER) {
        if (u) {
            rpc_call_fail(c, -EINVAL, "header sent twice");
            return;
        }
        if (validate(r->header, &e) < 0) {
            rpc_call_fail(c, e.code, "%s", e.msg);
            return;
        }
        u = calloc(1, sizeof(*u));
        /* Deep copy into the call arena: `msg` only lives until we return. */
        size_t n = protobuf_c_message_get_packed_size(&r->header->base);
        uint8_t *tmp = malloc(n + 1);
        if (u && tmp) {
            protobuf_c_message_pack(&r->header->base, tmp);
            u->hdr = infinitehip__v1__generate_request__unpack(
                rpc_arena_allocator(rpc_call_arena(c)), n, tmp);
        }
        free(tmp);
        if (!u || !u->hdr) {
            upload_free(u);
            rpc_call_fail(c, -ENOMEM, "out of memory");
            return;
        }
        rpc_call_set_data(c, u, upload_free);
        if (r->header->prompt_case == INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_TEXT &&
            upload_append(u, r->header->text, strlen(r->header->text)) < 0)
            rpc_call_fail(c, -ENOMEM, "out of memory");
        return;
    }
    if (!u) {
        rpc_call_fail(c, -EINVAL, "the first message must be the header");
        return;
    }
    if (r->part_case != INFINITEHIP__V1__GENERATE_STREAM_REQUEST__PART_CHUNK ||
        r->chunk->data_case != INFINITEHIP__V1__PROMPT_CHUNK__DATA_TEXT) {
        rpc_call_fail(c, -EINVAL, "the demo accepts text chunks only");
        return;
    }
    if (upload_append(u, r->chunk->text, strlen(r->chunk->text)) < 0)
        rpc_call_fail(c, -ENOMEM, "out of memory");
}

/* ---- the engine --------------------------------------------------------------------------------
 */

/* Send the Finished message; true when it went out (or the call is gone). */
static bool seq_finish(demo_seq *q, uint64_t now)
{
    Infinitehip__V1__Usage usage = INFINITEHIP__V1__USAGE__INIT;
    usage.prompt_tokens = q->prompt_tokens;
    usage.generated_tokens = q->produced;
    Infinitehip__V1__Timings tm = INFINITEHIP__V1__TIMINGS__INIT;
    tm.ttft_us = q->t_first ? (q->t_first - q->t_arrive) / 1000 : 0;
    tm.decode_us = q->t_first ? (q->t_last - q->t_first) / 1000 : 0;
    tm.per_token_us = q->produced > 1 ? (double)tm.decode_us / (q->produced - 1) : 0;
    tm.total_us = (now - q->t_arrive) / 1000;
    Infinitehip__V1__Finished fin = INFINITEHIP__V1__FINISHED__INIT;
    fin.reason = (Infinitehip__V1__FinishReason)q->finish_reason;
    fin.stop_string = q->stop_hit ? q->stop_hit : (char *)(uintptr_t) "";
    fin.usage = &usage;
    fin.timings = &tm;
    fin.request_id = q->request_id;
    Infinitehip__V1__GenerateResponse resp = INFINITEHIP__V1__GENERATE_RESPONSE__INIT;
    resp.event_case = INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_FINISHED;
    resp.finished = &fin;
    int rc = rpc_call_send(q->call, &resp.base);
    if (rc == -EAGAIN) {
        demo.n_stalls++;
        return false;
    }
    rpc_call_finish(q->call, RPC_OK, NULL);
    demo.n_completed++;
    return true;
}

/* One step of one sequence. Returns true when the sequence is done (remove it). */
static bool seq_step(demo_seq *q, uint64_t now)
{
    rpc_call *c = q->call;
    if (rpc_call_is_cancelled(c)) {
        demo.n_cancelled++;
        CM_LOG_INFO("demo: %s cancelled after %u tokens", q->request_id, q->produced);
        return true;
    }
    if (q->finish_reason) return seq_finish(q, now);
    if (now < q->next_at) return false;
    /* The next word, wrapping around the prompt. */
    while (q->text[q->cursor] && is_space(q->text[q->cursor]))
        q->cursor++;
    if (!q->text[q->cursor]) {
        q->cursor = 0;
        while (is_space(q->text[q->cursor]))
            q->cursor++;
    }
    size_t start = q->cursor, n = 0;
    while (q->text[start + n] && !is_space(q->text[start + n]))
        n++;
    char word[4100]; /* longer words are cut (the demo's "token" is at most 4 KiB) */
    snprintf(word, sizeof(word), "%.*s", (int)(n < 4096 ? n : 4096), q->text + start);
    for (int i = 0; i < q->n_stop && !q->stop_hit; i++)
        if (!strcmp(q->stop[i], word)) q->stop_hit = q->stop[i];
    if (q->stop_hit) {
        q->finish_reason = INFINITEHIP__V1__FINISH_REASON__FINISH_REASON_STOP_STRING;
        return seq_finish(q, now);
    }
    char piece[4104];
    snprintf(piece, sizeof(piece), "%s ", word);
    int32_t id = word_id(q->text + start, n);
    Infinitehip__V1__Piece p = INFINITEHIP__V1__PIECE__INIT;
    p.text = piece;
    p.n_token_ids = 1;
    p.token_ids = &id;
    p.index = q->produced;
    Infinitehip__V1__GenerateResponse resp = INFINITEHIP__V1__GENERATE_RESPONSE__INIT;
    resp.event_case = INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_PIECE;
    resp.piece = &p;
    int rc = rpc_call_send(c, &resp.base);
    if (rc == -EAGAIN) { /* slow reader: stall this sequence only */
        demo.n_stalls++;
        return false;
    }
    if (rc < 0) return true; /* finished or cancelled meanwhile */
    q->cursor = start + n;
    q->produced++;
    if (!q->t_first) q->t_first = now;
    q->t_last = now;
    q->next_at = now + demo.step_ns;
    if (q->produced < q->max_tokens) return false;
    q->finish_reason = INFINITEHIP__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    return seq_finish(q, now);
}

static void *engine_main(void *arg)
{
    pthread_mutex_lock(&demo.mu);
    while (!demo.stop) {
        uint64_t now = cm_time_ns();
        for (int i = 0; i < demo.n_seqs;) {
            if (seq_step(demo.seqs[i], now)) {
                seq_free(demo.seqs[i]);
                demo.seqs[i] = demo.seqs[--demo.n_seqs];
            } else {
                i++;
            }
        }
        /* Wake at least every millisecond while work is active (cancellation is noticed within
         * one step), or when new work arrives. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += demo.n_seqs ? 1000000 : 50000000;
        if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
        pthread_cond_timedwait(&demo.cv, &demo.mu, &ts);
    }
    for (int i = 0; i < demo.n_seqs; i++)
        seq_free(demo.seqs[i]);
    demo.n_seqs = 0;
    pthread_mutex_unlock(&demo.mu);
    return NULL;
}

/* ---- unary methods -----------------------------------------------------------------------------
 */

static void on_tokenize(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    const Infinitehip__V1__TokenizeRequest *r = (const Infinitehip__V1__TokenizeRequest *)msg;
    rpc_arena *a = rpc_call_arena(c);
    const char *text;
    Infinitehip__V1__TokenizeResponse resp = INFINITEHIP__V1__TOKENIZE_RESPONSE__INIT;
    if (r->input_case == INFINITEHIP__V1__TOKENIZE_REQUEST__INPUT_TEXT) {
        text = r->text;
    } else if (r->input_case == INFINITEHIP__V1__TOKENIZE_REQUEST__INPUT_CHAT) {
        size_t cap = 1, len = 0;
        for (size_t i = 0; i < r->chat->n_messages; i++)
            cap += strlen(r->chat->messages[i]->role) + strlen(r->chat->messages[i]->content) + 3;
        char *s = rpc_arena_alloc(a, cap);
        if (!s) goto oom;
        s[0] = 0;
        for (size_t i = 0; i < r->chat->n_messages; i++)
            len += (size_t)sprintf(s + len, "%s: %s\n", r->chat->messages[i]->role,
                                   r->chat->messages[i]->content);
        text = resp.rendered = s;
    } else {
        rpc_call_fail(c, -EINVAL, "TokenizeRequest.input is not set");
        return;
    }
    uint64_t n = count_words(text);
    resp.ids = rpc_arena_alloc(a, (n + 1) * sizeof(int32_t));
    resp.pieces = rpc_arena_alloc(a, (n + 1) * sizeof(ProtobufCBinaryData));
    if (!resp.ids || !resp.pieces) goto oom;
    for (const char *p = text; *p;) {
        while (*p && is_space(*p))
            p++;
        size_t k = 0;
        while (p[k] && !is_space(p[k]))
            k++;
        if (!k) break;
        resp.ids[resp.n_ids++] = word_id(p, k);
        if (r->with_pieces) {
            resp.pieces[resp.n_pieces].len = k;
            resp.pieces[resp.n_pieces++].data = (uint8_t *)(uintptr_t)p;
        }
        p += k;
    }
    rpc_call_reply(c, &resp.base);
    return;
oom:
    rpc_call_fail(c, -ENOMEM, "out of memory");
}

static void on_model_info(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    static char *presets[] = {"dense", "fast"};
    static int32_t eog[] = {2};
    Infinitehip__V1__ModelInfoResponse r = INFINITEHIP__V1__MODEL_INFO_RESPONSE__INIT;
    r.model_name = (char *)(uintptr_t) "demo-words";
    r.architecture = (char *)(uintptr_t) "demo";
    r.fingerprint = (char *)(uintptr_t) "demo-0";
    r.n_vocab = 49152;
    r.n_layer = 1;
    r.n_head = r.n_head_kv = 1;
    r.head_dim = r.n_embd = 8;
    r.trained_context = 2048;
    r.max_prompt_tokens = demo.max_prompt_words;
    r.max_new_tokens = 4096;
    r.default_max_tokens = 16;
    r.bos_id = -1;
    r.n_eog_ids = 1;
    r.eog_ids = eog;
    r.n_attention_presets = 2;
    r.attention_presets = presets;
    r.default_attention_preset = presets[1];
    r.backend = (char *)(uintptr_t) "cpu";
    r.version = (char *)(uintptr_t) "0.1.0";
    r.max_message_bytes = 4 << 20;
    rpc_call_reply(c, &r.base);
}

static void on_get_stats(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    const Infinitehip__V1__StatsRequest *req = (const Infinitehip__V1__StatsRequest *)msg;
    rpc_server_stats st;
    rpc_server_stats_get(demo.server, &st);
    pthread_mutex_lock(&demo.mu);
    struct {
        const char *name;
        double v;
        bool counter;
        const char *help;
    } m[] = {
        {"demo.generate_active", demo.n_seqs, false, "sequences in the engine"},
        {"demo.generate_cancelled", (double)demo.n_cancelled, true,
         "sequences the engine dropped because their call was cancelled"},
        {"demo.generate_completed", (double)demo.n_completed, true, "sequences finished"},
        {"demo.generate_rejected", (double)demo.n_rejected, true, "refused: too many sequences"},
        {"demo.send_stalls", (double)demo.n_stalls, true, "steps skipped: send queue full"},
        {"demo.last_deadline_ms", (double)demo.last_deadline_ms, false,
         "time left before the deadline of the last Generate at its arrival (-1: none)"},
        {"rpc.calls_active", (double)st.calls_active, false, "calls not yet freed"},
        {"rpc.calls_cancelled", (double)st.calls_cancelled, true, "calls cancelled"},
        {"rpc.calls_started", (double)st.calls_started, true, "calls delivered to handlers"},
        {"rpc.calls_unimplemented", (double)st.calls_unimplemented, true, "unknown methods"},
        {"rpc.status_invalid_argument", (double)st.by_code[RPC_INVALID_ARGUMENT], true, ""},
        {"rpc.status_ok", (double)st.by_code[RPC_OK], true, "statuses sent"},
        {"rpc.status_resource_exhausted", (double)st.by_code[RPC_RESOURCE_EXHAUSTED], true, ""},
    };
    pthread_mutex_unlock(&demo.mu);
    int n = (int)CM_ARRAY_LEN(m);
    Infinitehip__V1__Metric met[CM_ARRAY_LEN(m)], *metp[CM_ARRAY_LEN(m)];
    Infinitehip__V1__StatsResponse r = INFINITEHIP__V1__STATS_RESPONSE__INIT;
    r.metrics = metp;
    for (int i = 0; i < n; i++) {
        if (strncmp(m[i].name, req->prefix, strlen(req->prefix))) continue;
        infinitehip__v1__metric__init(&met[r.n_metrics]);
        met[r.n_metrics].name = (char *)(uintptr_t)m[i].name;
        met[r.n_metrics].value = m[i].v;
        met[r.n_metrics].counter = m[i].counter;
        met[r.n_metrics].help = (char *)(uintptr_t)m[i].help;
        metp[r.n_metrics] = &met[r.n_metrics];
        r.n_metrics++;
    }
    char cfg[160];
    snprintf(cfg, sizeof(cfg),
             "{\"step_ms\": %.3f, \"max_streams\": %d, \"max_prompt_words\": %" PRIu64 "}",
             (double)demo.step_ns / 1e6, demo.max_streams, demo.max_prompt_words);
    r.worker = (char *)(uintptr_t) "rpc-test-server";
    r.version = (char *)(uintptr_t) "0.1.0";
    r.uptime_ms = (cm_time_ns() - demo.t_start) / 1000000;
    r.config_json = cfg;
    rpc_call_reply(c, &r.base);
}

/* ---- main --------------------------------------------------------------------------------------
 */

static void usage(void)
{
    fprintf(stderr, "usage: rpc-test-server [--addr HOST:PORT] [--threads N] [--step-ms MS]\n"
                    "       [--max-streams N] [--max-prompt-words N] [--ready-ms MS] [-v]\n");
}

int main(int argc, char **argv)
{
    rpc_server_params p = rpc_server_default_params();
    double step_ms = 20;
    long ready_ms = 200;
    demo.max_streams = 4;
    demo.max_prompt_words = 1000000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-v")) {
            cm_log_level = CM_LOG_LEVEL_DEBUG;
            continue;
        }
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "--addr"))
            p.addr = v;
        else if (!strcmp(a, "--threads"))
            p.n_threads = atoi(v);
        else if (!strcmp(a, "--step-ms"))
            step_ms = atof(v);
        else if (!strcmp(a, "--max-streams"))
            demo.max_streams = atoi(v);
        else if (!strcmp(a, "--max-prompt-words"))
            demo.max_prompt_words = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--ready-ms"))
            ready_ms = atol(v);
        else {
            usage();
            return 2;
        }
        i++;
    }
    demo.step_ns = (uint64_t)(step_ms * 1e6);
    demo.t_start = cm_time_ns();

    /* Signals go to sigwait below: block them before any thread (ours or gRPC's) starts. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    const rpc_method methods[] = {
        {"/infinitehip.v1.Generator/Generate", RPC_KIND_SERVER_STREAM,
         &infinitehip__v1__generate_request__descriptor, on_generate, NULL, NULL},
        {"/infinitehip.v1.Generator/GenerateStream", RPC_KIND_BIDI,
         &infinitehip__v1__generate_stream_request__descriptor, on_generate_stream, NULL, NULL},
        {"/infinitehip.v1.Generator/Tokenize", RPC_KIND_UNARY,
         &infinitehip__v1__tokenize_request__descriptor, on_tokenize, NULL, NULL},
        {"/infinitehip.v1.Generator/ModelInfo", RPC_KIND_UNARY,
         &infinitehip__v1__model_info_request__descriptor, on_model_info, NULL, NULL},
        {"/infinitehip.v1.Admin/GetStats", RPC_KIND_UNARY,
         &infinitehip__v1__stats_request__descriptor, on_get_stats, NULL, NULL},
    };
    pthread_t engine;
    if (pthread_create(&engine, NULL, engine_main, NULL) != 0) {
        fprintf(stderr, "rpc-test-server: cannot start the engine thread\n");
        return 1;
    }
    cm_err err = {0};
    int rc = rpc_server_start(&demo.server, &p, methods, (int)CM_ARRAY_LEN(methods), &err);
    if (rc < 0) {
        fprintf(stderr, "rpc-test-server: %s\n", err.msg);
        pthread_mutex_lock(&demo.mu);
        demo.stop = true;
        pthread_cond_signal(&demo.cv);
        pthread_mutex_unlock(&demo.mu);
        pthread_join(engine, NULL);
        return 1;
    }
    printf("PORT %d\n", rpc_server_port(demo.server));
    fflush(stdout);

    /* "Model loading": NOT_SERVING until ready_ms has passed. */
    struct timespec ready = {ready_ms / 1000, (ready_ms % 1000) * 1000000};
    int sig = sigtimedwait(&set, NULL, &ready);
    rpc_health_set(demo.server, "", true);
    rpc_health_set(demo.server, "infinitehip.v1.Generator", true);
    rpc_health_set(demo.server, "infinitehip.v1.Admin", true);
    CM_LOG_INFO("demo: serving");
    for (;; sig = 0) {
        if (sig <= 0 && sigwait(&set, &sig) != 0) continue;
        if (sig == SIGINT || sig == SIGTERM) break;
        rpc_health_set(demo.server, "infinitehip.v1.Generator", sig == SIGUSR2);
        rpc_health_set(demo.server, "", sig == SIGUSR2);
        CM_LOG_INFO("demo: health %s", sig == SIGUSR2 ? "SERVING" : "NOT_SERVING");
    }
    CM_LOG_INFO("demo: shutting down");
    rpc_server_shutdown(demo.server, 500);
    pthread_mutex_lock(&demo.mu);
    demo.stop = true; /* the engine drops its call references */
    pthread_cond_signal(&demo.cv);
    pthread_mutex_unlock(&demo.mu);
    pthread_join(engine, NULL);
    rpc_server_free(demo.server);
    free(demo.seqs);
    CM_LOG_INFO("demo: bye (%" PRIu64 " completed, %" PRIu64 " cancelled)", demo.n_completed,
                demo.n_cancelled);
    return 0;
}
