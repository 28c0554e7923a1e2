// The tiled prefill product with f32 tiles: the portable form, every device (the body and its
// layout: common/matmul_tiled.wgsl; f16 tiles: matmul_f16.wgsl).

alias TV = vec4<f32>; // tile values
alias PV = vec4<f32>; // unused: f32 tiles add every product into the f32 accumulators
const ACC16 = false;

// #include "common/matmul_tiled.wgsl"
