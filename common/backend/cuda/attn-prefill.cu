/*
 * attn-prefill.cu — tensor-core prefill (n_tok > 1) for dense causal attention and HiP
 * block-sparse attention: FlashAttention-2-style tiles on mma.sync m16n8k16 bf16 -> fp32.
 *
 * Design
 *   - One block = 128 MW rows (QT = 128 MW / G queries x the G heads of one KV group) x every
 *     key of its list; 8 warps, each owning MW m-tiles of 16 rows (MW = 2 at d 128: the copies
 *     and rotation of a key tile serve twice the rows; 1 at d 64, where 128 registers fit two
 *     blocks per SM). Key tiles of 64 keys.
 *   - The key list is the one of the fp32 kernel (attn-kernels.cuh): logical index n ->
 *     (token t, rotation position vpos, set); dense: t = vpos = n for n <= last query; BSA:
 *     ak_bsa_key of the query block. Masking per (query, key) with ak_valid, exactly as there.
 *     A tile whose every key is valid for the first and the last query of the block is valid
 *     for all of them (validity is an interval in p for every set) and skips the masking.
 *   - Queries: rotated once at their positions in fp32, scaled by scale*log2(e) (softmax in
 *     base 2), rounded to bf16; MW = 1: kept in registers as A fragments for the whole key
 *     loop; MW = 2: kept in shared memory, A fragments by ldmatrix.x4 per k-step (no room in
 *     registers beside two m-tiles' accumulators: 255 registers, no spills).
 *   - K/V: bf16 tiles [64][D + 8] in shared memory (8 bf16 of padding: the 8 rows an ldmatrix
 *     phase reads start 4 banks apart), three buffers, one barrier per tile: in step t every
 *     thread issues the copies of tile t + 2 (bf16: cp.async, zero-filled for masked keys; fp8:
 *     converted, value * scale -> bf16, through registers), rotates its own landed chunks of
 *     tile t + 1 in place (bf16 -> fp32, rotate, -> bf16), and computes tile t. Thread tid owns
 *     key tid / 4 of every tile and D / 32 of its 16-byte chunks (tid % 4 + 4 i), chosen so that
 *     both elements of every rotation pair are its own (NORM: a pair lies in one chunk; NEOX,
 *     n_rot = d only: chunks c and c + D / 16 of the two halves), so a rotation needs no barrier
 *     after the copies land; the selection entry a key reads is loaded a step before its copy.
 *     (Until 2026-11-29: two buffers, the whole block rotating each tile between barriers, four
 *     barriers per tile, and the H200 ran it at 31 % issue utilisation.) cos/sin: one exact row
 *     per tile (vpos of the tile's first key, computed by warp 0 with the copies of the tile)
 *     times a 64-position table in shared memory (angle addition); keys whose vpos is not
 *     within 64 of the tile's first one (set boundaries, clamped positions) compute their angle
 *     directly (ak_cs, exact).
 *   - S = Q K^T with mma (K fragments by ldmatrix.x4), online softmax in fp32 on the
 *     accumulators (row max/sum over the 4 lanes of a row with two xor shuffles), P rounded to
 *     bf16 and reused in registers as the A fragments of O += P V (V fragments by
 *     ldmatrix.x4.trans). l is kept per lane and reduced at the end.
 *
 * Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix
 * fragments for mma.m16n8k16 with floating point type"); lane = 4 * gid + tig (gid = lane/4,
 * tig = lane%4); a 32-bit register holds two bf16, the lower column/k index in the low half:
 *   A (16x16, row-major):  a[0] = A[gid    ][2tig, 2tig+1]     a[1] = A[gid + 8][2tig, 2tig+1]
 *                          a[2] = A[gid    ][2tig+8, 2tig+9]   a[3] = A[gid + 8][2tig+8, 2tig+9]
 *   B (16x8, "col": k x n): b[0] = B[2tig, 2tig+1][gid]        b[1] = B[2tig+8, 2tig+9][gid]
 *   C/D (16x8 f32):        c[0], c[1] = C[gid][2tig, 2tig+1]  c[2], c[3] = C[gid + 8][2tig, 2tig+1]
 * ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of matrix i
 * (8 rows of 16 bytes); lane l receives in register i the bf16 pair of matrix i at row l/4,
 * columns 2(l%4), 2(l%4)+1; with .trans it receives rows 2(l%4), 2(l%4)+1 at column l/4.
 *   S = Q K^T: B[k][n] = K[key n][dim k] -> b[0] is row gid (key), columns 2tig.. of the
 *     8x8 block (keys n0..n0+7, dims k0..k0+7): plain ldmatrix of K rows. x4 matrices:
 *     (keys n0, dims k0), (n0, k0+8), (n0+8, k0), (n0+8, k0+8) = b[0], b[1] of key tile n0 and
 *     b[0], b[1] of key tile n0+8.
 *   O = P V: B[k][n] = V[key k][dim n] -> b[0] = V[keys 2tig, 2tig+1][dim gid]: ldmatrix.trans
 *     of V rows. x4 matrices: (keys k0, dims n0), (k0+8, n0), (k0, n0+8), (k0+8, n0+8).
 *   P as A: the S accumulators of key tiles 2j and 2j+1 (keys 16j..16j+15):
 *     a[0] = (s[2j][0], s[2j][1]), a[1] = (s[2j][2], s[2j][3]),
 *     a[2] = (s[2j+1][0], s[2j+1][1]), a[3] = (s[2j+1][2], s[2j+1][3]).
 */
/* attn-kernels.cuh (included by attn-prefill.cuh) defines host helpers this file does not use
 * (ak_setup is called by attn-dense.cu / attn-bsa.cu). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "attn-prefill.cuh"
#pragma GCC diagnostic pop

#include "attn-mma.cuh"

#include <stdlib.h>

#define PF_ROWS 128   /* rows (query x head) per block */
#define PF_WARPS 8    /* 16 rows each */
#define PF_THREADS (PF_WARPS * 32)
#define PF_KT 64      /* keys per tile */
#define PF_LOG2E 1.4426950408889634f
#define PF_NB 3       /* K/V tile buffers: loading t + 2, rotating t + 1, computing t */

int ak_prefill_mode(void)
{
    const char *e = getenv("IHIP_ATTN_PREFILL");
    return e && strcmp(e, "fp32") == 0 ? AK_PF_FP32 : AK_PF_MMA;
}

/* Elements (ea, eb) of rotation pair pi: pi < hr rotates (NEOX: pi, pi + hr; NORM: 2pi, 2pi + 1);
 * pairs pi >= hr are the pass-through elements 2pi, 2pi + 1 (>= n_rot). */
static __device__ __forceinline__ void pf_pair(int pi, int hr, bool neox, int *ea, int *eb)
{
    if (pi < hr && neox) {
        *ea = pi;
        *eb = pi + hr;
    } else {
        *ea = 2 * pi;
        *eb = 2 * pi + 1;
    }
}

/* ---- shared memory layout ----------------------------------------------------------------------- */

template <int D, int MW>
struct pf_layout {
    static constexpr int LDS = D + 8;                       /* bf16 row stride of Q/K/V tiles */
    static constexpr size_t kv = (size_t)PF_NB * PF_KT * LDS * 2; /* bytes of Ks (or Vs): PF_NB buffers */
    static constexpr size_t tlo = (size_t)PF_KT * (D / 2) * 8; /* float2 [64][D/2] */
    static constexpr size_t thi = (size_t)PF_NB * (D / 2) * 8; /* float2 [PF_NB][D/2] */
    /* t, set; vb — rounded to 16 bytes (the Q tile after it is read by ldmatrix) */
    static constexpr size_t meta = ((size_t)PF_NB * PF_KT * (8 + 4) + PF_NB * 8 + 15) / 16 * 16;
    /* MW > 1: the queries stay in shared memory (A fragments by ldmatrix); MW = 1: they are
     * staged in the first two K buffers and kept in registers */
    static constexpr size_t qs = MW > 1 ? (size_t)PF_ROWS * MW * LDS * 2 : 0;
    static constexpr size_t bytes = 2 * kv + tlo + thi + meta + qs;
    static_assert(MW > 1 || 2 * PF_KT >= PF_ROWS, "the Q staging tile lives in the first two K buffers");
};

/* ---- the kernel ------------------------------------------------------------------------------- */

/* grid.x = query tiles (dense: ceil(n_tok / QT); BSA: n_qblk * sub-tiles), grid.y = KV head;
 * MW m-tiles (16 rows each) per warp: 128 MW rows per block */
template <int D, bool DENSE, int MW>
__global__ void __launch_bounds__(PF_THREADS, D == 64 ? 2 : 1)
    ak_pf_mma_kernel(attn_params P, int qt, int nsub)
{
    typedef pf_layout<D, MW> L;
    constexpr int ROWS = PF_ROWS * MW;
    constexpr int LDS = L::LDS, HD = D / 2, NKT = PF_KT / 8, NDT = D / 8;
    static_assert(PF_THREADS % HD == 0 && D % 16 == 0, "thread -> frequency mapping");
    extern __shared__ uint4 pf_smem4[];
    uint8_t *sm = (uint8_t *)pf_smem4;
    uint16_t *Ks = (uint16_t *)sm;                 /* [PF_NB][64][LDS] */
    uint16_t *Vs = (uint16_t *)(sm + L::kv);       /* [PF_NB][64][LDS] */
    float2 *tlo = (float2 *)(sm + 2 * L::kv);      /* [64][HD] */
    float2 *thi = (float2 *)(sm + 2 * L::kv + L::tlo); /* [PF_NB][HD] */
    long long *mt = (long long *)(sm + 2 * L::kv + L::tlo + L::thi); /* [PF_NB][64] token */
    long long *mvb = mt + PF_NB * PF_KT;           /* [PF_NB] rotation position of key 0 */
    int *mset = (int *)(mvb + PF_NB);              /* [PF_NB][64] */
    uint16_t *Qs = MW > 1 ? (uint16_t *)(sm + L::bytes - L::qs) : Ks; /* [ROWS][LDS] */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int g = blockIdx.y, G = P.G;
    const int hr = P.inv_freq ? P.n_rot / 2 : 0;
    const bool neox = P.rope_style == CPU_ROPE_NEOX;

    long long r0, r1;
    ak_blk blk = {};
    if (DENSE) {
        r0 = (long long)blockIdx.x * qt;
        r1 = r0 + qt < P.n_tok ? r0 + qt : P.n_tok;
    } else {
        int b = blockIdx.x / nsub, sub = blockIdx.x % nsub;
        blk = ak_bsa_block(P, b);
        long long bs = (long long)b * P.bq;
        long long be = bs + P.bq < P.n_tok ? bs + P.bq : P.n_tok;
        r0 = bs + (long long)sub * qt;
        r1 = r0 + qt < be ? r0 + qt : be;
    }
    if (r0 >= r1) return;
    const int nrows = (int)(r1 - r0) * G;
    const long long pmin = P.pos0 + r0, pmax = P.pos0 + r1 - 1;
    const long long n_keys = DENSE ? P.pos0 + r1 : blk.n;

    /* queries: rotated at their positions, scaled by scale * log2(e), bf16, staged in Qs */
    const float qscale = P.scale * PF_LOG2E;
    for (int i = tid; i < ROWS * HD; i += PF_THREADS) {
        int r = i / HD, pi = i % HD, ea, eb;
        pf_pair(pi, hr, neox, &ea, &eb);
        float a = 0.0f, b = 0.0f;
        if (r < nrows) {
            long long tok = r0 + r / G;
            int h = g * G + r % G;
            const float *qr = P.q + ((size_t)tok * P.H + h) * D;
            a = qr[ea];
            b = qr[eb];
            if (pi < hr) {
                float c, s;
                ak_cs(P.inv_freq[pi], P.pos0 + tok, &c, &s);
                float a2 = a * c - b * s;
                b = a * s + b * c;
                a = a2;
            }
            a *= qscale;
            b *= qscale;
        }
        Qs[r * LDS + ea] = pf_bf16(a);
        Qs[r * LDS + eb] = pf_bf16(b);
    }
    /* cos/sin of j * inv_freq for the 64 low offsets */
    for (int i = tid; i < PF_KT * hr; i += PF_THREADS) {
        int j = i / hr, fi = i % hr;
        float c, s;
        ak_cs(P.inv_freq[fi], j, &c, &s);
        tlo[j * HD + fi] = make_float2(c, s);
    }
    __syncthreads();
    uint32_t qf[MW == 1 ? D / 16 : 1][4];
    if (MW == 1) {
        const uint16_t *qa = Qs + (warp * 16 + gid) * LDS + 2 * tig;
        const uint16_t *qb = qa + 8 * LDS;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            qf[kk][0] = *(const uint32_t *)(qa + 16 * kk);
            qf[kk][1] = *(const uint32_t *)(qb + 16 * kk);
            qf[kk][2] = *(const uint32_t *)(qa + 16 * kk + 8);
            qf[kk][3] = *(const uint32_t *)(qb + 16 * kk + 8);
        }
    }
    /* my rows of m-tile mi: 16 (MW warp + mi) + gid (A) and + 8 (B); position -1 = no query
     * (masked everywhere) */
    long long pA[MW], pB[MW];
#pragma unroll
    for (int mi = 0; mi < MW; mi++) {
        const int rowA = 16 * (MW * warp + mi) + gid, rowB = rowA + 8;
        pA[mi] = rowA < nrows ? P.pos0 + r0 + rowA / G : -1;
        pB[mi] = rowB < nrows ? P.pos0 + r0 + rowB / G : -1;
    }
    /* MW > 1: ldmatrix address of this lane in the warp's first m-tile of Qs (row lane % 16,
     * dims (lane / 16) 8: the A fragment of a 16 x 16 tile) */
    const uint32_t qbase = pf_saddr(Qs + (16 * MW * warp + (lane & 15)) * LDS + (lane >> 4) * 8);

    /* Thread -> key kk = tid / 4 of every tile and its 16-byte chunks part + 4 i, i < NCH (part =
     * tid % 4; a warp's 16-byte accesses then cover 64 contiguous bytes per key): both elements
     * of every rotation pair are this thread's (NORM: the same chunk; NEOX, n_rot = d: chunk
     * c < D / 16 of the low half and c + D / 16 = chunk i + NCH / 2), so it rotates its chunks
     * itself once its own copies have landed (no barrier between landing and rotating). */
    constexpr int NCH = D / 32;
    const int kk = tid >> 2, part = tid & 3;

    /* the selection entry my key of tile `it` reads (loaded a step before its use, so the load's
     * latency is not waited for in the step that issues it) */
    auto pre = [&](long long it) -> long long {
        const long long n = it * PF_KT + kk;
        const long long slot = DENSE || n >= n_keys ? -1 : ak_bsa_slot(P, blk, n);
        return slot >= 0 ? blk.idx[slot] : 0;
    };
    /* metadata and K/V copies of my key of tile `it` into buffer it % PF_NB, given its selection
     * entry sv (warp 0: the tile's cos/sin row); returns my key's "valid for every query of the
     * block" vote */
    auto issue = [&](long long it, long long sv, long long &vp, int &set) -> int {
        const int bb = (int)(it % PF_NB);
        const long long n = it * PF_KT + kk;
        long long t = n;
        vp = n;
        set = AK_DENSE;
        if (n >= n_keys) set = AK_NONE;
        else if (!DENSE) set = ak_bsa_key_s(P, blk, n, sv, &t, &vp);
        if (part == 0) {
            mt[bb * PF_KT + kk] = t;
            mset[bb * PF_KT + kk] = set;
        }
        const bool valid = set != AK_NONE;
        const uint8_t *kp, *vq; /* masked: token 0's rows, a valid address never read */
        ak_rows(P, valid ? t : 0, g, &kp, &vq);
        uint16_t *kd = Ks + ((size_t)bb * PF_KT + kk) * LDS, *vd = Vs + ((size_t)bb * PF_KT + kk) * LDS;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const int e = 8 * (part + 4 * i);
            if (P.dtype == CUDA_KV_BF16) {
                pf_cp16(pf_saddr(kd + e), (const uint16_t *)kp + e, valid);
                pf_cp16(pf_saddr(vd + e), (const uint16_t *)vq + e, valid);
            } else {
                uint4 kw = make_uint4(0u, 0u, 0u, 0u), vw = kw;
                if (valid) {
                    float x[8];
                    uint2 r = __ldg((const uint2 *)(kp + e));
                    ak_unpack(P, make_uint4(r.x, r.y, 0u, 0u), P.k_scale, x);
                    kw = make_uint4(pf_pack(x[0], x[1]), pf_pack(x[2], x[3]), pf_pack(x[4], x[5]),
                                    pf_pack(x[6], x[7]));
                    r = __ldg((const uint2 *)(vq + e));
                    ak_unpack(P, make_uint4(r.x, r.y, 0u, 0u), P.v_scale, x);
                    vw = make_uint4(pf_pack(x[0], x[1]), pf_pack(x[2], x[3]), pf_pack(x[4], x[5]),
                                    pf_pack(x[6], x[7]));
                }
                *(uint4 *)(kd + e) = kw;
                *(uint4 *)(vd + e) = vw;
            }
        }
        if (warp == 0 && hr > 0) { /* the tile's row: vb = vpos of key 0 (thread 0's) */
            const long long vb = __shfl_sync(0xffffffffu, vp, 0);
            for (int fi = lane; fi < hr; fi += 32) {
                float c, s;
                ak_cs(P.inv_freq[fi], vb, &c, &s);
                thi[bb * HD + fi] = make_float2(c, s);
            }
            if (lane == 0) mvb[bb] = vb;
        }
        return valid && ak_valid(P, set, t, pmin) && ak_valid(P, set, t, pmax);
    };
    /* rotate my chunks of tile `it` (landed; the tile's cos/sin row published by a barrier):
     * cos/sin of vpos = vb + dv as the angle sum of the tile's row and the 64-offset table,
     * exact (ak_cs) where dv is out of the table (set boundaries, clamped positions: rare, so
     * that path is a plain loop — unrolled, its sincos copies made the kernel 4x larger and
     * 1.35x slower on the H200) */
    auto rotate = [&](long long it, long long vp, int set) {
        if (hr == 0 || set == AK_NONE) return;
        const int bb = (int)(it % PF_NB);
        const long long dv = vp - mvb[bb];
        uint16_t *row = Ks + ((size_t)bb * PF_KT + kk) * LDS;
        if (dv < 0 || dv >= PF_KT) {
#pragma unroll 1
            for (int u = 0; u < 4 * NCH; u++) {
                /* pair u: NORM (2 fi, 2 fi + 1), fi = 4 c + u % 4; NEOX (fi, fi + D / 2), fi = 8 c + u % 8 */
                const int c = part + 4 * (neox ? u / 8 : u / 4);
                const int fi = neox ? 8 * c + u % 8 : 4 * c + u % 4;
                if (fi >= hr) continue;
                const int ea = neox ? fi : 2 * fi, eb = neox ? fi + HD : 2 * fi + 1;
                float cc, ss;
                ak_cs(P.inv_freq[fi], vp, &cc, &ss);
                const float a = pf_f32(row[ea]), b = pf_f32(row[eb]);
                row[ea] = pf_bf16(a * cc - b * ss);
                row[eb] = pf_bf16(a * ss + b * cc);
            }
            return;
        }
        const float2 *lo = tlo + (int)dv * HD, *hi = thi + bb * HD;
        auto rot = [&](float &a, float &b, int fi) {
            const float2 l = lo[fi], h = hi[fi];
            const float c = h.x * l.x - h.y * l.y, s = h.y * l.x + h.x * l.y;
            const float a2 = a * c - b * s;
            b = a * s + b * c;
            a = a2;
        };
        if (!neox) {
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                const int c0 = part + 4 * i;
                if (4 * c0 >= hr) continue;
                uint4 *pa = (uint4 *)(row + 8 * c0);
                float x[8];
                ak_unpack_t<false>(*pa, 1.0f, x);
#pragma unroll
                for (int q = 0; q < 4; q++)
                    if (4 * c0 + q < hr) rot(x[2 * q], x[2 * q + 1], 4 * c0 + q);
                *pa = make_uint4(pf_pack(x[0], x[1]), pf_pack(x[2], x[3]), pf_pack(x[4], x[5]), pf_pack(x[6], x[7]));
            }
        } else {
#pragma unroll
            for (int i = 0; i < NCH / 2; i++) {
                const int c0 = part + 4 * i;
                uint4 *pa = (uint4 *)(row + 8 * c0), *pb = (uint4 *)(row + 8 * (c0 + D / 16));
                float x[8], y[8];
                ak_unpack_t<false>(*pa, 1.0f, x);
                ak_unpack_t<false>(*pb, 1.0f, y);
#pragma unroll
                for (int q = 0; q < 8; q++) rot(x[q], y[q], 8 * c0 + q);
                *pa = make_uint4(pf_pack(x[0], x[1]), pf_pack(x[2], x[3]), pf_pack(x[4], x[5]), pf_pack(x[6], x[7]));
                *pb = make_uint4(pf_pack(y[0], y[1]), pf_pack(y[2], y[3]), pf_pack(y[4], y[5]), pf_pack(y[6], y[7]));
            }
        }
    };

    float m[MW][2], l[MW][2], o[MW][NDT][4];
#pragma unroll
    for (int mi = 0; mi < MW; mi++) {
        m[mi][0] = m[mi][1] = -INFINITY;
        l[mi][0] = l[mi][1] = 0.0f;
#pragma unroll
        for (int jj = 0; jj < NDT; jj++) o[mi][jj][0] = o[mi][jj][1] = o[mi][jj][2] = o[mi][jj][3] = 0.0f;
    }

    /* Pipeline, one barrier per tile: in step it every thread issues the copies of tile it + 2,
     * rotates its own landed chunks of tile it + 1, and computes tile it (rotated in step
     * it - 1); the barrier ending step it publishes tile it + 1's rotation and tile it + 2's
     * metadata and frees tile it's buffers. */
    const long long n_tiles = (n_keys + PF_KT - 1) / PF_KT;
    __syncthreads(); /* every warp has its Q fragments: the staging rows are K buffers 0-1 */
    long long vp1 = 0, vp2 = 0, sv = n_tiles > 0 ? pre(0) : 0;
    int set1 = AK_NONE, set2 = AK_NONE, full_cur = 0, full_nxt = 0;
    /* steps -2 and -1 only issue tiles 0, 1 and rotate tile 0 (one call site each: smaller code) */
    for (long long it = -2; it < n_tiles; it++) {
        const int bb = (int)((it + PF_NB) % PF_NB);
        int ok2 = 1;
        if (it + 2 < n_tiles) ok2 = issue(it + 2, sv, vp2, set2);
        sv = it + 3 < n_tiles ? pre(it + 3) : 0;
        pf_commit();
        pf_wait<1>(); /* my copies of tile it + 1 */
        if (it + 1 >= 0 && it + 1 < n_tiles) rotate(it + 1, vp1, set1);
        if (it >= 0) {
            uint16_t *kt = Ks + (size_t)bb * PF_KT * LDS;

#pragma unroll
            for (int mi = 0; mi < MW; mi++) {
            /* S = Q K^T: 16 rows x 64 keys per m-tile */
            float s[NKT][4];
#pragma unroll
            for (int j = 0; j < NKT; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            {
                /* ldmatrix row address of this lane: key (lane/16)*8 + lane%8, dim ((lane/8)&1)*8 */
                const uint32_t kbase =
                    pf_saddr(kt + ((lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    uint32_t qa[4];
                    if (MW > 1) pf_ldm4(qa, qbase + (uint32_t)((mi * 16 * LDS + kk * 16) * 2));
                    const uint32_t *q4 = MW > 1 ? qa : qf[MW > 1 ? 0 : kk];
#pragma unroll
                    for (int jp = 0; jp < NKT / 2; jp++) {
                        uint32_t r[4];
                        pf_ldm4(r, kbase + (uint32_t)((jp * 16 * LDS + kk * 16) * 2));
                        pf_mma(s[2 * jp], q4, r[0], r[1]);
                        pf_mma(s[2 * jp + 1], q4, r[2], r[3]);
                    }
                }
            }
            /* mask */
            if (!full_cur) {
#pragma unroll
                for (int j = 0; j < NKT; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int key = bb * PF_KT + j * 8 + 2 * tig + e;
                        const int set = mset[key];
                        const long long t = mt[key];
                        if (!ak_valid(P, set, t, pA[mi])) s[j][e] = -INFINITY;
                        if (!ak_valid(P, set, t, pB[mi])) s[j][2 + e] = -INFINITY;
                    }
            }
            /* online softmax (base 2), rows A (s[.][0..1]) and B (s[.][2..3]) */
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < NKT; j++) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mn = fmaxf(m[mi][h], mx);
                const float mu = mn == -INFINITY ? 0.0f : mn;
                const float corr = pf_ex2(m[mi][h] - mu);
                float rs = 0.0f;
#pragma unroll
                for (int j = 0; j < NKT; j++) {
                    s[j][2 * h] = pf_ex2(s[j][2 * h] - mu);
                    s[j][2 * h + 1] = pf_ex2(s[j][2 * h + 1] - mu);
                    rs += s[j][2 * h] + s[j][2 * h + 1];
                }
                l[mi][h] = l[mi][h] * corr + rs;
                m[mi][h] = mn;
#pragma unroll
                for (int j = 0; j < NDT; j++) {
                    o[mi][j][2 * h] *= corr;
                    o[mi][j][2 * h + 1] *= corr;
                }
            }
            /* O += P V */
            {
                const uint16_t *vt = Vs + (size_t)bb * PF_KT * LDS;
                /* ldmatrix.trans row address: key ((lane/8)&1)*8 + lane%8, dim (lane/16)*8 */
                const uint32_t vbase =
                    pf_saddr(vt + (((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + (lane >> 4) * 8);
#pragma unroll
                for (int kj = 0; kj < NKT / 2; kj++) {
                    uint32_t pa[4];
                    pa[0] = pf_pack(s[2 * kj][0], s[2 * kj][1]);
                    pa[1] = pf_pack(s[2 * kj][2], s[2 * kj][3]);
                    pa[2] = pf_pack(s[2 * kj + 1][0], s[2 * kj + 1][1]);
                    pa[3] = pf_pack(s[2 * kj + 1][2], s[2 * kj + 1][3]);
#pragma unroll
                    for (int dp = 0; dp < NDT / 2; dp++) {
                        uint32_t r[4];
                        pf_ldm4t(r, vbase + (uint32_t)((kj * 16 * LDS + dp * 16) * 2));
                        pf_mma(o[mi][2 * dp], pa, r[0], r[1]);
                        pf_mma(o[mi][2 * dp + 1], pa, r[2], r[3]);
                    }
                }
            }
            }
        }
        const int v = __syncthreads_and(ok2);
        full_cur = full_nxt;
        full_nxt = v;
        vp1 = vp2;
        set1 = set2;
    }
    pf_wait<0>();

    /* normalise and write: row sums over the 4 lanes of a row */
#pragma unroll
    for (int x = 0; x < 2 * MW; x++) {
        const int mi = x >> 1, h = x & 1;
        float ls = l[mi][h];
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        ls += __shfl_xor_sync(0xffffffffu, ls, 2);
        const int r = 16 * (MW * warp + mi) + gid + 8 * h;
        if (r >= nrows) continue;
        const long long tok = r0 + r / G;
        const int hh = g * G + r % G;
        const float inv = ls > 0.0f ? 1.0f / ls : 0.0f;
        float *out = P.out + ((size_t)tok * P.H + hh) * D + 2 * tig;
#pragma unroll
        for (int j = 0; j < NDT; j++)
            *(float2 *)(out + 8 * j) = make_float2(o[mi][j][2 * h] * inv, o[mi][j][2 * h + 1] * inv);
    }
}

/* ---- host side ------------------------------------------------------------------------------ */

template <int D, bool DENSE, int MW>
static int pf_launch(const attn_params &P, unsigned nx, int qt, int nsub, cudaStream_t st)
{
    const size_t smem = pf_layout<D, MW>::bytes;
    CUDA_TRY(cudaFuncSetAttribute(ak_pf_mma_kernel<D, DENSE, MW>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid(nx, (unsigned)P.hkv);
    ak_pf_mma_kernel<D, DENSE, MW><<<grid, PF_THREADS, smem, st>>>(P, qt, nsub);
    CUDA_TRY(cudaGetLastError());
    return 0;
}

int ak_prefill_mma(const attn_params *P, int dense, cudaStream_t st)
{
    if (!P || P->G < 1 || P->G > 8 || (P->d != 64 && P->d != 128) || P->n_tok < 1) return -EINVAL;
    /* each thread rotates the chunks it loads: NEOX pairs must be the two halves */
    if (P->inv_freq && P->rope_style == CPU_ROPE_NEOX && P->n_rot != P->d) return -ENOTSUP;
    /* d 128: two m-tiles per warp (256 rows per block: the tile's copies and rotation serve
     * twice the rows; H200, 32K queries at 1M: BSA 14.6 -> 11.3 ms, dense 3.46 -> 2.60 s)
     * unless IHIP_ATTN_PF_MW=1; d 64: one (128 registers, two blocks per SM) */
    const char *emw = getenv("IHIP_ATTN_PF_MW");
    const int mw = P->d == 128 && !(emw && strcmp(emw, "1") == 0) ? 2 : 1;
    const int qt = PF_ROWS * mw / P->G;
    long long nx;
    int nsub = 1;
    if (dense) {
        nx = (P->n_tok + qt - 1) / qt;
    } else {
        if (P->bq < 1) return -EINVAL;
        long long n_qblk = (P->n_tok + P->bq - 1) / P->bq;
        nsub = (P->bq + qt - 1) / qt;
        nx = n_qblk * nsub;
    }
    if (nx == 0) return 0;
    if (nx > 0x7fffffffLL) return -EINVAL;
    if (P->d == 64)
        return dense ? pf_launch<64, true, 1>(*P, (unsigned)nx, qt, nsub, st)
                     : pf_launch<64, false, 1>(*P, (unsigned)nx, qt, nsub, st);
    if (mw == 2)
        return dense ? pf_launch<128, true, 2>(*P, (unsigned)nx, qt, nsub, st)
                     : pf_launch<128, false, 2>(*P, (unsigned)nx, qt, nsub, st);
    return dense ? pf_launch<128, true, 1>(*P, (unsigned)nx, qt, nsub, st)
                 : pf_launch<128, false, 1>(*P, (unsigned)nx, qt, nsub, st);
}
