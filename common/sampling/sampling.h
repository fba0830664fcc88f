/*
 * sampling.h — choose the next token from logits: greedy, temperature, top-k, top-p, min-p,
 * repetition penalty, with a seeded PRNG so a (seed, params, prompt) triple is reproducible.
 *
 * Order of application: repetition penalty → top-k → top-p → min-p → temperature → draw.
 * temperature == 0 means greedy (argmax; ties → lowest id).
 */
#ifndef SMP_SAMPLING_H
#define SMP_SAMPLING_H

#include "../base/cm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct smp_params {
    float temperature;   /* ≥ 0; 0 = greedy (default 0.8) */
    int32_t top_k;       /* ≥ 0; 0 = off (default 40) */
    float top_p;         /* (0, 1]; 1 = off (default 0.95) */
    float min_p;         /* [0, 1); 0 = off (default 0.05) */
    float repeat_penalty;/* ≥ 1 … 1 = off (default 1) */
    int32_t repeat_last_n; /* tokens of history the penalty looks at (default 64) */
    uint64_t seed;       /* PRNG seed (default 0xC0FFEE) */
} smp_params;

CM_API smp_params smp_default_params(void);
/* 0, or -EINVAL with err naming the field and the allowed range (NaN is rejected). */
CM_API int smp_params_validate(const smp_params *p, cm_err *err);

typedef struct smp_sampler smp_sampler;

/* n_vocab > 0. Returns NULL on allocation failure. Free with smp_free. */
CM_API smp_sampler *smp_init(const smp_params *p, int64_t n_vocab);
CM_API void smp_free(smp_sampler *s);
/* Pick a token from logits[n_vocab] (not modified). history: tokens so far (for the penalty). */
CM_API int32_t smp_sample(smp_sampler *s, const float *logits, const int32_t *history,
                          int64_t n_history);
/* argmax, ties → lowest id. */
CM_API int32_t smp_argmax(const float *logits, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* SMP_SAMPLING_H */
