/*
 * rpc-reflection.c — gRPC server reflection (grpc.reflection.v1 and v1alpha, wire-identical, both
 * served with the v1 types) from a FileDescriptorSet embedded at build time
 * (shared/GRPC-C.md §6). This is what lets grpcurl, ghz and dynamic clients call the workers
 * without a .proto file.
 *
 * Start-up: the set is walked in its wire format (repeated field 1, length-delimited), so each
 * file's exact serialized FileDescriptorProto is served as is, never re-encoded; each file is
 * unpacked once (descriptor.pb-c) to index its name, its dependencies and every fully qualified
 * symbol it defines (messages, nested messages, enums, services, Service.Method, extensions).
 *
 * Per request: list_services answers the services this server registered; file_by_filename and
 * file_containing_symbol answer the file plus its transitive dependencies, skipping those already
 * sent on this stream (the requested file itself is always included); unknown names get an
 * error_response NOT_FOUND, as the protocol wants (the stream stays open).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "rpc-impl.h"

typedef struct refl_file {
    char *name;
    uint8_t *bytes; /* points into rpc_reflection.set */
    size_t len;
    int *deps; /* indexes of direct dependencies */
    int n_deps;
} refl_file;

typedef struct refl_symbol {
    char *name; /* fully qualified, no leading dot */
    int file;
    bool message; /* a message type (all_extension_numbers_of_type accepts those) */
} refl_symbol;

struct rpc_reflection {
    uint8_t *set; /* private copy of the descriptor set */
    refl_file *files;
    int n_files;
    refl_symbol *syms;
    int n_syms, cap_syms;
    char **services; /* served services (that the set describes) */
    int n_services;
};

/* ---- index -------------------------------------------------------------------------------------
 */

static int read_varint(const uint8_t *p, size_t n, size_t *pos, uint64_t *v)
{
    uint64_t r = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pos >= n) return -1;
        uint8_t b = p[(*pos)++];
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return 0;
        }
    }
    return -1;
}

static int add_sym(rpc_reflection *r, const char *prefix, const char *name, int file, bool message)
{
    if (r->n_syms == r->cap_syms) {
        int cap = r->cap_syms ? 2 * r->cap_syms : 64;
        refl_symbol *s = realloc(r->syms, (size_t)cap * sizeof(*s));
        if (!s) return -ENOMEM;
        r->syms = s;
        r->cap_syms = cap;
    }
    size_t lp = strlen(prefix), ln = strlen(name);
    char *full = malloc(lp + ln + 1);
    if (!full) return -ENOMEM;
    memcpy(full, prefix, lp);
    memcpy(full + lp, name, ln + 1);
    r->syms[r->n_syms++] = (refl_symbol){full, file, message};
    return 0;
}

/* prefix + name + "." (malloc), the scope of the things nested in `name`. */
static char *scope_of(const char *prefix, const char *name)
{
    size_t lp = strlen(prefix), ln = strlen(name);
    char *s = malloc(lp + ln + 2);
    if (!s) return NULL;
    memcpy(s, prefix, lp);
    memcpy(s + lp, name, ln);
    s[lp + ln] = '.';
    s[lp + ln + 1] = 0;
    return s;
}

static int index_message(rpc_reflection *r, const char *prefix,
                         const Google__Protobuf__DescriptorProto *m, int file, int depth)
{
    if (depth > 32) return -CM_EFORMAT;
    int rc = add_sym(r, prefix, m->name, file, true);
    char *scope = rc == 0 ? scope_of(prefix, m->name) : NULL;
    if (!scope) return -ENOMEM;
    for (size_t i = 0; i < m->n_nested_type && rc == 0; i++)
        rc = index_message(r, scope, m->nested_type[i], file, depth + 1);
    for (size_t i = 0; i < m->n_enum_type && rc == 0; i++)
        rc = add_sym(r, scope, m->enum_type[i]->name, file, false);
    for (size_t i = 0; i < m->n_extension && rc == 0; i++)
        rc = add_sym(r, scope, m->extension[i]->name, file, false);
    free(scope);
    return rc;
}

static int index_file(rpc_reflection *r, const Google__Protobuf__FileDescriptorProto *fd, int file)
{
    char *prefix = fd->package && fd->package[0] ? scope_of("", fd->package) : strdup("");
    if (!prefix) return -ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < fd->n_message_type && rc == 0; i++)
        rc = index_message(r, prefix, fd->message_type[i], file, 0);
    for (size_t i = 0; i < fd->n_enum_type && rc == 0; i++)
        rc = add_sym(r, prefix, fd->enum_type[i]->name, file, false);
    for (size_t i = 0; i < fd->n_extension && rc == 0; i++)
        rc = add_sym(r, prefix, fd->extension[i]->name, file, false);
    for (size_t i = 0; i < fd->n_service && rc == 0; i++) {
        const Google__Protobuf__ServiceDescriptorProto *sv = fd->service[i];
        rc = add_sym(r, prefix, sv->name, file, false);
        char *scope = rc == 0 ? scope_of(prefix, sv->name) : NULL;
        if (rc == 0 && !scope) rc = -ENOMEM;
        for (size_t k = 0; k < sv->n_method && rc == 0; k++)
            rc = add_sym(r, scope, sv->method[k]->name, file, false);
        free(scope);
    }
    free(prefix);
    return rc;
}

static int find_file(const rpc_reflection *r, const char *name)
{
    for (int i = 0; i < r->n_files; i++)
        if (!strcmp(r->files[i].name, name)) return i;
    return -1;
}

static const refl_symbol *find_sym(const rpc_reflection *r, const char *name)
{
    if (name[0] == '.') name++;
    for (int i = 0; i < r->n_syms; i++)
        if (!strcmp(r->syms[i].name, name)) return &r->syms[i];
    return NULL;
}

int rpc_reflection_init(rpc_reflection **out, const uint8_t *set, size_t len,
                        const char *const *services, int n_services, cm_err *err)
{
    *out = NULL;
    rpc_reflection *r = calloc(1, sizeof(*r));
    int rc = 0;
    Google__Protobuf__FileDescriptorProto **fds = NULL;
    if (!r || !(r->set = malloc(len ? len : 1))) {
        rc = cm_err_set(err, -ENOMEM, "reflection: out of memory");
        goto done;
    }
    memcpy(r->set, set, len);

    /* Pass 1: split the set into its files. */
    int cap = 0;
    for (size_t pos = 0; pos < len;) {
        uint64_t key, flen;
        if (read_varint(r->set, len, &pos, &key) < 0 || key != ((1u << 3) | 2) ||
            read_varint(r->set, len, &pos, &flen) < 0 || flen > len - pos) {
            rc = cm_err_set(err, -CM_EFORMAT, "reflection: malformed descriptor set at byte %zu",
                            pos);
            goto done;
        }
        if (r->n_files == cap) {
            cap = cap ? 2 * cap : 16;
            refl_file *f = realloc(r->files, (size_t)cap * sizeof(*f));
            if (!f) {
                rc = cm_err_set(err, -ENOMEM, "reflection: out of memory");
                goto done;
            }
            r->files = f;
        }
        r->files[r->n_files++] = (refl_file){NULL, r->set + pos, (size_t)flen, NULL, 0};
        pos += (size_t)flen;
    }

    /* Pass 2: unpack each file; index names and symbols. */
    fds = calloc((size_t)r->n_files + 1, sizeof(*fds));
    if (!fds) {
        rc = cm_err_set(err, -ENOMEM, "reflection: out of memory");
        goto done;
    }
    for (int i = 0; i < r->n_files; i++) {
        fds[i] = google__protobuf__file_descriptor_proto__unpack(NULL, r->files[i].len,
                                                                 r->files[i].bytes);
        if (!fds[i] || !fds[i]->name) {
            rc = cm_err_set(err, -CM_EFORMAT, "reflection: file %d of the set does not parse", i);
            goto done;
        }
        r->files[i].name = strdup(fds[i]->name);
        if (!r->files[i].name || (rc = index_file(r, fds[i], i)) < 0) {
            rc = cm_err_set(err, rc < 0 ? rc : -ENOMEM, "reflection: indexing %s failed",
                            fds[i]->name);
            goto done;
        }
    }
    for (int i = 0; i < r->n_files; i++) {
        refl_file *f = &r->files[i];
        f->deps = calloc(fds[i]->n_dependency + 1, sizeof(int));
        if (!f->deps) {
            rc = cm_err_set(err, -ENOMEM, "reflection: out of memory");
            goto done;
        }
        for (size_t k = 0; k < fds[i]->n_dependency; k++) {
            int d = find_file(r, fds[i]->dependency[k]);
            if (d < 0) {
                rc = cm_err_set(err, -CM_EFORMAT,
                                "reflection: %s imports %s, not in the set "
                                "(build it with --include_imports)",
                                f->name, fds[i]->dependency[k]);
                goto done;
            }
            f->deps[f->n_deps++] = d;
        }
    }

    /* The services to list: those registered on this server that the set describes. */
    r->services = calloc((size_t)n_services + 1, sizeof(char *));
    if (!r->services) {
        rc = cm_err_set(err, -ENOMEM, "reflection: out of memory");
        goto done;
    }
    for (int i = 0; i < n_services; i++) {
        if (!find_sym(r, services[i])) {
            CM_LOG_WARN("reflection: service %s is not in the descriptor set", services[i]);
            continue;
        }
        if (!(r->services[r->n_services] = strdup(services[i]))) {
            rc = cm_err_set(err, -ENOMEM, "reflection: out of memory");
            goto done;
        }
        r->n_services++;
    }

done:
    if (fds)
        for (int i = 0; i < (r ? r->n_files : 0); i++)
            if (fds[i]) google__protobuf__file_descriptor_proto__free_unpacked(fds[i], NULL);
    free(fds);
    if (rc < 0) {
        rpc_reflection_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

void rpc_reflection_free(rpc_reflection *r)
{
    if (!r) return;
    for (int i = 0; i < r->n_files; i++) {
        free(r->files[i].name);
        free(r->files[i].deps);
    }
    for (int i = 0; i < r->n_syms; i++)
        free(r->syms[i].name);
    for (int i = 0; i < r->n_services; i++)
        free(r->services[i]);
    free(r->services);
    free(r->files);
    free(r->syms);
    free(r->set);
    free(r);
}

/* ---- the stream --------------------------------------------------------------------------------
 */

/* Per-stream state: which files this stream has already received. */
typedef struct refl_stream {
    uint8_t *sent; /* [n_files] */
} refl_stream;

static void refl_stream_free(void *p)
{
    refl_stream *st = p;
    if (st) free(st->sent);
    free(st);
}

/* Append file f and (depth first) its unsent dependencies to out[]. */
static void collect(const rpc_reflection *r, int f, uint8_t *sent, uint8_t *seen, int *out, int *n)
{
    if (seen[f]) return;
    seen[f] = 1;
    out[(*n)++] = f;
    for (int k = 0; k < r->files[f].n_deps; k++) {
        int d = r->files[f].deps[k];
        if (!sent[d]) collect(r, d, sent, seen, out, n);
    }
}

void rpc_reflection_info(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    const rpc_reflection *r = user;
    if (!msg) { /* the client half-closed: done */
        rpc_call_finish(c, RPC_OK, NULL);
        return;
    }
    refl_stream *st = rpc_call_data(c);
    if (!st) {
        st = calloc(1, sizeof(*st));
        if (st) st->sent = calloc((size_t)r->n_files + 1, 1);
        if (!st || !st->sent) {
            refl_stream_free(st);
            rpc_call_finish(c, RPC_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        rpc_call_set_data(c, st, refl_stream_free);
    }
    const Grpc__Reflection__V1__ServerReflectionRequest *req =
        (const Grpc__Reflection__V1__ServerReflectionRequest *)msg;

    Grpc__Reflection__V1__ServerReflectionResponse resp =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1__ListServiceResponse list =
        GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
    Grpc__Reflection__V1__FileDescriptorResponse files =
        GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1__ExtensionNumberResponse ext =
        GRPC__REFLECTION__V1__EXTENSION_NUMBER_RESPONSE__INIT;
    Grpc__Reflection__V1__ErrorResponse error = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
    char errmsg[320];
    /* The request is echoed; the response struct only reads it. */
    resp.valid_host = req->host;
    resp.original_request = (Grpc__Reflection__V1__ServerReflectionRequest *)(uintptr_t)req;

    Grpc__Reflection__V1__ServiceResponse *svc = NULL, **svcp = NULL;
    ProtobufCBinaryData *blobs = NULL;
    int *order = NULL;
    uint8_t *seen = NULL;
    int file = -1;
    const char *missing = NULL;

    switch (req->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        svc = calloc((size_t)r->n_services + 1, sizeof(*svc));
        svcp = calloc((size_t)r->n_services + 1, sizeof(*svcp));
        if (!svc || !svcp) break;
        for (int i = 0; i < r->n_services; i++) {
            grpc__reflection__v1__service_response__init(&svc[i]);
            svc[i].name = r->services[i];
            svcp[i] = &svc[i];
        }
        list.n_service = (size_t)r->n_services;
        list.service = svcp;
        resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        resp.list_services_response = &list;
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        file = find_file(r, req->file_by_filename);
        if (file < 0) missing = req->file_by_filename;
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL: {
        const refl_symbol *s = find_sym(r, req->file_containing_symbol);
        if (s)
            file = s->file;
        else
            missing = req->file_containing_symbol;
        break;
    }
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE: {
        const refl_symbol *s = find_sym(r, req->all_extension_numbers_of_type);
        if (!s || !s->message) {
            missing = req->all_extension_numbers_of_type;
            break;
        }
        ext.base_type_name = s->name; /* we define no extensions: the list is empty */
        resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
        resp.all_extension_numbers_response = &ext;
        break;
    }
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
        missing = req->file_containing_extension && req->file_containing_extension->containing_type
                      ? req->file_containing_extension->containing_type
                      : "extension";
        break;
    default:
        rpc_call_finish(c, RPC_INVALID_ARGUMENT, "reflection request without a message_request");
        return;
    }

    if (file >= 0) {
        order = calloc((size_t)r->n_files, sizeof(int));
        seen = calloc((size_t)r->n_files, 1);
        blobs = calloc((size_t)r->n_files, sizeof(*blobs));
        if (order && seen && blobs) {
            int n = 0;
            collect(r, file, st->sent, seen, order, &n);
            for (int i = 0; i < n; i++) {
                blobs[i].len = r->files[order[i]].len;
                blobs[i].data = r->files[order[i]].bytes;
                st->sent[order[i]] = 1;
            }
            files.n_file_descriptor_proto = (size_t)n;
            files.file_descriptor_proto = blobs;
            resp.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
            resp.file_descriptor_response = &files;
        }
    } else if (missing) {
        snprintf(errmsg, sizeof(errmsg), "not found: %.256s", missing);
        error.error_code = RPC_NOT_FOUND;
        error.error_message = errmsg;
        resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        resp.error_response = &error;
    }

    if (resp.message_response_case ==
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE__NOT_SET) {
        rpc_call_finish(c, RPC_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        int rc = rpc_call_send(c, &resp.base);
        if (rc == -EAGAIN)
            rpc_call_finish(c, RPC_RESOURCE_EXHAUSTED, "reflection client is not reading");
    }
    free(svc);
    free(svcp);
    free(order);
    free(seen);
    free(blobs);
}
