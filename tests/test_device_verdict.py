"""The verdict is decided where the logits are: the top-K of a rejected position is selected on
the model's device, and only its K entries leave it. It must be exactly the CPU's compression
(:func:`sparse_from_probs`), ties, zeros and every value codec included, so verdicts do not
depend on the device."""

from __future__ import annotations

import pytest
import torch

from picospec.protocol.codec import ValueCodec, sparse_from_probs
from picospec.speculation.sampling import sparse_top_k


def _cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for trial in range(60):
        vocab = (5, 16, 100, 4096)[trial % 4]
        p = torch.rand(vocab, generator=g)
        if trial % 3 == 0:
            p = torch.round(p * 4) / 4  # many ties, some zeros
        if trial % 5 == 0:
            p[torch.rand(vocab, generator=g) < 0.8] = 0.0  # sparse support (top-k/top-p cut)
        if float(p.sum()) == 0.0:
            p[vocab // 2] = 1.0
        out.append((p / p.sum()).float())
    out.append(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # greedy-like one-hot
    return out


@pytest.mark.parametrize("codec", list(ValueCodec))
def test_device_top_k_is_exactly_the_cpu_compression(codec: ValueCodec) -> None:
    for p in _cases():
        for k in (0, 1, 3, 16, 256, p.shape[0]):
            assert sparse_top_k(p, k, codec) == sparse_from_probs(p, k, codec)


def test_device_top_k_refuses_what_the_cpu_refuses() -> None:
    for bad in (torch.tensor([0.5, float("nan")]), torch.tensor([1.5, -0.5])):
        with pytest.raises(ValueError, match="finite"):
            sparse_top_k(bad, 1)
    with pytest.raises(ValueError, match="1-D"):
        sparse_top_k(torch.ones(2, 2) / 4, 1)
