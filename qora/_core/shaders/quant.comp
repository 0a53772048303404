#version 450
// Prepare a decode product's input on its own (one workgroup): y[src, src + n), RMS-normalized
// with NQ if NORM, into the activation half at out_base (see act.glsl). Used after the embedding
// and before the LM head of a prefill; inside a token step the producing kernels do this themselves.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint T = 256;
layout(constant_id = 1) const uint NORM = 0;

#include "act.glsl"

layout(push_constant) uniform PC {
    uint n;
    uint src;
    uint out_base;
    uint act_w;
    float eps;
} pc;

void main() { act_fill(pc.n, pc.src, 0u, pc.out_base, pc.act_w, NORM != 0u, pc.eps); }
