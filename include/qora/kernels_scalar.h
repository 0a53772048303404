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

static float dot_q4_q8_scalar(int n, const block_q4* w, const block_q8* x) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            const int lo = (w[b].qs[j] & 0x0f) - 8;
            const int hi = (w[b].qs[j] >> 4) - 8;
            isum += lo * x[b].qs[j] + hi * x[b].qs[j + QK / 2];
        }
        sum += (float)isum * (qora_fp16_to_fp32(w[b].d) * qora_fp16_to_fp32(x[b].d));
    }
    return sum;
}

static float dot_q8_q8_scalar(int n, const block_q8* w, const block_q8* x) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK; b++) {
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += w[b].qs[j] * x[b].qs[j];
        sum += (float)isum * (qora_fp16_to_fp32(w[b].d) * qora_fp16_to_fp32(x[b].d));
    }
    return sum;
}

static float dot_f16_f32_scalar(int n, const uint16_t* w, const float* x) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += qora_fp16_to_fp32(w[i]) * x[i];
    return sum;
}

static float dot_f32_scalar(int n, const float* a, const float* b) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* out = x / sqrt(mean(x^2) + eps) * w   (HF LlamaRMSNorm: weight, not 1 + weight) */
static void rmsnorm_scalar(float* out, const float* x, const float* w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* y += a * x */
static void axpy_scalar(int n, float a, const float* x, float* y) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* y += a * x with x in f16 (the V rows of the KV cache) */
static void axpy_f16_scalar(int n, float a, const uint16_t* x, float* y) {
    for (int i = 0; i < n; i++) y[i] += a * qora_fp16_to_fp32(x[i]);
}

static void to_f16_scalar(const float* x, uint16_t* y, int n) {
    for (int i = 0; i < n; i++) y[i] = qora_fp32_to_fp16(x[i]);
}

#endif /* QORA_KERNELS_SCALAR_H */
