"""``picospec bench --concurrency 1,4,16``: throughput as users are added.

One edge-cloud stack per network profile; for each concurrency level ``c`` and each mode (the
modes taking turns level by level, so a drift of the machine's speed falls on all of them),
``c`` streaming clients keep ``c`` requests in flight until ``max(prompts, 2c) x --repeat``
requests are done. Every request fixes its length the way serving benchmarks do
(``ignore_eos`` and ``min_tokens`` = ``max_tokens``), so every request is ``max_tokens`` long
and the levels compare. Per mode and level it reports:

* total output tokens/s (all requests' tokens over the wall time of the level) and per-user
  tokens/s (each request's tokens over its own time, median);
* TTFT p50 and p90;
* the cloud's model-seconds per generated token: the verifier model thread's forward time
  (``picospec_verify_forward_seconds``: prefills, ``ar`` steps and verification, batched)
  over the tokens generated, the capacity cost of a token;
* whether every greedy answer equals that prompt's answer at concurrency 1 and ``ar``'s;
* under ``--device-profile``, per side the forwards whose real compute overran the profile
  (``emulation``): a batched forward the real CPU cannot compute in the emulated device's time
  runs at the CPU's speed instead.

``--vllm-baseline`` adds the engine users would run instead: vLLM's own OpenAI server
(``make vllm-setup``) serving the verifier's weights in float32 on the cloud's CPUs, driven by
the same client with the same requests (row ``vllm-serve``).

The benchmark's client runs on the cloud's CPUs, as in the other runs. Under
``--device-profile`` a batched forward costs the profile's line over all its tokens (decode is
memory-bound on the emulated devices, so a forward over N sessions costs little more than one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
from typing import Any

from picospec.tools.bench.run import (
    _emulation_summary,
    _pinned,
    _placement,
    _scrape,
    _snapshot,
    scraped,
    stack_config,
)

CONCURRENCY_MODES = ("ar", "picospec")
CLOUD_SECONDS = "picospec_verify_forward_seconds_sum"
VLLM_SERVE = "vllm-serve"
"""The row of ``--vllm-baseline``: vLLM's own OpenAI server on the verifier's weights."""


def _warm(url: str, prompt: str, extra: dict[str, Any], args: argparse.Namespace) -> None:
    """One short request, so first-touch costs stay out of the figures."""
    from picospec.tools.loadgen import run_load

    asyncio.run(
        run_load(
            url,
            1,
            float("inf"),
            min(16, args.max_tokens),
            [prompt],
            args.temperature,
            extra=extra,
            max_requests=1,
        )  # fmt: skip
    )


def parse_levels(text: str) -> list[int]:
    """``1,4,16`` to ``[1, 4, 16]`` (positive, increasing order kept as given, no repeats)."""
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,4,16, got {text!r}") from None
    if not levels or min(levels) < 1 or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError("concurrency levels must be distinct and at least 1")
    return levels


def _percentile(values: list[float], q: float) -> float | None:
    from picospec.tools.loadgen import percentile

    return percentile(values, q)


class _Collected:
    """The results of one level's requests, counted on a progress bar as they finish."""

    def __init__(self, tick: Any) -> None:
        self.results: list[Any] = []
        self._tick = tick

    def add(self, result: Any) -> None:
        self.results.append(result)
        self._tick(len(self.results))


def run_concurrency(
    name: str,
    args: argparse.Namespace,
    prompts: list[str],
    progress: Any,
    placement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every mode of ``args.modes`` at every level of ``args.concurrency`` on one stack (fills
    ``placement``, when given, with the CPUs each side had)."""
    from picospec.tools.loadgen import run_load
    from picospec.tools.stack.natsserver import free_ports
    from picospec.tools.stack.up import Stack
    from picospec.tools.stack.vllmserver import serve as vllm_serve

    cfg = stack_config(name, args, args.drafter, args.quantize_draft)
    levels: list[int] = args.concurrency
    modes = [*args.modes, *([VLLM_SERVE] if args.vllm_baseline else [])]
    rows: dict[str, dict[str, Any]] = {m: {} for m in modes}
    texts: dict[tuple[str, int], dict[str, set[str]]] = {}
    with contextlib.ExitStack() as ctx:
        stack = ctx.enter_context(Stack(cfg))
        if placement is not None:
            placement.update(_placement(stack))
        cloud = stack.cpus["cloud"] if stack.cpus else None
        urls = {m: stack.api_url for m in args.modes}
        if args.vllm_baseline:  # vLLM's own server, the same weights, on the cloud's CPUs
            urls[VLLM_SERVE] = ctx.enter_context(
                vllm_serve(args.verifier, free_ports(1)[0], cloud, stack.run_dir / "vllm.log")
            )
        ctx.enter_context(_pinned(cloud))
        verifier = stack.services["verifier-1"].url
        sides = {"drafter": stack.services["drafter"].url, "verifier": verifier}
        emulated = cfg.device_profile is not None
        base = {"seed": args.seed, "top_p": args.top_p, "ignore_eos": True,
                "min_tokens": args.max_tokens}  # fmt: skip
        extras = {m: {**base, "mode": m, "draft_len": args.draft_len} for m in args.modes}
        extras[VLLM_SERVE] = base
        for mode in modes:  # first-touch costs of each one out of the way
            _warm(urls[mode], prompts[0], extras[mode], args)
        for c in levels:
            n = max(len(prompts), 2 * c) * args.repeat
            for mode in modes:
                done = _Collected(progress(f"{name}: {mode} x{c}", n))
                before = scraped(_scrape(verifier), CLOUD_SECONDS)
                snap = _snapshot(sides, emulated)
                load = asyncio.run(
                    run_load(
                        urls[mode],
                        concurrency=c,
                        duration_s=float("inf"),
                        max_tokens=args.max_tokens,
                        prompts=prompts,
                        temperature=args.temperature,
                        timeout_s=600.0,
                        extra=extras[mode],
                        max_requests=n,
                        on_result=done.add,
                    )
                )
                cloud_s = scraped(_scrape(verifier), CLOUD_SECONDS) - before
                after = _snapshot(sides, emulated)
                paced = {
                    side: {n: v - snap[side][n] for n, v in series.items()}
                    for side, series in after.items()
                }
                if mode == VLLM_SERVE or args.verifier_backend == "vllm":
                    cloud_s = float("nan")  # vLLM's forwards are its own: not seen here
                ok = [r for r in done.results if r.error is None]
                per_user = [r.tokens / r.elapsed_s for r in ok if r.elapsed_s > 0]
                ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
                tokens = sum(r.tokens for r in ok)
                rows[mode][str(c)] = {
                    "concurrency": c,
                    "requests": len(done.results),
                    "errors": load["errors"],
                    "tokens": tokens,
                    "duration_s": load["duration_s"],
                    "tokens_per_s": load["tokens_per_s"],
                    "per_user_tokens_per_s": statistics.median(per_user) if per_user else None,
                    "ttft_p50_s": _percentile(ttft, 50),
                    "ttft_p90_s": _percentile(ttft, 90),
                    "cloud_model_s_per_token": cloud_s / tokens
                    if tokens and cloud_s == cloud_s
                    else None,
                    "emulation": _emulation_summary(paced) if emulated else None,
                }
                by_prompt: dict[str, set[str]] = {}
                for r in ok:
                    by_prompt.setdefault(r.prompt, set()).add(r.text)
                texts[(mode, c)] = by_prompt
    _compare(rows, texts, levels, args)
    return rows


def _compare(
    rows: dict[str, dict[str, Any]],
    texts: dict[tuple[str, int], dict[str, set[str]]],
    levels: list[int],
    args: argparse.Namespace,
) -> None:
    """Scaling against the first level, against ``ar``, and (greedy) whether every answer is
    the same at every level and in every mode."""
    first = str(levels[0])
    for by_level in rows.values():
        base = by_level[first]["tokens_per_s"]
        for row in by_level.values():
            row["scaling"] = row["tokens_per_s"] / base if base else None
            ar = rows.get("ar", {}).get(str(row["concurrency"]))
            if ar and ar["tokens_per_s"]:
                row["vs_ar"] = row["tokens_per_s"] / ar["tokens_per_s"]
    if args.temperature != 0:
        return
    ref_mode = "ar" if "ar" in rows else next(iter(rows))
    ref = texts[(ref_mode, levels[0])]
    for (mode, c), by_prompt in texts.items():
        same = all(len(t) == 1 for t in by_prompt.values()) and all(
            by_prompt[p] == ref.get(p, by_prompt[p]) for p in by_prompt
        )
        rows[mode][str(c)]["identical_to_ref"] = same
    for by_level in rows.values():
        for row in by_level.values():
            row["identical_ref"] = f"{ref_mode} at concurrency {levels[0]}"


def knee(by_level: dict[str, Any]) -> int | None:
    """The last level that still added at least half of what doubling would (its tokens/s per
    level-step grew by ≥ 50% of the ideal); None with fewer than two levels."""
    rows = sorted(by_level.values(), key=lambda r: r["concurrency"])
    if len(rows) < 2:
        return None
    best = rows[0]["concurrency"]
    for prev, cur in zip(rows, rows[1:], strict=False):
        ideal = cur["concurrency"] / prev["concurrency"]
        got = (cur["tokens_per_s"] or 0) / (prev["tokens_per_s"] or 1)
        if got - 1 < 0.5 * (ideal - 1):
            break
        best = cur["concurrency"]
    return best
