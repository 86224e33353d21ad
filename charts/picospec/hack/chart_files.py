"""Keep what the chart derives from the rest of the repository in sync (`make chart-files`).

A chart can only read files inside itself, so:

* ``observability/dashboards/*.json`` and ``observability/prometheus/*.rules.yml`` are copied
  into ``charts/picospec/files/`` (Grafana dashboard ConfigMaps, PrometheusRules);
* the ``settings`` blocks of ``values.schema.json`` are generated from
  ``picospec.config.Settings``, so a misspelt or mistyped setting fails at install;
* ``files/nats-permissions.json``, the least NATS permissions of each NATS user the chart
  creates (verifier, drafter, sampler, leaf), is generated from
  :func:`picospec.protocol.subjects.permissions`, the one definition ``picospec up --secure``
  uses too.

``python charts/picospec/hack/chart_files.py`` writes; ``--check`` only reports what is out of
date (exit 1), which is what the tests run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
FILES = CHART / "files"
SCHEMA = CHART / "values.schema.json"
# (source directory, glob): copied flat into files/
SOURCES = (
    (REPO / "observability" / "dashboards", "*.json"),
    (REPO / "observability" / "prometheus", "*.rules.yml"),
)
# Settings that never go into values: the NATS connection, credentials, TLS files and inbox
# prefix, and the listen address, which the chart sets itself; and the API key, a secret, which
# comes from a Secret of yours (``drafter.extraEnv``: PICOSPEC_API_KEY from a secretKeyRef).
MANAGED = (
    "nats_url",
    "nats_user",
    "nats_password",
    "nats_creds",
    "nats_nkey_seed",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
    "nats_tls_hostname",
    "nats_inbox_prefix",
    "nats_user_file",
    "nats_password_file",
    "host",
    "api_key",
    # the verifier's engine: verifier.backend and verifier.vllm (the template sets them)
    "verifier_backend",
    "vllm_tensor_parallel_size",
    "vllm_pipeline_parallel_size",
    "vllm_dtype",
    "vllm_quantization",
    "vllm_max_model_len",
    "vllm_gpu_memory_utilization",
    "vllm_enable_prefix_caching",
    "vllm_max_logprobs",
    "vllm_block_size",
    "vllm_enforce_eager",
    "vllm_cpu_kv_cache_gib",
)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve pydantic's ``$ref``s into the definitions, dropping titles."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            target.pop("title", None)
            return _inline({**target, **rest}, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def settings_schema() -> dict[str, Any]:
    """JSON schema of the ``settings`` blocks: Settings' fields minus the managed ones."""
    from picospec.config import Settings

    full = Settings.model_json_schema()
    defs = full.get("$defs", {})
    props = {
        name: _inline(prop, defs)
        for name, prop in full["properties"].items()
        if name not in MANAGED
    }
    return {
        "$comment": "generated from picospec.config.Settings by `make chart-files`",
        "description": (
            "PicoSpec settings (PICOSPEC_<NAME> environment variables), by their Settings "
            "names. Not here: " + ", ".join(MANAGED) + " (the chart sets the NATS connection "
            "and host itself; api_key is a secret: give PICOSPEC_API_KEY through extraEnv from "
            "a Secret)."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": props,
    }


PERMISSIONS = "nats-permissions.json"
NATS_ROLES = ("verifier", "drafter", "sampler", "leaf")


SITE_PLACEHOLDER = "__SITE__"
SITE_ROLES = ("drafter", "leaf")


def nats_permissions() -> bytes:
    """Each chart NATS user's permissions.

    ``<role>``: without ``sites``, one credential per role serves every edge site, so the site
    part is a wildcard: a site cannot reach another's draft blocks or the cloud's verdict
    publishing, but can subscribe to any site's verdicts (session ids stay secret).
    ``site:<role>``: with ``sites``, the drafter and leaf users of one site, confined to its
    verdict and inbox subjects; the chart puts the site's name in place of ``__SITE__``.
    """
    from picospec.protocol.subjects import ANY_SITE, permissions

    doc: dict[str, Any] = {role: permissions(role, site=ANY_SITE) for role in NATS_ROLES}
    for role in SITE_ROLES:
        doc[f"site:{role}"] = permissions(role, site=SITE_PLACEHOLDER)
    return (json.dumps(doc, indent=2) + "\n").encode()


def expected_files() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for directory, pattern in SOURCES:
        for path in sorted(directory.glob(pattern)):
            out[path.name] = path.read_bytes()
    out[PERMISSIONS] = nats_permissions()
    return out


def current_files() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for pattern in [p for _, p in SOURCES] + [PERMISSIONS]:
        for path in sorted(FILES.glob(pattern)):
            out[path.name] = path.read_bytes()
    return out


def expected_schema() -> str:
    schema = json.loads(SCHEMA.read_text())
    schema["$defs"]["settings"] = settings_schema()
    return json.dumps(schema, indent=2) + "\n"


def problems() -> list[str]:
    """What `make chart-files` would change; empty when everything is in sync."""
    found = []
    want, have = expected_files(), current_files()
    for name in sorted(set(want) | set(have)):
        if name not in have:
            found.append(f"files/{name} is missing")
        elif name not in want:
            found.append(f"files/{name} has no source any more")
        elif want[name] != have[name]:
            found.append(f"files/{name} differs from its source")
    if SCHEMA.read_text() != expected_schema():
        found.append("values.schema.json settings differ from picospec.config.Settings")
    return found


def sync() -> list[str]:
    FILES.mkdir(exist_ok=True)
    want = expected_files()
    for name in current_files():
        if name not in want:
            (FILES / name).unlink()
    for name, data in want.items():
        (FILES / name).write_bytes(data)
    SCHEMA.write_text(expected_schema())
    return sorted(want)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="report differences, change nothing")
    args = p.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(f"out of date: {line}", file=sys.stderr)
        if found:
            print("run `make chart-files`", file=sys.stderr)
        return 1 if found else 0
    copied = sync()
    print(f"files/: {len(copied)} file(s) written; values.schema.json settings updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
