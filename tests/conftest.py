"""Shared fixtures: tiny Llama models built from a config, and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests: `make test` replays the same examples on every run (a red CI run is then
# reproducible, and never a dice roll); `make fuzz` explores fresh random examples, scaled up.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("PICOSPEC_HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_model(
    vocab: int = 8, seed: int = 0, sharpness: float = 1.5, layers: int = 2
) -> LanguageModel:
    """A 2-layer Llama with a tiny vocabulary and random weights.

    ``sharpness`` sets the spread (std) of the logits so distributions are far from uniform
    (random init alone gives near-uniform logits, which would make acceptance trivially high).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, sharpness / cfg.hidden_size**0.5)
    return LanguageModel(model=model, tokenizer=None, name=f"tiny-v{vocab}-s{seed}")


@pytest.fixture(scope="session")
def target() -> LanguageModel:
    return tiny_model(seed=1)


@pytest.fixture(scope="session")
def draft() -> LanguageModel:
    return tiny_model(seed=2)


@pytest.fixture(scope="session")
def smollm2() -> LanguageModel:
    return load_model("smollm2", threads=2)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny target and draft saved to disk with a real tokenizer, for service processes: the
    draft is the target plus noise, so it agrees often but not always."""
    import tinymodels

    root = tmp_path_factory.mktemp("models")
    target = tinymodels.build(root / "target", seed=1)
    draft = tinymodels.build(root / "draft", seed=2, like=target, noise=0.3)
    return target, draft


@pytest.fixture(scope="session")
def reference(tiny_dirs: tuple[Path, Path]) -> LanguageModel:
    """The saved tiny target loaded in-process: what greedy answers must equal."""
    return load_model(str(tiny_dirs[0]), device="cpu")


def pooled_chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value of ``observed`` counts against ``expected`` ones (same outcomes, same
    order), the rarest outcomes pooled into one cell until it expects 10, so that no cell's
    expectation is too small for the test; expected is rescaled to the observed total."""
    from scipy.stats import chisquare

    order = np.argsort(expected)
    small = order[np.cumsum(expected[order]) < 10]
    keep = np.setdiff1d(np.nonzero(expected > 0)[0], small)
    obs, exp = observed[keep], expected[keep]
    if len(small):  # no pooled cell when every cell already expects 10
        obs = np.append(obs, observed[small].sum())
        exp = np.append(exp, expected[small].sum())
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)
