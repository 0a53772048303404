// qora — the Q8_0 KV cache on the device (included by rope_kv, attn_decode, attn_prefill).
// Llama.cpp's Q8_0 blocks (32 int8 values and one f16 scale: the CPU engine's cache), laid out per
// cached position as one row of kvq_row_words(kv_dim) words: the kv_dim int8 values (4 to a word, in
// element order), then the row's kv_dim / 32 f16 scales (2 to a word), padded so every row starts
// 16-byte aligned. As for the weights (common.glsl), quants apart from scales keep every quant load
// an aligned 16-byte one; a value is f16(d) * q, exact in float, as the CPU engine reads it.

uint kvq_row_words(uint kv_dim) { return (kv_dim / 4u + (kv_dim / 32u + 1u) / 2u + 3u) & ~3u; }

// word of the scale of block blk (the block of element blk * 32) in the row starting at word `row`
uint kvq_scale_word(uint row, uint kv_dim, uint blk) { return row + kv_dim / 4u + blk / 2u; }

#define KVQ_SCALE(buf, row, kv_dim, blk) unpackHalf2x16((buf)[kvq_scale_word(row, kv_dim, blk)] >> (((blk) & 1u) * 16u)).x

// 4 floats as Q8 values with the inverse scale id, packed as 4 signed bytes (element 0 lowest)
uint kvq_pack4(vec4 x, float id) {
    ivec4 q = ivec4(roundEven(x * id));
    return uint(q.x & 0xFF) | (uint(q.y & 0xFF) << 8) | (uint(q.z & 0xFF) << 16) | (uint(q.w & 0xFF) << 24);
}
