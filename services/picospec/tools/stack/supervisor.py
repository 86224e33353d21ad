"""The running local stack: :class:`Stack` starts every process, waits for each to be ready, kills,
restarts and cuts what tests ask it to, and stops everything in order."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picospec import split_drafter
from picospec.protocol import subjects
from picospec.tools.stack.config import StackConfig, StackError
from picospec.tools.stack.natsserver import (
    HOST,
    NatsServer,
    NatsServerError,
    NatsUser,
    Pki,
    make_pki,
    port_open,
)
from picospec.tools.stack.procs import (
    NotReady,
    http_ready,
    log_tail,
    spawn,
    terminate_all,
    terminate_each,
    wait_until,
)

EDGE_STOP_TIMEOUT_S = 10.0


VERIFIER_STOP_TIMEOUT_S = 25.0  # the verifier drains for up to ~20 s on SIGTERM


INFRA_STOP_TIMEOUT_S = 5.0


NOT_READY_STOP_TIMEOUT_S = 3.0  # a service still loading its model has nothing to drain


@dataclass
class Service:
    """One PicoSpec service process (verifier, sampler or drafter)."""

    name: str
    role: str
    port: int
    env: dict[str, str]
    log_path: Path
    cpus: frozenset[int] | None = None  # pinned to these CPUs (edge-cloud sides)
    proc: subprocess.Popen[bytes] | None = None
    was_ready: bool = False  # reached /ready since its last start (else nothing to drain)
    python: str = sys.executable  # a verifier on vLLM runs in vLLM's own environment

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def argv(self, log_level: str) -> list[str]:
        return [self.python, "-m", "picospec.cli", "--log-level", log_level, self.role]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group a service leads (each runs in its own session), so the
    processes it started (vLLM's engine core and workers) go with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class LinkControl:
    """Partition and heal the edge-cloud link through the link emulator's control endpoint
    (``POST /link/cut``, ``POST /link/restore``), whose answer confirms the change."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, url: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.url = url  # the control endpoint, http://127.0.0.1:<port>
        self.is_cut = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self, timeout: float = 5.0) -> dict[str, Any]:
        """The link's state: ``cut`` and its counters (bytes each way, connections, refused)."""
        return self._call("GET", "/link", timeout)

    def _call(self, method: str, path: str, timeout: float) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise StackError(f"the link emulator has exited:\n{log_tail(self.log_path)}")
        req = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback
                return dict(json.load(resp))
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise StackError(f"the link emulator's {method} {path} failed: {e}") from e

    def cut(self, timeout: float = 5.0) -> None:
        """Close every connection through the link and refuse new ones."""
        if not self._call("POST", "/link/cut", timeout)["cut"]:
            raise StackError("the link emulator did not cut the link")
        self.is_cut = True

    def restore(self, timeout: float = 5.0) -> None:
        """Accept connections again; the leaf node redials within about a second."""
        if self._call("POST", "/link/restore", timeout)["cut"]:
            raise StackError("the link emulator did not restore the link")
        self.is_cut = False


class Stack:
    """A running local PicoSpec stack; a context manager (``with Stack(cfg) as stack``).

    Component names: ``nats`` (single) or ``nats-hub`` and ``nats-edge`` (edge-cloud), ``netem``
    (when the link is emulated), ``verifier-1`` ... ``verifier-N``, ``sampler``, ``drafter``.
    """

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        cfg = self.config
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="picospec-stack-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.client_user = "picospec" if cfg.client_auth else None
        self.client_password = secrets.token_hex(16) if cfg.client_auth else None
        self.leaf_user = "leaf-" + secrets.token_hex(4)
        self.leaf_password = secrets.token_hex(16)
        # secure: every NATS user by name (verifier-<i>, drafter-<site>, sampler-<site>,
        # leaf-<site>); each service gets its own through its environment
        self.users: dict[str, NatsUser] = self._users() if cfg.secure else {}
        self.pki: Pki | None = make_pki(self.run_dir / "pki") if cfg.tls else None
        self.nats: dict[str, NatsServer] = {}
        self.netem: subprocess.Popen[bytes] | None = None
        self.link: LinkControl | None = None
        self.services: dict[str, Service] = {}
        self._stopped_on_purpose: set[str] = set()
        self.cpus = self.config.cpu_sets()  # {"edge": ..., "cloud": ...} or None
        self._build()

    # -- layout ------------------------------------------------------------------------------

    def _users(self) -> dict[str, NatsUser]:
        """Secure mode's NATS users: one per service, one per site's leaf link, and the edge
        users of ``extra_sites`` (for their drafters and samplers, or their leaf links)."""
        cfg = self.config

        def user(name: str, role: str, site: str = "local", ident: str = "*") -> NatsUser:
            kind = "LEAFNODE" if role == "leaf" else "STANDARD"
            perms = subjects.permissions(role, site=site, ident=ident)
            return NatsUser(name, secrets.token_urlsafe(24), permissions=perms,
                            connection_types=(kind,))  # fmt: skip

        users = {f"verifier-{i}": user(f"verifier-{i}", "verifier", ident=f"verifier-{i}")
                 for i in range(1, cfg.verifiers + 1)}  # fmt: skip
        for site in (cfg.site, *cfg.extra_sites):
            for role in ("drafter", "sampler", "leaf"):
                users[f"{role}-{site}"] = user(f"{role}-{site}", role, site=site)
        return users

    def _server_users(self, side: str) -> list[NatsUser]:
        """Who may connect to the ``single`` server, the cloud ``hub`` or the ``edge`` leaf."""
        cfg = self.config
        out = []
        for name, u in self.users.items():
            role, site = name.split("-", 1)
            if role == "verifier":
                keep = side in ("single", "hub")
            elif role == "leaf":
                keep = side == "hub"
            else:  # drafter, sampler: on the single server, or on their own site's leaf
                keep = side == "single" or (side == "edge" and site == cfg.site)
            if keep:
                out.append(u)
        return out

    def _build(self) -> None:
        cfg = self.config
        common: dict[str, Any] = {"user": self.client_user, "password": self.client_password}
        tls = self.pki.server_tls() if self.pki is not None else None
        if cfg.topology == "single":
            self.nats["nats"] = NatsServer(
                cfg.nats_port,
                name="nats",
                http_port=cfg.monitor_port,
                run_dir=self.run_dir,
                users=self._server_users("single"),
                tls=tls,
                cpus=self._side_cpus("cloud"),
                **common,
            )
        else:
            # secure: the leaf link authenticates as the site's leaf user, whose permissions
            # bound what crosses it, instead of the one shared leaf user
            leaf_auth: dict[str, Any] = {}
            if not cfg.secure:
                leaf_auth = {"leaf_user": self.leaf_user, "leaf_password": self.leaf_password}
            hub = NatsServer(
                cfg.nats_port,
                name="nats-hub",
                http_port=cfg.monitor_port,
                leaf_port=cfg.leaf_port,
                leaf_compression=cfg.leaf_compression,
                run_dir=self.run_dir,
                users=self._server_users("hub"),
                tls=tls,
                cpus=self._side_cpus("cloud"),
                **leaf_auth,
                **common,
            )
            remote = hub.leaf_remote(via_port=cfg.link_port if cfg.link_enabled else None)
            if cfg.secure:
                leaf = self.users[f"leaf-{cfg.site}"]
                remote = dataclasses.replace(remote, user=leaf.user, password=leaf.password)
            self.nats["nats-hub"] = hub
            self.nats["nats-edge"] = NatsServer(
                cfg.edge_nats_port,
                name="nats-edge",
                http_port=cfg.edge_monitor_port,
                leaf_remotes=[remote],
                leaf_compression=cfg.leaf_compression,
                run_dir=self.run_dir,
                users=self._server_users("edge"),
                tls=tls,
                cpus=self._side_cpus("edge"),
                **common,
            )
        cloud_url, edge_url = self.cloud_nats_url, self.nats_url
        for i in range(1, cfg.verifiers + 1):
            name = f"verifier-{i}"
            port = cfg.port_of_verifier(i)
            env = {
                "PICOSPEC_NATS_URL": cloud_url,
                "PICOSPEC_MODEL": cfg.verifier_model,
                "PICOSPEC_QUANTIZE": "none",
                "PICOSPEC_PORT": str(port),
                "PICOSPEC_REPLICA_ID": name,
                **self._auth_env(name),
            }
            svc = self._service(name, "verifier", port, env, "cloud")
            if cfg.verifier_backend == "vllm":
                self._on_vllm(svc)
            self.services[name] = svc
        draft_model, draft = split_drafter(cfg.drafter_model, cfg.verifier_model)
        if cfg.sampler:
            env = {
                "PICOSPEC_NATS_URL": edge_url,
                "PICOSPEC_MODEL": draft_model,
                "PICOSPEC_PORT": str(cfg.sampler_port),
                "PICOSPEC_SITE": cfg.site,
                **self._auth_env(f"sampler-{cfg.site}"),
            }
            self.services["sampler"] = self._service(
                "sampler", "sampler", cfg.sampler_port, env, "edge"
            )
        if cfg.drafter:
            env = {
                "PICOSPEC_NATS_URL": edge_url,
                "PICOSPEC_MODEL": draft_model,
                "PICOSPEC_DRAFT": draft,
                "PICOSPEC_QUANTIZE": cfg.quantize_draft,
                **({"PICOSPEC_DTYPE": cfg.draft_dtype} if cfg.draft_dtype != "auto" else {}),
                "PICOSPEC_PORT": str(cfg.api_port),
                "PICOSPEC_SITE": cfg.site,
                **self._auth_env(f"drafter-{cfg.site}"),
            }
            if cfg.api_key is not None:
                env["PICOSPEC_API_KEY"] = cfg.api_key
            self.services["drafter"] = self._service(
                "drafter", "drafter", cfg.api_port, env, "edge"
            )

    def _on_vllm(self, svc: Service) -> None:
        """A verifier on vLLM: vLLM's interpreter (``make vllm-setup``), and on a machine
        without a GPU the CPU build's settings for a local stack (float32, as the drafter's
        model; no compilation; 32-token KV blocks, so prefix caching keeps a verification
        round to its new tokens; its OpenMP threads on the cloud's CPUs). Variables given to
        the stack (``env``) still win."""
        from picospec.runtime.vllm_env import vllm_python

        svc.python = str(vllm_python())
        env = {"PICOSPEC_VERIFIER_BACKEND": "vllm"}
        if not _has_cuda():
            env.update(
                PICOSPEC_VLLM_DTYPE="float32",
                PICOSPEC_VLLM_ENFORCE_EAGER="true",
                PICOSPEC_VLLM_BLOCK_SIZE="32",
                PICOSPEC_VLLM_CPU_KV_CACHE_GIB="2",
                PICOSPEC_VLLM_MAX_MODEL_LEN="4096",
            )
            if svc.cpus:
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(svc.cpus))
        svc.env.update({k: v for k, v in env.items() if k not in self.config.env})

    def _auth_env(self, user: str) -> dict[str, str]:
        """The NATS credentials and CA of one service (secure / tls)."""
        env = {}
        if self.config.secure:
            u = self.users[user]
            env["PICOSPEC_NATS_USER"] = u.user or ""
            env["PICOSPEC_NATS_PASSWORD"] = u.password or ""
        if self.pki is not None:
            env["PICOSPEC_NATS_TLS_CA"] = str(self.pki.ca)
        return env

    def nats_options(self, user: str | None = None) -> dict[str, Any]:
        """``nats.connect`` keyword arguments for a client of this stack: the TLS context (when
        ``tls``) and the credentials of ``user`` (a name in :attr:`users`; none: the shared
        client user of ``client_auth``, if any)."""
        out: dict[str, Any] = {}
        if user is not None:
            out.update(self.users[user].client_options())
        elif self.client_user is not None:
            out.update(user=self.client_user, password=self.client_password or "")
        if self.pki is not None:
            out["tls"] = ssl.create_default_context(cafile=str(self.pki.ca))
        return out

    def _side_cpus(self, side: str) -> frozenset[int] | None:
        return None if self.cpus is None else self.cpus[side]

    def _service(self, name: str, role: str, port: int, env: dict[str, str], side: str) -> Service:
        cfg = self.config
        cpus = self._side_cpus(side)
        full = dict(os.environ)
        full["PYTHONUNBUFFERED"] = "1"
        full["PICOSPEC_HOST"] = HOST
        if cfg.threads is not None:
            full["PICOSPEC_THREADS"] = str(cfg.threads)
        elif cpus is not None:  # one torch thread per CPU of the side
            full["PICOSPEC_THREADS"] = str(len(cpus))
        if cfg.device_profile:
            full["PICOSPEC_DEVICE_PROFILE"] = cfg.device_profile
        if cfg.secure or cfg.tls:  # no stray credentials from the caller's environment
            for key in [k for k in full if k.startswith("PICOSPEC_NATS_")]:
                del full[key]
        if self.client_user is not None:
            full["PICOSPEC_NATS_USER"] = self.client_user
            full["PICOSPEC_NATS_PASSWORD"] = self.client_password or ""
        full.update(env)
        full.update(cfg.env)
        return Service(name, role, port, full, self.run_dir / f"{name}.log", cpus)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        """Where edge clients connect: the single server or the edge leaf node."""
        return (self.nats.get("nats-edge") or self.nats["nats"]).url

    @property
    def cloud_nats_url(self) -> str:
        """Where cloud clients (verifiers) connect: the single server or the hub."""
        return (self.nats.get("nats-hub") or self.nats["nats"]).url

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.config.api_port}/v1"

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running components, by name."""
        out: dict[str, int] = {}
        for name, server in self.nats.items():
            if server.running and server.pid is not None:
                out[name] = server.pid
        if self.netem is not None and self.netem.poll() is None:
            out["netem"] = self.netem.pid
        for name, svc in self.services.items():
            if svc.proc is not None and svc.proc.poll() is None:
                out[name] = svc.proc.pid
        return out

    @property
    def urls(self) -> dict[str, str]:
        """Each component's address, plus ``api`` (the OpenAI-compatible base URL)."""
        out = {name: server.url for name, server in self.nats.items()}
        if self.config.link_enabled:
            out["netem"] = f"tcp://{HOST}:{self.config.link_port}"
        for name, svc in self.services.items():
            out[name] = svc.url
        if "drafter" in self.services:
            out["api"] = self.api_url
        return out

    def log_path(self, name: str) -> Path:
        if name in self.nats:
            return self.nats[name].log_path
        if name == "netem":
            return self.run_dir / "netem.log"
        return self._get_service(name).log_path

    def summary(self) -> list[str]:
        """One line per component: name, PID, URL."""
        pids, urls = self.pids, self.urls
        lines = []
        for name in [*self.nats, "netem", *self.services]:
            if name in urls:
                pid = pids.get(name)
                lines.append(f"{name:<12} pid {pid if pid else '-':<8} {urls[name]}")
        return lines

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        """Start every component and wait until each is ready; on any failure stop them all."""
        try:
            self._check_ports()
            self._start_infra()
            for name in self.services:
                self.start_service(name, wait=False)
            self.wait_ready(timeout=self.config.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ports(self) -> None:
        """Fail early and clearly if anything already listens on one of our ports (a service
        that cannot bind would exit, but another process's /ready could answer for it)."""
        ports = {p: name for name, server in self.nats.items() for p in server.ports}
        if self.config.link_enabled:
            ports[self.config.link_port] = "netem"
            ports[self.config.link_control_port] = "netem control"
        ports.update({svc.port: name for name, svc in self.services.items()})
        busy = [f"{p} ({name})" for p, name in ports.items() if port_open(HOST, p, timeout=0.2)]
        if busy:
            raise StackError(
                f"already in use on {HOST}: {', '.join(busy)}; is another stack running? "
                "(choose other ports)"
            )

    def _start_infra(self) -> None:
        cfg = self.config
        try:
            if cfg.topology == "single":
                self.nats["nats"].start()
                return
            self.nats["nats-hub"].start()
            if cfg.link_enabled:
                self._start_netem()
            edge = self.nats["nats-edge"].start()
            edge.wait_leafnodes(1, timeout=15.0 + 4 * (cfg.rtt_ms or 0) / 1000)
        except NatsServerError as e:
            raise StackError(str(e)) from e

    def _start_netem(self) -> None:
        cfg = self.config
        log_path = self.log_path("netem")
        argv = [
            sys.executable, "-m", "picospec.tools.stack.netem", "--listen", str(cfg.link_port),
            "--target", f"{HOST}:{cfg.leaf_port}", "--rtt-ms", str(cfg.rtt_ms or 0.0),
            "--control-port", str(cfg.link_control_port),
        ]  # fmt: skip
        if cfg.bandwidth_mbit is not None:
            argv += ["--bandwidth-mbit", str(cfg.bandwidth_mbit)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # pinned with the cloud: under emulation the cloud's CPUs mostly wait out padding, and
        # the link's timers must not steal the edge's compute
        self.netem = spawn(argv, log_path, env, self.run_dir, self._side_cpus("cloud"))
        url = f"http://{HOST}:{cfg.link_control_port}"
        self.link = LinkControl(self.netem, log_path, url)
        ready = functools.partial(http_ready, url + "/link", timeout=0.5)  # once it answers
        try:
            wait_until(ready, 15.0, "netem", proc=self.netem, log_path=log_path, interval=0.02)
        except NotReady as e:
            raise StackError(str(e)) from None

    def _get_service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join([*self.nats, "netem", *self.services])
            raise KeyError(f"no component {name!r} (known: {known})") from None

    def start_service(self, name: str, wait: bool = True, timeout: float | None = None) -> None:
        """(Re)start one service, e.g. after :meth:`kill`; optionally wait for its /ready."""
        svc = self._get_service(name)
        if svc.proc is not None and svc.proc.poll() is None:
            raise StackError(f"{name} is already running (pid {svc.proc.pid})")
        self._stopped_on_purpose.discard(name)
        svc.was_ready = False
        svc.proc = spawn(
            svc.argv(self.config.log_level), svc.log_path, svc.env, self.run_dir, svc.cpus
        )
        if wait:
            self.wait_ready([name], timeout=timeout or self.config.ready_timeout)

    def wait_ready(self, names: list[str] | None = None, timeout: float = 300.0) -> None:
        """Poll each service's ``/ready`` until 200; fail on exit or timeout with its log."""
        pending = list(self.services if names is None else names)

        def all_ready() -> bool:
            for name in list(pending):
                svc = self._get_service(name)
                if svc.proc is None:
                    raise StackError(f"{name} was not started")
                if svc.proc.poll() is not None:
                    raise StackError(
                        f"{name} exited with code {svc.proc.returncode} before it was ready "
                        f"(log {svc.log_path}):\n{log_tail(svc.log_path)}"
                    )
                if http_ready(f"{svc.url}/ready"):
                    svc.was_ready = True
                    pending.remove(name)
            return not pending

        try:
            wait_until(all_ready, timeout, ", ".join(pending), interval=0.2)
        except NotReady:
            tails = "\n".join(
                f"{n} (log {self._get_service(n).log_path}):\n"
                f"{log_tail(self._get_service(n).log_path, lines=20)}"
                for n in pending
            )
            msg = f"not ready after {timeout:.0f}s: {', '.join(pending)}\n{tails}"
            raise StackError(msg) from None

    def exited(self) -> dict[str, int]:
        """Services and servers that have exited on their own (not via stop/kill): name -> code."""
        out: dict[str, int] = {}
        for name, svc in self.services.items():
            if svc.proc is not None and name not in self._stopped_on_purpose:
                code = svc.proc.poll()
                if code is not None:
                    out[name] = code
        if self.netem is not None and "netem" not in self._stopped_on_purpose:
            code = self.netem.poll()
            if code is not None:
                out["netem"] = code
        for name, server in self.nats.items():
            if name not in self._stopped_on_purpose and server.proc is not None:
                code = server.proc.poll()
                if code is not None:
                    out[name] = code
        return out

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float | None = None) -> None:
        """Send ``sig`` to one component. SIGKILL is waited for; other signals only when
        ``wait`` (seconds) is given. A killed service can come back with :meth:`start_service`."""
        if name in self.nats:
            proc = self.nats[name].proc
        elif name == "netem":
            proc = self.netem
        else:
            proc = self._get_service(name).proc
        if proc is None or proc.poll() is not None:
            raise StackError(f"{name} is not running")
        self._stopped_on_purpose.add(name)
        if sig == signal.SIGKILL:
            _kill_group(proc)  # and whatever it started (a vLLM verifier's engine processes)
        else:
            proc.send_signal(sig)
        if sig == signal.SIGKILL or wait is not None:
            proc.wait(wait)

    def restart_nats(self, name: str | None = None, down_s: float = 0.0) -> None:
        """Stop a NATS server (the single server or, by default, the hub), stay down ``down_s``
        seconds, start it again on the same ports. In edge-cloud, wait for the leaf to rejoin
        unless the link is cut."""
        name = name or ("nats" if "nats" in self.nats else "nats-hub")
        if name not in self.nats:
            raise KeyError(f"no NATS server {name!r} (known: {', '.join(self.nats)})")
        server = self.nats[name]
        self._stopped_on_purpose.discard(name)
        server.stop()
        if down_s > 0:
            time.sleep(down_s)
        try:
            server.start()
            if "nats-edge" in self.nats and not (self.link and self.link.is_cut):
                self.nats["nats-edge"].wait_leafnodes(1, timeout=15.0)
        except NatsServerError as e:
            raise StackError(str(e)) from e

    def stop(self) -> None:
        """Stop in order: drafter and sampler, verifiers, the link, the NATS servers.

        Each group gets SIGTERM and its grace period (verifiers drain). Services that never
        became ready (still loading a model) have nothing to drain: they go with the first
        group, with a short grace period.
        """
        edge, cloud = [], []
        for name, svc in self.services.items():
            if svc.proc is None:
                continue
            if not svc.was_ready:
                edge.append((svc.proc, NOT_READY_STOP_TIMEOUT_S))
            elif name in ("drafter", "sampler"):
                edge.append((svc.proc, EDGE_STOP_TIMEOUT_S))
            else:
                cloud.append((svc.proc, VERIFIER_STOP_TIMEOUT_S))
        terminate_each(edge)
        terminate_each(cloud)
        for proc, _ in edge + cloud:  # anything a service started and left behind
            _kill_group(proc)
        self._stopped_on_purpose.update(self.services)
        if self.netem is not None:
            terminate_all([self.netem], INFRA_STOP_TIMEOUT_S)
            self._stopped_on_purpose.add("netem")
        for name in ("nats-edge", "nats-hub", "nats"):
            if name in self.nats:
                self.nats[name].stop(INFRA_STOP_TIMEOUT_S)
