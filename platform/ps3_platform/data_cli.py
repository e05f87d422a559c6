"""`platformctl data index|check URI`: dataset shard tools (the work is in ps3.data)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table


def run_data_command(args: argparse.Namespace) -> int:
    from ps3.data import DataSourceError, build_index, check_source

    try:
        report = build_index(args.uri) if args.data_command == "index" else check_source(args.uri)
    except DataSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    _print_report(args.data_command, args.uri, report)
    if args.data_command == "check":
        return 0 if not report.get("bad") and not report.get("missing_shards") else 1
    return 0


def _print_report(action: str, uri: str, report: dict) -> None:
    console = Console()
    table = Table("SHARD", "SAMPLES", "BOXES", "GLOBAL CAPTIONS", "BAD", "ERROR", title=f"{action}: {uri}")
    for shard in report["shards"]:
        bad = shard.get("bad", {})
        bad_text = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) if isinstance(bad, dict) else str(bad)
        table.add_row(shard["name"], str(shard.get("samples", "-")), str(shard.get("boxes", "-")),
                      str(shard.get("global_captions", "-")), bad_text or "0", shard.get("error") or "")
    console.print(table)
    totals = {k: report.get(k) for k in ("samples", "ok", "boxes", "global_captions") if k in report}
    console.print("total: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    if report.get("bad"):
        console.print("bad records: " + ", ".join(f"{k}={v}" for k, v in sorted(report["bad"].items())))
