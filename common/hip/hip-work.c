/*
 * hip-work.c — scratch buffers of the HiP kernels and the cache-row loader.
 *
 * Buffers grow to the largest call seen and are then reused, so a steady decode loop allocates
 * nothing.
 */
#define _POSIX_C_SOURCE 200809L
#include "hip-impl.h"

#include <errno.h>
#include <stdlib.h>

int hip_buf_reserve(hip_buf *b, size_t bytes)
{
    if (bytes <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < bytes) cap *= 2;
    void *p = cm_alloc_aligned(cap, 64);
    if (!p) return -ENOMEM;
    cm_free_aligned(b->p);
    b->p = p;
    b->cap = cap;
    return 0;
}

hip_work *hip_work_init(void)
{
    return calloc(1, sizeof(hip_work));
}

void hip_work_free(hip_work *w)
{
    if (!w) return;
    for (int i = 0; i < HIP_BUF_COUNT; i++) cm_free_aligned(w->buf[i].p);
    free(w);
}

void hip_load_row(const cpu_kv_layer *kv, const void *base, int64_t t, int g, int d, float *dst)
{
    const char *row = (const char *)base + (size_t)t * kv->row_bytes;
    if (kv->kv_type == CPU_KV_F32) {
        memcpy(dst, (const float *)row + (size_t)g * (size_t)d, sizeof(float) * (size_t)d);
        return;
    }
    const uint16_t *h = (const uint16_t *)row + (size_t)g * (size_t)d;
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < d; i++) {
        /* IEEE half → float */
        uint32_t x = h[i], sign = (x & 0x8000u) << 16, exp = (x >> 10) & 0x1f, man = x & 0x3ff;
        uint32_t u;
        if (exp == 0x1f) {
            u = sign | 0x7f800000u | (man << 13);
        } else if (exp != 0) {
            u = sign | ((exp + 112) << 23) | (man << 13);
        } else if (man == 0) {
            u = sign;
        } else {
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
        }
        memcpy(dst + i, &u, 4);
    }
}
