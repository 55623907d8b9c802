//! Storage: the interfaces the rest of the router speaks, and their backends.
//!
//! Everything outside this module holds a [`Store`] and calls it through
//! four domain-typed, async interfaces; none of it knows which backend runs:
//! - [`EventLog`]: appending events (durable when it returns, idempotent on
//!   the event id) and what is stored;
//! - [`ConfigStore`]: webhooks, their secrets, the first-start tokens;
//! - [`LaneStore`]: what each lane (webhook × mode) sends next, and its
//!   outcomes, written in batches; the janitor's retention work;
//! - [`DeliveryLog`]: listing and requeuing deliveries;
//! - [`StoreHealth`]: durability barriers, failure and recovery.
//!
//! Backends: `sled/` (the embedded default; the only code that touches
//! sled) and `postgres/` (one database shared by several routers: lanes
//! leased with an epoch, every lane write fenced by it). [`Store`] is a
//! closed enum over them and implements every interface by `match`, so
//! generic methods stay possible and nothing is boxed. [`open`] is the only
//! place that chooses one.
//!
//! Shared here: [`crypt`] (secrets sealed at rest, the same format on every
//! backend) and [`types`] (lane keys, takes, pages, reports).

pub mod crypt;
pub mod postgres;
pub mod sled;
pub mod types;

use std::future::Future;

use futures::future::BoxFuture;
use std::path::Path;
use std::sync::Arc;

pub use self::postgres::PgStore;
pub use self::sled::{DiskSync, SledStore};
pub use types::{
    AppendOutcome, Appended, Change, DeliveryPage, JanitorReport, LaneKey, LaneTally, Take,
    TakeArgs, BACKLOG_SEED_LIMIT,
};

use crate::config::TokenConfig;
use crate::domain::catalog::Catalog;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, LaneFilter};
use crate::domain::event::{NewEvent, StoredEvent};
use crate::domain::webhook::{SecretRecord, Webhook};
use crate::error::{Error, Result};

/// The event log of every account.
pub trait EventLog {
    /// Appends `events` to `account_id`'s log. Durable (power loss
    /// included) when it returns Ok; an event whose id the account already
    /// stored (or that came earlier in the same call) is reported as a
    /// duplicate and not stored again. Each event keeps its delivery mode.
    fn append_events(
        &self,
        account_id: u64,
        events: Vec<NewEvent>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Appended>> + Send;

    /// Up to `limit` durable events of `account_id` after `after_seq`, in
    /// log order (increasing sequence numbers).
    fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>>> + Send;

    /// A sequence number no durable event of `account_id` is above yet
    /// (lanes start their wake-up watch from it).
    fn durable_head(&self, account_id: u64) -> u64;

    /// Events in the log, all accounts (for the metrics).
    fn stored_events(&self) -> u64;
}

/// Webhook configuration, secrets and the first-start tokens.
pub trait ConfigStore {
    /// Stores a new webhook (and its secret), unless its account already
    /// has `max_per_account` (RESOURCE_EXHAUSTED); the limit holds under
    /// concurrent creates.
    fn create_webhook(
        &self,
        webhook: Webhook,
        secret: Option<SecretRecord>,
        max_per_account: u32,
    ) -> impl Future<Output = Result<()>> + Send;

    /// One webhook of an account.
    fn get_webhook(
        &self,
        account_id: u64,
        id: &str,
    ) -> impl Future<Output = Result<Option<Webhook>>> + Send;

    /// A page of an account's webhooks by id, after `after`; and whether more follow.
    fn list_webhooks(
        &self,
        account_id: u64,
        after: Option<String>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<Webhook>, bool)>> + Send;

    /// Every webhook of every account (the dispatcher's start).
    fn all_webhooks(&self) -> impl Future<Output = Result<Vec<Webhook>>> + Send;

    /// Applies `change` to the stored webhook and its secret atomically: the
    /// closure gets the webhook to edit and the current secret, and returns
    /// a secret to store instead (or None to keep it). NOT_FOUND for a
    /// missing or deleted webhook; the change can never revive a deleted one.
    fn update_webhook<F>(
        &self,
        account_id: u64,
        id: &str,
        change: F,
    ) -> impl Future<Output = Result<Webhook>> + Send
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>
            + Send
            + 'static;

    /// Deletes a webhook, its secret, lanes and deliveries, for good.
    fn delete_webhook(&self, account_id: u64, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// A webhook's signing secret(s), opened.
    fn get_secret(&self, id: &str) -> impl Future<Output = Result<Option<SecretRecord>>> + Send;

    /// Whether `webhook_id` was deleted (cheap; no I/O).
    fn is_deleted(&self, webhook_id: &str) -> bool;

    /// The tokens created on first start, if any.
    fn bootstrap_tokens(&self) -> impl Future<Output = Result<Option<Vec<TokenConfig>>>> + Send;

    /// Stores the first-start tokens (hashes only), durably, unless some
    /// are stored already (another router sharing the store started first):
    /// then returns those and stores nothing.
    fn set_bootstrap_tokens(
        &self,
        tokens: &[TokenConfig],
    ) -> impl Future<Output = Result<Option<Vec<TokenConfig>>>> + Send;
}

/// Lanes: what each sends next and what came of it.
pub trait LaneStore {
    /// Up to `n` things for the lane to do (see [`Take`]), at most
    /// `max_events_total` events over all of them.
    fn lane_take_many(
        &self,
        key: LaneKey,
        filter: LaneFilter,
        args: TakeArgs,
        n: usize,
        max_events_total: usize,
    ) -> impl Future<Output = Result<Vec<Take>>> + Send;

    /// Records a failed attempt with its events, durably, before the retry
    /// wait: a crash then resumes this schedule under the same id.
    fn lane_attempt_failed(
        &self,
        key: LaneKey,
        record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> impl Future<Output = Result<DeliveryRecord>> + Send;

    /// Records a finished delivery (delivered, dead or expired).
    fn lane_finish(
        &self,
        key: LaneKey,
        record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> impl Future<Output = Result<DeliveryRecord>> + Send;

    /// Takes a delivered new payload into memory, to be written with the
    /// next batch, when that needs no I/O now; false: call
    /// [`LaneStore::lane_finish`] instead.
    fn lane_finish_quick(&self, key: &LaneKey, record: &DeliveryRecord) -> bool;

    /// Writes what the lanes delivered and did not write yet (one batch per
    /// lane); returns how many records.
    fn save_lanes(&self) -> impl Future<Output = Result<usize>> + Send;

    /// Every lane's live figures (for the metrics; no I/O).
    fn lane_tallies(&self) -> Vec<(LaneKey, Arc<LaneTally>)>;

    /// Ingest time of the next event the lane will take, looking at most
    /// `scan_limit` log entries ahead (for the metrics).
    fn lane_next_ingest_ms(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>>;

    /// One round of retention work: expiring what lanes did not send in
    /// time, purging finished deliveries, trimming the log.
    fn janitor_round(
        &self,
        catalog: Arc<Catalog>,
        now_ms: i64,
        retention_ms: i64,
        dead_retention_ms: i64,
    ) -> impl Future<Output = Result<JanitorReport>> + Send;
}

/// The delivery log.
pub trait DeliveryLog {
    /// A page of a webhook's deliveries, newest first.
    fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<String>,
        limit: usize,
    ) -> impl Future<Output = Result<DeliveryPage>> + Send;

    /// Requeues the dead deliveries named by `ids` (all of them with None);
    /// `progress(done, total)` follows along. Returns how many.
    fn redeliver<P>(
        &self,
        webhook_id: &str,
        ids: Option<Vec<String>>,
        now_ms: i64,
        progress: P,
    ) -> impl Future<Output = Result<usize>> + Send
    where
        P: FnMut(usize, usize) + Send + 'static;

    /// Requeues those of the deliveries named by `ids` that are in one of
    /// `states`, were not requeued in bulk before (by a RedeliverEvents
    /// without ids or an earlier recovery) and whose events are still
    /// stored; marks them requeued, so no later recovery or bulk
    /// redelivery takes them again, even one running at the same time.
    /// Unknown ids and the others are left alone. Returns how many it
    /// requeued.
    fn recover_deliveries(
        &self,
        webhook_id: &str,
        ids: Vec<String>,
        states: Vec<DeliveryState>,
        now_ms: i64,
    ) -> impl Future<Output = Result<usize>> + Send;
}

/// Durability, failure and recovery.
pub trait StoreHealth {
    /// Waits until every write made before this call is durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Why the store stopped taking writes, if it did.
    fn failure(&self) -> Option<String>;

    /// Changes when the store fails (see [`StoreHealth::failure`]).
    fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>>;

    /// Checks with a tiny write that the store takes writes.
    fn probe(&self) -> impl Future<Output = Result<()>> + Send;

    /// Resolves once a failed store can be opened afresh (e.g. its folder
    /// takes writes again): the server then restarts on a new handle.
    /// Pending forever for a store that recovers by itself.
    fn recoverable(&self) -> BoxFuture<'static, ()>;

    /// Bytes the store occupies on disk, when it knows.
    fn size_on_disk(&self) -> u64;

    /// What other routers sharing the store do (see [`Change`]); a store no
    /// one else writes (sled) never sends anything.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
}

/// Which backend to open, and how.
#[derive(Clone)]
pub enum Backend {
    /// The embedded database in `dir`.
    Sled {
        /// The data folder.
        dir: std::path::PathBuf,
    },
    /// A PostgreSQL database shared with other routers.
    Postgres {
        /// `storage.postgres_url`.
        url: String,
        /// `storage.postgres_pool_size`.
        pool_size: usize,
        /// `storage.lease_ttl_ms`.
        lease_ttl: std::time::Duration,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sled { dir } => f.debug_struct("Sled").field("dir", dir).finish(),
            Backend::Postgres {
                url,
                pool_size,
                lease_ttl,
            } => f
                .debug_struct("Postgres")
                .field("url", &crate::config::mask_url_password(url))
                .field("pool_size", pool_size)
                .field("lease_ttl", lease_ttl)
                .finish(),
        }
    }
}

/// Handle to the storage backend in use; cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// The embedded sled database.
    Sled(SledStore),
    /// PostgreSQL, shared with other routers.
    Postgres(PgStore),
}

/// Opens the configured backend; `secret_key` seals secrets at rest.
pub async fn open(backend: &Backend, secret_key: Option<[u8; 32]>) -> Result<Store> {
    match backend {
        Backend::Sled { dir } => Ok(Store::Sled(
            SledStore::open_with_retry(dir, secret_key).await?,
        )),
        Backend::Postgres {
            url,
            pool_size,
            lease_ttl,
        } => Ok(Store::Postgres(
            PgStore::connect(url, *pool_size, secret_key.as_ref(), *lease_ttl).await?,
        )),
    }
}

/// Opens the configured store for a one-shot command (`export`, `import`):
/// like [`open`], without taking part in the work of a cluster (no leases,
/// no chores).
pub async fn open_for_tools(config: &crate::config::Config) -> Result<Store> {
    let key = config.storage.secret_key_bytes();
    match config.storage_backend() {
        Backend::Sled { dir } => Ok(Store::Sled(SledStore::open_with_retry(&dir, key).await?)),
        Backend::Postgres { url, pool_size, .. } => Ok(Store::Postgres(
            PgStore::connect_passive(&url, pool_size, key.as_ref()).await?,
        )),
    }
}

impl Store {
    /// Ends this router's part in the store: on PostgreSQL, writes what the
    /// lanes delivered and releases its leases at once, so other routers
    /// take its lanes without waiting for them to expire. Then flushes.
    pub async fn close(&self) -> Result<()> {
        match self {
            Store::Sled(s) => StoreHealth::flush(s).await,
            Store::Postgres(s) => {
                s.shutdown().await;
                Ok(())
            }
        }
    }

    /// Lane writes refused because this router had lost the lane's lease
    /// (always 0 on sled, where one process owns every lane).
    pub fn fenced_writes(&self) -> u64 {
        match self {
            Store::Sled(_) => 0,
            Store::Postgres(s) => s.fenced_writes(),
        }
    }

    /// Opens an embedded store in `dir` (tests and tools).
    pub fn open_sled(dir: &Path) -> Result<Store> {
        SledStore::open(dir).map(Store::Sled)
    }
}

/// Forwards a call to the backend in use.
macro_rules! on_backend {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Sled($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl EventLog for Store {
    async fn append_events(
        &self,
        account_id: u64,
        events: Vec<NewEvent>,
        now_ms: i64,
    ) -> Result<Appended> {
        on_backend!(self, s => s.append_events(account_id, events, now_ms).await)
    }
    async fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        on_backend!(self, s => EventLog::read_events(s, account_id, after_seq, limit).await)
    }
    fn durable_head(&self, account_id: u64) -> u64 {
        on_backend!(self, s => EventLog::durable_head(s, account_id))
    }
    fn stored_events(&self) -> u64 {
        on_backend!(self, s => EventLog::stored_events(s))
    }
}

impl ConfigStore for Store {
    async fn create_webhook(
        &self,
        webhook: Webhook,
        secret: Option<SecretRecord>,
        max_per_account: u32,
    ) -> Result<()> {
        on_backend!(self, s => ConfigStore::create_webhook(s, webhook, secret, max_per_account).await)
    }
    async fn get_webhook(&self, account_id: u64, id: &str) -> Result<Option<Webhook>> {
        on_backend!(self, s => ConfigStore::get_webhook(s, account_id, id).await)
    }
    async fn list_webhooks(
        &self,
        account_id: u64,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Webhook>, bool)> {
        on_backend!(self, s => ConfigStore::list_webhooks(s, account_id, after, limit).await)
    }
    async fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        on_backend!(self, s => ConfigStore::all_webhooks(s).await)
    }
    async fn update_webhook<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>
            + Send
            + 'static,
    {
        on_backend!(self, s => ConfigStore::update_webhook(s, account_id, id, change).await)
    }
    async fn delete_webhook(&self, account_id: u64, id: &str) -> Result<()> {
        on_backend!(self, s => ConfigStore::delete_webhook(s, account_id, id).await)
    }
    async fn get_secret(&self, id: &str) -> Result<Option<SecretRecord>> {
        on_backend!(self, s => ConfigStore::get_secret(s, id).await)
    }
    fn is_deleted(&self, webhook_id: &str) -> bool {
        on_backend!(self, s => ConfigStore::is_deleted(s, webhook_id))
    }
    async fn bootstrap_tokens(&self) -> Result<Option<Vec<TokenConfig>>> {
        on_backend!(self, s => ConfigStore::bootstrap_tokens(s).await)
    }
    async fn set_bootstrap_tokens(
        &self,
        tokens: &[TokenConfig],
    ) -> Result<Option<Vec<TokenConfig>>> {
        on_backend!(self, s => ConfigStore::set_bootstrap_tokens(s, tokens).await)
    }
}

impl LaneStore for Store {
    async fn lane_take_many(
        &self,
        key: LaneKey,
        filter: LaneFilter,
        args: TakeArgs,
        n: usize,
        max_events_total: usize,
    ) -> Result<Vec<Take>> {
        on_backend!(self, s => LaneStore::lane_take_many(s, key, filter, args, n, max_events_total).await)
    }
    async fn lane_attempt_failed(
        &self,
        key: LaneKey,
        record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        on_backend!(self, s => LaneStore::lane_attempt_failed(s, key, record, events).await)
    }
    async fn lane_finish(
        &self,
        key: LaneKey,
        record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        on_backend!(self, s => LaneStore::lane_finish(s, key, record, events).await)
    }
    fn lane_finish_quick(&self, key: &LaneKey, record: &DeliveryRecord) -> bool {
        on_backend!(self, s => LaneStore::lane_finish_quick(s, key, record))
    }
    async fn save_lanes(&self) -> Result<usize> {
        on_backend!(self, s => LaneStore::save_lanes(s).await)
    }
    fn lane_tallies(&self) -> Vec<(LaneKey, Arc<LaneTally>)> {
        on_backend!(self, s => LaneStore::lane_tallies(s))
    }
    fn lane_next_ingest_ms(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>> {
        on_backend!(self, s => LaneStore::lane_next_ingest_ms(s, key, filter, scan_limit))
    }
    async fn janitor_round(
        &self,
        catalog: Arc<Catalog>,
        now_ms: i64,
        retention_ms: i64,
        dead_retention_ms: i64,
    ) -> Result<JanitorReport> {
        on_backend!(self, s => LaneStore::janitor_round(s, catalog, now_ms, retention_ms, dead_retention_ms).await)
    }
}

impl DeliveryLog for Store {
    async fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<String>,
        limit: usize,
    ) -> Result<DeliveryPage> {
        on_backend!(self, s => DeliveryLog::list_deliveries(s, webhook_id, state, after, limit).await)
    }
    async fn redeliver<P>(
        &self,
        webhook_id: &str,
        ids: Option<Vec<String>>,
        now_ms: i64,
        progress: P,
    ) -> Result<usize>
    where
        P: FnMut(usize, usize) + Send + 'static,
    {
        on_backend!(self, s => DeliveryLog::redeliver(s, webhook_id, ids, now_ms, progress).await)
    }
    async fn recover_deliveries(
        &self,
        webhook_id: &str,
        ids: Vec<String>,
        states: Vec<DeliveryState>,
        now_ms: i64,
    ) -> Result<usize> {
        on_backend!(self, s => DeliveryLog::recover_deliveries(s, webhook_id, ids, states, now_ms).await)
    }
}

impl StoreHealth for Store {
    async fn flush(&self) -> Result<()> {
        on_backend!(self, s => StoreHealth::flush(s).await)
    }
    fn failure(&self) -> Option<String> {
        on_backend!(self, s => StoreHealth::failure(s))
    }
    fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        on_backend!(self, s => StoreHealth::watch_failure(s))
    }
    async fn probe(&self) -> Result<()> {
        on_backend!(self, s => StoreHealth::probe(s).await)
    }
    fn recoverable(&self) -> BoxFuture<'static, ()> {
        on_backend!(self, s => StoreHealth::recoverable(s))
    }
    fn size_on_disk(&self) -> u64 {
        on_backend!(self, s => StoreHealth::size_on_disk(s))
    }
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        on_backend!(self, s => StoreHealth::changes(s))
    }
}

/// The refusal of a webhook past `limits.max_webhooks_per_account`: names
/// the setting and its value, so the operator knows what to raise.
pub fn webhook_limit_reached(account_id: u64, count: usize, max: u64) -> Error {
    Error::ResourceExhausted(format!(
        "account {account_id} already has {count} webhooks, the most \
         limits.max_webhooks_per_account = {max} allows; delete one or raise the limit"
    ))
}
