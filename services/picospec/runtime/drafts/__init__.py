"""Distilled drafts: their names, their file, the student model they build, the shipped ones.

A draft (``smollm2-draft``) is a few of its target's decoder layers, trained to draft for it,
stored as deltas from the target (:mod:`~picospec.runtime.drafts.format`) and built on top of the
loaded target as a student (:mod:`~picospec.runtime.drafts.student`). Shipped drafts are the
folders next to this file. :func:`draft_dir` is the registry that
:func:`picospec.runtime.loading.load_model` asks about every name; training a draft is
``picospec distill`` (:mod:`picospec.tools.distill`). This module imports nothing, so asking
stays cheap.

A new shipped draft: ``make draft`` writes it here (``DRAFT_OUT``); its name ends in ``-draft``.
"""

from __future__ import annotations

from pathlib import Path

META = "draft.json"
DRAFTS_DIR = Path(__file__).resolve().parent
"""Where shipped drafts live (``smollm2-draft`` is ``DRAFTS_DIR / "smollm2-draft"``)."""


class DraftError(RuntimeError):
    """A draft file is missing, malformed or does not belong to the target it names."""


def draft_dir(name: str) -> Path | None:
    """The directory of draft ``name`` (a shipped name or a path holding ``draft.json``), or None
    when ``name`` is not a draft (then it is an ordinary model name)."""
    if "/" not in name and not name.startswith((".", "~")) and name.endswith("-draft"):
        return DRAFTS_DIR / name  # shipped: may still be missing (load says how to build it)
    p = Path(name).expanduser()
    if p.is_dir() and (p / META).is_file():
        return p
    return None
