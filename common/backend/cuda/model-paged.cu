/*
 * model-paged.cu — paged KV for cuda_ctx (cuda-model.h, "Paged KV"; shared/HIP.md §7): page
 * tables, the GPU ring of computed pages, host pages bound from the kvstore, the page sink that
 * moves prefill pages out, and the two LRU caches of HiP decode.
 *
 * Page tables. Per (sequence, layer), PT_N arrays of max_pages device addresses (model-impl.cuh):
 * HOME_K/HOME_V where the page lives (host memory bound or flushed; else its ring slot
 * page % ring), SA_K/SA_V what attention reads (a K‖V cache slot, else the home) and MK_K what
 * mask estimation reads (a keys-only cache slot, else the home). Every entry is always valid, so
 * a kernel never waits for a copy: a page that is not cached is read from host memory over the
 * bus (the miss path); the caches only make the next reads cheaper.
 *
 * Cache update after a decode refresh of (seq, layer), all on the context's stream, between
 * mask estimation and attention (HIP.md §7.4 "offline" policy, adapted to pages):
 *   mark    need[page] = tick for the pages the new mask will read: for the K‖V cache the
 *           selected blocks, the sink and the window; for the keys-only cache (after a full
 *           refresh only) the stage-1 candidate ranges that the cached stages rescan;
 *   scan    needed host pages: cached → slot tick = tick (hit); else → the miss list;
 *   select  one block sorts the layer's slots by last tick (least recent first) and gives the
 *           misses the slots not needed now, unlinking their old pages (tables back to home)
 *           and linking the new ones; misses beyond that overflow (stay on the bus);
 *   copy    one block per install copies the page (K and V halves, or K) home → slot.
 * Pages in the ring are GPU memory already and are never cached.
 */
#include "model-impl.cuh"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLOTS 8192 /* per layer and cache: the select kernel sorts them in shared memory */

enum { ST_SA_NEED = 0, ST_SA_HIT, ST_SA_INST, ST_SA_OVER, ST_MK_NEED, ST_MK_HIT, ST_MK_INST,
       ST_MK_OVER, ST_N };

static int cuerr(cudaError_t e)
{
    return e == cudaSuccess ? 0 : CUDA_ERR(e);
}

static size_t tab_index(const cuda_ctx *c, int seq, int il, int t)
{
    const cuda_paged *pg = c->pg;
    return (((size_t)seq * (size_t)c->m->hp.n_layer + (size_t)il) * PT_N + (size_t)t) *
           (size_t)pg->max_pages;
}

static unsigned long long ring_addr(const cuda_ctx *c, int seq, int il, int64_t page)
{
    const cuda_paged *pg = c->pg;
    size_t r = ((size_t)seq * (size_t)c->m->hp.n_layer + (size_t)il) * (size_t)pg->ring +
               (size_t)(page % pg->ring);
    return (unsigned long long)(uintptr_t)(pg->ring_dev + r * pg->page_bytes);
}

/* ---- kernels --------------------------------------------------------------------------------- */

/* Tables of (seq, every layer) for pages [p0, max_pages): all five entries → the ring slot. */
static __global__ void tab_ring_kernel(unsigned long long *tab, const uint8_t *ring_seq,
                                       int n_layer, int64_t max_pages, int64_t ring,
                                       size_t page_bytes, size_t half, int64_t p0)
{
    const int il = blockIdx.y;
    unsigned long long *t = tab + (size_t)il * PT_N * (size_t)max_pages;
    for (int64_t p = p0 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < max_pages;
         p += (int64_t)gridDim.x * blockDim.x) {
        unsigned long long a =
            (unsigned long long)(uintptr_t)(ring_seq + ((size_t)il * ring + (size_t)(p % ring)) *
                                                           page_bytes);
        t[PT_HOME_K * max_pages + p] = a;
        t[PT_HOME_V * max_pages + p] = a + half;
        t[PT_SA_K * max_pages + p] = a;
        t[PT_SA_V * max_pages + p] = a + half;
        t[PT_MK_K * max_pages + p] = a;
    }
}

/* Drop the cache entries of sequence seq (every layer) of one cache. */
static __global__ void cache_forget_kernel(long long *owner, uint32_t *tick, int n, int seq,
                                           int64_t max_pages)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        if (owner[i] >= 0 && owner[i] / max_pages == seq) {
            owner[i] = -1;
            tick[i] = 0;
        }
}

/* Tables of (seq, every layer), pages [q0, q1): what the kernels read ← the home. */
static __global__ void repoint_kernel(unsigned long long *tab, int64_t max_pages, int64_t q0,
                                      int64_t q1)
{
    unsigned long long *t = tab + (size_t)blockIdx.y * PT_N * (size_t)max_pages;
    for (int64_t q = q0 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; q < q1;
         q += (int64_t)gridDim.x * blockDim.x) {
        t[PT_SA_K * max_pages + q] = t[PT_HOME_K * max_pages + q];
        t[PT_SA_V * max_pages + q] = t[PT_HOME_V * max_pages + q];
        t[PT_MK_K * max_pages + q] = t[PT_HOME_K * max_pages + q];
    }
}

/* (index, value) pairs → tab. */
static __global__ void scatter_kernel(unsigned long long *tab, const unsigned long long *fix,
                                      int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        tab[fix[2 * i]] = fix[2 * i + 1];
}

/* Row r (slot = seq * n_ctx + pos): q → q[r]; k, v → their home page (T = bf16 or fp8 byte). */
template <typename T>
static __global__ void paged_store_kernel(const float *__restrict__ qkv,
                                          const int64_t *__restrict__ slot, float *__restrict__ q,
                                          const unsigned long long *__restrict__ tab, int il,
                                          int n_layer, int64_t max_pages, int64_t n_ctx, int pt,
                                          int hkv, int d, int64_t qd, float k_inv, float v_inv)
{
    const int64_t r = blockIdx.x, kvd = (int64_t)hkv * d;
    const float *row = qkv + r * (qd + 2 * kvd);
    for (int64_t j = threadIdx.x; j < qd; j += blockDim.x)
        q[r * qd + j] = row[j];
    const int64_t s = slot[r], seq = s / n_ctx, pos = s % n_ctx, page = pos / pt;
    const unsigned long long *t =
        tab + ((size_t)seq * (size_t)n_layer + (size_t)il) * PT_N * (size_t)max_pages;
    T *kp = (T *)(uintptr_t)t[PT_HOME_K * max_pages + page];
    T *vp = (T *)(uintptr_t)t[PT_HOME_V * max_pages + page];
    const int64_t in = pos % pt;
    for (int64_t j = threadIdx.x; j < kvd; j += blockDim.x) {
        const int64_t h = j / d, e = j % d, off = (h * pt + in) * d + e;
        kv_put(&kp[off], row[qd + j], k_inv);
        kv_put(&vp[off], row[qd + kvd + j], v_inv);
    }
}

/* need[p] = tick for the pages of n ranges [L[i], R[i]) (count from *n_dev when given, else
 * n), clipped to [0, lim) pages. L/R NULL: the single range [lo, hi). */
static __global__ void mark_kernel(uint32_t *need, const long long *L, const long long *R,
                                   long long width, const int32_t *n_dev, int n, long long lo,
                                   long long hi, int pt, int64_t lim, uint32_t tick)
{
    const int cnt = n_dev ? min(*n_dev, n) : n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cnt; i += gridDim.x * blockDim.x) {
        long long a = L ? L[i] : lo, b = L ? (R ? R[i] : L[i] + width) : hi;
        if (a < 0) a = 0;
        if (b <= a) continue;
        int64_t p1 = (b - 1) / pt + 1;
        if (p1 > lim) p1 = lim;
        for (int64_t p = a / pt; p < p1; p++)
            need[p] = tick;
    }
}

/* Needed host pages [0, lim): hits touch their slot, misses go to list[1..]. */
static __global__ void scan_kernel(const uint32_t *need, const int32_t *slot_of, uint32_t *tick_of,
                                   int32_t *list, int64_t lim, uint32_t tick,
                                   unsigned long long *stat, int st0)
{
    unsigned n_need = 0, n_hit = 0;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < lim;
         p += (int64_t)gridDim.x * blockDim.x) {
        if (need[p] != tick) continue;
        n_need++;
        const int sl = slot_of[p];
        if (sl >= 0) {
            tick_of[sl] = tick;
            n_hit++;
        } else {
            list[1 + atomicAdd(&list[0], 1)] = (int32_t)p;
        }
    }
    if (n_need) atomicAdd(&stat[st0], (unsigned long long)n_need);
    if (n_hit) atomicAdd(&stat[st0 + 1], (unsigned long long)n_hit);
}

/* One block: sort the layer's slots by tick, give the misses the slots not needed now. */
static __global__ void select_kernel(long long *owner, uint32_t *tick_of, int slots,
                                     int32_t *slot_of_all, const int32_t *list, int32_t *assign,
                                     unsigned long long *tab_all, int seq, int il, int n_layer,
                                     int64_t max_pages, uint8_t *data, size_t slot_bytes,
                                     size_t half, bool kv, uint32_t tick,
                                     unsigned long long *stat, int st0)
{
    extern __shared__ unsigned long long key[];
    int n2 = 1;
    while (n2 < slots) n2 <<= 1;
    for (int i = threadIdx.x; i < n2; i += blockDim.x)
        key[i] = i < slots ? ((unsigned long long)tick_of[i] << 32) | (unsigned)i : ~0ull;
    __syncthreads();
    for (int k = 2; k <= n2; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n2; i += blockDim.x) {
                int l = i ^ j;
                if (l > i) {
                    bool up = (i & k) == 0;
                    unsigned long long a = key[i], b = key[l];
                    if ((a > b) == up) {
                        key[i] = b;
                        key[l] = a;
                    }
                }
            }
            __syncthreads();
        }
    __shared__ int n_free;
    if (threadIdx.x == 0) n_free = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < slots; i += blockDim.x)
        if ((uint32_t)(key[i] >> 32) != tick) atomicAdd(&n_free, 1);
    __syncthreads();
    const int n_miss = list[0], n_inst = min(n_miss, n_free);
    const size_t tb = (size_t)PT_N * (size_t)max_pages; /* one (seq, layer) table block */
    for (int i = threadIdx.x; i < n_inst; i += blockDim.x) {
        const int sl = (int)(key[i] & 0xffffffffu);
        const int64_t page = list[1 + i];
        const size_t gsl = (size_t)il * slots + sl;
        const long long old = owner[gsl];
        if (old >= 0) {
            const long long os = old / max_pages, op = old % max_pages;
            unsigned long long *t = tab_all + ((size_t)os * n_layer + il) * tb;
            slot_of_all[((size_t)os * n_layer + il) * max_pages + op] = -1;
            if (kv) {
                t[PT_SA_K * max_pages + op] = t[PT_HOME_K * max_pages + op];
                t[PT_SA_V * max_pages + op] = t[PT_HOME_V * max_pages + op];
            } else {
                t[PT_MK_K * max_pages + op] = t[PT_HOME_K * max_pages + op];
            }
        }
        owner[gsl] = (long long)seq * max_pages + page;
        tick_of[sl] = tick;
        slot_of_all[((size_t)seq * n_layer + il) * max_pages + page] = sl;
        unsigned long long *t = tab_all + ((size_t)seq * n_layer + il) * tb;
        const unsigned long long a = (unsigned long long)(uintptr_t)(data + gsl * slot_bytes);
        if (kv) {
            t[PT_SA_K * max_pages + page] = a;
            t[PT_SA_V * max_pages + page] = a + half;
        } else {
            t[PT_MK_K * max_pages + page] = a;
        }
        assign[1 + i] = sl;
    }
    if (threadIdx.x == 0) {
        assign[0] = n_inst;
        atomicAdd(&stat[st0 + 2], (unsigned long long)n_inst);
        atomicAdd(&stat[st0 + 3], (unsigned long long)(n_miss - n_inst));
    }
}

/* Block b < assign[0]: copy page list[1 + b] home → slot assign[1 + b] (16 bytes a thread). */
static __global__ void install_kernel(const int32_t *list, const int32_t *assign,
                                      const unsigned long long *tab, int64_t max_pages,
                                      uint8_t *data_layer, size_t slot_bytes, size_t half, bool kv)
{
    if ((int)blockIdx.x >= assign[0]) return;
    const int64_t page = list[1 + blockIdx.x];
    uint4 *dst = (uint4 *)(data_layer + (size_t)assign[1 + blockIdx.x] * slot_bytes);
    const uint4 *k = (const uint4 *)(uintptr_t)tab[PT_HOME_K * max_pages + page];
    const size_t n = half / 16;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x)
        dst[i] = k[i];
    if (kv) {
        const uint4 *v = (const uint4 *)(uintptr_t)tab[PT_HOME_V * max_pages + page];
        for (size_t i = threadIdx.x; i < n; i += blockDim.x)
            dst[n + i] = v[i];
    }
}

/* Staging: page p0 + i of one layer (tables tab_l) → buf + i * page_bytes, then point the
 * kernels' tables of that layer at the copy. One block per page (grid-stride). */
static __global__ void stage_kernel(unsigned long long *tab_l, int64_t max_pages, int64_t p0,
                                    int64_t n, uint8_t *buf, size_t half)
{
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const int64_t p = p0 + i;
        uint4 *dst = (uint4 *)(buf + (size_t)i * 2 * half);
        const uint4 *k = (const uint4 *)(uintptr_t)tab_l[PT_HOME_K * max_pages + p];
        const uint4 *v = (const uint4 *)(uintptr_t)tab_l[PT_HOME_V * max_pages + p];
        const size_t nv = half / 16;
        for (size_t j = threadIdx.x; j < nv; j += blockDim.x) {
            dst[j] = k[j];
            dst[nv + j] = v[j];
        }
        if (threadIdx.x == 0) {
            const unsigned long long a = (unsigned long long)(uintptr_t)dst;
            tab_l[PT_SA_K * max_pages + p] = a;
            tab_l[PT_SA_V * max_pages + p] = a + half;
            tab_l[PT_MK_K * max_pages + p] = a;
        }
    }
}

/* Synthetic K/V into pages at the given addresses (benchmarks). */
template <typename T>
static __global__ void fill_pages_kernel(const unsigned long long *ka, const unsigned long long *va,
                                         int64_t elems, uint64_t key, float k_inv, float v_inv)
{
    T *k = (T *)(uintptr_t)ka[blockIdx.x];
    T *v = (T *)(uintptr_t)va[blockIdx.x];
    const int64_t base = (int64_t)blockIdx.x * elems;
    for (int64_t i = threadIdx.x; i < elems; i += blockDim.x) {
        kv_put(&k[i], fill_value(key, base + i), k_inv);
        kv_put(&v[i], fill_value(~key, base + i), v_inv);
    }
}

/* ---- setup ----------------------------------------------------------------------------------- */

static int cache_init(cuda_ctx *c, struct cuda_cache *ca, int64_t tokens, size_t slot_bytes,
                      cm_err *err)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    if (tokens < 0) tokens = 0;
    int64_t slots = (tokens + pg->pt - 1) / pg->pt;
    if (slots > MAX_SLOTS)
        return cm_err_set(err, -CM_ELIMIT,
                          "cuda context: a GPU page cache of %lld tokens is %lld pages of %d; at "
                          "most %d pages per layer",
                          (long long)tokens, (long long)slots, pg->pt, MAX_SLOTS);
    ca->slots = (int)slots;
    ca->slot_bytes = slot_bytes;
    if (!slots) return 0;
    const size_t per_seq = (size_t)n_layer * (size_t)pg->max_pages;
    cudaError_t e = cudaMalloc((void **)&ca->data, (size_t)n_layer * slots * slot_bytes);
    if (e == cudaSuccess) e = cudaMalloc((void **)&ca->owner, sizeof(long long) * n_layer * slots);
    if (e == cudaSuccess) e = cudaMalloc((void **)&ca->tick, sizeof(uint32_t) * n_layer * slots);
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&ca->slot_of, sizeof(int32_t) * per_seq * (size_t)c->n_seq);
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&ca->need, sizeof(uint32_t) * per_seq * (size_t)c->n_seq);
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&ca->list, sizeof(int32_t) * (size_t)(pg->max_pages + 1));
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&ca->assign, sizeof(int32_t) * (size_t)(slots + 1));
    if (e == cudaSuccess) e = cudaMemset(ca->owner, 0xff, sizeof(long long) * n_layer * slots);
    if (e == cudaSuccess) e = cudaMemset(ca->tick, 0, sizeof(uint32_t) * n_layer * slots);
    if (e == cudaSuccess)
        e = cudaMemset(ca->slot_of, 0xff, sizeof(int32_t) * per_seq * (size_t)c->n_seq);
    if (e == cudaSuccess)
        e = cudaMemset(ca->need, 0, sizeof(uint32_t) * per_seq * (size_t)c->n_seq);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return cm_err_set(err, -ENOMEM,
                          "cuda context: cannot allocate a GPU page cache of %lld pages × %zu B "
                          "× %d layers: %s",
                          (long long)slots, slot_bytes, n_layer, cudaGetErrorString(e));
    }
    return 0;
}

static void cache_free(struct cuda_cache *ca)
{
    cudaFree(ca->data);
    cudaFree(ca->owner);
    cudaFree(ca->tick);
    cudaFree(ca->slot_of);
    cudaFree(ca->need);
    cudaFree(ca->list);
    cudaFree(ca->assign);
    memset(ca, 0, sizeof(*ca));
}

int paged_init(cuda_ctx *c, const cuda_ctx_params *p, cm_err *err)
{
    const mdl_hparams *hp = &c->m->hp;
    const int n_layer = (int)hp->n_layer;
    const int pt = p->page_tokens;
    if (pt < 8 || pt > 4096 || (pt & (pt - 1)))
        return cm_err_set(err, -EINVAL,
                          "cuda context: page_tokens %d must be a power of two in [8, 4096]", pt);
    cuda_paged *pg = (cuda_paged *)calloc(1, sizeof(*pg));
    if (!pg) return cm_err_set(err, -ENOMEM, "out of memory");
    c->pg = pg;
    pg->pt = pt;
    pg->max_pages = (c->n_ctx + pt - 1) / pt;
    int64_t tail = p->tail_tokens > 0 ? p->tail_tokens : CM_MAX(2 * c->n_chunk + pt, (int64_t)4096);
    pg->ring = (tail + pt - 1) / pt;
    if (pg->ring < (c->n_chunk + pt - 1) / pt + 1) pg->ring = (c->n_chunk + pt - 1) / pt + 1;
    if (pg->ring > pg->max_pages) pg->ring = pg->max_pages;
    pg->half_bytes = (size_t)hp->n_head_kv * (size_t)pt * (size_t)hp->head_dim * c->kv_elem;
    pg->page_bytes = 2 * pg->half_bytes;
    pg->tail0 = (int64_t *)calloc((size_t)c->n_seq, sizeof(int64_t));
    pg->ring_lo = (int64_t *)calloc((size_t)c->n_seq, sizeof(int64_t));
    pg->fix_cap = 5 * (int64_t)n_layer * (pg->ring + 2);
    pg->prof = getenv("IHIP_OFFLOAD_PROFILE") && atoi(getenv("IHIP_OFFLOAD_PROFILE")) > 0;
    if (!pg->tail0 || !pg->ring_lo) return cm_err_set(err, -ENOMEM, "out of memory");
    const size_t ring_bytes = (size_t)c->n_seq * n_layer * (size_t)pg->ring * pg->page_bytes;
    const size_t tab_bytes =
        sizeof(unsigned long long) * (size_t)c->n_seq * n_layer * PT_N * (size_t)pg->max_pages;
    cudaError_t e = cudaMalloc((void **)&pg->ring_dev, ring_bytes);
    if (e == cudaSuccess) e = cudaMalloc((void **)&pg->tab, tab_bytes);
    if (e == cudaSuccess) e = cudaMalloc((void **)&pg->stat_dev, sizeof(unsigned long long) * ST_N);
    if (e == cudaSuccess) e = cudaMemset(pg->stat_dev, 0, sizeof(unsigned long long) * ST_N);
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&pg->fix_dev, sizeof(unsigned long long) * 2 * pg->fix_cap);
    if (e == cudaSuccess)
        e = cudaMallocHost((void **)&pg->fix_host, sizeof(unsigned long long) * 2 * pg->fix_cap);
    for (int i = 0; i < 4 && e == cudaSuccess; i++) e = cudaEventCreate(&pg->ev[i]);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&pg->sk_stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&pg->mk_stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&pg->mk_go, cudaEventDisableTiming);
    pg->mk_done = (cudaEvent_t *)calloc((size_t)n_layer, sizeof(cudaEvent_t));
    pg->mk_pending = (bool *)calloc((size_t)n_layer, sizeof(bool));
    if (e == cudaSuccess && (!pg->mk_done || !pg->mk_pending)) e = cudaErrorMemoryAllocation;
    for (int i = 0; i < n_layer && e == cudaSuccess; i++)
        e = cudaEventCreateWithFlags(&pg->mk_done[i], cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&pg->sk_chunk, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&pg->sk_done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return cm_err_set(err, -ENOMEM,
                          "cuda context: cannot allocate the paged KV (ring %.1f MiB, page tables "
                          "%.1f MiB): %s",
                          (double)ring_bytes / 1048576.0, (double)tab_bytes / 1048576.0,
                          cudaGetErrorString(e));
    }
    /* the select kernel sorts up to MAX_SLOTS keys in dynamic shared memory (per device) */
    e = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)sizeof(unsigned long long) * MAX_SLOTS);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return cm_err_set(err, CUDA_ERR(e), "cuda context: page cache kernel: %s",
                          cudaGetErrorString(e));
    }
    int rc = cache_init(c, &pg->sa, p->sa_cache_tokens == 0 ? 32768 : p->sa_cache_tokens,
                        pg->page_bytes, err);
    if (rc == 0)
        rc = cache_init(c, &pg->mk, p->mask_cache_tokens == 0 ? 65536 : p->mask_cache_tokens,
                        pg->half_bytes, err);
    if (rc) return rc;
    if (p->stage_tokens > 0) {
        pg->stage_pages = CM_MIN((p->stage_tokens + pt - 1) / pt, pg->max_pages);
        for (int b = 0; b < 2 && e == cudaSuccess; b++) {
            e = cudaMalloc((void **)&pg->stage_dev[b], (size_t)pg->stage_pages * pg->page_bytes);
            if (e == cudaSuccess) e = cudaEventCreateWithFlags(&pg->st_copied[b], cudaEventDisableTiming);
            if (e == cudaSuccess) e = cudaEventCreateWithFlags(&pg->st_free[b], cudaEventDisableTiming);
        }
        if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&pg->st_stream, cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            cudaGetLastError();
            return cm_err_set(err, -ENOMEM,
                              "cuda context: cannot allocate the prefill staging (2 × %lld pages "
                              "of %zu B): %s",
                              (long long)pg->stage_pages, pg->page_bytes, cudaGetErrorString(e));
        }
    }
    if (p->probe_cache_tokens > 0 && c->hip) {
        pg->pc_off = (size_t *)calloc((size_t)n_layer, sizeof(size_t));
        pg->pc_okoff = (size_t *)calloc((size_t)n_layer, sizeof(size_t));
        pg->pc_chunks = (int64_t *)calloc((size_t)n_layer, sizeof(int64_t));
        pg->pc_base = (int64_t *)calloc((size_t)n_layer, sizeof(int64_t));
        pg->pc_lc = (int *)calloc((size_t)n_layer, sizeof(int));
        if (!pg->pc_off || !pg->pc_okoff || !pg->pc_chunks || !pg->pc_base || !pg->pc_lc)
            return cm_err_set(err, -ENOMEM, "out of memory");
        const size_t row = (size_t)hp->head_dim * c->kv_elem;
        const int64_t toks = CM_MIN(p->probe_cache_tokens, c->n_ctx);
        for (int il = 0; il < n_layer; il++) {
            hip_args ha;
            hip_args_from_config(&ha, c->hip, il, n_layer, false);
            const int lc0 = ha.layer->stages[0].chunk_size;
            if (!cuda_pc_lc_ok(lc0) || row % 16) continue;
            pg->pc_lc[il] = lc0;
            pg->pc_base[il] = ha.layer->sink_token_size;
            pg->pc_chunks[il] = toks > pg->pc_base[il] ? (toks - pg->pc_base[il]) / lc0 : 0;
            pg->pc_off[il] = pg->pc_seq_bytes;
            pg->pc_okoff[il] = pg->pc_seq_ok;
            pg->pc_seq_bytes +=
                (size_t)pg->pc_chunks[il] * CUDA_PC_SLOTS * (size_t)hp->n_head_kv * row;
            pg->pc_seq_ok += (size_t)pg->pc_chunks[il];
        }
        if (pg->pc_seq_bytes) {
            e = cudaMalloc((void **)&pg->pc_dev, pg->pc_seq_bytes * (size_t)c->n_seq);
            if (e == cudaSuccess) e = cudaMalloc((void **)&pg->pc_ok, pg->pc_seq_ok * (size_t)c->n_seq);
            if (e == cudaSuccess) e = cudaMemset(pg->pc_ok, 0, pg->pc_seq_ok * (size_t)c->n_seq);
            if (e != cudaSuccess) {
                cudaGetLastError();
                return cm_err_set(err, -ENOMEM,
                                  "cuda context: cannot allocate the probe cache (%.1f MiB): %s",
                                  (double)(pg->pc_seq_bytes * (size_t)c->n_seq) / 1048576.0,
                                  cudaGetErrorString(e));
            }
        }
    }
    pg->st.gpu_kv_bytes = ring_bytes + (size_t)n_layer * ((size_t)pg->sa.slots * pg->sa.slot_bytes +
                                                          (size_t)pg->mk.slots * pg->mk.slot_bytes) +
                          2 * (size_t)pg->stage_pages * pg->page_bytes +
                          pg->pc_seq_bytes * (size_t)c->n_seq;
    c->kv_bytes = pg->st.gpu_kv_bytes;
    for (int s = 0; s < c->n_seq; s++) paged_reset(c, s);
    e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "cuda context: %s", cudaGetErrorString(e));
    return 0;
}

void paged_free(cuda_ctx *c)
{
    cuda_paged *pg = c->pg;
    if (!pg) return;
    if (pg->sk_stream) cudaStreamSynchronize(pg->sk_stream);
    if (pg->mk_stream) cudaStreamSynchronize(pg->mk_stream);
    cache_free(&pg->sa);
    cache_free(&pg->mk);
    cudaFree(pg->ring_dev);
    cudaFree(pg->tab);
    cudaFree(pg->stat_dev);
    cudaFree(pg->fix_dev);
    cudaFreeHost(pg->fix_host);
    for (int i = 0; i < 4; i++)
        if (pg->ev[i]) cudaEventDestroy(pg->ev[i]);
    for (int b = 0; b < 2; b++) {
        cudaFree(pg->stage_dev[b]);
        if (pg->st_copied[b]) cudaEventDestroy(pg->st_copied[b]);
        if (pg->st_free[b]) cudaEventDestroy(pg->st_free[b]);
    }
    if (pg->st_stream) cudaStreamDestroy(pg->st_stream);
    if (pg->sk_chunk) cudaEventDestroy(pg->sk_chunk);
    if (pg->sk_done) cudaEventDestroy(pg->sk_done);
    if (pg->sk_stream) cudaStreamDestroy(pg->sk_stream);
    for (int i = 0; pg->mk_done && i < (int)c->m->hp.n_layer; i++)
        if (pg->mk_done[i]) cudaEventDestroy(pg->mk_done[i]);
    free(pg->mk_done);
    free(pg->mk_pending);
    if (pg->mk_go) cudaEventDestroy(pg->mk_go);
    if (pg->mk_stream) cudaStreamDestroy(pg->mk_stream);
    cudaFree(pg->pc_dev);
    cudaFree(pg->pc_ok);
    free(pg->pc_off);
    free(pg->pc_okoff);
    free(pg->pc_chunks);
    free(pg->pc_base);
    free(pg->pc_lc);
    free(pg->tail0);
    free(pg->ring_lo);
    free(pg);
    c->pg = NULL;
}

static void tab_to_ring(cuda_ctx *c, int seq, int64_t p0)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    if (p0 >= pg->max_pages) return;
    dim3 grid((unsigned)CM_MIN((pg->max_pages - p0 + 255) / 256, (int64_t)1024), (unsigned)n_layer);
    tab_ring_kernel<<<grid, 256, 0, c->stream>>>(
        pg->tab + tab_index(c, seq, 0, 0),
        pg->ring_dev + (size_t)seq * n_layer * (size_t)pg->ring * pg->page_bytes, n_layer,
        pg->max_pages, pg->ring, pg->page_bytes, pg->half_bytes, p0);
}

static void cache_forget(cuda_ctx *c, struct cuda_cache *ca, int seq)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    if (!ca->slots) return;
    const size_t per_seq = (size_t)n_layer * (size_t)pg->max_pages;
    cache_forget_kernel<<<64, 256, 0, c->stream>>>(ca->owner, ca->tick, n_layer * ca->slots, seq,
                                                   pg->max_pages);
    cudaMemsetAsync(ca->slot_of + per_seq * seq, 0xff, sizeof(int32_t) * per_seq, c->stream);
}

void paged_reset(cuda_ctx *c, int seq)
{
    cuda_paged *pg = c->pg;
    sink_wait(c); /* its table updates must not land after the reset */
    if (pg->mk_stream) cudaStreamSynchronize(pg->mk_stream); /* nor a keys-cache update */
    for (int i = 0; pg->mk_pending && i < (int)c->m->hp.n_layer; i++) pg->mk_pending[i] = false;
    pg->tail0[seq] = 0;
    pg->ring_lo[seq] = 0;
    if (pg->pc_ok && pg->pc_seq_ok)
        cudaMemsetAsync(pg->pc_ok + (size_t)seq * pg->pc_seq_ok, 0, pg->pc_seq_ok, c->stream);
    cache_forget(c, &pg->sa, seq);
    cache_forget(c, &pg->mk, seq);
    tab_to_ring(c, seq, 0);
}

cuda_kv_view paged_view(const cuda_ctx *c, int il, int seq, int64_t n_kv, bool sa)
{
    const cuda_paged *pg = c->pg;
    cuda_kv_view kv;
    memset(&kv, 0, sizeof(kv));
    kv.dtype = c->kv_dtype;
    kv.k_scale = c->k_scale;
    kv.v_scale = c->v_scale;
    kv.page_tokens = pg->pt;
    kv.n_kv = n_kv;
    const unsigned long long *t = pg->tab + tab_index(c, seq, il, 0);
    kv.kptr_dev = (const uint64_t *)(t + (size_t)(sa ? PT_SA_K : PT_MK_K) * pg->max_pages);
    kv.vptr_dev = sa ? (const uint64_t *)(t + (size_t)PT_SA_V * pg->max_pages) : NULL;
    if (!sa && pg->pc_dev && pg->pc_chunks[il]) { /* mask estimation: the probe cache too */
        kv.pc_dev = pg->pc_dev + (size_t)seq * pg->pc_seq_bytes + pg->pc_off[il];
        kv.pc_ok_dev = pg->pc_ok + (size_t)seq * pg->pc_seq_ok + pg->pc_okoff[il];
        kv.pc_base = pg->pc_base[il];
        kv.pc_chunks = pg->pc_chunks[il];
        kv.pc_lc = pg->pc_lc[il];
    }
    return kv;
}

int paged_check_room(const cuda_ctx *c, int seq, int64_t pos0, int64_t n, cm_err *err)
{
    const cuda_paged *pg = c->pg;
    const int64_t p0 = pos0 / pg->pt, p1 = (pos0 + n - 1) / pg->pt;
    if (p0 < pg->tail0[seq])
        return cm_err_set(err, -EINVAL,
                          "sequence %d: token %lld falls in page %lld, which was already flushed "
                          "to host memory (pages from %lld are writable)",
                          seq, (long long)pos0, (long long)p0, (long long)pg->tail0[seq]);
    if (p1 - pg->tail0[seq] >= pg->ring)
        return cm_err_set(err, -CM_ELIMIT,
                          "sequence %d: the GPU ring holds %lld pages of %d tokens from page %lld; "
                          "tokens up to %lld do not fit (raise tail_tokens, or set a page sink)",
                          seq, (long long)pg->ring, pg->pt, (long long)pg->tail0[seq],
                          (long long)(pos0 + n));
    return 0;
}

void paged_store(cuda_ctx *c, int il, const float *qkv, int64_t n)
{
    const mdl_hparams *hp = &c->m->hp;
    const cuda_paged *pg = c->pg;
    const int64_t qd = hp->n_head * hp->head_dim;
    if (c->kv_dtype == CUDA_KV_FP8)
        paged_store_kernel<uint8_t><<<(unsigned)n, 256, 0, c->stream>>>(
            qkv, c->slot_dev, c->q, pg->tab, il, (int)hp->n_layer, pg->max_pages, c->n_ctx, pg->pt,
            (int)hp->n_head_kv, (int)hp->head_dim, qd, 1.0f / c->k_scale, 1.0f / c->v_scale);
    else
        paged_store_kernel<bf16><<<(unsigned)n, 256, 0, c->stream>>>(
            qkv, c->slot_dev, c->q, pg->tab, il, (int)hp->n_layer, pg->max_pages, c->n_ctx, pg->pt,
            (int)hp->n_head_kv, (int)hp->head_dim, qd, 1.0f, 1.0f);
}

/* ---- cache update ---------------------------------------------------------------------------- */

static int cache_update(cuda_ctx *c, struct cuda_cache *ca, bool kv, int il, int seq,
                        const cuda_hip_mask *m, const hip_layer_config *lc, int bk, int64_t n_kv,
                        uint32_t tick, cudaStream_t st)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    const int64_t lim = CM_MIN(pg->tail0[seq], (n_kv + pg->pt - 1) / pg->pt);
    if (!ca->slots || lim <= 0) return 0;
    const size_t ps = ((size_t)seq * n_layer + il) * (size_t)pg->max_pages;
    uint32_t *need = ca->need + ps;
    const int st0 = kv ? ST_SA_NEED : ST_MK_NEED;
    if (kv) {
        /* selected blocks of the (single) query block, sink, window (with a block of slack) */
        mark_kernel<<<(m->kb + 127) / 128, 128, 0, st>>>(need, (const long long *)m->idx_dev, NULL,
                                                         bk, m->ks_dev, m->kb, 0, 0, pg->pt, lim,
                                                         tick);
        const long long win0 = CM_MAX((long long)0, (long long)(n_kv - lc->sliding_window_size -
                                                                bk));
        mark_kernel<<<1, 32, 0, st>>>(need, NULL, NULL, 0, NULL, 1, 0,
                                      (long long)lc->sink_token_size, pg->pt, lim, tick);
        mark_kernel<<<1, 32, 0, st>>>(need, NULL, NULL, 0, NULL, 1, win0, (long long)n_kv, pg->pt,
                                      lim, tick);
    } else {
        if (m->n_stages < 2) return 0;
        const int cap = m->cand_cap[1];
        mark_kernel<<<(cap + 127) / 128, 128, 0, st>>>(
            need, (const long long *)m->cand_L_dev[1], (const long long *)m->cand_R_dev[1], 0,
            m->cand_n_dev[1], cap, 0, 0, pg->pt, lim, tick);
    }
    cudaMemsetAsync(ca->list, 0, sizeof(int32_t), st);
    scan_kernel<<<(unsigned)CM_MIN((lim + 255) / 256, (int64_t)256), 256, 0, st>>>(
        need, ca->slot_of + ps, ca->tick + (size_t)il * ca->slots, ca->list, lim, tick,
        pg->stat_dev, st0);
    int n2 = 1;
    while (n2 < ca->slots) n2 <<= 1;
    select_kernel<<<1, 1024, sizeof(unsigned long long) * n2, st>>>(
        ca->owner, ca->tick + (size_t)il * ca->slots, ca->slots, ca->slot_of, ca->list, ca->assign,
        pg->tab, seq, il, n_layer, pg->max_pages, ca->data, ca->slot_bytes, pg->half_bytes, kv,
        tick, pg->stat_dev, st0);
    install_kernel<<<(unsigned)ca->slots, 256, 0, st>>>(
        ca->list, ca->assign, pg->tab + tab_index(c, seq, il, 0), pg->max_pages,
        ca->data + (size_t)il * ca->slots * ca->slot_bytes, ca->slot_bytes, pg->half_bytes, kv);
    if (kv) pg->st.sa_updates++;
    else pg->st.mk_updates++;
    return cuerr(cudaGetLastError());
}

int paged_after_refresh(cuda_ctx *c, int il, int seq, int fs, const cuda_hip_mask *m,
                        int64_t n_kv)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    hip_args ha;
    hip_args_from_config(&ha, c->hip, il, n_layer, false);
    const uint32_t tick = ++pg->tick;
    int rc = cache_update(c, &pg->sa, true, il, seq, m, ha.layer, ha.block_size_k, n_kv, tick,
                          c->stream);
    if (rc || fs != 0 || !pg->mk.slots) return rc;
    /* the keys-only cache (the stage-1 candidates' pages, read by the later refreshes of this
     * layer): on mk_stream behind the refresh, overlapping this step's attention and later
     * layers; the next mask estimation of the layer waits for it (paged_before_mask) */
    rc = cuerr(cudaEventRecord(pg->mk_go, c->stream));
    if (rc == 0) rc = cuerr(cudaStreamWaitEvent(pg->mk_stream, pg->mk_go, 0));
    if (rc == 0)
        rc = cache_update(c, &pg->mk, false, il, seq, m, ha.layer, ha.block_size_k, n_kv, tick,
                          pg->mk_stream);
    if (rc == 0) rc = cuerr(cudaEventRecord(pg->mk_done[il], pg->mk_stream));
    if (rc == 0) pg->mk_pending[il] = true;
    return rc;
}

int paged_before_mask(cuda_ctx *c, int il)
{
    cuda_paged *pg = c->pg;
    if (!pg || !pg->mk_pending || !pg->mk_pending[il]) return 0;
    pg->mk_pending[il] = false;
    return cuerr(cudaStreamWaitEvent(c->stream, pg->mk_done[il], 0));
}

/* ---- stage-0 probe cache --------------------------------------------------------------------- */

/* One block per chunk j in [j0, j0 + gridDim.x): copy the probe keys of every KV head from
 * their homes (home: the HOME_K page pointers, K only) into the cache, then mark the chunk. */
static __global__ void pc_fill_kernel(cuda_kv_addr home, long long base, int lc, long long j0,
                                      uint8_t *pc, uint8_t *ok)
{
    const long long j = j0 + blockIdx.x;
    const int hkv = home.hkv, vec = home.row_bytes / 16;
    const int n = CUDA_PC_SLOTS * hkv * vec;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int slot = i / (hkv * vec), g = (i / vec) % hkv, v = i % vec;
        const long long t = base + j * lc + cuda_pc_offset(slot, lc);
        const uint4 *src = (const uint4 *)cuda_kv_krow(home, t, g);
        uint4 *dst = (uint4 *)(pc + cuda_pc_row_off(j, slot, hkv, g, home.row_bytes));
        dst[v] = src[v];
    }
    __syncthreads();
    if (threadIdx.x == 0) ok[j] = 1;
}

/* Fill the probe cache of seq for its complete chunks below n_tokens (after a bind). */
static int pc_fill(cuda_ctx *c, int seq, int64_t n_tokens)
{
    cuda_paged *pg = c->pg;
    if (!pg->pc_dev) return 0;
    const int n_layer = (int)c->m->hp.n_layer;
    cuda_kv_addr home;
    memset(&home, 0, sizeof(home));
    home.page_tokens = pg->pt;
    home.hkv = (int)c->m->hp.n_head_kv;
    home.row_bytes = (int)(c->m->hp.head_dim * c->kv_elem);
    for (int il = 0; il < n_layer; il++) {
        if (!pg->pc_chunks[il]) continue;
        const int64_t full = n_tokens > pg->pc_base[il] ? (n_tokens - pg->pc_base[il]) / pg->pc_lc[il] : 0;
        const int64_t nj = CM_MIN(full, pg->pc_chunks[il]);
        if (nj <= 0) continue;
        uint8_t *dst = pg->pc_dev + (size_t)seq * pg->pc_seq_bytes + pg->pc_off[il];
        uint8_t *ok = pg->pc_ok + (size_t)seq * pg->pc_seq_ok + pg->pc_okoff[il];
        home.kptr = pg->tab + tab_index(c, seq, il, PT_HOME_K);
        for (int64_t j0 = 0; j0 < nj; j0 += 65535) {
            const unsigned nb = (unsigned)CM_MIN(nj - j0, (int64_t)65535);
            pc_fill_kernel<<<nb, 256, 0, c->stream>>>(home, (long long)pg->pc_base[il],
                                                      pg->pc_lc[il], (long long)j0, dst, ok);
        }
        pg->st.pc_chunks += (uint64_t)nj;
    }
    return cuerr(cudaGetLastError());
}

/* ---- sink, flush, bind ----------------------------------------------------------------------- */

/* Copy the first n entries of the pinned scatter list to the GPU and apply them to the page
 * tables, on stream st. sync: wait until done (the list may be rewritten at once); else the
 * caller waits (sink_wait) before the list is written again. */
static int fix_apply(cuda_ctx *c, int64_t n, cudaStream_t st, bool sync)
{
    cuda_paged *pg = c->pg;
    if (!n) return 0;
    cudaError_t e = cudaMemcpyAsync(pg->fix_dev, pg->fix_host, sizeof(unsigned long long) * 2 * n,
                                    cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) {
        scatter_kernel<<<(unsigned)CM_MIN((n + 255) / 256, (int64_t)1024), 256, 0, st>>>(
            pg->tab, pg->fix_dev, n);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess && sync) e = cudaStreamSynchronize(st);
    return cuerr(e);
}

/* Wait for the page sink in flight, if any (its copies, table updates and scatter list). */
int sink_wait(cuda_ctx *c)
{
    cuda_paged *pg = c->pg;
    if (!pg || !pg->sk_pending) return 0;
    pg->sk_pending = false;
    return cuerr(cudaStreamSynchronize(pg->sk_stream));
}

/* Move pages [tail0, p_end) of seq (every layer) to the sink. The copies and the page-table
 * updates are enqueued on sk_stream behind the work enqueued so far (the chunk that computed the
 * pages) and are not waited for: they overlap the next chunk. Until the table update runs, the
 * kernels read the pages' ring copies, which hold the same bytes; paged_prepare makes the compute
 * stream wait for the sink before a ring slot of these pages is reused. */
static int sink_pages(cuda_ctx *c, int seq, int64_t p_end, cm_err *err)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    int rc = sink_wait(c); /* the previous sink read the scatter list */
    if (rc) return cm_err_set(err, rc, "page sink: %s", cudaGetErrorString(cudaGetLastError()));
    cudaError_t e = cudaEventRecord(pg->sk_chunk, c->stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(pg->sk_stream, pg->sk_chunk, 0);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "page sink: %s", cudaGetErrorString(e));
    pg->sk_pending = true;
    pg->sk_seq = seq;
    pg->sk_lo = pg->tail0[seq];
    int64_t nf = 0;
    for (int64_t p = pg->tail0[seq]; p < p_end; p++) {
        for (int il = 0; il < n_layer; il++) {
            uint64_t ka = 0, va = 0;
            rc = pg->sink(pg->sink_user, seq, il, p, &ka, &va, err);
            if (rc < 0) return rc;
            if (!ka || !va || (ka & 15) || (va & 15))
                return cm_err_set(err, -EINVAL, "page sink gave a NULL or misaligned address");
            const unsigned long long r = ring_addr(c, seq, il, p);
            e = cudaMemcpyAsync((void *)(uintptr_t)ka, (const void *)(uintptr_t)r, pg->half_bytes,
                                cudaMemcpyDeviceToHost, pg->sk_stream);
            if (e == cudaSuccess)
                e = cudaMemcpyAsync((void *)(uintptr_t)va,
                                    (const void *)(uintptr_t)(r + pg->half_bytes), pg->half_bytes,
                                    cudaMemcpyDeviceToHost, pg->sk_stream);
            if (e != cudaSuccess)
                return cm_err_set(err, CUDA_ERR(e), "copy of a page to the sink: %s",
                                  cudaGetErrorString(e));
            pg->st.bytes_d2h += pg->page_bytes;
            /* the page now lives in host memory; the kernels keep reading its ring copy until
             * the ring slot is reused (paged_prepare) */
            const size_t t0 = tab_index(c, seq, il, 0);
            const unsigned long long v[2] = {ka, va};
            for (int t = 0; t < 2; t++) {
                pg->fix_host[2 * nf] = t0 + (size_t)t * pg->max_pages + (size_t)p;
                pg->fix_host[2 * nf + 1] = v[t];
                nf++;
            }
            if (nf + PT_N > pg->fix_cap) { /* (a chunk larger than the ring: not in practice) */
                int rc2 = fix_apply(c, nf, pg->sk_stream, true);
                if (rc2) return cm_err_set(err, rc2, "page table update failed");
                nf = 0;
            }
        }
    }
    rc = fix_apply(c, nf, pg->sk_stream, false);
    if (rc == 0) rc = cuerr(cudaEventRecord(pg->sk_done, pg->sk_stream));
    if (rc) return cm_err_set(err, rc, "page table update failed");
    if (p_end > pg->tail0[seq]) pg->tail0[seq] = p_end;
    return 0;
}

int paged_after_chunk(cuda_ctx *c, int seq, bool all, cm_err *err)
{
    cuda_paged *pg = c->pg;
    if (!pg->sink) return 0;
    const int64_t n = c->n_past[seq];
    const int64_t p_end = all ? (n + pg->pt - 1) / pg->pt : n / pg->pt;
    if (p_end <= pg->tail0[seq]) return 0;
    return sink_pages(c, seq, p_end, err);
}

/* Copy layer il's staged pages into buffer il % 2 on the staging stream (after the buffer's
 * previous user, layer il - 2, has finished). */
static int stage_issue(cuda_ctx *c, int il)
{
    cuda_paged *pg = c->pg;
    const int b = il % 2;
    cudaError_t e = cudaStreamWaitEvent(pg->st_stream, pg->st_free[b], 0);
    const int64_t n = pg->st_p1 - pg->st_p0;
    if (e == cudaSuccess) {
        stage_kernel<<<(unsigned)CM_MIN(n, (int64_t)4096), 256, 0, pg->st_stream>>>(
            pg->tab + tab_index(c, pg->st_seq, il, 0), pg->max_pages, pg->st_p0, n,
            pg->stage_dev[b], pg->half_bytes);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaEventRecord(pg->st_copied[b], pg->st_stream);
    if (e == cudaSuccess) pg->st.bytes_h2d_stage += (uint64_t)n * pg->page_bytes;
    return cuerr(e);
}

int paged_stage_begin(cuda_ctx *c, int seq)
{
    cuda_paged *pg = c->pg;
    pg->st_on = false;
    if (!pg->stage_pages) return 0;
    /* pages below ring_lo are read from host memory: stage the most recent of them */
    pg->st_p1 = pg->ring_lo[seq];
    pg->st_p0 = CM_MAX((int64_t)0, pg->st_p1 - pg->stage_pages);
    if (pg->st_p1 <= pg->st_p0) return 0;
    pg->st_seq = seq;
    pg->st_on = true;
    /* both buffers are free once the compute stream is here */
    cudaError_t e = cudaEventRecord(pg->st_free[0], c->stream);
    if (e == cudaSuccess) e = cudaEventRecord(pg->st_free[1], c->stream);
    int rc = cuerr(e);
    const int n_layer = (int)c->m->hp.n_layer;
    for (int il = 0; il < CM_MIN(2, n_layer) && rc == 0; il++) rc = stage_issue(c, il);
    return rc;
}

int paged_stage_before(cuda_ctx *c, int il)
{
    cuda_paged *pg = c->pg;
    if (!pg || !pg->st_on) return 0;
    return cuerr(cudaStreamWaitEvent(c->stream, pg->st_copied[il % 2], 0));
}

int paged_stage_after(cuda_ctx *c, int il)
{
    cuda_paged *pg = c->pg;
    if (!pg || !pg->st_on) return 0;
    /* layer il reads host memory again for those pages; its buffer goes to layer il + 2 */
    const int n_layer = (int)c->m->hp.n_layer;
    const int64_t n = pg->st_p1 - pg->st_p0;
    dim3 grid((unsigned)CM_MIN((n + 255) / 256, (int64_t)1024), 1);
    repoint_kernel<<<grid, 256, 0, c->stream>>>(pg->tab + tab_index(c, pg->st_seq, il, 0),
                                                pg->max_pages, pg->st_p0, pg->st_p1);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaEventRecord(pg->st_free[il % 2], c->stream);
    int rc = cuerr(e);
    if (rc == 0 && il + 2 < n_layer) rc = stage_issue(c, il + 2);
    if (il == n_layer - 1) pg->st_on = false;
    return rc;
}

int paged_prepare(cuda_ctx *c, int seq, int64_t pos0, int64_t n)
{
    cuda_paged *pg = c->pg;
    const int n_layer = (int)c->m->hp.n_layer;
    /* Flushed pages [ring_lo, tail0) are still read from their ring copy. The pages up to
     * (pos0 + n - 1) / pt take over the ring slots of pages below lose_end: point the kernels at
     * the host copy of those first (paged_check_room keeps every write within the ring, so they
     * are all flushed). */
    const int64_t lose_end =
        CM_MIN((pos0 + n - 1) / pg->pt - pg->ring + 1, pg->tail0[seq]);
    if (lose_end <= pg->ring_lo[seq]) return 0;
    /* pages of the sink in flight: their host copies and table entries first */
    if (pg->sk_pending && pg->sk_seq == seq && pg->sk_lo < lose_end) {
        int rc = cuerr(cudaStreamWaitEvent(c->stream, pg->sk_done, 0));
        if (rc) return rc;
    }
    dim3 grid((unsigned)CM_MIN((lose_end - pg->ring_lo[seq] + 255) / 256, (int64_t)1024),
              (unsigned)n_layer);
    repoint_kernel<<<grid, 256, 0, c->stream>>>(pg->tab + tab_index(c, seq, 0, 0), pg->max_pages,
                                                pg->ring_lo[seq], lose_end);
    pg->ring_lo[seq] = lose_end;
    return cuerr(cudaGetLastError());
}

extern "C" int cuda_ctx_set_page_sink(cuda_ctx *c, cuda_page_sink_fn fn, void *user)
{
    if (!c || !c->pg) return -EINVAL;
    c->pg->sink = fn;
    c->pg->sink_user = user;
    return 0;
}

extern "C" int cuda_ctx_flush(cuda_ctx *c, int seq, cm_err *err)
{
    if (!c || !c->pg) return cm_err_set(err, -EINVAL, "cuda context: not paged");
    if (seq < 0 || seq >= c->n_seq)
        return cm_err_set(err, -EINVAL, "sequence %d is outside [0, %d)", seq, c->n_seq);
    if (!c->pg->sink) return cm_err_set(err, -EINVAL, "cuda context: no page sink");
    if (cudaSetDevice(c->m->dev) != cudaSuccess)
        return cm_err_set(err, -ENODEV, "cannot use the GPU");
    int rc = paged_after_chunk(c, seq, true, err);
    if (rc) return rc;
    rc = sink_wait(c);
    if (rc) return cm_err_set(err, rc, "flush: %s", cudaGetErrorString(cudaGetLastError()));
    cudaError_t e = cudaStreamSynchronize(c->stream);
    return e == cudaSuccess ? 0 : cm_err_set(err, CUDA_ERR(e), "flush: %s", cudaGetErrorString(e));
}

extern "C" int cuda_ctx_bind_host(cuda_ctx *c, int seq, int64_t n_tokens, const uint64_t *k_addr,
                                  const uint64_t *v_addr, cm_err *err)
{
    if (!c || !c->pg) return cm_err_set(err, -EINVAL, "cuda context: not paged");
    cuda_paged *pg = c->pg;
    if (seq < 0 || seq >= c->n_seq)
        return cm_err_set(err, -EINVAL, "sequence %d is outside [0, %d)", seq, c->n_seq);
    if (n_tokens < 0 || n_tokens > c->n_ctx)
        return cm_err_set(err, -CM_ELIMIT, "binding %lld tokens: outside [0, n_ctx %lld]",
                          (long long)n_tokens, (long long)c->n_ctx);
    const int n_layer = (int)c->m->hp.n_layer;
    const int64_t n_pages = (n_tokens + pg->pt - 1) / pg->pt, full = n_tokens / pg->pt;
    if (n_pages && (!k_addr || !v_addr))
        return cm_err_set(err, -EINVAL, "binding %lld tokens without addresses",
                          (long long)n_tokens);
    for (int64_t i = 0; i < n_pages * n_layer; i++)
        if (!k_addr[i] || !v_addr[i] || (k_addr[i] & 15) || (v_addr[i] & 15))
            return cm_err_set(err, -EINVAL,
                              "host page %lld of layer %lld: NULL or not 16-byte aligned",
                              (long long)(i % n_pages), (long long)(i / n_pages));
    if (cudaSetDevice(c->m->dev) != cudaSuccess)
        return cm_err_set(err, -ENODEV, "cannot use the GPU");
    cuda_ctx_reset(c, seq); /* tables → ring, caches forgotten, HiP state reset */
    unsigned long long *h = NULL;
    const size_t row = (size_t)PT_N * (size_t)pg->max_pages;
    if (full > 0) {
        h = (unsigned long long *)malloc(sizeof(*h) * row);
        if (!h) return cm_err_set(err, -ENOMEM, "out of memory");
    }
    cudaError_t e = cudaSuccess;
    for (int il = 0; il < n_layer && full > 0 && e == cudaSuccess; il++) {
        const uint64_t *ka = k_addr + (size_t)il * n_pages, *va = v_addr + (size_t)il * n_pages;
        for (int64_t p = 0; p < full; p++) {
            h[PT_HOME_K * pg->max_pages + p] = ka[p];
            h[PT_HOME_V * pg->max_pages + p] = va[p];
            h[PT_SA_K * pg->max_pages + p] = ka[p];
            h[PT_SA_V * pg->max_pages + p] = va[p];
            h[PT_MK_K * pg->max_pages + p] = ka[p];
        }
        unsigned long long *dst = pg->tab + tab_index(c, seq, il, 0);
        for (int t = 0; t < PT_N && e == cudaSuccess; t++)
            e = cudaMemcpyAsync(dst + (size_t)t * pg->max_pages, h + (size_t)t * pg->max_pages,
                                sizeof(*h) * (size_t)full, cudaMemcpyHostToDevice, c->stream);
        /* pageable source: the copy has read h when cudaMemcpyAsync returns */
    }
    pg->tail0[seq] = full;
    pg->ring_lo[seq] = full;
    if (n_pages > full) /* the partial last page → its ring slot (decode appends after it) */
        for (int il = 0; il < n_layer && e == cudaSuccess; il++) {
            const unsigned long long r = ring_addr(c, seq, il, full);
            e = cudaMemcpyAsync((void *)(uintptr_t)r,
                                (const void *)(uintptr_t)k_addr[(size_t)il * n_pages + full],
                                pg->half_bytes, cudaMemcpyDefault, c->stream);
            if (e == cudaSuccess)
                e = cudaMemcpyAsync((void *)(uintptr_t)(r + pg->half_bytes),
                                    (const void *)(uintptr_t)v_addr[(size_t)il * n_pages + full],
                                    pg->half_bytes, cudaMemcpyDefault, c->stream);
        }
    int prc = e == cudaSuccess ? pc_fill(c, seq, n_tokens) : 0;
    if (prc) {
        free(h);
        return cm_err_set(err, prc, "binding host pages: filling the probe cache failed");
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    free(h);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "binding host pages: %s", cudaGetErrorString(e));
    c->n_past[seq] = n_tokens;
    return 0;
}

extern "C" int cuda_ctx_fill_host_synthetic(cuda_ctx *c, const uint64_t *k_addr,
                                            const uint64_t *v_addr, int64_t n_addr, uint64_t seed,
                                            cm_err *err)
{
    if (!c || !c->pg) return cm_err_set(err, -EINVAL, "cuda context: not paged");
    if (n_addr <= 0) return 0;
    cuda_paged *pg = c->pg;
    unsigned long long *a = NULL;
    cudaError_t e = cudaMalloc((void **)&a, sizeof(*a) * 2 * (size_t)n_addr);
    if (e == cudaSuccess)
        e = cudaMemcpy(a, k_addr, sizeof(*a) * (size_t)n_addr, cudaMemcpyHostToDevice);
    if (e == cudaSuccess)
        e = cudaMemcpy(a + n_addr, v_addr, sizeof(*a) * (size_t)n_addr, cudaMemcpyHostToDevice);
    const int64_t elems = (int64_t)(pg->half_bytes / c->kv_elem);
    const uint64_t key = seed * 0xD1B54A32D192ED03ULL + 0x2545F4914F6CDD1DULL;
    for (int64_t i = 0; i < n_addr && e == cudaSuccess; i += 65535) {
        const unsigned nb = (unsigned)CM_MIN(n_addr - i, (int64_t)65535);
        if (c->kv_dtype == CUDA_KV_FP8)
            fill_pages_kernel<uint8_t><<<nb, 256, 0, c->stream>>>(
                a + i, a + n_addr + i, elems, key + (uint64_t)i * 0x9E37ULL, 1.0f / c->k_scale,
                1.0f / c->v_scale);
        else
            fill_pages_kernel<bf16><<<nb, 256, 0, c->stream>>>(
                a + i, a + n_addr + i, elems, key + (uint64_t)i * 0x9E37ULL, 1.0f, 1.0f);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    cudaFree(a);
    if (e != cudaSuccess)
        return cm_err_set(err, CUDA_ERR(e), "synthetic fill of host pages: %s",
                          cudaGetErrorString(e));
    return 0;
}

/* ---- statistics and profile ------------------------------------------------------------------ */

void paged_prof_mark(cuda_ctx *c, int i)
{
    if (c->pg && c->pg->prof) cudaEventRecord(c->pg->ev[i], c->stream);
}

/* After marks 0 (before mask), 1 (after mask), 2 (after cache update), 3 (after attention) of
 * one layer: add the three intervals (synchronizes on the last event). */
void paged_prof_collect(cuda_ctx *c)
{
    cuda_paged *pg = c->pg;
    if (!pg || !pg->prof) return;
    cudaEventSynchronize(pg->ev[3]);
    for (int i = 0; i < 3; i++) {
        float ms = 0.0f;
        if (cudaEventElapsedTime(&ms, pg->ev[i], pg->ev[i + 1]) == cudaSuccess)
            pg->prof_ms[i] += ms;
    }
}

extern "C" int cuda_ctx_offload_stats(cuda_ctx *c, cuda_offload_stats *out)
{
    if (!c || !c->pg || !out) return -EINVAL;
    cuda_paged *pg = c->pg;
    unsigned long long s[ST_N];
    cudaError_t e = cudaStreamSynchronize(pg->mk_stream); /* its counters too */
    if (e == cudaSuccess) e = cudaMemcpy(s, pg->stat_dev, sizeof(s), cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return CUDA_ERR(e);
    *out = pg->st;
    out->sa_needed = s[ST_SA_NEED];
    out->sa_hits = s[ST_SA_HIT];
    out->sa_installs = s[ST_SA_INST];
    out->sa_overflow = s[ST_SA_OVER];
    out->mk_needed = s[ST_MK_NEED];
    out->mk_hits = s[ST_MK_HIT];
    out->mk_installs = s[ST_MK_INST];
    out->mk_overflow = s[ST_MK_OVER];
    out->bytes_h2d = s[ST_SA_INST] * pg->sa.slot_bytes + s[ST_MK_INST] * pg->mk.slot_bytes;
    out->ms_mask = pg->prof_ms[0];
    out->ms_cache = pg->prof_ms[1];
    out->ms_attn = pg->prof_ms[2];
    return 0;
}

extern "C" void cuda_ctx_offload_reset(cuda_ctx *c)
{
    if (!c || !c->pg) return;
    cuda_paged *pg = c->pg;
    cudaMemset(pg->stat_dev, 0, sizeof(unsigned long long) * ST_N);
    const size_t keep = pg->st.gpu_kv_bytes;
    memset(&pg->st, 0, sizeof(pg->st));
    pg->st.gpu_kv_bytes = keep;
    memset(pg->prof_ms, 0, sizeof(pg->prof_ms));
}
