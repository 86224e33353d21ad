"""Every NATS subject, queue group and header PicoSpec uses: the one place that names them.

Subjects are versioned (``picospec.v1.…``). Hot-path payloads use the binary codec
(``protocol.codec``); control messages (open/close) are small JSON documents
(``protocol.control``). Metadata travels in NATS headers.
"""

from __future__ import annotations

import re

PREFIX = "picospec.v1"

# request/reply to the queue group of verifiers: open a session, reply names the replica
SESSIONS_OPEN = f"{PREFIX}.sessions.open"
VERIFIERS_QUEUE = "verifiers"

# request/reply to the queue group of samplers (edge-local behind a leaf node)
SAMPLE = f"{PREFIX}.sample"
SAMPLERS_QUEUE = "samplers"

# headers
H_VERSION = "Picospec-Version"
H_CONTENT_TYPE = "Content-Type"
H_REQUEST_ID = "Picospec-Request-Id"
H_ERROR = "Picospec-Error"
CT_BINARY = "application/x-picospec"
CT_JSON = "application/json"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _checked(token: str) -> str:
    if not _TOKEN.match(token):
        raise ValueError(f"invalid subject token {token!r}: use 1-64 of [A-Za-z0-9_-]")
    return token


def verify(verifier_id: str) -> str:
    """Draft blocks for sessions held by one verifier replica (its own subject)."""
    return f"{PREFIX}.verify.{_checked(verifier_id)}"


def close(verifier_id: str) -> str:
    """Session close notices for one verifier replica."""
    return f"{PREFIX}.sessions.close.{_checked(verifier_id)}"


def ping(verifier_id: str) -> str:
    """Liveness of one verifier replica (request/reply, answered on its event loop)."""
    return f"{PREFIX}.ping.{_checked(verifier_id)}"


def verdicts(drafter_id: str) -> str:
    """Verdicts (and cloud-only token streams) for the sessions of one drafter."""
    return f"{PREFIX}.verdict.{_checked(drafter_id)}"


def all_subjects_of(role: str, ident: str) -> list[str]:
    """Subjects a service of ``role`` listens on (for tests and permissions)."""
    return {
        "verifier": [SESSIONS_OPEN, verify(ident), close(ident), ping(ident)],
        "sampler": [SAMPLE],
        "drafter": [verdicts(ident)],
    }[role]
