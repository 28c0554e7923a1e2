// Decode matrix-vector product for every device, the portable form: the body (the shape, the
// bindings, the folds) is common/matvec_wg_body.wgsl; this file reduces the threads' partial sums
// in workgroup memory, with no optional feature. Devices with subgroups run matvec_wg_sg.wgsl,
// the same body reduced with subgroupAdd.

// #include "common/matvec_wg_body.wgsl"

struct Ids {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

// Row r's second-level sums at 8r (the sums of squares at 8 ROWS).
var<workgroup> part8: array<f32, 136>;

// One token at a time: thread i first adds 8 of row i / 8's WG partials, then thread r < ROWS
// adds row r's 8 results. Two barriers per token rather than log2(WG). The sums of squares
// (XFN = 2) ride along as row ROWS.
fn finish(ids: Ids, row0: u32, tok0: u32) {
    let lid = ids.lid;
    let n = ROWS + select(0u, 1u, XFN == 2u);
    for (var t = 0u; t < TOK; t++) {
        for (var r = 0u; r < ROWS; r++) {
            part[r * WG + lid] = acc[r][t];
        }
        if (XFN == 2u) {
            part[ROWS * WG + lid] = sumsq[t];
        }
        workgroupBarrier();
        for (var i = lid; i < n * 8u; i += WG) {
            let base = (i >> 3u) * WG + (i & 7u);
            var s = 0.0;
            for (var k = 0u; k < WG; k += 8u) {
                s += part[base + k];
            }
            part8[i] = s;
        }
        workgroupBarrier();
        if (lid < ROWS) {
            var s = 0.0;
            var sq = 0.0;
            for (var k = 0u; k < 8u; k++) {
                s += part8[lid * 8u + k];
                if (XFN == 2u) {
                    sq += part8[ROWS * 8u + k];
                }
            }
            put(row0, tok0, lid, t, s, sq);
        }
    }
}
