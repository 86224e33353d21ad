"""Which decoders the runtime runs several sessions of in one forward, and why not others.

Read by the model (:class:`picospec.runtime.model.LanguageModel`'s padded batches) and by the
slot caches (:func:`picospec.runtime.kvslots.why_not_slots`); it imports nothing of PicoSpec.
"""

from __future__ import annotations

from typing import Any

BATCHED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose attention sees only the 2-D padding mask and the position ids (Llama's
decoder code), so :meth:`LanguageModel.forward_batch` pads their sessions into one forward."""
BATCHED_ATTENTION = frozenset({"sdpa", "eager"})
BATCHED_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
"""Rotary embeddings fixed by position alone ("dynamic" and "longrope" rescale with the longest
position in the batch, which padding and other sessions would change)."""


def architecture_unsupported(cfg: Any) -> str | None:
    """Why a transformers config is outside the decoders that PicoSpec runs several sessions of
    in one forward (padded, or varlen over slots); None if inside: a Llama-family type, full
    attention in every layer, rotary embeddings fixed by position alone."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in BATCHED_MODEL_TYPES:
        return f"model type {model_type!r} is not one known to run batched sessions exactly"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "layers other than full attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not _rope_types(rope) <= BATCHED_ROPE:
        return f"rotary embeddings that rescale with the sequence ({sorted(_rope_types(rope))})"
    return None


def _rope_types(rope: Any) -> set[str]:
    """The rope types in a config's ``rope_parameters`` (flat, or one dict per layer type)."""
    if not isinstance(rope, dict):
        return {"default"}
    if any(isinstance(v, dict) for v in rope.values()):
        return set().union(*(_rope_types(v) for v in rope.values() if isinstance(v, dict)))
    return {str(rope.get("rope_type", rope.get("type", "default")))}
