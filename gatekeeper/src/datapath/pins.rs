//! The pin directory: bpffs, its layout (maps, programs, links), the
//! agent's lock on it, and unloading (detaching every link, removing every
//! pin, also those an older gatekeeper left).
//!
//! Layout under the pin directory (default `/sys/fs/bpf/gatekeeper`):
//! `maps/<MAP>`, `prog_ingress`, `prog_subscriber`, `prog_egress`, and
//! `links/<mode>@<ifname>`: `native@`/`skb@` for the ingress gate,
//! `sub-native@`/`sub-skb@` for subscriber-facing XDP, `tcx@` for uplink
//! TC links, and an empty `clsact@` directory marking a netlink (clsact)
//! filter on kernels without tcx. Links and maps stay pinned when the agent
//! exits, so enforcement never stops with it.
use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{tc, TcAttachType, XdpMode};
use gatekeeper_common::{maps as names, programs};
use tracing::info;

use crate::{
    domain::{AttachMode, Role},
    Error, Result,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Makes sure `pin_dir` is on a bpf filesystem, mounting bpffs at
/// `/sys/fs/bpf` when it is missing there (a fresh machine has none).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new(BPF_FS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        fs::create_dir_all(root).map_err(|e| Error::io(format!("create {BPF_FS_ROOT}"), e))?;
        nix::mount::mount(Some("bpffs"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| Error::bpf(format!("mount bpffs at {BPF_FS_ROOT}"), e))?;
        info!("mounted bpffs at {BPF_FS_ROOT}");
    }
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    if !is_bpffs(probe) {
        return Err(Error::bpf_msg(format!(
            "pin directory {} is not on a bpf filesystem (mount one with `mount -t bpf bpffs DIR`)",
            pin_dir.display()
        )));
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that an
/// existing one is ours: owned by this user and not writable by group or
/// others, who could otherwise swap in maps or programs of their own.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        return fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e));
    }
    let md = fs::metadata(dir).map_err(|e| Error::io(format!("inspect {}", dir.display()), e))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() || md.uid() != me || md.mode() & 0o022 != 0 {
        return Err(Error::InvalidInput(format!(
            "{} is {} (owner uid {}, mode {:o}); refusing to use it, as others could replace what is pinned there; nothing was changed. Fix: chown {me} {} && chmod 700 {}",
            dir.display(),
            if md.is_dir() { "not private" } else { "not a directory" },
            md.uid(),
            md.mode() & 0o7777,
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// An exclusive lock on a pin directory, held for an agent's lifetime: a
/// second agent for the same datapath is refused before it touches it.
pub struct PinLock(#[allow(dead_code)] fs::File);

impl PinLock {
    pub fn acquire(layout: &PinLayout) -> Result<PinLock> {
        ensure_bpffs(&layout.root)?;
        private_dir(&layout.root)?;
        let dir = fs::File::open(&layout.root).map_err(|e| Error::io(format!("open {}", layout.root.display()), e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&dir), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::AlreadyRunning(format!(
                    "another gatekeeper agent is running on the datapath pinned at {}; nothing was changed",
                    layout.root.display()
                )));
            }
            return Err(Error::io(format!("lock {}", layout.root.display()), err));
        }
        Ok(PinLock(dir))
    }
}

impl AttachMode {
    pub(crate) fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Skb => XdpMode::Skb,
            _ => XdpMode::Driver,
        }
    }
}

impl Role {
    /// The program of the eBPF object this role runs.
    pub(crate) fn program(self) -> &'static str {
        match self {
            Role::Ingress => programs::XDP_INGRESS,
            Role::Uplink => programs::TC_EGRESS,
            Role::Subscriber => programs::XDP_SUBSCRIBER,
        }
    }
    fn pin_prefix(self) -> &'static str {
        match self {
            Role::Ingress | Role::Uplink => "",
            Role::Subscriber => "sub-",
        }
    }
}

/// Priority and handle of gatekeeper's clsact filter (fixed, so a
/// restarted agent can replace it in place).
pub(crate) const CLSACT_PRIORITY: u16 = 0xc0de;
pub(crate) const CLSACT_HANDLE: u16 = 0x25;

/// A pinned link (or clsact marker) found under `links/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkPin {
    pub ifname: String,
    pub role: Role,
    pub mode: AttachMode,
    #[serde(skip)]
    pub path: PathBuf,
}

/// Paths under the pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }
    pub fn program(&self, role: Role) -> PathBuf {
        self.root.join(match role {
            Role::Ingress => "prog_ingress",
            Role::Subscriber => "prog_subscriber",
            Role::Uplink => "prog_egress",
        })
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// `links/[sub-]<mode>@<ifname>`, with `%` and `.` in the name
    /// percent-encoded: bpffs refuses dots in pin names (and `eth0.100` has
    /// one).
    pub fn link(&self, role: Role, ifname: &str, mode: AttachMode) -> PathBuf {
        let name = ifname.replace('%', "%25").replace('.', "%2e");
        self.links_dir().join(format!("{}{mode}@{name}", role.pin_prefix()))
    }
    /// Whether a datapath is pinned here.
    pub fn is_loaded(&self) -> bool {
        self.map(names::CONFIG).exists()
    }
    /// The pinned links, sorted by interface name.
    pub fn links(&self) -> Result<Vec<LinkPin>> {
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((mode, ifname)) = name.split_once('@') else { continue };
            let ifname = ifname.replace("%2e", ".").replace("%25", "%");
            let (role, mode) = match mode {
                "native" => (Role::Ingress, AttachMode::Native),
                "skb" => (Role::Ingress, AttachMode::Skb),
                "sub-native" => (Role::Subscriber, AttachMode::Native),
                "sub-skb" => (Role::Subscriber, AttachMode::Skb),
                "tcx" => (Role::Uplink, AttachMode::Tcx),
                "clsact" => (Role::Uplink, AttachMode::Clsact),
                _ => continue,
            };
            out.push(LinkPin { ifname: ifname.to_string(), role, mode, path: entry.path() });
        }
        out.sort_by(|a, b| (a.role, &a.ifname).cmp(&(b.role, &b.ifname)));
        Ok(out)
    }

    /// Detaches everything and removes every pin. Returns what was removed.
    /// Map pins of ours (`GK_*`) that this build does not use: left by an
    /// older gatekeeper whose tables had other names.
    pub fn stale_maps(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.root.join("maps");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))? {
            let e = e.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("GK_") && !names::ALL.contains(&name.as_str()) {
                out.push((name, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn unload(&self) -> Result<Vec<String>> {
        // The explain stage first: its settings say the XDP gate hands it
        // SYNs, so they are cleared before anything is detached.
        let mut removed = super::explain::unload(self)?;
        for link in self.links()? {
            let gone = link.mode != AttachMode::Clsact || ifindex(&link.ifname).is_some();
            remove_link(&link)?;
            removed.push(format!("link {} ({} {})", link.ifname, link.role, link.mode));
            if !gone {
                removed.push(format!(
                    "WARNING: interface {} is not in this network namespace: if it still exists elsewhere, remove its filter there with `tc filter del dev {} egress pref {CLSACT_PRIORITY} handle {CLSACT_HANDLE:#x} bpf`",
                    link.ifname, link.ifname
                ));
            }
        }
        for link in self.rejector_links()? {
            fs::remove_file(&link).map_err(|e| Error::io(format!("remove {}", link.display()), e))?;
            removed.push(format!("rejector link {}", link.file_name().unwrap_or_default().to_string_lossy()));
        }
        for role in [Role::Ingress, Role::Subscriber, Role::Uplink] {
            let prog = self.program(role);
            if prog.exists() {
                fs::remove_file(&prog).map_err(|e| Error::io(format!("remove {}", prog.display()), e))?;
                removed.push(format!("program {role}"));
            }
        }
        for name in names::ALL {
            let p = self.map(name);
            if p.exists() {
                fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
                removed.push(format!("map {name}"));
            }
        }
        for (name, p) in self.stale_maps()? {
            fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
            removed.push(format!("map {name} (left by an older gatekeeper)"));
        }
        for dir in [self.links_dir(), self.root.join("maps"), self.root.clone()] {
            if dir.exists() {
                fs::remove_dir(&dir)
                    .map_err(|e| Error::io(format!("remove {} (is something else pinned there?)", dir.display()), e))?;
            }
        }
        Ok(removed)
    }
}

/// Detaches a pinned link: unpinning a link detaches it; a clsact filter
/// is removed through netlink (gone with its interface already is fine).
pub(crate) fn remove_link(link: &LinkPin) -> Result<()> {
    if link.mode == AttachMode::Clsact {
        if ifindex(&link.ifname).is_some() {
            match tc::qdisc_detach_program(&link.ifname, TcAttachType::Egress, programs::TC_EGRESS) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::bpf(format!("remove clsact filter on {}", link.ifname), e)),
            }
        }
        return fs::remove_dir(&link.path).map_err(|e| Error::io(format!("remove {}", link.path.display()), e));
    }
    fs::remove_file(&link.path).map_err(|e| Error::io(format!("remove {}", link.path.display()), e))
}

pub fn ifindex(ifname: &str) -> Option<u32> {
    let c = CString::new(ifname).ok()?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
