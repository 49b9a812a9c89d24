"""bench/http_servers.py in its quick mode, end to end: every candidate passes the answers check and is measured
under both loads. No assertion on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = {"starlette-uvicorn", "aiohttp", "starlette-granian", "litestar-uvicorn", "asgi-uvicorn"}


def test_quick_run_measures_every_candidate(tmp_path: Path) -> None:
    history = tmp_path / "http.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "http_servers.py"), "--quick", "--json", str(history)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = history.read_text().splitlines()
    record = json.loads(line)
    assert record["bench"] == "http_servers"
    assert record["checks"]["errors"] == "0"
    for load in ("get", "post"):
        figures = record["summary"][load]
        assert set(figures) == CANDIDATES
        for candidate, entry in figures.items():
            assert entry["requests_per_s"] > 0, (load, candidate)
            assert entry["server_cpu_us_per_request"] > 0, (load, candidate)
            assert entry["vs_base"]["requests_per_s"] > 0, (load, candidate)
    assert figures["starlette-uvicorn"]["vs_base"]["requests_per_s"] == 1.0
