//! SIGTERM on the real binary while deliveries are in flight: the gRPC port
//! stops accepting at once, an attempt that can finish within
//! `shutdown_grace_ms` finishes (and is not sent again), one that cannot is
//! cut and sent again after restart (rebuilt from the same first event), the process
//! exits 0, and every acknowledged event arrives after the restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::process::{write_router_config, RouterProcess};
use crate::common::*;

const GRACE_MS: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_deliveries_and_refuses_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_router_config(dir.path(), GRACE_MS, "");
    // A answers its first request after 1 s: within the grace period.
    let quick = Listener::start(Arc::new(|n, _| {
        let delay = if n == 0 { 1_000 } else { 0 };
        (200, vec![], Duration::from_millis(delay))
    }))
    .await;
    // B answers after 30 s until told otherwise: longer than any grace.
    let slow_mode = Arc::new(AtomicBool::new(true));
    let slow = {
        let slow_mode = slow_mode.clone();
        Listener::start(Arc::new(move |_, _| {
            let delay = if slow_mode.load(Ordering::SeqCst) {
                30_000
            } else {
                0
            };
            (200, vec![], Duration::from_millis(delay))
        }))
        .await
    };

    let mut router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    let wa = create(
        &mut admin,
        1010,
        webhook("quick", &quick.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let wb = create(
        &mut admin,
        1010,
        webhook("slow", &slow.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("t-0", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    // Both first attempts are in flight.
    quick
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    slow.wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    // More acknowledged events queue behind them.
    let later: Vec<String> = (1..=5).map(|i| format!("t-{i}")).collect();
    publish(
        &mut ingest,
        1010,
        later
            .iter()
            .map(|id| event(id, "COURSE_ENROLLMENT", 2))
            .collect(),
    )
    .await;
    let slow_msg_id = slow.requests()[0].header("webhook-id");

    let term_at = Instant::now();
    router.signal("-TERM");
    // While the delivery drains, the gRPC port refuses new connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router should still be draining the in-flight attempts"
    );
    let refused = tokio::net::TcpStream::connect(&router.addr).await;
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a new connection during shutdown: {refused:?}"
    );
    let status = router.wait_exit(Duration::from_secs(15));
    let took = term_at.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_millis(2 * GRACE_MS + 1_500),
        "shutdown took {took:?}"
    );
    // The slow attempt was cut at the grace period, not awaited for 30 s.
    assert!(
        took >= Duration::from_millis(GRACE_MS - 100),
        "took {took:?}"
    );
    let log = router.log_lines().join("\n");
    assert!(log.contains("store flushed"), "log:\n{log}");
    println!("SIGTERM to exit 0: {took:?}");
    drop(router);

    // The quick listener's answer arrived within the grace period; the slow
    // one's did not.
    let quick_before = quick.requests().len();
    assert_eq!(quick_before, 1);
    slow_mode.store(false, Ordering::SeqCst);
    let router = RouterProcess::start(&config);
    let mut admin = router.admin().await;

    let mut all = vec!["t-0".to_string()];
    all.extend(later.iter().cloned());
    let got = quick
        .wait_until(Duration::from_secs(10), |r| {
            r.iter().flat_map(|r| r.event_ids()).count() >= all.len()
        })
        .await;
    let ids: Vec<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    assert_eq!(
        ids, all,
        "quick webhook: t-0 once (its attempt finished during shutdown), then the rest"
    );
    let got = slow
        .wait_until(Duration::from_secs(10), |r| {
            r.iter().flat_map(|r| r.event_ids()).count() > all.len()
        })
        .await;
    // The cut attempt was never recorded (nothing is written before a first
    // attempt): after the restart the lane builds its payload again from
    // t-0. Its webhook-id is derived from its events: the same id for the
    // same events, another one when the payload now holds more.
    let resent_id = got[1].header("webhook-id");
    if got[1].event_ids() == got[0].event_ids() {
        assert_eq!(resent_id, slow_msg_id, "same events, same webhook-id");
    } else {
        assert_ne!(resent_id, slow_msg_id, "other events, other webhook-id");
    }
    let ids: Vec<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    let mut expected = vec!["t-0".to_string()];
    expected.extend(all.iter().cloned());
    assert_eq!(ids, expected, "slow webhook: t-0 again, then the rest");

    let dq = deliveries(&mut admin, &wa.id).await;
    let first = dq.iter().find(|d| d.event_ids == ["t-0"]).unwrap();
    assert_eq!(first.state, DeliveryState::Delivered as i32);
    assert_eq!(first.attempts.len(), 1, "{first:?}");
    // Successful outcomes reach the log within delivery.log_flush_ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        let ds = deliveries(&mut admin, &wb.id).await;
        match ds.into_iter().find(|d| d.id == resent_id) {
            Some(d) => break d,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            None => panic!("the resent delivery {resent_id} is not in the log after 5 s"),
        }
    };
    assert_eq!(first.state, DeliveryState::Delivered as i32);
    assert_eq!(first.event_ids.first().map(String::as_str), Some("t-0"));
}
