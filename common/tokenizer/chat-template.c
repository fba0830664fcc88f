/*
 * chat-template.c — chat templates: ChatML (SmolLM2, Qwen), Llama-3 and Mistral.
 *
 * We do not run Jinja. tokenizer.chat_template is only inspected to pick the family (by its
 * markers) and, for ChatML, to find the default system message some models insert when the
 * conversation does not start with one (SmolLM2: "You are a helpful AI assistant named SmolLM,
 * trained by Hugging Face"). Renderings equal what Jinja2 produces for the real templates, with
 * one deliberate difference: a template's leading bos_token is left out, because the tokenizer
 * adds BOS itself (tok_encode with add_bos) and it would otherwise be there twice.
 *
 *   ChatML   <|im_start|>{role}\n{content}<|im_end|>\n ...   prompt: <|im_start|>assistant\n
 *   Llama-3  <|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|> ...
 *            prompt: <|start_header_id|>assistant<|end_header_id|>\n\n
 *   Mistral  [INST] {content} [/INST]{answer}</s>[INST] ...  (Mistral-7B-Instruct style; a
 *            system message is put before the next user message, followed by a blank line;
 *            there is no separate generation prompt: the text ends with [/INST])
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer-impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1)
            nc *= 2;
        char *q = realloc(b->p, nc);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q;
        b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_str(sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

static const char *find_in(gguf_str hay, const char *needle, size_t from)
{
    size_t nl = strlen(needle);
    for (size_t i = from; i + nl <= hay.len; i++)
        if (memcmp(hay.ptr + i, needle, nl) == 0) return hay.ptr + i;
    return NULL;
}

int tok_chat_detect(const gguf_file *f, cm_err *err)
{
    gguf_str t;
    int rc = gguf_get_str(f, "tokenizer.chat_template", &t, err);
    if (rc == -ENOENT)
        return cm_err_set(err, -CM_EUNSUPPORTED, "the model has no tokenizer.chat_template");
    if (rc < 0) return rc;
    if (find_in(t, "<|im_start|>", 0)) return TOK_CHAT_CHATML;
    if (find_in(t, "<|start_header_id|>", 0)) return TOK_CHAT_LLAMA3;
    if (find_in(t, "[INST]", 0)) return TOK_CHAT_MISTRAL;
    return cm_err_set(err, -CM_EUNSUPPORTED,
                      "unknown chat template (%zu bytes): no ChatML, "
                      "Llama-3 or Mistral markers",
                      (size_t)t.len);
}

/* The default system message of a ChatML template: the text between "<|im_start|>system\n" and
 * "<|im_end|>" inside one Jinja string literal. Returns a malloc'd string, or NULL if none. */
static char *chatml_default_system(gguf_str t, bool *oom)
{
    static const char MARK[] = "<|im_start|>system";
    size_t from = 0;
    const char *p;
    while ((p = find_in(t, MARK, from)) != NULL) {
        size_t at = (size_t)(p - t.ptr);
        from = at + 1;
        if (at == 0 || (t.ptr[at - 1] != '\'' && t.ptr[at - 1] != '"')) continue;
        char q = t.ptr[at - 1];
        /* decode the literal up to its closing quote */
        sbuf lit = {0};
        size_t i = at;
        bool closed = false;
        for (; i < t.len; i++) {
            char c = t.ptr[i];
            if (c == q) {
                closed = true;
                break;
            }
            if (c == '\\' && i + 1 < t.len) {
                char e = t.ptr[++i];
                char d = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
                sb_add(&lit, &d, 1);
            } else {
                sb_add(&lit, &c, 1);
            }
        }
        if (lit.oom) {
            *oom = true;
            free(lit.p);
            return NULL;
        }
        const char *body = lit.p ? lit.p + strlen(MARK) : NULL;
        const char *end = body ? strstr(body, "<|im_end|>") : NULL;
        if (closed && body && body[0] == '\n' && end) {
            size_t n = (size_t)(end - body - 1);
            memmove(lit.p, body + 1, n);
            lit.p[n] = '\0';
            return lit.p;
        }
        free(lit.p);
    }
    return NULL;
}

/* Python's str.strip(): what Jinja's trim filter removes (Unicode white space incl.
 * U+001C..U+001F). */
static bool py_isspace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

static void sb_trimmed(sbuf *b, const char *s)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t n = strlen(s), lo = 0, hi = n;
    while (lo < n) {
        int l;
        uint32_t c = tok_utf8_decode(u + lo, n - lo, &l);
        if (!py_isspace(c)) break;
        lo += (size_t)l;
    }
    while (hi > lo) {
        size_t k = hi - 1; /* start of the last character */
        while (k > lo && (u[k] & 0xC0) == 0x80)
            k--;
        int l;
        uint32_t c = tok_utf8_decode(u + k, hi - k, &l);
        if (!py_isspace(c)) break;
        hi = k;
    }
    sb_add(b, s + lo, hi - lo);
}

char *tok_chat_render(const gguf_file *f, int kind, const tok_chat_msg *msgs, int n_msgs,
                      bool add_generation_prompt, cm_err *err)
{
    if (n_msgs < 0 || (n_msgs > 0 && !msgs)) {
        cm_err_set(err, -EINVAL, "tok_chat_render: bad message list");
        return NULL;
    }
    for (int i = 0; i < n_msgs; i++) {
        if (!msgs[i].role || !msgs[i].content) {
            cm_err_set(err, -EINVAL, "tok_chat_render: message %d has no role or content", i);
            return NULL;
        }
        if (tok_utf8_validate(msgs[i].content, strlen(msgs[i].content)) < 0 ||
            tok_utf8_validate(msgs[i].role, strlen(msgs[i].role)) < 0) {
            cm_err_set(err, -EILSEQ, "tok_chat_render: message %d is not valid UTF-8", i);
            return NULL;
        }
    }
    sbuf b = {0};
    sb_add(&b, "", 0); /* an empty conversation renders as "" */
    switch (kind) {
    case TOK_CHAT_CHATML: {
        gguf_str t;
        char *sys = NULL;
        bool oom = false;
        if (gguf_get_str(f, "tokenizer.chat_template", &t, NULL) == 0)
            sys = chatml_default_system(t, &oom);
        if (oom) b.oom = true;
        if (sys && n_msgs > 0 && strcmp(msgs[0].role, "system") != 0) {
            sb_str(&b, "<|im_start|>system\n");
            sb_str(&b, sys);
            sb_str(&b, "<|im_end|>\n");
        }
        free(sys);
        for (int i = 0; i < n_msgs; i++) {
            sb_str(&b, "<|im_start|>");
            sb_str(&b, msgs[i].role);
            sb_str(&b, "\n");
            sb_str(&b, msgs[i].content);
            sb_str(&b, "<|im_end|>\n");
        }
        if (add_generation_prompt) sb_str(&b, "<|im_start|>assistant\n");
        break;
    }
    case TOK_CHAT_LLAMA3:
        for (int i = 0; i < n_msgs; i++) {
            sb_str(&b, "<|start_header_id|>");
            sb_str(&b, msgs[i].role);
            sb_str(&b, "<|end_header_id|>\n\n");
            sb_trimmed(&b, msgs[i].content);
            sb_str(&b, "<|eot_id|>");
        }
        if (add_generation_prompt) sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case TOK_CHAT_MISTRAL: {
        const char *sys = NULL;
        for (int i = 0; i < n_msgs; i++) {
            const char *role = msgs[i].role;
            if (strcmp(role, "system") == 0) {
                sys = msgs[i].content;
            } else if (strcmp(role, "user") == 0) {
                sb_str(&b, "[INST] ");
                if (sys) {
                    sb_str(&b, sys);
                    sb_str(&b, "\n\n");
                    sys = NULL;
                }
                sb_str(&b, msgs[i].content);
                sb_str(&b, " [/INST]");
            } else {
                sb_str(&b, msgs[i].content);
                sb_str(&b, "</s>");
            }
        }
        break;
    }
    default:
        free(b.p);
        cm_err_set(err, -EINVAL, "tok_chat_render: unknown template kind %d", kind);
        return NULL;
    }
    if (b.oom) {
        free(b.p);
        cm_err_set(err, -ENOMEM, "out of memory rendering the chat");
        return NULL;
    }
    return b.p;
}
