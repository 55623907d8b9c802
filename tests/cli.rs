//! The real binary: structured JSON logs carry the ids needed to follow one
//! event (spans with account_id, webhook_id, delivery_id, event ids), and
//! `check-config` prints the effective config with every secret masked.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;
use tonic::transport::Channel;
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

const BIN: &str = env!("CARGO_BIN_EXE_webhook-router");

/// `webhook-router --log-json serve` with every stderr line kept.
struct JsonRouter {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl JsonRouter {
    fn start(config: &std::path::Path) -> JsonRouter {
        Self::start_with_env(config, &[])
    }

    fn start_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> JsonRouter {
        let mut child = Command::new(BIN)
            .args(["--log-json", "serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,webhook_router=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start webhook-router");
        let stderr = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        JsonRouter { child, lines }
    }

    /// Every line so far, each parsed as JSON (a line that is not JSON fails the test).
    fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits for a line with this message; returns it.
    fn wait_for(&self, message: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .json_lines()
                .into_iter()
                .find(|l| l["message"] == message)
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line {message:?} in {:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for JsonRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fields of the span named `name` among the line's spans.
fn span<'a>(line: &'a Value, name: &str) -> &'a Value {
    line["spans"]
        .as_array()
        .unwrap_or_else(|| panic!("no spans in {line}"))
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name} in {line}"))
}

/// The shared test config (see `crate::common::process`) with `extra` appended.
fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = crate::common::process::write_router_config(dir, 2_000, "");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(extra);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn json_logs_carry_account_webhook_delivery_and_event_ids() {
    let dir = tempfile::tempdir().unwrap();
    let router = JsonRouter::start(&write_config(dir.path(), ""));
    let serving = router.wait_for("webhook-router serving");
    let addr = serving["addr"].as_str().expect("addr field").to_string();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = WebhookAdminClient::with_interceptor(channel.clone(), bearer(ADMIN));
    let mut ingest = EventIngestClient::with_interceptor(channel, bearer(INGEST));

    // Fails once, so an attempt logs inside its delivery span; then accepts.
    let listener = Listener::start(Arc::new(|n, _| {
        (if n == 0 { 500 } else { 200 }, vec![], Duration::ZERO)
    }))
    .await;
    let w = create(
        &mut admin,
        1010,
        webhook(
            "logs",
            &listener.url(),
            &["COURSE_ENROLLMENT"],
            signature_auth(),
        ),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![
            event("log-evt-1", "COURSE_ENROLLMENT", 1),
            event("log-evt-2", "COURSE_ENROLLMENT", 2),
        ],
    )
    .await;
    assert_eq!(
        listener.wait_events(4, Duration::from_secs(10)).await.len(),
        4
    );
    let delivery_id = listener.requests()[0].header("webhook-id");
    assert!(delivery_id.starts_with("msg_"), "{delivery_id}");

    // Ingest: the request span carries the account.
    let stored = router.wait_for("events stored");
    assert_eq!(span(&stored, "ingest")["account_id"], 1010);
    assert_eq!(stored["first_event_id"], "log-evt-1");
    assert_eq!(stored["last_event_id"], "log-evt-2");

    // Delivery: lane span (account, webhook) ▶ delivery span (delivery id,
    // first and last event id).
    let failed = router.wait_for("delivery attempt failed");
    assert_eq!(failed["level"], "INFO");
    let lane = span(&failed, "lane");
    assert_eq!(lane["account_id"], 1010);
    assert_eq!(lane["webhook_id"], w.id.as_str());
    let attempt = span(&failed, "delivery");
    assert_eq!(attempt["delivery_id"], delivery_id.as_str());
    assert_eq!(attempt["first_event_id"], "log-evt-1");
    assert_eq!(attempt["last_event_id"], "log-evt-2");
    assert_eq!(attempt["events"], 2);
    assert_eq!(failed["status"], 500);

    // RedeliverEvents reports what it requeued.
    admin
        .redeliver_events(RedeliverEventsRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            delivery_ids: vec![delivery_id.clone()],
        })
        .await
        .unwrap();
    let redelivered = router.wait_for("redelivery requeued");
    assert_eq!(redelivered["webhook_id"], w.id.as_str());
    assert_eq!(redelivered["account_id"], 1010);
    assert_eq!(redelivered["requeued"], 1);
    assert_eq!(
        listener.wait_events(6, Duration::from_secs(10)).await.len(),
        6
    );

    // Nothing but JSON on stderr, secrets included nowhere.
    let all = router.lines.lock().unwrap().join("\n");
    assert!(!all.contains(ADMIN) && !all.contains(INGEST));
    assert!(router.json_lines().len() > 5);
}

#[tokio::test]
async fn redelivering_many_deliveries_logs_progress() {
    let dir = tempfile::tempdir().unwrap();
    // One event per payload, and no pacing to speak of, so 1001 deliveries
    // are made quickly.
    let router = JsonRouter::start_with_env(
        &write_config(dir.path(), ""),
        &[
            ("WEBHOOK_ROUTER__DELIVERY__MAX_EVENTS_PER_PAYLOAD", "1"),
            ("WEBHOOK_ROUTER__DELIVERY__RATE_LIMIT_PER_SECOND", "100000"),
        ],
    );
    let serving = router.wait_for("webhook-router serving");
    let channel = Channel::from_shared(format!("http://{}", serving["addr"].as_str().unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = WebhookAdminClient::with_interceptor(channel.clone(), bearer(ADMIN));
    let mut ingest = EventIngestClient::with_interceptor(channel, bearer(INGEST));
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("many", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    const N: usize = 1001;
    let events: Vec<Event> = (0..N)
        .map(|i| event(&format!("many-{i}"), "COURSE_ENROLLMENT", i as u64))
        .collect();
    for chunk in events.chunks(1000) {
        publish(&mut ingest, 1010, chunk.to_vec()).await;
    }
    assert_eq!(
        listener.wait_events(N, Duration::from_secs(60)).await.len(),
        N
    );
    // Retired: the requeued deliveries wait, so the call is all there is.
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_deliveries(ListDeliveriesRequest {
                account_id: 1010,
                webhook_id: w.id.clone(),
                state: 0,
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.deliveries.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(ids.len(), N);
    let answer = admin
        .redeliver_events(RedeliverEventsRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            delivery_ids: ids,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.requeued_count as usize, N);
    router.wait_for("redelivery requeued");
    let progress: Vec<(u64, u64)> = router
        .json_lines()
        .into_iter()
        .filter(|l| l["message"] == "redelivery progress")
        .map(|l| {
            assert_eq!(l["webhook_id"], w.id.as_str());
            (l["done"].as_u64().unwrap(), l["total"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(progress, vec![(1000, N as u64), (N as u64, N as u64)]);
}

fn check_config(config: &std::path::Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", "--config"]).arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run check-config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_config_masks_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b4b0b822cd15d6c15b0f00a08";
    let path = write_config(
        dir.path(),
        &format!(
            r#"
[[tokens]]
token_sha256 = "{hash}"
role = "ingest"
account_ids = [1010]

[metrics]
listen = "127.0.0.1:9090"
"#
        ),
    );
    let (code, out, err) = check_config(&path, &[]);
    assert_eq!(code, 0, "{err}");
    // The output is the effective config, as TOML.
    let parsed: toml::Table = out.parse().unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(!out.contains(ADMIN), "{out}");
    assert!(!out.contains(INGEST), "{out}");
    let tokens = parsed["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    // A token is shown as its hash (what the config may hold instead).
    let sha = webhook_router::api::auth::token_sha256_hex;
    assert!(tokens[0].get("token").is_none(), "{out}");
    assert_eq!(
        tokens[0]["token_sha256"].as_str(),
        Some(sha(ADMIN).as_str())
    );
    assert_eq!(tokens[0]["role"].as_str(), Some("admin"));
    assert_eq!(
        tokens[1]["token_sha256"].as_str(),
        Some(sha(INGEST).as_str())
    );
    // A hash is not the secret; it stays visible so operators can match it.
    assert_eq!(tokens[2]["token_sha256"].as_str(), Some(hash));
    assert_eq!(parsed["metrics"]["listen"].as_str(), Some("127.0.0.1:9090"));
    assert_eq!(
        parsed["limits"]["max_webhooks_per_account"].as_integer(),
        Some(5)
    );

    // Tokens set through the environment are masked the same way.
    let secret = "env-token-0123456789abcdef";
    let (code, out, err) = check_config(
        &path,
        &[(
            "WEBHOOK_ROUTER__TOKENS",
            &format!(r#"[{{token = "{secret}", role = "admin"}}]"#),
        )],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(secret), "{out}");
    assert!(out.contains(&sha(secret)), "{out}");

    // A bad value: exit 2, the key named, nothing printed on stdout.
    let (code, out, err) = check_config(&path, &[("WEBHOOK_ROUTER__METRICS__LISTEN", "nowhere")]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("metrics.listen"), "{err}");
}

#[test]
fn check_config_output_loads_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let (code, out, err) = check_config(&path, &[]);
    assert_eq!(code, 0, "{err}");
    // Unset keys read as unset, not as a value ("" or a mask).
    assert!(out.contains("# storage.secret_key: not set\n"), "{out}");
    assert!(out.contains("# tls.cert_path: not set\n"), "{out}");
    assert!(!out.contains("\"********\""), "{out}");
    assert!(!out.contains("= \"\""), "{out}");
    // Tokens are shown as their hash, which loads as a config.
    assert!(!out.contains(ADMIN) && !out.contains(INGEST), "{out}");
    let parsed: toml::Table = out.parse().unwrap_or_else(|e| panic!("{e}: {out}"));
    let hash = webhook_router::api::auth::token_sha256_hex(ADMIN);
    assert_eq!(
        parsed["tokens"][0]["token_sha256"].as_str(),
        Some(hash.as_str())
    );
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (code, again, err) = check_config(&printed, &[]);
    assert_eq!(code, 0, "the printed config loads again: {err}\n{out}");
    assert_eq!(again, out);
}

#[test]
fn check_config_runs_the_start_checks_of_serve() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-cert.pem");
    let path = write_config(
        dir.path(),
        &format!(
            "\n[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
            missing.display(),
            dir.path().join("no-such-key.pem").display()
        ),
    );
    let (code, out, err) = check_config(&path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.is_empty(), "{out}");
    let message = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"))
        .to_string();
    assert!(
        message.starts_with(&format!(
            "error: tls.cert_path: cannot read {}",
            missing.display()
        )),
        "{message}"
    );
    // serve refuses the same config with the same message.
    let served = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .output()
        .expect("run serve");
    assert_eq!(served.status.code(), Some(1));
    let served_err = String::from_utf8(served.stderr).unwrap();
    assert!(
        served_err.lines().any(|l| l == message),
        "serve said:\n{served_err}\ncheck-config said: {message}"
    );
    // The storage key is checked too.
    let (code, _, err) = check_config(
        &write_config(dir.path(), "\n[storage]\nsecret_key = \"c2hvcnQ=\"\n"),
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("storage.secret_key ("), "{err}");
}

#[test]
fn check_config_names_the_source_and_warns_about_one_underscore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "listen = 50051\n").unwrap();
    let (code, _, err) = check_config(&path, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "listen ({} line 1): expected a string like \"127.0.0.1:50051\", got integer 50051",
            path.display()
        )),
        "{err}"
    );
    let path = write_config(dir.path(), "");
    let (code, _, err) = check_config(&path, &[("WEBHOOK_ROUTER_LISTEN", "0.0.0.0:1")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "warning: environment variable WEBHOOK_ROUTER_LISTEN is not read: config \
             variables start with WEBHOOK_ROUTER__ (two underscores), e.g. WEBHOOK_ROUTER__LISTEN"
        ),
        "{err}"
    );
}

#[test]
fn a_second_router_on_the_same_data_folder_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::common::process::write_router_config(dir.path(), 2_000, "");
    let first = crate::common::process::RouterProcess::start(&config);
    let second = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run a second router");
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8(second.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "error: another webhook-router process uses the data folder {} \
             (its database is locked); stop that process, or give this one another data_dir",
            dir.path().join("data").display()
        )),
        "{err}"
    );
    assert!(!err.contains("WouldBlock"), "{err}");
    drop(first);
}
