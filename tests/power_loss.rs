//! Power loss on the real binary. The data folder lives on lossyfs
//! (`common/lossyfs.rs`), a FUSE filesystem that forgets every write not
//! made durable by an fsync when the power is cut. Several publishers publish
//! and three webhooks (real-time lane, both lanes, batch lane) receive under
//! load; at random moments the test cuts the power: SIGKILL, then every
//! unsynced write is thrown away, then the router starts again on what
//! survived. At the end every acknowledged event reached every matching
//! webhook, with the content that was sent, in per-lane publish order, and
//! the store opened cleanly after every cut.
//!
//! Needs /dev/fuse and root (to mount without fusermount); fails with a clear
//! message where either is missing. `POWER_CUT_SEMANTICS=journal` runs it on
//! the more forgiving model of a journaling filesystem; `POWER_CUTS` and
//! `CRASH_SEED` set the number of cuts and the seed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::load::{
    check_every_lane, create_lane_webhooks, ingest_clients, lane_listeners, publish_for, random_ms,
    Ledger, Publisher, BATCH, REALTIME,
};
use crate::common::lossyfs::{self, LossyMount, Semantics};
use crate::common::process::{write_router_config_with_data, RouterProcess};
use rand::{Rng, SeedableRng};

const PUBLISHERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cuts_under_load_lose_no_acknowledged_event() {
    if let Some(why) = lossyfs::missing_prerequisite() {
        panic!("the power-cut test cannot run on this machine: {why}");
    }
    let started = Instant::now();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let cuts: usize = std::env::var("POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let semantics = match std::env::var("POWER_CUT_SEMANTICS").as_deref() {
        Ok("journal") => Semantics::Journal,
        _ => Semantics::Strict,
    };
    println!("CRASH_SEED={seed} POWER_CUTS={cuts} semantics={semantics:?}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mut disk = LossyMount::mount(&mountpoint, semantics).expect("mount lossyfs");
    let config = write_router_config_with_data(
        dir.path(),
        &disk.path().join("data"),
        2_000,
        "batch_interval_ms = 200",
    );
    let listeners = lane_listeners(|n| (n % 5) as u64 * 2).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|id| Publisher::new(id, seed, 20).with_large_events(200))
        .collect();

    let mut router = RouterProcess::start(&config);
    create_lane_webhooks(&router, &listeners, "power", 0).await;

    for round in 0..cuts {
        let clients = ingest_clients(&router, PUBLISHERS).await;
        let run_for = random_ms(&mut rng, 300, 1_500);
        publish_for(&mut publishers, clients, &ledger, run_for, async {
            router.signal("-KILL");
            router.wait_exit(Duration::from_secs(5));
            disk.power_cut().expect("remount after the cut");
        })
        .await;
        let delivered: usize = listeners.iter().map(|l| l.event_ids().len()).sum();
        let stats = disk.stats();
        {
            let l = ledger.lock().unwrap();
            println!(
                "cut {round} after {run_for:?}: {} events sent, {} acknowledged, {} delivered so \
                 far; the cut dropped {} bytes of unsynced writes and {} directory changes",
                l.sent.len(),
                l.acked.len(),
                delivered,
                stats.bytes_lost,
                stats.entries_lost
            );
        }
        // The store must open on what survived.
        router = RouterProcess::start(&config);
    }

    let mut ingest = router.ingest().await;
    for p in &mut publishers {
        p.settle(&mut ingest, &ledger).await;
    }
    let (sent, acked, failed_calls) = {
        let l = ledger.lock().unwrap();
        (l.sent.len(), l.acked.len(), l.failed_calls)
    };
    assert!(
        acked >= 500,
        "too little was published to prove anything: {acked}"
    );
    let duplicates_total = check_every_lane(
        &listeners,
        &ledger,
        &[REALTIME, BATCH],
        Duration::from_secs(60),
    )
    .await;
    let blobs = std::fs::read_dir(disk.path().join("data/db/blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    let stats = disk.stats();
    println!("{blobs} sled blob files in the data folder (large values and nodes live there)");
    println!(
        "{cuts} power cuts: {sent} events sent, {acked} acknowledged, all delivered; \
         {failed_calls} publish calls failed, {duplicates_total} duplicate deliveries; the \
         filesystem saw {} writes, {} fsyncs, {} directory fsyncs; {:?} total",
        stats.writes,
        stats.fsyncs,
        stats.dir_fsyncs,
        started.elapsed()
    );

    router.signal("-TERM");
    let status = router.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    drop(router);
    drop(disk);
}
