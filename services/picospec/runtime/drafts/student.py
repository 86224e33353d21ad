"""The student: a shallow copy of the target that drafts for it.

A student keeps the target's embeddings and (all or part of) its output head, frozen and
*shared* with the target's modules, and a few of the target's decoder layers, copied and then
trained, plus its own copy of the final norm. It is an ordinary Hugging Face causal LM of the
target's own class (built from the target's config with fewer layers), so the KV cache, the
engine and the services run it unchanged.

The optional reduced head (FR-Spec) keeps only the output rows of the ``N`` most frequent tokens.
:class:`ReducedHead` computes those ``N`` logits and returns a full-vocabulary tensor that is
``-inf`` everywhere else, so downstream code sees a full distribution whose ``q`` is exactly 0
outside the head: such tokens are never drafted, and the residual ``max(0, p - q)`` keeps all of
``p`` there, so verification stays exactly lossless.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class ReducedHead(nn.Module):
    """Output head over a subset ``ids`` of the vocabulary; ``-inf`` logits elsewhere.

    ``weight`` is the full ``[V, H]`` output matrix (the target's, frozen and shared); the rows
    of ``ids`` are gathered once into a buffer that is not saved (it is rebuilt from the target).
    """

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        vocab = int(weight.shape[0])
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"reduced head ids must be non-empty and within 0..{vocab - 1}")
        if ids.unique().numel() != ids.numel():
            raise ValueError("reduced head ids must be distinct")
        self.vocab_size = vocab
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("rows", weight.detach()[ids].clone(), persistent=False)
        self.register_buffer(
            "row_bias", None if bias is None else bias.detach()[ids].clone(), persistent=False
        )

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def reduced(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., N]`` over the head's own tokens (in ``ids`` order)."""
        out = hidden @ self.rows.to(hidden.dtype).T
        if self.row_bias is not None:
            out = out + self.row_bias.to(hidden.dtype)
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = self.reduced(hidden)
        full = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.ids] = small
        return full

    def extra_repr(self) -> str:
        return f"{self.size} of {self.vocab_size} tokens"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama, Mistral, Qwen2/3 …)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found at .{model.base_model_prefix}.layers"
            " (distill supports Llama-family causal LMs)"
        )
    return layers


def final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, model.base_model_prefix)
    norm = getattr(base, "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(
            f"{type(model).__name__}: no final norm at .{model.base_model_prefix}.norm"
        )
    return norm


def spread_layers(total: int, n: int) -> list[int]:
    """``n`` layer indices spread over ``0..total-1``, always the first and the last."""
    if not 1 <= n <= total:
        raise ValueError(f"cannot pick {n} of {total} layers")
    if n == 1:
        return [0]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


def parse_layers(spec: str, total: int) -> list[int]:
    """``"4"`` (spread), ``"first:4"`` (the first 4), ``"0,1,2,29"`` (explicit, ``-1`` = last)."""
    spec = spec.strip()
    if spec.isdigit():
        return spread_layers(total, int(spec))
    if spec.startswith("first:"):
        n = int(spec.split(":", 1)[1])
        return list(range(n))
    out = [int(s) % total if int(s) < 0 else int(s) for s in spec.split(",") if s.strip()]
    if not out or any(not 0 <= i < total for i in out):
        raise ValueError(f"layers {spec!r} must be indices within 0..{total - 1}")
    return out


def build_student(
    target: nn.Module, layers: Sequence[int], head_ids: torch.Tensor | None = None
) -> nn.Module:
    """A causal LM of the target's class holding copies of the target's ``layers`` (in order) and
    final norm, with the target's embeddings and output head shared (frozen); with ``head_ids`` a
    :class:`ReducedHead` over those tokens instead of the full head."""
    src_layers = decoder_layers(target)
    total = len(src_layers)
    if not layers or any(not 0 <= i < total for i in layers):
        raise ValueError(f"layers {list(layers)} must be indices within 0..{total - 1}")
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    cfg.tie_word_embeddings = False  # the head is set by hand below and must never be re-tied
    dtype = next(target.parameters()).dtype
    with torch.device("meta"):
        student = type(target)(cfg)
    base, tbase = (
        getattr(student, student.base_model_prefix),
        getattr(target, target.base_model_prefix),
    )
    # everything the student does not copy or share is small (rotary tables): materialise it
    student = student.to_empty(device=next(target.parameters()).device)
    if hasattr(base, "rotary_emb") and hasattr(tbase, "rotary_emb"):
        base.rotary_emb = tbase.rotary_emb
    base.embed_tokens = target.get_input_embeddings()
    base.layers = nn.ModuleList()
    for new, old in enumerate(layers):
        layer = copy.deepcopy(src_layers[old])
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new  # the KV cache is indexed by position in the stack
        base.layers.append(layer)
    base.norm = copy.deepcopy(final_norm(target))
    head = target.get_output_embeddings()
    if head_ids is not None:
        student.lm_head = ReducedHead(head.weight, head_ids, getattr(head, "bias", None))
    else:
        student.lm_head = head
    student.config = cfg
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(student):
        p.requires_grad_(True)
    return student.to(dtype).eval()


def trainable_modules(student: nn.Module) -> dict[str, nn.Module]:
    """What the student adds to the target, by name: its layers and its final norm."""
    out: dict[str, nn.Module] = {
        f"layers.{i}": layer for i, layer in enumerate(decoder_layers(student))
    }
    out["norm"] = final_norm(student)
    return out


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    return [p for m in trainable_modules(student).values() for p in m.parameters()]


def trainable_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """``{"layers.0.self_attn.q_proj.weight": …, "norm.weight": …}``: the trained tensors."""
    return {
        f"{name}.{k}": v.detach()
        for name, m in trainable_modules(student).items()
        for k, v in m.state_dict().items()
    }


def source_state(target: nn.Module, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """The target tensors each trainable tensor started from, under the student's names."""
    src = decoder_layers(target)
    out = {
        f"layers.{new}.{k}": v.detach()
        for new, old in enumerate(layers)
        for k, v in src[old].state_dict().items()
    }
    out.update({f"norm.{k}": v.detach() for k, v in final_norm(target).state_dict().items()})
    return out


def load_trainable_state(student: nn.Module, state: dict[str, Any]) -> None:
    mods = trainable_modules(student)
    for name, m in mods.items():
        prefix = name + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        m.load_state_dict(sub, strict=True)


def student_logits(student: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Training forward (no cache): logits ``[B, T, N]`` over the head's tokens (a reduced head)
    or ``[B, T, V]`` (the full head)."""
    base = getattr(student, student.base_model_prefix)
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
    head = student.lm_head
    if isinstance(head, ReducedHead):
        return head.reduced(hidden)
    return head(hidden)
