// Shared unpack/dequant helpers for weights in the repack layout (src/quant/repack.rs):
// f32 and f16 rows of u32 words, Q8_0/Q4_0/Q4_1 as 8 or 4 data words per 32-weight block plus a
// separate array of f16 scales. The helpers take words (not bindings) so that any shader can use
// them whatever it names its buffers. Everything is plain u32 arithmetic: no `enable f16;`.

// The two f16 halves of a word as f32 (low half first: even column, or d before m).
fn qh_pair(word: u32) -> vec2<f32> {
    return unpack2x16float(word);
}

// Half `g % 2` of a word of packed f16 scales (Q8_0 and Q4_0 keep two block scales per word).
fn qh_scale(word: u32, g: u32) -> f32 {
    return unpack2x16float(word >> ((g & 1u) * 16u)).x;
}

// Q8_0: the four signed bytes of a data word, as f32 (byte 0 first). Shifting each byte to the
// top and arithmetically back sign-extends it exactly.
fn q8_unpack(word: u32) -> vec4<f32> {
    let up = vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u);
    return vec4<f32>(bitcast<vec4<i32>>(up) >> vec4<u32>(24u));
}

// Q4_0/Q4_1 data word i (0..3) of a block holds bytes 4i..4i+3: the low nibbles are weights
// 4i..4i+3 of the block, the high nibbles weights 16+4i..16+4i+3. Unsigned values 0..15.
fn q4_lo(word: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));
}
fn q4_hi(word: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u));
}
