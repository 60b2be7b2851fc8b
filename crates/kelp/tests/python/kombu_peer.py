"""The Kombu side of tests/interop_kombu.rs.

Usage: kombu_peer.py caps
       kombu_peer.py '<json spec>'

`caps` prints {"kombu": version, "compression": [method names Kombu has]}.

A spec is one JSON object; every step is optional and runs in this order:

    {"url": "amqp://..." | "redis://...",
     "timeout": 20,                       # seconds for the whole run
     "declare": [QUEUE, ...],             # declare queues (with their exchange and binding)
     "consume": {"queue": QUEUE,          # start consuming before publishing (fanout on Redis)
                 "count": 3,              # stop after this many messages...
                 "quiet": 0.4,            # ...and this long with nothing more
                 "ready": true,           # print "READY" once listening, keep draining
                                          # (the test publishes after READY)
                 "requeue": false},       # reject(requeue=True) instead of ack
     "publish": {"exchange": EXCHANGE | null, "messages": [MESSAGE, ...]}}

    QUEUE    = {"name": ..., "exchange": EXCHANGE | null, "routing_key": ...,
                "no_declare": false, "durable": false}
    EXCHANGE = {"name": ..., "type": "direct" | "topic" | "fanout"}
    MESSAGE  = {"routing_key": ..., "serializer": "json" | ... | null,
                "payload": <json> | "raw_b64": <base64>, "compression": null | "zlib" | ...,
                "headers": {...}, "priority": n, "correlation_id": ..., "reply_to": ...,
                "expiration": seconds}

The result goes to stdout as one JSON line: {"published": n, "messages": [RECEIVED, ...]}
where RECEIVED describes each message consumed (payload, raw body, content type and
encoding, headers, properties, delivery_info). Every wait is bounded by "timeout".
"""

import base64
import json
import socket
import sys
import time

import kombu
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu import compression as kcompression

ACCEPT = ["json", "msgpack", "yaml", "pickle", "application/data", "text/plain"]


def jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def exchange_of(spec):
    if not spec:
        return Exchange("")
    return Exchange(spec["name"], type=spec.get("type", "direct"), durable=False,
                    auto_delete=spec.get("auto_delete", False))


def queue_of(spec):
    ex = spec.get("exchange")
    kw = {}
    if spec.get("expires"):
        kw["expires"] = spec["expires"]
    return Queue(spec["name"], exchange_of(ex) if ex else None,
                 routing_key=spec.get("routing_key", spec["name"]),
                 durable=spec.get("durable", False),
                 no_declare=spec.get("no_declare", False), **kw)


def describe(body, message):
    props = message.properties
    info = message.delivery_info
    try:
        decoded = message.decode()
    except Exception as e:  # reported, not raised: the test says what went wrong
        decoded = {"$error": repr(e)}
    out = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": jsonable(dict(message.headers or {})),
        "properties": {k: jsonable(props.get(k)) for k in
                       ("priority", "correlation_id", "reply_to", "expiration",
                        "delivery_mode")},
        "delivery_info": {"exchange": info.get("exchange"),
                          "routing_key": info.get("routing_key"),
                          "redelivered": bool(info.get("redelivered", False))},
    }
    if isinstance(decoded, (bytes, bytearray)):
        out["raw_b64"] = base64.b64encode(bytes(decoded)).decode()
    else:
        out["payload"] = jsonable(decoded)
    return out


def publish(conn, spec):
    ex = exchange_of(spec.get("exchange"))
    producer = Producer(conn.default_channel, exchange=ex, auto_declare=bool(ex.name))
    n = 0
    for m in spec["messages"]:
        kw = {}
        for k in ("compression", "headers", "priority", "correlation_id", "reply_to",
                  "expiration"):
            if m.get(k) is not None:
                kw[k] = m[k]
        if "raw_b64" in m:
            body = base64.b64decode(m["raw_b64"])
            serializer = None
        else:
            body = m["payload"]
            serializer = m.get("serializer", "json")
        producer.publish(body, routing_key=m.get("routing_key", ""), serializer=serializer,
                         retry=False, **kw)
        n += 1
    return n


def main():
    if sys.argv[1] == "caps":
        print(json.dumps({"kombu": kombu.__version__,
                          "compression": sorted(kcompression._aliases)}))
        return
    spec = json.loads(sys.argv[1])
    deadline = time.monotonic() + spec.get("timeout", 20)
    result = {"published": 0, "messages": []}
    with Connection(spec["url"], transport_options={"socket_timeout": 10}) as conn:
        conn.ensure_connection(max_retries=3)
        ch = conn.default_channel
        for q in spec.get("declare", []):
            queue_of(q)(ch).declare()

        consumer = None
        got = result["messages"]
        c = spec.get("consume")
        if c:
            cq = queue_of(c["queue"])
            requeue = c.get("requeue", False)

            def on_message(body, message):
                got.append(describe(body, message))
                if requeue:
                    message.requeue()
                else:
                    message.ack()

            consumer = Consumer(ch, queues=[cq], accept=ACCEPT, callbacks=[on_message],
                                auto_declare=not c["queue"].get("no_declare", False))
            if requeue:
                consumer.qos(prefetch_count=1)
            consumer.consume()
            if c.get("ready"):
                # On Redis the PUB/SUB subscription is made by the first poll.
                try:
                    conn.drain_events(timeout=0.3)
                except socket.timeout:
                    pass
                print("READY", flush=True)

        if spec.get("publish"):
            result["published"] = publish(conn, spec["publish"])

        if consumer is not None:
            count, quiet = c.get("count", 1), c.get("quiet", 0.3)
            last = None
            while time.monotonic() < deadline:
                if len(got) >= count:
                    last = last or time.monotonic()
                    if time.monotonic() - last >= quiet:
                        break
                try:
                    conn.drain_events(timeout=0.1)
                    last = None if len(got) < count else time.monotonic()
                except socket.timeout:
                    pass
            consumer.cancel()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
