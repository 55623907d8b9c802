//! The real `webhook-router` binary as a child process: a config file for a
//! data folder, start with port discovery from the log, signals, exit status
//! and the captured log lines.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

use super::{bearer, Admin, Ingest, ADMIN, INGEST};

/// Writes `dir/config.toml` for a router on 127.0.0.1:0 with its data in
/// `dir/data`, loopback targets allowed, short retries, the test tokens, and
/// `extra` appended to the `[delivery]` section.
pub fn write_router_config(dir: &Path, shutdown_grace_ms: u64, extra_delivery: &str) -> PathBuf {
    write_router_config_with_data(dir, &dir.join("data"), shutdown_grace_ms, extra_delivery)
}

/// Like [`write_router_config`], with the data in `data_dir`.
pub fn write_router_config_with_data(
    dir: &Path,
    data_dir: &Path,
    shutdown_grace_ms: u64,
    extra_delivery: &str,
) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{data}"
shutdown_grace_ms = {shutdown_grace_ms}

[delivery]
allow_private_targets = true
retry_initial_ms = 100
retry_max_interval_ms = 500
connect_timeout_ms = 1000
request_timeout_ms = 5000
rate_limit_per_second = 10000
{extra_delivery}

[[tokens]]
token = "{ADMIN}"
role = "admin"

[[tokens]]
token = "{INGEST}"
role = "ingest"
"#,
        data = data_dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Like [`write_router_config`] for a router of a cluster: its state in
/// the PostgreSQL database at `postgres_url`, leases of `lease_ttl_ms`.
pub fn write_cluster_config(
    dir: &Path,
    postgres_url: &str,
    lease_ttl_ms: u64,
    extra_delivery: &str,
) -> PathBuf {
    let path = write_router_config(dir, 2_000, extra_delivery);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[storage]\nbackend = \"postgres\"\npostgres_url = \"{postgres_url}\"\n\
         postgres_pool_size = 8\nlease_ttl_ms = {lease_ttl_ms}\n\
         \n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// The binary running as a child; killed on drop.
pub struct RouterProcess {
    pub child: Child,
    /// `IP:port` from the `webhook-router serving addr=…` log line.
    pub addr: String,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl RouterProcess {
    /// Starts `webhook-router serve --config <config>` and waits until it serves.
    pub fn start(config: &Path) -> RouterProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-router"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start webhook-router");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("webhook-router serving") {
                    if let Some(i) = line.find("addr=") {
                        let addr: String = line[i + 5..]
                            .chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect();
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "router did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        RouterProcess { child, addr, log }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap()
    }

    pub async fn admin(&self) -> Admin {
        WebhookAdminClient::with_interceptor(self.channel().await, bearer(ADMIN))
    }

    pub async fn ingest(&self) -> Ingest {
        EventIngestClient::with_interceptor(self.channel().await, bearer(INGEST))
    }

    /// Sends a signal (`-KILL`, `-TERM`) with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to end; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "router did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log shows the `n`-th `webhook-router serving` line
    /// (the router started again in-process) and switches to its address.
    pub fn wait_serving(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let addrs: Vec<String> = self
                .log_lines()
                .iter()
                .filter(|l| l.contains("webhook-router serving"))
                .filter_map(|l| {
                    let i = l.find("addr=")?;
                    Some(
                        l[i + 5..]
                            .chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect(),
                    )
                })
                .collect();
            if addrs.len() >= n {
                self.addr = addrs[n - 1].clone();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no serving line #{n}; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `/metrics` address from the `metrics listener serving` line.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.logged_addr("metrics listener serving")
    }

    /// The web console's address, from its `console listening addr=…` line;
    /// waits up to 10 s for it.
    pub fn console_addr(&self) -> std::net::SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(a) = self.logged_addr("console listening") {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no `console listening` line within 10 s; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `addr=` of the last log line containing `needle`.
    pub fn logged_addr(&self, needle: &str) -> Option<std::net::SocketAddr> {
        self.log_lines().iter().rev().find_map(|l| {
            if !l.contains(needle) {
                return None;
            }
            let i = l.find("addr=")?;
            l[i + 5..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect::<String>()
                .parse()
                .ok()
        })
    }

    /// The log lines captured so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
