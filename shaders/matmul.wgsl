// Prefill matrix product Y[t, row_start + n] = sum_c X[t, c] * W[n, c] over one shard of W (rows n
// of the shard), for m tokens t; one entry point per weight format (repack layout, see
// common/quant.wgsl). Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16),
// 2 = X (m x cols, f32), 3 = Y (m x ld, f32, read_write), 4 = params.
//
// Each workgroup of 16 x 16 threads computes a 64 x 64 tile of Y (64 tokens by 64 weight rows),
// each thread a 4 x 4 register block (tokens ty + 16i, rows tx + 16j, so a warp's stores are
// contiguous). K advances one 32-wide block at a time: the X tile is copied and the W tile
// dequantised into workgroup memory once, then every thread reads both as vec4 along K. Tile rows
// are padded to 9 vec4 so that the 16 rows a warp reads at once fall in different banks.

// #include "common/quant.wgsl"

struct Params {
    m: u32,         // tokens
    rows: u32,      // rows of this shard
    cols: u32,      // weights per row (K)
    row_start: u32, // where the shard's row 0 goes in a row of Y
    ld: u32,        // length of a row of Y (all rows of W)
    row_words: u32, // u32 data words per weight row
    blocks: u32,    // 32-weight blocks per row (quantised formats)
    tiles_n: u32,   // 64-row tiles of the shard
}

@group(0) @binding(0) var<storage, read> wq: array<u32>;
@group(0) @binding(1) var<storage, read> ws: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const T: u32 = 64u;   // tile edge, in tokens and in weight rows
const KP: u32 = 9u;   // vec4 per tile row: 8 (32 values of K) plus one of padding
const WG: u32 = 256u;

const F32: u32 = 0u;
const F16: u32 = 1u;
const Q8_0: u32 = 2u;
const Q4_0: u32 = 3u;
const Q4_1: u32 = 4u;

var<workgroup> xs: array<vec4<f32>, T * KP>; // [token][k / 4]
var<workgroup> wt: array<vec4<f32>, T * KP>; // [weight row][k / 4], dequantised

// X[t, c..c+4] with zeros past the end of the row (K need not be a multiple of 32 for f32/f16).
fn load_x4(t: u32, c: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    let base = t * p.cols + c;
    for (var j = 0u; j < 4u; j++) {
        if (c + j < p.cols) {
            v[j] = x[base + j];
        }
    }
    return v;
}

fn load_tiles(fmt: u32, m0: u32, n0: u32, k0: u32, lid: u32) {
    // X: 64 tokens x 8 vec4, two per thread; tokens past m read as zero.
    for (var e = 0u; e < 2u; e++) {
        let i = lid + e * WG;
        let t = m0 + (i >> 3u);
        var v = vec4<f32>(0.0);
        if (t < p.m) {
            v = load_x4(t, k0 + 4u * (i & 7u));
        }
        xs[(i >> 3u) * KP + (i & 7u)] = v;
    }
    // W: rows past the shard are clamped to its last row; their outputs are never stored.
    let b = k0 >> 5u;
    switch fmt {
        case F32: { // 8 vec4 per row, two per thread
            for (var e = 0u; e < 2u; e++) {
                let i = lid + e * WG;
                let row = min(n0 + (i >> 3u), p.rows - 1u);
                let c = k0 + 4u * (i & 7u);
                var v = vec4<f32>(0.0);
                for (var j = 0u; j < 4u; j++) {
                    if (c + j < p.cols) {
                        v[j] = bitcast<f32>(wq[row * p.row_words + c + j]);
                    }
                }
                wt[(i >> 3u) * KP + (i & 7u)] = v;
            }
        }
        case F16: { // 8 vec4 (two words each) per row, two per thread
            for (var e = 0u; e < 2u; e++) {
                let i = lid + e * WG;
                let row = min(n0 + (i >> 3u), p.rows - 1u);
                let c = k0 + 4u * (i & 7u);
                let w = row * p.row_words + (c >> 1u);
                // Word c/2 lies in the row iff c < cols; a trailing odd column pairs with a zero pad.
                var lo = vec2<f32>(0.0);
                var hi = vec2<f32>(0.0);
                if (c < p.cols) {
                    lo = qh_pair(wq[w]);
                }
                if (c + 2u < p.cols) {
                    hi = qh_pair(wq[w + 1u]);
                }
                wt[(i >> 3u) * KP + (i & 7u)] = vec4<f32>(lo, hi);
            }
        }
        case Q8_0: { // 8 words per block, two per thread
            for (var e = 0u; e < 2u; e++) {
                let i = lid + e * WG;
                let row = min(n0 + (i >> 3u), p.rows - 1u);
                let g = row * p.blocks + b;
                let d = qh_scale(ws[g >> 1u], g);
                let q = wq[row * p.row_words + b * 8u + (i & 7u)];
                wt[(i >> 3u) * KP + (i & 7u)] = d * q8_unpack(q);
            }
        }
        default: { // Q4_0, Q4_1: 4 words per block, one per thread
            let row = min(n0 + (lid >> 2u), p.rows - 1u);
            let g = row * p.blocks + b;
            let k = lid & 3u;
            let q = wq[row * p.row_words + b * 4u + k];
            var lo: vec4<f32>;
            var hi: vec4<f32>;
            if (fmt == Q4_0) {
                let d = qh_scale(ws[g >> 1u], g);
                lo = d * (q4_lo(q) - 8.0);
                hi = d * (q4_hi(q) - 8.0);
            } else {
                let dm = qh_pair(ws[g]);
                lo = dm.x * q4_lo(q) + dm.y;
                hi = dm.x * q4_hi(q) + dm.y;
            }
            wt[(lid >> 2u) * KP + k] = lo;
            wt[(lid >> 2u) * KP + 4u + k] = hi;
        }
    }
}

fn matmul_tiled(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= p.tiles_n * ((p.m + T - 1u) / T)) {
        return;
    }
    let n0 = (tile % p.tiles_n) * T;
    let m0 = (tile / p.tiles_n) * T;
    let tx = lid & 15u;
    let ty = lid >> 4u;
    // acc_i[j]: token m0 + ty + 16i, weight row n0 + tx + 16j.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.cols; k0 += 32u) {
        load_tiles(fmt, m0, n0, k0, lid);
        workgroupBarrier();
        for (var k = 0u; k < 8u; k++) {
            let a0 = xs[ty * KP + k];
            let a1 = xs[(ty + 16u) * KP + k];
            let a2 = xs[(ty + 32u) * KP + k];
            let a3 = xs[(ty + 48u) * KP + k];
            let b0 = wt[tx * KP + k];
            let b1 = wt[(tx + 16u) * KP + k];
            let b2 = wt[(tx + 32u) * KP + k];
            let b3 = wt[(tx + 48u) * KP + k];
            acc0 += vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
            acc1 += vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
            acc2 += vec4<f32>(dot(a2, b0), dot(a2, b1), dot(a2, b2), dot(a2, b3));
            acc3 += vec4<f32>(dot(a3, b0), dot(a3, b1), dot(a3, b2), dot(a3, b3));
        }
        workgroupBarrier();
    }
    store(m0 + ty, n0 + tx, acc0);
    store(m0 + ty + 16u, n0 + tx, acc1);
    store(m0 + ty + 32u, n0 + tx, acc2);
    store(m0 + ty + 48u, n0 + tx, acc3);
}

// Stores Y[t, n + 16j] for the four j, skipping tokens and rows past the end.
fn store(t: u32, n: u32, v: vec4<f32>) {
    if (t >= p.m) {
        return;
    }
    let base = t * p.ld + p.row_start;
    for (var j = 0u; j < 4u; j++) {
        if (n + 16u * j < p.rows) {
            y[base + n + 16u * j] = v[j];
        }
    }
}

@compute @workgroup_size(256)
fn matmul_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(F32, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn matmul_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(F16, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn matmul_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q8_0, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn matmul_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_0, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn matmul_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_1, wid, nwg, lid);
}
