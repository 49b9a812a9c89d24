"""bench/gateway.py in its quick mode, end to end, with the node on each gRPC server: the answers and the
revision checks pass and every load is measured. No assertion on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOADS = {"direct-get", "direct-set", "gateway-get", "gateway-post", "gateway-get-hot"}


def test_quick_run_measures_every_load(grpc_server: str, tmp_path: Path) -> None:
    history = tmp_path / "gateway.jsonl"
    argv = [sys.executable, str(ROOT / "bench" / "gateway.py"), "--quick", "--grpc-server", grpc_server]
    proc = subprocess.run([*argv, "--json", str(history)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = history.read_text().splitlines()
    record = json.loads(line)
    assert record["bench"] == "gateway" and record["args"]["grpc_server"] == grpc_server
    assert record["checks"]["errors"] == "0" and "writes applied" in record["checks"]["revision"]
    loads = record["summary"]["loads"]
    assert set(loads) == LOADS
    for load, figures in loads.items():
        assert figures["requests_per_s"] > 0, load
        assert (figures["gateway_cpu_us_per_request"] is None) == load.startswith("direct-"), load
    assert set(record["summary"]["pairs"]) == {"gateway-get/direct-get", "gateway-post/direct-set",
                                                "gateway-get-hot/direct-get"}  # fmt: skip
