//! Authentication and roles through a real router: bearer tokens, role
//! separation between WebhookAdmin and EventIngest, hashed tokens in config,
//! and the credentials created on first start when none are configured.

use std::fmt::Debug;

use crate::common::*;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};
use webhook_router::config::{Config, Role, TokenConfig};
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

const URL: &str = "http://127.0.0.1:9/hook";
const CREDENTIALS_FILE: &str = "initial-credentials.toml";

#[track_caller]
fn expect_code<T: Debug>(reply: Result<Response<T>, Status>, code: Code) -> Status {
    match reply {
        Ok(r) => panic!("expected {code:?}, got OK: {:?}", r.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

fn hook(name: &str) -> Webhook {
    webhook(name, URL, &["COURSE_ENROLLMENT"], no_auth())
}

/// Every admin call that needs an admin token, against account 1010.
async fn admin_calls<I: Interceptor>(
    a: &mut WebhookAdminClient<InterceptedService<Channel, I>>,
) -> Vec<(&'static str, Result<(), Status>)> {
    let id = "wh_0000000000000000000000000000".to_string();
    vec![
        (
            "CreateWebhook",
            a.create_webhook(CreateWebhookRequest {
                account_id: 1010,
                webhook: Some(hook("x")),
            })
            .await
            .map(drop),
        ),
        (
            "GetWebhook",
            a.get_webhook(GetWebhookRequest {
                account_id: 1010,
                webhook_id: id.clone(),
            })
            .await
            .map(drop),
        ),
        (
            "ListWebhooks",
            a.list_webhooks(ListWebhooksRequest {
                account_id: 1010,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "UpdateWebhook",
            a.update_webhook(UpdateWebhookRequest {
                account_id: 1010,
                webhook: Some(Webhook {
                    id: id.clone(),
                    name: "y".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
            .map(drop),
        ),
        (
            "DeleteWebhook",
            a.delete_webhook(DeleteWebhookRequest {
                account_id: 1010,
                webhook_id: id.clone(),
            })
            .await
            .map(drop),
        ),
        (
            "RetireWebhook",
            a.retire_webhook(RetireWebhookRequest {
                account_id: 1010,
                webhook_id: id.clone(),
            })
            .await
            .map(drop),
        ),
        (
            "ActivateWebhook",
            a.activate_webhook(ActivateWebhookRequest {
                account_id: 1010,
                webhook_id: id.clone(),
            })
            .await
            .map(drop),
        ),
        (
            "GetWebhookSecret",
            a.get_webhook_secret(GetWebhookSecretRequest {
                account_id: 1010,
                webhook_id: id,
            })
            .await
            .map(drop),
        ),
        (
            "ListEventTypes",
            a.list_event_types(ListEventTypesRequest::default())
                .await
                .map(drop),
        ),
    ]
}

#[track_caller]
fn assert_all(calls: Vec<(&'static str, Result<(), Status>)>, code: Code) {
    for (name, r) in calls {
        match r {
            Ok(()) => panic!("{name}: expected {code:?}, got OK"),
            Err(s) => assert_eq!(s.code(), code, "{name}: {s:?}"),
        }
    }
}

async fn try_publish<I: Interceptor>(
    i: &mut EventIngestClient<InterceptedService<Channel, I>>,
    account_id: u64,
) -> Result<Response<PublishEventsResponse>, Status> {
    i.publish_events(PublishEventsRequest {
        account_id,
        events: vec![event("ev-auth", "COURSE_ENROLLMENT", 1)],
    })
    .await
}

/// Clients that send `authorization: <raw>` verbatim.
async fn raw_clients(
    server: &TestServer,
    raw: &str,
) -> (
    WebhookAdminClient<InterceptedService<Channel, RawAuth>>,
    EventIngestClient<InterceptedService<Channel, RawAuth>>,
) {
    (
        WebhookAdminClient::with_interceptor(server.channel().await, RawAuth(raw.parse().unwrap())),
        EventIngestClient::with_interceptor(server.channel().await, RawAuth(raw.parse().unwrap())),
    )
}

#[derive(Clone)]
struct RawAuth(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for RawAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

#[tokio::test]
async fn missing_or_unknown_tokens_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;

    // No authorization metadata at all ("" makes the harness send none).
    let mut a = server.admin("").await;
    assert_all(admin_calls(&mut a).await, Code::Unauthenticated);
    let mut i = server.ingest("").await;
    expect_code(try_publish(&mut i, 1010).await, Code::Unauthenticated);

    // Unknown tokens, including a near miss of a real one.
    let near_miss = &ADMIN[..ADMIN.len() - 1];
    for token in ["not-a-configured-token-0000", near_miss] {
        let mut a = server.admin(token).await;
        assert_all(admin_calls(&mut a).await, Code::Unauthenticated);
        let mut i = server.ingest(token).await;
        let s = expect_code(try_publish(&mut i, 1010).await, Code::Unauthenticated);
        // The message says where valid tokens are, and echoes nothing sent.
        assert!(
            s.message().starts_with("unknown token (")
                && s.message().contains("[[tokens]]")
                && s.message().contains("data_dir/initial-credentials.toml"),
            "{s:?}"
        );
        assert!(!s.message().contains(token), "{s:?}");
    }

    // A real token without the Bearer scheme, or under another scheme.
    for raw in [
        ADMIN.to_string(),
        format!("Basic {ADMIN}"),
        "Bearer".to_string(),
    ] {
        let (mut a, _) = raw_clients(&server, &raw).await;
        assert_all(admin_calls(&mut a).await, Code::Unauthenticated);
    }
    let (_, mut i) = raw_clients(&server, &format!("Token {INGEST}")).await;
    expect_code(try_publish(&mut i, 1010).await, Code::Unauthenticated);

    // Control: the same token with the Bearer scheme works.
    let (mut a, _) = raw_clients(&server, &format!("Bearer {ADMIN}")).await;
    a.list_event_types(ListEventTypesRequest::default())
        .await
        .expect("a valid bearer token is accepted");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn each_service_accepts_only_its_own_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;

    // Ingest tokens on WebhookAdmin: PERMISSION_DENIED, for every call.
    for token in [INGEST, INGEST_1010] {
        let mut a = server.admin(token).await;
        assert_all(admin_calls(&mut a).await, Code::PermissionDenied);
    }
    // Admin tokens on EventIngest: PERMISSION_DENIED.
    for token in [ADMIN, ADMIN_1010] {
        let mut i = server.ingest(token).await;
        expect_code(try_publish(&mut i, 1010).await, Code::PermissionDenied);
    }
    // Nothing was published by the refused calls: the event id is still new.
    let mut i = server.ingest(INGEST).await;
    let r = try_publish(&mut i, 1010)
        .await
        .expect("ingest token publishes")
        .into_inner();
    assert!(!r.results[0].duplicate);

    // Controls: each token works where it belongs.
    let mut a = server.admin(ADMIN).await;
    create(&mut a, 1010, hook("admin works")).await;
    let mut a = server.admin(ADMIN_1010).await;
    create(&mut a, 1010, hook("scoped admin works")).await;
    let mut i = server.ingest(INGEST_1010).await;
    let r = try_publish(&mut i, 1010)
        .await
        .expect("scoped ingest")
        .into_inner();
    assert!(r.results[0].duplicate, "same event id as before");

    // Account scope applies to ingest as well.
    expect_code(try_publish(&mut i, 1011).await, Code::PermissionDenied);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn hashed_tokens_in_config_authenticate_the_plain_token() {
    const TOKEN: &str = "only-the-hash-is-in-the-config-01";
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.tokens = vec![TokenConfig {
        token: None,
        token_sha256: Some(hex::encode(Sha256::digest(TOKEN.as_bytes()))),
        role: Role::Admin,
        account_ids: Some(vec![7]),
    }];
    let hash = config.tokens[0].token_sha256.clone().unwrap();
    let server = TestServer::start(config).await;

    let mut a = server.admin(TOKEN).await;
    create(&mut a, 7, hook("hashed")).await;
    let s = expect_code(
        a.list_webhooks(ListWebhooksRequest {
            account_id: 8,
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
    );
    assert!(!s.message().is_empty());
    // The hash itself is not a token.
    let mut a = server.admin(&hash).await;
    assert_all(admin_calls(&mut a).await, Code::Unauthenticated);
    // The old test tokens are not configured here.
    let mut a = server.admin(ADMIN).await;
    assert_all(admin_calls(&mut a).await, Code::Unauthenticated);
    server.stop().await.unwrap();
}

/// (admin token, ingest token) from the credentials file.
fn read_credentials(text: &str) -> (String, String) {
    let table: toml::Table = text.parse().expect("the credentials file is TOML");
    let tokens = table["tokens"].as_array().expect("[[tokens]]");
    assert_eq!(tokens.len(), 2, "one admin and one ingest token");
    let find = |role: &str| {
        let t = tokens
            .iter()
            .find(|t| t["role"].as_str() == Some(role))
            .unwrap_or_else(|| panic!("a {role} token"));
        assert!(
            t.get("account_ids").is_none(),
            "{role} token covers every account"
        );
        t["token"].as_str().expect("token string").to_string()
    };
    let (admin, ingest) = (find("admin"), find("ingest"));
    assert!(admin.len() >= 16 && ingest.len() >= 16);
    assert_ne!(admin, ingest);
    // The file can be pasted into a config as is.
    let as_config: Config = toml::from_str(text).expect("valid config TOML");
    as_config.validate().expect("valid tokens");
    assert_eq!(as_config.tokens.len(), 2);
    (admin, ingest)
}

#[tokio::test]
async fn first_start_without_tokens_creates_credentials_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.tokens.clear();
    let path = dir.path().join(CREDENTIALS_FILE);
    let server = TestServer::start(config.clone()).await;

    // The service does not run open.
    let mut anon = server.admin("").await;
    assert_all(admin_calls(&mut anon).await, Code::Unauthenticated);
    let mut old = server.admin(ADMIN).await;
    assert_all(admin_calls(&mut old).await, Code::Unauthenticated);

    let text = std::fs::read_to_string(&path).expect("initial-credentials.toml written");
    let (admin_token, ingest_token) = read_credentials(&text);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "credentials file mode {mode:o}");
    }

    // The tokens work, each for its own service, on any account.
    let mut a = server.admin(&admin_token).await;
    let w = create(&mut a, 1010, hook("bootstrapped")).await;
    create(&mut a, 1011, hook("other account")).await;
    let mut i = server.ingest(&ingest_token).await;
    try_publish(&mut i, 1010)
        .await
        .expect("ingest token publishes");
    let mut wrong = server.admin(&ingest_token).await;
    assert_all(admin_calls(&mut wrong).await, Code::PermissionDenied);
    let mut wrong = server.ingest(&admin_token).await;
    expect_code(try_publish(&mut wrong, 1010).await, Code::PermissionDenied);
    drop((a, i, wrong));
    server.stop().await.unwrap();

    // Restart, still without tokens: the same credentials, not new ones.
    let server = TestServer::start(config.clone()).await;
    let mut a = server.admin(&admin_token).await;
    let got = a
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .expect("same admin token after restart")
        .into_inner();
    assert_eq!(got.webhook.unwrap(), w);
    let mut i = server.ingest(&ingest_token).await;
    let r = try_publish(&mut i, 1010)
        .await
        .expect("same ingest token")
        .into_inner();
    assert!(r.results[0].duplicate);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "file not rewritten"
    );
    let mut anon = server.admin("").await;
    assert_all(admin_calls(&mut anon).await, Code::Unauthenticated);
    drop((a, i));
    server.stop().await.unwrap();

    // Even with the file deleted (as it tells the operator to), the stored
    // hashes keep the same tokens valid and no new file appears.
    std::fs::remove_file(&path).unwrap();
    let server = TestServer::start(config).await;
    let mut a = server.admin(&admin_token).await;
    a.list_webhooks(ListWebhooksRequest {
        account_id: 1011,
        ..Default::default()
    })
    .await
    .expect("admin token still valid");
    assert!(!path.exists(), "no new credentials were created");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn configured_tokens_take_precedence_over_first_start_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.tokens.clear();
    let server = TestServer::start(config.clone()).await;
    let mut anon = server.admin("").await;
    assert_all(admin_calls(&mut anon).await, Code::Unauthenticated);
    let text = std::fs::read_to_string(dir.path().join(CREDENTIALS_FILE)).unwrap();
    let (admin_token, _) = read_credentials(&text);
    server.stop().await.unwrap();

    // The operator configures tokens: only those are accepted now.
    let server = TestServer::start(test_config(dir.path())).await;
    let mut a = server.admin(&admin_token).await;
    assert_all(admin_calls(&mut a).await, Code::Unauthenticated);
    let mut a = server.admin(ADMIN).await;
    a.list_event_types(ListEventTypesRequest::default())
        .await
        .expect("configured token");
    server.stop().await.unwrap();
}
