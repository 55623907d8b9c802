//! Reproducible benchmark of the router: a real router process on a temp
//! data folder, an HTTP sink on loopback and a gRPC load generator, one
//! scenario per run. See docs/benchmarks.md for the method and the results.
//!
//! ```text
//! cargo run --release --example bench -- ingest     [--events N] [--backend postgres [--routers N]]
//! cargo run --release --example bench -- fanout     [--events N] [--backend postgres [--routers N]]
//! cargo run --release --example bench -- requests   [--events N] [--backend postgres [--routers N]]
//! cargo run --release --example bench -- latency    [--seconds S] [--rate R]
//! cargo run --release --example bench -- backlog    [--events N]
//! cargo run --release --example bench -- peer       [--calls N] [--callers C] [--in-flight K]
//! cargo run --release --example bench -- all
//! cargo run --example bench -- smoke                (small N; fails unless every event arrives)
//! ```

mod cluster;
mod peer;
mod router;
mod sample;
mod sink;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use prost_types::{value::Kind, Value};
use router::{base_config, Router};
use sink::Sink;
use webhook_router::proto::v1 as pb;

// sled allocates per key; mimalloc measured faster than the system allocator (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "webhook-router benchmark")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Durable PublishEvents throughput, and the raw append ceiling of the backend.
    Ingest {
        #[arg(long, default_value_t = 400_000)]
        events: u64,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// One account, 5 webhooks on the same event type.
    Fanout {
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// One event per payload, 5 webhooks: HTTP requests/s, and a plain load generator.
    Requests {
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// A steady rate to one webhook: publish-to-receive percentiles.
    Latency {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
    },
    /// Listener down while events queue; then drain; then restart.
    Backlog {
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// One-event calls from many callers, end to end, beside a raw gRPC ceiling.
    Peer {
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
        #[arg(long, default_value_t = 64)]
        callers: usize,
        /// One event per HTTP request, this many in flight (`max_in_flight`);
        /// 0: default payload batching, one request at a time.
        #[arg(long, default_value_t = 0)]
        in_flight: u32,
    },
    /// Every scenario at its default size.
    All,
    /// Every scenario at a small size; exits non-zero unless every event arrived.
    Smoke,
    /// Internal: run the router (the child process).
    #[command(name = "__router", hide = true)]
    Router { config: std::path::PathBuf },
}

/// Where the routers keep their state.
#[derive(clap::Args, Clone, Copy)]
struct BackendArgs {
    /// `sled` (one router, embedded) or `postgres` (see cluster.rs).
    #[arg(long, value_enum, default_value_t = BackendKind::Sled)]
    backend: BackendKind,
    /// Routers sharing the database (postgres only).
    #[arg(long, default_value_t = 1)]
    routers: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum BackendKind {
    Sled,
    Postgres,
}

/// Publishing clients (separate HTTP/2 connections).
const CLIENTS: usize = 4;
/// Events per PublishEvents request.
const PER_REQUEST: u64 = 100;
/// The subscribed event type.
const TYPE: &str = "COURSE_ENROLLMENT";
const ACCOUNT: u64 = 1010;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Scenario::Router { config } = &cli.scenario {
        return router::child_main(config);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ok = rt.block_on(async move {
        match cli.scenario {
            Scenario::Ingest { events, backend } if backend.backend == BackendKind::Postgres => {
                cluster::ingest(events, backend.routers).await
            }
            Scenario::Fanout { events, backend } if backend.backend == BackendKind::Postgres => {
                cluster::deliver(events, backend.routers, 100).await
            }
            Scenario::Requests { events, backend } if backend.backend == BackendKind::Postgres => {
                cluster::deliver(events, backend.routers, 1).await
            }
            Scenario::Ingest { events, .. } => ingest(events).await,
            Scenario::Fanout { events, .. } => fanout(events).await,
            Scenario::Requests { events, .. } => requests(events).await,
            Scenario::Latency { seconds, rate } => latency(seconds, rate).await,
            Scenario::Backlog { events } => backlog(events).await,
            Scenario::Peer {
                calls,
                callers,
                in_flight,
            } => peer(calls, callers, in_flight).await,
            Scenario::All => {
                let mut ok = ingest(400_000).await;
                ok &= fanout(100_000).await;
                ok &= requests(20_000).await;
                ok &= latency(30, 1_000).await;
                ok &= backlog(1_000_000).await;
                ok &= peer(20_000, 64, 0).await;
                ok &= peer(20_000, 16, 0).await;
                ok &= peer(20_000, 64, 64).await;
                ok
            }
            Scenario::Smoke => {
                println!(
                    "smoke run: small N, to check that every scenario completes and \
                     delivers every event; its figures are not benchmark results"
                );
                let mut ok = ingest(4_000).await;
                ok &= fanout(2_000).await;
                ok &= requests(500).await;
                ok &= latency(2, 200).await;
                ok &= backlog(5_000).await;
                ok &= peer(500, 16, 0).await;
                ok &= peer(500, 16, 16).await;
                ok
            }
            Scenario::Router { .. } => unreachable!("handled above"),
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("FAILED: not every event was delivered");
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------- scenarios

async fn ingest(n: u64) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::start(&base_config(&dir.path().join("data"))).await;
    let cpu0 = router.cpu();
    let took = publish(&router, n, PER_REQUEST, CLIENTS).await;
    let rate = n as f64 / took.as_secs_f64();
    let cpu = router.cpu().saturating_sub(cpu0);
    drop(router);
    // The ceiling is durable the way the router is: a sled flush, then a
    // real fsync of what sled wrote (store::DiskSync), per batch.
    let (raw_took, raw_bytes) = raw_sled(n, &dir.path().join("raw"), 1, true);
    let raw = n as f64 / raw_took.as_secs_f64();
    // sled's flush alone (sync_file_range: not durable against power loss),
    // the ceiling this benchmark used before the router fsynced.
    let (flush_took, _) = raw_sled(n, &dir.path().join("raw-flush"), 1, false);
    let flush_only = n as f64 / flush_took.as_secs_f64();
    // The router stores a request's events as one value per ~16 KiB; the
    // same layout with nothing else shows what sled allows for it.
    let (packed_took, _) = raw_sled(n, &dir.path().join("raw-packed"), PER_REQUEST, true);
    let packed = n as f64 / packed_took.as_secs_f64();
    table(
        &format!("ingest: {n} events, {PER_REQUEST}/request, {CLIENTS} clients, ~300-byte data"),
        &[
            row(
                "router: durable events/s",
                fmt_rate(rate),
                ">= 25,000",
                rate >= 25_000.0,
            ),
            row(
                "raw sled ceiling (one key per event, fsynced): events/s",
                fmt_rate(raw),
                "",
                true,
            ),
            row(
                "raw sled, flush without fsync: events/s",
                fmt_rate(flush_only),
                "",
                true,
            ),
            row(
                "router / raw without fsync",
                format!("{:.0}%", 100.0 * rate / flush_only),
                "",
                true,
            ),
            row(
                "router / raw",
                format!("{:.0}%", 100.0 * rate / raw),
                ">= 60%",
                rate / raw >= 0.6,
            ),
            row(
                "raw sled, one value per 100 events, fsynced: events/s",
                fmt_rate(packed),
                "",
                true,
            ),
            row(
                "router / raw one value per 100",
                format!("{:.0}%", 100.0 * rate / packed),
                "",
                true,
            ),
            row("raw record size", format!("{raw_bytes} B"), "", true),
            row("router CPU per event", fmt_us(cpu, n), "", true),
        ],
    );
    true
}

async fn fanout(n: u64) -> bool {
    const WEBHOOKS: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch = Instant::now();
    let sink = Sink::start(WEBHOOKS, n, epoch).await;
    let router = Router::start(&base_config(&dir.path().join("data"))).await;
    create_webhooks(&router, &sink, WEBHOOKS).await;
    let cpu0 = router.cpu();
    let start = epoch.elapsed();
    let took = publish(&router, n, PER_REQUEST, CLIENTS).await;
    let ingest_rate = n as f64 / took.as_secs_f64();
    let complete = sink.wait_complete(n, Duration::from_secs(600)).await;
    let cpu = router.cpu().saturating_sub(cpu0);
    let (_, last) = sink.first_last();
    let span = last.saturating_sub(start);
    let delivered = sink.distinct() as f64 / span.as_secs_f64();
    let ratio = delivered / (WEBHOOKS as f64 * ingest_rate);
    table(
        &format!("fanout: {n} events x {WEBHOOKS} webhooks (same type), signed, up to 100 events/payload"),
        &[
            row("ingest events/s (this run)", fmt_rate(ingest_rate), "", true),
            row("delivered events/s, all webhooks", fmt_rate(delivered), "", true),
            row(
                "delivered / (5 x ingest)",
                format!("{:.0}%", 100.0 * ratio),
                ">= 90%",
                ratio >= 0.9,
            ),
            row("publish time", fmt_dur(took), "", true),
            row("time until last delivery", fmt_dur(span), "", true),
            row("HTTP requests", sink.requests.load(Ordering::Relaxed).to_string(), "", true),
            row("router CPU per delivered event", fmt_us(cpu, n * WEBHOOKS as u64), "", true),
            row("duplicates", sink.duplicates().to_string(), "", true),
            completeness(&sink, n * WEBHOOKS as u64),
        ],
    );
    complete
}

async fn requests(n: u64) -> bool {
    const WEBHOOKS: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch = Instant::now();
    let sink = Sink::start(WEBHOOKS, n, epoch).await;
    let mut config = base_config(&dir.path().join("data"));
    config.delivery.max_events_per_payload = 1;
    let router = Router::start(&config).await;
    create_webhooks(&router, &sink, WEBHOOKS).await;
    let cpu0 = router.cpu();
    publish(&router, n, PER_REQUEST, CLIENTS).await;
    let complete = sink.wait_complete(n, Duration::from_secs(600)).await;
    let cpu = router.cpu().saturating_sub(cpu0);
    let (first, last) = sink.first_last();
    let reqs = sink.requests.load(Ordering::Relaxed);
    let rate = reqs as f64 / last.saturating_sub(first).as_secs_f64();
    drop(router);

    // The same sink, a plain client: hyper HTTP/1.1, one keep-alive
    // connection per webhook, one request at a time on each (as a lane does),
    // a body of the same size.
    let plain_sink = Sink::start(0, 0, Instant::now()).await;
    let body = bytes::Bytes::from(webhook_router::domain::event::render_payload(
        ACCOUNT,
        [sample_event_json(0).as_str()],
    ));
    let plain_took = plain_load(&plain_sink, WEBHOOKS, reqs, body.clone()).await;
    let plain = reqs as f64 / plain_took.as_secs_f64();
    // The client library the router sends with, configured as the router
    // configures it, with the same concurrency.
    let reqwest_sink = Sink::start(0, 0, Instant::now()).await;
    let reqwest_took = reqwest_load(&reqwest_sink, WEBHOOKS, reqs, body).await;
    let reqwest_rate = reqs as f64 / reqwest_took.as_secs_f64();
    table(
        &format!("requests: {n} events x {WEBHOOKS} webhooks, 1 event/payload, signed"),
        &[
            row(
                "router: HTTP requests/s delivered",
                fmt_rate(rate),
                "",
                true,
            ),
            row(
                "plain hyper client, 5 connections: requests/s",
                fmt_rate(plain),
                "",
                true,
            ),
            row(
                "router / plain",
                format!("{:.0}%", 100.0 * rate / plain),
                ">= 50%",
                rate / plain >= 0.5,
            ),
            row(
                "reqwest as the router configures it, 5 tasks: requests/s",
                format!(
                    "{} ({:.0}% of plain hyper)",
                    fmt_rate(reqwest_rate),
                    100.0 * reqwest_rate / plain
                ),
                "",
                true,
            ),
            row("router CPU per request", fmt_us(cpu, reqs), "", true),
            row("duplicates", sink.duplicates().to_string(), "", true),
            completeness(&sink, n * WEBHOOKS as u64),
        ],
    );
    complete
}

async fn latency(seconds: u64, rate: u64) -> bool {
    let n = seconds * rate;
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch = Instant::now();
    let sink = Sink::start(1, n, epoch).await;
    let router = Router::start(&base_config(&dir.path().join("data"))).await;
    create_webhooks(&router, &sink, 1).await;
    let acks = publish_steady(&router, n, rate, epoch).await;
    let complete = sink.wait_complete(n, Duration::from_secs(60)).await;
    let mut lat = sink.latencies_us.lock().expect("latencies").clone();
    lat.sort_unstable();
    let mut acks = acks;
    acks.sort_unstable();
    let p = percentile;
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    table(
        &format!("latency: {rate} events/s for {seconds} s, 1 event/request, 1 webhook, signed"),
        &[
            row(
                "publish-to-receive p50",
                ms(p(&lat, 0.5)),
                "<= 2 ms",
                p(&lat, 0.5) <= 2_000,
            ),
            row(
                "publish-to-receive p99",
                ms(p(&lat, 0.99)),
                "<= 10 ms",
                p(&lat, 0.99) <= 10_000,
            ),
            row("publish-to-receive p99.9", ms(p(&lat, 0.999)), "", true),
            row(
                "publish-to-receive max",
                ms(lat.last().copied().unwrap_or(0)),
                "",
                true,
            ),
            ack_row(&acks),
            requests_row(&sink),
            completeness(&sink, n),
        ],
    );
    complete
}

async fn backlog(n: u64) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch = Instant::now();
    // Reserve the sink's port, then close it: the listener is down (connection refused).
    let port_holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let sink_addr = port_holder.local_addr().expect("addr");
    drop(port_holder);
    let data = dir.path().join("data");
    let router = Router::start(&base_config(&data)).await;
    {
        let mut admin = router.admin().await;
        let url = format!("http://{sink_addr}/w/0");
        create_webhook(&mut admin, &url, 0).await;
    }
    let took = publish(&router, n, PER_REQUEST, CLIENTS).await;
    // Let the periodic flush and the lane settle before measuring the folder.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_queued = router.peak_rss();
    let bytes = dir_size(&data);
    let listener = tokio::net::TcpListener::bind(sink_addr)
        .await
        .expect("rebind sink");
    let up = epoch.elapsed();
    let sink = Sink::serve(listener, 1, n, epoch);
    let complete = sink.wait_complete(n, Duration::from_secs(900)).await;
    let (first, last) = sink.first_last();
    let drain = n as f64 / last.saturating_sub(first).as_secs_f64();
    let to_empty = last.saturating_sub(up);
    let rss_peak = router.peak_rss();
    let restarted = router.restart().await;
    let restart = restarted.startup;
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0));
    table(
        &format!("backlog: {n} events queued for 1 webhook while its listener is down"),
        &[
            row(
                "publish (listener down): events/s",
                fmt_rate(n as f64 / took.as_secs_f64()),
                "",
                true,
            ),
            row(
                "peak RSS with the backlog queued",
                mib(rss_queued),
                "<= 256 MiB",
                rss_queued <= 256 << 20,
            ),
            row(
                "peak RSS, whole run",
                mib(rss_peak),
                "<= 256 MiB",
                rss_peak <= 256 << 20,
            ),
            row(
                "data folder bytes per event",
                format!("{:.0} B", bytes as f64 / n as f64),
                "",
                true,
            ),
            row(
                "drain rate: events/s",
                fmt_rate(drain),
                ">= 50,000",
                drain >= 50_000.0,
            ),
            row("listener up to queue empty", fmt_dur(to_empty), "", true),
            row(
                "HTTP requests",
                sink.requests.load(Ordering::Relaxed).to_string(),
                "",
                true,
            ),
            row(
                "restart to serving",
                fmt_dur(restart),
                "<= 2 s",
                restart <= Duration::from_secs(2),
            ),
            completeness(&sink, n),
        ],
    );
    complete
}

async fn peer(n: u64, callers: usize, in_flight: u32) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch = Instant::now();
    let sink = Sink::start(1, n, epoch).await;
    let mut config = base_config(&dir.path().join("data"));
    if in_flight > 0 {
        config.delivery.max_events_per_payload = 1;
    }
    let router = Router::start(&config).await;
    let mut admin = router.admin().await;
    create_webhook(&mut admin, &sink.url(0), in_flight).await;
    let mut clients = Vec::new();
    for _ in 0..peer::CONNECTIONS {
        clients.push(router.ingest().await);
    }
    let one_event = move |i: u64| pb::PublishEventsRequest {
        account_id: ACCOUNT,
        events: vec![event(i, Some(epoch.elapsed().as_nanos() as u64))],
    };
    let cpu0 = router.cpu();
    let start = epoch.elapsed();
    let (publish_took, mut acks) = peer::drive(&clients, n, callers, one_event).await;
    sink.wait_complete(n, Duration::from_secs(1)).await;
    let left_after_1s = n.saturating_sub(sink.distinct());
    let complete = sink.wait_complete(n, Duration::from_secs(120)).await;
    let cpu = router.cpu().saturating_sub(cpu0);
    let (_, last) = sink.first_last();
    let end_to_end = n as f64 / last.saturating_sub(start).as_secs_f64();
    drop(router);

    // The ceiling: the same calls against a server that only answers.
    let ceiling_addr = peer::start_ceiling().await;
    let ceiling_clients = peer::clients_of(ceiling_addr).await;
    let (ceiling_took, _) = peer::drive(&ceiling_clients, n, callers, move |i| {
        pb::PublishEventsRequest {
            account_id: ACCOUNT,
            events: vec![event(i, Some(0))],
        }
    })
    .await;
    let ceiling = n as f64 / ceiling_took.as_secs_f64();
    let ratio = end_to_end / ceiling;

    let mut lat = sink.latencies_us.lock().expect("latencies").clone();
    lat.sort_unstable();
    acks.sort_unstable();
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    table(
        &format!(
            "peer: {n} PublishEvents calls of 1 event, {callers} callers over {} connections, 1 signed webhook, {}",
            peer::CONNECTIONS,
            if in_flight > 0 {
                format!("1 event per request, max_in_flight {in_flight}")
            } else {
                "default payloads".to_string()
            }
        ),
        &[
            row(
                "end to end (first call to last delivery): deliveries/s",
                fmt_rate(end_to_end),
                ">= 12,000",
                end_to_end >= 12_000.0,
            ),
            row(
                "raw gRPC ceiling (answers at once): calls/s",
                fmt_rate(ceiling),
                "",
                true,
            ),
            row(
                "router end to end / raw ceiling",
                format!("{:.0}%", 100.0 * ratio),
                ">= 50%",
                ratio >= 0.5,
            ),
            row("publishing alone: calls/s", fmt_rate(n as f64 / publish_took.as_secs_f64()), "", true),
            row("publish-to-receive p50", ms(p50), "", true),
            row("publish-to-receive p99", ms(p99), "<= 10 ms", p99 <= 10_000),
            ack_row(&acks),
            requests_row(&sink),
            row(
                "events not yet received 1 s after the last call",
                left_after_1s.to_string(),
                if in_flight > 0 { "0" } else { "" },
                in_flight == 0 || left_after_1s == 0,
            ),
            row("router CPU per message", fmt_us(cpu, n), "", true),
            row("duplicates", sink.duplicates().to_string(), "", true),
            completeness(&sink, n),
        ],
    );
    complete
}

/// Acknowledgement latency percentiles of sorted `acks` (µs).
fn ack_row(acks: &[u64]) -> Row {
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    row(
        "publish ack p50 / p99",
        format!(
            "{} / {}",
            ms(percentile(acks, 0.5)),
            ms(percentile(acks, 0.99))
        ),
        "",
        true,
    )
}

/// The HTTP requests the sink received.
fn requests_row(sink: &Sink) -> Row {
    row(
        "HTTP requests",
        sink.requests.load(Ordering::Relaxed).to_string(),
        "",
        true,
    )
}

/// The `q` quantile of sorted `v` (0 when empty).
fn percentile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

// ------------------------------------------------------------------ helpers

/// Event number `i`: id `e<i>`, ~300 bytes of JSON data.
fn event(i: u64, sent_ns: Option<u64>) -> pb::Event {
    let mut data = sample::data(i);
    if let Some(t) = sent_ns {
        data.fields.insert(
            "sentNs".into(),
            Value {
                kind: Some(Kind::NumberValue(t as f64)),
            },
        );
    }
    pb::Event {
        event_id: format!("e{i}"),
        event_name: TYPE.into(),
        timestamp: 1_727_414_643_000,
        event_info: "bench".into(),
        data: Some(data),
    }
}

/// The event as the router stores and sends it.
fn sample_event_json(i: u64) -> String {
    let e = event(i, None);
    let data = webhook_router::api::convert::struct_to_json(e.data.as_ref(), 0, || "data".into())
        .expect("valid data");
    webhook_router::domain::event::render_event_json(
        &e.event_id,
        &e.event_name,
        e.timestamp,
        &e.event_info,
        &data,
    )
}

/// Publishes `e0..e<n>` in requests of `per_request` from `clients`
/// connections as fast as acknowledgements allow. Returns the time taken.
async fn publish(router: &Router, n: u64, per_request: u64, clients: usize) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = router.ingest().await;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(per_request, Ordering::Relaxed);
                if first >= n {
                    return;
                }
                let events = (first..(first + per_request).min(n))
                    .map(|i| event(i, None))
                    .collect();
                client
                    .publish_events(pb::PublishEventsRequest {
                        account_id: ACCOUNT,
                        events,
                    })
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    started.elapsed()
}

/// Publishes one event per request at `rate` per second, each carrying its
/// send time; returns the acknowledgement latencies in µs.
async fn publish_steady(router: &Router, n: u64, rate: u64, epoch: Instant) -> Vec<u64> {
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(router.ingest().await);
    }
    let acks = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        ticker.tick().await;
        let mut client = clients[i as usize % CLIENTS].clone();
        let acks = acks.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let e = event(i, Some(epoch.elapsed().as_nanos() as u64));
            client
                .publish_events(pb::PublishEventsRequest {
                    account_id: ACCOUNT,
                    events: vec![e],
                })
                .await
                .expect("publish");
            acks.lock()
                .expect("acks")
                .push(sent.elapsed().as_micros() as u64);
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let v = acks.lock().expect("acks").clone();
    v
}

async fn create_webhooks(router: &Router, sink: &Sink, count: usize) {
    let mut admin = router.admin().await;
    for i in 0..count {
        create_webhook(&mut admin, &sink.url(i), 0).await;
    }
}

async fn create_webhook(admin: &mut router::Admin, url: &str, max_in_flight: u32) {
    admin
        .create_webhook(pb::CreateWebhookRequest {
            account_id: ACCOUNT,
            webhook: Some(pb::Webhook {
                name: "bench".into(),
                target_url: url.into(),
                event_types: vec![TYPE.into()],
                auth: Some(pb::WebhookAuth {
                    method: Some(pb::webhook_auth::Method::Signature(
                        pb::SignatureAuth::default(),
                    )),
                }),
                max_in_flight,
                ..Default::default()
            }),
        })
        .await
        .expect("create webhook");
}

/// The raw ceiling: the same events straight into a sled tree, batches of
/// 100, one flush per batch, one writer; `per_key` events per sled value
/// (1: one key per event). With `fsync`, each flush is followed by the
/// router's own fsync of what sled wrote, so the ceiling is as durable as
/// the router's acknowledgements. Returns the time and the event record size.
fn raw_sled(n: u64, dir: &Path, per_key: u64, fsync: bool) -> (Duration, usize) {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(64 * 1024 * 1024)
        .flush_every_ms(Some(500))
        .open()
        .expect("open sled");
    let mut disk = fsync.then(|| webhook_router::store::DiskSync::open(dir).expect("fsync setup"));
    let tree = db.open_tree("raw").expect("tree");
    let records: Vec<Vec<u8>> = (0..PER_REQUEST)
        .map(|i| sample_event_json(i).into_bytes())
        .collect();
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let mut batch = sled::Batch::default();
        let take = PER_REQUEST.min(n - seq) as usize;
        for group in records[..take].chunks(per_key as usize) {
            let value: Vec<u8> = group.concat();
            batch.insert(&(seq + 1).to_be_bytes(), value);
            seq += group.len() as u64;
        }
        tree.apply_batch(batch).expect("apply");
        db.flush().expect("flush");
        if let Some(disk) = &mut disk {
            disk.sync().expect("fsync");
        }
    }
    (started.elapsed(), records[0].len())
}

/// `total` POSTs of `body` to the sink over `conns` keep-alive connections.
async fn plain_load(sink: &Sink, conns: usize, total: u64, body: bytes::Bytes) -> Duration {
    let left = Arc::new(AtomicU64::new(total));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let stream = tokio::net::TcpStream::connect(sink.addr)
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let left = left.clone();
        let body = body.clone();
        let uri = format!("http://{}/p", sink.addr);
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                let req = hyper::Request::post(&uri)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(body.clone()))
                    .expect("request");
                let resp = send.send_request(req).await.expect("send");
                assert!(resp.status().is_success());
            }
        }));
    }
    for t in tasks {
        t.await.expect("plain client");
    }
    started.elapsed()
}

/// Like [`plain_load`] with a reqwest client built as the router builds its
/// own (no redirects, no proxy, TCP_NODELAY, pooled keep-alive connections),
/// `conns` tasks sending one request at a time each.
async fn reqwest_load(sink: &Sink, conns: usize, total: u64, body: bytes::Bytes) -> Duration {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(conns)
        .build()
        .expect("reqwest client");
    let left = Arc::new(AtomicU64::new(total));
    let uri = format!("http://{}/p", sink.addr);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, left, body, uri) = (client.clone(), left.clone(), body.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                let resp = client
                    .post(&uri)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("send");
                assert!(resp.status().is_success());
                resp.bytes().await.expect("body");
            }
        }));
    }
    for t in tasks {
        t.await.expect("reqwest client");
    }
    started.elapsed()
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

// ------------------------------------------------------------------- output

struct Row {
    metric: String,
    value: String,
    target: String,
    met: bool,
}

fn row(metric: &str, value: String, target: &str, met: bool) -> Row {
    Row {
        metric: metric.into(),
        value,
        target: target.into(),
        met,
    }
}

fn completeness(sink: &Sink, expected: u64) -> Row {
    let got = sink.distinct();
    row(
        "distinct events received / expected",
        format!("{got} / {expected}"),
        "all",
        got == expected,
    )
}

fn table(title: &str, rows: &[Row]) {
    println!("\n## {title}\n");
    println!("| metric | value | target | |");
    println!("|---|---:|---|---|");
    for r in rows {
        let mark = match (r.target.is_empty(), r.met) {
            (true, _) => "",
            (false, true) => "met",
            (false, false) => "MISSED",
        };
        println!("| {} | {} | {} | {} |", r.metric, r.value, r.target, mark);
    }
}

fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// CPU time per event, in µs.
fn fmt_us(cpu: Duration, events: u64) -> String {
    format!("{:.1} µs", cpu.as_secs_f64() * 1e6 / events as f64)
}

fn fmt_dur(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}
