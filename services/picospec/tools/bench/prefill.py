"""``picospec bench --prefill N``: a long prompt's prefill, and what it does to running streams.

In one process, on the CPUs the benchmark would give the cloud (``--cloud-cpus``, else the
second half of this machine's), with the verifier's model:

1. **The prefill alone**, N tokens of real text (MT-Bench questions, repeated): through
   transformers (a ``DynamicCache``, the ``copy`` layout), through the slot layout in one
   forward, and through the scheduler in chunks of ``max_batch_tokens`` (what a verifier
   does). The three take turns, ``--repeat`` times; the medians and their ratios to
   transformers are reported.
2. **Streams while it runs**: ``--prefill-streams`` cloud-only (``ar``) streams decode on the
   scheduler (:class:`picospec.runtime.scheduler.Batcher`, the verifier's core); once each has a few
   tokens, the long prompt arrives. Reported: the streams' inter-token latency before the
   prompt arrived and while it was prefilled (median and max), i.e. how much later their next
   token comes, and whether their tokens equal those of a run without the long prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from picospec.tools.bench.run import load_prompts

STREAM_WARM_TOKENS = 4  # tokens each stream decodes before the long prompt arrives


def _long_ids(model: Any, n: int) -> list[int]:
    text = "\n\n".join(load_prompts(None, quick=False))
    ids = model.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace, cpus: frozenset[int] | None) -> dict[str, Any]:
    import torch

    from picospec.config import Settings
    from picospec.runtime.loading import load_model
    from picospec.runtime.scheduler import Batcher, Job
    from picospec.speculation.sampling import SamplingParams
    from picospec.speculation.spec import Mode, SpecConfig
    from picospec.speculation.verifier import VerifierSession

    if cpus:
        os.sched_setaffinity(0, cpus)
    threads = args.threads or len(os.sched_getaffinity(0))
    model = load_model(args.verifier, threads=threads)
    budget = Settings().max_batch_tokens
    n = args.prefill
    if n >= model.max_context:
        raise ValueError(f"--prefill {n} must be below the model's context {model.max_context}")
    ids = _long_ids(model, n)
    greedy = SamplingParams(temperature=0.0)
    ar = SpecConfig(mode=Mode.AR)

    def copy_layout() -> None:
        model.kv_layout = "copy"
        try:
            model.new_cache().extend(ids, keep=1)
        finally:
            model.kv_layout = "slots"

    def slots_whole() -> None:
        model.new_cache(n + 8).extend(ids, keep=1)

    def slots_chunked() -> None:
        vs = VerifierSession(model, b"p" * 16, ids, greedy, ar, capacity=n + 8, prefill=False)
        b = Batcher(max_tokens=budget)
        b.add(Job(vs.prefill()))
        b.run_all()

    with torch.inference_mode():
        slots_whole()  # packing, allocator and kernels warm
        times: dict[str, list[float]] = {"transformers": [], "slots": [], "slots_chunked": []}
        for _ in range(args.repeat):
            times["transformers"].append(_timed(copy_layout))
            times["slots"].append(_timed(slots_whole))
            times["slots_chunked"].append(_timed(slots_chunked))
        alone = {k: statistics.median(v) for k, v in times.items()}
        streams = _streams_during_prefill(model, ids, budget, args.prefill_streams)
    return {
        "model": model.name,
        "prompt_tokens": n,
        "max_batch_tokens": budget,
        "threads": threads,
        "cpus": sorted(os.sched_getaffinity(0)),
        "repeat": args.repeat,
        "prefill_s": alone,
        "prefill_s_all": times,
        "vs_transformers": {k: v / alone["transformers"] for k, v in alone.items()},
        "streams": streams,
    }


def _streams_during_prefill(model: Any, ids: list[int], budget: int, n: int) -> dict[str, Any]:
    """``n`` ar streams on a :class:`Batcher`; the long prompt arrives once each has
    :data:`STREAM_WARM_TOKENS` tokens. Inter-token gaps before and during its prefill."""
    from picospec.runtime.scheduler import Batcher, Job, run
    from picospec.speculation.sampling import SamplingParams
    from picospec.speculation.spec import Mode, SpecConfig
    from picospec.speculation.verifier import VerifierSession

    greedy, ar = SamplingParams(temperature=0.0), SpecConfig(mode=Mode.AR)
    prompts = [model.encode(p) for p in load_prompts(None, quick=True)][: max(1, n)]
    while len(prompts) < n:
        prompts.append(prompts[len(prompts) % 4])
    steps = 10_000  # far more than the run needs: the streams are stopped by cancel

    def sessions() -> list[VerifierSession]:
        return [
            VerifierSession(model, bytes([i]) * 16, p, greedy, ar) for i, p in enumerate(prompts)
        ]

    b = Batcher(max_tokens=budget)
    jobs = [Job(vs.ar_stream(steps, eos=()), key=i) for i, vs in enumerate(sessions())]
    for j in jobs:
        b.add(j)
    stamps: list[list[float]] = [[] for _ in jobs]
    long_job: Job[None] | None = None
    arrived = done = None
    while long_job is None or not long_job.done:
        b.step()
        now = time.perf_counter()
        for s, j in zip(stamps, jobs, strict=True):
            s.extend([now] * (len(j.emitted) - len(s)))
        if long_job is None and min(len(s) for s in stamps) >= STREAM_WARM_TOKENS:
            vs = VerifierSession(model, b"L" * 16, ids, greedy, ar, capacity=len(ids) + 8,
                                 prefill=False)  # fmt: skip
            long_job = Job(vs.prefill(), key="long")
            b.add(long_job)
            arrived = now
    done = time.perf_counter()
    tokens = [list(j.emitted) for j in jobs]
    for i in range(len(jobs)):
        b.cancel(i)
    # the same streams without the long prompt: the same tokens
    same = True
    for vs, got in zip(sessions(), tokens, strict=True):
        same &= [run(vs.ar_next()) for _ in got] == got
    before = [b2 - a for s in stamps for a, b2 in zip(s, s[1:], strict=False) if b2 <= arrived]
    during = [
        b2 - a for s in stamps for a, b2 in zip(s, s[1:], strict=False) if arrived < b2 <= done
    ]
    return {
        "streams": len(jobs),
        "prefill_with_streams_s": done - arrived,
        "itl_before_s": {"median": statistics.median(before), "max": max(before)},
        "itl_during_s": {"median": statistics.median(during), "max": max(during)}
        if during
        else None,
        "tokens_during_prefill": len(during),
        "tokens_equal_without_the_prompt": same,
    }
