//! The `kelp` binary, run as separate OS processes: help texts, exit codes, `--json` output,
//! and declare → publish → get → consume round trips on RabbitMQ and Redis (each step its own
//! process; a broker that does not answer is a visible SKIP, or a failure under
//! `KELP_REQUIRE_BROKERS=1`). memory:// lives in one process, so it only runs the commands that
//! publish and consume within one invocation (tutorial, bench, a returned publish).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// `kelp ARGS` with `url` (None: no --url, and KELP_URL removed), optional stdin.
fn kelp_in(
    url: Option<&str>,
    args: &[&str],
    stdin: Option<&[u8]>,
    dir: Option<&std::path::Path>,
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kelp"));
    cmd.env_remove("KELP_URL");
    if let Some(u) = url {
        cmd.env("KELP_URL", u);
    }
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kelp");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(input).unwrap();
    }
    // Read both pipes on threads so a chatty child never blocks, and give up (killing it) after
    // a minute so a hang names the command instead of stalling the suite.
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for kelp") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kelp {args:?} (KELP_URL={url:?}) still running after 60s; stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn kelp(url: &str, args: &[&str]) -> Output {
    kelp_in(Some(url), args, None, None)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The exit code, with the output shown when it is not `want`.
#[track_caller]
fn expect_code(o: &Output, want: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(want),
        "{what}: exit {:?}, want {want}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("kelp-cli-test.{prefix}.{}.{nanos}", std::process::id())
}

/// True when the broker answers; else a SKIP line, or a panic under KELP_REQUIRE_BROKERS=1.
fn broker_up(test: &str, what: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return true;
    }
    if std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1") {
        panic!("{test}: no {what} at {addr} and KELP_REQUIRE_BROKERS=1");
    }
    eprintln!("SKIP {test}: no {what} at {addr}");
    false
}

#[test]
fn help_lists_commands_exit_codes_and_examples() {
    let o = kelp_in(None, &["--help"], None, None);
    expect_code(&o, 0, "kelp --help");
    let out = stdout(&o);
    for word in [
        "publish",
        "consume",
        "get",
        "declare",
        "purge",
        "delete",
        "rpc",
        "bench",
        "tutorial",
        "completions",
        "Exit codes",
        "3  empty",
        "4  a publish was nacked",
        "Examples:",
        "KELP_URL",
        "sqlite://kelp.db",
        "--json",
    ] {
        assert!(out.contains(word), "kelp --help lacks {word:?}:\n{out}");
    }
    for sub in [
        &["publish", "--help"][..],
        &["consume", "--help"],
        &["get", "--help"],
        &["declare", "queue", "--help"],
        &["declare", "exchange", "--help"],
        &["declare", "binding", "--help"],
        &["delete", "queue", "--help"],
        &["purge", "--help"],
        &["rpc", "call", "--help"],
        &["bench", "--help"],
        &["tutorial", "--help"],
        &["completions", "--help"],
    ] {
        let o = kelp_in(None, sub, None, None);
        expect_code(&o, 0, &sub.join(" "));
        assert!(
            stdout(&o).contains("Examples:"),
            "{} has no examples:\n{}",
            sub.join(" "),
            stdout(&o)
        );
    }
    let o = kelp_in(None, &["publish", "--help"], None, None);
    for flag in [
        "--exchange",
        "--routing-key",
        "--header",
        "--file",
        "--content-type",
        "--correlation-id",
        "--reply-to",
        "--priority",
        "--expiration",
        "--persistent",
        "--transient",
        "--message-id",
        "--serializer",
        "--compression",
        "--count",
        "--rate",
        "--confirm",
        "--declare-queue",
    ] {
        assert!(stdout(&o).contains(flag), "publish --help lacks {flag}");
    }
    let o = kelp_in(None, &["--version"], None, None);
    expect_code(&o, 0, "--version");
    assert!(stdout(&o).starts_with("kelp "));
}

#[test]
fn usage_errors_exit_1() {
    // clap parse errors: 1, not clap's 2 (2 means a broker error in kelp).
    let o = kelp_in(None, &["publish", "--no-such-flag", "x"], None, None);
    expect_code(&o, 1, "unknown flag");
    let o = kelp_in(None, &[], None, None);
    expect_code(&o, 1, "no subcommand");
    let o = kelp_in(None, &["consume"], None, None);
    expect_code(&o, 1, "missing --queue");
    // Checked before connecting: the URL does not matter.
    let o = kelp("memory://", &["publish", "-k", "q", "-H", "novalue", "x"]);
    expect_code(&o, 1, "bad header");
    assert!(stderr(&o).contains("KEY=VALUE"), "{}", stderr(&o));
    let o = kelp(
        "memory://",
        &["publish", "-k", "q", "--serializer", "json", "{not json"],
    );
    expect_code(&o, 1, "body that is not JSON");
    let o = kelp("memory://", &["rpc", "call", "m", "--kwargs", "[1]"]);
    expect_code(&o, 1, "kwargs not an object");
}

#[test]
fn an_unknown_scheme_says_so() {
    let o = kelp("carrier-pigeon://coop", &["get", "--queue", "q"]);
    expect_code(&o, 1, "unknown scheme");
    let err = stderr(&o);
    assert!(err.contains("unknown transport"), "{err}");
    assert!(err.contains("carrier-pigeon"), "{err}");
    let o = kelp("carrier-pigeon://coop", &["--json", "purge", "q"]);
    expect_code(&o, 1, "unknown scheme, --json");
    let e: Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert_eq!(e["exit_code"], 1);
    assert_eq!(e["kind"], "unknown_transport");
}

#[test]
fn the_default_url_is_sqlite_kelp_db() {
    // No --url, no KELP_URL: sqlite://kelp.db in the working directory. Either the SQLite
    // transport is built in (an empty or missing queue), or the error says the scheme is unknown.
    let dir = tempfile::tempdir().unwrap();
    let o = kelp_in(
        None,
        &["get", "--queue", "nothing-here"],
        None,
        Some(dir.path()),
    );
    let err = stderr(&o);
    match o.status.code() {
        Some(1) => assert!(
            err.contains("unknown transport") && err.contains("sqlite"),
            "{err}"
        ),
        Some(2 | 3) => assert!(dir.path().join("kelp.db").exists(), "{err}"),
        other => panic!("exit {other:?}: {err}"),
    }
}

#[test]
fn connection_refused_exits_2() {
    let o = kelp(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &["--connect-timeout", "3s", "get", "--queue", "q"],
    );
    expect_code(&o, 2, "connection refused");
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("guest:guest"),
        "password shown: {}",
        stderr(&o)
    );
}

#[test]
fn completions_produce_scripts() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = kelp_in(None, &["completions", shell], None, None);
        expect_code(&o, 0, shell);
        let out = stdout(&o);
        assert!(out.len() > 500, "{shell}: {out}");
        assert!(
            out.contains("publish"),
            "{shell} completion lacks subcommands"
        );
    }
}

#[test]
fn memory_tutorial_and_bench_run_in_one_process() {
    let o = kelp("memory://", &["tutorial"]);
    expect_code(&o, 0, "tutorial");
    let out = stdout(&o);
    assert!(
        out.contains("kia ora") && out.contains("5. Deleted"),
        "{out}"
    );

    let o = kelp("memory://", &["--json", "tutorial"]);
    expect_code(&o, 0, "tutorial --json");
    let steps: Vec<String> = json_lines(&o)
        .iter()
        .map(|v| v["step"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        steps,
        ["connect", "declare", "publish", "consume", "cleanup"]
    );

    let o = kelp("memory://", &["bench", "--count", "2000", "--size", "64"]);
    expect_code(&o, 0, "bench");
    assert!(stdout(&o).contains("msg/s"), "{}", stdout(&o));

    let o = kelp(
        "memory://",
        &["--json", "bench", "--count", "500", "--confirm"],
    );
    expect_code(&o, 0, "bench --json");
    let v = &json_lines(&o)[0];
    assert_eq!(v["consumed"], 500);
    assert_eq!(v["transport"], "memory");
    assert!(v["publish_rate"].as_f64().unwrap() > 0.0);
}

#[test]
fn memory_unroutable_mandatory_publish_exits_4() {
    let o = kelp(
        "memory://",
        &[
            "--json",
            "publish",
            "--routing-key",
            "nowhere",
            "--mandatory",
            "x",
        ],
    );
    expect_code(&o, 4, "returned publish");
    let v = &json_lines(&o)[0];
    assert_eq!(v["refused"], 1);
    assert_eq!(v["published"], 0);
}

/// declare → publish (argument, stdin, --file, json, compressed, headers, properties) → get →
/// consume → empty → delete, each a separate `kelp` process, on `url`.
fn round_trip(url: &str, tag: &str, confirms_route: bool) {
    let ex = unique(&format!("{tag}.ex"));
    let q = unique(&format!("{tag}.q"));
    let key = "greetings.en";

    let o = kelp(url, &["declare", "exchange", &ex, "--type", "direct"]);
    expect_code(&o, 0, "declare exchange");
    let o = kelp(url, &["--json", "declare", "queue", &q]);
    expect_code(&o, 0, "declare queue");
    assert_eq!(json_lines(&o)[0]["name"], q.as_str());
    let o = kelp(
        url,
        &[
            "declare",
            "binding",
            "--queue",
            &q,
            "--exchange",
            &ex,
            "--routing-key",
            key,
        ],
    );
    expect_code(&o, 0, "declare binding");

    // An empty queue: get exits 3, consume --timeout with nothing exits 3.
    let o = kelp(url, &["get", "--queue", &q]);
    expect_code(&o, 3, "get on an empty queue");
    let o = kelp(url, &["--json", "get", "--queue", &q]);
    expect_code(&o, 3, "get --json on an empty queue");
    assert_eq!(json_lines(&o)[0]["empty"], true);
    let o = kelp(url, &["consume", "--queue", &q, "--timeout", "300ms"]);
    expect_code(&o, 3, "consume timeout with no message");

    // 1: properties and headers, through the exchange, confirmed.
    let o = kelp(
        url,
        &[
            "--json",
            "publish",
            "--exchange",
            &ex,
            "--routing-key",
            key,
            "--header",
            "attempt=2",
            "--header",
            "trace=abc",
            "--header",
            "tags:=[\"a\",\"b\"]",
            "--correlation-id",
            "c-1",
            "--reply-to",
            "replies",
            "--message-id",
            "m-1",
            "--expiration",
            "60000",
            "--transient",
            "--confirm",
            "hello there",
        ],
    );
    expect_code(&o, 0, "publish with properties");
    let v = &json_lines(&o)[0];
    assert_eq!(v["published"], 1);
    assert_eq!(v["confirmed"], true);

    // 2: the body from stdin.
    let o = kelp_in(
        Some(url),
        &["publish", "--exchange", &ex, "--routing-key", key, "-"],
        Some(b"from stdin\n"),
        None,
    );
    expect_code(&o, 0, "publish from stdin");
    // 3: JSON, zstd-compressed.
    let o = kelp(
        url,
        &[
            "publish",
            "--exchange",
            &ex,
            "--routing-key",
            key,
            "--serializer",
            "json",
            "--compression",
            "zstd",
            r#"{"n": 3, "ok": true}"#,
        ],
    );
    expect_code(&o, 0, "publish json + zstd");
    // 4: binary, from a file, straight to the queue.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body.bin");
    std::fs::write(&path, [0u8, 159, 146, 150, 255]).unwrap();
    let o = kelp(
        url,
        &[
            "publish",
            "--routing-key",
            &q,
            "--file",
            path.to_str().unwrap(),
        ],
    );
    expect_code(&o, 0, "publish --file");
    // 5..7: three at once.
    let o = kelp(
        url,
        &[
            "publish",
            "--routing-key",
            &q,
            "--count",
            "3",
            "--confirm",
            "load",
        ],
    );
    expect_code(&o, 0, "publish --count 3");

    let o = kelp(url, &["--json", "get", "--queue", &q]);
    expect_code(&o, 0, "get --json");
    let m = &json_lines(&o)[0];
    assert_eq!(m["body"], "hello there");
    assert_eq!(m["body_encoding"], "text");
    let p = &m["properties"];
    assert_eq!(p["content_type"], "text/plain");
    assert_eq!(p["correlation_id"], "c-1");
    assert_eq!(p["reply_to"], "replies");
    assert_eq!(p["message_id"], "m-1");
    assert_eq!(p["expiration"], "60000");
    assert_eq!(p["delivery_mode"], 1);
    assert_eq!(p["headers"]["attempt"], 2);
    assert_eq!(p["headers"]["trace"], "abc");
    assert_eq!(p["headers"]["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(m["delivery_info"]["exchange"], ex.as_str());
    assert_eq!(m["delivery_info"]["routing_key"], key);
    assert_eq!(m["delivery_info"]["queue"], q.as_str());

    // Text output of the stdin body.
    let o = kelp(url, &["get", "--queue", &q]);
    expect_code(&o, 0, "get stdin body");
    assert_eq!(stdout(&o), "from stdin\n\n");

    // consume --count 2 --output json: the JSON body decompressed and decoded, the binary one
    // as base64.
    let o = kelp(
        url,
        &["consume", "--queue", &q, "--count", "2", "--output", "json"],
    );
    expect_code(&o, 0, "consume --count 2");
    let ms = json_lines(&o);
    assert_eq!(ms.len(), 2, "{}", stdout(&o));
    assert_eq!(ms[0]["body"], serde_json::json!({"n": 3, "ok": true}));
    assert_eq!(ms[0]["body_encoding"], "json");
    assert_eq!(ms[0]["properties"]["content_type"], "application/json");
    assert_eq!(ms[1]["body_encoding"], "base64");
    assert_eq!(ms[1]["body"], "AJ+Slv8=");

    // --ack none leaves them; raw output is the bodies' bytes.
    let o = kelp(
        url,
        &[
            "consume", "--queue", &q, "--count", "3", "--ack", "none", "--output", "raw",
        ],
    );
    expect_code(&o, 0, "consume --ack none");
    assert_eq!(stdout(&o), "loadloadload");
    let o = kelp(
        url,
        &[
            "--json",
            "consume",
            "--queue",
            &q,
            "--timeout",
            "1s",
            "--ack",
            "auto",
        ],
    );
    expect_code(&o, 0, "consume the rest");
    let rest = json_lines(&o);
    assert_eq!(rest.len(), 3, "{}", stdout(&o));
    assert!(rest.iter().all(|m| m["body"] == "load"));
    let o = kelp(url, &["get", "--queue", &q]);
    expect_code(&o, 3, "empty again");

    // purge reports a count.
    let o = kelp(url, &["publish", "--routing-key", &q, "--count", "2", "x"]);
    expect_code(&o, 0, "publish 2 to purge");
    let o = kelp(url, &["--json", "purge", &q]);
    expect_code(&o, 0, "purge");
    assert_eq!(json_lines(&o)[0]["purged"], 2);

    if confirms_route {
        // Nobody bound to this key: --mandatory brings it back, exit 4.
        let o = kelp(
            url,
            &[
                "publish",
                "--exchange",
                &ex,
                "--routing-key",
                "nobody",
                "--mandatory",
                "x",
            ],
        );
        expect_code(&o, 4, "unroutable mandatory publish");
    }

    // --declare-queue makes a queue and routes to it.
    let q2 = unique(&format!("{tag}.q2"));
    let o = kelp(url, &["publish", "--declare-queue", &q2, "declared"]);
    expect_code(&o, 0, "publish --declare-queue");
    let o = kelp(url, &["get", "--queue", &q2]);
    expect_code(&o, 0, "get from the declared queue");
    assert_eq!(stdout(&o), "declared\n");
    let o = kelp(url, &["publish", "--routing-key", &q2, "again"]);
    expect_code(&o, 0, "publish to the declared queue");
    // get --requeue puts it back; the next get takes it.
    let o = kelp(url, &["get", "--queue", &q2, "--requeue"]);
    expect_code(&o, 0, "get --requeue");
    assert_eq!(stdout(&o), "again\n");
    let o = kelp(url, &["--json", "get", "--queue", &q2, "--ack"]);
    expect_code(&o, 0, "get after --requeue");
    let m = &json_lines(&o)[0];
    assert_eq!(m["body"], "again");
    assert_eq!(m["delivery_info"]["redelivered"], true);
    let o = kelp(url, &["get", "--queue", &q2]);
    expect_code(&o, 3, "the declared queue is empty");

    // Clean up (best effort: the checks above are what this test is about).
    let _ = kelp(url, &["delete", "queue", &q2]);
    let _ = kelp(url, &["delete", "queue", &q]);
    let _ = kelp(url, &["delete", "exchange", &ex]);
}

#[test]
fn rabbitmq_round_trip_across_processes() {
    if !broker_up("rabbitmq_round_trip_across_processes", "RabbitMQ", 5672) {
        return;
    }
    round_trip(AMQP_URL, "amqp", true);

    // The broker refuses: 404 on a missing queue is exit 2; ping names the broker.
    let o = kelp(AMQP_URL, &["get", "--queue", &unique("missing")]);
    expect_code(&o, 2, "get from a missing queue");
    let o = kelp(AMQP_URL, &["--json", "ping"]);
    expect_code(&o, 0, "ping");
    assert_eq!(json_lines(&o)[0]["product"], "RabbitMQ");

    // declare queue with arguments; delete --if-empty refuses a queue with messages.
    let q = unique("args");
    let o = kelp(
        AMQP_URL,
        &[
            "declare",
            "queue",
            &q,
            "--max-length",
            "10",
            "--message-ttl",
            "60000",
            "--dead-letter-exchange",
            "dlx",
            "--arg",
            "x-max-priority=5",
        ],
    );
    expect_code(&o, 0, "declare queue with arguments");
    let o = kelp(
        AMQP_URL,
        &["publish", "--routing-key", &q, "--priority", "4", "x"],
    );
    expect_code(&o, 0, "publish");
    let o = kelp(AMQP_URL, &["--json", "get", "--queue", &q, "--requeue"]);
    expect_code(&o, 0, "get --requeue");
    assert_eq!(json_lines(&o)[0]["properties"]["priority"], 4);
    let o = kelp(AMQP_URL, &["delete", "queue", &q, "--if-empty"]);
    expect_code(&o, 2, "delete --if-empty on a queue with a message");
    let o = kelp(AMQP_URL, &["--json", "delete", "queue", &q]);
    expect_code(&o, 0, "delete queue");
    assert_eq!(json_lines(&o)[0]["messages"], 1);

    let o = kelp(AMQP_URL, &["tutorial"]);
    expect_code(&o, 0, "tutorial on RabbitMQ");
    let o = kelp(AMQP_URL, &["--json", "bench", "--count", "2000"]);
    expect_code(&o, 0, "bench on RabbitMQ");
    assert_eq!(json_lines(&o)[0]["consumed"], 2000);
}

#[test]
fn rabbitmq_rpc_call() {
    if !broker_up("rabbitmq_rpc_call", "RabbitMQ", 5672) {
        return;
    }
    use kelp::patterns::{Format, Rpc, RpcError, RpcOptions};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let method = unique("multiply");
    let (conn, rpc) = rt.block_on(async {
        let conn = kelp::Connection::open(AMQP_URL).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let rpc = Rpc::create(&ch, RpcOptions::new(Format::Json))
            .await
            .unwrap();
        rpc.register(&method, |kw: Value| async move {
            if kw["y"] == 0 {
                return Err(RpcError::remote("ValueError", "y is zero"));
            }
            Ok(kw["x"].as_i64().unwrap_or(0) * kw["y"].as_i64().unwrap_or(0))
        })
        .await
        .unwrap();
        (conn, rpc)
    });
    let o = kelp(
        AMQP_URL,
        &["rpc", "call", &method, "--kwargs", r#"{"x": 6, "y": 7}"#],
    );
    expect_code(&o, 0, "rpc call");
    assert_eq!(stdout(&o).trim(), "42");
    let o = kelp(
        AMQP_URL,
        &[
            "--json",
            "rpc",
            "call",
            &method,
            "--kwargs",
            r#"{"x": 2, "y": 3}"#,
        ],
    );
    expect_code(&o, 0, "rpc call --json");
    assert_eq!(json_lines(&o)[0]["result"], 6);
    let o = kelp(
        AMQP_URL,
        &["rpc", "call", &method, "--kwargs", r#"{"x": 1, "y": 0}"#],
    );
    expect_code(&o, 5, "the method raised");
    assert!(stderr(&o).contains("ValueError"), "{}", stderr(&o));
    let o = kelp(AMQP_URL, &["rpc", "call", &unique("nobody-serves-this")]);
    expect_code(&o, 4, "no such method");
    rt.block_on(async {
        let _ = rpc.unregister(&method).await;
        let _ = rpc.close().await;
        let _ = conn.close().await;
    });
}

#[test]
fn redis_round_trip_across_processes() {
    if !broker_up("redis_round_trip_across_processes", "Redis", 6379) {
        return;
    }
    // Redis has no publisher returns for the default exchange: no exit-4 check here.
    round_trip(REDIS_URL, "redis", false);
    let o = kelp(REDIS_URL, &["--json", "bench", "--count", "500"]);
    expect_code(&o, 0, "bench on Redis");
    assert_eq!(json_lines(&o)[0]["consumed"], 500);
}

#[test]
fn sqlite_publish_then_consume_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/t.db", dir.path().display());
    let o = kelp(&url, &["declare", "queue", "jobs", "--durable"]);
    expect_code(&o, 0, "declare on sqlite");
    let o = kelp_in(
        Some(&url),
        &["publish", "--routing-key", "jobs", "--count", "3", "-"],
        Some(b"job"),
        None,
    );
    expect_code(&o, 0, "publish on sqlite");
    let o = kelp(
        &url,
        &["--json", "consume", "--queue", "jobs", "--count", "3"],
    );
    expect_code(&o, 0, "consume on sqlite, another process");
    let ms = json_lines(&o);
    assert_eq!(ms.len(), 3);
    assert!(ms.iter().all(|m| m["body"] == "job"));
    let o = kelp(&url, &["get", "--queue", "jobs"]);
    expect_code(&o, 3, "empty after consuming");
}
