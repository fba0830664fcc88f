/*
 * tokenizer-unicode.c — UTF-8 helpers, Unicode class lookup and the GPT-2 byte <-> unicode map.
 *
 * The class table (tokenizer-unicode-data.c) is a sorted list of runs searched by bisection;
 * ASCII, which is most of most text, never reaches the search because the splitters in
 * tokenizer-pretok.c classify it inline.
 *
 * Validation is strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above
 * U+10FFFF, no truncated sequences. tok_encode rejects anything else with -EILSEQ so every
 * later stage can decode without checks.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int tok_ucd_class(uint32_t cp)
{
    if (cp > 0x10FFFF) return TOK_UC_UNASSIGNED;
    size_t lo = 0, hi = tok_ucd_n_runs; /* find the last run whose start <= cp */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if ((tok_ucd_runs[mid] >> 3) <= cp)
            lo = mid;
        else
            hi = mid;
    }
    return (int)(tok_ucd_runs[lo] & 7);
}

bool tok_ucd_is_space(uint32_t cp)
{
    if (cp < 0x85) return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20;
    for (size_t i = 0; i < tok_ucd_n_space; i++)
        if (cp >= tok_ucd_space[i][0] && cp <= tok_ucd_space[i][1]) return true;
    return false;
}

uint32_t tok_utf8_decode(const uint8_t *s, size_t n, int *len)
{
    uint8_t c = s[0];
    if (c < 0x80 || n < 2) {
        *len = 1;
        return c;
    }
    if (c < 0xE0) {
        *len = 2;
        return ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    }
    if (c < 0xF0 || n < 4) {
        *len = 3;
        return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    }
    *len = 4;
    return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
           ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

int tok_utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

int tok_utf8_seq_len(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0; /* continuation byte, or overlong 2-byte lead */
    if (c < 0xE0) return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c < 0xF0) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;  /* overlong */
        if (c == 0xED && s[1] >= 0xA0) return 0; /* surrogate */
        return 3;
    }
    if (c < 0xF5) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;  /* overlong */
        if (c == 0xF4 && s[1] >= 0x90) return 0; /* above U+10FFFF */
        return 4;
    }
    return 0;
}

int64_t tok_utf8_validate(const char *buf, size_t n)
{
    const uint8_t *s = (const uint8_t *)buf;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int l = tok_utf8_seq_len(s + i, n - i);
        if (l == 0) {
            /* name the first byte that cannot belong to a valid sequence */
            size_t bad = i;
            if (s[i] >= 0xC2 && s[i] < 0xF5) {
                bad = i + 1;
                size_t want = s[i] < 0xE0 ? 2 : s[i] < 0xF0 ? 3 : 4;
                while (bad < n && bad < i + want && (s[bad] & 0xC0) == 0x80) {
                    if (bad == i + 1 &&
                        ((s[i] == 0xE0 && s[bad] < 0xA0) || (s[i] == 0xED && s[bad] >= 0xA0) ||
                         (s[i] == 0xF0 && s[bad] < 0x90) || (s[i] == 0xF4 && s[bad] >= 0x90)))
                        break;
                    bad++;
                }
                if (bad == n) bad = i; /* cut short by the end of the text: name its start */
            }
            return -(int64_t)(1 + bad);
        }
        i += (size_t)l;
    }
    return 0;
}

size_t tok_utf8_complete(const char *buf, size_t n)
{
    const uint8_t *s = (const uint8_t *)buf;
    size_t stop = n > 4 ? n - 4 : 0;
    for (size_t i = n; i > stop; i--) {
        uint8_t c = s[i - 1];
        if ((c & 0xC0) == 0x80) continue; /* continuation: look further back */
        size_t want = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return (n - (i - 1) < want) ? i - 1 : n;
    }
    return n; /* only continuation bytes at the end: not something waiting for more bytes */
}

/* ---- GPT-2 byte-level mapping -------------------------------------------------------------
 * Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
 * bytes take U+0100, U+0101, ... in byte order. */

static bool byte_is_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t tok_byte_to_cp(uint8_t b)
{
    /* the non-printable bytes are 0x00..0x20 (ranks 0..32), 0x7F..0xA0 (33..66), 0xAD (67) */
    if (byte_is_printable(b)) return b;
    if (b <= 0x20) return 256u + b;
    if (b >= 0x7F && b <= 0xA0) return 256u + 33u + (uint32_t)(b - 0x7F);
    return 256u + 67u;
}

int tok_cp_to_byte(uint32_t cp)
{
    if (cp < 256) return byte_is_printable(cp) ? (int)cp : -1;
    uint32_t k = cp - 256;
    if (k <= 32) return (int)k;
    if (k <= 66) return (int)(0x7F + (k - 33));
    if (k == 67) return 0xAD;
    return -1;
}

/* ---- string hash map ---------------------------------------------------------------------- */

uint32_t tok_hash(const void *s, size_t len)
{
    /* FNV-1a over 64 bits, folded: keys are short (tokens, words) */
    const uint8_t *p = (const uint8_t *)s;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

int tok_map_init(tok_map *m, size_t expected)
{
    memset(m, 0, sizeof(*m));
    size_t cap = 16;
    while (cap < expected * 2)
        cap *= 2;
    m->slots = malloc(cap * sizeof(*m->slots));
    if (!m->slots) return -ENOMEM;
    for (size_t i = 0; i < cap; i++)
        m->slots[i].len = UINT32_MAX;
    m->cap = cap;
    return 0;
}

void tok_map_free(tok_map *m)
{
    free(m->slots);
    free(m->keys);
    memset(m, 0, sizeof(*m));
}

int32_t tok_map_get(const tok_map *m, const void *key, size_t len)
{
    if (!m->cap) return -1;
    uint32_t h = tok_hash(key, len);
    size_t mask = m->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        const tok_map_slot *s = &m->slots[i];
        if (s->len == UINT32_MAX) return -1;
        if (s->hash == h && s->len == len && memcmp(m->keys + s->off, key, len) == 0) return s->val;
    }
}

static int map_grow(tok_map *m)
{
    size_t cap = m->cap * 2;
    tok_map_slot *slots = malloc(cap * sizeof(*slots));
    if (!slots) return -ENOMEM;
    for (size_t i = 0; i < cap; i++)
        slots[i].len = UINT32_MAX;
    for (size_t j = 0; j < m->cap; j++) {
        if (m->slots[j].len == UINT32_MAX) continue;
        size_t i = m->slots[j].hash & (cap - 1);
        while (slots[i].len != UINT32_MAX)
            i = (i + 1) & (cap - 1);
        slots[i] = m->slots[j];
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

int32_t tok_map_put(tok_map *m, const void *key, size_t len, int32_t val, bool overwrite)
{
    if (len >= UINT32_MAX) return -ENOMEM;
    if ((m->count + 1) * 2 > m->cap && map_grow(m) < 0) return -ENOMEM;
    uint32_t h = tok_hash(key, len);
    size_t mask = m->cap - 1;
    size_t i = h & mask;
    for (;; i = (i + 1) & mask) {
        tok_map_slot *s = &m->slots[i];
        if (s->len == UINT32_MAX) break;
        if (s->hash == h && s->len == len && memcmp(m->keys + s->off, key, len) == 0) {
            if (overwrite) s->val = val;
            return s->val;
        }
    }
    if (m->keys_len + len > m->keys_cap) {
        size_t nc = m->keys_cap ? m->keys_cap : 4096;
        while (nc < m->keys_len + len)
            nc *= 2;
        if (nc > UINT32_MAX) return -ENOMEM;
        char *k = realloc(m->keys, nc);
        if (!k) return -ENOMEM;
        m->keys = k;
        m->keys_cap = nc;
    }
    if (len) memcpy(m->keys + m->keys_len, key, len);
    m->slots[i] =
        (tok_map_slot){.hash = h, .len = (uint32_t)len, .off = (uint32_t)m->keys_len, .val = val};
    m->keys_len += len;
    m->count++;
    return val;
}
