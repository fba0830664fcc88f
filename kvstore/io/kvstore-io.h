/*
 * kvstore-io.h — the spill tier's file I/O shim: io_uring when the kernel and the container
 * allow it, plain pread/pwrite otherwise (container runtimes often block io_uring_setup with
 * seccomp, so AUTO probes it at init and falls back).
 *
 * The unit of work is a batch of independent reads/writes (kvs_io_op) that kvs_io_run
 * performs completely before returning: io_uring queues up to `depth` operations per
 * submission and resubmits short transfers; pread loops. Each op gets its own result, so a
 * failed block does not fail its neighbours. A kvs_io is not thread-safe: one per thread
 * (the pager has its own; the kvstore handle guards its one with a mutex).
 */
#ifndef KVSTORE_IO_H
#define KVSTORE_IO_H

#include "base/cm.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_io_op {
    int fd;
    bool write;
    void *buf;        /* len bytes; aligned as the fd requires (O_DIRECT) */
    size_t len;
    uint64_t off;
    int buf_index;    /* registered buffer (kvs_io_register) holding buf, or -1 */
    int result;       /* out: 0 when all len bytes moved, else a negative code */
} kvs_io_op;

typedef struct kvs_io kvs_io;

/* backend: enum kvstore_io_backend. Caller frees with kvs_io_free. */
int kvs_io_init(int backend, uint32_t depth, kvs_io **out, cm_err *err);
void kvs_io_free(kvs_io *io);
/* "io_uring" or "pread". */
const char *kvs_io_name(const kvs_io *io);
/* Register n buffers (io_uring fixed buffers; a no-op for pread). Returns 0 or -errno; on
 * failure ops simply must not use buf_index. */
int kvs_io_register(kvs_io *io, void *const *bufs, const size_t *lens, uint32_t n);
/* Run all n ops. Returns 0 if every op succeeded, else the first failing op's result. */
int kvs_io_run(kvs_io *io, kvs_io_op *ops, uint32_t n);

/* Backend constructors (kvstore-io.c, kvstore-io-uring.c). */
int kvs_io_pread_init(kvs_io **out, cm_err *err);
int kvs_io_uring_init(uint32_t depth, kvs_io **out, cm_err *err);

/* The backend table (STYLE §9). */
struct kvs_io_vtbl {
    const char *name;
    /* perform all ops (required) */
    int (*run)(kvs_io *io, kvs_io_op *ops, uint32_t n);
    /* register fixed buffers (optional: NULL = unsupported, treated as success) */
    int (*reg)(kvs_io *io, void *const *bufs, const size_t *lens, uint32_t n);
    /* release the backend (required) */
    void (*free)(kvs_io *io);
};

struct kvs_io {
    const struct kvs_io_vtbl *vt;
};

/* pread/pwrite one op to completion (used by both backends for short-transfer leftovers). */
int kvs_io_sync_op(kvs_io_op *op, size_t done);

#ifdef __cplusplus
}
#endif
#endif /* KVSTORE_IO_H */
