//! PostgreSQL backend: the same data as the sled store, kept in tables that
//! several routers share, each router delivering the lanes it leases.
//!
//! Nothing of `tokio-postgres` or `deadpool` leaves this module: every
//! method speaks domain types and returns [`crate::error::Result`].
//! Database errors are mapped here (see `map_db`): a lost, refused or
//! timed-out connection and an administrator's shutdown become
//! [`Error::Unavailable`], everything else [`Error::Internal`].
//!
//! Tables (see `migrate.rs` for the DDL):
//! - `accounts(account_id, head_seq, trimmed_seq)`: one row per account;
//!   its row lock orders appends, so sequence numbers are gap-free and in
//!   commit order; the log holds `trimmed_seq < seq <= head_seq`.
//! - `events`: the log, `(account_id, seq)` and `(account_id, event_id)`
//!   unique.
//! - `webhooks`, `secrets`: configuration, sealed as the sled store seals it
//!   (same [`SecretCipher`], same `wrenc1:` values).
//! - `meta`: bootstrap tokens and the id of the secret key.
//! - `lanes`: one row per webhook × mode: the cursor, the recorded
//!   deliveries it resumes (`state`), and a lease (`lease_owner`,
//!   `lease_until`, `epoch`) fencing stale writers.
//! - `deliveries`: delivery records, with their events when kept;
//!   `requeued`: deliveries waiting to be sent again; `deleted_webhooks`:
//!   tombstones; `jobs`: leases of cluster-wide chores; `routers`: a
//!   heartbeat per live router.
//!
//! A [`PgStore`] is one router: it has an `owner` name (host, pid and a
//! random part) and runs three background tasks, which end when the last
//! clone of the store is dropped or [`PgStore::shutdown`] is called:
//! - the lease task (`lease.rs`): renews this router's lanes every
//!   `lease_ttl / 3` and takes up to a fair share of the others;
//! - the poller (`feed.rs`): what other routers wrote (events, webhooks,
//!   delivery outcomes, requeued deliveries), as [`Change`]s, and the
//!   cached figures (heads, stored events, size);
//! - the recovery probe: while the store is failed (see
//!   [`PgStore::failure`]), checks every second whether the database
//!   answers again.
//!
//! Lanes (`engine.rs`) follow the sled store's model; every lane write is
//! fenced by the lane's lease epoch (see `lanes.rs`).
//!
//! The SQL sticks to what CockroachDB and YugabyteDB also run: plain DDL,
//! sequences, `INSERT … ON CONFLICT`, `UPDATE … RETURNING` (also in `WITH`),
//! `FOR UPDATE SKIP LOCKED` and `unnest` arrays; no LISTEN/NOTIFY, advisory
//! locks or PL/pgSQL. Integers the domain keeps as `u64` (account ids,
//! sequence numbers, epochs) are stored as `bigint` by reinterpreting their
//! bits, so every value round-trips; only account ids above `i64::MAX`
//! would sort differently in SQL than in Rust, which nothing relies on.

mod api;
mod deliveries;
mod engine;
mod feed;
mod janitor;
mod lanes;
mod lease;
mod log;
mod migrate;
mod webhooks;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cluster;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{broadcast, watch, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::crypt::SecretCipher;
use super::types::Change;
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
/// The default `storage.lease_ttl_ms`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Start of the message of a call that found no free pooled connection in
/// time: the database answers, the pool is too small for the load, so the
/// store is not failed for it.
const POOL_BUSY: &str = "postgres: no free pooled connection";
/// Changes buffered for a slow follower of [`PgStore::changes`].
const CHANGE_BUFFER: usize = 4096;

/// Handle to a PostgreSQL database as one router; cheap to clone (the
/// clones share one pool, one set of log writers and one router identity).
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
    /// This router's name in leases and `writer` columns.
    owner: String,
    /// How long a lease lasts without renewal.
    lease_ttl: Duration,
    /// The lanes this router knows, held or not (see `engine.rs`).
    lanes: engine::Registry,
    /// Durable head of each account's log, as far as known.
    heads: Mutex<HashMap<u64, u64>>,
    /// Deleted webhooks (tombstones).
    deleted: Mutex<HashSet<String>>,
    /// Per account, the sequence number through which appended events are
    /// counted in the lanes' tallies (see `feed.rs`).
    counted: Mutex<HashMap<u64, u64>>,
    /// Events stored, all accounts (refreshed by the poller).
    stored_events: AtomicU64,
    /// `pg_database_size` (refreshed by the poller).
    size_on_disk: AtomicU64,
    /// Why the store is failed, if it is.
    failure: watch::Sender<Option<String>>,
    /// What other routers did, and lanes this one acquired.
    changes: broadcast::Sender<Change>,
    /// Until when (this machine's clock) the leases renewed last are safe
    /// to work on: the start of that renewal plus the TTL.
    leases_valid_until: Mutex<Option<tokio::time::Instant>>,
    /// Runs a lease round soon (new lanes).
    wake_leases: Arc<Notify>,
    /// True: the background tasks stop.
    stop: watch::Sender<bool>,
    /// Tests: the lease task skips its rounds (a paused router).
    leases_paused: AtomicBool,
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
            .field("owner", &self.inner.owner)
            .field("pool", &self.inner.pool.status())
            .field("stats", &self.inner.stats)
            .finish_non_exhaustive()
    }
}

/// A router name unique per store handle: host, process id, random part.
fn new_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "router".to_string());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

impl PgStore {
    /// Connects to the database at `url` (`storage.postgres_url`, a
    /// `postgres://` URL or a `key=value` string) with a pool of at most
    /// `pool_size` connections (at least 1), applies the migrations this
    /// build knows, and checks `secret_key` against the key the stored
    /// secrets are sealed with (as the sled store
    /// does for its data folder; on the first start with a key, every plain
    /// secret and password is sealed).
    ///
    /// The store is one router among those sharing the database: it gets a
    /// new owner name ([`PgStore::owner`]), leases its share of the lanes
    /// for `lease_ttl` (`storage.lease_ttl_ms`; see [`DEFAULT_LEASE_TTL`])
    /// before returning, and starts its background tasks (see the module
    /// docs).
    ///
    /// A malformed URL is an [`Error::Startup`]; an unreachable server an
    /// [`Error::Unavailable`] naming `storage.postgres_url` and host:port.
    /// Neither message contains the password.
    pub async fn connect(
        url: &str,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
        lease_ttl: Duration,
    ) -> Result<PgStore> {
        Self::open(url, None, pool_size, secret_key, lease_ttl, true).await
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
        lease_ttl: Duration,
    ) -> Result<PgStore> {
        check_schema(schema)?;
        Self::open(url, Some(schema), pool_size, secret_key, lease_ttl, true).await
    }

    /// Like [`PgStore::connect`], for a one-shot command (`export`,
    /// `import`) that takes no part in the cluster's work: no heartbeat,
    /// lease, poller or recovery probe, so it holds no lane (its lane calls
    /// answer idle) and no chore, and the other routers do not count it
    /// when they share the lanes. Configuration, the log and the delivery
    /// log work as usual.
    pub async fn connect_passive(
        url: &str,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
    ) -> Result<PgStore> {
        Self::open(url, None, pool_size, secret_key, DEFAULT_LEASE_TTL, false).await
    }

    /// [`PgStore::connect_passive`] in `schema` (tests).
    #[cfg(test)]
    async fn connect_passive_in_schema(
        url: &str,
        schema: &str,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
    ) -> Result<PgStore> {
        check_schema(schema)?;
        Self::open(
            url,
            Some(schema),
            pool_size,
            secret_key,
            DEFAULT_LEASE_TTL,
            false,
        )
        .await
    }

    async fn open(
        url: &str,
        schema: Option<&str>,
        pool_size: usize,
        secret_key: Option<&[u8; 32]>,
        lease_ttl: Duration,
        background: bool,
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
        let loaded = feed::Loaded::load(&client).await?;
        drop(client);
        let stats = Arc::new(Stats::default());
        let appends = log::spawn_writer(pool.clone(), stats.clone());
        let store = PgStore {
            inner: Arc::new(Inner {
                pool,
                cipher,
                appends,
                stats,
                owner: new_owner(),
                lease_ttl: lease_ttl.max(Duration::from_millis(300)),
                lanes: engine::Registry::default(),
                heads: Mutex::new(loaded.heads.clone()),
                deleted: Mutex::new(loaded.deleted.clone()),
                counted: Mutex::new(HashMap::new()),
                stored_events: AtomicU64::new(loaded.stored_events),
                size_on_disk: AtomicU64::new(loaded.size_on_disk),
                failure: watch::channel(None).0,
                changes: broadcast::channel(CHANGE_BUFFER).0,
                leases_valid_until: Mutex::new(None),
                wake_leases: Arc::new(Notify::new()),
                stop: watch::channel(false).0,
                leases_paused: AtomicBool::new(false),
            }),
        };
        if background {
            // The first share of lanes before the dispatcher starts its lanes.
            if let Err(e) = store.lease_round().await {
                store.note_error(&e);
                tracing::warn!(error = %e, "postgres: first lease round failed; retrying in the background");
            }
            store.spawn_tasks(loaded);
        }
        Ok(store)
    }

    fn spawn_tasks(&self, loaded: feed::Loaded) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(lease::lease_task(
            weak.clone(),
            self.inner.stop.subscribe(),
            self.inner.wake_leases.clone(),
            self.inner.lease_ttl,
        ));
        tokio::spawn(feed::poll_task(
            weak.clone(),
            self.inner.stop.subscribe(),
            feed::Feeds::new(&loaded),
        ));
        tokio::spawn(recovery_task(
            weak,
            self.inner.stop.subscribe(),
            self.inner.failure.subscribe(),
        ));
    }

    /// A handle from a background task's weak reference, if the store lives.
    fn upgrade(weak: &Weak<Inner>) -> Option<PgStore> {
        weak.upgrade().map(|inner| PgStore { inner })
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.inner.pool.get().await.map_err(map_pool)
    }

    /// This router's name, as written in leases and `writer` columns.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The lease TTL this router works with.
    pub fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }

    /// Lane writes refused so far because this router no longer held the
    /// lane's lease (fenced): by [`PgStore::advance`], and by the lane
    /// operations of the [`crate::store::LaneStore`] interface (one per
    /// lane and refused write).
    pub fn fenced_writes(&self) -> u64 {
        self.inner.stats.fenced_writes.load(Ordering::Relaxed)
    }

    fn count_fenced(&self, n: u64) {
        self.inner
            .stats
            .fenced_writes
            .fetch_add(n, Ordering::Relaxed);
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

    /// Checks with a tiny write (this router's heartbeat) that the
    /// database takes writes.
    pub async fn probe_write(&self) -> Result<()> {
        self.heartbeat().await
    }

    /// Why the store is failed: Some after a call or a background task met
    /// a lost or refused connection ([`Error::Unavailable`], not a pool
    /// that is merely busy); None again once the recovery probe finds the
    /// database answering (it checks every second while failed).
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.borrow().clone()
    }

    /// Follows [`PgStore::failure`].
    pub fn watch_failure(&self) -> watch::Receiver<Option<String>> {
        self.inner.failure.subscribe()
    }

    /// Marks the store failed when `e` says the database is out of reach.
    fn note_error(&self, e: &Error) {
        if let Error::Unavailable(m) = e {
            if m.starts_with(POOL_BUSY) {
                return;
            }
            let changed = self.inner.failure.send_if_modified(|f| {
                if f.is_none() {
                    *f = Some(m.clone());
                    true
                } else {
                    false
                }
            });
            if changed {
                tracing::error!(error = %m, "postgres: the database is out of reach; the store is failed until it answers again");
            }
        }
    }

    /// `r`, having marked the store failed if it is a connection-class error.
    fn noted<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.note_error(e);
        }
        r
    }

    /// What other routers sharing the database do (see [`Change`]), and
    /// lanes this router acquired.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    fn send_change(&self, c: Change) {
        // No receiver is fine: hints only.
        let _ = self.inner.changes.send(c);
    }

    /// Stops the background tasks, writes what the lanes delivered and did
    /// not write yet, and gives up this router's leases and heartbeat, so
    /// the other routers take its lanes at once instead of after the TTL.
    /// The store still answers calls afterwards, but holds no lane.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        if let Err(e) = self.save_lanes_all().await {
            tracing::warn!(error = %e, "postgres: cannot write the last delivery outcomes at shutdown");
        }
        if let Err(e) = self.release_all().await {
            tracing::warn!(error = %e, "postgres: cannot release the leases at shutdown");
        }
    }

    /// Tests: pauses (true) or resumes the lease task's rounds, as if the
    /// router were stopped (SIGSTOP) or partitioned.
    #[cfg(test)]
    fn pause_leases(&self, paused: bool) {
        self.inner.leases_paused.store(paused, Ordering::Relaxed);
    }
}

fn check_schema(schema: &str) -> Result<()> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && schema.bytes().next().is_some_and(|b| !b.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(Error::Startup(format!(
            "postgres schema {schema:?}: use lower-case letters, digits and '_' \
             (not first a digit), at most 63 bytes"
        )))
    }
}

/// While the store is failed, checks every second whether the database
/// answers (a connection from the pool and a trivial query) and clears the
/// failure when it does.
async fn recovery_task(
    weak: Weak<Inner>,
    mut stop: watch::Receiver<bool>,
    mut failure: watch::Receiver<Option<String>>,
) {
    loop {
        let go_on = tokio::select! {
            r = failure.wait_for(|f| f.is_some()) => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        };
        if !go_on {
            return;
        }
        loop {
            let stopped = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopped {
                return;
            }
            let Some(store) = PgStore::upgrade(&weak) else {
                return;
            };
            if store.probe().await.is_ok() {
                store.inner.failure.send_replace(None);
                tracing::info!("postgres: the database answers again; the store takes writes");
                break;
            }
        }
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
        PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
            Error::Unavailable(format!("{POOL_BUSY}: {}", describe_pool(&e)))
        }
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
