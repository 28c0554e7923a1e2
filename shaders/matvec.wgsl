// Decode matrix-vector product y[row_start + r] = sum_c W[r, c] * x[c] over one shard of W (rows
// r of the shard), one entry point per weight format (repack layout, see common/quant.wgsl).
// Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16), 2 = x (f32),
// 3 = y (f32, read_write), 4 = params.
//
// Each workgroup computes R rows. Its WG threads split the row's data words between them (thread t
// takes words t, t + WG, ...), so neighbouring threads read neighbouring words (coalesced), and each
// thread loads the x values under its word once and uses them for all R rows. The per-thread
// partial sums are then reduced in workgroup memory. No subgroup operations.

// #include "common/quant.wgsl"

struct Params {
    rows: u32,      // rows of this shard
    cols: u32,      // weights per row
    row_start: u32, // where the shard's row 0 goes in y
    row_words: u32, // u32 data words per row
    blocks: u32,    // 32-weight blocks per row (quantised formats)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> wq: array<u32>;
@group(0) @binding(1) var<storage, read> ws: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 64u;
const R: u32 = 4u;

var<workgroup> part: array<f32, R * WG>; // partial sums, row r at r * WG

// First row of this workgroup; past the end for the padding workgroups of a 2D dispatch.
fn first_row(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * R;
}

// Row r of the workgroup clamped into the shard, so the last, partial workgroup reads valid rows
// (its surplus rows compute garbage that is never written).
fn row_of(row0: u32, r: u32) -> u32 {
    return min(row0 + r, p.rows - 1u);
}

// Reduces every thread's R partial sums and writes the R rows.
fn finish(lid: u32, row0: u32, acc: array<f32, R>) {
    for (var r = 0u; r < R; r++) {
        part[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var r = 0u; r < R; r++) {
                part[r * WG + lid] += part[r * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    if (lid < R && row0 + lid < p.rows) {
        y[p.row_start + row0 + lid] = part[lid * WG];
    }
}

@compute @workgroup_size(64)
fn matvec_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc = vec4<f32>(0.0);
    let b0 = row_of(row0, 0u) * p.row_words;
    let b1 = row_of(row0, 1u) * p.row_words;
    let b2 = row_of(row0, 2u) * p.row_words;
    let b3 = row_of(row0, 3u) * p.row_words;
    for (var c = lid; c < p.cols; c += WG) {
        let xv = x[c];
        acc += xv * vec4<f32>(bitcast<f32>(wq[b0 + c]), bitcast<f32>(wq[b1 + c]), bitcast<f32>(wq[b2 + c]), bitcast<f32>(wq[b3 + c]));
    }
    var a: array<f32, R>;
    a[0] = acc.x; a[1] = acc.y; a[2] = acc.z; a[3] = acc.w;
    finish(lid, row0, a);
}

@compute @workgroup_size(64)
fn matvec_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    for (var w = lid; w < p.row_words; w += WG) {
        let c = 2u * w;
        // An odd row ends in a zero pad weight; x has no value there, so use 0 rather than read
        // past the end.
        let xv = vec2<f32>(x[c], select(0.0, x[min(c + 1u, p.cols - 1u)], c + 1u < p.cols));
        for (var r = 0u; r < R; r++) {
            acc[r] += dot(qh_pair(wq[row_of(row0, r) * p.row_words + w]), xv);
        }
    }
    finish(lid, row0, acc);
}

fn x4(c: u32) -> vec4<f32> {
    return vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
}

@compute @workgroup_size(64)
fn matvec_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    // 8 words per block: word w covers weights 4w..4w+3 of the row.
    for (var w = lid; w < p.row_words; w += WG) {
        let b = w >> 3u;
        let xv = x4(4u * w);
        for (var r = 0u; r < R; r++) {
            let row = row_of(row0, r);
            let g = row * p.blocks + b;
            let d = qh_scale(ws[g >> 1u], g);
            acc[r] += d * dot(q8_unpack(wq[row * p.row_words + w]), xv);
        }
    }
    finish(lid, row0, acc);
}

@compute @workgroup_size(64)
fn matvec_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    // 4 words per block: word i of block b covers weights 4i.. (low nibbles) and 16+4i.. (high).
    for (var w = lid; w < p.row_words; w += WG) {
        let b = w >> 2u;
        let c = b * 32u + (w & 3u) * 4u;
        let xl = x4(c);
        let xh = x4(c + 16u);
        // d * sum (q - 8) x = d * (sum q x - 8 sum x): the -8 costs one term per word, not per weight.
        let sx8 = 8.0 * dot(xl + xh, vec4<f32>(1.0));
        for (var r = 0u; r < R; r++) {
            let row = row_of(row0, r);
            let g = row * p.blocks + b;
            let d = qh_scale(ws[g >> 1u], g);
            let q = wq[row * p.row_words + w];
            acc[r] += d * (dot(q4_lo(q), xl) + dot(q4_hi(q), xh) - sx8);
        }
    }
    finish(lid, row0, acc);
}

@compute @workgroup_size(64)
fn matvec_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    for (var w = lid; w < p.row_words; w += WG) {
        let b = w >> 2u;
        let c = b * 32u + (w & 3u) * 4u;
        let xl = x4(c);
        let xh = x4(c + 16u);
        // sum (d q + m) x = d * sum q x + m * sum x.
        let sx = dot(xl + xh, vec4<f32>(1.0));
        for (var r = 0u; r < R; r++) {
            let row = row_of(row0, r);
            let dm = qh_pair(ws[row * p.blocks + b]);
            let q = wq[row * p.row_words + w];
            acc[r] += dm.x * (dot(q4_lo(q), xl) + dot(q4_hi(q), xh)) + dm.y * sx;
        }
    }
    finish(lid, row0, acc);
}

