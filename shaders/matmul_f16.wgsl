enable f16;

// The tiled prefill product with f16 tiles, for devices with SHADER_F16 (the host checks): half
// the workgroup memory and bandwidth of matmul.wgsl's f32 tiles, so twice the K step in the same
// 16 KiB. X is rounded to f16 as it is stored in the tile, W as it is dequantised. Products and
// sums are f32 (ACC16 false), or each K step (at most 32 values) is summed in f16 and added into
// the f32 accumulators (ACC16 true). The body and its layout: common/matmul_tiled.wgsl.

alias TV = vec4<f16>; // tile values
alias PV = vec4<f16>; // a K step's sums where ACC16
override ACC16: bool = false;

// #include "common/matmul_tiled.wgsl"
