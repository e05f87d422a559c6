"""Checkpointer: commit protocol, bit-exact round trips, resharding, crashes, retention, S3 outages.

Multi-rank cases run `ckpt_worker.py` as real processes (gloo on CPU); single-process
cases run in the test process. S3 cases use SeaweedFS; the outage test starts its own
server so it can take it away for 30 s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ps3_platform.ports import free_port
from ps3_platform.runtime import storage
from ps3_platform.runtime.checkpoint import (
    MANIFEST,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointUploadError,
    default_staging_root,
    retention_plan,
    step_dir_name,
)
from ps3_platform.runtime.metrics import Metrics
from ps3_platform.runtime.state import ModelAndOptimizer
from ps3_platform.runtime.storage import (
    RetryPolicy,
    StorageError,
    open_location,
    retry,
    storage_options,
)
from ps3_platform.testing import SeaweedS3
from torch import nn

WORKER = Path(__file__).with_name("ckpt_worker.py")


def run_worker(scenario: str, uri: str, out: Path, world: int, timeout: float = 150) -> None:
    """Run `ckpt_worker.py` as `world` ranks of one gloo group and wait for all of them."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, uri, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output[-4000:]}"


def tiny_state(seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return model, {"app": ModelAndOptimizer(model, None), "extra": {"seed": seed}}


def checkpointer(uri: str, **overrides) -> Checkpointer:
    options = {"uri": uri, "job": "job", "stage": "stage", "keep": 3, "keep_every": None,
               "async_save": False, "rank": 0, "world_size": 1}
    options.update(overrides)
    return Checkpointer(**options)


def step_files(root: Path, stage: str, step: int) -> Path:
    return root / "job" / stage / step_dir_name(step)


# ---- 2 ranks: round trip on file:// and s3://, then load onto 1 rank ----------------------
@pytest.fixture(scope="module")
def s3_roundtrip(s3_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt-s3")
    uri = s3_server.make_bucket("ckpt-roundtrip")
    run_worker("roundtrip", uri, out, world=2)
    run_worker("load1", uri, out, world=1)
    return out


@pytest.fixture(scope="module")
def file_roundtrip(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt-file")
    uri = f"file://{out}/store"
    run_worker("roundtrip", uri, out, world=2)
    run_worker("load1", uri, out, world=1)
    return out


@pytest.mark.parametrize("backend", ["file", "s3"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_rank_round_trip_is_bit_exact(backend, mode, request):
    out = request.getfixturevalue(f"{backend}_roundtrip")
    for rank in (0, 1):
        result = json.loads((out / f"result-rank{rank}.json").read_text())[mode]
        assert result["step"] == 3 and result["latest"] == 3
        # model, AdamW moments and step, LR scheduler, data position, counters, per-rank RNG
        assert result["diff"] == [], result["diff"]


@pytest.mark.parametrize("backend", ["file", "s3"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_load_onto_one_rank_reshards_and_drops_rank_state(backend, mode, request):
    out = request.getfixturevalue(f"{backend}_roundtrip")
    result = json.loads((out / "load1.json").read_text())[mode]
    assert result["step"] == 3
    assert result["rank_state"] is None  # per-rank RNG does not map onto another world size
    assert result["diff"] == [], result["diff"]


def test_file_layout_has_every_rank_shards_and_a_manifest_listing_them(file_roundtrip):
    step_dir = file_roundtrip / "store" / "ckpt-test" / "sync" / step_dir_name(3)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 3
    ranks = {entry["rank"] for entry in manifest["files"].values()}
    assert ranks == {0, 1}
    assert {"rank-00000.pt", "rank-00001.pt", ".metadata"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert (step_dir / name).stat().st_size == entry["size"]
        assert len(entry["sha256"]) == 64


# ---- commit rules ------------------------------------------------------------------------
def test_manifest_with_missing_or_resized_file_is_not_committed(tmp_path):
    uri = f"file://{tmp_path}"
    ck = checkpointer(uri)
    _, state = tiny_state()
    for step in (1, 2):
        ck.save(step, state)
    assert ck.latest_committed() == 2
    step2 = step_files(tmp_path, "stage", 2)
    shard = next(step2.glob("*.distcp"))
    data = shard.read_bytes()

    shard.unlink()
    assert ck.latest_committed() == 1
    with pytest.raises(CheckpointNotFoundError, match="step 2"):
        ck.load(state, step=2)

    shard.write_bytes(data + b"x")  # wrong size
    assert ck.latest_committed() == 1
    shard.write_bytes(data)
    assert ck.latest_committed() == 2

    (step2 / MANIFEST).write_text('{"files": ')  # torn manifest
    assert ck.latest_committed() == 1
    (step2 / MANIFEST).unlink()
    assert ck.latest_committed() == 1
    step, _ = ck.load(tiny_state(seed=5)[1])
    assert step == 1


def test_nothing_committed_is_none_and_load_says_where(tmp_path):
    ck = checkpointer(f"file://{tmp_path}")
    assert ck.latest_committed() is None
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path)):
        ck.load(tiny_state()[1])


def test_rank_state_round_trips_weights_only_and_anything_else_is_refused(tmp_path):
    """The per-rank file (RNG states) loads with weights_only=True; a file holding other objects
    (a pickled numpy array here, as older versions wrote) is a one-line error naming it."""
    import numpy as np

    from ps3_platform.runtime.checkpoint import CheckpointError
    from ps3_platform.runtime.state import rng_state, set_rng_state

    ck = checkpointer(f"file://{tmp_path}")
    np.random.seed(3)
    ck.save(1, tiny_state()[1], {"rng": rng_state()})
    expected = np.random.rand(3)
    _, rank_state = ck.load(tiny_state()[1])
    set_rng_state(rank_state["rng"])
    assert np.array_equal(np.random.rand(3), expected)
    ck.save(2, tiny_state()[1], {"rng": {"numpy": np.random.get_state()}})
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt holds objects a weights-only load refuses"):
        ck.load(tiny_state()[1])


def test_resaving_a_step_uncommits_the_stale_manifest_first(tmp_path, monkeypatch):
    """Saving step N again (after resuming from an older step) never mixes old and new files."""
    ck = checkpointer(f"file://{tmp_path}")
    model, state = tiny_state(seed=0)
    ck.save(5, state)
    assert ck.latest_committed() == 5
    real_put = storage.Location.put_file
    seen: list[bool] = []

    def spy(self, local, path):
        seen.append((step_files(tmp_path, "stage", 5) / MANIFEST).exists())
        real_put(self, local, path)

    monkeypatch.setattr(storage.Location, "put_file", spy)
    with torch.no_grad():
        model.weight.add_(1.0)
    ck.save(5, state)
    assert seen and not any(seen)
    expected = model.weight.clone()
    fresh, fresh_state = tiny_state(seed=9)
    assert ck.load(fresh_state)[0] == 5
    assert torch.equal(fresh.weight, expected)


@pytest.mark.faults
@pytest.mark.parametrize("store", ["file", "s3"])
def test_damaged_newest_step_is_set_aside_and_the_previous_one_loaded(store, tmp_path, request, caplog):
    """A shard that fails its sha256 (same size: listings cannot see it) is caught on either
    store; the step is moved under set-aside/ (kept, not deleted) and the previous one loads."""
    if store == "s3":
        server = request.getfixturevalue("s3_server")
        uri = server.make_bucket("ckpt-sha")
        fs, root = server.filesystem(skip_instance_cache=True), "ckpt-sha/job/stage"
    else:
        uri, root = f"file://{tmp_path}", f"{tmp_path}/job/stage"
        fs = open_location(uri).fs
    ck = checkpointer(uri)
    model, state = tiny_state()
    ck.save(1, state)
    at_1 = model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ck.save(2, state)
    shards = fs.glob(f"{root}/step-000000002/*.distcp", detail=True)
    shard = max(shards, key=lambda path: shards[path]["size"])
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    assert ck.latest_committed() == 2
    with pytest.raises(CheckpointCorruptError, match="does not match the sha256"):
        ck.load(tiny_state(seed=2)[1], step=2)  # a step asked for by number is not replaced silently
    fresh, fresh_state = tiny_state(seed=2)
    with caplog.at_level(logging.WARNING):
        assert ck.load(fresh_state)[0] == 1
    assert torch.equal(fresh.weight, at_1)
    assert "checkpoint step 2 is damaged" in caplog.text and "set aside as" in caplog.text
    fs.invalidate_cache()
    kept = fs.glob(f"{root}/set-aside/step-000000002.damaged-*/*.distcp")
    assert len(kept) == len(shards)  # every file kept
    assert ck.latest_committed() == 1


def test_load_from_another_stage_by_url(tmp_path):
    """`checkpoint.initFrom`: a stage or step directory of another stage."""
    first = checkpointer(f"file://{tmp_path}", stage="pretrain")
    model, state = tiny_state(seed=0)
    first.save(10, state)
    at_10 = model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    first.save(20, state)
    second = checkpointer(f"file://{tmp_path}", stage="finetune")
    fresh, fresh_state = tiny_state(seed=6)
    assert second.load(fresh_state, source=f"file://{tmp_path}/job/pretrain")[0] == 20
    assert torch.equal(fresh.weight, model.weight)
    assert second.load(fresh_state, source=f"file://{tmp_path}/job/pretrain/{step_dir_name(10)}")[0] == 10
    assert torch.equal(fresh.weight, at_10)
    assert second.latest_committed() is None  # nothing was written to the new stage
    with pytest.raises(CheckpointNotFoundError, match="step 30"):
        second.load(fresh_state, source=f"file://{tmp_path}/job/pretrain/{step_dir_name(30)}")


# ---- async ---------------------------------------------------------------------------------
def test_async_save_returns_before_commit_and_isolates_the_copy(tmp_path, monkeypatch):
    metrics = Metrics("job", "stage", 0)
    ck = checkpointer(f"file://{tmp_path}", async_save=True, metrics=metrics)
    model, state = tiny_state()
    expected = model.weight.clone()
    real_put = storage.Location.put_file

    def slow_put(self, local, path):
        time.sleep(0.5)
        real_put(self, local, path)

    monkeypatch.setattr(storage.Location, "put_file", slow_put)
    started = time.perf_counter()
    ck.save(1, state)
    stall = time.perf_counter() - started
    assert ck.latest_committed() is None  # still uploading
    with torch.no_grad():
        model.weight.add_(100.0)  # training goes on; the checkpoint keeps step-1 values
    ck.wait()
    committed_after = time.perf_counter() - started
    assert stall < 0.4 < committed_after
    assert ck.latest_committed() == 1
    fresh, fresh_state = tiny_state(seed=3)
    ck.load(fresh_state)
    assert torch.equal(fresh.weight, expected)
    assert metrics.get("ps3_checkpoint_upload_seconds")._value.get() >= 0.4
    assert metrics.get("ps3_checkpoint_bytes")._value.get() > 0
    assert metrics.get("ps3_checkpoint_load_bytes")._value.get() >= metrics.get("ps3_checkpoint_bytes")._value.get()


def test_at_most_one_upload_in_flight(tmp_path, monkeypatch):
    ck = checkpointer(f"file://{tmp_path}", async_save=True)
    _, state = tiny_state()
    original = Checkpointer._upload
    in_flight, peak = [0], [0]

    def slow_upload(self, staged):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.3)
        try:
            original(self, staged)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(Checkpointer, "_upload", slow_upload)
    ck.save(1, state)
    started = time.perf_counter()
    ck.save(2, state)  # waits for step 1 to commit first
    assert time.perf_counter() - started >= 0.2
    ck.wait()
    assert peak[0] == 1
    assert ck.latest_committed() == 2


# ---- crash in the middle of an upload --------------------------------------------------------
def test_killed_mid_upload_leaves_a_partial_step_that_is_skipped_then_cleaned(s3_server, tmp_path):
    uri = s3_server.make_bucket("ckpt-kill")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "killmid", uri, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not (tmp_path / "uploading").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "worker never reached the upload of step 2"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftover = list(default_staging_root().glob(f"ps3-ckpt-ckpt-test-kill-r0-p{proc.pid}-*"))
    assert leftover  # the killed process left its staged copy behind (tmpfs is memory) ...
    ck = Checkpointer(uri=uri, job="ckpt-test", stage="kill", keep=5, keep_every=None, async_save=False,
                      rank=0, world_size=1)
    assert not any(path.exists() for path in leftover)  # ... which the next run removes
    fs = s3_server.filesystem(skip_instance_cache=True)
    partial = "ckpt-kill/ckpt-test/kill/step-000000002"
    assert fs.ls(partial) and not fs.exists(f"{partial}/{MANIFEST}")
    assert ck.latest_committed() == 1

    sys.path.insert(0, str(WORKER.parent))
    try:
        from ckpt_worker import build, state_of
    finally:
        sys.path.remove(str(WORKER.parent))
    expected = build(seed=0, distributed=False)
    fresh = build(seed=4, distributed=False)
    assert ck.load(state_of(*fresh))[0] == 1
    for a, b in zip(expected[0].parameters(), fresh[0].parameters()):
        assert torch.equal(a, b)  # step 1's weights, not step 2's (+1)

    ck.save(3, state_of(*fresh))  # a newer commit: the partial step 2 is older, so it goes
    fs.invalidate_cache()
    left = fs.find("ckpt-kill/ckpt-test/kill")
    assert not [p for p in left if p.startswith(partial + "/")]  # (SeaweedFS keeps the empty prefix)
    assert ck.latest_committed() == 3


# ---- retention ---------------------------------------------------------------------------
def test_retention_plan_keeps_last_n_and_every_k():
    committed = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert retention_plan(committed, committed, keep=2, keep_every=4) == [1, 2, 3, 5, 6, 7]
    assert retention_plan(committed, committed, keep=3, keep_every=None) == [1, 2, 3, 4, 5, 6]
    # partial steps: older than the newest commit go, newer ones may still be in flight
    assert retention_plan([1, 2, 3, 4], [1, 3], keep=5, keep_every=None) == [2]
    assert retention_plan([2], [], keep=1, keep_every=None) == []


def test_retention_on_storage_counts_only_committed_steps(tmp_path):
    ck = checkpointer(f"file://{tmp_path}", keep=2, keep_every=4)
    _, state = tiny_state()
    stage_dir = tmp_path / "job" / "stage"
    for step in range(1, 8):
        ck.save(step, state)
    for partial in (8, 12):  # partial steps (no manifest): 8 ends older than a commit, 12 newer
        (stage_dir / step_dir_name(partial)).mkdir()
        (stage_dir / step_dir_name(partial) / "__0_0.distcp").write_bytes(b"partial")
    (step_files(tmp_path, "stage", 7) / MANIFEST).unlink()  # 7 is no longer committed
    ck.save(9, state)
    left = sorted(int(p.name[5:]) for p in stage_dir.iterdir())
    # committed 1..6 and 9: keep the newest two committed (6, 9) and multiples of 4 (4);
    # partial 7 and 8 are older than the newest commit (deleted), partial 12 may be in flight
    assert left == [4, 6, 9, 12]


# ---- S3 outage -----------------------------------------------------------------------------
@pytest.mark.faults
def test_s3_outage_of_30s_is_survived_by_async_and_sync_saves(tmp_path, caplog):
    server = SeaweedS3(tmp_path / "own-s3").start()
    try:
        uri = server.make_bucket("ckpt-outage")
        options = server.storage_options
        metrics = Metrics("job", "stage", 0)
        make = lambda stage, **kw: Checkpointer(uri=uri, job="job", stage=stage, keep=2, keep_every=None,
                                                rank=0, world_size=1, metrics=metrics,
                                                storage_options=options, **kw)
        async_ck = make("async", async_save=True, retry_budget_s=180)
        sync_ck = make("sync", async_save=False, retry_budget_s=180)
        short_ck = make("short", async_save=True, retry_budget_s=2)
        model, state = tiny_state()
        expected = model.weight.clone()
        caplog.set_level(logging.WARNING, logger="ps3_platform.runtime.checkpoint")

        server.stop()
        down_at = time.monotonic()
        started = time.perf_counter()
        async_ck.save(1, state)
        assert time.perf_counter() - started < 2.0  # the outage does not stall training
        sync_errors: list[BaseException] = []

        def sync_save() -> None:
            try:
                sync_ck.save(1, state)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                sync_errors.append(exc)

        sync_thread = threading.Thread(target=sync_save)
        sync_thread.start()
        short_ck.save(1, state)
        with pytest.raises(CheckpointUploadError, match="step 1 was not committed"):
            short_ck.wait()  # budget of 2 s spent while the store is down
        with torch.no_grad():
            model.weight.add_(1.0)
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert sync_thread.is_alive()  # still retrying, not failed
        server.start()
        sync_thread.join(timeout=150)
        async_ck.wait()
        assert not sync_errors, sync_errors
        assert async_ck.latest_committed() == 1 and sync_ck.latest_committed() == 1
        assert metrics.get("ps3_checkpoint_failures_total")._value.get() >= 3
        assert any("retrying in" in r.getMessage() for r in caplog.records)
        for ck in (async_ck, sync_ck):
            fresh, fresh_state = tiny_state(seed=8)
            ck.load(fresh_state)
            assert torch.equal(fresh.weight, expected)
    finally:
        server.stop()


# ---- storage helpers and argument checks -----------------------------------------------------
def test_storage_options_come_from_the_environment():
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://x:1",
           "AWS_DEFAULT_REGION": "eu-1"}
    options = storage_options("s3://bucket/prefix", env)
    assert options["key"] == "k" and options["secret"] == "s"
    assert options["client_kwargs"] == {"endpoint_url": "http://x:1", "region_name": "eu-1"}
    assert storage_options("s3://b", {"FSSPEC_S3_ENDPOINT_URL": "http://y:2"})["client_kwargs"]["endpoint_url"] \
        == "http://y:2"
    assert storage_options("file:///tmp/x", env) == {}
    assert open_location("relative/dir").url.startswith("file:///")


def test_retry_backs_off_then_succeeds_or_gives_up():
    policy = RetryPolicy(budget_s=5, first_delay_s=0.01, max_delay_s=0.02)
    calls, failures = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    on_failure = lambda what, exc, attempt, delay: failures.append((attempt, delay))
    assert retry(flaky, what="x", deadline=time.monotonic() + 5, policy=policy, on_failure=on_failure) == "ok"
    assert [a for a, _ in failures] == [1, 2]
    def down():
        raise OSError("down")

    with pytest.raises(StorageError, match="retry budget spent"):
        retry(down, what="y", deadline=time.monotonic() + 0.05, policy=policy)
    with pytest.raises(StorageError, match="failed permanently"):
        retry(lambda: int("x"), what="z", deadline=time.monotonic() + 5, policy=policy)


@pytest.mark.parametrize("bad, message", [
    ({"keep": 0}, "keep must be >= 1"),
    ({"keep_every": 0}, "keepEvery"),
    ({"rank": 2, "world_size": 2}, "rank 2"),
    ({"job": "a/b"}, "job"),
])
def test_bad_arguments_are_rejected_by_name(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        checkpointer(f"file://{tmp_path}", **bad)
