#version 450
// Prepare a decode product's input on its own (one workgroup): y[src, src + n), RMS-normalized
// with NQ if NORM, into the activation half at out_base (see act.glsl). Used after the embedding
// and before the LM head of a prefill; inside a token step the producing kernels do this themselves.
// SWIGLU: the input is silu(y[src, src + n)) * y[src + n, src + 2n), formed in place first (a decode
// gate|up product whose gate and up are stored in different types, so computed apart).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 256;
layout(constant_id = 1) const uint NORM = 0;
layout(constant_id = 2) const uint SWIGLU = 0;

#include "act.glsl"

layout(push_constant) uniform PC {
    uint n;
    uint src;
    uint out_base;
    uint act_w;
    float eps;
} pc;

void main() {
    if (SWIGLU != 0u) {
        for (uint i = gl_LocalInvocationID.x; i < pc.n; i += T) y[pc.src + i] = silu_mul(y[pc.src + i], y[pc.src + pc.n + i]);
        memoryBarrierBuffer();
        barrier();
    }
    act_fill(pc.n, pc.src, 0u, pc.out_base, pc.act_w, NORM != 0u, pc.eps);
}
