"""Slot KV caches and the varlen forward (picospec.runtime.kvslots) against transformers'
own forward.

The varlen forward is written over the model's Hugging Face modules; these checks hold it to
the model's plain cache-free forward over each whole sequence, on every Llama-family type it
claims (llama, mistral, qwen2, qwen3; multi-head, grouped and multi-query attention), with
sessions of mixed context lengths batched together. Then the properties the layout exists
for: no cache bytes copied per round once a slot holds its session, crop moves a length only,
growth past the capacity is counted, and only the kept rows reach the LM head.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from picospec.runtime.model import LanguageModel, ModelError
from picospec.services.control import OpenSession
from picospec.services.verifier.service import capacity
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import VerifierSession
from tinymodels import tiny_arch

V = 16
ATOL = 1e-4


def _arch(model_type: str, **extra: object) -> LanguageModel:
    return tiny_arch(model_type, V, head_scale=1.5, **extra)


ARCHS = {
    "llama-gqa": lambda: _arch("llama"),
    "llama-mha": lambda: _arch("llama", num_key_value_heads=4),
    "llama-mqa": lambda: _arch("llama", num_key_value_heads=1, attention_bias=True),
    "llama-rope-linear": lambda: _arch(
        "llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    ),
    "mistral": lambda: _arch("mistral", sliding_window=None),
    "qwen2": lambda: _arch("qwen2"),
    "qwen3": lambda: _arch("qwen3", head_dim=8),
}


@torch.inference_mode()
def _hf_logits(lm: LanguageModel, ids: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole sequence, no cache: logits ``[len(ids), V]``."""
    return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", list(ARCHS))
def test_varlen_forward_equals_the_transformers_forward(name: str) -> None:
    lm = ARCHS[name]()
    assert lm.effective_kv_layout == "slots", lm.slots_unsupported
    assert lm.batching_unsupported is None
    rng = random.Random(11)
    pasts = [0, 1, 37, 130, 5]
    seqs = [[rng.randrange(V) for _ in range(p)] for p in pasts]
    caches = [lm.new_cache() for _ in pasts]
    for c, s in zip(caches, seqs, strict=True):
        if s:  # each session's past, fed alone in two pieces
            c.extend(s[: len(s) // 2 + 1])
            if len(s) // 2 + 1 < len(s):
                c.extend(s[len(s) // 2 + 1 :])
    for news in ([3, 1, 5, 2, 4], [1, 1, 1, 1, 1]):  # a verify round, then a decode round
        toks = [[rng.randrange(V) for _ in range(n)] for n in news]
        got = lm.forward_batch(caches, toks)
        for g, s, t in zip(got, seqs, toks, strict=True):
            s.extend(t)
            want = _hf_logits(lm, s)[-len(t) :]
            torch.testing.assert_close(g, want, atol=ATOL, rtol=0)
            assert torch.equal(g.argmax(-1), want.argmax(-1))
    for c, s in zip(caches, seqs, strict=True):
        assert c.length == len(s)


def test_models_without_a_varlen_forward_keep_dynamic_caches() -> None:
    for lm in (
        _arch("mistral", sliding_window=4),
        _arch("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        _arch("gpt2", n_embd=32, n_layer=2, n_head=4),
    ):
        assert lm.slots_unsupported is not None
        assert lm.effective_kv_layout == "copy" and lm.new_cache().layout == "copy"
    lm = _arch("llama")
    lm.kv_layout = "paged"
    with pytest.raises(ModelError, match="unknown kv_layout"):
        lm.new_cache()


def test_slot_rounds_copy_no_cache_bytes_and_crop_only_moves_the_length() -> None:
    """Many batched rounds with rejections: once each slot is allocated (capacity from the
    open), not one byte of cache is copied; the copy layout copies every round."""
    copied = {}
    for layout in ("slots", "copy"):
        lm = tiny_model(V, seed=21)
        lm.kv_layout = layout
        rng = random.Random(4)
        caches = [lm.new_cache(capacity=300) for _ in range(4)]
        for c in caches:
            c.extend([rng.randrange(V) for _ in range(rng.randint(20, 60))], keep=1)
        ptrs = [c._slot.buf.data_ptr() for c in caches] if layout == "slots" else []
        before = lm.kv_counters.snapshot()
        for _ in range(12):
            toks = [[rng.randrange(V) for _ in range(5)] for _ in caches]
            lm.forward_batch(caches, toks, keep=[5] * len(caches))
            for c in caches:
                c.crop(c.length - rng.randint(0, 4))  # a rejection keeps some of the block
        after = lm.kv_counters
        assert after.forwards - before.forwards == 12
        copied[layout] = after.copied_bytes - before.copied_bytes
        if layout == "slots":
            assert after.grows == 0
            assert [c._slot.buf.data_ptr() for c in caches] == ptrs  # written in place
            assert all(c.capacity == 300 and c.nbytes() == 300 * lm.kv_token_bytes for c in caches)
    assert copied["slots"] == 0
    assert copied["copy"] > 12 * 4 * 20 * lm.kv_token_bytes  # at least every past, every round


def test_a_slot_grows_geometrically_and_keeps_its_tokens() -> None:
    lm = tiny_model(V, seed=21)
    rng = random.Random(2)
    seq = [rng.randrange(V) for _ in range(40)]
    c = lm.new_cache(capacity=8)
    c.extend(seq[:6])
    assert c.capacity == 8 and lm.kv_counters.grows == 0
    before = lm.kv_counters.snapshot()
    c.extend(seq[6:10])  # 10 > 8: doubles to 16, copying the 6 held
    assert c.capacity == 16
    assert lm.kv_counters.grows - before.grows == 1
    assert lm.kv_counters.copied_bytes - before.copied_bytes == 6 * lm.kv_token_bytes
    got = c.extend(seq[10:])  # 40 > 32: straight to what is needed
    assert c.capacity == 40 and lm.kv_counters.grows - before.grows == 2
    torch.testing.assert_close(got, _hf_logits(lm, seq)[10:], atol=ATOL, rtol=0)
    c.crop(3)
    again = c.extend([1, 2])
    torch.testing.assert_close(again, _hf_logits(lm, seq[:3] + [1, 2])[3:], atol=ATOL, rtol=0)


def test_only_the_kept_rows_come_back() -> None:
    lm = tiny_model(V, seed=21)
    a, b = lm.new_cache(), lm.new_cache()
    full = a.extend([3, 1, 4, 1, 5, 9])
    last2 = b.extend([3, 1, 4, 1, 5, 9], keep=2)
    assert last2.shape == (2, V)
    torch.testing.assert_close(last2, full[-2:], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="keep"):
        b.extend([1], keep=2)


def test_a_session_reserves_its_whole_answer_at_open() -> None:
    lm = tiny_model(V, seed=21)
    req = OpenSession(
        session="00" * 16, prompt=[1, 2, 3], params=SamplingParams(temperature=0.0),
        spec=SpecConfig(mode=Mode.PICOSPEC), vocab_size=V, reply_to="picospec.v1.verdict.s.d",
        max_new_tokens=100,
    )  # fmt: skip
    vs = VerifierSession(lm, b"\0" * 16, req.prompt, req.params, req.spec, capacity=capacity(req))
    assert vs.cache.capacity == capacity(req) >= 3 + 100
    assert vs.cache.used_bytes() == 3 * lm.kv_token_bytes


def test_a_prefill_twin_runs_long_forwards_in_its_precision_into_the_slots() -> None:
    """A float16 model with a float32 prefill twin: a prompt's forward runs on the twin (its
    keys/values land in the float16 slot, equal to the twin's own rounded to float16), a
    decode step on the float16 weights; without a twin the float16 prefill differs more from
    the float32 model than the twin's does."""
    from picospec.runtime.model import PREFILL_TOKENS

    ref = _arch("llama")
    half = _arch("llama")
    half.model.to(torch.float16)
    half.add_prefill_twin("float32")
    assert next(half.prefill_model.parameters()).dtype == torch.float32
    rng = random.Random(5)
    prompt = [rng.randrange(V) for _ in range(3 * PREFILL_TOKENS)]
    want = _hf_logits(ref, prompt + [7])
    twin_cache = half.new_cache()
    got = twin_cache.extend(prompt)
    # the twin's float32 prefill: the float32 model's logits up to the weights' rounding
    torch.testing.assert_close(got, want[:-1], atol=2e-2, rtol=0)
    assert twin_cache._slot.buf.dtype == torch.float16
    step = twin_cache.extend([7])  # one token: the float16 weights
    torch.testing.assert_close(step[0], want[-1], atol=5e-2, rtol=0)
    plain = _arch("llama")
    plain.model.to(torch.float16)
    no_twin = plain.new_cache().extend(prompt)
    err_twin = (got - want[:-1]).abs().max()
    err_half = (no_twin - want[:-1]).abs().max()
    assert err_twin < err_half
    # a model already in the twin's precision keeps no twin
    same = _arch("llama")
    same.add_prefill_twin("float32")
    assert same.prefill_model is None
