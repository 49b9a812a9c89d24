"""Log lines (FLUX_LOG_FORMAT): console stays one line of text; json is one
object per line that carries the lifecycle events, none per request."""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any

import grpc
import orjson
import pytest

from deploy.private_servers import EtcdServer
from fluxkv import config
from fluxkv.obs import logs
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from tests.conftest import BROKER, Names, ServerProcess, server_process


def records(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the node's stderr, each parsed as one JSON object."""
    parsed = [orjson.loads(line) for line in server.lines]
    for entry in parsed:
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
        assert entry["ts"].endswith("Z") and entry["level"] in ("debug", "info", "warning", "error", "critical")
    return parsed


def events(server: ServerProcess) -> list[str]:
    return [entry["event"] for entry in records(server) if "event" in entry]


def test_the_format_setting() -> None:
    assert config.load({}, {}).log_format == "console"
    assert config.load({}, {"FLUX_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(config.ConfigError, match="invalid FLUX_LOG_FORMAT: expected one of console, json"):
        config.load({}, {"FLUX_LOG_FORMAT": "yaml"})


def test_a_json_line_has_the_fields_extra_values_and_the_exception() -> None:
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("fluxkv.x", logging.WARNING, __file__, 1, "lost %s after %d s", ("it", 3), None)
    record.event = "lost"
    record.address = "127.0.0.1:1"
    entry = orjson.loads(formatter.format(record))
    assert entry == {
        "ts": entry["ts"],
        "level": "warning",
        "logger": "fluxkv.x",
        "msg": "lost it after 3 s",
        "event": "lost",
        "address": "127.0.0.1:1",
    }
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("fluxkv.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = orjson.loads(formatter.format(record))
    assert entry["msg"] == "failed" and "ValueError: bad\nvalue" in entry["exc"]
    assert "\n" not in formatter.format(record)  # one line, whatever the message holds


@pytest.mark.usefixtures("grpc_server")
def test_json_lines_carry_the_lifecycle_and_nothing_per_request() -> None:
    with server_process(env={"FLUX_LOG_FORMAT": "json"}) as server:
        server.wait_for('"event":"serving"')
        before = len(server.lines)
        with grpc.insecure_channel(server.address) as channel:
            kv = kv_pb2_grpc.KVStub(channel)
            for i in range(20):
                kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"), timeout=10)
                kv.Get(pb.GetRequest(key=f"k{i}"), timeout=10)
        assert len(server.lines) == before
        assert server.stop() == 0
    assert events(server) == [
        "starting",
        "admin_listening",
        "serving",
        "signal",
        "shutdown_started",
        "shutdown_grpc_stopped",
        "shutdown_complete",
    ]
    by_event = {entry["event"]: entry for entry in records(server) if "event" in entry}
    assert by_event["serving"]["address"] == server.address
    assert by_event["serving"]["logger"] == "fluxkv.server" and by_event["serving"]["level"] == "info"
    assert by_event["signal"]["signal"] == "SIGTERM"
    assert by_event["shutdown_complete"]["revision"] == 20


@pytest.mark.usefixtures("grpc_server")
def test_json_lines_of_a_node_with_etcd_and_cdc(etcd_server: EtcdServer, names: Names) -> None:
    env = {
        "FLUX_LOG_FORMAT": "json",
        "FLUX_ETCD_ENDPOINTS": etcd_server.endpoint,
        "FLUX_ETCD_PREFIX": f"/fluxkv-test-{uuid.uuid4().hex[:8]}/",
        "FLUX_RABBITMQ_URL": BROKER,
        "FLUX_CDC_EXCHANGE": names.exchange,
        "FLUX_CDC_QUEUE": names.queue,
    }
    with server_process(env=env) as server:
        server.wait_for('"event":"cdc_connected"')
        with grpc.insecure_channel(server.address) as channel:
            kv_pb2_grpc.KVStub(channel).Set(pb.SetRequest(key="k", value=b"v"), timeout=10)
        assert server.stop() == 0
    seen = events(server)
    for expected in ("registered", "serving", "cdc_connected", "deregistered", "shutdown_cdc_flushed"):
        assert expected in seen, seen
    assert seen.index("registered") < seen.index("serving")
    assert seen.index("shutdown_started") < seen.index("deregistered") < seen.index("shutdown_grpc_stopped")
    assert seen[-1] == "shutdown_complete"


@pytest.mark.usefixtures("grpc_server")
def test_console_lines_stay_text() -> None:
    with server_process() as server:
        assert server.stop() == 0
    assert all(not line.startswith("{") for line in server.lines)
    assert any(" INFO fluxkv.server: fluxkv " in line and "serving on" in line for line in server.lines)
