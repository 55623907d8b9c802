//! Signature schemes against the real server: ed25519 (`v1a`) webhooks,
//! their public keys, rotation, migrating between HMAC-SHA256 and ed25519,
//! and HMAC webhooks created the old way. Signatures are checked here with
//! ed25519-dalek's verifier and the `hmac` crate directly, not with the
//! router's own verifier.

use std::time::Duration;

use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::Code;

use crate::common::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const ED25519: i32 = SignatureAlgorithm::Ed25519 as i32;
const HMAC_SHA256: i32 = SignatureAlgorithm::HmacSha256 as i32;
const TYPE: &str = "COURSE_ENROLLMENT";
/// Deadline for a delivery to arrive.
const ARRIVAL: Duration = Duration::from_secs(15);

fn signature(algorithm: i32) -> webhook_auth::Method {
    webhook_auth::Method::Signature(SignatureAuth { algorithm })
}

fn algorithm_of(w: &Webhook) -> Option<i32> {
    match w.auth.as_ref()?.method.as_ref()? {
        webhook_auth::Method::Signature(s) => Some(s.algorithm),
        _ => None,
    }
}

async fn secret(a: &mut Admin, id: &str) -> WebhookSecret {
    let s = a
        .get_webhook_secret(GetWebhookSecretRequest {
            account_id: 1010,
            webhook_id: id.into(),
        })
        .await
        .expect("GetWebhookSecret")
        .into_inner()
        .secret
        .expect("secret");
    assert!(!format!("{s:?}").contains("whsk_"), "{s:?}");
    s
}

async fn rotate(a: &mut Admin, id: &str, grace_period_seconds: u32) -> WebhookSecret {
    let s = a
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1010,
            webhook_id: id.into(),
            grace_period_seconds,
        })
        .await
        .expect("RotateWebhookSecret")
        .into_inner()
        .secret
        .expect("secret");
    assert!(!format!("{s:?}").contains("whsk_"), "{s:?}");
    s
}

async fn set_auth(a: &mut Admin, id: &str, method: webhook_auth::Method) -> Webhook {
    a.update_webhook(UpdateWebhookRequest {
        account_id: 1010,
        webhook: Some(Webhook {
            id: id.into(),
            auth: Some(WebhookAuth {
                method: Some(method),
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["auth".into()],
        }),
    })
    .await
    .expect("UpdateWebhook")
    .into_inner()
    .webhook
    .expect("webhook")
}

/// Publishes event `id` and returns the request that carried it.
async fn deliver(ingest: &mut Ingest, listener: &Listener, id: &str) -> Received {
    publish(ingest, 1010, vec![event(id, TYPE, 1)]).await;
    let reqs = listener
        .wait_until(ARRIVAL, |r| {
            r.iter().any(|r| r.event_ids().contains(&id.to_string()))
        })
        .await;
    reqs.into_iter()
        .find(|r| r.event_ids().contains(&id.to_string()))
        .unwrap_or_else(|| panic!("event {id} not delivered within {ARRIVAL:?}"))
}

/// The signed content of a request, as the Standard Webhooks spec defines it.
fn content(r: &Received) -> Vec<u8> {
    let mut c = format!(
        "{}.{}.",
        r.header("webhook-id"),
        r.header("webhook-timestamp")
    )
    .into_bytes();
    c.extend_from_slice(&r.body);
    c
}

/// The `webhook-signature` entries of a request: (identifier, bytes).
fn entries(r: &Received) -> Vec<(String, Vec<u8>)> {
    r.header("webhook-signature")
        .split(' ')
        .map(|e| {
            let (scheme, b64) = e.split_once(',').expect("identifier,signature");
            (
                scheme.to_string(),
                B64.decode(b64).expect("base64 signature"),
            )
        })
        .collect()
}

fn public_key(whpk: &str) -> VerifyingKey {
    let raw = B64
        .decode(whpk.strip_prefix("whpk_").expect("whpk_ prefix"))
        .expect("base64");
    VerifyingKey::from_bytes(&raw.try_into().expect("32-byte public key")).expect("ed25519 point")
}

fn ed25519_ok(key: &str, sig: &[u8], content: &[u8]) -> bool {
    let Ok(bytes) = <[u8; 64]>::try_from(sig) else {
        return false;
    };
    public_key(key)
        .verify_strict(content, &Signature::from_bytes(&bytes))
        .is_ok()
}

fn hmac_ok(whsec: &str, sig: &[u8], content: &[u8]) -> bool {
    let key = B64
        .decode(whsec.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(content);
    mac.verify_slice(sig).is_ok()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn ed25519_deliveries_verify_with_the_public_key() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("ed", &listener.url(), &[TYPE], signature(ED25519)),
    )
    .await;
    assert_eq!(algorithm_of(&w), Some(ED25519), "{w:?}");
    let read = admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(algorithm_of(read.webhook.as_ref().unwrap()), Some(ED25519));

    let s = secret(&mut admin, &w.id).await;
    assert_eq!(s.algorithm, "ED25519");
    assert!(s.secret.starts_with("whpk_"), "{s:?}");
    assert_eq!(B64.decode(&s.secret[5..]).unwrap().len(), 32);
    assert_eq!(s.signature_header, "webhook-signature");
    assert!(s.previous_secret_expire_time.is_none());
    // Stable across reads.
    assert_eq!(secret(&mut admin, &w.id).await, s);

    let r = deliver(&mut ingest, &listener, "e1").await;
    let sigs = entries(&r);
    assert_eq!(sigs.len(), 1, "{}", r.header("webhook-signature"));
    assert_eq!(sigs[0].0, "v1a");
    assert_eq!(sigs[0].1.len(), 64);
    assert!(ed25519_ok(&s.secret, &sigs[0].1, &content(&r)));
    let ts: i64 = r.header("webhook-timestamp").parse().unwrap();
    assert!((now_secs() - ts).abs() <= 60, "timestamp {ts}");
    // A changed body does not verify: the check above can fail.
    let mut tampered = content(&r);
    tampered.push(b' ');
    assert!(!ed25519_ok(&s.secret, &sigs[0].1, &tampered));

    // TestWebhook signs with the webhook's ed25519 key too.
    let t = admin
        .test_webhook(TestWebhookRequest {
            account_id: 1010,
            target: Some(test_webhook_request::Target::WebhookId(w.id.clone())),
            event_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.success, "{t:?}");
    let test_req = listener.requests().last().cloned().unwrap();
    let sigs = entries(&test_req);
    assert_eq!(sigs.len(), 1);
    assert_eq!(sigs[0].0, "v1a");
    assert!(ed25519_ok(&s.secret, &sigs[0].1, &content(&test_req)));
    // An unsaved ed25519 webhook is signed with a throwaway ed25519 key.
    let before = listener.requests().len();
    let t = admin
        .test_webhook(TestWebhookRequest {
            account_id: 1010,
            target: Some(test_webhook_request::Target::Webhook(webhook(
                "draft",
                &listener.url(),
                &[TYPE],
                signature(ED25519),
            ))),
            event_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.success, "{t:?}");
    let reqs = listener.requests();
    assert_eq!(reqs.len(), before + 1);
    let sigs = entries(&reqs[before]);
    assert_eq!(
        (sigs.len(), sigs[0].0.as_str(), sigs[0].1.len()),
        (1, "v1a", 64)
    );
    assert!(!ed25519_ok(&s.secret, &sigs[0].1, &content(&reqs[before])));

    // No read answer carries the private key.
    let list = admin
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{list:?}{read:?}").contains("whsk_"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ed25519_rotation_with_grace_signs_with_both_keys() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("ed", &listener.url(), &[TYPE], signature(ED25519)),
    )
    .await;
    let old = secret(&mut admin, &w.id).await.secret;
    let rotated = rotate(&mut admin, &w.id, 3600).await;
    assert_eq!(rotated.algorithm, "ED25519");
    assert!(rotated.secret.starts_with("whpk_") && rotated.secret != old);
    let expire = rotated
        .previous_secret_expire_time
        .as_ref()
        .unwrap()
        .seconds;
    assert!((expire - (now_secs() + 3600)).abs() <= 60, "{expire}");
    assert_eq!(secret(&mut admin, &w.id).await, rotated);

    let r = deliver(&mut ingest, &listener, "e1").await;
    let sigs = entries(&r);
    let c = content(&r);
    assert_eq!(sigs.len(), 2, "{}", r.header("webhook-signature"));
    assert!(sigs.iter().all(|(scheme, _)| scheme == "v1a"));
    // New key first, then the old one; each verifies with its own key only.
    assert!(ed25519_ok(&rotated.secret, &sigs[0].1, &c));
    assert!(!ed25519_ok(&old, &sigs[0].1, &c));
    assert!(ed25519_ok(&old, &sigs[1].1, &c));
    assert!(!ed25519_ok(&rotated.secret, &sigs[1].1, &c));

    // Without grace the old key stops at once.
    let now = rotate(&mut admin, &w.id, 0).await;
    assert!(now.previous_secret_expire_time.is_none());
    let r = deliver(&mut ingest, &listener, "e2").await;
    let sigs = entries(&r);
    assert_eq!(sigs.len(), 1, "{}", r.header("webhook-signature"));
    assert!(ed25519_ok(&now.secret, &sigs[0].1, &content(&r)));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn changing_the_algorithm_signs_with_both_for_a_day() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("mig", &listener.url(), &[TYPE], signature(HMAC_SHA256)),
    )
    .await;
    let hmac_secret = secret(&mut admin, &w.id).await;
    assert_eq!(hmac_secret.algorithm, "HMAC-SHA256");

    // HMAC → ed25519.
    let updated = set_auth(&mut admin, &w.id, signature(ED25519)).await;
    assert_eq!(algorithm_of(&updated), Some(ED25519));
    let ed = secret(&mut admin, &w.id).await;
    assert_eq!(ed.algorithm, "ED25519");
    assert!(ed.secret.starts_with("whpk_"));
    let expire = ed.previous_secret_expire_time.as_ref().unwrap().seconds;
    assert!(
        (expire - (now_secs() + 24 * 3600)).abs() <= 60,
        "the old key signs for 24 h, until {expire}"
    );
    let r = deliver(&mut ingest, &listener, "e1").await;
    let sigs = entries(&r);
    let c = content(&r);
    let schemes: Vec<&str> = sigs.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        schemes,
        vec!["v1a", "v1"],
        "{}",
        r.header("webhook-signature")
    );
    assert!(ed25519_ok(&ed.secret, &sigs[0].1, &c));
    assert!(hmac_ok(&hmac_secret.secret, &sigs[1].1, &c));

    // Setting the same algorithm again changes nothing.
    set_auth(&mut admin, &w.id, signature(ED25519)).await;
    assert_eq!(secret(&mut admin, &w.id).await, ed);

    // And back: a new HMAC secret, the ed25519 key signing for the grace period.
    let back = set_auth(&mut admin, &w.id, signature(HMAC_SHA256)).await;
    assert_eq!(algorithm_of(&back), Some(HMAC_SHA256));
    let h2 = secret(&mut admin, &w.id).await;
    assert_eq!(h2.algorithm, "HMAC-SHA256");
    assert!(h2.secret.starts_with("whsec_") && h2.secret != hmac_secret.secret);
    assert!(h2.previous_secret_expire_time.is_some());
    let r = deliver(&mut ingest, &listener, "e2").await;
    let sigs = entries(&r);
    let c = content(&r);
    let schemes: Vec<&str> = sigs.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(schemes, vec!["v1", "v1a"]);
    assert!(hmac_ok(&h2.secret, &sigs[0].1, &c));
    assert!(ed25519_ok(&ed.secret, &sigs[1].1, &c));

    // A rotation without grace ends the migration at once.
    let ended = rotate(&mut admin, &w.id, 0).await;
    let r = deliver(&mut ingest, &listener, "e3").await;
    let sigs = entries(&r);
    assert_eq!(sigs.len(), 1);
    assert_eq!(sigs[0].0, "v1");
    assert!(hmac_ok(&ended.secret, &sigs[0].1, &content(&r)));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn hmac_webhooks_created_without_an_algorithm_are_unchanged() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    // As clients from before the field existed send it: `signature: {}`.
    let w = create(
        &mut admin,
        1010,
        webhook("old", &listener.url(), &[TYPE], signature(0)),
    )
    .await;
    assert_eq!(algorithm_of(&w), Some(HMAC_SHA256));
    let s = secret(&mut admin, &w.id).await;
    assert_eq!(s.algorithm, "HMAC-SHA256");
    assert!(s.secret.starts_with("whsec_"));
    let r = deliver(&mut ingest, &listener, "e1").await;
    let sigs = entries(&r);
    assert_eq!(sigs.len(), 1);
    assert_eq!(sigs[0].0, "v1");
    assert!(hmac_ok(&s.secret, &sigs[0].1, &content(&r)));
    // `signature: {}` again is the same algorithm: no migration, same secret.
    set_auth(&mut admin, &w.id, signature(0)).await;
    assert_eq!(secret(&mut admin, &w.id).await, s);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_algorithms_are_refused_naming_the_field() {
    let (_dir, server, mut admin, _ingest) = setup().await;
    let field = "webhook.auth.signature.algorithm";
    let err = admin
        .create_webhook(CreateWebhookRequest {
            account_id: 1010,
            webhook: Some(webhook("x", "http://127.0.0.1:9/h", &[TYPE], signature(7))),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with(&format!("{field}: ")), "{err:?}");
    let w = create(
        &mut admin,
        1010,
        webhook("y", "http://127.0.0.1:9/h", &[TYPE], signature(ED25519)),
    )
    .await;
    let err = admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w.id.clone(),
                auth: Some(WebhookAuth {
                    method: Some(signature(-1)),
                }),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with(&format!("{field}: ")), "{err:?}");
    // Unchanged by the refused update.
    assert_eq!(secret(&mut admin, &w.id).await.algorithm, "ED25519");
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ console

mod console {
    use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
    use reqwest::{redirect, Client, StatusCode};

    use super::*;
    use crate::common::process::{write_router_config, RouterProcess};

    fn cookie(r: &reqwest::Response, name: &str) -> String {
        r.headers()
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.split(';').next())
            .unwrap_or_else(|| panic!("no {name} cookie"))
            .to_string()
    }

    fn hidden(html: &str, name: &str) -> String {
        let needle = format!("name=\"{name}\" value=\"");
        let i = html.find(&needle).unwrap_or_else(|| panic!("no {name}")) + needle.len();
        html[i..].split('"').next().unwrap().to_string()
    }

    /// Editing an ed25519 webhook in the console keeps it ed25519 (and its
    /// key); its download holds the public key only.
    #[tokio::test]
    async fn console_edit_keeps_ed25519_and_downloads_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_router_config(dir.path(), 2_000, "");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[console]\nlisten = \"127.0.0.1:0\"\n");
        std::fs::write(&config, text).unwrap();
        let router = RouterProcess::start(&config);
        let base = format!("http://{}", router.console_addr());
        let mut admin = router.admin().await;
        let w = create(
            &mut admin,
            1010,
            webhook("ed", "http://127.0.0.1:9/h", &[TYPE], signature(ED25519)),
        )
        .await;
        let key = secret(&mut admin, &w.id).await;

        let c = Client::builder()
            .redirect(redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let page = c.get(format!("{base}/")).send().await.unwrap();
        let signin_cookie = cookie(&page, "wr_console_signin");
        let signin = hidden(&page.text().await.unwrap(), "signin");
        let r = c
            .post(format!("{base}/sign-in"))
            .header(COOKIE, format!("wr_console_signin={signin_cookie}"))
            .form(&[
                ("signin", signin.as_str()),
                ("token", ADMIN),
                ("account_id", "1010"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let session = format!("wr_console={}", cookie(&r, "wr_console"));

        let here = format!("{base}/accounts/1010/webhooks/{}", w.id);
        let shown = c
            .get(&here)
            .header(COOKIE, &session)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(shown.contains("ed25519"), "the page names the scheme");
        let form = c
            .get(format!("{here}/edit"))
            .header(COOKIE, &session)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let checked = form
            .split("<input")
            .find(|i| i.contains("id=\"f-auth-ed25519\""))
            .expect("an ed25519 choice");
        assert!(checked.contains(" checked"), "{checked}");
        let csrf = hidden(&form, "csrf");
        // Save as the browser sends the form, with a new name.
        let r = c
            .post(format!("{here}/edit"))
            .header(COOKIE, &session)
            .header(ORIGIN, &base)
            .form(&[
                ("csrf", csrf.as_str()),
                ("name", "ed renamed"),
                ("description", ""),
                ("target_url", "http://127.0.0.1:9/h"),
                ("auth", "ed25519"),
                ("username", ""),
                ("password", ""),
                ("event_types", TYPE),
                ("active", "on"),
                ("action", "save"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{:?}", r.text().await);
        let after = admin
            .get_webhook(GetWebhookRequest {
                account_id: 1010,
                webhook_id: w.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .webhook
            .unwrap();
        assert_eq!(after.name, "ed renamed", "the save went through");
        assert_eq!(algorithm_of(&after), Some(ED25519));
        assert_eq!(secret(&mut admin, &w.id).await, key, "no migration");

        let download = c
            .post(format!("{here}/signature"))
            .header(COOKIE, &session)
            .header(ORIGIN, &base)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(download.status(), StatusCode::OK);
        let body = download.text().await.unwrap();
        assert!(!body.contains("whsk_"), "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["secret"], key.secret.as_str());
        assert_eq!(json["algorithm"], "ED25519");
        assert!(key.secret.starts_with("whpk_"));
    }
}
