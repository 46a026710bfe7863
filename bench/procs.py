"""
The processes of a benchmark run: the nginx sink, the nginx TLS relay, the
bare twisted.web baseline and the reductrai daemon.  Each starts on free
127.0.0.1 ports and stops by its own PID, and its CPU and memory use are
read from /proc.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

VENV_BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """
    Return a TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """
    Wait until something accepts connections on 127.0.0.1:C{port}.

    @raise RuntimeError: nothing did within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def raise_nofile() -> None:
    """
    Raise this process's open-file limit to its hard limit (children
    inherit it).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# /proc readings.

def cpu_seconds(pid: int) -> float:
    """
    Return the user + system CPU time of C{pid}, in seconds.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """
    Return C{VmRSS} and C{VmHWM} (peak RSS) of C{pid} in KiB.
    """
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def children_of(pid: int) -> list[int]:
    """
    Return the PIDs whose parent is C{pid}.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class Process:
    """
    A child process started by the harness, stopped by its PID.

    @ivar pids: the PIDs whose CPU time counts for this component (nginx:
        the master and its workers).
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path, cwd: Optional[Path] = None, env=None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            list(command), stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.popen.pid

    @property
    def pids(self) -> list[int]:
        return [self.pid] + children_of(self.pid)

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError):
                pass
        return total

    def peak_rss_kib(self) -> int:
        """
        Return the largest peak RSS among this component's processes.
        """
        peaks = []
        for pid in self.pids:
            try:
                peaks.append(memory_kib(pid).get("VmHWM", 0))
            except OSError:
                pass
        return max(peaks, default=0)

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                total += memory_kib(pid).get("VmRSS", 0)
            except OSError:
                pass
        return total

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """
        Send SIGTERM to this process (by PID), wait, then SIGKILL.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


# nginx.

_NGINX_COMMON = """
worker_processes {workers};
worker_rlimit_nofile 40000;
daemon off;
master_process on;
pid {prefix}/{name}.pid;
error_log {prefix}/{name}-error.log warn;
events {{ worker_connections 20000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/{name}-body;
  proxy_temp_path {prefix}/{name}-proxy;
  fastcgi_temp_path {prefix}/{name}-fastcgi;
  uwsgi_temp_path {prefix}/{name}-uwsgi;
  scgi_temp_path {prefix}/{name}-scgi;
  client_max_body_size 64m;
  client_body_buffer_size 4m;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
{body}
}}
"""

_SINK = """
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      default_type application/json;
      return 202 '{{"errors":[]}}';
    }}
  }}
"""

_RELAY = """
  upstream sink {{
    server 127.0.0.1:{sink_port};
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {certificate};
    ssl_certificate_key {private_key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://sink;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
"""


def start_nginx(name: str, prefix: Path, body: str, workers: int, user: str = "root") -> Process:
    """
    Start an nginx master with its own configuration and prefix in
    C{prefix}; never the system service.
    """
    config = prefix / f"{name}.conf"
    user_line = f"user {user};\n" if os.geteuid() == 0 else ""
    config.write_text(user_line + _NGINX_COMMON.format(workers=workers, prefix=prefix, name=name, body=body))
    check = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(prefix), "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx configuration {config} is invalid: {check.stderr.strip()}")
    return Process(name, ["nginx", "-p", str(prefix), "-c", str(config)], prefix / f"{name}.out")


def start_sink(prefix: Path, workers: int) -> tuple[Process, int]:
    port = free_port()
    process = start_nginx("sink", prefix, _SINK.format(port=port), workers)
    wait_for_port(port)
    return process, port


def start_relay(prefix: Path, workers: int, sink_port: int, certificate: str, private_key: str) -> tuple[Process, int]:
    port = free_port()
    body = _RELAY.format(port=port, sink_port=sink_port, certificate=certificate, private_key=private_key)
    process = start_nginx("relay", prefix, body, workers)
    wait_for_port(port)
    return process, port


# twisted.web baseline and reductrai.

def start_twisted_baseline(directory: Path, certificate: str, private_key: str) -> tuple[Process, int]:
    """
    Start the bare twisted.web TLS server of L{twisted_baseline}.
    """
    port = free_port()
    command = [sys.executable, str(Path(__file__).with_name("twisted_baseline.py")), str(port), certificate, private_key]
    process = Process("twisted-bare", command, directory / "twisted-bare.log")
    wait_for_port(port)
    return process, port


def start_reductrai(
    directory: Path,
    mode: str,
    forward_to: Optional[str],
    certificate: str,
    private_key: str,
    source: Optional[Path] = None,
    workers: int = 1,
) -> tuple[Process, int, Path]:
    """
    Start C{twistd -n --pidfile= reductrai} with a fresh data directory and
    wait until its readiness probe returns 200 (with several workers, once
    every worker serves).

    @param source: a source tree to import reductrai from (put first on
        C{PYTHONPATH}) instead of the installed working tree.
    @param workers: C{--workers}; the worker processes are children of the
        twistd process, so L{Process.cpu_seconds} counts them.

    @return: the process, the TLS ingest port and the data directory.
    @raise RuntimeError: it did not become ready; the log says why.
    """
    data_dir = directory / "data"
    port, admin_port = free_port(), free_port()
    command = [
        str(VENV_BIN / "twistd"), "-n", "--pidfile=", "reductrai",
        "--listen", f"ssl:{port}:interface=127.0.0.1",
        "--admin-listen", f"tcp:{admin_port}:interface=127.0.0.1",
        "--data-dir", str(data_dir),
        "--tls-certificate", certificate, "--tls-private-key", private_key,
        "--mode", mode,
    ]
    if forward_to:
        command += ["--forward-to", forward_to]
    if workers > 1:
        command += ["--workers", str(workers)]
    env = _environment(source)
    # The hardened default admits 1,024 connections per listener role; the
    # idle-connection workload opens 10,000, as nginx's configuration here
    # allows.
    env.setdefault("REDUCTRAI_LIMITS_MAX_CONNECTIONS", "20000")
    process = Process("reductrai", command, directory / "reductrai.log", cwd=source or REPOSITORY, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"reductrai exited with {process.popen.returncode}: {process.log_path.read_text()[-1500:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return process, port, data_dir
        except OSError:
            pass
        time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"reductrai did not become ready: {process.log_path.read_text()[-1500:]}")


def _environment(source: Optional[Path]) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(source), env.get("PYTHONPATH"))))
    return env


def store_stat(data_dir: Path, source: Optional[Path] = None) -> Optional[dict]:
    """
    Return C{reductrai-inspect stat --json} of a stopped daemon's data
    directory, or L{None} when it has no store.
    """
    if not (data_dir / "store" / "data.mdb").exists():
        return None
    completed = subprocess.run(
        [sys.executable, "-c", "import sys; from reductrai.inspect import main; sys.exit(main())",
         "--data-dir", str(data_dir), "stat", "--json"],
        capture_output=True, text=True, timeout=300, env=_environment(source), cwd=source or REPOSITORY,
    )
    if completed.returncode != 0:
        return {"error": completed.stderr.strip()[-300:]}
    return json.loads(completed.stdout)
