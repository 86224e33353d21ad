"""Slot KV caches and the varlen forward: many sessions in one forward, no cache copied.

The ``slots`` KV layout (:attr:`picospec.runtime.model.LanguageModel.kv_layout`) keeps each
session's keys and values in ONE preallocated buffer
``[layers, 2, kv_heads, capacity, head_dim]`` (a *slot*) with its own length. A forward writes the
new tokens' keys/values in place at ``[length : length + n]`` and attends over the view
``[: length + n]``; cropping only moves the length (O(1)); nothing of a session's past is ever
copied, except when a slot outgrows its capacity (it then grows geometrically, and the copy is
counted in :class:`CacheCounters`).

:func:`varlen_forward` is the forward of Llama-family decoders (llama, mistral, qwen2, qwen3:
the ``BATCHED_MODEL_TYPES`` of :mod:`picospec.runtime.architecture`) written over the model's own
Hugging Face modules, so the weights, norms and MLPs are the model's:

* embed every new token of every session, concatenated, without padding;
* per layer: ``input_layernorm``; q/k/v projections over all tokens at once (qwen3's per-head
  ``q_norm``/``k_norm`` too); rotary embeddings from ``model.model.rotary_emb`` at each token's
  true position; keys/values written in place into each session's slot; attention per session
  with torch's ``scaled_dot_product_attention`` over the slot's view, in the 4-D shape its
  fused kernels take (grouped-query attention by ``enable_gqa``, so keys/values are never
  repeated or copied; the kernel's own causal mask for a prompt's first chunk, an explicit
  one for a chunk after earlier tokens); ``o_proj`` and the MLP over all tokens;
* the final norm and the LM head ONLY for the rows the caller keeps (the verifier needs the
  last ``n_draft + 1`` rows of a block, a prefill only the last one).

On a CPU with float32 weights (or bfloat16, where the CPU has bfloat16 instructions) the linear
layers run on :class:`PackedWeights`: oneDNN's
pre-packed copies of the weights, with q/k/v fused into one matrix and gate/up into another,
as serving engines fuse them. A decode forward of a few sessions is a handful of rows against
each weight matrix, where a plain ``F.linear`` (MKL's GEMM, re-packing the matrix on every
call) reads the weights at half the memory bandwidth a gemv gets; the packed kernel keeps it
(measured on SmolLM2, one core: a 4-row [4, 576] x [576, 1536] product 212 µs packed against
410 µs, and one row 308 against 374 µs). They cost a second copy of the linear weights.

Single sessions (the drafter's steps, a prefill) take the same function with one session, so
there is one way to run these models; the ``copy`` layout (the transformers ``DynamicCache``,
padded into a temporary batched cache per round) stays for every other model and for the
side-by-side comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from picospec.runtime.architecture import architecture_unsupported

SLOT_MARGIN = 64
"""Tokens reserved beyond a session's expected length (a block drafted past the last token)."""
MIN_CAPACITY = 256
"""Smallest slot allocated when nothing better is known (a slot without a capacity hint)."""


@dataclass
class CacheCounters:
    """What the KV caches of one model moved, for the capacity figures.

    ``copied_bytes`` counts bytes of *existing* cache entries copied (the copy layout's
    per-round padding and split-back, ``DynamicCache``'s concatenation, a slot growing); writing
    the new tokens' own keys/values is not a copy. ``grows`` counts slots that outgrew their
    capacity.
    """

    forwards: int = 0
    copied_bytes: int = 0
    grows: int = 0
    grown_bytes: int = 0

    def snapshot(self) -> CacheCounters:
        return CacheCounters(self.forwards, self.copied_bytes, self.grows, self.grown_bytes)


@dataclass(frozen=True)
class Geometry:
    """The shape of one token's keys/values in a model."""

    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values over all layers."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * size


class Slot:
    """One session's keys/values: ``buf [layers, 2, kv_heads, capacity, head_dim]`` (allocated
    at the first write), of which the first ``length`` positions are valid."""

    __slots__ = ("geometry", "buf", "capacity_hint", "max_capacity", "counters")

    def __init__(
        self,
        geometry: Geometry,
        counters: CacheCounters,
        capacity_hint: int | None,
        max_capacity: int,
    ) -> None:
        self.geometry = geometry
        self.counters = counters
        self.capacity_hint = capacity_hint
        self.max_capacity = max_capacity
        self.buf: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else int(self.buf.shape[3])

    def reserve(self, length: int, needed: int) -> None:
        """Make room for ``needed`` tokens, keeping the first ``length``: allocate at the first
        call (the hint, or the need plus a margin), else grow geometrically (a counted copy)."""
        if needed <= self.capacity:
            return
        g = self.geometry
        if self.buf is None:
            want = self.capacity_hint or max(MIN_CAPACITY, needed + SLOT_MARGIN)
        else:
            want = 2 * self.capacity
        cap = max(needed, min(want, max(self.max_capacity, needed)))
        buf = torch.empty(
            (g.layers, 2, g.kv_heads, cap, g.head_dim), dtype=g.dtype, device=g.device
        )
        if self.buf is not None:
            if length:
                buf[:, :, :, :length] = self.buf[:, :, :, :length]
            self.counters.grows += 1
            self.counters.grown_bytes += length * g.token_bytes
            self.counters.copied_bytes += length * g.token_bytes
        self.buf = buf

    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def kv(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer ``layer``'s valid keys and values, ``[1, kv_heads, length, head_dim]``."""
        if self.buf is None:
            g = self.geometry
            empty = torch.empty((1, g.kv_heads, 0, g.head_dim), dtype=g.dtype, device=g.device)
            return empty, empty
        return self.buf[layer, 0, None, :, :length], self.buf[layer, 1, None, :, :length]


class PackedWeights:
    """oneDNN-packed (``torch.ops.mkldnn``) copies of a Llama-family decoder's linear weights
    (float32, or bfloat16) for :func:`varlen_forward` on a CPU: per layer ``qkv`` (q, k and v
    fused), ``o``, ``gate_up`` (gate and up fused), ``down``, and the LM head.

    The copies follow the weights: :meth:`current` notices a weight changed in place (its
    version counter moved, as an optimiser step does) or replaced, and the caller repacks.
    """

    BATCH_HINT = 16  # the row count oneDNN lays the weights out for

    def __init__(self, model: Any) -> None:
        base = model.model
        self._sources = self._weights(model)
        self._stamp = self._stamps(self._sources)
        self.layers: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        for layer in base.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "qkv": _pack([a.q_proj, a.k_proj, a.v_proj]),
                    "o": _pack([a.o_proj]),
                    "gate_up": _pack([mlp.gate_proj, mlp.up_proj]),
                    "down": _pack([mlp.down_proj]),
                }
            )
        self.head = _pack([model.lm_head])

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why ``model``'s linear layers cannot be packed; None if they can."""
        if not (
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        ):
            return "no oneDNN in this torch build"
        base = getattr(model, "model", None)
        head = getattr(model, "lm_head", None)
        if base is None or type(head) is not torch.nn.Linear:
            return "no plain linear LM head"
        for layer in base.layers:
            mlp = getattr(layer, "mlp", None)
            if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                return "an MLP other than Llama's gated one"
        for w in PackedWeights._weights(model):
            if w.device.type != "cpu" or w.dtype not in PackedWeights.dtypes():
                return "weights neither float32 nor (with oneDNN's bfloat16) bfloat16 on the CPU"
        return None

    @staticmethod
    def dtypes() -> tuple[torch.dtype, ...]:
        """The weight precisions oneDNN packs here: float32, and bfloat16 where the CPU has
        its bfloat16 instructions (AVX512-BF16/AMX; measured here: a 4-row product over a
        SmolLM2 layer stack 19 ms in bfloat16 against 32 ms in float32)."""
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return (torch.float32, torch.bfloat16)
        return (torch.float32,)

    @staticmethod
    def _weights(model: Any) -> list[torch.Tensor]:
        out = []
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj,
                        mlp.down_proj):  # fmt: skip
                if type(lin) is not torch.nn.Linear:
                    raise TypeError("not a plain nn.Linear")
                out.append(lin.weight)
        out.append(model.lm_head.weight)
        return out

    @staticmethod
    def _stamps(weights: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
        return tuple((w.data_ptr(), w._version) for w in weights)

    def current(self, model: Any) -> bool:
        """Do the packed copies still hold ``model``'s weights?"""
        try:
            weights = self._weights(model)
        except (TypeError, AttributeError):
            return False
        return self._stamps(weights) == self._stamp

    @staticmethod
    def linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        weight, bias = packed
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _pack(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One packed matrix for ``linears`` side by side (outputs concatenated), and its bias."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.detach() if b is not None else weight.new_zeros(lin.out_features)
                for b, lin in zip(biases, linears, strict=True)
            ]
        )
    return torch.ops.mkldnn._reorder_linear_weight(weight, PackedWeights.BATCH_HINT), bias


def why_not_slots(model: Any) -> str | None:
    """Why :func:`varlen_forward` cannot run ``model`` (a transformers causal LM); None if it
    can: a Llama-family decoder with full attention everywhere and rotary embeddings fixed by
    position alone."""
    cfg = getattr(model, "config", None)
    why = architecture_unsupported(cfg)
    if why:
        return why
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary embeddings"
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "lm_head"):
        return "no decoder/LM-head structure"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"decoder without {name}"
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(
            hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")
        ):
            return "attention without q/k/v/o projections"
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm")):
            return "decoder layer without its two norms"
    return None


def geometry(model: Any, device: torch.device) -> Geometry:
    cfg = model.config
    base = model.model
    attn = base.layers[0].self_attn
    return Geometry(
        layers=len(base.layers),
        kv_heads=int(cfg.num_key_value_heads),
        heads=int(cfg.num_attention_heads),
        head_dim=int(attn.head_dim),
        dtype=base.embed_tokens.weight.dtype,
        device=device,
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rows(NamedTuple):
    """Where one session's new tokens sit in a varlen forward: rows ``start : start + n`` of
    the concatenation, at positions ``past : seen`` of its slot, with its attention mask
    (None: all keys) or the kernel's own causal mask (a prompt's first chunk)."""

    start: int
    n: int
    past: int
    seen: int
    mask: torch.Tensor | None
    causal: bool


def _plan(lengths: list[int], news: list[int], device: torch.device) -> list[_Rows]:
    plan, off = [], 0
    for past, n in zip(lengths, news, strict=True):
        seen = past + n
        mask = None
        if n > 1 and past > 0:  # query t (at position past + t) sees keys up to its own position
            mask = (
                torch.arange(seen, device=device)[None, :]
                <= (past + torch.arange(n, device=device))[:, None]
            )
        plan.append(_Rows(off, n, past, seen, mask, causal=n > 1 and past == 0))
        off += n
    return plan


def _qkv(
    layer: Any, weights: dict[str, Any] | None, x: torch.Tensor, g: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's queries, keys and values ``[T, heads, D]``, from its packed ``weights`` where
    given, else from its own projections."""
    total, attn = x.shape[0], layer.self_attn
    if weights is not None:
        q, k, v = PackedWeights.linear(x, weights["qkv"]).split(
            [g.heads * g.head_dim, g.kv_heads * g.head_dim, g.kv_heads * g.head_dim], -1
        )
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.reshape(total, g.heads, g.head_dim)
    k = k.reshape(total, g.kv_heads, g.head_dim)
    v = v.reshape(total, g.kv_heads, g.head_dim)
    if hasattr(attn, "q_norm"):  # qwen3: RMSNorm per head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _attend(
    slots: list[Slot],
    plan: list[_Rows],
    i: int,
    qkv: tuple[torch.Tensor, ...],
    attn: Any,
    g: Any,
    out: torch.Tensor,
) -> None:
    """Layer ``i``'s attention, session by session: each session's keys and values written
    into its slot, its queries against everything its slot holds, into ``out``'s rows."""
    q, k, v = qkv
    for slot, r in zip(slots, plan, strict=True):
        assert slot.buf is not None
        kv = slot.buf[i]  # [2, kv_heads, capacity, D]
        kv[0, :, r.past : r.seen] = k[r.start : r.start + r.n].transpose(0, 1)
        kv[1, :, r.past : r.seen] = v[r.start : r.start + r.n].transpose(0, 1)
        # 4-D [1, heads, n, D] against [1, kv_heads, seen, D] with grouped-query attention:
        # torch's fused CPU/GPU kernels take this shape (3-D inputs fall back to the
        # unfused path, 3-7x slower on a long prompt), and keys/values are never repeated
        o = F.scaled_dot_product_attention(
            q[r.start : r.start + r.n].transpose(0, 1)[None].to(kv.dtype),
            kv[0, None, :, : r.seen],
            kv[1, None, :, : r.seen],
            attn_mask=r.mask,
            is_causal=r.causal,
            scale=attn.scaling,
            enable_gqa=g.heads != g.kv_heads,
        )
        out[r.start : r.start + r.n] = o[0].transpose(0, 1).reshape(r.n, g.heads * g.head_dim)


def _finish_layer(
    layer: Any, weights: dict[str, Any] | None, h: torch.Tensor, attn_out: torch.Tensor
) -> torch.Tensor:
    """The hidden states after a layer: its attention's output projection and its MLP, each
    added to the residual stream (on the packed ``weights`` where given)."""
    if weights is None:
        h = h + layer.self_attn.o_proj(attn_out)
        return h + layer.mlp(layer.post_attention_layernorm(h))
    h = h + PackedWeights.linear(attn_out, weights["o"])
    normed = layer.post_attention_layernorm(h)
    gate, up = PackedWeights.linear(normed, weights["gate_up"]).chunk(2, -1)
    return h + PackedWeights.linear(layer.mlp.act_fn(gate) * up, weights["down"])


@torch.inference_mode()
def varlen_forward(
    model: Any,
    slots: list[Slot],
    lengths: list[int],
    tokens: list[list[int]],
    keep: list[int],
    device: torch.device,
    packed: PackedWeights | None = None,
) -> torch.Tensor:
    """Feed ``tokens[b]`` to ``slots[b]`` (holding ``lengths[b]`` valid tokens) for every ``b``
    in one forward; return the logits of the last ``keep[b]`` rows of every session,
    concatenated in session order ``[sum(keep), V]``, in the model's dtype on its device.

    Each slot must have room for its new tokens (:meth:`Slot.reserve`); their keys/values are
    written at ``[lengths[b] : lengths[b] + len(tokens[b])]``. The callers advance the lengths.
    ``model`` may hold the weights in another precision than the slots (a prefill twin): keys
    and values are stored in the slots' precision and attention runs in it. ``packed``: the
    model's :class:`PackedWeights`, current, to run its linear layers on.
    """
    base = model.model
    g = slots[0].geometry
    news = [len(t) for t in tokens]
    ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=device)
    positions = torch.cat(
        [torch.arange(p, p + n, dtype=torch.long) for p, n in zip(lengths, news, strict=True)]
    ).to(device)
    h = base.embed_tokens(ids)  # [T, hidden]
    cos, sin = base.rotary_emb(h[None], positions[None])
    cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, D]: broadcast over heads
    plan = _plan(lengths, news, device)
    attn_out = h.new_empty((sum(news), g.heads * g.head_dim))
    for i, layer in enumerate(base.layers):
        weights = packed.layers[i] if packed is not None else None
        q, k, v = _qkv(layer, weights, layer.input_layernorm(h), g)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        _attend(slots, plan, i, (q, k, v), layer.self_attn, g, attn_out)
        h = _finish_layer(layer, weights, h, attn_out)
    rows = torch.cat(
        [
            torch.arange(r.start + r.n - k_rows, r.start + r.n)
            for r, k_rows in zip(plan, keep, strict=True)
        ]
    ).to(device)
    if not len(rows):  # chunks of prefills only: nobody reads their logits
        return h.new_empty((0, int(model.config.vocab_size)))
    if packed is not None:
        return PackedWeights.linear(base.norm(h[rows]), packed.head)
    return model.lm_head(base.norm(h[rows]))
