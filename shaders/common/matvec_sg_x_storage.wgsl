// The subgroup matvec's x front for storage buffers: x and SwiGLU's up as arrays of f32 of any
// length (common/matvec_sg_body.wgsl says what a front defines).

@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read> up: array<f32>;

// This lane's four input values of block `blk` for token `tok` (silu(x) * up where XFN = 1);
// columns past the end of an f32/f16 row read as zero.
fn x4(tok: u32, blk: u32, lane: u32) -> vec4<f32> {
    let last = p.cols - 1u;
    let c = vec4<u32>(32u * blk + 4u * lane) + vec4<u32>(0u, 1u, 2u, 3u);
    let i = vec4<u32>(tok * p.cols) + min(c, vec4<u32>(last));
    var v = vec4<f32>(x[i.x], x[i.y], x[i.z], x[i.w]);
    if (XFN == 1u) {
        let u = vec4<f32>(up[i.x], up[i.y], up[i.z], up[i.w]);
        v = v / (1.0 + exp(-v)) * u;
    }
    return select(vec4<f32>(0.0), v, c <= vec4<u32>(last));
}
