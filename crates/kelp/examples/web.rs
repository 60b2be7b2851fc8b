//! A web service sharing one robust connection (the seeds' web example, done with axum):
//! `POST /publish` publishes the request body to a queue, `GET /subscribe` hands out the next
//! message (204 No Content when none comes within a second).
//!
//! ```text
//! cargo run -p kelp --example web            # serves on 127.0.0.1:8000 until Ctrl-C
//! curl -d 'hello' localhost:8000/publish
//! curl localhost:8000/subscribe
//! cargo run -p kelp --example web -- --demo  # serves on a free port, calls itself, exits
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db`,
//! with a robust connection: a broker restart does not take the service down, requests made
//! during the outage wait for the broker to come back.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kelp::{Connection, Error as KelpError, SimpleQueue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct App {
    /// One queue handle for publishing and one for handing out, over the same connection.
    publish: SimpleQueue,
    subscribe: Mutex<SimpleQueue>,
}

async fn publish(State(app): State<Arc<App>>, body: String) -> (StatusCode, String) {
    match app.publish.put(&body).await {
        Ok(()) => (StatusCode::ACCEPTED, "published\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

async fn subscribe(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let mut queue = app.subscribe.lock().await;
    match queue.get(Some(Duration::from_secs(1))).await {
        Ok(mut msg) => {
            let text: Result<String, _> = msg.decode();
            if let Err(e) = msg.ack().await {
                return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
            }
            match text {
                Ok(t) => (StatusCode::OK, format!("{t}\n")),
                Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
            }
        }
        Err(KelpError::QueueEmpty { .. }) | Err(KelpError::Timeout { .. }) => {
            (StatusCode::NO_CONTENT, String::new())
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// One plain HTTP/1.1 request, for the demo (no client library needed).
async fn request(port: u16, method: &str, path: &str, body: &str) -> Result<String, Error> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let demo = std::env::args().any(|a| a == "--demo");
    let url = std::env::var("KELP_URL").unwrap_or_else(|_| kelp::DEFAULT_URL.to_owned());
    let conn = Connection::open_robust(&url).await?;
    let queue = format!("kelp-web-{}", std::process::id());
    let app = Arc::new(App {
        publish: SimpleQueue::new(&conn, &queue).await?,
        subscribe: Mutex::new(SimpleQueue::new(&conn, &queue).await?),
    });
    let router = Router::new()
        .route("/publish", post(publish))
        .route("/subscribe", get(subscribe))
        .with_state(app.clone());
    let addr = if demo {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:8000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let port = listener.local_addr()?.port();
    println!("serving on http://127.0.0.1:{port} (queue {queue})");
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    if !demo {
        tokio::signal::ctrl_c().await?;
    } else {
        let r = request(port, "POST", "/publish", "hello from the web").await?;
        assert!(r.starts_with("HTTP/1.1 202"), "publish: {r}");
        let r = request(port, "GET", "/subscribe", "").await?;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("hello from the web\n"),
            "subscribe: {r}"
        );
        println!("GET /subscribe -> {}", r.lines().last().unwrap_or_default());
        let r = request(port, "GET", "/subscribe", "").await?;
        assert!(r.starts_with("HTTP/1.1 204"), "empty: {r}");
        println!("GET /subscribe on an empty queue -> 204");
    }
    server.abort();
    let ch = conn.channel().await?;
    ch.raw().queue_delete(&queue, false, false).await?;
    conn.close().await?;
    Ok(())
}
