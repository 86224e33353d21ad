"""``picospec bench`` end to end on the tiny models: structure and internal consistency only
(never timings: speed figures come from real runs and are quoted in the README)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import tinymodels
from picospec.tools.bench import (
    MAP_MODES,
    MODES,
    PAPER_TABLE1,
    bound,
    break_even_acceptance,
)
from picospec.tools.prompts import mtbench_questions

TINY_PROFILE = (
    "name: tiny-emulated\n"
    "draft: {device: test edge, step_s: 0.003, per_token_s: 0.0005}\n"
    "verify: {device: test cloud, step_s: 0.015, per_token_s: 0.001}\n"
)


def _bench(tmp_path: Path, *extra: str) -> dict:
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
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    for png in report["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def test_mtbench_prompts_come_from_the_wheel() -> None:
    questions = mtbench_questions()
    assert len(questions) == 80 and all(isinstance(q, str) and q for q in questions)


def test_bound_formula() -> None:
    # α = 1: the draft model's own speed; α = 0: every token pays W + R
    assert bound(0.02, 1.0, 4, 0.2) == pytest.approx(50.0)
    assert bound(0.02, 0.0, 4, 0.2) == pytest.approx(1 / (0.02 + 0.03 + 0.2))


def test_break_even_acceptance() -> None:
    # at the break-even acceptance the rate model's pipeline decodes exactly as fast as ar
    a = break_even_acceptance(0.146, 0.03, 4, 0.2)
    assert a is not None and 0 < a < 1
    assert 1 / (0.03 + (1 - a) * (1.5 * 0.03 + 0.2)) == pytest.approx(1 / 0.146)
    assert break_even_acceptance(0.03, 0.05, 4, 0.2) is None  # a draft slower than the target
    assert break_even_acceptance(1.0, 0.01, 4, 0.01) == 0.0  # pays off at any acceptance


def test_implied_acceptance_inverts_the_rate_model() -> None:
    from picospec.tools.bench.speedup_map import implied_acceptance, paper_implied_acceptance

    for alpha in (0.3, 0.75, 0.9, 1.0):
        rate = bound(0.03, alpha, 4, 0.25)
        assert implied_acceptance(rate, 0.03, 4, 0.25) == pytest.approx(alpha)
    assert implied_acceptance(40.0, 0.03, 4, 0.25) is None  # faster than the draft alone
    implied = paper_implied_acceptance(["lan", "4g", "poor"])
    assert set(implied) == set(PAPER_TABLE1)
    for row in implied.values():
        a = [row[p] for p in ("lan", "4g", "poor")]
        # a longer round trip needs a higher acceptance for the same speed
        assert all(x is not None and 0 < x < 1 for x in a) and a[0] < a[1] < a[2]
    # the paper's Llama 1B->70B GSM8K figure (2.51x) implies about 0.9 per token at 4g
    assert implied["Llama 1B->70B, GSM8K"]["4g"] == pytest.approx(0.904, abs=0.005)


def test_bench_quick_json_is_consistent(tmp_path: Path) -> None:
    """One emulated run (a tiny device profile) with the edge and the cloud pinned apart."""
    (tmp_path / "tiny.yaml").write_text(TINY_PROFILE)
    report = _bench(
        tmp_path,
        "--profiles",
        "lan",
        "--device-profile",
        str(tmp_path / "tiny.yaml"),
        "--draft-len",
        "4",  # every mode at one γ, so their bytes per token compare
        "--draft-len-sweep",
        "2,auto",
        "--repeat",
        "2",  # the 3 prompts twice: 6 requests per mode, taking turns
    )
    assert report["config"]["prompts"] == 3 and report["config"]["repeat"] == 2
    assert report["config"]["max_tokens"] == 24
    assert report["config"]["emulated"] and report["config"]["device"]["name"] == "tiny-emulated"
    assert any(n.startswith("EMULATED") for n in report["notes"])
    place = report["placement"]
    assert place["pinned"] and not set(place["edge_cpus"]) & set(place["cloud_cpus"])
    rows = report["profiles"]["lan"]
    assert list(rows) == MODES
    for mode, r in rows.items():
        assert r["prompts"] == 3 and r["requests"] == 6 and 0 < r["tokens"] <= 6 * 24
        assert r["bytes_per_token"] == pytest.approx(
            (r["bytes_up"] + r["bytes_down"]) / r["tokens"]
        )
        assert r["tokens_per_s_p10"] <= r["tokens_per_s"] <= r["tokens_per_s_p90"]
        assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / rows["ar"]["tokens_per_s"])
        if mode in ("vanilla", "dssd", "picospec"):
            assert 0 <= r["acceptance_rate"] <= 1 and r["accepted_tokens"] <= r["drafted_tokens"]
            # per tested token: every rejection ends a block's tested run
            tested = r["accepted_tokens"] + r["rollbacks"]
            assert r["token_acceptance"] == pytest.approx(r["accepted_tokens"] / tested)
            assert r["token_acceptance"] >= r["acceptance_rate"]
            assert r["verifier_forwards"] == 6 + r["rounds"] + r["migrations"]
            assert r["verifier_forwards_per_token"] < 1.0 or r["acceptance_rate"] < 0.5
        assert r["ttft_vs_ar"] == pytest.approx(r["ttft_s"] / rows["ar"]["ttft_s"])
        if mode != "edge":  # the cloud's prefill is part of every cloud mode's first token
            assert 0 < r["cloud_prefill_s"] < r["ttft_s"] and r["ttft_beyond_prefill_s"] > 0
            assert r["cloud_prefill_vs_ar"] == pytest.approx(
                r["cloud_prefill_s"] / rows["ar"]["cloud_prefill_s"]
            )
    edge = rows["edge"]
    assert edge["cloud_prefill_s"] is None and edge["ttft_beyond_prefill_s"] is None
    assert "cloud_prefill_vs_ar" not in edge
    assert not any(n.startswith("TTFT is") for n in report["notes"])  # emulated: padded
    assert rows["edge"]["bytes_per_token"] == 0 and rows["edge"]["verifier_forwards"] == 0
    assert rows["ar"]["verifier_forwards"] == 6 + rows["ar"]["tokens"] - 6
    # full draft distributions cost more even at a 77-token vocabulary (at 49152: ~1000x)
    assert rows["vanilla"]["bytes_per_token"] > 2 * rows["picospec"]["bytes_per_token"]
    p = rows["picospec"]
    assert 0 < p["draft_step_s"] and rows["edge"]["draft_step_s"] > 0
    # the bound at the mean γ that auto (the default) drafted with
    assert p["bound_tokens_per_s"] == pytest.approx(
        bound(p["draft_step_s"], p["token_acceptance"], 4, p["verify_round_trip_s"])
    )
    assert p["bound_ratio"] == pytest.approx(p["decode_tokens_per_s"] / p["bound_tokens_per_s"])
    assert rows["ar"]["draft_step_s"] is None  # the draft model does not run in ar
    # the draft-length sweep ran picospec at each length in the same stack, and auto (the
    # default) reports the lengths it chose
    assert set(report["draft_len_sweep"]["lan"]) == {"2", "auto"}
    detail = report["draft_len_sweep_detail"]["lan"]
    assert detail["2"]["draft_len_rounds"] is None and detail["auto"]["draft_len_rounds"]
    assert all(d["identical_to_ar"] is True for d in detail.values())
    assert rows["picospec"]["draft_len"] == 4 and rows["picospec"]["draft_len_mean"] is None
    assert detail["auto"]["draft_len"] == "auto" and detail["auto"]["draft_len_mean"] >= 1
    # greedy output under emulation is token-identical to ar in every verified mode
    assert all(rows[m]["identical_to_ar"] is True for m in ("ar", "vanilla", "dssd", "picospec"))
    # every forward was paced: the draft model's on the edge, the target's in the cloud
    emu = {m: r["emulation"] for m, r in rows.items()}
    assert emu["ar"]["verifier"]["forwards"] >= rows["ar"]["tokens"] - 3
    assert emu["ar"]["drafter"]["forwards"] == 0 and emu["edge"]["verifier"]["forwards"] == 0
    for mode in ("vanilla", "dssd", "picospec"):
        v, d = emu[mode]["verifier"], emu[mode]["drafter"]
        assert v["forwards"] == rows[mode]["verifier_forwards"] and d["forwards"] > 0
        assert v["mean_emulated_s"] >= 0.015 and d["mean_emulated_s"] >= 0.003
        assert v["mean_emulated_s"] >= v["mean_real_s"]


def test_speedup_map_runs_each_draft_with_rollbacks(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_PROFILE)
    report = _bench(
        tmp_path,
        "--map",
        "--profiles",
        "lan",
        "--device-profile",
        str(tmp_path / "tiny.yaml"),
        "--map-drafts",
        f"self,{tmp_path / 'draft'}",
    )
    drafts = report["map"]
    assert list(drafts) == ["self", str(tmp_path / "draft")]
    own, other = (
        drafts["self"]["profiles"]["lan"],
        drafts[str(tmp_path / "draft")]["profiles"]["lan"],
    )
    assert own["acceptance_rate"] == 1.0 and own["rollbacks"] == 0
    assert other["acceptance_rate"] < 1.0 and other["rollbacks"] > 0  # a real run with rejections
    assert own["token_acceptance"] == 1.0
    assert other["acceptance_rate"] <= other["token_acceptance"] < 1
    for row in (own, other):
        assert row["identical_to_ar"] is True
        assert set(row["modes"]) == {"ar", "vanilla", "dssd", "picospec"}
        assert row["picospec_vs_ar"] == pytest.approx(
            row["modes"]["picospec"]["tokens_per_s"] / row["modes"]["ar"]["tokens_per_s"]
        )
    assert report["paper_table1"] and report["model_curves"]["lan"]["alpha"][-1] == 1.0


def test_overhead_measures_a_round_without_the_model(tmp_path: Path) -> None:
    target = tinymodels.build(tmp_path / "target", seed=1)
    out = subprocess.run(
        [sys.executable, "-m", "picospec.cli", "bench", "--overhead", "--json",
         "--drafter", str(target), "--verifier", str(target), "--max-tokens", "24"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    o = json.loads(out.stdout)["overhead"]
    assert o["rounds"] >= 4 * 24 // 5  # dssd with γ=4 commits at most 5 tokens a round
    assert o["round_trip_ms"] > o["verifier_batch_ms"] > 0
    assert o["overhead_ms"] == pytest.approx(
        o["round_trip_ms"] - o["verifier_batch_ms"] + o["acceptance_test_ms"]
    )
    b = o["breakdown"]
    assert b["codec_block_us"] > 0 and b["codec_verdict_us"] > 0 and b["nats_request_reply_us"] > 0


def test_colocation_times_the_cloud_prefill_with_the_edge_idle_and_busy(tmp_path: Path) -> None:
    target = tinymodels.build(tmp_path / "target", seed=1)
    draft = tinymodels.build(tmp_path / "draft", seed=2, like=target, noise=0.3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about dragons.\nWhat is two plus two?\n")
    cmd = [sys.executable, "-m", "picospec.cli", "bench", "--prompts", str(prompts), "--json",
           "--drafter", str(draft), "--verifier", str(target), "--colocation"]  # fmt: skip
    out = subprocess.run([*cmd, "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    c = json.loads(out.stdout)["colocation"]
    assert c["drafter"] == str(draft) and c["verifier"] == str(target)
    assert c["edge_cpus"] and c["cloud_cpus"] and not set(c["edge_cpus"]) & set(c["cloud_cpus"])
    assert c["prompts"] == 2 and len(c["prompt_tokens"]) == 2 and c["prefills_each"] == 3
    assert c["cloud_prefill_s_edge_idle"] > 0 and c["cloud_prefill_s_edge_prefilling"] > 0
    lo, hi = c["cloud_prefill_slowdown_p10_p90"]
    assert 0 < lo <= c["cloud_prefill_slowdown"] <= hi
    bad = subprocess.run([*cmd, "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "at least 1" in bad.stderr


def test_bench_concurrency_reports_every_level_and_mode(tmp_path: Path) -> None:
    """``--concurrency``: every mode at every level, answers of exactly max_tokens (ignore_eos
    and min_tokens), the same greedy text at every level and in every mode, and the cloud's
    model time per token (under an emulated profile, so the figures exist but are not judged)."""
    (tmp_path / "tiny.yaml").write_text(TINY_PROFILE)
    report = _bench(
        tmp_path, "--concurrency", "1,3", "--device-profile", str(tmp_path / "tiny.yaml")
    )
    assert report["config"]["concurrency"] == [1, 3]
    assert report["placement"]["pinned"] and report["placement"]["link_emulator"] is None
    rows = report["concurrency"]["loopback"]
    assert set(rows) == {"ar", "picospec"}
    for mode, by_level in rows.items():
        assert set(by_level) == {"1", "3"}
        for c, row in by_level.items():
            assert row["concurrency"] == int(c) and row["errors"] == {}
            assert row["requests"] == max(3, 2 * int(c))  # the prompts, or two rounds
            assert row["tokens"] == row["requests"] * 24, "every answer is max_tokens long"
            assert row["identical_to_ref"] is True, (mode, c)
            assert row["cloud_model_s_per_token"] > 0 and row["tokens_per_s"] > 0
            assert 0 < row["ttft_p50_s"] <= row["ttft_p90_s"]
            assert row["emulation"]["verifier"]["forwards"] > 0  # the pacers' own counts
        assert by_level["1"]["scaling"] == 1.0
    # ar sessions share the verifier's forwards: under the profile a forward of 3 tokens costs
    # far less than 3 of one token, so the cloud's time per token falls
    ar = rows["ar"]
    assert ar["3"]["cloud_model_s_per_token"] < 0.75 * ar["1"]["cloud_model_s_per_token"]


def test_bench_prefill_chunks_a_long_prompt_while_streams_go_on(tmp_path: Path) -> None:
    """``--prefill``: the three prefill paths are timed, and streams running when a long prompt
    arrives keep getting tokens during its prefill, the same tokens as without it."""
    target = tinymodels.build(tmp_path / "target", seed=1)
    out = subprocess.run(
        [sys.executable, "-m", "picospec.cli", "bench", "--prefill", "600",
         "--verifier", str(target), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)["prefill"]
    assert r["prompt_tokens"] == 600 and r["max_batch_tokens"] == 128
    assert set(r["prefill_s"]) == {"transformers", "slots", "slots_chunked"}
    assert r["vs_transformers"]["transformers"] == 1.0
    s = r["streams"]
    assert s["streams"] == 2 and s["tokens_equal_without_the_prompt"] is True
    # 600 tokens in chunks of at most 128 (less the streams' tokens): 5+ iterations, each
    # giving both streams a token
    assert s["tokens_during_prefill"] >= 8


def test_map_drafts_and_the_draft_precision_reach_the_drafter() -> None:
    """``--map-drafts bf16`` is the target's weights in bfloat16 as the draft: the drafter
    process gets PICOSPEC_DTYPE=bfloat16, the verifier keeps its own precision."""
    from picospec.tools.bench.speedup_map import _drafts
    from picospec.tools.stack.up import Stack, StackConfig

    assert _drafts("self,bf16,int8,smollm2-draft", "smollm2") == [
        ("self", "smollm2", "none", None),
        ("bf16", "smollm2", "none", "bfloat16"),
        ("int8", "smollm2", "int8", None),
        ("smollm2-draft", "smollm2-draft", "none", None),
    ]
    stack = Stack(StackConfig(draft_dtype="bfloat16").with_free_ports())  # laid out only
    assert stack.services["drafter"].env["PICOSPEC_DTYPE"] == "bfloat16"
    assert "PICOSPEC_DTYPE" not in StackConfig().env
    assert stack.services["verifier-1"].env.get("PICOSPEC_DTYPE", "auto") == "auto"
    with pytest.raises(ValueError, match="draft_dtype"):
        StackConfig(draft_dtype="int4")


def _bench_args(*argv: str) -> argparse.Namespace:
    """``picospec bench``'s flags, parsed by the command's own parser."""
    from picospec.tools.bench import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def _recording() -> Console:
    return Console(record=True, file=io.StringIO(), width=80)


def _rows() -> dict[str, Any]:
    return {"rows": {"ar": 10.0, "picospec": 25.5}}


def _rows_table(data: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    t = Table(title="tokens/s")
    t.add_column("mode")
    t.add_column("tok/s", justify="right")
    for mode, tps in data["rows"].items():
        t.add_row(mode, f"{tps:.1f}")
    console.print(t)


def _rows_plot(data: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.csv"
    path.write_text("".join(f"{mode},{tps}\n" for mode, tps in data["rows"].items()))
    return [str(path)]


def test_emit_writes_the_plots_then_prints_the_document_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from picospec.tools.bench.report import BenchReport, emit

    report, console = BenchReport(_rows(), _rows_table, _rows_plot), _recording()
    args = _bench_args("--json", "--plot-dir", str(tmp_path / "plots"))
    assert emit(report, args, console) == 0
    csv = tmp_path / "plots" / "rows.csv"
    assert csv.read_text() == "ar,10.0\npicospec,25.5\n"
    assert capsys.readouterr().out == json.dumps({**_rows(), "plots": [str(csv)]}, indent=1) + "\n"
    assert console.export_text() == ""  # the table is for the run without --json


def test_emit_prints_the_table_and_writes_plots_only_into_a_plot_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from picospec.tools.bench.report import BenchReport, emit

    report, console = BenchReport(_rows(), _rows_table, _rows_plot), _recording()
    assert emit(report, _bench_args(), console) == 0
    text = console.export_text()
    assert "tokens/s" in text and "picospec" in text and "25.5" in text
    assert capsys.readouterr().out == "" and "plots" not in report.data  # no --plot-dir
    assert emit(report, _bench_args("--plot-dir", str(tmp_path)), _recording()) == 0
    assert report.data["plots"] == [str(tmp_path / "rows.csv")]
    assert (tmp_path / "rows.csv").exists()


def test_emit_without_a_table_prints_the_named_result_as_pretty_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--overhead``, ``--prefill``, ``--colocation``: ``{name: result}`` with --json, the
    result alone as pretty JSON without; no plots, --plot-dir or not."""
    from picospec.tools.bench.report import BenchReport, emit

    result = {"rounds": 3, "round_trip_ms": 1.25, "breakdown": {"codec_block_us": 4.5}}
    report, console = BenchReport({"overhead": result}), _recording()
    assert emit(report, _bench_args("--plot-dir", str(tmp_path)), console) == 0
    assert json.loads(console.export_text()) == result
    assert "plots" not in report.data and not any(tmp_path.iterdir())
    assert emit(report, _bench_args("--json"), console) == 0
    assert capsys.readouterr().out == json.dumps({"overhead": result}, indent=1) + "\n"


def test_modes_parse_into_a_list_whose_default_is_the_runs() -> None:
    from picospec.tools.bench.cli import DEFAULT_PROFILES, _modes_profiles_device
    from picospec.tools.bench.concurrency import CONCURRENCY_MODES

    assert _bench_args("--modes", "ar, picospec").modes == ["ar", "picospec"]
    assert _bench_args().modes is None  # the default depends on the run: settled with the run
    cases = [
        ([], MODES, DEFAULT_PROFILES.split(",")),
        (["--map"], MAP_MODES, DEFAULT_PROFILES.split(",")),
        (["--concurrency", "1,2"], CONCURRENCY_MODES, ["loopback"]),
        (["--modes", "dssd,ar", "--profiles", "lan, 4g"], ["dssd", "ar"], ["lan", "4g"]),
    ]
    for argv, modes, profiles in cases:
        args = _bench_args(*argv)
        parsed = args.modes
        checked = _modes_profiles_device(args, _recording())
        assert checked is not None, argv
        run_args, run_profiles, device = checked
        assert (run_args.modes, run_profiles, device) == (list(modes), profiles, None), argv
        assert args.modes == parsed, "the parsed flags are left as they are"
    console = _recording()
    assert _modes_profiles_device(_bench_args("--modes", "ar,bogus"), console) is None
    assert "unknown mode/profile: bogus" in console.export_text()


def test_a_bad_request_is_said_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from picospec.tools.bench import main

    assert main(_bench_args("--modes", "ar,bogus", "--profiles", "lan")) == 2
    assert main(_bench_args("--fleet", "1,2", "--profiles", "lan,4g")) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "unknown mode/profile: bogus" in out.err and "--fleet takes one" in out.err
