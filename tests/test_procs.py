"""``procs``: the one way the stack's tools and tests start, wait for and stop a child process.
Real processes and sockets, no mocks."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from picospec.tools.stack.procs import (
    NotReady,
    http_ready,
    log_has,
    spawn,
    tcp_ready,
    terminate_all,
    wait_until,
)

HOST = "127.0.0.1"


def _python(tmp_path: Path, code: str, log: Path) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-c", code], log, dict(os.environ), tmp_path)


def test_wait_until_returns_the_probes_value() -> None:
    calls = []

    def probe() -> dict[str, int] | None:
        calls.append(1)
        return {"after": len(calls)} if len(calls) >= 3 else None

    assert wait_until(probe, 10, "the third call", interval=0.01) == {"after": 3}
    assert len(calls) == 3


def test_wait_until_tries_once_even_without_time() -> None:
    assert wait_until(lambda: "here", 0, "something already there") == "here"
    assert wait_until(lambda: 7, -1, "something already there") == 7


def test_wait_until_lets_the_probes_errors_through() -> None:
    def probe() -> bool:
        raise ValueError("the probe's own error")

    with pytest.raises(ValueError, match="the probe's own error"):
        wait_until(probe, 10, "a probe that fails")


def test_wait_until_times_out_naming_what_with_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("starting\nlistening on nothing at all\n")
    t0 = time.monotonic()
    with pytest.raises(NotReady) as err:
        wait_until(lambda: 0, 0.3, "the widget service", log_path=log, interval=0.02)
    assert time.monotonic() - t0 >= 0.3
    assert isinstance(err.value, TimeoutError) and err.value.returncode is None
    msg = str(err.value)
    assert "the widget service" in msg and "0.3s" in msg
    assert "(last: 0)" in msg  # a falsy value that is not None/False is shown
    assert str(log) in msg and "listening on nothing at all" in msg


def test_wait_until_fails_fast_when_the_process_exits(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    proc = _python(tmp_path, "import sys; print('boom: no config'); sys.exit(3)", log)
    t0 = time.monotonic()
    with pytest.raises(NotReady) as err:
        wait_until(lambda: False, 60, "the child", proc=proc, log_path=log)
    assert time.monotonic() - t0 < 30  # at once, not after the 60 s
    assert err.value.returncode == 3
    msg = str(err.value)
    assert msg.startswith("the child exited with code 3") and "boom: no config" in msg


def test_wait_until_returns_while_the_process_runs(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    proc = _python(tmp_path, "import time; print('up', flush=True); time.sleep(60)", log)
    try:
        assert wait_until(lambda: log_has(log, "up"), 30, "the child", proc=proc) is True
        assert proc.poll() is None
    finally:
        terminate_all([proc], 5)
    assert proc.returncode == -signal.SIGTERM


def test_terminate_all_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = _python(tmp_path, code, log)
    wait_until(lambda: log_has(log, "ignoring SIGTERM"), 30, "the child", proc=proc)
    t0 = time.monotonic()
    terminate_all([proc], 0.5)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 20


def test_tcp_ready_false_on_a_closed_port_true_on_a_listening_one() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        assert not tcp_ready(HOST, port)  # bound, not listening: refused
        s.listen()
        assert tcp_ready(HOST, port)
    assert not tcp_ready(HOST, port)


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ready" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_ready_checks_the_status(http_server: str) -> None:
    assert http_ready(f"{http_server}/ready")
    assert not http_ready(f"{http_server}/loading")  # 503
    assert http_ready(f"{http_server}/loading", expect=503)


def test_http_ready_false_when_nothing_or_no_http_answers() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        assert not http_ready(f"http://{HOST}:{port}/ready")  # refused
        s.listen()
        done = threading.Event()

        def garbage() -> None:
            conn, _ = s.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"this is not HTTP\r\n\r\n")
            done.set()

        threading.Thread(target=garbage, daemon=True).start()
        assert not http_ready(f"http://{HOST}:{port}/ready", timeout=5)
        assert done.wait(5)


def test_log_has(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert not log_has(log, "ready")  # no log yet
    log.write_text("loading\n")
    assert not log_has(log, "ready")
    with open(log, "a") as f:
        f.write("server ready on :80\n")
    assert log_has(log, "ready")
