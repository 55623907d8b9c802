//! The HTTP client at the bottom of the delivery stack: POSTs one payload,
//! refuses non-global destinations (literal addresses here, resolved names in
//! the resolver), follows no redirect and reads at most a capped body.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tower::{BoxError, Service};

use super::guard;
use super::retry::parse_retry_after;
use super::stack::{DeliveryRequest, HttpResponse, SendError};

/// Bytes of the response body kept for the log and TestWebhook.
pub const KEPT_BODY_BYTES: usize = 1024;

/// Resolves names and drops non-global addresses (unless allowed), so a DNS
/// answer cannot point a delivery at an internal service.
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let kept = guard::filter_resolved(addrs, allow).map_err(|e| {
                Box::new(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)) as BoxError
            })?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The innermost service.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
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

impl HttpClient {
    /// A client with its own connection pool.
    pub fn new(s: ClientSettings) -> Result<HttpClient, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(s.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("webhook-router/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(crate::domain::webhook::MAX_IN_FLIGHT as usize)
            .tcp_nodelay(true)
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: s.allow_private,
            }))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(HttpClient {
            client,
            allow_private: s.allow_private,
            max_body: s.max_body,
        })
    }

    async fn send(self, req: DeliveryRequest) -> Result<HttpResponse, SendError> {
        let url = guard::check_target_url(&req.webhook.webhook.target_url, self.allow_private)
            .map_err(SendError::Refused)?;
        let mut resp = self
            .client
            .post(url)
            .headers(req.headers)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(req.body)
            .send()
            .await
            .map_err(|e| {
                // reqwest's message carries the whole URL, query-string
                // tokens included: never into logs or the delivery log.
                let e = e.without_url();
                if e.is_timeout() {
                    SendError::Timeout
                } else if e.is_connect() {
                    SendError::Connect(error_chain(&e))
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
        let mut kept = BytesMut::new();
        let mut read = 0usize;
        // Read at most max_body bytes, keep the first KiB, then drop the connection.
        while read < self.max_body {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    read += chunk.len();
                    let room = KEPT_BODY_BYTES.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(e) => {
                    // The status arrived; a broken body does not change the outcome class.
                    if (200..300).contains(&status) {
                        break;
                    }
                    return Err(SendError::Other(format!(
                        "reading response body: {}",
                        error_chain(&e.without_url())
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

/// An error and its sources, joined: reqwest's top-level text alone hides the cause.
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
