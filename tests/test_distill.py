"""``picospec distill`` end to end on a tiny target, the draft file, and the data's exclusions.

The pipeline runs through the real command line on the tiny Llama of ``tests/tinymodels.py``
(its real tokenizer and chat template): the target answers synthesised prompts, its top-k is
cached, a 1-layer draft with a reduced head trains a few steps, is saved and loaded back through
``load_model``. A second run, stopped after every step (``--max-time-s 0``) and resumed,
must end with the same draft. Then: the file holds only what the draft adds; the reduced head
gives ``q = 0`` outside its tokens; greedy output with the draft equals ``ar``; sampled output
with a reduced-head draft follows the target's exact distribution (chi-square, as in
``tests/test_lossless.py``). No test times anything.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import pooled_chisquare_pvalue, tiny_model
from picospec.cli import main
from picospec.runtime.drafts import DRAFTS_DIR, META
from picospec.runtime.drafts.format import TENSORS, draft_from_target, read_meta
from picospec.runtime.drafts.student import ReducedHead, build_student, parse_layers, spread_layers
from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel
from picospec.speculation.engine import generate
from picospec.speculation.sampling import (
    SamplingParams,
    output_distribution,
    probs_from_logits,
    total_variation,
)
from picospec.speculation.spec import Mode, SpecConfig
from picospec.tools.distill import data as D

HEAD = 40  # of the tiny tokenizer's 75 tokens


def _args(target: Path, work: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--target", str(target),
        "--work", str(work),
        "--layers", "1",
        "--head-size", str(HEAD),
        "--sources", "chat",
        "--prompts", "12",
        "--shard-prompts", "6",
        "--gen-batch", "6",
        "--max-new-tokens", "12",
        "--eval-prompts", "3",
        "--eval-max-new-tokens", "12",
        "--topk", "8",
        "--steps", "4",
        "--warmup", "2",
        "--batch-tokens", "200",
        "--lr", "3e-3",
        "--ckpt-every", "2",
        "--eval-every", "2",
        "--device", "cpu",
        "--no-progress",
        "--no-timing",
        "--engine-prompts", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def distilled(tiny_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("distill") / "work"
    assert main(_args(tiny_dirs[0], work)) == 0
    return work


def test_distill_writes_a_draft_with_its_report(distilled: Path) -> None:
    out = distilled / "draft"
    meta = read_meta(out)
    report = json.loads((out / "report.json").read_text())
    assert meta["layers"] == [0] and meta["head_size"] == HEAD
    assert report["tokens_seen"] > 0 and report["train_tokens_available"] > 0
    curve = report["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    assert all(0.0 <= p["greedy"] <= 1.0 and 0.0 <= p["t0.7"] <= 1.0 for p in curve)
    assert curve[-1]["tokens"] > curve[0]["tokens"] == 0
    acc = report["acceptance_teacher_forced"]
    assert 0.0 <= acc["greedy"] <= 1.0 and acc["positions"] > 0
    assert report["acceptance_engine"]["greedy_identical_to_ar"] is True
    status = json.loads((distilled / "status.json").read_text())
    assert status["stage"] == "done" and status["step"] == 4


def test_a_stopped_run_resumes_to_the_same_draft(
    distilled: Path, tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    pauses = 0
    for _ in range(30):
        assert main(_args(tiny_dirs[0], work, "--max-time-s", "0")) == 0
        if json.loads((work / "status.json").read_text())["stage"] == "done":
            break
        pauses += 1
    assert pauses >= 4  # after each data shard and each checkpointed step
    log = (work / "train.log").read_text()
    assert "resumed at step" in log
    a = load_file(str(distilled / "draft" / TENSORS))
    b = load_file(str(work / "draft" / TENSORS))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # --report-only saves the latest checkpoint's draft again, without training
    (work / "draft" / TENSORS).unlink()
    assert main(_args(tiny_dirs[0], work, "--report-only")) == 0
    c = load_file(str(work / "draft" / TENSORS))
    assert all(torch.equal(a[k], c[k]) for k in a)
    # a changed recipe is refused in the same work directory
    assert main(_args(tiny_dirs[0], work, "--steps", "7")) == 2


def test_a_run_continues_an_earlier_one_on_long_prompts(
    distilled: Path, tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--init``: the draft starts from the earlier run's (its step-0 acceptance on the same
    held-out answers is the earlier run's last), keeps its head, and trains on both runs' data."""
    work = tmp_path / "long"
    extra = ("--init", str(distilled), "--prompt-set", "long", "--prompts", "6", "--steps", "2")
    assert main(_args(tiny_dirs[0], work, *extra)) == 0
    first = json.loads((distilled / "draft" / "report.json").read_text())
    report = json.loads((work / "draft" / "report.json").read_text())
    assert report["curve"][0]["step"] == 0
    assert report["curve"][0]["greedy"] == pytest.approx(first["curve"][-1]["greedy"])
    assert report["curve"][0]["t0.7"] == pytest.approx(first["curve"][-1]["t0.7"])
    assert torch.equal(torch.load(work / "head_ids.pt"), torch.load(distilled / "head_ids.pt"))
    own = sum(e.trained for p in (work / "data").glob("*.pt") for e in D.load_examples(p)[0])
    assert report["train_tokens_available"] == own + first["train_tokens_available"]
    assert "initialised from" in (work / "train.log").read_text()
    # an earlier run of another draft, or one that has not finished, is refused
    assert main(_args(tiny_dirs[0], tmp_path / "w2", *extra, "--head-size", "30")) == 2
    unfinished = tmp_path / "unfinished"
    assert main(_args(tiny_dirs[0], unfinished, "--max-time-s", "0")) == 0
    assert main(_args(tiny_dirs[0], tmp_path / "w3", "--init", str(unfinished))) == 2
    assert main(_args(tiny_dirs[0], tmp_path / "w4", "--prompt-set", "medium")) == 2


def test_the_draft_file_holds_only_what_the_draft_adds(distilled: Path) -> None:
    out = distilled / "draft"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [META, TENSORS, "report.json", "report.md"]
    )
    tensors = load_file(str(out / TENSORS))
    target = load_model(read_meta(out)["target"], device="cpu")
    layer0 = target.model.model.layers[0].state_dict()
    expected = {f"layers.0.{k}" for k in layer0} | {"norm.weight"}
    stored = {k.rsplit(".", 1)[0] for k in tensors if k != "head_ids"}
    assert stored == expected
    for k, v in tensors.items():
        if k.endswith(".q"):
            assert v.dtype == torch.int8 and v.shape == layer0[k[len("layers.0.") : -2]].shape
        assert target.vocab_size not in v.shape or k == "head_ids"  # no embedding or head rows
    assert tensors["head_ids"].numel() == HEAD and tensors["head_ids"].dtype == torch.int32
    added = sum(v.numel() * v.element_size() for v in tensors.values())
    layer_fp32 = sum(v.numel() * 4 for v in layer0.values())
    assert added < layer_fp32 / 3  # int8 deltas
    assert added < sum(p.numel() * 4 for p in target.model.parameters()) / 5


def test_load_rebuilds_the_trained_draft_and_the_reduced_head_has_q_zero_outside(
    distilled: Path,
) -> None:
    draft = load_model(str(distilled / "draft"), device="cpu")
    target = load_model(read_meta(distilled / "draft")["target"], device="cpu")
    head = draft.model.lm_head
    assert isinstance(head, ReducedHead) and head.size == HEAD
    assert target.eos_ids <= set(head.ids.tolist())
    # training moved the layer away from its source (the deltas are not all zero)
    assert not torch.allclose(
        draft.model.model.layers[0].mlp.up_proj.weight,
        target.model.model.layers[0].mlp.up_proj.weight,
    )
    inside = torch.zeros(draft.vocab_size, dtype=torch.bool)
    inside[head.ids] = True
    prompt = target.encode_chat([{"role": "user", "content": "Tell me about tea."}])
    logits = draft.new_cache().extend(prompt)
    assert logits.shape == (len(prompt), target.vocab_size)
    assert torch.isneginf(logits[:, ~inside]).all() and torch.isfinite(logits[:, inside]).all()
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9)):
        q = probs_from_logits(logits, params)
        assert (q[:, ~inside] == 0).all() and torch.allclose(q.sum(-1), torch.ones(len(prompt)))


def test_one_token_through_separate_rejection_sampling_is_exactly_the_target(
    distilled: Path, reference: LanguageModel
) -> None:
    """Exact, per position: accept with min(1, p/q), else draw from the residual: the output
    distribution equals p although the reduced head's q is 0 on most tokens."""
    draft = load_model(str(distilled / "draft"), device="cpu")
    prompt = reference.encode_chat([{"role": "user", "content": "Tell me about tea."}])
    p_rows = reference.new_cache().extend(prompt)
    q_rows = draft.new_cache().extend(prompt)
    disagree = 0.0
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=20)):
        for p_logits, q_logits in zip(p_rows, q_rows, strict=True):
            p, q = probs_from_logits(p_logits, params), probs_from_logits(q_logits, params)
            out = output_distribution(p, q, top_k=reference.vocab_size)
            assert total_variation(out, p) < 1e-6
            disagree = max(disagree, total_variation(p, q))
    assert disagree > 0.3, "q must differ from p, or nothing was tested"


@pytest.mark.parametrize("mode", [Mode.PICOSPEC, Mode.VANILLA])
def test_greedy_with_the_distilled_draft_is_token_identical_to_ar(
    distilled: Path, reference: LanguageModel, mode: Mode
) -> None:
    draft = load_model(str(distilled / "draft"), device="cpu")
    params = SamplingParams(temperature=0.0)
    rollbacks = 0
    for text in ["Tell me about tea.", "Write a haiku about bees.", "What is 7 times 8?"]:
        prompt = reference.encode_chat([{"role": "user", "content": text}])
        ar = generate(reference, None, prompt, params, SpecConfig(mode=Mode.AR), 24)
        got = generate(reference, draft, prompt, params, SpecConfig(mode=mode, draft_len=3), 24)
        assert got.tokens == ar.tokens
        rollbacks += got.speculation.rollbacks
    assert rollbacks > 0, "the draft must disagree sometimes, or nothing was tested"


def test_draft_of_another_target_is_refused(distilled: Path) -> None:
    other = tiny_model(vocab=75, seed=5)
    with pytest.raises(RuntimeError, match="different model"):
        draft_from_target(distilled / "draft", other)


# --- sampled output with a reduced-head draft: the target's exact distribution ----------------

VOCAB, LENGTH, N_RUNS = 4, 2, 1000


@torch.inference_mode()
def _full_logits(model: LanguageModel, ids: list[int]) -> torch.Tensor:
    return model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_sampled_output_with_a_reduced_head_draft_follows_the_target() -> None:
    target = tiny_model(VOCAB, seed=11)
    ids = torch.tensor([0, 2])  # tokens 1 and 3 are never drafted (q = 0)
    student = build_student(target.model, [1], ids)
    draft = LanguageModel(model=student, name="reduced")
    prompt, params = [1, 3], SamplingParams(temperature=1.0)
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2, top_k=VOCAB)
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(LENGTH):
        nxt = {}
        for seq, pr in exact.items():
            p = probs_from_logits(_full_logits(target, prompt + list(seq)), params).double()
            nxt.update({seq + (t,): pr * float(p[t]) for t in range(VOCAB)})
        exact = nxt
    outcomes = list(itertools.product(range(VOCAB), repeat=LENGTH))
    index = {o: i for i, o in enumerate(outcomes)}
    counts = np.zeros(len(outcomes))
    rollbacks = drafted_outside = 0
    for seed in range(N_RUNS):
        run = generate(
            target, draft, prompt, params.model_copy(update={"seed": seed}), spec, LENGTH
        )
        counts[index[tuple(run.tokens)]] += 1
        rollbacks += run.speculation.rollbacks
        drafted_outside += sum(t in (1, 3) for t in run.tokens)
    assert rollbacks > N_RUNS // 4, "draft and target must disagree often for the test to bite"
    assert drafted_outside > N_RUNS // 20, "tokens outside the head must still be produced"
    expected = np.array([exact[o] for o in outcomes]) * N_RUNS
    assert pooled_chisquare_pvalue(counts, expected) > 1e-4


# --- data: never the benchmark's prompts ----------------------------------------------------


@pytest.mark.parametrize("prompt_set", D.PROMPT_SETS)
def test_no_training_prompt_equals_or_contains_an_mtbench_question(prompt_set: str) -> None:
    questions = [" ".join(q.lower().split()) for q in D.benchmark_prompts()]
    assert len(questions) == 160  # 80 questions, two turns each
    train = D.synthesise_prompts(0, prompt_set=prompt_set)
    held_out = D.synthesise_prompts(0, held_out=True, prompt_set=prompt_set)
    assert len(train) > 1000 and len(held_out) > 100
    assert not set(train) & set(held_out)
    for text in [*train, *held_out, *D.project_texts()]:
        norm = " ".join(text.lower().split())
        assert not any(q in norm for q in questions), text


def test_exclusion_drops_benchmark_prompts_however_embedded() -> None:
    q = D.benchmark_prompts()[0]
    texts = ["Explain tea.", q, f"Please answer:  {q.upper()}  thanks", q[: len(q) // 2]]
    assert D.exclude_benchmark(texts) == ["Explain tea.", q[: len(q) // 2]]


def test_layer_choices() -> None:
    assert spread_layers(30, 4) == [0, 10, 19, 29]
    assert parse_layers("first:3", 30) == [0, 1, 2]
    assert parse_layers("0,-1", 30) == [0, 29]
    with pytest.raises(ValueError):
        parse_layers("0,30", 30)


# --- the shipped smollm2-draft (once `make draft` has built it) ------------------------------

# PICOSPEC_TEST_DRAFT checks a candidate (e.g. build/distill/smollm2-draft/draft) before it ships
SHIPPED = Path(os.environ.get("PICOSPEC_TEST_DRAFT") or DRAFTS_DIR / "smollm2-draft")


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / META).is_file(), reason="smollm2-draft not built yet")
def test_the_shipped_smollm2_draft_is_small_and_lossless(smollm2: LanguageModel) -> None:
    assert read_meta(SHIPPED)["target"] == "smollm2"
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 50e6
    draft = draft_from_target(SHIPPED, smollm2, name="smollm2-draft")
    greedy = SamplingParams(temperature=0.0)
    for text in ["Name three colours.", "Write a haiku about autumn."]:
        prompt = smollm2.encode_chat([{"role": "user", "content": text}])
        want = generate(smollm2, None, prompt, greedy, SpecConfig(mode=Mode.AR), 40)
        for mode in (Mode.PICOSPEC, Mode.VANILLA):
            got = generate(smollm2, draft, prompt, greedy, SpecConfig(mode=mode), 40)
            assert got.tokens == want.tokens, mode
    prompt = smollm2.encode_chat([{"role": "user", "content": "Tell me about the moon."}])
    p_rows, q_rows = smollm2.new_cache().extend(prompt), draft.new_cache().extend(prompt)
    params = SamplingParams(temperature=0.7)
    for p_logits, q_logits in zip(p_rows[-16:], q_rows[-16:], strict=True):
        p, q = probs_from_logits(p_logits, params), probs_from_logits(q_logits, params)
        assert total_variation(output_distribution(p, q, top_k=smollm2.vocab_size), p) < 1e-6


def test_the_command_lines_drafter_defaults_to_picospec_draft_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    from picospec import default_drafter
    from picospec.tools.bench.cli import register as bench_register

    monkeypatch.delenv("PICOSPEC_DRAFT_MODEL", raising=False)
    assert default_drafter() == "smollm2"
    monkeypatch.setenv("PICOSPEC_DRAFT_MODEL", "smollm2-draft")
    parser = argparse.ArgumentParser()
    bench_register(parser.add_subparsers())
    assert parser.parse_args(["bench"]).drafter == "smollm2-draft"
    assert parser.parse_args(["bench", "--drafter", "x"]).drafter == "x"


def test_a_run_continues_a_finished_draft_on_new_prompts(
    distilled: Path, tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--init DRAFT_DIR`` (a finished draft, e.g. the shipped one, whose data is gone): the
    draft starts from its weights (step-0 acceptance = its last, up to the int8 deltas) and
    head; ``--prompt-offset`` skips the prompts the earlier run answered; no earlier data."""
    from picospec.tools.distill.recipe import Options, Recipe
    from picospec.tools.distill.stages import _chat_prompts

    work = tmp_path / "more"
    extra = ("--init", str(distilled / "draft"), "--prompt-offset", "12", "--prompts", "6",
             "--steps", "2")  # fmt: skip
    assert main(_args(tiny_dirs[0], work, *extra)) == 0
    first = json.loads((distilled / "draft" / "report.json").read_text())
    report = json.loads((work / "draft" / "report.json").read_text())
    assert report["curve"][0]["greedy"] == pytest.approx(first["curve"][-1]["greedy"], abs=0.05)
    assert torch.equal(torch.load(work / "head_ids.pt"), torch.load(distilled / "head_ids.pt"))
    own = sum(e.trained for p in (work / "data").glob("*.pt") for e in D.load_examples(p)[0])
    assert report["train_tokens_available"] == own  # a finished draft brings no data
    earlier = _chat_prompts(Recipe(prompts=12), Options())
    later = _chat_prompts(Recipe(prompts=6, prompt_offset=12), Options())
    assert later and not set(later) & set(earlier)
    # a draft of another head size is refused
    assert main(_args(tiny_dirs[0], tmp_path / "w5", *extra, "--head-size", "30")) == 2
