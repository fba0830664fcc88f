/*
 * rpc-util.c — the pieces of common/rpc that do not touch gRPC: the status-code table (the one
 * place where our 0/-errno convention becomes a gRPC status), the per-request arena behind
 * protobuf-c's allocator, and the proto3 UTF-8 check that protobuf-c leaves out.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "rpc.h"

/* ---- status codes ------------------------------------------------------------------------------
 */

int rpc_code_from_err(int err)
{
    if (err >= 0) return RPC_OK;
    switch (-err) {
    case EINVAL:
    case CM_EFORMAT:
    case CM_EUNSUPPORTED:
    case ERANGE:
    case EILSEQ:
    case E2BIG:
        return RPC_INVALID_ARGUMENT;
    case CM_ELIMIT:
    case ENOMEM:
    case ENOSPC:
    case EAGAIN:
    case EBUSY:
    case EMFILE:
        return RPC_RESOURCE_EXHAUSTED;
    case ECONNREFUSED:
    case ECONNRESET:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENOTCONN:
    case EPIPE:
    case ESHUTDOWN:
        return RPC_UNAVAILABLE;
    case ETIMEDOUT:
    case ETIME:
        return RPC_DEADLINE_EXCEEDED;
    case ECANCELED:
        return RPC_CANCELLED;
    case ENOENT:
        return RPC_NOT_FOUND;
    case EEXIST:
        return RPC_ALREADY_EXISTS;
    case EPERM:
    case EACCES:
        return RPC_PERMISSION_DENIED;
    case ESTALE:
    case EXDEV:
        return RPC_FAILED_PRECONDITION;
    case ENOSYS:
    case EOPNOTSUPP:
        return RPC_UNIMPLEMENTED;
    case EIO:
        return RPC_DATA_LOSS;
    default:
        return RPC_INTERNAL;
    }
}

int rpc_err_from_code(int code)
{
    switch (code) {
    case RPC_OK:
        return 0;
    case RPC_CANCELLED:
        return -ECANCELED;
    case RPC_INVALID_ARGUMENT:
        return -EINVAL;
    case RPC_DEADLINE_EXCEEDED:
        return -ETIMEDOUT;
    case RPC_NOT_FOUND:
        return -ENOENT;
    case RPC_ALREADY_EXISTS:
        return -EEXIST;
    case RPC_PERMISSION_DENIED:
    case RPC_UNAUTHENTICATED:
        return -EACCES;
    case RPC_RESOURCE_EXHAUSTED:
        return -EAGAIN;
    case RPC_FAILED_PRECONDITION:
        return -ESTALE;
    case RPC_OUT_OF_RANGE:
        return -ERANGE;
    case RPC_UNIMPLEMENTED:
        return -ENOSYS;
    case RPC_UNAVAILABLE:
        return -ECONNREFUSED;
    case RPC_DATA_LOSS:
        return -EIO;
    default:
        return -EPROTO; /* UNKNOWN, ABORTED, INTERNAL, out of range */
    }
}

const char *rpc_code_name(int code)
{
    static const char *const names[RPC_CODE_COUNT] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return code >= 0 && code < RPC_CODE_COUNT ? names[code] : "UNKNOWN";
}

/* ---- arena -------------------------------------------------------------------------------------
 */

typedef struct rpc_arena_block {
    struct rpc_arena_block *next;
    size_t size, used;
    _Alignas(16) unsigned char data[];
} rpc_arena_block;

struct rpc_arena {
    rpc_arena_block *head; /* current block; older ones follow */
    size_t chunk;
    size_t total; /* bytes handed out since the last reset */
    ProtobufCAllocator pa;
};

static void *arena_pb_alloc(void *data, size_t size)
{
    return rpc_arena_alloc(data, size);
}
static void arena_pb_free(void *data, void *p)
{
    (void)data, (void)p;
}

rpc_arena *rpc_arena_init(size_t chunk_size)
{
    rpc_arena *a = calloc(1, sizeof(*a));
    if (!a) return NULL;
    a->chunk = chunk_size ? chunk_size : 4096;
    a->pa.alloc = arena_pb_alloc;
    a->pa.free = arena_pb_free;
    a->pa.allocator_data = a;
    return a;
}

static void arena_free_blocks(rpc_arena_block *b)
{
    while (b) {
        rpc_arena_block *n = b->next;
        free(b);
        b = n;
    }
}

void rpc_arena_free(rpc_arena *a)
{
    if (!a) return;
    arena_free_blocks(a->head);
    free(a);
}

void *rpc_arena_alloc(rpc_arena *a, size_t size)
{
    size_t need = (size + 15) & ~(size_t)15;
    if (need < size) return NULL; /* overflow */
    rpc_arena_block *b = a->head;
    if (!b || b->size - b->used < need) {
        size_t bs = need > a->chunk ? need : a->chunk;
        if (bs > SIZE_MAX - sizeof(rpc_arena_block)) return NULL;
        rpc_arena_block *nb = malloc(sizeof(rpc_arena_block) + bs);
        if (!nb) return NULL;
        nb->size = bs;
        nb->used = 0;
        if (b && need > a->chunk) {
            /* An oversized request gets its own block behind the current one, so the space
             * left in the current block stays usable. */
            nb->next = b->next;
            b->next = nb;
            nb->used = need;
            a->total += size;
            return nb->data;
        }
        nb->next = b;
        a->head = b = nb;
    }
    void *p = b->data + b->used;
    b->used += need;
    a->total += size;
    return p;
}

char *rpc_arena_strdup(rpc_arena *a, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = rpc_arena_alloc(a, n);
    if (d) memcpy(d, s, n);
    return d;
}

void rpc_arena_reset(rpc_arena *a)
{
    if (!a->head) return;
    /* Keep the oldest block (the usual working set of a small request); free the rest. */
    rpc_arena_block *b = a->head, *last = NULL;
    while (b->next) {
        rpc_arena_block *n = b->next;
        if (!n->next) {
            last = n;
            b->next = NULL;
            break;
        }
        b = n;
    }
    if (last) {
        arena_free_blocks(a->head);
        a->head = last;
    }
    a->head->used = 0;
    a->total = 0;
}

size_t rpc_arena_used(const rpc_arena *a)
{
    return a->total;
}

ProtobufCAllocator *rpc_arena_allocator(rpc_arena *a)
{
    return &a->pa;
}

/* ---- UTF-8 -------------------------------------------------------------------------------------
 */

/* Strict UTF-8 (RFC 3629): no overlongs, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            len = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else
            return false;
        if (n - i < (size_t)len) return false;
        if (s[i + 1] < lo || s[i + 1] > hi) return false;
        for (int k = 2; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80) return false;
        i += (size_t)len;
    }
    return true;
}

static int check_msg(const ProtobufCMessage *m, cm_err *err, int depth)
{
    if (depth > 64) return cm_err_set(err, -EILSEQ, "message nesting too deep");
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const unsigned char *base = (const unsigned char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE) continue;
        /* oneof members: only the one the case names is set. */
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            uint32_t which;
            memcpy(&which, base + f->quantifier_offset, sizeof(which));
            if (which != f->id) continue;
        }
        size_t count = 1;
        const void *const *items;
        const void *single;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            memcpy(&count, base + f->quantifier_offset, sizeof(count));
            memcpy(&items, base + f->offset, sizeof(items));
        } else {
            memcpy(&single, base + f->offset, sizeof(single));
            items = &single;
        }
        for (size_t k = 0; k < count; k++) {
            if (!items[k]) continue;
            if (f->type == PROTOBUF_C_TYPE_STRING) {
                const char *s = items[k];
                if (!utf8_valid((const unsigned char *)s, strlen(s)))
                    return cm_err_set(err, -EILSEQ, "field %s.%s is not valid UTF-8", d->name,
                                      f->name);
            } else {
                int rc = check_msg(items[k], err, depth + 1);
                if (rc < 0) return rc;
            }
        }
    }
    return 0;
}

int rpc_message_check_utf8(const ProtobufCMessage *msg, cm_err *err)
{
    return check_msg(msg, err, 0);
}

/* ---- embedded NULs in string fields (on the wire) ---------------------------------------------
 */

static bool wire_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

static int wire_check(const uint8_t *p, size_t n, const ProtobufCMessageDescriptor *d, int depth)
{
    const uint8_t *end = p + n;
    if (depth > 64) return 0; /* check_msg reports the nesting */
    while (p < end) {
        uint64_t tag, v;
        if (!wire_varint(&p, end, &tag)) return 0;
        switch (tag & 7) {
        case 0:
            if (!wire_varint(&p, end, &v)) return 0;
            break;
        case 1:
            if (end - p < 8) return 0;
            p += 8;
            break;
        case 5:
            if (end - p < 4) return 0;
            p += 4;
            break;
        case 2: {
            if (!wire_varint(&p, end, &v) || v > (uint64_t)(end - p)) return 0;
            const ProtobufCFieldDescriptor *f =
                tag >> 3 <= UINT32_MAX
                    ? protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3))
                    : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_STRING && memchr(p, 0, (size_t)v)) return -EILSEQ;
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
                int rc = wire_check(p, (size_t)v, f->descriptor, depth + 1);
                if (rc < 0) return rc;
            }
            p += v;
            break;
        }
        default: /* groups: protobuf-c refused the message already */
            return 0;
        }
    }
    return 0;
}

int rpc_wire_check_strings(const void *data, size_t len, const ProtobufCMessageDescriptor *type)
{
    return wire_check((const uint8_t *)data, len, type, 0);
}
