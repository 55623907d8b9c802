//! What the real binary's CPU time (from /proc/<pid>/stat) says.
//!
//! Ingest costs CPU linear in an event's size, whatever its shape. The real
//! binary takes events of nearly `limits.max_event_bytes` (256 KiB) built
//! to make a path-per-field validator quadratic: one very long key over
//! thousands of list items, and thousands of long keys each over a list.
//! The router's own CPU time per request is read from /proc/<pid>/stat.
//!
//! - Validation: each shape with a NaN as its very last number is decoded
//!   and rendered whole, then refused (nothing is stored), so its request
//!   costs decoding plus validation: at most twice, plus 5 ms, a refused
//!   event of the same size made of one short key over a list of numbers
//!   (measured in the same run, so a slow or busy machine moves both), and
//!   never more than 50 ms.
//! - Acceptance: each shape, valid, is stored (a blob file and an fsync for
//!   an event this large, whose kernel time varies); it must cost at most
//!   twice an event of the same size made of one plain string, plus 5 ms.
//!
//! Idle lanes cost nothing: with webhooks on one account and the newest
//! events on another, a router with nothing to deliver stays near 0% CPU.

use std::time::Duration;

use crate::common::process::{write_router_config, RouterProcess};
use crate::common::*;
use prost::Message;
use prost_types::{value::Kind, ListValue, Struct, Value};

/// Allowance on the router's CPU per adversarial request, in ms.
const BOUND_MS: f64 = 5.0;
/// How many times an event of the same size with a short key an adversarial one may cost.
const FACTOR: f64 = 2.0;
/// Whatever the comparison says, no refused request may cost more (a cost
/// growing faster than the size, shared by both shapes, would pass the
/// relative bound; here it would cost hundreds of ms).
const CEILING_MS: f64 = 50.0;
const REQUESTS: usize = 100;

fn num(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

fn with_data(id: &str, fields: Vec<(String, Value)>) -> Event {
    Event {
        event_id: id.into(),
        event_name: "COURSE_ENROLLMENT".into(),
        timestamp: 0,
        event_info: String::new(),
        data: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
    }
}

/// The largest event of `shape` whose encoding stays under `limit` bytes.
fn fit(limit: usize, shape: impl Fn(usize) -> Event) -> Event {
    let (mut lo, mut hi) = (1usize, 1 << 20);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if shape(mid).encoded_len() <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    shape(lo)
}

/// Item `i` of `n`, NaN for the last when `poisoned`.
fn item(i: usize, n: usize, poisoned: bool) -> Value {
    num(if poisoned && i + 1 == n {
        f64::NAN
    } else {
        i as f64
    })
}

/// One 128 KiB key over `n` list items.
fn long_key_over_a_list(n: usize, poisoned: bool) -> Event {
    let key = "k".repeat(128 * 1024);
    let items = (0..n).map(|i| item(i, n, poisoned)).collect();
    with_data("x", vec![(key, list(items))])
}

/// `n` keys of 200 bytes, each over a list of 8 items.
fn many_long_keys(n: usize, poisoned: bool) -> Event {
    let fields = (0..n)
        .map(|i| {
            let key = format!("{i:06}{}", "q".repeat(194));
            let items = (0..8).map(|j| item(i * 8 + j, n * 8, poisoned)).collect();
            (key, list(items))
        })
        .collect();
    with_data("x", fields)
}

/// One plain string value.
fn plain(n: usize) -> Event {
    with_data(
        "x",
        vec![(
            "s".into(),
            Value {
                kind: Some(Kind::StringValue("v".repeat(n))),
            },
        )],
    )
}

/// One one-byte key over `n` list items: the shape above without its long key.
fn short_key_over_a_list(n: usize, poisoned: bool) -> Event {
    let items = (0..n).map(|i| item(i, n, poisoned)).collect();
    with_data("x", vec![("k".into(), list(items))])
}

/// The process's user + system CPU time, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 * 1000.0 / per_second
}

/// Publishes `e` under a new id: stored, or refused when `refused`.
async fn send(ingest: &mut Ingest, e: &Event, id: String, refused: bool) {
    let mut copy = e.clone();
    copy.event_id = id;
    let r = ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![copy],
        })
        .await;
    match (r, refused) {
        (Ok(r), false) => assert!(!r.into_inner().results[0].duplicate),
        (Err(s), true) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert!(
                s.message().starts_with("events[0].data."),
                "{}",
                s.message()
            );
        }
        (r, _) => panic!("unexpected answer: {r:?}"),
    }
}

/// CPU ms the router spends per request publishing `REQUESTS` copies of `e`.
async fn cost(
    router: &RouterProcess,
    ingest: &mut Ingest,
    name: &str,
    e: &Event,
    refused: bool,
) -> f64 {
    for i in 0..3 {
        send(ingest, e, format!("{name}-warm-{i}"), refused).await;
    }
    let pid = router.child.id();
    let before = cpu_ms(pid);
    for i in 0..REQUESTS {
        send(ingest, e, format!("{name}-{i}"), refused).await;
    }
    let per = (cpu_ms(pid) - before) / REQUESTS as f64;
    println!(
        "{name}: {} bytes encoded, {per:.2} ms of router CPU per request",
        e.encoded_len()
    );
    per
}

/// Builds an event of about `n` bytes; `refused` makes it fail validation at its end.
type Shape = fn(usize, bool) -> Event;

#[tokio::test]
async fn adversarial_events_cost_cpu_linear_in_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_router_config(dir.path(), 2_000, "");
    let router = RouterProcess::start(&config);
    let mut ingest = router.ingest().await;
    // Under limits.max_event_bytes, with room for the event's other fields.
    let limit = 262_144 - 64;
    let plain_event = fit(limit, plain);
    let shapes: [(&str, Shape); 2] = [
        ("long key over a list", long_key_over_a_list),
        ("many long keys over lists", many_long_keys),
    ];
    let stored_plain = cost(
        &router,
        &mut ingest,
        "plain string, stored",
        &plain_event,
        false,
    )
    .await;
    let refused_short = cost(
        &router,
        &mut ingest,
        "short key over a list, refused at its end",
        &fit(limit, |n| short_key_over_a_list(n, true)),
        true,
    )
    .await;
    // A validator copying a path per field would cost hundreds of ms here.
    let bound = (FACTOR * refused_short + BOUND_MS).min(CEILING_MS);
    for (name, shape) in shapes {
        let refused = fit(limit, |n| shape(n, true));
        assert!(
            refused.encoded_len() > 200_000,
            "{name} too small to prove anything"
        );
        let validation = cost(
            &router,
            &mut ingest,
            &format!("{name}, refused at its end"),
            &refused,
            true,
        )
        .await;
        assert!(
            validation < bound,
            "{name}: {validation:.2} ms of CPU to decode and validate, a short key over \
             a list of the same size {refused_short:.2} ms (bound {bound:.2} ms)"
        );
        let valid = fit(limit, |n| shape(n, false));
        let stored = cost(
            &router,
            &mut ingest,
            &format!("{name}, stored"),
            &valid,
            false,
        )
        .await;
        // Storing costs fsyncs and a blob file, whose kernel time varies from
        // run to run; a cost growing faster than the size would be hundreds
        // of ms here.
        assert!(
            stored < 2.0 * stored_plain + BOUND_MS,
            "{name}: {stored:.2} ms per stored request, a plain event of the same size \
             {stored_plain:.2} ms: the shape costs more than its size"
        );
    }
    drop(ingest);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn idle_lanes_use_no_cpu_while_other_accounts_have_newer_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_router_config(dir.path(), 2_000, "batch_interval_ms = 200");
    let router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    let listener = Listener::ok().await;
    let mut ids = Vec::new();
    for (i, types) in [&["COURSE_ENROLLMENT"][..], &["COURSE_ENROLLMENT_BATCH"]]
        .into_iter()
        .enumerate()
    {
        let w = create(
            &mut admin,
            1010,
            webhook(&format!("idle-{i}"), &listener.url(), types, no_auth()),
        )
        .await;
        ids.push(w.id);
    }
    publish(
        &mut ingest,
        1010,
        vec![event("mine", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    listener.wait_events(1, Duration::from_secs(10)).await;
    // The newest events belong to an account without webhooks.
    for i in 0..5 {
        publish(
            &mut ingest,
            1011,
            vec![event(&format!("theirs-{i}"), "COURSE_ENROLLMENT", i)],
        )
        .await;
    }
    // Wake the lanes (an edit does) while the log's newest events are another
    // account's: they look, find nothing of theirs, and must go back to sleep.
    for id in &ids {
        admin
            .update_webhook(UpdateWebhookRequest {
                account_id: 1010,
                webhook: Some(Webhook {
                    id: id.clone(),
                    description: "woken".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = router.child.id();
    let before = cpu_ms(pid);
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let used = cpu_ms(pid) - before;
    println!("idle router: {used:.0} ms of CPU in {window:?}");
    assert!(
        used < 200.0,
        "an idle router used {used:.0} ms of CPU in {window:?} (bound 200 ms, 10% of a core)"
    );
    assert_eq!(listener.event_ids(), vec!["mine".to_string()]);
}
