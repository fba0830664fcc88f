/*
 * kvtest.h — helpers shared by the kvstore tests: CHECK counters, scratch directories, and
 * self-describing block contents.
 *
 * A test block starts with a 32-byte tag (magic, sequence id and gen of its writer, token
 * block, layer, a seed) followed by bytes generated from the tag, so any reader can tell
 * whether a block is complete and whose it is without knowing who wrote it.
 */
#ifndef KVTEST_H
#define KVTEST_H

#include "kvstore-impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

/* A private directory for segments (IHIP_KV_TMP or /tmp) — on disk, so O_DIRECT works. */
static inline void kvt_dir(char *out, size_t cap, const char *what)
{
    const char *base = getenv("IHIP_KV_TMP");
    if (!base || !*base) base = "/tmp";
    mkdir(base, 0770);
    snprintf(out, cap, "%s/kvt-%s-%ld", base, what, (long)getpid());
    mkdir(out, 0770);
}

static inline void kvt_rmdir(const char *dir)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "note: could not remove %s\n", dir);
}

#define KVT_MAGIC UINT64_C(0x4b56544553544b56)

typedef struct kvt_tag {
    uint64_t magic;
    uint32_t seq, gen, tb, layer;
    uint64_t seed;
} kvt_tag;

static inline uint64_t kvt_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static inline void kvt_fill(void *dst, size_t n, uint32_t seq, uint32_t gen, uint32_t tb,
                            uint32_t layer, uint64_t seed)
{
    kvt_tag t = {KVT_MAGIC, seq, gen, tb, layer, seed | 1};
    memcpy(dst, &t, sizeof(t));
    uint64_t s = t.seed ^ ((uint64_t)seq << 40) ^ ((uint64_t)gen << 20) ^ ((uint64_t)tb << 8) ^
                 layer;
    if (!s) s = 1;
    uint8_t *p = (uint8_t *)dst + sizeof(t);
    for (size_t i = 0; i + 8 <= n - sizeof(t); i += 8) {
        uint64_t v = kvt_next(&s);
        memcpy(p + i, &v, 8);
    }
}

/* 0 if dst is a complete block with that tb/layer; fills *tag. */
static inline int kvt_verify(const void *src, size_t n, uint32_t tb, uint32_t layer, kvt_tag *tag)
{
    kvt_tag t;
    memcpy(&t, src, sizeof(t));
    if (tag) *tag = t;
    if (t.magic != KVT_MAGIC) return -1;
    if (t.tb != tb || t.layer != layer) return -2;
    uint64_t s = t.seed ^ ((uint64_t)t.seq << 40) ^ ((uint64_t)t.gen << 20) ^ ((uint64_t)tb << 8) ^
                 layer;
    if (!s) s = 1;
    const uint8_t *p = (const uint8_t *)src + sizeof(t);
    for (size_t i = 0; i + 8 <= n - sizeof(t); i += 8) {
        uint64_t v = kvt_next(&s), got;
        memcpy(&got, p + i, 8);
        if (got != v) return -3;
    }
    return 0;
}

#endif /* KVTEST_H */
