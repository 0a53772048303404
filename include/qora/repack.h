/* qora — Q4 rows repacked at load into groups of 8 interleaved rows.
   In a group block, lane j of a 256-bit vector belongs to row j: the 8 scales
   convert with one vcvtph2ps, and one vpmaddubsw/vpdpbusd on 4-byte chunks of
   eight rows at once leaves each row's partial dot in its own 32-bit lane, so
   the block loop has no horizontal reduction at all (one per row at the end). */
#ifndef QORA_REPACK_H
#define QORA_REPACK_H

#include <stdlib.h>
#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

typedef struct {
    uint16_t d[8];         /* f16 scale of row j's block */
    uint8_t qs[4][8][4];   /* qs[k][j] = bytes 4k..4k+3 of row j's block (nibble pairs as in block_q4) */
} block_q4x8;
QORA_STATIC_ASSERT(sizeof(block_q4x8) == 16 + 128, "block_q4x8 must be 144 bytes");

/* Group g of a Q4 matrix (rows 8g..8g+7, nb blocks each, row_bytes apart) interleaved into dst[0..nb). */
static void qora_repack_q4x8_group(const void* src, size_t row_bytes, int nb, int g, block_q4x8* dst) {
    const char* rows = (const char*)src + (size_t)8 * g * row_bytes;
    for (int b = 0; b < nb; b++) {
        block_q4x8* o = dst + b;
        for (int j = 0; j < 8; j++) {
            const block_q4* in = (const block_q4*)(rows + (size_t)j * row_bytes) + b;
            o->d[j] = in->d;
            for (int k = 0; k < 4; k++) memcpy(o->qs[k][j], in->qs + 4 * k, 4);
        }
    }
}

/* Interleave rows 8g..8g+7 of a Q4 matrix (rows x cols, row_bytes apart) for
   every full group; the last rows % 8 rows stay in the original layout. */
static void qora_repack_q4x8(const void* src, size_t row_bytes, int rows, int cols, block_q4x8* dst, int n_threads) {
    const int groups = rows / 8, nb = cols / QK;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int g = 0; g < groups; g++) qora_repack_q4x8_group(src, row_bytes, nb, g, dst + (size_t)g * nb);
    (void)n_threads;
}

/* Page-aligned buffer, on Linux backed by huge pages where the kernel allows:
   decode streams the whole buffer every token, so TLB reach matters. */
static void* qora_alloc_weights(size_t bytes) {
    void* p = NULL;
    const size_t align = (size_t)2 << 20;
    bytes = (bytes + align - 1) / align * align;
#if defined(_WIN32)
    p = _aligned_malloc(bytes, align);
#else
    if (posix_memalign(&p, align, bytes) != 0) p = NULL;
#endif
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p && !getenv("QORA_NO_THP")) madvise(p, bytes, MADV_HUGEPAGE); /* QORA_NO_THP=1 to compare */
#endif
    return p;
}

static void qora_free_weights(void* p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

/* ---- kernels: out[t * ldo + j] = dot(row j of the group, activation t), j < 8, t < nt <= the
   kernel table's q4x8_max_t (4 with 16 vector registers, 8 with AVX-512's 32).
   xsum[t * xs + b]: activation t's block b extras (see qora_xblock in common.h). */
typedef void (*qora_q4x8_fn)(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum, size_t xs, int nt,
                             float* out, size_t ldo);

/* The same for two groups at once (w0, w1: rows 0..7 and 8..15 of out). */
typedef void (*qora_q4x16_fn)(int n, const block_q4x8* w0, const block_q4x8* w1, const block_q8* x,
                              const qora_xblock* xsum, size_t xs, int nt, float* out, size_t ldo);

static void q4x8_scalar(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum, size_t xs, int nt,
                        float* out, size_t ldo) {
    const int nb = n / QK;
    for (int t = 0; t < nt; t++) {
        float sum[8] = {0};
        for (int i = 0; i < QORA_SEGS; i++) { /* the order of common.h */
            float acc[8] = {0};
            for (int b = qora_seg_begin(nb, i); b < qora_seg_begin(nb, i + 1); b++) {
                const block_q4x8* wb = w + b;
                const block_q8* xb = x + t * xs + b;
                const float dx = qora_fp16_to_fp32(xb->d);
                for (int j = 0; j < 8; j++) {
                    int32_t s = xsum[t * xs + b].off;
                    for (int k = 0; k < 4; k++)
                        for (int e = 0; e < 4; e++) {
                            const uint8_t q = wb->qs[k][j][e];
                            s += (q & 0x0f) * xb->qs[4 * k + e] + (q >> 4) * xb->qs[16 + 4 * k + e];
                        }
                    acc[j] = fmaf(qora_fp16_to_fp32(wb->d[j]) * dx, (float)s, acc[j]);
                }
            }
            for (int j = 0; j < 8; j++) sum[j] = i == 0 ? acc[j] : sum[j] + acc[j];
        }
        for (int j = 0; j < 8; j++) out[t * ldo + j] = sum[j];
    }
}

/* A prefill kernel (one chain per row over the blocks it is given) run once per segment of
   common.h, the passes added in order: out = a0, then out += a1, a2, a3 (an empty segment adds
   +0, which changes nothing, so it is skipped). CALL(nb0, b0, dst, lddst) runs blocks b0.. */
#define QORA_SEGMENT_PASSES(NB, NT, ROWS, OUT, LDO, CALL)                                            \
    do {                                                                                            \
        float qora_seg_tmp_[16 * 16];                                                               \
        int qora_first_ = 1;                                                                        \
        for (int qora_i_ = 0; qora_i_ < QORA_SEGS; qora_i_++) {                                     \
            const int b0 = qora_seg_begin(NB, qora_i_), nbs = qora_seg_begin(NB, qora_i_ + 1) - b0; \
            if (nbs == 0) continue;                                                                 \
            float* dst = qora_first_ ? (OUT) : qora_seg_tmp_;                                       \
            const size_t lddst = qora_first_ ? (LDO) : 16;                                          \
            CALL;                                                                                   \
            if (!qora_first_)                                                                       \
                for (int t_ = 0; t_ < (NT); t_++)                                                   \
                    for (int j_ = 0; j_ < (ROWS); j_++)                                             \
                        (OUT)[t_ * (LDO) + j_] = (OUT)[t_ * (LDO) + j_] + qora_seg_tmp_[t_ * 16 + j_]; \
            qora_first_ = 0;                                                                        \
        }                                                                                           \
        if (qora_first_) /* no blocks at all */                                                     \
            for (int t_ = 0; t_ < (NT); t_++)                                                       \
                for (int j_ = 0; j_ < (ROWS); j_++) (OUT)[t_ * (LDO) + j_] = 0.0f;                  \
    } while (0)

/* How decode (one token) walks a group's blocks, process-wide, chosen per CPU at load (engine/cpu.py:
   QORA_KERNEL, else a table by vendor). Both give the same operations in the same order (common.h):
   - SEG4: the four segments of common.h at once, four weight streams in flight (2-vCPU Xeon: +13%
     decode tok/s over one stream);
   - SEQ: the segments one after the other, one sequential stream per thread with software prefetch
     QORA_PREFETCH_SEQ blocks ahead, across group ends (AMD Zen 3, 1 thread: 84-101% of the read
     bandwidth against 55-69% for SEG4; bench/matvec_bench.c);
   - STREAM: SEQ without software prefetch, the hardware prefetchers alone (Zen 4, 1 thread: the
     prefetch instructions themselves held the stream at 21-25 GB/s where it reads at 27-29 without). */
enum { QORA_WALK_SEQ = 0, QORA_WALK_SEG4 = 1, QORA_WALK_STREAM = 2, QORA_WALK_COUNT = 3 };
static int qora_decode_walk = QORA_WALK_SEG4;
static int qora_set_decode_walk(int walk) {
    if (walk >= 0 && walk < QORA_WALK_COUNT) qora_decode_walk = walk;
    return qora_decode_walk;
}
#define QORA_PREFETCH_SEQ 16

#if QORA_X86
/* Decode streams every weight once per token and, on one or a few threads, is
   bound by memory latency: the hardware prefetcher stops at 4 KiB pages, so ask
   for the blocks a little ahead explicitly (past the end is harmless). */
#define QORA_PREFETCH_BLOCKS 8
static inline void qora_prefetch_q4x8(const block_q4x8* p) {
    const char* c = (const char*)p;
    _mm_prefetch(c, _MM_HINT_T0);
    _mm_prefetch(c + 64, _MM_HINT_T0);
    _mm_prefetch(c + 128, _MM_HINT_T0);
}

QORA_TARGET_AVX2 static inline __m256i bcast_i32_avx2(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

QORA_TARGET_AVX2 static inline __m128i load_scales8(const uint16_t* d) { return _mm_loadu_si128((const __m128i*)d); }

/* A block's 4 chunks split into low nibbles (elements 4k..4k+3 of the 8 rows) and high nibbles
   (elements 16+4k..), as unsigned bytes for maddubs / vpdpbusd. */
QORA_TARGET_AVX2 static inline void q4x8_nibbles_avx2(const block_q4x8* wb, __m256i lo[4], __m256i hi[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)wb->qs[k]);
        lo[k] = _mm256_and_si256(v, m4);
        hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
}

/* AVX2: maddubs(nibbles of 8 rows, 4 broadcast activation bytes), int16 sums
   of the 8 products per lane stay below 8 * 2 * 15 * 127 = 30480: no overflow.
   One Q8 block against the group's 8 rows: int32 dot per row, the Q4 offset (-8 * sum) folded in. */
QORA_TARGET_AVX2 QORA_INLINE __m256i q4x8_dot_avx2(const __m256i lo[4], const __m256i hi[4], const block_q8* xb,
                                                   int32_t off) {
    __m256i p = _mm256_maddubs_epi16(lo[0], bcast_i32_avx2(xb->qs));
    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[0], bcast_i32_avx2(xb->qs + 16)));
    for (int k = 1; k < 4; k++) {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[k], bcast_i32_avx2(xb->qs + 4 * k)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[k], bcast_i32_avx2(xb->qs + 16 + 4 * k)));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(1)), _mm256_set1_epi32(off));
}

QORA_TARGET_AVX2 QORA_INLINE void q4x8_avx2_t(const int T, int n, const block_q4x8* w, const block_q8* x,
                                              const qora_xblock* xsum, size_t xs, float* out, size_t ldo) {
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; b++) {
        const block_q4x8* wb = w + b;
        qora_prefetch_q4x8(wb + QORA_PREFETCH_BLOCKS);
        __m256i lo[4], hi[4];
        q4x8_nibbles_avx2(wb, lo, hi);
        const __m256 dw = _mm256_cvtph_ps(load_scales8(wb->d));
        for (int t = 0; t < T; t++) {
            const block_q8* xb = x + t * xs + b;
            const __m256i s = q4x8_dot_avx2(lo, hi, xb, xsum[t * xs + b].off);
            /* the extras' float scale: the f16 one converted (the same value), one broadcast from memory */
            const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(xsum[t * xs + b].d));
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}


/* Decode on AVX2: one chain per segment, the segments walked as qora_decode_walk says. */
QORA_TARGET_AVX2 static inline __m256 q4x8_block_1_avx2(const block_q4x8* wb, const block_q8* xb, const qora_xblock* xe,
                                                        __m256 acc, int pf) {
    if (pf) qora_prefetch_q4x8(wb + pf); /* pf 0: the STREAM walk (a constant once inlined) */
    __m256i lo[4], hi[4];
    q4x8_nibbles_avx2(wb, lo, hi);
    const __m256i s = q4x8_dot_avx2(lo, hi, xb, xe->off);
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(load_scales8(wb->d)), _mm256_set1_ps(xe->d));
    return _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
}

/* The segments one after the other, each chain's running sum in a register (not acc[i] in memory). */
#define QORA_Q4X8_SEQ(BLOCK, PF)                                                                      \
    for (int i = 0; i < 4; i++) {                                                                     \
        __m256 a = _mm256_setzero_ps();                                                               \
        for (int c = qora_seg_begin(nb, i); c < qora_seg_begin(nb, i + 1); c++)                       \
            a = BLOCK(w + c, x + c, xsum + c, a, PF);                                                 \
        acc[i] = a;                                                                                   \
    }

/* One 8-row group's decode: one chain per segment, the segments walked as qora_decode_walk says;
   BLOCK(wb, xb, xe, acc, prefetch) adds one block. Shared by the AVX2 and the 256-bit VNNI decode. */
#define QORA_Q4X8_DECODE_WALK(BLOCK)                                                                  \
    do {                                                                                              \
        const int nb = n / QK, seg = nb / QORA_SEGS;                                                  \
        __m256 acc[4];                                                                                   \
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();                                                  \
        if (qora_decode_walk == QORA_WALK_SEQ) {                                                      \
            QORA_Q4X8_SEQ(BLOCK, QORA_PREFETCH_SEQ);                                                  \
        } else if (qora_decode_walk == QORA_WALK_STREAM) {                                            \
            QORA_Q4X8_SEQ(BLOCK, 0);                                                                  \
        } else {                                                                                      \
            for (int b = 0; b < seg; b++) {                                                           \
                acc[0] = BLOCK(w + b, x + b, xsum + b, acc[0], QORA_PREFETCH_BLOCKS);                 \
                acc[1] = BLOCK(w + b + seg, x + b + seg, xsum + b + seg, acc[1], QORA_PREFETCH_BLOCKS); \
                acc[2] = BLOCK(w + b + 2 * seg, x + b + 2 * seg, xsum + b + 2 * seg, acc[2],          \
                               QORA_PREFETCH_BLOCKS);                                                 \
                acc[3] = BLOCK(w + b + 3 * seg, x + b + 3 * seg, xsum + b + 3 * seg, acc[3],          \
                               QORA_PREFETCH_BLOCKS);                                                 \
            }                                                                                         \
            for (int c = 4 * seg; c < nb; c++) /* segment 3's end */                                  \
                acc[3] = BLOCK(w + c, x + c, xsum + c, acc[3], QORA_PREFETCH_BLOCKS);                 \
        }                                                                                             \
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), acc[2]), acc[3]));                                    \
    } while (0)

QORA_TARGET_AVX2 static void q4x8_avx2_decode(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                              float* out) {
    QORA_STATIC_ASSERT(QORA_SEGS == 4, "the decode kernels walk the four segments of common.h");
    QORA_Q4X8_DECODE_WALK(q4x8_block_1_avx2);
}

QORA_TARGET_AVX2 static void q4x8_avx2_range(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                             size_t xs, int nt, float* out, size_t ldo) {
    switch (nt) {
    case 1: q4x8_avx2_t(1, n, w, x, xsum, xs, out, ldo); break;
    case 2: q4x8_avx2_t(2, n, w, x, xsum, xs, out, ldo); break;
    case 3: q4x8_avx2_t(3, n, w, x, xsum, xs, out, ldo); break;
    default: q4x8_avx2_t(4, n, w, x, xsum, xs, out, ldo); break;
    }
}

QORA_TARGET_AVX2 static void q4x8_avx2(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum, size_t xs,
                                       int nt, float* out, size_t ldo) {
    if (nt == 1) {
        q4x8_avx2_decode(n, w, x, xsum, out);
        return;
    }
    QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo,
                        q4x8_avx2_range(nbs * QK, w + b0, x + b0, xsum + b0, xs, nt, dst, lddst));
}

/* vpdpbusd folds the 4-byte products and the accumulation into one instruction
   per chunk; the same body serves AVX-512 VL + VNNI and AVX-VNNI (DPBUSD names the intrinsic). */
#define QORA_Q4X8_VNNI_BODY(DPBUSD)                                                                      \
    __m256 acc[8];                                                                                       \
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();                                            \
    for (int b = 0; b < n / QK; b++) {                                                                   \
        const block_q4x8* wb = w + b;                                                                    \
        qora_prefetch_q4x8(wb + QORA_PREFETCH_BLOCKS);                                                   \
        __m256i lo[4], hi[4];                                                                            \
        q4x8_nibbles_avx2(wb, lo, hi);                                                                   \
        const __m256 dw = _mm256_cvtph_ps(load_scales8(wb->d));                                          \
        for (int t = 0; t < T; t++) {                                                                    \
            const block_q8* xb = x + t * xs + b;                                                         \
            /* four independent chains: one chain of eight would serialise on its latency */             \
            __m256i s0 = DPBUSD(_mm256_set1_epi32(xsum[t * xs + b].off), lo[0], bcast_i32_avx2(xb->qs)); \
            __m256i s1 = DPBUSD(_mm256_setzero_si256(), hi[0], bcast_i32_avx2(xb->qs + 16));             \
            __m256i s2 = DPBUSD(_mm256_setzero_si256(), lo[1], bcast_i32_avx2(xb->qs + 4));              \
            __m256i s3 = DPBUSD(_mm256_setzero_si256(), hi[1], bcast_i32_avx2(xb->qs + 20));             \
            s0 = DPBUSD(s0, lo[2], bcast_i32_avx2(xb->qs + 8));                                          \
            s1 = DPBUSD(s1, hi[2], bcast_i32_avx2(xb->qs + 24));                                         \
            s2 = DPBUSD(s2, lo[3], bcast_i32_avx2(xb->qs + 12));                                         \
            s3 = DPBUSD(s3, hi[3], bcast_i32_avx2(xb->qs + 28));                                         \
            const __m256i s = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));     \
            const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(xsum[t * xs + b].d));                      \
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[t]);                                  \
        }                                                                                                \
    }                                                                                                    \
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);

QORA_TARGET_AVX512 QORA_INLINE void q4x8_vnni_t(const int T, int n, const block_q4x8* w, const block_q8* x,
                                               const qora_xblock* xsum, size_t xs, float* out, size_t ldo) {
    QORA_Q4X8_VNNI_BODY(_mm256_dpbusd_epi32)
}

#if QORA_HAVE_AVXVNNI
QORA_TARGET_AVXVNNI QORA_INLINE void q4x8_avxvnni_t(const int T, int n, const block_q4x8* w, const block_q8* x,
                                                   const qora_xblock* xsum, size_t xs, float* out, size_t ldo) {
    QORA_Q4X8_VNNI_BODY(_mm256_dpbusd_avx_epi32)
}

/* decode stays on the AVX2 segment kernel: it is bound by memory, not by the dot instruction */
QORA_TARGET_AVXVNNI static void q4x8_avxvnni_range(int n, const block_q4x8* w, const block_q8* x,
                                                  const qora_xblock* xsum, size_t xs, int nt, float* out, size_t ldo) {
    switch (nt) {
    case 1: q4x8_avxvnni_t(1, n, w, x, xsum, xs, out, ldo); break;
    case 2: q4x8_avxvnni_t(2, n, w, x, xsum, xs, out, ldo); break;
    case 3: q4x8_avxvnni_t(3, n, w, x, xsum, xs, out, ldo); break;
    default: q4x8_avxvnni_t(4, n, w, x, xsum, xs, out, ldo); break;
    }
}

QORA_TARGET_AVXVNNI static void q4x8_avxvnni(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                            size_t xs, int nt, float* out, size_t ldo) {
    if (nt == 1) {
        q4x8_avx2_decode(n, w, x, xsum, out);
        return;
    }
    QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo,
                        q4x8_avxvnni_range(nbs * QK, w + b0, x + b0, xsum + b0, xs, nt, dst, lddst));
}
#endif

QORA_TARGET_AVX512 static void q4x8_avx512_range(int n, const block_q4x8* w, const block_q8* x,
                                                 const qora_xblock* xsum, size_t xs, int nt, float* out, size_t ldo) {
    switch (nt) {
    case 1: q4x8_vnni_t(1, n, w, x, xsum, xs, out, ldo); break;
    case 2: q4x8_vnni_t(2, n, w, x, xsum, xs, out, ldo); break;
    case 3: q4x8_vnni_t(3, n, w, x, xsum, xs, out, ldo); break;
    case 4: q4x8_vnni_t(4, n, w, x, xsum, xs, out, ldo); break;
    case 5: q4x8_vnni_t(5, n, w, x, xsum, xs, out, ldo); break;
    case 6: q4x8_vnni_t(6, n, w, x, xsum, xs, out, ldo); break;
    case 7: q4x8_vnni_t(7, n, w, x, xsum, xs, out, ldo); break;
    default: q4x8_vnni_t(8, n, w, x, xsum, xs, out, ldo); break;
    }
}

QORA_TARGET_AVX512 static void q4x8_avx512(int n, const block_q4x8* w, const block_q8* x, const qora_xblock* xsum,
                                           size_t xs, int nt, float* out, size_t ldo) {
    QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo,
                        q4x8_avx512_range(nbs * QK, w + b0, x + b0, xsum + b0, xs, nt, dst, lddst));
}
/* Two groups side by side in one 512-bit vector: one vpdpbusd then serves 16
   rows, halving the activation broadcasts and instructions per row that bound
   prefill. With several tokens, one accumulation chain per token already gives
   the out-of-order core enough independent vpdpbusd; a lone token (decode) gets
   four chains so it is not bound by their latency. */
QORA_TARGET_AVX512 static inline __m512i q4x16_pair(const block_q4x8* a, const block_q4x8* b, int k) {
    const __m256i va = _mm256_loadu_si256((const __m256i*)a->qs[k]), vb = _mm256_loadu_si256((const __m256i*)b->qs[k]);
    return _mm512_inserti64x4(_mm512_castsi256_si512(va), vb, 1);
}

QORA_TARGET_AVX512 static inline __m512i bcast_i32_512(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

QORA_TARGET_AVX512 QORA_INLINE void q4x16_vnni_t(const int T, int n, const block_q4x8* w0, const block_q4x8* w1,
                                                const block_q8* x, const qora_xblock* xsum, size_t xs, float* out,
                                                size_t ldo) {
    __m512 acc[16];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int b = 0; b < n / QK; b++) {
        const block_q4x8 *wa = w0 + b, *wb = w1 + b;
        qora_prefetch_q4x8(wa + QORA_PREFETCH_BLOCKS);
        qora_prefetch_q4x8(wb + QORA_PREFETCH_BLOCKS);
        __m512i lo[4], hi[4];
        for (int k = 0; k < 4; k++) {
            const __m512i v = q4x16_pair(wa, wb, k);
            lo[k] = _mm512_and_si512(v, m4);
            hi[k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        const __m256i d16 = _mm256_inserti128_si256(_mm256_castsi128_si256(load_scales8(wa->d)), load_scales8(wb->d), 1);
        const __m512 dw = _mm512_cvtph_ps(d16);
        for (int t = 0; t < T; t++) {
            const block_q8* xb = x + t * xs + b;
            __m512i s = _mm512_set1_epi32(xsum[t * xs + b].off);
            if (T <= 2) {
                __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], bcast_i32_512(xb->qs + 16));
                __m512i s2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[1], bcast_i32_512(xb->qs + 4));
                __m512i s3 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[1], bcast_i32_512(xb->qs + 20));
                s = _mm512_dpbusd_epi32(s, lo[0], bcast_i32_512(xb->qs));
                s = _mm512_dpbusd_epi32(s, lo[2], bcast_i32_512(xb->qs + 8));
                s1 = _mm512_dpbusd_epi32(s1, hi[2], bcast_i32_512(xb->qs + 24));
                s2 = _mm512_dpbusd_epi32(s2, lo[3], bcast_i32_512(xb->qs + 12));
                s3 = _mm512_dpbusd_epi32(s3, hi[3], bcast_i32_512(xb->qs + 28));
                s = _mm512_add_epi32(_mm512_add_epi32(s, s1), _mm512_add_epi32(s2, s3));
            } else {
                for (int k = 0; k < 4; k++) {
                    s = _mm512_dpbusd_epi32(s, lo[k], bcast_i32_512(xb->qs + 4 * k));
                    s = _mm512_dpbusd_epi32(s, hi[k], bcast_i32_512(xb->qs + 16 + 4 * k));
                }
            }
            const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(xsum[t * xs + b].d));
            acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

/* Decode (one token) is bound by the misses one core keeps in flight: SEG4 walks the row pair's blocks
   as four segments at once, eight concurrent weight streams for the hardware prefetchers (2-vCPU Xeon:
   +13% decode tok/s; two streams per segment pair, or sixteen, were slower). The SEQ walk does not
   come here: it takes one group after the other (q4x8_vnni256_decode below). */
#define QORA_DECODE_SEGMENTS QORA_SEGS /* the segments of common.h */
QORA_TARGET_AVX512 static inline __m512 q4x16_block_1(const block_q4x8* wa, const block_q4x8* wb, const block_q8* xb,
                                                    const qora_xblock* xe, __m512 acc, int pf) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    qora_prefetch_q4x8(wa + pf);
    qora_prefetch_q4x8(wb + pf);
    __m512i s0 = _mm512_set1_epi32(xe->off), s1 = _mm512_setzero_si512();
    for (int k = 0; k < 4; k++) {
        const __m512i v = q4x16_pair(wa, wb, k);
        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, m4), bcast_i32_512(xb->qs + 4 * k));
        s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), bcast_i32_512(xb->qs + 16 + 4 * k));
    }
    const __m256i d16 = _mm256_inserti128_si256(_mm256_castsi128_si256(load_scales8(wa->d)), load_scales8(wb->d), 1);
    const __m512 d = _mm512_mul_ps(_mm512_cvtph_ps(d16), _mm512_set1_ps(xe->d));
    return _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), acc);
}

QORA_TARGET_AVX512 static void q4x16_vnni_decode(int n, const block_q4x8* w0, const block_q4x8* w1, const block_q8* x,
                                                 const qora_xblock* xsum, float* out) {
    const int nb = n / QK, seg = nb / QORA_DECODE_SEGMENTS;
    __m512 acc[QORA_DECODE_SEGMENTS];
    for (int i = 0; i < QORA_DECODE_SEGMENTS; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < seg; b++)
        for (int i = 0; i < QORA_DECODE_SEGMENTS; i++) {
            const int c = b + i * seg;
            acc[i] = q4x16_block_1(w0 + c, w1 + c, x + c, xsum + c, acc[i], QORA_PREFETCH_BLOCKS);
        }
    for (int c = QORA_DECODE_SEGMENTS * seg; c < nb; c++) /* segment 3's end (common.h) */
        acc[QORA_DECODE_SEGMENTS - 1] =
            q4x16_block_1(w0 + c, w1 + c, x + c, xsum + c, acc[QORA_DECODE_SEGMENTS - 1], QORA_PREFETCH_BLOCKS);
    for (int i = 1; i < QORA_DECODE_SEGMENTS; i++) acc[0] = _mm512_add_ps(acc[0], acc[i]);
    _mm512_storeu_ps(out, acc[0]);
}

/* The seq and stream walks of decode on AVX-512 take the two groups one after the other with 256-bit VNNI: one
   sequential weight stream, as the AVX2 decode has (Zen 4, 1 thread, 8 SmolLM3-3B layers: the 16-row
   kernel's two streams read at 45-48 % of the read bandwidth, the AVX2 walk at 73 %). The same
   operations per row in the same order as the 16-row kernel, so the same bits. */
QORA_TARGET_AVX512 static inline __m256 q4x8_block_1_vnni(const block_q4x8* wb, const block_q8* xb, const qora_xblock* xe,
                                                          __m256 acc, int pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    if (pf) qora_prefetch_q4x8(wb + pf);
    __m256i s0 = _mm256_set1_epi32(xe->off), s1 = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)wb->qs[k]);
        s0 = _mm256_dpbusd_epi32(s0, _mm256_and_si256(v, m4), bcast_i32_avx2(xb->qs + 4 * k));
        s1 = _mm256_dpbusd_epi32(s1, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), bcast_i32_avx2(xb->qs + 16 + 4 * k));
    }
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(load_scales8(wb->d)), _mm256_set1_ps(xe->d));
    return _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), acc);
}

QORA_TARGET_AVX512 static void q4x8_vnni256_decode(int n, const block_q4x8* w, const block_q8* x,
                                                   const qora_xblock* xsum, float* out) {
    QORA_Q4X8_DECODE_WALK(q4x8_block_1_vnni);
}

QORA_TARGET_AVX512 static void q4x16_avx512_range(int n, const block_q4x8* w0, const block_q4x8* w1, const block_q8* x,
                                                  const qora_xblock* xsum, size_t xs, int nt, float* out, size_t ldo) {
    switch (nt) {
#define QORA_Q4X16_CASE(T) \
    case T: q4x16_vnni_t(T, n, w0, w1, x, xsum, xs, out, ldo); break;
    QORA_Q4X16_CASE(1) QORA_Q4X16_CASE(2) QORA_Q4X16_CASE(3) QORA_Q4X16_CASE(4) QORA_Q4X16_CASE(5)
    QORA_Q4X16_CASE(6) QORA_Q4X16_CASE(7) QORA_Q4X16_CASE(8) QORA_Q4X16_CASE(9) QORA_Q4X16_CASE(10)
    QORA_Q4X16_CASE(11) QORA_Q4X16_CASE(12) QORA_Q4X16_CASE(13) QORA_Q4X16_CASE(14) QORA_Q4X16_CASE(15)
#undef QORA_Q4X16_CASE
    default: q4x16_vnni_t(16, n, w0, w1, x, xsum, xs, out, ldo); break;
    }
}

QORA_TARGET_AVX512 static void q4x16_avx512(int n, const block_q4x8* w0, const block_q4x8* w1, const block_q8* x,
                                            const qora_xblock* xsum, size_t xs, int nt, float* out, size_t ldo) {
    if (nt == 1 && qora_decode_walk != QORA_WALK_SEG4) {
        q4x8_vnni256_decode(n, w0, x, xsum, out);
        q4x8_vnni256_decode(n, w1, x, xsum, out + 8);
        return;
    }
    if (nt == 1) {
        q4x16_vnni_decode(n, w0, w1, x, xsum, out);
        return;
    }
    QORA_SEGMENT_PASSES(n / QK, nt, 16, out, ldo,
                        q4x16_avx512_range(nbs * QK, w0 + b0, w1 + b0, x + b0, xsum + b0, xs, nt, dst, lddst));
}
#endif /* QORA_X86 */

#endif /* QORA_REPACK_H */
