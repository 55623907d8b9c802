//! Crash safety of the real binary (on sled, and on PostgreSQL): SIGKILL at random points during sustained
//! publishing (several concurrent publishers) and delivery (several webhooks,
//! real-time and batch lanes),
//! restarting on the same data folder each time. At the end every
//! acknowledged event reached every webhook at least once, nothing arrived
//! with content other than what was sent for its event_id (events whose
//! publish outcome the kill left unknown included), each webhook saw every
//! publisher's events in publish order, and the duplicates are counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::load::{
    check_every_lane, create_lane_webhooks, ingest_clients, lane_listeners, publish_for, random_ms,
    Ledger, Publisher, BATCH, REALTIME, WEBHOOK_TYPES,
};
use crate::common::process::{write_cluster_config, write_router_config, RouterProcess};
use rand::{Rng, SeedableRng};

const PUBLISHERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_publishing_and_delivery_loses_no_acknowledged_event() {
    kill_and_restart(5, 0, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_payloads_side_by_side_loses_no_acknowledged_event() {
    kill_and_restart(3, 8, None).await;
}

/// The same on PostgreSQL: the router is killed, the database keeps what it
/// committed (its own durability is PostgreSQL's), and the restarted router
/// takes its lanes back once the dead one's leases expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_on_postgres_loses_no_acknowledged_event() {
    let db = crate::common::pg::TestDb::create().await;
    kill_and_restart(4, 0, Some(&db.url)).await;
}

/// `kills` rounds of SIGKILL under load, webhooks with `max_in_flight`; on
/// the PostgreSQL database at `postgres_url` when given, else on sled.
async fn kill_and_restart(kills: usize, max_in_flight: u32, postgres_url: Option<&str>) {
    let started = Instant::now();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let config = match postgres_url {
        Some(url) => write_cluster_config(dir.path(), url, 2_000, "batch_interval_ms = 200"),
        None => write_router_config(dir.path(), 2_000, "batch_interval_ms = 200"),
    };
    // Listeners answer after a short random delay, so deliveries are in flight
    // when the kill comes.
    let listeners = lane_listeners(|n| (n % 7) as u64 * 3).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|id| Publisher::new(id, seed, 5))
        .collect();

    let mut router = RouterProcess::start(&config);
    create_lane_webhooks(&router, &listeners, "crash", max_in_flight).await;

    for round in 0..kills {
        let clients = ingest_clients(&router, PUBLISHERS).await;
        let run_for = random_ms(&mut rng, 150, 1_500);
        publish_for(&mut publishers, clients, &ledger, run_for, async {
            router.signal("-KILL");
            let status = router.wait_exit(Duration::from_secs(5));
            assert!(!status.success(), "killed process reported success");
        })
        .await;
        let delivered: usize = listeners.iter().map(|l| l.event_ids().len()).sum();
        let l = ledger.lock().unwrap();
        println!(
            "round {round}: killed after {run_for:?}; {} events sent, {} acknowledged, {} delivered so far",
            l.sent.len(),
            l.acked.len(),
            delivered
        );
        drop(l);
        router = RouterProcess::start(&config);
    }

    // A last run: publishers settle their unknown batch (as a client would
    // retry), then everything acknowledged must arrive.
    let mut ingest = router.ingest().await;
    for p in &mut publishers {
        p.settle(&mut ingest, &ledger).await;
    }
    let (sent, acked, failed_calls) = {
        let l = ledger.lock().unwrap();
        println!(
            "{} events were sent again after a failed call; {} of them had been stored before the kill",
            l.resent, l.resent_found_stored
        );
        (l.sent.len(), l.acked.len(), l.failed_calls)
    };
    assert!(
        acked >= 100,
        "too little was published to prove anything: {acked}"
    );
    let ordered: &[&str] = if max_in_flight > 1 {
        &[BATCH]
    } else {
        &[REALTIME, BATCH]
    };
    let duplicates_total =
        check_every_lane(&listeners, &ledger, ordered, Duration::from_secs(30)).await;
    println!(
        "{kills} kills, max_in_flight {max_in_flight}: {sent} events sent, {acked} acknowledged, {failed_calls} publish calls failed, \
         {duplicates_total} duplicate deliveries over {} webhooks, {:?} total",
        WEBHOOK_TYPES.len(),
        started.elapsed()
    );

    router.signal("-TERM");
    let status = router.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}
