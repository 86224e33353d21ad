"""``picospec bench --colocation``: how much the edge's compute slows the cloud's on one machine.

The benchmark runs the edge and the cloud on one machine, pinned to disjoint CPUs. They still
share the rest of the host: caches, memory, power and clock limits, and on a virtual machine
whatever the hypervisor shares between its virtual CPUs. A separate edge device and cloud
server share none of it.

This matters for time to first token. In ``ar`` the edge is idle while the verifier prefills.
In the speculative modes the draft model prefills the same prompt on the edge at the same
time, so on one machine the verifier's prefill, and the first token with it, can come later.
That cost belongs to the test bench, not to the design.

The measurement, interleaved so that a drift of the machine's speed falls on both alike:

- the verifier's model prefills a prompt on the cloud's CPUs, ``n`` times with the edge's
  CPUs idle and ``n`` times while a second process prefills the draft model on them,
  alternating;
- the prompts are the benchmark's, and the prefill is the services' own (a fresh cache
  extended by the prompt).

It reports both medians and the median of the ratios of each pair (an idle and a busy prefill
of the same prompt, one after the other): ``cloud_prefill_slowdown``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

from picospec.tools.bench.run import p10_p90

SETTLE_S = 0.2  # after switching the edge on or off, before the timed prefill


def _prefill(model: Any, ids: list[int]) -> None:
    model.new_cache(len(ids) + 1).extend(ids, keep=1)


def _edge_worker(
    cpus: frozenset[int],
    name: str,
    quantize: str | None,
    prompts: list[list[int]],
    busy: Any,
    stop: Any,
    ready: Any,
) -> None:
    """The edge side: prefill the draft model over and over while ``busy`` is set."""
    os.sched_setaffinity(0, cpus)
    from picospec.runtime.loading import load_model

    model = load_model(name, device="cpu", threads=len(cpus), quantize=quantize)
    _prefill(model, prompts[0])
    ready.set()
    i = 0
    while not stop.is_set():
        if busy.is_set():
            _prefill(model, prompts[i % len(prompts)])
            i += 1
        else:
            time.sleep(0.001)


def measure(
    args: argparse.Namespace, prompts: list[str], cpus: dict[str, frozenset[int]], n: int
) -> dict[str, Any]:
    """Cloud prefills with the edge idle and with the edge prefilling, ``n`` each, alternating."""
    from picospec.runtime.loading import load_model

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus["cloud"])
    ctx = mp.get_context("spawn")
    busy, stop, ready = ctx.Event(), ctx.Event(), ctx.Event()
    try:
        target = load_model(args.verifier, device="cpu", threads=len(cpus["cloud"]))
        ids = [target.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        quantize = None if args.quantize_draft == "none" else args.quantize_draft
        edge = ctx.Process(
            target=_edge_worker,
            args=(cpus["edge"], args.drafter, quantize, ids, busy, stop, ready),
            daemon=True,
        )
        edge.start()
        try:
            if not ready.wait(600):
                raise RuntimeError("the edge's draft model did not load within 600 s")
            for p in ids:  # first-touch costs
                _prefill(target, p)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(2 * n):
                edge_busy = i % 2 == 1
                busy.set() if edge_busy else busy.clear()
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                _prefill(target, ids[(i // 2) % len(ids)])
                times[edge_busy].append(time.perf_counter() - t0)
        finally:
            stop.set()
            edge.join(30)
            if edge.is_alive():
                edge.kill()
    finally:
        os.sched_setaffinity(0, before)
    idle, loaded = statistics.median(times[False]), statistics.median(times[True])
    # each busy prefill follows an idle one of the same prompt: compare them pair by pair
    ratios = [b / a for a, b in zip(times[False], times[True], strict=True)]
    return {
        "verifier": args.verifier,
        "drafter": args.drafter,
        "quantize_draft": args.quantize_draft,
        "edge_cpus": sorted(cpus["edge"]),
        "cloud_cpus": sorted(cpus["cloud"]),
        "prompts": len(ids),
        "prompt_tokens": [len(p) for p in ids],
        "prefills_each": n,
        "cloud_prefill_s_edge_idle": idle,
        "cloud_prefill_s_edge_prefilling": loaded,
        "cloud_prefill_slowdown": statistics.median(ratios),
        "cloud_prefill_slowdown_p10_p90": list(p10_p90(ratios)),
    }
