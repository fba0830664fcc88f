/*
 * attn-decode-mma.cu — HiP block-sparse decode attention (one query, the BSA key list of
 * ak_bsa_block / ak_bsa_key) on tensor cores: split-K over the list like the fp32 kernel of
 * attn-kernels.cuh (same partials, same merge kernel), but each warp computes 16 keys at a time
 * with mma.sync m16n8k16, so a key costs a few tens of instructions instead of hundreds.
 *
 * Design
 *   - Grid (split, KV head), 4 warps; a warp takes tiles of 16 consecutive logical keys (two
 *     n8 tiles t = 0, 1), warp w the tiles w, w + 4, ... of its split.
 *   - A rows = the G <= 8 query heads of the KV group (rows G..15 zero), unrotated, scaled, as
 *     fp16 A fragments kept for the whole loop (BSA rotates each key by vpos - p instead:
 *     R(p)^T R(vpos) = R(vpos - p), as the fp32 kernel does).
 *   - Dimension order: the dot product does not care in which order the D dimensions are
 *     summed, as long as A and B use the same one. k step kt (0..D/16) maps fragment index
 *     kappa = 2 tig + r (+8 hi) to dimension (D/4) tig + 4 kt + 2 hi + r, so lane (gid, tig)
 *     needs dimensions [(D/4) tig, (D/4)(tig + 1)) of ONE key (key gid of the n8 tile): D/4
 *     contiguous elements, loaded with 16-byte loads (bf16) or 8-byte loads (fp8), and every
 *     32-bit B register is one NORM rotation pair (2i, 2i + 1). The key is rotated in fp32
 *     (cos/sin of the distance p - vpos from the table of ak_cs_table, or computed directly
 *     beyond it) and rounded to fp16 (11-bit significand; the fp32 kernel keeps fp32).
 *   - S = Q K^T: D/16 fp16 mma per n8 tile. Online softmax in fp32 on the accumulators (row
 *     max over the 4 lanes of a row, l per lane, reduced at the end); keys the list masks get
 *     -inf (validity from one ballot per tile), their K/V rows are never read.
 *   - O^T += V^T P^T (rows = dimensions, columns = the 8 heads, k = the 16 keys): P rounded to
 *     bf16 is the B fragment straight from the S accumulators (b0 = tile 0's pair, b1 = tile
 *     1's), so D/16 mma per 16 keys and D/4 fp32 accumulators per lane; V rows (bf16, zero-
 *     filled for masked keys: cp.async; fp8: converted through registers) go to a per-warp
 *     shared tile [16][D + 8] and come back as A fragments of V^T with ldmatrix.x4.trans. The
 *     softmax correction of a column (head) comes from the lanes of its S row (two shuffles).
 *   - Both tiles' keys are resolved and their K/V loads and cos/sin table rows issued before
 *     any math (the kernel is latency-bound: ~1.6 warps per scheduler, 40 % of the stalls on
 *     global loads, 20 % on instruction fetch; registers are not what limits the grid). One
 *     instantiation per K/V dtype keeps the loop's code small (1M: 18.5 vs 19.1 us per call).
 *   - End: warps merged through shared memory into one (m, l, acc) partial per (head, split),
 *     then ak_merge_kernel, exactly as the fp32 kernel.
 *   Supported: d 64 or 128, G <= 8, no RoPE or NORM RoPE over all d (n_rot == d); anything else
 *   returns -ENOTSUP and the caller uses the fp32 kernel.
 */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "attn-prefill.cuh"
#pragma GCC diagnostic pop

#include "attn-mma.cuh"

#define DM_NW 4  /* warps per block */
#define DM_TK 16 /* keys per warp tile */
/* ak_decode_split rounds a split to whole multiples of ATTN_NW tiles: one per warp */
static_assert(DM_NW == ATTN_NW, "the split sizes assume ATTN_NW warps per block");

template <int D>
struct dm_layout {
    static constexpr int VS = D + 8;                                   /* V tile row stride */
    static constexpr size_t vtile = sizeof(uint16_t) * DM_TK * VS;    /* one warp's V tile */
    static constexpr int AS = D + 4;                                   /* acc row stride */
    static constexpr size_t merge = sizeof(float) * (DM_NW * 8 * (3 + AS) + 16); /* m, l, acc, f; M, L */
    static constexpr size_t bytes = DM_NW * vtile + merge;
};

/* cos/sin of frequencies f..f+3 at distance dist in the table's convention (sin of p - vpos),
 * computed directly (distances past the table, or a table of other frequencies). Rarely run;
 * out of line (__noinline__) the kernel was slower (H200, 1M: 22.2 vs 18.5 us per call). */
static __device__ __forceinline__ void dm_cs_direct(const double *inv_freq, int f, long long dist,
                                                 float4 *c01, float4 *c23)
{
    ak_cs(inv_freq[f], dist, &c01->x, &c01->y);
    ak_cs(inv_freq[f + 1], dist, &c01->z, &c01->w);
    ak_cs(inv_freq[f + 2], dist, &c23->x, &c23->y);
    ak_cs(inv_freq[f + 3], dist, &c23->z, &c23->w);
}

template <int D, bool FP8>
static __device__ __forceinline__ void dm_body(const attn_params &P)
{
    constexpr int QL = D / 4;  /* elements of a key per lane */
    constexpr int KT = D / 16; /* k steps */
    constexpr int MT = D / 16; /* m16 tiles of the output (O^T: dims x heads) */
    constexpr int VS = dm_layout<D>::VS;
    extern __shared__ float4 dm_smem4[];
    uint16_t *vt = (uint16_t *)dm_smem4 + (size_t)(threadIdx.x >> 5) * DM_TK * VS;
    float *mg = (float *)((char *)dm_smem4 + DM_NW * dm_layout<D>::vtile);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int g = blockIdx.y, split = blockIdx.x;
    const int G = P.G, half = P.n_rot / 2;
    const long long p = P.pos0;
    const ak_blk blk = ak_bsa_block(P, 0);
    const long long lo = (long long)split * P.keys_per_split;
    long long hi = lo + P.keys_per_split;
    if (hi > blk.n) hi = blk.n;
    const bool rope = P.inv_freq != NULL;

    /* my frequencies: f0 .. f0 + QL/2 (from the table when it holds the same inv_freq) */
    const int f0 = QL / 2 * tig;
    bool use_tab = rope && P.cs_tab;
    if (use_tab) { /* the lanes check two frequencies each, the warp agrees */
        bool same = true;
        for (int f = lane; f < half; f += 32)
            if (__double_as_longlong(P.cs_freq[f]) != __double_as_longlong(P.inv_freq[f]))
                same = false;
        use_tab = __all_sync(0xffffffffu, same);
    }

    /* A fragments: head gid of the group, dimensions QL*tig + 4kt + {0,1} / {2,3} */
    uint32_t qa[KT][2];
    {
        const bool hv = gid < G;
        const float *qr = P.q + (size_t)(g * G + (hv ? gid : 0)) * D + QL * tig;
        const float sc = hv ? P.scale : 0.0f;
#pragma unroll
        for (int kt = 0; kt < KT; kt++) {
            float4 x = *(const float4 *)(qr + 4 * kt);
            qa[kt][0] = pf_pack_h(x.x * sc, x.y * sc);
            qa[kt][1] = pf_pack_h(x.z * sc, x.w * sc);
        }
    }

    /* O^T accumulators: m-tile mt (dims 16mt..16mt+15) x the 8 heads: acc[mt][0..1] = dim
     * 16mt + gid, heads 2tig, 2tig+1; acc[mt][2..3] = dim 16mt + 8 + gid, same heads */
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
    float m = -INFINITY, l = 0.0f; /* of head gid (row gid of S) */
    const uint32_t vt_s = pf_saddr(vt);
    /* ldmatrix.x4.trans of m-tile mt: lane i gives row i%8 of matrix i/8 = (keys 8*(i/16)..,
     * dims 16mt + 8*(i/8%2)..) -> a0..a3 of V^T (rows = dims, k = keys) */
    const uint32_t va_s =
        vt_s + (uint32_t)(((lane >> 4) * 8 + (lane & 7)) * VS + ((lane >> 3) & 1) * 8) * 2u;

    for (long long tb = lo + (long long)warp * DM_TK; tb < hi; tb += DM_NW * DM_TK) {
        /* both tiles first: issue the K loads, V copies and cos/sin rows of key gid of tile t */
        unsigned okm[2];
        long long dist[2];
        bool okk[2], tab[2];
        uint4 kr[2][QL / 8];
        float4 csr[2][QL / 4]; /* cos/sin of my QL/2 frequencies at the key's distance */
#pragma unroll
        for (int t = 0; t < 2; t++) {
            const long long n = tb + t * 8 + gid;
            long long tt = 0, vpos = 0;
            const int set = n < hi ? ak_bsa_key(P, blk, n, &tt, &vpos) : AK_NONE;
            const bool ok = set != AK_NONE && ak_valid(P, set, tt, p);
            okk[t] = ok;
            okm[t] = __ballot_sync(0xffffffffu, ok);
            dist[t] = p - vpos;
            tab[t] = use_tab && dist[t] >= 0 && dist[t] < AK_CS_POS;
            if (tab[t]) {
                const float4 *cs = (const float4 *)(P.cs_tab + (size_t)dist[t] * half + f0);
#pragma unroll
                for (int i = 0; i < QL / 4; i++) csr[t][i] = __ldg(cs + i);
            }
            const uint8_t *kp = NULL, *vq = NULL;
            if (ok) ak_rows(P, tt, g, &kp, &vq);
#pragma unroll
            for (int i = 0; i < QL / 8; i++)
                kr[t][i] = ok ? ak_load_raw_t<FP8>(kp, QL * tig + 8 * i) : make_uint4(0u, 0u, 0u, 0u);
            uint16_t *vrow = vt + (size_t)(t * 8 + gid) * VS + QL * tig;
            if constexpr (!FP8) {
#pragma unroll
                for (int i = 0; i < QL / 8; i++)
                    pf_cp16(pf_saddr(vrow + 8 * i), ok ? vq + 2 * (QL * tig + 8 * i) : NULL, ok);
            } else {
#pragma unroll
                for (int i = 0; i < QL / 8; i++) {
                    float v[8];
                    uint4 raw = ok ? ak_load_raw_t<FP8>(vq, QL * tig + 8 * i) : make_uint4(0u, 0u, 0u, 0u);
                    ak_unpack_t<FP8>(raw, P.v_scale, v);
                    *(uint4 *)(vrow + 8 * i) = make_uint4(pf_pack(v[0], v[1]), pf_pack(v[2], v[3]),
                                                          pf_pack(v[4], v[5]), pf_pack(v[6], v[7]));
                }
            }
        }
        if constexpr (!FP8) pf_commit();
        /* S = Q K^T per tile: rotate key gid, D/16 fp16 mma */
        float s[2][4];
#pragma unroll
        for (int t = 0; t < 2; t++) {
            float sv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int i = 0; i < QL / 8; i++) {
                float k[8];
                ak_unpack_t<FP8>(kr[t][i], P.k_scale, k);
                if (rope) {
                    float4 c01 = make_float4(1.0f, 0.0f, 1.0f, 0.0f), c23 = c01;
                    if (tab[t]) {
                        c01 = csr[t][2 * i];
                        c23 = csr[t][2 * i + 1];
                    } else if (okk[t]) {
                        dm_cs_direct(P.inv_freq, f0 + 4 * i, dist[t], &c01, &c23);
                    }
                    const float cc[4] = {c01.x, c01.z, c23.x, c23.z};
                    const float ss[4] = {-c01.y, -c01.w, -c23.y, -c23.w}; /* sin(vpos - p) */
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        const float a = k[2 * j], b = k[2 * j + 1];
                        k[2 * j] = ak_rot(a, b, true, cc[j], ss[j]);
                        k[2 * j + 1] = ak_rot(b, a, false, cc[j], ss[j]);
                    }
                }
                /* elements 8i..8i+7 of my slice = k steps 2i and 2i + 1 */
#pragma unroll
                for (int h2 = 0; h2 < 2; h2++) {
                    const int kt = 2 * i + h2;
                    const uint32_t a[4] = {qa[kt][0], 0u, qa[kt][1], 0u};
                    pf_mma_h(sv, a, pf_pack_h(k[4 * h2], k[4 * h2 + 1]),
                             pf_pack_h(k[4 * h2 + 2], k[4 * h2 + 3]));
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++) s[t][j] = sv[j];
        }
        /* online softmax of row gid over keys 2tig, 2tig+1 of both tiles */
        float mx = m;
#pragma unroll
        for (int t = 0; t < 2; t++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const bool v = (okm[t] >> (4 * (2 * tig + r))) & 1u;
                s[t][r] = v ? s[t][r] : -INFINITY;
                mx = fmaxf(mx, s[t][r]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mu = mx == -INFINITY ? 0.0f : mx;
        const float corr = __expf(m - mu);
        float pr[2][2];
        float ps = 0.0f;
#pragma unroll
        for (int t = 0; t < 2; t++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                pr[t][r] = __expf(s[t][r] - mu);
                ps += pr[t][r];
            }
        l = l * corr + ps;
        m = mx;
        /* O^T columns are heads 2tig, 2tig+1: their corrections live in lanes 8tig, 8tig+4 */
        const float ca = __shfl_sync(0xffffffffu, corr, 8 * tig);
        const float cb = __shfl_sync(0xffffffffu, corr, 8 * tig + 4);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            acc[mt][0] *= ca;
            acc[mt][1] *= cb;
            acc[mt][2] *= ca;
            acc[mt][3] *= cb;
        }
        /* O^T += V^T P^T: B = P^T (keys x heads) is the S accumulator pair of each tile */
        const uint32_t pb0 = pf_pack(pr[0][0], pr[0][1]), pb1 = pf_pack(pr[1][0], pr[1][1]);
        if constexpr (!FP8) pf_wait<0>();
        __syncwarp();
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            uint32_t a[4];
            pf_ldm4t(a, va_s + (uint32_t)(mt * 16 * 2));
            pf_mma(acc[mt], a, pb0, pb1);
        }
        __syncwarp(); /* the tile is rewritten by the next step */
    }

    /* l over the 4 lanes of the row; warps merged through shared memory */
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    constexpr int AS = dm_layout<D>::AS; /* stride D + 4: the 4 tig rows of a store hit other banks */
    float *wm = mg, *wl = wm + DM_NW * 8, *wacc = wl + DM_NW * 8; /* [NW][8], [NW][8][AS] */
    if (tig == 0) {
        wm[warp * 8 + gid] = m;
        wl[warp * 8 + gid] = l;
    }
    float *wa = wacc + (size_t)warp * 8 * AS;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        wa[(2 * tig) * AS + 16 * mt + gid] = acc[mt][0];
        wa[(2 * tig + 1) * AS + 16 * mt + gid] = acc[mt][1];
        wa[(2 * tig) * AS + 16 * mt + 8 + gid] = acc[mt][2];
        wa[(2 * tig + 1) * AS + 16 * mt + 8 + gid] = acc[mt][3];
    }
    __syncthreads();
    /* per head: M over the warps, each warp's factor e^{m_w - M} (0 for an empty warp), L */
    float *wf = wacc + (size_t)DM_NW * 8 * AS; /* [NW][8] factors, then M[8], L[8] */
    if (threadIdx.x < 8) {
        const int hh = threadIdx.x;
        float M = -INFINITY;
        for (int w = 0; w < DM_NW; w++) M = fmaxf(M, wm[w * 8 + hh]);
        float L = 0.0f;
        for (int w = 0; w < DM_NW; w++) {
            const float mw = wm[w * 8 + hh];
            const float f = M == -INFINITY || mw == -INFINITY ? 0.0f : __expf(mw - M);
            wf[w * 8 + hh] = f;
            L += wl[w * 8 + hh] * f;
        }
        wf[DM_NW * 8 + hh] = M;
        wf[DM_NW * 8 + 8 + hh] = L;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int hh = i / D, e = i % D;
        float A = 0.0f;
#pragma unroll
        for (int w = 0; w < DM_NW; w++) A += wacc[(size_t)(w * 8 + hh) * AS + e] * wf[w * 8 + hh];
        const size_t r = (size_t)(g * G + hh) * (size_t)P.n_split + (size_t)split;
        P.part_acc[r * D + e] = A;
        if (e == 0) P.part_ml[r] = make_float2(wf[DM_NW * 8 + hh], wf[DM_NW * 8 + 8 + hh]);
    }
}

template <int D, bool FP8>
__global__ void __launch_bounds__(DM_NW * 32) dm_kernel(attn_params P)
{
    dm_body<D, FP8>(P);
}

template <int D, bool FP8>
static int dm_launch(attn_params &P, long long n_keys, cuda_hip_work *w, cudaStream_t st)
{
    const size_t smem = dm_layout<D>::bytes;
    static int occ_cache[AK_MAX_DEV];
    int dev = 0;
    int rc = ak_device(&dev);
    if (rc) return rc;
    const bool cached = dev >= 0 && dev < AK_MAX_DEV;
    int occ = cached ? __atomic_load_n(&occ_cache[dev], __ATOMIC_RELAXED) : 0;
    if (occ < 1) {
        CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, dm_kernel<D, FP8>, DM_NW * 32,
                                                               smem));
        if (occ < 1) occ = 1;
        if (cached) __atomic_store_n(&occ_cache[dev], occ, __ATOMIC_RELAXED);
    }
    rc = ak_decode_split(&P, n_keys, occ, ak_sm_count(dev), DM_TK, true, w);
    if (rc) return rc;
    ak_cs_table(&P, w, dev, st);
    dim3 grid((unsigned)P.n_split, (unsigned)P.hkv);
    dm_kernel<D, FP8><<<grid, DM_NW * 32, smem, st>>>(P);
    CUDA_TRY(cudaGetLastError());
    return ak_launch_merge(P, st);
}

int ak_bsa_decode_mma(attn_params *P, long long n_keys, cuda_hip_work *w, cudaStream_t st)
{
    if ((P->d != 64 && P->d != 128) || P->G < 1 || P->G > 8) return -ENOTSUP;
    if (P->inv_freq && (P->rope_style != CPU_ROPE_NORM || P->n_rot != P->d)) return -ENOTSUP;
    if (P->dtype != CUDA_KV_BF16 && P->dtype != CUDA_KV_FP8) return -ENOTSUP;
    const bool fp8 = P->dtype == CUDA_KV_FP8;
    if (P->d == 64) return fp8 ? dm_launch<64, true>(*P, n_keys, w, st) : dm_launch<64, false>(*P, n_keys, w, st);
    return fp8 ? dm_launch<128, true>(*P, n_keys, w, st) : dm_launch<128, false>(*P, n_keys, w, st);
}
