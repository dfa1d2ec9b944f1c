//! Builds the eBPF programs (`gatekeeper-ebpf`) with the nightly toolchain
//! and bpf-linker (`cargo xtask setup` installs both) and copies the object
//! to `$OUT_DIR/gatekeeper`, which src/lib.rs embeds.
//!
//! This is what `aya_build::build_ebpf` (aya-build 0.2.0) does, with two
//! differences:
//! - Quiet on success. aya-build turns every line of the nested build's log
//!   into a `cargo:warning=`, which cargo prints on every build of this crate
//!   (and replays even when nothing is rebuilt). Here the log goes to this
//!   script's stderr, which cargo keeps to itself unless the script fails
//!   (then it shows all of it under `--- stderr`) or runs with `-vv`.
//! - `--locked`: the nested build must use the workspace's Cargo.lock as it
//!   is (the outer cargo has already resolved gatekeeper-ebpf, a workspace
//!   member, into it) and fails rather than rewrite it. `core` and
//!   `compiler_builtins` (`-Z build-std=core`) come from the nightly's
//!   rust-src and its own lock file.
use std::{
    env, fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _};
use cargo_metadata::{Artifact, Message};

/// The eBPF package, and its binary target (the object src/lib.rs embeds).
const PACKAGE: &str = "gatekeeper-ebpf";
const OBJECT: &str = "gatekeeper";
/// The toolchain for the eBPF build (`rustup run nightly cargo ...`).
const TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == PACKAGE)
        .ok_or_else(|| anyhow!("{PACKAGE} package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent"))?;
    // The build-dependency on gatekeeper-ebpf reruns this script when its
    // library target or dependencies change; this covers its binary target.
    println!("cargo:rerun-if-changed={root_dir}");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported target endian {other:?}"),
    };
    // aya-ebpf reads `bpf_target_arch` to pick the kernel's struct layouts.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let arch = if arch.starts_with("riscv64") { "riscv64" } else { arch.as_str() };

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--package", PACKAGE, "--bins", "--release"])
        .args(["--target", target, "-Z", "build-std=core", "--locked"])
        // Diagnostics rendered as text on stderr (the log); stdout carries
        // only JSON messages, read below for the built executable's path.
        .arg("--message-format=json-render-diagnostics")
        // Not our own target dir: that one is locked by the cargo running
        // this script (rust-lang/cargo#6412).
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // Set by the outer cargo for the host toolchain; let rustup pick nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot run {cmd:?}: the eBPF build needs rustup and its {TOOLCHAIN} toolchain (see `cargo xtask setup`)"
        )
    })?;

    let mut object = None;
    let stdout = child.stdout.take().expect("stdout is piped");
    for message in Message::parse_stream(std::io::BufReader::new(stdout)) {
        match message.context("reading the eBPF build's JSON messages")? {
            Message::CompilerArtifact(Artifact { target, executable: Some(exe), .. })
                if target.name.as_str() == OBJECT =>
            {
                object = Some(exe.into_std_path_buf());
            }
            // Whatever is not JSON belongs in the log.
            Message::TextLine(line) => eprintln!("{line}"),
            _ => {}
        }
    }
    let status = child.wait().with_context(|| format!("waiting for {cmd:?}"))?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}); the build's log is above.\ncommand: {cmd:?}");
    }

    let object = object.ok_or_else(|| anyhow!("the eBPF build produced no `{OBJECT}` executable"))?;
    let dst = out_dir.join(OBJECT);
    fs::copy(&object, &dst).with_context(|| format!("copy {} to {}", object.display(), dst.display()))?;
    Ok(())
}
