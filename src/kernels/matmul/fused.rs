//! Products that run as one dispatch with what surrounds them: stacked Q/K/V and gate/up
//! ([`matmul_fused`]), and for single tokens the RMSNorm before them ([`matmul_fused_norm`]),
//! SwiGLU into the down projection ([`matmul_swiglu`]) and the residual add after them
//! ([`matmul_add`], [`matmul_swiglu_add`]). Both matvec kernels fold (the subgroup one and the
//! workgroup one); stacking needs the subgroup one. Each falls back to separate passes where it
//! cannot fold, so callers write the forward pass once.

use super::subgroup::{Extras, Input, SgPart};
use super::*;

/// `ys[i] = xs W_iᵀ` for 1 to 3 matrices that read the same `x` (Q, K and V; gate and up): one
/// dispatch where [`fusable`] says so, else one [`matmul`] each. `x` is `[.., cols]`, each `ys[i]`
/// has the same leading dimensions and `ws[i].rows` last.
pub fn matmul_fused(
    rec: &mut Recorder,
    ws: &[&WeightMatrix],
    x: &Tensor,
    ys: &[&Tensor],
) -> Result<()> {
    matmul_fused_in(rec, Step::Chunk, ws, x, ys)
}

/// [`matmul_fused`] for a [`Step`].
pub fn matmul_fused_in(
    rec: &mut Recorder,
    step: Step,
    ws: &[&WeightMatrix],
    x: &Tensor,
    ys: &[&Tensor],
) -> Result<()> {
    let op = fused_op("fused matmul", ws);
    if !fusable(rec.gpu(), ws) || !stacks_for(rec.gpu(), step, lead(x)) {
        check_fused(&op, ws, ys)?;
        for (w, y) in ws.iter().zip(ys) {
            matmul_in(rec, step, w, x, y)?;
        }
        return Ok(());
    }
    fused_kernel(rec, step, ws, x, ys, Extras::default(), &op)
}

/// Most weights a single token's projections may have for [`matmul_fused_norm`] to fold the
/// norm in. The fold saves a dispatch and the norm pass (about 130 us on lavapipe) but makes
/// every workgroup load gamma beside x (about 8 ns a column and workgroup there, two threads):
/// measured on SmolLM2, the fold wins at Q/K/V (0.55 M weights, 10 workgroups) and by a little at
/// gate/up (1.8 M, 32 workgroups), and loses at the 28 M-weight head (BENCHMARKS.md); at R = 12
/// rows per invocation the estimate breaks even near 3 M.
pub const NORM_FOLD_MAX_WEIGHTS: usize = 1 << 22;

/// Whether [`matmul_fused_norm`] folds the norm into the projections `ws` for `m` tokens: a
/// single token where [`single_token_folds`]; on the subgroup matvec (lavapipe) the projections
/// together at most [`NORM_FOLD_MAX_WEIGHTS`], on the workgroup matvec any size (a GPU
/// workgroup's extra gamma loads come from cache, against the weights' from memory). The memory
/// plan follows ([`crate::plan::activations::Fusions::unbounded_norm_folds`]).
pub fn norm_folds(gpu: &Gpu, ws: &[&WeightMatrix], m: usize) -> bool {
    norm_folds_in(gpu, Step::Chunk, ws, m)
}

/// [`norm_folds`] for a [`Step`]: decode rows fold as a single token does.
pub fn norm_folds_in(gpu: &Gpu, step: Step, ws: &[&WeightMatrix], m: usize) -> bool {
    let weights: usize = ws.iter().map(|w| w.rows * w.cols).sum();
    folds(gpu, m, step) && (weights <= NORM_FOLD_MAX_WEIGHTS || !subgroup_matvec_ok(gpu))
}

/// `ys[i] = rms_norm(x) W_iᵀ` (the norm with `gamma` and `eps`): [`matmul_fused`] of the
/// attention or FFN block after its RMSNorm. Where [`norm_folds`], the matvec
/// normalises x as it loads it (the norm's `1 / rms` scales each finished row), so there is no
/// norm pass and `xb` is not touched; otherwise [`crate::kernels::norm::rms_norm`] into `xb`,
/// then [`matmul_fused`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_fused_norm(
    rec: &mut Recorder,
    ws: &[&WeightMatrix],
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    xb: &Tensor,
    ys: &[&Tensor],
) -> Result<()> {
    matmul_fused_norm_in(rec, Step::Chunk, ws, x, gamma, eps, xb, ys)
}

/// [`matmul_fused_norm`] for a [`Step`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_fused_norm_in(
    rec: &mut Recorder,
    step: Step,
    ws: &[&WeightMatrix],
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    xb: &Tensor,
    ys: &[&Tensor],
) -> Result<()> {
    if !norm_folds_in(rec.gpu(), step, ws, lead(x)) {
        crate::kernels::norm::rms_norm(rec, x, gamma, eps, xb)?;
        return matmul_fused_in(rec, step, ws, xb, ys);
    }
    let op = fused_op("fused matmul (RMSNorm input)", ws);
    let extras = Extras {
        input: Input::RmsNorm(gamma, eps),
        res: None,
    };
    if fusable(rec.gpu(), ws) && stacks_for(rec.gpu(), step, lead(x)) {
        return fused_kernel(rec, step, ws, x, ys, extras, &op);
    }
    // Matrices apart (streamed layers, the output head): each dispatch takes the norm itself.
    check_fused(&op, ws, ys)?;
    for (w, y) in ws.iter().zip(ys) {
        let m = tokens(&op, w, x, y)?;
        rows_kernel(rec, w, x, extras, y, m, folded_rows(step, m), &op)?;
    }
    Ok(())
}

/// `y = res + x Wᵀ`, a projection added to the residual stream (`res` and `y` the same shape):
/// for a single token where [`single_token_folds`], the matvec adds `res` as it stores
/// (no add pass); otherwise [`matmul`] into `proj`, then [`crate::kernels::elementwise::add`].
pub fn matmul_add(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    res: &Tensor,
    proj: &Tensor,
    y: &Tensor,
) -> Result<()> {
    matmul_add_in(rec, Step::Chunk, w, x, res, proj, y)
}

/// [`matmul_add`] for a [`Step`].
pub fn matmul_add_in(
    rec: &mut Recorder,
    step: Step,
    w: &WeightMatrix,
    x: &Tensor,
    res: &Tensor,
    proj: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let op = format!("matmul {} (+ residual)", w.label);
    res.expect(&op, &y.shape)?;
    let m = tokens(&op, w, x, y)?;
    if !folds(rec.gpu(), m, step) {
        matmul_in(rec, step, w, x, proj)?;
        return crate::kernels::elementwise::add(rec, res, proj, y);
    }
    let extras = Extras {
        input: Input::Plain,
        res: Some(res),
    };
    rows_kernel(rec, w, x, extras, y, m, folded_rows(step, m), &op)
}

/// The matvec of a folded product over `m` tokens: the device's single-token kernel for a single
/// token; for decode rows, the same kernel and shape over the rows several at a time.
fn folded_rows(step: Step, m: usize) -> Rows {
    match step {
        Step::Rows if m > 1 => Rows::Decode,
        _ => Rows::Auto,
    }
}

/// The tokens of `x` (`[.., cols]`: the product of its leading dimensions).
fn lead(x: &Tensor) -> usize {
    x.shape.iter().rev().skip(1).product()
}

fn fused_op(what: &str, ws: &[&WeightMatrix]) -> String {
    let names = ws.iter().map(|w| w.label.as_str()).collect::<Vec<_>>();
    format!("{what} {}", names.join("+"))
}

fn check_fused(op: &str, ws: &[&WeightMatrix], ys: &[&Tensor]) -> Result<()> {
    if ws.len() != ys.len() || ws.is_empty() {
        return Err(Error::invalid(
            op,
            format!("{} matrices and {} outputs", ws.len(), ys.len()),
        ));
    }
    Ok(())
}

/// Whether a product of stacked matrices over `m` tokens runs as one dispatch: always on the
/// subgroup matvec; on the workgroup matvec for a single token or decode rows (the kernel a
/// single token runs), while chunks of several tokens keep the prefill kernel of each matrix
/// (the tiled one on GPUs, which reads each weight once per tile rather than per 4 tokens). The
/// memory plan follows ([`crate::plan::activations::Fusions::stacked_chunks`]).
pub fn stacks_for(gpu: &Gpu, step: Step, m: usize) -> bool {
    subgroup_matvec_ok(gpu) || m <= 1 || step == Step::Rows
}

/// One matvec dispatch over the stacked matrices `ws` ([`fusable`], [`stacks_for`]).
fn fused_kernel(
    rec: &mut Recorder,
    step: Step,
    ws: &[&WeightMatrix],
    x: &Tensor,
    ys: &[&Tensor],
    extras: Extras,
    op: &str,
) -> Result<()> {
    check_fused(op, ws, ys)?;
    let cols = ws[0].cols;
    let mut m = 0;
    let mut parts = Vec::with_capacity(ws.len());
    for (w, y) in ws.iter().zip(ys) {
        m = tokens(op, w, x, y)?;
        parts.push(SgPart {
            shard: &w.shards[0],
            y: bound(op, y)?,
            ld: w.rows,
        });
    }
    if m == 0 {
        return Ok(());
    }
    let xv = bound(op, x)?;
    let total: usize = ws.iter().map(|w| w.rows).sum();
    if !subgroup_matvec_ok(rec.gpu()) {
        // The shape of the stack as one matrix, for a single token and decode rows alike (a
        // row's sums depend on the threads alone, so each row is the single token's, bit for
        // bit).
        let (rows, threads) = matvec_shape(rec.gpu(), ws[0].format, total, cols, total);
        let tokens = if m == 1 { 1 } else { workgroup_tokens(m) };
        let shape = WgShape {
            rows,
            threads,
            tokens,
        };
        return workgroup_kernel(rec, ws[0].format, cols, &parts, &xv, extras, m, shape, op);
    }
    let per_pass = matvec_sg_tokens(m);
    // Decode rows keep a single token's rows per invocation, so that each row's sums are the
    // single token's, bit for bit.
    let rows = (step == Step::Rows).then(|| matvec_sg_rows(ws[0].format, total, 1, 1));
    subgroup_kernel(
        rec,
        ws[0].format,
        cols,
        &parts,
        &xv,
        extras,
        m,
        rows,
        per_pass,
        op,
    )
}

/// `y = swiglu(gate, up) Wᵀ`, SwiGLU (`silu(gate) * up`) feeding a projection (the FFN's down
/// projection): for a single token where [`single_token_folds`], the matvec computes
/// SwiGLU as it loads its input, so there is no pass of its own and `act` is not touched;
/// otherwise [`crate::kernels::activation::swiglu`] into `act`, then [`matmul`] (at 8 tokens a
/// pass, the folded form's doubled input loads cost lavapipe more than the separate pass saves).
/// `gate`, `up` and `act` are `[.., cols]`, `y` `[.., rows]`.
pub fn matmul_swiglu(
    rec: &mut Recorder,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    y: &Tensor,
) -> Result<()> {
    swiglu_kernel(rec, Step::Chunk, w, gate, up, act, None, y)
}

/// `y = res + swiglu(gate, up) Wᵀ`: [`matmul_swiglu`] added to the residual stream, folded like
/// [`matmul_add`] (else the product goes to `proj` and an add pass follows).
#[allow(clippy::too_many_arguments)]
pub fn matmul_swiglu_add(
    rec: &mut Recorder,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    res: &Tensor,
    proj: &Tensor,
    y: &Tensor,
) -> Result<()> {
    matmul_swiglu_add_in(rec, Step::Chunk, w, gate, up, act, res, proj, y)
}

/// [`matmul_swiglu_add`] for a [`Step`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_swiglu_add_in(
    rec: &mut Recorder,
    step: Step,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    res: &Tensor,
    proj: &Tensor,
    y: &Tensor,
) -> Result<()> {
    res.expect(&format!("matmul {} (+ residual)", w.label), &y.shape)?;
    if !folds(rec.gpu(), lead(gate), step) {
        swiglu_kernel(rec, step, w, gate, up, act, None, proj)?;
        return crate::kernels::elementwise::add(rec, res, proj, y);
    }
    swiglu_kernel(rec, step, w, gate, up, act, Some(res), y)
}

/// [`matmul_swiglu`] for a [`Step`].
pub fn matmul_swiglu_in(
    rec: &mut Recorder,
    step: Step,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    y: &Tensor,
) -> Result<()> {
    swiglu_kernel(rec, step, w, gate, up, act, None, y)
}

#[allow(clippy::too_many_arguments)]
fn swiglu_kernel(
    rec: &mut Recorder,
    step: Step,
    w: &WeightMatrix,
    gate: &Tensor,
    up: &Tensor,
    act: &Tensor,
    res: Option<&Tensor>,
    y: &Tensor,
) -> Result<()> {
    if !folds(rec.gpu(), lead(gate), step) {
        crate::kernels::activation::swiglu(rec, gate, up, act)?;
        return matmul_in(rec, step, w, act, y);
    }
    let op = format!("matmul {} (SwiGLU input)", w.label);
    up.expect(&op, &gate.shape)?;
    let m = tokens(&op, w, gate, y)?;
    let extras = Extras {
        input: Input::Swiglu(up),
        res,
    };
    rows_kernel(rec, w, gate, extras, y, m, folded_rows(step, m), &op)
}

/// Whether a single token's products fold in what runs around them: SwiGLU into the down
/// projection's input ([`matmul_swiglu`]), RMSNorm into the next projections' input
/// ([`matmul_fused_norm`]) and the residual adds into the projections' output ([`matmul_add`],
/// [`matmul_swiglu_add`]). Both matvec kernels fold (the subgroup one on lavapipe, the workgroup
/// one everywhere else), so every device does; the memory plan's schedule follows
/// ([`crate::plan::PlanOptions::single_token_folds`]). Chunks of several tokens keep the passes:
/// each fold reloads its input per token, where a pass over 8 tokens costs lavapipe less, and a
/// GPU's prefill runs the tiled matmul, which folds nothing.
pub fn single_token_folds(_gpu: &Gpu) -> bool {
    true
}

/// Whether a product over `m` tokens folds here: a single token, or decode rows (each computed
/// as a single token), where [`single_token_folds`].
fn folds(gpu: &Gpu, m: usize, step: Step) -> bool {
    single_token_folds(gpu) && (m == 1 || step == Step::Rows)
}

/// Whether [`matmul_fused`] runs `ws` as one dispatch (for the tokens [`stacks_for`] says): the
/// matrices (2 or 3) are consecutive slices of one buffer (any device: the workgroup matvec, or
/// the subgroup one) or of one texture (the subgroup matvec only reads those), in order, one
/// shard each, in one format ([`Gpu::upload_weights_stacked`] makes them).
pub fn fusable(gpu: &Gpu, ws: &[&WeightMatrix]) -> bool {
    let Some(w0) = ws.first() else { return false };
    let alike = (2..=3).contains(&ws.len())
        && ws.iter().all(|w| {
            w.shards.len() == 1
                && w.shards[0].row_start == 0
                && w.format == w0.format
                && w.cols == w0.cols
        });
    if !alike || (w0.shards[0].data.layout() == WeightLayout::Textures && !subgroup_matvec_ok(gpu))
    {
        return false;
    }
    ws.windows(2).all(|pair| {
        let (a, b) = (&pair[0].shards[0], &pair[1].shards[0]);
        a.data.continued_by(a.rows, &b.data)
            && match (&a.scales, &b.scales) {
                (Some(x), Some(y)) => x.continued_by(a.rows, y),
                (None, None) => true,
                _ => false,
            }
    })
}
