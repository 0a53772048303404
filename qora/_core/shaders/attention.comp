#version 450
// Causal GQA attention: one workgroup per (query head, token), over cached positions 0..pos.
// Softmax is computed online in tiles of T positions (running max and sum), so any context
// length works with fixed shared memory; thread i scores position p0+i of a tile, then each
// thread accumulates its own output dimensions over the tile's values (coalesced V reads).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 64;

layout(binding = 1) readonly buffer Q { vec4 q4[]; };
layout(binding = 3) writeonly buffer O { float o[]; };
layout(binding = 4) readonly buffer KC { vec4 kc4[]; };
layout(binding = 5) readonly buffer VC { float vc[]; };
layout(binding = 6) readonly buffer P { uint params[]; };

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim;  // a multiple of 4, at most 256
    uint ld_q;      // floats between tokens in the q source
    uint ld_out;
} pc;

shared vec4 qs[64];
shared float ps[T];
shared float red[64];

float wg_max(float v) {
    v = subgroupMax(v);
    if (subgroupElect()) red[gl_SubgroupID] = v;
    barrier();
    float r = red[0];
    for (uint i = 1u; i < gl_NumSubgroups; i++) r = max(r, red[i]);
    barrier();
    return r;
}

float wg_sum(float v) {
    v = subgroupAdd(v);
    if (subgroupElect()) red[gl_SubgroupID] = v;
    barrier();
    float r = 0.0;
    for (uint i = 0u; i < gl_NumSubgroups; i++) r += red[i];
    barrier();
    return r;
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint h = gl_WorkGroupID.x, t = gl_WorkGroupID.y;
    const uint n_pos = params[0] + t + 1u;
    const uint hd = pc.head_dim, hd4 = pc.head_dim / 4u;
    const uint kv_dim = pc.n_kv_heads * hd;
    const uint kb = (h / (pc.n_heads / pc.n_kv_heads)) * hd; // this head's KV head
    const float scale = 1.0 / sqrt(float(hd));

    for (uint i = tid; i < hd4; i += T) qs[i] = q4[(t * pc.ld_q + h * hd) / 4u + i];
    barrier();

    float m = -1e30, l = 0.0;
    float acc[4] = float[4](0.0, 0.0, 0.0, 0.0);
    for (uint p0 = 0u; p0 < n_pos; p0 += T) {
        uint p = p0 + tid;
        float s = -1e30;
        if (p < n_pos) {
            uint kr = (p * kv_dim + kb) / 4u;
            float d = 0.0;
            for (uint i = 0u; i < hd4; i++) d += dot(qs[i], kc4[kr + i]);
            s = d * scale;
        }
        float m_new = max(m, wg_max(s));
        float e = p < n_pos ? exp(s - m_new) : 0.0;
        ps[tid] = e;
        float corr = exp(m - m_new);
        l = l * corr + wg_sum(e); // wg_sum's barrier also publishes ps
        uint cnt = min(T, n_pos - p0);
        for (uint k = 0u; k < 4u; k++) {
            uint d = tid + k * T;
            if (d < hd) {
                float a = acc[k] * corr;
                for (uint i = 0u; i < cnt; i++) a += ps[i] * vc[(p0 + i) * kv_dim + kb + d];
                acc[k] = a;
            }
        }
        m = m_new;
        barrier();
    }
    for (uint k = 0u; k < 4u; k++) {
        uint d = tid + k * T;
        if (d < hd) o[t * pc.ld_out + h * hd + d] = acc[k] / l;
    }
}
