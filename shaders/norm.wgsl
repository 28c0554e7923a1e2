// Row normalisations over the last dimension, one workgroup per row (token):
//   rms_norm:     out = x / sqrt(mean(x^2) + eps) * gamma
//   add_rms_norm: sum = x + b; out = rms_norm(sum)   (a residual add and the norm after it)
//   layer_norm:   out = (x - mean) / sqrt(var + eps) * gamma + beta   (two-pass variance)
// Bindings: 0 = x [m, n] (read), 1 = gamma [n] (read), 2 = beta [n], or b [m, n] for add_rms_norm
// (read; rms_norm does not use it, the host binds gamma there), 3 = out [m, n] (read_write),
// 4 = sum [m, n] (read_write; only add_rms_norm writes it, the others get out bound again),
// 5 = params. norm_sg.wgsl has the same bindings.

// #include "common/norm_io.wgsl"

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;

// Pairwise (tree) sum of one value per invocation; every invocation gets the total. Pairwise
// summation keeps the rounding error at O(log n) ulps rather than O(n).
fn wg_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // Nobody may overwrite red[0] (next reduction) before everyone has read it.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var ss = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        let v = x[base + i];
        ss = ss + v * v;
    }
    let total = wg_sum(lid, ss);
    // 1/sqrt rather than inverseSqrt: the latter may be a low-precision approximation.
    let inv = 1.0 / sqrt(total / f32(p.n) + p.eps);
    for (var i = lid; i < p.n; i = i + WG) {
        out[base + i] = x[base + i] * inv * gamma[i];
    }
}

@compute @workgroup_size(256)
fn add_rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var ss = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        let v = x[base + i] + beta[base + i];
        sum[base + i] = v;
        ss = ss + v * v;
    }
    let total = wg_sum(lid, ss);
    let inv = 1.0 / sqrt(total / f32(p.n) + p.eps);
    // Each invocation reads back only the sums it wrote itself.
    for (var i = lid; i < p.n; i = i + WG) {
        out[base + i] = sum[base + i] * inv * gamma[i];
    }
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var s = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        s = s + x[base + i];
    }
    let mean = wg_sum(lid, s) / f32(p.n);
    // Second pass over the centred values: no E[x^2] - E[x]^2 cancellation when |mean| >> std.
    var sq = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        let d = x[base + i] - mean;
        sq = sq + d * d;
    }
    let inv = 1.0 / sqrt(wg_sum(lid, sq) / f32(p.n) + p.eps);
    for (var i = lid; i < p.n; i = i + WG) {
        out[base + i] = (x[base + i] - mean) * inv * gamma[i] + beta[i];
    }
}
