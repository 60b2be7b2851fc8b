//! Redis servers a test starts for itself (`redis-server` on free loopback ports, in a temp
//! dir of their own), killed when their guard drops — even when the test fails. Used by the
//! `rediss://` and `sentinel://` tests, which need servers configured their own way and must
//! not touch the shared Redis on 6379.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer after it is started.
const START_LIMIT: Duration = Duration::from_secs(10);

/// True if `redis-server` can be run. Otherwise a visible SKIP line, or a panic under
/// `KELP_REQUIRE_BROKERS=1` (CI), as `common::server_up` does for the shared brokers.
pub fn redis_server_available(test: &str) -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1") {
        panic!("{test}: no redis-server binary and KELP_REQUIRE_BROKERS=1");
    }
    // Straight to the process's stderr: the harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: no redis-server binary on PATH (install redis-server to run it)"
    );
    false
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

static N: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    /// A new empty directory whose name has `tag`, the process id and a counter.
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "kelp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write `contents` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nothing listens on right now (the OS's pick).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `redis-server`; killed (and reaped) on drop.
#[derive(Debug)]
pub struct RedisProc {
    child: Child,
    /// The port it serves on (the TLS port for a TLS-only server).
    pub port: u16,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    name: String,
}

impl RedisProc {
    /// Start `redis-server` with `args(port)` on a free port in `dir` (log `<name>.log`), and
    /// wait until `probe(port)` reaches *this* process (`INFO server`'s `process_id`, so a port
    /// taken meanwhile by someone else is noticed). Tries three ports before giving up.
    pub async fn start(
        name: &str,
        dir: &Path,
        args: impl Fn(u16) -> Vec<String>,
        probe: impl Fn(u16) -> redis::Client,
    ) -> RedisProc {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.join(format!("{name}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let err = out.try_clone().unwrap();
            let child = Command::new("redis-server")
                .args(args(port))
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn redis-server");
            let mut p = RedisProc {
                child,
                port,
                log,
                name: name.to_owned(),
            };
            match p.wait_ready(&probe(port)).await {
                Ok(()) => return p,
                Err(e) => last = format!("{e}\n--- {name} log ---\n{}", p.log_text()),
            }
        }
        panic!("{name}: redis-server did not come up: {last}");
    }

    async fn wait_ready(&mut self, probe: &redis::Client) -> Result<(), String> {
        let pid = self.child.id();
        let deadline = Instant::now() + START_LIMIT;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            match info_field(probe, "server", "process_id").await {
                Ok(Some(p)) if p == pid.to_string() => return Ok(()),
                Ok(other) => last = format!("port answered by another process ({other:?})"),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Err(format!("not answering within {START_LIMIT:?}: {last}"))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (up to `limit`) for the process to exit by itself.
    pub async fn wait_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} did not exit within {limit:?}", self.name);
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain client for `127.0.0.1:port`.
pub fn plain(port: u16) -> redis::Client {
    redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap()
}

/// A multiplexed connection through `client`, within a second.
pub async fn connection(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())
}

/// One `field:value` of `INFO section`.
pub async fn info_field(
    client: &redis::Client,
    section: &str,
    field: &str,
) -> Result<Option<String>, String> {
    let mut conn = connection(client).await?;
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(info.lines().find_map(|l| {
        l.trim()
            .strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::to_owned)
    }))
}

/// The arguments every test server gets: loopback only, no persistence, files in `dir`.
pub fn base_args() -> Vec<String> {
    ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}
