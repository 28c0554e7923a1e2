// Embedding lookup from a table in textures (the texture layout of src/kernels/weights.rs: one
// texture row per table row, data as rgba32uint texels, scales one texel a block); otherwise the
// same kernel as embedding.wgsl, whose comment follows.
//
// Embedding lookup: out[t, :] = table[ids[t], :], dequantising one table row per token in the layout
// of src/quant/repack.rs. One workgroup per token; one dispatch per table shard, each writing only
// the tokens whose id falls in its row range [row_start, row_start + rows). The dispatch with
// zero_oob = 1 (the last shard) also writes zeros for ids >= vocab, so a bad id never reads out of
// bounds and never leaves stale data behind.
// Bindings: 0 = ids [n_tokens] u32 (read), 1 = shard data (read), 2 = shard scales (read; the float
// formats do not use it, the host binds data there), 3 = out [n_tokens, dim] f32 (read_write),
// 4 = params.

struct Params {
    n_tokens: u32,
    dim: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    zero_oob: u32,
    // u32 words of `data` per row.
    row_words: u32,
    // The texture row of shard row 0 (matrices may share a texture).
    row0: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(1) var data_tex: texture_2d<u32>;
@group(0) @binding(2) var scales_tex: texture_2d<u32>;

// Data word w of shard row r.
fn data_word(r: u32, w: u32) -> u32 {
    return textureLoad(data_tex, vec2<u32>(w / 4u, p.row0 + r), 0)[w % 4u];
}

// The scale texel of block b of shard row r: Q8_0/Q4_0's f16 d in the low half, Q4_1's d and m.
fn scale_texel(r: u32, b: u32) -> u32 {
    return textureLoad(scales_tex, vec2<u32>(b, p.row0 + r), 0).x;
}
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 256u;

// The shard-local row of this workgroup's token, or -1 when another dispatch owns the token;
// writes the zero row itself for an out-of-range id when this dispatch is the one that does so.
fn local_row(t: u32, lid: u32) -> i32 {
    let id = ids[t];
    if (id >= p.row_start && id - p.row_start < p.rows) {
        return i32(id - p.row_start);
    }
    if (p.zero_oob == 1u && id >= p.vocab) {
        for (var c = lid; c < p.dim; c = c + WG) {
            out[t * p.dim + c] = 0.0;
        }
    }
    return -1;
}

// Half `h` (0 = low) of word w as f32; f16 is read as packed u32 so no `enable f16` is needed.
fn half_of(w: u32, h: u32) -> f32 {
    return unpack2x16float(w)[h];
}

@compute @workgroup_size(256)
fn lookup_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.n_tokens) {
        return;
    }
    let r = local_row(t, lid);
    if (r < 0) {
        return;
    }
    for (var c = lid; c < p.dim; c = c + WG) {
        out[t * p.dim + c] = bitcast<f32>(data_word(u32(r), c));
    }
}

@compute @workgroup_size(256)
fn lookup_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.n_tokens) {
        return;
    }
    let r = local_row(t, lid);
    if (r < 0) {
        return;
    }
    for (var c = lid; c < p.dim; c = c + WG) {
        out[t * p.dim + c] = half_of(data_word(u32(r), c / 2u), c % 2u);
    }
}

// Block quants: block b = c / 32 of row r is scale index g = r * (dim / 32) + b (shard-local).
@compute @workgroup_size(256)
fn lookup_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.n_tokens) {
        return;
    }
    let r = local_row(t, lid);
    if (r < 0) {
        return;
    }
    for (var c = lid; c < p.dim; c = c + WG) {
        let b = c / 32u;
        let j = c % 32u;
        let w = data_word(u32(r), b * 8u + j / 4u);
        let q = extractBits(bitcast<i32>(w), 8u * (j % 4u), 8u); // sign-extended i8
        out[t * p.dim + c] = half_of(scale_texel(u32(r), b), 0u) * f32(q);
    }
}

@compute @workgroup_size(256)
fn lookup_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.n_tokens) {
        return;
    }
    let r = local_row(t, lid);
    if (r < 0) {
        return;
    }
    for (var c = lid; c < p.dim; c = c + WG) {
        let b = c / 32u;
        let j = c % 32u;
        // Weight j sits in byte j % 16: the low nibble for j < 16, the high one for j >= 16.
        let w = data_word(u32(r), b * 4u + (j % 16u) / 4u);
        let q = extractBits(w, 8u * (j % 4u) + 4u * (j / 16u), 4u);
        out[t * p.dim + c] = half_of(scale_texel(u32(r), b), 0u) * (f32(q) - 8.0);
    }
}

@compute @workgroup_size(256)
fn lookup_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.n_tokens) {
        return;
    }
    let r = local_row(t, lid);
    if (r < 0) {
        return;
    }
    for (var c = lid; c < p.dim; c = c + WG) {
        let b = c / 32u;
        let j = c % 32u;
        let w = data_word(u32(r), b * 4u + (j % 16u) / 4u);
        let q = extractBits(w, 8u * (j % 4u) + 4u * (j / 16u), 4u);
        let dm = unpack2x16float(scale_texel(u32(r), b));
        out[t * p.dim + c] = dm.x * f32(q) + dm.y;
    }
}
