/*
 * rpc-client.c — blocking client calls over the gRPC C core: unary and streaming, with deadlines
 * and cancellation (shared/GRPC-C.md §7, client side).
 *
 * Each call gets its own pluck completion queue, so calls made from different threads (a decode
 * worker calling Prefill for several requests at once) never wait on each other. The deadline is
 * the call's: gRPC ends it with DEADLINE_EXCEEDED on both sides, and the server sees it as a
 * cancellation, which is how a client's deadline propagates through the workers (a worker passes
 * rpc_call_deadline_ms() of its own call as the timeout of the calls it makes).
 *
 * Ownership (GRPC-C.md §5.1, §5.13): a request byte buffer is sent once and destroyed by us after
 * the batch; the status details slice and the metadata arrays received belong to us.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "rpc-impl.h"

struct rpc_channel {
    grpc_channel *ch;
};

struct rpc_stream {
    grpc_call *call;
    grpc_completion_queue *cq;
    grpc_metadata_array md_initial, md_trailing;
    grpc_byte_buffer *recv;
    grpc_status_code code;
    grpc_slice details;
    bool got_status;   /* status received and copied out */
    bool send_closed;  /* SEND_CLOSE_FROM_CLIENT done */
    bool md_requested; /* RECV_INITIAL_METADATA posted */
    int tag;           /* its address is the tag of every batch (one at a time) */
};

static gpr_timespec deadline_of(int64_t timeout_ms)
{
    if (timeout_ms <= 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

int rpc_channel_open(rpc_channel **out, const char *target, int max_recv_bytes, cm_err *err)
{
    *out = NULL;
    if (!target || !target[0]) return cm_err_set(err, -EINVAL, "rpc: empty target");
    rpc_log_init();
    rpc_channel *c = calloc(1, sizeof(*c));
    if (!c) return cm_err_set(err, -ENOMEM, "rpc: out of memory");
    grpc_init();
    grpc_arg args[1];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = max_recv_bytes > 0 ? max_recv_bytes : 4 << 20;
    grpc_channel_args ca = {1, args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    c->ch = grpc_channel_create(target, creds, &ca);
    grpc_channel_credentials_release(creds);
    if (!c->ch) {
        free(c);
        grpc_shutdown();
        return cm_err_set(err, -EINVAL, "rpc: cannot create a channel to %s", target);
    }
    *out = c;
    return 0;
}

void rpc_channel_free(rpc_channel *c)
{
    if (!c) return;
    grpc_channel_destroy(c->ch);
    free(c);
    grpc_shutdown();
}

/* Wait for `tag` on the stream's queue; returns the completion's success flag. */
static bool wait_tag(rpc_stream *s)
{
    grpc_event ev =
        grpc_completion_queue_pluck(s->cq, &s->tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    CM_ASSERT(ev.type == GRPC_OP_COMPLETE); /* the call's deadline bounds every wait */
    return ev.success != 0;
}

/* Copy the received status into st; return 0 or the mapped negative code. */
static int take_status(rpc_stream *s, rpc_status *st)
{
    int code = (int)s->code;
    if (code < 0 || code >= RPC_CODE_COUNT) code = RPC_UNKNOWN;
    if (st) {
        st->code = code;
        size_t n = GRPC_SLICE_LENGTH(s->details);
        if (n >= sizeof(st->message)) n = sizeof(st->message) - 1;
        memcpy(st->message, GRPC_SLICE_START_PTR(s->details), n);
        st->message[n] = 0;
        st->retry_delay_ms = -1;
        for (size_t i = 0; i < s->md_trailing.count; i++) {
            const grpc_metadata *m = &s->md_trailing.metadata[i];
            if (!grpc_slice_str_cmp(m->key, RPC_RETRY_DELAY_KEY)) {
                char buf[24];
                size_t vl = GRPC_SLICE_LENGTH(m->value);
                if (vl >= sizeof(buf)) vl = sizeof(buf) - 1;
                memcpy(buf, GRPC_SLICE_START_PTR(m->value), vl);
                buf[vl] = 0;
                st->retry_delay_ms = strtoll(buf, NULL, 10);
            }
        }
    }
    return rpc_err_from_code(code);
}

static void stream_destroy(rpc_stream *s)
{
    if (!s) return;
    if (s->recv) grpc_byte_buffer_destroy(s->recv);
    if (s->call) grpc_call_unref(s->call);
    if (s->cq) {
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_pluck(s->cq, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
                   .type != GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->cq);
    }
    grpc_metadata_array_destroy(&s->md_initial);
    grpc_metadata_array_destroy(&s->md_trailing);
    grpc_slice_unref(s->details);
    free(s);
}

static rpc_stream *stream_new(rpc_channel *ch, const char *path, int64_t timeout_ms)
{
    rpc_stream *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    grpc_metadata_array_init(&s->md_initial);
    grpc_metadata_array_init(&s->md_trailing);
    s->details = grpc_empty_slice();
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice method = grpc_slice_from_copied_string(path);
    s->call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, method, NULL,
                                       deadline_of(timeout_ms), NULL);
    grpc_slice_unref(method);
    if (!s->call) {
        stream_destroy(s);
        return NULL;
    }
    return s;
}

int rpc_unary(rpc_channel *ch, const char *path, const ProtobufCMessage *req,
              const ProtobufCMessageDescriptor *resp_type, rpc_arena *arena,
              ProtobufCMessage **resp, int64_t timeout_ms, rpc_status *st)
{
    *resp = NULL;
    if (st) *st = (rpc_status){RPC_INTERNAL, "", -1};
    rpc_stream *s = stream_new(ch, path, timeout_ms);
    grpc_byte_buffer *bb = rpc_bb_pack(req);
    if (!s || !bb) {
        stream_destroy(s);
        if (bb) grpc_byte_buffer_destroy(bb);
        if (st) snprintf(st->message, sizeof(st->message), "out of memory");
        return -ENOMEM;
    }
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &s->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &s->md_trailing;
    ops[5].data.recv_status_on_client.status = &s->code;
    ops[5].data.recv_status_on_client.status_details = &s->details;
    int rc;
    if (grpc_call_start_batch(s->call, ops, 6, &s->tag, NULL) != GRPC_CALL_OK) {
        rc = -EPROTO;
        if (st) snprintf(st->message, sizeof(st->message), "start_batch failed");
    } else {
        wait_tag(s);
        rc = take_status(s, st);
        if (rc == 0) {
            if (!s->recv || rpc_bb_unpack(s->recv, resp_type, arena, resp) < 0) {
                rc = -EBADMSG;
                *resp = NULL;
                if (st) {
                    st->code = RPC_INTERNAL;
                    snprintf(st->message, sizeof(st->message), "%s response",
                             s->recv ? "unparsable" : "missing");
                }
            }
        }
    }
    grpc_byte_buffer_destroy(bb);
    stream_destroy(s);
    return rc;
}

int rpc_stream_open(rpc_stream **out, rpc_channel *ch, const char *path,
                    const ProtobufCMessage *req, int64_t timeout_ms, rpc_status *st)
{
    *out = NULL;
    if (st) *st = (rpc_status){RPC_OK, "", -1};
    rpc_stream *s = stream_new(ch, path, timeout_ms);
    if (!s) return -ENOMEM;
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    grpc_byte_buffer *bb = NULL;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (req) {
        bb = rpc_bb_pack(req);
        if (!bb) {
            stream_destroy(s);
            return -ENOMEM;
        }
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = bb;
        ops[n++].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        s->send_closed = true;
    }
    grpc_call_error e = grpc_call_start_batch(s->call, ops, n, &s->tag, NULL);
    if (e == GRPC_CALL_OK) wait_tag(s); /* a failed send shows up as the status later */
    if (bb) grpc_byte_buffer_destroy(bb);
    if (e != GRPC_CALL_OK) {
        stream_destroy(s);
        return -EPROTO;
    }
    /* Initial metadata arrives with the first message or the status: read it lazily. */
    *out = s;
    return 0;
}

int rpc_stream_write(rpc_stream *s, const ProtobufCMessage *msg)
{
    if (s->send_closed) return -EPIPE;
    grpc_byte_buffer *bb = rpc_bb_pack(msg);
    if (!bb) return -ENOMEM;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    int rc = 0;
    if (grpc_call_start_batch(s->call, &op, 1, &s->tag, NULL) != GRPC_CALL_OK)
        rc = -EPROTO;
    else if (!wait_tag(s))
        rc = -ECONNRESET; /* the call is over: read its status */
    grpc_byte_buffer_destroy(bb);
    return rc;
}

int rpc_stream_close_send(rpc_stream *s)
{
    if (s->send_closed) return 0;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    s->send_closed = true;
    if (grpc_call_start_batch(s->call, &op, 1, &s->tag, NULL) != GRPC_CALL_OK) return -EPROTO;
    return wait_tag(s) ? 0 : -ECONNRESET;
}

/* Receive the final status (once). */
static int stream_status(rpc_stream *s, rpc_status *st)
{
    if (!s->got_status) {
        grpc_op ops[1];
        memset(ops, 0, sizeof(ops));
        size_t n = 0;
        ops[n].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[n].data.recv_status_on_client.trailing_metadata = &s->md_trailing;
        ops[n].data.recv_status_on_client.status = &s->code;
        ops[n++].data.recv_status_on_client.status_details = &s->details;
        if (grpc_call_start_batch(s->call, ops, n, &s->tag, NULL) != GRPC_CALL_OK) {
            s->code = GRPC_STATUS_INTERNAL;
        } else {
            wait_tag(s);
        }
        s->got_status = true;
    }
    return take_status(s, st);
}

int rpc_stream_read(rpc_stream *s, const ProtobufCMessageDescriptor *type, rpc_arena *arena,
                    ProtobufCMessage **msg, rpc_status *st)
{
    *msg = NULL;
    if (!s->got_status) {
        grpc_op ops[2];
        memset(ops, 0, sizeof(ops));
        size_t n = 0;
        if (!s->md_requested) {
            ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
            ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->md_initial;
            s->md_requested = true;
        }
        ops[n].op = GRPC_OP_RECV_MESSAGE;
        ops[n++].data.recv_message.recv_message = &s->recv;
        if (grpc_call_start_batch(s->call, ops, n, &s->tag, NULL) == GRPC_CALL_OK) {
            bool ok = wait_tag(s);
            if (ok && s->recv) {
                grpc_byte_buffer *bb = s->recv;
                s->recv = NULL;
                int rc = rpc_bb_unpack(bb, type, arena, msg);
                grpc_byte_buffer_destroy(bb);
                if (rc == 0) return 1;
                rpc_stream_cancel(s);
                stream_status(s, st);
                if (st) {
                    st->code = RPC_INTERNAL;
                    snprintf(st->message, sizeof(st->message), "unparsable %s message", type->name);
                }
                return -EBADMSG;
            }
        }
    }
    return stream_status(s, st);
}

void rpc_stream_cancel(rpc_stream *s)
{
    grpc_call_cancel(s->call, NULL);
}

void rpc_stream_free(rpc_stream *s)
{
    if (!s) return;
    if (!s->got_status) {
        /* Cancel, then collect the status so the call ends cleanly. */
        grpc_call_cancel(s->call, NULL);
        stream_status(s, NULL);
    }
    stream_destroy(s);
}
