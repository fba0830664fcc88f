/*
 * tokenizer-bpe.c — byte-level BPE ("gpt2" vocabularies: GPT-2, Llama-3, Qwen2, SmolLM, ...).
 *
 * A word from the pre-tokenizer starts as one symbol per byte (the byte's GPT-2 character); the
 * adjacent pair with the lowest merge rank is merged, leftmost first among equal ranks, until
 * no pair has a rank. Each final symbol is its vocabulary token; a symbol that is not in the
 * vocabulary falls back to the tokens of its single bytes (llama.cpp's rule, kept for equality).
 *
 * Speed: every string that can ever be a symbol (the 256 byte characters, both sides of every
 * merge and every merge result) is interned at load, so a merge lookup is one probe of a hash
 * table keyed by two symbol ids, and a symbol's token is an array read. Each word runs a binary
 * heap over its candidate pairs (stale entries are skipped when popped), and a per-call cache
 * maps repeated words straight to their tokens — natural text repeats most of its words.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---- load ---------------------------------------------------------------------------------- */

static int32_t sym_intern(tok_vocab *v, const char *s, size_t len, int32_t *cap)
{
    size_t off = v->sym_map.keys_len;
    int32_t id = tok_map_put(&v->sym_map, s, len, v->n_sym, false);
    if (id < 0) return id;
    if (id == v->n_sym) {
        if (v->n_sym == *cap) {
            int32_t nc = *cap ? *cap * 2 : 1024;
            uint32_t *o = realloc(v->sym_off, (size_t)nc * sizeof(*o));
            if (!o) return -ENOMEM;
            v->sym_off = o;
            uint32_t *l = realloc(v->sym_len, (size_t)nc * sizeof(*l));
            if (!l) return -ENOMEM;
            v->sym_len = l;
            *cap = nc;
        }
        v->sym_off[id] = (uint32_t)off;
        v->sym_len[id] = (uint32_t)len;
        v->n_sym++;
    }
    return id;
}

static uint64_t merge_key(int32_t l, int32_t r)
{
    return ((uint64_t)(uint32_t)(l + 1) << 32) | (uint32_t)(r + 1);
}

static size_t merge_slot(uint64_t key, size_t mask)
{
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 32) & mask;
}

static const tok_merge_slot *merge_find(const tok_vocab *v, int32_t l, int32_t r)
{
    uint64_t key = merge_key(l, r);
    size_t mask = v->merge_cap - 1;
    for (size_t i = merge_slot(key, mask);; i = (i + 1) & mask) {
        const tok_merge_slot *s = &v->merges[i];
        if (s->key == key) return s;
        if (s->key == 0) return NULL;
    }
}

int tok_bpe_init(tok_vocab *v, const gguf_str *merges, uint64_t n_merges, cm_err *err)
{
    int32_t cap = 0;
    char *tmp = NULL;
    size_t tmp_cap = 0;
    if (n_merges > INT32_MAX / 4)
        return cm_err_set(err, -CM_ELIMIT, "too many merges (%llu)", (unsigned long long)n_merges);
    if (tok_map_init(&v->sym_map, (size_t)n_merges * 2 + 512) < 0) goto nomem;

    for (int b = 0; b < 256; b++) {
        char u[4];
        int l = tok_utf8_encode(tok_byte_to_cp((uint8_t)b), u);
        if ((v->byte_sym[b] = sym_intern(v, u, (size_t)l, &cap)) < 0) goto nomem;
    }

    v->merge_cap = 16;
    while (v->merge_cap < n_merges * 2)
        v->merge_cap *= 2;
    v->merges = calloc(v->merge_cap, sizeof(*v->merges));
    if (!v->merges) goto nomem;

    for (uint64_t i = 0; i < n_merges; i++) {
        const char *s = merges[i].ptr;
        size_t n = (size_t)merges[i].len;
        const char *z = n ? memchr(s, '\0', n) : NULL; /* read as a C string, like llama.cpp */
        if (z) n = (size_t)(z - s);
        /* "left right": split at the first space after the first byte, as llama.cpp does */
        const char *sp = n > 1 ? memchr(s + 1, ' ', n - 1) : NULL;
        if (!sp) continue; /* llama.cpp files it as ("", ""), which never matches */
        size_t nl = (size_t)(sp - s), nr = n - nl - 1;
        int32_t l = sym_intern(v, s, nl, &cap);
        if (l < 0) goto nomem;
        int32_t r = sym_intern(v, sp + 1, nr, &cap);
        if (r < 0) goto nomem;
        if (nl + nr > tmp_cap) {
            tmp_cap = (nl + nr) * 2;
            char *t = realloc(tmp, tmp_cap);
            if (!t) goto nomem;
            tmp = t;
        }
        memcpy(tmp, s, nl);
        memcpy(tmp + nl, sp + 1, nr);
        int32_t m = sym_intern(v, tmp, nl + nr, &cap);
        if (m < 0) goto nomem;
        /* sym_intern may have reallocated keys: nothing above holds a pointer into them */
        uint64_t key = merge_key(l, r);
        size_t mask = v->merge_cap - 1;
        size_t k = merge_slot(key, mask);
        while (v->merges[k].key != 0 && v->merges[k].key != key)
            k = (k + 1) & mask;
        if (v->merges[k].key == 0) /* the first rank of a duplicated merge wins */
            v->merges[k] = (tok_merge_slot){.key = key, .rank = (int32_t)i, .merged = m};
    }
    free(tmp);
    tmp = NULL;

    v->sym_tok = malloc((size_t)(v->n_sym ? v->n_sym : 1) * sizeof(*v->sym_tok));
    if (!v->sym_tok) goto nomem;
    for (int32_t s = 0; s < v->n_sym; s++)
        v->sym_tok[s] = tok_map_get(&v->tok_map, v->sym_map.keys + v->sym_off[s], v->sym_len[s]);
    return 0;
nomem:
    free(tmp);
    return cm_err_set(err, -ENOMEM, "out of memory building BPE merges");
}

void tok_bpe_free(tok_vocab *v)
{
    tok_map_free(&v->sym_map);
    free(v->sym_off);
    free(v->sym_len);
    free(v->sym_tok);
    free(v->merges);
    v->sym_off = v->sym_len = NULL;
    v->sym_tok = NULL;
    v->merges = NULL;
}

/* ---- encode -------------------------------------------------------------------------------- */

typedef struct heap_ent {
    uint64_t key;  /* rank << 32 | left position: the pop order */
    int32_t right; /* position of the right symbol */
    int32_t lsym;  /* the symbols when pushed (stale if either changed) */
    int32_t rsym;
    int32_t merged;
} heap_ent;

typedef struct bpe_state {
    int32_t *sym, *nxt, *prv; /* per byte position of the current word */
    size_t cap;
    heap_ent *heap;
    size_t heap_n, heap_cap;
    char *scratch; /* byte-encoded word (ignore_merges lookups) */
    size_t scratch_cap;
    /* word cache: word bytes -> index into cache_at; ids in cache_ids */
    bool use_cache;
    tok_map cache;
    uint32_t *cache_at; /* 2 per entry: offset, count */
    size_t cache_n, cache_cap;
    int32_t *cache_ids;
    size_t cache_ids_n, cache_ids_cap;
    int32_t *word_ids; /* ids of the word being encoded */
    size_t word_n, word_cap;
} bpe_state;

#define CACHE_MAX_WORD 64 /* bytes; longer words are rare and not worth keeping */
#define CACHE_MAX_ENTRIES (1u << 20)

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need)
        nc *= 2;
    void *q = realloc(*p, nc * elem);
    if (!q) return -ENOMEM;
    *p = q;
    *cap = nc;
    return 0;
}

static int heap_push(bpe_state *st, heap_ent e)
{
    if (grow((void **)&st->heap, &st->heap_cap, st->heap_n + 1, sizeof(heap_ent)) < 0)
        return -ENOMEM;
    size_t i = st->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (st->heap[p].key <= e.key) break;
        st->heap[i] = st->heap[p];
        i = p;
    }
    st->heap[i] = e;
    return 0;
}

static heap_ent heap_pop(bpe_state *st)
{
    heap_ent top = st->heap[0];
    heap_ent last = st->heap[--st->heap_n];
    size_t n = st->heap_n, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && st->heap[c + 1].key < st->heap[c].key) c++;
        if (last.key <= st->heap[c].key) break;
        st->heap[i] = st->heap[c];
        i = c;
    }
    if (n) st->heap[i] = last;
    return top;
}

static int word_push(bpe_state *st, int32_t id)
{
    if (grow((void **)&st->word_ids, &st->word_cap, st->word_n + 1, sizeof(int32_t)) < 0)
        return -ENOMEM;
    st->word_ids[st->word_n++] = id;
    return 0;
}

/* The tokens of a final symbol: its token, else the tokens of its text's single bytes. */
static int emit_sym(const tok_vocab *v, bpe_state *st, int32_t s)
{
    if (v->sym_tok[s] >= 0) return word_push(st, v->sym_tok[s]);
    const char *t = v->sym_map.keys + v->sym_off[s];
    for (uint32_t i = 0; i < v->sym_len[s]; i++) {
        int32_t id = tok_map_get(&v->tok_map, t + i, 1);
        if (id >= 0 && word_push(st, id) < 0) return -ENOMEM;
    }
    return 0;
}

static int try_pair(const tok_vocab *v, bpe_state *st, int32_t l, int32_t r)
{
    if (l < 0 || r < 0) return 0;
    const tok_merge_slot *m = merge_find(v, st->sym[l], st->sym[r]);
    if (!m) return 0;
    heap_ent e = {.key = ((uint64_t)(uint32_t)m->rank << 32) | (uint32_t)l,
                  .right = r,
                  .lsym = st->sym[l],
                  .rsym = st->sym[r],
                  .merged = m->merged};
    return heap_push(st, e);
}

/* BPE of one word into st->word_ids. */
static int bpe_word(const tok_vocab *v, bpe_state *st, const uint8_t *w, size_t n)
{
    st->word_n = 0;
    if (n == 1) return emit_sym(v, st, v->byte_sym[w[0]]);
    if (n > INT32_MAX) return -CM_ELIMIT;
    if (n > st->cap) {
        size_t nc = st->cap ? st->cap : 256;
        while (nc < n)
            nc *= 2;
        int32_t *a = realloc(st->sym, nc * sizeof(int32_t));
        if (!a) return -ENOMEM;
        st->sym = a;
        a = realloc(st->nxt, nc * sizeof(int32_t));
        if (!a) return -ENOMEM;
        st->nxt = a;
        a = realloc(st->prv, nc * sizeof(int32_t));
        if (!a) return -ENOMEM;
        st->prv = a;
        st->cap = nc;
    }
    for (size_t i = 0; i < n; i++) {
        st->sym[i] = v->byte_sym[w[i]];
        st->prv[i] = (int32_t)i - 1;
        st->nxt[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    st->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (try_pair(v, st, (int32_t)i, (int32_t)i + 1) < 0) return -ENOMEM;
    while (st->heap_n) {
        heap_ent e = heap_pop(st);
        int32_t l = (int32_t)(uint32_t)e.key, r = e.right;
        if (st->sym[l] != e.lsym || st->sym[r] != e.rsym || st->nxt[l] != r) continue;
        st->sym[l] = e.merged;
        st->sym[r] = -1;
        st->nxt[l] = st->nxt[r];
        if (st->nxt[r] >= 0) st->prv[st->nxt[r]] = l;
        if (try_pair(v, st, st->prv[l], l) < 0 || try_pair(v, st, l, st->nxt[l]) < 0)
            return -ENOMEM;
    }
    for (int32_t i = 0; i >= 0; i = st->nxt[i])
        if (emit_sym(v, st, st->sym[i]) < 0) return -ENOMEM;
    return 0;
}

static int cache_put(bpe_state *st, const char *w, size_t n)
{
    if (st->cache.count >= CACHE_MAX_ENTRIES) return 0;
    if (grow((void **)&st->cache_at, &st->cache_cap, 2 * (st->cache_n + 1), sizeof(uint32_t)) < 0 ||
        grow((void **)&st->cache_ids, &st->cache_ids_cap, st->cache_ids_n + st->word_n,
             sizeof(int32_t)) < 0)
        return -ENOMEM;
    if (tok_map_put(&st->cache, w, n, (int32_t)st->cache_n, false) < 0) return -ENOMEM;
    st->cache_at[2 * st->cache_n] = (uint32_t)st->cache_ids_n;
    st->cache_at[2 * st->cache_n + 1] = (uint32_t)st->word_n;
    st->cache_n++;
    memcpy(st->cache_ids + st->cache_ids_n, st->word_ids, st->word_n * sizeof(int32_t));
    st->cache_ids_n += st->word_n;
    return 0;
}

int tok_bpe_encode(const tok_vocab *v, const char *text, size_t len, tok_out *out, cm_err *err)
{
    bpe_state st;
    memset(&st, 0, sizeof(st));
    uint32_t *words = NULL;
    size_t cap_words = 0;
    int rc = 0;

    int64_t n_words = tok_pretokenize(v->pre, text, len, &words, &cap_words);
    if (n_words < 0) {
        rc = (int)n_words;
        goto out;
    }
    /* a cache pays for itself only when words can repeat */
    st.use_cache = n_words > 64;
    if (st.use_cache && tok_map_init(&st.cache, 1024) < 0) {
        rc = -ENOMEM;
        goto out;
    }

    size_t at = 0;
    for (int64_t k = 0; k < n_words; k++) {
        const char *w = text + at;
        size_t n = words[k];
        at += n;
        if (v->ignore_merges) {
            /* the whole word, byte-encoded, is a token: take it without merging */
            if (grow((void **)&st.scratch, &st.scratch_cap, n * 2, 1) < 0) {
                rc = -ENOMEM;
                goto out;
            }
            size_t m = 0;
            for (size_t i = 0; i < n; i++)
                m += (size_t)tok_utf8_encode(tok_byte_to_cp((uint8_t)w[i]), st.scratch + m);
            int32_t id = tok_map_get(&v->tok_map, st.scratch, m);
            if (id >= 0) {
                tok_out_push(out, id);
                continue;
            }
        }
        if (st.use_cache && n <= CACHE_MAX_WORD) {
            int32_t e = tok_map_get(&st.cache, w, n);
            if (e >= 0) {
                const int32_t *ids = st.cache_ids + st.cache_at[2 * e];
                for (uint32_t i = 0; i < st.cache_at[2 * e + 1]; i++)
                    tok_out_push(out, ids[i]);
                continue;
            }
        }
        if ((rc = bpe_word(v, &st, (const uint8_t *)w, n)) < 0) goto out;
        for (size_t i = 0; i < st.word_n; i++)
            tok_out_push(out, st.word_ids[i]);
        if (st.use_cache && n <= CACHE_MAX_WORD && (rc = cache_put(&st, w, n)) < 0) goto out;
    }
out:
    if (rc == -ENOMEM)
        cm_err_set(err, rc, "out of memory while tokenizing");
    else if (rc < 0)
        cm_err_set(err, rc, "tokenizing failed: %s", cm_strerror(rc));
    free(words);
    free(st.sym);
    free(st.nxt);
    free(st.prv);
    free(st.heap);
    free(st.scratch);
    if (st.use_cache) tok_map_free(&st.cache);
    free(st.cache_at);
    free(st.cache_ids);
    free(st.word_ids);
    return rc;
}
