//! The store interfaces over sled: each call runs the synchronous method of
//! the same name on a blocking thread (see [`SledStore::blocking`]), so no
//! tokio worker waits on the disk.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::SledStore;
use crate::config::TokenConfig;
use crate::domain::catalog::Catalog;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, LaneFilter};
use crate::domain::event::{NewEvent, StoredEvent};
use crate::domain::webhook::{SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::store::types::*;
use crate::store::{ConfigStore, DeliveryLog, EventLog, LaneStore, StoreHealth};

/// Bytes written (and removed) to check that the data folder takes writes
/// again: room for a couple of the database's log segments.
const WRITE_PROBE_BYTES: usize = 1 << 20;

impl SledStore {
    /// Opens the store on a blocking thread, waiting briefly if a previous
    /// instance in this process still holds the folder's lock (a restart
    /// after a storage failure).
    pub async fn open_with_retry(dir: &Path, secret_key: Option<[u8; 32]>) -> Result<SledStore> {
        let mut tries = 0;
        loop {
            let path = dir.to_path_buf();
            let opened = tokio::task::spawn_blocking(move || {
                SledStore::open_with_key(&path, secret_key.as_ref())
            })
            .await
            .map_err(|e| Error::Internal(format!("opening the store: {e}")))?;
            match opened {
                Err(Error::Unavailable(m)) if m == super::folder_in_use(dir) => {
                    if tries == 30 {
                        // Not a storage outage: a start that cannot proceed.
                        return Err(Error::Startup(m));
                    }
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }
}

impl EventLog for SledStore {
    async fn append_events(
        &self,
        account_id: u64,
        events: Vec<NewEvent>,
        now_ms: i64,
    ) -> Result<Appended> {
        SledStore::append_events(self, account_id, events, now_ms).await
    }

    async fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.blocking(move |s| s.read_events(account_id, after_seq, limit))
            .await
    }

    fn durable_head(&self, _account_id: u64) -> u64 {
        // Sequence numbers are global to the folder.
        self.durable_seq()
    }

    fn stored_events(&self) -> u64 {
        SledStore::stored_events(self)
    }
}

impl ConfigStore for SledStore {
    async fn create_webhook(
        &self,
        webhook: Webhook,
        secret: Option<SecretRecord>,
        max_per_account: u32,
    ) -> Result<()> {
        SledStore::create_webhook(self, webhook, secret, max_per_account).await
    }

    async fn get_webhook(&self, account_id: u64, id: &str) -> Result<Option<Webhook>> {
        let id = id.to_string();
        self.blocking(move |s| s.get_webhook(account_id, &id)).await
    }

    async fn list_webhooks(
        &self,
        account_id: u64,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Webhook>, bool)> {
        self.blocking(move |s| s.list_webhooks(account_id, after.as_deref(), limit))
            .await
    }

    async fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        self.blocking(|s| s.all_webhooks()).await
    }

    async fn update_webhook<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>
            + Send
            + 'static,
    {
        SledStore::update_webhook(self, account_id, id, change).await
    }

    async fn delete_webhook(&self, account_id: u64, id: &str) -> Result<()> {
        SledStore::delete_webhook(self, account_id, id).await
    }

    async fn get_secret(&self, id: &str) -> Result<Option<SecretRecord>> {
        let id = id.to_string();
        self.blocking(move |s| s.get_secret(&id)).await
    }

    fn is_deleted(&self, webhook_id: &str) -> bool {
        SledStore::is_deleted(self, webhook_id)
    }

    async fn bootstrap_tokens(&self) -> Result<Option<Vec<TokenConfig>>> {
        self.blocking(|s| s.bootstrap_tokens()).await
    }

    async fn set_bootstrap_tokens(
        &self,
        tokens: &[TokenConfig],
    ) -> Result<Option<Vec<TokenConfig>>> {
        // One process owns the folder, and the server asks first.
        if let Some(stored) = self.blocking(|s| s.bootstrap_tokens()).await? {
            return Ok(Some(stored));
        }
        SledStore::set_bootstrap_tokens(self, tokens).await?;
        Ok(None)
    }
}

impl LaneStore for SledStore {
    async fn lane_take_many(
        &self,
        key: LaneKey,
        filter: LaneFilter,
        args: TakeArgs,
        n: usize,
        max_events_total: usize,
    ) -> Result<Vec<Take>> {
        self.blocking(move |s| s.lane_take_many(&key, &filter, args, n, max_events_total))
            .await
    }

    async fn lane_attempt_failed(
        &self,
        key: LaneKey,
        mut record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        let record = self
            .blocking(move |s| {
                s.lane_attempt_failed(&key, &mut record, &events)?;
                Ok(record)
            })
            .await?;
        self.flush().await?;
        Ok(record)
    }

    async fn lane_finish(
        &self,
        key: LaneKey,
        mut record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        self.blocking(move |s| {
            s.lane_finish(&key, &mut record, &events)?;
            Ok(record)
        })
        .await
    }

    fn lane_finish_quick(&self, key: &LaneKey, record: &DeliveryRecord) -> bool {
        SledStore::lane_finish_quick(self, key, record)
    }

    async fn save_lanes(&self) -> Result<usize> {
        self.blocking(|s| s.save_lanes()).await
    }

    fn lane_tallies(&self) -> Vec<(LaneKey, Arc<LaneTally>)> {
        SledStore::lane_tallies(self)
    }

    fn lane_next_ingest_ms(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>> {
        SledStore::lane_next_ingest_ms(self, key, filter, scan_limit)
    }

    async fn janitor_round(
        &self,
        catalog: Arc<Catalog>,
        now_ms: i64,
        retention_ms: i64,
        dead_retention_ms: i64,
    ) -> Result<JanitorReport> {
        self.blocking(move |s| s.janitor_round(&catalog, now_ms, retention_ms, dead_retention_ms))
            .await
    }
}

impl DeliveryLog for SledStore {
    async fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<String>,
        limit: usize,
    ) -> Result<DeliveryPage> {
        let webhook_id = webhook_id.to_string();
        self.blocking(move |s| s.list_deliveries(&webhook_id, state, after.as_deref(), limit))
            .await
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
        let webhook_id = webhook_id.to_string();
        let total = self
            .blocking(move |s| s.redeliver(&webhook_id, ids.as_deref(), now_ms, progress))
            .await?;
        self.flush().await?;
        Ok(total)
    }

    async fn recover_deliveries(
        &self,
        webhook_id: &str,
        ids: Vec<String>,
        states: Vec<DeliveryState>,
        now_ms: i64,
    ) -> Result<usize> {
        let webhook_id = webhook_id.to_string();
        let n = self
            .blocking(move |s| s.recover(&webhook_id, &ids, &states, now_ms))
            .await?;
        self.flush().await?;
        Ok(n)
    }
}

impl StoreHealth for SledStore {
    async fn flush(&self) -> Result<()> {
        SledStore::flush(self).await
    }

    fn failure(&self) -> Option<String> {
        SledStore::failure(self)
    }

    fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        SledStore::watch_failure(self)
    }

    async fn probe(&self) -> Result<()> {
        self.blocking(|s| s.probe()).await
    }

    /// sled 0.34 cannot resume after a write error: once the store has
    /// failed, checks every second whether the data folder takes writes
    /// again (a probe file of [`WRITE_PROBE_BYTES`], fsynced and removed).
    /// Holds no handle on the database, so it can be released and reopened.
    fn recoverable(&self) -> BoxFuture<'static, ()> {
        let mut failure = self.watch_failure();
        let probe = self.inner.dir.join(".write-probe");
        Box::pin(async move {
            if failure.wait_for(|f| f.is_some()).await.is_err() {
                // The store closed without failing.
                return std::future::pending().await;
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let path = probe.clone();
                let writable = tokio::task::spawn_blocking(move || {
                    let result = std::fs::write(&path, vec![0u8; WRITE_PROBE_BYTES])
                        .and_then(|_| std::fs::File::open(&path)?.sync_all());
                    let _ = std::fs::remove_file(&path);
                    result.is_ok()
                })
                .await
                .unwrap_or(false);
                if writable {
                    return;
                }
            }
        })
    }

    fn size_on_disk(&self) -> u64 {
        SledStore::size_on_disk(self)
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        // One process owns the folder: nothing changes behind its back.
        tokio::sync::broadcast::channel(1).1
    }
}
