//! The VRAM ledger: the only way wgllm creates GPU buffers.
//!
//! Every buffer carries a [`BufferClass`] and a label. The ledger refuses a request that would take
//! the total over the byte budget *before* asking the driver for anything, and keeps current and
//! peak bytes per class so that planned and measured memory can be compared (`wgllm profile`).
//! Buffers give their bytes back when the last handle to them is dropped.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::error::{Error, Result};

/// What a buffer holds. The classes are the rows of every memory report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum BufferClass {
    /// Model weights (and their block scales).
    Parameters,
    /// Keys and values kept across tokens.
    KvCache,
    /// Intermediate results of the forward pass, and kernel parameter blocks.
    Activations,
    /// Upload and readback buffers (host-visible).
    Staging,
}

impl BufferClass {
    pub const ALL: [BufferClass; 4] = [
        BufferClass::Parameters,
        BufferClass::KvCache,
        BufferClass::Activations,
        BufferClass::Staging,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BufferClass::Parameters => "parameters",
            BufferClass::KvCache => "kv-cache",
            BufferClass::Activations => "activations",
            BufferClass::Staging => "staging",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for BufferClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes per class at one moment, as carried in the budget error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassUsage {
    pub parameters: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub staging: u64,
}

impl ClassUsage {
    fn from_array(a: [u64; 4]) -> Self {
        ClassUsage {
            parameters: a[0],
            kv_cache: a[1],
            activations: a[2],
            staging: a[3],
        }
    }
    pub fn get(&self, class: BufferClass) -> u64 {
        match class {
            BufferClass::Parameters => self.parameters,
            BufferClass::KvCache => self.kv_cache,
            BufferClass::Activations => self.activations,
            BufferClass::Staging => self.staging,
        }
    }
    pub fn total(&self) -> u64 {
        self.parameters + self.kv_cache + self.activations + self.staging
    }
}

impl fmt::Display for ClassUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "parameters {}, kv-cache {}, activations {}, staging {}",
            self.parameters, self.kv_cache, self.activations, self.staging
        )
    }
}

/// The ledger's accounting, independent of any GPU so it can be tested and reasoned about alone.
#[derive(Debug, Default)]
struct Books {
    budget: Option<u64>,
    current: [u64; 4],
    peak: [u64; 4],
    peak_total: u64,
    count: [u64; 4],
}

impl Books {
    fn total(&self) -> u64 {
        self.current.iter().sum()
    }

    fn reserve(&mut self, label: &str, class: BufferClass, size: u64) -> Result<()> {
        let in_use = self.total();
        if let Some(budget) = self.budget {
            if in_use.saturating_add(size) > budget {
                return Err(Error::VramBudget {
                    label: label.to_string(),
                    class,
                    requested: size,
                    in_use,
                    budget,
                    over: in_use + size - budget,
                    usage: ClassUsage::from_array(self.current),
                });
            }
        }
        let i = class.index();
        self.current[i] += size;
        self.count[i] += 1;
        self.peak[i] = self.peak[i].max(self.current[i]);
        self.peak_total = self.peak_total.max(self.total());
        Ok(())
    }

    fn release(&mut self, class: BufferClass, size: u64) {
        let i = class.index();
        self.current[i] = self.current[i].saturating_sub(size);
        self.count[i] = self.count[i].saturating_sub(1);
    }
}

/// One row of the ledger report.
#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub class: BufferClass,
    pub buffers: u64,
    pub current_bytes: u64,
    pub peak_bytes: u64,
}

/// What the ledger holds now and has held at most.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerReport {
    pub budget_bytes: Option<u64>,
    pub classes: Vec<ClassReport>,
    pub current_total_bytes: u64,
    /// The highest total ever in use at one time (not the sum of per-class peaks).
    pub peak_total_bytes: u64,
}

impl LedgerReport {
    pub fn class(&self, class: BufferClass) -> &ClassReport {
        &self.classes[class.index()]
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A fixed-width table, one row per class.
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "{:<12} {:>8} {:>14} {:>14}\n",
            "class", "buffers", "current", "peak"
        );
        for c in &self.classes {
            s += &format!(
                "{:<12} {:>8} {:>14} {:>14}\n",
                c.class.name(),
                c.buffers,
                human_bytes(c.current_bytes),
                human_bytes(c.peak_bytes)
            );
        }
        s += &format!(
            "{:<12} {:>8} {:>14} {:>14}\n",
            "total",
            self.classes.iter().map(|c| c.buffers).sum::<u64>(),
            human_bytes(self.current_total_bytes),
            human_bytes(self.peak_total_bytes)
        );
        match self.budget_bytes {
            Some(b) => s += &format!("budget {}\n", human_bytes(b)),
            None => s += "budget unlimited\n",
        }
        s
    }
}

/// `1,234,567`: thousands separated by commas, for byte and parameter counts.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Formats a byte count with a binary unit (`1.50 GiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses `12GiB`, `512 MiB`, `1.5G`, `1000000` (bytes). `G`/`GB` are read as binary units too,
/// since that is what people mean when they talk about a 12 GB card.
pub fn parse_bytes(input: &str) -> Result<u64> {
    let err = |reason: &str| Error::Parse {
        what: "a byte size",
        input: input.to_string(),
        reason: reason.into(),
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| err("expected a number such as 12GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err("unknown unit (use B, KiB, MiB, GiB or TiB)")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err("out of range"));
    }
    Ok(bytes.round() as u64)
}

/// The shared ledger. Cloning gives another handle to the same books.
#[derive(Clone, Default)]
pub struct Ledger {
    books: Arc<Mutex<Books>>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("report", &self.report())
            .finish()
    }
}

impl Ledger {
    pub fn new(budget: Option<u64>) -> Self {
        let ledger = Ledger::default();
        ledger.lock().budget = budget;
        ledger
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        // A poisoned lock only means another thread panicked mid-update of plain integers.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn budget(&self) -> Option<u64> {
        self.lock().budget
    }

    pub fn set_budget(&self, budget: Option<u64>) {
        self.lock().budget = budget;
    }

    /// Books `size` bytes of `class`, or refuses with [`Error::VramBudget`]. The returned
    /// reservation gives the bytes back when dropped.
    pub fn reserve(&self, label: &str, class: BufferClass, size: u64) -> Result<Reservation> {
        self.lock().reserve(label, class, size)?;
        Ok(Reservation {
            ledger: self.clone(),
            class,
            size,
        })
    }

    pub fn report(&self) -> LedgerReport {
        let b = self.lock();
        LedgerReport {
            budget_bytes: b.budget,
            classes: BufferClass::ALL
                .iter()
                .map(|&c| ClassReport {
                    class: c,
                    buffers: b.count[c.index()],
                    current_bytes: b.current[c.index()],
                    peak_bytes: b.peak[c.index()],
                })
                .collect(),
            current_total_bytes: b.total(),
            peak_total_bytes: b.peak_total,
        }
    }

    /// Forgets the peaks (current bytes stay), e.g. between the load and the run of a model.
    pub fn reset_peaks(&self) {
        let mut b = self.lock();
        b.peak = b.current;
        b.peak_total = b.total();
    }
}

/// Bytes booked in the ledger; released on drop.
#[derive(Debug)]
pub struct Reservation {
    ledger: Ledger,
    class: BufferClass,
    size: u64,
}

impl Reservation {
    pub fn class(&self) -> BufferClass {
        self.class
    }
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.lock().release(self.class, self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_budget_with_details() {
        let l = Ledger::new(Some(1000));
        let _a = l.reserve("w", BufferClass::Parameters, 600).unwrap();
        let _b = l.reserve("kv", BufferClass::KvCache, 300).unwrap();
        let e = l.reserve("act", BufferClass::Activations, 200).unwrap_err();
        match e {
            Error::VramBudget {
                requested,
                in_use,
                budget,
                over,
                usage,
                class,
                ..
            } => {
                assert_eq!((requested, in_use, budget, over), (200, 900, 1000, 100));
                assert_eq!(class, BufferClass::Activations);
                assert_eq!(usage.parameters, 600);
                assert_eq!(usage.kv_cache, 300);
            }
            other => panic!("wrong error {other}"),
        }
        // A refused request books nothing.
        assert_eq!(l.report().current_total_bytes, 900);
    }

    #[test]
    fn tracks_current_and_peak() {
        let l = Ledger::new(None);
        let a = l.reserve("a", BufferClass::Activations, 100).unwrap();
        let b = l.reserve("b", BufferClass::Activations, 50).unwrap();
        drop(a);
        let r = l.report();
        assert_eq!(r.class(BufferClass::Activations).current_bytes, 50);
        assert_eq!(r.class(BufferClass::Activations).peak_bytes, 150);
        assert_eq!(r.peak_total_bytes, 150);
        drop(b);
        assert_eq!(l.report().current_total_bytes, 0);
        assert!(l.report().to_table().contains("activations"));
        assert!(l.report().to_json().contains("\"peak_total_bytes\": 150"));
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("12GiB").unwrap(), 12 << 30);
        assert_eq!(parse_bytes("12 GB").unwrap(), 12 << 30);
        assert_eq!(parse_bytes("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("").is_err());
    }
}
