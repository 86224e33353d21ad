"""``picospec cluster`` against a stand-in Kubernetes API server.

No Kubernetes API server can run on these machines, so the official ``kubernetes`` client talks
to a small local HTTP server that answers the requests ``picospec cluster`` makes with real API
object shapes: the pods, Deployments, HPAs and ScaledObjects are the chart's own rendered
objects (Helm's engine), given a status as the controllers would; a verifier's /metrics (read
through the pod proxy) is real prometheus_client text output. PATCH bodies are recorded and
checked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import yaml

pytest.importorskip("kubernetes")
helm = pytest.importorskip("helm_python")

from picospec.tools import cluster  # noqa: E402
from picospec.tools.promtext import series_sum  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NS, RELEASE = "serving", "ps"


def rendered(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(ROOT / "charts" / "picospec")) as c:
        out = c.render(values, name=RELEASE, namespace=NS)
    return [d for p, t in out.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]


def metrics_text(sessions: float, queue: float) -> str:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    Gauge("picospec_active_sessions", "Sessions (KV caches) this verifier holds", registry=reg).set(
        sessions
    )
    Gauge("picospec_verify_queue_depth", "Draft blocks waiting", registry=reg).set(queue)
    return generate_latest(reg).decode()


def node(name: str, labels: dict[str, str], ready: bool = True, gpus: int = 0) -> dict[str, Any]:
    alloc = {"cpu": "16", "memory": "64Gi", "pods": "110"}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": labels},
        "spec": {},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "Unknown",
                    "reason": "KubeletReady",
                }
            ],
            "addresses": [{"type": "InternalIP", "address": f"192.0.2.{len(name)}"}],
            "allocatable": alloc,
            "capacity": alloc,
        },
    }


def as_served(spec: dict[str, Any]) -> dict[str, Any]:
    """The API server serves resource quantities as strings ("1", not 1)."""
    spec = copy.deepcopy(spec)
    for c in spec.get("initContainers", []) + spec["containers"]:
        for kind in ("requests", "limits"):
            res = c.get("resources", {}).get(kind, {})
            for k, v in res.items():
                res[k] = str(v)
    return spec


def pod_from(workload: dict[str, Any], suffix: str, node_name: str, ready: bool = True):
    tmpl = workload["spec"]["template"]
    name = f"{workload['metadata']['name']}-{suffix}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": tmpl["metadata"]["labels"],
        },
        "spec": {**as_served(tmpl["spec"]), "nodeName": node_name},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "ready": ready,
                    "restartCount": 1 if suffix.endswith("b") else 0,
                    "image": c["image"],
                    "imageID": "",
                    "started": True,
                }
                for c in tmpl["spec"]["containers"]
            ],
        },
    }


class FakeApi:
    """The objects the stand-in API server holds, and what it was asked."""

    def __init__(self, values: dict[str, Any]) -> None:
        objs = rendered(values)
        by = {(o["kind"], o["metadata"]["labels"]["app.kubernetes.io/component"]): o for o in objs}
        self.nodes = [
            node(
                "edge-1", {"node-role.kubernetes.io/edge": "", "node-role.kubernetes.io/agent": ""}
            ),
            node("edge-2", {"node-role.kubernetes.io/edge": ""}, ready=False),
            node("gpu-1", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, gpus=8),
            node("cpu-1", {}),
        ]
        self.pods = [
            pod_from(by["DaemonSet", "drafter"], "x1", "edge-1"),
            pod_from(by["DaemonSet", "sampler"], "x1", "edge-1"),
            pod_from(by["DaemonSet", "leafnode"], "x1", "edge-1"),
            pod_from(by["DaemonSet", "leafnode"], "x2", "edge-2", ready=False),
            pod_from(by["Deployment", "verifier"], "a", "gpu-1"),
            pod_from(by["Deployment", "verifier"], "b", "gpu-1"),
            pod_from(by["StatefulSet", "nats"], "0", "cpu-1"),
        ]
        self.metrics = {
            f"{RELEASE}-picospec-verifier-a": metrics_text(12, 1),
            f"{RELEASE}-picospec-verifier-b": metrics_text(30, 0),
        }
        dep = by["Deployment", "verifier"]
        dep["metadata"].update(uid="uid-dep", generation=1)
        if "replicas" in dep["spec"]:  # (absent when an autoscaler owns it)
            dep["spec"]["replicas"] = 2
        dep["spec"]["template"]["spec"] = as_served(dep["spec"]["template"]["spec"])
        dep["status"] = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
        self.deployments = [dep]
        self.hpas = []
        if ("HorizontalPodAutoscaler", "verifier") in by:
            hpa = by["HorizontalPodAutoscaler", "verifier"]
            hpa["status"] = {
                "currentReplicas": 2,
                "desiredReplicas": 3,
                "conditions": [{"type": "AbleToScale", "status": "True"}],
            }
            self.hpas.append(hpa)
        self.keda_installed = ("ScaledObject", "verifier") in by
        self.scaled_objects = [by["ScaledObject", "verifier"]] if self.keda_installed else []
        for so in self.scaled_objects:
            so["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
        self.patches: list[tuple[str, Any]] = []
        self.auth: set[str] = set()


def _match(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in (p.split("=", 1) for p in selector.split(",")))


def _list(kind: str, api_version: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": "1"},
        "items": items,
    }


def make_handler(state: FakeApi):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self) -> None:
            self._send(
                404,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                    "message": "the server could not find the requested resource",
                },
            )

        def do_GET(self) -> None:
            state.auth.add(self.headers.get("Authorization", ""))
            url = urlparse(self.path)
            sel = parse_qs(url.query).get("labelSelector", [None])[0]
            p = unquote(url.path)
            if p == "/api/v1/nodes":
                return self._send(
                    200, _list("NodeList", "v1", [n for n in state.nodes if _match(n, sel)])
                )
            if p == f"/api/v1/namespaces/{NS}/pods":
                return self._send(
                    200, _list("PodList", "v1", [o for o in state.pods if _match(o, sel)])
                )
            if p.startswith(f"/api/v1/namespaces/{NS}/pods/") and p.endswith("/proxy/metrics"):
                name_port = p.split("/")[6]
                name = name_port.split(":")[0]
                assert name_port.endswith(":8000"), name_port
                if name in state.metrics:
                    return self._send(200, state.metrics[name], "text/plain; version=0.0.4")
                return self._not_found()
            if p == f"/apis/apps/v1/namespaces/{NS}/deployments":
                return self._send(
                    200,
                    _list(
                        "DeploymentList",
                        "apps/v1",
                        [o for o in state.deployments if _match(o, sel)],
                    ),
                )
            if p == f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers":
                return self._send(
                    200, _list("HorizontalPodAutoscalerList", "autoscaling/v2", state.hpas)
                )
            if p == f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects":
                if not state.keda_installed:
                    return self._not_found()
                return self._send(
                    200, _list("ScaledObjectList", "keda.sh/v1alpha1", state.scaled_objects)
                )
            return self._not_found()

        def do_PATCH(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            p = unquote(urlparse(self.path).path)
            state.patches.append((p, body))
            if p.endswith("/scale"):
                name = p.split("/")[-2]
                return self._send(
                    200,
                    {
                        "apiVersion": "autoscaling/v1",
                        "kind": "Scale",
                        "metadata": {"name": name, "namespace": NS},
                        "spec": {"replicas": body["spec"]["replicas"]},
                        "status": {"replicas": 2},
                    },
                )
            for coll in (state.hpas, state.scaled_objects):
                for o in coll:
                    if p.endswith("/" + o["metadata"]["name"]):
                        o["spec"].update(body["spec"])
                        return self._send(200, o)
            return self._not_found()

    return Handler


@pytest.fixture
def api(request, tmp_path: Path):
    state = FakeApi(getattr(request, "param", {}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_port}"},
                    }
                ],
                "users": [{"name": "operator", "user": {"token": "test-token"}}],
                "contexts": [
                    {
                        "name": "fake",
                        "context": {"cluster": "fake", "user": "operator", "namespace": NS},
                    }
                ],
            }
        )
    )
    state.kubeconfig = str(kubeconfig)
    yield state
    server.shutdown()
    server.server_close()


def run_cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="picospec")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster.register(sub)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


HPA = {"verifier": {"autoscaling": {"enabled": True, "type": "hpa", "maxReplicas": 6}}}
KEDA = {
    "apiVersions": ["keda.sh/v1alpha1"],
    "verifier": {"autoscaling": {"enabled": True, "type": "keda", "maxReplicas": 6}},
}


def test_status_text(api) -> None:
    code, out, err = run_cli("cluster", "--kubeconfig", api.kubeconfig, "status")
    assert code == 0, err
    assert "Bearer test-token" in api.auth
    assert f"namespace {NS}" in out  # from the kubeconfig context
    assert "Edge sites (2 KubeEdge node(s))" in out
    assert "edge-1  ready=yes" in out and "edge-2  ready=NO" in out
    edge2 = out.split("edge-2")[1].split("Verifiers")[0]
    assert "drafter    (none on this node)" in edge2 and "leafnode" in edge2
    assert "Verifiers (ps-picospec-verifier): 2/2 ready" in out
    row = next(line for line in out.splitlines() if "ps-picospec-verifier-a" in line)
    assert "gpu-1" in row and "NVIDIA-H100-80GB-HBM3" in row and " 12 " in row
    assert "sessions held in total: 42" in out
    assert "Autoscaling: none" in out
    assert "nats" in out.split("Other pods")[1]


def test_status_json(api) -> None:
    code, out, _ = run_cli(
        "cluster", "--kubeconfig", api.kubeconfig, "--release", RELEASE, "status", "--json"
    )
    assert code == 0
    doc = json.loads(out)
    verifiers = {v["name"]: v for v in doc["verifiers"]}
    a = verifiers["ps-picospec-verifier-a"]
    assert (a["gpus"], a["sessions"], a["queue_depth"], a["ready"]) == (1, 12.0, 1.0, True)
    assert verifiers["ps-picospec-verifier-b"]["restarts"] == 1
    sites = {s["node"]: s for s in doc["edge_sites"]}
    assert [p["component"] for p in sites["edge-1"]["pods"]] == ["drafter", "leafnode", "sampler"]
    assert doc["replicas"] == {"desired": 2, "ready": 2, "updated": 2}


@pytest.mark.parametrize("api", [HPA], indirect=True)
def test_status_with_hpa(api) -> None:
    code, out, _ = run_cli("cluster", "--kubeconfig", api.kubeconfig, "status")
    assert code == 0
    assert "Autoscaling: HorizontalPodAutoscaler ps-picospec-verifier: min 1, max 6" in out
    assert "current 2, desired 3" in out and "pods:picospec_active_sessions" in out


@pytest.mark.parametrize("api", [KEDA], indirect=True)
def test_status_with_keda(api) -> None:
    code, out, _ = run_cli("cluster", "--kubeconfig", api.kubeconfig, "status")
    assert code == 0
    assert "Autoscaling: ScaledObject ps-picospec-verifier: min 1, max 6" in out
    assert "sum(picospec_active_sessions{" in out and "Ready=True" in out


def test_scale_without_autoscaler_sets_replicas(api) -> None:
    code, out, err = run_cli("cluster", "--kubeconfig", api.kubeconfig, "scale-verifiers", "3")
    assert code == 0, err
    assert api.patches == [
        (
            f"/apis/apps/v1/namespaces/{NS}/deployments/ps-picospec-verifier/scale",
            {"spec": {"replicas": 3}},
        )
    ]
    assert "replicas=3" in out


@pytest.mark.parametrize("api", [HPA], indirect=True)
def test_scale_with_hpa_sets_its_minimum(api) -> None:
    code, out, _ = run_cli(
        "cluster", "--kubeconfig", api.kubeconfig, "-n", NS, "scale-verifiers", "4"
    )
    assert code == 0
    ((path, body),) = api.patches
    assert path.endswith("/horizontalpodautoscalers/ps-picospec-verifier")
    assert body == {"spec": {"minReplicas": 4}}
    assert "minReplicas=4" in out
    code, _, err = run_cli("cluster", "--kubeconfig", api.kubeconfig, "scale-verifiers", "9")
    assert code == 1 and "allows 1..6" in err and len(api.patches) == 1


@pytest.mark.parametrize("api", [KEDA], indirect=True)
def test_scale_with_keda_sets_its_minimum(api) -> None:
    code, out, _ = run_cli("cluster", "--kubeconfig", api.kubeconfig, "scale-verifiers", "2")
    assert code == 0
    ((path, body),) = api.patches
    assert path == f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects/ps-picospec-verifier"
    assert body == {"spec": {"minReplicaCount": 2}}


def test_scale_unknown_release(api) -> None:
    code, _, err = run_cli(
        "cluster", "--kubeconfig", api.kubeconfig, "--release", "nope", "scale-verifiers", "2"
    )
    assert code == 1 and "no PicoSpec verifier Deployment" in err and not api.patches


def test_series_sum_reads_the_exposition_format() -> None:
    text = metrics_text(3, 0) + 'picospec_active_sessions{replica="x"} 2.0\n'
    assert series_sum(text, "picospec_active_sessions") == 5.0
    assert series_sum(text, "picospec_active_sessions", replica="x") == 2.0
    assert series_sum(text, "picospec_active_sessions", replica="y") is None
    assert series_sum(text, "picospec_missing") is None
    assert series_sum(text, "picospec_verify_queue_depth") == 0.0  # present, and zero
    with pytest.raises(ValueError):
        series_sum(text + "picospec_active_sessions{replica=x} one\n", "picospec_active_sessions")
