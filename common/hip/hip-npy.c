/*
 * hip-npy.c — a reader for NumPy .npy files, enough for the HiP reference test vectors
 * (shared/testdata/hip-ref: int8/uint16/int32/int64/float64 arrays, C order, little-endian).
 *
 * Format: "\x93NUMPY", major, minor, header length (u16 for 1.x, u32 for 2.x/3.x), then an ASCII
 * Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...), }, then the data.
 */
#define _POSIX_C_SOURCE 200809L
#include "hip.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void hip_npy_free(hip_npy *a)
{
    free(a->data);
    memset(a, 0, sizeof(*a));
}

/* Find 'key': in the header dict and return a pointer just past the colon and blanks. */
static const char *npy_field(const char *hdr, const char *key)
{
    char pat[32];
    snprintf(pat, sizeof(pat), "'%s'", key);
    const char *p = strstr(hdr, pat);
    if (!p) return NULL;
    p += strlen(pat);
    while (*p == ' ') p++;
    if (*p != ':') return NULL;
    p++;
    while (*p == ' ') p++;
    return p;
}

static size_t npy_elem_size(const char *descr)
{
    static const struct {
        const char *d;
        size_t n;
    } types[] = {{"|i1", 1}, {"|u1", 1}, {"|b1", 1}, {"<i2", 2}, {"<u2", 2}, {"<f2", 2},
                 {"<i4", 4}, {"<u4", 4}, {"<f4", 4}, {"<i8", 8}, {"<u8", 8}, {"<f8", 8}};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (strcmp(descr, types[i].d) == 0) return types[i].n;
    return 0;
}

int hip_npy_load(const char *path, hip_npy *out, cm_err *err)
{
    memset(out, 0, sizeof(*out));
    FILE *f = fopen(path, "rb");
    if (!f) return cm_err_set(err, -ENOENT, "npy: cannot open %s", path);
    int rc = 0;
    char *hdr = NULL;
    unsigned char pre[12];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: not a .npy file", path);
        goto done;
    }
    uint32_t hl;
    if (pre[6] == 1) {
        hl = (uint32_t)pre[8] | (uint32_t)pre[9] << 8;
    } else if (pre[6] == 2 || pre[6] == 3) {
        if (fread(pre + 10, 1, 2, f) != 2) {
            rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: truncated header", path);
            goto done;
        }
        hl = (uint32_t)pre[8] | (uint32_t)pre[9] << 8 | (uint32_t)pre[10] << 16 |
             (uint32_t)pre[11] << 24;
    } else {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: version %d not supported", path, pre[6]);
        goto done;
    }
    if (hl > (1u << 20)) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: header too long", path);
        goto done;
    }
    hdr = malloc(hl + 1);
    if (!hdr) {
        rc = cm_err_set(err, -ENOMEM, "npy: out of memory");
        goto done;
    }
    if (fread(hdr, 1, hl, f) != hl) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: truncated header", path);
        goto done;
    }
    hdr[hl] = 0;
    const char *p = npy_field(hdr, "descr");
    if (!p || *p != '\'' || !strchr(p + 1, '\'') || strchr(p + 1, '\'') - (p + 1) >= 8) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: no descr", path);
        goto done;
    }
    memcpy(out->descr, p + 1, (size_t)(strchr(p + 1, '\'') - (p + 1)));
    out->elem = npy_elem_size(out->descr);
    if (!out->elem) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: dtype %s not supported", path, out->descr);
        goto done;
    }
    p = npy_field(hdr, "fortran_order");
    if (!p || strncmp(p, "False", 5) != 0) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: fortran order not supported", path);
        goto done;
    }
    p = npy_field(hdr, "shape");
    if (!p || *p != '(') {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: no shape", path);
        goto done;
    }
    p++;
    out->n = 1;
    for (;;) {
        while (*p == ' ' || *p == ',') p++;
        if (*p == ')') break;
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 0 || out->ndim >= 8) {
            rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: bad shape", path);
            goto done;
        }
        out->shape[out->ndim++] = v;
        if (v > 0 && out->n > ((int64_t)1 << 40) / v) {
            rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: too large", path);
            goto done;
        }
        out->n *= v;
        p = end;
    }
    size_t bytes = (size_t)out->n * out->elem;
    out->data = malloc(bytes ? bytes : 1);
    if (!out->data) {
        rc = cm_err_set(err, -ENOMEM, "npy: out of memory (%zu bytes)", bytes);
        goto done;
    }
    if (fread(out->data, 1, bytes, f) != bytes) {
        rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: data shorter than the shape says", path);
        goto done;
    }
    if (fgetc(f) != EOF) rc = cm_err_set(err, -CM_EFORMAT, "npy: %s: trailing bytes", path);
done:
    free(hdr);
    fclose(f);
    if (rc) hip_npy_free(out);
    return rc;
}
