// Embedding lookup from a table in textures (the texture layout of src/kernels/weights.rs: one
// texture row per table row, data as rgba32uint texels, scales one texel a block); otherwise the
// same kernel as embedding.wgsl (see its comment and common/embedding_body.wgsl).

// #include "common/embedding_body.wgsl"

@group(0) @binding(1) var data_tex: texture_2d<u32>;
@group(0) @binding(2) var scales_tex: texture_2d<u32>;

fn data_word(r: u32, w: u32) -> u32 {
    return textureLoad(data_tex, vec2<u32>(w / 4u, p.row0 + r), 0)[w % 4u];
}

fn qword(fmt: u32, r: u32, i: u32) -> u32 {
    return data_word(r, i);
}

// The scale texel of block b: r16uint (d) or r32uint (d and m or dmin).
fn qscales(fmt: u32, r: u32, b: u32) -> vec2<f32> {
    return qscales_of(fmt, textureLoad(scales_tex, vec2<u32>(b, p.row0 + r), 0).x, 0u);
}
