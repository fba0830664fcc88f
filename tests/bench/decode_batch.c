/*
 * decode_batch.c — decode tokens/s of n sequences advanced together, in one process: the
 * per-sequence loop (one mdl_decode each, what --decode-batch off does) vs mdl_decode_batch in
 * exact and fast mode (a micro benchmark, not a test; tests/bench/decode_batch.py measures the
 * same through the workers).
 *
 * Build (not part of ctest):
 *   gcc -std=c11 -O2 -Icommon tests/bench/decode_batch.c build/lib/libihip_common.a -lm \
 *       -lpthread -o /tmp/decode_batch
 * Usage: decode_batch MODEL [threads=2] [steps=32] [prompt=64] [reps=3]
 * Each sequence gets its own prompt (random ids) and follows its own greedy tokens. The modes
 * run alternately, reps times, from the same prefilled state (contexts are re-prefilled before
 * each run) and the best time of each is kept, so load drift hits every mode alike.
 */
#define _POSIX_C_SOURCE 200809L

#include "base/cm.h"
#include "model/model.h"
#include "sampling/sampling.h"

#include <stdio.h>
#include <stdlib.h>

#define MAXN 8

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: decode_batch MODEL [threads] [steps] [prompt] [reps]\n");
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 2, steps = argc > 3 ? atoi(argv[3]) : 32;
    int n_prompt = argc > 4 ? atoi(argv[4]) : 64, reps = argc > 5 ? atoi(argv[5]) : 3;
    cm_err err = {0};
    mdl_model *m = mdl_model_load(argv[1], &err);
    if (!m) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    mdl_batch *b = mdl_batch_init(m, MAXN, threads, &err);
    mdl_ctx *c[MAXN];
    mdl_ctx_params p = mdl_ctx_default_params();
    p.n_ctx = n_prompt + steps + 8;
    p.n_threads = threads;
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)n_prompt * MAXN);
    uint64_t rs = 42;
    for (int i = 0; i < n_prompt * MAXN; i++) {
        rs = rs * 6364136223846793005ull + 1442695040888963407ull;
        prompt[i] = (int32_t)(100 + (rs >> 33) % 40000);
    }
    for (int i = 0; i < MAXN; i++)
        c[i] = mdl_ctx_init(m, &p, &err);
    const int ns[] = {1, 2, 4, 8};
    printf("threads %d, prompt %d, %d steps; tokens/s (best of %d)\n", threads, n_prompt, steps,
           reps);
    printf("| sequences | off | exact | fast | exact/off | fast/off |\n");
    printf("|---:|---:|---:|---:|---:|---:|\n");
    for (size_t k = 0; k < sizeof(ns) / sizeof(ns[0]); k++) {
        int n = ns[k];
        double best[3] = {1e30, 1e30, 1e30};
        for (int r = 0; r < reps; r++)
            for (int mode = 0; mode < 3; mode++) {
                int32_t tok[MAXN];
                for (int i = 0; i < n; i++) {
                    mdl_ctx_reset(c[i]);
                    mdl_prefill(c[i], prompt + i * n_prompt, n_prompt, NULL, NULL, NULL, &err);
                    tok[i] = smp_argmax(c[i]->logits, m->hp.n_vocab);
                }
                mdl_batch_set_exact(b, mode == 1);
                uint64_t t0 = cm_time_ns();
                for (int s = 0; s < steps; s++) {
                    if (mode == 0 || n == 1)
                        for (int i = 0; i < n; i++)
                            mdl_decode(c[i], tok[i], NULL, &err);
                    else
                        mdl_decode_batch(b, c, tok, n, NULL, &err);
                    for (int i = 0; i < n; i++)
                        tok[i] = smp_argmax(c[i]->logits, m->hp.n_vocab);
                }
                double t = (double)(cm_time_ns() - t0) / 1e9;
                if (t < best[mode]) best[mode] = t;
            }
        double tps[3];
        for (int mode = 0; mode < 3; mode++)
            tps[mode] = (double)n * steps / best[mode];
        printf("| %d | %.1f | %.1f | %.1f | %.2fx | %.2fx |\n", n, tps[0], tps[1], tps[2],
               tps[1] / tps[0], tps[2] / tps[0]);
        fflush(stdout);
    }
    double la[3] = {0};
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf %lf %lf", &la[0], &la[1], &la[2]) != 3) la[0] = -1;
        fclose(f);
    }
    printf("load average at the end: %.2f %.2f %.2f\n", la[0], la[1], la[2]);
    for (int i = 0; i < MAXN; i++)
        mdl_ctx_free(c[i]);
    mdl_batch_free(b);
    mdl_model_free(m);
    free(prompt);
    return 0;
}
