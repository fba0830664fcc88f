/*
 * tensor-dot-scalar.c — the reference dot products, one per weight type, against the activation
 * type of tn_vec_dot_type().
 *
 * Each block's quants are multiplied and summed as integers, and only the block sum is scaled
 * in float (d_w * d_a * sumi, plus m_w * s_a for the "_1" types, minus dmin * sum(min * bsums)
 * for the K-quants) — the same scheme as llama.cpp, so rounding behaves alike. The SIMD files
 * must agree with these to float re-association error. Float types accumulate in double.
 */
#define _POSIX_C_SOURCE 200809L

#include "tensor-impl.h"

static float tn_dot_f32(int64_t n, const void *w, const void *a)
{
    const float *x = w, *y = a;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)(x[i] * y[i]);
    return (float)s;
}

static float tn_dot_f16(int64_t n, const void *w, const void *a)
{
    const uint16_t *x = w, *y = a;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)(tn_h2f(x[i]) * tn_h2f(y[i]));
    return (float)s;
}

static float tn_dot_bf16(int64_t n, const void *w, const void *a)
{
    const uint16_t *x = w, *y = a;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)(tn_bf2f(x[i]) * tn_bf2f(y[i]));
    return (float)s;
}

static float tn_dot_q4_0(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_0 *x = w;
    const tn_block_q8_0 *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += ((x[i].qs[j] & 0x0f) - 8) * y[i].qs[j];
            sumi += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        }
        s += tn_h2f(x[i].d) * tn_h2f(y[i].d) * (float)sumi;
    }
    return s;
}

static float tn_dot_q4_1(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_1 *x = w;
    const tn_block_q8_1 *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += (x[i].qs[j] & 0x0f) * y[i].qs[j];
            sumi += (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        }
        s += tn_h2f(x[i].d) * tn_h2f(y[i].d) * (float)sumi + tn_h2f(x[i].m) * tn_h2f(y[i].s);
    }
    return s;
}

static float tn_dot_q5_0(int64_t n, const void *w, const void *a)
{
    const tn_block_q5_0 *x = w;
    const tn_block_q8_0 *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh;
        memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int q0 = ((x[i].qs[j] & 0x0f) | (int)(((qh >> j) & 1) << 4)) - 16;
            const int q1 = ((x[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += q0 * y[i].qs[j] + q1 * y[i].qs[j + 16];
        }
        s += tn_h2f(x[i].d) * tn_h2f(y[i].d) * (float)sumi;
    }
    return s;
}

static float tn_dot_q5_1(int64_t n, const void *w, const void *a)
{
    const tn_block_q5_1 *x = w;
    const tn_block_q8_1 *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh;
        memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int q0 = (x[i].qs[j] & 0x0f) | (int)(((qh >> j) & 1) << 4);
            const int q1 = (x[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            sumi += q0 * y[i].qs[j] + q1 * y[i].qs[j + 16];
        }
        s += tn_h2f(x[i].d) * tn_h2f(y[i].d) * (float)sumi + tn_h2f(x[i].m) * tn_h2f(y[i].s);
    }
    return s;
}

static float tn_dot_q8_0(int64_t n, const void *w, const void *a)
{
    const tn_block_q8_0 *x = w;
    const tn_block_q8_0 *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 32; j++) sumi += x[i].qs[j] * y[i].qs[j];
        s += tn_h2f(x[i].d) * tn_h2f(y[i].d) * (float)sumi;
    }
    return s;
}

static float tn_dot_q2_K(int64_t n, const void *w, const void *a)
{
    const tn_block_q2_K *x = w;
    const tn_block_q8_K *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        int summs = 0, isum = 0;
        for (int k = 0; k < 16; k++) summs += (x[i].scales[k] >> 4) * y[i].bsums[k];
        for (int k = 0; k < 16; k++) {
            int sub = 0;
            for (int l = 0; l < 16; l++) {
                const int e = 16 * k + l;
                const int q = (x[i].qs[32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3;
                sub += q * y[i].qs[e];
            }
            isum += (x[i].scales[k] & 0x0f) * sub;
        }
        const float dall = y[i].d * tn_h2f(x[i].d), dmin = y[i].d * tn_h2f(x[i].dmin);
        s += dall * (float)isum - dmin * (float)summs;
    }
    return s;
}

static float tn_dot_q3_K(int64_t n, const void *w, const void *a)
{
    const tn_block_q3_K *x = w;
    const tn_block_q8_K *y = a;
    int8_t sc[16];
    float s = 0.0f;
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        tn_k3_scales(x[i].scales, sc);
        int isum = 0;
        for (int k = 0; k < 16; k++) {
            int sub = 0;
            for (int l = 0; l < 16; l++) {
                const int e = 16 * k + l;
                int q = (x[i].qs[32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3;
                if (!((x[i].hmask[e & 31] >> (e >> 5)) & 1)) q -= 4;
                sub += q * y[i].qs[e];
            }
            isum += sc[k] * sub;
        }
        s += tn_h2f(x[i].d) * y[i].d * (float)isum;
    }
    return s;
}

static float tn_dot_q4_K(int64_t n, const void *w, const void *a)
{
    const tn_block_q4_K *x = w;
    const tn_block_q8_K *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        int isum = 0, summs = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            tn_k4_scale_min(x[i].scales, j, &sc, &mn);
            const uint8_t *q = x[i].qs + 32 * (j >> 1);
            const int shift = 4 * (j & 1);
            int sub = 0;
            for (int l = 0; l < 32; l++) sub += ((q[l] >> shift) & 0x0f) * y[i].qs[32 * j + l];
            isum += sc * sub;
            summs += mn * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const float d = tn_h2f(x[i].d) * y[i].d, dmin = tn_h2f(x[i].dmin) * y[i].d;
        s += d * (float)isum - dmin * (float)summs;
    }
    return s;
}

static float tn_dot_q5_K(int64_t n, const void *w, const void *a)
{
    const tn_block_q5_K *x = w;
    const tn_block_q8_K *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        int isum = 0, summs = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            tn_k4_scale_min(x[i].scales, j, &sc, &mn);
            const uint8_t *q = x[i].qs + 32 * (j >> 1);
            const int shift = 4 * (j & 1);
            int sub = 0;
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> shift) & 0x0f) | (((x[i].qh[l] >> j) & 1) << 4);
                sub += v * y[i].qs[32 * j + l];
            }
            isum += sc * sub;
            summs += mn * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const float d = tn_h2f(x[i].d) * y[i].d, dmin = tn_h2f(x[i].dmin) * y[i].d;
        s += d * (float)isum - dmin * (float)summs;
    }
    return s;
}

static float tn_dot_q6_K(int64_t n, const void *w, const void *a)
{
    const tn_block_q6_K *x = w;
    const tn_block_q8_K *y = a;
    float s = 0.0f;
    for (int64_t i = 0; i < n / TN_QK_K; i++) {
        int isum = 0;
        for (int k = 0; k < 16; k++) {
            int sub = 0;
            for (int l = 0; l < 16; l++) {
                const int e = 16 * k + l, g = e >> 7, o = e & 127;
                const int lo = (x[i].ql[64 * g + (o & 63)] >> (4 * (o >> 6))) & 0x0f;
                const int hi = (x[i].qh[32 * g + (o & 31)] >> (2 * (o >> 5))) & 0x03;
                sub += ((lo | (hi << 4)) - 32) * y[i].qs[e];
            }
            isum += x[i].scales[k] * sub;
        }
        s += tn_h2f(x[i].d) * y[i].d * (float)isum;
    }
    return s;
}

void tn_dot_table_scalar(tn_dot_fn t[TN_TYPE_MAX])
{
    t[TN_F32] = tn_dot_f32;
    t[TN_F16] = tn_dot_f16;
    t[TN_BF16] = tn_dot_bf16;
    t[TN_Q4_0] = tn_dot_q4_0;
    t[TN_Q4_1] = tn_dot_q4_1;
    t[TN_Q5_0] = tn_dot_q5_0;
    t[TN_Q5_1] = tn_dot_q5_1;
    t[TN_Q8_0] = tn_dot_q8_0;
    t[TN_Q2_K] = tn_dot_q2_K;
    t[TN_Q3_K] = tn_dot_q3_K;
    t[TN_Q4_K] = tn_dot_q4_K;
    t[TN_Q5_K] = tn_dot_q5_K;
    t[TN_Q6_K] = tn_dot_q6_K;
}
