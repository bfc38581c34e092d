//! The `scalechat` binary: command line, configuration, logging, signals, and the server.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use scalechat::config::{self, Config, LogFormat};
use scalechat::server::Server;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A real-time chat server over WebSocket.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file [default: config/scalechat.toml if it exists].
    #[arg(long, short, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve chat (the default).
    Serve,
    /// Print the effective configuration (secrets masked) and exit; non-zero on errors.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("scalechat: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Serve => {
            init_tracing(&config);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
        let addr = format!("{}:{}", config.server.host, config.server.port);
        let server = Server::bind(config, shutdown.clone())
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(watch_signals(signals, shutdown));
        server.run().await;
        Ok(())
    })
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: exit at once.
async fn watch_signals(mut signals: Signals, shutdown: CancellationToken) {
    if let Some(signal) = signals.next().await {
        info!(signal, "shutdown requested");
        shutdown.cancel();
    }
    if let Some(signal) = signals.next().await {
        warn!(signal, "second signal: exiting without waiting for clients");
        std::process::exit(1);
    }
}
