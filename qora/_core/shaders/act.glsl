// qora — the decode "activation" buffer and the step that fills it (included after common.glsl by
// shaders that declare `const uint T` (threads per workgroup) and read binding 3 as y / y4).
//
// A decode product's input is prepared once per token, not once per workgroup: the vector (optionally
// RMS-normalized) goes to one half of the activation buffer (binding 8) as
//   floats   [base, base + W)                               for F16/F32 weights
//   Q8 ints  [base + W, base + W + W/4): 8 words per block  for Q4/Q8 weights (packed int8)
//   scales   [base + W + W/4, ...): per block (d, sum of the ints) as a vec2
// (W = act_w, a multiple of 128 at least the widest input; offsets in words). The quantization is
// the CPU engine's (same scale, same rounding), so the integer block dots come out identical.
// A producing dispatch runs this in its last workgroup to finish (an atomic count in binding 9), or
// where no norm is needed, per Q8 block in the last workgroup to finish that block: no extra
// dispatch, and the consumers read a ready input.

layout(binding = 3) coherent buffer Y { float y[]; };
layout(binding = 3) coherent buffer Y4 { vec4 y4[]; };
layout(binding = 8) buffer ACTF { vec4 af4[]; };
layout(binding = 8) buffer ACTQ { uvec4 aq4[]; };
layout(binding = 8) buffer ACTD { vec2 ad2[]; };
layout(binding = 9) coherent buffer CNT { uint cnt[]; };
layout(binding = 10) readonly buffer NQ { vec4 nq4[]; };

shared float act_red[64];
shared float act_inv_rms;
shared bool act_last;

uint act_q4(uint base, uint w) { return (base + w) / 4u; }          // uvec4 index of the Q8 ints
uint act_d2(uint base, uint w) { return (base + w + w / 4u) / 2u; } // vec2 index of the scales

// One Q8 block v (8 vec4) stored as floats and packed ints + (scale, sum), block b of the output.
void act_store_block(vec4 v[8], uint b, uint fb, uint qb, uint db) {
    float amax = 0.0;
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        af4[fb + 8u * b + i] = v[i];
        vec4 a = abs(v[i]);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    float d, id;
    q8_scales(amax, d, id);
    float sum = 0.0;
    uint words[8];
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        vec4 q = roundEven(v[i] * id);
        sum += (q.x + q.y) + (q.z + q.w);
        ivec4 iq = ivec4(q) & 0xFF;
        words[i] = uint(iq.x | (iq.y << 8) | (iq.z << 16) | (iq.w << 24));
    }
    aq4[qb + 2u * b] = uvec4(words[0], words[1], words[2], words[3]);
    aq4[qb + 2u * b + 1u] = uvec4(words[4], words[5], words[6], words[7]);
    ad2[db + b] = vec2(d, sum);
}

// 1 / rms of n values from each thread's partial sum of squares (the whole workgroup calls it).
float act_rms_scale(float ss, uint n, float eps) {
    ss = subgroupAdd(ss);
    if (subgroupElect()) act_red[gl_SubgroupID] = ss;
    barrier();
    if (gl_LocalInvocationID.x == 0u) {
        float t = 0.0;
        for (uint i = 0u; i < gl_NumSubgroups; i++) t += act_red[i];
        act_inv_rms = 1.0 / sqrt(t / float(n) + eps);
    }
    barrier();
    return act_inv_rms;
}

// RMS-normalize and quantize with at most one Q8 block per thread: the block and its norm weights
// are loaded once, before the sum of squares, and kept in registers (one memory round trip instead
// of two). The sum order depends only on n and the subgroup size, not on T.
void act_fill_norm1(uint n, uint s4, uint dst, uint base, uint w, float eps) {
    const uint tid = gl_LocalInvocationID.x, nb = n / 32u;
    vec4 v[8], g[8];
    float ss = 0.0;
    if (tid < nb) {
        [[unroll]] for (uint i = 0u; i < 8u; i++) {
            v[i] = y4[s4 + 8u * tid + i];
            g[i] = nq4[dst / 4u + 8u * tid + i];
        }
        [[unroll]] for (uint i = 0u; i < 8u; i++) ss += dot(v[i], v[i]);
    }
    const float s = act_rms_scale(ss, n, eps);
    if (tid < nb) {
        [[unroll]] for (uint i = 0u; i < 8u; i++) v[i] = g[i] * (v[i] * s);
        act_store_block(v, dst / 32u + tid, base / 4u, act_q4(base, w), act_d2(base, w));
    }
}

// Elements y[src, src + n) (n % 4 == 0, src % 4 == 0), times nq / rms if norm, into elements
// [dst, dst + n) of the half at base (dst % 32 == 0 when n % 32 == 0).
void act_fill(uint n, uint src, uint dst, uint base, uint w, bool norm, float eps) {
    const uint tid = gl_LocalInvocationID.x;
    const uint s4 = src / 4u, n4 = n / 4u;
    if (norm && n % 32u == 0u && n <= 32u * T) {
        act_fill_norm1(n, s4, dst, base, w, eps);
        return;
    }
    float s = 1.0;
    if (norm) {
        float ss = 0.0;
        for (uint i = tid; i < n4; i += 4u * T) { // four loads in flight per thread
            vec4 a = y4[s4 + i];
            vec4 b = i + T < n4 ? y4[s4 + i + T] : vec4(0.0);
            vec4 c = i + 2u * T < n4 ? y4[s4 + i + 2u * T] : vec4(0.0);
            vec4 d = i + 3u * T < n4 ? y4[s4 + i + 3u * T] : vec4(0.0);
            ss += (dot(a, a) + dot(b, b)) + (dot(c, c) + dot(d, d));
        }
        s = act_rms_scale(ss, n, eps);
    }
    if (n % 32u != 0u) { // only F16/F32 weights take such an input: floats alone
        for (uint i = tid; i < n4; i += T) {
            vec4 v = y4[s4 + i];
            af4[(base + dst) / 4u + i] = norm ? nq4[dst / 4u + i] * (v * s) : v;
        }
        return;
    }
    // a whole Q8 block per thread: its 8 loads go out together
    const uint qb = act_q4(base, w), db = act_d2(base, w), fb = base / 4u;
    for (uint b = tid; b < n / 32u; b += T) {
        vec4 v[8];
        [[unroll]] for (uint i = 0u; i < 8u; i++) {
            v[i] = y4[s4 + 8u * b + i];
            if (norm) v[i] = nq4[dst / 4u + 8u * b + i] * (v[i] * s);
        }
        act_store_block(v, dst / 32u + b, fb, qb, db);
    }
}

// Called by every workgroup of a dispatch of `groups` workgroups after its y writes: the last to
// arrive gets true (and resets the count for the next dispatch); the others should exit.
bool act_arrive_last(uint slot, uint groups) {
    memoryBarrierBuffer(); // this invocation's y writes, before the count says they are done
    barrier();
    if (gl_LocalInvocationID.x == 0u) act_last = atomicAdd(cnt[slot], 1u) == groups - 1u;
    barrier();
    if (!act_last) return false;
    memoryBarrierBuffer();
    if (gl_LocalInvocationID.x == 0u) cnt[slot] = 0u;
    return true;
}
