"""A user-space WAN link emulator: a TCP proxy that adds delay, caps bandwidth and can partition.

``tc netem`` is not available everywhere (not in this kernel, not without privileges), so the
edge-cloud link of a local stack passes through this proxy instead. Each accepted connection is
forwarded to the target; every chunk read from one side is delivered to the other side after

- its *serialization delay*: the direction's link carries ``bandwidth`` bits per second, so a
  chunk of ``n`` bytes occupies it for ``n*8/bandwidth`` seconds after the link is free (the
  link is shared by all connections of one direction, like a real access link), and then
- the *one-way propagation delay* (round trip = 2 x delay).

Delivery is timestamped and handed to a writer task per direction, so delayed data never blocks
further reads; order and content are preserved exactly. The reader stops reading while its chunk
is being serialized and while too much data is in flight, so TCP backpressure reaches the sender.

``cut()`` partitions the link: every open connection is closed and new ones are closed as soon as
they are accepted, until ``restore()``.

Command line (foreground until SIGTERM/SIGINT)::

    picospec netem --listen 7423 --target 127.0.0.1:7422 --rtt-ms 60 --bandwidth-mbit 20 \
        --control-port 7424

With ``--control-port`` the link is controlled over HTTP on the loopback interface (JSON
answers; each carries the link's state after the call: ``cut``, ``bytes_up``, ``bytes_down``,
``connections``, ``refused``)::

    curl http://127.0.0.1:7424/link               # the state
    curl -X POST http://127.0.0.1:7424/link/cut      # partition now
    curl -X POST http://127.0.0.1:7424/link/restore  # accept connections again
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MAX_CHUNK = 65536
MAX_IN_FLIGHT = 8 * 1024 * 1024  # bytes read but not yet delivered, per connection and direction
CUT_MESSAGE = "netem: link cut"
RESTORE_MESSAGE = "netem: link restored"
READY_MESSAGE = "netem: listening on"


class _Direction:
    """One direction of the emulated link: propagation delay and a shared serializer."""

    def __init__(self, delay_s: float, bandwidth_bps: float | None) -> None:
        self.delay_s = delay_s
        self.bandwidth_bps = bandwidth_bps
        self.busy_until = 0.0
        self.bytes = 0  # delivered

    def schedule(self, now: float, n: int) -> tuple[float, float]:
        """Reserve the link for ``n`` bytes: (time serialization ends, time of delivery)."""
        start = max(now, self.busy_until)
        end = start + (n * 8 / self.bandwidth_bps if self.bandwidth_bps else 0.0)
        self.busy_until = end
        return end, end + self.delay_s

    @property
    def chunk(self) -> int:
        """Read size: about 5 ms of link time when capped (fair sharing), else large reads."""
        if not self.bandwidth_bps:
            return MAX_CHUNK
        return int(min(MAX_CHUNK, max(1500, self.bandwidth_bps / 8 * 0.005)))


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False

    def abort(self) -> None:
        """Close both sockets at once, dropping anything still in flight."""
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.target):
            w.transport.abort()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()


class LinkEmulator:
    """The TCP proxy. ``await start()``, then connect to ``127.0.0.1:port`` instead of target.

    ``delay_s`` is the one-way delay added in each direction, ``bandwidth_mbit`` the capacity of
    each direction (None: unlimited). ``listen_port=0`` picks a free port (see :attr:`port`).
    Counters: ``bytes_up`` (client -> target), ``bytes_down`` (target -> client), both counted
    when delivered, ``connections`` (accepted and forwarded), ``refused`` (closed while cut).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        listen_host: str = "127.0.0.1",
        delay_s: float = 0.0,
        bandwidth_mbit: float | None = None,
    ) -> None:
        if delay_s < 0:
            raise ValueError("delay must be >= 0")
        if bandwidth_mbit is not None and bandwidth_mbit <= 0:
            raise ValueError("bandwidth must be > 0 Mbit/s")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = listen_port
        self.delay_s = delay_s
        self.bandwidth_mbit = bandwidth_mbit
        bps = bandwidth_mbit * 1e6 if bandwidth_mbit else None
        self._up = _Direction(delay_s, bps)
        self._down = _Direction(delay_s, bps)
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.is_cut = False
        self.connections = 0
        self.refused = 0

    @property
    def bytes_up(self) -> int:
        return self._up.bytes

    @property
    def bytes_down(self) -> int:
        return self._down.bytes

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> LinkEmulator:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        handlers = list(self._handlers)
        for t in handlers:
            t.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def cut_nowait(self) -> None:
        """Partition now (callable from a signal handler or any loop callback)."""
        self.is_cut = True
        self._abort_all()

    def restore_nowait(self) -> None:
        self.is_cut = False

    async def cut(self) -> None:
        self.cut_nowait()
        await asyncio.sleep(0)

    async def restore(self) -> None:
        self.restore_nowait()
        await asyncio.sleep(0)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            conn.abort()

    def state(self) -> dict[str, int | bool]:
        """What the control endpoint answers: whether the link is cut, and the counters."""
        return {
            "cut": self.is_cut,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections": self.connections,
            "refused": self.refused,
        }

    # -- forwarding --------------------------------------------------------------------------

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(creader, cwriter)
        finally:
            self._handlers.discard(task)

    async def _forward(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            cwriter.transport.abort()
            return
        try:
            treader, twriter = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            cwriter.transport.abort()
            return
        if self.is_cut:  # cut while connecting
            self.refused += 1
            cwriter.transport.abort()
            twriter.transport.abort()
            return
        conn = _Connection(client=cwriter, target=twriter)
        self._conns.add(conn)
        self.connections += 1
        up = asyncio.create_task(self._pump(conn, creader, twriter, self._up))
        down = asyncio.create_task(self._pump(conn, treader, cwriter, self._down))
        conn.tasks = [up, down]
        try:
            await asyncio.gather(up, down)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            conn.abort()
            self._conns.discard(conn)
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Direction,
    ) -> None:
        """Read from one side, deliver to the other after the link's delays, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        in_flight = 0
        room = asyncio.Event()

        async def deliver() -> None:
            nonlocal in_flight
            try:
                while True:
                    when, data = await queue.get()
                    wait = when - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if data is None:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    link.bytes += len(data)
                    in_flight -= len(data)
                    room.set()
                    await writer.drain()
            except OSError:
                conn.abort()  # the peer is gone: tear down both sides
                raise

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(link.chunk)
                now = loop.time()
                if conn.closed:
                    return
                if not data:
                    queue.put_nowait((max(now, link.busy_until) + link.delay_s, None))
                    break
                end, when = link.schedule(now, len(data))
                in_flight += len(data)
                queue.put_nowait((when, data))
                if end > now:  # the link is busy serializing this chunk: read no further yet
                    await asyncio.sleep(end - now)
                while in_flight > MAX_IN_FLIGHT and not sender.done():
                    room.clear()
                    await room.wait()
            await sender
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender


# -- control endpoint --------------------------------------------------------------------------


class ControlServer:
    """The link's HTTP control endpoint (loopback, aiohttp): ``GET /link`` the state,
    ``POST /link/cut`` and ``POST /link/restore``. Every answer is JSON, errors included; a
    change answers the state after it, so the caller needs no other confirmation. ``say``
    reports each change (the process's log)."""

    def __init__(self, emu: LinkEmulator, say: Callable[[str], None] = lambda _m: None) -> None:
        self.emu = emu
        self.say = say
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> ControlServer:
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/link", self._state)
        app.router.add_post("/link/cut", self._change(self.emu.cut_nowait, CUT_MESSAGE))
        app.router.add_post("/link/restore", self._change(self.emu.restore_nowait, RESTORE_MESSAGE))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.emu.state())

    def _change(self, act: Callable[[], None], message: str) -> Any:
        async def handler(_request: web.Request) -> web.Response:
            act()
            self.say(message)
            return web.json_response(self.emu.state())

        return handler


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """What the endpoint does not serve (404, 405) answered as JSON, naming what it serves."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        served = "GET /link, POST /link/cut, POST /link/restore"
        body = {"error": f"{request.method} {request.path}: {e.reason}; this serves {served}"}
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return web.json_response(body, status=e.status, headers=allow)


# -- command line ------------------------------------------------------------------------------


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--listen-host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="added round trip (half each way)")
    p.add_argument(
        "--bandwidth-mbit", type=float, default=None, help="capacity of each direction, Mbit/s"
    )
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="serve the HTTP control endpoint on this loopback port (0: any free): "
        "GET /link, POST /link/cut, POST /link/restore",
    )


def _say(msg: str) -> None:
    print(msg, flush=True)


async def serve(args: argparse.Namespace) -> int:
    host, port = args.target
    if args.rtt_ms < 0:
        raise ValueError("--rtt-ms must be >= 0")
    emu = LinkEmulator(
        host,
        port,
        listen_port=args.listen,
        listen_host=args.listen_host,
        delay_s=args.rtt_ms / 2000.0,
        bandwidth_mbit=args.bandwidth_mbit,
    )
    await emu.start()
    control = None
    if args.control_port is not None:
        control = await ControlServer(emu, _say).start(port=args.control_port)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    bw = f"{args.bandwidth_mbit:g} Mbit/s" if args.bandwidth_mbit else "unlimited"
    ctl = f", control http://127.0.0.1:{control.port}" if control is not None else ""
    _say(
        f"{READY_MESSAGE} {args.listen_host}:{emu.port} -> {host}:{port}, "
        f"rtt {args.rtt_ms:g} ms, bandwidth {bw}{ctl}"
    )
    try:
        await done.wait()
    finally:
        if control is not None:
            await control.stop()
        await emu.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    _say(
        f"netem: stopped; bytes up {emu.bytes_up}, down {emu.bytes_down}, "
        f"connections {emu.connections}, refused {emu.refused}"
    )
    return 0


def cmd_netem(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as e:
        print(f"picospec netem: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="picospec netem", description="emulate a WAN link: delay, bandwidth, partition"
    )
    add_arguments(parser)
    return cmd_netem(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
