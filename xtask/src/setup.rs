//! `cargo xtask setup`: install what a fresh Debian 12 machine lacks to build
//! and test gatekeeper. Idempotent; when everything is present it only runs a
//! few quick checks (well under 2 s) and prints `ok` per step.
//!
//! | step       | detected by                                                  | installed by |
//! |------------|--------------------------------------------------------------|--------------|
//! | rust-src   | `$(rustc +nightly --print sysroot)/lib/rustlib/src/rust/library` is a dir | `rustup component add rust-src --toolchain nightly` |
//! | bpf-linker | `bpf-linker --version` (PATH, then `$CARGO_HOME/bin`) runs and says 0.13.0 | `cargo +nightly install bpf-linker@0.13.0 --locked --force --no-default-features --features llvm-NN` against the nightly's own libLLVM (see [`bpf_linker`]) |
//! | apt        | `dpkg-query -W -f='${Package} ${Status}'` says `install ok installed` for each of [`APT_PACKAGES`] | `apt-get update` + `apt-get install -y --no-install-recommends` of the missing ones only, non-interactive (`DEBIAN_FRONTEND=noninteractive`, debconf answers preseeded: [`DEBCONF_PRESEED`]), with no daemon started (a temporary `policy-rc.d`) |
//! | bpffs      | `/proc/self/mountinfo` has a `bpf` mount at `/sys/fs/bpf`    | `mount -t bpf bpf /sys/fs/bpf` |
//!
//! Postfix is installed only as a program for the tests (`tests/src/mta.rs`
//! runs private instances with their own config and queue directories inside
//! test namespaces): its debconf question is preseeded to `No configuration`,
//! so the package writes no `/etc/postfix/main.cf`, and its postinst's
//! `invoke-rc.d postfix start` is refused by the temporary `policy-rc.d`
//! (exit 101, which invoke-rc.d reports to the postinst as success), so no
//! system mail server ever starts. Dovecot is the same: a program for the
//! tests' private instances (`dovecot -c DIR/dovecot.conf`); its postinst's
//! start is refused the same way, and it installs non-interactively.
//!
//! Toolchains are never installed or updated here (and `RUSTUP_AUTO_INSTALL=0`
//! is forced on every rustup-proxied call): stable and `nightly` must exist.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, cargo_home, output, run, rustup_tool, step};

/// Debian packages the tests, the lab and the benchmarks use.
/// `gcc`/`libc6-dev` are the host C toolchain (linker for every Rust build,
/// rusqlite's bundled SQLite); `util-linux` provides `nsenter`; `postfix`
/// and `swaks` are the real MTA and SMTP client of the mail tests, and
/// `libio-socket-inet6-perl` is what swaks needs for IPv6 (a Recommends,
/// which `--no-install-recommends` would leave out); `systemd-journal-remote`
/// writes the real journal the journal source tests follow
/// (`tests/src/journal.rs`; it also upgrades the systemd packages to its own
/// version, harmless without systemd as PID 1); `dovecot-imapd` and
/// `dovecot-pop3d` (with `dovecot-core`) are the real IMAP/POP3 server and
/// Postfix's SASL server of the log tests (`tests/src/dovecot.rs`); `fail2ban`
/// is the peer of `cargo xtask bench logs` (its service is never started).
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "hping3",
    "tcpdump",
    "swaks",
    "python3-scapy",
    "xdp-tools",
    "nsd",
    "nftables",
    "procps",
    "util-linux",
    "gcc",
    "libc6-dev",
    "postfix",
    "libio-socket-inet6-perl",
    "systemd-journal-remote",
    // The peer of `cargo xtask bench logs` (fail2ban-regex); never started.
    "fail2ban",
    "dovecot-imapd",
    "dovecot-pop3d",
];

/// debconf answers set (`debconf-set-selections`) before a package of the
/// first column is installed, so its postinst asks nothing and configures
/// nothing: Postfix as `No configuration` (no /etc/postfix/main.cf, no system
/// instance; the tests bring their own config).
pub const DEBCONF_PRESEED: &[(&str, &str)] = &[("postfix", "postfix postfix/main_mailer_type select No configuration")];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13.0 has `llvm-NN` features for.
const BPF_LINKER_LLVM_FEATURES: &[u32] = &[21, 22, 23];
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> Result<()> {
    if !util::is_root() {
        bail!(
            "`cargo xtask setup` must run as root: it installs Debian packages, mounts bpffs \
             and the tests create network namespaces and load XDP programs \
             (try `sudo -E env PATH=$PATH cargo xtask setup`)"
        );
    }
    rust_src()?;
    bpf_linker()?;
    apt()?;
    bpffs()?;
    Ok(())
}

fn rustup() -> Command {
    let mut cmd = Command::new(rustup_tool("rustup"));
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

/// `rustc +nightly --print sysroot`, failing clearly if there is no nightly.
pub fn nightly_sysroot() -> Result<PathBuf> {
    let mut cmd = Command::new(rustup_tool("rustc"));
    cmd.args(["+nightly", "--print", "sysroot"]).env("RUSTUP_AUTO_INSTALL", "0");
    let out = output(&mut cmd).context(
        "the `nightly` Rust toolchain is not usable; it must be installed beforehand \
         (`rustup toolchain install nightly`): xtask never installs or updates toolchains",
    )?;
    let sysroot = PathBuf::from(out.trim());
    if !sysroot.is_dir() {
        bail!("`rustc +nightly --print sysroot` printed {sysroot:?}, which is not a directory");
    }
    Ok(sysroot)
}

fn rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let src = sysroot.join("lib/rustlib/src/rust/library");
    if src.is_dir() {
        step("rust-src", "ok");
        return Ok(());
    }
    run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    if !src.is_dir() {
        bail!("rust-src was added but {} does not exist", src.display());
    }
    step("rust-src", "installed (nightly)");
    Ok(())
}

/// `bpf-linker --version`'s first line if some bpf-linker runs (PATH first,
/// then `$CARGO_HOME/bin`).
fn bpf_linker_version() -> Option<(PathBuf, String)> {
    let candidates = [PathBuf::from("bpf-linker"), cargo_home().join("bin/bpf-linker")];
    for bin in candidates {
        let Ok(out) = Command::new(&bin).arg("--version").stdin(std::process::Stdio::null()).output() else {
            continue;
        };
        if out.status.success() {
            let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_owned();
            return Some((bin, line));
        }
    }
    None
}

fn is_wanted_version(line: &str) -> bool {
    line.split_whitespace().any(|w| w == BPF_LINKER_VERSION)
}

/// The nightly's real `libLLVM.so.<ver>-rust-...` (not the tiny
/// `libLLVM-NN-rust-*.so` linker script beside it) and its LLVM major.
fn nightly_libllvm(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let libdir = sysroot.join("lib");
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(&libdir).with_context(|| format!("read {}", libdir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("libLLVM.so.") {
            continue;
        }
        let meta = fs::metadata(entry.path())?;
        if !meta.is_file() || meta.len() < (1 << 20) {
            continue;
        }
        if best.as_ref().is_none_or(|(len, _)| meta.len() > *len) {
            best = Some((meta.len(), entry.path()));
        }
    }
    let Some((_, path)) = best else {
        bail!("no libLLVM.so.* in {} (the nightly toolchain ships it; is it a complete install?)", libdir.display());
    };
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let major: u32 = name["libLLVM.so.".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {name}"))?;
    Ok((path, major))
}

/// Make `link` a symlink to `target`, replacing whatever is there.
fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if let Ok(cur) = fs::read_link(link) {
        if cur == target {
            return Ok(());
        }
    }
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", link.display())),
    }
    symlink(target, link).with_context(|| format!("symlink {} -> {}", link.display(), target.display()))
}

/// bpf-linker 0.13.0, dynamically linked against the nightly's own libLLVM.
///
/// A persistent prefix `$CARGO_HOME/gatekeeper-llvm/lib` gets `libLLVM.so`
/// and `libLLVM.so.<ver>-rust-<nightly>` symlinks to the nightly's libLLVM;
/// `LLVM_PREFIX` points bpf-linker's build there, and the installed binary
/// keeps that directory as its RUNPATH, so the prefix must stay.
fn bpf_linker() -> Result<()> {
    if let Some((bin, line)) = bpf_linker_version() {
        if is_wanted_version(&line) {
            let note = if bin.is_absolute() { format!(" ({}, not on PATH)", bin.display()) } else { String::new() };
            step("bpf-linker", &format!("ok ({line}){note}"));
            return Ok(());
        }
    }
    let sysroot = nightly_sysroot()?;
    let (libllvm, major) = nightly_libllvm(&sysroot)?;
    if !BPF_LINKER_LLVM_FEATURES.contains(&major) {
        bail!(
            "the nightly's LLVM is {major} but bpf-linker {BPF_LINKER_VERSION} supports only LLVM {:?}",
            BPF_LINKER_LLVM_FEATURES
        );
    }
    let prefix = cargo_home().join("gatekeeper-llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    ensure_symlink(&lib.join("libLLVM.so"), &libllvm)?;
    ensure_symlink(&lib.join(libllvm.file_name().unwrap()), &libllvm)?;

    let feature = format!("llvm-{major}");
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} ({feature}, LLVM_PREFIX={}); this takes about a minute",
        prefix.display()
    );
    let mut cmd = util::cargo();
    // Outside the workspace so its .cargo/config.toml plays no part.
    cmd.current_dir(cargo_home())
        .args(["+nightly", "install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
        .args(["--locked", "--force", "--no-default-features", "--features", &feature])
        .env("LLVM_PREFIX", &prefix);
    run(&mut cmd)?;
    match bpf_linker_version() {
        Some((_, line)) if is_wanted_version(&line) => {
            step("bpf-linker", &format!("installed ({line}, {feature})"));
            Ok(())
        }
        Some((bin, line)) => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but `{} --version` says {line:?} \
             (another bpf-linker earlier on PATH?)",
            bin.display()
        ),
        None => bail!("installed bpf-linker {BPF_LINKER_VERSION}, but it does not run"),
    }
}

/// Packages of [`APT_PACKAGES`] that dpkg does not report as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when some package is unknown; its stdout still lists
    // the known ones, so read that rather than the exit code.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(APT_PACKAGES)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run dpkg-query (this setup supports Debian/Ubuntu only)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(APT_PACKAGES.iter().copied().filter(|p| !installed.contains(p)).collect())
}

/// Keeps Debian maintainer scripts from starting daemons (nsd would otherwise
/// start on the host) while we install: a temporary `/usr/sbin/policy-rc.d`
/// answering 101 ("action forbidden"), removed on drop. An existing one is
/// left alone.
struct NoDaemonStart(Option<PathBuf>);

impl NoDaemonStart {
    fn new() -> Self {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Self(None);
        }
        let ok = fs::write(&path, "#!/bin/sh\n# temporary, from cargo xtask setup\nexit 101\n").is_ok()
            && fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).is_ok();
        Self(ok.then_some(path))
    }
}

impl Drop for NoDaemonStart {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn apt() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        step("apt", "ok");
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    preseed(&missing)?;
    let _guard = NoDaemonStart::new();
    let apt_get = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").env("NEEDRESTART_MODE", "a");
        c
    };
    run(apt_get().args(["-q", "update"]))?;
    run(apt_get().args(["-q", "install", "-y", "--no-install-recommends"]).args(&missing))?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("apt-get install finished but these are still not installed: {}", still.join(" "));
    }
    step("apt", &format!("installed ({})", missing.join(" ")));
    Ok(())
}

/// Feeds the [`DEBCONF_PRESEED`] answers of the packages about to be
/// installed to `debconf-set-selections`. Only for missing packages: an
/// installed Postfix keeps whatever its administrator answered.
fn preseed(missing: &[&str]) -> Result<()> {
    let lines: String =
        DEBCONF_PRESEED.iter().filter(|(pkg, _)| missing.contains(pkg)).map(|(_, line)| format!("{line}\n")).collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("debconf-set-selections")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run debconf-set-selections (package debconf)")?;
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(lines.as_bytes()));
    let status = child.wait().context("wait for debconf-set-selections")?;
    if let Some(Err(e)) = written {
        return Err(e).context("write the preseed answers to debconf-set-selections");
    }
    if !status.success() {
        bail!("debconf-set-selections failed ({status}) on:\n{lines}");
    }
    Ok(())
}

/// Is a bpf filesystem mounted at `/sys/fs/bpf`?
pub fn bpffs_mounted() -> Result<bool> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(mountinfo.lines().any(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        left.split(' ').nth(4) == Some(BPFFS) && right.split(' ').next() == Some("bpf")
    }))
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        step("bpffs", "ok");
        return Ok(());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("create {BPFFS}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted()? {
        bail!("mounted bpffs at {BPFFS} but /proc/self/mountinfo does not show it");
    }
    step("bpffs", &format!("installed (mounted bpf at {BPFFS})"));
    Ok(())
}
