// qora — helpers shared by the compute shaders (included, not compiled on its own).
//
// Weight layouts on the device (qora_vk.c packs them at upload; "unit" = what one load covers):
//   Q4  [rows*nb uvec4: the 16 nibble bytes of each block, row-major] [rows*nb f16 scales]
//   Q8  [rows*nb*2 uvec4: the 32 int8 of each block]                 [rows*nb f16 scales]
//   F16 rows*cols halves, row-major (cols % 8 == 0: a uvec4 is 8 halves)
//   F32 rows*cols floats, row-major (cols % 4 == 0)
// Splitting scales from quants keeps every quant load an aligned 16-byte load, and needs no
// 8/16-bit storage feature.

#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_EXT_control_flow_attributes : require

#define MODE_STORE 0u
#define MODE_ADD 1u
#define MODE_SWIGLU 2u
#define MODE_QKV 3u

// The f16 bits nearest to a float (ties to even), in integer ops so every device gives the same
// bits as the CPU engine's qora_fp32_to_fp16 (packHalf2x16's rounding is not specified).
uint f16_bits(float f) {
    uint x = floatBitsToUint(f);
    uint sign = (x >> 16) & 0x8000u;
    uint absx = x & 0x7fffffffu;
    uint h;
    if (absx >= 0x7f800000u) {
        h = sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u);
    } else if (absx >= 0x477ff000u) {
        h = sign | 0x7c00u;
    } else if (absx < 0x38800000u) {
        if (absx < 0x33000000u) {
            h = sign;
        } else {
            uint e = absx >> 23;
            uint m = (absx & 0x7fffffu) | 0x800000u;
            uint shift = 126u - e;
            uint r = m >> shift;
            uint rem = m & ((1u << shift) - 1u);
            uint halfway = 1u << (shift - 1u);
            if (rem > halfway || (rem == halfway && (r & 1u) != 0u)) r++;
            h = sign | r;
        }
    } else {
        uint r = (absx - 0x38000000u) >> 13;
        uint rem = absx & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u) != 0u)) r++;
        h = sign | r;
    }
    return h;
}

float round_to_f16(float f) { return unpackHalf2x16(f16_bits(f)).x; }

// Two floats as the f16 pair of one uint (element 0 in the low half), for the f16 KV cache.
uint pack_f16x2(float a, float b) { return f16_bits(a) | (f16_bits(b) << 16); }

// a / b as the CPU computes it (correctly rounded): the device's division may be off by an ulp or
// two, so refine it with one exact-residual step. Used where the result feeds a rounding decision.
float div_rn(float a, float b) {
    float r = a / b;
    float e = fma(-r, b, a);
    return fma(e, 1.0 / b, r);
}

// The Q8 scale d (f16-rounded, as stored) and its inverse 127/amax of a block with max |x| = amax.
void q8_scales(float amax, out float d, out float id) {
    d = round_to_f16(div_rn(amax, 127.0));
    id = amax != 0.0 ? div_rn(127.0, amax) : 0.0;
}

// f16 scale number i of the array that starts at word `base` of a uint buffer.
#define SCALE_AT(buf, base, i) unpackHalf2x16((buf)[(base) + ((i) >> 1)] >> (((i) & 1u) * 16u)).x

// Decode mat-vec dots avoid int->float conversions (a quarter-rate instruction on many GPUs):
// a nibble or byte OR-ed into the mantissa of 2^23 is 2^23 + v exactly, so one logic op and one
// subtraction give v as a float. Nibbles/bytes are taken in place (not shifted down), so a value
// at bit 4/8/12 comes out times 16/256/4096; the matching input element is pre-divided by that
// power of two, which keeps every product an exact integer.
#define MAGIC 0x4B000000u
#define MAGIC_F 8388608.0
// nibbles of a 16-bit half word: (lo of byte 0, hi of byte 0, lo of byte 1, hi of byte 1) x (1, 16, 256, 4096)
#define NIB4(h) (uintBitsToFloat(((h) & uvec4(0xFu, 0xF0u, 0xF00u, 0xF000u)) | MAGIC) - MAGIC_F)
// bytes 0 and 1 of both half words, offset to unsigned (b + 128): x (1, 256, 1, 256)
#define BYTE4(w) (uintBitsToFloat(((uvec4((w), (w), (w) >> 16, (w) >> 16) & uvec4(0xFFu, 0xFF00u, 0xFFu, 0xFF00u)) ^ \
                                   uvec4(0x80u, 0x8000u, 0x80u, 0x8000u)) | MAGIC) - MAGIC_F)

// The 8 nibble values 0..15 of a word (low nibbles = elements k..k+3, high = k+16..k+19) as floats.
#define NIB_LO(w) vec4(float((w) & 0xFu), float(((w) >> 8) & 0xFu), float(((w) >> 16) & 0xFu), float(((w) >> 24) & 0xFu))
#define NIB_HI(w) vec4(float(((w) >> 4) & 0xFu), float(((w) >> 12) & 0xFu), float(((w) >> 20) & 0xFu), float((w) >> 28))
// The 4 signed bytes of a word as floats.
#define I8X4(w) vec4(float(bitfieldExtract(int(w), 0, 8)), float(bitfieldExtract(int(w), 8, 8)), \
                     float(bitfieldExtract(int(w), 16, 8)), float(bitfieldExtract(int(w), 24, 8)))

float silu_mul(float g, float u) { return g / (1.0 + exp(-g)) * u; }
