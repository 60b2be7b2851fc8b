//! The command line: every subcommand, flag and help text (clap derive). No logic here beyond
//! parsing values.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The URL used when neither `--url` nor `KELP_URL` is given.
pub const DEFAULT_URL: &str = "sqlite://kelp.db";

const ABOUT: &str = "kelp: publish, consume, inspect and declare on a message broker (AMQP, Redis, memory, SQLite) from the shell";

const LONG_ABOUT: &str = "\
kelp is the command-line face of the kelp messaging library: the same API over AMQP 0-9-1
(RabbitMQ), Redis (Kombu's layout), the in-process memory:// broker and an embedded SQLite
store. Every command takes the broker URL from --url, else $KELP_URL, else sqlite://kelp.db.

URLs:
  amqp://guest:guest@127.0.0.1:5672/%2f   RabbitMQ (amqps:// for TLS)
  redis://127.0.0.1:6379/0                Redis
  memory://                               in-process: lives and dies with this one command
  sqlite://path/to/file.db                embedded store (when the transport is built in)";

const EXIT_CODES: &str = "\
Exit codes (stable, for scripts):
  0  success
  1  usage error: bad arguments or flag values (clap's parse errors included), a body that is
     not valid for --serializer, an invalid URL or a URL scheme no transport handles
  2  connection or broker error: cannot connect, the broker refused (404 no such queue,
     406 precondition failed, ...), the connection dropped
  3  empty / nothing to do: `get` on an empty queue, `consume --timeout` that saw no message
  4  a publish was nacked or returned (unroutable with --mandatory); `rpc call` to a method
     nobody serves (the call comes back unroutable)
  5  `rpc call`: the remote method raised, or no answer came within --timeout / --expiration

With --json, every result is one JSON object per line on stdout, and an error is one JSON
object ({\"error\": ..., \"kind\": ..., \"exit_code\": ...}) on stderr.";

const EXAMPLES: &str = "\
Examples:
  export KELP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
  kelp declare queue tasks --durable
  kelp publish --routing-key tasks 'hello'
  echo '{\"id\": 7}' | kelp publish --routing-key tasks --serializer json -
  kelp get --queue tasks
  kelp consume --queue tasks --count 10 --output json
  kelp --url redis://127.0.0.1:6379/0 bench --count 20000
  kelp --url memory:// tutorial
  kelp completions bash > /etc/bash_completion.d/kelp";

fn long_help_tail() -> String {
    format!("{EXIT_CODES}\n\n{EXAMPLES}")
}

/// The `kelp` command line.
#[derive(Debug, Parser)]
#[command(
    name = "kelp",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = long_help_tail(),
    after_help = "Exit codes: 0 ok, 1 usage, 2 connection/broker, 3 empty, 4 nacked/returned, 5 rpc failed (see --help)",
    propagate_version = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// The options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Broker URL: amqp://, amqps://, redis://, memory:// or sqlite:// [default: $KELP_URL, else sqlite://kelp.db]
    #[arg(
        long,
        global = true,
        env = "KELP_URL",
        hide_env_values = true,
        default_value = DEFAULT_URL,
        hide_default_value = true,
        value_name = "URL"
    )]
    pub url: String,

    /// Machine-readable output: one JSON object per line (per message, per result)
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up connecting after this long (e.g. 500ms, 5s, 1m)
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a message (or many, for load)
    #[command(
        long_about = "Publish a message. The body comes from the BODY argument, from --file, or from \
stdin when BODY is `-`. Without --serializer the body is sent as it is: text/plain when it is \
UTF-8, else application/data (or the --content-type given). With --serializer json (or msgpack, \
yaml, pickle) the body is parsed as JSON first and encoded with that serializer.\n\n\
--count and --rate turn it into a load generator; --confirm waits for the broker's publisher \
confirms (a nack exits with 4); --mandatory makes an unroutable message come back (exit 4) \
and turns confirms on so the return is noticed.",
        after_long_help = "Examples:\n  \
kelp publish --routing-key tasks hello\n  \
kelp publish --declare-queue tasks --persistent --header attempt=1 --header trace=abc 'job 1'\n  \
kelp publish --exchange events --routing-key order.paid --serializer json '{\"order\": 7}'\n  \
cat big.bin | kelp publish --routing-key blobs --compression zstd -\n  \
kelp publish --routing-key load --count 100000 --rate 5000/s --confirm 'x'\n  \
kelp publish --routing-key nowhere --mandatory 'lost?'   # exit 4 if no queue is bound"
    )]
    Publish(Box<PublishArgs>),

    /// Consume messages from a queue and print them
    #[command(
        long_about = "Consume messages from a queue and print them to stdout, until --count messages \
were printed, the queue stayed idle for --timeout, or Ctrl-C.\n\n\
--ack manual (the default) acknowledges each message after it was printed (at-least-once); \
auto acknowledges it as it arrives, before printing (at-most-once); none never acknowledges: \
the messages go back to the queue when kelp exits (a way to peek).\n\n\
--output text prints each body on a line (JSON bodies compact, binary bodies as base64:...), \
json prints one object per message with body (decoded when text or JSON, else base64), \
body_encoding, properties and delivery_info; raw writes the bodies' bytes as they are. \
Compressed bodies are decompressed first.",
        after_long_help = "Examples:\n  \
kelp consume --queue tasks\n  \
kelp consume --queue tasks --count 10 --output json | jq .body\n  \
kelp consume --queue tasks --timeout 5s --ack none      # peek: leaves the messages queued\n  \
kelp consume --queue blobs --count 1 --output raw > blob.bin"
    )]
    Consume(ConsumeArgs),

    /// Fetch one message (basic.get); exit 3 when the queue is empty
    #[command(
        long_about = "Fetch one message from a queue with basic.get and print it (see `consume` for \
--output). It is acknowledged after printing (--ack, the default) or put back (--requeue). \
An empty queue exits with 3.",
        after_long_help = "Examples:\n  \
kelp get --queue tasks\n  \
kelp get --queue tasks --requeue --output json   # look without taking\n  \
while kelp get -q tasks > job.txt; do process job.txt; done"
    )]
    Get(GetArgs),

    /// Declare an exchange, a queue or a binding
    #[command(subcommand)]
    Declare(DeclareCommand),

    /// Remove every ready message from a queue
    #[command(after_long_help = "Examples:\n  kelp purge tasks\n  kelp --json purge tasks")]
    Purge(PurgeArgs),

    /// Delete a queue or an exchange
    #[command(subcommand)]
    Delete(DeleteCommand),

    /// Remote procedure calls (aio-pika compatible)
    #[command(subcommand)]
    Rpc(RpcCommand),

    /// A small publish-then-consume throughput run against any URL
    #[command(
        long_about = "Declare a temporary queue, publish --count messages of --size bytes into it, \
consume them all back (acknowledged), delete the queue, and print the publish and consume rates \
in messages per second. For careful benchmarks use the kelp-bench binary.",
        after_long_help = "Examples:\n  \
kelp --url memory:// bench\n  \
kelp --url amqp://guest:guest@127.0.0.1:5672/%2f bench --count 50000 --size 1024 --confirm\n  \
kelp --json --url redis://127.0.0.1:6379/0 bench"
    )]
    Bench(BenchArgs),

    /// Run a short publish -> consume demo on the chosen URL and explain each step
    #[command(after_long_help = "Examples:\n  kelp --url memory:// tutorial\n  \
kelp --url amqp://guest:guest@127.0.0.1:5672/%2f tutorial")]
    Tutorial,

    /// Print a shell completion script
    #[command(after_long_help = "Examples:\n  \
kelp completions bash > ~/.local/share/bash-completion/completions/kelp\n  \
kelp completions zsh > ~/.zfunc/_kelp\n  \
kelp completions fish > ~/.config/fish/completions/kelp.fish")]
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Connect and report what answered
    Ping,

    /// Print kelp's version
    #[command(hide = true)]
    Version,
}

/// `kelp publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The body; `-` reads it from stdin
    #[arg(
        value_name = "BODY",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub body: Option<String>,

    /// Read the body from this file
    #[arg(short, long, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// The exchange to publish to (default: the default exchange, which routes by queue name)
    #[arg(short, long, default_value = "", hide_default_value = true)]
    pub exchange: String,

    /// The routing key [default: the --declare-queue name, else empty]
    #[arg(short = 'k', long, visible_alias = "key")]
    pub routing_key: Option<String>,

    /// An application header, repeatable: k=v (numbers and true/false are typed) or k:=JSON
    #[arg(short = 'H', long = "header", value_name = "K=V")]
    pub headers: Vec<String>,

    /// content_type property (for bodies sent as they are)
    #[arg(long)]
    pub content_type: Option<String>,

    /// content_encoding property (for bodies sent as they are)
    #[arg(long)]
    pub content_encoding: Option<String>,

    /// correlation_id property
    #[arg(long)]
    pub correlation_id: Option<String>,

    /// reply_to property
    #[arg(long)]
    pub reply_to: Option<String>,

    /// priority property (0-255; queues with x-max-priority honour it)
    #[arg(long)]
    pub priority: Option<u8>,

    /// expiration property: drop the message if not consumed within this many milliseconds
    #[arg(long, value_name = "MS")]
    pub expiration: Option<u64>,

    /// delivery_mode 2: the broker writes it to disk (the default)
    #[arg(long, conflicts_with = "transient")]
    pub persistent: bool,

    /// delivery_mode 1: kept in memory only
    #[arg(long)]
    pub transient: bool,

    /// message_id property
    #[arg(long)]
    pub message_id: Option<String>,

    /// type property
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,

    /// app_id property
    #[arg(long)]
    pub app_id: Option<String>,

    /// Encode the body with a serializer; json, msgpack, yaml and pickle parse it as JSON first
    #[arg(short, long, value_parser = ["json", "msgpack", "yaml", "pickle", "raw", "text"])]
    pub serializer: Option<String>,

    /// Compress the body (sets the `compression` header as Kombu does)
    #[arg(short, long, value_parser = ["zlib", "gzip", "bzip2", "lzma", "xz", "zstd", "brotli"])]
    pub compression: Option<String>,

    /// Publish the message this many times
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Publish at most this many messages per second (e.g. 500 or 500/s)
    #[arg(long, value_parser = parse_rate, value_name = "N/s")]
    pub rate: Option<f64>,

    /// Wait for publisher confirms; a nacked publish exits with 4
    #[arg(long)]
    pub confirm: bool,

    /// Ask the broker to return the message if no queue takes it (exit 4); implies --confirm
    #[arg(long)]
    pub mandatory: bool,

    /// Make sure this queue exists (declared durable unless it already exists); bound to
    /// --exchange with the routing key when an exchange is given
    #[arg(long, value_name = "QUEUE")]
    pub declare_queue: Option<String>,
}

/// How `consume` acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckMode {
    /// Acknowledge each message as it arrives, before printing (at-most-once)
    Auto,
    /// Acknowledge each message after it was printed (at-least-once)
    Manual,
    /// Never acknowledge: the messages go back to the queue when kelp exits
    None,
}

/// How messages are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The body, one message per line (binary bodies as base64:...)
    Text,
    /// One JSON object per message: body, body_encoding, properties, delivery_info
    Json,
    /// The bodies' bytes, as they are, nothing in between
    Raw,
}

/// `kelp consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The queue to consume from
    #[arg(short, long)]
    pub queue: String,

    /// When to acknowledge
    #[arg(long, value_enum, default_value_t = AckMode::Manual)]
    pub ack: AckMode,

    /// Stop after this many messages [default: no limit]
    #[arg(short = 'n', long)]
    pub count: Option<u64>,

    /// Stop when no message came for this long (e.g. 500ms, 5s); exit 3 if none came at all
    #[arg(short, long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,

    /// How many unacknowledged messages the broker may send ahead [default: --count up to 1000, else 100]; 0 = no limit
    #[arg(long)]
    pub prefetch: Option<u16>,

    /// How to print messages (--json means json)
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// `kelp get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The queue to take a message from
    #[arg(short, long)]
    pub queue: String,

    /// Acknowledge the message after printing it (the default)
    #[arg(long, conflicts_with = "requeue")]
    pub ack: bool,

    /// Put the message back after printing it
    #[arg(long)]
    pub requeue: bool,

    /// How to print the message (--json means json)
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExchangeType {
    /// Routes by exact routing key
    Direct,
    /// Routes by routing-key pattern (`*` one word, `#` any)
    Topic,
    /// Copies to every bound queue
    Fanout,
    /// Routes by header values
    Headers,
}

impl ExchangeType {
    /// The AMQP name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }
}

/// `kelp declare …`.
#[derive(Debug, Subcommand)]
pub enum DeclareCommand {
    /// Declare an exchange
    #[command(after_long_help = "Examples:\n  \
kelp declare exchange events --type topic --durable\n  \
kelp declare exchange delayed --type direct --arg alternate-exchange=unrouted")]
    Exchange {
        /// The exchange's name
        name: String,
        /// The exchange type
        #[arg(short = 't', long = "type", value_enum, default_value_t = ExchangeType::Direct)]
        kind: ExchangeType,
        /// Survive a broker restart
        #[arg(long)]
        durable: bool,
        /// Delete it when its last binding goes
        #[arg(long)]
        auto_delete: bool,
        /// An argument, repeatable: k=v (numbers and true/false are typed) or k:=JSON
        #[arg(long = "arg", value_name = "K=V")]
        args: Vec<String>,
    },
    /// Declare a queue
    #[command(after_long_help = "Examples:\n  \
kelp declare queue tasks --durable\n  \
kelp declare queue capped --max-length 1000 --message-ttl 60000 --dead-letter-exchange dlx\n  \
kelp declare queue q3 --durable --arg x-queue-type=quorum")]
    Queue {
        /// The queue's name
        name: String,
        /// Survive a broker restart
        #[arg(long)]
        durable: bool,
        /// Only this connection may use it (deleted when kelp exits: rarely useful here)
        #[arg(long)]
        exclusive: bool,
        /// Delete it when its last consumer goes
        #[arg(long)]
        auto_delete: bool,
        /// x-max-length: keep at most this many messages
        #[arg(long, value_name = "N")]
        max_length: Option<u32>,
        /// x-message-ttl: drop messages older than this many milliseconds
        #[arg(long, value_name = "MS")]
        message_ttl: Option<u64>,
        /// x-dead-letter-exchange: where rejected and expired messages go
        #[arg(long, value_name = "EXCHANGE")]
        dead_letter_exchange: Option<String>,
        /// An argument, repeatable: k=v (numbers and true/false are typed) or k:=JSON
        #[arg(long = "arg", value_name = "K=V")]
        args: Vec<String>,
    },
    /// Bind a queue to an exchange
    #[command(after_long_help = "Examples:\n  \
kelp declare binding --queue audit --exchange events --routing-key 'order.*'\n  \
kelp declare binding --queue big --exchange hdrs --arg x-match=all --arg size=big")]
    Binding {
        /// The queue
        #[arg(short, long)]
        queue: String,
        /// The exchange
        #[arg(short, long)]
        exchange: String,
        /// The binding key
        #[arg(short = 'k', long, visible_alias = "key", default_value = "")]
        routing_key: String,
        /// A binding argument, repeatable: k=v or k:=JSON
        #[arg(long = "arg", value_name = "K=V")]
        args: Vec<String>,
    },
}

/// `kelp purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// The queue to empty
    pub queue: String,
}

/// `kelp delete …`.
#[derive(Debug, Subcommand)]
pub enum DeleteCommand {
    /// Delete a queue (and its messages)
    #[command(after_long_help = "Examples:\n  kelp delete queue tasks\n  \
kelp delete queue tasks --if-empty --if-unused")]
    Queue {
        /// The queue's name
        name: String,
        /// Only if it has no consumers
        #[arg(long)]
        if_unused: bool,
        /// Only if it has no messages
        #[arg(long)]
        if_empty: bool,
    },
    /// Delete an exchange
    #[command(after_long_help = "Examples:\n  kelp delete exchange events")]
    Exchange {
        /// The exchange's name
        name: String,
        /// Only if no queue is bound to it
        #[arg(long)]
        if_unused: bool,
    },
}

/// `kelp rpc …`.
#[derive(Debug, Subcommand)]
pub enum RpcCommand {
    /// Call a remote method served by kelp or aio-pika (`RPC` / `JsonRPC`) and print its result
    #[command(
        long_about = "Call METHOD with keyword arguments (a JSON object) the way aio-pika's \
`await rpc.call(METHOD, kwargs)` does, and print the result as JSON. The body format is JSON \
(aio-pika's JsonRPC) unless --pickle (aio-pika's RPC, its default) is given; the global --json \
flag prints the result as a JSON object and keeps the JSON format.\n\n\
Exit codes: 4 when no queue serves METHOD (the call comes back unroutable), 5 when the \
method raised, or no answer came within --timeout, or the call expired (--expiration).",
        after_long_help = "Examples:\n  \
kelp rpc call multiply --kwargs '{\"x\": 6, \"y\": 7}'\n  \
kelp rpc call report --pickle --timeout 2m\n  \
kelp --json rpc call ping"
    )]
    Call {
        /// The method's name (its queue's name)
        method: String,
        /// Keyword arguments, as a JSON object
        #[arg(long, default_value = "{}", value_name = "JSON")]
        kwargs: String,
        /// Use pickle, as aio-pika's `RPC` (default: JSON, as `JsonRPC`)
        #[arg(long)]
        pickle: bool,
        /// Stop waiting for the answer after this long
        #[arg(short, long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
        /// Let the call expire in the method queue if no callee takes it within this long
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        expiration: Option<Duration>,
        /// The RPC's exchange (empty: the default exchange, as aio-pika's default)
        #[arg(short, long, default_value = "", hide_default_value = true)]
        exchange: String,
    },
}

/// `kelp bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// How many messages
    #[arg(short = 'n', long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Body size in bytes
    #[arg(short, long, default_value_t = 256)]
    pub size: usize,

    /// Publish with publisher confirms
    #[arg(long)]
    pub confirm: bool,

    /// The queue to use [default: kelp-bench-<pid>, deleted afterwards]
    #[arg(short, long)]
    pub queue: Option<String>,
}

/// `500ms`, `2s`, `1.5` (seconds), `1m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 5s, 1.5, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// `500`, `500/s`, `30/m`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let (num, per) = match s.split_once('/') {
        Some((n, p)) => (n.trim(), p.trim()),
        None => (s.trim(), "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a rate (try 500 or 500/s)"))?;
    let per_sec = match per {
        "s" | "sec" => n,
        "m" | "min" => n / 60.0,
        "h" => n / 3600.0,
        other => {
            return Err(format!(
                "unknown unit `/{other}` in `{s}` (use /s, /m or /h)"
            ))
        }
    };
    if per_sec.is_finite() && per_sec > 0.0 {
        Ok(per_sec)
    } else {
        Err(format!("`{s}`: the rate must be more than 0"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_rate("500/s").unwrap(), 500.0);
        assert_eq!(parse_rate("60/m").unwrap(), 1.0);
        assert_eq!(parse_rate("20").unwrap(), 20.0);
        assert!(parse_rate("0").is_err());
    }
}
