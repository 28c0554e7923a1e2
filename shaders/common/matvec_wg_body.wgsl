// The body of the workgroup matrix-vector product, shared by matvec.wgsl (partial sums reduced in
// workgroup memory: every device) and matvec_wg_sg.wgsl (reduced with subgroupAdd where the
// device has subgroups). Each includer defines
//   struct Ids     the entry points' builtins: wid (workgroup_id), nwg (num_workgroups), lid
//                  (local_invocation_index), and what its `finish` needs besides;
//   fn finish(ids: Ids, row0: u32, tok0: u32)   reduces the threads' `acc` (and `sumsq`) and
//                  calls `store` for rows row0.. and tokens tok0.. of the workgroup.
//
// y[row_start + r] = sum_c W[row0 + r, c] x[c] for `rows` rows of the bound weights, TOK tokens a
// workgroup (rows of x and y), one entry point per weight format (repack layout, see
// common/quant.wgsl). Bindings and params are the subgroup matvec's (common/matvec_sg_body.wgsl):
// 0 = weight data, 1 = block scales (a dummy word for f32/f16), 2 = x, 3 = y, 4 = y1, 5 = y2,
// 6 = x2, 7 = res, 8 = params. Outputs split between y, y1 and y2 (Q, K and V; gate and up,
// stacked rows of one buffer), XFN = 1 reads silu(x) * x2 (SwiGLU of gate and up), XFN = 2 reads
// RMSNorm of x with gamma x2 (the sum of squares taken beside the products, 1 / rms applied to the
// finished rows), RES = 1 adds res to y (the residual stream).
//
// Shape (after ggml-vulkan's mul_mat_vec): a workgroup of WG threads computes ROWS rows for TOK
// tokens. Quantised rows: four consecutive threads share a 32-weight unit, thread j taking
// weights 4j..4j+3 and 16+4j..16+4j+3 (Q4: the two nibbles of data word j), so that a subgroup
// reads whole runs of consecutive weight words (32 lanes: 8 Q4_0 blocks, 128 contiguous bytes per
// row), and x as two vec4 per thread and unit, again consecutive across the lanes, loaded once for
// all ROWS rows. Each weight word is loaded once for all TOK tokens. f32/f16 rows of whole
// 16-byte quads (every real model's): thread t takes quad t, t + WG, ... and x as vec4 (the `_v4`
// entry points); other f32/f16 rows: data word t, t + WG, ... (consecutive, but 4-byte loads). Q8_0/Q4_0/Q4_1 use common/quant.wgsl's tuned
// decode: quants only (Q4 nibbles converted by the exponent trick, no int-to-float), the block's
// scale and offset applied once per thread and block (qfold); the other formats dequantise
// through qunit_head/qdecode4.
//
// A row's result does not depend on TOK (batched decode relies on it, bit for bit): each thread
// visits the same units in the same order, tokens kept in separate lanes of its sums, and the
// reduction order is fixed by the thread layout alone.

// #include "common/quant.wgsl"

struct Params {
    rows: u32,      // rows computed
    cols: u32,      // weights per row, and length of a token's row of x
    row_start: u32, // where computed row 0 goes in a row of y
    row0: u32,      // the binding's row of computed row 0
    split1: u32,    // computed rows from here on go to y1 (= rows: none)
    split2: u32,    // computed rows from here on go to y2 (= rows: none)
    m: u32,         // tokens
    ld: u32,        // length of a token's row of y
}

@group(0) @binding(0) var<storage, read> wq: array<u32>;
// The weights as 16-byte quads, for f32/f16 rows of whole quads (the `_v4` entry points).
@group(0) @binding(0) var<storage, read> wq4: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> ws: array<u32>;
// x and x2 twice: as f32 for the f32/f16 entry points (any row length), as vec4 for the quantised
// ones (rows of whole 32-weight blocks). An entry point uses one of each.
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> xv: array<vec4<f32>>;
// The idot entry points' x: the tokens' rows quantised to bytes (shaders/quantize_x.wgsl): per
// 32-value block 8 words of packed i8, all blocks of all tokens first, then one f32 scale per block.
@group(0) @binding(2) var<storage, read> xq: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<storage, read_write> y2: array<f32>;
@group(0) @binding(6) var<storage, read> x2: array<f32>;
@group(0) @binding(6) var<storage, read> x2v: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> res: array<f32>;
@group(0) @binding(8) var<uniform> p: Params;

// ROWS is 4, 8 or 16, TOK 1, 2 or 4 and WG (threads per workgroup) 64, 128 or 256 with
// ROWS * WG <= 2048; pipeline creation makes them constants, so the loops to them unroll and the
// branches on them fold away.
const R: u32 = 16u;
override ROWS: u32 = 16u;
override TOK: u32 = 1u;
override WG: u32 = 64u;
// 0: the input is x; 1: silu(x) * x2; 2: RMSNorm of x with gamma x2 and EPS.
override XFN: u32 = 0u;
override EPS: f32 = 1e-5;
// 1: y = res + W x.
override RES: u32 = 0u;
// Threads that share a 32-weight unit, and units a workgroup takes per pass.
const LANES: u32 = 4u;
override UNITS_PER_PASS: u32 = WG / LANES;

// Partial sums for the reduction: ROWS * WG of them, and WG more for the sums of squares.
var<workgroup> part: array<f32, 2304>;

// Per row, the thread's sums of the TOK tokens (lane t: token t).
var<private> acc: array<vec4<f32>, R>;
// XFN = 2: the thread's share of each token's sum of squares of x.
var<private> sumsq: vec4<f32>;

// Where common/quant.wgsl's block decode finds the words (`row` a row of the binding).
fn qword(fmt: u32, row: u32, i: u32) -> u32 {
    return wq[row * qrow_words(fmt, p.cols) + i];
}
fn qscales(fmt: u32, row: u32, blk: u32) -> vec2<f32> {
    let g = row * (p.cols / qblock_len(fmt)) + blk;
    return qscales_of(fmt, ws[qscale_index(fmt, g)], g);
}

// (first row, first token) of this workgroup; a row past the end for the padding workgroups of a
// 2D dispatch. Consecutive workgroups take the token groups of the same rows, so their weights
// are still in cache.
fn tile_of(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    let g = wid.x + wid.y * nwg.x;
    let groups = (p.m + TOK - 1u) / TOK;
    return vec2<u32>(g / groups * ROWS, g % groups * TOK);
}

// The binding's row of computed row r of the workgroup, clamped into range so that a partial
// workgroup reads valid memory (its surplus sums are never written).
fn row_of(row0: u32, r: u32) -> u32 {
    return p.row0 + min(row0 + r, p.rows - 1u);
}
fn tok_of(tok0: u32, t: u32) -> u32 {
    return min(tok0 + t, p.m - 1u);
}

// Token t's slot in sumsq (t < TOK).
fn add_sumsq(t: u32, s: f32) {
    sumsq[t] += s;
}

// x at column c of token tok as the product reads it (f32/f16 entry points); column past the row
// reads zero (an odd f16 row's pad weight).
fn x1(t: u32, tok: u32, c: u32) -> f32 {
    if (c >= p.cols) {
        return 0.0;
    }
    let i = tok * p.cols + c;
    var v = x[i];
    if (XFN == 1u) {
        v = v / (1.0 + exp(-v)) * x2[i];
    }
    if (XFN == 2u) {
        add_sumsq(t, v * v);
        v *= x2[c];
    }
    return v;
}

// x at columns 4k..4k+3 of token tok (quantised entry points: rows are whole vec4).
fn x4(t: u32, tok: u32, k: u32) -> vec4<f32> {
    let i = tok * (p.cols / 4u) + k;
    var v = xv[i];
    if (XFN == 1u) {
        v = v / (1.0 + exp(-v)) * x2v[i];
    }
    if (XFN == 2u) {
        add_sumsq(t, dot(v, v));
        v *= x2v[k];
    }
    return v;
}

// f32/f16: sum_j w_j x_j over data word u of one row for each token.
fn word_row(fmt: u32, row: u32, u: u32, xs: array<vec2<f32>, 4>) -> vec4<f32> {
    let w = wq[row * qrow_words(fmt, p.cols) + u];
    var s = vec4<f32>(0.0);
    for (var t = 0u; t < TOK; t++) {
        if (fmt == F32) {
            s[t] = bitcast<f32>(w) * xs[t].x;
        } else {
            s[t] = dot(qh_pair(w), xs[t]);
        }
    }
    return s;
}

fn matvec_words(fmt: u32, r0: u32, tok0: u32, lid: u32) {
    let words = qrow_words(fmt, p.cols);
    for (var u = lid; u < words; u += WG) {
        var xs: array<vec2<f32>, 4>;
        for (var t = 0u; t < TOK; t++) {
            let tok = tok_of(tok0, t);
            if (fmt == F32) {
                xs[t] = vec2<f32>(x1(t, tok, u), 0.0);
            } else {
                xs[t] = vec2<f32>(x1(t, tok, 2u * u), x1(t, tok, 2u * u + 1u));
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += word_row(fmt, row_of(r0, r), u, xs);
        }
    }
}

// f32/f16 rows of whole 16-byte quads (f32: cols % 4 == 0, f16: cols % 8 == 0): thread t takes
// quads t, t + WG, ... of each row, one 16-byte load per row and quad (consecutive across the
// threads), and x as vec4 (two for the 8 halves of an f16 quad), loaded once for all ROWS rows.
fn matvec_quads(fmt: u32, r0: u32, tok0: u32, lid: u32) {
    let quads = qrow_words(fmt, p.cols) / 4u;
    for (var u = lid; u < quads; u += WG) {
        var xa: array<vec4<f32>, 4>;
        var xb: array<vec4<f32>, 4>;
        for (var t = 0u; t < TOK; t++) {
            let tok = tok_of(tok0, t);
            if (fmt == F32) {
                xa[t] = x4(t, tok, u);
            } else {
                xa[t] = x4(t, tok, 2u * u);
                xb[t] = x4(t, tok, 2u * u + 1u);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            let w = wq4[row_of(r0, r) * quads + u];
            var s = vec4<f32>(0.0);
            for (var t = 0u; t < TOK; t++) {
                if (fmt == F32) {
                    s[t] = dot(bitcast<vec4<f32>>(w), xa[t]);
                } else {
                    s[t] = dot(vec4<f32>(qh_pair(w.x), qh_pair(w.y)), xa[t])
                         + dot(vec4<f32>(qh_pair(w.z), qh_pair(w.w)), xb[t]);
                }
            }
            acc[r] += s;
        }
    }
}

fn matvec_blocks(fmt: u32, r0: u32, tok0: u32, lid: u32) {
    let j = lid % LANES;
    let units = p.cols / 32u;
    for (var u = lid / LANES; u < units; u += UNITS_PER_PASS) {
        // Token t's x under the thread's weights (lo: 4j.., hi: 16+4j..), and their sum (the
        // tuned Q4 formats fold their offset into it).
        var xlo: array<vec4<f32>, 4>;
        var xhi: array<vec4<f32>, 4>;
        var xsum = vec4<f32>(0.0);
        for (var t = 0u; t < TOK; t++) {
            let tok = tok_of(tok0, t);
            xlo[t] = x4(t, tok, 8u * u + j);
            xhi[t] = x4(t, tok, 8u * u + 4u + j);
            xsum[t] = dot(xlo[t] + xhi[t], vec4<f32>(1.0));
        }
        for (var r = 0u; r < ROWS; r++) {
            let row = row_of(r0, r);
            var s = vec4<f32>(0.0);
            if (qtuned(fmt)) {
                let base = row * qrow_words(fmt, p.cols) + u * qblock_words(fmt);
                let w0 = wq[base + j];
                var w1 = w0;
                if (fmt == Q8_0) {
                    w1 = wq[base + 4u + j];
                }
                let q = qquarter_tuned(fmt, w0, w1);
                for (var t = 0u; t < TOK; t++) {
                    s[t] = dot(q.lo, xlo[t]) + dot(q.hi, xhi[t]);
                }
                s = qfold(fmt, qscales(fmt, row, u), s, xsum);
            } else {
                let q = qquarter(fmt, row, qunit_head(fmt, row, u), j);
                for (var t = 0u; t < TOK; t++) {
                    s[t] = dot(q.lo, xlo[t]) + dot(q.hi, xhi[t]);
                }
            }
            acc[r] += s;
        }
    }
}

// The idot entry points (qidot formats): x comes quantised to bytes with a scale per block, and
// a lane's 8 products per row and token are two dot4I8Packed summed as integers; the block's
// scales apply once per lane (qidot_fold). Same units, lanes and reduction as matvec_blocks. XFN
// is 0 here: the quantisation applied SwiGLU or the norm (its 1 / rms is in the scales).
fn matvec_idot(fmt: u32, r0: u32, tok0: u32, lid: u32) {
    let j = lid % LANES;
    let units = p.cols / 32u;
    let scales = p.m * units * 8u;
    for (var u = lid / LANES; u < units; u += UNITS_PER_PASS) {
        // Token t's packed x under the thread's weights (lo: 4j.., hi: 16+4j..), the block's
        // scale, and the sum of those 8 quants.
        var xlo: vec4<u32>;
        var xhi: vec4<u32>;
        var dx = vec4<f32>(0.0);
        var sx = vec4<i32>(0);
        for (var t = 0u; t < TOK; t++) {
            let g = tok_of(tok0, t) * units + u;
            xlo[t] = xq[8u * g + j];
            xhi[t] = xq[8u * g + 4u + j];
            dx[t] = bitcast<f32>(xq[scales + g]);
            sx[t] = dot4I8Packed(xlo[t], 0x01010101u) + dot4I8Packed(xhi[t], 0x01010101u);
        }
        for (var r = 0u; r < ROWS; r++) {
            let row = row_of(r0, r);
            let base = row * qrow_words(fmt, p.cols) + u * qblock_words(fmt);
            let at = qidot_words(fmt, j);
            let w0 = wq[base + at.x];
            var w1 = w0;
            if (at.y != at.x) {
                w1 = wq[base + at.y];
            }
            let q = qquarter_packed(fmt, w0, w1, j);
            let dm = qscales(fmt, row, u);
            var s = vec4<f32>(0.0);
            for (var t = 0u; t < TOK; t++) {
                let si = dot4I8Packed(q.x, xlo[t]) + dot4I8Packed(q.y, xhi[t]);
                s[t] = qidot_fold(fmt, dm, dx[t], si, sx[t]);
            }
            acc[r] += s;
        }
    }
}

// Stores computed row `row` of token `tok` in y, y1 or y2.
fn store(tok: u32, row: u32, v: f32) {
    if (row < p.split1) {
        let i = tok * p.ld + p.row_start + row;
        if (RES == 1u) {
            y[i] = res[i] + v;
        } else {
            y[i] = v;
        }
    } else if (row < p.split2) {
        y1[tok * (p.split2 - p.split1) + row - p.split1] = v;
    } else {
        y2[tok * (p.rows - p.split2) + row - p.split2] = v;
    }
}

// Row r of token t of the workgroup, if it exists, from its reduced sum `s` and (XFN = 2) its
// token's reduced sum of squares `sq`.
fn put(row0: u32, tok0: u32, r: u32, t: u32, s: f32, sq: f32) {
    if (row0 + r >= p.rows || tok0 + t >= p.m) {
        return;
    }
    var v = s;
    if (XFN == 2u) {
        v *= inverseSqrt(sq / f32(p.cols) + EPS);
    }
    store(tok0 + t, row0 + r, v);
}

// The f32/f16 entry points, their `_v4` forms and the quantised ones take separate paths: an entry
// point may use only one of the two views of x (and of x2, and of the weights).
fn matvec_words_any(fmt: u32, ids: Ids) {
    let at = tile_of(ids.wid, ids.nwg);
    if (at.x >= p.rows) {
        return; // the whole workgroup: uniform
    }
    matvec_words(fmt, at.x, at.y, ids.lid);
    finish(ids, at.x, at.y);
}

fn matvec_quads_any(fmt: u32, ids: Ids) {
    let at = tile_of(ids.wid, ids.nwg);
    if (at.x >= p.rows) {
        return;
    }
    matvec_quads(fmt, at.x, at.y, ids.lid);
    finish(ids, at.x, at.y);
}

fn matvec_blocks_any(fmt: u32, ids: Ids) {
    let at = tile_of(ids.wid, ids.nwg);
    if (at.x >= p.rows) {
        return;
    }
    matvec_blocks(fmt, at.x, at.y, ids.lid);
    finish(ids, at.x, at.y);
}

fn matvec_idot_any(fmt: u32, ids: Ids) {
    let at = tile_of(ids.wid, ids.nwg);
    if (at.x >= p.rows) {
        return;
    }
    matvec_idot(fmt, at.x, at.y, ids.lid);
    finish(ids, at.x, at.y);
}

@compute @workgroup_size(WG)
fn matvec_idot_q8_0(ids: Ids) {
    matvec_idot_any(Q8_0, ids);
}

@compute @workgroup_size(WG)
fn matvec_idot_q4_0(ids: Ids) {
    matvec_idot_any(Q4_0, ids);
}

@compute @workgroup_size(WG)
fn matvec_idot_q4_1(ids: Ids) {
    matvec_idot_any(Q4_1, ids);
}

@compute @workgroup_size(WG)
fn matvec_idot_q5_0(ids: Ids) {
    matvec_idot_any(Q5_0, ids);
}

@compute @workgroup_size(WG)
fn matvec_idot_q5_1(ids: Ids) {
    matvec_idot_any(Q5_1, ids);
}

@compute @workgroup_size(WG)
fn matvec_f32(ids: Ids) {
    matvec_words_any(F32, ids);
}

@compute @workgroup_size(WG)
fn matvec_f16(ids: Ids) {
    matvec_words_any(F16, ids);
}

@compute @workgroup_size(WG)
fn matvec_f32_v4(ids: Ids) {
    matvec_quads_any(F32, ids);
}

@compute @workgroup_size(WG)
fn matvec_f16_v4(ids: Ids) {
    matvec_quads_any(F16, ids);
}

@compute @workgroup_size(WG)
fn matvec_q8_0(ids: Ids) {
    matvec_blocks_any(Q8_0, ids);
}

@compute @workgroup_size(WG)
fn matvec_q4_0(ids: Ids) {
    matvec_blocks_any(Q4_0, ids);
}

@compute @workgroup_size(WG)
fn matvec_q4_1(ids: Ids) {
    matvec_blocks_any(Q4_1, ids);
}

@compute @workgroup_size(WG)
fn matvec_q5_0(ids: Ids) {
    matvec_blocks_any(Q5_0, ids);
}

@compute @workgroup_size(WG)
fn matvec_q5_1(ids: Ids) {
    matvec_blocks_any(Q5_1, ids);
}

@compute @workgroup_size(WG)
fn matvec_q4_k(ids: Ids) {
    matvec_blocks_any(Q4_K, ids);
}

@compute @workgroup_size(WG)
fn matvec_q5_k(ids: Ids) {
    matvec_blocks_any(Q5_K, ids);
}

@compute @workgroup_size(WG)
fn matvec_q6_k(ids: Ids) {
    matvec_blocks_any(Q6_K, ids);
}
