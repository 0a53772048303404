#version 450
// Prefill product on tensor cores: Y[t, r] (=|+=) sum_k W[r, k] X[t, k], as matmul.comp, with
// KHR cooperative matrices (f16 x f16 -> f32, 16x16x16 per subgroup op). Compiled with glslang
// (tools/gen_shaders.py), picked only on devices that list that shape (qora_vk.c).
//
// A workgroup of 8 subgroups of 32 computes a 128-token x 128-row tile of Y; subgroup s owns
// tokens (s / 2) * 32 .. +32 and rows (s % 2) * 64 .. +64: 2 x 4 accumulator matrices. Each
// 64-wide slice of K (two quant blocks) is staged in shared memory as f16: the weights dequantized
// (q * d, as llama.cpp's f16 matrix path does), the input rounded from f32 (so X here is the float
// input: prep.comp without Q8). Products sum in f32. The next slice's raw loads (quants and scale,
// input floats) are issued into registers before the current slice's products, so they are in
// flight while the tensor cores work; they are decoded and stored as 8-byte vectors afterwards.
// Every fixed-count loop is unrolled: the accumulator array must stay in registers.
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_GOOGLE_include_directive : enable
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"

layout(local_size_x = 256) in;
layout(constant_id = 1) const uint MODE = 0; // MODE_STORE or MODE_ADD

layout(binding = 0) readonly buffer W4 { uvec4 w4[]; };
layout(binding = 0) readonly buffer W1 { uint w1[]; };
layout(binding = 0) readonly buffer WF { vec4 wf4[]; };
layout(binding = 1) readonly buffer X4 { vec4 x4[]; };
layout(binding = 3) buffer Y { float y[]; };

layout(push_constant) uniform PC {
    uint rows;   // rows of this chunk
    uint cols;
    uint n_tok;
    uint ldx;    // floats between tokens in X (a multiple of 4)
    uint ldy;    // floats between tokens in Y
    uint y_off;  // output column of row 0
} pc;

#define BT 128u       // tokens per workgroup tile
#define BR 128u       // weight rows per workgroup tile
#define BK 64u        // K per stage: two quant blocks
#define LDS (BK + 8u) // f16 per staged row, padded against bank conflicts (a multiple of 8: 16 bytes)
#define LDS4 (LDS / 4u)

shared f16vec4 xs[BT * LDS4]; // [token][k]
shared f16vec4 ws[BR * LDS4]; // [row][k]
shared float cs[8u * 256u];   // per subgroup: one 16x16 result on its way out

// What one thread loads per stage: one 32-wide block of one weight row (raw), 32 floats of one token.
struct Stage {
#if DTYPE == 3
    uvec4 q;
    float d;
#elif DTYPE == 2
    uvec4 q[2];
    float d;
#elif DTYPE == 1
    uvec4 q[4];
#else
    vec4 q[8];
#endif
    vec4 x[8];
};

void load_stage(uint t0, uint r0, uint k0, inout Stage s) {
    const uint tid = gl_LocalInvocationID.x;
    const uint r = r0 + tid / 2u, k = k0 + 32u * (tid % 2u);
    const bool wok = r < pc.rows;
#if DTYPE == 3
    uint nb = pc.cols / 32u, b = r * nb + k / 32u;
    bool ok = wok && k < pc.cols;
    s.q = ok ? w4[b] : uvec4(0x88888888u); // nibble 8: value 0
    s.d = ok ? SCALE_AT(w1, pc.rows * nb * 4u, b) : 0.0;
#elif DTYPE == 2
    uint nb = pc.cols / 32u, b = r * nb + k / 32u;
    bool ok = wok && k < pc.cols;
    s.q[0] = ok ? w4[2u * b] : uvec4(0u);
    s.q[1] = ok ? w4[2u * b + 1u] : uvec4(0u);
    s.d = ok ? SCALE_AT(w1, pc.rows * nb * 8u, b) : 0.0;
#elif DTYPE == 1
    [[unroll]] for (uint g = 0u; g < 4u; g++)
        s.q[g] = wok && k + 8u * g < pc.cols ? w4[(r * pc.cols + k) / 8u + g] : uvec4(0u);
#else
    [[unroll]] for (uint g = 0u; g < 8u; g++)
        s.q[g] = wok && k + 4u * g < pc.cols ? wf4[(r * pc.cols + k) / 4u + g] : vec4(0.0);
#endif
    const uint t = t0 + tid / 2u;
    [[unroll]] for (uint g = 0u; g < 8u; g++)
        s.x[g] = t < pc.n_tok && k + 4u * g < pc.cols ? x4[(t * pc.ldx + k) / 4u + g] : vec4(0.0);
}

void store_stage(in Stage s) {
    const uint tid = gl_LocalInvocationID.x;
    const uint o = (tid / 2u) * LDS4 + 8u * (tid % 2u); // 8 f16vec4 = this thread's 32 values
#if DTYPE == 3
    // byte j holds element j (low nibble) and j + 16 (high nibble)
    [[unroll]] for (uint c = 0u; c < 4u; c++) {
        ws[o + c] = f16vec4((NIB_LO(s.q[c]) - 8.0) * s.d);
        ws[o + 4u + c] = f16vec4((NIB_HI(s.q[c]) - 8.0) * s.d);
    }
#elif DTYPE == 2
    [[unroll]] for (uint h = 0u; h < 2u; h++)
        [[unroll]] for (uint c = 0u; c < 4u; c++) ws[o + 4u * h + c] = f16vec4(I8X4(s.q[h][c]) * s.d);
#elif DTYPE == 1
    [[unroll]] for (uint g = 0u; g < 4u; g++) {
        ws[o + 2u * g] = f16vec4(unpackHalf2x16(s.q[g].x), unpackHalf2x16(s.q[g].y));
        ws[o + 2u * g + 1u] = f16vec4(unpackHalf2x16(s.q[g].z), unpackHalf2x16(s.q[g].w));
    }
#else
    [[unroll]] for (uint g = 0u; g < 8u; g++) ws[o + g] = f16vec4(s.q[g]);
#endif
    [[unroll]] for (uint g = 0u; g < 8u; g++) xs[o + g] = f16vec4(s.x[g]);
}

void main() {
    const uint r0 = gl_WorkGroupID.x * BR;
    const uint t0 = gl_WorkGroupID.y * BT;
    const uint sg = gl_SubgroupID;
    const uint st = (sg / 2u) * 32u; // this subgroup's tokens within the tile
    const uint sr = (sg % 2u) * 64u; // and rows

    coopmat<float, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator> acc[2][4];
    [[unroll]] for (uint i = 0u; i < 2u; i++)
        [[unroll]] for (uint j = 0u; j < 4u; j++) acc[i][j] = coopmat<float, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator>(0.0);

    Stage s;
    load_stage(t0, r0, 0u, s);
    for (uint k0 = 0u; k0 < pc.cols; k0 += BK) {
        barrier(); // the previous stage's reads of xs / ws are done
        store_stage(s);
        barrier();
        if (k0 + BK < pc.cols) load_stage(t0, r0, k0 + BK, s); // in flight during the products
        [[unroll]] for (uint kk = 0u; kk < BK; kk += 16u) {
            coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA> a[2];
            coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseB> b;
            [[unroll]] for (uint i = 0u; i < 2u; i++)
                coopMatLoad(a[i], xs, (st + 16u * i) * LDS4 + kk / 4u, LDS4, gl_CooperativeMatrixLayoutRowMajor);
            [[unroll]] for (uint j = 0u; j < 4u; j++) {
                // B (k x rows) is ws read column by column: element (k, r) at r * LDS + k
                coopMatLoad(b, ws, (sr + 16u * j) * LDS4 + kk / 4u, LDS4, gl_CooperativeMatrixLayoutColumnMajor);
                [[unroll]] for (uint i = 0u; i < 2u; i++) acc[i][j] = coopMatMulAdd(a[i], b, acc[i][j]);
            }
        }
    }

    // Out through shared memory, one 16x16 matrix at a time, with the edges and MODE applied.
    const uint lane = gl_SubgroupInvocationID;
    [[unroll]] for (uint i = 0u; i < 2u; i++) {
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            coopMatStore(acc[i][j], cs, sg * 256u, 16u, gl_CooperativeMatrixLayoutRowMajor);
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            for (uint e = lane; e < 256u; e += gl_SubgroupSize) {
                uint t = t0 + st + 16u * i + e / 16u;
                uint r = r0 + sr + 16u * j + e % 16u;
                if (t < pc.n_tok && r < pc.rows) {
                    uint o = t * pc.ldy + pc.y_off + r;
                    float v = cs[sg * 256u + e];
                    if (MODE == MODE_ADD)
                        y[o] += v;
                    else
                        y[o] = v;
                }
            }
            subgroupBarrier();
        }
    }
}
