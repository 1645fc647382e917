"""What operators see: ``nats micro stats``, the Prometheus endpoints, structured logs.

Against a real nats-server with an in-process registry and worker (echo models: the metrics are
about natserve, not about a model), scraped over HTTP on 127.0.0.1; one ``natserve up``
subprocess checks the flags end to end.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker_client import AsyncClient, BadRequest, NotFound, logcontext
from broker_client.codec import decode, detect
from broker_client.logcontext import ContextFilter
from broker_client.runtime import REQUEST_ID_HEADER, NatsTransport
from natserve.observability import JsonFormatter, MetricsServer, configure_logging, new_metrics_registry
from registry_service.app import Registry
from tests.support.cli import Running, cli_env
from tests.support.ports import free_port
from tests.support.waits import within
from tests.support.worker import llm_definition, running_harness
from workers import Worker, WorkerSettings

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def echo_definition(name: str) -> dict[str, Any]:
    return llm_definition(name, "echo:", context_length=64, chat_template=TEMPLATE)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no {name}{labels} in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


# ----------------------------------------------------------------------------- nats micro stats


async def test_micro_stats_count_requests_and_errors_per_endpoint(nats_url: str, unique: str) -> None:
    async with running_harness(nats_url, f"st{unique}") as h:
        uid = f"echo-{unique}"
        await h.launch(uid, llm_definition("echo", "echo:", context_length=32))
        with pytest.raises(BadRequest):
            await h.transport.request(h.subjects.worker(h.worker.worker_id, "launch"), {"x": 1}, timeout=10)

        for _ in range(2):
            await h.call(uid, "generate", {"prompt": "a b c"})
        stream = h.transport.stream(
            h.subjects.model(uid, "generate"),
            {"prompt": "a b c", "generate_config": {"stream": True}},
            timeout=10,
        )
        assert len([c async for c in stream]) >= 1
        with pytest.raises(BadRequest):  # refused before admission (unknown key)
            await h.call(uid, "generate", {"prompt": "a", "generate_config": {"max_token": 2}})
        with pytest.raises(BadRequest, match="context"):  # refused by the replica, in its task
            await h.call(uid, "generate", {"prompt": "a", "generate_config": {"max_tokens": 33}})
        with pytest.raises(BadRequest, match="cannot chat"):
            await h.call(uid, "chat", {"messages": [{"role": "user", "content": "hi"}]})
        await h.transport.request(h.subjects.worker(h.worker.worker_id, "info"), {}, timeout=10)
        with pytest.raises(NotFound):
            await h.transport.request(
                h.subjects.worker(h.worker.worker_id, "terminate"), {"model_uid": "nope"}, timeout=10
            )

        assert h.worker.service is not None
        msg = await h.nc.request(f"$SRV.STATS.natserve-worker.{h.worker.service.id}", b"", timeout=10)
        stats = json.loads(msg.data)
        assert stats["id"] == h.worker.service.id
        endpoints = {e["name"]: e for e in stats["endpoints"]}
        counts = {name: (e["num_requests"], e["num_errors"]) for name, e in endpoints.items()}
        expected = {
            "launch": (2, 1),
            "terminate": (1, 1),
            "info": (1, 0),
            f"{uid}-generate": (5, 2),
            f"{uid}-chat": (1, 1),
            f"{uid}-embed": (0, 0),
            f"{uid}-cancel": (0, 0),
        }
        assert {name: counts.get(name) for name in expected} == expected, counts
        generate = endpoints[f"{uid}-generate"]
        assert "max_tokens 33" in generate["last_error"]
        # The time the tasks took, not only their dispatch.
        assert generate["processing_time"] > 0 and generate["average_processing_time"] > 0
        assert "no chat template" in endpoints[f"{uid}-chat"]["last_error"]
        assert "'nope'" in endpoints["terminate"]["last_error"]
        assert endpoints["info"]["last_error"] == ""


async def test_service_host_reports_every_outcome(nats_url: str, unique: str) -> None:
    from broker_client.runtime import RequestOutcome, Responder, ServiceHost, connect

    nc = await connect(nats_url, name="outcomes")
    outcomes: asyncio.Queue[RequestOutcome] = asyncio.Queue()
    host = ServiceHost(nc, name=f"outcomes-{unique}", version="0.0.1", metadata={"worker_id": "w9"})
    host.observer = outcomes.put_nowait

    async def ok(resp: Responder) -> None:
        await resp.respond({"ok": True})

    async def refused(resp: Responder) -> None:
        raise BadRequest("no, thanks")

    async def broken(resp: Responder) -> None:
        raise RuntimeError("a bug")

    async def silent(resp: Responder) -> None:
        return None  # passed on, or held elsewhere: nothing is sent

    try:
        await host.start()
        for name, handler in (("ok", ok), ("refused", refused), ("broken", broken), ("silent", silent)):
            await host.add_endpoint(name, f"{unique}.{name}", handler, metadata={"model_uid": "m9"})
        await host.until_subscribed()
        for name in ("ok", "refused", "broken"):
            await nc.request(f"{unique}.{name}", b"{}", timeout=10, headers={REQUEST_ID_HEADER: f"id-{name}"})
        await nc.publish(f"{unique}.silent", b"{}")
        seen = {}
        for _ in range(4):
            outcome = await within(outcomes.get(), "an outcome", 10)
            seen[outcome.endpoint] = outcome
        assert {n: (o.code, o.request_id) for n, o in seen.items()} == {
            "ok": (200, "id-ok"),
            "refused": (400, "id-refused"),
            "broken": (500, "id-broken"),
            "silent": (0, None),
        }
        assert seen["refused"].message == "no, thanks" and "RuntimeError: a bug" in seen["broken"].message
        assert seen["ok"].metadata == {"model_uid": "m9"} and seen["ok"].subject == f"{unique}.ok"
        assert all(o.seconds > 0 for o in seen.values())
    finally:
        await host.stop()
        await nc.close()


# ----------------------------------------------------------------------------- Prometheus


@pytest.fixture
async def system(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, str, Worker]]:
    """Registry and worker sharing one metrics registry and endpoint, as ``natserve up`` does."""
    prefix = f"m{unique}"
    metrics = new_metrics_registry()
    registry = Registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, metrics_registry=metrics)
    worker = Worker(
        WorkerSettings(
            nats_url,
            prefix=prefix,
            device="cpu",
            heartbeat_interval=30,
            metrics_registry=metrics,
            drain_timeout=5,
        )
    )
    await registry.start()
    await worker.start()
    server = MetricsServer(metrics, 0).start()
    client = AsyncClient(nats_url, prefix=prefix, timeout=60)
    try:
        yield client, server.url, worker
    finally:
        await client.close()
        server.stop()
        await within(worker.stop(), "worker stop", 30)
        await within(registry.stop(), "registry stop", 30)


async def test_prometheus_endpoint_after_requests(
    system: tuple[AsyncClient, str, Worker], unique: str, tmp_path: Path
) -> None:
    client, url, worker = system
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics")
    await client.register_model(model_type="LLM", model=echo_definition("obs"))
    uid = await client.launch_model(model_name="obs", model_uid=f"obs-{unique}", progress=False)
    # A launch the worker fails (the path does not exist): counted by both services.
    await client.register_model(model_type="LLM", model=llm_definition("gone", f"file://{tmp_path}/none"))
    with pytest.raises(NotFound):
        await client.launch_model(model_name="gone", model_uid=f"gone-{unique}", progress=False)

    model: Any = await client.get_model(model_uid=uid)
    tokens = 0
    for prompt in ("one two three", "a b c d e f", "x y"):
        tokens += (await model.generate(prompt, {"max_tokens": 4}))["usage"]["completion_tokens"]
    chunks = [c async for c in await model.generate("s t u v", {"stream": True})]
    tokens += chunks[-1]["usage"]["completion_tokens"]
    tokens += (await model.chat([{"role": "user", "content": "hi there"}]))["usage"]["completion_tokens"]
    with pytest.raises(BadRequest, match="context"):  # admitted, then refused by the replica
        await model.generate("p", {"max_tokens": 999})

    samples = await asyncio.to_thread(scrape, url)
    requests = "natserve_worker_requests_total"
    assert value(samples, requests, model_uid=uid, endpoint="generate", code="200") == 4
    assert value(samples, requests, model_uid=uid, endpoint="generate", code="400") == 1
    assert value(samples, requests, model_uid=uid, endpoint="chat", code="200") == 1
    assert value(samples, requests, model_uid="", endpoint="launch", code="200") == 1
    assert value(samples, requests, model_uid="", endpoint="launch", code="404") == 1
    duration = "natserve_worker_request_duration_seconds_count"
    assert value(samples, duration, model_uid=uid, endpoint="generate") == 5
    assert value(samples, duration, model_uid=uid, endpoint="chat") == 1
    assert value(samples, "natserve_worker_time_to_first_token_seconds_count", model_uid=uid) == 5
    assert value(samples, "natserve_worker_time_to_first_token_seconds_sum", model_uid=uid) > 0
    assert value(samples, "natserve_worker_launches_total", outcome="ok") == 1
    assert value(samples, "natserve_worker_launches_total", outcome="NotFound") == 1
    assert value(samples, "natserve_worker_launch_duration_seconds_count", outcome="ok") == 1

    replica = {"model_uid": uid, "replica": "0"}
    assert value(samples, "natserve_replica_generated_tokens_total", **replica) == tokens
    assert value(samples, "natserve_replica_requests_total", **replica) == 6
    assert value(samples, "natserve_replica_errors_total", **replica) == 1
    assert value(samples, "natserve_replica_running", **replica) == 0
    assert value(samples, "natserve_replica_waiting", **replica) == 0
    assert value(samples, "natserve_replica_in_flight", **replica) == 0
    info = [k for k in samples if k[0] == "natserve_replica_info" and ("model_uid", uid) in k[1]]
    assert len(info) == 1 and ("status", "ready") in info[0][1] and ("device", "cpu") in info[0][1]
    assert value(samples, "natserve_device_memory_total_bytes", device="cpu") > 0
    assert value(samples, "natserve_device_memory_free_bytes", device="cpu") > 0
    assert value(samples, "process_resident_memory_bytes") > 10_000_000

    assert value(samples, "natserve_registry_launches_total", outcome="ok") == 1
    assert value(samples, "natserve_registry_launches_total", outcome="NotFound") == 1
    assert value(samples, "natserve_registry_launch_duration_seconds_count", outcome="ok") == 1
    assert value(samples, "natserve_registry_requests_total", endpoint="launch", code="200") == 1
    assert value(samples, "natserve_registry_requests_total", endpoint="launch", code="404") == 1
    assert value(samples, "natserve_registry_requests_total", endpoint="register", code="200") == 2
    assert value(samples, "natserve_registry_launches_in_flight") == 0
    assert value(samples, "natserve_registry_workers", state="alive") == 1
    assert value(samples, "natserve_registry_replicas", status="ready") == 1

    # Each worker has a registry of its own unless given one: nothing global.
    assert Worker(WorkerSettings("nats://127.0.0.1:1")).metrics.registry is not worker.metrics.registry


async def test_recent_errors_in_heartbeats_and_the_registry(
    system: tuple[AsyncClient, str, Worker], unique: str, tmp_path: Path
) -> None:
    client, _, worker = system
    await client.register_model(model_type="LLM", model=llm_definition("gone", f"file://{tmp_path}/none"))
    with pytest.raises(NotFound):
        await client.launch_model(model_name="gone", model_uid=f"gone-{unique}", progress=False)
    [error] = worker.info().recent_errors
    assert error["model_uid"] == f"gone-{unique}" and error["endpoint"] == "launch"
    assert error["code"] == 404 and "does not exist" in error["message"] and error["ts"] > 0
    reply = await client._request(client.subjects.workers_list, {})
    [failure] = reply["recent_failures"]
    assert failure["model_uid"] == f"gone-{unique}" and "does not exist" in failure["message"]


def test_cuda_memory_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA series, with the device queries faked: this machine may have no GPU."""
    import torch
    from prometheus_client import generate_latest

    import workers.devices
    from broker_client import DeviceInfo
    from workers.metrics import WorkerMetrics

    gpu = DeviceInfo(name="cuda:1", kind="cuda", total_memory=80 * 2**30, free_memory=60 * 2**30)
    monkeypatch.setattr(workers.devices, "list_devices", lambda: [gpu, workers.devices.cpu_device()])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1000 + i)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 2000 + i)

    class NoModels:
        models: dict[str, Any] = {}

    metrics = WorkerMetrics()
    metrics.attach(NoModels())  # type: ignore[arg-type]
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert value(samples, "natserve_cuda_memory_allocated_bytes", device="cuda:1") == 1001
    assert value(samples, "natserve_cuda_memory_reserved_bytes", device="cuda:1") == 2001
    assert value(samples, "natserve_device_memory_free_bytes", device="cuda:1") == 60 * 2**30
    assert value(samples, "natserve_device_memory_total_bytes", device="cpu") > 0


# ----------------------------------------------------------------------------- logs


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def transport_records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("broker_client._service_host")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_logs_carry_model_uid_request_id_and_worker_id(
    nats_url: str, unique: str, transport_records: Records
) -> None:
    async with running_harness(nats_url, f"lg{unique}") as h:
        uid = f"echo-{unique}"
        await h.launch(uid, echo_definition("echo"))
        subject = h.subjects.model(uid, "generate")

        async def generate(body: dict[str, Any], request_id: str | None) -> logging.LogRecord:
            transport_records.records.clear()
            headers = {REQUEST_ID_HEADER: request_id} if request_id else None
            await h.transport.request(subject, body, timeout=10, headers=headers)
            [record] = [r for r in transport_records.records if subject in r.getMessage()]
            return record

        # The header's id is the request's id when the body has none (the client sends both).
        record = await generate({"prompt": "a b"}, "from-header")
        assert record.request_id == "from-header"  # type: ignore[attr-defined]
        assert record.model_uid == uid and record.worker_id == h.worker.worker_id  # type: ignore[attr-defined]
        assert "-> 200" in record.getMessage()
        # The body's wins, as it always did.
        record = await generate({"prompt": "a b", "request_id": "from-body"}, "from-header")
        assert record.request_id == "from-body"  # type: ignore[attr-defined]
        # Neither: the id the worker made up, still on the record.
        record = await generate({"prompt": "a b"}, None)
        assert len(record.request_id) == 32  # type: ignore[attr-defined]
        # A refused request logs its code and message with the same context.
        transport_records.records.clear()
        with pytest.raises(BadRequest):
            await h.transport.request(
                subject,
                {"prompt": "a", "generate_config": {"max_tokens": 99}},
                timeout=10,
                headers={REQUEST_ID_HEADER: "bad-one"},
            )
        [record] = [r for r in transport_records.records if subject in r.getMessage()]
        assert "-> 400" in record.getMessage() and "max_tokens 99" in record.getMessage()
        assert record.request_id == "bad-one" and record.model_uid == uid  # type: ignore[attr-defined]

        line = json.loads(JsonFormatter().format(record))
        assert line["request_id"] == "bad-one" and line["model_uid"] == uid
        assert line["worker_id"] == h.worker.worker_id
        assert line["level"] == "DEBUG" and line["logger"] == "broker_client._service_host"
        assert "max_tokens 99" in line["message"] and line["ts"].endswith("+00:00")

        # The worker's own endpoints carry the worker id, and no model uid.
        transport_records.records.clear()
        await h.transport.request(h.subjects.worker(h.worker.worker_id, "info"), {}, timeout=10)
        [record] = [r for r in transport_records.records if "info" in r.getMessage()]
        assert record.worker_id == h.worker.worker_id and record.model_uid is None  # type: ignore[attr-defined]


async def test_client_request_id_travels_to_the_worker_logs(
    system: tuple[AsyncClient, str, Worker], unique: str, transport_records: Records
) -> None:
    client, _, worker = system
    await client.register_model(model_type="LLM", model=echo_definition("rid"))
    uid = await client.launch_model(model_name="rid", model_uid=f"rid-{unique}", progress=False)
    subject = client.subjects.model(uid, "generate")
    # A plain subscriber (no queue group) sees a copy of every request, headers included.
    seen: asyncio.Queue[Any] = asyncio.Queue()
    transport = await client._get_transport()
    assert isinstance(transport, NatsTransport)
    spy = await transport.nc.subscribe(subject, cb=seen.put)
    await transport.nc.flush()
    try:
        model: Any = await client.get_model(model_uid=uid)
        transport_records.records.clear()
        await model.generate("x y", request_id="client-chosen")
        msg = await within(seen.get(), "the request seen by the spy", 10)
        assert decode(msg.data, detect(msg.data, msg.headers))["request_id"] == "client-chosen"
        [record] = [r for r in transport_records.records if subject in r.getMessage()]
        assert record.request_id == "client-chosen"  # type: ignore[attr-defined]
        assert record.worker_id == worker.worker_id and record.model_uid == uid  # type: ignore[attr-defined]
    finally:
        await spy.unsubscribe()


async def test_libraries_install_no_log_handlers(nats_url: str, unique: str) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    async with running_harness(nats_url, f"nh{unique}"):
        pass
    assert root.handlers == before


def test_configure_logging_json_lines() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("INFO", "json", stream=stream)
    try:
        # A second call replaces natserve's handler rather than adding one.
        handler = configure_logging("INFO", "json", stream=stream)
        assert sum(1 for h in root.handlers if getattr(h, "_natserve", False)) == 1

        async def in_a_request() -> None:
            logcontext.bind(model_uid="m1", request_id="r1", worker_id="w1")
            logging.getLogger("workers.test").info("hello %s", "there")

        asyncio.run(in_a_request())
        logging.getLogger("workers.test").warning("outside", exc_info=ValueError("boom"))
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert first["message"] == "hello there" and first["level"] == "INFO"
        assert (first["model_uid"], first["request_id"], first["worker_id"]) == ("m1", "r1", "w1")
        assert second["message"] == "outside" and "model_uid" not in second
        assert "ValueError: boom" in second["exc_info"]
        with pytest.raises(ValueError, match="log format"):
            configure_logging("INFO", "xml")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# ----------------------------------------------------------------------------- natserve up


@pytest.mark.slow
def test_up_serves_json_logs_and_one_metrics_endpoint(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = cli_env(tmp_path, NATSERVE_LOG_LEVEL="INFO", NATSERVE_LOG_FORMAT="json")
    up = Running(
        ["up", "--port", str(port), "--device", "cpu", "--metrics-port", str(metrics_port), "--no-http"], env
    )
    try:
        up.wait_ready(timeout=60)
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(samples, "natserve_registry_workers", state="alive") == 1
        assert any(k[0] == "natserve_device_memory_total_bytes" for k in samples)
        assert value(samples, "process_resident_memory_bytes") > 0
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=40) == 0, "".join(up.stderr[-30:])
    finally:
        up.kill()
    lines = [json.loads(line) for line in up.stderr if line.strip()]
    assert lines, "no log lines"
    assert any(f"127.0.0.1:{metrics_port}/metrics" in line["message"] for line in lines)
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("workers") for line in lines)
