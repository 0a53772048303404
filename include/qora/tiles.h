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
/* qdot_avx2_t (kernels_avx2.h): a Q4/Q8 row is unpacked once per block and serves all T activations. */
#define QORA_TILE_Q4_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdot_avx2_t(1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q8_AVX2(R, T, n, w, ws, x, xs, out, ldo) qdot_avx2_t(0, R, T, n, w, ws, x, xs, out, ldo)

QORA_TARGET_AVX2 static void tile_q4_avx2(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs,
                                          int nt, float* out, size_t ldo) {
    QORA_TILE_SWITCH(QORA_TILE_Q4_AVX2, n, w, ws, nr, x, xs, nt, out, ldo)
}

QORA_TARGET_AVX2 static void tile_q8_avx2(int n, const void* w, size_t ws, int nr, const block_q8* x, size_t xs,
                                          int nt, float* out, size_t ldo) {
    QORA_TILE_SWITCH(QORA_TILE_Q8_AVX2, n, w, ws, nr, x, xs, nt, out, ldo)
}

/* ------------------------------------------------------------------ AVX-512 */
/* qdot_avx512_t (kernels_avx512.h): the same order, two segments' blocks per 512-bit vpdpbusd. */
#define QORA_TILE_Q4_AVX512(R, T, n, w, ws, x, xs, out, ldo) qdot_avx512_t(1, R, T, n, w, ws, x, xs, out, ldo)
#define QORA_TILE_Q8_AVX512(R, T, n, w, ws, x, xs, out, ldo) qdot_avx512_t(0, R, T, n, w, ws, x, xs, out, ldo)

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
