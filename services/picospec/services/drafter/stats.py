"""What a response reports of its generation: the ``picospec`` object (acceptance, rounds,
bytes, timings, the verifier that served it, adaptive speculation's choices)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from picospec.speculation.drafter import DrafterStats
from picospec.speculation.spec import Mode
from picospec.speculation.tuning import DraftLenController


@dataclass
class Stats:
    """What the API reports in its ``picospec`` object."""

    mode: str
    prompt_tokens: int = 0
    tokens: int = 0
    speculation: DrafterStats = field(default_factory=DrafterStats)  # the session's own
    migrations: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    first_commit_tokens: int = 0  # tokens that arrived with the first (a whole verdict's worth)
    cloud_prefill_s: float | None = None  # the first open's prefill on the verifier (in TTFT)
    elapsed_s: float = 0.0
    verifier: str = ""
    verified: bool = True  # False when (part of) the answer came from the draft model alone
    tuner: DraftLenController | None = None  # adaptive speculation (draft_len "auto")
    draft_policy: str | None = (
        None  # "off": no speculation (a saturated verifier, or one faster alone)
    )

    def as_dict(self) -> dict[str, object]:
        tuning: dict[str, object] = {"draft_policy": self.draft_policy}
        if self.tuner is not None:
            tuning = {
                "draft_len": self.tuner.gamma,
                "lookahead": self.tuner.lookahead,
                "draft_len_rounds": {str(g): n for g, n in sorted(self.tuner.history.items())},
                "draft_policy": self.draft_policy or self.tuner.policy,
            }
        return {
            "mode": self.mode,
            **self.speculation.report(),
            **tuning,
            "migrations": self.migrations,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "ttft_s": self.first_token_s,
            "cloud_prefill_s": self.cloud_prefill_s,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens / self.elapsed_s if self.elapsed_s > 0 else None,
            "decode_tokens_per_s": self.decode_tokens_per_s(),
            "verifier": self.verifier,
            "verified": self.verified and self.mode != Mode.EDGE.value,
        }

    def decode_tokens_per_s(self) -> float | None:
        """The steady-state rate: tokens after the first commit over the time after it."""
        if self.first_token_s is None:
            return None
        span, rest = self.elapsed_s - self.first_token_s, self.tokens - self.first_commit_tokens
        return rest / span if rest > 0 and span > 0 else None
