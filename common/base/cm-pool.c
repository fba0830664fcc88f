/*
 * cm-pool.c — a small fork/join thread pool for the CPU backend.
 *
 * A decode step of a small model issues a few hundred parallel regions of a few microseconds
 * each, so the wake-up path matters more than anything else here: workers spin on an atomic
 * generation counter for a while (cheap when threads ≤ cores) and only then sleep on a
 * condition variable. The caller is thread 0 and works too.
 */
#define _POSIX_C_SOURCE 200809L
#include "cm.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define CM_POOL_SPIN 200000 /* spins before a worker sleeps */

struct cm_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t gen;   /* bumped by the caller for each job */
    _Atomic int pending;    /* workers still running the current job */
    _Atomic int sleepers;   /* workers blocked on cv */
    _Atomic int quit;
    cm_pool_fn fn;          /* current job, valid while pending > 0 */
    void *ctx;
};

struct worker_arg {
    cm_pool *pool;
    int ith;
};

static void *worker_main(void *p)
{
    struct worker_arg *wa = p;
    cm_pool *pool = wa->pool;
    int ith = wa->ith;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) == seen) {
            if (atomic_load_explicit(&pool->quit, memory_order_relaxed)) return NULL;
            if (++spins < CM_POOL_SPIN) continue;
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->sleepers, 1);
            while (atomic_load(&pool->gen) == seen && !atomic_load(&pool->quit))
                pthread_cond_wait(&pool->cv, &pool->mu);
            atomic_fetch_sub(&pool->sleepers, 1);
            pthread_mutex_unlock(&pool->mu);
            spins = 0;
        }
        seen = g;
        if (atomic_load(&pool->quit)) return NULL;
        pool->fn(pool->ctx, ith, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
    }
}

cm_pool *cm_pool_init(int n_threads)
{
    if (n_threads < 1) n_threads = 1;
    cm_pool *pool = calloc(1, sizeof(*pool));
    if (!pool) return NULL;
    pool->n = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    pool->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!pool->threads) goto err;
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (!wa) goto err_threads;
        wa->pool = pool;
        wa->ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->n = i; /* only i-1 workers exist */
            goto err_threads;
        }
    }
    return pool;
err_threads:
    cm_pool_free(pool);
    return NULL;
err:
    free(pool);
    return NULL;
}

void cm_pool_free(cm_pool *pool)
{
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->quit, 1);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool->threads);
    free(pool);
}

int cm_pool_size(const cm_pool *pool)
{
    return pool ? pool->n : 1;
}

void cm_pool_run(cm_pool *pool, cm_pool_fn fn, void *ctx)
{
    if (!pool || pool->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: ordered before the sleepers load */
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
    fn(ctx, 0, pool->n);
    int spins = 0;
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0)
        if (++spins > 1000) sched_yield();
}

int cm_num_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
