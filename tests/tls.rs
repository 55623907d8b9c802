//! TLS on the gRPC listener: a router started with `[tls]` serves gRPC over
//! TLS to a client that trusts its certificate, and refuses plain text on the
//! same port; a missing certificate file stops the start with a clear error.

use std::time::Duration;

use crate::common::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM
/// files into `dir`; returns the certificate PEM (the client's CA).
fn write_self_signed(dir: &std::path::Path) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a certificate");
    let cert = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    cert
}

#[tokio::test]
async fn clients_connect_over_tls_and_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_self_signed(dir.path());
    let mut config = test_config(&dir.path().join("data"));
    config.tls.cert_path = dir.path().join("cert.pem");
    config.tls.key_path = dir.path().join("key.pem");
    let server = TestServer::start(config).await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connection with the router's certificate as CA");
    let mut admin = WebhookAdminClient::with_interceptor(channel.clone(), bearer(ADMIN));
    let w = create(
        &mut admin,
        1010,
        webhook(
            "over tls",
            "http://127.0.0.1:9/hook",
            &["COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    assert!(w.id.starts_with("wh_"));
    let mut ingest = EventIngestClient::with_interceptor(channel, bearer(INGEST));
    let r = publish(
        &mut ingest,
        1010,
        vec![event("tls-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    assert_eq!(r.results[0].event_id, "tls-1");

    // Plain text on the same port: the connection or the call fails; it
    // never reaches a service.
    let plain = async {
        let channel = Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await?;
        let mut admin = WebhookAdminClient::with_interceptor(channel, bearer(ADMIN));
        admin
            .list_webhooks(ListWebhooksRequest {
                account_id: 1010,
                ..Default::default()
            })
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .expect("the plain-text attempt ends (no hang)");
    match outcome {
        Ok(r) => panic!("plain text was served: {:?}", r.into_inner()),
        Err(e) => eprintln!("plain text refused as expected: {e}"),
    }

    // A client that does not trust the certificate is refused too.
    let untrusted = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    assert!(
        untrusted.is_err(),
        "a client without the CA must not connect"
    );

    // The TLS client still works after those attempts.
    let mut admin2 = WebhookAdminClient::with_interceptor(
        Channel::from_shared(format!("https://{}", server.addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap(),
        bearer(ADMIN),
    );
    let got = admin2
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            ..Default::default()
        })
        .await
        .expect("TLS call after refused plain-text attempts")
        .into_inner();
    assert_eq!(got.webhooks, vec![w]);
    drop((admin, admin2));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unreadable_tls_files_stop_the_start_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"));
    config.tls.cert_path = dir.path().join("missing-cert.pem");
    config.tls.key_path = dir.path().join("missing-key.pem");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = webhook_router::run(config, listener, std::future::pending())
        .await
        .expect_err("no certificate, no start");
    let msg = err.to_string();
    assert!(
        msg.starts_with("tls.cert_path: cannot read") && msg.contains("missing-cert.pem"),
        "{msg}"
    );

    // Files that are not PEM: refused at start as well.
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    let mut config = test_config(&dir.path().join("data"));
    config.tls.cert_path = dir.path().join("bad.pem");
    config.tls.key_path = dir.path().join("bad.pem");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        webhook_router::run(config, listener, std::future::pending()),
    )
    .await
    .expect("start fails instead of serving")
    .expect_err("a bad certificate, no start");
    assert!(err.to_string().starts_with("tls:"), "{err}");
}
