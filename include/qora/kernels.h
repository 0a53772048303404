/* qora — the kernel table (one per ISA), run-time dispatch, and the
   OpenMP-parallel matrix drivers built on the table. */
#ifndef QORA_KERNELS_H
#define QORA_KERNELS_H

#include "common.h"
#include "cpu_features.h"
#include "kernels_scalar.h"
#include "kernels_avx2.h"
#include "kernels_avx512.h"
#include "tiles.h"
#include "kquants.h"
#include "kquants_avx2.h"
#include "repack.h"
#include "kquants_repack.h"
#include "amx.h"
#include "attention_avx2.h"
#include "attention_avx512.h"
#include "kernels_neon.h"

#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const char* name;
    int isa;
    void (*quantize_q8)(const float* x, block_q8* y, int n);
    float (*dot_q4_q8)(int n, const block_q4* w, const block_q8* x);
    float (*dot_q8_q8)(int n, const block_q8* w, const block_q8* x);
    float (*dot_f16_f32)(int n, const uint16_t* w, const float* x);
    float (*dot_f32)(int n, const float* a, const float* b);
    void (*rmsnorm)(float* out, const float* x, const float* w, int n, float eps);
    void (*axpy)(int n, float a, const float* x, float* y);
    void (*axpy_f16)(int n, float a, const uint16_t* x, float* y);
    void (*to_f16)(const float* x, uint16_t* y, int n);
    qora_tile_fn tile_q4; /* up to 4 rows x 4 activations, see tiles.h */
    qora_tile_fn tile_q8;
    qora_q4x8_fn q4x8;    /* 8 interleaved rows x up to q4x8_max_t activations, see repack.h */
    int q4x8_max_t;
    qora_q4x16_fn q4x16;  /* two 8-row groups at once (512-bit vectors); NULL where vectors are narrower */
    int q4x16_max_t;
    /* one attention chunk of ng consecutive KV groups' query heads, nh per group, over an f16 cache
       (qora_attend_chunk's contract, forward.h); returns 0 where it has no plan */
    int (*attend_f16)(const float* q, const uint16_t* kc, const uint16_t* vc, int n_pos, int nh, int ng,
                      int head_dim, size_t kv_stride, float* scores, size_t score_stride, float* acc, float* mx,
                      float* sum, float scale);
    /* the same over a Q8_0 cache (rows of kv_stride / 32 blocks; head_dim % 32 == 0) */
    int (*attend_q8)(const float* q, const block_q8* kc, const block_q8* vc, int n_pos, int nh, int ng,
                     int head_dim, size_t kv_stride, float* scores, size_t score_stride, float* acc, float* mx,
                     float* sum, float scale);
    /* sc[0..n) = e^(sc - max), *max_out = max, returns the sum (softmax_unnorm_scalar's order, see common.h) */
    float (*softmax_unnorm)(float* sc, int n, float* max_out);
    /* the types of kquants.h: Q4_1 / Q5_0 / Q5_1 x Q8_0 and K types x Q8_K tiles (tile_x_scalar's contract),
       the float dot of a bf16 row, and any block type against float activations */
    void (*tile_x)(int dtype, int n, const void* w, size_t ws, int nr, const void* x, size_t xs, int nt, float* out,
                   size_t ldo);
    float (*dot_bf16_f32)(int n, const uint16_t* w, const float* x);
    float (*dot_deq_f32)(int dtype, int n, const void* w, const float* x);
    /* a row of any block type dequantized: qora_dequant_range's values (the float tiles' unpacking) */
    void (*deq_f32)(int dtype, int n, const void* w, float* out);
    /* out[t * ldo] = dot_f32(n, w, X + t * ldx) for t < nt, the same bits; NULL: dot_f32 one at a time */
    void (*dots_f32)(int n, const float* w, const float* X, size_t ldx, int nt, float* out, size_t ldo);
    /* out[r] = dot_deq_f32(dtype, n, w + r * ws, x) for r < nr <= 4, the same bits; returns 0 for a type it
       does not take (then dot_deq_f32 row by row); NULL: none */
    int (*rows_deq_f32)(int dtype, int n, const void* w, size_t ws, int nr, const float* x, float* out);
    /* out[t * ldo + r] = dot_f32(n, w + r * ldw, X + t * ldx) for r < nr <= 4, t < nt, the same bits
       (several rows together: fewer loads per fma); NULL: dots_f32 row by row */
    void (*dots_rows_f32)(int n, int nr, const float* w, size_t ldw, const float* X, size_t ldx, int nt, float* out,
                          size_t ldo);
} qora_kernels;

static const qora_kernels qora_kernels_scalar = {
    "scalar", QORA_ISA_SCALAR, quantize_q8_scalar, dot_q4_q8_scalar, dot_q8_q8_scalar,
    dot_f16_f32_scalar, dot_f32_scalar, rmsnorm_scalar, axpy_scalar, axpy_f16_scalar, to_f16_scalar, tile_q4_scalar, tile_q8_scalar,
    q4x8_scalar, 4, NULL, 0, NULL, NULL, softmax_unnorm_scalar, tile_x_scalar, dot_bf16_f32_scalar, dot_deq_f32_scalar, deq_f32_generic,
};

#if QORA_X86
static const qora_kernels qora_kernels_avx2 = {
    "avx2", QORA_ISA_AVX2, quantize_q8_avx2, dot_q4_q8_avx2, dot_q8_q8_avx2,
    dot_f16_f32_avx2, dot_f32_avx2, rmsnorm_avx2, axpy_avx2, axpy_f16_avx2, to_f16_avx2, tile_q4_avx2, tile_q8_avx2,
    q4x8_avx2, 4, NULL, 0, attend_f16_avx2, attend_q8_avx2, softmax_unnorm_avx2, tile_x_avx2, dot_bf16_f32_avx2, dot_deq_f32_avx2, deq_f32_avx2,
    dots_f32_avx2,
};
#if QORA_HAVE_AVXVNNI
static const qora_kernels qora_kernels_avx2vnni = {
    "avx2vnni", QORA_ISA_AVX2VNNI, quantize_q8_avx2, dot_q4_q8_avx2, dot_q8_q8_avx2,
    dot_f16_f32_avx2, dot_f32_avx2, rmsnorm_avx2, axpy_avx2, axpy_f16_avx2, to_f16_avx2, tile_q4_avx2, tile_q8_avx2,
    q4x8_avxvnni, 4, NULL, 0, attend_f16_avx2, attend_q8_avx2, softmax_unnorm_avx2, tile_x_avx2, dot_bf16_f32_avx2, dot_deq_f32_avx2, deq_f32_avx2,
    dots_f32_avx2,
};
#endif
/* quantize_q8 stays AVX2: it is a small share of the work and its rounding then
   matches the AVX2 path bit for bit */
static const qora_kernels qora_kernels_avx512 = {
    "avx512", QORA_ISA_AVX512, quantize_q8_avx2, dot_q4_q8_avx512, dot_q8_q8_avx512,
    dot_f16_f32_avx512, dot_f32_avx512, rmsnorm_avx512, axpy_avx512, axpy_f16_avx2, to_f16_avx2, tile_q4_avx512, tile_q8_avx512,
    q4x8_avx512, 8, q4x16_avx512, 16, attend_f16_avx512, attend_q8_avx512, softmax_unnorm_avx512, tile_x_avx2, dot_bf16_f32_avx2,
    dot_deq_f32_avx512, deq_f32_avx512, dots_f32_avx512, rows_deq_f32_avx512, dots_rows_f32_avx512,
};
#endif

#if QORA_NEON
/* aarch64: quantize_q8, the float kernels and attention over the f16 / Q8_0 cache are NEON in all three
   tables (they need nothing more); the integer products are the NEON or sdot instances of
   kernels_neon_int.h. */
static const qora_kernels qora_kernels_neon = {
    "neon", QORA_ISA_NEON, quantize_q8_neon, dot_q4_q8_neon, dot_q8_q8_neon,
    dot_f16_f32_neon, dot_f32_neon, rmsnorm_neon, axpy_neon, axpy_f16_neon, to_f16_neon, tile_q4_neon, tile_q8_neon,
    q4x8_neon, 4, NULL, 0, attend_f16_neon, attend_q8_neon, softmax_unnorm_neon, tile_x_neon, dot_bf16_f32_neon, dot_deq_f32_neon, deq_f32_generic,
};
#if QORA_NEON_DOTPROD
static const qora_kernels qora_kernels_dotprod = {
    "dotprod", QORA_ISA_DOTPROD, quantize_q8_neon, dot_q4_q8_dotprod, dot_q8_q8_dotprod,
    dot_f16_f32_neon, dot_f32_neon, rmsnorm_neon, axpy_neon, axpy_f16_neon, to_f16_neon, tile_q4_dotprod,
    tile_q8_dotprod, q4x8_dotprod, 4, NULL, 0, attend_f16_neon, attend_q8_neon, softmax_unnorm_neon, tile_x_dotprod, dot_bf16_f32_neon,
    dot_deq_f32_neon, deq_f32_generic,
};
#endif
#if QORA_NEON_I8MM
/* i8mm: the dotprod table with smmla prefill tiles (2 rows x 2 tokens) for interleaved Q4 rows (q4x8_i8mm),
   Q4_0 / Q8_0 rows in the file's layout (tile_q4_i8mm, tile_q8_i8mm) and the K types (tile_x_i8mm) */
static const qora_kernels qora_kernels_i8mm = {
    "i8mm", QORA_ISA_I8MM, quantize_q8_neon, dot_q4_q8_dotprod, dot_q8_q8_dotprod,
    dot_f16_f32_neon, dot_f32_neon, rmsnorm_neon, axpy_neon, axpy_f16_neon, to_f16_neon, tile_q4_i8mm,
    tile_q8_i8mm, q4x8_i8mm, 4, NULL, 0, attend_f16_neon, attend_q8_neon, softmax_unnorm_neon, tile_x_i8mm, dot_bf16_f32_neon,
    dot_deq_f32_neon, deq_f32_generic,
};
#endif
#endif /* QORA_NEON */

/* Table per ISA slot; NULL = not compiled in for this architecture. */
static const qora_kernels* qora_kernel_table(int isa) {
    switch (isa) {
#if QORA_X86
    case QORA_ISA_AVX512: return &qora_kernels_avx512;
    case QORA_ISA_AVX2: return &qora_kernels_avx2;
#if QORA_HAVE_AVXVNNI
    case QORA_ISA_AVX2VNNI: return &qora_kernels_avx2vnni;
#endif
#endif
#if QORA_NEON
    case QORA_ISA_NEON: return &qora_kernels_neon;
#if QORA_NEON_DOTPROD
    case QORA_ISA_DOTPROD: return &qora_kernels_dotprod;
#endif
#if QORA_NEON_I8MM
    case QORA_ISA_I8MM: return &qora_kernels_i8mm;
#endif
#endif
    case QORA_ISA_SCALAR: return &qora_kernels_scalar;
    default: return NULL;
    }
}

/* ---- a weight matrix as the engine sees it: rows x cols of one dtype ---- */
typedef struct {
    int32_t dtype;
    int32_t rows, cols;
    size_t row_bytes;
    const void* data; /* rows * row_bytes bytes, usually inside the mmap */
    const block_q4x8* packed; /* Q4 only, optional: rows / 8 groups x cols / 32 blocks, interleaved at load */
    const void* kpacked; /* Q8_0 / K types, optional: the x8 layout of kquants_repack.h (groups of 8 rows) */
} qora_tensor;

static inline int qora_is_quantized(int dtype) { return qora_block_elems(dtype) > 1; }

/* The activation formats a weight type's integer product reads (its partner, as in llama.cpp): Q8_0
   blocks for the 32-element types, Q8_K for the K types, none for float weights. */
enum { QORA_ACT_Q8 = 1, QORA_ACT_Q8K = 2 };
static inline int qora_act_needs(int dtype) {
    const int e = qora_block_elems(dtype);
    return e == QK ? QORA_ACT_Q8 : e == QK_K ? QORA_ACT_Q8K : 0;
}

/* An activation row of the quantized inputs (XQ, ldxq blocks of block_q8 per row) holds its Q8_0 blocks
   from the start and its Q8_K blocks from qora_q8k_at: after the Q8_0 blocks of a `cols`-wide row,
   4-byte aligned (ldxq is even, so every row starts 4-byte aligned). */
static inline const block_q8K* qora_q8k_at(const block_q8* row, int cols) {
    return (const block_q8K*)((const char*)row + (((size_t)(cols / QK) * sizeof(block_q8) + 3) & ~(size_t)3));
}

/* ldxq for activations up to `widest` columns: room for both formats, even */
static inline size_t qora_xq_stride(int widest) {
    const size_t bytes = (size_t)(widest / QK) * sizeof(block_q8) + 4 + (size_t)(widest / QK_K) * sizeof(block_q8K);
    const size_t blocks = (bytes + sizeof(block_q8) - 1) / sizeof(block_q8) + 1;
    return blocks + (blocks & 1);
}

/* Dot product of row r of W with one activation: x as floats, xq its quantized row (qora_q8k_at), or
   NULL for float activations (every type's weights dequantized, no activation rounding). */
static inline float qora_row_dot(const qora_kernels* K, const qora_tensor* W, int r, const float* x,
                                 const block_q8* xq) {
    const char* row = (const char*)W->data + (size_t)r * W->row_bytes;
    if (qora_is_quantized(W->dtype) && !xq) return K->dot_deq_f32(W->dtype, W->cols, row, x);
    switch (W->dtype) {
    case QORA_Q4: return K->dot_q4_q8(W->cols, (const block_q4*)row, xq);
    case QORA_Q8: return K->dot_q8_q8(W->cols, (const block_q8*)row, xq);
    case QORA_F16: return K->dot_f16_f32(W->cols, (const uint16_t*)row, x);
    case QORA_BF16: return K->dot_bf16_f32(W->cols, (const uint16_t*)row, x);
    case QORA_F32: return K->dot_f32(W->cols, (const float*)row, x);
    default: {
        float out;
        const void* xa = qora_act_needs(W->dtype) == QORA_ACT_Q8K ? (const void*)qora_q8k_at(xq, W->cols) : xq;
        K->tile_x(W->dtype, W->cols, row, 0, 1, xa, 0, 1, &out, 1);
        return out;
    }
    }
}

/* Below this many multiply-adds a product runs on one thread: waking the team
   costs more than it saves, and on a busy machine a descheduled worker would
   stall the whole barrier. */
#define QORA_PARALLEL_MIN_WORK (1 << 18)

/* Q8_K activations (qora_quantize_q8k's bytes) on an ISA path: AVX-512 has its own loop */
static inline void qora_quantize_q8k_isa(int isa, const float* x, block_q8K* y, int n) {
#if QORA_X86
    if (isa == QORA_ISA_AVX512) {
        qora_quantize_q8k_avx512(x, y, n);
        return;
    }
#endif
    (void)isa;
    qora_quantize_q8k(x, y, n);
}

/* Quantize n activation rows (X: n x ldx floats) into the formats `needs` names (qora_act_needs of the
   matrices that will read them; XQ: n x ldxq blocks, see qora_q8k_at), once per matrix input, and only
   when an integer product will read them. */
static inline void qora_prepare_acts(const qora_kernels* K, int needs, const float* X, size_t ldx, block_q8* XQ,
                                     qora_xblock* XS, size_t ldxq, int n, int cols, int n_threads) {
    if (!needs || !XQ) return;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n >= 4)
#endif
    for (int t = 0; t < n; t++) {
        block_q8* xq = XQ + t * ldxq;
        if (needs & QORA_ACT_Q8K) qora_quantize_q8k_isa(K->isa, X + t * ldx, (block_q8K*)qora_q8k_at(xq, cols), cols);
        if (!(needs & QORA_ACT_Q8)) continue;
        K->quantize_q8(X + t * ldx, xq, cols);
        for (int b = 0; b < cols / QK; b++) {
            int32_t sum = 0;
            for (int i = 0; i < QK; i++) sum += xq[b].qs[i];
            XS[t * ldxq + b].off = -8 * sum;
            XS[t * ldxq + b].d = qora_fp16_to_fp32(xq[b].d);
        }
    }
    (void)n_threads;
}

/* the inputs of one matrix of type dtype */
static inline void qora_prepare_inputs(const qora_kernels* K, int dtype, const float* X, size_t ldx, block_q8* XQ,
                                       qora_xblock* XS, size_t ldxq, int n, int cols, int n_threads) {
    qora_prepare_acts(K, qora_act_needs(dtype), X, ldx, XQ, XS, ldxq, n, cols, n_threads);
}

/* Rows r0..r0+nr-1 (nr <= 4) against tokens t0..t0+nt-1 (nt <= 4):
   out[t * ldo + r] for the local r, t. */
static inline void qora_tile(const qora_kernels* K, const qora_tensor* W, int r0, int nr, const float* X, size_t ldx,
                             const block_q8* XQ, size_t ldxq, int t0, int nt, float* out, size_t ldo) {
    const char* w = (const char*)W->data + (size_t)r0 * W->row_bytes;
    const int needs = XQ ? qora_act_needs(W->dtype) : 0;
    if (W->dtype == QORA_Q4 && needs) {
        K->tile_q4(W->cols, w, W->row_bytes, nr, XQ + (size_t)t0 * ldxq, ldxq, nt, out, ldo);
    } else if (W->dtype == QORA_Q8 && needs) {
        K->tile_q8(W->cols, w, W->row_bytes, nr, XQ + (size_t)t0 * ldxq, ldxq, nt, out, ldo);
    } else if (needs) {
        const block_q8* xq = XQ + (size_t)t0 * ldxq;
        const void* xa = needs == QORA_ACT_Q8K ? (const void*)qora_q8k_at(xq, W->cols) : xq;
        K->tile_x(W->dtype, W->cols, w, W->row_bytes, nr, xa, ldxq * sizeof(block_q8), nt, out, ldo);
    } else { /* float weights, or float activations (XQ == NULL) */
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < nt; t++)
                out[t * ldo + r] = qora_row_dot(K, W, r0 + r, X + (size_t)(t0 + t) * ldx, NULL);
    }
}

/* Float activations against quantized rows, several tokens at once: each row dequantized once
   (qora_dequant_range's values) and then dotted with every token by the float dot of common.h.
   dot_deq_f32 is that same dot over those same values, so the bits are the single-token path's,
   while the unpacking (most of the work) is paid once per row instead of once per token. Rows wider
   than the stack buffer return 0 (the caller dots token by token). */
#define QORA_DEQ_ROW_MAX 16384
static inline int qora_tile_deq(const qora_kernels* K, const qora_tensor* W, int r0, int nr, const float* X, size_t ldx,
                                int nt, float* out, size_t ldo) {
    if (W->cols > QORA_DEQ_ROW_MAX) return 0;
    float buf[QORA_DEQ_ROW_MAX] __attribute__((aligned(64)));
    if (K->dots_rows_f32 && nr > 1 && (size_t)nr * W->cols <= QORA_DEQ_ROW_MAX) { /* the unit's rows at once */
        for (int r = 0; r < nr; r++)
            K->deq_f32(W->dtype, W->cols, (const char*)W->data + (size_t)(r0 + r) * W->row_bytes, buf + (size_t)r * W->cols);
        K->dots_rows_f32(W->cols, nr, buf, W->cols, X, ldx, nt, out, ldo);
        return 1;
    }
    for (int r = 0; r < nr; r++) {
        K->deq_f32(W->dtype, W->cols, (const char*)W->data + (size_t)(r0 + r) * W->row_bytes, buf);
        if (K->dots_f32)
            K->dots_f32(W->cols, buf, X, ldx, nt, out + r, ldo);
        else
            for (int t = 0; t < nt; t++) out[t * ldo + r] = K->dot_f32(W->cols, buf, X + (size_t)t * ldx);
    }
    return 1;
}

/* Units [u] of W: pairs of 8-row groups first (where the ISA has a 16-row kernel), then single
   groups, then the remaining rows by 4. */
static inline int qora_unit_pairs(const qora_kernels* K, const qora_tensor* W) {
    return W->packed && K->q4x16 ? W->rows / 16 : 0;
}

static inline int qora_units(const qora_kernels* K, const qora_tensor* W) {
    if (W->kpacked) return W->rows / 8 + (W->rows % 8 + 3) / 4; /* x8 groups, then the rest by 4 */
    if (!W->packed) return (W->rows + 3) / 4;
    const int pairs = qora_unit_pairs(K, W), groups = W->rows / 8, tail = W->rows % 8;
    return pairs + (groups - 2 * pairs) + (tail + 3) / 4;
}

/* Tokens a unit takes at once: interleaved rows meet up to q4x8_max_t (q4x16_max_t) activations;
   quantized rows against float activations (XQ == NULL) 16, each row dequantized once (qora_tile_deq). */
static inline int qora_unit_tokens(const qora_kernels* K, const qora_tensor* W, int u, const block_q8* XQ) {
    if (W->kpacked) return qora_kx8_max_t(K->isa, W->dtype);
    if (!W->packed) return !XQ && qora_is_quantized(W->dtype) ? 16 : 4;
    return u < qora_unit_pairs(K, W) ? K->q4x16_max_t : K->q4x8_max_t;
}

/* qora_unit for a matrix with an x8 copy (kquants_repack.h): group u, or the rows past the groups by 4 */
static inline int qora_kx8_unit(const qora_kernels* K, const qora_tensor* W, int u, const float* X, size_t ldx,
                                const block_q8* XQ, const qora_xblock* XS, size_t ldxq, int t0, int nt, float* out,
                                size_t ldo, int* nr_out) {
    const int groups = W->rows / 8;
    if (u < groups && (nt == 1 || qora_kx8_prefill(K->isa, W->dtype))) {
        const int e = qora_block_elems(W->dtype);
        const block_q8* xq = XQ + (size_t)t0 * ldxq;
        const void* xa = e == QK_K ? (const void*)qora_q8k_at(xq, W->cols) : xq;
        qora_kx8_kernel(K->isa)(W->dtype, W->cols,
                                (const char*)W->kpacked + (size_t)u * (W->cols / e) * qora_kx8_block_bytes(W->dtype), xa,
                                e == QK_K ? NULL : XS + (size_t)t0 * ldxq, ldxq * sizeof(block_q8), nt, out, ldo);
        *nr_out = 8;
        return u * 8;
    }
    /* the rows past the groups, or a group's prefill in the file's layout (the same bits) */
    const int r0 = u < groups ? u * 8 : groups * 8 + (u - groups) * 4;
    const int nr = u < groups ? 8 : (W->rows - r0 < 4 ? W->rows - r0 : 4);
    for (int r = 0; r < nr; r += 4)
        for (int t = 0; t < nt; t += 4)
            qora_tile(K, W, r0 + r, nr - r < 4 ? nr - r : 4, X, ldx, XQ, ldxq, t0 + t, nt - t < 4 ? nt - t : 4,
                      out + (size_t)t * ldo + r, ldo);
    *nr_out = nr;
    return r0;
}

/* Unit u against tokens t0..t0+nt-1 (nt <= qora_unit_tokens): out[t * ldo + local row], up to 16
   local rows; returns the first row and its row count in *nr_out. */
static inline int qora_unit(const qora_kernels* K, const qora_tensor* W, int u, const float* X, size_t ldx,
                            const block_q8* XQ, const qora_xblock* XS, size_t ldxq, int t0, int nt, float* out, size_t ldo,
                            int* nr_out) {
    if (W->kpacked) return qora_kx8_unit(K, W, u, X, ldx, XQ, XS, ldxq, t0, nt, out, ldo, nr_out);
    const int pairs = qora_unit_pairs(K, W);
    if (W->packed && u < pairs) {
        const size_t nb = (size_t)(W->cols / QK);
        const block_q4x8* g = W->packed + (size_t)(2 * u) * nb;
#if QORA_ARM64
        const qora_q4x16_amx_fn amx = NULL; /* no q4x16 kernels on aarch64: not reached */
#else
        const qora_q4x16_amx_fn amx = nt == 16 && K->isa == QORA_ISA_AVX512 ? qora_amx_kernel() : NULL;
#endif
        if (amx) { /* one tile pass per segment of common.h, like the other prefill kernels */
            const block_q8* xq = XQ + (size_t)t0 * ldxq;
            const qora_xblock* xs = XS + (size_t)t0 * ldxq;
            QORA_SEGMENT_PASSES((int)nb, 16, 16, out, ldo,
                                amx(nbs * QK, g + b0, g + nb + b0, xq + b0, xs + b0, ldxq, dst, lddst));
            *nr_out = 16;
            return u * 16;
        }
        K->q4x16(W->cols, g, g + nb, XQ + (size_t)t0 * ldxq, XS + (size_t)t0 * ldxq, ldxq, nt, out, ldo);
        *nr_out = 16;
        return u * 16;
    }
    const int group = 2 * pairs + (u - pairs); /* the single groups follow the pairs */
    if (W->packed && group < W->rows / 8) {
        const int nb = W->cols / QK;
        K->q4x8(W->cols, W->packed + (size_t)group * nb, XQ + (size_t)t0 * ldxq, XS + (size_t)t0 * ldxq, ldxq, nt, out,
                ldo);
        *nr_out = 8;
        return group * 8;
    }
    const int base = W->packed ? (W->rows / 8) * 8 : 0, first = W->packed ? pairs + (W->rows / 8 - 2 * pairs) : 0;
    const int r0 = base + (u - first) * 4, nr = W->rows - r0 < 4 ? W->rows - r0 : 4;
    *nr_out = nr;
    if (!XQ && nt > 1 && qora_is_quantized(W->dtype) && qora_tile_deq(K, W, r0, nr, X + (size_t)t0 * ldx, ldx, nt, out, ldo))
        return r0;
    if (!XQ && nt == 1 && K->rows_deq_f32 && qora_is_quantized(W->dtype) &&
        K->rows_deq_f32(W->dtype, W->cols, (const char*)W->data + (size_t)r0 * W->row_bytes, W->row_bytes, nr,
                        X + (size_t)t0 * ldx, out))
        return r0;
    for (int t = 0; t < nt; t += 4)
        qora_tile(K, W, r0, nr, X, ldx, XQ, ldxq, t0 + t, nt - t < 4 ? nt - t : 4, out + (size_t)t * ldo, ldo);
    return r0;
}

/* W as the products read it: with float activations (XQ == NULL) the interleaved Q4 copy (an integer
   kernel's layout) is not used. */
static inline const qora_tensor* qora_as_read(const qora_tensor* W, const block_q8* XQ, qora_tensor* tmp) {
    if (XQ || (!W->packed && !W->kpacked)) return W;
    *tmp = *W;
    tmp->packed = NULL;
    tmp->kpacked = NULL;
    return tmp;
}

/* Y[t][r] = W[r] . X[t] for n tokens (Y: n x ldy). Units of rows are split
   evenly over the threads; each unit meets the tokens 4 at a time while it is
   hot in L1, so a weight byte comes from memory once per call, not per token.
   XQ == NULL: float activations (no rounding; see qora_row_dot). */
static void qora_matmul(const qora_kernels* K, const qora_tensor* W_in, const float* X, size_t ldx, const block_q8* XQ,
                        const qora_xblock* XS, size_t ldxq, int n, float* Y, size_t ldy, int n_threads) {
    qora_tensor tmp;
    const qora_tensor* W = qora_as_read(W_in, XQ, &tmp);
    const int units = qora_units(K, W);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if ((long long)n * W->rows * W->cols >= QORA_PARALLEL_MIN_WORK)
#endif
    for (int u = 0; u < units; u++) {
        const int step = qora_unit_tokens(K, W, u, XQ);
        for (int t0 = 0; t0 < n; t0 += step) {
            const int nt = n - t0 < step ? n - t0 : step;
            float tmp[16 * 16]; /* [t][local row] */
            int nr;
            const int r0 = qora_unit(K, W, u, X, ldx, XQ, XS, ldxq, t0, nt, tmp, 16, &nr);
            for (int t = 0; t < nt; t++) memcpy(Y + (size_t)(t0 + t) * ldy + r0, tmp + t * 16, (size_t)nr * sizeof(float));
        }
    }
    (void)n_threads;
}

/* H[t][j] = silu(Wg[j] . X[t]) * (Wu[j] . X[t]): gate and up rows are taken
   together, unit by unit, so both are read in one pass. */
static void qora_swiglu(const qora_kernels* K, const qora_tensor* Wg_in, const qora_tensor* Wu_in, const float* X,
                        size_t ldx, const block_q8* XQ, const qora_xblock* XS, size_t ldxq, int n, float* H, size_t ldh,
                        int n_threads) {
    qora_tensor tmp_g, tmp_u;
    const qora_tensor *Wg = qora_as_read(Wg_in, XQ, &tmp_g), *Wu = qora_as_read(Wu_in, XQ, &tmp_u);
    const int units = qora_units(K, Wg);
    const int same_layout = (Wg->packed != NULL) == (Wu->packed != NULL) && (Wg->kpacked != NULL) == (Wu->kpacked != NULL);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if ((long long)n * Wg->rows * Wg->cols >= QORA_PARALLEL_MIN_WORK)
#endif
    for (int u = 0; u < units; u++) {
        const int sg = qora_unit_tokens(K, Wg, u, XQ), su = qora_unit_tokens(K, Wu, u, XQ);
        const int step = !same_layout ? 4 : sg < su ? sg : su; /* gate and up may differ in type */
        for (int t0 = 0; t0 < n; t0 += step) {
            const int nt = n - t0 < step ? n - t0 : step;
            float gate[16 * 16], up[16 * 16]; /* [t][local row] */
            int nr, nr2;
            const int r0 = qora_unit(K, Wg, u, X, ldx, XQ, XS, ldxq, t0, nt, gate, 16, &nr);
            if (same_layout) {
                qora_unit(K, Wu, u, X, ldx, XQ, XS, ldxq, t0, nt, up, 16, &nr2);
            } else { /* mixed layouts (one matrix not repacked): row by row for this unit */
                for (int r = 0; r < nr; r++)
                    for (int t = 0; t < nt; t++)
                        up[t * 16 + r] = qora_row_dot(K, Wu, r0 + r, X + (size_t)(t0 + t) * ldx,
                                                     XQ ? XQ + (size_t)(t0 + t) * ldxq : NULL);
            }
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < nr; r++) {
                    const float gv = gate[t * 16 + r];
                    H[(size_t)(t0 + t) * ldh + r0 + r] = gv / (1.0f + expf(-gv)) * up[t * 16 + r];
                }
        }
    }
    (void)n_threads;
}

/* Dequantize row r of W into out[cols] (embedding lookup): gguf.quants.dequantize's values. */
static void qora_dequant_row(const qora_tensor* W, int r, float* out) {
    qora_dequant_range(W->dtype, (const char*)W->data + (size_t)r * W->row_bytes, 0, W->cols, out);
}

#endif /* QORA_KERNELS_H */
