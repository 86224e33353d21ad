"""The local stack's parts, with real processes: the WAN link emulator, nats-server (single, hub
and leaf), and the Stack/``picospec up`` machinery. Everything listens on 127.0.0.1 only.

Timing assertions are lower bounds only (the emulator must add at least the configured delay and
serialization time); nothing asserts that anything is fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from picospec.tools.sse import EventStream, StreamError
from picospec.tools.stack import register
from picospec.tools.stack.natsserver import NatsServer, find_nats_server, free_port, port_open
from picospec.tools.stack.netem import LinkEmulator
from picospec.tools.stack.procs import NotReady, wait_until
from picospec.tools.stack.up import (
    Stack,
    StackConfig,
    StackError,
    config_from_args,
    http_status,
)

HOST = "127.0.0.1"


# -- helpers ---------------------------------------------------------------------------------


async def _echo_server() -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
        except OSError:
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, HOST, 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def _closed_by_peer(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True once the peer has closed (EOF or reset) within ``timeout``."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False
    return data == b""


def _run(coro: object, timeout: float = 20.0) -> object:
    async def bounded() -> object:
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]

    return asyncio.run(bounded())


# -- the link emulator -----------------------------------------------------------------------


def test_netem_forwards_bytes_exactly_on_concurrent_connections() -> None:
    async def main() -> None:
        echo = await _echo_server()
        async with LinkEmulator(HOST, _port(echo), delay_s=0.002, bandwidth_mbit=400) as emu:
            rng = random.Random(7)
            payloads = [rng.randbytes(rng.randint(1, 300_000)) for _ in range(6)]
            payloads.append(b"")  # an empty exchange still opens and closes cleanly

            async def exchange(payload: bytes) -> bytes:
                reader, writer = await asyncio.open_connection(HOST, emu.port)

                async def send() -> None:
                    pos = 0
                    while pos < len(payload):
                        n = rng.randint(1, 70_000)
                        writer.write(payload[pos : pos + n])
                        await writer.drain()
                        pos += n
                    writer.write_eof()

                sender = asyncio.create_task(send())
                got = await reader.read(-1)  # until the echo's EOF comes back through the link
                await sender
                writer.close()
                return got

            results = await asyncio.gather(*(exchange(p) for p in payloads))
            assert [len(r) for r in results] == [len(p) for p in payloads]
            assert results == payloads
            total = sum(map(len, payloads))
            assert emu.bytes_up == total and emu.bytes_down == total
            assert emu.connections == len(payloads)
        echo.close()
        await echo.wait_closed()

    _run(main())


def test_netem_adds_at_least_the_round_trip() -> None:
    rtt = 0.08

    async def main() -> None:
        echo = await _echo_server()
        async with LinkEmulator(HOST, _port(echo), delay_s=rtt / 2) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            for i in range(5):
                msg = f"ping {i}\n".encode()
                t0 = loop.time()
                writer.write(msg)
                await writer.drain()
                assert await reader.readexactly(len(msg)) == msg
                assert loop.time() - t0 >= rtt
            writer.close()
        echo.close()

    _run(main())


def test_netem_caps_bandwidth() -> None:
    mbit, n = 4.0, 150_000  # 0.3 s of serialization at least

    async def main() -> None:
        received = asyncio.Event()
        got = 0

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal got
            while data := await r.read(65536):
                got += len(data)
                if got >= n:
                    received.set()
            w.close()

        server = await asyncio.start_server(sink, HOST, 0)
        async with LinkEmulator(HOST, _port(server), bandwidth_mbit=mbit) as emu:
            _, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            writer.write(os.urandom(n))
            await received.wait()
            elapsed = loop.time() - t0
            assert elapsed >= n * 8 / (mbit * 1e6)
            assert got == n
            writer.close()
        server.close()

    _run(main())


def test_netem_cut_and_restore() -> None:
    async def main() -> None:
        echo = await _echo_server()
        async with LinkEmulator(HOST, _port(echo), delay_s=0.001) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"

            await emu.cut()
            assert await _closed_by_peer(reader), "an open connection survived the cut"
            r2, w2 = await asyncio.open_connection(HOST, emu.port)
            w2.write(b"during the cut")
            assert await _closed_by_peer(r2), "a new connection was forwarded during the cut"
            assert emu.refused >= 1

            await emu.restore()
            r3, w3 = await asyncio.open_connection(HOST, emu.port)
            w3.write(b"after")
            assert await asyncio.wait_for(r3.readexactly(5), 2) == b"after"
            for w in (writer, w2, w3):
                w.close()
        echo.close()

    _run(main())


def test_netem_command_line_and_its_control_endpoint() -> None:
    """``picospec netem`` in the foreground: forwards; its HTTP control endpoint cuts and
    restores the link, each answer the state after the change, and refuses what it does not
    serve; SIGTERM exits 0 (run here as ``python -m picospec.tools.stack.netem``)."""

    def call(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(url, method=method, data=data)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    async def main() -> None:
        echo = await _echo_server()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "picospec.tools.stack.netem", "--listen", "0",
            "--target", f"{HOST}:{_port(echo)}", "--rtt-ms", "20", "--bandwidth-mbit", "50",
            "--control-port", "0", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            port = int(re.search(r"listening on [\d.]+:(\d+)", line).group(1))  # type: ignore[union-attr]
            ctl = re.search(r"control (http://[\d.]+:\d+)", line).group(1)  # type: ignore[union-attr]

            async def roundtrip() -> bytes:
                r, w = await asyncio.open_connection(HOST, port)
                w.write(b"x" * 1000)
                w.write_eof()
                data = await asyncio.wait_for(r.read(-1), 5)
                w.close()
                return data

            assert await roundtrip() == b"x" * 1000
            status, state = await asyncio.to_thread(call, ctl + "/link")
            assert status == 200 and state["cut"] is False and state["connections"] == 1
            status, state = await asyncio.to_thread(call, ctl + "/link/cut", "POST")
            assert status == 200 and state["cut"] is True
            assert b"cut" in await asyncio.wait_for(proc.stdout.readline(), 5)
            r, w = await asyncio.open_connection(HOST, port)
            assert await _closed_by_peer(r)
            w.close()
            status, state = await asyncio.to_thread(call, ctl + "/link/restore", "POST")
            assert status == 200 and state["cut"] is False and state["refused"] == 1
            assert b"restored" in await asyncio.wait_for(proc.stdout.readline(), 5)
            assert await roundtrip() == b"x" * 1000
            # what it does not serve: a clear JSON error, and the link unchanged
            assert (await asyncio.to_thread(call, ctl + "/link/cut"))[0] == 405
            assert (await asyncio.to_thread(call, ctl + "/link", "POST"))[0] == 405
            status, body = await asyncio.to_thread(call, ctl + "/nope", "POST", b"{}" * 4096)
            assert status == 404 and "POST /link/cut" in body["error"]  # its body read first
            assert (await asyncio.to_thread(call, ctl + "/link"))[1]["cut"] is False
            proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(proc.stdout.read(), 10)
            assert await proc.wait() == 0
            assert b"bytes up 2000" in rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        echo.close()

    _run(main())


# -- nats-server -----------------------------------------------------------------------------


def test_find_nats_server_prefers_the_venv() -> None:
    path = find_nats_server()
    assert path.is_file()
    if (Path(sys.executable).parent / "nats-server").is_file():
        assert path == Path(sys.executable).parent / "nats-server"


async def _responder(url: str, subject: str, answer: bytes, queue: str = "", **kw: object):
    nc = await nats.connect(url, **kw)  # type: ignore[arg-type]

    async def reply(msg: Msg) -> None:
        await msg.respond(answer + b":" + msg.data)

    await nc.subscribe(subject, queue=queue, cb=reply)
    await nc.flush()
    return nc


async def _request_until_ok(
    nc: nats.NATS, subject: str, data: bytes, deadline_s: float = 10.0
) -> Msg:
    """Retry while interest is still propagating (no responders / timeout)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await nc.request(subject, data, timeout=1.0)
        except (NoRespondersError, NatsTimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_single_server_request_reply_with_auth(tmp_path: Path) -> None:
    with NatsServer(0, name="single", user="u", password="p w@:/", run_dir=tmp_path) as srv:
        assert srv.running and port_open(HOST, srv.port)
        assert 'password: "p w@:/"' in srv.conf_path.read_text()

        async def main() -> None:
            a = await _responder(srv.url, "echo", b"ok", user="u", password="p w@:/")
            b = await nats.connect(srv.url, user="u", password="p w@:/")
            msg = await b.request("echo", b"hi", timeout=2)
            assert msg.data == b"ok:hi"
            await a.close()
            await b.close()

        _run(main())
    assert not srv.running and not port_open(HOST, srv.port)
    assert "Server is ready" in srv.log_path.read_text()


def test_nats_server_start_failure_shows_the_log(tmp_path: Path) -> None:
    bad = NatsServer(0, name="bad", run_dir=tmp_path, extra_conf="this is { not valid")
    with pytest.raises(RuntimeError, match="nats-server bad exited"):
        bad.start(timeout=5)


def test_hub_and_leaf_through_the_link_emulator(tmp_path: Path) -> None:
    """Edge requests reach a cloud subscriber through the emulated WAN; a queue group with a
    member on each side answers edge requests from the edge member every time."""
    rtt = 0.04

    async def main() -> None:
        hub = NatsServer(0, name="hub", leaf_port=0, leaf_user="leaf", leaf_password="secret",
                         run_dir=tmp_path)  # fmt: skip
        emu = await LinkEmulator(HOST, hub.leaf_port or 0, delay_s=rtt / 2).start()
        leaf = NatsServer(0, name="leaf", leaf_remotes=[hub.leaf_remote(via_port=emu.port)],
                          run_dir=tmp_path)  # fmt: skip
        assert "nats-leaf://leaf:secret@127.0.0.1:" in leaf.config_text()
        clients = []
        try:
            await asyncio.to_thread(hub.start)
            await asyncio.to_thread(leaf.start)
            await asyncio.to_thread(leaf.wait_leafnodes, 1, 10.0)
            await asyncio.to_thread(hub.wait_leafnodes, 1, 10.0)
            assert emu.connections >= 1
            assert leaf.leaf_peers() == [(HOST, emu.port)]  # it dialled the emulator

            cloud = await _responder(hub.url, "cloud.echo", b"cloud")
            edge = await nats.connect(leaf.url)
            clients += [cloud, edge]
            msg = await _request_until_ok(edge, "cloud.echo", b"q")
            assert msg.data == b"cloud:q"
            t0 = time.monotonic()
            msg = await edge.request("cloud.echo", b"q2", timeout=2)
            assert msg.data == b"cloud:q2"
            assert time.monotonic() - t0 >= rtt  # it really crossed the emulated WAN
            up_before = emu.bytes_up

            # queue group "verifiers"-style: one member at the edge, one in the cloud
            q_cloud = await _responder(hub.url, "work", b"cloud", queue="workers")
            q_edge = await _responder(leaf.url, "work", b"edge", queue="workers")
            clients += [q_cloud, q_edge]
            await asyncio.sleep(rtt * 3)  # let the cloud member's interest reach the leaf
            answers = [(await edge.request("work", b"%d" % i, timeout=2)).data for i in range(20)]
            assert answers == [b"edge:%d" % i for i in range(20)]
            assert emu.bytes_up >= up_before  # counters only grow
        finally:
            for c in clients:
                await c.close()
            await asyncio.to_thread(leaf.stop)
            await asyncio.to_thread(hub.stop)
            await emu.stop()

    _run(main(), timeout=30)


def test_restart_keeps_a_reconnecting_client_working(tmp_path: Path) -> None:
    srv = NatsServer(0, name="restart", run_dir=tmp_path).start()
    try:

        async def main() -> None:
            opts = {"reconnect_time_wait": 0.1, "max_reconnect_attempts": -1}
            a = await _responder(srv.url, "svc", b"a", **opts)
            b = await nats.connect(srv.url, **opts)
            assert (await b.request("svc", b"1", timeout=2)).data == b"a:1"
            old_pid = srv.pid
            await asyncio.to_thread(srv.restart)
            assert srv.pid != old_pid and srv.running
            msg = await _request_until_ok(b, "svc", b"2")
            assert msg.data == b"a:2"
            await a.close()
            await b.close()

        _run(main())
        time.sleep(0.3)
        assert srv.running, "a server restarted from a worker thread died with that thread"
    finally:
        srv.stop()


def test_children_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from picospec.tools.stack.natsserver import NatsServer\n"
        f"s = NatsServer(0, name='orphan', run_dir={str(tmp_path)!r}).start()\n"
        "print(s.pid, s.port, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid, port = map(int, parent.stdout.readline().split())
        assert port_open(HOST, port)
    finally:
        parent.kill()
        parent.wait()
    with contextlib.suppress(NotReady):  # the assertion below says what stayed
        wait_until(lambda: not port_open(HOST, port), 5, f"port {port} to close")
    assert not port_open(HOST, port), "nats-server outlived its SIGKILLed parent"


# -- Stack and `picospec up` -----------------------------------------------------------------


def test_up_help_lists_the_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "picospec.tools.stack.up", "--help"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    for opt in ("--topology", "--verifiers", "--drafter", "--verifier", "--quantize-draft",
                "--threads", "--rtt-ms", "--bandwidth-mbit", "--run-dir", "--ready-timeout",
                "--demo", "--demo-repeat", "--env", "--port", "--nats-port", "single",
                "edge-cloud"):  # fmt: skip
        assert opt in out, opt


def test_register_adds_up_and_netem() -> None:
    parser = argparse.ArgumentParser(prog="picospec")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["up", "--topology", "edge-cloud", "--verifiers", "3", "--rtt-ms", "60",
         "--bandwidth-mbit", "20", "--env", "PICOSPEC_DRAFT_LEN=8", "--env", "X=a=b",
         "--drafter", "d", "--verifier", "v", "--quantize-draft", "int8"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert args.func.__name__ == "cmd_up"
    assert cfg.topology == "edge-cloud" and cfg.verifiers == 3 and cfg.link_enabled
    assert cfg.env == {"PICOSPEC_DRAFT_LEN": "8", "X": "a=b"}
    assert (cfg.drafter_model, cfg.verifier_model, cfg.quantize_draft) == ("d", "v", "int8")
    assert cfg.edge_nats_port == 4223 and cfg.api_port == 8000

    stack = Stack(cfg)  # layout only, nothing started
    assert [n for n in stack.services] == [
        "verifier-1", "verifier-2", "verifier-3", "sampler", "drafter"
    ]  # fmt: skip
    v2 = stack.services["verifier-2"].env
    assert v2["PICOSPEC_REPLICA_ID"] == "verifier-2" and v2["PICOSPEC_PORT"] == "8102"
    assert v2["PICOSPEC_NATS_URL"] == "nats://127.0.0.1:4222" and v2["PICOSPEC_MODEL"] == "v"
    d = stack.services["drafter"].env
    assert d["PICOSPEC_NATS_URL"] == "nats://127.0.0.1:4223" and d["PICOSPEC_MODEL"] == "d"
    assert d["PICOSPEC_QUANTIZE"] == "int8" and d["PICOSPEC_DRAFT_LEN"] == "8"
    assert stack.services["sampler"].env["PICOSPEC_PORT"] == "8201"
    assert stack.urls["api"] == "http://127.0.0.1:8000/v1"
    assert "@127.0.0.1:7423" in stack.nats["nats-edge"].config_text()  # via the link

    n = parser.parse_args(["netem", "--listen", "7423", "--target", "127.0.0.1:7422",
                           "--rtt-ms", "60"])  # fmt: skip
    assert n.func.__name__ == "cmd_netem" and n.target == ("127.0.0.1", 7422)
    with pytest.raises(ValueError):
        StackConfig(topology="mesh")


def test_stack_edge_cloud_infrastructure(tmp_path: Path) -> None:
    """The NATS part of an edge-cloud stack (no model services): hub, leaf, link process;
    cut/restore through signals; hub restart; ordered stop."""
    cfg = StackConfig(
        topology="edge-cloud", verifiers=0, sampler=False, drafter=False, rtt_ms=20,
        run_dir=tmp_path, client_auth=True,
    ).with_free_ports()  # fmt: skip
    with Stack(cfg) as stack:
        assert set(stack.pids) == {"nats-hub", "nats-edge", "netem"}
        assert stack.link is not None and stack.link.pid == stack.pids["netem"]
        assert any(line.startswith("netem") for line in stack.summary())
        auth = {"user": stack.client_user, "password": stack.client_password}
        opts = {"reconnect_time_wait": 0.1, "max_reconnect_attempts": -1, **auth}

        async def main() -> None:
            cloud = await _responder(stack.cloud_nats_url, "v", b"cloud", **opts)
            edge = await nats.connect(stack.nats_url, **opts)
            assert (await _request_until_ok(edge, "v", b"1")).data == b"cloud:1"

            leaf = stack.nats["nats-edge"]
            assert leaf.leaf_peers() == [(HOST, cfg.link_port)]  # through the link process
            await asyncio.to_thread(stack.link.cut)  # type: ignore[union-attr]
            # longer than the leaf's 1 s redial interval: it must not find a way around the cut
            await asyncio.sleep(2.5)
            assert leaf.leafnode_count() == 0
            with pytest.raises((NoRespondersError, NatsTimeoutError)):
                await edge.request("v", b"2", timeout=0.5)
            await asyncio.to_thread(stack.link.restore)  # type: ignore[union-attr]
            await asyncio.to_thread(leaf.wait_leafnodes, 1, 10.0)
            assert leaf.leaf_peers() == [(HOST, cfg.link_port)]
            assert (await _request_until_ok(edge, "v", b"3")).data == b"cloud:3"

            await asyncio.to_thread(stack.restart_nats)  # the hub
            assert (await _request_until_ok(edge, "v", b"4")).data == b"cloud:4"
            assert leaf.leaf_peers() == [(HOST, cfg.link_port)]
            await cloud.close()
            await edge.close()

        _run(main(), timeout=40)
        assert stack.exited() == {}
        pids = dict(stack.pids)
    assert stack.pids == {}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "link cut" in (tmp_path / "netem.log").read_text()


def test_stack_reports_a_service_that_fails(tmp_path: Path) -> None:
    """A service that exits before /ready fails start() with its log, and nothing is left."""
    cfg = StackConfig(
        verifiers=1, sampler=False, drafter=False, verifier_model=str(tmp_path / "no-such-model"),
        run_dir=tmp_path, ready_timeout=12,
    ).with_free_ports()  # fmt: skip
    stack = Stack(cfg)
    with pytest.raises(StackError, match="verifier-1"):  # exited, or not ready in time
        stack.start()
    assert stack.pids == {}
    assert not port_open(HOST, cfg.nats_port)


def test_ports_in_use_are_refused_up_front(tmp_path: Path) -> None:
    with NatsServer(0, name="first", run_dir=tmp_path) as first:
        with pytest.raises(RuntimeError, match="already in use"):
            NatsServer(first.port, name="second", run_dir=tmp_path).start()
        assert first.running
        cfg = StackConfig(verifiers=0, drafter=False, run_dir=tmp_path).with_free_ports()
        cfg.sampler_port = first.http_port  # something answers HTTP there already
        stack = Stack(cfg)
        with pytest.raises(StackError, match=rf"{first.http_port} \(sampler\)"):
            stack.start()
        assert stack.pids == {} and first.running


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536 and not port_open(HOST, port)


def _procs_with_env(entry: str) -> list[int]:
    """PIDs of live processes whose environment holds ``entry`` (e.g. PICOSPEC_PORT=1234)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                state = (d / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if entry.encode() in env and state != "Z":
                found.append(int(d.name))
    return found


def _up_argv(cfg: StackConfig, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "picospec.tools.stack.up", "--run-dir", str(run_dir),
        "--nats-port", str(cfg.nats_port), "--monitor-port", str(cfg.monitor_port),
        "--port", str(cfg.api_port), "--verifier-port", str(cfg.port_of_verifier(1)),
        "--sampler-port", str(cfg.sampler_port), "--threads", "1",
    ]  # fmt: skip


def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    cfg = StackConfig().with_free_ports()
    with NatsServer(cfg.nats_port, name="squatter", run_dir=tmp_path / "other"):
        out = subprocess.run(
            _up_argv(cfg, tmp_path), capture_output=True, text=True, timeout=20
        )  # fmt: skip
    assert out.returncode == 1
    assert f"{cfg.nats_port} (nats)" in out.stderr and "already in use" in out.stderr
    assert "stopped" in out.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_up_stops_cleanly_on_sigterm_during_startup(tmp_path: Path) -> None:
    """SIGTERM while the services are still starting: every child goes, exit code 0."""
    cfg = StackConfig().with_free_ports()
    proc = subprocess.Popen(
        _up_argv(cfg, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        marker = f"PICOSPEC_PORT={cfg.api_port}"
        until = time.monotonic() + 20  # for both waits together
        what = "picospec up (starting the drafter)"
        wait_until(lambda: _procs_with_env(marker), 10, what, proc=proc, interval=0.1)
        assert port_open(HOST, cfg.nats_port)
        # let the verifier get as far as its HTTP server (it loads its model after that); the
        # SIGTERM comes during the startup either way
        health = f"http://{HOST}:{cfg.port_of_verifier(1)}/health"
        with contextlib.suppress(NotReady):
            wait_until(
                lambda: http_status(health) == 200, until - time.monotonic(), "picospec up",
                proc=proc, interval=0.1,
            )  # fmt: skip
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert not port_open(HOST, cfg.nats_port)
    for port in (cfg.api_port, cfg.sampler_port, cfg.port_of_verifier(1)):
        assert _procs_with_env(f"PICOSPEC_PORT={port}") == []


def test_cold_and_warm_compares_the_first_demo_request_with_the_rest() -> None:
    from picospec.tools.stack.up import cold_and_warm

    got = cold_and_warm(
        [
            {"ttft_s": 0.6, "tokens_per_s": 10.0},
            {"ttft_s": 0.2, "tokens_per_s": 20.0},
            {"ttft_s": 0.4, "tokens_per_s": 30.0},
        ]
    )["demo_cold_vs_warm"]
    assert got["cold_ttft_s"] == 0.6 and got["warm_ttft_s"] == pytest.approx(0.3)
    assert got["ttft_cold_over_warm"] == pytest.approx(2.0)
    assert got["warm_tokens_per_s"] == pytest.approx(25.0) and got["warm_requests"] == 2
    assert cold_and_warm([{}, {"ttft_s": None}])["demo_cold_vs_warm"]["ttft_cold_over_warm"] is None


# -- reading a streamed answer ---------------------------------------------------------------


def test_the_event_stream_keeps_errors_apart_and_knows_a_cut_stream() -> None:
    whole = [
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n',
        b"\n",
        b": ping\n",
        b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n',
        b"data: [DONE]\n",
        b'data: {"after": "done"}\n',
    ]
    s = EventStream()
    assert [list(o) for o in s.events(whole)] == [["choices"], ["choices", "usage"]]
    assert s.done and s.error is None and s.problem is None
    s.check()
    failed = EventStream()
    lines = [b'data: {"choices": []}\n', b'data: {"error": {"code": "cloud_unreachable"}}\n']
    assert len(list(failed.events([*lines, b"data: [DONE]\n"]))) == 1
    assert failed.problem == "stream:cloud_unreachable"
    with pytest.raises(StreamError, match="cloud_unreachable"):
        failed.check()
    cut = EventStream()
    assert len(list(cut.events(lines[:1]))) == 1
    assert cut.problem == "incomplete"
    with pytest.raises(StreamError, match="without"):
        cut.check()
    with pytest.raises(ValueError):
        EventStream().feed("data: {not json")

    async def read() -> list[dict]:
        async def body():  # an aiohttp body: bytes lines
            for line in whole:
                yield line

        return [o async for o in EventStream().aevents(body())]

    assert len(asyncio.run(read())) == 2
