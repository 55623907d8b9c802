//! The store interfaces over PostgreSQL. Each call runs the backend's own
//! method; an error that says the database is out of reach marks the store
//! failed (see [`PgStore::failure`]) on its way back.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::PgStore;
use crate::config::TokenConfig;
use crate::domain::catalog::Catalog;
use crate::domain::delivery::{DeliveryRecord, DeliveryState, LaneFilter};
use crate::domain::event::{NewEvent, StoredEvent};
use crate::domain::webhook::{SecretRecord, Webhook};
use crate::error::Result;
use crate::store::types::*;
use crate::store::{ConfigStore, DeliveryLog, EventLog, LaneStore, StoreHealth};

impl EventLog for PgStore {
    async fn append_events(
        &self,
        account_id: u64,
        events: Vec<NewEvent>,
        now_ms: i64,
    ) -> Result<Appended> {
        PgStore::append_events(self, account_id, events, now_ms).await
    }

    async fn read_events(
        &self,
        account_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.noted(PgStore::read_events(self, account_id, after_seq, limit).await)
    }

    /// From the cache of heads (this router's appends, the poller's reads);
    /// 0 for an account not seen yet.
    fn durable_head(&self, account_id: u64) -> u64 {
        self.inner
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&account_id)
            .copied()
            .unwrap_or(0)
    }

    /// As the poller last counted it (every few seconds).
    fn stored_events(&self) -> u64 {
        self.inner.stored_events.load(Ordering::Relaxed)
    }
}

impl ConfigStore for PgStore {
    async fn create_webhook(
        &self,
        webhook: Webhook,
        secret: Option<SecretRecord>,
        max_per_account: u32,
    ) -> Result<()> {
        self.noted(PgStore::create_webhook(self, webhook, secret, max_per_account as usize).await)
    }

    async fn get_webhook(&self, account_id: u64, id: &str) -> Result<Option<Webhook>> {
        self.noted(PgStore::get_webhook(self, account_id, id).await)
    }

    async fn list_webhooks(
        &self,
        account_id: u64,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Webhook>, bool)> {
        self.noted(PgStore::list_webhooks(self, account_id, after.as_deref(), limit).await)
    }

    async fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        self.noted(PgStore::all_webhooks(self).await)
    }

    async fn update_webhook<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>
            + Send
            + 'static,
    {
        self.noted(PgStore::update_webhook(self, account_id, id, change).await)
    }

    async fn delete_webhook(&self, account_id: u64, id: &str) -> Result<()> {
        self.noted(PgStore::delete_webhook(self, account_id, id).await)
    }

    async fn get_secret(&self, id: &str) -> Result<Option<SecretRecord>> {
        self.noted(PgStore::get_secret(self, id).await)
    }

    /// From memory: the tombstones loaded at connect, this router's
    /// deletions, and those the poller saw.
    fn is_deleted(&self, webhook_id: &str) -> bool {
        self.is_deleted_mem(webhook_id)
    }

    async fn bootstrap_tokens(&self) -> Result<Option<Vec<TokenConfig>>> {
        self.noted(PgStore::bootstrap_tokens(self).await)
    }

    async fn set_bootstrap_tokens(
        &self,
        tokens: &[TokenConfig],
    ) -> Result<Option<Vec<TokenConfig>>> {
        self.noted(PgStore::set_bootstrap_tokens_if_absent(self, tokens).await)
    }
}

impl LaneStore for PgStore {
    async fn lane_take_many(
        &self,
        key: LaneKey,
        filter: LaneFilter,
        args: TakeArgs,
        n: usize,
        max_events_total: usize,
    ) -> Result<Vec<Take>> {
        self.noted(
            self.lane_take_many_impl(key, filter, args, n, max_events_total)
                .await,
        )
    }

    async fn lane_attempt_failed(
        &self,
        key: LaneKey,
        record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        self.noted(self.lane_attempt_failed_impl(key, record, events).await)
    }

    async fn lane_finish(
        &self,
        key: LaneKey,
        record: DeliveryRecord,
        events: Arc<Vec<StoredEvent>>,
    ) -> Result<DeliveryRecord> {
        self.noted(self.lane_finish_impl(key, record, events).await)
    }

    fn lane_finish_quick(&self, key: &LaneKey, record: &DeliveryRecord) -> bool {
        self.lane_finish_quick_impl(key, record)
    }

    async fn save_lanes(&self) -> Result<usize> {
        self.noted(self.save_lanes_all().await)
    }

    /// The lanes this router holds (each lane is counted by one router).
    fn lane_tallies(&self) -> Vec<(LaneKey, Arc<LaneTally>)> {
        self.held_tallies()
    }

    fn lane_next_ingest_ms(
        &self,
        key: &LaneKey,
        filter: &LaneFilter,
        scan_limit: usize,
    ) -> Result<Option<i64>> {
        self.lane_next_ingest_ms_cached(key, filter, scan_limit)
    }

    async fn janitor_round(
        &self,
        catalog: Arc<Catalog>,
        now_ms: i64,
        retention_ms: i64,
        dead_retention_ms: i64,
    ) -> Result<JanitorReport> {
        self.noted(
            self.janitor_round_impl(catalog, now_ms, retention_ms, dead_retention_ms)
                .await,
        )
    }
}

impl DeliveryLog for PgStore {
    async fn list_deliveries(
        &self,
        webhook_id: &str,
        state: Option<DeliveryState>,
        after: Option<String>,
        limit: usize,
    ) -> Result<DeliveryPage> {
        self.noted(
            self.list_deliveries_page(webhook_id, state, after.as_deref(), limit)
                .await,
        )
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
        self.noted(self.redeliver_impl(webhook_id, ids, now_ms, progress).await)
    }

    async fn recover_deliveries(
        &self,
        webhook_id: &str,
        ids: Vec<String>,
        states: Vec<DeliveryState>,
        now_ms: i64,
    ) -> Result<usize> {
        self.noted(self.recover_impl(webhook_id, ids, states, now_ms).await)
    }
}

impl StoreHealth for PgStore {
    /// Nothing to wait for: every write commits before it returns.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn failure(&self) -> Option<String> {
        PgStore::failure(self)
    }

    fn watch_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        PgStore::watch_failure(self)
    }

    /// This router's heartbeat, a one-row write.
    async fn probe(&self) -> Result<()> {
        let r = self.probe_write().await;
        if r.is_ok() && self.failure().is_some() {
            self.inner.failure.send_replace(None);
        }
        self.noted(r)
    }

    /// Never: the store recovers by itself (the recovery probe clears the
    /// failure), no reopening is needed.
    fn recoverable(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    /// `pg_database_size` as the poller last read it.
    fn size_on_disk(&self) -> u64 {
        self.inner.size_on_disk.load(Ordering::Relaxed)
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        PgStore::changes(self)
    }
}
