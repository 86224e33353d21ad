"""``picospec bench``: edge-cloud speed, cloud cost and bytes per token, mode against mode.

For each network profile it starts a real ``edge-cloud`` stack (a cloud NATS hub with the
verifier, an edge leaf node with drafter and sampler, the leaf link through the WAN emulator),
then sends the same prompts through the same OpenAI API once per mode, one request at a time,
and reports the figures side by side. Ratios are measured in one run, on one machine.

The package: :mod:`~picospec.tools.bench.run` (stacks, modes, the sweep and the figures of a run),
:mod:`~picospec.tools.bench.speedup_map`, :mod:`~picospec.tools.bench.report` (tables and plots),
:mod:`~picospec.tools.bench.overhead` (the per-round software cost) and
:mod:`~picospec.tools.bench.cli`.

The analytic bound of the draft-bound pipeline (docs/architecture.md, "A first-order model of
speed"): with ``t_d`` the draft model's compute time per token, measured in the same picospec
run (``picospec_draft_step_seconds``, so a verifier sharing the machine's cores shows up in it),
``α`` the measured per-token acceptance (``token_acceptance``: accepted draft tokens over the
draft tokens the verifier tested, ``accepted / (accepted + rejections)``; ``acceptance_rate``,
accepted over drafted, also counts the tokens drafted after a rejection in its block, never
tested, so it is lower the longer the blocks), ``γ`` the block size, ``R`` the measured block round
trip (send -> verdict applied, drafter-side histogram) and ``W = (γ-1)/2 · t_d`` the mean wait
for a rejected token's block to be sent::

    rate_bound = 1 / (t_d + (1 - α) · (W + R))

The bound is a steady-state decode rate, so ``bound_ratio`` is the measured picospec decode
rate over ``rate_bound``: per request (median), the tokens after the first commit over the time
after it, as the drafter reports it (``decode_tokens_per_s``; a speculative first commit brings
a whole block). The time to first token is reported on its own; ``tokens_per_s`` and every
speedup include it.

Placement and emulated hardware. The edge (drafter, sampler, leaf node) and the cloud
(verifiers, hub) run pinned to disjoint CPUs (``--pin-cpus``, the default with 2+ CPUs), and
``ar`` runs on the cloud's. ``--device-profile`` gives each side the speed of the hardware it
stands for (``picospec.runtime.devices``): real tokens, real acceptance, a real emulated network,
and every model forward padded to the profile's time. Each mode's report says how many forwards
ran slower than the profile allows (``emulation``), and greedy runs check every mode's text
against ``ar``'s (``identical_to_ar``).

``--map`` runs the whole thing for each draft (the self-draft, the int8 draft, any other
``--map-drafts``) over the chosen profiles and reports picospec, dssd and vanilla against
``ar`` side by side with the paper's Table 1, plus where the rate model says speculation pays
off (:func:`break_even_acceptance`).
"""

from picospec.tools.bench.cli import main, register
from picospec.tools.bench.run import (
    MODES,
    PROFILES,
    QUICK_PROMPTS,
    bound,
    load_prompts,
)
from picospec.tools.bench.speedup_map import MAP_MODES, PAPER_TABLE1, break_even_acceptance

__all__ = [
    "MAP_MODES",
    "MODES",
    "PAPER_TABLE1",
    "PROFILES",
    "QUICK_PROMPTS",
    "bound",
    "break_even_acceptance",
    "load_prompts",
    "main",
    "register",
]
