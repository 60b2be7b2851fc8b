"""aio-pika's RPC / JsonRPC peer for kelp's interop tests (tests/interop_aio_pika.rs).

    rpc_peer.py callee URL METHOD json|pickle [TIMEOUT]
    rpc_peer.py caller URL METHOD json|pickle [TIMEOUT]

callee: registers METHOD (echoes its kwargs with a sum), METHOD_fail (raises
ValueError("bad input", n)), METHOD_idle (registered, then unregistered: a method queue
with nobody consuming, so calls to it expire) and METHOD_stop; prints READY, serves until
METHOD_stop is called or TIMEOUT seconds pass (exit 3), then exits.

caller: calls METHOD (kwargs of every JSON-able type), METHOD_fail, METHOD_missing (no such
queue) and METHOD_idle with a 300 ms expiration, and prints one JSON line with what happened.

Every wait is bounded, so the script always exits on its own.
"""

import asyncio
import json
import sys

import aio_pika
from aio_pika.exceptions import MessageProcessError
from aio_pika.patterns import RPC, JsonRPC
from aio_pika.patterns.rpc import JsonRPCError, RPCException

KWARGS = {
    "x": 2,
    "y": 3,
    "text": "h\u00e9llo \u2603",
    "ratio": 0.25,
    "big": 2**40,
    "neg": -7,
    "flag": True,
    "nothing": None,
    "items": [1, "two", [3.5]],
    "nested": {"a": {"b": [True, False]}},
}


def describe(exc):
    """The class and args of an exception, and for JsonRPC the payload it carries."""
    out = {"class": type(exc).__name__, "args": list(exc.args)}
    if isinstance(exc, (JsonRPCError, RPCException)) and len(exc.args) > 1:
        out["payload"] = exc.args[1]
    return out


async def callee(rpc, method, timeout):
    stop = asyncio.Event()

    async def echo(**kwargs):
        return {"sum": kwargs.get("x", 0) + kwargs.get("y", 0), "kwargs": kwargs, "who": "aio-pika"}

    async def fail(*, n=0, **_):
        raise ValueError("bad input", n)

    async def idle(**_):
        return None

    async def do_stop(**_):
        stop.set()
        return "bye"

    await rpc.register(method, echo, auto_delete=True)
    await rpc.register(method + "_fail", fail, auto_delete=True)
    await rpc.register(method + "_idle", idle)
    await rpc.unregister(idle)
    await rpc.register(method + "_stop", do_stop, auto_delete=True)
    print("READY", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except asyncio.TimeoutError:
        print("callee: timed out waiting for stop", file=sys.stderr, flush=True)
        return 3
    await asyncio.sleep(0.2)  # let the stop answer go out
    return 0


async def caller(rpc, method, timeout):
    report = {}
    step = timeout / 4
    report["result"] = await asyncio.wait_for(rpc.call(method, kwargs=KWARGS), step)
    try:
        await asyncio.wait_for(rpc.call(method + "_fail", kwargs={"n": 7}), step)
        report["error"] = None
    except asyncio.TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 - the remote error is what we report
        report["error"] = describe(e)
    try:
        await asyncio.wait_for(rpc.call(method + "_missing", kwargs={}), step)
        report["missing"] = None
    except MessageProcessError as e:
        report["missing"] = type(e).__name__
    try:
        await asyncio.wait_for(
            rpc.call(method + "_idle", kwargs={}, expiration=0.3), step,
        )
        report["expired"] = None
    except asyncio.TimeoutError as e:
        # aio-pika's own TimeoutError carries the dead-lettered call; wait_for's has no args.
        report["expired"] = "dead-lettered" if e.args else "wait_for"
    print(json.dumps(report, default=repr), flush=True)
    return 0


async def main():
    role, url, method, fmt = sys.argv[1:5]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    connection = await asyncio.wait_for(aio_pika.connect(url), 10)
    try:
        channel = await connection.channel()
        cls = JsonRPC if fmt == "json" else RPC
        rpc = await cls.create(channel)
        if role == "callee":
            code = await callee(rpc, method, timeout)
        else:
            code = await caller(rpc, method, timeout)
        await rpc.close()
        return code
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(asyncio.wait_for(main(), 60)))
