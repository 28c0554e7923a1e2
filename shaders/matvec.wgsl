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
// rows; the block decode is common/quant.wgsl's, shared with every other kernel); on GPUs the same choices mean few, coalesced reads, and the host lowers ROWS for small
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

// Where common/quant.wgsl's block decode finds the words: this shard's buffers.
fn qword(fmt: u32, row: u32, i: u32) -> u32 {
    return wq[row * p.row_words + i];
}
fn qscales(fmt: u32, row: u32, blk: u32) -> vec2<f32> {
    let g = row * (p.blocks / qunits(fmt)) + blk;
    return qscales_of(fmt, ws[qscale_index(fmt, g)], g);
}

// ROWS is 4, 8 or 16, TOK 1, 2 or 4 and WG (threads per workgroup) 64, 128 or 256 with
// ROWS * WG <= PART; pipeline creation makes them constants, so the loops to them unroll and the
// branches on them fold away.
const R: u32 = 16u;
const PART: u32 = 2048u;
override ROWS: u32 = 16u;
override TOK: u32 = 1u;
override WG: u32 = 64u;

var<workgroup> part: array<f32, PART>; // one token's partial sums, row r at r * WG
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

// Reduces every thread's partial sums (acc[r][t] for row r, token t) and writes y, one token at a
// time: thread i first adds 8 of row i / 8's WG partials, then thread r < ROWS adds row r's 8
// results. Two barriers per token rather than log2(WG).
fn finish(lid: u32, row0: u32, tok0: u32, acc: array<vec4<f32>, R>) {
    for (var t = 0u; t < TOK; t++) {
        for (var r = 0u; r < ROWS; r++) {
            part[r * WG + lid] = acc[r][t];
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

// x under one unit of work (a word of f32/f16 weights, a block of quantised ones) for each of the
// TOK tokens: token t's values in v[t] (f32: v[t][0].x; f16: v[t][0].xy; blocks: all 32). (The row
// loop below stays a loop: spelling out the rows by hand made lavapipe compile these kernels six
// times slower, for no speed.)
struct Xs {
    v: array<array<vec4<f32>, 8>, 4>,
}

// Units (data words or blocks) per row.
fn units(fmt: u32) -> u32 {
    if (fmt == F32 || fmt == F16) {
        return p.row_words;
    }
    return p.blocks;
}

fn load_token(fmt: u32, tok: u32, u: u32) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    let base = tok * p.cols;
    if (fmt == F32) {
        v[0].x = x[base + u];
    } else if (fmt == F16) {
        // An odd row ends in a zero pad weight; x has no value there, so use 0 rather than read
        // the next token's first value.
        let c = 2u * u;
        v[0] = vec4<f32>(x[base + c], select(0.0, x[base + c + 1u], c + 1u < p.cols), 0.0, 0.0);
    } else {
        for (var i = 0u; i < 8u; i++) {
            let c = base + 32u * u + 4u * i;
            v[i] = vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
        }
    }
    return v;
}

fn load_xs(fmt: u32, tok0: u32, u: u32) -> Xs {
    var xs: Xs;
    for (var t = 0u; t < TOK; t++) {
        xs.v[t] = load_token(fmt, tok_of(tok0, t), u);
    }
    return xs;
}

fn dot8(a: array<vec4<f32>, 8>, b: array<vec4<f32>, 8>) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < 8u; i++) {
        s += dot(a[i], b[i]);
    }
    return s;
}

// sum_j w_j x_j over one unit of one row, for each token (lanes t >= TOK are left zero).
fn unit_row(fmt: u32, row: u32, u: u32, xs: Xs) -> vec4<f32> {
    // The unit's weights in the order of load_token; blocks dequantised by the shared decode
    // (common/quant.wgsl). On a GPU the weight words are what a matvec waits for, not the
    // multiply-add per weight that dequantising first costs.
    var w: array<vec4<f32>, 8>;
    if (fmt == F32) {
        w[0].x = bitcast<f32>(wq[row * p.row_words + u]);
    } else if (fmt == F16) {
        w[0] = vec4<f32>(qh_pair(wq[row * p.row_words + u]), 0.0, 0.0);
    } else {
        let h = qunit_head(fmt, row, u);
        for (var i = 0u; i < 8u; i++) {
            w[i] = qunit4(fmt, row, h, i);
        }
    }
    var s = vec4<f32>(0.0);
    if (fmt == F32) {
        // One weight: skip dot8 so the compiler need not prove the other lanes zero.
        for (var t = 0u; t < TOK; t++) {
            s[t] = w[0].x * xs.v[t][0].x;
        }
        return s;
    }
    if (fmt == F16) {
        for (var t = 0u; t < TOK; t++) {
            s[t] = dot(w[0].xy, xs.v[t][0].xy);
        }
        return s;
    }
    s.x = dot8(w, xs.v[0]);
    if (TOK > 1u) {
        s.y = dot8(w, xs.v[1]);
    }
    if (TOK > 2u) {
        s.z = dot8(w, xs.v[2]);
        s.w = dot8(w, xs.v[3]);
    }
    return s;
}

fn matvec_any(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let at = tile_of(wid, nwg);
    if (at.x >= p.rows) {
        return;
    }
    let r0 = at.x;
    // Per row, the sums of the TOK tokens. With one token, plain f32: lavapipe keeps the 16 in
    // registers, but moves 16 vec4 to memory, which costs 15% of a matvec.
    var acc1: array<f32, R>;
    var acc: array<vec4<f32>, R>;
    for (var u = lid; u < units(fmt); u += WG) {
        let xs = load_xs(fmt, at.y, u);
        for (var r = 0u; r < ROWS; r++) {
            let s = unit_row(fmt, row_of(r0, r), u, xs);
            if (TOK == 1u) {
                acc1[r] += s.x;
            } else {
                acc[r] += s;
            }
        }
    }
    if (TOK == 1u) {
        for (var r = 0u; r < ROWS; r++) {
            acc[r].x = acc1[r];
        }
    }
    finish(lid, r0, at.y, acc);
}

@compute @workgroup_size(WG)
fn matvec_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(F32, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(F16, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q8_0, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q4_0, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q4_1, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q5_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q5_0, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q5_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q5_1, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q4_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q4_K, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q5_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q5_K, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matvec_q6_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_any(Q6_K, wid, nwg, lid);
}
