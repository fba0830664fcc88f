/*
 * sampling.c — token selection. Candidates are (id, logit) pairs; filters shrink the list, the
 * draw uses a xoshiro256** generator seeded by splitmix64 from the user's seed.
 */
#define _POSIX_C_SOURCE 200809L
#include "sampling.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct cand {
    int32_t id;
    float logit;
};

struct smp_sampler {
    smp_params p;
    int64_t n_vocab;
    struct cand *c; /* [n_vocab] */
    float *pen;     /* [n_vocab] scratch logits when a penalty applies */
    double *pr;     /* [n_vocab] candidate probabilities */
    uint64_t rng[4];
};

smp_params smp_default_params(void)
{
    smp_params p = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
                    .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 0xC0FFEEu};
    return p;
}

int smp_params_validate(const smp_params *p, cm_err *err)
{
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature) || p->temperature > 100.0f)
        return cm_err_set(err, -EINVAL, "temperature must be a number in [0, 100], got %g",
                          (double)p->temperature);
    if (p->top_k < 0) return cm_err_set(err, -EINVAL, "top-k must be ≥ 0, got %d", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return cm_err_set(err, -EINVAL, "top-p must be in (0, 1], got %g", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p < 1.0f))
        return cm_err_set(err, -EINVAL, "min-p must be in [0, 1), got %g", (double)p->min_p);
    if (!(p->repeat_penalty >= 1.0f && p->repeat_penalty <= 10.0f))
        return cm_err_set(err, -EINVAL, "repeat penalty must be in [1, 10], got %g",
                          (double)p->repeat_penalty);
    if (p->repeat_last_n < 0)
        return cm_err_set(err, -EINVAL, "repeat-last-n must be ≥ 0, got %d", p->repeat_last_n);
    return 0;
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t s[4])
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* uniform double in [0, 1) */
static double rng_uniform(uint64_t s[4])
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

smp_sampler *smp_init(const smp_params *p, int64_t n_vocab)
{
    smp_sampler *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->c = malloc(sizeof(struct cand) * (size_t)n_vocab);
    s->pen = malloc(sizeof(float) * (size_t)n_vocab);
    s->pr = malloc(sizeof(double) * (size_t)n_vocab);
    if (!s->c || !s->pen || !s->pr) {
        smp_free(s);
        return NULL;
    }
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    return s;
}

void smp_free(smp_sampler *s)
{
    if (!s) return;
    free(s->c);
    free(s->pen);
    free(s->pr);
    free(s);
}

int32_t smp_argmax(const float *logits, int64_t n)
{
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(logits[i]) && (best < 0 || logits[i] > logits[best])) best = i;
    return (int32_t)(best < 0 ? 0 : best); /* all NaN: a broken model; 0 is as good as any */
}

static int cand_desc(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->logit > y->logit) return -1;
    if (x->logit < y->logit) return 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

int32_t smp_sample(smp_sampler *s, const float *logits, const int32_t *history, int64_t n_history)
{
    const smp_params *p = &s->p;
    int64_t n = s->n_vocab;
    const float *lg = logits;
    if (p->repeat_penalty > 1.0f && n_history > 0 && p->repeat_last_n > 0) {
        memcpy(s->pen, logits, sizeof(float) * (size_t)n);
        int64_t from = n_history > p->repeat_last_n ? n_history - p->repeat_last_n : 0;
        for (int64_t i = from; i < n_history; i++) {
            int32_t id = history[i];
            if (id < 0 || id >= n) continue;
            /* penalise each distinct token once */
            bool seen = false;
            for (int64_t k = from; k < i; k++)
                if (history[k] == id) seen = true;
            if (seen) continue;
            s->pen[id] = s->pen[id] > 0 ? s->pen[id] / p->repeat_penalty : s->pen[id] * p->repeat_penalty;
        }
        lg = s->pen;
    }
    if (p->temperature == 0.0f) return smp_argmax(lg, n);

    /* candidates: keep top_k (or all), sorted descending */
    int64_t k = (p->top_k > 0 && p->top_k < n) ? p->top_k : n;
    for (int64_t i = 0; i < n; i++) {
        s->c[i].id = (int32_t)i;
        s->c[i].logit = isnan(lg[i]) ? -INFINITY : lg[i];
    }
    if (k < n) {
        /* quickselect: move the k largest to the front, then sort only those */
        int64_t lo = 0, hi = n - 1;
        while (lo < hi) {
            float pivot = s->c[(lo + hi) / 2].logit;
            int64_t i = lo, j = hi;
            while (i <= j) {
                while (s->c[i].logit > pivot) i++;
                while (s->c[j].logit < pivot) j--;
                if (i <= j) {
                    struct cand t = s->c[i];
                    s->c[i] = s->c[j];
                    s->c[j] = t;
                    i++;
                    j--;
                }
            }
            if (k - 1 <= j) hi = j;
            else if (k - 1 >= i) lo = i;
            else break;
        }
    }
    qsort(s->c, (size_t)k, sizeof(struct cand), cand_desc);

    /* softmax at temperature over the kept candidates */
    double mx = s->c[0].logit, sum = 0;
    double *pr = s->pr;
    for (int64_t i = 0; i < k; i++) {
        pr[i] = exp(((double)s->c[i].logit - mx) / p->temperature);
        sum += pr[i];
    }
    /* top-p: smallest prefix whose mass ≥ top_p */
    int64_t keep = k;
    if (p->top_p < 1.0f) {
        double acc = 0;
        for (int64_t i = 0; i < k; i++) {
            acc += pr[i] / sum;
            if (acc >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    /* min-p: drop candidates whose probability < min_p × the top one's */
    if (p->min_p > 0.0f) {
        for (int64_t i = 1; i < keep; i++)
            if (pr[i] < p->min_p * pr[0]) {
                keep = i;
                break;
            }
    }
    double tot = 0;
    for (int64_t i = 0; i < keep; i++) tot += pr[i];
    double u = rng_uniform(s->rng) * tot, acc = 0;
    int32_t out = s->c[keep - 1].id;
    for (int64_t i = 0; i < keep; i++) {
        acc += pr[i];
        if (u < acc) {
            out = s->c[i].id;
            break;
        }
    }
    return out;
}
