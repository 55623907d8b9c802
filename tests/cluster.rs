//! Three router processes on one PostgreSQL database, under load: four
//! publishers spread over the three routers, five webhooks (real-time and
//! batch lanes). Mid-run one router is SIGKILLed (and started again later),
//! another is SIGSTOPped for longer than its leases (then SIGCONT: a zombie
//! that still believes it holds lanes), and PostgreSQL itself is restarted
//! at once (`pg_ctl restart -m immediate`). At the end every acknowledged
//! event reached each matching webhook with the content sent, each
//! publisher's events arrived in publish order per lane, and the zombie's
//! lane writes after it lost its leases were refused by the epoch check (its
//! log says so).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::load::{
    check_deliveries, ingest_clients, publish_for, Ledger, Publisher, BATCH, REALTIME,
};
use crate::common::pg::{restart_server_immediately, start_server, stop_server, TestDb};
use crate::common::process::{write_cluster_config, RouterProcess};
use crate::common::*;
use webhook_router::proto::v1::ListWebhooksRequest;

const ROUTERS: usize = 3;
const PUBLISHERS: usize = 4;
/// Leases short enough for the test to see takeovers.
const LEASE_TTL_MS: u64 = 2_000;
/// Five webhooks: real-time only, both lanes, batch only, and two more.
const TYPES: [&[&str]; 5] = [
    &[REALTIME],
    &[REALTIME, BATCH],
    &[BATCH],
    &[REALTIME],
    &[REALTIME, BATCH],
];

/// One ingest client per publisher, publisher `i` on router `i % ROUTERS`
/// among those in `up`.
async fn spread_clients(routers: &[RouterProcess], up: &[usize]) -> Vec<Ingest> {
    let mut clients = Vec::new();
    for i in 0..PUBLISHERS {
        let r = &routers[up[i % up.len()]];
        clients.extend(ingest_clients(r, 1).await);
    }
    clients
}

/// Waits (up to 30 s) until `router` answers a call that reads the database.
async fn wait_database_back(router: &RouterProcess) {
    let mut admin = router.admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = admin
            .list_webhooks(ListWebhooksRequest {
                account_id: 1010,
                page_size: 1,
                page_token: String::new(),
            })
            .await;
        match r {
            Ok(_) => return,
            Err(s) if Instant::now() < deadline => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("the database did not come back within 30 s: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_routers_kill_pause_and_database_restart_lose_nothing() {
    let started = Instant::now();
    // The test restarts the server: no other test may use it meanwhile.
    let db = TestDb::create_exclusive().await;
    let dirs: Vec<tempfile::TempDir> = (0..ROUTERS).map(|_| tempfile::tempdir().unwrap()).collect();
    let configs: Vec<_> = dirs
        .iter()
        .map(|d| write_cluster_config(d.path(), &db.url, LEASE_TTL_MS, "batch_interval_ms = 200"))
        .collect();
    let mut routers: Vec<RouterProcess> = configs.iter().map(|c| RouterProcess::start(c)).collect();

    let mut listeners = Vec::new();
    for i in 0..TYPES.len() {
        listeners.push(
            Listener::start(Arc::new(move |n, _| {
                (200, vec![], Duration::from_millis(((n + i) % 5) as u64 * 2))
            }))
            .await,
        );
    }
    // Webhooks created through different routers.
    for (i, (l, types)) in listeners.iter().zip(TYPES).enumerate() {
        let mut admin = routers[i % ROUTERS].admin().await;
        create(
            &mut admin,
            1010,
            webhook(&format!("cluster-{i}"), &l.url(), types, no_auth()),
        )
        .await;
    }

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut publishers: Vec<Publisher> =
        (0..PUBLISHERS).map(|id| Publisher::new(id, 7, 5)).collect();
    let report = |what: &str, ledger: &Mutex<Ledger>, listeners: &[Listener]| {
        let delivered: usize = listeners.iter().map(|l| l.event_ids().len()).sum();
        let l = ledger.lock().unwrap();
        println!(
            "{what}: {} sent, {} acknowledged, {} calls failed, {delivered} arrivals so far ({:?})",
            l.sent.len(),
            l.acked.len(),
            l.failed_calls,
            started.elapsed()
        );
    };

    // 1. All three up.
    let clients = spread_clients(&routers, &[0, 1, 2]).await;
    publish_for(
        &mut publishers,
        clients,
        &ledger,
        Duration::from_millis(1_500),
        async {},
    )
    .await;
    report("all up", &ledger, &listeners);

    // 2. SIGKILL router 0 under load; its lanes move to the others.
    let clients = spread_clients(&routers, &[0, 1, 2]).await;
    publish_for(
        &mut publishers,
        clients,
        &ledger,
        Duration::from_millis(800),
        async {
            routers[0].signal("-KILL");
            let status = routers[0].wait_exit(Duration::from_secs(5));
            assert!(!status.success(), "killed process reported success");
        },
    )
    .await;
    report("router 0 killed", &ledger, &listeners);
    let clients = spread_clients(&routers, &[1, 2]).await;
    publish_for(
        &mut publishers,
        clients,
        &ledger,
        Duration::from_millis(LEASE_TTL_MS + 1_500),
        async {},
    )
    .await;
    report(
        "two routers, router 0's leases expired",
        &ledger,
        &listeners,
    );

    // 3. SIGSTOP router 1 for twice its lease; router 0 starts again meanwhile.
    routers[1].signal("-STOP");
    routers[0] = RouterProcess::start(&configs[0]);
    let clients = spread_clients(&routers, &[0, 2]).await;
    publish_for(
        &mut publishers,
        clients,
        &ledger,
        Duration::from_millis(2 * LEASE_TTL_MS + 1_000),
        async {},
    )
    .await;
    routers[1].signal("-CONT");
    report(
        "router 1 paused past its leases, then resumed",
        &ledger,
        &listeners,
    );

    // 4. PostgreSQL restarted at once under load.
    let clients = spread_clients(&routers, &[0, 1, 2]).await;
    publish_for(
        &mut publishers,
        clients,
        &ledger,
        Duration::from_millis(700),
        async {
            let took = restart_server_immediately();
            println!("PostgreSQL restarted (immediate) in {took:?}");
        },
    )
    .await;
    let clients = spread_clients(&routers, &[0, 1, 2]).await;
    publish_for(
        &mut publishers,
        clients,
        &ledger,
        Duration::from_millis(1_500),
        async {},
    )
    .await;
    report("after the database restart", &ledger, &listeners);

    // Publishers settle their unknown batch (as a client retries), then
    // everything acknowledged must arrive.
    for (i, p) in publishers.iter_mut().enumerate() {
        let router = &routers[i % ROUTERS];
        wait_database_back(router).await;
        let mut ingest = router.ingest().await;
        p.settle(&mut ingest, &ledger).await;
    }
    let acked = ledger.lock().unwrap().acked.len();
    assert!(
        acked >= 200,
        "too little was published to prove anything: {acked}"
    );
    let mut duplicates_total = 0;
    for (i, (l, types)) in listeners.iter().zip(TYPES).enumerate() {
        let name = format!("webhook {i}");
        let (arrivals, requests, duplicates) = check_deliveries(
            &name,
            l,
            types,
            &[REALTIME, BATCH],
            &ledger,
            Duration::from_secs(60),
        )
        .await;
        duplicates_total += duplicates;
        println!(
            "{name} {types:?}: {arrivals} arrivals in {requests} requests, {duplicates} duplicates"
        );
    }

    // The zombie's writes after it lost its leases were refused by the epoch check.
    let addr = routers[1].metrics_addr().expect("router 1 serves /metrics");
    let samples = scrape(addr).await;
    let fenced = value(&samples, "webhook_router_lane_writes_fenced_total", &[]).unwrap_or(0.0);
    println!("router 1 (paused past its leases): {fenced} lane writes refused by the epoch check");
    assert!(
        fenced >= 1.0,
        "the paused router's lane writes after losing its leases were not refused; its log:\n{}",
        routers[1].log_lines().join("\n")
    );
    println!(
        "{acked} acknowledged, {duplicates_total} duplicate arrivals over {} webhooks, {:?} total",
        TYPES.len(),
        started.elapsed()
    );
    for r in &mut routers {
        r.signal("-TERM");
        let status = r.wait_exit(Duration::from_secs(15));
        assert!(status.success(), "exit status after SIGTERM: {status:?}");
    }
}

/// Health of the EventIngest service as `router` reports it.
async fn ingest_health(router: &RouterProcess) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    HealthClient::new(router.channel().await)
        .check(HealthCheckRequest {
            service: "webhooks.v1.EventIngest".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// Waits (up to `secs`) until `router`'s health is `status`.
async fn wait_health(router: &RouterProcess, status: i32, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = ingest_health(router).await;
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {now}, not {status}, for {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The database goes away while a router runs: publishing answers
/// UNAVAILABLE, health turns NOT_SERVING; once it is back, health is SERVING
/// again, publishing works and the events published before and after reach
/// the webhook, without a restart of the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_then_heals_by_itself() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let (serving, not_serving) = (
        ServingStatus::Serving as i32,
        ServingStatus::NotServing as i32,
    );
    // The test stops the server: no other test may use it meanwhile.
    let db = TestDb::create_exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_cluster_config(dir.path(), &db.url, LEASE_TTL_MS, "");
    let router = RouterProcess::start(&config);
    let listener = Listener::ok().await;
    let mut admin = router.admin().await;
    create(
        &mut admin,
        1010,
        webhook("outage", &listener.url(), &[REALTIME], no_auth()),
    )
    .await;
    let mut ingest = router.ingest().await;
    publish(&mut ingest, 1010, vec![event("before", REALTIME, 1)]).await;
    listener.wait_events(1, Duration::from_secs(15)).await;
    assert_eq!(ingest_health(&router).await, serving);

    let took = stop_server();
    println!("PostgreSQL stopped in {took:?}");
    // Started again even if an assertion below fails, so the tests after
    // this one find their server.
    let mut down = ServerDown(true);
    let refused = ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![event("during", REALTIME, 2)],
        })
        .await
        .expect_err("publishing without a database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    wait_health(&router, not_serving, 10).await;

    let took = start_server();
    down.0 = false;
    println!("PostgreSQL started again in {took:?}");
    wait_health(&router, serving, 20).await;
    wait_database_back(&router).await;
    publish(&mut ingest, 1010, vec![event("after", REALTIME, 3)]).await;
    let got = listener
        .wait_until(Duration::from_secs(20), |reqs| {
            reqs.iter()
                .flat_map(|r| r.event_ids())
                .any(|id| id == "after")
        })
        .await;
    let ids: Vec<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    assert!(ids.contains(&"after".to_string()), "{ids:?}");
    assert!(
        !ids.contains(&"during".to_string()),
        "a refused event was delivered"
    );
    assert!(
        !router
            .log_lines()
            .iter()
            .any(|l| l.contains("starting again after a storage failure")),
        "the router healed by restarting itself"
    );
}

/// Starts the test server on drop while `.0` says it is stopped.
struct ServerDown(bool);

impl Drop for ServerDown {
    fn drop(&mut self) {
        if self.0 {
            start_server();
        }
    }
}
