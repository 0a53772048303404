#version 450
// Sampling candidates where the logits are (include/qora/sample.h finishes on the host): one
// workgroup finds, by a radix select over order-preserving keys of the logits, a threshold T such
// that the logits >= T number at least `need` and (unless ties at T are too many) a few times that, and
// writes those (value, id) pairs: a superset of the top `need`, whatever the tie order. It also
// gathers the logits of the ids the host adjusts (penalties, bias, bans). The host reads back these
// few kilobytes instead of the whole logits row. One workgroup: a few passes over one row are cheaper
// than a second dispatch and a merge.
layout(local_size_x = 256) in;

layout(binding = 0) readonly buffer L { float logits[]; };
layout(binding = 1) readonly buffer S { uint sin_[]; };  // need, n_gather, gather ids...
layout(binding = 2) writeonly buffer O { uint outw[]; }; // count, flags, T, total, cap x (value, id), gathered

layout(push_constant) uniform PC {
    uint n;    // logits
    uint cap;  // candidate pairs room
} pc;

const uint COPIES = 8u; // histogram copies: the first digits of most logits are the same few bins
shared uint hist[COPIES * 256u];
shared uint s_prefix, s_mask, s_above, s_thr, s_done, s_count, s_nan;

uint key_of(float x) {
    uint u = floatBitsToUint(x);
    if (u == 0x80000000u) u = 0u;  // -0 and +0 are one value
    return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint need = max(1u, min(sin_[0], pc.n));
    const uint want = min(pc.cap, max(2u * need, 64u));  // stop refining once this few remain
    if (tid == 0u) {
        s_prefix = 0u; s_mask = 0u; s_above = 0u; s_thr = 0u; s_done = 0u; s_count = 0u; s_nan = 0u;
    }
    barrier();
    for (uint pass = 0u; pass < 4u; pass++) {
        const uint shift = 24u - 8u * pass;
        for (uint j = tid; j < COPIES * 256u; j += 256u) hist[j] = 0u;
        barrier();
        const uint prefix = s_prefix, mask = s_mask, copy = (tid % COPIES) * 256u;
        for (uint i = tid; i < pc.n; i += 256u) {
            const float x = logits[i];
            if (pass == 0u && isnan(x)) s_nan = 1u;
            const uint k = key_of(x);
            if ((k & mask) == prefix) atomicAdd(hist[copy + ((k >> shift) & 255u)], 1u);
        }
        barrier();
        for (uint c = 1u; c < COPIES; c++) hist[tid] += hist[c * 256u + tid];
        barrier();
        if (tid == 0u) {
            // the highest digit b whose bin, with everything above it, reaches `need`
            uint acc = s_above, b = 255u;
            while (b > 0u && acc + hist[b] < need) {
                acc += hist[b];
                b--;
            }
            s_thr = prefix | (b << shift);  // keys >= s_thr: acc + hist[b] of them
            if (acc + hist[b] <= want || pass == 3u) {
                s_done = 1u;
            } else {  // too many in bin b: look at its next digit
                s_prefix = s_thr;
                s_mask = mask | (255u << shift);
                s_above = acc;
            }
        }
        barrier();
        if (s_done != 0u) break;
    }
    const uint thr = s_thr;
    for (uint i = tid; i < pc.n; i += 256u) {
        const float x = logits[i];
        if (key_of(x) >= thr) {
            const uint slot = atomicAdd(s_count, 1u);
            if (slot < pc.cap) {
                outw[4u + 2u * slot] = floatBitsToUint(x);
                outw[5u + 2u * slot] = i;
            }
        }
    }
    const uint ng = sin_[1];
    for (uint j = tid; j < ng; j += 256u) {
        const uint id = sin_[2u + j];
        outw[4u + 2u * pc.cap + j] = id < pc.n ? floatBitsToUint(logits[id]) : 0u;
    }
    barrier();
    if (tid == 0u) {
        outw[0] = min(s_count, pc.cap);
        outw[1] = (s_count > pc.cap ? 1u : 0u) | (s_nan != 0u ? 2u : 0u);
        outw[2] = thr;
        outw[3] = s_count;
    }
}
