/* qora — AVX2 attention over the f16 KV cache for the query heads of one KV group: one chunk
   of forward.h's split attention (qora_attend_chunk's contract), the steps of common.h.
   Scores go 8 positions at a time: their K rows are converted to float once for every head of
   the group, each (position, head) dot keeps its 32 chains in 4 vectors, and the 8 dots' final
   halving tree (lanes j + j+4, j + j+2, j + j+1) runs on 8 positions at once, so no dot ends
   in its own horizontal sum. The value sums run column block by column block (32 floats, the
   block's V rows stay in L1 across the heads), two heads at a time: 8 accumulators in
   registers over the chunk's positions. Head sizes that are multiples of 32, up to 256.
   The same code reads a Q8_0 cache (Q8 = 1): each 32-element block converted as f16(d) * q, which
   is exact in float, so the steps after the conversion are those of the f16 cache; a column block
   of the value sums is one Q8 block. */
#ifndef QORA_ATTENTION_AVX2_H
#define QORA_ATTENTION_AVX2_H

#include "kernels_avx2.h"

#if QORA_X86
#define QORA_ATT_AVX2_MAX_D 256

/* c[p] (p < 8): each one dot's 8 lanes after the lane j + lane j+8 step of qora_reduce16 (the
   sum (a0 + a2) + (a1 + a3) of its chains); returns the 8 dots in position order, each finished
   with the rest of qora_reduce16 (j + j+4, then j + j+2, then j + j+1). */
QORA_TARGET_AVX2 static inline __m256 reduce8_avx2(const __m256 c[8]) {
    __m256 d[4]; /* d[i]: lanes 0..3 = c[2i]'s j + j+4 step, lanes 4..7 = c[2i+1]'s */
    for (int i = 0; i < 4; i++)
        d[i] = _mm256_add_ps(_mm256_permute2f128_ps(c[2 * i], c[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(c[2 * i], c[2 * i + 1], 0x31));
    /* j + j+2: per 128-bit lane, elements (0, 1) + (2, 3) of two positions side by side */
    const __m256 e0 = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(d[0]), _mm256_castps_pd(d[1]))),
                                    _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(d[0]), _mm256_castps_pd(d[1]))));
    const __m256 e1 = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(d[2]), _mm256_castps_pd(d[3]))),
                                    _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(d[2]), _mm256_castps_pd(d[3]))));
    /* j + j+1: lanes are positions 0 2 4 6 | 1 3 5 7 */
    const __m256 f = _mm256_add_ps(_mm256_shuffle_ps(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* the chains of one float dot (common.h) of a float K row with q, two positions at a time */
QORA_TARGET_AVX2 QORA_INLINE void dot2_avx2(const int D, const float* k0, const float* k1, const float* q,
                                            __m256* c0, __m256* c1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int i = 0; i < D; i += 32) {
        const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
        const __m256 q2 = _mm256_loadu_ps(q + i + 16), q3 = _mm256_loadu_ps(q + i + 24);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + i), q0, a0);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + i), q0, b0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + i + 8), q1, a1);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + i + 8), q1, b1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + i + 16), q2, a2);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + i + 16), q2, b2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + i + 24), q3, a3);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + i + 24), q3, b3);
    }
    *c0 = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
    *c1 = _mm256_add_ps(_mm256_add_ps(b0, b2), _mm256_add_ps(b1, b3));
}

/* the 8 values of a Q8_0 block b from element j (j % 8 == 0): f16(d) * q, exact */
QORA_TARGET_AVX2 QORA_INLINE __m256 q8kv8_avx2(const block_q8* b, int j) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(b->qs + j))));
    return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(b->d)), q);
}

/* kf[0..D) = K row t of the cache as floats (f16 halves, or Q8 blocks: kv_stride / 32 per row) */
QORA_TARGET_AVX2 QORA_INLINE void kv_row_avx2(const int Q8, const int D, const void* kc, size_t kv_stride, int t,
                                              float* kf) {
    if (Q8) {
        const block_q8* b = (const block_q8*)kc + (size_t)t * (kv_stride / QK);
        for (int i = 0; i < D; i += 8) _mm256_storeu_ps(kf + i, q8kv8_avx2(b + i / QK, i % QK));
    } else {
        const uint16_t* k = (const uint16_t*)kc + (size_t)t * kv_stride;
        for (int i = 0; i < D; i += 8) _mm256_storeu_ps(kf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(k + i))));
    }
}

/* scores[h * ss + t] = dot(k_t, q_h) * scale for the chunk's positions and the ng groups' heads (nh
   a group): the groups of a block of 8 positions go one after another, so the rows are read whole
   in one pass (see attend_scores_avx512) */
QORA_TARGET_AVX2 QORA_INLINE void attend_scores_avx2(const int Q8, const int D, const float* q, const void* kc,
                                                     int n_pos, int nh, int ng, size_t kv_stride, float* scores,
                                                     size_t ss, float scale) {
    float kf[8 * QORA_ATT_AVX2_MAX_D];
    const __m256 vs = _mm256_set1_ps(scale);
    for (int t0 = 0; t0 < n_pos; t0 += 8) {
        const int np = n_pos - t0 < 8 ? n_pos - t0 : 8;
        for (int g = 0; g < ng; g++) {
            const void* kg = qora_kv_at(Q8, kc, (size_t)g * D);
            for (int p = 0; p < np; p++) kv_row_avx2(Q8, D, kg, kv_stride, t0 + p, kf + p * D);
            for (int p = np; p < 8; p++) memset(kf + p * D, 0, (size_t)D * sizeof(float));
            for (int h = g * nh; h < (g + 1) * nh; h++) {
                __m256 c[8];
                for (int p = 0; p < 8; p += 2)
                    dot2_avx2(D, kf + p * D, kf + (p + 1) * D, q + (size_t)h * D, &c[p], &c[p + 1]);
                const __m256 s = _mm256_mul_ps(reduce8_avx2(c), vs);
                float* out = scores + (size_t)h * ss + t0;
                if (np == 8) {
                    _mm256_storeu_ps(out, s);
                } else {
                    float tmp[8];
                    _mm256_storeu_ps(tmp, s);
                    memcpy(out, tmp, (size_t)np * sizeof(float));
                }
            }
        }
    }
}

/* HP heads' outputs, columns [col, col + 8 * NV): the fma chain over the chunk's positions of
   p[j][t] * v_t (unnormalised), from +0 */
QORA_TARGET_AVX2 QORA_INLINE void attend_pv_avx2(const int Q8, const int HP, const int NV, const void* vc, int n_pos,
                                                 size_t kv_stride, const float* p, size_t ss, int col, int D,
                                                 float* out) {
    __m256 acc[8];
    for (int i = 0; i < HP * NV; i++) acc[i] = _mm256_setzero_ps();
    for (int t = 0; t < n_pos; t++) {
        __m256 vf[8];
        if (Q8) { /* NV = 4: the columns are one block */
            const block_q8* b = (const block_q8*)vc + (size_t)t * (kv_stride / QK) + col / QK;
            for (int i = 0; i < NV; i++) vf[i] = q8kv8_avx2(b, 8 * i);
        } else {
            const uint16_t* v = (const uint16_t*)vc + (size_t)t * kv_stride + col;
            for (int i = 0; i < NV; i++) vf[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(v + 8 * i)));
        }
        for (int j = 0; j < HP; j++) {
            const __m256 w = _mm256_broadcast_ss(p + j * ss + t);
            for (int i = 0; i < NV; i++) acc[j * NV + i] = _mm256_fmadd_ps(w, vf[i], acc[j * NV + i]);
        }
    }
    for (int j = 0; j < HP; j++)
        for (int i = 0; i < NV; i++) _mm256_storeu_ps(out + (size_t)j * D + col + 8 * i, acc[j * NV + i]);
}

QORA_TARGET_AVX2 QORA_INLINE void attend_avx2_d(const int Q8, const int D, const float* q, const void* kc,
                                               const void* vc, int n_pos, int nh, int ng, size_t kv_stride,
                                               float* scores, size_t ss, float* out, float* mx, float* sum,
                                               float scale) {
    attend_scores_avx2(Q8, D, q, kc, n_pos, nh, ng, kv_stride, scores, ss, scale);
    for (int h = 0; h < nh * ng; h++) sum[h] = softmax_unnorm_avx2(scores + h * ss, n_pos, mx + h);
    for (int g = 0; g < ng; g++) {
        const void* vg = qora_kv_at(Q8, vc, (size_t)g * D);
        for (int col = 0; col < D; col += 32) {
            int h = g * nh;
            for (; h + 2 <= (g + 1) * nh; h += 2)
                attend_pv_avx2(Q8, 2, 4, vg, n_pos, kv_stride, scores + h * ss, ss, col, D, out + (size_t)h * D);
            if (h < (g + 1) * nh)
                attend_pv_avx2(Q8, 1, 4, vg, n_pos, kv_stride, scores + h * ss, ss, col, D, out + (size_t)h * D);
        }
    }
}

/* Returns 0 (nothing done) for head sizes it has no plan for. */
QORA_TARGET_AVX2 QORA_INLINE int attend_avx2(const int Q8, const float* q, const void* kc, const void* vc, int n_pos,
                                         int nh, int ng, int head_dim, size_t kv_stride, float* scores, size_t ss,
                                         float* out, float* mx, float* sum, float scale) {
    if (n_pos < 1) return 0;
    switch (head_dim) {
    case 64: attend_avx2_d(Q8, 64, q, kc, vc, n_pos, nh, ng, kv_stride, scores, ss, out, mx, sum, scale); return 1;
    case 128: attend_avx2_d(Q8, 128, q, kc, vc, n_pos, nh, ng, kv_stride, scores, ss, out, mx, sum, scale); return 1;
    case 256: attend_avx2_d(Q8, 256, q, kc, vc, n_pos, nh, ng, kv_stride, scores, ss, out, mx, sum, scale); return 1;
    default:
        if (head_dim % 32 || head_dim > QORA_ATT_AVX2_MAX_D) return 0;
        attend_avx2_d(Q8, head_dim, q, kc, vc, n_pos, nh, ng, kv_stride, scores, ss, out, mx, sum, scale);
        return 1;
    }
}

QORA_TARGET_AVX2 static int attend_f16_avx2(const float* q, const uint16_t* kc, const uint16_t* vc, int n_pos,
                                            int nh, int ng, int head_dim, size_t kv_stride, float* scores, size_t ss,
                                            float* out, float* mx, float* sum, float scale) {
    return attend_avx2(0, q, kc, vc, n_pos, nh, ng, head_dim, kv_stride, scores, ss, out, mx, sum, scale);
}

/* the Q8_0 cache: kc, vc rows of kv_stride / 32 blocks */
QORA_TARGET_AVX2 static int attend_q8_avx2(const float* q, const block_q8* kc, const block_q8* vc, int n_pos, int nh,
                                           int ng, int head_dim, size_t kv_stride, float* scores, size_t ss,
                                           float* out, float* mx, float* sum, float scale) {
    return attend_avx2(1, q, kc, vc, n_pos, nh, ng, head_dim, kv_stride, scores, ss, out, mx, sum, scale);
}
#endif /* QORA_X86 */

#endif /* QORA_ATTENTION_AVX2_H */
