//! `gatekeeper`: the agent (`gatekeeper run`) and its command-line client;
//! the commands live in [`cli`].
use clap::Parser;

mod cli;

fn main() {
    let cli = cli::args::Cli::parse();
    if !matches!(cli.cmd, cli::args::Cmd::Run(_)) {
        // A CLI piped into `head` should end quietly, not panic.
        // SAFETY: setting a signal disposition before any threads exist.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
