"""``picospec capacity`` on a tiny model: the real verifier replica over a real nats-server.

Nothing here is timed; the checks are what the figures must show whatever the machine: every
session of a batched round shares one forward, the slot layout copies no cache byte per round
(the copy layout copies every past every round), memory is what the caches reserve, and the
report, the knee and the plot come out.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from conftest import tiny_model
from picospec.tools.capacity import plot, run_grid


def test_capacity_grid_on_a_tiny_model(tmp_path: Path) -> None:
    lm = tiny_model(16, seed=21)
    args = argparse.Namespace(
        sessions=(1, 3), contexts=(16, 40), layouts=("slots", "copy"), batching=(True, False),
        rounds=3, warmup=1, draft_len=3, seed=0, memory_fraction=0.5,
    )  # fmt: skip
    rep = asyncio.run(run_grid(args, lm, log=lambda _line: None))
    points = {(p["layout"], p["batching"], p["sessions"], p["context"]): p for p in rep["points"]}
    assert len(points) == 16 and not any(p.get("skipped") for p in points.values())
    for (layout, batching, n, ctx), p in points.items():
        assert p["rounds"] == 3
        assert p["verified_tokens_per_s"] > 0 and p["latency_p99_s"] >= p["latency_p50_s"] > 0
        # lock-step rounds: the blocks queued together share forwards when batched (how many
        # arrive together depends on timing), one forward per session otherwise
        if batching:
            assert 1 <= p["sessions_per_forward"] <= n
        else:
            assert p["sessions_per_forward"] == 1
        assert p["cache_used_bytes"] >= n * ctx * lm.kv_token_bytes
        if layout == "slots":
            assert p["copied_bytes_per_round"] == 0 and p["slot_grows"] == 0
            assert p["cache_reserved_bytes"] >= p["cache_used_bytes"]
        else:
            assert p["copied_bytes_per_round"] >= n * ctx * lm.kv_token_bytes
    shared = [p["sessions_per_forward"] for k, p in points.items() if k[1] and k[2] == 3]
    assert max(shared) > 1  # the batched path does batch
    assert set(rep["knee"]) == {"16", "40"}
    assert all(k["sessions"] in (1, 3) for k in rep["knee"].values())
    kinds = {c["what"] for c in rep["comparisons"]}
    assert {"slots vs copy (batched)", "batched vs sequential (slots)"} <= kinds
    assert plot(rep, tmp_path).stat().st_size > 0
    assert lm.kv_layout == "slots" and lm.batching  # the model is left as it was
