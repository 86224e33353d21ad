"""``picospec distill``: train a matched edge draft for a target.

- :mod:`~picospec.tools.distill.data`: prompts (templates x topics; never MT-Bench or
  HumanEval), the target's own responses, cached teacher top-k.
- :mod:`~picospec.tools.distill.stages`: building the training and evaluation data, and where
  training starts (a fresh student or an earlier draft).
- :mod:`~picospec.tools.distill.train`: the resumable pipeline (AdamW, cosine schedule,
  checkpoints, progress).
- :mod:`~picospec.tools.distill.report`: the report a run writes next to its draft.
- :mod:`~picospec.tools.distill.evaluate`: acceptance against the target, step-time ratio.
- :mod:`~picospec.tools.distill.recipe`: the recipe and the run's options.

What a draft *is* (its file, the student model, the shipped drafts, the names loading knows)
is the runtime's: :mod:`picospec.runtime.drafts`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``picospec distill`` to the command line."""
    from picospec.tools.distill.cli import register as _register

    _register(sub)
