#version 450
// Prefill: RoPE on the q and k heads of each token (skipped on NoPE layers), q rotated in place,
// k and v stored into the layer's KV cache (f16 or f32: KV16) at the token's position. One
// workgroup per token; each thread takes two neighbouring rotation pairs, whole f16 pairs.
#include "common.glsl"

layout(local_size_x = 64) in;
layout(constant_id = 1) const uint KV16 = 1;

layout(binding = 3) buffer QKV { float qkv[]; };
layout(binding = 4) writeonly buffer KC { uint kc[]; }; // KV16: f16 pairs
layout(binding = 4) writeonly buffer KCF { float kcf[]; };
layout(binding = 5) writeonly buffer VC { uint vc[]; };
layout(binding = 5) writeonly buffer VCF { float vcf[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) readonly buffer RC { float rope_cs[]; };

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim;
    uint ld;        // floats between tokens in qkv (q_dim + 2 kv_dim)
    uint use_rope;
} pc;

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint t = gl_WorkGroupID.x;
    const uint pos = params[0] + t;
    const uint half_ = pc.head_dim / 2u;
    const uint q_dim = pc.n_heads * pc.head_dim, kv_dim = pc.n_kv_heads * pc.head_dim;
    const uint base = t * pc.ld;
    const uint qh = pc.head_dim / 4u;
    for (uint p = tid; p < (pc.n_heads + pc.n_kv_heads) * qh; p += 64u) {
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
