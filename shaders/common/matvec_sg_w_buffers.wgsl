// The subgroup matvec's weight front for storage buffers (the repack layout, src/quant/repack.rs):
// bindings 0 (data words) and 1 (block scales), and the readers common/matvec_sg_body.wgsl
// expects of a weight front.

// #include "common/matvec_sg_body.wgsl"

@group(0) @binding(0) var<storage, read> wq: array<u32>;
@group(0) @binding(1) var<storage, read> ws: array<u32>;

// Where common/quant.wgsl's block decode finds the words.
fn qword(fmt: u32, row: u32, i: u32) -> u32 {
    return wq[row * row_words(fmt) + i];
}
fn qword4(fmt: u32, row: u32, i: u32) -> vec4<u32> {
    let b = row * row_words(fmt) + i;
    return vec4<u32>(wq[b], wq[b + 1u], wq[b + 2u], wq[b + 3u]);
}
fn qgroup(fmt: u32, row: u32, t: u32) -> vec4<u32> {
    return qword4(fmt, row, 4u * t);
}
fn qscales(fmt: u32, row: u32, blk: u32) -> vec2<f32> {
    let g = row * (p.cols / qblock_len(fmt)) + blk;
    return qscales_of(fmt, ws[qscale_index(fmt, g)], g);
}

// Data word i of an f32/f16 row whose last word is `last`: the tail block of a row whose length is
// not a multiple of 32 reaches past it (those weights meet zero x).
fn word(i: u32, last: u32) -> u32 {
    return wq[min(i, last)];
}

// f32 weights at words i..i+3.
fn f32x4(i: u32, last: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4<u32>(word(i, last), word(i + 1u, last),
                                        word(i + 2u, last), word(i + 3u, last)));
}

// f16 weights in words i, i + 1.
fn f16x4(i: u32, last: u32) -> vec4<f32> {
    return vec4<f32>(qh_pair(word(i, last)), qh_pair(word(i + 1u, last)));
}

// The 32 weights of f32/f16 block `blk` of `row` in the order of V8.
fn weights(fmt: u32, row: u32, blk: u32) -> V8 {
    let start = row * row_words(fmt);
    let last = start + row_words(fmt) - 1u;
    if (fmt == F32) {
        let i = start + 32u * blk;
        return V8(f32x4(i, last), f32x4(i + 4u, last),
                  f32x4(i + 8u, last), f32x4(i + 12u, last),
                  f32x4(i + 16u, last), f32x4(i + 20u, last),
                  f32x4(i + 24u, last), f32x4(i + 28u, last));
    }
    let i = start + 16u * blk;
    return V8(f16x4(i, last), f16x4(i + 2u, last),
              f16x4(i + 4u, last), f16x4(i + 6u, last),
              f16x4(i + 8u, last), f16x4(i + 10u, last),
              f16x4(i + 12u, last), f16x4(i + 14u, last));
}

// The word holding the scales of block `g` = (row, blk). Q8_0 and Q4_0 keep two f16 scales in a
// word: when rows have an even number of blocks, blocks 2k and 2k + 1 of a row share it, so the
// even block loads it and the odd one reuses it (`kept`), saving a tenth of Q4_0's loads. (The
// conditions are uniform, and a load that no lane takes costs lavapipe no per-lane work.)
fn scale_word(fmt: u32, g: u32, blk: u32, kept: u32) -> u32 {
    if (!qscale_pair(fmt) && ((p.cols / 32u) & 1u) == 0u && (blk & 1u) == 1u) {
        return kept;
    }
    return ws[qscale_index(fmt, g)];
}

fn block_scales(fmt: u32, row: u32, blk: u32, kept: u32) -> Scale {
    let g = row * (p.cols / 32u) + blk;
    let word = scale_word(fmt, g, blk, kept);
    return Scale(qscales_of(fmt, word, g), word);
}
