//! The Python peers of the interop tests (aio-pika, Kombu, Celery): finding the interpreter,
//! checking it has what a test binary needs, and running scripts from `tests/python/` as
//! bounded, killed-on-drop subprocesses.
//!
//! The Python is `$KELP_PYTHON` (CI points it at its venv), else [`DEFAULT_PYTHON`] if it
//! exists. When there is none, or it lacks a module, [`Python::find`] prints a visible
//! `SKIP <test>: <why>` line and returns `None` — or panics under `KELP_REQUIRE_BROKERS=1`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

/// The interpreter used when `KELP_PYTHON` is not set.
pub const DEFAULT_PYTHON: &str = "/work/pyenv/bin/python";

/// The directory of the peer scripts.
pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python");

/// The path of the peer script `name`.
pub fn script(name: &str) -> String {
    format!("{DIR}/{name}")
}

/// What a test binary needs of its Python, looked for once (by the first test that asks) and
/// shared by its tests. Declare it as a `static`.
#[derive(Debug)]
pub struct Python<T: 'static = String> {
    /// What it must have, for messages ("no Python with {needs}").
    needs: &'static str,
    /// Arguments to the interpreter (run in [`DIR`]) that succeed only when it has `needs`.
    check: &'static [&'static str],
    /// Turns the interpreter and the check's stdout into what the tests get.
    accept: fn(String, Vec<u8>) -> Result<T, String>,
    found: OnceLock<Result<T, String>>,
}

fn interpreter_only(python: String, _stdout: Vec<u8>) -> Result<String, String> {
    Ok(python)
}

impl Python<String> {
    /// A Python that runs `check` successfully; the tests get its path.
    pub const fn new(needs: &'static str, check: &'static [&'static str]) -> Self {
        Python::with(needs, check, interpreter_only)
    }
}

impl<T: Clone> Python<T> {
    /// A Python that runs `check` successfully; the tests get what `accept` makes of its path
    /// and the check's stdout (an `Err` is a reason to skip).
    pub const fn with(
        needs: &'static str,
        check: &'static [&'static str],
        accept: fn(String, Vec<u8>) -> Result<T, String>,
    ) -> Self {
        Python {
            needs,
            check,
            accept,
            found: OnceLock::new(),
        }
    }

    /// What the tests get, or `None` after a visible SKIP line for `test`; a panic instead
    /// under `KELP_REQUIRE_BROKERS=1`.
    pub fn find(&self, test: &str) -> Option<T> {
        match self.found.get_or_init(|| self.look()) {
            Ok(v) => Some(v.clone()),
            Err(why) if super::require_brokers() => {
                panic!("{test}: {why} and KELP_REQUIRE_BROKERS=1")
            }
            Err(why) => {
                super::skip(test, why);
                None
            }
        }
    }

    fn look(&self) -> Result<T, String> {
        let needs = self.needs;
        let py = match std::env::var("KELP_PYTHON") {
            Ok(p) if !p.is_empty() => p,
            _ if std::path::Path::new(DEFAULT_PYTHON).exists() => DEFAULT_PYTHON.to_owned(),
            _ => {
                return Err(format!(
                    "no Python with {needs}: set KELP_PYTHON (tried {DEFAULT_PYTHON})"
                ))
            }
        };
        match Command::new(&py).current_dir(DIR).args(self.check).output() {
            Ok(o) if o.status.success() => (self.accept)(py, o.stdout),
            Ok(o) => Err(format!(
                "{py} cannot import {needs}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {py}: {e}")),
        }
    }
}

/// A subprocess (a Python peer): its stdout as lines, everything it prints kept for failure
/// messages, every wait on it bounded, killed on drop (a failing test leaves nothing behind).
#[derive(Debug)]
pub struct Peer {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    output: Arc<Mutex<String>>,
    what: String,
    wait: Duration,
}

impl Peer {
    /// `python tests/python/<script> <args>…`; `wait` bounds each line and the exit.
    pub fn script(python: &str, script: &str, args: &[&str], wait: Duration) -> Peer {
        let mut cmd = Command::new(python);
        cmd.arg(self::script(script)).args(args);
        Peer::spawn(cmd, format!("{script} {}", args.join(" ")), wait)
    }

    /// Start `cmd` (stdin closed, stdout and stderr captured), called `what` in messages;
    /// `wait` bounds each line and the exit.
    pub fn spawn(mut cmd: Command, what: String, wait: Duration) -> Peer {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what} ({:?}): {e}", cmd.get_program()));
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdout.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&buf);
                sink.lock().unwrap().push_str(&text);
                let line = text.strip_suffix('\n').unwrap_or(&text);
                let line = line.strip_suffix('\r').unwrap_or(line);
                if tx.send(line.to_owned()).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Peer {
            child,
            lines,
            output,
            what,
            wait,
        }
    }

    /// Everything the peer has printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The next line the peer prints.
    pub async fn line(&mut self) -> String {
        let wait = self.wait;
        match tokio::time::timeout(wait, self.lines.recv()).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                // Give the stderr reader a moment to catch the traceback.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "{} exited ({:?}) without the expected output; output:\n{}",
                    self.what,
                    self.child.try_wait(),
                    self.output()
                )
            }
            Err(_) => panic!(
                "{} printed nothing within {wait:?}; output:\n{}",
                self.what,
                self.output()
            ),
        }
    }

    /// The next line must be `READY`.
    pub async fn ready(&mut self) {
        let l = self.line().await;
        assert_eq!(l, "READY", "{}: output:\n{}", self.what, self.output());
    }

    /// The next line, which must be JSON.
    pub async fn json(&mut self) -> Value {
        let l = self.line().await;
        serde_json::from_str(&l).unwrap_or_else(|e| {
            panic!(
                "{}: not JSON ({e}): {l}\noutput:\n{}",
                self.what,
                self.output()
            )
        })
    }

    /// Wait for the peer to exit, and require success; returns everything it printed.
    pub async fn exit_ok(mut self) -> String {
        let deadline = Instant::now() + self.wait;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers catch the last of the output.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let out = self.output();
                assert!(
                    status.success(),
                    "{} failed ({status}); output:\n{out}",
                    self.what
                );
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {:?}; output:\n{}",
                self.what,
                self.wait,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
