//! The archive's schema: migrations embedded in the binary, applied in order, each once, in
//! one transaction under a PostgreSQL advisory lock, so nodes starting together (or a node
//! and `scalechat migrate`) wait for each other instead of racing. A schema already up to
//! date is only read, so a role that may not create tables can use one that an operator
//! migrated.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::ArchiveError;

/// The migrations, by version, oldest first. A released migration is never edited: a change
/// is a new one.
pub const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("migrations/0001_messages.sql"))];

/// The advisory lock key held while migrating ("scalechat" in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x7363_6861_7463_6801;

/// The table recording which migrations were applied.
const VERSIONS: &str = "scalechat_schema_versions";

/// Applies the migrations `client`'s database lacks; returns how many.
pub async fn migrate(client: &mut Client) -> Result<usize, ArchiveError> {
    let tx = client.transaction().await.map_err(classify)?;
    // Released at commit or rollback, or when the connection drops.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(classify)?;
    let exists: bool = tx
        .query_one(
            &format!("SELECT to_regclass('{VERSIONS}') IS NOT NULL"),
            &[],
        )
        .await
        .map_err(classify)?
        .get(0);
    if !exists {
        tx.batch_execute(&format!(
            "CREATE TABLE {VERSIONS} (version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(classify)?;
    }
    let current: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {VERSIONS}"),
            &[],
        )
        .await
        .map_err(classify)?
        .get(0);
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(classify)?;
        tx.execute(
            &format!("INSERT INTO {VERSIONS} (version) VALUES ($1)"),
            &[version],
        )
        .await
        .map_err(classify)?;
        applied += 1;
    }
    tx.commit().await.map_err(classify)?;
    Ok(applied)
}

/// Whether the schema is at the newest version (the node may use it).
pub async fn is_current(client: &Client) -> Result<bool, ArchiveError> {
    let exists: bool = client
        .query_one(
            &format!("SELECT to_regclass('{VERSIONS}') IS NOT NULL"),
            &[],
        )
        .await
        .map_err(classify)?
        .get(0);
    if !exists {
        return Ok(false);
    }
    let current: i32 = client
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {VERSIONS}"),
            &[],
        )
        .await
        .map_err(classify)?
        .get(0);
    Ok(MIGRATIONS
        .last()
        .is_none_or(|(newest, _)| current >= *newest))
}

/// A failed statement as an [`ArchiveError`]: a missing permission says so in words.
fn classify(e: tokio_postgres::Error) -> ArchiveError {
    match e.code() {
        Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => ArchiveError::Permission(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_owned()),
        ),
        _ => ArchiveError::from(e),
    }
}
