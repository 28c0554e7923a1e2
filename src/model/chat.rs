//! Chat templates: the prompt text a chat model was trained on, made from a conversation.
//!
//! A model's template is a Jinja program written by the file's author (GGUF
//! `tokenizer.chat_template`, `chat_template` in `tokenizer_config.json`), for Hugging Face's
//! sandboxed Jinja2 environment. This renders it the way `transformers` does: `trim_blocks` and
//! `lstrip_blocks`; Python's string, list and dict methods (`startswith`, `replace`, `format`,
//! `get`, ...: minijinja-contrib's pycompat); `{% break %}` / `{% continue %}`; the globals
//! `raise_exception` and `strftime_now` (UTC); `tojson` as Python's `json.dumps`; the tests
//! `iterable` and `sequence` as Python answers them; `{% generation %}` blocks (they only mark
//! assistant text for training masks, so the tags are dropped); and HF's context: `messages`,
//! `tools` and `documents` (none), `add_generation_prompt`, `bos_token`, `eos_token`.
//!
//! The template is untrusted input, so it renders within [`Limits`]: fuel for the instructions it
//! runs (so loops end), a recursion depth, an output size, and a wall-clock deadline for work that
//! fuel does not count. Running past one is [`Error::ChatTemplate`] with
//! [`TemplateFailure::Limit`], not a hang. The callbacks a template can build text with here
//! (`join`, `tojson`, Python's string methods) refuse to build a value larger than the output
//! limit, and once the deadline has passed they fail at once, so that an abandoned render ends at
//! its next call instead of running on. minijinja has no hook in its `~`, `+` and `*` operators,
//! so the compiled template's instructions are rewritten before it runs ([`guard_instructions`]):
//! each of those operators becomes a call of a function that checks the size of what it would
//! build first, and literal text is emitted through the formatter like any value. Every value
//! built and every byte emitted then counts against one budget per render
//! ([`BUILD_BUDGET_FACTOR`] x the output limit), so that a render's memory is bounded by a
//! constant multiple of `Limits::max_output`, whatever the template does. The environment has no loader (no
//! `include` or `import` of files) and the template sees nothing but its context; the only
//! outside state it can read is the date, through `strftime_now`.
//!
//! A model without a template gets a built-in one ([`Builtin`]), chosen from the architecture and
//! the vocabulary as llama.cpp chooses its formats.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use minijinja::machinery::{CompiledTemplate, Instruction, Instructions, TemplateConfig, Vm};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State};
use serde::Serialize;

use crate::error::{Error, Result, TemplateFailure};
use crate::tokenizer::Tokenizer;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may know others, such as `tool`).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What a render may spend. The 70 templates of tests/data/chat_templates need under 1,000 fuel
/// for a four-message conversation; the default fuel leaves room for conversations of thousands
/// of messages and runs out in about 0.1 s of looping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// minijinja's fuel: roughly one unit per instruction the template executes, so it bounds
    /// loop iterations.
    pub fuel: u64,
    /// Nesting depth (loops, conditions, macro calls; minijinja caps it at 500).
    pub recursion: usize,
    /// Bytes of rendered output, and of any one value the template builds with `join`, `tojson`
    /// or a string method.
    pub max_output: usize,
    /// Wall-clock time. Fuel counts instructions, not their cost: a loop that appends to a
    /// growing string, or a built-in filter run over a huge lazy sequence (`[x] * 10**12`), can
    /// run for hours on little fuel. Past the deadline the render is abandoned with an error; its
    /// thread stops at its next callback (see [`Guard`]), or else at the end of its fuel.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            fuel: 2_000_000,
            recursion: 500,
            max_output: 16 << 20,
            deadline: Duration::from_secs(5),
        }
    }
}

/// Stack of the render thread: minijinja's recursion limit of 500 is sized for a main thread's
/// stack (8 MiB), more than a spawned thread gets by default.
const RENDER_STACK: usize = 32 << 20;

/// Arguments of a render besides the messages, as `apply_chat_template` takes them.
#[derive(Debug, Clone, Default)]
pub struct RenderArgs {
    /// End with the header of an assistant turn, for the model to continue.
    pub add_generation_prompt: bool,
    /// The tokenizer's BOS and EOS token strings (empty when it has none).
    pub bos_token: String,
    pub eos_token: String,
}

impl RenderArgs {
    /// `add_generation_prompt` with `tok`'s BOS and EOS strings.
    pub fn for_tokenizer(tok: &Tokenizer, add_generation_prompt: bool) -> RenderArgs {
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
        RenderArgs {
            add_generation_prompt,
            bos_token: text(tok.bos),
            eos_token: text(tok.eos),
        }
    }
}

/// A chat template and where it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    origin: String,
    source: String,
    builtin: Option<Builtin>,
    limits: Limits,
    /// The time `strftime_now` reads; `None`: the system clock at render time.
    now: Option<SystemTime>,
}

impl ChatTemplate {
    /// A template from a model's files; `origin` names the file and key for errors
    /// ("'model.gguf' key 'tokenizer.chat_template'").
    pub fn new(origin: impl Into<String>, source: impl Into<String>) -> ChatTemplate {
        ChatTemplate {
            origin: origin.into(),
            source: source.into(),
            builtin: None,
            limits: Limits::default(),
            now: None,
        }
    }

    /// The built-in template `b`.
    pub fn builtin(b: Builtin) -> ChatTemplate {
        ChatTemplate {
            builtin: Some(b),
            ..ChatTemplate::new(format!("built-in '{}'", b.name()), b.source())
        }
    }

    /// Replaces the description of where the template came from.
    pub fn with_origin(mut self, origin: impl Into<String>) -> ChatTemplate {
        self.origin = origin.into();
        self
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The built-in this is, if it is one.
    pub fn as_builtin(&self) -> Option<Builtin> {
        self.builtin
    }

    pub fn with_limits(mut self, limits: Limits) -> ChatTemplate {
        self.limits = limits;
        self
    }

    /// Fixes the time `strftime_now` reads (for reproducible prompts and tests).
    pub fn with_now(mut self, now: SystemTime) -> ChatTemplate {
        self.now = Some(now);
        self
    }

    fn fail(&self, kind: TemplateFailure, reason: String) -> Error {
        Error::ChatTemplate {
            origin: self.origin.clone(),
            kind,
            reason,
        }
    }

    /// Renders `messages` into the prompt text, within the template's [`Limits`].
    pub fn render(&self, messages: &[Message], args: &RenderArgs) -> Result<String> {
        // On a thread of its own, so that a render past the deadline can be abandoned rather
        // than hang the caller; a panic in the engine also comes back as an error.
        let (tx, rx) = mpsc::channel();
        let (this, messages, args) = (self.clone(), messages.to_vec(), args.clone());
        let cancelled = Arc::new(AtomicBool::new(false));
        let guard = Guard::new(self.limits.max_output, cancelled.clone());
        let spawned = std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(RENDER_STACK)
            .spawn(move || {
                // The receiver is gone only when the deadline has passed.
                let _ = tx.send(this.render_here(&messages, &args, guard));
            });
        if let Err(e) = spawned {
            let reason = format!("cannot start the render thread: {e}");
            return Err(self.fail(TemplateFailure::Render, reason));
        }
        match rx.recv_timeout(self.limits.deadline) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                cancelled.store(true, Ordering::Relaxed);
                Err(self.fail(
                    TemplateFailure::Limit,
                    format!(
                        "still rendering after {:?} (Limits::deadline)",
                        self.limits.deadline
                    ),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.fail(
                TemplateFailure::Render,
                "the template engine panicked".into(),
            )),
        }
    }

    /// [`ChatTemplate::render`] on the calling thread, bounded by fuel, depth and output only.
    fn render_here(&self, messages: &[Message], args: &RenderArgs, guard: Guard) -> Result<String> {
        let fail = |kind: TemplateFailure, reason: String| self.fail(kind, reason);
        let raised: Arc<Mutex<Option<String>>> = Arc::default();
        let now = self.now.unwrap_or_else(SystemTime::now);
        let source = strip_generation_tags(&self.source);
        let env = environment(&self.limits, raised.clone(), now, guard);
        // Compiled as `Environment::template_from_named_str` compiles (HF's trim_blocks and
        // lstrip_blocks, no autoescape), then rewritten so that no operator builds an unchecked
        // value.
        let config = TemplateConfig {
            syntax_config: Default::default(),
            ws_config: minijinja::machinery::WhitespaceConfig {
                keep_trailing_newline: false,
                lstrip_blocks: true,
                trim_blocks: true,
            },
            default_auto_escape: Arc::new(|_: &str| AutoEscape::None),
        };
        let syntax = |e: minijinja::Error| fail(TemplateFailure::Syntax, describe(&e));
        check_constant_folding(&source, self.limits.max_output).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation {
                fail(TemplateFailure::Limit, describe(&e))
            } else {
                syntax(e)
            }
        })?;
        let compiled = CompiledTemplate::new(TEMPLATE_NAME, &source, &config).map_err(syntax)?;
        let instructions = guard_instructions(&compiled.instructions);
        let blocks = compiled
            .blocks
            .iter()
            .map(|(name, b)| (*name, guard_instructions(b)))
            .collect();
        let mut ctx = vec![
            ("messages", Value::from_serialize(messages)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            (
                "add_generation_prompt",
                Value::from(args.add_generation_prompt),
            ),
            ("bos_token", Value::from(args.bos_token.as_str())),
            ("eos_token", Value::from(args.eos_token.as_str())),
        ];
        // FireFunction v2's template reads two variables HF does not define; llama.cpp supplies
        // them (its firefunction_v2 format), and so does this, so that the model chats as it does
        // there rather than failing on an undefined value.
        if source.contains(" functools[") {
            ctx.push(("functions", Value::from("")));
            ctx.push((
                "datetime",
                Value::from(strftime(now, "%b %d %Y %H:%M:%S GMT")),
            ));
        }
        let ctx: Value = ctx.into_iter().collect();
        // Everything reaches the output through the guarded formatter (literal text included),
        // which counts it against the render's budget.
        let mut out = String::new();
        let result = Vm::new(&env)
            .eval(
                &instructions,
                ctx,
                &blocks,
                &mut minijinja::machinery::make_string_output(&mut out),
                AutoEscape::None,
            )
            .map(|_| ());
        if let Some(message) = raised.lock().ok().and_then(|mut m| m.take()) {
            return Err(fail(TemplateFailure::Raised, message));
        }
        if out.len() > self.limits.max_output {
            return Err(fail(
                TemplateFailure::Limit,
                format!(
                    "the output exceeds {} bytes (Limits::max_output)",
                    self.limits.max_output
                ),
            ));
        }
        if let Err(e) = result {
            let limit = e.kind() == ErrorKind::OutOfFuel
                || e.detail().is_some_and(|d| {
                    d.contains("recursion limit") || d.contains(Guard::LIMIT_MARK)
                });
            let kind = if limit {
                TemplateFailure::Limit
            } else {
                TemplateFailure::Render
            };
            return Err(fail(kind, describe(&e)));
        }
        Ok(out)
    }
}

/// The name the template has in minijinja's messages ("... (in chat_template:12)").
const TEMPLATE_NAME: &str = "chat_template";

/// An error and its causes on one line (minijinja puts a callback's error in `source`).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// A render may build values and emit text of this many times `Limits::max_output` bytes in all:
/// real templates build each message's text a few times over (a string appended to per message
/// builds the prompt's prefixes), and no more than this can be live at once.
pub const BUILD_BUDGET_FACTOR: usize = 8;

/// What the callbacks of one render check before and after they build a value: its size against
/// `max_value` (no value larger than the whole output can be needed for it: a template building
/// one is growing text without bound), the bytes built and emitted so far against the render's
/// budget, and whether the caller has abandoned the render (its deadline passed), so that the
/// render's thread ends at its next callback.
#[derive(Clone)]
struct Guard {
    max_value: usize,
    cancelled: Arc<AtomicBool>,
    /// Bytes built and emitted so far.
    spent: Arc<AtomicUsize>,
    budget: usize,
}

impl Guard {
    /// In every message of a guard's error, which `render_here` reports as a limit.
    const LIMIT_MARK: &'static str = "(Limits::";

    fn new(max_value: usize, cancelled: Arc<AtomicBool>) -> Guard {
        Guard {
            max_value,
            cancelled,
            spent: Arc::default(),
            budget: max_value.saturating_mul(BUILD_BUDGET_FACTOR),
        }
    }

    fn check(&self, what: &str, len: usize) -> std::result::Result<(), minijinja::Error> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{what}: the render was abandoned (Limits::deadline)"),
            ));
        }
        if len > self.max_value {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "{what}: a value of more than {} bytes (Limits::max_output)",
                    self.max_value
                ),
            ));
        }
        Ok(())
    }

    /// [`Guard::check`], then counts `len` bytes built or emitted against the render's budget.
    fn spend(&self, what: &str, len: usize) -> std::result::Result<(), minijinja::Error> {
        self.check(what, len)?;
        let spent = self
            .spent
            .fetch_add(len, Ordering::Relaxed)
            .saturating_add(len);
        if spent > self.budget {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "{what}: the template built and emitted more than {} bytes in all \
                     (Limits::max_output x {BUILD_BUDGET_FACTOR})",
                    self.budget
                ),
            ));
        }
        Ok(())
    }

    /// The size a value counts for: a string's bytes, a sequence's or map's items when known.
    fn size(v: &Value) -> usize {
        match v.as_str() {
            Some(s) => s.len(),
            None => v.len().unwrap_or(0),
        }
    }

    /// `v`'s text (as `{{ v }}` prints it), built only up to the value limit.
    fn text(&self, what: &str, v: &Value) -> std::result::Result<String, minijinja::Error> {
        if let Some(s) = v.as_str() {
            self.check(what, s.len())?;
            return Ok(s.to_string());
        }
        // A sequence prints at least 3 bytes an item ("1, "): one too long is refused before it
        // is walked (a lazy `[1] * 10**12` would take hours to print up to the limit).
        if matches!(
            v.kind(),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map
        ) {
            self.check(what, items(v).saturating_mul(3))?;
        }
        let mut out = LimitedString {
            buf: String::new(),
            max: self.max_value,
        };
        use std::fmt::Write;
        if write!(out, "{v}").is_err() {
            self.check(what, self.max_value.saturating_add(1))?;
        }
        Ok(out.buf)
    }
}

/// A string that refuses to grow past `max` bytes (the write fails).
struct LimitedString {
    buf: String,
    max: usize,
}

impl std::fmt::Write for LimitedString {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.buf.len() + s.len() > self.max {
            return Err(std::fmt::Error);
        }
        self.buf.push_str(s);
        Ok(())
    }
}

/// The functions the rewritten operators call ([`guard_instructions`]).
const CONCAT_FN: &str = "__wgllm_concat";
const ADD_FN: &str = "__wgllm_add";
const MUL_FN: &str = "__wgllm_mul";

/// `instructions` with every `~`, `+` and `*` a call of the checked function of the same meaning
/// (same operands on the stack, one result: one instruction for one), and every piece of literal
/// text loaded as a value and emitted through the formatter (two instructions for one; jump
/// targets and macro offsets move accordingly).
fn guard_instructions<'s>(instructions: &Instructions<'s>) -> Instructions<'s> {
    let n = instructions.len() as u32;
    // Where each old instruction lands, and where the end lands (a valid jump target).
    let mut at = Vec::with_capacity(n as usize + 1);
    let mut next = 0u32;
    for i in 0..n {
        at.push(next);
        next += match instructions.get(i) {
            Some(Instruction::EmitRaw(_)) => 2,
            _ => 1,
        };
    }
    at.push(next);
    let to = |target: &u32| at.get(*target as usize).copied().unwrap_or(next);
    let mut out = Instructions::new(instructions.name(), instructions.source());
    for i in 0..n {
        let Some(instr) = instructions.get(i) else {
            break;
        };
        let (span, line) = (instructions.get_span(i), instructions.get_line(i));
        let mut add = |instr: Instruction<'s>| match (span, line) {
            (Some(span), _) => out.add_with_span(instr, span),
            (None, Some(line)) => out.add_with_line(instr, line as u16),
            (None, None) => out.add(instr),
        };
        match instr {
            Instruction::EmitRaw(text) => {
                add(Instruction::LoadConst(Value::from(*text)));
                add(Instruction::Emit)
            }
            Instruction::StringConcat => add(Instruction::CallFunction(CONCAT_FN, Some(2))),
            Instruction::Add => add(Instruction::CallFunction(ADD_FN, Some(2))),
            Instruction::Mul => add(Instruction::CallFunction(MUL_FN, Some(2))),
            Instruction::Jump(t) => add(Instruction::Jump(to(t))),
            Instruction::JumpIfFalse(t) => add(Instruction::JumpIfFalse(to(t))),
            Instruction::JumpIfFalseOrPop(t) => add(Instruction::JumpIfFalseOrPop(to(t))),
            Instruction::JumpIfTrueOrPop(t) => add(Instruction::JumpIfTrueOrPop(to(t))),
            Instruction::Iterate(t) => add(Instruction::Iterate(to(t))),
            Instruction::BuildMacro(name, t, flags) => {
                add(Instruction::BuildMacro(name, to(t), *flags))
            }
            other => add(other.clone()),
        };
    }
    out
}

/// minijinja folds constant expressions while it compiles (`[1] * 10**12 ~ ''` becomes one string
/// there), before any check of a render can run: such an expression whose value could pass
/// `max` bytes is refused before compiling ([`folded_size`]).
fn check_constant_folding(source: &str, max: usize) -> std::result::Result<(), minijinja::Error> {
    use minijinja::machinery::{ast, parse, WhitespaceConfig};
    let ws = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    let tree = parse(source, TEMPLATE_NAME, Default::default(), ws)?;
    let mut check = |e: &ast::Expr<'_>| match folded_size(e) {
        Some(size) if size > max as u128 => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "a constant expression of more than {max} bytes (Limits::max_output; line {})",
                e.span().start_line
            ),
        )),
        _ => Ok(()),
    };
    walk_stmt(&tree, &mut check)
}

type ExprCheck<'c> = dyn FnMut(&minijinja::machinery::ast::Expr<'_>) -> std::result::Result<(), minijinja::Error>
    + 'c;

/// Calls `check` on every expression of `stmt`, nested ones included.
fn walk_stmt(
    stmt: &minijinja::machinery::ast::Stmt<'_>,
    check: &mut ExprCheck<'_>,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::machinery::ast::Stmt;
    let body =
        |b: &[Stmt<'_>], check: &mut ExprCheck<'_>| b.iter().try_for_each(|s| walk_stmt(s, check));
    match stmt {
        Stmt::Template(t) => body(&t.children, check),
        Stmt::EmitExpr(e) => walk_expr(&e.expr, check),
        Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => Ok(()),
        Stmt::ForLoop(f) => {
            walk_expr(&f.target, check)?;
            walk_expr(&f.iter, check)?;
            if let Some(e) = &f.filter_expr {
                walk_expr(e, check)?;
            }
            body(&f.body, check)?;
            body(&f.else_body, check)
        }
        Stmt::IfCond(c) => {
            walk_expr(&c.expr, check)?;
            body(&c.true_body, check)?;
            body(&c.false_body, check)
        }
        Stmt::WithBlock(w) => {
            for (a, b) in &w.assignments {
                walk_expr(a, check)?;
                walk_expr(b, check)?;
            }
            body(&w.body, check)
        }
        Stmt::Set(s) => {
            walk_expr(&s.target, check)?;
            walk_expr(&s.expr, check)
        }
        Stmt::SetBlock(s) => {
            walk_expr(&s.target, check)?;
            if let Some(f) = &s.filter {
                walk_expr(f, check)?;
            }
            body(&s.body, check)
        }
        Stmt::AutoEscape(a) => {
            walk_expr(&a.enabled, check)?;
            body(&a.body, check)
        }
        Stmt::FilterBlock(f) => {
            walk_expr(&f.filter, check)?;
            body(&f.body, check)
        }
        Stmt::Block(b) => body(&b.body, check),
        Stmt::Import(i) => {
            walk_expr(&i.expr, check)?;
            walk_expr(&i.name, check)
        }
        Stmt::FromImport(f) => {
            walk_expr(&f.expr, check)?;
            for (a, b) in &f.names {
                walk_expr(a, check)?;
                if let Some(b) = b {
                    walk_expr(b, check)?;
                }
            }
            Ok(())
        }
        Stmt::Extends(e) => walk_expr(&e.name, check),
        Stmt::Include(i) => walk_expr(&i.name, check),
        Stmt::Macro(m) => walk_macro(m, check),
        Stmt::CallBlock(c) => {
            walk_call(&c.call, check)?;
            walk_macro(&c.macro_decl, check)
        }
        Stmt::Do(d) => walk_call(&d.call, check),
    }
}

fn walk_macro(
    m: &minijinja::machinery::ast::Macro<'_>,
    check: &mut ExprCheck<'_>,
) -> std::result::Result<(), minijinja::Error> {
    for e in m.args.iter().chain(&m.defaults) {
        walk_expr(e, check)?;
    }
    m.body.iter().try_for_each(|s| walk_stmt(s, check))
}

fn walk_call(
    c: &minijinja::machinery::ast::Call<'_>,
    check: &mut ExprCheck<'_>,
) -> std::result::Result<(), minijinja::Error> {
    walk_expr(&c.expr, check)?;
    walk_args(&c.args, check)
}

fn walk_args(
    args: &[minijinja::machinery::ast::CallArg<'_>],
    check: &mut ExprCheck<'_>,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::machinery::ast::CallArg;
    args.iter().try_for_each(|a| match a {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => {
            walk_expr(e, check)
        }
    })
}

/// Calls `check` on `e` and every expression inside it.
fn walk_expr(
    e: &minijinja::machinery::ast::Expr<'_>,
    check: &mut ExprCheck<'_>,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::machinery::ast::Expr;
    check(e)?;
    match e {
        Expr::Var(_) | Expr::Const(_) => Ok(()),
        Expr::Slice(s) => {
            walk_expr(&s.expr, check)?;
            for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                walk_expr(x, check)?;
            }
            Ok(())
        }
        Expr::UnaryOp(u) => walk_expr(&u.expr, check),
        Expr::BinOp(b) => {
            walk_expr(&b.left, check)?;
            walk_expr(&b.right, check)
        }
        Expr::Compare(c) => {
            walk_expr(&c.expr, check)?;
            c.ops.iter().try_for_each(|op| walk_expr(&op.expr, check))
        }
        Expr::IfExpr(i) => {
            walk_expr(&i.test_expr, check)?;
            walk_expr(&i.true_expr, check)?;
            match &i.false_expr {
                Some(f) => walk_expr(f, check),
                None => Ok(()),
            }
        }
        Expr::Filter(f) => {
            if let Some(x) = &f.expr {
                walk_expr(x, check)?;
            }
            walk_args(&f.args, check)
        }
        Expr::Test(t) => {
            walk_expr(&t.expr, check)?;
            walk_args(&t.args, check)
        }
        Expr::GetAttr(g) => walk_expr(&g.expr, check),
        Expr::GetItem(g) => {
            walk_expr(&g.expr, check)?;
            walk_expr(&g.subscript_expr, check)
        }
        Expr::Call(c) => walk_call(c, check),
        Expr::List(l) => l.items.iter().try_for_each(|x| walk_expr(x, check)),
        Expr::Map(m) => m
            .keys
            .iter()
            .chain(&m.values)
            .try_for_each(|x| walk_expr(x, check)),
    }
}

/// An upper bound of the bytes of text minijinja's constant folding can make of `e` (a sequence
/// counted as it prints), or `None` where `e` is not a constant, so not folded. Numbers count as
/// short text, and as a count where they multiply (`'x' * 10**9`).
fn folded_size(e: &minijinja::machinery::ast::Expr<'_>) -> Option<u128> {
    use minijinja::machinery::ast::{BinOpKind, Expr};
    const SHORT: u128 = 64;
    match e {
        Expr::Const(c) => Some(value_size(&c.value)),
        Expr::List(l) => l.items.iter().try_fold(2u128, |sum, x| {
            Some(sum.saturating_add(folded_size(x)?.saturating_add(2)))
        }),
        Expr::Map(m) => m.keys.iter().chain(&m.values).try_fold(2u128, |sum, x| {
            Some(sum.saturating_add(folded_size(x)?.saturating_add(2)))
        }),
        Expr::UnaryOp(u) => folded_size(&u.expr).map(|_| SHORT),
        Expr::Compare(c) => {
            folded_size(&c.expr)?;
            for op in &c.ops {
                folded_size(&op.expr)?;
            }
            Some(SHORT)
        }
        Expr::BinOp(b) => {
            let (l, r) = (folded_size(&b.left)?, folded_size(&b.right)?);
            Some(match b.op {
                BinOpKind::Add | BinOpKind::Concat => l.saturating_add(r),
                BinOpKind::Mul => {
                    let count = |x: &Expr<'_>, size: u128| {
                        // Only a short constant is evaluated to read its count.
                        (size <= SHORT)
                            .then(|| x.as_const())
                            .flatten()
                            .and_then(|v| v.as_i64())
                            .map_or(1, |n| n.max(0) as u128)
                    };
                    l.saturating_mul(count(&b.right, r))
                        .max(r.saturating_mul(count(&b.left, l)))
                }
                _ => SHORT,
            })
        }
        _ => None,
    }
}

/// The text size of a constant: a string's bytes, a sequence's or map's items as they print.
fn value_size(v: &Value) -> u128 {
    match v.as_str() {
        Some(s) => s.len() as u128,
        None => match v.kind() {
            ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
                v.try_iter().map_or(0, |items| {
                    items.fold(2u128, |sum, x| sum.saturating_add(value_size(&x) + 2))
                })
            }
            _ => 64,
        },
    }
}

/// minijinja's own `+` or `*` (`op`) of `a` and `b`, for what the checked functions leave to it
/// (numbers), in an environment of its own.
fn plain_op(op: &'static str, a: Value, b: Value) -> std::result::Result<Value, minijinja::Error> {
    static ENV: std::sync::OnceLock<Environment<'static>> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(Environment::empty);
    let expr = env.compile_expression(op)?;
    expr.eval(minijinja::context! { a => a, b => b })
}

/// The most items a sequence built by `+` or `*` may have: the value limit at 8 bytes an item
/// (each item is at least a pointer once the sequence is materialised).
fn max_items(guard: &Guard) -> usize {
    guard.max_value / 8
}

fn check_items(
    guard: &Guard,
    what: &str,
    items: usize,
) -> std::result::Result<(), minijinja::Error> {
    if items > max_items(guard) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "{what}: a sequence of more than {} items (Limits::max_output)",
                max_items(guard)
            ),
        ));
    }
    guard.spend(what, items.saturating_mul(8))
}

/// `a ~ b`, checked: the text of both, refused before it is built when it would pass the limit.
fn concat(guard: &Guard, a: &Value, b: &Value) -> std::result::Result<Value, minijinja::Error> {
    let a = guard.text("~", a)?;
    let b = guard.text("~", b)?;
    guard.spend("~", a.len() + b.len())?;
    Ok(Value::from(a + &b))
}

/// A sequence's or map's items, as far as known without walking it (a lazy sequence's iterator
/// knows its length).
fn items(v: &Value) -> usize {
    v.len()
        .or_else(|| v.try_iter().ok().map(|i| i.size_hint().0))
        .unwrap_or(0)
}

fn is_sequence(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// `a + b`, checked: strings and sequences by their size before they are built, the rest
/// (numbers) as minijinja adds them.
fn add(guard: &Guard, a: Value, b: Value) -> std::result::Result<Value, minijinja::Error> {
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        guard.spend("+", x.len() + y.len())?;
        return Ok(Value::from([x, y].concat()));
    }
    if is_sequence(&a) && is_sequence(&b) {
        check_items(guard, "+", items(&a).saturating_add(items(&b)))?;
    }
    plain_op("a + b", a, b)
}

/// `a * b`, checked: a string or sequence repeated, by its size before it is built.
fn mul(guard: &Guard, a: Value, b: Value) -> std::result::Result<Value, minijinja::Error> {
    let (item, times) = if a.is_number() { (&b, &a) } else { (&a, &b) };
    if let Some(n) = times.as_usize() {
        if let Some(s) = item.as_str() {
            guard.spend("*", s.len().saturating_mul(n))?;
        } else if is_sequence(item) {
            check_items(guard, "*", items(item).max(1).saturating_mul(n))?;
        }
    }
    plain_op("a * b", a, b)
}

/// Refuses a format string that would build more than the limit: a width or precision past it
/// (`'%999999999s'`, `'{:>999999999}'`), or more placeholders times the longest argument than
/// the limit (`'{0}{0}{0}...'.format(long)`). What it lets through is checked again when built.
fn check_format(
    guard: &Guard,
    what: &str,
    format: &str,
    args: &[Value],
) -> std::result::Result<(), minijinja::Error> {
    let mut widest = 0usize;
    for run in format.split(|c: char| !c.is_ascii_digit()) {
        if !run.is_empty() {
            widest = widest.max(run.parse::<usize>().unwrap_or(usize::MAX));
        }
    }
    guard.check(what, widest)?;
    let mut longest = 0usize;
    for a in args {
        longest = longest.max(guard.text(what, a)?.len());
    }
    let places = format.matches(['{', '%']).count();
    let bound = places
        .saturating_mul(longest.saturating_add(widest))
        .saturating_add(format.len());
    guard.check(what, bound)
}

/// The length of `s.replace(from, to)` (at most `count` replacements), without building it.
fn replaced_len(s: &str, from: &str, to: &str, count: Option<usize>) -> usize {
    let found = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let n = count.map_or(found, |c| c.min(found));
    (s.len() - n * from.len()).saturating_add(n.saturating_mul(to.len()))
}

/// Jinja's `replace` filter (with Jinja2's optional count), checked before it is built.
fn replace(
    guard: &Guard,
    value: &Value,
    from: &Value,
    to: &Value,
    count: Option<usize>,
) -> std::result::Result<Value, minijinja::Error> {
    let s = guard.text("replace", value)?;
    let (from, to) = (guard.text("replace", from)?, guard.text("replace", to)?);
    guard.spend("replace", replaced_len(&s, &from, &to, count))?;
    Ok(Value::from(match count {
        Some(n) => s.replacen(&from, &to, n),
        None => s.replace(&from, &to),
    }))
}

/// Jinja's `indent` filter as minijinja has it (width, `first`, `blank`), checked before it is
/// built: every line may grow by the width.
fn indent(
    guard: &Guard,
    value: &Value,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let width = match width {
        Some(w) => w,
        None => kwargs.get::<Option<usize>>("width")?.unwrap_or(4),
    };
    let first = match first {
        Some(f) => f,
        None => kwargs.get::<Option<bool>>("first")?.unwrap_or(false),
    };
    let blank = match blank {
        Some(b) => b,
        None => kwargs.get::<Option<bool>>("blank")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let text = guard.text("indent", value)?;
    let lines = text.matches('\n').count() + 1;
    let grown = lines.saturating_mul(width.saturating_add(1));
    guard.spend("indent", grown.saturating_add(text.len()))?;
    let strip = |s: &str| {
        let s = s.strip_suffix('\n').unwrap_or(s);
        s.strip_suffix('\r').unwrap_or(s).len()
    };
    let input = &text[..strip(&text)];
    let pad = " ".repeat(width);
    let mut out = String::new();
    let mut lines = input.split('\n');
    if !first {
        out.push_str(lines.next().unwrap_or(""));
        out.push('\n');
    }
    for line in lines {
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        } else if blank {
            out.push_str(&pad);
        }
        out.push('\n');
    }
    let keep = strip(&out);
    out.truncate(keep);
    Ok(Value::from(out))
}

/// Jinja's `join` (minijinja's, without autoescaping), checked by `guard` item by item: the
/// sequence may be lazy and huge (`[x] * 10**12`).
fn join(
    guard: &Guard,
    value: &Value,
    joiner: Option<&str>,
) -> std::result::Result<Value, minijinja::Error> {
    let joiner = joiner.unwrap_or_default();
    let mut out = String::new();
    for (i, item) in value.try_iter()?.enumerate() {
        if i > 0 {
            out.push_str(joiner);
        }
        match item.as_str() {
            Some(s) => out.push_str(s),
            None => {
                use std::fmt::Write;
                let _ = write!(out, "{item}");
            }
        }
        guard.check("join", out.len())?;
    }
    guard.spend("join", out.len())?;
    Ok(Value::from(out))
}

/// HF's environment, bounded, with nothing from outside but the date.
fn environment<'s>(
    limits: &Limits,
    raised: Arc<Mutex<Option<String>>>,
    now: SystemTime,
    guard: Guard,
) -> Environment<'s> {
    let mut env = Environment::new();
    // transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(limits.fuel));
    env.set_recursion_limit(limits.recursion);
    // Python's methods, each result checked (`"x".replace("x", s)` grows as fast as `~`).
    // Those that can build more than they are given are checked before they build: replace by
    // the count of what it replaces, format by its placeholders, join item by item.
    let g = guard.clone();
    env.set_unknown_method_callback(move |state, value, method, args| {
        g.check(method, 0)?;
        if let Some(s) = value.as_str() {
            match (method, args) {
                ("replace", [from, to, rest @ ..]) => {
                    let count = rest.first().and_then(|c| c.as_i64());
                    let count = count.and_then(|c| usize::try_from(c).ok());
                    let (from, to) = (g.text(method, from)?, g.text(method, to)?);
                    g.check(method, replaced_len(s, &from, &to, count))?;
                }
                ("format", _) => check_format(&g, method, s, args)?,
                ("join", [items]) => return join(&g, items, Some(s)),
                _ => {}
            }
        }
        let v = minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)?;
        g.spend(method, Guard::size(&v))?;
        Ok(v)
    });
    let g = guard.clone();
    env.add_function(CONCAT_FN, move |a: Value, b: Value| concat(&g, &a, &b));
    let g = guard.clone();
    env.add_function(ADD_FN, move |a: Value, b: Value| add(&g, a, b));
    let g = guard.clone();
    env.add_function(MUL_FN, move |a: Value, b: Value| mul(&g, a, b));
    let g = guard.clone();
    env.add_filter(
        "replace",
        move |value: &Value, from: &Value, to: &Value, count: Option<usize>| {
            replace(&g, value, from, to, count)
        },
    );
    let g = guard.clone();
    env.add_filter(
        "indent",
        move |value: &Value,
              width: Option<usize>,
              first: Option<bool>,
              blank: Option<bool>,
              kwargs: Kwargs| indent(&g, value, width, first, blank, kwargs),
    );
    let g = guard.clone();
    env.add_filter(
        "format",
        move |state: &State, format: &Value, args: minijinja::value::Rest<Value>| {
            let text = g.text("format", format)?;
            check_format(&g, "format", &text, &args)?;
            let v = minijinja::filters::format(state, format, args)?;
            g.spend("format", Guard::size(&v))?;
            Ok(v)
        },
    );
    // Every byte of the output (literal text included, see `guard_instructions`) and of captured
    // blocks and macro results passes here.
    let g = guard.clone();
    env.set_formatter(move |out, state, value| {
        let len = match value.as_str() {
            Some(s) => s.len(),
            None => g.text("output", value)?.len(),
        };
        g.spend("output", len)?;
        minijinja::escape_formatter(out, state, value)
    });

    let g = guard.clone();
    env.add_filter("join", move |value: &Value, joiner: Option<String>| {
        join(&g, value, joiner.as_deref())
    });
    env.add_function(
        "raise_exception",
        move |message: String| -> std::result::Result<Value, minijinja::Error> {
            // Kept aside so that the error can say it is the template's own, in its words.
            if let Ok(mut slot) = raised.lock() {
                *slot = Some(message.clone());
            }
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", move |format: String| strftime(now, &format));
    let g = guard.clone();
    env.add_filter("tojson", move |value: &Value, kwargs: Kwargs| {
        tojson(&g, value, kwargs)
    });
    // Jinja2's tests ask Python: `none` has no iter() or len() (minijinja iterates it as empty),
    // while strings and dicts are sequences (len() and []). Templates write `tools is iterable
    // and tools | length > 0` with tools = none, and `x is sequence and x is not string`.
    env.add_test("iterable", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::String
                | ValueKind::Bytes
                | ValueKind::Seq
                | ValueKind::Map
                | ValueKind::Iterable
                | ValueKind::Undefined
        )
    });
    env.add_test("sequence", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::String
                | ValueKind::Bytes
                | ValueKind::Seq
                | ValueKind::Map
                | ValueKind::Undefined
        )
    });
    env
}

/// Rewrites HF's `{% generation %}` / `{% endgeneration %}` as `{% if true %}` / `{% endif %}`:
/// the block marks assistant text for `return_assistant_tokens_mask` and renders its body
/// unchanged. The whitespace-control marks (`{%-`, `-%}`) stay, so trimming is unchanged too.
pub fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at + 2..];
        let body = tag.trim_start_matches(['-', '+']);
        let ws = body.len() - body.trim_start().len();
        let body = body.trim_start();
        let word_len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let replacement = match &body[..word_len] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                let marks = tag.len() - body.len() - ws;
                out.push_str("{%");
                out.push_str(&tag[..marks + ws]);
                out.push_str(r);
                rest = &body[word_len..];
            }
            None => {
                out.push_str("{%");
                rest = tag;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, so `", "` and `": "` between items and no HTML escaping
/// (minijinja's own filter is compact and HTML-safe, which changes prompts).
fn tojson(
    guard: &Guard,
    value: &Value,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_i64() {
            Some(n) => " ".repeat(n.clamp(0, 64) as usize),
            None => v.to_string(),
        }),
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        // Python's defaults: no spaces before newlines when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = Json {
        guard: guard.clone(),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    json.write(&mut out, value, 0)?;
    guard.spend("tojson", out.len())?;
    // The output is JSON, not text to be escaped again under autoescaping.
    Ok(Value::from_safe_string(out))
}

struct Json {
    guard: Guard,
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl Json {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        if depth > 64 {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: nesting deeper than 64",
            ));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            // minijinja prints numbers as Python does (1, 1.0, inf).
            ValueKind::Number => out.push_str(&v.to_string()),
            // Items are written as they come: a lazy sequence may be huge, and stops at the limit.
            ValueKind::Seq | ValueKind::Iterable => {
                self.container(out, '[', ']', v.try_iter()?, depth, |out, item| {
                    self.write(out, &item, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, '{', '}', keys.into_iter(), depth, |out, key| {
                    self.string(out, &key.to_string());
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(&key)?, depth + 1)
                })?;
            }
            // Strings, and anything else as its text.
            _ => self.string(out, &v.to_string()),
        }
        Ok(())
    }

    fn container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: impl Iterator<Item = T>,
        depth: usize,
        mut item: impl FnMut(&mut String, T) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        let mut empty = true;
        for (i, x) in items.enumerate() {
            self.guard.check("tojson", out.len())?;
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            item(out, x)?;
            empty = false;
        }
        if !empty {
            self.newline(out, depth);
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python's `datetime.now().strftime(format)` in UTC, for the directives templates use (`%Y %y
/// %m %d %e %B %b %h %A %a %H %I %M %S %p %j %%`); other directives are copied as glibc copies
/// unknown ones.
pub fn strftime(now: SystemTime, format: &str) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(f) = chars.next() else {
            out.push('%');
            break;
        };
        match f {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'm' => out.push_str(&format!("{m:02}")),
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:>2}")),
            'B' => out.push_str(MONTHS[(m - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'H' => out.push_str(&format!("{hh:02}")),
            'I' => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            'M' => out.push_str(&format!("{mm:02}")),
            'S' => out.push_str(&format!("{ss:02}")),
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'j' => out.push_str(&format!("{yday:03}")),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

/// Year, month (1-12) and day of the `days`-th day after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days from 1970-01-01 to the date (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The built-in templates, for models whose files carry none: the formats llama.cpp falls back
/// to, written as Jinja so that they go through the same renderer as a file's own template.
/// Each renders llama.cpp's own output for its format (`llm_chat_apply_template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `<|im_start|>role\n...<|im_end|>\n` (Qwen, SmolLM, many fine-tunes; llama.cpp's default).
    ChatMl,
    /// Llama 2 chat: `[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST]` (llama.cpp's `llama2-sys`).
    Llama2,
    /// Mistral's `[INST]...[/INST]` with control tokens (llama.cpp's `mistral-v3`).
    Mistral,
    /// Llama 3: `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`.
    Llama3,
    /// Gemma: `<start_of_turn>user\n...<end_of_turn>\n`, `model` for the assistant, the system
    /// prompt folded into the first user turn.
    Gemma,
    /// Phi-3: `<|role|>\n...<|end|>\n`.
    Phi3,
}

/// Name, variant and Jinja source of every built-in.
const BUILTINS: &[(&str, Builtin, &str)] = &[
    (
        "chatml",
        Builtin::ChatMl,
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}\
         {%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ),
    (
        "llama2",
        Builtin::Llama2,
        "{{- '[INST] ' }}{%- set ns = namespace(inside=true) %}\
         {%- for m in messages %}\
         {%- if not ns.inside %}{{ '[INST] ' }}{% set ns.inside = true %}{% endif %}\
         {%- if m.role == 'system' %}{{ '<<SYS>>\\n' + m.content + '\\n<</SYS>>\\n\\n' }}\
         {%- elif m.role == 'user' %}{{ m.content + ' [/INST]' }}\
         {%- else %}{{ m.content + eos_token }}{% set ns.inside = false %}{% endif %}\
         {%- endfor %}",
    ),
    (
        "mistral",
        Builtin::Mistral,
        "{%- set ns = namespace(inside=false) %}\
         {%- for m in messages %}\
         {%- if not ns.inside %}{{ '[INST] ' }}{% set ns.inside = true %}{% endif %}\
         {%- if m.role == 'system' %}{{ m.content + '\\n\\n' }}\
         {%- elif m.role == 'user' %}{{ m.content + '[/INST]' }}\
         {%- else %}{{ ' ' + m.content | trim + eos_token }}{% set ns.inside = false %}{% endif %}\
         {%- endfor %}",
    ),
    (
        "llama3",
        Builtin::Llama3,
        "{%- for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}{% endfor %}\
         {%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    ),
    (
        "gemma",
        Builtin::Gemma,
        "{%- set ns = namespace(system='') %}\
         {%- for m in messages %}\
         {%- if m.role == 'system' %}{% set ns.system = ns.system + m.content | trim %}\
         {%- else %}\
         {%- set role = 'model' if m.role == 'assistant' else m.role %}\
         {{- '<start_of_turn>' + role + '\\n' }}\
         {%- if ns.system and role != 'model' %}{{ ns.system + '\\n\\n' }}{% set ns.system = '' %}{% endif %}\
         {{- m.content | trim + '<end_of_turn>\\n' }}\
         {%- endif %}\
         {%- endfor %}\
         {%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    ),
    (
        "phi3",
        Builtin::Phi3,
        "{%- for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{% endfor %}\
         {%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    ),
];

impl Builtin {
    /// Every built-in.
    pub const ALL: [Builtin; 6] = [
        Builtin::ChatMl,
        Builtin::Llama2,
        Builtin::Mistral,
        Builtin::Llama3,
        Builtin::Gemma,
        Builtin::Phi3,
    ];

    fn entry(self) -> &'static (&'static str, Builtin, &'static str) {
        // Every variant has its row (the table test checks it); ChatML's is the first.
        BUILTINS
            .iter()
            .find(|e| e.1 == self)
            .unwrap_or(&BUILTINS[0])
    }

    /// llama.cpp's name for the format.
    pub fn name(self) -> &'static str {
        self.entry().0
    }

    /// The Jinja source.
    pub fn source(self) -> &'static str {
        self.entry().2
    }

    /// The built-in named `name` (llama.cpp's names: chatml, llama2, mistral, llama3, gemma, phi3).
    pub fn from_name(name: &str) -> Option<Builtin> {
        BUILTINS.iter().find(|e| e.0 == name).map(|e| e.1)
    }

    /// The format a model without a template most likely speaks, from its architecture (GGUF
    /// `general.architecture`, or "" when unknown) and the tokens its vocabulary has, and why.
    /// As llama.cpp recognises a template by its marker strings, this looks for the same markers
    /// as tokens; a SentencePiece vocabulary without any is Llama 2's, and anything else gets
    /// ChatML, llama.cpp's default.
    pub fn detect(
        arch: &str,
        has_token: &dyn Fn(&str) -> bool,
        sentencepiece: bool,
    ) -> (Builtin, String) {
        let by_token = [
            ("<start_of_turn>", Builtin::Gemma),
            ("<|start_header_id|>", Builtin::Llama3),
            ("<|im_start|>", Builtin::ChatMl),
            ("[INST]", Builtin::Mistral),
        ];
        if arch.starts_with("gemma") {
            return (Builtin::Gemma, format!("the architecture is {arch}"));
        }
        if arch.starts_with("phi3") || (has_token("<|assistant|>") && has_token("<|end|>")) {
            return (
                Builtin::Phi3,
                "the vocabulary has <|assistant|> and <|end|> (Phi-3)".into(),
            );
        }
        for (token, b) in by_token {
            if has_token(token) {
                return (b, format!("the vocabulary has {token}"));
            }
        }
        if sentencepiece {
            return (
                Builtin::Llama2,
                "a SentencePiece vocabulary without chat tokens (Llama 2 style)".into(),
            );
        }
        (
            Builtin::ChatMl,
            "no chat tokens in the vocabulary (llama.cpp's default)".into(),
        )
    }

    /// [`Builtin::detect`] for a loaded tokenizer.
    pub fn detect_for(arch: &str, tok: &Tokenizer) -> (Builtin, String) {
        Builtin::detect(
            arch,
            &|t: &str| tok.token_id(t).is_some(),
            tok.is_sentencepiece(),
        )
    }
}

/// Prompt ids of a rendered chat: the text with its special tokens parsed, and a BOS put first
/// when the model wants one and the template has not already written it (templates that start
/// with `{{ bos_token }}` would otherwise give two, as llama.cpp also guards against).
pub fn encode_prompt(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let bos = tok.bos.and_then(|b| tok.token_text(b)).unwrap_or_default();
    match text.strip_prefix(bos.as_str()).filter(|_| !bos.is_empty()) {
        Some(rest) if tok.add_bos => tok.encode(rest, true),
        _ => tok.encode(text, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's test conversation (tests/test-chat-template.cpp).
    fn conversation() -> Vec<Message> {
        vec![
            Message::new("system", "You are a helpful assistant"),
            Message::new("user", "Hello"),
            Message::new("assistant", "Hi there"),
            Message::new("user", "Who are you"),
            Message::new("assistant", "   I am an assistant   "),
            Message::new("user", "Another question"),
        ]
    }

    fn args() -> RenderArgs {
        RenderArgs {
            add_generation_prompt: true,
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        }
    }

    fn render(src: &str) -> Result<String> {
        ChatTemplate::new("test", src).render(&conversation(), &args())
    }

    /// Each built-in renders exactly what llama.cpp's hand-written format gives for its test
    /// conversation (the expected strings are llama.cpp's, from its test or its formatter).
    #[test]
    fn builtins_render_llama_cpp_formats() {
        let want = [
            (Builtin::ChatMl, "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n"),
            (Builtin::Llama2, "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]"),
            (Builtin::Mistral, "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INST] Another question[/INST]"),
            (Builtin::Llama3, "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
            (Builtin::Gemma, "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n"),
            (Builtin::Phi3, "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n"),
        ];
        assert_eq!(want.len(), Builtin::ALL.len());
        for (b, want) in want {
            let t = ChatTemplate::builtin(b);
            assert_eq!(t.as_builtin(), Some(b));
            assert_eq!(Builtin::from_name(b.name()), Some(b));
            assert_eq!(t.render(&conversation(), &args()).unwrap(), want, "{b:?}");
        }
        // One row per variant.
        for b in Builtin::ALL {
            assert_eq!(BUILTINS.iter().filter(|e| e.1 == b).count(), 1, "{b:?}");
        }
    }

    #[test]
    fn builtin_detection_by_architecture_and_vocabulary() {
        let vocab = |tokens: &'static [&'static str]| move |t: &str| tokens.contains(&t);
        let cases: [(&str, &[&str], bool, Builtin); 8] = [
            ("gemma2", &["<bos>"], true, Builtin::Gemma),
            (
                "llama",
                &["<start_of_turn>", "<end_of_turn>"],
                true,
                Builtin::Gemma,
            ),
            (
                "llama",
                &["<|start_header_id|>", "<|eot_id|>"],
                false,
                Builtin::Llama3,
            ),
            (
                "qwen2",
                &["<|im_start|>", "<|im_end|>"],
                false,
                Builtin::ChatMl,
            ),
            ("llama", &["[INST]", "[/INST]"], true, Builtin::Mistral),
            ("llama", &["<|assistant|>", "<|end|>"], true, Builtin::Phi3),
            ("llama", &["<s>", "</s>"], true, Builtin::Llama2),
            ("gpt2", &["<|endoftext|>"], false, Builtin::ChatMl),
        ];
        for (arch, tokens, spm, want) in cases {
            let (got, why) = Builtin::detect(arch, &vocab(tokens), spm);
            assert_eq!(got, want, "{arch} {tokens:?}: {why}");
        }
    }

    #[test]
    fn hugging_face_extensions_render() {
        // Python methods, loop controls, strftime_now, generation blocks, HF's context; booleans
        // print as Python's do.
        let src = "{%- for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}\
                   {%- if m.content.startswith('Who') %}{% break %}{% endif %}\
                   {{ m.get('role') }}={{ m.content.replace('e', 'E') }};{% endfor %}\
                   {%- generation %}[{{ '{}-{}'.format(bos_token, eos_token) }}]{%- endgeneration %}\
                   {{ tools is none }} {{ documents is none }} {{ strftime_now('%d %b %Y') }}";
        let t = ChatTemplate::new("test", src)
            .with_now(UNIX_EPOCH + Duration::from_secs(1_722_470_400));
        assert_eq!(
            t.render(&conversation(), &args()).unwrap(),
            "system=You arE a hElpful assistant;user=HEllo;[<s>-</s>]True True 01 Aug 2024"
        );
    }

    #[test]
    fn iterable_and_sequence_tests_are_pythons() {
        let src = "{{ none is iterable }} {{ tools is iterable }} {{ 'ab' is iterable }} \
                   {{ messages is iterable }} {{ 1 is iterable }} {{ 'ab' is sequence }} \
                   {{ {} is sequence }} {{ none is sequence }} {{ nothing is iterable }}";
        assert_eq!(
            render(src).unwrap(),
            "False False True True False True True False True"
        );
    }

    #[test]
    fn strftime_formats_dates_as_python() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        assert_eq!(
            strftime(t, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %% %Q"),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 % %Q"
        );
        assert_eq!(strftime(UNIX_EPOCH, "%B %d, %Y"), "January 01, 1970");
        for days in [-1000, 0, 59, 365, 11_016, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let src = "{{ {'b': [1, 2.5, none, true], 'a': 'é\"<x>\\n'} | tojson }}|\
                   {{ {'b': 1, 'a': 'é'} | tojson(ensure_ascii=True, sort_keys=True) }}|\
                   {{ {'k': [1]} | tojson(indent=2) }}|{{ [] | tojson }}";
        assert_eq!(
            render(src).unwrap(),
            "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"<x>\\n\"}|\
             {\"a\": \"\\u00e9\", \"b\": 1}|\
             {\n  \"k\": [\n    1\n  ]\n}|[]"
        );
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            strip_generation_tags("a{%- generation -%}b{% endgeneration %}{%- if x %}"),
            "a{%- if true -%}b{% endif %}{%- if x %}"
        );
        assert_eq!(
            strip_generation_tags("{% generations %}"),
            "{% generations %}"
        );
    }

    fn failure(r: Result<String>) -> (TemplateFailure, String) {
        match r {
            Err(Error::ChatTemplate {
                origin,
                kind,
                reason,
            }) => {
                assert_eq!(origin, "test");
                (kind, reason)
            }
            other => panic!("expected a chat template error, got {other:?}"),
        }
    }

    #[test]
    fn raise_exception_is_a_typed_error_with_the_templates_message() {
        let (kind, reason) = failure(render("{{ raise_exception('Roles must alternate') }}"));
        assert_eq!(kind, TemplateFailure::Raised);
        assert_eq!(reason, "Roles must alternate");
    }

    #[test]
    fn syntax_and_render_errors_are_typed() {
        let (kind, reason) = failure(render("{% for m in messages %}"));
        assert_eq!(kind, TemplateFailure::Syntax, "{reason}");
        let (kind, reason) = failure(render("{{ messages.nosuchmethod() }}"));
        assert_eq!(kind, TemplateFailure::Render, "{reason}");
        // No loader: a template cannot read other files.
        let (kind, _) = failure(render("{% include '/etc/passwd' %}"));
        assert_eq!(kind, TemplateFailure::Render);
    }

    /// Runaway templates end with a typed error, quickly: endless loops run out of fuel,
    /// unbounded recursion hits the depth limit, huge output and a string rebuilt on every
    /// iteration the render's budget of bytes built and emitted, a join over a lazy sequence of
    /// 10^12 items the value limit.
    #[test]
    fn runaway_templates_hit_limits() {
        let sources = [
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "fuel"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion limit"),
            ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "max_output"),
            (
                "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% for j in range(100000) %}\
                 {% set ns.s = ns.s ~ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' %}\
                 {% endfor %}{% endfor %}",
                "max_output",
            ),
            // join refuses its result once it passes the output limit, long before the deadline
            ("{{ ([1] * 1000000000000) | join }}", "max_output"),
        ];
        let limits = Limits {
            max_output: 1 << 20,
            deadline: Duration::from_secs(2),
            ..Limits::default()
        };
        for (src, why) in sources {
            let start = std::time::Instant::now();
            let r = ChatTemplate::new("test", src)
                .with_limits(limits)
                .render(&conversation(), &args());
            let (kind, reason) = failure(r);
            assert_eq!(kind, TemplateFailure::Limit, "{src}: {reason}");
            assert!(reason.contains(why), "{src}: {reason}");
            assert!(start.elapsed() < Duration::from_secs(3), "{src}");
        }
    }
}
