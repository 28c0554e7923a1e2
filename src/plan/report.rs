//! The text report of a [`MemoryPlan`] (`MemoryPlan::to_table`), and byte formatting shared with
//! the SVG.

use std::fmt::Write;

use super::{MemoryPlan, OVERHEAD_FIXED, OVERHEAD_PERCENT};
use crate::model::config::{Arch, Positions};
use crate::model::params::{self, Precision};

pub(crate) use crate::gpu::ledger::group_digits as group;

/// `6.82 GiB`, `12.5 MiB`, `512 B`: binary units, three significant digits or so.
pub(crate) fn human(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if b >= size {
            let v = b as f64 / size as f64;
            let prec = if v >= 100.0 {
                0
            } else if v >= 10.0 {
                1
            } else {
                2
            };
            return format!("{v:.prec$} {unit}");
        }
    }
    format!("{b} B")
}

fn pct(part: u64, whole: u64) -> String {
    format!("{:.1}%", 100.0 * part as f64 / whole.max(1) as f64)
}

/// The report; see `MemoryPlan::to_table`.
pub(crate) fn table(p: &MemoryPlan) -> String {
    let mut s = String::new();
    let c = &p.cfg;
    let o = &p.options;
    let encoder = c.arch == Arch::Bert;
    let slots = super::kv_slots(c, o);
    let _ = writeln!(
        s,
        "memory plan: {}, {} layers, hidden {}, {} heads / {} kv heads x {}, ffn {}, vocab {}",
        // Gemma 3 runs in the LLaMA family's forward pass, but is not a LLaMA to its user.
        if c.gemma.is_some() {
            "gemma3"
        } else {
            c.arch.name()
        },
        c.n_layers,
        c.hidden_size,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.ffn_size,
        c.vocab_size
    );
    match (&p.described_only, c.arch.runs_with()) {
        (Some(d), _) => writeln!(s, "  {d}"),
        (None, Some(cmd)) => writeln!(s, "  runs here: `{cmd}`"),
        (None, None) => Ok(()),
    }
    .ok();
    if encoder {
        let _ = writeln!(
            s,
            "  weights {}, batch {} sequences x {} tokens ({} rows), no KV cache\n",
            o.precision, o.batch, o.ctx, p.activations.chunk
        );
    } else {
        // A GGUF file's weights are its own types, whatever `--precision` defaults to.
        let weights = if p.weights_from_file {
            let types: Vec<String> = p
                .tensor_types
                .rows
                .iter()
                .map(|r| format!("{} {}", r.ggml_type, r.tensors))
                .collect();
            format!("as in the file ({})", types.join(", "))
        } else {
            o.precision.to_string()
        };
        let _ = writeln!(
            s,
            "  weights {}, KV cache {}, ctx {}, chunk {} ({} logits)",
            weights,
            o.kv,
            o.ctx,
            o.chunk,
            if o.all_logits { "all" } else { "last-token" }
        );
        if slots > 1 {
            let _ = writeln!(
                s,
                "  {slots} sequence slots, a KV cache each ({} B/token/layer); batched decode \
                 steps of up to {} rows ({} dispatches a step at the context's end)",
                group(p.kv_bytes_per_token_layer),
                super::batch_rows(c, o),
                p.dispatches_per_batch_step
            );
        }
        if let (Some(w), true) = (c.sliding_window, p.kv_ring_layers > 0) {
            // What the rings save against a cache of every position in every layer.
            let global = (c.n_layers as u64)
                .saturating_mul(slots)
                .saturating_mul(o.ctx as u64)
                .saturating_mul(p.kv_bytes_per_token_layer);
            let _ = writeln!(
                s,
                "  sliding window {w} on {} of {} layers, each a ring of {} positions: KV cache \
                 {} instead of {} ({:.1}x smaller)",
                p.kv_ring_layers,
                c.n_layers,
                crate::kernels::attention::ring_slots(o.ctx, Some(w), o.chunk),
                human(p.kv_cache_bytes),
                human(global),
                global as f64 / p.kv_cache_bytes.max(1) as f64
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "{:<34} {:>17} {:>10} {:>7}",
        "class", "bytes", "", "share"
    );
    let detail = |name: &str| -> String {
        match name {
            "kv cache" if encoder => "kv cache (none: an encoder)".to_string(),
            "kv cache" if slots > 1 => format!("kv cache for {slots} slots"),
            "kv cache" => format!(
                "kv cache ({} B/token/layer)",
                group(p.kv_bytes_per_token_layer)
            ),
            "overhead" => format!("overhead ({OVERHEAD_PERCENT}% + {})", human(OVERHEAD_FIXED)),
            "kernel params" => format!("kernel params ({} disp.)", p.dispatches_per_chunk),
            n => n.to_string(),
        }
    };
    for (name, bytes) in p.classes() {
        let _ = writeln!(
            s,
            "{:<34} {:>17} {:>10} {:>7}",
            detail(name),
            group(bytes),
            human(bytes),
            pct(bytes, p.total_bytes)
        );
    }
    let _ = writeln!(
        s,
        "{:<34} {:>17} {:>10}",
        "total",
        group(p.total_bytes),
        human(p.total_bytes)
    );
    match o.budget {
        Some(b) => {
            let mut verdict = if p.fits() {
                format!("fits: yes ({} to spare)", human(b - p.total_bytes))
            } else {
                format!("fits: NO ({} over)", human(p.total_bytes - b))
            };
            if !p.runs_here {
                verdict.push_str(" [described only]");
            }
            let _ = writeln!(
                s,
                "{:<34} {:>17} {:>10}   {verdict}",
                "budget",
                group(b),
                human(b)
            );
        }
        None => {
            let _ = writeln!(s, "budget: none given");
        }
    }
    for w in &p.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    for n in &p.notes {
        let _ = writeln!(s, "note: {n}");
    }

    let a = &p.activations;
    let sized_for = if encoder {
        format!("batch {} x {} tokens, {} rows", o.batch, o.ctx, a.chunk)
    } else {
        format!("chunk {}", a.chunk)
    };
    let _ = writeln!(
        s,
        "\nactivation buffers ({sized_for}): {} buffers, {} shared vs {} one per role",
        a.buffers.len(),
        human(a.total_bytes),
        human(a.unshared_bytes)
    );
    for b in &a.buffers {
        let _ = writeln!(s, "  {:<32} {:>17}", b.label, group(b.bytes));
    }

    if let Some(sg) = p.suggestions() {
        let _ = writeln!(s, "\nto fit the budget:");
        if encoder {
            match sg.largest_batch {
                Some(b) => writeln!(s, "  - largest batch of {}-token sequences: {b}", o.ctx),
                None => writeln!(s, "  - no smaller batch fits at {} tokens", o.ctx),
            }
            .ok();
            match sg.longest_seq {
                Some(n) => writeln!(s, "  - longest sequence at batch {}: {n} tokens", o.batch),
                None => writeln!(s, "  - no shorter sequence fits at batch {}", o.batch),
            }
            .ok();
        } else {
            match sg.longest_ctx {
                Some(ctx) => writeln!(s, "  - longest ctx with the {} KV cache: {ctx}", o.kv),
                None => writeln!(s, "  - no ctx fits with the {} KV cache", o.kv),
            }
            .ok();
        }
        for k in &sg.kv_alternatives {
            let _ = writeln!(
                s,
                "  - {} KV cache at ctx {}: {} ({})",
                k.name,
                o.ctx,
                human(k.total_bytes),
                if k.fits { "fits" } else { "does not fit" }
            );
        }
        match &sg.highest_precision {
            Some(h) => writeln!(
                s,
                "  - highest weight precision that fits: {} ({})",
                h.name,
                human(h.total_bytes)
            ),
            None if encoder => writeln!(s, "  - no weight precision fits at this batch"),
            None => writeln!(s, "  - no weight precision fits at this ctx and KV cache"),
        }
        .ok();
        match &sg.streaming {
            _ if c.arch != Arch::Llama => {
                writeln!(s, "  - streaming layers: only the LLaMA pass streams them")
            }
            Some(st) => writeln!(
                s,
                "  - stream {} of {} layers ({} resident + {} for 2 streaming slots): {}",
                st.streamed_layers,
                c.n_layers,
                st.resident_layers,
                human(st.slot_bytes),
                human(st.total_bytes)
            ),
            None => writeln!(s, "  - streaming layers does not fit either"),
        }
        .ok();
    }

    if let Some(t) = &p.train {
        let _ = writeln!(
            s,
            "\nfine-tuning instead (Adam, batch {}, seq {}):",
            t.batch, t.seq
        );
        let rows = [
            ("weights f32", t.weights_bytes),
            ("gradients f32", t.gradients_bytes),
            ("Adam m and v f32", t.adam_bytes),
            ("activations for backward", t.activation_bytes),
            ("overhead", t.overhead_bytes),
            ("total", t.total_bytes),
        ];
        for (name, b) in rows {
            let _ = writeln!(s, "  {:<32} {:>17} {:>10}", name, group(b), human(b));
        }
        let _ = writeln!(
            s,
            "  (per layer s*b*h*(34 + 5*a*s/h) = {} bytes, Korthikanti et al. 2022; logits {})",
            group(t.activation_bytes_per_layer),
            group(t.logits_bytes)
        );
        if let Some(f) = p.train_fits() {
            let _ = writeln!(
                s,
                "  fits the budget: {} ({:.1}x the inference plan)",
                if f { "yes" } else { "NO" },
                t.total_bytes as f64 / p.total_bytes.max(1) as f64
            );
        }
    }

    let count = params::count(c);
    let tb = params::textbook_estimate(c);
    let positions = if c.positions == Positions::Learned {
        " + P*d"
    } else {
        ""
    };
    let _ = writeln!(
        s,
        "\nparameters: {} exact vs {} by the textbook 12*L*d^2 + V*d{positions} ({:+.2}%)",
        group(count.total),
        group(tb),
        100.0 * params::textbook_relative_diff(c)
    );
    let _ = writeln!(
        s,
        "\n{:<10} {:>17} {:>24} {:>12} {:>17}",
        "precision", "exact bytes", "naive bytes", "exact/naive", "GGUF file bytes"
    );
    // The K-quant mixes' exact bytes are what wgllm uploads their types as; the file column is
    // what llama.cpp's file of that name holds. Only LLaMA-family models are planned at a mix.
    let mixes = Precision::K_MIXES
        .into_iter()
        .filter(|_| c.arch == crate::model::config::Arch::Llama);
    for pr in Precision::ALL.into_iter().chain(mixes) {
        let w = params::weight_bytes(c, pr);
        let (num, den) = pr.naive_rate();
        let rate = if den == 1 {
            num.to_string()
        } else {
            format!("{num}/{den}")
        };
        let _ = writeln!(
            s,
            "{:<10} {:>17} {:>24} {:>12} {:>17}",
            pr.name(),
            group(w.exact_bytes),
            format!("{} ({rate} B)", group(w.naive_bytes)),
            format!("{:.4}", w.ratio()),
            group(w.file_bytes)
        );
    }
    s
}
