//! RecoverDeliveries: requeues a webhook's failed deliveries of a time
//! window, one step at a time, and streams the totals after each step.
//!
//! The window is walked newest first through the delivery log (ids sort by
//! creation time, so the window is a range of ids). Each step lists up to
//! `step_size` deliveries and hands those in a requested state to
//! [`DeliveryLog::recover_deliveries`], which requeues each at most once
//! (the original is marked), so running the same window again, or after a
//! cancelled run, requeues only what is left. A closed stream stops the walk
//! before the next step.

use std::pin::Pin;

use futures::Stream;
use prost_types::Timestamp;
use tokio::sync::mpsc;
use tonic::Status;

use super::convert;
use super::AppState;
use crate::domain::delivery::DeliveryState;
use crate::domain::ids::DELIVERY_PREFIX;
use crate::domain::now_ms;
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::store::DeliveryLog;

/// Deliveries examined per step when the request says 0.
pub const DEFAULT_STEP: u32 = 500;
/// Most deliveries examined per step.
pub const MAX_STEP: u32 = 5000;
/// Latest time an id can carry (48 bits of milliseconds, see `ids::new_id`).
const MAX_ID_MS: i64 = 0xffff_ffff_ffff;

/// The stream of progress messages.
pub type RecoverStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::RecoverDeliveriesResponse, Status>> + Send>>;

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Start, epoch ms, inclusive.
    pub since_ms: i64,
    /// End, epoch ms, exclusive.
    pub until_ms: i64,
    /// States to requeue.
    pub states: Vec<DeliveryState>,
    /// Deliveries examined per step.
    pub step: usize,
}

fn timestamp_ms(t: &Timestamp, field: &str) -> Result<i64> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(
            field,
            "nanos must be between 0 and 999,999,999",
        ));
    }
    let ms = t
        .seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1_000_000)))
        .filter(|ms| (0..=MAX_ID_MS).contains(ms))
        .ok_or_else(|| Error::invalid(field, "must be between 1970 and the year 10000 (UTC)"))?;
    Ok(ms)
}

/// Checks a request against the clock `now_ms`.
pub fn window(r: &pb::RecoverDeliveriesRequest, now_ms: i64) -> Result<Window> {
    let since_ms = match &r.since {
        Some(t) => timestamp_ms(t, "since")?,
        None => 0,
    };
    let until_ms = match &r.until {
        Some(t) => timestamp_ms(t, "until")?,
        // Just past now, so what was created this millisecond is in.
        None => now_ms.saturating_add(1).min(MAX_ID_MS),
    };
    if until_ms <= since_ms {
        return Err(Error::invalid("until", "must be after since"));
    }
    let mut states = Vec::new();
    for (i, raw) in r.states.iter().enumerate() {
        let state = match pb::DeliveryState::try_from(*raw) {
            Ok(pb::DeliveryState::Dead) => DeliveryState::Dead,
            Ok(pb::DeliveryState::Expired) => DeliveryState::Expired,
            Ok(other) => {
                return Err(Error::invalid(
                    format!("states[{i}]"),
                    format!(
                        "{} cannot be recovered; use DELIVERY_STATE_DEAD or \
                         DELIVERY_STATE_EXPIRED",
                        other.as_str_name()
                    ),
                ))
            }
            Err(_) => {
                return Err(Error::invalid(
                    format!("states[{i}]"),
                    format!("unknown delivery state {raw}"),
                ))
            }
        };
        if !states.contains(&state) {
            states.push(state);
        }
    }
    if states.is_empty() {
        states.push(DeliveryState::Dead);
    }
    let step = match r.step_size {
        0 => DEFAULT_STEP,
        n if n <= MAX_STEP => n,
        _ => {
            return Err(Error::invalid(
                "step_size",
                format!("must be at most {MAX_STEP} (0 means {DEFAULT_STEP})"),
            ))
        }
    };
    Ok(Window {
        since_ms,
        until_ms,
        states,
        step: step as usize,
    })
}

/// The smallest id a delivery created at `ms` can have: ids below it were
/// created earlier.
fn id_bound(ms: i64) -> String {
    format!("{DELIVERY_PREFIX}{ms:012x}")
}

/// Starts the walk over `window` of `webhook_id`'s deliveries; the stream
/// ends after the message with `done`, after an error, or when the client
/// closes it. `permit` (the token's stream permit) is held until then.
pub fn start<P: Send + 'static>(
    state: AppState,
    account_id: u64,
    webhook_id: String,
    window: Window,
    permit: P,
) -> RecoverStream {
    // One message buffered: the walk runs at most a step ahead of what the
    // transport takes, and notices a closed stream before its next step.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _held = permit;
        let result = walk(&state, account_id, &webhook_id, &window, &tx).await;
        match result {
            Ok(Walk::Done(totals)) => tracing::info!(
                account_id,
                webhook_id = %webhook_id,
                examined = totals.examined_count,
                requeued = totals.requeued_count,
                skipped = totals.skipped_count,
                "recovery finished"
            ),
            Ok(Walk::Cancelled(totals)) => tracing::info!(
                account_id,
                webhook_id = %webhook_id,
                examined = totals.examined_count,
                requeued = totals.requeued_count,
                "recovery stopped: the client closed the stream"
            ),
            Err(e) => {
                tracing::warn!(account_id, webhook_id = %webhook_id, error = %e, "recovery failed");
                let _ = tx.send(Err(Status::from(e))).await;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

enum Walk {
    Done(pb::RecoverDeliveriesResponse),
    Cancelled(pb::RecoverDeliveriesResponse),
}

type Sender = mpsc::Sender<std::result::Result<pb::RecoverDeliveriesResponse, Status>>;

async fn walk(
    state: &AppState,
    account_id: u64,
    webhook_id: &str,
    window: &Window,
    tx: &Sender,
) -> Result<Walk> {
    let lower = id_bound(window.since_ms);
    let mut after = id_bound(window.until_ms);
    let mut totals = pb::RecoverDeliveriesResponse {
        position: Some(convert::timestamp(window.until_ms)),
        ..Default::default()
    };
    loop {
        if tx.is_closed() {
            return Ok(Walk::Cancelled(totals));
        }
        let page = state
            .store
            .list_deliveries(webhook_id, None, Some(after.clone()), window.step)
            .await?;
        let mut done = page.next_after.is_none();
        let mut wanted = Vec::new();
        for r in &page.deliveries {
            if r.id.as_str() < lower.as_str() {
                done = true;
                break;
            }
            totals.examined_count += 1;
            totals.position = Some(convert::timestamp(r.create_time_ms));
            if window.states.contains(&r.state) {
                if r.redelivered {
                    totals.skipped_count += 1;
                } else {
                    wanted.push(r.id.clone());
                }
            }
        }
        if !wanted.is_empty() {
            let asked = wanted.len();
            let requeued = state
                .store
                .recover_deliveries(webhook_id, wanted, window.states.clone(), now_ms())
                .await?;
            totals.requeued_count += requeued as u64;
            totals.skipped_count += (asked - requeued) as u64;
            if requeued > 0 {
                state.metrics.redelivery_requeued(requeued as u64);
                state.dispatcher.wake(webhook_id);
            }
        }
        match page.next_after {
            Some(next) if !done => after = next,
            _ => done = true,
        }
        totals.done = done;
        if tx.send(Ok(totals)).await.is_err() {
            return Ok(Walk::Cancelled(totals));
        }
        if done {
            tracing::debug!(account_id, webhook_id, "recovery walked its window");
            return Ok(Walk::Done(totals));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    fn field_of(r: Result<Window>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn defaults_cover_everything_until_now_and_dead_only() {
        let w = window(&pb::RecoverDeliveriesRequest::default(), 5_000).unwrap();
        assert_eq!(
            w,
            Window {
                since_ms: 0,
                until_ms: 5_001,
                states: vec![DeliveryState::Dead],
                step: DEFAULT_STEP as usize,
            }
        );
    }

    #[test]
    fn bad_requests_name_their_field() {
        let mut r = pb::RecoverDeliveriesRequest {
            since: ts(10, 0),
            until: ts(10, 0),
            ..Default::default()
        };
        assert_eq!(field_of(window(&r, 0)), "until");
        r.until = ts(9, 0);
        assert_eq!(field_of(window(&r, 0)), "until");
        r.until = ts(11, 1_000_000_000);
        assert_eq!(field_of(window(&r, 0)), "until");
        r.until = None;
        r.since = ts(-1, 0);
        assert_eq!(field_of(window(&r, 0)), "since");
        r.since = ts(i64::MAX, 0);
        assert_eq!(field_of(window(&r, 0)), "since");
        r.since = None;
        r.states = vec![
            pb::DeliveryState::Dead as i32,
            pb::DeliveryState::Pending as i32,
        ];
        assert_eq!(field_of(window(&r, 0)), "states[1]");
        r.states = vec![42];
        assert_eq!(field_of(window(&r, 0)), "states[0]");
        r.states.clear();
        r.step_size = MAX_STEP + 1;
        assert_eq!(field_of(window(&r, 0)), "step_size");
    }

    #[test]
    fn states_are_deduplicated_and_times_exact_to_the_millisecond() {
        let r = pb::RecoverDeliveriesRequest {
            since: ts(1, 2_500_000),
            until: ts(2, 0),
            states: vec![
                pb::DeliveryState::Expired as i32,
                pb::DeliveryState::Dead as i32,
                pb::DeliveryState::Expired as i32,
            ],
            step_size: 7,
            ..Default::default()
        };
        let w = window(&r, 0).unwrap();
        assert_eq!((w.since_ms, w.until_ms, w.step), (1_002, 2_000, 7));
        assert_eq!(w.states, vec![DeliveryState::Expired, DeliveryState::Dead]);
    }

    #[test]
    fn id_bounds_split_ids_by_their_creation_millisecond() {
        let id_at = |ms: i64| format!("{DELIVERY_PREFIX}{ms:012x}{:016x}", 7u64);
        assert!(id_at(999) < id_bound(1_000));
        assert!(id_at(1_000) > id_bound(1_000));
        assert!(id_at(1_000) < id_bound(1_001));
    }
}
