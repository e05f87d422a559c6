"""`check_source(uri)`: a validator for one source (`platformctl data check URI`).

It reads every shard whole (not through the offset tables, which could hide damage),
decodes every image at the smallest DCT scale (a truncated JPEG still fails), and counts
samples, boxes and bad records by reason per shard. It never raises on bad data: the
report says what is wrong and where.
"""

from __future__ import annotations

import io
import json
from collections import Counter

from .decode import decode_sample
from .fs import filesystem
from .index import INDEX_NAME, DataSourceError
from .records import BadSample
from .shards import require_members, scan_tar

MAX_KEYS_PER_REASON = 5  # a report names a few bad keys per reason, not millions


def check_source(uri: str) -> dict:
    """Report on every shard under `uri`.

    Returns {"uri", "index": "ok"|"missing"|"stale", "samples", "ok", "boxes",
    "global_captions", "bad": {reason: n}, "missing_shards": [...], "shards": [per-shard
    {"name", "samples", "ok", "boxes", "global_captions", "bad", "bad_keys", "error"}]}.
    """
    fs, path = filesystem(uri)
    try:
        listing = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        raise DataSourceError(f"{uri}: no such source directory") from None
    present = sorted(p.rsplit("/", 1)[-1] for p in listing if p.endswith(".tar"))
    listed, index_state = _listed_shards(fs, path)
    shards = [check_shard(fs, f"{path}/{name}") | {"name": name} for name in present]
    missing = sorted(set(listed) - set(present))
    if index_state == "ok" and (missing or set(present) - set(listed)
                                or any(listed[s["name"]] != s["samples"] for s in shards)):
        index_state = "stale"
    bad = Counter()
    for shard in shards:
        bad.update(shard["bad"])
    return {"uri": uri, "index": index_state, "samples": sum(s["samples"] for s in shards),
            "ok": sum(s["ok"] for s in shards), "boxes": sum(s["boxes"] for s in shards),
            "global_captions": sum(s["global_captions"] for s in shards), "bad": dict(bad),
            "missing_shards": missing, "shards": shards}


def _listed_shards(fs, path: str) -> tuple[dict[str, int], str]:
    try:
        index = json.loads(fs.cat_file(f"{path}/{INDEX_NAME}"))
        return {s["name"]: int(s["samples"]) for s in index["shards"]}, "ok"
    except FileNotFoundError:
        return {}, "missing"
    except (ValueError, KeyError, TypeError):
        return {}, "stale"


def check_shard(fs, shard_path: str) -> dict:
    """Counts for one shard: samples, ok, boxes, global captions, bad by reason."""
    result = {"samples": 0, "ok": 0, "boxes": 0, "global_captions": 0, "bad": {}, "bad_keys": {}, "error": None}
    try:
        data = fs.cat_file(shard_path)
    except OSError as exc:
        result["error"] = f"unreadable: {exc}"
        return result
    scan = scan_tar(io.BytesIO(data), len(data))
    result["error"] = scan.problems()
    bad, keys = Counter(), {}
    for entry in scan.samples:
        result["samples"] += 1
        try:
            require_members(entry)
            image = data[entry.image[0]: entry.image[0] + entry.image[1]]
            js = data[entry.json[0]: entry.json[0] + entry.json[1]]
            record, _ = decode_sample(entry.key, image, js, need=1)
        except BadSample as exc:
            bad[exc.reason] += 1
            keys.setdefault(exc.reason, [])
            if len(keys[exc.reason]) < MAX_KEYS_PER_REASON:
                keys[exc.reason].append(entry.key)
            continue
        result["ok"] += 1
        result["boxes"] += len(record.boxes)
        result["global_captions"] += record.global_caption is not None
    if scan.error:
        bad["read_error"] += 1  # a lost tail counts once: its samples cannot be counted
    result["bad"], result["bad_keys"] = dict(bad), keys
    return result
