"""A load generator for the drafter's OpenAI-compatible API, and the soak test behind ``make soak``.

:func:`run_load` keeps ``concurrency`` streaming chat completions in flight for ``duration_s``
seconds (asyncio + aiohttp) and returns a report::

    {"requests": 640, "ok": 640, "errors": {}, "error_count": 0, "tokens": 40960,
     "duration_s": 61.2, "tokens_per_s": 669.3, "requests_per_s": 10.5,
     "ttft_s": {"p50": ..., "p99": ..., "mean": ...}, "itl_s": {"p50": ..., "p99": ..., ...},
     "concurrency": 32}

TTFT is from sending the request to the first content chunk; ITL is the gap between consecutive
content chunks of one stream, per token: a chunk that carries ``k`` tokens (told by vLLM's
``continuous_usage_stats``, which the drafter and vLLM's server both honour) after a gap ``g``
counts ``k`` inter-token latencies of ``g / k``, as the drafter's own
``picospec_inter_token_latency_seconds`` does (a chunk's tokens arrive together; a stream that
commits several tokens per verdict is not credited with zero gaps). Errors are counted by HTTP
status (``"429"``), by an error event inside a stream (``"stream:cloud_unreachable"``), a stream
that ended without ``[DONE]`` (``"incomplete"``), a client exception (``"ClientConnectorError"``),
or an answer the caller's ``check`` refused (``"mismatch"``).

Command line::

    python -m picospec.tools.loadgen --url http://127.0.0.1:8000/v1 --concurrency 32 --duration 60
    python -m picospec.tools.loadgen --soak 600    # make soak: a whole stack on tiny test models

``--soak SECONDS`` builds the tiny test models (``tests/tinymodels.py``, imported by path) into a
temporary directory, starts a local stack with 2 verifiers, runs the load against it while it
kills one verifier with SIGKILL and restarts it every ``--kill-every`` seconds, samples the
resident memory (VmRSS) of every service, and prints the report with the memory figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from picospec.tools.promtext import series_sum
from picospec.tools.sse import EventStream

DEFAULT_PROMPTS = (
    "Tell me a story about a lighthouse.",
    "Explain how rain forms.",
    "List five fruits and their colours.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Describe a busy market in the morning.",
    "How do bicycles stay upright?",
    "Give three tips for learning to cook.",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else None,
        "max": max(values) if values else None,
    }


@dataclass
class RequestResult:
    """One streamed request as the load generator saw it."""

    prompt: str
    status: int = 0
    text: str = ""
    tokens: int = 0  # usage.completion_tokens of the final chunk
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None  # the error label, None when the request succeeded
    retry_after: str | None = None
    elapsed_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # the final chunk's ``picospec`` object


async def stream_one(
    http: aiohttp.ClientSession,
    url: str,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.0,
    timeout_s: float = 300.0,
    extra: dict[str, Any] | None = None,
    api_key: str | None = None,
    abort_after_chunks: int | None = None,
) -> RequestResult:
    """POST one streaming chat completion to ``url`` (the ``/v1`` base) and time its chunks.

    ``abort_after_chunks``: close the connection after that many content chunks (a client that
    goes away mid-stream); the result then has ``error == "aborted"``.
    """
    body: dict[str, Any] = {
        "model": "picospec",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        # OpenAI's usage in the last chunk; vLLM's usage so far in every chunk
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        **(extra or {}),
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = RequestResult(prompt=prompt)
    t0 = time.perf_counter()
    last: float | None = None
    counted = 0  # completion tokens of the chunks seen so far (continuous usage)
    parts: list[str] = []
    stream = EventStream()
    try:
        async with http.post(
            f"{url}/chat/completions",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as r:
            res.status = r.status
            if r.status != 200:
                res.retry_after = r.headers.get("Retry-After")
                res.error = str(r.status)
                await r.read()
                return res
            async for obj in stream.aevents(r.content):
                choices = obj.get("choices") or [{}]
                delta = (choices[0].get("delta") or {}).get("content") or choices[0].get("text")
                usage = obj.get("usage") or {}
                if delta:
                    now = time.perf_counter()
                    seen = int(usage.get("completion_tokens", counted + 1))
                    k = max(1, seen - counted)
                    counted = max(counted, seen)
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.extend([(now - last) / k] * k)
                    last = now
                    parts.append(delta)
                    if abort_after_chunks is not None and len(parts) >= abort_after_chunks:
                        res.error = "aborted"
                        return res  # leaving the block closes the connection
                if usage:
                    res.tokens = int(usage.get("completion_tokens", 0))
                if obj.get("picospec"):
                    res.stats = obj["picospec"]
        if res.error is None:
            res.error = stream.problem
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
        res.error = type(e).__name__
    finally:
        res.text = "".join(parts)
        res.elapsed_s = time.perf_counter() - t0
    return res


async def run_load(
    url: str,
    concurrency: int = 32,
    duration_s: float = 60.0,
    max_tokens: int = 64,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    temperature: float = 0.0,
    timeout_s: float = 300.0,
    extra: dict[str, Any] | None = None,
    api_key: str | None = None,
    check: Callable[[str, str], bool] | None = None,
    max_requests: int | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> dict[str, Any]:
    """Keep ``concurrency`` streams in flight for ``duration_s`` seconds; return the report.

    No new request starts after ``duration_s`` (or once ``max_requests`` have started); the ones
    in flight then finish (each bounded by ``timeout_s``). ``check(prompt, text)`` returning
    False counts a successful answer as a ``mismatch`` error.
    """
    if concurrency < 1 or duration_s < 0:
        raise ValueError("concurrency must be >= 1 and duration_s >= 0")
    results: list[RequestResult] = []
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    conn = aiohttp.TCPConnector(limit=concurrency + 8)

    async def worker(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal started
        n = i
        while time.perf_counter() < deadline and (max_requests is None or started < max_requests):
            started += 1
            prompt = prompts[n % len(prompts)]
            n += concurrency
            res = await stream_one(
                http, url, prompt, max_tokens, temperature, timeout_s, extra, api_key
            )
            if res.error is None and check is not None and not check(prompt, res.text):
                res.error = "mismatch"
            results.append(res)
            if on_result is not None:
                on_result(res)
            if res.error is not None and res.status in (429, 503):
                await asyncio.sleep(min(5.0, float(res.retry_after or 1)))  # back off

    async with aiohttp.ClientSession(connector=conn) as http:
        await asyncio.gather(*(worker(i, http) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return report(results, elapsed, concurrency)


def report(results: Sequence[RequestResult], elapsed_s: float, concurrency: int) -> dict[str, Any]:
    """The summary of a run: counts, throughput, TTFT and ITL percentiles, errors by label."""
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "tokens": tokens,
        "duration_s": round(elapsed_s, 3),
        "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else None,
        "requests_per_s": len(ok) / elapsed_s if elapsed_s > 0 else None,
        "ttft_s": _summary(ttft),
        "itl_s": _summary(itl),
        "concurrency": concurrency,
    }


# --- the soak test ------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS from /proc), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _load_tinymodels(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("picospec_soak_tinymodels", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the tiny model builder {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_tinymodels() -> Path:
    return Path(__file__).resolve().parents[3] / "tests" / "tinymodels.py"


async def _ready(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.5)
    return False


async def _metric(url: str, name: str) -> float | None:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    return series_sum(text, name) or 0.0


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Start a stack on the tiny models, load it for ``args.soak`` seconds while killing and
    restarting a verifier, and report throughput, latencies, errors, restarts and memory."""
    from picospec.tools.stack.up import Stack, StackConfig

    tiny = _load_tinymodels(Path(args.tinymodels))
    work = Path(tempfile.mkdtemp(prefix="picospec-soak-"))
    print(f"soak: building tiny models in {work}", flush=True)
    target = tiny.build(work / "target", seed=1)
    draft = tiny.build(work / "draft", seed=2, like=target, noise=0.3)
    env = {
        "PICOSPEC_VERIFY_TIMEOUT_S": "2",
        "PICOSPEC_REQUEST_TIMEOUT_S": "30",
        "PICOSPEC_THREADS": "1",
        "PICOSPEC_MAX_CONCURRENT_REQUESTS": str(max(32, args.concurrency)),
        "PICOSPEC_DRAIN_GRACE_S": "10",
    }
    cfg = StackConfig(
        verifiers=2,
        drafter_model=str(draft),
        verifier_model=str(target),
        env=env,
        run_dir=work / "stack",
        ready_timeout=180.0,
    ).with_free_ports()
    victim, keeper = "verifier-2", "verifier-1"
    kill_every = args.kill_every or min(60.0, args.soak / 2)
    with Stack(cfg) as stack:
        print(
            f"soak: stack up (logs in {stack.run_dir}); {args.soak:.0f}s at concurrency "
            f"{args.concurrency}, SIGKILL + restart of {victim} every {kill_every:.0f}s",
            flush=True,
        )
        return asyncio.run(_soak(stack, args, victim, keeper, kill_every))


async def _soak(
    stack: Any, args: argparse.Namespace, victim: str, keeper: str, kill_every: float
) -> dict[str, Any]:
    names = [n for n in stack.services if n.startswith("verifier")] + ["drafter", "sampler"]
    memory: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    t0 = time.perf_counter()
    restarts: list[dict[str, float]] = []
    stop = asyncio.Event()
    progress: list[int] = [0, 0]

    def sample() -> None:
        for n in names:
            pid = stack.pids.get(n)
            rss = rss_bytes(pid) if pid else None
            if rss is not None:
                memory[n].append((time.perf_counter() - t0, rss))

    def on_result(r: RequestResult) -> None:
        progress[0] += 1
        progress[1] += r.error is not None

    async def sampler_task() -> None:
        while not stop.is_set():
            sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5.0)

    async def chaos() -> None:
        n = 0
        while True:
            n += 1
            wake = t0 + n * kill_every
            if wake > t0 + args.soak - 5:
                return
            await asyncio.sleep(max(0.0, wake - time.perf_counter()))
            stack.kill(victim, signal.SIGKILL)
            t_kill = time.perf_counter() - t0
            # spawned from this (the main) thread, so the child dies with us if we are killed
            stack.start_service(victim, wait=False)
            ok = await _ready(stack.services[victim].url, 120.0)
            restarts.append(
                {
                    "killed_at_s": round(t_kill, 1),
                    "ready_after_s": round(time.perf_counter() - t0 - t_kill, 1),
                    "ready": ok,
                }
            )
            if ok:
                stack.services[victim].was_ready = True
            print(
                f"soak: t={t_kill:.0f}s killed {victim}; back after "
                f"{restarts[-1]['ready_after_s']}s; {progress[0]} requests, "
                f"{progress[1]} errors so far",
                flush=True,
            )

    bg = [asyncio.create_task(sampler_task()), asyncio.create_task(chaos())]
    result = await run_load(
        stack.api_url,
        concurrency=args.concurrency,
        duration_s=args.soak,
        max_tokens=args.max_tokens,
        timeout_s=120.0,
        on_result=on_result,
    )
    stop.set()
    bg[1].cancel()
    await asyncio.gather(*bg, return_exceptions=True)
    sample()
    # after the load: sessions and KV caches must be freed everywhere
    await asyncio.sleep(3.0)
    held = {}
    for n in names:
        if n.startswith("verifier"):
            url = stack.services[n].url
            held[n] = {
                "active_sessions": await _metric(url, "picospec_active_sessions"),
                "kv_cache_bytes": await _metric(url, "picospec_kv_cache_bytes"),
            }
    mem: dict[str, Any] = {}
    warm = min(20.0, args.soak / 4)  # after the first requests (torch's allocations)
    for n, series in memory.items():
        if not series:
            continue
        after_warmup = [rss for t, rss in series if t >= warm] or [series[-1][1]]
        mem[n] = {
            "start_mib": round(after_warmup[0] / 2**20, 1),
            "end_mib": round(series[-1][1] / 2**20, 1),
            "max_mib": round(max(rss for _, rss in series) / 2**20, 1),
            "samples": len(series),
        }
        if n == victim:
            mem[n]["note"] = "killed and restarted during the soak: a new process each time"
    result.update(
        {"verifier_restarts": restarts, "memory": mem, "after_load": held, "victim": victim}
    )
    return result


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m picospec.tools.loadgen",
        description="streaming load against the drafter's API; --soak runs a whole stack",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the API base URL")
    p.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--mode", default=None, help="the request's mode (picospec, dssd, ar...)")
    p.add_argument("--api-key", default=os.environ.get("PICOSPEC_API_KEY"))
    p.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start a stack on tiny test models and soak it for SECONDS, killing a verifier",
    )
    p.add_argument(
        "--kill-every",
        type=float,
        default=None,
        help="--soak: SIGKILL + restart a verifier this often (default min(60, SECONDS/2))",
    )
    p.add_argument(
        "--tinymodels",
        default=str(_default_tinymodels()),
        help="--soak: the tiny model builder (tests/tinymodels.py)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        print("--concurrency must be >= 1", file=sys.stderr)
        return 2
    if args.soak is not None:
        result = soak(args)
    else:
        extra = {"mode": args.mode} if args.mode else None
        result = asyncio.run(
            run_load(
                args.url,
                concurrency=args.concurrency,
                duration_s=args.duration,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                extra=extra,
                api_key=args.api_key,
            )
        )
    print(json.dumps(result, indent=2), flush=True)
    return 0 if result["error_count"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
