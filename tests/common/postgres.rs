//! A PostgreSQL cluster of a test's own: `initdb` in a temporary directory, the server on a
//! free port of 127.0.0.1 with trust authentication, so the test can stop, kill (SIGKILL) and
//! restart it. Run as root (as CI does), the cluster's programs run as the `postgres` user
//! through `runuser`; as any other user, as that user. Dropped, the cluster is stopped at once
//! and its directory removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

/// A PostgreSQL server of this test's own.
pub struct Postgres {
    /// The TCP port it listens on (127.0.0.1).
    pub port: u16,
    dir: PathBuf,
    running: bool,
}

/// A free TCP port of 127.0.0.1 (free when asked: the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The directory of Debian's PostgreSQL programs (the newest version installed), else none:
/// they are then looked up on `PATH`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // SAFETY: geteuid reads the process's effective user id and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL program as the cluster's owner; panics with its output if it fails.
fn run(program: &str, args: &[&str]) {
    if let Err(e) = try_run(program, args) {
        panic!("{e}");
    }
}

/// Runs a PostgreSQL program as the cluster's owner; its output if it fails.
fn try_run(program: &str, args: &[&str]) -> Result<(), String> {
    let path = bin_dir()
        .map(|d| d.join(program))
        .unwrap_or_else(|| PathBuf::from(program));
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (is postgresql installed?)", path.display()));
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

impl Postgres {
    /// Creates a cluster in a new temporary directory and starts it.
    pub async fn start() -> Postgres {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("scalechat-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown postgres {}", dir.display());
        }
        let data = dir.join("data");
        run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        let mut pg = Postgres {
            port,
            dir,
            running: false,
        };
        pg.restart().await;
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser, no password.
    pub fn url(&self) -> String {
        self.url_for("postgres", "postgres")
    }

    /// The URL for `user` (no password: trust authentication) and `database`.
    pub fn url_for(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server on its port (again) and waits until it accepts connections.
    pub async fn restart(&mut self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off \
             -c max_connections=50",
            self.port
        );
        let log = self.dir.join("server.log");
        let data = self.data();
        let args = [
            "-D",
            path(&data),
            "-l",
            path(&log),
            "-o",
            &options,
            "-w",
            "-t",
            "30",
            "start",
        ];
        // While the server was down, another test may have taken its port for a moment (each
        // picks free ports): a start that fails is tried again, a few times.
        let mut started = try_run("pg_ctl", &args);
        for _ in 0..5 {
            if started.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            started = try_run("pg_ctl", &args);
        }
        if let Err(e) = started {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{e}\nserver log:\n{log}");
        }
        self.running = true;
        let port = self.port;
        super::eventually_async("postgres accepts connections", || async move {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    /// Stops the server cleanly (fast shutdown: open sessions are ended).
    pub async fn stop(&mut self) {
        let data = self.data();
        tokio::task::spawn_blocking(move || {
            run(
                "pg_ctl",
                &["-D", path(&data), "-m", "fast", "-w", "-t", "30", "stop"],
            )
        })
        .await
        .unwrap();
        self.running = false;
    }

    /// Kills the server and every process of it with SIGKILL, as a crash would, and waits
    /// until they are gone.
    pub async fn kill(&mut self) {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
            .expect("postmaster.pid names the server");
        let mut pids = children(pid);
        pids.push(pid);
        for p in &pids {
            // SAFETY: sends a signal to processes of this test's own cluster.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let deadline = tokio::time::Instant::now() + super::WAIT;
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p))
        {
            assert!(tokio::time::Instant::now() < deadline, "postgres killed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A killed server's processes may stay zombies here (when nothing reaps orphans),
        // which the next start would take for a server still running: its lock file goes.
        let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
        self.running = false;
    }

    /// Runs `sql` (one or more statements) as the superuser in `database`.
    pub async fn execute(&self, database: &str, sql: &str) {
        let client = self.connect(database).await;
        client.batch_execute(sql).await.expect(sql);
    }

    /// A client connected as the superuser to `database`.
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio::time::timeout(
            super::WAIT,
            tokio_postgres::connect(&self.url_for("postgres", database), tokio_postgres::NoTls),
        )
        .await
        .expect("connect in time")
        .expect("connect to the test cluster");
        tokio::spawn(connection);
        client
    }

    /// One value of the first row of `sql`'s result in `database`.
    pub async fn query_i64(&self, database: &str, sql: &str) -> i64 {
        let client = self.connect(database).await;
        client.query_one(sql, &[]).await.expect(sql).get(0)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let path = bin_dir()
                .map(|d| d.join("pg_ctl"))
                .unwrap_or_else(|| PathBuf::from("pg_ctl"));
            let mut cmd = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            } else {
                Command::new(path)
            };
            let _ = cmd
                .args(["-D", self::path(&data), "-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// The processes whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // The command name may hold spaces: fields follow its closing parenthesis.
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s[s.rfind(')')? + 2..].chars().next())
        == Some('Z')
}
