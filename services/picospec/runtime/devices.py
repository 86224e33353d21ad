"""Device emulation: give each side the speed of the hardware it stands for.

The tokens, the acceptance and the network stay real; only the *time* a model forward takes is
set by a :class:`DeviceProfile`. After every real forward the model thread waits until the
forward has lasted as long as it would on the profile's hardware (:meth:`Pacer.pad`).
:func:`pace` installs a pacer on a loaded model by wrapping its forward primitives; the model
itself (:mod:`picospec.runtime.model`) knows nothing of emulation. Real
compute is never shortened: where it ran longer than the profile allows, the forward keeps its
real duration and the pacer counts an *overrun* (``picospec_device_overruns_total``), so a
report can say exactly where the emulation could not keep up.

A profile holds two cost lines, one per role::

    t(n) = step_s + per_token_s * (n - 1)      # a forward of n new tokens

- ``draft`` (the edge): ``step_s`` is one decode step of the draft model; ``per_token_s`` the
  extra cost of each further token in one forward (the prompt's prefill).
- ``verify`` (the cloud): ``step_s`` is one decode step of the target (cloud-only ``ar``
  decodes at ``1 / step_s``); ``per_token_s`` the extra cost of each further token, so a
  block of ``γ`` draft tokens plus a prefix token costs ``step_s + γ * per_token_s``. A
  batched forward of several sessions costs the same line over all their tokens (decode on a
  GPU is bound by reading the weights once).

Built-in profiles live in ``picospec/runtime/device_profiles/*.yaml``, each citing its sources; a
user-defined profile is a YAML or JSON file with the same fields, named by its path.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).with_name("device_profiles")
ROLES = ("draft", "verify")


class DeviceProfileError(ValueError):
    """A device profile could not be found or read; the message says which and why."""


class Cost(BaseModel):
    """The time of one forward of ``n`` new tokens: ``step_s + per_token_s * (n - 1)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(description="the hardware and model this line stands for")
    step_s: float = Field(gt=0, le=60, description="one forward of a single token (decode step)")
    per_token_s: float = Field(
        0.0, ge=0, le=10, description="each further token of the same forward"
    )
    dtype: str | None = Field(
        None,
        pattern="^(float32|bfloat16|float16)$",
        description="the precision the device runs its model in; the real compute uses it too "
        "(unless a dtype is set explicitly), so it can keep up with the profile",
    )
    prefill_dtype: str | None = Field(
        None,
        pattern="^(float32|bfloat16|float16)$",
        description="the precision the real compute uses for forwards of many tokens (a "
        "prefill), when the host's matrix units make another precision than dtype fast there",
    )

    def seconds(self, n_tokens: int) -> float:
        return self.step_s + self.per_token_s * max(0, n_tokens - 1)


class DeviceProfile(BaseModel):
    """Emulated hardware for both sides of the edge-cloud link."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    draft: Cost
    verify: Cost
    sources: list[str] = Field(default_factory=list)

    def cost(self, role: str) -> Cost:
        if role not in ROLES:
            raise DeviceProfileError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        return self.draft if role == "draft" else self.verify

    @property
    def ar_tokens_per_s(self) -> float:
        """Cloud-only decoding speed on this hardware."""
        return 1.0 / self.verify.step_s

    def summary(self) -> dict[str, object]:
        """What a report records about the profile."""
        return {
            "name": self.name,
            "draft": self.draft.model_dump(),
            "verify": self.verify.model_dump(),
            "ar_tokens_per_s": self.ar_tokens_per_s,
            "sources": self.sources,
        }


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> DeviceProfile:
    """A built-in profile by name, or a user's profile from a ``.yaml``/``.yml``/``.json`` path."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        path = Path(name).expanduser()
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            raise DeviceProfileError(
                f"no device profile {name!r}: use one of {', '.join(builtin_profiles())} "
                "or the path of a .yaml/.json profile file"
            )
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise DeviceProfileError(f"device profile {path}: cannot read it: {e}") from None
    if not isinstance(data, dict):
        raise DeviceProfileError(f"device profile {path}: expected a mapping at the top")
    data.setdefault("name", path.stem)
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise DeviceProfileError(f"device profile {path}: {e}") from None


@dataclass
class PaceStats:
    """What a pacer did, per kind of forward (``step``: one token; ``forward``: several)."""

    forwards: int = 0
    real_s: float = 0.0
    emulated_s: float = 0.0
    overruns: int = 0
    overrun_s: float = 0.0
    max_overrun_s: float = 0.0


@dataclass
class Pacer:
    """Pads each forward of one model to its profile's time (see the module docstring).

    ``pad`` runs on the thread that ran the forward, right after it, so the model thread is
    busy for exactly as long as the emulated device would be.
    """

    cost: Cost
    role: str = "draft"
    on_pace: object = None  # callable(kind, real_s, target_s) for metrics, set by services
    stats: dict[str, PaceStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pad(self, n_tokens: int, real_s: float) -> float:
        """Wait out the rest of an ``n_tokens`` forward that took ``real_s``; return the time
        it now took (never less than ``real_s``)."""
        target = self.cost.seconds(n_tokens)
        kind = "step" if n_tokens == 1 else "forward"
        if real_s < target:
            time.sleep(target - real_s)
        emulated = max(real_s, target)
        with self._lock:
            s = self.stats.setdefault(kind, PaceStats())
            s.forwards += 1
            s.real_s += real_s
            s.emulated_s += emulated
            if real_s > target:
                s.overruns += 1
                s.overrun_s += real_s - target
                if real_s - target > s.max_overrun_s:
                    s.max_overrun_s = real_s - target
                if s.overruns == 1 and self.on_pace is not None:  # not during warm-up
                    log.warning(
                        "real compute ran slower than the device profile: a %d-token %s "
                        "forward took %.1f ms, the profile allows %.1f ms (%s)",
                        n_tokens,
                        self.role,
                        real_s * 1e3,
                        target * 1e3,
                        self.cost.device,
                    )
        if callable(self.on_pace):
            self.on_pace(kind, real_s, target)
        return emulated


class Stopwatch:
    """Times a forward and hands it to a pacer (or does nothing without one); what
    :func:`pace` wraps a model's forwards in::

    with Stopwatch(pacer, n_tokens):
        ...compute, synchronised (``.cpu()``)...
    """

    __slots__ = ("pacer", "n", "t0")

    def __init__(self, pacer: Pacer | None, n_tokens: int) -> None:
        self.pacer = pacer
        self.n = n_tokens

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.pacer is not None and exc_type is None:
            self.pacer.pad(self.n, time.perf_counter() - self.t0)


def _one_session(tokens: list[int]) -> int:
    return len(tokens)


def _sessions(tokens: list[list[int]]) -> int:
    return sum(len(t) for t in tokens)


PACED_FORWARDS: dict[str, Callable[[Any], int]] = {
    "forward": _one_session,  # one session, copy layout (a DynamicCache)
    "_forward_varlen": _sessions,  # one or more sessions over slots (the prefill twin's too)
    "_forward_padded": _sessions,  # several sessions, copy layout, in one padded forward
}
"""The :class:`~picospec.runtime.model.LanguageModel` methods that each run one real forward
(every forward of a session's cache, :meth:`~picospec.runtime.model.KVCache.extend` or
``forward_batch``, runs in exactly one of them), and the new tokens of a call as its ``tokens``
argument gives them.
Each returns its logits synchronised (on the CPU, or on a synchronised device), so the time
measured around it is the compute's."""


class _PacedForward:
    """One forward primitive of a model, timed and padded by the model's current ``pacer``."""

    def __init__(self, model: Any, name: str, count: Callable[[Any], int]) -> None:
        method = getattr(model, name)
        functools.update_wrapper(self, method)  # its name and docstring, for a reader
        self.model, self.method, self.count = model, method, count
        self.where = list(inspect.signature(method).parameters).index("tokens")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tokens = kwargs["tokens"] if "tokens" in kwargs else args[self.where]
        with Stopwatch(self.model.pacer, self.count(tokens)):
            return self.method(*args, **kwargs)


def pace(model: Any, pacer: Pacer | None) -> None:
    """Pace ``model`` (a :class:`~picospec.runtime.model.LanguageModel`) with ``pacer``: every
    real forward (:data:`PACED_FORWARDS`) is then timed and padded to the pacer's profile.

    ``model.pacer`` is the handle (services set its ``on_pace``); the wrappers read it at each
    forward, so pacing again swaps the pacer and ``pace(model, None)`` stops it. The wrappers
    are installed once per model, so no forward is ever paced twice."""
    model.pacer = pacer
    if pacer is None:
        return
    for name, count in PACED_FORWARDS.items():
        if not isinstance(vars(model).get(name), _PacedForward):
            setattr(model, name, _PacedForward(model, name, count))
