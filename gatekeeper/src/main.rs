//! `gatekeeper`: the agent (`gatekeeper run`) and its command-line client.
use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use gatekeeper::{
    config::{Config, XdpModeSetting},
    datapath::Role,
    lists,
    protocol::{call, RangeSpec, Request},
    store::{Origin, PoolAction, RangeKind},
};
use ipnet::IpNet;

mod cli;

const DEFAULT_CONFIG: &str = "/etc/gatekeeper/gatekeeper.toml";

#[derive(Parser)]
#[command(name = "gatekeeper", version, about = "eBPF/XDP connection gatekeeper for mail operators and ISPs")]
struct Cli {
    /// Agent config file (for `run`; other commands read it only to find the socket and pin dir).
    #[arg(long, global = true, env = "GATEKEEPER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Control socket of the agent [default: /run/gatekeeper/gatekeeper.sock].
    #[arg(long, global = true, env = "GATEKEEPER_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// bpffs directory holding the pinned datapath [default: /sys/fs/bpf/gatekeeper].
    #[arg(long, global = true, env = "GATEKEEPER_PIN_DIR", value_name = "PATH")]
    pin_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: load or adopt the datapath, attach, serve the CLI.
    Run(RunArgs),
    /// Deny ranges: guarded SYNs from these sources are dropped.
    #[command(subcommand)]
    Range(RangeCmd),
    /// Allow ranges: always pass, whatever else matches.
    #[command(subcommand)]
    Allow(AllowCmd),
    /// Manual per-source bans (IPv4 /32, IPv6 /64).
    #[command(subcommand)]
    Ban(BanCmd),
    /// Guarded destination ports (default 25).
    #[command(subcommand)]
    Ports(PortsCmd),
    /// Egress gate: subscriber dynamic pools, blocked from sending to port 25 except to smarthosts.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Egress gate: smarthosts pool subscribers may always reach (e.g. the ISP's relay on 25/587).
    #[command(subcommand)]
    Smarthost(EgressCmd),
    /// Egress gate: subscribers inside pools allowed to run their own mail server.
    #[command(subcommand)]
    Exempt(EgressCmd),
    /// Explain a source: live PTR, forward confirmation, class, policy, and what decides in the datapath.
    Check {
        ip: IpAddr,
        #[arg(long)]
        json: bool,
    },
    /// Per-source verdicts the agent learned from reverse DNS.
    #[command(subcommand)]
    Verdict(VerdictCmd),
    /// Classify hostnames offline: `IP HOSTNAME` lines on stdin (or one pair as arguments).
    Classify {
        /// Operator rules: `class regex` lines or a Postfix pcre table [default: the config's].
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Domain suffix whose hosts are always `named` (repeatable) [default: the config's].
        #[arg(long = "trust", value_name = "SUFFIX")]
        trusted: Vec<String>,
        #[arg(long)]
        json: bool,
        /// One source address and its hostname.
        #[arg(num_args = 0..=2, value_names = ["IP", "HOSTNAME"])]
        pair: Vec<String>,
    },
    /// Programs, interfaces, modes, map fill levels, agent up/down.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Decision counters per interface and the top ranges by hits.
    Stats {
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds with rates per second.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<u64>,
        /// How many ranges to list by hits.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Detach everything and remove every pin (the state database stays).
    Unload,
}

#[derive(Args)]
struct RunArgs {
    /// Interface whose ingress the XDP gate guards (repeatable; replaces the config's ingress interfaces).
    #[arg(long = "iface", value_name = "IFACE")]
    ifaces: Vec<String>,
    /// Uplink: the egress gate on its TC egress, for forwarded and local traffic (repeatable; replaces the config's).
    #[arg(long = "uplink", value_name = "IFACE")]
    uplinks: Vec<String>,
    /// Subscriber-facing interface: the egress gate as XDP on its ingress (repeatable; replaces the config's).
    #[arg(long = "subscriber-iface", value_name = "IFACE")]
    subscriber_ifaces: Vec<String>,
    /// XDP attach mode: auto (native, falling back to skb), native or skb.
    #[arg(long, value_name = "MODE")]
    xdp_mode: Option<XdpModeSetting>,
    /// Uplink TC attach mode: auto (tcx, else clsact), tcx or clsact.
    #[arg(long, value_name = "MODE")]
    tc_mode: Option<gatekeeper::datapath::TcModeSetting>,
    /// Guarded ports, e.g. `25,587` (replaces `ports` from the config).
    #[arg(long, value_name = "PORTS")]
    ports: Option<String>,
    /// Count what would be dropped, drop nothing.
    #[arg(long)]
    dry_run: bool,
    /// Directory of the state database.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct AddArgs {
    /// CIDRs or addresses.
    #[arg(required = true, value_name = "CIDR")]
    nets: Vec<String>,
    #[arg(long)]
    comment: Option<String>,
    /// Remove the entry after this long (e.g. 90m, 12h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    expire: Option<Duration>,
    /// Add even when it overlaps an entry of the other kind.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DelArgs {
    #[arg(required = true, value_name = "CIDR")]
    nets: Vec<String>,
}

#[derive(Args)]
struct ListArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RangeCmd {
    /// Add deny ranges.
    Add(AddArgs),
    /// Remove deny ranges.
    Del(DelArgs),
    /// List deny ranges with their hits.
    List {
        #[arg(long)]
        json: bool,
        /// Only ranges of this origin: manual, imported or learned.
        #[arg(long)]
        origin: Option<String>,
    },
    /// Import a list: CIDR per line (`#` comments), Spamhaus DROP (`CIDR ; SBLnnn`) or its JSON lines.
    Import {
        /// The list file, or `-` for standard input.
        file: PathBuf,
        /// Import the good lines and report the bad ones instead of importing nothing.
        #[arg(long)]
        skip_bad: bool,
        /// Also remove ranges imported earlier from a file of this name that the list no longer has.
        #[arg(long)]
        replace: bool,
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expire: Option<Duration>,
        /// Import even entries that overlap allow ranges.
        #[arg(long)]
        force: bool,
        /// With --replace, accept a list with no entries (which removes every range imported from it).
        #[arg(long)]
        allow_empty: bool,
    },
    /// Print deny ranges in a format `range import` reads back.
    Export {
        /// Only ranges of this origin: manual, imported or learned.
        #[arg(long)]
        origin: Option<String>,
    },
}

#[derive(Subcommand)]
enum AllowCmd {
    /// Add allow ranges.
    Add(AddArgs),
    /// Remove allow ranges.
    Del(DelArgs),
    /// List allow ranges with their hits.
    List(ListArgs),
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Add subscriber pools (CIDRs); `--action reject` answers blocked SYNs with a TCP RST.
    Add {
        #[command(flatten)]
        add: AddArgs,
        /// drop (the client times out) or reject (the client fails at once with a RST).
        #[arg(long, value_name = "ACTION", default_value = "drop")]
        action: PoolAction,
    },
    /// Remove pools.
    Del(DelArgs),
    /// List pools with their blocked-SYN hits.
    List(ListArgs),
}

#[derive(Subcommand)]
enum EgressCmd {
    /// Add ranges (CIDRs or addresses).
    Add(AddArgs),
    /// Remove ranges.
    Del(DelArgs),
    /// List ranges with their hits.
    List(ListArgs),
}

#[derive(Subcommand)]
enum BanCmd {
    /// Ban sources (IPv6 addresses ban their /64).
    Add {
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<IpAddr>,
        #[arg(long)]
        comment: Option<String>,
        /// Lift the ban after this long (e.g. 1h); default: never.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expire: Option<Duration>,
    },
    /// Lift bans.
    Del {
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<IpAddr>,
    },
    /// List manual bans.
    List(ListArgs),
}

#[derive(Subcommand)]
enum VerdictCmd {
    /// List verdicts (with their outcome and expiry).
    List {
        #[arg(long)]
        json: bool,
        /// Only this reason: no-ptr, fcrdns-fail, dynamic, generic, ok, tempfail, manual-ban.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Forget the verdicts of these sources (they are looked up again).
    Del {
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<IpAddr>,
    },
    /// Forget every automatic verdict (manual bans stay), or those of one reason.
    Flush {
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum PortsCmd {
    /// Replace the guarded ports, e.g. `ports set 25 587` or `ports set 25,587`.
    Set {
        #[arg(required = true, value_name = "PORTS")]
        ports: Vec<String>,
    },
    /// Show the guarded ports.
    List(ListArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    lists::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_nets(args: &[String]) -> Result<Vec<IpNet>> {
    args.iter().map(|s| lists::parse_net(s).map_err(Into::into)).collect()
}

fn parse_origin(s: Option<&str>) -> Result<Option<Origin>> {
    s.map(|s| match s {
        "manual" => Ok(Origin::Manual),
        "imported" => Ok(Origin::Imported),
        "learned" => Ok(Origin::Learned),
        other => bail!("invalid --origin {other:?}: expected manual, imported or learned"),
    })
    .transpose()
}

/// Where to reach the agent and its pins.
struct Target {
    socket: PathBuf,
    pin_dir: PathBuf,
}

fn load_config(cli: &Cli) -> Result<Config> {
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    Ok(Config::load(&path, required)?)
}

fn target(cli: &Cli) -> Result<Target> {
    if let (Some(socket), Some(pin_dir)) = (&cli.socket, &cli.pin_dir) {
        return Ok(Target { socket: socket.clone(), pin_dir: pin_dir.clone() });
    }
    let cfg = load_config(cli)?;
    Ok(Target { socket: cli.socket.clone().unwrap_or(cfg.socket), pin_dir: cli.pin_dir.clone().unwrap_or(cfg.pin_dir) })
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run(_)) {
        // A CLI piped into `head` should end quietly, not panic.
        // SAFETY: setting a signal disposition before any threads exist.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Run(args) => run(&cli, args),
        Cmd::Range(cmd) => range(&target(&cli)?, cmd),
        Cmd::Allow(cmd) => allow(&target(&cli)?, cmd),
        Cmd::Ban(cmd) => ban(&target(&cli)?, cmd),
        Cmd::Ports(cmd) => ports(&target(&cli)?, cmd),
        Cmd::Pool(cmd) => {
            let t = target(&cli)?;
            match cmd {
                PoolCmd::Add { add: a, action } => add(&t, RangeKind::Pool, a, Some(*action)),
                PoolCmd::Del(a) => del(&t, RangeKind::Pool, a),
                PoolCmd::List(l) => list(&t, RangeKind::Pool, l.json, None),
            }
        }
        Cmd::Smarthost(cmd) => egress(&target(&cli)?, RangeKind::Smarthost, cmd),
        Cmd::Exempt(cmd) => egress(&target(&cli)?, RangeKind::Exempt, cmd),
        Cmd::Verdict(cmd) => verdict(&target(&cli)?, cmd),
        Cmd::Check { ip, json } => {
            let data = call(&target(&cli)?.socket, &Request::Check { ip: *ip })?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                cli::print_check(&data);
            }
            Ok(())
        }
        Cmd::Classify { rules, trusted, json, pair } => classify(&cli, rules.as_deref(), trusted, *json, pair),
        Cmd::Status { json } => cli::status(&target(&cli)?.socket, &target(&cli)?.pin_dir, *json),
        Cmd::Stats { json, watch, top } => {
            let t = target(&cli)?;
            cli::stats(&t.socket, &t.pin_dir, *json, *watch, *top)
        }
        Cmd::Unload => unload(&target(&cli)?),
    }
}

fn run(cli: &Cli, args: &RunArgs) -> Result<()> {
    let mut cfg = load_config(cli)?;
    for (role, names) in
        [(Role::Ingress, &args.ifaces), (Role::Uplink, &args.uplinks), (Role::Subscriber, &args.subscriber_ifaces)]
    {
        if !names.is_empty() {
            cfg.set_ifaces(role, names)?;
        }
    }
    if let Some(m) = args.xdp_mode {
        cfg.xdp_mode = m;
    }
    if let Some(m) = args.tc_mode {
        cfg.tc_mode = m;
    }
    if let Some(p) = &args.ports {
        cfg.ports = Some(gatekeeper::config::parse_ports(p).context("--ports")?);
    }
    if args.dry_run {
        cfg.dry_run = true;
    }
    if let Some(d) = &args.state_dir {
        cfg.state_dir = d.clone();
    }
    if let Some(s) = &cli.socket {
        cfg.socket = s.clone();
    }
    if let Some(p) = &cli.pin_dir {
        cfg.pin_dir = p.clone();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log_level))
        .with_context(|| format!("invalid log_level {:?}", cfg.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    rt.block_on(gatekeeper::agent::run(cfg)).context("gatekeeper agent")
}

fn egress(t: &Target, kind: RangeKind, cmd: &EgressCmd) -> Result<()> {
    match cmd {
        EgressCmd::Add(a) => add(t, kind, a, None),
        EgressCmd::Del(a) => del(t, kind, a),
        EgressCmd::List(l) => list(t, kind, l.json, None),
    }
}

fn add(t: &Target, kind: RangeKind, a: &AddArgs, action: Option<PoolAction>) -> Result<()> {
    let nets = parse_nets(&a.nets)?;
    let ranges = nets.iter().map(|n| RangeSpec { net: *n, comment: a.comment.clone() }).collect();
    let data = call(
        &t.socket,
        &Request::RangeAdd {
            kind,
            ranges,
            origin: Origin::Manual,
            source: "cli".into(),
            expire_secs: a.expire.map(|d| d.as_secs()),
            force: a.force,
            skip_existing: false,
            replace: false,
            action,
        },
    )?;
    let what = match action {
        Some(a) => format!("{} ({})", kind.what(), a.as_str()),
        None => kind.what().to_string(),
    };
    for n in &nets {
        println!("added {what} {n}");
    }
    let _ = data;
    Ok(())
}

fn del(t: &Target, kind: RangeKind, a: &DelArgs) -> Result<()> {
    let nets = parse_nets(&a.nets)?;
    call(&t.socket, &Request::RangeDel { kind, nets: nets.clone() })?;
    for n in &nets {
        println!("removed {} {n}", kind.what());
    }
    Ok(())
}

fn list(t: &Target, kind: RangeKind, json: bool, origin: Option<Origin>) -> Result<()> {
    let data = call(&t.socket, &Request::RangeList { kind })?;
    let mut rows: Vec<serde_json::Value> = serde_json::from_value(data)?;
    if let Some(o) = origin {
        let o = serde_json::to_value(o)?;
        rows.retain(|r| r["origin"] == o);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        cli::print_ranges(&rows);
    }
    Ok(())
}

fn range(t: &Target, cmd: &RangeCmd) -> Result<()> {
    match cmd {
        RangeCmd::Add(a) => add(t, RangeKind::Deny, a, None),
        RangeCmd::Del(a) => del(t, RangeKind::Deny, a),
        RangeCmd::List { json, origin } => list(t, RangeKind::Deny, *json, parse_origin(origin.as_deref())?),
        RangeCmd::Import { file, skip_bad, replace, expire, force, allow_empty } => import(
            t,
            file,
            ImportOpts {
                skip_bad: *skip_bad,
                replace: *replace,
                expire: *expire,
                force: *force,
                allow_empty: *allow_empty,
            },
        ),
        RangeCmd::Export { origin } => {
            let origin = parse_origin(origin.as_deref())?;
            let data = call(&t.socket, &Request::RangeList { kind: RangeKind::Deny })?;
            let rows: Vec<serde_json::Value> = serde_json::from_value(data)?;
            println!("# gatekeeper deny ranges; re-import with `gatekeeper range import FILE`");
            for r in rows {
                if origin.is_some_and(|o| serde_json::to_value(o).ok().as_ref() != Some(&r["origin"])) {
                    continue;
                }
                match r["comment"].as_str() {
                    Some(c) if !c.is_empty() => {
                        println!("{} # {}", r["net"].as_str().unwrap_or(""), c.replace('\n', " "))
                    }
                    _ => println!("{}", r["net"].as_str().unwrap_or("")),
                }
            }
            Ok(())
        }
    }
}

struct ImportOpts {
    skip_bad: bool,
    replace: bool,
    expire: Option<Duration>,
    force: bool,
    allow_empty: bool,
}

fn import(t: &Target, file: &Path, o: ImportOpts) -> Result<()> {
    let ImportOpts { skip_bad, replace, expire, force, allow_empty } = o;
    let (text, name) = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("read standard input")?;
        (s, "stdin".to_string())
    } else {
        let s = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        (s, file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
    };
    let (entries, errors) = lists::parse_list(&text);
    if !errors.is_empty() {
        if !skip_bad {
            return Err(gatekeeper::Error::BadListLines { path: file.display().to_string(), errors }.into());
        }
        for e in &errors {
            eprintln!("warning: {}: line {}: {} (skipped)", file.display(), e.line, e.message);
        }
    }
    if replace && entries.is_empty() && !allow_empty {
        bail!(
            "{} has no entries: with --replace that would remove every range imported from it (a failed download?); nothing was changed. Pass --allow-empty if that is what you want",
            file.display()
        );
    }
    let ranges: Vec<RangeSpec> = entries.into_iter().map(|e| RangeSpec { net: e.net, comment: e.comment }).collect();
    let total = ranges.len();
    let data = call(
        &t.socket,
        &Request::RangeAdd {
            kind: RangeKind::Deny,
            ranges,
            origin: Origin::Imported,
            source: format!("import:{name}"),
            expire_secs: expire.map(|d| d.as_secs()),
            force,
            skip_existing: true,
            replace,
            action: None,
        },
    )?;
    println!(
        "imported {} from {}: {} new, {} already present, {} removed, {} bad line(s) skipped",
        total,
        file.display(),
        data["added"],
        data["unchanged"],
        data["removed"],
        errors.len()
    );
    Ok(())
}

fn allow(t: &Target, cmd: &AllowCmd) -> Result<()> {
    match cmd {
        AllowCmd::Add(a) => add(t, RangeKind::Allow, a, None),
        AllowCmd::Del(a) => del(t, RangeKind::Allow, a),
        AllowCmd::List(l) => list(t, RangeKind::Allow, l.json, None),
    }
}

fn ban(t: &Target, cmd: &BanCmd) -> Result<()> {
    match cmd {
        BanCmd::Add { addrs, comment, expire } => {
            let data = call(
                &t.socket,
                &Request::BanAdd {
                    addrs: addrs.clone(),
                    comment: comment.clone(),
                    expire_secs: expire.map(|d| d.as_secs()),
                },
            )?;
            for b in data.as_array().into_iter().flatten() {
                println!("banned {}", b["key"].as_str().unwrap_or("?"));
            }
            Ok(())
        }
        BanCmd::Del { addrs } => {
            let data = call(&t.socket, &Request::BanDel { addrs: addrs.clone() })?;
            for b in data["removed"].as_array().into_iter().flatten() {
                println!("lifted ban on {}", b["key"].as_str().unwrap_or("?"));
            }
            Ok(())
        }
        BanCmd::List(l) => {
            let data = call(&t.socket, &Request::BanList)?;
            if l.json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                cli::print_bans(data.as_array().map(Vec::as_slice).unwrap_or_default());
            }
            Ok(())
        }
    }
}

fn ports(t: &Target, cmd: &PortsCmd) -> Result<()> {
    match cmd {
        PortsCmd::Set { ports } => {
            let ports = gatekeeper::config::parse_ports(&ports.join(","))?;
            let data = call(&t.socket, &Request::PortsSet { ports })?;
            println!("guarded ports: {}", cli::join(&data["ports"]));
            Ok(())
        }
        PortsCmd::List(l) => {
            let data = call(&t.socket, &Request::PortsList)?;
            if l.json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                println!("{}", cli::join(&data["ports"]));
            }
            Ok(())
        }
    }
}

/// A verdict reason by its operator-facing name.
fn parse_reason(name: &str) -> Result<u32> {
    use gatekeeper_common::{counters::counter_name, verdict_reason as vr, Counter};
    (0..vr::COUNT).find(|r| counter_name(Counter::verdict_drop(*r)) == name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown reason {name:?}: expected no-ptr, fcrdns-fail, dynamic, generic, ok, tempfail or manual-ban"
        )
    })
}

fn verdict(t: &Target, cmd: &VerdictCmd) -> Result<()> {
    match cmd {
        VerdictCmd::List { json, reason } => {
            let reason = reason.as_deref().map(parse_reason).transpose()?;
            let data = call(&t.socket, &Request::VerdictList { reason })?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                cli::print_verdicts(data.as_array().map(Vec::as_slice).unwrap_or_default());
            }
        }
        VerdictCmd::Del { addrs } => {
            let data = call(&t.socket, &Request::VerdictDel { addrs: addrs.clone() })?;
            for v in data["removed"].as_array().into_iter().flatten() {
                println!("forgot the verdict for {}", v["key"].as_str().unwrap_or("?"));
            }
        }
        VerdictCmd::Flush { reason } => {
            let reason = reason.as_deref().map(parse_reason).transpose()?;
            let data = call(&t.socket, &Request::VerdictFlush { reason })?;
            println!("removed {} verdict(s)", data["removed"]);
        }
    }
    Ok(())
}

fn classify(cli: &Cli, rules: Option<&Path>, trusted: &[String], json: bool, pair: &[String]) -> Result<()> {
    use gatekeeper::classify::{classify_lines, load_rules, Classifier};
    if pair.len() == 1 {
        bail!("give both an address and a hostname, or none to read `IP HOSTNAME` lines from standard input");
    }
    let cfg = load_config(cli)?;
    let rules = match rules.or(cfg.classifier.rules.as_deref()) {
        Some(p) => Some(load_rules(p)?),
        None => None,
    };
    let trusted = if trusted.is_empty() { cfg.classifier.trusted.clone() } else { trusted.to_vec() };
    let classifier = Classifier::new(rules, trusted);
    let stdout = std::io::stdout().lock();
    if pair.len() == 2 {
        let line = format!("{} {}\n", pair[0], pair[1]);
        classify_lines(&classifier, line.as_bytes(), stdout, json)?;
    } else {
        classify_lines(&classifier, std::io::stdin().lock(), stdout, json)?;
    }
    Ok(())
}

fn unload(t: &Target) -> Result<()> {
    let removed: Vec<String> = match call(&t.socket, &Request::Unload) {
        Ok(data) => {
            println!("agent unloaded the datapath and exited");
            serde_json::from_value(data["removed"].clone()).unwrap_or_default()
        }
        Err(gatekeeper::protocol::ClientError::NotRunning(_)) => {
            let layout = gatekeeper::datapath::PinLayout::new(&t.pin_dir);
            if !t.pin_dir.exists() {
                println!("nothing to unload: nothing pinned at {}", t.pin_dir.display());
                return Ok(());
            }
            layout.unload()?
        }
        Err(e) => return Err(e.into()),
    };
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}
