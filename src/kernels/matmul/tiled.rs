//! The tiled prefill kernel: `shaders/matmul.wgsl` (f32 tiles, every device, the portable form) and
//! `shaders/matmul_f16.wgsl` (f16 tiles where the device has SHADER_F16), one body
//! (`shaders/common/matmul_tiled.wgsl`). Its tile shapes, the precision policy and the dispatch;
//! the matvec kernels are in the parent module.

use super::*;

/// What the tiles hold and how a K step is summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileMath {
    /// f32 tiles, f32 arithmetic (`matmul.wgsl`): every device.
    F32,
    /// f16 tiles (half the workgroup memory and its bandwidth), products and sums in f32.
    F16,
    /// f16 tiles, each K step (at most 32 values) summed in f16 and added into f32 accumulators.
    F16Acc,
}

impl TileMath {
    fn value_bytes(self) -> u32 {
        match self {
            TileMath::F32 => 4,
            TileMath::F16 | TileMath::F16Acc => 2,
        }
    }
}

/// A workgroup's tile: `tokens` by [`TILE_ROWS`] outputs (its `WG` override: one thread per 8 x 8
/// register block), `k` values of K per step (`K4 = k / 4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShape {
    pub tokens: u32,
    pub k: u32,
}

/// Weight rows per tile: 8 threads across, 8 rows each.
pub const TILE_ROWS: u32 = 64;

/// The workgroup memory the tiles may take: WebGPU's default `maxComputeWorkgroupStorageSize`, so
/// that every shape runs on every conforming device.
pub const TILE_MEMORY: u32 = 16384;

/// The shapes the kernel takes (those within [`TILE_MEMORY`] for a [`TileMath`] run).
pub const TILE_SHAPES: [TileShape; 6] = [
    TileShape { tokens: 64, k: 8 },
    TileShape { tokens: 64, k: 16 },
    TileShape { tokens: 64, k: 32 },
    TileShape { tokens: 128, k: 8 },
    TileShape { tokens: 128, k: 16 },
    TileShape { tokens: 128, k: 32 },
];

impl TileShape {
    /// Workgroup memory of the two X and two W tiles (double-buffered).
    pub fn workgroup_bytes(self, math: TileMath) -> u32 {
        2 * (self.tokens + TILE_ROWS) * self.k * math.value_bytes()
    }

    /// Multiply-adds per byte read from workgroup memory: each thread reads 8 token and 8 row
    /// values per step of K for 64 multiply-adds, whatever the tile.
    pub fn fma_per_workgroup_byte(self, math: TileMath) -> f64 {
        64.0 / (16.0 * math.value_bytes() as f64)
    }

    /// Global (device memory) loads of values per multiply-add: a step loads `tokens + 64` rows
    /// of `k` values for `tokens x 64 x k` multiply-adds.
    pub fn loads_per_fma(self) -> f64 {
        (self.tokens + TILE_ROWS) as f64 / (self.tokens * TILE_ROWS) as f64
    }
}

/// The shape for a product over `m` tokens: 128-token tiles from 128 tokens (fewer loads of W per
/// multiply-add), else 64; then the longest K step whose double-buffered tiles fit
/// [`TILE_MEMORY`] (fewer barriers): f32 64 x 16 and 128 x 8, f16 64 x 32 and 128 x 16.
pub fn tile_shape(math: TileMath, m: usize) -> TileShape {
    let tokens = if m >= 128 { 128 } else { 64 };
    [32, 16, 8]
        .into_iter()
        .map(|k| TileShape { tokens, k })
        .find(|s| s.workgroup_bytes(math) <= TILE_MEMORY)
        .unwrap_or(TileShape { tokens, k: 8 })
}

/// The tile precision on a device that runs the tiled kernel by policy: f32, also where the device
/// has SHADER_F16. f16 tiles (products and sums f32) keep SmolLM2's and Gemma 3's greedy goldens
/// token for token and their perplexity within 0.02%, but move Gemma 3's last-token logits by up
/// to 6.7e-3 against its reference's 5e-3 tolerance (BENCHMARKS.md), so they run only when forced
/// ([`forced_prefill`], [`MatmulKernel::TiledAs`]).
pub fn prefill_tiles(_gpu: &Gpu) -> TileMath {
    TileMath::F32
}

/// The tiled kernel forced by `WGLLM_PREFILL` (`tiled`: f32 tiles, `tiled-f16`, `tiled-f16acc`),
/// for measuring and testing it on devices whose policy picks a matvec kernel.
pub fn forced_prefill() -> Option<MatmulKernel> {
    let v = std::env::var("WGLLM_PREFILL").ok()?;
    let math = match v.as_str() {
        "tiled" => return Some(MatmulKernel::Tiled),
        "tiled-f16" => TileMath::F16,
        "tiled-f16acc" => TileMath::F16Acc,
        other => {
            log::warn!("WGLLM_PREFILL={other} ignored: use tiled, tiled-f16 or tiled-f16acc");
            return None;
        }
    };
    Some(MatmulKernel::TiledAs { math, shape: None })
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    m: u32,
    rows: u32,
    cols: u32,
    row_start: u32,
    ld: u32,
    row_words: u32,
    blocks: u32,
    tiles_n: u32,
}
const _: () = assert!(std::mem::size_of::<MatmulParams>() == 32);

/// Why the tiled kernel with `math` and `shape` cannot run here, if it cannot.
fn refusal(gpu: &Gpu, math: TileMath, shape: TileShape) -> Option<String> {
    let bytes = shape.workgroup_bytes(math);
    if math != TileMath::F32 && !gpu.caps.shader_f16 {
        Some(format!(
            "f16 tiles need SHADER_F16, which {} lacks",
            gpu.info.name
        ))
    } else if !TILE_SHAPES.contains(&shape) {
        Some(format!(
            "a {} x {} tile stepping {} of K; the kernel takes {TILE_SHAPES:?}",
            shape.tokens, TILE_ROWS, shape.k
        ))
    } else if bytes > TILE_MEMORY || bytes > gpu.limits.max_compute_workgroup_storage_size {
        Some(format!(
            "{math:?} tiles of {shape:?} take {bytes} bytes of workgroup memory; at most \
             {TILE_MEMORY} (and the device's {})",
            gpu.limits.max_compute_workgroup_storage_size
        ))
    } else {
        None
    }
}

/// Dispatches the tiled kernel over `m` tokens; shapes already checked.
#[allow(clippy::too_many_arguments)]
pub(super) fn tiled_kernel(
    rec: &mut Recorder,
    w: &WeightMatrix,
    x: &Tensor,
    y: &Tensor,
    m: usize,
    math: TileMath,
    shape: Option<TileShape>,
    op: &str,
) -> Result<()> {
    let gpu = rec.gpu();
    let shape = shape.unwrap_or_else(|| tile_shape(math, m));
    if let Some(why) = refusal(gpu, math, shape) {
        return Err(Error::invalid(op, why));
    }
    check_shards(op, w)?;
    if w.shards
        .iter()
        .any(|s| s.data.layout() == WeightLayout::Textures)
    {
        return Err(Error::invalid(
            op,
            format!(
                "'{}' is in textures, which the tiled matmul cannot read",
                w.label
            ),
        ));
    }
    let (xv, yv) = (bound(op, x)?, bound(op, y)?);
    let entry = format!("matmul_{}", w.format.name());
    let mut constants = vec![("WG", shape.tokens as f64), ("K4", (shape.k / 4) as f64)];
    let shader = match math {
        TileMath::F32 => "matmul",
        TileMath::F16 | TileMath::F16Acc => {
            constants.push(("ACC16", f64::from(u8::from(math == TileMath::F16Acc))));
            "matmul_f16"
        }
    };
    let k = gpu.kernel(shader, &entry, &BINDS, 32, &constants)?;
    let mu = u32_of(op, "tokens", m)?;
    let cols = u32_of(op, "cols", w.cols)?;
    let ld = u32_of(op, "rows", w.rows)?;
    let rw = u32_of(op, "row words", row_words(w.format, w.cols))?;
    let tiles_m = m.div_ceil(shape.tokens as usize);
    for s in &w.shards {
        let tiles_n = s.rows.div_ceil(TILE_ROWS as usize);
        let p = MatmulParams {
            m: mu,
            rows: u32_of(op, "rows", s.rows)?,
            cols,
            row_start: u32_of(op, "row", s.row_start)?,
            ld,
            row_words: rw,
            blocks: (w.cols / QK) as u32,
            tiles_n: u32_of(op, "tiles", tiles_n)?,
        };
        let groups = gpu.groups(u32_of(op, "tiles", tiles_n * tiles_m)?);
        let [data, scales] = s.views();
        rec.dispatch(
            &k,
            &format!("matmul.{}", s.data.label()),
            &[data, scales, xv.clone(), yv.clone()],
            params(&p),
            groups,
        )?;
    }
    Ok(())
}
