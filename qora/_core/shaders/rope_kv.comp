#version 450
// Prefill: RoPE on the q and k heads of each token (skipped on NoPE layers), q rotated in place,
// k and v stored into the layer's KV cache at the token's position. One workgroup per token.
#include "common.glsl"

layout(local_size_x = 64) in;

layout(binding = 3) buffer QKV { float qkv[]; };
layout(binding = 4) writeonly buffer KC { float kc[]; };
layout(binding = 5) writeonly buffer VC { float vc[]; };
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
    for (uint p = tid; p < (pc.n_heads + pc.n_kv_heads) * half_; p += 64u) {
        uint head = p / half_, j = p - head * half_;
        uint i = head * pc.head_dim + j;
        float a = qkv[base + i], b = qkv[base + i + half_];
        if (pc.use_rope != 0u) {
            float c = rope_cs[2u * (t * half_ + j)], sn = rope_cs[2u * (t * half_ + j) + 1u];
            float a2 = a * c - b * sn;
            b = b * c + a * sn;
            a = a2;
        }
        if (head < pc.n_heads) {
            qkv[base + i] = a;
            qkv[base + i + half_] = b;
        } else {
            uint o = pos * kv_dim + i - q_dim;
            kc[o] = a;
            kc[o + half_] = b;
        }
    }
    for (uint i = tid; i < kv_dim; i += 64u) vc[pos * kv_dim + i] = qkv[base + q_dim + kv_dim + i];
}
