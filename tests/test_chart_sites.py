"""Edge sites over the public internet: the chart's TLS and per-site identities, proven on real
processes.

The chart is rendered (Helm's engine) with two sites and TLS on (mutual TLS on the leaf link);
the rendered hub and both sites' leaf-node configs run on real ``nats-server`` processes, with
their logins written by the pods' own nats-auth init container script from the generated
Secrets, and certificates made here (``make_pki``, as an operator's Secrets would
hold them). Then: each site is confined to its own verdict and inbox subjects (also against a
compromised edge node, i.e. a leaf node of the attacker's own configuration holding the site's
leaf login), leaf nodes and clients without TLS or with another CA's certificate are refused,
and a full request completes through each site with the real verifier, samplers and drafters
started from the rendered containers' environment (credentials read from the mounted files).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("helm_python")

import chartnats
from picospec.config import Settings
from picospec.services.shell import nats_options
from picospec.tools.stack.natsserver import free_ports, make_pki
from picospec.tools.stack.procs import http_ready, spawn, terminate_all, wait_until
from test_chart import COMBOS, find, render

SITES = ("a", "b")


# --------------------------------------------------------------------------- rendering


def test_sites_render_per_site_workloads_secrets_and_confined_leaf_users() -> None:
    values = COMBOS["sites-tls-cert-manager"]
    objs = render(values)
    for comp in ("drafter", "sampler", "leafnode"):
        by_site = {
            o["metadata"]["labels"]["picospec.io/site"]: o for o in find(objs, "DaemonSet", comp)
        }
        assert set(by_site) == {"store-a", "store-b"}, comp
        for site, ds in by_site.items():
            spec = ds["spec"]["template"]["spec"]
            want = (
                {"picospec.io/site": "store-a"} if site == "store-a" else {"example.com/store": "b"}
            )
            assert want.items() <= spec["nodeSelector"].items(), (comp, site)
            assert ds["spec"]["selector"]["matchLabels"]["picospec.io/site"] == site
            if comp != "leafnode":
                env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
                assert env["PICOSPEC_SITE"] == site
                vol = next(v for v in spec["volumes"] if v["name"] == "nats-auth")
                assert vol["secret"]["secretName"] == f"ps-picospec-nats-auth-{site}"
    secrets = {s["metadata"]["name"]: s for s in find(objs, "Secret")}
    assert set(secrets) == {
        "ps-picospec-nats-auth",
        "ps-picospec-nats-auth-store-a",
        "ps-picospec-nats-auth-store-b",
    }
    site_data = {
        k: base64.b64decode(v).decode()
        for k, v in secrets["ps-picospec-nats-auth-store-a"]["data"].items()
    }
    assert site_data["leaf-user"] == "leaf-store-a" and site_data["drafter-user"] == "drafter"
    assert set(secrets["ps-picospec-nats-auth"]["data"]) == {
        "verifier-user", "verifier-password", "sampler-user", "sampler-password"
    }  # fmt: skip
    hub = find(objs, "ConfigMap", "nats")[0]["data"]["nats.conf"]
    for site in ("store-a", "store-b"):
        var = site.upper().replace("-", "_")
        line = next(x for x in hub.splitlines() if f"$PICOSPEC_LEAF_{var}_USER" in x)
        assert f'"picospec.v1.verdict.{site}.>"' in line and f'"_INBOX.{site}.>"' in line
        assert "verdict.*" not in line and '"LEAFNODE"' in line
    assert "verify: true" in hub and hub.count("tls {") == 2
    # cert-manager: the hub's certificate names what leaf nodes dial; one client cert per site
    certs = {c["metadata"]["name"]: c["spec"] for c in find(objs, "Certificate")}
    hub_cert = certs["ps-picospec-nats"]
    assert hub_cert["secretName"] == "ps-picospec-nats-tls"
    assert "nats-hub.example.com" in hub_cert["dnsNames"]
    assert "ps-picospec-nats.serving.svc" in hub_cert["dnsNames"]
    assert hub_cert["ipAddresses"] == ["203.0.113.7"]
    assert hub_cert["issuerRef"] == {
        "name": "picospec-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"
    }  # fmt: skip
    for site in ("store-a", "store-b"):
        c = certs[f"ps-picospec-leafnode-{site}"]
        assert c["secretName"] == f"ps-picospec-leaf-tls-{site}"
        assert "client auth" in c["usages"] and c["privateKey"]["rotationPolicy"] == "Always"
    mounted = {
        v["secret"]["secretName"]
        for o in find(objs, "DaemonSet", "leafnode")
        for v in o["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "nats-tls"
    }
    assert mounted == {"ps-picospec-leaf-tls-store-a", "ps-picospec-leaf-tls-store-b"}
    (verifier,) = find(objs, "Deployment", "verifier")
    env = {
        e["name"]: e.get("value")
        for e in verifier["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PICOSPEC_NATS_TLS_CA"] == "/etc/picospec/nats-tls/ca.crt"
    # without cert-manager: no Certificate, the Secrets named in values are mounted
    own = render(COMBOS["sites-tls-own-secrets"])
    assert not find(own, "Certificate")
    assert {s["metadata"]["name"] for s in find(own, "Secret")} == {
        "ps-picospec-nats-auth", "ps-picospec-nats-auth-b"
    }  # fmt: skip
    (leaf_a,) = [
        o for o in find(own, "DaemonSet", "leafnode") if o["metadata"]["name"].endswith("-a")
    ]
    vols = {v["name"]: v for v in leaf_a["spec"]["template"]["spec"]["volumes"]}
    assert vols["nats-tls"]["secret"]["secretName"] == "site-a-tls"
    names = {s["secret"]["name"] for s in vols["nats-secrets"]["projected"]["sources"]}
    assert names == {"site-a-nats"}  # an edge node mounts its own site's Secret only


def test_without_sites_the_single_site_layout_stays() -> None:
    objs = render({})
    for comp in ("drafter", "sampler", "leafnode"):
        (ds,) = find(objs, "DaemonSet", comp)
        assert ds["metadata"]["name"] == f"ps-picospec-{comp}"
        assert "picospec.io/site" not in ds["spec"]["selector"]["matchLabels"]
    assert not find(objs, "Certificate")
    conf = find(objs, "ConfigMap", "nats")[0]["data"]["nats.conf"]
    assert "tls {" not in conf and "$PICOSPEC_LEAF_USER" in conf


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sites": [{"name": "a"}], "leafNode": {"enabled": False}}, "leafNode.enabled"),
        ({"sites": [{"name": "a"}, {"name": "a"}]}, "listed twice"),
        ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "issuerRef.name"),
    ],
)
def test_bad_site_and_tls_values_fail_with_a_clear_message(values, message) -> None:
    import helm_python as helm

    with pytest.raises(helm.errors.HelmError, match=re.escape(message)):  # type: ignore[attr-defined]
        render(values)


def test_connect_nats_reads_the_password_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("drafter\n")
    (tmp_path / "password").write_text("pSecret123\n")
    s = Settings(
        nats_user_file=str(tmp_path / "user"), nats_password_file=str(tmp_path / "password")
    )
    opts = nats_options(s)
    assert opts["user"] == "drafter" and opts["password"] == "pSecret123"
    assert "pSecret123" not in repr(s)
    with pytest.raises(ValueError, match="nats_password_file needs"):
        nats_options(Settings(nats_password_file=str(tmp_path / "password")))


# --------------------------------------------------------------------------- real processes


def _b64(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def _tls_secret(pki: Any, server: bool) -> dict[str, str]:
    cert, key = (pki.server_cert, pki.server_key) if server else (pki.client_cert, pki.client_key)
    return {"tls.crt": cert.read_text(), "tls.key": key.read_text(), "ca.crt": pki.ca.read_text()}


class Rendered:
    """The chart rendered for this machine: two sites, TLS with mutual TLS on the leaf link,
    free ports, and each site's leaf node on its own client port (one render per site: the
    ports are chart-wide values)."""

    def __init__(self, tmp: Path) -> None:
        (self.hub_port, self.leaf_port, self.hub_mon, self.port_a, self.mon_a, self.port_b,
         self.mon_b) = free_ports(7)  # fmt: skip
        self.tmp = tmp
        self.pki = make_pki(tmp / "pki")
        self.other = make_pki(tmp / "other-ca")  # a CA the hub does not trust
        self.objs = {}
        for site, (port, mon) in {
            "a": (self.port_a, self.mon_a),
            "b": (self.port_b, self.mon_b),
        }.items():
            self.objs[site] = render(self.values(port, mon))
        objs = self.objs["a"]
        # the generated Secrets of one render (real random passwords), the operator's TLS ones
        self.secrets = {s["metadata"]["name"]: _b64(s) for s in find(objs, "Secret")}
        self.secrets["hub-tls"] = _tls_secret(self.pki, server=True)
        for site in SITES:
            self.secrets[f"ps-picospec-leaf-tls-{site}"] = _tls_secret(self.pki, server=False)

    def values(self, port: int, mon: int) -> dict[str, Any]:
        return {
            "sites": [{"name": s} for s in SITES],
            "tls": {"enabled": True, "mutualLeafnodes": True, "hub": {"secretName": "hub-tls"}},
            "cloudNats": {
                "ports": {
                    "client": self.hub_port,
                    "leafnodes": self.leaf_port,
                    "monitor": self.hub_mon,
                }
            },
            "leafNode": {
                "ports": {"client": port, "monitor": mon},
                "hubUrls": [f"nats-leaf://127.0.0.1:{self.leaf_port}"],
            },
        }

    def site_obj(self, site: str, kind: str, comp: str) -> dict[str, Any]:
        (obj,) = [
            o for o in find(self.objs[site], kind, comp)
            if o["metadata"]["labels"].get("picospec.io/site") == site
        ]  # fmt: skip
        return obj

    def start_server(self, obj: dict[str, Any], conf: str, name: str, env: dict[str, str]):
        pod = self.tmp / name
        auth = chartnats.run_auth_init(obj, self.secrets, pod)
        spec = chartnats.pod_spec(obj)
        tls = chartnats.write_secret_volume(
            chartnats.volume(spec, "nats-tls"), self.secrets, pod / "tls"
        )
        path = chartnats.local_conf(conf, auth.parent, tls)
        return chartnats.start_nats(path, env, log=pod / "nats.log")

    def service_env(self, obj: dict[str, Any], name: str, port: int, model: str) -> dict[str, str]:
        """A service container's rendered environment, run here: the mounted Secret files
        written under tmp, its own port, the tiny model."""
        spec = chartnats.pod_spec(obj)
        (c,) = spec["containers"]
        pod = self.tmp / name
        files = {}
        for m in c["volumeMounts"]:
            if m["name"] in ("nats-auth", "nats-tls"):
                vol = chartnats.volume(spec, m["name"])
                files[m["mountPath"]] = chartnats.write_secret_volume(
                    vol, self.secrets, pod / m["name"]
                )
        env = {"POD_NAME": name, "NODE_NAME": f"node-{name}", "HOST_IP": "127.0.0.1"}
        for e in c["env"]:
            if "value" in e:
                value = e["value"].replace("$(NODE_NAME)", env["NODE_NAME"])
                for mount, d in files.items():
                    value = value.replace(mount, str(d))
                env[e["name"]] = value
        assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in c["env"])
        assert "PICOSPEC_NATS_PASSWORD" not in env and "PICOSPEC_NATS_PASSWORD_FILE" in env
        env["PICOSPEC_NATS_URL"] = re.sub(r"//[^:/]+:", "//127.0.0.1:", env["PICOSPEC_NATS_URL"])
        env.update(
            PICOSPEC_HOST="127.0.0.1",
            PICOSPEC_PORT=str(port),
            PICOSPEC_MODEL=model,
            PICOSPEC_THREADS="1",
            PICOSPEC_VERIFY_TIMEOUT_S="5",
            PICOSPEC_REQUEST_TIMEOUT_S="60",
            HF_HOME=str(self.tmp / "hf"),
            HOME=str(self.tmp),
            XDG_CACHE_HOME=str(self.tmp / "cache"),
            PATH=os.environ["PATH"],
            PYTHONUNBUFFERED="1",
        )
        return env


def _leafz(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/leafz", timeout=2) as r:
        return json.loads(r.read()).get("leafs") or []


def _ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _rogue_leaf_conf(r: Rendered, port: int, login: tuple[str, str] | None, tls: str) -> str:
    """A leaf node of an attacker's own making on a compromised edge node of site a: no local
    authorization at all, holding site a's leaf login (and, for ``tls``: "site" the site's
    certificate, "other" a certificate of another CA, "none" no TLS)."""
    auth = f"{login[0]}:{login[1]}@" if login else ""
    block = {
        "site": f', tls {{ ca_file: "{r.pki.ca}", cert_file: "{r.pki.client_cert}", '
        f'key_file: "{r.pki.client_key}", timeout: 5 }}',
        "other": f', tls {{ ca_file: "{r.pki.ca}", cert_file: "{r.other.client_cert}", '
        f'key_file: "{r.other.client_key}", timeout: 5 }}',
        "none": "",
    }[tls]
    return (
        f'listen: "127.0.0.1:{port}"\nserver_name: rogue-{tls}{"-login" if login else ""}\n'
        f'leafnodes {{ reconnect: "1s", remotes = [ {{ urls: ["nats-leaf://{auth}127.0.0.1:'
        f'{r.leaf_port}"] {block} }} ] }}\n'
    )


def test_two_sites_with_tls_on_real_nats_servers_and_services(
    tmp_path: Path, tiny_dirs: tuple[Path, Path]
) -> None:
    import nats

    from picospec.protocol import subjects
    from picospec.tools.stack.natsserver import find_nats_server
    from test_services import chat

    r = Rendered(tmp_path)
    hub_obj = find(r.objs["a"], "StatefulSet", "nats")[0]
    hub_conf = find(r.objs["a"], "ConfigMap", "nats")[0]["data"]["nats.conf"]
    procs: list[subprocess.Popen] = []
    services: dict[str, subprocess.Popen] = {}
    try:
        procs.append(r.start_server(hub_obj, hub_conf, "hub", {"POD_NAME": "hub-0"}))
        chartnats.wait_ports(r.hub_port, r.leaf_port, r.hub_mon)
        for site in SITES:
            obj = r.site_obj(site, "DaemonSet", "leafnode")
            conf = r.site_obj(site, "ConfigMap", "leafnode")["data"]["nats.conf"]
            assert "ca_file" in conf and "cert_file" in conf  # verifies the hub, mutual TLS
            procs.append(r.start_server(obj, conf, f"leaf-{site}", {"NODE_NAME": f"edge-{site}"}))
        chartnats.wait_ports(r.port_a, r.port_b)
        wait_until(lambda: len(_leafz(r.hub_mon)) == 2, 20, "both sites' leaf links", interval=0.2)
        leafs = {x["name"]: x for x in _leafz(r.hub_mon)}
        assert set(leafs) == {"edge-a", "edge-b"}

        # leaf nodes without TLS, with another CA's certificate, or without a login: refused
        rogue_ports = free_ports(4)
        rogues = {}
        site_a = r.secrets["ps-picospec-nats-auth-a"]
        login = (site_a["leaf-user"], site_a["leaf-password"])
        for (tls, with_login), port in zip(
            [("none", True), ("other", True), ("site", False), ("site", True)],
            rogue_ports,
            strict=True,
        ):
            path = tmp_path / f"rogue-{tls}-{with_login}" / "nats.conf"
            path.parent.mkdir()
            path.write_text(_rogue_leaf_conf(r, port, login if with_login else None, tls))
            rogues[(tls, with_login)] = port
            argv = [str(find_nats_server()), "-c", str(path)]
            procs.append(spawn(argv, path.parent / "nats.log", dict(os.environ), path.parent))
        chartnats.wait_ports(*rogue_ports)
        # only the compromised node's own (valid TLS + site a's login) leaf gets in
        rogue_in = "the rogue leaf with site a's login"
        wait_until(lambda: len(_leafz(r.hub_mon)) == 3, 20, rogue_in, interval=0.2)
        time.sleep(3)  # the refused ones retry every second: give them time to fail
        names = sorted(x["name"] for x in _leafz(r.hub_mon))
        assert names == ["edge-a", "edge-b", "rogue-site-login"], names
        rogue = rogues[("site", True)]

        main = r.secrets["ps-picospec-nats-auth"]
        site = {s: r.secrets[f"ps-picospec-nats-auth-{s}"] for s in SITES}

        async def confinement() -> dict[str, Any]:
            errs: dict[str, list[str]] = {"a": [], "b": []}

            async def on_err(key: str):
                async def cb(e: Exception) -> None:
                    errs[key].append(str(e).lower())

                return cb

            refused: dict[str, str] = {}
            # clients: without TLS, or trusting another CA, cannot talk to the hub
            for what, kw in {
                "plain": {},
                "other-ca": {"tls": _ctx(r.other.ca)},
            }.items():
                try:
                    nc = await nats.connect(
                        f"nats://127.0.0.1:{r.hub_port}", user="verifier",
                        password=main["verifier-password"], allow_reconnect=False,
                        max_reconnect_attempts=0, connect_timeout=3, **kw,
                    )  # fmt: skip
                    await nc.close()
                except Exception as e:  # noqa: BLE001 - nats-py raises several types here
                    refused[what] = f"{type(e).__name__}: {e}"
            verifier = await nats.connect(
                f"nats://127.0.0.1:{r.hub_port}", user=main["verifier-user"],
                password=main["verifier-password"], tls=_ctx(r.pki.ca),
            )  # fmt: skip
            drafters = {}
            for s, port in (("a", r.port_a), ("b", r.port_b)):
                drafters[s] = await nats.connect(
                    f"nats://127.0.0.1:{port}", user=site[s]["drafter-user"],
                    password=site[s]["drafter-password"], inbox_prefix=subjects.inbox_prefix(s),
                    error_cb=await on_err(s),
                )  # fmt: skip
            attacker = await nats.connect(f"nats://127.0.0.1:{rogue}")
            got: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": [], "attacker": []}

            def keep(key: str):
                async def cb(msg: Any) -> None:
                    got[key].append((msg.subject, msg.data))

                return cb

            async def opened(msg: Any) -> None:
                await msg.respond(b"opened")

            await verifier.subscribe(subjects.SESSIONS_OPEN, "verifiers", cb=opened)
            await drafters["a"].subscribe(subjects.site_verdicts("a"), cb=keep("a"))
            await drafters["b"].subscribe(subjects.site_verdicts("b"), cb=keep("b"))
            # site a's drafter reaching for site b: refused by its leaf node
            await drafters["a"].subscribe(subjects.site_verdicts("b"), cb=keep("a"))
            await drafters["a"].subscribe("_INBOX.b.>", cb=keep("a"))
            await drafters["a"].publish(subjects.verdicts("b", "d1"), b"forged-by-drafter")
            # the compromised node's own leaf node: everything, as far as the hub lets it
            await attacker.subscribe(">", cb=keep("attacker"))
            for nc in (verifier, attacker, *drafters.values()):
                await nc.flush()
            for _ in range(50):  # until interest has crossed every leaf link
                try:
                    await drafters["b"].request(subjects.SESSIONS_OPEN, b"{}", timeout=0.5)
                    await drafters["a"].request(subjects.SESSIONS_OPEN, b"{}", timeout=0.5)
                    break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    await asyncio.sleep(0.2)
            got["attacker"].clear()
            got["a"].clear()
            got["b"].clear()
            # traffic of site b: a verdict and a reply to one of its requests
            reply_b = await drafters["b"].request(subjects.SESSIONS_OPEN, b"{}", timeout=5)
            await verifier.publish(subjects.verdicts("b", "d1"), b"verdict-b")
            await verifier.publish(subjects.verdicts("a", "d1"), b"verdict-a")
            # the attacker forging a verdict for site b
            await attacker.publish(subjects.verdicts("b", "d1"), b"forged")
            await attacker.flush()
            await asyncio.sleep(1.0)
            for nc in (verifier, attacker, *drafters.values()):
                await nc.close()
            return {"got": got, "errs": errs, "refused": refused, "reply_b": reply_b.data}

        out = asyncio.run(asyncio.wait_for(confinement(), 90))
        assert set(out["refused"]) == {"plain", "other-ca"}, out["refused"]
        assert out["reply_b"] == b"opened"
        got = out["got"]
        vb, va = (
            (subjects.verdicts("b", "d1"), b"verdict-b"),
            (subjects.verdicts("a", "d1"), b"verdict-a"),
        )
        assert got["b"] == [vb], got  # its verdict, not the forgeries
        assert got["a"] == [va], got  # nothing of site b's
        # the compromised node of site a sees site a's verdict only, not b's verdict or b's
        # reply (its own forgery it sees on its own server only; it never reached site b)
        seen = [m for m in got["attacker"] if m[1] != b"forged"]
        assert va in seen, got  # it does receive what crosses its link...
        for subject, _ in seen:  # ...which is site a's subjects only
            assert subject.startswith(("picospec.v1.verdict.a.", "_INBOX.a.")), got
        assert any("permissions violation for subscription" in e for e in out["errs"]["a"])
        assert any("permissions violation for publish" in e for e in out["errs"]["a"])

        # a full request through each site: real verifier (cloud, TLS), samplers and drafters
        ports = dict(zip(["verifier", "sampler-a", "sampler-b", "drafter-a", "drafter-b"],
                         free_ports(5), strict=True))  # fmt: skip
        target, draft = str(tiny_dirs[0]), str(tiny_dirs[1])
        plan = {"verifier": (find(r.objs["a"], "Deployment", "verifier")[0], "verifier", target)}
        for s in SITES:
            plan[f"sampler-{s}"] = (r.site_obj(s, "DaemonSet", "sampler"), "sampler", draft)
            plan[f"drafter-{s}"] = (r.site_obj(s, "DaemonSet", "drafter"), "drafter", draft)
        for name, (obj, role, model) in plan.items():
            env = r.service_env(obj, name, ports[name], model)
            if role != "verifier":
                assert env["PICOSPEC_SITE"] == name[-1]
            else:
                assert Path(env["PICOSPEC_NATS_TLS_CA"]).read_text() == r.pki.ca.read_text()
            argv = [sys.executable, "-m", "picospec.cli", "--log-level", "INFO", role]
            services[name] = spawn(argv, tmp_path / f"{name}.log", env, tmp_path)

        def ready(name: str) -> bool:
            assert services[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            return http_ready(f"http://127.0.0.1:{ports[name]}/ready")

        wait_until(
            lambda: all(ready(n) for n in services), 240, "the services' readiness", interval=0.2
        )
        for s in SITES:
            status, body = chat(
                f"http://127.0.0.1:{ports[f'drafter-{s}']}/v1", "Hello there", max_tokens=12
            )
            assert status == 200, body
            assert body["usage"]["completion_tokens"] > 0
            # the sampler path too: a sampled request at a high temperature
            status, body = chat(
                f"http://127.0.0.1:{ports[f'drafter-{s}']}/v1", "Hello there", max_tokens=12,
                temperature=1.5, seed=7,
            )  # fmt: skip
            assert status == 200, body
        for name in ("drafter-a", "drafter-b", "verifier"):
            log = (tmp_path / f"{name}.log").read_text()
            line = next(json.loads(x) for x in log.splitlines() if '"nats_connected"' in x)
            assert line["auth"] == "user", line
            assert line["tls"] is (name == "verifier"), line  # edge: loopback to the leaf node
    finally:
        terminate_all(services.values(), 15)
        terminate_all(procs, 10)
