/*
 * kvstore-io-uring.c — the io_uring backend of the spill I/O shim (liburing).
 *
 * kvs_io_run keeps up to `depth` reads/writes in flight: it fills the submission queue,
 * submits them with one io_uring_submit_and_wait, reaps every completion that is ready,
 * refills, and so on. A short transfer (rare: a signal, or the end of the file) is finished
 * with pread/pwrite rather than resubmitted, which keeps the bookkeeping to one index per
 * SQE. Fixed buffers (kvs_io_register) let the pager's staging buffers skip the per-I/O page
 * pinning; arbitrary destinations use ordinary reads.
 *
 * Built only with KVSTORE_HAVE_LIBURING; otherwise kvs_io_uring_init says so and the caller
 * falls back to pread.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-io.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef KVSTORE_HAVE_LIBURING
#include <liburing.h>
#include <sys/uio.h>

typedef struct uring_io {
    kvs_io base; /* first: kvs_io * and uring_io * convert */
    struct io_uring ring;
    uint32_t depth;
    bool registered;
} uring_io;

static int uring_run(kvs_io *io_, kvs_io_op *ops, uint32_t n)
{
    uring_io *u = (uring_io *)io_;
    uint32_t next = 0, inflight = 0, finished = 0;
    int first = 0;
    while (finished < n) {
        /* queue as many as fit */
        while (next < n && inflight < u->depth) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
            if (!sqe) break;
            kvs_io_op *op = &ops[next];
            if (op->buf_index >= 0 && u->registered) {
                if (op->write)
                    io_uring_prep_write_fixed(sqe, op->fd, op->buf, (unsigned)op->len, op->off,
                                              op->buf_index);
                else
                    io_uring_prep_read_fixed(sqe, op->fd, op->buf, (unsigned)op->len, op->off,
                                             op->buf_index);
            } else if (op->write) {
                io_uring_prep_write(sqe, op->fd, op->buf, (unsigned)op->len, op->off);
            } else {
                io_uring_prep_read(sqe, op->fd, op->buf, (unsigned)op->len, op->off);
            }
            io_uring_sqe_set_data64(sqe, next);
            next++;
            inflight++;
        }
        int rc = io_uring_submit_and_wait(&u->ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -EBUSY) {
            /* the ring itself failed: finish the unsubmitted and in-flight ones synchronously
             * is unsafe for in-flight ones (they may still land), so wait for them first */
            struct io_uring_cqe *cqe;
            while (inflight > 0 && io_uring_wait_cqe(&u->ring, &cqe) == 0) {
                uint64_t i = io_uring_cqe_get_data64(cqe);
                if (i < n) {
                    int res = cqe->res;
                    ops[i].result = res < 0 ? res : kvs_io_sync_op(&ops[i], (size_t)res);
                    if (ops[i].result < 0 && !first) first = ops[i].result;
                }
                io_uring_cqe_seen(&u->ring, cqe);
                inflight--;
                finished++;
            }
            for (uint32_t i = next; i < n; i++) {
                ops[i].result = kvs_io_sync_op(&ops[i], 0);
                if (ops[i].result < 0 && !first) first = ops[i].result;
                finished++;
            }
            return first;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&u->ring, head, cqe)
        {
            uint64_t i = io_uring_cqe_get_data64(cqe);
            seen++;
            if (i >= n) continue;
            int res = cqe->res;
            if (res == -EINTR || res == -EAGAIN) res = 0; /* redo all of it below */
            if (res >= 0 && (size_t)res < ops[i].len)
                ops[i].result = kvs_io_sync_op(&ops[i], (size_t)res);
            else
                ops[i].result = res < 0 ? res : 0;
            if (ops[i].result < 0 && !first) first = ops[i].result;
            inflight--;
            finished++;
        }
        io_uring_cq_advance(&u->ring, seen);
    }
    return first;
}

static int uring_reg(kvs_io *io_, void *const *bufs, const size_t *lens, uint32_t n)
{
    uring_io *u = (uring_io *)io_;
    if (u->registered) {
        io_uring_unregister_buffers(&u->ring);
        u->registered = false;
    }
    struct iovec *iov = calloc(n ? n : 1, sizeof(*iov));
    if (!iov) return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = lens[i];
    }
    int rc = io_uring_register_buffers(&u->ring, iov, n);
    free(iov);
    if (rc == 0) u->registered = true;
    return rc;
}

static void uring_free(kvs_io *io_)
{
    uring_io *u = (uring_io *)io_;
    io_uring_queue_exit(&u->ring);
    free(u);
}

static const struct kvs_io_vtbl uring_vtbl = {
    .name = "io_uring",
    .run = uring_run,
    .reg = uring_reg,
    .free = uring_free,
};

int kvs_io_uring_init(uint32_t depth, kvs_io **out, cm_err *err)
{
    uring_io *u = calloc(1, sizeof(*u));
    if (!u) return cm_err_set(err, -ENOMEM, "kvstore io: out of memory");
    int rc = io_uring_queue_init(depth, &u->ring, 0);
    if (rc < 0) {
        free(u);
        return cm_err_set(err, rc, "io_uring_queue_init: %s (blocked by seccomp?)", strerror(-rc));
    }
    u->base.vt = &uring_vtbl;
    u->depth = depth;
    *out = &u->base;
    return 0;
}

#else /* !KVSTORE_HAVE_LIBURING */

int kvs_io_uring_init(uint32_t depth, kvs_io **out, cm_err *err)
{
    (void)depth;
    *out = NULL;
    return cm_err_set(err, -ENOSYS, "kvstore io: built without liburing");
}

#endif
