/*
 * cm.c — errors, assertions, logging, time and aligned memory for every module.
 */
#define _POSIX_C_SOURCE 200809L
#include "cm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int cm_log_level = CM_LOG_LEVEL_INFO;
static cm_log_sink_fn log_sink;
static void *log_sink_user;

int cm_err_set(cm_err *e, int code, const char *fmt, ...)
{
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
        va_end(ap);
        e->code = code;
    }
    return code;
}

int cm_err_prefix(cm_err *e, const char *fmt, ...)
{
    if (!e) return 0;
    char pre[256], old[sizeof(e->msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof(pre), fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof(old));
    size_t np = strlen(pre);
    if (np >= sizeof(e->msg)) np = sizeof(e->msg) - 1;
    memcpy(e->msg, pre, np);
    size_t room = sizeof(e->msg) - 1 - np, no = strnlen(old, sizeof(old) - 1);
    if (no > room) no = room;
    memcpy(e->msg + np, old, no);
    e->msg[np + no] = '\0';
    return e->code;
}

const char *cm_strerror(int code)
{
    switch (-code) {
    case CM_EFORMAT: return "malformed input";
    case CM_EUNSUPPORTED: return "unsupported";
    case CM_ELIMIT: return "limit exceeded";
    default: return strerror(-code);
    }
}

void cm_abort_at(const char *file, int line, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s:%d: fatal: %s\n", file, line, buf);
    fflush(stderr);
    abort();
}

void cm_log_set_sink(cm_log_sink_fn fn, void *user)
{
    log_sink = fn;
    log_sink_user = user;
}

void cm_log_write(int level, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (log_sink) {
        log_sink(level, buf, log_sink_user);
        return;
    }
    static const char *names[] = {"error", "warn", "info", "debug"};
    const char *name = (level >= 0 && level <= CM_LOG_LEVEL_DEBUG) ? names[level] : "log";
    fprintf(stderr, "[%s] %s\n", name, buf);
}

uint64_t cm_time_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void *cm_alloc_aligned(size_t size, size_t align)
{
    void *p = NULL;
    if (size == 0) size = align;
    if (posix_memalign(&p, align, size) != 0) return NULL;
    return p;
}

void cm_free_aligned(void *p)
{
    free(p);
}
