#version 450
// Decode attention (one token), split-K flash-decoding: one workgroup per (group of HG query heads
// that share one KV head, chunk of cached positions). The chunk length grows with the context
// (at least CMIN positions, at most CH chunks), so a long context spreads over many workgroups and
// a short one (n_pos <= CMIN) is a single chunk done in one pass, with no partials and no merge.
// Each chunk keeps, per head, a running max and sum and its weighted values (online softmax over
// tiles of T positions), publishes them, and the last chunk of its head group to finish (an atomic
// count) merges them all, which saves a dispatch.
// The HG heads share every K/V load: K and V are read once per KV head, not once per query head.
// Per tile, thread i scores position p0+i against the HG queries (a whole K row per thread); then
// thread (octet o, group j) adds values 8o..8o+7 of positions p0+j, p0+j+J, ... (one 16-byte load
// each, coalesced over the octets) for all HG heads; the J group sums meet in shared memory once
// per chunk.
// EPI=1: the output is quantized for the output projection (act.glsl): no separate dispatch. Each
// workgroup that finishes whole Q8 blocks (HG x HD a multiple of 32) quantizes its heads, else the
// last to finish quantizes all.
#include "common.glsl"
#include "kvq8.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 128;   // threads and positions per tile; a multiple of HD / 8
layout(constant_id = 1) const uint KV16 = 1;  // the cache: 0 f32, 1 f16, 2 Q8_0 (kvq8.glsl; HD % 32 == 0)
layout(constant_id = 2) const uint HD = 128;  // head_dim: a multiple of 8, at most 256
layout(constant_id = 3) const uint HG = 1;    // query heads per workgroup, 1..8, all of one KV head
layout(constant_id = 4) const uint CH = 1;    // chunks per head group at most (the dispatch's y), <= 256
layout(constant_id = 5) const uint CMIN = 256; // fewest positions per chunk
layout(constant_id = 6) const uint EPI = 1;

#include "act.glsl"

layout(binding = 0) coherent buffer PART { float part[]; }; // (head group, chunk) x (m[HG], l[HG], acc[HG][HD])
layout(binding = 1) readonly buffer Q { vec4 q4[]; };
layout(binding = 4) readonly buffer KC { uvec4 kc8[]; }; // KV16: 8 halves per load
layout(binding = 4) readonly buffer KCF { vec4 kc4[]; };
layout(binding = 5) readonly buffer VC8 { uvec4 vc8[]; };
layout(binding = 5) readonly buffer VCF4 { vec4 vcf4[]; };
layout(binding = 4) readonly buffer KCQ { uvec4 kq4[]; };
layout(binding = 4) readonly buffer KCW { uint kqw[]; };
layout(binding = 5) readonly buffer VCQ { uvec2 vq2[]; };
layout(binding = 5) readonly buffer VCW { uint vqw[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) coherent buffer DONE { uint done[]; }; // finished chunks per head group

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim; // = HD
    uint ld_q;
    uint ld_out;
    uint out_base; // EPI: the activation half to fill, its width
    uint act_w;
} pc;

const uint OCT = HD / 8u, J = T / OCT;

// Loops over the HG <= 8 heads: a fixed count of 8, so that spirv-opt unrolls them and the per-head
// arrays below are indexed by constants only (HG is a specialization constant: a loop to it stays
// rolled until the driver, and indexed by a variable the arrays went to local memory on NVIDIA, 288
// bytes); the driver drops the heads past HG
#define FOR_HEADS(h) [[unroll]] for (uint h = 0u; h < 8u; h++) if (h < HG)

shared vec4 qs[HG * HD / 4u];
shared float ps[HG * T];
shared float red[HG * T]; // per-subgroup partials (any subgroup size)
shared float vs[J * HD];  // one head's J group sums of values
shared float wts[HG * CH];
shared float hstat[2u * HG];
shared bool last;

// Per head h < HG: the workgroup's max (mode 0) or sum (mode 1) of v[h].
void wg_reduce(inout float v[8], bool is_max) {
    FOR_HEADS(h) {
        float r = is_max ? subgroupMax(v[h]) : subgroupAdd(v[h]);
        if (subgroupElect()) red[h * gl_NumSubgroups + gl_SubgroupID] = r;
    }
    barrier();
    FOR_HEADS(h) v[h] = red[h * gl_NumSubgroups];
    for (uint i = 1u; i < gl_NumSubgroups; i++) // the heads innermost: a loop to 8 that unrolls
        FOR_HEADS(h) {
            float x = red[h * gl_NumSubgroups + i];
            v[h] = is_max ? max(v[h], x) : v[h] + x;
        }
}

// values col .. col + 7 of cached position p (col % 8 == 0)
void v_load(uint p, uint col, out vec4 a, out vec4 b) {
    const uint kv_dim = pc.n_kv_heads * HD, e = p * kv_dim + col;
    if (KV16 == 2u) {
        const uint row = p * kvq_row_words(kv_dim);
        const uvec2 w = vq2[(row + col / 4u) / 2u];
        const float d = KVQ_SCALE(vqw, row, kv_dim, col / 32u);
        a = d * I8X4(w.x);
        b = d * I8X4(w.y);
    } else if (KV16 != 0u) {
        uvec4 v = vc8[e / 8u];
        a = vec4(unpackHalf2x16(v.x), unpackHalf2x16(v.y));
        b = vec4(unpackHalf2x16(v.z), unpackHalf2x16(v.w));
    } else {
        a = vcf4[e / 4u];
        b = vcf4[e / 4u + 1u];
    }
}

// Quantize the finished heads [h0, h0 + HG) for the next product (EPI).
void finish(uint h0) {
    if (EPI == 0u) return;
    if ((HG * HD) % 32u == 0u) {
        memoryBarrierBuffer(); // the other threads' y writes
        barrier();
        act_fill(HG * HD, h0 * HD, h0 * HD, pc.out_base, pc.act_w, false, 0.0);
    } else if (act_arrive_last(0u, pc.n_heads / HG)) {
        act_fill(pc.n_heads * HD, 0u, 0u, pc.out_base, pc.act_w, false, 0.0);
    }
}

// The last chunk of head group grp: merge the n_act partials into y.
void merge(uint grp, uint n_act, uint h0) {
    const uint tid = gl_LocalInvocationID.x, stride = HG * (HD + 2u), b0 = grp * CH * stride;
    if (tid < HG) {
        float mx = -1e30;
        for (uint c = 0u; c < n_act; c++) mx = max(mx, part[b0 + c * stride + tid]);
        hstat[tid] = mx;
    }
    barrier();
    for (uint i = tid; i < HG * n_act; i += T) {
        const uint h = i / n_act, c = i - h * n_act;
        wts[h * CH + c] = exp(part[b0 + c * stride + h] - hstat[h]);
    }
    barrier();
    if (tid < HG) {
        float s = 0.0;
        for (uint c = 0u; c < n_act; c++) s += wts[tid * CH + c] * part[b0 + c * stride + HG + tid];
        hstat[HG + tid] = s;
    }
    barrier();
    for (uint i = tid; i < HG * HD; i += T) {
        const uint h = i / HD, d = i - h * HD;
        float a = 0.0;
        for (uint c = 0u; c < n_act; c++) a += wts[h * CH + c] * part[b0 + c * stride + 2u * HG + i];
        y[h0 * HD + i] = a / hstat[HG + h];
    }
    if (tid == 0u) done[grp] = 0u; // ready for the next step
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint grp = gl_WorkGroupID.x, chunk = gl_WorkGroupID.y;
    const uint h0 = grp * HG;
    const uint n_pos = params[0] + 1u;
    // chunk length: CMIN at least, whole tiles, at most CH chunks
    const uint per = ((max(CMIN, (n_pos + CH - 1u) / CH) + T - 1u) / T) * T;
    const uint n_act = (n_pos + per - 1u) / per;
    if (chunk >= n_act) return;
    const uint p_begin = chunk * per, p_end = min(n_pos, p_begin + per);
    const uint kv_dim = pc.n_kv_heads * HD;
    const uint kb = (h0 / (pc.n_heads / pc.n_kv_heads)) * HD; // the KV head's first element
    const float scale = 1.0 / sqrt(float(HD));
    for (uint i = tid; i < HG * HD / 4u; i += T) qs[i] = q4[h0 * HD / 4u + i];
    barrier();

    const uint o = tid % OCT, j = tid / OCT;
    float m[8], l[8]; // l: this thread's share of each head's sum (the scale factors are uniform)
    vec4 a0[8], a1[8];
    FOR_HEADS(h) {
        m[h] = -1e30;
        l[h] = 0.0;
        a0[h] = vec4(0.0);
        a1[h] = vec4(0.0);
    }
    for (uint p0 = p_begin; p0 < p_end; p0 += T) {
        const uint p = p0 + tid;
        const bool valid = p < p_end;
        float s[8];
        FOR_HEADS(h) s[h] = 0.0;
        if (valid) {
            if (KV16 == 2u) {
                const uint row = p * kvq_row_words(kv_dim), kr = (row + kb / 4u) / 4u;
                for (uint bi = 0u; bi < HD / 32u; bi++) {
                    const float d = KVQ_SCALE(kqw, row, kv_dim, kb / 32u + bi);
                    const uvec4 w0 = kq4[kr + 2u * bi], w1 = kq4[kr + 2u * bi + 1u];
                    FOR_HEADS(h) {
                        const uint qb = h * HD / 4u + 8u * bi;
                        const float a = (dot(qs[qb], I8X4(w0.x)) + dot(qs[qb + 1u], I8X4(w0.y))) +
                                        (dot(qs[qb + 2u], I8X4(w0.z)) + dot(qs[qb + 3u], I8X4(w0.w)));
                        const float b = (dot(qs[qb + 4u], I8X4(w1.x)) + dot(qs[qb + 5u], I8X4(w1.y))) +
                                        (dot(qs[qb + 6u], I8X4(w1.z)) + dot(qs[qb + 7u], I8X4(w1.w)));
                        s[h] += d * (a + b);
                    }
                }
            } else if (KV16 != 0u) {
                const uint kr = (p * kv_dim + kb) / 8u;
                for (uint i = 0u; i < HD / 8u; i++) {
                    const uvec4 k8 = kc8[kr + i];
                    const vec4 klo = vec4(unpackHalf2x16(k8.x), unpackHalf2x16(k8.y));
                    const vec4 khi = vec4(unpackHalf2x16(k8.z), unpackHalf2x16(k8.w));
                    FOR_HEADS(h)
                        s[h] += dot(qs[h * HD / 4u + 2u * i], klo) + dot(qs[h * HD / 4u + 2u * i + 1u], khi);
                }
            } else {
                const uint kr = (p * kv_dim + kb) / 4u;
                for (uint i = 0u; i < HD / 4u; i++) {
                    const vec4 k4 = kc4[kr + i];
                    FOR_HEADS(h) s[h] += dot(qs[h * HD / 4u + i], k4);
                }
            }
        }
        float t[8];
        FOR_HEADS(h) {
            s[h] = valid ? s[h] * scale : -1e30;
            t[h] = s[h];
        }
        wg_reduce(t, true);
        float corr[8];
        FOR_HEADS(h) {
            const float m_new = max(m[h], t[h]);
            const float e = valid ? exp(s[h] - m_new) : 0.0;
            ps[h * T + tid] = e;
            corr[h] = exp(m[h] - m_new);
            l[h] = l[h] * corr[h] + e;
            m[h] = m_new;
            a0[h] *= corr[h];
            a1[h] *= corr[h];
        }
        barrier(); // ps
        const uint cnt = min(T, p_end - p0), col = kb + 8u * o;
        uint i = j;
        for (; i + 3u * J < cnt; i += 4u * J) { // four loads in flight, then the adds
            vec4 va[4], vb[4];
            [[unroll]] for (uint u = 0u; u < 4u; u++) v_load(p0 + i + u * J, col, va[u], vb[u]);
            [[unroll]] for (uint u = 0u; u < 4u; u++)
                FOR_HEADS(h) {
                    const float w = ps[h * T + i + u * J];
                    a0[h] += w * va[u];
                    a1[h] += w * vb[u];
                }
        }
        for (; i < cnt; i += J) {
            vec4 va, vb;
            v_load(p0 + i, col, va, vb);
            FOR_HEADS(h) {
                const float w = ps[h * T + i];
                a0[h] += w * va;
                a1[h] += w * vb;
            }
        }
    }
    wg_reduce(l, false);
    // the J group sums of each head, through shared memory
    const bool one = n_act == 1u;
    const uint stride = HG * (HD + 2u), pb = (grp * CH + chunk) * stride;
    for (uint h = 0u; h < HG; h++) { // stays a loop (barriers, inner loops): head h's values by selection
        vec4 x0 = vec4(0.0), x1 = vec4(0.0);
        float lh = 1.0;
        FOR_HEADS(k) if (k == h) x0 = a0[k], x1 = a1[k], lh = l[k];
        barrier();
        [[unroll]] for (uint i = 0u; i < 4u; i++) {
            vs[j * HD + 8u * o + i] = x0[i];
            vs[j * HD + 8u * o + 4u + i] = x1[i];
        }
        barrier();
        for (uint d = tid; d < HD; d += T) {
            float a = 0.0;
            for (uint g = 0u; g < J; g++) a += vs[g * HD + d];
            if (one) y[(h0 + h) * HD + d] = a / lh;
            else part[pb + 2u * HG + h * HD + d] = a;
        }
    }
    if (one) {
        finish(h0);
        return;
    }
    FOR_HEADS(h) // constant indices: the arrays stay in registers
        if (tid == h) {
            part[pb + h] = m[h];
            part[pb + HG + h] = l[h];
        }
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) last = atomicAdd(done[grp], 1u) == n_act - 1u;
    barrier();
    if (!last) return;
    memoryBarrierBuffer();
    merge(grp, n_act, h0);
    finish(h0);
}
