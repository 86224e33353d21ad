"""Observability against a real Prometheus (Debian's ``prometheus`` and ``promtool``).

Static checks: the metric definitions follow the conventions, the rules pass ``promtool check``
and their unit tests, the generated dashboards are up to date and well formed.

End to end: a local stack on tiny models and a Prometheus scraping it every second. Real
requests (every mode, greedy and sampled, streamed and not, some bad), then every PromQL
expression of every dashboard panel and every recording rule is evaluated through the HTTP API
and must return data; the acceptance rate Prometheus computes must equal what the API reported.

A missing ``prometheus``/``promtool`` binary fails these tests (it does not skip them): run
``make observability-setup``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, Info

from picospec.services import metrics
from picospec.tools.sse import EventStream
from picospec.tools.stack.natsserver import free_port
from picospec.tools.stack.prometheus import (
    RULE_FILES,
    RULES_DIR,
    Prometheus,
    PrometheusError,
    check_config,
    check_rules,
    find_binary,
    stack_targets,
    unit_test_rules,
)
from picospec.tools.stack.up import Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "observability"
DASHBOARD_FILES = sorted((OBS / "dashboards").glob("*.json"))
ENV = {
    "PICOSPEC_VERIFY_TIMEOUT_S": "5",
    "PICOSPEC_REQUEST_TIMEOUT_S": "30",
    "PICOSPEC_THREADS": "1",
    "PICOSPEC_IDLE_TIMEOUT_S": "60",
}
SITE = "edge-1"
NAMESPACE = "local"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("picospec_obs_generate", OBS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every query target of every panel."""
    out = []
    for path in DASHBOARD_FILES:
        doc = json.loads(path.read_text())
        for panel in panels(doc):
            for target in panel.get("targets", []):
                out.append((doc["uid"], panel["title"], target["expr"]))
    return out


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


# --- metric definitions ---------------------------------------------------------------------


def _defined_metrics() -> list[Any]:
    return [v for v in vars(metrics).values() if isinstance(v, Counter | Gauge | Histogram | Info)]


def test_metric_names_labels_and_help_follow_the_conventions() -> None:
    defined = _defined_metrics()
    assert len(defined) >= 30
    names = set()
    for m in defined:
        name, kind, labels = m._name, m._type, m._labelnames
        names.add(name)
        assert re.fullmatch(r"picospec_[a-z0-9_]+", name), name
        assert len(m._documentation) > 20, f"{name}: say exactly what is counted"
        assert not {"session", "session_id", "request_id"} & set(labels), name
        if kind == "counter":
            assert not name.endswith("_total"), f"{name}: prometheus-client appends _total"
        if kind == "histogram" and name.endswith("_seconds"):
            assert m._upper_bounds[0] <= 0.01 and m._upper_bounds[-2] >= 10, name
    # vLLM's names for the same ideas, and the quantities the issue lists
    for needed in (
        "picospec_time_to_first_token_seconds",
        "picospec_inter_token_latency_seconds",
        "picospec_e2e_request_latency_seconds",
        "picospec_verify_forward_seconds",
        "picospec_verify_round_trip_seconds",
        "picospec_sample_round_trip_seconds",
        "picospec_verify_queue_time_seconds",
        "picospec_spec_decode_num_drafts",
        "picospec_spec_decode_num_draft_tokens",
        "picospec_spec_decode_num_accepted_tokens",
        "picospec_spec_decode_num_accepted_tokens_per_pos",
        "picospec_rollbacks",
        "picospec_wasted_draft_tokens",
        "picospec_draft_length_tokens",
        "picospec_link_bytes",
        "picospec_link_messages",
        "picospec_compression_tail_mass",
        "picospec_active_sessions",
        "picospec_verify_queue_depth",
        "picospec_verify_batch_size",
        "picospec_kv_cache_bytes",
        "picospec_session_migrations",
        "picospec_rejected_messages",
        "picospec_requests",
        "picospec_nats_reconnects",
        "picospec_degraded_responses",
        "picospec_build",
    ):
        assert needed in names, needed


def test_per_token_buckets_are_fine_between_5_and_200_ms() -> None:
    bounds = [b for b in metrics.TOKEN_BUCKETS if 0.005 <= b <= 0.2]
    assert bounds[0] == 0.005 and bounds[-1] == 0.2
    assert all(hi / lo <= 1.25 + 1e-9 for lo, hi in zip(bounds, bounds[1:], strict=False))
    assert metrics.ITL._upper_bounds[:-1] == list(metrics.TOKEN_BUCKETS)
    assert metrics.TTFT._upper_bounds[-2] >= 2560 and metrics.E2E._upper_bounds[-2] >= 7680


def test_prometheus_reports_the_p99_of_a_50ms_inter_token_latency_as_50ms(
    tmp_path: Path,
) -> None:
    """The real PromQL engine (promtool) on a histogram with our buckets: 1000 tokens at
    50 ms, 10 at 120 ms."""
    series = []
    for le in [*metrics.TOKEN_BUCKETS, math.inf]:
        per_min = (1000 if le >= 0.05 else 0) + (10 if le >= 0.12 else 0)
        le_s = "+Inf" if le == math.inf else repr(le)
        series.append(
            {
                "series": f'picospec_inter_token_latency_seconds_bucket{{le="{le_s}"}}',
                "values": f"0+{per_min}x10",
            }
        )
    q = "histogram_quantile({}, rate(picospec_inter_token_latency_seconds_bucket[5m]))"
    doc = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": f"round({q.format(p)}, {precision})",
                        "eval_time": "10m",
                        "exp_samples": [{"labels": "{}", "value": v}],
                    }
                    for p, v, precision in (
                        (0.5, 0.048, 0.001),
                        (0.99, 0.05, 0.001),
                        (0.999, 0.12, 0.01),
                    )
                ],
            }
        ],
    }
    path = tmp_path / "itl.test.yml"
    path.write_text(yaml.safe_dump(doc))
    unit_test_rules(path)


def test_build_info_and_role_series_exist_from_startup() -> None:
    metrics.set_build_info("drafter", "tiny", "drafter-x", "edge-9")
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    assert 'picospec_build_info{model="tiny",replica="drafter-x",role="drafter"' in text
    assert 'picospec_session_migrations_total{reason="lost"} 0.0' in text
    assert 'picospec_spec_decode_num_draft_tokens_total{mode="picospec"}' in text
    assert "process_cpu_seconds_total" in text and "python_gc_collections_total" in text
    assert "_created" not in text


# --- rules, scrape config, generated files ---------------------------------------------------


def test_prometheus_refuses_a_busy_port_and_a_missing_rule_file(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PrometheusError, match="already in use"):
            Prometheus([("x", [f"127.0.0.1:{port}"], {})], port=port).start()
    with pytest.raises(PrometheusError, match="does not exist"):
        Prometheus([], rule_files=[tmp_path / "nope.yml"], port=free_port()).start()


def test_binaries_are_installed() -> None:
    """Fails (does not skip) without them: `make observability-setup`."""
    assert find_binary("prometheus").is_file()
    assert find_binary("promtool").is_file()


def test_rules_and_scrape_config_pass_promtool_check() -> None:
    out = check_rules(*RULE_FILES)
    assert "SUCCESS" in out
    assert "SUCCESS" in check_config(RULES_DIR / "prometheus.yml")


def test_alert_unit_tests_pass() -> None:
    tests = sorted((RULES_DIR / "tests").glob("*.test.yml"))
    assert tests
    assert "SUCCESS" in unit_test_rules(*tests)


def test_alerts_carry_severity_for_and_annotations() -> None:
    alerts = rules(RULES_DIR / "alerts.rules.yml")
    names = {a["alert"] for a in alerts}
    for needed in (
        "PicoSpecAcceptanceRateCollapse",
        "PicoSpecTTFTAboveSLO",
        "PicoSpecVerifiersSaturated",
        "PicoSpecHighErrorRate",
        "PicoSpecNATSDisconnected",
        "PicoSpecEdgeSiteDegraded",
    ):
        assert needed in names
    runbook = (OBS / "RUNBOOK.md").read_text().lower()
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert.get("for"), alert["alert"]
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"])
        anchor = alert["annotations"]["runbook_url"].split("#")[1]
        assert f"## {anchor}" in runbook, f"no runbook section for {anchor}"
    for rule in rules(RULES_DIR / "recording.rules.yml"):
        assert re.fullmatch(r"[a-z_]+:picospec_[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule


def test_generated_files_are_up_to_date() -> None:
    gen = load_generator()
    for path, text in gen.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run `make dashboards`"


def test_dashboards_are_well_formed() -> None:
    docs = {p.stem: json.loads(p.read_text()) for p in DASHBOARD_FILES}
    assert set(docs) == {"picospec-overview", "picospec-edge-site", "picospec-verifier"}
    expect_vars = {
        "picospec-overview": {"datasource", "namespace"},
        "picospec-edge-site": {"datasource", "namespace", "site"},
        "picospec-verifier": {"datasource", "namespace", "replica"},
    }
    for name, doc in docs.items():
        assert doc["uid"] == name
        variables = {v["name"] for v in doc["templating"]["list"]}
        assert variables == expect_vars[name]
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), name
        for panel in panels(doc):
            if panel["type"] == "row":
                continue
            assert panel["targets"] and panel.get("description"), panel["title"]
            for target in panel["targets"]:
                expr = target["expr"]
                assert not re.search(r"\bsession(_id)?\b", expr), expr
                assert '$namespace"' in expr or "namespace=~" in expr, (name, expr)
                if name == "picospec-edge-site":
                    assert 'site=~"$site"' in expr, expr
                if name == "picospec-verifier":
                    assert 'replica=~"$replica"' in expr, expr
    overview = " ".join(t[2] for t in panel_queries() if t[0] == "picospec-overview")
    for needed in (
        "picospec_generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "spec_decode_num_accepted_tokens_total",
        "spec_decode_num_drafts_total",
        "link_bytes_total",
        "rollbacks_total",
        "active_sessions",
        'up{namespace=~"$namespace", role="verifier"}',
        "requests_total",
        "degraded_responses_total",
    ):
        assert needed in overview, needed


# --- end to end: a stack, a Prometheus, real requests -------------------------------------------


def _post(url: str, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _stream(api: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a streaming chat request; return the ``picospec`` stats of its final chunk."""
    stats: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{api}/chat/completions",
            json={**body, "stream": True},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as r:
            assert r.status == 200
            events = EventStream()
            async for obj in events.aevents(r.content):
                stats = obj.get("picospec") or stats
            assert events.error is None, events.error
    assert stats, "no final chunk with stats"
    return stats


def _send_traffic(api: str) -> list[dict[str, Any]]:
    """Every mode, greedy and sampled, chat and completions, streamed and not, a few
    concurrent streams, and bad requests. Returns the stats of every successful response."""

    def chat(content: str, **kw: Any) -> dict[str, Any]:
        return {
            "model": "picospec",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 40,
            "temperature": 0,
            **kw,
        }

    stats = []
    for i, (mode, temperature) in enumerate(
        [
            ("picospec", 0),
            ("picospec", 1.0),
            ("vanilla", 0),
            ("vanilla", 0.8),
            ("dssd", 1.0),
            ("ar", 0),
            ("ar", 1.0),
        ]
    ):
        # a fixed γ: with "auto" the tiny draft, as slow as its target, soon hands over, and
        # the draft's panels would see too few steps (the streams below keep "auto")
        speculative = {"draft_len": 4} if mode != "ar" else {}
        body = chat(
            f"Request {i} in mode {mode}", mode=mode, temperature=temperature, seed=i, **speculative
        )
        status, doc = _post(f"{api}/chat/completions", body)
        assert status == 200, doc
        stats.append(doc["picospec"])
    status, doc = _post(
        f"{api}/completions",
        {"model": "picospec", "prompt": "Once upon a time", "max_tokens": 30, "mode": "picospec"},
    )
    assert status == 200, doc
    stats.append(doc["picospec"])

    async def streams() -> list[dict[str, Any]]:
        bodies = [chat(f"Stream {i}", temperature=0.7 * (i % 2), seed=i) for i in range(4)]
        bodies.append(chat("Stream ar", mode="ar"))
        return await asyncio.gather(*(_stream(api, b) for b in bodies))

    stats.extend(asyncio.run(streams()))
    # errors: unknown model (404), invalid field (400), not JSON (400)
    assert _post(f"{api}/chat/completions", {**chat("x"), "model": "nope"})[0] == 404
    assert _post(f"{api}/chat/completions", chat("x", temperature=9))[0] == 400
    assert _post(f"{api}/chat/completions", b"{not json")[0] == 400
    return stats


@pytest.fixture(scope="module")
def observed(
    tiny_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    cfg = StackConfig(
        verifiers=2,
        drafter_model=str(tiny_dirs[1]),
        verifier_model=str(tiny_dirs[0]),
        env=dict(ENV),
        site=SITE,
        ready_timeout=180.0,
    ).with_free_ports()
    with Stack(cfg) as stack:
        t_start = time.time()
        prom = Prometheus(
            stack_targets(stack, namespace=NAMESPACE),
            rule_files=RULE_FILES,
            port=free_port(),
            scrape_interval=1.0,
            run_dir=tmp_path_factory.mktemp("prometheus"),
        )
        with prom:
            prom.wait_for_scrapes(1)  # the zero-initialised series are in before any traffic
            stats = _send_traffic(stack.api_url)
            prom.wait_for_scrapes(2, since=time.time())
            prom.wait_for_rule_evaluation(since=time.time())
            # Queries are evaluated at `at`, over a window holding every sample since Prometheus
            # started, so rate() and histogram_quantile() see all the traffic.
            at = time.time()
            window = f"{max(60, math.ceil(at - t_start) + 10)}s"
            yield SimpleNamespace(stack=stack, prom=prom, stats=stats, window=window, at=at)


def _substitute(expr: str, window: str, **values: str) -> str:
    expr = expr.replace("$__rate_interval", window)
    for name in ("namespace", "site", "replica"):
        expr = expr.replace(f"${name}", values.get(name, ".*"))
    assert "$" not in expr, expr
    return expr


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_target_is_up_with_its_labels(observed: SimpleNamespace) -> None:
    targets = observed.prom.active_targets()
    assert len(targets) == 4
    by_replica = {t["labels"]["replica"]: t for t in targets}
    assert set(by_replica) == {"verifier-1", "verifier-2", "sampler", "drafter"}
    for t in targets:
        assert t["health"] == "up", t
        assert t["labels"]["namespace"] == NAMESPACE
    assert by_replica["drafter"]["labels"]["site"] == SITE
    assert by_replica["verifier-1"]["labels"]["role"] == "verifier"


@pytest.mark.parametrize("selected", [False, True], ids=["all", "selected"])
def test_every_dashboard_panel_returns_data(observed: SimpleNamespace, selected: bool) -> None:
    """Variables set to All (``.*``), then to one namespace, site and replica: the replica
    that verified the most blocks (the queue group spreads sessions at random)."""
    values = {}
    if selected:
        busiest = observed.prom.query(
            'topk(1, sum by (replica) (picospec_verify_forward_seconds_count{role="verifier"}))',
            observed.at,
        )
        values = {"namespace": NAMESPACE, "site": SITE, "replica": busiest[0]["metric"]["replica"]}
    queries = panel_queries()
    assert len(queries) > 80
    empty, nan_only = [], []
    for uid, title, expr in queries:
        result = observed.prom.query(_substitute(expr, observed.window, **values), observed.at)
        if not result:
            empty.append((uid, title, expr))
        elif not _finite(result):
            nan_only.append((uid, title, expr))
    assert not empty, "panels without data:\n" + "\n".join(map(str, empty))
    assert not nan_only, "panels with only NaN:\n" + "\n".join(map(str, nan_only))


def test_template_variables_list_the_stack(observed: SimpleNamespace) -> None:
    found = {}
    for path in DASHBOARD_FILES:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
            assert m, var["query"]
            expr = f"count by ({m[2]}) ({_substitute(m[1], observed.window)})"
            result = observed.prom.query(expr, observed.at)
            found[var["name"]] = {r["metric"][m[2]] for r in result}
    assert found == {
        "namespace": {NAMESPACE},
        "site": {SITE},
        "replica": {"verifier-1", "verifier-2"},
    }


def test_every_recording_rule_returns_data(observed: SimpleNamespace) -> None:
    recording = rules(RULES_DIR / "recording.rules.yml")
    assert len(recording) >= 15
    for rule in recording:
        result = observed.prom.query(rule["expr"], observed.at)
        assert result and _finite(result), (rule["record"], result)
        recorded = observed.prom.query(rule["record"])
        assert recorded, f"{rule['record']} was not recorded by the running Prometheus"
    for group in observed.prom.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule


def test_acceptance_rate_in_prometheus_equals_the_api(observed: SimpleNamespace) -> None:
    api_drafted = sum(s["drafted_tokens"] for s in observed.stats)
    api_accepted = sum(s["accepted_tokens"] for s in observed.stats)
    assert api_drafted > 100 and 0 < api_accepted < api_drafted
    prom, at = observed.prom, observed.at
    drafted = prom.value("sum(picospec_spec_decode_num_draft_tokens_total)", at)
    accepted = prom.value("sum(picospec_spec_decode_num_accepted_tokens_total)", at)
    assert (drafted, accepted) == (api_drafted, api_accepted)
    api_rate = api_accepted / api_drafted
    # the rate()-based expression the dashboards and the recording rule use
    w = observed.window
    rate_based = prom.value(
        f"sum(rate(picospec_spec_decode_num_accepted_tokens_total[{w}]))"
        f" / sum(rate(picospec_spec_decode_num_draft_tokens_total[{w}]))",
        at,
    )
    assert rate_based == pytest.approx(api_rate, rel=1e-9)
    recorded = prom.value(
        f'namespace_site:picospec_spec_decode_acceptance:ratio_rate5m{{site="{SITE}"}}', at
    )
    assert recorded == pytest.approx(api_rate, rel=1e-9)
    rounds = sum(s["rounds"] for s in observed.stats)
    assert prom.value("sum(picospec_spec_decode_num_drafts_total)", at) == rounds
    # tokens, bytes and per-mode counters add up the same way
    assert prom.value('sum(picospec_link_bytes_total{direction="uplink"})', at) == sum(
        s["bytes_up"] for s in observed.stats
    )


def test_histograms_give_sensible_quantiles(observed: SimpleNamespace) -> None:
    prom, w, at = observed.prom, observed.window, observed.at

    def q(p: float, name: str) -> float:
        return prom.value(f"histogram_quantile({p}, sum by (le) (rate({name}_bucket[{w}])))", at)

    itl_p50, itl_p99 = (
        q(0.5, "picospec_inter_token_latency_seconds"),
        q(0.99, "picospec_inter_token_latency_seconds"),
    )
    assert 0 < itl_p50 <= itl_p99 < 1.0
    # Markov: the true median is at most twice the mean; the estimate at most one bucket up
    mean = prom.value(
        f"sum(rate(picospec_inter_token_latency_seconds_sum[{w}]))"
        f" / sum(rate(picospec_inter_token_latency_seconds_count[{w}]))",
        at,
    )
    bound = min(b for b in metrics.TOKEN_BUCKETS if b >= 2 * mean)
    assert itl_p50 <= bound
    ttft_p99 = q(0.99, "picospec_time_to_first_token_seconds")
    e2e_p50 = q(0.5, "picospec_e2e_request_latency_seconds")
    assert 0 < ttft_p99 < 10 and 0 < e2e_p50 < 30
    # the median is at most the slowest request; the estimate at most one bucket above it
    slowest = max(s["elapsed_s"] for s in observed.stats) * 1.2 + 0.05
    assert e2e_p50 <= min(b for b in metrics.REQUEST_BUCKETS if b >= slowest)
    assert 0 < q(0.5, "picospec_verify_forward_seconds") < 1.0


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    prov = OBS / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://127.0.0.1:9090"
    providers = yaml.safe_load((prov / "dashboards" / "picospec.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/picospec"
