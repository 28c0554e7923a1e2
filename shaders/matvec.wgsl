// Decode matrix-vector product y[row_start + r] = sum_c W[r, c] * x[c] over one shard of W (rows
// r of the shard), one entry point per weight format (repack layout, see common/quant.wgsl).
// Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16), 2 = x (f32),
// 3 = y (f32, read_write), 4 = params.
//
// Each workgroup computes ROWS rows (an override: 4, 8 or 16, chosen per matrix by the host). Its
// WG threads split K between them: thread t takes data word t, t + WG, ... (f32, f16) or 32-weight
// block t, t + WG, ... (quantised), so neighbouring threads read neighbouring memory, and loads the
// x values under it once for all the rows. The partial sums are reduced in workgroup memory. No
// subgroup operations.
//
// Why many rows and a block per thread: on lavapipe every 32-bit load costs as much as dozens of
// ALU operations, so the kernels minimise loads per weight (Q4_0: 4 data words, 1 scale word and
// 32/ROWS x values per 32 weights of a row); on GPUs the same choices mean few, coalesced reads,
// and the host lowers ROWS for small matrices so that enough workgroups exist.

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

const WG: u32 = 32u;
const R: u32 = 16u; // the largest ROWS: sizes the accumulators and workgroup arrays
override ROWS: u32 = 16u;

var<workgroup> part: array<f32, R * WG>; // partial sums, row r at r * WG
var<workgroup> part8: array<f32, R * 8u>; // row r's eight second-level sums at 8r

// First row of this workgroup; past the end for the padding workgroups of a 2D dispatch.
fn first_row(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * ROWS;
}

// Row r of the workgroup clamped into the shard, so the last, partial workgroup reads valid rows
// (its surplus rows compute sums that are never written).
fn row_of(row0: u32, r: u32) -> u32 {
    return min(row0 + r, p.rows - 1u);
}

// Reduces every thread's ROWS partial sums and writes the rows: thread t first adds 8 of row
// t / 8's WG partials, then thread r < ROWS adds row r's 8 results. Two barriers, not log2(WG).
fn finish(lid: u32, row0: u32, acc: array<f32, R>) {
    for (var r = 0u; r < ROWS; r++) {
        part[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var t = lid; t < ROWS * 8u; t += WG) {
        let base = (t >> 3u) * WG + (t & 7u);
        var s = 0.0;
        for (var j = 0u; j < WG; j += 8u) {
            s += part[base + j];
        }
        part8[t] = s;
    }
    workgroupBarrier();
    if (lid < ROWS && row0 + lid < p.rows) {
        var t = 0.0;
        for (var j = 0u; j < 8u; j++) {
            t += part8[lid * 8u + j];
        }
        y[p.row_start + row0 + lid] = t;
    }
}

@compute @workgroup_size(32)
fn matvec_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    for (var c = lid; c < p.cols; c += WG) {
        let xv = x[c];
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += bitcast<f32>(wq[row_of(row0, r) * p.row_words + c]) * xv;
        }
    }
    finish(lid, row0, acc);
}

@compute @workgroup_size(32)
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
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += dot(qh_pair(wq[row_of(row0, r) * p.row_words + w]), xv);
        }
    }
    finish(lid, row0, acc);
}

// The 32 x values of block b, four per vec4.
fn x_block(b: u32) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let c = 32u * b + 4u * i;
        v[i] = vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
    }
    return v;
}

fn x_sum(xb: array<vec4<f32>, 8>) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < 8u; i++) {
        s += xb[i];
    }
    return dot(s, vec4<f32>(1.0));
}

// sum_j q_j x_j over the 4 nibble words of a Q4 block at word `at` (unscaled, q in 0..15).
fn q4_dot(at: u32, xb: array<vec4<f32>, 8>) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < 4u; i++) {
        let q = wq[at + i];
        s += dot(q4_lo(q), xb[i]) + dot(q4_hi(q), xb[i + 4u]);
    }
    return s;
}

@compute @workgroup_size(32)
fn matvec_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    for (var b = lid; b < p.blocks; b += WG) {
        let xb = x_block(b);
        for (var r = 0u; r < ROWS; r++) {
            let row = row_of(row0, r);
            let g = row * p.blocks + b;
            let at = row * p.row_words + 8u * b;
            var s = 0.0;
            for (var i = 0u; i < 8u; i++) {
                s += dot(q8_unpack(wq[at + i]), xb[i]);
            }
            acc[r] += qh_scale(ws[g >> 1u], g) * s;
        }
    }
    finish(lid, row0, acc);
}

@compute @workgroup_size(32)
fn matvec_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    for (var b = lid; b < p.blocks; b += WG) {
        let xb = x_block(b);
        // d * sum (q - 8) x = d * (sum q x - 8 sum x): the -8 costs one term per block and row.
        let sx8 = 8.0 * x_sum(xb);
        for (var r = 0u; r < ROWS; r++) {
            let row = row_of(row0, r);
            let g = row * p.blocks + b;
            let d = qh_scale(ws[g >> 1u], g);
            acc[r] += d * (q4_dot(row * p.row_words + 4u * b, xb) - sx8);
        }
    }
    finish(lid, row0, acc);
}

@compute @workgroup_size(32)
fn matvec_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = first_row(wid, nwg);
    if (row0 >= p.rows) {
        return;
    }
    var acc: array<f32, R>;
    for (var b = lid; b < p.blocks; b += WG) {
        let xb = x_block(b);
        // sum (d q + m) x = d * sum q x + m * sum x.
        let sx = x_sum(xb);
        for (var r = 0u; r < ROWS; r++) {
            let row = row_of(row0, r);
            let dm = qh_pair(ws[row * p.blocks + b]);
            acc[r] += dm.x * q4_dot(row * p.row_words + 4u * b, xb) + dm.y * sx;
        }
    }
    finish(lid, row0, acc);
}
