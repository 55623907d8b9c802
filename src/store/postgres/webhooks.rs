//! Webhook configuration, signing secrets and `meta`, with the semantics of
//! the sled store's `webhooks.rs`: the same limits, NotFound texts and
//! read-modify-write closure, and values sealed exactly as it seals them
//! (so a record exported from sled imports as is).
//!
//! Concurrency: creating a webhook locks its account's row `FOR UPDATE`
//! before counting, so the per-account limit holds across routers; updates
//! read the webhook row `FOR UPDATE` and deletes delete it first, so an
//! update racing a delete either runs before it or finds nothing, and a
//! deleted id, recorded in `deleted_webhooks` in the same transaction,
//! is never revived.

use deadpool_postgres::Object;

use super::{map_db, to_i64, PgStore};
use crate::config::TokenConfig;
use crate::domain::delivery::ModeTag;
use crate::domain::webhook::{Auth, SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::store::crypt::{self, Purpose, SecretCipher};

/// `meta` key of the id of the key secrets are sealed with (as in sled).
const SECRET_KEY_ID: &str = "secret_key_id";
/// `meta` key of the first-start tokens (as in sled).
const BOOTSTRAP_TOKENS: &str = "bootstrap_tokens";

/// `lanes.mode` of a lane mode (the same codes as `events.mode`).
pub(super) fn lane_mode_code(m: ModeTag) -> i16 {
    super::log::mode_code(m.into())
}

/// The lane mode of a `lanes.mode` value.
pub(super) fn lane_mode_of(code: i16) -> Result<ModeTag> {
    super::log::mode_of(code).map(ModeTag::from)
}

impl PgStore {
    /// Stores a new webhook (and its secret), refusing past
    /// `max_per_account` with [`Error::ResourceExhausted`] (the sled
    /// store's text). Its two lanes start at the end of the account's log,
    /// in the same transaction: it receives the events published after it
    /// was created. Durable on return. An id that exists or was deleted is
    /// refused with [`Error::FailedPrecondition`].
    pub async fn create_webhook(
        &self,
        webhook: Webhook,
        secret: Option<SecretRecord>,
        max_per_account: usize,
    ) -> Result<()> {
        let body = seal_webhook(self.inner.cipher.as_ref(), &webhook)?;
        let secret_body = secret
            .as_ref()
            .map(|s| seal_secret(self.inner.cipher.as_ref(), &webhook.id, s))
            .transpose()?;
        let account = to_i64(webhook.account_id);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_db)?;
        tx.execute(
            "INSERT INTO accounts (account_id, head_seq) VALUES ($1, 0) \
             ON CONFLICT (account_id) DO NOTHING",
            &[&account],
        )
        .await
        .map_err(map_db)?;
        // Serialises creates of the account (and orders them with appends,
        // so the lanes' start is exactly the end of the log).
        let head: i64 = tx
            .query_one(
                "SELECT head_seq FROM accounts WHERE account_id = $1 FOR UPDATE",
                &[&account],
            )
            .await
            .map_err(map_db)?
            .get(0);
        let count: i64 = tx
            .query_one(
                "SELECT count(*) FROM webhooks WHERE account_id = $1",
                &[&account],
            )
            .await
            .map_err(map_db)?
            .get(0);
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        if count >= max_per_account {
            return Err(crate::store::webhook_limit_reached(
                webhook.account_id,
                count,
                max_per_account as u64,
            ));
        }
        let inserted = tx
            .execute(
                "INSERT INTO webhooks (account_id, webhook_id, body, version, change_seq, writer) \
                 SELECT $1, $2, $3, 1, nextval('webhook_changes'), $4 \
                 WHERE NOT EXISTS (SELECT 1 FROM deleted_webhooks WHERE webhook_id = $2) \
                 ON CONFLICT DO NOTHING",
                &[&account, &webhook.id, &body, &self.inner.owner],
            )
            .await
            .map_err(map_db)?;
        if inserted == 0 {
            return Err(Error::FailedPrecondition(format!(
                "webhook {} already exists or was deleted",
                webhook.id
            )));
        }
        if let Some(sb) = &secret_body {
            tx.execute(
                "INSERT INTO secrets (webhook_id, body) VALUES ($1, $2) \
                 ON CONFLICT (webhook_id) DO UPDATE SET body = excluded.body",
                &[&webhook.id, sb],
            )
            .await
            .map_err(map_db)?;
        }
        let modes = [
            lane_mode_code(ModeTag::Realtime),
            lane_mode_code(ModeTag::Batch),
        ];
        tx.execute(
            "INSERT INTO lanes (account_id, webhook_id, mode, cursor_seq) \
             SELECT $1, $2, m, $3 FROM unnest($4::smallint[]) AS u(m) \
             ON CONFLICT (webhook_id, mode) DO NOTHING",
            &[&account, &webhook.id, &head, &modes.as_slice()],
        )
        .await
        .map_err(map_db)?;
        tx.commit().await.map_err(map_db)?;
        // Its lanes are there: lease them now rather than at the next round.
        self.inner.wake_leases.notify_one();
        Ok(())
    }

    /// One webhook of an account.
    pub async fn get_webhook(&self, account_id: u64, id: &str) -> Result<Option<Webhook>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT body FROM webhooks WHERE account_id = $1 AND webhook_id = $2")
            .await
            .map_err(map_db)?;
        match client
            .query_opt(&stmt, &[&to_i64(account_id), &id])
            .await
            .map_err(map_db)?
        {
            Some(row) => Ok(Some(self.open_webhook(row.get(0))?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` webhooks of an account with ids after `after` (id order
    /// is creation order), and whether more follow.
    pub async fn list_webhooks(
        &self,
        account_id: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Webhook>, bool)> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT body FROM webhooks WHERE account_id = $1 \
                 AND ($2::text IS NULL OR webhook_id > $2) \
                 ORDER BY webhook_id LIMIT $3",
            )
            .await
            .map_err(map_db)?;
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let rows = client
            .query(&stmt, &[&to_i64(account_id), &after, &fetch])
            .await
            .map_err(map_db)?;
        let more = rows.len() > limit;
        let out = rows
            .iter()
            .take(limit)
            .map(|r| self.open_webhook(r.get(0)))
            .collect::<Result<Vec<_>>>()?;
        Ok((out, more))
    }

    /// Every webhook of every account (for the dispatcher at start).
    pub async fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        let client = self.client().await?;
        client
            .query(
                "SELECT body FROM webhooks ORDER BY account_id, webhook_id",
                &[],
            )
            .await
            .map_err(map_db)?
            .iter()
            .map(|r| self.open_webhook(r.get(0)))
            .collect()
    }

    /// Read-modify-write of one webhook: `change` gets the webhook (read
    /// `FOR UPDATE`) and its secret, and may return a new secret to store
    /// with it. The row's `version` is incremented. Durable on return;
    /// [`Error::NotFound`] when the webhook does not exist (or was deleted,
    /// even by a delete racing this call).
    pub async fn update_webhook<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>
            + Send
            + 'static,
    {
        let account = to_i64(account_id);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_db)?;
        let Some(row) = tx
            .query_opt(
                "SELECT body FROM webhooks WHERE account_id = $1 AND webhook_id = $2 FOR UPDATE",
                &[&account, &id],
            )
            .await
            .map_err(map_db)?
        else {
            return Err(Error::NotFound(format!("webhook {id}")));
        };
        let mut w = self.open_webhook(row.get(0))?;
        let secret = match tx
            .query_opt(
                "SELECT body FROM secrets WHERE webhook_id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(map_db)?
        {
            Some(r) => Some(open_secret(self.inner.cipher.as_ref(), id, r.get(0))?),
            None => None,
        };
        let new_secret = change(&mut w, secret)?;
        let body = seal_webhook(self.inner.cipher.as_ref(), &w)?;
        tx.execute(
            "UPDATE webhooks SET body = $3, version = version + 1, \
               change_seq = nextval('webhook_changes'), writer = $4 \
             WHERE account_id = $1 AND webhook_id = $2",
            &[&account, &id, &body, &self.inner.owner],
        )
        .await
        .map_err(map_db)?;
        if let Some(s) = &new_secret {
            let sb = seal_secret(self.inner.cipher.as_ref(), id, s)?;
            tx.execute(
                "INSERT INTO secrets (webhook_id, body) VALUES ($1, $2) \
                 ON CONFLICT (webhook_id) DO UPDATE SET body = excluded.body",
                &[&id, &sb],
            )
            .await
            .map_err(map_db)?;
        }
        tx.commit().await.map_err(map_db)?;
        Ok(w)
    }

    /// Deletes a webhook: in one transaction its record, its secret and its
    /// lanes go and a tombstone is written, so no call racing the deletion
    /// can revive it (lane writes are fenced by the lane's row, which is
    /// gone; other writes lock the webhook's row first). Its delivery
    /// records and requeued deliveries are left for the janitor, which
    /// removes them a bounded number per round (as the sled store does).
    /// Durable on return; [`Error::NotFound`] when it does not exist. This
    /// router's lanes of the webhook stop at once (see
    /// [`PgStore::forget_webhook`]).
    pub async fn delete_webhook(&self, account_id: u64, id: &str) -> Result<()> {
        self.delete_webhook_row(account_id, id).await?;
        self.forget_webhook(id).await;
        Ok(())
    }

    async fn delete_webhook_row(&self, account_id: u64, id: &str) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_db)?;
        let removed = tx
            .execute(
                "DELETE FROM webhooks WHERE account_id = $1 AND webhook_id = $2",
                &[&to_i64(account_id), &id],
            )
            .await
            .map_err(map_db)?;
        if removed == 0 {
            return Err(Error::NotFound(format!("webhook {id}")));
        }
        for sql in [
            "DELETE FROM secrets WHERE webhook_id = $1",
            "DELETE FROM lanes WHERE webhook_id = $1",
        ] {
            tx.execute(sql, &[&id]).await.map_err(map_db)?;
        }
        tx.execute(
            "INSERT INTO deleted_webhooks \
               (webhook_id, deleted_ms, account_id, change_seq, writer) \
             VALUES ($1, $2, $3, nextval('webhook_changes'), $4) \
             ON CONFLICT (webhook_id) DO NOTHING",
            &[
                &id,
                &crate::domain::now_ms(),
                &to_i64(account_id),
                &self.inner.owner,
            ],
        )
        .await
        .map_err(map_db)?;
        tx.commit().await.map_err(map_db)?;
        Ok(())
    }

    /// Whether the webhook `id` was deleted, as stored (the trait's
    /// `is_deleted` answers from memory).
    pub async fn is_deleted_stored(&self, id: &str) -> Result<bool> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT 1 FROM deleted_webhooks WHERE webhook_id = $1")
            .await
            .map_err(map_db)?;
        Ok(client
            .query_opt(&stmt, &[&id])
            .await
            .map_err(map_db)?
            .is_some())
    }

    /// The signing secrets of a webhook, if it has any.
    pub async fn get_secret(&self, id: &str) -> Result<Option<SecretRecord>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT body FROM secrets WHERE webhook_id = $1")
            .await
            .map_err(map_db)?;
        match client.query_opt(&stmt, &[&id]).await.map_err(map_db)? {
            Some(r) => Ok(Some(open_secret(self.inner.cipher.as_ref(), id, r.get(0))?)),
            None => Ok(None),
        }
    }

    /// Tokens created on first start, if any.
    pub async fn bootstrap_tokens(&self) -> Result<Option<Vec<TokenConfig>>> {
        let client = self.client().await?;
        match client
            .query_opt(
                "SELECT value FROM meta WHERE key = $1",
                &[&BOOTSTRAP_TOKENS],
            )
            .await
            .map_err(map_db)?
        {
            Some(r) => Ok(Some(serde_json::from_slice(r.get(0))?)),
            None => Ok(None),
        }
    }

    /// Stores the first-start tokens (hashes only), replacing any. Durable
    /// on return.
    pub async fn set_bootstrap_tokens(&self, tokens: &[TokenConfig]) -> Result<()> {
        let value = serde_json::to_vec(tokens)?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&BOOTSTRAP_TOKENS, &value],
            )
            .await
            .map_err(map_db)?;
        Ok(())
    }

    /// Stores the first-start tokens unless some are stored already, for
    /// routers starting together on an empty database: None when `tokens`
    /// were stored, or the tokens another router stored first.
    pub async fn set_bootstrap_tokens_if_absent(
        &self,
        tokens: &[TokenConfig],
    ) -> Result<Option<Vec<TokenConfig>>> {
        let value = serde_json::to_vec(tokens)?;
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&BOOTSTRAP_TOKENS, &value],
            )
            .await
            .map_err(map_db)?;
        drop(client);
        if inserted == 1 {
            Ok(None)
        } else {
            self.bootstrap_tokens().await
        }
    }

    fn open_webhook(&self, raw: &[u8]) -> Result<Webhook> {
        open_webhook(self.inner.cipher.as_ref(), raw)
    }
}

/// Checks the configured key against the database, as the sled store
/// checks it against its folder: no key on sealed values, or another key,
/// is an [`Error::Startup`]. On the first start with a key, the key id is
/// recorded and every plain secret and password sealed, in one transaction
/// (a router starting at the same moment waits on the key id's row, then
/// checks the id recorded).
pub(super) async fn check_secret_key(
    client: &mut Object,
    cipher: Option<&SecretCipher>,
) -> Result<()> {
    let stored: Option<Vec<u8>> = client
        .query_opt("SELECT value FROM meta WHERE key = $1", &[&SECRET_KEY_ID])
        .await
        .map_err(map_db)?
        .map(|r| r.get(0));
    let stored = stored.map(|v| String::from_utf8_lossy(&v).into_owned());
    match (stored, cipher) {
        (None, None) => Ok(()),
        (Some(id), None) => Err(Error::Startup(format!(
            "the PostgreSQL database holds webhook secrets encrypted with key id {id}; set \
             storage.secret_key (or WEBHOOK_ROUTER__STORAGE__SECRET_KEY) to that key"
        ))),
        (Some(id), Some(c)) => key_matches(&id, c),
        (None, Some(c)) => seal_all(client, c).await,
    }
}

fn key_matches(stored: &str, c: &SecretCipher) -> Result<()> {
    if stored == c.key_id() {
        return Ok(());
    }
    Err(Error::Startup(format!(
        "storage.secret_key has key id {}, but the PostgreSQL database's webhook secrets are \
         encrypted with key id {stored}; set the key they were encrypted with",
        c.key_id()
    )))
}

/// Records the key id and seals every plain secret and password.
async fn seal_all(client: &mut Object, c: &SecretCipher) -> Result<()> {
    let tx = client.transaction().await.map_err(map_db)?;
    let inserted = tx
        .execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&SECRET_KEY_ID, &c.key_id().as_bytes()],
        )
        .await
        .map_err(map_db)?;
    if inserted == 0 {
        // Another router recorded a key first: it must be this one.
        let row = tx
            .query_one("SELECT value FROM meta WHERE key = $1", &[&SECRET_KEY_ID])
            .await
            .map_err(map_db)?;
        let id = String::from_utf8_lossy(row.get(0)).into_owned();
        tx.rollback().await.map_err(map_db)?;
        return key_matches(&id, c);
    }
    let mut sealed = 0usize;
    for row in tx
        .query(
            "SELECT account_id, webhook_id, body FROM webhooks FOR UPDATE",
            &[],
        )
        .await
        .map_err(map_db)?
    {
        let w = open_webhook(None, row.get(2))?;
        if let Auth::Basic { password, .. } = &w.auth {
            if crypt::is_sealed(password) {
                continue;
            }
            let account: i64 = row.get(0);
            let id: &str = row.get(1);
            tx.execute(
                "UPDATE webhooks SET body = $3 WHERE account_id = $1 AND webhook_id = $2",
                &[&account, &id, &seal_webhook(Some(c), &w)?],
            )
            .await
            .map_err(map_db)?;
            sealed += 1;
        }
    }
    for row in tx
        .query("SELECT webhook_id, body FROM secrets FOR UPDATE", &[])
        .await
        .map_err(map_db)?
    {
        let id: &str = row.get(0);
        let s = open_secret(None, id, row.get(1))?;
        if crypt::is_sealed(&s.current) {
            continue;
        }
        tx.execute(
            "UPDATE secrets SET body = $2 WHERE webhook_id = $1",
            &[&id, &seal_secret(Some(c), id, &s)?],
        )
        .await
        .map_err(map_db)?;
        sealed += 1;
    }
    tx.commit().await.map_err(map_db)?;
    tracing::info!(
        key_id = c.key_id(),
        sealed,
        "storage.secret_key set: webhook secrets and passwords are encrypted at rest"
    );
    Ok(())
}

// The four functions below are the sled store's (`store/webhooks.rs`),
// repeated because they are private there; they define the at-rest format
// both backends share.

/// A webhook record as written: with a key, the Basic password sealed.
fn seal_webhook(cipher: Option<&SecretCipher>, w: &Webhook) -> Result<Vec<u8>> {
    match (cipher, &w.auth) {
        (Some(c), Auth::Basic { username, password }) => {
            let mut sealed = w.clone();
            sealed.auth = Auth::Basic {
                username: username.clone(),
                password: c.seal(password, Purpose::BasicPassword, &w.id)?,
            };
            Ok(serde_json::to_vec(&sealed)?)
        }
        _ => Ok(serde_json::to_vec(w)?),
    }
}

/// A webhook record as read, its password opened.
fn open_webhook(cipher: Option<&SecretCipher>, raw: &[u8]) -> Result<Webhook> {
    let mut w: Webhook = serde_json::from_slice(raw)?;
    if let (Some(c), Auth::Basic { password, .. }) = (cipher, &mut w.auth) {
        *password = c.open(password, Purpose::BasicPassword, &w.id)?;
    }
    Ok(w)
}

/// A secret record as written: with a key, both secrets sealed.
fn seal_secret(
    cipher: Option<&SecretCipher>,
    webhook_id: &str,
    s: &SecretRecord,
) -> Result<Vec<u8>> {
    let Some(c) = cipher else {
        return Ok(serde_json::to_vec(s)?);
    };
    let mut sealed = s.clone();
    sealed.current = c.seal(&s.current, Purpose::SigningSecret, webhook_id)?;
    if let Some(prev) = &s.previous {
        sealed.previous = Some(c.seal(prev, Purpose::SigningSecret, webhook_id)?);
    }
    Ok(serde_json::to_vec(&sealed)?)
}

/// A secret record as read, its secrets opened.
fn open_secret(
    cipher: Option<&SecretCipher>,
    webhook_id: &str,
    raw: &[u8],
) -> Result<SecretRecord> {
    let mut s: SecretRecord = serde_json::from_slice(raw)?;
    if let Some(c) = cipher {
        s.current = c.open(&s.current, Purpose::SigningSecret, webhook_id)?;
        if let Some(prev) = &s.previous {
            s.previous = Some(c.open(prev, Purpose::SigningSecret, webhook_id)?);
        }
    }
    Ok(s)
}
