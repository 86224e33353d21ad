"""The Helm chart, rendered by Helm's own engine (helm-python-sdk embeds Helm v4; no binary).

Every value combination below is linted (`helm lint`), rendered, and each object is validated
against the Kubernetes 1.30 and latest OpenAPI schemas with kubernetes-validate in strict mode
(unknown fields fail). Prometheus Operator and KEDA objects have no Kubernetes schema; they are
checked field by field here. The official NATS chart is a declared but absent dependency (charts
cannot be downloaded here), so it is rendered disabled, or enabled to check this chart's side.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")
from kubernetes_validate import utils as kv_utils  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "picospec"
sys.path.insert(0, str(CHART / "hack"))
import chart_files  # noqa: E402
import manifests  # noqa: E402

import chartnats  # noqa: E402

RELEASE, NAMESPACE = "ps", "serving"
EDGE_KEY = "node-role.kubernetes.io/edge"
K8S_VERSIONS = ("1.30.0", kv.latest_version())
CRD_APIS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1", "cert-manager.io/v1")
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)
ALL_OBSERVABILITY = {
    "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboards": {"enabled": True},
    "edgeAgent": {"enabled": True, "remoteWriteUrl": "https://prom.example.com/api/v1/write"},
}
COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "autoscaling-hpa": {
        "verifier": {"autoscaling": {"enabled": True, "type": "hpa", "targetQueueDepth": 4}}
    },
    "autoscaling-keda": {
        "apiVersions": ["keda.sh/v1alpha1"],
        "verifier": {"autoscaling": {"enabled": True, "type": "keda", "targetQueueDepth": 4}},
    },
    "existing-nats": {
        "externalNats": {
            "url": "nats://nats.messaging.svc:4222",
            "leafUrls": ["nats-leaf://nats.example.com:7422"],
        },
        "natsAuth": {"existingSecret": "nats-credentials"},
    },
    "official-nats-chart": {
        "nats": {"enabled": True},
        "natsAuth": {"existingSecret": "picospec-nats-auth"},
    },
    "observability-on": {
        "apiVersions": ["monitoring.coreos.com/v1"],
        "observability": ALL_OBSERVABILITY,
    },
    "observability-off": {"apiVersions": ["monitoring.coreos.com/v1"]},
    "api-keys-file": {
        "drafter": {
            "settings": {"api_keys_file": "/etc/picospec/api-keys/keys"},
            "extraVolumes": [{"name": "api-keys", "secret": {"secretName": "picospec-api-keys"}}],
            "extraVolumeMounts": [
                {"name": "api-keys", "mountPath": "/etc/picospec/api-keys", "readOnly": True}
            ],
        }
    },
    "hostport-cloud-sampler-pvc": {
        "edge": {"network": "hostPort", "tolerations": [{"key": "edge", "operator": "Exists"}]},
        "drafter": {"kind": "Deployment", "replicas": 2, "service": {"enabled": True}},
        "sampler": {"placement": "cloud", "replicas": 2},
        "verifier": {
            "replicas": 3,
            "gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"},
            "runtimeClassName": "nvidia",
            "modelCache": {"type": "pvc"},
            "settings": {"model": "HuggingFaceTB/SmolLM2-1.7B-Instruct", "max_sessions": 128},
            "modelDownload": {"tokenSecret": {"name": "hf-token"}},
        },
        "cloudNats": {
            "replicas": 3,
            "jetstream": {"enabled": True},
            "leafnodesService": {"type": "LoadBalancer"},
        },
        "leafNode": {"hubUrls": ["nats-leaf://hub.example.com:7422"]},
    },
    # Two edge sites over the public internet: TLS with mutual TLS on the leaf link,
    # certificates from cert-manager, the hub's leaf port on a LoadBalancer.
    "sites-tls-cert-manager": {
        "sites": [
            {"name": "store-a"},
            {"name": "store-b", "nodeSelector": {"example.com/store": "b"}},
        ],
        "tls": {
            "enabled": True,
            "mutualLeafnodes": True,
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "picospec-ca", "kind": "ClusterIssuer"},
            },
            "hub": {"dnsNames": ["nats-hub.example.com"], "ipAddresses": ["203.0.113.7"]},
        },
        "cloudNats": {"leafnodesService": {"type": "LoadBalancer"}},
        "leafNode": {"hubUrls": ["nats-leaf://nats-hub.example.com:7422"]},
    },
    # Sites with TLS from Secrets the operator made (one site's credentials too), a cloud
    # sampler, drafters on the pod network.
    "sites-tls-own-secrets": {
        "sites": [
            {"name": "a", "existingSecret": "site-a-nats", "tlsSecret": "site-a-tls"},
            {"name": "b"},
        ],
        "tls": {"enabled": True, "hub": {"secretName": "hub-tls"}},
        "sampler": {"placement": "cloud"},
        "edge": {"network": "hostPort"},
    },
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as c:
        yield c


def _split(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.cache
def _render_cached(values_json: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    with helm.Chart.load(str(CHART)) as c:
        out = c.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            for obj in _split(text):
                obj["__source"] = path
                objs.append(obj)
    return out, objs


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return copy.deepcopy(_render_cached(json.dumps(values, sort_keys=True))[1])


def notes(values: dict[str, Any]) -> str:
    out, _ = _render_cached(json.dumps(values, sort_keys=True))
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def workloads(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, s) for o in objs if (s := pod_spec(o)) is not None]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def find(objs, kind: str, comp: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (comp is None or component(o) == comp)]


def node_terms(spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    req = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [t.get("matchExpressions", []) for t in req["nodeSelectorTerms"]]


def on_edge(spec: dict[str, Any]) -> bool:
    return all(
        any(e["key"] == EDGE_KEY and e["operator"] == "Exists" for e in term)
        for term in node_terms(spec)
    )


def off_edge(spec: dict[str, Any]) -> bool:
    return all(
        any(e["key"] == EDGE_KEY and e["operator"] == "DoesNotExist" for e in term)
        for term in node_terms(spec)
    )


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def gpus(spec: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get(k, {}).get("nvidia.com/gpu", 0))
        for c in containers(spec)
        for k in ("requests",)
    )


# --------------------------------------------------------------------------- lint + schemas


@pytest.mark.parametrize("combo", list(COMBOS))
def test_helm_lint_has_no_errors(combo: str) -> None:
    report = helm.lint(str(CHART), COMBOS[combo], namespace=NAMESPACE, kube_version="v1.30.0")
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    assert not errors and not report["errors"], errors
    warnings = [m["error"] for m in report["messages"] if m["severity"] == 2]
    # The only warning: the official NATS chart, an optional dependency, is not vendored.
    assert all("missing these dependencies: nats" in w for w in warnings), warnings


@functools.cache
def _schema_contents(filename: str, desired_version: str) -> Any:
    return _original_schema_contents(filename, desired_version)


_original_schema_contents = kv_utils.schema_contents


@pytest.fixture(scope="module", autouse=True)
def _cache_k8s_schemas():
    kv_utils.schema_contents = _schema_contents  # parse each schema file once
    yield
    kv_utils.schema_contents = _original_schema_contents


def k8s_validate(obj: dict[str, Any], version: str) -> None:
    clean = {k: v for k, v in obj.items() if k != "__source"}
    kv.validate(clean, version, strict=True)


def test_strict_validation_bites() -> None:
    """Sanity check of the validator itself: strict mode refuses an unknown field."""
    obj = render({})[0]
    pod = next(o for o in render({}) if o["kind"] == "Deployment")
    pod["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    k8s_validate(obj, K8S_VERSIONS[0])
    with pytest.raises(kv.ValidationError):
        k8s_validate(pod, K8S_VERSIONS[0])


@pytest.mark.parametrize("combo", list(COMBOS))
def test_every_object_matches_the_kubernetes_schemas(combo: str) -> None:
    objs = render(COMBOS[combo])
    assert objs
    for obj in objs:
        if obj["apiVersion"] in CRD_APIS:
            continue  # no Kubernetes schema: see test_custom_resources
        for version in K8S_VERSIONS:
            try:
                k8s_validate(obj, version)
            except kv.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {e.message}")


@pytest.mark.parametrize("combo", list(COMBOS))
def test_standard_labels_and_namespace(combo: str) -> None:
    for obj in render(COMBOS[combo]):
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "picospec"
        assert obj["metadata"]["namespace"] == NAMESPACE
    for obj, _spec in workloads(render(COMBOS[combo])):
        if obj["kind"] != "Pod":
            sel = obj["spec"]["selector"]["matchLabels"]
            tmpl = obj["spec"]["template"]["metadata"]["labels"]
            assert sel.items() <= tmpl.items()
            assert tmpl["app.kubernetes.io/component"] == component(obj)


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("combo", list(COMBOS))
def test_placement(combo: str) -> None:
    values = COMBOS[combo]
    objs = render(values)
    seen = set()
    for obj, spec in workloads(objs):
        comp = component(obj)
        seen.add(comp)
        if comp == "verifier":
            assert obj["kind"] == "Deployment"
            assert gpus(spec) >= 1, "verifiers request GPUs"
            for c in spec["containers"]:
                res = c["resources"]
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"
            ]
            assert off_edge(spec), "verifiers stay off KubeEdge edge nodes"
        elif comp in ("drafter", "leafnode", "edge-agent", "test"):
            assert on_edge(spec), f"{comp} selects edge nodes"
            assert gpus(spec) == 0
        elif comp == "sampler":
            cloud = values.get("sampler", {}).get("placement") == "cloud"
            assert (off_edge if cloud else on_edge)(spec), f"sampler placement ({combo})"
            assert obj["kind"] == ("Deployment" if cloud else "DaemonSet")
        elif comp == "nats":
            assert obj["kind"] == "StatefulSet"
            assert off_edge(spec), "the cloud NATS stays off edge nodes"
        else:
            pytest.fail(f"unexpected workload component {comp}")
        if comp in ("leafnode", "edge-agent") or (comp == "sampler" and obj["kind"] == "DaemonSet"):
            assert obj["kind"] == "DaemonSet"
    assert {"verifier", "drafter", "sampler", "leafnode", "test"} <= seen
    assert ("nats" in seen) == (combo not in ("existing-nats", "official-nats-chart"))


def test_verifier_gpu_options() -> None:
    values = COMBOS["hostport-cloud-sampler-pvc"]
    (dep,) = find(render(values), "Deployment", "verifier")
    spec = dep["spec"]["template"]["spec"]
    assert gpus(spec) == 2
    assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert spec["runtimeClassName"] == "nvidia"
    assert dep["spec"]["replicas"] == 3
    init = {c["name"]: c for c in spec["initContainers"]}["model-download"]
    env = {e["name"]: e for e in init["env"]}
    assert env["MODEL"]["value"] == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    (pvc,) = find(render(values), "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # the embedded default model needs no download
    (dep,) = find(render({}), "Deployment", "verifier")
    assert "initContainers" not in dep["spec"]["template"]["spec"]


def test_edge_pods_do_not_depend_on_cluster_services() -> None:
    """Edge nodes lack kube-proxy and cluster DNS: edge pods talk to their node's leaf node."""
    for values, host in (
        (COMBOS["defaults"], "127.0.0.1"),
        (COMBOS["hostport-cloud-sampler-pvc"], "$(HOST_IP)"),
    ):
        for obj, spec in workloads(render(values)):
            if component(obj) not in ("drafter", "sampler") or not on_edge(spec):
                continue
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert env["PICOSPEC_NATS_URL"] == f"nats://{host}:4222", component(obj)
            if host == "127.0.0.1":
                assert spec["hostNetwork"] is True
            else:
                assert spec["containers"][0]["ports"][0]["hostPort"] == int(env["PICOSPEC_PORT"])
    cloud = find(render(COMBOS["hostport-cloud-sampler-pvc"]), "Deployment", "sampler")[0]
    env = {
        e["name"]: e.get("value") for e in cloud["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PICOSPEC_NATS_URL"] == f"nats://ps-picospec-nats.{NAMESPACE}.svc:4222"


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize("combo", list(COMBOS))
def test_security_context_on_every_pod(combo: str) -> None:
    for obj, spec in workloads(render(COMBOS[combo])):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", (name, c["name"])
            assert "privileged" not in sc, (name, c["name"])
            assert "add" not in sc["capabilities"], (name, c["name"])


@pytest.mark.parametrize("combo", list(COMBOS))
def test_no_secret_in_plain_env_and_nats_auth_from_a_secret(combo: str) -> None:
    """No NATS credential reaches a container as an environment variable: services read theirs
    as files (PICOSPEC_NATS_USER_FILE, PICOSPEC_NATS_PASSWORD_FILE) mounted from the Secret,
    NATS servers through their nats-auth init container's vars.conf on a memory volume."""
    values = COMBOS[combo]
    objs = render(values)
    assert_no_nats_secret_in_env(objs)
    secret_name = values.get("natsAuth", {}).get("existingSecret") or "ps-picospec-nats-auth"
    assert bool(find(objs, "Secret")) == (not values.get("natsAuth", {}).get("existingSecret"))
    for obj, spec in workloads(objs):
        if component(obj) not in ("verifier", "drafter", "sampler"):
            continue
        (c,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PICOSPEC_NATS_PASSWORD_FILE"] == "/etc/picospec/nats-auth/password"
        vol = next(v for v in spec["volumes"] if v["name"] == "nats-auth")
        site = obj["metadata"]["labels"].get("picospec.io/site")
        if site:  # a site's own Secret: yours, or the generated <fullname>-nats-auth-<site>
            mine = {s["name"]: s.get("existingSecret") for s in values["sites"]}[site]
            assert vol["secret"]["secretName"] == (mine or f"ps-picospec-nats-auth-{site}")
        else:
            assert vol["secret"]["secretName"] == secret_name
        role = component(obj)
        assert vol["secret"]["items"] == [
            {"key": f"{role}-user", "path": "user"},
            {"key": f"{role}-password", "path": "password"},
        ]


def assert_no_nats_secret_in_env(objs: list[dict[str, Any]]) -> None:
    secret_names = {o["metadata"]["name"] for o in find(objs, "Secret")}
    for obj, spec in workloads(objs):
        for c in containers(spec):
            where = (obj["metadata"]["name"], c["name"])
            for e in c.get("env", []):
                assert not re.search(r"PASSWORD$|_USER$|NATS_CREDS_", e["name"]), (where, e)
                assert not re.search(r"://[^/\s]*@", e.get("value") or ""), (where, e)  # no login
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:  # only the Hugging Face token (not NATS) comes from a Secret as env
                    assert e["name"] == "HF_TOKEN" and ref["name"] not in secret_names, (where, e)
                    assert "nats" not in ref["name"], (where, e)
            for src in c.get("envFrom", []):
                assert "secretRef" not in src, (where, src)


def test_generated_nats_secret() -> None:
    (secret,) = find(render({}), "Secret")
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    roles = ("verifier", "drafter", "sampler", "leaf")
    assert set(data) == {f"{r}-{part}" for r in roles for part in ("user", "password")}
    for role in roles:
        assert data[f"{role}-user"] == role
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{39}", data[f"{role}-password"]), role
    assert len({data[f"{r}-password"] for r in roles}) == len(roles)


@pytest.mark.parametrize("combo", ["defaults", "hostport-cloud-sampler-pvc"])
def test_network_policies(combo: str) -> None:
    values = COMBOS[combo]
    objs = render(values)
    pols = {p["metadata"]["name"]: p for p in find(objs, "NetworkPolicy")}
    nats = pols["ps-picospec-nats"]["spec"]["ingress"]
    client = next(r for r in nats if r["ports"][0]["port"] == 4222)
    assert client["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/part-of": "picospec",
    }
    assert "ps-picospec-verifier" in pols
    host_network = values.get("edge", {}).get("network", "hostNetwork") == "hostNetwork"
    # policies cannot apply to hostNetwork pods: those rely on loopback binding + NATS auth
    assert ("ps-picospec-drafter" in pols) == (not host_network)
    assert ("ps-picospec-leafnode" in pols) == (not host_network)
    leaf_conf = next(o for o in find(objs, "ConfigMap", "leafnode"))["data"]["nats.conf"]
    assert ('listen: "127.0.0.1:4222"' in leaf_conf) == host_network
    assert 'http: "127.0.0.1:8222"' in leaf_conf
    assert "authorization" in leaf_conf


# --------------------------------------------------------------------------- probes, drain


@pytest.mark.parametrize("combo", list(COMBOS))
def test_probes_everywhere(combo: str) -> None:
    for obj, spec in workloads(render(COMBOS[combo])):
        if obj["kind"] == "Pod":
            continue  # the helm test pod runs once
        for c in spec["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, (obj["metadata"]["name"], c["name"], probe)


def test_verifier_probes_drain_and_disruption_budget() -> None:
    objs = render({})
    (dep,) = find(objs, "Deployment", "verifier")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    startup = c["startupProbe"]
    # sized for model loading: at least 20 minutes before a restart
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
    assert (
        startup["httpGet"]["path"] == "/ready"
        and c["livenessProbe"]["httpGet"]["path"] == "/health"
    )
    assert (
        dep["spec"]["progressDeadlineSeconds"]
        > startup["periodSeconds"] * startup["failureThreshold"]
    )
    env = {e["name"]: e.get("value") for e in c["env"]}
    drain = float(env["PICOSPEC_DRAIN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > drain + 5
    pre_stop = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert "SIGTERM" in pre_stop and "os.kill(1" in pre_stop
    (pdb,) = find(objs, "PodDisruptionBudget", "verifier")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_settings_env_vars_are_real_settings() -> None:
    from picospec.config import Settings

    fields = {f"PICOSPEC_{name.upper()}" for name in Settings.model_fields}
    for combo in COMBOS.values():
        for obj, spec in workloads(render(combo)):
            for c in containers(spec):
                for e in c.get("env", []):
                    if e["name"].startswith("PICOSPEC_") and component(obj) in (
                        "verifier",
                        "drafter",
                        "sampler",
                    ):
                        assert e["name"] in fields, e["name"]


def test_component_settings_reach_the_pods() -> None:
    objs = render(
        {
            "settings": {"draft_len": 6},
            "verifier": {"settings": {"max_sessions": 7, "draft_len": 2}},
        }
    )
    (dep,) = find(objs, "Deployment", "verifier")
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PICOSPEC_MAX_SESSIONS"] == "7" and env["PICOSPEC_DRAFT_LEN"] == "2"
    (ds,) = find(objs, "DaemonSet", "drafter")
    env = {
        e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PICOSPEC_DRAFT_LEN"] == "6" and env["PICOSPEC_SITE"] == "$(NODE_NAME)"


def test_drafter_mounts_an_api_keys_file_from_a_secret() -> None:
    (ds,) = find(render(COMBOS["api-keys-file"]), "DaemonSet", "drafter")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PICOSPEC_API_KEYS_FILE"] == "/etc/picospec/api-keys/keys"
    assert {"name": "api-keys", "secret": {"secretName": "picospec-api-keys"}} in pod["volumes"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": "/etc/picospec/api-keys", "readOnly": True}
    assert {m["name"] for m in c["volumeMounts"]} >= {"model-cache", "tmp", "api-keys"}


# --------------------------------------------------------------------------- NATS


def test_nats_modes() -> None:
    def verifier_env(values):
        (dep,) = find(render(values), "Deployment", "verifier")
        return {
            e["name"]: e.get("value")
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
        }

    def leaf_urls(values):
        # the hub URLs the leaf node's nats-auth init container adds the leaf login to
        (ds,) = find(render(values), "DaemonSet", "leafnode")
        (init,) = ds["spec"]["template"]["spec"]["initContainers"]
        env = {e["name"]: e["value"] for e in init["env"]}
        return env["HUB_URLS"].split()

    assert verifier_env({})["PICOSPEC_NATS_URL"] == f"nats://ps-picospec-nats.{NAMESPACE}.svc:4222"
    assert leaf_urls({}) == [
        f"nats-leaf://ps-picospec-nats-leafnodes.{NAMESPACE}.svc.cluster.local:7422"
    ]
    ext = COMBOS["existing-nats"]
    assert verifier_env(ext)["PICOSPEC_NATS_URL"] == "nats://nats.messaging.svc:4222"
    assert leaf_urls(ext) == ["nats-leaf://nats.example.com:7422"]
    sub = COMBOS["official-nats-chart"]
    assert verifier_env(sub)["PICOSPEC_NATS_URL"] == f"nats://ps-nats.{NAMESPACE}.svc:4222"
    # the official chart's values this chart ships point at the same Secret keys
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    env = values["nats"]["container"]["env"]
    roles = ("verifier", "drafter", "sampler", "leaf")
    assert {v["valueFrom"]["secretKeyRef"]["key"] for v in env.values()} == {
        f"{r}-{part}" for r in roles for part in ("user", "password")
    }
    assert values["nats"]["config"]["leafnodes"]["enabled"] is True
    # ... and the same users with the same permissions as the chart's own hub
    perms = json.loads((CHART / "files" / "nats-permissions.json").read_text())
    users = values["nats"]["config"]["merge"]["authorization"]["users"]
    assert [u["user"] for u in users] == [f"<< $PICOSPEC_{r.upper()}_USER >>" for r in roles]
    assert [u["permissions"] for u in users] == [perms[r] for r in roles]
    # hub config: auth and leaf-node port
    conf = find(render({}), "ConfigMap", "nats")[0]["data"]["nats.conf"]
    assert "leafnodes {" in conf and 'listen: "0.0.0.0:7422"' in conf
    assert 'include "../nats-auth/vars.conf"' in conf
    for role in ("verifier", "drafter", "sampler", "leaf"):
        assert f"$PICOSPEC_{role.upper()}_PASSWORD" in conf
    conf3 = find(render(COMBOS["hostport-cloud-sampler-pvc"]), "ConfigMap", "nats")[0]["data"][
        "nats.conf"
    ]
    assert conf3.count("nats-route://") == 3 and "jetstream {" in conf3


def test_chart_nats_configs_enforce_the_roles_on_a_real_nats_server(tmp_path: Path) -> None:
    """The hub and leaf-node configs the chart renders, run by real nats-server processes with
    the env the pods get: each role logs in with its own user and gets exactly its
    permissions, across the leaf link (drafter at the edge, verifier in the cloud)."""
    import asyncio

    import nats

    from picospec.protocol import subjects
    from picospec.tools.stack.natsserver import free_ports
    from picospec.tools.stack.procs import terminate_all

    hub_port, leaf_port, hub_mon, edge_port, edge_mon = free_ports(5)
    values = {
        "cloudNats": {"ports": {"client": hub_port, "leafnodes": leaf_port, "monitor": hub_mon}},
        "leafNode": {
            "ports": {"client": edge_port, "monitor": edge_mon},
            "hubUrls": [f"nats-leaf://127.0.0.1:{leaf_port}"],
        },
    }
    objs = render(values)
    hub_conf = find(objs, "ConfigMap", "nats")[0]["data"]["nats.conf"]
    edge_conf = find(objs, "ConfigMap", "leafnode")[0]["data"]["nats.conf"]
    roles = ("verifier", "drafter", "sampler", "leaf")
    creds = {r: (r, "p" + secrets.token_hex(12)) for r in roles}
    # the generated Secret's keys, as the pods' nats-auth init containers read them
    auth_secret = {f"{r}-{k}": v for r, (u, pw) in creds.items()
                   for k, v in (("user", u), ("password", pw))}  # fmt: skip
    secret_data = {"ps-picospec-nats-auth": auth_secret}
    (hub_obj,) = find(objs, "StatefulSet", "nats")
    (edge_obj,) = find(objs, "DaemonSet", "leafnode")
    hub_auth = chartnats.run_auth_init(hub_obj, secret_data, tmp_path / "hub")
    edge_auth = chartnats.run_auth_init(edge_obj, secret_data, tmp_path / "edge")
    hub_path = chartnats.local_conf(hub_conf, hub_auth.parent)
    edge_path = chartnats.local_conf(edge_conf, edge_auth.parent)
    procs = [chartnats.start_nats(hub_path, {"POD_NAME": "hub-0"})]
    try:
        procs.append(chartnats.start_nats(edge_path, {"NODE_NAME": "edge-1"}))
        chartnats.wait_ports(hub_port, edge_port)  # the chart's NATS servers

        async def login(port: int, role: str | None, errors: list[str], **kw: Any) -> Any:
            async def on_error(e: Exception) -> None:
                errors.append(str(e).lower())

            auth = {"user": creds[role][0], "password": creds[role][1]} if role else {}
            return await nats.connect(
                f"nats://127.0.0.1:{port}",
                error_cb=on_error,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                **auth,
                **kw,
            )

        async def main() -> dict[str, Any]:
            errs: dict[str, list[str]] = {"verifier": [], "drafter": [], "sampler": []}
            verifier = await login(hub_port, "verifier", errs["verifier"])
            drafter = await login(
                edge_port, "drafter", errs["drafter"], inbox_prefix=subjects.inbox_prefix("edge-1")
            )
            sampler = await login(edge_port, "sampler", errs["sampler"])
            got: list[bytes] = []

            async def opened(msg: Any) -> None:
                await msg.respond(b"opened")
                await verifier.publish(subjects.verdicts("edge-1", "d1"), b"verdict")

            async def sample(msg: Any) -> None:
                await msg.respond(b"token")

            async def keep(msg: Any) -> None:
                got.append(msg.data)

            await verifier.subscribe(subjects.SESSIONS_OPEN, "verifiers", cb=opened)
            await sampler.subscribe(subjects.SAMPLE, "samplers", cb=sample)
            await drafter.subscribe(subjects.verdicts("edge-1", "d1"), cb=keep)
            # beyond each role's permissions: a drafter reading draft blocks, a sampler
            # forging verdicts, a verifier reading the edge's sample requests
            await drafter.subscribe(subjects.verify("verifier-1"), cb=keep)
            await sampler.publish(subjects.verdicts("edge-1", "d1"), b"forged")
            await verifier.subscribe(subjects.SAMPLE, cb=keep)
            for nc in (verifier, drafter, sampler):
                await nc.flush()
            reply = None
            for _ in range(100):  # until the leaf link is up and has the hub's interest
                try:
                    reply = await drafter.request(subjects.SESSIONS_OPEN, b"{}", timeout=0.5)
                    break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    await asyncio.sleep(0.2)
            token = await drafter.request(subjects.SAMPLE, b"residual", timeout=5)
            await asyncio.sleep(0.5)  # the verdict crosses the leaf link; -ERRs arrive
            anonymous = None
            try:
                await (await login(edge_port, None, [])).close()
            except Exception as e:  # noqa: BLE001 - nats-py raises its base Error here
                anonymous = str(e)
            for nc in (verifier, drafter, sampler):
                await nc.close()
            return {
                "reply": reply.data if reply else None,
                "token": token.data,
                "got": got,
                "errors": errs,
                "anonymous": anonymous,
            }

        out = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        terminate_all(procs, 10)
    assert out["reply"] == b"opened" and out["token"] == b"token"
    assert out["got"] == [b"verdict"], out["got"]  # not the forged one, no draft block
    assert any("permissions violation for subscription" in e for e in out["errors"]["drafter"])
    assert any("permissions violation for publish" in e for e in out["errors"]["sampler"])
    assert any("permissions violation for subscription" in e for e in out["errors"]["verifier"])
    assert out["anonymous"] and "authorization" in out["anonymous"].lower()


# --------------------------------------------------------------------------- autoscaling


def test_autoscaling_off_by_default_and_replicas_owned_by_one_side() -> None:
    objs = render({})
    assert not find(objs, "HorizontalPodAutoscaler") and not find(objs, "ScaledObject")
    assert find(objs, "Deployment", "verifier")[0]["spec"]["replicas"] == 1
    for combo in ("autoscaling-hpa", "autoscaling-keda"):
        (dep,) = find(render(COMBOS[combo]), "Deployment", "verifier")
        assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"


def test_hpa() -> None:
    (hpa,) = find(render(COMBOS["autoscaling-hpa"]), "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ps-picospec-verifier",
    }
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == ["picospec_active_sessions", "picospec_verify_queue_depth"]
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["minReplicas"] >= 1
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_custom_resources() -> None:
    """Prometheus Operator and KEDA objects, checked against their documented fields."""
    (so,) = find(render(COMBOS["autoscaling-keda"]), "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(so["spec"]) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "advanced",
        "triggers",
        "idleReplicaCount",
        "fallback",
    }
    assert so["spec"]["scaleTargetRef"]["name"] == "ps-picospec-verifier"
    assert so["spec"]["minReplicaCount"] >= 1
    for t in so["spec"]["triggers"]:
        assert t["type"] == "prometheus" and t["metricType"] == "AverageValue"
        assert set(t["metadata"]) == {"serverAddress", "query", "threshold"}
        assert isinstance(t["metadata"]["threshold"], str)
        assert f'namespace="{NAMESPACE}"' in t["metadata"]["query"]
    objs = render(COMBOS["observability-on"])
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitors = find(objs, kind)
        assert monitors, kind
        for m in monitors:
            assert m["apiVersion"] == "monitoring.coreos.com/v1"
            assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
            assert m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
            for ep in m["spec"][endpoints]:
                assert ep["port"] == "http" and ep["path"] == "/metrics"
                targets = {r["targetLabel"] for r in ep["relabelings"]}
                assert {"role", "replica"} <= targets
    # the ports the monitors name exist on the pods / services they select
    for svc in find(objs, "Service", "verifier"):
        assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    for rule in find(objs, "PrometheusRule"):
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                if "alert" in r:
                    assert r["labels"]["severity"] and "for" in r
                    assert {"summary", "description", "runbook_url"} <= set(r["annotations"])


def test_keda_needs_keda() -> None:
    values = {"verifier": {"autoscaling": {"enabled": True, "type": "keda"}}}
    with pytest.raises(helm.HelmRenderError, match="install KEDA"):
        render(values)


# --------------------------------------------------------------------------- observability


def test_observability_only_when_enabled_and_served() -> None:
    crd_kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [o for o in render(COMBOS["observability-off"]) if o["kind"] in crd_kinds]
    # enabled, but the cluster does not serve monitoring.coreos.com/v1: nothing, and a warning
    values = {"observability": ALL_OBSERVABILITY}
    assert not [o for o in render(values) if o["kind"] in crd_kinds]
    assert "does not serve" in notes(values)
    on = render(COMBOS["observability-on"])
    kinds = {o["kind"] for o in on}
    assert {"ServiceMonitor", "PodMonitor"} <= kinds
    rule_files = sorted((CHART / "files").glob("*.rules.yml"))
    assert len(find(on, "PrometheusRule")) == len(rule_files)


def test_grafana_dashboards_are_the_observability_json() -> None:
    on = render(COMBOS["observability-on"])
    maps = [
        o for o in find(on, "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    sources = sorted((CHART / "files").glob("*.json"))
    assert len(maps) == len(sources)
    for cm, src in zip(sorted(maps, key=lambda m: m["metadata"]["name"]), sources, strict=True):
        assert list(cm["data"]) == [src.name]
        assert json.loads(cm["data"][src.name]) == json.loads(src.read_text())
    assert not [o for o in render({}) if o["metadata"]["labels"].get("grafana_dashboard")]


def test_edge_agent_remote_writes() -> None:
    objs = render(COMBOS["observability-on"])
    (ds,) = find(objs, "DaemonSet", "edge-agent")
    spec = ds["spec"]["template"]["spec"]
    assert on_edge(spec) and spec["hostNetwork"] is True
    assert "--agent" in spec["containers"][0]["args"]
    conf = yaml.safe_load(find(objs, "ConfigMap", "edge-agent")[0]["data"]["prometheus.yml"])
    assert conf["remote_write"][0]["url"] == "https://prom.example.com/api/v1/write"
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert set(jobs) == {"picospec-drafter", "picospec-sampler"}
    assert {"namespace", "role", "replica", "site"} <= set(
        jobs["picospec-drafter"]["static_configs"][0]["labels"]
    )


# --------------------------------------------------------------------------- metric names


def exported_metrics() -> set[str]:
    """Sample names the services serve on /metrics: all picospec.services.metrics registers."""
    from prometheus_client import REGISTRY

    import picospec.services.metrics  # noqa: F401  (registers every metric)

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "unknown": ("",),
    }
    names = set()
    for family in REGISTRY.collect():
        for suffix in suffixes[family.type]:
            names.add(family.name + suffix)
    return names


_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', "", expr)  # strings
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        token, call = m.group(1), m.group(2)
        if call or token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def test_promql_parser() -> None:
    expr = (
        'sum by (namespace, site) (rate(picospec_requests_total{status=~"5.."}[5m])) / on (a) '
        'group_left sum(rate(picospec_x_total[1m] offset 5m)) > 0.5 and up{role="v"} == 1'
    )
    assert promql_metric_names(expr) == {"picospec_requests_total", "picospec_x_total", "up"}


# Metrics Prometheus itself makes, not the services.
PROMETHEUS_MADE = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def test_every_referenced_metric_exists() -> None:
    exported = exported_metrics()
    assert "picospec_active_sessions" in exported
    assert "picospec_spec_decode_num_draft_tokens_total" in exported
    referenced: dict[str, str] = {}

    def add(expr: str, where: str) -> None:
        for name in promql_metric_names(expr):
            referenced.setdefault(name, where)

    # HPA and KEDA
    for obj in find(render(COMBOS["autoscaling-hpa"]), "HorizontalPodAutoscaler"):
        for m in obj["spec"]["metrics"]:
            referenced.setdefault(m["pods"]["metric"]["name"], "HPA")
    for obj in find(render(COMBOS["autoscaling-keda"]), "ScaledObject"):
        for t in obj["spec"]["triggers"]:
            add(t["metadata"]["query"], "ScaledObject")
    # prometheus-adapter rules serving the HPA's metrics
    adapter = yaml.safe_load((ROOT / "k8s/prerequisites/prometheus-adapter-rules.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        add(rule["seriesQuery"], "prometheus-adapter")
        referenced.setdefault(rule["name"]["as"], "prometheus-adapter")
    # ServiceMonitor / PodMonitor metric relabelings, if any
    for obj in render(COMBOS["observability-on"]):
        if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
            for ep in obj["spec"].get("endpoints", []) + obj["spec"].get("podMetricsEndpoints", []):
                for r in ep.get("metricRelabelings", []):
                    if "__name__" in r.get("sourceLabels", []) and r.get("regex"):
                        for name in re.findall(r"[a-z_:][a-z0-9_:]*", r["regex"]):
                            referenced.setdefault(name, "monitor relabeling")
    # recording and alert rules: the rendered PrometheusRules and the chart's copies
    recorded = set()
    rule_docs = [o["spec"] for o in find(render(COMBOS["observability-on"]), "PrometheusRule")]
    rule_docs += [yaml.safe_load(p.read_text()) for p in (CHART / "files").glob("*.rules.yml")]
    for doc in rule_docs:
        for group in doc["groups"]:
            for r in group["rules"]:
                if "record" in r:
                    recorded.add(r["record"])
                add(str(r["expr"]), f"rule {r.get('record') or r.get('alert')}")
    missing = {
        name: where
        for name, where in referenced.items()
        if name not in exported and name not in recorded and name not in PROMETHEUS_MADE
    }
    assert not missing, f"referenced but not served on /metrics: {missing}"
    assert not {n for n in referenced if ":" in n} - recorded, "recorded names must be defined"


# --------------------------------------------------------------------------- values schema


BAD_VALUES = [
    ({"verifier": {"gpu": {"count": 0}}}, "/verifier/gpu/count"),
    ({"verifier": {"settings": {"nats_password": "hunter2"}}}, "nats_password"),
    ({"settings": {"nats_url": "nats://x:4222"}}, "nats_url"),
    ({"verifier": {"settings": {"max_sessions": "many"}}}, "/verifier/settings/max_sessions"),
    ({"verifier": {"settings": {"max_sesions": 8}}}, "max_sesions"),
    ({"settings": {"mode": "turbo"}}, "/settings/mode"),
    ({"edge": {"network": "bridge"}}, "/edge/network"),
    ({"verifier": {"autoscaling": {"type": "vpa"}}}, "/verifier/autoscaling/type"),
    ({"verifier": {"autoscaling": {"minReplicas": 0}}}, "/verifier/autoscaling/minReplicas"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"leafNode": {"hubUrls": ["nats-leaf://leaf:secret@hub:7422"]}}, "/leafNode/hubUrls/0"),
    ({"sampler": {"placement": "moon"}}, "/sampler/placement"),
    ({"verifierz": {}}, "verifierz"),
    (
        {"observability": {"serviceMonitor": {"interval": "often"}}},
        "/observability/serviceMonitor/interval",
    ),
]


@pytest.mark.parametrize("values,where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_rejects_bad_values(chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(values)
    assert where in str(e.value)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_every_combo(chart) -> None:
    for values in COMBOS.values():
        chart.validate_schema(values)


BAD_COMBINATIONS = [
    ({"verifier": {"terminationGracePeriodSeconds": 20}}, "must exceed settings.drain_grace_s"),
    (
        {"verifier": {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}},
        "below minReplicas",
    ),
    (
        {
            "verifier": {
                "replicas": 2,
                "modelCache": {"type": "pvc", "pvc": {"accessModes": ["ReadWriteOnce"]}},
            }
        },
        "ReadWriteMany",
    ),
    ({"verifier": {"modelCache": {"type": "existingClaim"}}}, "existingClaim"),
    ({"nats": {"enabled": True}}, "natsAuth.existingSecret"),
    ({"externalNats": {"url": "nats://n:4222", "leafUrls": ["nats-leaf://n:7422"]}}, "credentials"),
    (
        {"externalNats": {"url": "nats://n:4222"}, "natsAuth": {"enabled": False}},
        "leafNode.hubUrls",
    ),
    ({"observability": {"edgeAgent": {"enabled": True}}}, "remoteWriteUrl"),
]


@pytest.mark.parametrize("values,message", BAD_COMBINATIONS, ids=[m for _, m in BAD_COMBINATIONS])
def test_bad_combinations_fail_with_a_clear_message(values, message) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def test_settings_schema_is_generated_from_settings() -> None:
    from picospec.config import Settings

    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["$defs"]["settings"]["properties"]
    assert set(props) == set(Settings.model_fields) - set(chart_files.MANAGED)
    for name in ("nats_password", "nats_user", "nats_creds", "nats_url"):
        assert name not in props, "credentials never go into values"


# --------------------------------------------------------------------------- derived files


def test_chart_files_in_sync_with_observability() -> None:
    assert chart_files.problems() == [], "run `make chart-files`"


def test_k8s_manifests_in_sync_with_chart() -> None:
    path = ROOT / "k8s" / "picospec.yaml"
    assert path.read_text() == manifests.render(), "run `make manifests`"
    objs = _split(path.read_text())
    kinds = {o["kind"] for o in objs}
    assert "Secret" not in kinds and "Pod" not in kinds  # no passwords, no helm test hook
    assert {"Deployment", "DaemonSet", "StatefulSet", "NetworkPolicy"} <= kinds
    for obj in objs:
        k8s_validate(obj, K8S_VERSIONS[0])


# --------------------------------------------------------------------------- helm test, NOTES


def test_helm_test_pod() -> None:
    (pod,) = find(render({}), "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and on_edge(spec)
    aff = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert aff["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "drafter"
    script = spec["containers"][0]["args"][0]
    compile(script, "helm-test", "exec")
    assert (
        "/v1/chat/completions" in script
        and "picospec_spec_decode_num_accepted_tokens_total" in script
    )


def test_notes_tell_how_to_reach_the_api_and_dashboards() -> None:
    text = notes({})
    assert "/v1/chat/completions" in text and ":8000" in text
    assert "helm test ps" in text and f"picospec cluster -n {NAMESPACE} --release ps status" in text
    assert "EdgeMesh" in text and "leafNode.hubUrls" in text
    text = notes(COMBOS["observability-on"])
    assert "grafana_dashboard=1" in text
    assert "Edge agents push" in text


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "charts/picospec/examples").glob("*.yaml"))


def test_verifier_on_vllm_requests_its_parallel_gpus_and_shared_memory() -> None:
    """verifier.backend: vllm with tensorParallelSize 4: the pod requests 4 GPUs, mounts a
    memory-backed /dev/shm of vllm.shmSizeLimit, runs the vLLM image and gets the settings as
    PICOSPEC_* variables; every object passes the strict schemas. The default is unchanged."""
    values = {"verifier": {"backend": "vllm", "vllm": {"tensorParallelSize": 4}}}
    objs = render(values)
    (dep,) = find(objs, "Deployment", "verifier")
    spec = dep["spec"]["template"]["spec"]
    assert gpus(spec) == 4
    (ctr,) = containers(spec)
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 4
    shm = {v["name"]: v for v in spec["volumes"]}["dshm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in ctr["volumeMounts"]
    assert ctr["image"].endswith("-vllm")
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert env["PICOSPEC_VERIFIER_BACKEND"] == "vllm"
    assert env["PICOSPEC_VLLM_TENSOR_PARALLEL_SIZE"] == "4"
    assert env["PICOSPEC_VLLM_ENABLE_PREFIX_CACHING"] == "true"
    assert "PICOSPEC_VLLM_QUANTIZATION" not in env and "PICOSPEC_VLLM_MAX_MODEL_LEN" not in env
    from picospec.config import Settings

    Settings(**{k[len("PICOSPEC_"):].lower(): v for k, v in env.items()
                if k.startswith("PICOSPEC_VLLM") or k == "PICOSPEC_VERIFIER_BACKEND"})  # fmt: skip
    for obj in objs:
        if obj["apiVersion"] not in CRD_APIS:
            for version in K8S_VERSIONS:
                k8s_validate(obj, version)
    (plain,) = find(render({}), "Deployment", "verifier")
    plain_spec = plain["spec"]["template"]["spec"]
    assert gpus(plain_spec) == 1
    assert {v["name"]: v for v in plain_spec["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "1Gi"
    assert all(e["name"] != "PICOSPEC_VERIFIER_BACKEND" for e in containers(plain_spec)[0]["env"])
    with pytest.raises(Exception, match="backend"):
        render({"verifier": {"backend": "tensorrt"}})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_values_examples_render_and_validate(example: Path) -> None:
    values = yaml.safe_load(example.read_text())
    objs = render(values)
    (dep,) = find(objs, "Deployment", "verifier")
    vllm = values["verifier"]["vllm"]
    want = vllm.get("tensorParallelSize", 1) * vllm.get("pipelineParallelSize", 1)
    assert gpus(dep["spec"]["template"]["spec"]) == want
    for obj in objs:
        if obj["apiVersion"] not in CRD_APIS:
            k8s_validate(obj, K8S_VERSIONS[-1])
