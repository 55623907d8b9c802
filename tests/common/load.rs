//! Sustained load for the crash and power-cut tests: publishers that record
//! what they sent and what was acknowledged, and the check that every
//! acknowledged event reached every matching webhook, with the content that
//! was sent and in per-lane publish order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost_types::{value::Kind, ListValue, Struct, Value};
use rand::Rng;

use super::process::RouterProcess;
use super::{create, no_auth, webhook, Event, Ingest, Listener, PublishEventsRequest};

pub const REALTIME: &str = "COURSE_ENROLLMENT";
pub const BATCH: &str = "COURSE_ENROLLMENT_BATCH";
/// Webhooks' event types: real-time lane only, both lanes, batch lane only.
pub const WEBHOOK_TYPES: [&[&str]; 3] = [&[REALTIME], &[REALTIME, BATCH], &[BATCH]];

/// What was sent for each event id, and which publishes were acknowledged.
#[derive(Default)]
pub struct Ledger {
    /// event id → the event object a listener must receive for it.
    pub sent: HashMap<String, serde_json::Value>,
    /// Event ids whose PublishEvents call returned OK.
    pub acked: HashSet<String>,
    /// PublishEvents calls that failed (outcome unknown or refused).
    pub failed_calls: usize,
    /// Events sent again after a failed call.
    pub resent: usize,
    /// Of those, the ones the router reported as already stored: the crash
    /// came after they were durable but before the answer arrived.
    pub resent_found_stored: usize,
}

/// A publisher's progress across restarts.
pub struct Publisher {
    pub id: usize,
    next: u64,
    /// A batch whose publish outcome is unknown: sent again, unchanged, first.
    unknown: Option<Vec<Event>>,
    rng: rand::rngs::StdRng,
    /// Most events per PublishEvents call.
    max_batch: usize,
    /// One event in this many carries ~140 KiB of data (0: none does), so
    /// sled stores it in a blob file of its own (over 128 KiB).
    large_every: u64,
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

impl Publisher {
    /// Publisher `id`, its random choices seeded from `seed`, sending 1 to
    /// `max_batch` events per call.
    pub fn new(id: usize, seed: u64, max_batch: usize) -> Publisher {
        use rand::SeedableRng;
        Publisher {
            id,
            next: 0,
            unknown: None,
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ (id as u64 + 1)),
            max_batch,
            large_every: 0,
        }
    }

    /// Makes one event in `n` about 140 KiB large.
    pub fn with_large_events(mut self, n: u64) -> Publisher {
        self.large_every = n;
        self
    }

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
        let blob_len = if self.large_every > 0 && self.rng.gen_range(0..self.large_every) == 0 {
            140 * 1024
        } else {
            self.rng.gen_range(0..400)
        };
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
    pub async fn run(
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
                    let k = self.rng.gen_range(1..=self.max_batch);
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

    /// Sends the batch whose outcome is unknown once more (as a client
    /// would retry) and records the answer.
    pub async fn settle(&mut self, ingest: &mut Ingest, ledger: &Mutex<Ledger>) {
        if let Some(batch) = self.unknown.take() {
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
}

/// Runs `publishers` against `ingest` clients until `run_for` has passed,
/// then returns them (each with its last batch unknown if it was cut off).
pub async fn publish_for(
    publishers: &mut Vec<Publisher>,
    clients: Vec<Ingest>,
    ledger: &Arc<Mutex<Ledger>>,
    run_for: Duration,
    cut: impl std::future::Future<Output = ()>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (p, ingest) in publishers.drain(..).zip(clients) {
        tasks.push(tokio::spawn(p.run(ingest, ledger.clone(), stop.clone())));
    }
    tokio::time::sleep(run_for).await;
    cut.await;
    // Publishers see the broken connection; their last batch stays unknown.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        publishers.push(t.await.unwrap());
    }
}

/// Waits (up to `timeout`) until every acknowledged event of a type in
/// `types` reached `listener`, then asserts that it did, that every arrival
/// carries exactly what was sent for its id, and that each publisher's events
/// first arrived in publish order within each lane of a type in `ordered`.
/// Returns (arrivals, requests, duplicates).
pub async fn check_deliveries(
    name: &str,
    listener: &Listener,
    types: &[&str],
    ordered: &[&str],
    ledger: &Mutex<Ledger>,
    timeout: Duration,
) -> (usize, usize, usize) {
    let (sent, acked) = {
        let l = ledger.lock().unwrap();
        (l.sent.clone(), l.acked.clone())
    };
    let wanted: HashSet<&String> = acked
        .iter()
        .filter(|id| types.contains(&sent[*id]["eventName"].as_str().unwrap()))
        .collect();
    let got = listener
        .wait_until(timeout, |reqs| {
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
    let mut missing: Vec<&&String> = wanted.iter().filter(|id| !unique.contains(**id)).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{name}: {} of {} acknowledged events never arrived, e.g. {:?}",
        missing.len(),
        wanted.len(),
        &missing[..missing.len().min(5)]
    );
    // Content: exactly what was sent for that id, acknowledged or not.
    for e in &arrivals {
        let id = e["eventId"].as_str().unwrap();
        let expected = sent
            .get(id)
            .unwrap_or_else(|| panic!("{name}: event {id} was never sent"));
        assert_eq!(e, expected, "{name}: content of {id}");
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
        assert!(types.contains(&lane), "{name} got a {lane} event");
        if !ordered.contains(&lane) {
            continue;
        }
        let (p, n) = publisher_of(id);
        if let Some(prev) = last.insert((p, lane), n) {
            assert!(
                n > prev,
                "{name}, {lane}: publisher {p}'s event {n} first arrived after its event {prev}"
            );
        }
    }
    (ids.len(), got.len(), ids.len() - unique.len())
}

/// Picks a random duration in `[from_ms, to_ms)`.
pub fn random_ms(rng: &mut impl Rng, from_ms: u64, to_ms: u64) -> Duration {
    Duration::from_millis(rng.gen_range(from_ms..to_ms))
}

/// One listener per entry of [`WEBHOOK_TYPES`], answering after a short
/// delay that varies (so deliveries are in flight when a crash comes).
pub async fn lane_listeners(
    delay_ms: impl Fn(usize) -> u64 + Copy + Send + Sync + 'static,
) -> Vec<Listener> {
    let mut listeners = Vec::new();
    for _ in WEBHOOK_TYPES {
        listeners.push(
            Listener::start(Arc::new(move |n, _| {
                (200, vec![], Duration::from_millis(delay_ms(n)))
            }))
            .await,
        );
    }
    listeners
}

/// Creates a webhook of account 1010 per listener, with the event types of
/// [`WEBHOOK_TYPES`] in order, named `{prefix}-{i}`, with `max_in_flight`.
pub async fn create_lane_webhooks(
    router: &RouterProcess,
    listeners: &[Listener],
    prefix: &str,
    max_in_flight: u32,
) {
    let mut admin = router.admin().await;
    for (i, (l, types)) in listeners.iter().zip(WEBHOOK_TYPES).enumerate() {
        let mut w = webhook(&format!("{prefix}-{i}"), &l.url(), types, no_auth());
        w.max_in_flight = max_in_flight;
        create(&mut admin, 1010, w).await;
    }
}

/// One ingest client (its own connection) per publisher.
pub async fn ingest_clients(router: &RouterProcess, n: usize) -> Vec<Ingest> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(router.ingest().await);
    }
    clients
}

/// [`check_deliveries`] for every listener made by [`lane_listeners`], order
/// checked in the lanes of the types in `ordered`; prints a line per webhook
/// and returns the duplicates in all.
pub async fn check_every_lane(
    listeners: &[Listener],
    ledger: &Mutex<Ledger>,
    ordered: &[&str],
    timeout: Duration,
) -> usize {
    let mut duplicates_total = 0;
    for (i, (l, types)) in listeners.iter().zip(WEBHOOK_TYPES).enumerate() {
        let name = format!("webhook {i}");
        let (arrivals, requests, duplicates) =
            check_deliveries(&name, l, types, ordered, ledger, timeout).await;
        duplicates_total += duplicates;
        println!(
            "{name} {types:?}: {arrivals} arrivals in {requests} requests, {duplicates} duplicates"
        );
    }
    duplicates_total
}
