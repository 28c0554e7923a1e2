// Matrix-vector product for CPU Vulkan devices with 8-lane subgroups (lavapipe): y[row_start + r] =
// sum_c W[r, c] * x[c] over one shard of W, for TOK tokens at once (rows of x and y, row length
// `cols` and `ld`), one entry point per weight format (repack layout, see common/quant.wgsl).
// Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16), 2 = x (f32),
// 3 = y (f32, read_write), the rest as in common/matvec_sg_body.wgsl. Needs subgroup operations
// with exactly 8 lanes (the host checks); `enable subgroups;` is left out because naga rejects it.
//
// A workgroup is one subgroup of 8 invocations; each invocation owns R consecutive rows and walks
// all of K, one 32-weight block at a time. x of a block is loaded once per subgroup: lane l loads
// values 4l..4l+3 and eight `subgroupBroadcast`s give every lane the whole block. Each weight word
// is read once and serves TOK tokens; each x value serves R rows.
//
// Why: llvmpipe runs a subgroup as one 8-wide SIMD vector, and a load from a storage buffer as a
// loop over the active lanes that inserts each lane's value into the vector through the stack (a
// failed store-to-load forward: about 8 ns of CPU time a lane and component on the 2-core EPYC it
// was measured on), uniform address or not. Those loads are three quarters of the time; arithmetic,
// broadcasts and spills to the stack are the rest. So the kernel counts loads: per block and row,
// Q4 weights cost their 4 data words and 1 scale word (Q4_0 and Q8_0: half a scale word, two blocks
// sharing one), plus 4 x loads per token shared by R rows, against 32 x loads per block and thread
// in matvec.wgsl. A load that no lane takes (tokens past the end of a group) costs nothing. Arrays
// are kept out (llvmpipe keeps arrays it cannot resolve in memory): x, weights and sums live in
// structs of vec4 whose members are named, and the loops over rows and tokens are spelled out under
// `if (R > i)`, which pipeline creation folds away. No workgroup memory, no barriers. Every
// subgroup operation is in uniform control flow: rows past the end are clamped (their sums never
// written), tokens past the end skipped under a uniform condition, and only whole workgroups past
// the end return early.

// This file holds what reads the weights from storage buffers (the repack layout); the rest of
// the kernel is common/matvec_sg_body.wgsl.

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
