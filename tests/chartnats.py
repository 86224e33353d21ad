"""Run the chart's rendered NATS servers on real ``nats-server`` processes, as their pods would.

A hub or leaf-node pod gets its logins through its ``nats-auth`` init container: the auth
Secrets' keys, projected as files named after the config variables, become
``/etc/nats-auth/vars.conf``. Here that init container's own script runs (``sh``) on the same
files, written from the Secrets given, and the rendered config runs with the pod's mount paths
moved into a temporary directory (the pid file, the auth and TLS directories).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from picospec.tools.stack.natsserver import find_nats_server
from picospec.tools.stack.procs import spawn, tcp_ready, wait_until


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def write_secret_volume(
    volume: dict[str, Any], secrets: dict[str, dict[str, str]], d: Path
) -> Path:
    """The files a secret or projected volume shows a container, from ``secrets`` (name ->
    data)."""
    d.mkdir(parents=True, exist_ok=True)
    if "projected" in volume:
        sources = [
            s["secret"] | {"secretName": s["secret"]["name"]}
            for s in volume["projected"]["sources"]
        ]
    else:
        sources = [volume["secret"]]
    for src in sources:
        data = secrets[src["secretName"]]
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = d / item["path"]
            path.write_text(data[item["key"]])
            path.chmod(0o440)
    return d


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in spec["volumes"] if v["name"] == name)


def run_auth_init(obj: dict[str, Any], secrets: dict[str, dict[str, str]], d: Path) -> Path:
    """Run the workload's nats-auth init container script; returns the directory of vars.conf."""
    spec = pod_spec(obj)
    (init,) = [c for c in spec.get("initContainers", []) if c["name"] == "nats-auth"]
    secret_dir = write_secret_volume(volume(spec, "nats-secrets"), secrets, d / "nats-secrets")
    auth_dir = d / "nats-auth"
    auth_dir.mkdir(parents=True, exist_ok=True)
    env = {e["name"]: e["value"] for e in init["env"]}
    env.update(SECRET_DIR=str(secret_dir), AUTH_DIR=str(auth_dir))
    assert init["command"] == ["/bin/sh", "-c"]
    proc = subprocess.run(
        ["/bin/sh", "-c", init["args"][0]],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert (auth_dir / "vars.conf").exists()
    return auth_dir


def local_conf(conf: str, pod_dir: Path, tls_dir: Path | None = None) -> Path:
    """The rendered config as the pod's /etc/nats/nats.conf under ``pod_dir`` (next to the
    nats-auth directory its include names), with the pid file and TLS paths moved there."""
    conf = conf.replace('"/tmp/nats.pid"', f'"{pod_dir / "nats.pid"}"')
    if tls_dir is not None:
        conf = conf.replace('"/etc/nats-tls/', f'"{tls_dir}/')
    path = pod_dir / "nats" / "nats.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(conf)
    return path


def start_nats(path: Path, env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """``nats-server -t`` (its own config check) then the server itself, started by
    ``procs.spawn`` (its own session; on Linux it dies with the test run)."""
    full = {**os.environ, **env}
    check = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(path)],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    argv = [str(find_nats_server()), "-c", str(path)]
    return spawn(argv, log or Path(os.devnull), full, Path.cwd())


def wait_ports(*ports: int, timeout: float = 20) -> None:
    wait_until(
        lambda: all(tcp_ready("127.0.0.1", p) for p in ports),
        timeout,
        f"NATS ports {ports} to open",
        interval=0.1,
    )
