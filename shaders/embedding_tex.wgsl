// Embedding lookup from a table in textures (the texture layout of src/kernels/weights.rs: one
// texture row per table row, data as rgba32uint texels, scales one texel a block); otherwise the
// same kernel as embedding.wgsl (see its comment and common/embedding_body.wgsl).

// #include "common/embedding_body.wgsl"

@group(0) @binding(1) var data_tex: texture_2d<u32>;
@group(0) @binding(2) var scales_tex: texture_2d<u32>;

fn data_word(r: u32, w: u32) -> u32 {
    return textureLoad(data_tex, vec2<u32>(w / 4u, p.row0 + r), 0)[w % 4u];
}

// The scale texel of block b: Q8_0/Q4_0's f16 d in the low half, Q4_1's d and m.
fn scale_texel(r: u32, b: u32) -> u32 {
    return textureLoad(scales_tex, vec2<u32>(b, p.row0 + r), 0).x;
}

fn block_d(r: u32, b: u32) -> f32 {
    return unpack2x16float(scale_texel(r, b)).x;
}

fn block_dm(r: u32, b: u32) -> vec2<f32> {
    return unpack2x16float(scale_texel(r, b));
}
