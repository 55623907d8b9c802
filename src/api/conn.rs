//! Accepted gRPC connections. Each one gets TCP_NODELAY (a response's frames
//! go out at once instead of waiting for the client's delayed ACK; measured:
//! ~40 ms per unary call without) and a count of the requests open on it,
//! shared with the request layers through [`ConnInfo`] in each request's
//! extensions. A connection with no request open for
//! `limits.connection_idle_timeout_ms` is closed: once nothing is left to
//! read, its reads end as if the peer had hung up, so idle and forgotten
//! connections cannot pile up. The close is a plain TCP close, not an HTTP/2
//! GOAWAY: a request the client sends while the close is on its way (a
//! network round trip) fails with UNAVAILABLE or CANCELLED and is safe to
//! retry, as nothing of it was read.
//! (HTTP/2 keepalive pings, which find peers that are gone, are set on the
//! server itself.)

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

#[derive(Debug)]
struct Activity {
    /// Requests open on the connection.
    open: AtomicUsize,
    /// When the last request ended (or the connection opened), as ms after `epoch`.
    idle_since_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }
}

/// What request layers learn about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    activity: Arc<Activity>,
}

impl ConnInfo {
    /// Counts a request as open on its connection until the guard is dropped.
    pub fn request_started(&self) -> RequestGuard {
        self.activity.open.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            activity: self.activity.clone(),
        }
    }

    /// The info of a request, with or without TLS.
    pub fn of<B>(req: &http::Request<B>) -> Option<&ConnInfo> {
        let ext = req.extensions();
        ext.get::<ConnInfo>().or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>()
                .map(|t| t.get_ref())
        })
    }
}

/// See [`ConnInfo::request_started`].
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        if a.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = a.epoch.elapsed().as_millis() as u64;
            a.idle_since_ms.store(ms, Ordering::Release);
        }
    }
}

/// An accepted connection; see the module doc.
pub struct Conn {
    stream: TcpStream,
    info: ConnInfo,
    idle_timeout: Option<Duration>,
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, idle_timeout: Option<Duration>) -> Conn {
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        Conn {
            info: ConnInfo {
                remote_addr: stream.peer_addr().ok(),
                activity: Arc::new(Activity {
                    open: AtomicUsize::new(0),
                    idle_since_ms: AtomicU64::new(0),
                    epoch: now,
                }),
            },
            stream,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(now)),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Bytes that have arrived are always read first: a request sent just
        // as the timeout expires is served, not cut off.
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        if let Some(timeout) = this.idle_timeout {
            if this.info.activity.open.load(Ordering::Acquire) == 0 {
                let deadline = this.info.activity.idle_since() + timeout;
                if Instant::now() >= deadline {
                    // Reads as the peer hanging up: the server closes it.
                    return Poll::Ready(Ok(()));
                }
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                // Wakes this read when the connection has been idle long enough.
                if this.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Poll::Pending
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections accepted on `listener`. `idle_timeout` None keeps idle
/// connections open. An accept error (out of file descriptors, say) is
/// logged and retried after a pause instead of ending the stream or spinning.
pub fn incoming(
    listener: TcpListener,
    idle_timeout: Option<Duration>,
) -> impl Stream<Item = io::Result<Conn>> {
    futures::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => return Some((Ok(Conn::new(stream, idle_timeout)), listener)),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}
