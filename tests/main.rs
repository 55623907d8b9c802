//! The integration tests: one module per capability, all in one test binary
//! (one build and one link instead of one per file). Each starts what it
//! needs for real: a router on port 0 in-process or the real binary, real
//! sled folders, real HTTP listeners on loopback. `cargo test --test
//! integration <module>::` runs one module, e.g. `crash::`.

mod common;

mod admin;
mod auth;
mod auth_matrix;
mod catalog_changes;
mod cli;
mod cluster;
mod concurrency;
mod conformance;
mod console;
mod cpu_cost;
mod crash;
mod delivery;
mod encryption;
mod faults;
mod filters;
mod fuzz_validation;
mod grpcurl;
mod health;
mod hostile;
mod ingest;
mod limits;
mod metrics;
mod operational;
mod power_loss;
mod races;
mod recovery;
mod restart;
mod retention;
mod retry;
mod secrets_hygiene;
mod shutdown;
mod signatures;
mod storage;
mod streams;
mod telemetry;
mod tls;
mod transfer;
