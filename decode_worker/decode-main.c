/*
 * decode-main.c — ihip-decode-worker: the front door of the service (Generator) on top of the
 * prefill workers and the node's kvstore segment.
 *
 * Start-up order: parse the configuration (one table: flags, IHIP_* environment, the dump
 * printed at start and served in Admin.GetStats), start the gRPC server (health NOT_SERVING,
 * "listening on PORT" on stdout), load the model, create or open the kvstore segment with the
 * model's geometry, start the scheduler, then report SERVING. SIGINT / SIGTERM: NOT_SERVING,
 * every stream ends with UNAVAILABLE (or CANCELLED when the client went away first), leases
 * are released, the segment is kept.
 *
 * This file also serves the cheap unary methods: Generator.Tokenize, Generator.ModelInfo and
 * Admin.GetStats. Generate lives in decode-generate.c.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "decode-impl.h"
#include "infinitehip/v1/admin.pb-c.h"
#include "infinitehip/v1/generator.pb-c.h"
#include "kvstore-kvcache.h"
#include "tensor/tensor.h"

decode_global decode_g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* ---- configuration: one table drives flags, env, the start-up dump and GetStats -------------- */

enum { CFG_STR, CFG_INT, CFG_BOOL };

typedef struct cfg_entry {
    const char *flag; /* "--model"; the env name is IHIP_ + upper(flag without dashes) */
    int type;
    void *ptr;
    const char *def; /* default, as text */
    int64_t lo, hi;  /* bounds (CFG_INT) */
    const char *help;
} cfg_entry;

#define C decode_g.cfg
static cfg_entry cfg_table[] = {
    {"--model", CFG_STR, &C.model, "", 0, 0, "GGUF model file (required)"},
    {"--listen", CFG_STR, &C.listen, "127.0.0.1:0", 0, 0, "listen ADDR:PORT (port 0 = ephemeral)"},
    {"--prefill", CFG_STR, &C.prefill, "", 0, 0,
     "prefill workers ADDR:PORT[,ADDR:PORT...] (health-aware round robin)"},
    {"--kv-name", CFG_STR, &C.kv_name, "ihip", 0, 0, "kvstore segment name"},
    {"--kv-dir", CFG_STR, &C.kv_dir, "/dev/shm", 0, 0, "kvstore segment directory"},
    {"--kv-blocks", CFG_INT, &C.kv_blocks, "4096", 16, 1 << 24,
     "RAM blocks of a segment this worker creates"},
    {"--kv-block-tokens", CFG_INT, &C.kv_tpb, "64", 1, 4096,
     "tokens per block of a segment this worker creates"},
    {"--threads", CFG_INT, &C.threads, "0", 0, 1024, "CPU threads per sequence (0 = all cores)"},
    {"--rpc-threads", CFG_INT, &C.rpc_threads, "2", 1, 64, "gRPC completion-queue threads"},
    {"--attention", CFG_STR, &C.attention, "hip", 0, 0, "dense or hip (default attention)"},
    {"--hip-preset", CFG_STR, &C.hip_preset, "", 0, 0, "HiP refresh preset: 3k, fast, flash"},
    {"--hip-config", CFG_STR, &C.hip_config, "", 0, 0, "HiP JSON configuration (text or file)"},
    {"--max-seqs", CFG_INT, &C.max_seqs, "8", 1, 4096, "sequences admitted at once"},
    {"--max-kv-bytes", CFG_INT, &C.max_kv_bytes, "4294967296", 1, INT64_MAX,
     "KV bytes of the admitted sequences' contexts"},
    {"--max-tokens-limit", CFG_INT, &C.max_tokens_limit, "4096", 1, 1 << 24,
     "largest max_tokens a request may ask for"},
    {"--default-max-tokens", CFG_INT, &C.default_max_tokens, "256", 1, 1 << 24,
     "max_tokens of a request that leaves it 0"},
    {"--max-prompt-tokens", CFG_INT, &C.max_prompt_tokens, "0", 0, 1 << 30,
     "longest prompt in tokens (0 = ctx - 1)"},
    {"--max-upload-bytes", CFG_INT, &C.max_upload_bytes, "268435456", 1, INT64_MAX,
     "GenerateStream: largest uploaded text/chat prompt in bytes"},
    {"--ctx", CFG_INT, &C.ctx, "8192", 16, 1 << 30, "per-sequence context capacity in tokens"},
    {"--retry-delay-ms", CFG_INT, &C.retry_delay_ms, "500", 0, 3600000,
     "retry-delay-ms sent with RESOURCE_EXHAUSTED"},
    {"--health-timeout-ms", CFG_INT, &C.health_timeout_ms, "1000", 10, 60000,
     "timeout of a prefill worker's health Check"},
    {"--grace-ms", CFG_INT, &C.grace_ms, "500", 0, 60000, "shutdown grace for streams"},
    {"--drain-ms", CFG_INT, &C.drain_ms, "0", 0, 3600000,
     "on SIGTERM/SIGINT, refuse new calls and let running streams finish for up to this long "
     "(a second signal stops at once)"},
    {"--prefill-logits", CFG_INT, &C.prefill_logits, "1", 0, 1,
     "1: the first token's logits come from Prefill; 0: decode the last prompt token here"},
    {"--decode-batch", CFG_STR, &C.decode_batch, "exact", 0, 0,
     "exact, fast or off: decode a round's sequences through batched matmuls"},
    {"--kv-retain", CFG_STR, &C.kv_retain, "finished", 0, 0,
     "finished or none: keep finished sequences' K/V in the store as prefixes"},
    {"--kv-retain-max-seqs", CFG_INT, &C.kv_retain_max_seqs, "16", 1, 4096,
     "retained sequences at most"},
    {"--kv-retain-ms", CFG_INT, &C.kv_retain_ms, "600000", 0, INT64_MAX,
     "release a retained sequence after this long unused"},
    {"--device", CFG_STR, &C.device, "cpu", 0, 0,
     "cpu or cuda: decode on the GPU with the prompt's K/V left in the segment (bf16 / fp8 "
     "segment; needs a CUDA build)"},
    {"--gpu", CFG_INT, &C.gpu, "0", 0, 1024, "--device cuda: CUDA device index"},
    {"--gpu-sa-cache-tokens", CFG_INT, &C.gpu_sa_cache_tokens, "32768", -1, INT64_C(1) << 32,
     "--device cuda: GPU K+V page cache per layer in tokens (-1 = none)"},
    {"--gpu-mask-cache-tokens", CFG_INT, &C.gpu_mask_cache_tokens, "65536", -1, INT64_C(1) << 32,
     "--device cuda: GPU keys page cache per layer in tokens (-1 = none)"},
    {"--gpu-probe-cache-tokens", CFG_INT, &C.gpu_probe_cache_tokens, "0", 0, INT64_C(1) << 32,
     "--device cuda: per sequence slot, keep a GPU copy of the keys a full HiP mask refresh "
     "probes first (~5.5 % of K) for up to this many prompt tokens, so a refresh reads less "
     "over the bus (0 = off)"},
    {"--gpu-tail-tokens", CFG_INT, &C.gpu_tail_tokens, "0", 0, INT64_C(1) << 32,
     "--device cuda: GPU ring per sequence and layer for decoded tokens (0 = max-tokens-limit + "
     "2 blocks)"},
    {"--gpu-spill-max-bytes", CFG_INT, &C.gpu_spill_max_bytes, "8589934592", 0, INT64_MAX,
     "--device cuda: pinned host staging for one sequence's blocks that are in the spill tier "
     "(read back with io_uring; 0 = refuse such sequences)"},
    {"--verbose", CFG_BOOL, &C.verbose, "0", 0, 1, "debug logging"},
};
#undef C

static void usage(FILE *o)
{
    fprintf(o,
            "usage: ihip-decode-worker --model MODEL --prefill ADDR[,ADDR...] [options]\n\n"
            "Serves infinitehip.v1.Generator (Generate, Tokenize, ModelInfo), Admin, health and\n"
            "reflection. Every option can also be set by its IHIP_* environment variable\n"
            "(--kv-dir = IHIP_KV_DIR); flags win.\n\n");
    for (size_t i = 0; i < CM_ARRAY_LEN(cfg_table); i++) {
        const cfg_entry *e = &cfg_table[i];
        fprintf(o, "  %-22s %s%s%s%s\n", e->flag, e->help, e->def[0] ? " (default " : "", e->def,
                e->def[0] ? ")" : "");
    }
    fprintf(o, "  %-22s %s\n", "--help", "this text");
}

static void env_name(const char *flag, char *out, size_t n)
{
    size_t k = snprintf(out, n, "IHIP_");
    for (const char *p = flag + 2; *p && k + 1 < n; p++)
        out[k++] = *p == '-' ? '_' : (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p);
    out[k] = 0;
}

static int cfg_set(const cfg_entry *e, const char *v, const char *from)
{
    if (e->type == CFG_STR) {
        *(const char **)e->ptr = v;
        return 0;
    }
    if (e->type == CFG_BOOL) {
        if (!strcmp(v, "1") || !strcmp(v, "true"))
            *(bool *)e->ptr = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !*v)
            *(bool *)e->ptr = false;
        else {
            fprintf(stderr, "ihip-decode-worker: %s expects 0/1, got '%s' (%s)\n", e->flag, v,
                    from);
            return -1;
        }
        return 0;
    }
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < e->lo || x > e->hi) {
        fprintf(stderr,
                "ihip-decode-worker: %s expects an integer in [%" PRId64 ", %" PRId64
                "], got '%s' (%s)\n",
                e->flag, e->lo, e->hi, v, from);
        return -1;
    }
    *(int64_t *)e->ptr = x;
    return 0;
}

static int cfg_parse(int argc, char **argv)
{
    char env[64];
    for (size_t i = 0; i < CM_ARRAY_LEN(cfg_table); i++) {
        const cfg_entry *e = &cfg_table[i];
        if (cfg_set(e, e->def, "default") < 0) return -1;
        env_name(e->flag, env, sizeof(env));
        const char *v = getenv(env);
        if (v && cfg_set(e, v, env) < 0) return -1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        const cfg_entry *e = NULL;
        for (size_t k = 0; k < CM_ARRAY_LEN(cfg_table) && !e; k++)
            if (!strcmp(a, cfg_table[k].flag)) e = &cfg_table[k];
        if (!e) {
            fprintf(stderr, "ihip-decode-worker: unknown option '%s' (see --help)\n", a);
            return -1;
        }
        if (e->type == CFG_BOOL) {
            *(bool *)e->ptr = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "ihip-decode-worker: %s needs a value\n", a);
            return -1;
        }
        if (cfg_set(e, argv[++i], "flag") < 0) return -1;
    }
    return 0;
}

/* The configuration as one JSON object (start-up dump and GetStats.config_json). */
static void cfg_json(char *out, size_t n)
{
    size_t k = (size_t)snprintf(out, n, "{");
    for (size_t i = 0; i < CM_ARRAY_LEN(cfg_table) && k < n; i++) {
        const cfg_entry *e = &cfg_table[i];
        const char *sep = i ? ", " : "";
        if (e->type == CFG_STR) {
            k += (size_t)snprintf(out + k, n - k, "%s\"%s\": \"", sep, e->flag + 2);
            for (const char *p = *(const char **)e->ptr; *p && k + 8 < n; p++) {
                if (*p == '"' || *p == '\\') out[k++] = '\\';
                if ((unsigned char)*p < 0x20) continue;
                out[k++] = *p;
            }
            if (k < n) k += (size_t)snprintf(out + k, n - k, "\"");
        } else if (e->type == CFG_BOOL) {
            k += (size_t)snprintf(out + k, n - k, "%s\"%s\": %s", sep, e->flag + 2,
                                  *(bool *)e->ptr ? "true" : "false");
        } else {
            k += (size_t)snprintf(out + k, n - k, "%s\"%s\": %" PRId64, sep, e->flag + 2,
                                  *(int64_t *)e->ptr);
        }
    }
    if (k < n) snprintf(out + k, n - k, "}");
}

int64_t decode_ctx_bytes(int64_t n_ctx)
{
    const mdl_hparams *hp = &decode_g.model->hp;
    return n_ctx * hp->n_layer * 2 * hp->n_head_kv * hp->head_dim * 2 /* f16 */;
}

/* ---- model + store --------------------------------------------------------------------------- */

static int setup_model_and_store(cm_err *err)
{
    decode_config *c = &decode_g.cfg;
    if (!(decode_g.model = mdl_model_load(c->model, err))) return err->code ? err->code : -EINVAL;
    if (!(decode_g.vocab = tok_vocab_init(mdl_model_gguf(decode_g.model), err)))
        return err->code ? err->code : -EINVAL;
    const mdl_hparams *hp = &decode_g.model->hp;
    if (!c->max_prompt_tokens || c->max_prompt_tokens >= c->ctx) c->max_prompt_tokens = c->ctx - 1;

    /* The same digest of the GGUF file as the prefill workers (kvstore-kvcache.h). */
    uint64_t fp = 0;
    int rc = kvstore_model_fingerprint(c->model, &fp, err);
    if (rc < 0) return rc;
    snprintf(decode_g.fingerprint, sizeof(decode_g.fingerprint), "%016" PRIx64, fp);
    kvstore_geometry g = {0};
    g.model_fingerprint = fp;
    g.n_layers = (uint32_t)hp->n_layer;
    g.n_kv_heads = (uint32_t)hp->n_head_kv;
    g.head_dim = (uint32_t)hp->head_dim;
    g.tokens_per_block = (uint32_t)c->kv_tpb;
    /* --device cuda reads blocks in place: it needs bf16 (the CPU path converts on load). */
    g.dtype = decode_g.gpu_on ? KVSTORE_DTYPE_BF16 : KVSTORE_DTYPE_F16;
    if ((rc = kvstore_geometry_finish(&g, err)) < 0) return rc;
    kvstore_params kp = kvstore_default_params();
    kp.dir = c->kv_dir;
    kp.n_ram_blocks = (uint32_t)c->kv_blocks;
    rc = kvstore_create(c->kv_name, &g, &kp, err);
    if (rc < 0 && rc != -EEXIST) return rc;
    if (rc == 0) CM_LOG_INFO("decode: created kvstore segment %s in %s", c->kv_name, c->kv_dir);
    /* Whoever created it chose tokens per block and pool size: check only what must match. */
    if ((rc = kvstore_open(c->kv_name, &kp, NULL, &decode_g.kv, err)) < 0) return rc;
    const kvstore_geometry *sg = kvstore_get_geometry(decode_g.kv);
    if (sg->n_layers != g.n_layers || sg->n_kv_heads != g.n_kv_heads || sg->head_dim != g.head_dim)
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "kvstore segment %s holds %u layers x %u KV "
                          "heads x %u dims; the model has %u x %u x %u",
                          c->kv_name, sg->n_layers, sg->n_kv_heads, sg->head_dim, g.n_layers,
                          g.n_kv_heads, g.head_dim);
    if (sg->model_fingerprint != fp)
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "kvstore segment %s was made for model "
                          "%016" PRIx64 ", this is %016" PRIx64,
                          c->kv_name, sg->model_fingerprint, fp);
    snprintf(decode_g.kv_path, sizeof(decode_g.kv_path), "%s/ihip-%s", c->kv_dir, c->kv_name);
    decode_g.kv_elem_type = KVSTORE_DTYPE_F16; /* our contexts use CPU_KV_F16 rows */
    return 0;
}

static int setup_attention(cm_err *err)
{
    decode_config *c = &decode_g.cfg;
    if (!strcmp(c->attention, "hip"))
        decode_g.hip_on = true;
    else if (strcmp(c->attention, "dense"))
        return cm_err_set(err, -EINVAL, "--attention must be dense or hip, got '%s'", c->attention);
    hip_config_default(&decode_g.hip_default);
    if (c->hip_preset[0] && hip_config_preset(&decode_g.hip_default, c->hip_preset, err) < 0)
        return -EINVAL;
    if (c->hip_config[0]) {
        if (hip_config_parse(&decode_g.hip_default, c->hip_config, err) < 0) return -EINVAL;
        /* Forward JSON text to the prefill workers (a file is read here). */
        const char *p = c->hip_config;
        while (*p == ' ' || *p == '\n' || *p == '\t')
            p++;
        if (*p == '{') {
            decode_g.hip_config_text = strdup(c->hip_config);
        } else {
            FILE *f = fopen(c->hip_config, "rb");
            if (!f) return cm_err_set(err, -errno, "--hip-config %s: cannot open", c->hip_config);
            char *buf = calloc(1, 1 << 20);
            size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
            fclose(f);
            if (!buf) return cm_err_set(err, -ENOMEM, "out of memory");
            buf[n] = 0;
            decode_g.hip_config_text = buf;
        }
    }
    return hip_config_validate(&decode_g.hip_default, (int)decode_g.model->hp.n_layer, err) < 0
               ? -EINVAL
               : 0;
}

/* --decode-batch and --kv-retain */
static int setup_engine_options(cm_err *err)
{
    decode_config *c = &decode_g.cfg;
    if (!strcmp(c->decode_batch, "exact"))
        decode_g.batch_mode = DECODE_BATCH_EXACT;
    else if (!strcmp(c->decode_batch, "fast"))
        decode_g.batch_mode = DECODE_BATCH_FAST;
    else if (!strcmp(c->decode_batch, "off"))
        decode_g.batch_mode = DECODE_BATCH_OFF;
    else
        return cm_err_set(err, -EINVAL, "--decode-batch must be exact, fast or off, got '%s'",
                          c->decode_batch);
    if (!strcmp(c->kv_retain, "finished"))
        decode_g.retain_on = true;
    else if (!strcmp(c->kv_retain, "none"))
        decode_g.retain_on = false;
    else
        return cm_err_set(err, -EINVAL, "--kv-retain must be finished or none, got '%s'",
                          c->kv_retain);
    if (!strcmp(c->device, "cuda")) {
#ifndef IHIP_HAVE_CUDA
        return cm_err_set(err, -EOPNOTSUPP,
                          "--device cuda: this ihip-decode-worker was built without CUDA "
                          "(configure with -DIHIP_CUDA=ON on a machine with nvcc)");
#endif
        decode_g.gpu_on = true;
        if (decode_g.retain_on)
            CM_LOG_INFO("decode: --kv-retain finished is not supported with --device cuda yet "
                        "(the decoded K/V lives on the GPU); finished sequences are released");
        decode_g.retain_on = false;
    } else if (strcmp(c->device, "cpu")) {
        return cm_err_set(err, -EINVAL, "--device must be cpu or cuda, got '%s'", c->device);
    }
    return 0;
}

static int parse_prefill_list(cm_err *err)
{
    const char *s = decode_g.cfg.prefill;
    while (*s) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (n) {
            if (decode_g.n_prefill == DECODE_MAX_PREFILL)
                return cm_err_set(err, -EINVAL, "--prefill: at most %d workers",
                                  DECODE_MAX_PREFILL);
            char *a = malloc(n + 1);
            if (!a) return cm_err_set(err, -ENOMEM, "out of memory");
            memcpy(a, s, n);
            a[n] = 0;
            decode_g.prefill_addr[decode_g.n_prefill++] = a;
        }
        s += n + (e ? 1 : 0);
    }
    if (!decode_g.n_prefill)
        return cm_err_set(err, -EINVAL, "--prefill: give at least one prefill worker ADDR:PORT");
    return 0;
}

/* ---- unary methods --------------------------------------------------------------------------- */

static bool check_ready(rpc_call *c)
{
    pthread_mutex_lock(&decode_g.mu);
    bool ok = decode_g.ready && !decode_g.stopping && !decode_g.draining;
    pthread_mutex_unlock(&decode_g.mu);
    if (!ok) rpc_call_fail(c, -ESHUTDOWN, "the decode worker is not serving (loading or draining)");
    return ok;
}

static void on_tokenize(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    if (!check_ready(c)) return;
    const Infinitehip__V1__TokenizeRequest *r = (const Infinitehip__V1__TokenizeRequest *)msg;
    const tok_vocab *v = decode_g.vocab;
    rpc_arena *a = rpc_call_arena(c);
    cm_err e = {0};
    Infinitehip__V1__TokenizeResponse resp = INFINITEHIP__V1__TOKENIZE_RESPONSE__INIT;
    const char *text;
    char *rendered = NULL;
    bool special = false;
    bool add_bos = r->opt_add_bos_case ? r->add_bos : tok_add_bos(v);
    if (r->input_case == INFINITEHIP__V1__TOKENIZE_REQUEST__INPUT_TEXT) {
        text = r->text;
    } else if (r->input_case == INFINITEHIP__V1__TOKENIZE_REQUEST__INPUT_CHAT) {
        const Infinitehip__V1__ChatMessages *cm = r->chat;
        if (!cm->n_messages || cm->n_messages > 4096) {
            rpc_call_fail(c, -EINVAL, "chat must have 1..4096 messages");
            return;
        }
        int kind = tok_chat_detect(mdl_model_gguf(decode_g.model), &e);
        if (kind < 0) {
            rpc_call_fail(c, kind, "chat: %s", e.msg);
            return;
        }
        tok_chat_msg *msgs = rpc_arena_alloc(a, cm->n_messages * sizeof(*msgs));
        if (!msgs) goto oom;
        for (size_t i = 0; i < cm->n_messages; i++)
            msgs[i] = (tok_chat_msg){cm->messages[i]->role, cm->messages[i]->content};
        bool gen = cm->opt_add_generation_prompt_case ? cm->add_generation_prompt : true;
        rendered = tok_chat_render(mdl_model_gguf(decode_g.model), kind, msgs, (int)cm->n_messages,
                                   gen, &e);
        if (!rendered) {
            rpc_call_fail(c, -EINVAL, "chat: %s", e.msg);
            return;
        }
        text = resp.rendered = rpc_arena_strdup(a, rendered);
        free(rendered);
        if (!text) goto oom;
        special = true;
        if (add_bos && tok_bos(v) >= 0) {
            const char *bt = tok_text(v, tok_bos(v));
            if (bt && !strncmp(text, bt, strlen(bt))) add_bos = false;
        }
    } else {
        rpc_call_fail(c, -EINVAL, "TokenizeRequest.input is not set");
        return;
    }
    size_t len = strlen(text);
    int64_t cap = (int64_t)len + 2;
    resp.ids = rpc_arena_alloc(a, (size_t)cap * sizeof(int32_t));
    if (!resp.ids) goto oom;
    int64_t n = tok_encode(v, text, len, add_bos, special, resp.ids, cap, &e);
    if (n < 0 || n > cap) {
        rpc_call_fail(c, n < 0 ? (int)n : -EINVAL, "tokenize: %s", e.msg);
        return;
    }
    resp.n_ids = (size_t)n;
    if (r->with_pieces) {
        resp.pieces = rpc_arena_alloc(a, (size_t)(n + 1) * sizeof(ProtobufCBinaryData));
        if (!resp.pieces) goto oom;
        for (int64_t i = 0; i < n; i++) {
            char buf[512];
            int64_t pl = tok_piece(v, resp.ids[i], true, buf, sizeof(buf));
            if (pl > (int64_t)sizeof(buf)) pl = sizeof(buf);
            if (pl < 0) pl = 0;
            uint8_t *d = rpc_arena_alloc(a, (size_t)pl + 1);
            if (!d) goto oom;
            memcpy(d, buf, (size_t)pl);
            resp.pieces[i].data = d;
            resp.pieces[i].len = (size_t)pl;
        }
        resp.n_pieces = (size_t)n;
    }
    rpc_call_reply(c, &resp.base);
    return;
oom:
    rpc_call_fail(c, -ENOMEM, "out of memory");
}

static void on_model_info(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    if (!check_ready(c)) return;
    static char *presets[] = {"dense", "3k", "fast", "flash"};
    const mdl_model *m = decode_g.model;
    const tok_vocab *v = decode_g.vocab;
    rpc_arena *a = rpc_call_arena(c);
    Infinitehip__V1__ModelInfoResponse r = INFINITEHIP__V1__MODEL_INFO_RESPONSE__INIT;
    const gguf_file *f = mdl_model_gguf(m);
    gguf_str s;
    cm_err e = {0};
    char name[256];
    if (gguf_get_str(f, "general.name", &s, &e) == 0)
        snprintf(name, sizeof(name), "%.*s", (int)(s.len < 255 ? s.len : 255), s.ptr);
    else {
        const char *b = strrchr(decode_g.cfg.model, '/');
        snprintf(name, sizeof(name), "%s", b ? b + 1 : decode_g.cfg.model);
    }
    r.model_name = rpc_arena_strdup(a, name);
    r.architecture = (char *)(uintptr_t)m->hp.arch;
    r.fingerprint = decode_g.fingerprint;
    r.n_vocab = (uint32_t)m->hp.n_vocab;
    r.n_layer = (uint32_t)m->hp.n_layer;
    r.n_head = (uint32_t)m->hp.n_head;
    r.n_head_kv = (uint32_t)m->hp.n_head_kv;
    r.head_dim = (uint32_t)m->hp.head_dim;
    r.n_embd = (uint32_t)m->hp.n_embd;
    r.trained_context = (uint64_t)m->hp.n_ctx_train;
    r.max_prompt_tokens = (uint64_t)decode_g.cfg.max_prompt_tokens;
    r.max_new_tokens = (uint32_t)decode_g.cfg.max_tokens_limit;
    r.default_max_tokens = (uint32_t)decode_g.cfg.default_max_tokens;
    r.bos_id = tok_bos(v);
    int32_t *eog = rpc_arena_alloc(a, 64 * sizeof(int32_t));
    if (eog)
        for (int32_t id = 0; id < tok_n_vocab(v) && r.n_eog_ids < 64; id++)
            if (tok_is_eog(v, id)) eog[r.n_eog_ids++] = id;
    r.eog_ids = eog;
    r.add_bos_default = tok_add_bos(v);
    if (gguf_get_str(f, "tokenizer.chat_template", &s, &e) == 0) {
        char *t = rpc_arena_alloc(a, s.len + 1);
        if (t) {
            memcpy(t, s.ptr, s.len);
            t[s.len] = 0;
            /* proto3 strings must be UTF-8: a malformed template is left out */
            if (tok_utf8_validate(t, s.len) >= 0) r.chat_template = t;
        }
    }
    const gguf_tensor *t = gguf_find_tensor(f, "blk.0.attn_q.weight");
    r.quantization = (char *)(uintptr_t)(t ? tn_type_name((int)t->type) : "unknown");
    r.n_attention_presets = CM_ARRAY_LEN(presets);
    r.attention_presets = presets;
    r.default_attention_preset =
        (char *)(uintptr_t)(!decode_g.hip_on             ? "dense"
                            : decode_g.cfg.hip_preset[0] ? decode_g.cfg.hip_preset
                                                         : "fast");
    r.backend = (char *)(uintptr_t)(decode_g.gpu_on ? "cuda" : "cpu");
    r.version = (char *)(uintptr_t)DECODE_VERSION;
    r.max_message_bytes = 4 << 20;
    rpc_call_reply(c, &r.base);
}

static void on_get_stats(rpc_call *c, const ProtobufCMessage *msg, void *user)
{
    const Infinitehip__V1__StatsRequest *req = (const Infinitehip__V1__StatsRequest *)msg;
    rpc_server_stats st;
    rpc_server_stats_get(decode_g.server, &st);
    kvstore_stats ks;
    memset(&ks, 0, sizeof(ks));
    cm_err e = {0};
    if (decode_g.kv) kvstore_get_stats(decode_g.kv, &ks, &e);
    int active = decode_sched_active();
    decode_retain_stats rs;
    decode_retain_get_stats(&rs);
    decode_gpu_stats gs;
    decode_gpu_get_stats(&gs);
    pthread_mutex_lock(&decode_g.mu);
    struct {
        const char *name;
        double v;
        bool counter;
        const char *help;
    } m[] = {
        {"decode.kv_bytes_reserved", (double)decode_g.kv_bytes, false,
         "context bytes reserved by admitted sequences"},
        {"decode.rounds", (double)decode_g.n_rounds, true, "scheduler rounds"},
        {"decode.batched_steps", (double)decode_g.n_batched_steps, true,
         "decode steps computed in batches of 2 or more sequences"},
        {"decode.kv_retained", (double)rs.n_retained, false,
         "finished sequences whose K/V this worker keeps in the store"},
        {"decode.kv_retain_published", (double)rs.n_published, true,
         "finished sequences written back (prompt + generated blocks)"},
        {"decode.kv_retain_prompt_only", (double)rs.n_reused_prompt, true,
         "finished sequences retained as their prompt (no new full block)"},
        {"decode.kv_retain_tokens_written", (double)rs.tokens_written, true,
         "tokens whose K/V was written back (generated + the prompt's partial last block)"},
        {"decode.kv_retain_write_us", (double)rs.write_us, true,
         "microseconds the scheduler spent writing finished sequences back"},
        {"decode.kv_retain_released_pressure", (double)rs.n_released_pressure, true,
         "retained sequences released to make room for a prompt"},
        {"decode.kv_retain_released_ttl", (double)rs.n_released_ttl, true,
         "retained sequences released after --kv-retain-ms unused"},
        {"decode.kv_retain_released_cap", (double)rs.n_released_cap, true,
         "retained sequences released over --kv-retain-max-seqs"},
        {"decode.kv_retain_released_superseded", (double)rs.n_released_superseded, true,
         "retained sequences released because a longer one extends them"},
        {"decode.kv_retain_failed", (double)rs.n_failed, true, "write-backs that failed"},
        {"decode.sequences_active", active, false, "sequences decoding in the scheduler"},
        {"decode.sequences_admitted", decode_g.n_admitted, false,
         "sequences admitted (prefilling or decoding)"},
        {"decode.sequences_cancelled", (double)decode_g.n_cancelled, true,
         "sequences dropped because their call was cancelled"},
        {"decode.sequences_completed", (double)decode_g.n_completed, true, "finished with OK"},
        {"decode.sequences_failed", (double)decode_g.n_failed, true, "ended with an error"},
        {"decode.sequences_prefilling", decode_g.n_threads_live, false, "in their prefill phase"},
        {"decode.sequences_rejected", (double)decode_g.n_rejected, true,
         "refused with RESOURCE_EXHAUSTED"},
        {"decode.prefill_unavailable", (double)decode_g.n_prefill_unavailable, true,
         "requests failed: no prefill worker reachable"},
        {"decode.tokens_generated", (double)decode_g.n_tokens, true, "tokens sampled"},
        {"kv.leases", ks.leases, false, "leases in the kvstore segment (all processes)"},
        {"kv.seqs_ready", ks.seqs_ready, false, "READY sequences in the segment"},
        {"rpc.calls_active", (double)st.calls_active, false, "calls not yet freed"},
        {"rpc.calls_cancelled", (double)st.calls_cancelled, true, "calls cancelled"},
        {"rpc.calls_started", (double)st.calls_started, true, "calls delivered to handlers"},
        {"gpu.kv_bytes", (double)gs.kv_bytes, false, "GPU memory of the KV (ring + caches)"},
        {"gpu.model_bytes", (double)gs.model_bytes, false, "GPU memory of the weights"},
        {"gpu.sequences_bound", (double)gs.binds, true,
         "prefilled sequences bound to a GPU slot (blocks read in place)"},
        {"gpu.tokens_bound", (double)gs.tokens_bound, true, "prompt tokens of those"},
        {"gpu.decode_steps", (double)gs.decode_steps, true, "batched GPU decode calls"},
        {"gpu.tokens_decoded", (double)gs.tokens_decoded, true, "sequence steps of those"},
        {"gpu.decode_failures", (double)gs.failures, true, "GPU decode calls that failed"},
        {"gpu.sa_cache_hit_rate", gs.sa_needed ? (double)gs.sa_hits / (double)gs.sa_needed : 0,
         false, "K+V page cache: pages found on the GPU / pages a refresh needed"},
        {"gpu.sa_cache_needed", (double)gs.sa_needed, true, "K+V page cache: pages needed"},
        {"gpu.sa_cache_installs", (double)gs.sa_installs, true, "K+V page cache: pages copied in"},
        {"gpu.sa_cache_overflow", (double)gs.sa_overflow, true,
         "K+V page cache: needed pages that did not fit (read over the bus)"},
        {"gpu.mask_cache_hit_rate", gs.mk_needed ? (double)gs.mk_hits / (double)gs.mk_needed : 0,
         false, "keys page cache: pages found on the GPU / pages a refresh needed"},
        {"gpu.mask_cache_needed", (double)gs.mk_needed, true, "keys page cache: pages needed"},
        {"gpu.mask_cache_installs", (double)gs.mk_installs, true,
         "keys page cache: pages copied in"},
        {"gpu.mask_cache_overflow", (double)gs.mk_overflow, true,
         "keys page cache: needed pages that did not fit (read over the bus)"},
        {"gpu.refresh_full", (double)gs.refresh[0], true,
         "decode layer-steps that ran a full HiP mask refresh (every key over the bus)"},
        {"gpu.refresh_stage1", (double)gs.refresh[1], true,
         "decode layer-steps refreshed from the stage-1 cache"},
        {"gpu.refresh_stage2", (double)gs.refresh[2], true,
         "decode layer-steps refreshed from the stage-2 cache"},
        {"gpu.refresh_reuse", (double)gs.refresh[3], true,
         "decode layer-steps that reused the mask (attention only)"},
        {"gpu.step_ms_full", gs.steps[0] ? gs.step_ms[0] / (double)gs.steps[0] : 0.0, false,
         "mean time of a decode step that ran a full HiP mask refresh (the costliest: reads "
         "every chunk's probes over the bus)"},
        {"gpu.step_ms_stage1", gs.steps[1] ? gs.step_ms[1] / (double)gs.steps[1] : 0.0, false,
         "mean time of a decode step refreshed from the stage-1 cache"},
        {"gpu.step_ms_stage2", gs.steps[2] ? gs.step_ms[2] / (double)gs.steps[2] : 0.0, false,
         "mean time of a decode step refreshed from the stage-2 cache"},
        {"gpu.step_ms_reuse", gs.steps[3] ? gs.step_ms[3] / (double)gs.steps[3] : 0.0, false,
         "mean time of a decode step that reused every mask"},
        {"gpu.kv_moved", (double)gs.kv_moved, true,
         "sequences failed (RESOURCE_EXHAUSTED) because a block the GPU read in place was "
         "moved to the spill tier meanwhile"},
        {"gpu.spill_blocks", (double)gs.spill_blocks, true,
         "spilled prompt blocks read back into pinned staging for the GPU"},
        {"gpu.bytes_h2d", (double)gs.bytes_h2d, true,
         "bytes copied host to GPU into the page caches"},
        {"gpu.bytes_h2d_per_token",
         gs.tokens_decoded ? (double)gs.bytes_h2d / (double)gs.tokens_decoded : 0, false,
         "cache bytes copied host to GPU per decoded token"},
    };
    pthread_mutex_unlock(&decode_g.mu);
    Infinitehip__V1__Metric met[CM_ARRAY_LEN(m)], *metp[CM_ARRAY_LEN(m)];
    Infinitehip__V1__StatsResponse r = INFINITEHIP__V1__STATS_RESPONSE__INIT;
    r.metrics = metp;
    for (size_t i = 0; i < CM_ARRAY_LEN(m); i++) {
        if (strncmp(m[i].name, req->prefix, strlen(req->prefix))) continue;
        if (!decode_g.gpu_on && !strncmp(m[i].name, "gpu.", 4)) continue; /* --device cuda */
        infinitehip__v1__metric__init(&met[r.n_metrics]);
        met[r.n_metrics].name = (char *)(uintptr_t)m[i].name;
        met[r.n_metrics].value = m[i].v;
        met[r.n_metrics].counter = m[i].counter;
        met[r.n_metrics].help = (char *)(uintptr_t)m[i].help;
        metp[r.n_metrics] = &met[r.n_metrics];
        r.n_metrics++;
    }
    char *cfg = rpc_arena_alloc(rpc_call_arena(c), 4096);
    if (cfg) cfg_json(cfg, 4096);
    r.worker = (char *)(uintptr_t) "decode";
    r.version = (char *)(uintptr_t)DECODE_VERSION;
    r.uptime_ms = (cm_time_ns() - decode_g.t_start) / 1000000;
    r.config_json = cfg ? cfg : (char *)(uintptr_t) "{}";
    rpc_call_reply(c, &r.base);
}

/* ---- main ------------------------------------------------------------------------------------ */

static void set_health(bool serving)
{
    rpc_health_set(decode_g.server, "", serving);
    rpc_health_set(decode_g.server, "infinitehip.v1.Generator", serving);
    rpc_health_set(decode_g.server, "infinitehip.v1.Admin", serving);
}

int main(int argc, char **argv)
{
    decode_g.t_start = cm_time_ns();
    if (cfg_parse(argc, argv) < 0) return 2;
    if (decode_g.cfg.verbose) cm_log_level = CM_LOG_LEVEL_DEBUG;
    if (!decode_g.cfg.model[0]) {
        fprintf(stderr, "ihip-decode-worker: --model is required (see --help)\n");
        return 2;
    }
    cm_err err = {0};
    if (parse_prefill_list(&err) < 0) {
        fprintf(stderr, "ihip-decode-worker: %s\n", err.msg);
        return 2;
    }
    char cfg[4096];
    cfg_json(cfg, sizeof(cfg));
    fprintf(stderr, "ihip-decode-worker %s: config %s\n", DECODE_VERSION, cfg);

    /* Signals go to sigwait below: block them before any thread starts. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    const rpc_method methods[] = {
        {"/infinitehip.v1.Generator/Generate", RPC_KIND_SERVER_STREAM,
         &infinitehip__v1__generate_request__descriptor, decode_on_generate,
         decode_on_generate_cancel, NULL},
        {"/infinitehip.v1.Generator/GenerateStream", RPC_KIND_BIDI,
         &infinitehip__v1__generate_stream_request__descriptor, decode_on_generate_stream,
         decode_on_generate_cancel, NULL},
        {"/infinitehip.v1.Generator/Tokenize", RPC_KIND_UNARY,
         &infinitehip__v1__tokenize_request__descriptor, on_tokenize, NULL, NULL},
        {"/infinitehip.v1.Generator/ModelInfo", RPC_KIND_UNARY,
         &infinitehip__v1__model_info_request__descriptor, on_model_info, NULL, NULL},
        {"/infinitehip.v1.Admin/GetStats", RPC_KIND_UNARY,
         &infinitehip__v1__stats_request__descriptor, on_get_stats, NULL, NULL},
    };
    rpc_server_params p = rpc_server_default_params();
    p.addr = decode_g.cfg.listen;
    p.n_threads = (int)decode_g.cfg.rpc_threads;
    p.default_retry_delay_ms = decode_g.cfg.retry_delay_ms;
    int rc = rpc_server_start(&decode_g.server, &p, methods, (int)CM_ARRAY_LEN(methods), &err);
    if (rc < 0) {
        fprintf(stderr, "ihip-decode-worker: %s\n", err.msg);
        return 1;
    }
    printf("listening on %d\n", rpc_server_port(decode_g.server));
    fflush(stdout);

    int ret = 0;
    uint64_t t0 = cm_time_ns();
    if ((rc = setup_engine_options(&err)) < 0 || (rc = setup_model_and_store(&err)) < 0 ||
        (rc = setup_attention(&err)) < 0 || (decode_g.gpu_on && (rc = decode_gpu_init(&err)) < 0) ||
        (rc = decode_sched_start(&err)) < 0) {
        fprintf(stderr, "ihip-decode-worker: %s\n", err.msg);
        ret = 1;
        goto out;
    }
    CM_LOG_INFO("decode: model %s (%s, %" PRId64 " layers, fingerprint %s) loaded in %.2f s; "
                "kvstore %s; %d prefill worker(s); %s attention",
                decode_g.cfg.model, decode_g.model->hp.arch, decode_g.model->hp.n_layer,
                decode_g.fingerprint, (double)(cm_time_ns() - t0) / 1e9, decode_g.kv_path,
                decode_g.n_prefill, decode_g.hip_on ? "hip" : "dense");
    pthread_mutex_lock(&decode_g.mu);
    decode_g.ready = true;
    pthread_mutex_unlock(&decode_g.mu);
    set_health(true);

    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0) continue;
        if (sig == SIGINT || sig == SIGTERM) break;
    }
    if (decode_g.cfg.drain_ms > 0) {
        /* Drain: health NOT_SERVING and new calls refused, running ones go on until they end or
         * the time is up; a second signal ends the wait. */
        pthread_mutex_lock(&decode_g.mu);
        decode_g.draining = true;
        int left = decode_g.n_admitted;
        pthread_mutex_unlock(&decode_g.mu);
        set_health(false);
        CM_LOG_INFO("decode: draining %d sequence(s) for up to %" PRId64 " ms", left,
                    decode_g.cfg.drain_ms);
        uint64_t end = cm_time_ns() + (uint64_t)decode_g.cfg.drain_ms * 1000000u;
        struct timespec tick = {0, 50 * 1000 * 1000};
        while (left > 0 && cm_time_ns() < end) {
            int got = sigtimedwait(&set, NULL, &tick);
            if (got == SIGINT || got == SIGTERM) {
                CM_LOG_INFO("decode: second signal, stopping now");
                break;
            }
            pthread_mutex_lock(&decode_g.mu);
            left = decode_g.n_admitted;
            pthread_mutex_unlock(&decode_g.mu);
        }
        CM_LOG_INFO("decode: drain ended with %d sequence(s) left", left);
    }
    CM_LOG_INFO("decode: shutting down");
out:
    set_health(false);
    /* Streams end with UNAVAILABLE from the scheduler and the prefill threads; the scheduler
     * exits once every sequence is gone (leases released). */
    decode_sched_stop();
    if (decode_g.kv) decode_retain_clear();
    rpc_server_shutdown(decode_g.server, decode_g.cfg.grace_ms);
    rpc_server_free(decode_g.server);
    if (decode_g.gpu_on) decode_gpu_free(); /* every slot released; unregisters the segment */
    kvstore_close(decode_g.kv);
    tok_vocab_free(decode_g.vocab);
    mdl_model_free(decode_g.model);
    free(decode_g.hip_config_text);
    for (int i = 0; i < decode_g.n_prefill; i++)
        free(decode_g.prefill_addr[i]);
    CM_LOG_INFO("decode: bye (%" PRIu64 " completed, %" PRIu64 " cancelled, %" PRIu64 " failed)",
                decode_g.n_completed, decode_g.n_cancelled, decode_g.n_failed);
    return ret;
}
