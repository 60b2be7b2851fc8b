"""aio-pika's Master / JsonMaster peer for kelp's interop tests (tests/interop_aio_pika.rs).

    master_peer.py worker URL QUEUE json|pickle COUNT [TIMEOUT]
    master_peer.py master URL QUEUE json|pickle COUNT

worker: creates a worker on QUEUE, prints READY, then one JSON line per task (its kwargs);
a task with {"reject": true} raises RejectMessage(requeue=False) and one with {"nack": true}
raises NackMessage(requeue=False) (printed too). Exits once COUNT tasks were seen, or after
TIMEOUT seconds (exit 3).

master: publishes COUNT tasks {"id": i, "text": ..., "items": [...]} to QUEUE and exits.

Every wait is bounded, so the script always exits on its own.
"""

import asyncio
import json
import sys

import aio_pika
from aio_pika.patterns import JsonMaster, Master, NackMessage, RejectMessage


async def worker(master, queue, count, timeout):
    seen = []
    done = asyncio.Event()

    async def handle(**kwargs):
        seen.append(kwargs)
        print(json.dumps(kwargs, default=repr), flush=True)
        if len(seen) >= count:
            done.set()
        if kwargs.get("reject"):
            raise RejectMessage(requeue=False)
        if kwargs.get("nack"):
            raise NackMessage(requeue=False)

    w = await master.create_worker(queue, handle, auto_delete=True)
    print("READY", flush=True)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        print(f"worker: saw {len(seen)} of {count} tasks", file=sys.stderr, flush=True)
        return 3
    await asyncio.sleep(0.2)  # let the last ack go out
    await w.close()
    return 0


async def master_(master, queue, count):
    for i in range(count):
        await master.create_task(
            queue, kwargs={"id": i, "text": "t\u00e2che", "items": [i, None, True]},
        )
    return 0


async def main():
    role, url, queue, fmt, count = sys.argv[1:6]
    count = int(count)
    timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
    connection = await asyncio.wait_for(aio_pika.connect(url), 10)
    try:
        channel = await connection.channel()
        cls = JsonMaster if fmt == "json" else Master
        master = cls(channel)
        if role == "worker":
            return await worker(master, queue, count, timeout)
        return await master_(master, queue, count)
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(asyncio.wait_for(main(), 60)))
