"""``picospec bench`` end to end on the tiny models: structure and internal consistency only
(never timings: speed figures come from real runs and are quoted in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tinymodels
from picospec.bench import MODES, bound, mtbench_questions


def test_mtbench_prompts_come_from_the_wheel() -> None:
    questions = mtbench_questions()
    assert len(questions) == 80 and all(isinstance(q, str) and q for q in questions)


def test_bound_formula() -> None:
    # α = 1: the draft model's own speed; α = 0: every token pays W + R
    assert bound(0.02, 1.0, 4, 0.2) == pytest.approx(50.0)
    assert bound(0.02, 0.0, 4, 0.2) == pytest.approx(1 / (0.02 + 0.03 + 0.2))


def test_bench_quick_json_is_consistent(tmp_path: Path) -> None:
    target = tinymodels.build(tmp_path / "target", seed=1)
    draft = tinymodels.build(tmp_path / "draft", seed=2, like=target, noise=0.3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about dragons.\nWhat is two plus two?\nName a colour.\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "picospec.cli",
            "bench",
            "--quick",
            "--profiles",
            "lan",
            "--prompts",
            str(prompts),
            "--drafter",
            str(draft),
            "--verifier",
            str(target),
            "--max-tokens",
            "24",
            "--json",
            "--plot-dir",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["config"]["prompts"] == 3 and report["config"]["max_tokens"] == 24
    rows = report["profiles"]["lan"]
    assert list(rows) == MODES
    for mode, r in rows.items():
        assert r["prompts"] == 3 and 0 < r["tokens"] <= 3 * 24
        assert r["bytes_per_token"] == pytest.approx(
            (r["bytes_up"] + r["bytes_down"]) / r["tokens"]
        )
        assert r["tokens_per_s_p10"] <= r["tokens_per_s"] <= r["tokens_per_s_p90"]
        assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / rows["ar"]["tokens_per_s"])
        if mode in ("vanilla", "dssd", "picospec"):
            assert 0 <= r["acceptance_rate"] <= 1 and r["accepted_tokens"] <= r["drafted_tokens"]
            assert r["verifier_forwards"] == 3 + r["rounds"] + r["migrations"]
            assert r["verifier_forwards_per_token"] < 1.0 or r["acceptance_rate"] < 0.5
    assert rows["edge"]["bytes_per_token"] == 0 and rows["edge"]["verifier_forwards"] == 0
    assert rows["ar"]["verifier_forwards"] == 3 + rows["ar"]["tokens"] - 3
    # full draft distributions cost more even at a 77-token vocabulary (at 49152: ~1000x)
    assert rows["vanilla"]["bytes_per_token"] > 2 * rows["picospec"]["bytes_per_token"]
    p = rows["picospec"]
    assert 0 < p["draft_step_s"] and rows["edge"]["draft_step_s"] > 0
    assert p["bound_tokens_per_s"] == pytest.approx(
        bound(p["draft_step_s"], p["acceptance_rate"], 4, p["verify_round_trip_s"])
    )
    assert p["bound_ratio"] == pytest.approx(p["decode_tokens_per_s"] / p["bound_tokens_per_s"])
    assert rows["ar"]["draft_step_s"] is None  # the draft model does not run in ar
    for png in report["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
