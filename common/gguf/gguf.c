/*
 * gguf.c — the GGUF v2/v3 reader: map a file, validate all of it once, then hand out pointers.
 *
 * Layout (little-endian, packed):
 *   "GGUF" | u32 version | u64 tensor_count | u64 kv_count
 *   kv_count × { str key | u32 vtype | value }          str = u64 len + bytes
 *       value of ARRAY = u32 elem vtype | u64 count | count elements (no nested arrays)
 *   tensor_count × { str name | u32 n_dims | u64 ne[n_dims] | u32 type | u64 offset }
 *   padding up to `general.alignment` (u32, default 32) | data section
 *
 * Every read goes through a bounds-checked cursor (struct rd), so no byte outside [0, size)
 * is ever touched. Counts read from the file are checked against what could possibly fit in
 * the bytes that remain *before* anything is allocated for them, so a hostile count can cost
 * at most a small multiple of the file's size in memory. Byte offsets in error messages are
 * absolute file offsets.
 *
 * Lookups by name use two open-addressing hash tables (FNV-1a) built at open; building them is
 * also how duplicate keys and tensor names are found.
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include "../tensor/tensor.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_DEFAULT_ALIGNMENT 32
/* The smallest possible encodings, used to cap hostile counts: a key-value is a key of ≥ 1
 * byte (8 + 1), a type (4) and a value of ≥ 1 byte; a tensor info is a name of ≥ 1 byte
 * (8 + 1), n_dims (4), one dim (8), a type (4) and an offset (8). */
#define GGUF_MIN_KV_BYTES 14u
#define GGUF_MIN_TI_BYTES 33u

struct gguf_file {
    const uint8_t *base; /* the file's bytes */
    uint64_t size;
    void *map; /* our mmap of the file (gguf_open), NULL for gguf_open_mem */
    size_t map_len;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset; /* start of the data section, a multiple of alignment */
    int64_t n_kv;
    gguf_kv *kvs;
    int64_t n_tensors;
    gguf_tensor *tensors;
    gguf_str *strs; /* pool: the strings of every string array and STRING scalar */
    /* Hash tables: slot holds index + 1 (0 = empty); size is a power of two ≥ 2 × count. */
    uint64_t *kv_tab;
    uint64_t kv_mask;
    uint64_t *t_tab;
    uint64_t t_mask;
};

/* ---- little-endian loads (the file is LE whatever the host is) ---------------------------- */

static uint16_t ld_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (uint16_t)p[1] << 8);
}

static uint32_t ld_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t ld_u64(const uint8_t *p)
{
    return (uint64_t)ld_u32(p) | (uint64_t)ld_u32(p + 4) << 32;
}

/* Size of one element of a fixed-size value type; 0 for STRING, ARRAY and unknown types. */
static uint64_t vt_size(uint32_t t)
{
    static const uint8_t sz[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < GGUF_VT_COUNT ? sz[t] : 0;
}

const char *gguf_vtype_name(uint32_t type)
{
    static const char *const names[GGUF_VT_COUNT] = {
        "uint8", "int8",   "uint16", "int16",  "uint32", "int32",   "float32",
        "bool",  "string", "array",  "uint64", "int64",  "float64",
    };
    return type < GGUF_VT_COUNT ? names[type] : "unknown";
}

/* A printable, bounded copy of a name for error messages: non-printable and non-ASCII bytes
 * become \xNN, and long names are cut with "...". */
static const char *safe_name(char *buf, size_t cap, gguf_str s)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    uint64_t i = 0;
    for (; i < s.len && o + 8 < cap && i < 64; i++) {
        uint8_t c = (uint8_t)s.ptr[i];
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            buf[o++] = (char)c;
        } else {
            buf[o++] = '\\';
            buf[o++] = 'x';
            buf[o++] = hex[c >> 4];
            buf[o++] = hex[c & 15];
        }
    }
    if (i < s.len) {
        buf[o++] = '.';
        buf[o++] = '.';
        buf[o++] = '.';
    }
    buf[o] = '\0';
    return buf;
}

/* ---- the bounds-checked cursor ------------------------------------------------------------ */

typedef struct rd {
    const uint8_t *b;
    uint64_t size;
    uint64_t off;
    cm_err *err;
    char ctx[160]; /* what is being read, for messages: "" or "key 'x': " */
} rd;

static uint64_t rd_left(const rd *r)
{
    return r->size - r->off;
}

static int rd_need(rd *r, uint64_t n, const char *what)
{
    if (n <= rd_left(r)) return 0;
    return cm_err_set(r->err, -CM_EFORMAT,
                      "gguf: %struncated file: %s needs %" PRIu64 " bytes at offset %" PRIu64
                      " but only %" PRIu64 " remain (file size %" PRIu64 ")",
                      r->ctx, what, n, r->off, rd_left(r), r->size);
}

static int rd_u32(rd *r, uint32_t *v, const char *what)
{
    int rc = rd_need(r, 4, what);
    if (rc) return rc;
    *v = ld_u32(r->b + r->off);
    r->off += 4;
    return 0;
}

static int rd_u64(rd *r, uint64_t *v, const char *what)
{
    int rc = rd_need(r, 8, what);
    if (rc) return rc;
    *v = ld_u64(r->b + r->off);
    r->off += 8;
    return 0;
}

static int rd_str(rd *r, gguf_str *s, const char *what)
{
    uint64_t at = r->off, len;
    int rc = rd_u64(r, &len, what);
    if (rc) return rc;
    if (len > rd_left(r))
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: %s%s length %" PRIu64 " at offset %" PRIu64
                          " is larger than the %" PRIu64 " bytes that remain (file size %" PRIu64
                          ")",
                          r->ctx, what, len, at, rd_left(r), r->size);
    s->ptr = (const char *)(r->b + r->off);
    s->len = len;
    r->off += len;
    return 0;
}

/* ---- hash tables -------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *p, uint64_t n)
{
    uint64_t h = 14695981039346656037ull;
    for (uint64_t i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static bool str_same(gguf_str a, const char *p, uint64_t n)
{
    return a.len == n && memcmp(a.ptr, p, n) == 0;
}

/* Table for n names; names(i) of the table's owner is got through `get`. Returns the index of
 * an earlier entry with the same name as entry `dup_of` in *dup (or -1). */
typedef gguf_str (*name_fn)(const gguf_file *f, int64_t i);

static gguf_str kv_name(const gguf_file *f, int64_t i)
{
    return f->kvs[i].key;
}

static gguf_str t_name(const gguf_file *f, int64_t i)
{
    return f->tensors[i].name;
}

static int table_build(const gguf_file *f, int64_t n, name_fn get, uint64_t **tab_out,
                       uint64_t *mask_out, int64_t *dup_a, int64_t *dup_b)
{
    uint64_t cap = 8;
    while (cap < 2 * (uint64_t)n)
        cap *= 2;
    uint64_t *tab = calloc(cap, sizeof(*tab));
    if (!tab) return -ENOMEM;
    *dup_a = *dup_b = -1;
    for (int64_t i = 0; i < n; i++) {
        gguf_str s = get(f, i);
        uint64_t h = hash_bytes(s.ptr, s.len) & (cap - 1);
        while (tab[h]) {
            if (str_same(get(f, (int64_t)tab[h] - 1), s.ptr, s.len)) {
                *dup_a = (int64_t)tab[h] - 1;
                *dup_b = i;
                free(tab);
                return -CM_EFORMAT;
            }
            h = (h + 1) & (cap - 1);
        }
        tab[h] = (uint64_t)i + 1;
    }
    *tab_out = tab;
    *mask_out = cap - 1;
    return 0;
}

static int64_t table_find(const gguf_file *f, const uint64_t *tab, uint64_t mask, name_fn get,
                          const char *name)
{
    if (!tab || !name) return -1;
    uint64_t n = strlen(name);
    uint64_t h = hash_bytes(name, n) & mask;
    while (tab[h]) {
        if (str_same(get(f, (int64_t)tab[h] - 1), name, n)) return (int64_t)tab[h] - 1;
        h = (h + 1) & mask;
    }
    return -1;
}

/* ---- parsing ------------------------------------------------------------------------------ */

typedef struct parse_ctx {
    rd r;
    gguf_file *f;
    uint64_t n_strs, cap_strs; /* the string pool being filled */
    uint64_t *kv_str_idx;      /* per kv: index of its first string in the pool, or UINT64_MAX */
} parse_ctx;

static int pool_reserve(parse_ctx *c, uint64_t more)
{
    if (c->cap_strs - c->n_strs >= more) return 0;
    uint64_t cap = c->cap_strs ? c->cap_strs : 64;
    while (cap - c->n_strs < more)
        cap *= 2;
    if (cap > SIZE_MAX / sizeof(gguf_str)) return -ENOMEM;
    gguf_str *p = realloc(c->f->strs, (size_t)cap * sizeof(gguf_str));
    if (!p)
        return cm_err_set(c->r.err, -ENOMEM, "gguf: out of memory for %" PRIu64 " strings", cap);
    c->f->strs = p;
    c->cap_strs = cap;
    return 0;
}

/* Check the bool bytes at p[0..n) are 0 or 1. */
static int check_bools(parse_ctx *c, uint64_t at, uint64_t n, const char *key)
{
    for (uint64_t i = 0; i < n; i++) {
        uint8_t v = c->r.b[at + i];
        if (v > 1)
            return cm_err_set(c->r.err, -CM_EFORMAT,
                              "gguf: key '%s': bool value %u at offset %" PRIu64
                              " is neither 0 nor 1",
                              key, v, at + i);
    }
    return 0;
}

static int parse_kv(parse_ctx *c, int64_t i)
{
    rd *r = &c->r;
    gguf_kv *kv = &c->f->kvs[i];
    char nb[300];
    uint64_t at = r->off;
    snprintf(r->ctx, sizeof(r->ctx), "key-value #%" PRId64 ": ", i);
    int rc = rd_str(r, &kv->key, "key");
    if (rc) return rc;
    if (kv->key.len == 0)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: key-value #%" PRId64 " at offset %" PRIu64 " has an empty key", i,
                          at);
    const char *key = safe_name(nb, sizeof(nb), kv->key);
    snprintf(r->ctx, sizeof(r->ctx), "key '%s': ", key);
    uint64_t type_at = r->off;
    if ((rc = rd_u32(r, &kv->type, "value type"))) return rc;
    if (kv->type >= GGUF_VT_COUNT)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: key '%s': unknown value type %u at offset %" PRIu64, key, kv->type,
                          type_at);
    c->kv_str_idx[i] = UINT64_MAX;

    if (kv->type == GGUF_VT_STRING) {
        gguf_str s;
        if ((rc = rd_str(r, &s, "string value"))) return rc;
        if ((rc = pool_reserve(c, 1))) return rc;
        c->kv_str_idx[i] = c->n_strs;
        c->f->strs[c->n_strs++] = s;
        kv->data = s.ptr;
        return 0;
    }
    if (kv->type != GGUF_VT_ARRAY) {
        uint64_t sz = vt_size(kv->type);
        if ((rc = rd_need(r, sz, "value"))) return rc;
        if (kv->type == GGUF_VT_BOOL && (rc = check_bools(c, r->off, 1, key))) return rc;
        kv->data = r->b + r->off;
        r->off += sz;
        return 0;
    }

    /* An array. */
    uint64_t et_at = r->off;
    if ((rc = rd_u32(r, &kv->arr_type, "array element type"))) return rc;
    if (kv->arr_type == GGUF_VT_ARRAY)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: key '%s': nested array (array of arrays) at offset %" PRIu64
                          " is not allowed",
                          key, et_at);
    if (kv->arr_type >= GGUF_VT_COUNT)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: key '%s': unknown array element type %u at offset %" PRIu64, key,
                          kv->arr_type, et_at);
    uint64_t n_at = r->off;
    if ((rc = rd_u64(r, &kv->arr_n, "array count"))) return rc;
    kv->data = r->b + r->off;
    /* Even an empty string takes its 8-byte length, so count ≤ left / 8 for strings. */
    uint64_t esz = kv->arr_type == GGUF_VT_STRING ? 8 : vt_size(kv->arr_type);
    if (kv->arr_n > rd_left(r) / esz)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: key '%s': array count %" PRIu64 " at offset %" PRIu64
                          " of %s elements (%" PRIu64 " bytes each at least) exceeds the %" PRIu64
                          " bytes that remain (file size %" PRIu64 ")",
                          key, kv->arr_n, n_at, gguf_vtype_name(kv->arr_type), esz, rd_left(r),
                          r->size);
    if (kv->arr_type != GGUF_VT_STRING) {
        if (kv->arr_type == GGUF_VT_BOOL && (rc = check_bools(c, r->off, kv->arr_n, key)))
            return rc;
        r->off += kv->arr_n * esz;
        return 0;
    }
    if ((rc = pool_reserve(c, kv->arr_n))) return rc;
    c->kv_str_idx[i] = c->n_strs;
    for (uint64_t j = 0; j < kv->arr_n; j++) {
        if ((rc = rd_str(r, &c->f->strs[c->n_strs], "array string"))) return rc;
        c->n_strs++;
    }
    return 0;
}

static int parse_tensor_info(parse_ctx *c, int64_t i)
{
    rd *r = &c->r;
    gguf_tensor *t = &c->f->tensors[i];
    char nb[300];
    uint64_t at = r->off;
    snprintf(r->ctx, sizeof(r->ctx), "tensor info #%" PRId64 ": ", i);
    int rc = rd_str(r, &t->name, "tensor name");
    if (rc) return rc;
    if (t->name.len == 0)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: tensor info #%" PRId64 " at offset %" PRIu64 " has an empty name",
                          i, at);
    const char *name = safe_name(nb, sizeof(nb), t->name);
    snprintf(r->ctx, sizeof(r->ctx), "tensor '%s': ", name);
    uint64_t nd_at = r->off;
    if ((rc = rd_u32(r, &t->n_dims, "n_dims"))) return rc;
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: tensor '%s': n_dims %u at offset %" PRIu64
                          " is out of range (1..%d)",
                          name, t->n_dims, nd_at, GGUF_MAX_DIMS);
    uint64_t nel = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
        uint64_t ne = 1, ne_at = r->off;
        if (d < t->n_dims && (rc = rd_u64(r, &ne, "dimension"))) return rc;
        if (ne == 0 || ne > (uint64_t)INT64_MAX)
            return cm_err_set(r->err, -CM_EFORMAT,
                              "gguf: tensor '%s': dimension %u is %" PRIu64 " at offset %" PRIu64
                              " (must be 1..INT64_MAX)",
                              name, d, ne, ne_at);
        if (nel > (uint64_t)INT64_MAX / ne)
            return cm_err_set(r->err, -CM_EFORMAT,
                              "gguf: tensor '%s': element count overflows (product of dimensions"
                              " exceeds INT64_MAX at dimension %u, offset %" PRIu64 ")",
                              name, d, ne_at);
        nel *= ne;
        t->ne[d] = ne;
    }
    uint64_t type_at = r->off;
    if ((rc = rd_u32(r, &t->type, "tensor type"))) return rc;
    const char *tname = t->type < TN_TYPE_MAX ? tn_type_name((int)t->type) : NULL;
    if (!tname)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: tensor '%s': unknown tensor type id %u at offset %" PRIu64, name,
                          t->type, type_at);
    int64_t blk = tn_type_block((int)t->type);
    uint64_t bsz = tn_type_size((int)t->type);
    if (blk <= 0 || bsz == 0)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: tensor '%s': type %s (id %u) at offset %" PRIu64
                          " has no known block layout",
                          name, tname, t->type, type_at);
    if (t->ne[0] % (uint64_t)blk != 0)
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: tensor '%s': row length %" PRIu64
                          " is not a multiple of the block size %" PRId64 " of type %s",
                          name, t->ne[0], blk, tname);
    uint64_t row_blocks = t->ne[0] / (uint64_t)blk;
    uint64_t nrows = t->ne[1] * t->ne[2] * t->ne[3]; /* ≤ nel, cannot overflow */
    if (row_blocks > (uint64_t)INT64_MAX / bsz ||
        (nrows > 0 && row_blocks * bsz > (uint64_t)INT64_MAX / nrows))
        return cm_err_set(r->err, -CM_EFORMAT,
                          "gguf: tensor '%s': size in bytes overflows (type %s, %" PRIu64
                          " elements)",
                          name, tname, nel);
    t->nbytes = row_blocks * bsz * nrows;
    if ((rc = rd_u64(r, &t->offset, "tensor data offset"))) return rc;
    return 0;
}

struct span {
    uint64_t offset;
    int64_t index;
};

static int span_cmp(const void *pa, const void *pb)
{
    const struct span *a = pa, *b = pb;
    if (a->offset != b->offset) return a->offset < b->offset ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

/* Check each tensor's data lies inside the data section and no two overlap. */
static int check_tensor_data(gguf_file *f, cm_err *err)
{
    char nb[300], nb2[300];
    uint64_t avail = f->data_offset <= f->size ? f->size - f->data_offset : 0;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        const char *name = safe_name(nb, sizeof(nb), t->name);
        if (t->offset % f->alignment != 0)
            return cm_err_set(err, -CM_EFORMAT,
                              "gguf: tensor '%s': data offset %" PRIu64
                              " is not a multiple of the alignment %" PRIu64,
                              name, t->offset, f->alignment);
        if (f->data_offset > f->size || t->offset > avail || t->nbytes > avail - t->offset)
            return cm_err_set(err, -CM_EFORMAT,
                              "gguf: tensor '%s' data [offset %" PRIu64 " (data section at %" PRIu64
                              "), %" PRIu64 " bytes] extends past end of file (size %" PRIu64 ")",
                              name, t->offset, f->data_offset, t->nbytes, f->size);
        t->data = f->base + f->data_offset + t->offset;
    }
    if (f->n_tensors < 2) return 0;

    /* Sort (offset, index) pairs by offset; then each extent must end before the next starts. */
    struct span *sp = malloc((size_t)f->n_tensors * sizeof(*sp));
    if (!sp) return cm_err_set(err, -ENOMEM, "gguf: out of memory");
    for (int64_t i = 0; i < f->n_tensors; i++) {
        sp[i].offset = f->tensors[i].offset;
        sp[i].index = i;
    }
    qsort(sp, (size_t)f->n_tensors, sizeof(*sp), span_cmp);
    int rc = 0;
    for (int64_t k = 1; k < f->n_tensors; k++) {
        const gguf_tensor *a = &f->tensors[sp[k - 1].index], *b = &f->tensors[sp[k].index];
        if (a->offset + a->nbytes > b->offset) {
            rc = cm_err_set(err, -CM_EFORMAT,
                            "gguf: tensor '%s' data [offset %" PRIu64 ", %" PRIu64
                            " bytes] overlaps tensor '%s' data [offset %" PRIu64 ", %" PRIu64
                            " bytes]",
                            safe_name(nb, sizeof(nb), a->name), a->offset, a->nbytes,
                            safe_name(nb2, sizeof(nb2), b->name), b->offset, b->nbytes);
            break;
        }
    }
    free(sp);
    return rc;
}

static int parse(gguf_file *f, cm_err *err)
{
    parse_ctx c = {.r = {.b = f->base, .size = f->size, .off = 0, .err = err}, .f = f};
    rd *r = &c.r;
    int rc;
    char nb[300];

    if (f->size < 4)
        return cm_err_set(err, -CM_EFORMAT,
                          "gguf: file too small (%" PRIu64 " bytes) to be a GGUF file", f->size);
    if (memcmp(f->base, "GGUF", 4) != 0)
        return cm_err_set(err, -CM_EFORMAT,
                          "gguf: bad magic %02x %02x %02x %02x at offset 0 (expected \"GGUF\")",
                          f->base[0], f->base[1], f->base[2], f->base[3]);
    r->off = 4;
    if ((rc = rd_u32(r, &f->version, "version"))) return rc;
    if (f->version == 1)
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "gguf: version 1 files are not supported (only versions 2 and 3); "
                          "convert the model again with a current converter");
    if (f->version == 0 || (f->version & 0xffff) == 0)
        /* A big-endian file reads its version byte-swapped: 0x03000000. */
        return cm_err_set(err, f->version ? -CM_EUNSUPPORTED : -CM_EFORMAT,
                          "gguf: invalid version %" PRIu32 " (0x%08" PRIx32 ") at offset 4%s",
                          f->version, f->version,
                          f->version ? "; a big-endian GGUF file? only little-endian is read" : "");
    if (f->version > 3)
        return cm_err_set(err, -CM_EUNSUPPORTED,
                          "gguf: unsupported version %" PRIu32
                          " at offset 4 (only versions 2 and 3 are read)",
                          f->version);
    uint64_t n_t, n_kv;
    if ((rc = rd_u64(r, &n_t, "tensor_count"))) return rc;
    if ((rc = rd_u64(r, &n_kv, "kv_count"))) return rc;
    uint64_t left = rd_left(r);
    if (n_kv > left / GGUF_MIN_KV_BYTES)
        return cm_err_set(err, -CM_EFORMAT,
                          "gguf: kv_count %" PRIu64 " at offset 16 is impossible: at most %" PRIu64
                          " key-values fit in the %" PRIu64 " bytes that remain",
                          n_kv, left / GGUF_MIN_KV_BYTES, left);
    if (n_t > left / GGUF_MIN_TI_BYTES || n_kv * GGUF_MIN_KV_BYTES + n_t * GGUF_MIN_TI_BYTES > left)
        return cm_err_set(err, -CM_EFORMAT,
                          "gguf: tensor_count %" PRIu64 " at offset 8 is impossible: %" PRIu64
                          " key-values and %" PRIu64 " tensor infos do not fit in the %" PRIu64
                          " bytes that remain",
                          n_t, n_kv, n_t, left);
    f->n_kv = (int64_t)n_kv;
    f->n_tensors = (int64_t)n_t;

    /* Key-values. */
    f->kvs = calloc(n_kv ? n_kv : 1, sizeof(*f->kvs));
    c.kv_str_idx = malloc((n_kv ? n_kv : 1) * sizeof(*c.kv_str_idx));
    if (!f->kvs || !c.kv_str_idx) {
        rc = cm_err_set(err, -ENOMEM, "gguf: out of memory for %" PRIu64 " key-values", n_kv);
        goto out;
    }
    for (int64_t i = 0; i < f->n_kv; i++)
        if ((rc = parse_kv(&c, i))) goto out;
    for (int64_t i = 0; i < f->n_kv; i++)
        if (c.kv_str_idx[i] != UINT64_MAX) f->kvs[i].arr_strs = f->strs + c.kv_str_idx[i];
    int64_t da, db;
    rc = table_build(f, f->n_kv, kv_name, &f->kv_tab, &f->kv_mask, &da, &db);
    if (rc == -ENOMEM) {
        rc = cm_err_set(err, rc, "gguf: out of memory");
        goto out;
    }
    if (rc) {
        rc = cm_err_set(err, rc,
                        "gguf: duplicate key '%s' (key-values #%" PRId64 " at offset %" PRIu64
                        " and #%" PRId64 " at offset %" PRIu64 ")",
                        safe_name(nb, sizeof(nb), f->kvs[db].key), da,
                        (uint64_t)((const uint8_t *)f->kvs[da].key.ptr - f->base) - 8, db,
                        (uint64_t)((const uint8_t *)f->kvs[db].key.ptr - f->base) - 8);
        goto out;
    }

    /* Alignment. */
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *al = gguf_find_kv(f, "general.alignment");
    if (al) {
        uint64_t at = (uint64_t)((const uint8_t *)al->data - f->base);
        if (al->type != GGUF_VT_UINT32) {
            rc = cm_err_set(err, -CM_EFORMAT,
                            "gguf: general.alignment at offset %" PRIu64
                            " has type %s (must be uint32)",
                            at, gguf_vtype_name(al->type));
            goto out;
        }
        uint32_t a = ld_u32(al->data);
        if (a == 0 || (a & (a - 1)) != 0) {
            rc = cm_err_set(err, -CM_EFORMAT,
                            "gguf: general.alignment %" PRIu32 " at offset %" PRIu64
                            " is not a power of two",
                            a, at);
            goto out;
        }
        f->alignment = a;
    }

    /* Tensor infos. */
    f->tensors = calloc(n_t ? n_t : 1, sizeof(*f->tensors));
    if (!f->tensors) {
        rc = cm_err_set(err, -ENOMEM, "gguf: out of memory for %" PRIu64 " tensors", n_t);
        goto out;
    }
    for (int64_t i = 0; i < f->n_tensors; i++)
        if ((rc = parse_tensor_info(&c, i))) goto out;
    rc = table_build(f, f->n_tensors, t_name, &f->t_tab, &f->t_mask, &da, &db);
    if (rc == -ENOMEM) {
        rc = cm_err_set(err, rc, "gguf: out of memory");
        goto out;
    }
    if (rc) {
        rc = cm_err_set(err, rc,
                        "gguf: duplicate tensor name '%s' (tensor infos #%" PRId64
                        " at offset %" PRIu64 " and #%" PRId64 " at offset %" PRIu64 ")",
                        safe_name(nb, sizeof(nb), f->tensors[db].name), da,
                        (uint64_t)((const uint8_t *)f->tensors[da].name.ptr - f->base) - 8, db,
                        (uint64_t)((const uint8_t *)f->tensors[db].name.ptr - f->base) - 8);
        goto out;
    }

    /* The data section starts at the next multiple of the alignment (both < 2^33 here, so the
     * sum cannot overflow). */
    f->data_offset = (r->off + f->alignment - 1) / f->alignment * f->alignment;
    if (f->n_tensors > 0 && f->data_offset > f->size) {
        rc = cm_err_set(err, -CM_EFORMAT,
                        "gguf: truncated file: data section at offset %" PRIu64
                        " (tensor infos end at %" PRIu64 ", alignment %" PRIu64
                        ") starts past end of file (size %" PRIu64 ")",
                        f->data_offset, r->off, f->alignment, f->size);
        goto out;
    }
    rc = check_tensor_data(f, err);
out:
    free(c.kv_str_idx);
    return rc;
}

/* ---- open / close ------------------------------------------------------------------------- */

static gguf_file *open_common(gguf_file *f, cm_err *err)
{
    if (parse(f, err)) {
        gguf_close(f);
        return NULL;
    }
    return f;
}

gguf_file *gguf_open_mem(const void *data, size_t size, cm_err *err)
{
    if (!data && size) {
        cm_err_set(err, -EINVAL, "gguf: NULL buffer");
        return NULL;
    }
    gguf_file *f = calloc(1, sizeof(*f));
    if (!f) {
        cm_err_set(err, -ENOMEM, "gguf: out of memory");
        return NULL;
    }
    static const uint8_t empty[1];
    f->base = data ? data : empty;
    f->size = size;
    return open_common(f, err);
}

gguf_file *gguf_open(const char *path, cm_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        cm_err_set(err, -e, "gguf: cannot open '%s': %s", path, strerror(e));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        cm_err_set(err, -e, "gguf: cannot stat '%s': %s", path, strerror(e));
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        cm_err_set(err, -CM_EFORMAT, "gguf: '%s' is not a regular file", path);
        return NULL;
    }
    if (st.st_size < 4) {
        close(fd);
        cm_err_set(err, -CM_EFORMAT, "gguf: '%s' is too small (%lld bytes) to be a GGUF file", path,
                   (long long)st.st_size);
        return NULL;
    }
    size_t len = (size_t)st.st_size;
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) {
        cm_err_set(err, -e, "gguf: cannot mmap '%s' (%zu bytes): %s", path, len, strerror(e));
        return NULL;
    }
    gguf_file *f = calloc(1, sizeof(*f));
    if (!f) {
        munmap(map, len);
        cm_err_set(err, -ENOMEM, "gguf: out of memory");
        return NULL;
    }
    f->map = map;
    f->map_len = len;
    f->base = map;
    f->size = len;
    return open_common(f, err);
}

void gguf_close(gguf_file *f)
{
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    free(f->kvs);
    free(f->tensors);
    free(f->strs);
    free(f->kv_tab);
    free(f->t_tab);
    free(f);
}

/* ---- accessors ---------------------------------------------------------------------------- */

uint32_t gguf_version(const gguf_file *f)
{
    return f->version;
}

uint64_t gguf_alignment(const gguf_file *f)
{
    return f->alignment;
}

uint64_t gguf_file_size(const gguf_file *f)
{
    return f->size;
}

uint64_t gguf_data_offset(const gguf_file *f)
{
    return f->data_offset;
}

int64_t gguf_n_kv(const gguf_file *f)
{
    return f->n_kv;
}

const gguf_kv *gguf_kv_at(const gguf_file *f, int64_t i)
{
    return i >= 0 && i < f->n_kv ? &f->kvs[i] : NULL;
}

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key)
{
    int64_t i = table_find(f, f->kv_tab, f->kv_mask, kv_name, key);
    return i < 0 ? NULL : &f->kvs[i];
}

int64_t gguf_n_tensors(const gguf_file *f)
{
    return f->n_tensors;
}

const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i)
{
    return i >= 0 && i < f->n_tensors ? &f->tensors[i] : NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    int64_t i = table_find(f, f->t_tab, f->t_mask, t_name, name);
    return i < 0 ? NULL : &f->tensors[i];
}

/* ---- typed getters ------------------------------------------------------------------------ */

/* An integer or bool value at p of type t, as both *u (0 if negative) and *s (saturated at
 * INT64_MAX), with *is_neg. Returns false for non-integer types. */
static bool load_int(uint32_t t, const uint8_t *p, bool *is_neg, uint64_t *u, int64_t *s)
{
    int64_t v;
    switch (t) {
    case GGUF_VT_UINT8:
    case GGUF_VT_BOOL:
        *u = p[0];
        *is_neg = false;
        *s = (int64_t)*u;
        return true;
    case GGUF_VT_UINT16:
        *u = ld_u16(p);
        *is_neg = false;
        *s = (int64_t)*u;
        return true;
    case GGUF_VT_UINT32:
        *u = ld_u32(p);
        *is_neg = false;
        *s = (int64_t)*u;
        return true;
    case GGUF_VT_UINT64:
        *u = ld_u64(p);
        *is_neg = false;
        *s = *u > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)*u;
        return true;
    case GGUF_VT_INT8:
        v = (int8_t)p[0];
        break;
    case GGUF_VT_INT16:
        v = (int16_t)ld_u16(p);
        break;
    case GGUF_VT_INT32:
        v = (int32_t)ld_u32(p);
        break;
    case GGUF_VT_INT64: {
        uint64_t x = ld_u64(p);
        memcpy(&v, &x, sizeof(v));
        break;
    }
    default:
        return false;
    }
    *s = v;
    *is_neg = v < 0;
    *u = v < 0 ? 0 : (uint64_t)v;
    return true;
}

static double load_float(uint32_t t, const uint8_t *p)
{
    if (t == GGUF_VT_FLOAT32) {
        uint32_t x = ld_u32(p);
        float v;
        memcpy(&v, &x, sizeof(v));
        return v;
    }
    uint64_t x = ld_u64(p);
    double v = 0;
    memcpy(&v, &x, sizeof(v));
    return v;
}

static const gguf_kv *get_kv(const gguf_file *f, const char *key, cm_err *err, int *rc)
{
    const gguf_kv *kv = gguf_find_kv(f, key);
    *rc = kv ? 0 : cm_err_set(err, -ENOENT, "gguf: key '%s' not found", key);
    return kv;
}

static int type_err(cm_err *err, const char *key, const gguf_kv *kv, const char *want)
{
    return cm_err_set(err, -CM_EFORMAT, "gguf: key '%s' has type %s%s%s, expected %s", key,
                      gguf_vtype_name(kv->type), kv->type == GGUF_VT_ARRAY ? " of " : "",
                      kv->type == GGUF_VT_ARRAY ? gguf_vtype_name(kv->arr_type) : "", want);
}

static int get_int(const gguf_file *f, const char *key, bool *neg, uint64_t *u, int64_t *s,
                   const char *want, cm_err *err)
{
    int rc;
    const gguf_kv *kv = get_kv(f, key, err, &rc);
    if (!kv) return rc;
    if (kv->type == GGUF_VT_ARRAY || !load_int(kv->type, kv->data, neg, u, s))
        return type_err(err, key, kv, want);
    return 0;
}

int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, cm_err *err)
{
    bool neg = false;
    uint64_t u = 0;
    int64_t s = 0;
    int rc = get_int(f, key, &neg, &u, &s, "an integer", err);
    if (rc) return rc;
    if (neg)
        return cm_err_set(err, -CM_EFORMAT, "gguf: key '%s' value %" PRId64 " does not fit uint64",
                          key, s);
    *out = u;
    return 0;
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, cm_err *err)
{
    uint64_t u = 0;
    int rc = gguf_get_u64(f, key, &u, err);
    if (rc) return rc;
    if (u > UINT32_MAX)
        return cm_err_set(err, -CM_EFORMAT, "gguf: key '%s' value %" PRIu64 " does not fit uint32",
                          key, u);
    *out = (uint32_t)u;
    return 0;
}

int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out, cm_err *err)
{
    bool neg = false;
    uint64_t u = 0;
    int64_t s = 0;
    int rc = get_int(f, key, &neg, &u, &s, "an integer", err);
    if (rc) return rc;
    if (!neg && u > (uint64_t)INT64_MAX)
        return cm_err_set(err, -CM_EFORMAT, "gguf: key '%s' value %" PRIu64 " does not fit int64",
                          key, u);
    *out = s;
    return 0;
}

int gguf_get_f64(const gguf_file *f, const char *key, double *out, cm_err *err)
{
    int rc;
    const gguf_kv *kv = get_kv(f, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_FLOAT32 && kv->type != GGUF_VT_FLOAT64)
        return type_err(err, key, kv, "float32 or float64");
    *out = load_float(kv->type, kv->data);
    return 0;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out, cm_err *err)
{
    double v = 0;
    int rc = gguf_get_f64(f, key, &v, err);
    if (rc) return rc;
    if (isfinite(v) && fabs(v) > 3.4028234663852886e38)
        return cm_err_set(err, -CM_EFORMAT, "gguf: key '%s' value %g does not fit float32", key, v);
    *out = (float)v;
    return 0;
}

int gguf_get_bool(const gguf_file *f, const char *key, bool *out, cm_err *err)
{
    int rc;
    const gguf_kv *kv = get_kv(f, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_BOOL) return type_err(err, key, kv, "bool");
    *out = ((const uint8_t *)kv->data)[0] != 0;
    return 0;
}

int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out, cm_err *err)
{
    int rc;
    const gguf_kv *kv = get_kv(f, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_STRING) return type_err(err, key, kv, "string");
    *out = kv->arr_strs[0];
    return 0;
}

int gguf_get_arr(const gguf_file *f, const char *key, uint32_t *elem_type, uint64_t *n,
                 const void **data, const gguf_str **strs, cm_err *err)
{
    int rc;
    const gguf_kv *kv = get_kv(f, key, err, &rc);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_ARRAY) return type_err(err, key, kv, "array");
    if (elem_type) *elem_type = kv->arr_type;
    if (n) *n = kv->arr_n;
    if (data) *data = kv->data;
    if (strs) *strs = kv->arr_strs;
    return 0;
}

double gguf_arr_f64(const gguf_kv *kv, uint64_t i)
{
    CM_ASSERT(kv->type == GGUF_VT_ARRAY && kv->arr_type != GGUF_VT_STRING && i < kv->arr_n);
    const uint8_t *p = (const uint8_t *)kv->data + i * vt_size(kv->arr_type);
    if (kv->arr_type == GGUF_VT_FLOAT32 || kv->arr_type == GGUF_VT_FLOAT64)
        return load_float(kv->arr_type, p);
    bool neg = false;
    uint64_t u = 0;
    int64_t s = 0;
    load_int(kv->arr_type, p, &neg, &u, &s);
    return neg ? (double)s : (double)u;
}

int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i)
{
    CM_ASSERT(kv->type == GGUF_VT_ARRAY && kv->arr_type != GGUF_VT_STRING && i < kv->arr_n);
    const uint8_t *p = (const uint8_t *)kv->data + i * vt_size(kv->arr_type);
    if (kv->arr_type == GGUF_VT_FLOAT32 || kv->arr_type == GGUF_VT_FLOAT64) {
        double v = load_float(kv->arr_type, p);
        if (isnan(v)) return 0;
        if (v >= 9223372036854775808.0) return INT64_MAX;
        if (v < -9223372036854775808.0) return INT64_MIN;
        return (int64_t)v;
    }
    bool neg = false;
    uint64_t u = 0;
    int64_t s = 0;
    load_int(kv->arr_type, p, &neg, &u, &s);
    return s;
}
