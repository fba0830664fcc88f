/*
 * test-gguf.c — the GGUF reader against files built here, byte by byte, by a small writer.
 *
 * Valid v2 and v3 files with every value type, arrays of every element type and tensors of
 * several types must read back exactly (values, strings, dims, offsets, data bytes, lookups,
 * typed getters); then each kind of corruption must fail with the expected code and a message
 * naming the problem; every prefix of a valid file must fail cleanly (each prefix is copied to
 * an exact-size heap buffer so ASan sees any read past the end). The JSON of gguf_print_info is
 * checked with a small JSON validator. With IHIP_MODEL set, the real model is checked too.
 *
 * Exit 0 pass, 1 fail. Last line: "N passed, N failed".
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf/gguf.h"
#include "tensor/tensor.h"
#include "../common/json-check.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
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

/* ---- a GGUF writer ------------------------------------------------------------------------ */

typedef struct wb {
    uint8_t *p;
    size_t n, cap;
} wb;

static void w_raw(wb *w, const void *d, size_t n)
{
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->n + n)
            cap *= 2;
        w->p = realloc(w->p, cap);
        if (!w->p) abort();
        w->cap = cap;
    }
    if (n) memcpy(w->p + w->n, d, n);
    w->n += n;
}

static void w_le(wb *w, uint64_t v, int bytes)
{
    uint8_t b[8];
    for (int i = 0; i < bytes; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    w_raw(w, b, (size_t)bytes);
}

static void w_u8(wb *w, uint8_t v)
{
    w_le(w, v, 1);
}
static void w_u32(wb *w, uint32_t v)
{
    w_le(w, v, 4);
}
static void w_u64(wb *w, uint64_t v)
{
    w_le(w, v, 8);
}

static void w_f32(wb *w, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    w_u32(w, u);
}

static void w_f64(wb *w, double f)
{
    uint64_t u;
    memcpy(&u, &f, 8);
    w_u64(w, u);
}

static void w_strn(wb *w, const char *s, size_t n)
{
    w_u64(w, n);
    w_raw(w, s, n);
}

static void w_str(wb *w, const char *s)
{
    w_strn(w, s, strlen(s));
}

static void w_hdr(wb *w, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    w_raw(w, "GGUF", 4);
    w_u32(w, version);
    w_u64(w, n_tensors);
    w_u64(w, n_kv);
}

static void w_kv(wb *w, const char *key, uint32_t type)
{
    w_str(w, key);
    w_u32(w, type);
}

static void w_ti(wb *w, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                 uint64_t offset)
{
    w_str(w, name);
    w_u32(w, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        w_u64(w, ne[d]);
    w_u32(w, type);
    w_u64(w, offset);
}

static void w_pad(wb *w, size_t align)
{
    while (w->n % align)
        w_u8(w, 0);
}

static void w_zeros(wb *w, size_t n)
{
    for (size_t i = 0; i < n; i++)
        w_u8(w, 0);
}

static void patch_u32(wb *w, size_t at, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        w->p[at + (size_t)i] = (uint8_t)(v >> (8 * i));
}

static void patch_u64(wb *w, size_t at, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        w->p[at + (size_t)i] = (uint8_t)(v >> (8 * i));
}

static void wb_free(wb *w)
{
    free(w->p);
    memset(w, 0, sizeof(*w));
}

/* Open a copy of w in an exact-size heap buffer (so ASan catches reads past the end). The
 * copy is returned in *copy for the caller to free after gguf_close. */
static gguf_file *open_copy(const wb *w, size_t n, void **copy, cm_err *e)
{
    *copy = malloc(n ? n : 1);
    if (n) memcpy(*copy, w->p, n);
    return gguf_open_mem(n ? *copy : NULL, n, e);
}

static void expect_err(const char *what, const wb *w, int code, const char *phrase)
{
    cm_err e = {0};
    void *copy;
    gguf_file *f = open_copy(w, w->n, &copy, &e);
    CHECK(f == NULL, "%s: opened a bad file", what);
    gguf_close(f);
    free(copy);
    if (f) return;
    CHECK(e.code == code, "%s: code %d (%s), expected %d; msg: %s", what, e.code,
          cm_strerror(e.code), code, e.msg);
    CHECK(strstr(e.msg, phrase) != NULL, "%s: message \"%s\" lacks \"%s\"", what, e.msg, phrase);
    if (getenv("TEST_GGUF_VERBOSE")) printf("  %-28s -> %s\n", what, e.msg);
}

/* Print f to a string (caller frees). */
static char *print_to_str(const gguf_file *f, bool json, bool tensors, size_t *len)
{
    FILE *tf = tmpfile();
    if (!tf) return NULL;
    int rc = gguf_print_info(f, tf, json, tensors);
    long n = ftell(tf);
    rewind(tf);
    char *s = malloc((size_t)n + 1);
    size_t got = fread(s, 1, (size_t)n, tf);
    s[got] = '\0';
    fclose(tf);
    *len = got;
    CHECK(rc == 0, "gguf_print_info returned %d", rc);
    return s;
}

/* ---- the valid file ----------------------------------------------------------------------- */

/* Scalars: integers as int64 (or uint64 bits), floats as double, strings with lengths. */
typedef struct sval {
    const char *key;
    uint32_t type;
    uint64_t bits; /* integer / bool value, two's complement for negatives */
    double f;
    const char *s;
    size_t slen;
} sval;

static const sval scalars[] = {
    {"t.u8", GGUF_VT_UINT8, 200, 0, NULL, 0},
    {"t.i8", GGUF_VT_INT8, (uint64_t)-100, 0, NULL, 0},
    {"t.u16", GGUF_VT_UINT16, 60000, 0, NULL, 0},
    {"t.i16", GGUF_VT_INT16, (uint64_t)-30000, 0, NULL, 0},
    {"t.u32", GGUF_VT_UINT32, 4000000000u, 0, NULL, 0},
    {"t.i32", GGUF_VT_INT32, (uint64_t)-2000000000, 0, NULL, 0},
    {"t.f32", GGUF_VT_FLOAT32, 0, 3.25, NULL, 0},
    {"t.bool", GGUF_VT_BOOL, 1, 0, NULL, 0},
    {"t.false", GGUF_VT_BOOL, 0, 0, NULL, 0},
    {"t.str", GGUF_VT_STRING, 0, 0, "h\xc3\xa9llo \"w\"\n", 11},
    {"t.empty", GGUF_VT_STRING, 0, 0, "", 0},
    {"t.u64", GGUF_VT_UINT64, 0xfedcba9876543210ull, 0, NULL, 0},
    {"t.i64", GGUF_VT_INT64, (uint64_t)-0x123456789abcdefll, 0, NULL, 0},
    {"t.f64", GGUF_VT_FLOAT64, 0, -1.5e300, NULL, 0},
    /* A key with a quote, a backslash, a control byte and an invalid UTF-8 byte, and a value
     * with invalid and valid multi-byte UTF-8: for the escaping of the dump. */
    {"w\"e\\ird\x01\xff", GGUF_VT_STRING, 0, 0, "a\tb\xc3\x28\xe2\x82\xac\x00z", 10},
};

typedef struct aval {
    const char *key;
    uint32_t et;
    uint64_t n;
    uint64_t bits[4];
    double f[4];
    const char *s[4];
    size_t sl[4];
} aval;

static const aval arrays[] = {
    {"a.u8", GGUF_VT_UINT8, 3, {0, 1, 255}, {0}, {0}, {0}},
    {"a.i8", GGUF_VT_INT8, 3, {(uint64_t)-128, 0, 127}, {0}, {0}, {0}},
    {"a.u16", GGUF_VT_UINT16, 2, {65535, 7}, {0}, {0}, {0}},
    {"a.i16", GGUF_VT_INT16, 2, {(uint64_t)-32768, 32767}, {0}, {0}, {0}},
    {"a.u32", GGUF_VT_UINT32, 4, {0, 1, 4294967295u, 123456}, {0}, {0}, {0}},
    {"a.i32", GGUF_VT_INT32, 3, {(uint64_t)-2147483648ll, 3, 2147483647}, {0}, {0}, {0}},
    {"a.f32", GGUF_VT_FLOAT32, 3, {0}, {1.5, -2.25, 1e30}, {0}, {0}},
    {"a.bool", GGUF_VT_BOOL, 3, {1, 0, 1}, {0}, {0}, {0}},
    {"a.str", GGUF_VT_STRING, 4, {0}, {0}, {"a", "", "xyz\0q", "\xe2\x82\xac"}, {1, 0, 5, 3}},
    {"a.u64", GGUF_VT_UINT64, 2, {UINT64_MAX, 5}, {0}, {0}, {0}},
    {"a.i64", GGUF_VT_INT64, 2, {(uint64_t)INT64_MIN, (uint64_t)-1}, {0}, {0}, {0}},
    {"a.f64", GGUF_VT_FLOAT64, 3, {0}, {-0.0, 1e-300, 2.5}, {0}, {0}},
    {"a.empty", GGUF_VT_UINT32, 0, {0}, {0}, {0}, {0}},
    {"a.empty_str", GGUF_VT_STRING, 0, {0}, {0}, {0}, {0}},
};

typedef struct tval {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t nbytes;
    int slot; /* position in the data section (the data order differs from the info order) */
} tval;

static const tval tensors[] = {
    {"tok.f32", 2, {4, 3, 1, 1}, TN_F32, 48, 2},
    {"w.q8", 2, {64, 2, 1, 1}, TN_Q8_0, 2 * 2 * 34, 0},
    {"x.f16", 4, {2, 1, 3, 2}, TN_F16, 24, 3},
    {"q.q4_1", 1, {32, 1, 1, 1}, TN_Q4_1, 20, 1},
};
#define N_TENSORS ((int)CM_ARRAY_LEN(tensors))

static uint8_t data_byte(int t, uint64_t i)
{
    return (uint8_t)(i * 7 + (uint64_t)t * 31 + 1);
}

static void w_scalar(wb *w, const sval *v)
{
    w_kv(w, v->key, v->type);
    switch (v->type) {
    case GGUF_VT_FLOAT32:
        w_f32(w, (float)v->f);
        break;
    case GGUF_VT_FLOAT64:
        w_f64(w, v->f);
        break;
    case GGUF_VT_STRING:
        w_strn(w, v->s, v->slen);
        break;
    case GGUF_VT_UINT8:
    case GGUF_VT_INT8:
    case GGUF_VT_BOOL:
        w_le(w, v->bits, 1);
        break;
    case GGUF_VT_UINT16:
    case GGUF_VT_INT16:
        w_le(w, v->bits, 2);
        break;
    case GGUF_VT_UINT32:
    case GGUF_VT_INT32:
        w_le(w, v->bits, 4);
        break;
    default:
        w_le(w, v->bits, 8);
        break;
    }
}

static int esize(uint32_t t)
{
    static const int sz[] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 0, 8, 8, 8};
    return sz[t];
}

static void w_array(wb *w, const aval *a)
{
    w_kv(w, a->key, GGUF_VT_ARRAY);
    w_u32(w, a->et);
    w_u64(w, a->n);
    for (uint64_t i = 0; i < a->n; i++) {
        if (a->et == GGUF_VT_STRING)
            w_strn(w, a->s[i], a->sl[i]);
        else if (a->et == GGUF_VT_FLOAT32)
            w_f32(w, (float)a->f[i]);
        else if (a->et == GGUF_VT_FLOAT64)
            w_f64(w, a->f[i]);
        else
            w_le(w, a->bits[i], esize(a->et));
    }
}

/* Build the valid file. align 0: no general.alignment key (default 32). Tensor data follows in
 * `slot` order, each at a multiple of the alignment, the last one ending exactly at EOF. */
static void build_valid(wb *w, uint32_t version, uint32_t align)
{
    uint64_t al = align ? align : 32;
    uint64_t n_kv = CM_ARRAY_LEN(scalars) + CM_ARRAY_LEN(arrays) + (align ? 1 : 0);
    w_hdr(w, version, N_TENSORS, n_kv);
    for (size_t i = 0; i < CM_ARRAY_LEN(scalars); i++) {
        w_scalar(w, &scalars[i]);
        if (i == 3 && align) {
            w_kv(w, "general.alignment", GGUF_VT_UINT32);
            w_u32(w, align);
        }
    }
    for (size_t i = 0; i < CM_ARRAY_LEN(arrays); i++)
        w_array(w, &arrays[i]);
    uint64_t offs[N_TENSORS], off = 0;
    for (int slot = 0; slot < N_TENSORS; slot++)
        for (int t = 0; t < N_TENSORS; t++)
            if (tensors[t].slot == slot) {
                offs[t] = off;
                off += (tensors[t].nbytes + al - 1) / al * al;
            }
    for (int t = 0; t < N_TENSORS; t++)
        w_ti(w, tensors[t].name, tensors[t].n_dims, tensors[t].ne, tensors[t].type, offs[t]);
    w_pad(w, al);
    size_t base = w->n;
    for (int slot = 0; slot < N_TENSORS; slot++)
        for (int t = 0; t < N_TENSORS; t++)
            if (tensors[t].slot == slot) {
                CM_ASSERT(w->n == base + offs[t]);
                for (uint64_t i = 0; i < tensors[t].nbytes; i++)
                    w_u8(w, data_byte(t, i));
                if (slot != N_TENSORS - 1) w_pad(w, al);
            }
}

static bool str_is(gguf_str s, const char *p, size_t n)
{
    return s.len == n && (n == 0 || memcmp(s.ptr, p, n) == 0);
}

static void check_valid(const gguf_file *f, const uint8_t *base, uint32_t version, uint32_t align,
                        const char *tag)
{
    uint64_t al = align ? align : 32;
    cm_err e = {0};
    CHECK(gguf_version(f) == version, "%s: version %u", tag, gguf_version(f));
    CHECK(gguf_alignment(f) == al, "%s: alignment %" PRIu64, tag, gguf_alignment(f));
    int64_t n_kv = (int64_t)(CM_ARRAY_LEN(scalars) + CM_ARRAY_LEN(arrays) + (align ? 1 : 0));
    CHECK(gguf_n_kv(f) == n_kv, "%s: n_kv %" PRId64, tag, gguf_n_kv(f));
    CHECK(gguf_n_tensors(f) == N_TENSORS, "%s: n_tensors %" PRId64, tag, gguf_n_tensors(f));
    CHECK(gguf_kv_at(f, -1) == NULL && gguf_kv_at(f, n_kv) == NULL, "%s: kv_at bounds", tag);
    CHECK(gguf_tensor_at(f, N_TENSORS) == NULL, "%s: tensor_at bounds", tag);

    /* kv order is file order. */
    CHECK(gguf_str_eq(gguf_kv_at(f, 0)->key, "t.u8"), "%s: first key", tag);
    CHECK(gguf_str_eq(gguf_kv_at(f, n_kv - 1)->key, "a.empty_str"), "%s: last key", tag);

    for (size_t i = 0; i < CM_ARRAY_LEN(scalars); i++) {
        const sval *v = &scalars[i];
        const gguf_kv *kv = gguf_find_kv(f, v->key);
        CHECK(kv != NULL, "%s: key %s not found", tag, v->key);
        if (!kv) continue;
        CHECK(kv->type == v->type, "%s: %s type %u", tag, v->key, kv->type);
        CHECK(gguf_str_eq(kv->key, v->key), "%s: %s key", tag, v->key);
        const uint8_t *d = kv->data;
        CHECK(d > base, "%s: %s data pointer", tag, v->key);
        if (v->type == GGUF_VT_STRING) {
            gguf_str s = {0};
            CHECK(gguf_get_str(f, v->key, &s, &e) == 0, "%s: get_str %s: %s", tag, v->key, e.msg);
            CHECK(str_is(s, v->s, v->slen), "%s: %s value", tag, v->key);
            CHECK(kv->arr_strs && str_is(kv->arr_strs[0], v->s, v->slen), "%s: %s arr_strs", tag,
                  v->key);
            CHECK(kv->data == (const void *)s.ptr, "%s: %s data", tag, v->key);
        } else if (v->type == GGUF_VT_FLOAT32 || v->type == GGUF_VT_FLOAT64) {
            double x = 0;
            CHECK(gguf_get_f64(f, v->key, &x, &e) == 0 && x == v->f, "%s: %s = %g", tag, v->key, x);
            float xf;
            memcpy(&xf, d, 4);
            if (v->type == GGUF_VT_FLOAT32) CHECK(xf == (float)v->f, "%s: %s raw", tag, v->key);
        } else if (v->type == GGUF_VT_BOOL) {
            bool b = !v->bits;
            CHECK(gguf_get_bool(f, v->key, &b, &e) == 0 && b == (v->bits != 0), "%s: %s", tag,
                  v->key);
        } else {
            bool is_signed = v->type == GGUF_VT_INT8 || v->type == GGUF_VT_INT16 ||
                             v->type == GGUF_VT_INT32 || v->type == GGUF_VT_INT64;
            int64_t want = (int64_t)v->bits;
            if (is_signed || v->bits <= (uint64_t)INT64_MAX) {
                int64_t x = 0;
                CHECK(gguf_get_i64(f, v->key, &x, &e) == 0 && x == want,
                      "%s: %s = %" PRId64 " (%s)", tag, v->key, x, e.msg);
            }
            if (!is_signed || want >= 0) {
                uint64_t x = 0;
                CHECK(gguf_get_u64(f, v->key, &x, &e) == 0 && x == v->bits, "%s: %s = %" PRIu64,
                      tag, v->key, x);
            }
        }
    }

    /* Typed getter conversions and their errors. */
    uint32_t u32 = 0;
    uint64_t u64 = 0;
    int64_t i64 = 0;
    float f32 = 0;
    bool b = false;
    gguf_str s;
    CHECK(gguf_get_u32(f, "t.u8", &u32, &e) == 0 && u32 == 200, "%s: u32 from u8", tag);
    CHECK(gguf_get_u32(f, "t.u32", &u32, &e) == 0 && u32 == 4000000000u, "%s: u32", tag);
    CHECK(gguf_get_u64(f, "t.bool", &u64, &e) == 0 && u64 == 1, "%s: u64 from bool", tag);
    e.code = 0;
    CHECK(gguf_get_u32(f, "t.u64", &u32, &e) == -CM_EFORMAT && strstr(e.msg, "does not fit"),
          "%s: u32 overflow: %s", tag, e.msg);
    CHECK(gguf_get_u64(f, "t.i8", &u64, &e) == -CM_EFORMAT && strstr(e.msg, "t.i8"),
          "%s: u64 of negative: %s", tag, e.msg);
    CHECK(gguf_get_i64(f, "t.u64", &i64, &e) == -CM_EFORMAT, "%s: i64 overflow", tag);
    CHECK(gguf_get_i64(f, "t.i16", &i64, &e) == 0 && i64 == -30000, "%s: i64 from i16", tag);
    CHECK(gguf_get_f32(f, "t.f32", &f32, &e) == 0 && f32 == 3.25f, "%s: f32", tag);
    CHECK(gguf_get_f32(f, "t.f64", &f32, &e) == -CM_EFORMAT, "%s: f32 overflow", tag);
    CHECK(gguf_get_f32(f, "t.u8", &f32, &e) == -CM_EFORMAT && strstr(e.msg, "uint8"),
          "%s: f32 from int: %s", tag, e.msg);
    CHECK(gguf_get_str(f, "t.u8", &s, &e) == -CM_EFORMAT && strstr(e.msg, "expected string"),
          "%s: str type mismatch: %s", tag, e.msg);
    CHECK(gguf_get_u32(f, "t.str", &u32, &e) == -CM_EFORMAT, "%s: int from string", tag);
    CHECK(gguf_get_u32(f, "a.u32", &u32, &e) == -CM_EFORMAT && strstr(e.msg, "array"),
          "%s: int from array: %s", tag, e.msg);
    CHECK(gguf_get_bool(f, "t.u8", &b, &e) == -CM_EFORMAT, "%s: bool from int", tag);
    CHECK(gguf_get_bool(f, "nope", &b, &e) == -ENOENT, "%s: missing key", tag);
    CHECK(gguf_get_arr(f, "t.u8", NULL, NULL, NULL, NULL, &e) == -CM_EFORMAT, "%s: arr", tag);
    CHECK(gguf_find_kv(f, "nope") == NULL && gguf_find_kv(f, "t.u") == NULL &&
              gguf_find_kv(f, "t.u88") == NULL && gguf_find_kv(f, "") == NULL,
          "%s: find_kv of absent keys", tag);
    CHECK(gguf_find_kv(f, "w\"e\\ird\x01\xff") != NULL, "%s: odd key", tag);
    if (align) {
        CHECK(gguf_get_u32(f, "general.alignment", &u32, &e) == 0 && u32 == align,
              "%s: alignment kv", tag);
    }

    for (size_t i = 0; i < CM_ARRAY_LEN(arrays); i++) {
        const aval *a = &arrays[i];
        uint32_t et = 99;
        uint64_t n = 99;
        const void *data = NULL;
        const gguf_str *strs = NULL;
        int rc = gguf_get_arr(f, a->key, &et, &n, &data, &strs, &e);
        CHECK(rc == 0, "%s: get_arr %s: %s", tag, a->key, e.msg);
        if (rc) continue;
        const gguf_kv *kv = gguf_find_kv(f, a->key);
        CHECK(kv->type == GGUF_VT_ARRAY && kv->arr_type == a->et && kv->arr_n == a->n,
              "%s: %s kv fields", tag, a->key);
        CHECK(et == a->et && n == a->n && data == kv->data, "%s: %s: type %u n %" PRIu64, tag,
              a->key, et, n);
        for (uint64_t k = 0; k < a->n; k++) {
            if (a->et == GGUF_VT_STRING) {
                CHECK(strs && str_is(strs[k], a->s[k], a->sl[k]), "%s: %s[%" PRIu64 "]", tag,
                      a->key, k);
            } else if (a->et == GGUF_VT_FLOAT32 || a->et == GGUF_VT_FLOAT64) {
                double want = a->et == GGUF_VT_FLOAT32 ? (double)(float)a->f[k] : a->f[k];
                double got = gguf_arr_f64(kv, k);
                CHECK(got == want && signbit(got) == signbit(want),
                      "%s: %s[%" PRIu64 "] = %g, want %g", tag, a->key, k, got, want);
            } else {
                bool sgn = a->et == GGUF_VT_INT8 || a->et == GGUF_VT_INT16 ||
                           a->et == GGUF_VT_INT32 || a->et == GGUF_VT_INT64;
                int64_t want = sgn                                ? (int64_t)a->bits[k]
                               : a->bits[k] > (uint64_t)INT64_MAX ? INT64_MAX
                                                                  : (int64_t)a->bits[k];
                int64_t got = gguf_arr_i64(kv, k);
                CHECK(got == want, "%s: %s[%" PRIu64 "] = %" PRId64 ", want %" PRId64, tag, a->key,
                      k, got, want);
                double wantf = sgn ? (double)(int64_t)a->bits[k] : (double)a->bits[k];
                CHECK(gguf_arr_f64(kv, k) == wantf, "%s: %s[%" PRIu64 "] as f64", tag, a->key, k);
                /* raw bytes */
                uint64_t raw = 0;
                const uint8_t *p = (const uint8_t *)data + k * (uint64_t)esize(a->et);
                for (int bi = esize(a->et) - 1; bi >= 0; bi--)
                    raw = raw << 8 | p[bi];
                uint64_t mask = esize(a->et) == 8 ? UINT64_MAX : (1ull << (8 * esize(a->et))) - 1;
                CHECK(raw == (a->bits[k] & mask), "%s: %s[%" PRIu64 "] raw", tag, a->key, k);
            }
        }
    }

    uint64_t data_off = gguf_data_offset(f);
    CHECK(data_off % al == 0, "%s: data offset %" PRIu64, tag, data_off);
    for (int t = 0; t < N_TENSORS; t++) {
        const tval *tv = &tensors[t];
        const gguf_tensor *gt = gguf_find_tensor(f, tv->name);
        CHECK(gt == gguf_tensor_at(f, t), "%s: find_tensor %s", tag, tv->name);
        if (!gt) continue;
        CHECK(gguf_str_eq(gt->name, tv->name) && gt->n_dims == tv->n_dims && gt->type == tv->type,
              "%s: tensor %s header", tag, tv->name);
        for (int d = 0; d < 4; d++)
            CHECK(gt->ne[d] == tv->ne[d], "%s: %s ne[%d] = %" PRIu64, tag, tv->name, d, gt->ne[d]);
        CHECK(gt->nbytes == tv->nbytes, "%s: %s nbytes %" PRIu64, tag, tv->name, gt->nbytes);
        CHECK(gt->offset % al == 0, "%s: %s offset", tag, tv->name);
        CHECK((const uint8_t *)gt->data == base + data_off + gt->offset, "%s: %s data ptr", tag,
              tv->name);
        int64_t rs = tn_row_size((int)tv->type, (int64_t)tv->ne[0]);
        CHECK(rs > 0 && (uint64_t)rs * (gt->ne[1] * gt->ne[2] * gt->ne[3]) == gt->nbytes,
              "%s: %s nbytes vs tn_row_size", tag, tv->name);
        bool same = true;
        for (uint64_t i = 0; i < tv->nbytes; i++)
            same &= ((const uint8_t *)gt->data)[i] == data_byte(t, i);
        CHECK(same, "%s: %s data bytes", tag, tv->name);
    }
    CHECK(gguf_find_tensor(f, "nope") == NULL && gguf_find_tensor(f, "w.q") == NULL &&
              gguf_find_tensor(f, "t.u8") == NULL,
          "%s: find_tensor of absent names", tag);

    /* The dump: text and JSON, the JSON valid and escaped. */
    size_t len;
    char *txt = print_to_str(f, false, true, &len);
    CHECK(txt && strstr(txt, "t.u8") && strstr(txt, "w.q8") && strstr(txt, "Q8_0") &&
              strstr(txt, "64 x 2") && strstr(txt, "a\\tb\\xc3(\xe2\x82\xac\\x00z"),
          "%s: text dump:\n%s", tag, txt ? txt : "(null)");
    free(txt);
    char *js = print_to_str(f, true, true, &len);
    CHECK(js && json_valid(js, len), "%s: JSON dump does not parse:\n%s", tag, js ? js : "");
    CHECK(js &&
              strstr(js, "\"w\\\"e\\\\ird\\u0001\\ufffd\": \"a\\tb\\ufffd(\xe2\x82\xac\\u0000z\""),
          "%s: JSON escaping:\n%s", tag, js ? js : "");
    CHECK(js &&
              strstr(js, "\"a.str\": {\"type\": \"string\", \"count\": 4, \"head\": [\"a\", \"\", "
                         "\"xyz\\u0000q\", \"\xe2\x82\xac\"]}"),
          "%s: JSON string array:\n%s", tag, js ? js : "");
    CHECK(js && strstr(js, "{\"name\": \"w.q8\", \"type\": \"Q8_0\", \"dims\": [64, 2]"),
          "%s: JSON tensor", tag);
    CHECK(js && strstr(js, "\"t.i64\": -81985529216486895") && strstr(js, "\"t.bool\": true"),
          "%s: JSON scalars", tag);
    free(js);
}

static void test_valid(uint32_t version, uint32_t align)
{
    char tag[64];
    snprintf(tag, sizeof(tag), "v%u align %u", version, align);
    wb w = {0};
    build_valid(&w, version, align);
    cm_err e = {0};
    void *copy;
    gguf_file *f = open_copy(&w, w.n, &copy, &e);
    CHECK(f != NULL, "%s: open failed: %s", tag, e.msg);
    if (f) {
        check_valid(f, copy, version, align, tag);
        gguf_close(f);
    }
    free(copy);

    /* The same through a file and gguf_open (mmap). */
    char path[] = "/tmp/test-gguf-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) {
        CHECK(write(fd, w.p, w.n) == (ssize_t)w.n, "write");
        close(fd);
        f = gguf_open(path, &e);
        CHECK(f != NULL, "%s: gguf_open failed: %s", tag, e.msg);
        if (f) {
            CHECK(gguf_file_size(f) == w.n, "file size");
            const gguf_tensor *t0 = gguf_tensor_at(f, 0);
            check_valid(f, (const uint8_t *)t0->data - gguf_data_offset(f) - t0->offset, version,
                        align, tag);
            gguf_close(f);
        }
        unlink(path);
    }

    /* Every proper prefix fails cleanly with -CM_EFORMAT. */
    int bad = 0;
    for (size_t n = 0; n < w.n; n++) {
        e.code = 0;
        e.msg[0] = '\0';
        f = open_copy(&w, n, &copy, &e);
        if (f || e.code != -CM_EFORMAT || !e.msg[0]) {
            if (bad++ < 5)
                fprintf(stderr, "%s: prefix %zu of %zu: %s (code %d, %s)\n", tag, n, w.n,
                        f ? "opened" : "wrong error", e.code, e.msg);
        }
        gguf_close(f);
        free(copy);
    }
    CHECK(bad == 0, "%s: %d of %zu prefixes did not fail cleanly", tag, bad, w.n);
    wb_free(&w);
}

/* ---- bad files ---------------------------------------------------------------------------- */

/* A small valid file: one kv "k" (its key's length at offset 24, its type at 33), one F32
 * tensor of 8 elements. */
static void build_small(wb *w, uint32_t version)
{
    w_hdr(w, version, 1, 1);
    w_kv(w, "k", GGUF_VT_UINT32);
    w_u32(w, 7);
    uint64_t ne[1] = {8};
    w_ti(w, "t", 1, ne, TN_F32, 0);
    w_pad(w, 32);
    w_zeros(w, 32);
}

/* A file with one tensor info as given and `data` bytes of data. */
static void build_tensor(wb *w, const char *name, uint32_t n_dims, const uint64_t *ne,
                         uint32_t type, uint64_t offset, size_t data)
{
    w_hdr(w, 3, 1, 0);
    w_ti(w, name, n_dims, ne, type, offset);
    w_pad(w, 32);
    w_zeros(w, data);
}

static void test_bad(void)
{
    wb w = {0};

    build_small(&w, 3);
    void *copy;
    cm_err e = {0};
    gguf_file *f = open_copy(&w, w.n, &copy, &e);
    CHECK(f && gguf_n_tensors(f) == 1 && gguf_n_kv(f) == 1, "small file: %s", e.msg);
    gguf_close(f);
    free(copy);

    w.p[3] = 'X';
    expect_err("bad magic", &w, -CM_EFORMAT, "bad magic");
    w.p[3] = 'F';
    patch_u32(&w, 4, 1);
    expect_err("version 1", &w, -CM_EUNSUPPORTED, "version 1");
    patch_u32(&w, 4, 99);
    expect_err("version 99", &w, -CM_EUNSUPPORTED, "unsupported version 99");
    patch_u32(&w, 4, 0);
    expect_err("version 0", &w, -CM_EFORMAT, "invalid version 0");
    patch_u32(&w, 4, 0x03000000);
    expect_err("big-endian", &w, -CM_EUNSUPPORTED, "big-endian");
    patch_u32(&w, 4, 3);
    patch_u64(&w, 16, 1ull << 60);
    expect_err("kv_count huge", &w, -CM_EFORMAT, "kv_count 1152921504606846976 at offset 16");
    patch_u64(&w, 16, UINT64_MAX);
    expect_err("kv_count max", &w, -CM_EFORMAT, "kv_count");
    patch_u64(&w, 16, 1);
    patch_u64(&w, 8, 1ull << 62);
    expect_err("tensor_count huge", &w, -CM_EFORMAT, "tensor_count 4611686018427387904");
    patch_u64(&w, 8, 1);
    patch_u64(&w, 24, UINT64_MAX); /* the key's length */
    expect_err("key length huge", &w, -CM_EFORMAT, "key length 18446744073709551615 at offset 24");
    patch_u64(&w, 24, 0);
    expect_err("empty key", &w, -CM_EFORMAT, "empty key");
    patch_u64(&w, 24, 1);
    patch_u32(&w, 33, 13);
    expect_err("unknown value type", &w, -CM_EFORMAT, "unknown value type 13 at offset 33");
    patch_u32(&w, 33, GGUF_VT_UINT32);
    wb_free(&w);

    /* A string value whose length is huge. */
    w_hdr(&w, 3, 0, 1);
    w_kv(&w, "s", GGUF_VT_STRING);
    w_u64(&w, 1ull << 63);
    w_raw(&w, "abc", 3);
    expect_err("string length huge", &w, -CM_EFORMAT, "string value length 9223372036854775808");
    wb_free(&w);

    /* Array counts whose count × element size overflows 64 bits, or just does not fit. */
    w_hdr(&w, 3, 0, 1);
    w_kv(&w, "a", GGUF_VT_ARRAY);
    w_u32(&w, GGUF_VT_UINT64);
    w_u64(&w, (1ull << 61) + 1); /* × 8 wraps to 8 */
    w_u64(&w, 1);
    expect_err("array count overflow", &w, -CM_EFORMAT, "array count 2305843009213693953");
    patch_u64(&w, 24 + 9 + 4 + 4, 2);
    expect_err("array count too big", &w, -CM_EFORMAT, "array count 2");
    patch_u64(&w, 24 + 9 + 4 + 4, 1);
    f = open_copy(&w, w.n, &copy, &e);
    CHECK(f != NULL, "array of 1 u64: %s", e.msg);
    gguf_close(f);
    free(copy);
    patch_u32(&w, 24 + 9 + 4, GGUF_VT_STRING);
    patch_u64(&w, 24 + 9 + 4 + 4, UINT64_MAX / 8 + 1);
    expect_err("string array count huge", &w, -CM_EFORMAT, "array count");
    patch_u32(&w, 24 + 9 + 4, GGUF_VT_ARRAY);
    expect_err("nested array", &w, -CM_EFORMAT, "nested array");
    patch_u32(&w, 24 + 9 + 4, 77);
    expect_err("unknown element type", &w, -CM_EFORMAT, "unknown array element type 77");
    wb_free(&w);

    /* A string array with a string running past the end. */
    w_hdr(&w, 3, 0, 1);
    w_kv(&w, "a", GGUF_VT_ARRAY);
    w_u32(&w, GGUF_VT_STRING);
    w_u64(&w, 2);
    w_str(&w, "ok");
    w_u64(&w, 100);
    w_raw(&w, "short", 5);
    expect_err("array string past end", &w, -CM_EFORMAT, "array string length 100");
    wb_free(&w);

    /* Bools other than 0/1. */
    w_hdr(&w, 3, 0, 1);
    w_kv(&w, "b", GGUF_VT_BOOL);
    w_u8(&w, 2);
    expect_err("bool 2", &w, -CM_EFORMAT, "neither 0 nor 1");
    wb_free(&w);
    w_hdr(&w, 3, 0, 1);
    w_kv(&w, "b", GGUF_VT_ARRAY);
    w_u32(&w, GGUF_VT_BOOL);
    w_u64(&w, 3);
    w_u8(&w, 1);
    w_u8(&w, 0);
    w_u8(&w, 255);
    expect_err("bool array 255", &w, -CM_EFORMAT, "bool value 255");
    wb_free(&w);

    /* Duplicate key. */
    w_hdr(&w, 3, 0, 3);
    w_kv(&w, "x.a", GGUF_VT_UINT8);
    w_u8(&w, 1);
    w_kv(&w, "x.b", GGUF_VT_UINT8);
    w_u8(&w, 1);
    w_kv(&w, "x.a", GGUF_VT_INT32);
    w_u32(&w, 1);
    expect_err("duplicate key", &w, -CM_EFORMAT, "duplicate key 'x.a'");
    wb_free(&w);

    /* Alignment: 0, not a power of two, wrong type; 64 works. */
    static const uint32_t bad_al[] = {0, 3, 48, 0x80000001u};
    for (size_t i = 0; i < CM_ARRAY_LEN(bad_al); i++) {
        w_hdr(&w, 3, 0, 1);
        w_kv(&w, "general.alignment", GGUF_VT_UINT32);
        w_u32(&w, bad_al[i]);
        char what[64], phrase[64];
        snprintf(what, sizeof(what), "alignment %u", bad_al[i]);
        snprintf(phrase, sizeof(phrase), "general.alignment %u at offset", bad_al[i]);
        expect_err(what, &w, -CM_EFORMAT, phrase);
        wb_free(&w);
    }
    w_hdr(&w, 3, 0, 1);
    w_kv(&w, "general.alignment", GGUF_VT_UINT64);
    w_u64(&w, 64);
    expect_err("alignment u64", &w, -CM_EFORMAT, "must be uint32");
    wb_free(&w);

    /* Tensor infos. */
    uint64_t ne8[4] = {8, 1, 1, 1};
    build_tensor(&w, "t", 0, ne8, TN_F32, 0, 32);
    expect_err("n_dims 0", &w, -CM_EFORMAT, "n_dims 0");
    wb_free(&w);
    uint64_t ne5[5] = {8, 1, 1, 1, 1};
    build_tensor(&w, "t", 5, ne5, TN_F32, 0, 32);
    expect_err("n_dims 5", &w, -CM_EFORMAT, "tensor 't': n_dims 5");
    wb_free(&w);
    uint64_t ne0[2] = {8, 0};
    build_tensor(&w, "t", 2, ne0, TN_F32, 0, 32);
    expect_err("dim 0", &w, -CM_EFORMAT, "dimension 1 is 0");
    wb_free(&w);
    uint64_t nebig[1] = {1ull << 63};
    build_tensor(&w, "t", 1, nebig, TN_F32, 0, 32);
    expect_err("dim > INT64_MAX", &w, -CM_EFORMAT, "dimension 0 is 9223372036854775808");
    wb_free(&w);
    uint64_t neov[3] = {1ull << 32, 1ull << 20, 1ull << 12};
    build_tensor(&w, "big", 3, neov, TN_F32, 0, 32);
    expect_err("ne product overflow", &w, -CM_EFORMAT, "element count overflows");
    wb_free(&w);
    uint64_t nebytes[2] = {1ull << 31, 1ull << 31};
    build_tensor(&w, "big", 2, nebytes, TN_F32, 0, 32);
    expect_err("nbytes overflow", &w, -CM_EFORMAT, "size in bytes overflows");
    wb_free(&w);
    build_tensor(&w, "blk.0.attn_q.weight", 1, ne8, 1000, 0, 32);
    expect_err("unknown type 1000", &w, -CM_EFORMAT,
               "tensor 'blk.0.attn_q.weight': unknown tensor type id 1000");
    wb_free(&w);
    build_tensor(&w, "t", 1, ne8, TN_TYPE_MAX, 0, 32);
    expect_err("unknown type TN_TYPE_MAX", &w, -CM_EFORMAT, "unknown tensor type id");
    wb_free(&w);
    uint64_t ne33[1] = {33};
    build_tensor(&w, "t", 1, ne33, TN_Q8_0, 0, 64);
    expect_err("row not a multiple of block", &w, -CM_EFORMAT,
               "row length 33 is not a multiple of the block size 32");
    wb_free(&w);
    build_tensor(&w, "t", 1, ne8, TN_F32, 16, 64);
    expect_err("offset misaligned", &w, -CM_EFORMAT, "not a multiple of the alignment 32");
    wb_free(&w);
    build_tensor(&w, "blk.0.attn_q.weight", 1, ne8, TN_F32, 0, 31);
    expect_err("data past EOF", &w, -CM_EFORMAT, "tensor 'blk.0.attn_q.weight' data [offset 0");
    expect_err("data past EOF (2)", &w, -CM_EFORMAT, "extends past end of file");
    wb_free(&w);
    build_tensor(&w, "t", 1, ne8, TN_F32, UINT64_MAX - 31, 32);
    expect_err("offset near 2^64", &w, -CM_EFORMAT, "extends past end of file");
    wb_free(&w);
    build_tensor(&w, "t", 1, ne8, TN_F32, 32, 32);
    expect_err("offset past data", &w, -CM_EFORMAT, "extends past end of file");
    wb_free(&w);
    w_hdr(&w, 3, 1, 0);
    w_ti(&w, "", 1, ne8, TN_F32, 0);
    w_pad(&w, 32);
    w_zeros(&w, 32);
    expect_err("empty tensor name", &w, -CM_EFORMAT, "empty name");
    wb_free(&w);

    /* A known-but-unsupported type opens fine (the model loader decides). */
    const char *iq = tn_type_name(16);
    if (iq && tn_type_block(16) > 0) {
        uint64_t ne256[2] = {256, 2};
        int64_t rs = tn_row_size(16, 256);
        build_tensor(&w, "iq", 2, ne256, 16, 0, (size_t)rs * 2);
        f = open_copy(&w, w.n, &copy, &e);
        CHECK(f && gguf_tensor_at(f, 0)->nbytes == (uint64_t)rs * 2, "%s tensor does not open: %s",
              iq, e.msg);
        gguf_close(f);
        free(copy);
        wb_free(&w);
    } else {
        fprintf(stderr, "note: tn_type_name(16) unknown; IQ2_XXS case skipped\n");
    }

    /* Two tensors: duplicate names, overlapping data. */
    uint64_t ne4[1] = {16};
    w_hdr(&w, 3, 2, 0);
    w_ti(&w, "dup", 1, ne4, TN_F32, 0);
    w_ti(&w, "dup", 1, ne4, TN_F32, 64);
    w_pad(&w, 32);
    w_zeros(&w, 128);
    expect_err("duplicate tensor name", &w, -CM_EFORMAT, "duplicate tensor name 'dup'");
    wb_free(&w);
    w_hdr(&w, 3, 2, 0);
    w_ti(&w, "a", 1, ne4, TN_F32, 32); /* 64 bytes at 32: overlaps b at 64 */
    w_ti(&w, "b", 1, ne4, TN_F32, 64);
    w_pad(&w, 32);
    w_zeros(&w, 128);
    expect_err("overlapping data", &w, -CM_EFORMAT, "overlaps");
    wb_free(&w);
    w_hdr(&w, 3, 2, 0);
    w_ti(&w, "a", 1, ne4, TN_F32, 64);
    w_ti(&w, "b", 1, ne4, TN_F32, 64); /* same offset */
    w_pad(&w, 32);
    w_zeros(&w, 128);
    expect_err("same offset", &w, -CM_EFORMAT, "overlaps");
    wb_free(&w);
    w_hdr(&w, 3, 2, 0);
    w_ti(&w, "a", 1, ne4, TN_F32, 64); /* adjacent: fine */
    w_ti(&w, "b", 1, ne4, TN_F32, 0);
    w_pad(&w, 32);
    w_zeros(&w, 128);
    f = open_copy(&w, w.n, &copy, &e);
    CHECK(f != NULL, "adjacent tensors: %s", e.msg);
    gguf_close(f);
    free(copy);
    wb_free(&w);

    /* No tensors, no key-values. */
    w_hdr(&w, 2, 0, 0);
    f = open_copy(&w, w.n, &copy, &e);
    CHECK(f && gguf_n_kv(f) == 0 && gguf_n_tensors(f) == 0 && gguf_find_kv(f, "x") == NULL &&
              gguf_find_tensor(f, "x") == NULL,
          "empty file: %s", e.msg);
    if (f) {
        size_t len;
        char *js = print_to_str(f, true, true, &len);
        CHECK(js && json_valid(js, len), "empty JSON: %s", js ? js : "");
        free(js);
    }
    gguf_close(f);
    free(copy);
    wb_free(&w);

    /* Too small / not there. */
    f = gguf_open_mem(NULL, 0, &e);
    CHECK(!f && e.code == -CM_EFORMAT && strstr(e.msg, "too small"), "empty buffer: %s", e.msg);
    f = gguf_open("/nonexistent/x.gguf", &e);
    CHECK(!f && e.code == -ENOENT && strstr(e.msg, "/nonexistent/x.gguf"), "missing: %s", e.msg);
    f = gguf_open("/tmp", &e);
    CHECK(!f && e.code == -CM_EFORMAT && strstr(e.msg, "not a regular file"), "dir: %s", e.msg);
}

/* Many tensors: every name found through the hash table; the sort-based overlap check. */
static void test_many(void)
{
    enum { N = 3000 };
    wb w = {0};
    w_hdr(&w, 3, N, 1);
    w_kv(&w, "general.alignment", GGUF_VT_UINT32);
    w_u32(&w, 8);
    uint64_t ne[1] = {2};
    char name[32];
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "blk.%d.w", i);
        w_ti(&w, name, 1, ne, TN_F32, (uint64_t)(N - 1 - i) * 8);
    }
    w_pad(&w, 8);
    w_zeros(&w, (size_t)N * 8);
    cm_err e = {0};
    void *copy;
    gguf_file *f = open_copy(&w, w.n, &copy, &e);
    CHECK(f != NULL, "many tensors: %s", e.msg);
    if (f) {
        int bad = 0;
        for (int i = 0; i < N; i++) {
            snprintf(name, sizeof(name), "blk.%d.w", i);
            const gguf_tensor *t = gguf_find_tensor(f, name);
            bad += t != gguf_tensor_at(f, i) || t->offset != (uint64_t)(N - 1 - i) * 8;
        }
        CHECK(bad == 0, "many tensors: %d lookups wrong", bad);
        gguf_close(f);
    }
    free(copy);
    /* Now make tensor 1234 overlap its neighbour. */
    wb_free(&w);
    w_hdr(&w, 3, N, 1);
    w_kv(&w, "general.alignment", GGUF_VT_UINT32);
    w_u32(&w, 8);
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "blk.%d.w", i);
        uint64_t n2[1] = {i == 1234 ? 4u : 2u};
        w_ti(&w, name, 1, n2, TN_F32, (uint64_t)i * 8);
    }
    w_pad(&w, 8);
    w_zeros(&w, (size_t)N * 8);
    expect_err("overlap among many", &w, -CM_EFORMAT, "tensor 'blk.1234.w' data");
    wb_free(&w);
}

static void test_model(void)
{
    const char *path = getenv("IHIP_MODEL");
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        printf("note: IHIP_MODEL not set or absent; real-model checks skipped\n");
        return;
    }
    cm_err e = {0};
    uint64_t t0 = cm_time_ns();
    gguf_file *f = gguf_open(path, &e);
    uint64_t t1 = cm_time_ns();
    CHECK(f != NULL, "model: %s", e.msg);
    if (!f) return;
    printf("model: opened %s in %.2f ms\n", path, (double)(t1 - t0) / 1e6);
    CHECK(gguf_n_tensors(f) == 272, "model: %" PRId64 " tensors", gguf_n_tensors(f));
    CHECK(gguf_n_kv(f) == 33, "model: %" PRId64 " kv", gguf_n_kv(f));
    CHECK(gguf_version(f) == 3, "model: version %u", gguf_version(f));
    uint32_t nb = 0;
    CHECK(gguf_get_u32(f, "llama.block_count", &nb, &e) == 0 && nb == 30, "model: blocks %u", nb);
    gguf_str arch;
    CHECK(gguf_get_str(f, "general.architecture", &arch, &e) == 0 && gguf_str_eq(arch, "llama"),
          "model: architecture");
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    CHECK(t && t->type == TN_Q8_0 && t->n_dims == 2 && t->ne[0] == 576 && t->ne[1] == 49152 &&
              t->nbytes == 49152ull * 576 / 32 * 34,
          "model: token_embd.weight");
    uint32_t et;
    uint64_t n;
    const gguf_str *strs;
    CHECK(gguf_get_arr(f, "tokenizer.ggml.tokens", &et, &n, NULL, &strs, &e) == 0 &&
              et == GGUF_VT_STRING && n == 49152 && gguf_str_eq(strs[0], "<|endoftext|>"),
          "model: tokens");
    CHECK(gguf_get_arr(f, "tokenizer.ggml.merges", &et, &n, NULL, &strs, &e) == 0 &&
              et == GGUF_VT_STRING && n == 48900,
          "model: merges");
    int bad = 0;
    uint64_t total = 0;
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *ti = gguf_tensor_at(f, i);
        char name[256];
        snprintf(name, sizeof(name), "%.*s", (int)ti->name.len, ti->name.ptr);
        bad += gguf_find_tensor(f, name) != ti;
        total += ti->nbytes;
    }
    CHECK(bad == 0, "model: %d tensor lookups wrong", bad);
    CHECK(total <= gguf_file_size(f) - gguf_data_offset(f), "model: total bytes");
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        char key[256];
        snprintf(key, sizeof(key), "%.*s", (int)kv->key.len, kv->key.ptr);
        bad += gguf_find_kv(f, key) != kv;
    }
    CHECK(bad == 0, "model: kv lookups wrong");
    size_t len;
    char *js = print_to_str(f, true, true, &len);
    CHECK(js && json_valid(js, len), "model: JSON dump invalid");
    free(js);
    gguf_close(f);
}

int main(void)
{
    test_valid(3, 0);
    test_valid(3, 64);
    test_valid(2, 0);
    test_valid(2, 16);
    test_bad();
    test_many();
    test_model();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
