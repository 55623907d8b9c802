//! webhook-router: takes events from internal services over gRPC and
//! delivers them, durably and in order, to the HTTP listeners customers
//! register.
//!
//! Module map:
//! - [`config`]: typed configuration (defaults, TOML file, environment), validated once.
//! - [`error`]: the one error type and its mapping to gRPC status codes.
//! - [`proto`]: generated protobuf/gRPC code and the reflection descriptor set.
//! - [`domain`]: webhooks, the event catalog, events, deliveries, ids; no I/O.
//! - [`store`]: the storage interfaces (event log, config, lanes, delivery log) and their
//!   backends: embedded sled, or PostgreSQL shared by several routers.
//! - [`api`]: the WebhookAdmin and EventIngest services and token authentication.
//! - [`delivery`]: lanes, the tower stack (retry, rate limit, auth, timeout), the per-webhook
//!   circuit breaker, the HTTP client,
//!   signatures and the destination guard.
//! - [`console`]: the web console: the WebhookAdmin screens in a browser, on their own listener.
//! - [`server`]: wiring: builds the services and serves them until shutdown.
//! - [`telemetry`]: logging setup.
//! - [`transfer`]: moving webhooks between stores (`export` / `import`).
//! - [`metrics`]: Prometheus metrics and the `/metrics` listener.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod console;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod transfer;

pub use server::run;
