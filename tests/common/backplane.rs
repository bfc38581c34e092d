//! Real backplanes for multi-node tests: a `redis-server` of the test's own on a free port
//! (stopped, killed and restarted at will) and scalechat processes using it.

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::Value;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::{Client, eventually_async, readyz};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `redis-server` of this test's own, keeping nothing on disk.
pub struct Redis {
    pub port: u16,
    password: Option<&'static str>,
    pub child: Option<Child>,
    /// With an append-only file in this directory (fsync on every write), else nothing kept.
    pub aof: Option<std::path::PathBuf>,
}

impl Redis {
    pub async fn start(password: Option<&'static str>) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            password,
            child: None,
            aof: None,
        };
        redis.restart().await;
        redis
    }

    /// A server that persists every write to an append-only file.
    pub async fn start_persistent() -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("scalechat-aof-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Redis {
            port,
            password: None,
            child: None,
            aof: Some(dir),
        };
        redis.restart().await;
        redis
    }

    /// (Re)starts the server on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .stdout(Stdio::null())
            .kill_on_drop(true);
        match &self.aof {
            Some(dir) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
            None => cmd.args(["--appendonly", "no", "--dir", "/tmp"]),
        };
        if let Some(pw) = self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(cmd.spawn().expect("redis-server is installed"));
        let port = self.port;
        eventually_async("redis answers", || async move {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.unwrap();
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let url = match self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        };
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Subscribers of a room's channel (one per interested node).
    pub async fn numsub(&self, room: &str) -> u64 {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("scalechat:room:{room}"))
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        n
    }
}

/// A scalechat process on a free port.
pub struct Node {
    pub addr: SocketAddr,
    pub child: Child,
    pub name: String,
}

impl Node {
    pub async fn start(name: &str, redis: &Redis, password: Option<&str>) -> Node {
        let node = Node::spawn(name, redis, password);
        let addr = node.addr;
        eventually_async(
            "node ready",
            || async move { readyz(addr).await == Some(200) },
        )
        .await;
        node
    }

    pub fn spawn(name: &str, redis: &Redis, password: Option<&str>) -> Node {
        Node::spawn_with(name, redis.port, password, &[])
    }

    /// A node of Redis at `redis_port`, with `extra` environment, writing its log (warnings
    /// and errors) to `log`.
    pub fn spawn_logged(
        name: &str,
        redis_port: u16,
        extra: &[(&str, &str)],
        log: std::fs::File,
    ) -> Node {
        Node::spawn_to(name, redis_port, None, extra, Stdio::from(log))
    }

    /// A node of Redis at `redis_port`, with `extra` environment.
    pub fn spawn_with(
        name: &str,
        redis_port: u16,
        password: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Node {
        Node::spawn_to(name, redis_port, password, extra, Stdio::inherit())
    }

    fn spawn_to(
        name: &str,
        redis_port: u16,
        password: Option<&str>,
        extra: &[(&str, &str)],
        stderr: Stdio,
    ) -> Node {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalechat"));
        cmd.current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", port.to_string())
            .env("SCALECHAT_SERVER__HOST", "127.0.0.1")
            .env("SCALECHAT_SERVER__NODE_ID", name)
            .env("SCALECHAT_LIMITS__MESSAGES_PER_SECOND", "100000")
            .env("SCALECHAT_LIMITS__MESSAGE_BURST", "100000")
            // Enough history to cover the outages the tests cause mid-stream.
            .env("SCALECHAT_ROOMS__HISTORY_SIZE", "2000")
            .env("REDIS_HOST", "127.0.0.1")
            .env("REDIS_PORT", redis_port.to_string())
            .envs(extra.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        if let Some(pw) = password {
            cmd.env("REDIS_PASSWORD", pw);
        }
        Node {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: cmd.spawn().expect("spawn scalechat"),
            name: name.into(),
        }
    }

    /// Connects with `query`: the client, its `joined` and the history that follows.
    pub async fn connect(&self, query: &str) -> (Client, Value, Vec<Value>) {
        let mut c = Client::connect(&format!("ws://{}/ws?{query}", self.addr)).await;
        c.expect("welcome").await;
        let (joined, history) = c.joined().await;
        (c, joined, history)
    }

    pub async fn client(&self, query: &str) -> Client {
        let mut c = Client::connect(&format!("ws://{}/ws?{query}", self.addr)).await;
        let welcome = c.expect("welcome").await;
        assert_eq!(welcome["node"], self.name.as_str());
        c.joined().await;
        c
    }
}
