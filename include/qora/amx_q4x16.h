/* qora — body of the AMX Q4 kernel, included twice by amx.h (no include guard on purpose):
   once with the hardware tile instructions, once with their software model, so the
   tile layout and the scaling are tested on every machine and run for real where
   AMX exists. Expects QORA_AMX_FN, QORA_AMX_TARGET and the tile macros
   T_CFG(cfg), T_ZERO(t), T_LOAD(t, p, stride), T_DP(c, a, b), T_STORE(t, p, stride), T_RELEASE(),
   and undefines them all at the end for the next inclusion. */

/* 16 interleaved Q4 rows (two 8-row groups) x 16 tokens. Per block of 32: B tile =
   weights as signed int8 (nibble - 8) in the VNNI layout AMX wants (row k4 holds the
   4 consecutive k of all 16 rows), which is exactly a pair of q4x8 chunks; A tile =
   the 16 tokens' Q8 bytes, loaded in place with the activation row stride; the int32
   tile then takes the per-block scales in AVX-512 registers. Blocks alternate between
   two A, B and C tiles so one block's store overlaps the next one's product. */
QORA_AMX_TARGET static void QORA_AMX_FN(int n, const block_q4x8* w0, const block_q4x8* w1, const block_q8* x,
                                        const qora_xblock* xsum, size_t xs, float* out, size_t ldo) {
    qora_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16, cfg.colsb[0] = 32; /* A: 16 tokens x 32 int8 (tiles 0 and 5) */
    cfg.rows[5] = 16, cfg.colsb[5] = 32;
    for (int t = 1; t <= 2; t++) cfg.rows[t] = 8, cfg.colsb[t] = 64;   /* B: 8 x (16 rows x 4 k) */
    for (int t = 3; t <= 4; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;  /* C: 16 tokens x 16 int32 */
    T_CFG(&cfg);

    QORA_ALIGNED(64) int8_t bbuf[2][8 * 64];
    QORA_ALIGNED(64) int32_t cbuf[2][16 * 16];
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0f), e8 = _mm512_set1_epi8(8);
    const size_t astride = xs * sizeof(block_q8);
    const int nb = n / QK;

#define QORA_AMX_WEIGHTS(BUF, b)                                                         \
    do {                                                                                 \
        qora_prefetch_q4x8(w0 + (b) + QORA_PREFETCH_BLOCKS);                             \
        qora_prefetch_q4x8(w1 + (b) + QORA_PREFETCH_BLOCKS);                             \
        for (int k = 0; k < 4; k++) {                                                    \
            const __m512i v = q4x16_pair(w0 + (b), w1 + (b), k);                         \
            _mm512_store_si512((void*)((BUF) + 64 * k), _mm512_sub_epi8(_mm512_and_si512(v, m4), e8)); \
            _mm512_store_si512((void*)((BUF) + 64 * (4 + k)),                            \
                               _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), e8)); \
        }                                                                                \
    } while (0)
#define QORA_AMX_SCALE(BUF, b)                                                           \
    do {                                                                                 \
        const __m256i d16 = _mm256_inserti128_si256(_mm256_castsi128_si256(load_scales8(w0[(b)].d)), \
                                                    load_scales8(w1[(b)].d), 1);         \
        const __m512 dw = _mm512_cvtph_ps(d16);                                          \
        for (int t = 0; t < 16; t++) {                                                   \
            const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(xsum[t * xs + (b)].d));    \
            acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_load_si512((const void*)((BUF) + 16 * t))), acc[t]); \
        }                                                                                \
    } while (0)

    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        QORA_AMX_WEIGHTS(bbuf[0], b);
        QORA_AMX_WEIGHTS(bbuf[1], b + 1);
        T_ZERO(3);
        T_ZERO(4);
        T_LOAD(1, bbuf[0], 64);
        T_LOAD(0, x[b].qs, astride);
        T_DP(3, 0, 1);
        T_LOAD(2, bbuf[1], 64);
        T_LOAD(5, x[b + 1].qs, astride);
        T_DP(4, 5, 2);
        T_STORE(3, cbuf[0], 64);
        T_STORE(4, cbuf[1], 64);
        QORA_AMX_SCALE(cbuf[0], b);
        QORA_AMX_SCALE(cbuf[1], b + 1);
    }
    for (; b < nb; b++) { /* an odd block count */
        QORA_AMX_WEIGHTS(bbuf[0], b);
        T_ZERO(3);
        T_LOAD(1, bbuf[0], 64);
        T_LOAD(0, x[b].qs, astride);
        T_DP(3, 0, 1);
        T_STORE(3, cbuf[0], 64);
        QORA_AMX_SCALE(cbuf[0], b);
    }
#undef QORA_AMX_WEIGHTS
#undef QORA_AMX_SCALE
    T_RELEASE();
    for (int t = 0; t < 16; t++) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

#undef QORA_AMX_FN
#undef QORA_AMX_TARGET
#undef T_CFG
#undef T_ZERO
#undef T_LOAD
#undef T_DP
#undef T_STORE
#undef T_RELEASE
