//! The router under test runs in a child process: this bench binary
//! re-executed with `__router <config>`, which calls the same
//! `webhook_router::run` as the `webhook-router` binary. A separate process
//! keeps its memory (peak RSS) apart from the load generator and the sink.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use webhook_router::config::{Config, Role, TokenConfig};
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

pub const ADMIN: &str = "bench-admin-token-000000000001";
pub const INGEST: &str = "bench-ingest-token-00000000001";

/// The config every scenario starts from: loopback targets allowed, no
/// per-webhook rate limit in the way, short retries.
pub fn base_config(data_dir: &Path) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        shutdown_grace_ms: 2_000,
        ..Config::default()
    };
    c.delivery.allow_private_targets = true;
    c.delivery.rate_limit_per_second = 1_000_000;
    c.delivery.retry_initial_ms = 100;
    c.delivery.retry_max_interval_ms = 500;
    let token = |t: &str, role| TokenConfig {
        token: Some(t.into()),
        token_sha256: None,
        role,
        account_ids: None,
    };
    c.tokens = vec![token(ADMIN, Role::Admin), token(INGEST, Role::Ingest)];
    c
}

/// Body of `bench __router <config.toml>`: serve until SIGTERM.
pub fn child_main(config_path: &Path) -> std::process::ExitCode {
    webhook_router::telemetry::init(false);
    let config = match Config::load(Some(config_path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen_addr())
            .await
            .expect("bind");
        println!("LISTENING {}", listener.local_addr().expect("addr"));
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal");
            term.recv().await;
        };
        match webhook_router::run(config, listener, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// A running router child.
pub struct Router {
    child: Child,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    /// From spawn to the first answered gRPC call.
    pub startup: Duration,
}

impl Router {
    /// Writes `config` next to its data folder and starts the router on it.
    pub async fn start(config: &Config) -> Router {
        let config_path = config.data_dir.with_extension("toml");
        std::fs::create_dir_all(&config.data_dir).expect("data dir");
        std::fs::write(
            &config_path,
            toml::to_string(config).expect("config serialises"),
        )
        .expect("write config");
        Self::spawn(config_path).await
    }

    async fn spawn(config_path: PathBuf) -> Router {
        let started = Instant::now();
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("__router")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_ROUTER_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn router");
        let stdout = child.stdout.take().expect("stdout");
        let addr = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).expect("read");
            line.trim()
                .strip_prefix("LISTENING ")
                .unwrap_or_else(|| panic!("router did not start: {line:?}"))
                .parse::<SocketAddr>()
                .expect("addr")
        })
        .await
        .expect("join");
        let mut router = Router {
            child,
            addr,
            config_path,
            startup: Duration::ZERO,
        };
        // Serving means answering an authenticated call.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut admin = router.admin().await;
            let ok = admin
                .list_event_types(webhook_router::proto::v1::ListEventTypesRequest::default())
                .await
                .is_ok();
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "router not serving after 120 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        router.startup = started.elapsed();
        router
    }

    /// Stops with SIGTERM and waits; then starts again on the same folder.
    pub async fn restart(mut self) -> Router {
        self.stop();
        let path = self.config_path.clone();
        Self::spawn(path).await
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// Peak resident set size of the router process so far (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time (user + system) the router process has used so far.
    pub fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are
        // the 12th and 13th of those, in clock ticks (100 per second on Linux).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        Duration::from_millis(ticks * 10)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn admin(&self) -> Admin {
        WebhookAdminClient::with_interceptor(self.channel().await, bearer(ADMIN))
            .max_decoding_message_size(64 << 20)
    }

    pub async fn ingest(&self) -> Ingest {
        ingest_at(self.addr).await
    }
}

/// An ingest client of the gRPC server at `addr`, on its own connection.
pub async fn ingest_at(addr: SocketAddr) -> Ingest {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    EventIngestClient::with_interceptor(channel, bearer(INGEST)).max_encoding_message_size(64 << 20)
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn bearer(token: &str) -> Bearer {
    Bearer(format!("Bearer {token}").parse().expect("ascii token"))
}

pub type Admin = WebhookAdminClient<InterceptedService<Channel, Bearer>>;
pub type Ingest = EventIngestClient<InterceptedService<Channel, Bearer>>;
