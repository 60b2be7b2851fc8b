//! `kelp`: the command-line tool. A thin layer over the kelp library: it parses arguments, makes
//! the library calls and prints the outcome (text, or one JSON object per line with `--json`).
//! Exit codes are listed in `kelp --help` and in [`error`].

mod cli;
mod commands;
mod error;
mod output;
mod session;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command, RpcCommand};
use crate::error::{CliError, USAGE};
use crate::session::Session;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and --version go to stdout and succeed; every parse error is a usage
            // error, exit 1 (not clap's 2, which kelp uses for broker errors).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let json_mode = cli.global.json;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            CliError::new(
                error::BROKER,
                "runtime",
                format!("cannot start the runtime: {e}"),
            )
            .report(json_mode);
            return ExitCode::from(error::BROKER);
        }
    };
    let result = rt.block_on(run(cli));
    commands::flush_stdout();
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            e.report(json_mode);
            ExitCode::from(e.code)
        }
    }
}

/// Open a session, run `$body` with it bound to `$s`, close the session, return the result.
macro_rules! with_session {
    ($g:expr, |$s:ident| $body:expr) => {{
        let $s = Session::open($g).await?;
        let result = $body.await;
        $s.close().await;
        result
    }};
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "kelp", &mut std::io::stdout());
            Ok(())
        }
        Command::Version => {
            if g.json {
                output::print_json(&serde_json::json!({"version": env!("CARGO_PKG_VERSION")}));
            } else {
                output::write_line(&format!("kelp {}", env!("CARGO_PKG_VERSION")));
            }
            Ok(())
        }
        Command::Ping => commands::ping(&g.url, g.connect_timeout, g.json).await,
        Command::Publish(a) => {
            // Read and check the body before connecting: a bad body is a usage error.
            let body = commands::prepare_body(a)?;
            output::parse_table("--header", &a.headers)?;
            with_session!(g, |s| commands::publish(&s, a, body))
        }
        Command::Consume(a) => with_session!(g, |s| commands::consume(&s, a)),
        Command::Get(a) => with_session!(g, |s| commands::get(&s, a)),
        Command::Declare(c) => with_session!(g, |s| commands::declare(&s, c)),
        Command::Purge(a) => with_session!(g, |s| commands::purge(&s, &a.queue)),
        Command::Delete(c) => with_session!(g, |s| commands::delete(&s, c)),
        Command::Rpc(RpcCommand::Call {
            method,
            kwargs,
            pickle,
            timeout,
            expiration,
            exchange,
        }) => {
            let call = commands::RpcCall {
                method,
                kwargs: commands::parse_kwargs(kwargs)?,
                pickle: *pickle,
                timeout: *timeout,
                expiration: *expiration,
                exchange,
            };
            with_session!(g, |s| commands::rpc_call(&s, call))
        }
        Command::Bench(a) => with_session!(g, |s| commands::bench(&s, a)),
        Command::Tutorial => with_session!(g, |s| commands::tutorial(&s)),
    }
}
