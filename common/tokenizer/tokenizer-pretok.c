/*
 * tokenizer-pretok.c — pre-tokenizers: split text into the words that BPE then merges inside.
 *
 * Each model family names a list of regexes (tokenizer.ggml.pre); llama.cpp applies them one
 * after the other, each splitting the pieces the previous one left, and a piece's edge acts as
 * the end of the text for the next regex (a look-ahead cannot see past it). We do the same with
 * hand-written matchers, no regex engine:
 *
 *   gpt2      's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
 *   llama3    (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|
 *             \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *   qwen2     the llama3 regex with \p{N} instead of \p{N}{1,3}
 *   starcoder \p{N} (every digit alone), then gpt2                  (smollm uses this one)
 *   default   [\p{P}\$\+<=>\^~\|]+, then gpt2, then \p{N}+, then [0-9][0-9][0-9]
 *   falcon    [\p{P}\$\+<=>\^~\|`]+, then gpt2, then [0-9][0-9][0-9]
 *
 * llama.cpp runs gpt2 and llama3 with hand-written matchers over Unicode classes, and the other
 * regexes with std::regex over a "collapsed" copy of the text in which every non-ASCII code point
 * is replaced by one byte standing for its class (white space, \p{N}, \p{L}, \p{P}, or "other").
 * A std::regex run gives the first alternative that matches at the leftmost position; for the
 * qwen2 regex that is exactly what the llama3 matcher computes, so qwen2 is that matcher with
 * single digits. The collapsed classes equal the true ones, except that white space wins over
 * any other class, which no letter or number has anyway.
 *
 * \s is the Unicode White_Space property; ASCII classes are decided inline.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* per code point flags */
enum {
    F_L = 1,    /* \p{L} */
    F_N = 2,    /* \p{N} */
    F_S = 4,    /* \s (White_Space) */
    F_P = 8,    /* non-ASCII \p{P} that is not white space (the collapsed text's \p{P}) */
    F_ANY = 128 /* set for every code point inside the text (llama.cpp's flags are never 0) */
};

#define OOR 0xFFFFFFFFu /* "code point" beyond the end of a piece */

typedef struct segs {
    uint32_t *len; /* code points per piece */
    size_t n, cap;
} segs;

static int segs_push(segs *s, size_t len)
{
    if (len == 0) return 0;
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 256;
        uint32_t *p = realloc(s->len, nc * sizeof(*p));
        if (!p) return -ENOMEM;
        s->len = p;
        s->cap = nc;
    }
    s->len[s->n++] = (uint32_t)len;
    return 0;
}

typedef struct ctx {
    const uint32_t *cp;
    const uint8_t *fl;
} ctx;

static inline uint8_t fl_at(const uint8_t *fl, size_t i, size_t hi)
{
    return i < hi ? fl[i] : 0;
}

static inline uint32_t cp_at(const uint32_t *cp, size_t i, size_t hi)
{
    return i < hi ? cp[i] : OOR;
}

/* ---- the gpt2 matcher ---------------------------------------------------------------------- */

static int split_gpt2(const ctx *c, size_t lo, size_t hi, segs *out)
{
    const uint32_t *cp = c->cp;
    const uint8_t *fl = c->fl;
/* flags / code point at i, or 0 / OOR past the end of the piece (arguments are evaluated once) */
#define FL(i) fl_at(fl, (i), hi)
#define CP(i) cp_at(cp, (i), hi)
    size_t pos = lo, prev = lo;
    int rc = 0;
#define EMIT(end)                                                                                  \
    do {                                                                                           \
        if ((rc = segs_push(out, (end)-prev)) < 0) return rc;                                      \
        prev = (end);                                                                              \
    } while (0)
    while (pos < hi) {
        uint32_t ch = cp[pos];
        uint8_t f = fl[pos];
        if (ch == '\'' && pos + 1 < hi) {
            uint32_t n1 = cp[pos + 1];
            if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') {
                pos += 2;
                EMIT(pos);
                continue;
            }
            if (pos + 2 < hi) {
                uint32_t n2 = cp[pos + 2];
                if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') ||
                    (n1 == 'l' && n2 == 'l')) {
                    pos += 3;
                    EMIT(pos);
                    continue;
                }
            }
        }
        uint8_t f2 = ch == ' ' ? FL(pos + 1) : f;
        if (f2 & F_L) { /*  ?\p{L}+ */
            pos += ch == ' ';
            while (f2 & F_L)
                f2 = FL(++pos);
            EMIT(pos);
            continue;
        }
        if (f2 & F_N) { /*  ?\p{N}+ */
            pos += ch == ' ';
            while (f2 & F_N)
                f2 = FL(++pos);
            EMIT(pos);
            continue;
        }
        if (!(f2 & (F_S | F_L | F_N)) && f2) { /*  ?[^\s\p{L}\p{N}]+ */
            pos += ch == ' ';
            while (!(f2 & (F_S | F_L | F_N)) && f2)
                f2 = FL(++pos);
            EMIT(pos);
            continue;
        }
        size_t nws = 0;
        while (FL(pos + nws) & F_S)
            nws++;
        if (nws > 1 && CP(pos + nws) != OOR) { /* \s+(?!\S): leave the last one */
            pos += nws - 1;
            EMIT(pos);
            continue;
        }
        if (nws > 0) {
            pos += nws;
            EMIT(pos);
            continue;
        }
        pos++;
        EMIT(pos);
    }
    return 0;
}

/* ---- the llama3 matcher (also qwen2, with single digits) --------------------------------- */

static uint32_t ascii_lower(uint32_t c)
{
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

static int split_llama3(const ctx *c, size_t lo, size_t hi, segs *out, size_t max_digits)
{
    enum { ML = F_L, MN = F_N, MS = F_S };
    const uint32_t *cp = c->cp;
    const uint8_t *fl = c->fl;
    size_t pos = lo, prev = lo;
    int rc = 0;
    while (pos < hi) {
        uint32_t ch = cp[pos];
        uint8_t f = fl[pos];
        if (ch == '\'' && pos + 1 < hi) { /* (?i:'s|'t|'re|'ve|'m|'ll|'d) */
            uint32_t n1 = ascii_lower(cp[pos + 1]);
            if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') {
                pos += 2;
                EMIT(pos);
                continue;
            }
            if (pos + 2 < hi) {
                uint32_t n2 = ascii_lower(cp[pos + 2]);
                if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') ||
                    (n1 == 'l' && n2 == 'l')) {
                    pos += 3;
                    EMIT(pos);
                    continue;
                }
            }
        }
        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        if (!(ch == '\r' || ch == '\n' || (f & MN))) {
            if ((f & ML) || (FL(pos + 1) & ML)) {
                pos++;
                while (FL(pos) & ML)
                    pos++;
                EMIT(pos);
                continue;
            }
        }
        if (f & MN) { /* \p{N}{1,max} */
            size_t ini = pos;
            while (FL(pos) & MN) {
                if (++pos - ini >= max_digits) {
                    EMIT(pos);
                    ini = pos;
                }
            }
            EMIT(pos);
            continue;
        }
        /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
        uint8_t f2 = ch == ' ' ? FL(pos + 1) : f;
        if (!(f2 & (MS | ML | MN)) && f) {
            pos += ch == ' ';
            while (!(f2 & (MS | ML | MN)) && f2)
                f2 = FL(++pos);
            uint32_t c2 = CP(pos);
            while (c2 == '\r' || c2 == '\n')
                c2 = CP(++pos);
            EMIT(pos);
            continue;
        }
        size_t nws = 0, last_rn = 0;
        while (FL(pos + nws) & MS) {
            uint32_t c2 = CP(pos + nws);
            if (c2 == '\r' || c2 == '\n') last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) { /* \s*[\r\n]+ */
            pos = last_rn;
            EMIT(pos);
            continue;
        }
        if (nws > 1 && CP(pos + nws) != OOR) { /* \s+(?!\S) */
            pos += nws - 1;
            EMIT(pos);
            continue;
        }
        if (nws > 0) { /* \s+ */
            pos += nws;
            EMIT(pos);
            continue;
        }
        pos++;
        EMIT(pos);
    }
    return 0;
#undef FL
#undef CP
#undef EMIT
}

/* ---- the std::regex splits (matches and the gaps between them both become pieces) -------- */

/* \p{N} (each number alone) when single, else \p{N}+ */
static int split_numbers(const ctx *c, size_t lo, size_t hi, segs *out, bool single)
{
    size_t gap = lo, i = lo;
    int rc;
    while (i < hi) {
        if (!(c->fl[i] & F_N)) {
            i++;
            continue;
        }
        size_t j = i + 1;
        if (!single)
            while (j < hi && (c->fl[j] & F_N))
                j++;
        if ((rc = segs_push(out, i - gap)) < 0 || (rc = segs_push(out, j - i)) < 0) return rc;
        gap = i = j;
    }
    return segs_push(out, hi - gap);
}

/* [\p{P}\$\+<=>\^~\|]+ (with ` when backtick): ASCII punctuation and symbols, or non-ASCII
 * punctuation in the collapsed text */
static bool is_punct_run(const ctx *c, size_t i, bool backtick)
{
    uint32_t ch = c->cp[i];
    if (ch >= 0x80) return (c->fl[i] & F_P) != 0;
    if (ch == '`') return backtick;
    return (ch >= 0x21 && ch <= 0x2F) || (ch >= 0x3A && ch <= 0x40) || (ch >= 0x5B && ch <= 0x60) ||
           (ch >= 0x7B && ch <= 0x7E);
}

static int split_punct(const ctx *c, size_t lo, size_t hi, segs *out, bool backtick)
{
    size_t gap = lo, i = lo;
    int rc;
    while (i < hi) {
        if (!is_punct_run(c, i, backtick)) {
            i++;
            continue;
        }
        size_t j = i + 1;
        while (j < hi && is_punct_run(c, j, backtick))
            j++;
        if ((rc = segs_push(out, i - gap)) < 0 || (rc = segs_push(out, j - i)) < 0) return rc;
        gap = i = j;
    }
    return segs_push(out, hi - gap);
}

/* [0-9][0-9][0-9], leftmost first, no overlap */
static int split_digit3(const ctx *c, size_t lo, size_t hi, segs *out)
{
    size_t gap = lo, i = lo;
    int rc;
#define D(k) (c->cp[k] >= '0' && c->cp[k] <= '9')
    while (i + 3 <= hi) {
        if (D(i) && D(i + 1) && D(i + 2)) {
            if ((rc = segs_push(out, i - gap)) < 0 || (rc = segs_push(out, 3)) < 0) return rc;
            gap = i = i + 3;
        } else {
            i++;
        }
    }
#undef D
    return segs_push(out, hi - gap);
}

/* ---- the pipeline -------------------------------------------------------------------------- */

enum step { ST_GPT2, ST_LLAMA3, ST_QWEN2, ST_DIGIT1, ST_DIGITS, ST_PUNCT, ST_PUNCT_BT, ST_DIGIT3 };

static int run_step(const ctx *c, int step, const segs *in, segs *out)
{
    size_t start = 0;
    out->n = 0;
    for (size_t k = 0; k < in->n; k++) {
        size_t lo = start, hi = start + in->len[k];
        start = hi;
        int rc = 0;
        switch (step) {
        case ST_GPT2:
            rc = split_gpt2(c, lo, hi, out);
            break;
        case ST_LLAMA3:
            rc = split_llama3(c, lo, hi, out, 3);
            break;
        case ST_QWEN2:
            rc = split_llama3(c, lo, hi, out, 1);
            break;
        case ST_DIGIT1:
            rc = split_numbers(c, lo, hi, out, true);
            break;
        case ST_DIGITS:
            rc = split_numbers(c, lo, hi, out, false);
            break;
        case ST_PUNCT:
            rc = split_punct(c, lo, hi, out, false);
            break;
        case ST_PUNCT_BT:
            rc = split_punct(c, lo, hi, out, true);
            break;
        case ST_DIGIT3:
            rc = split_digit3(c, lo, hi, out);
            break;
        default:
            CM_ABORT("bad pre-tokenizer step %d", step);
        }
        if (rc < 0) return rc;
    }
    return 0;
}

static uint8_t cp_flags(uint32_t ch)
{
    if (ch < 0x80) {
        if ((ch | 32) >= 'a' && (ch | 32) <= 'z') return F_ANY | F_L;
        if (ch >= '0' && ch <= '9') return F_ANY | F_N;
        if (ch == ' ' || (ch >= 0x09 && ch <= 0x0D)) return F_ANY | F_S;
        return F_ANY;
    }
    if (tok_ucd_is_space(ch)) return F_ANY | F_S;
    switch (tok_ucd_class(ch)) {
    case TOK_UC_LETTER:
        return F_ANY | F_L;
    case TOK_UC_NUMBER:
        return F_ANY | F_N;
    case TOK_UC_PUNCT:
        return F_ANY | F_P;
    default:
        return F_ANY;
    }
}

int64_t tok_pretokenize(int pre, const char *text, size_t len, uint32_t **words, size_t *cap_words)
{
    static const int steps_default[] = {ST_PUNCT, ST_GPT2, ST_DIGITS, ST_DIGIT3};
    static const int steps_falcon[] = {ST_PUNCT_BT, ST_GPT2, ST_DIGIT3};
    static const int steps_gpt2[] = {ST_GPT2};
    static const int steps_star[] = {ST_DIGIT1, ST_GPT2};
    static const int steps_llama3[] = {ST_LLAMA3};
    static const int steps_qwen2[] = {ST_QWEN2};
    const int *steps;
    size_t n_steps;
    switch (pre) {
    case TOK_PRE_DEFAULT:
        steps = steps_default;
        n_steps = CM_ARRAY_LEN(steps_default);
        break;
    case TOK_PRE_FALCON:
        steps = steps_falcon;
        n_steps = CM_ARRAY_LEN(steps_falcon);
        break;
    case TOK_PRE_GPT2:
        steps = steps_gpt2;
        n_steps = 1;
        break;
    case TOK_PRE_STARCODER:
        steps = steps_star;
        n_steps = CM_ARRAY_LEN(steps_star);
        break;
    case TOK_PRE_LLAMA3:
        steps = steps_llama3;
        n_steps = 1;
        break;
    case TOK_PRE_QWEN2:
        steps = steps_qwen2;
        n_steps = 1;
        break;
    default:
        CM_ABORT("bad pre-tokenizer %d", pre);
    }
    if (len == 0) return 0;

    int64_t ret = -ENOMEM;
    uint32_t *cp = malloc(len * sizeof(*cp));
    uint32_t *cpos = malloc((len + 1) * sizeof(*cpos)); /* byte offset of each code point */
    uint8_t *fl = malloc(len);
    segs a = {0}, b = {0};
    if (!cp || !cpos || !fl) goto out;

    const uint8_t *s = (const uint8_t *)text;
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        int l = 1;
        uint32_t ch = s[i] < 0x80 ? s[i] : tok_utf8_decode(s + i, len - i, &l);
        cp[n] = ch;
        cpos[n] = (uint32_t)i;
        fl[n] = cp_flags(ch);
        n++;
        i += (size_t)l;
    }
    cpos[n] = (uint32_t)len;

    ctx c = {cp, fl};
    if (segs_push(&a, n) < 0) goto out;
    for (size_t k = 0; k < n_steps; k++) {
        if (run_step(&c, steps[k], &a, &b) < 0) goto out;
        segs t = a;
        a = b;
        b = t;
    }

    if (*cap_words < a.n) {
        uint32_t *w = realloc(*words, a.n * sizeof(*w));
        if (!w) goto out;
        *words = w;
        *cap_words = a.n;
    }
    size_t at = 0;
    for (size_t k = 0; k < a.n; k++) {
        (*words)[k] = cpos[at + a.len[k]] - cpos[at];
        at += a.len[k];
    }
    ret = (int64_t)a.n;
out:
    free(cp);
    free(cpos);
    free(fl);
    free(a.len);
    free(b.len);
    return ret;
}
