/* qora — AVX-512 attention over the f16 KV cache for the query heads of one KV group.
   Each K and V row is converted once for the whole group and stays in registers; scores
   are reduced once per (position, head); softmax uses a vector exp; the value sums
   accumulate in registers across the chunk's positions (2 heads of 128 at a time) and are
   stored unnormalised with each head's max and sum (one chunk of forward.h's split
   attention). Every step is the generic chunk's (qora_attend_chunk) in the order of
   common.h. Head sizes 64, 128 and 256; others use the generic loop. A Q8_0 cache (Q8 = 1) is
   converted 16 values at a time as f16(d) * q (exact in float); every later step is the f16 one. */
#ifndef QORA_ATTENTION_AVX512_H
#define QORA_ATTENTION_AVX512_H

#include "kernels_avx512.h"

#if QORA_X86
/* qora_exp_neg (common.h), 16 lanes: the same operations, so every path gets the same bits */
QORA_TARGET_AVX512 static inline __m512 exp_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(QORA_EXP_MIN));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* sc[0..n) = exp(sc - max); returns the sum: one vector holds the 16 chains (index mod 16; the masked
   tail adds +0 to the other lanes), then the tree of qora_reduce16 */
QORA_TARGET_AVX512 static float softmax_unnorm_avx512(float* sc, int n, float* max_out) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 16 <= n; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + t));
    const __mmask16 tail = (__mmask16)((1u << (n - t)) - 1);
    if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sc + t));
    *max_out = _mm512_reduce_max_ps(mx);
    const __m512 m = _mm512_set1_ps(*max_out);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), m));
        _mm512_storeu_ps(sc + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + t), m));
        _mm512_mask_storeu_ps(sc + t, tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1));
    return hsum_avx2(_mm256_add_ps(_mm512_castps512_ps256(sum), hi));
}

/* values 16 i .. 16 i + 15 of cache row t (f16 halves, or Q8 blocks: kv_stride / 32 per row) */
QORA_TARGET_AVX512 QORA_INLINE __m512 kv16_avx512(const int Q8, const void* c, size_t kv_stride, int t, int i) {
    if (Q8) {
        const block_q8* b = (const block_q8*)c + (size_t)t * (kv_stride / QK) + i / 2;
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b->qs + 16 * (i & 1)))));
        return _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(b->d)), q);
    }
    const uint16_t* v = (const uint16_t*)c + (size_t)t * kv_stride;
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(v + 16 * i)));
}

/* HP heads' outputs (D floats each) = sum over positions of p[h][t] * V[t] (unnormalised) */
QORA_TARGET_AVX512 QORA_INLINE void attend_pv_avx512(const int Q8, const int D, const int HP, const void* vc, int n_pos,
                                                    size_t kv_stride, const float* p, size_t ss, float* out) {
    __m512 acc[16];
    for (int i = 0; i < HP * D / 16; i++) acc[i] = _mm512_setzero_ps();
    for (int t = 0; t < n_pos; t++) {
        __m512 w[4];
        for (int j = 0; j < HP; j++) w[j] = _mm512_set1_ps(p[j * ss + t]);
        for (int i = 0; i < D / 16; i++) {
            const __m512 vf = kv16_avx512(Q8, vc, kv_stride, t, i);
            for (int j = 0; j < HP; j++) acc[j * (D / 16) + i] = _mm512_fmadd_ps(w[j], vf, acc[j * (D / 16) + i]);
        }
    }
    for (int j = 0; j < HP; j++)
        for (int i = 0; i < D / 16; i++)
            _mm512_storeu_ps(out + (size_t)j * D + 16 * i, acc[j * (D / 16) + i]);
}

QORA_TARGET_AVX512 QORA_INLINE void attend_avx512_d(const int Q8, const int D, const float* q, const void* kc,
                                                   const void* vc, int n_pos, int nh, size_t kv_stride, float* scores,
                                                   size_t ss, float* out, float* mx, float* sum, float scale) {
    for (int t = 0; t < n_pos; t++) {
        __m512 kf[16];
        for (int i = 0; i < D / 16; i++) kf[i] = kv16_avx512(Q8, kc, kv_stride, t, i);
        for (int h = 0; h < nh; h++) {
            const float* qh = q + (size_t)h * D;
            /* the float dot of common.h (D is a multiple of 32: no tail) */
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int i = 0; i < D / 16; i += 2) {
                a0 = _mm512_fmadd_ps(kf[i], _mm512_loadu_ps(qh + 16 * i), a0);
                a1 = _mm512_fmadd_ps(kf[i + 1], _mm512_loadu_ps(qh + 16 * i + 16), a1);
            }
            scores[h * ss + t] = reduce_2x16_avx512(a0, a1) * scale;
        }
    }
    for (int h = 0; h < nh; h++) sum[h] = softmax_unnorm_avx512(scores + h * ss, n_pos, mx + h);
    const int HP = D >= 256 ? 1 : 256 / D; /* heads per pass: up to 16 accumulators */
    int h = 0;
    if (HP == 4)
        for (; h + 4 <= nh; h += 4)
            attend_pv_avx512(Q8, D, 4, vc, n_pos, kv_stride, scores + h * ss, ss, out + (size_t)h * D);
    if (HP >= 2)
        for (; h + 2 <= nh; h += 2)
            attend_pv_avx512(Q8, D, 2, vc, n_pos, kv_stride, scores + h * ss, ss, out + (size_t)h * D);
    for (; h < nh; h++) attend_pv_avx512(Q8, D, 1, vc, n_pos, kv_stride, scores + h * ss, ss, out + (size_t)h * D);
}

/* Returns 0 (nothing done) for head sizes it has no registers plan for. */
QORA_TARGET_AVX512 QORA_INLINE int attend_avx512(const int Q8, const float* q, const void* kc, const void* vc,
                                                 int n_pos, int nh, int head_dim, size_t kv_stride, float* scores,
                                                 size_t ss, float* out, float* mx, float* sum, float scale) {
    if (n_pos < 1) return 0;
    switch (head_dim) {
    case 64: attend_avx512_d(Q8, 64, q, kc, vc, n_pos, nh, kv_stride, scores, ss, out, mx, sum, scale); return 1;
    case 128: attend_avx512_d(Q8, 128, q, kc, vc, n_pos, nh, kv_stride, scores, ss, out, mx, sum, scale); return 1;
    case 256: attend_avx512_d(Q8, 256, q, kc, vc, n_pos, nh, kv_stride, scores, ss, out, mx, sum, scale); return 1;
    default: return 0;
    }
}

QORA_TARGET_AVX512 static int attend_f16_avx512(const float* q, const uint16_t* kc, const uint16_t* vc, int n_pos,
                                                int nh, int head_dim, size_t kv_stride, float* scores, size_t ss,
                                                float* out, float* mx, float* sum, float scale) {
    return attend_avx512(0, q, kc, vc, n_pos, nh, head_dim, kv_stride, scores, ss, out, mx, sum, scale);
}

/* the Q8_0 cache: kc, vc rows of kv_stride / 32 blocks */
QORA_TARGET_AVX512 static int attend_q8_avx512(const float* q, const block_q8* kc, const block_q8* vc, int n_pos,
                                               int nh, int head_dim, size_t kv_stride, float* scores, size_t ss,
                                               float* out, float* mx, float* sum, float scale) {
    return attend_avx512(1, q, kc, vc, n_pos, nh, head_dim, kv_stride, scores, ss, out, mx, sum, scale);
}
#endif /* QORA_X86 */

#endif /* QORA_ATTENTION_AVX512_H */
