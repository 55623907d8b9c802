//! Crash safety of the real binary: SIGKILL at random points during sustained
//! publishing (several concurrent publishers) and delivery (several webhooks,
//! real-time and batch lanes),
//! restarting on the same data folder each time. At the end every
//! acknowledged event reached every webhook at least once, nothing arrived
//! with content other than what was sent for its event_id (events whose
//! publish outcome the kill left unknown included), each webhook saw every
//! publisher's events in publish order, and the duplicates are counted.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{write_router_config, RouterProcess};
use common::*;
use prost_types::{value::Kind, ListValue, Struct, Value};
use rand::{Rng, SeedableRng};

const PUBLISHERS: usize = 4;
const KILLS: usize = 5;
const REALTIME: &str = "COURSE_ENROLLMENT";
const BATCH: &str = "COURSE_ENROLLMENT_BATCH";
/// The webhooks' event types: real-time lane only, both lanes, batch lane only.
const WEBHOOK_TYPES: [&[&str]; 3] = [&[REALTIME], &[REALTIME, BATCH], &[BATCH]];

/// What was sent for each event id, and which publishes were acknowledged.
#[derive(Default)]
struct Ledger {
    /// event id → the event object a listener must receive for it.
    sent: HashMap<String, serde_json::Value>,
    /// Event ids whose PublishEvents call returned OK.
    acked: HashSet<String>,
    /// PublishEvents calls that failed (outcome unknown or refused).
    failed_calls: usize,
    /// Events sent again after a failed call.
    resent: usize,
    /// Of those, the ones the router reported as already stored: the kill
    /// came after they were durable but before the answer arrived.
    resent_found_stored: usize,
}

/// A publisher's progress across restarts.
struct Publisher {
    id: usize,
    next: u64,
    /// A batch whose publish outcome is unknown: sent again, unchanged, first.
    unknown: Option<Vec<Event>>,
    rng: rand::rngs::StdRng,
}

fn num(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

impl Publisher {
    /// A new event with random content, recorded in the ledger before it is sent.
    fn new_event(&mut self, ledger: &Mutex<Ledger>) -> Event {
        let n = self.next;
        self.next += 1;
        let id = format!("p{}-{n:06}", self.id);
        let name = if self.rng.gen_bool(0.3) {
            BATCH
        } else {
            REALTIME
        };
        let user: u64 = self.rng.gen_range(1..10_000_000);
        let blob_len = self.rng.gen_range(0..400);
        let blob: String = (0..blob_len)
            .map(|_| self.rng.gen_range(b'a'..=b'z') as char)
            .collect();
        let score = self.rng.gen_range(0..1000) as f64 / 8.0;
        let timestamp = 1_700_000_000_000 + self.rng.gen_range(0..1_000_000_000i64);
        let info = format!("publisher {} event {n}", self.id);
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("userId".to_string(), num(user as f64));
        fields.insert("blob".to_string(), text(&blob));
        fields.insert(
            "scores".to_string(),
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![num(score), num(n as f64)],
                })),
            },
        );
        let expected = serde_json::json!({
            "eventId": id,
            "eventName": name,
            "timestamp": timestamp,
            "eventInfo": info,
            "data": {"blob": blob, "scores": [json_number(score), n], "userId": user},
        });
        ledger.lock().unwrap().sent.insert(id.clone(), expected);
        Event {
            event_id: id,
            event_name: name.into(),
            timestamp,
            event_info: info,
            data: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
        }
    }

    /// Publishes until `stop` is set: the unknown batch first, then new ones.
    async fn run(
        mut self,
        mut ingest: Ingest,
        ledger: Arc<Mutex<Ledger>>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        while !stop.load(Ordering::SeqCst) {
            let resend = self.unknown.is_some();
            let batch = match self.unknown.take() {
                Some(b) => b,
                None => {
                    let k = self.rng.gen_range(1..=5);
                    (0..k).map(|_| self.new_event(&ledger)).collect()
                }
            };
            let call = ingest.publish_events(PublishEventsRequest {
                account_id: 1010,
                events: batch.clone(),
            });
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(resp)) => {
                    let mut l = ledger.lock().unwrap();
                    l.acked.extend(batch.iter().map(|e| e.event_id.clone()));
                    if resend {
                        l.resent += batch.len();
                        let results = resp.into_inner().results;
                        l.resent_found_stored += results.iter().filter(|r| r.duplicate).count();
                    }
                }
                _ => {
                    ledger.lock().unwrap().failed_calls += 1;
                    self.unknown = Some(batch);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        self
    }
}

/// A number as the router writes it: whole numbers as integers.
fn json_number(f: f64) -> serde_json::Value {
    if f.fract() == 0.0 {
        serde_json::json!(f as i64)
    } else {
        serde_json::json!(f)
    }
}

fn publisher_of(id: &str) -> (usize, u64) {
    let (p, n) = id[1..].split_once('-').unwrap();
    (p.parse().unwrap(), n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_publishing_and_delivery_loses_no_acknowledged_event() {
    let started = Instant::now();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let config = write_router_config(dir.path(), 2_000, "batch_interval_ms = 200");
    // Listeners answer after a short random delay, so deliveries are in flight
    // when the kill comes.
    let mut listeners = Vec::new();
    for _ in WEBHOOK_TYPES {
        listeners.push(
            Listener::start(Arc::new(|n, _| {
                (200, vec![], Duration::from_millis((n % 7) as u64 * 3))
            }))
            .await,
        );
    }

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|id| Publisher {
            id,
            next: 0,
            unknown: None,
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ (id as u64 + 1)),
        })
        .collect();

    let mut router = RouterProcess::start(&config);
    {
        let mut admin = router.admin().await;
        for (i, (l, types)) in listeners.iter().zip(WEBHOOK_TYPES).enumerate() {
            create(
                &mut admin,
                1010,
                webhook(&format!("crash-{i}"), &l.url(), types, no_auth()),
            )
            .await;
        }
    }

    for round in 0..KILLS {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for p in publishers.drain(..) {
            let ingest = router.ingest().await;
            tasks.push(tokio::spawn(p.run(ingest, ledger.clone(), stop.clone())));
        }
        let run_for = Duration::from_millis(rng.gen_range(150..1_500));
        tokio::time::sleep(run_for).await;
        router.signal("-KILL");
        let status = router.wait_exit(Duration::from_secs(5));
        assert!(!status.success(), "killed process reported success");
        // Publishers see the broken connection; their last batch stays unknown.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            publishers.push(t.await.unwrap());
        }
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
        if let Some(batch) = p.unknown.take() {
            let results = ingest
                .publish_events(PublishEventsRequest {
                    account_id: 1010,
                    events: batch.clone(),
                })
                .await
                .expect("publish after the last restart")
                .into_inner()
                .results;
            let mut l = ledger.lock().unwrap();
            l.acked.extend(batch.iter().map(|e| e.event_id.clone()));
            l.resent += batch.len();
            l.resent_found_stored += results.iter().filter(|r| r.duplicate).count();
        }
    }
    let (sent, acked, failed_calls) = {
        let l = ledger.lock().unwrap();
        println!(
            "{} events were sent again after a failed call; {} of them had been stored before the kill",
            l.resent, l.resent_found_stored
        );
        (l.sent.clone(), l.acked.clone(), l.failed_calls)
    };
    assert!(
        acked.len() >= 100,
        "too little was published to prove anything: {}",
        acked.len()
    );
    let mut duplicates_total = 0;
    for (i, (l, types)) in listeners.iter().zip(WEBHOOK_TYPES).enumerate() {
        let wanted: HashSet<&String> = acked
            .iter()
            .filter(|id| types.contains(&sent[*id]["eventName"].as_str().unwrap()))
            .collect();
        let got = l
            .wait_until(Duration::from_secs(30), |reqs| {
                let ids: HashSet<String> = reqs.iter().flat_map(|r| r.event_ids()).collect();
                wanted.iter().all(|id| ids.contains(*id))
            })
            .await;
        let mut arrivals = Vec::new();
        for r in &got {
            for e in r.json()["events"].as_array().unwrap() {
                arrivals.push(e.clone());
            }
        }
        let ids: Vec<String> = arrivals
            .iter()
            .map(|e| e["eventId"].as_str().unwrap().to_string())
            .collect();
        let unique: HashSet<&String> = ids.iter().collect();
        let missing: Vec<&&String> = wanted.iter().filter(|id| !unique.contains(**id)).collect();
        assert!(
            missing.is_empty(),
            "webhook {i}: {} acknowledged events never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        // Content: exactly what was sent for that id, acknowledged or not.
        for e in &arrivals {
            let id = e["eventId"].as_str().unwrap();
            let expected = sent
                .get(id)
                .unwrap_or_else(|| panic!("webhook {i}: event {id} was never sent"));
            assert_eq!(e, expected, "webhook {i}: content of {id}");
        }
        // Order: within each lane, each publisher's events first arrive in
        // publish order.
        let mut last: HashMap<(usize, &str), u64> = HashMap::new();
        let mut seen = HashSet::new();
        for e in &arrivals {
            let id = e["eventId"].as_str().unwrap();
            if !seen.insert(id) {
                continue;
            }
            let lane = e["eventName"].as_str().unwrap();
            assert!(types.contains(&lane), "webhook {i} got a {lane} event");
            let (p, n) = publisher_of(id);
            if let Some(prev) = last.insert((p, lane), n) {
                assert!(
                    n > prev,
                    "webhook {i}, {lane}: publisher {p}'s event {n} first arrived after its event {prev}"
                );
            }
        }
        let duplicates = ids.len() - unique.len();
        duplicates_total += duplicates;
        println!(
            "webhook {i} {types:?}: {} arrivals in {} requests, {} unique, {duplicates} duplicates",
            ids.len(),
            got.len(),
            unique.len()
        );
    }
    println!(
        "{KILLS} kills: {} events sent, {} acknowledged, {failed_calls} publish calls failed, \
         {duplicates_total} duplicate deliveries over {} webhooks, {:?} total",
        sent.len(),
        acked.len(),
        WEBHOOK_TYPES.len(),
        started.elapsed()
    );

    router.signal("-TERM");
    let status = router.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}
