/* qora — AVX2 + FMA + F16C kernels. Compiled with per-function target
   attributes; called only after CPUID/XCR0 confirmed the features. */
#ifndef QORA_KERNELS_AVX2_H
#define QORA_KERNELS_AVX2_H

#include "common.h"

#if QORA_X86

QORA_TARGET_AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

QORA_TARGET_AVX2 static inline float f16_avx2(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles in lanes 0..15, high in 16..31 */
QORA_TARGET_AVX2 static inline __m256i unpack_nibbles_avx2(const uint8_t* qs) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* signed int8 x signed int8, 32 lanes -> 8 int32 partial sums as floats */
QORA_TARGET_AVX2 static inline __m256 dot_i8x32_avx2(__m256i a, __m256i b) {
    const __m256i ax = _mm256_sign_epi8(a, a);           /* |a|, unsigned for maddubs */
    const __m256i sb = _mm256_sign_epi8(b, a);           /* b carries a's sign */
    const __m256i p16 = _mm256_maddubs_epi16(ax, sb);    /* no saturation: |a| <= 127 */
    const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(p32);
}

QORA_TARGET_AVX2 static void quantize_q8_avx2(const float* x, block_q8* y, int n) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < n / QK; b++) {
        const float* xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1));
        m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        y[b].d = qora_fp32_to_fp16(amax / 127.0f);
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
        /* packs interleave 128-bit lanes; the permute restores element order */
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)y[b].qs, p);
    }
}

QORA_TARGET_AVX2 static float dot_q4_q8_avx2(int n, const block_q4* w, const block_q8* x) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi8(8);
    for (int b = 0; b < n / QK; b++) {
        const __m256 d = _mm256_set1_ps(f16_avx2(w[b].d) * f16_avx2(x[b].d));
        const __m256i qw = _mm256_sub_epi8(unpack_nibbles_avx2(w[b].qs), eight);
        const __m256i qx = _mm256_loadu_si256((const __m256i*)x[b].qs);
        acc = _mm256_fmadd_ps(d, dot_i8x32_avx2(qw, qx), acc);
    }
    return hsum_avx2(acc);
}

QORA_TARGET_AVX2 static float dot_q8_q8_avx2(int n, const block_q8* w, const block_q8* x) {
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; b++) {
        const __m256 d = _mm256_set1_ps(f16_avx2(w[b].d) * f16_avx2(x[b].d));
        const __m256i qw = _mm256_loadu_si256((const __m256i*)w[b].qs);
        const __m256i qx = _mm256_loadu_si256((const __m256i*)x[b].qs);
        acc = _mm256_fmadd_ps(d, dot_i8x32_avx2(qw, qx), acc);
    }
    return hsum_avx2(acc);
}

QORA_TARGET_AVX2 static float dot_f16_f32_avx2(int n, const uint16_t* w, const float* x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
    }
    float sum = hsum_avx2(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += f16_avx2(w[i]) * x[i]; /* ragged tail */
    return sum;
}

QORA_TARGET_AVX2 static float dot_f32_avx2(int n, const float* a, const float* b) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    float sum = hsum_avx2(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

QORA_TARGET_AVX2 static void rmsnorm_avx2(float* out, const float* x, const float* w, int n, float eps) {
    const float inv = 1.0f / sqrtf(dot_f32_avx2(n, x, x) / (float)n + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

QORA_TARGET_AVX2 static void axpy_avx2(int n, float a, const float* x, float* y) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

QORA_TARGET_AVX2 static void axpy_f16_avx2(int n, float a, const uint16_t* x, float* y) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i))),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * f16_avx2(x[i]);
}

QORA_TARGET_AVX2 static void to_f16_avx2(const float* x, uint16_t* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = qora_fp32_to_fp16(x[i]);
}

#endif /* QORA_X86 */
#endif /* QORA_KERNELS_AVX2_H */
