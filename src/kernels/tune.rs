//! Per-device choice of kernel variants from measurements, cached on disk, per weight format and
//! shape class.
//!
//! What is chosen, per ([`WeightFormat`], [`ShapeClass`]):
//! - rows and threads per workgroup of the workgroup matvec (`matvec.wgsl`, what GPUs run), the
//!   fastest of [`matvec_candidates`] ([`matvec_shape_for`]; [`super::matmul::matvec_shape`] is the
//!   one place the dispatch asks for it);
//! - the [`WeightLayout`] of weight matrices on devices where both layouts have a matvec (the
//!   subgroup matvec reads buffers and textures alike). Textures are taken only when at least 10%
//!   faster, since buffers are the layout every kernel reads. A model's weights all share one
//!   layout (the memory plan books them by it), so the device's layout is the choice of one pair:
//!   that of the model's largest matrix where the loader names it ([`prefer_model_layout`], on
//!   that matrix's own shape), else [`DEVICE_LAYOUT_PROBE`]'s ([`weight_layout_choice`]); the other
//!   pairs' choices are measured on request (`wgllm bench tune`) and kept beside it.
//!
//! Every choice is timed on a probe ([`ProbePlan`]): the class's shape in that format, as many
//! copies as make its weights larger than [`LLC_BOUND`], each copy's matvec run once a repetition.
//! Each dispatch so reads its weights from memory, as a decode step does (the other layers' weights
//! evict a matrix between tokens); a probe that fits the cache (the former 2048 x 2048 Q4_0, 2.4 MB)
//! measures the cache instead. Probes run lazily, on the first use of a (format, class), GPU
//! timestamps where the device has them, else wall clock; at most [`MAX_REPS`] repetitions after a
//! warm-up, fewer when one candidate is clearly ahead ([`race`]). A probe's weights are freed when
//! it ends; one that does not fit the memory budget shrinks to what does (then below the bound,
//! with a warning), and one that cannot fit at all leaves the default.
//!
//! The results are kept in `tuning.json` of the cache directory ([`crate::fetch::cache_dir`]) under
//! the adapter, driver and wgllm version, each (format, class) under `classes` as `"q4_0/tall"`;
//! delete the file to redo them. `WGLLM_WEIGHTS` overrides the layout, and a forced kernel
//! (`matvec_with`) the workgroup shape. Entries of older versions (`layout`, `matvec`: measured on
//! the cache-resident 2048 x 2048 probe) are read but not used, and kept for the builds that wrote
//! them. Rows per invocation of the subgroup matvec (CPU devices) stay a rule
//! ([`super::matmul::matvec_sg_rows`]): measured on lavapipe they differed by less than the
//! machine's noise (BENCHMARKS.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{BufferClass, Gpu, WeightLayout};
use crate::kernels::matmul::{
    matvec, matvec_with, MatvecKernel, MATVEC_PART, MATVEC_ROWS, MATVEC_THREADS,
};
use crate::kernels::weights::WeightStorage;
use crate::kernels::WeightMatrix;
use crate::quant::{synthetic, WeightFormat};

/// Bytes above the last-level cache of any consumer device: RTX 4090's L2 is 72 MB, RX 7900 XTX's
/// Infinity Cache 96 MB, M2 Ultra's system cache 96 MB. A probe's weights are at least this.
pub const LLC_BOUND: u64 = 128 << 20;
const _: () = assert!(
    LLC_BOUND >= 96 << 20,
    "under a consumer GPU's last-level cache"
);

/// Matrices below this many bytes of weights are [`ShapeClass::Small`].
pub const SMALL_MAX_BYTES: u64 = 8 << 20;

/// Timed repetitions of a probe at most, after one warm-up.
pub const MAX_REPS: usize = 5;

/// The pair whose layout choice is the device's ([`weight_layout_choice`]): the FFN matrices of a
/// Q4 model, which hold most of a decode step's weight bytes.
pub const DEVICE_LAYOUT_PROBE: (WeightFormat, ShapeClass) = (WeightFormat::Q4_0, ShapeClass::Tall);

/// Which probe a matrix's choices come from. The workgroup matvec gives each workgroup `ROWS` rows
/// whose columns its threads stride, so:
/// - `Small` (under [`SMALL_MAX_BYTES`], e.g. 576 x 576 or 2048 x 2048 at Q4): few workgroups, short
///   loops; launch and occupancy cost as much as the bytes, so fewer rows per workgroup can win;
/// - `Tall` (rows >= cols, e.g. FFN gate/up 11008 x 4096, an output head): many workgroups with
///   rows of a few thousand columns, bound by memory;
/// - `Wide` (cols > rows, e.g. FFN down 4096 x 11008): a third as many workgroups, each thread's
///   loop three times longer, where more threads per workgroup pay off sooner.
///
/// A matrix between [`SMALL_MAX_BYTES`] and the cache size is streamed from memory as well in a
/// real step (the other layers evict it), so it takes the large classes' probe too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeClass {
    Small,
    Tall,
    Wide,
}

impl ShapeClass {
    pub const ALL: [ShapeClass; 3] = [ShapeClass::Small, ShapeClass::Tall, ShapeClass::Wide];

    pub fn name(self) -> &'static str {
        match self {
            ShapeClass::Small => "small",
            ShapeClass::Tall => "tall",
            ShapeClass::Wide => "wide",
        }
    }

    /// The class of a `rows x cols` matrix in `format`.
    pub fn of(format: WeightFormat, rows: usize, cols: usize) -> ShapeClass {
        if format.bytes_for(rows * cols) as u64 <= SMALL_MAX_BYTES.saturating_sub(1) {
            ShapeClass::Small
        } else if rows >= cols {
            ShapeClass::Tall
        } else {
            ShapeClass::Wide
        }
    }

    /// The class's probe shape (rows, cols): LLaMA-7B's FFN matrices for the large classes, a
    /// square a quarter of the small bound at f32 for the small one.
    pub fn probe_shape(self) -> (usize, usize) {
        match self {
            ShapeClass::Small => (1024, 1024),
            ShapeClass::Tall => (11008, 4096),
            ShapeClass::Wide => (4096, 11008),
        }
    }

    pub fn parse(s: &str) -> Result<ShapeClass> {
        ShapeClass::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::invalid("shape class", format!("'{s}': use small, tall or wide")))
    }
}

/// The cache key of a (format, class) within a device's entry.
pub fn class_key(format: WeightFormat, class: ShapeClass) -> String {
    format!("{}/{}", format.name(), class.name())
}

/// What a probe times: `copies` distinct `rows x cols` matrices in `format`, each multiplied once a
/// repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbePlan {
    #[serde(with = "format_name")]
    pub format: WeightFormat,
    pub class: ShapeClass,
    pub rows: usize,
    pub cols: usize,
    pub copies: usize,
}

/// A [`WeightFormat`] in the cache file by its name (`q4_0`).
mod format_name {
    use crate::quant::WeightFormat;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(f: &WeightFormat, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WeightFormat, D::Error> {
        let name = String::deserialize(d)?;
        WeightFormat::parse(&name).map_err(serde::de::Error::custom)
    }
}

impl ProbePlan {
    /// The probe of (`format`, `class`): the class's shape, copied past [`LLC_BOUND`].
    pub fn new(format: WeightFormat, class: ShapeClass) -> ProbePlan {
        let (rows, cols) = class.probe_shape();
        ProbePlan::sized(format, class, rows, cols, LLC_BOUND)
    }

    /// A probe of `rows x cols` matrices with at least `min_bytes` of weights in all.
    pub fn sized(
        format: WeightFormat,
        class: ShapeClass,
        rows: usize,
        cols: usize,
        min_bytes: u64,
    ) -> ProbePlan {
        let one = format.bytes_for(rows * cols).max(1) as u64;
        ProbePlan {
            format,
            class,
            rows,
            cols,
            copies: min_bytes.div_ceil(one).max(1) as usize,
        }
    }

    /// Bytes of one copy's weights, as in the file.
    pub fn matrix_bytes(&self) -> u64 {
        self.format.bytes_for(self.rows * self.cols) as u64
    }

    /// Bytes of all copies' weights, as in the file.
    pub fn bytes(&self) -> u64 {
        self.matrix_bytes() * self.copies as u64
    }
}

/// One device's measurements, as cached (each made when first needed).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceTuning {
    /// Choices per [`class_key`].
    #[serde(default)]
    pub classes: BTreeMap<String, ClassTuning>,
    /// Older versions' layout choice (the 2048 x 2048 Q4_0 probe); kept, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<LayoutChoice>,
    /// Older versions' workgroup matvec choice (the same probe); kept, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matvec: Option<MatvecChoice>,
}

/// The choices of one (format, class).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClassTuning {
    #[serde(default)]
    pub matvec: Option<MatvecChoice>,
    #[serde(default)]
    pub layout: Option<LayoutChoice>,
}

/// The workgroup matvec's fastest rows and threads per workgroup, and the median microseconds of
/// one matrix's matvec for each (rows, threads) measured (those dropped early included).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MatvecChoice {
    pub rows: u32,
    pub threads: u32,
    pub us: Vec<(u32, u32, f64)>,
    /// The probe it was measured on (absent in older entries).
    #[serde(default)]
    pub probe: Option<ProbePlan>,
    /// Wall-clock milliseconds the probe took, upload included.
    #[serde(default)]
    pub probe_ms: f64,
}

/// One (format, class)'s measured layout choice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayoutChoice {
    pub layout: WeightLayout,
    /// Median microseconds of one matrix's matvec with weights in buffers, and in textures.
    pub buffers_us: f64,
    pub textures_us: f64,
    #[serde(default)]
    pub probe: Option<ProbePlan>,
    #[serde(default)]
    pub probe_ms: f64,
}

/// The cache key of a device: adapter, backend, driver and wgllm version.
pub fn device_key(gpu: &Gpu) -> String {
    format!(
        "{} | {:?} | {} {} | wgllm {}",
        gpu.info.name,
        gpu.info.backend,
        gpu.info.driver,
        gpu.info.driver_info,
        env!("CARGO_PKG_VERSION")
    )
}

fn cache_file() -> PathBuf {
    crate::fetch::cache_dir().join("tuning.json")
}

/// Every device's cached entry (empty when the file is missing or unreadable).
pub fn read_cache() -> BTreeMap<String, DeviceTuning> {
    std::fs::read(cache_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Updates this device's entry with `update`, writing through a temporary file so readers never
/// see half a file.
fn write_cache(key: &str, update: impl FnOnce(&mut DeviceTuning)) -> std::io::Result<()> {
    let mut all = read_cache();
    update(all.entry(key.to_string()).or_default());
    let path = cache_file();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&all).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

/// `get`'s part of this device's cached entry for `plan`'s (format, class), or `measure`'s (then
/// cached with `put`).
fn cached<T: Clone>(
    gpu: &Gpu,
    plan: &ProbePlan,
    get: impl Fn(&ClassTuning) -> Option<T>,
    measure: impl FnOnce(&Gpu, &ProbePlan) -> Result<T>,
    put: impl FnOnce(&mut ClassTuning, T),
) -> Result<T> {
    let (key, class) = (device_key(gpu), class_key(plan.format, plan.class));
    if let Some(c) = read_cache()
        .get(&key)
        .and_then(|t| t.classes.get(&class))
        .and_then(&get)
    {
        return Ok(c);
    }
    let choice = measure(gpu, plan)?;
    let kept = choice.clone();
    if let Err(e) = write_cache(&key, |t| {
        put(t.classes.entry(class.clone()).or_default(), kept)
    }) {
        log::warn!(
            "could not cache the {class} choice in {}: {e}",
            cache_file().display()
        );
    }
    Ok(choice)
}

/// The device's layout: the cached choice of [`DEVICE_LAYOUT_PROBE`], or a fresh measurement.
pub fn weight_layout_choice(gpu: &Gpu) -> Result<LayoutChoice> {
    let (format, class) = DEVICE_LAYOUT_PROBE;
    layout_choice_with(gpu, &ProbePlan::new(format, class))
}

/// The matrix of a GGUF file with the most bytes, as (format, rows, cols): what a model's layout
/// is chosen by ([`prefer_model_layout`]). `None` when the file has no 2-D tensor wgllm reads.
pub fn largest_matrix(g: &crate::loader::gguf::Gguf) -> Option<(WeightFormat, usize, usize)> {
    g.tensors()
        .iter()
        .filter(|t| t.shape.len() == 2)
        .filter_map(|t| {
            let f = crate::loader::weight_format(t.ggml_type)?;
            // GGUF lists the row length first.
            Some((f, t.shape[1], t.shape[0]))
        })
        .max_by_key(|&(f, rows, cols)| f.bytes_for(rows * cols))
}

/// Sets the device's weight layout, unless already chosen (`WGLLM_WEIGHTS`, an earlier model), to
/// the choice for a model's largest matrix (`format`, `rows x cols`): measured on that shape itself
/// when its class is a large one (copied past [`LLC_BOUND`]), on the class's probe otherwise, and
/// cached for its (format, class). Buffers where the subgroup matvec does not run.
pub fn prefer_model_layout(
    gpu: &Gpu,
    format: WeightFormat,
    rows: usize,
    cols: usize,
) -> WeightLayout {
    gpu.weight_layout_or(|| {
        if !crate::kernels::matmul::subgroup_matvec_ok(gpu) {
            return WeightLayout::Buffers;
        }
        let class = ShapeClass::of(format, rows, cols);
        let plan = match class {
            ShapeClass::Small => ProbePlan::new(format, class),
            _ => ProbePlan::sized(format, class, rows, cols, LLC_BOUND),
        };
        match layout_choice_with(gpu, &plan) {
            Ok(c) => c.layout,
            Err(e) => {
                log::warn!("measuring the weight layouts failed ({e}); weights go in buffers");
                WeightLayout::Buffers
            }
        }
    })
}

/// The cached layout choice of (`format`, `class`), or a fresh measurement (then cached).
pub fn layout_choice_for(
    gpu: &Gpu,
    format: WeightFormat,
    class: ShapeClass,
) -> Result<LayoutChoice> {
    layout_choice_with(gpu, &ProbePlan::new(format, class))
}

/// [`layout_choice_for`] measured on `plan` when not cached (tests use a small one).
pub fn layout_choice_with(gpu: &Gpu, plan: &ProbePlan) -> Result<LayoutChoice> {
    let choice = cached(
        gpu,
        plan,
        |t| t.layout.clone(),
        measure_layouts,
        |t, c| t.layout = Some(c),
    )?;
    log::info!(
        "{} weights in {} on {}: probe matvec {:.0} us in buffers, {:.0} us in textures",
        class_key(plan.format, plan.class),
        choice.layout.name(),
        gpu.info.name,
        choice.buffers_us,
        choice.textures_us
    );
    Ok(choice)
}

/// The cached rows-and-threads choice of the workgroup matvec for (`format`, `class`), or a fresh
/// measurement (then cached).
pub fn matvec_choice_for(
    gpu: &Gpu,
    format: WeightFormat,
    class: ShapeClass,
) -> Result<MatvecChoice> {
    matvec_choice_with(gpu, &ProbePlan::new(format, class))
}

/// [`matvec_choice_for`] measured on `plan` when not cached (tests use a small one).
pub fn matvec_choice_with(gpu: &Gpu, plan: &ProbePlan) -> Result<MatvecChoice> {
    let choice = cached(
        gpu,
        plan,
        |t| t.matvec.clone(),
        measure_matvec,
        |t, c| t.matvec = Some(c),
    )?;
    log::info!(
        "{} workgroup matvec on {}: {} rows, {} threads per workgroup (probe us: {:?})",
        class_key(plan.format, plan.class),
        gpu.info.name,
        choice.rows,
        choice.threads,
        choice.us
    );
    Ok(choice)
}

/// The workgroup matvec's shape when nothing was measured: the CPU rule's, which the lavapipe
/// measurement agreed with (BENCHMARKS.md).
pub const DEFAULT_MATVEC_SHAPE: (u32, u32) = (16, 64);

/// The workgroup shape for (`format`, `class`) on `gpu`, remembered for the device's lifetime:
/// measured on first use (then cached on disk), [`DEFAULT_MATVEC_SHAPE`] when measuring fails.
pub fn matvec_shape_for(gpu: &Gpu, format: WeightFormat, class: ShapeClass) -> (u32, u32) {
    // Held while measuring, so threads sharing the device measure a pair once; the probe forces
    // its kernels, so it never asks for a shape itself.
    let mut shapes = gpu.matvec_shapes.lock().unwrap_or_else(|e| e.into_inner());
    *shapes.entry((format, class)).or_insert_with(|| {
        matvec_choice_for(gpu, format, class).map_or_else(
            |e| {
                log::warn!(
                    "measuring the {} matvec shapes failed ({e}); {} rows, {} threads",
                    class_key(format, class),
                    DEFAULT_MATVEC_SHAPE.0,
                    DEFAULT_MATVEC_SHAPE.1
                );
                DEFAULT_MATVEC_SHAPE
            },
            |c| (c.rows, c.threads),
        )
    })
}

/// Every (rows, threads) per workgroup the workgroup matvec takes: rows x threads within its
/// [`MATVEC_PART`] partial sums.
pub fn matvec_candidates() -> Vec<(u32, u32)> {
    MATVEC_ROWS
        .into_iter()
        .flat_map(|r| MATVEC_THREADS.into_iter().map(move |t| (r, t)))
        .filter(|&(r, t)| r * t <= MATVEC_PART)
        .collect()
}

/// Times the probe matvec over every [`matvec_candidates`] shape (weights in buffers, the layout
/// that kernel reads).
pub fn measure_matvec(gpu: &Gpu, plan: &ProbePlan) -> Result<MatvecChoice> {
    let start = Instant::now();
    let probe = Probe::new(gpu, plan, WeightLayout::Buffers, 1)?;
    let shapes = matvec_candidates();
    let medians = race(shapes.len(), |i| {
        let (rows, threads) = shapes[i];
        let k = Some(MatvecKernel::Workgroup { rows, threads });
        probe.time(|rec, w| matvec_with(rec, w, &probe.x, &probe.y, k))
    })?;
    let us: Vec<(u32, u32, f64)> = shapes
        .iter()
        .zip(&medians)
        .map(|(&(r, t), &us)| (r, t, thousandths(us)))
        .collect();
    let (rows, threads) = us
        .iter()
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .map_or(DEFAULT_MATVEC_SHAPE, |&(r, t, _)| (r, t));
    Ok(MatvecChoice {
        rows,
        threads,
        us,
        probe: Some(probe.plan),
        probe_ms: thousandths(start.elapsed().as_secs_f64() * 1e3),
    })
}

/// Times the probe matvec with the weights in each layout.
pub fn measure_layouts(gpu: &Gpu, plan: &ProbePlan) -> Result<LayoutChoice> {
    let start = Instant::now();
    // Both layouts' copies at once, each in half of what the budget leaves, so that their
    // repetitions interleave and a slow spell of a shared machine hits both alike (timed one
    // after the other, 13.6 and 24.2 ms swapped places between two runs on lavapipe).
    let buffers = Probe::new(gpu, plan, WeightLayout::Buffers, 2)?;
    let textures = Probe::new(gpu, &buffers.plan, WeightLayout::Textures, 1)?;
    let probes = [&buffers, &textures];
    let us = race(2, |i| {
        let p = probes[i];
        p.time(|rec, w| matvec(rec, w, &p.x, &p.y))
    })?;
    let (buffers_us, textures_us) = (thousandths(us[0]), thousandths(us[1]));
    let used = buffers.plan;
    let layout = if textures_us < 0.9 * buffers_us {
        WeightLayout::Textures
    } else {
        WeightLayout::Buffers
    };
    Ok(LayoutChoice {
        layout,
        buffers_us,
        textures_us,
        probe: Some(used),
        probe_ms: thousandths(start.elapsed().as_secs_f64() * 1e3),
    })
}

/// `x` to three decimals, which the cache file's JSON reads back bit for bit (a float's full 17
/// digits need not).
fn thousandths(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Median time of each of `n` candidates: one warm-up each, then rounds of one timing each (so that
/// a slow spell of the machine hits every candidate alike), at most [`MAX_REPS`]. From the third
/// round on, a candidate whose median is more than 15% behind the leader's stops being timed, and
/// the race ends when one is left.
pub fn race(n: usize, mut time: impl FnMut(usize) -> Result<f64>) -> Result<Vec<f64>> {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); n];
    for i in 0..n {
        time(i)?;
    }
    let mut running: Vec<usize> = (0..n).collect();
    for round in 0..MAX_REPS {
        for &i in &running {
            times[i].push(time(i)?);
        }
        if round >= 2 {
            let medians: Vec<f64> = times
                .iter_mut()
                .map(|t| crate::stats::median(&mut t.clone()))
                .collect();
            let best = running
                .iter()
                .map(|&i| medians[i])
                .fold(f64::INFINITY, f64::min);
            running.retain(|&i| medians[i] <= 1.15 * best);
            if running.len() <= 1 {
                break;
            }
        }
    }
    Ok(times.iter_mut().map(|t| crate::stats::median(t)).collect())
}

/// A probe on the device: its copies of the weights, and the input and output vectors. Dropped,
/// it frees them all.
struct Probe<'a> {
    gpu: &'a Gpu,
    /// The plan as run (fewer copies than asked where the budget is short).
    plan: ProbePlan,
    weights: Vec<WeightMatrix>,
    x: crate::kernels::Tensor,
    y: crate::kernels::Tensor,
}

impl<'a> Probe<'a> {
    /// `plan`'s copies in `layout`, as many as fit `1 / share` of what the budget leaves.
    fn new(gpu: &'a Gpu, plan: &ProbePlan, layout: WeightLayout, share: u64) -> Result<Probe<'a>> {
        let mut plan = *plan;
        let x: Vec<f32> = (0..plan.cols)
            .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
            .collect();
        let x = gpu.tensor_from("tune.x", BufferClass::Activations, &[1, plan.cols], &x)?;
        let y = gpu.tensor("tune.y", BufferClass::Activations, &[1, plan.rows])?;
        plan.copies = copies_within_budget(gpu, &plan, share)?;
        let gguf = synthetic(plan.format, plan.rows * plan.cols, 7)?;
        let storage = WeightStorage::on_device(gpu, layout);
        let mut weights = Vec::with_capacity(plan.copies);
        for i in 0..plan.copies {
            let label = format!("tune.w{i}");
            weights.push(gpu.upload_weights_as(
                &label,
                plan.format,
                plan.rows,
                plan.cols,
                &gguf,
                storage,
            )?);
        }
        Ok(Probe {
            gpu,
            plan,
            weights,
            x,
            y,
        })
    }

    /// Microseconds of one matrix's product: `record` over every copy in one submission, divided
    /// by the copies.
    fn time(
        &self,
        record: impl Fn(&mut crate::gpu::Recorder, &WeightMatrix) -> Result<()>,
    ) -> Result<f64> {
        let gpu = self.gpu;
        let mut rec = gpu.recorder();
        for w in &self.weights {
            record(&mut rec, w)?;
        }
        let us = if gpu.caps.timestamps {
            rec.submit_timed()?.iter().map(|d| d.nanos).sum::<f64>() / 1e3
        } else {
            let start = Instant::now();
            rec.submit()?;
            gpu.wait()?;
            start.elapsed().as_secs_f64() * 1e6
        };
        Ok(us / self.weights.len() as f64)
    }
}

/// How many of `plan`'s copies fit the ledger's budget (all without one): `1 / share` of what is
/// left of it, less a quarter for the layouts' padding and the kernel parameters. Fewer than asked
/// is warned about (the probe may then partly measure the cache); none is an error, which leaves the
/// default choice.
fn copies_within_budget(gpu: &Gpu, plan: &ProbePlan, share: u64) -> Result<usize> {
    let Some(budget) = gpu.ledger.budget() else {
        return Ok(plan.copies);
    };
    let free = budget.saturating_sub(gpu.ledger.report().current_total_bytes) / share.max(1);
    let fit = (free * 3 / 4 / (plan.matrix_bytes() * 5 / 4).max(1)) as usize;
    if fit == 0 {
        return Err(Error::invalid(
            format!("probe {}", class_key(plan.format, plan.class)),
            format!(
                "one {}x{} matrix ({} bytes) does not fit the {} bytes left of the budget",
                plan.rows,
                plan.cols,
                plan.matrix_bytes(),
                free
            ),
        ));
    }
    if fit < plan.copies {
        log::warn!(
            "the {} probe is cut to {fit} of {} copies ({} MiB) by the memory budget: below the \
             {} MiB cache bound, its choice may reflect the cache",
            class_key(plan.format, plan.class),
            plan.copies,
            (plan.matrix_bytes() * fit as u64) >> 20,
            LLC_BOUND >> 20
        );
    }
    Ok(fit.min(plan.copies))
}

/// One row of the choices table: a (format, class) and what is cached for it on `gpu`.
pub fn choices_table(gpu: &Gpu, pairs: &[(WeightFormat, ShapeClass)]) -> String {
    use std::fmt::Write;
    let entry = read_cache().remove(&device_key(gpu)).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<6} {:>15} {:>7} {:>10} {:>14} {:>8} {:>10} {:>10} {:>9}",
        "format",
        "class",
        "probe",
        "copies",
        "probe MiB",
        "matvec rows x",
        "us",
        "layout",
        "buf/tex us",
        "probe ms"
    );
    for &(format, class) in pairs {
        let t = entry
            .classes
            .get(&class_key(format, class))
            .cloned()
            .unwrap_or_default();
        let plan = t
            .matvec
            .as_ref()
            .and_then(|m| m.probe)
            .or_else(|| t.layout.as_ref().and_then(|l| l.probe));
        let (shape, copies, mib) = plan.map_or(("-".into(), "-".into(), "-".into()), |p| {
            (
                format!("{}x{}", p.rows, p.cols),
                p.copies.to_string(),
                format!("{:.0}", p.bytes() as f64 / (1 << 20) as f64),
            )
        });
        let (mv, mv_us) = t.matvec.as_ref().map_or(("-".into(), "-".into()), |m| {
            let us =
                m.us.iter()
                    .find(|&&(r, th, _)| (r, th) == (m.rows, m.threads))
                    .map_or(0.0, |x| x.2);
            (format!("{} x {}", m.rows, m.threads), format!("{us:.0}"))
        });
        let (lay, lay_us) = t.layout.as_ref().map_or(("-".into(), "-".into()), |l| {
            (
                l.layout.name().to_string(),
                format!("{:.0}/{:.0}", l.buffers_us, l.textures_us),
            )
        });
        let ms = t.matvec.as_ref().map_or(0.0, |m| m.probe_ms)
            + t.layout.as_ref().map_or(0.0, |l| l.probe_ms);
        let _ = writeln!(
            out,
            "{:<6} {:<6} {:>15} {:>7} {:>10} {:>14} {:>8} {:>10} {:>10} {:>9.0}",
            format.name(),
            class.name(),
            shape,
            copies,
            mib,
            mv,
            mv_us,
            lay,
            lay_us,
            ms
        );
    }
    out
}
