// RMSNorm (and the residual add before it) for CPU Vulkan devices with 8-lane subgroups
// (lavapipe): the functions of norm.wgsl's rms_norm and add_rms_norm, with the same bindings, as
// one 8-lane subgroup per row reduced with subgroupAdd. norm.wgsl's 256-invocation workgroups and
// their nine barriers are what llvmpipe runs slowest (a barrier switches between the workgroup's
// 32 SIMD groups); here there is no workgroup memory and no barrier.

// #include "common/norm_io.wgsl"

const LANES: u32 = 8u;

// 1 / sqrt(mean of squares + eps) from each lane's partial sum of squares.
fn inv_rms(ss: f32) -> f32 {
    // 1/sqrt rather than inverseSqrt: the latter may be a low-precision approximation.
    return 1.0 / sqrt(subgroupAdd(ss) / f32(p.n) + p.eps);
}

@compute @workgroup_size(8)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.m) {
        return; // the whole workgroup (one subgroup): uniform
    }
    let base = row * p.n;
    var ss = 0.0;
    for (var i = lane; i < p.n; i = i + LANES) {
        let v = x[base + i];
        ss = ss + v * v;
    }
    let inv = inv_rms(ss);
    for (var i = lane; i < p.n; i = i + LANES) {
        out[base + i] = x[base + i] * inv * gamma[i];
    }
}

@compute @workgroup_size(8)
fn add_rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var ss = 0.0;
    for (var i = lane; i < p.n; i = i + LANES) {
        let v = x[base + i] + beta[base + i];
        sum[base + i] = v;
        ss = ss + v * v;
    }
    let inv = inv_rms(ss);
    // Each lane reads back only the sums it wrote itself.
    for (var i = lane; i < p.n; i = i + LANES) {
        out[base + i] = sum[base + i] * inv * gamma[i];
    }
}
