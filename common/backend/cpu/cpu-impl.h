/*
 * cpu-impl.h — small SIMD helpers shared by the CPU kernels (AVX2+FMA baseline; a scalar path
 * is kept for builds without it).
 */
#ifndef CPU_IMPL_H
#define CPU_IMPL_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CPU_HAVE_AVX2 1
#endif

#if CPU_HAVE_AVX2
static inline float cpu_hsum256(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* exp(x) for 8 floats: range reduction by ln2 and a degree-6 polynomial; relative error
 * about 2 ulp over [-87, 88]; exp(-inf) = 0. */
static inline __m256 cpu_exp256(__m256 x)
{
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447505531f);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* sum a[i]*b[i], n a multiple of 8 when AVX2 is on (head dims are). */
static inline float cpu_dot_f32(const float *a, const float *b, int n)
{
#if CPU_HAVE_AVX2
    if ((n & 31) == 0) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int i = 0; i < n; i += 32) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
        }
        return cpu_hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    }
#endif
    float s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[i] = y[i]*c + a*x[i] */
static inline void cpu_scale_axpy(float *y, float c, float a, const float *x, int n)
{
    int i = 0;
#if CPU_HAVE_AVX2
    __m256 vc = _mm256_set1_ps(c), va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_mul_ps(vc, _mm256_loadu_ps(y + i))));
#endif
    for (; i < n; i++) y[i] = y[i] * c + a * x[i];
}

/* y[i] += a*x[i] */
static inline void cpu_axpy(float *y, float a, const float *x, int n)
{
    int i = 0;
#if CPU_HAVE_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* dst[i] = exp(src[i] - m), returns the sum. */
static inline float cpu_exp_sub_sum(float *dst, const float *src, float m, int n)
{
    int i = 0;
    float s = 0;
#if CPU_HAVE_AVX2
    __m256 vm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = cpu_exp256(_mm256_sub_ps(_mm256_loadu_ps(src + i), vm));
        _mm256_storeu_ps(dst + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    s = cpu_hsum256(vs);
#endif
    for (; i < n; i++) {
        dst[i] = expf(src[i] - m);
        s += dst[i];
    }
    return s;
}

#endif /* CPU_IMPL_H */
