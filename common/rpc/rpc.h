/*
 * rpc.h — a thin layer over the gRPC C core (Debian's libgrpc, no C++) and protobuf-c, shared by
 * the prefill and decode workers and their clients.
 *
 * Server: one completion queue per RPC thread (shared/GRPC-C.md §2). Each thread pre-posts
 * request slots for every registered method plus generic slots (unknown paths get UNIMPLEMENTED
 * instead of hanging). A handler runs on the RPC thread with the request already unpacked into
 * the call's arena; it must not block. Long work (prefill, decode) takes a reference on the call
 * (rpc_call_ref) and answers later from its own thread with rpc_call_send / rpc_call_finish:
 * those never wait on gRPC — a message goes into the call's small bounded queue and at most one
 * send is in flight per call (one `pump`), so a slow reader stalls only its own stream
 * (rpc_call_send returns -EAGAIN when that stream's queue is full).
 *
 * Cancellation: RECV_CLOSE_ON_SERVER is posted when a call starts, so a client cancel, an expired
 * deadline or a dropped connection is seen as soon as gRPC sees it: rpc_call_is_cancelled turns
 * true and the method's on_cancel hook runs (on an RPC thread). An engine checking
 * rpc_call_is_cancelled once per step stops within one step.
 *
 * Status codes: handlers report failures as 0 / -errno / -CM_E* and rpc_call_fail maps them to
 * gRPC codes in one table (rpc_code_from_err). RESOURCE_EXHAUSTED always carries the trailing
 * metadata "retry-delay-ms" (the handler's value, else the server default).
 *
 * Every server also serves grpc.health.v1.Health (Check, Watch; every service starts NOT_SERVING
 * until rpc_health_set says otherwise) and server reflection (grpc.reflection.v1 and v1alpha)
 * from a FileDescriptorSet embedded at build time (ihip_proto), so grpcurl and ghz need no .proto.
 *
 * Client: a channel plus blocking unary and streaming calls with deadlines; each call has its own
 * completion queue, so calls from different threads never wait on each other.
 *
 * Threading: rpc_call_* functions are thread-safe. Memory: a request message handed to a handler
 * lives in the call's arena (freed with the call); for client-streaming / bidi methods each
 * message lives only until the handler returns.
 */
#ifndef RPC_RPC_H
#define RPC_RPC_H

#include <protobuf-c/protobuf-c.h>

#include "../base/cm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ------------------------------------------------------------------------------
 */

/* The gRPC status codes (same values as grpc_status_code). */
enum rpc_code {
    RPC_OK = 0,
    RPC_CANCELLED = 1,
    RPC_UNKNOWN = 2,
    RPC_INVALID_ARGUMENT = 3,
    RPC_DEADLINE_EXCEEDED = 4,
    RPC_NOT_FOUND = 5,
    RPC_ALREADY_EXISTS = 6,
    RPC_PERMISSION_DENIED = 7,
    RPC_RESOURCE_EXHAUSTED = 8,
    RPC_FAILED_PRECONDITION = 9,
    RPC_ABORTED = 10,
    RPC_OUT_OF_RANGE = 11,
    RPC_UNIMPLEMENTED = 12,
    RPC_INTERNAL = 13,
    RPC_UNAVAILABLE = 14,
    RPC_DATA_LOSS = 15,
    RPC_UNAUTHENTICATED = 16,
    RPC_CODE_COUNT = 17,
};

/* Trailing-metadata key of the retry hint sent with RESOURCE_EXHAUSTED (decimal milliseconds). */
#define RPC_RETRY_DELAY_KEY "retry-delay-ms"

/* The one mapping from our error convention to gRPC status codes:
 *   0 → OK; -EINVAL, -CM_EFORMAT, -CM_EUNSUPPORTED, -ERANGE, -EILSEQ, -E2BIG → INVALID_ARGUMENT;
 *   -CM_ELIMIT, -ENOMEM, -ENOSPC, -EAGAIN, -EBUSY, -EMFILE → RESOURCE_EXHAUSTED;
 *   -ECONNREFUSED, -ECONNRESET, -EHOSTUNREACH, -ENETUNREACH, -ENOTCONN, -EPIPE, -ESHUTDOWN
 *     → UNAVAILABLE;
 *   -ETIMEDOUT, -ETIME → DEADLINE_EXCEEDED; -ECANCELED → CANCELLED; -ENOENT → NOT_FOUND;
 *   -EEXIST → ALREADY_EXISTS; -EPERM, -EACCES → PERMISSION_DENIED; -ESTALE, -EXDEV
 *   → FAILED_PRECONDITION; -ENOSYS, -EOPNOTSUPP → UNIMPLEMENTED; -EIO → DATA_LOSS;
 *   anything else → INTERNAL. */
CM_API int rpc_code_from_err(int err);
/* The inverse used by clients: a status code → 0 or a negative code of the table above. */
CM_API int rpc_err_from_code(int code);
/* "OK", "INVALID_ARGUMENT", ... ("UNKNOWN" for values out of range). */
CM_API const char *rpc_code_name(int code);

/* ---- per-request arena -------------------------------------------------------------------------
 */

/* A bump allocator freed in one shot. Not thread-safe (one owner at a time). */
typedef struct rpc_arena rpc_arena;

/* chunk_size: bytes of each block (0: 4 KiB); bigger requests get a block of their own.
 * Returns NULL on allocation failure. */
CM_API rpc_arena *rpc_arena_init(size_t chunk_size);
CM_API void rpc_arena_free(rpc_arena *a);
/* 16-byte aligned memory valid until reset/free, or NULL on allocation failure. */
CM_API void *rpc_arena_alloc(rpc_arena *a, size_t size);
CM_API char *rpc_arena_strdup(rpc_arena *a, const char *s);
/* Forget every allocation (keeps the first block for reuse). */
CM_API void rpc_arena_reset(rpc_arena *a);
/* Bytes handed out since the last reset. */
CM_API size_t rpc_arena_used(const rpc_arena *a);
/* A protobuf-c allocator that allocates from `a` (free is a no-op). Valid as long as `a`. */
CM_API ProtobufCAllocator *rpc_arena_allocator(rpc_arena *a);

/* Check that every string field of msg (recursively) is valid UTF-8, as proto3 requires;
 * protobuf-c does not check. Returns 0, or -EILSEQ with err naming the field. */
CM_API int rpc_message_check_utf8(const ProtobufCMessage *msg, cm_err *err);
/* Scan a serialized message of `type` for string fields (at any depth) holding a NUL byte, which
 * protobuf-c would silently cut. Returns 0, or -EILSEQ when one does. Assumes the bytes already
 * unpacked successfully (anything unparsable ends the scan with 0). rpc_bb_unpack calls it. */
CM_API int rpc_wire_check_strings(const void *data, size_t len,
                                  const ProtobufCMessageDescriptor *type);

/* ---- server ------------------------------------------------------------------------------------
 */

typedef struct rpc_server rpc_server;
typedef struct rpc_call rpc_call;

enum rpc_kind {
    RPC_KIND_UNARY = 0,         /* one request, one response */
    RPC_KIND_SERVER_STREAM = 1, /* one request, a stream of responses */
    RPC_KIND_CLIENT_STREAM = 2, /* a stream of requests, one response */
    RPC_KIND_BIDI = 3,          /* streams both ways */
};

/* Unary / server streaming: called once with the unpacked request (lives in the call's arena).
 * Client streaming / bidi: called once per received message (valid only during the call), then
 * once with req == NULL when the client half-closes. Runs on an RPC thread: must not block. */
typedef void (*rpc_handler_fn)(rpc_call *call, const ProtobufCMessage *req, void *user);
/* Called once, on an RPC thread, when the call is cancelled (client cancel, deadline, disconnect,
 * server shutdown) before the handler finished it. Must not block. */
typedef void (*rpc_cancel_fn)(rpc_call *call, void *user);

typedef struct rpc_method {
    const char *path; /* "/infinitehip.v1.Generator/Generate"; borrowed, must outlive the server */
    int kind;         /* enum rpc_kind */
    const ProtobufCMessageDescriptor *request; /* type the request messages are unpacked into */
    rpc_handler_fn handler;
    rpc_cancel_fn on_cancel; /* (optional) */
    void *user;              /* passed to handler and on_cancel */
} rpc_method;

typedef struct rpc_server_params {
    const char *addr;     /* listen address, "127.0.0.1:0" (port 0 = ephemeral), "[::]:50051" */
    int n_threads;        /* RPC threads, each with its own completion queue (default 2) */
    int slots_per_method; /* request slots pre-posted per method per thread (default 8) */
    int max_recv_bytes;   /* largest request message (default 4 MiB) */
    int max_send_queue;   /* messages queued per call before rpc_call_send says -EAGAIN (64) */
    int max_concurrent_streams;     /* HTTP/2 streams per connection (0: gRPC default) */
    int64_t default_retry_delay_ms; /* retry-delay-ms for RESOURCE_EXHAUSTED if unset (1000) */
    bool reflection;                /* serve reflection v1 + v1alpha (default true) */
    /* FileDescriptorSet served by reflection (NULL: the one embedded in ihip_proto). Borrowed. */
    const uint8_t *descriptor_set;
    size_t descriptor_set_len;
} rpc_server_params;

CM_API rpc_server_params rpc_server_default_params(void);

/* Create, bind and start a server for methods[0..n_methods) (copied; their paths and user data
 * are borrowed). Health and reflection methods are added. The bound port is rpc_server_port().
 * Returns 0, or -EADDRINUSE (cannot bind), -EINVAL (bad params / duplicate path), -ENOMEM,
 * -CM_EFORMAT (bad descriptor set). Free with rpc_server_free. */
CM_API int rpc_server_start(rpc_server **out, const rpc_server_params *p, const rpc_method *methods,
                            int n_methods, cm_err *err);
CM_API int rpc_server_port(const rpc_server *s);
/* Stop accepting calls: every health status becomes NOT_SERVING, in-flight calls get grace_ms
 * to finish, then all remaining calls are cancelled (their on_cancel hooks run). Idempotent.
 * Engines must drop their call references after this and before rpc_server_free. */
CM_API void rpc_server_shutdown(rpc_server *s, int64_t grace_ms);
/* Shut down (if not done), join the RPC threads and free everything. NULL is a no-op. */
CM_API void rpc_server_free(rpc_server *s);

/* Set the health of `service` ("" = the whole server; a full name like
 * "infinitehip.v1.Generator" otherwise). Unknown names are added. Watchers are told at once.
 * Returns 0 or -ENOMEM. */
CM_API int rpc_health_set(rpc_server *s, const char *service, bool serving);

typedef struct rpc_server_stats {
    uint64_t calls_started;           /* calls delivered to a handler (registered methods) */
    uint64_t calls_unimplemented;     /* calls to unknown paths */
    uint64_t calls_cancelled;         /* calls cancelled before they finished */
    uint64_t calls_active;            /* calls not yet freed */
    uint64_t by_code[RPC_CODE_COUNT]; /* statuses sent, by code */
} rpc_server_stats;
CM_API void rpc_server_stats_get(const rpc_server *s, rpc_server_stats *st);

/* ---- one server call ---------------------------------------------------------------------------
 */

/* A call lives while gRPC or anyone holding a reference needs it. A handler's `call` pointer is
 * valid until the handler returns; keep it longer with rpc_call_ref / rpc_call_unref. */
CM_API void rpc_call_ref(rpc_call *c);
CM_API void rpc_call_unref(rpc_call *c);

/* Queue one response message (packed now; msg is not kept). Never blocks.
 * Returns 0; -EAGAIN if this call's send queue is full (the client reads slowly: retry later);
 * -ECANCELED if the call was cancelled or already finished; -ENOMEM. */
CM_API int rpc_call_send(rpc_call *c, const ProtobufCMessage *msg);
/* End the call with a status (sent after every queued message). message may be NULL.
 * Returns 0, or -EALREADY if it was already finished (the first status wins). */
CM_API int rpc_call_finish(rpc_call *c, int code, const char *fmt, ...) CM_PRINTF(3, 4);
/* End the call with the status that rpc_code_from_err(err) gives (err ≤ 0). */
CM_API int rpc_call_fail(rpc_call *c, int err, const char *fmt, ...) CM_PRINTF(3, 4);
/* rpc_call_send(msg) then rpc_call_finish(OK): the reply of a unary method. */
CM_API int rpc_call_reply(rpc_call *c, const ProtobufCMessage *msg);
/* Retry hint for a RESOURCE_EXHAUSTED status (set before finishing). */
CM_API void rpc_call_set_retry_delay(rpc_call *c, int64_t ms);

/* True once the call was cancelled (client cancel, deadline, disconnect, shutdown). */
CM_API bool rpc_call_is_cancelled(const rpc_call *c);
/* True once a status was set (finish / fail / reply). */
CM_API bool rpc_call_is_finished(rpc_call *c);
/* Milliseconds left before the client's deadline (≤ 0: passed); INT64_MAX when none was set. */
CM_API int64_t rpc_call_deadline_ms(const rpc_call *c);
/* Messages waiting in this call's send queue (for back-pressure decisions). */
CM_API int rpc_call_queued(rpc_call *c);
/* The call's arena (request, handler scratch; freed with the call). Only the handler thread and
 * whoever it hands the call to may use it, one at a time. */
CM_API rpc_arena *rpc_call_arena(rpc_call *c);
/* Per-call data, freed with free_fn (optional) when the call is freed. */
CM_API void rpc_call_set_data(rpc_call *c, void *data, void (*free_fn)(void *));
CM_API void *rpc_call_data(const rpc_call *c);
/* Method path ("/pkg.Service/Method"); server-unique call id (for logs). */
CM_API const char *rpc_call_method(const rpc_call *c);
CM_API uint64_t rpc_call_id(const rpc_call *c);
/* Value of request metadata `key` (lower case), copied into the call arena, or NULL. */
CM_API const char *rpc_call_metadata(rpc_call *c, const char *key);

/* ---- client ------------------------------------------------------------------------------------
 */

typedef struct rpc_channel rpc_channel;

/* Outcome of a client call. */
typedef struct rpc_status {
    int code;               /* enum rpc_code */
    char message[256];      /* status details (truncated) */
    int64_t retry_delay_ms; /* the "retry-delay-ms" trailer, or -1 */
} rpc_status;

/* An insecure channel to target ("host:port", "unix:/path"). max_recv_bytes: 0 = 4 MiB.
 * Connection is lazy. Returns 0 or -ENOMEM / -EINVAL. Free with rpc_channel_free. */
CM_API int rpc_channel_open(rpc_channel **out, const char *target, int max_recv_bytes, cm_err *err);
CM_API void rpc_channel_free(rpc_channel *ch);

/* A unary call with a timeout (ms ≤ 0: none). The response is unpacked into `arena`.
 * Returns 0 (status OK, *resp set) or rpc_err_from_code(st->code) (< 0, *resp NULL).
 * `st` may be NULL. */
CM_API int rpc_unary(rpc_channel *ch, const char *path, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_type, rpc_arena *arena,
                     ProtobufCMessage **resp, int64_t timeout_ms, rpc_status *st);

/* A streaming call. rpc_stream_open starts it; with req != NULL the request is sent and the
 * send side closed (server streaming); with req == NULL the caller sends with rpc_stream_write
 * and ends with rpc_stream_close_send (client streaming / bidi). */
typedef struct rpc_stream rpc_stream;
CM_API int rpc_stream_open(rpc_stream **out, rpc_channel *ch, const char *path,
                           const ProtobufCMessage *req, int64_t timeout_ms, rpc_status *st);
/* 0 or a negative code (the call failed: read the status with rpc_stream_read). */
CM_API int rpc_stream_write(rpc_stream *s, const ProtobufCMessage *msg);
CM_API int rpc_stream_close_send(rpc_stream *s);
/* Next response: 1 (message in *msg, unpacked into arena), 0 (stream ended with OK), or
 * rpc_err_from_code(st->code) < 0 (ended with an error status, or -EBADMSG for an unparsable
 * message). `st` may be NULL. */
CM_API int rpc_stream_read(rpc_stream *s, const ProtobufCMessageDescriptor *type, rpc_arena *arena,
                           ProtobufCMessage **msg, rpc_status *st);
/* Cancel the call (any thread); the next read ends with CANCELLED. */
CM_API void rpc_stream_cancel(rpc_stream *s);
CM_API void rpc_stream_free(rpc_stream *s);

/* ---- the embedded descriptor set (from ihip_proto) ------------------------------------------- */

/* FileDescriptorSet of the protos under proto/infinitehip/v1 + health + reflection v1/v1alpha. */
CM_API const uint8_t *rpc_descriptor_set(size_t *len);

#ifdef __cplusplus
}
#endif
#endif /* RPC_RPC_H */
