//! The command line: every command, argument and its help text (clap).
use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use gatekeeper::domain::{Origin, PoolAction, TcModeSetting, VerdictReason, XdpModeSetting};
use gatekeeper::protocol::Subject;

#[derive(Parser)]
#[command(name = "gatekeeper", version, about = "eBPF/XDP connection gatekeeper for mail operators and ISPs")]
pub struct Cli {
    /// Agent config file (for `run`; other commands read it only to find the socket and pin dir).
    #[arg(long, global = true, env = "GATEKEEPER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Control socket of the agent [default: /run/gatekeeper/gatekeeper.sock].
    #[arg(long, global = true, env = "GATEKEEPER_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// bpffs directory holding the pinned datapath [default: /sys/fs/bpf/gatekeeper].
    #[arg(long, global = true, env = "GATEKEEPER_PIN_DIR", value_name = "PATH")]
    pub pin_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// Abuse scores from the mail logs: connections and failed logins per source.
    #[command(subcommand)]
    Abuse(AbuseCmd),
    /// Suspended accounts and addresses (senders to undeliverable recipients).
    #[command(subcommand)]
    Suspend(SuspendCmd),
    /// The smarthost's sending limits per account (or client address).
    #[command(subcommand)]
    Limit(LimitCmd),
}

#[derive(Subcommand)]
pub enum AbuseCmd {
    /// Sources with a score: score, failed logins, connections, offences, current ban.
    List(ListArgs),
    /// Forget a source's score and offences, and lift its abuse ban.
    Forget {
        ip: IpAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SuspendCmd {
    /// Suspended accounts and addresses, with the reason and the evidence.
    List(ListArgs),
    /// Suspend an account (`alice`, `account:alice`) or an address (`192.0.2.7`).
    Add {
        #[arg(value_name = "ACCOUNT|ADDR")]
        subject: Subject,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Lift a suspension (and the block of its client address).
    Del {
        #[arg(value_name = "ACCOUNT|ADDR")]
        subject: Subject,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum LimitCmd {
    /// Set limits: `5000/day`, `100/hour,2000/day`, or `none` (no limit).
    Set {
        #[arg(value_name = "ACCOUNT|ADDR")]
        subject: Subject,
        #[arg(value_name = "LIMITS")]
        limits: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a subject's own limits (the group's or the default apply again).
    Del {
        #[arg(value_name = "ACCOUNT|ADDR")]
        subject: Subject,
        #[arg(long)]
        json: bool,
    },
    /// Limits set by hand and by group, and what each subject sent.
    List(ListArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Interface whose ingress the XDP gate guards (repeatable; replaces the config's ingress interfaces).
    #[arg(long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// Uplink: the egress gate on its TC egress, for forwarded and local traffic (repeatable; replaces the config's).
    #[arg(long = "uplink", value_name = "IFACE")]
    pub uplinks: Vec<String>,
    /// Subscriber-facing interface: the egress gate as XDP on its ingress (repeatable; replaces the config's).
    #[arg(long = "subscriber-iface", value_name = "IFACE")]
    pub subscriber_ifaces: Vec<String>,
    /// XDP attach mode: auto (native, falling back to skb), native or skb.
    #[arg(long, value_name = "MODE")]
    pub xdp_mode: Option<XdpModeSetting>,
    /// Uplink TC attach mode: auto (tcx, else clsact), tcx or clsact.
    #[arg(long, value_name = "MODE")]
    pub tc_mode: Option<TcModeSetting>,
    /// Guarded ports, e.g. `25,587` (replaces `ports` from the config).
    #[arg(long, value_name = "PORTS")]
    pub ports: Option<String>,
    /// Count what would be dropped, drop nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Directory of the state database.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct AddArgs {
    /// CIDRs or addresses.
    #[arg(required = true, value_name = "CIDR")]
    pub nets: Vec<String>,
    #[arg(long)]
    pub comment: Option<String>,
    /// Remove the entry after this long (e.g. 90m, 12h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub expire: Option<Duration>,
    /// Add even when it overlaps an entry of the other kind.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct DelArgs {
    #[arg(required = true, value_name = "CIDR")]
    pub nets: Vec<String>,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum RangeCmd {
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
        origin: Option<Origin>,
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
        origin: Option<Origin>,
    },
}

#[derive(Subcommand)]
pub enum AllowCmd {
    /// Add allow ranges.
    Add(AddArgs),
    /// Remove allow ranges.
    Del(DelArgs),
    /// List allow ranges with their hits.
    List(ListArgs),
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Add subscriber pools (CIDRs); `--action reject` answers blocked SYNs with a TCP RST,
    /// `--action explain` with an SMTP line saying why (see `[egress.explain]`).
    Add {
        #[command(flatten)]
        add: AddArgs,
        /// drop (the client times out), reject (the client fails at once with a RST) or explain
        /// (the agent answers `554 5.7.1 port 25 is blocked ...` on subscriber-facing interfaces;
        /// a RST where it cannot).
        #[arg(long, value_name = "ACTION", default_value = "drop")]
        action: PoolAction,
    },
    /// Remove pools.
    Del(DelArgs),
    /// List pools with their blocked-SYN hits.
    List(ListArgs),
}

#[derive(Subcommand)]
pub enum EgressCmd {
    /// Add ranges (CIDRs or addresses).
    Add(AddArgs),
    /// Remove ranges.
    Del(DelArgs),
    /// List ranges with their hits.
    List(ListArgs),
}

#[derive(Subcommand)]
pub enum BanCmd {
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
pub enum VerdictCmd {
    /// List verdicts (with their outcome and expiry).
    List {
        #[arg(long)]
        json: bool,
        /// Only this reason: no-ptr, fcrdns-fail, dynamic, generic, ok, tempfail, manual-ban.
        #[arg(long)]
        reason: Option<VerdictReason>,
    },
    /// Forget the verdicts of these sources (they are looked up again).
    Del {
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<IpAddr>,
    },
    /// Forget every automatic verdict (manual bans stay), or those of one reason.
    Flush {
        #[arg(long)]
        reason: Option<VerdictReason>,
    },
}

#[derive(Subcommand)]
pub enum PortsCmd {
    /// Replace the guarded ports, e.g. `ports set 25 587` or `ports set 25,587`.
    Set {
        #[arg(required = true, value_name = "PORTS")]
        ports: Vec<String>,
    },
    /// Show the guarded ports.
    List(ListArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    gatekeeper::lists::parse_duration(s).map_err(|e| e.to_string())
}
