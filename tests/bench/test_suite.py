"""bench/suite.py: the comparison with the previous run and the report, on fabricated results; then one quick run
of the whole suite, end to end, which checks that it works (no assertion on speed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import suite  # noqa: E402
import suite_report  # noqa: E402

QUICK = suite.MODES["quick"]
NAMES = [s.name for s in suite.SCENARIOS]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result(scenario: suite.Scenario, qps: float = 1000.0, p99: float = 10.0, **extra: Any) -> dict[str, Any]:
    """A fabricated scenario result in the shape suite.summarize gives."""
    return {
        "name": scenario.name,
        "title": scenario.title,
        "group": scenario.group,
        "target": scenario.target,
        "args": scenario.args(QUICK),
        "status": "ok",
        "reason": None,
        "rounds": [],
        "throughput_per_s": qps,
        "items_per_s": qps * scenario.items,
        "latency_ms": {
            "min": 1.0,
            "avg": 5.0,
            "p50": 4.0,
            "p90": 7.0,
            "p95": 8.0,
            "p99": p99,
            "p99_9": 12.0,
            "max": 20.0,
        },
        "server_cpu_us_per_request": 300.0,
        "client_cpu_us_per_request": 250.0,
        "failures": {},
        **extra,
    }


def scenario(name: str) -> suite.Scenario:
    return next(s for s in suite.SCENARIOS if s.name == name)


def flags(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    rows = suite_report.compare([before], [now])
    assert len(rows) == 1
    flagged: list[str] = rows[0]["flags"]
    return flagged


@pytest.mark.parametrize(("qps", "flagged"), [(890.0, True), (910.0, False), (1200.0, False)])
def test_compare_flags_a_throughput_drop_of_more_than_10_percent(qps: float, flagged: bool) -> None:
    s = scenario("set-100B")
    got = flags(result(s, qps=1000.0), result(s, qps=qps))
    assert got == (["throughput -11%"] if flagged else [])


@pytest.mark.parametrize(("p99", "flagged"), [(12.1, True), (11.9, False), (5.0, False)])
def test_compare_flags_a_p99_rise_of_more_than_20_percent(p99: float, flagged: bool) -> None:
    s = scenario("mset-100")
    got = flags(result(s, p99=10.0), result(s, p99=p99))
    assert got == (["p99 +21%"] if flagged else [])


def test_compare_skips_scenarios_that_did_not_run_in_both_or_changed_arguments() -> None:
    a, b, c = scenario("set-100B"), scenario("get-100B"), scenario("redis-set-100B")
    before = [result(a), result(b, args=["-t", "get", "-n", "1"]), result(c, status="skipped", reason="no redis")]
    now = [result(a, qps=10.0), result(b, qps=10.0), result(c, qps=10.0)]
    rows = suite_report.compare(before, now)
    assert [row["name"] for row in rows] == ["set-100B"]
    assert suite_report.regressions(rows) == ["set-100B: throughput -99%"]


def fabricated_record(previous: str | None) -> dict[str, Any]:
    results = [result(s) for s in suite.SCENARIOS]
    by_name = {r["name"]: r for r in results}
    by_name["set-100B-cdc"]["throughput_per_s"] = 900.0
    by_name["noop-set-100B"]["throughput_per_s"] = 1250.0
    by_name["redis-set-100B"].update(status="skipped", reason="redis-benchmark not found on PATH")
    by_name["redis-set-100B"]["latency_ms"] = {"p50": 0.4, "p99": 1.0}  # no p90 or p99.9, as redis-benchmark
    before = [result(s) for s in suite.SCENARIOS]
    return {
        "time": "2026-11-22T00:00:00+0000",
        "mode": "quick",
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "loadavg": [0.1, 0.1, 0.1],
            "python": "3.11",
            "grpcio": "1.85",
            "commit": "abc1234",
        },
        "loadavg_end": [0.2, 0.1, 0.1],
        "settings": {"concurrency": 50, "requests": 2000, "warmup": 200, "keyspace": 10000, "rounds": 1},
        "scenarios": results,
        "ratios": suite_report.ratios(results),
        "previous": previous,
        "comparison": suite_report.compare(before, results) if previous else [],
        "wall_time_s": 42.0,
    }


def test_report_has_every_scenario_the_ratios_and_the_comparison() -> None:
    record = fabricated_record("bench/results/suite-20261121-000000-quick")
    expected = {"noop-set-100B": 1.25, "set-100B-cdc": 0.9, "h2load-set-100B": 1.0, "etcd-put-100B": 1.0}
    assert record["ratios"] == expected
    text = suite_report.render(record)
    for name in NAMES:
        assert re.search(rf"^\| {re.escape(name)} \|", text, re.MULTILINE), name
    assert "CDC on/off throughput: **0.90**" in text
    assert "| noop-set-100B | no-op pygrpc-native server, Set (the ceiling) | 1,250 | 1.25 |" in text
    assert "skipped: redis-benchmark not found on PATH" in text
    assert "| set-100B-cdc | 1,000 | 900 | -10.0% |" in text  # exactly 10% lower: not flagged
    assert "**throughput" not in text
    assert "![latency percentiles](latency.png)" in text and "![throughput](throughput.png)" in text


def test_report_without_a_previous_run_says_so() -> None:
    text = suite_report.render(fabricated_record(None))
    assert "No earlier quick run in this history folder." in text


def test_plots_are_pngs(tmp_path: Path) -> None:
    paths = suite_report.plot(fabricated_record(None)["scenarios"], tmp_path)
    assert [p.name for p in paths] == ["latency.png", "throughput.png"]
    for p in paths:
        assert p.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(300)
def test_quick_suite_end_to_end(tmp_path: Path) -> None:
    """One real quick run, with a fabricated earlier run in the history folder to compare with."""
    earlier = tmp_path / "suite-20000101-000000-quick"
    earlier.mkdir()
    record = fabricated_record(None)
    record["scenarios"] = [result(s) for s in suite.SCENARIOS]  # 1000 requests/s each, which mset-1000 cannot reach
    earlier.joinpath("run.json").write_text(json.dumps(record))

    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"^report: (\S+)", done.stdout, re.MULTILINE)
    assert match, done.stdout
    report = Path(match.group(1))
    run_dir = report.parent
    assert run_dir.parent == tmp_path and run_dir.name.endswith("-quick")

    run = json.loads((run_dir / "run.json").read_text())
    assert [r["name"] for r in run["scenarios"]] == NAMES
    for r in run["scenarios"]:
        # References and the CDC node may be skipped when their service is missing; FluxKV's own must run.
        assert r["status"] == "ok" or (r["status"] == "skipped" and r["group"] != "fluxkv"), r
        if r["status"] == "ok":
            assert r["throughput_per_s"] > 0 and r["latency_ms"]["p99"] > 0
            if r["group"] == "fluxkv":
                assert r["server_cpu_us_per_request"] is not None
    assert run["previous"] == str(earlier)
    assert {row["name"] for row in run["comparison"]} == {r["name"] for r in run["scenarios"] if r["status"] == "ok"}
    assert "REGRESSION mset-1000: throughput -" in done.stdout

    text = report.read_text()
    for name in NAMES:
        assert re.search(rf"^\| {re.escape(name)} \|", text, re.MULTILINE), name
    assert f"Previous quick run: `{earlier}`" in text
    for png in ("latency.png", "throughput.png"):
        assert (run_dir / png).read_bytes().startswith(PNG_MAGIC)
