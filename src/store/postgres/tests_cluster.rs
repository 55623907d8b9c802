//! Tests of the store interfaces on PostgreSQL with one or several routers
//! (stores) sharing a schema: lanes and their fencing, takeover, sharing,
//! the janitor, redelivery, the change feed, failure. Like `tests.rs`, they
//! need `WEBHOOK_ROUTER_TEST_PG` and fail without it; each works in a fresh
//! schema. Routers here lease for [`TTL`], so a takeover takes about a second.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::engine::delivery_id;
use super::tests::{drop_schema, event, event_sized, random_schema, test_url, webhook, TestDb};
use super::*;
use crate::domain::catalog::{Catalog, Mode};
use crate::domain::delivery::{Attempt, DeliveryRecord, DeliveryState, LaneFilter, ModeTag};
use crate::domain::event::StoredEvent;
use crate::domain::now_ms;
use crate::domain::webhook::Webhook;
use crate::store::types::{Change, LaneKey, Take, TakeArgs};
use crate::store::{ConfigStore, DeliveryLog, EventLog, LaneStore, StoreHealth};

/// The routers' lease TTL in these tests.
const TTL: Duration = Duration::from_millis(1000);
/// How long a test waits for something another router does.
const PATIENCE: Duration = Duration::from_secs(8);

fn key(w: &Webhook, mode: ModeTag) -> LaneKey {
    LaneKey {
        account_id: w.account_id,
        webhook_id: w.id.clone(),
        mode,
    }
}

fn filter(w: &Webhook, mode: ModeTag) -> LaneFilter {
    LaneFilter::new(w, Mode::from(mode), Arc::new(Catalog::new(&[])))
}

fn args(max_events: usize, in_flight: usize) -> TakeArgs {
    TakeArgs {
        max_events,
        batch_due: true,
        scan_limit: 1000,
        in_flight,
        concurrent: false,
        now_ms: now_ms(),
    }
}

async fn take(s: &PgStore, w: &Webhook, mode: ModeTag, a: TakeArgs, n: usize) -> Vec<Take> {
    LaneStore::lane_take_many(s, key(w, mode), filter(w, mode), a, n, usize::MAX)
        .await
        .expect("take")
}

/// The payload of a Send.
fn sent(t: Take) -> (DeliveryRecord, Vec<StoredEvent>, u64, bool) {
    match t {
        Take::Send {
            record,
            events,
            taken,
            requeued,
        } => (*record, events, taken, requeued),
        other => panic!("expected a Send, got {other:?}"),
    }
}

/// Takes until the lane sends (e.g. once this router holds it).
async fn take_when_held(
    s: &PgStore,
    w: &Webhook,
    mode: ModeTag,
    a: TakeArgs,
) -> (DeliveryRecord, Vec<StoredEvent>, u64, bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut takes = take(s, w, mode, a, 1).await;
        if matches!(takes.first(), Some(Take::Send { .. })) {
            return sent(takes.remove(0));
        }
        assert!(
            Instant::now() < deadline,
            "the lane never sent: {takes:?} ({})",
            s.owner()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn holds(s: &PgStore, k: &LaneKey) -> bool {
    s.lane_tallies().iter().any(|(h, _)| h == k)
}

fn held_count(s: &PgStore) -> usize {
    s.lane_tallies().len()
}

/// The lane as stored: cursor and recorded deliveries.
async fn stored_lane(s: &PgStore, w: &Webhook, mode: ModeTag) -> engine::LaneState {
    let client = s.client().await.unwrap();
    let row = client
        .query_one(
            "SELECT cursor_seq, state FROM lanes WHERE webhook_id = $1 AND mode = $2",
            &[&w.id, &webhooks::lane_mode_code(mode)],
        )
        .await
        .unwrap();
    engine::LaneState::from_row(to_u64(row.get(0)), row.get(1))
}

async fn stored_delivery(s: &PgStore, w: &Webhook, id: &str) -> Option<DeliveryRecord> {
    s.delivery_with_payload(&w.id, id)
        .await
        .unwrap()
        .map(|(r, _)| r)
}

async fn stored_count(s: &PgStore, sql: &str) -> i64 {
    let client = s.client().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

fn attempt(status: u16) -> Attempt {
    Attempt {
        time_ms: now_ms(),
        status_code: status,
        latency_ms: 1,
        error: if status == 200 {
            String::new()
        } else {
            format!("HTTP {status}")
        },
    }
}

fn delivered(mut r: DeliveryRecord) -> DeliveryRecord {
    r.push_attempt(attempt(200));
    r.finish(DeliveryState::Delivered, now_ms());
    r
}

/// Waits for a change matching `want` on `rx`.
async fn expect_change(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    what: &str,
    within: Duration,
    want: impl Fn(&Change) -> bool,
) -> Change {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(c)) if want(&c) => return c,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("change feed closed: {e}"),
            Err(_) => panic!("no change {what} within {within:?}"),
        }
    }
}

/// A schema whose first store is shut down at once: the test's routers
/// are `another` stores, so each can be dropped as a crash.
async fn cluster() -> TestDb {
    let db = TestDb::with_ttl(TTL).await;
    db.store.shutdown().await;
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_payload_moves_the_stored_cursor_only_when_saved() {
    let db = TestDb::with_ttl(TTL).await;
    let s = &db.store;
    let w = webhook(1);
    ConfigStore::create_webhook(s, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("the new lanes are leased", || async { holds(s, &k) }).await;
    EventLog::append_events(s, 1, vec![event("e1"), event("e2"), event("e3")], now_ms())
        .await
        .unwrap();
    assert_eq!(
        EventLog::durable_head(s, 1),
        3,
        "own appends move the cached head"
    );
    let (r, events, taken, requeued) = sent(
        take(s, &w, ModeTag::Realtime, args(2, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!((r.seqs.clone(), taken, requeued), (vec![1, 2], 2, false));
    assert_eq!(
        r.id,
        delivery_id(&k, &events),
        "the id is derived from the lane and events"
    );
    assert_eq!(stored_lane(s, &w, ModeTag::Realtime).await.cursor, 0);
    // Delivered: in memory until the next save.
    let r = delivered(r);
    assert!(s.lane_finish_quick(&k, &r));
    assert_eq!(stored_lane(s, &w, ModeTag::Realtime).await.cursor, 0);
    assert!(stored_delivery(s, &w, &r.id).await.is_none());
    assert_eq!(LaneStore::save_lanes(s).await.unwrap(), 1);
    let lane = stored_lane(s, &w, ModeTag::Realtime).await;
    assert_eq!((lane.cursor, lane.head.clone()), (2, None));
    assert_eq!(
        stored_delivery(s, &w, &r.id).await.unwrap().state,
        DeliveryState::Delivered
    );
    // The list shows it; the next take is the third event.
    let page = DeliveryLog::list_deliveries(s, &w.id, None, None, 10)
        .await
        .unwrap();
    assert_eq!(page.deliveries.len(), 1);
    assert!(page.next_after.is_none());
    let (r3, _, _, _) = sent(
        take(s, &w, ModeTag::Realtime, args(2, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!(r3.seqs, [3]);
    // Nothing dirty, nothing written.
    let r3 = delivered(r3);
    assert!(s.lane_finish_quick(&k, &r3));
    assert_eq!(LaneStore::save_lanes(s).await.unwrap(), 1);
    assert_eq!(LaneStore::save_lanes(s).await.unwrap(), 0);
    assert_eq!(stored_lane(s, &w, ModeTag::Realtime).await.cursor, 3);
    assert_eq!(s.fenced_writes(), 0);
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_repeats_the_payload_under_the_same_id_on_the_next_owner() {
    let db = cluster().await;
    let a = db.another(None).await.unwrap();
    let w = webhook(1);
    ConfigStore::create_webhook(&a, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("a leases the lanes", || async { holds(&a, &k) }).await;
    EventLog::append_events(&a, 1, vec![event("e1"), event("e2")], now_ms())
        .await
        .unwrap();
    let (x, events, _, _) = sent(
        take(&a, &w, ModeTag::Realtime, args(10, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!(x.seqs, [1, 2]);
    let b = db.another(None).await.unwrap();
    let mut changes = b.changes();
    // a "sends" it, delivered, and dies before saving.
    assert!(a.lane_finish_quick(&k, &delivered(x.clone())));
    drop(a);
    let (again, events_again, taken, _) =
        take_when_held(&b, &w, ModeTag::Realtime, args(10, 0)).await;
    assert_eq!(again.id, x.id, "the same webhook-id");
    assert_eq!(again.seqs, x.seqs);
    assert_eq!(taken, 2);
    assert_eq!(
        events_again.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
        events.iter().map(|e| &e.event_id).collect::<Vec<_>>()
    );
    expect_change(
        &mut changes,
        "LaneAcquired",
        Duration::from_secs(1),
        |c| matches!(c, Change::LaneAcquired(l) if *l == k),
    )
    .await;
    assert!(
        stored_delivery(&b, &w, &x.id).await.is_none(),
        "a never wrote it"
    );
    b.shutdown().await;
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_resumes_on_the_next_owner_under_its_id_with_its_attempts() {
    let db = cluster().await;
    let a = db.another(None).await.unwrap();
    let w = webhook(1);
    ConfigStore::create_webhook(&a, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("a leases the lanes", || async { holds(&a, &k) }).await;
    EventLog::append_events(&a, 1, vec![event("e1"), event("e2")], now_ms())
        .await
        .unwrap();
    let (mut x, events, _, _) = sent(
        take(&a, &w, ModeTag::Realtime, args(1, 0), 1)
            .await
            .remove(0),
    );
    x.push_attempt(attempt(503));
    x.state = DeliveryState::Retrying;
    x.next_attempt_ms = now_ms() + 60_000;
    let saved = LaneStore::lane_attempt_failed(&a, k.clone(), x.clone(), Arc::new(events.clone()))
        .await
        .unwrap();
    assert!(saved.events_kept);
    // Durable at once: the record with its events, the lane naming it, the
    // cursor past it.
    let lane = stored_lane(&a, &w, ModeTag::Realtime).await;
    assert_eq!(
        (lane.cursor, lane.head.as_deref()),
        (1, Some(x.id.as_str()))
    );
    let stored = stored_delivery(&a, &w, &x.id).await.unwrap();
    assert_eq!(
        (stored.state, stored.attempt_count),
        (DeliveryState::Retrying, 1)
    );
    let b = db.another(None).await.unwrap();
    drop(a);
    let (resumed, events_again, taken, requeued) =
        take_when_held(&b, &w, ModeTag::Realtime, args(1, 0)).await;
    assert_eq!(resumed.id, x.id);
    assert_eq!((resumed.attempt_count, resumed.attempts.len()), (1, 1));
    assert_eq!(resumed.attempts[0].status_code, 503);
    assert_eq!(resumed.next_attempt_ms, x.next_attempt_ms, "its schedule");
    assert_eq!((taken, requeued), (0, false));
    assert_eq!(events_again, events);
    // Finished by b; then the second event.
    let done = LaneStore::lane_finish(&b, k.clone(), delivered(resumed), Arc::new(events_again))
        .await
        .unwrap();
    assert_eq!(
        stored_delivery(&b, &w, &done.id).await.unwrap().state,
        DeliveryState::Delivered
    );
    let (next, _, _, _) = sent(
        take(&b, &w, ModeTag::Realtime, args(1, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!(next.seqs, [2]);
    b.shutdown().await;
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_fenced_and_its_writes_change_nothing() {
    let db = cluster().await;
    let a = db.another(None).await.unwrap();
    let w = webhook(1);
    ConfigStore::create_webhook(&a, w.clone(), None, 10)
        .await
        .unwrap();
    let rt = key(&w, ModeTag::Realtime);
    let bt = key(&w, ModeTag::Batch);
    wait_until("a leases both lanes", || async {
        holds(&a, &rt) && holds(&a, &bt)
    })
    .await;
    EventLog::append_events(
        &a,
        1,
        vec![
            event("r1"),
            event("r2"),
            event_sized("b1", "COURSE_ENROLLMENT", Mode::Batch, 0),
        ],
        now_ms(),
    )
    .await
    .unwrap();
    let mut takes = take(&a, &w, ModeTag::Realtime, args(1, 0), 2).await;
    let (x2, x2_events, _, _) = sent(takes.remove(1));
    let (mut x1, x1_events, _, _) = sent(takes.remove(0));
    let (y1, _, _, _) = sent(take(&a, &w, ModeTag::Batch, args(1, 0), 1).await.remove(0));
    // a stops (SIGSTOP): no renewal, no heartbeat; b takes both lanes over.
    let b = db.another(None).await.unwrap();
    a.pause_leases(true);
    wait_until("b takes both lanes over", || async {
        holds(&b, &rt) && holds(&b, &bt)
    })
    .await;
    let before_b = (
        stored_lane(&b, &w, ModeTag::Realtime).await,
        stored_lane(&b, &w, ModeTag::Batch).await,
    );
    // a, not knowing, goes on: no new work is handed out...
    assert!(matches!(
        take(&a, &w, ModeTag::Realtime, args(1, 0), 1).await[..],
        [Take::Idle { more: false }]
    ));
    // ...and every write is fenced: a failed attempt (refused by the
    // database: the lane is dropped), a finish on the lane now dropped, a
    // batch save (refused by the database).
    x1.push_attempt(attempt(500));
    x1.state = DeliveryState::Retrying;
    x1.next_attempt_ms = now_ms() + 1000;
    let back = LaneStore::lane_attempt_failed(&a, rt.clone(), x1.clone(), Arc::new(x1_events))
        .await
        .unwrap();
    assert!(!back.events_kept, "not kept: not written");
    assert_eq!(a.fenced_writes(), 1);
    assert!(
        !a.lane_finish_quick(&rt, &delivered(x2.clone())),
        "the lane is dropped"
    );
    LaneStore::lane_finish(&a, rt.clone(), delivered(x2.clone()), Arc::new(x2_events))
        .await
        .unwrap();
    assert_eq!(a.fenced_writes(), 2);
    assert!(
        a.lane_finish_quick(&bt, &delivered(y1.clone())),
        "memory only"
    );
    assert_eq!(LaneStore::save_lanes(&a).await.unwrap(), 0);
    assert_eq!(a.fenced_writes(), 3);
    assert!(a.lane_tallies().is_empty(), "a holds nothing now");
    // Nothing a wrote is stored.
    assert_eq!(stored_count(&b, "SELECT count(*) FROM deliveries").await, 0);
    assert_eq!(
        (
            stored_lane(&b, &w, ModeTag::Realtime).await,
            stored_lane(&b, &w, ModeTag::Batch).await
        ),
        before_b
    );
    // b sends the same payloads again, under the same ids.
    let (x1b, _, _, _) = sent(
        take(&b, &w, ModeTag::Realtime, args(1, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!(x1b.id, x1.id);
    assert_eq!(x1b.attempt_count, 0, "a's attempt was never recorded");
    let (y1b, _, _, _) = sent(take(&b, &w, ModeTag::Batch, args(1, 0), 1).await.remove(0));
    assert_eq!(y1b.id, y1.id);
    assert_eq!(b.fenced_writes(), 0);
    b.shutdown().await;
    a.shutdown().await;
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_ten_lanes_and_one_takes_all_when_the_other_leaves() {
    let db = TestDb::with_ttl(TTL).await;
    let a = &db.store;
    for _ in 0..5 {
        ConfigStore::create_webhook(a, webhook(1), None, 10)
            .await
            .unwrap();
    }
    wait_until("a leases all 10", || async { held_count(a) == 10 }).await;
    let b = db.another(None).await.unwrap();
    wait_until("a and b hold 5 each", || async {
        held_count(a) == 5 && held_count(&b) == 5
    })
    .await;
    let ka: HashSet<LaneKey> = a.lane_tallies().into_iter().map(|(k, _)| k).collect();
    let kb: HashSet<LaneKey> = b.lane_tallies().into_iter().map(|(k, _)| k).collect();
    assert!(ka.is_disjoint(&kb));
    let client = a.client().await.unwrap();
    let owners: i64 = client
        .query_one(
            "SELECT count(DISTINCT lease_owner) FROM lanes WHERE lease_until > now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owners, 2);
    drop(client);
    // b leaves (releasing): a takes its lanes at its next round.
    let started = Instant::now();
    b.shutdown().await;
    wait_until("a holds all 10 again", || async { held_count(a) == 10 }).await;
    assert!(
        started.elapsed() < TTL,
        "released lanes go at the next round, not after the TTL"
    );
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_runs_on_one_of_two_routers_only() {
    let db = TestDb::with_ttl(TTL).await;
    let a = &db.store;
    let w = webhook(1);
    ConfigStore::create_webhook(a, w.clone(), None, 10)
        .await
        .unwrap();
    let b = db.another(None).await.unwrap();
    wait_until("one lane each", || async {
        held_count(a) == 1 && held_count(&b) == 1
    })
    .await;
    // Five old events no lane took, and finished deliveries long past retention.
    EventLog::append_events(
        a,
        1,
        (1..=5).map(|i| event(&format!("old{i}"))).collect(),
        1000,
    )
    .await
    .unwrap();
    let mut old = Vec::new();
    for (i, state) in [
        DeliveryState::Delivered,
        DeliveryState::Delivered,
        DeliveryState::Dead,
        DeliveryState::Expired,
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = DeliveryRecord::new(
            1,
            &w.id,
            ModeTag::Realtime,
            [(1u64, format!("x{i}"))].into_iter(),
            0,
        );
        r.finish(state, 10);
        old.push(r);
    }
    a.insert_deliveries(&old).await.unwrap();
    let now = now_ms();
    let catalog = Arc::new(Catalog::new(&[]));
    let mut reports = Vec::new();
    for _ in 0..2 {
        for s in [a, &b] {
            let r = LaneStore::janitor_round(s, catalog.clone(), now, 60_000, 60_000)
                .await
                .unwrap();
            reports.push((s.owner().to_string(), r));
        }
    }
    let workers: HashSet<&str> = reports
        .iter()
        .filter(|(_, r)| r.purged > 0 || r.trimmed > 0)
        .map(|(o, _)| o.as_str())
        .collect();
    assert_eq!(workers.len(), 1, "{reports:?}");
    let purged: usize = reports.iter().map(|(_, r)| r.purged).sum();
    let trimmed: u64 = reports.iter().map(|(_, r)| r.trimmed).sum();
    assert_eq!((purged, trimmed), (4, 5), "{reports:?}");
    // The real-time lane's holder expired its five events.
    let expired: Vec<_> = reports
        .iter()
        .flat_map(|(_, r)| r.expired.clone())
        .collect();
    assert_eq!(expired, vec![(key(&w, ModeTag::Realtime), 5)]);
    assert_eq!(stored_count(a, "SELECT count(*) FROM events").await, 0);
    let page = DeliveryLog::list_deliveries(a, &w.id, Some(DeliveryState::Expired), None, 10)
        .await
        .unwrap();
    assert_eq!(page.deliveries.len(), 1);
    assert_eq!(page.deliveries[0].event_ids.len(), 5);
    assert_eq!(stored_lane(a, &w, ModeTag::Realtime).await.cursor, 5);
    assert_eq!(stored_lane(a, &w, ModeTag::Batch).await.cursor, 5);
    b.shutdown().await;
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_dead_delivery_is_taken_first() {
    let db = TestDb::with_ttl(TTL).await;
    let s = &db.store;
    let w = webhook(1);
    ConfigStore::create_webhook(s, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("the lanes are leased", || async { holds(s, &k) }).await;
    EventLog::append_events(s, 1, vec![event("e1"), event("e2")], now_ms())
        .await
        .unwrap();
    let (mut x, events, _, _) = sent(
        take(s, &w, ModeTag::Realtime, args(1, 0), 1)
            .await
            .remove(0),
    );
    x.push_attempt(attempt(500));
    x.state = DeliveryState::Retrying;
    let x = LaneStore::lane_attempt_failed(s, k.clone(), x, Arc::new(events.clone()))
        .await
        .unwrap();
    let mut dead = x.clone();
    dead.finish(DeliveryState::Dead, now_ms());
    LaneStore::lane_finish(s, k.clone(), dead, Arc::new(events.clone()))
        .await
        .unwrap();
    let progress = Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = progress.clone();
    let n = DeliveryLog::redeliver(s, &w.id, None, now_ms(), move |d, t| {
        p.lock().unwrap().push((d, t))
    })
    .await
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(*progress.lock().unwrap(), vec![(1, 1)]);
    assert_eq!(
        s.lane_tallies()
            .iter()
            .find(|(l, _)| *l == k)
            .unwrap()
            .1
            .requeued(),
        1
    );
    // Taken before the second event: a copy with the same events.
    let (copy, copy_events, taken, requeued) = sent(
        take(s, &w, ModeTag::Realtime, args(1, 0), 1)
            .await
            .remove(0),
    );
    assert!(requeued && copy.redelivery && copy.events_kept);
    assert_ne!(copy.id, x.id);
    assert_eq!(taken, 0);
    assert_eq!(copy_events, events);
    assert_eq!(
        s.lane_tallies()
            .iter()
            .find(|(l, _)| *l == k)
            .unwrap()
            .1
            .requeued(),
        0
    );
    LaneStore::lane_finish(s, k.clone(), delivered(copy.clone()), Arc::new(copy_events))
        .await
        .unwrap();
    assert_eq!(
        stored_delivery(s, &w, &copy.id).await.unwrap().state,
        DeliveryState::Delivered
    );
    let (next, _, _, requeued) = sent(
        take(s, &w, ModeTag::Realtime, args(1, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!((next.seqs.clone(), requeued), (vec![2], false));
    // Each dead one once without ids; by id, again.
    assert_eq!(
        DeliveryLog::redeliver(s, &w.id, None, now_ms(), |_, _| {})
            .await
            .unwrap(),
        0
    );
    assert!(stored_delivery(s, &w, &x.id).await.unwrap().redelivered);
    assert_eq!(
        DeliveryLog::redeliver(s, &w.id, Some(vec![x.id.clone()]), now_ms(), |_, _| {})
            .await
            .unwrap(),
        1
    );
    let e = DeliveryLog::redeliver(s, &w.id, Some(vec!["msg_nope".into()]), now_ms(), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_reports_another_routers_append_webhook_change_and_outcome() {
    let db = TestDb::with_ttl(TTL).await;
    let a = &db.store;
    let b = db.another(None).await.unwrap();
    let mut on_b = b.changes();
    let mut on_a = a.changes();
    let started = Instant::now();
    EventLog::append_events(a, 9, vec![event("e1")], now_ms())
        .await
        .unwrap();
    expect_change(&mut on_b, "Events", Duration::from_secs(2), |c| {
        matches!(
            c,
            Change::Events {
                account_id: 9,
                head_seq: 1
            }
        )
    })
    .await;
    assert_eq!(EventLog::durable_head(&b, 9), 1);
    let took = started.elapsed();
    let w = webhook(9);
    ConfigStore::create_webhook(a, w.clone(), None, 10)
        .await
        .unwrap();
    expect_change(
        &mut on_b,
        "Webhook (created)",
        Duration::from_secs(2),
        |c| matches!(c, Change::Webhook { account_id: 9, webhook_id } if *webhook_id == w.id),
    )
    .await;
    ConfigStore::update_webhook(a, 9, &w.id, |w, _| {
        w.name = "renamed".into();
        Ok(None)
    })
    .await
    .unwrap();
    expect_change(
        &mut on_b,
        "Webhook (updated)",
        Duration::from_secs(2),
        |c| matches!(c, Change::Webhook { webhook_id, .. } if *webhook_id == w.id),
    )
    .await;
    // An outcome written by whichever router holds the real-time lane
    // reaches the other.
    let k = key(&w, ModeTag::Realtime);
    EventLog::append_events(a, 9, vec![event("e2")], now_ms())
        .await
        .unwrap();
    let (writer, listener) = loop {
        if holds(a, &k) {
            break (a, &mut on_b);
        }
        if holds(&b, &k) {
            break (&b, &mut on_a);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (x, _, _, _) = take_when_held(writer, &w, ModeTag::Realtime, args(10, 0)).await;
    assert_eq!(x.seqs, [2]);
    assert!(writer.lane_finish_quick(&k, &delivered(x.clone())));
    LaneStore::save_lanes(writer).await.unwrap();
    let c = expect_change(
        listener,
        "Outcome",
        Duration::from_secs(2),
        |c| matches!(c, Change::Outcome(r) if r.id == x.id),
    )
    .await;
    let Change::Outcome(r) = c else {
        unreachable!()
    };
    assert_eq!(r.state, DeliveryState::Delivered);
    eprintln!("another router's append seen after {took:?}");
    b.shutdown().await;
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_deleted_elsewhere_ends_its_lanes_here() {
    let db = TestDb::with_ttl(TTL).await;
    let a = &db.store;
    let w = webhook(1);
    ConfigStore::create_webhook(a, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("a leases the lane", || async { holds(a, &k) }).await;
    assert!(matches!(
        take(a, &w, ModeTag::Realtime, args(1, 0), 1).await[..],
        [Take::Idle { .. }]
    ));
    let b = super::PgStore::connect_passive_in_schema(&db.url, &db.schema, 2, None)
        .await
        .unwrap();
    ConfigStore::delete_webhook(&b, 1, &w.id).await.unwrap();
    assert!(ConfigStore::is_deleted(&b, &w.id));
    wait_until("a sees the deletion", || async {
        ConfigStore::is_deleted(a, &w.id)
    })
    .await;
    assert!(matches!(
        take(a, &w, ModeTag::Realtime, args(1, 0), 1).await[..],
        [Take::Gone]
    ));
    assert!(!holds(a, &k));
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallies_count_another_routers_appends_on_held_lanes_only() {
    let db = TestDb::with_ttl(TTL).await;
    let a = &db.store;
    let w = webhook(1);
    ConfigStore::create_webhook(a, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("a leases the lane", || async { holds(a, &k) }).await;
    // The first take seeds the tally.
    assert!(matches!(
        take(a, &w, ModeTag::Realtime, args(2, 0), 1).await[..],
        [Take::Idle { .. }]
    ));
    let tally = a
        .lane_tallies()
        .into_iter()
        .find(|(l, _)| *l == k)
        .unwrap()
        .1;
    assert_eq!(tally.backlog(), 0);
    // Another router (leasing nothing) appends.
    let b = super::PgStore::connect_passive_in_schema(&db.url, &db.schema, 2, None)
        .await
        .unwrap();
    EventLog::append_events(
        &b,
        1,
        (1..=3).map(|i| event(&format!("e{i}"))).collect(),
        4242,
    )
    .await
    .unwrap();
    assert!(b.lane_tallies().is_empty(), "b holds no lane");
    wait_until("a counts b's appends", || async { tally.pending() == 3 }).await;
    // The oldest waiting event, from what the lane knows (looked up once).
    let f = filter(&w, ModeTag::Realtime);
    wait_until("next ingest time", || async {
        LaneStore::lane_next_ingest_ms(a, &k, &f, 100).unwrap() == Some(4242)
    })
    .await;
    let (x, _, _, _) = sent(
        take(a, &w, ModeTag::Realtime, args(2, 0), 1)
            .await
            .remove(0),
    );
    assert_eq!(
        (tally.pending(), tally.backlog(), tally.head_ingest_ms()),
        (1, 3, Some(4242))
    );
    assert!(a.lane_finish_quick(&k, &delivered(x)));
    assert_eq!(tally.backlog(), 1);
    db.done().await;
}

/// A concurrent lane (`max_in_flight` > 1): what is stored after each
/// outcome is what a takeover resumes from (the sled store's test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_lane_stores_its_cursor_at_its_oldest_unrecorded_payload() {
    let db = TestDb::with_ttl(TTL).await;
    let s = &db.store;
    let mut w = webhook(1);
    w.max_in_flight = 4;
    ConfigStore::create_webhook(s, w.clone(), None, 10)
        .await
        .unwrap();
    let k = key(&w, ModeTag::Realtime);
    wait_until("the lane is leased", || async { holds(s, &k) }).await;
    let cargs = |in_flight| TakeArgs {
        concurrent: true,
        ..args(1, in_flight)
    };
    EventLog::append_events(
        s,
        1,
        (1..=3).map(|i| event(&format!("e{i}"))).collect(),
        now_ms(),
    )
    .await
    .unwrap();
    let mut sends: Vec<_> = take(s, &w, ModeTag::Realtime, cargs(0), 3)
        .await
        .into_iter()
        .map(sent)
        .collect();
    assert_eq!(sends.len(), 3);
    let (mut third, third_events, _, _) = sends.pop().unwrap();
    let (second, _, _, _) = sends.pop().unwrap();
    let (mut first, first_events, _, _) = sends.pop().unwrap();
    assert_eq!((first.seqs.clone(), third.seqs.clone()), (vec![1], vec![3]));
    // The second goes through: saved, but the cursor stays before the first.
    assert!(s.lane_finish_quick(&k, &delivered(second.clone())));
    LaneStore::save_lanes(s).await.unwrap();
    assert_eq!(
        stored_lane(s, &w, ModeTag::Realtime).await,
        engine::LaneState::default()
    );
    assert!(stored_delivery(s, &w, &second.id).await.is_some());
    // The first fails: recorded with its events; the cursor moves to the third.
    first.push_attempt(attempt(503));
    first.state = DeliveryState::Retrying;
    LaneStore::lane_attempt_failed(s, k.clone(), first.clone(), Arc::new(first_events))
        .await
        .unwrap();
    let st = stored_lane(s, &w, ModeTag::Realtime).await;
    assert_eq!(
        (st.cursor, st.parallel.clone()),
        (2, vec![first.id.clone()])
    );
    // The third fails once, then goes through the slow way.
    third.push_attempt(attempt(503));
    third.state = DeliveryState::Retrying;
    let third = LaneStore::lane_attempt_failed(s, k.clone(), third, Arc::new(third_events.clone()))
        .await
        .unwrap();
    assert!(
        !s.lane_finish_quick(&k, &delivered(third.clone())),
        "a recorded one"
    );
    LaneStore::lane_finish(s, k.clone(), delivered(third), Arc::new(third_events))
        .await
        .unwrap();
    LaneStore::save_lanes(s).await.unwrap();
    let st = stored_lane(s, &w, ModeTag::Realtime).await;
    assert_eq!(
        (st.cursor, st.parallel.clone()),
        (3, vec![first.id.clone()])
    );
    // Starting over: the first resumes under its id, then nothing is left.
    let (again, _, _, _) = sent(take(s, &w, ModeTag::Realtime, cargs(0), 1).await.remove(0));
    assert_eq!(again.id, first.id);
    assert!(matches!(
        take(s, &w, ModeTag::Realtime, cargs(1), 1).await[..],
        [Take::Idle { more: false }]
    ));
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_flips_when_the_connections_are_killed_and_clears_when_back() {
    let app = format!("flip_{:08x}", rand::random::<u32>());
    let base = test_url();
    let url = if base.contains('?') {
        format!("{base}&application_name={app}")
    } else {
        format!("{base}?application_name={app}")
    };
    let schema = random_schema();
    let store = PgStore::connect_in_schema(&url, &schema, 4, None, TTL)
        .await
        .unwrap();
    assert!(StoreHealth::failure(&store).is_none());
    let mut watch = StoreHealth::watch_failure(&store);
    // Kill every connection of this store, again and again, while it works.
    let (killer, conn) = tokio_postgres::connect(&base, NoTls).await.unwrap();
    tokio::spawn(conn);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kill = {
        let stop = stop.clone();
        let app = app.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                killer
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1",
                        &[&app],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let flipped = Instant::now();
    while StoreHealth::failure(&store).is_none() {
        let _ = EventLog::read_events(&store, 1, 0, 10).await;
        assert!(flipped.elapsed() < PATIENCE, "the store never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reason = StoreHealth::failure(&store).unwrap();
    assert!(watch.borrow_and_update().is_some());
    eprintln!("failed after {:?}: {reason}", flipped.elapsed());
    stop.store(true, Ordering::Relaxed);
    kill.await.unwrap();
    let back = Instant::now();
    tokio::time::timeout(PATIENCE, watch.wait_for(|f| f.is_none()))
        .await
        .expect("the failure clears")
        .unwrap();
    eprintln!(
        "cleared {:?} after the database answered again",
        back.elapsed()
    );
    EventLog::append_events(&store, 1, vec![event("after")], now_ms())
        .await
        .unwrap();
    store.shutdown().await;
    drop_schema(&base, &schema).await;
}

/// Measures the lane hot path (take, delivered in memory, batched saves)
/// with 1 and 50 lanes; run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_lane_throughput() {
    let url = test_url();
    let schema = random_schema();
    let s = PgStore::connect_in_schema(&url, &schema, 16, None, Duration::from_secs(10))
        .await
        .unwrap();
    for (lanes, events_per_lane, max_events) in
        [(1usize, 3000usize, 1usize), (50, 400, 1), (50, 4000, 100)]
    {
        let mut hooks = Vec::new();
        let account = lanes as u64 * 1000 + max_events as u64;
        for _ in 0..lanes {
            let w = webhook(account);
            ConfigStore::create_webhook(&s, w.clone(), None, 100)
                .await
                .unwrap();
            hooks.push(w);
        }
        wait_until("all leased", || async {
            hooks.iter().all(|w| holds(&s, &key(w, ModeTag::Realtime)))
        })
        .await;
        for chunk in (0..events_per_lane).collect::<Vec<_>>().chunks(500) {
            let evs = chunk.iter().map(|i| event(&format!("m{i}"))).collect();
            EventLog::append_events(&s, account, evs, now_ms())
                .await
                .unwrap();
        }
        let saver = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut saves = 0u32;
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if LaneStore::save_lanes(&s).await.is_err() {
                        return saves;
                    }
                    saves += 1;
                }
            })
        };
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for w in hooks.clone() {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let k = key(&w, ModeTag::Realtime);
                let mut payloads = 0usize;
                let mut events = 0usize;
                while events < events_per_lane {
                    let takes = LaneStore::lane_take_many(
                        &s,
                        k.clone(),
                        filter(&w, ModeTag::Realtime),
                        args(max_events, 0),
                        16,
                        100,
                    )
                    .await
                    .unwrap();
                    for t in takes {
                        if let Take::Send {
                            record, events: e, ..
                        } = t
                        {
                            events += e.len();
                            payloads += 1;
                            let r = delivered(*record);
                            if !s.lane_finish_quick(&k, &r) {
                                LaneStore::lane_finish(&s, k.clone(), r, Arc::new(e))
                                    .await
                                    .unwrap();
                            }
                        }
                    }
                }
                payloads
            }));
        }
        let mut payloads = 0;
        for t in tasks {
            payloads += t.await.unwrap();
        }
        let elapsed = started.elapsed();
        saver.abort();
        LaneStore::save_lanes(&s).await.unwrap();
        eprintln!(
            "{lanes} lane(s), {max_events} event(s) per payload: {payloads} payloads, {} events in {elapsed:?}: {:.0} payloads/s, {:.0} events/s",
            lanes * events_per_lane,
            payloads as f64 / elapsed.as_secs_f64(),
            (lanes * events_per_lane) as f64 / elapsed.as_secs_f64()
        );
    }
    s.shutdown().await;
    drop_schema(&url, &schema).await;
}
