//! Webhook configuration and secrets.

use sled::transaction::{abort, ConflictableTransactionError};
use sled::Transactional;

use super::{account_key, SledStore};
use crate::domain::delivery::ModeTag;
use crate::domain::webhook::{Auth, SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::store::crypt::{self, Purpose, SecretCipher};

fn webhook_key(account_id: u64, id: &str) -> Vec<u8> {
    let mut k = account_key(account_id).to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

impl SledStore {
    /// Stores a new webhook (and its secret), refusing past `max_per_account`.
    /// Its lanes start at the end of the log, in the same transaction: a
    /// webhook receives the events published after it was created. Durable
    /// on return.
    pub async fn create_webhook(
        &self,
        webhook: Webhook,
        secret: Option<SecretRecord>,
        max_per_account: u32,
    ) -> Result<()> {
        self.blocking(move |s| s.create_webhook_locked(&webhook, secret.as_ref(), max_per_account))
            .await?;
        self.flush().await
    }

    fn create_webhook_locked(
        &self,
        webhook: &Webhook,
        secret: Option<&SecretRecord>,
        max_per_account: u32,
    ) -> Result<()> {
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
            return Err(crate::store::webhook_limit_reached(
                webhook.account_id,
                count,
                max_per_account as u64,
            ));
        }
        let value = self.encode_webhook(webhook)?;
        let secret_value = secret
            .map(|s| self.encode_secret(&webhook.id, s))
            .transpose()?;
        let key = webhook_key(webhook.account_id, &webhook.id);
        let start = serde_json::to_vec(&super::LaneState {
            cursor: self.last_seq(),
            ..Default::default()
        })?;
        (&self.inner.webhooks, &self.inner.secrets, &self.inner.lanes).transaction(
            |(w, s, l)| {
                w.insert(key.as_slice(), value.as_slice())?;
                if let Some(sv) = &secret_value {
                    s.insert(webhook.id.as_bytes(), sv.as_slice())?;
                }
                for mode in [ModeTag::Realtime, ModeTag::Batch] {
                    l.insert(
                        super::deliveries::lane_key(&webhook.id, mode),
                        start.as_slice(),
                    )?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            },
        )?;
        Ok(())
    }

    /// Highest sequence number used (durable or not yet).
    fn last_seq(&self) -> u64 {
        self.inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_seq()
    }

    /// One webhook of an account.
    pub fn get_webhook(&self, account_id: u64, id: &str) -> Result<Option<Webhook>> {
        match self.inner.webhooks.get(webhook_key(account_id, id))? {
            Some(v) => Ok(Some(self.decode_webhook(&v)?)),
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
            out.push(self.decode_webhook(&v)?);
        }
        Ok((out, false))
    }

    /// Every webhook of every account (for the dispatcher at start).
    pub fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        self.inner
            .webhooks
            .iter()
            .map(|r| self.decode_webhook(&r?.1))
            .collect()
    }

    /// Read-modify-write of one webhook. `change` may also return a secret
    /// to store with it. Durable on return.
    pub async fn update_webhook<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>
            + Send
            + 'static,
    {
        let id = id.to_string();
        let updated = self
            .blocking(move |s| s.update_webhook_locked(account_id, &id, change))
            .await?;
        self.flush().await?;
        Ok(updated)
    }

    fn update_webhook_locked<F>(&self, account_id: u64, id: &str, change: F) -> Result<Webhook>
    where
        F: FnOnce(&mut Webhook, Option<SecretRecord>) -> Result<Option<SecretRecord>>,
    {
        let _guard = self
            .inner
            .admin_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = webhook_key(account_id, id);
        let mut w: Webhook = match self.inner.webhooks.get(&key)? {
            Some(v) => self.decode_webhook(&v)?,
            None => return Err(Error::NotFound(format!("webhook {id}"))),
        };
        let secret = self.get_secret(id)?;
        let new_secret = change(&mut w, secret)?;
        let value = self.encode_webhook(&w)?;
        let secret_value = new_secret
            .as_ref()
            .map(|s| self.encode_secret(id, s))
            .transpose()?;
        (&self.inner.webhooks, &self.inner.secrets).transaction(|(wt, st)| {
            wt.insert(key.as_slice(), value.as_slice())?;
            if let Some(sv) = &secret_value {
                st.insert(id.as_bytes(), sv.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<Error>>(())
        })?;
        Ok(w)
    }

    /// Deletes a webhook: in one transaction its record, its secret and its
    /// lanes go and a tombstone is written, so no lane of it can run again
    /// (whatever call races the deletion) and its delivery records are out
    /// of reach at once; the janitor then removes the records in bounded
    /// rounds. Durable on return.
    pub async fn delete_webhook(&self, account_id: u64, id: &str) -> Result<()> {
        let id = id.to_string();
        self.blocking(move |s| s.delete_webhook_locked(account_id, &id))
            .await?;
        self.flush().await
    }

    fn delete_webhook_locked(&self, account_id: u64, id: &str) -> Result<()> {
        let _guard = self
            .inner
            .admin_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = webhook_key(account_id, id);
        (&self.inner.webhooks, &self.inner.secrets, &self.inner.lanes).transaction(
            |(wt, st, lt)| {
                if wt.remove(key.as_slice())?.is_none() {
                    return abort(Error::NotFound(format!("webhook {id}")));
                }
                st.remove(id.as_bytes())?;
                SledStore::delete_lanes_in(lt, id)?;
                Ok(())
            },
        )?;
        self.forget_lanes(id);
        Ok(())
    }

    /// The signing secrets of a webhook, if it has any.
    pub fn get_secret(&self, id: &str) -> Result<Option<SecretRecord>> {
        match self.inner.secrets.get(id.as_bytes())? {
            Some(v) => Ok(Some(open_secret(self.inner.cipher.as_ref(), id, &v)?)),
            None => Ok(None),
        }
    }

    fn encode_webhook(&self, w: &Webhook) -> Result<Vec<u8>> {
        seal_webhook(self.inner.cipher.as_ref(), w)
    }

    fn decode_webhook(&self, raw: &[u8]) -> Result<Webhook> {
        open_webhook(self.inner.cipher.as_ref(), raw)
    }

    fn encode_secret(&self, webhook_id: &str, s: &SecretRecord) -> Result<Vec<u8>> {
        seal_secret(self.inner.cipher.as_ref(), webhook_id, s)
    }
}

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

/// Meta key holding the id of the key secrets are sealed with.
const SECRET_KEY_ID: &str = "secret_key_id";

/// Checks the configured key against the folder (see [`SledStore::open_with_key`]);
/// on the first start with a key, seals every plain secret and password and
/// records the key id, in one transaction.
pub(super) fn check_secret_key(
    db: &sled::Db,
    meta: &sled::Tree,
    webhooks: &sled::Tree,
    secrets: &sled::Tree,
    cipher: Option<&SecretCipher>,
) -> Result<()> {
    let stored = meta
        .get(SECRET_KEY_ID)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    match (stored, cipher) {
        (None, None) => Ok(()),
        (Some(id), None) => Err(Error::Startup(format!(
            "the data folder holds webhook secrets encrypted with key id {id}; set \
             storage.secret_key (or WEBHOOK_ROUTER__STORAGE__SECRET_KEY) to that key"
        ))),
        (Some(id), Some(c)) if id != c.key_id() => Err(Error::Startup(format!(
            "storage.secret_key has key id {}, but the data folder's webhook secrets are \
             encrypted with key id {id}; set the key they were encrypted with",
            c.key_id()
        ))),
        (Some(_), Some(_)) => Ok(()),
        (None, Some(c)) => {
            // Every value is plain here (no key was ever recorded): seal them.
            let mut new_webhooks = Vec::new();
            for item in webhooks.iter() {
                let (k, v) = item?;
                let w = open_webhook(None, &v)?;
                if matches!(w.auth, Auth::Basic { .. }) {
                    new_webhooks.push((k, seal_webhook(Some(c), &w)?));
                }
            }
            let mut new_secrets = Vec::new();
            for item in secrets.iter() {
                let (k, v) = item?;
                let id = String::from_utf8_lossy(&k).into_owned();
                let s = open_secret(None, &id, &v)?;
                if !crypt::is_sealed(&s.current) {
                    new_secrets.push((k, seal_secret(Some(c), &id, &s)?));
                }
            }
            let sealed = new_webhooks.len() + new_secrets.len();
            (webhooks, secrets, meta).transaction(|(wt, st, mt)| {
                for (k, v) in &new_webhooks {
                    wt.insert(k, v.as_slice())?;
                }
                for (k, v) in &new_secrets {
                    st.insert(k, v.as_slice())?;
                }
                mt.insert(SECRET_KEY_ID, c.key_id().as_bytes())?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })?;
            db.flush()?;
            tracing::info!(
                key_id = c.key_id(),
                sealed,
                "storage.secret_key set: webhook secrets and passwords are encrypted at rest"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::webhook::SignatureAlgorithm;

    /// A record in the middle of a migration (`whsk_` current, `whsec_`
    /// previous) is sealed whole: neither key's base64 is in the stored bytes.
    #[test]
    fn ed25519_private_keys_are_sealed_like_hmac_secrets() {
        let c = SecretCipher::new(&[3u8; 32]);
        let s = SecretRecord::generate(1).rotate_to(SignatureAlgorithm::Ed25519, 2, 1000);
        assert!(s.current.starts_with("whsk_"));
        let stored = seal_secret(Some(&c), "wh_1", &s).unwrap();
        let text = String::from_utf8(stored.clone()).unwrap();
        for secret in [&s.current, s.previous.as_ref().unwrap()] {
            let body = secret.split_once('_').unwrap().1;
            assert!(!text.contains(&body[..16]), "{text}");
        }
        assert_eq!(open_secret(Some(&c), "wh_1", &stored).unwrap(), s);
        assert!(open_secret(Some(&c), "wh_2", &stored).is_err());
    }
}
