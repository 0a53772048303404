/* qora — AVX2 kernels for the types of kquants.h: the same integers and the same float operations in
   the same order as the scalar reference (common.h), so every path gives the same bits. The AVX-512
   table uses these too (the products are memory-bound at decode; a 512-bit version would have to
   mirror them operation for operation). */
#ifndef QORA_KQUANTS_AVX2_H
#define QORA_KQUANTS_AVX2_H

#include "common.h"
#include "kquants.h"
#include "kernels_avx2.h"
#include "kernels_avx512.h"

#if QORA_X86

/* 0xff in byte j where bit j of the 32 bits at p is set */
QORA_TARGET_AVX2 static inline __m256i bits_to_bytes_avx2(const uint8_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                 0x0101010101010101, 0x0000000000000000));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

/* a Q4_1 / Q5_0 / Q5_1 block's 32 integers in element order (qora_q32_int), its f16 scale and minimum */
QORA_TARGET_AVX2 static inline __m256i w32_i8_avx2(const int dtype, const void* row, int b, uint16_t* d,
                                                   uint16_t* m) {
    const char* blk = (const char*)row + (size_t)b * (dtype == QORA_Q4_1   ? sizeof(block_q4_1)
                                                      : dtype == QORA_Q5_0 ? sizeof(block_q5_0)
                                                                           : sizeof(block_q5_1));
    *d = ((const uint16_t*)blk)[0];
    *m = dtype == QORA_Q5_0 ? 0 : ((const uint16_t*)blk)[1];
    if (dtype == QORA_Q4_1) return unpack_nibbles_avx2(((const block_q4_1*)blk)->qs);
    const uint8_t* qh = dtype == QORA_Q5_0 ? ((const block_q5_0*)blk)->qh : ((const block_q5_1*)blk)->qh;
    const uint8_t* qs = dtype == QORA_Q5_0 ? ((const block_q5_0*)blk)->qs : ((const block_q5_1*)blk)->qs;
    const __m256i q = _mm256_or_si256(unpack_nibbles_avx2(qs),
                                      _mm256_and_si256(bits_to_bytes_avx2(qh), _mm256_set1_epi8(0x10)));
    return dtype == QORA_Q5_0 ? _mm256_sub_epi8(q, _mm256_set1_epi8(16)) : q;
}

/* sum of an activation block's 32 int8, as 8 int32 partials */
QORA_TARGET_AVX2 static inline __m256i xsum_i8x32_avx2(__m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), x), _mm256_set1_epi16(1));
}

/* one block c of segment 3's tail: the scalar order of dot_q32_q8_scalar */
QORA_TARGET_AVX2 static inline float q32_block_avx2(const int dtype, const void* row, const block_q8* x, int c,
                                                    float acc) {
    uint16_t d16, m16;
    const __m256i qw = w32_i8_avx2(dtype, row, c, &d16, &m16);
    const __m256i qx = _mm256_loadu_si256((const __m256i*)x[c].qs);
    const float dx = f16_avx2(x[c].d);
    acc = fmaf(f16_avx2(d16) * dx, (float)hsum_epi32_avx2(dot_i8x32_avx2(qw, qx)), acc);
    if (dtype != QORA_Q5_0) acc = fmaf(f16_avx2(m16) * dx, (float)hsum_epi32_avx2(xsum_i8x32_avx2(qx)), acc);
    return acc;
}

/* Q4_1 / Q5_0 / Q5_1 rows (R <= 4, ws bytes apart) x Q8_0 activations (T <= 4, xs blocks apart), the
   scheme of qdot_avx2_t: lane i of each 128-bit accumulator is segment i's chain. */
QORA_TARGET_AVX2 QORA_INLINE void qdot32_avx2_t(const int dtype, const int R, const int T, int n, const void* w,
                                                size_t ws, const block_q8* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK, seg = nb / QORA_SEGS, has_min = dtype != QORA_Q5_0;
    __m128 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm_setzero_ps();
    for (int b = 0; b < seg; b++) {
        __m128 dx[4];
        __m128 xsum[4];
        for (int t = 0; t < T; t++) {
            const block_q8* xt = x + t * xs + b;
            dx[t] = f16x4_avx2(xt[0].d, xt[seg].d, xt[2 * seg].d, xt[3 * seg].d);
            if (has_min) {
                __m256i s[4];
                for (int i = 0; i < 4; i++) s[i] = xsum_i8x32_avx2(_mm256_loadu_si256((const __m256i*)xt[i * seg].qs));
                xsum[t] = _mm_cvtepi32_ps(reduce4_epi32_avx2(s[0], s[1], s[2], s[3]));
            }
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            __m256i qw[4];
            uint16_t d16[4], m16[4];
            for (int i = 0; i < 4; i++) qw[i] = w32_i8_avx2(dtype, row, b + i * seg, &d16[i], &m16[i]);
            const __m128 dw = f16x4_avx2(d16[0], d16[1], d16[2], d16[3]);
            const __m128 mw = f16x4_avx2(m16[0], m16[1], m16[2], m16[3]);
            for (int t = 0; t < T; t++) {
                const block_q8* xt = x + t * xs + b;
                __m256i p[4];
                for (int i = 0; i < 4; i++)
                    p[i] = dot_i8x32_avx2(qw[i], _mm256_loadu_si256((const __m256i*)xt[i * seg].qs));
                const __m128i s = reduce4_epi32_avx2(p[0], p[1], p[2], p[3]);
                acc[r][t] = _mm_fmadd_ps(_mm_mul_ps(dw, dx[t]), _mm_cvtepi32_ps(s), acc[r][t]);
                if (has_min) acc[r][t] = _mm_fmadd_ps(_mm_mul_ps(mw, dx[t]), xsum[t], acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const char* row = (const char*)w + r * ws;
        for (int t = 0; t < T; t++) {
            float a[4];
            _mm_storeu_ps(a, acc[r][t]);
            for (int c = QORA_SEGS * seg; c < nb; c++) a[3] = q32_block_avx2(dtype, row, x + t * xs, c, a[3]);
            out[t * ldo + r] = ((a[0] + a[1]) + a[2]) + a[3];
        }
    }
}

/* ---- K types x Q8_K ---- */

/* a Q4_K / Q5_K super-block's eight 6-bit scales (sc[0..8)) and minimums (as 8 int16) */
QORA_TARGET_AVX2 static inline __m128i kscales_avx2(const uint8_t* scales, uint8_t sc[8]) {
    uint32_t u[4];
    memcpy(u, scales, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t mins_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = mins_lo;
    u[0] &= k1;
    memcpy(sc, u, 8);
    return _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)u[3], (int)u[2]));
}

QORA_TARGET_AVX2 static inline int32_t hsum_epi32x4_avx2(__m128i s) {
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* a K super-block's 256 integers as eight 32-byte vectors in element order, unsigned (Q6_K: q + 32) */
QORA_TARGET_AVX2 static inline void kquants_u8_avx2(const int dtype, const char* blk, __m256i q[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    if (dtype == QORA_Q6_K) {
        const block_q6_K* b = (const block_q6_K*)blk;
        const __m256i m2 = _mm256_set1_epi8(0x03);
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b->ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b->ql + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i*)(b->qh + 32 * h));
            for (int i = 0; i < 4; i++) {
                const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(i & 1 ? l1 : l0, i < 2 ? 0 : 4), m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * i), m2);
                q[4 * h + i] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
            }
        }
        return;
    }
    const uint8_t* qs = dtype == QORA_Q4_K ? ((const block_q4_K*)blk)->qs : ((const block_q5_K*)blk)->qs;
    for (int k = 0; k < 4; k++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * k));
        q[2 * k] = _mm256_and_si256(raw, m4);
        q[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    }
    if (dtype == QORA_Q5_K) {
        const __m256i hb = _mm256_loadu_si256((const __m256i*)((const block_q5_K*)blk)->qh), one = _mm256_set1_epi8(1);
        for (int j = 0; j < 8; j++)
            q[j] = _mm256_or_si256(q[j], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, j), one), 4));
    }
}

/* K rows (R <= 4, ws bytes apart) x Q8_K activations (T <= 4, xs bytes apart): per super-block the exact
   S and M of kdot_ints_scalar, then dot_qk_q8k_scalar's two fmas */
QORA_TARGET_AVX2 QORA_INLINE void qdotk_avx2_t(const int dtype, const int R, const int T, int n, const void* w,
                                               size_t ws, const void* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK_K;
    const size_t bb = qora_row_bytes(dtype, QK_K);
    float acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;
    for (int b = 0; b < nb; b++) {
        __m256i bsum[4]; /* Q6_K: the 16 sums; Q4_K / Q5_K: the 8 sums of 32 in the low half */
        for (int t = 0; t < T; t++) {
            const block_q8K* xt = (const block_q8K*)((const char*)x + t * xs) + b;
            const __m256i s = _mm256_loadu_si256((const __m256i*)xt->bsums);
            bsum[t] = dtype == QORA_Q6_K ? s
                                         : _mm256_castsi128_si256(_mm_hadd_epi16(_mm256_castsi256_si128(s),
                                                                                 _mm256_extracti128_si256(s, 1)));
        }
        for (int r = 0; r < R; r++) {
            const char* blk = (const char*)w + r * ws + (size_t)b * bb;
            __m256i q[8], scv[8];
            __m128i mins = _mm_setzero_si128();
            __m256i sc16 = _mm256_setzero_si256();
            kquants_u8_avx2(dtype, blk, q);
            if (dtype == QORA_Q6_K) {
                const int8_t* s = ((const block_q6_K*)blk)->scales;
                sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)s));
                for (int k = 0; k < 8; k++) scv[k] = _mm256_set_m128i(_mm_set1_epi16(s[2 * k + 1]), _mm_set1_epi16(s[2 * k]));
            } else {
                uint8_t sc[8];
                mins = kscales_avx2(((const block_q4_K*)blk)->scales, sc);
                for (int k = 0; k < 8; k++) scv[k] = _mm256_set1_epi16(sc[k]);
            }
            for (int t = 0; t < T; t++) {
                const block_q8K* xt = (const block_q8K*)((const char*)x + t * xs) + b;
                __m256i sumi = _mm256_setzero_si256();
                for (int k = 0; k < 8; k++) {
                    const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i*)(xt->qs + 32 * k)));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scv[k]));
                }
                const int32_t su = hsum_epi32_avx2(sumi);
                if (dtype == QORA_Q6_K) {
                    const int32_t corr = hsum_epi32_avx2(_mm256_madd_epi16(sc16, bsum[t]));
                    acc[r][t] = fmaf(f16_avx2(((const block_q6_K*)blk)->d) * xt->d, (float)(su - 32 * corr), acc[r][t]);
                } else {
                    const block_q4_K* kb = (const block_q4_K*)blk;
                    const int32_t M = hsum_epi32x4_avx2(_mm_madd_epi16(mins, _mm256_castsi256_si128(bsum[t])));
                    acc[r][t] = fmaf(f16_avx2(kb->d) * xt->d, (float)su, acc[r][t]);
                    acc[r][t] = fmaf(-(f16_avx2(kb->dmin) * xt->d), (float)M, acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ldo + r] = acc[r][t];
}

#define QORA_TILE_Q41_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdot32_avx2_t(QORA_Q4_1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q50_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdot32_avx2_t(QORA_Q5_0, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q51_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdot32_avx2_t(QORA_Q5_1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q4K_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdotk_avx2_t(QORA_Q4_K, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q5K_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdotk_avx2_t(QORA_Q5_K, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q6K_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdotk_avx2_t(QORA_Q6_K, R, T, n, w, ws, x, xs, out, ldo)

/* tile_x_scalar's contract; one instance per type and shape */
QORA_TARGET_AVX2 static void tile_x_avx2(int dtype, int n, const void* w, size_t ws, int nr, const void* x, size_t xs,
                                         int nt, float* out, size_t ldo) {
    const block_q8* x8 = (const block_q8*)x;
    const size_t xs8 = xs / sizeof(block_q8);
    switch (dtype) {
    case QORA_Q4_1: QORA_TILE_SWITCH(QORA_TILE_Q41_AVX2, n, w, ws, nr, x8, xs8, nt, out, ldo) break;
    case QORA_Q5_0: QORA_TILE_SWITCH(QORA_TILE_Q50_AVX2, n, w, ws, nr, x8, xs8, nt, out, ldo) break;
    case QORA_Q5_1: QORA_TILE_SWITCH(QORA_TILE_Q51_AVX2, n, w, ws, nr, x8, xs8, nt, out, ldo) break;
    case QORA_Q4_K: QORA_TILE_SWITCH(QORA_TILE_Q4K_AVX2, n, w, ws, nr, x, xs, nt, out, ldo) break;
    case QORA_Q5_K: QORA_TILE_SWITCH(QORA_TILE_Q5K_AVX2, n, w, ws, nr, x, xs, nt, out, ldo) break;
    case QORA_Q6_K: QORA_TILE_SWITCH(QORA_TILE_Q6K_AVX2, n, w, ws, nr, x, xs, nt, out, ldo) break;
    default: break;
    }
}

/* ---- float activations ---- */

/* 32 weights w = s * q (+ m, or - m: mode 1 / -1) in element order into the four chains of
   QORA_FLOAT_DOT_AVX2 (index mod 32): the values of qora_dequant_range, the fmas of the float dot;
   with out, the values are stored there instead */
QORA_TARGET_AVX2 QORA_INLINE void deq_fma32_avx2(__m256i q, float s_lo, float s_hi, float m, int mode,
                                                   const float* x, __m256 acc[4], float* out) {
    for (int k = 0; k < 4; k++) {
        const __m128i bytes = k & 1 ? _mm_srli_si128(_mm256_extracti128_si256(q, k / 2), 8)
                                    : _mm256_extracti128_si256(q, k / 2);
        const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        __m256 wv = _mm256_mul_ps(_mm256_set1_ps(k < 2 ? s_lo : s_hi), qf);
        if (mode > 0) wv = _mm256_add_ps(wv, _mm256_set1_ps(m));
        else if (mode < 0) wv = _mm256_sub_ps(wv, _mm256_set1_ps(m));
        if (out) _mm256_storeu_ps(out + 8 * k, wv);
        else acc[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 8 * k), acc[k]);
    }
}

/* A row of any block type walked block by block: each 32 weights into the float dot's chains (out NULL)
   or stored to out (the row dequantized: qora_dequant_range's values). FMA32(q, s_lo, s_hi, m, mode, x,
   out) takes 32 weights (deq_fma32_avx2, or deq_fma32_avx512 with its two 16-lane chains). */
#define QORA_DEQ_ROW_WALK(FMA32)                                                                              \
    do {                                                                                                      \
        const char* row = (const char*)w;                                                                     \
        if (qora_block_elems(dtype) == QK) {                                                                  \
            for (int b = 0; b < n / QK; b++) {                                                                \
                __m256i q;                                                                                    \
                float d, m = 0.0f;                                                                            \
                int mode = 0;                                                                                 \
                if (dtype == QORA_Q4 || dtype == QORA_Q8) {                                                   \
                    uint16_t d16;                                                                             \
                    q = weights_i8_avx2(dtype == QORA_Q4, row, b, &d16);                                      \
                    d = f16_avx2(d16);                                                                        \
                } else {                                                                                      \
                    uint16_t d16, m16;                                                                        \
                    q = w32_i8_avx2(dtype, row, b, &d16, &m16);                                               \
                    d = f16_avx2(d16);                                                                        \
                    if (dtype != QORA_Q5_0) m = f16_avx2(m16), mode = 1;                                      \
                }                                                                                             \
                FMA32(q, d, d, m, mode, x + b * QK, out ? out + b * QK : NULL);                               \
            }                                                                                                 \
        } else {                                                                                              \
            const size_t bb = qora_row_bytes(dtype, QK_K);                                                   \
            for (int b = 0; b < n / QK_K; b++) {                                                              \
                const char* blk = row + (size_t)b * bb;                                                       \
                __m256i q[8];                                                                                 \
                kquants_u8_avx2(dtype, blk, q);                                                               \
                const float* xb = x + (size_t)b * QK_K;                                                       \
                float* ob = out ? out + (size_t)b * QK_K : NULL;                                              \
                if (dtype == QORA_Q6_K) {                                                                     \
                    const block_q6_K* k6 = (const block_q6_K*)blk;                                            \
                    const float d = f16_avx2(k6->d);                                                          \
                    for (int k = 0; k < 8; k++)                                                               \
                        FMA32(_mm256_sub_epi8(q[k], _mm256_set1_epi8(32)), d * (float)k6->scales[2 * k],      \
                              d * (float)k6->scales[2 * k + 1], 0.0f, 0, xb + 32 * k, ob ? ob + 32 * k : NULL);    \
                } else {                                                                                      \
                    const block_q4_K* k4 = (const block_q4_K*)blk;                                            \
                    const float d = f16_avx2(k4->d), dmin = f16_avx2(k4->dmin);                               \
                    uint8_t sc[8];                                                                            \
                    uint16_t mn[8];                                                                           \
                    _mm_storeu_si128((__m128i*)mn, kscales_avx2(k4->scales, sc));                             \
                    for (int k = 0; k < 8; k++) {                                                             \
                        const float ds = d * (float)sc[k];                                                    \
                        FMA32(q[k], ds, ds, dmin * (float)mn[k], -1, xb + 32 * k, ob ? ob + 32 * k : NULL);   \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    } while (0)

#define QORA_DEQ_FMA32_AVX2(q, s_lo, s_hi, m, mode, xp, op) deq_fma32_avx2(q, s_lo, s_hi, m, mode, xp, acc, op)
QORA_TARGET_AVX2 QORA_INLINE void deq_row_avx2(int dtype, int n, const void* w, const float* x, __m256 acc[4],
                                                 float* out) {
    QORA_DEQ_ROW_WALK(QORA_DEQ_FMA32_AVX2);
}

/* dot_deq_f32_scalar's result: any block type . float activations */
QORA_TARGET_AVX2 static float dot_deq_f32_avx2(int dtype, int n, const void* w, const float* x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    deq_row_avx2(dtype, n, w, x, acc, NULL);
    return reduce_4x8_avx2(acc[0], acc[1], acc[2], acc[3]);
}

/* a row of any block type dequantized (qora_dequant_range's values) */
QORA_TARGET_AVX2 static void deq_f32_avx2(int dtype, int n, const void* w, float* out) {
    __m256 acc[4];
    deq_row_avx2(dtype, n, w, out, acc, out); /* x is not read when storing */
}

#define QORA_LOAD8_BF16(i) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + (i)))), 16))
#define QORA_AT_BF16(i) qora_bf16_to_fp32(w[i])

QORA_TARGET_AVX2 static float dot_bf16_f32_avx2(int n, const uint16_t* w, const float* x) {
    QORA_FLOAT_DOT_AVX2(QORA_LOAD8_BF16, QORA_AT_BF16)
}

/* ---- AVX-512 ---- */

/* Float activations against quantized rows (the row walk above, QORA_DEQ_ROW_WALK): the 32
   weights of a step as two 16-lane vectors, chains j and j + 16 (dot_f32_avx512's), each weight the same
   s * q (+ or - m) as deq_fma32_avx2's, so the same bits as the AVX2 path; one conversion and one fma per
   16 weights instead of per 8 */
QORA_TARGET_AVX512 QORA_INLINE void deq_fma32_avx512(__m256i q, float s_lo, float s_hi, float m, int mode,
                                                     const float* x, __m512 acc[2], float* out) {
    for (int h = 0; h < 2; h++) {
        const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, h)));
        __m512 wv = _mm512_mul_ps(_mm512_set1_ps(h ? s_hi : s_lo), qf);
        if (mode > 0) wv = _mm512_add_ps(wv, _mm512_set1_ps(m));
        else if (mode < 0) wv = _mm512_sub_ps(wv, _mm512_set1_ps(m));
        if (out) _mm512_storeu_ps(out + 16 * h, wv);
        else acc[h] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 16 * h), acc[h]);
    }
}

#define QORA_DEQ_FMA32_AVX512(q, s_lo, s_hi, m, mode, xp, op) deq_fma32_avx512(q, s_lo, s_hi, m, mode, xp, acc, op)
QORA_TARGET_AVX512 QORA_INLINE void deq_row_avx512(int dtype, int n, const void* w, const float* x, __m512 acc[2],
                                                   float* out) {
    QORA_DEQ_ROW_WALK(QORA_DEQ_FMA32_AVX512);
}

QORA_TARGET_AVX512 static float dot_deq_f32_avx512(int dtype, int n, const void* w, const float* x) {
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    deq_row_avx512(dtype, n, w, x, acc, NULL);
    return reduce_2x16_avx512(acc[0], acc[1]);
}

QORA_TARGET_AVX512 static void deq_f32_avx512(int dtype, int n, const void* w, float* out) {
    __m512 acc[2];
    deq_row_avx512(dtype, n, w, out, acc, out); /* x is not read when storing */
}

/* Decode with float activations: R rows (ws bytes apart) of Q4_0 / Q4_1 against one activation,
   out[r] = dot_deq_f32_avx512's result for each (the same weight values s * q (+ m) and the same two
   chains per row, so the same bits). A block's weights come from its 16 possible values, made once per
   block (mul then add, as the row walk does) and picked by vpermps with the nibble as the index: one
   permute a 16 weights instead of a widening, a conversion, a multiply and an add; the rows go together
   so their chains are independent (one row's two fma chains wait on the fma latency). Q8_0 keeps the
   row walk: no table, and its large matrices read faster one row at a time. */
QORA_TARGET_AVX512 QORA_INLINE void rows_deq_f32_avx512_r(const int Q4_1, const int R, int n, const char* w, size_t ws,
                                                         const float* x, float* out) {
    const size_t bsz = Q4_1 ? sizeof(block_q4_1) : sizeof(block_q4);
    __m512 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const __m512 idx = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 idx8 = _mm512_sub_ps(idx, _mm512_set1_ps(8.0f)); /* Q4_0's q - 8, exact */
    for (int b = 0; b < n / QK; b++) {
        const __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
        for (int r = 0; r < R; r++) {
            const char* blk = w + (size_t)r * ws + (size_t)b * bsz;
            _mm_prefetch(blk + 8 * bsz, _MM_HINT_T0); /* each row's stream: the prefetchers lag on the interleave */
            __m512 tbl;
            const uint8_t* qs;
            if (Q4_1) {
                const block_q4_1* k = (const block_q4_1*)blk;
                tbl = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(f16_avx2(k->d)), idx), _mm512_set1_ps(f16_avx2(k->m)));
                qs = k->qs;
            } else {
                const block_q4* k = (const block_q4*)blk;
                tbl = _mm512_mul_ps(_mm512_set1_ps(f16_avx2(k->d)), idx8);
                qs = k->qs;
            }
            const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs)); /* vpermps reads the low 4 bits */
            acc[r][0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, tbl), x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), tbl), x1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = reduce_2x16_avx512(acc[r][0], acc[r][1]);
}

/* returns 0 (nothing done) for the types it has no plan for */
QORA_TARGET_AVX512 static int rows_deq_f32_avx512(int dtype, int n, const void* w, size_t ws, int nr, const float* x,
                                                  float* out) {
    if (dtype != QORA_Q4 && dtype != QORA_Q4_1) return 0;
    const char* wc = (const char*)w;
#define QORA_ROWS_DEQ(Q41)                                                  \
    switch (nr) {                                                           \
    case 1: rows_deq_f32_avx512_r(Q41, 1, n, wc, ws, x, out); break;        \
    case 2: rows_deq_f32_avx512_r(Q41, 2, n, wc, ws, x, out); break;        \
    case 3: rows_deq_f32_avx512_r(Q41, 3, n, wc, ws, x, out); break;        \
    default: rows_deq_f32_avx512_r(Q41, 4, n, wc, ws, x, out); break;       \
    }
    if (dtype == QORA_Q4_1) {
        QORA_ROWS_DEQ(1)
    } else {
        QORA_ROWS_DEQ(0)
    }
#undef QORA_ROWS_DEQ
    return 1;
}


/* qora_quantize_q8k with AVX-512, the same bytes: amax and the first element of that magnitude (the scalar
   loop's strict > keeps the first; max_ps(v, acc) passes over NaN as that comparison does), q =
   nearbyint(iscale * x) as vcvtps2dq in the default rounding mode, the top clamp at 127, each bsum the
   int32 sum of one 16-lane vector. */
QORA_TARGET_AVX512 static void qora_quantize_q8k_avx512(const float* x, block_q8K* y, int n) {
    for (int b = 0; b < n / QK_K; b++) {
        const float* xb = x + (size_t)b * QK_K;
        __m512 am = _mm512_setzero_ps();
        for (int j = 0; j < QK_K; j += 16) am = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb + j)), am);
        const float amax = _mm512_reduce_max_ps(am);
        if (!(amax > 0.0f)) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        float vmax = 0.0f;
        const __m512 va = _mm512_set1_ps(amax);
        for (int j = 0; j < QK_K; j += 16) {
            const __m512 v = _mm512_loadu_ps(xb + j);
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(v), va, _CMP_EQ_OQ);
            if (hit) {
                int i = 0;
                while (!((hit >> i) & 1)) i++;
                vmax = xb[j + i];
                break;
            }
        }
        const float iscale = -127.0f / vmax;
        const __m512 vs = _mm512_set1_ps(iscale);
        const __m512i top = _mm512_set1_epi32(127);
        for (int k = 0; k < QK_K / 16; k++) {
            const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(vs, _mm512_loadu_ps(xb + 16 * k))), top);
            _mm_storeu_si128((__m128i*)(y[b].qs + 16 * k), _mm512_cvtepi32_epi8(q));
            y[b].bsums[k] = (int16_t)_mm512_reduce_add_epi32(q);
        }
        y[b].d = 1.0f / iscale;
    }
}
#endif /* QORA_X86 */
#endif /* QORA_KQUANTS_AVX2_H */
