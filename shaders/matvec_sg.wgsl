// Matrix-vector product for CPU Vulkan devices with 8-lane subgroups (lavapipe): y[row_start + r] =
// sum_c W[r, c] * x[c] over one shard of W, for TOK tokens at once (rows of x and y, row length
// `cols` and `ld`), one entry point per weight format (repack layout, see common/quant.wgsl).
// Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16), 2 = x (f32),
// 3 = y (f32, read_write), the rest as in common/matvec_sg_body.wgsl. Needs subgroup operations
// with exactly 8 lanes (the host checks); `enable subgroups;` is left out because naga rejects it.
//
// A workgroup is one subgroup of 8 invocations; each invocation owns R consecutive rows and walks
// all of K, one 32-weight block at a time. x of a block is loaded once per subgroup: lane l loads
// values 4l..4l+3 and eight `subgroupBroadcast`s give every lane the whole block. Each weight word
// is read once and serves TOK tokens; each x value serves R rows.
//
// Why: llvmpipe runs a subgroup as one 8-wide SIMD vector, and a load from a storage buffer as a
// loop over the active lanes that inserts each lane's value into the vector through the stack (a
// failed store-to-load forward: about 8 ns of CPU time a lane and component on the 2-core EPYC it
// was measured on), uniform address or not. Those loads are three quarters of the time; arithmetic,
// broadcasts and spills to the stack are the rest. So the kernel counts loads: per block and row,
// Q4 weights cost their 4 data words and 1 scale word (Q4_0 and Q8_0: half a scale word, two blocks
// sharing one), plus 4 x loads per token shared by R rows, against 32 x loads per block and thread
// in matvec.wgsl. A load that no lane takes (tokens past the end of a group) costs nothing. Arrays
// are kept out (llvmpipe keeps arrays it cannot resolve in memory): x, weights and sums live in
// structs of vec4 whose members are named, and the loops over rows and tokens are spelled out under
// `if (R > i)`, which pipeline creation folds away. No workgroup memory, no barriers. Every
// subgroup operation is in uniform control flow: rows past the end are clamped (their sums never
// written), tokens past the end skipped under a uniform condition, and only whole workgroups past
// the end return early.

// This file puts together the body (common/matvec_sg_body.wgsl), the weights in storage buffers
// (common/matvec_sg_w_buffers.wgsl) and x in storage buffers (common/matvec_sg_x_storage.wgsl);
// matvec_sg_ux.wgsl reads x from uniform windows instead.

// #include "common/matvec_sg_w_buffers.wgsl"
// #include "common/matvec_sg_x_storage.wgsl"
