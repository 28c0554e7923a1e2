// The subgroup matrix-vector product (matvec_sg.wgsl) over weights in textures, the layout of
// src/kernels/weights.rs: texture row r is matrix row r of the shard; data texels are rgba32uint
// (a Q4 block is one texel, a Q8_0 block two, 4 f32 or 8 f16 weights one), scales one texel a
// block (r16uint: Q8_0/Q4_0's f16 d; r32uint: Q4_1's d and m).
//
// Why: on llvmpipe a textureLoad is a vectorised gather, about 2 ns a lane for 16 bytes, where a
// storage load is a loop over the lanes at about 8 ns a lane for 4 bytes (BENCHMARKS.md). x stays
// in a storage buffer: it is written by the kernel before, and each x load serves R rows.
// Bindings as in common/matvec_sg_body.wgsl, the weights as textures (the scales slot of f32/f16
// binds the data texture again). Several matrices may share a texture (stacked rows; `p.row0`).

// #include "common/matvec_sg_body.wgsl"

@group(0) @binding(0) var wq: texture_2d<u32>;
@group(0) @binding(1) var ws: texture_2d<u32>;

// Where common/quant.wgsl's block decode finds the words: word i of a row is component i % 4 of
// texel i / 4 (blocks of 5, 35, 43 or 52 words run on across texels); a block's scales are one
// texel (r16uint: d; r32uint: d and m or dmin).
fn qword(fmt: u32, row: u32, i: u32) -> u32 {
    return textureLoad(wq, vec2<u32>(i / 4u, row), 0)[i % 4u];
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

// The 32 weights of block `blk` of `row` in the order of V8; for quantised formats, the quants.
fn weights(fmt: u32, row: u32, blk: u32) -> V8 {
    if (fmt == F32) {
        let i = 8u * blk;
        return V8(bitcast<vec4<f32>>(texel(row, i)), bitcast<vec4<f32>>(texel(row, i + 1u)),
                  bitcast<vec4<f32>>(texel(row, i + 2u)), bitcast<vec4<f32>>(texel(row, i + 3u)),
                  bitcast<vec4<f32>>(texel(row, i + 4u)), bitcast<vec4<f32>>(texel(row, i + 5u)),
                  bitcast<vec4<f32>>(texel(row, i + 6u)), bitcast<vec4<f32>>(texel(row, i + 7u)));
    }
    if (fmt == F16) {
        let i = 4u * blk;
        let h0 = f16x8(texel(row, i));
        let h1 = f16x8(texel(row, i + 1u));
        let h2 = f16x8(texel(row, i + 2u));
        let h3 = f16x8(texel(row, i + 3u));
        return V8(h0.lo, h0.hi, h1.lo, h1.hi, h2.lo, h2.hi, h3.lo, h3.hi);
    }
    if (fmt == Q8_0) {
        let a = texel(row, 2u * blk);
        let b = texel(row, 2u * blk + 1u);
        return V8(q8_unpack(a.x), q8_unpack(a.y), q8_unpack(a.z), q8_unpack(a.w),
                  q8_unpack(b.x), q8_unpack(b.y), q8_unpack(b.z), q8_unpack(b.w));
    }
    // Q4: word j holds weights 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high nibbles).
    let t = texel(row, blk);
    return V8(q4_lo_in_place(t.x), q4_lo_in_place(t.y), q4_lo_in_place(t.z), q4_lo_in_place(t.w),
              q4_hi_in_place(t.x), q4_hi_in_place(t.y), q4_hi_in_place(t.z), q4_hi_in_place(t.w));
}

// One fetch a block: textures keep no pairs, so `kept` is unused.
fn block_scale(row: u32, blk: u32, kept: u32) -> Scale {
    let h = textureLoad(ws, vec2<u32>(blk, row), 0).x;
    return Scale(unpack2x16float(h).x, 0u);
}

fn q4_1_scales(row: u32, blk: u32) -> vec2<f32> {
    return qh_pair(textureLoad(ws, vec2<u32>(blk, row), 0).x);
}
