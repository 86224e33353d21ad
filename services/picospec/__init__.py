"""PicoSpec: edge-cloud collaborative speculative decoding."""

import os

__version__ = "0.1.0"

DRAFTER_HELP = (
    "what drafts: a draft model (hub id, dir, .gguf, smollm2-draft), suffix (suffix matches "
    "alone, no draft model) or MODEL+suffix (both); default $PICOSPEC_DRAFT_MODEL or smollm2"
)
SUFFIX = "suffix"


def split_drafter(drafter: str, target: str) -> tuple[str, str]:
    """``--drafter`` as the drafter's settings ``(model, draft)``: ``suffix`` drafts with no
    model (the drafter loads the target's checkpoint only for its tokenizer),
    ``MODEL+suffix`` with both, anything else is a draft model."""
    if drafter == SUFFIX:
        return target, SUFFIX
    if drafter.endswith("+" + SUFFIX):
        return drafter[: -len(SUFFIX) - 1], "model+" + SUFFIX
    return drafter, "model"


DRAFT_DTYPES = ("auto", "float32", "bfloat16", "float16")
DRAFT_DTYPE_HELP = (
    "the draft model's precision (the target keeps its own; beats a device profile's); "
    "default $PICOSPEC_DRAFT_DTYPE or auto"
)


def default_draft_dtype() -> str:
    """The draft's precision when ``--draft-dtype`` is not given: ``PICOSPEC_DRAFT_DTYPE``,
    else ``auto`` (the device's default, or the device profile's)."""
    return os.environ.get("PICOSPEC_DRAFT_DTYPE") or "auto"


def default_drafter() -> str:
    """The draft model the command line uses when ``--drafter`` is not given:
    ``PICOSPEC_DRAFT_MODEL`` (e.g. ``smollm2-draft``), else the embedded model itself."""
    return os.environ.get("PICOSPEC_DRAFT_MODEL") or "smollm2"
