"""`make scan`: the rendered chart through checkov, a Kubernetes security scanner.

Renders the chart (Helm's engine) in the value combinations below into build/scan/, runs
``checkov --framework kubernetes`` on them and prints every failed check with the objects it
failed on. Each failed check must be listed, with why it stays, in the chart README's
"Security scan" table (its check id in backquotes); an unlisted finding fails the run.

    python charts/picospec/hack/scan.py [--checkov PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
OUT = REPO / "build" / "scan"
README = CHART / "README.md"

COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sites-tls-cert-manager": {
        "sites": [{"name": "store-a"}, {"name": "store-b"}],
        "tls": {
            "enabled": True,
            "mutualLeafnodes": True,
            "certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}},
        },
        "cloudNats": {"leafnodesService": {"type": "LoadBalancer"}},
        "leafNode": {"hubUrls": ["nats-leaf://nats-hub.example.com:7422"]},
    },
    "sites-tls-secrets-hostport": {
        "sites": [{"name": "a"}, {"name": "b"}],
        "tls": {"enabled": True, "hub": {"secretName": "hub-tls"}},
        "edge": {"network": "hostPort"},
    },
}


def render() -> list[Path]:
    import helm_python as helm

    OUT.mkdir(parents=True, exist_ok=True)
    paths = []
    with helm.Chart.load(str(CHART)) as c:
        for name, values in COMBOS.items():
            out = c.render(values, name="picospec", namespace="picospec")
            docs = [t for p, t in sorted(out.items()) if p.endswith(".yaml") and t.strip()]
            path = OUT / f"{name}.yaml"
            path.write_text("\n---\n".join(docs))
            paths.append(path)
    return paths


def scan(checkov: str, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Failed checks by id: {name, objects}."""
    failed: dict[str, dict[str, Any]] = {}
    for path in paths:
        proc = subprocess.run(
            [checkov, "--quiet", "--compact", "--framework", "kubernetes", "-o", "json",
             "-f", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        report = json.loads(proc.stdout or "{}")
        reports = report if isinstance(report, list) else [report]
        for rep in reports:
            for f in rep.get("results", {}).get("failed_checks", []):
                entry = failed.setdefault(f["check_id"], {"name": f["check_name"], "objects": set()})
                resource = re.sub(r"\.helm\.sh/.*", "", f["resource"])
                entry["objects"].add(f"{path.stem}: {resource}")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkov", default=shutil.which("checkov") or "checkov")
    args = p.parse_args(argv)
    failed = scan(args.checkov, render())
    listed = set(re.findall(r"`(CKV2?_K8S_\d+)`", README.read_text()))
    for check_id in sorted(failed, key=lambda c: int(c.rsplit("_", 1)[1])):
        f = failed[check_id]
        mark = "listed" if check_id in listed else "NOT LISTED in the chart README"
        print(f"{check_id}  {f['name']}  ({mark})")
        for obj in sorted(f["objects"]):
            print(f"    {obj}")
    unlisted = sorted(set(failed) - listed)
    print(f"\n{len(failed)} failed check(s) over {len(COMBOS)} value combinations; "
          f"{len(unlisted)} not in the README's table")  # fmt: skip
    return 1 if unlisted else 0


if __name__ == "__main__":
    raise SystemExit(main())
