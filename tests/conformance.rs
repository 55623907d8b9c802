//! One conformance suite for every store backend, written against the store
//! interfaces only (`EventLog`, `ConfigStore`): each property is a generic
//! `async fn`, and [`conformance_tests!`] turns them into one test per
//! property for a backend, given a function that opens a fresh, empty store.
//!
//! - sled: a new temporary folder per test, so `cargo test` always runs it.

use std::collections::HashSet;

use webhook_router::config::{Role, TokenConfig};
use webhook_router::domain::catalog::Mode;
use webhook_router::domain::event::NewEvent;
use webhook_router::domain::ids::new_id;
use webhook_router::domain::webhook::{Auth, SecretRecord, Webhook};
use webhook_router::error::Error;
use webhook_router::store::{ConfigStore, EventLog};

/// What a backend under test offers.
pub trait Backend: EventLog + ConfigStore + Clone + Send + Sync + 'static {}
impl<T: EventLog + ConfigStore + Clone + Send + Sync + 'static> Backend for T {}

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
        auth: Auth::Signature,
        event_types: vec!["COURSE_ENROLLMENT".into()],
        active: true,
        create_time_ms: 1,
        update_time_ms: 1,
        disabled_reason: String::new(),
        max_in_flight: 0,
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
                assert!(m.contains("limit 5"), "{m}")
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
    s.set_bootstrap_tokens(&tokens).await.unwrap();
    let back = s.bootstrap_tokens().await.unwrap().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].token_sha256, tokens[0].token_sha256);
    assert_eq!(back[0].account_ids, Some(vec![1, 2]));
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
