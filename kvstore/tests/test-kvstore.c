/*
 * test-kvstore.c — unit tests of the kvstore: segments, the WRITING → READY lifecycle,
 * leases, pool exhaustion, prefix hashes and prefix reuse with shared blocks, the spill tier
 * (io_uring and pread), the pager, dead-process gc (exit without close, kill -9 while holding
 * the segment lock, heartbeat expiry), and corrupt headers / tables / block indices.
 *
 * After every scenario kvstore_check must find the segment consistent. Exit 0 pass, 1 fail;
 * last line "N passed, N failed".
 */
#define _POSIX_C_SOURCE 200809L
#include "kvtest.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>

static char g_dir[PATH_MAX];

static kvstore_geometry geom(uint32_t layers, uint32_t tpb)
{
    kvstore_geometry g = {0};
    g.model_fingerprint = UINT64_C(0x1234abcd5678ef01);
    g.n_layers = layers;
    g.n_kv_heads = 2;
    g.head_dim = 64;
    g.tokens_per_block = tpb;
    g.dtype = KVSTORE_DTYPE_F16;
    return g; /* bytes_per_block = 2*2*tpb*64*2 = 512*tpb */
}

static kvstore_params params(uint32_t ram, uint32_t spill)
{
    kvstore_params p = kvstore_default_params();
    p.dir = g_dir;
    p.n_ram_blocks = ram;
    p.n_spill_blocks = spill;
    p.spill_dir = spill ? g_dir : NULL;
    p.max_seqs = 32;
    p.max_blocks_per_seq = 256;
    p.max_leases = 64;
    p.max_owners = 16;
    p.lock_timeout_ms = 2000;
    return p;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Write a complete sequence of ntb token blocks (all layers); tokens may be NULL. */
static int write_seq(kvstore *kv, uint32_t ntb, const int32_t *tokens, uint32_t n_tokens,
                     kvstore_seq_ref *ref, kvstore_lease *lease, uint64_t seed)
{
    cm_err err = {0};
    const kvstore_geometry *g = kvstore_get_geometry(kv);
    int rc = kvstore_seq_create(kv, NULL, 0, ref, &err);
    if (rc) {
        fprintf(stderr, "create: %s\n", err.msg);
        return rc;
    }
    for (uint32_t tb = 0; tb < ntb; tb++)
        for (uint32_t l = 0; l < g->n_layers; l++) {
            void *d;
            rc = kvstore_block_alloc(kv, *ref, tb, l, &d, &err);
            if (rc) {
                fprintf(stderr, "alloc: %s\n", err.msg);
                return rc;
            }
            kvt_fill(d, g->bytes_per_block, ref->id, ref->gen, tb, l, seed);
        }
    rc = kvstore_seq_publish(kv, *ref, tokens, n_tokens, lease, &err);
    if (rc) fprintf(stderr, "publish: %s\n", err.msg);
    return rc;
}

/* Read every block of a leased sequence and verify it; returns blocks that failed. */
static int verify_seq(kvstore *kv, const kvstore_lease *l, uint32_t ntb, uint32_t prefix_tb)
{
    const kvstore_geometry *g = kvstore_get_geometry(kv);
    uint8_t *buf = cm_alloc_aligned(g->bytes_per_block, 4096);
    int bad = 0;
    for (uint32_t tb = 0; tb < ntb; tb++)
        for (uint32_t ly = 0; ly < g->n_layers; ly++) {
            cm_err err = {0};
            kvt_tag t;
            int rc = kvstore_block_read(kv, l, tb, ly, buf, &err);
            if (rc || kvt_verify(buf, g->bytes_per_block, tb, ly, &t) != 0 ||
                (tb >= prefix_tb && (t.seq != l->seq.id || t.gen != l->seq.gen))) {
                if (bad < 3)
                    fprintf(stderr, "verify seq %u tb %u layer %u: rc %d %s\n", l->seq.id, tb,
                            ly, rc, err.msg);
                bad++;
            }
        }
    cm_free_aligned(buf);
    return bad;
}

static void expect_consistent(kvstore *kv, const char *when)
{
    cm_err err = {0};
    int rc = kvstore_check(kv, &err);
    CHECK(rc == 0, "%s: check: %s", when, err.msg);
}

/* ---- segments ------------------------------------------------------------------------------- */

static void test_segment(void)
{
    cm_err err = {0};
    kvstore_geometry g = geom(4, 16);
    kvstore_params p = params(64, 0);
    CHECK(kvstore_geometry_finish(&g, &err) == 0 && g.bytes_per_block == 2 * 2 * 16 * 64 * 2,
          "bytes per block %llu", (unsigned long long)g.bytes_per_block);
    CHECK(kvstore_create("bad/name", &g, &p, &err) == -EINVAL, "bad name accepted");
    CHECK(kvstore_create("seg", &g, &p, &err) == 0, "create: %s", err.msg);
    CHECK(kvstore_create("seg", &g, &p, &err) == -EEXIST, "second create: %d", err.code);
    kvstore *kv = NULL;
    CHECK(kvstore_open("nope", &p, NULL, &kv, &err) == -KVSTORE_ENOTFOUND, "open missing");
    kvstore_geometry other = g;
    other.n_layers = 5;
    CHECK(kvstore_open("seg", &p, &other, &kv, &err) == -KVSTORE_EGEOMETRY,
          "geometry mismatch: %s", err.msg);
    CHECK(kvstore_open("seg", &p, &g, &kv, &err) == 0, "open: %s", err.msg);
    if (kv) {
        const kvstore_geometry *gg = kvstore_get_geometry(kv);
        CHECK(gg->n_layers == 4 && gg->tokens_per_block == 16 &&
                  gg->model_fingerprint == g.model_fingerprint,
              "geometry read back");
        kvstore_stats st;
        CHECK(kvstore_get_stats(kv, &st, &err) == 0 && st.ram_free == 64 && st.blocks_used == 0,
              "fresh stats");
        expect_consistent(kv, "fresh");
        kvstore_close(kv);
    }
    CHECK(kvstore_destroy("seg", &p, &err) == 0, "destroy: %s", err.msg);
    CHECK(kvstore_open("seg", &p, NULL, &kv, &err) == -KVSTORE_ENOTFOUND, "open destroyed");
}

/* ---- lifecycle --------------------------------------------------------------------------------- */

static void test_lifecycle(void)
{
    cm_err err = {0};
    kvstore_geometry g = geom(4, 16);
    kvstore_params p = params(64, 0);
    kvstore *kv = NULL;
    if (kvstore_create("life", &g, &p, &err) || kvstore_open("life", &p, &g, &kv, &err)) {
        CHECK(0, "setup: %s", err.msg);
        return;
    }
    kvstore_seq_ref ref;
    CHECK(kvstore_seq_create(kv, NULL, 0, &ref, &err) == 0, "create: %s", err.msg);
    void *d;
    CHECK(kvstore_block_alloc(kv, ref, 0, 4, &d, &err) == -EINVAL, "layer out of range");
    /* 2.5 token blocks of tokens → 3 token blocks × 4 layers */
    for (uint32_t tb = 0; tb < 3; tb++)
        for (uint32_t l = 0; l < 4; l++) {
            if (tb == 2 && l == 3) continue; /* leave one missing */
            CHECK(kvstore_block_alloc(kv, ref, tb, l, &d, &err) == 0, "alloc: %s", err.msg);
            kvt_fill(d, g.bytes_per_block ? g.bytes_per_block : 8192, ref.id, ref.gen, tb, l, 7);
        }
    kvstore_lease lease;
    CHECK(kvstore_lease_acquire(kv, ref, &lease, &err) == -KVSTORE_ESTATE,
          "lease on WRITING: %d", err.code);
    int32_t toks[40];
    for (int i = 0; i < 40; i++) toks[i] = 100 + i;
    CHECK(kvstore_seq_publish(kv, ref, toks, 40, &lease, &err) == -KVSTORE_EINCOMPLETE,
          "publish incomplete: %s", err.msg);
    CHECK(kvstore_seq_publish(kv, ref, toks, 20, &lease, &err) == -EINVAL,
          "publish with blocks past n_tokens: %s", err.msg);
    /* the same block is handed out again while WRITING */
    void *d2, *d3;
    CHECK(kvstore_block_alloc(kv, ref, 1, 1, &d2, &err) == 0 &&
              kvstore_block_alloc(kv, ref, 1, 1, &d3, &err) == 0 && d2 == d3,
          "realloc same block");
    CHECK(kvstore_block_alloc(kv, ref, 2, 3, &d, &err) == 0, "alloc last");
    kvt_fill(d, kvstore_get_geometry(kv)->bytes_per_block, ref.id, ref.gen, 2, 3, 7);
    kvstore_stats st;
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 12 && st.seqs_writing == 1 && st.ram_free == 52,
          "stats while writing: used %u writing %u free %u", st.blocks_used, st.seqs_writing,
          st.ram_free);
    expect_consistent(kv, "writing");
    CHECK(kvstore_seq_publish(kv, ref, toks, 40, &lease, &err) == 0, "publish: %s", err.msg);
    CHECK(kvstore_seq_publish(kv, ref, toks, 40, &lease, &err) == -KVSTORE_ESTATE,
          "publish twice");
    CHECK(kvstore_block_alloc(kv, ref, 0, 0, &d, &err) == -KVSTORE_ESTATE, "write after publish");
    kvstore_lease l2;
    CHECK(kvstore_lease_acquire(kv, ref, &l2, &err) == 0, "second lease: %s", err.msg);
    CHECK(verify_seq(kv, &l2, 3, 0) == 0, "verify");
    kvstore_seq_info info;
    CHECK(kvstore_seq_get_info(kv, ref, &info, &err) == 0 && info.state == KVSTORE_SEQ_READY &&
              info.n_leases == 2 && info.n_tokens == 40 && info.n_tblocks == 3,
          "info: state %u leases %u", info.state, info.n_leases);
    uint8_t buf[8192];
    CHECK(kvstore_block_read(kv, &l2, 3, 0, buf, &err) == -EINVAL, "read past end");
    expect_consistent(kv, "ready");
    CHECK(kvstore_lease_release(kv, &lease, &err) == 0, "release 1");
    CHECK(kvstore_lease_release(kv, &lease, &err) == -KVSTORE_ESTALE, "release twice");
    CHECK(kvstore_seq_get_info(kv, ref, &info, &err) == 0 && info.n_leases == 1, "one lease");
    CHECK(kvstore_lease_release(kv, &l2, &err) == 0, "release 2");
    CHECK(kvstore_seq_get_info(kv, ref, &info, &err) == -KVSTORE_ESTALE, "freed with last lease");
    CHECK(kvstore_block_read(kv, &l2, 0, 0, buf, &err) == -KVSTORE_ESTALE, "read after release");
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.ram_free == 64 && st.seqs_ready == 0 && st.leases == 0 &&
              st.n_alloc == 12 && st.n_free == 12,
          "all back: used %u free %u alloc %llu free %llu", st.blocks_used, st.ram_free,
          (unsigned long long)st.n_alloc, (unsigned long long)st.n_free);

    /* abort frees */
    CHECK(kvstore_seq_create(kv, NULL, 0, &ref, &err) == 0, "create 2");
    CHECK(kvstore_block_alloc(kv, ref, 0, 0, &d, &err) == 0, "alloc");
    CHECK(kvstore_seq_abort(kv, ref, &err) == 0, "abort: %s", err.msg);
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.seqs_writing == 0, "abort freed");

    /* pool exhaustion without a spill tier: EFULL, and nothing leaks */
    CHECK(kvstore_seq_create(kv, NULL, 0, &ref, &err) == 0, "create 3");
    int rc = 0;
    uint32_t n = 0;
    for (uint32_t tb = 0; tb < 64 && rc == 0; tb++)
        for (uint32_t l = 0; l < 4 && rc == 0; l++) {
            rc = kvstore_block_alloc(kv, ref, tb, l, &d, &err);
            n += rc == 0;
        }
    CHECK(rc == -KVSTORE_EFULL && n == 64, "EFULL after 64 blocks: rc %d n %u", rc, n);
    expect_consistent(kv, "full");
    kvstore_seq_abort(kv, ref, &err);

    /* table limits: sequences */
    kvstore_seq_ref refs[33];
    int made = 0;
    for (int i = 0; i < 33; i++)
        if (kvstore_seq_create(kv, NULL, 0, &refs[made], &err) == 0) made++;
        else CHECK(err.code == -KVSTORE_EFULL, "seq table full: %s", err.msg);
    CHECK(made == 32, "32 sequences");
    for (int i = 0; i < made; i++) kvstore_seq_abort(kv, refs[i], &err);
    expect_consistent(kv, "after limits");
    kvstore_close(kv);
    kvstore_destroy("life", &p, &err);
}

/* ---- prefix reuse ---------------------------------------------------------------------------- */

static void test_prefix(void)
{
    cm_err err = {0};
    /* hashes: equal prefixes give equal hashes up to the divergence, not after */
    int32_t a[100], b[100];
    for (int i = 0; i < 100; i++) a[i] = b[i] = i * 7 + 3;
    b[50] = -1;
    uint64_t ha[10], hb[10], hc[10];
    CHECK(kvstore_prefix_hashes(1, 16, a, 100, ha, 10) == 6, "6 full blocks of 16 in 100");
    kvstore_prefix_hashes(1, 16, b, 100, hb, 10);
    kvstore_prefix_hashes(2, 16, a, 100, hc, 10);
    CHECK(ha[0] == hb[0] && ha[1] == hb[1] && ha[2] == hb[2], "shared prefix hashes equal");
    CHECK(ha[3] != hb[3] && ha[4] != hb[4] && ha[5] != hb[5], "diverged hashes differ");
    int same = 0;
    for (int i = 0; i < 6; i++) same += ha[i] == hc[i];
    CHECK(same == 0, "fingerprint changes every hash");

    kvstore_geometry g = geom(3, 16);
    kvstore_params p = params(128, 0);
    kvstore *kv = NULL;
    if (kvstore_create("pfx", &g, &p, &err) || kvstore_open("pfx", &p, &g, &kv, &err)) {
        CHECK(0, "setup: %s", err.msg);
        return;
    }
    int32_t toks[200];
    for (int i = 0; i < 200; i++) toks[i] = 1000 + i;
    kvstore_seq_ref ra;
    kvstore_lease la;
    /* A: 70 tokens → 5 token blocks, 4 full */
    CHECK(write_seq(kv, 5, toks, 70, &ra, &la, 11) == 0, "write A");
    kvstore_lease lk;
    uint32_t n = 0;
    CHECK(kvstore_prefix_lookup(kv, toks, 15, &lk, &n, &err) == -KVSTORE_ENOTFOUND,
          "shorter than a block");
    int32_t q[200];
    memcpy(q, toks, sizeof(q));
    q[40] = 7; /* diverges inside token block 2 */
    CHECK(kvstore_prefix_lookup(kv, q, 150, &lk, &n, &err) == 0 && n == 2 && lk.seq.id == ra.id,
          "lookup: rc %d n %u: %s", err.code, n, err.msg);
    kvstore_lease_release(kv, &lk, &err);
    CHECK(kvstore_prefix_lookup(kv, toks, 200, &lk, &n, &err) == 0 && n == 4,
          "full match limited to A's 4 full blocks: n %u", n);
    kvstore_lease_release(kv, &lk, &err);
    int32_t other[64];
    for (int i = 0; i < 64; i++) other[i] = 5;
    CHECK(kvstore_prefix_lookup(kv, other, 64, &lk, &n, &err) == -KVSTORE_ENOTFOUND, "no match");

    /* B shares A's first 3 token blocks, then writes 3 of its own */
    kvstore_lease lp;
    CHECK(kvstore_prefix_lookup(kv, toks, 200, &lp, &n, &err) == 0, "lookup for B");
    kvstore_seq_ref rb;
    CHECK(kvstore_seq_create(kv, &lp, 5, &rb, &err) == -EINVAL, "prefix past full blocks");
    CHECK(kvstore_seq_create(kv, &lp, 3, &rb, &err) == 0, "create B: %s", err.msg);
    kvstore_lease_release(kv, &lp, &err);
    void *d;
    CHECK(kvstore_block_alloc(kv, rb, 1, 0, &d, &err) == -KVSTORE_ESTATE, "shared is read-only");
    for (uint32_t tb = 3; tb < 6; tb++)
        for (uint32_t l = 0; l < 3; l++) {
            CHECK(kvstore_block_alloc(kv, rb, tb, l, &d, &err) == 0, "alloc B");
            kvt_fill(d, kvstore_get_geometry(kv)->bytes_per_block, rb.id, rb.gen, tb, l, 12);
        }
    kvstore_stats st;
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_shared == 9 && st.blocks_used == 15 + 9, "shared %u used %u",
          st.blocks_shared, st.blocks_used);
    kvstore_lease lb;
    int32_t wrong[96];
    memcpy(wrong, toks, sizeof(wrong));
    wrong[3] = 0;
    CHECK(kvstore_seq_publish(kv, rb, wrong, 96, &lb, &err) == -EINVAL,
          "publish with tokens that differ from the shared prefix: %s", err.msg);
    int32_t tb_[96];
    memcpy(tb_, toks, sizeof(tb_));
    tb_[70] = 9999; /* B's own tokens after the shared 48 */
    CHECK(kvstore_seq_publish(kv, rb, tb_, 96, &lb, &err) == 0, "publish B: %s", err.msg);
    expect_consistent(kv, "shared");
    /* A goes away; B keeps the shared blocks */
    CHECK(kvstore_lease_release(kv, &la, &err) == 0, "release A");
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 18 && st.blocks_shared == 0 && st.seqs_ready == 1,
          "after A: used %u shared %u", st.blocks_used, st.blocks_shared);
    CHECK(verify_seq(kv, &lb, 6, 3) == 0, "B reads A's prefix blocks and its own");
    /* lookup now finds B: 4 full blocks match toks (tb 3 = tokens 48..63 equal), then 70 differs */
    CHECK(kvstore_prefix_lookup(kv, toks, 200, &lk, &n, &err) == 0 && lk.seq.id == rb.id && n == 4,
          "lookup B: n %u", n);
    kvstore_lease_release(kv, &lk, &err);
    CHECK(kvstore_lease_release(kv, &lb, &err) == 0, "release B");
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.ram_free == 128 && st.n_prefix_hits == 4,
          "all free: used %u hits %llu", st.blocks_used, (unsigned long long)st.n_prefix_hits);
    expect_consistent(kv, "prefix end");
    kvstore_close(kv);
    kvstore_destroy("pfx", &p, &err);
}

/* ---- spill tier and pager ---------------------------------------------------------------------- */

static _Atomic int n_done_cb;
static void done_cb(kvstore_batch *b, void *user)
{
    (void)b;
    (void)user;
    atomic_fetch_add(&n_done_cb, 1);
}

static void test_spill(int backend)
{
    cm_err err = {0};
    kvstore_geometry g = geom(2, 16); /* 8 KiB blocks */
    kvstore_params p = params(16, 64);
    p.io_backend = backend;
    p.spill_batch = 4;
    kvstore *kv = NULL;
    if (kvstore_create("spill", &g, &p, &err)) {
        CHECK(0, "setup: %s", err.msg);
        return;
    }
    if (kvstore_open("spill", &p, &g, &kv, &err)) {
        bool no_uring = backend == KVSTORE_IO_URING && err.code != -KVSTORE_ECORRUPT;
        if (no_uring) printf("io_uring unavailable here (%s): that variant skipped\n", err.msg);
        CHECK(no_uring, "open: %s", err.msg);
        kvstore_destroy("spill", &p, &err);
        return;
    }
    CHECK(strcmp(kvstore_io_name(kv), backend == KVSTORE_IO_PREAD ? "pread" : "io_uring") == 0,
          "backend %s", kvstore_io_name(kv));
    /* 8 sequences × 4 token blocks × 2 layers = 64 blocks through a 16-block RAM pool */
    kvstore_seq_ref refs[8];
    kvstore_lease leases[8];
    int ok = 1;
    const uint64_t sc0 = kvstore_spill_count(kv);
    CHECK(sc0 == 0, "spill count of a new segment %llu", (unsigned long long)sc0);
    for (int s = 0; s < 8 && ok; s++) {
        ok = write_seq(kv, 4, NULL, 64, &refs[s], &leases[s], 100 + (uint64_t)s) == 0;
        CHECK(ok, "write seq %d", s);
    }
    kvstore_stats st;
    kvstore_get_stats(kv, &st, &err);
    /* the lock-free count an in-place reader watches is the stats' n_spill_out */
    CHECK(kvstore_spill_count(kv) == st.n_spill_out && st.n_spill_out > 0,
          "spill count %llu vs n_spill_out %llu", (unsigned long long)kvstore_spill_count(kv),
          (unsigned long long)st.n_spill_out);
    CHECK(st.blocks_used == 64 && st.blocks_spilled >= 48 && st.n_spill_out >= 48 &&
              st.blocks_ram + st.ram_free == 16 && st.blocks_spilled + st.spill_free == 64,
          "spilled: used %u spilled %u ram %u ram_free %u", st.blocks_used, st.blocks_spilled,
          st.blocks_ram, st.ram_free);
    expect_consistent(kv, "spilled");
    for (int s = 0; s < 8; s++) CHECK(verify_seq(kv, &leases[s], 4, 0) == 0, "verify seq %d", s);
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.n_spill_in >= 48, "read back %llu from spill", (unsigned long long)st.n_spill_in);

    /* pager: all 64 blocks in 8 batches, destinations aligned (O_DIRECT path) */
    kvstore_pager *pg = NULL;
    CHECK(kvstore_pager_init(kv, &pg, &err) == 0, "pager: %s", err.msg);
    if (pg) {
        uint64_t bpb = kvstore_get_geometry(kv)->bytes_per_block;
        uint8_t *bufs = cm_alloc_aligned(64 * bpb + 1, 4096);
        kvstore_copy copies[8][8];
        kvstore_batch batches[8];
        memset(batches, 0, sizeof(batches));
        n_done_cb = 0;
        for (int s = 0; s < 8; s++) {
            for (int i = 0; i < 8; i++) {
                copies[s][i].tb = (uint32_t)i / 2;
                copies[s][i].layer = (uint32_t)i % 2;
                copies[s][i].dst = bufs + (size_t)(s * 8 + i) * bpb;
            }
            batches[s].lease = leases[s];
            batches[s].copies = copies[s];
            batches[s].n_copies = 8;
            batches[s].done = done_cb;
            CHECK(kvstore_pager_submit(pg, &batches[s]) == 0, "submit");
        }
        int bad = 0;
        for (int s = 0; s < 8; s++) {
            int rc = kvstore_pager_wait(pg, &batches[s], 10000);
            CHECK(rc == 0, "batch %d: %d", s, rc);
            for (int i = 0; i < 8; i++) {
                kvt_tag t;
                if (copies[s][i].status ||
                    kvt_verify(copies[s][i].dst, bpb, copies[s][i].tb, copies[s][i].layer, &t) ||
                    t.seq != refs[s].id || t.gen != refs[s].gen)
                    bad++;
            }
        }
        CHECK(bad == 0 && atomic_load(&n_done_cb) == 8, "pager copies: %d bad, %d callbacks", bad, atomic_load(&n_done_cb));
        /* unaligned destinations take the buffered path */
        kvstore_copy c1 = {0, 1, bufs + 1, 0};
        kvstore_batch b1;
        memset(&b1, 0, sizeof(b1));
        b1.lease = leases[0];
        b1.copies = &c1;
        b1.n_copies = 1;
        kvstore_pager_submit(pg, &b1);
        CHECK(kvstore_pager_wait(pg, &b1, 10000) == 0 && kvt_verify(bufs + 1, bpb, 0, 1, NULL) == 0,
              "unaligned copy");
        /* a bad request fails alone */
        kvstore_copy c2[2] = {{9, 0, bufs, 0}, {0, 0, bufs + bpb, 0}};
        b1.copies = c2;
        b1.n_copies = 2;
        kvstore_pager_submit(pg, &b1);
        int rc = kvstore_pager_wait(pg, &b1, 10000);
        CHECK(rc == -EINVAL && c2[0].status == -EINVAL && c2[1].status == 0,
              "bad copy fails alone: %d %d %d", rc, c2[0].status, c2[1].status);
        kvstore_pager_free(pg);
        cm_free_aligned(bufs);
    }
    /* freeing spilled sequences returns spill slots */
    for (int s = 0; s < 8; s++) kvstore_lease_release(kv, &leases[s], &err);
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.ram_free == 16 && st.spill_free == 64,
          "all free after spill: ram %u spill %u", st.ram_free, st.spill_free);
    expect_consistent(kv, "spill end");
    /* spill tier full too: EFULL */
    kvstore_seq_ref r;
    kvstore_lease l;
    int s_ok = 0;
    for (int s = 0; s < 12; s++) {
        if (write_seq(kv, 4, NULL, 64, &r, &l, 5) != 0) break;
        s_ok++;
    }
    CHECK(s_ok == 10, "10 sequences fit RAM + spill (80 blocks), got %d", s_ok);
    expect_consistent(kv, "spill full");
    kvstore_close(kv); /* releases our leases, aborts the partial sequence */
    kvstore *kv2 = NULL;
    if (kvstore_open("spill", &p, &g, &kv2, &err) == 0) {
        kvstore_get_stats(kv2, &st, &err);
        CHECK(st.blocks_used == 0 && st.leases == 0 && st.owners == 0,
              "close released everything: used %u leases %u", st.blocks_used, st.leases);
        expect_consistent(kv2, "after close");
        kvstore_close(kv2);
    }
    kvstore_destroy("spill", &p, &err);
}

/* ---- dead processes ---------------------------------------------------------------------------- */

static void test_dead(void)
{
    cm_err err = {0};
    kvstore_geometry g = geom(2, 16);
    kvstore_params p = params(64, 0);
    p.lease_ttl_ms = 400;
    kvstore *kv = NULL;
    if (kvstore_create("dead", &g, &p, &err) || kvstore_open("dead", &p, &g, &kv, &err)) {
        CHECK(0, "setup: %s", err.msg);
        return;
    }
    /* a child publishes one sequence, leaves another WRITING, and exits without close */
    pid_t pid = fork();
    if (pid == 0) {
        kvstore *c = NULL;
        kvstore_seq_ref r, w;
        kvstore_lease l;
        void *d;
        if (kvstore_open("dead", &p, &g, &c, NULL) || write_seq(c, 3, NULL, 48, &r, &l, 1) ||
            kvstore_seq_create(c, NULL, 0, &w, NULL) || kvstore_block_alloc(c, w, 0, 0, &d, NULL))
            _exit(3);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child 1 status %d", status);
    kvstore_stats st;
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 7 && st.owners == 1 && st.leases == 1, "child left 7 blocks: %u",
          st.blocks_used);
    kvstore_gc_result gr;
    CHECK(kvstore_gc(kv, &gr, &err) == 0, "gc: %s", err.msg);
    CHECK(gr.owners_reaped == 1 && gr.leases_released == 1 && gr.seqs_freed == 2,
          "gc reaped %u owners %u leases %u seqs", gr.owners_reaped, gr.leases_released,
          gr.seqs_freed);
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.ram_free == 64 && st.owners == 0, "all back after gc");
    expect_consistent(kv, "after gc");

    /* a child killed (kill -9) while holding the segment lock, in the middle of an allocation
     * (block popped, manifest not yet written) */
    pid = fork();
    if (pid == 0) {
        kvstore *c = NULL;
        kvstore_seq_ref w;
        void *d;
        if (kvstore_open("dead", &p, &g, &c, NULL) || kvstore_seq_create(c, NULL, 0, &w, NULL) ||
            kvstore_block_alloc(c, w, 0, 0, &d, NULL))
            _exit(3);
        kvs_lock(c, NULL);
        uint32_t b, r;
        kvs_pop_locked(c, KVS_STACK_BLOCKS, &b, NULL);
        kvs_pop_locked(c, KVS_STACK_RAM, &r, NULL);
        atomic_store(&c->blocks[b].locw, kvs_locw_make(1, KVS_TIER_RAM, r));
        c->blocks[b].ref = 1;
        kill(getpid(), SIGKILL);
        _exit(4);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child 2 killed");
    /* the next lock recovers: rebuild frees the half-allocated block */
    CHECK(kvstore_get_stats(kv, &st, &err) == 0, "stats after dead lock holder: %s", err.msg);
    CHECK(st.n_lock_recoveries == 1 && st.blocks_used == 1 && st.ram_free == 63,
          "recovered: recoveries %llu used %u free %u", (unsigned long long)st.n_lock_recoveries,
          st.blocks_used, st.ram_free);
    expect_consistent(kv, "after recovery");
    CHECK(kvstore_gc(kv, &gr, &err) == 0 && gr.owners_reaped == 1 && gr.seqs_freed == 1,
          "gc after recovery");
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.ram_free == 64, "all back");

    /* heartbeat: a live child without a heartbeat thread expires after the TTL; one with the
     * thread does not */
    int pfd[2];
    if (pipe(pfd) != 0) return;
    pid_t quiet = fork();
    if (quiet == 0) {
        kvstore_params cp = p;
        cp.heartbeat_thread = false;
        kvstore *c = NULL;
        kvstore_seq_ref r;
        kvstore_lease l;
        if (kvstore_open("dead", &cp, &g, &c, NULL) || write_seq(c, 1, NULL, 16, &r, &l, 2))
            _exit(3);
        char x = 1;
        if (write(pfd[1], &x, 1) != 1) _exit(5);
        sleep_ms(3000);
        _exit(0);
    }
    pid_t beating = fork();
    if (beating == 0) {
        kvstore *c = NULL;
        kvstore_seq_ref r;
        kvstore_lease l;
        if (kvstore_open("dead", &p, &g, &c, NULL) || write_seq(c, 1, NULL, 16, &r, &l, 3))
            _exit(3);
        char x = 1;
        if (write(pfd[1], &x, 1) != 1) _exit(5);
        sleep_ms(3000);
        _exit(0);
    }
    char x;
    CHECK(read(pfd[0], &x, 1) == 1 && read(pfd[0], &x, 1) == 1, "children ready");
    sleep_ms(900); /* > TTL of 400 ms */
    CHECK(kvstore_gc(kv, &gr, &err) == 0 && gr.owners_reaped == 1 && gr.leases_released == 1,
          "heartbeat expiry reaps exactly the quiet child: %u", gr.owners_reaped);
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.owners == 1 && st.seqs_ready == 1, "beating child kept: owners %u ready %u",
          st.owners, st.seqs_ready);
    kill(quiet, SIGKILL);
    kill(beating, SIGKILL);
    waitpid(quiet, &status, 0);
    waitpid(beating, &status, 0);
    close(pfd[0]);
    close(pfd[1]);
    CHECK(kvstore_gc(kv, &gr, &err) == 0 && gr.owners_reaped == 1, "killed child reaped");
    kvstore_get_stats(kv, &st, &err);
    CHECK(st.blocks_used == 0 && st.owners == 0, "nothing left");

    /* allocation pressure reaps dead owners by itself */
    pid = fork();
    if (pid == 0) {
        kvstore *c = NULL;
        kvstore_seq_ref r;
        kvstore_lease l;
        if (kvstore_open("dead", &p, &g, &c, NULL) || write_seq(c, 30, NULL, 480, &r, &l, 4))
            _exit(3);
        kill(getpid(), SIGKILL);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    kvstore_seq_ref r;
    kvstore_lease l;
    CHECK(write_seq(kv, 20, NULL, 320, &r, &l, 5) == 0, "allocation reaped the dead writer");
    kvstore_lease_release(kv, &l, &err);
    expect_consistent(kv, "pressure gc");
    kvstore_close(kv);
    kvstore_destroy("dead", &p, &err);
}

/* ---- corruption ----------------------------------------------------------------------------------- */

/* Patch bytes of the segment file at off. */
static void patch(const char *path, uint64_t off, const void *data, size_t n)
{
    int fd = open(path, O_RDWR);
    if (fd < 0 || pwrite(fd, data, n, (off_t)off) != (ssize_t)n) fprintf(stderr, "patch failed\n");
    if (fd >= 0) close(fd);
}

static void test_corrupt(void)
{
    cm_err err = {0};
    kvstore_geometry g = geom(2, 16);
    kvstore_params p = params(32, 0);
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/ihip-bad", g_dir);
    kvstore *kv = NULL;

    /* header: magic, checksum, truncation, version */
    struct {
        const char *what;
        uint64_t off;
        uint32_t val;
        int code;
        const char *needle;
    } hdr_cases[] = {
        {"magic", 0, 0x12345678, -KVSTORE_ECORRUPT, "magic"},
        {"version", offsetof(struct kvs_imm, version), 99, -KVSTORE_EVERSION, "version"},
        {"layers", offsetof(struct kvs_imm, geom) + offsetof(kvstore_geometry, n_layers), 3,
         -KVSTORE_ECORRUPT, "checksum"},
        {"ram", offsetof(struct kvs_imm, n_ram), 1u << 29, -KVSTORE_ECORRUPT, "checksum"},
    };
    for (size_t i = 0; i < CM_ARRAY_LEN(hdr_cases); i++) {
        kvstore_destroy("bad", &p, NULL);
        kvstore_create("bad", &g, &p, &err);
        patch(path, hdr_cases[i].off, &hdr_cases[i].val, 4);
        int rc = kvstore_open("bad", &p, NULL, &kv, &err);
        CHECK(rc == hdr_cases[i].code && strstr(err.msg, hdr_cases[i].needle),
              "%s: rc %d msg '%s'", hdr_cases[i].what, rc, err.msg);
        if (rc == 0) kvstore_close(kv);
    }
    kvstore_destroy("bad", &p, NULL);
    kvstore_create("bad", &g, &p, &err);
    CHECK(truncate(path, 8192) == 0, "truncate");
    CHECK(kvstore_open("bad", &p, NULL, &kv, &err) == -KVSTORE_ECORRUPT &&
              strstr(err.msg, "truncated"),
          "truncated: %s", err.msg);
    CHECK(truncate(path, 100) == 0, "truncate");
    CHECK(kvstore_open("bad", &p, NULL, &kv, &err) == -KVSTORE_ECORRUPT, "tiny: %s", err.msg);

    /* tables: build a READY sequence, then corrupt one field at a time */
    struct {
        const char *what;
        int kind;
    } cases[] = {
        {"manifest entry past n_blocks", 0}, {"sequence n_tblocks", 1},
        {"free stack top", 2},               {"lease names bad sequence", 3},
        {"block location slot", 4},          {"sequence state", 5},
        {"two blocks in one slot", 6},       {"free stack entry", 7},
    };
    for (size_t i = 0; i < CM_ARRAY_LEN(cases); i++) {
        kvstore_destroy("bad", &p, NULL);
        kv = NULL;
        if (kvstore_create("bad", &g, &p, &err) || kvstore_open("bad", &p, &g, &kv, &err)) {
            CHECK(0, "setup: %s", err.msg);
            return;
        }
        kvstore_seq_ref r;
        kvstore_lease l;
        write_seq(kv, 3, NULL, 48, &r, &l, 9);
        uint32_t big = 0x7fffffff;
        switch (cases[i].kind) {
        case 0: kvs_st32(&kvs_row(kv, r.id)[2], 1000); break;
        case 1: kv->seqs[r.id].n_tblocks = big; break;
        case 2: kv->hdr->mut.free_blocks_top = big; break;
        case 3: kv->leases[l.slot].seq = big; break;
        case 4:
            atomic_store(&kv->blocks[0].locw, kvs_locw_make(5, KVS_TIER_RAM, 999));
            break;
        case 5: atomic_store(&kv->seqs[r.id].state, 77u); break;
        case 6:
            atomic_store(&kv->blocks[1].locw, atomic_load(&kv->blocks[0].locw));
            break;
        case 7: kv->free_blocks[0] = big; break;
        }
        cm_err e1 = {0}, e2 = {0}, e3 = {0}, e4 = {0};
        int rc_check = kvstore_check(kv, &e1);
        CHECK(rc_check == -KVSTORE_ECORRUPT && strstr(e1.msg, "kvstore"),
              "%s: check rc %d '%s'", cases[i].what, rc_check, e1.msg);
        /* ordinary operations must fail cleanly or work, never crash */
        uint8_t *buf = cm_alloc_aligned(kvstore_get_geometry(kv)->bytes_per_block, 4096);
        for (uint32_t tb = 0; tb < 3; tb++)
            for (uint32_t ly = 0; ly < 2; ly++) kvstore_block_read(kv, &l, tb, ly, buf, &e2);
        cm_free_aligned(buf);
        kvstore_seq_ref r2;
        void *d;
        if (kvstore_seq_create(kv, NULL, 0, &r2, &e3) == 0)
            for (int k = 0; k < 40; k++)
                if (kvstore_block_alloc(kv, r2, (uint32_t)k, 0, &d, &e3)) break;
        kvstore_stats st;
        kvstore_get_stats(kv, &st, &e4);
        kvstore_gc_result gr;
        int rc_gc = kvstore_gc(kv, &gr, &e4);
        uint32_t n;
        kvstore_seq_info infos[40];
        kvstore_seq_list(kv, infos, 40, &n, &e4);
        kvstore_lease_release(kv, &l, &e4);
        int32_t toks[64] = {0};
        kvstore_lease lk;
        kvstore_prefix_lookup(kv, toks, 64, &lk, &n, &e4);
        /* gc either repaired it (derived fields) or reported it (primary records) */
        if (cases[i].kind == 2 || cases[i].kind == 7)
            CHECK(rc_gc == 0 && kvstore_check(kv, &e4) == 0, "%s: gc repairs it: %s",
                  cases[i].what, e4.msg);
        else
            CHECK(rc_gc == -KVSTORE_ECORRUPT, "%s: gc reports it: %d", cases[i].what, rc_gc);
        kvstore_close(kv);
    }
    kvstore_destroy("bad", &p, NULL);

    /* stale and foreign handles are errors, not crashes */
    if (kvstore_create("bad", &g, &p, &err) == 0 && kvstore_open("bad", &p, &g, &kv, &err) == 0) {
        kvstore_seq_ref r = {5000, 1};
        kvstore_lease l = {9999, 1, {0, 0}};
        void *d;
        uint8_t buf[16];
        CHECK(kvstore_block_alloc(kv, r, 0, 0, &d, &err) == -EINVAL, "bad seq id");
        CHECK(kvstore_lease_release(kv, &l, &err) == -EINVAL, "bad lease slot");
        CHECK(kvstore_block_read(kv, &l, 0, 0, buf, &err) == -KVSTORE_ESTALE, "bad lease read");
        kvstore_close(kv);
    }
    kvstore_destroy("bad", &p, NULL);
}

int main(void)
{
    cm_log_level = CM_LOG_LEVEL_WARN;
    kvt_dir(g_dir, sizeof(g_dir), "unit");
    test_segment();
    test_lifecycle();
    test_prefix();
#ifdef KVSTORE_HAVE_LIBURING
    test_spill(KVSTORE_IO_URING);
#endif
    test_spill(KVSTORE_IO_PREAD);
    test_dead();
    test_corrupt();
    kvt_rmdir(g_dir);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
