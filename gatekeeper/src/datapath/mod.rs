//! The agent's handle on the pinned, fail-static datapath: loading (or
//! adopting) the programs and maps, and attaching them to interfaces (or
//! adopting what a previous agent left attached, by swapping its program
//! in atomically).
//!
//! Submodules: [`pins`] (the pin directory), [`load`] (the eBPF object),
//! [`maps`] (typed map handles), [`rejector`] (sk_lookup), [`explain`] (the
//! TC explain stage and its routing).
pub mod explain;
pub mod load;
pub mod maps;
pub mod pins;
pub mod rejector;

use std::{fs, path::Path};

use aya::{
    maps::{MapData, RingBuf, SockMap},
    programs::{
        links::FdLink,
        links::PinnedLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttachType, Xdp,
    },
    Ebpf,
};
use gatekeeper_common::{maps as names, programs};
use tracing::{info, warn};

pub use load::{calibrate_clock, load_object};
pub use maps::{table_map, InboundMaps, LimitClassState, Maps, RangeMaps, RejectMaps};
pub use pins::{ensure_bpffs, ifindex, LinkPin, PinLayout, PinLock};
pub use rejector::{Listeners, RejectorAttach};

use crate::{
    domain::{AttachMode, Role, TcModeSetting, XdpModeSetting},
    Error, Result,
};
use pins::{remove_link, CLSACT_HANDLE, CLSACT_PRIORITY};

/// How an interface ended up attached.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attached {
    pub ifname: String,
    pub ifindex: u32,
    pub role: Role,
    pub mode: AttachMode,
    /// An existing pinned link was kept and given the new program.
    pub adopted: bool,
}

/// The agent's handle on the datapath.
pub struct Datapath {
    pub layout: PinLayout,
    ebpf: Ebpf,
    pub maps: Maps,
    events: Option<RingBuf<MapData>>,
    /// The rejector's listener slots (see [`rejector`]).
    rejectors: SockMap<MapData>,
    /// The datapath clock's calibration (`Config::tick_ns`,
    /// `Config::clock_offset_ns`); `None`: the datapath reads the helper.
    pub clock: Option<(u64, u64)>,
}

impl Datapath {
    /// Loads the programs, reusing maps already pinned under `layout` (a
    /// previous agent's state and counters) or creating and pinning them.
    pub fn load(layout: &PinLayout, max_verdicts: u32, max_range_nodes: u32) -> Result<Datapath> {
        ensure_bpffs(&layout.root)?;
        for dir in [layout.root.join("maps"), layout.links_dir()] {
            pins::private_dir(&dir)?;
        }
        let (buckets, range_nodes) = load::check_pinned_maps(layout, max_verdicts, max_range_nodes)?;
        let mut ebpf = load_object(buckets, |loader| {
            loader.map_max_entries(names::RANGES, range_nodes);
            for name in names::ALL {
                loader.map_pin_path(name, layout.map(name));
            }
        })?;
        for role in [Role::Ingress, Role::Subscriber] {
            let prog = xdp_program(&mut ebpf, role)?;
            prog.load().map_err(|e| Error::bpf(format!("load XDP program {} (verifier)", role.program()), e))?;
            pin_program(layout, role, |p| prog.pin(p))?;
        }
        let prog = tc_program(&mut ebpf)?;
        prog.load().map_err(|e| Error::bpf(format!("load TC program {} (verifier)", programs::TC_EGRESS), e))?;
        pin_program(layout, Role::Uplink, |p| prog.pin(p))?;
        rejector::load_program(&mut ebpf)?;
        explain::load_program(&mut ebpf)?;
        let clock = calibrate_clock(&mut ebpf)?;
        let mut maps = Maps::take(&mut ebpf)?;
        if maps.ensure_hash_key()? {
            tracing::debug!("new hash secret for the per-source tables");
        }
        let events = maps::typed(ebpf.take_map(names::EVENTS), names::EVENTS)?;
        let rejectors = maps::typed(ebpf.take_map(names::REJECTORS), names::REJECTORS)?;
        Ok(Datapath { layout: layout.clone(), ebpf, maps, events: Some(events), rejectors, clock })
    }

    /// The ring buffer of unknown-source events (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Attaches the rejector (sk_lookup) to this network namespace, or
    /// adopts the link a previous agent pinned for it.
    pub fn attach_rejector(&mut self) -> Result<RejectorAttach> {
        rejector::attach(&mut self.ebpf, &self.layout)
    }

    /// Detaches the rejector from this network namespace (its pin goes);
    /// false if it was not attached.
    pub fn detach_rejector(&self) -> Result<bool> {
        let path = self.layout.rejector_link(rejector::netns_inode()?);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }

    /// Binds the rejector's listeners and puts them in its slots.
    pub fn rejector_listeners(&mut self) -> Result<Listeners> {
        rejector::listeners(&mut self.rejectors)
    }

    /// The index of `ifname`, and the link a previous agent pinned there for
    /// `role`, if any.
    fn pinned_link(&self, role: Role, ifname: &str) -> Result<(u32, Option<LinkPin>)> {
        let idx = ifindex(ifname).ok_or_else(|| Error::NoSuchInterface {
            name: ifname.into(),
            role: Some(role),
            refused: false,
        })?;
        Ok((idx, self.layout.links()?.into_iter().find(|l| l.ifname == ifname && l.role == role)))
    }

    /// Attaches an XDP role (ingress gate or subscriber side) to `ifname`,
    /// or adopts the link a previous agent pinned there by swapping in this
    /// agent's program atomically (no gap).
    pub fn attach(&mut self, role: Role, ifname: &str, want: XdpModeSetting) -> Result<Attached> {
        if role == Role::Uplink {
            return Err(Error::bpf_msg("uplinks are attached with attach_uplink"));
        }
        let (ifindex, existing) = self.pinned_link(role, ifname)?;
        let prog = xdp_program(&mut self.ebpf, role)?;
        if let Some(pin) = existing {
            let compatible = match want {
                XdpModeSetting::Auto => true,
                XdpModeSetting::Native => pin.mode == AttachMode::Native,
                XdpModeSetting::Skb => pin.mode == AttachMode::Skb,
            };
            if compatible {
                let pinned = PinnedLink::from_pin(&pin.path)
                    .map_err(|e| Error::bpf(format!("open {}", pin.path.display()), e))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| Error::bpf(format!("link {}", pin.path.display()), e))?;
                let id =
                    prog.attach_to_link(link).map_err(|e| Error::bpf(format!("update XDP link on {ifname}"), e))?;
                // The link stays attached through its pin; drop our fd.
                drop(prog.take_link(id).map_err(|e| Error::bpf("take link", e))?);
                return Ok(Attached { ifname: ifname.into(), ifindex, role, mode: pin.mode, adopted: true });
            }
            warn!(iface = ifname, %role, from = %pin.mode, to = %want, "XDP mode change requested: detaching and re-attaching (brief gap)");
            remove_link(&pin)?;
        }
        let modes: &[AttachMode] = match want {
            XdpModeSetting::Auto => &[AttachMode::Native, AttachMode::Skb],
            XdpModeSetting::Native => &[AttachMode::Native],
            XdpModeSetting::Skb => &[AttachMode::Skb],
        };
        let mut last_err = None;
        for &mode in modes {
            match prog.attach_to_if_index(ifindex, mode.xdp_mode()) {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(|e| Error::bpf("take link", e))?;
                    let fd = FdLink::try_from(link).map_err(|e| {
                        Error::bpf(
                            format!("{ifname}: the kernel attached XDP without a bpf_link, which cannot be pinned"),
                            e,
                        )
                    })?;
                    let path = self.layout.link(role, ifname, mode);
                    fd.pin(&path).map_err(|e| Error::bpf(format!("pin link at {}", path.display()), e))?;
                    return Ok(Attached { ifname: ifname.into(), ifindex, role, mode, adopted: false });
                }
                Err(e) => {
                    if mode == AttachMode::Native && modes.len() > 1 {
                        warn!(iface = ifname, %role, error = %e, "native XDP attach failed; falling back to skb (generic) mode, which is slower");
                    }
                    last_err = Some(Error::bpf(format!("attach XDP ({mode}) to {ifname}"), e));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::bpf_msg("no XDP mode to try")))
    }

    /// Attaches the egress gate to an uplink's TC egress hook: a tcx link
    /// (pinned) where the kernel has tcx, else a clsact filter (marked by an
    /// empty `clsact@` directory). A previous agent's attachment is adopted
    /// by replacing its program in place.
    pub fn attach_uplink(&mut self, ifname: &str, want: TcModeSetting) -> Result<Attached> {
        let role = Role::Uplink;
        let (ifindex, existing) = self.pinned_link(role, ifname)?;
        let prog = tc_program(&mut self.ebpf)?;
        if let Some(pin) = existing {
            let compatible = match want {
                TcModeSetting::Auto => true,
                TcModeSetting::Tcx => pin.mode == AttachMode::Tcx,
                TcModeSetting::Clsact => pin.mode == AttachMode::Clsact,
            };
            if compatible {
                let link = if pin.mode == AttachMode::Tcx {
                    let pinned = PinnedLink::from_pin(&pin.path)
                        .map_err(|e| Error::bpf(format!("open {}", pin.path.display()), e))?;
                    SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| Error::bpf(format!("link {}", pin.path.display()), e))?
                } else {
                    SchedClassifierLink::attached(
                        ifname,
                        TcAttachType::Egress,
                        CLSACT_PRIORITY,
                        TcHandle::new(0, CLSACT_HANDLE),
                        None,
                    )
                    .map_err(|e| Error::io(format!("clsact filter on {ifname}"), e))?
                };
                let id = prog.attach_to_link(link).map_err(|e| Error::bpf(format!("update TC link on {ifname}"), e))?;
                let link = prog.take_link(id).map_err(|e| Error::bpf("take link", e))?;
                // tcx: the pin keeps it; clsact: the filter lives in the
                // kernel. Neither may be detached when this handle goes.
                std::mem::forget(link);
                return Ok(Attached { ifname: ifname.into(), ifindex, role, mode: pin.mode, adopted: true });
            }
            warn!(iface = ifname, from = %pin.mode, "TC mode change requested: detaching and re-attaching (brief gap)");
            remove_link(&pin)?;
        }
        let tcx_ok =
            aya::util::KernelVersion::current().map(|v| v >= aya::util::KernelVersion::new(6, 6, 0)).unwrap_or(false);
        let mode = match want {
            TcModeSetting::Tcx => AttachMode::Tcx,
            TcModeSetting::Clsact => AttachMode::Clsact,
            TcModeSetting::Auto if tcx_ok => AttachMode::Tcx,
            TcModeSetting::Auto => {
                info!(iface = ifname, "kernel older than 6.6 has no tcx: attaching through a clsact qdisc");
                AttachMode::Clsact
            }
        };
        let path = self.layout.link(role, ifname, mode);
        if mode == AttachMode::Tcx {
            let id = prog
                .attach_with_options(ifname, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| Error::bpf(format!("attach TC (tcx) to {ifname} egress"), e))?;
            let link = prog.take_link(id).map_err(|e| Error::bpf("take link", e))?;
            let fd = FdLink::try_from(link).map_err(|e| Error::bpf(format!("{ifname}: tcx link"), e))?;
            fd.pin(&path).map_err(|e| Error::bpf(format!("pin link at {}", path.display()), e))?;
        } else {
            match tc::qdisc_add_clsact(ifname) {
                Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(Error::bpf(format!("add clsact qdisc to {ifname}"), e)),
            }
            let opts =
                NlOptions { priority: CLSACT_PRIORITY, handle: TcHandle::new(0, CLSACT_HANDLE), ..Default::default() };
            let id = prog
                .attach_with_options(ifname, TcAttachType::Egress, TcAttachOptions::Netlink(opts))
                .map_err(|e| Error::bpf(format!("attach TC (clsact) to {ifname} egress"), e))?;
            std::mem::forget(prog.take_link(id).map_err(|e| Error::bpf("take link", e))?);
            fs::create_dir(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        }
        Ok(Attached { ifname: ifname.into(), ifindex, role, mode, adopted: false })
    }

    /// Detaches the interfaces of `role` pinned earlier but no longer wanted.
    pub fn detach_except(&self, role: Role, keep: &[String]) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for pin in self.layout.links()? {
            if pin.role == role && !keep.contains(&pin.ifname) {
                remove_link(&pin)?;
                gone.push(pin.ifname);
            }
        }
        Ok(gone)
    }
}

fn pin_program(
    layout: &PinLayout,
    role: Role,
    pin: impl FnOnce(&Path) -> std::result::Result<(), aya::pin::PinError>,
) -> Result<()> {
    let path = layout.program(role);
    if path.exists() {
        fs::remove_file(&path).map_err(|e| Error::io(format!("replace {}", path.display()), e))?;
    }
    pin(&path).map_err(|e| Error::bpf(format!("pin program at {}", path.display()), e))
}

fn xdp_program(ebpf: &mut Ebpf, role: Role) -> Result<&mut Xdp> {
    program(ebpf, role.program())
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    program(ebpf, programs::TC_EGRESS)
}

/// The program `name` of the object, as its type `T` (`Xdp`,
/// `SchedClassifier`, `SkLookup`, ...).
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::bpf_msg(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|e| Error::bpf(format!("program {name}: type"), e))
}
