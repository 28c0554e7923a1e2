// The body of the embedding lookup, shared by embedding.wgsl (table in storage buffers) and
// embedding_tex.wgsl (table in textures). Each front declares bindings 1 and 2 (table data and
// scales) and defines, for shard row r:
//   fn data_word(r: u32, w: u32) -> u32        data word w of the row;
//   fn block_d(r: u32, b: u32) -> f32          Q8_0/Q4_0's scale d of block b;
//   fn block_dm(r: u32, b: u32) -> vec2<f32>   Q4_1's d and m of block b.

struct Params {
    n_tokens: u32,
    dim: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    zero_oob: u32,
    // u32 words of `data` per row (buffers).
    row_words: u32,
    // The texture row of shard row 0 (textures: matrices may share a texture).
    row0: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
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

// Block quants: block b = c / 32 of shard row r.
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
        out[t * p.dim + c] = block_d(u32(r), b) * f32(q);
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
        out[t * p.dim + c] = block_d(u32(r), b) * (f32(q) - 8.0);
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
        let dm = block_dm(u32(r), b);
        out[t * p.dim + c] = dm.x * f32(q) + dm.y;
    }
}
