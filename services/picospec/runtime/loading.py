"""Loading a model by name: the one way every role, tool and test gets a :class:`LanguageModel`.

A name is a distilled draft (``smollm2-draft``, or a draft's directory: the target it names plus
the draft's file, :mod:`picospec.runtime.drafts`) or a checkpoint
(:mod:`picospec.runtime.checkpoints`: ``smollm2``, a GGUF file, a directory, a hub id).
:func:`model_from_settings` adds what a service's settings ask for: device-profile pacing, the
KV layout, a prefill twin.
"""

from __future__ import annotations

from typing import Any

from picospec.runtime.checkpoints import EMBEDDED, load_pretrained
from picospec.runtime.devices import Pacer, load_profile, pace
from picospec.runtime.drafts import draft_dir
from picospec.runtime.model import LanguageModel


def load_model(
    name: str = EMBEDDED,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    quantize: str | None = None,
) -> LanguageModel:
    """Load ``name``: a distilled draft (on top of its target), else a checkpoint
    (:func:`~picospec.runtime.checkpoints.load_pretrained`). ``quantize="int8"`` applies
    dynamic int8 quantisation of the linear layers (CPU only)."""
    if draft_dir(name) is not None:  # a distilled draft (smollm2-draft): target + its file
        from picospec.runtime.drafts.format import load_draft

        return load_draft(name, device=device, dtype=dtype, threads=threads, quantize=quantize)
    return load_pretrained(name, device=device, dtype=dtype, threads=threads, quantize=quantize)


def model_from_settings(settings: Any, role: str | None = None) -> LanguageModel:
    """Load the model a service's settings name (``model``, ``device``, ``dtype``…); with a
    ``device_profile`` set, its forwards are paced as the profile's ``role`` line says
    (``draft`` on the edge, ``verify`` in the cloud)."""
    cost = None
    if settings.device_profile and role is not None:
        cost = load_profile(settings.device_profile).cost(role)
    dtype = settings.dtype
    prefill = settings.prefill_dtype
    if cost is not None and settings.quantize == "none":
        if cost.dtype and dtype == "auto":
            dtype = cost.dtype  # the emulated device's precision (e.g. fp16 on a Jetson)
        if cost.prefill_dtype and prefill == "auto":
            prefill = cost.prefill_dtype
    model = load_model(
        settings.model,
        device=settings.device,
        dtype=dtype,
        threads=settings.threads,
        quantize=settings.quantize,
    )
    if cost is not None:
        pace(model, Pacer(cost, role or ""))
    layout = getattr(settings, "kv_layout", None)
    if layout:
        model.kv_layout = str(layout)
    if prefill != "auto" and settings.quantize == "none":
        model.add_prefill_twin(prefill)
    return model
