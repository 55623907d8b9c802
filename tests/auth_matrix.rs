//! The authorization matrix: every RPC of WebhookAdmin and EventIngest, read
//! from the service descriptors the server publishes (so a new RPC fails this
//! test until it is added), called without a token, with an unknown token,
//! with the other role's token and with a token of another account.

use std::collections::BTreeSet;

use crate::common::*;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

/// `Service/Method` of every RPC in package webhooks.v1, from the descriptor set.
fn rpcs_from_descriptors() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(webhook_router::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut out = BTreeSet::new();
    for file in set.file {
        if file.package() != "webhooks.v1" {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                out.insert(format!("{}/{}", service.name(), method.name()));
            }
        }
    }
    out
}

/// Calls `rpc` for `account_id` with `token` ("" sends none). Streams are
/// read to their first message, where StreamEvents checks the account.
async fn call(
    rpc: &str,
    channel: Channel,
    token: &str,
    account_id: u64,
    webhook_id: &str,
) -> Result<(), Status> {
    let mut a = WebhookAdminClient::with_interceptor(channel.clone(), bearer(token));
    let mut i = EventIngestClient::with_interceptor(channel, bearer(token));
    let id = webhook_id.to_string();
    let hook = || {
        webhook(
            "m",
            "http://127.0.0.1:9/h",
            &["COURSE_ENROLLMENT"],
            no_auth(),
        )
    };
    match rpc {
        "WebhookAdmin/CreateWebhook" => a
            .create_webhook(CreateWebhookRequest {
                account_id,
                webhook: Some(hook()),
            })
            .await
            .map(drop),
        "WebhookAdmin/GetWebhook" => a
            .get_webhook(GetWebhookRequest {
                account_id,
                webhook_id: id,
            })
            .await
            .map(drop),
        "WebhookAdmin/ListWebhooks" => a
            .list_webhooks(ListWebhooksRequest {
                account_id,
                ..Default::default()
            })
            .await
            .map(drop),
        "WebhookAdmin/UpdateWebhook" => a
            .update_webhook(UpdateWebhookRequest {
                account_id,
                webhook: Some(Webhook {
                    id,
                    name: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
            .map(drop),
        "WebhookAdmin/DeleteWebhook" => a
            .delete_webhook(DeleteWebhookRequest {
                account_id,
                webhook_id: "wh_0000000000000000000000000000".into(),
            })
            .await
            .map(drop),
        "WebhookAdmin/RetireWebhook" => a
            .retire_webhook(RetireWebhookRequest {
                account_id,
                webhook_id: id,
            })
            .await
            .map(drop),
        "WebhookAdmin/ActivateWebhook" => a
            .activate_webhook(ActivateWebhookRequest {
                account_id,
                webhook_id: id,
            })
            .await
            .map(drop),
        "WebhookAdmin/GetWebhookSecret" => a
            .get_webhook_secret(GetWebhookSecretRequest {
                account_id,
                webhook_id: id,
            })
            .await
            .map(drop),
        "WebhookAdmin/RotateWebhookSecret" => a
            .rotate_webhook_secret(RotateWebhookSecretRequest {
                account_id,
                webhook_id: id,
                grace_period_seconds: 0,
            })
            .await
            .map(drop),
        "WebhookAdmin/ListEventTypes" => a
            .list_event_types(ListEventTypesRequest::default())
            .await
            .map(drop),
        "WebhookAdmin/TestWebhook" => a
            .test_webhook(TestWebhookRequest {
                account_id,
                target: Some(test_webhook_request::Target::WebhookId(id)),
                event_name: String::new(),
            })
            .await
            .map(drop),
        "WebhookAdmin/ListDeliveries" => a
            .list_deliveries(ListDeliveriesRequest {
                account_id,
                webhook_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        "WebhookAdmin/RedeliverEvents" => a
            .redeliver_events(RedeliverEventsRequest {
                account_id,
                webhook_id: id,
                delivery_ids: vec![],
            })
            .await
            .map(drop),
        "WebhookAdmin/WatchDeliveries" => a
            .watch_deliveries(WatchDeliveriesRequest {
                account_id,
                webhook_id: id,
            })
            .await
            .map(drop),
        "WebhookAdmin/ExplainRouting" => a
            .explain_routing(ExplainRoutingRequest {
                account_id,
                event: Some(event("matrix-3", "COURSE_ENROLLMENT", 1)),
            })
            .await
            .map(drop),
        "WebhookAdmin/RecoverDeliveries" => a
            .recover_deliveries(RecoverDeliveriesRequest {
                account_id,
                webhook_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        "WebhookAdmin/WatchOperationalEvents" => a
            .watch_operational_events(WatchOperationalEventsRequest { account_id })
            .await
            .map(drop),
        "WebhookAdmin/GetWebhookHealth" => a
            .get_webhook_health(GetWebhookHealthRequest {
                account_id,
                webhook_id: id,
            })
            .await
            .map(drop),
        "EventIngest/PublishEvents" => i
            .publish_events(PublishEventsRequest {
                account_id,
                events: vec![event("matrix-1", "COURSE_ENROLLMENT", 1)],
            })
            .await
            .map(drop),
        "EventIngest/StreamEvents" => {
            let req = StreamEventsRequest {
                account_id,
                events: vec![event("matrix-2", "COURSE_ENROLLMENT", 1)],
            };
            let mut answers = i
                .stream_events(tokio_stream::iter(vec![req]))
                .await?
                .into_inner();
            match answers.next().await {
                Some(Err(s)) => Err(s),
                _ => Ok(()),
            }
        }
        other => panic!("{other} is not in the auth matrix: add it to call()"),
    }
}

/// Whether `code` means the call got past authentication and authorization.
fn authorized(r: &Result<(), Status>) -> bool {
    !matches!(r, Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied))
}

#[tokio::test]
async fn every_rpc_refuses_missing_wrong_other_role_and_other_account_tokens() {
    let rpcs = rpcs_from_descriptors();
    assert_eq!(
        rpcs.len(),
        20,
        "18 WebhookAdmin + 2 EventIngest RPCs: {rpcs:?}"
    );
    let (_dir, server, mut admin, _ingest) = setup().await;
    let w = create(
        &mut admin,
        1010,
        webhook(
            "matrix",
            "http://127.0.0.1:9/h",
            &["COURSE_ENROLLMENT"],
            signature_auth(),
        ),
    )
    .await;
    let channel = server.channel().await;

    let mut checked = 0;
    for rpc in &rpcs {
        let admin_rpc = rpc.starts_with("WebhookAdmin/");
        let (own, other_role) = if admin_rpc {
            (ADMIN_1010, INGEST)
        } else {
            (INGEST_1010, ADMIN)
        };
        // Tokens scoped to another account than the one called: ADMIN_1011
        // on account 1010; INGEST_1010 on account 1011.
        let (other_account_token, other_account) = if admin_rpc {
            (ADMIN_1011, 1010)
        } else {
            (INGEST_1010, 1011)
        };
        let cases: [(&str, &str, u64, Code); 4] = [
            ("no token", "", 1010, Code::Unauthenticated),
            (
                "unknown token",
                "unknown-token-0123456789abcdef",
                1010,
                Code::Unauthenticated,
            ),
            ("other role", other_role, 1010, Code::PermissionDenied),
            (
                "other account",
                other_account_token,
                other_account,
                Code::PermissionDenied,
            ),
        ];
        for (case, token, account, expected) in cases {
            let r = call(rpc, channel.clone(), token, account, &w.id).await;
            if case == "other account" && rpc == "WebhookAdmin/ListEventTypes" {
                // The catalog is the same for every account: any admin token reads it.
                assert!(r.is_ok(), "{rpc} / {case}: {r:?}");
                continue;
            }
            match r {
                Err(s) => {
                    assert_eq!(s.code(), expected, "{rpc} / {case}: {s:?}");
                    assert!(!s.message().contains(token) || token.is_empty());
                }
                Ok(()) => panic!("{rpc} / {case}: expected {expected:?}, got OK"),
            }
            checked += 1;
        }
        // Control: the right token for the right account gets past auth.
        let r = call(rpc, channel.clone(), own, 1010, &w.id).await;
        assert!(authorized(&r), "{rpc} with its own token: {r:?}");
    }
    // Four refusals per RPC, but for ListEventTypes' other-account case.
    assert_eq!(checked, rpcs.len() * 4 - 1);
    eprintln!(
        "auth matrix: {} RPCs x 4 refusals checked ({checked} calls)",
        rpcs.len()
    );
    server.stop().await.unwrap();
}
