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

/* |a| (unsigned) x b with a's sign, 32 lanes -> 8 int32 partial sums: no saturation, |a| <= 127 */
QORA_TARGET_AVX2 static inline __m256i dot_i8x32_avx2(__m256i a, __m256i b) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* four blocks' 8 int32 partials -> their four sums (lane i = block i) */
QORA_TARGET_AVX2 static inline __m128i reduce4_epi32_avx2(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

QORA_TARGET_AVX2 static inline int32_t hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

QORA_TARGET_AVX2 static inline __m128 f16x4_avx2(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
    return _mm_cvtph_ps(_mm_setr_epi16((short)a, (short)b, (short)c, (short)d, 0, 0, 0, 0));
}

/* a block's weights as signed bytes: Q4 nibble - 8, or the Q8 bytes */
QORA_TARGET_AVX2 static inline __m256i weights_i8_avx2(const int Q4, const void* row, int b, uint16_t* d) {
    if (Q4) {
        const block_q4* wb = (const block_q4*)row + b;
        *d = wb->d;
        return _mm256_sub_epi8(unpack_nibbles_avx2(wb->qs), _mm256_set1_epi8(8));
    }
    const block_q8* wb = (const block_q8*)row + b;
    *d = wb->d;
    return _mm256_loadu_si256((const __m256i*)wb->qs);
}

/* Rows x activations in the file's block layout, R <= 4 rows (ws bytes apart) x T <= 4 activations
   (xs blocks apart): out[t * ldo + r], in the order of common.h. Each step takes block b of all four
   segments: their int32 dots reduce to one vector whose lane i is segment i's block, so the four
   chains advance together in one 128-bit fma; the blocks past 4 * seg end segment 3's chain. */
/* The end of one row x token of qdot_*_t (common.h): the blocks past four whole segments join segment
   3's chain, then the four segment sums are added in order. Shared by the AVX2 and AVX-512 kernels. */
QORA_TARGET_AVX2 static inline float qdot_finish_avx2(const int Q4, const void* row, const block_q8* x, int seg, int nb,
                                                     __m128 acc) {
    float a[4];
    _mm_storeu_ps(a, acc);
    for (int c = QORA_SEGS * seg; c < nb; c++) {
        uint16_t dw16;
        const __m256i qw = weights_i8_avx2(Q4, row, c, &dw16);
        const int32_t isum = hsum_epi32_avx2(dot_i8x32_avx2(qw, _mm256_loadu_si256((const __m256i*)x[c].qs)));
        a[3] = fmaf(f16_avx2(dw16) * f16_avx2(x[c].d), (float)isum, a[3]);
    }
    return ((a[0] + a[1]) + a[2]) + a[3];
}

QORA_TARGET_AVX2 QORA_INLINE void qdot_avx2_t(const int Q4, const int R, const int T, int n, const void* w, size_t ws,
                                              const block_q8* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK, seg = nb / QORA_SEGS;
    __m128 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm_setzero_ps();
    for (int b = 0; b < seg; b++) {
        __m128 dx[4];
        for (int t = 0; t < T; t++) {
            const block_q8* xt = x + t * xs + b;
            dx[t] = f16x4_avx2(xt[0].d, xt[seg].d, xt[2 * seg].d, xt[3 * seg].d);
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            __m256i qw[4];
            uint16_t dw16[4];
            for (int i = 0; i < 4; i++) qw[i] = weights_i8_avx2(Q4, row, b + i * seg, &dw16[i]);
            const __m128 dw = f16x4_avx2(dw16[0], dw16[1], dw16[2], dw16[3]);
            for (int t = 0; t < T; t++) {
                const block_q8* xt = x + t * xs + b;
                __m256i p[4];
                for (int i = 0; i < 4; i++)
                    p[i] = dot_i8x32_avx2(qw[i], _mm256_loadu_si256((const __m256i*)xt[i * seg].qs));
                const __m128i s = reduce4_epi32_avx2(p[0], p[1], p[2], p[3]);
                acc[r][t] = _mm_fmadd_ps(_mm_mul_ps(dw, dx[t]), _mm_cvtepi32_ps(s), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const char* row = (const char*)w + r * ws;
        for (int t = 0; t < T; t++) {
            out[t * ldo + r] = qdot_finish_avx2(Q4, row, x + t * xs, seg, nb, acc[r][t]);
        }
    }
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
    float out;
    qdot_avx2_t(1, 1, 1, n, w, 0, x, 0, &out, 1);
    return out;
}

QORA_TARGET_AVX2 static float dot_q8_q8_avx2(int n, const block_q8* w, const block_q8* x) {
    float out;
    qdot_avx2_t(0, 1, 1, n, w, 0, x, 0, &out, 1);
    return out;
}

/* the float dot of common.h: four vectors hold the 32 chains (index mod 32), then the fixed tree */
QORA_TARGET_AVX2 static inline float reduce_4x8_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    return hsum_avx2(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
}

#define QORA_FLOAT_DOT_AVX2(LOAD8, AT)                                                 \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                        \
    int i = 0;                                                                         \
    for (; i + 32 <= n; i += 32) {                                                     \
        a0 = _mm256_fmadd_ps(LOAD8(i), _mm256_loadu_ps(x + i), a0);                    \
        a1 = _mm256_fmadd_ps(LOAD8(i + 8), _mm256_loadu_ps(x + i + 8), a1);            \
        a2 = _mm256_fmadd_ps(LOAD8(i + 16), _mm256_loadu_ps(x + i + 16), a2);          \
        a3 = _mm256_fmadd_ps(LOAD8(i + 24), _mm256_loadu_ps(x + i + 24), a3);          \
    }                                                                                  \
    float sum = reduce_4x8_avx2(a0, a1, a2, a3);                                       \
    for (; i < n; i++) sum = fmaf(AT(i), x[i], sum); /* ragged tail, in order */       \
    return sum;

#define QORA_LOAD8_F16(i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + (i))))
#define QORA_LOAD8_F32(i) _mm256_loadu_ps(w + (i))
#define QORA_AT_F16_AVX2(i) f16_avx2(w[i])
#define QORA_AT_F32(i) w[i]

QORA_TARGET_AVX2 static float dot_f16_f32_avx2(int n, const uint16_t* w, const float* x) {
    QORA_FLOAT_DOT_AVX2(QORA_LOAD8_F16, QORA_AT_F16_AVX2)
}

QORA_TARGET_AVX2 static float dot_f32_avx2(int n, const float* w, const float* x) {
    QORA_FLOAT_DOT_AVX2(QORA_LOAD8_F32, QORA_AT_F32)
}

/* Float dots of one row w against T <= 3 tokens (ldx apart): dot_f32_avx2's four chains and reduction for
   each token, so its bits, with the row's vectors loaded once for all of them (as dots_f32_avx512; three
   tokens' twelve chains fill the sixteen registers) */
QORA_TARGET_AVX2 QORA_INLINE void dots_f32_avx2_t(const int T, int n, const float* w, const float* X, size_t ldx,
                                                  float* out, size_t ldo) {
    __m256 a[3][4];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) a[t][j] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 4; j++) {
            const __m256 wj = _mm256_loadu_ps(w + i + 8 * j);
            for (int t = 0; t < T; t++) a[t][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(X + t * ldx + i + 8 * j), a[t][j]);
        }
    for (int t = 0; t < T; t++) {
        float sum = reduce_4x8_avx2(a[t][0], a[t][1], a[t][2], a[t][3]);
        for (int k = i; k < n; k++) sum = fmaf(w[k], X[t * ldx + k], sum);
        out[t * ldo] = sum;
    }
}

QORA_TARGET_AVX2 static void dots_f32_avx2(int n, const float* w, const float* X, size_t ldx, int nt, float* out,
                                           size_t ldo) {
    for (int t0 = 0; t0 < nt; t0 += 3) {
        const float* x = X + (size_t)t0 * ldx;
        float* o = out + (size_t)t0 * ldo;
        switch (nt - t0 < 3 ? nt - t0 : 3) {
        case 1: dots_f32_avx2_t(1, n, w, x, ldx, o, ldo); break;
        case 2: dots_f32_avx2_t(2, n, w, x, ldx, o, ldo); break;
        default: dots_f32_avx2_t(3, n, w, x, ldx, o, ldo); break;
        }
    }
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
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

QORA_TARGET_AVX2 static void axpy_f16_avx2(int n, float a, const uint16_t* x, float* y) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i))),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, f16_avx2(x[i]), y[i]);
}

/* qora_exp_neg (common.h), 8 lanes: the same operations */
QORA_TARGET_AVX2 static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(QORA_EXP_MIN));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* softmax_unnorm_scalar's result: two vectors hold the 16 chains (index mod 16) */
QORA_TARGET_AVX2 static float softmax_unnorm_avx2(float* sc, int n, float* max_out) {
    float mx = sc[0];
    for (int t = 1; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
    *max_out = mx;
    const __m256 m = _mm256_set1_ps(mx);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        const __m256 e0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + t), m));
        const __m256 e1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + t + 8), m));
        _mm256_storeu_ps(sc + t, e0);
        _mm256_storeu_ps(sc + t + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    float c[16];
    _mm256_storeu_ps(c, s0);
    _mm256_storeu_ps(c + 8, s1);
    for (; t < n; t++) {
        sc[t] = qora_exp_neg(sc[t] - mx);
        c[t % 16] = c[t % 16] + sc[t];
    }
    return qora_reduce16(c);
}

QORA_TARGET_AVX2 static void to_f16_avx2(const float* x, uint16_t* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = qora_fp32_to_fp16(x[i]);
}

#endif /* QORA_X86 */
#endif /* QORA_KERNELS_AVX2_H */
