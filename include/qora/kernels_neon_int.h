/* qora — the integer products of the aarch64 paths, a template included twice by kernels_neon.h:
   QN(name) names an instance (name_neon, name_dotprod), QN_TARGET is its target attribute and
   QN_DOTPROD chooses sdot (vdotq_s32) over widening multiplies (vmull_s8 + pairwise adds) for the
   exact int32 dots. Everything after the integers is the scalar reference's float order (common.h).
   No include guard: one copy per instance. */

/* acc + the products of 16 int8 pairs, as 4 int32 partial sums (no int16 overflow: two products of at
   most 128 * 127 per lane before the widening add) */
QN_TARGET QORA_INLINE int32x4_t QN(dot16)(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if QN_DOTPROD
    return vdotq_s32(acc, a, b);
#else
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b));
#endif
}

/* a Q4_0 / Q8_0 block's 32 weights as signed bytes (elements 0..15, 16..31) and its f16 scale */
QN_TARGET QORA_INLINE void QN(weights_i8)(const int Q4, const void* row, int b, int8x16_t* lo, int8x16_t* hi,
                                          uint16_t* d) {
    if (Q4) {
        const block_q4* wb = (const block_q4*)row + b;
        const uint8x16_t raw = vld1q_u8(wb->qs);
        *d = wb->d;
        *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f))), vdupq_n_s8(8));
        *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), vdupq_n_s8(8));
        return;
    }
    const block_q8* wb = (const block_q8*)row + b;
    *d = wb->d;
    *lo = vld1q_s8(wb->qs);
    *hi = vld1q_s8(wb->qs + 16);
}

/* the exact int32 dot of one weight block with one activation block */
QN_TARGET QORA_INLINE int32x4_t QN(block_dot)(int8x16_t lo, int8x16_t hi, const block_q8* xb) {
    return QN(dot16)(QN(dot16)(vdupq_n_s32(0), lo, vld1q_s8(xb->qs)), hi, vld1q_s8(xb->qs + 16));
}

/* Rows x activations in the file's layout (tiles.h's contract, R <= 4, T <= 4), qdot_avx2_t's scheme:
   lane i of each accumulator is segment i's chain (common.h), block b of the four segments per step;
   the blocks past four whole segments end segment 3's chain, then ((a0 + a1) + a2) + a3. */
QN_TARGET QORA_INLINE void QN(qdot_t)(const int Q4, const int R, const int T, int n, const void* w, size_t ws,
                                      const block_q8* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK, seg = nb / QORA_SEGS;
    float32x4_t acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vdupq_n_f32(0.0f);
    for (int b = 0; b < seg; b++) {
        float32x4_t dx[4];
        for (int t = 0; t < T; t++) {
            const block_q8* xt = x + t * xs + b;
            dx[t] = f16x4_neon(xt[0].d, xt[seg].d, xt[2 * seg].d, xt[3 * seg].d);
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            int8x16_t lo[4], hi[4];
            uint16_t d16[4];
            for (int i = 0; i < 4; i++) QN(weights_i8)(Q4, row, b + i * seg, &lo[i], &hi[i], &d16[i]);
            const float32x4_t dw = f16x4_neon(d16[0], d16[1], d16[2], d16[3]);
            for (int t = 0; t < T; t++) {
                const block_q8* xt = x + t * xs + b;
                int32x4_t p[4];
                for (int i = 0; i < 4; i++) p[i] = QN(block_dot)(lo[i], hi[i], xt + i * seg);
                const int32x4_t s = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
                acc[r][t] = vfmaq_f32(acc[r][t], vmulq_f32(dw, dx[t]), vcvtq_f32_s32(s));
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const char* row = (const char*)w + r * ws;
        for (int t = 0; t < T; t++) {
            float a[4];
            vst1q_f32(a, acc[r][t]);
            const block_q8* xt = x + t * xs;
            for (int c = QORA_SEGS * seg; c < nb; c++) {
                int8x16_t lo, hi;
                uint16_t d16;
                QN(weights_i8)(Q4, row, c, &lo, &hi, &d16);
                const int32_t isum = vaddvq_s32(QN(block_dot)(lo, hi, xt + c));
                a[3] = fmaf(f16_neon(d16) * f16_neon(xt[c].d), (float)isum, a[3]);
            }
            out[t * ldo + r] = ((a[0] + a[1]) + a[2]) + a[3];
        }
    }
}

#define QN_TILE_Q4(R, T, n, w, ws, x, xs, out, ldo) QN(qdot_t)(1, R, T, n, w, ws, x, xs, out, ldo)
#define QN_TILE_Q8(R, T, n, w, ws, x, xs, out, ldo) QN(qdot_t)(0, R, T, n, w, ws, x, xs, out, ldo)

QN_TARGET static void QN(tile_q4)(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs, int nt,
                                  float* out, size_t ldo) {
    QORA_TILE_SWITCH(QN_TILE_Q4, n, w, ws, nr, x, xs, nt, out, ldo)
}

QN_TARGET static void QN(tile_q8)(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs, int nt,
                                  float* out, size_t ldo) {
    QORA_TILE_SWITCH(QN_TILE_Q8, n, w, ws, nr, x, xs, nt, out, ldo)
}
#undef QN_TILE_Q4
#undef QN_TILE_Q8

QN_TARGET static float QN(dot_q4_q8)(int n, const block_q4* w, const block_q8* x) {
    float out;
    QN(qdot_t)(1, 1, 1, n, w, 0, x, 0, &out, 1);
    return out;
}

QN_TARGET static float QN(dot_q8_q8)(int n, const block_q8* w, const block_q8* x) {
    float out;
    QN(qdot_t)(0, 1, 1, n, w, 0, x, 0, &out, 1);
    return out;
}

/* ---- Q4 rows interleaved by 8 (repack.h): lo[k][h] / hi[k][h] = the low / high nibbles of chunk k of
   rows 4h..4h+3 (row j's 4 bytes in lanes 4j..4j+3) ---- */
QN_TARGET QORA_INLINE void QN(q4x8_nibbles)(const block_q4x8* wb, int8x16_t lo[4][2], int8x16_t hi[4][2]) {
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (int k = 0; k < 4; k++)
        for (int h = 0; h < 2; h++) {
            const uint8x16_t v = vld1q_u8(wb->qs[k][4 * h]);
            lo[k][h] = vreinterpretq_s8_u8(vandq_u8(v, m4));
            hi[k][h] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        }
}

/* the 8 rows' exact int32 dots with one activation block, the Q4 offset (-8 * sum) folded in:
   rows 0..3 in *s0, rows 4..7 in *s1 */
QN_TARGET QORA_INLINE void QN(q4x8_isum)(const int8x16_t lo[4][2], const int8x16_t hi[4][2], const block_q8* xb,
                                         int32_t off, int32x4_t* s0, int32x4_t* s1) {
#if QN_DOTPROD
    const int8x16_t xl = vld1q_s8(xb->qs), xh = vld1q_s8(xb->qs + 16);
    int32x4_t a0 = vdupq_n_s32(off), a1 = vdupq_n_s32(off), b0 = vdupq_n_s32(0), b1 = vdupq_n_s32(0);
#define QN_Q4X8_K(k)                                   \
    a0 = vdotq_laneq_s32(a0, lo[k][0], xl, k);         \
    a1 = vdotq_laneq_s32(a1, lo[k][1], xl, k);         \
    b0 = vdotq_laneq_s32(b0, hi[k][0], xh, k);         \
    b1 = vdotq_laneq_s32(b1, hi[k][1], xh, k);
    QN_Q4X8_K(0) QN_Q4X8_K(1) QN_Q4X8_K(2) QN_Q4X8_K(3)
#undef QN_Q4X8_K
    *s0 = vaddq_s32(a0, b0);
    *s1 = vaddq_s32(a1, b1);
#else
    /* int16 lanes: 8 products of at most 15 * 127 each, no overflow */
    int16x8_t p[4] = {vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0)};
    for (int k = 0; k < 4; k++) {
        int32_t vl, vh;
        memcpy(&vl, xb->qs + 4 * k, 4);
        memcpy(&vh, xb->qs + 16 + 4 * k, 4);
        const int8x16_t xl = vreinterpretq_s8_s32(vdupq_n_s32(vl)), xh = vreinterpretq_s8_s32(vdupq_n_s32(vh));
        for (int h = 0; h < 2; h++) {
            p[2 * h] = vmlal_s8(p[2 * h], vget_low_s8(lo[k][h]), vget_low_s8(xl));
            p[2 * h + 1] = vmlal_high_s8(p[2 * h + 1], lo[k][h], xl);
            p[2 * h] = vmlal_s8(p[2 * h], vget_low_s8(hi[k][h]), vget_low_s8(xh));
            p[2 * h + 1] = vmlal_high_s8(p[2 * h + 1], hi[k][h], xh);
        }
    }
    const int32x4_t o = vdupq_n_s32(off);
    *s0 = vaddq_s32(vpaddq_s32(vpaddlq_s16(p[0]), vpaddlq_s16(p[1])), o);
    *s1 = vaddq_s32(vpaddq_s32(vpaddlq_s16(p[2]), vpaddlq_s16(p[3])), o);
#endif
}

/* acc[0..1] (rows 0..3, 4..7) = fma(f16(w.d[j]) * x.d, isum_j, acc) for one block */
QN_TARGET QORA_INLINE void QN(q4x8_block)(const block_q4x8* wb, const int8x16_t lo[4][2], const int8x16_t hi[4][2],
                                          const block_q8* xb, const qora_xblock* xe, float32x4_t acc[2]) {
    int32x4_t s0, s1;
    QN(q4x8_isum)(lo, hi, xb, xe->off, &s0, &s1);
    const float32x4_t dx = vdupq_n_f32(xe->d);
    const float32x4_t d0 = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wb->d))), dx);
    const float32x4_t d1 = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wb->d + 4))), dx);
    acc[0] = vfmaq_f32(acc[0], d0, vcvtq_f32_s32(s0));
    acc[1] = vfmaq_f32(acc[1], d1, vcvtq_f32_s32(s1));
}

/* one chain per row over the blocks given, T <= 4 activations (a prefill pass of QORA_SEGMENT_PASSES) */
QN_TARGET QORA_INLINE void QN(q4x8_t)(const int T, int n, const block_q4x8* w, const block_q8* x,
                                      const qora_xblock* xsum, size_t xs, float* out, size_t ldo) {
    float32x4_t acc[4][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        int8x16_t lo[4][2], hi[4][2];
        QN(q4x8_nibbles)(w + b, lo, hi);
        for (int t = 0; t < T; t++) QN(q4x8_block)(w + b, lo, hi, x + t * xs + b, xsum + t * xs + b, acc[t]);
    }
    for (int t = 0; t < T; t++) {
        vst1q_f32(out + t * ldo, acc[t][0]);
        vst1q_f32(out + t * ldo + 4, acc[t][1]);
    }
}

QN_TARGET static void QN(q4x8_range)(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                     size_t xs, int nt, float* out, size_t ldo) {
    switch (nt) {
    case 1: QN(q4x8_t)(1, n, w, x, xsum, xs, out, ldo); break;
    case 2: QN(q4x8_t)(2, n, w, x, xsum, xs, out, ldo); break;
    case 3: QN(q4x8_t)(3, n, w, x, xsum, xs, out, ldo); break;
    default: QN(q4x8_t)(4, n, w, x, xsum, xs, out, ldo); break;
    }
}

/* Decode: the four segments of common.h walked at once (four weight streams in flight), as the AVX2
   decode kernel; the blocks past four whole segments end segment 3's chain. */
QN_TARGET static void QN(q4x8_decode)(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                      float* out) {
    const int nb = n / QK, seg = nb / QORA_SEGS;
    float32x4_t acc[4][2];
    for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
    int8x16_t lo[4][2], hi[4][2];
    for (int b = 0; b < seg; b++)
        for (int i = 0; i < 4; i++) {
            const int c = b + i * seg;
            QN(q4x8_nibbles)(w + c, lo, hi);
            QN(q4x8_block)(w + c, lo, hi, x + c, xsum + c, acc[i]);
        }
    for (int c = 4 * seg; c < nb; c++) {
        QN(q4x8_nibbles)(w + c, lo, hi);
        QN(q4x8_block)(w + c, lo, hi, x + c, xsum + c, acc[3]);
    }
    for (int h = 0; h < 2; h++)
        vst1q_f32(out + 4 * h, vaddq_f32(vaddq_f32(vaddq_f32(acc[0][h], acc[1][h]), acc[2][h]), acc[3][h]));
}

QN_TARGET static void QN(q4x8)(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum, size_t xs,
                               int nt, float* out, size_t ldo) {
    if (nt == 1) {
        QN(q4x8_decode)(n, w, x, xsum, out);
        return;
    }
    QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo, QN(q4x8_range)(nbs * QK, w + b0, x + b0, xsum + b0, xs, nt, dst, lddst));
}

/* ---- Q4_1 / Q5_0 / Q5_1 x Q8_0 (kquants.h): dot_q32_q8_scalar's order, qdot_t's scheme ---- */

/* a Q4_1 / Q5_0 / Q5_1 block's 32 integers in element order (qora_q32_int) and its f16 scale and minimum */
QN_TARGET QORA_INLINE void QN(w32_i8)(const int dtype, const void* row, int b, int8x16_t* lo, int8x16_t* hi,
                                      uint16_t* d, uint16_t* m) {
    const char* blk = (const char*)row + (size_t)b * qora_row_bytes(dtype, QK);
    *d = ((const uint16_t*)blk)[0];
    *m = dtype == QORA_Q5_0 ? 0 : ((const uint16_t*)blk)[1];
    const uint8_t* qs = dtype == QORA_Q4_1   ? ((const block_q4_1*)blk)->qs
                        : dtype == QORA_Q5_0 ? ((const block_q5_0*)blk)->qs
                                             : ((const block_q5_1*)blk)->qs;
    const uint8x16_t raw = vld1q_u8(qs);
    uint8x16_t l = vandq_u8(raw, vdupq_n_u8(0x0f)), h = vshrq_n_u8(raw, 4);
    if (dtype != QORA_Q4_1) { /* bit 4 of element j is bit j of qh */
        const uint8_t* qh = dtype == QORA_Q5_0 ? ((const block_q5_0*)blk)->qh : ((const block_q5_1*)blk)->qh;
        static const uint8_t bits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        const uint8x16_t bit = vld1q_u8(bits), b16 = vdupq_n_u8(0x10);
        l = vorrq_u8(l, vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1])), bit), b16));
        h = vorrq_u8(h, vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3])), bit), b16));
    }
    const int8x16_t off = vdupq_n_s8(dtype == QORA_Q5_0 ? 16 : 0);
    *lo = vsubq_s8(vreinterpretq_s8_u8(l), off);
    *hi = vsubq_s8(vreinterpretq_s8_u8(h), off);
}

QN_TARGET QORA_INLINE int32_t QN(xsum32)(const block_q8* xb) {
    return vaddlvq_s8(vld1q_s8(xb->qs)) + vaddlvq_s8(vld1q_s8(xb->qs + 16));
}

QN_TARGET QORA_INLINE void QN(qdot32_t)(const int dtype, const int R, const int T, int n, const void* w, size_t ws,
                                        const block_q8* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK, seg = nb / QORA_SEGS, has_min = dtype != QORA_Q5_0;
    float32x4_t acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vdupq_n_f32(0.0f);
    for (int b = 0; b < seg; b++) {
        float32x4_t dx[4], xsum[4];
        for (int t = 0; t < T; t++) {
            const block_q8* xt = x + t * xs + b;
            dx[t] = f16x4_neon(xt[0].d, xt[seg].d, xt[2 * seg].d, xt[3 * seg].d);
            if (has_min) {
                const int32_t s[4] = {QN(xsum32)(xt), QN(xsum32)(xt + seg), QN(xsum32)(xt + 2 * seg),
                                      QN(xsum32)(xt + 3 * seg)};
                xsum[t] = vcvtq_f32_s32(vld1q_s32(s));
            }
        }
        for (int r = 0; r < R; r++) {
            const char* row = (const char*)w + r * ws;
            int8x16_t lo[4], hi[4];
            uint16_t d16[4], m16[4];
            for (int i = 0; i < 4; i++) QN(w32_i8)(dtype, row, b + i * seg, &lo[i], &hi[i], &d16[i], &m16[i]);
            const float32x4_t dw = f16x4_neon(d16[0], d16[1], d16[2], d16[3]);
            const float32x4_t mw = f16x4_neon(m16[0], m16[1], m16[2], m16[3]);
            for (int t = 0; t < T; t++) {
                const block_q8* xt = x + t * xs + b;
                int32x4_t p[4];
                for (int i = 0; i < 4; i++) p[i] = QN(block_dot)(lo[i], hi[i], xt + i * seg);
                const int32x4_t s = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
                acc[r][t] = vfmaq_f32(acc[r][t], vmulq_f32(dw, dx[t]), vcvtq_f32_s32(s));
                if (has_min) acc[r][t] = vfmaq_f32(acc[r][t], vmulq_f32(mw, dx[t]), xsum[t]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const char* row = (const char*)w + r * ws;
        for (int t = 0; t < T; t++) {
            float a[4];
            vst1q_f32(a, acc[r][t]);
            const block_q8* xt = x + t * xs;
            for (int c = QORA_SEGS * seg; c < nb; c++) { /* segment 3's end */
                int8x16_t lo, hi;
                uint16_t d16, m16;
                QN(w32_i8)(dtype, row, c, &lo, &hi, &d16, &m16);
                const float dxc = f16_neon(xt[c].d);
                a[3] = fmaf(f16_neon(d16) * dxc, (float)vaddvq_s32(QN(block_dot)(lo, hi, xt + c)), a[3]);
                if (has_min) a[3] = fmaf(f16_neon(m16) * dxc, (float)QN(xsum32)(xt + c), a[3]);
            }
            out[t * ldo + r] = ((a[0] + a[1]) + a[2]) + a[3];
        }
    }
}

/* ---- K types x Q8_K (kquants.h): per super-block the exact S and M of kdot_ints_scalar, then
   dot_qk_q8k_scalar's fmas ---- */

/* a K super-block's 256 integers in element order as signed bytes (Q6_K: q - 32), q[i] = elements
   16i..16i+15; sc[i]: the scale of q[i]'s elements; mn[j] (Q4_K / Q5_K): sub-block j's minimum */
QN_TARGET QORA_INLINE void QN(kq_unpack)(const int dtype, const char* blk, int8x16_t q[16], int32_t sc[16],
                                         int32_t mn[8]) {
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    if (dtype == QORA_Q6_K) {
        const block_q6_K* b = (const block_q6_K*)blk;
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++)
                for (int half = 0; half < 2; half++) {
                    const uint8x16_t l = vld1q_u8(b->ql + 64 * h + 32 * (i & 1) + 16 * half);
                    const uint8x16_t hb = vld1q_u8(b->qh + 32 * h + 16 * half);
                    const uint8x16_t lo = i < 2 ? vandq_u8(l, m4) : vshrq_n_u8(l, 4);
                    const uint8x16_t hi = vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)(-2 * i))), vdupq_n_u8(3));
                    q[8 * h + 2 * i + half] =
                        vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(hi, 4))), vdupq_n_s8(32));
                }
        for (int i = 0; i < 16; i++) sc[i] = b->scales[i];
        return;
    }
    const block_q4_K* b4 = (const block_q4_K*)blk; /* Q5_K starts the same way */
    const uint8_t* qs = dtype == QORA_Q4_K ? b4->qs : ((const block_q5_K*)blk)->qs;
    for (int k = 0; k < 4; k++)
        for (int half = 0; half < 2; half++) {
            const uint8x16_t raw = vld1q_u8(qs + 32 * k + 16 * half);
            q[4 * k + half] = vreinterpretq_s8_u8(vandq_u8(raw, m4));
            q[4 * k + 2 + half] = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        }
    if (dtype == QORA_Q5_K) {
        const uint8_t* qh = ((const block_q5_K*)blk)->qh;
        const uint8x16_t h0 = vld1q_u8(qh), h1 = vld1q_u8(qh + 16), one = vdupq_n_u8(1);
        for (int j = 0; j < 8; j++) {
            const int8x16_t sh = vdupq_n_s8((int8_t)-j);
            q[2 * j] = vorrq_s8(q[2 * j], vreinterpretq_s8_u8(vshlq_n_u8(vandq_u8(vshlq_u8(h0, sh), one), 4)));
            q[2 * j + 1] = vorrq_s8(q[2 * j + 1], vreinterpretq_s8_u8(vshlq_n_u8(vandq_u8(vshlq_u8(h1, sh), one), 4)));
        }
    }
    for (int j = 0; j < 8; j++) {
        uint8_t s, m;
        qora_kscale(b4->scales, j, &s, &m);
        sc[2 * j] = sc[2 * j + 1] = s;
        mn[j] = m;
    }
}

/* K rows (R <= 4, ws bytes apart) x Q8_K activations (T <= 4, xs bytes apart) */
QN_TARGET QORA_INLINE void QN(qdotk_t)(const int dtype, const int R, const int T, int n, const void* w, size_t ws,
                                       const void* x, size_t xs, float* out, size_t ldo) {
    const int nb = n / QK_K;
    const size_t bb = qora_row_bytes(dtype, QK_K);
    float acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < R; r++) {
            const char* blk = (const char*)w + r * ws + (size_t)b * bb;
            int8x16_t q[16];
            int32_t sc[16], mn[8];
            QN(kq_unpack)(dtype, blk, q, sc, mn);
            for (int t = 0; t < T; t++) {
                const block_q8K* xt = (const block_q8K*)((const char*)x + t * xs) + b;
                int32x4_t sv = vdupq_n_s32(0);
                for (int i = 0; i < 16; i++)
                    sv = vmlaq_n_s32(sv, QN(dot16)(vdupq_n_s32(0), q[i], vld1q_s8(xt->qs + 16 * i)), sc[i]);
                const int32_t S = vaddvq_s32(sv);
                if (dtype == QORA_Q6_K) {
                    acc[r][t] = fmaf(f16_neon(((const block_q6_K*)blk)->d) * xt->d, (float)S, acc[r][t]);
                } else {
                    const block_q4_K* kb = (const block_q4_K*)blk;
                    int32_t M = 0;
                    for (int j = 0; j < 8; j++) M += mn[j] * (xt->bsums[2 * j] + xt->bsums[2 * j + 1]);
                    acc[r][t] = fmaf(f16_neon(kb->d) * xt->d, (float)S, acc[r][t]);
                    acc[r][t] = fmaf(-(f16_neon(kb->dmin) * xt->d), (float)M, acc[r][t]);
                }
            }
        }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ldo + r] = acc[r][t];
}

#define QN_TILE_Q41(R, T, n, w, ws, x, xs, out, ldo) QN(qdot32_t)(QORA_Q4_1, R, T, n, w, ws, x, xs, out, ldo)
#define QN_TILE_Q50(R, T, n, w, ws, x, xs, out, ldo) QN(qdot32_t)(QORA_Q5_0, R, T, n, w, ws, x, xs, out, ldo)
#define QN_TILE_Q51(R, T, n, w, ws, x, xs, out, ldo) QN(qdot32_t)(QORA_Q5_1, R, T, n, w, ws, x, xs, out, ldo)
#define QN_TILE_Q4K(R, T, n, w, ws, x, xs, out, ldo) QN(qdotk_t)(QORA_Q4_K, R, T, n, w, ws, x, xs, out, ldo)
#define QN_TILE_Q5K(R, T, n, w, ws, x, xs, out, ldo) QN(qdotk_t)(QORA_Q5_K, R, T, n, w, ws, x, xs, out, ldo)
#define QN_TILE_Q6K(R, T, n, w, ws, x, xs, out, ldo) QN(qdotk_t)(QORA_Q6_K, R, T, n, w, ws, x, xs, out, ldo)

/* tile_x_scalar's contract (x: Q8_0 rows for Q4_1 / Q5_0 / Q5_1, Q8_K rows for the K types, xs bytes apart) */
QN_TARGET static void QN(tile_x)(int dtype, int n, const void* w, size_t ws, int nr, const void* x, size_t xs, int nt,
                                 float* out, size_t ldo) {
    const block_q8* x8 = (const block_q8*)x;
    const size_t xs8 = xs / sizeof(block_q8);
    switch (dtype) {
    case QORA_Q4_1: QORA_TILE_SWITCH(QN_TILE_Q41, n, w, ws, nr, x8, xs8, nt, out, ldo) break;
    case QORA_Q5_0: QORA_TILE_SWITCH(QN_TILE_Q50, n, w, ws, nr, x8, xs8, nt, out, ldo) break;
    case QORA_Q5_1: QORA_TILE_SWITCH(QN_TILE_Q51, n, w, ws, nr, x8, xs8, nt, out, ldo) break;
    case QORA_Q4_K: QORA_TILE_SWITCH(QN_TILE_Q4K, n, w, ws, nr, x, xs, nt, out, ldo) break;
    case QORA_Q5_K: QORA_TILE_SWITCH(QN_TILE_Q5K, n, w, ws, nr, x, xs, nt, out, ldo) break;
    case QORA_Q6_K: QORA_TILE_SWITCH(QN_TILE_Q6K, n, w, ws, nr, x, xs, nt, out, ldo) break;
    default: tile_x_scalar(dtype, n, w, ws, nr, x, xs, nt, out, ldo); break;
    }
}
#undef QN_TILE_Q41
#undef QN_TILE_Q50
#undef QN_TILE_Q51
#undef QN_TILE_Q4K
#undef QN_TILE_Q5K
#undef QN_TILE_Q6K
