"""Model runtime: KV cache crop, block forwards, loading errors."""

from __future__ import annotations

import pytest
import torch

from picospec.runtime.checkpoints import resolve
from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel, ModelError, pick_dtype


def test_block_forward_matches_token_by_token(target: LanguageModel) -> None:
    a, b = target.new_cache(), target.new_cache()
    block = a.extend([1, 2, 3, 4, 5])
    rows = torch.stack([b.extend([t])[-1] for t in [1, 2, 3, 4, 5]])
    assert block.shape == (5, target.vocab_size)
    assert torch.allclose(block, rows, atol=1e-4)


def test_crop_rolls_back_to_any_committed_length(target: LanguageModel) -> None:
    seq = [3, 1, 4, 1, 5, 2, 6]
    for keep in (0, 1, 4, 6):
        c = target.new_cache()
        c.extend(seq)
        c.crop(keep)
        assert c.length == keep
        again = c.extend([7, 0])
        fresh = target.new_cache().extend(seq[:keep] + [7, 0])[-2:]
        assert torch.allclose(again, fresh, atol=1e-4)
    with pytest.raises(ValueError):
        c.crop(c.length + 1)
    assert c.nbytes() > 0


def test_dtypes_and_names() -> None:
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve("/nonexistent/model.gguf")
    with pytest.raises(ModelError, match="does not exist"):
        resolve("./no/such/dir")
    assert resolve("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


def test_embedded_default_is_found_in_the_installed_wheel() -> None:
    where, gguf = resolve("smollm2")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (__import__("pathlib").Path(where) / gguf).stat().st_size > 50_000_000


def test_unknown_hub_model_fails_clearly_offline() -> None:
    with pytest.raises(ModelError, match="nothing is downloaded"):
        load_model("picospec-test/does-not-exist", device="cpu")
