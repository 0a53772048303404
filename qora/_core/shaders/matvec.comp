#version 450
// Decode mat-vec: y = W x for one token, W in its stored type (DTYPE: dequant.glsl).
// The input was prepared once for the token (act.glsl): Q8 blocks (packed int8 + scale + sum) for
// Q4/Q8 weights in the "q8" precision (INTQ), floats for every other type and precision. One
// workgroup computes R rows; thread t takes input pieces t, t+T, ... (a block, a quarter K
// super-block, 8 or 4 floats) and uses each for all R rows, so every weight byte is read once. INTQ:
// each block dot is an exact integer sum (the CPU engine's arithmetic; DOT=1 uses the device's
// packed 4x8 dot); FLOATQ: the block's quants dotted with the float input, scaled once per block.
// Around the product, by specialization constants:
//   MODE   STORE y = Wx, ADD y += Wx (residual), SWIGLU y = silu(Wg x) * (Wu x),
//          QKV: q, k, v rows with RoPE on q and k, k and v written straight into the KV cache
//          (f16 or f32: KV16) at the current position; a Q8_0 cache (KV16 = 2) gets k and v into y as
//          q (rope_kv.comp quantizes them next, whole blocks at a time). Rows go in quads j, j+1, j+head_dim/2, j+1+head_dim/2 (j even):
//          the rotation pairs of two neighbours, so one thread writes whole f16 pairs.
//   EPI    0, or the next product's input is prepared from the finished y into the other half of
//          binding 8: 1 quantize (by the last workgroup to finish each Q8 block of y, where a
//          workgroup's rows lie in one block), 2 RMS-normalize with NQ and quantize (by the last
//          workgroup to finish).
#if DOT
#extension GL_EXT_spirv_intrinsics : require
#endif
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 64;
layout(constant_id = 1) const uint R = 4;  // QKV: a multiple of 4; SWIGLU: even
layout(constant_id = 2) const uint MODE = 0;
layout(constant_id = 3) const uint EPI = 0;
layout(constant_id = 4) const uint KV16 = 1;

#include "act.glsl"

layout(binding = 0) readonly buffer W4 { uvec4 w4[]; };
layout(binding = 0) readonly buffer W1 { uint w1[]; };
layout(binding = 0) readonly buffer WF { vec4 wf4[]; };
layout(binding = 4) writeonly buffer KC { uint kc[]; }; // KV16: f16 pairs
layout(binding = 4) writeonly buffer KCF { float kcf[]; };
layout(binding = 5) writeonly buffer VC { uint vc[]; };
layout(binding = 5) writeonly buffer VCF { float vcf[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) readonly buffer RC { float rope_cs[]; };

layout(push_constant) uniform PC {
    uint rows;     // rows of this chunk (SWIGLU: of the gate half; QKV: q_dim + 2 kv_dim)
    uint cols;
    uint in_base;  // the activation half holding the input (words)
    uint y_off;    // output index of row 0
    uint act_w;
    uint q_dim;    // QKV only
    uint kv_dim;
    uint head_dim;
    uint use_rope;
    uint epi_n;    // EPI: elements of y to prepare, into the half at out_base
    uint out_base;
    float eps;
    uint row0;     // QKV: the q|k|v row of this dispatch's row 0 (q, k, v stored in different types)
} pc;

#include "dequant.glsl"

#if INTQ
#define UNIT 32u
#elif FLOATQ
#define UNIT UNITQ
#elif DTYPE == 1 || DTYPE == 10
#define UNIT 8u
#else
#define UNIT 4u
#endif

// 8 halves (f16 or bf16) of a uvec4 as two vec4
#if DTYPE == 10
#define HALF2(w) vec2(uintBitsToFloat((w) << 16), uintBitsToFloat((w) & 0xFFFF0000u))
#else
#define HALF2(w) unpackHalf2x16(w)
#endif

#if DOT
// OpSDot on 4 packed signed bytes (SPV_KHR_integer_dot_product; glslang of Debian 12 predates
// GL_EXT_integer_dot_product, so the instruction is named directly)
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4450)
int sdot4x8(int a, int b, spirv_literal int fmt);
int dot4(uint a, uint b) { return sdot4x8(int(a), int(b), 0); }
#else
int dot4(uint a, uint b) {
    ivec4 va = ivec4(bitfieldExtract(int(a), 0, 8), bitfieldExtract(int(a), 8, 8), bitfieldExtract(int(a), 16, 8),
                     bitfieldExtract(int(a), 24, 8));
    ivec4 vb = ivec4(bitfieldExtract(int(b), 0, 8), bitfieldExtract(int(b), 8, 8), bitfieldExtract(int(b), 16, 8),
                     bitfieldExtract(int(b), 24, 8));
    return (va.x * vb.x + va.y * vb.y) + (va.z * vb.z + va.w * vb.w);
}
#endif

shared float red[R * 64u];
shared float fin[R];

// The weight row that slot s of workgroup wg computes; false past the end.
bool slot_row(uint wg, uint s, out uint row) {
    if (MODE == MODE_QKV) {
        uint quad = wg * (R / 4u) + s / 4u;
        uint qh = pc.head_dim / 4u; // quads per head
        uint head = quad / qh;
        row = head * pc.head_dim + 2u * (quad - head * qh) + (s & 1u) + ((s >> 1) & 1u) * (pc.head_dim / 2u);
        return quad < pc.rows / 4u;
    }
    if (MODE == MODE_SWIGLU) {
        uint h = R / 2u;
        uint r = wg * h + (s % h);
        row = s < h ? r : pc.rows + r; // up rows follow the gate rows
        return r < pc.rows;
    }
    row = wg * R + s;
    return row < pc.rows;
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint wg = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x; // >65535 groups
    const uint stored_rows = MODE == MODE_SWIGLU ? 2u * pc.rows : pc.rows;
    const uint nu = pc.cols / UNIT;

    uint rowv[R];
    bool live[R];
    for (uint s = 0u; s < R; s++) {
        live[s] = slot_row(wg, s, rowv[s]);
        if (!live[s]) rowv[s] = 0u; // computed and dropped: no branch between the R loads
    }

    float acc[R];
    for (uint s = 0u; s < R; s++) acc[s] = 0.0;

#if INTQ
    const uint qb = act_q4(pc.in_base, pc.act_w), db = act_d2(pc.in_base, pc.act_w);
    const uint sbase = stored_rows * nu * (DTYPE == 3 ? 4u : 8u); // first scale word
    for (uint u = tid; u < nu; u += T) {
        const uvec4 xa = aq4[qb + 2u * u], xb = aq4[qb + 2u * u + 1u]; // elements 0..15, 16..31
        const vec2 xd = ad2[db + u];                                   // scale, sum of the ints
        for (uint s = 0u; s < R; s++) {
            const uint blk = rowv[s] * nu + u;
            const float dw = SCALE_AT(w1, sbase, blk);
#if DTYPE == 3
            // word c: low nibbles = elements 4c..4c+3, high nibbles = 16+4c..; sum (n-8) x = sum n x - 8 sum x
            const uvec4 q = w4[blk];
            const uvec4 lo = q & 0x0F0F0F0Fu, hi = (q >> 4) & 0x0F0F0F0Fu;
            int isum = (dot4(lo.x, xa.x) + dot4(lo.y, xa.y)) + (dot4(lo.z, xa.z) + dot4(lo.w, xa.w)) +
                       (dot4(hi.x, xb.x) + dot4(hi.y, xb.y)) + (dot4(hi.z, xb.z) + dot4(hi.w, xb.w));
            acc[s] += (float(isum) - 8.0 * xd.y) * (dw * xd.x);
#else
            const uvec4 a = w4[2u * blk], b = w4[2u * blk + 1u];
            int isum = (dot4(a.x, xa.x) + dot4(a.y, xa.y)) + (dot4(a.z, xa.z) + dot4(a.w, xa.w)) +
                       (dot4(b.x, xb.x) + dot4(b.y, xb.y)) + (dot4(b.z, xb.z) + dot4(b.w, xb.w));
            acc[s] += float(isum) * (dw * xd.x);
#endif
        }
    }
#elif FLOATQ
    const uint xf = pc.in_base / 4u, nb = pc.cols / BLK, mbase = stored_rows * nb * MAINV * 4u;
    for (uint u = tid; u < nu; u += T) {
        vec4 x[XV];
        for (uint k = 0u; k < XV; k++) x[k] = af4[xf + unit_x(u, k)];
        const vec4 xs = unit_sums(x);
        for (uint s = 0u; s < R; s++) acc[s] += unit_dot(rowv[s], u, nb, mbase, x, xs);
    }
#else
    const uint xf = pc.in_base / 4u;
    for (uint u = tid; u < nu; u += T) {
#if DTYPE == 1 || DTYPE == 10
        const vec4 x0 = af4[xf + 2u * u], x1 = af4[xf + 2u * u + 1u];
#else
        const vec4 x0 = af4[xf + u];
#endif
        for (uint s = 0u; s < R; s++) {
            const uint blk = rowv[s] * nu + u;
#if DTYPE == 1 || DTYPE == 10
            uvec4 q = w4[blk];
            acc[s] += dot(vec4(HALF2(q.x), HALF2(q.y)), x0) + dot(vec4(HALF2(q.z), HALF2(q.w)), x1);
#else
            acc[s] += dot(wf4[blk], x0);
#endif
        }
    }
#endif

    // workgroup sums: subgroup adds, then one partial per subgroup through shared memory
    for (uint s = 0u; s < R; s++) {
        float v = subgroupAdd(acc[s]);
        if (subgroupElect()) red[s * 64u + gl_SubgroupID] = v;
    }
    barrier();
    if (tid < R) {
        float t = 0.0;
        for (uint i = 0u; i < gl_NumSubgroups; i++) t += red[tid * 64u + i];
        fin[tid] = t;
    }
    barrier();

    if (MODE == MODE_STORE || MODE == MODE_ADD) {
        uint row = wg * R + tid;
        if (tid < R && row < pc.rows) {
            if (MODE == MODE_ADD)
                y[pc.y_off + row] += fin[tid];
            else
                y[pc.y_off + row] = fin[tid];
        }
    } else if (MODE == MODE_SWIGLU) {
        uint row = wg * (R / 2u) + tid;
        if (tid < R / 2u && row < pc.rows) y[pc.y_off + row] = silu_mul(fin[tid], fin[R / 2u + tid]);
    } else {
        uint quad = wg * (R / 4u) + tid;
        if (tid < R / 4u && quad < pc.rows / 4u) {
            uint half_ = pc.head_dim / 2u, qh = pc.head_dim / 4u;
            uint head = quad / qh;
            uint j = 2u * (quad - head * qh);
            uint ra = pc.row0 + head * pc.head_dim + j; // rows ra, ra+1 and their partners ra+half, ra+1+half
            float a0 = fin[4u * tid], a1 = fin[4u * tid + 1u], b0 = fin[4u * tid + 2u], b1 = fin[4u * tid + 3u];
            if (ra < pc.q_dim + pc.kv_dim && pc.use_rope != 0u) { // RoPE (rotate-half) on q and k
                float c0 = rope_cs[2u * j], s0 = rope_cs[2u * j + 1u];
                float c1 = rope_cs[2u * j + 2u], s1 = rope_cs[2u * j + 3u];
                float t0 = a0 * c0 - b0 * s0, t1 = a1 * c1 - b1 * s1;
                b0 = b0 * c0 + a0 * s0;
                b1 = b1 * c1 + a1 * s1;
                a0 = t0;
                a1 = t1;
            }
            uint pos = params[0];
            if (ra < pc.q_dim || KV16 == 2u) {
                y[pc.y_off + ra] = a0;
                y[pc.y_off + ra + 1u] = a1;
                y[pc.y_off + ra + half_] = b0;
                y[pc.y_off + ra + half_ + 1u] = b1;
            } else if (ra < pc.q_dim + pc.kv_dim) {
                uint o = pos * pc.kv_dim + ra - pc.q_dim;
                if (KV16 != 0u) {
                    kc[o / 2u] = pack_f16x2(a0, a1);
                    kc[(o + half_) / 2u] = pack_f16x2(b0, b1);
                } else {
                    kcf[o] = a0;
                    kcf[o + 1u] = a1;
                    kcf[o + half_] = b0;
                    kcf[o + half_ + 1u] = b1;
                }
            } else {
                uint o = pos * pc.kv_dim + ra - pc.q_dim - pc.kv_dim;
                if (KV16 != 0u) {
                    vc[o / 2u] = pack_f16x2(a0, a1);
                    vc[(o + half_) / 2u] = pack_f16x2(b0, b1);
                } else {
                    vcf[o] = a0;
                    vcf[o + 1u] = a1;
                    vcf[o + half_] = b0;
                    vcf[o + half_ + 1u] = b1;
                }
            }
        }
    }

    const uint outs = MODE == MODE_SWIGLU ? R / 2u : R; // outputs per workgroup (STORE, ADD, SWIGLU)
    if (EPI == 1u && MODE != MODE_QKV && 32u % outs == 0u && pc.epi_n % 32u == 0u) {
        const uint b = wg * outs / 32u; // this workgroup's Q8 block of y; slots 1.. count its workgroups
        if (b < pc.epi_n / 32u && act_arrive_last(1u + b, 32u / outs))
            act_fill(32u, 32u * b, 32u * b, pc.out_base, pc.act_w, false, pc.eps);
    } else if (EPI != 0u && act_arrive_last(0u, gl_NumWorkGroups.x * gl_NumWorkGroups.y)) {
        act_fill(pc.epi_n, 0u, 0u, pc.out_base, pc.act_w, EPI == 2u, pc.eps);
    }
}
