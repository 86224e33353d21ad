"""The draft file: only what a distilled draft adds to its target.

A draft is a directory with two files:

``draft.json``
    ``{"format": "picospec-draft", "version": 1, "target": "smollm2", "layers": [0, 10, 20, 29],
    "head_size": 8192 | null, "fingerprint": {…}, "recipe": {…}, "report": {…}}``: the target it
    was distilled from (a name :func:`~picospec.runtime.loading.load_model` takes), which target
    layer each draft layer was initialised from, and the target's fingerprint (shapes and embedding
    checksums) so a draft is never put on top of another model.
``draft.safetensors``
    For every tensor the draft trained (its decoder layers and its final norm), under the
    student's names (``layers.0.self_attn.q_proj.weight``, ``norm.weight``): the *delta* from the
    target tensor it started from. Matrices are stored as int8 per row (``<name>.q``, int8
    ``[R, C]``, and ``<name>.scale``, float32 ``[R]``: delta = q * scale); vectors as float32
    (``<name>.delta``). With a reduced head, ``head_ids`` (int32) lists its tokens. Nothing of the
    embeddings, the output head's weights or the target's other layers is stored.

Loading (:func:`load_draft`) loads the named target, builds the student from it
(:func:`picospec.runtime.drafts.student.build_student`), adds the deltas and drops the rest of the
target. The int8 rounding error of a delta is at most half its row's step (``max|delta| / 254``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from picospec.runtime.drafts import META, DraftError, draft_dir

log = logging.getLogger(__name__)

FORMAT = "picospec-draft"
VERSION = 1
TENSORS = "draft.safetensors"


def fingerprint(target: torch.nn.Module) -> dict[str, Any]:
    """Shapes and embedding checksums that identify a target's weights across dtypes."""
    from picospec.runtime.drafts.student import decoder_layers

    emb = target.get_input_embeddings().weight.detach().double()
    cfg = target.config
    return {
        "model_type": getattr(cfg, "model_type", None),
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "num_layers": len(decoder_layers(target)),
        "embed_abs_mean": float(emb.abs().mean()),
        "embed_row0_sum": float(emb[0].sum()),
    }


def _fingerprint_matches(want: dict[str, Any], got: dict[str, Any]) -> bool:
    for k, v in want.items():
        g = got.get(k)
        if isinstance(v, float):
            if g is None or abs(g - v) > 1e-3 * max(abs(v), 1e-6) + 1e-6:
                return False
        elif g != v:
            return False
    return True


def quantize_rows(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per-row quantisation: ``(q, scale)`` with ``delta ≈ q * scale[:, None]``."""
    d = delta.detach().float().reshape(delta.shape[0], -1)
    scale = d.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(d / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(delta.shape), scale


def pack(
    trained: dict[str, torch.Tensor],
    source: dict[str, torch.Tensor],
    head_ids: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The tensors of ``draft.safetensors``: deltas of ``trained`` from ``source``."""
    if trained.keys() != source.keys():
        raise DraftError("trained and source tensors differ in names")
    out: dict[str, torch.Tensor] = {}
    for name, t in trained.items():
        delta = t.detach().float().cpu() - source[name].detach().float().cpu()
        if delta.dim() >= 2:
            q, scale = quantize_rows(delta)
            out[f"{name}.q"], out[f"{name}.scale"] = q.contiguous(), scale.contiguous()
        else:
            out[f"{name}.delta"] = delta.contiguous()
    if head_ids is not None:
        out["head_ids"] = head_ids.to(torch.int32).cpu().contiguous()
    return out


def unpack(
    tensors: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The trained tensors again: ``source + delta`` for every name of ``source``."""
    out = {}
    for name, src in source.items():
        if f"{name}.q" in tensors:
            q, scale = tensors[f"{name}.q"], tensors[f"{name}.scale"]
            delta = (q.float().reshape(q.shape[0], -1) * scale[:, None]).reshape(q.shape)
        elif f"{name}.delta" in tensors:
            delta = tensors[f"{name}.delta"]
        else:
            raise DraftError(f"the draft file has no delta for {name}")
        if delta.shape != src.shape:
            raise DraftError(f"{name}: delta {tuple(delta.shape)} != target {tuple(src.shape)}")
        out[name] = (src.detach().float().cpu() + delta.float()).to(src.dtype)
    return out


def save_draft(
    path: str | Path,
    student: torch.nn.Module,
    target: torch.nn.Module,
    *,
    target_name: str,
    layers: list[int],
    recipe: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write ``student`` as a draft of ``target`` (named ``target_name``) to directory ``path``."""
    from safetensors.torch import save_file

    from picospec.runtime.drafts.student import ReducedHead, source_state, trainable_state

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head = student.lm_head
    head_ids = head.ids if isinstance(head, ReducedHead) else None
    tensors = pack(trainable_state(student), source_state(target, layers), head_ids)
    tmp = path / (TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path / TENSORS)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "target": target_name,
        "layers": list(layers),
        "head_size": None if head_ids is None else int(head_ids.numel()),
        "fingerprint": fingerprint(target),
        "recipe": recipe or {},
        "report": report or {},
    }
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise DraftError(
            f"draft {path} does not exist: build it with `make draft` (or `picospec distill`)"
        ) from None
    except json.JSONDecodeError as e:
        raise DraftError(f"{path / META} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DraftError(f"{path / META} is not a {FORMAT} v{VERSION} file")
    return meta


def draft_from_target(path: Path, target: Any, name: str | None = None) -> Any:
    """Build the draft stored at ``path`` on top of ``target`` (a loaded ``LanguageModel``, whose
    layers it copies; the target itself is left unchanged)."""
    from safetensors.torch import load_file

    from picospec.runtime.drafts.student import build_student, load_trainable_state, source_state
    from picospec.runtime.model import LanguageModel

    meta = read_meta(path)
    got = fingerprint(target.model)
    if not _fingerprint_matches(meta["fingerprint"], got):
        raise DraftError(
            f"draft {path} was distilled from a different model than {target.name} "
            f"(fingerprint {meta['fingerprint']} != {got})"
        )
    tensors = load_file(str(path / TENSORS))
    head_ids = tensors.get("head_ids")
    layers = [int(i) for i in meta["layers"]]
    student = build_student(
        target.model, layers, None if head_ids is None else head_ids.long().to(target.device)
    )
    state = unpack(tensors, source_state(target.model, layers))
    load_trainable_state(student, {k: v.to(target.device) for k, v in state.items()})
    return LanguageModel(
        model=student.eval(),
        tokenizer=target.tokenizer,
        name=name or path.name,
        device=target.device,
    )


def load_draft(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    quantize: str | None = None,
) -> Any:
    """:func:`~picospec.runtime.loading.load_model` for a draft: load its target, build the
    draft, drop the target."""
    from picospec.runtime.checkpoints import load_pretrained, quantize_int8
    from picospec.runtime.model import ModelError

    path = draft_dir(name)
    if path is None:
        raise DraftError(f"{name} is not a draft")
    meta = read_meta(path)
    if draft_dir(meta["target"]) is not None:
        raise DraftError(f"draft {name} names another draft ({meta['target']}) as its target")
    target = load_pretrained(meta["target"], device=device, dtype=dtype, threads=threads)
    draft = draft_from_target(path, target, name=name)
    if quantize == "int8":
        if draft.device.type != "cpu":
            raise ModelError("int8 dynamic quantisation runs on the CPU only")
        draft.model = quantize_int8(draft.model)
        draft.name = f"{name}:int8"
    elif quantize not in (None, "", "none"):
        raise ModelError(f"unknown quantisation {quantize!r}: use none or int8")
    log.info("loaded draft %s (target %s, layers %s)", name, meta["target"], meta["layers"])
    return draft
