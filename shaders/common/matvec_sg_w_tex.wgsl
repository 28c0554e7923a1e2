// The subgroup matvec's weight front for textures (the layout of src/kernels/weights.rs): bindings
// 0 (data texels) and 1 (scales), and the readers common/matvec_sg_body.wgsl expects of a weight
// front. Why textures: see matvec_sg_tex.wgsl.

// #include "common/matvec_sg_body.wgsl"

@group(0) @binding(0) var wq: texture_2d<u32>;
@group(0) @binding(1) var ws: texture_2d<u32>;

// Where common/quant.wgsl's block decode finds the words: word i of a row is component i % 4 of
// texel i / 4 (blocks of 5, 35, 43 or 52 words run on across texels); a block's scales are one
// texel (r16uint: d; r32uint: d and m or dmin).
fn qword(fmt: u32, row: u32, i: u32) -> u32 {
    return textureLoad(wq, vec2<u32>(i / 4u, row), 0)[i % 4u];
}
// Words i..i+3: one texel where i is a multiple of 4, else the tail of one and the head of the
// next (i is the same for every lane: the condition is uniform).
fn qword4(fmt: u32, row: u32, i: u32) -> vec4<u32> {
    let t0 = textureLoad(wq, vec2<u32>(i / 4u, row), 0);
    let o = i % 4u;
    if (o == 0u) {
        return t0;
    }
    let t1 = textureLoad(wq, vec2<u32>(i / 4u + 1u, row), 0);
    if (o == 1u) {
        return vec4<u32>(t0.yzw, t1.x);
    }
    if (o == 2u) {
        return vec4<u32>(t0.zw, t1.xy);
    }
    return vec4<u32>(t0.w, t1.xyz);
}
// Words 4t..4t+3: texel t.
fn qgroup(fmt: u32, row: u32, t: u32) -> vec4<u32> {
    return textureLoad(wq, vec2<u32>(t, row), 0);
}
fn qscales(fmt: u32, row: u32, blk: u32) -> vec2<f32> {
    let t = textureLoad(ws, vec2<u32>(blk, row), 0).x;
    return qscales_of(fmt, t, 0u);
}

// Texel i of `row`, clamped to the row: the tail block of an f32/f16 row whose length is not a
// multiple of 32 reaches past it (those weights meet zero x).
fn texel(row: u32, i: u32) -> vec4<u32> {
    let last = textureDimensions(wq).x - 1u;
    return textureLoad(wq, vec2<u32>(min(i, last), row), 0);
}

// The 8 f16 weights of a texel (a struct, not an array: llvmpipe keeps arrays in memory).
struct H8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn f16x8(t: vec4<u32>) -> H8 {
    return H8(vec4<f32>(qh_pair(t.x), qh_pair(t.y)), vec4<f32>(qh_pair(t.z), qh_pair(t.w)));
}

// The 32 weights of f32/f16 block `blk` of `row` in the order of V8.
fn weights(fmt: u32, row: u32, blk: u32) -> V8 {
    if (fmt == F32) {
        let i = 8u * blk;
        return V8(bitcast<vec4<f32>>(texel(row, i)), bitcast<vec4<f32>>(texel(row, i + 1u)),
                  bitcast<vec4<f32>>(texel(row, i + 2u)), bitcast<vec4<f32>>(texel(row, i + 3u)),
                  bitcast<vec4<f32>>(texel(row, i + 4u)), bitcast<vec4<f32>>(texel(row, i + 5u)),
                  bitcast<vec4<f32>>(texel(row, i + 6u)), bitcast<vec4<f32>>(texel(row, i + 7u)));
    }
    let i = 4u * blk;
    let h0 = f16x8(texel(row, i));
    let h1 = f16x8(texel(row, i + 1u));
    let h2 = f16x8(texel(row, i + 2u));
    let h3 = f16x8(texel(row, i + 3u));
    return V8(h0.lo, h0.hi, h1.lo, h1.hi, h2.lo, h2.hi, h3.lo, h3.hi);
}

// One fetch a block: textures keep no pairs, so `kept` is unused.
fn block_scales(fmt: u32, row: u32, blk: u32, kept: u32) -> Scale {
    return Scale(qscales(fmt, row, blk), 0u);
}
