//! Small helpers shared by the xtask subcommands: paths, tool lookup and
//! running child processes with readable errors.

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    // HOME unset (some CI runners): ask the password database.
    // SAFETY: getpwuid returns a pointer into static storage or NULL; we copy
    // the string out immediately and this program is single-threaded here.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_dir.is_null() {
            let dir = std::ffi::CStr::from_ptr((*pw).pw_dir);
            return PathBuf::from(OsStr::from_bytes(dir.to_bytes()));
        }
    }
    PathBuf::from("/root")
}

/// `$CARGO_HOME`, defaulting to `~/.cargo` like cargo and rustup do.
pub fn cargo_home() -> PathBuf {
    match std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h),
        None => home_dir().join(".cargo"),
    }
}

/// A rustup-managed tool: prefer the proxy in `$CARGO_HOME/bin` (so that
/// `+nightly` works even if PATH points at a toolchain directory), else PATH.
pub fn rustup_tool(name: &str) -> PathBuf {
    let p = cargo_home().join("bin").join(name);
    if p.is_file() {
        p
    } else {
        PathBuf::from(name)
    }
}

/// PATH with `$CARGO_HOME/bin` in front (bpf-linker is installed there and
/// rustc finds it through PATH when building the eBPF crate).
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let bin = cargo_home().join("bin");
    let old = std::env::var_os("PATH").unwrap_or_default();
    let mut parts: Vec<PathBuf> = vec![bin.clone()];
    parts.extend(std::env::split_paths(&old).filter(|p| p != &bin));
    std::env::join_paths(parts).unwrap_or(old)
}

/// A `cargo` command for nested builds: rustup's proxy, run at the workspace
/// root, with the variables `cargo run` set for xtask itself removed so they
/// don't leak into the nested build, and never letting rustup install a
/// toolchain behind our back.
pub fn cargo() -> Command {
    let mut cmd = Command::new(rustup_tool("cargo"));
    cmd.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run with inherited stdout/stderr (stdin closed); error on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.stdin(Stdio::null()).status().with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// Run capturing stdout; error (with stderr) on non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}\n{}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Print one setup-step line, `name: ok` or `name: installed (detail)`.
pub fn step(name: &str, result: &str) {
    println!("setup: {name:<12} {result}");
}
