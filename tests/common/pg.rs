//! The PostgreSQL the suite runs against: `WEBHOOK_ROUTER_TEST_PG` (which
//! `.ci/run` sets after starting a throwaway server, see `.ci/postgres.sh`).
//! Without it the PostgreSQL tests fail and say how to get one: they never
//! pass by skipping.

use std::process::Command;
use std::time::Duration;

/// The server's URL, or a panic saying how to start one.
pub fn server_url() -> String {
    std::env::var("WEBHOOK_ROUTER_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "WEBHOOK_ROUTER_TEST_PG is not set: these tests need a PostgreSQL server. \
             `bash .ci/run` starts a throwaway one; by hand: \
             `source .ci/postgres.sh && start_test_postgres`, or point \
             WEBHOOK_ROUTER_TEST_PG at a database of your own \
             (postgres://user:password@127.0.0.1:5432/db, a role allowed to CREATE DATABASE)"
        )
    })
}

/// Tests share one server; one that restarts it holds this exclusively
/// (see [`TestDb::create_exclusive`]), the others shared.
static SERVER: std::sync::OnceLock<std::sync::Arc<tokio::sync::RwLock<()>>> =
    std::sync::OnceLock::new();

fn server_lock() -> std::sync::Arc<tokio::sync::RwLock<()>> {
    SERVER.get_or_init(Default::default).clone()
}

/// What a test holds of the server: a share, or all of it.
#[allow(dead_code)]
enum Hold {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    /// `postgres://…/<name>`
    pub url: String,
    name: String,
    admin_url: String,
    _hold: Hold,
}

impl TestDb {
    /// Creates `wr_<random>` on the test server, sharing the server with
    /// other tests.
    pub async fn create() -> TestDb {
        let hold = Hold::Shared(server_lock().read_owned().await);
        Self::create_holding(hold).await
    }

    /// Like [`TestDb::create`], with the server to itself until dropped:
    /// for a test that restarts it ([`restart_server_immediately`]).
    pub async fn create_exclusive() -> TestDb {
        let hold = Hold::Exclusive(server_lock().write_owned().await);
        Self::create_holding(hold).await
    }

    async fn create_holding(hold: Hold) -> TestDb {
        let admin_url = server_url();
        let name = format!("wr_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to WEBHOOK_ROUTER_TEST_PG: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let mut url = url::Url::parse(&admin_url).expect("WEBHOOK_ROUTER_TEST_PG is a URL");
        url.set_path(&name);
        TestDb {
            url: url.to_string(),
            name,
            admin_url,
            _hold: hold,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort, on a thread of its own (Drop may run inside a runtime).
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Runs `pg_ctl <action> …` on the test server as `.ci/postgres.sh`
/// describes (its owner, its data folder, options and log); returns how long
/// it took. Only from a test holding a [`TestDb::create_exclusive`] database.
fn pg_ctl(action: &[&str]) -> Duration {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: controlling PostgreSQL needs the server .ci/postgres.sh starts")
        })
    };
    let (ctl, data, opts, log) = (
        var("WEBHOOK_ROUTER_TEST_PG_CTL"),
        var("WEBHOOK_ROUTER_TEST_PG_DATA"),
        var("WEBHOOK_ROUTER_TEST_PG_OPTS"),
        var("WEBHOOK_ROUTER_TEST_PG_LOG"),
    );
    let user = std::env::var("WEBHOOK_ROUTER_TEST_PG_USER").unwrap_or_default();
    let mut cmd = if user.is_empty() {
        Command::new(&ctl)
    } else {
        let mut c = Command::new("runuser");
        c.args(["-u", &user, "--", &ctl]);
        c
    };
    cmd.args(action)
        .args(["-D", &data, "-w", "-t", "60"])
        .args(["-l", &log, "-o", &opts]);
    let started = std::time::Instant::now();
    let out = cmd.output().expect("run pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl {action:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Restarts the test server at once (`pg_ctl restart -m immediate`: no
/// checkpoint, crash recovery at start).
pub fn restart_server_immediately() -> Duration {
    pg_ctl(&["restart", "-m", "immediate"])
}

/// Stops the test server (`-m immediate`, as a crash would).
pub fn stop_server() -> Duration {
    pg_ctl(&["stop", "-m", "immediate"])
}

/// Starts the test server again after [`stop_server`].
pub fn start_server() -> Duration {
    pg_ctl(&["start"])
}
