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

/* qdot_avx2_t's order (common.h) with 512-bit vpdpbusd: segments 0 and 1 share one vector, 2 and 3 the
   other. Q4: vpdpbusd(u, x) - vpdpbusd(8, x) = sum((u - 8) x), the second term shared by all rows.
   Q8: |w| x sign(x, w). */
QORA_TARGET_AVX512 QORA_INLINE void qdot_avx512_t(const int Q4, const int R, const int T, int n, const void* w,
                                                  size_t ws, const block_q8* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK, seg = nb / QORA_SEGS;
    const __m512i eight = _mm512_set1_epi8(8), zero = _mm512_setzero_si512();
    __m128 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm_setzero_ps();
    for (int b = 0; b < seg; b++) {
        __m512i qx[4][2], s8[4][2];
        __m128 dx[4];
        for (int t = 0; t < T; t++) {
            const block_q8* xt = x + t * xs + b;
            qx[t][0] = load_2x256(xt[0].qs, xt[seg].qs);
            qx[t][1] = load_2x256(xt[2 * seg].qs, xt[3 * seg].qs);
            if (Q4) {
                s8[t][0] = _mm512_dpbusd_epi32(zero, eight, qx[t][0]);
                s8[t][1] = _mm512_dpbusd_epi32(zero, eight, qx[t][1]);
            }
            dx[t] = f16x4_avx2(xt[0].d, xt[seg].d, xt[2 * seg].d, xt[3 * seg].d);
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            __m128 dw;
            __m512i p[4][2];
            if (Q4) {
                const block_q4* wb = (const block_q4*)row + b;
                const __m512i u0 = unpack_nibbles_2x_avx512(wb[0].qs, wb[seg].qs);
                const __m512i u1 = unpack_nibbles_2x_avx512(wb[2 * seg].qs, wb[3 * seg].qs);
                dw = f16x4_avx2(wb[0].d, wb[seg].d, wb[2 * seg].d, wb[3 * seg].d);
                for (int t = 0; t < T; t++) {
                    p[t][0] = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, u0, qx[t][0]), s8[t][0]);
                    p[t][1] = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, u1, qx[t][1]), s8[t][1]);
                }
            } else {
                const block_q8* wb = (const block_q8*)row + b;
                const __m512i q0 = load_2x256(wb[0].qs, wb[seg].qs), q1 = load_2x256(wb[2 * seg].qs, wb[3 * seg].qs);
                const __m512i a0 = _mm512_abs_epi8(q0), a1 = _mm512_abs_epi8(q1);
                const __mmask64 n0 = _mm512_movepi8_mask(q0), n1 = _mm512_movepi8_mask(q1);
                dw = f16x4_avx2(wb[0].d, wb[seg].d, wb[2 * seg].d, wb[3 * seg].d);
                for (int t = 0; t < T; t++) {
                    p[t][0] = _mm512_dpbusd_epi32(zero, a0, _mm512_mask_sub_epi8(qx[t][0], n0, zero, qx[t][0]));
                    p[t][1] = _mm512_dpbusd_epi32(zero, a1, _mm512_mask_sub_epi8(qx[t][1], n1, zero, qx[t][1]));
                }
            }
            for (int t = 0; t < T; t++) {
                const __m128i sum = reduce4_epi32_avx2(
                    _mm512_castsi512_si256(p[t][0]), _mm512_extracti64x4_epi64(p[t][0], 1),
                    _mm512_castsi512_si256(p[t][1]), _mm512_extracti64x4_epi64(p[t][1], 1));
                acc[r][t] = _mm_fmadd_ps(_mm_mul_ps(dw, dx[t]), _mm_cvtepi32_ps(sum), acc[r][t]);
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

QORA_TARGET_AVX512 static float dot_q4_q8_avx512(int n, const block_q4* w, const block_q8* x) {
    float out;
    qdot_avx512_t(1, 1, 1, n, w, 0, x, 0, &out, 1);
    return out;
}

QORA_TARGET_AVX512 static float dot_q8_q8_avx512(int n, const block_q8* w, const block_q8* x) {
    float out;
    qdot_avx512_t(0, 1, 1, n, w, 0, x, 0, &out, 1);
    return out;
}

/* the float dot of common.h: two vectors hold the 32 chains; lanes j + j+16, then the AVX2 tree */
QORA_TARGET_AVX512 static inline float reduce_2x16_avx512(__m512 a0, __m512 a1) {
    const __m512 c = _mm512_add_ps(a0, a1);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1));
    return hsum_avx2(_mm256_add_ps(_mm512_castps512_ps256(c), hi));
}

QORA_TARGET_AVX512 static float dot_f16_f32_avx512(int n, const uint16_t* w, const float* x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i))), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i + 16))),
                             _mm512_loadu_ps(x + i + 16), a1);
    }
    float sum = reduce_2x16_avx512(a0, a1);
    for (; i < n; i++) sum = fmaf(f16_avx2(w[i]), x[i], sum);
    return sum;
}

QORA_TARGET_AVX512 static float dot_f32_avx512(int n, const float* w, const float* x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    float sum = reduce_2x16_avx512(a0, a1);
    for (; i < n; i++) sum = fmaf(w[i], x[i], sum);
    return sum;
}

/* Float dots of one row w against T <= 8 tokens (ldx apart): dot_f32_avx512's chains and reduction for
   each token, so its bits, with the row's vectors loaded once for all of them (one dot at a time loads
   two vectors per fma and is bound by the loads: batched float steps spent half their time there) */
QORA_TARGET_AVX512 QORA_INLINE void dots_f32_avx512_t(const int T, int n, const float* w, const float* X, size_t ldx,
                                                      float* out, size_t ldo) {
    __m512 a0[8], a1[8];
    for (int t = 0; t < T; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 w0 = _mm512_loadu_ps(w + i), w1 = _mm512_loadu_ps(w + i + 16);
        for (int t = 0; t < T; t++) {
            a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(X + t * ldx + i), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(X + t * ldx + i + 16), a1[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float sum = reduce_2x16_avx512(a0[t], a1[t]);
        for (int j = i; j < n; j++) sum = fmaf(w[j], X[t * ldx + j], sum);
        out[t * ldo] = sum;
    }
}

QORA_TARGET_AVX512 static void dots_f32_avx512(int n, const float* w, const float* X, size_t ldx, int nt, float* out,
                                               size_t ldo) {
    for (int t0 = 0; t0 < nt; t0 += 8) {
        const float* x = X + (size_t)t0 * ldx;
        float* o = out + (size_t)t0 * ldo;
        switch (nt - t0 < 8 ? nt - t0 : 8) {
        case 1: dots_f32_avx512_t(1, n, w, x, ldx, o, ldo); break;
        case 2: dots_f32_avx512_t(2, n, w, x, ldx, o, ldo); break;
        case 3: dots_f32_avx512_t(3, n, w, x, ldx, o, ldo); break;
        case 4: dots_f32_avx512_t(4, n, w, x, ldx, o, ldo); break;
        case 5: dots_f32_avx512_t(5, n, w, x, ldx, o, ldo); break;
        case 6: dots_f32_avx512_t(6, n, w, x, ldx, o, ldo); break;
        case 7: dots_f32_avx512_t(7, n, w, x, ldx, o, ldo); break;
        default: dots_f32_avx512_t(8, n, w, x, ldx, o, ldo); break;
        }
    }
}

/* s[p] (p < 8): one dot's 16 lanes each (its chains a0 + a1); returns the 8 dots in order, each
   finished with the halving tree of reduce_2x16_avx512 (lanes j + j+8, j + j+4, j + j+2, j + j+1),
   the 8 trees side by side: every addition has the operands it has there. */
QORA_TARGET_AVX512 static inline __m256 reduce8x16_avx512(const __m512 s[8]) {
    __m512 u[4]; /* u[i]: lanes 0..7 = s[2i]'s j + j+8 step, lanes 8..15 = s[2i+1]'s */
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* j + j+4: 128-bit lanes are positions (0 1 2 3) of v0 and (4 5 6 7) of v1 */
    const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    /* j + j+2: per 128-bit lane, elements (0, 1) + (2, 3) of positions k and 4 + k side by side */
    const __m512 w = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(v0), _mm512_castps_pd(v1))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(v0), _mm512_castps_pd(v1))));
    /* j + j+1: lane 4k = position k, lane 4k + 1 = position 4 + k */
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(w, w, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(w, w, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_castps512_ps256(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), f));
}

/* Float dots of two rows against T <= 4 tokens: 16 chains in registers, each weight and activation
   vector loaded once for 2 x T fmas (one row at a time loads 9 vectors per 8 fmas and waits on the
   loads); each dot is dot_f32_avx512's two chains and reduction, so its bits */
QORA_TARGET_AVX512 QORA_INLINE void dots2_f32_avx512_t(const int T, int n, const float* w0, const float* w1,
                                                       const float* X, size_t ldx, float* out, size_t ldo) {
    __m512 a[2][4][2];
    for (int t = 0; t < T; t++) a[0][t][0] = a[0][t][1] = a[1][t][0] = a[1][t][1] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 u0 = _mm512_loadu_ps(w0 + i), u1 = _mm512_loadu_ps(w0 + i + 16);
        const __m512 v0 = _mm512_loadu_ps(w1 + i), v1 = _mm512_loadu_ps(w1 + i + 16);
        for (int t = 0; t < T; t++) {
            const __m512 x0 = _mm512_loadu_ps(X + t * ldx + i), x1 = _mm512_loadu_ps(X + t * ldx + i + 16);
            a[0][t][0] = _mm512_fmadd_ps(u0, x0, a[0][t][0]);
            a[0][t][1] = _mm512_fmadd_ps(u1, x1, a[0][t][1]);
            a[1][t][0] = _mm512_fmadd_ps(v0, x0, a[1][t][0]);
            a[1][t][1] = _mm512_fmadd_ps(v1, x1, a[1][t][1]);
        }
    }
    float d[8];
    if (T == 4) { /* the 8 dots' trees side by side */
        __m512 s[8];
        for (int r = 0; r < 2; r++)
            for (int t = 0; t < 4; t++) s[r * 4 + t] = _mm512_add_ps(a[r][t][0], a[r][t][1]);
        _mm256_storeu_ps(d, reduce8x16_avx512(s));
    } else {
        for (int r = 0; r < 2; r++)
            for (int t = 0; t < T; t++) d[r * 4 + t] = reduce_2x16_avx512(a[r][t][0], a[r][t][1]);
    }
    for (int r = 0; r < 2; r++) {
        const float* w = r ? w1 : w0;
        for (int t = 0; t < T; t++) {
            float sum = d[r * 4 + t];
            for (int j = i; j < n; j++) sum = fmaf(w[j], X[t * ldx + j], sum);
            out[t * ldo + r] = sum;
        }
    }
}

/* out[t * ldo + r] = dot_f32(n, w + r * ldw, X + t * ldx) for r < nr, t < nt: rows by two, tokens by
   four (16 chains: more would spill) */
QORA_TARGET_AVX512 static void dots_rows_f32_avx512(int n, int nr, const float* w, size_t ldw, const float* X,
                                                    size_t ldx, int nt, float* out, size_t ldo) {
    int r = 0;
    for (; r + 2 <= nr; r += 2)
        for (int t0 = 0; t0 < nt; t0 += 4) {
            const float *w0 = w + r * ldw, *w1 = w0 + ldw, *x = X + (size_t)t0 * ldx;
            float* o = out + (size_t)t0 * ldo + r;
            switch (nt - t0 < 4 ? nt - t0 : 4) {
            case 1: dots2_f32_avx512_t(1, n, w0, w1, x, ldx, o, ldo); break;
            case 2: dots2_f32_avx512_t(2, n, w0, w1, x, ldx, o, ldo); break;
            case 3: dots2_f32_avx512_t(3, n, w0, w1, x, ldx, o, ldo); break;
            default: dots2_f32_avx512_t(4, n, w0, w1, x, ldx, o, ldo); break;
            }
        }
    if (r < nr) dots_f32_avx512(n, w + r * ldw, X, ldx, nt, out + r, ldo);
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
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

#endif /* QORA_X86 */
#endif /* QORA_KERNELS_AVX512_H */
