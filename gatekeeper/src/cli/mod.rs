//! The command-line client and `gatekeeper run`: finds the agent (socket,
//! pin directory), then hands each command to its noun's module:
//! [`ranges`] (range, allow, pool, smarthost, exempt), [`verdicts`] (ban,
//! verdict, check, classify), [`status`] (status, stats, ports, unload),
//! [`mail`] (abuse, suspend, limit).
pub mod args;
mod mail;
mod output;
mod ranges;
mod status;
mod verdicts;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use gatekeeper::{
    config::Config,
    domain::{RangeKind, Role},
};

use args::{AllowCmd, Cli, Cmd, EgressCmd, PoolCmd, RangeCmd, RunArgs};

const DEFAULT_CONFIG: &str = "/etc/gatekeeper/gatekeeper.toml";

/// Where to reach the agent and its pins.
pub struct Target {
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
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

pub fn run(cli: Cli) -> Result<()> {
    if let Cmd::Run(args) = &cli.cmd {
        return run_agent(&cli, args);
    }
    if let Cmd::Classify { rules, trusted, json, pair } = &cli.cmd {
        return verdicts::classify(&load_config(&cli)?, rules.as_deref(), trusted, *json, pair);
    }
    let t = target(&cli)?;
    match &cli.cmd {
        Cmd::Run(_) | Cmd::Classify { .. } => unreachable!("handled above"),
        Cmd::Range(cmd) => match cmd {
            RangeCmd::Add(a) => ranges::add(&t, RangeKind::Deny, a, None),
            RangeCmd::Del(a) => ranges::del(&t, RangeKind::Deny, a),
            RangeCmd::List { json, origin } => ranges::list(&t, RangeKind::Deny, *json, *origin),
            RangeCmd::Import { file, skip_bad, replace, expire, force, allow_empty } => ranges::import(
                &t,
                file,
                ranges::ImportOpts {
                    skip_bad: *skip_bad,
                    replace: *replace,
                    expire: *expire,
                    force: *force,
                    allow_empty: *allow_empty,
                },
            ),
            RangeCmd::Export { origin } => ranges::export(&t, *origin),
        },
        Cmd::Allow(cmd) => match cmd {
            AllowCmd::Add(a) => ranges::add(&t, RangeKind::Allow, a, None),
            AllowCmd::Del(a) => ranges::del(&t, RangeKind::Allow, a),
            AllowCmd::List(l) => ranges::list(&t, RangeKind::Allow, l.json, None),
        },
        Cmd::Pool(cmd) => match cmd {
            PoolCmd::Add { add, action } => ranges::add(&t, RangeKind::Pool, add, Some(*action)),
            PoolCmd::Del(a) => ranges::del(&t, RangeKind::Pool, a),
            PoolCmd::List(l) => ranges::list(&t, RangeKind::Pool, l.json, None),
        },
        Cmd::Smarthost(cmd) => egress(&t, RangeKind::Smarthost, cmd),
        Cmd::Exempt(cmd) => egress(&t, RangeKind::Exempt, cmd),
        Cmd::Ban(cmd) => verdicts::ban(&t, cmd),
        Cmd::Verdict(cmd) => verdicts::verdict(&t, cmd),
        Cmd::Check { ip, json } => verdicts::check(&t, *ip, *json),
        Cmd::Ports(cmd) => status::ports(&t, cmd),
        Cmd::Status { json } => status::status(&t, *json),
        Cmd::Stats { json, watch, top } => status::stats(&t.socket, &t.pin_dir, *json, *watch, *top),
        Cmd::Unload => status::unload(&t),
        Cmd::Abuse(cmd) => mail::abuse(&t, cmd),
        Cmd::Suspend(cmd) => mail::suspend(&t, cmd),
        Cmd::Limit(cmd) => mail::limit(&t, cmd),
    }
}

fn egress(t: &Target, kind: RangeKind, cmd: &EgressCmd) -> Result<()> {
    match cmd {
        EgressCmd::Add(a) => ranges::add(t, kind, a, None),
        EgressCmd::Del(a) => ranges::del(t, kind, a),
        EgressCmd::List(l) => ranges::list(t, kind, l.json, None),
    }
}

/// `gatekeeper run`: the config with the command line's overrides, logging,
/// and the agent on a two-thread runtime.
fn run_agent(cli: &Cli, args: &RunArgs) -> Result<()> {
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
