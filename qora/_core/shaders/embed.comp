#version 450
// Embedding lookup: each token's row of the (possibly row-chunked) table, dequantized to float.
// One workgroup per token; a chunk's dispatch writes only the tokens whose rows it holds.
#include "common.glsl"

layout(local_size_x = 64) in;

layout(binding = 0) readonly buffer W4 { uvec4 w4[]; };
layout(binding = 0) readonly buffer W1 { uint w1[]; };
layout(binding = 0) readonly buffer WF { vec4 wf4[]; };
layout(binding = 3) writeonly buffer Y { float y[]; };
layout(binding = 6) readonly buffer P { uint params[]; };

#define FACT 1 // the values themselves: the Q4/Q8 branches below, deq32 for the other block types
#include "dequant.glsl"

layout(push_constant) uniform PC {
    uint rows;  // rows of this chunk
    uint cols;
    uint r0;    // table row of the chunk's first row
    uint ld;    // floats between tokens in y
} pc;

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint t = gl_WorkGroupID.x;
    const uint tok = params[4u + t];
    if (tok < pc.r0 || tok >= pc.r0 + pc.rows) return;
    const uint r = tok - pc.r0, ob = t * pc.ld;
#if FLOATQ && DTYPE != 2 && DTYPE != 3
    for (uint b = tid; b < pc.cols / 32u; b += 64u) {
        float v[32];
        deq32(pc.rows, pc.cols, r, 32u * b, v);
        for (uint e = 0u; e < 32u; e++) y[ob + 32u * b + e] = v[e];
    }
#elif DTYPE == 3
    const uint nb = pc.cols / 32u;
    for (uint b = tid; b < nb; b += 64u) {
        uvec4 q = w4[r * nb + b];
        float d = SCALE_AT(w1, pc.rows * nb * 4u, r * nb + b);
        for (uint c = 0u; c < 4u; c++) {
            vec4 lo = (NIB_LO(q[c]) - 8.0) * d, hi = (NIB_HI(q[c]) - 8.0) * d;
            for (uint e = 0u; e < 4u; e++) {
                y[ob + 32u * b + 4u * c + e] = lo[e];
                y[ob + 32u * b + 16u + 4u * c + e] = hi[e];
            }
        }
    }
#elif DTYPE == 2
    const uint nb = pc.cols / 32u;
    for (uint b = tid; b < nb; b += 64u) {
        float d = SCALE_AT(w1, pc.rows * nb * 8u, r * nb + b);
        for (uint h = 0u; h < 2u; h++) {
            uvec4 q = w4[2u * (r * nb + b) + h];
            for (uint c = 0u; c < 4u; c++) {
                vec4 v = I8X4(q[c]) * d;
                for (uint e = 0u; e < 4u; e++) y[ob + 32u * b + 16u * h + 4u * c + e] = v[e];
            }
        }
    }
#elif DTYPE == 1 || DTYPE == 10
    for (uint u = tid; u < pc.cols / 8u; u += 64u) {
        uvec4 q = w4[(r * pc.cols) / 8u + u];
        for (uint c = 0u; c < 4u; c++) {
#if DTYPE == 10
            vec2 p = vec2(uintBitsToFloat(q[c] << 16), uintBitsToFloat(q[c] & 0xFFFF0000u));
#else
            vec2 p = unpackHalf2x16(q[c]);
#endif
            y[ob + 8u * u + 2u * c] = p.x;
            y[ob + 8u * u + 2u * c + 1u] = p.y;
        }
    }
#else
    for (uint u = tid; u < pc.cols / 4u; u += 64u) {
        vec4 v = wf4[(r * pc.cols) / 4u + u];
        for (uint e = 0u; e < 4u; e++) y[ob + 4u * u + e] = v[e];
    }
#endif
}
