//! Tests of the PostgreSQL backend. Those that need a server read its URL
//! from `WEBHOOK_ROUTER_TEST_PG` and FAIL, saying how to start one, when it
//! is unset. Each works in a fresh random schema, dropped at its end.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::*;
use crate::domain::catalog::{Catalog, Mode};
use crate::domain::delivery::{DeliveryRecord, DeliveryState, LaneFilter, ModeTag};
use crate::domain::event::NewEvent;
use crate::domain::ids;
use crate::domain::webhook::{Auth, SecretRecord, Webhook};
use crate::store::crypt;

const HOW_TO: &str = "WEBHOOK_ROUTER_TEST_PG is not set: the PostgreSQL backend's tests need a \
PostgreSQL 15 server. Start a throwaway one on loopback and point the variable at it, e.g. (as root):
  d=$(mktemp -d); chown postgres \"$d\"
  runuser -u postgres -- initdb -D \"$d/data\" -U postgres --auth=trust
  runuser -u postgres -- pg_ctl -D \"$d/data\" -o \"-c listen_addresses=127.0.0.1 -p 55432 -k $d\" -l \"$d/log\" -w start
  export WEBHOOK_ROUTER_TEST_PG=postgres://postgres@127.0.0.1:55432/postgres";

pub(super) fn test_url() -> String {
    match std::env::var("WEBHOOK_ROUTER_TEST_PG") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => panic!("{HOW_TO}"),
    }
}

pub(super) fn random_schema() -> String {
    format!("t_{:016x}", rand::random::<u64>())
}

/// A store in a fresh schema, dropped by [`TestDb::done`].
pub(super) struct TestDb {
    pub store: PgStore,
    pub url: String,
    pub schema: String,
    /// Stores without background tasks (see [`PgStore::connect_passive`]).
    passive: bool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::open(None, DEFAULT_LEASE_TTL, false).await
    }

    async fn with_key(key: Option<&[u8; 32]>) -> TestDb {
        Self::open(key, DEFAULT_LEASE_TTL, false).await
    }

    /// A router with a lease TTL of `ttl`.
    pub async fn with_ttl(ttl: Duration) -> TestDb {
        Self::open(None, ttl, false).await
    }

    /// A store that leases, polls and probes nothing by itself.
    async fn passive() -> TestDb {
        Self::open(None, DEFAULT_LEASE_TTL, true).await
    }

    async fn open(key: Option<&[u8; 32]>, ttl: Duration, passive: bool) -> TestDb {
        let url = test_url();
        let schema = random_schema();
        let store = if passive {
            PgStore::connect_passive_in_schema(&url, &schema, 4, key).await
        } else {
            PgStore::connect_in_schema(&url, &schema, 4, key, ttl).await
        }
        .expect("connect");
        TestDb {
            store,
            url,
            schema,
            passive,
        }
    }

    /// Another store on the same schema (another router), of the same
    /// kind and TTL.
    pub async fn another(&self, key: Option<&[u8; 32]>) -> Result<PgStore> {
        if self.passive {
            PgStore::connect_passive_in_schema(&self.url, &self.schema, 4, key).await
        } else {
            PgStore::connect_in_schema(&self.url, &self.schema, 4, key, self.store.lease_ttl())
                .await
        }
    }

    pub async fn done(self) {
        self.store.shutdown().await;
        drop_schema(&self.url, &self.schema).await;
    }
}

pub(super) async fn drop_schema(url: &str, schema: &str) {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .expect("drop schema");
}

pub(super) fn event(id: &str) -> NewEvent {
    event_sized(id, "COURSE_ENROLLMENT", Mode::Realtime, 0)
}

pub(super) fn event_sized(id: &str, name: &str, mode: Mode, pad: usize) -> NewEvent {
    NewEvent {
        event_id: id.into(),
        event_name: name.into(),
        timestamp_ms: 1,
        mode,
        json: format!(
            "{{\"eventId\":\"{id}\",\"eventName\":\"{name}\",\"data\":\"{}\"}}",
            "x".repeat(pad)
        ),
    }
}

pub(super) fn webhook(account_id: u64) -> Webhook {
    Webhook {
        id: ids::new_id(ids::WEBHOOK_PREFIX),
        account_id,
        name: "crm".into(),
        description: String::new(),
        target_url: "https://example.com/hook".into(),
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

// ---- no server needed ----

#[test]
fn mask_url_hides_passwords() {
    assert_eq!(
        mask_url("postgres://router:s3cr%40t@db.example:5433/hooks?sslmode=disable"),
        "postgres://router:***@db.example:5433/hooks?sslmode=disable"
    );
    assert_eq!(
        mask_url("postgresql://router@db/hooks"),
        "postgresql://router@db/hooks"
    );
    assert_eq!(mask_url("postgres://db:5432/x"), "postgres://db:5432/x");
    assert_eq!(
        mask_url("postgres://u@h/d?password=hunter2&application_name=a"),
        "postgres://u@h/d?password=***&application_name=a"
    );
    // As tokio-postgres reads it, the user info ends at the first '@'.
    let m = mask_url("postgres://u:p:w@rest@h/d");
    assert!(!m.contains("p:w"), "{m}");
    assert_eq!(
        mask_url("host=db user=router password=hunter2 dbname=hooks"),
        "host=db user=router password=*** dbname=hooks"
    );
    assert_eq!(
        mask_url("host=db password = 'hun ter\\'2' dbname=hooks"),
        "host=db password = *** dbname=hooks"
    );
}

#[test]
fn pool_timeouts_and_a_closed_pool_are_unavailable() {
    use deadpool_postgres::TimeoutType;
    for e in [
        PoolError::Timeout(TimeoutType::Wait),
        PoolError::Timeout(TimeoutType::Create),
        PoolError::Closed,
    ] {
        assert!(matches!(map_pool(e), Error::Unavailable(_)));
    }
    assert!(matches!(
        map_pool(PoolError::NoRuntimeSpecified),
        Error::Internal(_)
    ));
}

#[tokio::test]
async fn bad_url_is_a_startup_error_without_the_password() {
    let e = PgStore::connect(
        "postgres://u:hunter2@h:notaport/d",
        1,
        None,
        DEFAULT_LEASE_TTL,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Startup(_)), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("storage.postgres_url"), "{m}");
    assert!(!m.contains("hunter2"), "{m}");
    let e = PgStore::connect_in_schema("postgres://h/d", "Bad-Name", 1, None, DEFAULT_LEASE_TTL)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Startup(_)), "{e:?}");
}

#[tokio::test]
async fn unreachable_server_is_unavailable_naming_host_port() {
    // Port 1 on loopback: nothing listens there.
    let e = PgStore::connect(
        "postgres://u:hunter2@127.0.0.1:1/d?connect_timeout=2",
        1,
        None,
        DEFAULT_LEASE_TTL,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("storage.postgres_url"), "{m}");
    assert!(m.contains("127.0.0.1:1"), "{m}");
    assert!(!m.contains("hunter2"), "{m}");
    assert!(m.contains("u:***@"), "{m}");
}

// ---- migrations and errors ----

#[tokio::test]
async fn a_missing_database_is_a_startup_error() {
    let mut url = test_url();
    // The same server, a database that does not exist.
    let slash = url.rfind('/').expect("a URL with a database");
    url.truncate(slash);
    url.push_str("/no_such_db_for_webhook_router");
    let e = PgStore::connect(&url, 1, None, DEFAULT_LEASE_TTL)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Startup(_)), "{e:?}");
    assert!(e.to_string().contains("storage.postgres_url"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_routers_migrate_a_fresh_schema_at_once() {
    let url = test_url();
    let schema = random_schema();
    let connects = (0..4).map(|_| {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::spawn(async move {
            PgStore::connect_in_schema(&url, &schema, 2, None, DEFAULT_LEASE_TTL).await
        })
    });
    let mut stores = Vec::new();
    for c in futures::future::join_all(connects).await {
        stores.push(c.expect("task").expect("connect"));
    }
    let client = stores[0].client().await.unwrap();
    let rows = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    // And the schema works from every one of them.
    for (i, s) in stores.iter().enumerate() {
        s.append_events(1, vec![event(&format!("e{i}"))], 0)
            .await
            .unwrap();
    }
    assert_eq!(stores[3].head_seq(1).await.unwrap(), 4);
    drop(client);
    for s in &stores {
        s.shutdown().await;
    }
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let db = TestDb::new().await;
    let client = db.store.client().await.unwrap();
    client
        .execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    let e = db.another(None).await.unwrap_err();
    assert!(matches!(e, Error::Startup(_)), "{e:?}");
    assert!(e.to_string().contains("newer"), "{e}");
    drop(client);
    db.done().await;
}

#[tokio::test]
async fn a_terminated_connection_is_unavailable() {
    let db = TestDb::new().await;
    let victim = db.store.client().await.unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let other = db.store.client().await.unwrap();
    other
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = map_db(victim.simple_query("SELECT 1").await.unwrap_err());
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    // A syntax error is not.
    let e = map_db(other.simple_query("SELEKT").await.unwrap_err());
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
    drop((victim, other));
    // The pool drops the dead connection and goes on.
    db.store.probe().await.unwrap();
    db.done().await;
}

// ---- event log ----

#[tokio::test]
async fn appends_are_idempotent_within_and_across_requests() {
    let db = TestDb::new().await;
    let s = &db.store;
    let a = s
        .append_events(7, vec![event("a"), event("b"), event("a")], 100)
        .await
        .unwrap();
    let dups: Vec<bool> = a.outcomes.iter().map(|o| o.duplicate).collect();
    assert_eq!(dups, vec![false, false, true]);
    assert_eq!((a.first_seq, a.last_seq), (1, 2));
    assert_eq!(a.events.len(), 3);
    let b = s
        .append_events(7, vec![event("b"), event("c")], 200)
        .await
        .unwrap();
    let dups: Vec<bool> = b.outcomes.iter().map(|o| o.duplicate).collect();
    assert_eq!(dups, vec![true, false]);
    assert_eq!((b.first_seq, b.last_seq), (3, 3));
    // All duplicates: nothing stored.
    let c = s.append_events(7, vec![event("c")], 300).await.unwrap();
    assert!(c.outcomes[0].duplicate);
    assert_eq!(c.last_seq, 3);
    // Another account has its own ids and sequence numbers.
    let d = s.append_events(8, vec![event("a")], 300).await.unwrap();
    assert!(!d.outcomes[0].duplicate);
    assert_eq!((d.first_seq, d.last_seq), (1, 1));
    // Empty request.
    let e = s.append_events(7, Vec::new(), 300).await.unwrap();
    assert_eq!(e.last_seq, 3);

    let read = s.read_events(7, 0, 100).await.unwrap();
    let got: Vec<(u64, &str, i64)> = read
        .iter()
        .map(|e| (e.seq, e.event_id.as_str(), e.ingest_time_ms))
        .collect();
    assert_eq!(got, vec![(1, "a", 100), (2, "b", 100), (3, "c", 200)]);
    assert_eq!(read[0].mode, Some(Mode::Realtime));
    assert_eq!(read[0].json, event("a").json.as_bytes());
    assert_eq!(s.read_events(7, 2, 100).await.unwrap().len(), 1);
    assert_eq!(s.read_events(7, 0, 1).await.unwrap().len(), 1);
    assert_eq!(s.head_seq(7).await.unwrap(), 3);
    assert_eq!(s.head_seq(99).await.unwrap(), 0);
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_appenders_get_gap_free_ordered_seqs() {
    let db = TestDb::new().await;
    // Two stores (two routers) on one schema, four appenders each.
    let other = db.another(None).await.unwrap();
    let (writers, requests, per) = (8, 25, 4);
    let tasks = (0..writers).map(|w| {
        let s = if w % 2 == 0 {
            db.store.clone()
        } else {
            other.clone()
        };
        tokio::spawn(async move {
            let mut got = Vec::new();
            for r in 0..requests {
                let events = (0..per).map(|i| event(&format!("w{w}-r{r}-{i}"))).collect();
                let a = s.append_events(42, events, 0).await.unwrap();
                assert!(a.outcomes.iter().all(|o| !o.duplicate));
                got.push(a.first_seq);
            }
            got
        })
    });
    let mut firsts = Vec::new();
    for t in futures::future::join_all(tasks).await {
        firsts.extend(t.unwrap());
    }
    let n = (writers * requests * per) as u64;
    assert_eq!(db.store.head_seq(42).await.unwrap(), n);
    let read = db.store.read_events(42, 0, n as usize + 10).await.unwrap();
    let seqs: Vec<u64> = read.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    let ids: HashSet<&str> = read.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len() as u64, n);
    // Each request's events are consecutive from its first_seq.
    for e in &read {
        let (_, rest) = e.event_id.split_once("-r").unwrap();
        let i: u64 = rest.rsplit('-').next().unwrap().parse().unwrap();
        let first = e.seq - i;
        assert!(firsts.contains(&first), "{} at {}", e.event_id, e.seq);
        if i > 0 {
            let prev = &read[(e.seq - 2) as usize];
            assert_eq!(
                prev.event_id,
                format!("{}{}", &e.event_id[..e.event_id.len() - 1], i - 1)
            );
        }
    }
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_merged_into_fewer_transactions() {
    let db = TestDb::new().await;
    let calls = 64;
    let before = db.store.append_commits();
    let tasks = (0..calls).map(|c| {
        let s = db.store.clone();
        tokio::spawn(async move {
            s.append_events(c % 4, vec![event(&format!("c{c}"))], 0)
                .await
                .unwrap()
        })
    });
    for t in futures::future::join_all(tasks).await {
        let a = t.unwrap();
        assert!(!a.outcomes[0].duplicate);
    }
    let commits = db.store.append_commits() - before;
    assert!(
        commits < calls,
        "{calls} concurrent calls took {commits} transactions"
    );
    for account in 0..4 {
        assert_eq!(db.store.head_seq(account).await.unwrap(), calls / 4);
    }
    // A call whose event cannot be stored (a NUL in text) fails alone; the
    // calls it was merged with succeed.
    let mut bad = event("bad");
    bad.event_name = "NUL\0NAME".into();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = db.store.clone();
            let ev = if i == 3 {
                bad.clone()
            } else {
                event(&format!("ok{i}"))
            };
            tokio::spawn(async move { s.append_events(9, vec![ev], 0).await })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_err(), i == 3, "call {i}: {r:?}");
    }
    assert_eq!(db.store.head_seq(9).await.unwrap(), 7);
    println!("group commit: {calls} calls in {commits} transactions");
    db.done().await;
}

/// The figure in the report: 16 callers, each appending requests of 100
/// events of about 300 bytes to its own account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_rate_16_callers_100_events_300_bytes() {
    let db = TestDb::new().await;
    let (callers, requests) = (16u64, 20u64);
    let before = db.store.append_commits();
    let start = Instant::now();
    let tasks = (0..callers).map(|c| {
        let s = db.store.clone();
        tokio::spawn(async move {
            for r in 0..requests {
                let events: Vec<NewEvent> = (0..100)
                    .map(|i| {
                        let mut e = event_sized(
                            &format!("c{c}r{r}i{i}"),
                            "COURSE_ENROLLMENT",
                            Mode::Realtime,
                            0,
                        );
                        let pad = 300usize.saturating_sub(e.json.len());
                        e.json = event_sized(&e.event_id, &e.event_name, e.mode, pad).json;
                        e
                    })
                    .collect();
                s.append_events(1000 + c, events, 0).await.unwrap();
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    let elapsed = start.elapsed();
    let events = callers * requests * 100;
    let commits = db.store.append_commits() - before;
    println!(
        "append rate: {events} events in {:.2} s = {:.0} events/s ({} requests, {commits} transactions)",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        callers * requests
    );
    for c in 0..callers {
        assert_eq!(db.store.head_seq(1000 + c).await.unwrap(), requests * 100);
    }
    db.done().await;
}

#[tokio::test]
async fn lane_reads_filter_by_type_and_mode_and_respect_limits() {
    let db = TestDb::new().await;
    let s = &db.store;
    let events = vec![
        event_sized("1", "COURSE_ENROLLMENT", Mode::Realtime, 0),
        event_sized("2", "COURSE_COMPLETED", Mode::Realtime, 0),
        event_sized("3", "COURSE_ENROLLMENT", Mode::Batch, 0),
        event_sized("4", "COURSE_ENROLLMENT", Mode::Realtime, 0),
        event_sized("5", "COURSE_ENROLLMENT", Mode::Realtime, 0),
    ];
    s.append_events(3, events, 0).await.unwrap();
    // An event stored without its mode (as imported from schema 2) falls
    // back to the catalog.
    let client = s.client().await.unwrap();
    client
        .execute("UPDATE events SET mode = NULL WHERE seq = 5", &[])
        .await
        .unwrap();
    drop(client);
    let w = webhook(3);
    let filter = LaneFilter::new(&w, Mode::Realtime, std::sync::Arc::new(Catalog::new(&[])));
    let r = s
        .read_for_lane(3, 0, u64::MAX, &filter, 10, 100)
        .await
        .unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 4, 5]);
    assert_eq!((r.scanned_to, r.capped), (5, false));
    // The limit: stops at the last event taken.
    let r = s
        .read_for_lane(3, 0, u64::MAX, &filter, 2, 100)
        .await
        .unwrap();
    assert_eq!(r.events.len(), 2);
    assert_eq!((r.scanned_to, r.capped), (4, false));
    // The scan limit: examined 1..=3, more to read.
    let r = s
        .read_for_lane(3, 0, u64::MAX, &filter, 10, 3)
        .await
        .unwrap();
    assert_eq!(r.events.len(), 1);
    assert_eq!((r.scanned_to, r.capped), (3, true));
    // until_seq.
    let r = s.read_for_lane(3, 0, 2, &filter, 10, 100).await.unwrap();
    assert_eq!((r.events.len(), r.scanned_to, r.capped), (1, 2, false));
    // The batch lane takes the batch-mode event.
    let batch = LaneFilter::new(&w, Mode::Batch, std::sync::Arc::new(Catalog::new(&[])));
    let r = s
        .read_for_lane(3, 0, u64::MAX, &batch, 10, 100)
        .await
        .unwrap();
    assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    db.done().await;
}

// ---- webhooks ----

#[tokio::test]
async fn webhooks_round_trip_list_update_and_lanes_start_at_the_head() {
    let db = TestDb::new().await;
    let s = &db.store;
    s.append_events(5, vec![event("x"), event("y")], 0)
        .await
        .unwrap();
    let mut made = Vec::new();
    for _ in 0..3 {
        let w = webhook(5);
        s.create_webhook(w.clone(), Some(SecretRecord::generate(1)), 10)
            .await
            .unwrap();
        made.push(w);
        // Ids are time-ordered by the millisecond.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        s.get_webhook(5, &made[0].id).await.unwrap(),
        Some(made[0].clone())
    );
    assert_eq!(s.get_webhook(6, &made[0].id).await.unwrap(), None);
    let (page, more) = s.list_webhooks(5, None, 2).await.unwrap();
    assert_eq!(page, made[..2].to_vec());
    assert!(more);
    let (page, more) = s.list_webhooks(5, Some(&made[1].id), 2).await.unwrap();
    assert_eq!(page, made[2..].to_vec());
    assert!(!more);
    assert_eq!(s.all_webhooks().await.unwrap().len(), 3);
    // Both lanes exist, at the end of the log.
    let client = s.client().await.unwrap();
    let rows = client
        .query(
            "SELECT mode, cursor_seq FROM lanes WHERE webhook_id = $1 ORDER BY mode",
            &[&made[0].id],
        )
        .await
        .unwrap();
    let lanes: Vec<(i16, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(lanes, vec![(1, 2), (2, 2)]);
    // Update: the closure sees the secret; version grows.
    let old_secret = s.get_secret(&made[0].id).await.unwrap().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    let updated = s
        .update_webhook(5, &made[0].id, move |w, secret| {
            w.name = "renamed".into();
            *seen2.lock().unwrap() = secret.clone();
            Ok(Some(secret.unwrap().rotate(5, 1000)))
        })
        .await
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(seen.lock().unwrap().clone(), Some(old_secret.clone()));
    let new_secret = s.get_secret(&made[0].id).await.unwrap().unwrap();
    assert_eq!(new_secret.previous, Some(old_secret.current));
    assert_eq!(
        s.get_webhook(5, &made[0].id).await.unwrap().unwrap().name,
        "renamed"
    );
    let version: i64 = client
        .query_one(
            "SELECT version FROM webhooks WHERE webhook_id = $1",
            &[&made[0].id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    // A failing closure changes nothing.
    let e = s
        .update_webhook(5, &made[0].id, |w, _| {
            w.name = "nope".into();
            Err(Error::invalid("webhook.name", "bad"))
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    assert_eq!(
        s.get_webhook(5, &made[0].id).await.unwrap().unwrap().name,
        "renamed"
    );
    // Unknown ids.
    let e = s
        .update_webhook(5, "wh_none", |_, _| Ok(None))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "webhook wh_none not found");
    let e = s.delete_webhook(5, "wh_none").await.unwrap_err();
    assert_eq!(e.to_string(), "webhook wh_none not found");
    // The same id twice.
    let e = s
        .create_webhook(made[1].clone(), None, 10)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    drop(client);
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_limit_holds_under_eight_concurrent_creates() {
    let db = TestDb::new().await;
    let other = db.another(None).await.unwrap();
    let tasks = (0..8).map(|i| {
        let s = if i % 2 == 0 {
            db.store.clone()
        } else {
            other.clone()
        };
        tokio::spawn(async move { s.create_webhook(webhook(77), None, 5).await })
    });
    let mut ok = 0;
    let mut refused = Vec::new();
    for t in futures::future::join_all(tasks).await {
        match t.unwrap() {
            Ok(()) => ok += 1,
            Err(Error::ResourceExhausted(m)) => refused.push(m),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(refused.len(), 3);
    for m in refused {
        assert_eq!(
            m,
            "account 77 already has 5 webhooks, the most limits.max_webhooks_per_account = 5 \
             allows; delete one or raise the limit"
        );
    }
    assert_eq!(
        db.store.list_webhooks(77, None, 100).await.unwrap().0.len(),
        5
    );
    db.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_wins_over_a_racing_update_and_stays_deleted() {
    let db = TestDb::new().await;
    let s = db.store.clone();
    let w = webhook(4);
    s.create_webhook(w.clone(), Some(SecretRecord::generate(1)), 10)
        .await
        .unwrap();
    s.insert_deliveries(&[delivery(&w, DeliveryState::Delivered, 10)])
        .await
        .unwrap();
    // An update that is inside its transaction (row locked) when the
    // delete starts: the delete waits for it, then removes everything.
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let updater = {
        let s = s.clone();
        let id = w.id.clone();
        tokio::spawn(async move {
            s.update_webhook(4, &id, move |w, _| {
                entered_tx.send(()).unwrap();
                go_rx.recv_timeout(Duration::from_secs(10)).unwrap();
                w.name = "updated".into();
                Ok(None)
            })
            .await
        })
    };
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    let deleter = {
        let s = s.clone();
        let id = w.id.clone();
        tokio::spawn(async move { s.delete_webhook(4, &id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!deleter.is_finished(), "the delete waits for the row lock");
    go_tx.send(()).unwrap();
    updater.await.unwrap().unwrap();
    deleter.await.unwrap().unwrap();
    // Gone, with its secret and lanes; later updates are NotFound.
    assert_eq!(s.get_webhook(4, &w.id).await.unwrap(), None);
    assert_eq!(s.get_secret(&w.id).await.unwrap(), None);
    assert!(s.is_deleted_stored(&w.id).await.unwrap());
    let e = s
        .update_webhook(4, &w.id, |_, _| Ok(None))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    // Its delivery records are left for the janitor, which removes them.
    assert_eq!(
        s.list_deliveries(&w.id, None, None, 10)
            .await
            .unwrap()
            .0
            .len(),
        1
    );
    let report = crate::store::LaneStore::janitor_round(
        &s,
        std::sync::Arc::new(Catalog::new(&[])),
        crate::domain::now_ms(),
        60_000,
        60_000,
    )
    .await
    .unwrap();
    assert_eq!(report.purged + report.cleaned, 1, "{report:?}");
    assert_eq!(
        s.list_deliveries(&w.id, None, None, 10)
            .await
            .unwrap()
            .0
            .len(),
        0
    );
    assert!(crate::store::ConfigStore::is_deleted(&s, &w.id));
    let client = s.client().await.unwrap();
    let lanes: i64 = client
        .query_one("SELECT count(*) FROM lanes WHERE webhook_id = $1", &[&w.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lanes, 0);
    drop(client);
    // Nothing brings it back: not a create with its id, nor a lane, nor
    // delivery records.
    let e = s.create_webhook(w.clone(), None, 10).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    assert!(!s.ensure_lane(4, &w.id, ModeTag::Realtime, 0).await.unwrap());
    assert_eq!(
        s.insert_deliveries(&[delivery(&w, DeliveryState::Pending, 0)])
            .await
            .unwrap(),
        0
    );
    assert!(s
        .acquire_lanes("a", 10, Duration::from_secs(5))
        .await
        .unwrap()
        .is_empty());
    assert!(!s.is_deleted_stored("wh_other").await.unwrap());

    // The other order: a delete first, then an update waiting on it finds nothing.
    let w2 = webhook(4);
    s.create_webhook(w2.clone(), None, 10).await.unwrap();
    let mut client = s.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("DELETE FROM webhooks WHERE webhook_id = $1", &[&w2.id])
        .await
        .unwrap();
    let updater = {
        let s = s.clone();
        let id = w2.id.clone();
        tokio::spawn(async move { s.update_webhook(4, &id, |_, _| Ok(None)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!updater.is_finished(), "the update waits for the delete");
    tx.commit().await.unwrap();
    let e = updater.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    drop(client);
    db.done().await;
}

#[tokio::test]
async fn secrets_and_passwords_are_sealed_at_rest() {
    let key = [7u8; 32];
    let db = TestDb::with_key(Some(&key)).await;
    let s = &db.store;
    let secret = SecretRecord::generate(1);
    let mut w = webhook(2);
    w.auth = Auth::Basic {
        username: "user".into(),
        password: "pass-word-123".into(),
    };
    s.create_webhook(w.clone(), Some(secret.clone()), 10)
        .await
        .unwrap();
    assert_eq!(s.get_secret(&w.id).await.unwrap(), Some(secret.clone()));
    assert_eq!(s.get_webhook(2, &w.id).await.unwrap(), Some(w.clone()));
    let client = s.client().await.unwrap();
    let raw: Vec<u8> = client
        .query_one("SELECT body FROM secrets WHERE webhook_id = $1", &[&w.id])
        .await
        .unwrap()
        .get(0);
    let raw = String::from_utf8(raw).unwrap();
    assert!(!raw.contains(&secret.current), "{raw}");
    assert!(raw.contains(crypt::MARKER), "{raw}");
    let raw: Vec<u8> = client
        .query_one("SELECT body FROM webhooks WHERE webhook_id = $1", &[&w.id])
        .await
        .unwrap()
        .get(0);
    let raw = String::from_utf8(raw).unwrap();
    assert!(!raw.contains("pass-word-123"), "{raw}");
    // The at-rest format is the sled store's: its cipher opens it.
    let rec: SecretRecord = serde_json::from_slice(
        &client
            .query_one("SELECT body FROM secrets WHERE webhook_id = $1", &[&w.id])
            .await
            .unwrap()
            .get::<_, Vec<u8>>(0),
    )
    .unwrap();
    let c = SecretCipher::new(&key);
    assert_eq!(
        c.open(&rec.current, crypt::Purpose::SigningSecret, &w.id)
            .unwrap(),
        secret.current
    );
    drop(client);
    // Without the key, or with another: refused at start.
    let e = db.another(None).await.unwrap_err();
    assert!(matches!(e, Error::Startup(_)), "{e:?}");
    assert!(e.to_string().contains(c.key_id()), "{e}");
    let e = db.another(Some(&[8u8; 32])).await.unwrap_err();
    assert!(matches!(e, Error::Startup(_)), "{e:?}");
    db.another(Some(&key)).await.unwrap();
    db.done().await;
}

#[tokio::test]
async fn a_key_set_later_seals_the_plain_values() {
    let db = TestDb::new().await;
    let secret = SecretRecord::generate(1);
    let mut w = webhook(2);
    w.auth = Auth::Basic {
        username: "user".into(),
        password: "plain-pass".into(),
    };
    db.store
        .create_webhook(w.clone(), Some(secret.clone()), 10)
        .await
        .unwrap();
    let key = [9u8; 32];
    let keyed = db.another(Some(&key)).await.unwrap();
    assert_eq!(keyed.get_secret(&w.id).await.unwrap(), Some(secret.clone()));
    assert_eq!(keyed.get_webhook(2, &w.id).await.unwrap(), Some(w.clone()));
    let client = keyed.client().await.unwrap();
    for (table, plain) in [
        ("secrets", secret.current.as_str()),
        ("webhooks", "plain-pass"),
    ] {
        let raw: Vec<u8> = client
            .query_one(
                &format!("SELECT body FROM {table} WHERE webhook_id = $1"),
                &[&w.id],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!String::from_utf8(raw).unwrap().contains(plain), "{table}");
    }
    drop(client);
    db.done().await;
}

#[tokio::test]
async fn bootstrap_tokens_round_trip() {
    use crate::config::TokenConfig;
    let db = TestDb::new().await;
    let s = &db.store;
    assert!(s.bootstrap_tokens().await.unwrap().is_none());
    let tokens: Vec<TokenConfig> = serde_json::from_str(
        r#"[{"token":null,"token_sha256":"ab","role":"admin","account_ids":null}]"#,
    )
    .unwrap();
    assert!(s
        .set_bootstrap_tokens_if_absent(&tokens)
        .await
        .unwrap()
        .is_none());
    let again = s
        .set_bootstrap_tokens_if_absent(&[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        serde_json::to_string(&tokens).unwrap()
    );
    s.set_bootstrap_tokens(&[]).await.unwrap();
    assert_eq!(s.bootstrap_tokens().await.unwrap().unwrap().len(), 0);
    db.done().await;
}

// ---- lanes ----

/// A store with `n` webhooks (2n lanes) on account 1.
async fn with_lanes(n: usize) -> (TestDb, Vec<Webhook>) {
    let db = TestDb::passive().await;
    let mut hooks = Vec::new();
    for _ in 0..n {
        let w = webhook(1);
        db.store.create_webhook(w.clone(), None, 100).await.unwrap();
        hooks.push(w);
    }
    (db, hooks)
}

fn lane_key(l: &Lease) -> (String, ModeTag) {
    (l.webhook_id.clone(), l.mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_acquire_disjoint_lanes() {
    let (db, _) = with_lanes(10).await;
    let other = db.another(None).await.unwrap();
    let ttl = Duration::from_secs(30);
    let (a, b) = tokio::join!(
        db.store.acquire_lanes("router-a", 12, ttl),
        other.acquire_lanes("router-b", 12, ttl)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let ka: HashSet<_> = a.iter().map(lane_key).collect();
    let kb: HashSet<_> = b.iter().map(lane_key).collect();
    assert!(ka.is_disjoint(&kb));
    assert_eq!(ka.len(), a.len());
    assert!(a.len() <= 12 && b.len() <= 12);
    assert_eq!(a.len() + b.len(), 20, "all 20 lanes taken, each once");
    assert!(a
        .iter()
        .chain(&b)
        .all(|l| l.epoch == 1 && l.account_id == 1));
    // Nothing left for a third; the holders keep theirs (epoch kept).
    assert!(db
        .store
        .acquire_lanes("router-c", 5, ttl)
        .await
        .unwrap()
        .is_empty());
    let again = db.store.acquire_lanes("router-a", 100, ttl).await.unwrap();
    let kagain: HashSet<_> = again.iter().map(lane_key).collect();
    assert_eq!(kagain, ka);
    assert!(again.iter().all(|l| l.epoch == 1));
    // A smaller max still returns held lanes, never lanes of another.
    let some = other.acquire_lanes("router-b", 3, ttl).await.unwrap();
    assert_eq!(some.len(), 3);
    assert!(some.iter().all(|l| kb.contains(&lane_key(l))));
    db.done().await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_owner_is_fenced() {
    let (db, hooks) = with_lanes(1).await;
    let s = &db.store;
    let short = Duration::from_millis(300);
    let a = s.acquire_lanes("a", 10, short).await.unwrap();
    assert_eq!(a.len(), 2);
    let lane = a
        .iter()
        .find(|l| l.mode == ModeTag::Realtime)
        .unwrap()
        .clone();
    assert_eq!(
        (lane.webhook_id.as_str(), lane.cursor_seq, lane.epoch),
        (hooks[0].id.as_str(), 0, 1)
    );
    assert!(lane.state.is_empty());
    // Still held: b gets nothing.
    assert!(s.acquire_lanes("b", 10, short).await.unwrap().is_empty());
    // a writes progress while it holds the lease.
    let write = |epoch, cursor| LaneWrite {
        webhook_id: lane.webhook_id.clone(),
        mode: lane.mode,
        epoch,
        cursor_seq: cursor,
        state: b"a-state".to_vec(),
        next_at_ms: 5,
    };
    assert_eq!(s.advance("a", &[write(1, 3)]).await.unwrap(), vec![true]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Expired: b takes both lanes over, with a new epoch and a's progress.
    let b = s
        .acquire_lanes("b", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(b.len(), 2);
    let taken = b.iter().find(|l| l.mode == ModeTag::Realtime).unwrap();
    assert_eq!(taken.epoch, 2);
    assert_eq!(taken.cursor_seq, 3);
    assert_eq!(taken.state, b"a-state".to_vec());
    assert_eq!(taken.next_at_ms, 5);
    // The zombie a: its write is fenced and counted; renew says lost.
    let fenced_before = s.fenced_writes();
    assert_eq!(s.advance("a", &[write(1, 9)]).await.unwrap(), vec![false]);
    assert_eq!(s.fenced_writes(), fenced_before + 1);
    // Even naming the new epoch, another owner cannot write.
    assert_eq!(s.advance("a", &[write(2, 9)]).await.unwrap(), vec![false]);
    assert_eq!(s.fenced_writes(), fenced_before + 2);
    assert_eq!(
        s.renew("a", &[LeaseRef::from(&lane)], short).await.unwrap(),
        vec![false]
    );
    // b's writes go through; a mixed batch answers per lane.
    let other = b.iter().find(|l| l.mode == ModeTag::Batch).unwrap();
    let ok = LaneWrite {
        webhook_id: other.webhook_id.clone(),
        mode: other.mode,
        epoch: other.epoch,
        cursor_seq: 4,
        state: Vec::new(),
        next_at_ms: 0,
    };
    let stale = LaneWrite {
        epoch: 1,
        ..ok.clone()
    };
    assert_eq!(
        s.advance("b", &[write(2, 7), stale, ok.clone()])
            .await
            .unwrap(),
        vec![true, true, true],
        "a lane named twice: its last write decides"
    );
    let stale = LaneWrite { epoch: 1, ..ok };
    assert_eq!(
        s.advance("b", &[write(2, 7), stale]).await.unwrap(),
        vec![true, false]
    );
    let client = s.client().await.unwrap();
    let cursor: i64 = client
        .query_one(
            "SELECT cursor_seq FROM lanes WHERE webhook_id = $1 AND mode = 1",
            &[&lane.webhook_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor, 7, "the fenced writes changed nothing");
    drop(client);
    db.done().await;
}

#[tokio::test]
async fn renew_keeps_and_release_frees_leases() {
    let (db, hooks) = with_lanes(2).await;
    let s = &db.store;
    let ttl = Duration::from_millis(1000);
    let held = s.acquire_lanes("a", 10, ttl).await.unwrap();
    assert_eq!(held.len(), 4);
    let refs: Vec<LeaseRef> = held.iter().map(LeaseRef::from).collect();
    // Renewed twice past the first TTL: still a's.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(s.renew("a", &refs, ttl).await.unwrap(), vec![true; 4]);
    }
    assert!(s.acquire_lanes("b", 10, ttl).await.unwrap().is_empty());
    // Another owner cannot renew or release them; a stale epoch neither.
    assert_eq!(s.renew("b", &refs, ttl).await.unwrap(), vec![false; 4]);
    assert_eq!(s.release("b", &refs).await.unwrap(), 0);
    let mut stale = refs[0].clone();
    stale.epoch += 5;
    assert_eq!(s.renew("a", &[stale], ttl).await.unwrap(), vec![false]);
    // Release two: b gets exactly those, with a new epoch.
    assert_eq!(s.release("a", &refs[..2]).await.unwrap(), 2);
    let b = s.acquire_lanes("b", 10, ttl).await.unwrap();
    let kb: HashSet<_> = b.iter().map(lane_key).collect();
    let released: HashSet<_> = held[..2].iter().map(lane_key).collect();
    assert_eq!(kb, released);
    assert!(b.iter().all(|l| l.epoch == 2));
    // ensure_lane: existing lanes untouched, new ones created.
    assert!(s
        .ensure_lane(1, &hooks[0].id, ModeTag::Realtime, 99)
        .await
        .unwrap());
    let client = s.client().await.unwrap();
    client
        .execute(
            "DELETE FROM lanes WHERE webhook_id = $1 AND mode = 2",
            &[&hooks[1].id],
        )
        .await
        .unwrap();
    drop(client);
    assert!(s
        .ensure_lane(1, &hooks[1].id, ModeTag::Batch, 42)
        .await
        .unwrap());
    let c = s.acquire_lanes("c", 10, ttl).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].cursor_seq, c[0].epoch, c[0].mode),
        (42, 1, ModeTag::Batch)
    );
    assert!(s.renew("c", &[], ttl).await.unwrap().is_empty());
    db.done().await;
}

#[tokio::test]
async fn chore_jobs_are_leased_to_one_owner() {
    let db = TestDb::passive().await;
    let s = &db.store;
    let ttl = Duration::from_millis(300);
    assert_eq!(s.acquire_job("janitor", "a", ttl).await.unwrap(), Some(1));
    assert_eq!(s.acquire_job("janitor", "b", ttl).await.unwrap(), None);
    assert_eq!(s.acquire_job("janitor", "a", ttl).await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.acquire_job("janitor", "b", ttl).await.unwrap(), Some(2));
    assert_eq!(s.acquire_job("other", "a", ttl).await.unwrap(), Some(1));
    db.done().await;
}

// ---- deliveries ----

fn delivery(w: &Webhook, state: DeliveryState, finish_ms: i64) -> DeliveryRecord {
    let mut r = DeliveryRecord::new(
        w.account_id,
        &w.id,
        ModeTag::Realtime,
        [(1u64, "e1".to_string())].into_iter(),
        1,
    );
    if state.is_final() {
        r.finish(state, finish_ms);
    } else {
        r.state = state;
    }
    r
}

#[tokio::test]
async fn deliveries_upsert_list_newest_first_and_prune() {
    let db = TestDb::new().await;
    let s = &db.store;
    let w = webhook(1);
    s.create_webhook(w.clone(), None, 10).await.unwrap();
    let mut records = Vec::new();
    for i in 0..5 {
        let state = if i % 2 == 0 {
            DeliveryState::Delivered
        } else {
            DeliveryState::Retrying
        };
        let mut r = delivery(&w, state, 100 + i);
        // Ids in creation order.
        r.id = ids::derived_id(ids::DELIVERY_PREFIX, 1000 + i, &[b"x"]);
        records.push(r);
    }
    assert_eq!(s.insert_deliveries(&records).await.unwrap(), 5);
    let (page, next) = s.list_deliveries(&w.id, None, None, 2).await.unwrap();
    assert_eq!(page, vec![records[4].clone(), records[3].clone()]);
    assert_eq!(next.as_deref(), Some(records[3].id.as_str()));
    let (page, next) = s
        .list_deliveries(&w.id, None, next.as_deref(), 10)
        .await
        .unwrap();
    assert_eq!(
        page,
        vec![records[2].clone(), records[1].clone(), records[0].clone()]
    );
    assert_eq!(next, None);
    let (page, _) = s
        .list_deliveries(&w.id, Some(DeliveryState::Retrying), None, 10)
        .await
        .unwrap();
    assert_eq!(page, vec![records[3].clone(), records[1].clone()]);
    // Upsert: a retrying record finishes; duplicates in one call, last wins.
    let mut done = records[1].clone();
    done.finish(DeliveryState::Dead, 50);
    let mut first = records[3].clone();
    first.attempt_count = 1;
    let mut second = records[3].clone();
    second.attempt_count = 2;
    assert_eq!(
        s.insert_deliveries(&[done.clone(), first, second])
            .await
            .unwrap(),
        2
    );
    let (page, _) = s
        .list_deliveries(&w.id, Some(DeliveryState::Retrying), None, 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].attempt_count, 2);
    // Prune: finished before 103 are records[0] (100), records[2] (102)
    // and the dead one (50); oldest first, bounded by the limit.
    assert_eq!(s.prune_finished_before(103, 2).await.unwrap(), 2);
    assert_eq!(s.prune_finished_before(103, 10).await.unwrap(), 1);
    let (page, _) = s.list_deliveries(&w.id, None, None, 10).await.unwrap();
    let left: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(left, vec![records[4].id.as_str(), records[3].id.as_str()]);
    assert_eq!(
        s.list_deliveries(&w.id, None, None, 0)
            .await
            .unwrap()
            .0
            .len(),
        0
    );
    db.done().await;
}
