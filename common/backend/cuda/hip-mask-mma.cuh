/*
 * hip-mask-mma.cuh — opt-in tensor-core scan for prefill mask estimation (issue 6), included by
 * hip-mask.cu after its exact scan kernels (it uses their parameter structs and helpers).
 *
 * Selected by env IHIP_MASK_PREFILL=mma (every stage) or =mma0 (stage 0 only) for calls with
 * n_tok > 1, head_dim 64 or 128, and pruning positions that are constant per probe key (no RoPE,
 * or using_extend with the relative / chunk pruning positions; NEOX only with n_rot == d). The
 * exact kernels stay the default and are used for everything else.
 *
 * Two kernels: scan_mmr_kernel (at the end of this file) for layers pruned with relative
 * positions and NORM RoPE over every dim (or none) — the default there; IHIP_MASK_MMR=0 forces
 * the other — and scan_mma_kernel for the rest (chunk-indexed positions, NEOX).
 *
 * NOT bit-exact with hip_mask_estimate: the dot products of the descent are computed with
 * mma.sync.m16n8k16 bf16 x bf16 -> fp32 (probe rows rounded to bf16; keys decoded and rotated
 * in fp32, then rounded to bf16), in the tensor core's summation order, like the reference HiP
 * (Triton) which scores with bf16 tensor-core dots. Descent bookkeeping, probe midpoints, '>'
 * ties, the head reduction (max, first head wins) and the score's bf16 rounding (score_bf16)
 * are those of the exact kernels.
 *
 * scan_mma_kernel layout: one CTA per (4 candidate chunks, query block), 8 warps; warp w descends heads w, w+8,
 * ... for the 4 chunks in lockstep. A pass's 8 probe keys (chunk j's left key is column 2j, its
 * right key column 2j+1) form the B operand (k = head dims, n = 8 keys) and the pooled probe rows
 * of the head are A (16 rows per m16 tile; stage 2's 64 rows are 4 tiles). C[row][key] are the
 * dots; lane (gid, tig) holds rows gid, gid+8 of keys 2·tig, 2·tig+1 = chunk tig's left/right,
 * so the row max is a 3-step shuffle over gid.
 *
 * The k index of the fragments is a permutation of the head dims (a dot product does not care,
 * as long as A and B use the same one): in k-step ks (16 dims) lane tig's four k values
 * (2tig, 2tig+1, 2tig+8, 2tig+9) are the dims 32·(ks/2) + 8·tig + 4·(ks%2) + {0, 1, 2, 3}, so
 * each lane reads 8 contiguous dims per 32 (one 16-byte bf16 load / 8-byte fp8 load of the key,
 * two float4 loads of a probe row), and both RoPE partners of a pair (NORM: 2i, 2i+1; NEOX with
 * n_rot = d: e, e + d/2) are in the same lane.
 */

#include "attn-mma.cuh" /* pf_pack (two floats -> bf16x2, lo in the low half), pf_mma */

#define MMA_CH 4 /* candidate chunks per CTA: 4 chunks x (left, right) = the 8 columns of n8 */

/* 8 key elements (one 16-byte bf16 word or 8 fp8 bytes in w[0..1]) -> float */
template <bool FP8>
static __device__ __forceinline__ void mm_decode(const uint32_t w[4], float sc, float x[8])
{
#pragma unroll
    for (int e = 0; e < 8; e++)
        x[e] = FP8 ? __fmul_rn(fp8_to_f(w[e >> 2] >> (8 * (e & 3))), sc)
                   : bf16_to_f(w[e >> 1] >> (16 * (e & 1)));
}

/* NORM RoPE of the 8 elements x = dims e0 .. e0+7 (e0 even) of one key, exactly cpu_rope_apply's
 * products (fmaddsub for the first (half/4)*4 pairs). ALL: every pair rotated by fmaddsub
 * (n_rot = d, half % 4 = 0): no per-pair tests. */
template <bool ALL>
static __device__ __forceinline__ void mm_rope_norm(float x[8], int e0, const float2 *cs, int n_rot,
                                                    int n_fused)
{
#pragma unroll
    for (int k = 0; k < 8; k += 2) {
        const int e = e0 + k;
        if (ALL || e < n_rot) {
            const int i = e >> 1;
            const float2 c = cs[i];
            const float u = x[k], y = x[k + 1];
            if (ALL || i < n_fused) {
                x[k] = __fmaf_rn(u, c.x, -__fmul_rn(y, c.y));
                x[k + 1] = __fmaf_rn(y, c.x, __fmul_rn(u, c.y));
            } else {
                x[k] = __fsub_rn(__fmul_rn(u, c.x), __fmul_rn(y, c.y));
                x[k + 1] = __fadd_rn(__fmul_rn(u, c.y), __fmul_rn(y, c.x));
            }
        }
    }
}

/* A fragments of m-tile mt of one head's probe rows (rows past nrow are zero). Q = d / 32. */
/* NORM pairs (x, y) and (z, w) rotated back by the angles of cs[0], cs[1]: (a, b) ->
 * (a c + b s, b c - a s) */
static __device__ __forceinline__ void mm_unrot2(float4 &v, float2 c0, float2 c1)
{
    const float a = v.x, b = v.y, e = v.z, f = v.w;
    v.x = a * c0.x + b * c0.y;
    v.y = b * c0.x - a * c0.y;
    v.z = e * c1.x + f * c1.y;
    v.w = f * c1.x - e * c1.y;
}

/* cs1: NULL, or cos/sin of every NORM pair at position 1: the rows are then rotated back by one
 * position before rounding (scan_mmr_kernel's right-key fragments) */
template <int Q>
static __device__ __forceinline__ void mm_load_a(uint32_t a[2 * Q][4],
                                                 const float *__restrict__ rows, int d, int nrow,
                                                 int mt, int gid, int tig,
                                                 const float2 *cs1 = nullptr)
{
    const int r0 = 16 * mt + gid, r1 = r0 + 8;
#pragma unroll
    for (int q = 0; q < Q; q++) {
        float4 x0 = make_float4(0.f, 0.f, 0.f, 0.f), x1 = x0, y0 = x0, y1 = x0;
        if (r0 < nrow) {
            const float4 *s = (const float4 *)(rows + (size_t)r0 * d + 32 * q + 8 * tig);
            x0 = s[0];
            x1 = s[1];
        }
        if (r1 < nrow) {
            const float4 *s = (const float4 *)(rows + (size_t)r1 * d + 32 * q + 8 * tig);
            y0 = s[0];
            y1 = s[1];
        }
        if (cs1) { /* dims 32q + 8tig + 0..7 = pairs 16q + 4tig + 0..3 */
            const float2 *c = cs1 + 16 * q + 4 * tig;
            mm_unrot2(x0, c[0], c[1]);
            mm_unrot2(y0, c[0], c[1]);
            mm_unrot2(x1, c[2], c[3]);
            mm_unrot2(y1, c[2], c[3]);
        }
        /* k-step 2q: dims +0..3; k-step 2q+1: dims +4..7 */
        a[2 * q][0] = pf_pack(x0.x, x0.y);
        a[2 * q][1] = pf_pack(y0.x, y0.y);
        a[2 * q][2] = pf_pack(x0.z, x0.w);
        a[2 * q][3] = pf_pack(y0.z, y0.w);
        a[2 * q + 1][0] = pf_pack(x1.x, x1.y);
        a[2 * q + 1][1] = pf_pack(y1.x, y1.y);
        a[2 * q + 1][2] = pf_pack(x1.z, x1.w);
        a[2 * q + 1][3] = pf_pack(y1.z, y1.w);
    }
}

/* The probe rows as A fragments, once per stage: frag[b][h][mt][ks][lane] (uint4 = a0..a3), so
 * the scan's passes read 2Q coalesced 16-byte words per m-tile instead of converting fp32 rows.
 * MT = m-tiles per head (rmax / 16 rounded up); tiles past a block's rows are zero. */
template <int Q>
static __global__ void frag_kernel(mask_stage_params p, uint4 *__restrict__ frag, int MT,
                                   int n_qblk, mask_rope rope, int rot1)
{
    /* rot1: a second set after the first, rows rotated back by one position (NORM pairs) */
    __shared__ float2 cs1[16 * Q];
    if (rot1) {
        for (int i = threadIdx.x; i < 16 * Q; i += blockDim.x)
            cs1[i] = rope.on && 2 * i < rope.n_rot ? rope_cs(rope, 1, i) : make_float2(1.0f, 0.0f);
        __syncthreads();
    }
    const int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= (int64_t)n_qblk * p.H * MT * 32) return;
    const int lane = (int)(u % 32), mt = (int)(u / 32 % MT);
    const int64_t bh = u / 32 / MT;
    const int b = (int)(bh / p.H), h = (int)(bh % p.H), d = 32 * Q;
    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    uint32_t a[2 * Q][4];
    const float *rows = p.rows + ((size_t)b * p.H + h) * p.rmax * (size_t)d;
    mm_load_a<Q>(a, rows, d, nrow, mt, lane >> 2, lane & 3);
    uint4 *o = frag + ((size_t)bh * MT + mt) * (2 * Q) * 32 + lane;
#pragma unroll
    for (int ks = 0; ks < 2 * Q; ks++)
        o[ks * 32] = make_uint4(a[ks][0], a[ks][1], a[ks][2], a[ks][3]);
    if (rot1) {
        mm_load_a<Q>(a, rows, d, nrow, mt, lane >> 2, lane & 3, cs1);
        o += (size_t)n_qblk * p.H * MT * (2 * Q) * 32;
#pragma unroll
        for (int ks = 0; ks < 2 * Q; ks++)
            o[ks * 32] = make_uint4(a[ks][0], a[ks][1], a[ks][2], a[ks][3]);
    }
}

static __device__ __forceinline__ void mm_frag_a(uint32_t a[][4], const uint4 *__restrict__ f,
                                                 int nks, int lane)
{
#pragma unroll
    for (int ks = 0; ks < nks; ks++) {
        const uint4 x = f[ks * 32 + lane];
        a[ks][0] = x.x;
        a[ks][1] = x.y;
        a[ks][2] = x.z;
        a[ks][3] = x.w;
    }
}

/* CTA order: super-blocks of MMA_SB chunk groups; inside one, the query blocks, inside those the
 * groups. The CTAs in flight (~2 per SM) then cover a few query blocks x MMA_SB groups: the
 * probed keys of MMA_SB x 4 chunks (<= 32 MB of bf16 keys for 8 KV heads, d 128, chunks of 256)
 * are re-read by all query blocks from L2, and each query block's probe rows by MMA_SB CTAs in a
 * row. (With chunks fastest, every query block would sweep all the keys from DRAM.) */
#define MMA_SB 16

/* This CTA's query block and first chunk in that order: super-blocks of sbw groups of ch
 * chunks; n_grp groups in all. */
static __device__ __forceinline__ void mm_cta_place(int sbw, int64_t n_grp, int n_qblk, int ch, int *b,
                                                    int64_t *c0)
{
    const int64_t lin = blockIdx.x, per = (int64_t)sbw * n_qblk;
    const int64_t sb = lin / per, rem = lin - sb * per;
    const int64_t sbn = min((int64_t)sbw, n_grp - sb * sbw);
    *b = (int)(rem / sbn);
    *c0 = (sb * sbw + rem % sbn) * ch;
}

template <int Q, bool NORM, bool FP8>
static __global__ void __launch_bounds__(MASK_SCAN_WARPS * 32, 3)
    scan_mma_kernel(mask_stage_params p, mask_rope rope, mask_kv kv, const uint4 *__restrict__ frag,
                    int MT, int64_t n_grp, int n_qblk)
{
    int b;
    int64_t c0;
    mm_cta_place(MMA_SB, n_grp, n_qblk, MMA_CH, &b, &c0);
    const int64_t n = stage_count(p, b);
    if (c0 >= n) return;
    const int H = p.H;
    extern __shared__ float4 smem4[];
    int64_t *hrep = (int64_t *)smem4;            /* [H][MMA_CH] */
    float *hbest = (float *)(hrep + H * MMA_CH); /* [H][MMA_CH] */
    int *hany = (int *)(hbest + H * MMA_CH);     /* [H][MMA_CH] */
    __shared__ float2 cs_s[8][16 * Q];           /* [probe key column][rope pair] */

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int kj = gid >> 1, kside = gid & 1; /* this lane's B column: chunk kj, side kside */
    const bool neox = rope.style == CPU_ROPE_NEOX;

    if (rope.on) {
        /* the pruning position is constant per column: relative mode 0 (left) / 1 (right),
         * chunk mode the candidate index */
        for (int x = threadIdx.x; x < 8 * rope.half; x += blockDim.x) {
            const int col = x / rope.half, i = x % rope.half;
            const int64_t pos = p.relative ? (int64_t)(col & 1) : c0 + (col >> 1);
            cs_s[col][i] = rope_cs(rope, pos, i);
        }
    }
    __syncthreads();

    /* the 4 chunks' ranges, pass counts and 32-bit limits (offsets from L0: key < T is
     * off < lim_T, l <= thr is lo <= lim_thr; -1 when l >= 0 fails from the start), in shared
     * memory (registers are short); spans clamped to 2^30 */
    __shared__ int64_t sL0[MMA_CH];
    __shared__ int snp[MMA_CH], sspan[MMA_CH], slim_T[MMA_CH], slim_thr[MMA_CH];
    if (threadIdx.x < MMA_CH) {
        const int j = threadIdx.x;
        const mask_chunk k = mask_chunk_of(p, b, c0 + j, n);
        sL0[j] = k.L0;
        sspan[j] = k.span;
        snp[j] = k.np;
        slim_T[j] = k.lim_T;
        slim_thr[j] = k.lim_thr;
    }
    __syncthreads();
    int maxpass = 0;
#pragma unroll
    for (int j = 0; j < MMA_CH; j++)
        maxpass = max(maxpass, snp[j]);

    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    const int nmt = (nrow + 15) / 16;
    const int n_fused = neox ? 0 : (rope.half / 4) * 4; /* pairs rotated by fmaddsub */

    const bool contig = !kv.pc && !kv.a.kptr && !kv.a.page;
    const size_t tstride = (size_t)kv.a.hkv * (size_t)kv.a.row_bytes;
    /* this lane's chunk: the one of its B column (kj); the 8 lanes of a chunk hold the same
     * descent state, so a pass needs two shuffles to learn its chunk's maxima and no lane keeps
     * the other chunks' state (loop-invariant limits in registers) */
    const int64_t L0 = sL0[kj];
    const int np = snp[kj], lim_T = slim_T[kj], lim_thr = slim_thr[kj], span = sspan[kj];
    for (int h = warp; h < H; h += MASK_SCAN_WARPS) {
        const int g = h / p.G;
        /* contiguous K: key 0 of this head's KV head */
        const uint8_t *kb = contig ? kv.a.k + (size_t)g * (size_t)kv.a.row_bytes : nullptr;
        const uint4 *fh = frag + ((size_t)b * H + h) * MT * (2 * Q) * 32;
        /* l, r as offsets from the chunk's L0 (>= 0 while the descent runs, so the midpoints'
         * truncating divisions are those of the absolute positions); ranges clamped to 2^30 */
        int l = 0, r = span;
        float best = MASK_SCORE_INIT;
        bool any = false, alive = c0 + kj < n;
        uint32_t a[2 * Q][4];
        /* d 64: the head's A fragments stay in registers over the passes; d 128 (or several
         * m-tiles): reloaded per pass from L1 / L2 (keeps the kernel at 128 registers) */
        const bool hoist = nmt == 1 && Q <= 2;
        if (hoist) mm_frag_a(a, fh, 2 * Q, lane);

        for (int it = 0; it < maxpass; it++) {
            if (it >= np || !mask_runs(l, r, lim_thr)) alive = false;
            if (!__any_sync(0xffffffffu, alive)) break;
            int mid, pl, pr;
            bool hl, hr;
            mask_probe(l, r, alive, lim_T, mid, pl, pr, hl, hr);
            const bool have = kside ? hr : hl;
            /* branch-free: a key that is not probed loads token 0 (its column's maxima are
             * replaced by -inf below; columns of an mma do not mix) */
            const int64_t t = have ? L0 + (kside ? pr : pl) : 0;
            const uint8_t *row = contig ? kb + (size_t)t * tstride : kv_key(kv, t, g);
            uint32_t raw[Q][4];
            if (!FP8) {
                const uint16_t *src = (const uint16_t *)row;
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    const uint4 x = *(const uint4 *)(src + 32 * q + 8 * tig);
                    raw[q][0] = x.x;
                    raw[q][1] = x.y;
                    raw[q][2] = x.z;
                    raw[q][3] = x.w;
                }
            } else {
                const uint8_t *src = row;
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    const uint2 x = *(const uint2 *)(src + 32 * q + 8 * tig);
                    raw[q][0] = x.x;
                    raw[q][1] = x.y;
                    raw[q][2] = raw[q][3] = 0u;
                }
            }
            /* decode, rotate (fp32), round to bf16: B fragments, dims 32q + 8tig + (0..3 | 4..7) */
            uint32_t bk[2 * Q][2];
            const float2 *cs = cs_s[gid];
            if (rope.on &&
                neox) { /* n_rot == d: pair (e, e + d/2) = (x[k] of q, y[k] of q + Q/2) */
#pragma unroll
                for (int q = 0; q < Q / 2; q++) {
                    float x[8], y[8];
                    mm_decode<FP8>(raw[q], kv.k_scale, x);
                    mm_decode<FP8>(raw[q + Q / 2], kv.k_scale, y);
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        const float2 c = cs[32 * q + 8 * tig + k];
                        const float u = x[k], w = y[k];
                        x[k] = __fsub_rn(__fmul_rn(u, c.x), __fmul_rn(w, c.y));
                        y[k] = __fadd_rn(__fmul_rn(u, c.y), __fmul_rn(w, c.x));
                    }
                    bk[2 * q][0] = pf_pack(x[0], x[1]);
                    bk[2 * q][1] = pf_pack(x[2], x[3]);
                    bk[2 * q + 1][0] = pf_pack(x[4], x[5]);
                    bk[2 * q + 1][1] = pf_pack(x[6], x[7]);
                    bk[2 * q + Q][0] = pf_pack(y[0], y[1]);
                    bk[2 * q + Q][1] = pf_pack(y[2], y[3]);
                    bk[2 * q + Q + 1][0] = pf_pack(y[4], y[5]);
                    bk[2 * q + Q + 1][1] = pf_pack(y[6], y[7]);
                }
            } else {
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    float x[8];
                    mm_decode<FP8>(raw[q], kv.k_scale, x);
                    if (NORM) mm_rope_norm<true>(x, 32 * q + 8 * tig, cs, rope.n_rot, n_fused);
                    else if (rope.on) mm_rope_norm<false>(x, 32 * q + 8 * tig, cs, rope.n_rot, n_fused);
                    bk[2 * q][0] = pf_pack(x[0], x[1]);
                    bk[2 * q][1] = pf_pack(x[2], x[3]);
                    bk[2 * q + 1][0] = pf_pack(x[4], x[5]);
                    bk[2 * q + 1][1] = pf_pack(x[6], x[7]);
                }
            }
            /* dots; this lane: rows gid, gid+8 of columns 2tig (left) and 2tig+1 (right) */
            float ml = -FLT_MAX, mr = -FLT_MAX;
            for (int mt = 0; mt < nmt; mt++) {
                if (!hoist) mm_frag_a(a, fh + (size_t)mt * (2 * Q) * 32, 2 * Q, lane);
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int ks = 0; ks < 2 * Q; ks++)
                    pf_mma(acc, a[ks], bk[ks][0], bk[ks][1]);
                if (p.score_bf16) {
#pragma unroll
                    for (int x = 0; x < 4; x++)
                        acc[x] = round_bf16_d(acc[x]);
                }
                if (16 * mt + gid < nrow) {
                    ml = fmaxf(ml, acc[0]);
                    mr = fmaxf(mr, acc[1]);
                }
                if (16 * mt + gid + 8 < nrow) {
                    ml = fmaxf(ml, acc[2]);
                    mr = fmaxf(mr, acc[3]);
                }
            }
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                ml = fmaxf(ml, __shfl_xor_sync(0xffffffffu, ml, o));
                mr = fmaxf(mr, __shfl_xor_sync(0xffffffffu, mr, o));
            }
            /* lane kj (gid 0, tig kj) holds chunk kj's maxima */
            const float sl = __shfl_sync(0xffffffffu, ml, kj), sr = __shfl_sync(0xffffffffu, mr, kj);
            if (alive) mask_descend(hl, hr, sl, sr, mid, l, r, best, any);
        }
        if (kside == 0 && tig == 0) { /* lane 8 kj */
            hrep[h * MMA_CH + kj] = L0 + l;
            hbest[h * MMA_CH + kj] = best;
            hany[h * MMA_CH + kj] = any;
        }
    }
    __syncthreads();
    if (threadIdx.x < MMA_CH && c0 + (int64_t)threadIdx.x < n) {
        const int j = threadIdx.x;
        mask_head_reduce(p, b, c0 + j, hany, hbest, hrep, MMA_CH, j, sL0[j]);
    }
}

/* ---- relative pruning positions: rotate the probe rows, not the keys ----------------------- */

/* scan_mmr_kernel: the tensor-core scan for layers pruned with relative positions (left probe
 * key at position 0, right at 1) and NORM RoPE over every dim (or none). The rotation moves to
 * the probe rows: row · R(1) k = (R(1)^T row) · k, so the left keys are scored against the rows
 * (A0) and the right keys against the rows rotated back by one position (A1, frag_kernel's
 * second set), and the keys go from memory into the B fragments as they are (bf16: the raw
 * words; fp8: decoded and scaled, then rounded to bf16) — no per-pass decode / rotation / pack
 * of bf16 keys. Like scan_mma_kernel it rounds both operands to bf16, but on the other side of
 * the rotation, so its scores differ from scan_mma_kernel's by bf16 rounding (both are
 * approximations of the exact scores; test-cuda-mask bounds their lists' overlap with the exact
 * lists).
 *
 * Layout: one CTA per (64 candidate chunks, query block, KV head g), wph warps per head of the
 * KV group (rounds of at most MMR_NW heads; wph = 1 with one m-tile, 2 with several: on the H200
 * two warps per head made stage 2 1.1x faster and stages 0-1 1.05x slower). A round puts its
 * heads' first fragment sets in shared memory (A0R, stage 0: in registers, with 12 warps per SM;
 * ncu had shown L1/TEX 91 % busy with A0 read from shared memory every pass) and each warp,
 * ROWROT, its second set in registers, once; a head's warps then descend its 64 chunks 8 at a
 * time (wph = 2: every other pass of 8). Lane (gid, tig) loads chunk gid's left and right probe
 * keys (dims 32q + 8tig .. + 7) as the B columns gid of two n8 tiles (left tile against A0, right
 * tile against A1); C gives lane (gid, tig) rows gid, gid + 8 of chunks 2tig, 2tig + 1, reduced
 * over gid by shuffles; the 4 lanes of chunk gid hold its descent state. The heads of the group
 * are reduced in the CTA into part[g][b][c] (mm_part), the groups by mm_part_reduce_kernel — the
 * same first-max over the heads in head order as the exact kernels. Why per KV group (H200, ncu,
 * 2026-11-29): with one CTA over all 32 heads of 8 chunks the stage-0 scan had an L2 hit rate of
 * 52 % (the keys probed by the query blocks in flight were those of all 8 KV heads: ~128 MB per
 * super-block of chunks); per KV group it is 95 %.
 *
 * ROWROT = false (stages with several m-tiles of probe rows, where the second fragment set
 * would double the fragment traffic): only the first set; the right keys are rotated to
 * position 1 in fp32 and rounded (scan_mma_kernel's scores). Registers fitted to 16 warps per
 * SM (fitted to 24 they spilled ~120 bytes and the prefill estimate was 1.4x slower). */
#define MMR_CH 8  /* chunks of one pass */
#define MMR_NG 8  /* passes of 8 chunks per CTA: 64 chunks per head's fragment load */
#define MMR_NW 4  /* heads per round of a CTA (fewer when the KV group has fewer heads) */
#define MMR_WPH 2 /* max warps per head (stage 2: two, each taking every other 8-chunk pass) */

/* one (KV group, chunk) result: the best winning score of the group's heads that probed and
 * its representative's offset from the chunk's L0; off < 0: no head probed */
struct mm_part {
    float best;
    int off;
};

template <int Q, bool FP8, bool ROWROT, bool A0R>
static __global__ void __launch_bounds__(A0R ? MMR_NW * 32 : MMR_NW * MMR_WPH * 32, A0R ? 3 : 2)
    scan_mmr_kernel(mask_stage_params p, mask_rope rope, mask_kv kv, const uint4 *__restrict__ frag,
                    mm_part *__restrict__ part, int MT, int64_t n_grp, int n_qblk, int sbw, int wph)
{
    constexpr int CH = MMR_CH * MMR_NG;
    int b;
    int64_t c0;
    mm_cta_place(sbw, n_grp, n_qblk, CH, &b, &c0);
    const int64_t n = stage_count(p, b);
    if (c0 >= n) return;
    const int g = blockIdx.y, G = p.G, h0 = g * G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    /* gp heads per round, wph warps per head: warp w takes head w % gp of the round and the
     * 8-chunk passes w / gp, + wph, ... */
    const int gp = (int)(blockDim.x >> 5) / wph, hw = warp % gp, half = warp / gp;
    const int nfr = MT * (2 * Q) * 32; /* uint4 words of one head's fragment set */
    extern __shared__ uint4 smem_u4[];
    uint4 *sa = smem_u4 + (size_t)hw * nfr;                      /* this warp's head's A0 */
    float *hbest = (float *)(smem_u4 + (size_t)gp * nfr);        /* [G][CH] */
    int *hoff = (int *)(hbest + G * CH);                         /* [G][CH] */
    /* !ROWROT: the right keys are rotated to position 1 here instead (as scan_mma_kernel does,
     * so the scores are scan_mma_kernel's), and only the first fragment set is read */
    __shared__ float2 cs1[ROWROT ? 1 : 16 * Q];
    if (!ROWROT) {
        for (int i = threadIdx.x; i < 16 * Q; i += blockDim.x)
            cs1[i] = rope.on ? rope_cs(rope, 1, i) : make_float2(1.0f, 0.0f);
        __syncthreads();
    }

    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    const int nmt = (nrow + 15) / 16;
    const bool contig = !kv.pc && !kv.a.kptr && !kv.a.page;
    const size_t tstride = (size_t)kv.a.hkv * (size_t)kv.a.row_bytes;
    const size_t set1 = (size_t)n_qblk * p.H * nfr; /* A1 after A0 */
    const int eoff = (FP8 ? 1 : 2) * 8 * tig;       /* this lane's first dim, bytes */
    const uint8_t *kb = contig ? kv.a.k + (size_t)g * (size_t)kv.a.row_bytes : nullptr;

    for (int hr0 = 0; hr0 < G; hr0 += gp) {
        const int hi = hr0 + hw;
        const uint4 *fh = frag + ((size_t)b * p.H + h0 + min(hi, G - 1)) * nfr;
        if (hi < G && !A0R)
            for (int i = lane + 32 * half; i < nmt * (2 * Q) * 32; i += 32 * wph) sa[i] = fh[i];
        /* A0R (ROWROT only): the first set in registers too (fewer warps per SM, no shared-memory
         * reads per pass) */
        uint32_t ha0[A0R ? 2 * Q : 1][4];
        if (A0R && hi < G) mm_frag_a(ha0, fh, 2 * Q, lane);
        /* ROWROT (one m-tile): the second fragment set stays in registers over the head's
         * passes (both in registers spilled and were slower on the H200) */
        uint32_t ha1[ROWROT ? 2 * Q : 1][4];
        if (ROWROT && hi < G) mm_frag_a(ha1, fh + set1, 2 * Q, lane);
        __syncthreads(); /* the round's A0 */
        for (int sg = half; hi < G && sg < MMR_NG && c0 + sg * MMR_CH < n; sg += wph) {
            const int64_t c = c0 + sg * MMR_CH + gid;
            const mask_chunk ck = mask_chunk_of(p, b, c, n);
            const int64_t L0 = ck.L0;
            const int span = ck.span, np = ck.np, lim_T = ck.lim_T, lim_thr = ck.lim_thr;
            const int maxpass = __reduce_max_sync(0xffffffffu, np);
            int l = 0, r = span;
            float best = MASK_SCORE_INIT;
            bool any = false, alive = c < n, wl = false;
            uint32_t bl[2 * Q][2], br[2 * Q][2];
            for (int it = 0; it < maxpass; it++) {
                if (it >= np || !mask_runs(l, r, lim_thr)) alive = false;
                if (!__any_sync(0xffffffffu, alive)) break;
                int mid, pl, pr;
                bool hl, hr;
                mask_probe(l, r, alive, lim_T, mid, pl, pr, hl, hr);
                /* a key that is not probed loads token 0; its scores are replaced by -inf below */
                const int64_t tl = hl ? L0 + pl : 0, tr = hr ? L0 + pr : 0;
                const uint8_t *rl = (contig ? kb + (size_t)tl * tstride : kv_key(kv, tl, g)) + eoff;
                const uint8_t *rr = (contig ? kb + (size_t)tr * tstride : kv_key(kv, tr, g)) + eoff;
                /* ROWROT: a pass over one key (range 1, not the first pass) probes the previous
                 * pass's winning key — its left probe if the descent went left, else its right
                 * one — at both positions; with A1 holding the rotation its words serve both
                 * sides and are still in bl / br: nothing to load (the final pass of a chunk of
                 * 256 keys) */
                if (ROWROT && it > 0 && r - l == 1) {
#pragma unroll
                    for (int ks = 0; ks < 2 * Q; ks++) {
                        const uint32_t w0 = wl ? bl[ks][0] : br[ks][0], w1 = wl ? bl[ks][1] : br[ks][1];
                        bl[ks][0] = br[ks][0] = w0;
                        bl[ks][1] = br[ks][1] = w1;
                    }
                } else
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    if (!FP8 && !ROWROT) {
                        /* left: the raw words (position 0 rotates nothing); right: rotated */
                        const uint4 x = *(const uint4 *)(rl + 64 * q), y = *(const uint4 *)(rr + 64 * q);
                        bl[2 * q][0] = x.x;
                        bl[2 * q][1] = x.y;
                        bl[2 * q + 1][0] = x.z;
                        bl[2 * q + 1][1] = x.w;
                        float v[8];
                        const uint32_t wy[4] = {y.x, y.y, y.z, y.w};
                        mm_decode<false>(wy, 1.0f, v);
                        if (rope.on) mm_rope_norm<true>(v, 32 * q + 8 * tig, cs1, 0, 0);
                        br[2 * q][0] = pf_pack(v[0], v[1]);
                        br[2 * q][1] = pf_pack(v[2], v[3]);
                        br[2 * q + 1][0] = pf_pack(v[4], v[5]);
                        br[2 * q + 1][1] = pf_pack(v[6], v[7]);
                    } else if (!FP8) {
                        const uint4 x = *(const uint4 *)(rl + 64 * q), y = *(const uint4 *)(rr + 64 * q);
                        bl[2 * q][0] = x.x;
                        bl[2 * q][1] = x.y;
                        bl[2 * q + 1][0] = x.z;
                        bl[2 * q + 1][1] = x.w;
                        br[2 * q][0] = y.x;
                        br[2 * q][1] = y.y;
                        br[2 * q + 1][0] = y.z;
                        br[2 * q + 1][1] = y.w;
                    } else {
                        const uint2 x = *(const uint2 *)(rl + 32 * q), y = *(const uint2 *)(rr + 32 * q);
                        float u[8], v[8];
                        const uint32_t wx[4] = {x.x, x.y, 0u, 0u}, wy[4] = {y.x, y.y, 0u, 0u};
                        mm_decode<true>(wx, kv.k_scale, u);
                        mm_decode<true>(wy, kv.k_scale, v);
                        if (!ROWROT && rope.on) mm_rope_norm<true>(v, 32 * q + 8 * tig, cs1, 0, 0);
                        bl[2 * q][0] = pf_pack(u[0], u[1]);
                        bl[2 * q][1] = pf_pack(u[2], u[3]);
                        bl[2 * q + 1][0] = pf_pack(u[4], u[5]);
                        bl[2 * q + 1][1] = pf_pack(u[6], u[7]);
                        br[2 * q][0] = pf_pack(v[0], v[1]);
                        br[2 * q][1] = pf_pack(v[2], v[3]);
                        br[2 * q + 1][0] = pf_pack(v[4], v[5]);
                        br[2 * q + 1][1] = pf_pack(v[6], v[7]);
                    }
                }
                /* lane: rows gid, gid + 8 of chunks 2tig (x0) and 2tig + 1 (x1) */
                float ml0 = -FLT_MAX, ml1 = -FLT_MAX, mr0 = -FLT_MAX, mr1 = -FLT_MAX;
                /* m-tile mt's scores (score rounding, then the rows that exist) into the maxima */
                auto fold = [&](float(&cl)[4], float(&cr)[4], int mt) {
                    if (p.score_bf16) {
#pragma unroll
                        for (int x = 0; x < 4; x++) {
                            cl[x] = round_bf16_d(cl[x]);
                            cr[x] = round_bf16_d(cr[x]);
                        }
                    }
                    if (16 * mt + gid < nrow) {
                        ml0 = fmaxf(ml0, cl[0]);
                        ml1 = fmaxf(ml1, cl[1]);
                        mr0 = fmaxf(mr0, cr[0]);
                        mr1 = fmaxf(mr1, cr[1]);
                    }
                    if (16 * mt + gid + 8 < nrow) {
                        ml0 = fmaxf(ml0, cl[2]);
                        ml1 = fmaxf(ml1, cl[3]);
                        mr0 = fmaxf(mr0, cr[2]);
                        mr1 = fmaxf(mr1, cr[3]);
                    }
                };
                if (ROWROT) {
                    /* two accumulator chains per side (even / odd k-steps), summed: half the
                     * dependent mma latency of a pass */
                    float cl[2][4] = {}, cr[2][4] = {};
#pragma unroll
                    for (int ks = 0; ks < 2 * Q; ks++) {
                        const uint4 x = A0R ? make_uint4(0u, 0u, 0u, 0u) : sa[ks * 32 + lane];
                        const uint32_t a0[4] = {x.x, x.y, x.z, x.w};
                        pf_mma(cl[ks & 1], A0R ? ha0[ks] : a0, bl[ks][0], bl[ks][1]);
                        pf_mma(cr[ks & 1], ha1[ks], br[ks][0], br[ks][1]);
                    }
#pragma unroll
                    for (int x = 0; x < 4; x++) {
                        cl[0][x] += cl[1][x];
                        cr[0][x] += cr[1][x];
                    }
                    fold(cl[0], cr[0], 0);
                } else {
                    /* two m-tiles at a time: four independent accumulator chains */
                    for (int mt = 0; mt < nmt; mt += 2) {
                        const uint4 *f0 = sa + mt * (2 * Q) * 32 + lane;
                        float cl0[4] = {}, cr0[4] = {}, cl1[4] = {}, cr1[4] = {};
                        if (mt + 1 < nmt) {
#pragma unroll
                            for (int ks = 0; ks < 2 * Q; ks++) {
                                const uint4 x = f0[ks * 32], y = f0[(2 * Q + ks) * 32];
                                const uint32_t a0[4] = {x.x, x.y, x.z, x.w}, a1[4] = {y.x, y.y, y.z, y.w};
                                pf_mma(cl0, a0, bl[ks][0], bl[ks][1]);
                                pf_mma(cr0, a0, br[ks][0], br[ks][1]);
                                pf_mma(cl1, a1, bl[ks][0], bl[ks][1]);
                                pf_mma(cr1, a1, br[ks][0], br[ks][1]);
                            }
                            fold(cl0, cr0, mt);
                            fold(cl1, cr1, mt + 1);
                        } else {
#pragma unroll
                            for (int ks = 0; ks < 2 * Q; ks++) {
                                const uint4 x = f0[ks * 32];
                                const uint32_t a0[4] = {x.x, x.y, x.z, x.w};
                                pf_mma(cl0, a0, bl[ks][0], bl[ks][1]);
                                pf_mma(cr0, a0, br[ks][0], br[ks][1]);
                            }
                            fold(cl0, cr0, mt);
                        }
                    }
                }
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) {
                    ml0 = fmaxf(ml0, __shfl_xor_sync(0xffffffffu, ml0, o));
                    ml1 = fmaxf(ml1, __shfl_xor_sync(0xffffffffu, ml1, o));
                    mr0 = fmaxf(mr0, __shfl_xor_sync(0xffffffffu, mr0, o));
                    mr1 = fmaxf(mr1, __shfl_xor_sync(0xffffffffu, mr1, o));
                }
                /* chunk gid's maxima are in lane gid / 2 (x0 for even gid, x1 for odd) */
                const int src = gid >> 1;
                const float a0 = __shfl_sync(0xffffffffu, ml0, src), a1 = __shfl_sync(0xffffffffu, ml1, src);
                const float b0 = __shfl_sync(0xffffffffu, mr0, src), b1 = __shfl_sync(0xffffffffu, mr1, src);
                const float sl = (gid & 1) ? a1 : a0, sr = (gid & 1) ? b1 : b0;
                if (alive) {
                    mask_descend(hl, hr, sl, sr, mid, l, r, best, any);
                    wl = r == mid;
                }
            }
            if (tig == 0) {
                hbest[hi * CH + sg * MMR_CH + gid] = best;
                hoff[hi * CH + sg * MMR_CH + gid] = any ? l : -1;
            }
        }
        __syncthreads(); /* the next round overwrites sa */
    }
    /* the group's heads, in head order: the first best wins */
    for (int j = threadIdx.x; j < CH; j += blockDim.x) {
        if (c0 + j >= n) break;
        float cb = MASK_SCORE_INIT;
        int off = -1;
        for (int hi = 0; hi < G; hi++) {
            const int o = hoff[hi * CH + j];
            if (o >= 0 && (off < 0 || hbest[hi * CH + j] > cb)) {
                cb = hbest[hi * CH + j];
                off = o;
            }
        }
        part[((size_t)g * n_qblk + b) * p.ub + c0 + j] = mm_part{cb, off};
    }
}

/* score[b][c], rep[b][c] from the KV groups' results, in group (= head) order; no head probed:
 * the chunk's start (as the exact kernels) */
static __global__ void mm_part_reduce_kernel(mask_stage_params p, const mm_part *__restrict__ part,
                                             int n_qblk)
{
    const int b = blockIdx.y;
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= stage_count(p, b)) return;
    int64_t L0, R0;
    mask_cand(p, b, c, &L0, &R0);
    float cb = MASK_SCORE_INIT;
    int off = -1;
    for (int g = 0; g < p.Hkv; g++) {
        const mm_part x = part[((size_t)g * n_qblk + b) * p.ub + c];
        if (x.off >= 0 && (off < 0 || x.best > cb)) {
            cb = x.best;
            off = x.off;
        }
    }
    p.score[(size_t)b * p.ub + c] = cb;
    p.rep[(size_t)b * p.ub + c] = L0 + max(off, 0);
}
