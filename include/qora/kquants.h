/* qora — the GGUF weight types beyond Q4_0 / Q8_0 (Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, BF16), portable
   code: dequantization (gguf-py's operations, so the values are bit for bit gguf.quants.dequantize's),
   the Q8_K activation quantizer of the K types, and the scalar reference of their products (the order
   of float operations is in common.h). */
#ifndef QORA_KQUANTS_H
#define QORA_KQUANTS_H

#include "common.h"

/* ---------------------------------------------------------------- values */

static inline float qora_bf16_to_fp32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* bits 0..31 of a 5-bit block's qh: bit j is bit 4 of element j */
static inline uint32_t qora_qh32(const uint8_t* qh) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

/* the integer of element j (0..31) of a 32-element block, before its scale: Q4_1 and Q5_1 unsigned
   (0..15, 0..31), Q5_0 signed (q - 16) */
static inline int qora_q32_int(int dtype, const void* blk, int j) {
    const int k = j & 15, shift = j < 16 ? 0 : 4;
    switch (dtype) {
    case QORA_Q4_1: return (((const block_q4_1*)blk)->qs[k] >> shift) & 15;
    case QORA_Q5_0: {
        const block_q5_0* b = (const block_q5_0*)blk;
        return (((b->qs[k] >> shift) & 15) | (int)((qora_qh32(b->qh) >> j) & 1) << 4) - 16;
    }
    default: { /* QORA_Q5_1 */
        const block_q5_1* b = (const block_q5_1*)blk;
        return ((b->qs[k] >> shift) & 15) | (int)((qora_qh32(b->qh) >> j) & 1) << 4;
    }
    }
}

/* 4/5/6-bit integer of element e (0..255) of a K super-block, before its scales (Q6_K: q - 32) */
static inline int qora_qk_int(int dtype, const void* blk, int e) {
    if (dtype == QORA_Q6_K) {
        const block_q6_K* b = (const block_q6_K*)blk;
        const int h = e / 128, i = (e % 128) / 32, l = e % 32;
        const int lo = (b->ql[64 * h + l + 32 * (i & 1)] >> (i < 2 ? 0 : 4)) & 15;
        const int hi = (b->qh[32 * h + l] >> (2 * i)) & 3;
        return (lo | hi << 4) - 32;
    }
    const int j = e / 32, l = e % 32; /* sub-block j; Q4_K / Q5_K share the nibble layout */
    const uint8_t* qs = dtype == QORA_Q4_K ? ((const block_q4_K*)blk)->qs : ((const block_q5_K*)blk)->qs;
    const int lo = (qs[32 * (j / 2) + l] >> (j % 2 ? 4 : 0)) & 15;
    if (dtype == QORA_Q4_K) return lo;
    return lo | ((((const block_q5_K*)blk)->qh[l] >> j) & 1) << 4;
}

/* Elements [e0, e0 + count) of a row (both multiples of the type's block) as floats, with gguf-py's
   operations in float: Q4_0 / Q5_0 / Q8_0 d * q; Q4_1 / Q5_1 d * q + m; Q4_K / Q5_K
   (d * sc) * q - dmin * m; Q6_K (d * sc) * q. Nothing may be fused here (setup.py builds with
   -ffp-contract=off): the values must be gguf.quants.dequantize's bit for bit. */
static void qora_dequant_range(int dtype, const void* row, int e0, int count, float* out) {
    const char* r = (const char*)row;
    switch (dtype) {
    case QORA_F32: memcpy(out, (const float*)row + e0, (size_t)count * sizeof(float)); return;
    case QORA_F16:
        for (int i = 0; i < count; i++) out[i] = qora_fp16_to_fp32(((const uint16_t*)row)[e0 + i]);
        return;
    case QORA_BF16:
        for (int i = 0; i < count; i++) out[i] = qora_bf16_to_fp32(((const uint16_t*)row)[e0 + i]);
        return;
    case QORA_Q4:
    case QORA_Q8:
    case QORA_Q4_1:
    case QORA_Q5_0:
    case QORA_Q5_1: {
        const size_t bb = qora_row_bytes(dtype, QK);
        for (int b = 0; b < count / QK; b++) {
            const char* blk = r + (size_t)(e0 / QK + b) * bb;
            const float d = qora_fp16_to_fp32(*(const uint16_t*)blk);
            float* o = out + b * QK;
            if (dtype == QORA_Q4) {
                const block_q4* q = (const block_q4*)blk;
                for (int j = 0; j < QK / 2; j++) {
                    o[j] = d * (float)((q->qs[j] & 15) - 8);
                    o[j + QK / 2] = d * (float)((q->qs[j] >> 4) - 8);
                }
            } else if (dtype == QORA_Q8) {
                for (int j = 0; j < QK; j++) o[j] = (float)((const block_q8*)blk)->qs[j] * d;
            } else if (dtype == QORA_Q5_0) {
                for (int j = 0; j < QK; j++) o[j] = d * (float)qora_q32_int(dtype, blk, j);
            } else {
                const float m = qora_fp16_to_fp32(((const uint16_t*)blk)[1]);
                for (int j = 0; j < QK; j++) o[j] = d * (float)qora_q32_int(dtype, blk, j) + m;
            }
        }
        return;
    }
    default: { /* the K types */
        const size_t bb = qora_row_bytes(dtype, QK_K);
        for (int b = 0; b < count / QK_K; b++) {
            const char* blk = r + (size_t)(e0 / QK_K + b) * bb;
            float* o = out + b * QK_K;
            if (dtype == QORA_Q6_K) {
                const block_q6_K* q = (const block_q6_K*)blk;
                const float d = qora_fp16_to_fp32(q->d);
                for (int e = 0; e < QK_K; e++) o[e] = d * (float)q->scales[e / 16] * (float)qora_qk_int(dtype, blk, e);
                continue;
            }
            const block_q4_K* q = (const block_q4_K*)blk; /* Q5_K starts the same way */
            const float d = qora_fp16_to_fp32(q->d), dmin = qora_fp16_to_fp32(q->dmin);
            for (int j = 0; j < QK_K / 32; j++) {
                uint8_t sc, m;
                qora_kscale(q->scales, j, &sc, &m);
                const float ds = d * (float)sc, dm = dmin * (float)m;
                for (int l = 0; l < 32; l++) o[32 * j + l] = ds * (float)qora_qk_int(dtype, blk, 32 * j + l) - dm;
            }
        }
        return;
    }
    }
}

/* ------------------------------------------------------------ activations */

/* x[n] (n % 256 == 0) -> Q8_K blocks, llama.cpp's quantize_row_q8_K_ref: the value of largest |x|
   (the first on ties) maps to -127, q = round-half-even(x * iscale) capped at 127, d = 1 / iscale;
   bsums[k] = the sum of q[16k..16k+16). One function for every path, so all round alike. */
static void qora_quantize_q8k(const float* x, block_q8K* y, int n) {
    for (int b = 0; b < n / QK_K; b++) {
        const float* xb = x + (size_t)b * QK_K;
        float amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(xb[j]);
            if (ax > amax) {
                amax = ax;
                vmax = xb[j];
            }
        }
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const float iscale = -127.0f / vmax;
        for (int j = 0; j < QK_K; j++) {
            const int v = (int)nearbyintf(iscale * xb[j]);
            y[b].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int k = 0; k < QK_K / 16; k++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += y[b].qs[16 * k + j];
            y[b].bsums[k] = (int16_t)s;
        }
        y[b].d = 1.0f / iscale;
    }
}

/* ------------------------------------------------- scalar products (reference) */

/* Q4_1 / Q5_0 / Q5_1 . Q8_0 in the order of common.h: the segments of the Q4_0 product, and per
   block acc = fma(dw * dx, isum, acc), then for the types with a minimum acc = fma(mw * dx, xsum, acc)
   (xsum: the sum of the activation block's int8). */
static float dot_q32_q8_scalar(int dtype, int n, const void* w, const block_q8* x) {
    const int nb = n / QK, has_min = dtype != QORA_Q5_0;
    const size_t bb = qora_row_bytes(dtype, QK);
    float sum = 0.0f;
    for (int i = 0; i < QORA_SEGS; i++) {
        float acc = 0.0f;
        for (int b = qora_seg_begin(nb, i); b < qora_seg_begin(nb, i + 1); b++) {
            const char* blk = (const char*)w + (size_t)b * bb;
            int32_t isum = 0, xsum = 0;
            for (int j = 0; j < QK; j++) {
                isum += qora_q32_int(dtype, blk, j) * x[b].qs[j];
                xsum += x[b].qs[j];
            }
            const float dx = qora_fp16_to_fp32(x[b].d);
            acc = fmaf(qora_fp16_to_fp32(*(const uint16_t*)blk) * dx, (float)isum, acc);
            if (has_min) acc = fmaf(qora_fp16_to_fp32(((const uint16_t*)blk)[1]) * dx, (float)xsum, acc);
        }
        sum = i == 0 ? acc : sum + acc;
    }
    return sum;
}

/* The exact integer parts of one K super-block against one Q8_K block: *S = sum over sub-blocks of
   scale * (q . x) (Q6_K: q - 32), *M = sum of min * (activation sums) (Q4_K / Q5_K; 0 for Q6_K). */
static inline void kdot_ints_scalar(int dtype, const void* blk, const block_q8K* x, int32_t* S, int32_t* M) {
    int32_t s = 0, m = 0;
    if (dtype == QORA_Q6_K) {
        const block_q6_K* q = (const block_q6_K*)blk;
        for (int j = 0; j < QK_K / 16; j++) {
            int32_t isum = 0;
            for (int l = 0; l < 16; l++) isum += qora_qk_int(dtype, blk, 16 * j + l) * x->qs[16 * j + l];
            s += q->scales[j] * isum;
        }
    } else {
        const block_q4_K* q = (const block_q4_K*)blk;
        for (int j = 0; j < QK_K / 32; j++) {
            uint8_t sc, mn;
            qora_kscale(q->scales, j, &sc, &mn);
            int32_t isum = 0;
            for (int l = 0; l < 32; l++) isum += qora_qk_int(dtype, blk, 32 * j + l) * x->qs[32 * j + l];
            s += sc * isum;
            m += mn * (x->bsums[2 * j] + x->bsums[2 * j + 1]);
        }
    }
    *S = s;
    *M = m;
}

/* K type . Q8_K in the order of common.h: one chain over the super-blocks from +0,
   acc = fma(d * dx, S, acc), then (Q4_K, Q5_K) acc = fma(-(dmin * dx), M, acc). */
static float dot_qk_q8k_scalar(int dtype, int n, const void* w, const block_q8K* x) {
    const size_t bb = qora_row_bytes(dtype, QK_K);
    float acc = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        const char* blk = (const char*)w + (size_t)b * bb;
        int32_t S, M;
        kdot_ints_scalar(dtype, blk, x + b, &S, &M);
        if (dtype == QORA_Q6_K) {
            acc = fmaf(qora_fp16_to_fp32(((const block_q6_K*)blk)->d) * x[b].d, (float)S, acc);
        } else {
            const block_q4_K* q = (const block_q4_K*)blk;
            acc = fmaf(qora_fp16_to_fp32(q->d) * x[b].d, (float)S, acc);
            acc = fmaf(-(qora_fp16_to_fp32(q->dmin) * x[b].d), (float)M, acc);
        }
    }
    return acc;
}

/* bf16 . f32: the float dot of common.h */
#define QORA_BF16_AT(i) qora_bf16_to_fp32(w[i])
static float dot_bf16_f32_scalar(int n, const uint16_t* w, const float* x) { QORA_FLOAT_DOT_SCALAR(QORA_BF16_AT) }

/* a whole row dequantized (the kernel tables' deq_f32 where no vector version exists) */
static void deq_f32_generic(int dtype, int n, const void* w, float* out) { qora_dequant_range(dtype, w, 0, n, out); }

/* Any block type . float activations (no activation rounding): the weights dequantized 256 at a time
   (qora_dequant_range's values), then the float dot of common.h over the whole row: 32 chains by index
   mod 32, lane j + lane j+16, qora_reduce16 (rows are whole blocks: no tail). */
#define QORA_DEQ_CHUNK 256
static float dot_deq_f32_scalar(int dtype, int n, const void* w, const float* x) {
    float acc[32] = {0}, buf[QORA_DEQ_CHUNK];
    for (int i = 0; i < n; i += QORA_DEQ_CHUNK) {
        const int len = n - i < QORA_DEQ_CHUNK ? n - i : QORA_DEQ_CHUNK;
        qora_dequant_range(dtype, w, i, len, buf);
        for (int k = 0; k < len; k++) acc[k % 32] = fmaf(buf[k], x[i + k], acc[k % 32]);
    }
    float c[16];
    for (int j = 0; j < 16; j++) c[j] = acc[j] + acc[j + 16];
    return qora_reduce16(c);
}

/* rows x activations for the types of this file (the tile contract of tiles.h; x: block_q8 rows for
   Q4_1 / Q5_0 / Q5_1, block_q8K rows for the K types, xs bytes apart) */
static void tile_x_scalar(int dtype, int n, const void* w, size_t ws, int nr, const void* x, size_t xs, int nt,
                          float* out, size_t ldo) {
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            const char* row = (const char*)w + r * ws;
            const char* xt = (const char*)x + t * xs;
            out[t * ldo + r] = qora_block_elems(dtype) == QK_K
                                   ? dot_qk_q8k_scalar(dtype, n, row, (const block_q8K*)xt)
                                   : dot_q32_q8_scalar(dtype, n, row, (const block_q8*)xt);
        }
}

#endif /* QORA_KQUANTS_H */
