"""What bench/suite.py makes of its results: ratios, the comparison with the previous run,
the markdown report and the plots. Pure functions of the run record (a JSON-ready dict), so
they can be tested on fabricated results.

A scenario result is a dict with `name`, `title`, `group` ("fluxkv", "cdc" or "reference"),
`target`, `args`, `status` ("ok", "failed" or "skipped"), `reason`, and for "ok" the median
round's `throughput_per_s`, `items_per_s`, `latency_ms` (fluxkv-bench's percentiles),
`server_cpu_us_per_request`, `client_cpu_us_per_request` and `failures` (None when unknown).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

Result = dict[str, Any]
BASELINE = "set-100B"  # FluxKV's unary Set: the CDC and reference ratios are to its throughput
THROUGHPUT_DROP = 0.10  # flag a throughput more than 10% below the previous run's
P99_RISE = 0.20  # flag a p99 more than 20% above the previous run's
PERCENTILES = ("p50", "p90", "p99", "p99_9")


def ok(results: list[Result]) -> dict[str, Result]:
    """The results that ran, by name."""
    return {r["name"]: r for r in results if r["status"] == "ok"}


def ratios(results: list[Result]) -> dict[str, float]:
    """Throughput of each CDC and reference scenario over FluxKV's Set (BASELINE)."""
    done = ok(results)
    base = done.get(BASELINE)
    if base is None or not base["throughput_per_s"]:
        return {}
    return {
        name: r["throughput_per_s"] / base["throughput_per_s"]
        for name, r in done.items()
        if r["group"] in ("cdc", "reference")
    }


def compare(previous: list[Result], current: list[Result]) -> list[dict[str, Any]]:
    """One row per scenario that ran in both runs with the same arguments, with its flags."""
    before = ok(previous)
    rows = []
    for name, now in ok(current).items():
        then = before.get(name)
        if then is None or then["args"] != now["args"]:
            continue
        qps_change = now["throughput_per_s"] / then["throughput_per_s"] - 1
        p99_change = now["latency_ms"]["p99"] / then["latency_ms"]["p99"] - 1
        flags = []
        if qps_change < -THROUGHPUT_DROP:
            flags.append(f"throughput {qps_change:+.0%}")
        if p99_change > P99_RISE:
            flags.append(f"p99 {p99_change:+.0%}")
        rows.append(
            {
                "name": name,
                "throughput_before": then["throughput_per_s"],
                "throughput_now": now["throughput_per_s"],
                "throughput_change": qps_change,
                "p99_before": then["latency_ms"]["p99"],
                "p99_now": now["latency_ms"]["p99"],
                "p99_change": p99_change,
                "flags": flags,
            }
        )
    return rows


def regressions(comparison: list[dict[str, Any]]) -> list[str]:
    """One line per flagged scenario."""
    return [f"{row['name']}: {', '.join(row['flags'])}" for row in comparison if row["flags"]]


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _failures(r: Result) -> str:
    return "—" if r["failures"] is None else str(sum(r["failures"].values()))


def render(record: dict[str, Any]) -> str:
    """The markdown report of a run record (see bench/suite.py's write_outputs)."""
    results: list[Result] = record["scenarios"]
    machine, settings = record["machine"], record["settings"]
    lines = [
        f"# FluxKV benchmark suite: {record['mode']} run of {record['time']}",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['loadavg']} at the start, "
        f"{record['loadavg_end']} at the end",
        f"- software: Python {machine['python']}, grpcio {machine['grpcio']}, fluxkv {machine['commit']}",
        f"- client: fluxkv-bench, {settings['concurrency']} requests in flight, {settings['requests']} requests per "
        f"unary scenario after {settings['warmup']} warm-up, {settings['keyspace']} keys, {settings['rounds']} "
        "round(s) (figures are each scenario's median round by throughput)",
        f"- wall time: {record['wall_time_s']:.0f} s",
        "",
        "## Scenarios",
        "",
    ]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["name"], r["title"], f"**{r['status']}**: {r['reason']}"] + [""] * 9)
            continue
        lat, cpu = r["latency_ms"], r["server_cpu_us_per_request"]
        rows.append(
            [r["name"], r["title"], _num(r["throughput_per_s"]), _num(r["items_per_s"])]
            + [_ms(lat.get(p)) for p in PERCENTILES]
            + [_ms(lat.get("max")), _num(cpu), _num(r["client_cpu_us_per_request"]), _failures(r)]
        )
    header = ["scenario", "what", "req/s", "items/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
    lines += _table([*header, "server CPU µs/req", "client CPU µs/req", "failures"], rows)

    done, ratio = ok(results), ratios(results)
    base = done.get(BASELINE)
    lines += ["", "## CDC off versus on", ""]
    cdc = [r for r in results if r["group"] == "cdc"]
    for r in cdc:
        if r["name"] not in done or base is None:
            lines.append(f"{r['name']}: {r['status']} ({r['reason'] or f'{BASELINE} did not run'})")
            continue
        rows = [
            [BASELINE, "off", _num(base["throughput_per_s"]), _ms(base["latency_ms"]["p99"]),
             _num(base["server_cpu_us_per_request"])],
            [r["name"], "on", _num(r["throughput_per_s"]), _ms(r["latency_ms"]["p99"]),
             _num(r["server_cpu_us_per_request"])],
        ]  # fmt: skip
        lines += _table(["scenario", "CDC", "req/s", "p99 ms", "server CPU µs/req"], rows)
        lines += ["", f"CDC on/off throughput: **{ratio[r['name']]:.2f}**"]

    lines += ["", f"## References (throughput as a ratio to FluxKV's {BASELINE})", ""]
    rows = []
    for r in (r for r in results if r["group"] == "reference"):
        if r["name"] in ratio:
            rows.append([r["name"], r["title"], _num(r["throughput_per_s"]), f"{ratio[r['name']]:.2f}"])
        else:
            rows.append([r["name"], r["title"], f"{r['status']}: {r['reason'] or f'{BASELINE} did not run'}", ""])
    lines += _table(["reference", "what", "req/s", f"ratio to {BASELINE}"], rows)

    lines += ["", "## Against the previous run", ""]
    comparison = record["comparison"]
    if record["previous"] is None:
        lines.append(f"No earlier {record['mode']} run in this history folder.")
    else:
        lines.append(
            f"Previous {record['mode']} run: `{record['previous']}`. Flagged: a throughput more than "
            f"{THROUGHPUT_DROP:.0%} lower or a p99 more than {P99_RISE:.0%} higher (scenarios with the same arguments)."
        )
        lines.append("")
        rows = [
            [c["name"], _num(c["throughput_before"]), _num(c["throughput_now"]), f"{c['throughput_change']:+.1%}",
             _ms(c["p99_before"]), _ms(c["p99_now"]), f"{c['p99_change']:+.1%}",
             "**" + ", ".join(c["flags"]) + "**" if c["flags"] else "ok"]
            for c in comparison
        ]  # fmt: skip
        header = ["scenario", "req/s before", "req/s now", "change", "p99 ms before", "p99 ms now", "change", "flag"]
        lines += _table(header, rows)
    lines += ["", "## Plots", "", "![latency percentiles](latency.png)", "", "![throughput](throughput.png)", ""]
    return "\n".join(lines)


def plot(results: list[Result], out_dir: Path) -> list[Path]:
    """latency.png (percentiles per scenario) and throughput.png (requests and items per second)."""
    done = list(ok(results).values())
    names = [r["name"] for r in done]
    latency, throughput = out_dir / "latency.png", out_dir / "throughput.png"

    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(done)), 5))
    width = 0.8 / len(PERCENTILES)
    for i, p in enumerate(PERCENTILES):
        values = [r["latency_ms"].get(p) or math.nan for r in done]
        ax.bar([x + (i - 1.5) * width for x in range(len(done))], values, width, label=p.replace("_", "."))
    ax.set_xticks(range(len(done)), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_title("Latency percentiles per scenario")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(latency, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, max(4.0, 0.45 * len(done) + 1)))
    ys = range(len(done))
    ax.barh([y - 0.2 for y in ys], [r["throughput_per_s"] for r in done], 0.4, label="requests/s")
    ax.barh([y + 0.2 for y in ys], [r["items_per_s"] for r in done], 0.4, label="items/s")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("per second (log scale)")
    ax.set_title("Throughput per scenario")
    ax.legend()
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(throughput, dpi=100)
    plt.close(fig)
    return [latency, throughput]
