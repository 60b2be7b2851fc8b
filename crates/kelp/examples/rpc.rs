//! RabbitMQ tutorial 6, "Remote procedure call (RPC)"
//! (<https://www.rabbitmq.com/tutorials/tutorial-six-python>): a client runs a function on a
//! server and waits for the result. The client sends each request to the server's queue with
//! two properties:
//!
//! - `reply_to`: the client's callback queue, server-named and exclusive to the client;
//! - `correlation_id`: unique per request. The server copies it onto the response, so the
//!   client can tell which request a response answers.
//!
//! The server takes one request at a time (`prefetch_count(1)`) and acks it once replied, so
//! more servers on the same queue would share the load fairly.
//!
//! The tutorial's `rpc_server` and `rpc_client` run here in one process, each with its own
//! connection. Requests and responses are JSON numbers.
//!
//! ```text
//! cargo run -p kelp --example rpc
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::{Connection, Consumer, Producer, PublishOptions, Queue};
use tokio::task::JoinHandle;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if a response never comes.
    tokio::time::timeout(Duration::from_secs(10), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The tutorial's `rpc_queue`. The process id keeps runs apart, and auto-delete removes
    // the queue once the server stops consuming.
    let rpc_queue = Queue::new(format!("rpc_queue.{}", std::process::id()))
        .durable(false)
        .auto_delete(true);
    let server = rpc_server(rpc_queue.clone()).await?;

    let mut client = FibonacciRpcClient::connect(&rpc_queue.name).await?;
    for n in [10, 20, 30] {
        println!(" [x] Requesting fib({n})");
        let response = client.call(n).await?;
        println!(" [.] Got {response}");
    }

    // Stop the server (Ctrl-C in the tutorial).
    server.abort();
    Ok(())
}

/// The function the server offers (as slow as the tutorial's, on purpose).
fn fib(n: u32) -> u64 {
    match n {
        0 => 0,
        1 => 1,
        n => fib(n - 1) + fib(n - 2),
    }
}

/// The tutorial's `rpc_server`: answer each request on its `reply_to` queue.
async fn rpc_server(queue: Queue) -> Result<JoinHandle<Result<(), Error>>, Error> {
    let conn = Connection::open_default().await?; // $KELP_URL, else the embedded default (sqlite://kelp.db)
    let ch = conn.channel().await?;
    let mut requests = Consumer::builder(&ch)
        .queue(queue)
        .prefetch_count(1)
        .build()
        .await?;
    // Responses go through the default exchange, straight to the queue named by `reply_to`.
    let responses = Producer::new(&ch);
    println!(" [x] Awaiting RPC requests");
    Ok(tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let mut request = request?;
            let Some(reply_to) = request.reply_to() else {
                request.reject(false).await?; // nowhere to answer
                continue;
            };
            let mut options = PublishOptions::default().routing_key(reply_to);
            if let Some(id) = request.correlation_id() {
                options = options.correlation_id(id);
            }
            let n: u32 = request.decode()?;
            println!(" [.] fib({n})");
            responses.publish_serde(&fib(n), options).await?;
            request.ack().await?;
        }
        Ok(())
    }))
}

/// The tutorial's `FibonacciRpcClient`.
struct FibonacciRpcClient {
    producer: Producer,
    responses: Consumer,
    callback_queue: String,
    rpc_queue: String,
    calls: u64,
}

impl FibonacciRpcClient {
    async fn connect(rpc_queue: &str) -> Result<Self, Error> {
        let conn = Connection::open_default().await?;
        let ch = conn.channel().await?;
        // The callback queue: named by the broker, exclusive to this connection.
        let callback_queue = ch.declare_queue(Queue::server_named()).await?;
        let responses = Consumer::builder(&ch)
            .queue(&callback_queue)
            .no_ack(true)
            .build()
            .await?;
        Ok(FibonacciRpcClient {
            producer: Producer::new(&ch),
            responses,
            callback_queue: callback_queue.name.clone(),
            rpc_queue: rpc_queue.to_owned(),
            calls: 0,
        })
    }

    /// Call `fib(n)` on the server and wait for the result.
    async fn call(&mut self, n: u32) -> Result<u64, Error> {
        // Any id unique to this client will do (the tutorial uses a UUID).
        self.calls += 1;
        let correlation_id = format!("{}-{}", std::process::id(), self.calls);
        let options = PublishOptions::default()
            .routing_key(&self.rpc_queue)
            .reply_to(&self.callback_queue)
            .correlation_id(&correlation_id);
        self.producer.publish_serde(&n, options).await?;

        // Skip responses to other requests (say, a late one to a call that gave up).
        loop {
            let msg = self.responses.next().await.ok_or("the consumer ended")??;
            if msg.correlation_id() == Some(correlation_id.as_str()) {
                return Ok(msg.decode()?);
            }
        }
    }
}
