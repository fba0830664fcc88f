/*
 * test-kvstore-cli.c — the ihip-kv tool end to end: create, stats (text and JSON), ls, gc,
 * check, destroy, usage errors, and a corrupted header reported with a clear message.
 * A sequence published by this process must show up in `ls` and in the stats totals.
 *
 * Needs IHIP_KV_BIN (path of ihip-kv; ctest sets it); exit 77 without it.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvtest.h"

#include <fcntl.h>
#include <sys/wait.h>

static const char *bin;
static char g_dir[PATH_MAX];

/* Run "ihip-kv ARGS --dir DIR", capture stdout+stderr into out; returns the exit code. */
static int run(char *out, size_t cap, const char *args)
{
    char cmd[PATH_MAX * 3];
    snprintf(cmd, sizeof(cmd), "'%s' %s --dir '%s' 2>&1", bin, args, g_dir);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = 0;
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int main(void)
{
    bin = getenv("IHIP_KV_BIN");
    if (!bin || access(bin, X_OK) != 0) {
        printf("IHIP_KV_BIN not set or not executable: skipped\n");
        return 77;
    }
    kvt_dir(g_dir, sizeof(g_dir), "cli");
    static char out[65536];
    int rc = run(out, sizeof(out), "create c1 --layers 3 --kv-heads 2 --head-dim 32 "
                                   "--tokens-per-block 8 --blocks 40 --seqs 8 --blocks-per-seq 48 "
                                   "--fingerprint abc123");
    CHECK(rc == 0 && strstr(out, "created"), "create: %d %s", rc, out);
    rc = run(out, sizeof(out), "create c1 --layers 3 --kv-heads 2 --head-dim 32");
    CHECK(rc == 1 && strstr(out, "exists"), "create twice: %d %s", rc, out);
    rc = run(out, sizeof(out), "create c2 --layers 3");
    CHECK(rc == 2, "create without geometry is a usage error: %d", rc);
    rc = run(out, sizeof(out), "frobnicate c1");
    CHECK(rc == 2, "unknown command: %d", rc);

    /* publish one sequence of 2 token blocks from here */
    kvstore_params p = kvstore_default_params();
    p.dir = g_dir;
    kvstore *kv = NULL;
    cm_err err = {0};
    kvstore_seq_ref ref;
    kvstore_lease lease;
    int ok = kvstore_open("c1", &p, NULL, &kv, &err) == 0 &&
             kvstore_seq_create(kv, NULL, 0, &ref, &err) == 0;
    for (uint32_t tb = 0; tb < 2 && ok; tb++)
        for (uint32_t l = 0; l < 3 && ok; l++) {
            void *d;
            ok = kvstore_block_alloc(kv, ref, tb, l, &d, &err) == 0;
        }
    int32_t toks[12] = {0};
    ok = ok && kvstore_seq_publish(kv, ref, toks, 12, &lease, &err) == 0;
    CHECK(ok, "publish: %s", err.msg);

    rc = run(out, sizeof(out), "stats c1 --json");
    CHECK(rc == 0 && strstr(out, "\"used\":6,") && strstr(out, "\"ready\":1") &&
              strstr(out, "\"ram_free\":34") && strstr(out, "\"model_fingerprint\":\"0000000000abc123\"") &&
              strstr(out, "\"bytes_per_block\":2048"),
          "stats json: %s", out);
    rc = run(out, sizeof(out), "stats c1");
    CHECK(rc == 0 && strstr(out, "6 used") && strstr(out, "1 ready"), "stats text: %s", out);
    rc = run(out, sizeof(out), "ls c1 --json");
    CHECK(rc == 0 && strstr(out, "\"state\":\"ready\"") && strstr(out, "\"tokens\":12") &&
              strstr(out, "\"leases\":1"),
          "ls json: %s", out);
    rc = run(out, sizeof(out), "ls c1");
    CHECK(rc == 0 && strstr(out, "ready") && strstr(out, "1 sequences"), "ls text: %s", out);
    rc = run(out, sizeof(out), "check c1 --json");
    CHECK(rc == 0 && strstr(out, "\"ok\":true"), "check: %s", out);
    /* gc keeps a live process's sequence */
    rc = run(out, sizeof(out), "gc c1 --json");
    CHECK(rc == 0 && strstr(out, "\"owners_reaped\":0") && strstr(out, "\"ready\":1"), "gc live: %s",
          out);
    /* after this process lets go, nothing is left */
    kvstore_close(kv);
    rc = run(out, sizeof(out), "gc c1 --json");
    CHECK(rc == 0 && strstr(out, "\"used\":0,") && strstr(out, "\"ram_free\":40"),
          "after close: %s", out);

    /* corrupt the header: clear message, exit 1 */
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/ihip-c1", g_dir);
    int fd = open(path, O_RDWR);
    uint32_t junk = 0xdeadbeef;
    CHECK(fd >= 0 && pwrite(fd, &junk, 4, 40) == 4, "patch");
    if (fd >= 0) close(fd);
    rc = run(out, sizeof(out), "stats c1");
    CHECK(rc == 1 && strstr(out, "checksum"), "corrupt: %d %s", rc, out);
    rc = run(out, sizeof(out), "destroy c1");
    CHECK(rc == 0, "destroy corrupt segment: %s", out);
    rc = run(out, sizeof(out), "stats c1");
    CHECK(rc == 1 && strstr(out, "No such file"), "gone: %s", out);
    kvt_rmdir(g_dir);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
