"""Every NATS subject, queue group and header PicoSpec uses: the one place that names them.

Subjects are versioned (``picospec.v1.…``). Hot-path payloads use the binary codec
(``protocol.codec``); control messages (open/close) are small JSON documents
(``protocol.control``). Metadata travels in NATS headers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

PREFIX = "picospec.v1"

# request/reply to the queue group of verifiers: open a session, reply names the replica
SESSIONS_OPEN = f"{PREFIX}.sessions.open"
VERIFIERS_QUEUE = "verifiers"

# request/reply to the queue group of samplers (edge-local behind a leaf node)
SAMPLE = f"{PREFIX}.sample"
SAMPLERS_QUEUE = "samplers"

# the default prefix of request/reply inboxes (nats-py's); PicoSpec clients add their site
INBOX = "_INBOX"

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


def site_token(site: str) -> str:
    """An edge site's label as one subject token, stable for permissions to name.

    A label that already is a token (``[A-Za-z0-9_-]{1,64}``) is used as is. Anything else (a
    Kubernetes node name such as ``edge-7.example.com``) keeps its first 55 characters with the
    others replaced by ``_``, plus ``-`` and 8 hex digits of the label's SHA-256, so two labels
    never share a token by accident.
    """
    if _TOKEN.match(site):
        return site
    digest = hashlib.sha256(site.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', site)[:55]}-{digest}"


def verdicts(site: str, drafter_id: str) -> str:
    """Verdicts (and cloud-only token streams) for the sessions of one drafter of one site.

    The site is part of the subject so that NATS permissions can confine a site to its own
    verdicts: ``site_verdicts(site)``.
    """
    return f"{PREFIX}.verdict.{site_token(site)}.{_checked(drafter_id)}"


def site_verdicts(site: str) -> str:
    """Every verdict subject of one site (a wildcard for permissions and subscriptions)."""
    return f"{PREFIX}.verdict.{site_token(site)}.>"


def inbox_prefix(site: str) -> str:
    """The request/reply inbox prefix of a site's clients: ``_INBOX.<site>``.

    Replies to a drafter's requests (session opens, samples, pings) arrive below it, so a site
    may subscribe to its own replies only (``_INBOX.<site>.>``), never to another site's.
    """
    return f"{INBOX}.{site_token(site)}"


def all_subjects_of(role: str, ident: str, site: str = "local") -> list[str]:
    """Subjects a service of ``role`` listens on (for tests and permissions)."""
    return {
        "verifier": [SESSIONS_OPEN, verify(ident), close(ident), ping(ident)],
        "sampler": [SAMPLE],
        "drafter": [verdicts(site, ident)],
    }[role]


ANY_SITE = "*"  # permissions() for a credential that every edge site shares (the Helm chart)


def permissions(role: str, site: str = "local", ident: str = "*") -> dict[str, Any]:
    """The least NATS permissions of one PicoSpec client, in nats-server's configuration shape
    (``{"publish": {"allow": [...]}, "subscribe": {"allow": [...]}, "allow_responses": ...}``).

    ``site`` :data:`ANY_SITE` grants what every site may (no isolation between sites).

    - ``drafter`` (of ``site``): publishes session opens, blocks, closes, pings and sample
      requests; subscribes to its site's verdicts and its site's reply inboxes.
    - ``sampler``: subscribes to sample requests; publishes only replies to them.
    - ``verifier`` (replica ``ident``, or ``*`` for any): subscribes to session opens and its
      own replica subjects; publishes verdicts (to any site) and replies.
    - ``leaf`` (the hub's user for ``site``'s leaf node; NATS reads a leaf connection's
      ``publish`` as what the site may send to the cloud, ``subscribe`` as what it may receive):
      exports the drafter's cloud-bound subjects, imports the site's verdicts and replies. The
      sample subject is not in it, so sampling never leaves the site.
    """
    to_cloud = [
        SESSIONS_OPEN,
        f"{PREFIX}.verify.*",
        f"{PREFIX}.sessions.close.*",
        f"{PREFIX}.ping.*",
    ]
    if site == ANY_SITE:
        from_cloud = [f"{PREFIX}.verdict.*.>", f"{INBOX}.*.>"]
    else:
        from_cloud = [site_verdicts(site), f"{inbox_prefix(site)}.>"]
    if role == "drafter":
        return {"publish": {"allow": [*to_cloud, SAMPLE]}, "subscribe": {"allow": from_cloud}}
    if role == "sampler":
        return {
            "publish": {"deny": [">"]},
            "subscribe": {"allow": [SAMPLE]},
            "allow_responses": True,
        }
    if role == "verifier":
        rid = ident if ident == "*" else _checked(ident)
        own = [f"{PREFIX}.verify.{rid}", f"{PREFIX}.sessions.close.{rid}", f"{PREFIX}.ping.{rid}"]
        return {
            "publish": {"allow": [f"{PREFIX}.verdict.>"]},
            "subscribe": {"allow": [SESSIONS_OPEN, *own]},
            "allow_responses": True,
        }
    if role == "leaf":
        return {"publish": {"allow": to_cloud}, "subscribe": {"allow": from_cloud}}
    raise ValueError(f"no permissions for role {role!r}: drafter, sampler, verifier or leaf")
