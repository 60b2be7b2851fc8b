//! The connection and channel a command runs on, progress bars, Ctrl-C.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kelp::{Channel, Connection};

use crate::cli::Global;
use crate::error::{CliError, Context, BROKER};

/// An open connection and one channel on it.
#[derive(Debug)]
pub struct Session {
    /// The connection.
    pub conn: Connection,
    /// The channel commands use.
    pub ch: Channel,
    /// `--json`.
    pub json: bool,
}

impl Session {
    /// Connect to `--url` and open a channel.
    pub async fn open(g: &Global) -> Result<Session, CliError> {
        let shown = kelp::error::mask_url(&g.url);
        let connecting = kelp::Connection::builder()
            .url(g.url.clone())
            .connect_timeout(g.connect_timeout)
            .connection_name("kelp-cli")
            .connect();
        // The transport's own limit should fire first; this one covers a transport that
        // waits longer than asked.
        let conn = match tokio::time::timeout(
            g.connect_timeout + Duration::from_secs(1),
            connecting,
        )
        .await
        {
            Ok(r) => r.ctx(format_args!("cannot connect to {shown}"))?,
            Err(_) => {
                return Err(CliError::new(
                    BROKER,
                    "connection",
                    format!(
                        "cannot connect to {shown}: no answer within {:?}",
                        g.connect_timeout
                    ),
                ))
            }
        };
        let ch = match conn.channel().await {
            Ok(ch) => ch,
            Err(e) => {
                let _ = conn.close().await;
                return Err(CliError::kelp(
                    e,
                    format_args!("cannot open a channel on {shown}"),
                ));
            }
        };
        Ok(Session {
            conn,
            ch,
            json: g.json,
        })
    }

    /// Close the channel (unacknowledged messages go back to their queues) and the connection.
    pub async fn close(self) {
        if !self.ch.is_closed() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.ch.close()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.close()).await;
    }
}

/// A flag that turns true at the first Ctrl-C (SIGINT).
pub fn interrupted_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            set.store(true, Ordering::SeqCst);
        }
    });
    flag
}

/// True when progress bars may be drawn: stderr is a terminal and the output is not JSON.
pub fn progress_allowed(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A progress bar on stderr (hidden unless [`progress_allowed`]); `len` `None` is a spinner.
pub fn progress(show: bool, len: Option<u64>, what: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let (pb, template) = match len {
        Some(n) => (
            ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            "{msg:>10} [{bar:32}] {pos}/{len} {per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{msg:>10} {spinner} {pos} {per_sec}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}
