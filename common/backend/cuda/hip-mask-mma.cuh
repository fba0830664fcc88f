/*
 * hip-mask-mma.cuh — opt-in tensor-core scan for prefill mask estimation (issue 6), included by
 * hip-mask.cu after its exact scan kernels (it uses their parameter structs and helpers).
 *
 * Selected by env IHIP_MASK_PREFILL=mma (every stage) or =mma0 (stage 0 only) for calls with
 * n_tok > 1, head_dim 64 or 128, and pruning positions that are constant per probe key (no RoPE,
 * or using_extend with the relative / chunk pruning positions; NEOX only with n_rot == d). The
 * exact kernels stay the default and are used for everything else.
 *
 * NOT bit-exact with hip_mask_estimate: the dot products of the descent are computed with
 * mma.sync.m16n8k16 bf16 x bf16 -> fp32 (probe rows rounded to bf16; keys decoded and rotated
 * in fp32, then rounded to bf16), in the tensor core's summation order, like the reference HiP
 * (Triton) which scores with bf16 tensor-core dots. Descent bookkeeping, probe midpoints, '>'
 * ties, the head reduction (max, first head wins) and the score's bf16 rounding (score_bf16)
 * are those of the exact kernels.
 *
 * Layout: one CTA per (4 candidate chunks, query block), 8 warps; warp w descends heads w, w+8,
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

/* 8 key elements (one 16-byte bf16 word or 8 fp8 bytes in w[0..1]) -> float; zero if !have */
static __device__ __forceinline__ void mm_decode(const uint32_t w[4], bool fp8, float sc, bool have,
                                                 float x[8])
{
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const float f = fp8 ? __fmul_rn(fp8_to_f(w[e >> 2] >> (8 * (e & 3))), sc)
                            : bf16_to_f(w[e >> 1] >> (16 * (e & 1)));
        x[e] = have ? f : 0.0f;
    }
}

/* NORM RoPE of the 8 elements x = dims e0 .. e0+7 (e0 even) of one key, exactly cpu_rope_apply's
 * products (fmaddsub for the first (half/4)*4 pairs) */
static __device__ __forceinline__ void mm_rope_norm(float x[8], int e0, const float2 *cs, int n_rot,
                                                    int n_fused)
{
#pragma unroll
    for (int k = 0; k < 8; k += 2) {
        const int e = e0 + k;
        if (e < n_rot) {
            const int i = e >> 1;
            const float2 c = cs[i];
            const float u = x[k], y = x[k + 1];
            if (i < n_fused) {
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
template <int Q>
static __device__ __forceinline__ void mm_load_a(uint32_t a[2 * Q][4],
                                                 const float *__restrict__ rows, int d, int nrow,
                                                 int mt, int gid, int tig)
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
                                   int n_qblk)
{
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

template <int Q>
static __global__ void __launch_bounds__(MASK_SCAN_WARPS * 32, 2)
    scan_mma_kernel(mask_stage_params p, mask_rope rope, mask_kv kv, const uint4 *__restrict__ frag,
                    int MT, int64_t n_grp, int n_qblk)
{
    const int64_t lin = blockIdx.x, per = (int64_t)MMA_SB * n_qblk;
    const int64_t sb = lin / per, rem = lin - sb * per;
    const int64_t sbn = min((int64_t)MMA_SB, n_grp - sb * MMA_SB);
    const int b = (int)(rem / sbn);
    const int64_t c0 = (sb * MMA_SB + rem % sbn) * MMA_CH;
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

    /* the 4 chunks' ranges and pass counts, in shared memory (registers are short) */
    __shared__ int64_t sL0[MMA_CH], sR0[MMA_CH];
    __shared__ int snp[MMA_CH];
    if (threadIdx.x < MMA_CH) {
        const int j = threadIdx.x;
        const int64_t c = c0 + j;
        int64_t L0 = 0, R0 = 0;
        if (c >= n) {
            L0 = R0 = 0;
        } else if (!p.L) {
            L0 = p.n_sink + c * p.lc0;
            R0 = min(L0 + p.lc0, p.T - p.sw);
        } else {
            L0 = p.L[(size_t)b * p.ub + c];
            R0 = p.R[(size_t)b * p.ub + c];
        }
        int np = 1;
        while (((int64_t)1 << (np - 1)) < R0 - L0)
            np++;
        sL0[j] = L0;
        sR0[j] = R0;
        snp[j] = c < n ? np : 0;
    }
    __syncthreads();
    int maxpass = 0;
#pragma unroll
    for (int j = 0; j < MMA_CH; j++)
        maxpass = max(maxpass, snp[j]);

    const int64_t p0 = p.pos0 + (int64_t)b * p.bq;
    const int64_t thr = max((int64_t)0, p0 - p.sw);
    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    const int nmt = (nrow + 15) / 16;
    const int n_fused = neox ? 0 : (rope.half / 4) * 4; /* pairs rotated by fmaddsub */

    for (int h = warp; h < H; h += MASK_SCAN_WARPS) {
        const int g = h / p.G;
        const uint4 *fh = frag + ((size_t)b * H + h) * MT * (2 * Q) * 32;
        /* l, r as offsets from the chunk's L0 (>= 0 while the descent runs, so the midpoints'
         * truncating divisions are those of the absolute positions); ranges clamped to 2^30 */
        int l[MMA_CH], r[MMA_CH];
        float best[MMA_CH];
        bool any[MMA_CH], alive[MMA_CH];
#pragma unroll
        for (int j = 0; j < MMA_CH; j++) {
            l[j] = 0;
            r[j] = (int)max((int64_t)0, min(sR0[j] - sL0[j], (int64_t)1 << 30));
            best[j] = MASK_SCORE_INIT;
            any[j] = false;
            alive[j] = c0 + j < n;
        }
        uint32_t a[2 * Q][4];
        /* d 64: the head's A fragments stay in registers over the passes; d 128 (or several
         * m-tiles): reloaded per pass from L1 / L2 (keeps the kernel at 128 registers) */
        const bool hoist = nmt == 1 && Q <= 2;
        if (hoist) mm_frag_a(a, fh, 2 * Q, lane);

        for (int it = 0; it < maxpass; it++) {
            bool some = false;
#pragma unroll
            for (int j = 0; j < MMA_CH; j++) {
                const int64_t la = sL0[j] + l[j];
                if (it >= snp[j] || !(la <= thr && l[j] < r[j] && la >= 0)) alive[j] = false;
                some |= alive[j];
            }
            if (!some) break; /* warp-uniform: every lane holds the same state */
            int mid[MMA_CH];
            bool hl[MMA_CH], hr[MMA_CH];
            int64_t t = 0;
            bool have = false;
#pragma unroll
            for (int j = 0; j < MMA_CH; j++) {
                mid[j] = (l[j] + r[j]) / 2;
                const int64_t pl = sL0[j] + (l[j] + mid[j]) / 2, pr = sL0[j] + (mid[j] + r[j]) / 2;
                hl[j] = alive[j] && pl < p.T;
                hr[j] = alive[j] && pr < p.T;
                if (kj == j) {
                    have = kside ? hr[j] : hl[j];
                    t = kside ? pr : pl;
                }
            }
            if (!have) t = 0; /* branch-free: a key that is not probed loads token 0, zeroed */
            const uint8_t *row = kv_key(kv, t, g);
            uint32_t raw[Q][4];
            const bool fp8 = kv.dtype != CUDA_KV_BF16;
            if (!fp8) {
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
                    mm_decode(raw[q], fp8, kv.k_scale, have, x);
                    mm_decode(raw[q + Q / 2], fp8, kv.k_scale, have, y);
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
                    mm_decode(raw[q], fp8, kv.k_scale, have, x);
                    if (rope.on) mm_rope_norm(x, 32 * q + 8 * tig, cs, rope.n_rot, n_fused);
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
#pragma unroll
            for (int j = 0; j < MMA_CH; j++) {
                /* lane j (gid 0, tig j) holds chunk j's maxima */
                float sl = __shfl_sync(0xffffffffu, ml, j), sr = __shfl_sync(0xffffffffu, mr, j);
                if (!alive[j]) continue;
                if (!hl[j]) sl = -INFINITY;
                if (!hr[j]) sr = -INFINITY;
                float win;
                if (sl > sr) {
                    r[j] = mid[j];
                    win = sl;
                } else {
                    l[j] = mid[j];
                    win = sr;
                }
                if (!any[j] || win > best[j]) best[j] = win;
                any[j] = true;
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < MMA_CH; j++) {
                hrep[h * MMA_CH + j] = sL0[j] + l[j];
                hbest[h * MMA_CH + j] = best[j];
                hany[h * MMA_CH + j] = any[j];
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < MMA_CH && c0 + (int64_t)threadIdx.x < n) {
        const int j = threadIdx.x;
        const int64_t c = c0 + j;
        float cbest = MASK_SCORE_INIT;
        int64_t crep = sL0[j];
        bool have = false;
        for (int h = 0; h < H; h++) {
            if (hany[h * MMA_CH + j] && (!have || hbest[h * MMA_CH + j] > cbest)) {
                cbest = hbest[h * MMA_CH + j];
                crep = hrep[h * MMA_CH + j];
                have = true;
            }
        }
        p.score[(size_t)b * p.ub + c] = cbest;
        p.rep[(size_t)b * p.ub + c] = crep;
    }
}
