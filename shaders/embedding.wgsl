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

fn qword(fmt: u32, r: u32, i: u32) -> u32 {
    return data_word(r, i);
}

// Scale index g = r * blocks per row + b (shard-local).
fn qscales(fmt: u32, r: u32, b: u32) -> vec2<f32> {
    let g = r * (p.dim / qblock_len(fmt)) + b;
    return qscales_of(fmt, scales[qscale_index(fmt, g)], g);
}
