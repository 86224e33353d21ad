"""A real Prometheus server scraping a local stack, and ``promtool`` helpers.

The binaries come from Debian's ``prometheus`` package (``make observability-setup``), from
``PATH``, or from ``PICOSPEC_PROMETHEUS`` / ``PICOSPEC_PROMTOOL``. Nothing here is mocked: a
missing binary is a :class:`PrometheusError` that says how to install it.

Every target gets the labels the dashboards and rules filter on — ``namespace``, ``role``,
``replica`` and, at the edge, ``site`` — as static target labels, exactly what ServiceMonitor
relabelling provides in Kubernetes (see ``observability/README.md``)::

    targets = stack_targets(stack)       # [("picospec-verifier", ["127.0.0.1:8101"], {...}), ...]
    with Prometheus(targets, rule_files=RULE_FILES, scrape_interval=1.0) as prom:
        prom.wait_for_scrapes(2)
        prom.query("sum(rate(picospec_generation_tokens_total[1m]))")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import yaml

from picospec.tools.stack.natsserver import HOST, port_open
from picospec.tools.stack.procs import NotReady, http_ready, spawn, terminate_all, wait_until

DEFAULT_PORT = 9090
DEFAULT_NAMESPACE = "local"
#: The repository's ``observability/`` folder (present in a source checkout).
OBSERVABILITY_DIR = Path(__file__).resolve().parents[4] / "observability"
RULES_DIR = OBSERVABILITY_DIR / "prometheus"
RULE_FILES = (RULES_DIR / "recording.rules.yml", RULES_DIR / "alerts.rules.yml")
INSTALL_HINT = (
    "install Prometheus: `make observability-setup` (runs `apt-get update && apt-get install -y "
    "prometheus` on Debian-family systems), or put `prometheus` and `promtool` on PATH, or set "
    "PICOSPEC_PROMETHEUS / PICOSPEC_PROMTOOL"
)


def default_rule_files() -> list[Path]:
    """PicoSpec's recording and alerting rules, where this is a source checkout (else none)."""
    return [path for path in RULE_FILES if path.is_file()]


class PrometheusError(RuntimeError):
    """A binary is missing, Prometheus failed to start, or a query or check failed."""


class ScrapeTarget(NamedTuple):
    """One group of targets of a scrape job, all with the same target labels."""

    job: str
    targets: list[str]  # host:port, scraped at /metrics
    labels: dict[str, str]


# -- binaries ------------------------------------------------------------------------------


def find_binary(name: str) -> Path:
    """``prometheus`` or ``promtool``: ``$PICOSPEC_<NAME>``, then PATH, then /usr/bin."""
    env = os.environ.get(f"PICOSPEC_{name.upper()}")
    candidates = [env] if env else []
    found = shutil.which(name)
    candidates += [found] if found else []
    candidates.append(f"/usr/bin/{name}")
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise PrometheusError(f"`{name}` not found. {INSTALL_HINT}")


def promtool(*args: str | Path, cwd: Path | None = None, timeout: float = 120.0) -> str:
    """Run ``promtool`` with ``args``; return its output, raise with it on a non-zero exit."""
    argv = [str(find_binary("promtool")), *map(str, args)]
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise PrometheusError(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}")
    return out


def check_config(path: Path) -> str:
    """``promtool check config``: the file and every rule file it names."""
    return promtool("check", "config", path)


def check_rules(*paths: Path) -> str:
    """``promtool check rules``: syntax, PromQL, and the rules' names and labels."""
    return promtool("check", "rules", *paths)


def unit_test_rules(*paths: Path) -> str:
    """``promtool test rules``: the unit tests (input series, expected alerts and values)."""
    return promtool("test", "rules", *paths, cwd=Path(paths[0]).parent if paths else None)


# -- configuration -------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A Prometheus duration: ``1s``, ``250ms``, ``15s``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError("a duration must be positive")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def scrape_config(
    targets: Iterable[ScrapeTarget | tuple[str, Sequence[str], dict[str, str]]],
    *,
    scrape_interval: float = 15.0,
    evaluation_interval: float | None = None,
    rule_files: Iterable[Path | str] = (),
) -> dict[str, Any]:
    """A ``prometheus.yml`` document: one scrape job per distinct job name, each group of
    targets a ``static_configs`` entry carrying its labels."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for job, hosts, labels in targets:
        entry: dict[str, Any] = {"targets": list(hosts)}
        if labels:
            entry["labels"] = dict(labels)
        jobs.setdefault(job, []).append(entry)
    interval = duration(scrape_interval)
    doc: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": duration(min(scrape_interval, 10.0)),
            "evaluation_interval": duration(evaluation_interval or scrape_interval),
        },
    }
    rules = [str(r) for r in rule_files]
    if rules:
        doc["rule_files"] = rules
    doc["scrape_configs"] = [
        {"job_name": job, "metrics_path": "/metrics", "static_configs": groups}
        for job, groups in jobs.items()
    ]
    return doc


def render_config(doc: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return header + body


class _StackLike(Protocol):
    """What :func:`stack_targets` reads from :class:`picospec.tools.stack.up.Stack`."""

    services: dict[str, Any]  # name -> Service(role, port, ...)
    config: Any  # StackConfig (site)


def stack_targets(stack: _StackLike, namespace: str = DEFAULT_NAMESPACE) -> list[ScrapeTarget]:
    """The scrape targets of a local :class:`~picospec.tools.stack.up.Stack`: one per service, job
    ``picospec-<role>``, labels ``namespace``, ``role``, ``replica`` (the component name:
    ``verifier-1``, ``drafter``...) and, for the edge roles, ``site``."""
    out = []
    for name, svc in stack.services.items():
        labels = {"namespace": namespace, "role": svc.role, "replica": name}
        if svc.role != "verifier":
            labels["site"] = stack.config.site
        out.append(ScrapeTarget(f"picospec-{svc.role}", [f"{HOST}:{svc.port}"], labels))
    return out


def local_targets(
    verifiers: int = 1,
    *,
    api_port: int = 8000,
    verifier_port: int = 8101,
    sampler_port: int = 8201,
    site: str = "edge-1",
    namespace: str = DEFAULT_NAMESPACE,
) -> list[ScrapeTarget]:
    """The targets of ``picospec up`` with its default ports (the checked-in scrape config)."""
    out = [
        ScrapeTarget(
            "picospec-verifier",
            [f"{HOST}:{verifier_port + i - 1}"],
            {"namespace": namespace, "role": "verifier", "replica": f"verifier-{i}"},
        )
        for i in range(1, verifiers + 1)
    ]
    for role, port in (("sampler", sampler_port), ("drafter", api_port)):
        labels = {"namespace": namespace, "role": role, "replica": role, "site": site}
        out.append(ScrapeTarget(f"picospec-{role}", [f"{HOST}:{port}"], labels))
    return out


# -- the server ----------------------------------------------------------------------------


def _parse_time(value: str) -> float:
    """An RFC 3339 timestamp from the API (nanoseconds allowed) as Unix seconds."""
    if not value or value.startswith("0001-"):
        return 0.0
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Prometheus:
    """A ``prometheus`` process on ``host:port`` with its own config and temporary storage.

    A context manager; :meth:`start` waits for ``/-/ready``. ``scrape_interval`` (seconds) is
    short for tests (1 s) and 5 s by default for ``picospec up``.
    """

    def __init__(
        self,
        targets: Iterable[ScrapeTarget | tuple[str, Sequence[str], dict[str, str]]],
        *,
        rule_files: Iterable[Path | str] = (),
        port: int = DEFAULT_PORT,
        host: str = HOST,
        scrape_interval: float = 5.0,
        evaluation_interval: float | None = None,
        run_dir: Path | None = None,
        retention: str = "1d",
    ) -> None:
        self.targets = [ScrapeTarget(j, list(t), dict(lb)) for j, t, lb in targets]
        self.rule_files = [Path(r).resolve() for r in rule_files]
        self.port = port
        self.host = host
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="picospec-prometheus-"))
        self.retention = retention
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses and files -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "prometheus.yml"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "prometheus.log"

    @property
    def storage_path(self) -> Path:
        return self.run_dir / "data"

    def config(self) -> dict[str, Any]:
        return scrape_config(
            self.targets,
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
            rule_files=self.rule_files,
        )

    def write_config(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.config()))
        return self.config_path

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Prometheus:
        """Write the config, start ``prometheus`` and wait until it is ready."""
        binary = find_binary("prometheus")
        for rules in self.rule_files:
            if not rules.is_file():
                raise PrometheusError(f"rule file {rules} does not exist")
        if port_open(self.host, self.port, timeout=0.2):
            raise PrometheusError(
                f"{self.host}:{self.port} is already in use (another Prometheus?): pick "
                "another port"
            )
        self.write_config()
        argv = [
            str(binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.storage_path}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
        ]
        self.proc = spawn(argv, self.log_path, dict(os.environ), self.run_dir)
        try:
            wait_until(
                self._ready, timeout, "prometheus", proc=self.proc, log_path=self.log_path,
                interval=0.1,
            )  # fmt: skip
        except NotReady as e:
            if e.returncode is None:  # still running, not ready: do not leave it behind
                self.stop()
            raise PrometheusError(str(e)) from None
        return self

    def _ready(self) -> bool:
        return http_ready(f"{self.url}/-/ready")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            terminate_all([self.proc], timeout)
        if self._own_dir:  # a temporary directory of our own: config, log and data
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- HTTP API ----------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a success, else :class:`PrometheusError`."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:  # loopback
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read() or b"{}")
        except OSError as e:
            raise PrometheusError(f"GET {url}: {e}") from e
        if doc.get("status") != "success":
            raise PrometheusError(f"GET {url}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result as a list of ``{"metric", "value"}`` (a scalar is one
        element with no labels)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str, at: float | None = None) -> float:
        """The single value of an instant query (raises unless exactly one sample)."""
        result = self.query(expr, at)
        if len(result) != 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series, not 1: {result}")
        return float(result[0]["value"][1])

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])

    def wait_for_scrapes(
        self, count: int = 2, since: float | None = None, timeout: float = 30.0
    ) -> None:
        """Wait until every target has been scraped successfully ``count`` times after
        ``since`` (Unix time, default now), so that rates over that time see two samples."""
        since = time.time() if since is None else since
        need = since + (count - 1) * self.scrape_interval
        targets: list[dict[str, Any]] = []

        def scraped() -> bool:
            targets[:] = self.active_targets()
            return bool(targets) and all(
                t["health"] == "up" and _parse_time(t["lastScrape"]) >= need for t in targets
            )

        try:
            wait_until(scraped, timeout, f"every target scraped {count}x", interval=0.1)
        except NotReady:
            detail = {
                t["scrapeUrl"]: (t["health"], t["lastScrape"], t.get("lastError")) for t in targets
            }
            raise PrometheusError(f"targets not scraped {count}x in time: {detail}") from None

    def wait_for_rule_evaluation(self, since: float | None = None, timeout: float = 30.0) -> None:
        """Wait until every rule group has been evaluated after ``since`` (default now)."""
        since = time.time() if since is None else since

        def evaluated() -> bool:
            groups = self.api("rules")["groups"]
            return all(_parse_time(g.get("lastEvaluation", "")) > since for g in groups)

        try:
            wait_until(evaluated, timeout, "every rule group evaluated", interval=0.1)
        except NotReady:
            raise PrometheusError("rule groups not evaluated in time") from None
