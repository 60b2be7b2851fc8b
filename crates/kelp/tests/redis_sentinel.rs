//! `sentinel://` against a master, a replica and a sentinel each test starts on free ports:
//! the master the sentinel names gets the messages, passwords go to the right servers, a dead
//! first sentinel is skipped, and a robust connection follows a failover to the promoted
//! replica.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;
mod redis_procs;

use std::time::{Duration, Instant};

use kelp::recovery::{ReconnectPolicy, RecoveryEvent, RecoveryOptions};
use kelp::{Connection, Consumer, Error, Message, Producer, PublishOptions, Queue};
use redis_procs::{base_args, RedisProc, TempDir};

const MASTER: &str = "mymaster";
/// The master's (and replica's) password.
const MASTER_PW: &str = "master-pw";

/// A master, optionally a replica, and one sentinel monitoring them; all killed on drop
/// (fields drop in order: the sentinel first, the directory last).
struct Cluster {
    sentinel: RedisProc,
    replica: Option<RedisProc>,
    master: RedisProc,
    sentinel_password: Option<String>,
    _dir: TempDir,
}

fn client(port: u16, password: Option<&str>) -> redis::Client {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/0")).unwrap()
}

async fn query<T: redis::FromRedisValue>(client: &redis::Client, cmd: &redis::Cmd) -> T {
    let mut conn = redis_procs::connection(client).await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// Poll `check` every 50 ms until it is true, failing after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    async fn start(tag: &str, with_replica: bool, sentinel_password: Option<&str>) -> Cluster {
        let dir = TempDir::new(&format!("redis-sentinel-{tag}"));
        let server_args = |port: u16| {
            let mut a = base_args();
            a.extend(
                [
                    "--port",
                    &port.to_string(),
                    "--requirepass",
                    MASTER_PW,
                    "--masterauth",
                    MASTER_PW,
                    // Full syncs at once (the default waits 5 s for more replicas).
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                .map(str::to_owned),
            );
            a
        };
        let master = RedisProc::start("master", dir.path(), server_args, |p| {
            client(p, Some(MASTER_PW))
        })
        .await;
        let replica = if with_replica {
            let master_port = master.port.to_string();
            let replica = RedisProc::start(
                "replica",
                dir.path(),
                |port| {
                    let mut a = server_args(port);
                    a.extend(["--replicaof", "127.0.0.1", &master_port].map(str::to_owned));
                    a
                },
                |p| client(p, Some(MASTER_PW)),
            )
            .await;
            // In sync before the sentinel starts, so its first look at the master finds it.
            let c = client(replica.port, Some(MASTER_PW));
            eventually("replica in sync", Duration::from_secs(10), || async {
                redis_procs::info_field(&c, "replication", "master_link_status")
                    .await
                    .ok()
                    .flatten()
                    .as_deref()
                    == Some("up")
            })
            .await;
            Some(replica)
        } else {
            None
        };
        let conf_dir = dir.path().to_owned();
        let master_port = master.port;
        let spw = sentinel_password.map(str::to_owned);
        let sentinel = RedisProc::start(
            "sentinel",
            dir.path(),
            |port| {
                // The sentinel rewrites its configuration: a fresh, writable file per try.
                let mut conf = format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n\
                     sentinel auth-pass {MASTER} {MASTER_PW}\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 3000\n",
                    conf_dir.display()
                );
                if let Some(pw) = &spw {
                    conf.push_str(&format!("requirepass {pw}\n"));
                }
                let path = conf_dir.join("sentinel.conf");
                std::fs::write(&path, conf).unwrap();
                vec![path.display().to_string(), "--sentinel".to_owned()]
            },
            |p| client(p, sentinel_password),
        )
        .await;
        let cluster = Cluster {
            sentinel,
            replica,
            master,
            sentinel_password: sentinel_password.map(str::to_owned),
            _dir: dir,
        };
        if cluster.replica.is_some() {
            let s = cluster.sentinel_client();
            eventually(
                "the sentinel knows the replica",
                Duration::from_secs(15),
                || async {
                    let mut conn = match redis_procs::connection(&s).await {
                        Ok(c) => c,
                        Err(_) => return false,
                    };
                    let replicas: Vec<std::collections::HashMap<String, String>> =
                        redis::cmd("SENTINEL")
                            .arg("REPLICAS")
                            .arg(MASTER)
                            .query_async(&mut conn)
                            .await
                            .unwrap_or_default();
                    replicas.iter().any(|r| {
                        r.get("flags").is_some_and(|f| f == "slave")
                            && r.get("master-link-status").is_some_and(|s| s == "ok")
                    })
                },
            )
            .await;
        }
        cluster
    }

    fn sentinel_client(&self) -> redis::Client {
        client(self.sentinel.port, self.sentinel_password.as_deref())
    }

    /// The port the sentinel names for the master.
    async fn master_port_named(&self) -> Option<u16> {
        let mut conn = redis_procs::connection(&self.sentinel_client())
            .await
            .ok()?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query_async(&mut conn)
            .await
            .ok()?;
        addr.and_then(|(_, port)| port.parse().ok())
    }

    /// `sentinel://` for this cluster's sentinel.
    fn url(&self, db: u32) -> String {
        let spw = self
            .sentinel_password
            .as_deref()
            .map(|p| format!("&sentinel_password={p}"))
            .unwrap_or_default();
        format!(
            "sentinel://:{MASTER_PW}@127.0.0.1:{}/{db}?master_name={MASTER}{spw}",
            self.sentinel.port
        )
    }
}

async fn llen(port: u16, key: &str, db: u32) -> i64 {
    let c = redis::Client::open(format!("redis://:{MASTER_PW}@127.0.0.1:{port}/{db}")).unwrap();
    query(&c, redis::cmd("LLEN").arg(key)).await
}

async fn connect(url: &str) -> Result<Connection, Error> {
    common::within(
        "connect",
        Connection::builder()
            .url(url)
            .connect_timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
}

async fn publish(conn: &Connection, queue: &str, body: &str) {
    let ch = common::within("channel", conn.channel()).await.unwrap();
    common::within(
        "publish",
        Producer::new(&ch).publish(
            body.to_owned(),
            PublishOptions::default().routing_key(queue),
        ),
    )
    .await
    .unwrap();
}

async fn next(c: &mut Consumer, what: &str) -> Message {
    match common::within(what, c.next()).await {
        Some(Ok(m)) => m,
        other => panic!("{what}: expected a message, got {other:?}"),
    }
}

/// Declare `q`, publish one message to it, check it is in db `db` of the server on
/// `master_port`, consume and ack it.
async fn round_trip(conn: &Connection, master_port: u16, db: u32) {
    let ch = common::within("channel", conn.channel()).await.unwrap();
    let q = common::unique("sentinel");
    common::within("declare", ch.declare_queue(Queue::new(&q)))
        .await
        .unwrap();
    publish(conn, &q, "via the sentinel").await;
    assert_eq!(
        llen(master_port, &q, db).await,
        1,
        "the message is on the master"
    );
    let mut c = common::within(
        "consumer",
        Consumer::builder(&ch)
            .queue(Queue::new(&q).no_declare(true))
            .build(),
    )
    .await
    .unwrap();
    let mut m = next(&mut c, "delivery").await;
    assert_eq!(m.body().as_ref(), b"via the sentinel");
    common::within("ack", m.ack()).await.unwrap();
    assert_eq!(llen(master_port, &q, db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_consumes_through_the_master_the_sentinel_names() {
    if !redis_procs::redis_server_available("redis_sentinel::master") {
        return;
    }
    let cluster = Cluster::start("master", false, Some("sentinel-pw")).await;
    let conn = connect(&cluster.url(3)).await.unwrap();
    round_trip(&conn, cluster.master.port, 3).await;
    conn.close().await.unwrap();
    // The same master reached directly: redis:// still parses and connects as before.
    let direct = connect(&format!(
        "redis://:{MASTER_PW}@127.0.0.1:{}/3",
        cluster.master.port
    ))
    .await
    .unwrap();
    round_trip(&direct, cluster.master.port, 3).await;
    direct.close().await.unwrap();

    // The sentinel's own password is the sentinel_password option, not the URL's.
    let no_spw = format!(
        "sentinel://:{MASTER_PW}@127.0.0.1:{}/0?master_name={MASTER}",
        cluster.sentinel.port
    );
    let e = connect(&no_spw).await.unwrap_err();
    assert!(matches!(e, Error::Redis { .. }), "{e:?}");
    // The URL's password is the master's.
    let wrong_master_pw = format!(
        "sentinel://:nope@127.0.0.1:{}/0?master_name={MASTER}&sentinel_password=sentinel-pw",
        cluster.sentinel.port
    );
    let e = connect(&wrong_master_pw).await.unwrap_err();
    assert!(matches!(e, Error::Redis { .. }), "{e:?}");
    assert!(!e.to_string().contains("nope"), "{e}");

    // A master the sentinels do not know: a connection error (redis-py's MasterNotFoundError
    // is a ConnectionError too), so a robust connection keeps asking.
    let unknown = format!(
        "sentinel://127.0.0.1:{}/0?master_name=nosuchmaster&sentinel_password=sentinel-pw",
        cluster.sentinel.port
    );
    let e = connect(&unknown).await.unwrap_err();
    assert!(e.is_connection_error(), "{e:?}");
    assert!(e.to_string().contains("nosuchmaster"), "{e}");

    // No master_name: a URL error.
    let e = connect(&format!("sentinel://127.0.0.1:{}/0", cluster.sentinel.port))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Url { reason, .. } if reason.contains("master_name")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_sentinel_is_skipped() {
    if !redis_procs::redis_server_available("redis_sentinel::dead_first") {
        return;
    }
    let cluster = Cluster::start("dead-first", false, None).await;
    let dead = redis_procs::free_port();
    // Kombu's form: one connection over two sentinels, the password and database once.
    let url = format!(
        "sentinel://:{MASTER_PW}@127.0.0.1:{dead};sentinel://127.0.0.1:{}/0?master_name={MASTER}",
        cluster.sentinel.port
    );
    let conn = connect(&url).await.unwrap();
    round_trip(&conn, cluster.master.port, 0).await;
    conn.close().await.unwrap();

    // No sentinel answering: a connection error naming them, at once.
    let dead2 = redis_procs::free_port();
    let started = Instant::now();
    let e = connect(&format!(
        "sentinel://127.0.0.1:{dead};sentinel://127.0.0.1:{dead2}?master_name={MASTER}"
    ))
    .await
    .unwrap_err();
    assert!(e.is_connection_error(), "{e:?}");
    assert!(e.to_string().contains(&dead2.to_string()), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robust_connection_follows_a_failover_to_the_promoted_replica() {
    if !redis_procs::redis_server_available("redis_sentinel::failover") {
        return;
    }
    let mut cluster = Cluster::start("failover", true, None).await;
    let replica_port = cluster.replica.as_ref().unwrap().port;
    let conn = common::within(
        "robust connect",
        Connection::builder()
            .url(cluster.url(0))
            .connect_timeout(Duration::from_secs(3))
            .recovery(
                RecoveryOptions::default()
                    .reconnect(
                        ReconnectPolicy::default()
                            .interval_step(Duration::from_millis(100))
                            .interval_max(Duration::from_millis(300)),
                    )
                    .outage_timeout(Duration::from_secs(30)),
            )
            .connect(),
    )
    .await
    .unwrap();
    let mut events = conn.events();
    let ch = common::within("channel", conn.channel()).await.unwrap();
    let q = common::unique("failover");
    let idle = common::unique("failover-idle");
    for name in [&q, &idle] {
        common::within("declare", ch.declare_queue(Queue::new(name)))
            .await
            .unwrap();
    }
    let mut consumer = common::within(
        "consumer",
        Consumer::builder(&ch)
            .queue(Queue::new(&q).no_declare(true))
            .build(),
    )
    .await
    .unwrap();
    publish(&conn, &idle, "before").await;
    assert_eq!(llen(cluster.master.port, &idle, 0).await, 1);
    publish(&conn, &q, "before").await;
    let mut m = next(&mut consumer, "before the failover").await;
    assert_eq!(m.body().as_ref(), b"before");
    common::within("ack", m.ack()).await.unwrap();

    // The master goes away for good; the sentinel promotes the replica.
    let down = Instant::now();
    let _: redis::RedisResult<()> = {
        let mut c = redis_procs::connection(&client(cluster.master.port, Some(MASTER_PW)))
            .await
            .unwrap();
        redis::cmd("SHUTDOWN")
            .arg("NOSAVE")
            .query_async(&mut c)
            .await
    };
    cluster.master.wait_exit(Duration::from_secs(5)).await;
    eventually(
        "the sentinel promotes the replica",
        Duration::from_secs(30),
        || async { cluster.master_port_named().await == Some(replica_port) },
    )
    .await;
    let promoted = down.elapsed();

    // The same connection and consumer, now on the new master.
    publish(&conn, &q, "after").await;
    let mut m = next(&mut consumer, "after the failover").await;
    assert_eq!(m.body().as_ref(), b"after");
    common::within("ack", m.ack()).await.unwrap();
    publish(&conn, &idle, "after").await;
    let on_new_master = llen(replica_port, &idle, 0).await;
    assert!(
        on_new_master >= 1,
        "the message after the failover is on the promoted replica"
    );
    let recovered = down.elapsed();
    let mut reconnected = false;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(10), events.recv()).await {
        reconnected |= matches!(e, RecoveryEvent::Reconnected { .. });
    }
    assert!(reconnected, "a Reconnected event was sent");
    eprintln!(
        "redis_sentinel::failover: replica promoted {promoted:?} after the master went down; \
         published and consumed through it {recovered:?} after"
    );
    conn.close().await.unwrap();
}
