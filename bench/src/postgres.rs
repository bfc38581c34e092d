//! A PostgreSQL cluster of the tool's own for the setups with the archive: `initdb` in a new
//! temporary directory, the server on a free port of 127.0.0.1 with trust authentication
//! (Debian's programs, the newest version under /usr/lib/postgresql, else on `PATH`). Run as
//! root, the programs run as the `postgres` user through `runuser`, as tests/common/postgres.rs
//! does. PostgreSQL's durability settings are its defaults (fsync and synchronous_commit on)
//! unless `--pg-no-fsync`. Dropped, the server is stopped at once, its log copied to the log
//! folder and its directory removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::cluster::{ServerOpts, free_port};

/// A running PostgreSQL server of the tool's own.
pub struct Postgres {
    /// The TCP port it listens on (127.0.0.1).
    pub port: u16,
    dir: PathBuf,
    /// Where its log is copied when it stops.
    log_copy: PathBuf,
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

/// A PostgreSQL program, run as the cluster's owner.
fn command(program: &str) -> Command {
    let path = bin_dir()
        .map(|d| d.join(program))
        .unwrap_or_else(|| PathBuf::from(program));
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a PostgreSQL program to its end; its output in the error if it fails.
async fn run(program: &'static str, args: Vec<String>) -> anyhow::Result<()> {
    let out = tokio::task::spawn_blocking(move || command(program).args(&args).output())
        .await?
        .with_context(|| {
            format!("run {program} (apt-get install postgresql, or scripts/bench.sh --archive)")
        })?;
    if !out.status.success() {
        bail!(
            "{program}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Postgres {
    /// Creates a cluster in a new temporary directory, starts it and waits until it accepts
    /// connections.
    pub async fn start(opts: &ServerOpts) -> anyhow::Result<Postgres> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("scalechat-bench-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pg = Postgres {
            port,
            dir: dir.clone(),
            log_copy: opts.log_dir.join(format!("postgres-{port}.log")),
        };
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&dir)
                .status()
                .context("run chown")?;
            if !status.success() {
                bail!(
                    "chown postgres {} failed: is postgresql installed?",
                    dir.display()
                );
            }
        }
        let data = path(&dir.join("data"));
        let initdb = ["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8"];
        let mut args: Vec<String> = initdb.iter().map(|s| s.to_string()).collect();
        args.extend(["--locale=C.UTF-8".into(), "--no-sync".into()]);
        run("initdb", args).await?;
        let mut options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' \
             -c max_connections=100"
        );
        if opts.pg_no_fsync {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = path(&dir.join("server.log"));
        let start = [
            "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
        ];
        run("pg_ctl", start.iter().map(|s| s.to_string()).collect()).await?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser, no password.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's processes now: the postmaster and its children (the nodes' connections,
    /// the writers, autovacuum), for their CPU time.
    pub fn pids(&self) -> Vec<u32> {
        let Some(postmaster) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = children(postmaster);
        pids.push(postmaster);
        pids
    }

    /// Rows in the archive's table (0 before the nodes created it).
    pub async fn rows(&self) -> anyhow::Result<u64> {
        let (client, connection) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls),
        )
        .await
        .context("PostgreSQL did not answer in 10 s")??;
        let connection = tokio::spawn(connection);
        let sql = "SELECT CASE WHEN to_regclass('scalechat_messages') IS NULL THEN 0::bigint \
                   ELSE (SELECT count(*) FROM scalechat_messages) END";
        let rows: i64 = client.query_one(sql, &[]).await?.get(0);
        drop(client);
        let _ = connection.await;
        Ok(u64::try_from(rows).unwrap_or(0))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = path(&self.data());
        let _ = command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::copy(self.dir.join("server.log"), &self.log_copy);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // The command name may hold spaces: fields follow its closing parenthesis.
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
