//! The PostgreSQL archive against a real PostgreSQL cluster that each test starts on a free
//! port (and stops, kills and restarts).

mod common;

use common::postgres::Postgres;

#[tokio::test]
async fn the_test_cluster_stops_is_killed_and_restarts() {
    let mut pg = Postgres::start().await;
    pg.execute(
        "postgres",
        "CREATE TABLE t (n int); INSERT INTO t VALUES (1)",
    )
    .await;
    pg.stop().await;
    pg.restart().await;
    pg.kill().await;
    pg.restart().await;
    assert_eq!(pg.query_i64("postgres", "SELECT count(*) FROM t").await, 1);
}

/// Runs the binary with `args` and only `env` (and `PATH`) in its environment, in an empty
/// directory; returns its exit code, stdout and stderr.
async fn scalechat(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        common::WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_scalechat"))
            .args(args)
            .current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("scalechat exits in time")
    .expect("run scalechat");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_config_takes_database_url_and_masks_its_password() {
    let url = "postgres://chat:hunter2@db.example.com:5433/chat";
    let (code, out, err) = scalechat(&["check-config"], &[("DATABASE_URL", url)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(r#"url = "postgres://chat:********@db.example.com:5433/chat""#),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
}

#[tokio::test]
async fn a_malformed_database_url_is_refused_naming_the_key() {
    for url in ["db.example.com", "postgres://chat:hunter2@db:port/chat"] {
        let (code, out, err) = scalechat(&["check-config"], &[("DATABASE_URL", url)]).await;
        assert_eq!(code, 2, "{url}: {out}{err}");
        assert!(err.contains("archive.url:"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // The server refuses to start with it, the same way.
        let (code, _, err) = scalechat(&[], &[("DATABASE_URL", url), ("PORT", "0")]).await;
        assert_eq!(code, 2, "{err}");
    }
}
