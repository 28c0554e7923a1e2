// The tiled prefill product Y[t, row_start + n] = sum_c X[t, c] * W[n, c] over one shard of W (rows
// n of the shard), for m tokens t; one entry point per weight format (repack layout, see
// common/quant.wgsl). Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16),
// 2 = X (m x cols, f32), 3 = Y (m x ld, f32, read_write), 4 = params.
//
// The includer defines the tile types: `TV` (a vec4 of tile values: f32 in matmul.wgsl, f16 in
// matmul_f16.wgsl), `PV` (a vec4 of the sums within one K step when ACC16) and `ACC16` (sum each
// K step in PV, then add into the f32 accumulators; else every product goes into f32 at once).
//
// A workgroup of WG threads (64 or 128, the host's override) computes a WG x 64 tile of Y (WG
// tokens by 64 weight rows), each thread an 8 x 8 register block: per value of K it reads 8 token
// and 8 row values (4 vec4) from workgroup memory for 64 multiply-adds. K advances 4 K4 values a
// step (8, 16 or 32). The tiles are double-buffered: while the threads multiply step s out of one
// buffer, they fill the other with step s + 1, so one barrier per step separates the two (the
// buffer written in step s was last read in step s - 1, before that step's barrier). Within a
// buffer, tile row r keeps its vec4 c at slot c ^ (r % K4): the 8 threads that read 8 rows at
// once then hit different banks mostly (no padding, so that two buffers of the largest shapes
// fit WebGPU's default 16 KiB).

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

override WG: u32 = 64u;  // threads, and tokens per tile: 8 x (WG / 8) threads of 8 x 8 outputs
override K4: u32 = 4u;   // vec4 per tile row per step: K advances 4 K4 values a step
const TN: u32 = 64u;     // weight rows per tile
override TY: u32 = WG / 8u; // threads down the tile (tokens), 8 across (rows)

var<workgroup> xs: array<TV, 2u * WG * K4>; // [buffer][token][k / 4]
var<workgroup> wt: array<TV, 2u * TN * K4>; // [buffer][weight row][k / 4], dequantised

// Where vec4 c of tile row r lies in a buffer (see the top).
fn slot(r: u32, c: u32) -> u32 {
    return r * K4 + (c ^ (r & (K4 - 1u)));
}

// Fills buffer `buf` with the tiles for K = k0..k0+4K4. Entry i of a tile is row i / K4, vec4
// i % K4.
fn load_tiles(fmt: u32, m0: u32, n0: u32, k0: u32, lid: u32, buf: u32) {
    // X: tokens past m and columns past K read as zero.
    for (var i = lid; i < WG * K4; i += WG) {
        let r = i / K4;
        let c = k0 + 4u * (i % K4);
        let t = m0 + r;
        var v = vec4<f32>(0.0);
        if (t < p.m) {
            for (var j = 0u; j < 4u; j++) {
                if (c + j < p.cols) {
                    v[j] = x[t * p.cols + c + j];
                }
            }
        }
        xs[buf * WG * K4 + slot(r, i % K4)] = TV(v);
    }
    // W: rows past the shard are clamped to its last row; their outputs are never stored.
    // Quantised formats (K a whole number of 32-weight units, a step within one): vec4s
    // (k0 % 32) / 4 .. of unit k0 / 32 of each row, dequantised by the shared block decode.
    for (var i = lid; i < TN * K4; i += WG) {
        let r = i / K4;
        let row = min(n0 + r, p.rows - 1u);
        let c4 = i % K4;
        let c = k0 + 4u * c4;
        var v = vec4<f32>(0.0);
        if (fmt >= Q8_0) {
            v = qunit4(fmt, row, qunit_head(fmt, row, k0 >> 5u), ((k0 & 31u) >> 2u) + c4);
        } else if (fmt == F32) {
            for (var j = 0u; j < 4u; j++) {
                if (c + j < p.cols) {
                    v[j] = bitcast<f32>(wq[row * p.row_words + c + j]);
                }
            }
        } else {
            // F16: word c/2 lies in the row iff c < cols; a trailing odd column pairs with a zero
            // pad.
            let w = row * p.row_words + (c >> 1u);
            if (c < p.cols) {
                v = vec4<f32>(qh_pair(wq[w]), 0.0, 0.0);
            }
            if (c + 2u < p.cols) {
                v = vec4<f32>(v.xy, qh_pair(wq[w + 1u]));
            }
        }
        wt[buf * TN * K4 + slot(r, c4)] = TV(v);
    }
}

// The dot products of token vector a with row vectors b0..b3, in f32.
fn dots(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

// The same in the tiles' own type (f16 products and sums where TV is f16).
fn dots_tv(a: TV, b0: TV, b1: TV, b2: TV, b3: TV) -> PV {
    return PV(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

fn matmul_tiled(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= p.tiles_n * ((p.m + WG - 1u) / WG)) {
        return;
    }
    let n0 = (tile % p.tiles_n) * TN;
    let m0 = (tile / p.tiles_n) * WG;
    let tx = lid & 7u;
    let ty = lid >> 3u;
    // Thread (tx, ty) owns tokens ty + TY i and weight rows tx + 8j (i, j < 8): acc[2i] holds
    // rows j < 4, acc[2i + 1] rows j >= 4. Interleaving (not 8 adjacent rows) keeps the 8 threads
    // of a row of the thread grid on different banks and their stores contiguous.
    var acc: array<vec4<f32>, 16>;
    var part: array<PV, 16>;
    let steps = (p.cols + 4u * K4 - 1u) / (4u * K4);
    load_tiles(fmt, m0, n0, 0u, lid, 0u);
    workgroupBarrier();
    for (var s = 0u; s < steps; s++) {
        let cur = s & 1u;
        if (s + 1u < steps) {
            load_tiles(fmt, m0, n0, (s + 1u) * 4u * K4, lid, cur ^ 1u);
        }
        let xb = cur * WG * K4;
        let wb = cur * TN * K4;
        for (var k = 0u; k < K4; k++) {
            if (ACC16) {
                var b: array<TV, 8>;
                for (var j = 0u; j < 8u; j++) {
                    b[j] = wt[wb + slot(tx + 8u * j, k)];
                }
                for (var i = 0u; i < 8u; i++) {
                    let a = xs[xb + slot(ty + TY * i, k)];
                    part[2u * i] += dots_tv(a, b[0], b[1], b[2], b[3]);
                    part[2u * i + 1u] += dots_tv(a, b[4], b[5], b[6], b[7]);
                }
            } else {
                var b: array<vec4<f32>, 8>;
                for (var j = 0u; j < 8u; j++) {
                    b[j] = vec4<f32>(wt[wb + slot(tx + 8u * j, k)]);
                }
                for (var i = 0u; i < 8u; i++) {
                    let a = vec4<f32>(xs[xb + slot(ty + TY * i, k)]);
                    acc[2u * i] += dots(a, b[0], b[1], b[2], b[3]);
                    acc[2u * i + 1u] += dots(a, b[4], b[5], b[6], b[7]);
                }
            }
        }
        if (ACC16) {
            for (var q = 0u; q < 16u; q++) {
                acc[q] += vec4<f32>(part[q]);
                part[q] = PV();
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 8u; i++) {
        let t = m0 + ty + TY * i;
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

@compute @workgroup_size(WG)
fn matmul_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(F32, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(F16, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q8_0, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_0, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_1, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q5_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q5_0, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q5_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q5_1, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q4_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q4_K, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q5_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q5_K, wid, nwg, lid);
}

@compute @workgroup_size(WG)
fn matmul_q6_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matmul_tiled(Q6_K, wid, nwg, lid);
}
