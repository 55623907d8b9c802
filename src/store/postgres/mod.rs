//! PostgreSQL backend: the same data as the sled store, kept in tables that
//! several routers can share.
//!
//! Nothing of `tokio-postgres` or `deadpool` leaves this module: every
//! method speaks domain types and returns [`crate::error::Result`].
//! Database errors are mapped here (see `map_db`): a lost, refused or
//! timed-out connection and an administrator's shutdown become
//! [`Error::Unavailable`], everything else [`Error::Internal`].
//!
//! Tables (see `migrate.rs` for the DDL):
//! - `accounts(account_id, head_seq)`: one row per account; its row lock
//!   orders appends, so sequence numbers are gap-free and in commit order.
//! - `events`: the log, `(account_id, seq)` and `(account_id, event_id)`
//!   unique.
//! - `webhooks`, `secrets`: configuration, sealed as the sled store seals it
//!   (same [`SecretCipher`], same `wrenc1:` values).
//! - `meta`: bootstrap tokens and the id of the secret key.
//! - `lanes`: one row per webhook × mode: cursor, opaque engine state, and a
//!   lease (`lease_owner`, `lease_until`, `epoch`) fencing stale writers.
//! - `deliveries`: delivery records; `deleted_webhooks`: tombstones;
//!   `jobs`: leases of cluster-wide chores.
//!
//! The SQL sticks to what CockroachDB and YugabyteDB also run: plain DDL,
//! `INSERT … ON CONFLICT`, `UPDATE … RETURNING`, `FOR UPDATE SKIP LOCKED`
//! and `unnest` arrays; no LISTEN/NOTIFY, advisory locks or PL/pgSQL.
//! Integers the domain keeps as `u64` (account ids, sequence numbers,
//! epochs) are stored as `bigint` by reinterpreting their bits, so every
//! value round-trips; only account ids above `i64::MAX` would sort
//! differently in SQL than in Rust, which nothing relies on.

mod deliveries;
mod lanes;
mod log;
mod migrate;
mod webhooks;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::crypt::SecretCipher;
use crate::error::{Error, Result};

pub use lanes::{LaneWrite, Lease, LeaseRef};
pub use log::LaneRead;
pub use migrate::SCHEMA_VERSION;

/// Name of the configuration key the URL comes from, used in messages.
const URL_KEY: &str = "storage.postgres_url";
/// How long a new connection may take, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call waits for a free pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// Handle to a PostgreSQL database; cheap to clone (the clones share one
/// pool and one set of log writers).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Seals signing secrets and Basic passwords at rest, when a key is set.
    cipher: Option<SecretCipher>,
    /// Queue of the group-commit log writers (see `log.rs`).
    appends: tokio::sync::mpsc::Sender<log::AppendJob>,
    /// Counters shared with the log writer.
    stats: Arc<Stats>,
}

/// Counters of the store, for tests and metrics.
#[derive(Debug, Default)]
struct Stats {
    /// Append transactions committed by the log writer.
    append_commits: AtomicU64,
    /// Lane writes refused because the writer no longer held the lease.
    fenced_writes: AtomicU64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.inner.pool.status())
            .field("stats", &self.inner.stats)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`storage.postgres_url`, a
    /// `postgres://` URL or a `key=value` string) with a pool of at most
    /// `pool_size` connections (at least 1), applies the migrations this
    /// build knows, and checks `secret_key` against the key the stored
    /// secrets are sealed with (as [`crate::store::Store::open_with_key`]
    /// does for a data folder; on the first start with a key, every plain
    /// secret and password is sealed).
    ///
    /// A malformed URL is an [`Error::Startup`]; an unreachable server an
    /// [`Error::Unavailable`] naming `storage.postgres_url` and host:port.
    /// Neither message contains the password.
    pub async fn connect(
        url: &str,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
    ) -> Result<PgStore> {
        Self::open(url, None, pool_size, secret_key).await
    }

    /// Like [`PgStore::connect`], with every table in `schema` (created if
    /// missing; `[a-z_][a-z0-9_]*`, at most 63 bytes): each pooled
    /// connection sets its `search_path` to it. Tests use it to get a fresh
    /// database each; it also lets several routers' clusters share one
    /// database.
    pub async fn connect_in_schema(
        url: &str,
        schema: &str,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
    ) -> Result<PgStore> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && schema.bytes().next().is_some_and(|b| !b.is_ascii_digit());
        if !valid {
            return Err(Error::Startup(format!(
                "postgres schema {schema:?}: use lower-case letters, digits and '_' \
                 (not first a digit), at most 63 bytes"
            )));
        }
        Self::open(url, Some(schema), pool_size, secret_key).await
    }

    async fn open(
        url: &str,
        schema: Option<&str>,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
    ) -> Result<PgStore> {
        let masked = mask_url(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::Startup(format!(
                "{URL_KEY} is not a valid PostgreSQL URL ({masked}): {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A server that vanishes (host down, partition) is noticed in
        // about half a minute instead of the kernel's two hours, so a
        // call fails over to Unavailable instead of hanging; a URL's own
        // settings win.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(Duration::from_secs(15));
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(5));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        if config.get_application_name().is_none() {
            config.application_name("webhook-router");
        }
        if let Some(schema) = schema {
            let options = match config.get_options() {
                Some(o) if !o.trim().is_empty() => format!("{o} -c search_path={schema}"),
                _ => format!("-c search_path={schema}"),
            };
            config.options(options);
        }
        let target = targets(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::Startup(format!("{URL_KEY}: cannot build the pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| {
            let message = format!(
                "{URL_KEY}: cannot connect to {target} ({masked}): {}",
                describe_pool(&e)
            );
            if is_misconfigured(&e) {
                Error::Startup(message)
            } else {
                Error::Unavailable(message)
            }
        })?;
        if let Some(schema) = schema {
            migrate::create_schema(&client, schema).await?;
        }
        migrate::run(&mut client).await?;
        let cipher = secret_key.map(SecretCipher::new);
        webhooks::check_secret_key(&mut client, cipher.as_ref()).await?;
        drop(client);
        let stats = Arc::new(Stats::default());
        let appends = log::spawn_writer(pool.clone(), stats.clone());
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                cipher,
                appends,
                stats,
            }),
        })
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.inner.pool.get().await.map_err(map_pool)
    }

    /// Lane writes ([`PgStore::advance`]) refused so far because the caller
    /// no longer held the lane's lease (fenced).
    pub fn fenced_writes(&self) -> u64 {
        self.inner.stats.fenced_writes.load(Ordering::Relaxed)
    }

    /// Append transactions committed so far by this handle's log writers
    /// (each may hold several concurrent [`PgStore::append_events`] calls).
    pub fn append_commits(&self) -> u64 {
        self.inner.stats.append_commits.load(Ordering::Relaxed)
    }

    /// Checks with a trivial query that the database answers.
    pub async fn probe(&self) -> Result<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(map_db)?;
        Ok(())
    }
}

/// The hosts and ports of `config`, as `host:port[,host:port…]`.
fn targets(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` with its password replaced by `***`, for messages and logs: the
/// password of the user info in a `postgres://` URL, a `password=` query
/// parameter, and a `password=` pair of a `key=value` connection string.
/// Read as tokio-postgres reads it (the user info ends at the first `@`).
pub fn mask_url(url: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (userinfo, after) = match rest.find('@') {
                Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
                None => (None, rest),
            };
            let mut out = String::with_capacity(url.len());
            out.push_str(scheme);
            if let Some(info) = userinfo {
                match info.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(info),
                }
                out.push('@');
            }
            match after.split_once('?') {
                Some((path, query)) => {
                    out.push_str(path);
                    out.push('?');
                    let params: Vec<String> = query
                        .split('&')
                        .map(|p| match p.split_once('=') {
                            Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                                format!("{k}=***")
                            }
                            _ => p.to_string(),
                        })
                        .collect();
                    out.push_str(&params.join("&"));
                }
                None => out.push_str(after),
            }
            return out;
        }
    }
    mask_key_value(url)
}

/// Masks `password=…` in a libpq `key=value` string (values may be quoted
/// with `'`, with `\` escapes).
fn mask_key_value(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        // Whitespace between pairs is copied as is.
        if b[i].is_ascii_whitespace() {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        // The key.
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        out.push_str(key);
        while i < b.len() && b[i].is_ascii_whitespace() {
            out.push(b[i] as char);
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        out.push('=');
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            out.push(b[i] as char);
            i += 1;
        }
        // The value, quoted or up to the next whitespace.
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(&s[value_start..i]);
        }
    }
    out
}

/// Whether the error says the connection is gone or the server is not
/// taking work: SQLSTATE class 08 (connection exception), 57P01..57P03
/// (admin/crash shutdown, cannot connect now), 53300 (too many
/// connections), or a client-side I/O failure, closed connection or timeout.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS;
    }
    if e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    // Kinds without a source that mean the same (tokio-postgres keeps its
    // error kind private; its messages are stable).
    let text = e.to_string();
    text.starts_with("error connecting to server")
        || text.starts_with("error communicating with the server")
        || text.starts_with("timeout waiting for server")
}

/// Whether connecting failed because of the configuration rather than the
/// server's state: authentication refused (SQLSTATE class 28) or no such
/// database (3D000). Retrying will not help; the URL must change.
fn is_misconfigured(e: &PoolError) -> bool {
    match e {
        PoolError::Backend(e) => e
            .code()
            .is_some_and(|c| c.code().starts_with("28") || *c == SqlState::INVALID_CATALOG_NAME),
        _ => false,
    }
}

/// A database error as the service's error. Messages carry the server's
/// message and SQLSTATE, never connection parameters.
pub(super) fn map_db(e: tokio_postgres::Error) -> Error {
    if is_unavailable(&e) {
        Error::Unavailable(format!("postgres: {}", describe(&e)))
    } else {
        Error::Internal(format!("postgres: {}", describe(&e)))
    }
}

/// A pool error as the service's error: a timeout waiting for or creating
/// a connection, a closed pool and a failed connect are
/// [`Error::Unavailable`].
pub(super) fn map_pool(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => map_db(e),
        PoolError::Timeout(_) | PoolError::Closed => {
            Error::Unavailable(format!("postgres: {}", describe_pool(&e)))
        }
        other => Error::Internal(format!("postgres pool: {}", describe_pool(&other))),
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn describe_pool(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

/// Whether `e` has SQLSTATE `code`.
fn has_code(e: &tokio_postgres::Error, code: &SqlState) -> bool {
    e.code() == Some(code)
}

/// A copy of an error for each of several callers that share one failure.
fn share_error(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Startup(m) => Error::Startup(m.clone()),
        Error::ShuttingDown => Error::ShuttingDown,
        other => Error::Internal(other.to_string()),
    }
}

/// A `u64` as a `bigint` (bits reinterpreted, see the module docs).
fn to_i64(v: u64) -> i64 {
    v as i64
}

/// A `bigint` as a `u64` (bits reinterpreted).
fn to_u64(v: i64) -> u64 {
    v as u64
}
