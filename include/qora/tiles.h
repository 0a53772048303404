/* qora — register-blocked tiles for quantized products: up to 4 weight rows x
   up to 4 activation vectors per call. Decode (one token) uses 4x1 tiles so each
   activation block is loaded once for four rows; prefill walks the tokens 4 at
   a time while a group of rows stays in L1, so weights stream from memory once
   per chunk of tokens instead of once per token.
   Contract of every tile: out[t * ldo + r] = dot(row r, activation t) for
   r < nr <= 4, t < nt <= 4; rows are w_stride bytes apart, activations
   x_stride Q8 blocks apart. */
#ifndef QORA_TILES_H
#define QORA_TILES_H

#include "common.h"
#include "kernels_scalar.h"
#include "kernels_avx2.h"
#include "kernels_avx512.h"

#if defined(__GNUC__) || defined(__clang__)
#define QORA_INLINE static inline __attribute__((always_inline))
#else
#define QORA_INLINE static __forceinline
#endif

typedef void (*qora_tile_fn)(int n, const void* w, size_t w_stride, int nr, const block_q8* x, size_t x_stride,
                             int nt, float* out, size_t ldo);

/* Expands a template taking compile-time (R, T) into a switch over the 16 shapes,
   so every shape gets its own fully unrolled, register-resident instance. */
#define QORA_TILE_SWITCH(tmpl, n, w, ws, nr, x, xs, nt, out, ldo) \
    switch ((nr) * 8 + (nt)) { \
    case 9: tmpl(1, 1, n, w, ws, x, xs, out, ldo); break; \
    case 10: tmpl(1, 2, n, w, ws, x, xs, out, ldo); break; \
    case 11: tmpl(1, 3, n, w, ws, x, xs, out, ldo); break; \
    case 12: tmpl(1, 4, n, w, ws, x, xs, out, ldo); break; \
    case 17: tmpl(2, 1, n, w, ws, x, xs, out, ldo); break; \
    case 18: tmpl(2, 2, n, w, ws, x, xs, out, ldo); break; \
    case 19: tmpl(2, 3, n, w, ws, x, xs, out, ldo); break; \
    case 20: tmpl(2, 4, n, w, ws, x, xs, out, ldo); break; \
    case 25: tmpl(3, 1, n, w, ws, x, xs, out, ldo); break; \
    case 26: tmpl(3, 2, n, w, ws, x, xs, out, ldo); break; \
    case 27: tmpl(3, 3, n, w, ws, x, xs, out, ldo); break; \
    case 28: tmpl(3, 4, n, w, ws, x, xs, out, ldo); break; \
    case 33: tmpl(4, 1, n, w, ws, x, xs, out, ldo); break; \
    case 34: tmpl(4, 2, n, w, ws, x, xs, out, ldo); break; \
    case 35: tmpl(4, 3, n, w, ws, x, xs, out, ldo); break; \
    case 36: tmpl(4, 4, n, w, ws, x, xs, out, ldo); break; \
    default: break; \
    }

/* ------------------------------------------------------------------ scalar */
static void tile_q4_scalar(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs, int nt, float* out,
                           size_t ldo) {
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            out[t * ldo + r] = dot_q4_q8_scalar(n, (const block_q4*)((const char*)w + r * ws), x + t * xs);
}

static void tile_q8_scalar(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs, int nt, float* out,
                           size_t ldo) {
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            out[t * ldo + r] = dot_q8_q8_scalar(n, (const block_q8*)((const char*)w + r * ws), x + t * xs);
}

#if QORA_X86
/* -------------------------------------------------------------------- AVX2 */
/* Q4 rows are unpacked to signed bytes once per block and reused for all T
   activations; |w| and sign(x, w) feed maddubs (unsigned x signed). */
QORA_TARGET_AVX2 QORA_INLINE void tile_avx2_t(const int Q4, const int R, const int T, int n, const void* w, size_t ws,
                                              const block_q8* x, size_t xs, float* out, size_t ldo) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i eight = _mm256_set1_epi8(8);
    for (int b = 0; b < n / QK; b++) {
        __m256i qx[4];
        __m256 dx[4]; /* scales as vectors once per block: the inner loop is then vector ops only */
        for (int t = 0; t < T; t++) {
            qx[t] = _mm256_loadu_si256((const __m256i*)x[t * xs + b].qs);
            dx[t] = _mm256_set1_ps(f16_avx2(x[t * xs + b].d));
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            __m256i qw;
            __m256 dw;
            if (Q4) {
                const block_q4* wb = (const block_q4*)row + b;
                qw = _mm256_sub_epi8(unpack_nibbles_avx2(wb->qs), eight);
                dw = _mm256_set1_ps(f16_avx2(wb->d));
            } else {
                const block_q8* wb = (const block_q8*)row + b;
                qw = _mm256_loadu_si256((const __m256i*)wb->qs);
                dw = _mm256_set1_ps(f16_avx2(wb->d));
            }
            const __m256i aw = _mm256_sign_epi8(qw, qw);
            for (int t = 0; t < T; t++) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx[t], qw)), ones);
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[t]), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ldo + r] = hsum_avx2(acc[r][t]);
}

#define QORA_TILE_Q4_AVX2(R, T, n, w, ws, x, xs, out, ldo) tile_avx2_t(1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q8_AVX2(R, T, n, w, ws, x, xs, out, ldo) tile_avx2_t(0, R, T, n, w, ws, x, xs, out, ldo)

QORA_TARGET_AVX2 static void tile_q4_avx2(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs,
                                          int nt, float* out, size_t ldo) {
    QORA_TILE_SWITCH(QORA_TILE_Q4_AVX2, n, w, ws, nr, x, xs, nt, out, ldo)
}

QORA_TARGET_AVX2 static void tile_q8_avx2(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs,
                                          int nt, float* out, size_t ldo) {
    QORA_TILE_SWITCH(QORA_TILE_Q8_AVX2, n, w, ws, nr, x, xs, nt, out, ldo)
}

/* ------------------------------------------------------------------ AVX-512 */
/* Two blocks per 512-bit register. Q4: vpdpbusd(u, x) - vpdpbusd(8, x) gives
   sum((u - 8) x), the second term shared by all rows. Q8: |w| x sign(x, w). */
QORA_TARGET_AVX512 QORA_INLINE void tile_avx512_t(const int Q4, const int R, const int T, int n, const void* w,
                                                  size_t ws, const block_q8* x, size_t xs, float* out, size_t ldo) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512i eight = _mm512_set1_epi8(8);
    const int nb = n / QK;
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i qx[4], s8[4];
        __m512 dx[4]; /* the two blocks' scales, one per 256-bit half */
        for (int t = 0; t < T; t++) {
            const block_q8* xb = x + t * xs + b;
            qx[t] = load_2x256(xb[0].qs, xb[1].qs);
            if (Q4) s8[t] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, qx[t]);
            dx[t] = scales_2x_avx512(f16_avx2(xb[0].d), f16_avx2(xb[1].d));
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            if (Q4) {
                const block_q4* wb = (const block_q4*)row + b;
                const __m512i u = unpack_nibbles_2x_avx512(wb[0].qs, wb[1].qs);
                const __m512 dw = scales_2x_avx512(f16_avx2(wb[0].d), f16_avx2(wb[1].d));
                for (int t = 0; t < T; t++) {
                    const __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, qx[t]), s8[t]);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx[t]), _mm512_cvtepi32_ps(p), acc[r][t]);
                }
            } else {
                const block_q8* wb = (const block_q8*)row + b;
                const __m512i qw = load_2x256(wb[0].qs, wb[1].qs);
                const __m512i aw = _mm512_abs_epi8(qw);
                const __mmask64 neg = _mm512_movepi8_mask(qw);
                const __m512 dw = scales_2x_avx512(f16_avx2(wb[0].d), f16_avx2(wb[1].d));
                for (int t = 0; t < T; t++) {
                    const __m512i sx = _mm512_mask_sub_epi8(qx[t], neg, _mm512_setzero_si512(), qx[t]);
                    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx[t]), _mm512_cvtepi32_ps(p), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = _mm512_reduce_add_ps(acc[r][t]);
            if (b < nb) { /* odd block count: the last block on the AVX2 path */
                const char* row = (const char*)w + r * ws;
                s += Q4 ? dot_q4_q8_avx2(QK, (const block_q4*)row + b, x + t * xs + b)
                        : dot_q8_q8_avx2(QK, (const block_q8*)row + b, x + t * xs + b);
            }
            out[t * ldo + r] = s;
        }
}

#define QORA_TILE_Q4_AVX512(R, T, n, w, ws, x, xs, out, ldo) tile_avx512_t(1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q8_AVX512(R, T, n, w, ws, x, xs, out, ldo) tile_avx512_t(0, R, T, n, w, ws, x, xs, out, ldo)

QORA_TARGET_AVX512 static void tile_q4_avx512(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs,
                                              int nt, float* out, size_t ldo) {
    QORA_TILE_SWITCH(QORA_TILE_Q4_AVX512, n, w, ws, nr, x, xs, nt, out, ldo)
}

QORA_TARGET_AVX512 static void tile_q8_avx512(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs,
                                              int nt, float* out, size_t ldo) {
    QORA_TILE_SWITCH(QORA_TILE_Q8_AVX512, n, w, ws, nr, x, xs, nt, out, ldo)
}
#endif /* QORA_X86 */

#endif /* QORA_TILES_H */
