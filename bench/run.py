"""
The reductrai load benchmark: one command that measures the daemon and its
nginx baselines in the same run and appends the results to BENCHMARKS.md.

    /work/venv/bin/python bench/run.py            # full run (10 s per point)
    /work/venv/bin/python bench/run.py --quick    # smoke run (3 s per point)

Everything listens on 127.0.0.1 ports picked at start.  Every process the
harness starts (nginx sink, nginx TLS relay, twisted.web baseline, reductrai,
wrk, the idle-connection client, py-spy) is bounded in time, and the
harness stops it by its PID at the end.  See BENCHMARKS.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import payloads  # noqa: E402
import procs  # noqa: E402
from profile_report import summarize_collapsed  # noqa: E402

REPOSITORY = procs.REPOSITORY
WORKLOADS = ("series-small", "logs-1mb-gzip", "otlp-traces", "prom-remote-write", "mixed-replay", "series-short-conn")
MODES = ("forward", "store-only", "upstream-down", "sample")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# Installation.

def ensure_tools(allow_install: bool, want_py_spy: bool) -> None:
    """
    Make sure nginx and wrk are on PATH, installing the Debian packages
    when they are not (only where /usr/sbin/policy-rc.d keeps the package
    from starting the system nginx service), and py-spy in this virtual
    environment when a profile is requested.
    """
    if want_py_spy and allow_install and not (procs.VENV_BIN / "py-spy").exists() and not shutil.which("py-spy"):
        log("installing py-spy with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], timeout=600)
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if not missing:
        return
    if not allow_install:
        raise SystemExit(f"missing {', '.join(missing)}; run: apt-get install -y nginx-light wrk")
    if not Path("/usr/sbin/policy-rc.d").exists():
        raise SystemExit(
            "nginx/wrk are missing and no /usr/sbin/policy-rc.d stops the package from starting the "
            "system nginx service; install them yourself: apt-get install -y nginx-light wrk"
        )
    log("installing nginx-light and wrk with apt-get")
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "nginx-light", "wrk"]
    if subprocess.run(command, env=environment, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, env=environment, timeout=600)
        subprocess.run(command, check=True, env=environment, timeout=600)


def export_revision(revision: str, target: Path) -> Path:
    """
    Write the tree of a git revision into C{target} with C{git archive}
    (the repository and its working tree are left as they are).
    """
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision], cwd=REPOSITORY, capture_output=True, timeout=120, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=120)
    return target


def machine() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPOSITORY,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "commit": commit + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0].strip(),
    }


# One measured point.

def probe(port: int, request: payloads.Request) -> str:
    """
    Send one request of a workload over TLS and return the status and the
    start of the response, so the report shows what the target did.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        headers = {name: value for name, value in request.headers}
        connection.request(request.method, request.path, body=request.body, headers=headers)
        answer = connection.getresponse()
        body = answer.read(200)
        return f"{answer.status} {body.decode('utf-8', 'replace')[:120]}"
    except (OSError, http.client.HTTPException) as error:
        return f"error {error}"
    finally:
        connection.close()


def probe_all(port: int, workload: payloads.Workload, limit: int = 200) -> dict[str, int]:
    """
    Send each distinct (method, path) of a workload once and count the
    responses by C{"<path> <status>"}, to show which requests the target
    serves and which it rejects.
    """
    seen = {}
    for request in workload.requests:
        seen.setdefault((request.method, request.path.split("?")[0]), request)
    counts: Counter = Counter()
    for (method, path), request in list(seen.items())[:limit]:
        counts[f"{method} {path} {probe(port, request).split(' ', 1)[0]}"] += 1
    return dict(sorted(counts.items()))


def measure(
    process: Optional[procs.Process],
    url: str,
    script: Path,
    duration: float,
    connections: int,
    mean_decoded: float,
) -> dict:
    """
    Run wrk once and return its figures with the target's CPU use.
    """
    cpu_before = process.cpu_seconds() if process else 0.0
    started = time.monotonic()
    result = loadgen.run_wrk(url, script, duration, connections)
    wall = time.monotonic() - started
    cpu = (process.cpu_seconds() - cpu_before) if process else 0.0
    ok = max(result.requests - result.status_errors, 0)
    ok_rps = ok / result.duration_s if result.duration_s else 0.0
    return {
        "requests": result.requests,
        "rps": round(result.rps, 1),
        "ok_rps": round(ok_rps, 1),
        "errors": result.errors,
        "status_errors": result.status_errors,
        "socket_errors": result.socket_errors,
        "decoded_mb_s": round(ok_rps * mean_decoded / 1e6, 2),
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "p999_ms": result.p999_ms,
        "max_ms": result.max_ms,
        "cpu_percent": round(100 * cpu / wall, 1) if process else None,
        "cpu_us_per_request": round(1e6 * cpu / result.requests, 1) if process and result.requests else None,
    }


def run_points(
    label: str,
    process: Optional[procs.Process],
    port: int,
    manifest: Path,
    workdir: Path,
    workload: payloads.Workload,
    options,
    half: bool = True,
) -> list[dict]:
    """
    Measure the maximum (closed loop) and, if C{half}, 50% of it (rate
    limited) against one target.
    """
    url = f"https://127.0.0.1:{port}"
    script = loadgen.write_script(workdir / f"{label}-max.lua", manifest)
    points = []
    if options.warmup:
        loadgen.run_wrk(url, script, options.warmup, workload.connections)
    top = measure(process, url, script, options.duration, workload.connections, workload.mean_decoded)
    top.update(target=label, point="max")
    points.append(top)
    log(f"  {label:<24} max  {top['rps']:>9.1f} req/s  p99 {top['p99_ms']:.1f} ms  errors {top['errors']}")
    mostly_errors = top["errors"] > top["requests"] / 2
    if half and mostly_errors:
        log(f"  {label:<24} 50%  skipped: most requests of the max point failed")
    if half and not mostly_errors and top["rps"] > 2:
        rate = top["rps"] / 2
        script = loadgen.write_script(workdir / f"{label}-half.lua", manifest, rate=rate)
        point = measure(process, url, script, options.duration, workload.connections, workload.mean_decoded)
        point.update(target=label, point="50%", target_rps=round(rate, 1))
        points.append(point)
        log(f"  {label:<24} 50%  {point['rps']:>9.1f} req/s  p99 {point['p99_ms']:.1f} ms  errors {point['errors']}")
    return points


def run_direct(
    sink: procs.Process,
    sink_port: int,
    reference: dict,
    manifest: Path,
    workdir: Path,
    workload: payloads.Workload,
    options,
) -> dict:
    """
    Send the workload straight to the nginx sink (plain HTTP, no relay) at
    the rate of C{reference}, a reductrai forward 50% point, so that the
    latency reductrai adds can be read beside it.
    """
    rate = reference["target_rps"]
    label = f"sink direct (at {reference['target']} 50%)"
    script = loadgen.write_script(workdir / f"direct-{rate:.0f}.lua", manifest, rate=rate)
    point = measure(sink, f"http://127.0.0.1:{sink_port}", script, options.duration, workload.connections,
                    workload.mean_decoded)
    point.update(target=label, point="50%", target_rps=rate)
    point["added_p50_ms"] = round(reference["p50_ms"] - point["p50_ms"], 2)
    log(f"  {label:<24} 50%  p50 {point['p50_ms']:.2f} ms; reductrai adds {point['added_p50_ms']:.2f} ms at p50")
    return point


def run_reductrai(
    mode: str,
    workload: payloads.Workload,
    manifest: Path,
    workdir: Path,
    sink_port: int,
    closed_port: int,
    certificate: str,
    private_key: str,
    options,
    workers: int = 1,
) -> list[dict]:
    """
    Start a fresh daemon in C{mode} with C{workers} worker processes,
    measure it, stop it and read its store.  With several C{--workers}
    values the target is named C{reductrai MODE wN}.
    """
    suffix = f" w{workers}" if len(options.workers) > 1 or workers > 1 else ""
    directory = workdir / f"reductrai-{mode}{suffix.replace(' ', '-')}"
    directory.mkdir()
    daemon_mode = {"upstream-down": "forward"}.get(mode, mode)
    forward_to = {
        "forward": f"http://127.0.0.1:{sink_port}",
        "sample": f"http://127.0.0.1:{sink_port}",
        "upstream-down": f"http://127.0.0.1:{closed_port}",
    }.get(mode)
    try:
        process, port, data_dir = procs.start_reductrai(
            directory, daemon_mode, forward_to, certificate, private_key, options.source, workers
        )
    except RuntimeError as error:
        log(f"  reductrai {mode}{suffix}: not started: {str(error).strip().splitlines()[-1] if str(error).strip() else error}")
        return [{"target": f"reductrai {mode}{suffix}", "point": "skipped", "note": str(error)[-400:]}]
    try:
        answer = probe(port, workload.requests[0])
        answers = probe_all(port, workload) if len({r.path for r in workload.requests}) > 1 else None
        points = run_points(
            f"reductrai {mode}{suffix}", process, port, manifest, directory, workload, options,
            half=mode != "upstream-down",
        )
        peak = process.peak_rss_kib()
        if any(point["requests"] == 0 for point in points):
            stack = dump_stack(process.pid)
            (directory / "stalled-stack.txt").write_text(stack)
            for point in points:
                point["note"] = "no request completed; reactor thread stack: " + " <- ".join(
                    line.strip() for line in stack.splitlines() if line.startswith("    ")
                )[:600]
            log(f"  reductrai {mode} stalled; stack in {directory / 'stalled-stack.txt'}")
    finally:
        process.stop()
    stat = procs.store_stat(data_dir, options.source)
    for point in points:
        point["probe"] = answer
        if answers:
            point["probe_by_path"] = answers
        point["peak_rss_mib"] = round(peak / 1024, 1)
        if stat and "records" in stat and stat["records"]:
            point["stored_bytes_per_request"] = round(stat["stored_bytes"] / stat["records"])
            point["file_bytes_per_request"] = round(stat["file_bytes"] / stat["records"])
            point["stored_records"] = stat["records"]
    shutil.rmtree(data_dir, ignore_errors=True)
    return points


def dump_stack(pid: int) -> str:
    """
    Return C{py-spy dump} of a process (its threads' Python stacks), or why
    it could not be taken.
    """
    py_spy = shutil.which("py-spy") or str(procs.VENV_BIN / "py-spy")
    try:
        completed = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"py-spy dump failed: {error}"
    return completed.stdout or completed.stderr


def build_workloads(names: list[str], options) -> list[payloads.Workload]:
    factories = {
        "series-small": lambda: payloads.small_series_workload(),
        "logs-1mb-gzip": lambda: payloads.logs_workload(),
        "otlp-traces": payloads.otlp_traces_workload,
        "prom-remote-write": payloads.remote_write_workload,
        "mixed-replay": lambda: payloads.mixed_replay_workload(options.variants),
        "series-short-conn": lambda: payloads.small_series_workload(close=True),
    }
    return [factories[name]() for name in names]


# Idle connections and profile.

def idle_test(
    label: str, process: procs.Process, port: int, manifest: Path, workdir: Path, options
) -> dict:
    """
    Hold C{options.idle} idle TLS connections open against a target while
    wrk sends the small-series workload, and record the target's memory.
    """
    rss_before = process.rss_kib()
    command = [sys.executable, str(Path(__file__).with_name("idle_conns.py")), str(port), str(options.idle),
               str(options.idle_hold), str(options.idle_open_timeout)]
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result: dict = {"target": label, "connections": options.idle, "rss_before_mib": round(rss_before / 1024, 1)}
    try:
        deadline = time.monotonic() + options.idle_open_timeout + 30
        opened = None
        while time.monotonic() < deadline:
            line = client.stdout.readline()
            if not line:
                break
            if line.startswith("OPEN "):
                opened = json.loads(line[5:])
                break
        result["open"] = opened
        if opened is not None:
            result["rss_idle_mib"] = round(process.rss_kib() / 1024, 1)
            script = loadgen.write_script(workdir / f"idle-{label}.lua", manifest)
            duration = max(1.0, min(options.duration, options.idle_hold - 2))
            served = measure(process, f"https://127.0.0.1:{port}", script, duration, 32, 0)
            result["concurrent_wrk"] = {key: served[key] for key in ("rps", "errors", "p50_ms", "p99_ms", "p999_ms")}
            result["rss_loaded_mib"] = round(process.rss_kib() / 1024, 1)
            for line in client.stdout:
                if line.startswith("DONE "):
                    result["done"] = json.loads(line[5:])
                    break
        result["peak_rss_mib"] = round(process.peak_rss_kib() / 1024, 1)
    finally:
        if client.poll() is None:
            client.terminate()
        try:
            client.wait(15)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait(5)
    log(f"  idle {label}: {json.dumps(result)}")
    return result


def profile_daemon(
    workdir: Path, sink_port: int, certificate: str, private_key: str, manifest: Path, options
) -> Optional[dict]:
    """
    Record the forward-mode daemon with py-spy while wrk sends the small
    series workload; return the summary of L{summarize_collapsed}.
    """
    py_spy = shutil.which("py-spy") or str(procs.VENV_BIN / "py-spy")
    if not Path(py_spy).exists():
        log("  py-spy is not installed; skipping the profile (pip install py-spy)")
        return None
    directory = workdir / "profile"
    directory.mkdir()
    process, port, data_dir = procs.start_reductrai(
        directory, "forward", f"http://127.0.0.1:{sink_port}", certificate, private_key, options.source
    )
    raw = directory / "profile.txt"
    svg = directory / "profile.svg"
    try:
        script = loadgen.write_script(directory / "profile.lua", manifest)
        load = subprocess.Popen(
            ["wrk", "-t1", "-c32", f"-d{options.profile_seconds * 2 + 4}s", "-s", str(script),
             f"https://127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)
            for output, form in ((raw, "raw"), (svg, "flamegraph")):
                subprocess.run(
                    [py_spy, "record", "--pid", str(process.pid), "-d", str(options.profile_seconds), "-r", "100",
                     "--nonblocking", "--format", form, "-o", str(output)],
                    capture_output=True, timeout=options.profile_seconds + 60,
                )
        finally:
            if load.poll() is None:
                load.terminate()
            load.wait(10)
    finally:
        process.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    if not raw.exists():
        log("  py-spy produced no profile (ptrace not permitted?)")
        return None
    summary = summarize_collapsed(
        raw.read_text(), top=options.profile_top, expected_samples=100 * options.profile_seconds
    )
    summary["files"] = {"collapsed": str(raw), "flamegraph": str(svg) if svg.exists() else None}
    log(f"  profile: {summary['samples']} samples; collapsed stacks in {raw}")
    return summary


# Report.

def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        "",
        f"### Run {results['date']} ({'quick' if results['quick'] else 'full'}"
        f"{', subset' if results.get('subset') else ''})",
        "",
        f"- commit `{info['commit']}`; {info['nproc']} CPUs, {info['cpu']}; Python {info['python']}; "
        f"{info['nginx']}; {info['wrk']}; load average at start {' '.join(info['loadavg_at_start'])}",
        f"- command: `{results['command']}`",
        f"- {results['duration']} s per point, wrk 1 thread; nginx {results['nginx_workers']} worker(s) per instance; "
        "50% points are rate-limited by the wrk Lua `delay()` schedule (see above)",
    ]
    if results.get("reductrai_workers", [1]) != [1]:
        lines.append(
            f"- reductrai worker processes (server.workers): {', '.join(map(str, results['reductrai_workers']))}; "
            "CPU % counts every worker; peak RSS is the largest process's"
        )
    if results.get("label"):
        lines.append(f"- note: {results['label']}")
    for workload in results["workloads"]:
        lines += [
            "",
            f"#### {workload['name']}: {workload['note']}",
            "",
            f"{workload['connections']} connections; mean body {workload['mean_wire_bytes']} B on the wire, "
            f"{workload['mean_decoded_bytes']} B decoded. Reductrai probe answer: `{workload.get('probe', '-')}`",
            "",
        ]
        if workload.get("probe_by_path"):
            rejected = [key for key in workload["probe_by_path"] if not key.rsplit(" ", 1)[1].startswith("2")]
            lines += [
                f"Reductrai (forward) answers by path: {len(workload['probe_by_path']) - len(rejected)} of "
                f"{len(workload['probe_by_path'])} distinct paths got 2xx; not 2xx: "
                + (", ".join(f"`{key}`" for key in rejected) or "none"),
                "",
            ]
        lines += [
            "| target | point | req/s | decoded MB/s | p50 ms | p99 ms | p99.9 ms | errors | CPU % | CPU µs/req "
            "| peak RSS MiB | stored B/req | vs nginx |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        nginx_max = next(
            (p["ok_rps"] for p in workload["points"] if p["target"] == "nginx relay" and p["point"] == "max"), None
        )
        for point in workload["points"]:
            if point.get("note") and point["point"] != "skipped":
                lines.append(f"| {point['target']} | {point['point']} | stalled: {point['note'][:300]} |||||||||||")
                continue
            if point["point"] == "skipped":
                lines.append(f"| {point['target']} | skipped | {point.get('note', '')[:150]} |||||||||||")
                continue
            ratio = None
            if nginx_max and point["point"] == "max" and point["target"] != "nginx relay":
                ratio = f"{point['ok_rps'] / nginx_max:.3f}"
            rps = _fmt(point["rps"])
            if point.get("target_rps"):
                rps += f" (of {point['target_rps']:.0f})"
            lines.append(
                f"| {point['target']} | {point['point']} | {rps} | {_fmt(point['decoded_mb_s'], 2)} "
                f"| {_fmt(point['p50_ms'], 2)} | {_fmt(point['p99_ms'], 2)} | {_fmt(point['p999_ms'], 2)} "
                f"| {point['errors']} | {_fmt(point['cpu_percent'])} | {_fmt(point['cpu_us_per_request'])} "
                f"| {_fmt(point.get('peak_rss_mib'))} | {_fmt(point.get('stored_bytes_per_request'))} | {ratio or '-'} |"
            )
        for point in workload["points"]:
            if "added_p50_ms" in point:
                lines.append(
                    f"\nLatency added by {point['target'][len('sink direct (at '):-len(' 50%)')]} over a direct "
                    f"plain-HTTP request to the sink at {point['target_rps']:.0f} req/s: "
                    f"{point['added_p50_ms']:.2f} ms at p50."
                )
    if results.get("idle"):
        lines += [
            "",
            f"#### {results['idle'][0]['connections']} idle TLS keep-alive connections",
            "",
            "| target | opened | open s | RSS before MiB | RSS idle MiB | RSS under load MiB | peak RSS MiB "
            "| wrk req/s meanwhile | wrk errors | wrk p99 ms | closed by server |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for item in results["idle"]:
            opened = item.get("open") or {}
            served = item.get("concurrent_wrk") or {}
            lines.append(
                f"| {item['target']} | {opened.get('opened', '-')} | {opened.get('seconds', '-')} "
                f"| {item.get('rss_before_mib', '-')} | {item.get('rss_idle_mib', '-')} | {item.get('rss_loaded_mib', '-')} "
                f"| {item.get('peak_rss_mib', '-')} | {served.get('rps', '-')} | {served.get('errors', '-')} "
                f"| {served.get('p99_ms', '-')} | {(item.get('done') or {}).get('closed_by_server', '-')} |"
            )
    profile = results.get("profile")
    if profile:
        lines += [
            "",
            f"#### Profile (py-spy, forward mode, series-small, {profile['samples']} reactor-thread samples)",
            "",
            f"Reactor thread busy {_fmt(profile.get('busy_percent'))}% of the recording; "
            f"{profile.get('other_thread_samples', 0)} samples in other threads left out. Shares below are of the "
            "reactor thread's samples.",
            "",
            "| self % | total % | function |",
            "|---:|---:|---|",
        ]
        for row in profile["top_self"]:
            lines.append(f"| {row['self_percent']:.1f} | {row['total_percent']:.1f} | `{row['function']}` |")
        lines += ["", "Inclusive time of selected frames:", "", "| total % | function |", "|---:|---|"]
        for row in profile["top_total"]:
            lines.append(f"| {row['total_percent']:.1f} | `{row['function']}` |")
    return "\n".join(lines) + "\n"


def _terminate(signum, frame) -> None:
    # Turn SIGTERM into an exception so that the finally blocks stop every
    # process the harness started.
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s per point, fewer variants, 2000 idle")
    parser.add_argument("--duration", type=float, help="seconds per point (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each maximum (default 2, quick 0)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ", ".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--nginx-workers", type=int, default=1, help="worker processes per nginx instance (default 1)")
    parser.add_argument("--workers", default="1", help="reductrai worker processes (server.workers); a comma "
                        "list such as 1,2 measures each value in the same run (default 1)")
    parser.add_argument("--variants", type=int, help="variants per corpus request in mixed-replay (default 4, quick 2)")
    parser.add_argument("--idle", type=int, help="idle connections (default 10000, quick 2000; 0 skips)")
    parser.add_argument("--idle-hold", type=float, default=10.0, help="seconds the idle connections are held")
    parser.add_argument("--idle-open-timeout", type=float, default=90.0, help="seconds allowed for opening them")
    parser.add_argument("--profile-seconds", type=int, help="py-spy recording length (default 10, quick 3; 0 skips)")
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument("--rev", help="benchmark this git revision (exported with git archive) instead of "
                        "the working tree")
    parser.add_argument("--label", help="free text added to the report (e.g. 'under contention')")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args(argv)
    quick = options.quick
    options.duration = options.duration or (3.0 if quick else 10.0)
    options.warmup = options.warmup if options.warmup is not None else (0.0 if quick else 2.0)
    options.variants = options.variants or (2 if quick else 4)
    options.idle = options.idle if options.idle is not None else (2000 if quick else 10000)
    options.profile_seconds = options.profile_seconds if options.profile_seconds is not None else (3 if quick else 10)
    try:
        options.workers = [int(value) for value in options.workers.split(",") if value]
    except ValueError:
        parser.error(f"--workers takes whole numbers separated by commas, not {options.workers!r}")
    if not options.workers or any(not 1 <= value <= 16 for value in options.workers):
        parser.error("--workers values must be between 1 and 16")
    names = [name for name in options.workloads.split(",") if name]
    modes = [mode for mode in options.modes.split(",") if mode]
    for name in names:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name}")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode}")

    signal.signal(signal.SIGTERM, _terminate)
    ensure_tools(not options.no_install, bool(options.profile_seconds))
    procs.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="reductrai-bench-"))
    command = "bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick, "duration": options.duration, "nginx_workers": options.nginx_workers,
        "reductrai_workers": options.workers,
        "command": command.strip(), "label": options.label, "machine": machine(), "workloads": [],
        "subset": set(names) != set(WORKLOADS) or set(modes) != set(MODES),
    }
    options.source = None
    if options.rev:
        options.source = export_revision(options.rev, workdir / "source")
        results["machine"]["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", options.rev], cwd=REPOSITORY, capture_output=True, text=True, timeout=10,
        ).stdout.strip() + " (--rev, exported)"
    log(f"working in {workdir}; commit {results['machine']['commit']}")
    from reductrai.tls import ensure_dev_certificate

    certificate, private_key = ensure_dev_certificate(str(workdir / "certificate"))
    started: list[procs.Process] = []
    try:
        sink, sink_port = procs.start_sink(workdir, options.nginx_workers)
        started.append(sink)
        relay, relay_port = procs.start_relay(workdir, options.nginx_workers, sink_port, certificate, private_key)
        started.append(relay)
        closed_port = procs.free_port()
        series_manifest = None
        for workload in build_workloads(names, options):
            log(f"workload {workload.name}: {len(workload.requests)} request bodies, {workload.note}")
            wdir = workdir / workload.name
            extra = (("Connection", "close"),) if workload.close else ()
            manifest = payloads.write_manifest(workload, wdir / "bodies", extra)
            if workload.name == "series-small":
                series_manifest = manifest
            entry = {
                "name": workload.name, "note": workload.note, "connections": workload.connections,
                "mean_wire_bytes": round(workload.mean_wire), "mean_decoded_bytes": round(workload.mean_decoded),
                "paths": dict(Counter(r.path.split("?")[0] for r in workload.requests).most_common(8)),
                "points": [],
            }
            entry["points"] += run_points("nginx relay", relay, relay_port, manifest, wdir, workload, options)
            if workload.name in ("series-small", "series-short-conn"):
                bare, bare_port = procs.start_twisted_baseline(wdir, certificate, private_key)
                try:
                    entry["points"] += run_points("twisted.web bare", bare, bare_port, manifest, wdir, workload,
                                                  options, half=False)
                finally:
                    bare.stop()
            for mode, workers in [(mode, workers) for mode in modes for workers in options.workers]:
                points = run_reductrai(mode, workload, manifest, wdir, sink_port, closed_port,
                                       certificate, private_key, options, workers)
                entry["points"] += points
                half = [point for point in points if point["point"] == "50%" and point.get("target_rps")]
                if mode == "forward" and half and not workload.close:
                    entry["points"].append(
                        run_direct(sink, sink_port, half[0], manifest, wdir, workload, options)
                    )
                if mode == "forward" and "probe" not in entry and points and "probe" in points[0]:
                    entry["probe"] = points[0]["probe"]
                    entry["probe_by_path"] = points[0].get("probe_by_path")
            results["workloads"].append(entry)

        if series_manifest is None and (options.idle or options.profile_seconds):
            workload = payloads.small_series_workload()
            series_manifest = payloads.write_manifest(workload, workdir / "series-bodies")
        if options.idle:
            log(f"{options.idle} idle connections")
            results["idle"] = [idle_test("nginx relay", relay, relay_port, series_manifest, workdir, options)]
            directory = workdir / "idle-reductrai"
            directory.mkdir()
            process, port, data_dir = procs.start_reductrai(
                directory, "forward", f"http://127.0.0.1:{sink_port}", certificate, private_key, options.source
            )
            try:
                results["idle"].append(idle_test("reductrai forward", process, port, series_manifest, workdir, options))
            finally:
                process.stop()
                shutil.rmtree(data_dir, ignore_errors=True)
        if options.profile_seconds:
            log("profiling the daemon with py-spy")
            results["profile"] = profile_daemon(workdir, sink_port, certificate, private_key, series_manifest, options)
    finally:
        for process in reversed(started):
            process.stop()
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M UTC")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    markdown = report_markdown(results)
    print(markdown)
    if not options.no_append:
        with open(REPOSITORY / "BENCHMARKS.md", "a") as target:
            target.write(markdown)
        log("appended to BENCHMARKS.md")
    log(f"raw results: {workdir / 'results.json'}")
    if not options.keep:
        for child in workdir.iterdir():
            if child.is_dir() and child.name not in ("profile",):
                shutil.rmtree(child, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
