//! The `scalechat` binary: command line, configuration, logging, signals, and the server.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use scalechat::config::{self, Config, LogFormat};
use scalechat::server::{Node, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Environment variables, listed in `--help`.
const ENV_HELP: &str = "\
Environment:
  PORT                      server.port (wins over everything)
  REDIS_HOST                redis.host, and selects transport = \"redis\" over the file
  REDIS_PORT                redis.port
  REDIS_PASSWORD            redis.password
  SCALECHAT_<SECTION>__<KEY>  any key, e.g. SCALECHAT_LIMITS__MAX_MESSAGE_CHARS=2000,
                            SCALECHAT_TRANSPORT=redis (over the file, under the names above)
  RUST_LOG                  log filter, replacing log.level
  NOTIFY_SOCKET, WATCHDOG_USEC  set by systemd for Type=notify and WatchdogSec=

Load order: built-in defaults < TOML file < SCALECHAT_* < PORT and REDIS_*.
Every key with its default: config/scalechat.toml; `scalechat check-config` prints the effective
configuration with secrets masked.";

/// A real-time chat server over WebSocket.
#[derive(Parser)]
#[command(version, about, after_help = ENV_HELP)]
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
        tokio::spawn(notify_systemd(server.node().clone(), shutdown.clone()));
        tokio::spawn(watch_signals(signals, shutdown));
        // The server runs on a worker thread, not on this one: the accept loop allocates each
        // connection's state and workers free it. Allocated here and freed there, that memory
        // stayed resident (about 4 KiB per idle connection at 10,000 connections).
        tokio::spawn(server.run()).await.context("server task")?;
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

/// Keeps systemd (`Type=notify`) informed: READY=1 once the node is ready (for the redis
/// transport: the backplane is connected), STATUS= whenever readiness changes, WATCHDOG=1 at
/// half of `WATCHDOG_USEC` if the unit sets `WatchdogSec=`, and STOPPING=1 when shutdown
/// starts. Without `NOTIFY_SOCKET` (not started by systemd) it does nothing.
async fn notify_systemd(node: Arc<Node>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        // Fed until the process exits, so a shutdown grace period longer than the watchdog
        // timeout does not get the process killed as hung.
        tokio::spawn(feed_watchdog(timeout / 2));
    }
    notify(&[NotifyState::Status("starting: waiting for the transport")]);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = poll.tick() => {}
        }
        if shutdown.is_cancelled() {
            break;
        }
        let ready = node.is_ready();
        if announced == Some(ready) {
            continue;
        }
        if ready {
            let status = format!(
                "ready: node {}, transport {:?}",
                node.id, node.config.transport
            );
            // systemd acts on the first READY=1 only; resending it after a reconnect is harmless.
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        } else if announced.is_some() {
            notify(&[NotifyState::Status(
                "degraded: transport unavailable, not ready",
            )]);
        }
        announced = Some(ready);
    }
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: closing connections"),
    ]);
}

/// Sends WATCHDOG=1 every `period` for as long as the runtime runs.
async fn feed_watchdog(period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// Sends one notification to systemd; a failure is logged (systemd will act on what it missed,
/// e.g. a start timeout) and otherwise ignored.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}
