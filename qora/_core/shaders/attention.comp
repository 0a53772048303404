#version 450
// Causal GQA attention: one workgroup per (query head, token, split), over cached positions
// 0..pos of the KV cache (f16 or f32: KV16).
// Decode has one token and few heads, too few workgroups to fill a GPU or to stream a long
// context fast, so the positions are split over SPLITS workgroups (flash-decoding): each writes
// its running max, sum and weighted values, and the last one to finish (an atomic count) merges
// them, which saves a dispatch.
// Softmax is computed online in tiles of T positions (running max and sum), so any context
// length works with fixed shared memory; thread i scores position p0+i of a tile, then each
// thread accumulates its own output dimensions over the tile's values (coalesced V reads).
// EPI=1 (decode): the output is quantized for the next product (act.glsl), which saves a dispatch:
// each head's by the workgroup that writes it when a head is whole Q8 blocks, else all of it by
// the last workgroup to finish.
// Short contexts (n_pos <= SHORT, a spec constant, at most 4 T): split 0 does the whole head in
// one pass and the other splits exit at once. Splitting a short context buys no bandwidth and its
// publish / count / merge chain of dependent memory round trips cost more than the attention itself.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 64;
layout(constant_id = 1) const uint KV16 = 1;
layout(constant_id = 2) const uint SPLITS = 1;
layout(constant_id = 3) const uint EPI = 0;
layout(constant_id = 4) const uint HD = 128; // head_dim: a constant, so the per-position loops unroll
layout(constant_id = 5) const uint SHORT = 0; // one-pass path up to this many positions (0: never)

#include "act.glsl"

layout(binding = 0) coherent buffer PART { float part[]; }; // SPLITS > 1: (token, head, split) x (m, l, hd values)
layout(binding = 1) readonly buffer Q { vec4 q4[]; };
layout(binding = 4) readonly buffer KC { uvec4 kc8[]; }; // KV16: 8 halves per load
layout(binding = 4) readonly buffer KCF { vec4 kc4[]; };
layout(binding = 5) readonly buffer VC { uint vc2[]; };  // KV16: 2 halves per word
layout(binding = 5) readonly buffer VCF { float vcf[]; };
layout(binding = 5) readonly buffer VC8 { uvec4 vc8[]; };  // KV16: 8 halves per load
layout(binding = 5) readonly buffer VCF4 { vec4 vcf4[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) coherent buffer DONE { uint done[]; }; // SPLITS > 1: finished splits per (token, head)

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim;  // = HD: a multiple of 8, at most 256
    uint ld_q;      // floats between tokens in the q source
    uint ld_out;
    uint out_base;  // EPI: the activation half to fill, its width
    uint act_w;
} pc;

shared vec4 qs[64];
shared float ps[4u * T];  // the long path uses [0, T)
shared float vs[8u * T];  // the short path's per-group value sums
shared float red[64];
shared bool last;

float v_at(uint e) { return KV16 != 0u ? unpackHalf2x16(vc2[e / 2u])[e & 1u] : vcf[e]; }

// q . k of cached position p (q in qs)
float k_dot(uint p, uint kv_dim, uint kb) {
    float d = 0.0;
    if (KV16 != 0u) {
        uint kr = (p * kv_dim + kb) / 8u;
        for (uint i = 0u; i < HD / 8u; i++) {
            uvec4 k8 = kc8[kr + i];
            d += dot(qs[2u * i], vec4(unpackHalf2x16(k8.x), unpackHalf2x16(k8.y))) +
                 dot(qs[2u * i + 1u], vec4(unpackHalf2x16(k8.z), unpackHalf2x16(k8.w)));
        }
    } else {
        uint kr = (p * kv_dim + kb) / 4u;
        for (uint i = 0u; i < HD / 4u; i++) d += dot(qs[i], kc4[kr + i]);
    }
    return d;
}

// Values e .. e+7 of the V cache (e % 8 == 0), added to a0 (first four) and a1 times w.
void v_add8(uint e, float w, inout vec4 a0, inout vec4 a1) {
    if (KV16 != 0u) {
        uvec4 v = vc8[e / 8u];
        a0 += w * vec4(unpackHalf2x16(v.x), unpackHalf2x16(v.y));
        a1 += w * vec4(unpackHalf2x16(v.z), unpackHalf2x16(v.w));
    } else {
        a0 += w * vcf4[e / 4u];
        a1 += w * vcf4[e / 4u + 1u];
    }
}

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

// Decode: prepare the input of the output projection once head h's output is written (one token;
// with SPLITS > 1 only the merging workgroups get here).
void finish(uint h) {
    if (EPI == 0u) return;
    if (HD % 32u == 0u) {
        memoryBarrierBuffer(); // the other threads' y writes
        barrier();
        act_fill(HD, h * HD, h * HD, pc.out_base, pc.act_w, false, 0.0);
    } else if (act_arrive_last(0u, pc.n_heads)) {
        act_fill(pc.n_heads * HD, 0u, 0u, pc.out_base, pc.act_w, false, 0.0);
    }
}

// The short path: thread i scores positions i, i+T, ... (whole K rows); then thread (octet o, group g)
// sums values 8o..8o+7 over positions g, g+G, ..., eight loads in flight; the G group sums meet in
// shared memory. Writes the head's output to y[ob, ob + HD).
void short_head(uint n_pos, uint kv_dim, uint kb, float scale, uint ob) {
    const uint tid = gl_LocalInvocationID.x;
    float s[4];
    float mx = -1e30;
    for (uint k = 0u; k < 4u; k++) {
        const uint p = tid + k * T;
        s[k] = -1e30;
        if (k * T < SHORT && p < n_pos) s[k] = k_dot(p, kv_dim, kb) * scale;
        mx = max(mx, s[k]);
    }
    mx = wg_max(mx);
    float e_sum = 0.0;
    for (uint k = 0u; k < 4u; k++) {
        const uint p = tid + k * T;
        if (k * T < SHORT) {
            float e = p < n_pos ? exp(s[k] - mx) : 0.0;
            ps[p] = e;
            e_sum += e;
        }
    }
    const float l = wg_sum(e_sum); // its barrier also publishes ps
    const uint OCT = HD / 8u, G = T / OCT;
    const uint o = tid % OCT, g = tid / OCT;
    if (g < G) {
        vec4 a0 = vec4(0.0), a1 = vec4(0.0);
        const uint e0 = kb + 8u * o;
        uint p = g;
        for (; p + 7u * G < n_pos; p += 8u * G)
            for (uint j = 0u; j < 8u; j++) v_add8((p + j * G) * kv_dim + e0, ps[p + j * G], a0, a1);
        for (; p < n_pos; p += G) v_add8(p * kv_dim + e0, ps[p], a0, a1);
        const uint vb = g * HD + 8u * o;
        for (uint i = 0u; i < 4u; i++) {
            vs[vb + i] = a0[i];
            vs[vb + 4u + i] = a1[i];
        }
    }
    barrier();
    for (uint d = tid; d < HD; d += T) {
        float a = 0.0;
        for (uint i = 0u; i < G; i++) a += vs[i * HD + d];
        y[ob + d] = a / l;
    }
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint h = gl_WorkGroupID.x, t = gl_WorkGroupID.y, split = gl_WorkGroupID.z;
    const uint n_pos = params[0] + t + 1u;
    const uint per = (n_pos + SPLITS - 1u) / SPLITS; // positions of each split
    const uint p_begin = min(n_pos, split * per), p_end = min(n_pos, p_begin + per);
    const uint hd = HD, hd4 = HD / 4u;
    const uint kv_dim = pc.n_kv_heads * hd;
    const uint kb = (h / (pc.n_heads / pc.n_kv_heads)) * hd; // this head's KV head
    const float scale = 1.0 / sqrt(float(hd));

    const bool short_ctx = n_pos <= min(SHORT, 4u * T); // ps holds 4 T scores
    if (short_ctx && split != 0u) return; // split 0 takes the whole head
    for (uint i = tid; i < hd4; i += T) qs[i] = q4[(t * pc.ld_q + h * hd) / 4u + i];
    barrier();
    if (short_ctx) {
        short_head(n_pos, kv_dim, kb, scale, t * pc.ld_out + h * hd);
        finish(h);
        return;
    }

    float m = -1e30, l = 0.0;
    float acc[4] = float[4](0.0, 0.0, 0.0, 0.0);
    for (uint p0 = p_begin; p0 < p_end; p0 += T) {
        uint p = p0 + tid;
        float s = -1e30;
        if (p < p_end) {
            s = k_dot(p, kv_dim, kb) * scale;
        }
        float m_new = max(m, wg_max(s));
        float e = p < p_end ? exp(s - m_new) : 0.0;
        ps[tid] = e;
        float corr = exp(m - m_new);
        l = l * corr + wg_sum(e); // wg_sum's barrier also publishes ps
        uint cnt = min(T, p_end - p0);
        for (uint k = 0u; k < 4u; k++) {
            uint d = tid + k * T;
            if (d < hd) {
                float a = acc[k] * corr;
                uint i = 0u;
                for (; i + 4u <= cnt; i += 4u) { // four loads in flight, then the adds in order
                    uint e = (p0 + i) * kv_dim + kb + d;
                    vec4 v = vec4(v_at(e), v_at(e + kv_dim), v_at(e + 2u * kv_dim), v_at(e + 3u * kv_dim));
                    a += ps[i] * v.x;
                    a += ps[i + 1u] * v.y;
                    a += ps[i + 2u] * v.z;
                    a += ps[i + 3u] * v.w;
                }
                for (; i < cnt; i++) a += ps[i] * v_at((p0 + i) * kv_dim + kb + d);
                acc[k] = a;
            }
        }
        m = m_new;
        barrier();
    }
    const uint ob = t * pc.ld_out + h * hd;
    if (SPLITS == 1u) {
        for (uint k = 0u; k < 4u; k++) {
            uint d = tid + k * T;
            if (d < hd) y[ob + d] = acc[k] / l;
        }
        finish(h);
        return;
    }
    // publish this split, count it; the last split of (token, head) merges them all
    const uint slot = t * pc.n_heads + h, stride = hd + 2u;
    const uint pb = (slot * SPLITS + split) * stride;
    if (tid == 0u) {
        part[pb] = m;
        part[pb + 1u] = l;
    }
    for (uint k = 0u; k < 4u; k++) {
        uint d = tid + k * T;
        if (d < hd) part[pb + 2u + d] = acc[k];
    }
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) last = atomicAdd(done[slot], 1u) == SPLITS - 1u;
    barrier();
    if (!last) return;
    memoryBarrierBuffer();
    const uint b0 = slot * SPLITS * stride;
    float mx = -1e30;
    for (uint i = 0u; i < SPLITS; i++) mx = max(mx, part[b0 + i * stride]);
    float sum = 0.0;
    for (uint i = 0u; i < SPLITS; i++) sum += exp(part[b0 + i * stride] - mx) * part[b0 + i * stride + 1u];
    for (uint k = 0u; k < 4u; k++) {
        uint d = tid + k * T;
        if (d < hd) {
            float a = 0.0;
            for (uint i = 0u; i < SPLITS; i++) a += exp(part[b0 + i * stride] - mx) * part[b0 + i * stride + 2u + d];
            y[ob + d] = a / sum;
        }
    }
    if (tid == 0u) done[slot] = 0u; // ready for the next step
    finish(h);
}
