"""
The shipping files checked without Docker or Kubernetes: the security
settings of the Dockerfile, the Compose file and the manifests, read
with PyYAML, and the systemd unit verified by systemd-analyze when it is
installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def test_dockerfile():
    """
    Non-root user 1001, the plugin cache built at build time, a health
    check through Python's urllib against /health, and the twistd command.
    """
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    by_name = {}
    for name, *rest in instructions:
        by_name.setdefault(name.upper(), []).append(rest[0] if rest else "")
    assert by_name["USER"][-1].strip() == "1001:1001"
    assert by_name["FROM"][-1].startswith("python:3.11-slim")
    assert any("getPlugins" in run for run in by_name["RUN"])
    assert "urllib.request" in by_name["HEALTHCHECK"][0]
    assert "/health" in by_name["HEALTHCHECK"][0]
    assert by_name["CMD"][-1].strip() == '["twistd", "-n", "--pidfile=", "reductrai"]'


def test_compose():
    """
    Secrets from files, read-only root with a tmpfs, every capability
    dropped, no new privileges, resource limits, rotated logs, a named
    data volume and an internal admin network.
    """
    document = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    service = document["services"]["reductrai"]
    assert service["read_only"] is True
    assert any(entry.startswith("/tmp") for entry in service["tmpfs"])
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["user"] == "1001:1001"
    limits = service["deploy"]["resources"]["limits"]
    assert {"cpus", "memory"} <= set(limits)
    assert {"max-size", "max-file"} <= set(service["logging"]["options"])
    volume, _, target = service["volumes"][0].partition(":")
    assert volume in document["volumes"]
    assert target == "/var/lib/reductrai"
    for name in service["secrets"]:
        assert "file" in document["secrets"][name]
    assert document["networks"]["admin"]["internal"] is True
    environment = service["environment"]
    assert environment["DD_API_KEY_FILE"].startswith("/run/secrets/")
    assert not any("API_KEY" in key and not key.endswith("_FILE") for key in environment)


def load_manifests() -> list[dict]:
    documents = []
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def test_kubernetes_manifests():
    """
    A StatefulSet with a claim template, secrets by reference, probes on
    /health and /ready, a locked-down security context; a Service, a
    NetworkPolicy and a PodDisruptionBudget selecting its pods.
    """
    documents = load_manifests()
    kinds = {doc["kind"]: doc for doc in documents}
    assert {"StatefulSet", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds)
    statefulset = kinds["StatefulSet"]
    labels = statefulset["spec"]["selector"]["matchLabels"]
    pod = statefulset["spec"]["template"]["spec"]
    assert statefulset["spec"]["template"]["metadata"]["labels"] == labels
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    (container,) = pod["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/reductrai"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    secret_volumes = [volume for volume in pod["volumes"] if "secret" in volume]
    assert secret_volumes and all(volume["name"] in mounts for volume in secret_volumes)
    assert not any("value" in variable and ("API_KEY" in variable["name"] or "TOKEN" in variable["name"]) and not variable["name"].endswith("_FILE")
                   for variable in container["env"])
    for kind in ("NetworkPolicy", "PodDisruptionBudget"):
        assert kinds[kind]["spec"]["podSelector" if kind == "NetworkPolicy" else "selector"]["matchLabels"] == labels
    for document in documents:
        if document["kind"] == "Service":
            assert document["spec"]["selector"] == labels
    ports = {port["containerPort"] for port in container["ports"]}
    policy_ports = {port["port"] for rule in kinds["NetworkPolicy"]["spec"]["ingress"] for port in rule["ports"]}
    assert policy_ports <= ports


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit(tmp_path):
    """
    The unit passes systemd-analyze verify (with ExecStart pointed at this
    environment's twistd) and sets the hardening options.
    """
    text = (ROOT / "conf" / "reductrai.service").read_text()
    for setting in ("ProtectSystem=strict", "NoNewPrivileges=yes", "ReadWritePaths=/var/lib/reductrai", "User=reductrai", "CapabilityBoundingSet="):
        assert setting + "\n" in text
    twistd = Path(sys.executable).parent / "twistd"
    unit = tmp_path / "reductrai.service"
    unit.write_text(text.replace("/opt/reductrai/bin/twistd", str(twistd)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
