//! Encryption at rest (`storage.secret_key`) through a real router and its
//! real sled folder: with the key set, the database files never hold a
//! signing secret or a Basic password in the clear, deliveries are still
//! signed and authenticated correctly, across restarts; starting without the
//! key or with another one fails at once with a message saying so; a folder
//! written without a key keeps working once a key is set.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use webhook_router::config::Config;

const KEY: [u8; 32] = [0x5a; 32];
const OTHER_KEY: [u8; 32] = [0xa5; 32];
const PASSWORD: &str = "basic-password-Qm9vayBvZiBzZWNyZXRz";

fn b64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn config(dir: &Path, key: Option<&[u8; 32]>) -> Config {
    let mut c = test_config(dir);
    c.storage.secret_key = key.map(b64).unwrap_or_default();
    c
}

/// Every file under `dir`, concatenated.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.extend(std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The secret and its base64 body (what an attacker would look for).
fn secret_needles(secret: &str) -> Vec<String> {
    let body = secret.trim_start_matches("whsec_");
    vec![secret.to_string(), body[..20].to_string()]
}

fn signature_valid(secret: &str, r: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(
        format!(
            "{}.{}.",
            r.header("webhook-id"),
            r.header("webhook-timestamp")
        )
        .as_bytes(),
    );
    mac.update(&r.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    r.header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

fn basic_header() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("erp:{PASSWORD}"))
    )
}

/// Creates a signing webhook and a Basic one on `listener`; returns
/// (signing webhook id, its secret).
async fn create_webhooks(admin: &mut Admin, listener: &Listener) -> (String, String) {
    let signed = create(
        admin,
        1010,
        webhook(
            "signed",
            &listener.url(),
            &["COURSE_ENROLLMENT"],
            signature_auth(),
        ),
    )
    .await;
    create(
        admin,
        1010,
        webhook(
            "basic",
            &listener.url(),
            &["COURSE_COMPLETED"],
            webhook_auth::Method::Basic(BasicAuth {
                username: "erp".into(),
                password: PASSWORD.into(),
            }),
        ),
    )
    .await;
    let secret = get_secret(admin, &signed.id).await;
    (signed.id, secret)
}

async fn get_secret(admin: &mut Admin, id: &str) -> String {
    admin
        .get_webhook_secret(GetWebhookSecretRequest {
            account_id: 1010,
            webhook_id: id.into(),
        })
        .await
        .expect("secret")
        .into_inner()
        .secret
        .unwrap()
        .secret
}

/// Publishes one event of each type and checks both arrive authenticated.
async fn deliver_and_check(ingest: &mut Ingest, listener: &Listener, secret: &str, tag: &str) {
    let before = listener.requests().len();
    publish(
        ingest,
        1010,
        vec![
            event(&format!("{tag}-signed"), "COURSE_ENROLLMENT", 1),
            event(&format!("{tag}-basic"), "COURSE_COMPLETED", 2),
        ],
    )
    .await;
    let got = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= before + 2)
        .await;
    assert!(got.len() >= before + 2, "both deliveries arrive");
    for r in &got[before..] {
        let ids = r.event_ids();
        if ids.contains(&format!("{tag}-signed")) {
            assert!(signature_valid(secret, r), "valid signature after {tag}");
        } else {
            assert_eq!(r.header("authorization"), basic_header(), "{tag}");
        }
    }
}

#[tokio::test]
async fn secrets_are_encrypted_on_disk_and_survive_restarts_only_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::ok().await;
    let server = TestServer::start(config(dir.path(), Some(&KEY))).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let (signed_id, secret) = create_webhooks(&mut admin, &listener).await;
    // Rotation keeps the previous secret for a grace period: both sealed.
    let rotated = admin
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1010,
            webhook_id: signed_id.clone(),
            grace_period_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap()
        .secret;
    deliver_and_check(&mut ingest, &listener, &rotated, "first").await;
    deliver_and_check(&mut ingest, &listener, &secret, "first-prev").await;
    drop((admin, ingest));
    server.stop().await.unwrap();

    let disk = all_bytes(dir.path());
    for needle in secret_needles(&secret)
        .into_iter()
        .chain(secret_needles(&rotated))
        .chain([PASSWORD.to_string()])
    {
        assert!(
            !contains(&disk, &needle),
            "{needle} is in the data folder in the clear"
        );
    }
    assert!(contains(&disk, "wrenc1:"), "sealed values are there");

    // Restart with the key: same secrets, deliveries signed and authenticated.
    let server = TestServer::start(config(dir.path(), Some(&KEY))).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    assert_eq!(get_secret(&mut admin, &signed_id).await, rotated);
    deliver_and_check(&mut ingest, &listener, &rotated, "restarted").await;
    drop((admin, ingest));
    server.stop().await.unwrap();

    // Without the key, or with another key: the start fails, saying why.
    for (key, expected) in [
        (None, "set storage.secret_key"),
        (Some(&OTHER_KEY), "set the key they were encrypted with"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = webhook_router::run(config(dir.path(), key), listener, std::future::pending())
            .await
            .expect_err("no start without the right key");
        let msg = err.to_string();
        assert!(msg.contains(expected), "{msg}");
        assert!(
            !msg.contains(&b64(&KEY)) && !msg.contains(&b64(&OTHER_KEY)),
            "keys never in messages: {msg}"
        );
    }

    // The real binary says the same on stderr and exits 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-router"))
        .arg("serve")
        .env("WEBHOOK_ROUTER__LISTEN", "127.0.0.1:0")
        .env("WEBHOOK_ROUTER__DATA_DIR", dir.path())
        .env("WEBHOOK_ROUTER__STORAGE__SECRET_KEY", b64(&OTHER_KEY))
        .output()
        .expect("run webhook-router");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: storage.secret_key has key id"),
        "{stderr}"
    );

    // And the right key still works after those refusals.
    let server = TestServer::start(config(dir.path(), Some(&KEY))).await;
    let mut admin = server.admin(ADMIN).await;
    assert_eq!(get_secret(&mut admin, &signed_id).await, rotated);
    drop(admin);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn without_a_key_secrets_are_plain_and_setting_one_later_keeps_them_working() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::ok().await;
    let server = TestServer::start(config(dir.path(), None)).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let (signed_id, secret) = create_webhooks(&mut admin, &listener).await;
    deliver_and_check(&mut ingest, &listener, &secret, "plain").await;
    drop((admin, ingest));
    server.stop().await.unwrap();
    // The control for the test above: without a key the same scan finds them.
    let disk = all_bytes(dir.path());
    assert!(
        contains(&disk, &secret),
        "plain secret on disk without a key"
    );
    assert!(
        contains(&disk, PASSWORD),
        "plain password on disk without a key"
    );

    // Setting a key later: existing secrets are sealed at start and keep working.
    let server = TestServer::start(config(dir.path(), Some(&KEY))).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    assert_eq!(get_secret(&mut admin, &signed_id).await, secret);
    deliver_and_check(&mut ingest, &listener, &secret, "sealed-later").await;
    drop((admin, ingest));
    server.stop().await.unwrap();
    let disk = all_bytes(dir.path());
    eprintln!(
        "after sealing an existing folder: old plain secret still in sled's files: {}",
        contains(&disk, &secret)
    );

    // From now on the folder needs the key.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = webhook_router::run(config(dir.path(), None), listener, std::future::pending())
        .await
        .expect_err("sealed folder without key");
    assert!(err.to_string().contains("storage.secret_key"), "{err}");
}
