/*
 * attn-kernels.cuh — the attention kernels shared by attn-dense.cu (dense causal attention) and
 * attn-bsa.cu (HiP block-sparse attention). Not a public header.
 *
 * Both operations walk a LIST of keys: logical index n -> (token t, rotation position vpos, set).
 * Dense: t = vpos = n for n in [0, p]. BSA (shared/HIP.md §3, hip-bsa.c): sink, then the ks
 * selected blocks of bk tokens (masked tokens keep their slot and are marked invalid), then the
 * window; vpos follows the "streaming" layout when using_extend. A key is valid for a query at
 * p when: window keys p - n_stream < t <= p; sink/selected keys t <= p - n_stream; dense t <= p.
 *
 * Decode (one query): grid (split, KV head), 4 warps. A key row is read by D/8 lanes with
 * 16-byte loads (bf16) or 8-byte loads (fp8); every lane keeps the G queries of the KV group in
 * registers so one K/V load serves all query heads of the group. Each lane group runs its own
 * online softmax; groups, warps and splits are merged with log-sum-exp (partials -> merge
 * kernel). Keys are rotated in registers: dense keys use a two-level cos/sin table (64 low
 * positions per block in shared memory x one exact row per 64-key chunk per warp), BSA keys
 * are rotated by their distance to the query (vpos - p; the query stays unrotated), from a
 * cos/sin table of distances < AK_CS_POS (ak_cs_table) or directly beyond (v1: absolute
 * angles, computed directly).
 *
 * K/V rows are found through ak_rows -> cuda_kv_rows (cuda-hip-impl.h), the one place that
 * knows the three addressings of cuda_kv_view (contiguous, slot pages, page pointers).
 *
 * Prefill (many queries): FlashAttention-2-style fp32 tiles: 64 rows (queries x heads of the
 * group) x 64 keys per step, 256 threads each owning 4x4 scores and 4 rows x D/16 outputs.
 */
#ifndef ATTN_KERNELS_CUH
#define ATTN_KERNELS_CUH

#include "cuda-hip-impl.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ATTN_NW 4       /* warps per decode block */
#define ATTN_CHUNK 64   /* keys per decode chunk (one warp) and per prefill tile */
#define ATTN_ROWS 64    /* prefill rows (query x head) per block */
#define ATTN_PF_THREADS 256

enum { AK_SINK = 0, AK_SEL = 1, AK_WIN = 2, AK_DENSE = 3, AK_NONE = 4 };

/* Everything a kernel needs about K/V, RoPE and the BSA key list. Passed by value. */
struct attn_params {
    /* K/V: addressing (cuda_kv_rows), element type */
    cuda_kv_addr kv;
    int dtype;
    float k_scale, v_scale;
    long long T;
    int hkv, d, H, G;
    float scale;
    /* RoPE (inv_freq NULL = none) */
    const double *inv_freq;
    int rope_style, n_rot;
    /* queries / output */
    const float *q;
    float *out;
    long long pos0, n_tok;
    /* BSA */
    const long long *idx; /* [max_qblk][kb] */
    const int32_t *ks;
    int kb, bk, bq;
    long long n_sink, n_stream;
    int using_extend;
    /* decode split-K */
    int n_split;
    long long keys_per_split;
    float2 *part_ml;  /* [H][n_split] (m, l) */
    float *part_acc;  /* [H][n_split][D] */
    /* BSA decode: cos/sin of positions < AK_CS_POS (NULL = none), cs_tab[pos][n_rot/2], and
     * the inv_freq it was built from (a frequency whose copy differs is computed directly) */
    const float2 *cs_tab;
    const double *cs_freq;
};

#define AK_CS_POS 16384 /* positions of the BSA decode cos/sin table */
#define AK_CS_MAXF 64   /* frequencies kept in its header (n_rot <= 128) */

/* ---- small device helpers ------------------------------------------------------------------- */

/* Byte addresses of the K and V rows (element 0) of token t, KV head g: any of the three
 * addressings of cuda_kv_view (cuda-hip-impl.h, cuda_kv_rows). */
static __device__ __forceinline__ void ak_rows(const attn_params &P, long long t, int g,
                                               const uint8_t **kp, const uint8_t **vp)
{
    cuda_kv_rows(P.kv, t, g, kp, vp);
}

static __device__ __forceinline__ float ak_fp8(uint32_t b)
{
    uint32_t em = b & 0x7fu, sign = (b & 0x80u) << 24;
    float v = em >= 8u ? __uint_as_float((em + (120u << 3)) << 20) : (float)em * 0.001953125f;
    return __uint_as_float(__float_as_uint(v) | sign);
}

/* Raw 8 elements (16 bytes bf16 / 8 bytes fp8) at element e of a row from ak_rows, the dtype
 * fixed at compile time (FP8) or taken from P. */
template <bool FP8>
static __device__ __forceinline__ uint4 ak_load_raw_t(const uint8_t *row, int e)
{
    if (!FP8) return __ldg((const uint4 *)((const uint16_t *)row + e));
    uint2 r = __ldg((const uint2 *)(row + e));
    return make_uint4(r.x, r.y, 0u, 0u);
}

static __device__ __forceinline__ uint4 ak_load_raw(const attn_params &P, const uint8_t *row, int e)
{
    return P.dtype == CUDA_KV_BF16 ? ak_load_raw_t<false>(row, e) : ak_load_raw_t<true>(row, e);
}

/* The 8 elements of ak_load_raw as floats (fp8: times scale). */
template <bool FP8>
static __device__ __forceinline__ void ak_unpack_t(uint4 r, float scale, float x[8])
{
    if (!FP8) {
        uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            x[2 * j] = __uint_as_float(w[j] << 16);
            x[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
    } else {
        uint32_t w[2] = {r.x, r.y};
#pragma unroll
        for (int j = 0; j < 8; j++) x[j] = ak_fp8((w[j >> 2] >> (8 * (j & 3))) & 0xffu) * scale;
    }
}

static __device__ __forceinline__ void ak_unpack(const attn_params &P, uint4 r, float scale,
                                                 float x[8])
{
    if (P.dtype == CUDA_KV_BF16) ak_unpack_t<false>(r, scale, x);
    else ak_unpack_t<true>(r, scale, x);
}

/* cos/sin of pos * inv_freq: the angle in double, reduced to [-pi, pi] before the float sincos. */
static __device__ __forceinline__ void ak_cs(double inv_freq, long long pos, float *c, float *s)
{
    double th = (double)pos * inv_freq;
    double k = rint(th * 0.15915494309189535);
    double r = fma(-k, 6.283185307179586, th);
    r = fma(-k, 2.4492935982947064e-16, r);
    sincosf((float)r, s, c);
}

/* Rotation of element e: its frequency (-1 = passes through), whether it is the first of its
 * pair, and its partner element. */
static __device__ __forceinline__ int ak_freq(const attn_params &P, int e, bool *first, int *partner)
{
    int half = P.n_rot / 2;
    *first = true;
    *partner = e;
    if (!P.inv_freq || e >= P.n_rot) return -1;
    if (P.rope_style == CPU_ROPE_NEOX) {
        if (e < half) {
            *partner = e + half;
            return e;
        }
        *first = false;
        *partner = e - half;
        return e - half;
    }
    *first = !(e & 1);
    *partner = e ^ 1;
    return e >> 1;
}

/* x' of one element given its partner value b and cos/sin (same formula as cpu_rope_apply). */
static __device__ __forceinline__ float ak_rot(float x, float b, bool first, float c, float s)
{
    return first ? x * c - b * s : b * s + x * c;
}

/* ---- the BSA key list of one query block ------------------------------------------------------ */

struct ak_blk {
    long long p0, plast, thr, base, n_sink_eff, n_sel, w0, n_win, n;
    const long long *idx;
};

static __host__ __device__ __forceinline__ ak_blk ak_bsa_block(const attn_params &P, int b)
{
    ak_blk k;
    k.p0 = P.pos0 + (long long)b * P.bq;
    long long end = P.pos0 + P.n_tok;
    k.plast = (k.p0 + P.bq < end ? k.p0 + P.bq : end) - 1;
    k.thr = k.plast - P.n_stream;
    long long ks = P.ks[b];
    if (ks < 0) ks = 0;
    if (ks > P.kb) ks = P.kb;
    k.n_sel = ks * P.bk;
    k.base = k.p0 + 1 - P.n_stream - k.n_sel;
    long long ns = P.n_sink;
    if (ns > k.thr + 1) ns = k.thr + 1;
    if (ns > P.T) ns = P.T;
    k.n_sink_eff = ns > 0 ? ns : 0;
    k.w0 = k.p0 - P.n_stream + 1 > 0 ? k.p0 - P.n_stream + 1 : 0;
    k.n_win = k.plast - k.w0 + 1;
    k.n = k.n_sink_eff + k.n_sel + k.n_win;
    k.idx = P.idx + (size_t)b * (size_t)P.kb;
    return k;
}

/* The selection slot (index into k.idx) that logical key n of block k reads, or -1 (not a
 * selected key). n < n_sel = ks * bk (a few thousand): 32-bit, not the 64-bit division. */
static __host__ __device__ __forceinline__ long long ak_bsa_slot(const attn_params &P, const ak_blk &k, long long n)
{
    n -= k.n_sink_eff;
    if (n < 0 || n >= k.n_sel) return -1;
    return (long long)((unsigned)n / (unsigned)P.bk);
}

/* Logical key n of block k given s = k.idx[ak_bsa_slot(n)] (anything when the slot is -1):
 * token, rotation position, set (AK_NONE = masked / out of list). Split from the load so a
 * pipelined kernel can load s a step ahead. */
static __host__ __device__ __forceinline__ int ak_bsa_key_s(const attn_params &P, const ak_blk &k, long long n,
                                                   long long s, long long *t, long long *vpos)
{
    *t = 0;
    *vpos = 0;
    if (n < 0) return AK_NONE;
    if (n < k.n_sink_eff) {
        *t = n;
        long long v = k.base - P.n_sink + n;
        *vpos = P.using_extend ? (v > 0 ? v : 0) : n;
        return AK_SINK;
    }
    n -= k.n_sink_eff;
    if (n < k.n_sel) {
        const unsigned un = (unsigned)n, ui = un / (unsigned)P.bk;
        const long long j = (long long)(un - ui * (unsigned)P.bk);
        if (s < 0 || s >= P.T) return AK_NONE;
        long long tt = s + j;
        if (tt < P.n_sink || tt > k.thr || tt >= P.T) return AK_NONE;
        *t = tt;
        long long v = k.base + n;
        *vpos = P.using_extend ? (v > 0 ? v : 0) : tt;
        return AK_SEL;
    }
    n -= k.n_sel;
    if (n < k.n_win) {
        *t = k.w0 + n;
        *vpos = *t;
        return AK_WIN;
    }
    return AK_NONE;
}

/* Logical key n of block k: token, rotation position, set (AK_NONE = masked / out of list). */
static __host__ __device__ __forceinline__ int ak_bsa_key(const attn_params &P, const ak_blk &k, long long n,
                                                 long long *t, long long *vpos)
{
    const long long slot = ak_bsa_slot(P, k, n);
    return ak_bsa_key_s(P, k, n, slot >= 0 ? k.idx[slot] : 0, t, vpos);
}

static __host__ __device__ __forceinline__ bool ak_valid(const attn_params &P, int set, long long t, long long p)
{
    switch (set) {
    case AK_DENSE: return t <= p;
    case AK_WIN: return t > p - P.n_stream && t <= p;
    case AK_SINK:
    case AK_SEL: return t <= p - P.n_stream;
    default: return false;
    }
}

/* ---- decode: split-K over the key list ---------------------------------------------------------- */

/* Sum x[0..N) over the aligned group of 2*O lanes that holds the caller (every lane of the group
 * ends with the same sums). Reduce-scatter then all-gather: each halving step exchanges half of
 * the values, so N values over 16 lanes cost 2*(N/2 + N/4 + ...) shuffles instead of 4*N. */
template <int NV, int N, int O>
static __device__ __forceinline__ void ak_allsum(float (&x)[NV], int lane)
{
    if constexpr (O == 0) {
        return;
    } else if constexpr (N == 1) {
        x[0] += __shfl_xor_sync(0xffffffffu, x[0], O);
        ak_allsum<NV, 1, O / 2>(x, lane);
    } else {
        const bool up = (lane & O) != 0; /* keeps the upper half */
#pragma unroll
        for (int i = 0; i < N / 2; i++) {
            float a = x[i], b = x[i + N / 2];
            float send = up ? a : b;
            x[i] = (up ? b : a) + __shfl_xor_sync(0xffffffffu, send, O);
        }
        ak_allsum<NV, N / 2, O / 2>(x, lane);
#pragma unroll
        for (int i = 0; i < N / 2; i++) {
            float mine = x[i], other = __shfl_xor_sync(0xffffffffu, mine, O);
            x[i] = up ? other : mine;
            x[i + N / 2] = up ? mine : other;
        }
    }
}

/* V2 (default; IHIP_ATTN_DECODE=v1 selects the first version): scores reduced with ak_allsum,
 * NORM keys rotated without shuffles, cos/sin tables stored so that the 16 lanes of a key read
 * consecutive entries (no bank conflicts), the query angles computed once for all heads, and
 * BSA splits made of one-step chunks (KPW * U keys per warp chunk, several times the blocks). */
template <int D, int MAXG, bool DENSE, bool V2, bool PRE>
static __device__ __forceinline__ void ak_decode_body(const attn_params &P)
{
    constexpr int LPK = D / 8;        /* lanes per key */
    constexpr int KPW = 32 / LPK;     /* keys per warp step */
    constexpr int U = MAXG >= 8 ? 2 : 4; /* keys per lane group per step */
    constexpr int CH = (V2 && !DENSE) ? KPW * U : ATTN_CHUNK; /* keys per warp chunk */
    static_assert(CH % (KPW * U) == 0, "chunk must hold whole steps");
    extern __shared__ float4 ak_smem4[];
    float *smem = (float *)ak_smem4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gi = lane / LPK, lg = lane % LPK, e0 = lg * 8;
    const int g = blockIdx.y, split = blockIdx.x;
    const int G = P.G, half = P.n_rot / 2;
    const long long p = P.pos0; /* the query position */

    long long n_keys;
    ak_blk blk = {};
    if (DENSE) {
        n_keys = p + 1;
    } else {
        blk = ak_bsa_block(P, 0);
        n_keys = blk.n;
    }
    const long long lo = (long long)split * P.keys_per_split;
    long long hi = lo + P.keys_per_split;
    if (hi > n_keys) hi = n_keys;

    /* tables: dense only. lo table [64][half] float2, per-warp hi row [NW][half] float2 */
    float2 *tab_lo = (float2 *)smem;
    float2 *tab_hi = tab_lo + ATTN_CHUNK * half;
    /* V2 stores frequency f at slot (f % PF) * (half / PF) + f / PF, PF = frequencies per lane */
    int PF = 1;
    if (V2) {
        PF = P.rope_style == CPU_ROPE_NEOX ? 8 : 4;
        if (half % PF) PF = 1;
    }
    const int hpf = half / (PF > 0 ? PF : 1);
    if (DENSE && P.inv_freq) {
        for (int i = threadIdx.x; i < ATTN_CHUNK * half; i += blockDim.x) {
            float c, s;
            int f = i % half, r = i / half;
            ak_cs(P.inv_freq[f], r, &c, &s);
            tab_lo[r * half + (f % PF) * hpf + f / PF] = make_float2(c, s);
        }
        __syncthreads();
    }

    /* rotation layout of my 8 elements */
    int fq[8], ts[8];
    bool first[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int partner;
        fq[j] = ak_freq(P, e0 + j, &first[j], &partner);
        ts[j] = fq[j] < 0 ? 0 : (fq[j] % PF) * hpf + fq[j] / PF;
    }
    /* BSA: my frequencies come from the table when it was built from the same inv_freq */
    bool use_tab = false;
    if (!DENSE && V2 && P.cs_tab && P.inv_freq) {
        use_tab = true;
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (fq[j] >= 0 && __double_as_longlong(P.cs_freq[fq[j]]) !=
                                  __double_as_longlong(P.inv_freq[fq[j]]))
                use_tab = false;
    }
    int h8 = half / 8;
    int src_lane = gi * LPK + (lg < h8 ? lg + h8 : (lg < 2 * h8 ? lg - h8 : lg));
    const bool neox = P.rope_style == CPU_ROPE_NEOX;

    /* queries of the group, rotated at p and scaled */
    float q[MAXG][8];
    if (V2) { /* the angles of p once for all heads (NORM pairs share theirs) */
        float cq[8], sq[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            cq[j] = 1.0f;
            sq[j] = 0.0f;
            if (fq[j] < 0) continue;
            if (!DENSE) continue; /* BSA: keys rotated by vpos - p, the query not at all */
            if (!neox && (j & 1)) {
                cq[j] = cq[j - 1];
                sq[j] = sq[j - 1];
            } else {
                ak_cs(P.inv_freq[fq[j]], p, &cq[j], &sq[j]);
            }
        }
#pragma unroll
        for (int hh = 0; hh < MAXG; hh++) {
            int h = g * G + (hh < G ? hh : 0);
            const float *qr = P.q + (size_t)h * D;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                bool f;
                int partner;
                float x = qr[e0 + j];
                if (ak_freq(P, e0 + j, &f, &partner) >= 0)
                    x = ak_rot(x, qr[partner], f, cq[j], sq[j]);
                q[hh][j] = hh < G ? x * P.scale : 0.0f;
            }
        }
    } else {
#pragma unroll
        for (int hh = 0; hh < MAXG; hh++) {
            int h = g * G + (hh < G ? hh : 0);
            const float *qr = P.q + (size_t)h * D;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int e = e0 + j;
                float x = qr[e];
                bool f;
                int partner;
                int fi = ak_freq(P, e, &f, &partner);
                if (fi >= 0) {
                    float c, s;
                    ak_cs(P.inv_freq[fi], p, &c, &s);
                    x = ak_rot(x, qr[partner], f, c, s);
                }
                q[hh][j] = hh < G ? x * P.scale : 0.0f;
            }
        }
    }

    float m[MAXG], l[MAXG], acc[MAXG][8];
#pragma unroll
    for (int hh = 0; hh < MAXG; hh++) {
        m[hh] = -INFINITY;
        l[hh] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[hh][j] = 0.0f;
    }

    const long long c_first = lo / CH, c_end = (hi + CH - 1) / CH;
    for (long long ch = c_first + warp; ch < c_end && lo < hi; ch += ATTN_NW) {
        const long long cbase = ch * CH;
        if (DENSE && P.inv_freq) {
            __syncwarp();
            for (int i = lane; i < half; i += 32) {
                float c, s;
                ak_cs(P.inv_freq[i], cbase, &c, &s);
                tab_hi[warp * half + (i % PF) * hpf + i / PF] = make_float2(c, s);
            }
            __syncwarp();
        }
        /* the keys of one step from logical key nb: validity, rotation position, raw K/V */
        auto load_step = [&](long long nb, uint4(&kr)[U], uint4(&vr)[U], bool(&ok)[U],
                             long long(&vp)[U]) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                long long n = nb + u * KPW + gi, t = n, vpos = n;
                int set = AK_DENSE;
                if (n < lo || n >= hi) set = AK_NONE;
                else if (!DENSE) set = ak_bsa_key(P, blk, n, &t, &vpos);
                ok[u] = set != AK_NONE && ak_valid(P, set, t, p);
                vp[u] = vpos;
                if (ok[u]) {
                    const uint8_t *kp, *vq;
                    ak_rows(P, t, g, &kp, &vq);
                    kr[u] = ak_load_raw(P, kp, e0);
                    vr[u] = ak_load_raw(P, vq, e0);
                } else {
                    kr[u] = make_uint4(0u, 0u, 0u, 0u);
                    vr[u] = kr[u];
                }
            }
        };
        uint4 kr[U], vr[U];
        bool ok[U];
        long long vp[U];
        if (PRE) load_step(cbase, kr, vr, ok, vp);
        for (int it = 0; it < CH; it += KPW * U) {
            /* PRE: the next step's loads are issued before this step's math (twice the bytes in
             * flight per warp); same keys, same arithmetic in the same order as without */
            uint4 nkr[U], nvr[U];
            bool nok[U];
            long long nvp[U];
            const bool more = it + KPW * U < CH;
            if (!PRE) load_step(cbase + it, kr, vr, ok, vp);
            else if (more) load_step(cbase + it + KPW * U, nkr, nvr, nok, nvp);
            float sc[U][MAXG];
#pragma unroll
            for (int u = 0; u < U; u++) {
                float k[8];
                ak_unpack(P, kr[u], P.k_scale, k);
                if (P.inv_freq) {
                    float pk[8];
                    if (V2 && !neox) { /* NORM partners are in the lane */
#pragma unroll
                        for (int j = 0; j < 8; j++) pk[j] = k[j ^ 1];
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; j++) {
                            float o = __shfl_sync(0xffffffffu, k[j], src_lane);
                            pk[j] = neox ? o : k[j ^ 1];
                        }
                    }
                    float c = 1.0f, s = 0.0f;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        if (fq[j] < 0) continue;
                        if (!neox && (j & 1)) { /* NORM: same angle as element j - 1 */
                            k[j] = ak_rot(k[j], pk[j], first[j], c, s);
                            continue;
                        }
                        if (DENSE) {
                            float2 a = tab_hi[warp * half + ts[j]];
                            float2 b = tab_lo[(int)(vp[u] - cbase) * half + ts[j]];
                            c = a.x * b.x - a.y * b.y;
                            s = a.y * b.x + a.x * b.y;
                        } else if (!V2) {
                            ak_cs(P.inv_freq[fq[j]], vp[u], &c, &s);
                        } else if (use_tab && p - vp[u] >= 0 && p - vp[u] < AK_CS_POS) {
                            /* angle of vpos - p = -(p - vpos): cos even, sin odd */
                            float2 a = __ldg(P.cs_tab + (size_t)(p - vp[u]) * half + fq[j]);
                            c = a.x;
                            s = -a.y;
                        } else {
                            ak_cs(P.inv_freq[fq[j]], vp[u] - p, &c, &s);
                        }
                        k[j] = ak_rot(k[j], pk[j], first[j], c, s);
                    }
                }
#pragma unroll
                for (int hh = 0; hh < MAXG; hh++) {
                    float d = 0.0f;
#pragma unroll
                    for (int j = 0; j < 8; j++) d = fmaf(q[hh][j], k[j], d);
                    if (!V2) {
#pragma unroll
                        for (int o = LPK / 2; o > 0; o >>= 1)
                            d += __shfl_xor_sync(0xffffffffu, d, o);
                    }
                    sc[u][hh] = d;
                }
            }
            if (V2) {
                float x[U * MAXG];
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int hh = 0; hh < MAXG; hh++) x[u * MAXG + hh] = sc[u][hh];
                ak_allsum<U * MAXG, U * MAXG, LPK / 2>(x, lane);
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int hh = 0; hh < MAXG; hh++) sc[u][hh] = x[u * MAXG + hh];
            }
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int hh = 0; hh < MAXG; hh++) sc[u][hh] = ok[u] ? sc[u][hh] : -INFINITY;
            float vv[U][8];
#pragma unroll
            for (int u = 0; u < U; u++) ak_unpack(P, vr[u], P.v_scale, vv[u]);
#pragma unroll
            for (int hh = 0; hh < MAXG; hh++) {
                float mx = m[hh];
#pragma unroll
                for (int u = 0; u < U; u++) mx = fmaxf(mx, sc[u][hh]);
                float mu = mx == -INFINITY ? 0.0f : mx;
                float corr = __expf(m[hh] - mu);
                l[hh] *= corr;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[hh][j] *= corr;
#pragma unroll
                for (int u = 0; u < U; u++) {
                    float pe = __expf(sc[u][hh] - mu);
                    l[hh] += pe;
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[hh][j] = fmaf(pe, vv[u][j], acc[hh][j]);
                }
                m[hh] = mx;
            }
            if (PRE && more) {
#pragma unroll
                for (int u = 0; u < U; u++) {
                    kr[u] = nkr[u];
                    vr[u] = nvr[u];
                    ok[u] = nok[u];
                    vp[u] = nvp[u];
                }
            }
        }
    }

    /* merge the lane groups of the warp */
#pragma unroll
    for (int hh = 0; hh < MAXG; hh++) {
        float mw = m[hh];
#pragma unroll
        for (int o = LPK; o < 32; o <<= 1) mw = fmaxf(mw, __shfl_xor_sync(0xffffffffu, mw, o));
        float f = mw == -INFINITY ? 0.0f : __expf(m[hh] - mw);
        float lw = l[hh] * f;
#pragma unroll
        for (int o = LPK; o < 32; o <<= 1) lw += __shfl_xor_sync(0xffffffffu, lw, o);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float a = acc[hh][j] * f;
#pragma unroll
            for (int o = LPK; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
            acc[hh][j] = a;
        }
        m[hh] = mw;
        l[hh] = lw;
    }
    /* merge the warps through shared memory (reusing the tables) */
    __syncthreads();
    float *wm = smem;                          /* [NW][MAXG] */
    float *wl = wm + ATTN_NW * MAXG;           /* [NW][MAXG] */
    float *wacc = wl + ATTN_NW * MAXG;         /* [NW][MAXG][D] */
    if (gi == 0) {
#pragma unroll
        for (int hh = 0; hh < MAXG; hh++) {
            if (lg == 0) {
                wm[warp * MAXG + hh] = m[hh];
                wl[warp * MAXG + hh] = l[hh];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) wacc[(warp * MAXG + hh) * D + e0 + j] = acc[hh][j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        int hh = i / D, e = i % D;
        float M = -INFINITY;
        for (int w = 0; w < ATTN_NW; w++) M = fmaxf(M, wm[w * MAXG + hh]);
        float L = 0.0f, A = 0.0f;
        if (M != -INFINITY)
            for (int w = 0; w < ATTN_NW; w++) {
                float mw = wm[w * MAXG + hh];
                if (mw == -INFINITY) continue;
                float f = __expf(mw - M);
                L += wl[w * MAXG + hh] * f;
                A += wacc[(w * MAXG + hh) * D + e] * f;
            }
        int h = g * G + hh;
        size_t r = (size_t)h * (size_t)P.n_split + (size_t)split;
        P.part_acc[r * D + e] = A;
        if (e == 0) P.part_ml[r] = make_float2(M, L);
    }
}

/* The kernels: MINB = 4 asks for 4 blocks per SM (<= 128 registers; v3). Without a minimum the
 * attribute is left out (ptxas allocates differently when a minimum of 1 is given). PRE: the
 * next step's K/V loads issued before the current step's math (v4). */
template <int D, int MAXG, bool DENSE, bool V2, int MINB, bool PRE>
__global__ void __launch_bounds__(ATTN_NW * 32) ak_decode_kernel(attn_params P)
{
    ak_decode_body<D, MAXG, DENSE, V2, PRE>(P);
}
template <int D, int MAXG, bool DENSE, bool V2>
__global__ void __launch_bounds__(ATTN_NW * 32, 4) ak_decode_kernel_mb4(attn_params P)
{
    ak_decode_body<D, MAXG, DENSE, V2, false>(P);
}
template <int D, int MAXG, bool DENSE, bool V2, int MINB, bool PRE>
static constexpr auto ak_decode_fn(void)
{
    if constexpr (MINB == 4) return ak_decode_kernel_mb4<D, MAXG, DENSE, V2>;
    else return ak_decode_kernel<D, MAXG, DENSE, V2, MINB, PRE>;
}

/* The BSA decode cos/sin table: tab[pos][f] = ak_cs(inv_freq[f], pos) for pos < AK_CS_POS, and
 * freq[f] = inv_freq[f] (the header the decode kernel checks). */
static __global__ void ak_cs_table_kernel(const double *inv_freq, int half, double *freq,
                                          float2 *tab)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < half) freq[i] = inv_freq[i];
    if (i >= (long long)AK_CS_POS * half) return;
    float c, s;
    ak_cs(inv_freq[i % half], i / half, &c, &s);
    tab[i] = make_float2(c, s);
}

/* BSA decode (v2) rotates each key by vpos - p and leaves the query unrotated (the same scores:
 * R(p)^T R(vpos) = R(vpos - p)). With the streaming layout every distance p - vpos is below
 * sink + selected + window (~8K), so the cos/sin of distances < AK_CS_POS come from a table
 * built once per (work, rope, device) on the work's stream (one work per stream: later calls
 * on it see the finished table); larger distances (no extend) are computed directly. Off with
 * IHIP_ATTN_CSTAB=0. Failures only leave the table out. */
static inline void ak_cs_table(attn_params *P, cuda_hip_work *w, int dev, cudaStream_t st)
{
    P->cs_tab = NULL;
    P->cs_freq = NULL;
    if (!P->inv_freq || P->n_rot / 2 > AK_CS_MAXF) return;
    const char *e = getenv("IHIP_ATTN_CSTAB");
    if (e && !strcmp(e, "0")) return;
    const int half = P->n_rot / 2;
    const size_t hdr = sizeof(double) * AK_CS_MAXF;
    void *buf = cuda_hip_work_get(w, CUDA_SLOT_ATTN0 + 2,
                                  hdr + sizeof(float2) * (size_t)AK_CS_POS * AK_CS_MAXF);
    if (!buf) {
        cudaGetLastError();
        return;
    }
    double *freq = (double *)buf;
    float2 *tab = (float2 *)((char *)buf + hdr);
    if (w->cs_key != (const void *)P->inv_freq || w->cs_nrot != P->n_rot || w->cs_dev != dev) {
        long long n = (long long)AK_CS_POS * half;
        ak_cs_table_kernel<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(P->inv_freq, half, freq,
                                                                         tab);
        if (cudaGetLastError() != cudaSuccess) {
            w->cs_key = NULL;
            return;
        }
        w->cs_key = P->inv_freq;
        w->cs_nrot = P->n_rot;
        w->cs_dev = dev;
    }
    P->cs_tab = tab;
    P->cs_freq = freq;
}

/* out[h][e] = sum_s acc_s e^{m_s - M} / sum_s l_s e^{m_s - M}; one block per head. The (m, l)
 * pairs are loaded once into shared memory (sf[s] = e^{m_s - M}, -inf = empty split) and the
 * partials are read 16 splits at a time (the last batch predicated) before the sums, so 16
 * loads are in flight per thread instead of one dependent load per split; the sums run over
 * the splits in order as before. Up to AK_MERGE_REG splits everything stays in registers
 * (same sums, same order; e^{m_s - M} computed per thread instead of once per block).
 * Dynamic shared memory: (2 * n_split + 32) floats (ak_merge_smem). */
#define AK_MERGE_BATCH 16
#define AK_MERGE_REG 32 /* up to this many splits: the register path */
static inline size_t ak_merge_smem(int n_split)
{
    return sizeof(float) * (2 * (size_t)n_split + 32);
}

static __global__ void ak_merge_kernel(const float2 *part_ml, const float *part_acc, int n_split,
                                       int d, float *out)
{
    if (n_split <= AK_MERGE_REG) {
        /* few splits: every thread loads all (m, l) pairs (the same addresses in every thread)
         * and its partials at once, in registers: one round trip, no barrier */
        const int h = blockIdx.x;
        const float2 *ml = part_ml + (size_t)h * n_split;
        float2 v[AK_MERGE_REG];
#pragma unroll
        for (int s = 0; s < AK_MERGE_REG; s++)
            v[s] = s < n_split ? ml[s] : make_float2(-INFINITY, 0.0f);
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            const float *pa = part_acc + (size_t)h * n_split * d + e;
            float a[AK_MERGE_REG];
#pragma unroll
            for (int s = 0; s < AK_MERGE_REG; s++) a[s] = s < n_split ? pa[(size_t)s * d] : 0.0f;
            float M = -INFINITY;
#pragma unroll
            for (int s = 0; s < AK_MERGE_REG; s++) M = fmaxf(M, v[s].x);
            float L = 0.0f, A = 0.0f;
            if (M != -INFINITY)
#pragma unroll
                for (int s = 0; s < AK_MERGE_REG; s++) {
                    if (v[s].x == -INFINITY) continue;
                    const float f = __expf(v[s].x - M);
                    L += v[s].y * f;
                    A += a[s] * f;
                }
            out[(size_t)h * d + e] = L > 0.0f ? A / L : 0.0f;
        }
        return;
    }
    extern __shared__ float ak_msm[];
    float *sf = ak_msm, *sl = sf + n_split, *wmax = sl + n_split;
    const int h = blockIdx.x;
    const float2 *ml = part_ml + (size_t)h * n_split;
    float M = -INFINITY;
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) {
        float2 v = ml[s];
        sf[s] = v.x;
        sl[s] = v.y;
        M = fmaxf(M, v.x);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = M;
    __syncthreads();
    M = -INFINITY;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) M = fmaxf(M, wmax[w]);
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) {
        float ms = sf[s];
        sf[s] = ms == -INFINITY ? -INFINITY : __expf(ms - M);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float L = 0.0f, A = 0.0f;
        if (M != -INFINITY) {
            const float *pa = part_acc + (size_t)h * n_split * d + e;
            for (int s = 0; s < n_split; s += AK_MERGE_BATCH) {
                float a[AK_MERGE_BATCH];
#pragma unroll
                for (int j = 0; j < AK_MERGE_BATCH; j++)
                    a[j] = s + j < n_split ? pa[(size_t)(s + j) * d] : 0.0f;
#pragma unroll
                for (int j = 0; j < AK_MERGE_BATCH; j++) {
                    if (s + j >= n_split) break;
                    float f = sf[s + j];
                    if (f == -INFINITY) continue;
                    L += sl[s + j] * f;
                    A += a[j] * f;
                }
            }
        }
        out[(size_t)h * d + e] = L > 0.0f ? A / L : 0.0f;
    }
}

/* ---- prefill: FlashAttention-2-style fp32 tiles -------------------------------------------- */

#define ATTN_PS (ATTN_CHUNK + 4) /* row stride of the probabilities tile */

/* The probabilities tile Ps [ROWS][PS] reuses the keys tile KsT when it fits (D = 128): the
 * keys are dead once the scores are computed. Two blocks then fit on one SM. */
template <int D>
struct ak_pf_layout {
    static constexpr bool alias = D * ATTN_CHUNK >= ATTN_ROWS * ATTN_PS;
    static constexpr size_t floats = (size_t)D * ATTN_ROWS       /* QsT [D][ROWS] */
                                     + (size_t)D * ATTN_CHUNK     /* KsT [D][CHUNK] */
                                     + (size_t)ATTN_CHUNK * (D + 4) /* Vs [CHUNK][D + 4] */
                                     + (alias ? 0 : (size_t)ATTN_ROWS * ATTN_PS);
    static constexpr size_t bytes = sizeof(float) * floats
                                    + sizeof(long long) * (3 * ATTN_CHUNK + ATTN_ROWS) + 64;
};

template <int D>
static size_t ak_prefill_smem(void)
{
    return ak_pf_layout<D>::bytes;
}

/* grid.x = query tiles (dense: n_tok / QT; BSA: n_qblk * sub-tiles), grid.y = KV head */
template <int D, bool DENSE>
__global__ void __launch_bounds__(ATTN_PF_THREADS) ak_prefill_kernel(attn_params P, int qt, int nsub)
{
    extern __shared__ float4 ak_smem4[];
    float *QsT = (float *)ak_smem4;
    float *KsT = QsT + D * ATTN_ROWS;
    float *Vs = KsT + D * ATTN_CHUNK;
    constexpr bool ALIAS = ak_pf_layout<D>::alias;
    constexpr int VS = D + 4; /* padded: the row-wise float4 stores of 8 keys hit 32 banks */
    float *Ps = ALIAS ? KsT : Vs + ATTN_CHUNK * VS;
    constexpr int PS = ATTN_PS;
    long long *kt = (long long *)((float *)ak_smem4 + ak_pf_layout<D>::floats);
    long long *kvp = kt + ATTN_CHUNK;
    long long *kset = kvp + ATTN_CHUNK;
    long long *prow = kset + ATTN_CHUNK;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int g = blockIdx.y, G = P.G, half = P.n_rot / 2;

    /* my queries: tokens [r0, r1) of this call */
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

    /* queries: rotated at their positions, scaled, transposed */
    for (int i = tid; i < ATTN_ROWS * D; i += blockDim.x) {
        int r = i / D, e = i % D;
        float x = 0.0f;
        if (r < nrows) {
            long long tok = r0 + r / G;
            int h = g * G + r % G;
            const float *qr = P.q + ((size_t)tok * P.H + h) * D;
            x = qr[e];
            bool f;
            int partner;
            int fi = ak_freq(P, e, &f, &partner);
            if (fi >= 0) {
                float c, s;
                ak_cs(P.inv_freq[fi], P.pos0 + tok, &c, &s);
                x = ak_rot(x, qr[partner], f, c, s);
            }
            x *= P.scale;
        }
        QsT[e * ATTN_ROWS + r] = x;
    }
    for (int r = tid; r < ATTN_ROWS; r += blockDim.x)
        prow[r] = r < nrows ? P.pos0 + r0 + r / G : -1;

    float m[4], l[4], acc[4][D / 16];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < D / 16; j++) acc[i][j] = 0.0f;
    }
    const long long n_keys = DENSE ? P.pos0 + r1 : blk.n;

    for (long long k0 = 0; k0 < n_keys; k0 += ATTN_CHUNK) {
        __syncthreads(); /* previous tile consumed (and q/prow written on the first pass) */
        for (int i = tid; i < ATTN_CHUNK; i += blockDim.x) {
            long long n = k0 + i, t = n, vpos = n;
            int set = AK_DENSE;
            if (n >= n_keys) set = AK_NONE;
            else if (!DENSE) set = ak_bsa_key(P, blk, n, &t, &vpos);
            kt[i] = t;
            kvp[i] = vpos;
            kset[i] = set;
        }
        __syncthreads();
        for (int i = tid; i < ATTN_CHUNK * (D / 8); i += blockDim.x) {
            int kk = i % ATTN_CHUNK, e = (i / ATTN_CHUNK) * 8;
            float kx[8], vx[8];
            if (kset[kk] != AK_NONE) {
                const uint8_t *kp, *vq;
                ak_rows(P, kt[kk], g, &kp, &vq);
                ak_unpack(P, ak_load_raw(P, kp, e), P.k_scale, kx);
                ak_unpack(P, ak_load_raw(P, vq, e), P.v_scale, vx);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) kx[j] = vx[j] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) KsT[(e + j) * ATTN_CHUNK + kk] = kx[j];
            *(float4 *)&Vs[kk * VS + e] = make_float4(vx[0], vx[1], vx[2], vx[3]);
            *(float4 *)&Vs[kk * VS + e + 4] = make_float4(vx[4], vx[5], vx[6], vx[7]);
        }
        __syncthreads();
        if (P.inv_freq) {
            for (int i = tid; i < ATTN_CHUNK * half; i += blockDim.x) {
                int kk = i % ATTN_CHUNK, fi = i / ATTN_CHUNK;
                if (kset[kk] == AK_NONE) continue;
                int ea, eb;
                if (P.rope_style == CPU_ROPE_NEOX) {
                    ea = fi;
                    eb = fi + half;
                } else {
                    ea = 2 * fi;
                    eb = 2 * fi + 1;
                }
                float c, s;
                ak_cs(P.inv_freq[fi], kvp[kk], &c, &s);
                float a = KsT[ea * ATTN_CHUNK + kk], b = KsT[eb * ATTN_CHUNK + kk];
                KsT[ea * ATTN_CHUNK + kk] = a * c - b * s;
                KsT[eb * ATTN_CHUNK + kk] = a * s + b * c;
            }
            __syncthreads();
        }
        /* scores */
        float s[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = 0.0f;
#pragma unroll 8
        for (int e = 0; e < D; e++) {
            float4 a = *(const float4 *)&QsT[e * ATTN_ROWS + ty * 4];
            float4 b = *(const float4 *)&KsT[e * ATTN_CHUNK + tx * 4];
            float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) s[i][j] = fmaf(av[i], bv[j], s[i][j]);
        }
        if (ALIAS) __syncthreads(); /* every thread is done with KsT: Ps overwrites it */
        /* mask + online softmax */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            long long pq = prow[ty * 4 + i];
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int kk = tx * 4 + j;
                bool ok = pq >= 0 && ak_valid(P, (int)kset[kk], kt[kk], pq);
                s[i][j] = ok ? s[i][j] : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float mn = fmaxf(m[i], mx);
            float mu = mn == -INFINITY ? 0.0f : mn;
            float corr = __expf(m[i] - mu);
            float rs = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float pe = __expf(s[i][j] - mu);
                rs += pe;
                Ps[(ty * 4 + i) * PS + tx * 4 + j] = pe;
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) rs += __shfl_xor_sync(0xffffffffu, rs, o);
            l[i] = l[i] * corr + rs;
            m[i] = mn;
#pragma unroll
            for (int j = 0; j < D / 16; j++) acc[i][j] *= corr;
        }
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < ATTN_CHUNK; kk++) {
            float pv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) pv[i] = Ps[(ty * 4 + i) * PS + kk];
#pragma unroll
            for (int j = 0; j < D / 16; j++) {
                float v = Vs[kk * VS + tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; i++) acc[i][j] = fmaf(pv[i], v, acc[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = ty * 4 + i;
        if (r >= nrows) continue;
        long long tok = r0 + r / G;
        int h = g * G + r % G;
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        float *o = P.out + ((size_t)tok * P.H + h) * D;
#pragma unroll
        for (int j = 0; j < D / 16; j++) o[tx + 16 * j] = acc[i][j] * inv;
    }
}

/* ---- host side ------------------------------------------------------------------------------ */

/* Fill the K/V, shape and RoPE parts of P; -EINVAL when unsupported. */
static int ak_setup(attn_params *P, const cpu_attn_shape *s, const cuda_rope *rope,
                    const cuda_kv_view *kv)
{
    if (!s || !kv || cuda_kv_check(kv, true)) return -EINVAL;
    if (s->n_head < 1 || s->n_head_kv < 1 || s->n_head % s->n_head_kv) return -EINVAL;
    int G = s->n_head / s->n_head_kv;
    if (G > 8 || (s->head_dim != 64 && s->head_dim != 128)) return -EINVAL;
    if (kv->dtype != CUDA_KV_BF16 && kv->dtype != CUDA_KV_FP8) return -EINVAL;
    if (kv->n_kv < 0) return -EINVAL;
    memset(P, 0, sizeof(*P));
    P->kv = cuda_kv_addr_of(kv, s->n_head_kv, s->head_dim, kv->dtype == CUDA_KV_BF16 ? 2 : 1);
    P->dtype = kv->dtype;
    P->k_scale = kv->dtype == CUDA_KV_FP8 ? kv->k_scale : 1.0f;
    P->v_scale = kv->dtype == CUDA_KV_FP8 ? kv->v_scale : 1.0f;
    P->T = kv->n_kv;
    P->hkv = s->n_head_kv;
    P->d = s->head_dim;
    P->H = s->n_head;
    P->G = G;
    P->scale = s->scale;
    if (rope) {
        if (!rope->inv_freq_dev || rope->head_dim != s->head_dim || rope->n_rot < 2 ||
            rope->n_rot > s->head_dim || (rope->n_rot & 1))
            return -EINVAL;
        if (rope->style != CPU_ROPE_NEOX && rope->style != CPU_ROPE_NORM) return -EINVAL;
        /* NEOX decode exchanges partners between lanes 8 elements apart */
        if (rope->style == CPU_ROPE_NEOX && (rope->n_rot / 2) % 8) return -EINVAL;
        P->inv_freq = rope->inv_freq_dev;
        P->rope_style = rope->style;
        P->n_rot = rope->n_rot;
    }
    return 0;
}

/* Host-side caches of the decode launch path, per device (decode calls take microseconds on the
 * GPU, so the host work around a launch matters; a serving engine queues 32 layers of them).
 * Entries are written with relaxed atomics: two threads racing only repeat a query. */
#define AK_MAX_DEV 16

static int ak_device(int *dev)
{
    int d = 0;
    cudaError_t e = cudaGetDevice(&d);
    if (e != cudaSuccess) return cuda_hip_fail(e, "cudaGetDevice", __FILE__, __LINE__);
    *dev = d;
    return 0;
}

/* SM count of device dev (queried once per device). */
static int ak_sm_count(int dev)
{
    static int cache[AK_MAX_DEV];
    int *ce = dev >= 0 && dev < AK_MAX_DEV ? &cache[dev] : NULL;
    int n = ce ? __atomic_load_n(ce, __ATOMIC_RELAXED) : 0;
    if (n > 0) return n;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
        cudaGetLastError();
        return 132;
    }
    if (ce) __atomic_store_n(ce, n, __ATOMIC_RELAXED);
    return n;
}

/* Split n_keys over blocks (multiples of `chunk` keys, >= ATTN_NW chunks per split) and get the
 * scratch for the partials. */
static int ak_decode_split(attn_params *P, long long n_keys, int blocks_per_sm, int n_sm,
                           int chunk, bool whole_warps, cuda_hip_work *w)
{
    if (n_keys < 1) n_keys = 1;
    long long chunks = (n_keys + chunk - 1) / chunk;
    /* one full wave of resident blocks: every split has the same number of keys */
    long long want = ((long long)blocks_per_sm * n_sm) / P->hkv;
    if (want < 1) want = 1;
    long long by_size = (n_keys + (long long)ATTN_NW * chunk - 1) / ((long long)ATTN_NW * chunk);
    long long ns = want < by_size ? want : by_size;
    if (ns < 1) ns = 1;
    if (ns > 4096) ns = 4096; /* the merge keeps 2 floats per split in shared memory */
    long long cps = (chunks + ns - 1) / ns;
    if (whole_warps) cps = (cps + ATTN_NW - 1) / ATTN_NW * ATTN_NW; /* every warp as busy */
    P->keys_per_split = cps * chunk;
    P->n_split = (int)((n_keys + P->keys_per_split - 1) / P->keys_per_split);
    size_t rows = (size_t)P->H * (size_t)P->n_split;
    P->part_ml = (float2 *)cuda_hip_work_get(w, CUDA_SLOT_ATTN0, rows * sizeof(float2));
    P->part_acc = (float *)cuda_hip_work_get(w, CUDA_SLOT_ATTN0 + 1, rows * P->d * sizeof(float));
    if (!P->part_ml || !P->part_acc) return -ENOMEM;
    return 0;
}

/* The split merge of a decode launch (one block of d threads per head): P.out from the
 * partials the split kernel wrote. */
static int ak_launch_merge(const attn_params &P, cudaStream_t st)
{
    ak_merge_kernel<<<P.H, P.d, ak_merge_smem(P.n_split), st>>>(P.part_ml, P.part_acc, P.n_split,
                                                               P.d, P.out);
    CUDA_TRY(cudaGetLastError());
    return 0;
}

template <int D, int MAXG, bool DENSE, bool V2, int MINB, bool PRE>
static int ak_launch_decode_t(attn_params &P, long long n_keys, cuda_hip_work *w, cudaStream_t st)
{
    const auto KFN = ak_decode_fn<D, MAXG, DENSE, V2, MINB, PRE>();
    /* CH of the kernel: V2 BSA walks its short list in one-step chunks, ATTN_NW per split */
    const int chunk = (V2 && !DENSE) ? (32 / (D / 8)) * (MAXG >= 8 ? 2 : 4) : ATTN_CHUNK;
    int half = P.inv_freq ? P.n_rot / 2 : 0;
    size_t tab = DENSE ? sizeof(float2) * (size_t)(ATTN_CHUNK + ATTN_NW) * half : 0;
    size_t mrg = sizeof(float) * ((size_t)ATTN_NW * MAXG * (2 + D));
    size_t smem = tab > mrg ? tab : mrg;
    /* per (kernel, device): the dynamic shared memory already allowed (cudaFuncSetAttribute
     * once, not on every call) and the occupancy of the last smem size as (smem << 16 | blocks);
     * a stale occupancy would only change the split count, never the result */
    static int smem_ok[AK_MAX_DEV];
    static unsigned long long occ_cache[AK_MAX_DEV];
    int dev = 0;
    int rc = ak_device(&dev);
    if (rc) return rc;
    const bool cached = dev >= 0 && dev < AK_MAX_DEV;
    if (smem > 48 * 1024 &&
        (!cached || (size_t)__atomic_load_n(&smem_ok[dev], __ATOMIC_RELAXED) < smem)) {
        CUDA_TRY(cudaFuncSetAttribute(KFN, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        if (cached) __atomic_store_n(&smem_ok[dev], (int)smem, __ATOMIC_RELAXED);
    }
    int occ = 0;
    unsigned long long cv = cached ? __atomic_load_n(&occ_cache[dev], __ATOMIC_RELAXED) : 0;
    if (cv && (cv >> 16) == (unsigned long long)smem) {
        occ = (int)(cv & 0xffffu);
    } else {
        CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, KFN, ATTN_NW * 32, smem));
        if (cached && occ > 0 && occ < 0x10000)
            __atomic_store_n(&occ_cache[dev], ((unsigned long long)smem << 16) | (unsigned)occ,
                             __ATOMIC_RELAXED);
    }
    rc = ak_decode_split(&P, n_keys, occ > 0 ? occ : 1, ak_sm_count(dev), chunk, V2 && !DENSE, w);
    if (rc) return rc;
    if constexpr (!DENSE && V2) ak_cs_table(&P, w, dev, st);
    dim3 grid((unsigned)P.n_split, (unsigned)P.hkv);
    KFN<<<grid, ATTN_NW * 32, smem, st>>>(P);
    CUDA_TRY(cudaGetLastError());
    return ak_launch_merge(P, st);
}

/* MINB4: G <= 4 kernels compiled for 4 blocks per SM (<= 128 registers); PRE: prefetching
 * kernels (v4) */
template <bool DENSE, bool V2, bool MINB4, bool PRE = false>
static int ak_launch_decode_v(attn_params &P, long long n_keys, cuda_hip_work *w, cudaStream_t st)
{
    constexpr int MB = MINB4 ? 4 : 1;
    if (P.d == 64) {
        if (P.G == 1) return ak_launch_decode_t<64, 1, DENSE, V2, MB, PRE>(P, n_keys, w, st);
        if (P.G <= 4) return ak_launch_decode_t<64, 4, DENSE, V2, MB, PRE>(P, n_keys, w, st);
        return ak_launch_decode_t<64, 8, DENSE, V2, 1, PRE>(P, n_keys, w, st);
    }
    if (P.G == 1) return ak_launch_decode_t<128, 1, DENSE, V2, MB, PRE>(P, n_keys, w, st);
    if (P.G <= 4) return ak_launch_decode_t<128, 4, DENSE, V2, MB, PRE>(P, n_keys, w, st);
    return ak_launch_decode_t<128, 8, DENSE, V2, 1, PRE>(P, n_keys, w, st);
}

/* Decode kernel version from IHIP_ATTN_DECODE: "v1" the first kernels (for comparison), "v2"
 * the fp32 kernels, "v3" v2 with the dense G <= 4 kernels limited to 128 registers (4 blocks
 * per SM instead of 3; BSA as v2), "v4" v2 with the dense kernels loading the next step's K/V
 * before the current step's math (same arithmetic per key as v2; the split count follows its
 * occupancy; BSA as v2); unset or anything else (0): BSA on the tensor-core decode kernel
 * (attn-decode-mma.cu) where it supports the shape, else v2; dense v2. Read on every call so a
 * benchmark or test can switch between calls. */
static int ak_decode_version(void)
{
    const char *e = getenv("IHIP_ATTN_DECODE");
    if (e && !strcmp(e, "v1")) return 1;
    if (e && !strcmp(e, "v2")) return 2;
    if (e && !strcmp(e, "v3")) return 3;
    if (e && !strcmp(e, "v4")) return 4;
    return 0;
}

template <bool DENSE>
static int ak_launch_decode(attn_params &P, long long n_keys, cuda_hip_work *w, cudaStream_t st)
{
    int v = ak_decode_version();
    if (v == 1) return ak_launch_decode_v<DENSE, false, false>(P, n_keys, w, st);
    if constexpr (DENSE) {
        if (v == 3) return ak_launch_decode_v<DENSE, true, true>(P, n_keys, w, st);
        if (v == 4) return ak_launch_decode_v<DENSE, true, false, true>(P, n_keys, w, st);
    }
    return ak_launch_decode_v<DENSE, true, false>(P, n_keys, w, st);
}

template <int D, bool DENSE>
static int ak_launch_prefill_t(const attn_params &P, unsigned nx, int qt, int nsub, cudaStream_t st)
{
    size_t smem = ak_prefill_smem<D>(); /* constant per kernel: allowed once per device */
    static int smem_ok[AK_MAX_DEV];
    int dev = 0;
    int rc = ak_device(&dev);
    if (rc) return rc;
    const bool cached = dev >= 0 && dev < AK_MAX_DEV;
    if (!cached || !__atomic_load_n(&smem_ok[dev], __ATOMIC_RELAXED)) {
        CUDA_TRY(cudaFuncSetAttribute(ak_prefill_kernel<D, DENSE>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        if (cached) __atomic_store_n(&smem_ok[dev], 1, __ATOMIC_RELAXED);
    }
    dim3 grid(nx, (unsigned)P.hkv);
    ak_prefill_kernel<D, DENSE><<<grid, ATTN_PF_THREADS, smem, st>>>(P, qt, nsub);
    CUDA_TRY(cudaGetLastError());
    return 0;
}

template <bool DENSE>
static int ak_launch_prefill(const attn_params &P, unsigned nx, int qt, int nsub, cudaStream_t st)
{
    if (nx == 0) return 0;
    if (nx > 0x7fffffffu) return -EINVAL;
    if (P.d == 64) return ak_launch_prefill_t<64, DENSE>(P, nx, qt, nsub, st);
    return ak_launch_prefill_t<128, DENSE>(P, nx, qt, nsub, st);
}

#endif /* ATTN_KERNELS_CUH */
