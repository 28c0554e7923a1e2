// The body of the embedding lookup, shared by embedding.wgsl (table in storage buffers) and
// embedding_tex.wgsl (table in textures). Each front declares bindings 1 and 2 (table data and
// scales) and defines, for shard row r:
//   fn data_word(r: u32, w: u32) -> u32        data word w of the row;
// and common/quant.wgsl's `qword` and `qscales`, through which the block decode reads.

// #include "common/quant.wgsl"

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

// Quantised tables: thread i takes vec4 i, i + WG, ... of the row (4 weights of 32-weight unit
// i / 8), decoded by common/quant.wgsl.
fn lookup_quant(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.n_tokens) {
        return;
    }
    let r = local_row(t, lid);
    if (r < 0) {
        return;
    }
    let row = u32(r);
    for (var v = lid; v < p.dim / 4u; v = v + WG) {
        let w = qunit4(fmt, row, qunit_head(fmt, row, v / 8u), v % 8u);
        let o = t * p.dim + 4u * v;
        out[o] = w.x;
        out[o + 1u] = w.y;
        out[o + 2u] = w.z;
        out[o + 3u] = w.w;
    }
}

@compute @workgroup_size(256)
fn lookup_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q8_0, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q4_0, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q4_1, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q5_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q5_0, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q5_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q5_1, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q4_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q4_K, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q5_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q5_K, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn lookup_q6_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    lookup_quant(Q6_K, wid, nwg, lid);
}
