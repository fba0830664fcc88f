/*
 * ihip-kv.c — command-line tool for kvstore segments.
 *
 *   ihip-kv create  NAME --layers N --kv-heads N --head-dim N [--tokens-per-block N]
 *                        [--dtype f16|bf16|f32|fp8] [--bytes-per-block N] [--fingerprint HEX]
 *                        [--blocks N] [--spill-dir DIR --spill-blocks N] [--seqs N]
 *                        [--blocks-per-seq N] [--leases N] [--owners N] [--lease-ttl-ms N]
 *   ihip-kv stats   NAME      geometry, block/sequence/lease totals, counters
 *   ihip-kv ls      NAME      sequences (state, tokens, blocks, leases, writer, age)
 *   ihip-kv gc      NAME      reap dead processes, rebuild free lists, then print stats
 *   ihip-kv check   NAME      full consistency check (exit 1 on any inconsistency)
 *   ihip-kv destroy NAME      remove the segment and its spill file
 *
 * Common options: --dir DIR (segment directory; env IHIP_KV_DIR; default /dev/shm) and
 * --json (one JSON object on stdout instead of text). Exit 0 ok, 1 error, 2 usage.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void)
{
    fprintf(stderr,
            "usage: ihip-kv create NAME --layers N --kv-heads N --head-dim N [options]\n"
            "       ihip-kv stats|ls|gc|check|destroy NAME [--dir DIR] [--json]\n"
            "create options: --tokens-per-block N (64) --dtype f16|bf16|f32|fp8 (f16)\n"
            "  --bytes-per-block N --fingerprint HEX --blocks N (1024) --spill-dir DIR\n"
            "  --spill-blocks N --seqs N (256) --blocks-per-seq N (65536) --leases N (4096)\n"
            "  --owners N (256) --lease-ttl-ms N (60000)\n"
            "common: --dir DIR (env IHIP_KV_DIR, default /dev/shm) --json\n");
}

static int parse_u64(const char *s, uint64_t *out, int base)
{
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, base);
    if (errno || *end || s[0] == '-') return -1;
    *out = v;
    return 0;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static const char *dtype_name(uint32_t dt)
{
    switch (dt) {
    case KVSTORE_DTYPE_F32: return "f32";
    case KVSTORE_DTYPE_F16: return "f16";
    case KVSTORE_DTYPE_BF16: return "bf16";
    case KVSTORE_DTYPE_F8_E4M3: return "fp8";
    default: return "other";
    }
}

static void print_stats(const char *name, const kvstore_stats *s, const char *io, bool json,
                        const kvstore_gc_result *gc, uint64_t segment_id)
{
    const kvstore_geometry *g = &s->geom;
    if (json) {
        printf("{\"name\":");
        json_str(name);
        printf(",\"segment_id\":%" PRIu64, segment_id);
        printf(",\"geometry\":{\"model_fingerprint\":\"%016" PRIx64 "\",\"n_layers\":%u,"
               "\"n_kv_heads\":%u,\"head_dim\":%u,\"tokens_per_block\":%u,\"dtype\":\"%s\","
               "\"bytes_per_block\":%" PRIu64 "}",
               g->model_fingerprint, g->n_layers, g->n_kv_heads, g->head_dim,
               g->tokens_per_block, dtype_name(g->dtype), g->bytes_per_block);
        printf(",\"limits\":{\"ram_blocks\":%u,\"spill_blocks\":%u,\"max_seqs\":%u,"
               "\"max_leases\":%u,\"max_owners\":%u,\"max_blocks_per_seq\":%u,"
               "\"lease_ttl_ms\":%" PRIu64 ",\"segment_bytes\":%" PRIu64 "}",
               s->n_ram_blocks, s->n_spill_blocks, s->max_seqs, s->max_leases, s->max_owners,
               s->max_blocks_per_seq, s->lease_ttl_ms, s->segment_bytes);
        printf(",\"blocks\":{\"used\":%u,\"shared\":%u,\"ram\":%u,\"spilled\":%u,\"moving\":%u,"
               "\"ram_free\":%u,\"spill_free\":%u}",
               s->blocks_used, s->blocks_shared, s->blocks_ram, s->blocks_spilled,
               s->blocks_moving, s->ram_free, s->spill_free);
        printf(",\"seqs\":{\"writing\":%u,\"ready\":%u,\"freeing\":%u},\"leases\":%u,"
               "\"owners\":%u",
               s->seqs_writing, s->seqs_ready, s->seqs_freeing, s->leases, s->owners);
        printf(",\"counters\":{\"alloc\":%" PRIu64 ",\"free\":%" PRIu64 ",\"spill_out\":%" PRIu64
               ",\"spill_in\":%" PRIu64 ",\"lock_recoveries\":%" PRIu64
               ",\"owners_reaped\":%" PRIu64 ",\"published\":%" PRIu64
               ",\"prefix_hits\":%" PRIu64 "}",
               s->n_alloc, s->n_free, s->n_spill_out, s->n_spill_in, s->n_lock_recoveries,
               s->n_owners_reaped, s->n_published, s->n_prefix_hits);
        printf(",\"io\":\"%s\"", io);
        if (gc)
            printf(",\"gc\":{\"owners_reaped\":%u,\"leases_released\":%u,\"seqs_freed\":%u,"
                   "\"moves_cancelled\":%u}",
                   gc->owners_reaped, gc->leases_released, gc->seqs_freed, gc->moves_cancelled);
        printf("}\n");
        return;
    }
    if (gc)
        printf("gc: reaped %u dead processes, released %u leases, freed %u sequences, "
               "cancelled %u spill moves\n",
               gc->owners_reaped, gc->leases_released, gc->seqs_freed, gc->moves_cancelled);
    printf("segment %s: %.1f MiB, id %" PRIu64 "\n", name, (double)s->segment_bytes / 1048576.0,
           segment_id);
    printf("  geometry: fingerprint %016" PRIx64 ", %u layers, %u kv heads, head dim %u, %u "
           "tokens/block, %s, %" PRIu64 " bytes/block\n",
           g->model_fingerprint, g->n_layers, g->n_kv_heads, g->head_dim, g->tokens_per_block,
           dtype_name(g->dtype), g->bytes_per_block);
    printf("  blocks:   %u used (%u shared), %u in RAM, %u spilled, %u moving; free: %u of %u RAM "
           "slots, %u of %u spill slots\n",
           s->blocks_used, s->blocks_shared, s->blocks_ram, s->blocks_spilled, s->blocks_moving,
           s->ram_free, s->n_ram_blocks, s->spill_free, s->n_spill_blocks);
    printf("  seqs:     %u writing, %u ready (of %u); leases %u of %u; processes %u of %u\n",
           s->seqs_writing, s->seqs_ready, s->max_seqs, s->leases, s->max_leases, s->owners,
           s->max_owners);
    printf("  counters: %" PRIu64 " allocated, %" PRIu64 " freed, %" PRIu64 " spilled out, %" PRIu64
           " read from spill, %" PRIu64 " published, %" PRIu64 " prefix hits, %" PRIu64
           " dead processes reaped, %" PRIu64 " lock recoveries\n",
           s->n_alloc, s->n_free, s->n_spill_out, s->n_spill_in, s->n_published,
           s->n_prefix_hits, s->n_owners_reaped, s->n_lock_recoveries);
    printf("  spill I/O: %s; lease TTL %" PRIu64 " ms\n", io, s->lease_ttl_ms);
}

static int do_ls(kvstore *kv, const char *name, bool json)
{
    cm_err err = {0};
    uint32_t n = 0;
    if (kvstore_seq_list(kv, NULL, 0, &n, &err) != 0) {
        fprintf(stderr, "ihip-kv: %s\n", err.msg);
        return 1;
    }
    kvstore_seq_info *v = calloc(n ? n : 1, sizeof(*v));
    uint32_t m = 0;
    if (!v || kvstore_seq_list(kv, v, n, &m, &err) != 0) {
        fprintf(stderr, "ihip-kv: %s\n", v ? err.msg : "out of memory");
        free(v);
        return 1;
    }
    if (m > n) m = n;
    if (json) {
        printf("{\"name\":");
        json_str(name);
        printf(",\"seqs\":[");
        for (uint32_t i = 0; i < m; i++)
            printf("%s{\"id\":%u,\"gen\":%u,\"state\":\"%s\",\"tokens\":%u,\"tblocks\":%u,"
                   "\"prefix_tblocks\":%u,\"leases\":%u,\"writer_pid\":%d,\"age_ms\":%" PRIu64 "}",
                   i ? "," : "", v[i].ref.id, v[i].ref.gen, kvstore_seq_state_name(v[i].state),
                   v[i].n_tokens, v[i].n_tblocks, v[i].n_prefix_tblocks, v[i].n_leases,
                   v[i].owner_pid, v[i].age_ms);
        printf("]}\n");
    } else {
        printf("%8s %6s %-8s %9s %8s %7s %7s %8s %10s\n", "ID", "GEN", "STATE", "TOKENS",
               "TBLOCKS", "SHARED", "LEASES", "WRITER", "AGE_MS");
        for (uint32_t i = 0; i < m; i++)
            printf("%8u %6u %-8s %9u %8u %7u %7u %8d %10" PRIu64 "\n", v[i].ref.id, v[i].ref.gen,
                   kvstore_seq_state_name(v[i].state), v[i].n_tokens, v[i].n_tblocks,
                   v[i].n_prefix_tblocks, v[i].n_leases, v[i].owner_pid, v[i].age_ms);
        printf("%u sequences\n", m);
    }
    free(v);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        usage();
        return 2;
    }
    const char *cmd = argv[1], *name = argv[2];
    kvstore_params p = kvstore_default_params();
    p.heartbeat_thread = false;
    p.gc_on_pressure = false;
    const char *envdir = getenv("IHIP_KV_DIR");
    if (envdir && *envdir) p.dir = envdir;
    kvstore_geometry g = {0};
    g.tokens_per_block = 64;
    g.dtype = KVSTORE_DTYPE_F16;
    bool json = false;
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        uint64_t x = 0;
        if (!strcmp(a, "--json")) {
            json = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "ihip-kv: %s needs a value\n", a);
            return 2;
        }
        i++;
        bool ok = true;
        if (!strcmp(a, "--dir")) p.dir = v;
        else if (!strcmp(a, "--spill-dir")) p.spill_dir = v;
        else if (!strcmp(a, "--dtype")) {
            if (!strcmp(v, "f16")) g.dtype = KVSTORE_DTYPE_F16;
            else if (!strcmp(v, "bf16")) g.dtype = KVSTORE_DTYPE_BF16;
            else if (!strcmp(v, "f32")) g.dtype = KVSTORE_DTYPE_F32;
            else if (!strcmp(v, "fp8")) g.dtype = KVSTORE_DTYPE_F8_E4M3;
            else ok = false;
        } else if (!strcmp(a, "--fingerprint")) {
            ok = parse_u64(v, &x, 16) == 0;
            g.model_fingerprint = x;
        } else {
            ok = parse_u64(v, &x, 10) == 0;
            bool u32 = x <= UINT32_MAX;
            if (!strcmp(a, "--layers") && u32) g.n_layers = (uint32_t)x;
            else if (!strcmp(a, "--kv-heads") && u32) g.n_kv_heads = (uint32_t)x;
            else if (!strcmp(a, "--head-dim") && u32) g.head_dim = (uint32_t)x;
            else if (!strcmp(a, "--tokens-per-block") && u32) g.tokens_per_block = (uint32_t)x;
            else if (!strcmp(a, "--bytes-per-block")) g.bytes_per_block = x;
            else if (!strcmp(a, "--blocks") && u32) p.n_ram_blocks = (uint32_t)x;
            else if (!strcmp(a, "--spill-blocks") && u32) p.n_spill_blocks = (uint32_t)x;
            else if (!strcmp(a, "--seqs") && u32) p.max_seqs = (uint32_t)x;
            else if (!strcmp(a, "--blocks-per-seq") && u32) p.max_blocks_per_seq = (uint32_t)x;
            else if (!strcmp(a, "--leases") && u32) p.max_leases = (uint32_t)x;
            else if (!strcmp(a, "--owners") && u32) p.max_owners = (uint32_t)x;
            else if (!strcmp(a, "--lease-ttl-ms")) p.lease_ttl_ms = x;
            else {
                fprintf(stderr, "ihip-kv: unknown option or bad value: %s %s\n", a, v);
                return 2;
            }
        }
        if (!ok) {
            fprintf(stderr, "ihip-kv: bad value for %s: %s\n", a, v);
            return 2;
        }
    }

    cm_err err = {0};
    if (!strcmp(cmd, "create")) {
        if (!g.n_layers || !g.n_kv_heads || !g.head_dim) {
            fprintf(stderr, "ihip-kv: create needs --layers, --kv-heads and --head-dim\n");
            return 2;
        }
        if (kvstore_create(name, &g, &p, &err) != 0) {
            fprintf(stderr, "ihip-kv: %s\n", err.msg);
            return 1;
        }
        if (json) {
            printf("{\"created\":");
            json_str(name);
            printf("}\n");
        } else {
            printf("created %s/ihip-%s\n", p.dir, name);
        }
        return 0;
    }
    if (!strcmp(cmd, "destroy")) {
        if (kvstore_destroy(name, &p, &err) != 0) {
            fprintf(stderr, "ihip-kv: %s\n", err.msg);
            return 1;
        }
        if (json) {
            printf("{\"destroyed\":");
            json_str(name);
            printf("}\n");
        } else {
            printf("destroyed %s\n", name);
        }
        return 0;
    }
    if (strcmp(cmd, "stats") && strcmp(cmd, "ls") && strcmp(cmd, "gc") && strcmp(cmd, "check")) {
        usage();
        return 2;
    }
    kvstore *kv = NULL;
    if (kvstore_open(name, &p, NULL, &kv, &err) != 0) {
        fprintf(stderr, "ihip-kv: %s\n", err.msg);
        return 1;
    }
    int rc = 0;
    if (!strcmp(cmd, "ls")) {
        rc = do_ls(kv, name, json);
    } else if (!strcmp(cmd, "check")) {
        int r = kvstore_check(kv, &err);
        if (json) {
            printf("{\"name\":");
            json_str(name);
            printf(",\"ok\":%s,\"error\":", r ? "false" : "true");
            json_str(r ? err.msg : "");
            printf("}\n");
        } else {
            printf("%s: %s\n", name, r ? err.msg : "consistent");
        }
        rc = r ? 1 : 0;
    } else {
        kvstore_gc_result gr, *gp = NULL;
        if (!strcmp(cmd, "gc")) {
            if (kvstore_gc(kv, &gr, &err) != 0) {
                fprintf(stderr, "ihip-kv: gc: %s\n", err.msg);
                kvstore_close(kv);
                return 1;
            }
            gp = &gr;
        }
        kvstore_stats st;
        if (kvstore_get_stats(kv, &st, &err) != 0) {
            fprintf(stderr, "ihip-kv: %s\n", err.msg);
            rc = 1;
        } else {
            print_stats(name, &st, kvstore_io_name(kv), json, gp, kvstore_segment_id(kv));
        }
    }
    kvstore_close(kv);
    return rc;
}
