"""The one way the stack's tools and tests run a child process: :func:`spawn` it (in its own
session, pinned to CPUs, dying with its parent), :func:`wait_until` it is ready (with the probes
:func:`tcp_ready`, :func:`http_ready` and :func:`log_has`, or any callable), read its
:func:`log_tail`, and stop it with :func:`terminate_all` / :func:`terminate_each`.

(``mirakuru`` does this too, but always sets its own ``preexec_fn``: a child could then be
neither pinned to its CPUs before exec nor tied to its parent's death.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask for SIGTERM when the parent dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_preexec(cpus: frozenset[int] | None = None) -> Callable[[], None] | None:
    """The ``preexec_fn`` for a child spawned from the calling thread.

    Children run in their own session (so a Ctrl-C in the terminal reaches only the parent,
    which then stops them in order). On Linux, a child spawned from the main thread also gets
    SIGTERM if the parent dies outright, so it cannot outlive a killed ``picospec up`` or test
    run. The kernel ties that signal to the spawning *thread*, so children spawned from other
    threads (``asyncio.to_thread``, executors) do not get it: they would be killed as soon as
    that worker thread exits.

    ``cpus`` pins the child, before it runs anything, to those CPUs: every thread it starts
    inherits the set (torch's and Go's runtimes size their thread pools from it).
    """
    die = _libc is not None and threading.current_thread() is threading.main_thread()
    if not die and cpus is None:
        return None

    def preexec() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if die:
            _die_with_parent()

    return preexec


def split_cpus(cpus: Iterable[int] | None = None) -> tuple[frozenset[int], frozenset[int]]:
    """Disjoint (edge, cloud) CPU sets from the CPUs this process may use: the first half for
    the edge (at least one), the rest for the cloud. On 2 cores: edge {0}, cloud {1}."""
    avail = sorted(os.sched_getaffinity(0) if cpus is None else set(cpus))
    if len(avail) < 2:
        raise ValueError(f"pinning the edge and the cloud apart needs 2 CPUs, have {avail}")
    half = max(1, len(avail) // 2)
    return frozenset(avail[:half]), frozenset(avail[half:])


def parse_cpus(text: str) -> frozenset[int]:
    """``0``, ``0,2`` or ``1-3`` (as taskset's list format) to a set of CPU numbers."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"bad CPU list {text!r}: use e.g. 0, 0,2 or 1-3") from None
    if not out or min(out) < 0:
        raise ValueError(f"bad CPU list {text!r}")
    return frozenset(out)


def log_tail(path: str | os.PathLike[str], lines: int = 40, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log file (or a note that it is missing)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return f"(no log at {p})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in text) if text else f"(empty log {p})"


class NotReady(TimeoutError):
    """:func:`wait_until` gave up: its condition did not hold in time (``returncode`` None), or
    the process it watched exited first (``returncode``: its exit code)."""

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def wait_until(
    ready: Callable[[], T | None | bool],
    timeout: float,
    what: str,
    *,
    proc: subprocess.Popen[Any] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    interval: float = 0.05,
) -> T:
    """Call ``ready()`` every ``interval`` seconds until it returns something truthy; return that.

    ``ready`` runs at least once (even with ``timeout <= 0``), and what it raises propagates.
    After ``timeout`` seconds: :class:`NotReady` ("timed out after ... waiting for <what>").
    With ``proc``, checked before each try: :class:`NotReady` at once when it has exited
    ("<what> exited with code N", so ``what`` names that process, e.g. ``nats-server hub``).
    Both messages end with the tail of ``log_path`` when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise NotReady(
                f"{what} exited with code {proc.returncode}{_log_note(log_path)}",
                returncode=proc.returncode,
            )
        got = ready()
        if got:
            return got
        if time.monotonic() > deadline:
            if proc is not None and proc.poll() is not None:  # it exited in the last interval
                continue  # said as an exit, above
            last = "" if got is None or got is False else f" (last: {got!r})"
            raise NotReady(
                f"timed out after {timeout:g}s waiting for {what}{last}{_log_note(log_path)}"
            )
        time.sleep(interval)


def _log_note(log_path: str | os.PathLike[str] | None) -> str:
    return "" if log_path is None else f" (log {log_path}):\n{log_tail(log_path)}"


def tcp_ready(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of a GET of ``url``; None when nothing answers (or not in HTTP)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.close()
        return int(e.code)
    except (OSError, ValueError, http.client.HTTPException):
        return None


def http_ready(url: str, expect: int = 200, timeout: float = 1.0) -> bool:
    """Whether a GET of ``url`` answers with status ``expect``."""
    return http_status(url, timeout) == expect


def log_has(path: str | os.PathLike[str], text: str) -> bool:
    """Whether the log at ``path`` contains ``text`` (False while it does not exist)."""
    try:
        return text in Path(path).read_text(errors="replace")
    except OSError:
        return False


def spawn(
    argv: list[str],
    log_path: Path,
    env: dict[str, str],
    cwd: Path,
    cpus: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log_path``, in its own session
    (pinned to ``cpus`` when given)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=child_preexec(cpus),
        )


def terminate_all(
    procs: Iterable[subprocess.Popen[bytes]], timeout: float, sig: int = signal.SIGTERM
) -> None:
    """Signal every live process, wait for all up to ``timeout`` seconds, then SIGKILL the rest."""
    terminate_each([(p, timeout) for p in procs], sig)


def terminate_each(
    procs: Iterable[tuple[subprocess.Popen[bytes], float]], sig: int = signal.SIGTERM
) -> None:
    """Signal every live process at once; SIGKILL each one still alive after its own timeout."""
    live = [(p, t) for p, t in procs if p.poll() is None]
    for p, _ in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
    start = time.monotonic()
    for p, t in sorted(live, key=lambda pt: pt[1]):
        try:
            p.wait(max(0.0, start + t - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
