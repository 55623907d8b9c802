//! Tokens, signing secrets and Basic passwords never leak: the real binary
//! runs with `RUST_LOG=debug` through webhook CRUD, secret rotation, failed
//! and retried deliveries, TestWebhook, bad requests and refused tokens; then
//! its whole stderr, every read response (all but GetWebhookSecret, whose
//! job is to return the secret) and every error message are searched for
//! each of those values. A target URL's query string (where listeners put
//! tokens) appears neither in the log nor in the delivery log's attempt
//! errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine;
use tonic::transport::Channel;
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

const ADMIN_TOKEN: &str = "hygiene-admin-token-7f3a9c21d4";
const INGEST_TOKEN: &str = "hygiene-ingest-token-0b8e6d55aa";
const WRONG_TOKEN: &str = "hygiene-wrong-token-c0ffee1234";
const PASSWORD_1: &str = "pw-one-Zx8qLr2VnT";
const PASSWORD_2: &str = "pw-two-Hy5mWd9KcB";
const PASSWORD_BAD: &str = "pw-bad-request-Jt4sNe7Q";
const URL_PASSWORD: &str = "url-pw-Gp3vXk6Ra";
const URL_QUERY_TOKEN: &str = "url-query-token-Rb7wQe2Lm";

#[tokio::test]
async fn no_token_secret_or_password_in_logs_responses_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:0"
data_dir = "{}"
shutdown_grace_ms = 2000
[delivery]
allow_private_targets = true
retry_initial_ms = 100
retry_max_interval_ms = 200
[[tokens]]
token = "{ADMIN_TOKEN}"
role = "admin"
[[tokens]]
token = "{INGEST_TOKEN}"
role = "ingest"
"#,
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-router"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start webhook-router");
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let (addr_tx, addr_rx) = mpsc::channel();
    let reader = {
        let log = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("webhook-router serving") {
                    if let (Some(i), Some(tx)) = (line.find("addr="), addr_tx.take()) {
                        let addr: String = line[i + 5..]
                            .chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect();
                        let _ = tx.send(addr);
                    }
                }
                log.lock().unwrap().push(line);
            }
        })
    };
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("router started");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = WebhookAdminClient::with_interceptor(channel.clone(), bearer(ADMIN_TOKEN));
    let mut ingest = EventIngestClient::with_interceptor(channel.clone(), bearer(INGEST_TOKEN));
    // Everything a client sees, as text.
    let mut seen: Vec<String> = Vec::new();

    // The listener refuses the first two requests (401), then accepts.
    let listener = Listener::start(Arc::new(|n, _| {
        (if n < 2 { 401 } else { 200 }, vec![], Duration::ZERO)
    }))
    .await;
    let basic = |password: &str| {
        webhook_auth::Method::Basic(BasicAuth {
            username: "erp".into(),
            password: password.into(),
        })
    };
    let created = admin
        .create_webhook(CreateWebhookRequest {
            account_id: 1010,
            webhook: Some(webhook(
                "basic",
                &listener.url(),
                &["COURSE_ENROLLMENT"],
                basic(PASSWORD_1),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    seen.push(format!("{created:?}"));
    let basic_id = created.webhook.unwrap().id;
    let signed = create(
        &mut admin,
        1010,
        webhook(
            "signed",
            &listener.url(),
            &["COURSE_COMPLETED"],
            signature_auth(),
        ),
    )
    .await;
    let secret_1 = admin
        .get_webhook_secret(GetWebhookSecretRequest {
            account_id: 1010,
            webhook_id: signed.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap()
        .secret;
    let secret_2 = admin
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1010,
            webhook_id: signed.id.clone(),
            grace_period_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap()
        .secret;

    // A webhook whose URL carries a token in its query string, on a port
    // nobody listens on: its attempts fail to connect.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = create(
        &mut admin,
        1010,
        webhook(
            "query-token",
            &format!("http://127.0.0.1:{closed_port}/hook?token={URL_QUERY_TOKEN}"),
            &["COURSE_UNENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![event("hyg-q", "COURSE_UNENROLLMENT", 3)],
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let attempt_errors = loop {
        let ds = deliveries(&mut admin, &unreachable.id).await;
        let errors: Vec<String> = ds
            .iter()
            .flat_map(|d| d.attempts.iter().map(|a| a.error.clone()))
            .collect();
        if errors.len() >= 2 || Instant::now() > deadline {
            break errors;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(attempt_errors.len() >= 2, "{attempt_errors:?}");
    assert!(
        attempt_errors.iter().all(|e| e.contains("connect failed")),
        "{attempt_errors:?}"
    );
    for e in &attempt_errors {
        assert!(
            !e.contains(URL_QUERY_TOKEN),
            "an attempt error carries the URL's query string: {e}"
        );
    }

    // Deliveries that fail, are retried and succeed, for both webhooks.
    let r = ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![
                event("hyg-1", "COURSE_ENROLLMENT", 1),
                event("hyg-2", "COURSE_COMPLETED", 2),
            ],
        })
        .await
        .unwrap();
    seen.push(format!("{r:?}"));
    listener
        .wait_until(Duration::from_secs(15), |r| r.len() >= 4)
        .await;
    assert!(listener.requests().len() >= 4, "failed then retried");
    let sent_basic = listener
        .requests()
        .iter()
        .find(|r| !r.header("authorization").is_empty())
        .map(|r| r.header("authorization"))
        .expect("the basic webhook sent credentials");

    // Password change, TestWebhook, and reads of every kind.
    let updated = admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: basic_id.clone(),
                auth: Some(WebhookAuth {
                    method: Some(basic(PASSWORD_2)),
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["auth".into()],
            }),
        })
        .await
        .unwrap();
    seen.push(format!("{updated:?}"));
    let tested = admin
        .test_webhook(TestWebhookRequest {
            account_id: 1010,
            target: Some(test_webhook_request::Target::WebhookId(basic_id.clone())),
            event_name: String::new(),
        })
        .await
        .unwrap();
    seen.push(format!("{tested:?}"));
    for id in [&basic_id, &signed.id] {
        let got = admin
            .get_webhook(GetWebhookRequest {
                account_id: 1010,
                webhook_id: id.clone(),
            })
            .await
            .unwrap();
        seen.push(format!("{got:?}"));
        seen.push(format!("{:?}", deliveries(&mut admin, id).await));
    }
    let list = admin
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            ..Default::default()
        })
        .await
        .unwrap();
    seen.push(format!("{list:?}"));

    // Errors: bad requests carrying a password, credentials in a URL, and
    // refused tokens.
    let mut errors = Vec::new();
    let bad_user = webhook_auth::Method::Basic(BasicAuth {
        username: "a:b".into(),
        password: PASSWORD_BAD.into(),
    });
    errors.push(
        admin
            .create_webhook(CreateWebhookRequest {
                account_id: 1010,
                webhook: Some(webhook(
                    "bad",
                    &listener.url(),
                    &["COURSE_ENROLLMENT"],
                    bad_user,
                )),
            })
            .await
            .unwrap_err(),
    );
    errors.push(
        admin
            .create_webhook(CreateWebhookRequest {
                account_id: 1010,
                webhook: Some(webhook(
                    "creds",
                    &format!("http://user:{URL_PASSWORD}@127.0.0.1:9/h"),
                    &["COURSE_ENROLLMENT"],
                    no_auth(),
                )),
            })
            .await
            .unwrap_err(),
    );
    let mut wrong = WebhookAdminClient::with_interceptor(channel.clone(), bearer(WRONG_TOKEN));
    errors.push(
        wrong
            .list_event_types(ListEventTypesRequest::default())
            .await
            .unwrap_err(),
    );
    let mut swapped = WebhookAdminClient::with_interceptor(channel.clone(), bearer(INGEST_TOKEN));
    errors.push(
        swapped
            .list_event_types(ListEventTypesRequest::default())
            .await
            .unwrap_err(),
    );
    for e in &errors {
        seen.push(format!("{e:?}"));
    }
    drop((admin, ingest, wrong, swapped, channel));

    // Stop it and take the whole log.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "router did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    reader.join().unwrap();
    let log = log.lock().unwrap().join("\n");

    // The capture is real: the log saw the failed attempts and the shutdown.
    assert!(log.contains("401"), "failed attempts are logged");
    assert!(log.contains("store flushed"), "the log was read to the end");
    eprintln!(
        "searched {} log lines, {} responses/errors",
        log.lines().count(),
        seen.len()
    );

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut needles = vec![
        ADMIN_TOKEN.to_string(),
        INGEST_TOKEN.to_string(),
        WRONG_TOKEN.to_string(),
        PASSWORD_1.to_string(),
        PASSWORD_2.to_string(),
        PASSWORD_BAD.to_string(),
        URL_PASSWORD.to_string(),
        b64(&format!("erp:{PASSWORD_1}")),
        b64(&format!("erp:{PASSWORD_2}")),
        sent_basic.trim_start_matches("Basic ").to_string(),
    ];
    for s in [&secret_1, &secret_2] {
        needles.push(s.clone());
        needles.push(s.trim_start_matches("whsec_")[..16].to_string());
    }
    assert!(
        !log.contains(URL_QUERY_TOKEN),
        "a target URL's query string appears in the log"
    );
    assert!(
        log.contains("connect failed"),
        "the failed connects were logged"
    );
    let seen = seen.join("\n");
    for needle in &needles {
        assert!(
            !log.contains(needle.as_str()),
            "{needle} appears in the log"
        );
        assert!(
            !seen.contains(needle.as_str()),
            "{needle} appears in a response or error"
        );
    }
}
