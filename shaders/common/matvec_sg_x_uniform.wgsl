// The subgroup matvec's x front for uniform windows: x and SwiGLU's up as the first 64 KiB of
// their buffers, bound as uniform buffers (common/matvec_sg_body.wgsl says what a front defines).
//
// Why: llvmpipe loads from a storage buffer one lane at a time, each value through the stack with
// a bounds check and a branch (about 8 ns a lane and component), where a uniform-buffer load of
// a lane-varying index is a branch-free gather, and the vec4 a lane takes is one index. Every
// token of a block costs its x loads (and up's), so with 4 tokens a step they are a large share of
// the kernel: reading them from uniform windows made the 4-token gate/up product 15-25% faster
// and the single-token one 6-10% (BENCHMARKS.md). The window is 64 KiB, the uniform binding
// every WebGPU device offers: 4096 vec4, 8 tokens of 2048 values. The host uses this front where
// a product's tokens fit the window (decode rows, short prompts) and rows are whole blocks of 32,
// else the storage front.

@group(0) @binding(2) var<uniform> x: array<vec4<f32>, 4096>;
@group(0) @binding(6) var<uniform> up: array<vec4<f32>, 4096>;

// This lane's four input values of block `blk` for token `tok` (silu(x) * up where XFN = 1).
fn x4(tok: u32, blk: u32, lane: u32) -> vec4<f32> {
    let q = tok * (p.cols / 4u) + 8u * blk + lane;
    var v = x[q];
    if (XFN == 1u) {
        v = v / (1.0 + exp(-v)) * up[q];
    }
    return v;
}
