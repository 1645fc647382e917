#!/usr/bin/env python3
"""The NATS user of one natserve worker, tied to its worker id, for ``deploy/nats-server.conf``.

    python deploy/worker_user.py gpu-7-0            # the entry for worker id gpu-7-0
    python deploy/worker_user.py gpu-7-0 gpu-7-1    # several, one per line

prints one ``users`` entry per worker id, like the ``worker`` entry the config ships with: the
user is named after the worker, its password is read from ``$NATSERVE_WORKER_<ID>_PASSWORD`` (the
id upper-cased, ``-`` as ``_``; ``--password-var`` names another) and its permissions let it
publish heartbeats for its own id only (``natserve.workers.<id>.heartbeat``) and take its own
commands only (``natserve.worker.<id>.>``). The registry takes a heartbeat only when its body's
``worker_id`` is the one the subject names, so such a worker cannot speak for another. For batch
jobs it may pull from the models' work-queue streams through their ``workers`` consumer, ack
what it took and store results; it cannot make, change or delete streams. Paste the
entries into the ``users`` list of the config, between its ``BEGIN WORKERS`` and ``END WORKERS``
lines, and start each worker with ``NATSERVE_WORKER_ID=<id> NATSERVE_NATS_USER=<id>
NATSERVE_NATS_PASSWORD=...``.

NATS config files have no per-user templates (decentralized JWT auth has ``{{name()}}`` for
this), hence one entry per worker. Standard library only: it runs where natserve is not installed.
"""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["password_var", "worker_user"]

# broker_client's NAME_PATTERN: a worker id is a subject token.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def password_var(worker_id: str) -> str:
    """The environment variable the server reads the worker's password from."""
    return f"NATSERVE_WORKER_{re.sub(r'[^A-Z0-9]', '_', worker_id.upper())}_PASSWORD"


def worker_user(worker_id: str, *, prefix: str = "natserve", password: str | None = None) -> str:
    """The ``users`` entry of worker ``worker_id``, indented for the config's ``users`` list."""
    if not _ID.match(worker_id):
        raise ValueError(
            f"worker id {worker_id!r} is invalid: it must start with a letter or digit and hold only "
            "letters, digits, '_' and '-' (at most 128 characters)"
        )
    if not _PREFIX.match(prefix):
        raise ValueError(f"subject prefix {prefix!r} is not a valid NATS subject prefix")
    publish = [
        f"{prefix}.workers.{worker_id}.heartbeat",  # its own heartbeats only
        f"{prefix}.events.models.>",  # load progress of its replicas
        f"{prefix}.model.*.overflow.*",  # pass a request on while saturated
        "$SRV.PING.natserve-worker",  # deploy/healthcheck.py, and its own readiness ping
        "$SRV.PING.natserve-worker.>",
        # Batch requests (workers/batches.py): the durable consumer `workers` of each model's
        # work-queue stream <token>_batch_<uid>; no stream or consumer management. A stream name
        # is one subject token, which a wildcard matches whole: `*` is any stream, narrowed to
        # its consumer named `workers` (only natserve's request streams have one).
        "$JS.API.CONSUMER.INFO.*.workers",  # bind to it
        "$JS.API.CONSUMER.MSG.NEXT.*.workers",  # pull requests
        "$JS.ACK.*.workers.>",  # ack, in-progress, nak, term
        f"{prefix}.batches.results.*",  # results, into the results stream (PubAck to its inbox)
    ]
    subscribe = [
        f"{prefix}.worker.{worker_id}.>",  # its own launch / terminate / info commands only
        f"{prefix}.model.>",  # generate / chat / embed (queue group), cancel
        f"{prefix}.workers.resync",  # the registry asks for an immediate heartbeat
        "$SRV.>",  # nats.micro discovery: `nats micro ls/info/stats`
        "_INBOX.>",  # the answer to its healthcheck ping, JetStream's replies, pulled requests
    ]

    def quoted(subjects: list[str]) -> str:
        return ", ".join(f'"{s}"' for s in subjects)

    return "\n".join(
        [
            f"    {{ user: {worker_id}, password: ${password or password_var(worker_id)}, permissions: {{",
            f"        publish: {{ allow: [{quoted(publish)}] }}",
            f"        subscribe: {{ allow: [{quoted(subscribe)}] }}",
            '        allow_responses: { max: -1, expires: "1h" }',
            "    } }",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("worker_ids", nargs="+", metavar="WORKER_ID")
    parser.add_argument("--prefix", default="natserve", help="subject prefix (NATSERVE_PREFIX)")
    parser.add_argument(
        "--password-var", help="the environment variable holding the password (one worker id only)"
    )
    args = parser.parse_args(argv)
    if args.password_var and len(args.worker_ids) > 1:
        parser.error("--password-var names the variable of one worker id")
    try:
        for worker_id in args.worker_ids:
            print(worker_user(worker_id, prefix=args.prefix, password=args.password_var))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
