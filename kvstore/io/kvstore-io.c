/*
 * kvstore-io.c — backend choice and the pread/pwrite backend of the spill I/O shim.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-io.h"
#include "../kvstore.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

int kvs_io_sync_op(kvs_io_op *op, size_t done)
{
    uint8_t *p = op->buf;
    while (done < op->len) {
        ssize_t r = op->write ? pwrite(op->fd, p + done, op->len - done, (off_t)(op->off + done))
                              : pread(op->fd, p + done, op->len - done, (off_t)(op->off + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return -EIO; /* past the end of the spill file: it was truncated */
        done += (size_t)r;
    }
    return 0;
}

static int pread_run(kvs_io *io, kvs_io_op *ops, uint32_t n)
{
    (void)io;
    int first = 0;
    for (uint32_t i = 0; i < n; i++) {
        ops[i].result = kvs_io_sync_op(&ops[i], 0);
        if (ops[i].result < 0 && first == 0) first = ops[i].result;
    }
    return first;
}

static void pread_free(kvs_io *io) { free(io); }

static const struct kvs_io_vtbl pread_vtbl = {
    .name = "pread",
    .run = pread_run,
    .reg = NULL,
    .free = pread_free,
};

int kvs_io_pread_init(kvs_io **out, cm_err *err)
{
    kvs_io *io = calloc(1, sizeof(*io));
    if (!io) return cm_err_set(err, -ENOMEM, "kvstore io: out of memory");
    io->vt = &pread_vtbl;
    *out = io;
    return 0;
}

int kvs_io_init(int backend, uint32_t depth, kvs_io **out, cm_err *err)
{
    *out = NULL;
    if (backend == KVSTORE_IO_PREAD) return kvs_io_pread_init(out, err);
    int rc = kvs_io_uring_init(depth ? depth : 64, out, err);
    if (rc == 0 || backend == KVSTORE_IO_URING) return rc;
    CM_LOG_WARN("kvstore io: io_uring unavailable (%s), using pread", err ? err->msg : "");
    return kvs_io_pread_init(out, err);
}

void kvs_io_free(kvs_io *io)
{
    if (io) io->vt->free(io);
}

const char *kvs_io_name(const kvs_io *io) { return io ? io->vt->name : "none"; }

int kvs_io_register(kvs_io *io, void *const *bufs, const size_t *lens, uint32_t n)
{
    return io->vt->reg ? io->vt->reg(io, bufs, lens, n) : 0;
}

int kvs_io_run(kvs_io *io, kvs_io_op *ops, uint32_t n)
{
    return n ? io->vt->run(io, ops, n) : 0;
}
