#version 450
// Prefill input preparation, one workgroup per token: optionally RMS-normalize (NORM) or form
// silu(gate) * up from the gate|up product (SWIGLU), then optionally quantize to Q8 blocks (Q8)
// exactly as the CPU engine quantizes an activation before a Q4/Q8 product: the integer values go
// to y (as floats) and each block's scale to ys, so matmul.comp can sum each block exactly.
#include "common.glsl"

layout(local_size_x = 64) in;
layout(constant_id = 1) const uint NORM = 0;
layout(constant_id = 2) const uint Q8 = 0;
layout(constant_id = 3) const uint SWIGLU = 0;

layout(binding = 1) readonly buffer X { float x[]; };
layout(binding = 2) readonly buffer NW { float nw[]; };
layout(binding = 3) writeonly buffer Y { float y[]; };
layout(binding = 4) writeonly buffer YS { float ys[]; };

layout(push_constant) uniform PC {
    uint n;       // elements per token
    uint ld_in;   // floats between tokens in x (SWIGLU: gate row, then up row, 2n)
    uint ld_out;  // floats between tokens in y (ys: ld_out / 32)
    float eps;
} pc;

shared float red[64];
shared float inv_rms;

float value(uint base, uint i, float s) {
    if (SWIGLU != 0u) return silu_mul(x[base + i], x[base + pc.n + i]);
    if (NORM != 0u) return nw[i] * (x[base + i] * s);
    return x[base + i];
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint t = gl_WorkGroupID.x;
    const uint base = t * pc.ld_in, ob = t * pc.ld_out;
    float s = 1.0;
    if (NORM != 0u) {
        float ss = 0.0;
        for (uint i = tid; i < pc.n; i += 64u) ss += x[base + i] * x[base + i];
        ss = subgroupAdd(ss);
        if (subgroupElect()) red[gl_SubgroupID] = ss;
        barrier();
        if (tid == 0u) {
            float tot = 0.0;
            for (uint i = 0u; i < gl_NumSubgroups; i++) tot += red[i];
            inv_rms = 1.0 / sqrt(tot / float(pc.n) + pc.eps);
        }
        barrier();
        s = inv_rms;
    }
    if (Q8 != 0u) {
        for (uint b = tid; b < pc.n / 32u; b += 64u) {
            float v[32];
            float amax = 0.0;
            for (uint j = 0u; j < 32u; j++) {
                v[j] = value(base, 32u * b + j, s);
                amax = max(amax, abs(v[j]));
            }
            float d, id;
            q8_scales(amax, d, id);
            for (uint j = 0u; j < 32u; j++) y[ob + 32u * b + j] = roundEven(v[j] * id);
            ys[t * (pc.ld_out / 32u) + b] = d;
        }
    } else {
        for (uint i = tid; i < pc.n; i += 64u) y[ob + i] = value(base, i, s);
    }
}
