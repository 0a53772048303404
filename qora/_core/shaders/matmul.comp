#version 450
// Prefill product: Y[t, r] (=|+=) sum_k W[r, k] X[t, k] for a batch of tokens (DTYPE: dequant.glsl).
// A workgroup computes a 64-row x 64-token tile: each 32-wide slice of W is dequantized once into
// shared memory and used for all 64 tokens, so the weights are read once per 64 tokens.
// For Q4/Q8 weights in the "q8" precision (INTQ), X holds the input already quantized to Q8 by prep.comp (integer values, one
// scale per 32-block in XS) and the tile holds the weights' integer values: each block's dot
// product is summed exactly, then scaled by both block scales, as the CPU engine does. For every
// other type X is the float input and the tile holds the dequantized weights (deq32).
#include "common.glsl"

layout(local_size_x = 128) in;
layout(constant_id = 1) const uint MODE = 0; // MODE_STORE or MODE_ADD

layout(binding = 0) readonly buffer W4 { uvec4 w4[]; };
layout(binding = 0) readonly buffer W1 { uint w1[]; };
layout(binding = 0) readonly buffer WF { vec4 wf4[]; };
layout(binding = 1) readonly buffer X4 { vec4 x4[]; };
layout(binding = 2) readonly buffer XS { float xsc[]; };
layout(binding = 3) buffer Y { float y[]; };

#include "dequant.glsl"

layout(push_constant) uniform PC {
    uint rows;   // rows of this chunk
    uint cols;
    uint n_tok;
    uint ldx;    // floats between tokens in X (a multiple of 4)
    uint ldy;    // floats between tokens in Y
    uint y_off;  // output column of row 0
} pc;

#define TM 64u
#define TN 64u
#define TK 32u

shared float ws[TK][TM + 4u];
shared float xs[TK][TN + 4u];
shared float wsc[TM]; // block scales of the current slice (Q4/Q8)
shared float xssc[TN];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint r0 = gl_WorkGroupID.x * TM;
    const uint t0 = gl_WorkGroupID.y * TN;
    const uint tr = tid % 16u; // rows tr*4 .. tr*4+3
    const uint tc = tid / 16u; // tokens tc*8 .. tc*8+7

    vec4 acc[8];
    for (uint j = 0u; j < 8u; j++) acc[j] = vec4(0.0);
#if INTQ
    vec4 blk[8];
#endif

    for (uint k0 = 0u; k0 < pc.cols; k0 += TK) {
        if (tid < TM) {
            // one row's 32-wide slice of W, dequantized
            uint r = r0 + tid;
            float v[32];
            for (uint i = 0u; i < 32u; i++) v[i] = 0.0;
            wsc[tid] = 0.0;
            if (r < pc.rows) {
#if INTQ && DTYPE == 3
                uint nb = pc.cols / 32u, b = r * nb + k0 / 32u;
                uvec4 q = w4[b];
                wsc[tid] = SCALE_AT(w1, pc.rows * nb * 4u, b);
                for (uint c = 0u; c < 4u; c++) {
                    vec4 lo = NIB_LO(q[c]) - 8.0, hi = NIB_HI(q[c]) - 8.0;
                    for (uint e = 0u; e < 4u; e++) {
                        v[4u * c + e] = lo[e];
                        v[16u + 4u * c + e] = hi[e];
                    }
                }
#elif INTQ && DTYPE == 2
                uint nb = pc.cols / 32u, b = r * nb + k0 / 32u;
                wsc[tid] = SCALE_AT(w1, pc.rows * nb * 8u, b);
                for (uint h = 0u; h < 2u; h++) {
                    uvec4 q = w4[2u * b + h];
                    for (uint c = 0u; c < 4u; c++) {
                        vec4 e4 = I8X4(q[c]);
                        for (uint e = 0u; e < 4u; e++) v[16u * h + 4u * c + e] = e4[e];
                    }
                }
#elif FLOATQ
                deq32(pc.rows, pc.cols, r, k0, v);
#elif DTYPE == 1 || DTYPE == 10
                for (uint h = 0u; h < 4u; h++) {
                    if (k0 + 8u * h < pc.cols) {
                        uvec4 q = w4[(r * pc.cols + k0) / 8u + h];
                        for (uint c = 0u; c < 4u; c++) {
#if DTYPE == 10
                            vec2 p = vec2(uintBitsToFloat(q[c] << 16), uintBitsToFloat(q[c] & 0xFFFF0000u));
#else
                            vec2 p = unpackHalf2x16(q[c]);
#endif
                            v[8u * h + 2u * c] = p.x;
                            v[8u * h + 2u * c + 1u] = p.y;
                        }
                    }
                }
#else
                for (uint h = 0u; h < 8u; h++) {
                    if (k0 + 4u * h < pc.cols) {
                        vec4 q = wf4[(r * pc.cols + k0) / 4u + h];
                        for (uint e = 0u; e < 4u; e++) v[4u * h + e] = q[e];
                    }
                }
#endif
            }
            for (uint i = 0u; i < 32u; i++) ws[i][tid] = v[i];
        } else {
            // one token's 32-wide slice of X
            uint u = tid - TM, t = t0 + u;
#if INTQ
            xssc[u] = t < pc.n_tok ? xsc[t * (pc.ldx / 32u) + k0 / 32u] : 0.0;
#endif
            for (uint h = 0u; h < 8u; h++) {
                vec4 q = vec4(0.0);
                if (t < pc.n_tok && k0 + 4u * h < pc.cols) q = x4[(t * pc.ldx + k0) / 4u + h];
                for (uint e = 0u; e < 4u; e++) xs[4u * h + e][u] = q[e];
            }
        }
        barrier();
        // a thread whose 8 tokens are all past n_tok (a batched step of a few rows) has nothing to add
        const bool busy = t0 + tc * 8u < pc.n_tok;
#if INTQ
        for (uint j = 0u; j < 8u; j++) blk[j] = vec4(0.0);
        if (busy) {
            for (uint k = 0u; k < TK; k++) {
                vec4 a = vec4(ws[k][tr * 4u], ws[k][tr * 4u + 1u], ws[k][tr * 4u + 2u], ws[k][tr * 4u + 3u]);
                for (uint j = 0u; j < 8u; j++) blk[j] += a * xs[k][tc * 8u + j]; // exact: integers below 2^24
            }
        }
        const vec4 dw = vec4(wsc[tr * 4u], wsc[tr * 4u + 1u], wsc[tr * 4u + 2u], wsc[tr * 4u + 3u]);
        for (uint j = 0u; j < 8u; j++) acc[j] += blk[j] * (dw * xssc[tc * 8u + j]);
#else
        if (busy) {
            for (uint k = 0u; k < TK; k++) {
                vec4 a = vec4(ws[k][tr * 4u], ws[k][tr * 4u + 1u], ws[k][tr * 4u + 2u], ws[k][tr * 4u + 3u]);
                for (uint j = 0u; j < 8u; j++) acc[j] += a * xs[k][tc * 8u + j];
            }
        }
#endif
        barrier();
    }

    for (uint j = 0u; j < 8u; j++) {
        uint t = t0 + tc * 8u + j;
        if (t >= pc.n_tok) break;
        for (uint i = 0u; i < 4u; i++) {
            uint r = r0 + tr * 4u + i;
            if (r < pc.rows) {
                uint o = t * pc.ldy + pc.y_off + r;
                if (MODE == MODE_ADD)
                    y[o] += acc[j][i];
                else
                    y[o] = acc[j][i];
            }
        }
    }
}
