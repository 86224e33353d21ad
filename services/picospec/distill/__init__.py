"""``picospec distill``: train a matched edge draft for a target, and load shipped drafts.

- :mod:`~picospec.distill.data`: prompts (templates x topics; never MT-Bench or HumanEval), the
  target's own responses, cached teacher top-k.
- :mod:`~picospec.distill.student`: the student built from the target's own layers, with an
  optional reduced head (``-inf`` outside its tokens, so ``q`` is exactly 0 there).
- :mod:`~picospec.distill.train`: the resumable pipeline (AdamW, cosine schedule, checkpoints,
  progress, report).
- :mod:`~picospec.distill.evaluate`: acceptance against the target, step-time ratio.
- :mod:`~picospec.distill.format`: the draft file (only what the draft adds) and its loader.

This module stays light: ``LanguageModel.load`` asks :func:`draft_dir` about every name.
"""

from __future__ import annotations

from typing import Any

from picospec.distill.format import DRAFTS_DIR, DraftError, draft_dir

__all__ = ["DRAFTS_DIR", "DraftError", "draft_dir", "load_draft", "register"]


def load_draft(name: str, **kwargs: Any) -> Any:
    """Load draft ``name`` (shipped name or directory) on top of the target it names."""
    from picospec.distill.format import load_draft as _load

    return _load(name, **kwargs)


def register(sub: Any) -> None:
    """Add ``picospec distill`` to the command line."""
    from picospec.distill.cli import register as _register

    _register(sub)
