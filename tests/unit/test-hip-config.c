/*
 * test-hip-config.c — the HiP configuration: every default of shared/HIP.md §1, the refresh
 * presets, the JSON reader (strictness, error messages naming the key and place, deprecated keys
 * warned about and ignored, string or file path), validation, per-layer lookup and the decode
 * refresh schedule of §5.
 */
#define _POSIX_C_SOURCE 200809L
#include "base/cm.h"
#include "hip/hip.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int n_pass, n_fail;
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                            \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

static char logbuf[8192];
static void log_sink(int level, const char *msg, void *user)
{
    (void)user;
    if (level <= CM_LOG_LEVEL_WARN && strlen(logbuf) + strlen(msg) + 2 < sizeof(logbuf)) {
        strcat(logbuf, msg);
        strcat(logbuf, "\n");
    }
}

static hip_config cfg, cfg2; /* large: keep off the stack */

static void test_defaults(void)
{
    hip_config *c = &cfg;
    hip_config_default(c);
    const hip_layer_config *n = &c->normal, *s = &c->special;
    CHECK(n->sink_token_size == 256 && s->sink_token_size == 256, "n_sink");
    CHECK(n->sliding_window_size == 1024 && s->sliding_window_size == 1024, "n_stream");
    CHECK(n->n_stages == 3 && s->n_stages == 3, "3 stages");
    static const int chunk[3] = {256, 32, 8}, stride[3] = {4, 4, 1};
    static const int64_t sk[3] = {0, 32768, 8192};
    for (int i = 0; i < 3; i++) {
        for (int k = 0; k < 2; k++) {
            const hip_stage *st = &(k ? s : n)->stages[i];
            CHECK(st->chunk_size == chunk[i] && st->stage_k == sk[i] && st->block_size_q == 64 &&
                      st->block_stride_q == stride[i] && st->stage_stride == 1,
                  "stage %d defaults (%d %lld %d %d)", i, st->chunk_size, (long long)st->stage_k,
                  st->block_size_q, st->block_stride_q);
        }
    }
    CHECK(n->second_stage_k == 2048 && s->second_stage_k == 4096, "second_stage_k 2048/4096");
    CHECK(n->scan_rope == HIP_SCAN_RELATIVE && s->scan_rope == HIP_SCAN_CHUNK, "pruning RoPE modes");
    CHECK(n->sa_rope == HIP_SA_STREAMING && s->sa_rope == HIP_SA_STREAMING, "BSA RoPE");
    CHECK(c->block_sparse_block_size_q == 64 && c->block_sparse_block_size_k == 8, "BSA blocks");
    CHECK(c->n_refresh == 3 && c->mask_refresh_interval[0] == 32 && c->mask_refresh_interval[1] == 16 &&
              c->mask_refresh_interval[2] == 8, "refresh (32,16,8)");
    CHECK(c->metadata_cache_max_batch_size == 32 && c->using_extend && !c->score_bf16, "misc");
    /* special layers: the first three and the last one */
    int spec[30], nspec = 0;
    for (int il = 0; il < 30; il++)
        if (hip_config_is_special(c, il, 30)) spec[nspec++] = il;
    CHECK(nspec == 4 && spec[0] == 0 && spec[1] == 1 && spec[2] == 2 && spec[3] == 29,
          "special layers of a 30-layer model (%d)", nspec);
    CHECK(hip_config_layer(c, 29, 30, false) == &c->special && hip_config_layer(c, 15, 30, true) == &c->normal,
          "layer lookup");
    cm_err err = {0};
    CHECK(hip_config_validate(c, 30, &err) == 0, "defaults validate: %s", err.msg);
    hip_args a;
    hip_args_from_config(&a, c, 0, 30, false);
    CHECK(a.layer == &c->special && a.block_size_q == 64 && a.block_size_k == 8 && a.using_extend,
          "args from config");
}

static void test_presets(void)
{
    static const struct {
        const char *name;
        int n[3];
    } p[] = {{"3k", {16, 8, 4}}, {"fast", {32, 16, 8}}, {"flash", {96, 24, 8}}};
    cm_err err = {0};
    for (int i = 0; i < 3; i++) {
        hip_config_default(&cfg);
        CHECK(hip_config_preset(&cfg, p[i].name, &err) == 0, "preset %s", p[i].name);
        CHECK(cfg.mask_refresh_interval[0] == p[i].n[0] && cfg.mask_refresh_interval[1] == p[i].n[1] &&
                  cfg.mask_refresh_interval[2] == p[i].n[2], "preset %s values", p[i].name);
    }
    CHECK(hip_config_preset(&cfg, "turbo", &err) == -EINVAL && strstr(err.msg, "turbo"),
          "unknown preset: %s", err.msg);
}

/* parse on top of defaults; expect rc, and (if want_msg) a message containing it */
static int parse(const char *json, int want, const char *want_msg)
{
    cm_err err = {0};
    hip_config_default(&cfg);
    cfg2 = cfg;
    int rc = hip_config_parse(&cfg, json, &err);
    CHECK(rc == want, "parse %s: rc %d want %d (%s)", json, rc, want, err.msg);
    if (rc && want_msg) CHECK(strstr(err.msg, want_msg) != NULL, "message \"%s\" lacks \"%s\"", err.msg, want_msg);
    if (rc) CHECK(memcmp(&cfg, &cfg2, sizeof(cfg)) == 0, "config changed by a failed parse: %s", json);
    return rc;
}

static void test_json(void)
{
    cm_err err = {0};
    /* the README example */
    if (parse("{\"mask_refresh_interval\": [96, 24, 8]}", 0, NULL) == 0)
        CHECK(cfg.n_refresh == 3 && cfg.mask_refresh_interval[0] == 96 && cfg.mask_refresh_interval[1] == 24 &&
                  cfg.mask_refresh_interval[2] == 8, "refresh list");
    if (parse("  {\"mask_refresh_interval\": 16}", 0, NULL) == 0)
        CHECK(cfg.mask_refresh_interval[0] == 16 && cfg.mask_refresh_interval[2] == 16, "refresh int");
    /* everything at once */
    const char *full =
        "{\n"
        "  \"dense_layers\": [0, 1, -1],\n"
        "  \"block_sparse_block_size_q\": 32,\n"
        "  \"metadata_cache_max_batch_size\": 4,\n"
        "  \"using_extend\": false,\n"
        "  \"mask_refresh_interval\": [16, 8, 4],\n"
        "  \"layers\": [\n"
        "    {\"second_stage_k\": 4096, \"sliding_window_size\": 512, \"sink_token_size\": 128,\n"
        "     \"sa_extend_backend\": \"streaming\", \"scan_extend_backend\": \"streaming\",\n"
        "     \"stages\": [{\"stage_block_size_q\": 32, \"stage_block_stride_q\": 2, \"stage_chunk_size\": 64,\n"
        "                  \"stage_k\": null, \"stage_stride\": 1},\n"
        "                 {\"stage_block_size_q\": 32, \"stage_chunk_size\": 16, \"stage_k\": 16384},\n"
        "                 {\"stage_block_size_q\": 32, \"stage_block_stride_q\": 1, \"stage_chunk_size\": 8, \"stage_k\": 4096,\n"
        "                  \"kind\": \"ScanStage\"}]},\n"
        "    {\"second_stage_k\": 1024, \"scan_extend_backend\": \"relative\",\n"
        "     \"stages\": [{\"stage_block_size_q\": 32}, {\"stage_block_size_q\": 32}, {\"stage_block_size_q\": 32}]}\n"
        "  ],\n"
        "  \"prefill_layers\": [{\"second_stage_k\": 8192, \"stages\": [{\"stage_block_size_q\": 32}, {\"stage_block_size_q\": 32}, {\"stage_block_size_q\": 32}]},\n"
        "                      {\"second_stage_k\": 2048, \"stages\": [{\"stage_block_size_q\": 32}, {\"stage_block_size_q\": 32}, {\"stage_block_size_q\": 32}]}]\n"
        "}\n";
    if (parse(full, 0, NULL) == 0) {
        const hip_layer_config *s = &cfg.special, *n = &cfg.normal;
        CHECK(cfg.n_dense_layers == 3 && cfg.dense_layers[2] == -1, "dense_layers");
        CHECK(cfg.block_sparse_block_size_q == 32 && cfg.metadata_cache_max_batch_size == 4 && !cfg.using_extend,
              "top-level ints/bools");
        CHECK(s->second_stage_k == 4096 && s->sliding_window_size == 512 && s->sink_token_size == 128 &&
                  s->scan_rope == HIP_SCAN_CHUNK, "special layer");
        CHECK(s->stages[0].chunk_size == 64 && s->stages[0].block_stride_q == 2 && s->stages[1].chunk_size == 16 &&
                  s->stages[1].stage_k == 16384 && s->stages[1].block_stride_q == 4 && s->stages[2].stage_k == 4096,
              "special stages (missing keys from default stage i)");
        CHECK(n->second_stage_k == 1024 && n->scan_rope == HIP_SCAN_RELATIVE && n->sliding_window_size == 1024 &&
                  n->stages[0].chunk_size == 256, "normal layer");
        CHECK(cfg.has_prefill_layers && cfg.prefill_special.second_stage_k == 8192 &&
                  cfg.prefill_special.scan_rope == HIP_SCAN_CHUNK && cfg.prefill_normal.second_stage_k == 2048,
              "prefill layers");
        CHECK(hip_config_validate(&cfg, 30, &err) == 0, "full config validates: %s", err.msg);
        CHECK(hip_config_is_special(&cfg, 29, 30) && !hip_config_is_special(&cfg, 2, 30), "dense_layers lookup");
        CHECK(hip_config_layer(&cfg, 1, 30, true) == &cfg.prefill_special &&
                  hip_config_layer(&cfg, 1, 30, false) == &cfg.special, "prefill lookup");
    }
    /* one entry per layer */
    char per[4096];
    int off = snprintf(per, sizeof(per), "{\"layers\": [");
    for (int i = 0; i < 5; i++)
        off += snprintf(per + off, sizeof(per) - (size_t)off, "%s{\"second_stage_k\": %d}", i ? ", " : "", 1024 * (i + 1));
    snprintf(per + off, sizeof(per) - (size_t)off, "]}");
    if (parse(per, 0, NULL) == 0) {
        CHECK(cfg.n_per_layer == 5 && hip_config_layer(&cfg, 3, 5, false)->second_stage_k == 4096 &&
                  hip_config_layer(&cfg, 0, 5, false)->scan_rope == HIP_SCAN_RELATIVE, "per-layer list");
        CHECK(hip_config_validate(&cfg, 5, &err) == 0, "per-layer validates for 5 layers: %s", err.msg);
        CHECK(hip_config_validate(&cfg, 30, &err) == -CM_EFORMAT && strstr(err.msg, "5 entries"),
              "per-layer count mismatch: %s", err.msg);
    }
    /* deprecated keys: accepted with a warning naming them */
    logbuf[0] = 0;
    cm_log_set_sink(log_sink, NULL);
    parse("{\"apply_v_dot\": false, \"prefill_always_dense\": true, \"decode_always_dense\": false, "
          "\"force_dense\": false, \"prefill_dense_threshold\": 8192, "
          "\"layers\": [{\"force_dense\": true}, {}]}", 0, NULL);
    cm_log_set_sink(NULL, NULL);
    CHECK(strstr(logbuf, "apply_v_dot") && strstr(logbuf, "prefill_dense_threshold") &&
              strstr(logbuf, "layers[0].force_dense") && strstr(logbuf, "deprecated"),
          "deprecation warnings: %s", logbuf);
    /* unknown keys, wherever they are, name themselves */
    parse("{\"mask_refresh_intervals\": 8}", -CM_EFORMAT, "mask_refresh_intervals");
    parse("{\"layers\": [{}, {\"second_stagek\": 8}]}", -CM_EFORMAT, "layers[1].second_stagek");
    parse("{\"layers\": [{\"stages\": [{\"stage_chunk\": 8}]}, {}]}", -CM_EFORMAT, "layers[0].stages[0].stage_chunk");
    /* types and ranges */
    parse("{\"layers\": [{\"second_stage_k\": \"2048\"}, {}]}", -CM_EFORMAT, "expected an integer");
    parse("{\"layers\": [{\"second_stage_k\": 2048.5}, {}]}", -CM_EFORMAT, "non-integer");
    parse("{\"layers\": [{\"second_stage_k\": -1}, {}]}", -CM_EFORMAT, "out of range");
    parse("{\"using_extend\": 1}", -CM_EFORMAT, "true or false");
    parse("{\"mask_refresh_interval\": [1, 2, 3, 4, 5]}", -CM_EFORMAT, "mask_refresh_interval");
    parse("{\"mask_refresh_interval\": 0}", -CM_EFORMAT, "out of range");
    parse("{\"layers\": []}", -CM_EFORMAT, "layers");
    parse("{\"layers\": [{\"scan_extend_backend\": \"dynamic_extend\"}, {}]}", -CM_EUNSUPPORTED, "dynamic_extend");
    parse("{\"layers\": [{\"sa_extend_backend\": \"self_extend\"}, {}]}", -CM_EUNSUPPORTED, "self_extend");
    parse("{\"layers\": [{\"stages\": [{\"kind\": \"EvalScoreStage\"}]}, {}]}", -CM_EFORMAT, "ScanStage");
    parse("[1, 2]", -ENOENT, NULL); /* not an object → treated as a path */
    /* strict JSON */
    parse("{\"using_extend\": true,}", -CM_EFORMAT, "trailing comma");
    parse("{\"using_extend\": true} x", -CM_EFORMAT, "trailing characters");
    parse("{\"using_extend\": true /* c */}", -CM_EFORMAT, "line 1");
    parse("{'using_extend': true}", -CM_EFORMAT, "member name");
    parse("{\"using_extend\": true, \"using_extend\": false}", -CM_EFORMAT, "duplicate");
    parse("{\"mask_refresh_interval\": 016}", -CM_EFORMAT, "expected");
    parse("{\"mask_refresh_interval\": NaN}", -CM_EFORMAT, "unexpected");
    parse("{\"using_extend\": tru}", -CM_EFORMAT, "unexpected token");
    parse("{\"layers\": [{\"sa_extend_backend\": \"a\\qb\"}, {}]}", -CM_EFORMAT, "bad escape");
    parse("{\"layers\": [{\"sa_extend_backend\": \"\\ud800x\"}, {}]}", -CM_EFORMAT, "surrogate");
    parse("{\"layers\": [{\"sa_extend_backend\": \"\\ud83d\\ude00\"}, {}]}", -CM_EUNSUPPORTED, "\xf0\x9f\x98\x80");
    parse("{\"layers\": [{\"sa_extend_backend\": \"x\ny\"}, {}]}", -CM_EFORMAT, "control character");
    parse("{\"using_extend\": true", -CM_EFORMAT, "expected ',' or '}'");
    parse("{\n\n  \"x\": [1, 2,, 3]}", -CM_EFORMAT, "line 3");
    char deep[300];
    memset(deep, '[', 200);
    strcpy(deep + 200, "");
    char deepj[320];
    snprintf(deepj, sizeof(deepj), "{\"dense_layers\": %s}", deep);
    parse(deepj, -CM_EFORMAT, "too deep");
    /* a file path */
    char path[] = "/tmp/test-hip-config-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) {
        const char *txt = "{\"mask_refresh_interval\": [96, 24, 8], \"layers\": [{}, {\"second_stage_k\": 1024}]}";
        CHECK(write(fd, txt, strlen(txt)) == (ssize_t)strlen(txt), "write");
        close(fd);
        if (parse(path, 0, NULL) == 0)
            CHECK(cfg.mask_refresh_interval[0] == 96 && cfg.normal.second_stage_k == 1024, "config from a file");
        FILE *f = fopen(path, "w");
        fputs("{\"layers\": [{}, {\"bogus\": 1}]}", f);
        fclose(f);
        parse(path, -CM_EFORMAT, "layers[1].bogus");
        unlink(path);
    }
    parse("/nonexistent/hip.json", -ENOENT, "/nonexistent/hip.json");
}

static void test_validate(void)
{
    cm_err err = {0};
    struct {
        const char *json;
        int want;
        const char *msg;
    } cases[] = {
        {"{\"layers\": [{\"stages\": [{}, {\"stage_chunk_size\": 48}, {}]}, {}]}", -CM_EFORMAT, "does not divide"},
        {"{\"layers\": [{\"stages\": [{\"stage_stride\": 2}, {}, {}]}, {}]}", -CM_EUNSUPPORTED, "stage_stride"},
        {"{\"block_sparse_block_size_q\": 32}", -CM_EUNSUPPORTED, "block_sparse_block_size_q"},
        {"{\"layers\": [{\"sliding_window_size\": 128}, {}]}", -CM_EFORMAT, "sliding_window_size"},
        {"{\"layers\": [{\"stages\": [{\"stage_k\": 100}, {}, {}]}, {}]}", -CM_EFORMAT, "stage 0"},
        {"{\"layers\": [{\"second_stage_k\": 4}, {}]}", -CM_EFORMAT, "second_stage_k"},
        {"{\"dense_layers\": [30]}", -CM_EFORMAT, "dense_layers"},
        {"{\"dense_layers\": [-31]}", -CM_EFORMAT, "dense_layers"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        if (parse(cases[i].json, 0, NULL)) continue;
        int rc = hip_config_validate(&cfg, 30, &err);
        CHECK(rc == cases[i].want && strstr(err.msg, cases[i].msg), "validate %s: rc %d (%s)", cases[i].json, rc,
              err.msg);
    }
}

/* §5: c == 0 or c % n0 == 0 → 0; elif c % n1 == 0 → 1; elif c % n2 == 0 → 2; else reuse (3) */
static void test_schedule(void)
{
    static const char *names[] = {"3k", "fast", "flash"};
    cm_err err = {0};
    for (int p = 0; p < 3; p++) {
        hip_config_default(&cfg);
        hip_config_preset(&cfg, names[p], &err);
        const int *n = cfg.mask_refresh_interval;
        int counts[4] = {0};
        bool ok = true;
        for (int64_t c = 0; c < 2000; c++) {
            int want = (c == 0 || c % n[0] == 0) ? 0 : c % n[1] == 0 ? 1 : c % n[2] == 0 ? 2 : 3;
            int got = hip_refresh_stage(&cfg, 3, c);
            if (got != want) ok = false;
            counts[got]++;
        }
        CHECK(ok, "schedule %s", names[p]);
        printf("schedule %-5s (%d,%d,%d): over 2000 decode steps full %d, from stage 1 %d, from stage 2 %d, "
               "reuse %d\n", names[p], n[0], n[1], n[2], counts[0], counts[1], counts[2], counts[3]);
    }
    hip_config_default(&cfg);
    CHECK(hip_refresh_stage(&cfg, 3, 0) == 0 && hip_refresh_stage(&cfg, 3, 1) == 3 &&
              hip_refresh_stage(&cfg, 3, 8) == 2 && hip_refresh_stage(&cfg, 3, 16) == 1 &&
              hip_refresh_stage(&cfg, 3, 24) == 2 && hip_refresh_stage(&cfg, 3, 32) == 0 &&
              hip_refresh_stage(&cfg, 3, 48) == 1, "fast schedule spot checks");
}

int main(void)
{
    test_defaults();
    test_presets();
    test_json();
    test_validate();
    test_schedule();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
