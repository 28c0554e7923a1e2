// Embedding lookup: out[t, :] = table[ids[t], :], dequantising one table row per token in the layout
// of src/quant/repack.rs. One workgroup per token; one dispatch per table shard, each writing only
// the tokens whose id falls in its row range [row_start, row_start + rows). The dispatch with
// zero_oob = 1 (the last shard) also writes zeros for ids >= vocab, so a bad id never reads out of
// bounds and never leaves stale data behind.
// Bindings: 0 = ids [n_tokens] u32 (read), 1 = shard data (read), 2 = shard scales (read; the float
// formats do not use it, the host binds data there), 3 = out [n_tokens, dim] f32 (read_write),
// 4 = params.

// #include "common/embedding_body.wgsl"

@group(0) @binding(1) var<storage, read> data: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;

fn data_word(r: u32, w: u32) -> u32 {
    return data[r * p.row_words + w];
}

// Scale index g = r * (dim / 32) + b (shard-local); Q8_0/Q4_0 keep two f16 scales a word.
fn block_d(r: u32, b: u32) -> f32 {
    let g = r * (p.dim / 32u) + b;
    return half_of(scales[g / 2u], g % 2u);
}

fn block_dm(r: u32, b: u32) -> vec2<f32> {
    return unpack2x16float(scales[r * (p.dim / 32u) + b]);
}
