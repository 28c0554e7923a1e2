// Decode matrix-vector product for devices with subgroups (GPUs): the body of matvec.wgsl
// (common/matvec_wg_body.wgsl), its partial sums reduced with subgroupAdd, then across the
// workgroup's subgroups through workgroup memory with one barrier. The host picks it where the
// device has subgroups of at least 8 lanes (so that TOK * (ROWS + 1) sums of at most WG / 8
// subgroups fit `part`). `enable subgroups;` is left out because naga rejects it.

// #include "common/matvec_wg_body.wgsl"

struct Ids {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) lanes: u32,
}

// Every sum (row r, or ROWS for the sums of squares, of token t) reduced over each subgroup, lane 0
// writing it at ((t (ROWS + 1) + r) subgroups + subgroup); then thread i < TOK ROWS adds the
// subgroups' results of row i % ROWS and token i / ROWS in order. Subgroups are taken as runs of
// consecutive local indices (as Vulkan, Metal and D3D drivers lay out a 1D workgroup). All
// subgroup operations are in uniform control flow.
fn finish(ids: Ids, row0: u32, tok0: u32) {
    let groups = WG / ids.lanes;
    let sg = ids.lid / ids.lanes;
    for (var t = 0u; t < TOK; t++) {
        for (var r = 0u; r < ROWS; r++) {
            let s = subgroupAdd(acc[r][t]);
            if (ids.lane == 0u) {
                part[(t * (ROWS + 1u) + r) * groups + sg] = s;
            }
        }
        if (XFN == 2u) {
            let s = subgroupAdd(sumsq[t]);
            if (ids.lane == 0u) {
                part[(t * (ROWS + 1u) + ROWS) * groups + sg] = s;
            }
        }
    }
    workgroupBarrier();
    if (ids.lid < TOK * ROWS) {
        let t = ids.lid / ROWS;
        let r = ids.lid % ROWS;
        var s = 0.0;
        var sq = 0.0;
        for (var k = 0u; k < groups; k++) {
            s += part[(t * (ROWS + 1u) + r) * groups + k];
            if (XFN == 2u) {
                sq += part[(t * (ROWS + 1u) + ROWS) * groups + k];
            }
        }
        put(row0, tok0, r, t, s, sq);
    }
}
