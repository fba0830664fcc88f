/*
 * tokenizer.c — the vocabulary from GGUF metadata, special tokens, and the encode/decode entry
 * points. The algorithms live in tokenizer-bpe.c / tokenizer-spm.c / tokenizer-pretok.c.
 *
 * Compatibility with llama.cpp is the contract (same ids on the same GGUF), so this file keeps
 * llama.cpp's rules, including the odd ones:
 *   - a token text that appears twice maps to its last id; an empty token text becomes
 *     "[EMPTY_<id>]";
 *   - defaults before metadata: "gpt2" has BOS = EOS = 11 and no UNK, "llama" has BOS 1, EOS 2,
 *     UNK 0, add_bos and add_space_prefix; the llama3 family adds BOS and ignores merges for
 *     words that are whole tokens; tokenizer.ggml.add_bos_token / add_eos_token override;
 *   - tokens whose text looks like an end-of-turn / FIM marker ("<|im_end|>", "<|eot_id|>",
 *     "<reponame>", ...) are made CONTROL tokens, and the end-of-generation set is built from
 *     those texts plus EOS/EOT/EOM;
 *   - special tokens in the text are found longest token first over the whole text, each
 *     token splitting what longer ones left (not leftmost-longest); user-defined tokens are
 *     split out even when parse_special is false, control and unknown ones only when true;
 *   - "llama" vocabularies put a space in front of the first text fragment and of every
 *     fragment that follows a special token (add_space_prefix).
 * Not replicated: per-model lstrip/rstrip token attributes (Phi-3, Jina), which llama.cpp sets
 * by model name.
 *
 * A tok_vocab is read-only after init, so any number of threads may encode at once.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer-impl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* an occurrence of a special token in the text */
typedef struct occ {
    size_t pos;
    int32_t k; /* position in v->special */
} occ;

/* ---- load ---------------------------------------------------------------------------------- */

/* texts of end-of-turn / FIM markers (UTF-8: DeepSeek uses fullwidth bars and "▁") */
static const char *const EOT_TEXTS[] = {"<|eot_id|>",
                                        "<|im_end|>",
                                        "<|end|>",
                                        "<end_of_turn>",
                                        "<|endoftext|>",
                                        "<|end_of_text|>",
                                        "<EOT>",
                                        "_<EOT>",
                                        "<｜end▁of▁sentence｜>",
                                        "<end_of_utterance>",
                                        NULL};
static const char *const EOM_TEXTS[] = {"<|eom_id|>", NULL};
static const char *const FIM_PRE_TEXTS[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",    "<｜fim▁begin｜>",
    "<PRE>",          "▁<PRE>",       "<|code_prefix|>", NULL};
static const char *const FIM_SUF_TEXTS[] = {
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",    "<｜fim▁hole｜>",
    "<SUF>",          "▁<SUF>",       "<|code_suffix|>", NULL};
static const char *const FIM_MID_TEXTS[] = {
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>",    "<｜fim▁end｜>",
    "<MID>",          "▁<MID>",       "<|code_middle|>", NULL};
static const char *const FIM_PAD_TEXTS[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", NULL};
static const char *const FIM_REP_TEXTS[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
                                            "<REPO>",       "<reponame>",    NULL};
static const char *const FIM_SEP_TEXTS[] = {"<|file_sep|>", NULL};
static const char *const EOG_TEXTS[] = {
    "<|eot_id|>",      "<|im_end|>",         "<|end|>",    "<|return|>", "<|call|>",
    "<end_of_turn>",   "<|endoftext|>",      "<|eom_id|>", "<EOT>",      "_<EOT>",
    "<|end_of_text|>", "<end_of_utterance>", NULL};

/* Length of a GGUF string up to its first NUL, if any. */
static size_t cstr_len(gguf_str s)
{
    const char *z = s.len ? memchr(s.ptr, '\0', (size_t)s.len) : NULL;
    return z ? (size_t)(z - s.ptr) : (size_t)s.len;
}

static bool in_list(const char *const *list, const char *s)
{
    for (; *list; list++)
        if (strcmp(*list, s) == 0) return true;
    return false;
}

/* The canonical id of a token (the one its text maps to), so duplicates count once. */
static bool is_canonical(const tok_vocab *v, int32_t id)
{
    return tok_map_get(&v->tok_map, tok_vtext(v, id), v->text_len[id]) == id;
}

/* First token (lowest id) whose text is in list; it becomes a control token. */
static int32_t detect_by_text(tok_vocab *v, const char *const *list)
{
    for (int32_t id = 0; id < v->n_vocab; id++) {
        if (!is_canonical(v, id) || !in_list(list, tok_vtext(v, id))) continue;
        v->attr[id] = TOK_ATTR_CONTROL;
        return id;
    }
    return -1;
}

static int read_id(const gguf_file *f, const char *key, int32_t n_vocab, int32_t *id)
{
    uint32_t x;
    cm_err e = {0};
    int rc = gguf_get_u32(f, key, &x, &e);
    if (rc == -ENOENT) return 0;
    if (rc < 0) {
        CM_LOG_WARN("tokenizer: ignoring %s: %s", key, e.msg);
        return 0;
    }
    if (x >= (uint32_t)n_vocab) {
        CM_LOG_WARN("tokenizer: bad special token %s = %u (n_vocab %d), using %d", key, x, n_vocab,
                    *id);
        return 0;
    }
    *id = (int32_t)x;
    return 0;
}

static int read_bool(const gguf_file *f, const char *key, bool *out, cm_err *err)
{
    bool b;
    int rc = gguf_get_bool(f, key, &b, err);
    if (rc == -ENOENT) return 0;
    if (rc < 0) return rc;
    *out = b;
    return 0;
}

/* Map tokenizer.ggml.pre to our pre-tokenizer (and its flags); -1 if we do not know it. */
static int pre_from_name(gguf_str pre, tok_vocab *v)
{
    static const char *const llama3[] = {"llama3",  "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                         "pixtral", "midm-2.0", "lfm2",      NULL};
    static const char *const llama3_regex[] = {"dbrx", "smaug-bpe", NULL};
    static const char *const gpt2[] = {
        "gpt-2",      "phi-2",           "jina-es", "jina-de", "gigachat", "jina-v2-es",
        "jina-v2-de", "a.x-4.0",         "mellum",  "mpt",     "olmo",     "jais",
        "trillion",   "granite-docling", "exaone4", NULL};
    static const char *const starcoder[] = {"starcoder", "refact", "command-r",  "smollm",
                                            "codeshell", "exaone", "minerva-7b", NULL};
    static const char *const qwen2[] = {"qwen2",  "deepseek-r1-qwen", "kormo",  "stablelm2",
                                        "megrez", "hunyuan",          "grok-2", NULL};
    char name[64];
    if (pre.len >= sizeof(name)) return -1;
    memcpy(name, pre.ptr, (size_t)pre.len);
    name[pre.len] = '\0';
    if (pre.len == 0 || strcmp(name, "default") == 0) return TOK_PRE_DEFAULT;
    if (in_list(llama3, name)) {
        v->ignore_merges = true;
        v->add_bos = true;
        return TOK_PRE_LLAMA3;
    }
    if (in_list(llama3_regex, name)) return TOK_PRE_LLAMA3;
    if (in_list(gpt2, name)) return TOK_PRE_GPT2;
    if (in_list(starcoder, name)) return TOK_PRE_STARCODER;
    if (in_list(qwen2, name)) return TOK_PRE_QWEN2;
    if (strcmp(name, "falcon") == 0) return TOK_PRE_FALCON;
    if (strcmp(name, "gpt2") == 0) {
        /* not a name llama.cpp knows: it falls back to its default pre-tokenizer, so do we */
        CM_LOG_WARN("tokenizer: pre-tokenizer 'gpt2' is not a llama.cpp name, using 'default'");
        return TOK_PRE_DEFAULT;
    }
    return -1;
}

/* The byte-level decoding of a BPE token's text (GPT-2 characters back to bytes). */
static size_t bpe_decode_text(const char *t, size_t n, char *out)
{
    size_t o = 0;
    const uint8_t *s = (const uint8_t *)t;
    for (size_t i = 0; i < n;) {
        int l = tok_utf8_seq_len(s + i, n - i);
        uint32_t cp = 0xFFFD; /* a byte that starts no valid sequence */
        if (l > 0)
            cp = tok_utf8_decode(s + i, n - i, &l);
        else
            l = 1;
        int b = tok_cp_to_byte(cp);
        if (b >= 0) {
            if (out) out[o] = (char)b;
            o++;
        } else {
            /* llama.cpp writes "[UNK_BYTE_0x<hex of the character's UTF-8><token text>]" */
            char tmp[32];
            char u[4];
            int ul = tok_utf8_encode(cp, u);
            int k = snprintf(tmp, sizeof(tmp), "[UNK_BYTE_0x");
            for (int j = 0; j < ul; j++)
                k += snprintf(tmp + k, sizeof(tmp) - (size_t)k, "%02x", (unsigned)(uint8_t)u[j]);
            if (out) memcpy(out + o, tmp, (size_t)k);
            o += (size_t)k;
            if (out) memcpy(out + o, t, n);
            o += n;
            if (out) out[o] = ']';
            o++;
        }
        i += (size_t)l;
    }
    return o;
}

/* The piece of token id with render_special (see tok_piece); out may be NULL to measure. */
static size_t piece_of(const tok_vocab *v, int32_t id, char *out)
{
    const char *t = tok_vtext(v, id);
    size_t n = v->text_len[id];
    int a = v->attr[id];
    if (a == TOK_ATTR_CONTROL || a == TOK_ATTR_UNKNOWN || a == TOK_ATTR_USER_DEFINED) {
        if (out) memcpy(out, t, n);
        return n;
    }
    if (v->type == TOK_TYPE_BPE) return a == TOK_ATTR_NORMAL ? bpe_decode_text(t, n, out) : 0;
    if (a == TOK_ATTR_NORMAL) { /* "▁" -> " " */
        size_t o = 0;
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(t + i, "\xe2\x96\x81", 3) == 0) {
                if (out) out[o] = ' ';
                o++;
                i += 3;
            } else {
                if (out) out[o] = t[i];
                o++;
                i++;
            }
        }
        return o;
    }
    if (a == TOK_ATTR_BYTE) { /* "<0xXX>" */
        unsigned x = 0;
        for (size_t i = 3; i < 5 && i < n; i++) {
            char c = t[i];
            int d = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
            if (d < 0) break;
            x = x * 16 + (unsigned)d;
        }
        if (out) out[0] = (char)x;
        return 1;
    }
    return 0;
}

typedef struct len_id {
    uint32_t len;
    int32_t id;
} len_id;

/* longest text first, then lowest id */
static int cmp_len_id(const void *a, const void *b)
{
    const len_id *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int cmp_occ_pos(const void *a, const void *b)
{
    const occ *x = a, *y = b;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

static int build_special(tok_vocab *v)
{
    v->special = malloc((size_t)v->n_vocab * sizeof(int32_t));
    if (!v->special) return -ENOMEM;
    v->n_special = 0;
    for (int32_t id = 0; id < v->n_vocab; id++) {
        int a = v->attr[id];
        if (a == TOK_ATTR_CONTROL || a == TOK_ATTR_USER_DEFINED || a == TOK_ATTR_UNKNOWN)
            v->special[v->n_special++] = id;
        v->n_user_defined += a == TOK_ATTR_USER_DEFINED;
    }
    len_id *tmp = malloc((size_t)(v->n_special ? v->n_special : 1) * sizeof(*tmp));
    if (!tmp) return -ENOMEM;
    for (int32_t k = 0; k < v->n_special; k++)
        tmp[k] = (len_id){v->text_len[v->special[k]], v->special[k]};
    qsort(tmp, (size_t)v->n_special, sizeof(*tmp), cmp_len_id);
    for (int32_t k = 0; k < v->n_special; k++)
        v->special[k] = tmp[k].id;
    free(tmp);
    /* bucket the positions in special[] by the first byte of the token's text */
    int32_t count[256] = {0};
    for (int32_t k = 0; k < v->n_special; k++)
        count[(uint8_t)tok_vtext(v, v->special[k])[0]]++;
    v->special_first[0] = 0;
    for (int b = 0; b < 256; b++)
        v->special_first[b + 1] = v->special_first[b] + count[b];
    v->special_by_byte = malloc((size_t)(v->n_special ? v->n_special : 1) * sizeof(int32_t));
    if (!v->special_by_byte) return -ENOMEM;
    int32_t fill[256];
    for (int b = 0; b < 256; b++)
        fill[b] = v->special_first[b];
    for (int32_t k = 0; k < v->n_special; k++)
        v->special_by_byte[fill[(uint8_t)tok_vtext(v, v->special[k])[0]]++] = k;
    return 0;
}

static int build_pieces(tok_vocab *v)
{
    size_t total = 0;
    v->piece_off = malloc((size_t)v->n_vocab * sizeof(uint32_t));
    v->piece_len = malloc((size_t)v->n_vocab * sizeof(uint32_t));
    if (!v->piece_off || !v->piece_len) return -ENOMEM;
    for (int32_t id = 0; id < v->n_vocab; id++) {
        size_t n = piece_of(v, id, NULL);
        if (total + n >= UINT32_MAX) return -CM_ELIMIT;
        v->piece_off[id] = (uint32_t)total;
        v->piece_len[id] = (uint32_t)n;
        total += n;
    }
    v->piece = malloc(total ? total : 1);
    if (!v->piece) return -ENOMEM;
    for (int32_t id = 0; id < v->n_vocab; id++)
        piece_of(v, id, v->piece + v->piece_off[id]);
    return 0;
}

static void build_eog(tok_vocab *v, int32_t fim_pad, int32_t fim_rep, int32_t fim_sep)
{
    if (fim_pad >= 0) v->eog[fim_pad] = 1;
    if (fim_rep >= 0) v->eog[fim_rep] = 1;
    if (fim_sep >= 0) v->eog[fim_sep] = 1;
    for (int32_t id = 0; id < v->n_vocab; id++) {
        if (!is_canonical(v, id)) continue;
        const char *t = tok_vtext(v, id);
        if (in_list(EOG_TEXTS, t)) {
            v->eog[id] = 1;
            v->attr[id] = TOK_ATTR_CONTROL;
        } else if (strcmp(t, "</s>") == 0 && v->attr[id] == TOK_ATTR_CONTROL) {
            v->eog[id] = 1;
        }
    }
    /* gpt-oss: these are always rendered (llama.cpp makes them user-defined) */
    static const char *const harmony_ud[] = {"<|channel|>", "<|message|>", "<|start|>",
                                             "<|constrain|>", NULL};
    for (int32_t id = 0; id < v->n_vocab; id++)
        if (is_canonical(v, id) && in_list(harmony_ud, tok_vtext(v, id)))
            v->attr[id] = TOK_ATTR_USER_DEFINED;
    if (v->eos >= 0) v->eog[v->eos] = 1;
    if (v->eot >= 0) v->eog[v->eot] = 1;
    if (v->eom >= 0) v->eog[v->eom] = 1;
    /* o200k_harmony: with <|return|> and <|call|> ending turns, <|end|> does not */
    int32_t ret = -1, call = -1, end = -1;
    for (int32_t id = 0; id < v->n_vocab; id++) {
        if (!v->eog[id]) continue;
        const char *t = tok_vtext(v, id);
        if (strcmp(t, "<|return|>") == 0)
            ret = id;
        else if (strcmp(t, "<|call|>") == 0)
            call = id;
        else if (strcmp(t, "<|end|>") == 0)
            end = id;
    }
    if (ret >= 0 && call >= 0 && end >= 0) {
        v->eog[end] = 0;
        v->attr[end] = TOK_ATTR_USER_DEFINED;
    }
}

tok_vocab *tok_vocab_init(const gguf_file *f, cm_err *err)
{
    tok_vocab *v = calloc(1, sizeof(*v));
    if (!v) {
        cm_err_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    int rc;
    gguf_str model;
    if ((rc = gguf_get_str(f, "tokenizer.ggml.model", &model, err)) < 0) {
        if (rc == -ENOENT) cm_err_set(err, -CM_EFORMAT, "no tokenizer.ggml.model in the file");
        goto fail;
    }
    if (gguf_str_eq(model, "gpt2")) {
        v->type = TOK_TYPE_BPE;
        v->bos = v->eos = 11;
        v->unk = -1;
    } else if (gguf_str_eq(model, "llama")) {
        v->type = TOK_TYPE_SPM;
        v->bos = 1;
        v->eos = 2;
        v->unk = 0;
        v->add_bos = true;
        v->add_space_prefix = true;
    } else {
        cm_err_set(err, -CM_EUNSUPPORTED, "unsupported tokenizer model '%.*s'",
                   (int)CM_MIN(model.len, 64), model.ptr);
        goto fail;
    }
    v->eot = v->eom = -1;

    if (v->type == TOK_TYPE_BPE) {
        gguf_str pre = {"", 0};
        rc = gguf_get_str(f, "tokenizer.ggml.pre", &pre, err);
        if (rc < 0 && rc != -ENOENT) goto fail;
        int p = pre_from_name(pre, v);
        if (p < 0) {
            cm_err_set(err, -CM_EUNSUPPORTED, "unsupported pre-tokenizer '%.*s'",
                       (int)CM_MIN(pre.len, 64), pre.ptr);
            goto fail;
        }
        v->pre = p;
    }
    if ((rc = read_bool(f, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix, err)) < 0)
        goto fail;

    /* tokens, scores, types */
    uint32_t et;
    uint64_t n;
    const void *data;
    const gguf_str *toks;
    if ((rc = gguf_get_arr(f, "tokenizer.ggml.tokens", &et, &n, &data, &toks, err)) < 0) {
        if (rc == -ENOENT) cm_err_set(err, -CM_EFORMAT, "no tokenizer.ggml.tokens in the file");
        goto fail;
    }
    if (et != GGUF_VT_STRING || n == 0 || n > INT32_MAX / 2) {
        cm_err_set(err, -CM_EFORMAT,
                   "tokenizer.ggml.tokens: want a non-empty string array, "
                   "got %s[%" PRIu64 "]",
                   gguf_vtype_name(et), n);
        goto fail;
    }
    v->n_vocab = (int32_t)n;
    v->text_off = malloc(n * sizeof(uint32_t));
    v->text_len = malloc(n * sizeof(uint32_t));
    v->score = calloc(n, sizeof(float));
    v->attr = malloc(n);
    v->eog = calloc(n, 1);
    if (!v->text_off || !v->text_len || !v->score || !v->attr || !v->eog) goto nomem;
    size_t total = 0;
    /* llama.cpp reads token texts as C strings: a NUL ends one (and "" becomes [EMPTY_i]) */
    for (uint64_t i = 0; i < n; i++)
        total += CM_MAX(cstr_len(toks[i]), 24) + 1;
    if (total >= UINT32_MAX) {
        cm_err_set(err, -CM_ELIMIT, "vocabulary text too large (%zu bytes)", total);
        goto fail;
    }
    v->text = malloc(total);
    if (!v->text || tok_map_init(&v->tok_map, n) < 0) goto nomem;
    size_t at = 0;
    for (uint64_t i = 0; i < n; i++) {
        v->text_off[i] = (uint32_t)at;
        size_t tl = cstr_len(toks[i]);
        if (tl == 0) {
            at += (size_t)snprintf(v->text + at, 24, "[EMPTY_%" PRIu64 "]", i);
        } else {
            memcpy(v->text + at, toks[i].ptr, tl);
            at += tl;
        }
        v->text_len[i] = (uint32_t)(at - v->text_off[i]);
        v->text[at++] = '\0';
        if (tok_map_put(&v->tok_map, v->text + v->text_off[i], v->text_len[i], (int32_t)i, true) <
            0)
            goto nomem;
        v->attr[i] = TOK_ATTR_NORMAL;
    }

    const gguf_kv *kv = gguf_find_kv(f, "tokenizer.ggml.scores");
    if (kv) {
        if (kv->type != GGUF_VT_ARRAY || kv->arr_n != n ||
            (kv->arr_type != GGUF_VT_FLOAT32 && kv->arr_type != GGUF_VT_FLOAT64)) {
            cm_err_set(err, -CM_EFORMAT, "tokenizer.ggml.scores: want %" PRIu64 " floats", n);
            goto fail;
        }
        for (uint64_t i = 0; i < n; i++)
            v->score[i] = (float)gguf_arr_f64(kv, i);
    }
    kv = gguf_find_kv(f, "tokenizer.ggml.token_type");
    if (kv) {
        if (kv->type != GGUF_VT_ARRAY || kv->arr_n != n || kv->arr_type == GGUF_VT_STRING ||
            kv->arr_type == GGUF_VT_FLOAT32 || kv->arr_type == GGUF_VT_FLOAT64 ||
            kv->arr_type == GGUF_VT_BOOL) {
            cm_err_set(err, -CM_EFORMAT, "tokenizer.ggml.token_type: want %" PRIu64 " integers", n);
            goto fail;
        }
        for (uint64_t i = 0; i < n; i++) {
            int64_t t = gguf_arr_i64(kv, i);
            v->attr[i] = (t >= TOK_ATTR_NORMAL && t <= TOK_ATTR_BYTE) ? (uint8_t)t : 0;
        }
    }

    if (v->type == TOK_TYPE_BPE) {
        const gguf_str *merges;
        if ((rc = gguf_get_arr(f, "tokenizer.ggml.merges", &et, &n, &data, &merges, err)) < 0) {
            if (rc == -ENOENT) cm_err_set(err, -CM_EFORMAT, "no tokenizer.ggml.merges in the file");
            goto fail;
        }
        if (et != GGUF_VT_STRING) {
            cm_err_set(err, -CM_EFORMAT, "tokenizer.ggml.merges: want strings, got %s",
                       gguf_vtype_name(et));
            goto fail;
        }
        if ((rc = tok_bpe_init(v, merges, n, err)) < 0) goto fail;
    } else {
        for (int b = 0; b < 256; b++) {
            char hex[8];
            snprintf(hex, sizeof(hex), "<0x%02X>", b);
            int32_t id = tok_map_get(&v->tok_map, hex, 6);
            if (id < 0) {
                char c = (char)b;
                id = tok_map_get(&v->tok_map, &c, 1);
            }
            v->spm_byte_tok[b] = id;
        }
    }

    /* special ids, then the add_* flags: metadata overrides the defaults */
    int32_t fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1, fim_sep = -1;
    int32_t sep = -1, pad = -1, mask = -1;
    static const struct {
        const char *key;
        int which;
    } id_keys[] = {
        {"tokenizer.ggml.bos_token_id", 0},      {"tokenizer.ggml.eos_token_id", 1},
        {"tokenizer.ggml.eot_token_id", 2},      {"tokenizer.ggml.eom_token_id", 3},
        {"tokenizer.ggml.unknown_token_id", 4},  {"tokenizer.ggml.seperator_token_id", 5},
        {"tokenizer.ggml.padding_token_id", 6},  {"tokenizer.ggml.mask_token_id", 7},
        {"tokenizer.ggml.fim_pre_token_id", 8},  {"tokenizer.ggml.fim_suf_token_id", 9},
        {"tokenizer.ggml.fim_mid_token_id", 10}, {"tokenizer.ggml.fim_pad_token_id", 11},
        {"tokenizer.ggml.fim_rep_token_id", 12}, {"tokenizer.ggml.fim_sep_token_id", 13},
        {"tokenizer.ggml.prefix_token_id", 8},   {"tokenizer.ggml.suffix_token_id", 9},
        {"tokenizer.ggml.middle_token_id", 10},
    };
    int32_t *slots[] = {&v->bos, &v->eos,  &v->eot,  &v->eom,  &v->unk,  &sep,     &pad,
                        &mask,   &fim_pre, &fim_suf, &fim_mid, &fim_pad, &fim_rep, &fim_sep};
    for (size_t k = 0; k < CM_ARRAY_LEN(id_keys); k++)
        read_id(f, id_keys[k].key, v->n_vocab, slots[id_keys[k].which]);
    if ((rc = read_bool(f, "tokenizer.ggml.add_bos_token", &v->add_bos, err)) < 0 ||
        (rc = read_bool(f, "tokenizer.ggml.add_eos_token", &v->add_eos, err)) < 0)
        goto fail;
    if (v->bos >= v->n_vocab) v->bos = -1; /* a default that this vocabulary does not have */
    if (v->eos >= v->n_vocab) v->eos = -1;
    if (v->unk >= v->n_vocab) v->unk = -1;

    /* markers recognised by their text (when the metadata did not name them) */
    if (v->eot < 0) v->eot = detect_by_text(v, EOT_TEXTS);
    if (v->eom < 0) v->eom = detect_by_text(v, EOM_TEXTS);
    if (fim_pre < 0) fim_pre = detect_by_text(v, FIM_PRE_TEXTS);
    if (fim_suf < 0) fim_suf = detect_by_text(v, FIM_SUF_TEXTS);
    if (fim_mid < 0) fim_mid = detect_by_text(v, FIM_MID_TEXTS);
    if (fim_pad < 0) fim_pad = detect_by_text(v, FIM_PAD_TEXTS);
    if (fim_rep < 0) fim_rep = detect_by_text(v, FIM_REP_TEXTS);
    if (fim_sep < 0) fim_sep = detect_by_text(v, FIM_SEP_TEXTS);
    build_eog(v, fim_pad, fim_rep, fim_sep);

    if (build_special(v) < 0 || (rc = build_pieces(v)) == -ENOMEM) goto nomem;
    if (rc < 0) {
        cm_err_set(err, rc, "token pieces too large");
        goto fail;
    }
    return v;

nomem:
    cm_err_set(err, -ENOMEM, "out of memory loading the vocabulary");
fail:
    tok_vocab_free(v);
    return NULL;
}

void tok_vocab_free(tok_vocab *v)
{
    if (!v) return;
    free(v->text);
    free(v->text_off);
    free(v->text_len);
    free(v->score);
    free(v->attr);
    free(v->eog);
    tok_map_free(&v->tok_map);
    free(v->special);
    free(v->special_by_byte);
    free(v->piece);
    free(v->piece_off);
    free(v->piece_len);
    tok_bpe_free(v);
    free(v);
}

int32_t tok_n_vocab(const tok_vocab *v)
{
    return v->n_vocab;
}
int32_t tok_bos(const tok_vocab *v)
{
    return v->bos;
}
int32_t tok_eos(const tok_vocab *v)
{
    return v->eos;
}
bool tok_add_bos(const tok_vocab *v)
{
    return v->add_bos;
}

bool tok_is_eog(const tok_vocab *v, int32_t id)
{
    return id >= 0 && id < v->n_vocab && v->eog[id];
}

int tok_attr(const tok_vocab *v, int32_t id)
{
    return (id >= 0 && id < v->n_vocab) ? v->attr[id] : 0;
}

const char *tok_text(const tok_vocab *v, int32_t id)
{
    return (id >= 0 && id < v->n_vocab) ? tok_vtext(v, id) : NULL;
}

/* ---- encode -------------------------------------------------------------------------------- */

typedef struct frag {
    size_t off, len;
    int32_t tok; /* -1: raw text */
} frag;

/* Split text into raw fragments and special tokens (llama.cpp's order: each special token,
 * longest first, claims its non-overlapping occurrences, left to right, inside the raw text
 * that longer tokens left). Returns the fragment count or a negative code; *out is malloc'd. */
static int64_t partition(const tok_vocab *v, const char *text, size_t len, bool parse_special,
                         frag **out)
{
    occ *occs = NULL;
    size_t n_occ = 0, cap_occ = 0;
    uint8_t *covered = NULL;
    occ *chosen = NULL;
    size_t n_chosen = 0;
    size_t *count = NULL;
    occ *sorted = NULL;
    int64_t ret = -ENOMEM;
    *out = NULL;

    /* every occurrence of every usable special token, by position */
    bool any = parse_special ? v->n_special > 0 : v->n_user_defined > 0;
    for (size_t p = 0; p < len && any; p++) {
        uint8_t b = (uint8_t)text[p];
        for (int32_t j = v->special_first[b]; j < v->special_first[b + 1]; j++) {
            int32_t k = v->special_by_byte[j];
            int32_t id = v->special[k];
            size_t tl = v->text_len[id];
            if (!parse_special && v->attr[id] != TOK_ATTR_USER_DEFINED) continue;
            if (tl > len - p || memcmp(text + p, tok_vtext(v, id), tl) != 0) continue;
            if (n_occ == cap_occ) {
                size_t nc = cap_occ ? cap_occ * 2 : 64;
                occ *o = realloc(occs, nc * sizeof(*o));
                if (!o) goto out;
                occs = o;
                cap_occ = nc;
            }
            occs[n_occ++] = (occ){p, k};
        }
    }

    if (n_occ) {
        /* group by token (in special[] order), keeping positions ascending */
        count = calloc((size_t)v->n_special + 1, sizeof(*count));
        sorted = malloc(n_occ * sizeof(*sorted));
        covered = calloc(len, 1);
        chosen = malloc(n_occ * sizeof(*chosen));
        if (!count || !sorted || !covered || !chosen) goto out;
        for (size_t i = 0; i < n_occ; i++)
            count[occs[i].k + 1]++;
        for (int32_t k = 0; k < v->n_special; k++)
            count[k + 1] += count[k];
        for (size_t i = 0; i < n_occ; i++)
            sorted[count[occs[i].k]++] = occs[i];
        size_t i = 0;
        while (i < n_occ) {
            int32_t k = sorted[i].k;
            size_t tl = v->text_len[v->special[k]];
            size_t last_end = 0;
            for (; i < n_occ && sorted[i].k == k; i++) {
                size_t p = sorted[i].pos;
                if (p < last_end) continue;
                /* inside raw text? Earlier tokens are at least as long, so an overlap with
                 * one must cover our first or our last byte. */
                if (covered[p] || covered[p + tl - 1]) continue;
                memset(covered + p, 1, tl);
                chosen[n_chosen++] = sorted[i];
                last_end = p + tl;
            }
        }
        /* chosen spans are disjoint: order them by position */
        qsort(chosen, n_chosen, sizeof(*chosen), cmp_occ_pos);
    }

    frag *fr = malloc((2 * n_chosen + 1) * sizeof(*fr));
    if (!fr) goto out;
    size_t nf = 0, at = 0;
    for (size_t c = 0; c < n_chosen; c++) {
        int32_t id = v->special[chosen[c].k];
        if (chosen[c].pos > at) fr[nf++] = (frag){at, chosen[c].pos - at, -1};
        fr[nf++] = (frag){chosen[c].pos, v->text_len[id], id};
        at = chosen[c].pos + v->text_len[id];
    }
    if (at < len) fr[nf++] = (frag){at, len - at, -1};
    *out = fr;
    ret = (int64_t)nf;
out:
    free(occs);
    free(covered);
    free(chosen);
    free(count);
    free(sorted);
    return ret;
}

int64_t tok_encode(const tok_vocab *v, const char *text, size_t len, bool add_bos,
                   bool parse_special, int32_t *out, int64_t cap, cm_err *err)
{
    if (!text && len) return cm_err_set(err, -EINVAL, "tok_encode: NULL text");
    if (cap < 0 || (cap > 0 && !out)) return cm_err_set(err, -EINVAL, "tok_encode: bad output");
    if (len >= UINT32_MAX - 16)
        return cm_err_set(err, -CM_ELIMIT, "text too long to tokenize (%zu bytes)", len);
    int64_t bad = tok_utf8_validate(text, len);
    if (bad < 0)
        return cm_err_set(err, -EILSEQ, "invalid UTF-8 at byte %" PRId64 " (0x%02x)", -bad - 1,
                          (unsigned)(uint8_t)text[-bad - 1]);

    tok_out o = {out, cap, 0};
    frag *fr = NULL;
    int64_t nf = len ? partition(v, text, len, parse_special, &fr) : 0;
    if (nf < 0) return cm_err_set(err, (int)nf, "out of memory while tokenizing");

    int rc = 0;
    if (add_bos && v->add_bos) {
        if (v->bos < 0) {
            free(fr);
            return cm_err_set(err, -CM_EFORMAT, "the vocabulary asks for BOS but has none");
        }
        tok_out_push(&o, v->bos);
    }
    bool prev_special = true; /* SPM: a space goes before the first fragment */
    for (int64_t i = 0; i < nf && rc == 0; i++) {
        if (fr[i].tok >= 0) {
            tok_out_push(&o, fr[i].tok);
            prev_special = true;
            continue;
        }
        if (v->type == TOK_TYPE_BPE) {
            rc = tok_bpe_encode(v, text + fr[i].off, fr[i].len, &o, err);
        } else {
            rc = tok_spm_encode(v, text + fr[i].off, fr[i].len, v->add_space_prefix && prev_special,
                                &o, err);
            prev_special = false;
        }
    }
    free(fr);
    if (rc < 0) return rc;
    if (add_bos && v->add_eos) {
        if (v->eos < 0)
            return cm_err_set(err, -CM_EFORMAT, "the vocabulary asks for EOS but has none");
        tok_out_push(&o, v->eos);
    }
    return o.n;
}

/* ---- decode -------------------------------------------------------------------------------- */

int64_t tok_piece(const tok_vocab *v, int32_t id, bool render_special, char *out, int64_t cap)
{
    if (id < 0 || id >= v->n_vocab) return -EINVAL;
    int a = v->attr[id];
    if (!render_special && (a == TOK_ATTR_CONTROL || a == TOK_ATTR_UNKNOWN)) return 0;
    int64_t n = v->piece_len[id];
    if (out && cap > 0) memcpy(out, v->piece + v->piece_off[id], (size_t)CM_MIN(n, cap));
    return n;
}

int64_t tok_decode(const tok_vocab *v, const int32_t *ids, int64_t n, bool render_special,
                   char *out, int64_t cap)
{
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t room = cap > total ? cap - total : 0;
        int64_t k = tok_piece(v, ids[i], render_special, room ? out + total : NULL, room);
        if (k < 0) return k;
        total += k;
    }
    return total;
}
