//! Tower layers in front of every gRPC service, outermost first:
//! - [`LoadShedLayer`]: at most `limits.max_concurrent_requests` requests in
//!   progress; more are answered UNAVAILABLE at once instead of queueing, so
//!   an overload cannot pile up memory or latency (health checks are exempt,
//!   so an overloaded router is not mistaken for a dead one). A request
//!   counts until its response body is finished or dropped, so a stream
//!   (StreamEvents, WatchDeliveries) counts for as long as it is open; the
//!   same span marks the request open on its connection (see `conn.rs`);
//! - [`DecodeErrorLayer`]: tonic reports a request it cannot decode (a `data`
//!   Struct nested past prost's recursion limit, a string that is not UTF-8,
//!   a message over `limits.max_request_bytes`) as INTERNAL or OUT_OF_RANGE;
//!   this turns those into INVALID_ARGUMENT naming the field, like every
//!   other bad input.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::conn::{ConnInfo, RequestGuard};
use crate::error::Error;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Concurrency limit with load shedding.
#[derive(Clone)]
pub struct LoadShedLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl LoadShedLayer {
    /// At most `max` requests in progress at once.
    pub fn new(max: usize) -> Self {
        LoadShedLayer {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;
    fn layer(&self, inner: S) -> LoadShed<S> {
        LoadShed {
            inner,
            permits: self.permits.clone(),
            max: self.max,
        }
    }
}

/// See [`LoadShedLayer`].
#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

/// A response body that keeps what the request holds (its load-shed
/// permit, its mark on the connection) until the body is finished or dropped.
pub struct HeldBody<RB> {
    inner: RB,
    _permit: Option<OwnedSemaphorePermit>,
    _open: Option<RequestGuard>,
}

impl<RB> http_body::Body for HeldBody<RB>
where
    RB: http_body::Body + Unpin,
{
    type Data = RB::Data;
    type Error = RB::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B, RB> Service<http::Request<B>> for LoadShed<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<HeldBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = ConnInfo::of(&req).map(ConnInfo::request_started);
        let hold = move |permit, r: http::Response<RB>| {
            r.map(|inner| HeldBody {
                inner,
                _permit: permit,
                _open: open,
            })
        };
        if req.uri().path().starts_with("/grpc.health.v1.Health/") {
            let fut = self.inner.call(req);
            return Box::pin(async move { fut.await.map(|r| hold(None, r)) });
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = self.inner.call(req);
                Box::pin(async move { fut.await.map(|r| hold(Some(permit), r)) })
            }
            Err(_) => {
                tracing::debug!(path = req.uri().path(), "overloaded: request shed");
                let status = Status::unavailable(format!(
                    "server overloaded: {} requests already in progress \
                     (limits.max_concurrent_requests); retry later",
                    self.max
                ));
                Box::pin(async move { Ok(hold(None, status.into_http())) })
            }
        }
    }
}

/// Rewrites decode failures of requests as INVALID_ARGUMENT.
#[derive(Clone, Copy, Default)]
pub struct DecodeErrorLayer;

impl<S> Layer<S> for DecodeErrorLayer {
    type Service = DecodeErrors<S>;
    fn layer(&self, inner: S) -> DecodeErrors<S> {
        DecodeErrors { inner }
    }
}

/// See [`DecodeErrorLayer`].
#[derive(Clone)]
pub struct DecodeErrors<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for DecodeErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            // A unary call that fails to decode is answered "trailers only":
            // its status is in the response headers.
            if let Some(status) = Status::from_header_map(resp.headers()) {
                if let Some(clear) = clarify_decode_error(&status) {
                    let headers = resp.headers_mut();
                    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                        headers.remove(h);
                    }
                    let _ = clear.add_header(headers);
                }
            }
            Ok(resp)
        })
    }
}

/// The INVALID_ARGUMENT that replaces a transport or decode error of a
/// request, or None when `status` is not one. Also used for the messages of
/// a StreamEvents stream, whose errors arrive after the headers.
pub fn clarify_decode_error(status: &Status) -> Option<Status> {
    let msg = status.message();
    let error = match status.code() {
        Code::Internal => {
            if let Some(rest) = msg.strip_prefix("failed to decode Protobuf message: ") {
                decode_error(rest)
            } else if msg == "Missing request message." {
                Error::invalid("request", "is missing: the call carried no message")
            } else {
                return None;
            }
        }
        Code::OutOfRange | Code::ResourceExhausted => {
            let rest = msg.strip_prefix("Error, decoded message length too large: ")?;
            Error::invalid(
                "request",
                format!("is too large: {rest} (limits.max_request_bytes)"),
            )
        }
        _ => return None,
    };
    Some(error.into())
}

/// prost's error text is `Msg.field: ` pairs, innermost first, then the
/// reason. The field path is read outermost first and stops at the first
/// `google.protobuf.Struct`/`Value`/`ListValue`, whose internals mean
/// nothing to a client (`events.data`, `webhook.name`).
fn decode_error(rest: &str) -> Error {
    let parts: Vec<&str> = rest.split(": ").collect();
    let is_frame = |p: &str| {
        p.split_once('.').is_some_and(|(m, f)| {
            !m.is_empty()
                && !f.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
    };
    let frames = parts.iter().take_while(|p| is_frame(p)).count();
    let (stack, reason) = parts.split_at(frames);
    let reason = reason.join(": ");
    let mut path = Vec::new();
    for frame in stack.iter().rev() {
        let Some((message, field)) = frame.split_once('.') else {
            break;
        };
        if matches!(message, "Struct" | "Value" | "ListValue") {
            break;
        }
        path.push(field);
    }
    let field = if path.is_empty() {
        "request".to_string()
    } else {
        path.join(".")
    };
    let reason = if reason.contains("recursion limit") {
        format!(
            "is nested too deeply: the decoder allows 100 message levels, \
             {MAX_DATA_NESTING} levels of objects in an event's data"
        )
    } else {
        format!("cannot be decoded: {reason}")
    };
    Error::invalid(field, reason)
}

/// How deep objects may nest inside an event's `data` (`{"a":{"a":…}}`,
/// `data` itself being level 1) before prost's recursion limit (100 message
/// levels; each object level is a Value, a Struct and a map entry) stops
/// decoding a PublishEvents request. Lists cost two levels each, so they can
/// nest a little deeper. Checked exactly by `tests/hostile.rs`.
pub const MAX_DATA_NESTING: usize = 33;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_become_invalid_argument_with_the_field() {
        let s = Status::internal(
            "failed to decode Protobuf message: Value.kind: Struct.fields: Value.kind: \
             Struct.fields: Event.data: PublishEventsRequest.events: recursion limit reached",
        );
        let c = clarify_decode_error(&s).unwrap();
        assert_eq!(c.code(), Code::InvalidArgument);
        assert!(
            c.message().starts_with("events.data: is nested too deeply"),
            "{}",
            c.message()
        );
        let s = Status::internal(
            "failed to decode Protobuf message: Webhook.name: CreateWebhookRequest.webhook: \
             invalid string value: data is not UTF-8 encoded",
        );
        let c = clarify_decode_error(&s).unwrap();
        assert_eq!(
            c.message(),
            "webhook.name: cannot be decoded: invalid string value: data is not UTF-8 encoded"
        );
        let s = Status::out_of_range(
            "Error, decoded message length too large: found 20 bytes, the limit is: 10 bytes",
        );
        let c = clarify_decode_error(&s).unwrap();
        assert_eq!(c.code(), Code::InvalidArgument);
        assert!(c
            .message()
            .starts_with("request: is too large: found 20 bytes"));
        assert!(clarify_decode_error(&Status::internal("internal error")).is_none());
        assert!(clarify_decode_error(&Status::not_found("x")).is_none());
    }
}
