//! The rejector's datapath: the sk_lookup program attached to the agent's
//! network namespace, and the agent's listeners in its sockmap.
//!
//! The link is pinned (`links/rejector@netns-<inode>`), so a refused
//! source whose action is reject keeps being steered away from the MTA when
//! the agent dies: with the listeners gone the program fails the lookup
//! (the kernel answers with a RST) and, once the lease lapses, the XDP gate
//! drops the SYN. A new agent gives the pinned link its program in one
//! atomic update (`BPF_LINK_UPDATE`, which aya 0.14 does not offer for
//! sk_lookup links), then puts its own listeners in.
use std::{
    ffi::CString,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, SockMap},
    programs::{links::FdLink, SkLookup},
    Ebpf,
};
use gatekeeper_common::{programs, reject};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::{datapath::pins::PinLayout, Error, Result};

const NETNS: &str = "/proc/self/ns/net";
/// Listen backlog of each rejector listener: the kernel completes
/// handshakes while the agent is busy, up to this many per family.
const BACKLOG: i32 = 1024;

/// The inode of this process's network namespace.
pub fn netns_inode() -> Result<u64> {
    fs::metadata(NETNS).map(|m| m.ino()).map_err(|e| Error::io(format!("inspect {NETNS}"), e))
}

impl PinLayout {
    /// The rejector link's pin for the network namespace with `inode`.
    pub fn rejector_link(&self, inode: u64) -> PathBuf {
        self.links_dir().join(format!("rejector@netns-{inode}"))
    }

    /// Every rejector link pinned here (one per network namespace an agent
    /// ran in with this pin directory).
    pub fn rejector_links(&self) -> Result<Vec<PathBuf>> {
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        let mut out: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("rejector@"))
            .map(|e| e.path())
            .collect();
        out.sort();
        Ok(out)
    }
}

/// How the rejector program came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectorAttach {
    /// A new link, now pinned.
    New,
    /// The link a previous agent pinned for this namespace, updated in
    /// place.
    Adopted,
}

/// Loads the rejector program (the verifier runs here).
pub fn load_program(ebpf: &mut Ebpf) -> Result<()> {
    program(ebpf)?.load().map_err(|e| Error::bpf(format!("load {} (verifier)", programs::SK_REJECTOR), e))
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SkLookup> {
    super::program(ebpf, programs::SK_REJECTOR)
}

/// Attaches the rejector program to this process's network namespace, or
/// adopts the link pinned for it.
pub fn attach(ebpf: &mut Ebpf, layout: &PinLayout) -> Result<RejectorAttach> {
    let path = layout.rejector_link(netns_inode()?);
    let prog = program(ebpf)?;
    if path.exists() {
        let prog_fd = prog.fd().map_err(|e| Error::bpf("rejector program fd", e))?;
        match obj_get(&path).and_then(|link| link_update(link.as_fd(), prog_fd.as_fd())) {
            Ok(()) => return Ok(RejectorAttach::Adopted),
            Err(e) => {
                // A link whose namespace is gone (ENOLINK), or not a link.
                warn!(pin = %path.display(), error = %e, "the pinned rejector link cannot take the new program; attaching a new one");
                fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
            }
        }
    }
    let netns = fs::File::open(NETNS).map_err(|e| Error::io(format!("open {NETNS}"), e))?;
    let id = prog.attach(&netns).map_err(|e| Error::bpf("attach the rejector (sk_lookup) to this namespace", e))?;
    let link = FdLink::from(prog.take_link(id).map_err(|e| Error::bpf("take link", e))?);
    link.pin(&path).map_err(|e| Error::bpf(format!("pin link at {}", path.display()), e))?;
    info!(pin = %path.display(), "rejector attached to this network namespace");
    Ok(RejectorAttach::New)
}

/// The rejector's listeners, in the sockmap from creation until dropped
/// (the kernel takes a socket out of a sockmap when it closes).
pub struct Listeners {
    pub v4: TcpListener,
    /// `None` when this host has no IPv6.
    pub v6: Option<TcpListener>,
}

/// Binds the two listeners (loopback, any free port: sk_lookup reaches
/// them whatever their address; free-bind, since a fresh namespace's
/// loopback may be down) and puts them in the sockmap's slots.
pub fn listeners(map: &mut SockMap<MapData>) -> Result<Listeners> {
    let v4 = listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| Error::io("bind the rejector's IPv4 listener", e))?;
    map.set(reject::SLOT_V4, &v4, 0).map_err(|e| Error::bpf("put the IPv4 listener in the rejector map", e))?;
    let v6 = match listener(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))) {
        Ok(l) => {
            map.set(reject::SLOT_V6, &l, 0).map_err(|e| Error::bpf("put the IPv6 listener in the rejector map", e))?;
            Some(l)
        }
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            warn!("no IPv6 on this host: the rejector answers IPv4 only");
            None
        }
        Err(e) => return Err(Error::io("bind the rejector's IPv6 listener", e)),
    };
    Ok(Listeners { v4, v6 })
}

fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let (domain, v6) = if addr.is_ipv6() { (Domain::IPV6, true) } else { (Domain::IPV4, false) };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if v6 {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    // No SO_REUSEPORT: sk_lookup cannot select a reuseport group member
    // without the kernel picking another. SO_REUSEADDR: the connections
    // it accepts own the MTA's address and port (25), and inherit this
    // flag; without it their TIME_WAIT would keep the MTA from binding
    // port 25 again (a restarted Postfix: "Address already in use").
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf(BPF_OBJ_GET)`: opens a pinned object.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = Attr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: a bpf_attr prefix the kernel reads `size` bytes of; the path
    // outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr, size_of::<Attr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf(BPF_LINK_UPDATE)`: gives a link a new program, atomically.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr =
        Attr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &attr, size_of::<Attr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
