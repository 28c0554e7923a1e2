//! A private `XDG_RUNTIME_DIR` for processes started without one (ssh sessions, containers, CI).
//!
//! Mesa's Vulkan and GL drivers look there for their shader cache sockets and print "XDG_RUNTIME_DIR
//! is invalid or not set in the environment" twice on every start when it is missing. The XDG spec
//! asks for a directory owned by the user with mode 0700; one under the system temp directory is
//! used only after checking exactly that, since another user could have created the name first.

use std::path::PathBuf;

/// A directory fit to be `XDG_RUNTIME_DIR`: `$TMPDIR/wgllm-runtime-<uid>`, created with mode 0700
/// if absent; `None` where it cannot be made safe (it exists but is a link, someone else's, or
/// open to others), in which case the variable is better left unset.
#[cfg(unix)]
pub fn private_runtime_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // The owner of /proc/self is this process's effective user (no libc call needed).
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let dir = std::env::temp_dir().join(format!("wgllm-runtime-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    // symlink_metadata: a link planted under that name is refused, not followed.
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0;
    private.then_some(dir)
}

/// Elsewhere the drivers that warn do not run.
#[cfg(not(unix))]
pub fn private_runtime_dir() -> Option<PathBuf> {
    None
}
