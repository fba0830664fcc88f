/*
 * gguf-dump.c — print a GGUF file's metadata and tensor table, as text or as JSON
 * (`ihip info -m MODEL [--json]`).
 *
 * Works only through the public reader API, so it sees exactly what the loader sees. Strings
 * come from the file and may hold anything: in text they are C-escaped (valid UTF-8 printed as
 * is, other bytes as \xNN) and cut after GGUF_DUMP_STR_MAX bytes; in JSON they are escaped per
 * RFC 8259 with each invalid UTF-8 byte replaced by U+FFFD, so the output always parses.
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include "../tensor/tensor.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>

#define GGUF_DUMP_HEAD 8     /* array elements shown */
#define GGUF_DUMP_STR_MAX 96 /* bytes of a string shown in text mode */

/* Length (1..4) of the valid UTF-8 sequence at s[0..n), or 0 if the bytes there are not one
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static int utf8_len(const uint8_t *s, uint64_t n)
{
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int len;
    uint8_t lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        return 0;
    }
    if (n < (uint64_t)len) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (int i = 2; i < len; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    return len;
}

/* Text: a C-escaped string, quoted or not, cut after `max` bytes (0 = no limit) with a note. */
static void put_text_str(FILE *out, gguf_str s, uint64_t max, bool quote)
{
    const uint8_t *p = (const uint8_t *)s.ptr;
    uint64_t i = 0;
    if (quote) fputc('"', out);
    while (i < s.len && (max == 0 || i < max)) {
        uint8_t c = p[i];
        int n = utf8_len(p + i, s.len - i);
        if (n > 1) {
            fwrite(p + i, 1, (size_t)n, out);
            i += (uint64_t)n;
            continue;
        }
        switch (c) {
        case '"':
            fputs("\\\"", out);
            break;
        case '\\':
            fputs("\\\\", out);
            break;
        case '\n':
            fputs("\\n", out);
            break;
        case '\t':
            fputs("\\t", out);
            break;
        case '\r':
            fputs("\\r", out);
            break;
        default:
            if (c < 0x20 || c >= 0x7f)
                fprintf(out, "\\x%02x", c);
            else
                fputc(c, out);
        }
        i++;
    }
    if (quote) fputc('"', out);
    if (i < s.len) fprintf(out, "... (%" PRIu64 " bytes, truncated)", s.len);
}

/* JSON: a quoted string per RFC 8259; invalid UTF-8 bytes become U+FFFD. */
static void put_json_str(FILE *out, const char *ptr, uint64_t len)
{
    const uint8_t *p = (const uint8_t *)ptr;
    uint64_t i = 0;
    fputc('"', out);
    while (i < len) {
        uint8_t c = p[i];
        int n = utf8_len(p + i, len - i);
        if (n > 1) {
            fwrite(p + i, 1, (size_t)n, out);
            i += (uint64_t)n;
            continue;
        }
        if (n == 0) {
            fputs("\\ufffd", out);
        } else {
            switch (c) {
            case '"':
                fputs("\\\"", out);
                break;
            case '\\':
                fputs("\\\\", out);
                break;
            case '\n':
                fputs("\\n", out);
                break;
            case '\t':
                fputs("\\t", out);
                break;
            case '\r':
                fputs("\\r", out);
                break;
            case '\b':
                fputs("\\b", out);
                break;
            case '\f':
                fputs("\\f", out);
                break;
            default:
                if (c < 0x20 || c == 0x7f)
                    fprintf(out, "\\u%04x", c);
                else
                    fputc(c, out);
            }
        }
        i++;
    }
    fputc('"', out);
}

static uint64_t ld_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* One scalar of numeric/bool type t at p (element data from the file). */
static void put_scalar(FILE *out, uint32_t t, const uint8_t *p, bool json)
{
    switch (t) {
    case GGUF_VT_UINT8:
        fprintf(out, "%u", p[0]);
        break;
    case GGUF_VT_INT8:
        fprintf(out, "%d", (int8_t)p[0]);
        break;
    case GGUF_VT_UINT16:
        fprintf(out, "%u", (unsigned)ld_le(p, 2));
        break;
    case GGUF_VT_INT16:
        fprintf(out, "%d", (int16_t)(uint16_t)ld_le(p, 2));
        break;
    case GGUF_VT_UINT32:
        fprintf(out, "%" PRIu32, (uint32_t)ld_le(p, 4));
        break;
    case GGUF_VT_INT32:
        fprintf(out, "%" PRId32, (int32_t)(uint32_t)ld_le(p, 4));
        break;
    case GGUF_VT_UINT64:
        fprintf(out, "%" PRIu64, ld_le(p, 8));
        break;
    case GGUF_VT_INT64: {
        uint64_t u = ld_le(p, 8);
        int64_t v;
        memcpy(&v, &u, sizeof(v));
        fprintf(out, "%" PRId64, v);
        break;
    }
    case GGUF_VT_BOOL:
        fputs(p[0] ? "true" : "false", out);
        break;
    case GGUF_VT_FLOAT32:
    case GGUF_VT_FLOAT64: {
        double v;
        if (t == GGUF_VT_FLOAT32) {
            uint32_t u = (uint32_t)ld_le(p, 4);
            float fv;
            memcpy(&fv, &u, sizeof(fv));
            v = fv;
        } else {
            uint64_t u = ld_le(p, 8);
            memcpy(&v, &u, sizeof(v));
        }
        if (json && !isfinite(v))
            fputs("null", out);
        else
            fprintf(out, t == GGUF_VT_FLOAT32 ? "%.9g" : "%.17g", v);
        break;
    }
    default:
        fputs(json ? "null" : "?", out);
    }
}

static uint64_t elem_size(uint32_t t)
{
    switch (t) {
    case GGUF_VT_UINT8:
    case GGUF_VT_INT8:
    case GGUF_VT_BOOL:
        return 1;
    case GGUF_VT_UINT16:
    case GGUF_VT_INT16:
        return 2;
    case GGUF_VT_UINT32:
    case GGUF_VT_INT32:
    case GGUF_VT_FLOAT32:
        return 4;
    default:
        return 8;
    }
}

/* Element i of an array kv. */
static void put_elem(FILE *out, const gguf_kv *kv, uint64_t i, bool json)
{
    if (kv->arr_type == GGUF_VT_STRING) {
        gguf_str s = kv->arr_strs[i];
        if (json)
            put_json_str(out, s.ptr, s.len);
        else
            put_text_str(out, s, GGUF_DUMP_STR_MAX, true);
        return;
    }
    put_scalar(out, kv->arr_type, (const uint8_t *)kv->data + i * elem_size(kv->arr_type), json);
}

static void put_value(FILE *out, const gguf_kv *kv, bool json)
{
    if (kv->type == GGUF_VT_STRING) {
        if (json)
            put_json_str(out, kv->arr_strs[0].ptr, kv->arr_strs[0].len);
        else
            put_text_str(out, kv->arr_strs[0], GGUF_DUMP_STR_MAX, true);
        return;
    }
    if (kv->type != GGUF_VT_ARRAY) {
        put_scalar(out, kv->type, kv->data, json);
        return;
    }
    uint64_t head = CM_MIN(kv->arr_n, (uint64_t)GGUF_DUMP_HEAD);
    if (json)
        fprintf(out, "{\"type\": \"%s\", \"count\": %" PRIu64 ", \"head\": [",
                gguf_vtype_name(kv->arr_type), kv->arr_n);
    else
        fputc('[', out);
    for (uint64_t i = 0; i < head; i++) {
        if (i) fputs(", ", out);
        put_elem(out, kv, i, json);
    }
    if (json)
        fputs("]}", out);
    else if (head < kv->arr_n)
        fprintf(out, ", ... (%" PRIu64 " more)]", kv->arr_n - head);
    else
        fputc(']', out);
}

static const char *type_name(uint32_t type, char *buf, size_t cap)
{
    const char *n = type < TN_TYPE_MAX ? tn_type_name((int)type) : NULL;
    if (n) return n;
    snprintf(buf, cap, "type%" PRIu32, type);
    return buf;
}

static void print_json(const gguf_file *f, FILE *out, bool tensors)
{
    char tb[32];
    fprintf(out,
            "{\n  \"version\": %" PRIu32 ",\n  \"alignment\": %" PRIu64
            ",\n  \"data_offset\": %" PRIu64 ",\n  \"file_size\": %" PRIu64 ",\n  \"kv\": {",
            gguf_version(f), gguf_alignment(f), gguf_data_offset(f), gguf_file_size(f));
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        fputs(i ? ",\n    " : "\n    ", out);
        put_json_str(out, kv->key.ptr, kv->key.len);
        fputs(": ", out);
        put_value(out, kv, true);
    }
    fputs(gguf_n_kv(f) ? "\n  }" : "}", out);
    if (tensors) {
        fputs(",\n  \"tensors\": [", out);
        for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
            const gguf_tensor *t = gguf_tensor_at(f, i);
            fputs(i ? ",\n    {\"name\": " : "\n    {\"name\": ", out);
            put_json_str(out, t->name.ptr, t->name.len);
            fprintf(out, ", \"type\": \"%s\", \"dims\": [", type_name(t->type, tb, sizeof(tb)));
            for (uint32_t d = 0; d < t->n_dims; d++)
                fprintf(out, d ? ", %" PRIu64 : "%" PRIu64, t->ne[d]);
            fprintf(out, "], \"offset\": %" PRIu64 ", \"nbytes\": %" PRIu64 "}", t->offset,
                    t->nbytes);
        }
        fputs(gguf_n_tensors(f) ? "\n  ]" : "]", out);
    }
    fputs("\n}\n", out);
}

static void print_text(const gguf_file *f, FILE *out, bool tensors)
{
    char tb[32];
    fprintf(out,
            "GGUF version %" PRIu32 ", %" PRIu64 " bytes, alignment %" PRIu64
            ", data section at offset %" PRIu64 "\n",
            gguf_version(f), gguf_file_size(f), gguf_alignment(f), gguf_data_offset(f));
    fprintf(out, "%" PRId64 " key-values:\n", gguf_n_kv(f));
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        char ty[48];
        if (kv->type == GGUF_VT_ARRAY)
            snprintf(ty, sizeof(ty), "%s[%" PRIu64 "]", gguf_vtype_name(kv->arr_type), kv->arr_n);
        else
            snprintf(ty, sizeof(ty), "%s", gguf_vtype_name(kv->type));
        fputs("  ", out);
        put_text_str(out, kv->key, 0, false);
        int pad = 40 - (int)CM_MIN(kv->key.len, (uint64_t)40);
        fprintf(out, "%*s %-16s ", pad, "", ty);
        put_value(out, kv, false);
        fputc('\n', out);
    }
    if (!tensors) return;
    uint64_t total = 0;
    fprintf(out, "%" PRId64 " tensors:\n", gguf_n_tensors(f));
    fprintf(out, "  %5s  %-32s %-8s %-24s %12s %12s\n", "#", "name", "type", "dims", "bytes",
            "offset");
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        char dims[96];
        size_t o = 0;
        for (uint32_t d = 0; d < t->n_dims && o < sizeof(dims); d++)
            o += (size_t)snprintf(dims + o, sizeof(dims) - o, d ? " x %" PRIu64 : "%" PRIu64,
                                  t->ne[d]);
        fprintf(out, "  %5" PRId64 "  ", i);
        put_text_str(out, t->name, 64, false);
        int pad = 32 - (int)CM_MIN(t->name.len, (uint64_t)32);
        fprintf(out, "%*s %-8s %-24s %12" PRIu64 " %12" PRIu64 "\n", pad, "",
                type_name(t->type, tb, sizeof(tb)), dims, t->nbytes, t->offset);
        total += t->nbytes;
    }
    fprintf(out, "  total %" PRIu64 " bytes of tensor data\n", total);
}

int gguf_print_info(const gguf_file *f, FILE *out, bool json, bool tensors)
{
    if (json)
        print_json(f, out, tensors);
    else
        print_text(f, out, tensors);
    return ferror(out) ? -EIO : 0;
}
