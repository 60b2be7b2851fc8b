//! The amqprs 2 side of each scenario.

use std::collections::BTreeSet;
use std::time::Instant;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use crate::report::{Measurement, Percentiles, Timer};
use crate::{fresh_queue_name, BenchResult, Opts, PAYLOAD, POLL_INTERVAL, PREFETCH};

/// amqprs takes host/port/user/password/vhost separately (its URI parser sits behind the
/// `urispec` feature): split `amqp://user:pass@host:port/vhost` by hand.
pub fn connection_args(url: &str) -> BenchResult<OpenConnectionArguments> {
    let rest = url
        .strip_prefix("amqp://")
        .ok_or("only amqp:// URLs are supported")?;
    let (authority, vhost) = match rest.split_once('/') {
        Some((authority, vhost)) => (authority, percent_decode(vhost)?),
        None => (rest, "/".to_owned()),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((u, p)) => (percent_decode(u)?, percent_decode(p)?),
            None => (percent_decode(info)?, String::new()),
        },
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (host, port.parse()?),
        None => (hostport, 5672),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(OpenConnectionArguments::new(host, port, &user, &password)
        .virtual_host(&vhost)
        .finish())
}

fn percent_decode(s: &str) -> BenchResult<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated percent escape")?;
            out.push(u8::from_str_radix(hex, 16)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

async fn connect(url: &str) -> BenchResult<(Connection, Channel)> {
    let conn = Connection::open(&connection_args(url)?).await?;
    let ch = conn.open_channel(None).await?;
    Ok((conn, ch))
}

async fn close(conn: Connection, ch: Channel) -> BenchResult<()> {
    ch.close().await?;
    conn.close().await?;
    Ok(())
}

/// Declares `queue`, returning (name, message count).
async fn declare(ch: &Channel, args: QueueDeclareArguments) -> BenchResult<(String, u32)> {
    let (name, messages, _consumers) = ch
        .queue_declare(args)
        .await?
        .ok_or("amqprs: queue.declare without reply")?;
    Ok((name, messages))
}

/// amqprs takes the body as an owned `Vec<u8>` and the arguments by value: a copy of each per publish.
async fn publish_one(ch: &Channel, args: &BasicPublishArguments) -> BenchResult<()> {
    Ok(ch
        .basic_publish(BasicProperties::default(), PAYLOAD.to_vec(), args.clone())
        .await?)
}

/// Polls a passive queue.declare until the broker reports `count` messages.
async fn wait_enqueued(ch: &Channel, queue: &str, count: u64) -> BenchResult<()> {
    loop {
        let (_, got) =
            declare(ch, QueueDeclareArguments::new(queue).passive(true).finish()).await?;
        let got = u64::from(got);
        if got == count {
            return Ok(());
        }
        if got > count {
            return Err(format!("queue {queue} holds {got} messages, expected {count}").into());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// What the broker has confirmed so far: every tag `<= upto`, and how many nacks came.
#[derive(Debug, Clone, Copy, Default)]
struct Confirmed {
    upto: u64,
    nacks: u64,
}

/// amqprs reports publisher confirms only through `ChannelCallback::publish_ack/nack`; this
/// one folds them (single or `multiple`, possibly out of order) into a watch channel.
#[derive(Debug)]
struct ConfirmTracker {
    state: Confirmed,
    out_of_order: BTreeSet<u64>,
    tx: watch::Sender<Confirmed>,
}

impl ConfirmTracker {
    fn settle(&mut self, tag: u64, multiple: bool, nack: bool) {
        let s = &mut self.state;
        if nack {
            s.nacks += 1;
        }
        if multiple {
            s.upto = s.upto.max(tag);
            self.out_of_order = self.out_of_order.split_off(&(s.upto + 1));
        } else if tag > s.upto {
            self.out_of_order.insert(tag);
        }
        while self.out_of_order.remove(&(s.upto + 1)) {
            s.upto += 1;
        }
        self.tx.send_replace(*s);
    }
}

#[async_trait]
impl ChannelCallback for ConfirmTracker {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        // sic: amqprs spells it `mutiple()` on Ack (but `multiple()` on Nack).
        self.settle(ack.delivery_tag(), ack.mutiple(), false);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), true);
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// `publish` (no confirms, timed until the broker holds all) or `confirm` (timed until all acked).
pub async fn publish(opts: &Opts, confirm: bool) -> BenchResult<Measurement> {
    let (conn, ch) = connect(&opts.url).await?;
    let queue = fresh_queue_name("amqprs", if confirm { "confirm" } else { "publish" });
    declare(&ch, QueueDeclareArguments::new(&queue)).await?;
    let args = BasicPublishArguments::new("", &queue);
    let window = opts.window as u64;

    let m = if confirm {
        let (tx, mut rx) = watch::channel(Confirmed::default());
        ch.register_callback(ConfirmTracker {
            state: Confirmed::default(),
            out_of_order: BTreeSet::new(),
            tx,
        })
        .await?;
        ch.confirm_select(ConfirmSelectArguments::new(false))
            .await?;

        let timer = Timer::start()?;
        let mut known_upto = 0;
        for published in 0..opts.count {
            if published - known_upto >= window {
                known_upto = rx.wait_for(|c| published - c.upto < window).await?.upto;
            }
            publish_one(&ch, &args).await?;
        }
        let nacks = rx.wait_for(|c| c.upto >= opts.count).await?.nacks;
        let m = timer.stop(opts.count)?;
        if nacks > 0 {
            return Err(format!("amqprs: broker nacked {nacks} publishes").into());
        }
        m
    } else {
        let timer = Timer::start()?;
        for _ in 0..opts.count {
            publish_one(&ch, &args).await?;
        }
        wait_enqueued(&ch, &queue, opts.count).await?;
        timer.stop(opts.count)?
    };

    ch.queue_delete(QueueDeleteArguments::new(&queue)).await?;
    close(conn, ch).await?;
    Ok(m)
}

async fn next_message(
    rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>,
) -> BenchResult<ConsumerMessage> {
    Ok(rx.recv().await.ok_or("amqprs: consumer ended early")?)
}

fn delivery_tag(msg: &ConsumerMessage) -> BenchResult<u64> {
    Ok(msg
        .deliver
        .as_ref()
        .ok_or("amqprs: message without deliver")?
        .delivery_tag())
}

async fn ack(ch: &Channel, msg: &ConsumerMessage) -> BenchResult<()> {
    Ok(ch
        .basic_ack(BasicAckArguments::new(delivery_tag(msg)?, false))
        .await?)
}

/// Prefill (untimed), then consume with prefetch 1000 and ack each, timed until all received.
pub async fn consume(opts: &Opts) -> BenchResult<Measurement> {
    let (conn, ch) = connect(&opts.url).await?;
    let queue = fresh_queue_name("amqprs", "consume");
    declare(&ch, QueueDeclareArguments::new(&queue)).await?;
    let args = BasicPublishArguments::new("", &queue);
    for _ in 0..opts.count {
        publish_one(&ch, &args).await?;
    }
    wait_enqueued(&ch, &queue, opts.count).await?;

    let timer = Timer::start()?;
    ch.basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await?;
    let (_tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&queue, ""))
        .await?;
    for _ in 0..opts.count {
        let msg = next_message(&mut rx).await?;
        ack(&ch, &msg).await?;
    }
    let m = timer.stop(opts.count)?;

    ch.queue_delete(QueueDeleteArguments::new(&queue)).await?;
    close(conn, ch).await?;
    Ok(m)
}

/// Sequential request/reply round trips between two connections.
pub async fn rpc(opts: &Opts) -> BenchResult<Measurement> {
    // Server side: consumes requests, replies to reply_to with the same correlation id.
    let (server_conn, server_ch) = connect(&opts.url).await?;
    let request_queue = fresh_queue_name("amqprs", "rpc");
    declare(&server_ch, QueueDeclareArguments::new(&request_queue)).await?;
    let (_tag, mut requests) = server_ch
        .basic_consume_rx(BasicConsumeArguments::new(&request_queue, ""))
        .await?;

    // Client side: an exclusive, server-named reply queue.
    let (client_conn, client_ch) = connect(&opts.url).await?;
    let (reply_queue, _) =
        declare(&client_ch, QueueDeclareArguments::exclusive_server_named()).await?;
    let (_tag, mut replies) = client_ch
        .basic_consume_rx(BasicConsumeArguments::new(&reply_queue, ""))
        .await?;

    let count = opts.count;
    let server = tokio::spawn(async move {
        for _ in 0..count {
            let mut request = next_message(&mut requests).await?;
            let req_props = request
                .basic_properties
                .as_ref()
                .ok_or("amqprs rpc: request without properties")?;
            let reply_to = req_props
                .reply_to()
                .ok_or("amqprs rpc: request without reply_to")?;
            let mut props = BasicProperties::default();
            if let Some(id) = req_props.correlation_id() {
                props.with_correlation_id(id);
            }
            let args = BasicPublishArguments::new("", reply_to);
            let body = request.content.take().unwrap_or_default();
            server_ch.basic_publish(props, body, args).await?;
            ack(&server_ch, &request).await?;
        }
        BenchResult::Ok((server_conn, server_ch))
    });

    let request_args = BasicPublishArguments::new("", &request_queue);
    let mut latencies = Vec::with_capacity(usize::try_from(count)?);
    let timer = Timer::start()?;
    for i in 0..count {
        let correlation_id = i.to_string();
        let props = BasicProperties::default()
            .with_reply_to(&reply_queue)
            .with_correlation_id(&correlation_id)
            .finish();
        let sent = Instant::now();
        client_ch
            .basic_publish(props, PAYLOAD.to_vec(), request_args.clone())
            .await?;
        let reply = next_message(&mut replies).await?;
        latencies.push(sent.elapsed());
        let got = reply
            .basic_properties
            .as_ref()
            .and_then(|p| p.correlation_id());
        if got != Some(&correlation_id) {
            return Err(format!("amqprs rpc: reply {got:?} to request {i}").into());
        }
        ack(&client_ch, &reply).await?;
    }
    let m = timer
        .stop(count)?
        .with_latency(Percentiles::from_samples(&mut latencies));

    let (server_conn, server_ch) = server.await??;
    client_ch
        .queue_delete(QueueDeleteArguments::new(&request_queue))
        .await?;
    close(client_conn, client_ch).await?;
    close(server_conn, server_ch).await?;
    Ok(m)
}

/// `sink`: publishes to the fake server, timed until its close-ok.
pub async fn sink(url: &str, count: u64) -> BenchResult<Measurement> {
    let (conn, ch) = connect(url).await?;
    let args = BasicPublishArguments::new("", "bench-q");
    let timer = Timer::start()?;
    for _ in 0..count {
        publish_one(&ch, &args).await?;
    }
    // amqprs sometimes reports its own I/O task gone by the time it closes ("failed to
    // register responder") even though everything was sent; the server counts what arrived,
    // so a real loss still shows.
    if let Err(e) = conn.close().await {
        eprintln!("amqprs: close after the sink run: {e}");
    }
    let m = timer.stop(count)?;
    drop(ch);
    Ok(m)
}

/// amqprs keeps its frame codec private (`amqprs::frame` is not a public module).
pub const NO_DECODER: &str = "amqprs: no public frame decoder";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() -> BenchResult<()> {
        let a = connection_args("amqp://guest:gu%40st@127.0.0.1:5673/%2f")?;
        assert_eq!(
            (a.get_host(), a.get_port(), a.get_virtual_host()),
            ("127.0.0.1", 5673, "/")
        );
        let b = connection_args("amqp://localhost")?;
        assert_eq!(
            (b.get_host(), b.get_port(), b.get_virtual_host()),
            ("localhost", 5672, "/")
        );
        let c = connection_args("amqp://u:p@h/vh")?;
        assert_eq!(c.get_virtual_host(), "vh");
        assert!(connection_args("http://x").is_err());
        Ok(())
    }

    #[test]
    fn confirm_tracker_folds_acks() {
        let (tx, rx) = watch::channel(Confirmed::default());
        let mut t = ConfirmTracker {
            state: Confirmed::default(),
            out_of_order: BTreeSet::new(),
            tx,
        };
        t.settle(2, false, false);
        assert_eq!(rx.borrow().upto, 0);
        t.settle(1, false, false);
        assert_eq!(rx.borrow().upto, 2);
        t.settle(5, false, true);
        t.settle(4, true, false);
        assert_eq!((rx.borrow().upto, rx.borrow().nacks), (5, 1));
        assert!(t.out_of_order.is_empty());
    }
}
