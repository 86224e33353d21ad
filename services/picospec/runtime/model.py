"""A loaded causal LM and its sessions' KV caches: forwards of one session or many at once.

:class:`LanguageModel` runs a transformers model over blocks of tokens, alone or several
sessions in one forward (varlen over slot caches, :mod:`picospec.runtime.kvslots`; or padded
over ``DynamicCache`` copies); :class:`KVCache` is one session's croppable cache. Both roles use
it: the drafter (small model on the edge, optionally int8-quantised) and the verifier (large
model on a cloud GPU). Models are loaded by :func:`picospec.runtime.loading.load_model`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from picospec.runtime.architecture import BATCHED_ATTENTION, architecture_unsupported
from picospec.runtime.kvslots import (
    CacheCounters,
    Geometry,
    PackedWeights,
    Slot,
    geometry,
    varlen_forward,
    why_not_slots,
)

if TYPE_CHECKING:
    from picospec.runtime.devices import Pacer

log = logging.getLogger(__name__)

PREFILL_TOKENS = 3
"""Forwards of at least this many tokens (a prefill, a block, the draft steps of several
sessions in one forward) use :attr:`LanguageModel.prefill_model` if there is one. On a CPU
without half-precision matrix units a float16 forward costs about one token's time per token,
while the float32 twin's packed weights cost about the same for 1 to 6 tokens (SmolLM2, one
core, decode steps of N sessions: float16 33/54/78/92 ms for N = 1/2/3/4, float32 48/59/48/47)."""


class ModelError(RuntimeError):
    """A model could not be found, loaded or paired; the message says what to do."""


class VocabularyMismatch(ModelError):
    """Drafter and verifier do not share a vocabulary, so their token ids mean different things."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ModelError(
            f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16"
        ) from None


class KVCache:
    """One session's KV cache in one model, croppable to any committed length.

    Two layouts (:attr:`LanguageModel.kv_layout`): ``slots``, a preallocated buffer written in
    place by the varlen forward (:mod:`picospec.runtime.kvslots`; crop is O(1), nothing is copied),
    for the Llama family; ``copy``, a transformers ``DynamicCache`` (every other model, and the
    comparison). ``capacity`` is the number of tokens a slot reserves up front (it grows
    geometrically past it, a counted copy).
    """

    def __init__(self, model: LanguageModel, capacity: int | None = None) -> None:
        self._model = model
        self.length = 0
        self.layout = model.effective_kv_layout
        self._slot: Slot | None = None
        self._cache: Any = None
        if self.layout == "slots":
            self._slot = Slot(
                model.kv_geometry,
                model.kv_counters,
                None if capacity is None else max(1, min(capacity, model.max_context)),
                model.max_context,
            )
        else:
            from transformers import DynamicCache

            self._cache = DynamicCache()

    def extend(
        self, tokens: list[int], keep: int | None = None, on_device: bool = False
    ) -> torch.Tensor:
        """Feed ``tokens``; return float32 logits ``[len(tokens), V]`` on the CPU: row ``i`` is the
        distribution of the token *after* ``tokens[i]``. With ``keep``, only the last ``keep``
        rows (the LM head runs for those alone in the slot layout); with ``on_device``, left on
        the model's device (the verifier decides there, see
        :mod:`picospec.speculation.sampling`)."""
        if not tokens:
            raise ValueError("extend() needs at least one token")
        keep = _rows(keep, len(tokens))
        if self._slot is not None:
            return self._model._forward_slots([self], [list(tokens)], [keep], on_device)[0]
        logits = self._model.forward(self._cache, tokens, self.length, on_device)
        logits = logits[len(logits) - keep :]
        self.length += len(tokens)
        return logits

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` tokens (a slot only moves its length)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        if length < self.length:
            if self._slot is None:
                if length == 0:
                    from transformers import DynamicCache

                    self._cache = DynamicCache()
                else:
                    self._cache.crop(length - self.length)  # transformers 5: negative = to drop
            self.length = length

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values, ``[1, kv_heads, length, head_dim]`` (views)."""
        if self._slot is not None:
            return self._slot.kv(layer, self.length)
        lay = self._cache.layers[layer]
        return lay.keys, lay.values

    def clone(self) -> KVCache:
        """An independent copy holding the same tokens, capacity and layout (benchmarks seed
        many sessions from one prefill with it)."""
        twin = KVCache.__new__(KVCache)
        twin._model, twin.length, twin.layout = self._model, self.length, self.layout
        twin._slot, twin._cache = None, None
        if self._slot is not None:
            s = self._slot
            twin._slot = Slot(s.geometry, s.counters, s.capacity_hint, s.max_capacity)
            twin._slot.buf = None if s.buf is None else s.buf.clone()
        else:
            from transformers import DynamicCache

            twin._cache = DynamicCache()
            for i in range(len(self._cache.layers) if self.length else 0):
                keys, values = self.kv(i)
                twin._cache.update(keys.clone(), values.clone(), i)
        return twin

    @property
    def capacity(self) -> int:
        """Tokens this cache holds without growing (its length for the copy layout)."""
        return self._slot.capacity if self._slot is not None else self.length

    def _layers_consistent(self) -> bool:
        """Every layer is a plain full-attention ``DynamicLayer`` holding exactly ``length``
        tokens of batch 1: what :meth:`LanguageModel.forward_batch` can pad and split back."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = self._cache
        if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
            return False
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                return False
            if self.length == 0:
                if layer.get_seq_length() != 0:
                    return False
            elif (
                not layer.is_initialized
                or layer.keys.dim() != 4
                or layer.keys.shape[0] != 1
                or layer.keys.shape[-2] != self.length
                or layer.values.shape[-2] != self.length
            ):
                return False
        return self.length == 0 or bool(cache.layers)

    def nbytes(self) -> int:
        """Memory held: a slot's whole reserved buffer, or the DynamicCache's tensors."""
        if self._slot is not None:
            return self._slot.nbytes()
        total = 0
        for layer in getattr(self._cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def used_bytes(self) -> int:
        """Bytes of the ``length`` valid tokens' keys/values."""
        if self._slot is not None:
            return self.length * self._slot.geometry.token_bytes
        return self.nbytes()


def _rows(keep: int | None, n: int) -> int:
    """The rows of an ``n``-token forward to return: all by default; 0 for a chunk of a
    prefill whose logits nobody reads."""
    if keep is None:
        return n
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} rows of a {n}-token forward")
    return keep


@dataclass
class LanguageModel:
    """A loaded causal LM (and its tokenizer, when it has one) on one device."""

    model: Any
    tokenizer: Any = None
    name: str = "model"
    device: torch.device = torch.device("cpu")
    batching: bool = True
    """Let :meth:`forward_batch` run several sessions in one padded forward (where supported)."""
    pacer: Pacer | None = None
    """Device emulation's handle, set by :func:`picospec.runtime.devices.pace` (which wraps
    :meth:`forward`, :meth:`_forward_varlen` and :meth:`_forward_padded`); never read here."""
    kv_layout: str = "slots"
    """``slots``: per-session preallocated caches and the varlen forward
    (:mod:`picospec.runtime.kvslots`) where the model supports it, else ``copy``; ``copy``:
    transformers' ``DynamicCache``, padded into a temporary batched cache each batched round (kept
    for comparison). Caches keep the layout they were made with."""
    kv_counters: CacheCounters = field(default_factory=CacheCounters)
    """Forwards run and cache bytes copied (see :class:`picospec.runtime.kvslots.CacheCounters`)."""
    prefill_model: Any = None
    """The same weights in another precision, for slot-layout forwards of at least
    ``PREFILL_TOKENS`` tokens (:meth:`add_prefill_twin`); keys/values still go to the slots in
    the model's own precision."""
    packed_weights: bool = True
    """Slot-layout forwards on a CPU in float32 (or bfloat16, with the CPU's bfloat16
    instructions) run the linear layers on oneDNN-packed copies of the weights
    (:class:`picospec.runtime.kvslots.PackedWeights`: faster at a few rows, a second copy of the
    linear weights in memory)."""

    def add_prefill_twin(self, dtype: str) -> None:
        """Keep a copy of the weights in ``dtype`` for forwards of many tokens. On a CPU
        without half-precision matrix units a float16 model decodes fast (a decode step reads
        half the bytes) but prefills slowly (SmolLM2, one core: a 53-token prefill 488 ms in
        float16, 163 ms in float32, 63 ms in bfloat16; a decode step 17, 38 and 26 ms)."""
        import copy

        want = pick_dtype(dtype, self.device)
        if want == next(self.model.parameters()).dtype or self.slots_unsupported:
            self.prefill_model = None
            return
        self.prefill_model = copy.deepcopy(self.model).to(want).eval()
        log.info("prefills of %s run in %s", self.name, want)

    # --- shape of the model -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(e) for e in eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    # --- compute ------------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A session's cache; ``capacity``: the tokens it is expected to hold (a slot reserves
        them at once, so it never grows in a session that keeps to it)."""
        return KVCache(self, capacity)

    @property
    def slots_unsupported(self) -> str | None:
        """Why this model's caches cannot take the slot layout; None if they can."""
        if not hasattr(self, "_no_slots"):
            self._no_slots = why_not_slots(self.model)
            if self._no_slots:
                log.info("model %s keeps DynamicCache caches: %s", self.name, self._no_slots)
        return self._no_slots

    @property
    def effective_kv_layout(self) -> str:
        """The layout new caches get: ``kv_layout``, or ``copy`` where slots are unsupported."""
        if self.kv_layout not in ("slots", "copy"):
            raise ModelError(f"unknown kv_layout {self.kv_layout!r}: use slots or copy")
        if self.kv_layout == "slots" and self.slots_unsupported is None:
            return "slots"
        return "copy"

    @property
    def kv_geometry(self) -> Geometry:
        if not hasattr(self, "_geometry"):
            self._geometry = geometry(self.model, self.device)
        return self._geometry

    @property
    def kv_token_bytes(self) -> int:
        """Bytes of one token's keys and values over all layers."""
        if self.effective_kv_layout == "slots":
            return self.kv_geometry.token_bytes
        cfg = self.model.config
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        size = next(self.model.parameters()).element_size()
        return 2 * int(cfg.num_hidden_layers) * heads * dim * size

    def _logits_out(self, logits: torch.Tensor, on_device: bool) -> torch.Tensor:
        """Float32 logits on the CPU, or left on the device (synchronised, so whoever times the
        forward, :func:`picospec.runtime.devices.pace`, times the compute and not its launch)."""
        logits = logits.float()
        if not on_device:
            return logits.cpu()
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        return logits

    @torch.inference_mode()
    def forward(
        self, cache: Any, tokens: list[int], past: int, on_device: bool = False
    ) -> torch.Tensor:
        """One session's forward through transformers with a ``DynamicCache`` (the copy
        layout): its update concatenates, so the ``past`` tokens are copied (counted)."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(past, past + len(tokens), device=self.device)[None]
        out = self.model(
            input_ids=ids, use_cache=True, position_ids=positions, **{self._cache_kwarg: cache}
        )
        self.kv_counters.forwards += 1
        if past:
            self.kv_counters.copied_bytes += past * self.kv_token_bytes
        return self._logits_out(out.logits[0], on_device)

    def _forward_slots(
        self,
        caches: list[KVCache],
        tokens: list[list[int]],
        keep: list[int],
        on_device: bool = False,
    ) -> list[torch.Tensor]:
        """The slot layout's forward (:func:`picospec.runtime.kvslots.varlen_forward`) of one or
        more sessions; every cache advances by its tokens. Float32 logits of the kept rows (on the
        CPU, or the device with ``on_device``)."""
        news = [len(t) for t in tokens]
        slots: list[Slot] = []
        for c, n in zip(caches, news, strict=True):
            assert c._slot is not None
            c._slot.reserve(c.length, c.length + n)
            slots.append(c._slot)
        rows = self._forward_varlen(slots, [c.length for c in caches], tokens, keep, on_device)
        self.kv_counters.forwards += 1
        for c, n in zip(caches, news, strict=True):
            c.length += n
        return list(rows.split(keep))

    def _forward_varlen(
        self,
        slots: list[Slot],
        pasts: list[int],
        tokens: list[list[int]],
        keep: list[int],
        on_device: bool = False,
    ) -> torch.Tensor:
        """The compute of :meth:`_forward_slots` (the slots already hold room for ``tokens``):
        the kept rows of every session, concatenated, as :meth:`_logits_out` gives them. Forwards
        of at least ``PREFILL_TOKENS`` tokens run on the prefill twin, where there is one."""
        twin = self.prefill_model is not None and sum(len(t) for t in tokens) >= PREFILL_TOKENS
        model = self.prefill_model if twin else self.model
        logits = varlen_forward(model, slots, pasts, tokens, keep, self.device, self._packed(model))
        return self._logits_out(logits, on_device)

    def _packed(self, model: Any) -> PackedWeights | None:
        """``model``'s packed weights (packed at the first forward, repacked when the weights
        changed), or None where they do not apply."""
        if not self.packed_weights:
            return None
        packs = self.__dict__.setdefault("_packs", {})
        pack = packs.get(id(model))
        if pack is None and id(model) in packs:
            return None  # unsupported, once and for all
        if pack is None or not pack.current(model):
            why = PackedWeights.unsupported(model)
            if why is not None:
                log.info("model %s runs its linear layers unpacked: %s", self.name, why)
                packs[id(model)] = None
                return None
            pack = packs[id(model)] = PackedWeights(model)
        return pack

    def forward_batch(
        self,
        caches: list[KVCache],
        tokens: list[list[int]],
        on_forward: Callable[[int], None] | None = None,
        keep: list[int] | None = None,
        on_device: bool = False,
    ) -> list[torch.Tensor]:
        """Feed ``tokens[b]`` to session cache ``caches[b]`` for every ``b`` in ONE forward.

        Returns what ``caches[b].extend(tokens[b], keep[b])`` would, per session: float32 CPU
        logits ``[len(tokens[b]), V]`` (only the last ``keep[b]`` rows with ``keep``; on the
        model's device with ``on_device``; equal within float tolerance), with every cache
        advanced by its own tokens. The sessions may
        hold different numbers of tokens (0 included) and feed different numbers of tokens.

        Slot caches (:mod:`picospec.runtime.kvslots`) take the varlen forward: the new tokens of all
        sessions concatenated, each session's keys/values written in place, nothing copied.

        Copy caches: a temporary batched cache holds every session's keys/values *left*-padded with
        zeros to the longest past ``P``; the new tokens are *right*-padded to the longest block
        ``N``. A 2-D ``attention_mask [B, P + N]`` marks the real positions (past and new) with
        1, so no real token attends to a pad; ``position_ids`` give each real token its true
        position (its cache length + offset), so rotary embeddings match the unbatched forward
        (left padding keeps the distance between real tokens unchanged, too). Afterwards each
        session keeps exactly its real new keys/values, appended to its own cache; the pads are
        dropped. A single session, or a model or cache that cannot be batched this way (see
        :attr:`batching_unsupported`), takes plain sequential forwards. ``on_forward(n)`` is
        called with the number of sessions of every forward actually run.
        """
        if len(caches) != len(tokens):
            raise ValueError(f"{len(caches)} caches but {len(tokens)} token lists")
        if any(not t for t in tokens):
            raise ValueError("forward_batch() needs at least one token per session")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one batch")
        if any(c._model is not self for c in caches):
            raise ValueError("every cache of a batch must belong to this model")
        wanted = keep or [None] * len(tokens)
        rows = [_rows(k, len(t)) for k, t in zip(wanted, tokens, strict=True)]
        report = on_forward or (lambda _n: None)
        if len(caches) > 1 and not self.batching_unsupported:
            if all(c._slot is not None for c in caches):
                out = self._forward_slots(caches, [list(t) for t in tokens], rows, on_device)
                report(len(caches))
                return out
            if all(c._slot is None for c in caches) and self._can_pad(caches):
                out = self._forward_padded(caches, tokens, on_device)
                report(len(caches))
                return [o[len(o) - k :] for o, k in zip(out, rows, strict=True)]
        logits = []
        for c, t, k in zip(caches, tokens, rows, strict=True):
            logits.append(c.extend(list(t), k, on_device))
            report(1)
        return logits

    @staticmethod
    def _can_pad(caches: list[KVCache]) -> bool:
        depths = {len(c._cache.layers) for c in caches if c.length}
        return len(depths) <= 1 and all(c._layers_consistent() for c in caches)

    @torch.inference_mode()
    def _forward_padded(
        self, caches: list[KVCache], tokens: list[list[int]], on_device: bool = False
    ) -> list[torch.Tensor]:
        from transformers import DynamicCache

        pasts = [c.length for c in caches]
        news = [len(t) for t in tokens]
        b_size, big_p, big_n = len(caches), max(pasts), max(news)
        ids = torch.zeros((b_size, big_n), dtype=torch.long)
        mask = torch.zeros((b_size, big_p + big_n), dtype=torch.long)
        positions = torch.empty((b_size, big_n), dtype=torch.long)
        for b, (past, n) in enumerate(zip(pasts, news, strict=True)):
            ids[b, :n] = torch.tensor(tokens[b], dtype=torch.long)
            mask[b, big_p - past : big_p + n] = 1
            positions[b] = torch.arange(past, past + big_n)  # pads continue past the real ones
        batched = DynamicCache()
        if big_p:
            n_layers = max(len(c._cache.layers) for c in caches)
            for i in range(n_layers):
                held = [(b, c._cache.layers[i]) for b, c in enumerate(caches) if c.length]
                ref = held[0][1]
                k_shape, v_shape = list(ref.keys.shape), list(ref.values.shape)
                k_shape[0] = v_shape[0] = b_size
                k_shape[-2] = v_shape[-2] = big_p
                keys = ref.keys.new_zeros(k_shape)
                values = ref.values.new_zeros(v_shape)
                for b, layer in held:
                    keys[b, :, big_p - pasts[b] :] = layer.keys[0]
                    values[b, :, big_p - pasts[b] :] = layer.values[0]
                batched.update(keys, values, i)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self._cache_kwarg: batched},
        )
        # split back: each session appends exactly its real new tokens' keys/values
        for b, (c, n) in enumerate(zip(caches, news, strict=True)):
            for i, layer in enumerate(batched.layers):
                c._cache.update(
                    layer.keys[b : b + 1, :, big_p : big_p + n],
                    layer.values[b : b + 1, :, big_p : big_p + n],
                    i,
                )
            c.length += n
        # what moved: the real past into the batched cache, the batched cache (pads included)
        # through its own concatenation, and each session's past through its split-back one
        tb = self.kv_token_bytes
        self.kv_counters.forwards += 1
        self.kv_counters.copied_bytes += (2 * sum(pasts) + b_size * big_p) * tb
        rows = torch.cat([out.logits[b, :n] for b, n in enumerate(news)])
        return list(self._logits_out(rows, on_device).split(news))

    @property
    def batching_unsupported(self) -> str | None:
        """Why :meth:`forward_batch` takes sequential forwards on this model; None if it
        batches. Padding is only exact where attention sees nothing but the 2-D mask and the
        position ids, and where no computation mixes the rows of a batch."""
        if not hasattr(self, "_no_batch"):
            self._no_batch = self._why_not_batched()
            if self._no_batch:
                log.info("model %s verifies sessions one by one: %s", self.name, self._no_batch)
        return self._no_batch if self.batching else "batching disabled"

    def _why_not_batched(self) -> str | None:
        import inspect

        cfg = getattr(self.model, "config", None)
        why = architecture_unsupported(cfg)
        if why:
            return why
        attn = getattr(cfg, "_attn_implementation", None)
        if attn not in BATCHED_ATTENTION:
            return f"attention implementation {attn!r} is not one known to honour the pad mask"
        if any(
            type(m).__module__.startswith("torch.ao.nn.quantized") for m in self.model.modules()
        ):
            return "int8 dynamic quantisation (activation scales depend on the whole batch)"
        quantizer = getattr(self.model, "hf_quantizer", None)
        if quantizer is not None:
            method = getattr(quantizer.quantization_config, "quant_method", None)
            dense = all(t.is_floating_point() for t in self.model.state_dict().values())
            if getattr(method, "value", method) != "gguf" or not dense:  # GGUF loads dense
                return f"quantised model ({getattr(method, 'value', method)})"
        params = inspect.signature(self.model.forward).parameters
        if not {"attention_mask", "position_ids"} <= params.keys():
            return "the model's forward takes no attention_mask or position_ids"
        return None

    @property
    def _cache_kwarg(self) -> str:
        """transformers renamed ``past_key_values`` to ``cache`` (5.x); speak either."""
        import inspect

        if not hasattr(self, "_kwarg"):
            params = inspect.signature(self.model.forward).parameters
            self._kwarg = "cache" if "cache" in params else "past_key_values"
        return self._kwarg

    # --- text ---------------------------------------------------------------------------
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ModelError(f"model {self.name} has no tokenizer; pass token ids instead")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._need_tokenizer().encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the model's chat template (with the assistant turn opened)."""
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ModelError(f"model {self.name} has no chat template; use completions")
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return str(self._need_tokenizer().decode(ids, skip_special_tokens=True))

    def warm_up_prompt(self) -> list[int]:
        """A short real prompt for a service's warm-up (through the chat template and the
        tokenizer, so they are warm too), or plain ids for a model without a tokenizer."""
        if self.tokenizer is not None:
            with contextlib.suppress(ModelError):
                ids = self.encode_chat([{"role": "user", "content": "Say hello, briefly."}])
                self.decode(ids)
                return ids
        return [i % self.vocab_size for i in range(1, 17)]


def check_vocabulary(draft: LanguageModel, target: LanguageModel) -> None:
    """Fail clearly unless drafter and verifier agree on every token id."""
    if draft.vocab_size != target.vocab_size:
        raise VocabularyMismatch(
            f"drafter {draft.name} has a vocabulary of {draft.vocab_size} tokens, verifier "
            f"{target.name} has {target.vocab_size}: speculative decoding needs one shared "
            "vocabulary (pick a draft model of the same family)"
        )
    if draft.tokenizer is not None and target.tokenizer is not None:
        dv, tv = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
        if dv != tv:
            differ = sorted(set(dv.items()) ^ set(tv.items()))[:3]
            raise VocabularyMismatch(
                f"drafter {draft.name} and verifier {target.name} have the same vocabulary size "
                f"but map tokens differently (e.g. {differ}): they cannot share token ids"
            )
