"""``picospec cluster status`` with the chart's `sites`: each site, its nodes' leaf links as the
real hub reports them (/leafz of a nats-server running the chart's rendered hub and leaf-node
configs, read through the stand-in API server's pod proxy) and whether the links use TLS."""

from __future__ import annotations

import base64
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("helm_python")

import chartnats
import test_cluster as tc
from picospec.tools.stack.natsserver import free_ports
from picospec.tools.stack.procs import terminate_all, wait_until


@pytest.fixture
def sites_api(tmp_path: Path, monkeypatch):
    hub_port, leaf_port, hub_mon, edge_port, edge_mon = free_ports(5)
    values = {
        "sites": [{"name": "a"}, {"name": "b"}],
        "cloudNats": {"ports": {"client": hub_port, "leafnodes": leaf_port, "monitor": hub_mon}},
        "leafNode": {
            "ports": {"client": edge_port, "monitor": edge_mon},
            "hubUrls": [f"nats-leaf://127.0.0.1:{leaf_port}"],
        },
    }
    objs = tc.rendered(values)
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
        for o in objs
        if o["kind"] == "Secret"
    }

    def one(kind: str, comp: str, site: str | None = None) -> dict[str, Any]:
        return next(
            o for o in objs
            if o["kind"] == kind and o["metadata"]["labels"]["app.kubernetes.io/component"] == comp
            and o["metadata"]["labels"].get("picospec.io/site") == site
        )  # fmt: skip

    procs = []
    hub = one("StatefulSet", "nats")
    auth = chartnats.run_auth_init(hub, secrets, tmp_path / "hub")
    conf = one("ConfigMap", "nats")["data"]["nats.conf"]
    procs.append(chartnats.start_nats(chartnats.local_conf(conf, auth.parent), {"POD_NAME": "h"}))
    leaf = one("DaemonSet", "leafnode", "a")
    auth = chartnats.run_auth_init(leaf, secrets, tmp_path / "leaf-a")
    conf = one("ConfigMap", "leafnode", "a")["data"]["nats.conf"]
    path = chartnats.local_conf(conf, auth.parent)
    procs.append(chartnats.start_nats(path, {"NODE_NAME": "edge-a1"}))
    chartnats.wait_ports(hub_port, hub_mon, edge_port)

    def leafz() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{hub_mon}/leafz") as r:
            return r.read()

    wait_until(lambda: b"edge-a1" in leafz(), 20, "the leaf link (edge-a1 in /leafz)", interval=0.2)

    # the stand-in API server: site-labelled nodes and the per-site pods; the hub pod's
    # monitor port proxied to the real hub (whose monitor listens on hub_mon)
    monkeypatch.setattr(tc, "rendered", lambda _values: objs)
    monkeypatch.setattr("picospec.tools.cluster.HUB_MONITOR_PORT", hub_mon)
    state = tc.FakeApi({})
    state.nodes = [
        tc.node("edge-a1", {"node-role.kubernetes.io/edge": "", "picospec.io/site": "a"}),
        tc.node("edge-b1", {"node-role.kubernetes.io/edge": "", "picospec.io/site": "b"}),
        tc.node("cpu-1", {}),
    ]
    state.pods = [
        tc.pod_from(one("DaemonSet", "leafnode", "a"), "x1", "edge-a1"),
        tc.pod_from(one("DaemonSet", "drafter", "a"), "x1", "edge-a1"),
        tc.pod_from(one("DaemonSet", "leafnode", "b"), "x1", "edge-b1"),
        tc.pod_from(hub, "0", "cpu-1"),
    ]
    for p in state.pods:  # pod_from copies labels only; the API serves annotations too
        owner = max(
            (o for o in objs if o["kind"] in ("DaemonSet", "StatefulSet")
             and p["metadata"]["name"].startswith(o["metadata"]["name"])),
            key=lambda o: len(o["metadata"]["name"]),
        )  # fmt: skip
        p["metadata"]["annotations"] = owner["spec"]["template"]["metadata"].get("annotations", {})
    handler = tc.make_handler(state)
    base_get = handler.do_GET

    def do_get(self) -> None:
        if unquote(self.path.split("?")[0]).endswith(f"-0:{hub_mon}/proxy/leafz"):
            body = urllib.request.urlopen(f"http://127.0.0.1:{hub_mon}/leafz").read().decode()
            return self._send(200, body)
        return base_get(self)

    handler.do_GET = do_get
    monkeypatch.setattr(tc, "make_handler", lambda _state: handler)
    yield state
    terminate_all(procs, 10)


def test_status_shows_each_site_its_leaf_link_and_tls(sites_api, tmp_path) -> None:
    import threading
    from http.server import ThreadingHTTPServer

    import yaml

    server = ThreadingHTTPServer(("127.0.0.1", 0), tc.make_handler(sites_api))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": tc.NS}}
        ],
    }))  # fmt: skip
    try:
        code, out, err = tc.run_cli("cluster", "--kubeconfig", str(kubeconfig), "status")
    finally:
        server.shutdown()
    assert code == 0, err
    assert "site a: 1 node(s), leaf links up 1/1, TLS off" in out, out
    assert "site b: 1 node(s), leaf links up 0/1, TLS off" in out, out
    a1 = next(x for x in out.splitlines() if x.strip().startswith("edge-a1"))
    b1 = next(x for x in out.splitlines() if x.strip().startswith("edge-b1"))
    assert "site=a" in a1 and "leaf=connected" in a1 and "tls=off" in a1, a1
    assert "site=b" in b1 and "leaf=DISCONNECTED" in b1, b1
