//! The tower stack every delivery attempt goes through, and its layers.
//! Composed in one place, [`lane_stack`], outermost first:
//!
//! ```text
//! retry (with the circuit breaker) ▶ rate limit ▶ auth ▶ timeout ▶ HTTP client
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};

use super::breaker::Breaker;
use super::client::{HttpClient, KEPT_BODY_BYTES};
use super::retry::RetryPolicy;
use super::signing;
use crate::domain::catalog::{Catalog, Mode};
use crate::domain::delivery::{Attempt, LaneFilter};
use crate::domain::now_ms;
use crate::domain::webhook::{Auth, SecretRecord, Webhook};

/// A webhook as the delivery path sees it, with its decoded signing keys
/// and the filters of its two lanes.
#[derive(Debug, Clone)]
pub struct WebhookSnapshot {
    /// The stored webhook.
    pub webhook: Webhook,
    /// Signing keys (HMAC or ed25519, by the secret's prefix) and until
    /// when each may be used (i64::MAX: current).
    keys: Vec<(signing::Key, i64)>,
    /// Which events the real-time and the batch lane take.
    filters: [LaneFilter; 2],
}

impl WebhookSnapshot {
    /// Snapshot of `webhook` with its secrets (if it signs).
    pub fn new(
        webhook: Webhook,
        secret: Option<&SecretRecord>,
        catalog: &Arc<Catalog>,
    ) -> WebhookSnapshot {
        let filters = [
            LaneFilter::new(&webhook, Mode::Realtime, catalog.clone()),
            LaneFilter::new(&webhook, Mode::Batch, catalog.clone()),
        ];
        let mut keys = Vec::new();
        if let Some(s) = secret {
            if let Ok(k) = signing::Key::from_secret(&s.current) {
                keys.push((k, i64::MAX));
            }
            if let Some(prev) = &s.previous {
                if let Ok(k) = signing::Key::from_secret(prev) {
                    keys.push((k, s.previous_expire_ms));
                }
            }
        }
        WebhookSnapshot {
            webhook,
            keys,
            filters,
        }
    }

    /// The filter of the `mode` lane.
    pub fn filter(&self, mode: Mode) -> &LaneFilter {
        match mode {
            Mode::Realtime => &self.filters[0],
            Mode::Batch => &self.filters[1],
        }
    }

    /// Keys to sign with at `now_ms`.
    fn keys_at(&self, now_ms: i64) -> Vec<&signing::Key> {
        self.keys
            .iter()
            .filter(|(_, until)| now_ms < *until)
            .map(|(k, _)| k)
            .collect()
    }
}

/// One HTTP attempt to make.
#[derive(Debug, Clone)]
pub struct DeliveryRequest {
    /// Where and how.
    pub webhook: Arc<WebhookSnapshot>,
    /// `webhook-id`: stable across retries.
    pub msg_id: Arc<str>,
    /// The JSON payload.
    pub body: Bytes,
    /// Headers added by the layers.
    pub headers: HeaderMap,
}

/// What came back.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// HTTP status.
    pub status: u16,
    /// Parsed `Retry-After`.
    pub retry_after: Option<Duration>,
    /// `Location` of a redirect (not followed).
    pub location: Option<String>,
    /// First KiB of the body.
    pub body_prefix: Bytes,
}

/// Why no response arrived.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The whole request took too long.
    #[error("timed out")]
    Timeout,
    /// Could not connect (refused, unreachable, TLS failure, DNS).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The destination guard refused the target.
    #[error("destination refused: {0}")]
    Refused(String),
    /// Anything else (reset, invalid HTTP...).
    #[error("request failed: {0}")]
    Other(String),
}

/// One attempt's classified result.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    /// Log entry for the attempt.
    pub attempt: Attempt,
    /// 2xx.
    pub success: bool,
    /// `Retry-After` the listener sent.
    pub retry_after: Option<Duration>,
    /// First KiB of the response body (lossy UTF-8).
    pub response_body: String,
}

/// Turns a result of the inner stack into an attempt record.
pub fn classify(
    started_ms: i64,
    elapsed: Duration,
    result: Result<HttpResponse, BoxError>,
) -> AttemptOutcome {
    let latency_ms = elapsed.as_millis().min(u128::from(u32::MAX)) as u32;
    match result {
        Ok(resp) => {
            let success = (200..300).contains(&resp.status);
            let body = String::from_utf8_lossy(
                &resp.body_prefix[..resp.body_prefix.len().min(KEPT_BODY_BYTES)],
            )
            .into_owned();
            let error = if success {
                String::new()
            } else if (300..400).contains(&resp.status) {
                format!(
                    "HTTP {}: redirect not followed (location: {})",
                    resp.status,
                    resp.location.as_deref().unwrap_or("none")
                )
            } else {
                format!("HTTP {}", resp.status)
            };
            AttemptOutcome {
                attempt: Attempt {
                    time_ms: started_ms,
                    status_code: resp.status,
                    latency_ms,
                    error,
                },
                success,
                retry_after: resp.retry_after,
                response_body: body,
            }
        }
        Err(e) => {
            let error = if e.is::<tower::timeout::error::Elapsed>() {
                format!("timed out after {latency_ms} ms")
            } else if let Some(se) = e.downcast_ref::<SendError>() {
                se.to_string()
            } else {
                e.to_string()
            };
            AttemptOutcome {
                attempt: Attempt {
                    time_ms: started_ms,
                    status_code: 0,
                    latency_ms,
                    error,
                },
                success: false,
                retry_after: None,
                response_body: String::new(),
            }
        }
    }
}

// ---------------------------------------------------------------- auth layer

/// Adds the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`)
/// and the webhook's authentication: a fresh signature per attempt (the
/// timestamp is part of what is signed) or Basic credentials.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer;

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
}

/// Sets the authentication headers of `req` for an attempt at `now_ms`.
pub fn authenticate(req: &mut DeliveryRequest, now_ms: i64) {
    let ts = now_ms.div_euclid(1000);
    let h = &mut req.headers;
    if let Ok(v) = HeaderValue::from_str(&req.msg_id) {
        h.insert("webhook-id", v);
    }
    h.insert("webhook-timestamp", HeaderValue::from(ts));
    match &req.webhook.webhook.auth {
        Auth::None => {}
        Auth::Basic { username, password } => {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            if let Ok(mut v) = HeaderValue::from_str(&format!("Basic {token}")) {
                v.set_sensitive(true);
                h.insert(http::header::AUTHORIZATION, v);
            }
        }
        Auth::Signature { .. } => {
            let keys = req.webhook.keys_at(now_ms);
            let sig = signing::signature_header(&keys, &req.msg_id, ts, &req.body);
            if let Ok(v) = HeaderValue::from_str(&sig) {
                h.insert("webhook-signature", v);
            }
        }
    }
}

impl<S> Service<DeliveryRequest> for AuthService<S>
where
    S: Service<DeliveryRequest>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: DeliveryRequest) -> S::Future {
        authenticate(&mut req, now_ms());
        self.inner.call(req)
    }
}

// ---------------------------------------------------------- rate limit layer

/// Spaces requests to one webhook at least 1/rate apart. Shared by the
/// webhook's lanes, so the limit holds per webhook, for every attempt.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    /// A pacer for `per_second` requests per second.
    pub fn new(per_second: u32) -> Pacer {
        Pacer {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for the next free slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            (slot > now).then_some(slot)
        };
        // A free slot now goes at once: tokio's timer rounds a deadline up to
        // the next millisecond, which would cap a lane near 1,000 requests/s.
        if let Some(slot) = slot {
            tokio::time::sleep_until(slot.into()).await;
        }
    }
}

/// Applies a [`Pacer`] before each request.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    pacer: Arc<Pacer>,
}

impl RateLimitLayer {
    /// Layer sharing `pacer`.
    pub fn new(pacer: Arc<Pacer>) -> Self {
        RateLimitLayer { pacer }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            pacer: self.pacer.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    pacer: Arc<Pacer>,
}

impl<S, R> Service<R> for RateLimitService<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is decided in `call`, after the pacer's slot: the inner
        // services are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        let pacer = self.pacer.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            pacer.acquire().await;
            inner.oneshot(req).await
        })
    }
}

// --------------------------------------------------------------- retry layer

/// Called after every failed attempt with the attempt and the time of the
/// next one (None: no further attempt), and awaited before the wait. The
/// lane persists both here, so a restart resumes the schedule.
pub type AttemptObserver =
    Arc<dyn Fn(Attempt, Option<i64>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The webhook's settings as they change; None once it is deleted.
pub type Settings = tokio::sync::watch::Receiver<Option<Arc<WebhookSnapshot>>>;

/// A payload to deliver with retries.
#[derive(Clone)]
pub struct RetryRequest {
    /// `webhook-id`: stable across retries.
    pub msg_id: Arc<str>,
    /// The JSON payload.
    pub body: Bytes,
    /// Read before each attempt: a new target, auth or secret applies from
    /// the next attempt on, never to one in flight.
    pub settings: Settings,
    /// Failures so far (from the persisted record).
    pub failures: u32,
    /// First attempt time, ms, if any was made.
    pub first_attempt_ms: Option<i64>,
    /// Persistence hook.
    pub observer: AttemptObserver,
    /// The payload's trace: a span per attempt (None: traces off).
    pub trace: Option<Arc<crate::telemetry::otlp::AttemptTrace>>,
}

/// How a payload ended.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// A 2xx answer.
    Delivered(Attempt),
    /// The listener answered 410 Gone: stop at once.
    Gone(Attempt),
    /// Still failing after the maximum age.
    Dead(Attempt),
    /// The router is stopping; the schedule is persisted.
    Stopped,
    /// Between attempts the webhook was retired, disabled or deleted; the
    /// schedule is persisted and resumes on activation.
    Paused,
}

/// Retries failed attempts on the [`RetryPolicy`] schedule until success,
/// 410, the maximum age, or shutdown. Every attempt first passes the
/// webhook's circuit [`Breaker`] and reports its outcome to it.
#[derive(Clone)]
pub struct RetryLayer {
    policy: RetryPolicy,
    breaker: Arc<Breaker>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl RetryLayer {
    /// Layer with `policy` and the webhook's `breaker`; `stop` turning true
    /// ends waits between attempts.
    pub fn new(
        policy: RetryPolicy,
        breaker: Arc<Breaker>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        RetryLayer {
            policy,
            breaker,
            stop,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            policy: self.policy,
            breaker: self.breaker.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone)]
pub struct RetryService<S> {
    inner: S,
    policy: RetryPolicy,
    breaker: Arc<Breaker>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The settings to attempt with now; None when the webhook is inactive or gone.
fn current(settings: &mut Settings) -> Option<Arc<WebhookSnapshot>> {
    settings
        .borrow_and_update()
        .clone()
        .filter(|s| s.webhook.active)
}

impl<S> Service<RetryRequest> for RetryService<S>
where
    S: Service<DeliveryRequest, Response = HttpResponse, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Verdict;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Verdict, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: RetryRequest) -> Self::Future {
        let inner = self.inner.clone();
        let policy = self.policy;
        let breaker = self.breaker.clone();
        let mut stop = self.stop.clone();
        Box::pin(async move {
            let mut settings = req.settings.clone();
            let mut failures = req.failures;
            let mut first = req.first_attempt_ms;
            loop {
                if *stop.borrow() {
                    return Ok(Verdict::Stopped);
                }
                if current(&mut settings).is_none() {
                    return Ok(Verdict::Paused);
                }
                // The breaker's wait uses no retry attempt and does not
                // count towards anything but the payload's age, which is
                // checked (as always) after its next failed attempt.
                let permit = {
                    let admit = breaker.admit();
                    tokio::pin!(admit);
                    loop {
                        tokio::select! {
                            p = &mut admit => break p,
                            _ = stop.wait_for(|s| *s) => return Ok(Verdict::Stopped),
                            changed = settings.changed() => {
                                if changed.is_err() || current(&mut settings).is_none() {
                                    return Ok(Verdict::Paused);
                                }
                            }
                        }
                    }
                };
                let Some(webhook) = current(&mut settings) else {
                    return Ok(Verdict::Paused);
                };
                let mut attempt = DeliveryRequest {
                    webhook,
                    msg_id: req.msg_id.clone(),
                    body: req.body.clone(),
                    headers: HeaderMap::new(),
                };
                let span = req.trace.as_ref().map(|t| t.start(failures + 1));
                if let Some(v) = span.as_ref().and_then(|s| s.traceparent()) {
                    attempt.headers.insert("traceparent", v);
                }
                let started_ms = now_ms();
                let started = Instant::now();
                // Never raced against a settings change: an attempt that was
                // sent is finished and recorded.
                let result = inner.clone().oneshot(attempt).await;
                let outcome = classify(started_ms, started.elapsed(), result);
                if let Some(span) = span {
                    let error = (!outcome.success).then_some(outcome.attempt.error.as_str());
                    span.finish(outcome.attempt.status_code, error);
                }
                permit.record(outcome.success);
                let first_ms = *first.get_or_insert(started_ms);
                if outcome.success {
                    return Ok(Verdict::Delivered(outcome.attempt));
                }
                if outcome.attempt.status_code == 410 {
                    (req.observer)(outcome.attempt.clone(), None).await;
                    return Ok(Verdict::Gone(outcome.attempt));
                }
                failures += 1;
                let delay = policy.delay(failures, outcome.retry_after);
                let next_ms = now_ms() + delay.as_millis() as i64;
                if policy.expired(first_ms, next_ms) {
                    (req.observer)(outcome.attempt.clone(), None).await;
                    return Ok(Verdict::Dead(outcome.attempt));
                }
                (req.observer)(outcome.attempt, Some(next_ms)).await;
                // The wait, unlike an attempt, ends early when the webhook is
                // retired or deleted meanwhile; other changes wait it out.
                let until = tokio::time::Instant::now() + delay;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = stop.wait_for(|s| *s) => return Ok(Verdict::Stopped),
                        changed = settings.changed() => {
                            if changed.is_err() || current(&mut settings).is_none() {
                                return Ok(Verdict::Paused);
                            }
                        }
                    }
                }
            }
        })
    }
}

// --------------------------------------------------------------- composition

/// One attempt, no retry, no pacing: auth ▶ timeout ▶ client. Used by the
/// lanes (inside [`lane_stack`]) and by TestWebhook.
pub type AttemptStack = BoxCloneSyncService<DeliveryRequest, HttpResponse, BoxError>;

/// Builds the attempt stack.
pub fn attempt_stack(client: HttpClient, request_timeout: Duration) -> AttemptStack {
    let svc = ServiceBuilder::new()
        // Sign last-moment: the signed timestamp is the attempt's own.
        .layer(AuthLayer)
        // The whole request, body included, is bounded.
        .layer(TimeoutLayer::new(request_timeout))
        .service(client);
    BoxCloneSyncService::new(svc)
}

/// The full per-webhook stack of a lane.
pub fn lane_stack(
    attempt: AttemptStack,
    pacer: Arc<Pacer>,
    breaker: Arc<Breaker>,
    policy: RetryPolicy,
    stop: tokio::sync::watch::Receiver<bool>,
) -> BoxCloneSyncService<RetryRequest, Verdict, BoxError> {
    let svc = ServiceBuilder::new()
        // Outermost: every attempt, first or retried, passes the webhook's
        // circuit breaker (shared by its lanes) and the rate limit below.
        .layer(RetryLayer::new(policy, breaker, stop))
        // Per webhook, shared by its lanes: bounds requests/s at the listener.
        .layer(RateLimitLayer::new(pacer))
        .service(attempt);
    BoxCloneSyncService::new(svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pacer_spaces_requests() {
        let p = Pacer::new(20);
        let start = Instant::now();
        for _ in 0..5 {
            p.acquire().await;
        }
        // First slot is immediate, then four more 50 ms apart.
        assert!(
            start.elapsed() >= Duration::from_millis(195),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn signature_header_uses_current_and_unexpired_keys() {
        let secret = SecretRecord::generate(0).rotate(1_000, 10_000);
        let w = Webhook {
            id: "wh_x".into(),
            account_id: 1,
            name: "n".into(),
            description: String::new(),
            target_url: "https://example.com".into(),
            auth: Auth::HMAC,
            event_types: vec![],
            active: true,
            create_time_ms: 0,
            update_time_ms: 0,
            disabled_reason: String::new(),
            max_in_flight: 0,
            filter: None,
        };
        let snap = Arc::new(WebhookSnapshot::new(
            w,
            Some(&secret),
            &Arc::new(Catalog::new(&[])),
        ));
        let mut req = DeliveryRequest {
            webhook: snap.clone(),
            msg_id: "msg_1".into(),
            body: Bytes::from_static(b"{}"),
            headers: HeaderMap::new(),
        };
        authenticate(&mut req, 5_000);
        let sig = req.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(sig.split(' ').count(), 2);
        let key = signing::decode_secret(&secret.current).unwrap();
        assert!(sig.starts_with(&signing::sign(&key, "msg_1", 5, b"{}")));
        authenticate(&mut req, 20_000);
        assert_eq!(
            req.headers["webhook-signature"]
                .to_str()
                .unwrap()
                .split(' ')
                .count(),
            1
        );
    }
}
