/*
 * cli.h — what the subcommands of `ihip` share: options, prompt reading, tokenizing, errors.
 */
#ifndef CLI_H
#define CLI_H

#include "base/cm.h"
#include "hip/hip.h"
#include "sampling/sampling.h"
#include "tokenizer/tokenizer.h"

struct opts {
    const char *model, *prompt, *file, *system;
    bool chat, no_bos, ignore_eos, quiet, json, no_tensors, special;
    int64_t n_predict, n_ctx, threads, chunk;
    int kv_type;
    bool hip;
    const char *hip_preset, *hip_config;
    bool cuda;             /* generate: --device cuda */
    const char *synthetic; /* generate --device cuda: synthetic model shape (no -m) */
    int64_t tokens;
    const char *addr;   /* chat: the decode worker */
    int64_t timeout_ms; /* chat: call deadline (0 = none) */
    bool raw;           /* chat: send the prompt as raw text, no chat template */
    bool sp_set[5];     /* chat: which of temp, top-k, top-p, min-p, seed were given */
    smp_params sp;
};

/* Parse argv[2..] into o; prints the problem and returns -1 on bad input. */
int cli_parse_opts(int argc, char **argv, struct opts *o);
/* The prompt of -p / -f, validated as non-empty UTF-8; caller frees. NULL after an error. */
char *cli_get_prompt(const struct opts *o, size_t *len);
/* Tokenize all of text; caller frees. NULL after an error. */
int32_t *cli_tokenize_all(const tok_vocab *v, const char *text, size_t len, bool bos, bool special,
                          int64_t *n_out);
/* The HiP configuration of the options (defaults, preset, JSON). */
int cli_hip_config(const struct opts *o, hip_config *hc, cm_err *err);
/* "ihip: error: ..." on stderr; returns 1. */
int die(const char *fmt, ...) CM_PRINTF(1, 2);

/* generate --device cuda (ihip-gen-cuda.c): the model m (NULL with --synthetic), its vocabulary
 * (NULL: print token ids) and the prompt ids; returns the exit status. */
int cli_generate_cuda(const struct opts *o, const mdl_model *m, const tok_vocab *v,
                      const int32_t *prompt, int64_t n_prompt);
int cmd_mask_quality(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_health(int argc, char **argv);

#endif /* CLI_H */
