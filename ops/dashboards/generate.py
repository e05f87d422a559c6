"""Write the Grafana dashboards of ops/dashboards/panels.py as JSON next to this file.

    python ops/dashboards/generate.py          # regenerate the committed JSON
    python ops/dashboards/generate.py --check  # exit 1 when the JSON is stale

The committed JSON is what the Helm chart ships (copied by ops/sync_chart.py), so
reviewers see the exact dashboards; tests/ops fails when it differs from this output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from panels import DASHBOARDS


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard (stable: fixed key order, trailing newline)."""
    return {name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()}


def stale(directory: Path = HERE) -> list[str]:
    """Names of dashboards whose committed JSON differs from the generator (or is missing)."""
    out = []
    for name, text in render().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON is stale")
    args = parser.parse_args(argv)
    if args.check:
        if names := stale():
            print(f"stale dashboards: {', '.join(names)}; run python ops/dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
