//! The `scalechat` binary under a service manager's notification protocol (sd_notify), as
//! systemd runs it with `Type=notify` and `WatchdogSec=`: the test plays systemd, binding the
//! datagram socket named by `NOTIFY_SOCKET` and reading what the server sends on it.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::WAIT;
use scalechat::config;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

/// The notification socket and a `scalechat` child told to use it; both cleaned up on drop.
struct Notified {
    socket: UnixDatagram,
    dir: PathBuf,
    child: Child,
}

impl Notified {
    /// Starts `scalechat` on a free port of 127.0.0.1 with `NOTIFY_SOCKET` and `env` set.
    fn start(test: &str, env: &[(&str, &str)]) -> Notified {
        let dir = std::env::temp_dir().join(format!("scalechat-sd-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalechat"));
        cmd.current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with(config::ENV_PREFIX) || name == "PORT" || name.starts_with("REDIS_")
            {
                cmd.env_remove(&key);
            }
        }
        cmd.envs([("PORT", "0"), ("SCALECHAT_SERVER__HOST", "127.0.0.1")])
            .env("NOTIFY_SOCKET", &path)
            .envs(env.iter().copied());
        let child = cmd.spawn().expect("spawn scalechat");
        Notified { socket, dir, child }
    }

    /// The next notification datagram, as text.
    async fn next(&self) -> String {
        let mut buf = vec![0; 4096];
        let len = tokio::time::timeout(WAIT, self.socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no notification within {WAIT:?}"))
            .expect("read the notify socket");
        String::from_utf8(buf[..len].to_vec()).expect("notifications are UTF-8")
    }

    /// Reads notifications until one has the line `line`, returning that one.
    async fn until(&self, line: &str) -> String {
        loop {
            let msg = self.next().await;
            if msg.lines().any(|l| l == line) {
                return msg;
            }
        }
    }

    fn terminate(&self) {
        common::send_signal(self.child.id().expect("child still running"), "-TERM");
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn ready_watchdog_and_stopping_are_sent_in_order() {
    // A 200 ms watchdog: the server must ping every 100 ms.
    let mut server = Notified::start("order", &[("WATCHDOG_USEC", "200000")]);
    let ready = server.until("READY=1").await;
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=ready")),
        "READY=1 comes with a status line: {ready:?}"
    );
    server.until("WATCHDOG=1").await;
    server.until("WATCHDOG=1").await;
    server.terminate();
    let stopping = server.until("STOPPING=1").await;
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    let status = tokio::time::timeout(WAIT, server.child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait for scalechat");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn redis_node_is_ready_only_once_redis_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
        .to_string();
    let server = Notified::start(
        "redis",
        &[("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", port.as_str())],
    );
    let first = server.next().await;
    assert!(first.contains("STATUS=starting"), "{first:?}");
    // Nothing listens on the port yet: no READY=1 while the backplane is down.
    let early = tokio::time::timeout(Duration::from_secs(1), server.until("READY=1")).await;
    assert!(early.is_err(), "READY=1 sent before redis was up");
    let mut redis = Command::new("redis-server")
        .args(["--port", &port, "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed");
    server.until("READY=1").await;
    let _ = redis.start_kill();
}
