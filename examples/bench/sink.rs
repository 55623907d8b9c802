//! The HTTP sink the router delivers to: a hyper HTTP/1.1 server on
//! 127.0.0.1 that answers 204 at once and records, per webhook (URL path
//! `/w/<n>`), which event numbers arrived, how many requests it took and, for
//! the latency scenario, publish-to-receive times.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What one webhook received.
pub struct Track {
    /// `seen[n]`: event `e<n>` arrived at least once.
    seen: Vec<bool>,
    /// Distinct events received.
    distinct: u64,
    /// Events received again.
    duplicates: u64,
}

/// Shared between the server task and the scenario.
pub struct Sink {
    pub addr: SocketAddr,
    tracks: Vec<Mutex<Track>>,
    pub requests: AtomicU64,
    pub events: AtomicU64,
    /// Nanoseconds since `epoch` of the first and last request.
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    pub epoch: Instant,
    /// When true, requests are answered 503 (listener "down" but reachable).
    pub refuse: AtomicBool,
    /// Publish-to-receive latencies in µs, when events carry a send time.
    pub latencies_us: Mutex<Vec<u64>>,
}

impl Sink {
    /// Starts a sink expecting events `e0..e<n>` on `webhooks` paths.
    pub async fn start(webhooks: usize, n: u64, epoch: Instant) -> Arc<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        Self::serve(listener, webhooks, n, epoch)
    }

    /// Like [`Sink::start`] on a listener the caller bound.
    pub fn serve(listener: TcpListener, webhooks: usize, n: u64, epoch: Instant) -> Arc<Sink> {
        let sink = Arc::new(Sink {
            addr: listener.local_addr().expect("sink addr"),
            tracks: (0..webhooks)
                .map(|_| {
                    Mutex::new(Track {
                        seen: vec![false; n as usize],
                        distinct: 0,
                        duplicates: 0,
                    })
                })
                .collect(),
            requests: AtomicU64::new(0),
            events: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            epoch,
            refuse: AtomicBool::new(false),
            latencies_us: Mutex::new(Vec::new()),
        });
        let s = sink.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, hyper::Error>(s.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        sink
    }

    /// The URL of webhook `i`.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}/w/{i}", self.addr)
    }

    async fn handle(&self, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
        let status = |code: u16| {
            hyper::Response::builder()
                .status(code)
                .body(Full::new(Bytes::new()))
                .expect("response")
        };
        let track: Option<usize> = req
            .uri()
            .path()
            .strip_prefix("/w/")
            .and_then(|s| s.parse().ok());
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return status(400);
        };
        if self.refuse.load(Ordering::Relaxed) {
            return status(503);
        }
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        self.first_ns.fetch_min(now_ns, Ordering::Relaxed);
        self.last_ns.fetch_max(now_ns, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut numbers = Vec::new();
        let mut sent_ns = Vec::new();
        scan_events(&body, &mut numbers, &mut sent_ns);
        self.events
            .fetch_add(numbers.len() as u64, Ordering::Relaxed);
        if let Some(t) = track.and_then(|i| self.tracks.get(i)) {
            let mut t = t.lock().expect("track");
            for n in numbers {
                match t.seen.get_mut(n as usize) {
                    Some(seen) if *seen => t.duplicates += 1,
                    Some(seen) => {
                        *seen = true;
                        t.distinct += 1;
                    }
                    None => t.duplicates += 1,
                }
            }
        }
        if !sent_ns.is_empty() {
            let mut l = self.latencies_us.lock().expect("latencies");
            l.extend(sent_ns.iter().map(|s| now_ns.saturating_sub(*s) / 1000));
        }
        status(204)
    }

    /// Distinct events received by every webhook together.
    pub fn distinct(&self) -> u64 {
        self.tracks
            .iter()
            .map(|t| t.lock().expect("track").distinct)
            .sum()
    }

    /// Events received more than once, all webhooks.
    pub fn duplicates(&self) -> u64 {
        self.tracks
            .iter()
            .map(|t| t.lock().expect("track").duplicates)
            .sum()
    }

    /// Waits until every webhook has every event, or `timeout` passes.
    /// Returns true when complete.
    pub async fn wait_complete(&self, expected_each: u64, timeout: Duration) -> bool {
        let want = expected_each * self.tracks.len() as u64;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.distinct() >= want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.distinct() >= want
    }

    /// Time from `epoch` to the first and to the last counted request.
    pub fn first_last(&self) -> (Duration, Duration) {
        (
            Duration::from_nanos(self.first_ns.load(Ordering::Relaxed)),
            Duration::from_nanos(self.last_ns.load(Ordering::Relaxed)),
        )
    }
}

/// Finds each `{"eventId":"e<n>"` in a payload and, when the event's data
/// has `"sentNs":<t>`, that time. A byte scan: the sink must stay cheap, as
/// it shares the machine with the router.
fn scan_events(body: &[u8], numbers: &mut Vec<u64>, sent_ns: &mut Vec<u64>) {
    const ID: &[u8] = b"{\"eventId\":\"e";
    const SENT: &[u8] = b"\"sentNs\":";
    let mut i = 0;
    while let Some(p) = find(&body[i..], ID) {
        let start = i + p + ID.len();
        let (n, len) = parse_u64(&body[start..]);
        numbers.push(n);
        i = start + len;
        // The next event starts after this one's data; look for a send time before it.
        let end = find(&body[i..], ID).map_or(body.len(), |q| i + q);
        if let Some(q) = find(&body[i..end], SENT) {
            let (t, _) = parse_u64(&body[i + q + SENT.len()..]);
            sent_ns.push(t);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

fn parse_u64(b: &[u8]) -> (u64, usize) {
    let mut n = 0u64;
    let mut len = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        n = n * 10 + u64::from(c - b'0');
        len += 1;
    }
    (n, len)
}

#[cfg(test)]
mod tests {
    #[test]
    fn scans_ids_and_send_times() {
        let body = br#"{"accountId":1,"events":[{"eventId":"e12","data":{"sentNs":500}},{"eventId":"e13","data":{"x":1}}]}"#;
        let (mut n, mut t) = (Vec::new(), Vec::new());
        super::scan_events(body, &mut n, &mut t);
        assert_eq!(n, vec![12, 13]);
        assert_eq!(t, vec![500]);
    }
}
