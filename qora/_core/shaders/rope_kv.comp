#version 450
// Prefill: RoPE on the q and k heads of each token (skipped on NoPE layers), q rotated in place,
// k and v stored into the layer's KV cache (KV16: 0 f32, 1 f16, 2 Q8_0, kvq8.glsl) at the token's
// position. One workgroup per token; each thread takes two neighbouring rotation pairs, whole f16
// pairs; a Q8_0 cache instead takes a pair of K or V blocks per thread (each value rotated as the
// pairs are, then the block's scale, as the CPU engine's quantizer). Decode with a Q8_0 cache runs
// this for its one token with use_rope 0: the QKV product wrote k and v rotated into qkv.
// ROWMAP=1 (a batched step over several sequences): token t's cache row is rowmap[t] (its slot's
// first row + its position), not params[0] + t; its cos/sin in rope_cs are for its own position.
#include "common.glsl"
#include "kvq8.glsl"

layout(local_size_x = 64) in;
layout(constant_id = 1) const uint KV16 = 1;
layout(constant_id = 2) const uint ROWMAP = 0;

layout(binding = 3) buffer QKV { float qkv[]; };
layout(binding = 4) writeonly buffer KC { uint kc[]; }; // KV16: f16 pairs
layout(binding = 4) writeonly buffer KCF { float kcf[]; };
layout(binding = 5) writeonly buffer VC { uint vc[]; };
layout(binding = 5) writeonly buffer VCF { float vcf[]; };
layout(binding = 4) writeonly buffer KCQ { uint kq[]; };
layout(binding = 5) writeonly buffer VCQ { uint vq[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) readonly buffer RC { float rope_cs[]; };
layout(binding = 8) readonly buffer RM { uint rowmap[]; };

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim;
    uint ld;        // floats between tokens in qkv (q_dim + 2 kv_dim)
    uint use_rope;
} pc;

// Element e of token t's k (rotated, as the pair loop rotates it) or v.
float kv_value(uint t, uint base, uint q_dim, uint kv_dim, uint e, bool is_v) {
    if (is_v) return qkv[base + q_dim + kv_dim + e];
    const uint half_ = pc.head_dim / 2u, j = e % pc.head_dim, hb = base + q_dim + (e - j);
    if (pc.use_rope == 0u) return qkv[hb + j];
    const uint i = j % half_, r = 2u * (t * half_ + i);
    const float c = rope_cs[r], s = rope_cs[r + 1u], a = qkv[hb + i], b = qkv[hb + i + half_];
    return j < half_ ? a * c - b * s : b * c + a * s;
}

// The Q8_0 cache row of token t: thread by thread a pair of K or V blocks, then their scales' word.
void store_q8(uint t, uint pos, uint base, uint q_dim, uint kv_dim) {
    const uint nb = kv_dim / 32u, np = (nb + 1u) / 2u, row = pos * kvq_row_words(kv_dim);
    for (uint task = gl_LocalInvocationID.x; task < 2u * np; task += 64u) {
        const bool is_v = task >= np;
        const uint b0 = 2u * (is_v ? task - np : task);
        uint sw = 0u;
        for (uint b = b0; b < min(b0 + 2u, nb); b++) {
            vec4 x[8];
            float amax = 0.0;
            for (uint i = 0u; i < 8u; i++) {
                for (uint l = 0u; l < 4u; l++) x[i][l] = kv_value(t, base, q_dim, kv_dim, 32u * b + 4u * i + l, is_v);
                amax = max(amax, max(max(abs(x[i].x), abs(x[i].y)), max(abs(x[i].z), abs(x[i].w))));
            }
            float d, id;
            q8_scales(amax, d, id);
            for (uint i = 0u; i < 8u; i++) {
                if (is_v) vq[row + 8u * b + i] = kvq_pack4(x[i], id);
                else kq[row + 8u * b + i] = kvq_pack4(x[i], id);
            }
            sw |= f16_bits(d) << ((b & 1u) * 16u);
        }
        if (is_v) vq[kvq_scale_word(row, kv_dim, b0)] = sw;
        else kq[kvq_scale_word(row, kv_dim, b0)] = sw;
    }
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint t = gl_WorkGroupID.x;
    const uint pos = ROWMAP != 0u ? rowmap[t] : params[0] + t;
    const uint half_ = pc.head_dim / 2u;
    const uint q_dim = pc.n_heads * pc.head_dim, kv_dim = pc.n_kv_heads * pc.head_dim;
    const uint base = t * pc.ld;
    const uint qh = pc.head_dim / 4u;
    if (KV16 == 2u) { // k and v from qkv as they are (read before any q write, which they never share)
        store_q8(t, pos, base, q_dim, kv_dim);
        if (pc.use_rope == 0u) return;
    }
    // a Q8_0 cache: only the q heads here
    const uint heads = KV16 == 2u ? pc.n_heads : pc.n_heads + pc.n_kv_heads;
    for (uint p = tid; p < heads * qh; p += 64u) {
        uint head = p / qh, j = 2u * (p - head * qh);
        uint i = base + head * pc.head_dim + j;
        float a0 = qkv[i], a1 = qkv[i + 1u], b0 = qkv[i + half_], b1 = qkv[i + half_ + 1u];
        if (pc.use_rope != 0u) {
            uint r = 2u * (t * half_ + j);
            float c0 = rope_cs[r], s0 = rope_cs[r + 1u], c1 = rope_cs[r + 2u], s1 = rope_cs[r + 3u];
            float t0 = a0 * c0 - b0 * s0, t1 = a1 * c1 - b1 * s1;
            b0 = b0 * c0 + a0 * s0;
            b1 = b1 * c1 + a1 * s1;
            a0 = t0;
            a1 = t1;
        }
        if (head < pc.n_heads) {
            qkv[i] = a0;
            qkv[i + 1u] = a1;
            qkv[i + half_] = b0;
            qkv[i + half_ + 1u] = b1;
        } else {
            uint o = pos * kv_dim + (head - pc.n_heads) * pc.head_dim + j;
            if (KV16 != 0u) {
                kc[o / 2u] = pack_f16x2(a0, a1);
                kc[(o + half_) / 2u] = pack_f16x2(b0, b1);
            } else {
                kcf[o] = a0;
                kcf[o + 1u] = a1;
                kcf[o + half_] = b0;
                kcf[o + half_ + 1u] = b1;
            }
        }
    }
    if (KV16 == 2u) return;
    for (uint i = 2u * tid; i < kv_dim; i += 128u) {
        float v0 = qkv[base + q_dim + kv_dim + i], v1 = qkv[base + q_dim + kv_dim + i + 1u];
        if (KV16 != 0u) {
            vc[(pos * kv_dim + i) / 2u] = pack_f16x2(v0, v1);
        } else {
            vcf[pos * kv_dim + i] = v0;
            vcf[pos * kv_dim + i + 1u] = v1;
        }
    }
}
