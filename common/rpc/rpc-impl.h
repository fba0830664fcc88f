/*
 * rpc-impl.h — internals of common/rpc shared by rpc-server.c, rpc-health.c and
 * rpc-reflection.c. Not a public header: nothing outside common/rpc includes it.
 *
 * Reference counting of a server call (struct rpc_call):
 *   1 for the posted request slot, dropped when the REQUEST completion has been handled;
 *   1 per batch in flight (CLOSE, SEND, RECV), dropped by that batch's completion;
 *   1 per rpc_call_ref by handlers / engines / health watchers.
 * The last unref releases the grpc_call, the metadata, the arenas and the per-call data.
 *
 * Locking: every grpc_call_start_batch of a call runs under the call's mutex (send and receive
 * batches could be synchronised apart, but one lock is simpler and uncontended). Lock order:
 * rpc_health.mu → rpc_call.mu; nothing is called back with a call's mutex held.
 */
#ifndef RPC_RPC_IMPL_H
#define RPC_RPC_IMPL_H

#include <pthread.h>
#include <stdatomic.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>

#include "rpc.h"

/* The descriptor set embedded by proto/embed.cmake (library ihip_proto). */
extern const unsigned char ihip_proto_descriptor_set[];
extern const unsigned long ihip_proto_descriptor_set_len;

enum rpc_tag_kind { RPC_TAG_REQUEST, RPC_TAG_CLOSE, RPC_TAG_SEND, RPC_TAG_RECV };

/* The completion-queue tag of one kind of operation of a call. */
typedef struct rpc_tag {
    rpc_call *call;
    int kind; /* enum rpc_tag_kind */
} rpc_tag;

/* A method as registered: the user's description plus gRPC's handle. */
typedef struct rpc_method_rt {
    rpc_method m;
    void *handle;  /* grpc_server_register_method; NULL for the generic (unknown path) slot */
    char *service; /* "pkg.Service" part of the path (malloc) */
} rpc_method_rt;

typedef struct rpc_worker {
    rpc_server *s;
    int idx;
    grpc_completion_queue *cq;
    pthread_t thread;
    bool started;
} rpc_worker;

typedef struct rpc_health rpc_health;
typedef struct rpc_reflection rpc_reflection;

struct rpc_server {
    rpc_server_params p;
    grpc_server *server;
    int port;
    rpc_method_rt *methods; /* user methods, then health and reflection */
    int n_methods;
    rpc_method_rt generic;
    rpc_worker *workers;
    int n_workers;
    atomic_bool shutting_down; /* no more request slots are posted */
    bool shut_down;            /* rpc_server_shutdown completed */
    pthread_mutex_t shutdown_mu;
    rpc_health *health;
    rpc_reflection *reflection;
    atomic_uint_fast64_t next_call_id;
    /* stats */
    atomic_uint_fast64_t n_started, n_unimplemented, n_cancelled, n_active;
    atomic_uint_fast64_t by_code[RPC_CODE_COUNT];
};

struct rpc_call {
    rpc_server *s;
    rpc_worker *w;
    const rpc_method_rt *method; /* &s->generic for unknown paths */
    uint64_t id;
    atomic_int refs;

    /* filled by gRPC when the request slot completes */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* generic slot only */
    grpc_byte_buffer *payload; /* unary / server streaming: the request */

    rpc_tag t_request, t_close, t_send, t_recv;
    int close_cancelled; /* RECV_CLOSE_ON_SERVER out-param */
    atomic_bool cancelled;

    pthread_mutex_t mu;   /* guards everything below and every start_batch */
    grpc_byte_buffer **q; /* ring of packed messages waiting to be sent */
    int q_head, q_len, q_cap;
    grpc_byte_buffer *inflight; /* the message of the SEND batch in flight */
    bool send_busy, md_sent, finished, status_sent;
    int status_code;
    char *status_msg;           /* malloc */
    int64_t retry_delay_ms;     /* -1: unset */
    grpc_byte_buffer *recv_buf; /* RECV_MESSAGE out-param */

    rpc_arena *arena;     /* the request and handler scratch */
    rpc_arena *msg_arena; /* streamed-in messages, reset per message */
    void *data;
    void (*data_free)(void *);
};

/* rpc-server.c */
/* Unpack a byte buffer into `arena` (NULL msg on failure: -EBADMSG). Destroys nothing. */
int rpc_bb_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *type, rpc_arena *arena,
                  ProtobufCMessage **msg);
/* Pack a message into a new byte buffer (NULL on allocation failure). */
grpc_byte_buffer *rpc_bb_pack(const ProtobufCMessage *msg);
/* Route gRPC's log into cm_log (once per process). */
void rpc_log_init(void);

/* rpc-health.c: methods Check and Watch, served with the health state. */
int rpc_health_init(rpc_health **out, const char *const *services, int n_services);
void rpc_health_free(rpc_health *h);
int rpc_health_update(rpc_health *h, const char *service, bool serving);
void rpc_health_set_all(rpc_health *h, bool serving);
void rpc_health_check(rpc_call *c, const ProtobufCMessage *req, void *user);
void rpc_health_watch(rpc_call *c, const ProtobufCMessage *req, void *user);
void rpc_health_watch_cancel(rpc_call *c, void *user);
/* Finish every Watch stream with status OK (server shutdown). */
void rpc_health_end_watches(rpc_health *h);

/* rpc-reflection.c: ServerReflectionInfo (bidi) for both v1 and v1alpha. */
int rpc_reflection_init(rpc_reflection **out, const uint8_t *set, size_t len,
                        const char *const *services, int n_services, cm_err *err);
void rpc_reflection_free(rpc_reflection *r);
void rpc_reflection_info(rpc_call *c, const ProtobufCMessage *req, void *user);

#endif /* RPC_RPC_IMPL_H */
