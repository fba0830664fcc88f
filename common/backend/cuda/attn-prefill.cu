/*
 * attn-prefill.cu — tensor-core prefill (n_tok > 1) for dense causal attention and HiP
 * block-sparse attention: FlashAttention-2-style tiles on mma.sync m16n8k16 bf16 -> fp32.
 *
 * Design
 *   - One block = 128 rows (QT = 128/G queries x the G heads of one KV group) x every key of
 *     its list; 8 warps, each owning 16 rows. Key tiles of 64 keys.
 *   - The key list is the one of the fp32 kernel (attn-kernels.cuh): logical index n ->
 *     (token t, rotation position vpos, set); dense: t = vpos = n for n <= last query; BSA:
 *     ak_bsa_key of the query block. Masking per (query, key) with ak_valid, exactly as there.
 *     A tile whose every key is valid for the first and the last query of the block is valid
 *     for all of them (validity is an interval in p for every set) and skips the masking.
 *   - Queries: rotated once at their positions in fp32, scaled by scale*log2(e) (softmax in
 *     base 2), rounded to bf16, kept in registers as A fragments for the whole key loop.
 *   - K/V: bf16 tiles [64][D + 8] in shared memory (8 bf16 of padding: the 8 rows an ldmatrix
 *     phase reads start 4 banks apart), double buffered: bf16 caches are copied with cp.async
 *     (zero-filled for masked keys) while the previous tile is computed; fp8 caches are
 *     converted (value * scale -> bf16) through registers. K is rotated in place in shared
 *     memory after it lands (bf16 -> fp32, rotate, -> bf16). cos/sin: one exact row per tile
 *     (vpos of the tile's first key) times a 64-position table in shared memory (angle
 *     addition); keys whose vpos is not within 64 of the tile's first one (set boundaries,
 *     clamped positions) compute their angle directly (ak_cs, exact).
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

template <int D>
struct pf_layout {
    static constexpr int LDS = D + 8;                       /* bf16 row stride of Q/K/V tiles */
    static constexpr size_t kv = (size_t)2 * PF_KT * LDS * 2; /* bytes of Ks (or Vs): 2 buffers */
    static constexpr size_t tlo = (size_t)PF_KT * (D / 2) * 8; /* float2 [64][D/2] */
    static constexpr size_t thi = (size_t)2 * (D / 2) * 8;     /* float2 [2][D/2] */
    static constexpr size_t meta = (size_t)2 * PF_KT * (4 * 8 + 4) + 2 * 8; /* K/V row,t,vpos,set; vb */
    static constexpr size_t bytes = 2 * kv + tlo + thi + meta;
    static_assert(2 * PF_KT >= PF_ROWS, "the Q staging tile lives in the two K buffers");
};

/* ---- the kernel ------------------------------------------------------------------------------- */

/* grid.x = query tiles (dense: ceil(n_tok / QT); BSA: n_qblk * sub-tiles), grid.y = KV head */
template <int D, bool DENSE>
__global__ void __launch_bounds__(PF_THREADS, D == 64 ? 2 : 1)
    ak_pf_mma_kernel(attn_params P, int qt, int nsub)
{
    typedef pf_layout<D> L;
    constexpr int LDS = L::LDS, HD = D / 2, NKT = PF_KT / 8, NDT = D / 8;
    static_assert(PF_THREADS % HD == 0 && D % 16 == 0, "thread -> frequency mapping");
    extern __shared__ uint4 pf_smem4[];
    uint8_t *sm = (uint8_t *)pf_smem4;
    uint16_t *Ks = (uint16_t *)sm;                 /* [2][64][LDS] */
    uint16_t *Vs = (uint16_t *)(sm + L::kv);       /* [2][64][LDS] */
    float2 *tlo = (float2 *)(sm + 2 * L::kv);      /* [64][HD] */
    float2 *thi = (float2 *)(sm + 2 * L::kv + L::tlo); /* [2][HD] */
    /* [2][64] byte addresses of the K and V rows of the tile's keys (ak_rows) */
    unsigned long long *mka = (unsigned long long *)(sm + 2 * L::kv + L::tlo + L::thi);
    unsigned long long *mva = mka + 2 * PF_KT;
    long long *mt = (long long *)(mva + 2 * PF_KT);
    long long *mvp = mt + 2 * PF_KT;
    long long *mvb = mvp + 2 * PF_KT; /* [2] */
    int *mset = (int *)(mvb + 2);     /* [2][64] */
    uint16_t *Qs = Ks;                /* [128][LDS] staging, before the key loop */

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
    for (int i = tid; i < PF_ROWS * HD; i += PF_THREADS) {
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
    uint32_t qf[D / 16][4];
    {
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
    /* my rows: warp * 16 + gid (A) and + 8 (B); -1 = no query (masked everywhere) */
    const int rowA = warp * 16 + gid, rowB = rowA + 8;
    const long long pA = rowA < nrows ? P.pos0 + r0 + rowA / G : -1;
    const long long pB = rowB < nrows ? P.pos0 + r0 + rowB / G : -1;

    /* key metadata of tile `it` into buffer it & 1; returns this thread's "all valid" vote */
    auto meta = [&](long long it) -> int {
        const int bb = (int)(it & 1);
        const long long k0 = it * PF_KT;
        int ok = 1;
        if (tid < PF_KT) {
            long long n = k0 + tid, t = n, vpos = n;
            int set = AK_DENSE;
            if (n >= n_keys) set = AK_NONE;
            else if (!DENSE) set = ak_bsa_key(P, blk, n, &t, &vpos);
            mt[bb * PF_KT + tid] = t;
            mvp[bb * PF_KT + tid] = vpos;
            mset[bb * PF_KT + tid] = set;
            const uint8_t *kp, *vq; /* masked: token 0's rows, a valid address never read */
            ak_rows(P, set != AK_NONE ? t : 0, g, &kp, &vq);
            mka[bb * PF_KT + tid] = (unsigned long long)(uintptr_t)kp;
            mva[bb * PF_KT + tid] = (unsigned long long)(uintptr_t)vq;
            ok = set != AK_NONE && ak_valid(P, set, t, pmin) && ak_valid(P, set, t, pmax);
        } else if (tid < PF_KT + hr) {
            const int fi = tid - PF_KT;
            long long t0 = k0, vb = k0;
            if (!DENSE) ak_bsa_key(P, blk, k0, &t0, &vb);
            float c, s;
            ak_cs(P.inv_freq[fi], vb, &c, &s);
            thi[bb * HD + fi] = make_float2(c, s);
            if (fi == 0) mvb[bb] = vb;
        }
        return ok;
    };
    /* K/V rows of tile `it` into buffer it & 1 (metadata already visible) */
    auto load = [&](long long it) {
        const int bb = (int)(it & 1);
        uint16_t *kd = Ks + (size_t)bb * PF_KT * LDS, *vd = Vs + (size_t)bb * PF_KT * LDS;
        for (int c = tid; c < PF_KT * (D / 8); c += PF_THREADS) {
            const int kk = c / (D / 8), e = (c % (D / 8)) * 8;
            const bool valid = mset[bb * PF_KT + kk] != AK_NONE;
            const uint8_t *kp = (const uint8_t *)(uintptr_t)mka[bb * PF_KT + kk];
            const uint8_t *vq = (const uint8_t *)(uintptr_t)mva[bb * PF_KT + kk];
            if (P.dtype == CUDA_KV_BF16) {
                pf_cp16(pf_saddr(kd + kk * LDS + e), (const uint16_t *)kp + e, valid);
                pf_cp16(pf_saddr(vd + kk * LDS + e), (const uint16_t *)vq + e, valid);
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
                *(uint4 *)(kd + kk * LDS + e) = kw;
                *(uint4 *)(vd + kk * LDS + e) = vw;
            }
        }
    };

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[NDT][4];
#pragma unroll
    for (int j = 0; j < NDT; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

    const long long n_tiles = (n_keys + PF_KT - 1) / PF_KT;
    int full = 0;
    if (n_tiles > 0) {
        full = __syncthreads_and(meta(0)); /* also: every warp has its Q fragments (Qs = Ks) */
        load(0);
        pf_commit();
    }
    for (long long it = 0; it < n_tiles; it++) {
        const int bb = (int)(it & 1);
        int full_next = 0;
        __syncthreads(); /* tile it - 1 consumed: its buffers take tile it + 1 */
        if (it + 1 < n_tiles) {
            full_next = __syncthreads_and(meta(it + 1));
            load(it + 1);
        }
        pf_commit();
        pf_wait<1>(); /* tile it landed (this thread's copies) */
        __syncthreads();
        /* rotate the keys of tile it in place */
        uint16_t *kt = Ks + (size_t)bb * PF_KT * LDS;
        if (hr > 0) {
            const long long vb = mvb[bb];
            /* thread -> frequency tid % HD (compile-time division), keys tid / HD + k * step */
            const int fi = tid % HD;
            /* (masked keys are zero rows: rotating them is harmless, no test needed; dense
             * keys are contiguous: vpos = k0 + kk) */
            int ea = 0, eb = 0;
            float2 hi = make_float2(1.0f, 0.0f);
            if (fi < hr) {
                pf_pair(fi, hr, neox, &ea, &eb);
                hi = thi[bb * HD + fi];
            }
            for (int kk = tid / HD; kk < PF_KT && fi < hr; kk += PF_THREADS / HD) {
                const long long vp = DENSE ? vb + kk : mvp[bb * PF_KT + kk], dv = vp - vb;
                float c, s;
                if (dv >= 0 && dv < PF_KT) {
                    float2 lo = tlo[(int)dv * HD + fi];
                    c = hi.x * lo.x - hi.y * lo.y;
                    s = hi.y * lo.x + hi.x * lo.y;
                } else if (mset[bb * PF_KT + kk] != AK_NONE) {
                    ak_cs(P.inv_freq[fi], vp, &c, &s);
                } else {
                    c = 1.0f;
                    s = 0.0f;
                }
                uint16_t *row = kt + kk * LDS;
                float a = pf_f32(row[ea]), b = pf_f32(row[eb]);
                row[ea] = pf_bf16(a * c - b * s);
                row[eb] = pf_bf16(a * s + b * c);
            }
            __syncthreads();
        }

        /* S = Q K^T: 16 rows x 64 keys per warp */
        float s[NKT][4];
#pragma unroll
        for (int j = 0; j < NKT; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        {
            /* ldmatrix row address of this lane: key (lane/16)*8 + lane%8, dim ((lane/8)&1)*8 */
            const uint32_t kbase =
                pf_saddr(kt + ((lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
                for (int jp = 0; jp < NKT / 2; jp++) {
                    uint32_t r[4];
                    pf_ldm4(r, kbase + (uint32_t)((jp * 16 * LDS + kk * 16) * 2));
                    pf_mma(s[2 * jp], qf[kk], r[0], r[1]);
                    pf_mma(s[2 * jp + 1], qf[kk], r[2], r[3]);
                }
            }
        }
        /* mask */
        if (!full) {
#pragma unroll
            for (int j = 0; j < NKT; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int key = bb * PF_KT + j * 8 + 2 * tig + e;
                    const int set = mset[key];
                    const long long t = mt[key];
                    if (!ak_valid(P, set, t, pA)) s[j][e] = -INFINITY;
                    if (!ak_valid(P, set, t, pB)) s[j][2 + e] = -INFINITY;
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
            const float mn = fmaxf(m[h], mx);
            const float mu = mn == -INFINITY ? 0.0f : mn;
            const float corr = pf_ex2(m[h] - mu);
            float rs = 0.0f;
#pragma unroll
            for (int j = 0; j < NKT; j++) {
                s[j][2 * h] = pf_ex2(s[j][2 * h] - mu);
                s[j][2 * h + 1] = pf_ex2(s[j][2 * h + 1] - mu);
                rs += s[j][2 * h] + s[j][2 * h + 1];
            }
            l[h] = l[h] * corr + rs;
            m[h] = mn;
#pragma unroll
            for (int j = 0; j < NDT; j++) {
                o[j][2 * h] *= corr;
                o[j][2 * h + 1] *= corr;
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
                    pf_mma(o[2 * dp], pa, r[0], r[1]);
                    pf_mma(o[2 * dp + 1], pa, r[2], r[3]);
                }
            }
        }
        full = full_next;
    }
    pf_wait<0>();

    /* normalise and write: row sums over the 4 lanes of a row */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float ls = l[h];
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        ls += __shfl_xor_sync(0xffffffffu, ls, 2);
        const int r = h ? rowB : rowA;
        if (r >= nrows) continue;
        const long long tok = r0 + r / G;
        const int hh = g * G + r % G;
        const float inv = ls > 0.0f ? 1.0f / ls : 0.0f;
        float *out = P.out + ((size_t)tok * P.H + hh) * D + 2 * tig;
#pragma unroll
        for (int j = 0; j < NDT; j++)
            *(float2 *)(out + 8 * j) = make_float2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
    }
}

/* ---- host side ------------------------------------------------------------------------------ */

template <int D, bool DENSE>
static int pf_launch(const attn_params &P, unsigned nx, int qt, int nsub, cudaStream_t st)
{
    const size_t smem = pf_layout<D>::bytes;
    CUDA_TRY(cudaFuncSetAttribute(ak_pf_mma_kernel<D, DENSE>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid(nx, (unsigned)P.hkv);
    ak_pf_mma_kernel<D, DENSE><<<grid, PF_THREADS, smem, st>>>(P, qt, nsub);
    CUDA_TRY(cudaGetLastError());
    return 0;
}

int ak_prefill_mma(const attn_params *P, int dense, cudaStream_t st)
{
    if (!P || P->G < 1 || P->G > 8 || (P->d != 64 && P->d != 128) || P->n_tok < 1) return -EINVAL;
    const int qt = PF_ROWS / P->G;
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
        return dense ? pf_launch<64, true>(*P, (unsigned)nx, qt, nsub, st)
                     : pf_launch<64, false>(*P, (unsigned)nx, qt, nsub, st);
    return dense ? pf_launch<128, true>(*P, (unsigned)nx, qt, nsub, st)
                 : pf_launch<128, false>(*P, (unsigned)nx, qt, nsub, st);
}
