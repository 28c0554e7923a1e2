// Elementwise kernels: residual add, bias add and scaled copy, one invocation per element.
// Bindings: 0 = a (read), 1 = b (read), 2 = out (read_write), 3 = params.

struct Params {
    n: u32,
    // add_bias: the bias length (row length of out). add ignores it.
    cols: u32,
    // scale: the factor. add ignores it.
    s: f32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        out[i] = a[i] + b[i];
    }
}

// out[i] += a[i % cols]: a bias of `cols` values broadcast over the rows of out, in place.
// b is not used (the host binds the bias there too).
@compute @workgroup_size(256)
fn add_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        out[i] = out[i] + a[i % p.cols];
    }
}

// out = s * a. b is not used (the host binds a there too).
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        out[i] = a[i] * p.s;
    }
}
