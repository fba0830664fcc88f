/*
 * kvstore-kvcache.c — converts a model's per-layer KV rows ([token][kv_head*head_dim]) to and
 * from kvstore blocks ([K|V][kv_head][token][head_dim]); see kvstore-kvcache.h.
 *
 * Conversion goes element by element through float when the row type and the segment dtype
 * differ, and by memcpy of head_dim-element runs when they are equal (the common case: F16
 * cache, F16 segment), so a round trip is bit-exact.
 */
#define _POSIX_C_SOURCE 200809L

#include "kvstore-kvcache.h"

#include "tensor/tensor.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t kvc_elem_size(uint32_t t)
{
    switch (t) {
    case KVSTORE_DTYPE_F32: return 4;
    case KVSTORE_DTYPE_F16:
    case KVSTORE_DTYPE_BF16: return 2;
    default: return 0;
    }
}

size_t kvstore_kvcache_row_bytes(const kvstore_geometry *g, uint32_t elem_type)
{
    if (!g)
        return 0;
    return (size_t)g->n_kv_heads * g->head_dim * kvc_elem_size(elem_type);
}

static float kvc_get(const void *p, size_t i, uint32_t t)
{
    switch (t) {
    case KVSTORE_DTYPE_F32: return ((const float *)p)[i];
    case KVSTORE_DTYPE_F16: return tn_fp16_to_fp32(((const uint16_t *)p)[i]);
    default: return tn_bf16_to_fp32(((const uint16_t *)p)[i]);
    }
}

static void kvc_put(void *p, size_t i, uint32_t t, float v)
{
    switch (t) {
    case KVSTORE_DTYPE_F32: ((float *)p)[i] = v; break;
    case KVSTORE_DTYPE_F16: ((uint16_t *)p)[i] = tn_fp32_to_fp16(v); break;
    default: ((uint16_t *)p)[i] = tn_fp32_to_bf16(v); break;
    }
}

/* Copy n elements from src (type ts) to dst (type td). */
static void kvc_convert(void *dst, uint32_t td, const void *src, uint32_t ts, size_t n)
{
    if (td == ts) {
        memcpy(dst, src, n * kvc_elem_size(td));
        return;
    }
    for (size_t i = 0; i < n; i++)
        kvc_put(dst, i, td, kvc_get(src, i, ts));
}

static int kvc_check(const kvstore_geometry *g, uint32_t t0, uint32_t n, size_t row_stride,
                     uint32_t elem_type)
{
    if (!g || kvc_elem_size(g->dtype) == 0 || kvc_elem_size(elem_type) == 0)
        return -EINVAL;
    if (g->tokens_per_block == 0 || t0 > g->tokens_per_block || n > g->tokens_per_block - t0)
        return -EINVAL;
    if (row_stride < kvstore_kvcache_row_bytes(g, elem_type))
        return -EINVAL;
    /* the block must hold what the geometry says (bytes_per_block may be larger) */
    if ((uint64_t)2 * g->n_kv_heads * g->tokens_per_block * g->head_dim * kvc_elem_size(g->dtype) >
        g->bytes_per_block)
        return -EINVAL;
    return 0;
}

/* Byte offset inside a block of (kv 0=K/1=V, head h, token t). */
static size_t kvc_block_off(const kvstore_geometry *g, uint32_t kv, uint32_t h, uint32_t t)
{
    size_t es = kvc_elem_size(g->dtype);
    return ((((size_t)kv * g->n_kv_heads + h) * g->tokens_per_block + t) * g->head_dim) * es;
}

int kvstore_kvcache_block_to_rows(const kvstore_geometry *g, const void *block, uint32_t t0,
                                  uint32_t n, void *k_rows, void *v_rows, size_t row_stride,
                                  uint32_t elem_type)
{
    int rc = kvc_check(g, t0, n, row_stride, elem_type);
    if (rc)
        return rc;
    if (!block || (n && (!k_rows || !v_rows)))
        return -EINVAL;
    size_t es = kvc_elem_size(elem_type);
    for (uint32_t kv = 0; kv < 2; kv++) {
        unsigned char *rows = kv ? (unsigned char *)v_rows : (unsigned char *)k_rows;
        for (uint32_t i = 0; i < n; i++) {
            unsigned char *row = rows + (size_t)i * row_stride;
            for (uint32_t h = 0; h < g->n_kv_heads; h++)
                kvc_convert(row + (size_t)h * g->head_dim * es, elem_type,
                            (const unsigned char *)block + kvc_block_off(g, kv, h, t0 + i),
                            g->dtype, g->head_dim);
        }
    }
    return 0;
}

int kvstore_kvcache_rows_to_block(const kvstore_geometry *g, void *block, uint32_t t0, uint32_t n,
                                  const void *k_rows, const void *v_rows, size_t row_stride,
                                  uint32_t elem_type)
{
    int rc = kvc_check(g, t0, n, row_stride, elem_type);
    if (rc)
        return rc;
    if (!block || (n && (!k_rows || !v_rows)))
        return -EINVAL;
    size_t es = kvc_elem_size(elem_type);
    for (uint32_t kv = 0; kv < 2; kv++) {
        const unsigned char *rows = kv ? (const unsigned char *)v_rows
                                       : (const unsigned char *)k_rows;
        for (uint32_t i = 0; i < n; i++) {
            const unsigned char *row = rows + (size_t)i * row_stride;
            for (uint32_t h = 0; h < g->n_kv_heads; h++)
                kvc_convert((unsigned char *)block + kvc_block_off(g, kv, h, t0 + i), g->dtype,
                            row + (size_t)h * g->head_dim * es, elem_type, g->head_dim);
        }
    }
    return 0;
}

int kvstore_kvcache_store(kvstore *kv, kvstore_seq_ref seq, uint32_t layer, const void *k_rows,
                          const void *v_rows, size_t row_stride, uint32_t elem_type,
                          uint32_t tok0, uint32_t n_tok, cm_err *err)
{
    if (!kv)
        return -EINVAL;
    const kvstore_geometry *g = kvstore_get_geometry(kv);
    int rc = kvc_check(g, 0, 0, row_stride, elem_type);
    if (rc || (n_tok && (!k_rows || !v_rows)) || (uint64_t)tok0 + n_tok > UINT32_MAX) {
        cm_err_set(err, -EINVAL, "kvcache store: bad arguments (type %u, stride %zu)",
                   (unsigned)elem_type, row_stride);
        return -EINVAL;
    }
    if (layer >= g->n_layers) {
        cm_err_set(err, -EINVAL, "kvcache store: layer %u of %u", (unsigned)layer,
                   (unsigned)g->n_layers);
        return -EINVAL;
    }
    uint32_t tpb = g->tokens_per_block;
    uint32_t done = 0;
    while (done < n_tok) {
        uint32_t t = tok0 + done;
        uint32_t tb = t / tpb, t0 = t % tpb;
        uint32_t n = tpb - t0;
        if (n > n_tok - done)
            n = n_tok - done;
        /* alloc finds an existing block again, so a partial block keeps its other tokens */
        void *data = NULL;
        rc = kvstore_block_alloc(kv, seq, tb, layer, &data, err);
        if (rc)
            return rc;
        rc = kvstore_kvcache_rows_to_block(g, data, t0, n,
                                           (const unsigned char *)k_rows + (size_t)done * row_stride,
                                           (const unsigned char *)v_rows + (size_t)done * row_stride,
                                           row_stride, elem_type);
        CM_ASSERT(rc == 0);
        done += n;
    }
    return 0;
}

int kvstore_kvcache_load(kvstore *kv, const kvstore_lease *lease, uint32_t layer, uint32_t tok0,
                         uint32_t n_tok, void *k_rows, void *v_rows, size_t row_stride,
                         uint32_t elem_type, cm_err *err)
{
    if (!kv || !lease)
        return -EINVAL;
    const kvstore_geometry *g = kvstore_get_geometry(kv);
    int rc = kvc_check(g, 0, 0, row_stride, elem_type);
    if (rc || (n_tok && (!k_rows || !v_rows)) || (uint64_t)tok0 + n_tok > UINT32_MAX) {
        cm_err_set(err, -EINVAL, "kvcache load: bad arguments (type %u, stride %zu)",
                   (unsigned)elem_type, row_stride);
        return -EINVAL;
    }
    if (layer >= g->n_layers) {
        cm_err_set(err, -EINVAL, "kvcache load: layer %u of %u", (unsigned)layer,
                   (unsigned)g->n_layers);
        return -EINVAL;
    }
    if (n_tok == 0)
        return 0;
    void *buf = malloc(g->bytes_per_block);
    if (!buf) {
        cm_err_set(err, -ENOMEM, "kvcache load: out of memory");
        return -ENOMEM;
    }
    uint32_t tpb = g->tokens_per_block;
    uint32_t done = 0;
    rc = 0;
    while (done < n_tok) {
        uint32_t t = tok0 + done;
        uint32_t tb = t / tpb, t0 = t % tpb;
        uint32_t n = tpb - t0;
        if (n > n_tok - done)
            n = n_tok - done;
        rc = kvstore_block_read(kv, lease, tb, layer, buf, err);
        if (rc)
            break;
        rc = kvstore_kvcache_block_to_rows(g, buf, t0, n,
                                           (unsigned char *)k_rows + (size_t)done * row_stride,
                                           (unsigned char *)v_rows + (size_t)done * row_stride,
                                           row_stride, elem_type);
        CM_ASSERT(rc == 0);
        done += n;
    }
    free(buf);
    return rc;
}

/* ---- model fingerprint ------------------------------------------------------------------- */

#define KVC_FP_HEAD ((size_t)8 << 20)
#define KVC_FP_TAIL ((size_t)1 << 20)

static uint64_t kvc_fnv(uint64_t h, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

/* Hash n bytes of f from off; -errno on a read error or a short file. */
static int kvc_fnv_range(FILE *f, long off, size_t n, uint64_t *h, unsigned char *buf, size_t cap)
{
    if (fseek(f, off, SEEK_SET) != 0)
        return -EIO;
    while (n) {
        size_t want = n < cap ? n : cap;
        size_t got = fread(buf, 1, want, f);
        if (got != want)
            return -EIO;
        *h = kvc_fnv(*h, buf, got);
        n -= got;
    }
    return 0;
}

int kvstore_model_fingerprint(const char *path, uint64_t *out, cm_err *err)
{
    if (!path || !out)
        return -EINVAL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = -errno;
        cm_err_set(err, e, "fingerprint: cannot open %s", path);
        return e;
    }
    int rc = -EIO;
    unsigned char *buf = malloc(1 << 16);
    long size;
    if (!buf || fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0) {
        rc = buf ? -EIO : -ENOMEM;
        goto out;
    }
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    unsigned char sz[8];
    for (int i = 0; i < 8; i++)
        sz[i] = (unsigned char)((uint64_t)size >> (8 * i));
    h = kvc_fnv(h, sz, 8);
    size_t head = (size_t)size < KVC_FP_HEAD ? (size_t)size : KVC_FP_HEAD;
    rc = kvc_fnv_range(f, 0, head, &h, buf, 1 << 16);
    if (!rc && (size_t)size > head) {
        size_t tail = (size_t)size - head < KVC_FP_TAIL ? (size_t)size - head : KVC_FP_TAIL;
        rc = kvc_fnv_range(f, size - (long)tail, tail, &h, buf, 1 << 16);
    }
    if (!rc)
        *out = h ? h : 1;
out:
    if (rc)
        cm_err_set(err, rc, "fingerprint: cannot read %s", path);
    free(buf);
    fclose(f);
    return rc;
}
