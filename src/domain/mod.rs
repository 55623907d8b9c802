//! Domain types: what the router is about, free of protobuf and sled.

pub mod catalog;
pub mod delivery;
pub mod event;
pub mod filter;
pub mod health;
pub mod ids;
pub mod operational;
pub mod webhook;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
