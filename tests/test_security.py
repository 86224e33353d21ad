"""Security with real nats-server processes and real services on tiny models.

One secure ``edge-cloud`` stack (per-role NATS users with least permissions, a per-site leaf
user, TLS from a throwaway CA, an API key) serves most tests. Site B is a second edge site the
hub admits: the tests run its leaf node themselves, once with B's drafter credentials and once
as if B's whole node were compromised.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest

from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import DraftBlock, Verdict, encode
from picospec.runtime.model import LanguageModel
from picospec.services.drafter.api import TENANT, Api, application
from picospec.services.shell import connect_nats, nats_options
from picospec.speculation.engine import generate
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.tools.promtext import series_sum
from picospec.tools.sse import EventStream
from picospec.tools.stack.natsserver import NatsServer, NatsUser, make_pki
from picospec.tools.stack.up import Stack, StackConfig

API_KEY = secrets.token_urlsafe(24)
SITE_B = "edge-b"
ENV = {
    "PICOSPEC_VERIFY_TIMEOUT_S": "2",
    "PICOSPEC_REQUEST_TIMEOUT_S": "20",
    "PICOSPEC_THREADS": "1",
    "PICOSPEC_IDLE_TIMEOUT_S": "60",
}


@pytest.fixture(scope="module")
def stack(tiny_dirs: tuple[Path, Path]) -> Stack:
    cfg = StackConfig(
        topology="edge-cloud",
        verifiers=1,
        drafter_model=str(tiny_dirs[1]),
        verifier_model=str(tiny_dirs[0]),
        env=dict(ENV),
        ready_timeout=180.0,
        secure=True,
        tls=True,
        extra_sites=(SITE_B,),
        api_key=API_KEY,
    ).with_free_ports()
    with Stack(cfg) as s:
        yield s


# --- helpers ----------------------------------------------------------------------------------


def http(
    url: str, body: dict[str, Any] | None = None, key: str | None = API_KEY, scheme: str = "Bearer"
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"{scheme} {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return (
                r.status,
                dict(r.headers),
                json.loads(raw)
                if r.headers.get("Content-Type", "").startswith("application/json")
                else raw.decode(),
            )
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def chat_body(content: str, max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {
        "model": "picospec",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        **kw,
    }


def expected(ref: LanguageModel, content: str, n: int) -> str:
    prompt = ref.encode_chat([{"role": "user", "content": content}])
    out = generate(ref, None, prompt, SamplingParams(temperature=0), SpecConfig(mode=Mode.AR), n)
    return ref.decode(out.tokens)


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return series_sum(text, name, **labels) or 0.0


def drafter_id(stack: Stack) -> str:
    with urllib.request.urlopen(f"{stack.services['drafter'].url}/metrics", timeout=10) as r:
        found = re.search(r'replica="(drafter-[0-9a-f]+)"', r.read().decode())
    assert found
    return found.group(1)


async def stream(api: str, content: str, max_tokens: int, on_first: Any = None) -> tuple[str, str]:
    """Stream a greedy chat; return (text, completion id). ``on_first(id)`` is awaited as a
    task once the first token arrived, while the session is live."""
    text: list[str] = []
    cid, side = "", None
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{api}/chat/completions",
            json=chat_body(content, max_tokens, stream=True),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as r:
            assert r.status == 200, await r.text()
            events = EventStream()
            async for obj in events.aevents(r.content):
                cid = obj["id"]
                delta = obj["choices"][0]["delta"].get("content")
                if delta:
                    text.append(delta)
                    if on_first is not None and side is None:
                        side = asyncio.create_task(on_first(cid))
            events.check()  # no error event, and [DONE] at the end
    if side is not None:
        await side
    return "".join(text), cid


class Client:
    """A NATS client that records the server's asynchronous errors (permission violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def connect(self, url: str, **kw: Any) -> Client:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e).lower())

        self.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **kw)
        return self

    async def settle(self) -> None:
        await self.nc.flush()
        await asyncio.sleep(0.3)  # -ERR for a refused publish comes after the PONG


async def refused(url: str, **kw: Any) -> str:
    with pytest.raises(Exception) as err:  # nats-py raises its base Error here
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, **kw)
        await nc.close()
    return str(err.value)


def run(coro: Awaitable[Any], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


# --- a secure stack serves ---------------------------------------------------------------------


def test_secure_stack_serves_exactly_the_target_and_logs_no_secret(
    stack: Stack, reference: LanguageModel
) -> None:
    for mode in ("picospec", "ar"):
        status, _, body = http(
            f"{stack.api_url}/chat/completions", chat_body("Secure hello", 40, mode=mode)
        )
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected(reference, "Secure hello", 40)
    for name in ("drafter", "sampler", "verifier-1"):
        log = stack.log_path(name).read_text()
        assert '"auth": "user"' in log and '"tls": true' in log
        for user in stack.users.values():
            assert (user.password or "-") not in log
        assert API_KEY not in log
    for server in stack.nats.values():
        assert (server.conf_path.stat().st_mode & 0o077) == 0, "passwords: owner only"


# --- NATS: authentication and permissions --------------------------------------------------------


def test_clients_without_credentials_or_with_wrong_ones_cannot_connect(stack: Stack) -> None:
    tls = stack.nats_options()  # the CA only

    async def main() -> None:
        for url in (stack.nats_url, stack.cloud_nats_url):
            assert "Authorization Violation" in await refused(url, **tls)
            assert "Authorization Violation" in await refused(
                url, user="drafter-edge-1", password="guess", **tls
            )
        # a leaf link's user is for leaf links only; site users exist only at their site
        leaf = stack.users["leaf-edge-1"].client_options()
        assert "Authorization Violation" in await refused(stack.cloud_nats_url, **leaf, **tls)
        drafter = stack.users["drafter-edge-1"].client_options()
        assert "Authorization Violation" in await refused(stack.cloud_nats_url, **drafter, **tls)
        # a client that does not trust the stack's CA gets nowhere either
        await refused(stack.nats_url, tls=ssl.create_default_context(), **drafter)

    run(main())


def test_another_site_gets_nothing_of_this_site(stack: Stack, reference: LanguageModel) -> None:
    """Site B's leaf node (admitted by the hub as site B) with B's drafter user, and with a
    user without any restriction (B's node compromised): neither can read site A's verdicts
    or replies, nor inject verdicts into A. A's own drafter user cannot forge verdicts."""
    hub = stack.nats["nats-hub"]
    leaf_b = stack.users[f"leaf-{SITE_B}"]
    remote = hub.leaf_remote()
    remote = type(remote)(remote.port, user=leaf_b.user, password=leaf_b.password,
                          tls_ca=remote.tls_ca)  # fmt: skip
    drafter_b = stack.users[f"drafter-{SITE_B}"]
    root = NatsUser("root", secrets.token_urlsafe(16))  # every permission on B's own node
    edge_b = NatsServer(
        0,
        name="nats-edge-b",
        leaf_remotes=[remote],
        users=[drafter_b, root],
        tls=stack.pki.server_tls() if stack.pki else None,
        run_dir=stack.run_dir / "edge-b",
    )
    target = subjects.verdicts(stack.config.site, drafter_id(stack))
    rejected_before = metric(stack.services["drafter"].url, "picospec_rejected_messages_total")
    tls = stack.nats_options()

    async def main() -> tuple[str, list[str], Client, Client, Client]:
        b = await Client().connect(edge_b.url, **drafter_b.client_options(), **tls)
        spy = await Client().connect(edge_b.url, **root.client_options(), **tls)
        a = await Client().connect(stack.nats_url, **stack.nats_options("drafter-edge-1"))
        seen: list[str] = []

        async def record(msg: Any) -> None:
            seen.append(msg.subject)

        await b.nc.subscribe(subjects.site_verdicts(stack.config.site), cb=record)
        await b.nc.subscribe("_INBOX.>", cb=record)
        await spy.nc.subscribe(">", cb=record)
        await b.settle()
        await spy.settle()

        async def attack(_: str) -> None:
            junk = b"\x00" * 40
            await b.nc.publish(target, junk)  # B's drafter: not a verdict publisher
            await b.nc.publish(subjects.verdicts(SITE_B, "drafter-x"), junk)
            await spy.nc.publish(target, junk)  # B's node: the hub does not take it
            await a.nc.publish(target, junk)  # A's drafter: not a verdict publisher either
            for c in (a, b, spy):
                await c.settle()

        text, _ = await stream(stack.api_url, "Site A's secret", 60, on_first=attack)
        for c in (a, b, spy):
            await c.nc.close()
        return text, seen, a, b, spy

    with edge_b:
        edge_b.wait_leafnodes(1)
        text, seen, a, b, spy = run(main())
    assert text == expected(reference, "Site A's secret", 60)
    assert seen == [target], "B's spy saw only its own publish, nothing of site A"
    want = f'subscription to "{subjects.site_verdicts("edge-1")}"'
    assert any(want in e for e in b.errors), b.errors
    assert any('subscription to "_inbox.>"' in e for e in b.errors), b.errors
    assert sum("permissions violation for publish" in e for e in b.errors) == 2, b.errors
    assert any("permissions violation for publish" in e for e in a.errors), a.errors
    assert spy.errors == []
    after = metric(stack.services["drafter"].url, "picospec_rejected_messages_total")
    assert after == rejected_before, "no forged message reached the drafter"


def test_single_topology_secure_layout_and_permissions(tmp_path: Path) -> None:
    """The single server alone (the services' credentials, no model services): it admits
    each role with its own permissions, and an extra site's drafter cannot read this site's
    replies or verdicts."""
    cfg = StackConfig(secure=True, extra_sites=("far",), run_dir=tmp_path).with_free_ports()
    s = Stack(cfg)  # laid out, not started: only its NATS server runs below
    envs = {n: svc.env for n, svc in s.services.items()}
    assert len({e["PICOSPEC_NATS_PASSWORD"] for e in envs.values()}) == 3
    assert envs["drafter"]["PICOSPEC_NATS_USER"] == "drafter-edge-1"
    assert envs["verifier-1"]["PICOSPEC_NATS_USER"] == "verifier-1"
    assert all(e["PICOSPEC_NATS_PASSWORD"] not in " ".join(s.services["drafter"].argv("INFO"))
               for e in envs.values())  # fmt: skip

    with s.nats["nats"]:

        async def main() -> tuple[Client, Client, list[bytes]]:
            verifier = await Client().connect(s.nats_url, **s.nats_options("verifier-1"))
            drafter = await Client().connect(
                s.nats_url, inbox_prefix=subjects.inbox_prefix("edge-1"),
                **s.nats_options("drafter-edge-1"),
            )  # fmt: skip
            far = await Client().connect(
                s.nats_url,
                inbox_prefix=subjects.inbox_prefix("far"),
                **s.nats_options("drafter-far"),
            )
            got: list[bytes] = []

            async def answer(msg: Any) -> None:
                await msg.respond(b"opened")
                await verifier.nc.publish(subjects.verdicts("edge-1", "drafter-1"), b"verdict")

            async def keep(msg: Any) -> None:
                got.append(msg.data)

            await verifier.nc.subscribe(subjects.SESSIONS_OPEN, "verifiers", cb=answer)
            await verifier.nc.subscribe(subjects.SAMPLE, cb=keep)  # not a verifier's subject
            await drafter.nc.subscribe(subjects.verdicts("edge-1", "drafter-1"), cb=keep)
            await far.nc.subscribe(subjects.site_verdicts("edge-1"), cb=keep)
            await far.nc.subscribe("_INBOX.edge-1.>", cb=keep)
            for c in (verifier, drafter, far):
                await c.settle()
            reply = await drafter.nc.request(subjects.SESSIONS_OPEN, b"{}", timeout=5)
            await drafter.settle()
            for c in (verifier, drafter, far):
                await c.nc.close()
            return verifier, far, [reply.data, *got]

        verifier, far, got = run(main(), timeout=30)
    assert got == [b"opened", b"verdict"]
    assert any('subscription to "picospec.v1.sample"' in e for e in verifier.errors)
    assert sum("permissions violation for subscription" in e for e in far.errors) == 2


# --- sessions are unguessable ----------------------------------------------------------------


def test_unknown_and_guessed_sessions_are_dropped_and_counted(
    stack: Stack, reference: LanguageModel
) -> None:
    """Blocks and verdicts naming random or all-zero session ids, published on
    the real subjects with real credentials while a real session streams, are dropped and
    counted; the real session's output is unchanged."""
    vocab = reference.vocab_size
    target = subjects.verdicts(stack.config.site, drafter_id(stack))
    d_url, v_url = stack.services["drafter"].url, stack.services["verifier-1"].url
    d0 = metric(d_url, "picospec_rejected_messages_total", reason="unknown_session")
    v0 = metric(v_url, "picospec_rejected_messages_total", reason="unknown_session")
    n_guesses = 0

    async def attack(cid: str) -> None:
        nonlocal n_guesses
        # the response id is not the session id: the session is a capability clients never see
        assert len(cid.split("-", 1)[1]) == 24
        guesses = [os.urandom(16) for _ in range(7)] + [bytes(16)]
        n_guesses = len(guesses)
        as_verifier = await Client().connect(
            stack.cloud_nats_url, **stack.nats_options("verifier-1")
        )
        as_drafter = await Client().connect(
            stack.nats_url, inbox_prefix=subjects.inbox_prefix(stack.config.site),
            **stack.nats_options("drafter-edge-1"),
        )  # fmt: skip
        for sid in guesses:
            verdict = Verdict(session=sid, epoch=0, seq=0, accepted=2, token=3, vocab_size=vocab)
            await as_verifier.nc.publish(target, encode(verdict))
            block = DraftBlock(session=sid, epoch=0, seq=0, pos=1, prefix=(), tokens=(1, 2),
                               q=(0.5, 0.5), vocab_size=vocab)  # fmt: skip
            await as_drafter.nc.publish(subjects.verify("verifier-1"), encode(block), reply=target)
        for c in (as_verifier, as_drafter):
            await c.settle()
            assert c.errors == []
            await c.nc.close()

    text, _ = run(stream(stack.api_url, "Guess my session", 120, on_first=attack))
    assert text == expected(reference, "Guess my session", 120)
    # the drafter drops the forged verdicts, and the verifier's UNKNOWN_SESSION answers
    assert metric(d_url, "picospec_rejected_messages_total", reason="unknown_session") >= (
        d0 + 2 * n_guesses
    )
    assert metric(v_url, "picospec_rejected_messages_total", reason="unknown_session") >= (
        v0 + n_guesses
    )


# --- the API key ------------------------------------------------------------------------------


def test_api_key_guards_the_api_but_not_probes_or_metrics(stack: Stack) -> None:
    api, base = stack.api_url, stack.services["drafter"].url
    before = metric(base, "picospec_requests_total", status="401")
    refusals = [
        http(f"{api}/models", key=None),
        http(f"{api}/models", key="sk-wrong"),
        http(f"{api}/models", key=API_KEY + "x"),
        http(f"{api}/models", key=API_KEY, scheme="Basic"),
        http(f"{api}/chat/completions", chat_body("x", 4), key=None),
        http(f"{api}/completions", {"model": "picospec", "prompt": "x"}, key="nope"),
    ]
    for status, headers, body in refusals:
        assert status == 401, body
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["param"] is None
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert metric(base, "picospec_requests_total", status="401") == before + len(refusals)
    status, _, body = http(f"{api}/models")
    assert status == 200 and body["data"][0]["id"] == "picospec"
    for path in ("/health", "/ready", "/metrics"):
        assert http(f"{base}{path}", key=None)[0] == 200


def test_api_keys_file_accepts_each_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nsk-one\n\n  sk-two  \n")

    async def main() -> list[int]:
        api = Api(Settings(api_keys_file=str(keys), api_key="sk-three"))
        app = application(api)
        from aiohttp.test_utils import TestClient, TestServer

        async with TestClient(TestServer(app)) as client:
            out = []
            for key in ("sk-one", "sk-two", "sk-three", "sk-four", "# rotated monthly", ""):
                r = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                out.append(r.status)
            return out

    # 503: past the key check, the API is not attached to a drafter here
    assert run(main()) == [503, 503, 503, 401, 401, 401]
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        Api(Settings(api_keys_file=str(empty)))
    with pytest.raises(ValueError, match="api_keys_file"):
        Api(Settings(api_keys_file=str(tmp_path / "missing")))
    assert "sk-three" not in repr(Settings(api_key="sk-three", nats_user="u", nats_password="pw"))
    assert "pw" not in str(Settings(nats_user="u", nats_password="pw").model_dump())


def test_each_api_key_is_a_tenant_of_its_own(tmp_path: Path) -> None:
    """The suffix draft matches against recent answers of the same tenant only: a tenant is an
    API key (its digest), so two keys never share answers; the open API is one tenant."""
    from aiohttp import web

    keys = tmp_path / "keys"
    keys.write_text("sk-one\nsk-two\n")

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"tenant": request.get(TENANT, "open")})

    async def main(settings: Settings, tokens: list[str]) -> list[str]:
        from aiohttp.test_utils import TestClient, TestServer

        app = application(Api(settings), [web.get("/v1/whoami", whoami)])
        async with TestClient(TestServer(app)) as client:
            out = []
            for key in tokens:
                r = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
                out.append((await r.json())["tenant"])
            return out

    one, two, again = run(main(Settings(api_keys_file=str(keys)), ["sk-one", "sk-two", "sk-one"]))
    assert one == again and one != two and "sk-" not in one + two
    assert run(main(Settings(), ["whatever"])) == ["open"]


# --- client options: NKey seed, TLS with client certificates ------------------------------------


def test_nkey_seed_and_mutual_tls_settings_connect(tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys", reason="nats-py[nkeys] is not installed")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    server = NatsServer(
        0,
        name="nats-mtls",
        users=[NatsUser(nkey=public, permissions={"publish": ["t.>"], "subscribe": ["t.>"]})],
        tls=pki.server_tls(verify_clients=True),
        run_dir=tmp_path / "server",
    )
    good = {
        "nats_url": server.url,
        "nats_nkey_seed": str(seed_file),
        "nats_tls_ca": str(pki.ca),
        "nats_tls_cert": str(pki.client_cert),
        "nats_tls_key": str(pki.client_key),
        "nats_tls_hostname": "localhost",
    }

    async def roundtrip(**kw: Any) -> bytes:
        nc = await connect_nats(Settings(**kw), "test")
        try:
            sub = await nc.subscribe("t.x")
            await nc.publish("t.x", b"over mTLS with an nkey")
            return (await sub.next_msg(timeout=5)).data
        finally:
            await nc.close()

    async def fails(**kw: Any) -> None:
        settings = Settings(**kw)
        with pytest.raises(Exception):  # noqa: B017 - TLS or auth errors, per case
            await asyncio.wait_for(
                nats.connect(
                    settings.nats_url,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    connect_timeout=3,
                    **nats_options(settings),
                ),
                10,
            )

    with server:
        assert run(roundtrip(**good)) == b"over mTLS with an nkey"
        run(fails(**{**good, "nats_tls_cert": None, "nats_tls_key": None}))  # no client cert
        run(fails(**{**good, "nats_tls_ca": str(other.ca)}))  # a server we do not trust
        run(fails(**{**good, "nats_tls_cert": str(other.client_cert),
                     "nats_tls_key": str(other.client_key)}))  # fmt: skip
        run(fails(**{**good, "nats_nkey_seed": None}))  # TLS alone is not a user
    with pytest.raises(ValueError, match="go together"):
        Settings(nats_tls_cert="c.pem")


def test_verdict_subjects_carry_the_site() -> None:
    assert subjects.verdicts("edge-1", "drafter-ab") == "picospec.v1.verdict.edge-1.drafter-ab"
    odd = subjects.site_token("edge-7.example.com")
    assert re.fullmatch(r"edge-7_example_com-[0-9a-f]{8}", odd)
    assert odd != subjects.site_token("edge-7_example_com")
    assert subjects.verdicts("edge-7.example.com", "d").startswith(f"picospec.v1.verdict.{odd}.")
    assert Settings(site="edge-7.example.com").inbox_prefix() == f"_INBOX.{odd}"
    assert Settings(nats_inbox_prefix="_INBOX.mine").inbox_prefix() == "_INBOX.mine"
    with pytest.raises(ValueError):
        subjects.verdicts("edge-1", "bad.id")
    with pytest.raises(ValueError):
        Settings(nats_inbox_prefix="_INBOX.>")


def test_picospec_up_secure_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from picospec.tools.stack.up import build_parser, config_from_args

    argv = ["--topology", "edge-cloud", "--secure", "--tls"]
    monkeypatch.delenv("PICOSPEC_API_KEY", raising=False)
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.secure and cfg.tls and cfg.api_key and len(cfg.api_key) >= 32
    assert cfg.api_key not in repr(cfg)
    monkeypatch.setenv("PICOSPEC_API_KEY", "sk-mine")
    assert config_from_args(build_parser().parse_args(argv)).api_key == "sk-mine"
    assert config_from_args(build_parser().parse_args([])).api_key is None
    with pytest.raises(ValueError, match="secure"):
        StackConfig(secure=True, client_auth=True)
