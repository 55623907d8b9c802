//! Prometheus metrics: one [`Metrics`] registry shared (behind an `Arc`) by
//! ingest, the delivery engine and the admin service, and the optional HTTP
//! listener that serves it at `/metrics` in the OpenMetrics text format.
//!
//! Hot paths only touch atomics: ingest adds once per event type of a
//! request, and each lane holds a [`LaneMetrics`] with its label sets
//! resolved once, so an attempt never builds labels. The lane gauges come
//! from each lane's tally, which the store keeps up to date as events
//! arrive and leave the lane ([`crate::store::LaneTally`]); a scrape reads
//! those, plus at most one timestamp per lane, so it costs the same however
//! many events are queued. Scrapes run one at a time, off the async workers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use tower::BoxError;

use crate::delivery::breaker::CircuitState;
use crate::delivery::stack::Verdict;
use crate::domain::catalog::Mode;
use crate::domain::now_ms;
use crate::store::{EventLog, LaneStore, Store, StoreHealth};

/// Most log records a scrape reads past a lane's cursor to find the age of
/// its oldest pending event (further on, the first record's age is used).
const OLDEST_SCAN_LIMIT: usize = 1_000;

/// Content type of the OpenMetrics text exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    account_id: u64,
    event_type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    webhook_id: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    webhook_id: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    account_id: u64,
    webhook_id: String,
    mode: &'static str,
}

/// Every metric family of one router process.
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    registry: Registry,
    /// Events stored (duplicates excluded), by account and event type.
    events_published: Family<EventLabels, Counter>,
    /// Finished payloads by webhook and outcome (`delivered`, `dead`).
    deliveries: Family<DeliveryLabels, Counter>,
    /// Duration of each HTTP attempt, by result (`success`, `failure`).
    attempt_duration: Family<ResultLabels, Histogram>,
    /// Failed attempts followed by a scheduled retry, by webhook.
    retries: Family<WebhookLabels, Counter>,
    /// Webhooks the service disabled, by reason.
    webhooks_disabled: Family<ReasonLabels, Counter>,
    /// Deliveries requeued by RedeliverEvents, counted as each chunk is stored.
    redelivery_requeued: Counter,
    /// Events that left a lane unsent after `delivery.retention_ms`, by webhook.
    events_expired: Family<WebhookLabels, Counter>,
    /// Webhooks whose circuit breaker is open or half-open in this router.
    circuit_breakers_open: Gauge,
    /// Times a webhook's circuit breaker opened (or re-opened), by webhook.
    circuit_breaker_openings: Family<WebhookLabels, Counter>,
    /// One scrape at a time.
    scrape: tokio::sync::Mutex<()>,
}

fn attempt_histogram() -> Histogram {
    // 5 ms … ~41 s: loopback answers to listeners at their request timeout.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    /// A registry with every family registered. With `store`, the lane and
    /// store gauges are read from it at each scrape.
    pub fn new(store: Option<Store>) -> Metrics {
        let mut registry = Registry::with_prefix("webhook_router");
        let events_published = Family::<EventLabels, Counter>::default();
        registry.register(
            "events_published",
            "Events stored, duplicates excluded, by account and event type",
            events_published.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Payloads finished, by webhook and outcome (delivered or dead)",
            deliveries.clone(),
        );
        let attempt_duration =
            Family::<ResultLabels, Histogram>::new_with_constructor(attempt_histogram as fn() -> _);
        registry.register(
            "delivery_attempt_duration_seconds",
            "Duration of each HTTP delivery attempt, by result (success or failure)",
            attempt_duration.clone(),
        );
        let retries = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "retries_scheduled",
            "Failed delivery attempts followed by a scheduled retry, by webhook",
            retries.clone(),
        );
        let webhooks_disabled = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "webhooks_disabled",
            "Webhooks the service disabled, by reason (gone or retries_exhausted)",
            webhooks_disabled.clone(),
        );
        let redelivery_requeued = Counter::default();
        registry.register(
            "redelivery_requeued",
            "Deliveries requeued by RedeliverEvents (grows chunk by chunk during a large call)",
            redelivery_requeued.clone(),
        );
        let events_expired = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "events_expired",
            "Events that left a lane unsent because they were older than delivery.retention_ms \
             (recorded as EXPIRED deliveries), by webhook",
            events_expired.clone(),
        );
        let circuit_breakers_open = Gauge::default();
        registry.register(
            "circuit_breakers_open",
            "Webhooks whose circuit breaker is open or half-open in this router",
            circuit_breakers_open.clone(),
        );
        let circuit_breaker_openings = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "circuit_breaker_openings",
            "Times a webhook's circuit breaker opened or re-opened after a failed probe, by webhook",
            circuit_breaker_openings.clone(),
        );
        if let Some(store) = store {
            registry.register_collector(Box::new(StoreCollector { store }));
        }
        Metrics {
            registry,
            events_published,
            deliveries,
            attempt_duration,
            retries,
            webhooks_disabled,
            redelivery_requeued,
            events_expired,
            circuit_breakers_open,
            circuit_breaker_openings,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// Records a change of `webhook_id`'s circuit breaker.
    pub fn circuit_changed(&self, webhook_id: &str, from: CircuitState, to: CircuitState) {
        match (from == CircuitState::Closed, to == CircuitState::Closed) {
            (true, false) => {
                self.circuit_breakers_open.inc();
            }
            (false, true) => {
                self.circuit_breakers_open.dec();
            }
            _ => {}
        }
        if to == CircuitState::Open {
            self.circuit_breaker_openings
                .get_or_create(&WebhookLabels {
                    webhook_id: webhook_id.to_string(),
                })
                .inc();
        }
    }

    /// Counts events that expired from one of `webhook_id`'s lanes.
    pub fn events_expired(&self, webhook_id: &str, n: u64) {
        self.events_expired
            .get_or_create(&WebhookLabels {
                webhook_id: webhook_id.to_string(),
            })
            .inc_by(n);
    }

    /// The registry encoded on a blocking thread, one scrape at a time.
    pub async fn scrape(self: &Arc<Self>) -> String {
        let _one = self.scrape.lock().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.encode())
            .await
            .unwrap_or_default()
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Counts the stored (non-duplicate) events of one request: one
    /// increment per event type present, not per event.
    pub fn events_published<'a>(&self, account_id: u64, names: impl Iterator<Item = &'a str>) {
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for name in names {
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => counts.push((name, 1)),
            }
        }
        for (name, n) in counts {
            self.events_published
                .get_or_create(&EventLabels {
                    account_id,
                    event_type: name.to_string(),
                })
                .inc_by(n);
        }
    }

    /// Counts deliveries requeued by RedeliverEvents.
    pub fn redelivery_requeued(&self, n: u64) {
        self.redelivery_requeued.inc_by(n);
    }

    /// The handles one lane updates, labels resolved once.
    pub fn lane(&self, webhook_id: &str) -> LaneMetrics {
        let delivery = |outcome| {
            self.deliveries.get_or_create_owned(&DeliveryLabels {
                webhook_id: webhook_id.to_string(),
                outcome,
            })
        };
        LaneMetrics {
            delivered: delivery("delivered"),
            dead: delivery("dead"),
            retries: self.retries.get_or_create_owned(&WebhookLabels {
                webhook_id: webhook_id.to_string(),
            }),
            attempt_success: self
                .attempt_duration
                .get_or_create_owned(&ResultLabels { result: "success" }),
            attempt_failure: self
                .attempt_duration
                .get_or_create_owned(&ResultLabels { result: "failure" }),
            disabled_gone: self
                .webhooks_disabled
                .get_or_create_owned(&ReasonLabels { reason: "gone" }),
            disabled_exhausted: self.webhooks_disabled.get_or_create_owned(&ReasonLabels {
                reason: "retries_exhausted",
            }),
        }
    }

    /// Drops a deleted webhook's series.
    pub fn forget_webhook(&self, webhook_id: &str) {
        for outcome in ["delivered", "dead"] {
            self.deliveries.remove(&DeliveryLabels {
                webhook_id: webhook_id.to_string(),
                outcome,
            });
        }
        self.retries.remove(&WebhookLabels {
            webhook_id: webhook_id.to_string(),
        });
        self.events_expired.remove(&WebhookLabels {
            webhook_id: webhook_id.to_string(),
        });
        self.circuit_breaker_openings.remove(&WebhookLabels {
            webhook_id: webhook_id.to_string(),
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

/// One lane's metric handles: clones of the registered series (shared
/// atomics), so updating them allocates nothing and takes no map lock.
#[derive(Debug, Clone)]
pub struct LaneMetrics {
    delivered: Counter,
    dead: Counter,
    retries: Counter,
    attempt_success: Histogram,
    attempt_failure: Histogram,
    disabled_gone: Counter,
    disabled_exhausted: Counter,
}

impl LaneMetrics {
    /// Records a failed HTTP attempt and whether a retry was scheduled.
    pub fn attempt_failed(&self, latency_ms: u32, retry_scheduled: bool) {
        self.attempt_failure.observe(f64::from(latency_ms) / 1000.0);
        if retry_scheduled {
            self.retries.inc();
        }
    }

    /// Records how a payload ended. Failed attempts were recorded one by
    /// one with [`LaneMetrics::attempt_failed`]; the successful one is here.
    pub fn verdict(&self, verdict: &Result<Verdict, BoxError>) {
        match verdict {
            Ok(Verdict::Delivered(attempt)) => {
                self.attempt_success
                    .observe(f64::from(attempt.latency_ms) / 1000.0);
                self.delivered.inc();
            }
            Ok(Verdict::Gone(_)) => {
                self.dead.inc();
                self.disabled_gone.inc();
            }
            Ok(Verdict::Dead(_)) => {
                self.dead.inc();
                self.disabled_exhausted.inc();
            }
            Ok(Verdict::Stopped) | Ok(Verdict::Paused) | Err(_) => {}
        }
    }
}

/// Reads the lane gauges and the store size from the store at scrape time.
struct StoreCollector {
    store: Store,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

/// One lane's scrape-time figures.
struct LaneFigures {
    labels: LaneLabels,
    backlog: u64,
    capped: bool,
    oldest_age_s: f64,
    requeued: u64,
}

impl StoreCollector {
    fn lanes(&self) -> crate::error::Result<Vec<LaneFigures>> {
        let now = now_ms();
        let mut out = Vec::new();
        for (key, tally) in self.store.lane_tallies() {
            // A lane that has not run yet (or a webhook deleted meanwhile).
            let Some(filter) = tally.filter() else {
                continue;
            };
            let backlog = tally.backlog();
            let requeued = tally.requeued();
            if !filter.subscribes() && backlog == 0 && requeued == 0 {
                continue;
            }
            let oldest = match tally.head_ingest_ms() {
                Some(t) => Some(t),
                None if tally.pending() > 0 => {
                    self.store
                        .lane_next_ingest_ms(&key, &filter, OLDEST_SCAN_LIMIT)?
                }
                None => None,
            };
            out.push(LaneFigures {
                labels: LaneLabels {
                    account_id: key.account_id,
                    webhook_id: key.webhook_id.clone(),
                    mode: match Mode::from(key.mode) {
                        Mode::Realtime => "realtime",
                        Mode::Batch => "batch",
                    },
                },
                backlog,
                capped: tally.capped(),
                oldest_age_s: oldest
                    .map(|t| (now - t).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0),
                requeued,
            });
        }
        Ok(out)
    }
}

fn gauge_family<N: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    lanes: &[LaneFigures],
    value: impl Fn(&LaneFigures) -> N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for lane in lanes {
        let gauge = ConstGauge::new(value(lane));
        gauge.encode(family.encode_family(&lane.labels)?)?;
    }
    Ok(())
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let size = ConstGauge::new(self.store.size_on_disk() as i64);
        size.encode(encoder.encode_descriptor(
            "store_size_bytes",
            "Bytes the database occupies on disk (sled: the data folder; PostgreSQL: the database, shared by the cluster)",
            None,
            size.metric_type(),
        )?)?;
        let stored = ConstGauge::new(self.store.stored_events() as i64);
        stored.encode(encoder.encode_descriptor(
            "log_events_stored",
            "Events in the event log (all accounts); kept delivery.retention_ms after they were stored",
            None,
            stored.metric_type(),
        )?)?;
        let fenced =
            prometheus_client::metrics::counter::ConstCounter::new(self.store.fenced_writes());
        fenced.encode(encoder.encode_descriptor(
            "lane_writes_fenced",
            "Lane writes the store refused because this router no longer held the lane's \
             lease (its epoch had moved on): the new holder sends those payloads again",
            None,
            fenced.metric_type(),
        )?)?;
        let lanes = match self.lanes() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read lane state for metrics");
                return Ok(());
            }
        };
        gauge_family(
            &mut encoder,
            "lane_backlog_events",
            "Events stored for the lane and not yet delivered or dead (the payload in flight included)",
            &lanes,
            |l| l.backlog as i64,
        )?;
        gauge_family(
            &mut encoder,
            "lane_backlog_capped",
            "1 when the lane is so far behind that the backlog count stopped at the scan limit",
            &lanes,
            |l| i64::from(l.capped),
        )?;
        gauge_family(
            &mut encoder,
            "lane_oldest_pending_age_seconds",
            "Age of the oldest event the lane has not delivered yet (0 when none)",
            &lanes,
            |l| l.oldest_age_s,
        )?;
        gauge_family(
            &mut encoder,
            "lane_requeued_deliveries",
            "Deliveries requeued by RedeliverEvents still waiting to be sent",
            &lanes,
            |l| l.requeued as i64,
        )?;
        Ok(())
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves. Every
/// other path answers 404.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listener serving /metrics");
    }
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let metrics = metrics.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics"
                        && matches!(*req.method(), http::Method::GET | http::Method::HEAD)
                    {
                        let text = metrics.scrape().await;
                        hyper::Response::builder()
                            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
                            .body(Full::new(Bytes::from(text)))
                    } else {
                        hyper::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                    };
                    Ok::<_, http::Error>(resp.unwrap_or_default())
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            // A kept-alive scraper must not keep the store (held by
            // `metrics`) open past shutdown.
            tokio::select! {
                _ = conn => {}
                _ = async { let _ = conn_shutdown.wait_for(|s| *s).await; } => {}
            }
        });
    }
}
