/* qora — Q8_0, Q4_K, Q5_K and Q6_K rows interleaved at load into groups of 8 (the "x8" layouts), as
   repack.h does for Q4_0: lane j of a 256-bit vector belongs to row j, so one vpmaddubsw on 4-byte
   chunks of eight rows against four broadcast activation bytes leaves each row's partial sums in its
   own 32-bit lane, the K sub-block scales multiply eight rows in one vpmaddwd, and no horizontal sum
   is left in the block loop. The integers and the float operations per row are those of the file-layout
   kernels (common.h's order), so the results are the same bits. Used on x86 only (qora_kx8_kernel):
   elsewhere the matrices stay in the file's layout. The rows past the last full group of 8 stay in the
   file's layout too. */
#ifndef QORA_KQUANTS_REPACK_H
#define QORA_KQUANTS_REPACK_H

#include "common.h"
#include "cpu_features.h"
#include "kquants.h"
#include "kquants_avx2.h"
#include "repack.h"

/* Q8_0: qs[k][j] = bytes 4k..4k+3 of row j's block */
typedef struct {
    uint16_t d[8];
    int8_t qs[8][8][4];
} block_q8x8;
QORA_STATIC_ASSERT(sizeof(block_q8x8) == 16 + 256, "block_q8x8 must be 272 bytes");

/* Q4_1 / Q5_0 / Q5_1: scales d[8] (and minimums m[8]), qs[k][j] = bytes 4k..4k+3 of row j's qs (low nibbles
   elements 4k + e, high nibbles 16 + 4k + e); the 5-bit types' bit 4 as qh[k][j]: bit e for element 4k + e,
   bit 4 + e for element 16 + 4k + e */
typedef struct {
    uint16_t d[8], m[8];
    uint8_t qs[4][8][4];
} block_q4_1x8;
QORA_STATIC_ASSERT(sizeof(block_q4_1x8) == 8 * sizeof(block_q4_1), "block_q4_1x8 must be 160 bytes");

typedef struct {
    uint16_t d[8];
    uint8_t qh[4][8];
    uint8_t qs[4][8][4];
} block_q5_0x8;
QORA_STATIC_ASSERT(sizeof(block_q5_0x8) == 8 * sizeof(block_q5_0), "block_q5_0x8 must be 176 bytes");

typedef struct {
    uint16_t d[8], m[8];
    uint8_t qh[4][8];
    uint8_t qs[4][8][4];
} block_q5_1x8;
QORA_STATIC_ASSERT(sizeof(block_q5_1x8) == 8 * sizeof(block_q5_1), "block_q5_1x8 must be 192 bytes");

/* Q4_K: the 6-bit scales and minimums unpacked (sc[s][j]: row j's scale of sub-block s; mn[p][j][e]:
   row j's minimum of sub-block 2p + e), qs[k][j] = bytes 4k..4k+3 of row j's qs (k = 8p + c: low nibbles
   elements 64p + 4c.., high nibbles 64p + 32 + 4c..) */
typedef struct {
    uint16_t d[8], dmin[8];
    uint8_t sc[8][8];
    uint8_t mn[4][8][2];
    uint8_t qs[32][8][4];
} block_q4_Kx8;
QORA_STATIC_ASSERT(sizeof(block_q4_Kx8) == 1184, "block_q4_Kx8 must be 1184 bytes");

/* Q5_K: Q4_K's x8 layout, then qh[c][j] = bytes 4c..4c+3 of row j's qh (bit s: bit 4 of sub-block s's
   element 4c + e) */
typedef struct {
    block_q4_Kx8 k4;
    uint8_t qh[8][8][4];
} block_q5_Kx8;
QORA_STATIC_ASSERT(sizeof(block_q5_Kx8) == 1184 + 256, "block_q5_Kx8 must be 1440 bytes");

/* Q6_K: sc[p][j][e] = row j's int8 scale of the 16 elements 16 (2p + e)..; per quarter p of 64 elements,
   ql[8p + c][j] holds the low four bits of elements 64p + 4c + e (c < 8; low nibble) and 64p + 32 + 4c + e
   (high nibble), qh[4p + c][j] (c < 4) the top two bits of elements 64p + 4c + e (bits 0-1),
   64p + 32 + 4c + e (2-3), 64p + 16 + 4c + e (4-5) and 64p + 48 + 4c + e (6-7) */
typedef struct {
    uint16_t d[8];
    int8_t sc[8][8][2];
    uint8_t ql[32][8][4];
    uint8_t qh[16][8][4];
} block_q6_Kx8;
QORA_STATIC_ASSERT(sizeof(block_q6_Kx8) == 1680, "block_q6_Kx8 must be 1680 bytes");

/* bytes of one x8 block (8 rows x one block of the type); 0: no x8 layout */
static inline size_t qora_kx8_block_bytes(int dtype) {
    switch (dtype) {
    case QORA_Q8: return sizeof(block_q8x8);
    case QORA_Q4_1: return sizeof(block_q4_1x8);
    case QORA_Q5_0: return sizeof(block_q5_0x8);
    case QORA_Q5_1: return sizeof(block_q5_1x8);
    case QORA_Q4_K: return sizeof(block_q4_Kx8);
    case QORA_Q5_K: return sizeof(block_q5_Kx8);
    case QORA_Q6_K: return sizeof(block_q6_Kx8);
    default: return 0;
    }
}

/* bytes of a matrix's x8 copy (its full groups of 8 rows) */
static inline size_t qora_kx8_bytes(int dtype, int rows, int cols) {
    const int e = qora_block_elems(dtype);
    return e > 1 ? (size_t)(rows / 8) * (size_t)(cols / e) * qora_kx8_block_bytes(dtype) : 0;
}

/* ---- layout: one row's block into / out of an x8 block ---- */

static void kx8_put_q4k(block_q4_Kx8* o, int j, const block_q4_K* in) {
    o->d[j] = in->d;
    o->dmin[j] = in->dmin;
    for (int s = 0; s < 8; s++) {
        uint8_t sc, m;
        qora_kscale(in->scales, s, &sc, &m);
        o->sc[s][j] = sc;
        o->mn[s / 2][j][s % 2] = m;
    }
    for (int k = 0; k < 32; k++) memcpy(o->qs[k][j], in->qs + 4 * k, 4);
}

static inline uint32_t kx8_word(const uint8_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* four elements at a time: bytes as the lanes of a 32-bit word (the layout is the same on any byte order) */
static void kx8_put_q6k(block_q6_Kx8* o, int j, const block_q6_K* in) {
    const uint32_t m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    o->d[j] = in->d;
    for (int s = 0; s < 16; s++) o->sc[s / 2][j][s % 2] = in->scales[s];
    for (int p = 0; p < 4; p++) {
        const int h = p / 2, sh = 4 * (p % 2), i0 = 2 * (p % 2);
        const uint8_t *ql = in->ql + 64 * h, *qh = in->qh + 32 * h;
        for (int c = 0; c < 8; c++) { /* elements l = 4c + e */
            const uint32_t v = ((kx8_word(ql + 4 * c) >> sh) & m4) | ((kx8_word(ql + 32 + 4 * c) >> sh) & m4) << 4;
            memcpy(o->ql[8 * p + c][j], &v, 4);
        }
        for (int c = 0; c < 4; c++) {
            const uint32_t a = kx8_word(qh + 4 * c), b = kx8_word(qh + 16 + 4 * c);
            const uint32_t v = ((a >> (2 * i0)) & m2) | ((a >> (2 * i0 + 2)) & m2) << 2 | ((b >> (2 * i0)) & m2) << 4 |
                               ((b >> (2 * i0 + 2)) & m2) << 6;
            memcpy(o->qh[4 * p + c][j], &v, 4);
        }
    }
}

/* row j's block b of a Q4_K / Q5_K x8 block back in the file's layout (the 6-bit scales re-packed) */
static void kx8_get_q4k(const block_q4_Kx8* g, int j, block_q4_K* out) {
    out->d = g->d[j];
    out->dmin = g->dmin[j];
    memset(out->scales, 0, 12);
    for (int s = 0; s < 8; s++) {
        const uint8_t sc = g->sc[s][j], m = g->mn[s / 2][j][s % 2];
        if (s < 4) {
            out->scales[s] |= sc & 63;
            out->scales[s + 4] |= m & 63;
        } else {
            out->scales[s + 4] = (uint8_t)((sc & 15) | (m & 15) << 4);
            out->scales[s - 4] |= (uint8_t)((sc >> 4) << 6);
            out->scales[s] |= (uint8_t)((m >> 4) << 6);
        }
    }
    for (int k = 0; k < 32; k++) memcpy(out->qs + 4 * k, g->qs[k][j], 4);
}

static void kx8_get_q6k(const block_q6_Kx8* g, int j, block_q6_K* out) {
    out->d = g->d[j];
    for (int s = 0; s < 16; s++) out->scales[s] = g->sc[s / 2][j][s % 2];
    memset(out->ql, 0, sizeof out->ql);
    memset(out->qh, 0, sizeof out->qh);
    for (int p = 0; p < 4; p++) {
        const int h = p / 2, sh = 4 * (p % 2), i0 = 2 * (p % 2);
        uint8_t *ql = out->ql + 64 * h, *qh = out->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            const uint8_t v = g->ql[8 * p + l / 4][j][l % 4];
            ql[l] |= (uint8_t)((v & 15) << sh);
            ql[32 + l] |= (uint8_t)((v >> 4) << sh);
            if (l < 16) {
                const uint8_t b = g->qh[4 * p + l / 4][j][l % 4];
                qh[l] |= (uint8_t)((b & 3) << (2 * i0) | ((b >> 2) & 3) << (2 * i0 + 2));
                qh[l + 16] |= (uint8_t)(((b >> 4) & 3) << (2 * i0) | ((b >> 6) & 3) << (2 * i0 + 2));
            }
        }
    }
}

/* where a Q4_1 / Q5_0 / Q5_1 x8 block keeps its fields (bytes from its start; qh: -1 for Q4_1) */
typedef struct {
    int m, qh, qs;
} kx8_q32_fields;
static inline kx8_q32_fields kx8_q32_at(int dtype) {
    kx8_q32_fields f;
    f.m = dtype == QORA_Q5_0 ? -1 : 16;
    f.qh = dtype == QORA_Q4_1 ? -1 : (dtype == QORA_Q5_0 ? 16 : 32);
    f.qs = dtype == QORA_Q4_1 ? 32 : (dtype == QORA_Q5_0 ? 48 : 64);
    return f;
}

/* a file block of Q4_1 / Q5_0 / Q5_1: d, m (0 if none), the 32 bits of qh (0 if none), qs */
static void kx8_q32_put(int dtype, uint8_t* g, int j, const void* in) {
    const kx8_q32_fields f = kx8_q32_at(dtype);
    const uint8_t* b = (const uint8_t*)in;
    memcpy(g + 2 * j, b, 2);
    if (f.m >= 0) memcpy(g + f.m + 2 * j, b + 2, 2);
    const uint8_t* qs = b + qora_row_bytes(dtype, QK) - QK / 2;
    if (f.qh >= 0) {
        const uint32_t h = qora_qh32(qs - 4);
        for (int k = 0; k < 4; k++) g[f.qh + 8 * k + j] = (uint8_t)(((h >> (4 * k)) & 15) | ((h >> (16 + 4 * k)) & 15) << 4);
    }
    for (int k = 0; k < 4; k++) memcpy(g + f.qs + 32 * k + 4 * j, qs + 4 * k, 4);
}

static void kx8_q32_get(int dtype, const uint8_t* g, int j, void* out) {
    const kx8_q32_fields f = kx8_q32_at(dtype);
    uint8_t* b = (uint8_t*)out;
    memcpy(b, g + 2 * j, 2);
    if (f.m >= 0) memcpy(b + 2, g + f.m + 2 * j, 2);
    uint8_t* qs = b + qora_row_bytes(dtype, QK) - QK / 2;
    if (f.qh >= 0) {
        uint32_t h = 0;
        for (int k = 0; k < 4; k++) {
            const uint32_t v = g[f.qh + 8 * k + j];
            h |= (v & 15) << (4 * k) | (v >> 4) << (16 + 4 * k);
        }
        for (int i = 0; i < 4; i++) qs[i - 4] = (uint8_t)(h >> (8 * i));
    }
    for (int k = 0; k < 4; k++) memcpy(qs + 4 * k, g + f.qs + 32 * k + 4 * j, 4);
}

/* Row j's block in the file's layout from x8 block g (out: one block of the type). */
static void qora_kx8_get(int dtype, const void* g, int j, void* out) {
    switch (dtype) {
    case QORA_Q8: {
        const block_q8x8* q = (const block_q8x8*)g;
        block_q8* o = (block_q8*)out;
        o->d = q->d[j];
        for (int k = 0; k < 8; k++) memcpy(o->qs + 4 * k, q->qs[k][j], 4);
        return;
    }
    case QORA_Q4_1:
    case QORA_Q5_0:
    case QORA_Q5_1: kx8_q32_get(dtype, (const uint8_t*)g, j, out); return;
    case QORA_Q4_K: kx8_get_q4k((const block_q4_Kx8*)g, j, (block_q4_K*)out); return;
    case QORA_Q5_K: {
        const block_q5_Kx8* q = (const block_q5_Kx8*)g;
        block_q4_K k4;
        kx8_get_q4k(&q->k4, j, &k4);
        block_q5_K* o = (block_q5_K*)out;
        o->d = k4.d;
        o->dmin = k4.dmin;
        memcpy(o->scales, k4.scales, 12);
        memcpy(o->qs, k4.qs, sizeof o->qs);
        for (int c = 0; c < 8; c++) memcpy(o->qh + 4 * c, q->qh[c][j], 4);
        return;
    }
    case QORA_Q6_K: kx8_get_q6k((const block_q6_Kx8*)g, j, (block_q6_K*)out); return;
    default: return;
    }
}

static void kx8_put(int dtype, void* g, int j, const void* in) {
    switch (dtype) {
    case QORA_Q8: {
        block_q8x8* q = (block_q8x8*)g;
        const block_q8* b = (const block_q8*)in;
        q->d[j] = b->d;
        for (int k = 0; k < 8; k++) memcpy(q->qs[k][j], b->qs + 4 * k, 4);
        return;
    }
    case QORA_Q4_1:
    case QORA_Q5_0:
    case QORA_Q5_1: kx8_q32_put(dtype, (uint8_t*)g, j, in); return;
    case QORA_Q4_K: kx8_put_q4k((block_q4_Kx8*)g, j, (const block_q4_K*)in); return;
    case QORA_Q5_K: {
        block_q5_Kx8* q = (block_q5_Kx8*)g;
        const block_q5_K* b = (const block_q5_K*)in;
        block_q4_K k4; /* Q5_K's fields but qh, as a Q4_K block */
        k4.d = b->d;
        k4.dmin = b->dmin;
        memcpy(k4.scales, b->scales, 12);
        memcpy(k4.qs, b->qs, sizeof k4.qs);
        kx8_put_q4k(&q->k4, j, &k4);
        for (int c = 0; c < 8; c++) memcpy(q->qh[c][j], b->qh + 4 * c, 4);
        return;
    }
    case QORA_Q6_K: kx8_put_q6k((block_q6_Kx8*)g, j, (const block_q6_K*)in); return;
    default: return;
    }
}

/* Group g (rows 8g..8g+7, nb blocks of bb bytes each, row_bytes apart) into its nb x8 blocks at dst. */
static void qora_kx8_repack_group(int dtype, const void* src, size_t row_bytes, int nb, int g, void* dst) {
    const size_t bb = qora_row_bytes(dtype, qora_block_elems(dtype)), gb = qora_kx8_block_bytes(dtype);
    const char* rows = (const char*)src + (size_t)8 * g * row_bytes;
    for (int b = 0; b < nb; b++) {
        char* o = (char*)dst + (size_t)b * gb;
        for (int j = 0; j < 8; j++) kx8_put(dtype, o, j, rows + (size_t)j * row_bytes + (size_t)b * bb);
    }
}

/* Interleave rows 8g..8g+7 of a matrix (rows x cols of dtype, row_bytes apart) for every full group,
   group after group, block after block within a group. */
static void qora_kx8_repack(int dtype, const void* src, size_t row_bytes, int rows, int cols, void* dst,
                            int n_threads) {
    const int groups = rows / 8, nb = cols / qora_block_elems(dtype);
    const size_t gb = qora_kx8_block_bytes(dtype);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int g = 0; g < groups; g++) qora_kx8_repack_group(dtype, src, row_bytes, nb, g, (char*)dst + (size_t)g * nb * gb);
    (void)n_threads;
}

/* ---- the whole model's interleaved copies in one pass (the engine's load) ----
   One job per matrix: its full groups of 8 rows go to dst (Q4_0 as block_q4x8, the other types in their
   x8 layout). All jobs' groups are cut into pieces of about QORA_REPACK_PIECE source bytes, handed out to
   the threads of one parallel region in file order (dynamic: matrices differ in width, and on a shared
   machine threads in speed), so the threads stream through the mapping and the destination together;
   the destination's pages are first touched by the thread that fills them. */
typedef struct {
    int dtype, rows, cols;
    size_t row_bytes;
    const void* src;
    void* dst;
} qora_repack_job;

#define QORA_REPACK_PIECE ((size_t)256 << 10)

/* groups per piece of a job (at least 1) */
static inline int qora_repack_piece_groups(const qora_repack_job* j) {
    const size_t per = QORA_REPACK_PIECE / (8 * j->row_bytes + 1);
    return per < 1 ? 1 : (per > (size_t)j->rows ? j->rows : (int)per);
}

/* bytes of a job's destination (0: nothing to repack) */
static inline size_t qora_repack_job_bytes(const qora_repack_job* j) {
    if (j->rows < 8) return 0;
    if (j->dtype == QORA_Q4) return (size_t)(j->rows / 8) * (size_t)(j->cols / QK) * sizeof(block_q4x8);
    return qora_kx8_bytes(j->dtype, j->rows, j->cols);
}

/* Repack every job; returns 0, or -1 when the piece table cannot be allocated (nothing written then). */
static int qora_repack_all(const qora_repack_job* jobs, int n_jobs, int n_threads) {
    long* first = (long*)malloc(((size_t)n_jobs + 1) * sizeof(long)); /* first[i]: job i's first piece */
    if (first == NULL) return -1;
    first[0] = 0;
    for (int i = 0; i < n_jobs; i++) {
        const int groups = jobs[i].rows / 8, per = qora_repack_piece_groups(&jobs[i]);
        first[i + 1] = first[i] + (groups + per - 1) / per;
    }
    const long pieces = first[n_jobs];
#if defined(__linux__) && defined(MADV_WILLNEED)
    /* a file not in the page cache is read ahead in large requests instead of 8 rows' worth per fault */
    const uintptr_t page = 4096;
    for (int i = 0; i < n_jobs; i++) {
        const uintptr_t a = (uintptr_t)jobs[i].src & ~(page - 1);
        const size_t len = (size_t)((uintptr_t)jobs[i].src - a) + (size_t)(jobs[i].rows / 8) * 8 * jobs[i].row_bytes;
        if (len) madvise((void*)a, len, MADV_WILLNEED);
    }
#endif
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
#endif
    for (long p = 0; p < pieces; p++) {
        int lo = 0, hi = n_jobs - 1; /* the job whose pieces hold p: first[lo] <= p < first[lo + 1] */
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (first[mid] <= p) lo = mid;
            else hi = mid - 1;
        }
        const qora_repack_job* j = &jobs[lo];
        const int per = qora_repack_piece_groups(j), groups = j->rows / 8;
        const int g0 = (int)(p - first[lo]) * per, g1 = g0 + per < groups ? g0 + per : groups;
        const int nb = j->cols / qora_block_elems(j->dtype);
        if (j->dtype == QORA_Q4) {
            for (int g = g0; g < g1; g++)
                qora_repack_q4x8_group(j->src, j->row_bytes, nb, g, (block_q4x8*)j->dst + (size_t)g * nb);
        } else {
            const size_t gb = qora_kx8_block_bytes(j->dtype);
            for (int g = g0; g < g1; g++)
                qora_kx8_repack_group(j->dtype, j->src, j->row_bytes, nb, g, (char*)j->dst + (size_t)g * nb * gb);
        }
    }
    free(first);
    (void)n_threads;
    return 0;
}

/* ---- kernels: out[t * ldo + j] = dot(row j of the group, activation t), j < 8, t < nt <= qora_kx8_max_t. w: the group's
   first x8 block; x: the activations in the type's partner format (block_q8 for Q8_0, block_q8K for the K
   types), xs bytes apart; xe: the Q8_0 blocks' extras (qora_xblock: -8 x their sum, their scale as float;
   xs / sizeof(block_q8) apart), read by the 32-element types' kernels (Q8_0 on AVX-512, Q4_1 / Q5_0 /
   Q5_1 everywhere but the scalar reference), NULL for the K types. */
typedef void (*qora_kx8_fn)(int dtype, int n, const void* w, const void* x, const qora_xblock* xe, size_t xs, int nt,
                            float* out, size_t ldo);
#define QORA_KX8_MAX_T 4

/* one block of dot_q32_q8_scalar's chain: acc = fma(dw * dx, isum, acc), then the minimum's fma */
static inline float kx8_q32_block_scalar(int dtype, const void* blk, const block_q8* x, float acc) {
    int32_t isum = 0, xsum = 0;
    for (int j = 0; j < QK; j++) {
        isum += qora_q32_int(dtype, blk, j) * x->qs[j];
        xsum += x->qs[j];
    }
    const float dx = qora_fp16_to_fp32(x->d);
    acc = fmaf(qora_fp16_to_fp32(*(const uint16_t*)blk) * dx, (float)isum, acc);
    if (dtype != QORA_Q5_0) acc = fmaf(qora_fp16_to_fp32(((const uint16_t*)blk)[1]) * dx, (float)xsum, acc);
    return acc;
}

/* the reference: each row's blocks back in the file's layout, then kquants.h's / the Q8_0 scalar order */
static void kx8_scalar(int dtype, int n, const void* w, const void* x, const qora_xblock* xe, size_t xs, int nt,
                       float* out, size_t ldo) {
    (void)xe;
    const int e = qora_block_elems(dtype), nb = n / e;
    const size_t gb = qora_kx8_block_bytes(dtype);
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < 8; j++) {
            const char* xt = (const char*)x + t * xs;
            float sum = 0.0f;
            if (e == QK && dtype != QORA_Q8) {
                char blk[sizeof(block_q5_1)];
                for (int i = 0; i < QORA_SEGS; i++) {
                    float acc = 0.0f;
                    for (int b = qora_seg_begin(nb, i); b < qora_seg_begin(nb, i + 1); b++) {
                        qora_kx8_get(dtype, (const char*)w + b * gb, j, blk);
                        acc = kx8_q32_block_scalar(dtype, blk, (const block_q8*)xt + b, acc);
                    }
                    sum = i == 0 ? acc : sum + acc;
                }
            } else if (dtype == QORA_Q8) {
                for (int i = 0; i < QORA_SEGS; i++) {
                    float acc = 0.0f;
                    for (int b = qora_seg_begin(nb, i); b < qora_seg_begin(nb, i + 1); b++) {
                        block_q8 wb;
                        qora_kx8_get(dtype, (const char*)w + b * gb, j, &wb);
                        const block_q8* xb = (const block_q8*)xt + b;
                        int32_t isum = 0;
                        for (int k = 0; k < QK; k++) isum += wb.qs[k] * xb->qs[k];
                        acc = fmaf(qora_fp16_to_fp32(wb.d) * qora_fp16_to_fp32(xb->d), (float)isum, acc);
                    }
                    sum = i == 0 ? acc : sum + acc;
                }
            } else {
                for (int b = 0; b < nb; b++) {
                    union {
                        block_q4_K k4;
                        block_q5_K k5;
                        block_q6_K k6;
                    } blk;
                    qora_kx8_get(dtype, (const char*)w + b * gb, j, &blk);
                    const block_q8K* xb = (const block_q8K*)xt + b;
                    int32_t S, M;
                    kdot_ints_scalar(dtype, &blk, xb, &S, &M);
                    if (dtype == QORA_Q6_K) {
                        sum = fmaf(qora_fp16_to_fp32(blk.k6.d) * xb->d, (float)S, sum);
                    } else {
                        sum = fmaf(qora_fp16_to_fp32(blk.k4.d) * xb->d, (float)S, sum);
                        sum = fmaf(-(qora_fp16_to_fp32(blk.k4.dmin) * xb->d), (float)M, sum);
                    }
                }
            }
            out[t * ldo + j] = sum;
        }
}

#if QORA_X86
/* ------------------------------------------------------------------ AVX2 */

/* eight bytes at p (one per row) as eight int32 lanes holding the byte in both 16-bit halves */
QORA_TARGET_AVX2 static inline __m256i kx8_u8_pairs(const uint8_t* p) {
    int64_t v;
    memcpy(&v, p, 8);
    const __m256i dup = _mm256_setr_epi8(0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1, 4, -1, 4, -1, 5, -1, 5,
                                         -1, 6, -1, 6, -1, 7, -1, 7, -1);
    return _mm256_shuffle_epi8(_mm256_set1_epi64x(v), dup);
}

/* two int16 as one int32, for a broadcast that a vpmaddwd pairs with two per-row values */
static inline int32_t kx8_pair16(const int16_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The x8 K-type values the kernels multiply, decoded from a group's bytes: Q4_K / Q5_K quarter p, step c:
   the 8 rows' 4 values of sub-block 2p (wl) and of 2p + 1 (wh) as unsigned bytes (Q5_K's fifth bit from
   qh); Q6_K quarter p, step c: the 8 rows' 4 values of each sub-block 4p + k as unsigned q + 32. */
QORA_TARGET_AVX2 QORA_INLINE void q45kx8_values(const int Q5, const block_q4_Kx8* g, const uint8_t (*qh)[8][4], int p,
                                                int c, __m256i* wl_out, __m256i* wh_out) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    const __m256i v = _mm256_loadu_si256((const __m256i*)g->qs[8 * p + c]);
    __m256i wl = _mm256_and_si256(v, m4), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (Q5) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)qh[c]);
        /* bit 2p (low nibbles' sub-block) and bit 2p + 1 to bit 4 of each byte */
        const __m256i hl = p < 2 ? _mm256_slli_epi16(h, 4 - 2 * p) : _mm256_srli_epi16(h, 2 * p - 4);
        const __m256i hh = p < 2 ? _mm256_slli_epi16(h, 3 - 2 * p) : _mm256_srli_epi16(h, 2 * p - 3);
        wl = _mm256_or_si256(wl, _mm256_and_si256(hl, bit4));
        wh = _mm256_or_si256(wh, _mm256_and_si256(hh, bit4));
    }
    *wl_out = wl;
    *wh_out = wh;
}

/* one of q6kx8_values' four: sub-block 4p + k */
QORA_TARGET_AVX2 QORA_INLINE __m256i q6kx8_value(const block_q6_Kx8* g, int p, int c, const int k) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    const __m256i h = _mm256_loadu_si256((const __m256i*)g->qh[4 * p + c]);
    const __m256i v = _mm256_loadu_si256((const __m256i*)g->ql[8 * p + (k & 1) * 4 + c]);
    const __m256i lo = k < 2 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    const __m256i hb = k == 0 ? _mm256_slli_epi16(h, 4) : k == 1 ? h : k == 2 ? _mm256_slli_epi16(h, 2) : _mm256_srli_epi16(h, 2);
    return _mm256_or_si256(lo, _mm256_and_si256(hb, m30));
}

QORA_TARGET_AVX2 QORA_INLINE void q6kx8_values(const block_q6_Kx8* g, int p, int c, __m256i q[4]) {
    for (int k = 0; k < 4; k++) q[k] = q6kx8_value(g, p, c, k);
}

/* Whether a Q4_K / Q5_K kernel prefetches the block after next: always but in Q4_K's decode on the STREAM
   walk (Zen 4, 1 thread: 26.7 -> 29-30 GB/s without). Q5_K and Q6_K keep it: their blocks are not read
   front to back (without: Q6_K 27 -> 7 GB/s, Q5_K 20.7 -> 17). */
static inline int q45kx8_ahead(const int Q5, const int T) {
    return T > 1 || Q5 || qora_decode_walk != QORA_WALK_STREAM;
}

/* Q4_K / Q5_K x8 against T <= 4 Q8_K activations: per super-block the exact S and M of kdot_ints_scalar
   for the 8 rows, then dot_qk_q8k_scalar's two fmas lane by lane. Sums of eight (Q4_K) or four (Q5_K)
   vpmaddubsw stay below 2^15: 8 * 2 * 15 * 127, 4 * 2 * 31 * 127. */
QORA_TARGET_AVX2 QORA_INLINE void q45kx8_avx2_t(const int Q5, const int T, int nb, const char* w, const char* x,
                                                size_t xs, float* out, size_t ldo) {
    const int ahead = q45kx8_ahead(Q5, T);
    const size_t gb = Q5 ? sizeof(block_q5_Kx8) : sizeof(block_q4_Kx8);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q4_Kx8* g = (const block_q4_Kx8*)(w + (size_t)b * gb);
        const uint8_t(*qh)[8][4] = Q5 ? ((const block_q5_Kx8*)g)->qh : NULL;
        const block_q8K* xb[4];
        int32_t bs[4][4]; /* per token, the activation sums of sub-blocks (2p, 2p + 1) as int16 pairs */
        __m256i S[4], M[4];
        for (int t = 0; t < T; t++) {
            xb[t] = (const block_q8K*)(x + t * xs) + b;
            const __m128i s = _mm_hadd_epi16(_mm_loadu_si128((const __m128i*)xb[t]->bsums),
                                             _mm_loadu_si128((const __m128i*)(xb[t]->bsums + 8)));
            _mm_storeu_si128((__m128i*)bs[t], s);
            S[t] = _mm256_setzero_si256();
            M[t] = _mm256_setzero_si256();
        }
        for (int p = 0; p < 4; p++) {
            /* the block after next, a quarter per quarter (all its lines at once stalled the stream) */
            const int lines = (int)((gb + 255) / 256);
            if (ahead) for (int i = lines * p; i < lines * (p + 1); i++) _mm_prefetch((const char*)g + 2 * gb + 64 * i, _MM_HINT_T0);
            const __m256i sc0 = kx8_u8_pairs(g->sc[2 * p]), sc1 = kx8_u8_pairs(g->sc[2 * p + 1]);
            const __m256i mn = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)g->mn[p]));
            for (int t = 0; t < T; t++) M[t] = _mm256_add_epi32(M[t], _mm256_madd_epi16(mn, _mm256_set1_epi32(bs[t][p])));
            __m256i lo[4], hi[4];
            for (int t = 0; t < T; t++) lo[t] = hi[t] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                __m256i wl, wh;
                q45kx8_values(Q5, g, qh, p, c, &wl, &wh);
                for (int t = 0; t < T; t++) {
                    const int8_t* xq = xb[t]->qs + 64 * p + 4 * c;
                    lo[t] = _mm256_add_epi16(lo[t], _mm256_maddubs_epi16(wl, bcast_i32_avx2(xq)));
                    hi[t] = _mm256_add_epi16(hi[t], _mm256_maddubs_epi16(wh, bcast_i32_avx2(xq + 32)));
                }
                if (c == 7 || (Q5 && c == 3))
                    for (int t = 0; t < T; t++) {
                        S[t] = _mm256_add_epi32(S[t], _mm256_add_epi32(_mm256_madd_epi16(lo[t], sc0),
                                                                       _mm256_madd_epi16(hi[t], sc1)));
                        lo[t] = hi[t] = _mm256_setzero_si256();
                    }
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->dmin));
        for (int t = 0; t < T; t++) {
            const __m256 dx = _mm256_set1_ps(xb[t]->d);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(S[t]), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(M[t]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

/* Q6_K x8: the integers as unsigned q + 32 (pairs of vpmaddubsw sums stay below 2^15: 2 * 2 * 63 * 127),
   S = sum of scale * (their dots) - 32 * sum of scale * (activation sums), then one fma per super-block. */
QORA_TARGET_AVX2 QORA_INLINE void q6kx8_avx2_t(const int T, int nb, const char* w, const char* x, size_t xs,
                                               float* out, size_t ldo) {
    /* row j's scale (byte 2j + e of a pair row) into the high byte of both 16-bit halves of lane j */
    const __m256i e0 = _mm256_setr_epi8(-1, 0, -1, 0, -1, 2, -1, 2, -1, 4, -1, 4, -1, 6, -1, 6, -1, 8, -1, 8, -1, 10, -1,
                                        10, -1, 12, -1, 12, -1, 14, -1, 14);
    const __m256i e1 = _mm256_add_epi8(e0, _mm256_set1_epi16(0x0100));
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q6_Kx8* g = (const block_q6_Kx8*)w + b;
        const block_q8K* xb[4];
        __m256i S[4], C[4];
        for (int t = 0; t < T; t++) {
            xb[t] = (const block_q8K*)(x + t * xs) + b;
            S[t] = C[t] = _mm256_setzero_si256();
        }
        for (int p = 0; p < 4; p++) {
            /* the block after next, a quarter per quarter: its 27 lines at once stalled the stream (Zen 4,
               1 thread, 110 MB matrix: 8 -> 28-30 GB/s) */
            for (int i = 7 * p; i < 7 * p + 7; i++) _mm_prefetch((const char*)(g + 2) + 64 * i, _MM_HINT_T0);
            const __m128i r0 = _mm_loadu_si128((const __m128i*)g->sc[2 * p]);
            const __m128i r1 = _mm_loadu_si128((const __m128i*)g->sc[2 * p + 1]);
            const __m256i b0 = _mm256_broadcastsi128_si256(r0), b1 = _mm256_broadcastsi128_si256(r1);
            __m256i sc[4]; /* sub-blocks 4p .. 4p + 3 */
            sc[0] = _mm256_srai_epi16(_mm256_shuffle_epi8(b0, e0), 8);
            sc[1] = _mm256_srai_epi16(_mm256_shuffle_epi8(b0, e1), 8);
            sc[2] = _mm256_srai_epi16(_mm256_shuffle_epi8(b1, e0), 8);
            sc[3] = _mm256_srai_epi16(_mm256_shuffle_epi8(b1, e1), 8);
            const __m256i w0 = _mm256_cvtepi8_epi16(r0), w1 = _mm256_cvtepi8_epi16(r1);
            for (int t = 0; t < T; t++) {
                const __m256i c0 = _mm256_madd_epi16(w0, _mm256_set1_epi32(kx8_pair16(xb[t]->bsums + 4 * p)));
                const __m256i c1 = _mm256_madd_epi16(w1, _mm256_set1_epi32(kx8_pair16(xb[t]->bsums + 4 * p + 2)));
                C[t] = _mm256_add_epi32(C[t], _mm256_add_epi32(c0, c1));
            }
            __m256i a[4][4]; /* [token][sub-block] */
            for (int t = 0; t < T; t++)
                for (int q = 0; q < 4; q++) a[t][q] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i q[4];
                q6kx8_values(g, p, c, q);
                for (int t = 0; t < T; t++) {
                    const int8_t* xq = xb[t]->qs + 64 * p + 4 * c;
                    for (int k = 0; k < 4; k++)
                        a[t][k] = _mm256_add_epi16(a[t][k], _mm256_maddubs_epi16(q[k], bcast_i32_avx2(xq + 16 * k)));
                }
                if (c & 1)
                    for (int t = 0; t < T; t++) {
                        const __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(a[t][0], sc[0]), _mm256_madd_epi16(a[t][1], sc[1]));
                        const __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(a[t][2], sc[2]), _mm256_madd_epi16(a[t][3], sc[3]));
                        S[t] = _mm256_add_epi32(S[t], _mm256_add_epi32(s01, s23));
                        for (int k = 0; k < 4; k++) a[t][k] = _mm256_setzero_si256();
                    }
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d));
        for (int t = 0; t < T; t++) {
            const __m256i s = _mm256_sub_epi32(S[t], _mm256_slli_epi32(C[t], 5));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb[t]->d)), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

/* One Q8_0 x8 block against one activation block: the 8 rows' exact int32 dots. |w| x (x with w's sign):
   each vpmaddubsw pair stays below 2^15 (2 * 128 * 127), so it is widened at once. */
QORA_TARGET_AVX2 static inline __m256i q8x8_isum_avx2(const block_q8x8* g, const int8_t* xq) {
    const __m256i one = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k += 2) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)g->qs[k]);
        const __m256i v1 = _mm256_loadu_si256((const __m256i*)g->qs[k + 1]);
        const __m256i p0 = _mm256_maddubs_epi16(_mm256_sign_epi8(v0, v0), _mm256_sign_epi8(bcast_i32_avx2(xq + 4 * k), v0));
        const __m256i p1 =
            _mm256_maddubs_epi16(_mm256_sign_epi8(v1, v1), _mm256_sign_epi8(bcast_i32_avx2(xq + 4 * k + 4), v1));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, one));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, one));
    }
    return _mm256_add_epi32(s0, s1);
}

/* the Q8_0 x8 block 4 ahead of g (272 bytes: 5 cache lines) */
static inline void q8x8_prefetch(const block_q8x8* g) {
    for (int i = 0; i < 5; i++) _mm_prefetch((const char*)(g + 4) + 64 * i, _MM_HINT_T0);
}

/* pf: prefetch the block 4 ahead (the seg4 walk; the seq walk prefetches its one stream itself, and a
   second prefetch of the same lines cost Zen 4 10-15 % of its bandwidth) */
QORA_TARGET_AVX2 static inline __m256 q8x8_block_avx2(const int pf, const block_q8x8* g, const block_q8* xb,
                                                      const qora_xblock* xe, __m256 acc) {
    if (pf)
        q8x8_prefetch(g);
    /* the activation's scale from its float extras: xb->d converted, one broadcast from memory */
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d)), _mm256_set1_ps(xe->d));
    return _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q8x8_isum_avx2(g, xb->qs)), acc);
}

/* one chain per row and token over blocks [0, nb) (a segment pass of QORA_SEGMENT_PASSES): each block's
   weight vectors loaded and made |w| once for all the tokens (q8x8_isum_avx2's exact int32 dots, summed in
   another grouping: the same integers, so the same bits) */
QORA_TARGET_AVX2 QORA_INLINE void q8x8_avx2_t(const int T, int nb, const block_q8x8* w, const char* x,
                                              const qora_xblock* xe, size_t xs, float* out, size_t ldo) {
    const __m256i one = _mm256_set1_epi16(1);
    const size_t xes = xs / sizeof(block_q8);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q8x8* g = w + b;
        q8x8_prefetch(g);
        __m256i s[4];
        for (int t = 0; t < T; t++) s[t] = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)g->qs[k]), a = _mm256_sign_epi8(v, v);
            for (int t = 0; t < T; t++) {
                const int8_t* xq = ((const block_q8*)(x + t * xs) + b)->qs;
                s[t] = _mm256_add_epi32(
                    s[t], _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(bcast_i32_avx2(xq + 4 * k), v)), one));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d));
        for (int t = 0; t < T; t++) /* the activation's scale as in q8x8_block_avx2 */
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xe[t * xes + b].d)), _mm256_cvtepi32_ps(s[t]), acc[t]);
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

/* decode: the four segments of common.h, walked as qora_decode_walk says (repack.h): SEG4 all four at
   once (four weight streams in flight), SEQ one after the other (one stream, prefetched QORA_KX8_PREFETCH
   bytes ahead across segment and group ends), STREAM as SEQ without the prefetches. The same chains in
   the same order either way: segment i's blocks into acc[i] (the blocks past 4 * seg into acc[3]), then
   ((acc0 + acc1) + acc2) + acc3. */
#define QORA_KX8_PREFETCH 2048
/* The x8 decode walk (w: the group's x8 blocks of BYTES bytes each, x: the Q8_0 activation blocks);
   BLOCK(b, acc, pf) adds block b's fma, prefetching ahead itself where pf (the seg4 walk): Q8_0
   (q8x8_block_avx2, or q8x8_block_vnni on AVX-512) and Q4_1 / Q5_0 / Q5_1 (q32x8_block_avx2). */
#define QORA_KX8_DECODE_WALK(BYTES, BLOCK)                                                                   \
    do {                                                                                                     \
        const int seg = nb / QORA_SEGS;                                                                      \
        __m256 acc[4];                                                                                       \
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();                                            \
        if (qora_decode_walk != QORA_WALK_SEG4) {                                                            \
            const int ahead = qora_decode_walk == QORA_WALK_SEQ; /* STREAM: the hardware prefetchers alone */ \
            for (int i = 0; i < 4; i++) { /* the running sum in a register (acc[i] by a variable i is memory) */ \
                __m256 a = _mm256_setzero_ps();                                                              \
                for (int b = i * seg; b < (i == 3 ? nb : (i + 1) * seg); b++) {                              \
                    for (int l = 0; ahead && l < (int)(((BYTES) + 63) / 64); l++)                            \
                        _mm_prefetch((const char*)w + b * (BYTES) + QORA_KX8_PREFETCH + 64 * l, _MM_HINT_T0); \
                    a = BLOCK(b, a, 0);                                                                      \
                }                                                                                            \
                acc[i] = a;                                                                                  \
            }                                                                                                \
        } else {                                                                                             \
            for (int b = 0; b < seg; b++) {                                                                  \
                acc[0] = BLOCK(b, acc[0], 1);                                                                \
                acc[1] = BLOCK(b + seg, acc[1], 1);                                                          \
                acc[2] = BLOCK(b + 2 * seg, acc[2], 1);                                                      \
                acc[3] = BLOCK(b + 3 * seg, acc[3], 1);                                                      \
            }                                                                                                \
            for (int c = 4 * seg; c < nb; c++) acc[3] = BLOCK(c, acc[3], 1);                                 \
        }                                                                                                    \
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), acc[2]), acc[3]));   \
    } while (0)

#define QORA_Q8X8_BLOCK_AVX2(b, a, pf) q8x8_block_avx2(pf, w + (b), x + (b), xe + (b), a)
QORA_TARGET_AVX2 static void q8x8_avx2_decode(int nb, const block_q8x8* w, const block_q8* x, const qora_xblock* xe,
                                              float* out) {
    QORA_KX8_DECODE_WALK(sizeof(block_q8x8), QORA_Q8X8_BLOCK_AVX2);
}

/* One Q4_1 / Q5_0 / Q5_1 x8 block against one Q8_0 activation block: dot_q32_q8_scalar's two fmas per row.
   The integers as unsigned (Q5_0: q + 16, taken back with the activation sum); the vpmaddubsw sums stay
   below 2^15: eight of 2 * 15 * 127 (Q4_1), four of 2 * 31 * 127 (the 5-bit types). */
QORA_TARGET_AVX2 QORA_INLINE __m256 q32x8_block_avx2(const int pf, const int dtype, const uint8_t* g, const block_q8* xb,
                                                     const qora_xblock* e, __m256 acc) {
    const kx8_q32_fields f = kx8_q32_at(dtype);
    const __m256i m4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10), one = _mm256_set1_epi16(1);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6,
                                            6, 7, 7, 7, 7);
    const __m256i bl = _mm256_set1_epi32(0x08040201), bh = _mm256_set1_epi32((int)0x80402010u);
    const size_t gb = qora_kx8_block_bytes(dtype);
    if (pf) /* as q8x8_block_avx2's */
        for (int i = 0; i < (int)((gb + 63) / 64); i++) _mm_prefetch((const char*)g + 4 * gb + 64 * i, _MM_HINT_T0);
    __m256i plo = _mm256_setzero_si256(), phi = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(g + f.qs + 32 * k));
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (f.qh >= 0) {
            int64_t h8;
            memcpy(&h8, g + f.qh + 8 * k, 8);
            const __m256i h = _mm256_shuffle_epi8(_mm256_set1_epi64x(h8), spread);
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bl), bl), bit4));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bh), bh), bit4));
        }
        plo = _mm256_add_epi16(plo, _mm256_maddubs_epi16(lo, bcast_i32_avx2(xb->qs + 4 * k)));
        phi = _mm256_add_epi16(phi, _mm256_maddubs_epi16(hi, bcast_i32_avx2(xb->qs + 16 + 4 * k)));
    }
    __m256i s = dtype == QORA_Q4_1 ? _mm256_madd_epi16(_mm256_add_epi16(plo, phi), one)
                                   : _mm256_add_epi32(_mm256_madd_epi16(plo, one), _mm256_madd_epi16(phi, one));
    const int32_t xsum = -e->off / 8; /* the block's int8 sum, precomputed as -8 x it (exact) */
    if (dtype == QORA_Q5_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(16 * xsum));
    const __m256 dx = _mm256_set1_ps(e->d);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g)), dx), _mm256_cvtepi32_ps(s), acc);
    if (f.m >= 0)
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g + f.m))), dx),
                              _mm256_set1_ps((float)xsum), acc);
    return acc;
}

/* blocks [0, nb) of the group against T tokens, one chain per row and token (a segment pass) */
QORA_TARGET_AVX2 QORA_INLINE void q32x8_avx2_t(const int dtype, const int T, int nb, const uint8_t* w, const char* x,
                                               const qora_xblock* xe, size_t xs, float* out, size_t ldo) {
    const size_t xes = xs / sizeof(block_q8);
    const size_t gb = qora_kx8_block_bytes(dtype);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++)
        for (int t = 0; t < T; t++) acc[t] = q32x8_block_avx2(1, dtype, w + b * gb, (const block_q8*)(x + t * xs) + b, xe + t * xes + b, acc[t]);
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

/* decode: the four segments of common.h at once */
#define QORA_Q32X8_BLOCK_AVX2(b, a, pf) q32x8_block_avx2(pf, dtype, w + (b) * gb, x + (b), xe + (b), a)
QORA_TARGET_AVX2 QORA_INLINE void q32x8_avx2_decode(const int dtype, int nb, const uint8_t* w, const block_q8* x,
                                                    const qora_xblock* xe, float* out) {
    const size_t gb = qora_kx8_block_bytes(dtype);
    QORA_KX8_DECODE_WALK(gb, QORA_Q32X8_BLOCK_AVX2);
}

#define QORA_KX8_SWITCH_T(CALL_T)  \
    switch (nt) {                  \
    case 1: CALL_T(1); break;      \
    case 2: CALL_T(2); break;      \
    case 3: CALL_T(3); break;      \
    default: CALL_T(4); break;     \
    }

#define QORA_KX8_SWITCH_T8(CALL_T) \
    switch (nt) {                  \
    case 2: CALL_T(2); break;      \
    case 3: CALL_T(3); break;      \
    case 4: CALL_T(4); break;      \
    case 5: CALL_T(5); break;      \
    case 6: CALL_T(6); break;      \
    case 7: CALL_T(7); break;      \
    default: CALL_T(8); break;     \
    }

QORA_TARGET_AVX2 static void q8x8_avx2_range(int nb, const block_q8x8* w, const char* x, const qora_xblock* xe, size_t xs,
                                             int nt, float* out, size_t ldo) {
#define QORA_Q8X8_T(T) q8x8_avx2_t(T, nb, w, x, xe, xs, out, ldo)
    QORA_KX8_SWITCH_T(QORA_Q8X8_T)
#undef QORA_Q8X8_T
}

#define QORA_Q32X8_RANGE(DT, NAME)                                                                               \
    QORA_TARGET_AVX2 static void NAME(int nb, const uint8_t* w, const char* x, const qora_xblock* xe, size_t xs,    \
                                      int nt, float* out, size_t ldo) {                                             \
        switch (nt) {                                                                                               \
        case 1: q32x8_avx2_t(DT, 1, nb, w, x, xe, xs, out, ldo); break;                                             \
        case 2: q32x8_avx2_t(DT, 2, nb, w, x, xe, xs, out, ldo); break;                                             \
        case 3: q32x8_avx2_t(DT, 3, nb, w, x, xe, xs, out, ldo); break;                                             \
        default: q32x8_avx2_t(DT, 4, nb, w, x, xe, xs, out, ldo); break;                                            \
        }                                                                                                           \
    }                                                                                                               \
    QORA_TARGET_AVX2 static void NAME##_decode(int nb, const uint8_t* w, const block_q8* x, const qora_xblock* xe,  \
                                               float* out) {                                                        \
        q32x8_avx2_decode(DT, nb, w, x, xe, out);                                                                   \
    }
QORA_Q32X8_RANGE(QORA_Q4_1, q41x8_avx2)
QORA_Q32X8_RANGE(QORA_Q5_0, q50x8_avx2)
QORA_Q32X8_RANGE(QORA_Q5_1, q51x8_avx2)
#undef QORA_Q32X8_RANGE

/* Q4_1 / Q5_0 / Q5_1: decode walks the four segments at once, prefill makes one pass per segment */
QORA_TARGET_AVX2 static void q32x8_avx2(int dtype, int n, const uint8_t* g, const char* xc, const qora_xblock* xe,
                                        size_t xs, int nt, float* out, size_t ldo) {
    void (*range)(int, const uint8_t*, const char*, const qora_xblock*, size_t, int, float*, size_t) =
        dtype == QORA_Q4_1 ? q41x8_avx2 : dtype == QORA_Q5_0 ? q50x8_avx2 : q51x8_avx2;
    void (*decode)(int, const uint8_t*, const block_q8*, const qora_xblock*, float*) =
        dtype == QORA_Q4_1 ? q41x8_avx2_decode : dtype == QORA_Q5_0 ? q50x8_avx2_decode : q51x8_avx2_decode;
    const size_t gb = qora_kx8_block_bytes(dtype);
    if (nt == 1) {
        decode(n / QK, g, (const block_q8*)xc, xe, out);
        return;
    }
    QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo,
                        range(nbs, g + b0 * gb, xc + b0 * sizeof(block_q8), xe + b0, xs, nt, dst, lddst));
}

/* the K types' cases of an x8 entry (wc, xc: the weights and activations as bytes), for kx8_avx2 and, compiled
   with AVX-512VL's 32 registers, kx8_avx512 */
#define QORA_KX8_K_CASES                                                          \
    case QORA_Q4_K: QORA_KX8_SWITCH_T(QORA_Q4KX8_T) return;                       \
    case QORA_Q5_K: QORA_KX8_SWITCH_T(QORA_Q5KX8_T) return;                       \
    case QORA_Q6_K: QORA_KX8_SWITCH_T(QORA_Q6KX8_T) return;
#define QORA_Q4KX8_T(T) q45kx8_avx2_t(0, T, n / QK_K, wc, xc, xs, out, ldo)
#define QORA_Q5KX8_T(T) q45kx8_avx2_t(1, T, n / QK_K, wc, xc, xs, out, ldo)
#define QORA_Q6KX8_T(T) q6kx8_avx2_t(T, n / QK_K, wc, xc, xs, out, ldo)

QORA_TARGET_AVX2 static void kx8_avx2(int dtype, int n, const void* w, const void* x, const qora_xblock* xe, size_t xs,
                                      int nt, float* out, size_t ldo) {
    const char *wc = (const char*)w, *xc = (const char*)x;
    switch (dtype) {
    case QORA_Q8: {
        const block_q8x8* g = (const block_q8x8*)w;
        if (nt == 1) {
            q8x8_avx2_decode(n / QK, g, (const block_q8*)x, xe, out);
            return;
        }
        QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo,
                            q8x8_avx2_range(nbs, g + b0, xc + b0 * sizeof(block_q8), xe + b0, xs, nt, dst, lddst));
        return;
    }
    case QORA_Q4_1:
    case QORA_Q5_0:
    case QORA_Q5_1: q32x8_avx2(dtype, n, (const uint8_t*)w, xc, xe, xs, nt, out, ldo); return;
    QORA_KX8_K_CASES
    default: return;
    }
}

/* AVX-512 (VNNI): Q8_0 decode with vpdpbusd as the prefill below: sum((w + 128) x) - 128 sum(x), the
   weights made unsigned (one vpxor per vector) against the token's bytes broadcast from its block, 128 sum(x)
   from the block's qora_xblock; exact int32 sums, so the same bits as the AVX2 kernel (|w| against x with
   w's sign: two vpsignb a vector more); the rest is the AVX2 kernels'. */
QORA_TARGET_AVX512 static inline __m256 q8x8_block_vnni(const int pf, const block_q8x8* g, const block_q8* xb,
                                                        const qora_xblock* e, __m256 acc) {
    if (pf)
        q8x8_prefetch(g);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d)), _mm256_set1_ps(e->d));
    __m256i s0 = _mm256_set1_epi32(16 * e->off), s1 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k += 2) {
        const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)g->qs[k]), flip);
        const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)g->qs[k + 1]), flip);
        s0 = _mm256_dpbusd_epi32(s0, v0, bcast_i32_avx2(xb->qs + 4 * k));
        s1 = _mm256_dpbusd_epi32(s1, v1, bcast_i32_avx2(xb->qs + 4 * k + 4));
    }
    return _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), acc);
}

#define QORA_Q8X8_BLOCK_VNNI(b, a, pf) q8x8_block_vnni(pf, w + (b), x + (b), xe + (b), a)
QORA_TARGET_AVX512 static void q8x8_vnni_decode(int nb, const block_q8x8* w, const block_q8* x, const qora_xblock* xe,
                                               float* out) {
    QORA_KX8_DECODE_WALK(sizeof(block_q8x8), QORA_Q8X8_BLOCK_VNNI);
}

/* four bytes at p in every 32-bit lane (an embedded broadcast of vpdpbusd's memory operand) */
QORA_TARGET_AVX512 static inline __m256i kx8_bcast32(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Q8_0 prefill: up to 8 tokens over blocks [0, nb) (a segment pass), q8x8_avx2_t's chains and order and
   its exact int32 dots, taken as sum((w + 128) x) - 128 sum(x): vpdpbusd gets the weights as unsigned
   (w ^ 0x80, once per vector for all the tokens) and each token's bytes as they are, broadcast from the
   activation block, so a token costs one broadcast and one vpdpbusd per 4 bytes; 128 sum(x) is
   -16 x the block's precomputed off (qora_xblock), and its d is the block's scale as float. */
QORA_TARGET_AVX512 QORA_INLINE void q8x8_vnni8_t(const int T, int nb, const block_q8x8* w, const char* x,
                                                 const qora_xblock* xe, size_t xs, float* out, size_t ldo) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const size_t xes = xs / sizeof(block_q8);
    __m256 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q8x8* g = w + b;
        q8x8_prefetch(g);
        __m256i s[8];
        for (int t = 0; t < T; t++) s[t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) {
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)g->qs[k]), flip);
            for (int t = 0; t < T; t++)
                s[t] = _mm256_dpbusd_epi32(s[t], v, kx8_bcast32(((const block_q8*)(x + t * xs) + b)->qs + 4 * k));
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d));
        for (int t = 0; t < T; t++) {
            const qora_xblock* e = xe + t * xes + b;
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(e->d)),
                                     _mm256_cvtepi32_ps(_mm256_add_epi32(s[t], _mm256_set1_epi32(16 * e->off))), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

QORA_TARGET_AVX512 static void q8x8_vnni_range(int nb, const block_q8x8* w, const char* x, const qora_xblock* xe,
                                               size_t xs, int nt, float* out, size_t ldo) {
#define QORA_Q8X8_VNNI_T(T) q8x8_vnni8_t(T, nb, w, x, xe, xs, out, ldo)
    QORA_KX8_SWITCH_T8(QORA_Q8X8_VNNI_T)
#undef QORA_Q8X8_VNNI_T
}

/* Q4_K / Q5_K prefill, up to 8 tokens a call: q45kx8_avx2_t's exact integers S and M and its two fmas per
   super-block (so the same bits), with vpdpbusd (the weights' unsigned 4/5-bit values against each token's
   bytes, broadcast from memory) summing a quarter's products straight into int32 where the AVX2 kernel
   takes vpmaddubsw + add: a weight vector is decoded once for 8 tokens, and a token costs two
   instructions per 32 weight bytes. S takes each quarter's sums times their scales (vpmulld); M comes from
   the block sums at the end, so a token holds three registers (lo, hi, S) in the loop. */
QORA_TARGET_AVX512 QORA_INLINE void q45kx8_vnni_t(const int Q5, const int T, int nb, const char* w, const char* x,
                                                  size_t xs, float* out, size_t ldo) {
    const int ahead = q45kx8_ahead(Q5, T);
    const size_t gb = Q5 ? sizeof(block_q5_Kx8) : sizeof(block_q4_Kx8);
    __m256 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q4_Kx8* g = (const block_q4_Kx8*)(w + (size_t)b * gb);
        const uint8_t(*qh)[8][4] = Q5 ? ((const block_q5_Kx8*)g)->qh : NULL;
        const block_q8K* xb[8];
        __m256i S[8];
        for (int t = 0; t < T; t++) {
            xb[t] = (const block_q8K*)(x + t * xs) + b;
            S[t] = _mm256_setzero_si256();
        }
        for (int p = 0; p < 4; p++) {
            const int lines = (int)((gb + 255) / 256); /* the block after next, a quarter per quarter */
            if (ahead) for (int i = lines * p; i < lines * (p + 1); i++) _mm_prefetch((const char*)g + 2 * gb + 64 * i, _MM_HINT_T0);
            __m256i lo[8], hi[8];
            for (int t = 0; t < T; t++) lo[t] = hi[t] = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
                __m256i wl, wh;
                q45kx8_values(Q5, g, qh, p, c, &wl, &wh);
                for (int t = 0; t < T; t++) {
                    const int8_t* xq = xb[t]->qs + 64 * p + 4 * c;
                    lo[t] = _mm256_dpbusd_epi32(lo[t], wl, kx8_bcast32(xq));
                    hi[t] = _mm256_dpbusd_epi32(hi[t], wh, kx8_bcast32(xq + 32));
                }
            }
            const __m256i sc0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)g->sc[2 * p]));
            const __m256i sc1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)g->sc[2 * p + 1]));
            for (int t = 0; t < T; t++)
                S[t] = _mm256_add_epi32(S[t], _mm256_add_epi32(_mm256_mullo_epi32(lo[t], sc0), _mm256_mullo_epi32(hi[t], sc1)));
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->dmin));
        __m256i mn[4];
        for (int p = 0; p < 4; p++) mn[p] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)g->mn[p]));
        for (int t = 0; t < T; t++) {
            int32_t bs[4]; /* the activation sums of sub-blocks (2p, 2p + 1) as int16 pairs */
            const __m128i s = _mm_hadd_epi16(_mm_loadu_si128((const __m128i*)xb[t]->bsums),
                                             _mm_loadu_si128((const __m128i*)(xb[t]->bsums + 8)));
            _mm_storeu_si128((__m128i*)bs, s);
            __m256i M = _mm256_setzero_si256();
            for (int p = 0; p < 4; p++) M = _mm256_add_epi32(M, _mm256_madd_epi16(mn[p], _mm256_set1_epi32(bs[p])));
            const __m256 dx = _mm256_set1_ps(xb[t]->d);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(S[t]), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(M), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

/* Q6_K prefill, up to 8 tokens: q6kx8_avx2_t's exact S and C and its fma (the same bits), with vpdpbusd
   (the unsigned q + 32 against the token's bytes) summing one sub-block at a time into int32 (each
   quarter's 4 steps of sub-block 4p + k, then S += sum x scale, vpmulld), so a token holds two registers
   in the loop (a, S) and a sub-block's values are decoded once for 8 tokens; C from the block sums. */
QORA_TARGET_AVX512 QORA_INLINE void q6kx8_vnni8_t(const int T, int nb, const char* w, const char* x, size_t xs,
                                                  float* out, size_t ldo) {
    __m256 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q6_Kx8* g = (const block_q6_Kx8*)w + b;
        const block_q8K* xb[8];
        __m256i S[8];
        for (int t = 0; t < T; t++) {
            xb[t] = (const block_q8K*)(x + t * xs) + b;
            S[t] = _mm256_setzero_si256();
        }
        for (int p = 0; p < 4; p++) {
            for (int i = 7 * p; i < 7 * p + 7; i++) _mm_prefetch((const char*)(g + 2) + 64 * i, _MM_HINT_T0);
            const __m256i r0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)g->sc[2 * p]));
            const __m256i r1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)g->sc[2 * p + 1]));
            const __m256i sc[4] = {_mm256_srai_epi32(_mm256_slli_epi32(r0, 16), 16), _mm256_srai_epi32(r0, 16),
                                   _mm256_srai_epi32(_mm256_slli_epi32(r1, 16), 16), _mm256_srai_epi32(r1, 16)};
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                __m256i a[8];
                for (int t = 0; t < T; t++) a[t] = _mm256_setzero_si256();
                _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
                    const __m256i q = q6kx8_value(g, p, c, k);
                    for (int t = 0; t < T; t++) a[t] = _mm256_dpbusd_epi32(a[t], q, kx8_bcast32(xb[t]->qs + 64 * p + 4 * c + 16 * k));
                }
                for (int t = 0; t < T; t++) S[t] = _mm256_add_epi32(S[t], _mm256_mullo_epi32(a[t], sc[k]));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g->d));
        __m256i w16[8]; /* the scales as int16, row by row in pairs of sub-blocks, for every token's C */
        for (int i = 0; i < 8; i++) w16[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)g->sc[i]));
        for (int t = 0; t < T; t++) {
            __m256i C = _mm256_setzero_si256();
            for (int p = 0; p < 4; p++)
                C = _mm256_add_epi32(C, _mm256_add_epi32(_mm256_madd_epi16(w16[2 * p], _mm256_set1_epi32(kx8_pair16(xb[t]->bsums + 4 * p))),
                                                         _mm256_madd_epi16(w16[2 * p + 1], _mm256_set1_epi32(kx8_pair16(xb[t]->bsums + 4 * p + 2)))));
            const __m256i sv = _mm256_sub_epi32(S[t], _mm256_slli_epi32(C, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb[t]->d)), _mm256_cvtepi32_ps(sv), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + t * ldo, acc[t]);
}

QORA_TARGET_AVX512 static void kx8_avx512(int dtype, int n, const void* w, const void* x, const qora_xblock* xe,
                                          size_t xs, int nt, float* out, size_t ldo) {
    if (dtype == QORA_Q8) {
        const block_q8x8* g = (const block_q8x8*)w;
        if (nt == 1) {
            q8x8_vnni_decode(n / QK, g, (const block_q8*)x, xe, out);
            return;
        }
        QORA_SEGMENT_PASSES(n / QK, nt, 8, out, ldo,
                            q8x8_vnni_range(nbs, g + b0, (const char*)x + b0 * sizeof(block_q8), xe + b0, xs, nt, dst, lddst));
        return;
    }
    const char *wc = (const char*)w, *xc = (const char*)x;
    if (nt > 1 && (dtype == QORA_Q4_K || dtype == QORA_Q5_K)) { /* prefill: up to 8 tokens, VNNI */
        const int q5 = dtype == QORA_Q5_K;
#define QORA_Q45KX8_VNNI_T(T) q45kx8_vnni_t(q5, T, n / QK_K, wc, xc, xs, out, ldo)
        QORA_KX8_SWITCH_T8(QORA_Q45KX8_VNNI_T)
#undef QORA_Q45KX8_VNNI_T
        return;
    }
    if (nt > 1 && dtype == QORA_Q6_K) {
#define QORA_Q6KX8_VNNI_T(T) q6kx8_vnni8_t(T, n / QK_K, wc, xc, xs, out, ldo)
        QORA_KX8_SWITCH_T8(QORA_Q6KX8_VNNI_T)
#undef QORA_Q6KX8_VNNI_T
        return;
    }
    /* decode of the K types: the AVX2 kernels compiled here (the same instructions, so the same bits) */
    switch (dtype) {
    QORA_KX8_K_CASES
    default: kx8_avx2(dtype, n, w, x, xe, xs, nt, out, ldo); return;
    }
}
#endif /* QORA_X86 */

/* Whether the ISA path has an 8-token prefill kernel for the type (AVX-512: Q4_K, Q5_K, Q6_K, Q8_0) */
static inline int qora_kx8_8tok(int isa, int dtype) {
#if QORA_X86
    return isa == QORA_ISA_AVX512 && (dtype == QORA_Q8 || dtype == QORA_Q4_K || dtype == QORA_Q5_K || dtype == QORA_Q6_K);
#else
    (void)isa;
    (void)dtype;
    return 0;
#endif
}

/* Whether prefill (several tokens) reads the x8 copy too: measured on the dev box (AVX2, 2048 x 2048, 64
   tokens), the x8 kernels are faster than the file-layout tiles for Q4_1 (1.4x) and even for Q5_0, but
   slower for Q4_K (0.82x) and Q6_K (0.91x), whose 4-token kernels run out of registers; those prefill
   from the file's rows on AVX2, which gives the same bits. Q8_0's AVX2 kernel, once it made |w| once per
   block for all its tokens, beats the tiles too (Zen 4 through the AVX2 path, 4096 x 2048, 64 tokens: 112
   vs 65 GOP/s; it had been 0.76x). On AVX-512 (32 registers, VNNI kernels) the x8 copies win for every
   type (Zen 4: pp64 2.4-2.6x; bench/NOTES.md). */
static inline int qora_kx8_prefill(int isa, int dtype) {
    return qora_kx8_8tok(isa, dtype) || dtype == QORA_Q8 || dtype == QORA_Q4_1 || dtype == QORA_Q5_0 || dtype == QORA_Q5_1;
}

/* Tokens an x8 kernel call takes (the unit's step) */
static inline int qora_kx8_max_t(int isa, int dtype) { return qora_kx8_8tok(isa, dtype) ? 8 : QORA_KX8_MAX_T; }

/* The x8 kernel of an ISA path, NULL where none exists (the matrices then stay in the file's layout).
   The AVX-512 path has its own prefill kernels for Q8_0 and the K types and Q8_0's decode; the rest are
   the AVX2 kernels: the same sums everywhere, so the same bits. */
static inline qora_kx8_fn qora_kx8_kernel(int isa) {
#if QORA_X86
    return isa == QORA_ISA_SCALAR ? kx8_scalar : isa == QORA_ISA_AVX512 ? kx8_avx512 : kx8_avx2;
#else
    (void)isa;
    return NULL;
#endif
}

#endif /* QORA_KQUANTS_REPACK_H */
