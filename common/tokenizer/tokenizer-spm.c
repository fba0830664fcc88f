/*
 * tokenizer-spm.c — SentencePiece-style BPE ("llama" vocabularies: Llama-2, Mistral, ...).
 *
 * Spaces become "▁" (U+2581), optionally with one put in front (add_space_prefix). The text
 * starts as one symbol per UTF-8 character; repeatedly, of all adjacent pairs whose
 * concatenation is a vocabulary token, the one whose token has the highest score is merged
 * (leftmost first among equal scores). Symbols that end up not being tokens are written as
 * their bytes' <0xXX> tokens (byte fallback).
 *
 * Symbols are always contiguous spans of the escaped text, so a pair's text is one span and
 * its lookup needs no copy. The heap keeps stale pairs; a pair is stale when either side was
 * merged since (its sides' lengths no longer add up to the pair's).
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct spm_pair {
    float score;
    int32_t left, right;
    uint32_t size; /* bytes of left + right when pushed */
} spm_pair;

typedef struct spm_state {
    const tok_vocab *v;
    const char *buf;
    uint32_t *off, *n;
    int32_t *prv, *nxt;
    spm_pair *heap;
    size_t heap_n, heap_cap;
} spm_state;

/* a comes out of the heap before b */
static bool pair_before(const spm_pair *a, const spm_pair *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static int heap_push(spm_state *st, spm_pair e)
{
    if (st->heap_n == st->heap_cap) {
        size_t nc = st->heap_cap ? st->heap_cap * 2 : 256;
        spm_pair *h = realloc(st->heap, nc * sizeof(*h));
        if (!h) return -ENOMEM;
        st->heap = h;
        st->heap_cap = nc;
    }
    size_t i = st->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!pair_before(&e, &st->heap[p])) break;
        st->heap[i] = st->heap[p];
        i = p;
    }
    st->heap[i] = e;
    return 0;
}

static spm_pair heap_pop(spm_state *st)
{
    spm_pair top = st->heap[0];
    spm_pair last = st->heap[--st->heap_n];
    size_t n = st->heap_n, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pair_before(&st->heap[c + 1], &st->heap[c])) c++;
        if (!pair_before(&st->heap[c], &last)) break;
        st->heap[i] = st->heap[c];
        i = c;
    }
    if (n) st->heap[i] = last;
    return top;
}

static int try_pair(spm_state *st, int32_t l, int32_t r)
{
    if (l < 0 || r < 0) return 0;
    uint32_t size = st->n[l] + st->n[r];
    int32_t id = tok_map_get(&st->v->tok_map, st->buf + st->off[l], size);
    if (id < 0) return 0;
    spm_pair e = {.score = st->v->score[id], .left = l, .right = r, .size = size};
    return heap_push(st, e);
}

int tok_spm_encode(const tok_vocab *v, const char *text, size_t len, bool add_prefix, tok_out *out,
                   cm_err *err)
{
    static const char SP[3] = {'\xe2', '\x96', '\x81'}; /* ▁ */
    spm_state st;
    memset(&st, 0, sizeof(st));
    st.v = v;
    int rc = -ENOMEM;

    size_t n_sp = 0; /* each space grows from 1 to 3 bytes; the prefix adds 3 */
    for (size_t i = 0; i < len; i++)
        n_sp += text[i] == ' ';
    size_t blen = len + 2 * n_sp + (add_prefix ? 3 : 0);
    if (blen >= INT32_MAX) return cm_err_set(err, -CM_ELIMIT, "text too long (%zu bytes)", len);
    char *buf = malloc(blen ? blen : 1);
    if (!buf) goto out;
    size_t b = 0;
    if (add_prefix) {
        memcpy(buf, SP, 3);
        b = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(buf + b, SP, 3);
            b += 3;
        } else {
            buf[b++] = text[i];
        }
    }
    st.buf = buf;

    /* one symbol per character; the length comes from the lead byte, as in llama.cpp */
    size_t n_sym = 0;
    st.off = malloc(blen * sizeof(uint32_t));
    st.n = malloc(blen * sizeof(uint32_t));
    st.prv = malloc(blen * sizeof(int32_t));
    st.nxt = malloc(blen * sizeof(int32_t));
    if (!st.off || !st.n || !st.prv || !st.nxt) goto out;
    for (size_t i = 0; i < blen;) {
        static const uint8_t lead_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
        size_t l = lead_len[(uint8_t)buf[i] >> 4];
        if (l > blen - i) l = blen - i;
        st.off[n_sym] = (uint32_t)i;
        st.n[n_sym] = (uint32_t)l;
        st.prv[n_sym] = (int32_t)n_sym - 1;
        i += l;
        st.nxt[n_sym] = i < blen ? (int32_t)n_sym + 1 : -1;
        n_sym++;
    }
    if (n_sym == 0) {
        rc = 0;
        goto out;
    }

    for (size_t i = 1; i < n_sym; i++)
        if (try_pair(&st, (int32_t)i - 1, (int32_t)i) < 0) goto out;
    while (st.heap_n) {
        spm_pair e = heap_pop(&st);
        int32_t l = e.left, r = e.right;
        if (st.n[l] == 0 || st.n[r] == 0 || st.n[l] + st.n[r] != e.size) continue;
        st.n[l] += st.n[r];
        st.n[r] = 0;
        st.nxt[l] = st.nxt[r];
        if (st.nxt[r] >= 0) st.prv[st.nxt[r]] = l;
        if (try_pair(&st, st.prv[l], l) < 0 || try_pair(&st, l, st.nxt[l]) < 0) goto out;
    }

    for (int32_t i = 0; i >= 0; i = st.nxt[i]) {
        int32_t id = tok_map_get(&v->tok_map, buf + st.off[i], st.n[i]);
        if (id >= 0) {
            tok_out_push(out, id);
            continue;
        }
        for (uint32_t k = 0; k < st.n[i]; k++) {
            uint8_t byte = (uint8_t)buf[st.off[i] + k];
            if (v->spm_byte_tok[byte] < 0) {
                rc = cm_err_set(err, -CM_EFORMAT,
                                "vocabulary has no byte token <0x%02X> for byte fallback", byte);
                goto out;
            }
            tok_out_push(out, v->spm_byte_tok[byte]);
        }
    }
    rc = 0;
out:
    if (rc == -ENOMEM) cm_err_set(err, rc, "out of memory while tokenizing");
    free(buf);
    free(st.off);
    free(st.n);
    free(st.prv);
    free(st.nxt);
    free(st.heap);
    return rc;
}
