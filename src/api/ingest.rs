//! EventIngest: validate a request whole, append it durably, wake the lanes.

use std::pin::Pin;

use futures::Stream;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::auth::authorize_account;
use super::convert::struct_to_json;
use super::AppState;
use crate::domain::event::{render_event_json, NewEvent};
use crate::domain::now_ms;
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::proto::v1::event_ingest_server::EventIngest;
use crate::store::EventLog;

/// Longest accepted event id.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Latest accepted timestamp: the end of year 9999, in ms.
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// The EventIngest service.
#[derive(Clone)]
pub struct IngestService {
    state: AppState,
}

impl IngestService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        IngestService { state }
    }

    /// Validates the whole request (all or none), then appends it. With
    /// traces on, in a span of `method` (a child of `caller`, the trace the
    /// client sent).
    async fn publish(
        &self,
        r: &pb::PublishEventsRequest,
        method: &'static str,
        caller: Option<&opentelemetry::Context>,
    ) -> Result<pb::PublishEventsResponse> {
        let span = tracing::info_span!("ingest", account_id = r.account_id);
        let mut trace =
            self.state
                .dispatcher
                .traces()
                .publish(method, caller, r.account_id, r.events.len());
        let result = self.publish_inner(r, trace.as_mut()).instrument(span).await;
        if let Some(t) = trace {
            t.finish(result.as_ref().err().map(|e| e.to_string()));
        }
        result
    }

    async fn publish_inner(
        &self,
        r: &pb::PublishEventsRequest,
        mut trace: Option<&mut crate::telemetry::otlp::PublishSpan>,
    ) -> Result<pb::PublishEventsResponse> {
        let events = validate_request(&self.state, r)?;
        // Before the append: a lane may take the events as soon as they are stored.
        if let Some(t) = trace.as_deref_mut() {
            t.events(r.account_id, events.iter().map(|e| e.event_id.as_str()));
        }
        let appended = self
            .state
            .store
            .append_events(r.account_id, events, now_ms())
            .await?;
        let (outcomes, last_seq, events) = (appended.outcomes, appended.last_seq, appended.events);
        if let Some(t) = trace {
            t.duplicates(outcomes.iter().filter(|o| o.duplicate).count());
        }
        self.state
            .dispatcher
            .events_appended(r.account_id, last_seq);
        let stored = events
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| !o.duplicate)
            .map(|(e, _)| e.event_name.as_str());
        self.state.metrics.events_published(r.account_id, stored);
        tracing::debug!(
            events = events.len(),
            duplicates = outcomes.iter().filter(|o| o.duplicate).count(),
            first_event_id = events.first().map(|e| e.event_id.as_str()),
            last_event_id = events.last().map(|e| e.event_id.as_str()),
            last_seq,
            "events stored"
        );
        Ok(pb::PublishEventsResponse {
            results: outcomes
                .into_iter()
                .map(|o| pb::PublishResult {
                    event_id: o.event_id,
                    duplicate: o.duplicate,
                })
                .collect(),
        })
    }
}

/// Checks every event and renders it; the first problem names its index and field.
pub fn validate_request(state: &AppState, r: &pb::PublishEventsRequest) -> Result<Vec<NewEvent>> {
    let limits = &state.config.limits;
    if r.events.is_empty() {
        return Err(Error::invalid("events", "must contain at least one event"));
    }
    if r.events.len() > limits.max_events_per_request as usize {
        return Err(Error::invalid(
            "events",
            format!(
                "{} events; at most {} per request",
                r.events.len(),
                limits.max_events_per_request
            ),
        ));
    }
    let now = now_ms();
    let mut out = Vec::with_capacity(r.events.len());
    for (i, e) in r.events.iter().enumerate() {
        let size = e.encoded_len();
        if size > limits.max_event_bytes as usize {
            return Err(Error::invalid(
                format!("events[{i}]"),
                format!("is {size} bytes; the limit is {}", limits.max_event_bytes),
            ));
        }
        if e.event_name.is_empty() {
            return Err(Error::invalid(
                format!("events[{i}].event_name"),
                "is required",
            ));
        }
        let Some(mode) = state.catalog.mode(&e.event_name) else {
            return Err(Error::invalid(
                format!("events[{i}].event_name"),
                state.catalog.unknown_type_reason(&e.event_name),
            ));
        };
        if e.event_id.len() > MAX_EVENT_ID_BYTES {
            return Err(Error::invalid(
                format!("events[{i}].event_id"),
                format!("must be at most {MAX_EVENT_ID_BYTES} bytes"),
            ));
        }
        if e.event_id.chars().any(char::is_control) {
            return Err(Error::invalid(
                format!("events[{i}].event_id"),
                "must not contain control characters",
            ));
        }
        if !(0..=MAX_TIMESTAMP_MS).contains(&e.timestamp) {
            return Err(Error::invalid(
                format!("events[{i}].timestamp"),
                "must be epoch milliseconds between 0 (meaning now) and year 9999",
            ));
        }
        let data = struct_to_json(e.data.as_ref(), size, || format!("events[{i}].data"))?;
        let event_id = if e.event_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            e.event_id.clone()
        };
        let timestamp_ms = if e.timestamp == 0 { now } else { e.timestamp };
        let json = render_event_json(&event_id, &e.event_name, timestamp_ms, &e.event_info, &data);
        out.push(NewEvent {
            event_id,
            event_name: e.event_name.clone(),
            timestamp_ms,
            mode,
            json,
        });
    }
    Ok(out)
}

/// `status` with its message prefixed by the number of the stream message
/// it answers (`stream message #2 (counting from 1): events[0].event_name:
/// …`); code, details (google.rpc.BadRequest) and metadata are kept.
pub fn in_stream_message(status: Status, number: u64) -> Status {
    Status::with_details_and_metadata(
        status.code(),
        format!(
            "stream message #{number} (counting from 1): {}",
            status.message()
        ),
        bytes::Bytes::copy_from_slice(status.details()),
        status.metadata().clone(),
    )
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::StreamEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventIngest for IngestService {
    async fn publish_events(
        &self,
        req: Request<pb::PublishEventsRequest>,
    ) -> Result<Response<pb::PublishEventsResponse>, Status> {
        authorize_account(&req, req.get_ref().account_id)?;
        let caller = self.state.dispatcher.traces().caller(req.metadata());
        Ok(Response::new(
            self.publish(req.get_ref(), "PublishEvents", caller.as_ref())
                .await?,
        ))
    }

    type StreamEventsStream = ResponseStream;

    async fn stream_events(
        &self,
        req: Request<Streaming<pb::StreamEventsRequest>>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        // Counts against the token's stream limit for the stream's life.
        let permit = super::auth::principal(&req)?.open_stream()?;
        let principal = req.extensions().clone();
        // Every message's span continues the trace the stream was opened in.
        let caller = self.state.dispatcher.traces().caller(req.metadata());
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Which message of the stream this is, counting from 1.
            let mut number: u64 = 0;
            loop {
                number += 1;
                let msg = match inbound.message().await {
                    // Same fields and numbers as a PublishEvents request.
                    Ok(Some(m)) => pb::PublishEventsRequest {
                        account_id: m.account_id,
                        events: m.events,
                    },
                    Ok(None) => break,
                    Err(status) => {
                        let status = super::layers::clarify_decode_error(&status).unwrap_or(status);
                        let _ = tx.send(Err(in_stream_message(status, number))).await;
                        break;
                    }
                };
                // Each message is authorized and rate limited like a unary call.
                let mut check = Request::new(());
                *check.extensions_mut() = principal.clone();
                let charged = match check.extensions().get::<super::auth::Principal>() {
                    Some(p) => p.charge(),
                    None => Ok(()),
                };
                let result = match charged.and_then(|()| authorize_account(&check, msg.account_id))
                {
                    Ok(()) => service.publish(&msg, "StreamEvents", caller.as_ref()).await,
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                let reply = result
                    .map(|r| pb::StreamEventsResponse { results: r.results })
                    .map_err(|e| in_stream_message(Status::from(e), number));
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
