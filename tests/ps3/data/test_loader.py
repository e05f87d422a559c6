"""PS3Loader: batch contents, exact resume (also across world sizes), workers, bad input,
uint8 pixels across the worker processes and their normalisation afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ps3.data.batches import IMAGE_KEYS, normalize_images
from ps3.data.index import DataSourceError
from ps3.data.loader import DataSource, LoaderConfig, PS3Loader
from ps3.data.views import ViewConfig, channels_first, normalize_pixels

from .conftest import BAD_CASES, write_bad_source

TINY = ViewConfig(scales=(32, 64, 128), patch_size=16, budgets=(4, 16), selection_view_size=64, context_length=6)
PATCHES = ViewConfig(scales=(32, 64, 128), patch_size=16, budgets=(3, 10), selection_view_size=64,
                     context_length=6, highres="patches")


def tokenize(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(c), *(ord(ch) for ch in c[:5].ljust(5))] for c in captions])


def make(sources, *, rank=0, world=1, batch=8, micro=4, workers=0, views=TINY, seed=0, frac=0.25, pin=False):
    srcs = [DataSource(name, uri) for name, uri in sorted(sources.items())]
    return PS3Loader(srcs, views, tokenize, rank=rank, world_size=world,
                     config=LoaderConfig(batch, micro, seed=seed, num_workers=workers, global_caption_fraction=frac,
                                         pin_memory=pin))


def ids(batches) -> list[int]:
    return [i for b in batches for i in b["sample_id"].tolist()]


def test_batch_keys_and_shapes(synth_sources):
    b = next(make(synth_sources))
    assert b["lowres"].shape == (4, 3, 32, 32) and b["selection_view"].shape == (4, 3, 64, 64)
    assert [t.shape for t in b["highres"]] == [(4, 3, 64, 64), (4, 3, 128, 128)]
    assert [t.shape for t in b["gt_maps"]] == [(4, 4, 4), (4, 8, 8)]
    assert [t.shape for t in b["saliency_maps"]] == [(4, 4, 4), (4, 8, 8)]
    for gt, salient in zip(b["gt_maps"], b["saliency_maps"]):
        assert bool((salient >= gt).all())  # the captioned box is one of the salient ones
    assert b["tokens"].shape == (4, 6) and b["tokens"].dtype == torch.long
    assert b["is_global"].dtype == torch.bool and b["sample_id"].dtype == torch.long
    assert b["lowres"].dtype == b["selection_view"].dtype == torch.uint8
    assert all(t.dtype == torch.uint8 for t in b["highres"]) and b["gt_maps"][0].dtype == torch.float32
    assert "hr_index" not in b


def test_global_step_composition(synth_sources):
    loader = make(synth_sources, batch=16, micro=8)
    for _ in range(3):
        step = [next(loader), next(loader)]
        glob = torch.cat([b["is_global"] for b in step])
        assert int(glob.sum()) == 4  # round(0.25 * 16)
        assert len(set(ids(step))) == 16  # one image at most once per global batch
        scene = sorted(synth_sources).index("scene")
        for b in step:
            assert (b["source"][b["is_global"]] == scene).all()  # documents have no global captions
            for gt in b["gt_maps"]:
                assert (gt[b["is_global"]] == 1).all() and (gt[~b["is_global"]] == 0).any()


def test_exact_resume(synth_sources):
    loader = make(synth_sources)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    resumed = make(synth_sources)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(4)]
    assert ids(got) == ids(expected)
    assert all(torch.equal(a["lowres"], b["lowres"]) and torch.equal(a["tokens"], b["tokens"])
               for a, b in zip(got, expected))


def step_ids(loaders) -> list[int]:
    """One global step's sample ids, ranks in order."""
    out = []
    for loader in loaders:
        out += ids([next(loader) for _ in range(loader.accumulation)])
    return out


def test_positions_are_global_across_world_sizes(synth_sources):
    single = make(synth_sources, batch=8, micro=4)
    two = [make(synth_sources, rank=r, world=2, batch=8, micro=2) for r in range(2)]
    assert step_ids([single]) == step_ids(two)
    position = lambda loader: {k: v for k, v in loader.state_dict().items() if k != "world_size"}
    assert two[0].state_dict() == two[1].state_dict() and position(two[0]) == position(single)
    four = [make(synth_sources, rank=r, world=4, batch=8, micro=1) for r in range(4)]
    for loader in four:
        loader.load_state_dict(two[0].state_dict())  # world size 2 -> 4 at a step boundary
    assert step_ids(four) == step_ids([single])


def test_world_sizes_that_do_not_divide_the_batch_cut_the_same_global_steps(synth_sources):
    """8 samples over 3 or 5 ranks: shares of 3/3/2 and 2/2/2/1/1, the same samples in the
    same order as one rank, resumable across world sizes; each micro-batch names every
    rank's size in it (what the contrastive loss exchanges)."""
    single = make(synth_sources, batch=8, micro=8)
    three = [make(synth_sources, rank=r, world=3, batch=8, micro=2) for r in range(3)]
    assert [loader.accumulation for loader in three] == [2, 2, 2]
    first = [next(three[0]) for _ in range(2)]
    assert [len(b["sample_id"]) for b in first] == [2, 1] and first[0]["rank_sizes"] == [2, 2, 1]
    assert ids(first) + step_ids(three[1:]) == step_ids([single])
    five = [make(synth_sources, rank=r, world=5, batch=8, micro=2) for r in range(5)]
    for loader in five:
        loader.load_state_dict(three[0].state_dict())  # world size 3 -> 5 at a step boundary
    assert step_ids(five) == step_ids([single])


def test_mid_step_state_needs_same_world_size(synth_sources):
    loader = make(synth_sources, batch=8, micro=2)
    next(loader)
    other = make(synth_sources, rank=0, world=2, batch=8, micro=2)
    with pytest.raises(ValueError, match="mid-step"):
        other.load_state_dict(loader.state_dict())


def test_workers_produce_the_same_batches_and_resume(synth_sources):
    inline = make(synth_sources, batch=8, micro=2)
    pooled = make(synth_sources, batch=8, micro=2, workers=2)
    a, b = [next(inline) for _ in range(5)], [next(pooled) for _ in range(5)]
    assert ids(a) == ids(b) and all(torch.equal(x["lowres"], y["lowres"]) for x, y in zip(a, b))
    state = pooled.state_dict()
    expected = [next(inline) for _ in range(3)]
    again = make(synth_sources, batch=8, micro=2, workers=2)
    again.load_state_dict(state)
    assert ids([next(again) for _ in range(3)]) == ids(expected)
    again.close()
    pooled.close()


def test_patches_form_teacher_forced_selection(synth_sources):
    b = next(make(synth_sources, views=PATCHES))
    assert "highres" not in b
    assert [t.shape for t in b["hr_index"]] == [(4, 3), (4, 10)]
    assert [t.shape for t in b["hr_patches"]] == [(4, 3, 3, 16, 16), (4, 10, 3, 16, 16)]
    for idx, gt in zip(b["hr_index"], b["gt_maps"]):
        picked = gt.flatten(1).gather(1, idx)  # [B, K]: 1 where a selected cell is in the box
        inbox = gt.flatten(1).sum(1)
        assert (picked.sum(1) == torch.minimum(inbox, torch.tensor(float(idx.shape[1])))).all()
        assert (idx.diff(dim=1) > 0).all()  # ascending, no duplicates


def test_patches_match_full_views(synth_sources):
    """Pre-gathered patches are exactly the cells of the full high-res view."""
    full = next(make(synth_sources))
    patched = next(make(synth_sources, views=ViewConfig((32, 64, 128), 16, (4, 16), 64, 6, highres="patches")))
    assert torch.equal(full["sample_id"], patched["sample_id"])
    for view, idx, patches in zip(full["highres"], patched["hr_index"], patched["hr_patches"]):
        g = view.shape[-1] // 16
        cells = view.unfold(2, 16, 16).unfold(3, 16, 16)  # [B, 3, g, g, 16, 16]
        cells = cells.permute(0, 2, 3, 1, 4, 5).reshape(view.shape[0], g * g, 3, 16, 16)
        expected = cells[torch.arange(view.shape[0])[:, None], idx]
        assert (expected.int() - patches.int()).abs().max() <= 2  # a window resample rounds by <= 1 level


def test_bad_samples_skipped_counted_and_replaced(tmp_path):
    bad_uri = f"file://{tmp_path}/bad"
    write_bad_source(bad_uri, good=12)
    for workers in (0, 2):
        loader = make({"bad": bad_uri}, batch=4, micro=2, workers=workers)
        seen = []
        for _ in range(20):
            b = next(loader)
            assert b["lowres"].shape[0] == 2
            seen += ids([b])
        counts = loader.bad_sample_counts()
        assert set(counts) == set(BAD_CASES.values()), counts
        good_ids = {i for i in seen}
        assert len(good_ids) <= 12  # only the 12 good images ever come out
        loader.close()


def test_missing_shards_fail_at_start_naming_uri(tmp_path, synth_sources):
    from ps3.data.fs import filesystem

    uri = f"file://{tmp_path}/gone"
    write_bad_source(uri, good=2)
    fs, path = filesystem(uri)
    fs.rm(f"{path}/shard-000000.tar")
    with pytest.raises(DataSourceError, match=f"{tmp_path}/gone"):
        make({"gone": uri, **synth_sources})


def test_tokenizer_length_mismatch_is_clear(synth_sources):
    loader = PS3Loader([DataSource("scene", synth_sources["scene"])], TINY, lambda c: torch.zeros(len(c), 3),
                       rank=0, world_size=1, config=LoaderConfig(4, 4))
    with pytest.raises(ValueError, match="context_length"):
        next(loader)


def test_build_loader_takes_flat_preset_numbers(synth_sources):
    from types import SimpleNamespace

    from ps3.data import build_loader

    spec_like = [SimpleNamespace(name="scene", uri=synth_sources["scene"], weight=2.0)]
    assert PS3Loader(spec_like, TINY, tokenize, rank=0, world_size=1, config=LoaderConfig(4, 4)).sources[0].weight == 2
    loader = build_loader([{"name": k, "uri": v, "weight": 1.0} for k, v in synth_sources.items()], rank=1,
                          world_size=2, global_batch=8, micro_batch=2, seed=3, scales=[32, 64], patch_size=16,
                          budgets=[5], selection_view_size=64, context_length=6, tokenize=tokenize,
                          highres="patches")
    b = next(loader)
    assert loader.accumulation == 2 and b["hr_patches"][0].shape == (2, 5, 3, 16, 16)


def test_bad_sample_key_logged_once(tmp_path, caplog):
    bad_uri = f"file://{tmp_path}/bad"
    write_bad_source(bad_uri, good=4)
    loader = make({"bad": bad_uri}, batch=4, micro=4)
    with caplog.at_level("WARNING", logger="ps3.data.batches"):
        for _ in range(15):  # every bad sample is drawn several times
            next(loader)
    logged = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(logged) == len(set(logged)) == len(BAD_CASES)
    assert sum(loader.bad_sample_counts().values()) > len(BAD_CASES)
    assert any("b_box" in m and "bad_box" in m for m in logged)
    assert all(f"{tmp_path}/bad/shard-" in m and ".tar#" in m for m in logged)  # the shard to look in


def test_shard_truncated_after_start_gives_read_errors(tmp_path):
    from ps3.data.fs import filesystem
    from ps3.data.shards import read_sidecar

    from .conftest import write_source

    uri = f"file://{tmp_path}/trunc"
    write_source(uri, 12, per_shard=6, size=(64, 64))
    loader = make({"toy": uri}, batch=6, micro=6, frac=0.0)  # both shards are fine at start
    fs, path = filesystem(uri)
    data = fs.cat_file(f"{path}/shard-000001.tar")
    last = read_sidecar(fs, f"{path}/shard-000001.tar")[1][-1]
    fs.pipe_file(f"{path}/shard-000001.tar", data[: last.image[0] + 10])  # then its last sample is cut off
    out = ids([next(loader) for _ in range(6)])
    assert loader.bad_sample_counts().get("read_error", 0) >= 1
    assert len(out) == 36 and all(len(set(out[i:i + 6])) == 6 for i in range(0, 36, 6))
    assert all(i & 0xFFFFFFFF != 11 for i in out)


def test_zero_budget_scale_gives_empty_patches(synth_sources):
    views = ViewConfig((32, 64, 128), 16, (0, 6), 64, 6, highres="patches")
    b = next(make(synth_sources, views=views))
    assert b["hr_index"][0].shape == (4, 0) and b["hr_patches"][0].shape == (4, 0, 3, 16, 16)
    assert b["hr_patches"][1].shape == (4, 6, 3, 16, 16)


def test_samples_after_a_corrupt_tar_header_are_used_and_the_damaged_one_counted(tmp_path, caplog):
    from ps3.data.fs import filesystem
    from ps3.data.index import build_index

    from .conftest import corrupt_header, write_source

    uri = f"file://{tmp_path}/hdr"
    write_source(uri, 6, per_shard=6, size=(64, 64))
    fs, path = filesystem(uri)
    corrupt_header(fs, f"{path}/shard-000000.tar", b"s00002.jpg")
    fs.rm(f"{path}/shard-000000.tar.idx.json")
    assert build_index(uri)["samples"] == 6  # `platformctl data index` after the damage
    loader = make({"toy": uri}, batch=5, micro=5, frac=0.0)
    with caplog.at_level("WARNING", logger="ps3.data.batches"):
        out = ids([next(loader) for _ in range(4)])
    assert {i & 0xFFFFFFFF for i in out} == {0, 1, 3, 4, 5}  # every sample but the damaged one
    assert loader.bad_sample_counts() == {"missing_image": loader.bad_sample_counts()["missing_image"]}
    assert any("s00002" in r.getMessage() and "missing_image" in r.getMessage() for r in caplog.records)


def _pixels(batch: dict) -> list[torch.Tensor]:
    return [t for k in IMAGE_KEYS if k in batch for t in (batch[k] if isinstance(batch[k], list) else [batch[k]])]


@pytest.mark.parametrize("views", [TINY, PATCHES], ids=["views", "patches"])
def test_pixels_cross_worker_processes_as_uint8(synth_sources, views):
    """A quarter of float32's bytes in /dev/shm (ps3_platform.compile.shm): floats must not come back."""
    loader = make(synth_sources, batch=8, micro=2, workers=2, views=views)
    batches = [next(loader) for _ in range(3)]
    loader.close()
    inline = make(synth_sources, batch=8, micro=2, views=views)
    for batch, same in zip(batches, [next(inline) for _ in range(3)]):
        assert _pixels(batch) and all(t.dtype == torch.uint8 for t in _pixels(batch))
        assert all(torch.equal(a, b) for a, b in zip(_pixels(batch), _pixels(same)))


def test_normalising_after_the_copy_equals_the_old_float_views():
    """x / 127.5 - 1 on the uint8 tensor, bit for bit what the workers used to send as float32."""
    arr = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    old = torch.from_numpy(arr).movedim(-1, -3).contiguous().float().div_(127.5).sub_(1.0)
    new = normalize_pixels(channels_first(arr))
    assert new.dtype == torch.float32 and torch.equal(new, old)
    assert normalize_pixels(channels_first(arr), torch.bfloat16).dtype == torch.bfloat16
    batch = {"lowres": channels_first(arr), "highres": [channels_first(arr)], "gt_maps": [torch.ones(2, 4, 4)],
             "images": channels_first(arr)}
    out = normalize_images(batch)
    assert torch.equal(out["lowres"], old) and torch.equal(out["highres"][0], old)
    assert out["gt_maps"] is batch["gt_maps"] and out["images"].dtype == torch.uint8  # not a PS3 pixel key
    assert torch.equal(normalize_images(out)["lowres"], old)  # floats pass: safe to apply twice


def test_pin_memory_reaches_the_data_loader_of_worker_processes(synth_sources, data_loader_kwargs):
    """Workers' batches are pinned by the DataLoader's thread; inline batches are not pinned."""
    next(make(synth_sources, workers=1, pin=True))
    assert data_loader_kwargs["pin_memory"] is True
    data_loader_kwargs.clear()
    assert next(make(synth_sources, workers=0, pin=True))["lowres"].dtype == torch.uint8 and not data_loader_kwargs
