/*
 * rpc-health.c — grpc.health.v1.Health served from C (shared/GRPC-C.md §6).
 *
 * State: a small table of service name → SERVING / NOT_SERVING. "" (the whole server) and every
 * registered service start NOT_SERVING: a worker says SERVING only once its model is loaded and
 * its store attached. Check answers from the table (NOT_FOUND for unknown names). Watch sends
 * the current status at once (SERVICE_UNKNOWN for unknown names, as the protocol says), then one
 * message on every change, and stays open until the client cancels or the server shuts down.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/health/v1/health.pb-c.h"
#include "rpc-impl.h"

typedef struct health_entry {
    char *name;
    int status; /* Grpc__Health__V1__HealthCheckResponse__ServingStatus */
} health_entry;

typedef struct health_watcher {
    rpc_call *call; /* referenced */
    char *name;
    int last_sent;
} health_watcher;

struct rpc_health {
    pthread_mutex_t mu;
    health_entry *entries;
    int n_entries, cap_entries;
    health_watcher *watchers;
    int n_watchers, cap_watchers;
};

#define ST_SERVING GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
#define ST_NOT_SERVING GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
#define ST_UNKNOWN GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN

static int find_locked(const rpc_health *h, const char *name)
{
    for (int i = 0; i < h->n_entries; i++)
        if (!strcmp(h->entries[i].name, name)) return i;
    return -1;
}

static int add_locked(rpc_health *h, const char *name, int status)
{
    if (h->n_entries == h->cap_entries) {
        int cap = h->cap_entries ? 2 * h->cap_entries : 8;
        health_entry *e = realloc(h->entries, (size_t)cap * sizeof(*e));
        if (!e) return -ENOMEM;
        h->entries = e;
        h->cap_entries = cap;
    }
    char *n = strdup(name);
    if (!n) return -ENOMEM;
    h->entries[h->n_entries++] = (health_entry){n, status};
    return 0;
}

static int grow_watchers_locked(rpc_health *h)
{
    if (h->n_watchers < h->cap_watchers) return 0;
    int cap = h->cap_watchers ? 2 * h->cap_watchers : 8;
    health_watcher *w = realloc(h->watchers, (size_t)cap * sizeof(*w));
    if (!w) return -ENOMEM;
    h->watchers = w;
    h->cap_watchers = cap;
    return 0;
}

int rpc_health_init(rpc_health **out, const char *const *services, int n_services)
{
    rpc_health *h = calloc(1, sizeof(*h));
    if (!h) return -ENOMEM;
    pthread_mutex_init(&h->mu, NULL);
    *out = h;
    int rc = add_locked(h, "", ST_NOT_SERVING);
    for (int i = 0; i < n_services && rc == 0; i++)
        rc = add_locked(h, services[i], ST_NOT_SERVING);
    return rc;
}

void rpc_health_free(rpc_health *h)
{
    if (!h) return;
    for (int i = 0; i < h->n_entries; i++)
        free(h->entries[i].name);
    for (int i = 0; i < h->n_watchers; i++) {
        rpc_call_unref(h->watchers[i].call);
        free(h->watchers[i].name);
    }
    free(h->entries);
    free(h->watchers);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

static void send_status(rpc_call *c, int status)
{
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    /* -EAGAIN only if the client stopped reading 64 updates ago; it then misses this one. */
    rpc_call_send(c, &r.base);
}

/* Tell the watchers of `name` its new status. Caller holds h->mu (then each call's mutex). */
static void notify_locked(rpc_health *h, const char *name, int status)
{
    for (int i = 0; i < h->n_watchers; i++) {
        health_watcher *w = &h->watchers[i];
        if (strcmp(w->name, name) || w->last_sent == status) continue;
        w->last_sent = status;
        send_status(w->call, status);
    }
}

int rpc_health_update(rpc_health *h, const char *service, bool serving)
{
    int status = serving ? ST_SERVING : ST_NOT_SERVING, rc = 0;
    pthread_mutex_lock(&h->mu);
    int i = find_locked(h, service);
    if (i < 0)
        rc = add_locked(h, service, status);
    else
        h->entries[i].status = status;
    if (rc == 0) notify_locked(h, service, status);
    pthread_mutex_unlock(&h->mu);
    return rc;
}

void rpc_health_set_all(rpc_health *h, bool serving)
{
    int status = serving ? ST_SERVING : ST_NOT_SERVING;
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n_entries; i++) {
        h->entries[i].status = status;
        notify_locked(h, h->entries[i].name, status);
    }
    pthread_mutex_unlock(&h->mu);
}

void rpc_health_end_watches(rpc_health *h)
{
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n_watchers; i++) {
        rpc_call_finish(h->watchers[i].call, RPC_OK, NULL);
        rpc_call_unref(h->watchers[i].call);
        free(h->watchers[i].name);
    }
    h->n_watchers = 0;
    pthread_mutex_unlock(&h->mu);
}

void rpc_health_check(rpc_call *c, const ProtobufCMessage *req, void *user)
{
    rpc_health *h = user;
    const Grpc__Health__V1__HealthCheckRequest *r =
        (const Grpc__Health__V1__HealthCheckRequest *)req;
    pthread_mutex_lock(&h->mu);
    int i = find_locked(h, r->service);
    int status = i >= 0 ? h->entries[i].status : -1;
    pthread_mutex_unlock(&h->mu);
    if (status < 0) {
        rpc_call_finish(c, RPC_NOT_FOUND, "unknown service '%s'", r->service);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    rpc_call_reply(c, &resp.base);
}

void rpc_health_watch(rpc_call *c, const ProtobufCMessage *req, void *user)
{
    rpc_health *h = user;
    const Grpc__Health__V1__HealthCheckRequest *r =
        (const Grpc__Health__V1__HealthCheckRequest *)req;
    pthread_mutex_lock(&h->mu);
    int i = find_locked(h, r->service);
    int status = i >= 0 ? h->entries[i].status : ST_UNKNOWN;
    char *name = strdup(r->service);
    if (!name || grow_watchers_locked(h) < 0) {
        pthread_mutex_unlock(&h->mu);
        free(name);
        rpc_call_finish(c, RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    rpc_call_ref(c);
    h->watchers[h->n_watchers++] = (health_watcher){c, name, status};
    send_status(c, status);
    pthread_mutex_unlock(&h->mu);
}

void rpc_health_watch_cancel(rpc_call *c, void *user)
{
    rpc_health *h = user;
    rpc_call *drop = NULL;
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n_watchers; i++) {
        if (h->watchers[i].call != c) continue;
        drop = c;
        free(h->watchers[i].name);
        h->watchers[i] = h->watchers[--h->n_watchers];
        break;
    }
    pthread_mutex_unlock(&h->mu);
    if (drop) rpc_call_unref(drop);
}
