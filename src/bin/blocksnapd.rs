//! `blocksnapd`: the snapshot daemon. Parses flags, loads the config, runs the library.

use blocksnap::config::{Config, DEFAULT_CONFIG_PATH};
use blocksnap::daemon::{self, ConfigSource};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Block-device snapshot daemon: manages loop- and NBD-backed volumes, freezes their
/// filesystems briefly, and stores snapshot chains.
#[derive(Parser, Debug)]
#[command(name = "blocksnapd", version)]
struct Args {
    /// Configuration file (a missing default file means built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (overrides the config's `state_dir`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Control socket (overrides the config's `socket`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Validate the configuration, print the effective config as TOML, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let source = ConfigSource {
        explicit: args.config.is_some(),
        path: args
            .config
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        state_dir: args.state_dir.map(absolute),
        socket: args.socket.map(absolute),
    };
    let config: Config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blocksnapd: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("BLOCKSNAP_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "blocksnap={0},blocksnapd={0},warn",
                config.log.level
            ))
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Err(e) = blocksnap::failpoint::setup_from_env() {
        eprintln!("blocksnapd: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blocksnapd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(config, source)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            eprintln!("blocksnapd: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A relative path given on the command line is taken from the current directory.
fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
