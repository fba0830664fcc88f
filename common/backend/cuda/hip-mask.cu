/*
 * hip-mask.cu — HiP mask estimation on the GPU (shared/HIP.md §2), bit-for-bit the algorithm of
 * common/hip/hip-mask.c: same candidates, same probe midpoints, same '>' ties, same float
 * operation order (so the same scores), same top-k tie order (higher score, then lower chunk
 * index), same realign + split and final block lists.
 *
 * Per stage s (all query blocks of the call at once), three launches:
 *   prep   grid (n_qblk, n_head): pooled, scaled, RoPE'd probe rows [b][h][row][d] (§2.3);
 *   scan   grid (chunks, n_qblk), 8 warps: one warp descends one head at a time (heads strided
 *          over the warps), both probe keys of a pass loaded with 16-byte loads into shared
 *          memory, rotated there, dotted by two half-warps; the head reduction (max, first
 *          head wins ties) then writes score[b][c] and rep[b][c] (§2.5, §2.6); scan_fast_kernel
 *          (default where it applies: d 64 / 128, pruning positions constant per CTA) does the
 *          same with the keys in registers, one DRAM round trip per pass (IHIP_MASK_SCAN=old
 *          forces scan_kernel);
 *   select grid (n_qblk), 1024 threads: exact top-k by a radix select over the 64-bit key
 *          (descending score, ascending chunk index; it stops at the first digit whose bin
 *          ends exactly at the k-th key), then a bitonic sort of the realigned starts (strides
 *          below 32 by shuffles when the sort fits the block) and either the split into the next stage's candidates
 *          (written straight into the mask's stage cache, which is the next stage's input) or
 *          the final de-duplicated block list (§2.7, §2.8).
 * Keys are found through cuda_kv_rows (cuda-hip-impl.h): contiguous, slot pages or page
 * pointers (kptr_dev; host-mapped pages are read over the bus); only K is read.
 * Stage 0's candidates are computed from their index (no list). Candidate counts of stages
 * s ≥ 1 live on the device only (m->cand_n[s]); grids are sized by the host's upper bound and
 * blocks past the count exit, so no call copies anything back to the host.
 *
 * Exactness: hip_dot's AVX2 order (16 fma lanes, then a fixed tree) is reproduced with one
 * accumulator per lane of a half-warp; RoPE uses the same products and roundings as
 * cpu_rope_apply (fmaddsub on groups of 4 pairs of the NORM style, plain mul/sub elsewhere);
 * cos/sin are computed in double from the same double angle and rounded to float. All float
 * operations use explicit _rn intrinsics so nvcc cannot contract them differently.
 */
#include "cuda-hip-impl.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MASK_SCORE_INIT (-32000.0f) /* = HIP_SCORE_INIT of hip-mask.c */
#define MASK_MAX_HEAD_DIM 512
#define MASK_MAX_HEADS 256
#define MASK_SCAN_WARPS 8
#define MASK_SELECT_THREADS 1024
#define MASK_SELECT_MAX_P 16384 /* largest sorted list (pow2) the select kernel holds */
#define MASK_ROPE_TAB_MAX 65536 /* positions of the per-call cos/sin table */

enum { SLOT_TAB = CUDA_SLOT_MASK0, SLOT_ROWS, SLOT_SCORE, SLOT_REP, SLOT_FRAG, SLOT_PART };

/* ---- small device helpers ------------------------------------------------------------------- */

static __device__ __forceinline__ int64_t floordiv_d(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static __device__ __forceinline__ float round_bf16_d(float f)
{
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    return __uint_as_float(u);
}

static __device__ __forceinline__ float bf16_to_f(uint32_t bits)
{
    return __uint_as_float((bits & 0xffffu) << 16);
}

/* fp8 e4m3 (no infinities; S.1111.111 is NaN) → float, exact and branch-free: the 7 value
 * bits placed at float bits 20..26 read as 2^(e - 127) (1 + m/8) (e > 0) or m 2^-129 (e = 0,
 * subnormal), and the exact product with 2^120 gives 2^(e - 7) (1 + m/8) or m 2^-9. */
static __device__ __forceinline__ float fp8_to_f(uint32_t x)
{
    const uint32_t mag = x & 0x7fu;
    const float v = __fmul_rn(__uint_as_float(((x & 0x80u) << 24) | (mag << 20)), 0x1p120f);
    return mag == 0x7fu ? __uint_as_float(0x7fc00000u) : v;
}

/* The rope parameters every kernel needs. */
struct mask_rope {
    int on;        /* 0: rotate nothing */
    int style;     /* enum cpu_rope_style */
    int half;      /* n_rot / 2 */
    int n_rot;
    const double *inv_freq;
    const float2 *tab; /* [tab_n][half] (cos, sin) */
    int64_t tab_n;
};

static __device__ __forceinline__ float2 rope_cs(const mask_rope &r, int64_t pos, int i)
{
    if (pos >= 0 && pos < r.tab_n) return r.tab[pos * r.half + i];
    double th = __dmul_rn((double)pos, r.inv_freq[i]);
    double s, c;
    sincos(th, &s, &c);
    return make_float2((float)c, (float)s);
}

/* Elements (e0, e1) of rope pair i. */
static __device__ __forceinline__ void rope_elems(const mask_rope &r, int i, int *e0, int *e1)
{
    if (r.style == CPU_ROPE_NEOX) {
        *e0 = i;
        *e1 = i + r.half;
    } else {
        *e0 = 2 * i;
        *e1 = 2 * i + 1;
    }
}

/* Rotate pair i (a = x[e0], b = x[e1]) exactly like cpu_rope_apply. */
static __device__ __forceinline__ void rope_pair(const mask_rope &r, int i, float2 cs, float *a,
                                                 float *b)
{
    float x = *a, y = *b, c = cs.x, s = cs.y;
    if (r.style != CPU_ROPE_NEOX && i < (r.half / 4) * 4) {
        /* AVX2 fmaddsub: even = fma(a, c, -(b*s)), odd = fma(b, c, a*s) */
        *a = __fmaf_rn(x, c, -__fmul_rn(y, s));
        *b = __fmaf_rn(y, c, __fmul_rn(x, s));
    } else {
        *a = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s));
        *b = __fadd_rn(__fmul_rn(x, s), __fmul_rn(y, c));
    }
}

/* ---- RoPE table ----------------------------------------------------------------------------- */

static __global__ void rope_tab_kernel(float2 *tab, const double *inv_freq, int half, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * half) return;
    int64_t pos = i / half;
    int f = (int)(i % half);
    double th = __dmul_rn((double)pos, inv_freq[f]);
    double s, c;
    sincos(th, &s, &c);
    tab[i] = make_float2((float)c, (float)s);
}

/* ---- per-stage parameters ------------------------------------------------------------------- */

struct mask_stage_params {
    /* call */
    int64_t pos0, n_tok, T;
    int bq, H, Hkv, G, d;
    float scale;
    int using_extend, relative, score_bf16;
    int64_t n_sink, sw, lc0;
    /* stage */
    int stride, rmax;           /* pooling stride, rows per head in the rows buffer */
    int64_t ub;                 /* upper bound of the candidate count (row length of score/rep) */
    int64_t n0;                 /* stage-0 count (used when cnt == NULL) */
    const int32_t *cnt;         /* [n_qblk] candidate counts (stage ≥ 1) or NULL */
    const int64_t *L, *R;       /* [n_qblk][ub] candidates (stage ≥ 1) or NULL (stage 0) */
    float *rows;                /* [n_qblk][H][rmax][d] */
    float *score;               /* [n_qblk][ub] */
    int64_t *rep;               /* [n_qblk][ub] */
};

static __device__ __forceinline__ int64_t stage_count(const mask_stage_params &p, int b)
{
    if (!p.cnt) return p.n0;
    /* a cached count is at most the cache row (clamped: never read past it on a bad upload) */
    return max((int64_t)0, min((int64_t)p.cnt[b], p.ub));
}

/* Candidate c of query block b: [L0, R0) — stage 0 from its index, later stages from the list. */
static __device__ __forceinline__ void mask_cand(const mask_stage_params &p, int b, int64_t c, int64_t *L0,
                                                 int64_t *R0)
{
    if (!p.L) {
        *L0 = p.n_sink + c * p.lc0;
        *R0 = min(*L0 + p.lc0, p.T - p.sw);
    } else {
        *L0 = p.L[(size_t)b * p.ub + c];
        *R0 = p.R[(size_t)b * p.ub + c];
    }
}

/* A candidate's descent in 32-bit offsets from L0 (exact: for x >= 0, (2 L0 + x) / 2 =
 * L0 + x / 2, so the midpoints are those of the absolute positions): the span R0 - L0 and the
 * limits clamped to 2^30, where no valid chunk goes; key L0 + o exists while o < lim_T; the
 * descent runs while lo <= lim_thr (l <= the query block's threshold; -1 when L0 < 0) and
 * lo < ro, for np passes (0 past the candidate count). */
struct mask_chunk {
    int64_t L0;
    int span, np, lim_T, lim_thr;
};

static __device__ __forceinline__ mask_chunk mask_chunk_of(const mask_stage_params &p, int b, int64_t c,
                                                           int64_t n)
{
    mask_chunk k;
    int64_t R0 = 0;
    k.L0 = 0;
    if (c < n) mask_cand(p, b, c, &k.L0, &R0);
    const int64_t big = (int64_t)1 << 30;
    const int64_t thr = max((int64_t)0, p.pos0 + (int64_t)b * p.bq - p.sw);
    k.span = (int)max((int64_t)0, min(R0 - k.L0, big));
    k.np = 1;
    while ((1 << (k.np - 1)) < k.span) k.np++;
    if (c >= n) k.np = 0;
    k.lim_T = (int)max((int64_t)0, min(p.T - k.L0, big + 1));
    k.lim_thr = k.L0 < 0 ? -1 : (int)max((int64_t)-1, min(thr - k.L0, big));
    return k;
}

/* One pass of a candidate's 32-bit descent [l, r): the midpoint, the left / right probe offsets,
 * and whether each probe key is probed (the descent alive and the key below T). The descent
 * stays alive while l <= lim_thr and l < r. */
static __device__ __forceinline__ bool mask_runs(int l, int r, int lim_thr)
{
    return l <= lim_thr && l < r;
}

static __device__ __forceinline__ void mask_probe(int l, int r, bool alive, int lim_T, int &mid, int &pl,
                                                  int &pr, bool &hl, bool &hr)
{
    mid = (l + r) >> 1; /* both >= 0 */
    pl = (l + mid) >> 1;
    pr = (mid + r) >> 1;
    hl = alive && pl < lim_T;
    hr = alive && pr < lim_T;
}

/* ---- prep: probe rows (§2.3) ------------------------------------------------------------------ */

/* rows[b][h][r][e] = mean over the queries i of group r of RoPE(scale * q[i][h], qpos(i)). */
static __global__ void prep_kernel(mask_stage_params p, mask_rope rope, const float *__restrict__ q)
{
    const int b = blockIdx.x, h = blockIdx.y, d = p.d;
    const int64_t p0 = p.pos0 + (int64_t)b * p.bq;
    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    const int64_t cc = stage_count(p, b);
    const int n_units = rope.on ? rope.half + (d - rope.n_rot) : d;
    /* every (row, unit) pair to its own thread (d 128: 64 units, so a loop over rows left half
     * of the 128 threads idle) */
    for (int w = threadIdx.x; w < nrow * n_units; w += blockDim.x) {
        const int r = w / n_units, u = w - r * n_units;
        float *row = p.rows + (((size_t)b * p.H + h) * p.rmax + r) * (size_t)d;
        const int i0 = r * p.stride, i1 = min(nq, i0 + p.stride);
        const float inv = __fdiv_rn(1.0f, (float)(i1 - i0));
        {
            int e0, e1 = -1;
            if (rope.on && u < rope.half) rope_elems(rope, u, &e0, &e1);
            else e0 = rope.on ? rope.n_rot + (u - rope.half) : u;
            float acc0 = 0.0f, acc1 = 0.0f;
            for (int i = i0; i < i1; i++) {
                const int64_t tok = (int64_t)b * p.bq + i;
                const float *src = q + ((size_t)tok * p.H + h) * (size_t)d;
                float x = __fmul_rn(src[e0], p.scale);
                if (e1 >= 0) {
                    float y = __fmul_rn(src[e1], p.scale);
                    const int64_t pos = p0 + i;
                    int64_t qp;
                    if (!p.using_extend) qp = pos;
                    else if (p.relative) qp = p.sw + 1;
                    else qp = min(pos, cc + p.sw);
                    rope_pair(rope, u, rope_cs(rope, qp, u), &x, &y);
                    acc1 = __fadd_rn(acc1, y);
                }
                acc0 = __fadd_rn(acc0, x);
            }
            row[e0] = __fmul_rn(acc0, inv);
            if (e1 >= 0) row[e1] = __fmul_rn(acc1, inv);
        }
    }
}

/* ---- scan: the descent (§2.5) and the head reduction (§2.6) --------------------------------- */

/* One descent step after a pass, for every scan kernel: an unprobed side scores -inf, the
 * winning side's half is kept ('>': a tie keeps the right half), and the best winning score so
 * far is tracked. I: the type of l / r / mid (absolute int64_t or 32-bit offsets). */
template <typename I>
static __device__ __forceinline__ void mask_descend(bool hl, bool hr, float sl, float sr, I mid, I &l,
                                                    I &r, float &best, bool &any)
{
    if (!hl) sl = -INFINITY;
    if (!hr) sr = -INFINITY;
    float win;
    if (sl > sr) {
        r = mid;
        win = sl;
    } else {
        l = mid;
        win = sr;
    }
    if (!any || win > best) best = win;
    any = true;
}

/* The head reduction of one chunk from the per-head results at [h * stride + j]: the best
 * score of the heads that probed (the first head wins ties) and its representative; rep0 when
 * none did. Writes score[b][c] and rep[b][c]. */
static __device__ __forceinline__ void mask_head_reduce(const mask_stage_params &p, int b, int64_t c,
                                                        const int *hany, const float *hbest,
                                                        const int64_t *hrep, int stride, int j,
                                                        int64_t rep0)
{
    float cbest = MASK_SCORE_INIT;
    int64_t crep = rep0;
    bool have = false;
    for (int h = 0; h < p.H; h++) {
        const int x = h * stride + j;
        if (hany[x] && (!have || hbest[x] > cbest)) {
            cbest = hbest[x];
            crep = hrep[x];
            have = true;
        }
    }
    p.score[(size_t)b * p.ub + c] = cbest;
    p.rep[(size_t)b * p.ub + c] = crep;
}

struct mask_kv {
    cuda_kv_addr a; /* K only: contiguous, slot pages or page pointers */
    int dtype;
    float k_scale;
    /* stage-0 probe cache (cuda_kv_view.pc_*), or pc NULL */
    const uint8_t *pc;
    const uint8_t *pc_ok;
    long long pc_base, pc_chunks;
    int pc_lc;
};

/* Byte address of element 0 of key t, KV head g (cuda_kv_rows; the kernels only read K). A key
 * the probe cache holds is read from there (same bytes, GPU memory instead of its home). */
static __device__ __forceinline__ const uint8_t *kv_key(const mask_kv &kv, int64_t t, int g)
{
    if (kv.pc && t >= kv.pc_base) {
        const unsigned long long r = (unsigned long long)(t - kv.pc_base);
        const unsigned long long j = r / (unsigned)kv.pc_lc;
        const int slot = cuda_pc_slot((unsigned)(r - j * (unsigned)kv.pc_lc), kv.pc_lc);
        if (j < (unsigned long long)kv.pc_chunks && slot >= 0 && kv.pc_ok[j])
            return kv.pc + cuda_pc_row_off((long long)j, slot, kv.a.hkv, g, kv.a.row_bytes);
    }
    return cuda_kv_krow(kv.a, t, g);
}

/* Warp-cooperative: load key t of KV head g (as float, fp8 scaled) into dst[d]. Lanes
 * [lane_lo, lane_lo + n_lanes) take part. */
static __device__ void load_key(const mask_kv &kv, int d, int64_t t, int g, float *dst, int sub,
                                int n_lanes)
{
    const uint8_t *row = kv_key(kv, t, g);
    if (kv.dtype == CUDA_KV_BF16) {
        const uint16_t *src = (const uint16_t *)row;
        if ((d & 7) == 0) {
            const uint4 *v = (const uint4 *)src;
            for (int i = sub; i < d / 8; i += n_lanes) {
                uint4 x = v[i];
                float *o = dst + 8 * i;
                o[0] = bf16_to_f(x.x);
                o[1] = bf16_to_f(x.x >> 16);
                o[2] = bf16_to_f(x.y);
                o[3] = bf16_to_f(x.y >> 16);
                o[4] = bf16_to_f(x.z);
                o[5] = bf16_to_f(x.z >> 16);
                o[6] = bf16_to_f(x.w);
                o[7] = bf16_to_f(x.w >> 16);
            }
        } else {
            for (int i = sub; i < d; i += n_lanes) dst[i] = bf16_to_f(src[i]);
        }
    } else {
        const uint8_t *src = row;
        const float sc = kv.k_scale;
        if ((d & 15) == 0) {
            const uint4 *v = (const uint4 *)src;
            for (int i = sub; i < d / 16; i += n_lanes) {
                uint4 x = v[i];
                uint32_t w[4] = {x.x, x.y, x.z, x.w};
                float *o = dst + 16 * i;
#pragma unroll
                for (int j = 0; j < 16; j++) o[j] = __fmul_rn(fp8_to_f(w[j >> 2] >> (8 * (j & 3))), sc);
            }
        } else {
            for (int i = sub; i < d; i += n_lanes) dst[i] = __fmul_rn(fp8_to_f(src[i]), sc);
        }
    }
}

/* hip_dot(row, key, d) of hip-impl.h with its AVX2 order when d % 16 == 0: lane j (of a 16-lane
 * half-warp) accumulates elements j, j+16, ... by fma; then (j, j+8), (k, k+4), (0, 2)/(1, 3),
 * (0, 1) are added. The result is valid in the half-warp's first lane. */
static __device__ __forceinline__ float dot16(const float *row, const float *key, int d, int j)
{
    float acc = 0.0f;
    for (int e = j; e < d; e += 16) acc = __fmaf_rn(row[e], key[e], acc);
    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 8, 16));
    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 4, 16));
    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 2, 16));
    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 1, 16));
    return acc;
}

/* hip_dot's scalar order (d % 16 != 0). */
static __device__ __forceinline__ float dot_seq(const float *row, const float *key, int d)
{
    float s = 0.0f;
    for (int e = 0; e < d; e++) s = __fadd_rn(s, __fmul_rn(row[e], key[e]));
    return s;
}

static __global__ void __launch_bounds__(MASK_SCAN_WARPS * 32)
    scan_kernel(mask_stage_params p, mask_rope rope, mask_kv kv)
{
    const int c = blockIdx.x, b = blockIdx.y;
    const int64_t n = stage_count(p, b);
    if ((int64_t)c >= n) return;
    const int d = p.d, H = p.H;
    extern __shared__ float4 smem4[];
    int64_t *hrep = (int64_t *)smem4;
    float *hbest = (float *)(hrep + H);
    int *hany = (int *)(hbest + H);
    float *kbuf = (float *)smem4 + 4 * (size_t)H; /* 16 bytes per head above */

    int64_t L0, R0;
    mask_cand(p, b, c, &L0, &R0);
    const int64_t p0 = p.pos0 + (int64_t)b * p.bq;
    const int64_t thr = max((int64_t)0, p0 - p.sw);
    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *kl = kbuf + (size_t)warp * 2 * d, *kr = kl + d;
    const int sub = lane & 15, side = lane >> 4; /* half-warp 0: left key, 1: right key */

    for (int h = warp; h < H; h += MASK_SCAN_WARPS) {
        const int g = h / p.G;
        const float *rows = p.rows + ((size_t)b * H + h) * p.rmax * (size_t)d;
        int64_t l = L0, r = R0;
        float best = MASK_SCORE_INIT;
        bool any = false;
        int64_t n_pass = 1;
        while (((int64_t)1 << (n_pass - 1)) < r - l) n_pass++;
        for (int64_t it = 0; it < n_pass; it++) {
            if (!(l <= thr && l < r && l >= 0)) break;
            const int64_t mid = (l + r) / 2, pl = (l + mid) / 2, pr = (mid + r) / 2;
            int64_t posl, posr;
            if (!p.using_extend) {
                posl = pl;
                posr = pr;
            } else if (p.relative) {
                posl = 0;
                posr = 1;
            } else {
                posl = posr = c;
            }
            const bool hl = pl < p.T, hr = pr < p.T;
            /* both keys: half-warp `side` loads its key */
            if (side == 0 && hl) load_key(kv, d, pl, g, kl, sub, 16);
            if (side == 1 && hr) load_key(kv, d, pr, g, kr, sub, 16);
            __syncwarp();
            if (rope.on) {
                for (int u = lane; u < 2 * rope.half; u += 32) {
                    const int which = u >= rope.half, i = which ? u - rope.half : u;
                    if (which ? !hr : !hl) continue;
                    float *kx = which ? kr : kl;
                    int e0, e1;
                    rope_elems(rope, i, &e0, &e1);
                    rope_pair(rope, i, rope_cs(rope, which ? posr : posl, i), &kx[e0], &kx[e1]);
                }
                __syncwarp();
            }
            const float *key = side ? kr : kl;
            float mine = -FLT_MAX;
            for (int rr = 0; rr < nrow; rr++) {
                const float *row = rows + (size_t)rr * d;
                float s;
                if ((d & 15) == 0) s = dot16(row, key, d, sub);
                else s = dot_seq(row, key, d); /* every lane computes the same value */
                if (p.score_bf16) s = round_bf16_d(s);
                if (s > mine) mine = s;
            }
            const float sl = __shfl_sync(0xffffffffu, mine, 0), sr = __shfl_sync(0xffffffffu, mine, 16);
            __syncwarp(); /* the next pass overwrites kl / kr */
            mask_descend(hl, hr, sl, sr, mid, l, r, best, any);
        }
        if (lane == 0) {
            hrep[h] = l;
            hbest[h] = best;
            hany[h] = any;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) mask_head_reduce(p, b, c, hany, hbest, hrep, 1, 0, L0);
}

/* ---- scan, fast path (d 64 or 128; no RoPE, or the relative / chunk pruning positions) ------- */

/* The same descent and head reduction as scan_kernel, same float operations in the same order,
 * organized for latency and instruction count: lane j of half-warp `side` holds elements j,
 * j+16, ... of its probe key (side 0: left, 1: right) in registers, loaded with 2-byte (bf16) or
 * 1-byte (fp8) coalesced loads, rotated in registers (the NORM pair partner is one shuffle away,
 * the NEOX partner is in the same lane) with cos/sin put in shared memory once per CTA (the
 * pruning position is constant per side in the relative mode and per chunk in the chunk mode),
 * dotted in hip_dot's lane order. Both halves run the same instructions, so the two probe loads
 * of a pass are in flight together, and a pass needs no shared-memory store or warp barrier.
 * The descent runs in 32-bit offsets from the candidate's start L0 (exact: for x >= 0,
 * (2 L0 + x) / 2 = L0 + x / 2), the KV head, probe-row and (contiguous K) key-row bases of a
 * head are computed once, and NORM = true (NORM rotation of every pair, n_rot = d, all pairs
 * in cpu_rope_apply's fmaddsub groups: the Llama case) rotates element e as
 * fma(x, c, partner * s') with s' = -s for even e (= -(partner * s) exactly) and s for odd e:
 * branch-free, ~4 instructions per element (the H200 profile of the general form: the kernel
 * was issue-bound at ~980 instructions per pass of two heads). M = head_dim / 16. */
template <int M, int NH, bool NORM>
static __global__ void __launch_bounds__(MASK_SCAN_WARPS * 32, NH == 1 ? 5 : 4)
    scan_fast_kernel(mask_stage_params p, mask_rope rope, mask_kv kv)
{
    const int c = blockIdx.x, b = blockIdx.y;
    const int64_t n = stage_count(p, b);
    if ((int64_t)c >= n) return;
    const int d = 16 * M, H = p.H;
    extern __shared__ float4 smem4[];
    int64_t *hrep = (int64_t *)smem4;
    float *hbest = (float *)(hrep + H);
    int *hany = (int *)(hbest + H);

    const int nq = (int)min((int64_t)p.bq, p.n_tok - (int64_t)b * p.bq);
    const int nrow = (nq + p.stride - 1) / p.stride;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane & 15, side = lane >> 4;
    const bool neox = rope.style == CPU_ROPE_NEOX;

    /* offsets from L0: l = L0 + lo, r = L0 + ro */
    const mask_chunk ck = mask_chunk_of(p, b, c, n);
    const int64_t L0 = ck.L0;
    const int span = ck.span, lim_thr = ck.lim_thr, lim_T = ck.lim_T;
    const bool bf16 = kv.dtype == CUDA_KV_BF16;
    const int esub = bf16 ? 2 * sub : sub;
    const bool contig = !kv.pc && !kv.a.kptr && !kv.a.page;
    const size_t tstride = (size_t)kv.a.hkv * (size_t)kv.a.row_bytes;

    /* cos/sin of this lane's pairs at its side's pruning position (NORM: sin signed per
     * element, see above) */
    __shared__ float2 cs_s[2][16 * M]; /* [side][element] */
    {
        for (int x = threadIdx.x; x < 2 * 16 * M; x += blockDim.x) {
            const int sd = x / (16 * M), e = x % (16 * M);
            const int64_t pos = p.relative ? (int64_t)sd : (int64_t)c;
            int i = -1;
            if (rope.on) {
                if (neox) i = e < 8 * M ? e : -1; /* n_rot == d: pair (e, e + d/2) */
                else if (e < rope.n_rot) i = e >> 1;
            }
            float2 v = i >= 0 ? rope_cs(rope, pos, i) : make_float2(1.0f, 0.0f);
            if (NORM && (e & 1) == 0) v.y = -v.y;
            cs_s[sd][e] = v;
        }
        __syncthreads();
    }
    const float2 *cs = cs_s[side] + sub; /* cs[16 * m]: this lane's element m */
    const int n_fused = neox ? 0 : (rope.half / 4) * 4; /* pairs rotated by fmaddsub */

    /* NH heads per warp in lockstep (h, h + 8, ...): their loads are in flight together */
    for (int h0 = warp; h0 < H; h0 += MASK_SCAN_WARPS * NH) {
        int lo[NH], ro[NH], gh[NH];
        float best[NH];
        bool any[NH], alive[NH];
        const float *rw[NH];   /* probe rows of the head, from element sub on */
        const uint8_t *kb[NH]; /* contiguous K: key 0 of the head's KV head, from element sub on */
#pragma unroll
        for (int j = 0; j < NH; j++) {
            lo[j] = 0;
            ro[j] = span;
            best[j] = MASK_SCORE_INIT;
            any[j] = false;
            alive[j] = h0 + j * MASK_SCAN_WARPS < H;
            const int hj = min(h0 + j * MASK_SCAN_WARPS, H - 1);
            gh[j] = hj / p.G;
            rw[j] = p.rows + ((size_t)b * H + hj) * p.rmax * (size_t)d + sub;
            kb[j] = contig ? kv.a.k + (size_t)gh[j] * (size_t)kv.a.row_bytes + esub : nullptr;
        }
        for (int it = 0; it < ck.np; it++) {
            bool some = false;
#pragma unroll
            for (int j = 0; j < NH; j++) {
                if (!mask_runs(lo[j], ro[j], lim_thr)) alive[j] = false; /* = break */
                some |= alive[j];
            }
            if (!some) break;
            int mo[NH];
            bool hl[NH], hr[NH], have[NH];
            float v[NH][M];
            const uint8_t *row[NH]; /* the probed key's row, from element sub on */
#pragma unroll
            for (int j = 0; j < NH; j++) {
                int pl, pr;
                mask_probe(lo[j], ro[j], alive[j], lim_T, mo[j], pl, pr, hl[j], hr[j]);
                have[j] = side ? hr[j] : hl[j];
                /* branch-free: a key that is not probed loads token 0 (valid); its score is
                 * replaced by -inf below */
                const int64_t t = have[j] ? L0 + (side ? pr : pl) : 0;
                row[j] = contig ? kb[j] + (size_t)t * tstride : kv_key(kv, t, gh[j]) + esub;
            }
            if (bf16) {
                uint32_t raw[NH][M];
#pragma unroll
                for (int j = 0; j < NH; j++)
#pragma unroll
                    for (int m = 0; m < M; m++) raw[j][m] = ((const uint16_t *)row[j])[16 * m];
#pragma unroll
                for (int j = 0; j < NH; j++)
#pragma unroll
                    for (int m = 0; m < M; m++) v[j][m] = bf16_to_f(raw[j][m]);
            } else {
                uint32_t raw[NH][M];
#pragma unroll
                for (int j = 0; j < NH; j++)
#pragma unroll
                    for (int m = 0; m < M; m++) raw[j][m] = row[j][16 * m];
#pragma unroll
                for (int j = 0; j < NH; j++)
#pragma unroll
                    for (int m = 0; m < M; m++)
                        v[j][m] = __fmul_rn(fp8_to_f(raw[j][m]), kv.k_scale);
            }
            if (NORM) {
#pragma unroll
                for (int m = 0; m < M; m++) {
                    const float2 w = cs[16 * m];
#pragma unroll
                    for (int j = 0; j < NH; j++) {
                        const float u = __shfl_xor_sync(0xffffffffu, v[j][m], 1); /* pair partner */
                        v[j][m] = __fmaf_rn(v[j][m], w.x, __fmul_rn(u, w.y));
                    }
                }
            } else if (rope.on) {
#pragma unroll
                for (int j = 0; j < NH; j++) {
                    if (neox) {
#pragma unroll
                        for (int m = 0; m < M / 2; m++) {
                            const float x = v[j][m], y = v[j][m + M / 2], co = cs[16 * m].x, si = cs[16 * m].y;
                            v[j][m] = __fsub_rn(__fmul_rn(x, co), __fmul_rn(y, si));
                            v[j][m + M / 2] = __fadd_rn(__fmul_rn(x, si), __fmul_rn(y, co));
                        }
                    } else {
#pragma unroll
                        for (int m = 0; m < M; m++) {
                            const int e = sub + 16 * m;
                            const float u = __shfl_xor_sync(0xffffffffu, v[j][m], 1); /* pair partner */
                            if (e < rope.n_rot) {
                                const float co = cs[16 * m].x, si = cs[16 * m].y;
                                const bool fused = (e >> 1) < n_fused;
                                if ((e & 1) == 0) /* a' = a c - b s */
                                    v[j][m] = fused ? __fmaf_rn(v[j][m], co, -__fmul_rn(u, si))
                                                    : __fsub_rn(__fmul_rn(v[j][m], co), __fmul_rn(u, si));
                                else /* b' = a s + b c */
                                    v[j][m] = fused ? __fmaf_rn(v[j][m], co, __fmul_rn(u, si))
                                                    : __fadd_rn(__fmul_rn(u, si), __fmul_rn(v[j][m], co));
                            }
                        }
                    }
                }
            }
            float mine[NH];
#pragma unroll
            for (int j = 0; j < NH; j++) mine[j] = -FLT_MAX;
            for (int rr = 0; rr < nrow; rr++) {
#pragma unroll
                for (int j = 0; j < NH; j++) {
                    const float *__restrict__ pr = rw[j] + (size_t)rr * d;
                    float acc = 0.0f;
#pragma unroll
                    for (int m = 0; m < M; m++) acc = __fmaf_rn(pr[16 * m], v[j][m], acc);
                    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 8, 16));
                    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 4, 16));
                    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 2, 16));
                    acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 1, 16));
                    if (p.score_bf16) acc = round_bf16_d(acc);
                    if (acc > mine[j]) mine[j] = acc;
                }
            }
#pragma unroll
            for (int j = 0; j < NH; j++) {
                const float sl = __shfl_sync(0xffffffffu, mine[j], 0), sr = __shfl_sync(0xffffffffu, mine[j], 16);
                if (alive[j]) mask_descend(hl[j], hr[j], sl, sr, mo[j], lo[j], ro[j], best[j], any[j]);
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < NH; j++) {
                const int h = h0 + j * MASK_SCAN_WARPS;
                if (h < H) {
                    hrep[h] = L0 + lo[j];
                    hbest[h] = best[j];
                    hany[h] = any[j];
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) mask_head_reduce(p, b, c, hany, hbest, hrep, 1, 0, L0);
}

/* ---- scan, tensor-core path for prefill (opt-in, not bit-exact: IHIP_MASK_PREFILL=mma) -------- */

#include "hip-mask-mma.cuh"

/* ---- select: exact top-k, realign, sort, split / final lists (§2.7, §2.8) -------------------- */

struct mask_select_params {
    const float *score;    /* [n_qblk][ub] */
    const int64_t *rep;
    int64_t ub;
    int64_t n0;
    const int32_t *cnt;    /* [n_qblk] or NULL (stage 0: n0) */
    int64_t k_keep;        /* chunks kept (before min with the count) */
    int final;             /* 1: last stage */
    int64_t n_sink, lcs;   /* transition: realign grid */
    int split;             /* transition: pieces per kept chunk */
    int64_t *outL, *outR;  /* transition: [n_qblk][out_cap] */
    int32_t *out_n;        /* transition: [n_qblk] */
    int out_cap;
    int64_t bk;            /* final: key block */
    int64_t *idx;          /* final: [n_qblk][kb] */
    int32_t *ks;
    int kb;
    int64_t pos0;
    int bq;
    int P;                 /* pow2 ≥ k (sort size) */
};

/* Ascending order of this key = descending score, then ascending chunk index (cmp_ord). */
static __device__ __forceinline__ uint64_t order_key(float s, int64_t i)
{
    uint32_t u = __float_as_uint(s);
    if ((u << 1) == 0) u = 0; /* -0 and +0 compare equal on the CPU */
    uint32_t asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)(~asc) << 32) | (uint64_t)(uint32_t)i;
}

static __global__ void __launch_bounds__(MASK_SELECT_THREADS) select_kernel(mask_select_params p)
{
    const int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const int64_t n = p.cnt ? max((int64_t)0, min((int64_t)p.cnt[b], p.ub)) : p.n0;
    const int64_t k = min(n, p.k_keep);
    const float *score = p.score + (size_t)b * p.ub;
    const int64_t *rep = p.rep + (size_t)b * p.ub;
    extern __shared__ float4 smem4[];
    int64_t *val = (int64_t *)smem4; /* [P] */
    __shared__ unsigned hist[256];
    __shared__ uint64_t s_prefix;
    __shared__ uint64_t s_mask;
    __shared__ int64_t s_kk;
    __shared__ int s_count;
    __shared__ int s_u, s_ks, s_done;

    /* threshold: the k-th smallest order key (all of them when k == n) */
    uint64_t kth = ~(uint64_t)0;
    if (k > 0 && k < n) {
        if (tid == 0) {
            s_prefix = 0;
            s_mask = 0;
            s_kk = k;
            s_done = 0;
        }
        __syncthreads();
        int shift = 56;
        for (; shift >= 0; shift -= 8) {
            const uint64_t prefix = s_prefix, mask = s_mask;
            if (shift < 32 && ((uint64_t)(n - 1) >> shift) == 0) {
                /* every index is below 2^shift: this digit is 0 for all keys, the rank stays */
                __syncthreads(); /* everyone read s_prefix / s_mask */
                if (tid == 0) s_mask = mask | ((uint64_t)255 << shift);
                __syncthreads();
                continue;
            }
            for (int i = tid; i < 256; i += nt) hist[i] = 0;
            __syncthreads();
            /* warp-aggregated: the score keys share their top digits, so plain atomics would
             * serialize on one bin (every thread runs the same trip count: full warps) */
            for (int64_t base = 0; base < n; base += nt) {
                const int64_t i = base + tid;
                unsigned bin = 256u;
                if (i < n) {
                    uint64_t key = order_key(score[i], i);
                    if ((key & mask) == prefix) bin = (unsigned)(key >> shift) & 255u;
                }
                unsigned peers = __match_any_sync(0xffffffffu, bin);
                if (bin < 256u && (tid & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
            }
            __syncthreads();
            if (tid < 32) {
                /* the digit holding the kk-th key: lane l sums bins 8l..8l+7, a warp scan finds
                 * the lane whose range crosses kk, that lane walks its bins */
                unsigned loc[8];
                int64_t sum = 0;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    loc[j] = hist[tid * 8 + j];
                    sum += loc[j];
                }
                int64_t incl = sum;
                for (int off = 1; off < 32; off <<= 1) {
                    int64_t t = __shfl_up_sync(0xffffffffu, incl, off);
                    if (tid >= off) incl += t;
                }
                const int64_t excl = incl - sum, kk = s_kk;
                if (excl < kk && incl >= kk) {
                    int64_t cum = excl;
                    int dig = tid * 8 + 7;
                    unsigned bin_n = loc[7];
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        if (cum + (int64_t)loc[j] >= kk) {
                            dig = tid * 8 + j;
                            bin_n = loc[j];
                            break;
                        }
                        cum += loc[j];
                    }
                    s_kk = kk - cum;
                    s_prefix = prefix | ((uint64_t)dig << shift);
                    s_mask = mask | ((uint64_t)255 << shift);
                    /* the kk-th key is the last of its bin: the whole bin is kept, and no
                     * lower digit can change which keys are (threshold: the bin's largest key) */
                    s_done = cum + (int64_t)bin_n == kk;
                }
            }
            __syncthreads();
            if (s_done) break;
        }
        kth = s_prefix;
        if (shift > 0 && s_done) kth |= ((uint64_t)1 << shift) - 1u;
    }

    /* gather the k chosen chunks' realigned starts (transition) or block starts (final) */
    for (int i = tid; i < p.P; i += nt) val[i] = INT64_MAX;
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int64_t i = tid; i < (k > 0 ? n : 0); i += nt) {
        if (order_key(score[i], i) > kth) continue;
        int slot = atomicAdd(&s_count, 1);
        if (slot >= p.P) continue; /* cannot happen: exactly k ≤ P keys pass */
        int64_t rp = rep[i];
        val[slot] = p.final ? floordiv_d(rp, p.bk) * p.bk
                            : p.n_sink + floordiv_d(rp - p.n_sink, p.lcs) * p.lcs;
    }
    __syncthreads();

    /* bitonic sort of val[0, P) ascending; with P <= threads one element per thread, strides
     * below 32 exchanged by shuffles (no barrier), larger ones through shared memory */
    if (p.P <= nt) {
        const int P = p.P;
        int64_t x = tid < P ? val[tid] : INT64_MAX;
        for (int size = 2; size <= P; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                int64_t y;
                if (stride >= 32) {
                    __syncthreads(); /* everyone read the previous exchange */
                    if (tid < P) val[tid] = x;
                    __syncthreads();
                    y = tid < P ? val[tid ^ stride] : INT64_MAX;
                } else {
                    y = __shfl_xor_sync(0xffffffffu, x, stride);
                }
                /* the pair (i, i ^ stride), i the lower index: ascending (i & size == 0) puts
                 * the smaller at i, descending the larger */
                const bool up = (tid & size) == 0, lower = (tid & stride) == 0;
                x = (lower == up) ? min(x, y) : max(x, y);
            }
        }
        __syncthreads();
        if (tid < P) val[tid] = x;
        __syncthreads();
    } else {
    for (int size = 2; size <= p.P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < p.P; i += nt) {
                int j = i ^ stride;
                if (j > i) {
                    bool up = (i & size) == 0;
                    int64_t x = val[i], y = val[j];
                    if ((x > y) == up) {
                        val[i] = y;
                        val[j] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
    }

    if (!p.final) {
        /* split each kept chunk [Lj, Lj + lcs) into `split` pieces */
        const int64_t len = p.lcs;
        const int split = p.split;
        int64_t *oL = p.outL + (size_t)b * p.out_cap, *oR = p.outR + (size_t)b * p.out_cap;
        for (int64_t x = tid; x < k * split; x += nt) {
            const int64_t i = x / split, t = x % split, Lj = val[i], Rj = Lj + len;
            oL[x] = Lj + floordiv_d(t * len, split);
            oR[x] = Rj - floordiv_d((split - 1 - t) * len, split);
        }
        if (tid == 0) p.out_n[b] = (int32_t)(k * split);
        return;
    }

    /* final: de-duplicate (warp 0, 32 at a time), count blocks before the block's end, pad */
    int64_t *row = p.idx + (size_t)b * p.kb;
    const int64_t lim = p.pos0 + (int64_t)b * p.bq + p.bq;
    if (tid < 32) {
        int u = 0, ks = 0;
        for (int64_t base = 0; base < k; base += 32) {
            const int64_t i = base + tid;
            bool f = i < k && (i == 0 || val[i] != val[i - 1]);
            unsigned m = __ballot_sync(0xffffffffu, f);
            unsigned mk = __ballot_sync(0xffffffffu, f && val[i < k ? i : 0] < lim);
            if (f) row[u + __popc(m & ((1u << tid) - 1u))] = val[i];
            u += __popc(m);
            ks += __popc(mk);
        }
        if (tid == 0) {
            s_u = u;
            s_ks = ks;
        }
    }
    __syncthreads();
    for (int i = s_u + tid; i < p.kb; i += nt) row[i] = INT64_MAX;
    if (tid == 0) p.ks[b] = s_ks;
}

/* ---- host side -------------------------------------------------------------------------------- */

static int mask_fail_launch(const char *what)
{
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return 0;
    return cuda_hip_fail(e, what, __FILE__, __LINE__);
}

int cuda_hip_mask_init(cuda_hip_mask *m, const hip_layer_config *lc, int max_qblk)
{
    if (!m) return -EINVAL;
    memset(m, 0, sizeof(*m));
    if (!lc || lc->n_stages < 1 || lc->n_stages > HIP_MAX_STAGES || max_qblk < 1) return -EINVAL;
    for (int s = 0; s < lc->n_stages; s++)
        if (lc->stages[s].chunk_size < 1) return -EINVAL;
    int64_t kb = lc->second_stage_k / lc->stages[lc->n_stages - 1].chunk_size;
    if (kb < 1 || kb > INT32_MAX) return -EINVAL;
    m->max_qblk = max_qblk;
    m->n_stages = lc->n_stages;
    m->kb = (int)kb;
    cudaError_t e;
    e = cudaMalloc(&m->idx_dev, sizeof(int64_t) * (size_t)max_qblk * (size_t)m->kb);
    if (e != cudaSuccess) goto fail;
    e = cudaMalloc(&m->ks_dev, sizeof(int32_t) * (size_t)max_qblk);
    if (e != cudaSuccess) goto fail;
    e = cudaMemset(m->ks_dev, 0, sizeof(int32_t) * (size_t)max_qblk);
    if (e != cudaSuccess) goto fail;
    for (int s = 1; s < lc->n_stages; s++) {
        int64_t kept = lc->stages[s].stage_k / lc->stages[s - 1].chunk_size;
        int64_t split = lc->stages[s - 1].chunk_size / lc->stages[s].chunk_size;
        if (kept < 0 || split < 0 || kept * split > INT32_MAX) {
            cuda_hip_mask_free(m);
            return -EINVAL;
        }
        m->cand_cap[s] = (int)(kept * split);
        size_t n = (size_t)max_qblk * (size_t)(m->cand_cap[s] > 0 ? m->cand_cap[s] : 1);
        e = cudaMalloc(&m->cand_L_dev[s], sizeof(int64_t) * n);
        if (e != cudaSuccess) goto fail;
        e = cudaMalloc(&m->cand_R_dev[s], sizeof(int64_t) * n);
        if (e != cudaSuccess) goto fail;
        e = cudaMalloc(&m->cand_n_dev[s], sizeof(int32_t) * (size_t)max_qblk);
        if (e != cudaSuccess) goto fail;
        e = cudaMemset(m->cand_n_dev[s], 0, sizeof(int32_t) * (size_t)max_qblk);
        if (e != cudaSuccess) goto fail;
    }
    return 0;
fail:
    cuda_hip_mask_free(m);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        return -ENOMEM;
    }
    return cuda_hip_fail(e, "cuda_hip_mask_init", __FILE__, __LINE__);
}

void cuda_hip_mask_free(cuda_hip_mask *m)
{
    if (!m) return;
    cudaFree(m->idx_dev);
    cudaFree(m->ks_dev);
    for (int s = 0; s < HIP_MAX_STAGES; s++) {
        cudaFree(m->cand_L_dev[s]);
        cudaFree(m->cand_R_dev[s]);
        cudaFree(m->cand_n_dev[s]);
    }
    memset(m, 0, sizeof(*m));
}

static bool mask_same_geometry(const cuda_hip_mask *m, const hip_mask *h)
{
    if (m->max_qblk != h->max_qblk || m->kb != h->kb || m->n_stages != h->n_stages) return false;
    for (int s = 1; s < m->n_stages; s++)
        if (m->cand_cap[s] != h->cand_cap[s]) return false;
    return true;
}

/* Copy every array of a mask between the GPU and the host (direction `kind`), then wait for
 * the stream: the host buffers must stay valid until the copies ran. */
static int mask_copy(const cuda_hip_mask *m, const hip_mask *h, cudaMemcpyKind kind,
                     cudaStream_t st)
{
    const bool down = kind == cudaMemcpyDeviceToHost;
    const size_t nb = (size_t)m->max_qblk;
#define MASK_COPY(dev, host, bytes)                                                               \
    CUDA_TRY(cudaMemcpyAsync(down ? (void *)(host) : (void *)(dev),                              \
                             down ? (const void *)(dev) : (const void *)(host), (bytes), kind, st))
    MASK_COPY(m->idx_dev, h->idx, sizeof(int64_t) * nb * (size_t)m->kb);
    MASK_COPY(m->ks_dev, h->ks, sizeof(int32_t) * nb);
    for (int s = 1; s < m->n_stages; s++) {
        size_t n = nb * (size_t)m->cand_cap[s];
        MASK_COPY(m->cand_L_dev[s], h->cand_L[s], sizeof(int64_t) * n);
        MASK_COPY(m->cand_R_dev[s], h->cand_R[s], sizeof(int64_t) * n);
        MASK_COPY(m->cand_n_dev[s], h->cand_n[s], sizeof(int32_t) * nb);
    }
#undef MASK_COPY
    CUDA_TRY(cudaStreamSynchronize(st));
    return 0;
}

int cuda_hip_mask_download(const cuda_hip_mask *m, hip_mask *out, void *stream)
{
    if (!m || !out || !mask_same_geometry(m, out)) return -EINVAL;
    int rc = mask_copy(m, out, cudaMemcpyDeviceToHost, (cudaStream_t)stream);
    if (rc) return rc;
    out->n_qblk = m->n_qblk;
    out->pos0 = m->pos0;
    return 0;
}

int cuda_hip_mask_upload(cuda_hip_mask *m, const hip_mask *in, void *stream)
{
    if (!m || !in || !mask_same_geometry(m, in)) return -EINVAL;
    int rc = mask_copy(m, in, cudaMemcpyHostToDevice, (cudaStream_t)stream);
    if (rc) return rc;
    m->n_qblk = in->n_qblk;
    m->pos0 = in->pos0;
    return 0;
}

/* Optional per-launch timing (env IHIP_MASK_PROFILE=1): cudaEvents after every launch of one
 * estimate, synchronized and printed to stderr at its end (this synchronizes the stream: for
 * measurements only). Marks: start, rope table, then prep / scan / select per stage. */
#define MASK_PROF_MAX (2 + 3 * HIP_MAX_STAGES)
typedef struct mask_prof {
    int on, n;
    cudaEvent_t ev[MASK_PROF_MAX];
} mask_prof;

static void prof_mark(mask_prof *pf, cudaStream_t st)
{
    if (!pf->on || pf->n >= MASK_PROF_MAX) return;
    if (cudaEventCreate(&pf->ev[pf->n]) != cudaSuccess) {
        pf->on = 0;
        return;
    }
    cudaEventRecord(pf->ev[pf->n], st);
    pf->n++;
}

static void prof_begin(mask_prof *pf, cudaStream_t st)
{
    const char *e = getenv("IHIP_MASK_PROFILE");
    pf->on = e && e[0] && strcmp(e, "0") != 0;
    pf->n = 0;
    prof_mark(pf, st);
}

static void prof_report(mask_prof *pf, int64_t T, int64_t n_qblk, int first_stage, int S,
                        const int64_t *ub, int fast)
{
    if (cudaEventSynchronize(pf->ev[pf->n - 1]) != cudaSuccess) return;
    float ms;
    char line[512];
    static const char *const scan_name[4] = {"old", "fast1", "fast", "mma"};
    int len = snprintf(line, sizeof(line), "mask profile T=%lld n_qblk=%lld scan=%s:", (long long)T,
                       (long long)n_qblk, scan_name[fast & 3]);
    int k = 1;
    if (k < pf->n && cudaEventElapsedTime(&ms, pf->ev[0], pf->ev[k]) == cudaSuccess)
        len += snprintf(line + len, sizeof(line) - (size_t)len, " rope_tab %.1f", ms * 1000.0f);
    static const char *name[3] = {"prep", "scan", "select"};
    for (int s = first_stage; s < S && len < (int)sizeof(line) - 64; s++) {
        len += snprintf(line + len, sizeof(line) - (size_t)len, " | s%d (%lld cand)", s, (long long)ub[s]);
        for (int j = 0; j < 3; j++, k++)
            if (k + 1 < pf->n && cudaEventElapsedTime(&ms, pf->ev[k], pf->ev[k + 1]) == cudaSuccess)
                len += snprintf(line + len, sizeof(line) - (size_t)len, " %s %.1f", name[j], ms * 1000.0f);
    }
    if (cudaEventElapsedTime(&ms, pf->ev[0], pf->ev[pf->n - 1]) == cudaSuccess)
        snprintf(line + len, sizeof(line) - (size_t)len, " | total %.1f us", ms * 1000.0f);
    fprintf(stderr, "%s\n", line);
    for (int i = 0; i < pf->n; i++) cudaEventDestroy(pf->ev[i]);
    pf->n = 0;
}

static int next_pow2(int64_t x)
{
    int p = 1;
    while (p < x) p <<= 1;
    return p;
}

/* scan_mma_kernel<d / 32, NORM, FP8> */
template <int Q>
static void scan_mma_launch(bool norm, bool fp8, unsigned grid, size_t smem, cudaStream_t st,
                            const mask_stage_params &p, const mask_rope &rope, const mask_kv &kv,
                            const uint4 *frag, int MT, int64_t n_grp, int n_qblk)
{
    const unsigned nt = MASK_SCAN_WARPS * 32;
    if (norm && fp8) scan_mma_kernel<Q, true, true><<<grid, nt, smem, st>>>(p, rope, kv, frag, MT, n_grp, n_qblk);
    else if (norm) scan_mma_kernel<Q, true, false><<<grid, nt, smem, st>>>(p, rope, kv, frag, MT, n_grp, n_qblk);
    else if (fp8) scan_mma_kernel<Q, false, true><<<grid, nt, smem, st>>>(p, rope, kv, frag, MT, n_grp, n_qblk);
    else scan_mma_kernel<Q, false, false><<<grid, nt, smem, st>>>(p, rope, kv, frag, MT, n_grp, n_qblk);
}

/* scan_mmr_kernel<d / 32, FP8, ROWROT, A0R> over grid (n_grp64 * n_qblk, Hkv), then the reduction of
 * the KV groups' results */
template <int Q>
static int scan_mmr_launch(bool fp8, bool rowrot, bool a0r, cudaStream_t st, const mask_stage_params &p,
                           const mask_rope &rope, const mask_kv &kv, const uint4 *frag, mm_part *part,
                           int MT, int n_qblk, int sbw)
{
    const int64_t n_grp = (p.ub + MMR_CH * MMR_NG - 1) / (MMR_CH * MMR_NG);
    if (n_grp * n_qblk > INT32_MAX) return -EINVAL;
    const int gp = p.G < MMR_NW ? p.G : MMR_NW, wph = MT == 1 ? 1 : MMR_WPH;
    const dim3 grid((unsigned)(n_grp * n_qblk), (unsigned)p.Hkv);
    const size_t smem = (size_t)gp * MT * (2 * Q) * 32 * sizeof(uint4) + (size_t)p.G * MMR_CH * MMR_NG * 8;
    auto k = fp8 && a0r      ? scan_mmr_kernel<Q, true, true, true>
             : fp8 && rowrot ? scan_mmr_kernel<Q, true, true, false>
             : fp8           ? scan_mmr_kernel<Q, true, false, false>
             : a0r           ? scan_mmr_kernel<Q, false, true, true>
             : rowrot        ? scan_mmr_kernel<Q, false, true, false>
                             : scan_mmr_kernel<Q, false, false, false>;
    if (smem > 48 * 1024) CUDA_TRY(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    k<<<grid, 32 * gp * wph, smem, st>>>(p, rope, kv, frag, part, MT, n_grp, n_qblk, sbw, wph);
    int rc = mask_fail_launch("scan_mmr_kernel");
    if (rc) return rc;
    mm_part_reduce_kernel<<<dim3((unsigned)((p.ub + 255) / 256), (unsigned)n_qblk), 256, 0, st>>>(p, part, n_qblk);
    return mask_fail_launch("mm_part_reduce_kernel");
}

/* scan_fast_kernel<d / 16, heads per warp, NORM> */
template <int M, int NH>
static void scan_fast_launch_m(bool norm, dim3 grid, size_t smem, cudaStream_t st,
                               const mask_stage_params &p, const mask_rope &rope, const mask_kv &kv)
{
    if (norm) scan_fast_kernel<M, NH, true><<<grid, MASK_SCAN_WARPS * 32, smem, st>>>(p, rope, kv);
    else scan_fast_kernel<M, NH, false><<<grid, MASK_SCAN_WARPS * 32, smem, st>>>(p, rope, kv);
}

static void scan_fast_launch(int m, int nh, bool norm, dim3 grid, size_t smem, cudaStream_t st,
                             const mask_stage_params &p, const mask_rope &rope, const mask_kv &kv)
{
    if (m == 8 && nh == 2) scan_fast_launch_m<8, 2>(norm, grid, smem, st, p, rope, kv);
    else if (m == 8) scan_fast_launch_m<8, 1>(norm, grid, smem, st, p, rope, kv);
    else if (nh == 2) scan_fast_launch_m<4, 2>(norm, grid, smem, st, p, rope, kv);
    else scan_fast_launch_m<4, 1>(norm, grid, smem, st, p, rope, kv);
}

int cuda_hip_mask_estimate(const cuda_hip_args *a, const float *q_dev, int64_t pos0,
                           int64_t n_tok, int first_stage, cuda_hip_mask *m, cuda_hip_work *w,
                           void *stream)
{
    if (!a || !a->layer || !q_dev || !m || !w) return -EINVAL;
    const hip_layer_config *lc = a->layer;
    const cuda_kv_view *kv = &a->kv;
    const int64_t T = kv->n_kv;
    if (n_tok < 1 || pos0 < 0 || T < pos0 + n_tok || cuda_kv_check(kv, false)) return -EINVAL;
    const int H = a->shape.n_head, Hkv = a->shape.n_head_kv, d = a->shape.head_dim;
    if (H < 1 || Hkv < 1 || H % Hkv || H > MASK_MAX_HEADS || d < 1 || d > MASK_MAX_HEAD_DIM ||
        a->block_size_q < 1 || a->block_size_k < 1)
        return -EINVAL;
    if (kv->dtype != CUDA_KV_BF16 && kv->dtype != CUDA_KV_FP8) return -EINVAL;
    const int S = lc->n_stages;
    if (S < 1 || S > HIP_MAX_STAGES) return -EINVAL;
    const int64_t bq = a->block_size_q, n_qblk = (n_tok + bq - 1) / bq;
    if (n_qblk > m->max_qblk || n_qblk > 65535 || m->n_stages != S ||
        m->kb != (int)(lc->second_stage_k / lc->stages[S - 1].chunk_size))
        return -EINVAL;
    for (int s = 0; s < S; s++) {
        const hip_stage *st = &lc->stages[s];
        if (st->block_size_q != bq || st->block_stride_q < 1 || st->chunk_size < 1) return -EINVAL;
        if (s > 0 && m->cand_cap[s] != (int)(st->stage_k / lc->stages[s - 1].chunk_size *
                                             (lc->stages[s - 1].chunk_size / st->chunk_size)))
            return -EINVAL;
    }
    if (first_stage < 0 || first_stage > S || (first_stage > 0 && n_qblk != 1)) return -EINVAL;
    if (first_stage == S) return 0; /* reuse the final lists as they are */
    const cuda_rope *cr = a->rope;
    if (cr && (!cr->inv_freq_dev || cr->head_dim != d || cr->n_rot < 2 || cr->n_rot > d ||
               (cr->n_rot & 1)))
        return -EINVAL;
    cudaStream_t st = (cudaStream_t)stream;

    const int64_t n_sink = lc->sink_token_size, n_stream = lc->sliding_window_size;
    const int64_t lc0 = lc->stages[0].chunk_size, sw = n_stream - lc0;
    const int64_t n0 = T - n_sink - n_stream > 0 ? (T - n_sink - n_stream + lc0 - 1) / lc0 : 0;
    if (n0 > INT32_MAX) return -EINVAL;

    /* per-stage upper bounds and buffer sizes */
    int64_t ub[HIP_MAX_STAGES], max_ub = 1, max_rows = 1;
    for (int s = first_stage; s < S; s++) {
        ub[s] = s == 0 ? n0 : m->cand_cap[s];
        max_ub = ub[s] > max_ub ? ub[s] : max_ub;
        int64_t rmax = (bq + lc->stages[s].block_stride_q - 1) / lc->stages[s].block_stride_q;
        max_rows = rmax > max_rows ? rmax : max_rows;
    }
    float *rows = (float *)cuda_hip_work_get(
        w, SLOT_ROWS, sizeof(float) * (size_t)n_qblk * (size_t)H * (size_t)max_rows * (size_t)d);
    float *score = (float *)cuda_hip_work_get(w, SLOT_SCORE, sizeof(float) * (size_t)n_qblk * (size_t)max_ub);
    int64_t *rep = (int64_t *)cuda_hip_work_get(w, SLOT_REP, sizeof(int64_t) * (size_t)n_qblk * (size_t)max_ub);
    if (!rows || !score || !rep) return -ENOMEM;

    /* scan kernel: the fast one where it applies (2 heads per warp in lockstep), unless
     * IHIP_MASK_SCAN=old (scan_kernel) or IHIP_MASK_SCAN=fast1 (1 head per warp) */
    int fast = 0, nh = 2;
    bool norm = false;
    /* prefill (n_tok > 1) with IHIP_MASK_PREFILL=mma or mma0: the tensor-core scan
     * (hip-mask-mma.cuh, bf16 dots, not bit-exact) where it applies. mma0: stage 0 only. mma:
     * every stage in layers pruned with relative positions, stage 0 only in chunk-indexed ones
     * (the special layers): there, bf16 scores in the later stages (8-token chunks, many
     * near-ties) kept only 0.63-0.77 of the exact lists on the H200 (2026-11-28), below what the
     * CPU reference itself keeps under a 2^-8 perturbation of the queries. */
    int mma_stages = 0;
    bool mmr = false;
    int mmr_sb = 32;
    bool mmr_a0r = true;
    {
        const char *e = getenv("IHIP_MASK_SCAN");
        const bool want_old = e && strcmp(e, "old") == 0;
        if (e && strcmp(e, "fast1") == 0) nh = 1;
        const bool rope_ok = !cr || (a->using_extend && (cr->style != CPU_ROPE_NEOX || cr->n_rot == d));
        if (!want_old && rope_ok && (d == 64 || d == 128)) fast = d / 16;
        /* every pair NORM-rotated by fmaddsub (scan_fast_kernel's branch-free form) */
        norm = cr && cr->style != CPU_ROPE_NEOX && cr->n_rot == d && (cr->n_rot / 2) % 4 == 0;
        const char *em = getenv("IHIP_MASK_PREFILL");
        if (em && n_tok > 1 && rope_ok && (d == 64 || d == 128)) {
            if (strcmp(em, "mma") == 0) mma_stages = lc->scan_rope == HIP_SCAN_CHUNK ? 1 : S;
            else if (strcmp(em, "mma0") == 0) mma_stages = 1;
        }
        /* relative pruning positions with no RoPE or `norm` (its stages with several m-tiles
         * rotate keys in that form): the mma stages rotate the probe rows instead of the keys
         * (scan_mmr_kernel) unless IHIP_MASK_MMR=0 */
        const char *er = getenv("IHIP_MASK_MMR");
        mmr = mma_stages > 0 && lc->scan_rope == HIP_SCAN_RELATIVE && (!cr || norm) &&
              !(er && strcmp(er, "0") == 0);
        /* its CTA order: super-blocks of this many groups of 8 chunks (IHIP_MASK_MMR_SB, 1..64):
         * the keys they probe are what the query blocks in flight share through L2 */
        const char *es = getenv("IHIP_MASK_MMR_SB");
        if (es) {
            const int v = atoi(es);
            if (v >= 1 && v <= 64) mmr_sb = v;
        }
        /* IHIP_MASK_MMR_A0R=0: stage 0 reads its first fragment set from shared memory (16 warps
         * per SM) instead of registers (12) — 1.06x slower on the H200, kept to compare */
        const char *ea = getenv("IHIP_MASK_MMR_A0R");
        if (ea && strcmp(ea, "0") == 0) mmr_a0r = false;
    }
    /* A fragments of the mma scan, sized for the stage with the most probe rows (allocated
     * before any launch: a growing slot is freed and reallocated) */
    uint4 *frag = NULL;
    if (mma_stages > 0) {
        const size_t n_frag = (size_t)n_qblk * (size_t)H * (size_t)((max_rows + 15) / 16) * 32 * (size_t)(d / 16);
        frag = (uint4 *)cuda_hip_work_get(w, SLOT_FRAG, sizeof(uint4) * n_frag * (mmr ? 2 : 1));
        if (!frag) return -ENOMEM;
    }
    /* scan_mmr_kernel's per-KV-group results */
    mm_part *part = NULL;
    if (mmr) {
        part = (mm_part *)cuda_hip_work_get(w, SLOT_PART, sizeof(mm_part) * (size_t)Hkv * (size_t)n_qblk * (size_t)max_ub);
        if (!part) return -ENOMEM;
    }
    mask_prof prof;
    prof_begin(&prof, st);

    mask_rope rope;
    memset(&rope, 0, sizeof(rope));
    if (cr) {
        rope.on = 1;
        rope.style = cr->style;
        rope.half = cr->n_rot / 2;
        rope.n_rot = cr->n_rot;
        rope.inv_freq = cr->inv_freq_dev;
        int64_t need;
        if (!a->using_extend) need = T;
        else if (lc->scan_rope == HIP_SCAN_RELATIVE) need = sw + 2;
        else need = max_ub + sw + 1;
        if (need < 2) need = 2;
        if (need > MASK_ROPE_TAB_MAX) need = MASK_ROPE_TAB_MAX;
        float2 *tab = (float2 *)cuda_hip_work_get(w, SLOT_TAB, sizeof(float2) * (size_t)need * (size_t)rope.half);
        if (!tab) return -ENOMEM;
        rope.tab = tab;
        rope.tab_n = need;
        int64_t tot = need * rope.half;
        rope_tab_kernel<<<(unsigned)((tot + 255) / 256), 256, 0, st>>>(tab, rope.inv_freq, rope.half, need);
        int rc = mask_fail_launch("rope_tab_kernel");
        if (rc) return rc;
    }
    prof_mark(&prof, st);

    mask_kv mkv;
    mkv.a = cuda_kv_addr_of(kv, Hkv, d, kv->dtype == CUDA_KV_BF16 ? 2 : 1);
    mkv.dtype = kv->dtype;
    mkv.k_scale = kv->dtype == CUDA_KV_FP8 ? kv->k_scale : 1.0f;
    mkv.pc = NULL;
    if (kv->pc_dev && kv->pc_ok_dev && cuda_pc_lc_ok(kv->pc_lc) && kv->pc_chunks > 0) {
        mkv.pc = (const uint8_t *)kv->pc_dev;
        mkv.pc_ok = kv->pc_ok_dev;
        mkv.pc_base = kv->pc_base;
        mkv.pc_chunks = kv->pc_chunks;
        mkv.pc_lc = kv->pc_lc;
    }

    int prev_stride = -1, frag_state = 0; /* frag_state: 1 / 2 = frag holds the first / both sets */
    for (int s = first_stage; s < S; s++) {
        const hip_stage *hs = &lc->stages[s];
        mask_stage_params p;
        memset(&p, 0, sizeof(p));
        p.pos0 = pos0;
        p.n_tok = n_tok;
        p.T = T;
        p.bq = (int)bq;
        p.H = H;
        p.Hkv = Hkv;
        p.G = H / Hkv;
        p.d = d;
        p.scale = a->shape.scale;
        p.using_extend = a->using_extend;
        p.relative = lc->scan_rope == HIP_SCAN_RELATIVE;
        p.score_bf16 = a->score_bf16;
        p.n_sink = n_sink;
        p.sw = sw;
        p.lc0 = lc0;
        p.stride = hs->block_stride_q;
        p.rmax = (int)((bq + p.stride - 1) / p.stride);
        p.ub = ub[s];
        p.n0 = n0;
        p.cnt = s == 0 ? NULL : m->cand_n_dev[s];
        p.L = s == 0 ? NULL : m->cand_L_dev[s];
        p.R = s == 0 ? NULL : m->cand_R_dev[s];
        p.rows = rows;
        p.score = score;
        p.rep = rep;

        /* the probe rows of the previous stage serve again when they are the same rows: same
         * pooling stride, and the queries' pruning position does not depend on the stage (true
         * positions, or the relative mode) — stages 0 and 1 of the default configuration */
        const bool same_rows =
            s > first_stage && hs->block_stride_q == prev_stride && (!p.using_extend || p.relative);
        prev_stride = hs->block_stride_q;
        int rc = 0;
        if (!same_rows) {
            prep_kernel<<<dim3((unsigned)n_qblk, (unsigned)H), 128, 0, st>>>(p, rope, q_dev);
            rc = mask_fail_launch("prep_kernel");
            if (rc) return rc;
        }
        prof_mark(&prof, st);
        if (ub[s] > 0) {
            if (ub[s] > INT32_MAX) return -EINVAL;
            const dim3 grid((unsigned)ub[s], (unsigned)n_qblk);
            const size_t fsm = 16 * (size_t)H;
            if (s < mma_stages) {
                const int64_t n_grp = (ub[s] + MMA_CH - 1) / MMA_CH;
                if (n_grp * n_qblk > INT32_MAX) return -EINVAL;
                const unsigned mgrid = (unsigned)(n_grp * n_qblk);
                const size_t msm = 16 * (size_t)H * MMA_CH;
                const int MT = (p.rmax + 15) / 16;
                const int64_t n_units = n_qblk * H * MT * 32;
                const unsigned fgrid = (unsigned)((n_units + 255) / 256);
                const bool fp8 = kv->dtype == CUDA_KV_FP8;
                if (mmr) {
                    /* one m-tile of probe rows: rows rotated (second fragment set); several:
                     * keys rotated (the fragment traffic would double) */
                    const bool rowrot = MT == 1;
                    /* super-blocks of mmr_sb groups of 8 chunks, in CTAs of 64 */
                    const int sbw = (mmr_sb + MMR_NG - 1) / MMR_NG;
                    /* stage 0 (many passes per chunk): both fragment sets in registers */
                    const bool a0r = rowrot && s == 0 && mmr_a0r;
                    /* the fragments of the same rows made for the previous stage serve again */
                    const int fstate = rowrot ? 2 : 1;
                    const bool fresh = !(same_rows && frag_state == fstate);
                    frag_state = fstate;
                    if (d == 128) {
                        if (fresh) frag_kernel<4><<<fgrid, 256, 0, st>>>(p, frag, MT, (int)n_qblk, rope, rowrot);
                        rc = scan_mmr_launch<4>(fp8, rowrot, a0r, st, p, rope, mkv, frag, part, MT, (int)n_qblk, sbw);
                    } else {
                        if (fresh) frag_kernel<2><<<fgrid, 256, 0, st>>>(p, frag, MT, (int)n_qblk, rope, rowrot);
                        rc = scan_mmr_launch<2>(fp8, rowrot, a0r, st, p, rope, mkv, frag, part, MT, (int)n_qblk, sbw);
                    }
                    if (rc) return rc;
                } else if (d == 128) {
                    frag_state = 0;
                    frag_kernel<4><<<fgrid, 256, 0, st>>>(p, frag, MT, (int)n_qblk, rope, 0);
                    scan_mma_launch<4>(norm, fp8, mgrid, msm, st, p, rope, mkv, frag, MT, n_grp, (int)n_qblk);
                } else {
                    frag_state = 0;
                    frag_kernel<2><<<fgrid, 256, 0, st>>>(p, frag, MT, (int)n_qblk, rope, 0);
                    scan_mma_launch<2>(norm, fp8, mgrid, msm, st, p, rope, mkv, frag, MT, n_grp, (int)n_qblk);
                }
            } else if (fast) {
                scan_fast_launch(fast, nh, norm, grid, fsm, st, p, rope, mkv);
            } else {
                size_t smem = 16 * (size_t)H + sizeof(float) * 2 * (size_t)d * MASK_SCAN_WARPS;
                scan_kernel<<<grid, MASK_SCAN_WARPS * 32, smem, st>>>(p, rope, mkv);
            }
            rc = mask_fail_launch("scan_kernel");
            if (rc) return rc;
        }
        prof_mark(&prof, st);

        mask_select_params sp;
        memset(&sp, 0, sizeof(sp));
        sp.score = score;
        sp.rep = rep;
        sp.ub = ub[s];
        sp.n0 = n0;
        sp.cnt = p.cnt;
        sp.pos0 = pos0;
        sp.bq = (int)bq;
        int64_t kmax;
        if (s < S - 1) {
            const int64_t lcs = hs->chunk_size, lcn = lc->stages[s + 1].chunk_size;
            sp.k_keep = lc->stages[s + 1].stage_k / lcs;
            sp.final = 0;
            sp.n_sink = n_sink;
            sp.lcs = lcs;
            sp.split = (int)(lcs / lcn);
            sp.outL = m->cand_L_dev[s + 1];
            sp.outR = m->cand_R_dev[s + 1];
            sp.out_n = m->cand_n_dev[s + 1];
            sp.out_cap = m->cand_cap[s + 1];
        } else {
            sp.k_keep = m->kb;
            sp.final = 1;
            sp.bk = a->block_size_k;
            sp.idx = m->idx_dev;
            sp.ks = m->ks_dev;
            sp.kb = m->kb;
        }
        kmax = sp.k_keep < ub[s] ? sp.k_keep : ub[s];
        if (kmax < 0) kmax = 0;
        if (kmax > MASK_SELECT_MAX_P) {
            fprintf(stderr, "cuda_hip_mask_estimate: stage %d keeps %lld chunks (max %d)\n", s,
                    (long long)kmax, MASK_SELECT_MAX_P);
            return -EINVAL;
        }
        sp.P = next_pow2(kmax > 1 ? kmax : 1);
        size_t smem = sizeof(int64_t) * (size_t)sp.P;
        if (smem > 48 * 1024)
            CUDA_TRY(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)smem));
        select_kernel<<<(unsigned)n_qblk, MASK_SELECT_THREADS, smem, st>>>(sp);
        rc = mask_fail_launch("select_kernel");
        if (rc) return rc;
        prof_mark(&prof, st);
    }
    m->n_qblk = (int)n_qblk;
    m->pos0 = pos0;
    if (prof.on) prof_report(&prof, T, n_qblk, first_stage, S, ub, mma_stages ? 3 : fast ? nh : 0);
    return 0;
}
