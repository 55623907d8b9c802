//! Webhook configuration and secrets.

use sled::transaction::{abort, ConflictableTransactionError};
use sled::Transactional;

use super::{account_key, Store};
use crate::domain::delivery::ModeTag;
use crate::domain::webhook::{SecretRecord, Webhook};
use crate::error::{Error, Result};

fn webhook_key(account_id: u64, id: &str) -> Vec<u8> {
    let mut k = account_key(account_id).to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

impl Store {
    /// Stores a new webhook (and its secret), refusing past `max_per_account`.
    pub async fn create_webhook(
        &self,
        webhook: &Webhook,
        secret: Option<&SecretRecord>,
        max_per_account: u32,
    ) -> Result<()> {
        {
            let _guard = self
                .inner
                .admin_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let count = self
                .inner
                .webhooks
                .scan_prefix(account_key(webhook.account_id))
                .count();
            if count >= max_per_account as usize {
                return Err(Error::ResourceExhausted(format!(
                    "account {} already has {count} webhooks (limit {max_per_account})",
                    webhook.account_id
                )));
            }
            let value = serde_json::to_vec(webhook)?;
            let secret_value = secret.map(serde_json::to_vec).transpose()?;
            let key = webhook_key(webhook.account_id, &webhook.id);
            (&self.inner.webhooks, &self.inner.secrets).transaction(|(w, s)| {
                w.insert(key.as_slice(), value.as_slice())?;
                if let Some(sv) = &secret_value {
                    s.insert(webhook.id.as_bytes(), sv.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            })?;
            // New lanes start at the end of the log: a webhook receives events
            // published after it was created.
            let start = super::LaneState {
                cursor: self.last_seq(),
                ..Default::default()
            };
            for mode in [ModeTag::Realtime, ModeTag::Batch] {
                self.save_lane(&webhook.id, mode, &start, &[])?;
            }
        }
        self.flush().await
    }

    /// One webhook of an account.
    pub fn get_webhook(&self, account_id: u64, id: &str) -> Result<Option<Webhook>> {
        match self.inner.webhooks.get(webhook_key(account_id, id))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` webhooks of an account with ids after `after` (id order
    /// is creation order), and whether more follow.
    pub fn list_webhooks(
        &self,
        account_id: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Webhook>, bool)> {
        let prefix = account_key(account_id);
        let start = match after {
            Some(id) => {
                let mut k = webhook_key(account_id, id);
                k.push(0);
                k
            }
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.inner.webhooks.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(serde_json::from_slice(&v)?);
        }
        Ok((out, false))
    }

    /// Every webhook of every account (for the dispatcher at start).
    pub fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        self.inner
            .webhooks
            .iter()
            .map(|r| Ok(serde_json::from_slice(&r?.1)?))
            .collect()
    }

    /// Read-modify-write of one webhook. `change` may also return a secret
    /// to store with it. Durable on return.
    pub async fn update_webhook<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>,
    {
        let updated = {
            let _guard = self
                .inner
                .admin_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let key = webhook_key(account_id, id);
            let mut w: Webhook = match self.inner.webhooks.get(&key)? {
                Some(v) => serde_json::from_slice(&v)?,
                None => return Err(Error::NotFound(format!("webhook {id}"))),
            };
            let secret = self.get_secret(id)?;
            let new_secret = change(&mut w, secret)?;
            let value = serde_json::to_vec(&w)?;
            let secret_value = new_secret.as_ref().map(serde_json::to_vec).transpose()?;
            (&self.inner.webhooks, &self.inner.secrets).transaction(|(wt, st)| {
                wt.insert(key.as_slice(), value.as_slice())?;
                if let Some(sv) = &secret_value {
                    st.insert(id.as_bytes(), sv.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            })?;
            w
        };
        self.flush().await?;
        Ok(updated)
    }

    /// Deletes a webhook, its secret, lanes and delivery records.
    pub async fn delete_webhook(&self, account_id: u64, id: &str) -> Result<()> {
        {
            let _guard = self
                .inner
                .admin_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let key = webhook_key(account_id, id);
            (&self.inner.webhooks, &self.inner.secrets).transaction(|(wt, st)| {
                if wt.remove(key.as_slice())?.is_none() {
                    return abort(Error::NotFound(format!("webhook {id}")));
                }
                st.remove(id.as_bytes())?;
                Ok(())
            })?;
            self.remove_lanes_and_deliveries(id)?;
        }
        self.flush().await
    }

    /// The signing secrets of a webhook, if it has any.
    pub fn get_secret(&self, id: &str) -> Result<Option<SecretRecord>> {
        match self.inner.secrets.get(id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }
}
