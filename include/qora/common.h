/* qora — shared C definitions: dtypes, block layouts, fp16 conversion, ISA target macros. */
#ifndef QORA_COMMON_H
#define QORA_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define QORA_X86 1
#include <immintrin.h>
#else
#define QORA_X86 0
#endif

/* Per-function ISA targets: one build carries every path; nothing above the
   baseline runs unless CPUID/XCR0 said so at run time. MSVC needs no attribute. */
#if defined(__GNUC__) || defined(__clang__)
#define QORA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QORA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define QORA_HAVE_AVXVNNI 1 /* the AVX-VNNI path (AVX2-only chips with vpdpbusd: Alder Lake and later) */
#define QORA_TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#else
#define QORA_TARGET_AVX2
#define QORA_TARGET_AVX512
#endif

/* aarch64 (GCC / clang): NEON (AdvSIMD) is the baseline of the architecture; the dotprod (sdot) and i8mm
   (smmla) paths carry target attributes like the x86 ones and run only where cpu_features.h saw them. */
#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define QORA_NEON 1
#include <arm_neon.h>
#if defined(__clang__)
#define QORA_TARGET_DOTPROD __attribute__((target("dotprod")))
#define QORA_TARGET_I8MM __attribute__((target("dotprod,i8mm")))
#else
#define QORA_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod"))) /* arm_neon.h's own pragma */
#define QORA_TARGET_I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#endif
/* clang before 16 declares the sdot / smmla intrinsics only when the whole file targets them (-march), and
   GCC has them from 8 (sdot) and 10 (smmla): older compilers leave those paths out (the table maps them
   to the best one below), unless -march gave them. */
#if defined(__clang__) ? (__clang_major__ >= 16 || defined(__ARM_FEATURE_DOTPROD)) : __GNUC__ >= 8
#define QORA_NEON_DOTPROD 1
#else
#define QORA_NEON_DOTPROD 0
#endif
#if QORA_NEON_DOTPROD && \
    (defined(__clang__) ? (__clang_major__ >= 16 || defined(__ARM_FEATURE_MATMUL_INT8)) : __GNUC__ >= 10)
#define QORA_NEON_I8MM 1
#else
#define QORA_NEON_I8MM 0
#endif
#else
#define QORA_NEON 0
#endif

#ifndef QORA_INLINE
#if defined(__GNUC__) || defined(__clang__)
#define QORA_INLINE static inline __attribute__((always_inline))
#else
#define QORA_INLINE static __forceinline
#endif
#endif

#if defined(_MSC_VER)
#define QORA_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define QORA_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

/* ---- dtypes (values shared with qora/dtypes.py through qora/_core/weights.pxi) ---- */
enum qora_dtype {
    QORA_F32 = 0, QORA_F16 = 1, QORA_Q8 = 2, QORA_Q4 = 3, QORA_Q4_1 = 4, QORA_Q5_0 = 5, QORA_Q5_1 = 6,
    QORA_Q4_K = 7, QORA_Q5_K = 8, QORA_Q6_K = 9, QORA_BF16 = 10, QORA_DTYPE_COUNT = 11
};

/* ---- block layouts, bit-identical to GGUF (Q4_0, Q8_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) ---- */
#define QK 32
#define QK_K 256
typedef struct {
    uint16_t d;          /* f16 scale */
    uint8_t qs[QK / 2];  /* element j in low nibble of byte j, element j+16 in the high nibble */
} block_q4;
QORA_STATIC_ASSERT(sizeof(block_q4) == 2 + QK / 2, "block_q4 must be 18 bytes");

typedef struct {
    uint16_t d;          /* f16 scale */
    int8_t qs[QK];
} block_q8;
QORA_STATIC_ASSERT(sizeof(block_q8) == 2 + QK, "block_q8 must be 34 bytes");

/* value e of a KV cache row (f16 halves, or Q8_0 blocks when Q8; e % 32 == 0 then): where the
   attention kernels find KV group g's slice (e = g * head_dim) */
QORA_INLINE const void* qora_kv_at(const int Q8, const void* row, size_t e) {
    return Q8 ? (const void*)((const block_q8*)row + e / QK) : (const void*)((const uint16_t*)row + e);
}

/* value = nibble * d + m */
typedef struct {
    uint16_t d, m;       /* f16 scale and minimum */
    uint8_t qs[QK / 2];  /* as block_q4 */
} block_q4_1;
QORA_STATIC_ASSERT(sizeof(block_q4_1) == 4 + QK / 2, "block_q4_1 must be 20 bytes");

/* 5-bit values: the low four bits as block_q4, bit 4 of element j in bit j of qh */
typedef struct {
    uint16_t d;          /* value = (q - 16) * d */
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} block_q5_0;
QORA_STATIC_ASSERT(sizeof(block_q5_0) == 6 + QK / 2, "block_q5_0 must be 22 bytes");

typedef struct {
    uint16_t d, m;       /* value = q * d + m */
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} block_q5_1;
QORA_STATIC_ASSERT(sizeof(block_q5_1) == 8 + QK / 2, "block_q5_1 must be 24 bytes");

/* K super-blocks of 256: eight sub-blocks of 32, each with a 6-bit scale and a 6-bit minimum packed
   in scales[12] (qora_kscale); value = d * sc_j * q - dmin * m_j. Q4_K: sub-blocks 2i and 2i+1 share
   the 32 bytes qs[32i..32i+32), low nibbles the first, high nibbles the second. */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
} block_q4_K;
QORA_STATIC_ASSERT(sizeof(block_q4_K) == 144, "block_q4_K must be 144 bytes");

/* Q4_K's layout plus bit 4 of element 32j + l in bit j of qh[l] */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K;
QORA_STATIC_ASSERT(sizeof(block_q5_K) == 176, "block_q5_K must be 176 bytes");

/* sixteen sub-blocks of 16 with int8 scales; value = d * scales[j] * (q - 32), q of 6 bits: per half of
   128 elements, element 32i + l (i < 4) has its low four bits in ql[l + 32 (i & 1)] (low nibble for
   i < 2, high for i >= 2) and its top two bits in bits 2i..2i+1 of qh[l] */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} block_q6_K;
QORA_STATIC_ASSERT(sizeof(block_q6_K) == 210, "block_q6_K must be 210 bytes");

/* the activations of the K types' integer products (llama.cpp's Q8_K): a float scale, 256 int8 and the
   sums of each 16 of them */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8K;
QORA_STATIC_ASSERT(sizeof(block_q8K) == 292, "block_q8K must be 292 bytes");

/* 6-bit scale and minimum of sub-block j (0..7) of a Q4_K / Q5_K super-block */
static inline void qora_kscale(const uint8_t* q, int j, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Per activation block, computed once when the activation is quantized so the
   inner loops only broadcast from memory: off = -8 * (sum of the int8 values),
   the Q4 offset folded into the integer dot; d = the block's scale as float. */
typedef struct {
    int32_t off;
    float d;
} qora_xblock;

/* ---- the one order of float operations every path follows ----
   Activations are rounded to Q8 before each quantized product, and that rounding is
   discontinuous: a 1-ulp difference in an input can move a value across a rounding
   boundary, and the model then drifts apart (measured: 5% of the logits' range on the
   demo model after 30 layers). So every kernel (scalar, AVX2, AVX-VNNI, AVX-512, AMX,
   repacked or not, any thread count) computes each output with the same operations in
   the same order, bit for bit, and only speed differs between them:
   - quantized row . activation: per block b an exact int32 dot isum_b and the scale
     d_b = f16(w.d) * f16(x.d) (exact in float: two 11-bit mantissas); the blocks form
     QORA_SEGS contiguous segments (qora_seg_begin), each a chain acc = fma(d_b, isum_b, acc)
     from +0, and the value is ((a0 + a1) + a2) + a3 (segments let decode walk four
     weight streams at once; prefill runs one pass per segment); the types with a minimum (Q4_1,
     Q5_1) follow each block's fma with acc = fma(m_b * d_x, xsum_b, acc), xsum_b the exact sum of
     the activation block's int8; Q5_0 is Q4_0's order with its 5-bit integers;
   - K type row . Q8_K activation (kquants.h): per super-block b the exact int32 S_b (the sub-block
     scales times their integer dots; Q6_K's -32 offset taken out with the activation's block sums)
     and, for Q4_K / Q5_K, M_b (the minimums times the activation's block sums); one chain from +0
     over the super-blocks in order: acc = fma(f16(d) * x.d, S_b, acc), then
     acc = fma(-(f16(dmin) * x.d), M_b, acc);
   - float activations (any block type): the weights dequantized with gguf-py's operations
     (qora_dequant_range: no fused steps), then the float dot below over the whole row;
   - float dot (norms, attention scores, f16/f32 weights): 32 fma chains by index mod 32,
     lane j + lane j+16, then qora_reduce16, then the n % 32 tail by fma in order;
   - attention (one query, one head): the cached positions go in chunks of QORA_ATT_CHUNK
     (forward.h; a fixed length, whatever the thread count), the last one ragged. Per chunk
     c: scores s_t = dot(k_t, q) * head_dim^-0.5, m_c = their max, e_t = qora_exp_neg(s_t - m_c),
     sum_c = 16 chains by index mod 16 then qora_reduce16, acc_c = fma chain over the chunk's
     positions of e_t * v_t from +0. The chunks fold in order: (M, S, o) = (m_0, sum_0, acc_0),
     then for c = 1, 2, ...: M' = max(M, m_c), a = qora_exp_neg(M - M'),
     b = qora_exp_neg(m_c - M'), S = fma(sum_c, b, S * a), o = fma(b, acc_c, o * a), M = M';
     the output is o * (1 / S). One chunk (up to QORA_ATT_CHUNK positions) is plain softmax
     attention. Decode spreads the chunks over the threads and folds afterwards; prefill folds
     as it goes: the same operations.
   Scalar code writes every fused step as fmaf() and never a*b+c (which a compiler may or
   may not contract). */
#define QORA_SEGS 4
static inline int qora_seg_begin(int nb, int i) { return i < QORA_SEGS ? i * (nb / QORA_SEGS) : nb; }

/* c[0..16) -> c[0]: halving, lane j + lane j+w for w = 8, 4, 2, 1 (a horizontal vector sum) */
static inline float qora_reduce16(float c[16]) {
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) c[j] = c[j] + c[j + w];
    return c[0];
}

/* e^x for x <= 0 (scores minus their max): Cephes' expf polynomial after x = n ln2 + r, with
   x clamped at -87 so 2^n stays a normal float built from its exponent bits. The vector
   versions (exp_avx2, exp_avx512) are these very operations lane by lane. */
#define QORA_EXP_MIN (-87.0f)
static inline float qora_exp_neg(float x) {
    x = fmaxf(x, QORA_EXP_MIN);
    const float n = nearbyintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.0f);
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

/* elements per block of a dtype (1: a plain float type) */
static inline int qora_block_elems(int dtype) {
    switch (dtype) {
    case QORA_Q8: case QORA_Q4: case QORA_Q4_1: case QORA_Q5_0: case QORA_Q5_1: return QK;
    case QORA_Q4_K: case QORA_Q5_K: case QORA_Q6_K: return QK_K;
    default: return 1;
    }
}

/* bytes of one row of `cols` elements */
static inline size_t qora_row_bytes(int dtype, int cols) {
    switch (dtype) {
    case QORA_F32: return (size_t)cols * 4;
    case QORA_F16:
    case QORA_BF16: return (size_t)cols * 2;
    case QORA_Q8: return (size_t)(cols / QK) * sizeof(block_q8);
    case QORA_Q4: return (size_t)(cols / QK) * sizeof(block_q4);
    case QORA_Q4_1: return (size_t)(cols / QK) * sizeof(block_q4_1);
    case QORA_Q5_0: return (size_t)(cols / QK) * sizeof(block_q5_0);
    case QORA_Q5_1: return (size_t)(cols / QK) * sizeof(block_q5_1);
    case QORA_Q4_K: return (size_t)(cols / QK_K) * sizeof(block_q4_K);
    case QORA_Q5_K: return (size_t)(cols / QK_K) * sizeof(block_q5_K);
    case QORA_Q6_K: return (size_t)(cols / QK_K) * sizeof(block_q6_K);
    default: return 0;
    }
}

/* ---- portable IEEE half <-> float (the scalar path must not need F16C) ---- */
static inline float qora_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t qora_fp32_to_fp16(float f) {
    /* round-to-nearest-even, as F16C and NumPy do */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* overflows to inf */
        return (uint16_t)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* subnormal half or zero */
        if (absx < 0x33000000u) return (uint16_t)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14 + (113 - e) */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (absx - 0x38000000u) >> 13;
    uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

#endif /* QORA_COMMON_H */
