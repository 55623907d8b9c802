//! Test harness: a real router on 127.0.0.1:0 with a temp sled folder, gRPC
//! clients carrying tokens, and a real HTTP listener recording deliveries.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use webhook_router::config::{Config, Role, TokenConfig};
use webhook_router::proto::v1 as pb;
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

pub use pb::*;

pub const ADMIN: &str = "admin-token-all-accounts-0001";
pub const INGEST: &str = "ingest-token-all-accounts-0001";
pub const ADMIN_1010: &str = "admin-token-account-1010-0001";
pub const ADMIN_1011: &str = "admin-token-account-1011-0001";
pub const INGEST_1010: &str = "ingest-token-account-1010-001";

/// Config for tests: known tokens, loopback listeners allowed, short timings.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        shutdown_grace_ms: 2_000,
        ..Config::default()
    };
    c.delivery.allow_private_targets = true;
    c.delivery.retry_initial_ms = 200;
    c.delivery.retry_max_interval_ms = 1_000;
    c.delivery.request_timeout_ms = 2_000;
    c.delivery.connect_timeout_ms = 1_000;
    c.delivery.rate_limit_per_second = 1_000;
    // Off: the tests of retries count every attempt; tests/health.rs turns
    // the circuit breaker on with its own short periods.
    c.delivery.breaker_failure_threshold = 0;
    let token = |t: &str, role, accounts: Option<Vec<u64>>| TokenConfig {
        token: Some(t.into()),
        token_sha256: None,
        role,
        account_ids: accounts,
    };
    c.tokens = vec![
        token(ADMIN, Role::Admin, None),
        token(INGEST, Role::Ingest, None),
        token(ADMIN_1010, Role::Admin, Some(vec![1010])),
        token(ADMIN_1011, Role::Admin, Some(vec![1011])),
        token(INGEST_1010, Role::Ingest, Some(vec![1010])),
    ];
    c
}

/// A router on a fresh temp folder with [`test_config`], and clients with
/// the all-accounts tokens. Keep the TempDir alive for the test.
pub async fn setup() -> (tempfile::TempDir, TestServer, Admin, Ingest) {
    setup_with(|_| {}).await
}

/// Like [`setup`], after `f` adjusted the config.
pub async fn setup_with(
    f: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, TestServer, Admin, Ingest) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    f(&mut config);
    let server = TestServer::start(config).await;
    let admin = server.admin(ADMIN).await;
    let ingest = server.ingest(INGEST).await;
    (dir, server, admin, ingest)
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Admin = WebhookAdminClient<InterceptedService<Channel, Bearer>>;
pub type Ingest = EventIngestClient<InterceptedService<Channel, Bearer>>;

/// A router running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<webhook_router::error::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data_dir = config.data_dir.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(webhook_router::run(config, listener, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            data_dir,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Graceful stop; returns the server's result.
    pub async fn stop(mut self) -> webhook_router::error::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().unwrap().await.unwrap()
    }

    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub async fn admin(&self, token: &str) -> Admin {
        WebhookAdminClient::with_interceptor(self.channel().await, bearer(token))
    }

    pub async fn ingest(&self, token: &str) -> Ingest {
        EventIngestClient::with_interceptor(self.channel().await, bearer(token))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn bearer(token: &str) -> Bearer {
    if token.is_empty() {
        Bearer(None)
    } else {
        Bearer(Some(format!("Bearer {token}").parse().unwrap()))
    }
}

/// A webhook message for CreateWebhook.
pub fn webhook(name: &str, url: &str, types: &[&str], auth: webhook_auth::Method) -> Webhook {
    Webhook {
        name: name.into(),
        target_url: url.into(),
        event_types: types.iter().map(|s| s.to_string()).collect(),
        auth: Some(WebhookAuth { method: Some(auth) }),
        ..Default::default()
    }
}

pub fn no_auth() -> webhook_auth::Method {
    webhook_auth::Method::None(NoAuth {})
}

pub fn signature_auth() -> webhook_auth::Method {
    webhook_auth::Method::Signature(SignatureAuth {
        algorithm: SignatureAlgorithm::HmacSha256 as i32,
    })
}

pub async fn create(admin: &mut Admin, account_id: u64, w: Webhook) -> Webhook {
    admin
        .create_webhook(CreateWebhookRequest {
            account_id,
            webhook: Some(w),
        })
        .await
        .expect("create webhook")
        .into_inner()
        .webhook
        .unwrap()
}

/// An event with `data = {"userId": user, "loId": "course:<user>"}`.
pub fn event(id: &str, name: &str, user: u64) -> Event {
    use prost_types::{value::Kind, Struct, Value};
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "userId".to_string(),
        Value {
            kind: Some(Kind::NumberValue(user as f64)),
        },
    );
    fields.insert(
        "loId".to_string(),
        Value {
            kind: Some(Kind::StringValue(format!("course:{user}"))),
        },
    );
    Event {
        event_id: id.into(),
        event_name: name.into(),
        timestamp: 1_727_414_643_000,
        event_info: "info".into(),
        data: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
    }
}

/// The first 100 deliveries of an account-1010 webhook, newest first.
pub async fn deliveries(admin: &mut Admin, webhook_id: &str) -> Vec<Delivery> {
    admin
        .list_deliveries(ListDeliveriesRequest {
            account_id: 1010,
            webhook_id: webhook_id.into(),
            state: 0,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries
}

pub async fn publish(
    ingest: &mut Ingest,
    account_id: u64,
    events: Vec<Event>,
) -> PublishEventsResponse {
    ingest
        .publish_events(PublishEventsRequest { account_id, events })
        .await
        .expect("publish")
        .into_inner()
}

// ------------------------------------------------------------------ listener

/// One request the listener received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
    /// Event ids in the payload, in order.
    pub fn event_ids(&self) -> Vec<String> {
        self.json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["eventId"].as_str().unwrap().to_string())
            .collect()
    }
}

/// How the listener answers: (status, extra headers, delay before answering).
pub type Behaviour =
    Arc<dyn Fn(usize, &Received) -> (u16, Vec<(String, String)>, Duration) + Send + Sync>;

/// A real HTTP/1.1 listener on 127.0.0.1.
pub struct Listener {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Answers 200 to everything.
    pub async fn ok() -> Listener {
        Self::start(Arc::new(|_, _| (200, vec![], Duration::ZERO))).await
    }

    /// Answers 200 while `healthy` is true, 503 otherwise.
    pub async fn toggled(healthy: Arc<std::sync::atomic::AtomicBool>) -> Listener {
        Self::start(Arc::new(move |_, _| {
            let ok = healthy.load(std::sync::atomic::Ordering::SeqCst);
            (if ok { 200 } else { 503 }, vec![], Duration::ZERO)
        }))
        .await
    }

    pub async fn start(behaviour: Behaviour) -> Listener {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let rec = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    return;
                };
                let rec = rec.clone();
                let behaviour = behaviour.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let rec = rec.clone();
                        let behaviour = behaviour.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let r = Received {
                                at: Instant::now(),
                                headers: parts.headers,
                                body,
                            };
                            let n = {
                                let mut g = rec.lock().unwrap();
                                g.push(r.clone());
                                g.len() - 1
                            };
                            let (status, headers, delay) = behaviour(n, &r);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut resp = hyper::Response::builder().status(status);
                            for (k, v) in headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, std::convert::Infallible>(
                                resp.body(Full::new(Bytes::from_static(b"ok"))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Listener {
            addr,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Every event id received, in arrival order (duplicates kept).
    pub fn event_ids(&self) -> Vec<String> {
        self.requests().iter().flat_map(|r| r.event_ids()).collect()
    }

    /// Waits until `pred(requests)` holds or `timeout` passes; returns the requests.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if pred(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` events arrived.
    pub async fn wait_events(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ids = self.event_ids();
            if ids.len() >= n || Instant::now() > deadline {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------- metrics

impl TestServer {
    /// Like [`TestServer::start`], also serving `/metrics` on a second
    /// listener bound to 127.0.0.1:0; returns the server and that address.
    pub async fn start_with_metrics(config: Config) -> (TestServer, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let data_dir = config.data_dir.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(webhook_router::server::run_with_metrics_listener(
            config,
            listener,
            Some(metrics),
            async {
                let _ = rx.await;
            },
        ));
        let server = TestServer {
            addr,
            data_dir,
            shutdown: Some(tx),
            handle: Some(handle),
        };
        (server, metrics_addr)
    }
}

/// GET http://{addr}{path}: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("GET");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

// ------------------------------------------------------ metrics exposition

/// One sample of the exposition: metric name, labels, value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the OpenMetrics text format (the subset the router writes).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = std::collections::BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
            None => (series.to_string(), std::collections::BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The value of the sample `name` whose labels include `labels`, if any.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

pub async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics text: {body}");
    parse(&body)
}

/// Scrapes until `pred` holds (lane figures are read from the store, which
/// the lane updates right after the listener answered).
pub async fn scrape_until(addr: SocketAddr, pred: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(addr).await;
        if pred(&s) || std::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------ real binary

pub mod load;
pub mod lossyfs;
pub mod pg;
pub mod process;
