#version 450
// Decode attention (one token), split-K flash-decoding without shared memory in the main loop (the
// second decode kernel; attn_decode.comp is the first). One workgroup per (group of HG query heads
// that share one KV head, chunk of cached positions); chunks are short (CMIN positions at least, at
// most CH chunks), so a long context gives several workgroups per compute unit and a short one still
// a few.
// Inside a workgroup, a cluster of C threads (a power of two, at most the subgroup size) owns one
// cached position at a time: lane j loads the 8-element units j, j + C, .. of the KV head's K row
// (one 16-byte load per unit for f16: the cluster reads the row coalesced), dots them with the same
// dims of each of the HG queries (kept in registers), and a butterfly of subgroupShuffleXor gives
// every lane of the cluster each head's full score, with the same bits in every lane (IEEE addition
// is commutative). Online softmax (running max m and sum l per head, identical in the cluster's
// lanes) and the value sums acc[HG][units] stay in registers, V read in the same unit layout. The
// clusters stride over the chunk, U positions per step, their K and V loads issued together.
// At the end the clusters meet once in shared memory; the chunks' partials (m, l, acc per head) then
// merge in two levels: the last chunk to finish of each block of MB consecutive chunks merges the
// block (an atomic count per block), the last block to finish merges the blocks (a count per head
// group). Each merge reads at most MB partials, so no single workgroup reads them all.
// EPI=1: the output is quantized for the output projection (act.glsl), as attn_decode.comp does.
#extension GL_KHR_shader_subgroup_shuffle : require
#include "common.glsl"
#include "kvq8.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 128;   // threads per workgroup, a multiple of C
layout(constant_id = 1) const uint KV16 = 1;  // the cache: 0 f32, 1 f16, 2 Q8_0 (kvq8.glsl; HD % 32 == 0)
layout(constant_id = 2) const uint HD = 128;  // head_dim: a multiple of 8, at most 32 C (4 units a lane)
layout(constant_id = 3) const uint HG = 1;    // query heads per workgroup, 1..8, all of one KV head
layout(constant_id = 4) const uint CH = 1;    // chunks per head group at most (the dispatch's y), <= MB * MB
layout(constant_id = 5) const uint CMIN = 32; // fewest positions per chunk
layout(constant_id = 6) const uint EPI = 1;
layout(constant_id = 7) const uint C = 16;    // threads per cluster: a power of two, <= the subgroup size

#include "act.glsl"

const uint U = 4u;                   // positions per cluster per step
const uint NU = HD / 8u;             // 8-element units per K/V row of a head
const uint R = (NU + C - 1u) / C;    // units per lane (<= 4)
const uint NC = T / C;               // clusters per workgroup
const uint MB = 16u;                 // partials per merge at most
const uint S = HG * HD + 16u;        // floats per partial: acc[HG][HD], m at HG HD, l at HG HD + 8

// unit j + r C of a lane exists (r < R): always where the lanes divide the row, no test at all
bool unit_ok(uint u) { return NU % C == 0u || u < NU; }

layout(binding = 0) coherent buffer PART { float part[]; }; // chunk partials, then block partials
layout(binding = 0) coherent buffer PART4 { vec4 part4[]; };
layout(binding = 1) readonly buffer Q { vec4 q4[]; };
layout(binding = 4) readonly buffer KC { uvec4 kc[]; };   // f16: 8 halves; f32: 4 floats a load
layout(binding = 4) readonly buffer KCQ { uvec2 kq2[]; }; // Q8: 8 int8 a load
layout(binding = 4) readonly buffer KCW { uint kqw[]; };
layout(binding = 5) readonly buffer VC { uvec4 vc[]; };
layout(binding = 5) readonly buffer VCQ { uvec2 vq2[]; };
layout(binding = 5) readonly buffer VCW { uint vqw[]; };
layout(binding = 6) readonly buffer P { uint params[]; };
layout(binding = 7) coherent buffer DONE { uint done[]; }; // per head group: blocks done; then per block: chunks done

layout(push_constant) uniform PC {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim; // = HD
    uint ld_q;
    uint ld_out;
    uint out_base; // EPI: the activation half to fill, its width
    uint act_w;
} pc;

shared vec4 sacc[NC * HD / 4u]; // one head's cluster sums
shared float sml[2u * NC * HG]; // the clusters' m, then l
shared float wts[HG * MB];
shared float mls[2u * HG * MB]; // a merge's partials' m and l
shared float hstat[2u * HG];
shared bool last;

// The raw unit u (element 8u of the head) of position p of a K (k) or V cache: ra (and rb for f32)
// as loaded; decoded later so that all of a step's loads are in flight together.
void unit_load(bool k, uint p, uint kb, uint u, out uvec4 ra, out uvec4 rb) {
    const uint kv_dim = pc.n_kv_heads * HD, col = kb + 8u * u;
    rb = uvec4(0u);
    if (KV16 == 2u) {
        const uint row = p * kvq_row_words(kv_dim), sw = kvq_scale_word(row, kv_dim, col / 32u);
        const uvec2 w = k ? kq2[(row + col / 4u) / 2u] : vq2[(row + col / 4u) / 2u];
        ra = uvec4(w, k ? kqw[sw] : vqw[sw], (col / 32u) & 1u);
    } else if (KV16 != 0u) {
        ra = k ? kc[(p * kv_dim + col) / 8u] : vc[(p * kv_dim + col) / 8u];
    } else {
        const uint e = (p * kv_dim + col) / 4u;
        ra = k ? kc[e] : vc[e];
        rb = k ? kc[e + 1u] : vc[e + 1u];
    }
}

void unit_decode(uvec4 ra, uvec4 rb, out vec4 lo, out vec4 hi) {
    if (KV16 == 2u) {
        const float d = unpackHalf2x16(ra.z >> (16u * ra.w)).x;
        lo = d * I8X4(ra.x);
        hi = d * I8X4(ra.y);
    } else if (KV16 != 0u) {
        lo = vec4(unpackHalf2x16(ra.x), unpackHalf2x16(ra.y));
        hi = vec4(unpackHalf2x16(ra.z), unpackHalf2x16(ra.w));
    } else {
        lo = uintBitsToFloat(ra);
        hi = uintBitsToFloat(rb);
    }
}

// Quantize the finished heads [h0, h0 + HG) for the next product (EPI), as attn_decode.comp.
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

// Merge the n (1..MB) partials from float src (stride S) into y (out_y) or into the partial at dst.
// Two trips to memory: all the partials' m and l at once, then all their sums at once.
void merge(uint src, uint n, bool out_y, uint dst, uint h0) {
    const uint tid = gl_LocalInvocationID.x;
    barrier(); // wts / hstat of an earlier merge
    for (uint i = tid; i < 2u * HG * n; i += T) {
        const uint c = i / (2u * HG), k = i - c * 2u * HG; // k < HG: m of head k, else l of head k - HG
        mls[i] = part[src + c * S + HG * HD + (k < HG ? k : 8u + k - HG)];
    }
    barrier();
    if (tid < HG) {
        float mx = -1e30;
        for (uint c = 0u; c < n; c++) mx = max(mx, mls[c * 2u * HG + tid]);
        float s = 0.0;
        for (uint c = 0u; c < n; c++) {
            const float w = exp(mls[c * 2u * HG + tid] - mx);
            wts[tid * MB + c] = w;
            s += w * mls[c * 2u * HG + HG + tid];
        }
        hstat[tid] = mx;
        hstat[HG + tid] = s;
    }
    barrier();
    for (uint i = tid; i < HG * HD / 4u; i += T) {
        const uint h = 4u * i / HD;
        vec4 a = vec4(0.0);
        for (uint c = 0u; c < MB; c++) // a constant bound: the loads go out together
            if (c < n) a += wts[h * MB + c] * part4[(src + c * S) / 4u + i];
        if (out_y) y4[h0 * HD / 4u + i] = a / hstat[HG + h];
        else part4[dst / 4u + i] = a;
    }
    if (!out_y && tid < HG) {
        part[dst + HG * HD + tid] = hstat[tid];
        part[dst + HG * HD + 8u + tid] = hstat[HG + tid];
    }
}

// Counts one more finished item on done[slot] (whole workgroup); true in the last of n, which resets it.
bool arrive_last(uint slot, uint n) {
    memoryBarrierBuffer(); // this workgroup's partial writes, before the count says they are done
    barrier();
    if (gl_LocalInvocationID.x == 0u) {
        last = atomicAdd(done[slot], 1u) == n - 1u;
        if (last) done[slot] = 0u; // ready for the next step (nobody else counts here this step)
    }
    barrier();
    if (!last) return false;
    memoryBarrierBuffer();
    return true;
}

void main() {
    const uint tid = gl_LocalInvocationID.x, cl = tid / C, j = tid % C;
    const uint grp = gl_WorkGroupID.x, chunk = gl_WorkGroupID.y, groups = pc.n_heads / HG;
    const uint h0 = grp * HG;
    const uint n_pos = params[0] + 1u;
    const uint per = max(CMIN, (n_pos + CH - 1u) / CH);
    const uint n_act = (n_pos + per - 1u) / per;
    if (chunk >= n_act) return;
    const uint p_begin = chunk * per, p_end = min(n_pos, p_begin + per);
    const uint kb = (h0 / (pc.n_heads / pc.n_kv_heads)) * HD; // the KV head's first element
    const float scale = 1.0 / sqrt(float(HD));

    vec4 qv[8][8], acc[8][8]; // [head][2 r], [2 r + 1]: unit j + r C of the head
    float m[8], l[8];
    for (uint h = 0u; h < HG; h++) {
        m[h] = -1e30;
        l[h] = 0.0;
        for (uint r = 0u; r < R; r++) {
            const uint u = j + r * C;
            qv[h][2u * r] = unit_ok(u) ? q4[(h0 + h) * HD / 4u + 2u * u] : vec4(0.0);
            qv[h][2u * r + 1u] = unit_ok(u) ? q4[(h0 + h) * HD / 4u + 2u * u + 1u] : vec4(0.0);
            acc[h][2u * r] = vec4(0.0);
            acc[h][2u * r + 1u] = vec4(0.0);
        }
    }

    // every cluster takes the same steps (uniform control flow around the shuffles), masked past the end
    for (uint ps = p_begin; ps < p_end; ps += U * NC) {
        const uint p0 = ps + cl;
        uvec4 ka[U][4], kb2[U][4], va[U][4], vb[U][4];
        for (uint t = 0u; t < U; t++) {
            const uint p = min(p0 + t * NC, p_end - 1u); // past the end: a valid row, masked below
            for (uint r = 0u; r < R; r++) {
                const uint u = j + r * C;
                if (unit_ok(u)) {
                    unit_load(true, p, kb, u, ka[t][r], kb2[t][r]);
                    unit_load(false, p, kb, u, va[t][r], vb[t][r]);
                } else {
                    ka[t][r] = kb2[t][r] = va[t][r] = vb[t][r] = uvec4(0u);
                }
            }
        }
        float s[U][8];
        for (uint t = 0u; t < U; t++) {
            vec4 klo[4], khi[4];
            for (uint r = 0u; r < R; r++) unit_decode(ka[t][r], kb2[t][r], klo[r], khi[r]);
            for (uint h = 0u; h < HG; h++) {
                float d = 0.0;
                for (uint r = 0u; r < R; r++) d += dot(qv[h][2u * r], klo[r]) + dot(qv[h][2u * r + 1u], khi[r]);
                for (uint o = C / 2u; o > 0u; o >>= 1) d += subgroupShuffleXor(d, o);
                s[t][h] = d * scale;
            }
        }
        for (uint h = 0u; h < HG; h++) {
            float mx = m[h];
            for (uint t = 0u; t < U; t++)
                if (p0 + t * NC < p_end) mx = max(mx, s[t][h]);
            const float corr = exp(m[h] - mx);
            m[h] = mx;
            l[h] *= corr;
            for (uint r = 0u; r < 2u * R; r++) acc[h][r] *= corr;
            for (uint t = 0u; t < U; t++) {
                const float w = p0 + t * NC < p_end ? exp(s[t][h] - mx) : 0.0;
                l[h] += w;
                for (uint r = 0u; r < R; r++) {
                    vec4 vlo, vhi;
                    unit_decode(va[t][r], vb[t][r], vlo, vhi);
                    acc[h][2u * r] += w * vlo;
                    acc[h][2u * r + 1u] += w * vhi;
                }
            }
        }
    }

    // the clusters meet: each head's max over the workgroup, every cluster's sums rescaled to it
    if (j == 0u)
        for (uint h = 0u; h < HG; h++) {
            sml[cl * HG + h] = m[h];
            sml[(NC + cl) * HG + h] = l[h];
        }
    barrier();
    float mw[8], lw[8];
    for (uint h = 0u; h < HG; h++) {
        float mx = -1e30;
        for (uint c = 0u; c < NC; c++) mx = max(mx, sml[c * HG + h]);
        float s = 0.0;
        for (uint c = 0u; c < NC; c++) s += exp(sml[c * HG + h] - mx) * sml[(NC + c) * HG + h];
        mw[h] = mx;
        lw[h] = s;
    }
    const bool one = n_act == 1u;
    const uint pb = (grp * CH + chunk) * S;
    for (uint h = 0u; h < HG; h++) {
        const float w = exp(m[h] - mw[h]);
        barrier(); // the previous head's sums are read
        for (uint r = 0u; r < R; r++) {
            const uint u = j + r * C;
            if (unit_ok(u)) {
                sacc[cl * HD / 4u + 2u * u] = w * acc[h][2u * r];
                sacc[cl * HD / 4u + 2u * u + 1u] = w * acc[h][2u * r + 1u];
            }
        }
        barrier();
        for (uint i = tid; i < HD / 4u; i += T) {
            vec4 a = vec4(0.0);
            for (uint c = 0u; c < NC; c++) a += sacc[c * HD / 4u + i];
            if (one) y4[(h0 + h) * HD / 4u + i] = a / lw[h];
            else part4[(pb + h * HD) / 4u + i] = a;
        }
    }
    if (one) {
        finish(h0);
        return;
    }
    for (uint h = 0u; h < HG; h++) // constant indices: the arrays stay in registers
        if (tid == h) {
            part[pb + HG * HD + h] = mw[h];
            part[pb + HG * HD + 8u + h] = lw[h];
        }
    // level 1: the last chunk of its block merges the block's partials
    const uint nb = (n_act + MB - 1u) / MB, blk = chunk / MB, first = blk * MB;
    const uint in_blk = min(MB, n_act - first);
    if (!arrive_last(groups + grp * MB + blk, in_blk)) return;
    const uint bpart = (groups * CH + grp * MB + blk) * S; // the block partials follow the chunk partials
    if (nb == 1u) {
        merge((grp * CH + first) * S, in_blk, true, 0u, h0);
        finish(h0);
        return;
    }
    merge((grp * CH + first) * S, in_blk, false, bpart, h0);
    // level 2: the last block merges the blocks
    if (!arrive_last(grp, nb)) return;
    merge((groups * CH + grp * MB) * S, nb, true, 0u, h0);
    finish(h0);
}
