//! WebhookAdmin end to end: every RPC of the public contract through a real
//! router on 127.0.0.1:0 with a real sled folder.

use std::fmt::Debug;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use base64::Engine;
use prost::Message;
use prost_types::FieldMask;
use tonic::{Code, Response, Status};
use tonic_types::StatusExt;
use webhook_router::config::{Config, EventTypeConfig, ModeConfig};

/// A loopback target; nothing is published to it, so nothing connects.
const URL: &str = "http://127.0.0.1:9/hook";
const URL2: &str = "http://127.0.0.1:9/other";
/// Well formed, never created.
const MISSING_ID: &str = "wh_0000000000000000000000000000";

const REALTIME: [&str; 16] = [
    "CI_STATS",
    "COURSE_ENROLLMENT",
    "LEARNING_PATH_ENROLLMENT",
    "CERTIFICATION_ENROLLMENT",
    "COURSE_COMPLETED",
    "LEARNING_PATH_COMPLETED",
    "CERTIFICATION_COMPLETED",
    "COURSE_UNENROLLMENT",
    "LEARNING_PATH_UNENROLLMENT",
    "CERTIFICATION_UNENROLLMENT",
    "LEARNING_OBJECT_DRAFT",
    "LEARNING_OBJECT_MODIFICATION",
    "LEARNING_OBJECT_DELETION",
    "LEARNING_OBJECT_INSTANCE_MODIFICATION",
    "LEARNING_OBJECT_INSTANCE_DELETION",
    "LEARNING_PATH_COMPLETION_ROLLBACK",
];

const BATCH: [&str; 13] = [
    "COURSE_ENROLLMENT_BATCH",
    "LEARNING_PATH_ENROLLMENT_BATCH",
    "CERTIFICATION_ENROLLMENT_BATCH",
    "COURSE_COMPLETED_BATCH",
    "LEARNING_PATH_COMPLETED_BATCH",
    "CERTIFICATION_COMPLETED_BATCH",
    "COURSE_UNENROLLMENT_BATCH",
    "LEARNING_PATH_UNENROLLMENT_BATCH",
    "CERTIFICATION_UNENROLLMENT_BATCH",
    "LEARNING_OBJECT_MODIFICATION_BATCH",
    "LEARNING_OBJECT_INSTANCE_MODIFICATION_BATCH",
    "LEARNING_PATH_COMPLETION_ROLLBACK_BATCH",
    "LEARNER_PROGRESS",
];

// ------------------------------------------------------------------ helpers

type Reply<T> = Result<Response<T>, Status>;

async fn start_with(config: Config) -> TestServer {
    TestServer::start(config).await
}

async fn start() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(test_config(dir.path())).await;
    (dir, server)
}

fn basic_auth(username: &str, password: &str) -> webhook_auth::Method {
    webhook_auth::Method::Basic(BasicAuth {
        username: username.into(),
        password: password.into(),
    })
}

fn hook(name: &str) -> Webhook {
    webhook(name, URL, &["COURSE_ENROLLMENT"], no_auth())
}

fn auth_method(w: &Webhook) -> webhook_auth::Method {
    w.auth
        .clone()
        .and_then(|a| a.method)
        .expect("responses always carry the auth method")
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn millis(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// The status of a call that must fail with `code`.
#[track_caller]
fn expect_code<T: Debug>(reply: Reply<T>, code: Code) -> Status {
    match reply {
        Ok(r) => panic!("expected {code:?}, got OK: {:?}", r.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

/// The call failed with INVALID_ARGUMENT naming `field` (message and details).
#[track_caller]
fn expect_invalid<T: Debug>(reply: Reply<T>, field: &str) -> Status {
    let s = expect_code(reply, Code::InvalidArgument);
    assert!(
        s.message().starts_with(&format!("{field}: ")),
        "message {:?} should name the field {field:?}",
        s.message()
    );
    let details = s.get_details_bad_request().expect("BadRequest details");
    assert_eq!(details.field_violations[0].field, field);
    s
}

async fn try_create(a: &mut Admin, account_id: u64, w: Webhook) -> Reply<CreateWebhookResponse> {
    a.create_webhook(CreateWebhookRequest {
        account_id,
        webhook: Some(w),
    })
    .await
}

async fn get(a: &mut Admin, account_id: u64, id: &str) -> Reply<GetWebhookResponse> {
    a.get_webhook(GetWebhookRequest {
        account_id,
        webhook_id: id.into(),
    })
    .await
}

async fn fetch(a: &mut Admin, account_id: u64, id: &str) -> Webhook {
    get(a, account_id, id)
        .await
        .expect("get webhook")
        .into_inner()
        .webhook
        .unwrap()
}

async fn list(
    a: &mut Admin,
    account_id: u64,
    page_size: i32,
    page_token: &str,
) -> Reply<ListWebhooksResponse> {
    a.list_webhooks(ListWebhooksRequest {
        account_id,
        page_size,
        page_token: page_token.into(),
    })
    .await
}

async fn list_all(a: &mut Admin, account_id: u64) -> Vec<Webhook> {
    let r = list(a, account_id, 0, "").await.expect("list").into_inner();
    assert!(r.next_page_token.is_empty());
    r.webhooks
}

async fn update(
    a: &mut Admin,
    account_id: u64,
    w: Webhook,
    paths: Option<&[&str]>,
) -> Reply<UpdateWebhookResponse> {
    a.update_webhook(UpdateWebhookRequest {
        account_id,
        webhook: Some(w),
        update_mask: paths.map(|p| FieldMask {
            paths: p.iter().map(|s| s.to_string()).collect(),
        }),
    })
    .await
}

async fn delete(a: &mut Admin, account_id: u64, id: &str) -> Reply<DeleteWebhookResponse> {
    a.delete_webhook(DeleteWebhookRequest {
        account_id,
        webhook_id: id.into(),
    })
    .await
}

async fn retire(a: &mut Admin, account_id: u64, id: &str) -> Reply<RetireWebhookResponse> {
    a.retire_webhook(RetireWebhookRequest {
        account_id,
        webhook_id: id.into(),
    })
    .await
}

async fn activate(a: &mut Admin, account_id: u64, id: &str) -> Reply<ActivateWebhookResponse> {
    a.activate_webhook(ActivateWebhookRequest {
        account_id,
        webhook_id: id.into(),
    })
    .await
}

async fn secret(a: &mut Admin, account_id: u64, id: &str) -> Reply<GetWebhookSecretResponse> {
    a.get_webhook_secret(GetWebhookSecretRequest {
        account_id,
        webhook_id: id.into(),
    })
    .await
}

async fn event_types(
    a: &mut Admin,
    page_size: i32,
    page_token: &str,
) -> Reply<ListEventTypesResponse> {
    a.list_event_types(ListEventTypesRequest {
        page_size,
        page_token: page_token.into(),
    })
    .await
}

fn page_token(raw: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

// ------------------------------------------------------------------ CRUD

#[tokio::test]
async fn create_get_and_list_round_trip() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let mut w = webhook(
        "crm",
        URL,
        &["COURSE_ENROLLMENT", "LEARNER_PROGRESS"],
        basic_auth("svc", "pw-1"),
    );
    w.description = "CRM sync".into();
    let created = create(&mut a, 1010, w).await;

    assert!(
        created.id.starts_with("wh_") && created.id.len() > 3,
        "{}",
        created.id
    );
    assert_eq!(created.account_id, 1010);
    assert_eq!(created.name, "crm");
    assert_eq!(created.description, "CRM sync");
    assert_eq!(created.target_url, URL);
    assert_eq!(
        created.event_types,
        ["COURSE_ENROLLMENT", "LEARNER_PROGRESS"]
    );
    assert!(created.active, "new webhooks start active");
    assert!(created.disabled_reason.is_empty());
    assert_eq!(
        auth_method(&created),
        basic_auth("svc", ""),
        "username echoed, password withheld"
    );
    let created_s = created.create_time.as_ref().unwrap().seconds;
    assert!((now_secs() - created_s).abs() < 60, "create_time is now");
    assert_eq!(created.update_time, created.create_time);

    assert_eq!(fetch(&mut a, 1010, &created.id).await, created);
    assert_eq!(list_all(&mut a, 1010).await, vec![created.clone()]);
    assert!(
        list_all(&mut a, 1011).await.is_empty(),
        "other accounts see nothing"
    );

    // A second webhook gets its own id and lists after the first.
    let second = create(&mut a, 1010, hook("second")).await;
    assert_ne!(second.id, created.id);
    assert_eq!(list_all(&mut a, 1010).await, vec![created, second]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn create_ignores_output_only_fields_and_removes_duplicate_event_types() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let mut w = webhook(
        "x",
        URL,
        &["COURSE_ENROLLMENT", "LEARNER_PROGRESS", "COURSE_ENROLLMENT"],
        no_auth(),
    );
    w.id = "wh_chosen_by_the_client".into();
    w.account_id = 999;
    w.active = false;
    w.disabled_reason = "made up".into();
    w.create_time = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    let created = create(&mut a, 1010, w).await;
    assert_ne!(created.id, "wh_chosen_by_the_client");
    assert!(created.id.starts_with("wh_"));
    assert_eq!(
        created.account_id, 1010,
        "the request's account_id is authoritative"
    );
    assert!(created.active);
    assert!(created.disabled_reason.is_empty());
    assert!((now_secs() - created.create_time.as_ref().unwrap().seconds).abs() < 60);
    assert_eq!(
        created.event_types,
        ["COURSE_ENROLLMENT", "LEARNER_PROGRESS"]
    );
    expect_code(get(&mut a, 999, &created.id).await, Code::NotFound);

    // No auth at all is `none`.
    let mut bare = hook("bare");
    bare.auth = None;
    let bare = create(&mut a, 1010, bare).await;
    assert_eq!(auth_method(&bare), no_auth());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn update_with_an_explicit_mask_changes_only_the_named_fields() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let mut w = hook("before");
    w.description = "first".into();
    let created = create(&mut a, 1010, w).await;
    tokio::time::sleep(Duration::from_millis(5)).await;

    let change = Webhook {
        id: created.id.clone(),
        name: "after".into(),
        description: "not in the mask".into(),
        target_url: URL2.into(),
        event_types: vec!["LEARNER_PROGRESS".into()],
        auth: Some(WebhookAuth {
            method: Some(signature_auth()),
        }),
        ..Default::default()
    };
    let updated = update(&mut a, 1010, change.clone(), Some(&["name", "event_types"]))
        .await
        .expect("update")
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.name, "after");
    assert_eq!(updated.event_types, ["LEARNER_PROGRESS"]);
    assert_eq!(updated.description, "first", "not in the mask: unchanged");
    assert_eq!(updated.target_url, URL);
    assert_eq!(auth_method(&updated), no_auth());
    assert_eq!(updated.create_time, created.create_time);
    assert!(millis(&updated.update_time) > millis(&created.update_time));
    assert!(updated.active);
    assert_eq!(fetch(&mut a, 1010, &created.id).await, updated, "stored");

    // An explicit mask can clear a field; `webhook.`-prefixed paths work too.
    let clear = Webhook {
        id: created.id.clone(),
        target_url: URL2.into(),
        ..Default::default()
    };
    let updated = update(
        &mut a,
        1010,
        clear,
        Some(&["description", "webhook.target_url"]),
    )
    .await
    .expect("update")
    .into_inner()
    .webhook
    .unwrap();
    assert_eq!(updated.description, "");
    assert_eq!(updated.target_url, URL2);
    assert_eq!(updated.name, "after");

    // Switching to signature auth creates a secret.
    expect_code(
        secret(&mut a, 1010, &created.id).await,
        Code::FailedPrecondition,
    );
    let updated = update(&mut a, 1010, change, Some(&["auth"]))
        .await
        .expect("update")
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(auth_method(&updated), signature_auth());
    assert_eq!(updated.name, "after");
    let s = secret(&mut a, 1010, &created.id)
        .await
        .expect("secret")
        .into_inner();
    assert!(s.secret.unwrap().secret.starts_with("whsec_"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn update_with_an_empty_mask_applies_every_set_field() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let mut w = webhook(
        "before",
        URL,
        &["COURSE_ENROLLMENT"],
        basic_auth("svc", "pw"),
    );
    w.description = "keep me".into();
    let created = create(&mut a, 1010, w).await;

    // No mask at all: name and target_url are set, the rest is kept.
    let change = Webhook {
        id: created.id.clone(),
        name: "renamed".into(),
        target_url: URL2.into(),
        ..Default::default()
    };
    let updated = update(&mut a, 1010, change, None)
        .await
        .expect("update")
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.target_url, URL2);
    assert_eq!(updated.description, "keep me");
    assert_eq!(updated.event_types, ["COURSE_ENROLLMENT"]);
    assert_eq!(auth_method(&updated), basic_auth("svc", ""));

    // A present but empty mask means the same.
    let change = Webhook {
        id: created.id.clone(),
        event_types: vec!["CI_STATS".into(), "LEARNER_PROGRESS".into()],
        auth: Some(WebhookAuth {
            method: Some(no_auth()),
        }),
        ..Default::default()
    };
    let updated = update(&mut a, 1010, change, Some(&[]))
        .await
        .expect("update")
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(updated.event_types, ["CI_STATS", "LEARNER_PROGRESS"]);
    assert_eq!(auth_method(&updated), no_auth());
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.description, "keep me");
    assert_eq!(fetch(&mut a, 1010, &created.id).await, updated);

    // Nothing set and no mask: nothing to update.
    let nothing = Webhook {
        id: created.id.clone(),
        ..Default::default()
    };
    expect_invalid(update(&mut a, 1010, nothing, None).await, "webhook");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn update_rejects_bad_masks_and_bad_values_without_changing_anything() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let created = create(&mut a, 1010, hook("original")).await;
    let with = |f: &dyn Fn(&mut Webhook)| {
        let mut w = Webhook {
            id: created.id.clone(),
            name: "changed".into(),
            ..Default::default()
        };
        f(&mut w);
        w
    };

    let s = expect_invalid(
        update(&mut a, 1010, with(&|_| {}), Some(&["colour"])).await,
        "update_mask.paths[0]",
    );
    assert!(s.message().contains("colour"), "{}", s.message());
    // The valid first path must not be applied when a later one is refused.
    expect_invalid(
        update(&mut a, 1010, with(&|_| {}), Some(&["name", "active"])).await,
        "update_mask.paths[1]",
    );
    expect_invalid(
        update(&mut a, 1010, with(&|_| {}), Some(&["id"])).await,
        "update_mask.paths[0]",
    );
    expect_invalid(
        update(&mut a, 1010, with(&|w| w.name.clear()), Some(&["name"])).await,
        "webhook.name",
    );
    expect_invalid(
        update(
            &mut a,
            1010,
            with(&|w| w.target_url = "not a url".into()),
            Some(&["name", "target_url"]),
        )
        .await,
        "webhook.target_url",
    );
    expect_invalid(
        update(&mut a, 1010, with(&|_| {}), Some(&["event_types"])).await,
        "webhook.event_types",
    );
    expect_invalid(
        update(
            &mut a,
            1010,
            with(&|w| w.event_types = vec!["CI_STATS".into(), "NOPE".into()]),
            None,
        )
        .await,
        "webhook.event_types[1]",
    );
    expect_invalid(
        update(
            &mut a,
            1010,
            with(&|w| {
                w.auth = Some(WebhookAuth {
                    method: Some(basic_auth("", "pw")),
                })
            }),
            None,
        )
        .await,
        "webhook.auth.basic.username",
    );
    assert_eq!(
        fetch(&mut a, 1010, &created.id).await,
        created,
        "nothing changed"
    );

    // Which webhook.
    expect_invalid(
        a.update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: None,
            update_mask: None,
        })
        .await,
        "webhook",
    );
    expect_invalid(
        update(&mut a, 1010, with(&|w| w.id.clear()), None).await,
        "webhook.id",
    );
    expect_invalid(
        update(&mut a, 1010, with(&|w| w.id = "nope".into()), None).await,
        "webhook.id",
    );
    expect_code(
        update(&mut a, 1010, with(&|w| w.id = MISSING_ID.into()), None).await,
        Code::NotFound,
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn update_with_an_empty_basic_password_keeps_the_stored_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(test_config(dir.path())).await;
    let listener = Listener::ok().await;
    let mut a = server.admin(ADMIN).await;
    let created = create(
        &mut a,
        1010,
        webhook(
            "crm",
            &listener.url(),
            &["COURSE_ENROLLMENT"],
            basic_auth("svc", "s3cret"),
        ),
    )
    .await;
    // A client echoes what it read (password empty) back with a new name.
    let mut echoed = created.clone();
    echoed.name = "renamed".into();
    update(&mut a, 1010, echoed, Some(&["name", "auth"]))
        .await
        .expect("update");

    let mut ingest = server.ingest(INGEST).await;
    publish(
        &mut ingest,
        1010,
        vec![event("ev-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert!(!reqs.is_empty(), "delivered");
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("svc:s3cret")
    );
    assert_eq!(reqs[0].header("authorization"), expected);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn delete_removes_the_webhook_and_its_secret() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let keep = create(&mut a, 1010, hook("keep")).await;
    let gone = create(
        &mut a,
        1010,
        webhook("gone", URL, &["CI_STATS"], signature_auth()),
    )
    .await;
    secret(&mut a, 1010, &gone.id).await.expect("has a secret");

    let r = delete(&mut a, 1010, &gone.id)
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(r, DeleteWebhookResponse {});
    expect_code(get(&mut a, 1010, &gone.id).await, Code::NotFound);
    expect_code(secret(&mut a, 1010, &gone.id).await, Code::NotFound);
    expect_code(retire(&mut a, 1010, &gone.id).await, Code::NotFound);
    expect_code(activate(&mut a, 1010, &gone.id).await, Code::NotFound);
    expect_code(
        update(&mut a, 1010, gone.clone(), Some(&["name"])).await,
        Code::NotFound,
    );
    expect_code(delete(&mut a, 1010, &gone.id).await, Code::NotFound);
    assert_eq!(list_all(&mut a, 1010).await, vec![keep.clone()]);

    expect_invalid(delete(&mut a, 1010, "").await, "webhook_id");
    expect_invalid(delete(&mut a, 1010, "wh_nope").await, "webhook_id");
    expect_code(delete(&mut a, 1010, MISSING_ID).await, Code::NotFound);
    assert_eq!(fetch(&mut a, 1010, &keep.id).await, keep);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retire_and_activate_toggle_active() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let created = create(&mut a, 1010, hook("toggle")).await;

    let retired = retire(&mut a, 1010, &created.id)
        .await
        .expect("retire")
        .into_inner()
        .webhook
        .unwrap();
    assert!(!retired.active);
    assert!(retired.disabled_reason.is_empty(), "retired by an operator");
    assert_eq!(
        Webhook {
            active: true,
            update_time: created.update_time,
            ..retired.clone()
        },
        created,
        "only active (and update_time) change"
    );
    assert!(millis(&retired.update_time) >= millis(&created.update_time));
    assert_eq!(fetch(&mut a, 1010, &created.id).await, retired);
    assert!(!list_all(&mut a, 1010).await[0].active);

    // Retiring twice is harmless.
    let again = retire(&mut a, 1010, &created.id)
        .await
        .expect("retire")
        .into_inner();
    assert!(!again.webhook.unwrap().active);

    let activated = activate(&mut a, 1010, &created.id)
        .await
        .expect("activate")
        .into_inner()
        .webhook
        .unwrap();
    assert!(activated.active);
    assert_eq!(activated.name, created.name);
    assert_eq!(fetch(&mut a, 1010, &created.id).await, activated);
    assert!(list_all(&mut a, 1010).await[0].active);

    expect_invalid(retire(&mut a, 1010, "bad").await, "webhook_id");
    expect_invalid(activate(&mut a, 1010, "").await, "webhook_id");
    expect_code(retire(&mut a, 1010, MISSING_ID).await, Code::NotFound);
    expect_code(activate(&mut a, 1010, MISSING_ID).await, Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn get_webhook_secret_returns_a_standard_webhooks_secret() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let signed = create(
        &mut a,
        1010,
        webhook("signed", URL, &["CI_STATS"], signature_auth()),
    )
    .await;
    assert_eq!(auth_method(&signed), signature_auth());
    let other = create(
        &mut a,
        1010,
        webhook("other", URL, &["CI_STATS"], signature_auth()),
    )
    .await;
    let plain = create(&mut a, 1010, hook("plain")).await;
    let basic = create(
        &mut a,
        1010,
        webhook("basic", URL, &["CI_STATS"], basic_auth("u", "p")),
    )
    .await;

    let s = secret(&mut a, 1010, &signed.id)
        .await
        .expect("secret")
        .into_inner()
        .secret
        .unwrap();
    assert_eq!(s.webhook_id, signed.id);
    let key = s.secret.strip_prefix("whsec_").expect("whsec_ prefix");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("base64 after the prefix");
    assert_eq!(raw.len(), 32, "32 random bytes");
    assert_eq!(s.algorithm, "HMAC-SHA256");
    assert_eq!(s.signature_header, "webhook-signature");
    assert_eq!(s.id_header, "webhook-id");
    assert_eq!(s.timestamp_header, "webhook-timestamp");
    assert!((now_secs() - s.create_time.as_ref().unwrap().seconds).abs() < 60);
    assert!(
        s.previous_secret_expire_time.is_none(),
        "no rotation happened"
    );

    // Stable across reads and across unrelated updates; unique per webhook.
    let again = secret(&mut a, 1010, &signed.id).await.unwrap().into_inner();
    assert_eq!(again.secret.as_ref(), Some(&s));
    let mut renamed = signed.clone();
    renamed.name = "renamed".into();
    update(&mut a, 1010, renamed, None).await.expect("update");
    let after = secret(&mut a, 1010, &signed.id).await.unwrap().into_inner();
    assert_eq!(after.secret.as_ref(), Some(&s));
    let other_s = secret(&mut a, 1010, &other.id).await.unwrap().into_inner();
    assert_ne!(other_s.secret.unwrap().secret, s.secret);

    // Only for signature auth.
    expect_code(
        secret(&mut a, 1010, &plain.id).await,
        Code::FailedPrecondition,
    );
    expect_code(
        secret(&mut a, 1010, &basic.id).await,
        Code::FailedPrecondition,
    );
    expect_code(secret(&mut a, 1010, MISSING_ID).await, Code::NotFound);
    expect_invalid(secret(&mut a, 1010, "whsec_x").await, "webhook_id");
    expect_invalid(secret(&mut a, 0, &signed.id).await, "account_id");
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ catalog

#[tokio::test]
async fn list_event_types_returns_the_built_in_catalog() {
    let (_dir, server) = start().await;
    // Any admin token may read the catalog, account-scoped or not.
    let mut a = server.admin(ADMIN_1010).await;
    let r = event_types(&mut a, 0, "").await.expect("list").into_inner();
    assert!(r.next_page_token.is_empty());
    assert_eq!(r.event_types.len(), 29);
    let mut names: Vec<&str> = r.event_types.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 29, "no duplicates");
    for e in &r.event_types {
        let expected = if REALTIME.contains(&e.name.as_str()) {
            DeliveryMode::Realtime
        } else if BATCH.contains(&e.name.as_str()) {
            DeliveryMode::Batch
        } else {
            panic!("unexpected event type {}", e.name)
        };
        assert_eq!(e.delivery_mode, expected as i32, "{}", e.name);
        assert!(!e.description.is_empty(), "{} has a description", e.name);
    }

    // Paged: 10 + 10 + 9, the same entries in the same order.
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let p = event_types(&mut a, 10, &token)
            .await
            .expect("page")
            .into_inner();
        assert!(p.event_types.len() <= 10);
        paged.extend(p.event_types);
        pages += 1;
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, r.event_types);

    expect_invalid(event_types(&mut a, 0, "garbage!").await, "page_token");
    expect_invalid(
        event_types(&mut a, 0, &page_token("et:999")).await,
        "page_token",
    );
    expect_invalid(event_types(&mut a, -1, "").await, "page_size");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn list_event_types_includes_types_added_in_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.event_types = vec![
        EventTypeConfig {
            name: "BADGE_AWARDED".into(),
            mode: ModeConfig::Batch,
            description: "A badge was awarded.".into(),
        },
        EventTypeConfig {
            name: "FORUM_POST".into(),
            mode: ModeConfig::Realtime,
            description: String::new(),
        },
    ];
    let server = start_with(config).await;
    let mut a = server.admin(ADMIN).await;
    let r = event_types(&mut a, 0, "").await.expect("list").into_inner();
    assert_eq!(r.event_types.len(), 31);
    assert_eq!(
        r.event_types[29],
        EventType {
            name: "BADGE_AWARDED".into(),
            delivery_mode: DeliveryMode::Batch as i32,
            description: "A badge was awarded.".into(),
        }
    );
    assert_eq!(r.event_types[30].name, "FORUM_POST");
    assert_eq!(
        r.event_types[30].delivery_mode,
        DeliveryMode::Realtime as i32
    );
    assert!(r.event_types[..29]
        .iter()
        .all(|e| REALTIME.contains(&e.name.as_str()) || BATCH.contains(&e.name.as_str())));

    // Webhooks may subscribe to them.
    let w = create(
        &mut a,
        1010,
        webhook("badges", URL, &["BADGE_AWARDED", "FORUM_POST"], no_auth()),
    )
    .await;
    assert_eq!(w.event_types, ["BADGE_AWARDED", "FORUM_POST"]);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ validation

#[tokio::test]
async fn validation_errors_are_invalid_argument_naming_the_field() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let with = |f: &dyn Fn(&mut Webhook)| {
        let mut w = hook("valid");
        f(&mut w);
        w
    };

    // CreateWebhook.
    for (w, field) in [
        (with(&|w| w.name.clear()), "webhook.name"),
        (with(&|w| w.name = "   ".into()), "webhook.name"),
        (with(&|w| w.name = "n".repeat(129)), "webhook.name"),
        (
            with(&|w| w.description = "d".repeat(1025)),
            "webhook.description",
        ),
        (with(&|w| w.target_url.clear()), "webhook.target_url"),
        (
            with(&|w| w.target_url = "not a url".into()),
            "webhook.target_url",
        ),
        (
            with(&|w| w.target_url = "/relative/hook".into()),
            "webhook.target_url",
        ),
        (
            with(&|w| w.target_url = "ftp://127.0.0.1/hook".into()),
            "webhook.target_url",
        ),
        (
            with(&|w| w.target_url = "https://".into()),
            "webhook.target_url",
        ),
        (with(&|w| w.event_types.clear()), "webhook.event_types"),
        (
            with(&|w| w.event_types = vec!["COURSE_ENROLLMENT".into(), "NOT_AN_EVENT".into()]),
            "webhook.event_types[1]",
        ),
        (
            with(&|w| w.event_types = vec!["course_enrollment".into()]),
            "webhook.event_types[0]",
        ),
        (
            with(&|w| {
                w.auth = Some(WebhookAuth {
                    method: Some(basic_auth("", "pw")),
                })
            }),
            "webhook.auth.basic.username",
        ),
        (
            with(&|w| {
                w.auth = Some(WebhookAuth {
                    method: Some(basic_auth("a:b", "pw")),
                })
            }),
            "webhook.auth.basic.username",
        ),
        (
            with(&|w| {
                w.auth = Some(WebhookAuth {
                    method: Some(basic_auth("svc", "")),
                })
            }),
            "webhook.auth.basic.password",
        ),
    ] {
        expect_invalid(try_create(&mut a, 1010, w).await, field);
    }
    let s = expect_invalid(
        try_create(
            &mut a,
            1010,
            with(&|w| w.event_types = vec!["NOT_AN_EVENT".into()]),
        )
        .await,
        "webhook.event_types[0]",
    );
    assert!(s.message().contains("NOT_AN_EVENT"), "{}", s.message());
    assert!(!s.message().contains("did you mean"), "{}", s.message());
    // A near miss gets the catalog name it was probably meant as.
    for (typo, meant) in [
        ("course_enrollment", "COURSE_ENROLLMENT"),
        ("COURSE_ENROLMENT", "COURSE_ENROLLMENT"),
    ] {
        let s = expect_invalid(
            try_create(&mut a, 1010, with(&|w| w.event_types = vec![typo.into()])).await,
            "webhook.event_types[0]",
        );
        assert!(
            s.message().contains(&format!("did you mean {meant}?")),
            "{}",
            s.message()
        );
    }
    expect_invalid(
        a.create_webhook(CreateWebhookRequest {
            account_id: 1010,
            webhook: None,
        })
        .await,
        "webhook",
    );
    expect_invalid(
        try_create(&mut a, 0, hook("no account")).await,
        "account_id",
    );
    assert!(
        list_all(&mut a, 1010).await.is_empty(),
        "nothing was stored"
    );

    // The limits themselves are inclusive (counted in characters).
    let longest = create(&mut a, 1010, with(&|w| w.name = "é".repeat(128))).await;
    assert_eq!(longest.name.chars().count(), 128);
    let described = create(&mut a, 1010, with(&|w| w.description = "ü".repeat(1024))).await;
    assert_eq!(described.description.chars().count(), 1024);

    // Reads and actions by id.
    expect_invalid(get(&mut a, 1010, "").await, "webhook_id");
    expect_invalid(get(&mut a, 1010, "nope").await, "webhook_id");
    expect_invalid(get(&mut a, 1010, "wh_XYZ").await, "webhook_id");
    expect_invalid(get(&mut a, 0, &longest.id).await, "account_id");
    let s = expect_code(get(&mut a, 1010, MISSING_ID).await, Code::NotFound);
    assert!(s.message().contains(MISSING_ID), "{}", s.message());
    expect_invalid(retire(&mut a, 1010, "x").await, "webhook_id");
    expect_invalid(activate(&mut a, 1010, "x").await, "webhook_id");
    expect_invalid(delete(&mut a, 1010, "x").await, "webhook_id");
    expect_invalid(secret(&mut a, 1010, "x").await, "webhook_id");

    // ListWebhooks.
    expect_invalid(list(&mut a, 1010, 0, "garbage!!").await, "page_token");
    let et_token = event_types(&mut a, 5, "")
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!et_token.is_empty());
    expect_invalid(list(&mut a, 1010, 0, &et_token).await, "page_token");
    expect_invalid(
        list(&mut a, 1010, 0, &page_token("wh:")).await,
        "page_token",
    );
    expect_invalid(
        list(&mut a, 1010, 0, &page_token("wh:../../etc")).await,
        "page_token",
    );
    expect_invalid(list(&mut a, 1010, -1, "").await, "page_size");
    expect_invalid(list(&mut a, 0, 0, "").await, "account_id");
    assert_eq!(list_all(&mut a, 1010).await, vec![longest, described]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn private_and_plain_http_targets_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.delivery.allow_private_targets = false;
    let server = start_with(config).await;
    let mut a = server.admin(ADMIN).await;
    for url in [
        "http://hooks.example.com/hook",
        "http://127.0.0.1:8080/hook",
        "https://127.0.0.1/hook",
        "https://127.1.2.3/hook",
        "https://localhost/hook",
        "https://api.localhost/hook",
        "https://10.1.2.3/hook",
        "https://172.16.5.4/hook",
        "https://192.168.0.10/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/hook",
        "https://0.0.0.0/hook",
        "https://[::1]/hook",
        "https://[fd00::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
    ] {
        let s = expect_invalid(
            try_create(&mut a, 1010, webhook("x", url, &["CI_STATS"], no_auth())).await,
            "webhook.target_url",
        );
        assert!(!s.message().is_empty(), "{url}");
    }
    assert!(list_all(&mut a, 1010).await.is_empty());

    // Public https destinations are fine (nothing is published, so nothing connects).
    let public = create(
        &mut a,
        1010,
        webhook(
            "public",
            "https://hooks.example.com/hook",
            &["CI_STATS"],
            no_auth(),
        ),
    )
    .await;
    create(
        &mut a,
        1010,
        webhook(
            "by-ip",
            "https://93.184.215.14/hook",
            &["CI_STATS"],
            no_auth(),
        ),
    )
    .await;
    // ...and UpdateWebhook applies the same rule.
    let mut moved = public.clone();
    moved.target_url = "https://127.0.0.1/hook".into();
    expect_invalid(
        update(&mut a, 1010, moved, Some(&["target_url"])).await,
        "webhook.target_url",
    );
    assert_eq!(fetch(&mut a, 1010, &public.id).await, public);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ limits

#[tokio::test]
async fn the_sixth_webhook_of_an_account_is_refused() {
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&mut a, 1010, hook(&format!("hook-{i}"))).await.id);
    }
    let s = expect_code(
        try_create(&mut a, 1010, hook("sixth")).await,
        Code::ResourceExhausted,
    );
    // The message names the setting and its value.
    assert!(
        s.message().contains("limits.max_webhooks_per_account = 5"),
        "{s:?}"
    );
    assert_eq!(list_all(&mut a, 1010).await.len(), 5);

    // Retired webhooks still count.
    retire(&mut a, 1010, &ids[0]).await.expect("retire");
    expect_code(
        try_create(&mut a, 1010, hook("sixth")).await,
        Code::ResourceExhausted,
    );

    // Other accounts have their own allowance.
    for i in 0..5 {
        create(&mut a, 1011, hook(&format!("other-{i}"))).await;
    }
    expect_code(
        try_create(&mut a, 1011, hook("sixth")).await,
        Code::ResourceExhausted,
    );

    // Deleting one frees a slot.
    delete(&mut a, 1010, &ids[1]).await.expect("delete");
    create(&mut a, 1010, hook("replacement")).await;
    expect_code(
        try_create(&mut a, 1010, hook("seventh")).await,
        Code::ResourceExhausted,
    );
    assert_eq!(list_all(&mut a, 1010).await.len(), 5);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_creates_never_exceed_the_limit() {
    let (_dir, server) = start().await;
    let a = server.admin(ADMIN).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let mut a = a.clone();
            tokio::spawn(async move { try_create(&mut a, 1012, hook(&format!("race-{i}"))).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(ok, 5);
    let mut a = a;
    assert_eq!(list_all(&mut a, 1012).await.len(), 5);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ accounts

#[tokio::test]
async fn an_account_token_cannot_see_or_touch_another_accounts_webhooks() {
    let (_dir, server) = start().await;
    let mut a10 = server.admin(ADMIN_1010).await;
    let mut a11 = server.admin(ADMIN_1011).await;
    let mut all = server.admin(ADMIN).await;
    let mine = create(&mut a10, 1010, hook("mine")).await;
    let theirs = create(
        &mut a11,
        1011,
        webhook("theirs", URL, &["CI_STATS"], signature_auth()),
    )
    .await;
    let theirs_secret = secret(&mut a11, 1011, &theirs.id)
        .await
        .unwrap()
        .into_inner();

    // Naming the other account: PERMISSION_DENIED, for every call.
    let id = theirs.id.as_str();
    let denied = Code::PermissionDenied;
    expect_code(get(&mut a10, 1011, id).await, denied);
    expect_code(list(&mut a10, 1011, 0, "").await, denied);
    expect_code(update(&mut a10, 1011, hook("x"), None).await, denied);
    let mut renamed = theirs.clone();
    renamed.name = "hijacked".into();
    expect_code(
        update(&mut a10, 1011, renamed.clone(), Some(&["name"])).await,
        denied,
    );
    expect_code(delete(&mut a10, 1011, id).await, denied);
    expect_code(retire(&mut a10, 1011, id).await, denied);
    expect_code(activate(&mut a10, 1011, id).await, denied);
    expect_code(secret(&mut a10, 1011, id).await, denied);
    expect_code(try_create(&mut a10, 1011, hook("intruder")).await, denied);
    // Even for ids that do not exist (no probing).
    expect_code(get(&mut a10, 1011, MISSING_ID).await, denied);
    // And the other way round.
    expect_code(get(&mut a11, 1010, &mine.id).await, denied);
    expect_code(list(&mut a11, 1010, 0, "").await, denied);

    // Naming its own account with the other's webhook id: NOT_FOUND.
    expect_code(get(&mut a10, 1010, id).await, Code::NotFound);
    expect_code(
        update(&mut a10, 1010, renamed.clone(), Some(&["name"])).await,
        Code::NotFound,
    );
    expect_code(retire(&mut a10, 1010, id).await, Code::NotFound);
    expect_code(activate(&mut a10, 1010, id).await, Code::NotFound);
    expect_code(secret(&mut a10, 1010, id).await, Code::NotFound);
    expect_code(delete(&mut a10, 1010, id).await, Code::NotFound);
    assert_eq!(list_all(&mut a10, 1010).await, vec![mine.clone()]);

    // The all-accounts token: the webhook is not in account 1010 either.
    expect_code(get(&mut all, 1010, id).await, Code::NotFound);
    expect_code(
        update(&mut all, 1010, renamed, Some(&["name"])).await,
        Code::NotFound,
    );
    expect_code(retire(&mut all, 1010, id).await, Code::NotFound);
    expect_code(delete(&mut all, 1010, id).await, Code::NotFound);
    assert_eq!(list_all(&mut all, 1010).await, vec![mine.clone()]);
    assert_eq!(list_all(&mut all, 1011).await, vec![theirs.clone()]);

    // Nothing happened to it.
    assert_eq!(fetch(&mut a11, 1011, id).await, theirs);
    assert_eq!(
        secret(&mut a11, 1011, id).await.unwrap().into_inner(),
        theirs_secret
    );
    assert_eq!(fetch(&mut a10, 1010, &mine.id).await, mine);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_cross_account_delete_does_not_stop_the_other_accounts_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(test_config(dir.path())).await;
    let listener = Listener::ok().await;
    let mut a10 = server.admin(ADMIN_1010).await;
    let mut a11 = server.admin(ADMIN_1011).await;
    let theirs = create(
        &mut a11,
        1011,
        webhook("theirs", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    expect_code(delete(&mut a10, 1010, &theirs.id).await, Code::NotFound);

    let mut ingest = server.ingest(INGEST).await;
    publish(
        &mut ingest,
        1011,
        vec![event("ev-1", "COURSE_ENROLLMENT", 7)],
    )
    .await;
    let ids = listener.wait_events(1, Duration::from_secs(10)).await;
    assert_eq!(ids, ["ev-1"], "1011's webhook still delivers");
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ secrets

/// Fails when `secret` appears in the Debug form or the encoding of `msg`.
#[track_caller]
fn assert_hidden<M: Message + Debug>(msg: &M, secrets: &[&[u8]]) {
    let debug = format!("{msg:?}");
    let encoded = msg.encode_to_vec();
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !encoded.windows(s.len()).any(|w| w == *s),
            "a secret is in the encoded response"
        );
        if let Ok(text) = std::str::from_utf8(s) {
            assert!(!debug.contains(text), "{text:?} leaks in {debug}");
        }
    }
}

#[tokio::test]
async fn passwords_and_secrets_never_appear_in_reads() {
    const PASSWORD: &str = "pw-Very-Secret-4711";
    const NEW_PASSWORD: &str = "pw-Even-More-Secret-0815";
    let (_dir, server) = start().await;
    let mut a = server.admin(ADMIN).await;

    let basic = try_create(
        &mut a,
        1010,
        webhook("basic", URL, &["CI_STATS"], basic_auth("svc", PASSWORD)),
    )
    .await
    .unwrap()
    .into_inner();
    let signed = try_create(
        &mut a,
        1010,
        webhook("signed", URL, &["CI_STATS"], signature_auth()),
    )
    .await
    .unwrap()
    .into_inner();
    let (basic_id, signed_id) = (
        basic.webhook.clone().unwrap().id,
        signed.webhook.clone().unwrap().id,
    );
    let s = secret(&mut a, 1010, &signed_id)
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap()
        .secret;
    let key_b64 = s.strip_prefix("whsec_").unwrap().to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(&key_b64)
        .unwrap();
    let hidden: Vec<&[u8]> = vec![
        PASSWORD.as_bytes(),
        NEW_PASSWORD.as_bytes(),
        s.as_bytes(),
        key_b64.as_bytes(),
        &key,
    ];

    assert_hidden(&basic, &hidden);
    assert_hidden(&signed, &hidden);
    assert_eq!(
        auth_method(basic.webhook.as_ref().unwrap()),
        basic_auth("svc", "")
    );
    for id in [&basic_id, &signed_id] {
        assert_hidden(&get(&mut a, 1010, id).await.unwrap().into_inner(), &hidden);
        assert_hidden(
            &retire(&mut a, 1010, id).await.unwrap().into_inner(),
            &hidden,
        );
        assert_hidden(
            &activate(&mut a, 1010, id).await.unwrap().into_inner(),
            &hidden,
        );
    }
    assert_hidden(
        &list(&mut a, 1010, 0, "").await.unwrap().into_inner(),
        &hidden,
    );
    assert_hidden(
        &list(&mut a, 1010, 1, "").await.unwrap().into_inner(),
        &hidden,
    );

    // Updates: a new password, and a rename of the signed webhook.
    let mut new_pw = basic.webhook.clone().unwrap();
    new_pw.auth = Some(WebhookAuth {
        method: Some(basic_auth("svc", NEW_PASSWORD)),
    });
    let updated = update(&mut a, 1010, new_pw, Some(&["auth"]))
        .await
        .unwrap()
        .into_inner();
    assert_hidden(&updated, &hidden);
    assert_eq!(
        auth_method(updated.webhook.as_ref().unwrap()),
        basic_auth("svc", "")
    );
    let mut renamed = signed.webhook.clone().unwrap();
    renamed.name = "renamed".into();
    assert_hidden(
        &update(&mut a, 1010, renamed, None)
            .await
            .unwrap()
            .into_inner(),
        &hidden,
    );
    assert_hidden(
        &get(&mut a, 1010, &basic_id).await.unwrap().into_inner(),
        &hidden,
    );
    assert_hidden(
        &list(&mut a, 1010, 0, "").await.unwrap().into_inner(),
        &hidden,
    );

    // Errors do not echo them either.
    let mut bad = webhook(
        "bad",
        "not a url",
        &["CI_STATS"],
        basic_auth("svc", PASSWORD),
    );
    bad.id = basic_id.clone();
    let st = expect_code(try_create(&mut a, 1010, bad).await, Code::InvalidArgument);
    assert!(!st.message().contains(PASSWORD));
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ pagination

#[tokio::test]
async fn list_webhooks_pages_through_every_webhook_in_creation_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.limits.max_webhooks_per_account = 12;
    let server = start_with(config).await;
    let mut a = server.admin(ADMIN).await;
    let mut created = Vec::new();
    for i in 0..12 {
        created.push(create(&mut a, 1010, hook(&format!("hook-{i:02}"))).await);
        // Interleave another account's webhooks: they must not show up.
        if i % 5 == 0 {
            create(&mut a, 1011, hook(&format!("other-{i:02}"))).await;
        }
    }
    let s = expect_code(
        try_create(&mut a, 1010, hook("thirteenth")).await,
        Code::ResourceExhausted,
    );
    assert!(
        s.message().contains("limits.max_webhooks_per_account = 12"),
        "{s:?}"
    );

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let p = list(&mut a, 1010, 5, &token)
            .await
            .expect("page")
            .into_inner();
        pages.push(p.webhooks.clone());
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
        assert!(pages.len() < 10, "pagination does not end");
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [5, 5, 2]);
    let listed: Vec<Webhook> = pages.into_iter().flatten().collect();
    assert_eq!(listed, created, "every webhook once, oldest first");

    // A page size that divides the total: the last page has no next token.
    let p1 = list(&mut a, 1010, 6, "").await.unwrap().into_inner();
    assert_eq!(p1.webhooks, created[..6]);
    let p2 = list(&mut a, 1010, 6, &p1.next_page_token)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.webhooks, created[6..]);
    assert!(p2.next_page_token.is_empty());
    // 0 means the default (50): everything at once.
    let all = list(&mut a, 1010, 0, "").await.unwrap().into_inner();
    assert_eq!(all.webhooks, created);
    assert!(all.next_page_token.is_empty());
    // Huge sizes are capped, not refused.
    let big = list(&mut a, 1010, i32::MAX, "").await.unwrap().into_inner();
    assert_eq!(big.webhooks, created);

    // Deleting the webhook a token points after does not break the walk.
    let p1 = list(&mut a, 1010, 5, "").await.unwrap().into_inner();
    delete(&mut a, 1010, &created[4].id).await.unwrap();
    let p2 = list(&mut a, 1010, 5, &p1.next_page_token)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.webhooks, created[5..10]);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ restart

#[tokio::test]
async fn webhooks_and_secrets_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let server = start_with(config.clone()).await;
    let mut a = server.admin(ADMIN).await;
    let mut basic = webhook(
        "basic",
        URL,
        &["COURSE_ENROLLMENT", "LEARNER_PROGRESS"],
        basic_auth("u", "p"),
    );
    basic.description = "with a description".into();
    let basic = create(&mut a, 1010, basic).await;
    let signed = create(
        &mut a,
        1010,
        webhook("signed", URL2, &["CI_STATS"], signature_auth()),
    )
    .await;
    let retired = create(&mut a, 1011, hook("retired")).await;
    retire(&mut a, 1011, &retired.id).await.unwrap();
    let mut renamed = basic.clone();
    renamed.name = "basic, renamed".into();
    update(&mut a, 1010, renamed, Some(&["name"]))
        .await
        .unwrap();
    for i in 0..3 {
        create(&mut a, 1010, hook(&format!("filler-{i}"))).await;
    }
    let before_1010 = list_all(&mut a, 1010).await;
    let before_1011 = list_all(&mut a, 1011).await;
    let before_secret = secret(&mut a, 1010, &signed.id).await.unwrap().into_inner();
    assert_eq!(before_1010.len(), 5);
    drop(a);
    server.stop().await.expect("clean stop");

    let server = start_with(config).await;
    let mut a = server.admin(ADMIN).await;
    assert_eq!(list_all(&mut a, 1010).await, before_1010);
    assert_eq!(list_all(&mut a, 1011).await, before_1011);
    let b = fetch(&mut a, 1010, &basic.id).await;
    assert_eq!(b.name, "basic, renamed");
    assert_eq!(b.description, "with a description");
    assert_eq!(auth_method(&b), basic_auth("u", ""));
    assert!(
        !fetch(&mut a, 1011, &retired.id).await.active,
        "still retired"
    );
    assert_eq!(
        secret(&mut a, 1010, &signed.id).await.unwrap().into_inner(),
        before_secret,
        "same secret after restart"
    );
    // The limit counts what was stored before the restart.
    expect_code(
        try_create(&mut a, 1010, hook("sixth")).await,
        Code::ResourceExhausted,
    );
    // And the restarted server keeps working.
    delete(&mut a, 1010, &basic.id).await.expect("delete");
    let fresh = create(&mut a, 1010, hook("fresh")).await;
    assert!(before_1010.iter().all(|w| w.id != fresh.id));
    activate(&mut a, 1011, &retired.id).await.expect("activate");
    server.stop().await.unwrap();
}
