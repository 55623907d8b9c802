//! The HTTP client at the bottom of the delivery stack: POSTs one payload,
//! refuses non-global destinations (literal addresses here, resolved names in
//! the resolver), follows no redirect and reads at most a capped body.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::{BoxError, Service};

use super::guard;
use super::retry::parse_retry_after;
use super::stack::{DeliveryRequest, HttpResponse, SendError};

/// Bytes of the response body kept for the log and TestWebhook.
pub const KEPT_BODY_BYTES: usize = 1024;

/// Resolves names and drops non-global addresses (unless allowed), so a DNS
/// answer cannot point a delivery at an internal service.
#[derive(Clone)]
struct GuardedResolver {
    allow_private: bool,
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let kept = guard::filter_resolved(addrs, allow)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
            Ok(kept.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// The innermost service: hyper's pooled client (measured faster than
/// reqwest, see docs/benchmarks.md); hyper never follows redirects.
#[derive(Clone)]
pub struct HttpClient {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    allow_private: bool,
    max_body: usize,
}

/// Client settings.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Admit private targets and plain http.
    pub allow_private: bool,
    /// Most response-body bytes read.
    pub max_body: usize,
}

const USER_AGENT: &str = concat!("webhook-router/", env!("CARGO_PKG_VERSION"));

impl HttpClient {
    /// A client with its own connection pool.
    pub fn new(s: ClientSettings) -> Result<HttpClient, String> {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver {
            allow_private: s.allow_private,
        });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(s.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("cannot build HTTP client: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(crate::domain::webhook::MAX_IN_FLIGHT as usize)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(HttpClient {
            client,
            allow_private: s.allow_private,
            max_body: s.max_body,
        })
    }

    async fn send(self, req: DeliveryRequest) -> Result<HttpResponse, SendError> {
        let url = guard::check_target_url(&req.webhook.webhook.target_url, self.allow_private)
            .map_err(SendError::Refused)?;
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|e| SendError::Refused(format!("target URL: {e}")))?;
        let mut request = http::Request::new(Full::new(req.body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = req.headers;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(USER_AGENT),
        );
        // hyper's errors never carry the URL (its query string may hold tokens).
        let resp = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                if timed_out(&e) {
                    SendError::Timeout
                } else {
                    SendError::Connect(error_chain(&e))
                }
            } else {
                SendError::Other(error_chain(&e))
            }
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            // A redirect target may carry tokens too.
            .map(|s| guard::redact_url(s).chars().take(200).collect::<String>());
        let mut body = resp.into_body();
        let mut kept = BytesMut::new();
        let mut read = 0usize;
        // Read at most max_body bytes, keep the first KiB, then drop the connection.
        while read < self.max_body {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(chunk) = frame.into_data() {
                        read += chunk.len();
                        let room = KEPT_BODY_BYTES.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                }
                None => break,
                Some(Err(e)) => {
                    // The status arrived; a broken body does not change the outcome class.
                    if (200..300).contains(&status) {
                        break;
                    }
                    return Err(SendError::Other(format!(
                        "reading response body: {}",
                        error_chain(&e)
                    )));
                }
            }
        }
        Ok(HttpResponse {
            status,
            retry_after,
            location,
            body_prefix: Bytes::from(kept),
        })
    }
}

/// Whether a connect error came from the connect timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// An error and its sources, joined: the top-level text alone hides the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

impl Service<DeliveryRequest> for HttpClient {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: DeliveryRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(req).await.map_err(BoxError::from) })
    }
}
