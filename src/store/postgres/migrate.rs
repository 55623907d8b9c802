//! Schema migrations: numbered SQL texts, each applied once in its own
//! transaction that first inserts its row in `schema_migrations`. A second
//! router starting at the same moment blocks on that row's key until the
//! first commits, then finds the version applied and rolls back.

use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::error::SqlState;

use super::{has_code, map_db};
use crate::error::{Error, Result};

/// The newest schema version this build writes.
pub const SCHEMA_VERSION: i32 = 2;

/// Every migration, oldest first: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2)];

/// Version 1: the log, configuration, lanes with leases, delivery records,
/// tombstones and chore leases. Ids are `COLLATE "C"` so their order is byte
/// order, as in the sled store (ids are time-ordered).
const V1: &str = r#"
CREATE TABLE accounts (
    account_id bigint PRIMARY KEY,
    head_seq bigint NOT NULL DEFAULT 0
);

CREATE TABLE events (
    account_id bigint NOT NULL,
    seq bigint NOT NULL,
    event_id text COLLATE "C" NOT NULL,
    event_name text NOT NULL,
    mode smallint NULL,
    ingest_ms bigint NOT NULL,
    json bytea NOT NULL,
    PRIMARY KEY (account_id, seq),
    UNIQUE (account_id, event_id)
);

CREATE TABLE webhooks (
    account_id bigint NOT NULL,
    webhook_id text COLLATE "C" NOT NULL,
    body bytea NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (account_id, webhook_id)
);
CREATE UNIQUE INDEX webhooks_by_id ON webhooks (webhook_id);

CREATE TABLE secrets (
    webhook_id text COLLATE "C" PRIMARY KEY,
    body bytea NOT NULL
);

CREATE TABLE meta (
    key text PRIMARY KEY,
    value bytea NOT NULL
);

CREATE TABLE lanes (
    account_id bigint NOT NULL,
    webhook_id text COLLATE "C" NOT NULL,
    mode smallint NOT NULL,
    cursor_seq bigint NOT NULL,
    state bytea NOT NULL DEFAULT '\x',
    epoch bigint NOT NULL DEFAULT 0,
    lease_owner text NULL,
    lease_until timestamptz NULL,
    next_at_ms bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (webhook_id, mode)
);
CREATE INDEX lanes_by_account ON lanes (account_id);
CREATE INDEX lanes_by_lease ON lanes (lease_until);

CREATE TABLE deliveries (
    webhook_id text COLLATE "C" NOT NULL,
    delivery_id text COLLATE "C" NOT NULL,
    finish_ms bigint NULL,
    state smallint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (webhook_id, delivery_id)
);
CREATE INDEX deliveries_by_state ON deliveries (webhook_id, state, delivery_id);
CREATE INDEX deliveries_by_finish ON deliveries (finish_ms) WHERE finish_ms IS NOT NULL;

CREATE TABLE deleted_webhooks (
    webhook_id text COLLATE "C" PRIMARY KEY,
    deleted_ms bigint NOT NULL
);

CREATE TABLE jobs (
    name text PRIMARY KEY,
    owner text NULL,
    lease_until timestamptz NULL,
    epoch bigint NOT NULL DEFAULT 0
);
"#;

/// Version 2: what several routers sharing the database need.
/// - Change sequences (`account_changes`, `webhook_changes`,
///   `delivery_changes`): every row a router must hear about from another
///   (an account's head, a webhook created, changed or deleted, a delivery
///   record or a requeued delivery) takes a new value from its table's
///   sequence when written, so a poller reads what changed since its last
///   poll through an index (see `feed.rs`). `writer` names the router that
///   wrote the row, so a router skips its own.
/// - `accounts.trimmed_seq`: the log of the account is stored after it
///   (the janitor trims a prefix), so `head_seq - trimmed_seq` is the
///   number of events stored.
/// - `deliveries.payload`: the events of a delivery that keeps them (from
///   its first failed attempt on, dead letters, requeued copies), in the
///   record's row; `redelivered` (a dead one requeued by a bulk
///   RedeliverEvents) and `outcome` (the write is a lane's outcome, for
///   WatchDeliveries on other routers) as columns.
/// - `requeued`: deliveries waiting to be sent again, per lane.
/// - `routers`: a heartbeat per live router; lanes are shared among the
///   live ones.
/// - Any webhook without its two lanes gets them, at its account's head.
const V2: &str = r#"
CREATE SEQUENCE account_changes;
CREATE SEQUENCE webhook_changes;
CREATE SEQUENCE delivery_changes;

ALTER TABLE accounts ADD COLUMN change_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN trimmed_seq bigint NOT NULL DEFAULT 0;
CREATE INDEX accounts_by_change ON accounts (change_seq);

ALTER TABLE webhooks ADD COLUMN change_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE webhooks ADD COLUMN writer text NULL;
CREATE INDEX webhooks_by_change ON webhooks (change_seq);

ALTER TABLE deleted_webhooks ADD COLUMN account_id bigint NULL;
ALTER TABLE deleted_webhooks ADD COLUMN change_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE deleted_webhooks ADD COLUMN writer text NULL;
ALTER TABLE deleted_webhooks ADD COLUMN cleaned boolean NOT NULL DEFAULT false;
CREATE INDEX deleted_webhooks_by_change ON deleted_webhooks (change_seq);

ALTER TABLE deliveries ADD COLUMN payload bytea NULL;
ALTER TABLE deliveries ADD COLUMN redelivered boolean NOT NULL DEFAULT false;
ALTER TABLE deliveries ADD COLUMN outcome boolean NOT NULL DEFAULT false;
ALTER TABLE deliveries ADD COLUMN writer text NULL;
ALTER TABLE deliveries ADD COLUMN change_seq bigint NOT NULL DEFAULT 0;
CREATE INDEX deliveries_by_change ON deliveries (change_seq);
DROP INDEX deliveries_by_finish;
CREATE INDEX deliveries_by_finish ON deliveries (state, finish_ms) WHERE finish_ms IS NOT NULL;

CREATE TABLE requeued (
    webhook_id text COLLATE "C" NOT NULL,
    mode smallint NOT NULL,
    delivery_id text COLLATE "C" NOT NULL,
    writer text NULL,
    change_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (webhook_id, mode, delivery_id)
);
CREATE INDEX requeued_by_change ON requeued (change_seq);

CREATE TABLE routers (
    owner text PRIMARY KEY,
    alive_until timestamptz NOT NULL
);

INSERT INTO lanes (account_id, webhook_id, mode, cursor_seq)
SELECT w.account_id, w.webhook_id, m.mode, COALESCE(a.head_seq, 0)
FROM webhooks w
CROSS JOIN (VALUES (1::smallint), (2::smallint)) AS m(mode)
LEFT JOIN accounts a ON a.account_id = w.account_id
ON CONFLICT (webhook_id, mode) DO NOTHING;
"#;

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version integer PRIMARY KEY, \
     applied_at timestamptz NOT NULL DEFAULT now())";

/// Attempts at a `CREATE … IF NOT EXISTS` that races another router's.
const CREATE_ATTEMPTS: u32 = 5;

/// Runs a `CREATE … IF NOT EXISTS` statement, retrying when a concurrent
/// one wins the race on the catalog: PostgreSQL then reports a unique
/// violation (23505), a duplicate table (42P07), a duplicate type of the
/// table's row (42710) or a duplicate schema (42P06) instead of skipping.
async fn create_racing(client: &Object, sql: &str) -> Result<()> {
    let mut attempt = 1;
    loop {
        match client.batch_execute(sql).await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < CREATE_ATTEMPTS
                    && (has_code(&e, &SqlState::UNIQUE_VIOLATION)
                        || has_code(&e, &SqlState::DUPLICATE_TABLE)
                        || has_code(&e, &SqlState::DUPLICATE_OBJECT)
                        || has_code(&e, &SqlState::DUPLICATE_SCHEMA)) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            Err(e) => return Err(map_db(e)),
        }
    }
}

/// Creates `schema` if it does not exist (the name is validated by the caller).
pub(super) async fn create_schema(client: &Object, schema: &str) -> Result<()> {
    create_racing(client, &format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")).await
}

/// Applies the migrations not applied yet; fails when the database was
/// migrated by a newer build.
pub(super) async fn run(client: &mut Object) -> Result<()> {
    create_racing(client, CREATE_MIGRATIONS_TABLE).await?;
    let newest: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .map_err(map_db)?
        .get(0);
    if let Some(v) = newest.filter(|v| *v > SCHEMA_VERSION) {
        return Err(Error::Startup(format!(
            "the PostgreSQL database has schema version {v}, newer than this build's \
             {SCHEMA_VERSION}; run a newer webhook-router"
        )));
    }
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await.map_err(map_db)?;
        // Blocks while another router's transaction holds this version's
        // key; then inserts nothing if that one committed.
        let inserted = tx
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now()) \
                 ON CONFLICT (version) DO NOTHING",
                &[version],
            )
            .await
            .map_err(map_db)?;
        if inserted == 0 {
            tx.rollback().await.map_err(map_db)?;
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| match map_db(e) {
            Error::Internal(m) => Error::Internal(format!("schema migration {version}: {m}")),
            other => other,
        })?;
        tx.commit().await.map_err(map_db)?;
        tracing::info!(version, "postgres schema migration applied");
    }
    Ok(())
}
