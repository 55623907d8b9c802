//! Storage errors on the real binary: the data folder on a small tmpfs that
//! fills up. Needs root (mount); fails with a clear message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::process::{write_router_config, RouterProcess};
use crate::common::*;
use prost_types::{value::Kind, Struct, Value};

/// A tmpfs mounted on a temp folder; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "4m"); fails the test, saying why,
    /// where that is not possible (these tests need root: .ci/run runs them
    /// as root).
    fn mount(size: &str) -> Tmpfs {
        Self::try_mount(size).unwrap_or_else(|why| {
            panic!("this test needs a tmpfs mount of its own, which needs root: {why}")
        })
    }

    fn try_mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }

    /// `mount -o remount,<options>`.
    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {options} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// An event whose data carries `pad` bytes, so the disk fills quickly.
fn big_event(id: &str, pad: usize) -> Event {
    let mut e = event(id, "COURSE_ENROLLMENT", 7);
    let mut fields: std::collections::BTreeMap<String, Value> =
        e.data.take().unwrap().fields.into_iter().collect();
    fields.insert(
        "pad".into(),
        Value {
            kind: Some(Kind::StringValue("p".repeat(pad))),
        },
    );
    e.data = Some(Struct {
        fields: fields.into_iter().collect(),
    });
    e
}

fn config_in(dir: &Path) -> PathBuf {
    write_router_config(dir, 2_000, "")
}

/// Health of the EventIngest service as the router reports it.
async fn ingest_health(router: &RouterProcess) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    HealthClient::new(router.channel().await)
        .check(HealthCheckRequest {
            service: "webhooks.v1.EventIngest".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Publishes 10 events of ~8 KB per request until one is refused; returns
/// the acknowledged ids and the refusal.
async fn fill_disk(ingest: &mut Ingest) -> (Vec<String>, Option<tonic::Status>) {
    let mut acked: Vec<String> = Vec::new();
    for b in 0..2_000 {
        let events: Vec<Event> = (0..10)
            .map(|i| big_event(&format!("d-{b}-{i}"), 8_000))
            .collect();
        let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
        match ingest
            .publish_events(PublishEventsRequest {
                account_id: 1010,
                events,
            })
            .await
        {
            Ok(_) => acked.extend(ids),
            Err(status) => return (acked, Some(status)),
        }
    }
    (acked, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_publish_unavailable_then_recovers_when_space_returns() {
    let fs = Tmpfs::mount("6m");
    let config = config_in(fs.path());
    // Answers take 300 ms, so a delivery is in flight when the disk fills.
    let listener =
        Listener::start(Arc::new(|_, _| (200, vec![], Duration::from_millis(300)))).await;
    let mut router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    let w = create(
        &mut admin,
        1010,
        webhook("disk", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    assert_eq!(ingest_health(&router).await, SERVING);

    let (acked, refused) = fill_disk(&mut ingest).await;
    let status = refused.expect("the 6 MiB disk never filled up");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        acked.len() >= 10,
        "acknowledged before the disk filled: {}",
        acked.len()
    );
    println!(
        "disk full after {} acknowledged events: {:?} {:?}",
        acked.len(),
        status.code(),
        status.message()
    );

    // No panic, a clear log line, later writes refused at once, reads served.
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router died"
    );
    let t = Instant::now();
    let again = ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![event("during-full", "COURSE_ENROLLMENT", 1)],
        })
        .await
        .expect_err("publish on a full disk");
    assert_eq!(again.code(), tonic::Code::Unavailable);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let got = admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .expect("reads keep working")
        .into_inner();
    assert_eq!(got.webhook.unwrap().name, "disk");
    deliveries(&mut admin, &w.id).await;
    assert_eq!(ingest_health(&router).await, NOT_SERVING);
    let log = router.log_lines().join("\n");
    assert!(
        log.contains("the store cannot write to disk") && log.contains("No space left on device"),
        "log:\n{log}"
    );
    assert!(!log.contains("panicked"), "log:\n{log}");

    // Deliveries pause: nothing is sent that could not be recorded (no
    // resend loop of the payload that was in flight when the disk filled).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let during = listener.requests().len();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        listener.requests().len(),
        during,
        "sent while the store was failed"
    );

    let serving_lines = |r: &RouterProcess| {
        r.log_lines()
            .iter()
            .filter(|l| l.contains("webhook-router serving"))
            .count()
    };
    assert_eq!(
        serving_lines(&router),
        1,
        "restarted while the disk was full"
    );
    // Space returns: the router notices, drains, reopens the store and serves
    // again, in the same process (sled cannot resume writing otherwise).
    fs.resize("64m");
    let t = Instant::now();
    router.wait_serving(2, Duration::from_secs(20));
    println!("serving again {:?} after space returned", t.elapsed());
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router exited"
    );
    assert!(router
        .log_lines()
        .iter()
        .any(|l| l.contains("restarting the service on a freshly opened store")));
    assert_eq!(ingest_health(&router).await, SERVING);
    let mut ingest = router.ingest().await;
    publish(
        &mut ingest,
        1010,
        vec![event("space-back", "COURSE_ENROLLMENT", 2)],
    )
    .await;
    let received = listener
        .wait_until(Duration::from_secs(20), |r| {
            r.iter()
                .flat_map(|r| r.event_ids())
                .any(|id| id == "space-back")
        })
        .await;
    println!("publish OK after {:?}, and delivered", t.elapsed());
    router.signal("-TERM");
    let exit = router.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "exit after recovery: {exit:?}");
    drop(router);

    // A restart on the same folder opens the store too.
    let router = RouterProcess::start(&config);
    assert_eq!(ingest_health(&router).await, SERVING);
    let mut ingest = router.ingest().await;
    publish(
        &mut ingest,
        1010,
        vec![event("after-restart", "COURSE_ENROLLMENT", 3)],
    )
    .await;
    let received_after = listener
        .wait_until(Duration::from_secs(20), |r| {
            r.iter()
                .flat_map(|r| r.event_ids())
                .any(|id| id == "after-restart")
        })
        .await;
    assert!(received_after.len() >= received.len());
    let received = received_after;
    let mut by_id = std::collections::HashMap::new();
    for r in &received {
        for e in r.json()["events"].as_array().unwrap() {
            by_id.insert(e["eventId"].as_str().unwrap().to_string(), e.clone());
        }
    }
    for id in &acked {
        let e = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged event {id} never delivered"));
        assert_eq!(e["data"]["pad"].as_str().unwrap().len(), 8_000, "{id}");
    }
    assert!(by_id.contains_key("space-back") && by_id.contains_key("after-restart"));
    assert!(
        !by_id.contains_key("during-full"),
        "an event refused with UNAVAILABLE was delivered"
    );
}

/// Runs the binary on `config` expecting it to fail at start; returns its
/// exit status and stderr.
fn start_expecting_failure(config: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-router"))
        .args(["serve", "--config"])
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the router kept running on a read-only folder:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data folder on a file system mounted read-only: the router refuses to
/// start with a clear message (no panic), and starts normally, store intact,
/// once the folder is writable again. (Remounting read-only under a running
/// router is refused by the kernel while sled holds its files open for
/// writing, so the running case is covered by the disk-full test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_data_folder() {
    let fs = Tmpfs::mount("32m");
    let config = config_in(fs.path());
    let listener = Listener::ok().await;
    let mut router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    let w = create(
        &mut admin,
        1010,
        webhook("ro", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("ro-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    listener.wait_events(1, Duration::from_secs(10)).await;
    router.signal("-TERM");
    assert!(router.wait_exit(Duration::from_secs(15)).success());
    drop(router);

    fs.remount("ro");
    let (status, stderr) = start_expecting_failure(&config);
    println!("start on a read-only folder: {status:?}: {}", stderr.trim());
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Read-only file system")
            && stderr.contains(&fs.path().join("data").display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    fs.remount("rw");
    let router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    let got = admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .expect("webhook kept")
        .into_inner();
    assert_eq!(got.webhook.unwrap().name, "ro");
    publish(
        &mut ingest,
        1010,
        vec![event("ro-2", "COURSE_ENROLLMENT", 2)],
    )
    .await;
    let ids = listener.wait_events(2, Duration::from_secs(10)).await;
    assert_eq!(ids, ["ro-1", "ro-2"]);
}

/// When the old database cannot be released in-process (here a client keeps
/// a WatchDeliveries stream open past the grace period, and its connection
/// holds the store), the router does not hang or serve half-way: it
/// re-executes itself (same pid), and the fresh image opens the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_recovery_reexecutes_when_the_store_stays_held() {
    let fs = Tmpfs::mount("6m");
    let config = config_in(fs.path());
    let listener = Listener::ok().await;
    let mut router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    create(
        &mut admin,
        1010,
        webhook("held", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let _watch = admin
        .watch_deliveries(WatchDeliveriesRequest {
            account_id: 1010,
            webhook_id: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let (acked, refused) = fill_disk(&mut ingest).await;
    assert_eq!(refused.expect("disk full").code(), tonic::Code::Unavailable);

    fs.resize("64m");
    router.wait_serving(2, Duration::from_secs(20));
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router exited"
    );
    let log = router.log_lines().join("\n");
    assert!(
        log.contains("could not reopen the store in-process; re-executing the router"),
        "log:\n{log}"
    );

    // The fresh image serves: publish and get everything delivered.
    let mut ingest = router.ingest().await;
    publish(
        &mut ingest,
        1010,
        vec![event("fresh", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let got = listener
        .wait_until(Duration::from_secs(20), |r| {
            r.iter().flat_map(|r| r.event_ids()).any(|id| id == "fresh")
        })
        .await;
    let ids: std::collections::HashSet<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    assert!(
        acked.iter().all(|id| ids.contains(id)),
        "acknowledged events lost"
    );
    router.signal("-TERM");
    let exit = router.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "exit after re-execution: {exit:?}");
}
