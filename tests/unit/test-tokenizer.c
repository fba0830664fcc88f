/*
 * test-tokenizer.c — the tokenizer on the real model (IHIP_MODEL; skipped with 77 if absent)
 * and on a small SentencePiece vocabulary built in memory.
 *
 * Checks: vocabulary facts, empty input, invalid UTF-8 (-EILSEQ naming the byte), the UTF-8
 * helpers, decode(encode(x)) == x over a corpus, the output-capacity convention, special
 * tokens, piece rendering, streaming through tok_utf8_complete, chat rendering, encoding
 * from several threads at once, hand-computed SentencePiece ids, and speed (1 MB of English
 * must tokenize in well under a second). The ids themselves are compared with llama.cpp's by
 * tests/tokenizer/test_tokenizer.py.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer/tokenizer.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                            \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

/* encode into a malloc'd array (*n ids); returns the tok_encode result */
static int64_t encode(const tok_vocab *v, const char *s, size_t len, bool bos, bool special,
                      int32_t **ids)
{
    cm_err e = {0};
    int64_t n = tok_encode(v, s, len, bos, special, NULL, 0, &e);
    *ids = NULL;
    if (n < 0) return n;
    *ids = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    int64_t m = tok_encode(v, s, len, bos, special, *ids, n, &e);
    CM_ASSERT(m == n);
    return n;
}

static char *decode(const tok_vocab *v, const int32_t *ids, int64_t n, bool special, int64_t *len)
{
    *len = tok_decode(v, ids, n, special, NULL, 0);
    char *s = malloc((size_t)*len + 1);
    int64_t m = tok_decode(v, ids, n, special, s, *len);
    CM_ASSERT(m == *len);
    s[*len] = '\0';
    return s;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    *len = fread(s, 1, (size_t)n, f);
    s[*len] = '\0';
    fclose(f);
    return s;
}

/* ---- UTF-8 helpers (no model needed) ------------------------------------------------------- */

static void test_utf8(void)
{
    static const struct {
        const char *s;
        size_t n;
        int64_t want;
    } v[] = {
        {"", 0, 0},
        {"hello", 5, 0},
        {"caf\xc3\xa9", 5, 0},
        {"\xf0\x9f\x98\x80", 4, 0},
        {"\xef\xbb\xbf", 3, 0},
        {"\xf4\x8f\xbf\xbf", 4, 0},  /* U+10FFFF */
        {"ab\xff", 3, -3},           /* 0xFF at 2 */
        {"\x80", 1, -1},             /* lone continuation */
        {"\xc0\xaf", 2, -1},         /* overlong '/' */
        {"\xe0\x80\xaf", 3, -2},     /* overlong: bad second byte */
        {"\xed\xa0\x80", 3, -2},     /* surrogate D800 */
        {"\xf4\x90\x80\x80", 4, -2}, /* above U+10FFFF */
        {"\xc3", 1, -1},             /* truncated at the end: its start */
        {"ok\xe2\x82", 4, -3},
        {"\xe2\x82x", 3, -3}, /* 'x' is where it breaks */
        {"a\0b", 3, 0},       /* NUL is valid */
    };
    for (size_t i = 0; i < CM_ARRAY_LEN(v); i++) {
        int64_t got = tok_utf8_validate(v[i].s, v[i].n);
        CHECK(got == v[i].want, "validate case %zu: got %lld want %lld", i, (long long)got,
              (long long)v[i].want);
    }
    /* tok_utf8_complete holds back an incomplete trailing character only */
    CHECK(tok_utf8_complete("abc", 3) == 3, "complete ascii");
    CHECK(tok_utf8_complete("ab\xc3", 3) == 2, "complete 2-byte lead");
    CHECK(tok_utf8_complete("ab\xc3\xa9", 4) == 4, "complete whole 2-byte");
    CHECK(tok_utf8_complete("\xf0\x9f\x98", 3) == 0, "complete 3 of 4");
    CHECK(tok_utf8_complete("x\xf0\x9f\x98\x80", 5) == 5, "complete whole 4-byte");
    CHECK(tok_utf8_complete("", 0) == 0, "complete empty");
}

/* ---- the real model ------------------------------------------------------------------------ */

static const char *const CORPUS[] = {
    "",
    " ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "don't I'LL we\xe2\x80\x99re you've",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\r\nand   runs     of spaces",
    "3.14159 1,000,000 +1 (555) 123-4567 12345678901234567890",
    "def f(x):\n    return {'a': [1, 2, 3]}\n",
    "\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96\xe7\x95\x8c \xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81"
    "\xa1\xe3\x81\xaf \xec\x95\x88\xeb\x85\x95",
    "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7 \xf0\x9f\x91\x8b"
    "\xf0\x9f\x8f\xbd \xf0\x9f\x87\xba\xf0\x9f\x87\xb8",
    "Cafe\xcc\x81 \xe0\xa4\xb9\xe0\xa4\xbf\xe0\xa4\xa8\xe0\xa5\x8d\xe0\xa4\xa6\xe0\xa5\x80 "
    "\xd8\xa7\xd9\x84\xd8\xb9\xd8\xb1\xd8\xa8\xd9\x8a\xd8\xa9 \xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d",
    "<|im_start|>user\nhi<|im_end|>\n",
    "\xc2\xa0\xe3\x80\x80\xe2\x80\xa8 unicode spaces",
};

typedef struct thread_arg {
    const tok_vocab *v;
    const char *text;
    size_t len;
    int64_t n;
    int32_t *ids;
} thread_arg;

static void *thread_encode(void *p)
{
    thread_arg *a = p;
    a->n = encode(a->v, a->text, a->len, true, true, &a->ids);
    return NULL;
}

static void test_model(const char *path, const char *src)
{
    cm_err e = {0};
    gguf_file *f = gguf_open(path, &e);
    CHECK(f != NULL, "gguf_open: %s", e.msg);
    if (!f) return;
    tok_vocab *v = tok_vocab_init(f, &e);
    CHECK(v != NULL, "tok_vocab_init: %s", e.msg);
    if (!v) {
        gguf_close(f);
        return;
    }

    /* facts of SmolLM2's vocabulary */
    CHECK(tok_n_vocab(v) == 49152, "n_vocab %d", tok_n_vocab(v));
    CHECK(tok_bos(v) == 1 && tok_eos(v) == 2, "bos %d eos %d", tok_bos(v), tok_eos(v));
    CHECK(!tok_add_bos(v), "add_bos");
    CHECK(strcmp(tok_text(v, 2), "<|im_end|>") == 0, "text of 2: %s", tok_text(v, 2));
    CHECK(tok_text(v, -1) == NULL && tok_text(v, 49152) == NULL, "tok_text out of range");
    CHECK(tok_attr(v, 2) == TOK_ATTR_CONTROL && tok_attr(v, 100) == TOK_ATTR_NORMAL, "attrs");
    CHECK(tok_is_eog(v, 2) && tok_is_eog(v, 0) && !tok_is_eog(v, 1) && !tok_is_eog(v, 100) &&
              !tok_is_eog(v, -1) && !tok_is_eog(v, 1 << 20),
          "eog");

    /* empty input */
    int32_t *ids;
    CHECK(encode(v, "", 0, false, false, &ids) == 0, "empty");
    free(ids);
    CHECK(encode(v, "", 0, true, true, &ids) == 0, "empty with bos (the model adds none)");
    free(ids);

    /* invalid UTF-8 */
    e.msg[0] = '\0';
    int64_t r = tok_encode(v, "abc\xff", 4, false, false, NULL, 0, &e);
    CHECK(r == -EILSEQ && strstr(e.msg, "byte 3") != NULL, "invalid utf-8: %lld '%s'", (long long)r,
          e.msg);
    r = tok_encode(v, "ok \xe2\x82", 5, false, false, NULL, 0, &e);
    CHECK(r == -EILSEQ && strstr(e.msg, "byte 3") != NULL, "truncated utf-8: %lld '%s'",
          (long long)r, e.msg);

    /* round trips */
    int n_rt = 0;
    for (size_t i = 0; i < CM_ARRAY_LEN(CORPUS); i++) {
        const char *s = CORPUS[i];
        int64_t n = encode(v, s, strlen(s), false, false, &ids), len;
        CHECK(n >= 0, "encode %zu", i);
        char *d = decode(v, ids, n, true, &len);
        CHECK((size_t)len == strlen(s) && memcmp(d, s, (size_t)len) == 0,
              "round trip %zu: '%s' -> '%s'", i, s, d);
        n_rt++;
        free(d);
        free(ids);
    }
    static const char *const files[] = {"english", "code", "cjk", "emoji", "scripts", "numbers"};
    char p[4096];
    for (size_t k = 0; src && k < CM_ARRAY_LEN(files); k++) {
        size_t len;
        snprintf(p, sizeof(p), "%s/tests/tokenizer/corpus/%s.txt", src, files[k]);
        char *s = read_file(p, &len);
        CHECK(s != NULL, "read %s", p);
        if (!s) continue;
        int64_t n = encode(v, s, len, true, false, &ids), dl;
        char *d = decode(v, ids, n, false, &dl);
        CHECK((size_t)dl == len && memcmp(d, s, len) == 0, "round trip of %s", p);
        n_rt++;
        free(d);
        free(ids);
        free(s);
    }
    printf("round trips: %d strings\n", n_rt);

    /* output capacity: the count is the total, only cap ids are written */
    {
        const char *s = "The quick brown fox jumps over the lazy dog.";
        int64_t n = encode(v, s, strlen(s), false, false, &ids);
        int32_t small[4] = {-7, -7, -7, -7};
        int64_t m = tok_encode(v, s, strlen(s), false, false, small, 3, &e);
        CHECK(m == n && n > 3, "count with small cap: %lld vs %lld", (long long)m, (long long)n);
        CHECK(memcmp(small, ids, 3 * sizeof(int32_t)) == 0 && small[3] == -7, "partial write");
        char buf[8];
        memset(buf, '#', sizeof(buf));
        int64_t dl = tok_decode(v, ids, n, false, buf, 5);
        CHECK(dl == (int64_t)strlen(s) && memcmp(buf, s, 5) == 0 && buf[5] == '#',
              "tok_decode with small cap");
        free(ids);
    }

    /* special tokens */
    {
        const char *s = "<|im_start|>user\nHi<|im_end|>";
        int64_t n = encode(v, s, strlen(s), false, true, &ids);
        CHECK(n >= 3 && ids[0] == 1 && ids[n - 1] == 2, "parse_special");
        int64_t len;
        char *d = decode(v, ids, n, false, &len);
        CHECK(strcmp(d, "user\nHi") == 0, "control tokens hidden: '%s'", d);
        free(d);
        d = decode(v, ids, n, true, &len);
        CHECK(strcmp(d, s) == 0, "control tokens rendered: '%s'", d);
        free(d);
        free(ids);
        n = encode(v, s, strlen(s), false, false, &ids);
        bool any = false;
        for (int64_t i = 0; i < n; i++)
            any |= ids[i] == 1 || ids[i] == 2;
        CHECK(!any && n > 5, "no special tokens without parse_special");
        free(ids);
        char pc[32];
        CHECK(tok_piece(v, 2, false, pc, sizeof(pc)) == 0, "piece of control, hidden");
        CHECK(tok_piece(v, 2, true, pc, sizeof(pc)) == 10 && memcmp(pc, "<|im_end|>", 10) == 0,
              "piece of control, rendered");
        CHECK(tok_piece(v, -1, true, pc, sizeof(pc)) == -EINVAL, "piece of bad id");
    }

    /* streaming: pieces through tok_utf8_complete give the text back, chunk by chunk valid */
    {
        const char *s = CORPUS[10];
        int64_t n = encode(v, s, strlen(s), false, false, &ids);
        char pend[64], out[256];
        size_t np = 0, no = 0;
        bool valid = true;
        for (int64_t i = 0; i < n; i++) {
            np += (size_t)tok_piece(v, ids[i], false, pend + np, (int64_t)(sizeof(pend) - np));
            size_t k = tok_utf8_complete(pend, np);
            valid &= tok_utf8_validate(pend, k) == 0;
            memcpy(out + no, pend, k);
            no += k;
            memmove(pend, pend + k, np - k);
            np -= k;
        }
        CHECK(valid && np == 0 && no == strlen(s) && memcmp(out, s, no) == 0, "streaming");
        free(ids);
    }

    /* several threads encode at once (the vocabulary is read-only) */
    {
        size_t len;
        char *text = NULL;
        if (src) {
            snprintf(p, sizeof(p), "%s/tests/tokenizer/corpus/english.txt", src);
            text = read_file(p, &len);
        }
        if (!text) {
            text = strdup(CORPUS[3]);
            len = strlen(text);
        }
        thread_arg a[4];
        pthread_t th[4];
        for (int i = 0; i < 4; i++) {
            a[i] = (thread_arg){v, text, len, 0, NULL};
            pthread_create(&th[i], NULL, thread_encode, &a[i]);
        }
        for (int i = 0; i < 4; i++)
            pthread_join(th[i], NULL);
        bool same = true;
        for (int i = 1; i < 4; i++)
            same &= a[i].n == a[0].n && memcmp(a[i].ids, a[0].ids, (size_t)a[0].n * 4) == 0;
        CHECK(a[0].n > 0 && same, "threads agree");
        for (int i = 0; i < 4; i++)
            free(a[i].ids);
        free(text);
    }

    /* chat: the model's ChatML template with its default system message */
    {
        CHECK(tok_chat_detect(f, &e) == TOK_CHAT_CHATML, "detect: %s", e.msg);
        tok_chat_msg m[] = {{"user", "Hi!"}};
        char *s = tok_chat_render(f, TOK_CHAT_CHATML, m, 1, true, &e);
        const char *want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                           "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                           "<|im_start|>assistant\n";
        CHECK(s && strcmp(s, want) == 0, "chatml render: %s", s ? s : e.msg);
        free(s);
        tok_chat_msg m2[] = {{"system", "Be brief."}, {"user", "Hi!"}};
        s = tok_chat_render(f, TOK_CHAT_CHATML, m2, 2, false, &e);
        CHECK(s && strcmp(s, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!"
                             "<|im_end|>\n") == 0,
              "chatml with system: %s", s ? s : e.msg);
        free(s);
        s = tok_chat_render(f, TOK_CHAT_LLAMA3, m2, 2, true, &e);
        CHECK(s && strcmp(s, "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                             "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n") == 0,
              "llama3 render: %s", s ? s : e.msg);
        free(s);
        s = tok_chat_render(f, TOK_CHAT_MISTRAL, m2, 2, true, &e);
        CHECK(s && strcmp(s, "[INST] Be brief.\n\nHi! [/INST]") == 0, "mistral render: %s",
              s ? s : e.msg);
        free(s);
        CHECK(tok_chat_render(f, 99, m, 1, true, &e) == NULL, "bad kind");
    }

    /* speed: 1 MB of English prose (the corpus repeated), and 1 MB of random words */
    if (src) {
        size_t len;
        snprintf(p, sizeof(p), "%s/tests/tokenizer/corpus/english.txt", src);
        char *eng = read_file(p, &len);
        if (eng) {
            size_t big = 1 << 20;
            char *t = malloc(big);
            for (size_t i = 0; i < big; i++)
                t[i] = eng[i % len];
            big = tok_utf8_complete(t, big);
            uint64_t t0 = cm_time_ns();
            int64_t n = tok_encode(v, t, big, false, false, NULL, 0, &e);
            double s = (double)(cm_time_ns() - t0) / 1e9;
            printf("speed: 1 MB English -> %lld tokens in %.3f s (%.1f M tokens/s)\n", (long long)n,
                   s, (double)n / s / 1e6);
            CHECK(n > 0 && s < 1.0, "1 MB of English took %.3f s", s);

            uint64_t x = 88172645463325252ull; /* xorshift: words that rarely repeat */
            for (size_t i = 0; i < big;) {
                size_t wl = 1 + (x % 9);
                for (size_t k = 0; k < wl && i < big; k++) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    t[i++] = (char)('a' + (x % 26));
                }
                if (i < big) t[i++] = ' ';
            }
            t0 = cm_time_ns();
            n = tok_encode(v, t, big, false, false, NULL, 0, &e);
            s = (double)(cm_time_ns() - t0) / 1e9;
            printf("speed: 1 MB random words -> %lld tokens in %.3f s\n", (long long)n, s);
            CHECK(n > 0 && s < 3.0, "1 MB of random words took %.3f s", s);
            free(t);
            free(eng);
        }
    }

    tok_vocab_free(v);
    gguf_close(f);
}

/* ---- a tiny SentencePiece vocabulary written as GGUF in memory ------------------------------ */

typedef struct wbuf {
    uint8_t *p;
    size_t n, cap;
} wbuf;

static void put(wbuf *b, const void *x, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 256;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, x, n);
    b->n += n;
}
static void put_u32(wbuf *b, uint32_t x)
{
    put(b, &x, 4);
}
static void put_u64(wbuf *b, uint64_t x)
{
    put(b, &x, 8);
}
static void put_str(wbuf *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

#define SP "\xe2\x96\x81"

static void test_spm(void)
{
    /* tokens after <unk> <s> </s> and the 256 byte tokens (ids 3..258) */
    static const struct {
        const char *text;
        float score;
    } words[] = {
        {SP, -1.0f},      /* 259 */
        {"a", -2.0f},     /* 260 */
        {"b", -3.0f},     /* 261 */
        {"ab", -4.0f},    /* 262 */
        {SP "a", -5.0f},  /* 263 */
        {SP "ab", -0.5f}, /* 264: best score of all merges */
        {"ba", -6.0f},    /* 265 */
        {"c", -7.0f},     /* 266 */
    };
    int n_tok = 3 + 256 + (int)CM_ARRAY_LEN(words);
    wbuf b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, 0); /* tensors */
    put_u64(&b, 4); /* key-values */
    put_str(&b, "tokenizer.ggml.model");
    put_u32(&b, 8);
    put_str(&b, "llama");
    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, 9);
    put_u32(&b, 8);
    put_u64(&b, (uint64_t)n_tok);
    put_str(&b, "<unk>");
    put_str(&b, "<s>");
    put_str(&b, "</s>");
    for (int i = 0; i < 256; i++) {
        char h[8];
        snprintf(h, sizeof(h), "<0x%02X>", i);
        put_str(&b, h);
    }
    for (size_t i = 0; i < CM_ARRAY_LEN(words); i++)
        put_str(&b, words[i].text);
    put_str(&b, "tokenizer.ggml.scores");
    put_u32(&b, 9);
    put_u32(&b, 6);
    put_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < n_tok; i++) {
        float s = i < 259 ? 0.0f : words[i - 259].score;
        put(&b, &s, 4);
    }
    put_str(&b, "tokenizer.ggml.token_type");
    put_u32(&b, 9);
    put_u32(&b, 5);
    put_u64(&b, (uint64_t)n_tok);
    for (int i = 0; i < n_tok; i++) {
        int32_t t = i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1;
        put(&b, &t, 4);
    }
    while (b.n % 32)
        put(&b, "", 1);

    cm_err e = {0};
    gguf_file *f = gguf_open_mem(b.p, b.n, &e);
    CHECK(f != NULL, "spm gguf: %s", e.msg);
    if (!f) {
        free(b.p);
        return;
    }
    tok_vocab *v = tok_vocab_init(f, &e);
    CHECK(v != NULL, "spm vocab: %s", e.msg);
    if (v) {
        CHECK(tok_add_bos(v) && tok_bos(v) == 1 && tok_eos(v) == 2, "spm defaults");
        static const struct {
            const char *text;
            bool bos;
            int n;
            int32_t ids[8];
        } cases[] = {
            /* "ab" (-4) beats "▁a" (-5), then "▁ab" forms */
            {"ab", false, 1, {264}},
            {"ab", true, 2, {1, 264}},
            /* "▁a b a": ▁ab wins over ▁a; "ba" can no longer form */
            {"aba", false, 2, {264, 260}},
            /* "▁ab▁ab c" -> ▁ab ▁ab ▁ c */
            {"ab ab c", false, 4, {264, 264, 259, 266}},
            /* byte fallback: é = C3 A9 */
            {"\xc3\xa9", false, 3, {259, 3 + 0xC3, 3 + 0xA9}},
            /* special token text: with parse_special the fragment after it gets a space too */
            {"</s>a", false, 2, {2, 263}},
        };
        for (size_t i = 0; i < CM_ARRAY_LEN(cases); i++) {
            int32_t out[16];
            bool special = i == 5;
            int64_t n = tok_encode(v, cases[i].text, strlen(cases[i].text), cases[i].bos, special,
                                   out, 16, &e);
            bool ok = n == cases[i].n && memcmp(out, cases[i].ids, (size_t)n * 4) == 0;
            CHECK(ok, "spm case %zu '%s': got %lld ids [%d %d %d %d]", i, cases[i].text,
                  (long long)n, out[0], out[1], out[2], out[3]);
        }
        char pc[8];
        CHECK(tok_piece(v, 264, false, pc, 8) == 3 && memcmp(pc, " ab", 3) == 0, "spm piece");
        CHECK(tok_piece(v, 3 + 0x41, false, pc, 8) == 1 && pc[0] == 'A', "spm byte piece");
        tok_vocab_free(v);
    }
    gguf_close(f);
    free(b.p);
}

int main(void)
{
    test_utf8();
    test_spm();
    const char *model = getenv("IHIP_MODEL");
    const char *src = getenv("IHIP_SRC");
    FILE *fm = model ? fopen(model, "rb") : NULL;
    if (!fm) {
        printf("skip: IHIP_MODEL not set or missing; %d passed, %d failed before that\n", n_pass,
               n_fail);
        printf("%d passed, %d failed\n", n_pass, n_fail);
        return n_fail ? 1 : 77;
    }
    fclose(fm);
    test_model(model, src);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
