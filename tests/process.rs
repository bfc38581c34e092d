//! The real `scalechat` binary as an operator runs it: the example config, `check-config`,
//! configuration errors and precedence, `--version`, graceful shutdown on SIGTERM, and the
//! node's memory under a client that never reads.
//!
//! Every child runs in a fresh scratch directory (so it never picks up
//! `config/scalechat.toml` unless told to) with the `SCALECHAT_*`, `PORT` and `REDIS_*`
//! variables of the test's own environment removed, and is killed if the test fails.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Client, RawClient, WAIT, readyz};
use futures_util::StreamExt;
use scalechat::config::{self, Config};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The example config, by absolute path: children run elsewhere.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/scalechat.toml");

/// A directory of its own for one child, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "scalechat-process-{}-{test}-{n}",
            std::process::id()
        ));
        // A leftover from an earlier run with the same pid would only hold stale files.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// Writes `name` in the directory and returns its path.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `scalechat` in `dir`, without the test environment's configuration variables.
fn scalechat(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalechat"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with(config::ENV_PREFIX) || name == "PORT" || name.starts_with("REDIS_") {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// What a command that exits by itself printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `scalechat args` to completion in a fresh directory.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let scratch = Scratch::new("run");
    run_in(&scratch, args, env).await
}

async fn run_in(scratch: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Output {
    let output = tokio::time::timeout(WAIT, scalechat(&scratch.0, args, env).output())
        .await
        .unwrap_or_else(|_| panic!("scalechat {args:?} did not exit within {WAIT:?}"))
        .expect("run scalechat");
    Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `check-config` with `env`: the effective configuration it printed.
async fn effective(args: &[&str], env: &[(&str, &str)]) -> Config {
    let out = run(&[args, &["check-config"]].concat(), env).await;
    assert!(out.status.success(), "{}", out.stderr);
    config::from_toml(&out.stdout)
        .unwrap_or_else(|e| panic!("check-config printed invalid TOML ({e}):\n{}", out.stdout))
}

/// The dotted names of every leaf key in a TOML document.
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (name, value) in table {
        let key = format!("{prefix}{name}");
        match value {
            toml::Value::Table(inner) => keys(inner, &format!("{key}."), out),
            _ => {
                out.insert(key);
            }
        }
    }
}

#[test]
fn example_config_sets_every_key_to_its_default() {
    let text = include_str!("../config/scalechat.toml");
    // Parsing also proves that every key in the file is known.
    assert_eq!(config::from_toml(text).unwrap(), Config::default());
    let (mut example, mut all) = (BTreeSet::new(), BTreeSet::new());
    keys(&toml::from_str(text).unwrap(), "", &mut example);
    keys(
        &toml::from_str(&Config::default().to_toml()).unwrap(),
        "",
        &mut all,
    );
    assert_eq!(example, all, "the example config should list every key");
}

#[tokio::test]
async fn check_config_prints_the_example_config_as_toml() {
    assert_eq!(
        effective(&["--config", EXAMPLE], &[]).await,
        Config::default()
    );
}

#[tokio::test]
async fn check_config_warns_of_token_auth_without_allowed_origins() {
    let secret = (
        "SCALECHAT_AUTH__JWT_SECRET",
        "0123456789abcdef0123456789abcdef",
    );
    let out = run(&["--config", EXAMPLE, "check-config"], &[secret]).await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("warning: server.allowed_origins"),
        "{}",
        out.stderr
    );
    let origins = (
        "SCALECHAT_SERVER__ALLOWED_ORIGINS",
        r#"["https://chat.example.com"]"#,
    );
    let out = run(&["--config", EXAMPLE, "check-config"], &[secret, origins]).await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
    let out = run(&["--config", EXAMPLE, "check-config"], &[]).await;
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
}

#[tokio::test]
async fn check_config_masks_the_redis_password() {
    let out = run(
        &["--config", EXAMPLE, "check-config"],
        &[("REDIS_PASSWORD", "hunter2")],
    )
    .await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains(r#"password = "********""#),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"));
    assert!(config::from_toml(&out.stdout).is_ok(), "{}", out.stdout);
}

#[tokio::test]
async fn invalid_config_names_every_bad_key_and_exits_nonzero() {
    let scratch = Scratch::new("invalid");
    let file = scratch.file(
        "bad.toml",
        "[server]\ncolour = \"blue\"\n\n[limits]\nmax_message_chars = \"many\"\n",
    );
    let out = run_in(
        &scratch,
        &["--config", file.to_str().unwrap(), "check-config"],
        &[("SCALECHAT_LIMITS__PING_INTERVAL_SECS", "0")],
    )
    .await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    for key in [
        "server.colour",
        "limits.max_message_chars",
        "limits.ping_interval_secs",
    ] {
        assert!(
            out.stderr.contains(key),
            "stderr should name {key}:\n{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn missing_config_file_is_reported_and_nothing_serves() {
    for args in [
        &["--config", "/nonexistent.toml"][..],
        &["--config", "/nonexistent.toml", "check-config"],
    ] {
        let out = run(args, &[]).await;
        assert!(!out.status.success(), "{args:?}");
        assert!(
            out.stderr.contains("/nonexistent.toml") && out.stderr.contains("not found"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn plain_port_beats_scalechat_env_which_beats_the_file() {
    let scratch = Scratch::new("precedence");
    let file = scratch.file("port.toml", "[server]\nport = 7001\n");
    let args = ["--config", file.to_str().unwrap()];
    let env_port = ("SCALECHAT_SERVER__PORT", "7002");
    assert_eq!(effective(&args, &[]).await.server.port, 7001);
    assert_eq!(effective(&args, &[env_port]).await.server.port, 7002);
    let all = effective(&args, &[env_port, ("PORT", "7003")]).await;
    assert_eq!(all.server.port, 7003);
}

#[tokio::test]
async fn version_flag_prints_the_version() {
    let out = run(&["--version"], &[]).await;
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.stdout.trim(),
        concat!("scalechat ", env!("CARGO_PKG_VERSION"))
    );
}

/// A serving `scalechat` child; killed when dropped, its log printed if the test failed.
struct Running {
    child: Child,
    addr: SocketAddr,
    scratch: Scratch,
}

impl Running {
    /// Starts `scalechat` on a free port of 127.0.0.1 and waits until `/readyz` says 200.
    async fn start(test: &str, env: &[(&str, &str)]) -> Running {
        Running::start_in(Scratch::new(test), &[], env).await
    }

    /// [`Running::start`] in `scratch`, with command line `args`.
    async fn start_in(scratch: Scratch, args: &[&str], env: &[(&str, &str)]) -> Running {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let log = File::create(scratch.0.join("stderr.log")).expect("create log file");
        let port_text = port.to_string();
        let mut env = env.to_vec();
        env.extend([
            ("PORT", port_text.as_str()),
            ("SCALECHAT_SERVER__HOST", "127.0.0.1"),
        ]);
        let child = scalechat(&scratch.0, args, &env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn scalechat");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut running = Running {
            child,
            addr,
            scratch,
        };
        running.wait_ready().await;
        running
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        while readyz(self.addr).await != Some(200) {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                panic!("scalechat exited before it was ready: {status}");
            }
            assert!(Instant::now() < deadline, "scalechat not ready in {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM, as systemd and Kubernetes do.
    fn terminate(&self) {
        common::send_signal(self.child.id().expect("child still running"), "-TERM");
    }

    /// The exit status, failing if the process is still running after `limit`.
    async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("scalechat still running after {limit:?}"))
            .expect("wait for scalechat")
    }

    fn url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// What the server has logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.0.join("stderr.log")).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the log never said {text:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.scratch.0.join("stderr.log"));
            eprintln!("--- scalechat stderr ---\n{}", log.unwrap_or_default());
        }
    }
}

/// Connects a chat client and reads its `welcome` and `joined`.
async fn chat_client(server: &Running, query: &str) -> Client {
    let mut client = Client::connect(&server.url(query)).await;
    client.expect("welcome").await;
    client.expect("joined").await;
    client
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_zero() {
    const GRACE: u64 = 10;
    let grace = GRACE.to_string();
    let mut server = Running::start(
        "sigterm",
        &[("SCALECHAT_SERVER__SHUTDOWN_GRACE_SECS", &grace)],
    )
    .await;
    let mut alice = chat_client(&server, "name=alice").await;
    let mut bob = chat_client(&server, "name=bob").await;

    let signalled = Instant::now();
    server.terminate();
    for client in [&mut alice, &mut bob] {
        let (code, reason, _) = client.closed().await;
        assert_eq!(code, 1001, "{reason}");
        assert!(reason.contains("shutting down"), "{reason}");
        // Keep reading: that sends our close reply, and the server then ends the connection.
        let ended = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = client.ws.next().await {}
        });
        ended
            .await
            .expect("server ends the connection after the close");
    }
    assert_ne!(readyz(server.addr).await, Some(200), "ready while stopping");

    let status = server.exit_within(Duration::from_secs(GRACE + 5)).await;
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(GRACE),
        "with every client closed, shutdown should not wait out the grace period"
    );
}

#[tokio::test]
async fn sigterm_exits_after_the_grace_period_despite_a_silent_client() {
    // Below the server's 5 s wait for a close reply, so only the grace period can end it.
    const GRACE: u64 = 2;
    const MARGIN: Duration = Duration::from_millis(2500);
    let grace = GRACE.to_string();
    let mut server = Running::start(
        "silent",
        &[("SCALECHAT_SERVER__SHUTDOWN_GRACE_SECS", &grace)],
    )
    .await;
    let mut silent = RawClient::connect(server.addr, "/ws?name=silent").await;
    // welcome and joined: the session is running. From here on the client neither reads
    // nor writes, so it never answers the server's close.
    for _ in 0..2 {
        assert_eq!(silent.recv_frame().await.expect("a frame").0, 0x1);
    }

    let signalled = Instant::now();
    server.terminate();
    let status = server
        .exit_within(Duration::from_secs(GRACE) + MARGIN)
        .await;
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(GRACE),
        "exited before the grace period although a client was still open"
    );
    // What the client would have read: the close, then the end of the stream.
    assert_eq!(silent.close_code().await, 1001);
}

#[tokio::test]
async fn redis_host_selects_redis_over_the_file_but_not_over_scalechat_transport() {
    use scalechat::config::TransportKind;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/scalechat.toml");
    let args = ["--config", example];
    assert_eq!(effective(&args, &[]).await.transport, TransportKind::Memory);
    let host = ("REDIS_HOST", "10.1.2.3");
    let cfg = effective(&args, &[host]).await;
    assert_eq!(
        (cfg.transport, cfg.redis.host.as_str()),
        (TransportKind::Redis, "10.1.2.3")
    );
    let forced = effective(&args, &[host, ("SCALECHAT_TRANSPORT", "memory")]).await;
    assert_eq!(forced.transport, TransportKind::Memory);
}

#[tokio::test]
async fn help_documents_flags_and_environment_variables() {
    let out = run(&["--help"], &[]).await;
    assert!(out.status.success(), "{}", out.stderr);
    for word in [
        "--config",
        "check-config",
        "PORT",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_PASSWORD",
        "SCALECHAT_<SECTION>__<KEY>",
        "RUST_LOG",
    ] {
        assert!(
            out.stdout.contains(word),
            "--help does not mention {word}:\n{}",
            out.stdout
        );
    }
}

/// The status of an upgrade request to `/ws` sent with `origin`.
async fn upgrade_status(server: &Running, origin: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = server.url("name=o").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", origin.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// Sends `text` in the first room and returns the `ack` or the `error` that answers it.
async fn say_and_read(client: &mut Client, text: &str) -> serde_json::Value {
    client
        .send(serde_json::json!({"type":"send","message":text}))
        .await;
    loop {
        let frame = client.recv().await;
        if frame["type"] == "error" || frame["type"] == "ack" {
            return frame;
        }
    }
}

#[tokio::test]
async fn sighup_reloads_limits_and_origins_and_logs_what_needs_a_restart() {
    let scratch = Scratch::new("sighup");
    let config = scratch.file(
        "scalechat.toml",
        "[limits]\nmax_message_chars = 100\n\n[log]\nlevel = \"info\"\n",
    );
    let config_arg = config.to_str().unwrap().to_owned();
    let server = Running::start_in(scratch, &["--config", &config_arg], &[]).await;
    let mut open = chat_client(&server, "name=alice").await;
    let eighty = "x".repeat(80);
    assert_eq!(say_and_read(&mut open, &eighty).await["type"], "ack");
    assert_eq!(
        upgrade_status(&server, "https://elsewhere.example").await,
        101
    );

    std::fs::write(
        &config,
        "[server]\nallowed_origins = [\"https://chat.example\"]\n\n\
         [limits]\nmax_message_chars = 50\n\n[log]\nlevel = \"debug\"\n\n\
         [redis]\nchannel_prefix = \"elsewhere\"\n",
    )
    .unwrap();
    common::send_signal(server.child.id().unwrap(), "-HUP");
    server.wait_for_log("server.allowed_origins").await;
    let log = server.log();
    for line in [
        "limits.max_message_chars",
        "log.level",
        "redis.channel_prefix",
    ] {
        assert!(log.contains(line), "the reload did not log {line}:\n{log}");
    }
    let restart = log
        .lines()
        .find(|l| l.contains("redis.channel_prefix"))
        .unwrap();
    assert!(restart.contains("restart"), "{restart}");

    // The open connection follows the new limit; so does a new one.
    let refused = say_and_read(&mut open, &eighty).await;
    assert_eq!(refused["code"], "message_too_long", "{refused}");
    let mut fresh = chat_client(&server, "name=bob").await;
    assert_eq!(
        say_and_read(&mut fresh, &eighty).await["code"],
        "message_too_long"
    );
    assert_eq!(say_and_read(&mut fresh, "short").await["type"], "ack");
    assert_eq!(
        upgrade_status(&server, "https://elsewhere.example").await,
        403
    );
    assert_eq!(upgrade_status(&server, "https://chat.example").await, 101);

    // A broken file is reported and changes nothing.
    std::fs::write(&config, "[limits]\nmax_message_chars = \"many\"\n").unwrap();
    common::send_signal(server.child.id().unwrap(), "-HUP");
    server.wait_for_log("configuration reload failed").await;
    assert!(server.log().contains("limits.max_message_chars"));
    assert_eq!(
        say_and_read(&mut open, &eighty).await["code"],
        "message_too_long"
    );
    assert_eq!(readyz(server.addr).await, Some(200));
}

/// The resident memory of process `pid`, in KiB (`VmRSS` in `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How much a node may grow while one client loops `history` without reading: its queue holds
/// at most `limits.max_queued_bytes` (1 MiB); the rest is pages being built and allocator
/// slack (about 1 MiB in all was measured). Unbounded, it grows by every reply (~2.4 MB).
const HISTORY_LOOP_GROWTH_KIB: u64 = 48 * 1024;

#[tokio::test]
async fn a_client_looping_history_without_reading_cannot_grow_the_node() {
    // Default limits, but a fast sender, so that the room fills quickly.
    let server = Running::start(
        "history-loop",
        &[
            ("SCALECHAT_LIMITS__MESSAGES_PER_SECOND", "100000"),
            ("SCALECHAT_LIMITS__MESSAGE_BURST", "100000"),
        ],
    )
    .await;
    let pid = server.child.id().unwrap();
    // The room's whole history (200 messages) at the longest, of control characters: each
    // JSON-escapes to about 24 KB, a page of 100 to about 2.4 MB.
    let mut filler = chat_client(&server, "name=filler").await;
    let text = "\u{1}".repeat(4000);
    for n in 0..200 {
        filler
            .send(serde_json::json!({"type":"send","message":text,"ref":format!("f{n}")}))
            .await;
        loop {
            let frame = filler.recv().await;
            if frame["type"] == "ack" {
                break;
            }
            assert_eq!(frame["type"], "message", "{frame}");
        }
    }
    let before = rss_kib(pid);

    // The attacker joins (its 50 history messages left unread) and asks for page after page.
    let mut attacker = RawClient::connect(server.addr, "/ws?name=attacker").await;
    let request = br#"{"type":"history","room":"general","limit":100}"#;
    for _ in 0..200 {
        attacker.send_frame(true, 0x1, request).await;
    }
    // The growth happens as the node reads the requests: watch it for a while.
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        peak - before < HISTORY_LOOP_GROWTH_KIB,
        "the node grew from {before} KiB to {peak} KiB"
    );

    // Reading at last, the attacker finds itself refused, or closed as a slow consumer.
    let refused = br#"{"type":"error","code":"rate_limited""#;
    loop {
        match attacker.recv_frame().await {
            Some((0x1, payload)) if payload.starts_with(refused) => break,
            Some((0x8, payload)) => {
                assert_eq!(&payload[..2], &4001u16.to_be_bytes(), "closed as slow");
                break;
            }
            Some(_) => {}
            None => panic!("the connection ended without a refusal or a close frame"),
        }
    }
    // The node still serves everyone else.
    filler
        .send(serde_json::json!({"type":"send","message":"after"}))
        .await;
    loop {
        let frame = filler.recv().await;
        if frame["type"] == "ack" {
            break;
        }
    }
}
