/*
 * tokenizer-impl.h — internals shared by the tokenizer's files (not part of the public API).
 *
 *   tokenizer-unicode.c       UTF-8 helpers, Unicode class lookup, GPT-2 byte <-> unicode map
 *   tokenizer-unicode-data.c  generated Unicode tables (gen-unicode.py)
 *   tokenizer-pretok.c        pre-tokenizer splitters (the regexes of llama.cpp, by hand)
 *   tokenizer-bpe.c           byte-level BPE ("gpt2" vocabularies)
 *   tokenizer-spm.c           SentencePiece-style BPE over scores ("llama" vocabularies)
 *   tokenizer.c               vocabulary loading, special tokens, encode/decode entry points
 *   chat-template.c           chat templates
 */
#ifndef TOK_TOKENIZER_IMPL_H
#define TOK_TOKENIZER_IMPL_H

#include "tokenizer.h"

#include <stddef.h>
#include <stdint.h>

/* ---- Unicode ------------------------------------------------------------------------------ */

/* Major General Category classes of the generated table. */
enum tok_ucls {
    TOK_UC_UNASSIGNED = 0,
    TOK_UC_LETTER = 1,
    TOK_UC_NUMBER = 2,
    TOK_UC_PUNCT = 3,
    TOK_UC_SYMBOL = 4,
    TOK_UC_MARK = 5,
    TOK_UC_SEPARATOR = 6,
    TOK_UC_OTHER = 7,
};

extern const char tok_ucd_version[];
extern const uint32_t tok_ucd_runs[];
extern const size_t tok_ucd_n_runs;
extern const uint32_t tok_ucd_space[][2];
extern const size_t tok_ucd_n_space;

/* The class of a code point (enum tok_ucls). */
int tok_ucd_class(uint32_t cp);
/* The Unicode White_Space property. */
bool tok_ucd_is_space(uint32_t cp);

/* Decode one code point of valid UTF-8 at s (n bytes available, n >= 1); *len gets its length.
 * Only for text that passed tok_utf8_validate. */
uint32_t tok_utf8_decode(const uint8_t *s, size_t n, int *len);
/* Length of the valid UTF-8 sequence at s (n >= 1 bytes left), or 0 if none starts there. */
int tok_utf8_seq_len(const uint8_t *s, size_t n);
/* Encode cp as UTF-8 into out (4 bytes room); returns the length. */
int tok_utf8_encode(uint32_t cp, char *out);

/* GPT-2 byte-level mapping: the code point standing for byte b, and back (-1 if cp is not one). */
uint32_t tok_byte_to_cp(uint8_t b);
int tok_cp_to_byte(uint32_t cp);

/* ---- string -> int32 hash map (open addressing, keys copied into an arena) ----------------- */

typedef struct tok_map_slot {
    uint32_t hash;
    uint32_t len;
    uint32_t off; /* into keys */
    int32_t val;
} tok_map_slot;

typedef struct tok_map {
    tok_map_slot *slots; /* cap slots; len == UINT32_MAX marks an empty slot */
    size_t cap;          /* a power of two */
    size_t count;
    char *keys; /* key bytes, back to back */
    size_t keys_len, keys_cap;
} tok_map;

uint32_t tok_hash(const void *s, size_t len);
int tok_map_init(tok_map *m, size_t expected);
void tok_map_free(tok_map *m);
/* The value for key, or -1. */
int32_t tok_map_get(const tok_map *m, const void *key, size_t len);
/* Insert key -> val. If the key exists: overwrite when `overwrite`, else keep the old value.
 * Returns the value now stored (>= 0), or -ENOMEM. */
int32_t tok_map_put(tok_map *m, const void *key, size_t len, int32_t val, bool overwrite);

/* ---- growable int32 output with a caller's cap ------------------------------------------- */

typedef struct tok_out {
    int32_t *ids; /* caller's buffer (cap entries); ids past cap are counted, not written */
    int64_t cap;
    int64_t n;
} tok_out;

static inline void tok_out_push(tok_out *o, int32_t id)
{
    if (o->n < o->cap) o->ids[o->n] = id;
    o->n++;
}

/* ---- pre-tokenizers ---------------------------------------------------------------------- */

enum tok_pre {
    TOK_PRE_DEFAULT = 0, /* llama.cpp's default: punctuation runs, GPT-2, digit runs, 3 digits */
    TOK_PRE_GPT2,        /* the GPT-2 regex */
    TOK_PRE_STARCODER,   /* every digit alone, then GPT-2 (smollm, starcoder, refact, ...) */
    TOK_PRE_LLAMA3,      /* the Llama-3 regex (digits in groups of up to 3) */
    TOK_PRE_QWEN2,       /* the Llama-3 regex with single digits, as llama.cpp runs it */
    TOK_PRE_FALCON,      /* punctuation runs (with `), GPT-2, 3 digits */
};

/* Split text[0..len) (valid UTF-8) into pre-tokens. Writes the byte length of each word to
 * *words (malloc'd, grown as needed; *cap_words its capacity) and returns the word count, or
 * -ENOMEM. */
int64_t tok_pretokenize(int pre, const char *text, size_t len, uint32_t **words, size_t *cap_words);

/* ---- the vocabulary ----------------------------------------------------------------------- */

enum tok_type { TOK_TYPE_BPE = 1, TOK_TYPE_SPM = 2 };

typedef struct tok_merge_slot {
    uint64_t key; /* (left sym + 1) << 32 | (right sym + 1); 0 = empty */
    int32_t rank;
    int32_t merged; /* sym of left + right */
} tok_merge_slot;

struct tok_vocab {
    int type; /* enum tok_type */
    int pre;  /* enum tok_pre (BPE) */
    int32_t n_vocab;

    /* token texts: text[off[i] .. off[i]+len[i]) NUL-terminated, in one buffer */
    char *text;
    uint32_t *text_off;
    uint32_t *text_len;
    float *score;    /* SPM scores (0 when absent) */
    uint8_t *attr;   /* enum tok_attr, 0 = undefined */
    uint8_t *eog;    /* 1 for end-of-generation tokens */
    tok_map tok_map; /* text -> id (a duplicated text maps to its last id, as llama.cpp) */

    int32_t bos, eos, eot, eom, unk;
    bool add_bos, add_eos, add_space_prefix, ignore_merges;

    /* special tokens (control, user-defined, unknown) by text length, longest first */
    int32_t *special;
    int32_t n_special;
    int32_t n_user_defined; /* how many of them are user-defined (split even without
                               parse_special) */
    /* first-byte buckets into special[]: special_first[b] .. special_first[b+1] index
     * special_by_byte, which lists special[] positions in order */
    int32_t special_first[257];
    int32_t *special_by_byte;

    /* decode: the piece of every token as rendered with render_special */
    char *piece;
    uint32_t *piece_off;
    uint32_t *piece_len;

    /* BPE: interned symbol strings (merge operands and results, byte characters) */
    tok_map sym_map;   /* string -> sym */
    uint32_t *sym_off; /* into sym_map.keys */
    uint32_t *sym_len;
    int32_t *sym_tok; /* the token with the symbol's text, or -1 */
    int32_t n_sym;
    int32_t byte_sym[256]; /* symbol of each byte's GPT-2 character */
    tok_merge_slot *merges;
    size_t merge_cap; /* a power of two */

    /* SPM: byte fallback token of each byte (<0xXX>, else the 1-byte text), -1 if none */
    int32_t spm_byte_tok[256];
};

/* Byte-level BPE of one text fragment (pre-tokenized inside). Returns 0 or a negative code. */
int tok_bpe_encode(const tok_vocab *v, const char *text, size_t len, tok_out *out, cm_err *err);
/* Build the BPE symbol and merge tables from the merges array. */
int tok_bpe_init(tok_vocab *v, const gguf_str *merges, uint64_t n_merges, cm_err *err);
void tok_bpe_free(tok_vocab *v);

/* SentencePiece-style tokenization of one fragment: text is the raw fragment; add_prefix puts
 * a space before it. Returns 0 or a negative code. */
int tok_spm_encode(const tok_vocab *v, const char *text, size_t len, bool add_prefix, tok_out *out,
                   cm_err *err);

static inline const char *tok_vtext(const tok_vocab *v, int32_t id)
{
    return v->text + v->text_off[id];
}

#endif /* TOK_TOKENIZER_IMPL_H */
