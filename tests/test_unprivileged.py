"""
The daemon as twistd runs it in the container: an unprivileged user whose
only writable directory is the data directory.  Run as root, the test
creates a system user for it; otherwise it runs as the current user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

USER = "reductrai-test"


def unprivileged_user() -> str:
    """
    Return the user to run as, creating it when running as root.
    """
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True, timeout=30)
    return USER


def readable_interpreter(prefix: list[str]) -> tuple:
    """
    Find a Python the unprivileged user can run with reductrai importable:
    this interpreter, or else the system's Python of the same minor
    version with this environment's site-packages and the checkout on
    C{PYTHONPATH} (a pyenv or virtualenv interpreter under a private home
    directory is not readable by other users).

    @return: C{(interpreter, PYTHONPATH or "")}, or C{(None, "")}.
    """
    import site

    probe_code = "import reductrai, twisted, lmdb, zstandard"
    candidates = [(sys.executable, "")]
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.exists(system):
        repository = str(Path(__file__).resolve().parent.parent)
        candidates.append((system, os.pathsep.join([repository, *site.getsitepackages()])))
    for interpreter, python_path in candidates:
        environment = ["env", "-i", f"PYTHONPATH={python_path}"] if python_path else []
        probe = subprocess.run(
            prefix + environment + [interpreter, "-c", probe_code], capture_output=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return interpreter, python_path
    return None, ""


def test_runs_unprivileged_with_only_the_data_directory_writable():
    """
    twistd starts as the unprivileged user, answers /health, and writes
    only into the data directory (mode 0700, files 0600).
    """
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    user = unprivileged_user()
    prefix = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    interpreter, python_path = readable_interpreter(prefix)
    if interpreter is None:
        pytest.skip(f"neither {sys.executable} nor a system Python 3.11 with this environment's packages "
                    f"is readable by user {user} (a parent directory such as /root is private)")

    base = Path(tempfile.mkdtemp(prefix="reductrai-unprivileged-"))
    os.chmod(base, 0o755)
    data = base / "data"
    data.mkdir(mode=0o700)
    info = pwd.getpwnam(user)
    os.chown(data, info.pw_uid, info.pw_gid)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        "REDUCTRAI_LOG_FORMAT": "json",
        "REDUCTRAI_SERVER_DATA_DIR": str(data),
        "REDUCTRAI_SERVER_LISTEN": "ssl:0:interface=127.0.0.1,tcp:0:interface=127.0.0.1",
        "REDUCTRAI_SERVER_ADMIN_LISTEN": "tcp:0:interface=127.0.0.1",
    }
    if python_path:
        environment["PYTHONPATH"] = python_path
    command = prefix + ["env", "-i", *[f"{k}={v}" for k, v in environment.items()],
                        interpreter, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "reductrai"]
    process = subprocess.Popen(command, cwd=str(data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ports: dict[str, int] = {}
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "admin" not in ports:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.decode("utf-8", "replace"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("role") in ("ingest", "admin") and isinstance(event.get("port"), int):
                ports.setdefault(event["role"], event["port"])
        assert "admin" in ports, "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/health", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] == "ok"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    written = [path for path in data.rglob("*")]
    assert written, "nothing was written to the data directory"
    for path in written:
        assert path.stat().st_uid == info.pw_uid
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    shutil.rmtree(base)
