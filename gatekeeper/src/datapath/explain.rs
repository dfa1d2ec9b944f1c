//! The explain stage's datapath and routing: the TC program on
//! subscriber-facing interfaces' ingress (tcx, pinned), its settings map,
//! and the policy routing that delivers the packets it marks locally.
//!
//! Everything lives under `<pin-dir>/explain/`:
//! - `tcx@<ifname>`: the stage's link on a subscriber-facing interface
//!   (unpinning detaches it);
//! - `rule4-<mark>-<mask>-<table>-<priority>@<netns inode>` and
//!   `route4-<table>@<netns inode>` (and `rule6-`/`route6-`): empty
//!   directories recording the `ip rule` and `ip route` entries this
//!   gatekeeper added, so that a restarted agent adopts them and `unload`
//!   removes exactly those (bpffs holds no regular files; the clsact marker
//!   is an empty directory too). Rules and routes gatekeeper did not add
//!   are never removed.
//!
//! Routing is changed by running iproute2's `ip` (a dependency already),
//! not by netlink messages of our own: the agent runs as root on routers,
//! it happens at start and at unload only, and what it does is exactly the
//! command an operator would type (and finds in the log). The rule matches
//! only the stage's mark (`fwmark MARK/MASK lookup TABLE`), and TABLE holds
//! only `local default dev lo`: nothing else on the router is routed
//! differently. A TABLE that holds routes of someone else's is refused.
//!
//! Without tcx (kernels before 6.6) the stage is not attached and explain
//! pools are answered with a RST by the XDP gate.
use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use gatekeeper_common::{explain::ExplainConfig, maps as names, programs};
use tracing::{info, warn};

use crate::{
    datapath::{ifindex, pins::PinLayout, rejector::netns_inode, Datapath},
    Error, Result,
};

/// Loads the stage's program (the verifier runs here).
pub fn load_program(ebpf: &mut Ebpf) -> Result<()> {
    program(ebpf)?.load().map_err(|e| Error::bpf(format!("load TC program {} (verifier)", programs::TC_EXPLAIN), e))
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    super::program(ebpf, programs::TC_EXPLAIN)
}

impl PinLayout {
    /// `<pin-dir>/explain`.
    pub fn explain_dir(&self) -> PathBuf {
        self.root.join("explain")
    }

    /// The stage's link pin on `ifname` (dots and `%` percent-encoded, as
    /// bpffs refuses dots).
    pub fn explain_link(&self, ifname: &str) -> PathBuf {
        self.explain_dir().join(format!("tcx@{}", ifname.replace('%', "%25").replace('.', "%2e")))
    }

    /// The interfaces the stage is pinned on, with their pins.
    pub fn explain_links(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out: Vec<(String, PathBuf)> = entries(&self.explain_dir())?
            .into_iter()
            .filter_map(|(name, path)| {
                let ifname = name.strip_prefix("tcx@")?;
                Some((ifname.replace("%2e", ".").replace("%25", "%"), path))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The routing entries recorded as ours.
    pub fn explain_routes(&self) -> Result<Vec<(RouteEntry, PathBuf)>> {
        let mut out: Vec<(RouteEntry, PathBuf)> = entries(&self.explain_dir())?
            .into_iter()
            .filter_map(|(name, path)| RouteEntry::parse(&name).map(|r| (r, path)))
            .collect();
        out.sort_by_key(|a| a.0.marker());
        Ok(out)
    }
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    Ok(rd.flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())).collect())
}

/// The stage's settings map, opened through its pin.
pub fn open_config(layout: &PinLayout) -> Result<Option<Array<MapData, ExplainConfig>>> {
    let path = layout.map(names::EXPLAIN);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(|e| Error::bpf(format!("open {}", path.display()), e))?;
    let map = Array::try_from(Map::Array(data)).map_err(|e| Error::bpf(format!("map {}", names::EXPLAIN), e))?;
    Ok(Some(map))
}

/// Writes the stage's settings (one atomic update).
pub fn set_config(layout: &PinLayout, c: ExplainConfig) -> Result<()> {
    match open_config(layout)? {
        Some(mut m) => m.set(0, c, 0).map_err(|e| Error::bpf("write explain settings", e)),
        None => Err(Error::bpf_msg(format!("map {} is not pinned", names::EXPLAIN))),
    }
}

/// The stage's settings as pinned (`None`: no such map).
pub fn config(layout: &PinLayout) -> Result<Option<ExplainConfig>> {
    match open_config(layout)? {
        Some(m) => m.get(&0, 0).map(Some).map_err(|e| Error::bpf("read explain settings", e)),
        None => Ok(None),
    }
}

impl Datapath {
    /// Attaches the stage to `ifname`'s ingress (tcx, first in line), or
    /// gives the link a previous agent pinned there this agent's program.
    /// Returns whether it adopted a link.
    pub fn attach_explain(&mut self, ifname: &str) -> Result<bool> {
        if ifindex(ifname).is_none() {
            return Err(Error::NoSuchInterface { name: ifname.into(), role: None, refused: false });
        }
        let path = self.layout.explain_link(ifname);
        let prog = program(&mut self.ebpf)?;
        if path.exists() {
            let adopted = PinnedLink::from_pin(&path)
                .map_err(|e| Error::bpf(format!("open {}", path.display()), e))
                .and_then(|p| {
                    SchedClassifierLink::try_from(FdLink::from(p))
                        .map_err(|e| Error::bpf(format!("link {}", path.display()), e))
                })
                .and_then(|link| prog.attach_to_link(link).map_err(|e| Error::bpf("update the explain link", e)));
            match adopted {
                Ok(id) => {
                    // The pin keeps the link attached.
                    std::mem::forget(prog.take_link(id).map_err(|e| Error::bpf("take link", e))?);
                    return Ok(true);
                }
                Err(e) => {
                    warn!(pin = %path.display(), error = %e.report(), "the pinned explain link cannot take the new program; attaching a new one");
                    fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
                }
            }
        }
        super::pins::private_dir(&self.layout.explain_dir())?;
        let id = prog
            .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(|e| Error::bpf(format!("attach the explain stage (tcx) to {ifname} ingress"), e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("take link", e))?;
        let fd = FdLink::try_from(link).map_err(|e| Error::bpf(format!("{ifname}: tcx link"), e))?;
        fd.pin(&path).map_err(|e| Error::bpf(format!("pin link at {}", path.display()), e))?;
        Ok(false)
    }
}

/// Detaches the stage from every interface not in `keep`; returns them.
pub fn detach_except(layout: &PinLayout, keep: &[String]) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for (ifname, path) in layout.explain_links()? {
        if !keep.contains(&ifname) {
            fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
            gone.push(ifname);
        }
    }
    Ok(gone)
}

/// One routing entry of the stage's policy routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub v6: bool,
    pub kind: RouteKind,
    /// The network namespace it was added in (its inode).
    pub netns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `ip rule add fwmark MARK/MASK lookup TABLE priority PRIORITY`.
    Rule { mark: u32, mask: u32, table: u32, priority: u32 },
    /// `ip route add local default dev lo table TABLE`.
    Route { table: u32 },
}

/// The stage's routing settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
}

impl RouteEntry {
    /// The rule and the route for one family.
    pub fn for_family(r: &Routing, v6: bool, netns: u64) -> [RouteEntry; 2] {
        [
            RouteEntry {
                v6,
                kind: RouteKind::Rule { mark: r.mark, mask: r.mask, table: r.table, priority: r.priority },
                netns,
            },
            RouteEntry { v6, kind: RouteKind::Route { table: r.table }, netns },
        ]
    }

    fn fam(&self) -> &'static str {
        if self.v6 {
            "6"
        } else {
            "4"
        }
    }

    /// The marker's directory name.
    pub fn marker(&self) -> String {
        match self.kind {
            RouteKind::Rule { mark, mask, table, priority } => {
                format!("rule{}-{mark:08x}-{mask:08x}-{table}-{priority}@{}", self.fam(), self.netns)
            }
            RouteKind::Route { table } => format!("route{}-{table}@{}", self.fam(), self.netns),
        }
    }

    pub fn parse(name: &str) -> Option<RouteEntry> {
        let (what, netns) = name.split_once('@')?;
        let netns = netns.parse().ok()?;
        let (head, rest) = what.split_once('-')?;
        let (kind, v6) = match head {
            "rule4" => ("rule", false),
            "rule6" => ("rule", true),
            "route4" => ("route", false),
            "route6" => ("route", true),
            _ => return None,
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let kind = match (kind, parts.as_slice()) {
            ("rule", [mark, mask, table, priority]) => RouteKind::Rule {
                mark: u32::from_str_radix(mark, 16).ok()?,
                mask: u32::from_str_radix(mask, 16).ok()?,
                table: table.parse().ok()?,
                priority: priority.parse().ok()?,
            },
            ("route", [table]) => RouteKind::Route { table: table.parse().ok()? },
            _ => return None,
        };
        Some(RouteEntry { v6, kind, netns })
    }

    /// `ip` arguments that add (`add`) or delete (`del`) the entry.
    pub fn args(&self, verb: &str) -> Vec<String> {
        let mut a = vec![format!("-{}", self.fam())];
        match self.kind {
            RouteKind::Rule { mark, mask, table, priority } => {
                a.extend(["rule".into(), verb.into(), "fwmark".into(), format!("{mark:#x}/{mask:#x}")]);
                a.extend(["lookup".into(), table.to_string(), "priority".into(), priority.to_string()]);
            }
            RouteKind::Route { table } => {
                let default = if self.v6 { "::/0" } else { "0.0.0.0/0" };
                a.extend(["route".into(), verb.into(), "local".into(), default.into(), "dev".into(), "lo".into()]);
                a.extend(["table".into(), table.to_string()]);
            }
        }
        a
    }

    /// The command line, as the log and unload's warnings show it.
    pub fn command(&self, verb: &str) -> String {
        format!("ip {}", self.args(verb).join(" "))
    }
}

/// Runs `ip ARGS`: Ok(Ok(())) on success, Ok(Err(stderr)) when `ip`
/// refused, Err when it could not run.
fn ip(args: &[String]) -> Result<std::result::Result<(), String>> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::io("run `ip` (iproute2) to set up the explain route", e))?;
    if out.status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().map_err(|e| Error::io("run `ip` (iproute2)", e))?;
    if !out.status.success() {
        return Err(Error::InvalidInput(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Refuses a table that holds anything but the stage's own route.
fn check_table(table: u32, v6: bool) -> Result<()> {
    let t = table.to_string();
    let fam = if v6 { "-6" } else { "-4" };
    let shown = match ip_output(&[fam, "route", "show", "table", &t]) {
        Ok(s) => s,
        // A table nothing was ever added to.
        Err(Error::InvalidInput(m)) if m.contains("does not exist") => String::new(),
        Err(e) => return Err(e),
    };
    let foreign: Vec<&str> =
        shown.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("local default dev lo")).collect();
    if !foreign.is_empty() {
        return Err(Error::InvalidInput(format!(
            "routing table {table} ({}) holds routes gatekeeper did not add ({}); the explain route would capture what they route: set `[egress.explain] table` to a free table (nothing was changed)",
            if v6 { "IPv6" } else { "IPv4" },
            foreign.join("; ")
        )));
    }
    Ok(())
}

/// What installing the routing did, for the log.
#[derive(Debug, Default)]
pub struct RoutingReport {
    pub added: Vec<String>,
    pub adopted: Vec<String>,
    /// Present already, not recorded as ours: left to their owner.
    pub foreign: Vec<String>,
    pub removed: Vec<String>,
}

/// Makes the stage's routing in this namespace what `want` (per family)
/// says: entries recorded as ours that are no longer wanted are deleted,
/// wanted ones are added (and recorded) unless present.
pub fn install_routing(layout: &PinLayout, want: Option<Routing>, families: &[bool]) -> Result<RoutingReport> {
    let netns = netns_inode()?;
    let wanted: Vec<RouteEntry> = match want {
        Some(r) => families.iter().flat_map(|&v6| RouteEntry::for_family(&r, v6, netns)).collect(),
        None => Vec::new(),
    };
    let mut report = RoutingReport::default();
    for (entry, path) in layout.explain_routes()? {
        if entry.netns == netns && !wanted.contains(&entry) {
            report.removed.push(remove_entry(&entry, &path)?);
        }
    }
    if wanted.is_empty() {
        return Ok(report);
    }
    for &v6 in families {
        if let Some(r) = want {
            check_table(r.table, v6)?;
        }
    }
    super::pins::private_dir(&layout.explain_dir())?;
    for entry in wanted {
        let marker = layout.explain_dir().join(entry.marker());
        match ip(&entry.args("add"))? {
            Ok(()) => {
                if !marker.exists() {
                    fs::create_dir(&marker).map_err(|e| Error::io(format!("create {}", marker.display()), e))?;
                }
                report.added.push(entry.command("add"));
            }
            Err(msg) if msg.contains("File exists") => {
                if marker.exists() {
                    report.adopted.push(entry.command("add"));
                } else {
                    report.foreign.push(entry.command("add"));
                }
            }
            Err(msg) => {
                return Err(Error::InvalidInput(format!("`{}` failed: {msg}", entry.command("add"))));
            }
        }
    }
    Ok(report)
}

/// Deletes one recorded entry (already gone is fine) and its marker.
fn remove_entry(entry: &RouteEntry, marker: &Path) -> Result<String> {
    match ip(&entry.args("del"))? {
        Ok(()) => {}
        Err(msg) if msg.contains("No such file") || msg.contains("No such process") => {}
        Err(msg) => return Err(Error::InvalidInput(format!("`{}` failed: {msg}", entry.command("del")))),
    }
    fs::remove_dir(marker).map_err(|e| Error::io(format!("remove {}", marker.display()), e))?;
    Ok(entry.command("del"))
}

/// Turns the stage off: explain pools are rejected by the XDP gate from
/// here on, then the stage is detached everywhere and its routing removed.
pub fn off(layout: &PinLayout) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if let Some(c) = config(layout)? {
        if c != ExplainConfig::default() {
            set_config(layout, ExplainConfig::default())?;
        }
    }
    for ifname in detach_except(layout, &[])? {
        done.push(format!("explain stage on {ifname}"));
    }
    done.extend(install_routing(layout, None, &[])?.removed);
    Ok(done)
}

/// `gatekeeper unload`: the stage off (settings cleared first), its links
/// unpinned, every routing entry recorded as ours removed (one added in
/// another network namespace cannot be reached from here: a warning says
/// what to run there), then `explain/` itself.
pub fn unload(layout: &PinLayout) -> Result<Vec<String>> {
    let dir = layout.explain_dir();
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    if let Some(c) = config(layout)? {
        if c.staged() {
            set_config(layout, ExplainConfig::default())?;
        }
    }
    for (ifname, path) in layout.explain_links()? {
        fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
        removed.push(format!("link {ifname} (explain stage, tcx)"));
    }
    let netns = netns_inode()?;
    for (entry, path) in layout.explain_routes()? {
        if entry.netns == netns {
            removed.push(format!("explain routing: {}", remove_entry(&entry, &path)?));
        } else {
            fs::remove_dir(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
            removed.push(format!(
                "WARNING: explain routing `{}` was added in another network namespace (inode {}): run `{}` there",
                entry.command("add"),
                entry.netns,
                entry.command("del")
            ));
        }
    }
    fs::remove_dir(&dir).map_err(|e| Error::io(format!("remove {} (is something else there?)", dir.display()), e))?;
    info!(removed = removed.len(), "explain stage unloaded");
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_commands_read_as_typed() {
        let r = Routing { mark: 0x4b47_0000, mask: 0xffff_0000, table: 4747, priority: 4747 };
        for v6 in [false, true] {
            for e in RouteEntry::for_family(&r, v6, 4026531840) {
                assert_eq!(RouteEntry::parse(&e.marker()), Some(e), "{}", e.marker());
                assert!(!e.marker().contains('.'), "bpffs refuses dots: {}", e.marker());
            }
        }
        let [rule, route] = RouteEntry::for_family(&r, false, 7);
        assert_eq!(rule.marker(), "rule4-4b470000-ffff0000-4747-4747@7");
        assert_eq!(rule.command("add"), "ip -4 rule add fwmark 0x4b470000/0xffff0000 lookup 4747 priority 4747");
        assert_eq!(route.command("del"), "ip -4 route del local 0.0.0.0/0 dev lo table 4747");
        let [_, route6] = RouteEntry::for_family(&r, true, 7);
        assert_eq!(route6.command("add"), "ip -6 route add local ::/0 dev lo table 4747");
        for bad in ["rule4-zz-ffff0000-1-2@7", "route4-1@x", "tcx@eth0", "route5-1@7", "rule4-1-2-3@7"] {
            assert_eq!(RouteEntry::parse(bad), None, "{bad}");
        }
    }
}
