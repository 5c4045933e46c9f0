//! The fixtures from before [`super::TestEnv`], kept only until every test file uses it.

use aws_sdk_sqs::Client;
use sqlx::PgPool;

use super::{QueuePair, QueueSpec, admin_database_url, create_queue_pair, unique};

/// A fresh, migrated database. Returns its pool and URL (for worker processes).
pub async fn fresh_database() -> (PgPool, String) {
    let admin_url = admin_database_url();
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .expect("PostgreSQL must be running (see README: localstack/up checks it)");
    let name = unique("sqsw_test");
    // Identifiers cannot be bound parameters; the name is generated from [a-z_] above.
    sqlx::query(&format!("create database {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let (base, _) = admin_url
        .split('?')
        .next()
        .unwrap()
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    let url = format!("{base}/{name}");
    let pool = sqs_worker::connect_database(&url, 10).await.unwrap();
    sqs_worker::MIGRATOR.run(&pool).await.unwrap();
    (pool, url)
}

/// A queue pair, as the tests before TestEnv named it.
pub type TestQueue = QueuePair;

/// A fresh queue, optionally with a DLQ after `max_receive` receives.
pub async fn fresh_queue(client: &Client, with_dlq: bool, max_receive: u32) -> TestQueue {
    let spec = QueueSpec {
        dlq: with_dlq,
        max_receive,
        ..QueueSpec::default()
    };
    create_queue_pair(client, &spec).await
}

/// Send `body` to `queue_url`; its message id.
pub async fn send(client: &Client, queue_url: &str, body: &str) -> String {
    super::send_with_attributes(client, queue_url, body, &[]).await
}
