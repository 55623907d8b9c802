//! Wiring: opens the store, resolves credentials, starts the delivery
//! engine and serves both gRPC services (plus reflection and health) on a
//! listener the caller bound, until the shutdown future resolves.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use rand::RngCore;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::api::admin::AdminService;
use crate::api::auth::{interceptor, token_sha256_hex, TokenTable};
use crate::api::ingest::IngestService;
use crate::api::layers::{DecodeErrorLayer, LoadShedLayer};
use crate::api::AppState;
use crate::config::{Config, Role, TokenConfig};
use crate::delivery::Dispatcher;
use crate::domain::catalog::Catalog;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::proto::v1::event_ingest_server::EventIngestServer;
use crate::proto::v1::webhook_admin_server::WebhookAdminServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::store::{self, ConfigStore, Store, StoreHealth};

/// Name of the file first-start credentials are written to, in `data_dir`.
pub const INITIAL_CREDENTIALS_FILE: &str = "initial-credentials.toml";

/// Runs the router on `listener` until `shutdown` resolves, then drains:
/// the server stops accepting, lanes finish or requeue within
/// `shutdown_grace_ms`, and the store is flushed. When `metrics.listen` is
/// set, `/metrics` is served there too.
///
/// It also returns `Ok(())` before `shutdown` resolves in one case: the store
/// failed (see [`Store::failure`]) and `data_dir` takes writes again. sled
/// cannot resume writing in-process, so the router drains the same way and
/// returns, for the caller to run it again on a freshly opened store (the
/// binary does; see `main.rs`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics_listener = match &config.metrics.listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Error::Unavailable(format!("cannot listen on {addr} (metrics.listen): {e}"))
        })?),
        None => None,
    };
    run_with_metrics_listener(config, listener, metrics_listener, shutdown).await
}

/// Like [`run`], serving `/metrics` on `metrics_listener` when given (the
/// caller binds it, e.g. on port 0 in tests) instead of `metrics.listen`.
pub async fn run_with_metrics_listener(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = Arc::new(config);
    let tls = check_startup(&config)?;
    let store = store::open(&config.storage_backend(), config.storage.secret_key_bytes()).await?;
    let tokens = Arc::new(
        TokenTable::new(&resolve_tokens(&config, &store).await?)
            .with_rate_limit(
                config.limits.requests_per_second_per_token,
                config.limits.request_burst_per_token,
            )
            .with_stream_limit(config.limits.max_streams_per_token),
    );
    let max_message_bytes = config.limits.max_request_bytes as usize;
    let catalog = Arc::new(Catalog::new(&config.event_types));
    let metrics = Arc::new(Metrics::new(Some(store.clone())));
    let dispatcher = Dispatcher::start_with_metrics(
        store.clone(),
        config.clone(),
        catalog.clone(),
        metrics.clone(),
    )
    .await?;
    let state = AppState {
        config: config.clone(),
        catalog,
        store: store.clone(),
        dispatcher: dispatcher.clone(),
        metrics: metrics.clone(),
    };

    let console = match &config.console.listen {
        Some(addr) => {
            let acceptor = crate::console::tls_acceptor(&config)?;
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                Error::Unavailable(format!("cannot listen on {addr} (console.listen): {e}"))
            })?;
            let api = crate::console::api::AdminApi::new(
                AdminService::new(state.clone()),
                tokens.clone(),
            );
            Some((
                Arc::new(crate::console::Console::new(api, &config)),
                listener,
                acceptor,
            ))
        }
        None => None,
    };
    let admin = InterceptedService::new(
        WebhookAdminServer::new(AdminService::new(state.clone()))
            .max_decoding_message_size(max_message_bytes),
        interceptor(tokens.clone(), Role::Admin),
    );
    let ingest = InterceptedService::new(
        EventIngestServer::new(IngestService::new(state))
            .max_decoding_message_size(max_message_bytes),
        interceptor(tokens, Role::Ingest),
    );
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<WebhookAdminServer<AdminService>>()
        .await;
    health
        .set_serving::<EventIngestServer<IngestService>>()
        .await;

    // A store that cannot take writes (see StoreHealth::failure) turns health
    // to NOT_SERVING, and back to SERVING once it takes them again (a
    // database back after an outage; sled instead restarts the service, see
    // stop_when_recoverable).
    {
        let health = health.clone();
        let mut failure = store.watch_failure();
        tokio::spawn(async move {
            use tonic_health::ServingStatus::{NotServing, Serving};
            loop {
                let status = if failure.borrow_and_update().is_some() {
                    NotServing
                } else {
                    Serving
                };
                health.set_service_status("", status).await;
                health
                    .set_service_status(
                        <WebhookAdminServer<AdminService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                health
                    .set_service_status(
                        <EventIngestServer<IngestService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                if failure.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), tls = tls.is_some(), "webhook-router serving");
    // The signal stops accepting at once; connections still open (watch
    // streams, idle clients) get shutdown_grace_ms to finish, then are dropped.
    let (signal_tx, mut signal_rx) = tokio::sync::watch::channel(false);
    let reopen_requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(stop_when_recoverable(
        store.recoverable(),
        signal_tx.clone(),
        reopen_requested.clone(),
    ));
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal_tx.send(true);
    });
    let mut graceful = signal_rx.clone();
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(metrics, l, signal_rx.clone()));
    }
    if let Some((console, listener, acceptor)) = console {
        tokio::spawn(crate::console::serve(
            console,
            listener,
            acceptor,
            signal_rx.clone(),
        ));
    }
    let limits = &config.limits;
    let keepalive = (limits.http2_keepalive_interval_ms > 0)
        .then(|| std::time::Duration::from_millis(limits.http2_keepalive_interval_ms));
    let idle_timeout = (limits.connection_idle_timeout_ms > 0)
        .then(|| std::time::Duration::from_millis(limits.connection_idle_timeout_ms));
    let mut builder = Server::builder()
        // Pings find peers that vanished without closing their connection.
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(std::time::Duration::from_millis(
            limits.http2_keepalive_timeout_ms.max(1),
        )))
        .max_concurrent_streams(limits.max_streams_per_connection);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::Startup(format!("tls: {e}")))?;
    }
    let serve = builder
        // Shed first, before any work is spent on a request we cannot take;
        // then make decode failures of what we do take read as bad input.
        .layer(
            tower::ServiceBuilder::new()
                .layer(LoadShedLayer::new(
                    config.limits.max_concurrent_requests as usize,
                ))
                .layer(DecodeErrorLayer),
        )
        .add_service(admin)
        .add_service(ingest)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(health_service)
        // TCP_NODELAY and the idle timeout: see api/conn.rs.
        .serve_with_incoming_shutdown(
            crate::api::conn::incoming(listener, idle_timeout),
            async move {
                let _ = graceful.wait_for(|s| *s).await;
            },
        );
    let grace = std::time::Duration::from_millis(config.shutdown_grace_ms);
    let served = tokio::select! {
        r = serve => r,
        _ = async {
            let _ = signal_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("connections still open after the grace period; closing them");
            Ok(())
        }
    };
    tracing::info!("gRPC server stopped; draining deliveries");
    dispatcher.shutdown().await;
    match store.close().await {
        Ok(()) => tracing::info!("store flushed; bye"),
        // The store failed earlier; what it acknowledged is on disk already.
        Err(e) if reopen_requested.load(std::sync::atomic::Ordering::SeqCst) => {
            tracing::info!(error = %e, "stopped to reopen the failed store")
        }
        Err(e) => return Err(e),
    }
    served.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

/// Configured tokens, or the ones created on first start. With none
/// configured the service never runs open: it creates an admin and an
/// ingest token, keeps their hashes in the store and writes the tokens to
/// `data_dir/initial-credentials.toml` (mode 0600) for the operator.
async fn resolve_tokens(config: &Config, store: &Store) -> Result<Vec<TokenConfig>> {
    if !config.tokens.is_empty() {
        return Ok(config.tokens.clone());
    }
    if let Some(saved) = store.bootstrap_tokens().await? {
        tracing::info!(
            "no tokens configured; using the credentials created on first start (see {})",
            INITIAL_CREDENTIALS_FILE
        );
        return Ok(saved);
    }
    let admin = new_token("wr_admin_");
    let ingest = new_token("wr_ingest_");
    let path = config.data_dir.join(INITIAL_CREDENTIALS_FILE);
    let text = format!(
        "# Created by webhook-router on first start because no [[tokens]] were configured.\n\
         # Send them as `authorization: Bearer <token>` metadata. Move them into your\n\
         # config (preferably as token_sha256) and delete this file.\n\n\
         [[tokens]]\ntoken = \"{admin}\"\nrole = \"admin\"\n\n\
         [[tokens]]\ntoken = \"{ingest}\"\nrole = \"ingest\"\n"
    );
    write_private(&path, &text)
        .map_err(|e| Error::Unavailable(format!("cannot write {}: {e}", path.display())))?;
    let hashed: Vec<TokenConfig> = [(admin, Role::Admin), (ingest, Role::Ingest)]
        .into_iter()
        .map(|(t, role)| TokenConfig {
            token: None,
            token_sha256: Some(token_sha256_hex(&t)),
            role,
            account_ids: None,
        })
        .collect();
    if let Some(stored) = store.set_bootstrap_tokens(&hashed).await? {
        // Another router sharing the store created them a moment earlier:
        // its data_dir has the file, ours would hold tokens nobody accepts.
        let _ = std::fs::remove_file(&path);
        tracing::info!(
            "no tokens configured; another router sharing the store created the first-start \
             credentials (see {INITIAL_CREDENTIALS_FILE} in its data_dir)"
        );
        return Ok(stored);
    }
    tracing::warn!(
        path = %path.display(),
        "no tokens configured: created an admin and an ingest token and wrote them to this file"
    );
    Ok(hashed)
}

fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    // The new directory entry too, or a power loss can take the file back.
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The checks of a start that need no store and no listener (the listen
/// addresses were checked by [`Config::load`]): the storage key decodes,
/// and the TLS files of `[tls]` can be read and parsed. [`run`] starts with
/// it and `check-config` runs it, so both refuse the same config with the
/// same message. Returns the TLS settings, if configured.
pub fn check_startup(config: &Config) -> Result<Option<ServerTlsConfig>> {
    if !config.storage.secret_key.is_empty() && config.storage.secret_key_bytes().is_none() {
        return Err(Error::Startup(
            "storage.secret_key: must be the standard base64 of exactly 32 bytes".into(),
        ));
    }
    let tls = load_tls(config)?;
    crate::console::tls_acceptor(config)?;
    Ok(tls)
}

/// The TLS settings of `[tls]`, if configured; unreadable files stop the start.
pub fn load_tls(config: &Config) -> Result<Option<ServerTlsConfig>> {
    if !config.tls.enabled() {
        return Ok(None);
    }
    let read = |key: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| Error::Startup(format!("tls.{key}: cannot read {}: {e}", path.display())))
    };
    let cert = read("cert_path", &config.tls.cert_path)?;
    let key = read("key_path", &config.tls.key_path)?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    // Parse the PEM now, before anything else starts.
    Server::builder()
        .tls_config(tls.clone())
        .map_err(|e| Error::Startup(format!("tls: {e}")))?;
    Ok(Some(tls))
}

/// Once the store has failed and can be opened afresh (see
/// [`StoreHealth::recoverable`]), asks [`run`] to stop (`stop`) so it can be
/// started on a new handle, and says so in `requested`.
async fn stop_when_recoverable(
    recoverable: futures::future::BoxFuture<'static, ()>,
    stop: tokio::sync::watch::Sender<bool>,
    requested: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut stopping = stop.subscribe();
    tokio::select! {
        _ = recoverable => {}
        _ = stopping.wait_for(|s| *s) => return,
    }
    tracing::warn!(
        "the store can be opened again; restarting the service on a freshly opened store"
    );
    requested.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = stop.send(true);
}
