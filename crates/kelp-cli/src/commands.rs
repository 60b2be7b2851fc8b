//! The subcommands: each turns its arguments into kelp calls and prints the outcome.

use std::io::{IsTerminal, Read, Write};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;
use kelp::amqp::FieldTable;
use kelp::patterns::{CallOptions, Format, Rpc, RpcError, RpcOptions};
use kelp::transport::{ConsumeSpec, DeliveryStream, RawDelivery};
use kelp::{Body, DeliveryMode, Exchange, Producer, PublishOptions, Queue};
use serde_json::{json, Value as Json};
use tokio::task::JoinSet;

use crate::cli::{
    AckMode, BenchArgs, ConsumeArgs, DeclareCommand, DeleteCommand, GetArgs, OutputFormat,
    PublishArgs,
};
use crate::error::{CliError, Context, BROKER, EMPTY, NACKED, RPC_FAILED};
use crate::output::{outln, parse_table, print_json, Shown};
use crate::session::{interrupted_flag, progress, progress_allowed, Session};

/// A body ready to publish, worked out before connecting so that a bad body is a usage error.
#[derive(Debug)]
pub struct PreparedBody {
    body: Bytes,
    content_type: String,
    content_encoding: String,
}

/// Read and encode the body of `kelp publish`.
pub fn prepare_body(a: &PublishArgs) -> Result<PreparedBody, CliError> {
    let raw: Vec<u8> = match (&a.file, a.body.as_deref()) {
        (Some(path), _) => std::fs::read(path)
            .map_err(|e| CliError::usage(format!("cannot read --file {}: {e}", path.display())))?,
        (None, Some("-")) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::usage(format!("cannot read the body from stdin: {e}")))?;
            buf
        }
        (None, Some(b)) => b.as_bytes().to_vec(),
        (None, None) => {
            return Err(CliError::usage(
                "no body: give BODY, --file PATH, or - to read stdin",
            ))
        }
    };
    let utf8 = std::str::from_utf8(&raw).is_ok();
    match a.serializer.as_deref() {
        None => Ok(PreparedBody {
            content_type: a.content_type.clone().unwrap_or_else(|| {
                if utf8 {
                    "text/plain"
                } else {
                    "application/data"
                }
                .to_owned()
            }),
            content_encoding: a
                .content_encoding
                .clone()
                .unwrap_or_else(|| if utf8 { "utf-8" } else { "binary" }.to_owned()),
            body: Bytes::from(raw),
        }),
        Some("raw") => Ok(PreparedBody {
            body: Bytes::from(raw),
            content_type: "application/data".into(),
            content_encoding: "binary".into(),
        }),
        Some("text") if utf8 => Ok(PreparedBody {
            body: Bytes::from(raw),
            content_type: "text/plain".into(),
            content_encoding: "utf-8".into(),
        }),
        Some("text") => Err(CliError::usage(
            "--serializer text: the body is not valid UTF-8",
        )),
        Some(name) => {
            let value: Json = serde_json::from_slice(&raw).map_err(|e| {
                CliError::usage(format!(
                    "--serializer {name}: the body is parsed as JSON first, and it is not JSON: {e}"
                ))
            })?;
            let enc = kelp::serialization::Registry::default()
                .encode(name, &value)
                .map_err(|e| CliError::usage(format!("--serializer {name}: {e}")))?;
            Ok(PreparedBody {
                body: enc.body,
                content_type: enc.content_type.into_owned(),
                content_encoding: enc.content_encoding.into_owned(),
            })
        }
    }
}

/// Declare `queue` (durable) unless it exists; a passive check on a spare channel first, so
/// an existing queue with other settings is left alone.
async fn ensure_queue(s: &Session, queue: &str) -> Result<(), CliError> {
    let probe = s
        .conn
        .channel()
        .await
        .ctx("cannot open a channel to check the queue")?;
    let exists = probe.get_queue(queue, true).await;
    if !probe.is_closed() {
        let _ = probe.close().await;
    }
    match exists {
        Ok(_) => Ok(()),
        Err(e) if e.reply_code() == Some(404) => {
            s.ch.declare_queue(Queue::new(queue).durable(true))
                .await
                .ctx(format_args!("cannot declare queue '{queue}'"))?;
            Ok(())
        }
        Err(e) => Err(CliError::kelp(
            e,
            format_args!("cannot check queue '{queue}'"),
        )),
    }
}

fn rate(n: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// What a run of publishes did.
#[derive(Debug, Default)]
struct PublishRun {
    sent: u64,
    refused: u64,
    first_refusal: Option<CliError>,
    interrupted: bool,
    elapsed: Duration,
}

/// Publish `count` copies, `window` at a time (more than one only makes sense with confirms),
/// at most `per_sec` a second.
async fn publish_many(
    producer: &Producer,
    body: &Bytes,
    options: &PublishOptions,
    count: u64,
    per_sec: Option<f64>,
    window: usize,
    pb: &indicatif::ProgressBar,
) -> Result<PublishRun, CliError> {
    let stop = interrupted_flag();
    let started = Instant::now();
    let interval = per_sec.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut run = PublishRun::default();
    let mut inflight: JoinSet<Result<(), kelp::Error>> = JoinSet::new();
    let settle = |r: Result<Result<(), kelp::Error>, tokio::task::JoinError>,
                  run: &mut PublishRun|
     -> Result<(), CliError> {
        match r {
            Ok(Ok(())) => {
                run.sent += 1;
                pb.inc(1);
                Ok(())
            }
            Ok(Err(e @ (kelp::Error::Nacked { .. } | kelp::Error::Returned { .. }))) => {
                run.refused += 1;
                pb.inc(1);
                if run.first_refusal.is_none() {
                    run.first_refusal = Some(CliError::kelp(e, "publish refused"));
                }
                Ok(())
            }
            Ok(Err(e)) => Err(CliError::kelp(e, "publish failed")),
            Err(e) => Err(CliError::new(
                BROKER,
                "internal",
                format!("a publish task failed: {e}"),
            )),
        }
    };
    for i in 0..count {
        if stop.load(Ordering::SeqCst) {
            run.interrupted = true;
            break;
        }
        if let Some(iv) = interval {
            let due = started + iv.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        if window <= 1 {
            let r = producer
                .publish(Body::Raw(body.clone()), options.clone())
                .await;
            settle(Ok(r), &mut run)?;
            continue;
        }
        let p = producer.clone();
        let o = options.clone();
        let b = body.clone();
        inflight.spawn(async move { p.publish(Body::Raw(b), o).await });
        while inflight.len() >= window {
            if let Some(r) = inflight.join_next().await {
                settle(r, &mut run)?;
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        settle(r, &mut run)?;
    }
    run.elapsed = started.elapsed();
    Ok(run)
}

/// `kelp publish`.
pub async fn publish(s: &Session, a: &PublishArgs, body: PreparedBody) -> Result<(), CliError> {
    let headers = parse_table("--header", &a.headers)?;
    let routing_key = a
        .routing_key
        .clone()
        .or_else(|| a.declare_queue.clone())
        .unwrap_or_default();
    if let Some(q) = &a.declare_queue {
        ensure_queue(s, q).await?;
        if !a.exchange.is_empty() {
            Queue::new(q.as_str())
                .bind_to(&s.ch, &a.exchange, &routing_key, FieldTable::new())
                .await
                .ctx(format_args!(
                    "cannot bind queue '{q}' to exchange '{}'",
                    a.exchange
                ))?;
        }
    }
    let confirm = a.confirm || a.mandatory;
    if confirm {
        s.ch.confirm_select()
            .await
            .ctx("cannot turn on publisher confirms")?;
    }
    let mut o = PublishOptions::default()
        .exchange(a.exchange.clone())
        .routing_key(routing_key.clone())
        .content_type(body.content_type.clone())
        .content_encoding(body.content_encoding.clone())
        .mandatory(a.mandatory)
        .delivery_mode(if a.transient {
            DeliveryMode::Transient
        } else {
            DeliveryMode::Persistent
        });
    o.headers = headers;
    if let Some(v) = a.priority {
        o = o.priority(v);
    }
    if let Some(v) = a.expiration {
        o = o.expiration(Duration::from_millis(v));
    }
    if let Some(v) = &a.correlation_id {
        o = o.correlation_id(v.clone());
    }
    if let Some(v) = &a.reply_to {
        o = o.reply_to(v.clone());
    }
    if let Some(v) = &a.message_id {
        o = o.message_id(v.clone());
    }
    if let Some(v) = &a.kind {
        o = o.kind(v.clone());
    }
    if let Some(v) = &a.app_id {
        o = o.app_id(v.clone());
    }
    if let Some(v) = &a.compression {
        o = o.compression(v.clone());
    }
    let producer = Producer::new(&s.ch).auto_declare(false);
    let pb = progress(
        a.count > 1 && progress_allowed(s.json),
        Some(a.count),
        "publish",
    );
    let window = if confirm { 256 } else { 1 };
    let run = publish_many(&producer, &body.body, &o, a.count, a.rate, window, &pb).await;
    pb.finish_and_clear();
    let run = run?;
    let exchange_shown = if a.exchange.is_empty() {
        "the default exchange".to_owned()
    } else {
        format!("exchange '{}'", a.exchange)
    };
    if s.json {
        print_json(&json!({
            "published": run.sent,
            "refused": run.refused,
            "exchange": a.exchange,
            "routing_key": routing_key,
            "confirmed": confirm,
            "interrupted": run.interrupted,
            "seconds": run.elapsed.as_secs_f64(),
            "rate": rate(run.sent + run.refused, run.elapsed),
        }));
    } else {
        let what = if run.sent == 1 { "message" } else { "messages" };
        let how = if confirm { " (confirmed)" } else { "" };
        let mut line = format!(
            "published {} {what} to {exchange_shown} with routing key '{routing_key}'{how}",
            run.sent
        );
        if a.count > 1 {
            line.push_str(&format!(
                " in {:.3}s, {:.0} msg/s",
                run.elapsed.as_secs_f64(),
                rate(run.sent + run.refused, run.elapsed)
            ));
        }
        if run.interrupted {
            line.push_str(" (interrupted)");
        }
        outln!("{line}");
    }
    match run.first_refusal {
        Some(first) => Err(CliError::new(
            NACKED,
            first.kind,
            format!(
                "{} of {} publishes were refused; the first: {}",
                run.refused,
                run.sent + run.refused,
                first.message
            ),
        )),
        None => Ok(()),
    }
}

async fn next_delivery(stream: &mut DeliveryStream) -> Option<Result<RawDelivery, kelp::Error>> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).as_mut().poll_next(cx)).await
}

/// Write a message to stdout; `Ok(false)` when stdout is gone (a closed pipe).
fn emit(shown: &Shown<'_>, format: OutputFormat) -> Result<bool, CliError> {
    let mut out = std::io::stdout().lock();
    match shown.write(&mut out, format) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::new(
            crate::error::USAGE,
            "output",
            format!("cannot write to stdout: {e}"),
        )),
    }
}

/// `kelp consume`.
pub async fn consume(s: &Session, a: &ConsumeArgs) -> Result<(), CliError> {
    let format = if s.json { OutputFormat::Json } else { a.output };
    let q = a.queue.as_str();
    // Broker-side auto-ack only when nothing limits how many we take: with --count the broker
    // would push (and drop) more than we print.
    let no_ack = a.ack == AckMode::Auto && a.count.is_none();
    let prefetch = a.prefetch.unwrap_or(match (a.ack, a.count) {
        // Nothing is acknowledged: a smaller window would stall before --count.
        (AckMode::None, Some(n)) => u16::try_from(n).unwrap_or(0),
        (AckMode::None, None) => 0,
        (_, Some(n)) => u16::try_from(n.min(1000)).unwrap_or(1000),
        (_, None) => 100,
    });
    // With --count, the acks of the last `prefetch` messages wait until the consumer is
    // cancelled: an ack frees a slot in the window, and the transport would fetch a message
    // past --count just as we stop (on RabbitMQ it goes back at once; a transport that is slow
    // to restore it should never see it taken).
    let held_back = |index: u64| {
        a.count
            .is_some_and(|n| prefetch > 0 && n.saturating_sub(index) < u64::from(prefetch))
    };
    let mut held_tag: Option<u64> = None;
    if !no_ack && prefetch > 0 {
        s.ch.qos(prefetch, false)
            .await
            .ctx("cannot set the prefetch")?;
    }
    let spec = ConsumeSpec {
        tag: format!("kelp-cli-{}", std::process::id()),
        no_ack,
        ..ConsumeSpec::default()
    };
    let (tag, mut stream) =
        s.ch.raw()
            .consume(q, spec)
            .await
            .ctx(format_args!("cannot consume from queue '{q}'"))?;
    let stop = interrupted_flag();
    let show = progress_allowed(s.json) && !std::io::stdout().is_terminal();
    let pb = progress(show, a.count, "consume");
    let mut got: u64 = 0;
    let mut timed_out = false;
    let outcome: Result<(), CliError> = async {
        loop {
            if a.count.is_some_and(|n| got >= n) || stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Wake up now and then to notice Ctrl-C.
            let tick = Duration::from_millis(100);
            let idle_started = Instant::now();
            let item = loop {
                match tokio::time::timeout(tick, next_delivery(&mut stream)).await {
                    Ok(item) => break Some(item),
                    Err(_) => {
                        if stop.load(Ordering::SeqCst) {
                            break None;
                        }
                        if a.timeout.is_some_and(|t| idle_started.elapsed() >= t) {
                            timed_out = true;
                            break None;
                        }
                    }
                }
            };
            let Some(item) = item else {
                return Ok(());
            };
            let d = match item {
                None => {
                    return Err(CliError::new(
                        BROKER,
                        "broker",
                        format!(
                            "the consumer on queue '{q}' was ended by the broker (queue deleted?)"
                        ),
                    ))
                }
                Some(Err(e)) => {
                    return Err(CliError::kelp(e, format_args!("consuming from '{q}'")))
                }
                Some(Ok(d)) => d,
            };
            let hold = held_back(got + 1);
            if a.ack == AckMode::Auto && !no_ack && !hold {
                s.ch.raw()
                    .ack(d.delivery_tag, false)
                    .await
                    .ctx("cannot acknowledge")?;
            }
            let shown = Shown::new(&d, q);
            let written = pb.suspend(|| emit(&shown, format))?;
            if !written {
                // Nobody reads any more: leave this one unacknowledged (it goes back).
                return Ok(());
            }
            if hold && a.ack != AckMode::None {
                held_tag = Some(d.delivery_tag);
            } else if a.ack == AckMode::Manual {
                s.ch.raw()
                    .ack(d.delivery_tag, false)
                    .await
                    .ctx("cannot acknowledge")?;
            }
            got += 1;
            pb.inc(1);
        }
    }
    .await;
    pb.finish_and_clear();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.ch.raw().cancel(&tag)).await;
    if let Some(t) = held_tag {
        // Every message up to this tag was printed (a later one that could not be is not
        // covered: it was delivered after).
        let acked = s.ch.raw().ack(t, true).await;
        if outcome.is_ok() {
            acked.ctx("cannot acknowledge")?;
        }
    }
    outcome?;
    if !s.json && std::io::stderr().is_terminal() {
        let what = if got == 1 { "message" } else { "messages" };
        eprintln!("kelp: consumed {got} {what} from '{q}'");
    }
    if timed_out && got == 0 {
        let after = a.timeout.unwrap_or_default();
        return Err(CliError::new(
            EMPTY,
            "empty",
            format!("no message on queue '{q}' within {after:?}"),
        ));
    }
    Ok(())
}

/// `kelp get`.
pub async fn get(s: &Session, a: &GetArgs) -> Result<(), CliError> {
    let format = if s.json { OutputFormat::Json } else { a.output };
    let q = a.queue.as_str();
    let d =
        s.ch.raw()
            .get(q, false)
            .await
            .ctx(format_args!("cannot get from queue '{q}'"))?;
    let Some(d) = d else {
        if s.json {
            print_json(&json!({"queue": q, "empty": true}));
        }
        return Err(CliError::new(
            EMPTY,
            "empty",
            format!("queue '{q}' is empty"),
        ));
    };
    let shown = Shown::new(&d, q);
    let written = emit(&shown, format)?;
    if a.requeue || !written {
        s.ch.raw()
            .reject(d.delivery_tag, true)
            .await
            .ctx("cannot requeue the message")?;
    } else {
        s.ch.raw()
            .ack(d.delivery_tag, false)
            .await
            .ctx("cannot acknowledge the message")?;
    }
    Ok(())
}

/// `kelp declare …`.
pub async fn declare(s: &Session, c: &DeclareCommand) -> Result<(), CliError> {
    match c {
        DeclareCommand::Exchange {
            name,
            kind,
            durable,
            auto_delete,
            args,
        } => {
            let mut ex = Exchange::new(name.as_str())
                .kind(kind.as_str())
                .durable(*durable)
                .auto_delete(*auto_delete);
            ex.arguments = parse_table("--arg", args)?;
            if ex.is_default() {
                return Err(CliError::usage("the default exchange cannot be declared"));
            }
            ex.declare(&s.ch)
                .await
                .ctx(format_args!("cannot declare exchange '{name}'"))?;
            if s.json {
                print_json(
                    &json!({"declared": "exchange", "name": name, "type": kind.as_str(),
                    "durable": durable, "auto_delete": auto_delete}),
                );
            } else {
                outln!("declared {} exchange '{name}'", kind.as_str());
            }
        }
        DeclareCommand::Queue {
            name,
            durable,
            exclusive,
            auto_delete,
            max_length,
            message_ttl,
            dead_letter_exchange,
            args,
        } => {
            let mut q = Queue::new(name.as_str())
                .durable(*durable)
                .auto_delete(*auto_delete)
                .exclusive(*exclusive);
            if let Some(n) = max_length {
                q = q.max_length(*n);
            }
            if let Some(ms) = message_ttl {
                q = q.message_ttl(Duration::from_millis(*ms));
            }
            if let Some(x) = dead_letter_exchange {
                q = q.dead_letter(x, None);
            }
            for (k, v) in parse_table("--arg", args)?.iter() {
                q.queue_arguments.insert(k.clone(), v.clone());
            }
            if *exclusive && !s.json {
                eprintln!("kelp: note: an exclusive queue is deleted when kelp exits");
            }
            let d = q
                .declare(&s.ch)
                .await
                .ctx(format_args!("cannot declare queue '{name}'"))?;
            if s.json {
                print_json(&json!({"declared": "queue", "name": d.name,
                    "messages": d.message_count, "consumers": d.consumer_count}));
            } else {
                outln!(
                    "declared queue '{}' ({} messages, {} consumers)",
                    d.name,
                    d.message_count,
                    d.consumer_count
                );
            }
        }
        DeclareCommand::Binding {
            queue,
            exchange,
            routing_key,
            args,
        } => {
            let table = parse_table("--arg", args)?;
            Queue::new(queue.as_str())
                .bind_to(&s.ch, exchange, routing_key, table)
                .await
                .ctx(format_args!(
                    "cannot bind queue '{queue}' to exchange '{exchange}'"
                ))?;
            if s.json {
                print_json(&json!({"declared": "binding", "queue": queue,
                    "exchange": exchange, "routing_key": routing_key}));
            } else {
                outln!("bound queue '{queue}' to exchange '{exchange}' with routing key '{routing_key}'");
            }
        }
    }
    Ok(())
}

/// `kelp purge`.
pub async fn purge(s: &Session, queue: &str) -> Result<(), CliError> {
    let n = Queue::new(queue)
        .purge(&s.ch)
        .await
        .ctx(format_args!("cannot purge queue '{queue}'"))?;
    if s.json {
        print_json(&json!({"purged": n, "queue": queue}));
    } else {
        outln!("purged {n} messages from queue '{queue}'");
    }
    Ok(())
}

/// `kelp delete …`.
pub async fn delete(s: &Session, c: &DeleteCommand) -> Result<(), CliError> {
    match c {
        DeleteCommand::Queue {
            name,
            if_unused,
            if_empty,
        } => {
            let n = Queue::new(name.as_str())
                .delete(&s.ch, *if_unused, *if_empty)
                .await
                .ctx(format_args!("cannot delete queue '{name}'"))?;
            if s.json {
                print_json(&json!({"deleted": "queue", "name": name, "messages": n}));
            } else {
                outln!("deleted queue '{name}' ({n} messages)");
            }
        }
        DeleteCommand::Exchange { name, if_unused } => {
            Exchange::new(name.as_str())
                .delete(&s.ch, *if_unused)
                .await
                .ctx(format_args!("cannot delete exchange '{name}'"))?;
            if s.json {
                print_json(&json!({"deleted": "exchange", "name": name}));
            } else {
                outln!("deleted exchange '{name}'");
            }
        }
    }
    Ok(())
}

/// The keyword arguments of `kelp rpc call`, checked before connecting.
pub fn parse_kwargs(kwargs: &str) -> Result<Json, CliError> {
    let v: Json = serde_json::from_str(kwargs)
        .map_err(|e| CliError::usage(format!("--kwargs is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(CliError::usage(
            "--kwargs must be a JSON object (the keyword arguments)",
        ));
    }
    Ok(v)
}

/// What `kelp rpc call` was asked.
#[derive(Debug)]
pub struct RpcCall<'a> {
    /// The method.
    pub method: &'a str,
    /// Its keyword arguments.
    pub kwargs: Json,
    /// Pickle instead of JSON.
    pub pickle: bool,
    /// The local wait limit.
    pub timeout: Duration,
    /// The broker-side expiration.
    pub expiration: Option<Duration>,
    /// The RPC exchange.
    pub exchange: &'a str,
}

/// `kelp rpc call`.
pub async fn rpc_call(s: &Session, c: RpcCall<'_>) -> Result<(), CliError> {
    let format = if c.pickle {
        Format::Pickle
    } else {
        Format::Json
    };
    let rpc = Rpc::create(&s.ch, RpcOptions::new(format).exchange(c.exchange))
        .await
        .ctx("cannot set up the RPC (result queue, rpc.dlx)")?;
    let mut opts = CallOptions::default().timeout(c.timeout);
    if let Some(e) = c.expiration {
        opts = opts.expiration(e);
    }
    let method = c.method;
    let result = rpc.call_with(method, &c.kwargs, opts).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), rpc.close()).await;
    match result {
        Ok(v) => {
            if s.json {
                print_json(&json!({"method": method, "result": v}));
            } else {
                outln!("{v}");
            }
            Ok(())
        }
        Err(RpcError::Remote(r)) => Err(CliError::new(
            RPC_FAILED,
            "remote_error",
            format!("`{method}` raised {}: {}", r.kind, r.message),
        )),
        Err(e @ RpcError::NoSuchMethod { .. }) => {
            Err(CliError::new(NACKED, "no_such_method", e.to_string()))
        }
        Err(e @ RpcError::Timeout { .. }) => {
            Err(CliError::new(RPC_FAILED, "timeout", e.to_string()))
        }
        Err(e @ RpcError::Expired { .. }) => {
            Err(CliError::new(RPC_FAILED, "expired", e.to_string()))
        }
        Err(RpcError::Kelp(e)) => Err(CliError::kelp(e, format_args!("calling `{method}`"))),
        Err(e) => Err(CliError::new(BROKER, "broker", e.to_string())),
    }
}

/// `kelp bench`.
pub async fn bench(s: &Session, a: &BenchArgs) -> Result<(), CliError> {
    let owned_queue = a.queue.is_none();
    let q = a
        .queue
        .clone()
        .unwrap_or_else(|| format!("kelp-bench-{}", std::process::id()));
    let d = Queue::new(q.as_str())
        .durable(false)
        .declare(&s.ch)
        .await
        .ctx(format_args!("cannot declare queue '{q}'"))?;
    if d.message_count > 0 {
        return Err(CliError::usage(format!(
            "queue '{q}' already holds {} messages: bench needs an empty queue",
            d.message_count
        )));
    }
    if a.confirm {
        s.ch.confirm_select()
            .await
            .ctx("cannot turn on publisher confirms")?;
    }
    let show = progress_allowed(s.json);
    let body = Bytes::from(vec![b'x'; a.size]);
    let options = PublishOptions::default()
        .routing_key(q.clone())
        .content_type("application/data")
        .content_encoding("binary")
        .delivery_mode(DeliveryMode::Transient);
    let producer = Producer::new(&s.ch).auto_declare(false);
    let pb = progress(show, Some(a.count), "publish");
    let window = if a.confirm { 256 } else { 1 };
    let published = publish_many(&producer, &body, &options, a.count, None, window, &pb).await;
    pb.finish_and_clear();
    let published = published?;
    if published.interrupted {
        let _ = Queue::new(q.as_str()).delete(&s.ch, false, false).await;
        return Err(CliError::usage("interrupted"));
    }

    s.ch.qos(1000, false).await.ctx("cannot set the prefetch")?;
    let (tag, mut stream) =
        s.ch.raw()
            .consume(q.as_str(), ConsumeSpec::default())
            .await
            .ctx(format_args!("cannot consume from '{q}'"))?;
    let pb = progress(show, Some(published.sent), "consume");
    let started = Instant::now();
    let mut got = 0u64;
    let mut last_tag = 0u64;
    let consumed: Result<(), CliError> = async {
        while got < published.sent {
            let item = tokio::time::timeout(Duration::from_secs(30), next_delivery(&mut stream))
                .await
                .map_err(|_| {
                    CliError::new(
                        BROKER,
                        "timeout",
                        format!(
                            "bench: only {got} of {} messages came back within 30s",
                            published.sent
                        ),
                    )
                })?;
            let d = match item {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(CliError::kelp(e, "bench: consuming")),
                None => return Err(CliError::new(BROKER, "broker", "bench: the consumer ended")),
            };
            got += 1;
            last_tag = d.delivery_tag;
            if got % 100 == 0 {
                s.ch.raw().ack(last_tag, true).await.ctx("bench: ack")?;
            }
            pb.inc(1);
        }
        if got % 100 != 0 {
            s.ch.raw().ack(last_tag, true).await.ctx("bench: ack")?;
        }
        Ok(())
    }
    .await;
    let consume_elapsed = started.elapsed();
    pb.finish_and_clear();
    let _ = s.ch.raw().cancel(&tag).await;
    if owned_queue {
        let _ = Queue::new(q.as_str()).delete(&s.ch, false, false).await;
    }
    consumed?;
    let pub_rate = rate(published.sent, published.elapsed);
    let con_rate = rate(got, consume_elapsed);
    if s.json {
        print_json(&json!({
            "transport": s.conn.transport_name(),
            "count": a.count,
            "size": a.size,
            "confirm": a.confirm,
            "published": published.sent,
            "refused": published.refused,
            "publish_seconds": published.elapsed.as_secs_f64(),
            "publish_rate": pub_rate,
            "consumed": got,
            "consume_seconds": consume_elapsed.as_secs_f64(),
            "consume_rate": con_rate,
        }));
    } else {
        outln!(
            "{} transport, {} messages of {} bytes{}",
            s.conn.transport_name(),
            a.count,
            a.size,
            if a.confirm {
                ", publisher confirms"
            } else {
                ""
            }
        );
        outln!(
            "publish: {:>10.0} msg/s ({:.3}s)",
            pub_rate,
            published.elapsed.as_secs_f64()
        );
        outln!(
            "consume: {:>10.0} msg/s ({:.3}s)",
            con_rate,
            consume_elapsed.as_secs_f64()
        );
    }
    match published.first_refusal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `kelp tutorial`.
pub async fn tutorial(s: &Session) -> Result<(), CliError> {
    let json_mode = s.json;
    let say = |step: &str, text: String| {
        if json_mode {
            print_json(&json!({"step": step, "text": text}));
        } else {
            outln!("{text}\n");
        }
    };
    let exchange_name = "kelp.tutorial";
    let queue_name = format!("kelp.tutorial.{}", std::process::id());
    let key = "greetings";
    say(
        "connect",
        format!(
            "1. Connected to {} (the {} transport). Every kelp command does this first; the URL \
comes from --url or $KELP_URL.",
            s.conn.url(),
            s.conn.transport_name()
        ),
    );

    let exchange = Exchange::direct(exchange_name).durable(false);
    let queue = Queue::new(queue_name.as_str())
        .durable(false)
        .exchange(exchange.clone())
        .routing_key(key);
    s.ch.declare_queue(queue.clone())
        .await
        .ctx("cannot declare the tutorial's exchange and queue")?;
    say(
        "declare",
        format!(
            "2. Declared the direct exchange '{exchange_name}' and the queue '{queue_name}', \
bound with the routing key '{key}'. A direct exchange hands a message to every queue bound with \
exactly its routing key.\n   Same thing by hand:\n     kelp declare exchange {exchange_name} \
--type direct\n     kelp declare queue {queue_name}\n     kelp declare binding --queue \
{queue_name} --exchange {exchange_name} --routing-key {key}"
        ),
    );

    // Steps 3 and 4; the queue and exchange are deleted whatever happens in them.
    let steps: Result<(), CliError> = async {
        let producer = Producer::new(&s.ch)
            .exchange(exchange.clone())
            .serializer("json");
        let greetings = ["hello", "hola", "kia ora"];
        for (i, text) in greetings.iter().enumerate() {
            producer
                .publish_serde(
                    &json!({"n": i + 1, "greeting": text}),
                    PublishOptions::default().routing_key(key),
                )
                .await
                .ctx("cannot publish")?;
        }
        say(
            "publish",
            format!(
                "3. Published {} messages to '{exchange_name}' with routing key '{key}', serialized \
    as JSON (content type application/json), persistent. The exchange routed them into \
    '{queue_name}'.\n   Same thing by hand:\n     kelp publish --exchange {exchange_name} \
    --routing-key {key} --serializer json '{{\"n\": 1, \"greeting\": \"hello\"}}'",
                greetings.len()
            ),
        );

        let mut consumer = kelp::Consumer::builder(&s.ch)
            .queue(queue.clone())
            .prefetch_count(10)
            .build()
            .await
            .ctx("cannot start a consumer")?;
        let mut lines = Vec::new();
        for _ in 0..greetings.len() {
            let mut msg = match consumer.next_timeout(Duration::from_secs(10)).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(CliError::new(
                        BROKER,
                        "broker",
                        "the tutorial's consumer ended early",
                    ))
                }
                Err(e) => return Err(CliError::kelp(e, "waiting for the tutorial's messages")),
            };
            let body: Json = msg.decode().ctx("cannot decode a message")?;
            lines.push(format!(
                "     {body}  (routing key '{}', delivery tag {})",
                msg.delivery_info().routing_key,
                msg.delivery_tag()
            ));
            msg.ack().await.ctx("cannot acknowledge")?;
        }
        let _ = consumer.cancel().await;
        say(
            "consume",
            format!(
                "4. Consumed them back in order, decoded the JSON and acknowledged each one (an \
    unacknowledged message goes back to the queue when the consumer goes away):\n{}\n   Same thing \
    by hand:\n     kelp consume --queue {queue_name} --count 3 --output json",
                lines.join("\n")
            ),
        );
        Ok(())
    }
    .await;
    let cleanup = async {
        Queue::new(queue_name.as_str())
            .delete(&s.ch, false, false)
            .await
            .ctx("cannot delete the tutorial's queue")?;
        exchange
            .delete(&s.ch, false)
            .await
            .ctx("cannot delete the tutorial's exchange")?;
        Ok::<(), CliError>(())
    }
    .await;
    steps?;
    cleanup?;
    say(
        "cleanup",
        format!(
            "5. Deleted the queue and the exchange (kelp delete queue {queue_name}; kelp delete \
exchange {exchange_name}). Next: `kelp publish --help`, `kelp consume --help`, and `kelp bench` \
for a quick throughput run."
        ),
    );
    Ok(())
}

/// `kelp ping`.
pub async fn ping(url: &str, connect_timeout: Duration, json_mode: bool) -> Result<(), CliError> {
    let shown = kelp::error::mask_url(url);
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    if scheme == "amqp" || scheme == "amqps" {
        let conn = tokio::time::timeout(connect_timeout, kelp::amqp::Connection::open(url))
            .await
            .map_err(|_| {
                CliError::new(
                    BROKER,
                    "connection",
                    format!("cannot connect to {shown}: no answer within {connect_timeout:?}"),
                )
            })?
            .map_err(|e| CliError::kelp(e.into(), format_args!("cannot connect to {shown}")))?;
        let t = conn.tuning();
        let get = |k: &str| {
            t.server_properties
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned()
        };
        if json_mode {
            print_json(
                &json!({"url": conn.url().to_string(), "transport": "amqp", "product": get("product"),
                "version": get("version"), "frame_max": t.frame_max,
                "heartbeat_s": t.heartbeat.as_secs_f64()}),
            );
        } else {
            outln!(
                "{}: {} {} (frame_max {}, heartbeat {:?})",
                conn.url(),
                get("product"),
                get("version"),
                t.frame_max,
                t.heartbeat
            );
        }
        let _ = conn.close().await;
        return Ok(());
    }
    let g = crate::cli::Global {
        url: url.to_owned(),
        json: json_mode,
        connect_timeout,
    };
    let s = Session::open(&g).await?;
    if json_mode {
        print_json(&json!({"url": s.conn.url(), "transport": s.conn.transport_name()}));
    } else {
        outln!(
            "{}: connected ({} transport)",
            s.conn.url(),
            s.conn.transport_name()
        );
    }
    s.close().await;
    Ok(())
}

/// Make sure stdout writes do not linger in a buffer.
pub fn flush_stdout() {
    let _ = std::io::stdout().flush();
}
