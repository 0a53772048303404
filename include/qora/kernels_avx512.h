/* qora — AVX-512 (F/BW/VL) + VNNI kernels. Integer dots use vpdpbusd
   (unsigned x signed bytes -> int32) on two blocks per 512-bit register.
   Compiled with target attributes; run only when CPUID/XCR0 allow. */
#ifndef QORA_KERNELS_AVX512_H
#define QORA_KERNELS_AVX512_H

#include "common.h"
#include "kernels_avx2.h"

#if QORA_X86

QORA_TARGET_AVX512 static inline __m512i load_2x256(const void* lo, const void* hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)lo)),
                              _mm256_loadu_si256((const __m256i*)hi), 1);
}

/* 16 bytes of nibbles per block, two blocks -> 64 unsigned bytes in element order */
QORA_TARGET_AVX512 static inline __m512i unpack_nibbles_2x_avx512(const uint8_t* qa, const uint8_t* qb) {
    const __m128i ra = _mm_loadu_si128((const __m128i*)qa), rb = _mm_loadu_si128((const __m128i*)qb);
    const __m256i a = _mm256_set_m128i(_mm_srli_epi16(ra, 4), ra);
    const __m256i b = _mm256_set_m128i(_mm_srli_epi16(rb, 4), rb);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0f));
}

/* per-block scale pair broadcast to the two 256-bit halves */
QORA_TARGET_AVX512 static inline __m512 scales_2x_avx512(float d0, float d1) {
    /* insertf64x4 is AVX512F (insertf32x8 would need DQ) */
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(d0))),
                                               _mm256_castps_pd(_mm256_set1_ps(d1)), 1));
}

QORA_TARGET_AVX512 static float dot_q4_q8_avx512(int n, const block_q4* w, const block_q8* x) {
    const int nb = n / QK;
    __m512 acc = _mm512_setzero_ps();
    const __m512i eight = _mm512_set1_epi8(8);
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m512i u = unpack_nibbles_2x_avx512(w[b].qs, w[b + 1].qs);     /* 0..15 */
        const __m512i qx = load_2x256(x[b].qs, x[b + 1].qs);
        /* sum((u - 8) * x) = sum(u * x) - sum(8 * x), both on the unsigned-operand side of dpbusd */
        const __m512i ux = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, qx);
        const __m512i ex = _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, qx);
        const __m512 d = scales_2x_avx512(f16_avx2(w[b].d) * f16_avx2(x[b].d),
                                          f16_avx2(w[b + 1].d) * f16_avx2(x[b + 1].d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(ux, ex)), acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    if (b < nb) sum += dot_q4_q8_avx2(QK, w + b, x + b); /* odd block count */
    return sum;
}

QORA_TARGET_AVX512 static float dot_q8_q8_avx512(int n, const block_q8* w, const block_q8* x) {
    const int nb = n / QK;
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m512i qw = load_2x256(w[b].qs, w[b + 1].qs);
        const __m512i qx = load_2x256(x[b].qs, x[b + 1].qs);
        /* |w| as the unsigned operand, x carrying w's sign */
        const __m512i aw = _mm512_abs_epi8(qw);
        const __mmask64 neg = _mm512_movepi8_mask(qw);
        const __m512i sx = _mm512_mask_sub_epi8(qx, neg, _mm512_setzero_si512(), qx);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
        const __m512 d = scales_2x_avx512(f16_avx2(w[b].d) * f16_avx2(x[b].d),
                                          f16_avx2(w[b + 1].d) * f16_avx2(x[b + 1].d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    if (b < nb) sum += dot_q8_q8_avx2(QK, w + b, x + b);
    return sum;
}

QORA_TARGET_AVX512 static float dot_f16_f32_avx512(int n, const uint16_t* w, const float* x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i))), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i + 16))),
                             _mm512_loadu_ps(x + i + 16), a1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    if (i < n) sum += dot_f16_f32_avx2(n - i, w + i, x + i);
    return sum;
}

QORA_TARGET_AVX512 static float dot_f32_avx512(int n, const float* a, const float* b) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    if (i < n) sum += dot_f32_avx2(n - i, a + i, b + i);
    return sum;
}

QORA_TARGET_AVX512 static void rmsnorm_avx512(float* out, const float* x, const float* w, int n, float eps) {
    const float inv = 1.0f / sqrtf(dot_f32_avx512(n, x, x) / (float)n + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

QORA_TARGET_AVX512 static void axpy_avx512(int n, float a, const float* x, float* y) {
    const __m512 va = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

#endif /* QORA_X86 */
#endif /* QORA_KERNELS_AVX512_H */
