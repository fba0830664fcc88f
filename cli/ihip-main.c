/*
 * ihip-main.c — the `ihip` command line: generate (stream a completion from a GGUF model on the
 * CPU), info (metadata and tensors), tokenize. Every bad input ends in one clear message on
 * stderr and exit status 1 (2 for usage errors); nothing here may crash on user input.
 */
#define _POSIX_C_SOURCE 200809L
#include "base/cm.h"
#include "gguf/gguf.h"
#include "hip/hip.h"
#include "model/model.h"
#include "sampling/sampling.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define IHIP_VERSION "0.1.0"

static void usage(FILE *o)
{
    fprintf(o,
            "usage: ihip <command> [options]\n"
            "\n"
            "commands:\n"
            "  generate   stream a completion of a prompt (in this process)\n"
            "  chat       stream an answer from a running decode worker over gRPC\n"
            "  info       print a model's metadata and tensors\n"
            "  tokenize   print the token ids of a text\n"
            "  version    print the version\n"
            "\n"
            "ihip generate -m MODEL (-p PROMPT | -f FILE) [options]\n"
            "  -m, --model PATH       GGUF model file\n"
            "      --device D         cpu (default) or cuda (GPU 0; needs a CUDA build)\n"
            "      --synthetic SHAPE  with --device cuda, instead of -m: random weights (from --seed) of\n"
            "                         shape llama3-8b, llama3-1b, smollm2-135m or tiny, and --tokens N\n"
            "                         random prompt ids (default 512); prints token ids\n"
            "  -p, --prompt TEXT      prompt text\n"
            "  -f, --file PATH        read the prompt from a file ('-' = stdin)\n"
            "      --chat             treat the prompt as a user message; apply the model's chat template\n"
            "      --system TEXT      system message for --chat (default: the template's own)\n"
            "  -n, --n-predict N      tokens to generate, ≥ 1 (default 256)\n"
            "      --temp T           temperature, 0 = greedy (default 0.8)\n"
            "      --top-k K          keep the K most likely tokens, 0 = off (default 40)\n"
            "      --top-p P          nucleus sampling mass in (0, 1] (default 0.95)\n"
            "      --min-p P          drop tokens below P × the top probability, [0, 1) (default 0.05)\n"
            "      --repeat-penalty R penalty ≥ 1 for recent tokens (default 1 = off)\n"
            "      --seed S           sampling seed (default 12648430)\n"
            "      --ctx N            context size in tokens (default: the model's trained length)\n"
            "  -t, --threads N        CPU threads (default: all cores)\n"
            "      --chunk N          prefill chunk size in tokens (default 512)\n"
            "      --kv-type T        KV cache element type: f16 (default) or f32\n"
            "      --no-bos           do not add the BOS token\n"
            "      --ignore-eos       keep generating after an end-of-generation token\n"
            "      --quiet            no progress or timings on stderr\n"
            "      --attention A      dense (default) or hip (InfiniteHiP sparse attention)\n"
            "      --hip-preset NAME  HiP refresh preset: 3k, fast (default), flash\n"
            "      --hip-config JSON  HiP configuration: a JSON object or a file holding one\n"
            "                         (keys of shared/HIP.md §1; applied after the preset)\n"
            "\n"
            "ihip chat --addr HOST:PORT (-p PROMPT | -f FILE) [--raw] [-n N] [--temp T] [--top-k K]\n"
            "          [--top-p P] [--min-p P] [--seed S] [--timeout-ms MS] [--system TEXT]\n"
            "                  the prompt is a user message (chat template on the worker) unless --raw\n"
            "ihip health --addr HOST:PORT [--timeout-ms MS]   wait until the worker is SERVING\n"
            "ihip info -m MODEL [--json] [--no-tensors]\n"
            "ihip mask-quality -m MODEL -f FILE [--tokens N] [--hip-preset P] [--hip-config J]\n"
            "                  [--json]: share of the exact attention mass inside HiP's key set,\n"
            "                  per layer, for the last 64 queries of an N-token text (default 8192)\n"
            "ihip tokenize -m MODEL (-p TEXT | -f FILE) [--no-bos] [--special]\n");
}

int die(const char *fmt, ...) CM_PRINTF(1, 2);
int die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ihip: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

/* ---- strict argument parsing --------------------------------------------------------------- */

static int parse_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) {
        die("%s expects an integer, got '%s'", flag, s);
        return -1;
    }
    if (v < lo || v > hi) {
        die("%s must be in [%lld, %lld], got %lld", flag, (long long)lo, (long long)hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_f(const char *flag, const char *s, float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v)) {
        die("%s expects a finite number, got '%s'", flag, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        die("cannot open prompt file '%s': %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap) break;
        char *nb = realloc(buf, cap * 2 + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    bool err = ferror(f);
    if (f != stdin) fclose(f);
    if (!buf || err) {
        free(buf);
        die("cannot read prompt file '%s'", path);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}


#define NEED_ARG()                                                                                 \
    do {                                                                                           \
        if (i + 1 >= argc) return die("option %s needs a value", a), -1;                           \
    } while (0)

int cli_parse_opts(int argc, char **argv, struct opts *o);
int cli_parse_opts(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof(*o));
    o->n_predict = 256;
    o->kv_type = CPU_KV_F16;
    o->sp = smp_default_params();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int64_t v;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            NEED_ARG();
            o->model = argv[++i];
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            NEED_ARG();
            o->prompt = argv[++i];
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            NEED_ARG();
            o->file = argv[++i];
        } else if (!strcmp(a, "--system")) {
            NEED_ARG();
            o->system = argv[++i];
        } else if (!strcmp(a, "--chat")) {
            o->chat = true;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 1, INT32_MAX, &o->n_predict)) return -1;
        } else if (!strcmp(a, "--temp")) {
            NEED_ARG();
            if (parse_f(a, argv[++i], &o->sp.temperature)) return -1;
            o->sp_set[0] = true;
        } else if (!strcmp(a, "--top-k")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 0, INT32_MAX, &v)) return -1;
            o->sp.top_k = (int32_t)v;
            o->sp_set[1] = true;
        } else if (!strcmp(a, "--top-p")) {
            NEED_ARG();
            if (parse_f(a, argv[++i], &o->sp.top_p)) return -1;
            o->sp_set[2] = true;
        } else if (!strcmp(a, "--min-p")) {
            NEED_ARG();
            if (parse_f(a, argv[++i], &o->sp.min_p)) return -1;
            o->sp_set[3] = true;
        } else if (!strcmp(a, "--repeat-penalty")) {
            NEED_ARG();
            if (parse_f(a, argv[++i], &o->sp.repeat_penalty)) return -1;
        } else if (!strcmp(a, "--seed")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 0, INT64_MAX, &v)) return -1;
            o->sp.seed = (uint64_t)v;
            o->sp_set[4] = true;
        } else if (!strcmp(a, "--ctx")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 1, (int64_t)1 << 32, &o->n_ctx)) return -1;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 1, 1024, &o->threads)) return -1;
        } else if (!strcmp(a, "--chunk")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 1, 1 << 20, &o->chunk)) return -1;
        } else if (!strcmp(a, "--kv-type")) {
            NEED_ARG();
            const char *t = argv[++i];
            if (!strcmp(t, "f16")) o->kv_type = CPU_KV_F16;
            else if (!strcmp(t, "f32")) o->kv_type = CPU_KV_F32;
            else return die("--kv-type must be f16 or f32, got '%s'", t), -1;
        } else if (!strcmp(a, "--attention")) {
            NEED_ARG();
            const char *t = argv[++i];
            if (!strcmp(t, "dense")) o->hip = false;
            else if (!strcmp(t, "hip")) o->hip = true;
            else return die("--attention must be dense or hip, got '%s'", t), -1;
        } else if (!strcmp(a, "--device")) {
            NEED_ARG();
            const char *t = argv[++i];
            if (!strcmp(t, "cpu")) o->cuda = false;
            else if (!strcmp(t, "cuda")) o->cuda = true;
            else return die("--device must be cpu or cuda, got '%s'", t), -1;
        } else if (!strcmp(a, "--synthetic")) {
            NEED_ARG();
            o->synthetic = argv[++i];
        } else if (!strcmp(a, "--hip-preset")) {
            NEED_ARG();
            o->hip_preset = argv[++i];
        } else if (!strcmp(a, "--hip-config")) {
            NEED_ARG();
            o->hip_config = argv[++i];
        } else if (!strcmp(a, "--tokens")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 128, (int64_t)1 << 24, &o->tokens)) return -1;
        } else if (!strcmp(a, "--addr")) {
            NEED_ARG();
            o->addr = argv[++i];
        } else if (!strcmp(a, "--timeout-ms")) {
            NEED_ARG();
            if (parse_i64(a, argv[++i], 0, (int64_t)1 << 40, &o->timeout_ms)) return -1;
        } else if (!strcmp(a, "--raw")) {
            o->raw = true;
        } else if (!strcmp(a, "--no-bos")) {
            o->no_bos = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            o->ignore_eos = true;
        } else if (!strcmp(a, "--quiet")) {
            o->quiet = true;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--no-tensors")) {
            o->no_tensors = true;
        } else if (!strcmp(a, "--special")) {
            o->special = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else {
            die("unknown option '%s' (see ihip --help)", a);
            return -1;
        }
    }
    bool remote = !strcmp(argv[1], "chat") || !strcmp(argv[1], "health");
    if (o->synthetic && !o->cuda) return die("--synthetic needs --device cuda"), -1;
    if (o->synthetic && o->model) return die("give either -m MODEL or --synthetic SHAPE, not both"), -1;
    if (o->synthetic && (o->prompt || o->file || o->chat))
        return die("--synthetic has no tokenizer: its prompt is --tokens N random ids, not -p/-f/--chat"), -1;
    if (!o->model && !remote && !o->synthetic) return die("missing -m MODEL"), -1;
    if (remote && !o->addr) return die("missing --addr HOST:PORT"), -1;
    if ((o->hip_preset || o->hip_config) && !o->hip && strcmp(argv[1], "mask-quality") != 0)
        return die("--hip-preset and --hip-config need --attention hip"), -1;
    return 0;
}

/* The HiP configuration the options ask for: defaults, then the preset, then the JSON. */
int cli_hip_config(const struct opts *o, hip_config *hc, cm_err *err)
{
    hip_config_default(hc);
    if (o->hip_preset && hip_config_preset(hc, o->hip_preset, err) < 0) return err->code;
    if (o->hip_config && hip_config_parse(hc, o->hip_config, err) < 0) return err->code;
    return 0;
}

/* Prompt text from -p or -f; validated as UTF-8. Caller frees. */
char *cli_get_prompt(const struct opts *o, size_t *len);
char *cli_get_prompt(const struct opts *o, size_t *len)
{
    if (o->prompt && o->file) return die("give either -p or -f, not both"), NULL;
    char *text;
    if (o->prompt) {
        *len = strlen(o->prompt);
        text = malloc(*len + 1);
        if (!text) return die("out of memory"), NULL;
        memcpy(text, o->prompt, *len + 1);
    } else if (o->file) {
        text = read_file(o->file, len);
        if (!text) return NULL;
    } else {
        return die("missing prompt: give -p TEXT or -f FILE"), NULL;
    }
    int64_t bad = tok_utf8_validate(text, *len);
    if (bad < 0) {
        die("the prompt is not valid UTF-8 (bad byte at offset %lld)", (long long)(-bad - 1));
        free(text);
        return NULL;
    }
    if (*len == 0) {
        die("the prompt is empty");
        free(text);
        return NULL;
    }
    return text;
}

int32_t *cli_tokenize_all(const tok_vocab *v, const char *text, size_t len, bool bos,
                          bool special, int64_t *n_out);
int32_t *cli_tokenize_all(const tok_vocab *v, const char *text, size_t len, bool bos,
                             bool special, int64_t *n_out)
{
    cm_err err = {0};
    int64_t cap = (int64_t)len + 16;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    if (!ids) return die("out of memory"), NULL;
    int64_t n = tok_encode(v, text, len, bos, special, ids, cap, &err);
    if (n > cap) {
        int32_t *nb = realloc(ids, sizeof(int32_t) * (size_t)n);
        if (!nb) return free(ids), die("out of memory"), NULL;
        ids = nb;
        n = tok_encode(v, text, len, bos, special, ids, n, &err);
    }
    if (n < 0) {
        die("tokenizing the prompt: %s", err.msg);
        free(ids);
        return NULL;
    }
    *n_out = n;
    return ids;
}

/* ---- commands ------------------------------------------------------------------------------- */

static int cmd_info(int argc, char **argv)
{
    struct opts o;
    if (cli_parse_opts(argc, argv, &o)) return 2;
    cm_err err = {0};
    gguf_file *f = gguf_open(o.model, &err);
    if (!f) return die("%s", err.msg);
    int rc = gguf_print_info(f, stdout, o.json, !o.no_tensors);
    gguf_close(f);
    return rc < 0 ? 1 : 0;
}

static int cmd_tokenize(int argc, char **argv)
{
    struct opts o;
    if (cli_parse_opts(argc, argv, &o)) return 2;
    size_t len;
    char *text = cli_get_prompt(&o, &len);
    if (!text) return 1;
    cm_err err = {0};
    gguf_file *f = gguf_open(o.model, &err);
    if (!f) return free(text), die("%s", err.msg);
    tok_vocab *v = tok_vocab_init(f, &err);
    gguf_close(f);
    if (!v) return free(text), die("%s", err.msg);
    int64_t n;
    int32_t *ids = cli_tokenize_all(v, text, len, !o.no_bos && tok_add_bos(v), o.special, &n);
    free(text);
    if (!ids) return tok_vocab_free(v), 1;
    for (int64_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    printf("\n");
    free(ids);
    tok_vocab_free(v);
    return 0;
}

struct progress_state {
    bool quiet;
    uint64_t t0;
};

static int on_progress(void *user, int64_t done, int64_t total)
{
    struct progress_state *ps = user;
    if (!ps->quiet && total >= 1024) {
        double s = (double)(cm_time_ns() - ps->t0) / 1e9;
        fprintf(stderr, "\rprefill: %lld / %lld tokens (%.0f%%, %.1f tok/s)", (long long)done,
                (long long)total, 100.0 * (double)done / (double)total, (double)done / (s > 0 ? s : 1e-9));
        if (done == total) fputc('\n', stderr);
    }
    return 0;
}

static int cmd_generate(int argc, char **argv)
{
    struct opts o;
    if (cli_parse_opts(argc, argv, &o)) return 2;
    cm_err err = {0};
    if (smp_params_validate(&o.sp, &err) < 0) return die("%s", err.msg);
    if (o.synthetic) return cli_generate_cuda(&o, NULL, NULL, NULL, 0);
    size_t len;
    char *text = cli_get_prompt(&o, &len);
    if (!text) return 1;

    int ret = 1;
    mdl_model *m = NULL;
    tok_vocab *v = NULL;
    mdl_ctx *c = NULL;
    smp_sampler *smp = NULL;
    int32_t *ids = NULL;
    char *rendered = NULL;

    uint64_t t_load = cm_time_ns();
    m = mdl_model_load(o.model, &err);
    if (!m) {
        die("%s", err.msg);
        goto out;
    }
    v = tok_vocab_init(mdl_model_gguf(m), &err);
    if (!v) {
        die("%s: %s", o.model, err.msg);
        goto out;
    }

    const char *ptext = text;
    size_t plen = len;
    bool special = false;
    if (o.chat) {
        int kind = tok_chat_detect(mdl_model_gguf(m), &err);
        if (kind < 0) {
            die("--chat: %s", err.msg);
            goto out;
        }
        tok_chat_msg msgs[2];
        int nm = 0;
        if (o.system) msgs[nm++] = (tok_chat_msg){.role = "system", .content = o.system};
        msgs[nm++] = (tok_chat_msg){.role = "user", .content = text};
        rendered = tok_chat_render(mdl_model_gguf(m), kind, msgs, nm, true, &err);
        if (!rendered) {
            die("--chat: %s", err.msg);
            goto out;
        }
        ptext = rendered;
        plen = strlen(rendered);
        special = true;
    }
    bool add_bos = !o.no_bos && tok_add_bos(v);
    if (add_bos && special && tok_bos(v) >= 0) {
        /* a template that already starts with the BOS token's text does not get a second one */
        const char *bt = tok_text(v, tok_bos(v));
        if (bt && strncmp(ptext, bt, strlen(bt)) == 0) add_bos = false;
    }
    int64_t n_prompt;
    ids = cli_tokenize_all(v, ptext, plen, add_bos, special, &n_prompt);
    if (!ids) goto out;
    if (n_prompt == 0) {
        die("the prompt has no tokens");
        goto out;
    }

    if (o.cuda) {
        ret = cli_generate_cuda(&o, m, v, ids, n_prompt);
        goto out;
    }
    mdl_ctx_params cp = mdl_ctx_default_params();
    cp.n_ctx = o.n_ctx;
    cp.n_threads = (int)o.threads;
    cp.kv_type = o.kv_type;
    cp.n_chunk = o.chunk;
    int64_t n_ctx = cp.n_ctx > 0 ? cp.n_ctx : m->hp.n_ctx_train;
    if (n_prompt >= n_ctx) {
        die("the prompt has %lld tokens, which does not fit the context of %lld tokens "
            "(raise --ctx)", (long long)n_prompt, (long long)n_ctx);
        goto out;
    }
    c = mdl_ctx_init(m, &cp, &err);
    if (!c) {
        die("%s", err.msg);
        goto out;
    }
    if (o.hip) {
        hip_config hc;
        mdl_attn attn;
        if (cli_hip_config(&o, &hc, &err) < 0 || hip_attn_provider_init(&attn, m, &hc, &err) < 0) {
            die("HiP attention: %s", err.msg);
            goto out;
        }
        mdl_ctx_set_attn(c, &attn);
    }
    smp = smp_init(&o.sp, m->hp.n_vocab);
    int32_t *hist = realloc(ids, sizeof(int32_t) * (size_t)(n_prompt + o.n_predict));
    if (!smp || !hist) {
        die("out of memory");
        goto out;
    }
    ids = hist;
    t_load = cm_time_ns() - t_load;
    if (!o.quiet)
        fprintf(stderr, "ihip: %s (%s, %lld layers), %lld prompt tokens, ctx %lld, %d threads, %s, "
                "%s attention\n",
                o.model, m->hp.arch, (long long)m->hp.n_layer, (long long)n_prompt,
                (long long)c->params.n_ctx, cm_pool_size(c->pool), tn_simd_name(tn_simd_level()),
                c->attn.name);

    struct progress_state ps = {.quiet = o.quiet, .t0 = cm_time_ns()};
    uint64_t t0 = cm_time_ns();
    if (mdl_prefill(c, ids, n_prompt, NULL, on_progress, &ps, &err) < 0) {
        die("prefill: %s", err.msg);
        goto out;
    }
    uint64_t t_prefill = cm_time_ns() - t0;

    char pend[64];
    size_t npend = 0;
    int64_t n_gen = 0;
    const char *finish = "length";
    uint64_t t1 = cm_time_ns();
    int64_t n_hist = n_prompt;
    for (;;) {
        int32_t tok = smp_sample(smp, mdl_ctx_logits(c), ids, n_hist);
        ids[n_hist++] = tok;
        n_gen++;
        if (!o.ignore_eos && tok_is_eog(v, tok)) {
            finish = "stop";
            break;
        }
        char piece[256];
        int64_t pl = tok_piece(v, tok, false, piece, sizeof(piece));
        if (pl > (int64_t)sizeof(piece)) pl = sizeof(piece);
        for (int64_t i = 0; i < pl; i++) {
            if (npend == sizeof(pend)) { /* not UTF-8 after all: flush as is */
                fwrite(pend, 1, npend, stdout);
                npend = 0;
            }
            pend[npend++] = piece[i];
        }
        size_t ok = tok_utf8_complete(pend, npend);
        if (ok) {
            fwrite(pend, 1, ok, stdout);
            memmove(pend, pend + ok, npend - ok);
            npend -= ok;
            fflush(stdout);
        }
        if (n_gen >= o.n_predict) break;
        if (c->n_past + 1 > c->params.n_ctx) {
            finish = "context";
            break;
        }
        if (mdl_decode(c, tok, NULL, &err) < 0) {
            die("decode: %s", err.msg);
            goto out;
        }
    }
    if (npend) fwrite(pend, 1, npend, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    uint64_t t_decode = cm_time_ns() - t1;
    if (!o.quiet) {
        double ps_ = (double)t_prefill / 1e9, ds = (double)t_decode / 1e9;
        fprintf(stderr,
                "ihip: load %.2f s | prefill %lld tokens in %.2f s (%.1f tok/s) | "
                "decode %lld tokens in %.2f s (%.1f tok/s) | finish: %s\n",
                (double)t_load / 1e9, (long long)n_prompt, ps_, (double)n_prompt / (ps_ > 0 ? ps_ : 1e-9),
                (long long)n_gen, ds, (double)(n_gen > 1 ? n_gen - 1 : 0) / (ds > 0 ? ds : 1e-9),
                finish);
    }
    ret = 0;
out:
    free(rendered);
    free(ids);
    free(text);
    smp_free(smp);
    mdl_ctx_free(c);
    tok_vocab_free(v);
    mdl_model_free(m);
    return ret;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "info")) return cmd_info(argc, argv);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc, argv);
    if (!strcmp(cmd, "mask-quality")) return cmd_mask_quality(argc, argv);
    if (!strcmp(cmd, "chat")) return cmd_chat(argc, argv);
    if (!strcmp(cmd, "health")) return cmd_health(argc, argv);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("ihip %s (simd: %s)\n", IHIP_VERSION, tn_simd_name(tn_simd_level()));
        return 0;
    }
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    die("unknown command '%s' (see ihip --help)", cmd);
    return 2;
}
