//! The gRPC services: validate, authorize, call the store and the delivery
//! engine, convert.

pub mod admin;
pub mod auth;
pub mod conn;
pub mod convert;
pub mod filter;
pub mod health;
pub mod ingest;
pub mod layers;
pub mod recovery;

use std::sync::Arc;

use crate::config::Config;
use crate::delivery::Dispatcher;
use crate::domain::catalog::Catalog;
use crate::store::Store;

/// What every handler needs.
#[derive(Clone)]
pub struct AppState {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Event catalog in force.
    pub catalog: Arc<Catalog>,
    /// Persistence.
    pub store: Store,
    /// Delivery engine.
    pub dispatcher: Dispatcher,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}
