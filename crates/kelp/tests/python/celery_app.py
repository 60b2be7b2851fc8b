"""The Celery side of tests/celery.rs.

As a worker (the test runs it from this directory):

    python -m celery -A celery_app worker --pool=solo -c 1 -Q <queue> ...

with the broker in $KELP_CELERY_BROKER and the result backend in $KELP_CELERY_BACKEND.

As a client: `python celery_app.py send '<json spec>'` sends one task with `send_task`
(spec: task, args, kwargs, queue, and optional retries, priority, expires, time_limit,
soft_time_limit) and prints {"id": <task id>}.
"""

import json
import os
import sys

from celery import Celery

app = Celery(
    "celery_app",
    broker=os.environ.get("KELP_CELERY_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("KELP_CELERY_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_expires=600,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=3,
    worker_prefetch_multiplier=1,
)


@app.task(name="kelp.add")
def add(x, y):
    return x + y


@app.task(name="kelp.echo", bind=True)
def echo(self, *args, **kwargs):
    """Return the arguments and what the worker read from the message's headers."""
    r = self.request
    return {
        "args": list(args),
        "kwargs": kwargs,
        "task": self.name,
        "id": r.id,
        "retries": r.retries,
        "root_id": r.root_id,
        "parent_id": r.parent_id,
        "origin": r.origin,
        "correlation_id": r.correlation_id,
        "eta": r.eta,
        "expires": r.expires,
        "timelimit": list(r.timelimit or [None, None]),
        "ignore_result": r.ignore_result,
        "argsrepr": getattr(r, "argsrepr", None),
        "kwargsrepr": getattr(r, "kwargsrepr", None),
        "delivery_info": {k: (r.delivery_info or {}).get(k)
                          for k in ("exchange", "routing_key", "priority")},
    }


@app.task(name="kelp.fail")
def fail(message):
    raise ValueError(message)


def send(spec):
    opts = {k: spec[k] for k in ("retries", "priority", "expires", "time_limit",
                                 "soft_time_limit", "countdown") if k in spec}
    r = app.send_task(spec["task"], args=spec.get("args", []), kwargs=spec.get("kwargs", {}),
                      queue=spec["queue"], **opts)
    print(json.dumps({"id": r.id}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "send":
        send(json.loads(sys.argv[2]))
    else:
        sys.exit(__doc__)
