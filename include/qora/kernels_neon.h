/* qora — aarch64 kernels: NEON (AdvSIMD, every aarch64 CPU), dotprod (sdot) and i8mm (smmla), beside
   the x86 ones with the same contracts and the same order of float operations (common.h), so every
   path gives the same bits: the integer parts are exact whatever instructions form them, and the
   float steps are the scalar reference's, lane for lane (vfmaq_f32 is fmaf, vcvtnq_s32_f32 and
   vrndnq_f32 round half to even like nearbyintf, vcvt_f32_f16 is exact).
   The float kernels (dots, norms, softmax, f16 conversion, attention, float activations) need nothing
   past NEON and serve all three tables; the integer products are written once in kernels_neon_int.h and
   compiled twice, with widening multiplies (NEON) and with sdot (dotprod); i8mm adds smmla prefill tiles
   (two rows x two tokens) for Q4_0 (repacked or not), Q8_0 and the K types. */
#ifndef QORA_KERNELS_NEON_H
#define QORA_KERNELS_NEON_H

#include "common.h"
#include "kernels_scalar.h"
#include "tiles.h"
#include "kquants.h"
#include "repack.h"

#if QORA_NEON

static inline float f16_neon(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }

static inline float32x4_t f16x4_neon(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
    const uint16_t h[4] = {a, b, c, d};
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

/* the fixed tree of the float dot (common.h) over the 32 chains held as 8 vectors (chain j: vector j / 4,
   lane j % 4): lane j + lane j+16, then qora_reduce16's halvings j + j+8, j + j+4, j + j+2, j + j+1 */
static inline float reduce32_neon(const float32x4_t a[8]) {
    const float32x4_t c0 = vaddq_f32(a[0], a[4]), c1 = vaddq_f32(a[1], a[5]);
    const float32x4_t c2 = vaddq_f32(a[2], a[6]), c3 = vaddq_f32(a[3], a[7]);
    const float32x4_t e = vaddq_f32(vaddq_f32(c0, c2), vaddq_f32(c1, c3));
    const float32x2_t f = vadd_f32(vget_low_f32(e), vget_high_f32(e));
    return vget_lane_f32(f, 0) + vget_lane_f32(f, 1);
}

/* 32 chains by index mod 32 over n (a multiple of 32 here) weights from LOAD4(i) and x */
#define QORA_FLOAT_DOT_NEON(LOAD4, AT)                                                            \
    float32x4_t a[8];                                                                             \
    for (int j = 0; j < 8; j++) a[j] = vdupq_n_f32(0.0f);                                         \
    int i = 0;                                                                                    \
    for (; i + 32 <= n; i += 32)                                                                  \
        for (int j = 0; j < 8; j++) a[j] = vfmaq_f32(a[j], LOAD4(i + 4 * j), vld1q_f32(x + i + 4 * j)); \
    float sum = reduce32_neon(a);                                                                 \
    for (; i < n; i++) sum = fmaf(AT(i), x[i], sum); /* ragged tail, in order */                  \
    return sum;

#define QORA_LOAD4_F32_NEON(i) vld1q_f32(w + (i))
#define QORA_LOAD4_F16_NEON(i) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + (i))))
#define QORA_LOAD4_BF16_NEON(i) vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + (i)), 16))

static float dot_f32_neon(int n, const float* w, const float* x) { QORA_FLOAT_DOT_NEON(QORA_LOAD4_F32_NEON, QORA_F32_AT) }

static float dot_f16_f32_neon(int n, const uint16_t* w, const float* x) {
    QORA_FLOAT_DOT_NEON(QORA_LOAD4_F16_NEON, QORA_F16_AT)
}

static float dot_bf16_f32_neon(int n, const uint16_t* w, const float* x) {
    QORA_FLOAT_DOT_NEON(QORA_LOAD4_BF16_NEON, QORA_BF16_AT)
}

static void rmsnorm_neon(float* out, const float* x, const float* w, int n, float eps) {
    const float inv = 1.0f / sqrtf(dot_f32_neon(n, x, x) / (float)n + eps);
    const float32x4_t vinv = vdupq_n_f32(inv);
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vmulq_f32(vld1q_f32(w + i), vmulq_f32(vld1q_f32(x + i), vinv)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static void axpy_neon(int n, float a, const float* x, float* y) {
    const float32x4_t va = vdupq_n_f32(a);
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, vld1q_f32(x + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

static void axpy_f16_neon(int n, float a, const uint16_t* x, float* y) {
    const float32x4_t va = vdupq_n_f32(a);
    int i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(x + i)))));
    for (; i < n; i++) y[i] = fmaf(a, qora_fp16_to_fp32(x[i]), y[i]);
}

/* qora_exp_neg (common.h), 4 lanes: the same operations */
static inline float32x4_t exp_neon(float32x4_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(QORA_EXP_MIN));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

/* softmax_unnorm_scalar's result: four vectors hold the 16 chains (index mod 16) */
static float softmax_unnorm_neon(float* sc, int n, float* max_out) {
    float mx = sc[0];
    for (int t = 1; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
    *max_out = mx;
    const float32x4_t m = vdupq_n_f32(mx);
    float32x4_t s[4];
    for (int j = 0; j < 4; j++) s[j] = vdupq_n_f32(0.0f);
    int t = 0;
    for (; t + 16 <= n; t += 16)
        for (int j = 0; j < 4; j++) {
            const float32x4_t e = exp_neon(vsubq_f32(vld1q_f32(sc + t + 4 * j), m));
            vst1q_f32(sc + t + 4 * j, e);
            s[j] = vaddq_f32(s[j], e);
        }
    float c[16];
    for (int j = 0; j < 4; j++) vst1q_f32(c + 4 * j, s[j]);
    for (; t < n; t++) {
        sc[t] = qora_exp_neg(sc[t] - mx);
        c[t % 16] = c[t % 16] + sc[t];
    }
    return qora_reduce16(c);
}

/* f32 -> f16 round to nearest even (FCVTN under the default FPCR), as qora_fp32_to_fp16 */
static void to_f16_neon(const float* x, uint16_t* y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = qora_fp32_to_fp16(x[i]);
}

/* quantize_q8_scalar: d = amax / 127 as f16, q = round-half-even(x * (127 / amax)) */
static void quantize_q8_neon(const float* x, block_q8* y, int n) {
    for (int b = 0; b < n / QK; b++) {
        const float* xb = x + b * QK;
        float32x4_t v[8], m = vdupq_n_f32(0.0f);
        for (int j = 0; j < 8; j++) {
            v[j] = vld1q_f32(xb + 4 * j);
            m = vmaxq_f32(m, vabsq_f32(v[j]));
        }
        const float amax = vmaxvq_f32(m);
        y[b].d = qora_fp32_to_fp16(amax / 127.0f);
        const float32x4_t id = vdupq_n_f32(amax != 0.0f ? 127.0f / amax : 0.0f);
        for (int j = 0; j < 8; j += 2) {
            const int32x4_t i0 = vcvtnq_s32_f32(vmulq_f32(v[j], id)), i1 = vcvtnq_s32_f32(vmulq_f32(v[j + 1], id));
            const int16x8_t h = vcombine_s16(vmovn_s32(i0), vmovn_s32(i1));
            vst1_s8(y[b].qs + 4 * j, vmovn_s16(h));
        }
    }
}

/* ---- the integer products, once with widening multiplies and once with sdot ---- */
#define QN(name) name##_neon
#define QN_TARGET
#define QN_DOTPROD 0
#include "kernels_neon_int.h"
#undef QN
#undef QN_TARGET
#undef QN_DOTPROD

/* ---- attention: one chunk of one KV group's query heads over the KV cache, f16 or Q8_0
   (qora_attend_chunk's contract and its portable loop's operations: each K row converted to float once
   for the whole group (a Q8_0 value f16(d) * q is exact in float), each score the float dot of common.h
   times the scale, softmax_unnorm_neon per head, then per column the fma chain over the positions of
   e_t * v_t from +0, a block of 16 columns of up to four heads in registers while the positions stream
   by, each V row converted once for those heads). Q8: kc, vc rows of kv_stride / 32 blocks. ---- */
#define QORA_ATT_NEON_MAX_D 256

/* 16 values of a cache row from element c (c % 16 == 0) as floats */
QORA_INLINE void kv16_neon(const int Q8, const void* row, int c, float32x4_t v[4]) {
    if (Q8) {
        const block_q8* b = (const block_q8*)row + c / QK;
        const float32x4_t d = vdupq_n_f32(f16_neon(b->d));
        const int8x16_t q = vld1q_s8(b->qs + c % QK);
        const int16x8_t w[2] = {vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q)};
        for (int i = 0; i < 4; i++) {
            const int32x4_t qi = i & 1 ? vmovl_high_s16(w[i / 2]) : vmovl_s16(vget_low_s16(w[i / 2]));
            v[i] = vmulq_f32(d, vcvtq_f32_s32(qi));
        }
        return;
    }
    for (int i = 0; i < 4; i++) v[i] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t*)row + c + 4 * i)));
}

QORA_INLINE const void* kv_row_neon(const int Q8, const void* base, size_t kv_stride, int t) {
    return Q8 ? (const void*)((const block_q8*)base + (size_t)t * (kv_stride / QK))
              : (const void*)((const uint16_t*)base + (size_t)t * kv_stride);
}

QORA_INLINE void attend_pv_neon(const int Q8, const int HP, const void* vc, int n_pos, size_t kv_stride,
                                const float* p, size_t ss, int col, int D, float* out) {
    float32x4_t acc[4][4];
    for (int j = 0; j < HP; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = vdupq_n_f32(0.0f);
    for (int t = 0; t < n_pos; t++) {
        float32x4_t vf[4];
        kv16_neon(Q8, kv_row_neon(Q8, vc, kv_stride, t), col, vf);
        for (int j = 0; j < HP; j++) {
            const float32x4_t e = vdupq_n_f32(p[j * ss + t]);
            for (int i = 0; i < 4; i++) acc[j][i] = vfmaq_f32(acc[j][i], e, vf[i]);
        }
    }
    for (int j = 0; j < HP; j++)
        for (int i = 0; i < 4; i++) vst1q_f32(out + (size_t)j * D + col + 4 * i, acc[j][i]);
}

/* Returns 0 (nothing done) for head sizes it has no plan for (not a multiple of 32, or past 256). */
QORA_INLINE int attend_neon(const int Q8, const float* q, const void* kc, const void* vc, int n_pos, int nh,
                            int head_dim, size_t kv_stride, float* scores, size_t ss, float* out, float* mx,
                            float* sum, float scale) {
    const int D = head_dim;
    if (n_pos < 1 || D % 32 || D > QORA_ATT_NEON_MAX_D) return 0;
    float kf[QORA_ATT_NEON_MAX_D];
    for (int t = 0; t < n_pos; t++) {
        const void* k = kv_row_neon(Q8, kc, kv_stride, t);
        for (int c = 0; c < D; c += 16) {
            float32x4_t v[4];
            kv16_neon(Q8, k, c, v);
            for (int i = 0; i < 4; i++) vst1q_f32(kf + c + 4 * i, v[i]);
        }
        for (int h = 0; h < nh; h++) scores[(size_t)h * ss + t] = dot_f32_neon(D, kf, q + (size_t)h * D) * scale;
    }
    for (int h = 0; h < nh; h++) sum[h] = softmax_unnorm_neon(scores + (size_t)h * ss, n_pos, mx + h);
    for (int col = 0; col < D; col += 16)
        for (int h = 0; h < nh; h += 4) {
            const int hp = nh - h < 4 ? nh - h : 4;
            const float* p = scores + (size_t)h * ss;
            float* o = out + (size_t)h * D;
            switch (hp) {
            case 1: attend_pv_neon(Q8, 1, vc, n_pos, kv_stride, p, ss, col, D, o); break;
            case 2: attend_pv_neon(Q8, 2, vc, n_pos, kv_stride, p, ss, col, D, o); break;
            case 3: attend_pv_neon(Q8, 3, vc, n_pos, kv_stride, p, ss, col, D, o); break;
            default: attend_pv_neon(Q8, 4, vc, n_pos, kv_stride, p, ss, col, D, o); break;
            }
        }
    return 1;
}

/* ng groups one after another; group g's heads are g * nh .. and its K / V slice head_dim * g values on */
static int attend_f16_neon(const float* q, const uint16_t* kc, const uint16_t* vc, int n_pos, int nh, int ng,
                           int head_dim, size_t kv_stride, float* scores, size_t ss, float* out, float* mx, float* sum,
                           float scale) {
    for (int g = 0; g < ng; g++) {
        const size_t h = (size_t)g * nh;
        const size_t e = (size_t)g * head_dim;
        if (!attend_neon(0, q + h * head_dim, qora_kv_at(0, kc, e), qora_kv_at(0, vc, e), n_pos, nh, head_dim,
                         kv_stride, scores + h * ss, ss, out + h * head_dim, mx + h, sum + h, scale))
            return 0; /* no plan for this head size: none for any group */
    }
    return 1;
}

static int attend_q8_neon(const float* q, const block_q8* kc, const block_q8* vc, int n_pos, int nh, int ng,
                          int head_dim, size_t kv_stride, float* scores, size_t ss, float* out, float* mx, float* sum,
                          float scale) {
    for (int g = 0; g < ng; g++) {
        const size_t h = (size_t)g * nh, e = (size_t)g * head_dim;
        if (!attend_neon(1, q + h * head_dim, qora_kv_at(1, kc, e), qora_kv_at(1, vc, e), n_pos, nh, head_dim,
                         kv_stride, scores + h * ss, ss, out + h * head_dim, mx + h, sum + h, scale))
            return 0;
    }
    return 1;
}

/* ---- float activations: dot_deq_f32_scalar's result, the weights dequantized in registers with
   qora_dequant_range's operations (s * q, then + m or - m: never fused) into the 32 chains of the float
   dot ---- */
static inline void deq_fma32_neon(int8x16_t lo, int8x16_t hi, float s_lo, float s_hi, float m, int mode,
                                  const float* x, float32x4_t a[8]) {
    const int8x16_t v[2] = {lo, hi};
    for (int h = 0; h < 2; h++) {
        const int16x8_t w[2] = {vmovl_s8(vget_low_s8(v[h])), vmovl_high_s8(v[h])};
        const float32x4_t s = vdupq_n_f32(h ? s_hi : s_lo);
        for (int k = 0; k < 4; k++) {
            const int32x4_t q = k & 1 ? vmovl_high_s16(w[k / 2]) : vmovl_s16(vget_low_s16(w[k / 2]));
            float32x4_t wv = vmulq_f32(s, vcvtq_f32_s32(q));
            if (mode > 0) wv = vaddq_f32(wv, vdupq_n_f32(m));
            else if (mode < 0) wv = vsubq_f32(wv, vdupq_n_f32(m));
            a[4 * h + k] = vfmaq_f32(a[4 * h + k], wv, vld1q_f32(x + 16 * h + 4 * k));
        }
    }
}

static float dot_deq_f32_neon(int dtype, int n, const void* w, const float* x) {
    float32x4_t a[8];
    for (int j = 0; j < 8; j++) a[j] = vdupq_n_f32(0.0f);
    if (qora_block_elems(dtype) == QK) {
        for (int b = 0; b < n / QK; b++) {
            int8x16_t lo, hi;
            uint16_t d16, m16 = 0;
            if (dtype == QORA_Q4 || dtype == QORA_Q8) weights_i8_neon(dtype == QORA_Q4, w, b, &lo, &hi, &d16);
            else w32_i8_neon(dtype, w, b, &lo, &hi, &d16, &m16);
            const int mode = dtype == QORA_Q4_1 || dtype == QORA_Q5_1;
            const float d = f16_neon(d16);
            deq_fma32_neon(lo, hi, d, d, mode ? f16_neon(m16) : 0.0f, mode, x + b * QK, a);
        }
        return reduce32_neon(a);
    }
    const size_t bb = qora_row_bytes(dtype, QK_K);
    for (int b = 0; b < n / QK_K; b++) {
        const char* blk = (const char*)w + (size_t)b * bb;
        int8x16_t q[16];
        int32_t sc[16], mn[8];
        kq_unpack_neon(dtype, blk, q, sc, mn);
        const float* xb = x + (size_t)b * QK_K;
        if (dtype == QORA_Q6_K) {
            const float d = f16_neon(((const block_q6_K*)blk)->d);
            for (int k = 0; k < 8; k++)
                deq_fma32_neon(q[2 * k], q[2 * k + 1], d * (float)sc[2 * k], d * (float)sc[2 * k + 1], 0.0f, 0,
                               xb + 32 * k, a);
        } else {
            const block_q4_K* k4 = (const block_q4_K*)blk;
            const float d = f16_neon(k4->d), dmin = f16_neon(k4->dmin);
            for (int k = 0; k < 8; k++) {
                const float ds = d * (float)sc[2 * k];
                deq_fma32_neon(q[2 * k], q[2 * k + 1], ds, ds, dmin * (float)mn[k], -1, xb + 32 * k, a);
            }
        }
    }
    return reduce32_neon(a);
}

#if QORA_NEON_DOTPROD
#define QN(name) name##_dotprod
#define QN_TARGET QORA_TARGET_DOTPROD
#define QN_DOTPROD 1
#include "kernels_neon_int.h"
#undef QN
#undef QN_TARGET
#undef QN_DOTPROD
#endif

#if QORA_NEON_I8MM
/* ---- i8mm: smmla prefill tiles for interleaved Q4 rows ----
   smmla multiplies a 2x8 block of int8 (two rows' 8 consecutive elements) by another (two tokens'
   elements) into a 2x2 int32 tile: the chunk pair (2kp, 2kp+1) of rows (2p, 2p+1) is one 32-bit zip of
   the two chunks, and a token pair's 8 activation bytes are two 8-byte loads. Twice the products of
   an sdot per instruction; the integers are the same exact dots, so the float steps (q4x8_block's)
   and their order are unchanged. */
QORA_TARGET_I8MM QORA_INLINE void q4x8_mm_weights(const block_q4x8* wb, int8x16_t lo[2][4], int8x16_t hi[2][4]) {
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (int kp = 0; kp < 2; kp++)
        for (int h = 0; h < 2; h++) { /* rows 4h..4h+3 */
            const uint32x4_t a = vreinterpretq_u32_u8(vld1q_u8(wb->qs[2 * kp][4 * h]));
            const uint32x4_t b = vreinterpretq_u32_u8(vld1q_u8(wb->qs[2 * kp + 1][4 * h]));
            const uint8x16_t p0 = vreinterpretq_u8_u32(vzip1q_u32(a, b)), p1 = vreinterpretq_u8_u32(vzip2q_u32(a, b));
            lo[kp][2 * h] = vreinterpretq_s8_u8(vandq_u8(p0, m4));
            hi[kp][2 * h] = vreinterpretq_s8_u8(vshrq_n_u8(p0, 4));
            lo[kp][2 * h + 1] = vreinterpretq_s8_u8(vandq_u8(p1, m4));
            hi[kp][2 * h + 1] = vreinterpretq_s8_u8(vshrq_n_u8(p1, 4));
        }
}

/* one chain per row over the blocks given, for TP token pairs (2 * TP tokens; x1 of the last pair may
   repeat its x0, its results unused) */
QORA_TARGET_I8MM QORA_INLINE void q4x8_mm_t(const int TP, int nt, int n, const block_q4x8* w, const block_q8* x,
                                            const qora_xblock* xsum, size_t xs, float* out, size_t ldo) {
    float32x4_t acc[4][2];
    for (int t = 0; t < 2 * TP; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        const block_q4x8* wb = w + b;
        int8x16_t lo[2][4], hi[2][4];
        q4x8_mm_weights(wb, lo, hi);
        const float32x4_t dw0 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wb->d)));
        const float32x4_t dw1 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wb->d + 4)));
        for (int tp = 0; tp < TP; tp++) {
            const int t0 = 2 * tp, t1 = 2 * tp + 1 < nt ? 2 * tp + 1 : 2 * tp;
            const int8_t *x0 = x[t0 * xs + b].qs, *x1 = x[t1 * xs + b].qs;
            int32x4_t p[4]; /* row pair p: [r2p.t0, r2p.t1, r2p+1.t0, r2p+1.t1] */
            for (int r = 0; r < 4; r++) p[r] = vdupq_n_s32(0);
            for (int kp = 0; kp < 2; kp++) {
                const int8x16_t xl = vcombine_s8(vld1_s8(x0 + 8 * kp), vld1_s8(x1 + 8 * kp));
                const int8x16_t xh = vcombine_s8(vld1_s8(x0 + 16 + 8 * kp), vld1_s8(x1 + 16 + 8 * kp));
                for (int r = 0; r < 4; r++) p[r] = vmmlaq_s32(vmmlaq_s32(p[r], lo[kp][r], xl), hi[kp][r], xh);
            }
            const int32x4_t s[2][2] = {{vuzp1q_s32(p[0], p[1]), vuzp1q_s32(p[2], p[3])},
                                       {vuzp2q_s32(p[0], p[1]), vuzp2q_s32(p[2], p[3])}};
            for (int u = 0; u < 2; u++) {
                const int t = u ? t1 : t0;
                const qora_xblock* xe = xsum + t * xs + b;
                const int32x4_t o = vdupq_n_s32(xe->off);
                const float32x4_t dx = vdupq_n_f32(xe->d);
                float32x4_t* a = acc[2 * tp + u];
                a[0] = vfmaq_f32(a[0], vmulq_f32(dw0, dx), vcvtq_f32_s32(vaddq_s32(s[u][0], o)));
                a[1] = vfmaq_f32(a[1], vmulq_f32(dw1, dx), vcvtq_f32_s32(vaddq_s32(s[u][1], o)));
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        vst1q_f32(out + t * ldo, acc[t][0]);
        vst1q_f32(out + t * ldo + 4, acc[t][1]);
    }
}

QORA_TARGET_I8MM static void q4x8_i8mm_range(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                             size_t xs, int nt, float* out, size_t ldo) {
    if (nt <= 2) q4x8_mm_t(1, nt, n, w, x, xsum, xs, out, ldo);
    else q4x8_mm_t(2, nt, n, w, x, xsum, xs, out, ldo);
}

/* decode (one token) stays on sdot: a lone token fills half of each smmla */
QORA_TARGET_I8MM static void q4x8_i8mm(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                       size_t xs, int nt, float* out, size_t ldo) {
    if (nt == 1) {
        q4x8_decode_dotprod(n, w, x, xsum, out);
        return;
    }
    QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo, q4x8_i8mm_range(nbs * QK, w + b0, x + b0, xsum + b0, xs, nt, dst, lddst));
}

/* Q4_0 / Q8_0 rows in the file's layout x Q8_0 activations (qdot_t's contract and order, R, T <= 4) with
   smmla: per block of each segment, one 2x2 tile of (row pair) x (token pair) dots from four 8-byte
   chunks; the four segments' tiles are transposed so that lane i is segment i again, as in qdot_t. */
QORA_TARGET_I8MM QORA_INLINE int32x4_t mm_block(int8x16_t lo0, int8x16_t hi0, int8x16_t lo1, int8x16_t hi1,
                                                const int8_t* x0, const int8_t* x1) {
    const int64x2_t a[2][2] = {{vreinterpretq_s64_s8(lo0), vreinterpretq_s64_s8(hi0)},
                               {vreinterpretq_s64_s8(lo1), vreinterpretq_s64_s8(hi1)}};
    int32x4_t m = vdupq_n_s32(0);
    for (int h = 0; h < 2; h++) {
        const int64x2_t u = vreinterpretq_s64_s8(vld1q_s8(x0 + 16 * h)), v = vreinterpretq_s64_s8(vld1q_s8(x1 + 16 * h));
        m = vmmlaq_s32(m, vreinterpretq_s8_s64(vzip1q_s64(a[0][h], a[1][h])), vreinterpretq_s8_s64(vzip1q_s64(u, v)));
        m = vmmlaq_s32(m, vreinterpretq_s8_s64(vzip2q_s64(a[0][h], a[1][h])), vreinterpretq_s8_s64(vzip2q_s64(u, v)));
    }
    return m; /* [r0.t0, r0.t1, r1.t0, r1.t1] */
}

QORA_TARGET_I8MM QORA_INLINE void qdot_mm_t(const int Q4, const int R, const int T, int n, const void* w, size_t ws,
                                            const block_q8* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK, seg = nb / QORA_SEGS;
    float32x4_t acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vdupq_n_f32(0.0f);
    for (int b = 0; b < seg; b++) {
        float32x4_t dx[4], dw[4];
        int8x16_t lo[4][4], hi[4][4]; /* [row][segment] */
        for (int t = 0; t < T; t++) {
            const block_q8* xt = x + t * xs + b;
            dx[t] = f16x4_neon(xt[0].d, xt[seg].d, xt[2 * seg].d, xt[3 * seg].d);
        }
        for (int r = 0; r < R; r++) {
            uint16_t d16[4];
            for (int i = 0; i < 4; i++)
                weights_i8_dotprod(Q4, (const char*)w + r * ws, b + i * seg, &lo[r][i], &hi[r][i], &d16[i]);
            dw[r] = f16x4_neon(d16[0], d16[1], d16[2], d16[3]);
        }
        for (int r0 = 0; r0 < R; r0 += 2) {
            const int r1 = r0 + 1 < R ? r0 + 1 : r0;
            for (int t0 = 0; t0 < T; t0 += 2) {
                const int t1 = t0 + 1 < T ? t0 + 1 : t0;
                int32x4_t p[4]; /* segment i's tile */
                for (int i = 0; i < 4; i++)
                    p[i] = mm_block(lo[r0][i], hi[r0][i], lo[r1][i], hi[r1][i], x[t0 * xs + b + i * seg].qs,
                                    x[t1 * xs + b + i * seg].qs);
                const int32x4_t ea = vtrn1q_s32(p[0], p[1]), eb = vtrn2q_s32(p[0], p[1]);
                const int32x4_t fa = vtrn1q_s32(p[2], p[3]), fb = vtrn2q_s32(p[2], p[3]);
                const int64x2_t a64 = vreinterpretq_s64_s32(ea), b64 = vreinterpretq_s64_s32(eb);
                const int64x2_t c64 = vreinterpretq_s64_s32(fa), d64 = vreinterpretq_s64_s32(fb);
                const int32x4_t s[4] = {/* r0.t0, r0.t1, r1.t0, r1.t1, lane i = segment i */
                                        vreinterpretq_s32_s64(vzip1q_s64(a64, c64)),
                                        vreinterpretq_s32_s64(vzip1q_s64(b64, d64)),
                                        vreinterpretq_s32_s64(vzip2q_s64(a64, c64)),
                                        vreinterpretq_s32_s64(vzip2q_s64(b64, d64))};
                for (int k = 0; k < 4; k++) {
                    const int r = k < 2 ? r0 : r1, t = k & 1 ? t1 : t0;
                    if ((k >= 2 && r1 == r0) || ((k & 1) && t1 == t0)) continue; /* a repeated row or token */
                    acc[r][t] = vfmaq_f32(acc[r][t], vmulq_f32(dw[r], dx[t]), vcvtq_f32_s32(s[k]));
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const char* row = (const char*)w + r * ws;
        for (int t = 0; t < T; t++) {
            float a[4];
            vst1q_f32(a, acc[r][t]);
            const block_q8* xt = x + t * xs;
            for (int c = QORA_SEGS * seg; c < nb; c++) { /* segment 3's end, as qdot_t */
                int8x16_t l, h;
                uint16_t d16;
                weights_i8_dotprod(Q4, row, c, &l, &h, &d16);
                const int32_t isum = vaddvq_s32(block_dot_dotprod(l, h, xt + c));
                a[3] = fmaf(f16_neon(d16) * f16_neon(xt[c].d), (float)isum, a[3]);
            }
            out[t * ldo + r] = ((a[0] + a[1]) + a[2]) + a[3];
        }
    }
}

#define QORA_TILE_Q4_MM(R, T, n, w, ws, x, xs, out, ldo) qdot_mm_t(1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q8_MM(R, T, n, w, ws, x, xs, out, ldo) qdot_mm_t(0, R, T, n, w, ws, x, xs, out, ldo)

/* prefill tiles (two or more tokens) with smmla; one token (decode) on sdot */
QORA_TARGET_I8MM static void tile_q4_i8mm(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs, int nt,
                                          float* out, size_t ldo) {
    if (nt < 2) tile_q4_dotprod(n, w, ws, nr, x, xs, nt, out, ldo);
    else QORA_TILE_SWITCH(QORA_TILE_Q4_MM, n, w, ws, nr, x, xs, nt, out, ldo)
}

QORA_TARGET_I8MM static void tile_q8_i8mm(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs, int nt,
                                          float* out, size_t ldo) {
    if (nt < 2) tile_q8_dotprod(n, w, ws, nr, x, xs, nt, out, ldo);
    else QORA_TILE_SWITCH(QORA_TILE_Q8_MM, n, w, ws, nr, x, xs, nt, out, ldo)
}

/* K rows x Q8_K activations (qdotk_t's contract and integers, R, T <= 4) with smmla: per super-block and
   16-element sub-block, one 2x2 tile (a row pair's and a token pair's 16 bytes, as two 8-byte halves)
   times the rows' scales; an odd row or token repeats the last one, its results unused. */
QORA_TARGET_I8MM QORA_INLINE void qdotk_mm_t(const int dtype, const int R, const int T, int n, const void* w,
                                             size_t ws, const void* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK_K;
    const size_t bb = qora_row_bytes(dtype, QK_K);
    float acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;
    for (int b = 0; b < nb; b++) {
        int8x16_t q[4][16];
        int32_t sc[4][16], mn[4][8];
        const char* blk[4];
        const block_q8K* xt[4];
        for (int r = 0; r < R; r++) {
            blk[r] = (const char*)w + r * ws + (size_t)b * bb;
            kq_unpack_dotprod(dtype, blk[r], q[r], sc[r], mn[r]);
        }
        for (int t = 0; t < T; t++) xt[t] = (const block_q8K*)((const char*)x + t * xs) + b;
        for (int r0 = 0; r0 < R; r0 += 2) {
            const int r1 = r0 + 1 < R ? r0 + 1 : r0;
            for (int t0 = 0; t0 < T; t0 += 2) {
                const int t1 = t0 + 1 < T ? t0 + 1 : t0;
                int32x4_t s = vdupq_n_s32(0); /* [r0.t0, r0.t1, r1.t0, r1.t1] */
                for (int i = 0; i < 16; i++) {
                    const int64x2_t a = vreinterpretq_s64_s8(q[r0][i]), c = vreinterpretq_s64_s8(q[r1][i]);
                    const int64x2_t u = vreinterpretq_s64_s8(vld1q_s8(xt[t0]->qs + 16 * i));
                    const int64x2_t v = vreinterpretq_s64_s8(vld1q_s8(xt[t1]->qs + 16 * i));
                    int32x4_t m = vmmlaq_s32(vdupq_n_s32(0), vreinterpretq_s8_s64(vzip1q_s64(a, c)),
                                             vreinterpretq_s8_s64(vzip1q_s64(u, v)));
                    m = vmmlaq_s32(m, vreinterpretq_s8_s64(vzip2q_s64(a, c)), vreinterpretq_s8_s64(vzip2q_s64(u, v)));
                    const int32_t scv[4] = {sc[r0][i], sc[r0][i], sc[r1][i], sc[r1][i]};
                    s = vmlaq_s32(s, m, vld1q_s32(scv));
                }
                int32_t S[4];
                vst1q_s32(S, s);
                for (int k = 0; k < 4; k++) {
                    const int r = k < 2 ? r0 : r1, t = k & 1 ? t1 : t0;
                    if ((k >= 2 && r1 == r0) || ((k & 1) && t1 == t0)) continue; /* a repeated row or token */
                    if (dtype == QORA_Q6_K) {
                        acc[r][t] = fmaf(f16_neon(((const block_q6_K*)blk[r])->d) * xt[t]->d, (float)S[k], acc[r][t]);
                    } else {
                        const block_q4_K* kb = (const block_q4_K*)blk[r];
                        int32_t M = 0;
                        for (int j = 0; j < 8; j++) M += mn[r][j] * (xt[t]->bsums[2 * j] + xt[t]->bsums[2 * j + 1]);
                        acc[r][t] = fmaf(f16_neon(kb->d) * xt[t]->d, (float)S[k], acc[r][t]);
                        acc[r][t] = fmaf(-(f16_neon(kb->dmin) * xt[t]->d), (float)M, acc[r][t]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ldo + r] = acc[r][t];
}

#define QORA_TILE_Q4K_MM(R, T, n, w, ws, x, xs, out, ldo) qdotk_mm_t(QORA_Q4_K, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q5K_MM(R, T, n, w, ws, x, xs, out, ldo) qdotk_mm_t(QORA_Q5_K, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q6K_MM(R, T, n, w, ws, x, xs, out, ldo) qdotk_mm_t(QORA_Q6_K, R, T, n, w, ws, x, xs, out, ldo)

/* tile_x on i8mm: the K types' prefill tiles (two or more tokens) with smmla, the rest as dotprod */
QORA_TARGET_I8MM static void tile_x_i8mm(int dtype, int n, const void* w, size_t ws, int nr, const void* x, size_t xs,
                                         int nt, float* out, size_t ldo) {
    if (nt < 2 || qora_block_elems(dtype) != QK_K) {
        tile_x_dotprod(dtype, n, w, ws, nr, x, xs, nt, out, ldo);
        return;
    }
    switch (dtype) {
    case QORA_Q4_K: QORA_TILE_SWITCH(QORA_TILE_Q4K_MM, n, w, ws, nr, x, xs, nt, out, ldo) break;
    case QORA_Q5_K: QORA_TILE_SWITCH(QORA_TILE_Q5K_MM, n, w, ws, nr, x, xs, nt, out, ldo) break;
    default: QORA_TILE_SWITCH(QORA_TILE_Q6K_MM, n, w, ws, nr, x, xs, nt, out, ldo) break;
    }
}
#endif /* QORA_NEON_I8MM */

#endif /* QORA_NEON */
#endif /* QORA_KERNELS_NEON_H */
