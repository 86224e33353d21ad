"""Helpers for the fault, fuzz and load tests (``test_faults.py``, ``test_fuzz_services.py``).

The plain helpers (``expected``, ``metric``, ``scrape``, ``post``, ``chat``, ``ENV``) are those of
``test_services.py``, imported from there. Added here: stacks on the tiny models with extra
environment, a streaming client that records when every chunk arrived and never asserts (so a
test can judge failures), bounded polling, and reference continuations of any token prefix.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

import tinymodels
from picospec.runtime.model import LanguageModel
from picospec.speculation.engine import generate
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.tools.sse import EventStream
from picospec.tools.stack.procs import wait_until
from picospec.tools.stack.up import Stack, StackConfig
from test_services import ENV, chat, expected, metric, post, scrape

__all__ = [
    "ENV",
    "StreamResult",
    "build_tiny",
    "chat",
    "continuation",
    "drafter_id",
    "expected",
    "gauge",
    "metric",
    "post",
    "prompt_ids",
    "scrape",
    "stack_config",
    "stream",
    "wait_for",
]

T = TypeVar("T")


def build_tiny(root: Path) -> tuple[Path, Path]:
    """The target and draft tiny models of ``test_services`` (same seeds), saved under root."""
    target = tinymodels.build(root / "target", seed=1)
    draft = tinymodels.build(root / "draft", seed=2, like=target, noise=0.3)
    return target, draft


def stack_config(tiny_dirs: tuple[Path, Path], env: dict[str, str] | None = None, **kw: Any):
    """A :class:`StackConfig` on the tiny models, free ports, ``ENV`` updated with ``env``."""
    base: dict[str, Any] = {
        "verifiers": 2,
        "drafter_model": str(tiny_dirs[1]),
        "verifier_model": str(tiny_dirs[0]),
        "env": {**ENV, **(env or {})},
        "ready_timeout": 120.0,
    }
    base.update(kw)
    return StackConfig(**base).with_free_ports()


def wait_for(
    pred: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll ``pred`` until it returns something truthy (returned); on timeout, ``wait_until``'s
    ``NotReady`` names ``what`` and the last value."""
    return wait_until(pred, timeout, what, interval=interval)


def gauge(stack: Stack, service: str, name: str, **labels: str) -> float:
    """One metric of one service, or NaN if it does not answer."""
    try:
        return metric(scrape(stack.services[service].url), name, **labels)
    except OSError:
        return float("nan")


def drafter_id(stack: Stack) -> str:
    """The drafter's id, from the replica label of its ``picospec_build_info``."""
    text = scrape(stack.services["drafter"].url)
    m = re.search(r'picospec_build_info\{[^}]*replica="(drafter-[0-9a-f]+)"', text)
    assert m, "no drafter replica in picospec_build_info"
    return m.group(1)


def prompt_ids(model: LanguageModel, content: str) -> list[int]:
    return model.encode_chat([{"role": "user", "content": content}])


def continuation(model: LanguageModel, ids: list[int], n: int) -> list[int]:
    """``model``'s greedy continuation (n tokens, or fewer at EOS) of the token list ``ids``."""
    if n <= 0:
        return []
    out = generate(model, None, ids, SamplingParams(temperature=0), SpecConfig(mode=Mode.AR), n)
    return list(out.tokens)


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    content: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # the JSON body of a non-200 answer
    chunks: list[tuple[float, str]] = field(default_factory=list)  # (arrival, content delta)
    final: dict[str, Any] | None = None  # the chunk with finish_reason (usage, picospec)
    error: dict[str, Any] | None = None  # an error event inside the stream
    done: bool = False  # saw data: [DONE]
    exception: str | None = None
    t_sent: float = 0.0
    t_end: float = 0.0

    @property
    def text(self) -> str:
        return "".join(d for _, d in self.chunks)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.final is not None

    def gaps(self) -> list[tuple[float, float]]:
        """(start, length) of every gap between consecutive chunks, the first from sending and
        the last to the end of the stream (so a stream that stops short shows its stall)."""
        times = [self.t_sent] + [t for t, _ in self.chunks] + ([self.t_end] if self.t_end else [])
        return [(a, b - a) for a, b in zip(times, times[1:], strict=False)]

    def stall_around(self, t: float) -> float:
        """The longest gap between chunks that ends after ``t`` (what a kill at t caused)."""
        return max((g for start, g in self.gaps() if start + g >= t), default=0.0)

    def max_gap_before(self, t: float) -> float:
        return max((g for start, g in self.gaps()[1:] if start + g < t), default=0.0)


async def stream(
    api: str,
    content: str,
    max_tokens: int,
    http: aiohttp.ClientSession | None = None,
    timeout: float = 120.0,
    headers: dict[str, str] | None = None,
    into: StreamResult | None = None,
    **kw: Any,
) -> StreamResult:
    """POST a greedy streaming chat completion; record every chunk's arrival. Never asserts.

    ``into``: fill this result as chunks arrive (so a caller can watch the progress)."""
    body = {
        "model": "picospec",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        **kw,
    }
    res = into if into is not None else StreamResult(content=content)
    own = http is None
    http = http or aiohttp.ClientSession()
    res.t_sent = time.perf_counter()
    try:
        async with http.post(
            f"{api}/chat/completions",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            res.status = r.status
            res.headers = dict(r.headers)
            if r.status != 200:
                res.body = json.loads(await r.read())
                return res
            events = EventStream()
            try:
                async for obj in events.aevents(r.content):
                    choice = obj["choices"][0]
                    delta = choice["delta"].get("content")
                    if delta:
                        res.chunks.append((time.perf_counter(), delta))
                    if choice["finish_reason"]:
                        res.final = obj
            finally:
                res.done, res.error = events.done, events.error
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        res.exception = f"{type(e).__name__}: {e}"
    finally:
        res.t_end = time.perf_counter()
        if own:
            await http.close()
    return res
