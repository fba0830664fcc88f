/*
 * test-kvcache.c — the row-cache <-> block bridge (kvstore-kvcache.h): round trips rows ->
 * blocks -> rows for F16 and F32 rows into F16 and F32 segments, several layers, chunks that
 * start and end inside token blocks (read-modify-write), loads at unaligned offsets, the byte
 * layout of a block ([K|V][kv_head][token][head_dim]), argument errors, and the model
 * fingerprint (deterministic; changes with the header, the tail and the size).
 *
 * Exit 0 pass, 1 fail; last line "N passed, N failed".
 */
#define _POSIX_C_SOURCE 200809L
#include "kvtest.h"

#include "kvstore-kvcache.h"
#include "tensor/tensor.h"

static char g_dir[PATH_MAX];

enum { NL = 3, NH = 3, HD = 8, TPB = 16, NTOK = 75 };

/* value of (layer, kv, token, head, dim): small integers / 8, exact in f16 */
static float val(uint32_t l, uint32_t kv, uint32_t t, uint32_t h, uint32_t d)
{
    return (float)((int)((l * 131 + kv * 71 + t * 17 + h * 13 + d * 5) % 401) - 200) / 8.0f;
}

static void fill_rows(void *rows, uint32_t type, uint32_t l, uint32_t kv, uint32_t ntok,
                      size_t stride)
{
    for (uint32_t t = 0; t < ntok; t++)
        for (uint32_t h = 0; h < NH; h++)
            for (uint32_t d = 0; d < HD; d++) {
                float v = val(l, kv, t, h, d);
                unsigned char *row = (unsigned char *)rows + t * stride;
                if (type == KVSTORE_DTYPE_F32)
                    ((float *)row)[h * HD + d] = v;
                else
                    ((uint16_t *)row)[h * HD + d] = tn_fp32_to_fp16(v);
            }
}

static float get_row(const void *rows, uint32_t type, size_t stride, uint32_t t, uint32_t h,
                     uint32_t d)
{
    const unsigned char *row = (const unsigned char *)rows + t * stride;
    return type == KVSTORE_DTYPE_F32 ? ((const float *)row)[h * HD + d]
                                     : tn_fp16_to_fp32(((const uint16_t *)row)[h * HD + d]);
}

static void round_trip(uint32_t seg_type, uint32_t row_type)
{
    char name[64];
    snprintf(name, sizeof(name), "kvc-%u-%u", (unsigned)seg_type, (unsigned)row_type);
    kvstore_geometry g = {0};
    g.model_fingerprint = 42;
    g.n_layers = NL;
    g.n_kv_heads = NH;
    g.head_dim = HD;
    g.tokens_per_block = TPB;
    g.dtype = seg_type;
    kvstore_params p = kvstore_default_params();
    p.dir = g_dir;
    p.n_ram_blocks = 64;
    p.max_seqs = 8;
    p.max_blocks_per_seq = 64;
    p.max_leases = 16;
    p.max_owners = 8;
    cm_err err = {0};
    int rc = kvstore_create(name, &g, &p, &err);
    CHECK(rc == 0, "create %s: %s", name, err.msg);
    kvstore *kv = NULL;
    rc = kvstore_open(name, &p, NULL, &kv, &err);
    CHECK(rc == 0, "open: %s", err.msg);
    if (rc)
        return;
    const kvstore_geometry *sg = kvstore_get_geometry(kv);
    size_t es = row_type == KVSTORE_DTYPE_F32 ? 4 : 2;
    size_t stride = NH * HD * es + 16; /* padded rows: stride > payload */
    CHECK(kvstore_kvcache_row_bytes(sg, row_type) == NH * HD * es, "row bytes");

    unsigned char *k[NL], *v[NL];
    for (int l = 0; l < NL; l++) {
        k[l] = calloc(NTOK, stride);
        v[l] = calloc(NTOK, stride);
        fill_rows(k[l], row_type, (uint32_t)l, 0, NTOK, stride);
        fill_rows(v[l], row_type, (uint32_t)l, 1, NTOK, stride);
    }
    kvstore_seq_ref seq;
    rc = kvstore_seq_create(kv, NULL, 0, &seq, &err);
    CHECK(rc == 0, "seq create: %s", err.msg);
    /* chunks that start and end inside token blocks: 0..7, 7..20, 20..21, 21..52, 52..75 */
    const uint32_t cuts[] = {0, 7, 20, 21, 52, NTOK};
    for (size_t c = 0; c + 1 < sizeof(cuts) / sizeof(cuts[0]); c++)
        for (uint32_t l = 0; l < NL; l++) {
            uint32_t t0 = cuts[c], n = cuts[c + 1] - cuts[c];
            rc = kvstore_kvcache_store(kv, seq, l, k[l] + t0 * stride, v[l] + t0 * stride,
                                       stride, row_type, t0, n, &err);
            CHECK(rc == 0, "store l%u %u+%u: %s", l, t0, n, err.msg);
        }
    CHECK(kvstore_kvcache_store(kv, seq, NL, k[0], v[0], stride, row_type, 0, 1, NULL) == -EINVAL,
          "layer out of range");
    CHECK(kvstore_kvcache_store(kv, seq, 0, k[0], v[0], 4, row_type, 0, 1, NULL) == -EINVAL,
          "short stride");
    CHECK(kvstore_kvcache_store(kv, seq, 0, k[0], v[0], stride, 7, 0, 1, NULL) == -EINVAL,
          "bad type");

    int32_t toks[NTOK];
    for (int i = 0; i < NTOK; i++)
        toks[i] = i + 1;
    kvstore_lease lease;
    rc = kvstore_seq_publish(kv, seq, toks, NTOK, &lease, &err);
    CHECK(rc == 0, "publish: %s", err.msg);

    /* the layout of one block: token block 1, layer 2, V head 2 token 3 dim 5 */
    void *blk = malloc(sg->bytes_per_block);
    rc = kvstore_block_read(kv, &lease, 1, 2, blk, &err);
    CHECK(rc == 0, "block read: %s", err.msg);
    {
        size_t off = ((1 * NH + 2) * TPB + 3) * HD + 5;
        float got = seg_type == KVSTORE_DTYPE_F32 ? ((float *)blk)[off]
                                                  : tn_fp16_to_fp32(((uint16_t *)blk)[off]);
        CHECK(got == val(2, 1, TPB + 3, 2, 5), "block layout: %g vs %g", (double)got,
              (double)val(2, 1, TPB + 3, 2, 5));
    }
    free(blk);

    /* loads: whole, unaligned ranges, one token */
    const uint32_t ranges[][2] = {{0, NTOK}, {5, 40}, {15, 2}, {31, 44}, {74, 1}, {16, 16}};
    unsigned char *ko = calloc(NTOK, stride), *vo = calloc(NTOK, stride);
    for (size_t r = 0; r < sizeof(ranges) / sizeof(ranges[0]); r++)
        for (uint32_t l = 0; l < NL; l++) {
            uint32_t t0 = ranges[r][0], n = ranges[r][1];
            memset(ko, 0x7f, NTOK * stride);
            memset(vo, 0x7f, NTOK * stride);
            rc = kvstore_kvcache_load(kv, &lease, l, t0, n, ko, vo, stride, row_type, &err);
            CHECK(rc == 0, "load l%u %u+%u: %s", l, t0, n, err.msg);
            int bad = 0;
            for (uint32_t i = 0; i < n; i++) {
                /* same type: bit-exact; else exact since values are f16-representable */
                if (memcmp(ko + i * stride, k[l] + (t0 + i) * stride, NH * HD * es) ||
                    memcmp(vo + i * stride, v[l] + (t0 + i) * stride, NH * HD * es))
                    bad++;
                for (uint32_t h = 0; h < NH; h++)
                    if (get_row(ko, row_type, stride, i, h, 1) != val(l, 0, t0 + i, h, 1))
                        bad++;
            }
            /* nothing written past the range */
            if (n < NTOK && ko[n * stride] != 0x7f)
                bad++;
            CHECK(bad == 0, "load l%u %u+%u: %d mismatches", l, t0, n, bad);
        }
    /* past the last token block: an error from the store */
    rc = kvstore_kvcache_load(kv, &lease, 0, 5 * TPB, 1, ko, vo, stride, row_type, NULL);
    CHECK(rc != 0, "load past the end gave %d", rc);
    free(ko);
    free(vo);

    /* the pure converters agree with the store path */
    {
        void *b = calloc(1, sg->bytes_per_block);
        unsigned char *kr = calloc(TPB, stride), *vr = calloc(TPB, stride);
        CHECK(kvstore_kvcache_rows_to_block(sg, b, 3, 10, k[1] + 3 * stride, v[1] + 3 * stride,
                                            stride, row_type) == 0, "rows_to_block");
        CHECK(kvstore_kvcache_block_to_rows(sg, b, 3, 10, kr, vr, stride, row_type) == 0,
              "block_to_rows");
        int bad = 0;
        for (int i = 0; i < 10; i++)
            if (memcmp(kr + i * stride, k[1] + (3 + i) * stride, NH * HD * es) ||
                memcmp(vr + i * stride, v[1] + (3 + i) * stride, NH * HD * es))
                bad++;
        CHECK(bad == 0, "converter round trip: %d", bad);
        CHECK(kvstore_kvcache_rows_to_block(sg, b, 10, 7, kr, vr, stride, row_type) == -EINVAL,
              "range past block");
        free(b);
        free(kr);
        free(vr);
    }

    kvstore_lease_release(kv, &lease, NULL);
    CHECK(kvstore_check(kv, &err) == 0, "check: %s", err.msg);
    for (int l = 0; l < NL; l++) {
        free(k[l]);
        free(v[l]);
    }
    kvstore_close(kv);
    kvstore_destroy(name, &p, NULL);
}

/* The model fingerprint: deterministic, sensitive to the header, the tail and the size. */
static void fingerprint(void)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/fp.bin", g_dir);
    size_t n = (size_t)10 << 20; /* past the 8 MiB head + 1 MiB tail */
    unsigned char *buf = malloc(n);
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)(i * 7 + (i >> 13));
    uint64_t fp[5] = {0};
    cm_err err = {0};
    for (int k = 0; k < 5; k++) {
        if (k == 2)
            buf[100] ^= 1; /* header */
        if (k == 3)
            buf[n - 5] ^= 1; /* tail */
        FILE *f = fopen(path, "wb");
        size_t len = k == 4 ? n - 1 : n;
        CHECK(f && fwrite(buf, 1, len, f) == len, "write");
        if (f)
            fclose(f);
        CHECK(kvstore_model_fingerprint(path, &fp[k], &err) == 0, "fingerprint: %s", err.msg);
    }
    CHECK(fp[0] == fp[1] && fp[0] != 0, "deterministic");
    CHECK(fp[2] != fp[1] && fp[3] != fp[2] && fp[4] != fp[3], "changes with header, tail, size");
    uint64_t x;
    CHECK(kvstore_model_fingerprint("/nonexistent/model.gguf", &x, &err) == -ENOENT, "missing");
    free(buf);
    remove(path);
}

/* The fp8 dtype of the GPU paths: one byte per element in the geometry; the CPU conversions
 * refuse it (they would misread the bytes). */
static void fp8_geometry(void)
{
    kvstore_geometry g;
    memset(&g, 0, sizeof(g));
    g.n_layers = 2;
    g.n_kv_heads = 3;
    g.head_dim = 16;
    g.tokens_per_block = 64;
    g.dtype = KVSTORE_DTYPE_F8_E4M3;
    CHECK(kvstore_geometry_finish(&g, NULL) == 0 && g.bytes_per_block == 2u * 3 * 64 * 16,
          "fp8 block bytes %llu", (unsigned long long)g.bytes_per_block);
    static unsigned char blk[2 * 3 * 64 * 16];
    float rows[3 * 16] = {0};
    CHECK(kvstore_kvcache_block_to_rows(&g, blk, 0, 1, rows, rows, sizeof(rows),
                                        KVSTORE_DTYPE_F32) == -EINVAL,
          "fp8 block converted to f32 rows");
}

int main(void)
{
    kvt_dir(g_dir, sizeof(g_dir), "kvcache");
    fingerprint();
    fp8_geometry();
    round_trip(KVSTORE_DTYPE_F16, KVSTORE_DTYPE_F16);
    round_trip(KVSTORE_DTYPE_F32, KVSTORE_DTYPE_F32);
    round_trip(KVSTORE_DTYPE_F16, KVSTORE_DTYPE_F32);
    round_trip(KVSTORE_DTYPE_F32, KVSTORE_DTYPE_F16);
    kvt_rmdir(g_dir);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
