/*
 * rpc-server.c — the gRPC server loop: one completion queue per RPC thread, pre-posted request
 * slots per registered method, generic slots for unknown paths, and the per-call state machine
 * (shared/GRPC-C.md §2, §3, §7).
 *
 * A call's life: its REQUEST slot completes on the thread that posted it (all its later
 * completions come back to that same queue); that thread re-posts a slot for the method, posts
 * RECV_CLOSE_ON_SERVER (the only reliable cancel notice), and dispatches: unary and server
 * streaming requests arrive with the call and are unpacked into the call's arena; client
 * streaming and bidi calls read one message at a time with RECV_MESSAGE.
 *
 * Sends go through pump(), the only place where send batches start: it runs under the call's
 * mutex from whatever thread queued a message or set the status, and again on the RPC thread when
 * the previous send completes. At most one SEND batch is in flight per call, so an engine thread
 * never waits for a slow client; it sees -EAGAIN from rpc_call_send when that call's queue fills.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>

#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "rpc-impl.h"

_Static_assert(RPC_RESOURCE_EXHAUSTED == (int)GRPC_STATUS_RESOURCE_EXHAUSTED, "codes differ");
_Static_assert(RPC_UNAUTHENTICATED == (int)GRPC_STATUS_UNAUTHENTICATED, "codes differ");

/* ---- gRPC's log into cm_log --------------------------------------------------------------------
 */

static void grpc_log_to_cm(gpr_log_func_args *a)
{
    int level = a->severity == GPR_LOG_SEVERITY_ERROR  ? CM_LOG_LEVEL_ERROR
                : a->severity == GPR_LOG_SEVERITY_INFO ? CM_LOG_LEVEL_INFO
                                                       : CM_LOG_LEVEL_DEBUG;
    const char *file = a->file ? strrchr(a->file, '/') : NULL;
    CM_LOG(level, "grpc %s:%d: %s", file ? file + 1 : (a->file ? a->file : "?"), a->line,
           a->message);
}

static pthread_once_t log_once = PTHREAD_ONCE_INIT;
static void log_init_once(void)
{
    gpr_set_log_function(grpc_log_to_cm);
    /* gRPC logs at ERROR only unless GRPC_VERBOSITY says otherwise. */
    if (!getenv("GRPC_VERBOSITY")) gpr_set_log_verbosity(GPR_LOG_SEVERITY_ERROR);
}
void rpc_log_init(void)
{
    pthread_once(&log_once, log_init_once);
}

/* ---- byte buffers ------------------------------------------------------------------------------
 */

int rpc_bb_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *type, rpc_arena *arena,
                  ProtobufCMessage **msg)
{
    grpc_byte_buffer_reader r;
    *msg = NULL;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return -EBADMSG; /* bad compression */
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    /* protobuf-c copies strings and bytes out of the input, so the slice can go right after. */
    *msg = protobuf_c_message_unpack(type, rpc_arena_allocator(arena), GRPC_SLICE_LENGTH(s),
                                     GRPC_SLICE_START_PTR(s));
    /* protobuf-c keeps strings NUL-terminated: one with an embedded NUL would be silently cut
     * ("a\0b" read as "a"). Refuse it instead, looking at the wire bytes. */
    int rc = *msg ? 0 : -EBADMSG;
    if (rc == 0 && rpc_wire_check_strings(GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s), type) < 0)
        rc = -EILSEQ;
    grpc_slice_unref(s);
    return rc;
}

grpc_byte_buffer *rpc_bb_pack(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* ---- calls -------------------------------------------------------------------------------------
 */

static rpc_call *call_new(rpc_worker *w, const rpc_method_rt *m)
{
    rpc_server *s = w->s;
    rpc_call *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->q = calloc((size_t)s->p.max_send_queue, sizeof(*c->q));
    c->arena = rpc_arena_init(0);
    if (!c->q || !c->arena) {
        free(c->q);
        rpc_arena_free(c->arena);
        free(c);
        return NULL;
    }
    c->s = s;
    c->w = w;
    c->method = m;
    c->q_cap = s->p.max_send_queue;
    c->retry_delay_ms = -1;
    atomic_init(&c->refs, 1);
    atomic_init(&c->cancelled, false);
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    c->t_request = (rpc_tag){c, RPC_TAG_REQUEST};
    c->t_close = (rpc_tag){c, RPC_TAG_CLOSE};
    c->t_send = (rpc_tag){c, RPC_TAG_SEND};
    c->t_recv = (rpc_tag){c, RPC_TAG_RECV};
    return c;
}

static void call_destroy(rpc_call *c)
{
    if (c->data_free) c->data_free(c->data);
    for (int i = 0; i < c->q_len; i++)
        grpc_byte_buffer_destroy(c->q[(c->q_head + i) % c->q_cap]);
    if (c->inflight) grpc_byte_buffer_destroy(c->inflight);
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
    if (c->call) grpc_call_unref(c->call);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    rpc_arena_free(c->arena);
    rpc_arena_free(c->msg_arena);
    free(c->status_msg);
    free(c->q);
    pthread_mutex_destroy(&c->mu);
    if (c->id) atomic_fetch_sub(&c->s->n_active, 1); /* only delivered calls count */
    free(c);
}

void rpc_call_ref(rpc_call *c)
{
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
}

void rpc_call_unref(rpc_call *c)
{
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1) call_destroy(c);
}

/* Start a batch under c->mu. On failure (a bug or a dead call) the reference taken for the batch
 * is dropped by the caller. */
static grpc_call_error call_batch_locked(rpc_call *c, const grpc_op *ops, size_t n, rpc_tag *tag)
{
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK)
        CM_LOG_ERROR("rpc: call %" PRIu64 " %s: start_batch failed (%d)", c->id,
                     c->method->m.path ? c->method->m.path : "?", (int)e);
    return e;
}

/* The only place send batches start. Caller holds c->mu. */
static void pump_locked(rpc_call *c)
{
    if (c->send_busy || c->status_sent || atomic_load(&c->cancelled)) return;
    if (c->q_len == 0 && !c->finished) return;
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    if (!c->md_sent) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->q_len > 0) {
        c->inflight = c->q[c->q_head];
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_len--;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->inflight;
    }
    grpc_slice details = grpc_empty_slice();
    grpc_metadata trailer;
    char delay[24];
    bool with_status = c->q_len == 0 && c->finished;
    if (with_status) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = (grpc_status_code)c->status_code;
        if (c->status_msg) {
            details = grpc_slice_from_copied_string(c->status_msg);
            ops[n].data.send_status_from_server.status_details = &details;
        }
        if (c->status_code == RPC_RESOURCE_EXHAUSTED) {
            int64_t ms =
                c->retry_delay_ms >= 0 ? c->retry_delay_ms : c->s->p.default_retry_delay_ms;
            snprintf(delay, sizeof(delay), "%" PRId64, ms);
            memset(&trailer, 0, sizeof(trailer));
            trailer.key = grpc_slice_from_static_string(RPC_RETRY_DELAY_KEY);
            trailer.value = grpc_slice_from_copied_string(delay);
            ops[n].data.send_status_from_server.trailing_metadata_count = 1;
            ops[n].data.send_status_from_server.trailing_metadata = &trailer;
        }
        n++;
    }
    rpc_call_ref(c);
    c->send_busy = true;
    grpc_call_error e = call_batch_locked(c, ops, n, &c->t_send);
    /* gRPC took its own references on the status details and metadata (GRPC-C.md §5.13). */
    grpc_slice_unref(details);
    if (with_status && c->status_code == RPC_RESOURCE_EXHAUSTED) grpc_slice_unref(trailer.value);
    if (e != GRPC_CALL_OK) {
        c->send_busy = false;
        if (c->inflight) grpc_byte_buffer_destroy(c->inflight);
        c->inflight = NULL;
        atomic_fetch_sub(&c->refs, 1); /* cannot be the last: the caller holds one */
        return;
    }
    c->md_sent = true;
    if (with_status) {
        c->status_sent = true;
        atomic_fetch_add(&c->s->by_code[c->status_code], 1);
    }
}

/* Mark the call cancelled (once) and run the method's hook. Called without c->mu. */
static void call_mark_cancelled(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    bool done = c->finished;
    pthread_mutex_unlock(&c->mu);
    if (atomic_exchange(&c->cancelled, true)) return;
    if (done) return; /* the handler had already ended it: nothing to stop */
    atomic_fetch_add(&c->s->n_cancelled, 1);
    CM_LOG_DEBUG("rpc: call %" PRIu64 " %s cancelled", c->id, c->method->m.path);
    if (c->method->m.on_cancel) c->method->m.on_cancel(c, c->method->m.user);
}

int rpc_call_send(rpc_call *c, const ProtobufCMessage *msg)
{
    if (atomic_load(&c->cancelled)) return -ECANCELED;
    grpc_byte_buffer *bb = rpc_bb_pack(msg);
    if (!bb) return -ENOMEM;
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    if (c->finished || atomic_load(&c->cancelled))
        rc = -ECANCELED;
    else if (c->q_len == c->q_cap)
        rc = -EAGAIN;
    else {
        c->q[(c->q_head + c->q_len) % c->q_cap] = bb;
        c->q_len++;
        bb = NULL;
        pump_locked(c);
    }
    pthread_mutex_unlock(&c->mu);
    if (bb) grpc_byte_buffer_destroy(bb);
    return rc;
}

static int call_finish_v(rpc_call *c, int code, const char *fmt, va_list ap)
{
    CM_ASSERT(code >= 0 && code < RPC_CODE_COUNT);
    char *msg = NULL;
    if (fmt) {
        char buf[512];
        vsnprintf(buf, sizeof(buf), fmt, ap);
        msg = strdup(buf);
    }
    pthread_mutex_lock(&c->mu);
    if (c->finished) {
        pthread_mutex_unlock(&c->mu);
        free(msg);
        return -EALREADY;
    }
    c->finished = true;
    c->status_code = code;
    c->status_msg = msg;
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    if (code != RPC_OK)
        CM_LOG_DEBUG("rpc: call %" PRIu64 " %s -> %s: %s", c->id, c->method->m.path,
                     rpc_code_name(code), msg ? msg : "");
    return 0;
}

int rpc_call_finish(rpc_call *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = call_finish_v(c, code, fmt, ap);
    va_end(ap);
    return rc;
}

int rpc_call_fail(rpc_call *c, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = call_finish_v(c, rpc_code_from_err(err), fmt, ap);
    va_end(ap);
    return rc;
}

int rpc_call_reply(rpc_call *c, const ProtobufCMessage *msg)
{
    int rc = rpc_call_send(c, msg);
    if (rc < 0 && rc != -ECANCELED) {
        rpc_call_fail(c, rc, "cannot queue the reply");
        return rc;
    }
    return rc < 0 ? rc : rpc_call_finish(c, RPC_OK, NULL);
}

void rpc_call_set_retry_delay(rpc_call *c, int64_t ms)
{
    pthread_mutex_lock(&c->mu);
    c->retry_delay_ms = ms < 0 ? 0 : ms;
    pthread_mutex_unlock(&c->mu);
}

bool rpc_call_is_cancelled(const rpc_call *c)
{
    return atomic_load(&c->cancelled);
}

bool rpc_call_is_finished(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    bool f = c->finished;
    pthread_mutex_unlock(&c->mu);
    return f;
}

int64_t rpc_call_deadline_ms(const rpc_call *c)
{
    gpr_timespec d = gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(d, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0) return INT64_MAX;
    gpr_timespec left = gpr_time_sub(d, gpr_now(GPR_CLOCK_MONOTONIC));
    return gpr_time_to_millis(left);
}

int rpc_call_queued(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    int n = c->q_len + (c->send_busy ? 1 : 0);
    pthread_mutex_unlock(&c->mu);
    return n;
}

rpc_arena *rpc_call_arena(rpc_call *c)
{
    return c->arena;
}

void rpc_call_set_data(rpc_call *c, void *data, void (*free_fn)(void *))
{
    c->data = data;
    c->data_free = free_fn;
}

void *rpc_call_data(const rpc_call *c)
{
    return c->data;
}
const char *rpc_call_method(const rpc_call *c)
{
    return c->method->m.path;
}
uint64_t rpc_call_id(const rpc_call *c)
{
    return c->id;
}

const char *rpc_call_metadata(rpc_call *c, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *m = &c->md.metadata[i];
        if (GRPC_SLICE_LENGTH(m->key) != kl || memcmp(GRPC_SLICE_START_PTR(m->key), key, kl))
            continue;
        size_t vl = GRPC_SLICE_LENGTH(m->value);
        char *v = rpc_arena_alloc(c->arena, vl + 1);
        if (!v) return NULL;
        memcpy(v, GRPC_SLICE_START_PTR(m->value), vl);
        v[vl] = 0;
        return v;
    }
    return NULL;
}

/* ---- request slots and dispatch ----------------------------------------------------------------
 */

static void post_slot(rpc_worker *w, const rpc_method_rt *m)
{
    rpc_server *s = w->s;
    if (atomic_load(&s->shutting_down)) return;
    rpc_call *c = call_new(w, m);
    if (!c) {
        CM_LOG_ERROR("rpc: out of memory posting a request slot for %s", m->m.path);
        return;
    }
    grpc_call_error e;
    if (m->handle) {
        bool payload = m->m.kind == RPC_KIND_UNARY || m->m.kind == RPC_KIND_SERVER_STREAM;
        e = grpc_server_request_registered_call(s->server, m->handle, &c->call, &c->deadline,
                                                &c->md, payload ? &c->payload : NULL, w->cq, w->cq,
                                                &c->t_request);
    } else {
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, w->cq, w->cq,
                                     &c->t_request);
    }
    if (e != GRPC_CALL_OK) {
        CM_LOG_ERROR("rpc: request slot for %s refused (%d)", m->m.path ? m->m.path : "*", (int)e);
        call_destroy(c);
    }
}

static void post_recv_locked(rpc_call *c)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_buf;
    rpc_call_ref(c);
    if (call_batch_locked(c, &op, 1, &c->t_recv) != GRPC_CALL_OK) atomic_fetch_sub(&c->refs, 1);
}

static void on_request(rpc_worker *w, rpc_call *c, bool ok)
{
    rpc_server *s = w->s;
    if (!ok) { /* the server is shutting down: the slot is returned unused */
        call_destroy(c);
        return;
    }
    post_slot(w, c->method); /* re-arm first so bursts keep finding slots */
    c->id = atomic_fetch_add(&s->next_call_id, 1) + 1;
    atomic_fetch_add(&s->n_active, 1);

    /* The cancel notice: completes when the call ends, with close_cancelled set if it ended
     * by cancellation, deadline or disconnect. */
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    pthread_mutex_lock(&c->mu);
    rpc_call_ref(c);
    if (call_batch_locked(c, &op, 1, &c->t_close) != GRPC_CALL_OK) atomic_fetch_sub(&c->refs, 1);
    pthread_mutex_unlock(&c->mu);

    const rpc_method *m = &c->method->m;
    if (!c->method->handle) {
        atomic_fetch_add(&s->n_unimplemented, 1);
        char path[256];
        size_t n = GRPC_SLICE_LENGTH(c->details.method);
        if (n >= sizeof(path)) n = sizeof(path) - 1;
        memcpy(path, GRPC_SLICE_START_PTR(c->details.method), n);
        path[n] = 0;
        CM_LOG_DEBUG("rpc: unknown method %s", path);
        rpc_call_finish(c, RPC_UNIMPLEMENTED, "unknown method %s", path);
    } else if (m->kind == RPC_KIND_UNARY || m->kind == RPC_KIND_SERVER_STREAM) {
        atomic_fetch_add(&s->n_started, 1);
        ProtobufCMessage *req = NULL;
        cm_err err = {0};
        int rc;
        if (!c->payload) {
            rpc_call_finish(c, RPC_INVALID_ARGUMENT, "missing request message");
        } else if ((rc = rpc_bb_unpack(c->payload, m->request, c->arena, &req)) < 0) {
            rpc_call_finish(c, RPC_INVALID_ARGUMENT,
                            rc == -EILSEQ ? "a string field of %s contains a NUL character"
                                          : "malformed %s message",
                            m->request->name);
        } else if (rpc_message_check_utf8(req, &err) < 0) {
            rpc_call_finish(c, RPC_INVALID_ARGUMENT, "%s", err.msg);
        } else {
            grpc_byte_buffer_destroy(c->payload);
            c->payload = NULL;
            m->handler(c, req, m->user);
        }
    } else {
        atomic_fetch_add(&s->n_started, 1);
        pthread_mutex_lock(&c->mu);
        post_recv_locked(c);
        pthread_mutex_unlock(&c->mu);
    }
}

static void on_recv(rpc_call *c, bool ok)
{
    grpc_byte_buffer *bb = c->recv_buf;
    c->recv_buf = NULL;
    const rpc_method *m = &c->method->m;
    if (!ok || atomic_load(&c->cancelled) || rpc_call_is_finished(c)) {
        if (bb) grpc_byte_buffer_destroy(bb);
        return;
    }
    if (!bb) { /* half-close: the client sent everything */
        m->handler(c, NULL, m->user);
        return;
    }
    if (!c->msg_arena)
        c->msg_arena = rpc_arena_init(0);
    else
        rpc_arena_reset(c->msg_arena);
    ProtobufCMessage *req = NULL;
    cm_err err = {0};
    int rc;
    if (!c->msg_arena) {
        rpc_call_finish(c, RPC_RESOURCE_EXHAUSTED, "out of memory");
    } else if ((rc = rpc_bb_unpack(bb, m->request, c->msg_arena, &req)) < 0) {
        rpc_call_finish(c, RPC_INVALID_ARGUMENT,
                        rc == -EILSEQ ? "a string field of %s contains a NUL character"
                                      : "malformed %s message",
                        m->request->name);
    } else if (rpc_message_check_utf8(req, &err) < 0) {
        rpc_call_finish(c, RPC_INVALID_ARGUMENT, "%s", err.msg);
    } else {
        m->handler(c, req, m->user);
    }
    grpc_byte_buffer_destroy(bb);
    pthread_mutex_lock(&c->mu);
    if (!c->finished && !atomic_load(&c->cancelled)) post_recv_locked(c);
    pthread_mutex_unlock(&c->mu);
}

static void on_send(rpc_call *c, bool ok)
{
    pthread_mutex_lock(&c->mu);
    if (c->inflight) grpc_byte_buffer_destroy(c->inflight);
    c->inflight = NULL;
    c->send_busy = false;
    if (ok) pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    if (!ok) call_mark_cancelled(c); /* a failed send means the stream is gone */
}

static void *worker_main(void *arg)
{
    rpc_worker *w = arg;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        rpc_tag *t = ev.tag;
        rpc_call *c = t->call;
        switch (t->kind) {
        case RPC_TAG_REQUEST:
            on_request(w, c, ev.success != 0);
            if (!ev.success) continue; /* destroyed */
            break;
        case RPC_TAG_CLOSE:
            if (c->close_cancelled) call_mark_cancelled(c);
            break;
        case RPC_TAG_SEND:
            on_send(c, ev.success != 0);
            break;
        case RPC_TAG_RECV:
            on_recv(c, ev.success != 0);
            break;
        default:
            CM_ABORT("rpc: bad tag kind %d", t->kind);
        }
        rpc_call_unref(c); /* the slot's or the batch's reference */
    }
    return NULL;
}

/* ---- server life -------------------------------------------------------------------------------
 */

rpc_server_params rpc_server_default_params(void)
{
    rpc_server_params p;
    memset(&p, 0, sizeof(p));
    p.addr = "127.0.0.1:0";
    p.n_threads = 2;
    p.slots_per_method = 8;
    p.max_recv_bytes = 4 << 20;
    p.max_send_queue = 64;
    p.default_retry_delay_ms = 1000;
    p.reflection = true;
    return p;
}

const uint8_t *rpc_descriptor_set(size_t *len)
{
    *len = (size_t)ihip_proto_descriptor_set_len;
    return ihip_proto_descriptor_set;
}

/* "pkg.Service" of "/pkg.Service/Method" (malloc), or NULL if the path is malformed. */
static char *path_service(const char *path)
{
    if (!path || path[0] != '/') return NULL;
    const char *slash = strchr(path + 1, '/');
    if (!slash || slash == path + 1 || !slash[1] || strchr(slash + 1, '/')) return NULL;
    size_t n = (size_t)(slash - path - 1);
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, path + 1, n);
        s[n] = 0;
    }
    return s;
}

static const rpc_method builtin_methods[] = {
    {"/grpc.health.v1.Health/Check", RPC_KIND_UNARY,
     &grpc__health__v1__health_check_request__descriptor, rpc_health_check, NULL, NULL},
    {"/grpc.health.v1.Health/Watch", RPC_KIND_SERVER_STREAM,
     &grpc__health__v1__health_check_request__descriptor, rpc_health_watch, rpc_health_watch_cancel,
     NULL},
    {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", RPC_KIND_BIDI,
     &grpc__reflection__v1__server_reflection_request__descriptor, rpc_reflection_info, NULL, NULL},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", RPC_KIND_BIDI,
     &grpc__reflection__v1__server_reflection_request__descriptor, rpc_reflection_info, NULL, NULL},
};

int rpc_server_start(rpc_server **out, const rpc_server_params *params, const rpc_method *methods,
                     int n_methods, cm_err *err)
{
    *out = NULL;
    rpc_server_params p = params ? *params : rpc_server_default_params();
    if (p.n_threads < 1 || p.n_threads > 64 || p.slots_per_method < 1 || p.max_send_queue < 1 ||
        p.max_recv_bytes < 1024 || !p.addr || n_methods < 0)
        return cm_err_set(err, -EINVAL, "rpc: bad server parameters");
    rpc_log_init();

    rpc_server *s = calloc(1, sizeof(*s));
    if (!s) return cm_err_set(err, -ENOMEM, "rpc: out of memory");
    s->p = p;
    pthread_mutex_init(&s->shutdown_mu, NULL);
    int n_builtin = p.reflection ? 4 : 2;
    s->methods = calloc((size_t)(n_methods + n_builtin), sizeof(*s->methods));
    const char **services = calloc((size_t)(n_methods + n_builtin + 1), sizeof(char *));
    int n_services = 0, n_user_services = 0, rc = 0;
    grpc_init();
    if (!s->methods || !services) {
        rc = cm_err_set(err, -ENOMEM, "rpc: out of memory");
        goto fail;
    }
    for (int i = 0; i < n_methods + n_builtin; i++) {
        const rpc_method *m = i < n_methods ? &methods[i] : &builtin_methods[i - n_methods];
        if (!m->handler || !m->request || m->kind < RPC_KIND_UNARY || m->kind > RPC_KIND_BIDI) {
            rc = cm_err_set(err, -EINVAL, "rpc: method %d is incomplete", i);
            goto fail;
        }
        rpc_method_rt *rt = &s->methods[s->n_methods];
        rt->m = *m;
        rt->service = path_service(m->path);
        if (!rt->service) {
            rc = cm_err_set(err, -EINVAL, "rpc: bad method path '%s'", m->path ? m->path : "");
            goto fail;
        }
        s->n_methods++;
        for (int k = 0; k < s->n_methods - 1; k++)
            if (!strcmp(s->methods[k].m.path, m->path)) {
                rc = cm_err_set(err, -EINVAL, "rpc: method %s registered twice", m->path);
                goto fail;
            }
        int known = 0;
        for (int k = 0; k < n_services; k++)
            known |= !strcmp(services[k], rt->service);
        if (!known) services[n_services++] = rt->service;
        if (i == n_methods - 1) n_user_services = n_services;
    }

    /* Health: "" plus every user service, all NOT_SERVING until told otherwise (health and
     * reflection themselves are not listed: they serve whenever the server runs). */
    rc = rpc_health_init(&s->health, services, n_user_services);
    if (rc < 0) {
        cm_err_set(err, rc, "rpc: out of memory");
        goto fail;
    }
    if (p.reflection) {
        const uint8_t *set = p.descriptor_set;
        size_t set_len = p.descriptor_set_len;
        if (!set) set = rpc_descriptor_set(&set_len);
        rc = rpc_reflection_init(&s->reflection, set, set_len, services, n_services, err);
        if (rc < 0) goto fail;
    }
    for (int i = 0; i < s->n_methods; i++) {
        rpc_method_rt *rt = &s->methods[i];
        if (rt->m.handler == rpc_health_check || rt->m.handler == rpc_health_watch)
            rt->m.user = s->health;
        if (rt->m.handler == rpc_reflection_info) rt->m.user = s->reflection;
    }

    grpc_arg args[4];
    int n_args = 0;
    args[n_args].type = GRPC_ARG_INTEGER; /* a second server on the port must fail, not share */
    args[n_args].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[n_args++].value.integer = 0;
    args[n_args].type = GRPC_ARG_INTEGER;
    args[n_args].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[n_args++].value.integer = p.max_recv_bytes;
    if (p.max_concurrent_streams > 0) {
        args[n_args].type = GRPC_ARG_INTEGER;
        args[n_args].key = (char *)GRPC_ARG_MAX_CONCURRENT_STREAMS;
        args[n_args++].value.integer = p.max_concurrent_streams;
    }
    grpc_channel_args ca = {(size_t)n_args, args};
    s->server = grpc_server_create(&ca, NULL);
    if (!s->server) {
        rc = cm_err_set(err, -ENOMEM, "rpc: grpc_server_create failed");
        goto fail;
    }
    for (int i = 0; i < s->n_methods; i++) {
        rpc_method_rt *rt = &s->methods[i];
        bool payload = rt->m.kind == RPC_KIND_UNARY || rt->m.kind == RPC_KIND_SERVER_STREAM;
        rt->handle = grpc_server_register_method(
            s->server, rt->m.path, NULL,
            payload ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER : GRPC_SRM_PAYLOAD_NONE, 0);
        if (!rt->handle) {
            rc = cm_err_set(err, -EINVAL, "rpc: cannot register %s", rt->m.path);
            goto fail;
        }
    }
    s->generic.m.path = "*";
    s->n_workers = p.n_threads;
    s->workers = calloc((size_t)p.n_threads, sizeof(*s->workers));
    if (!s->workers) {
        rc = cm_err_set(err, -ENOMEM, "rpc: out of memory");
        goto fail;
    }
    for (int i = 0; i < s->n_workers; i++) {
        s->workers[i].s = s;
        s->workers[i].idx = i;
        s->workers[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->workers[i].cq, NULL);
    }
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    s->port = grpc_server_add_http2_port(s->server, p.addr, creds);
    grpc_server_credentials_release(creds);
    if (s->port <= 0) {
        rc = cm_err_set(err, -EADDRINUSE, "rpc: cannot listen on %s", p.addr);
        goto fail;
    }
    grpc_server_start(s->server);
    for (int i = 0; i < s->n_workers; i++) {
        rpc_worker *w = &s->workers[i];
        for (int k = 0; k < p.slots_per_method; k++) {
            for (int m = 0; m < s->n_methods; m++)
                post_slot(w, &s->methods[m]);
            post_slot(w, &s->generic);
        }
    }
    for (int i = 0; i < s->n_workers; i++) {
        if (pthread_create(&s->workers[i].thread, NULL, worker_main, &s->workers[i]) != 0) {
            rc = cm_err_set(err, -EAGAIN, "rpc: cannot start RPC thread %d", i);
            goto fail;
        }
        s->workers[i].started = true;
    }
    free(services);
    CM_LOG_INFO("rpc: listening on %s (port %d), %d methods, %d threads", p.addr, s->port,
                s->n_methods, s->n_workers);
    *out = s;
    return 0;

fail:
    free(services);
    rpc_server_free(s);
    return rc;
}

int rpc_server_port(const rpc_server *s)
{
    return s->port;
}

/* Shut down, drain and destroy a pluck queue (next() must not be used on those). */
static void pluck_cq_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
}

void rpc_server_shutdown(rpc_server *s, int64_t grace_ms)
{
    pthread_mutex_lock(&s->shutdown_mu);
    if (s->shut_down || !s->server) {
        pthread_mutex_unlock(&s->shutdown_mu);
        return;
    }
    atomic_store(&s->shutting_down, true);
    if (s->health) {
        rpc_health_set_all(s->health, false); /* load balancers stop sending first */
        rpc_health_end_watches(s->health);
    }
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    int tag;
    grpc_server_shutdown_and_notify(s->server, cq, &tag);
    gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                   gpr_time_from_millis(grace_ms > 0 ? grace_ms : 0, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_pluck(cq, &tag, dl, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        grpc_server_cancel_all_calls(s->server);
        ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    }
    pluck_cq_destroy(cq);
    s->shut_down = true;
    pthread_mutex_unlock(&s->shutdown_mu);
}

void rpc_server_free(rpc_server *s)
{
    if (!s) return;
    bool any_started = false;
    for (int i = 0; i < s->n_workers; i++)
        any_started |= s->workers[i].started;
    if (s->server) {
        if (s->port > 0 && any_started)
            rpc_server_shutdown(s, 0);
        else {
            /* Failed start: nothing is running; still shut down before destroying. */
            atomic_store(&s->shutting_down, true);
            if (s->port > 0) {
                grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
                int tag;
                grpc_server_shutdown_and_notify(s->server, cq, &tag);
                grpc_server_cancel_all_calls(s->server);
                grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
                pluck_cq_destroy(cq);
            }
        }
    }
    /* Workers keep draining their queues (slots come back with ok=0) until shut down. */
    for (int i = 0; i < s->n_workers; i++) {
        rpc_worker *w = &s->workers[i];
        if (!w->cq) continue;
        grpc_completion_queue_shutdown(w->cq);
        if (w->started)
            pthread_join(w->thread, NULL);
        else {
            for (;;) {
                grpc_event ev =
                    grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
                if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
                rpc_tag *t = ev.tag;
                if (t->kind == RPC_TAG_REQUEST && !ev.success)
                    call_destroy(t->call);
                else
                    rpc_call_unref(t->call);
            }
        }
    }
    if (s->server) grpc_server_destroy(s->server);
    for (int i = 0; i < s->n_workers; i++)
        if (s->workers[i].cq) grpc_completion_queue_destroy(s->workers[i].cq);
    uint64_t active = atomic_load(&s->n_active);
    if (active)
        CM_LOG_WARN("rpc: %" PRIu64 " calls still referenced at server free (engine refs leak)",
                    active);
    rpc_health_free(s->health);
    rpc_reflection_free(s->reflection);
    for (int i = 0; i < s->n_methods; i++)
        free(s->methods[i].service);
    free(s->methods);
    free(s->workers);
    pthread_mutex_destroy(&s->shutdown_mu);
    free(s);
    grpc_shutdown();
}

int rpc_health_set(rpc_server *s, const char *service, bool serving)
{
    if (atomic_load(&s->shutting_down)) return 0;
    return rpc_health_update(s->health, service, serving);
}

void rpc_server_stats_get(const rpc_server *s, rpc_server_stats *st)
{
    rpc_server *m = (rpc_server *)(uintptr_t)s; /* atomics are read-only here */
    st->calls_started = atomic_load(&m->n_started);
    st->calls_unimplemented = atomic_load(&m->n_unimplemented);
    st->calls_cancelled = atomic_load(&m->n_cancelled);
    st->calls_active = atomic_load(&m->n_active);
    for (int i = 0; i < RPC_CODE_COUNT; i++)
        st->by_code[i] = atomic_load(&m->by_code[i]);
}
