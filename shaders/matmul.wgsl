// Prefill matrix product Y[t, row_start + n] = sum_c X[t, c] * W[n, c] over one shard of W (rows n
// of the shard), for m tokens t; one entry point per weight format (repack layout, see
// common/quant.wgsl). Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16),
// 2 = X (m x cols, f32), 3 = Y (m x ld, f32, read_write), 4 = params.
//
// Each workgroup of 8 x 8 threads computes a 64 x 64 tile of Y (64 tokens by 64 weight rows),
// each thread an 8 x 8 register block: per step of K it reads 16 vec4 of workgroup memory for 256
// multiply-adds (loads are what lavapipe is bound by, and what limits GPUs' shared-memory
// bandwidth). K advances one 32-wide block at a time: the X tile is copied and the W tile
// dequantised into workgroup memory once, then every thread reads both as vec4 along K. Tile rows
// are padded to 9 vec4 so that the 8 rows a warp reads at once fall in different banks.

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

// Where common/quant.wgsl's block decode finds the words: this shard's buffers.
fn qword(fmt: u32, row: u32, i: u32) -> u32 {
    return wq[row * p.row_words + i];
}
fn qscales(fmt: u32, row: u32, blk: u32) -> vec2<f32> {
    let g = row * (p.blocks / qunits(fmt)) + blk;
    return qscales_of(fmt, ws[qscale_index(fmt, g)], g);
}

const T: u32 = 64u;   // tile edge, in tokens and in weight rows
const KP: u32 = 9u;   // vec4 per tile row: 8 (32 values of K) plus one of padding
const WG: u32 = 64u;  // 8 x 8 threads, each an 8 x 8 block of the tile

var<workgroup> xs: array<vec4<f32>, T * KP>; // [token][k / 4]
var<workgroup> wt: array<vec4<f32>, T * KP>; // [weight row][k / 4], dequantised

// Fills the tiles for K = k0..k0+32. Entry i = lid + 64e of a 64 x 8 vec4 tile is row i / 8,
// vec4 i % 8.
fn load_tiles(fmt: u32, m0: u32, n0: u32, k0: u32, lid: u32) {
    // X: tokens past m and columns past K read as zero.
    for (var e = 0u; e < 8u; e++) {
        let i = lid + e * WG;
        let t = m0 + (i >> 3u);
        let c = k0 + 4u * (i & 7u);
        var v = vec4<f32>(0.0);
        if (t < p.m) {
            for (var j = 0u; j < 4u; j++) {
                if (c + j < p.cols) {
                    v[j] = x[t * p.cols + c + j];
                }
            }
        }
        xs[(i >> 3u) * KP + (i & 7u)] = v;
    }
    // W: rows past the shard are clamped to its last row; their outputs are never stored.
    // Quantised formats: unit b = k0 / 32 of each row, dequantised by the shared block decode.
    let b = k0 >> 5u;
    if (fmt >= Q8_0) {
        for (var e = 0u; e < 8u; e++) {
            let i = lid + e * WG;
            let row = min(n0 + (i >> 3u), p.rows - 1u);
            wt[(i >> 3u) * KP + (i & 7u)] = qunit4(fmt, row, qunit_head(fmt, row, b), i & 7u);
        }
        return;
    }
    for (var e = 0u; e < 8u; e++) {
        let i = lid + e * WG;
        let row = min(n0 + (i >> 3u), p.rows - 1u);
        let k4 = i & 7u;
        let c = k0 + 4u * k4;
        var v = vec4<f32>(0.0);
        switch fmt {
            case F32: {
                for (var j = 0u; j < 4u; j++) {
                    if (c + j < p.cols) {
                        v[j] = bitcast<f32>(wq[row * p.row_words + c + j]);
                    }
                }
            }
            case F16: {
                // Word c/2 lies in the row iff c < cols; a trailing odd column pairs with a zero pad.
                let w = row * p.row_words + (c >> 1u);
                if (c < p.cols) {
                    v = vec4<f32>(qh_pair(wq[w]), 0.0, 0.0);
                }
                if (c + 2u < p.cols) {
                    v = vec4<f32>(v.xy, qh_pair(wq[w + 1u]));
                }
            }
            default: {}
        }
        wt[(i >> 3u) * KP + k4] = v;
    }
}

// acc_ij += the dot products of token vector a_i with row vectors b_j, four rows per vec4.
fn dots(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

fn matmul_tiled(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= p.tiles_n * ((p.m + T - 1u) / T)) {
        return;
    }
    let n0 = (tile % p.tiles_n) * T;
    let m0 = (tile / p.tiles_n) * T;
    let tx = lid & 7u;
    let ty = lid >> 3u;
    // Thread (tx, ty) owns tokens ty + 8i and weight rows tx + 8j (i, j < 8): acc[2i] holds rows
    // j < 4, acc[2i + 1] rows j >= 4. Interleaving (not 8 adjacent rows) keeps the 8 threads of a
    // row of the thread grid on different banks and their stores contiguous.
    var acc: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < p.cols; k0 += 32u) {
        load_tiles(fmt, m0, n0, k0, lid);
        workgroupBarrier();
        for (var k = 0u; k < 8u; k++) {
            var b: array<vec4<f32>, 8>;
            for (var j = 0u; j < 8u; j++) {
                b[j] = wt[(tx + 8u * j) * KP + k];
            }
            for (var i = 0u; i < 8u; i++) {
                let a = xs[(ty + 8u * i) * KP + k];
                acc[2u * i] += dots(a, b[0], b[1], b[2], b[3]);
                acc[2u * i + 1u] += dots(a, b[4], b[5], b[6], b[7]);
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 8u; i++) {
        let t = m0 + ty + 8u * i;
        if (t < p.m) {
            let base = t * p.ld + p.row_start;
            for (var j = 0u; j < 8u; j++) {
                let n = n0 + tx + 8u * j;
                if (n < p.rows) {
                    y[base + n] = acc[2u * i + (j >> 2u)][j & 3u];
                }
            }
        }
    }
}

@compute @workgroup_size(64)
fn matmul_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(F32, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(F16, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q8_0, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_0, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_1, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q5_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q5_0, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q5_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q5_1, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q4_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_K, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q5_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q5_K, wid, nwg, lid);
}

@compute @workgroup_size(64)
fn matmul_q6_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q6_K, wid, nwg, lid);
}
