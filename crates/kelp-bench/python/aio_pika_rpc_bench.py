"""The aio-pika side of kelp-bench's `rpc-pattern` scenario.

Usage: aio_pika_rpc_bench.py --url amqp://guest:guest@127.0.0.1:5672/%2f --count 10000
                             [--window 64] [--warmup 100] [--method NAME] [--timeout 600]

In one process, on two connections (as kelp's side does):

- the callee: `JsonRPC.create(channel)` and `register(method, echo, auto_delete=True)`,
  where `echo(**kwargs)` returns its keyword arguments;
- the caller: `JsonRPC.create(channel)` on the other connection.

After `warmup` untimed calls:

- windowed: `count` calls `rpc.call(method, kwargs={"i": i})` with `window` in flight (that
  many tasks, each making its next call when its last one answered), timed from the first
  call to the last answer;
- sequential: `count` calls one at a time, each timed on its own (p50, p99).

Every answer is checked (it must echo its `i`). Prints one JSON line: {"aio_pika": version,
"count", "window", "windowed_s", "windowed_cpu_s", "windowed_per_s", "seq_s", "seq_cpu_s",
"seq_per_s", "seq_p50_us", "seq_p99_us"}. CPU is this process's (user + system,
`time.process_time`): callee and caller both, not the broker's.
"""

import argparse
import asyncio
import json
import os
import sys
import time

import aio_pika
from aio_pika.patterns import JsonRPC


def nearest_rank(sorted_samples, pct):
    """The smallest sample with at least pct% of the samples <= it (as kelp-bench's)."""
    rank = max(1, -(-len(sorted_samples) * pct // 100))
    return sorted_samples[rank - 1]


async def echo(**kwargs):
    return kwargs


async def bench(args):
    method = args.method or "kelp-bench-rpc-pattern-aio-pika-%d-%d" % (
        os.getpid(), int(time.time() * 1000))
    out = {"aio_pika": aio_pika.__version__, "count": args.count, "window": args.window}
    callee_conn = await aio_pika.connect(args.url)
    caller_conn = await aio_pika.connect(args.url)
    try:
        callee = await JsonRPC.create(await callee_conn.channel())
        await callee.register(method, echo, auto_delete=True)
        caller = await JsonRPC.create(await caller_conn.channel())

        async def call(i):
            result = await caller.call(method, kwargs={"i": i})
            if result != {"i": i}:
                raise RuntimeError("call %d answered %r" % (i, result))

        for i in range(args.warmup):
            await call(i)

        # Windowed: `window` workers share the calls, so at most `window` are in flight.
        n = args.count
        counter = iter(range(n))

        async def worker():
            for i in counter:
                await call(i)

        w0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(min(args.window, n))))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        out.update(windowed_s=wall, windowed_cpu_s=cpu, windowed_per_s=n / wall)

        samples = []
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            t = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - t)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        samples.sort()
        out.update(seq_s=wall, seq_cpu_s=cpu, seq_per_s=n / wall,
                   seq_p50_us=nearest_rank(samples, 50) * 1e6,
                   seq_p99_us=nearest_rank(samples, 99) * 1e6)

        await caller.close()
        await callee.close()  # cancels the consumer: the auto-delete method queue goes
    finally:
        await caller_conn.close()
        await callee_conn.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--method", default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    out = asyncio.run(asyncio.wait_for(bench(args), args.timeout))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
