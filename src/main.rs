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
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use scalechat::config::{self, Config, LogFormat};
use scalechat::node::Node;
use scalechat::server::Server;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tunes memory for many long-lived connections, unless the environment already set these
/// allocator options (`MIMALLOC_PURGE_DELAY`, `MIMALLOC_ALLOW_THP`).
///
/// - Purge at once: memory freed after a burst of handshakes goes back to the system as soon
///   as its pages are empty, rather than 10 ms later on the next allocator call of the same
///   thread (which an idle server does not make).
/// - No transparent huge pages: a 2 MiB page kept resident for a few live objects costs more
///   memory than its TLB savings are worth to a server whose per-connection state is small.
///
/// Together they take idle memory from 2.5-3.4 KB to about 1.8-2.1 KB per connection (see
/// BENCHMARKS.md).
fn tune_memory() {
    // The option number in the `mi_option_t` enum of the mimalloc 2.x that libmimalloc-sys
    // bundles (`mimalloc.h`).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option, which mimalloc reads atomically.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
    // mimalloc applies MIMALLOC_ALLOW_THP=0 with this same call when it starts, before main.
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: a flag on this process's memory map; no memory is touched.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// Returns freed memory to the system when a runtime worker goes idle after some work.
///
/// mimalloc takes back a block freed by another thread than the one that allocated it only
/// when the owner next allocates from that block's page; until then the page cannot be
/// purged. After a burst of handshakes and joins (a Redis reply is allocated by one worker and
/// freed by another), an idle worker allocates nothing, and about 400 bytes per connection
/// stayed resident on Redis setups (see BENCHMARKS.md). So a worker that parks after at least
/// [`COLLECT_AFTER_BUSY`] of work since its last collection collects its own heap. In the
/// fan-out benchmark that was fewer than 30 collections a second, 0.1 ms each on average.
mod idle_collect {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    /// Work (time between unpark and park, summed) after which parking collects.
    pub const COLLECT_AFTER_BUSY: Duration = Duration::from_millis(2);

    thread_local! {
        static UNPARKED: Cell<Option<Instant>> = const { Cell::new(None) };
        static BUSY: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    pub fn on_unpark() {
        UNPARKED.set(Some(Instant::now()));
    }

    pub fn on_park() {
        let Some(unparked) = UNPARKED.take() else {
            return;
        };
        let busy = BUSY.get() + unparked.elapsed();
        if busy < COLLECT_AFTER_BUSY {
            BUSY.set(busy);
            return;
        }
        BUSY.set(Duration::ZERO);
        // SAFETY: collects the calling thread's own heap (not forced: no abandoned segments
        // are reclaimed); no pointer is handed over.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// Environment variables, listed in `--help`.
const ENV_HELP: &str = "\
Environment:
  PORT                      server.port (wins over everything)
  REDIS_HOST                redis.host, and selects transport = \"redis\" over the file
  REDIS_PORT                redis.port
  REDIS_PASSWORD            redis.password
  DATABASE_URL              archive.url (a libpq URL; turns the PostgreSQL archive on)
  SCALECHAT_<SECTION>__<KEY>  any key, e.g. SCALECHAT_LIMITS__MAX_MESSAGE_CHARS=2000,
                            SCALECHAT_TRANSPORT=redis (over the file, under the names above)
  RUST_LOG                  log filter, replacing log.level (also on reload)
  NOTIFY_SOCKET, WATCHDOG_USEC  set by systemd for Type=notify and WatchdogSec=

Load order: built-in defaults < TOML file < SCALECHAT_* < PORT, REDIS_* and DATABASE_URL.
Signals: SIGTERM or SIGINT shuts down gracefully (a second one exits at once). SIGHUP reloads
the file and applies log.level, [limits], server.allowed_origins and server.max_connections;
it logs every changed key, and those that need a restart.
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
    /// Apply the PostgreSQL archive's schema migrations (archive.url / DATABASE_URL) and exit.
    Migrate,
}

fn main() -> ExitCode {
    tune_memory();
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
            for warning in config.warnings() {
                eprintln!("scalechat: warning: {warning}");
            }
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Migrate => migrate(&config),
        Command::Serve => {
            let log_filter = init_tracing(&config);
            for warning in config.warnings() {
                warn!("{warning}");
            }
            let reloader = Reloader {
                path: cli.config,
                current: config.clone(),
                log_filter,
            };
            match serve(config, reloader) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `scalechat migrate`: brings the archive's schema up to date, under the same advisory lock
/// the nodes take, and says what it did.
fn migrate(config: &Config) -> ExitCode {
    if !config.archive.enabled() {
        eprintln!("scalechat: archive.url is empty: set DATABASE_URL or [archive] url");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("scalechat: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scalechat::archive::migrate(&config.archive)) {
        Ok(applied) => {
            let newest = scalechat::archive::schema::MIGRATIONS
                .last()
                .map_or(0, |(v, _)| *v);
            println!(
                "{}: {applied} migration(s) applied, schema at version {newest}",
                config.archive.url.masked()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("scalechat: migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter of `log.level`. The connection pool's own warnings (one per connection
/// attempt during a PostgreSQL outage) are left out unless the level names `deadpool`: the
/// archive logs an outage once when it starts and once when it ends.
fn level_filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(level)?;
    if level.contains("deadpool") {
        return Ok(filter);
    }
    Ok(filter.add_directive("deadpool=error".parse()?))
}

/// Handle to swap the log filter on reload.
type LogFilter = reload::Handle<EnvFilter, Registry>;

fn init_tracing(config: &Config) -> LogFilter {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| level_filter(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match config.log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    handle
}

fn serve(config: Config, reloader: Reloader) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_unpark(idle_collect::on_unpark)
        .on_thread_park(idle_collect::on_park)
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals =
            Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
        let addr = format!("{}:{}", config.server.host, config.server.port);
        let server = Server::bind(config, shutdown.clone())
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(notify_systemd(server.node().clone(), shutdown.clone()));
        tokio::spawn(watch_signals(
            signals,
            shutdown,
            reloader,
            server.node().clone(),
        ));
        // The server runs on a worker thread, not on this one: the accept loop allocates each
        // connection's state and workers free it. Allocated here and freed there, that memory
        // stayed resident (about 4 KiB per idle connection at 10,000 connections).
        tokio::spawn(server.run()).await.context("server task")?;
        Ok(())
    })
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: exit at once. SIGHUP: reload.
async fn watch_signals(
    mut signals: Signals,
    shutdown: CancellationToken,
    mut reloader: Reloader,
    node: Arc<Node>,
) {
    let mut stopping = false;
    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP if !stopping => reloader.reload(&node),
            SIGHUP => {}
            _ if !stopping => {
                info!(signal, "shutdown requested");
                // Sent here, before anything stops: the runtime may end before a task runs.
                if std::env::var_os("NOTIFY_SOCKET").is_some() {
                    notify(&[
                        NotifyState::Stopping,
                        NotifyState::Status("stopping: closing connections"),
                    ]);
                }
                shutdown.cancel();
                stopping = true;
            }
            _ => {
                warn!(signal, "second signal: exiting without waiting for clients");
                std::process::exit(1);
            }
        }
    }
}

/// Re-reads the configuration on SIGHUP and applies what can change at run time.
struct Reloader {
    /// `--config`, read again on each reload.
    path: Option<PathBuf>,
    /// What the node runs with now.
    current: Config,
    log_filter: LogFilter,
}

impl Reloader {
    fn reload(&mut self, node: &Node) {
        let new = match config::load(self.path.as_deref()) {
            Ok(new) => new,
            Err(e) => {
                error!("configuration reload failed, nothing changed:\n{e}");
                return;
            }
        };
        let changes = self.current.changes(&new);
        if changes.is_empty() {
            info!("configuration reloaded: nothing changed");
            return;
        }
        for c in &changes {
            if c.reloadable {
                info!(key = %c.key, from = %c.from, to = %c.to, "configuration reloaded");
            } else {
                warn!(
                    key = %c.key, from = %c.from, to = %c.to,
                    "configuration changed, but this key takes effect only after a restart"
                );
            }
        }
        if new.log.level != self.current.log.level {
            if std::env::var_os("RUST_LOG").is_some() {
                warn!("RUST_LOG is set and replaces log.level: the log filter is unchanged");
            } else if let Err(e) = level_filter(&new.log.level)
                .map_err(|e| e.to_string())
                .and_then(|f| self.log_filter.reload(f).map_err(|e| e.to_string()))
            {
                error!(error = %e, "log.level could not be applied");
            }
        }
        node.reconfigure(new.reloadable());
        self.current = self.current.with_reloaded(&new);
    }
}

/// Keeps systemd (`Type=notify`) informed: READY=1 once the node is ready (for the redis
/// transport: the backplane is connected), STATUS= whenever readiness changes, WATCHDOG=1 at
/// half of `WATCHDOG_USEC` if the unit sets `WatchdogSec=`. STOPPING=1 is sent by
/// `watch_signals` when shutdown starts. Without `NOTIFY_SOCKET` (not started by systemd) it
/// does nothing.
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
