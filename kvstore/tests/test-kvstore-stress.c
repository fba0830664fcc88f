/*
 * test-kvstore-stress.c — many processes on one segment, killed at random with SIGKILL.
 *
 * W writer processes create sequences (half of them sharing a prefix found by
 * kvstore_prefix_lookup), fill their blocks in two halves with a pause between, publish
 * (or abort), and hold a few leases. R reader processes lease random READY sequences and read
 * every block (synchronously or through a pager), checking each one is complete and belongs
 * to that sequence (or, for shared prefix blocks, to a sequence with the same tokens). The
 * RAM pool is small, so blocks spill to disk and come back. The parent kills a random child
 * every few tens of milliseconds and starts a new one; now and then a child takes the
 * segment lock, half-does an allocation and kills itself while holding it. Every few hundred
 * milliseconds the parent runs the full consistency check and the stats identities
 * (RAM blocks + free RAM slots = RAM pool; spilled + moving + free spill slots = spill
 * tier). At the end every child is killed, gc runs, and every block, slot, sequence, lease
 * and owner must be free again.
 *
 * Env: IHIP_KV_STRESS_SECONDS (default 15). Exit 0 pass, 1 fail; last line "N passed, N failed".
 */
#define _POSIX_C_SOURCE 200809L
#include "kvtest.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>

#define N_WRITERS 3
#define N_READERS 3
#define N_LAYERS 4
#define TPB 16

struct shared {
    _Atomic uint64_t verified, bad, unexpected, published, aborted, prefix_reused, lease_ok;
    _Atomic int bad_logged;
    char first_bad[512];
};

static struct shared *SH;
static char g_dir[PATH_MAX];
static kvstore_params g_p;
static kvstore_geometry g_g;

static uint64_t rng_state;
static uint32_t rnd(uint32_t n)
{
    return (uint32_t)(kvt_next(&rng_state) % (n ? n : 1));
}

static void report_bad(const char *fmt, uint32_t a, uint32_t b, uint32_t c, int d)
{
    atomic_fetch_add(&SH->bad, 1);
    if (atomic_exchange(&SH->bad_logged, 1) == 0)
        snprintf(SH->first_bad, sizeof(SH->first_bad), fmt, a, b, c, d);
}

static void unexpected(const char *where, const cm_err *e)
{
    atomic_fetch_add(&SH->unexpected, 1);
    fprintf(stderr, "pid %ld unexpected in %s: %s\n", (long)getpid(), where, e->msg);
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* Tokens of "family" f: position i → f * 100000 + i for the first 48, then per-seq noise. */
static void make_tokens(int32_t *t, uint32_t n, uint32_t family, uint32_t noise)
{
    for (uint32_t i = 0; i < n; i++)
        t[i] = i < 48 ? (int32_t)(family * 100000 + i) : (int32_t)(noise * 7919 + i);
}

static void writer_main(void)
{
    kvstore *kv = NULL;
    cm_err err = {0};
    if (kvstore_open("stress", &g_p, &g_g, &kv, &err)) {
        unexpected("writer open", &err);
        _exit(2);
    }
    const uint64_t bpb = kvstore_get_geometry(kv)->bytes_per_block;
    kvstore_lease held[3];
    int n_held = 0;
    int32_t tokens[6 * TPB];
    for (;;) {
        uint32_t ntb = 1 + rnd(5);
        uint32_t n_tokens = (ntb - 1) * TPB + 1 + rnd(TPB);
        make_tokens(tokens, n_tokens, rnd(3), rnd(1u << 30));
        kvstore_seq_ref ref;
        uint32_t prefix = 0;
        int rc;
        if (rnd(2)) {
            kvstore_lease pl;
            uint32_t n = 0;
            rc = kvstore_prefix_lookup(kv, tokens, n_tokens, &pl, &n, &err);
            if (rc == 0) {
                prefix = n < ntb ? n : ntb - 1;
                if (prefix > n_tokens / TPB) prefix = n_tokens / TPB;
                rc = kvstore_seq_create(kv, &pl, prefix, &ref, &err);
                if (rc == 0 && prefix) atomic_fetch_add(&SH->prefix_reused, 1);
                kvstore_lease_release(kv, &pl, NULL);
            } else if (rc == -KVSTORE_ENOTFOUND) {
                rc = kvstore_seq_create(kv, NULL, 0, &ref, &err);
            }
        } else {
            rc = kvstore_seq_create(kv, NULL, 0, &ref, &err);
        }
        if (rc == -KVSTORE_EFULL) {
            for (int i = 0; i < n_held; i++) kvstore_lease_release(kv, &held[i], NULL);
            n_held = 0;
            sleep_us(1000);
            continue;
        }
        if (rc) {
            unexpected("create", &err);
            continue;
        }
        bool failed = false;
        for (uint32_t tb = prefix; tb < ntb && !failed; tb++)
            for (uint32_t l = 0; l < N_LAYERS && !failed; l++) {
                void *d;
                rc = kvstore_block_alloc(kv, ref, tb, l, &d, &err);
                if (rc) {
                    if (rc != -KVSTORE_EFULL) unexpected("alloc", &err);
                    failed = true;
                    break;
                }
                /* two halves with a pause: a reader that could see this would notice */
                uint8_t *tmp = malloc(bpb);
                kvt_fill(tmp, bpb, ref.id, ref.gen, tb, l, 77);
                memcpy(d, tmp, bpb / 2);
                if (rnd(4) == 0) sleep_us(rnd(300));
                memcpy((uint8_t *)d + bpb / 2, tmp + bpb / 2, bpb - bpb / 2);
                free(tmp);
            }
        if (failed) {
            kvstore_seq_abort(kv, ref, NULL);
            for (int i = 0; i < n_held; i++) kvstore_lease_release(kv, &held[i], NULL);
            n_held = 0;
            sleep_us(500);
            continue;
        }
        if (rnd(10) == 0) {
            if (kvstore_seq_abort(kv, ref, &err)) unexpected("abort", &err);
            atomic_fetch_add(&SH->aborted, 1);
            continue;
        }
        kvstore_lease l;
        rc = kvstore_seq_publish(kv, ref, tokens, n_tokens, &l, &err);
        if (rc == -KVSTORE_EFULL) {
            kvstore_seq_abort(kv, ref, NULL);
            continue;
        }
        if (rc) {
            unexpected("publish", &err);
            continue;
        }
        atomic_fetch_add(&SH->published, 1);
        if (n_held == 3) {
            kvstore_lease_release(kv, &held[0], NULL);
            memmove(held, held + 1, 2 * sizeof(held[0]));
            n_held--;
        }
        held[n_held++] = l;
        sleep_us(rnd(2000));
    }
}

static void verify_block(const uint8_t *buf, uint64_t bpb, kvstore_seq_ref ref, uint32_t tb,
                         uint32_t l, uint32_t prefix)
{
    kvt_tag t;
    int v = kvt_verify(buf, bpb, tb, l, &t);
    if (v != 0) {
        report_bad("seq %u tb %u layer %u: incomplete or foreign block (%d)", ref.id, tb, l, v);
        return;
    }
    if (tb >= prefix && (t.seq != ref.id || t.gen != ref.gen)) {
        report_bad("seq %u tb %u layer %u: block of another sequence (%d)", ref.id, tb, l,
                   (int)t.seq);
        return;
    }
    atomic_fetch_add(&SH->verified, 1);
}

static void reader_main(void)
{
    kvstore *kv = NULL;
    cm_err err = {0};
    if (kvstore_open("stress", &g_p, &g_g, &kv, &err)) {
        unexpected("reader open", &err);
        _exit(2);
    }
    const uint64_t bpb = kvstore_get_geometry(kv)->bytes_per_block;
    kvstore_pager *pg = NULL;
    if (kvstore_pager_init(kv, &pg, &err)) unexpected("pager", &err);
    uint8_t *bufs = cm_alloc_aligned(6 * N_LAYERS * bpb, 4096);
    kvstore_seq_info infos[64];
    kvstore_lease kept;
    bool have_kept = false;
    for (;;) {
        uint32_t n = 0;
        if (kvstore_seq_list(kv, infos, 64, &n, &err)) {
            unexpected("list", &err);
            continue;
        }
        if (n > 64) n = 64;
        uint32_t ready = 0;
        for (uint32_t i = 0; i < n; i++)
            if (infos[i].state == KVSTORE_SEQ_READY) infos[ready++] = infos[i];
        if (!ready) {
            sleep_us(500);
            continue;
        }
        kvstore_seq_info *pick = &infos[rnd(ready)];
        kvstore_lease l;
        int rc = kvstore_lease_acquire(kv, pick->ref, &l, &err);
        if (rc == -KVSTORE_ESTALE || rc == -KVSTORE_EFULL) continue;
        if (rc) {
            unexpected("lease", &err);
            continue;
        }
        atomic_fetch_add(&SH->lease_ok, 1);
        kvstore_seq_info info;
        if (kvstore_seq_get_info(kv, l.seq, &info, &err)) {
            unexpected("info", &err);
            kvstore_lease_release(kv, &l, NULL);
            continue;
        }
        uint32_t ntb = info.n_tblocks > 6 ? 6 : info.n_tblocks;
        if (pg && rnd(2)) {
            kvstore_copy copies[6 * N_LAYERS];
            kvstore_batch b;
            memset(&b, 0, sizeof(b));
            for (uint32_t i = 0; i < ntb * N_LAYERS; i++) {
                copies[i].tb = i / N_LAYERS;
                copies[i].layer = i % N_LAYERS;
                copies[i].dst = bufs + i * bpb;
            }
            b.lease = l;
            b.copies = copies;
            b.n_copies = ntb * N_LAYERS;
            kvstore_pager_submit(pg, &b);
            rc = kvstore_pager_wait(pg, &b, 30000);
            if (rc) {
                cm_err e = {0};
                snprintf(e.msg, sizeof(e.msg), "pager batch: %s", kvstore_strerror(rc));
                unexpected("pager", &e);
            } else {
                for (uint32_t i = 0; i < ntb * N_LAYERS; i++)
                    verify_block(copies[i].dst, bpb, l.seq, copies[i].tb, copies[i].layer,
                                 info.n_prefix_tblocks);
            }
        } else {
            for (uint32_t tb = 0; tb < ntb; tb++)
                for (uint32_t ly = 0; ly < N_LAYERS; ly++) {
                    rc = kvstore_block_read(kv, &l, tb, ly, bufs, &err);
                    if (rc) {
                        unexpected("read", &err);
                        continue;
                    }
                    verify_block(bufs, bpb, l.seq, tb, ly, info.n_prefix_tblocks);
                }
        }
        /* keep one lease around now and then: it dies with us when we are killed */
        if (have_kept) kvstore_lease_release(kv, &kept, NULL);
        have_kept = rnd(3) == 0;
        if (have_kept) kept = l;
        else kvstore_lease_release(kv, &l, NULL);
    }
}

/* Take the lock, half-do an allocation, die holding it. */
static void lock_killer_main(void)
{
    kvstore *kv = NULL;
    if (kvstore_open("stress", &g_p, &g_g, &kv, NULL)) _exit(2);
    kvstore_seq_ref r;
    if (kvstore_seq_create(kv, NULL, 0, &r, NULL)) _exit(0);
    if (kvs_lock(kv, NULL)) _exit(0);
    uint32_t b, s;
    if (kvs_pop_locked(kv, KVS_STACK_BLOCKS, &b, NULL) == 0 &&
        kvs_pop_locked(kv, KVS_STACK_RAM, &s, NULL) == 0) {
        kv->blocks[b].ref = 1;
        atomic_store(&kv->blocks[b].locw, kvs_locw_make(12345, KVS_TIER_RAM, s));
        kv->seqs[r.id].n_tblocks = 1;
    }
    kill(getpid(), SIGKILL);
    _exit(0);
}

enum { ROLE_WRITER, ROLE_READER, ROLE_LOCK_KILLER };

static pid_t spawn(int role, uint64_t seed)
{
    pid_t pid = fork();
    if (pid != 0) return pid;
    rng_state = seed | 1;
    if (role == ROLE_WRITER) writer_main();
    else if (role == ROLE_READER) reader_main();
    else lock_killer_main();
    _exit(0);
}

static uint64_t now_ms(void) { return cm_time_ns() / 1000000u; }

static void check_totals(kvstore *kv, const char *when, uint64_t *n_checks)
{
    cm_err err = {0};
    int rc = kvstore_check(kv, &err);
    CHECK(rc == 0, "%s: check: %s", when, err.msg);
    kvstore_stats st;
    rc = kvstore_get_stats(kv, &st, &err);
    CHECK(rc == 0, "%s: stats: %s", when, err.msg);
    CHECK(st.blocks_ram + st.ram_free == st.n_ram_blocks, "%s: RAM %u + free %u != %u", when,
          st.blocks_ram, st.ram_free, st.n_ram_blocks);
    CHECK(st.blocks_spilled + st.blocks_moving + st.spill_free == st.n_spill_blocks,
          "%s: spill %u + moving %u + free %u != %u", when, st.blocks_spilled, st.blocks_moving,
          st.spill_free, st.n_spill_blocks);
    (*n_checks)++;
}

int main(void)
{
    cm_log_level = CM_LOG_LEVEL_ERROR;
    const char *secs_env = getenv("IHIP_KV_STRESS_SECONDS");
    int secs = secs_env ? atoi(secs_env) : 15;
    if (secs < 1) secs = 1;
    kvt_dir(g_dir, sizeof(g_dir), "stress");
    /* results shared with the children: a small file mapping (MAP_ANONYMOUS is not POSIX) */
    char shpath[PATH_MAX + 16];
    snprintf(shpath, sizeof(shpath), "%s/results", g_dir);
    int shfd = open(shpath, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (shfd < 0 || ftruncate(shfd, sizeof(*SH)) != 0) return 1;
    SH = mmap(NULL, sizeof(*SH), PROT_READ | PROT_WRITE, MAP_SHARED, shfd, 0);
    close(shfd);
    if (SH == MAP_FAILED) return 1;
    memset(SH, 0, sizeof(*SH));

    g_g.model_fingerprint = 42;
    g_g.n_layers = N_LAYERS;
    g_g.n_kv_heads = 1;
    g_g.head_dim = 64;
    g_g.tokens_per_block = TPB;
    g_g.dtype = KVSTORE_DTYPE_F16; /* 4 KiB blocks */
    g_p = kvstore_default_params();
    g_p.dir = g_dir;
    g_p.spill_dir = g_dir;
    g_p.n_ram_blocks = 96;
    g_p.n_spill_blocks = 160;
    g_p.max_seqs = 48;
    g_p.max_blocks_per_seq = 6 * N_LAYERS;
    g_p.max_leases = 128;
    g_p.max_owners = 48;
    g_p.spill_batch = 8;
    g_p.lock_timeout_ms = 10000;
    cm_err err = {0};
    kvstore *kv = NULL;
    kvstore_destroy("stress", &g_p, NULL);
    if (kvstore_create("stress", &g_g, &g_p, &err) ||
        kvstore_open("stress", &g_p, &g_g, &kv, &err)) {
        fprintf(stderr, "setup: %s\n", err.msg);
        return 1;
    }
    printf("stress: %d writers, %d readers, %d s, spill I/O %s\n", N_WRITERS, N_READERS, secs,
           kvstore_io_name(kv));

    pid_t kids[N_WRITERS + N_READERS];
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N_WRITERS + N_READERS; i++)
        kids[i] = spawn(i < N_WRITERS ? ROLE_WRITER : ROLE_READER, seed += 0x1234567);
    rng_state = 12345;
    uint64_t end = now_ms() + (uint64_t)secs * 1000u, next_check = now_ms() + 300;
    uint64_t next_lock_kill = now_ms() + 1000;
    uint64_t n_kills = 0, n_lock_kills = 0, n_checks = 0;
    while (now_ms() < end) {
        sleep_us(20000 + rnd(100000));
        int k = (int)rnd(N_WRITERS + N_READERS);
        kill(kids[k], SIGKILL);
        waitpid(kids[k], NULL, 0);
        n_kills++;
        kids[k] = spawn(k < N_WRITERS ? ROLE_WRITER : ROLE_READER, seed += 0x1234567);
        if (now_ms() >= next_lock_kill) {
            pid_t pk = spawn(ROLE_LOCK_KILLER, seed += 0x1234567);
            int status;
            waitpid(pk, &status, 0);
            n_lock_kills += WIFSIGNALED(status);
            next_lock_kill = now_ms() + 1500;
        }
        if (now_ms() >= next_check) {
            check_totals(kv, "during", &n_checks);
            next_check = now_ms() + 300;
        }
    }
    for (int i = 0; i < N_WRITERS + N_READERS; i++) {
        kill(kids[i], SIGKILL);
        waitpid(kids[i], NULL, 0);
    }
    kvstore_stats before;
    kvstore_get_stats(kv, &before, &err);
    kvstore_gc_result gr;
    CHECK(kvstore_gc(kv, &gr, &err) == 0, "final gc: %s", err.msg);
    check_totals(kv, "after gc", &n_checks);
    kvstore_stats st;
    kvstore_get_stats(kv, &st, &err);
    printf("stress: %llu kills (+%llu while holding the lock), %llu checks; published %llu, "
           "aborted %llu, prefix reuses %llu, leases %llu, blocks verified %llu; spilled %llu, "
           "read from spill %llu, lock recoveries %llu, owners reaped %llu\n",
           (unsigned long long)n_kills, (unsigned long long)n_lock_kills,
           (unsigned long long)n_checks, (unsigned long long)atomic_load(&SH->published),
           (unsigned long long)atomic_load(&SH->aborted),
           (unsigned long long)atomic_load(&SH->prefix_reused),
           (unsigned long long)atomic_load(&SH->lease_ok),
           (unsigned long long)atomic_load(&SH->verified), (unsigned long long)st.n_spill_out,
           (unsigned long long)st.n_spill_in, (unsigned long long)st.n_lock_recoveries,
           (unsigned long long)st.n_owners_reaped);
    printf("stress: before final gc: %u blocks used, %u ready, %u writing, %u leases, %u "
           "owners; gc reaped %u owners, %u leases, %u sequences\n",
           before.blocks_used, before.seqs_ready, before.seqs_writing, before.leases,
           before.owners, gr.owners_reaped, gr.leases_released, gr.seqs_freed);
    CHECK(atomic_load(&SH->bad) == 0, "%llu bad blocks; first: %s",
          (unsigned long long)atomic_load(&SH->bad), SH->first_bad);
    CHECK(atomic_load(&SH->unexpected) == 0, "%llu unexpected errors",
          (unsigned long long)atomic_load(&SH->unexpected));
    CHECK(atomic_load(&SH->verified) > 1000, "only %llu blocks verified",
          (unsigned long long)atomic_load(&SH->verified));
    CHECK(atomic_load(&SH->published) > 50, "only %llu published",
          (unsigned long long)atomic_load(&SH->published));
    CHECK(n_lock_kills == 0 || st.n_lock_recoveries >= 1, "lock recoveries %llu",
          (unsigned long long)st.n_lock_recoveries);
    CHECK(st.blocks_used == 0 && st.ram_free == st.n_ram_blocks &&
              st.spill_free == st.n_spill_blocks,
          "leak: used %u, RAM free %u of %u, spill free %u of %u", st.blocks_used, st.ram_free,
          st.n_ram_blocks, st.spill_free, st.n_spill_blocks);
    CHECK(st.seqs_ready == 0 && st.seqs_writing == 0 && st.leases == 0 && st.owners == 0,
          "left: ready %u writing %u leases %u owners %u", st.seqs_ready, st.seqs_writing,
          st.leases, st.owners);
    kvstore_close(kv);
    kvstore_destroy("stress", &g_p, NULL);
    kvt_rmdir(g_dir);
    munmap(SH, sizeof(*SH));
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
