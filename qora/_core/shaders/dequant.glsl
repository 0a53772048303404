// qora — the weight types, one place: how each DTYPE is laid out on the device and decoded
// (included after common.glsl by the shaders that read weights, which declare binding 0 as
// w4 (uvec4) and w1 (uint)). The DTYPE numbers are enum qora_dtype's (qora/dtypes.py):
//   0 f32  1 f16  2 q8 (Q8_0)  3 q4 (Q4_0)  4 q4_1  5 q5_0  6 q5_1  7 q4_k  8 q5_k  9 q6_k  10 bf16
//
// Device layout of a chunk of `rows` rows, nb = cols / BLK blocks a row (qora_vk.c packs it at upload
// from the GGUF blocks as stored): a main region of MAINV uvec4 per block (the block's quants; the
// K types' whole block up to Q6_K's trailing scale), then a meta region starting at word
// rows * nb * MAINV * 4:
//   q4, q8   one f16 scale per block (SCALE_AT)          q4_1  one word per block: d | m << 16
//   q5_0     two words: qh, d                            q5_1  two words: qh, d | m << 16
//   q6_k     one word: d                                 q4_k, q5_k: none (the block is 9 / 11 uvec4)
// so every main load is an aligned 16-byte load and no 8/16-bit storage feature is needed.
//
// Two uses: deq32 gives 32 consecutive elements of a row as floats, with gguf-py's float
// operations unfused (`precise`), so the values are gguf.quants.dequantize's bit for bit (embedding,
// prefill tiles); unit_dot is the decode mat-vec's product of one row's UNIT-element piece with float
// activations, the block's integer dots summed first and scaled once.

#ifndef FACT
#define FACT 0 // 1: Q4_0 / Q8_0 weights with float activations (the "f32" precision)
#endif
// Q4_0 / Q8_0 with Q8 activations and exact integer block sums (the "q8" precision)
#define INTQ ((DTYPE == 2 || DTYPE == 3) && FACT == 0)
// a block-quantized type with float activations
#define FLOATQ (DTYPE >= 2 && DTYPE <= 9 && !INTQ)

#if DTYPE == 2
#define MAINV 2u
#elif DTYPE == 7
#define MAINV 9u
#elif DTYPE == 8
#define MAINV 11u
#elif DTYPE == 9
#define MAINV 13u
#else
#define MAINV 1u
#endif
#if DTYPE == 5 || DTYPE == 6
#define META 2u
#else
#define META 1u
#endif
#if DTYPE >= 7 && DTYPE <= 9
#define BLK 256u
#define UNITQ 64u // decode: elements per piece a thread takes (a quarter super-block)
#else
#define BLK 32u
#define UNITQ 32u
#endif

// Small integers (< 2^23) to floats without an int->float conversion (a quarter-rate instruction on
// many GPUs): OR-ed into the mantissa of 2^23, minus 2^23 (common.glsl's MAGIC), exact.
vec4 u2f(uvec4 v) { return uintBitsToFloat(v | MAGIC) - MAGIC_F; }
// the 4 bytes of a word, the low and high nibbles of each
uvec4 bytes4(uint w) { return (uvec4(w) >> uvec4(0u, 8u, 16u, 24u)) & 0xFFu; }
uvec4 ulo4(uint w) { return (uvec4(w) >> uvec4(0u, 8u, 16u, 24u)) & 0xFu; }
uvec4 uhi4(uint w) { return (uvec4(w) >> uvec4(4u, 12u, 20u, 28u)) & 0xFu; }
vec4 lo4(uint w) { return u2f(ulo4(w)); }
vec4 hi4(uint w) { return u2f(uhi4(w)); }
// bit `s` of each byte of w, times 16 (the fifth bit of a 5-bit value)
uvec4 ubit4(uint w, uint s) { return ((uvec4(w) >> (uvec4(0u, 8u, 16u, 24u) + s)) & 1u) << 4u; }
// bits 4e + s (e = 0..3) of qh, times 16: the fifth bits of elements 4c.. of a Q5_0/Q5_1 block
uvec4 uqhbit4(uint qh, uint first) { return ((uvec4(qh) >> (uvec4(0u, 1u, 2u, 3u) + first)) & 1u) << 4u; }
// byte i of a uvec4 (the K types' scale bytes)
uint byte_at(uvec4 v, uint i) { return (v[i >> 2] >> (8u * (i & 3u))) & 0xFFu; }
// the 6-bit scale and min of sub-block j of a Q4_K / Q5_K block (llama.cpp's get_scale_min_k4),
// h = the block's first uvec4 (d, dmin, then the 12 scale bytes as bytes 4..15)
void kscale(uvec4 h, uint j, out float sc, out float mn) {
    if (j < 4u) {
        sc = float(byte_at(h, 4u + j) & 63u);
        mn = float(byte_at(h, 8u + j) & 63u);
    } else {
        sc = float((byte_at(h, 8u + j) & 0xFu) | ((byte_at(h, j) >> 6) << 4));
        mn = float((byte_at(h, 8u + j) >> 4) | ((byte_at(h, 4u + j) >> 6) << 4));
    }
}
int sbyte(uvec4 v, uint i) { return bitfieldExtract(int(v[i >> 2]), int(8u * (i & 3u)), 8); }

// ---------------------------------------------------------------- deq32

#if DTYPE >= 2 && DTYPE <= 9
// Elements [k0, k0 + 32) (k0 % 32 == 0) of row r of a chunk of `rows` rows and `cols` columns.
void deq32(uint rows, uint cols, uint r, uint k0, out float v[32]) {
    const uint nb = cols / BLK, blk = r * nb + k0 / BLK;
    const uint mbase = rows * nb * MAINV * 4u;
#if DTYPE == 3
    const uvec4 q = w4[blk];
    const float d = SCALE_AT(w1, mbase, blk);
    for (uint c = 0u; c < 4u; c++) {
        const vec4 lo = (lo4(q[c]) - 8.0) * d, hi = (hi4(q[c]) - 8.0) * d;
        for (uint e = 0u; e < 4u; e++) {
            v[4u * c + e] = lo[e];
            v[16u + 4u * c + e] = hi[e];
        }
    }
#elif DTYPE == 2
    const float d = SCALE_AT(w1, mbase, blk);
    for (uint h = 0u; h < 2u; h++) {
        const uvec4 q = w4[2u * blk + h];
        for (uint c = 0u; c < 4u; c++) {
            const vec4 e4 = I8X4(q[c]) * d;
            for (uint e = 0u; e < 4u; e++) v[16u * h + 4u * c + e] = e4[e];
        }
    }
#elif DTYPE == 4 || DTYPE == 5 || DTYPE == 6
    const uvec4 q = w4[blk];
    const uint qh = DTYPE == 4 ? 0u : w1[mbase + META * blk];
    const vec2 dm = unpackHalf2x16(w1[mbase + META * blk + META - 1u]);
    for (uint c = 0u; c < 4u; c++) {
#if DTYPE == 4
        const vec4 lo = lo4(q[c]), hi = hi4(q[c]);
#else
        const vec4 lo = u2f(ulo4(q[c]) | uqhbit4(qh, 4u * c)), hi = u2f(uhi4(q[c]) | uqhbit4(qh, 16u + 4u * c));
#endif
#if DTYPE == 5
        precise vec4 a = dm.x * (lo - 16.0), b = dm.x * (hi - 16.0);
#else
        precise vec4 a = dm.x * lo + dm.y, b = dm.x * hi + dm.y;
#endif
        for (uint e = 0u; e < 4u; e++) {
            v[4u * c + e] = a[e];
            v[16u + 4u * c + e] = b[e];
        }
    }
#elif DTYPE == 7 || DTYPE == 8
    const uint j = (k0 % 256u) / 32u, base = blk * MAINV;
    const uvec4 h = w4[base];
    const vec2 dd = unpackHalf2x16(h.x);
    float sc, mn;
    kscale(h, j, sc, mn);
    precise float ds = dd.x * sc, dmn = dd.y * mn;
    const uint qs = base + (DTYPE == 7 ? 1u : 3u) + 2u * (j / 2u);
    for (uint hh = 0u; hh < 2u; hh++) {
        const uvec4 q = w4[qs + hh];
#if DTYPE == 8
        const uvec4 qhv = w4[base + 1u + hh];
#endif
        for (uint c = 0u; c < 4u; c++) {
            uvec4 nu = (j & 1u) != 0u ? uhi4(q[c]) : ulo4(q[c]);
#if DTYPE == 8
            nu |= ubit4(qhv[c], j);
#endif
            const vec4 n = u2f(nu);
            precise vec4 a = ds * n - dmn;
            for (uint e = 0u; e < 4u; e++) v[16u * hh + 4u * c + e] = a[e];
        }
    }
#else // DTYPE == 9, Q6_K: sub-block j is quarter i of half hf (elements 128 hf + 32 i + l)
    const uint j = (k0 % 256u) / 32u, base = blk * MAINV, hf = j / 4u, i = j % 4u;
    const float d = unpackHalf2x16(w1[mbase + blk]).x;
    const uvec4 scv = w4[base + 12u];
    for (uint hh = 0u; hh < 2u; hh++) { // l = 16 hh .. 16 hh + 15
        const uvec4 ql = w4[base + 4u * hf + 2u * (i & 1u) + hh];
        const uvec4 qh = w4[base + 8u + 2u * hf + hh];
        precise float ds = d * float(sbyte(scv, 8u * hf + 2u * i + hh));
        for (uint c = 0u; c < 4u; c++) {
            const uvec4 lo = i < 2u ? ulo4(ql[c]) : uhi4(ql[c]);
            const vec4 n = u2f(lo | (((bytes4(qh[c]) >> (2u * i)) & 3u) << 4u)) - 32.0;
            precise vec4 a = ds * n;
            for (uint e = 0u; e < 4u; e++) v[16u * hh + 4u * c + e] = a[e];
        }
    }
#endif
}
#endif

// ---------------------------------------------------------------- unit_dot

#if FLOATQ
#define XV (UNITQ / 4u)
// The activations of decode piece u (UNITQ elements), vec4 k of them at element unit_x(u, k) * 4.
// Contiguous but for Q6_K, whose quarter super-block is 4 runs of 16 elements 32 apart.
uint unit_x(uint u, uint k) {
#if DTYPE == 9
    const uint b = u / 4u, q = u % 4u;
    return (256u * b + 128u * (q / 2u) + 16u * (q % 2u) + 32u * (k / 4u)) / 4u + k % 4u;
#else
    return u * XV + k;
#endif
}

// Row `row`'s piece u dotted with x (xs: sums of x's groups of 16 (K types) or 32 (others) elements,
// as vec4 components; nb blocks a row, meta region at word mbase).
float unit_dot(uint row, uint u, uint nb, uint mbase, vec4 x[XV], vec4 xs) {
#if DTYPE <= 6
    const uint blk = row * nb + u;
#if DTYPE == 2
    const float d = SCALE_AT(w1, mbase, blk);
    const uvec4 a = w4[2u * blk], b = w4[2u * blk + 1u];
    float s = 0.0;
    for (uint c = 0u; c < 4u; c++) s += dot(I8X4(a[c]), x[c]) + dot(I8X4(b[c]), x[4u + c]);
    return d * s;
#else
    const uvec4 q = w4[blk];
    float s = 0.0;
#if DTYPE == 3 || DTYPE == 4
    for (uint c = 0u; c < 4u; c++) s += dot(lo4(q[c]), x[c]) + dot(hi4(q[c]), x[4u + c]);
#else
    const uint qh = w1[mbase + 2u * blk];
    for (uint c = 0u; c < 4u; c++)
        s += dot(u2f(ulo4(q[c]) | uqhbit4(qh, 4u * c)), x[c]) + dot(u2f(uhi4(q[c]) | uqhbit4(qh, 16u + 4u * c)), x[4u + c]);
#endif
#if DTYPE == 3
    return SCALE_AT(w1, mbase, blk) * (s - 8.0 * xs.x);
#elif DTYPE == 5
    return unpackHalf2x16(w1[mbase + 2u * blk + 1u]).x * (s - 16.0 * xs.x);
#else
    const vec2 dm = unpackHalf2x16(w1[mbase + META * blk + META - 1u]);
    return dm.x * s + dm.y * xs.x;
#endif
#endif
#elif DTYPE == 7 || DTYPE == 8
    // sub-blocks 2p (low nibbles of 32 qs bytes) and 2p + 1 (high nibbles)
    const uint b = u / 4u, p = u % 4u, base = (row * nb + b) * MAINV;
    const uvec4 h = w4[base];
    const uint qs = base + (DTYPE == 7 ? 1u : 3u) + 2u * p;
    float s0 = 0.0, s1 = 0.0;
    for (uint hh = 0u; hh < 2u; hh++) {
        const uvec4 q = w4[qs + hh];
#if DTYPE == 8
        const uvec4 qhv = w4[base + 1u + hh];
#endif
        for (uint c = 0u; c < 4u; c++) {
#if DTYPE == 8
            const vec4 l = u2f(ulo4(q[c]) | ubit4(qhv[c], 2u * p)), hi = u2f(uhi4(q[c]) | ubit4(qhv[c], 2u * p + 1u));
#else
            const vec4 l = lo4(q[c]), hi = hi4(q[c]);
#endif
            s0 += dot(l, x[4u * hh + c]);
            s1 += dot(hi, x[8u + 4u * hh + c]);
        }
    }
    float sc0, m0, sc1, m1;
    kscale(h, 2u * p, sc0, m0);
    kscale(h, 2u * p + 1u, sc1, m1);
    const vec2 dd = unpackHalf2x16(h.x);
    return dd.x * (sc0 * s0 + sc1 * s1) - dd.y * (m0 * (xs.x + xs.y) + m1 * (xs.z + xs.w));
#else // Q6_K: runs g = 0..3 of 16 elements, ql low/high nibbles and qh bit pairs 2g
    const uint b = u / 4u, qq = u % 4u, hf = qq / 2u, i = qq % 2u, blk = row * nb + b, base = blk * MAINV;
    const uvec4 qa = w4[base + 4u * hf + i], qb = w4[base + 4u * hf + 2u + i];
    const uvec4 qh = w4[base + 8u + 2u * hf + i];
    const uvec4 scv = w4[base + 12u];
    vec4 s = vec4(0.0);
    for (uint c = 0u; c < 4u; c++) {
        const uvec4 hb = bytes4(qh[c]);
        s.x += dot(u2f(ulo4(qa[c]) | ((hb & 3u) << 4u)), x[c]);
        s.y += dot(u2f(ulo4(qb[c]) | (((hb >> 2u) & 3u) << 4u)), x[4u + c]);
        s.z += dot(u2f(uhi4(qa[c]) | (((hb >> 4u) & 3u) << 4u)), x[8u + c]);
        s.w += dot(u2f(uhi4(qb[c]) | ((hb >> 6u) << 4u)), x[12u + c]);
    }
    const uint s0 = 8u * hf + i;
    const vec4 sc = vec4(sbyte(scv, s0), sbyte(scv, s0 + 2u), sbyte(scv, s0 + 4u), sbyte(scv, s0 + 6u));
    return unpackHalf2x16(w1[mbase + blk]).x * dot(sc, s - 32.0 * xs);
#endif
}

// The sums xs of unit_dot's activation groups.
vec4 unit_sums(vec4 x[XV]) {
#if DTYPE >= 7
    vec4 g = vec4(0.0);
    for (uint k = 0u; k < 4u; k++) g[k] = dot((x[4u * k] + x[4u * k + 1u]) + (x[4u * k + 2u] + x[4u * k + 3u]), vec4(1.0));
    return g;
#else
    vec4 t = vec4(0.0);
    for (uint k = 0u; k < 8u; k++) t += x[k];
    return vec4(dot(t, vec4(1.0)), 0.0, 0.0, 0.0);
#endif
}
#endif
