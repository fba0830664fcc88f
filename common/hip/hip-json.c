/*
 * hip-json.c — a small strict JSON reader for the HiP configuration (--hip-attention-config).
 *
 * Recursive descent into a tree of malloc'd nodes. Strict on purpose: a configuration that a
 * lenient parser would half-understand (trailing commas, comments, duplicate keys, NaN) is a
 * user error we want to report with its line and column, not guess at.
 */
#define _POSIX_C_SOURCE 200809L
#include "hip-impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#define HJ_MAX_DEPTH 64

typedef struct hj_parser {
    const char *s;
    size_t len, pos;
    int line;
    size_t line_start;
    cm_err *err;
    int rc;
} hj_parser;

static int hj_fail(hj_parser *p, const char *what)
{
    if (p->rc == 0) {
        p->rc = cm_err_set(p->err, -CM_EFORMAT, "JSON line %d column %d: %s", p->line,
                           (int)(p->pos - p->line_start) + 1, what);
    }
    return p->rc;
}

static void hj_ws(hj_parser *p)
{
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c == '\n') {
            p->line++;
            p->line_start = p->pos + 1;
        } else if (c != ' ' && c != '\t' && c != '\r') {
            break;
        }
        p->pos++;
    }
}

void hj_free(hj_node *n)
{
    while (n) {
        hj_node *next = n->next;
        hj_free(n->child);
        free(n->str);
        free(n->key);
        free(n);
        n = next;
    }
}

const char *hj_type_name(int type)
{
    static const char *names[] = {"null", "boolean", "number", "string", "array", "object"};
    return type >= 0 && type <= HJ_OBJECT ? names[type] : "?";
}

static void hj_oom(hj_parser *p)
{
    if (p->rc == 0) p->rc = cm_err_set(p->err, -ENOMEM, "JSON: out of memory");
}

static hj_node *hj_new(hj_parser *p, int type)
{
    hj_node *n = calloc(1, sizeof(*n));
    if (!n) {
        hj_oom(p);
        return NULL;
    }
    n->type = type;
    n->line = p->line;
    n->col = (int)(p->pos - p->line_start) + 1;
    return n;
}

static int hj_hex4(hj_parser *p, uint32_t *out)
{
    if (p->len - p->pos < 4) return hj_fail(p, "truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return hj_fail(p, "bad hex digit in \\u escape");
    }
    *out = v;
    return 0;
}

/* Parses a string at p->pos (which is at the opening quote) into a malloc'd buffer. */
static char *hj_string(hj_parser *p)
{
    p->pos++; /* opening quote */
    size_t cap = 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        hj_oom(p);
        return NULL;
    }
    for (;;) {
        if (p->pos >= p->len) {
            hj_fail(p, "unterminated string");
            goto fail;
        }
        unsigned char c = (unsigned char)p->s[p->pos++];
        char enc[4];
        int ne = 0;
        if (c == '"') break;
        if (c < 0x20) {
            p->pos--;
            hj_fail(p, "control character in string");
            goto fail;
        }
        if (c != '\\') {
            enc[ne++] = (char)c;
        } else {
            if (p->pos >= p->len) {
                hj_fail(p, "unterminated escape");
                goto fail;
            }
            char e = p->s[p->pos++];
            uint32_t cp = 0;
            switch (e) {
            case '"': enc[ne++] = '"'; break;
            case '\\': enc[ne++] = '\\'; break;
            case '/': enc[ne++] = '/'; break;
            case 'b': enc[ne++] = '\b'; break;
            case 'f': enc[ne++] = '\f'; break;
            case 'n': enc[ne++] = '\n'; break;
            case 'r': enc[ne++] = '\r'; break;
            case 't': enc[ne++] = '\t'; break;
            case 'u':
                if (hj_hex4(p, &cp)) goto fail;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t lo;
                    if (p->len - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                        hj_fail(p, "lone high surrogate in \\u escape");
                        goto fail;
                    }
                    p->pos += 2;
                    if (hj_hex4(p, &lo)) goto fail;
                    if (lo < 0xDC00 || lo > 0xDFFF) {
                        hj_fail(p, "bad low surrogate in \\u escape");
                        goto fail;
                    }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    hj_fail(p, "lone low surrogate in \\u escape");
                    goto fail;
                }
                if (cp == 0) {
                    hj_fail(p, "\\u0000 in string");
                    goto fail;
                }
                if (cp < 0x80) {
                    enc[ne++] = (char)cp;
                } else if (cp < 0x800) {
                    enc[ne++] = (char)(0xC0 | (cp >> 6));
                    enc[ne++] = (char)(0x80 | (cp & 0x3F));
                } else if (cp < 0x10000) {
                    enc[ne++] = (char)(0xE0 | (cp >> 12));
                    enc[ne++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                    enc[ne++] = (char)(0x80 | (cp & 0x3F));
                } else {
                    enc[ne++] = (char)(0xF0 | (cp >> 18));
                    enc[ne++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                    enc[ne++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                    enc[ne++] = (char)(0x80 | (cp & 0x3F));
                }
                break;
            default:
                p->pos--;
                hj_fail(p, "bad escape in string");
                goto fail;
            }
        }
        if (n + (size_t)ne + 1 > cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                hj_oom(p);
                goto fail;
            }
            buf = nb;
        }
        memcpy(buf + n, enc, (size_t)ne);
        n += (size_t)ne;
    }
    buf[n] = 0;
    return buf;
fail:
    free(buf);
    return NULL;
}

static hj_node *hj_value(hj_parser *p, int depth);

static hj_node *hj_number(hj_parser *p)
{
    hj_node *n = hj_new(p, HJ_NUMBER);
    if (!n) return NULL;
    size_t start = p->pos;
    bool is_int = true;
    if (p->pos < p->len && p->s[p->pos] == '-') p->pos++;
    if (p->pos >= p->len) goto bad;
    if (p->s[p->pos] == '0') {
        p->pos++;
    } else if (p->s[p->pos] >= '1' && p->s[p->pos] <= '9') {
        while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    } else {
        goto bad;
    }
    if (p->pos < p->len && p->s[p->pos] == '.') {
        is_int = false;
        p->pos++;
        if (p->pos >= p->len || p->s[p->pos] < '0' || p->s[p->pos] > '9') goto bad;
        while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    }
    if (p->pos < p->len && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        is_int = false;
        p->pos++;
        if (p->pos < p->len && (p->s[p->pos] == '+' || p->s[p->pos] == '-')) p->pos++;
        if (p->pos >= p->len || p->s[p->pos] < '0' || p->s[p->pos] > '9') goto bad;
        while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    }
    char tmp[64];
    size_t nlen = p->pos - start;
    if (nlen >= sizeof(tmp)) {
        p->pos = start;
        hj_fail(p, "number too long");
        hj_free(n);
        return NULL;
    }
    memcpy(tmp, p->s + start, nlen);
    tmp[nlen] = 0;
    n->num = strtod(tmp, NULL);
    if (is_int) {
        errno = 0;
        long long v = strtoll(tmp, NULL, 10);
        if (errno == 0) {
            n->is_int = true;
            n->i = (int64_t)v;
        }
    }
    return n;
bad:
    hj_fail(p, "malformed number");
    hj_free(n);
    return NULL;
}

static bool hj_lit(hj_parser *p, const char *lit)
{
    size_t l = strlen(lit);
    if (p->len - p->pos >= l && memcmp(p->s + p->pos, lit, l) == 0) {
        p->pos += l;
        return true;
    }
    return false;
}

static hj_node *hj_container(hj_parser *p, int depth, bool object)
{
    hj_node *n = hj_new(p, object ? HJ_OBJECT : HJ_ARRAY);
    if (!n) return NULL;
    p->pos++; /* [ or { */
    hj_ws(p);
    char close = object ? '}' : ']';
    if (p->pos < p->len && p->s[p->pos] == close) {
        p->pos++;
        return n;
    }
    hj_node **tail = &n->child;
    for (;;) {
        char *key = NULL;
        hj_ws(p);
        if (object) {
            if (p->pos >= p->len || p->s[p->pos] != '"') {
                hj_fail(p, "expected a member name (string)");
                goto fail;
            }
            size_t kpos = p->pos;
            int kline = p->line;
            size_t kls = p->line_start;
            key = hj_string(p);
            if (!key) goto fail;
            for (hj_node *m = n->child; m; m = m->next) {
                if (strcmp(m->key, key) == 0) {
                    p->pos = kpos;
                    p->line = kline;
                    p->line_start = kls;
                    char msg[160];
                    snprintf(msg, sizeof(msg), "duplicate member \"%.100s\"", key);
                    free(key);
                    hj_fail(p, msg);
                    goto fail;
                }
            }
            hj_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') {
                free(key);
                hj_fail(p, "expected ':' after member name");
                goto fail;
            }
            p->pos++;
            hj_ws(p);
        }
        hj_node *v = hj_value(p, depth + 1);
        if (!v) {
            free(key);
            goto fail;
        }
        v->key = key;
        *tail = v;
        tail = &v->next;
        n->n++;
        hj_ws(p);
        if (p->pos < p->len && p->s[p->pos] == ',') {
            p->pos++;
            hj_ws(p);
            if (p->pos < p->len && p->s[p->pos] == close) {
                hj_fail(p, "trailing comma");
                goto fail;
            }
            continue;
        }
        if (p->pos < p->len && p->s[p->pos] == close) {
            p->pos++;
            return n;
        }
        hj_fail(p, object ? "expected ',' or '}'" : "expected ',' or ']'");
        goto fail;
    }
fail:
    hj_free(n);
    return NULL;
}

static hj_node *hj_value(hj_parser *p, int depth)
{
    if (depth > HJ_MAX_DEPTH) {
        hj_fail(p, "nesting too deep");
        return NULL;
    }
    hj_ws(p);
    if (p->pos >= p->len) {
        hj_fail(p, "unexpected end of input");
        return NULL;
    }
    char c = p->s[p->pos];
    hj_node *n;
    switch (c) {
    case '{': return hj_container(p, depth, true);
    case '[': return hj_container(p, depth, false);
    case '"':
        n = hj_new(p, HJ_STRING);
        if (!n) return NULL;
        n->str = hj_string(p);
        if (!n->str) {
            hj_free(n);
            return NULL;
        }
        return n;
    case 't':
    case 'f':
    case 'n':
        n = hj_new(p, c == 'n' ? HJ_NULL : HJ_BOOL);
        if (!n) return NULL;
        if (hj_lit(p, "true")) n->b = true;
        else if (hj_lit(p, "false")) n->b = false;
        else if (!hj_lit(p, "null")) {
            hj_free(n);
            hj_fail(p, "unexpected token");
            return NULL;
        }
        return n;
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return hj_number(p);
        hj_fail(p, "unexpected character");
        return NULL;
    }
}

int hj_parse(const char *text, size_t len, hj_node **out, cm_err *err)
{
    hj_parser p = {.s = text, .len = len, .line = 1, .err = err};
    *out = NULL;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == 0) {
            p.pos = i;
            return hj_fail(&p, "NUL byte in input");
        }
    }
    hj_node *root = hj_value(&p, 0);
    if (!root) return p.rc ? p.rc : hj_fail(&p, "parse error");
    hj_ws(&p);
    if (p.pos != p.len) {
        hj_free(root);
        return hj_fail(&p, "trailing characters after the JSON value");
    }
    *out = root;
    return 0;
}
