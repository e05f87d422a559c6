"""`platformctl data index|check|import-llava`: dataset shard tools (the work is in ps3.data and
ps3.vila_hd; `import-llava` is the `import_llava` stage's converter, run here and now)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table


def run_data_command(args: argparse.Namespace) -> int:
    from ps3.data import DataSourceError, build_index, check_source
    from ps3_platform.runtime.storage import StorageError, check_storage

    if args.data_command == "import-llava":
        return _import_llava(args)

    try:
        check_storage(args.uri)  # a dead or frozen store: one line in seconds, not minutes of silence
        report = build_index(args.uri) if args.data_command == "index" else check_source(args.uri)
    except (DataSourceError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(args.data_command, args.uri, report)
    if args.data_command == "check":  # one exit code for both forms: scripts read it
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
    for name in report.get("missing_shards", []):
        table.add_row(name, "-", "-", "-", "-", "missing")
    console.print(table)
    totals = {k: report.get(k) for k in ("samples", "ok", "boxes", "global_captions") if k in report}
    console.print("total: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    if report.get("missing_shards"):
        console.print("missing shards (index.json lists them, storage lacks them): "
                      + ", ".join(report["missing_shards"]), soft_wrap=True)
    if report.get("bad"):
        console.print("bad records: " + ", ".join(f"{k}={v}" for k, v in sorted(report["bad"].items())))


def _import_llava(args: argparse.Namespace) -> int:
    """LLaVA JSON + images -> conversation shards; bad items are counted (and logged), not fatal."""
    import logging

    from ps3.data import DataSourceError
    from ps3.vila_hd.conversations import import_llava

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        summary = import_llava(args.json_uri, args.image_root, args.output_uri,
                               samples_per_shard=args.samples_per_shard, source=args.source)
    except (DataSourceError, FileNotFoundError, ValueError) as exc:
        print(f"error: {args.json_uri}: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(f"wrote {summary['written']} conversations to {args.output_uri} (with index.json); skipped: {skipped}")
    return 0
