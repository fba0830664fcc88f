/*
 * prefill-main.c — ihip-prefill-worker: configuration, start-up, signals and shutdown.
 *
 * Start-up order: the gRPC server starts first (health NOT_SERVING, Prefill answers
 * UNAVAILABLE) and prints "listening on PORT" on stdout, so callers can connect and watch
 * health while the model loads; then the model is loaded and fingerprinted, the kvstore segment
 * opened (or created with --kv-create, geometry from the model), one context per concurrent
 * prefill made (an mdl_ctx, or with --device cuda the model uploaded to the GPU once and a paged
 * cuda_ctx per slot: prefill-cuda.c), and only then health turns SERVING.
 *
 * Configuration: one declarative table drives the flags, the IHIP_* environment variables
 * (flag name upper-cased, '-' → '_', e.g. --max-prompt-tokens = IHIP_MAX_PROMPT_TOKENS;
 * flags win) and the dump printed at start.
 *
 * Shutdown on SIGINT / SIGTERM: health NOT_SERVING, running prefills are cancelled after their
 * current chunk (status UNAVAILABLE, WRITING sequences aborted), hand-over leases released, the
 * server stopped, the store closed. Exit 0.
 */
#define _POSIX_C_SOURCE 200809L

#include "prefill-impl.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { CFG_STR, CFG_LONG, CFG_BOOL };

typedef struct cfg_entry {
    const char *name; /* flag without "--" */
    int type;
    void *ptr;
    const char *def; /* default as text (NULL: none) */
    long min, max;   /* CFG_LONG bounds */
    const char *help;
} cfg_entry;

static prefill_worker g_w;

#define W (&g_w.cfg)
static const cfg_entry k_cfg[] = {
    {"model", CFG_STR, &W->model, NULL, 0, 0, "GGUF model file (required)"},
    {"listen", CFG_STR, &W->listen, "127.0.0.1:0", 0, 0, "ADDR:PORT to serve on (port 0: any)"},
    {"kv-name", CFG_STR, &W->kv_name, "ihip", 0, 0, "KV store segment name"},
    {"kv-dir", CFG_STR, &W->kv_dir, "/dev/shm", 0, 0, "KV store segment directory"},
    {"kv-create", CFG_BOOL, &W->kv_create, "0", 0, 1,
     "create the segment (geometry from the model) when it does not exist"},
    {"kv-blocks", CFG_LONG, &W->kv_blocks, "2048", 1, 1L << 24, "(--kv-create) RAM blocks"},
    {"kv-block-tokens", CFG_LONG, &W->kv_block_tokens, "64", 1, 65536,
     "(--kv-create) tokens per block"},
    {"kv-max-seqs", CFG_LONG, &W->kv_max_seqs, "256", 1, 1 << 20,
     "(--kv-create) sequence table size"},
    {"threads", CFG_LONG, &W->threads, "0", 0, 1024, "CPU threads per context (0: all CPUs)"},
    {"rpc-threads", CFG_LONG, &W->rpc_threads, "2", 1, 64, "RPC threads"},
    {"ctx", CFG_LONG, &W->ctx, "0", 0, 1L << 30,
     "KV capacity of a context in tokens (0: the model's trained length)"},
    {"chunk", CFG_LONG, &W->chunk, "512", 1, 1 << 20,
     "prefill chunk in tokens (K/V goes to the store after each)"},
    {"attention", CFG_STR, &W->attention, "hip", 0, 0, "default attention: dense or hip"},
    {"hip-preset", CFG_STR, &W->hip_preset, NULL, 0, 0, "default HiP preset: 3k, fast, flash"},
    {"hip-config", CFG_STR, &W->hip_config, NULL, 0, 0, "default HiP JSON (text or file)"},
    {"max-prompt-tokens", CFG_LONG, &W->max_prompt_tokens, "0", 0, 1L << 30,
     "longest prompt (0: --ctx); longer ones get RESOURCE_EXHAUSTED"},
    {"max-concurrent", CFG_LONG, &W->max_concurrent, "1", 1, 256,
     "prefills at once (one context and thread each); more get RESOURCE_EXHAUSTED"},
    {"retry-delay-ms", CFG_LONG, &W->retry_delay_ms, "500", 0, 3600000,
     "retry-delay-ms trailer of RESOURCE_EXHAUSTED"},
    {"grace-ms", CFG_LONG, &W->grace_ms, "500", 0, 60000,
     "shutdown grace for calls in flight to flush their status"},
    {"handoff-ms", CFG_LONG, &W->handoff_ms, "30000", 0, 86400000,
     "keep a published sequence's lease this long for the decode worker"},
    {"kv-type", CFG_STR, NULL, "f16", 0, 0,
     "cpu: context KV cache type f16 or f32; cuda: dtype of a --kv-create segment, bf16 (f16 "
     "means bf16) or fp8"},
    {"device", CFG_STR, &W->device, "cpu", 0, 0,
     "where prefill runs: cpu, or cuda (GPU --gpu; needs a CUDA build and a bf16/fp8 segment)"},
    {"gpu", CFG_LONG, &W->gpu, "0", 0, 1023, "CUDA device index for --device cuda"},
    {"gpu-stage-tokens", CFG_LONG, &W->gpu_stage_tokens, "0", 0, 1L << 30,
     "--device cuda: GPU buffers (two, of one layer each) into which the prefix older than "
     "the ring is copied back before each layer; older tokens are read over the bus (0 = the "
     "longest prompt: all of it; bounds the prefill's GPU memory)"},
    {"verbose", CFG_BOOL, &W->verbose, "0", 0, 1, "debug logging"},
};
#undef W

static const char *g_kv_type = "f16";

static void usage(FILE *f)
{
    fprintf(f, "usage: ihip-prefill-worker --model GGUF [options]\n\n"
               "The Prefiller service: chunked (HiP) prefill into the shared KV store.\n"
               "Every flag also reads from the environment as IHIP_<NAME> (flags win).\n\n");
    for (size_t i = 0; i < CM_ARRAY_LEN(k_cfg); i++) {
        const cfg_entry *e = &k_cfg[i];
        char flag[64];
        snprintf(flag, sizeof(flag), "--%s%s", e->name,
                 e->type == CFG_BOOL ? "" : e->type == CFG_LONG ? " N" : " S");
        fprintf(f, "  %-26s %s", flag, e->help);
        if (e->def && e->type != CFG_BOOL)
            fprintf(f, " [%s]", e->def);
        fputc('\n', f);
    }
    fprintf(f, "  %-26s %s\n", "--help", "this text");
}

static int cfg_set(const cfg_entry *e, const char *v, const char *from)
{
    if (!strcmp(e->name, "kv-type")) {
        if (strcmp(v, "f16") && strcmp(v, "f32") && strcmp(v, "bf16") && strcmp(v, "fp8")) {
            fprintf(stderr,
                    "ihip-prefill-worker: %s kv-type: f16 or f32 (--device cpu), bf16 or fp8 "
                    "(--device cuda), not '%s'\n",
                    from, v);
            return -1;
        }
        g_kv_type = v;
        return 0;
    }
    if (!strcmp(e->name, "device") && strcmp(v, "cpu") && strcmp(v, "cuda")) {
        fprintf(stderr, "ihip-prefill-worker: %s device: cpu or cuda, not '%s'\n", from, v);
        return -1;
    }
    if (e->type == CFG_STR) {
        *(const char **)e->ptr = v;
        return 0;
    }
    if (e->type == CFG_BOOL) {
        bool b = !strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on");
        if (!b && strcmp(v, "0") && strcmp(v, "false") && strcmp(v, "no") && strcmp(v, "off")) {
            fprintf(stderr, "ihip-prefill-worker: %s %s: not a boolean: '%s'\n", from, e->name, v);
            return -1;
        }
        *(bool *)e->ptr = b;
        return 0;
    }
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < e->min || x > e->max) {
        fprintf(stderr, "ihip-prefill-worker: %s %s: '%s' is not an integer in [%ld, %ld]\n",
                from, e->name, v, e->min, e->max);
        return -1;
    }
    *(long *)e->ptr = x;
    return 0;
}

/* Defaults, then IHIP_* variables, then flags. Returns 0, 1 (--help) or -1. */
static int cfg_parse(int argc, char **argv)
{
    for (size_t i = 0; i < CM_ARRAY_LEN(k_cfg); i++)
        if (k_cfg[i].def && cfg_set(&k_cfg[i], k_cfg[i].def, "default") < 0)
            return -1;
    for (size_t i = 0; i < CM_ARRAY_LEN(k_cfg); i++) {
        char env[64] = "IHIP_";
        size_t n = 5;
        for (const char *p = k_cfg[i].name; *p && n + 1 < sizeof(env); p++)
            env[n++] = *p == '-' ? '_' : (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p);
        env[n] = 0;
        const char *v = getenv(env);
        if (v && *v && cfg_set(&k_cfg[i], v, env) < 0)
            return -1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h"))
            return 1;
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "ihip-prefill-worker: unexpected argument '%s'\n", a);
            return -1;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const cfg_entry *e = NULL;
        for (size_t k = 0; k < CM_ARRAY_LEN(k_cfg); k++)
            if (strlen(k_cfg[k].name) == len && !strncmp(k_cfg[k].name, name, len))
                e = &k_cfg[k];
        if (!e) {
            fprintf(stderr, "ihip-prefill-worker: unknown flag '%s' (see --help)\n", a);
            return -1;
        }
        const char *v = eq ? eq + 1 : NULL;
        if (!v && e->type == CFG_BOOL)
            v = "1";
        if (!v) {
            if (i + 1 >= argc) {
                fprintf(stderr, "ihip-prefill-worker: %s needs a value\n", a);
                return -1;
            }
            v = argv[++i];
        }
        if (cfg_set(e, v, "flag") < 0)
            return -1;
    }
    return 0;
}

static void cfg_print(void)
{
    fprintf(stderr, "ihip-prefill-worker: configuration\n");
    for (size_t i = 0; i < CM_ARRAY_LEN(k_cfg); i++) {
        const cfg_entry *e = &k_cfg[i];
        if (!strcmp(e->name, "kv-type"))
            fprintf(stderr, "  %-18s %s\n", e->name, g_kv_type);
        else if (e->type == CFG_STR)
            fprintf(stderr, "  %-18s %s\n", e->name,
                    *(const char **)e->ptr ? *(const char **)e->ptr : "(unset)");
        else if (e->type == CFG_BOOL)
            fprintf(stderr, "  %-18s %s\n", e->name, *(bool *)e->ptr ? "true" : "false");
        else
            fprintf(stderr, "  %-18s %ld\n", e->name, *(long *)e->ptr);
    }
}

/* ---- start-up ---------------------------------------------------------------------------------- */

static bool on_gpu(const prefill_worker *w)
{
    return !strcmp(w->cfg.device, "cuda");
}

static const char *dtype_name(uint32_t dt)
{
    switch (dt) {
    case KVSTORE_DTYPE_F32: return "f32";
    case KVSTORE_DTYPE_F16: return "f16";
    case KVSTORE_DTYPE_BF16: return "bf16";
    case KVSTORE_DTYPE_F8_E4M3: return "fp8 (e4m3)";
    default: return "an unknown dtype";
    }
}

/* Open the segment (creating it with --kv-create) and check it fits the model. */
static int open_store(prefill_worker *w, cm_err *err)
{
    const mdl_hparams *hp = &w->model->hp;
    kvstore_params p = kvstore_default_params();
    p.dir = w->cfg.kv_dir;
    if (w->cfg.kv_create) {
        kvstore_geometry g = {0};
        g.model_fingerprint = w->fingerprint;
        g.n_layers = (uint32_t)hp->n_layer;
        g.n_kv_heads = (uint32_t)hp->n_head_kv;
        g.head_dim = (uint32_t)hp->head_dim;
        g.tokens_per_block = (uint32_t)w->cfg.kv_block_tokens;
        g.dtype = w->cfg.kv_create_dtype;
        if (g.dtype == KVSTORE_DTYPE_F8_E4M3) /* kvstore_geometry_finish knows 2-4 byte types */
            g.bytes_per_block = 2ull * g.n_kv_heads * g.tokens_per_block * g.head_dim;
        kvstore_params cp = p;
        cp.n_ram_blocks = (uint32_t)w->cfg.kv_blocks;
        cp.max_seqs = (uint32_t)w->cfg.kv_max_seqs;
        cm_err e = {0};
        int rc = kvstore_create(w->cfg.kv_name, &g, &cp, &e);
        if (rc == 0)
            CM_LOG_INFO("prefill: created KV segment %s in %s", w->cfg.kv_name, w->cfg.kv_dir);
        else if (rc != -EEXIST)
            return cm_err_set(err, rc, "creating the KV segment: %s", e.msg);
    }
    int rc = kvstore_open(w->cfg.kv_name, &p, NULL, &w->kv, err);
    if (rc < 0)
        return rc;
    const kvstore_geometry *g = kvstore_get_geometry(w->kv);
    if (g->model_fingerprint != w->fingerprint || g->n_layers != (uint32_t)hp->n_layer ||
        g->n_kv_heads != (uint32_t)hp->n_head_kv || g->head_dim != (uint32_t)hp->head_dim)
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "KV segment %s is for another model (fingerprint %016" PRIx64
                          ", %u layers, %u kv heads, head dim %u; this model: %s, %lld, %lld, "
                          "%lld)",
                          w->cfg.kv_name, g->model_fingerprint, (unsigned)g->n_layers,
                          (unsigned)g->n_kv_heads, (unsigned)g->head_dim, w->fingerprint_hex,
                          (long long)hp->n_layer, (long long)hp->n_head_kv,
                          (long long)hp->head_dim);
    if (on_gpu(w) && g->dtype != KVSTORE_DTYPE_BF16 && g->dtype != KVSTORE_DTYPE_F8_E4M3)
        return cm_err_set(err, -KVSTORE_EGEOMETRY,
                          "--device cuda needs a bf16 or fp8 KV segment (the GPU writes its "
                          "pages into the blocks as they are); segment %s in %s is %s. Remove it "
                          "(ihip-kv destroy %s --dir %s) and restart with --device cuda "
                          "--kv-create (makes bf16), or make one: ihip-kv create %s --dir %s "
                          "--dtype bf16 --layers %u --kv-heads %u --head-dim %u "
                          "--tokens-per-block %u --fingerprint %s",
                          w->cfg.kv_name, w->cfg.kv_dir, dtype_name(g->dtype), w->cfg.kv_name,
                          w->cfg.kv_dir, w->cfg.kv_name, w->cfg.kv_dir, (unsigned)g->n_layers,
                          (unsigned)g->n_kv_heads, (unsigned)g->head_dim,
                          (unsigned)g->tokens_per_block, w->fingerprint_hex);
    if (!on_gpu(w) && kvstore_kvcache_row_bytes(g, g->dtype) == 0)
        return cm_err_set(err, -KVSTORE_EGEOMETRY, "KV segment dtype %u is not f32/f16/bf16",
                          (unsigned)g->dtype);
    size_t dl = strlen(w->cfg.kv_dir);
    while (dl > 1 && w->cfg.kv_dir[dl - 1] == '/')
        dl--;
    snprintf(w->kv_path, sizeof(w->kv_path), "%.*s/ihip-%s", (int)dl, w->cfg.kv_dir,
             w->cfg.kv_name);
    return 0;
}

static int load_everything(prefill_worker *w, cm_err *err)
{
    uint64_t t0 = cm_time_ns();
    int rc = kvstore_model_fingerprint(w->cfg.model, &w->fingerprint, err);
    if (rc < 0)
        return rc;
    snprintf(w->fingerprint_hex, sizeof(w->fingerprint_hex), "%016" PRIx64, w->fingerprint);
    w->model = mdl_model_load(w->cfg.model, err);
    if (!w->model)
        return err->code ? err->code : -EINVAL;
    const mdl_hparams *hp = &w->model->hp;
    w->n_ctx = w->cfg.ctx > 0 ? w->cfg.ctx : hp->n_ctx_train;
    if (w->cfg.max_prompt_tokens == 0 || w->cfg.max_prompt_tokens > w->n_ctx)
        w->cfg.max_prompt_tokens = (long)w->n_ctx;

    /* the default attention */
    if (!strcmp(w->cfg.attention, "dense")) {
        if (w->cfg.hip_preset || w->cfg.hip_config)
            return cm_err_set(err, -EINVAL, "--hip-preset / --hip-config need --attention hip");
        w->default_dense = true;
        snprintf(w->default_digest, sizeof(w->default_digest), "dense");
    } else if (!strcmp(w->cfg.attention, "hip")) {
        hip_config *hc = NULL;
        bool dense = false;
        /* resolve against "no worker default" so the digest names the flags' configuration */
        rc = prefill_attention_resolve(NULL, w->cfg.hip_preset ? w->cfg.hip_preset : "fast",
                                       w->cfg.hip_config, -1, &dense, &hc, w->default_digest,
                                       sizeof(w->default_digest), err);
        if (rc < 0)
            return rc;
        if (!dense) {
            memcpy(&w->default_hc, hc, sizeof(*hc));
            free(hc);
        }
        w->default_dense = dense;
        if (!dense && hip_config_validate(&w->default_hc, (int)hp->n_layer, err) < 0)
            return err->code;
    } else {
        return cm_err_set(err, -EINVAL, "--attention: dense or hip, not '%s'", w->cfg.attention);
    }

    rc = open_store(w, err);
    if (rc < 0)
        return rc;

    w->slots = calloc((size_t)w->cfg.max_concurrent, sizeof(*w->slots));
    if (!w->slots)
        return cm_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < (int)w->cfg.max_concurrent; i++) {
        w->slots[i].w = w;
        w->slots[i].index = i;
    }
    if (on_gpu(w)) {
        rc = prefill_cuda_init(w, err); /* the slots' contexts are cuda_ctx: no mdl_ctx */
        if (rc < 0)
            return rc;
    } else {
        w->be = &prefill_backend_cpu;
        mdl_ctx_params cp = mdl_ctx_default_params();
        cp.n_ctx = w->n_ctx;
        cp.n_threads = (int)w->cfg.threads;
        cp.kv_type = (int)w->cfg.kv_type;
        cp.n_chunk = w->cfg.chunk;
        for (int i = 0; i < (int)w->cfg.max_concurrent; i++) {
            prefill_slot *s = &w->slots[i];
            s->ctx = mdl_ctx_init(w->model, &cp, err);
            if (!s->ctx)
                return err->code ? err->code : -ENOMEM;
            snprintf(s->digest, sizeof(s->digest), "dense"); /* a new context attends densely */
        }
    }
    CM_LOG_INFO("prefill: model %s (%s, %lld layers, fingerprint %s), ctx %lld x %ld, KV segment "
                "%s (%u tokens/block, %s), %s attention, device %s, ready in %.0f ms",
                w->cfg.model, hp->arch, (long long)hp->n_layer, w->fingerprint_hex,
                (long long)w->n_ctx, w->cfg.max_concurrent, w->kv_path,
                (unsigned)kvstore_get_geometry(w->kv)->tokens_per_block,
                dtype_name(kvstore_get_geometry(w->kv)->dtype),
                w->default_dense ? "dense" : "HiP", w->be->name,
                (double)(cm_time_ns() - t0) / 1e6);
    return 0;
}

static void free_everything(prefill_worker *w)
{
    prefill_cuda_free(w); /* before the store closes: it unregisters the segment pool */
    if (w->slots) {
        for (int i = 0; i < (int)w->cfg.max_concurrent; i++)
            mdl_ctx_free(w->slots[i].ctx);
        free(w->slots);
        w->slots = NULL;
    }
    if (w->kv) {
        kvstore_close(w->kv); /* releases our leases, frees our WRITING sequences */
        w->kv = NULL;
    }
    mdl_model_free(w->model);
    w->model = NULL;
    free(w->handoffs);
    w->handoffs = NULL;
}

int main(int argc, char **argv)
{
    prefill_worker *w = &g_w;
    int prc = cfg_parse(argc, argv);
    if (prc != 0) {
        usage(prc > 0 ? stdout : stderr);
        return prc > 0 ? 0 : 2;
    }
    w->cfg.kv_type = !strcmp(g_kv_type, "f32") ? CPU_KV_F32 : CPU_KV_F16;
    w->cfg.kv_create_dtype = w->cfg.kv_type == CPU_KV_F32 ? KVSTORE_DTYPE_F32 : KVSTORE_DTYPE_F16;
    if (!strcmp(w->cfg.device, "cuda")) {
        if (!prefill_cuda_built()) {
            fprintf(stderr, "ihip-prefill-worker: --device cuda: this build has no CUDA backend "
                            "(configure with -DIHIP_CUDA=ON where nvcc is installed); use "
                            "--device cpu\n");
            return 2;
        }
        if (!strcmp(g_kv_type, "f32")) {
            fprintf(stderr, "ihip-prefill-worker: --kv-type f32 is a --device cpu option (with "
                            "--device cuda: bf16 or fp8, the dtype of a --kv-create segment)\n");
            return 2;
        }
        w->cfg.kv_create_dtype =
            !strcmp(g_kv_type, "fp8") ? KVSTORE_DTYPE_F8_E4M3 : KVSTORE_DTYPE_BF16;
    } else if (!strcmp(g_kv_type, "bf16") || !strcmp(g_kv_type, "fp8")) {
        fprintf(stderr, "ihip-prefill-worker: --kv-type %s needs --device cuda (--device cpu: "
                        "f16 or f32)\n", g_kv_type);
        return 2;
    }
    if (w->cfg.verbose)
        cm_log_level = CM_LOG_LEVEL_DEBUG;
    if (!w->cfg.model) {
        fprintf(stderr, "ihip-prefill-worker: --model is required (or IHIP_MODEL)\n");
        usage(stderr);
        return 2;
    }
    cfg_print();
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);

    /* Signals go to sigtimedwait below: block them before any thread starts. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    rpc_method m;
    prefill_service_method(w, &m);
    rpc_server_params sp = rpc_server_default_params();
    sp.addr = w->cfg.listen;
    sp.n_threads = (int)w->cfg.rpc_threads;
    sp.default_retry_delay_ms = w->cfg.retry_delay_ms;
    sp.max_recv_bytes = 64 << 20; /* ~3 bytes per token id: prompts of millions of tokens */
    cm_err err = {0};
    int rc = rpc_server_start(&w->server, &sp, &m, 1, &err);
    if (rc < 0) {
        fprintf(stderr, "ihip-prefill-worker: %s\n", err.msg);
        return 1;
    }
    printf("listening on %d\n", rpc_server_port(w->server));
    fflush(stdout);

    int status = 0;
    rc = load_everything(w, &err);
    if (rc == 0)
        rc = prefill_service_start(w, &err);
    if (rc < 0) {
        fprintf(stderr, "ihip-prefill-worker: %s\n", err.msg);
        status = 1;
    } else {
        atomic_store(&w->ready, true);
        rpc_health_set(w->server, "", true);
        rpc_health_set(w->server, "infinitehip.v1.Prefiller", true);
        CM_LOG_INFO("prefill: serving on port %d", rpc_server_port(w->server));
        /* main thread: expire hand-over leases, wait for a signal */
        for (;;) {
            struct timespec tick = {0, 100 * 1000000L};
            int sig = sigtimedwait(&set, NULL, &tick);
            if (sig == SIGINT || sig == SIGTERM) {
                CM_LOG_INFO("prefill: signal %d, shutting down", sig);
                break;
            }
            prefill_handoff_reap(w, false);
        }
    }
    rpc_health_set(w->server, "", false);
    rpc_health_set(w->server, "infinitehip.v1.Prefiller", false);
    /* cancel running prefills (each stops after its chunk, aborts its sequence and finishes its
     * call with UNAVAILABLE), then let the server flush those statuses */
    prefill_service_stop(w);
    rpc_server_shutdown(w->server, w->cfg.grace_ms);
    if (w->kv)
        prefill_handoff_reap(w, true);
    rpc_server_free(w->server);
    pthread_mutex_lock(&w->mu);
    CM_LOG_INFO("prefill: bye (%" PRIu64 " ok, %" PRIu64 " failed, %" PRIu64 " cancelled, %" PRIu64
                " rejected; %" PRIu64 " tokens computed on %s, %" PRIu64 " reused)",
                w->n_ok, w->n_failed, w->n_cancelled, w->n_rejected, w->tokens_computed,
                w->be ? w->be->name : w->cfg.device, w->tokens_cached);
    pthread_mutex_unlock(&w->mu);
    free_everything(w);
    return status;
}
