"""wrk (Debian's wrk), a C HTTP/1.1 load generator, for the benchmarks that load an
HTTP server's GET and POST /api/v1/kv (bench/http_servers.py, bench/gateway.py):
the Lua script, one run with the CPU each server process and wrk used, and a plain
request for the checks made before a load.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from h2load import children_cpu_s

from fluxkv.bench.server_probe import cpu_seconds

PATH = "/api/v1/kv"
JSON_TYPE = "application/json"
INSTALL = "apt-get install wrk"
CHECK_TIMEOUT_S = 10.0
SLACK_S = 60.0
RESULT = re.compile(r"^wrk-result (\{.*\})$", re.MULTILINE)
# Loopback: a proxy from the environment must not be asked.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(address: str, method: str, query: str = "", body: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request to PATH."""
    req = urllib.request.Request(f"http://{address}{PATH}{query}", data=body, method=method)
    if body is not None:
        req.add_header("content-type", JSON_TYPE)
    try:
        with _no_proxy.open(req, timeout=CHECK_TIMEOUT_S) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def wrk_script(directory: Path, name: str, load: str, keys: Sequence[str], value_size: int) -> Path:
    """wrk's Lua script `name`.lua: for `load` "get", a GET of a random one of `keys` per request; for
    "post", a POST of a random one of them with a `value_size`-byte value (each thread seeded apart).
    Its done hook prints the figures as one JSON line."""
    if load == "get":
        make = f'wrk.format("GET", "{PATH}?key=" .. pick())'
    else:
        body = f'\'{{"key":"\' .. pick() .. \'","value":"{"v" * value_size}"}}\''
        make = f'wrk.format("POST", "{PATH}", {{["Content-Type"] = "{JSON_TYPE}"}}, {body})'
    script = directory / f"{name}.lua"
    script.write_text(f"""local keys = {{{", ".join(f'"{key}"' for key in keys)}}}
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
function init(args)
  math.randomseed(seed)
end
function pick()
  return keys[math.random(#keys)]
end
function request()
  return {make}
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('wrk-result {{"requests": %d, "duration_us": %d, "socket_errors": %d, ' ..
    '"status_errors": %d, "p50_us": %f, "p99_us": %f}}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
""")
    return script


@dataclass
class WrkFigures:
    requests: int  # answered, whatever the status
    socket_errors: int  # connect, read and write errors and time-outs
    status_errors: int  # answers other than 2xx or 3xx
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: dict[str, float]  # of each process of `pids` (and its descendants)
    client_cpu_us_per_request: float  # wrk's


def wrk(
    tool: str, address: str, script: Path, threads: int, connections: int, duration: int, pids: Mapping[str, int]
) -> WrkFigures:
    """One wrk run of `duration` seconds against http://`address`; the CPU of each of `pids` (name: pid)
    and its descendants (granian's worker) from /proc, wrk's from this process's waited-for children."""
    before, client_before = {name: cpu_seconds(pid) for name, pid in pids.items()}, children_cpu_s()
    argv = [tool, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "-s", str(script),
            f"http://{address}{PATH}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + SLACK_S, check=False)
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    client_cpu = children_cpu_s() - client_before
    found = RESULT.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed on {address} (exit {proc.returncode}): {(proc.stderr or proc.stdout)}")
    result = json.loads(found.group(1))
    requests, seconds = result["requests"], result["duration_us"] / 1e6
    per_request = max(requests, 1)
    return WrkFigures(
        requests=requests,
        socket_errors=result["socket_errors"],
        status_errors=result["status_errors"],
        seconds=seconds,
        requests_per_s=requests / seconds,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        cpu_us_per_request={name: cpu / per_request * 1e6 for name, cpu in used.items()},
        client_cpu_us_per_request=client_cpu / per_request * 1e6,
    )


def wrk_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
    return " ".join(out.split()[:2]) or "wrk"
