//! Typed configuration: embedded defaults, then an optional TOML file, then
//! environment variables, validated once at start.
//!
//! Environment scheme: `WEBHOOK_ROUTER__` followed by the key path in upper
//! case, sections separated by `__`. The value is read as a TOML value when it
//! parses as one (numbers, booleans, arrays, inline tables) and as a string
//! otherwise. Examples:
//!
//! ```text
//! WEBHOOK_ROUTER__LISTEN=0.0.0.0:50051
//! WEBHOOK_ROUTER__DATA_DIR=/var/lib/webhook-router
//! WEBHOOK_ROUTER__DELIVERY__ALLOW_PRIVATE_TARGETS=true
//! WEBHOOK_ROUTER__TOKENS='[{token_sha256 = "…", role = "admin"}]'
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override the config file.
pub const ENV_PREFIX: &str = "WEBHOOK_ROUTER__";

/// The whole configuration of one router process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address.
    pub listen: String,
    /// Folder holding the sled database (created when missing).
    pub data_dir: PathBuf,
    /// On SIGTERM/SIGINT: how long in-flight deliveries may take to finish.
    pub shutdown_grace_ms: u64,
    /// Request and resource limits.
    pub limits: Limits,
    /// Delivery behaviour.
    pub delivery: Delivery,
    /// API tokens. Empty: credentials are created on first start.
    pub tokens: Vec<TokenConfig>,
    /// Event types added to the built-in catalog.
    pub event_types: Vec<EventTypeConfig>,
    /// The Prometheus metrics listener.
    pub metrics: MetricsConfig,
    /// TLS for the gRPC listener (off unless both paths are set).
    pub tls: Tls,
    /// Storage options: encryption at rest of secrets and passwords.
    pub storage: Storage,
    /// The web console (off unless `console.listen` is set).
    pub console: ConsoleConfig,
    /// Traces over OTLP (off unless `telemetry.otlp_endpoint` is set).
    pub telemetry: TelemetryConfig,
    /// Where the router's own operational events are delivered (off unless
    /// `operational.target_url` is set).
    pub operational: Operational,
}

/// `[operational]`: the operator endpoint that receives the router's own
/// operational events (`webhook.disabled`, `delivery.dead`, ...), signed
/// like a signature webhook, through the usual durable, retried lanes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Operational {
    /// The endpoint's URL, checked like a webhook's `target_url` (https, or
    /// http and private addresses with `delivery.allow_private_targets`).
    /// Empty: operational events are only streamed (WatchOperationalEvents).
    pub target_url: String,
    /// The Standard Webhooks secret the requests are signed with: `whsec_`
    /// and the base64 of 24 to 64 random bytes. Required with `target_url`.
    pub secret: String,
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Webhooks one account may register.
    pub max_webhooks_per_account: u32,
    /// Events one PublishEvents request may carry.
    pub max_events_per_request: u32,
    /// Largest accepted event (protobuf-encoded size), in bytes.
    pub max_event_bytes: u32,
    /// Largest gRPC request message, in bytes; larger ones are refused with
    /// INVALID_ARGUMENT before they are decoded.
    pub max_request_bytes: u32,
    /// Requests the server works on at once (a stream counts for as long as
    /// it is open); more are shed with UNAVAILABLE.
    pub max_concurrent_requests: u32,
    /// Streams (StreamEvents, WatchDeliveries) one token may have open at
    /// once; more are refused with RESOURCE_EXHAUSTED.
    pub max_streams_per_token: u32,
    /// HTTP/2 streams one connection may have open at once (the
    /// SETTINGS_MAX_CONCURRENT_STREAMS the server announces).
    pub max_streams_per_connection: u32,
    /// How often the server pings an HTTP/2 connection to check that its
    /// peer is still there; 0 turns the pings off.
    pub http2_keepalive_interval_ms: u64,
    /// How long a ping may go unanswered before the connection is closed.
    pub http2_keepalive_timeout_ms: u64,
    /// A connection with no request open for this long is closed; 0 keeps
    /// idle connections open.
    pub connection_idle_timeout_ms: u64,
    /// Calls (and StreamEvents messages) one token may make per second,
    /// refilled continuously; 0 turns the per-token rate limit off.
    pub requests_per_second_per_token: u32,
    /// Calls a token may make in a burst above that rate; 0 means the same
    /// as `requests_per_second_per_token`.
    pub request_burst_per_token: u32,
}

/// `[tls]`: PEM files for the gRPC listener. Both empty: plain text.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Certificate chain, PEM, leaf first.
    pub cert_path: PathBuf,
    /// Private key of the leaf certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

impl Tls {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty()
    }
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Base64 of 32 random bytes: the AES-256-GCM key that encrypts webhook
    /// signing secrets and Basic-auth passwords at rest. Empty: stored plain.
    pub secret_key: String,
    /// Where config, events and lanes live: `sled` (embedded, in
    /// `data_dir`) or `postgres` (shared by several routers).
    pub backend: StorageBackend,
    /// `postgres://user:password@host:port/database` (backend `postgres`).
    pub postgres_url: String,
    /// Connections each router keeps open to PostgreSQL.
    pub postgres_pool_size: u32,
    /// How long a router holds a lane (and a cluster chore) without renewing
    /// it; the lanes of a router that died are taken over after this, ms.
    pub lease_ttl_ms: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            secret_key: String::new(),
            backend: StorageBackend::Sled,
            postgres_url: String::new(),
            postgres_pool_size: 16,
            lease_ttl_ms: 10_000,
        }
    }
}

/// `storage.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The embedded database in `data_dir`.
    Sled,
    /// A PostgreSQL database at `storage.postgres_url`.
    Postgres,
}

impl Storage {
    /// The decoded key, if one is set (validated by [`Config::validate`]).
    pub fn secret_key_bytes(&self) -> Option<[u8; 32]> {
        use base64::Engine;
        if self.secret_key.is_empty() {
            return None;
        }
        base64::engine::general_purpose::STANDARD
            .decode(self.secret_key.trim())
            .ok()
            .and_then(|k| k.try_into().ok())
    }
}

/// `[delivery]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// Allow http:// and loopback/private/link-local targets (tests, on-premise).
    pub allow_private_targets: bool,
    /// Most events in one payload.
    pub max_events_per_payload: u32,
    /// How often batch-mode events are sent.
    pub batch_interval_ms: u64,
    /// How far successful outcomes may lag in the delivery log: they are
    /// written in batches at least this often (and every 256 per lane). A
    /// crash inside the window repeats those deliveries, with the same
    /// `webhook-id`; it never skips one.
    pub log_flush_ms: u64,
    /// Requests per second to one webhook.
    pub rate_limit_per_second: u32,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout, response body included.
    pub request_timeout_ms: u64,
    /// First retry delay; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts.
    pub retry_max_interval_ms: u64,
    /// A payload failing for longer than this is dead-lettered and its webhook disabled.
    pub retry_max_age_ms: u64,
    /// Consecutive failed attempts to one webhook that open its circuit
    /// breaker (see `delivery/breaker.rs`); 0 turns the breaker off.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker holds every attempt back before it lets one
    /// probe through.
    pub breaker_open_ms: u64,
    /// Longest open period: each failed probe doubles the period up to this.
    pub breaker_max_open_ms: u64,
    /// How long events stay in the log after they were stored, and how long
    /// a delivered record stays in the delivery log after it was delivered.
    /// Events a webhook has not received by then leave its lane as EXPIRED.
    pub retention_ms: u64,
    /// How long a dead (or expired) delivery stays in the delivery log after
    /// it died, with the events RedeliverEvents needs to send it again.
    pub dead_letter_retention_ms: u64,
    /// Most response-body bytes read from a listener.
    pub max_response_body_bytes: u32,
}

/// Who a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// WebhookAdmin.
    Admin,
    /// EventIngest.
    Ingest,
}

/// One `[[tokens]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token itself.
    pub token: Option<String>,
    /// Or its SHA-256, hex encoded, so the file need not hold the secret.
    pub token_sha256: Option<String>,
    /// What the token may call.
    pub role: Role,
    /// Accounts the token may act on; absent means every account.
    pub account_ids: Option<Vec<u64>>,
}

/// One `[[event_types]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTypeConfig {
    /// Upper-case name, `[A-Z0-9_]`, 1-64 characters.
    pub name: String,
    /// `realtime` or `batch`.
    pub mode: ModeConfig,
    /// Shown by ListEventTypes.
    #[serde(default)]
    pub description: String,
}

/// Delivery mode as written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    /// Sent at once.
    Realtime,
    /// Sent every batch interval.
    Batch,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving `/metrics` (IP:port); absent: off.
    pub listen: Option<String>,
}

/// `[telemetry]`: traces over OTLP/HTTP (see docs/operations.md#traces).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP collector (`http://127.0.0.1:4318`; spans
    /// go to its `/v1/traces`); absent: traces off.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans.
    pub service_name: String,
    /// Share of traces started here that are kept (0.0 to 1.0); a publish
    /// call that carries a `traceparent` follows its caller's decision.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "webhook-router".into(),
            sample_ratio: 1.0,
        }
    }
}

/// `[console]`: the web console's own HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Address of the console listener (IP:port); absent: no console.
    pub listen: Option<String>,
    /// Serve the console over TLS with the `[tls]` certificate. Absent:
    /// whenever `[tls]` is configured.
    pub tls: Option<bool>,
    /// A signed-in browser session ends after this long without a request.
    pub session_idle_timeout_ms: u64,
    /// Most console sessions kept at once; the oldest is signed out first.
    pub max_sessions: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            listen: None,
            tls: None,
            session_idle_timeout_ms: 30 * 60 * 1000,
            max_sessions: 1000,
        }
    }
}

impl ConsoleConfig {
    /// Whether the console listener uses TLS under `config`.
    pub fn uses_tls(&self, tls: &Tls) -> bool {
        self.tls.unwrap_or_else(|| tls.enabled())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".into(),
            data_dir: PathBuf::from("./data"),
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
            delivery: Delivery::default(),
            tokens: Vec::new(),
            event_types: Vec::new(),
            metrics: MetricsConfig::default(),
            tls: Tls::default(),
            storage: Storage::default(),
            console: ConsoleConfig::default(),
            telemetry: TelemetryConfig::default(),
            operational: Operational::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_webhooks_per_account: 5,
            max_events_per_request: 1000,
            max_event_bytes: 262_144,
            max_request_bytes: 16 * 1024 * 1024,
            max_concurrent_requests: 512,
            max_streams_per_token: 100,
            max_streams_per_connection: 200,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 20_000,
            connection_idle_timeout_ms: 600_000,
            requests_per_second_per_token: 0,
            request_burst_per_token: 0,
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        const DAY_MS: u64 = 24 * 3600 * 1000;
        Delivery {
            allow_private_targets: false,
            max_events_per_payload: 100,
            batch_interval_ms: 60_000,
            log_flush_ms: 100,
            rate_limit_per_second: 50,
            connect_timeout_ms: 10_000,
            request_timeout_ms: 5_000,
            retry_initial_ms: 5_000,
            retry_max_interval_ms: 300_000,
            retry_max_age_ms: 7 * DAY_MS,
            breaker_failure_threshold: 10,
            breaker_open_ms: 30_000,
            breaker_max_open_ms: 600_000,
            retention_ms: 7 * DAY_MS,
            dead_letter_retention_ms: 30 * DAY_MS,
            max_response_body_bytes: 64 * 1024,
        }
    }
}

/// A loaded configuration and what was odd about where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration, validated.
    pub config: Config,
    /// Things that did not stop the load but probably are mistakes, such as
    /// `WEBHOOK_ROUTER_LISTEN` (one underscore: not read).
    pub warnings: Vec<String>,
}

/// Set by the binary when it re-executes itself after a storage failure;
/// not a config variable (one `_`).
pub const REEXEC_ENV: &str = "WEBHOOK_ROUTER_REEXECS";

/// A warning for `name` if it looks meant as a config variable but has the
/// prefix with one underscore (`WEBHOOK_ROUTER_LISTEN`), so it is not read.
/// The variables of the test suite and benchmarks
/// (`WEBHOOK_ROUTER_TEST_*`, `WEBHOOK_ROUTER_BENCH_*`) are left alone.
fn misspelled_prefix_warning(name: &str) -> Option<String> {
    let rest = name.strip_prefix("WEBHOOK_ROUTER_")?;
    if rest.is_empty()
        || name == REEXEC_ENV
        || rest.starts_with("TEST_")
        || rest.starts_with("BENCH_")
    {
        return None;
    }
    let meant = format!("{ENV_PREFIX}{}", rest.trim_start_matches('_'));
    Some(format!(
        "environment variable {name} is not read: config variables start with \
         {ENV_PREFIX} (two underscores), e.g. {meant}"
    ))
}

/// Where each key's value came from, for error messages.
#[derive(Debug, Default)]
struct Sources {
    /// The config file as named on the command line.
    file: String,
    /// Key paths set in the file (`delivery.allow_private_targets`,
    /// `tokens[0].role`), with their line.
    file_lines: Vec<(String, usize)>,
    /// Key paths set by environment variables, with the variable's name.
    env: Vec<(String, String)>,
}

impl Sources {
    fn add_file(&mut self, path: &Path, text: &str) {
        self.file = path.display().to_string();
        if let Ok(doc) = toml_edit::ImDocument::parse(text) {
            let line = |span: Option<std::ops::Range<usize>>| {
                span.map(|r| text[..r.start.min(text.len())].matches('\n').count() + 1)
            };
            walk_toml_table(doc.as_table(), "", &line, &mut self.file_lines);
        }
    }

    /// Where the value at `key` came from: `config.toml line 3` or `from
    /// WEBHOOK_ROUTER__LISTEN`; None for a default.
    fn of(&self, key: &str) -> Option<String> {
        let covers = |set: &str| {
            key == set
                || key
                    .strip_prefix(set)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        };
        let within = |set: &str| {
            set.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        };
        // A variable replaces everything below its key, so it wins.
        if let Some((_, var)) = self.env.iter().find(|(set, _)| covers(set)) {
            return Some(format!("from {var}"));
        }
        if let Some((_, line)) = self
            .file_lines
            .iter()
            .filter(|(set, _)| covers(set))
            .max_by_key(|(set, _)| set.len())
        {
            return Some(format!("{} line {line}", self.file));
        }
        // A section named as a whole (`tls`): where its keys were set.
        if let Some((_, var)) = self.env.iter().find(|(set, _)| within(set)) {
            return Some(format!("from {var}"));
        }
        self.file_lines
            .iter()
            .find(|(set, _)| within(set))
            .map(|(_, line)| format!("{} line {line}", self.file))
    }

    /// `key: why` as `key (source): why`, when the source is known.
    fn annotate(&self, message: &str) -> String {
        match message.split_once(": ") {
            Some((key, why)) if !key.contains(' ') => match self.of(key) {
                Some(source) => format!("{key} ({source}): {why}"),
                None => message.to_string(),
            },
            _ => message.to_string(),
        }
    }
}

/// Records the line of every key in `table` (and below) under `prefix`.
fn walk_toml_table(
    table: &toml_edit::Table,
    prefix: &str,
    line: &dyn Fn(Option<std::ops::Range<usize>>) -> Option<usize>,
    out: &mut Vec<(String, usize)>,
) {
    for (name, item) in table.iter() {
        let path = join_key(prefix, name);
        let key_line = line(table.key(name).and_then(|k| k.span())).or_else(|| line(item.span()));
        walk_toml_item(item, &path, key_line, line, out);
    }
}

fn walk_toml_item(
    item: &toml_edit::Item,
    path: &str,
    key_line: Option<usize>,
    line: &dyn Fn(Option<std::ops::Range<usize>>) -> Option<usize>,
    out: &mut Vec<(String, usize)>,
) {
    match item {
        toml_edit::Item::Table(t) => {
            if let Some(l) = key_line.or_else(|| line(t.span())) {
                out.push((path.to_string(), l));
            }
            walk_toml_table(t, path, line, out);
        }
        toml_edit::Item::ArrayOfTables(a) => {
            if let Some(l) = key_line.or_else(|| line(a.span())) {
                out.push((path.to_string(), l));
            }
            for (i, t) in a.iter().enumerate() {
                let at = format!("{path}[{i}]");
                if let Some(l) = line(t.span()) {
                    out.push((at.clone(), l));
                }
                walk_toml_table(t, &at, line, out);
            }
        }
        toml_edit::Item::Value(v) => walk_toml_value(v, path, key_line, line, out),
        toml_edit::Item::None => {}
    }
}

fn walk_toml_value(
    value: &toml_edit::Value,
    path: &str,
    at_line: Option<usize>,
    line: &dyn Fn(Option<std::ops::Range<usize>>) -> Option<usize>,
    out: &mut Vec<(String, usize)>,
) {
    if let Some(l) = at_line.or_else(|| line(value.span())) {
        out.push((path.to_string(), l));
    }
    match value {
        toml_edit::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk_toml_value(v, &format!("{path}[{i}]"), None, line, out);
            }
        }
        toml_edit::Value::InlineTable(t) => {
            for (name, v) in t.iter() {
                let key_line = line(t.key(name).and_then(|k| k.span()));
                walk_toml_value(v, &join_key(path, name), key_line, line, out);
            }
        }
        _ => {}
    }
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A deserialization error of the value at `path` as one line for the
/// operator: `key (source): expected …, got …`.
fn describe_load_error(sources: &Sources, path: &str, message: &str) -> String {
    let mut key = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    let why = if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde_path_to_error's path already ends with the unknown key.
        let name = rest.split('`').next().unwrap_or_default();
        if !(key == name || key.ends_with(&format!(".{name}"))) {
            key = join_key(&key, name);
        }
        let section = key
            .strip_suffix(name)
            .unwrap_or_default()
            .trim_end_matches('.');
        let known = backticked(rest.split_once("expected").map_or("", |(_, l)| l));
        let place = match section.split_once('[') {
            _ if section.is_empty() => "known top-level keys".to_string(),
            Some((list, _)) => format!("known keys in [[{list}]]"),
            None => format!("known keys in [{section}]"),
        };
        format!("unknown key; {place}: {}", known.join(", "))
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or_default();
        let within = key.clone();
        key = join_key(&key, name);
        return match sources.of(&within) {
            Some(source) => format!("{key} ({source}): is required"),
            None => format!("{key}: is required"),
        };
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (got, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let forms: Vec<String> = backticked(expected)
            .iter()
            .map(|f| format!("{f:?}"))
            .collect();
        format!("expected one of {}, got {got:?}", forms.join(", "))
    } else if let Some((got, expected)) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|m| m.split_once(", expected "))
    {
        let from_env = sources.of(&key).is_some_and(|s| s.starts_with("from "));
        format!(
            "expected {}, got {}",
            expected_form(&key, expected, from_env),
            got_form(got)
        )
    } else {
        message.to_string()
    };
    match (key.is_empty(), sources.of(&key)) {
        (true, _) => why,
        (false, Some(source)) => format!("{key} ({source}): {why}"),
        (false, None) => format!("{key}: {why}"),
    }
}

/// The names between backticks in serde's "expected one of `a`, `b`".
fn backticked(list: &str) -> Vec<String> {
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// serde's description of an unexpected value, shown plainly:
/// `string "yes"` as `"yes"`, ``integer `5` `` as `integer 5`.
fn got_form(got: &str) -> String {
    if let Some(s) = got.strip_prefix("string ") {
        return s.to_string();
    }
    match got {
        "map" => "a table".into(),
        "sequence" => "a list".into(),
        other => other.replace('`', ""),
    }
}

/// What the key at `path` takes, in the operator's words, with an example
/// from the defaults where there is one.
fn expected_form(path: &str, serde_expected: &str, from_env: bool) -> String {
    let defaults = toml::Value::try_from(Config::default()).ok();
    let default = defaults.as_ref().and_then(|d| value_at(d, path));
    let example_listen = match path {
        "metrics.listen" => Some("127.0.0.1:9090"),
        "console.listen" => Some("127.0.0.1:8080"),
        _ => None,
    };
    if serde_expected == "a boolean" {
        return "true or false".into();
    }
    if serde_expected == "a string" {
        return match (default.and_then(|d| d.as_str()), example_listen) {
            (Some(d), _) if !d.is_empty() => format!("a string like {d:?}"),
            (_, Some(e)) => format!("a string like {e:?}"),
            _ => "a string".into(),
        };
    }
    if let Some(kind) = ["u32", "u64", "usize", "i64"]
        .iter()
        .find(|k| serde_expected == **k)
    {
        let range = match *kind {
            "u32" => " from 0 to 4294967295",
            _ => " of 0 or more",
        };
        return match default.and_then(|d| d.as_integer()) {
            Some(d) => format!("a whole number{range}, like {d}"),
            None => format!("a whole number{range}"),
        };
    }
    if serde_expected.starts_with("struct ") {
        let example = default
            .and_then(|d| d.as_table())
            .and_then(|t| t.keys().next().cloned())
            .or_else(|| example_listen.map(|_| "listen".to_string()))
            .or_else(|| (path == "metrics").then(|| "listen".to_string()));
        let section = match path.split_once('[') {
            Some((list, _)) => format!("[[{list}]]"),
            None => format!("[{path}]"),
        };
        return match (from_env, example) {
            (true, Some(k)) => format!(
                "a table (set each of its keys with its own variable, e.g. {ENV_PREFIX}{}__{})",
                path.to_ascii_uppercase().replace('.', "__"),
                k.to_ascii_uppercase()
            ),
            _ => format!("a table ({section} in the file)"),
        };
    }
    if serde_expected == "a sequence" {
        return match path {
            "tokens" => {
                "a list of tables, e.g. [{token_sha256 = \"<64 hex>\", role = \"admin\"}]".into()
            }
            "event_types" => {
                "a list of tables, e.g. [{name = \"BADGE_AWARDED\", mode = \"realtime\"}]".into()
            }
            _ => "a list, e.g. [1, 2]".into(),
        };
    }
    serde_expected.to_string()
}

/// The value at a dotted `path` (`delivery.retention_ms`) of `value`.
fn value_at<'a>(value: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(value, |v, part| v.get(part))
}

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The storage backend this configuration names.
    pub fn storage_backend(&self) -> crate::store::Backend {
        match self.storage.backend {
            StorageBackend::Sled => crate::store::Backend::Sled {
                dir: self.data_dir.clone(),
            },
            StorageBackend::Postgres => crate::store::Backend::Postgres {
                url: self.storage.postgres_url.clone(),
                pool_size: self.storage.postgres_pool_size as usize,
                lease_ttl: std::time::Duration::from_millis(self.storage.lease_ttl_ms),
            },
        }
    }

    /// Defaults, then `file` (if any), then the process environment.
    /// Warnings (see [`Loaded::warnings`]) are logged.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let loaded = Self::load_reporting(file, env)?;
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        Ok(loaded.config)
    }

    /// Like [`Config::load_with_env`], returning the warnings instead of
    /// logging them. Every error names the key (`section.key`), where its
    /// value came from (the file and line, or the environment variable)
    /// and what was expected.
    pub fn load_reporting(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigError> {
        let mut sources = Sources::default();
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
                sources.add_file(path, &text);
                table
            }
            None => toml::Table::new(),
        };
        let mut warnings = Vec::new();
        let mut vars = Vec::new();
        for (key, value) in env {
            if key.starts_with(ENV_PREFIX) {
                vars.push((key, value));
            } else if let Some(w) = misspelled_prefix_warning(&key) {
                warnings.push(w);
            }
        }
        vars.sort();
        warnings.sort();
        for (key, value) in vars {
            let path = apply_env_override(&mut table, &key, &value)?;
            sources.env.push((path, key));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().message().to_string();
                ConfigError(describe_load_error(&sources, &path, &message))
            })?;
        config
            .validate()
            .map_err(|e| ConfigError(sources.annotate(&e.0)))?;
        Ok(Loaded { config, warnings })
    }

    /// Parsed listen address (validated by [`Config::validate`]).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .parse()
            .expect("listen address validated at load")
    }

    /// Checks every value; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "listen",
                "must be an IP:port socket address, e.g. 127.0.0.1:50051",
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty");
        }
        let l = &self.limits;
        if l.max_webhooks_per_account == 0 {
            return bad("limits.max_webhooks_per_account", "must be at least 1");
        }
        if !(1..=100_000).contains(&l.max_events_per_request) {
            return bad("limits.max_events_per_request", "must be 1..=100000");
        }
        if !(64..=16 * 1024 * 1024).contains(&l.max_event_bytes) {
            return bad("limits.max_event_bytes", "must be 64..=16777216");
        }
        if !(1024..=1024 * 1024 * 1024).contains(&l.max_request_bytes) {
            return bad("limits.max_request_bytes", "must be 1024..=1073741824");
        }
        if u64::from(l.max_request_bytes) < u64::from(l.max_event_bytes) + 1024 {
            return bad(
                "limits.max_request_bytes",
                "must be at least limits.max_event_bytes + 1024, so one largest event fits",
            );
        }
        if l.max_concurrent_requests == 0 {
            return bad("limits.max_concurrent_requests", "must be at least 1");
        }
        if l.max_streams_per_token == 0 {
            return bad("limits.max_streams_per_token", "must be at least 1");
        }
        if l.max_streams_per_connection == 0 {
            return bad("limits.max_streams_per_connection", "must be at least 1");
        }
        if l.http2_keepalive_interval_ms > 0 && l.http2_keepalive_timeout_ms == 0 {
            return bad(
                "limits.http2_keepalive_timeout_ms",
                "must be greater than 0 while limits.http2_keepalive_interval_ms is set",
            );
        }
        if self.tls.cert_path.as_os_str().is_empty() != self.tls.key_path.as_os_str().is_empty() {
            return bad("tls", "set both cert_path and key_path, or neither");
        }
        let st = &self.storage;
        if st.backend == StorageBackend::Postgres {
            if st.postgres_url.is_empty() {
                return bad(
                    "storage.postgres_url",
                    "must be set with storage.backend = \"postgres\", e.g. \
                     postgres://router:password@127.0.0.1:5432/webhooks",
                );
            }
            match url::Url::parse(&st.postgres_url) {
                Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") && u.has_host() => {}
                _ => {
                    return bad(
                        "storage.postgres_url",
                        "must be a postgres://user:password@host:port/database URL",
                    )
                }
            }
        }
        if !(1..=1024).contains(&st.postgres_pool_size) {
            return bad("storage.postgres_pool_size", "must be 1..=1024");
        }
        if !(1_000..=600_000).contains(&st.lease_ttl_ms) {
            return bad("storage.lease_ttl_ms", "must be 1000..=600000");
        }
        if !self.storage.secret_key.is_empty() && self.storage.secret_key_bytes().is_none() {
            return bad(
                "storage.secret_key",
                "must be the standard base64 of exactly 32 bytes (e.g. `openssl rand -base64 32`)",
            );
        }
        let d = &self.delivery;
        if !(1..=10_000).contains(&d.max_events_per_payload) {
            return bad("delivery.max_events_per_payload", "must be 1..=10000");
        }
        for (key, value) in [
            ("delivery.batch_interval_ms", d.batch_interval_ms),
            ("delivery.log_flush_ms", d.log_flush_ms),
            ("delivery.connect_timeout_ms", d.connect_timeout_ms),
            ("delivery.request_timeout_ms", d.request_timeout_ms),
            ("delivery.retry_initial_ms", d.retry_initial_ms),
            ("delivery.retry_max_interval_ms", d.retry_max_interval_ms),
            ("delivery.retry_max_age_ms", d.retry_max_age_ms),
            ("delivery.breaker_open_ms", d.breaker_open_ms),
            ("delivery.retention_ms", d.retention_ms),
            (
                "delivery.dead_letter_retention_ms",
                d.dead_letter_retention_ms,
            ),
        ] {
            if value == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if d.rate_limit_per_second == 0 {
            return bad("delivery.rate_limit_per_second", "must be at least 1");
        }
        if d.breaker_failure_threshold > 1_000_000 {
            return bad(
                "delivery.breaker_failure_threshold",
                "must be 0 (off) to 1000000",
            );
        }
        if d.breaker_max_open_ms < d.breaker_open_ms {
            return bad(
                "delivery.breaker_max_open_ms",
                "must be at least delivery.breaker_open_ms",
            );
        }
        if d.retry_max_interval_ms < d.retry_initial_ms {
            return bad(
                "delivery.retry_max_interval_ms",
                "must be at least delivery.retry_initial_ms",
            );
        }
        for (i, t) in self.tokens.iter().enumerate() {
            match (&t.token, &t.token_sha256) {
                (Some(tok), None) if tok.len() >= 16 => {}
                (Some(_), None) => {
                    return bad(
                        &format!("tokens[{i}].token"),
                        "must be at least 16 characters",
                    )
                }
                (None, Some(h)) if h.len() == 64 && hex::decode(h).is_ok() => {}
                (None, Some(_)) => {
                    return bad(
                        &format!("tokens[{i}].token_sha256"),
                        "must be 64 hex characters (a SHA-256)",
                    )
                }
                _ => {
                    return bad(
                        &format!("tokens[{i}]"),
                        "set exactly one of `token` and `token_sha256`",
                    )
                }
            }
        }
        if let Some(addr) = &self.metrics.listen {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(
                    "metrics.listen",
                    "must be an IP:port socket address, e.g. 127.0.0.1:9090",
                );
            }
        }
        if let Some(addr) = &self.console.listen {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(
                    "console.listen",
                    "must be an IP:port socket address, e.g. 127.0.0.1:8080",
                );
            }
            if self.console.tls == Some(true) && !self.tls.enabled() {
                return bad(
                    "console.tls",
                    "needs tls.cert_path and tls.key_path (the console uses the same certificate)",
                );
            }
        }
        if !(60_000..=7 * 24 * 3600 * 1000).contains(&self.console.session_idle_timeout_ms) {
            return bad(
                "console.session_idle_timeout_ms",
                "must be 60000..=604800000 (1 minute to 7 days)",
            );
        }
        if self.console.max_sessions == 0 {
            return bad("console.max_sessions", "must be at least 1");
        }
        let t = &self.telemetry;
        if let Some(endpoint) = &t.otlp_endpoint {
            match url::Url::parse(endpoint) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.has_host()
                        && u.query().is_none()
                        && u.fragment().is_none() => {}
                _ => {
                    return bad(
                        "telemetry.otlp_endpoint",
                        "must be the http:// or https:// base URL of an OTLP/HTTP collector, \
                         e.g. http://127.0.0.1:4318 (spans go to its /v1/traces)",
                    )
                }
            }
        }
        if t.service_name.trim().is_empty() || t.service_name.len() > 255 {
            return bad("telemetry.service_name", "must be 1-255 characters");
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return bad(
                "telemetry.sample_ratio",
                "must be from 0.0 to 1.0 (1.0 keeps every trace)",
            );
        }
        self.validate_operational()?;
        let mut names = HashSet::new();
        for (i, e) in self.event_types.iter().enumerate() {
            let ok = !e.name.is_empty()
                && e.name.len() <= 64
                && e.name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return bad(
                    &format!("event_types[{i}].name"),
                    "must be 1-64 characters of A-Z, 0-9 and _",
                );
            }
            if crate::domain::catalog::builtin_mode(&e.name).is_some() || !names.insert(&e.name) {
                return bad(
                    &format!("event_types[{i}].name"),
                    &format!("{} is already in the catalog", e.name),
                );
            }
        }
        Ok(())
    }

    /// Checks `[operational]`: a target URL as for webhooks, and with it a
    /// `whsec_` secret.
    fn validate_operational(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        let o = &self.operational;
        const SECRET_FORM: &str = "whsec_ followed by the standard base64 of 24 to 64 random \
             bytes (e.g. `echo whsec_$(openssl rand -base64 32)`)";
        if !o.secret.is_empty() {
            let key = o
                .secret
                .strip_prefix(crate::domain::webhook::SECRET_PREFIX)
                .map(crate::delivery::signing::decode_secret);
            match key {
                Some(Ok(k)) if (24..=64).contains(&k.len()) => {}
                _ => return bad("operational.secret", &format!("must be {SECRET_FORM}")),
            }
        }
        if o.target_url.is_empty() {
            return Ok(());
        }
        if o.target_url.len() > crate::domain::webhook::MAX_URL_BYTES {
            return bad("operational.target_url", "must be at most 2048 bytes");
        }
        if let Err(why) = crate::delivery::guard::check_target_url(
            o.target_url.trim(),
            self.delivery.allow_private_targets,
        ) {
            return bad("operational.target_url", &why);
        }
        if o.secret.is_empty() {
            return bad(
                "operational.secret",
                &format!("must be set when operational.target_url is set: {SECRET_FORM}"),
            );
        }
        Ok(())
    }

    /// The effective config as TOML with secrets masked, which loads again
    /// as a config: a token is shown as its `token_sha256` (what the
    /// config may hold instead of the token), a URL's password as the mask,
    /// and any other value whose key names a secret (see [`is_secret_key`])
    /// as the mask, so sections added later are masked without a change
    /// here. Keys that are not set (an empty `storage.secret_key`, TLS
    /// paths, `storage.postgres_url`, the `[operational]` keys) are left
    /// out, named in a comment.
    /// A set `storage.secret_key` is left out too, commented: no mask
    /// would load as a key.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for t in &mut masked.tokens {
            if let Some(token) = t.token.take() {
                t.token_sha256 = Some(crate::api::auth::token_sha256_hex(&token));
            }
        }
        let mut value = match toml::Value::try_from(&masked) {
            Ok(v) => v,
            Err(e) => return format!("# cannot render the config: {e}\n"),
        };
        let mut notes = Vec::new();
        // Unset keys: absent, not `""` (which reads as a value).
        for (section, key) in [
            ("storage", "secret_key"),
            ("storage", "postgres_url"),
            ("tls", "cert_path"),
            ("tls", "key_path"),
            ("operational", "target_url"),
            ("operational", "secret"),
        ] {
            let Some(table) = value.get_mut(section).and_then(|s| s.as_table_mut()) else {
                continue;
            };
            match table.get(key).and_then(|v| v.as_str()) {
                Some("") => {
                    table.remove(key);
                    notes.push(format!("# {section}.{key}: not set"));
                }
                Some(_) if key == "secret_key" => {
                    table.remove(key);
                    notes.push(format!(
                        "# {section}.{key}: set; {key} = \"{MASK}\" (not printed, so this output \
                         loads as a config; it then stores secrets unencrypted)"
                    ));
                }
                _ => {}
            }
        }
        mask_secrets(&mut value, false);
        for (section, key) in [("storage", "postgres_url"), ("telemetry", "otlp_endpoint")] {
            if let Some(u) = value.get_mut(section).and_then(|s| s.get_mut(key)) {
                if let Some(text) = u.as_str() {
                    *u = toml::Value::String(mask_url_password(text));
                }
            }
        }
        let mut out = String::from("# The effective configuration, secrets masked.\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&toml::to_string_pretty(&value).unwrap_or_default());
        out
    }
}

/// `url` with its password (if any) replaced by the mask; a value that is
/// not a URL is masked whole, since it may hold one.
pub fn mask_url_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some(MASK));
            }
            u.to_string()
        }
        Err(_) if url.is_empty() => String::new(),
        Err(_) => MASK.into(),
    }
}

/// What masked values are replaced with.
const MASK: &str = "********";

/// Whether a config key holds a secret: its last `_`-separated word is
/// `token`, `password`, `secret`, `key` or a plural of those
/// (`token_sha256` and `key_file` are not secrets: a hash and a path).
pub fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('_').next().unwrap_or(key).to_ascii_lowercase();
    matches!(
        last.as_str(),
        "token" | "tokens" | "password" | "passwords" | "secret" | "secrets" | "key" | "keys"
    )
}

/// Replaces every string (and every string in an array) under a secret key.
fn mask_secrets(value: &mut toml::Value, secret: bool) {
    match value {
        // An empty value is no secret: it means the key is not set.
        toml::Value::String(s) if secret && !s.is_empty() => *s = MASK.into(),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| mask_secrets(v, secret)),
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                // `tokens` is a list of tables whose `token` field is masked
                // by name; its other fields (role, account_ids) stay visible.
                let list_of_tables =
                    matches!(v, toml::Value::Array(a) if a.iter().all(|x| x.is_table()));
                let inner_secret = secret || (is_secret_key(k) && !list_of_tables);
                mask_secrets(v, inner_secret);
            }
        }
        _ => {}
    }
}

/// Sets `table[path]` from one `WEBHOOK_ROUTER__A__B=value` variable;
/// returns the key path it set (`a.b`).
fn apply_env_override(
    table: &mut toml::Table,
    key: &str,
    value: &str,
) -> Result<String, ConfigError> {
    let path: Vec<String> = key[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError(format!("{key}: empty key segment")));
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cursor = table;
    for part in parents {
        let entry = cursor
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError(format!("{key}: `{part}` is not a section")))?;
    }
    cursor.insert(last.clone(), parsed);
    Ok(path.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:50051");
        assert_eq!(c.limits.max_webhooks_per_account, 5);
        assert!(!c.delivery.allow_private_targets);
    }

    #[test]
    fn environment_overrides_typed_values() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("WEBHOOK_ROUTER__LISTEN", "0.0.0.0:9000"),
                ("WEBHOOK_ROUTER__DELIVERY__ALLOW_PRIVATE_TARGETS", "true"),
                ("WEBHOOK_ROUTER__LIMITS__MAX_WEBHOOKS_PER_ACCOUNT", "7"),
                (
                    "WEBHOOK_ROUTER__TOKENS",
                    r#"[{token = "0123456789abcdef", role = "admin", account_ids = [1]}]"#,
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert!(c.delivery.allow_private_targets);
        assert_eq!(c.limits.max_webhooks_per_account, 7);
        assert_eq!(c.tokens[0].account_ids, Some(vec![1]));
    }

    #[test]
    fn bad_values_name_the_key() {
        let e =
            Config::load_with_env(None, env(&[("WEBHOOK_ROUTER__LISTEN", "nope")])).unwrap_err();
        assert!(
            e.0.starts_with("listen (from WEBHOOK_ROUTER__LISTEN): must be"),
            "{e}"
        );
        let e = Config::load_with_env(None, env(&[("WEBHOOK_ROUTER__LISTN", "x")])).unwrap_err();
        assert!(e.0.contains("listn"), "{e}");
        let e = Config::load_with_env(
            None,
            env(&[(
                "WEBHOOK_ROUTER__TOKENS",
                r#"[{token_sha256 = "zz", role = "admin"}]"#,
            )]),
        )
        .unwrap_err();
        assert!(e.0.contains("tokens[0].token_sha256"), "{e}");
        let e = Config::load_with_env(
            None,
            env(&[(
                "WEBHOOK_ROUTER__EVENT_TYPES",
                r#"[{name = "COURSE_ENROLLMENT", mode = "batch"}]"#,
            )]),
        )
        .unwrap_err();
        assert!(e.0.contains("already in the catalog"), "{e}");
    }

    #[test]
    fn security_keys_are_validated_and_masked() {
        let load = |pairs: &[(&str, &str)]| Config::load_with_env(None, env(pairs));
        let e = load(&[("WEBHOOK_ROUTER__STORAGE__SECRET_KEY", "c2hvcnQ=")]).unwrap_err();
        assert!(e.0.starts_with("storage.secret_key (from "), "{e}");
        let e = load(&[("WEBHOOK_ROUTER__TLS__CERT_PATH", "/x/cert.pem")]).unwrap_err();
        assert!(
            e.0.starts_with("tls (from WEBHOOK_ROUTER__TLS__CERT_PATH):"),
            "{e}"
        );
        let e = load(&[("WEBHOOK_ROUTER__LIMITS__MAX_REQUEST_BYTES", "2048")]).unwrap_err();
        assert!(e.0.starts_with("limits.max_request_bytes (from "), "{e}");
        let e = load(&[("WEBHOOK_ROUTER__LIMITS__MAX_CONCURRENT_REQUESTS", "0")]).unwrap_err();
        assert!(
            e.0.starts_with("limits.max_concurrent_requests (from "),
            "{e}"
        );
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let c = load(&[("WEBHOOK_ROUTER__STORAGE__SECRET_KEY", key)]).unwrap();
        assert_eq!(c.storage.secret_key_bytes().unwrap()[31], 31);
        let text = c.to_masked_toml();
        assert!(!text.contains(key), "{text}");
        assert!(
            text.contains("# storage.secret_key: set; secret_key = \"********\""),
            "{text}"
        );
    }

    #[test]
    fn masked_output_hides_tokens() {
        let c = Config::load_with_env(
            None,
            env(&[(
                "WEBHOOK_ROUTER__TOKENS",
                r#"[{token = "supersecrettoken1", role = "ingest"}]"#,
            )]),
        )
        .unwrap();
        let text = c.to_masked_toml();
        assert!(!text.contains("supersecrettoken1"));
        // Shown as its hash, which the config may hold instead.
        assert!(
            text.contains(&crate::api::auth::token_sha256_hex("supersecrettoken1")),
            "{text}"
        );
    }

    #[test]
    fn secret_keys_are_masked_wherever_they_are() {
        assert!(is_secret_key("token") && is_secret_key("password"));
        assert!(is_secret_key("encryption_key") && is_secret_key("keys"));
        assert!(!is_secret_key("token_sha256") && !is_secret_key("key_file"));
        let mut v: toml::Value = r#"
            listen = "x"
            [tls]
            key_file = "/etc/key.pem"
            client_secret = "s1"
            [encryption]
            keys = ["k1", "k2"]
            [secrets]
            nested = { value = "s2" }
        "#
        .parse::<toml::Table>()
        .map(toml::Value::Table)
        .unwrap();
        mask_secrets(&mut v, false);
        let text = v.to_string();
        for secret in ["s1", "k1", "k2", "s2"] {
            assert!(!text.contains(&format!("\"{secret}\"")), "{text}");
        }
        assert!(text.contains("/etc/key.pem") && text.contains("listen = \"x\""));
    }

    #[test]
    fn storage_backend_keys_are_checked_and_the_url_password_masked() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_string()))
                .collect::<Vec<_>>()
        };
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Sled);
        assert_eq!(
            (c.storage.postgres_pool_size, c.storage.lease_ttl_ms),
            (16, 10_000)
        );
        let e = Config::load_with_env(None, env(&[("STORAGE__BACKEND", "postgres")])).unwrap_err();
        // Not set anywhere: no source to name.
        assert!(e.0.starts_with("storage.postgres_url: must be set"), "{e}");
        let e = Config::load_with_env(
            None,
            env(&[
                ("STORAGE__BACKEND", "postgres"),
                ("STORAGE__POSTGRES_URL", "mysql://h/db"),
            ]),
        )
        .unwrap_err();
        assert!(e.0.starts_with("storage.postgres_url (from "), "{e}");
        let e = Config::load_with_env(None, env(&[("STORAGE__BACKEND", "mongo")])).unwrap_err();
        assert!(e.0.contains("mongo"), "{e}");
        let e = Config::load_with_env(None, env(&[("STORAGE__LEASE_TTL_MS", "10")])).unwrap_err();
        assert!(e.0.starts_with("storage.lease_ttl_ms (from "), "{e}");
        let c = Config::load_with_env(
            None,
            env(&[
                ("STORAGE__BACKEND", "postgres"),
                (
                    "STORAGE__POSTGRES_URL",
                    "postgres://router:hunter2@127.0.0.1:5432/wh",
                ),
                ("STORAGE__POSTGRES_POOL_SIZE", "4"),
            ]),
        )
        .unwrap();
        assert_eq!(c.storage.postgres_pool_size, 4);
        let text = c.to_masked_toml();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("postgres://router:********@127.0.0.1:5432/wh"),
            "{text}"
        );
    }

    /// `text` as a config file in a new folder; returns (folder, path).
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn load_file(path: &Path, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_with_env(Some(path), env(pairs))
    }

    #[test]
    fn type_errors_name_the_key_its_source_and_the_expected_form() {
        let (_d, path) = file("listen = 50051\n");
        let e = load_file(&path, &[]).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "listen ({} line 1): expected a string like \"127.0.0.1:50051\", got integer 50051",
                path.display()
            )
        );
        let e = Config::load_with_env(
            None,
            env(&[("WEBHOOK_ROUTER__DELIVERY__ALLOW_PRIVATE_TARGETS", "yes")]),
        )
        .unwrap_err();
        assert_eq!(
            e.0,
            "delivery.allow_private_targets (from WEBHOOK_ROUTER__DELIVERY__ALLOW_PRIVATE_TARGETS): \
             expected true or false, got \"yes\""
        );
        let e = Config::load_with_env(None, env(&[("WEBHOOK_ROUTER__METRICS", "127.0.0.1:9090")]))
            .unwrap_err();
        assert!(
            e.0.starts_with("metrics (from WEBHOOK_ROUTER__METRICS): expected a table")
                && e.0.contains("WEBHOOK_ROUTER__METRICS__LISTEN")
                && e.0.ends_with("got \"127.0.0.1:9090\""),
            "{e}"
        );
        let (_d, path) = file("[limits]\nmax_webhooks_per_account = -1\n");
        let e = load_file(&path, &[]).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "limits.max_webhooks_per_account ({} line 2): expected a whole number \
                 from 0 to 4294967295, like 5, got integer -1",
                path.display()
            )
        );
        let e = Config::load_with_env(None, env(&[("WEBHOOK_ROUTER__STORAGE__BACKEND", "mongo")]))
            .unwrap_err();
        assert_eq!(
            e.0,
            "storage.backend (from WEBHOOK_ROUTER__STORAGE__BACKEND): \
             expected one of \"sled\", \"postgres\", got \"mongo\""
        );
        // The environment wins over the file, and is named as the source.
        let (_d, path) = file("listen = \"127.0.0.1:1\"\n");
        let e = load_file(&path, &[("WEBHOOK_ROUTER__LISTEN", "7")]).unwrap_err();
        assert!(
            e.0.starts_with("listen (from WEBHOOK_ROUTER__LISTEN): expected a string"),
            "{e}"
        );
    }

    #[test]
    fn telemetry_keys_are_validated_by_name() {
        let (_d, path) =
            file("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 0.25\n");
        let c = load_file(&path, &[]).unwrap();
        assert_eq!(
            c.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert_eq!(c.telemetry.service_name, "webhook-router");
        assert_eq!(c.telemetry.sample_ratio, 0.25);
        assert!(Config::default().telemetry.otlp_endpoint.is_none());
        for (text, key) in [
            (
                "otlp_endpoint = \"127.0.0.1:4318\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"grpc://127.0.0.1:4317\"",
                "telemetry.otlp_endpoint",
            ),
            ("sample_ratio = 1.5", "telemetry.sample_ratio"),
            ("sample_ratio = -0.1", "telemetry.sample_ratio"),
            ("service_name = \" \"", "telemetry.service_name"),
        ] {
            let (_d, path) = file(&format!("[telemetry]\n{text}\n"));
            let e = load_file(&path, &[]).unwrap_err();
            assert!(
                e.0.starts_with(&format!("{key} ({} line 2): ", path.display())),
                "{text}: {e}"
            );
        }
        // A password in the endpoint is masked by check-config.
        let (_d, path) =
            file("[telemetry]\notlp_endpoint = \"https://u:hunter2@otel.example:4318\"\n");
        let shown = load_file(&path, &[]).unwrap().to_masked_toml();
        assert!(
            !shown.contains("hunter2") && shown.contains("otel.example"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_section_and_line() {
        let text = "listen = \"127.0.0.1:50051\"\n\n[limits]\nmax_webhooks_per_account = 3\n\n\
                    [delivery]\nfoo = 1\n";
        let (_d, path) = file(text);
        let e = load_file(&path, &[]).unwrap_err();
        assert!(
            e.0.starts_with(&format!(
                "delivery.foo ({} line 7): unknown key; known keys in [delivery]: \
                 allow_private_targets, max_events_per_payload,",
                path.display()
            )),
            "{e}"
        );
        let e = Config::load_with_env(None, env(&[("WEBHOOK_ROUTER__LISTN", "x")])).unwrap_err();
        assert!(
            e.0.starts_with(
                "listn (from WEBHOOK_ROUTER__LISTN): unknown key; known top-level keys: listen,"
            ),
            "{e}"
        );
        let (_d, path) = file("[[tokens]]\ntoken = \"0123456789abcdef\"\nrle = \"admin\"\n");
        let e = load_file(&path, &[]).unwrap_err();
        assert!(
            e.0.starts_with(&format!(
                "tokens[0].rle ({} line 3): unknown key; known keys in [[tokens]]: \
                 token, token_sha256, role, account_ids",
                path.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn validation_errors_name_the_source() {
        let (_d, path) = file("[limits]\nmax_webhooks_per_account = 0\n");
        let e = load_file(&path, &[]).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "limits.max_webhooks_per_account ({} line 2): must be at least 1",
                path.display()
            )
        );
        let (_d, path) = file(
            "listen = \"127.0.0.1:1\"\n\n[[tokens]]\ntoken = \"0123456789abcdef\"\nrole = \"admin\"\n\n\
             [[tokens]]\ntoken_sha256 = \"zz\"\nrole = \"ingest\"\n",
        );
        let e = load_file(&path, &[]).unwrap_err();
        assert!(
            e.0.starts_with(&format!(
                "tokens[1].token_sha256 ({} line 8): must be 64 hex",
                path.display()
            )),
            "{e}"
        );
        // A default value has no source to name.
        let e = load_file(&path, &[("WEBHOOK_ROUTER__TOKENS", "[]")]);
        assert!(e.is_ok(), "{e:?}");
    }

    #[test]
    fn one_underscore_variables_get_a_warning() {
        let loaded = Config::load_reporting(
            None,
            env(&[
                ("WEBHOOK_ROUTER_LISTEN", "0.0.0.0:1"),
                ("WEBHOOK_ROUTER_REEXECS", "1"),
                ("WEBHOOK_ROUTER_TEST_PG", "x"),
                ("WEBHOOK_ROUTER__SHUTDOWN_GRACE_MS", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(
            loaded.warnings,
            vec![
                "environment variable WEBHOOK_ROUTER_LISTEN is not read: config variables \
                 start with WEBHOOK_ROUTER__ (two underscores), e.g. WEBHOOK_ROUTER__LISTEN"
                    .to_string()
            ]
        );
        assert_eq!(loaded.config.listen, "127.0.0.1:50051");
        assert_eq!(loaded.config.shutdown_grace_ms, 5);
    }

    #[test]
    fn masked_output_loads_again_and_shows_unset_keys_as_unset() {
        let c = Config::load_with_env(
            None,
            env(&[(
                "WEBHOOK_ROUTER__TOKENS",
                r#"[{token = "supersecrettoken1", role = "ingest"}]"#,
            )]),
        )
        .unwrap();
        let text = c.to_masked_toml();
        assert!(text.contains("# storage.secret_key: not set\n"), "{text}");
        assert!(text.contains("# tls.cert_path: not set\n"), "{text}");
        assert!(!text.contains("= \"\""), "no empty values: {text}");
        assert!(!text.contains("supersecrettoken1"), "{text}");
        let (_d, path) = file(&text);
        let again = load_file(&path, &[]).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(again.to_masked_toml(), text);
        assert_eq!(
            again.tokens[0].token_sha256.as_deref(),
            Some(crate::api::auth::token_sha256_hex("supersecrettoken1").as_str())
        );
    }
}
