//! GetWebhookHealth: reads a webhook's delivery log newest first through the
//! store interface (so it works on every backend), at most
//! [`crate::domain::health::MAX_DELIVERIES_READ`] records, and adds this router's circuit
//! breaker.

use super::AppState;
use crate::domain::health::{CircuitFigures, HealthTally, WebhookHealth};
use crate::domain::now_ms;
use crate::domain::webhook::Webhook;
use crate::error::Result;
use crate::store::DeliveryLog;

/// Records asked for per store call.
const PAGE: usize = 1_000;

/// The health of `webhook` (already loaded and authorized).
pub async fn webhook_health(state: &AppState, webhook: &Webhook) -> Result<WebhookHealth> {
    let mut tally = HealthTally::new(now_ms());
    let mut after = None;
    'pages: loop {
        let page = state
            .store
            .list_deliveries(&webhook.id, None, after, PAGE)
            .await?;
        for r in &page.deliveries {
            if !tally.add(r) {
                break 'pages;
            }
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let circuit = state
        .dispatcher
        .circuit(&webhook.id)
        .map(|v| CircuitFigures {
            state: v.state,
            open_until_ms: v.open_until_ms,
        });
    Ok(tally.finish(
        webhook,
        circuit,
        state.config.delivery.breaker_failure_threshold,
    ))
}
