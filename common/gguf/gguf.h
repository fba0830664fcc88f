/*
 * gguf.h — read-only GGUF v2/v3 reader over mmap (or a caller's memory buffer).
 *
 * Everything is validated once, at open: every count, string length, array length, tensor
 * dimension, type, offset and size is checked against the file's size before anything is read,
 * so after gguf_open succeeds every pointer handed out lies inside the mapping. A corrupt,
 * truncated or hostile file gives -CM_EFORMAT (or -CM_EUNSUPPORTED for a valid file we do not
 * read, e.g. version 1) and a message naming the problem and its byte offset; never a crash.
 *
 * Strings point into the mapping and are NOT NUL-terminated: use {ptr, len}.
 * Pointers are valid until gguf_close().
 */
#ifndef GGUF_GGUF_H
#define GGUF_GGUF_H

#include "../base/cm.h"

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

enum gguf_vtype {
    GGUF_VT_UINT8 = 0,
    GGUF_VT_INT8 = 1,
    GGUF_VT_UINT16 = 2,
    GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4,
    GGUF_VT_INT32 = 5,
    GGUF_VT_FLOAT32 = 6,
    GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8,
    GGUF_VT_ARRAY = 9,
    GGUF_VT_UINT64 = 10,
    GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12,
    GGUF_VT_COUNT
};

#define GGUF_MAX_DIMS 4

typedef struct gguf_str {
    const char *ptr; /* into the mapping; not NUL-terminated */
    uint64_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    uint32_t type;      /* enum gguf_vtype */
    uint32_t arr_type;  /* element type when type == GGUF_VT_ARRAY (never ARRAY: nested arrays
                           are rejected at open) */
    uint64_t arr_n;     /* element count when type == GGUF_VT_ARRAY */
    const void *data;   /* the raw value (scalar) or the first element (array), in the file;
                           little-endian and NOT aligned: read with memcpy. For a STRING scalar,
                           the string's first byte; for a STRING array, the first element's
                           u64 length prefix. */
    /* For string arrays: arr_n strings, built at open (owned by the gguf_file). For a STRING
     * scalar: one gguf_str, the value. NULL otherwise. */
    const gguf_str *arr_strs;
} gguf_kv;

typedef struct gguf_tensor {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the row length (contiguous); unused dims are 1 */
    uint32_t type;              /* enum tn_type */
    uint64_t offset;            /* relative to the start of the data section */
    uint64_t nbytes;            /* validated: data + nbytes lies inside the file */
    const void *data;           /* in the mapping, aligned to the file's alignment */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Map and validate a file. Returns NULL and fills err on failure. Free with gguf_close. */
CM_API gguf_file *gguf_open(const char *path, cm_err *err);
/* Validate a caller-owned buffer (not copied; must outlive the gguf_file). For fuzzing/tests. */
CM_API gguf_file *gguf_open_mem(const void *data, size_t size, cm_err *err);
CM_API void gguf_close(gguf_file *f);

CM_API uint32_t gguf_version(const gguf_file *f);
CM_API uint64_t gguf_alignment(const gguf_file *f);
CM_API uint64_t gguf_file_size(const gguf_file *f);
/* Byte offset in the file of the data section (tensor offsets are relative to it). */
CM_API uint64_t gguf_data_offset(const gguf_file *f);

CM_API int64_t gguf_n_kv(const gguf_file *f);
CM_API const gguf_kv *gguf_kv_at(const gguf_file *f, int64_t i);
/* The key-value named `key` (NUL-terminated), or NULL. */
CM_API const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key);
CM_API const char *gguf_vtype_name(uint32_t type);

/* Typed getters. Integer getters accept any integer or bool type whose value fits the target;
 * float getters accept FLOAT32/FLOAT64. Return 0, -ENOENT if absent, -CM_EFORMAT on type
 * mismatch or overflow (err names the key and the types). */
CM_API int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, cm_err *err);
CM_API int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, cm_err *err);
CM_API int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out, cm_err *err);
CM_API int gguf_get_f32(const gguf_file *f, const char *key, float *out, cm_err *err);
CM_API int gguf_get_f64(const gguf_file *f, const char *key, double *out, cm_err *err);
CM_API int gguf_get_bool(const gguf_file *f, const char *key, bool *out, cm_err *err);
CM_API int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out, cm_err *err);
/* Array of any element type: element type, count and first element. */
CM_API int gguf_get_arr(const gguf_file *f, const char *key, uint32_t *elem_type, uint64_t *n,
                        const void **data, const gguf_str **strs, cm_err *err);
/* Element i of a numeric (or bool) array as double / int64 (bounds-checked by the caller via
 * arr_n; a string array or i >= arr_n is a bug and aborts). gguf_arr_i64 saturates values that
 * do not fit (UINT64 above INT64_MAX, out-of-range floats) and gives 0 for NaN. */
CM_API double gguf_arr_f64(const gguf_kv *kv, uint64_t i);
CM_API int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i);

CM_API int64_t gguf_n_tensors(const gguf_file *f);
CM_API const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i);
CM_API const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Print the metadata (key-values; long arrays and strings summarised) and, if `tensors`, the
 * tensor table (name, type, dims, bytes) to `out`. With `json`, one JSON object instead:
 *   {"version", "alignment", "data_offset", "file_size",
 *    "kv": {key: value | {"type", "count", "head": [first elements]}},
 *    "tensors": [{"name", "type", "dims", "offset", "nbytes"}]}   ("tensors" only if asked)
 * Strings are escaped (invalid UTF-8 bytes become U+FFFD); non-finite floats become null.
 * Returns 0, or -EIO if writing to `out` failed. */
CM_API int gguf_print_info(const gguf_file *f, FILE *out, bool json, bool tensors);

/* true if s equals the NUL-terminated c string. */
static inline bool gguf_str_eq(gguf_str s, const char *c)
{
    uint64_t i = 0;
    for (; i < s.len; i++)
        if (c[i] == '\0' || c[i] != s.ptr[i]) return false;
    return c[i] == '\0';
}

#ifdef __cplusplus
}
#endif
#endif /* GGUF_GGUF_H */
