/* qora — portable scalar kernels. They are the reference the SIMD paths are
   tested against (besides NumPy) and the path any x86-64 or non-x86 CPU can run. */
#ifndef QORA_KERNELS_SCALAR_H
#define QORA_KERNELS_SCALAR_H

#include "common.h"

/* x[n] (n % 32 == 0) -> n/32 Q8 blocks; round half to even like the SIMD paths */
static void quantize_q8_scalar(const float* x, block_q8* y, int n) {
    for (int b = 0; b < n / QK; b++) {
        const float* xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[b].d = qora_fp32_to_fp16(d);
        for (int j = 0; j < QK; j++) y[b].qs[j] = (int8_t)nearbyintf(xb[j] * id);
    }
}

/* exact int32 dots of one block */
static inline int32_t isum_q4_q8_scalar(const block_q4* w, const block_q8* x) {
    int32_t isum = 0;
    for (int j = 0; j < QK / 2; j++) {
        const int lo = (w->qs[j] & 0x0f) - 8;
        const int hi = (w->qs[j] >> 4) - 8;
        isum += lo * x->qs[j] + hi * x->qs[j + QK / 2];
    }
    return isum;
}

static inline int32_t isum_q8_q8_scalar(const block_q8* w, const block_q8* x) {
    int32_t isum = 0;
    for (int j = 0; j < QK; j++) isum += w->qs[j] * x->qs[j];
    return isum;
}

/* the quantized dot in the order of common.h: segment chains, then ((a0 + a1) + a2) + a3 */
#define QORA_SEGMENT_DOT_SCALAR(ISUM)                                                              \
    const int nb = n / QK;                                                                         \
    float sum = 0.0f;                                                                              \
    for (int i = 0; i < QORA_SEGS; i++) {                                                          \
        float acc = 0.0f;                                                                          \
        for (int b = qora_seg_begin(nb, i); b < qora_seg_begin(nb, i + 1); b++)                    \
            acc = fmaf(qora_fp16_to_fp32(w[b].d) * qora_fp16_to_fp32(x[b].d), (float)ISUM(w + b, x + b), acc); \
        sum = i == 0 ? acc : sum + acc;                                                            \
    }                                                                                              \
    return sum;

static float dot_q4_q8_scalar(int n, const block_q4* w, const block_q8* x) { QORA_SEGMENT_DOT_SCALAR(isum_q4_q8_scalar) }

static float dot_q8_q8_scalar(int n, const block_q8* w, const block_q8* x) { QORA_SEGMENT_DOT_SCALAR(isum_q8_q8_scalar) }

/* float dots in the order of common.h: 32 chains by index mod 32, then the tail */
#define QORA_FLOAT_DOT_SCALAR(A)                                                  \
    float acc[32] = {0};                                                          \
    int i = 0;                                                                    \
    for (; i + 32 <= n; i += 32)                                                  \
        for (int j = 0; j < 32; j++) acc[j] = fmaf(A(i + j), x[i + j], acc[j]);  \
    float c[16];                                                                  \
    for (int j = 0; j < 16; j++) c[j] = acc[j] + acc[j + 16];                     \
    float sum = qora_reduce16(c);                                                 \
    for (; i < n; i++) sum = fmaf(A(i), x[i], sum);                               \
    return sum;

#define QORA_F16_AT(i) qora_fp16_to_fp32(w[i])
#define QORA_F32_AT(i) w[i]
static float dot_f16_f32_scalar(int n, const uint16_t* w, const float* x) { QORA_FLOAT_DOT_SCALAR(QORA_F16_AT) }

static float dot_f32_scalar(int n, const float* w, const float* x) { QORA_FLOAT_DOT_SCALAR(QORA_F32_AT) }

/* A Q8_0 row of the KV cache (n % 32 == 0) dotted with floats: each element f16(d) * q is exact in
   float, so this is the float dot of the dequantized row, in the same order (common.h). */
#define QORA_Q8KV_AT(i) (qora_fp16_to_fp32(w[(i) / QK].d) * (float)w[(i) / QK].qs[(i) % QK])
static float dot_q8kv_f32_scalar(int n, const block_q8* w, const float* x) { QORA_FLOAT_DOT_SCALAR(QORA_Q8KV_AT) }

/* out = x / sqrt(mean(x^2) + eps) * w   (HF LlamaRMSNorm: weight, not 1 + weight) */
static void rmsnorm_scalar(float* out, const float* x, const float* w, int n, float eps) {
    const float inv = 1.0f / sqrtf(dot_f32_scalar(n, x, x) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* y += a * x, fused */
static void axpy_scalar(int n, float a, const float* x, float* y) {
    for (int i = 0; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* y += a * x with x in f16 (the V rows of the KV cache) */
static void axpy_f16_scalar(int n, float a, const uint16_t* x, float* y) {
    for (int i = 0; i < n; i++) y[i] = fmaf(a, qora_fp16_to_fp32(x[i]), y[i]);
}

/* y += a * x with x a Q8_0 row of the KV cache (n % 32 == 0), each element dequantized exactly */
static void axpy_q8kv_scalar(int n, float a, const block_q8* x, float* y) {
    for (int i = 0; i < n; i++) y[i] = fmaf(a, qora_fp16_to_fp32(x[i / QK].d) * (float)x[i / QK].qs[i % QK], y[i]);
}

/* sc[0..n) = e^(sc - max), *max_out = max; returns their sum (16 chains by index mod 16) */
static float softmax_unnorm_scalar(float* sc, int n, float* max_out) {
    float mx = sc[0];
    for (int t = 1; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
    *max_out = mx;
    float c[16] = {0};
    for (int t = 0; t < n; t++) {
        sc[t] = qora_exp_neg(sc[t] - mx);
        c[t % 16] = c[t % 16] + sc[t];
    }
    return qora_reduce16(c);
}

static void to_f16_scalar(const float* x, uint16_t* y, int n) {
    for (int i = 0; i < n; i++) y[i] = qora_fp32_to_fp16(x[i]);
}

#endif /* QORA_KERNELS_SCALAR_H */
