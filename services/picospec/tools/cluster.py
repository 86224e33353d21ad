"""``picospec cluster``: the operator's view of a PicoSpec deployment, from a terminal.

* ``status``: edge sites (the chart's ``sites``, and each KubeEdge edge node with its drafter,
  sampler and NATS leaf-node pods, whether the hub lists its leaf link (the hub's /leafz) and
  whether that link uses TLS), verifier replicas with their GPUs, readiness and the sessions
  each holds (read from the pod's /metrics through the API server's pod proxy), and the
  autoscaler (HPA or KEDA).
* ``scale-verifiers N``: the verifier Deployment's replica count, or the autoscaler's minimum
  when one owns the Deployment.

A thin layer over the official ``kubernetes`` client: a kubeconfig (``--kubeconfig``,
``--context``, else $KUBECONFIG / ~/.kube/config) or the in-cluster service account. Everything
is found by the chart's labels (``app.kubernetes.io/part-of=picospec``, ``component``,
``instance``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from picospec.tools.promtext import Scrape

EDGE_LABEL = "node-role.kubernetes.io/edge"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
EDGE_COMPONENTS = ("drafter", "sampler", "leafnode", "edge-agent")
SITE_LABEL = "picospec.io/site"  # the chart's `sites`: on nodes and on per-site pods
LEAF_TLS_ANNOTATION = "picospec.io/leaf-tls"  # off | server | mutual, on leaf-node pods
HUB_MONITOR_PORT = 8222


# --------------------------------------------------------------------------- data


@dataclass
class PodView:
    name: str
    component: str
    node: str | None
    phase: str
    ready: bool
    restarts: int
    gpus: int = 0
    gpu_product: str | None = None
    sessions: float | None = None
    queue_depth: float | None = None


@dataclass
class EdgeSite:
    node: str
    ready: bool
    address: str | None
    pods: list[PodView] = field(default_factory=list)
    site: str | None = None  # the chart's site (node label picospec.io/site), else the node
    leaf_connected: bool | None = None  # the hub lists this node's leaf node (None: unknown)
    leaf_tls: str | None = None  # off | server | mutual (the leaf-node pod's annotation)


@dataclass
class Autoscaler:
    kind: str  # HorizontalPodAutoscaler | ScaledObject
    name: str
    min_replicas: int | None
    max_replicas: int | None
    current_replicas: int | None = None
    desired_replicas: int | None = None
    state: str = ""
    metrics: list[str] = field(default_factory=list)


@dataclass
class Status:
    namespace: str
    release: str | None
    edge_sites: list[EdgeSite]
    verifiers: list[PodView]
    verifier_deployment: str | None
    replicas: dict[str, int | None]
    autoscalers: list[Autoscaler]
    other_pods: list[PodView]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- client


def load_client(kubeconfig: str | None, context: str | None) -> tuple[Any, str | None]:
    """Configure the kubernetes client; returns (ApiClient, the context's namespace)."""
    from kubernetes import client, config

    namespace = None
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        if os.path.exists(ns_file):
            with open(ns_file) as f:
                namespace = f.read().strip()
    else:
        config.load_kube_config(config_file=kubeconfig, context=context)
        try:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                active = next((c for c in contexts if c["name"] == context), active)
            namespace = (active or {}).get("context", {}).get("namespace")
        except config.ConfigException:
            namespace = None
    return client.ApiClient(), namespace


def _selector(release: str | None, component: str | None = None) -> str:
    parts = ["app.kubernetes.io/part-of=picospec"]
    if release:
        parts.append(f"app.kubernetes.io/instance={release}")
    if component:
        parts.append(f"app.kubernetes.io/component={component}")
    return ",".join(parts)


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def _node_ready(node: Any) -> bool:
    conds = node.status.conditions or [] if node.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def _gpus(pod: Any, resource: str = GPU_RESOURCE) -> int:
    total = 0
    for c in pod.spec.containers:
        limits = (c.resources.limits if c.resources else None) or {}
        requests = (c.resources.requests if c.resources else None) or {}
        total += int(limits.get(resource) or requests.get(resource) or 0)
    return total


def _http_port(pod: Any) -> int | None:
    for c in pod.spec.containers:
        for p in c.ports or []:
            if p.name == "http":
                return int(p.container_port)
    return None


def pod_metrics(core: Any, namespace: str, pod: Any) -> str | None:
    """A pod's /metrics through the API server's pod proxy; None when unreachable."""
    port = _http_port(pod)
    if port is None or not _ready(pod):
        return None
    try:
        return core.connect_get_namespaced_pod_proxy_with_path(
            f"{pod.metadata.name}:{port}", namespace, "metrics", _request_timeout=5
        )
    except Exception:  # noqa: BLE001 - an unreachable pod (e.g. on the edge) is not an error
        return None


def hub_leaf_names(core: Any, namespace: str, pods: list[Any]) -> set[str] | None:
    """Server names (the edge nodes' names) of the leaf nodes connected to the chart's NATS
    hub, from each hub pod's /leafz (monitor port, through the API server's pod proxy); None
    when no hub pod answers."""
    names: set[str] | None = None
    for pod in pods:
        labels = pod.metadata.labels or {}
        if labels.get("app.kubernetes.io/component") != "nats" or not _ready(pod):
            continue
        try:
            # raw bytes: the client would turn a JSON body into a Python repr for 'str'
            resp = core.connect_get_namespaced_pod_proxy_with_path(
                f"{pod.metadata.name}:{HUB_MONITOR_PORT}",
                namespace,
                "leafz",
                _request_timeout=5,
                _preload_content=False,
            )
            doc = json.loads(resp.data)
        except Exception:  # noqa: BLE001 - an unreachable hub leaves the state unknown
            continue
        names = (names or set()) | {x.get("name", "") for x in doc.get("leafs") or []}
    return names


def _view(pod: Any, nodes: dict[str, Any]) -> PodView:
    labels = pod.metadata.labels or {}
    node = nodes.get(pod.spec.node_name or "")
    restarts = sum(s.restart_count for s in (pod.status.container_statuses or []))
    return PodView(
        name=pod.metadata.name,
        component=labels.get("app.kubernetes.io/component", "?"),
        node=pod.spec.node_name,
        phase=pod.status.phase or "Unknown",
        ready=_ready(pod),
        restarts=restarts,
        gpus=_gpus(pod),
        gpu_product=(node.metadata.labels or {}).get(GPU_PRODUCT_LABEL) if node else None,
    )


def _verifier_deployments(apps: Any, namespace: str, release: str | None) -> list[Any]:
    return apps.list_namespaced_deployment(
        namespace, label_selector=_selector(release, "verifier")
    ).items


def _hpas_for(autoscaling: Any, namespace: str, deployment: str) -> list[Any]:
    return [
        h
        for h in autoscaling.list_namespaced_horizontal_pod_autoscaler(namespace).items
        if h.spec.scale_target_ref.kind == "Deployment"
        and h.spec.scale_target_ref.name == deployment
    ]


def _scaled_objects_for(custom: Any, namespace: str, deployment: str) -> list[dict[str, Any]]:
    from kubernetes.client.exceptions import ApiException

    try:
        items = custom.list_namespaced_custom_object(
            "keda.sh", "v1alpha1", namespace, "scaledobjects"
        )["items"]
    except ApiException as e:
        if e.status == 404:  # KEDA is not installed
            return []
        raise
    return [s for s in items if s["spec"]["scaleTargetRef"].get("name") == deployment]


def _autoscalers(
    autoscaling: Any, custom: Any, namespace: str, deployment: str
) -> list[Autoscaler]:
    """What scales the verifier Deployment: KEDA ScaledObjects and HorizontalPodAutoscalers."""
    autoscalers: list[Autoscaler] = []
    for so in _scaled_objects_for(custom, namespace, deployment):
        conds = {c["type"]: c.get("status") for c in so.get("status", {}).get("conditions", [])}
        autoscalers.append(
            Autoscaler(
                kind="ScaledObject",
                name=so["metadata"]["name"],
                min_replicas=so["spec"].get("minReplicaCount"),
                max_replicas=so["spec"].get("maxReplicaCount"),
                state=", ".join(f"{k}={v}" for k, v in sorted(conds.items())),
                metrics=[t["metadata"].get("query", t["type"]) for t in so["spec"]["triggers"]],
            )
        )
    for h in _hpas_for(autoscaling, namespace, deployment):
        conds = {c.type: c.status for c in (h.status.conditions or [])} if h.status else {}
        owner = next(
            (o.kind for o in (h.metadata.owner_references or []) if o.kind == "ScaledObject"),
            None,
        )
        autoscalers.append(
            Autoscaler(
                kind="HorizontalPodAutoscaler" + (" (KEDA)" if owner else ""),
                name=h.metadata.name,
                min_replicas=h.spec.min_replicas,
                max_replicas=h.spec.max_replicas,
                current_replicas=h.status.current_replicas if h.status else None,
                desired_replicas=h.status.desired_replicas if h.status else None,
                state=", ".join(f"{k}={v}" for k, v in sorted(conds.items())),
                metrics=[_metric_name(m) for m in (h.spec.metrics or [])],
            )
        )
    return autoscalers


def collect(api_client: Any, namespace: str, release: str | None, metrics: bool = True) -> Status:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    apps = client.AppsV1Api(api_client)
    autoscaling = client.AutoscalingV2Api(api_client)
    custom = client.CustomObjectsApi(api_client)

    nodes = {n.metadata.name: n for n in core.list_node().items}
    pods = core.list_namespaced_pod(namespace, label_selector=_selector(release)).items
    views = {p.metadata.name: _view(p, nodes) for p in pods}

    leafs = hub_leaf_names(core, namespace, pods) if metrics else None
    sites = []
    for name, node in sorted(nodes.items()):
        if EDGE_LABEL not in (node.metadata.labels or {}):
            continue
        address = (
            next((a.address for a in (node.status.addresses or []) if a.type == "InternalIP"), None)
            if node.status
            else None
        )
        site = EdgeSite(node=name, ready=_node_ready(node), address=address)
        site.pods = sorted(
            (v for v in views.values() if v.node == name and v.component in EDGE_COMPONENTS),
            key=lambda v: v.component,
        )
        site.site = (node.metadata.labels or {}).get(SITE_LABEL)
        for pod in pods:
            if (
                pod.spec.node_name == name
                and (pod.metadata.labels or {}).get("app.kubernetes.io/component") == "leafnode"
            ):
                site.site = site.site or (pod.metadata.labels or {}).get(SITE_LABEL)
                site.leaf_tls = (pod.metadata.annotations or {}).get(LEAF_TLS_ANNOTATION, "off")
                if leafs is not None:
                    site.leaf_connected = name in leafs
        sites.append(site)

    verifiers = []
    for pod in pods:
        v = views[pod.metadata.name]
        if v.component != "verifier":
            continue
        text = pod_metrics(core, namespace, pod) if metrics else None
        if text is not None:
            scrape = Scrape(text)
            v.sessions = scrape.sum("picospec_active_sessions")
            v.queue_depth = scrape.sum("picospec_verify_queue_depth")
        verifiers.append(v)
    verifiers.sort(key=lambda v: v.name)

    deployments = _verifier_deployments(apps, namespace, release)
    dep = deployments[0] if len(deployments) == 1 else None
    replicas: dict[str, int | None] = {}
    autoscalers: list[Autoscaler] = []
    if dep is not None:
        replicas = {
            "desired": dep.spec.replicas,
            "ready": dep.status.ready_replicas or 0,
            "updated": dep.status.updated_replicas or 0,
        }
        autoscalers = _autoscalers(autoscaling, custom, namespace, dep.metadata.name)
    others = sorted(
        (v for v in views.values() if v.component not in EDGE_COMPONENTS + ("verifier",)),
        key=lambda v: (v.component, v.name),
    )
    return Status(
        namespace=namespace,
        release=release,
        edge_sites=sites,
        verifiers=verifiers,
        verifier_deployment=dep.metadata.name if dep is not None else None,
        replicas=replicas,
        autoscalers=autoscalers,
        other_pods=others,
    )


def _metric_name(m: Any) -> str:
    for kind in ("pods", "object", "external"):
        src = getattr(m, kind, None)
        if src is not None:
            return f"{kind}:{src.metric.name}"
    if m.resource is not None:
        return f"resource:{m.resource.name}"
    return m.type


# --------------------------------------------------------------------------- output


def _yes(b: bool) -> str:
    return "yes" if b else "NO"


def _num(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def render_text(s: Status) -> str:
    lines = [
        f"PicoSpec in namespace {s.namespace}" + (f", release {s.release}" if s.release else "")
    ]
    lines.append("")
    lines.append(f"Edge sites ({len(s.edge_sites)} KubeEdge node(s))")
    if not s.edge_sites:
        lines.append(f"  none: no node labelled {EDGE_LABEL}")
    by_site: dict[str, list[EdgeSite]] = {}
    for site in s.edge_sites:
        if site.site:
            by_site.setdefault(site.site, []).append(site)
    for name, members in sorted(by_site.items()):
        up = sum(1 for m in members if m.leaf_connected)
        tls = sorted({m.leaf_tls or "?" for m in members})
        known = all(m.leaf_connected is not None for m in members)
        lines.append(
            f"  site {name}: {len(members)} node(s), leaf links up "
            f"{up if known else '?'}/{len(members)}, TLS {'/'.join(tls)}"
        )
    for site in s.edge_sites:
        leaf = {True: "connected", False: "DISCONNECTED", None: "?"}[site.leaf_connected]
        lines.append(
            f"  {site.node}  ready={_yes(site.ready)}  address={site.address or '?'}"
            + (f"  site={site.site}" if site.site else "")
            + f"  leaf={leaf}  tls={site.leaf_tls or '?'}"
        )
        have = {p.component for p in site.pods}
        for p in site.pods:
            lines.append(
                f"    {p.component:<10} {p.name:<44} {p.phase:<9} ready={_yes(p.ready)}"
                f"  restarts={p.restarts}"
            )
        for missing in ("drafter", "sampler", "leafnode"):
            if missing not in have:
                lines.append(f"    {missing:<10} (none on this node)")
    lines.append("")
    rep = s.replicas
    head = f"Verifiers ({s.verifier_deployment or 'no Deployment found'})"
    if rep:
        head += f": {rep['ready']}/{rep['desired'] if rep['desired'] is not None else '?'} ready"
    lines.append(head)
    if s.verifiers:
        lines.append(
            f"  {'POD':<44} {'NODE':<24} {'GPUS':>4} {'GPU':<26} {'READY':<5} {'SESSIONS':>8}"
            f" {'QUEUE':>5}"
        )
    for v in s.verifiers:
        lines.append(
            f"  {v.name:<44} {v.node or '-':<24} {v.gpus:>4} {v.gpu_product or '-':<26}"
            f" {_yes(v.ready):<5} {_num(v.sessions):>8} {_num(v.queue_depth):>5}"
        )
    total = sum(v.sessions or 0 for v in s.verifiers)
    if s.verifiers:
        lines.append(f"  sessions held in total: {total:g}")
    lines.append("")
    if not s.autoscalers:
        lines.append("Autoscaling: none (replicas set on the Deployment)")
    for a in s.autoscalers:
        cur = (
            f", current {a.current_replicas}, desired {a.desired_replicas}"
            if a.current_replicas is not None
            else ""
        )
        lines.append(
            f"Autoscaling: {a.kind} {a.name}: min {a.min_replicas}, max {a.max_replicas}{cur}"
        )
        if a.state:
            lines.append(f"  state: {a.state}")
        for m in a.metrics:
            lines.append(f"  on: {m}")
    if s.other_pods:
        lines.append("")
        lines.append("Other pods")
        for p in s.other_pods:
            lines.append(
                f"  {p.component:<10} {p.name:<44} {p.phase:<9} ready={_yes(p.ready)}"
                f"  node={p.node or '-'}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- scaling


def scale_verifiers(api_client: Any, namespace: str, release: str | None, n: int) -> str:
    """Set the verifier count, or the owning autoscaler's minimum. Returns what was done."""
    from kubernetes import client

    if n < 0:
        raise ValueError("the replica count cannot be negative")
    apps = client.AppsV1Api(api_client)
    deployments = _verifier_deployments(apps, namespace, release)
    if not deployments:
        raise LookupError(
            f"no PicoSpec verifier Deployment in namespace {namespace}"
            + (f" for release {release}" if release else "")
        )
    if len(deployments) > 1:
        names = ", ".join(
            d.metadata.labels.get("app.kubernetes.io/instance", "?") for d in deployments
        )
        raise LookupError(f"several releases have verifiers ({names}): choose one with --release")
    name = deployments[0].metadata.name
    custom = client.CustomObjectsApi(api_client)
    for so in _scaled_objects_for(custom, namespace, name):
        high = so["spec"].get("maxReplicaCount")
        if n < 1 or (high is not None and n > high):
            raise ValueError(f"KEDA ScaledObject {so['metadata']['name']} allows 1..{high}")
        custom.patch_namespaced_custom_object(
            "keda.sh",
            "v1alpha1",
            namespace,
            "scaledobjects",
            so["metadata"]["name"],
            {"spec": {"minReplicaCount": n}},
        )
        return (
            f"ScaledObject {so['metadata']['name']}: minReplicaCount={n} (KEDA owns the replica "
            "count; `helm upgrade` resets it to verifier.autoscaling.minReplicas)"
        )
    autoscaling = client.AutoscalingV2Api(api_client)
    for h in _hpas_for(autoscaling, namespace, name):
        if n < 1 or n > h.spec.max_replicas:
            raise ValueError(f"HPA {h.metadata.name} allows 1..{h.spec.max_replicas}")
        autoscaling.patch_namespaced_horizontal_pod_autoscaler(
            h.metadata.name, namespace, {"spec": {"minReplicas": n}}
        )
        return (
            f"HorizontalPodAutoscaler {h.metadata.name}: minReplicas={n} (the HPA owns the "
            "replica count; `helm upgrade` resets it to verifier.autoscaling.minReplicas)"
        )
    apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": n}})
    return f"Deployment {name}: replicas={n}"


# --------------------------------------------------------------------------- command line


def cmd_cluster(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    try:
        api_client, ctx_ns = load_client(args.kubeconfig, args.context)
    except (ConfigException, OSError) as e:
        print(f"picospec cluster: no cluster configuration: {e}", file=sys.stderr)
        return 2
    namespace = args.namespace or ctx_ns or "default"
    try:
        if args.cluster_command == "status":
            status = collect(api_client, namespace, args.release, metrics=not args.no_metrics)
            print(json.dumps(status.to_dict(), indent=2) if args.json else render_text(status))
            return 0
        print(scale_verifiers(api_client, namespace, args.release, args.replicas))
        return 0
    except ApiException as e:
        reason = e.reason or ""
        print(f"picospec cluster: API server: {e.status} {reason}".rstrip(), file=sys.stderr)
        return 1
    except (LookupError, ValueError) as e:
        print(f"picospec cluster: {e}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cluster`` (``status``, ``scale-verifiers``) to the ``picospec`` command line."""
    p = subparsers.add_parser(
        "cluster",
        help="the deployment in Kubernetes: status, scale-verifiers",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's)")
    p.add_argument("--release", default=None, help="Helm release (default: every PicoSpec release)")
    sub = p.add_subparsers(dest="cluster_command", required=True)
    s = sub.add_parser("status", help="edge sites, verifiers and their sessions, autoscaling")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-metrics", action="store_true", help="do not read the verifiers' /metrics")
    sc = sub.add_parser(
        "scale-verifiers",
        help="set the verifier replica count (or the autoscaler's minimum when it is on)",
    )
    sc.add_argument("replicas", type=int)
    p.set_defaults(func=cmd_cluster)
