//! One conformance suite for every store backend, written against the store
//! interfaces only (`EventLog`, `ConfigStore`): each property is a generic
//! `async fn`, and [`conformance_tests!`] turns them into one test per
//! property for a backend, given a function that opens a fresh, empty store.
//!
//! - sled: a new temporary folder per test, so `cargo test` always runs it.
//! - PostgreSQL: a new database per test on `WEBHOOK_ROUTER_TEST_PG`
//!   (`.ci/run` starts a throwaway server); without it these tests fail and
//!   say how to get one.

use std::collections::HashSet;
use std::sync::Arc;

use webhook_router::config::{Role, TokenConfig};
use webhook_router::domain::catalog::Catalog;
use webhook_router::domain::catalog::Mode;
use webhook_router::domain::delivery::{
    Attempt, DeliveryRecord, DeliveryState, LaneFilter, ModeTag,
};
use webhook_router::domain::event::NewEvent;
use webhook_router::domain::ids::new_id;
use webhook_router::domain::webhook::{Auth, SecretRecord, Webhook};
use webhook_router::error::Error;
use webhook_router::store::{
    ConfigStore, DeliveryLog, EventLog, LaneKey, LaneStore, StoreHealth, Take, TakeArgs,
};

/// What a backend under test offers.
pub trait Backend:
    EventLog + ConfigStore + LaneStore + DeliveryLog + StoreHealth + Clone + Send + Sync + 'static
{
}
impl<T> Backend for T where
    T: EventLog
        + ConfigStore
        + LaneStore
        + DeliveryLog
        + StoreHealth
        + Clone
        + Send
        + Sync
        + 'static
{
}

fn new_event(id: &str, mode: Mode) -> NewEvent {
    NewEvent {
        event_id: id.to_string(),
        event_name: "COURSE_ENROLLMENT".into(),
        timestamp_ms: 1_700_000_000_000,
        mode,
        json: format!(r#"{{"eventId":"{id}","data":{{"n":1}}}}"#),
    }
}

fn new_webhook(account_id: u64, name: &str) -> Webhook {
    Webhook {
        id: new_id("wh"),
        account_id,
        name: name.into(),
        description: String::new(),
        target_url: "http://127.0.0.1:9/hook".into(),
        auth: Auth::HMAC,
        event_types: vec!["COURSE_ENROLLMENT".into()],
        active: true,
        create_time_ms: 1,
        update_time_ms: 1,
        disabled_reason: String::new(),
        max_in_flight: 0,
        filter: None,
    }
}

/// Duplicates (of stored events and within one call) are reported and not stored twice.
pub async fn append_is_idempotent<S: Backend>(s: S) {
    let a = s
        .append_events(
            7,
            vec![new_event("a", Mode::Realtime), new_event("b", Mode::Batch)],
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        a.outcomes.iter().map(|o| o.duplicate).collect::<Vec<_>>(),
        [false, false]
    );
    let b = s
        .append_events(
            7,
            vec![
                new_event("b", Mode::Batch),
                new_event("c", Mode::Realtime),
                new_event("c", Mode::Realtime),
            ],
            11,
        )
        .await
        .unwrap();
    assert_eq!(
        b.outcomes.iter().map(|o| o.duplicate).collect::<Vec<_>>(),
        [true, false, true]
    );
    // Another account may use the same ids.
    let other = s
        .append_events(8, vec![new_event("a", Mode::Realtime)], 12)
        .await
        .unwrap();
    assert!(!other.outcomes[0].duplicate);
    let stored = s.read_events(7, 0, 100).await.unwrap();
    let ids: Vec<&str> = stored.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(stored[1].mode, Some(Mode::Batch), "the mode is kept");
    assert_eq!(
        stored[0].json.as_ref(),
        new_event("a", Mode::Realtime).json.as_bytes()
    );
    assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        s.read_events(8, 0, 100).await.unwrap().len(),
        1,
        "accounts are apart"
    );
    // Reading after a position starts past it.
    let rest = s.read_events(7, stored[0].seq, 100).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].event_id, "b");
}

/// Concurrent appends to one account: every acknowledged event is stored
/// exactly once, and reading in log order gives each caller's events in
/// the order it sent them.
pub async fn concurrent_appends_keep_every_event_once_in_order<S: Backend>(s: S) {
    const CALLERS: usize = 8;
    const CALLS: usize = 20;
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..CALLS {
                let events = (0..3)
                    .map(|k| new_event(&format!("c{c}-{i}-{k}"), Mode::Realtime))
                    .collect();
                let r = s.append_events(5, events, 1).await.unwrap();
                assert!(r.outcomes.iter().all(|o| !o.duplicate));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = s.read_events(5, after, 50).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    assert_eq!(all.len(), CALLERS * CALLS * 3);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "log order");
    let unique: HashSet<&str> = all.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(unique.len(), all.len(), "each event once");
    for c in 0..CALLERS {
        let mine: Vec<&str> = all
            .iter()
            .map(|e| e.event_id.as_str())
            .filter(|id| id.starts_with(&format!("c{c}-")))
            .collect();
        let sent: Vec<String> = (0..CALLS)
            .flat_map(|i| (0..3).map(move |k| format!("c{c}-{i}-{k}")))
            .collect();
        assert_eq!(mine, sent, "caller {c}'s events in the order sent");
    }
}

/// Concurrent creates cannot pass the per-account limit.
pub async fn webhook_limit_holds_under_concurrent_creates<S: Backend>(s: S) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let w = new_webhook(3, &format!("w{i}"));
            s.create_webhook(w, Some(SecretRecord::generate(1)), 5)
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(Error::ResourceExhausted(m)) => {
                assert!(m.contains("limits.max_webhooks_per_account = 5"), "{m}")
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(ok, 5);
    let (listed, more) = s.list_webhooks(3, None, 100).await.unwrap();
    assert_eq!((listed.len(), more), (5, false));
    // Other accounts have limits of their own.
    s.create_webhook(new_webhook(4, "other"), None, 5)
        .await
        .unwrap();
}

/// Create, read, list by pages, update with a secret swap.
pub async fn webhooks_round_trip<S: Backend>(s: S) {
    let mut made = Vec::new();
    for i in 0..5 {
        let w = new_webhook(9, &format!("w{i}"));
        s.create_webhook(w.clone(), Some(SecretRecord::generate(2)), 10)
            .await
            .unwrap();
        made.push(w);
    }
    let got = s.get_webhook(9, &made[0].id).await.unwrap().unwrap();
    assert_eq!(got, made[0]);
    assert!(
        s.get_webhook(10, &made[0].id).await.unwrap().is_none(),
        "another account does not see it"
    );
    let mut ids: Vec<String> = made.iter().map(|w| w.id.clone()).collect();
    ids.sort();
    let (page1, more) = s.list_webhooks(9, None, 2).await.unwrap();
    assert!(more);
    let (page2, _) = s
        .list_webhooks(9, Some(page1[1].id.clone()), 10)
        .await
        .unwrap();
    let listed: Vec<String> = page1.iter().chain(&page2).map(|w| w.id.clone()).collect();
    assert_eq!(listed, ids, "pages by id, nothing twice or missing");
    assert_eq!(s.all_webhooks().await.unwrap().len(), 5);

    let before = s.get_secret(&made[1].id).await.unwrap().unwrap();
    let rotated = before.rotate(3, 60_000);
    let swap = rotated.clone();
    let updated = s
        .update_webhook(9, &made[1].id, move |w, secret| {
            assert!(secret.is_some(), "the closure sees the current secret");
            w.name = "renamed".into();
            Ok(Some(swap))
        })
        .await
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(
        s.get_webhook(9, &made[1].id).await.unwrap().unwrap().name,
        "renamed"
    );
    assert_eq!(s.get_secret(&made[1].id).await.unwrap().unwrap(), rotated);
    // A refused change leaves it as it was.
    let refused = s
        .update_webhook(9, &made[1].id, |w, _| {
            w.name = "not kept".into();
            Err(Error::FailedPrecondition("no".into()))
        })
        .await;
    assert!(matches!(refused, Err(Error::FailedPrecondition(_))));
    assert_eq!(
        s.get_webhook(9, &made[1].id).await.unwrap().unwrap().name,
        "renamed"
    );
    assert!(matches!(
        s.update_webhook(9, "wh_missing", |_, _| Ok(None)).await,
        Err(Error::NotFound(_))
    ));
}

/// A deleted webhook is gone for good: no update revives it.
pub async fn delete_is_final<S: Backend>(s: S) {
    let w = new_webhook(11, "doomed");
    s.create_webhook(w.clone(), Some(SecretRecord::generate(1)), 5)
        .await
        .unwrap();
    // Updates racing the delete: each either happens before it or fails.
    let mut racers = Vec::new();
    for i in 0..4 {
        let (s, id) = (s.clone(), w.id.clone());
        racers.push(tokio::spawn(async move {
            s.update_webhook(11, &id, move |w, _| {
                w.description = format!("racer {i}");
                Ok(None)
            })
            .await
        }));
    }
    s.delete_webhook(11, &w.id).await.unwrap();
    for r in racers {
        match r.await.unwrap() {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert!(s.get_webhook(11, &w.id).await.unwrap().is_none());
    assert!(s.get_secret(&w.id).await.unwrap().is_none());
    assert!(s.is_deleted(&w.id));
    assert!(matches!(
        s.update_webhook(11, &w.id, |_, _| Ok(None)).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        s.delete_webhook(11, &w.id).await,
        Err(Error::NotFound(_))
    ));
    assert!(s.list_webhooks(11, None, 10).await.unwrap().0.is_empty());
}

/// First-start tokens are kept.
pub async fn bootstrap_tokens_round_trip<S: Backend>(s: S) {
    assert!(s.bootstrap_tokens().await.unwrap().is_none());
    let tokens = vec![TokenConfig {
        token: None,
        token_sha256: Some("ab".repeat(32)),
        role: Role::Admin,
        account_ids: Some(vec![1, 2]),
    }];
    assert!(s.set_bootstrap_tokens(&tokens).await.unwrap().is_none());
    let back = s.bootstrap_tokens().await.unwrap().unwrap();
    // A second router starting without tokens gets the stored ones.
    let mut later = tokens.clone();
    later[0].token_sha256 = Some("cd".repeat(32));
    let kept = s.set_bootstrap_tokens(&later).await.unwrap().unwrap();
    assert_eq!(
        kept[0].token_sha256, tokens[0].token_sha256,
        "the first ones stay"
    );
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].token_sha256, tokens[0].token_sha256);
    assert_eq!(back[0].account_ids, Some(vec![1, 2]));
}

/// A webhook of `account_id` on real-time events, created; its real-time lane.
async fn lane_of<S: Backend>(s: &S, account_id: u64) -> (LaneKey, LaneFilter) {
    let w = new_webhook(account_id, "lane");
    s.create_webhook(w.clone(), Some(SecretRecord::generate(1)), 5)
        .await
        .unwrap();
    let key = LaneKey {
        account_id,
        webhook_id: w.id.clone(),
        mode: ModeTag::Realtime,
    };
    let filter = LaneFilter::new(&w, Mode::Realtime, Arc::new(Catalog::new(&[])));
    (key, filter)
}

fn take_args(in_flight: usize) -> TakeArgs {
    TakeArgs {
        max_events: 100,
        batch_due: false,
        scan_limit: 10_000,
        in_flight,
        concurrent: false,
        now_ms: 1_700_000_000_000,
    }
}

/// What the lane takes next, waiting (up to 15 s) while it has nothing: a
/// backend that leases lanes hands a lane out once this router holds it.
async fn next_send<S: Backend>(
    s: &S,
    key: &LaneKey,
    filter: &LaneFilter,
    in_flight: usize,
) -> (DeliveryRecord, Vec<String>, bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let takes = s
            .lane_take_many(key.clone(), filter.clone(), take_args(in_flight), 1, 100)
            .await
            .unwrap();
        for t in takes {
            if let Take::Send {
                record,
                events,
                requeued,
                ..
            } = t
            {
                let ids = events.iter().map(|e| e.event_id.clone()).collect();
                return (*record, ids, requeued);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lane never handed out a payload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Whether the lane has nothing to send now (asked several times over 1 s).
async fn lane_is_idle<S: Backend>(s: &S, key: &LaneKey, filter: &LaneFilter) -> bool {
    for _ in 0..5 {
        let takes = s
            .lane_take_many(key.clone(), filter.clone(), take_args(0), 1, 100)
            .await
            .unwrap();
        if takes.iter().any(|t| matches!(t, Take::Send { .. })) {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    true
}

fn attempt(status: u16) -> Attempt {
    Attempt {
        time_ms: 1_700_000_000_000,
        status_code: status,
        latency_ms: 3,
        error: if status == 200 {
            String::new()
        } else {
            format!("HTTP {status}")
        },
    }
}

/// Records `r` as delivered the way a lane does (in memory when it can).
async fn delivered<S: Backend>(s: &S, key: &LaneKey, mut r: DeliveryRecord) {
    r.push_attempt(attempt(200));
    r.finish(DeliveryState::Delivered, 1_700_000_000_001);
    if !s.lane_finish_quick(key, &r) {
        s.lane_finish(key.clone(), r, Arc::new(Vec::new()))
            .await
            .unwrap();
    }
}

/// A lane sends its events in log order, only its mode's, and moves past
/// what it delivered once the outcomes are saved.
pub async fn a_lane_sends_in_order_and_moves_on<S: Backend>(s: S) {
    let (key, filter) = lane_of(&s, 21).await;
    s.append_events(
        21,
        vec![
            new_event("e1", Mode::Realtime),
            new_event("b1", Mode::Batch),
            new_event("e2", Mode::Realtime),
            new_event("e3", Mode::Realtime),
        ],
        1,
    )
    .await
    .unwrap();
    let (first, ids, requeued) = next_send(&s, &key, &filter, 0).await;
    assert_eq!(
        ids,
        ["e1", "e2", "e3"],
        "in log order, real-time events only"
    );
    assert!(!requeued);
    assert_eq!(first.state, DeliveryState::Pending);
    assert_eq!(first.event_ids, ids);
    delivered(&s, &key, first.clone()).await;
    assert!(s.save_lanes().await.unwrap() >= 1, "the outcome is written");
    assert!(
        lane_is_idle(&s, &key, &filter).await,
        "nothing left after the save"
    );
    s.append_events(21, vec![new_event("e4", Mode::Realtime)], 2)
        .await
        .unwrap();
    let (next, ids, _) = next_send(&s, &key, &filter, 0).await;
    assert_eq!(ids, ["e4"]);
    assert_ne!(next.id, first.id);
    let page = s
        .list_deliveries(&key.webhook_id, None, None, 10)
        .await
        .unwrap();
    assert!(
        page.deliveries
            .iter()
            .any(|d| d.id == first.id && d.state == DeliveryState::Delivered),
        "the delivered record is listed: {:?}",
        page.deliveries
    );
}

/// A payload that failed is sent again under the same id with the same
/// events, its attempts kept, also when the lane starts over (in_flight 0).
pub async fn a_failed_payload_keeps_its_id_and_events<S: Backend>(s: S) {
    let (key, filter) = lane_of(&s, 22).await;
    s.append_events(
        22,
        vec![
            new_event("f1", Mode::Realtime),
            new_event("f2", Mode::Realtime),
        ],
        1,
    )
    .await
    .unwrap();
    let (mut r, ids, _) = next_send(&s, &key, &filter, 0).await;
    r.push_attempt(attempt(503));
    r.state = DeliveryState::Retrying;
    r.next_attempt_ms = 1_700_000_000_000;
    let events = s.read_events(22, 0, 10).await.unwrap();
    let saved = s
        .lane_attempt_failed(key.clone(), r.clone(), Arc::new(events))
        .await
        .unwrap();
    assert_eq!(saved.id, r.id);
    s.append_events(22, vec![new_event("f3", Mode::Realtime)], 2)
        .await
        .unwrap();
    let (again, again_ids, _) = next_send(&s, &key, &filter, 0).await;
    assert_eq!(again.id, r.id, "the same webhook-id");
    assert_eq!(again_ids, ids, "the same events, not the newer one");
    assert_eq!(again.attempt_count, 1, "its attempt kept");
    assert_eq!(again.state, DeliveryState::Retrying);
    let page = s
        .list_deliveries(&key.webhook_id, Some(DeliveryState::Retrying), None, 10)
        .await
        .unwrap();
    assert_eq!(page.deliveries.len(), 1);
    assert_eq!(page.deliveries[0].attempts[0].status_code, 503);
}

/// A dead delivery is redelivered (requeued under a new id with its own
/// events) before newer events.
pub async fn a_dead_delivery_is_redelivered_first<S: Backend>(s: S) {
    let (key, filter) = lane_of(&s, 23).await;
    s.append_events(23, vec![new_event("d1", Mode::Realtime)], 1)
        .await
        .unwrap();
    let (mut r, _, _) = next_send(&s, &key, &filter, 0).await;
    r.push_attempt(attempt(500));
    r.finish(DeliveryState::Dead, 1_700_000_000_002);
    let events = s.read_events(23, 0, 10).await.unwrap();
    s.lane_finish(key.clone(), r.clone(), Arc::new(events))
        .await
        .unwrap();
    s.save_lanes().await.unwrap();
    let dead = s
        .list_deliveries(&key.webhook_id, Some(DeliveryState::Dead), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.deliveries.len(), 1);
    assert_eq!(dead.deliveries[0].id, r.id);
    s.append_events(23, vec![new_event("d2", Mode::Realtime)], 2)
        .await
        .unwrap();
    let requeued = s
        .redeliver(&key.webhook_id, None, 1_700_000_000_003, |_, _| {})
        .await
        .unwrap();
    assert_eq!(requeued, 1);
    let (copy, ids, from_queue) = next_send(&s, &key, &filter, 0).await;
    assert!(from_queue, "taken from the requeued deliveries");
    assert_eq!(
        ids,
        ["d1"],
        "the dead delivery's events, before the newer one"
    );
    assert_ne!(copy.id, r.id, "a new delivery id");
    assert!(copy.redelivery);
    // Redelivering again finds nothing new to requeue.
    assert_eq!(
        s.redeliver(&key.webhook_id, None, 1_700_000_000_004, |_, _| {})
            .await
            .unwrap(),
        0
    );
}

/// Recovery requeues a dead delivery of the states asked for once: two
/// recoveries racing for the same ids requeue each once between them, and
/// neither a later recovery nor a bulk redelivery takes them again.
pub async fn recovery_requeues_each_dead_delivery_once<S: Backend>(s: S) {
    let (key, filter) = lane_of(&s, 24).await;
    let mut dead = Vec::new();
    for (i, id) in ["r1", "r2"].into_iter().enumerate() {
        s.append_events(24, vec![new_event(id, Mode::Realtime)], 1 + i as i64)
            .await
            .unwrap();
        let (mut r, ids, _) = next_send(&s, &key, &filter, 0).await;
        assert_eq!(ids, [id]);
        r.push_attempt(attempt(500));
        r.finish(DeliveryState::Dead, 1_700_000_000_010 + i as i64);
        let events = s.read_events(24, i as u64, 1).await.unwrap();
        s.lane_finish(key.clone(), r.clone(), Arc::new(events))
            .await
            .unwrap();
        dead.push(r.id);
    }
    s.save_lanes().await.unwrap();
    let mut ids = dead.clone();
    ids.insert(1, new_id("msg_"));
    let expired_only = s
        .recover_deliveries(
            &key.webhook_id,
            ids.clone(),
            vec![DeliveryState::Expired],
            1_700_000_000_020,
        )
        .await
        .unwrap();
    assert_eq!(expired_only, 0, "neither is EXPIRED");
    let (a, b) = tokio::join!(
        s.recover_deliveries(
            &key.webhook_id,
            ids.clone(),
            vec![DeliveryState::Dead],
            1_700_000_000_021
        ),
        s.recover_deliveries(
            &key.webhook_id,
            ids.clone(),
            vec![DeliveryState::Dead],
            1_700_000_000_021
        ),
    );
    assert_eq!(
        a.unwrap() + b.unwrap(),
        2,
        "each dead delivery requeued once"
    );
    let again = s
        .recover_deliveries(
            &key.webhook_id,
            ids,
            vec![DeliveryState::Dead],
            1_700_000_000_022,
        )
        .await
        .unwrap();
    assert_eq!(again, 0);
    let bulk = s
        .redeliver(&key.webhook_id, None, 1_700_000_000_023, |_, _| {})
        .await
        .unwrap();
    assert_eq!(bulk, 0, "recovered ones are not requeued in bulk again");
    let mut sent = Vec::new();
    for _ in 0..2 {
        let (copy, ids, from_queue) = next_send(&s, &key, &filter, 0).await;
        assert!(from_queue && copy.redelivery);
        delivered(&s, &key, copy).await;
        sent.extend(ids);
    }
    sent.sort();
    assert_eq!(sent, ["r1", "r2"]);
    assert!(
        lane_is_idle(&s, &key, &filter).await,
        "nothing else requeued"
    );
}

/// One `#[tokio::test]` per property for the backend `$fresh` opens:
/// `$fresh()` returns `(store, guard)`, the guard keeping the store's
/// resources (a folder, a schema) alive for the test.
macro_rules! conformance_tests {
    ($backend:ident, $fresh:path) => {
        mod $backend {
            conformance_tests!(@each $fresh;
                append_is_idempotent,
                concurrent_appends_keep_every_event_once_in_order,
                webhook_limit_holds_under_concurrent_creates,
                webhooks_round_trip,
                delete_is_final,
                bootstrap_tokens_round_trip,
                a_lane_sends_in_order_and_moves_on,
                a_failed_payload_keeps_its_id_and_events,
                a_dead_delivery_is_redelivered_first,
                recovery_requeues_each_dead_delivery_once,
            );
        }
    };
    (@each $fresh:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $fresh().await;
                super::$name(store).await;
            }
        )*
    };
}

/// A sled store in a new temporary folder.
async fn fresh_sled() -> (webhook_router::store::SledStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = webhook_router::store::SledStore::open(dir.path()).unwrap();
    (store, dir)
}

conformance_tests!(sled, super::fresh_sled);

/// A PostgreSQL store on a new database of the test server.
async fn fresh_postgres() -> (webhook_router::store::PgStore, crate::common::pg::TestDb) {
    let db = crate::common::pg::TestDb::create().await;
    let store = webhook_router::store::PgStore::connect(
        &db.url,
        4,
        None,
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    (store, db)
}

conformance_tests!(postgres, super::fresh_postgres);
