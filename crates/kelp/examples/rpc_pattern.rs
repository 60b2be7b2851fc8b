//! RPC with `kelp::patterns::Rpc`, wire-compatible with aio-pika's `JsonRPC` (and, with
//! `Format::Pickle`, its `RPC`): a callee serves `multiply` and `divide`, a caller calls them
//! — typed and untyped, concurrently, through direct reply-to — and sees a remote error and
//! an unknown method. An aio-pika program could take either side.
//!
//! ```text
//! cargo run -p kelp --example rpc_pattern
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::patterns::{CallOptions, Format, Rpc, RpcError, RpcOptions};
use kelp::{Connection, Queue};
use serde::{Deserialize, Serialize};
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct Pair {
    x: f64,
    y: f64,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if an answer never comes.
    tokio::time::timeout(Duration::from_secs(20), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The process id keeps runs apart: method queues are named after the methods.
    let multiply = format!("multiply.{}", std::process::id());
    let divide = format!("divide.{}", std::process::id());

    // The callee, on its own connection.
    let server_conn = Connection::open_default().await?;
    let server_ch = server_conn.channel().await?;
    let server = Rpc::create(&server_ch, RpcOptions::new(Format::Json)).await?;
    server
        .register(&multiply, |p: Pair| async move { Ok(p.x * p.y) })
        .await?;
    server
        .register(&divide, |p: Pair| async move {
            if p.y == 0.0 {
                // Python's caller would see ZeroDivisionError (pickle) or a JsonRPCError.
                return Err(RpcError::remote("ZeroDivisionError", "division by zero"));
            }
            Ok(p.x / p.y)
        })
        .await?;

    // The caller: answers come through RabbitMQ's direct reply-to.
    let client_conn = Connection::open_default().await?;
    let client_ch = client_conn.channel().await?;
    let client = Rpc::create(
        &client_ch,
        RpcOptions::new(Format::Json).direct_reply_to(true),
    )
    .await?;

    let product = client.call(&multiply, &json!({"x": 6, "y": 7})).await?;
    println!(" [.] multiply(x=6, y=7) = {product}");

    let quotient: f64 = client
        .call_typed(&divide, &Pair { x: 1.0, y: 8.0 }, CallOptions::default())
        .await?;
    println!(" [.] divide(x=1, y=8) = {quotient}");

    match client.call(&divide, &json!({"x": 1, "y": 0})).await {
        Err(RpcError::Remote(e)) => {
            println!(" [.] divide(x=1, y=0) raised {}: {}", e.kind, e.message)
        }
        other => return Err(format!("expected a remote error, got {other:?}").into()),
    }

    match client.call("no.such.method", &json!({})).await {
        Err(RpcError::NoSuchMethod { method }) => println!(" [.] {method}: no such method"),
        other => return Err(format!("expected NoSuchMethod, got {other:?}").into()),
    }

    // Ten calls in flight at once; the callee runs them concurrently.
    let calls = (1..=10).map(|i| {
        let client = client.clone();
        let multiply = multiply.clone();
        tokio::spawn(async move {
            let opts = CallOptions::default().timeout(Duration::from_secs(5));
            client
                .call_typed::<_, f64>(
                    &multiply,
                    &Pair {
                        x: i as f64,
                        y: i as f64,
                    },
                    opts,
                )
                .await
        })
    });
    let mut squares = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        squares.push(call.await??);
    }
    println!(" [.] squares: {squares:?}");

    client.close().await?;
    server.close().await?;
    for q in [&multiply, &divide] {
        Queue::new(q.as_str())
            .delete(&server_ch, false, false)
            .await?;
    }
    client_conn.close().await?;
    server_conn.close().await?;
    Ok(())
}
