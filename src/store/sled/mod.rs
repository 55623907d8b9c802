//! The embedded backend: the only code that touches sled. [`SledStore`]
//! implements the store interfaces (see `api.rs`) over the synchronous
//! methods of the files below.
//!
//! Trees and keys (all integers big-endian so byte order is numeric order):
//! - default tree: `health_probe` → empty, rewritten to check that writes work.
//! - `meta`: `schema_version` → u32; `bootstrap_tokens` → JSON;
//!   `secret_key_id` → the id of the key secrets are sealed with (see
//!   [`crate::store::crypt`]).
//! - `webhooks`: account(8) ‖ webhook id → Webhook (JSON).
//! - `secrets`: webhook id → SecretRecord (JSON).
//! - `log`: `e` ‖ account(8) ‖ first seq(8) → chunk (the events of one
//!   request, each with its delivery mode, see `log.rs`); `i` ‖ account(8) ‖
//!   event id → seq(8); `m` → highest seq. One tree, so one batch makes an
//!   ingest request atomic.
//! - `lanes`: lane states, delivery records, kept payloads, requeued work,
//!   the finish-time and dead-letter indexes and tombstones of deleted
//!   webhooks (see `deliveries.rs`).
//!
//! Methods are synchronous and may block on disk; async callers run them
//! with [`SledStore::blocking`] (or use the async ones, which do so inside), so
//! no tokio worker waits on sled.

mod api;
mod commit;
mod deliveries;
mod durable;
mod janitor;
mod log;
mod stats;
mod webhooks;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use commit::GroupCommit;
pub use deliveries::LaneState;
pub use durable::DiskSync;

use crate::config::TokenConfig;
use crate::error::{Error, Result};

/// Why a data folder cannot be opened while another process holds it.
pub fn folder_in_use(dir: &Path) -> String {
    format!(
        "another webhook-router process uses the data folder {} (its database is locked); \
         stop that process, or give this one another data_dir",
        dir.display()
    )
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        // I/O errors (disk full, read-only filesystem) are transient from
        // the caller's point of view: retry later.
        match e {
            sled::Error::Io(io) => Error::Unavailable(io.to_string()),
            other => Error::Internal(format!("sled: {other}")),
        }
    }
}

impl From<sled::transaction::TransactionError<Error>> for Error {
    fn from(e: sled::transaction::TransactionError<Error>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(inner) => inner,
            sled::transaction::TransactionError::Storage(s) => s.into(),
        }
    }
}

/// Version of the on-disk layout this build writes.
/// 1: one log key per event. 2: one log key per request (chunk).
/// 3: chunks record each event's delivery mode; finished deliveries are
/// indexed by finish time; dead letters and retried deliveries keep their
/// events with them.
pub const SCHEMA_VERSION: u32 = 3;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The data folder (`data_dir`).
    dir: std::path::PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    webhooks: sled::Tree,
    secrets: sled::Tree,
    log: sled::Tree,
    lanes: sled::Tree,
    /// Serialises webhook writes so the per-account limit cannot be raced.
    admin_lock: std::sync::Mutex<()>,
    /// Serialises redeliveries, so two of them never requeue one dead
    /// delivery twice.
    redeliver_lock: std::sync::Mutex<()>,
    /// Serialises appends: idempotency checks and sequence numbers.
    append_lock: std::sync::Mutex<log::AppendState>,
    /// Publish calls waiting for the log writer (see `append_events`).
    append_queue: std::sync::Mutex<log::AppendQueue>,
    commit: GroupCommit,
    /// Highest log sequence number known durable: every event up to it was
    /// acknowledged or is on disk. Lanes read no further (see
    /// [`SledStore::durable_seq`]).
    durable_seq: AtomicU64,
    /// Seals signing secrets and Basic passwords at rest, when a key is set.
    cipher: Option<crate::store::crypt::SecretCipher>,
    /// Lane locks, cached lane states and deleted webhooks.
    lane_registry: deliveries::LaneRegistry,
}

impl SledStore {
    /// Opens (or creates) the database under `dir` and checks its schema version.
    pub fn open(dir: &Path) -> Result<SledStore> {
        Self::open_with_key(dir, None)
    }

    /// Like [`SledStore::open`], sealing secrets and passwords with `secret_key`
    /// (`storage.secret_key`). Fails with [`Error::Startup`] when the folder
    /// holds values sealed with another key, or sealed values and no key is
    /// given. With a key on a folder of plain values, seals them all at once.
    pub fn open_with_key(dir: &Path, secret_key: Option<&[u8; 32]>) -> Result<SledStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Unavailable(format!("cannot create data_dir {}: {e}", dir.display()))
        })?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(64 * 1024 * 1024)
            // The group commit flushes and fsyncs instead (see commit.rs).
            .flush_every_ms(None)
            .open()
            .map_err(|e| match Error::from(e) {
                // sled's "could not acquire lock on …: WouldBlock": the
                // folder's lock file is held by another process.
                Error::Unavailable(m) if m.contains("could not acquire lock") => {
                    Error::Unavailable(folder_in_use(dir))
                }
                Error::Unavailable(m) => Error::Unavailable(format!(
                    "cannot open the database in {}: {m}",
                    dir.display()
                )),
                other => other,
            })?;
        let meta = db.open_tree("meta")?;
        check_schema(&db, &meta)?;
        let log = db.open_tree("log")?;
        let append_state = log::AppendState::load(&log)?;
        let webhooks = db.open_tree("webhooks")?;
        let secrets = db.open_tree("secrets")?;
        let cipher = secret_key.map(crate::store::crypt::SecretCipher::new);
        webhooks::check_secret_key(&db, &meta, &webhooks, &secrets, cipher.as_ref())?;
        // Everything recovered or converted above becomes durable here,
        // before anything is served from it.
        let disk = DiskSync::open(&dir.join("db")).map_err(|e| {
            Error::Unavailable(format!(
                "cannot fsync the database in {}: {e}",
                dir.display()
            ))
        })?;
        let durable_seq = AtomicU64::new(append_state.last_seq());
        let inner = Inner {
            dir: dir.to_path_buf(),
            commit: GroupCommit::start(db.clone(), disk),
            durable_seq,
            webhooks,
            secrets,
            cipher,
            lanes: db.open_tree("lanes")?,
            log,
            meta,
            db,
            admin_lock: std::sync::Mutex::new(()),
            redeliver_lock: std::sync::Mutex::new(()),
            append_lock: std::sync::Mutex::new(append_state),
            append_queue: std::sync::Mutex::default(),
            lane_registry: deliveries::LaneRegistry::default(),
        };
        let store = SledStore {
            inner: Arc::new(inner),
        };
        store.load_deleted()?;
        Ok(store)
    }

    /// Runs `f` on a blocking thread, so a caller on a tokio worker never
    /// waits on sled or on a lock held across sled calls.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&SledStore) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Internal(format!("store task: {e}")))?
    }

    /// Waits until every write made before this call is on disk.
    pub async fn flush(&self) -> Result<()> {
        let ticket = self.inner.commit.ticket();
        self.inner.commit.durable(ticket).await
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Tokens created on first start, if any.
    pub fn bootstrap_tokens(&self) -> Result<Option<Vec<TokenConfig>>> {
        match self.inner.meta.get("bootstrap_tokens")? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Why the store stopped taking writes, if it did. sled 0.34 cannot
    /// resume after a write error (disk full, read-only, I/O): reads keep
    /// working, writes fail until the database is opened again (the server
    /// does that once the folder takes writes again).
    pub fn failure(&self) -> Option<String> {
        self.inner.commit.failure()
    }

    /// Changes when the store fails (see [`SledStore::failure`]).
    pub fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.inner.commit.watch_failure()
    }

    /// Checks with a tiny write that the store still takes writes.
    pub fn probe(&self) -> Result<()> {
        self.inner.commit.probe(&self.inner.db)
    }

    /// Stores the first-start tokens (hashes only) durably.
    pub async fn set_bootstrap_tokens(&self, tokens: &[TokenConfig]) -> Result<()> {
        let value = serde_json::to_vec(tokens)?;
        self.blocking(move |s| {
            s.inner.meta.insert("bootstrap_tokens", value)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }
}

fn check_schema(db: &sled::Db, meta: &sled::Tree) -> Result<()> {
    match meta.get("schema_version")? {
        None => {
            // A new folder, or one from before versions were stored (none exists).
            meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            db.flush()?;
            Ok(())
        }
        Some(v) => {
            let found = u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::Internal("corrupt schema_version".into()))?,
            );
            if found > SCHEMA_VERSION {
                return Err(Error::Internal(format!(
                    "data folder has schema version {found}, newer than this build's {SCHEMA_VERSION}"
                )));
            }
            let log = db.open_tree("log")?;
            if found < 3 {
                let n = SledStore::index_old_records(&db.open_tree("lanes")?)?;
                tracing::info!(
                    records = n,
                    "delivery log indexed for schema version 3 (retention by finish time)"
                );
            }
            if found < 2 {
                let n = log::migrate_v1(&log)?;
                tracing::info!(
                    events = n,
                    "event log converted to schema version 2 (chunks)"
                );
            }
            if found < SCHEMA_VERSION {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
                log::migration_finished(&log)?;
            }
            Ok(())
        }
    }
}

/// Account prefix of keys.
fn account_key(account_id: u64) -> [u8; 8] {
    account_id.to_be_bytes()
}

/// Reads a big-endian u64 from the first 8 bytes.
fn be_u64(b: &[u8]) -> Result<u64> {
    b.get(..8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Internal("short key".into()))
}
