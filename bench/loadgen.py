"""
Drive wrk: write its Lua script, run it for a bounded time and parse what
it prints.

The script loads a manifest written by L{payloads.write_manifest}, builds
every request once with C{wrk.format} and cycles through them.  Its C{done}
function prints one line, C{BENCH_JSON {...}}, with the request count, the
errors and the latency percentiles (p50 .. p99.9) in microseconds.

Rate-limited points: when a rate is given, the script defines C{delay()},
which wrk calls before every request.  It keeps one schedule per wrk thread
(C{next_at += interval}) read from C{clock_gettime(CLOCK_MONOTONIC)} through
LuaJIT's FFI, and returns the milliseconds until the next slot, so the
thread sends at the given rate whichever connection is free.  wrk measures
latency from the moment a request is written, so a point where every
connection is busy still hides queueing (coordinated omission).  At 50% of
the maximum that is rare, and the report prints the achieved rate next to
the target rate, so a shortfall is visible.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Optional

import attrs

LUA_TEMPLATE = r"""
local manifest = "%(manifest)s"
local rate_per_thread = %(rate_per_thread)s
local requests = {}
local counter = 0

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local function load_requests()
  local current = nil
  local list = {}
  for line in io.lines(manifest) do
    local method, path, body = line:match("^REQ (%%S+) (%%S+) (.+)$")
    if method then
      current = {method = method, path = path, body = read_file(body), headers = {}}
      table.insert(list, current)
    else
      local name, value = line:match("^H ([^:]+): ?(.*)$")
      if name and current then current.headers[name] = value end
    end
  end
  return list
end

local ffi = nil
local next_at = nil
local interval_ms = nil
if rate_per_thread > 0 then
  ffi = require("ffi")
  pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]])
  interval_ms = 1000.0 / rate_per_thread
end

local function now_ms()
  local ts = ffi.new("bench_timespec[1]")
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts[0].tv_sec) * 1000.0 + tonumber(ts[0].tv_nsec) / 1e6
end

function init(args)
  local list = load_requests()
  for i, r in ipairs(list) do
    requests[i] = wrk.format(r.method, r.path, r.headers, r.body)
  end
  counter = math.random(0, #requests - 1)
end

function request()
  counter = counter %% #requests + 1
  return requests[counter]
end

if rate_per_thread > 0 then
  function delay()
    local now = now_ms()
    if next_at == nil or next_at < now - 1000 then
      next_at = now
    end
    next_at = next_at + interval_ms
    local wait = next_at - now
    if wait < 0 then wait = 0 end
    return math.floor(wait)
  end
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,' ..
    '"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,"status_errors":%%d,"timeouts":%%d,' ..
    '"mean_us":%%.1f,"p50_us":%%d,"p75_us":%%d,"p90_us":%%d,"p99_us":%%d,"p999_us":%%d,"max_us":%%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


@attrs.frozen
class LoadResult:
    """
    What one wrk run measured.

    @ivar rps: completed requests per second (any status).
    @ivar errors: non-2xx/3xx responses plus socket errors and timeouts.
    """

    requests: int
    duration_s: float
    rps: float
    errors: int
    status_errors: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    raw: dict


def write_script(path: Path, manifest: Path, rate: Optional[float] = None, threads: int = 1) -> Path:
    """
    Write the wrk Lua script for C{manifest}; C{rate} (requests per second,
    all threads together) makes it rate-limited.
    """
    rate_per_thread = (rate / threads) if rate else 0
    path.write_text(LUA_TEMPLATE % {"manifest": str(manifest), "rate_per_thread": repr(float(rate_per_thread))})
    return path


def run_wrk(
    url: str,
    script: Path,
    duration: float,
    connections: int,
    threads: int = 1,
    timeout_s: float = 5.0,
) -> LoadResult:
    """
    Run wrk against C{url} for C{duration} seconds and parse its result.

    @raise RuntimeError: wrk failed or printed no result line.
    """
    connections = max(connections, threads)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s", "--latency", "-s", str(script), url,
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + timeout_s + 30,
    )
    match = re.search(r"^BENCH_JSON (\{.*\})$", completed.stdout, re.MULTILINE)
    if completed.returncode != 0 or match is None:
        raise RuntimeError(
            f"wrk failed (exit {completed.returncode}): {completed.stderr.strip()[-500:]} {completed.stdout[-500:]}"
        )
    raw = json.loads(match.group(1))
    duration_s = raw["duration_us"] / 1e6
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    return LoadResult(
        requests=raw["requests"],
        duration_s=duration_s,
        rps=raw["requests"] / duration_s if duration_s else 0.0,
        errors=raw["status_errors"] + socket_errors,
        status_errors=raw["status_errors"],
        socket_errors=socket_errors,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        raw=raw,
    )
