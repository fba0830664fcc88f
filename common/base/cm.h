/*
 * cm.h — the base layer every module of infinitehip builds on.
 *
 * Errors: library-style functions return 0 on success and -errno (or a negative CM_E* code)
 * on failure, and never set errno. When the caller wants a human-readable reason it passes a
 * `cm_err *` (may be NULL); the callee fills it with one line that names the problem.
 *
 * Bugs (broken invariants) abort loudly through CM_ASSERT / CM_ABORT with file and line.
 *
 * Logging: CM_LOG_* macros check the level before evaluating their arguments; the sink is a
 * settable callback (default: stderr).
 *
 * Thread pool: `cm_pool` runs a parallel-for over a fixed set of worker threads, made once at
 * startup. Workers spin briefly before sleeping so the many small dispatches of a decode step
 * (hundreds per token) do not pay a futex wake each.
 */
#ifndef CM_H
#define CM_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CM_API __attribute__((visibility("default")))
#define CM_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define CM_NORETURN __attribute__((noreturn))
#define CM_LIKELY(x) __builtin_expect(!!(x), 1)
#define CM_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define CM_API
#define CM_PRINTF(a, b)
#define CM_NORETURN
#define CM_LIKELY(x) (x)
#define CM_UNLIKELY(x) (x)
#endif

#define CM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CM_MAX(a, b) ((a) > (b) ? (a) : (b))
#define CM_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- errors ------------------------------------------------------------------------------ */

/* Project-specific negative codes, beyond -errno (errno values stay below 4096). */
enum cm_errcode {
    CM_EFORMAT = 5001,      /* malformed / corrupt input file or data */
    CM_EUNSUPPORTED = 5002, /* valid input we do not support (architecture, dtype, ...) */
    CM_ELIMIT = 5003,       /* a configured limit was exceeded (context length, ...) */
};

typedef struct cm_err {
    int code;       /* the negative code last set, 0 if none */
    char msg[512];  /* one line naming the problem */
} cm_err;

/* Fill `e` (if non-NULL) with `code` (negative) and a formatted message; returns `code`. */
CM_API int cm_err_set(cm_err *e, int code, const char *fmt, ...) CM_PRINTF(3, 4);
/* Prefix an existing message with more context ("loading model: " + old). Returns e->code. */
CM_API int cm_err_prefix(cm_err *e, const char *fmt, ...) CM_PRINTF(2, 3);
/* A static string for a negative code (strerror for -errno values). */
CM_API const char *cm_strerror(int code);

/* ---- bugs -------------------------------------------------------------------------------- */

CM_API CM_NORETURN void cm_abort_at(const char *file, int line, const char *fmt, ...)
    CM_PRINTF(3, 4);
#define CM_ABORT(...) cm_abort_at(__FILE__, __LINE__, __VA_ARGS__)
#define CM_ASSERT(x)                                                                           \
    do {                                                                                       \
        if (CM_UNLIKELY(!(x))) cm_abort_at(__FILE__, __LINE__, "assertion failed: %s", #x);    \
    } while (0)

/* ---- logging ----------------------------------------------------------------------------- */

enum cm_log_level { CM_LOG_LEVEL_ERROR = 0, CM_LOG_LEVEL_WARN, CM_LOG_LEVEL_INFO, CM_LOG_LEVEL_DEBUG };
typedef void (*cm_log_sink_fn)(int level, const char *msg, void *user);

CM_API extern int cm_log_level; /* messages above this level are dropped (default INFO) */
CM_API void cm_log_set_sink(cm_log_sink_fn fn, void *user); /* NULL restores stderr */
CM_API void cm_log_write(int level, const char *fmt, ...) CM_PRINTF(2, 3);

#define CM_LOG(level, ...)                                                                     \
    do {                                                                                       \
        if ((level) <= cm_log_level) cm_log_write((level), __VA_ARGS__);                       \
    } while (0)
#define CM_LOG_ERROR(...) CM_LOG(CM_LOG_LEVEL_ERROR, __VA_ARGS__)
#define CM_LOG_WARN(...) CM_LOG(CM_LOG_LEVEL_WARN, __VA_ARGS__)
#define CM_LOG_INFO(...) CM_LOG(CM_LOG_LEVEL_INFO, __VA_ARGS__)
#define CM_LOG_DEBUG(...) CM_LOG(CM_LOG_LEVEL_DEBUG, __VA_ARGS__)

/* ---- time and memory --------------------------------------------------------------------- */

CM_API uint64_t cm_time_ns(void); /* monotonic clock */
/* Aligned allocation (alignment a power of two ≥ sizeof(void*)); free with cm_free_aligned.
 * Returns NULL on failure. */
CM_API void *cm_alloc_aligned(size_t size, size_t align);
CM_API void cm_free_aligned(void *p);

/* ---- thread pool ------------------------------------------------------------------------- */

typedef struct cm_pool cm_pool;
/* Task body: called once per thread with ith in [0, nth). */
typedef void (*cm_pool_fn)(void *ctx, int ith, int nth);

/* Make a pool of n_threads (≥ 1; the calling thread is thread 0, so n_threads-1 are spawned).
 * Returns NULL on failure. Free with cm_pool_free. */
CM_API cm_pool *cm_pool_init(int n_threads);
CM_API void cm_pool_free(cm_pool *pool);
CM_API int cm_pool_size(const cm_pool *pool);
/* Run fn(ctx, ith, nth) on every thread of the pool and wait for all. Not reentrant. */
CM_API void cm_pool_run(cm_pool *pool, cm_pool_fn fn, void *ctx);
/* Split [0, n) into nth nearly equal parts; writes part ith to [*lo, *hi). */
static inline void cm_split_range(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi)
{
    int64_t per = n / nth, rem = n % nth;
    *lo = ith * per + (ith < rem ? ith : rem);
    *hi = *lo + per + (ith < rem ? 1 : 0);
}
/* Number of online CPUs (≥ 1). */
CM_API int cm_num_cpus(void);

#ifdef __cplusplus
}
#endif
#endif /* CM_H */
