/*
 * test-cuda-offload.cu — paged KV in host memory (cuda-model.h "Paged KV", issue 7) against the
 * GPU-resident KV and against the CPU engine.
 *
 *   1. synthetic "tiny" and "smollm2-135m" models, a scaled-down HiP config (every stage runs,
 *      retrieval beyond the window) with the "fast" (32, 16, 8) schedule and with a mask refresh
 *      every step, and dense attention: a contiguous context (reference) prefills a prompt in
 *      chunks and decodes teacher-forced; a paged context prefills the same prompt with a page
 *      sink into pinned host memory (a GPU ring smaller than the prompt, so pages MUST leave the
 *      GPU; part of the older prefix is staged back per layer, the rest read over the bus);
 *      decode contexts bound to those host pages then decode the same tokens with
 *        (a) one-page caches: nearly every needed page misses and overflows (read over the bus),
 *        (b) large caches: pages are installed and hit,
 *        (c) no caches;
 *      (a) and (b) with the stage-0 probe cache (probe_cache_tokens), (c) without;
 *      every logit of every prefill and decode step must be BIT-IDENTICAL to the reference (same
 *      kernels on the same values; only where they are read from differs), for bf16 and fp8 KV.
 *      Cache counters must show what each case is about (overflow in (a), hits in (b)).
 *   2. argument errors: bind on a non-paged context, misaligned address, bad page size, a ring
 *      overflow without a sink.
 *   3. real SmolLM2 (IHIP_MODEL): a long natural-text prompt (~2200 tokens of ship records with a
 *      password in the middle and a question at the end; scaled-down HiP, so pruning is real)
 *      on the CPU engine with the HiP provider, 16 greedy tokens, vs the GPU: paged prefill into
 *      host pages, bound to a decode context with one-page caches, teacher-forced on the CPU's
 *      tokens: the GPU's argmax equals the CPU's token or is a near tie (within 0.5 logit).
 *   4. the kvstore's spill tier: a paged prefill writes a prompt into a kvstore segment (page
 *      sink → kvstore blocks, as the prefill worker does); a decode context bound to its blocks
 *      (kvstore_cuda_seq_addrs) gives reference logits; then another sequence's allocations push
 *      part of the prompt's blocks into the spill file; bound again, those blocks are read back
 *      by the pager into pinned staging, and every decode logit must be bit-identical to the
 *      reference; a staging limit below the spilled bytes gives -ENOSPC; the addresses bound
 *      before the spill fail kvstore_cuda_seq_check (-EAGAIN), those bound after pass.
 * Prints "N passed, N failed"; exit 77 without a GPU.
 */
#include "backend/cuda/cuda-model.h"
#include "backend/cuda/cuda-hip-impl.h" /* the probe cache layout, checked on the host */
#include "backend/cuda/cuda.h"
#include "hip/hip.h"
#include "kvstore.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
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

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int64_t argmax(const float *a, int64_t n)
{
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (a[i] > a[b]) b = i;
    return b;
}

static float top2_gap(const float *a, int64_t n)
{
    int64_t b = argmax(a, n);
    float s = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (i != b && a[i] > s) s = a[i];
    return a[b] - s;
}

/* Host pages handed out in order by the sink: one pinned mapped buffer. */
struct host_pages {
    uint8_t *buf;    /* host */
    uint64_t dev;    /* its device address */
    size_t page_bytes, half;
    int64_t cap, used;
    int n_layer;
    int64_t max_pages;
    uint64_t *ka, *va; /* [n_layer][max_pages] what the sink gave, for bind */
};

static int hp_init(struct host_pages *h, const mdl_hparams *hp, int pt, size_t elem,
                   int64_t max_pages)
{
    memset(h, 0, sizeof(*h));
    h->half = (size_t)hp->n_head_kv * pt * hp->head_dim * elem;
    h->page_bytes = 2 * h->half;
    h->n_layer = (int)hp->n_layer;
    h->max_pages = max_pages;
    h->cap = max_pages * h->n_layer;
    void *d = NULL;
    if (cudaHostAlloc((void **)&h->buf, (size_t)h->cap * h->page_bytes, cudaHostAllocMapped) !=
        cudaSuccess)
        return -ENOMEM;
    memset(h->buf, 0xA5, (size_t)h->cap * h->page_bytes); /* poison */
    cudaHostGetDevicePointer(&d, h->buf, 0);
    h->dev = (uint64_t)(uintptr_t)d;
    h->ka = (uint64_t *)calloc((size_t)h->cap, sizeof(uint64_t));
    h->va = (uint64_t *)calloc((size_t)h->cap, sizeof(uint64_t));
    return h->ka && h->va ? 0 : -ENOMEM;
}

static void hp_free(struct host_pages *h)
{
    if (h->buf) cudaFreeHost(h->buf);
    free(h->ka);
    free(h->va);
    memset(h, 0, sizeof(*h));
}

static int sink(void *user, int seq, int layer, int64_t page, uint64_t *k, uint64_t *v,
                cm_err *err)
{
    struct host_pages *h = (struct host_pages *)user;
    if (seq != 0 || page >= h->max_pages || h->used >= h->cap)
        return cm_err_set(err, -CM_ELIMIT, "test sink: out of pages");
    /* interleave layers and pages in allocation order, like a store's free list */
    const uint64_t a = h->dev + (uint64_t)h->used * h->page_bytes;
    h->used++;
    *k = a;
    *v = a + h->half;
    h->ka[(size_t)layer * h->max_pages + page] = *k;
    h->va[(size_t)layer * h->max_pages + page] = *v;
    return 0;
}

/* bind needs [n_layer][n_pages] with n_pages = ceil(n / pt): repack from [n_layer][max_pages] */
static int bind(cuda_ctx *c, const struct host_pages *h, int64_t n, int pt, cm_err *err)
{
    const int64_t np = (n + pt - 1) / pt;
    uint64_t *k = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(np * h->n_layer));
    uint64_t *v = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(np * h->n_layer));
    int rc = -ENOMEM;
    if (k && v) {
        for (int l = 0; l < h->n_layer; l++)
            for (int64_t p = 0; p < np; p++) {
                k[(size_t)l * np + p] = h->ka[(size_t)l * h->max_pages + p];
                v[(size_t)l * np + p] = h->va[(size_t)l * h->max_pages + p];
            }
        rc = cuda_ctx_bind_host(c, 0, n, k, v, err);
    }
    free(k);
    free(v);
    return rc;
}

static void small_hip(hip_config *c, bool every_step)
{
    hip_config_default(c);
    hip_layer_config *lcs[2] = {&c->special, &c->normal};
    for (int i = 0; i < 2; i++) {
        hip_layer_config *lc = lcs[i];
        lc->sink_token_size = 32;
        lc->sliding_window_size = 128;
        lc->stages[0].chunk_size = 64;
        lc->stages[1].chunk_size = 16;
        lc->stages[1].stage_k = 512;
        lc->stages[2].chunk_size = 8;
        lc->stages[2].stage_k = 256;
        lc->second_stage_k = 128;
    }
    if (every_step)
        c->mask_refresh_interval[0] = c->mask_refresh_interval[1] = c->mask_refresh_interval[2] = 1;
    else {
        c->mask_refresh_interval[0] = 32;
        c->mask_refresh_interval[1] = 16;
        c->mask_refresh_interval[2] = 8;
    }
}

/* Compare two logit vectors bit for bit; returns the number of differing values. */
static int64_t n_diff(const float *a, const float *b, int64_t n)
{
    return memcmp(a, b, sizeof(float) * (size_t)n) == 0 ? 0 : n;
}

static void test_equal(const char *shape, const hip_config *hc, const char *what, int kv_dtype)
{
    cm_err err = {};
    cuda_model *m = cuda_model_synthetic(shape, 5, 0, &err);
    CHECK(m != NULL, "%s: %s", shape, err.msg);
    if (!m) return;
    const mdl_hparams *hp = cuda_model_hparams(m);
    const int64_t V = hp->n_vocab, n_prompt = 1000, n_dec = 40, chunk = 128;
    const int pt = 16;
    const size_t elem = kv_dtype == CUDA_KV_FP8 ? 1 : 2;
    int32_t *toks = (int32_t *)malloc(sizeof(int32_t) * (n_prompt + n_dec));
    float *ref = (float *)malloc(sizeof(float) * V * (n_dec + 1));
    float *lg = (float *)malloc(sizeof(float) * V);
    for (int64_t i = 0; i < n_prompt + n_dec; i++)
        toks[i] = i >= 300 && i < n_prompt ? toks[i - 300] : (int32_t)(rng() % (uint64_t)V);
    for (int64_t i = n_prompt; i < n_prompt + n_dec; i++) toks[i] = toks[i - 250];

    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = n_prompt + n_dec + 8;
    p.n_chunk = chunk;
    p.hip = hc;
    p.kv_dtype = kv_dtype;
    cuda_ctx *rc_ctx = cuda_ctx_init(m, &p, &err);
    CHECK(rc_ctx != NULL, "reference ctx: %s", err.msg);
    int rc = rc_ctx ? cuda_prefill(rc_ctx, 0, toks, n_prompt, ref, NULL, NULL, &err) : -1;
    for (int64_t s = 0; s < n_dec && rc == 0; s++)
        rc = cuda_decode(rc_ctx, 0, toks[n_prompt + s], ref + (s + 1) * V, &err);
    CHECK(rc == 0, "%s %s reference: %s", shape, what, err.msg);
    cuda_ctx_free(rc_ctx);

    /* paged prefill with a sink; ring of 2 chunks: the prompt must leave the GPU */
    struct host_pages h;
    const int64_t max_pages = (p.n_ctx + pt - 1) / pt;
    CHECK(hp_init(&h, hp, pt, elem, max_pages) == 0, "host pages");
    cuda_ctx_params pp = p;
    pp.page_tokens = pt;
    pp.tail_tokens = 2 * chunk + pt;
    pp.sa_cache_tokens = -1;
    pp.mask_cache_tokens = -1;
    pp.stage_tokens = 384; /* stages part of the prefix; older pages are read over the bus */
    cuda_ctx *pc = cuda_ctx_init(m, &pp, &err);
    CHECK(pc != NULL, "paged prefill ctx: %s", err.msg);
    rc = pc ? cuda_ctx_set_page_sink(pc, sink, &h) : -1;
    if (rc == 0) rc = cuda_prefill(pc, 0, toks, n_prompt, lg, NULL, NULL, &err);
    if (rc == 0) rc = cuda_ctx_flush(pc, 0, &err);
    CHECK(rc == 0, "%s %s paged prefill: %s", shape, what, err.msg);
    if (rc == 0) {
        CHECK(n_diff(lg, ref, V) == 0, "%s %s (%s KV): paged prefill logits differ from resident",
              shape, what, elem == 1 ? "fp8" : "bf16");
        cuda_offload_stats st;
        cuda_ctx_offload_stats(pc, &st);
        CHECK(st.bytes_d2h == (uint64_t)h.n_layer * ((n_prompt + pt - 1) / pt) * h.page_bytes,
              "sink bytes %llu", (unsigned long long)st.bytes_d2h);
        CHECK(st.bytes_h2d_stage > 0, "the prefill staged nothing");
        CHECK(cuda_ctx_kv_bytes(pc) < (size_t)h.n_layer * n_prompt * 2 * elem * hp->n_head_kv *
                                          hp->head_dim,
              "paged prefill GPU KV %zu not below the prompt's KV", cuda_ctx_kv_bytes(pc));
    }
    cuda_ctx_free(pc);
    pp.stage_tokens = 0;

    /* decode contexts bound to the host pages */
    const int64_t caches[3][2] = {{pt, pt}, {4096, 4096}, {-1, -1}};
    const char *cname[3] = {"one-page caches", "large caches", "no caches"};
    for (int ci = 0; ci < 3 && rc == 0; ci++) {
        cuda_ctx_params dp = pp;
        dp.tail_tokens = n_dec + 2 * pt;
        dp.sa_cache_tokens = caches[ci][0];
        dp.mask_cache_tokens = caches[ci][1];
        /* the stage-0 probe cache with the caches (a, b); none with (c) */
        dp.probe_cache_tokens = ci < 2 ? dp.n_ctx : 0;
        cuda_ctx *dc = cuda_ctx_init(m, &dp, &err);
        CHECK(dc != NULL, "decode ctx: %s", err.msg);
        if (!dc) break;
        int r2 = bind(dc, &h, n_prompt, pt, &err);
        int64_t bad_steps = 0;
        for (int64_t s = 0; s < n_dec && r2 == 0; s++) {
            r2 = cuda_decode(dc, 0, toks[n_prompt + s], lg, &err);
            if (r2 == 0 && n_diff(lg, ref + (s + 1) * V, V)) bad_steps++;
        }
        CHECK(r2 == 0, "%s %s %s decode: %s", shape, what, cname[ci], err.msg);
        CHECK(bad_steps == 0, "%s %s (%s KV) %s: %lld of %lld decode steps differ from resident",
              shape, what, elem == 1 ? "fp8" : "bf16", cname[ci], (long long)bad_steps,
              (long long)n_dec);
        cuda_offload_stats st;
        cuda_ctx_offload_stats(dc, &st);
        if (hc && ci < 2)
            CHECK(st.pc_chunks > 0, "%s: the probe cache holds no chunk", cname[ci]);
        if (hc && ci == 0)
            CHECK(st.sa_overflow > 0 && st.sa_overflow * 2 > st.sa_needed,
                  "one-page cache: needed %llu, overflow %llu (most should overflow)",
                  (unsigned long long)st.sa_needed, (unsigned long long)st.sa_overflow);
        if (hc && ci == 1)
            CHECK(st.sa_hits > 0 && st.sa_installs > 0 && st.sa_overflow == 0 &&
                      st.mk_installs > 0,
                  "large caches: hits %llu installs %llu overflow %llu, keys installs %llu",
                  (unsigned long long)st.sa_hits, (unsigned long long)st.sa_installs,
                  (unsigned long long)st.sa_overflow, (unsigned long long)st.mk_installs);
        printf("  %s %-24s %s KV, %-15s: %lld decode steps bit-identical; K‖V cache needed %llu "
               "hit %llu installed %llu overflow %llu; keys cache needed %llu hit %llu installed "
               "%llu\n",
               shape, what, elem == 1 ? "fp8" : "bf16", cname[ci], (long long)(n_dec - bad_steps),
               (unsigned long long)st.sa_needed, (unsigned long long)st.sa_hits,
               (unsigned long long)st.sa_installs, (unsigned long long)st.sa_overflow,
               (unsigned long long)st.mk_needed, (unsigned long long)st.mk_hits,
               (unsigned long long)st.mk_installs);
        cuda_ctx_free(dc);
    }
    hp_free(&h);
    free(toks);
    free(ref);
    free(lg);
    cuda_model_free(m);
}

static void test_errors(void)
{
    cm_err err = {};
    cuda_model *m = cuda_model_synthetic("tiny", 5, 0, &err);
    if (!m) return;
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = 256;
    p.n_chunk = 32;
    cuda_ctx *c = cuda_ctx_init(m, &p, &err);
    uint64_t a[64] = {0};
    CHECK(c && cuda_ctx_bind_host(c, 0, 16, a, a, &err) == -EINVAL, "bind on a non-paged ctx");
    cuda_ctx_free(c);
    p.page_tokens = 12;
    CHECK(cuda_ctx_init(m, &p, &err) == NULL && err.code == -EINVAL, "page_tokens 12 accepted");
    p.page_tokens = 16;
    p.tail_tokens = 64;
    c = cuda_ctx_init(m, &p, &err);
    CHECK(c != NULL, "paged ctx: %s", err.msg);
    if (c) {
        for (int i = 0; i < 64; i++) a[i] = 0x1000 + 16 * (uint64_t)i;
        a[3] = 0x1008;
        CHECK(cuda_ctx_bind_host(c, 0, 16 * 2, a, a, &err) == -EINVAL, "misaligned accepted");
        CHECK(cuda_ctx_bind_host(c, 3, 16, a, a, &err) == -EINVAL, "bad seq accepted");
        int32_t t[200];
        for (int i = 0; i < 200; i++) t[i] = i;
        const int rc = cuda_prefill(c, 0, t, 200, NULL, NULL, NULL, &err);
        CHECK(rc == -CM_ELIMIT, "ring overflow without a sink: %d (%s)", rc, err.msg);
        CHECK(cuda_ctx_flush(c, 0, &err) == -EINVAL, "flush without a sink");
    }
    cuda_ctx_free(c);
    cuda_model_free(m);
}

static void test_real(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("skip part 3: no model at %s (set IHIP_MODEL)\n", path);
        return;
    }
    fclose(f);
    cm_err err = {};
    mdl_model *cm = mdl_model_load(path, &err);
    cuda_model *gm = cm ? cuda_model_load(cm, 0, &err) : NULL;
    CHECK(gm != NULL, "load: %s", err.msg);
    hip_config *hc = (hip_config *)malloc(sizeof(hip_config));
    if (!gm || !hc) {
        free(hc);
        cuda_model_free(gm);
        mdl_model_free(cm);
        return;
    }
    small_hip(hc, false);
    const int64_t V = cm->hp.n_vocab, chunk = 256;
    const int N_GEN = 16, pt = 64;
    /* a natural-text document of ~2600 tokens: ship records with one fact to retrieve from the
     * middle, and a question at the end */
    static const char *const ships[8] = {"Aurora", "Beacon", "Corsair", "Dauntless",
                                         "Endeavour", "Falcon", "Gallant", "Horizon"};
    static const char *const ports[6] = {"Lisbon", "Bergen", "Genoa", "Valletta", "Antwerp",
                                         "Cadiz"};
    static const char *const goods[6] = {"salted cod", "olive oil", "wool", "timber", "copper",
                                         "wine"};
    const size_t cap = 64 * 1024;
    char *text = (char *)malloc(cap);
    size_t len = 0;
    for (int i = 1; i <= 72 && text; i++) {
        len += (size_t)snprintf(text + len, cap - len,
                                "Record %d. The ship %s arrived in the harbour from %s with a "
                                "cargo of %s; the harbour master noted calm weather.\n",
                                i, ships[rng() % 8], ports[rng() % 6], goods[rng() % 6]);
        if (i == 36)
            len += (size_t)snprintf(text + len, cap - len,
                                    "Note. The harbour master's secret password is "
                                    "SILVER-HERON-17.\n");
    }
    if (text)
        len += (size_t)snprintf(text + len, cap - len,
                                "Question: what is the harbour master's secret password? Answer:");
    tok_vocab *voc = tok_vocab_init(mdl_model_gguf(cm), &err);
    int32_t *ids = (int32_t *)malloc(sizeof(int32_t) * 8192);
    int64_t n = text && voc && ids ? tok_encode(voc, text, len, tok_add_bos(voc), false, ids, 8192, &err) : -1;
    CHECK(n > 2 * chunk, "part 3: tokenize the document: %lld (%s)", (long long)n, err.msg);
    free(text);
    tok_vocab_free(voc);
    if (n <= 2 * chunk) {
        free(ids);
        free(hc);
        cuda_model_free(gm);
        mdl_model_free(cm);
        return;
    }
    /* The last chunk must hold >= 2 query blocks so that its last block gets the near-dense
     * window (HIP.md §6, both engines): drop the records' first tokens after BOS if it would
     * not. (With a last chunk of 40 tokens, no near-dense block, k = 128 and a random-token
     * prompt, even two CPU runs with different chunk sizes ranked each other's argmax #3762
     * and #25 — the "#1728" seen on the GPU on 2026-11-28.) */
    const int64_t last = n % chunk;
    if (last && last < 128) {
        memmove(ids + 1, ids + 1 + last, sizeof(int32_t) * (size_t)(n - 1 - last));
        n -= last;
    }
    float *lc = (float *)malloc(sizeof(float) * V * (N_GEN + 1));
    float *lg = (float *)malloc(sizeof(float) * V);
    int32_t ctoks[32];
    /* CPU with the HiP provider */
    mdl_ctx_params cp = mdl_ctx_default_params();
    cp.n_ctx = n + N_GEN + 8;
    cp.n_chunk = chunk;
    cp.n_threads = 8;
    mdl_ctx *cc = mdl_ctx_init(cm, &cp, &err);
    mdl_attn attn;
    int rc = cc ? hip_attn_provider_init(&attn, cm, hc, &err) : -1;
    if (rc == 0) mdl_ctx_set_attn(cc, &attn);
    uint64_t t0 = cm_time_ns();
    if (rc == 0) rc = mdl_prefill(cc, ids, n, lc, NULL, NULL, &err);
    for (int s = 0; s < N_GEN && rc == 0; s++) {
        ctoks[s] = (int32_t)argmax(lc + s * V, V);
        rc = mdl_decode(cc, ctoks[s], lc + (s + 1) * V, &err);
    }
    CHECK(rc == 0, "cpu: %s", err.msg);
    printf("part 3: CPU HiP prefill %lld + %d greedy steps in %.1f s\n", (long long)n, N_GEN,
           (double)(cm_time_ns() - t0) / 1e9);
    /* GPU: paged prefill into host pages, bound decode with one-page caches */
    struct host_pages h;
    cuda_ctx_params gp = cuda_ctx_default_params();
    gp.n_ctx = n + N_GEN + 8;
    gp.n_chunk = chunk;
    gp.hip = hc;
    gp.page_tokens = pt;
    gp.tail_tokens = 2 * chunk + pt;
    gp.sa_cache_tokens = -1;
    gp.mask_cache_tokens = -1;
    CHECK(hp_init(&h, &cm->hp, pt, 2, (gp.n_ctx + pt - 1) / pt) == 0, "host pages");
    cuda_ctx *pc = rc == 0 ? cuda_ctx_init(gm, &gp, &err) : NULL;
    if (pc) rc = cuda_ctx_set_page_sink(pc, sink, &h);
    if (pc && rc == 0) rc = cuda_prefill(pc, 0, ids, n, lg, NULL, NULL, &err);
    if (pc && rc == 0) rc = cuda_ctx_flush(pc, 0, &err);
    CHECK(pc && rc == 0, "gpu paged prefill: %s", err.msg);
    cuda_ctx_free(pc);
    gp.sa_cache_tokens = pt;
    gp.mask_cache_tokens = pt;
    gp.tail_tokens = 4 * pt;
    cuda_ctx *dc = rc == 0 ? cuda_ctx_init(gm, &gp, &err) : NULL;
    if (dc) rc = bind(dc, &h, n, pt, &err);
    int ties = 0, hard = 0, pre_rank = -1;
    for (int s = 0; s < N_GEN && dc && rc == 0; s++) {
        const float *ref = lc + s * V;
        if (s > 0) rc = cuda_decode(dc, 0, ctoks[s - 1], lg, &err);
        if (rc) break;
        const int64_t ga = argmax(lg, V);
        const float gap = top2_gap(ref, V);
        if (s == 0) { /* the prefill's last-token logits: rank of the GPU's token on the CPU */
            pre_rank = 0;
            for (int64_t i = 0; i < V; i++) pre_rank += ref[i] > ref[ga];
        } else if (ga != ctoks[s]) {
            /* a near tie: the GPU's token is within 0.5 of the CPU's best logit */
            if (ref[ctoks[s]] - ref[ga] <= 0.5f) ties++;
            else hard++;
        }
        printf("part 3: step %2d cpu %6d gpu %6lld gap %.3f%s\n", s, ctoks[s], (long long)ga, gap,
               ga == ctoks[s] ? "" : ref[ctoks[s]] - ref[ga] <= 0.5f ? " (near tie)" : " (DIFFERS)");
    }
    /* Decode steps 1.. run on the offloaded KV, teacher-forced on the CPU's tokens. The CPU
     * (8-bit activations in the dot products) and the GPU (bf16) pick slightly different key
     * blocks where scores are close, so where the CPU's top-2 gap is small the argmax may
     * differ: every GPU token must be the CPU's or within 0.5 of the CPU's best logit (resident
     * GPU vs CPU differ by up to 1.2 in single logits, test-cuda-model), and at most a third of
     * the steps may be such near ties. Step 0 is the prefill's last-token logits: the GPU's
     * token must be among the CPU's top 3. (The offload itself changes no bit: parts 1 and 4.) */
    CHECK(dc && rc == 0, "gpu offload decode: %s", err.msg);
    CHECK(hard == 0, "%d decode tokens differ from the CPU's by more than a near tie", hard);
    CHECK(ties * 3 <= N_GEN - 1, "%d near ties of %d steps", ties, N_GEN - 1);
    CHECK(pre_rank >= 0 && pre_rank < 3, "prefill last token: the GPU's argmax is the CPU's #%d",
          pre_rank + 1);
    printf("part 3: real SmolLM2, %lld-token document, HiP (sink 32, window 128, k 128), KV in "
           "host pages with one-page GPU caches: decode steps %d/%d greedy tokens equal the "
           "CPU's (%d near ties); prefill last token: GPU argmax = CPU's #%d\n",
           (long long)n, N_GEN - 1 - ties - hard, N_GEN - 1, ties, pre_rank + 1);
    cuda_ctx_free(dc);
    hp_free(&h);
    mdl_ctx_free(cc);
    free(ids);
    free(lc);
    free(lg);
    free(hc);
    cuda_model_free(gm);
    mdl_model_free(cm);
}

/* part 4: the page sink writes into kvstore blocks */
struct store_sink {
    kvstore *kv;
    kvstore_seq_ref seq;
    size_t half;
};

static int store_sink_fn(void *user, int seq, int layer, int64_t page, uint64_t *k, uint64_t *v,
                         cm_err *err)
{
    struct store_sink *u = (struct store_sink *)user;
    void *data = NULL, *dp = NULL;
    (void)seq;
    int rc = kvstore_block_alloc(u->kv, u->seq, (uint32_t)page, (uint32_t)layer, &data, err);
    if (rc) return rc;
    if (cudaHostGetDevicePointer(&dp, data, 0) != cudaSuccess)
        return cm_err_set(err, -EIO, "no device address for a kvstore block");
    *k = (uint64_t)(uintptr_t)dp;
    *v = *k + u->half;
    return 0;
}

/* Bind decode context c to the leased sequence's blocks; returns blocks staged from the spill
 * tier, or a negative code. */
static int bind_store(cuda_ctx *c, kvstore_cuda *kc, const kvstore_lease *l, int64_t n, int pt,
                      int n_layer, size_t half, uint64_t max_stage, void **staging, cm_err *err,
                      uint64_t **keep = NULL)
{
    const int64_t np = (n + pt - 1) / pt;
    uint64_t *k = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(np * n_layer));
    uint64_t *v = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(np * n_layer));
    uint32_t staged = 0;
    int rc = k && v ? 0 : -ENOMEM;
    if (rc == 0) rc = kvstore_cuda_seq_addrs(kc, l, (uint32_t)np, k, max_stage, staging, &staged, err);
    for (int64_t i = 0; rc == 0 && i < np * n_layer; i++) v[i] = k[i] + half;
    if (rc == 0) rc = cuda_ctx_bind_host(c, 0, n, k, v, err);
    if (keep && rc == 0) {
        *keep = k; /* the addresses as bound (kvstore_cuda_seq_check) */
        k = NULL;
    }
    free(k);
    free(v);
    return rc < 0 ? rc : (int)staged;
}

static void test_spill(void)
{
    cm_err err = {};
    const char *tmp = getenv("TMPDIR");
    char spill_dir[512];
    snprintf(spill_dir, sizeof(spill_dir), "%s", tmp && tmp[0] ? tmp : "/tmp");
    cuda_model *m = cuda_model_synthetic("tiny", 9, 0, &err);
    CHECK(m != NULL, "spill: %s", err.msg);
    if (!m) return;
    const mdl_hparams *hp = cuda_model_hparams(m);
    const int n_layer = (int)hp->n_layer, pt = 16;
    const int64_t V = hp->n_vocab, n_prompt = 1000, n_dec = 24, chunk = 128;
    const int64_t n_pages = (n_prompt + pt - 1) / pt, blocks = n_pages * n_layer;
    static hip_config hc;
    small_hip(&hc, true);
    int32_t *toks = (int32_t *)malloc(sizeof(int32_t) * (n_prompt + n_dec));
    float *ref = (float *)malloc(sizeof(float) * V * n_dec);
    float *lg = (float *)malloc(sizeof(float) * V);
    for (int64_t i = 0; i < n_prompt + n_dec; i++)
        toks[i] = i >= 300 ? toks[i - 300] : (int32_t)(rng() % (uint64_t)V);

    kvstore_geometry g;
    memset(&g, 0, sizeof(g));
    g.model_fingerprint = 0x5b111ULL;
    g.n_layers = (uint32_t)n_layer;
    g.n_kv_heads = (uint32_t)hp->n_head_kv;
    g.head_dim = (uint32_t)hp->head_dim;
    g.tokens_per_block = (uint32_t)pt;
    g.dtype = KVSTORE_DTYPE_BF16;
    kvstore_params kp = kvstore_default_params();
    kp.spill_dir = spill_dir;
    kp.n_ram_blocks = (uint32_t)(blocks + 8);
    kp.n_spill_blocks = (uint32_t)blocks;
    kp.max_seqs = 8;
    kp.max_blocks_per_seq = (uint32_t)blocks;
    char name[64];
    snprintf(name, sizeof(name), "ihip-test-spill-%d", (int)getpid());
    kvstore_destroy(name, &kp, NULL);
    kvstore *kv = NULL;
    kvstore_cuda *kc = NULL;
    int rc = kvstore_geometry_finish(&g, &err);
    if (rc == 0) rc = kvstore_create(name, &g, &kp, &err);
    if (rc == 0) rc = kvstore_open(name, &kp, &g, &kv, &err);
    if (rc == 0) rc = kvstore_cuda_init(kv, 1, &kc, &err);
    CHECK(rc == 0, "spill: segment with a spill tier in %s: %s", spill_dir, err.msg);
    const size_t half = (size_t)hp->n_head_kv * pt * hp->head_dim * 2;

    /* the prompt into the store: paged prefill, page sink → blocks, publish */
    struct store_sink ss = {kv, {0, 0}, half};
    kvstore_lease pub = {}, lease = {};
    cuda_ctx_params p = cuda_ctx_default_params();
    p.n_ctx = n_prompt + n_dec + 8;
    p.n_chunk = chunk;
    p.hip = &hc;
    p.page_tokens = pt;
    p.tail_tokens = 2 * chunk + pt;
    p.sa_cache_tokens = -1;
    p.mask_cache_tokens = -1;
    cuda_ctx *pc = rc == 0 ? cuda_ctx_init(m, &p, &err) : NULL;
    if (rc == 0 && !pc) rc = -ENOMEM;
    if (rc == 0) rc = kvstore_seq_create(kv, NULL, 0, &ss.seq, &err);
    if (rc == 0) rc = cuda_ctx_set_page_sink(pc, store_sink_fn, &ss);
    if (rc == 0) rc = cuda_prefill(pc, 0, toks, n_prompt, lg, NULL, NULL, &err);
    if (rc == 0) rc = cuda_ctx_flush(pc, 0, &err);
    if (rc == 0) rc = kvstore_seq_publish(kv, ss.seq, toks, (uint32_t)n_prompt, &pub, &err);
    if (rc == 0) rc = kvstore_lease_acquire(kv, pub.seq, &lease, &err);
    if (pub.seq.gen) kvstore_lease_release(kv, &pub, NULL);
    cuda_ctx_free(pc);
    CHECK(rc == 0, "spill: prefill into the store: %s", err.msg);

    /* reference: every block in RAM */
    p.tail_tokens = n_dec + 2 * pt;
    p.sa_cache_tokens = pt; /* one-page caches: the host blocks are read on nearly every step */
    p.mask_cache_tokens = pt;
    cuda_ctx *dc = rc == 0 ? cuda_ctx_init(m, &p, &err) : NULL;
    if (rc == 0 && !dc) rc = -ENOMEM;
    void *staging = NULL;
    uint64_t *ram_addr = NULL; /* the reference bind's addresses: every block in RAM */
    const uint64_t sc0 = kv ? kvstore_spill_count(kv) : 0;
    int staged = rc == 0 ? bind_store(dc, kc, &lease, n_prompt, pt, n_layer, half, 1ull << 30,
                                      &staging, &err, &ram_addr)
                         : -1;
    CHECK(staged == 0, "spill: reference bind staged %d blocks (%s)", staged, err.msg);
    if (staged == 0) {
        cm_err e2 = {};
        CHECK(kvstore_cuda_seq_check(kc, &lease, (uint32_t)n_pages, ram_addr, NULL, 0, &e2) == 0,
              "spill: check right after binding: %s", e2.msg);
    }
    for (int64_t s = 0; s < n_dec && staged == 0; s++)
        if ((rc = cuda_decode(dc, 0, toks[n_prompt + s], ref + s * V, &err)) != 0) break;
    CHECK(rc == 0, "spill: reference decode: %s", err.msg);
    kvstore_cuda_staging_free(staging);
    staging = NULL;

    /* another sequence fills RAM: the prompt's least recently used blocks move to the spill file */
    kvstore_seq_ref f = {0, 0};
    if (rc == 0) rc = kvstore_seq_create(kv, NULL, 0, &f, &err);
    for (int64_t i = 0; rc == 0 && i < blocks / 2; i++) {
        void *data = NULL;
        rc = kvstore_block_alloc(kv, f, (uint32_t)(i / n_layer), (uint32_t)(i % n_layer), &data, &err);
        if (rc == 0) memset(data, 0x5A, 2 * half);
    }
    CHECK(rc == 0, "spill: filler allocations: %s", err.msg);
    if (f.gen) kvstore_seq_abort(kv, f, NULL);
    kvstore_stats ks;
    memset(&ks, 0, sizeof(ks));
    if (kv) kvstore_get_stats(kv, &ks, &err);
    CHECK(ks.blocks_spilled > 0, "spill: no block of the prompt went to the spill tier");
    /* a reader of the blocks in place learns that some moved: the count changed, and the check
     * of the addresses it bound fails with -EAGAIN */
    CHECK(kv && kvstore_spill_count(kv) > sc0, "spill: the spill count did not change");
    if (ram_addr) {
        cm_err e2 = {};
        int r2 = kvstore_cuda_seq_check(kc, &lease, (uint32_t)n_pages, ram_addr, NULL, 0, &e2);
        CHECK(r2 == -EAGAIN && strstr(e2.msg, "moved to the spill tier"),
              "spill: check of the RAM-bound addresses after spilling: rc %d (%s)", r2, e2.msg);
        free(ram_addr);
        ram_addr = NULL;
    }

    /* a staging limit below the spilled bytes: a clear -ENOSPC */
    if (rc == 0 && ks.blocks_spilled > 0) {
        cm_err e2 = {};
        int r2 = bind_store(dc, kc, &lease, n_prompt, pt, n_layer, half, 2 * half, &staging, &e2);
        CHECK(r2 == -ENOSPC && strstr(e2.msg, "spill tier"), "spill: small staging: rc %d (%s)",
              r2, e2.msg);
        kvstore_cuda_staging_free(staging);
        staging = NULL;
    }
    /* bound again: spilled blocks read back into pinned staging; logits bit-identical */
    uint64_t *bound = NULL;
    staged = rc == 0 ? bind_store(dc, kc, &lease, n_prompt, pt, n_layer, half, 1ull << 30,
                                  &staging, &err, &bound)
                     : -1;
    CHECK(staged > 0 && (uint32_t)staged == ks.blocks_spilled,
          "spill: staged %d blocks, the store has %u spilled (%s)", staged, ks.blocks_spilled,
          err.msg);
    if (bound) { /* staged copies cannot move; the RAM-tier rest did not */
        cm_err e2 = {};
        CHECK(kvstore_cuda_seq_check(kc, &lease, (uint32_t)n_pages, bound, staging,
                                     (uint32_t)staged, &e2) == 0,
              "spill: check after binding with staging: %s", e2.msg);
        free(bound);
    }
    int64_t bad = 0;
    for (int64_t s = 0; s < n_dec && staged > 0; s++) {
        if ((rc = cuda_decode(dc, 0, toks[n_prompt + s], lg, &err)) != 0) break;
        bad += n_diff(lg, ref + s * V, V) != 0;
    }
    CHECK(rc == 0 && bad == 0, "spill: %lld of %lld decode steps differ after staging (%s)",
          (long long)bad, (long long)n_dec, err.msg);
    printf("part 4: %lld of %lld prompt blocks in the spill tier (%s I/O), read back into pinned "
           "staging: %lld decode steps bit-identical to all-in-RAM\n",
           (long long)ks.blocks_spilled, (long long)blocks, kv ? kvstore_io_name(kv) : "-",
           (long long)(n_dec - bad));
    cuda_ctx_free(dc);
    kvstore_cuda_staging_free(staging);
    if (kv && lease.seq.gen) kvstore_lease_release(kv, &lease, NULL);
    if (kc) kvstore_cuda_free(kc);
    if (kv) kvstore_close(kv);
    kvstore_destroy(name, &kp, NULL);
    free(toks);
    free(ref);
    free(lg);
    cuda_model_free(m);
}

/* The stage-0 probe cache layout (cuda-hip-impl.h), on the host: a slot for exactly the probes
 * of the first three descent levels (offsets m * lc / 16, m in 1..15 without 8), each slot
 * once, and offset(slot(o)) == o. */
static void test_pc_layout(void)
{
    static const int lcs[4] = {32, 64, 256, 512};
    for (int li = 0; li < 4; li++) {
        const int lc = lcs[li], step = lc / 16;
        int seen[CUDA_PC_SLOTS] = {0}, bad = 0;
        for (int o = 0; o < lc; o++) {
            const bool probe = o % step == 0 && o % (8 * step) != 0;
            const int sl = cuda_pc_slot((unsigned)o, lc);
            if (probe != (sl >= 0) || (sl >= 0 && (sl >= CUDA_PC_SLOTS ||
                                                   cuda_pc_offset(sl, lc) != o)))
                bad++;
            if (sl >= 0 && sl < CUDA_PC_SLOTS) seen[sl]++;
        }
        for (int sl = 0; sl < CUDA_PC_SLOTS; sl++) bad += seen[sl] != 1;
        CHECK(cuda_pc_lc_ok(lc) && bad == 0, "probe cache layout, chunk %d: %d mismatches", lc,
              bad);
    }
    CHECK(!cuda_pc_lc_ok(16) && !cuda_pc_lc_ok(40), "probe cache: chunks 16 and 40 refused");
}

int main(void)
{
    test_pc_layout();
    if (n_fail) {
        printf("%d passed, %d failed\n", n_pass, n_fail);
        return 1;
    }
    if (cuda_device_count() <= 0) {
        printf("skip: no CUDA device visible\n");
        return 77;
    }
    char desc[256];
    if (cuda_device_describe(0, desc, sizeof(desc)) == 0) printf("device: %s\n", desc);
    static hip_config fast, every;
    small_hip(&fast, false);
    small_hip(&every, true);
    const char *shapes[2] = {"tiny", "smollm2-135m"};
    for (int s = 0; s < 2; s++) {
        test_equal(shapes[s], &fast, "HiP fast (32,16,8)", CUDA_KV_BF16);
        test_equal(shapes[s], &every, "HiP refresh every step", CUDA_KV_BF16);
        test_equal(shapes[s], NULL, "dense", CUDA_KV_BF16);
    }
    test_equal("tiny", &fast, "HiP fast (32,16,8)", CUDA_KV_FP8);
    test_errors();
    const char *path = getenv("IHIP_MODEL");
    if (!path) path = "models/SmolLM2-135M-Instruct-Q4_1.gguf";
    test_real(path);
    test_spill();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
