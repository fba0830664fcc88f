/*
 * json-check.h — a minimal JSON validator (syntax + UTF-8 strings) for the tests: shared by
 * tests/unit/test-gguf.c and the fuzz target tests/fuzz/fuzz-gguf.c, which both check that
 * gguf_print_info(json=true) emits well-formed JSON. Header-only (static functions).
 */
#ifndef TESTS_JSON_CHECK_H
#define TESTS_JSON_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef struct jp {
    const char *s;
    size_t n, i;
    int depth;
} jp;

static void j_ws(jp *j)
{
    while (j->i < j->n && strchr(" \t\r\n", j->s[j->i]))
        j->i++;
}

static bool j_value(jp *j);

static bool j_string(jp *j)
{
    if (j->i >= j->n || j->s[j->i] != '"') return false;
    j->i++;
    while (j->i < j->n) {
        uint8_t c = (uint8_t)j->s[j->i];
        if (c == '"') {
            j->i++;
            return true;
        }
        if (c < 0x20) return false;
        if (c == '\\') {
            if (++j->i >= j->n) return false;
            char e = j->s[j->i];
            if (e == 'u') {
                for (int k = 1; k <= 4; k++)
                    if (j->i + (size_t)k >= j->n ||
                        !strchr("0123456789abcdefABCDEF", j->s[j->i + (size_t)k]))
                        return false;
                j->i += 5;
            } else if (strchr("\"\\/bfnrt", e) && e) {
                j->i++;
            } else {
                return false;
            }
            continue;
        }
        if (c < 0x80) {
            j->i++;
            continue;
        }
        /* Strict UTF-8. */
        int len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
        if (c < 0xc2 || c > 0xf4 || j->i + (size_t)len > j->n) return false;
        uint32_t cp = c & (0x3f >> (len - 1));
        for (int k = 1; k < len; k++) {
            uint8_t b = (uint8_t)j->s[j->i + (size_t)k];
            if ((b & 0xc0) != 0x80) return false;
            cp = cp << 6 | (b & 0x3f);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        j->i += (size_t)len;
    }
    return false;
}

static bool j_number(jp *j)
{
    size_t st = j->i;
    if (j->i < j->n && j->s[j->i] == '-') j->i++;
    size_t d0 = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9')
        j->i++;
    if (j->i == d0) return false;
    if (j->s[d0] == '0' && j->i - d0 > 1) return false;
    if (j->i < j->n && j->s[j->i] == '.') {
        size_t f0 = ++j->i;
        while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9')
            j->i++;
        if (j->i == f0) return false;
    }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-')) j->i++;
        size_t e0 = j->i;
        while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9')
            j->i++;
        if (j->i == e0) return false;
    }
    return j->i > st;
}

static bool j_lit(jp *j, const char *lit)
{
    size_t l = strlen(lit);
    if (j->n - j->i < l || memcmp(j->s + j->i, lit, l) != 0) return false;
    j->i += l;
    return true;
}

static bool j_value(jp *j)
{
    j_ws(j);
    if (j->i >= j->n || ++j->depth > 64) return false;
    bool ok;
    char c = j->s[j->i];
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->i++;
        j_ws(j);
        if (j->i < j->n && j->s[j->i] == close) {
            j->i++;
            ok = true;
        } else {
            for (;;) {
                if (c == '{') {
                    j_ws(j);
                    if (!j_string(j)) return false;
                    j_ws(j);
                    if (j->i >= j->n || j->s[j->i] != ':') return false;
                    j->i++;
                }
                if (!j_value(j)) return false;
                j_ws(j);
                if (j->i >= j->n) return false;
                if (j->s[j->i] == ',') {
                    j->i++;
                    continue;
                }
                if (j->s[j->i] != close) return false;
                j->i++;
                break;
            }
            ok = true;
        }
    } else if (c == '"') {
        ok = j_string(j);
    } else if (c == 't') {
        ok = j_lit(j, "true");
    } else if (c == 'f') {
        ok = j_lit(j, "false");
    } else if (c == 'n') {
        ok = j_lit(j, "null");
    } else {
        ok = j_number(j);
    }
    j->depth--;
    return ok;
}

static bool json_valid(const char *s, size_t n)
{
    jp j = {s, n, 0, 0};
    if (!j_value(&j)) return false;
    j_ws(&j);
    return j.i == n;
}

#endif /* TESTS_JSON_CHECK_H */
