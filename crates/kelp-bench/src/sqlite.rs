//! The `sqlite-publish` and `sqlite-consume` scenarios: kelp's embedded `sqlite://` transport,
//! on a fresh database file per run (`<temp dir>/kelp-bench-sqlite-…/bench.db`, the directory
//! removed afterwards; `$TMPDIR` moves it).
//!
//! - publish: `count` raw 100-byte bodies with a Producer to the default exchange of a fresh
//!   queue, [`WINDOW`] publishes in flight on one connection (the headline: the transport's
//!   writer thread commits consecutive publishes in one transaction, a group commit), and
//!   again one at a time (each awaits its own commit); timed until the last publish returned,
//!   when every message is committed;
//! - consume: prefill (untimed, [`WINDOW`] in flight), then a Consumer with prefetch
//!   [`PREFETCH`] acks each message before taking the next; timed from building the Consumer
//!   to the last ack.
//!
//! The transport opens the file in WAL mode with `synchronous=NORMAL` (a commit survives a
//! process crash; a power loss or OS crash can lose the last commits, as WAL is synced at
//! checkpoints, not at each commit). CPU is the whole process's (`getrusage`), which
//! includes the transport's SQLite writer thread.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kelp::{Connection, Producer, Queue};

use crate::common::{
    ack_each, expect_body_bytes, expect_size, publish_all, queue_consumer, repeat_runs, verdict,
};
use crate::report::{format_line, Measurement, Timer};
use crate::{fresh_queue_name, BenchResult, MSG_SIZE};

/// Consumer prefetch.
pub const PREFETCH: u16 = 100;
/// Publishes in flight in the batched publish (and the prefill).
pub const WINDOW: usize = 64;
/// Goal for the batched publish, msg/s.
const PUBLISH_GOAL: f64 = 20_000.0;
/// Goal for consume + ack, msg/s.
const CONSUME_GOAL: f64 = 10_000.0;
/// The durability the transport sets (`store::open`); said in every result line.
pub const FSYNC_MODE: &str = "WAL, synchronous=NORMAL";

/// Which half of the work a scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Publish,
    Consume,
}

impl Phase {
    pub fn scenario(self) -> &'static str {
        match self {
            Self::Publish => "sqlite-publish",
            Self::Consume => "sqlite-consume",
        }
    }
}

/// A fresh directory for one run's database, removed (with the database, its WAL and shared
/// memory files) on drop.
#[derive(Debug)]
struct TempDb {
    dir: PathBuf,
}

impl TempDb {
    fn new() -> BenchResult<Self> {
        let dir = std::env::temp_dir().join(fresh_queue_name("kelp", "sqlite"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("bench.db")
    }

    /// `sqlite:///<dir>/bench.db`.
    fn url(&self) -> String {
        format!("sqlite://{}", self.path().display())
    }

    /// Whether the database is in WAL mode (its `-wal` file is there while it is open).
    fn wal_seen(&self) -> bool {
        self.dir.join("bench.db-wal").exists()
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("kelp-bench: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// The file system `path` is on, from `/proc/mounts` (the longest mount point above it).
fn filesystem_of(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let path = std::fs::canonicalize(path).ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// What one run measured, and whether the database was seen in WAL mode.
#[derive(Debug)]
struct SqliteRun {
    m: Measurement,
    wal: bool,
}

/// Publish `count` bodies to a fresh queue in a fresh database, `window` in flight.
async fn publish(count: u64, window: usize) -> BenchResult<SqliteRun> {
    let db = TempDb::new()?;
    let conn = Connection::open(&db.url()).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp", "sqlite-publish");
    ch.declare_queue(Queue::new(queue.as_str())).await?;
    let producer = Producer::new(&ch).routing_key(queue.as_str());
    let timer = Timer::start()?;
    publish_all(&producer, count, window).await?;
    let m = timer.stop(count)?;
    let wal = db.wal_seen();
    expect_size(&ch, &queue, count).await?;
    conn.close().await?;
    Ok(SqliteRun { m, wal })
}

/// Prefill a fresh queue in a fresh database (untimed), then consume and ack every message
/// with prefetch [`PREFETCH`].
async fn consume(count: u64) -> BenchResult<SqliteRun> {
    let db = TempDb::new()?;
    let conn = Connection::open(&db.url()).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp", "sqlite-consume");
    ch.declare_queue(Queue::new(queue.as_str())).await?;
    let producer = Producer::new(&ch).routing_key(queue.as_str());
    publish_all(&producer, count, WINDOW).await?;
    expect_size(&ch, &queue, count).await?;
    let cch = conn.channel().await?;
    let timer = Timer::start()?;
    let mut consumer = queue_consumer(&cch, &queue, PREFETCH).await?;
    let bytes = ack_each(&mut consumer, count, "kelp sqlite").await?;
    let m = timer.stop(count)?;
    let wal = db.wal_seen();
    expect_body_bytes("kelp sqlite", bytes, count)?;
    consumer.cancel().await?;
    // The acks went to this connection's writer before this declare: all are written.
    expect_size(&ch, &queue, 0).await?;
    conn.close().await?;
    Ok(SqliteRun { m, wal })
}

/// Best (highest msg/s) of `repeat` runs; WAL seen in all of them.
fn best<F, Fut>(
    rt: &tokio::runtime::Runtime,
    repeat: usize,
    timeout: Duration,
    f: F,
) -> BenchResult<SqliteRun>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = BenchResult<SqliteRun>>,
{
    let runs = repeat_runs(rt, repeat, timeout, f)?;
    let wal = runs.iter().all(|run| run.wal);
    let m = Measurement::best(runs.into_iter().map(|run| run.m).collect()).ok_or("no runs")?;
    Ok(SqliteRun { m, wal })
}

fn goal_note(m: &Measurement, goal: f64) -> String {
    format!(
        "(goal >= {goal:.0} msgs/s: {})",
        verdict(m.msgs_per_sec() >= goal)
    )
}

/// `<fsync mode>` and whether the WAL file was seen.
fn mode_note(run: &SqliteRun) -> String {
    let wal = if run.wal {
        "-wal file seen"
    } else {
        "NO -wal file seen"
    };
    format!("{FSYNC_MODE}; {wal}")
}

/// The `# sqlite-…` header: where the database goes and how it syncs.
pub fn header(phase: Phase, count: u64, repeat: usize) -> String {
    let tmp = std::env::temp_dir();
    let fs = filesystem_of(&tmp).unwrap_or_else(|| "?".into());
    format!(
        "# {}: {count} x {MSG_SIZE} B per run, best of {repeat}; sqlite://{}/kelp-bench-sqlite-…/\
         bench.db, a fresh file per run ({fs}); {FSYNC_MODE} (a commit survives a process crash, \
         not necessarily a power loss); cpu is this process's, SQLite writer thread included",
        phase.scenario(),
        tmp.display()
    )
}

/// `sqlite-publish` or `sqlite-consume`.
pub fn run(
    rt: &tokio::runtime::Runtime,
    phase: Phase,
    count: u64,
    repeat: usize,
    timeout: Duration,
) -> BenchResult<()> {
    let scenario = phase.scenario();
    let line = |who: &str, run: &SqliteRun, what: &str| {
        println!(
            "{}  {what}  [{}]",
            format_line(scenario, who, &run.m),
            mode_note(run)
        );
    };
    match phase {
        Phase::Publish => {
            let batched = best(rt, repeat, timeout, || publish(count, WINDOW))?;
            let seq = best(rt, repeat, timeout, || publish(count, 1))?;
            line(
                "kelp",
                &batched,
                &format!(
                    "Producer.publish, {WINDOW} in flight (group commit) {}",
                    goal_note(&batched.m, PUBLISH_GOAL)
                ),
            );
            line(
                "kelp-seq",
                &seq,
                "Producer.publish, one at a time (a commit each)",
            );
        }
        Phase::Consume => {
            let run = best(rt, repeat, timeout, || consume(count))?;
            line(
                "kelp",
                &run,
                &format!(
                    "Consumer, prefetch {PREFETCH}, each message acked before the next {}",
                    goal_note(&run.m, CONSUME_GOAL)
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> BenchResult<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    }

    /// Both runs on a real (temporary) file, with a small count; the directory goes.
    #[test]
    fn publish_and_consume_small() -> BenchResult<()> {
        let rt = rt()?;
        let p = rt.block_on(publish(300, WINDOW))?;
        assert_eq!(p.m.msgs, 300);
        assert!(p.wal, "no WAL file seen");
        let s = rt.block_on(publish(20, 1))?;
        assert_eq!(s.m.msgs, 20);
        let c = rt.block_on(consume(300))?;
        assert_eq!(c.m.msgs, 300);
        Ok(())
    }

    #[test]
    fn temp_db_is_fresh_and_removed() -> BenchResult<()> {
        let (a, b) = (TempDb::new()?, TempDb::new()?);
        assert_ne!(a.path(), b.path());
        assert!(a.url().starts_with("sqlite:///"), "{}", a.url());
        assert!(a.url().ends_with("/bench.db"));
        let dir = a.dir.clone();
        drop(a);
        assert!(!dir.exists());
        Ok(())
    }

    #[test]
    fn goal_and_fs() {
        let m = Measurement {
            msgs: 30_000,
            wall: Duration::from_secs(1),
            cpu: Duration::ZERO,
            latency: None,
        };
        assert_eq!(goal_note(&m, PUBLISH_GOAL), "(goal >= 20000 msgs/s: met)");
        assert_eq!(goal_note(&m, 40_000.0), "(goal >= 40000 msgs/s: NOT met)");
        if cfg!(target_os = "linux") {
            assert!(filesystem_of(Path::new("/")).is_some());
        }
    }
}
