//! Traces over OTLP/HTTP (protobuf), off unless `[telemetry] otlp_endpoint`
//! is set (see docs/operations.md#traces).
//!
//! One trace runs from a publish call to every HTTP attempt that delivers
//! its events: the publish span (PublishEvents, or one StreamEvents message)
//! continues a W3C `traceparent` the caller sent, and each attempt span is a
//! child of the publish span of the payload's first event, linked to the
//! publish spans of the others. Events are stored and taken by lanes later,
//! so the span context of each published event is kept in a bounded map in
//! memory ([`MAX_CONTEXTS`] events, oldest dropped); an attempt whose events
//! are no longer there (after a restart, or evicted) starts a trace of its own.
//!
//! Spans go through a batch processor on the tokio runtime, so ending one
//! never waits for the collector: at most [`MAX_QUEUED`] wait to be sent, more
//! are dropped and counted, and an unreachable collector is logged once per
//! outage. [`Traces::shutdown`] sends what is left, waiting at most
//! [`SHUTDOWN_WAIT`].
//!
//! With no endpoint [`Traces`] is empty: no exporter, no map, no span.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;

/// Published events whose publish span is remembered for their attempts.
pub const MAX_CONTEXTS: usize = 100_000;
/// Ended spans waiting to be sent; more are dropped (and counted).
pub const MAX_QUEUED: usize = 2048;
/// How long one export may take (retries included) before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waiting spans are sent.
const EXPORT_INTERVAL: Duration = Duration::from_secs(2);
/// At shutdown, how long the last spans may take to be sent.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);
/// Event ids listed in one span's `webhook_router.event_ids`; the count is
/// always in `webhook_router.event_count`.
pub const MAX_IDS_PER_SPAN: usize = 100;
/// Links of an attempt span to the publish spans of the payload's other events.
pub const MAX_LINKS: usize = 100;

/// The router's tracing handle; cheap to clone, empty when traces are off.
#[derive(Clone, Default)]
pub struct Traces(Option<Arc<On>>);

struct On {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    contexts: Mutex<Contexts>,
    stats: Arc<Stats>,
}

impl Drop for On {
    fn drop(&mut self) {
        // Dropped without Traces::shutdown (a start that failed half way):
        // the provider's own shutdown blocks until the batch task answers,
        // which must not happen on a runtime thread.
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new()
            .name("otlp-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(SHUTDOWN_WAIT);
            });
    }
}

/// Publish span contexts by (account, event id), oldest dropped first.
#[derive(Default)]
struct Contexts {
    map: HashMap<(u64, Arc<str>), SpanContext>,
    order: VecDeque<(u64, Arc<str>)>,
}

/// What the exporter did, for the log.
#[derive(Debug, Default)]
struct Stats {
    /// Ended spans in the batch processor, not yet handed to the exporter.
    queued: AtomicUsize,
    /// Spans dropped because [`MAX_QUEUED`] were waiting.
    dropped: AtomicU64,
    /// Spans whose export failed.
    failed: AtomicU64,
    /// The last export failed (an outage is logged once, at its start).
    failing: AtomicBool,
}

impl Traces {
    /// Builds the exporter when `config.otlp_endpoint` is set (on the
    /// current tokio runtime); otherwise returns the empty handle. Logs
    /// which it is.
    pub fn start(config: &TelemetryConfig) -> Result<Traces, String> {
        let Some(endpoint) = config.otlp_endpoint.as_deref() else {
            tracing::info!("traces off (telemetry.otlp_endpoint is not set)");
            return Ok(Traces(None));
        };
        let url = traces_url(endpoint);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("telemetry.otlp_endpoint: cannot build the HTTP client: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = opentelemetry_http::hyper::HyperClient::new(https, EXPORT_TIMEOUT, None);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        let stats = Arc::new(Stats::default());
        let batch = BatchSpanProcessor::builder(
            Counted {
                inner: exporter,
                stats: stats.clone(),
                url: url.clone(),
            },
            Tokio,
        )
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUED)
                .with_scheduled_delay(EXPORT_INTERVAL)
                .with_max_export_timeout(EXPORT_TIMEOUT)
                .build(),
        )
        .build();
        let ratio = config.sample_ratio;
        let root = if ratio >= 1.0 {
            Sampler::AlwaysOn
        } else {
            Sampler::TraceIdRatioBased(ratio)
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batch,
                stats: stats.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(root)))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("webhook-router");
        tracing::info!(
            endpoint = %url,
            service_name = %config.service_name,
            sample_ratio = ratio,
            "exporting traces over OTLP/HTTP"
        );
        Ok(Traces(Some(Arc::new(On {
            provider,
            tracer,
            contexts: Mutex::new(Contexts::default()),
            stats,
        }))))
    }

    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The caller's trace from a W3C `traceparent` in gRPC metadata; None
    /// when traces are off or the header is absent or invalid.
    pub fn caller(&self, metadata: &tonic::metadata::MetadataMap) -> Option<Context> {
        self.0.as_ref()?;
        metadata.get("traceparent")?;
        let cx = TraceContextPropagator::new().extract(&Metadata(metadata));
        cx.span().span_context().is_valid().then_some(cx)
    }

    /// Starts the span of one publish (`method`: `PublishEvents` or
    /// `StreamEvents`), child of `caller` when given.
    pub fn publish(
        &self,
        method: &'static str,
        caller: Option<&Context>,
        account_id: u64,
        events: usize,
    ) -> Option<PublishSpan> {
        let on = self.0.as_ref()?;
        let builder = on
            .tracer
            .span_builder(format!("webhooks.v1.EventIngest/{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "webhooks.v1.EventIngest"),
                KeyValue::new("rpc.method", method),
                KeyValue::new("webhook_router.account_id", account_id as i64),
                KeyValue::new("webhook_router.event_count", events as i64),
            ]);
        let span = match caller {
            Some(cx) => on.tracer.build_with_context(builder, cx),
            None => on.tracer.build_with_context(builder, &Context::new()),
        };
        Some(PublishSpan {
            span,
            on: on.clone(),
        })
    }

    /// The trace of a payload's attempts: the publish span of its first event
    /// whose context is remembered is the parent, the others are linked.
    /// None when traces are off.
    pub fn payload(&self, p: PayloadTrace<'_>) -> Option<Arc<AttemptTrace>> {
        let on = self.0.as_ref()?;
        let mut parent: Option<SpanContext> = None;
        let mut links: Vec<SpanContext> = Vec::new();
        {
            let contexts = on.contexts.lock().unwrap_or_else(|e| e.into_inner());
            for id in p.event_ids {
                let key = (p.account_id, Arc::<str>::from(id.as_str()));
                let Some(sc) = contexts.map.get(&key) else {
                    continue;
                };
                match &parent {
                    None => parent = Some(sc.clone()),
                    Some(first) if first == sc => {}
                    Some(_) => {
                        if links.len() < MAX_LINKS && !links.contains(sc) {
                            links.push(sc.clone());
                        }
                    }
                }
            }
        }
        let parent = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("webhook_router.account_id", p.account_id as i64),
            KeyValue::new("webhook_router.webhook_id", p.webhook_id.to_string()),
            KeyValue::new("webhook_router.delivery_id", p.delivery_id.to_string()),
            KeyValue::new("webhook_router.lane", p.lane),
            KeyValue::new("webhook_router.event_count", p.event_ids.len() as i64),
            KeyValue::new("webhook_router.event_ids", ids(p.event_ids.iter())),
        ];
        Some(Arc::new(AttemptTrace {
            on: on.clone(),
            parent,
            links,
            attributes,
        }))
    }

    /// Sends the spans still waiting (at most [`SHUTDOWN_WAIT`]) and stops
    /// the exporter; logs what was dropped or failed. Nothing when off.
    pub async fn shutdown(&self) {
        let Some(on) = &self.0 else { return };
        let provider = on.provider.clone();
        // The batch processor's shutdown blocks until its task (on this
        // runtime) has sent the last batch: wait for it on a blocking thread.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_WAIT));
        let finished = tokio::time::timeout(SHUTDOWN_WAIT, done).await.is_ok();
        let dropped = on.stats.dropped.load(Ordering::Relaxed);
        let failed = on.stats.failed.load(Ordering::Relaxed);
        if !finished || dropped > 0 || failed > 0 {
            tracing::warn!(
                dropped,
                failed,
                sent_in_time = finished,
                "traces: spans dropped (queue full) or not exported (collector unreachable or refusing)"
            );
        } else {
            tracing::info!("traces exported; exporter stopped");
        }
    }
}

/// Which payload an [`AttemptTrace`] is for.
pub struct PayloadTrace<'a> {
    /// The webhook's account.
    pub account_id: u64,
    /// The webhook.
    pub webhook_id: &'a str,
    /// The delivery (its `webhook-id` header).
    pub delivery_id: &'a str,
    /// `realtime` or `batch`.
    pub lane: &'static str,
    /// The payload's events, in order.
    pub event_ids: &'a [String],
}

/// The span of one publish call (or stream message).
pub struct PublishSpan {
    span: Span,
    on: Arc<On>,
}

impl PublishSpan {
    /// Records the request's events (ids in request order) and remembers
    /// this span for their delivery attempts. Called before they are stored,
    /// so no lane can take them first; an id remembered already (a
    /// duplicate still in memory) keeps its first publish span.
    pub fn events<'a>(&mut self, account_id: u64, event_ids: impl Iterator<Item = &'a str>) {
        let sc = self.span.span_context().clone();
        let mut listed = Vec::new();
        {
            let mut contexts = self.on.contexts.lock().unwrap_or_else(|e| e.into_inner());
            for id in event_ids {
                if listed.len() < MAX_IDS_PER_SPAN {
                    listed.push(id);
                }
                let key: (u64, Arc<str>) = (account_id, id.into());
                if contexts.map.contains_key(&key) {
                    continue;
                }
                contexts.map.insert(key.clone(), sc.clone());
                contexts.order.push_back(key);
                while contexts.order.len() > MAX_CONTEXTS {
                    if let Some(old) = contexts.order.pop_front() {
                        contexts.map.remove(&old);
                    }
                }
            }
        }
        self.span.set_attribute(KeyValue::new(
            "webhook_router.event_ids",
            ids(listed.into_iter()),
        ));
    }

    /// Records how many of the events were stored before (duplicates).
    pub fn duplicates(&mut self, n: usize) {
        self.span
            .set_attribute(KeyValue::new("webhook_router.duplicates", n as i64));
    }

    /// Ends the span, as failed with `error` when given.
    pub fn finish(mut self, error: Option<String>) {
        if let Some(e) = error {
            self.span.set_status(Status::error(e));
        }
        self.span.end();
    }
}

/// What every attempt span of one payload shares.
pub struct AttemptTrace {
    on: Arc<On>,
    parent: Context,
    links: Vec<SpanContext>,
    attributes: Vec<KeyValue>,
}

impl AttemptTrace {
    /// Starts the span of attempt number `attempt` (counting from 1).
    pub fn start(&self, attempt: u32) -> AttemptSpan {
        let mut attributes = self.attributes.clone();
        attributes.push(KeyValue::new("webhook_router.attempt", attempt as i64));
        let builder = self
            .on
            .tracer
            .span_builder("webhook delivery attempt")
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .with_links(
                self.links
                    .iter()
                    .map(|sc| Link::with_context(sc.clone()))
                    .collect(),
            );
        AttemptSpan {
            span: self.on.tracer.build_with_context(builder, &self.parent),
        }
    }
}

/// The span of one HTTP attempt.
pub struct AttemptSpan {
    span: Span,
}

impl AttemptSpan {
    /// This span as a W3C `traceparent` header value, for the listener.
    pub fn traceparent(&self) -> Option<http::HeaderValue> {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        let mut out = Traceparent(None);
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        out.0.and_then(|v| http::HeaderValue::from_str(&v).ok())
    }

    /// Ends the span with the answer's status (0: none) and the error, if
    /// the attempt failed.
    pub fn finish(mut self, status: u16, error: Option<&str>) {
        if status > 0 {
            self.span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(e) = error {
            let kind = if status > 0 {
                status.to_string()
            } else {
                "transport".to_string()
            };
            self.span.set_attribute(KeyValue::new("error.type", kind));
            self.span.set_status(Status::error(e.to_string()));
        }
        self.span.end();
    }
}

/// `endpoint` with the OTLP traces path, as `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is read: `http://host:4318` and `http://host:4318/` both become
/// `http://host:4318/v1/traces`.
pub fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// At most [`MAX_IDS_PER_SPAN`] ids as a string array attribute.
fn ids<S: AsRef<str>>(ids: impl Iterator<Item = S>) -> Value {
    Value::Array(opentelemetry::Array::String(
        ids.take(MAX_IDS_PER_SPAN)
            .map(|s| s.as_ref().to_string().into())
            .collect(),
    ))
}

/// gRPC metadata as the propagator reads it.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str(),
            })
            .collect()
    }
}

/// Receives the `traceparent` the propagator writes (tracestate is not sent).
struct Traceparent(Option<String>);

impl Injector for Traceparent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// Drops a span instead of queueing it when [`MAX_QUEUED`] wait already,
/// so the batch processor's queue never fills and the count is exact.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor<Tokio>,
    stats: Arc<Stats>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.stats.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            if self.stats.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    max_queued = MAX_QUEUED,
                    "traces: spans are being dropped, the collector does not keep up \
                     (logged once; the count is logged at shutdown)"
                );
            }
            return;
        }
        self.inner.on_end(span)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The OTLP exporter, counting what it takes and logging an outage once.
#[derive(Debug)]
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    stats: Arc<Stats>,
    url: String,
}

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        // Taken from the queue, whatever the export's outcome.
        let _ = self
            .stats
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) => {
                self.stats.failed.fetch_add(n as u64, Ordering::Relaxed);
                if !self.stats.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.url,
                        error = %e,
                        "traces: cannot export spans; they are dropped until the collector \
                         answers (logged once per outage)"
                    );
                }
            }
            Ok(()) => {
                if self.stats.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.url, "traces: exporting again");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_appended_to_the_endpoint() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/"),
            "https://otel.example/v1/traces"
        );
    }

    #[test]
    fn off_without_an_endpoint() {
        let t = Traces::start(&TelemetryConfig::default()).unwrap();
        assert!(!t.enabled());
        assert!(t.publish("PublishEvents", None, 1, 1).is_none());
        let ids = vec!["e".to_string()];
        assert!(t
            .payload(PayloadTrace {
                account_id: 1,
                webhook_id: "wh",
                delivery_id: "msg",
                lane: "realtime",
                event_ids: &ids,
            })
            .is_none());
    }
}
