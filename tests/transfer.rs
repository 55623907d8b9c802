//! `webhook-router export` and `import` with the real binary: webhooks of a
//! sled folder (HMAC and ed25519 signature, Basic and no auth) move to another sled folder or
//! to PostgreSQL with their ids, settings and secrets; the export file is
//! private (0600, also when it existed before); a second import changes
//! nothing. And an unreachable PostgreSQL stops the start, the key named.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::process::{write_router_config, RouterProcess};
use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_webhook-router");

/// Runs the binary with `args`; returns its stdout, panicking on failure.
fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run webhook-router");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Four webhooks on account 1010 of a fresh sled router; returns (webhooks,
/// the HMAC secret and the ed25519 public key of the first two).
async fn source_router(dir: &Path) -> (Vec<Webhook>, Vec<String>) {
    let config = write_router_config(dir, 2_000, "");
    let mut router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let url = "http://127.0.0.1:9/hook";
    let basic = webhook_auth::Method::Basic(BasicAuth {
        username: "crm".into(),
        password: "pa55 word".into(),
    });
    let mut made = Vec::new();
    for (name, auth) in [
        ("signed", signature_auth()),
        (
            "ed25519",
            webhook_auth::Method::Signature(SignatureAuth {
                algorithm: SignatureAlgorithm::Ed25519 as i32,
            }),
        ),
        ("basic", basic),
        ("plain", no_auth()),
    ] {
        made.push(
            create(
                &mut admin,
                1010,
                webhook(name, url, &["COURSE_ENROLLMENT"], auth),
            )
            .await,
        );
    }
    let mut secret = Vec::new();
    for w in &made[..2] {
        secret.push(
            admin
                .get_webhook_secret(GetWebhookSecretRequest {
                    account_id: 1010,
                    webhook_id: w.id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .secret
                .expect("a secret")
                .secret,
        );
    }
    assert!(secret[0].starts_with("whsec_") && secret[1].starts_with("whpk_"));
    router.signal("-TERM");
    assert!(router.wait_exit(Duration::from_secs(15)).success());
    (made, secret)
}

/// The target has the same webhooks and the same signing secret and ed25519
/// key (the same public key: the private key moved).
async fn assert_moved(target: &RouterProcess, made: &[Webhook], secret: &[String]) {
    let mut admin = target.admin().await;
    for w in made {
        let got = admin
            .get_webhook(GetWebhookRequest {
                account_id: 1010,
                webhook_id: w.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .webhook
            .unwrap();
        assert_eq!(&got, w, "webhook {} after the move", w.name);
    }
    for (w, secret) in made.iter().zip(secret) {
        let moved = admin
            .get_webhook_secret(GetWebhookSecretRequest {
                account_id: 1010,
                webhook_id: w.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .secret
            .expect("a secret")
            .secret;
        assert_eq!(&moved, secret, "the signing key moved with {}", w.name);
    }
}

/// Exports `source` (a config) to a file in `dir`; checks its mode.
fn export(source: &Path, dir: &Path) -> std::path::PathBuf {
    let file = dir.join("webhooks.jsonl");
    // An older file of the same name, readable by all: replaced, and narrowed.
    std::fs::write(&file, "old").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&[
        "export",
        "--config",
        source.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.contains("exported 4 webhooks"), "{out}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the export holds secrets: owner only");
    file
}

#[tokio::test]
async fn webhooks_move_from_one_sled_folder_to_another() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (made, secret) = source_router(a.path()).await;
    let file = export(&a.path().join("config.toml"), b.path());
    let target = write_router_config(b.path(), 2_000, "");
    let imported = run(&[
        "import",
        "--config",
        target.to_str().unwrap(),
        "--in",
        file.to_str().unwrap(),
    ]);
    assert!(imported.contains("imported 4 webhooks"), "{imported}");
    let again = run(&[
        "import",
        "--config",
        target.to_str().unwrap(),
        "--in",
        file.to_str().unwrap(),
    ]);
    assert!(
        again.contains("imported 0 webhooks") && again.contains("4 were there already"),
        "{again}"
    );
    let router = RouterProcess::start(&target);
    assert_moved(&router, &made, &secret).await;
}

#[tokio::test]
async fn webhooks_move_from_a_sled_folder_to_postgres() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (made, secret) = source_router(a.path()).await;
    let file = export(&a.path().join("config.toml"), b.path());
    let db = crate::common::pg::TestDb::create().await;
    let target = crate::common::process::write_cluster_config(b.path(), &db.url, 2_000, "");
    let imported = run(&[
        "import",
        "--config",
        target.to_str().unwrap(),
        "--in",
        file.to_str().unwrap(),
    ]);
    assert!(imported.contains("imported 4 webhooks"), "{imported}");
    let router = RouterProcess::start(&target);
    assert_moved(&router, &made, &secret).await;
}

/// A PostgreSQL that cannot be reached stops the start: exit 1, the key
/// named, the password not shown.
#[test]
fn an_unreachable_database_stops_the_start_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::common::process::write_cluster_config(
        dir.path(),
        "postgres://router:hunter2@127.0.0.1:1/webhooks",
        2_000,
        "",
    );
    let out = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .expect("run webhook-router");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("storage.postgres_url"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
}
