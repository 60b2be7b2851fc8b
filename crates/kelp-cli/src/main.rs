//! `kelp`: the command-line tool. A stub until the library core lands: it reports its version
//! and checks that a broker answers.

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: kelp <command>\n\ncommands:\n  version            print the version\n  ping [URL]         connect to an AMQP broker and report its product and version\n"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("version") | Some("--version") | Some("-V") => {
            println!("kelp {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("ping") => {
            let url = args
                .get(1)
                .cloned()
                .or_else(|| std::env::var("KELP_URL").ok())
                .unwrap_or_else(|| "amqp://guest:guest@localhost:5672//".into());
            ping(&url)
        }
        _ => {
            eprint!("{}", usage());
            ExitCode::from(2)
        }
    }
}

fn ping(url: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kelp: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match kelp::amqp::Connection::open(url).await {
            Ok(conn) => {
                let t = conn.tuning();
                let get = |k: &str| {
                    t.server_properties
                        .get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("?")
                        .to_owned()
                };
                println!(
                    "{}: {} {} (frame_max {}, heartbeat {:?})",
                    conn.url(),
                    get("product"),
                    get("version"),
                    t.frame_max,
                    t.heartbeat
                );
                let _ = conn.close().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kelp: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
