#version 450
// Decode mat-vec: y = W x for one token, W in its stored type (DTYPE 0 f32, 1 f16, 2 q8, 3 q4).
// One workgroup computes R rows; thread t takes input units t, t+T, ... and uses each for all R rows,
// so the input is read (and, for Q4/Q8, quantized) once per workgroup and every weight byte once.
// Fused around the product, chosen by specialization constants:
//   NORM   the input is RMS-normalized first (attention / MLP / final norm)
//   MODE   STORE y = Wx, ADD y += Wx (residual), SWIGLU y = silu(Wg x) * (Wu x),
//          QKV: q, k, v rows with RoPE on q and k, k and v written straight into the KV cache
//          (f16 or f32: KV16) at the current position. Rows go in quads j, j+1, j+head_dim/2, j+1+head_dim/2 (j even):
//          the rotation pairs of two neighbours, so one thread writes whole f16 pairs.
// For Q4/Q8 the input is quantized to Q8 blocks exactly as the CPU engine does, and each block's
// integer dot product is exact in float (|sum| < 2^24), so the logits match the CPU's.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 64;
layout(constant_id = 1) const uint R = 4;  // QKV: a multiple of 4; SWIGLU: even
layout(constant_id = 2) const uint MODE = 0;
layout(constant_id = 3) const uint NORM = 0;
layout(constant_id = 4) const uint KV16 = 1;

layout(binding = 0) readonly buffer W4 { uvec4 w4[]; };
layout(binding = 0) readonly buffer W1 { uint w1[]; };
layout(binding = 0) readonly buffer WF { vec4 wf4[]; };
layout(binding = 1) readonly buffer X4 { vec4 x4[]; };
layout(binding = 2) readonly buffer NW { vec4 nw4[]; };
layout(binding = 3) buffer Y { float y[]; };
layout(binding = 4) writeonly buffer KC { uint kc[]; }; // KV16: f16 pairs
layout(binding = 4) writeonly buffer KCF { float kcf[]; };
layout(binding = 5) writeonly buffer VC { uint vc[]; };
layout(binding = 5) writeonly buffer VCF { float vcf[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) readonly buffer RC { float rope_cs[]; };

layout(push_constant) uniform PC {
    uint rows;     // rows of this chunk (SWIGLU: of the gate half; QKV: q_dim + 2 kv_dim)
    uint cols;
    uint x_off;    // first input element in x (a multiple of 4)
    uint y_off;    // output index of row 0
    float eps;
    uint q_dim;    // QKV only
    uint kv_dim;
    uint head_dim;
    uint use_rope;
} pc;

#if DTYPE >= 2
#define UNIT 32u
#elif DTYPE == 1
#define UNIT 8u
#else
#define UNIT 4u
#endif
#define XV (UNIT / 4u)

shared float red[R * 64u];
shared float fin[R];
shared float inv_rms;

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
    const uint xo = pc.x_off / 4u;

    // RMSNorm's 1/rms over the whole input (every workgroup computes it: cheaper than a dispatch)
    float xs = 1.0;
    if (NORM != 0u) {
        float ss = 0.0;
        for (uint i = tid; i < pc.cols / 4u; i += T) {
            vec4 v = x4[xo + i];
            ss += dot(v, v);
        }
        ss = subgroupAdd(ss);
        if (subgroupElect()) red[gl_SubgroupID] = ss;
        barrier();
        if (tid == 0u) {
            float t = 0.0;
            for (uint i = 0u; i < gl_NumSubgroups; i++) t += red[i];
            inv_rms = 1.0 / sqrt(t / float(pc.cols) + pc.eps);
        }
        barrier();
        xs = inv_rms;
    }

    float acc[R];
    for (uint s = 0u; s < R; s++) acc[s] = 0.0;

    for (uint u = tid; u < nu; u += T) {
        vec4 xv[XV];
        for (uint i = 0u; i < XV; i++) {
            vec4 v = x4[xo + u * XV + i];
            xv[i] = NORM != 0u ? nw4[u * XV + i] * (v * xs) : v;
        }
#if DTYPE >= 2
        // quantize this block of the input to Q8 (values kept as exact integer-valued floats)
        float amax = 0.0;
        for (uint i = 0u; i < XV; i++) {
            vec4 a = abs(xv[i]);
            amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
        }
        float dx, idx;
        q8_scales(amax, dx, idx);
        float xsum = 0.0;
        for (uint i = 0u; i < XV; i++) {
            xv[i] = roundEven(xv[i] * idx);
            xsum += (xv[i].x + xv[i].y) + (xv[i].z + xv[i].w);
        }
        // reorder and pre-scale to match NIB4 / BYTE4 (see common.glsl)
        vec4 xm[8];
#if DTYPE == 3
        // word c of a block: low nibbles = elements 4c..4c+3, high nibbles = 16+4c..16+4c+3
        for (uint c = 0u; c < 4u; c++)
            for (uint p = 0u; p < 2u; p++)
                xm[2u * c + p] = vec4(xv[c][2u * p], xv[4u + c][2u * p] * (1.0 / 16.0),
                                      xv[c][2u * p + 1u] * (1.0 / 256.0), xv[4u + c][2u * p + 1u] * (1.0 / 4096.0));
#else
        // word c of a block: elements 4c..4c+3
        for (uint c = 0u; c < 8u; c++) xm[c] = xv[c] * vec4(1.0, 1.0 / 256.0, 1.0, 1.0 / 256.0);
#endif
#endif
        for (uint s = 0u; s < R; s++) {
            uint row;
            if (!slot_row(wg, s, row)) continue;
            const uint blk = row * nu + u;
#if DTYPE == 3
            uvec4 q = w4[blk];
            float dw = SCALE_AT(w1, stored_rows * nu * 4u, blk);
            // sum (n - 8) x = sum n x - 8 sum x; every product and partial sum is an exact integer
            float isum = 0.0;
            for (uint c = 0u; c < 4u; c++)
                isum += dot(NIB4(uvec4(q[c])), xm[2u * c]) + dot(NIB4(uvec4(q[c] >> 16)), xm[2u * c + 1u]);
            acc[s] += (isum - 8.0 * xsum) * (dw * dx);
#elif DTYPE == 2
            uvec4 a = w4[2u * blk], b = w4[2u * blk + 1u];
            float dw = SCALE_AT(w1, stored_rows * nu * 8u, blk);
            // bytes come out as b + 128: subtract 128 sum x
            float isum = 0.0;
            for (uint c = 0u; c < 4u; c++) isum += dot(BYTE4(a[c]), xm[c]) + dot(BYTE4(b[c]), xm[4u + c]);
            acc[s] += (isum - 128.0 * xsum) * (dw * dx);
#elif DTYPE == 1
            uvec4 q = w4[blk];
            acc[s] += dot(vec4(unpackHalf2x16(q.x), unpackHalf2x16(q.y)), xv[0]) +
                      dot(vec4(unpackHalf2x16(q.z), unpackHalf2x16(q.w)), xv[1]);
#else
            acc[s] += dot(wf4[blk], xv[0]);
#endif
        }
    }

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
            uint ra = head * pc.head_dim + j; // rows ra, ra+1 and their partners ra+half, ra+1+half
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
            if (ra < pc.q_dim) {
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
}
