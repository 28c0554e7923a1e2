// Decode matrix-vector product y[row_start + r] = sum_c W[r, c] * x[c] over one shard of W (rows
// r of the shard), one entry point per weight format (repack layout, see common/quant.wgsl). The
// same kernels also serve small batches, and lavapipe's prefill: with TOK > 1 a workgroup computes
// TOK tokens (rows of x and y, row length `cols` and `ld`) against the same weights.
// Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16), 2 = x (f32),
// 3 = y (f32, read_write), 4 = params.
//
// Each workgroup computes ROWS rows for TOK tokens (overrides, chosen per matrix by the host). Its
// WG threads split K between them: thread t takes data word t, t + WG, ... (f32, f16) or 32-weight
// block t, t + WG, ... (quantised), so neighbouring threads read neighbouring memory; each loads the
// x values under its share once for all rows, and each weight word once for all tokens. The
// partial sums are reduced in workgroup memory. No subgroup operations.
//
// Why many rows and a block per thread: on lavapipe every 32-bit load costs as much as dozens of
// ALU operations, so the kernels minimise loads per multiply-add (Q4_0: 4 data words and 1 scale
// word per 32 weights of a row, shared by TOK tokens, and 32 x values per token, shared by ROWS
// rows); on GPUs the same choices mean few, coalesced reads, and the host lowers ROWS for small
// matrices so that enough workgroups exist.

// #include "common/quant.wgsl"

struct Params {
    rows: u32,      // rows of this shard
    cols: u32,      // weights per row, and length of a token's row of x
    row_start: u32, // where the shard's row 0 goes in a row of y
    row_words: u32, // u32 data words per row
    blocks: u32,    // 32-weight blocks per row (quantised formats)
    m: u32,         // tokens (1 for a matrix-vector product)
    ld: u32,        // length of a token's row of y (all rows of W)
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> wq: array<u32>;
@group(0) @binding(1) var<storage, read> ws: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 64u;
// The largest ROWS and TOK: they size the accumulators and workgroup arrays. Loops run to ROWS and
// TOK, which pipeline creation makes constants, so the drivers unroll them and keep only the
// accumulators in use.
const R: u32 = 16u;
const TM: u32 = 4u;
override ROWS: u32 = 16u;
override TOK: u32 = 1u;

var<workgroup> part: array<f32, R * WG>; // one token's partial sums, row r at r * WG
var<workgroup> part8: array<f32, R * 8u>; // row r's eight second-level sums at 8r

// (first row, first token) of this workgroup; row past the end for the padding workgroups of a 2D
// dispatch. Consecutive workgroups take the token groups of the same rows, so their weights are
// still in cache.
fn tile_of(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    let g = wid.x + wid.y * nwg.x;
    let groups = (p.m + TOK - 1u) / TOK;
    return vec2<u32>(g / groups * ROWS, g % groups * TOK);
}

// Row r and token t of the workgroup clamped into range, so a partial workgroup reads valid memory
// (its surplus sums are never written).
fn row_of(row0: u32, r: u32) -> u32 {
    return min(row0 + r, p.rows - 1u);
}
fn tok_of(tok0: u32, t: u32) -> u32 {
    return min(tok0 + t, p.m - 1u);
}

// Reduces every thread's partial sums (acc[r * TM + t]) and writes y, one token at a time: thread
// i first adds 8 of row i / 8's WG partials, then thread r < ROWS adds row r's 8 results. Two
// barriers per token rather than log2(WG).
fn finish(lid: u32, row0: u32, tok0: u32, acc: array<f32, R * TM>) {
    for (var t = 0u; t < TOK; t++) {
        for (var r = 0u; r < ROWS; r++) {
            part[r * WG + lid] = acc[r * TM + t];
        }
        workgroupBarrier();
        for (var i = lid; i < ROWS * 8u; i += WG) {
            let base = (i >> 3u) * WG + (i & 7u);
            var s = 0.0;
            for (var j = 0u; j < WG; j += 8u) {
                s += part[base + j];
            }
            part8[i] = s;
        }
        workgroupBarrier();
        if (lid < ROWS && row0 + lid < p.rows && tok0 + t < p.m) {
            var s = 0.0;
            for (var j = 0u; j < 8u; j++) {
                s += part8[lid * 8u + j];
            }
            y[(tok0 + t) * p.ld + p.row_start + row0 + lid] = s;
        }
    }
}

@compute @workgroup_size(64)
fn matvec_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let at = tile_of(wid, nwg);
    if (at.x >= p.rows) {
        return;
    }
    var acc: array<f32, R * TM>;
    for (var c = lid; c < p.cols; c += WG) {
        var xv: array<f32, TM>;
        for (var t = 0u; t < TOK; t++) {
            xv[t] = x[tok_of(at.y, t) * p.cols + c];
        }
        for (var r = 0u; r < ROWS; r++) {
            let w = bitcast<f32>(wq[row_of(at.x, r) * p.row_words + c]);
            for (var t = 0u; t < TOK; t++) {
                acc[r * TM + t] += w * xv[t];
            }
        }
    }
    finish(lid, at.x, at.y, acc);
}

@compute @workgroup_size(64)
fn matvec_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let at = tile_of(wid, nwg);
    if (at.x >= p.rows) {
        return;
    }
    var acc: array<f32, R * TM>;
    for (var w = lid; w < p.row_words; w += WG) {
        let c = 2u * w;
        var xv: array<vec2<f32>, TM>;
        for (var t = 0u; t < TOK; t++) {
            // An odd row ends in a zero pad weight; x has no value there, so use 0 rather than
            // read the next token's first value.
            let xt = tok_of(at.y, t) * p.cols + c;
            xv[t] = vec2<f32>(x[xt], select(0.0, x[xt + 1u], c + 1u < p.cols));
        }
        for (var r = 0u; r < ROWS; r++) {
            let wv = qh_pair(wq[row_of(at.x, r) * p.row_words + w]);
            for (var t = 0u; t < TOK; t++) {
                acc[r * TM + t] += dot(wv, xv[t]);
            }
        }
    }
    finish(lid, at.x, at.y, acc);
}

// The 32 x values of token `tok`'s block b, four per vec4.
fn x_block(tok: u32, b: u32) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let c = tok * p.cols + 32u * b + 4u * i;
        v[i] = vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
    }
    return v;
}

fn sum8(v: array<vec4<f32>, 8>) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < 8u; i++) {
        s += v[i];
    }
    return dot(s, vec4<f32>(1.0));
}

fn dot8(a: array<vec4<f32>, 8>, b: array<vec4<f32>, 8>) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < 8u; i++) {
        s += dot(a[i], b[i]);
    }
    return s;
}

// The unscaled quants of the block whose data starts at word `at`, in the order of x_block.
fn q8_block(at: u32) -> array<vec4<f32>, 8> {
    var q: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        q[i] = q8_unpack(wq[at + i]);
    }
    return q;
}
fn q4_block(at: u32) -> array<vec4<f32>, 8> {
    var q: array<vec4<f32>, 8>;
    for (var i = 0u; i < 4u; i++) {
        let w = wq[at + i];
        q[i] = q4_lo(w);
        q[i + 4u] = q4_hi(w);
    }
    return q;
}

// The quantised kernels differ only in how a block's scale applies; `fmt` is a constant at every
// call site, so each entry point compiles to its own straight-line code.
const Q8_0: u32 = 0u;
const Q4_0: u32 = 1u;
const Q4_1: u32 = 2u;

fn matvec_quant(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let at = tile_of(wid, nwg);
    if (at.x >= p.rows) {
        return;
    }
    var acc: array<f32, R * TM>;
    for (var b = lid; b < p.blocks; b += WG) {
        var xb: array<array<vec4<f32>, 8>, TM>;
        var sx: array<f32, TM>;
        for (var t = 0u; t < TOK; t++) {
            xb[t] = x_block(tok_of(at.y, t), b);
            sx[t] = sum8(xb[t]);
        }
        for (var r = 0u; r < ROWS; r++) {
            let row = row_of(at.x, r);
            let g = row * p.blocks + b;
            if (fmt == Q8_0) {
                let d = qh_scale(ws[g >> 1u], g);
                let q = q8_block(row * p.row_words + 8u * b);
                for (var t = 0u; t < TOK; t++) {
                    acc[r * TM + t] += d * dot8(q, xb[t]);
                }
            } else if (fmt == Q4_0) {
                // d * sum (q - 8) x = d * (sum q x - 8 sum x): the -8 costs one term per block.
                let d = qh_scale(ws[g >> 1u], g);
                let q = q4_block(row * p.row_words + 4u * b);
                for (var t = 0u; t < TOK; t++) {
                    acc[r * TM + t] += d * (dot8(q, xb[t]) - 8.0 * sx[t]);
                }
            } else {
                // sum (d q + m) x = d * sum q x + m * sum x.
                let dm = qh_pair(ws[g]);
                let q = q4_block(row * p.row_words + 4u * b);
                for (var t = 0u; t < TOK; t++) {
                    acc[r * TM + t] += dm.x * dot8(q, xb[t]) + dm.y * sx[t];
                }
            }
        }
    }
    finish(lid, at.x, at.y, acc);
}

@compute @workgroup_size(64)
fn matvec_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_quant(Q8_0, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matvec_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_quant(Q4_0, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matvec_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_quant(Q4_1, wid, nwg, lid);
}
