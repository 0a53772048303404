#version 450
// Prefill attention (flash attention): one workgroup per (group of HG query heads that share one KV
// head, tile of BQ tokens); its RQ = BQ x HG query rows share every K/V tile, staged once in shared
// memory as f32 (from the f16 or f32 cache), so the cache is read once per tile of queries rather
// than once per (head, token). Softmax is online per row (running max and sum, f32), keys past a
// row's position are masked, and key tiles past the workgroup's last position are never loaded.
// Each query row belongs to TS neighbouring threads, each holding DPT = HD / TS of its dimensions
// (q and the output accumulator in registers; lane l takes the 4-float groups l, l + TS, ..., so the
// lanes of a row read neighbouring shared-memory words, not the same bank); a score is their partial dots summed through shared
// memory (in lane order), so every thread of the row sees the whole score and keeps its own copy
// of the row's max and sum. Row r of the tile is token r / HG, head r % HG.
// The f16 tensor-core version (cooperative matrices) keeps this tiling: S = Q K^T and O += P V on
// the staged tiles.
// SEG=1 (a batched step over several sequences): workgroup z is entry e of seg[] = (start, n_tok,
// first row in q and out, first cache row of its slot), each entry attending over its own slot.
#include "common.glsl"
#include "kvq8.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 128;  // threads = RQ x TS
layout(constant_id = 1) const uint KV16 = 1; // the cache: 0 f32, 1 f16, 2 Q8_0 (kvq8.glsl; HD % 32 == 0)
layout(constant_id = 2) const uint HD = 128; // head_dim: a multiple of 4 x TS, at most 256
layout(constant_id = 3) const uint HG = 1;   // query heads per workgroup, all of one KV head
layout(constant_id = 4) const uint BK = 32;  // keys per tile, at most 64
layout(constant_id = 5) const uint TS = 2;   // threads per query row: 1, 2 or 4
layout(constant_id = 6) const uint SEG = 0;  // 1: entries from seg[] (workgroup z), else one from params

layout(binding = 1) readonly buffer Q { vec4 q4[]; };
layout(binding = 3) writeonly buffer Y { vec4 y4[]; };
layout(binding = 4) readonly buffer KC { uvec4 kc8[]; }; // KV16: 8 halves per load
layout(binding = 4) readonly buffer KCF { vec4 kc4[]; };
layout(binding = 5) readonly buffer VC { uvec4 vc8[]; };
layout(binding = 5) readonly buffer VCF { vec4 vc4[]; };
layout(binding = 4) readonly buffer KCQ { uvec4 kq4[]; };
layout(binding = 4) readonly buffer KCW { uint kqw[]; };
layout(binding = 5) readonly buffer VCQ { uvec4 vq4[]; };
layout(binding = 5) readonly buffer VCW { uint vqw[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 8) readonly buffer SG { uvec4 seg[]; };

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim; // = HD
    uint ld_q;     // floats between tokens in the q source
    uint ld_out;
    uint out_base;
    uint act_w;
} pc;

const uint RQ = T / TS, BQ = RQ / HG, DPT = HD / TS, D4 = DPT / 4u, HD4 = HD / 4u;
// a loop over this thread's D4 <= 16 vec4 of q and acc (see main)
#define FOR_D4(i) [[unroll]] for (uint i = 0u; i < 16u; i++) if (i < D4)

shared vec4 ks[BK * HD4];
shared vec4 vs[BK * HD4];
shared float sp[T * BK]; // TS > 1: the partial dots, (row, key, lane)

// Stage positions [k0, k0 + BK) (those before `k_end`) of K and V as f32.
void stage(uint k0, uint k_end, uint kv_dim, uint kb, uint kvb) {
    const uint tid = gl_LocalInvocationID.x;
    if (KV16 == 2u) {
        const uint rw = kvq_row_words(kv_dim);
        for (uint i = tid; i < BK * HD / 16u; i += T) {
            const uint k = i / (HD / 16u), c = i - k * (HD / 16u);
            uvec4 kw = uvec4(0u), vw = uvec4(0u);
            float kd = 0.0, vd = 0.0;
            if (k0 + k < k_end) {
                const uint row = (kvb + k0 + k) * rw, blk = (kb + 16u * c) / 32u;
                kw = kq4[(row + kb / 4u) / 4u + c];
                vw = vq4[(row + kb / 4u) / 4u + c];
                kd = KVQ_SCALE(kqw, row, kv_dim, blk);
                vd = KVQ_SCALE(vqw, row, kv_dim, blk);
            }
            const uint o = k * HD4 + 4u * c;
            ks[o] = kd * I8X4(kw.x);
            ks[o + 1u] = kd * I8X4(kw.y);
            ks[o + 2u] = kd * I8X4(kw.z);
            ks[o + 3u] = kd * I8X4(kw.w);
            vs[o] = vd * I8X4(vw.x);
            vs[o + 1u] = vd * I8X4(vw.y);
            vs[o + 2u] = vd * I8X4(vw.z);
            vs[o + 3u] = vd * I8X4(vw.w);
        }
    } else if (KV16 != 0u) {
        for (uint i = tid; i < BK * HD / 8u; i += T) {
            const uint k = i / (HD / 8u), c = i - k * (HD / 8u);
            uvec4 kw = uvec4(0u), vw = uvec4(0u);
            if (k0 + k < k_end) {
                const uint e = ((kvb + k0 + k) * kv_dim + kb) / 8u + c;
                kw = kc8[e];
                vw = vc8[e];
            }
            ks[k * HD4 + 2u * c] = vec4(unpackHalf2x16(kw.x), unpackHalf2x16(kw.y));
            ks[k * HD4 + 2u * c + 1u] = vec4(unpackHalf2x16(kw.z), unpackHalf2x16(kw.w));
            vs[k * HD4 + 2u * c] = vec4(unpackHalf2x16(vw.x), unpackHalf2x16(vw.y));
            vs[k * HD4 + 2u * c + 1u] = vec4(unpackHalf2x16(vw.z), unpackHalf2x16(vw.w));
        }
    } else {
        for (uint i = tid; i < BK * HD4; i += T) {
            const uint k = i / HD4, c = i - k * HD4;
            const bool in_ = k0 + k < k_end;
            const uint e = ((kvb + k0 + k) * kv_dim + kb) / 4u + c;
            ks[i] = in_ ? kc4[e] : vec4(0.0);
            vs[i] = in_ ? vc4[e] : vec4(0.0);
        }
    }
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint grp = gl_WorkGroupID.x, tile = gl_WorkGroupID.y;
    const uvec4 sg = SEG != 0u ? seg[gl_WorkGroupID.z] : uvec4(params[0], params[1], 0u, 0u);
    const uint start = sg.x, n_tok = sg.y, row0 = sg.z, kvb = sg.w;
    if (tile * BQ >= n_tok) return; // an entry shorter than the longest: the whole workgroup leaves
    const uint r = tid / TS, lane = tid - r * TS;
    const uint t = tile * BQ + r / HG, h = grp * HG + r % HG;
    const bool row_ok = r < BQ * HG && t < n_tok;
    const uint pos = start + min(t, n_tok - 1u); // a spare row repeats the last token and writes nothing
    const uint kv_dim = pc.n_kv_heads * HD;
    const uint kb = (grp * HG / (pc.n_heads / pc.n_kv_heads)) * HD;
    const float scale = 1.0 / sqrt(float(HD));
    const uint k_end = start + min(n_tok, (tile + 1u) * BQ); // past the tile's last position

    // q and acc are indexed in loops to a fixed 16 (FOR_D4), which spirv-opt unrolls: constant indices
    // only. s is indexed in loops to BK (a specialization constant, only marked for the driver to
    // unroll). Indexed by a variable, arrays go to local memory (NVIDIA: 768 bytes, these three).
    vec4 q[16], acc[16];
    const uint qb = ((row0 + min(t, n_tok - 1u)) * pc.ld_q + h * HD) / 4u + lane;
    FOR_D4(i) {
        q[i] = q4[qb + i * TS];
        acc[i] = vec4(0.0);
    }
    float m = -1e30, l = 0.0;
    for (uint k0 = 0u; k0 < k_end; k0 += BK) {
        barrier(); // the previous tile is used up
        stage(k0, k_end, kv_dim, kb, kvb);
        barrier();
        float s[64];
        float mt = -1e30;
        [[unroll]] for (uint k = 0u; k < BK; k++) {
            float d = 0.0;
            FOR_D4(i) d += dot(q[i], ks[k * HD4 + i * TS + lane]);
            if (TS > 1u) sp[(r * BK + k) * TS + lane] = d;
            else s[k] = d;
        }
        if (TS > 1u) {
            barrier();
            [[unroll]] for (uint k = 0u; k < BK; k++) {
                float d = 0.0;
                [[unroll]] for (uint i = 0u; i < TS; i++) d += sp[(r * BK + k) * TS + i];
                s[k] = d;
            }
        }
        [[unroll]] for (uint k = 0u; k < BK; k++) {
            s[k] = k0 + k <= pos ? s[k] * scale : -1e30;
            mt = max(mt, s[k]);
        }
        const float m_new = max(m, mt), corr = exp(m - m_new);
        m = m_new;
        float ls = 0.0;
        FOR_D4(i) acc[i] *= corr;
        [[unroll]] for (uint k = 0u; k < BK; k++) {
            const float p = k0 + k <= pos ? exp(s[k] - m) : 0.0;
            ls += p;
            FOR_D4(i) acc[i] += p * vs[k * HD4 + i * TS + lane];
        }
        l = l * corr + ls;
    }
    if (row_ok) {
        const uint ob = ((row0 + t) * pc.ld_out + h * HD) / 4u + lane;
        FOR_D4(i) y4[ob + i * TS] = acc[i] / l;
    }
}
