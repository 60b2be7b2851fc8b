"""The Kombu side of kelp-bench's `redis-publish` and `redis-consume` scenarios.

Usage: kombu_redis_bench.py --url redis://127.0.0.1:6379/0 --count 100000
                            [--phase publish|both] [--prefetch 100] [--size 100]
                            [--queue NAME] [--timeout 600]

On a fresh queue (deleted on the way out):

- publish: `count` raw bodies of `size` bytes with `Producer.publish` (no serializer,
  content type `application/data`, encoding `binary`, the default exchange), timed from the
  first publish to the last (each publish returns once Redis answered its LPUSH);
- consume (phase `both`): the queue the publish phase filled, consumed by a `Consumer` with
  `prefetch_count` that acks each message in its callback, draining with
  `conn.drain_events(timeout=1)` until all are acked; timed from creating the consumer to
  the last ack.

The queue is purged and deleted on the way out. Prints one JSON line: {"kombu": version, "count": n, "publish_per_s", "publish_s",
"publish_cpu_s", "consume_per_s", "consume_s", "consume_cpu_s"} (the consume fields null for
phase `publish`). CPU is this process's (user + system, `time.process_time`), not Redis's.
"""

import argparse
import json
import os
import socket
import sys
import time

import kombu
from kombu import Connection, Consumer, Exchange, Producer, Queue


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--count", type=int, default=100000)
    ap.add_argument("--phase", choices=("publish", "both"), default="both")
    ap.add_argument("--prefetch", type=int, default=100)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--queue", default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    n = args.count
    qname = args.queue or "kelp-bench-kombu-%d-%d" % (os.getpid(), int(time.time() * 1000))
    body = b"x" * args.size
    deadline = time.monotonic() + args.timeout
    out = {"kombu": kombu.__version__, "count": n,
           "publish_per_s": None, "publish_s": None, "publish_cpu_s": None,
           "consume_per_s": None, "consume_s": None, "consume_cpu_s": None}

    with Connection(args.url, transport_options={"socket_timeout": 10}) as conn:
        conn.ensure_connection(max_retries=3)
        ch = conn.default_channel
        queue = Queue(qname, durable=False)
        queue(ch).declare()
        try:
            producer = Producer(ch, exchange=Exchange(""), auto_declare=False)
            publish = producer.publish
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                publish(body, routing_key=qname, serializer=None,
                        content_type="application/data", content_encoding="binary",
                        retry=False)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            out.update(publish_per_s=n / wall, publish_s=wall, publish_cpu_s=cpu)

            if args.phase == "both":
                acked = [0]

                def on_message(_body, message):
                    message.ack()
                    acked[0] += 1

                w0, c0 = time.perf_counter(), time.process_time()
                consumer = Consumer(ch, queues=[Queue(qname, no_declare=True)],
                                    accept=["application/data"], callbacks=[on_message],
                                    prefetch_count=args.prefetch, auto_declare=False)
                consumer.consume()
                while acked[0] < n:
                    if time.monotonic() > deadline:
                        raise SystemExit("kombu consume: %d of %d acked after %.0f s"
                                         % (acked[0], n, args.timeout))
                    try:
                        conn.drain_events(timeout=1)
                    except socket.timeout:
                        pass
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                consumer.cancel()
                out.update(consume_per_s=n / wall, consume_s=wall, consume_cpu_s=cpu)
        finally:
            # Kombu's queue_delete only deletes the lists of a queue with bindings, and this
            # one (the default exchange) has none: purge it first.
            queue(ch).purge()
            queue(ch).delete()

    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
