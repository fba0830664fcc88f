/*
 * tokenizer.h — the model's tokenizer built from GGUF metadata, and chat templates.
 *
 * Vocabularies: "gpt2" (byte-level BPE with a pre-tokenizer regex chosen by tokenizer.ggml.pre:
 * smollm / gpt2 style, llama3 style, qwen2, ...) and "llama" (SentencePiece-style BPE over
 * scores with byte fallback, Llama-2 / Mistral). Special (control / user-defined) tokens are
 * matched in the text before BPE when parse_special is true. Token ids equal llama.cpp's on
 * the same GGUF.
 *
 * Chat templates: ChatML (SmolLM2, Qwen), Llama-3 and Mistral, chosen from
 * tokenizer.chat_template in the GGUF metadata.
 */
#ifndef TOK_TOKENIZER_H
#define TOK_TOKENIZER_H

#include "../base/cm.h"
#include "../gguf/gguf.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tok_vocab tok_vocab;

enum tok_attr {
    TOK_ATTR_NORMAL = 1,
    TOK_ATTR_UNKNOWN = 2,
    TOK_ATTR_CONTROL = 3,
    TOK_ATTR_USER_DEFINED = 4,
    TOK_ATTR_UNUSED = 5,
    TOK_ATTR_BYTE = 6,
};

/* Build the vocabulary from an open GGUF (copies what it needs; the file may be closed after).
 * Returns NULL and fills err on a missing/invalid tokenizer or an unsupported model/pre type. */
CM_API tok_vocab *tok_vocab_init(const gguf_file *f, cm_err *err);
CM_API void tok_vocab_free(tok_vocab *v);

CM_API int32_t tok_n_vocab(const tok_vocab *v);
CM_API int32_t tok_bos(const tok_vocab *v); /* -1 if none */
CM_API int32_t tok_eos(const tok_vocab *v); /* -1 if none */
CM_API bool tok_add_bos(const tok_vocab *v); /* tokenizer.ggml.add_bos_token (default per type) */
/* true for end-of-generation tokens: eos, eot, and control tokens such as <|im_end|>,
 * <|eot_id|>, <|endoftext|>, </s>. */
CM_API bool tok_is_eog(const tok_vocab *v, int32_t id);
CM_API int tok_attr(const tok_vocab *v, int32_t id);
/* The token's raw vocabulary text (NUL-terminated, owned by v), or NULL if id is out of range. */
CM_API const char *tok_text(const tok_vocab *v, int32_t id);

/* Tokenize len bytes of UTF-8 text. add_bos: prepend BOS if the vocab says so (tok_add_bos);
 * parse_special: recognise special tokens written in the text. Writes up to cap ids to out and
 * returns the total number of tokens (may exceed cap: call again with a bigger buffer), or
 * -EILSEQ for invalid UTF-8 (err says at which byte), or another negative code. */
CM_API int64_t tok_encode(const tok_vocab *v, const char *text, size_t len, bool add_bos,
                          bool parse_special, int32_t *out, int64_t cap, cm_err *err);

/* The bytes a token stands for (byte-level decoding of GPT-2 style vocabularies, "▁"→space and
 * <0xXX> bytes for SentencePiece). Control tokens give their text only if render_special.
 * Writes up to cap bytes (no NUL), returns the total byte count. The bytes of one token may be
 * an incomplete UTF-8 sequence: stream through tok_utf8_complete. */
CM_API int64_t tok_piece(const tok_vocab *v, int32_t id, bool render_special, char *out,
                         int64_t cap);
/* Decode a token sequence into text (concatenated pieces); same return convention. */
CM_API int64_t tok_decode(const tok_vocab *v, const int32_t *ids, int64_t n, bool render_special,
                          char *out, int64_t cap);
/* Length of the longest prefix of buf[0..n) that ends on a UTF-8 character boundary. */
CM_API size_t tok_utf8_complete(const char *buf, size_t n);
/* 0 if buf[0..n) is valid UTF-8, else -(1 + offset of the first bad byte). */
CM_API int64_t tok_utf8_validate(const char *buf, size_t n);

/* ---- chat templates -------------------------------------------------------------------- */

enum tok_chat_kind { TOK_CHAT_CHATML = 1, TOK_CHAT_LLAMA3 = 2, TOK_CHAT_MISTRAL = 3 };

typedef struct tok_chat_msg {
    const char *role;    /* "system", "user", "assistant" */
    const char *content;
} tok_chat_msg;

/* Which template the model's metadata asks for (by its tokenizer.chat_template text);
 * -CM_EUNSUPPORTED if it has none we know. */
CM_API int tok_chat_detect(const gguf_file *f, cm_err *err);
/* Render messages with the template, adding the assistant prefix when add_generation_prompt.
 * For ChatML, the default system message of the model's template is inserted when the
 * template text contains one and the first message is not a system message.
 * Returns a malloc'd NUL-terminated string (caller frees), or NULL with err filled. */
CM_API char *tok_chat_render(const gguf_file *f, int kind, const tok_chat_msg *msgs, int n_msgs,
                             bool add_generation_prompt, cm_err *err);

#ifdef __cplusplus
}
#endif
#endif /* TOK_TOKENIZER_H */
