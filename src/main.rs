//! The `webhook-router` binary: parses the command line, loads the config,
//! sets up logging and signals, then hands over to [`webhook_router::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use webhook_router::config::Config;

// sled allocates per key; mimalloc measured faster than the system allocator (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "webhook-router", version, about = "gRPC-native webhook router")]
struct Cli {
    /// Log JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// TOML config file; environment variables WEBHOOK_ROUTER__* override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the config as `serve` would before listening (values,
    /// listen addresses, storage key, TLS files) and print the effective
    /// values, secrets masked; the output loads again as a config. It does
    /// not connect to PostgreSQL nor open the sled folder in data_dir.
    CheckConfig {
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write every webhook of the configured store, with its secrets, to a
    /// file (JSON lines, mode 0600), e.g. to move them to PostgreSQL. Run it
    /// while no router uses a sled folder (it locks it).
    Export {
        /// TOML config file naming the store to read.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The file to write (created, or replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Create the webhooks of an export in the configured store, under
    /// their ids and with their secrets; webhooks it already has are kept.
    Import {
        /// TOML config file naming the store to write.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The file `export` wrote.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    webhook_router::telemetry::init(cli.log_json);
    match cli.command {
        Command::CheckConfig { config } => {
            let loaded = match Config::load_reporting(config.as_deref(), std::env::vars()) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            // The same checks, and messages, as `serve` before it listens.
            if let Err(e) = webhook_router::server::check_startup(&loaded.config) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            print!("{}", loaded.config.to_masked_toml());
            ExitCode::SUCCESS
        }
        Command::Export { config, out } => tool(config, |config| async move {
            let store = webhook_router::store::open_for_tools(&config).await?;
            let file =
                private_file(&out).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let n = webhook_router::transfer::export(&store, &mut writer).await?;
            store.close().await?;
            println!("exported {n} webhooks to {}", out.display());
            Ok(())
        }),
        Command::Import { config, input } => tool(config, |config| async move {
            let store = webhook_router::store::open_for_tools(&config).await?;
            let file = std::fs::File::open(&input)
                .map_err(|e| format!("cannot read {}: {e}", input.display()))?;
            let limit = config.limits.max_webhooks_per_account;
            let r = webhook_router::transfer::import(&store, std::io::BufReader::new(file), limit)
                .await?;
            store.close().await?;
            println!(
                "imported {} webhooks from {}; {} were there already",
                r.created,
                input.display(),
                r.existing
            );
            Ok(())
        }),
        Command::Serve { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config))
        }
    }
}

/// Runs a one-shot command `f` on the loaded config: exit 0, 1 on failure
/// (the message printed), 2 for a bad config.
fn tool<F, Fut>(config: Option<PathBuf>, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<(), ToolError>>,
{
    let config = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.0);
            ExitCode::FAILURE
        }
    }
}

/// A one-shot command's failure, in words.
struct ToolError(String);

impl From<webhook_router::error::Error> for ToolError {
    fn from(e: webhook_router::error::Error) -> Self {
        ToolError(e.to_string())
    }
}

impl From<String> for ToolError {
    fn from(e: String) -> Self {
        ToolError(e)
    }
}

/// Creates (or truncates) `path` readable by its owner only.
fn private_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path)?;
    // An existing file keeps its mode on open: narrow it too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

async fn serve(config: Config) -> ExitCode {
    let addr = config.listen_addr();
    let (signalled_tx, signalled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(true);
    });
    // In-process restarts after a storage failure; back off if they repeat.
    let mut quick_restarts = 0u32;
    // True once this image stopped to reopen a failed store.
    let mut reopening = false;
    // When this process image started (a re-execution counts as new).
    let image_started = std::time::Instant::now();
    loop {
        let started = std::time::Instant::now();
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut signal = signalled.clone();
        let shutdown = async move {
            let _ = signal.wait_for(|s| *s).await;
        };
        match webhook_router::run(config.clone(), listener, shutdown).await {
            // Stopped without a signal: the store had failed and the disk
            // takes writes again; start over on a freshly opened store.
            Ok(()) if !*signalled.borrow() => {
                reopening = true;
                if started.elapsed() < std::time::Duration::from_secs(60) {
                    quick_restarts = (quick_restarts + 1).min(8);
                } else {
                    quick_restarts = 0;
                }
                let pause = std::time::Duration::from_millis(100 << quick_restarts);
                tracing::info!(?pause, "starting again after a storage failure");
                let mut signal = signalled.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = signal.wait_for(|s| *s) => return ExitCode::SUCCESS,
                }
            }
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) if reopening => {
                // The old database is still held in this process: a
                // connection outlived the grace period, or sled left a flush
                // waiting forever after the I/O error. A fresh process image
                // can open it: re-execute this binary (same pid, arguments and
                // environment; exec closes the database's files).
                // Count re-executions in a row: one after an image that ran
                // for a while starts the count again.
                let reexecs: u32 = if image_started.elapsed() < std::time::Duration::from_secs(60) {
                    std::env::var(REEXEC_ENV)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                } else {
                    0
                };
                if reexecs < MAX_REEXECS {
                    tracing::warn!(
                        error = %e,
                        "could not reopen the store in-process; re-executing the router"
                    );
                    let err = reexec(reexecs + 1);
                    eprintln!("error: re-executing failed: {err}");
                }
                eprintln!(
                    "error: could not start again after a storage failure: {e}; \
                     exiting so the service can be restarted"
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

// Counts re-executions after storage failures (not a config variable: one `_`).
use webhook_router::config::REEXEC_ENV;
/// After this many re-executions in a row the process exits 1 instead.
const MAX_REEXECS: u32 = 3;

/// Replaces this process with a fresh run of the same binary; returns only on failure.
fn reexec(count: u32) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return e,
    };
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(REEXEC_ENV, count.to_string())
        .exec()
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
