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
