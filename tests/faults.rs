//! Listener faults, one test each: the failing webhook's lane retries on the
//! configured backoff, every attempt's error text is in ListDeliveries, and a
//! healthy webhook of the same account keeps getting its events promptly.
//! Faults are scripted on raw loopback TCP (and TLS) listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whole-request timeout used here, so the timeout faults stay short.
const REQUEST_TIMEOUT_MS: u64 = 1_000;
const RETRY_INITIAL_MS: u64 = 200;
const RETRY_MAX_MS: u64 = 1_000;

type Handler = Arc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A loopback TCP server running `handler` on every connection.
struct FaultServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultServer {
    async fn start(handler: Handler) -> FaultServer {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = tcp.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        FaultServer {
            addr,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request (headers and a Content-Length body).
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(buf);
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What one fault case expects and measured.
struct Case {
    /// Substrings every failed attempt's error must contain (lower case).
    error_contains: &'static [&'static str],
    /// Status code every failed attempt must show (0: no response).
    status: u32,
}

async fn failing_delivery(admin: &mut Admin, webhook_id: &str, attempts: usize) -> Delivery {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ds = deliveries(admin, webhook_id).await;
        if let Some(d) = ds.iter().find(|d| d.attempts.len() >= attempts) {
            return d.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no delivery with {attempts} attempts: {ds:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attempt_ms(a: &DeliveryAttempt) -> i64 {
    let t = a.attempt_time.as_ref().unwrap();
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Runs one fault: a webhook at `fault_url` and a healthy one in the same
/// account; checks retries, error texts and the healthy webhook's latency.
async fn run_case(name: &str, fault_url: &str, case: Case) -> Delivery {
    let (_dir, _server, mut admin, mut ingest) = setup_with(|c| {
        c.delivery.request_timeout_ms = REQUEST_TIMEOUT_MS;
        c.delivery.retry_initial_ms = RETRY_INITIAL_MS;
        c.delivery.retry_max_interval_ms = RETRY_MAX_MS;
    })
    .await;
    let healthy = Listener::ok().await;
    let faulty = create(
        &mut admin,
        1010,
        webhook(name, fault_url, &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    create(
        &mut admin,
        1010,
        webhook("healthy", &healthy.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;

    let t0 = Instant::now();
    publish(
        &mut ingest,
        1010,
        vec![event("f-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    healthy.wait_events(1, Duration::from_secs(5)).await;
    let first_latency = t0.elapsed();

    let d = failing_delivery(&mut admin, &faulty.id, 3).await;
    // The healthy webhook is not held back while the other one retries.
    let t1 = Instant::now();
    publish(
        &mut ingest,
        1010,
        vec![event("f-2", "COURSE_ENROLLMENT", 2)],
    )
    .await;
    let ids = healthy.wait_events(2, Duration::from_secs(5)).await;
    let second_latency = t1.elapsed();
    assert_eq!(ids, ["f-1", "f-2"], "{name}: healthy webhook's events");
    assert!(
        first_latency < Duration::from_millis(800) && second_latency < Duration::from_millis(800),
        "{name}: healthy webhook delayed: {first_latency:?}, {second_latency:?}"
    );

    assert_eq!(d.event_ids, ["f-1"]);
    assert_eq!(d.state, DeliveryState::Retrying as i32, "{name}: {d:?}");
    for (i, a) in d.attempts.iter().enumerate() {
        let e = a.error.to_lowercase();
        for want in case.error_contains {
            assert!(
                e.contains(want),
                "{name}: attempt {i} error {:?} lacks {want:?}",
                a.error
            );
        }
        assert_eq!(a.status_code, case.status, "{name}: attempt {i}");
    }
    // Backoff: the wait after failure k is retry_initial·2^(k-1) ± 20%,
    // capped; the pause between attempts must match it.
    for k in 1..d.attempts.len() {
        let prev = &d.attempts[k - 1];
        let gap = attempt_ms(&d.attempts[k]) - attempt_ms(prev) - i64::from(prev.latency_ms);
        let want = (RETRY_INITIAL_MS << (k - 1)).min(RETRY_MAX_MS) as i64;
        assert!(
            gap >= want * 8 / 10 - 5 && gap <= want * 12 / 10 + 300,
            "{name}: pause before attempt {} was {gap} ms; policy says {want} ms ± 20%",
            k + 1
        );
    }
    println!(
        "{name}: {} attempts, first error {:?}, latencies {:?} ms; healthy webhook got its events in {first_latency:?} and {second_latency:?}",
        d.attempts.len(),
        d.attempts[0].error,
        d.attempts.iter().map(|a| a.latency_ms).collect::<Vec<_>>()
    );
    d
}

#[tokio::test]
async fn connection_refused() {
    // A port that was just free: nothing listens on it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    run_case(
        "refused",
        &format!("http://127.0.0.1:{port}/hook"),
        Case {
            error_contains: &["connect failed", "refused"],
            status: 0,
        },
    )
    .await;
}

#[tokio::test]
async fn accept_then_never_answer_times_out() {
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let keep = held.clone();
    let server = FaultServer::start(Arc::new(move |mut s| {
        let keep = keep.clone();
        Box::pin(async move {
            let _ = read_request(&mut s).await;
            keep.lock().unwrap().push(s);
        })
    }))
    .await;
    let d = run_case(
        "silent",
        &server.url(),
        Case {
            error_contains: &["timed out"],
            status: 0,
        },
    )
    .await;
    for a in &d.attempts {
        let ms = u64::from(a.latency_ms);
        assert!(
            (REQUEST_TIMEOUT_MS - 50..REQUEST_TIMEOUT_MS + 500).contains(&ms),
            "attempt took {ms} ms; the timeout is {REQUEST_TIMEOUT_MS} ms"
        );
    }
}

#[tokio::test]
async fn reset_mid_response() {
    let server = FaultServer::start(Arc::new(|mut s| {
        Box::pin(async move {
            if read_request(&mut s).await.is_some() {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Ty").await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Abortive close: the peer gets a TCP RST.
                let _ = s.set_zero_linger();
                drop(s);
            }
        })
    }))
    .await;
    run_case(
        "reset",
        &server.url(),
        Case {
            error_contains: &["request failed", "reset"],
            status: 0,
        },
    )
    .await;
}

#[tokio::test]
async fn body_trickle_is_cut_by_the_request_timeout() {
    let server = FaultServer::start(Arc::new(|mut s| {
        Box::pin(async move {
            if read_request(&mut s).await.is_some() {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    .await;
                for _ in 0..100_000 {
                    if s.write_all(b"x").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    }))
    .await;
    let d = run_case(
        "trickle",
        &server.url(),
        Case {
            error_contains: &["timed out"],
            status: 0,
        },
    )
    .await;
    assert!(d
        .attempts
        .iter()
        .all(|a| u64::from(a.latency_ms) < REQUEST_TIMEOUT_MS + 500));
}

/// Resident memory of this process (the router runs in it), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn huge_response_body_is_read_only_up_to_the_cap() {
    const ANNOUNCED: u64 = 1 << 30;
    let written: Arc<Mutex<Vec<u64>>> = Arc::default();
    let log = written.clone();
    let server = FaultServer::start(Arc::new(move |mut s| {
        let log = log.clone();
        Box::pin(async move {
            if read_request(&mut s).await.is_some() {
                let head = format!(
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {ANNOUNCED}\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                let block = vec![b'z'; 64 * 1024];
                let mut sent = 0u64;
                while sent < ANNOUNCED {
                    if s.write_all(&block).await.is_err() {
                        break;
                    }
                    sent += block.len() as u64;
                }
                log.lock().unwrap().push(sent);
            }
        })
    }))
    .await;
    let rss_before = rss_kib();
    let d = run_case(
        "huge",
        &server.url(),
        Case {
            error_contains: &["http 500"],
            status: 500,
        },
    )
    .await;
    let rss_after = rss_kib();
    // Each attempt ends once the cap (64 KiB) is read, not after 1 GiB.
    for a in &d.attempts {
        assert!(a.latency_ms < 500, "attempt took {} ms", a.latency_ms);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = written.lock().unwrap().clone();
    assert!(
        sent.len() >= 3,
        "connections that finished writing: {sent:?}"
    );
    for s in &sent {
        assert!(
            *s < 32 << 20,
            "the listener could push {s} bytes before the router hung up"
        );
    }
    let growth = rss_after.saturating_sub(rss_before);
    println!(
        "huge body: bytes written per attempt before the router closed: {sent:?}; RSS {rss_before} → {rss_after} KiB"
    );
    // Process-wide (other tests run alongside), so only a coarse bound: three
    // attempts reading the announced 1 GiB each would be far above it.
    assert!(growth < 256 * 1024, "RSS grew by {growth} KiB");
}

#[tokio::test]
async fn redirect_is_not_followed_and_counts_as_failure() {
    let elsewhere = FaultServer::start(Arc::new(|_s| Box::pin(async {}))).await;
    let location = elsewhere.url();
    let server = FaultServer::start(Arc::new(move |mut s| {
        let location = location.clone();
        Box::pin(async move {
            while read_request(&mut s).await.is_some() {
                let resp = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        })
    }))
    .await;
    run_case(
        "redirect",
        &server.url(),
        Case {
            error_contains: &["http 302", "redirect not followed", "127.0.0.1"],
            status: 302,
        },
    )
    .await;
    assert_eq!(
        elsewhere.connections.load(Ordering::SeqCst),
        0,
        "the redirect target was contacted"
    );
}

#[tokio::test]
async fn invalid_http_answer() {
    let server = FaultServer::start(Arc::new(|mut s| {
        Box::pin(async move {
            if read_request(&mut s).await.is_some() {
                let _ = s.write_all(b"SMTP READY\r\n\r\n\0\0garbage").await;
                let _ = s.shutdown().await;
            }
        })
    }))
    .await;
    run_case(
        "garbage",
        &server.url(),
        Case {
            error_contains: &["request failed", "invalid"],
            status: 0,
        },
    )
    .await;
}

#[tokio::test]
async fn tls_target_with_untrusted_certificate() {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let handshakes_ok = Arc::new(AtomicUsize::new(0));
    let ok = handshakes_ok.clone();
    let server = FaultServer::start(Arc::new(move |s| {
        let acceptor = acceptor.clone();
        let ok = ok.clone();
        Box::pin(async move {
            if let Ok(mut tls) = acceptor.accept(s).await {
                ok.fetch_add(1, Ordering::SeqCst);
                if read_request(&mut tls).await.is_some() {
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                }
            }
        })
    }))
    .await;
    run_case(
        "untrusted-tls",
        &format!("https://{}/hook", server.addr),
        Case {
            error_contains: &["connect failed", "certificate"],
            status: 0,
        },
    )
    .await;
    assert!(server.connections.load(Ordering::SeqCst) >= 3);
    assert_eq!(
        handshakes_ok.load(Ordering::SeqCst),
        0,
        "a TLS session was established with an untrusted certificate"
    );
}
