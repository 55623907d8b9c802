//! Moving webhooks between stores (`webhook-router export` / `import`), e.g.
//! from a sled folder to PostgreSQL: one JSON object per line, each a webhook
//! with its signing secret(s). The file holds secrets and Basic passwords in
//! the clear (the target seals them again with its own `storage.secret_key`),
//! so it is written with mode 0600 and should be deleted after the import.
//!
//! Events and delivery logs are not moved: drain the old router first (stop
//! publishing to it and let its lanes empty), then import and switch over.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::domain::webhook::{SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::store::ConfigStore;

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
pub struct Exported {
    /// The webhook as stored (Basic password opened).
    pub webhook: Webhook,
    /// Its signing secret(s), for signature webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRecord>,
}

/// Writes every webhook of `store` to `out`, one line each; returns how many.
pub async fn export<S: ConfigStore>(store: &S, out: &mut impl Write) -> Result<usize> {
    let mut n = 0;
    for webhook in store.all_webhooks().await? {
        // The internal webhook of the operational events follows the config.
        if crate::delivery::ops::is_internal(webhook.account_id) {
            continue;
        }
        let secret = store.get_secret(&webhook.id).await?;
        let line = serde_json::to_string(&Exported { webhook, secret })?;
        writeln!(out, "{line}")
            .map_err(|e| Error::Unavailable(format!("writing the export: {e}")))?;
        n += 1;
    }
    out.flush()
        .map_err(|e| Error::Unavailable(format!("writing the export: {e}")))?;
    Ok(n)
}

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Webhooks stored.
    pub created: usize,
    /// Webhooks the target already had (same account and id): left as they are.
    pub existing: usize,
}

/// Reads an export from `input` and creates each webhook in `store` under
/// its id, with its secret; the target's per-account limit applies
/// (`max_per_account`). A webhook the target already has is left alone, so
/// an interrupted import can be run again.
pub async fn import<S: ConfigStore>(
    store: &S,
    input: impl BufRead,
    max_per_account: u32,
) -> Result<ImportReport> {
    let mut report = ImportReport::default();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::Unavailable(format!("reading the export: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: Exported = serde_json::from_str(&line)
            .map_err(|e| Error::invalid(format!("line {}", i + 1), e.to_string()))?;
        let w = &item.webhook;
        if store.get_webhook(w.account_id, &w.id).await?.is_some() {
            report.existing += 1;
            continue;
        }
        store
            .create_webhook(item.webhook, item.secret, max_per_account)
            .await?;
        report.created += 1;
    }
    Ok(report)
}
