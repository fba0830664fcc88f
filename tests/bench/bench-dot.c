/*
 * bench-dot.c — ns per tn_vec_dot call at each SIMD level (a micro benchmark, not a test).
 *
 * Build (not part of ctest):
 *   gcc -std=c11 -O2 -mavx2 -mfma -mf16c -Icommon tests/bench/bench-dot.c \
 *       build/lib/libihip_common.a -lm -lpthread -o /tmp/bench-dot
 * Usage: bench-dot [rows]   (rows cycled per pass; default 256 = the weights stay in L2, as in
 *                            a matvec whose activation row is reused across rows)
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor/tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    const int rows = argc > 1 ? atoi(argv[1]) : 256;
    static const struct { int type; int n; } cases[] = {
        {TN_Q4_1, 576}, {TN_Q4_1, 1536}, {TN_Q8_0, 576}, {TN_Q8_0, 1536}, {TN_Q4_0, 576},
        {TN_Q5_0, 576}, {TN_Q5_1, 576}, {TN_Q4_K, 1536}, {TN_Q5_K, 1536}, {TN_Q6_K, 1536},
        {TN_Q2_K, 1536}, {TN_Q3_K, 1536}, {TN_F32, 576}, {TN_F16, 576}, {TN_BF16, 576},
    };
    const int top = tn_simd_force(TN_SIMD_AVX512);
    printf("%-6s %6s %10s %10s %10s\n", "type", "n", "scalar", "avx2", "avx512");
    volatile float sink = 0;
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const int type = cases[c].type, n = cases[c].n, at = tn_vec_dot_type(type);
        const int64_t rs = tn_row_size(type, n);
        float *x = malloc(sizeof(float) * n);
        uint8_t *w = malloc((size_t)rs * rows), *a = malloc((size_t)tn_row_size(at, n));
        srand(1);
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < n; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
            tn_quantize_weight_row(type, x, w + (size_t)r * rs, n);
        }
        for (int i = 0; i < n; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
        tn_quantize_row(at, x, a, n);
        printf("%-6s %6d", tn_type_name(type), n);
        for (int lvl = TN_SIMD_SCALAR; lvl <= TN_SIMD_AVX512; lvl++) {
            if (lvl > top) {
                printf(" %10s", "-");
                continue;
            }
            tn_simd_force(lvl);
            tn_vec_dot_fn fn = tn_vec_dot_func(type);
            const int passes = (int)(1e7 / ((double)n * rows)) + 1;
            double best = 1e30;
            for (int rep = 0; rep < 15; rep++) {
                const double t0 = now_ns();
                for (int p = 0; p < passes; p++)
                    for (int r = 0; r < rows; r++) sink += fn(n, w + (size_t)r * rs, a);
                const double dt = (now_ns() - t0) / ((double)passes * rows);
                best = dt < best ? dt : best;
            }
            printf(" %10.1f", best);
        }
        printf("   ns/dot\n");
        free(x);
        free(w);
        free(a);
    }
    (void)sink;
    return 0;
}
