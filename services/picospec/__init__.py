"""PicoSpec: edge-cloud collaborative speculative decoding."""

import os

__version__ = "0.1.0"

DRAFTER_HELP = (
    "draft model (hub id, dir, .gguf, smollm2-draft); default $PICOSPEC_DRAFT_MODEL or smollm2"
)


def default_drafter() -> str:
    """The draft model the command line uses when ``--drafter`` is not given:
    ``PICOSPEC_DRAFT_MODEL`` (e.g. ``smollm2-draft``), else the embedded model itself."""
    return os.environ.get("PICOSPEC_DRAFT_MODEL") or "smollm2"
