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
// Measurement knobs (tools/gen_shaders.py --probes builds variants with them; the defaults are the
// kernel): SHV the vector width of the shared arrays, ACC16 f16 accumulators, CN the accumulators'
// columns (16 or 8), PROBE_MMA the products alone on operands loaded once (timing only).
#ifndef SHV
#define SHV 4
#endif
#ifndef ACC16
#define ACC16 0
#endif
#ifndef PROBE_MMA
#define PROBE_MMA 0
#endif
#ifndef CN
#define CN 16
#endif
#define NJ (64u / CN) // accumulators across this subgroup's 64 rows
#if SHV == 4
#define SH_T f16vec4
#elif SHV == 2
#define SH_T f16vec2
#else
#define SH_T float16_t
#endif
#define LDSV (LDS / SHV)
#if ACC16
#define ACC_T float16_t
#else
#define ACC_T float
#endif

shared SH_T xs[BT * LDSV]; // [token][k]
shared SH_T ws[BR * LDSV]; // [row][k]

// one f16vec4 into shared array A at f16vec4 index o4, whatever its vector width
#if SHV == 4
#define SH_PUT(A, o4, v) A[o4] = (v)
#elif SHV == 2
#define SH_PUT(A, o4, v) { const f16vec4 v_ = (v); A[2u * (o4)] = v_.xy; A[2u * (o4) + 1u] = v_.zw; }
#else
#define SH_PUT(A, o4, v) { const f16vec4 v_ = (v); [[unroll]] for (uint c_ = 0u; c_ < 4u; c_++) A[4u * (o4) + c_] = v_[c_]; }
#endif
shared float cs[8u * 256u]; // per subgroup: one 16 x CN result on its way out

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
        SH_PUT(ws, o + c, f16vec4((NIB_LO(s.q[c]) - 8.0) * s.d));
        SH_PUT(ws, o + 4u + c, f16vec4((NIB_HI(s.q[c]) - 8.0) * s.d));
    }
#elif DTYPE == 2
    [[unroll]] for (uint h = 0u; h < 2u; h++)
        [[unroll]] for (uint c = 0u; c < 4u; c++) SH_PUT(ws, o + 4u * h + c, f16vec4(I8X4(s.q[h][c]) * s.d));
#elif DTYPE == 1
    [[unroll]] for (uint g = 0u; g < 4u; g++) {
        SH_PUT(ws, o + 2u * g, f16vec4(unpackHalf2x16(s.q[g].x), unpackHalf2x16(s.q[g].y)));
        SH_PUT(ws, o + 2u * g + 1u, f16vec4(unpackHalf2x16(s.q[g].z), unpackHalf2x16(s.q[g].w)));
    }
#else
    [[unroll]] for (uint g = 0u; g < 8u; g++) SH_PUT(ws, o + g, f16vec4(s.q[g]));
#endif
    [[unroll]] for (uint g = 0u; g < 8u; g++) SH_PUT(xs, o + g, f16vec4(s.x[g]));
}

void main() {
    const uint r0 = gl_WorkGroupID.x * BR;
    const uint t0 = gl_WorkGroupID.y * BT;
    const uint sg = gl_SubgroupID;
    const uint st = (sg / 2u) * 32u; // this subgroup's tokens within the tile
    const uint sr = (sg % 2u) * 64u; // and rows

    coopmat<ACC_T, gl_ScopeSubgroup, 16, CN, gl_MatrixUseAccumulator> acc[2][NJ];
    [[unroll]] for (uint i = 0u; i < 2u; i++)
        [[unroll]] for (uint j = 0u; j < NJ; j++) acc[i][j] = coopmat<ACC_T, gl_ScopeSubgroup, 16, CN, gl_MatrixUseAccumulator>(0.0);

#if PROBE_MMA
    // throughput probe: the products alone, operands loaded once
    coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA> pa[2];
    coopmat<float16_t, gl_ScopeSubgroup, 16, CN, gl_MatrixUseB> pb[NJ];
    [[unroll]] for (uint i = 0u; i < 2u; i++)
        coopMatLoad(pa[i], xs, (st + 16u * i) * LDSV, LDSV, gl_CooperativeMatrixLayoutRowMajor);
    [[unroll]] for (uint j = 0u; j < NJ; j++)
        coopMatLoad(pb[j], ws, (sr + CN * j) * LDSV, LDSV, gl_CooperativeMatrixLayoutColumnMajor);
    for (uint k0 = 0u; k0 < pc.cols; k0 += BK) {
        [[unroll]] for (uint kk = 0u; kk < BK; kk += 16u)
            [[unroll]] for (uint j = 0u; j < NJ; j++)
                [[unroll]] for (uint i = 0u; i < 2u; i++) acc[i][j] = coopMatMulAdd(pa[i], pb[j], acc[i][j]);
    }
#else
    Stage s;
    load_stage(t0, r0, 0u, s);
    for (uint k0 = 0u; k0 < pc.cols; k0 += BK) {
        barrier(); // the previous stage's reads of xs / ws are done
        store_stage(s);
        barrier();
        if (k0 + BK < pc.cols) load_stage(t0, r0, k0 + BK, s); // in flight during the products
        [[unroll]] for (uint kk = 0u; kk < BK; kk += 16u) {
            coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA> a[2];
            coopmat<float16_t, gl_ScopeSubgroup, 16, CN, gl_MatrixUseB> b;
            [[unroll]] for (uint i = 0u; i < 2u; i++)
                coopMatLoad(a[i], xs, (st + 16u * i) * LDSV + kk / SHV, LDSV, gl_CooperativeMatrixLayoutRowMajor);
            [[unroll]] for (uint j = 0u; j < NJ; j++) {
                // B (k x rows) is ws read column by column: element (k, r) at r * LDS + k
                coopMatLoad(b, ws, (sr + CN * j) * LDSV + kk / SHV, LDSV, gl_CooperativeMatrixLayoutColumnMajor);
                [[unroll]] for (uint i = 0u; i < 2u; i++) acc[i][j] = coopMatMulAdd(a[i], b, acc[i][j]);
            }
        }
    }

#endif

    // Out through shared memory, one 16 x CN matrix at a time, with the edges and MODE applied.
    const uint lane = gl_SubgroupInvocationID;
    [[unroll]] for (uint i = 0u; i < 2u; i++) {
        [[unroll]] for (uint j = 0u; j < NJ; j++) {
#if ACC16
            coopmat<float, gl_ScopeSubgroup, 16, CN, gl_MatrixUseAccumulator> accf = coopmat<float, gl_ScopeSubgroup, 16, CN, gl_MatrixUseAccumulator>(acc[i][j]);
            coopMatStore(accf, cs, sg * 256u, CN, gl_CooperativeMatrixLayoutRowMajor);
#else
            coopMatStore(acc[i][j], cs, sg * 256u, CN, gl_CooperativeMatrixLayoutRowMajor);
#endif
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            // a fixed count (subgroups of 32: qvk_coopmat_probe), so that every loop here unrolls and
            // acc is only ever indexed by constants: indexed by a variable, the whole array lives in
            // local memory and every product loads and stores its accumulator there
            [[unroll]] for (uint e0 = 0u; e0 < 16u * CN; e0 += 32u) {
                const uint e = e0 + lane;
                uint t = t0 + st + 16u * i + e / CN;
                uint r = r0 + sr + CN * j + e % CN;
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
