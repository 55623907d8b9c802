//! `--backend postgres [--routers N]`: the ingest, fanout and requests
//! scenarios with every router on one PostgreSQL database (a fresh one per
//! run, on the server `WEBHOOK_ROUTER_BENCH_PG` or `WEBHOOK_ROUTER_TEST_PG`
//! names), publishers spread over the routers, and beside them the
//! same-shape raw ceiling measured in the same run: multi-row INSERTs of
//! 100 events of the same size, one COMMIT each, from as many connections as
//! there are publishers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::router::{base_config, Router};
use super::sink::Sink;
use super::{
    completeness, create_webhook, event, fmt_rate, fmt_us, row, sample_event_json, table, ACCOUNT,
    CLIENTS, PER_REQUEST,
};
use webhook_router::config::StorageBackend;
use webhook_router::proto::v1 as pb;

/// The server to create benchmark databases on.
fn server_url() -> String {
    std::env::var("WEBHOOK_ROUTER_BENCH_PG")
        .or_else(|_| std::env::var("WEBHOOK_ROUTER_TEST_PG"))
        .unwrap_or_else(|_| {
            panic!(
                "--backend postgres needs a PostgreSQL server: set WEBHOOK_ROUTER_BENCH_PG \
                 (or WEBHOOK_ROUTER_TEST_PG) to postgres://user:password@127.0.0.1:5432/db \
                 (a role allowed to CREATE DATABASE); `source .ci/postgres.sh && \
                 start_test_postgres` starts a throwaway one"
            )
        })
}

/// A fresh database for one run, dropped with it.
struct BenchDb {
    url: String,
    name: String,
    admin: tokio_postgres::Client,
}

impl BenchDb {
    async fn create() -> BenchDb {
        let server = server_url();
        let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .expect("connect to the benchmark PostgreSQL");
        tokio::spawn(conn);
        let name = format!("wr_bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the benchmark database");
        let mut url = url::Url::parse(&server).expect("a URL");
        url.set_path(&name);
        BenchDb {
            url: url.to_string(),
            name,
            admin,
        }
    }

    async fn drop_now(self) {
        let _ = self
            .admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// `n` routers on `db`, each with its own (unused) data folder.
async fn start_routers(
    db: &BenchDb,
    n: usize,
    dir: &std::path::Path,
    per_payload: usize,
) -> Vec<Router> {
    let mut routers = Vec::new();
    for i in 0..n {
        let mut c = base_config(&dir.join(format!("router-{i}")));
        c.storage.backend = StorageBackend::Postgres;
        c.storage.postgres_url = db.url.clone();
        c.storage.postgres_pool_size = 16;
        c.delivery.max_events_per_payload = per_payload as u32;
        routers.push(Router::start(&c).await);
    }
    routers
}

/// Publishes `n` events, `per_request` per call, from `clients` clients
/// spread round-robin over `routers`.
async fn publish_spread(routers: &[Router], n: u64, per_request: u64, clients: usize) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = routers[c % routers.len()].ingest().await;
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

/// The raw ceiling: `n` events of the sample's size in multi-row INSERTs of
/// [`PER_REQUEST`], one transaction (and COMMIT: fsync) each, from `conns`
/// connections, into a table shaped like the router's event log.
async fn raw_insert(db: &BenchDb, n: u64, conns: usize) -> Duration {
    let setup = connect(&db.url).await;
    setup
        .batch_execute(
            "CREATE TABLE raw_events (account_id bigint, seq bigint, event_id text, \
             event_name text, mode smallint, ingest_ms bigint, json bytea, \
             PRIMARY KEY (account_id, seq), UNIQUE (account_id, event_id))",
        )
        .await
        .expect("create raw table");
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut client = connect(&db.url).await;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(PER_REQUEST, Ordering::Relaxed);
                if first >= n {
                    return;
                }
                let seqs: Vec<i64> = (first..(first + PER_REQUEST).min(n))
                    .map(|s| s as i64)
                    .collect();
                let ids: Vec<String> = seqs.iter().map(|s| format!("e{s}")).collect();
                let json: Vec<Vec<u8>> = seqs
                    .iter()
                    .map(|s| sample_event_json(*s as u64).into_bytes())
                    .collect();
                let tx = client.transaction().await.expect("begin");
                tx.execute(
                    "INSERT INTO raw_events \
                     SELECT $1, s, i, 'COURSE_ENROLLMENT', 0, 0, j \
                     FROM unnest($2::bigint[], $3::text[], $4::bytea[]) AS t(s, i, j)",
                    &[&(ACCOUNT as i64), &seqs, &ids, &json],
                )
                .await
                .expect("insert");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("raw writer");
    }
    started.elapsed()
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

fn total_cpu(routers: &[Router]) -> Duration {
    routers.iter().map(|r| r.cpu()).sum()
}

/// Ingest on PostgreSQL with `routers` routers, beside the raw ceiling.
pub async fn ingest(n: u64, routers: usize) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = BenchDb::create().await;
    let rs = start_routers(&db, routers, dir.path(), 100).await;
    let cpu0 = total_cpu(&rs);
    let took = publish_spread(&rs, n, PER_REQUEST, CLIENTS).await;
    let rate = n as f64 / took.as_secs_f64();
    let cpu = total_cpu(&rs).saturating_sub(cpu0);
    drop(rs);
    let raw_took = raw_insert(&db, n, CLIENTS).await;
    let raw = n as f64 / raw_took.as_secs_f64();
    db.drop_now().await;
    table(
        &format!(
            "ingest on PostgreSQL, {routers} router(s): {n} events, {PER_REQUEST}/request, \
             {CLIENTS} clients, ~300-byte data"
        ),
        &[
            row("routers: durable events/s", fmt_rate(rate), "", true),
            row(
                "raw PostgreSQL ceiling (multi-row INSERT of 100, one COMMIT each): events/s",
                fmt_rate(raw),
                "",
                true,
            ),
            row(
                "routers / raw",
                format!("{:.0}%", 100.0 * rate / raw),
                if routers == 1 { ">= 50%" } else { "" },
                routers > 1 || rate / raw >= 0.5,
            ),
            row(
                "router CPU per event (all routers)",
                fmt_us(cpu, n),
                "",
                true,
            ),
        ],
    );
    true
}

/// Fanout (5 webhooks, up to 100 events per payload) or requests (one event
/// per payload) on PostgreSQL with `routers` routers.
pub async fn deliver(n: u64, routers: usize, per_payload: usize) -> bool {
    const WEBHOOKS: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = BenchDb::create().await;
    let epoch = Instant::now();
    let sink = Sink::start(WEBHOOKS, n, epoch).await;
    let rs = start_routers(&db, routers, dir.path(), per_payload).await;
    {
        let mut admin = rs[0].admin().await;
        for i in 0..WEBHOOKS {
            create_webhook(&mut admin, &sink.url(i), 0).await;
        }
    }
    let cpu0 = total_cpu(&rs);
    let start = epoch.elapsed();
    let took = publish_spread(&rs, n, PER_REQUEST, CLIENTS).await;
    let ingest_rate = n as f64 / took.as_secs_f64();
    let complete = sink.wait_complete(n, Duration::from_secs(900)).await;
    let cpu = total_cpu(&rs).saturating_sub(cpu0);
    let (first, last) = sink.first_last();
    let span = last.saturating_sub(start);
    let delivered = sink.distinct() as f64 / span.as_secs_f64();
    let reqs = sink.requests.load(Ordering::Relaxed);
    let req_rate = reqs as f64 / last.saturating_sub(first).as_secs_f64();
    drop(rs);
    db.drop_now().await;
    let what = if per_payload == 1 {
        "requests"
    } else {
        "fanout"
    };
    table(
        &format!(
            "{what} on PostgreSQL, {routers} router(s): {n} events x {WEBHOOKS} webhooks, \
             up to {per_payload} event(s)/payload, signed"
        ),
        &[
            row(
                "ingest events/s (this run)",
                fmt_rate(ingest_rate),
                "",
                true,
            ),
            row(
                "delivered events/s, all webhooks",
                fmt_rate(delivered),
                "",
                true,
            ),
            row(
                "delivered / (5 x ingest)",
                format!(
                    "{:.0}%",
                    100.0 * delivered / (WEBHOOKS as f64 * ingest_rate)
                ),
                "",
                true,
            ),
            row("HTTP requests/s", fmt_rate(req_rate), "", true),
            row(
                "router CPU per delivered event (all routers)",
                fmt_us(cpu, n * WEBHOOKS as u64),
                "",
                true,
            ),
            row("duplicates", sink.duplicates().to_string(), "", true),
            completeness(&sink, n * WEBHOOKS as u64),
        ],
    );
    complete
}
