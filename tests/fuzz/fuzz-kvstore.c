/*
 * fuzz-kvstore.c — libFuzzer target for kvstore segment metadata validation.
 *
 * Another process can write anything into a shared segment, so every field the store reads
 * from it must be checked. This target builds a small valid segment in memory once (two
 * READY sequences, one sharing the other's prefix, one WRITING), then for each input
 * applies the input as byte patches to a copy of it and runs the whole API over the result:
 * open (header validation), check, stats, list, leases, block reads, prefix lookup, create
 * with a shared prefix, allocation, publish, release, gc/rebuild, close. ASan/UBSan turn any
 * out-of-bounds access into a crash. One oracle beyond "no crash": when rebuild (repair mode)
 * succeeds, the check that follows must find the segment consistent.
 *
 * Input: byte 0 = flags (bit 0: re-seal the header checksum after patching, so the layout
 * validation behind it is reached; bit 1: truncate the image to a length from bytes 1-2),
 * then 4-byte patches (u16 offset scaled over the image, u8 xor, u8 unused).
 *
 * The kvstore sources are included directly, so the generic fuzz rule (fuzz-*.c + the
 * common sources) builds it without knowing about kvstore. Build by hand:
 *   clang -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -Icommon -Ikvstore \
 *       tests/fuzz/fuzz-kvstore.c common/base/\*.c -o fuzz-kvstore -lpthread -lm
 */
#define _POSIX_C_SOURCE 200809L
#include "../../kvstore/io/kvstore-io.c"
#include "../../kvstore/io/kvstore-io-uring.c"
#include "../../kvstore/kvstore-segment.c"
#include "../../kvstore/kvstore-seq.c"
#include "../../kvstore/kvstore-spill.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint8_t *golden;
static size_t golden_size;

static void build_golden(void)
{
    struct kvs_imm imm;
    memset(&imm, 0, sizeof(imm));
    imm.magic = KVS_MAGIC;
    imm.version = KVS_VERSION;
    imm.header_size = KVS_HEADER_SIZE;
    imm.geom.model_fingerprint = 7;
    imm.geom.n_layers = 2;
    imm.geom.n_kv_heads = 1;
    imm.geom.head_dim = 4;
    imm.geom.tokens_per_block = 4;
    imm.geom.dtype = KVSTORE_DTYPE_F16;
    imm.geom.bytes_per_block = 64;
    imm.n_ram = 12;
    imm.n_spill = 0;
    imm.n_blocks = 12;
    imm.max_seqs = 4;
    imm.max_blocks_per_seq = 8;
    imm.max_leases = 8;
    imm.max_owners = 4;
    imm.lease_ttl_ns = UINT64_C(3600) * 1000000000u;
    if (kvs_layout(&imm, NULL) != 0) abort();
    golden_size = imm.total_size;
    golden = calloc(1, golden_size);
    kvs_format(golden, &imm, false);

    kvstore_params p = kvstore_default_params();
    kvstore *kv = NULL;
    if (kvs_open_mem(golden, golden_size, &p, &kv, NULL) != 0) abort();
    int32_t toks[16];
    for (int i = 0; i < 16; i++) toks[i] = 10 + i;
    kvstore_seq_ref a, b, c;
    kvstore_lease la, lb;
    void *d;
    if (kvstore_seq_create(kv, NULL, 0, &a, NULL)) abort();
    for (uint32_t tb = 0; tb < 3; tb++)
        for (uint32_t l = 0; l < 2; l++)
            if (kvstore_block_alloc(kv, a, tb, l, &d, NULL) == 0) memset(d, (int)(tb * 2 + l), 64);
    if (kvstore_seq_publish(kv, a, toks, 12, &la, NULL)) abort();
    if (kvstore_seq_create(kv, &la, 2, &b, NULL)) abort();
    for (uint32_t l = 0; l < 2; l++)
        if (kvstore_block_alloc(kv, b, 2, l, &d, NULL) == 0) memset(d, 0x55, 64);
    toks[9] = 99;
    if (kvstore_seq_publish(kv, b, toks, 11, &lb, NULL)) abort();
    if (kvstore_seq_create(kv, NULL, 0, &c, NULL)) abort();
    if (kvstore_block_alloc(kv, c, 0, 1, &d, NULL)) abort();
    /* leave the handle's owner registered in the image: the close below would release it,
     * so only free the handle */
    kvs_spill_close(kv);
    handle_free(kv);
}

static void exercise(kvstore *kv)
{
    cm_err e = {0};
    kvstore_stats st;
    kvstore_check(kv, &e);
    kvstore_get_stats(kv, &st, &e);
    kvstore_seq_info infos[8];
    uint32_t n = 0;
    /* buffers sized by the segment's geometry (validated at open; may differ from golden) */
    const uint64_t bpb = kvstore_get_geometry(kv)->bytes_per_block;
    uint8_t *buf = malloc(bpb);
    if (buf && kvstore_seq_list(kv, infos, 8, &n, &e) == 0) {
        if (n > 8) n = 8;
        for (uint32_t i = 0; i < n; i++) {
            kvstore_lease l;
            if (kvstore_lease_acquire(kv, infos[i].ref, &l, &e) != 0) continue;
            for (uint32_t tb = 0; tb < 4; tb++)
                for (uint32_t ly = 0; ly < 2; ly++) kvstore_block_read(kv, &l, tb, ly, buf, &e);
            kvstore_seq_ref r;
            if (kvstore_seq_create(kv, &l, 1, &r, &e) == 0) {
                void *d;
                if (kvstore_block_alloc(kv, r, 1, 0, &d, &e) == 0) memset(d, 1, bpb);
                if (kvstore_block_alloc(kv, r, 1, 1, &d, &e) == 0) memset(d, 2, bpb);
                int32_t toks[8] = {10, 11, 12, 13, 1, 2, 3, 4};
                kvstore_lease l2;
                if (kvstore_seq_publish(kv, r, toks, 8, &l2, &e) == 0)
                    kvstore_lease_release(kv, &l2, &e);
                else
                    kvstore_seq_abort(kv, r, &e);
            }
            kvstore_lease_release(kv, &l, &e);
        }
    }
    free(buf);
    int32_t q[12];
    for (int i = 0; i < 12; i++) q[i] = 10 + i;
    kvstore_lease lk;
    uint32_t m;
    if (kvstore_prefix_lookup(kv, q, 12, &lk, &m, &e) == 0) kvstore_lease_release(kv, &lk, &e);
    kvs_lock(kv, &e);
    int rc = kvs_rebuild(kv, true, &e);
    if (rc == 0) {
        cm_err e2 = {0};
        if (kvs_rebuild(kv, false, &e2) != 0) {
            fprintf(stderr, "rebuild succeeded but check fails: %s\n", e2.msg);
            abort();
        }
    }
    kvs_unlock(kv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!golden) {
        cm_log_level = -1; /* silence */
        build_golden();
    }
    if (size < 1) return 0;
    uint8_t flags = data[0];
    size_t img_size = golden_size;
    size_t pos = 1;
    if ((flags & 2) && size >= 3) {
        img_size = ((size_t)data[1] | (size_t)data[2] << 8) * golden_size / 65536;
        pos = 3;
    }
    uint8_t *img = malloc(img_size ? img_size : 1);
    if (!img) return 0;
    memcpy(img, golden, img_size);
    for (; pos + 4 <= size; pos += 4) {
        size_t off = ((size_t)data[pos] | (size_t)data[pos + 1] << 8) * golden_size / 65536;
        /* skip the mutex bytes: an in-memory handle uses its own lock */
        if (off < img_size && (off < KVS_LOCK_OFFSET || off >= KVS_LOCK_OFFSET + 128))
            img[off] ^= data[pos + 2];
    }
    if ((flags & 1) && img_size >= sizeof(struct kvs_imm)) {
        struct kvs_imm *imm = (struct kvs_imm *)img;
        imm->layout_hash = imm_hash(imm);
    }
    kvstore_params p = kvstore_default_params();
    p.gc_on_pressure = (flags & 4) != 0;
    kvstore *kv = NULL;
    if (kvs_open_mem(img, img_size, &p, &kv, NULL) == 0) {
        exercise(kv);
        kvstore_close(kv);
    }
    free(img);
    return 0;
}
