//! The engine: one thread owns the model (and its sequence slots) and runs the scheduling loop.
//!
//! Requests arrive on a channel and wait in a bounded queue until a slot is free. A slot keeps
//! its KV cache after a request ends, so a new request takes the free slot whose cached tokens
//! share the longest prefix with its prompt (ties: the least recently used) and computes only the
//! rest, as llama-server's prompt cache does. Each step runs prefill chunks of the joining
//! requests (about one chunk of tokens in all, each request's chunks at `forward`'s boundaries, so
//! its results are a single-sequence run's), then one [`BatchLm::decode_batch`] for every decoding
//! slot. Each request samples with its own [`Sampler`] (its own seed), so what it gets does not
//! depend on the others in the batch. Tokens stream to the request's channel; a request whose
//! receiver is gone (the client went away) frees its slot at the next step.
//!
//! A device error under the model (lost, or out of memory in the driver) ends the requests it hit
//! and marks the engine not ready; the thread then drops the model, opens a new device on the same
//! adapter ([`Gpu::reopen`]), loads the model again and serves on ([`Engine::health`] is `Ok`
//! again). It tries [`RECOVERY_ATTEMPTS`] times, waiting longer each time, then stays not ready
//! with the reason. Whatever else runs on the device follows it through a [`SharedDevice`].

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::Result;
use crate::gpu::ledger::LedgerReport;
use crate::gpu::Gpu;
use crate::model::batch::{BatchLm, BatchRow};
use crate::model::chat::ChatTemplate;
use crate::model::load::LoadedBatchLm;
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;

/// A handle to the device that threads can share: `Arc<Gpu>`, or a `&'static Gpu`.
pub trait GpuHandle: Deref<Target = Gpu> + Clone + Send + Sync + 'static {}
impl<T: Deref<Target = Gpu> + Clone + Send + Sync + 'static> GpuHandle for T {}

/// Reloads after a device failure: at most this many, before the engine gives up and stays not
/// ready.
pub const RECOVERY_ATTEMPTS: u32 = 5;
/// The wait before the first reload; it doubles before each next one (0.5 + 1 + 2 + 4 + 8 s in
/// all, besides the loads).
pub const RECOVERY_BACKOFF: Duration = Duration::from_millis(500);
/// How often an idle engine looks whether its device was lost.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// A device, whether given by the caller (any [`GpuHandle`]) or opened by the engine.
#[derive(Clone)]
pub struct DeviceRef(Arc<dyn Deref<Target = Gpu> + Send + Sync>);

impl DeviceRef {
    pub fn new<G: GpuHandle>(gpu: G) -> DeviceRef {
        DeviceRef(Arc::new(gpu))
    }
}

impl Deref for DeviceRef {
    type Target = Gpu;
    fn deref(&self) -> &Gpu {
        &self.0
    }
}

/// The engine's device, which it replaces when it recovers: what else runs on the device (the
/// embedder, `/metrics`'s ledger) reads it here, and reports a failure it meets here.
#[derive(Clone)]
pub struct SharedDevice(Arc<DeviceState>);

struct DeviceState {
    /// The device now and its generation, which each replacement counts up.
    current: Mutex<(u64, DeviceRef)>,
    /// A failure of the current generation's device that the engine has yet to act on.
    lost: Mutex<Option<(u64, String)>>,
    /// Set with `lost`, so that the engine's idle poll does not take the lock.
    lost_flag: AtomicBool,
}

impl SharedDevice {
    fn new(gpu: DeviceRef) -> SharedDevice {
        let shared = SharedDevice(Arc::new(DeviceState {
            current: Mutex::new((0, gpu.clone())),
            lost: Mutex::new(None),
            lost_flag: AtomicBool::new(false),
        }));
        shared.watch(0, &gpu);
        shared
    }

    /// The device now, and its generation.
    pub fn current(&self) -> (u64, DeviceRef) {
        self.0
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reports that the device of `generation` failed (`why`); the engine recovers at its next
    /// step. A report about a device already replaced is ignored.
    pub fn report_lost(&self, generation: u64, why: String) {
        if self.current().0 != generation {
            return;
        }
        let mut lost = self.0.lost.lock().unwrap_or_else(|e| e.into_inner());
        lost.get_or_insert((generation, why));
        self.0.lost_flag.store(true, Ordering::SeqCst);
    }

    /// A reported failure of the current device, taken.
    fn take_lost(&self) -> Option<String> {
        if !self.0.lost_flag.swap(false, Ordering::SeqCst) {
            return None;
        }
        let generation = self.current().0;
        let lost = self.0.lost.lock().unwrap_or_else(|e| e.into_inner()).take();
        lost.and_then(|(g, why)| (g == generation).then_some(why))
    }

    /// Makes `gpu` the current device.
    fn replace(&self, gpu: DeviceRef) -> u64 {
        let generation = {
            let mut cur = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
            *cur = (cur.0 + 1, gpu.clone());
            cur.0
        };
        *self.0.lost.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.lost_flag.store(false, Ordering::SeqCst);
        self.watch(generation, &gpu);
        generation
    }

    /// Has the driver's device-lost notice of `gpu` reported here (it holds only a weak
    /// reference: the notice of a device dropped with the engine goes nowhere).
    fn watch(&self, generation: u64, gpu: &Gpu) {
        let weak = Arc::downgrade(&self.0);
        gpu.device.set_device_lost_callback(move |reason, message| {
            if let Some(state) = weak.upgrade() {
                SharedDevice(state).report_lost(
                    generation,
                    format!("the device was lost ({reason:?}): {message}"),
                );
            }
        });
    }
}

/// Where a worker finds its device: a fixed one (any [`GpuHandle`]), or the engine's
/// [`SharedDevice`], which it follows to the new device after a recovery.
pub trait DeviceSource: Send + 'static {
    /// The device now, and a generation that changes when the device is replaced.
    fn device(&self) -> (u64, DeviceRef);
    /// Reports that the device of `generation` failed under the worker.
    fn report_lost(&self, generation: u64, why: String);
}

impl<G: GpuHandle> DeviceSource for G {
    fn device(&self) -> (u64, DeviceRef) {
        (0, DeviceRef::new(self.clone()))
    }
    fn report_lost(&self, _generation: u64, _why: String) {}
}

impl DeviceSource for SharedDevice {
    fn device(&self) -> (u64, DeviceRef) {
        self.current()
    }
    fn report_lost(&self, generation: u64, why: String) {
        SharedDevice::report_lost(self, generation, why)
    }
}

/// How the engine schedules.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests that may wait while every slot is busy; past it [`Engine::submit`] refuses
    /// with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// The model's prefill chunk (`RunOptions::chunk`): prompts run in pieces on its boundaries,
    /// and about one chunk of prompt tokens runs per step beside the decoding slots.
    pub chunk: usize,
    /// Compile the batched decode's kernels for every row count after each load, before the
    /// engine reports ready ([`BatchLm::warm_up`]): without it, the first step with a new number
    /// of busy slots pays the compile (seconds on lavapipe), and a server's first concurrent
    /// requests run slower than one alone.
    pub warm_up: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_queue: 64,
            chunk: 64,
            warm_up: true,
        }
    }
}

/// What one request asks for besides its prompt.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Tokens to generate at most (also capped by the context).
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// Generation ends before the first of these strings; it is not returned.
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many alternatives (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Keep generating past EOS and end-of-turn tokens (llama-server's `ignore_eos`).
    pub ignore_eos: bool,
}

/// A generation request: prompt token ids and parameters.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: GenParams,
}

/// Why a generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV cache was reused from the slot's previous request.
    pub cached_tokens: usize,
}

/// A token's text and log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenProb {
    pub token: String,
    pub logprob: f32,
}

/// The log-probability of a generated token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: TokenProb,
    pub top: Vec<TokenProb>,
}

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token: the text it completes (empty while a UTF-8 sequence or a possible
    /// stop string is incomplete), and its log-probabilities when asked for.
    Token {
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The end: why, and the counts. Nothing follows.
    Done { finish: FinishReason, usage: Usage },
    /// The request failed; nothing follows.
    Error(String),
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull {
        max_queue: usize,
    },
    Stopped,
    /// The device failed (lost, or out of memory in the driver): the engine is reloading the model
    /// on a new device, or gave up; the text says which.
    Unavailable(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { max_queue } => write!(
                f,
                "the server is busy: every slot is generating and {max_queue} request(s) are \
                 already waiting; retry later"
            ),
            SubmitError::Stopped => f.write_str("the engine has stopped"),
            SubmitError::Unavailable(why) => write!(f, "the model is unavailable: {why}"),
        }
    }
}

/// Counters the engine keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Microseconds spent in steps that ran the model.
    pub busy_micros: AtomicU64,
    pub steps: AtomicU64,
    /// Requests waiting for a slot.
    pub queued: AtomicUsize,
    pub busy_slots: AtomicUsize,
    /// Set while the engine is not ready: why (the device failed, and the reload under way or
    /// given up).
    pub fault: std::sync::Mutex<Option<String>>,
    /// Reloads that brought the model back after a device failure.
    pub recoveries: AtomicU64,
}

impl Stats {
    fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set_fault(&self, why: Option<String>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

/// Whether `e` means the device itself failed (lost, or the driver out of memory), after which
/// nothing more can run on it, rather than one request's failure.
pub fn is_device_fault(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Gpu { .. } | crate::Error::Readback { .. })
}

/// What the HTTP layer and the terminal chat need to know of the model.
pub struct ModelInfo {
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub context: usize,
    pub slots: usize,
    pub description: String,
}

enum Command {
    Generate(Queued),
}

struct Queued {
    req: GenRequest,
    events: UnboundedSender<Event>,
}

/// The running engine. Dropping it lets the thread finish the requests it holds and stop.
pub struct Engine {
    commands: Option<mpsc::Sender<Command>>,
    pub info: Arc<ModelInfo>,
    pub stats: Arc<Stats>,
    /// The device the model runs on now (a new one after a recovery).
    device: SharedDevice,
    max_queue: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread, which loads the model with `load` (the model stays on that
    /// thread) and then serves. Returns once the model is loaded, or with the load's error.
    /// After a device failure the thread calls `load` again, on a new device ([`Gpu::reopen`]).
    pub fn start<G: GpuHandle>(
        gpu: G,
        opts: EngineOptions,
        load: impl Fn(&Gpu) -> Result<LoadedBatchLm> + Send + 'static,
    ) -> Result<Engine> {
        let max_queue = opts.max_queue.max(1);
        let warm_up = opts.warm_up;
        // After every load (the first, and each reload after a device failure).
        let load = move |gpu: &Gpu| -> Result<LoadedBatchLm> {
            let mut loaded = load(gpu)?;
            if warm_up {
                let (before, secs0) = gpu.kernels_compiled();
                let t = Instant::now();
                let rows = loaded.model.warm_up(gpu)?;
                let (after, secs1) = gpu.kernels_compiled();
                log::info!(
                    "warm-up: decode steps of 1 to {rows} rows in {:.1} s, {} kernels compiled \
                     in {:.1} s",
                    t.elapsed().as_secs_f64(),
                    after - before,
                    secs1 - secs0
                );
            }
            Ok(loaded)
        };
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let device = SharedDevice::new(DeviceRef::new(gpu));
        let thread_stats = stats.clone();
        let thread_device = device.clone();
        let thread = std::thread::Builder::new()
            .name("wgllm-engine".into())
            .spawn(move || {
                let (_, gpu) = thread_device.current();
                let loaded = match load(&gpu) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = Arc::new(ModelInfo {
                    context: loaded.model.context(),
                    slots: loaded.model.slots(),
                    tokenizer: loaded.tokenizer,
                    chat_template: loaded.chat_template,
                    description: loaded.description,
                });
                let _ = ready_tx.send(Ok(info.clone()));
                drop(gpu);
                let run = Run {
                    device: thread_device,
                    info,
                    opts,
                    stats: thread_stats,
                    commands: cmd_rx,
                    load: Box::new(load),
                };
                run.serve(loaded.model);
            })
            .map_err(|e| crate::Error::invalid("serve", format!("starting the engine: {e}")))?;
        let info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(crate::Error::invalid(
                    "serve",
                    "the engine thread ended while loading the model",
                ));
            }
        };
        Ok(Engine {
            commands: Some(cmd_tx),
            info,
            stats,
            device,
            max_queue,
            thread: Some(thread),
        })
    }

    /// The device the model runs on, which the engine replaces when it recovers: give it to the
    /// workers that share the device ([`crate::serve::embed::Embedder::start`]).
    pub fn device(&self) -> SharedDevice {
        self.device.clone()
    }

    /// The ledger of the device the model runs on now (after a recovery: the new device's).
    pub fn ledger_report(&self) -> LedgerReport {
        self.device.current().1.ledger.report()
    }

    /// Ready to generate, or why not (the device failed under the model).
    pub fn health(&self) -> std::result::Result<(), String> {
        self.stats.fault().map_or(Ok(()), Err)
    }

    /// Queues a request; its events arrive on the returned channel. Dropping the receiver
    /// cancels the request (its slot is freed at the next step).
    pub fn submit(
        &self,
        req: GenRequest,
    ) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        if let Some(why) = self.stats.fault() {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::Unavailable(why));
        }
        let max_queue = self.max_queue;
        // Requests not yet in a slot first take the free slots (the engine thread may be inside
        // a step and not have assigned them yet); only the rest count against the queue.
        let free = self
            .info
            .slots
            .saturating_sub(self.stats.busy_slots.load(Ordering::SeqCst));
        let reserved = self
            .stats
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < max_queue + free).then_some(q + 1)
            });
        if reserved.is_err() {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull { max_queue });
        }
        let (tx, rx) = unbounded_channel();
        let cmd = Command::Generate(Queued { req, events: tx });
        let sent = match &self.commands {
            Some(c) => c.send(cmd).is_ok(),
            None => false,
        };
        if !sent {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok(rx)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel tells the thread to stop once the requests it holds are done (or
        // their receivers are gone).
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request in a slot.
struct Job {
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    params: GenParams,
    sampler: Sampler,
    /// Prompt and generated tokens, for the sampler's penalties.
    history: Vec<u32>,
    generated: usize,
    cached_tokens: usize,
    /// The last sampled token, fed at the next decode step.
    next: Option<u32>,
    text: TextDecoder,
    /// Text not yet sent: it may be the start of a stop string.
    held: String,
    /// Order of arrival: prefill runs oldest first.
    seq: u64,
}

/// One sequence slot of the model.
#[derive(Default)]
struct Slot {
    /// The tokens whose keys and values are in this slot's cache, at positions `0..len`.
    cached: Vec<u32>,
    job: Option<Job>,
    /// When the slot last finished a request (the step counter), to evict the least recently used.
    last_used: u64,
}

/// Decodes generated tokens as text, holding back incomplete UTF-8 sequences (as
/// [`crate::tokenizer::TextStream`], without borrowing the tokenizer).
#[derive(Default)]
struct TextDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextDecoder {
    fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

/// The engine thread: serves with a [`Scheduler`] until the device fails, then reloads.
struct Run {
    device: SharedDevice,
    info: Arc<ModelInfo>,
    opts: EngineOptions,
    stats: Arc<Stats>,
    commands: mpsc::Receiver<Command>,
    #[allow(clippy::type_complexity)]
    load: Box<dyn Fn(&Gpu) -> Result<LoadedBatchLm> + Send>,
}

/// Why a scheduler stopped.
enum Stop {
    /// The command channel closed and every request is done.
    Closed,
    /// The device failed: why.
    DeviceFault(String),
}

impl Run {
    fn serve(self, mut model: Box<dyn BatchLm>) {
        // Requests that were waiting for a slot when the device failed: served after the reload.
        let mut waiting = VecDeque::new();
        loop {
            let (_, gpu) = self.device.current();
            let mut scheduler = Scheduler::new(
                &gpu,
                &self.device,
                model,
                self.info.clone(),
                self.opts.clone(),
                self.stats.clone(),
            );
            scheduler.queue = std::mem::take(&mut waiting);
            let why = match scheduler.run(&self.commands) {
                Stop::Closed => return,
                Stop::DeviceFault(why) => why,
            };
            waiting = std::mem::take(&mut scheduler.queue);
            // The model and its caches (the old device's buffers) go before the reload.
            drop(scheduler);
            drop(gpu);
            match self.recover(&why) {
                Some(m) => model = m,
                None => {
                    self.refuse_all(waiting);
                    return;
                }
            }
        }
    }

    /// Opens a new device and loads the model there, with a growing wait before each attempt.
    /// `None`: every attempt failed, and the engine is marked not ready for good.
    fn recover(&self, why: &str) -> Option<Box<dyn BatchLm>> {
        let (_, old) = self.device.current();
        let mut wait = RECOVERY_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=RECOVERY_ATTEMPTS {
            self.stats.set_fault(Some(format!(
                "the device failed ({why}); reloading the model on a new device, attempt \
                 {attempt} of {RECOVERY_ATTEMPTS}; retry later"
            )));
            std::thread::sleep(wait);
            wait *= 2;
            let tried = old.reopen().and_then(|gpu| {
                let loaded = (self.load)(&gpu)?;
                Ok((gpu, loaded))
            });
            match tried {
                Ok((gpu, loaded))
                    if loaded.model.slots() == self.info.slots
                        && loaded.model.context() == self.info.context =>
                {
                    self.device.replace(DeviceRef::new(Arc::new(gpu)));
                    self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_fault(None);
                    log::warn!("the model is loaded again on a new device (attempt {attempt})");
                    return Some(loaded.model);
                }
                Ok(_) => last = "the reloaded model has other slots or context".into(),
                Err(e) => last = e.to_string(),
            }
            log::error!("reload {attempt} of {RECOVERY_ATTEMPTS} failed: {last}");
        }
        self.stats.set_fault(Some(format!(
            "the device failed ({why}), and {RECOVERY_ATTEMPTS} reloads on a new device failed \
             (the last: {last}); restart the server"
        )));
        None
    }

    /// After recovery gave up: every request, waiting or still to come, ends with the reason.
    fn refuse_all(&self, waiting: VecDeque<Queued>) {
        let why = self.stats.fault().unwrap_or_default();
        let gone = waiting.len();
        for q in waiting {
            let _ = q.events.send(Event::Error(why.clone()));
        }
        self.stats.queued.fetch_sub(gone, Ordering::SeqCst);
        for cmd in self.commands.iter() {
            let Command::Generate(q) = cmd;
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = q.events.send(Event::Error(why.clone()));
        }
    }
}

struct Scheduler<'g> {
    gpu: &'g Gpu,
    device: &'g SharedDevice,
    model: Box<dyn BatchLm>,
    info: Arc<ModelInfo>,
    opts: EngineOptions,
    stats: Arc<Stats>,
    slots: Vec<Slot>,
    queue: VecDeque<Queued>,
    arrivals: u64,
    steps: u64,
}

impl<'g> Scheduler<'g> {
    fn new(
        gpu: &'g Gpu,
        device: &'g SharedDevice,
        model: Box<dyn BatchLm>,
        info: Arc<ModelInfo>,
        opts: EngineOptions,
        stats: Arc<Stats>,
    ) -> Self {
        let slots = (0..model.slots()).map(|_| Slot::default()).collect();
        Scheduler {
            gpu,
            device,
            model,
            info,
            opts,
            stats,
            slots,
            queue: VecDeque::new(),
            arrivals: 0,
            steps: 0,
        }
    }

    fn idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(|s| s.job.is_none())
    }

    /// Serves until the channel closes and every request is done, or the device fails.
    fn run(&mut self, commands: &mpsc::Receiver<Command>) -> Stop {
        let mut open = true;
        loop {
            if let Some(why) = self.device.take_lost() {
                return self.device_failed(why);
            }
            if self.idle() {
                if !open {
                    return Stop::Closed;
                }
                match commands.recv_timeout(IDLE_POLL) {
                    Ok(Command::Generate(q)) => self.queue.push_back(q),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Stop::Closed,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(Command::Generate(q)) => self.queue.push_back(q),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let t = Instant::now();
            self.drop_cancelled();
            self.assign_slots();
            let ran = self.prefill() | self.decode();
            if ran {
                self.steps += 1;
                self.stats.steps.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .busy_micros
                    .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            if let Some(why) = self.stats.fault() {
                return self.device_failed(why);
            }
        }
    }

    /// The device failed (in a step, or outside one: its lost notice, or a worker's report): the
    /// requests still in slots end with the reason, and the engine is marked not ready.
    fn device_failed(&mut self, why: String) -> Stop {
        log::error!("{why}");
        self.stats.set_fault(Some(format!(
            "the device failed ({why}); reloading the model on a new device; retry later"
        )));
        for i in 0..self.slots.len() {
            if let Some(j) = &self.slots[i].job {
                let _ = j.events.send(Event::Error(why.clone()));
            }
            self.release(i);
        }
        Stop::DeviceFault(why)
    }

    /// Frees the slots of requests whose receiver is gone, and forgets such waiting requests.
    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|q| !q.events.is_closed());
        let gone = before - self.queue.len();
        if gone > 0 {
            self.stats.queued.fetch_sub(gone, Ordering::SeqCst);
        }
        for i in 0..self.slots.len() {
            if self.slots[i]
                .job
                .as_ref()
                .is_some_and(|j| j.events.is_closed())
            {
                log::info!("slot {i}: the client went away; freeing the slot");
                self.release(i);
            }
        }
    }

    /// Ends slot `i`'s request; its cache stays for the next request with the same prefix.
    fn release(&mut self, i: usize) {
        if self.slots[i].job.take().is_some() {
            self.stats.busy_slots.fetch_sub(1, Ordering::SeqCst);
        }
        self.slots[i].last_used = self.steps;
    }

    /// Moves waiting requests into free slots: each takes the free slot whose cache shares the
    /// longest prefix with its prompt, the least recently used among equals.
    fn assign_slots(&mut self) {
        while !self.queue.is_empty() {
            let free: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].job.is_none())
                .collect();
            if free.is_empty() {
                return;
            }
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            // Busy before unqueued, so that `submit` never sees the slot free and the request
            // gone from the queue at once (which would let one request too many in).
            self.stats.busy_slots.fetch_add(1, Ordering::SeqCst);
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let prompt = q.req.prompt;
            if prompt.is_empty() || prompt.len() >= self.info.context {
                self.stats.busy_slots.fetch_sub(1, Ordering::SeqCst);
                let _ = q.events.send(Event::Error(format!(
                    "the prompt has {} tokens; give 1 to {}",
                    prompt.len(),
                    self.info.context.saturating_sub(1)
                )));
                continue;
            }
            let common = |s: &Slot| {
                s.cached
                    .iter()
                    .zip(&prompt)
                    .take_while(|(a, b)| a == b)
                    .count()
            };
            let Some(&i) = free.iter().max_by_key(|&&i| {
                (
                    common(&self.slots[i]),
                    std::cmp::Reverse(self.slots[i].last_used),
                )
            }) else {
                self.stats.busy_slots.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            let slot = &mut self.slots[i];
            // At least the last prompt token is computed: its logits give the first new token.
            let keep = self
                .model
                .reusable_prefix(slot.cached.len(), common(slot))
                .min(prompt.len() - 1);
            slot.cached.truncate(keep);
            self.stats
                .prompt_tokens
                .fetch_add(prompt.len() as u64, Ordering::Relaxed);
            self.stats
                .cached_tokens
                .fetch_add(keep as u64, Ordering::Relaxed);
            let sampler = Sampler::new(q.req.params.sampling.clone()).with_prompt_len(prompt.len());
            self.arrivals += 1;
            slot.job = Some(Job {
                events: q.events,
                history: prompt.clone(),
                prompt,
                params: q.req.params,
                sampler,
                generated: 0,
                cached_tokens: keep,
                next: None,
                text: TextDecoder::default(),
                held: String::new(),
                seq: self.arrivals,
            });
            log::debug!("slot {i}: new request, {keep} prompt tokens reused");
        }
    }

    /// Runs about one chunk of prompt tokens, oldest requests first, each piece on the chunk
    /// boundaries of a whole-prompt `forward`. Returns whether anything ran.
    fn prefill(&mut self) -> bool {
        let chunk = self.opts.chunk.max(1);
        let mut order: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let j = s.job.as_ref()?;
                (s.cached.len() < j.prompt.len()).then_some((j.seq, i))
            })
            .collect();
        order.sort_unstable();
        let mut budget = chunk;
        let mut ran = false;
        for (_, i) in order {
            if budget == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let Some(job) = slot.job.as_ref() else {
                continue;
            };
            let done = slot.cached.len();
            let n = (job.prompt.len() - done).min(chunk - done % chunk);
            let piece = job.prompt[done..done + n].to_vec();
            budget = budget.saturating_sub(n);
            ran = true;
            match self.model.forward_slot(self.gpu, i, &piece, done) {
                Ok(logits) => {
                    slot.cached.extend_from_slice(&piece);
                    if slot.cached.len() == job.prompt.len() {
                        self.accept(i, &logits);
                    }
                }
                Err(e) => self.fail(i, &e),
            }
        }
        ran
    }

    /// One decode step of every slot with a sampled token to feed. Returns whether anything ran.
    fn decode(&mut self) -> bool {
        let rows: Vec<BatchRow> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let token = s.job.as_ref()?.next?;
                Some(BatchRow {
                    slot: i,
                    token,
                    pos: s.cached.len(),
                })
            })
            .collect();
        if rows.is_empty() {
            return false;
        }
        match self.model.decode_batch(self.gpu, &rows) {
            Ok(logits) => {
                for (row, l) in rows.iter().zip(&logits) {
                    let slot = &mut self.slots[row.slot];
                    slot.cached.push(row.token);
                    if let Some(j) = slot.job.as_mut() {
                        j.next = None;
                    }
                    self.accept(row.slot, l);
                }
            }
            Err(e) => {
                for row in &rows {
                    self.fail(row.slot, &e);
                }
            }
        }
        true
    }

    /// A model error ends the request; the slot's cache is no longer trusted.
    fn fail(&mut self, i: usize, e: &crate::Error) {
        log::error!("slot {i}: {e}");
        if is_device_fault(e) {
            let mut fault = self.stats.fault.lock().unwrap_or_else(|e| e.into_inner());
            fault.get_or_insert_with(|| e.to_string());
        }
        if let Some(j) = &self.slots[i].job {
            let _ = j.events.send(Event::Error(e.to_string()));
        }
        self.release(i);
        self.slots[i].cached.clear();
    }

    /// Samples slot `i`'s next token from `logits` and streams it; ends the request at EOS, an
    /// end-of-turn token, a stop string, `max_tokens` or the context.
    fn accept(&mut self, i: usize, logits: &[f32]) {
        let tok = &self.info.tokenizer;
        let ctx = self.info.context;
        let Some(job) = self.slots[i].job.as_mut() else {
            return;
        };
        let token = job.sampler.sample(logits, &job.history);
        let logprobs = job.params.logprobs.map(|top| {
            let (lp, alts) = crate::sampler::logprobs(logits, token, top);
            let text = |t: u32| tok.decode(&[t]).unwrap_or_default();
            TokenLogprobs {
                chosen: TokenProb {
                    token: text(token),
                    logprob: lp,
                },
                top: alts
                    .into_iter()
                    .map(|(t, logprob)| TokenProb {
                        token: text(t),
                        logprob,
                    })
                    .collect(),
            }
        });
        job.history.push(token);
        job.generated += 1;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let mut finish = None;
        let text;
        if !job.params.ignore_eos && tok.is_stop(token) {
            finish = Some(FinishReason::Stop);
            text = std::mem::take(&mut job.held);
        } else {
            match job.text.push(tok, token) {
                Ok(piece) => job.held.push_str(&piece),
                Err(e) => {
                    let e = e.to_string();
                    let _ = job.events.send(Event::Error(e));
                    self.release(i);
                    return;
                }
            }
            if let Some(at) = first_stop(&job.held, &job.params.stop) {
                job.held.truncate(at);
                finish = Some(FinishReason::Stop);
                text = std::mem::take(&mut job.held);
            } else {
                let room = ctx.saturating_sub(job.prompt.len());
                if job.generated >= job.params.max_tokens.min(room) {
                    finish = Some(FinishReason::Length);
                    text = std::mem::take(&mut job.held);
                } else {
                    let keep = stop_prefix_len(&job.held, &job.params.stop);
                    text = job.held[..job.held.len() - keep].to_string();
                    job.held.drain(..job.held.len() - keep);
                    job.next = Some(token);
                }
            }
        }
        let _ = job.events.send(Event::Token { text, logprobs });
        if let Some(finish) = finish {
            let usage = Usage {
                prompt_tokens: job.prompt.len(),
                completion_tokens: job.generated,
                cached_tokens: job.cached_tokens,
            };
            let _ = job.events.send(Event::Done { finish, usage });
            self.release(i);
        }
    }
}

/// Where the first stop string begins in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// The longest end of `text` that begins some stop string: held back until the next tokens show
/// whether the stop string follows.
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            if k > best && text.ends_with(&s[..k]) {
                best = k;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_starts_held_back() {
        let stops = vec!["</end>".to_string(), "\n\n".to_string()];
        assert_eq!(first_stop("abc</end>x", &stops), Some(3));
        assert_eq!(first_stop("a\n\nb</end>", &stops), Some(1));
        assert_eq!(first_stop("abc", &stops), None);
        assert_eq!(stop_prefix_len("abc</e", &stops), 3);
        assert_eq!(stop_prefix_len("abc\n", &stops), 1);
        assert_eq!(stop_prefix_len("abc", &stops), 0);
        assert_eq!(stop_prefix_len("abc", &[]), 0);
    }
}
