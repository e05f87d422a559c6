"""The data path against a real S3 server (SeaweedFS), credentials from the environment."""

from __future__ import annotations

import pytest

from ps3.data.check import check_source
from ps3.data.index import build_index, read_index
from ps3.data.loader import DataSource, LoaderConfig, PS3Loader
from ps3.data.synth import SynthConfig, generate
from ps3.data.views import ViewConfig

from .test_loader import tokenize

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]
SMALL = SynthConfig(scene_size=(200, 300), doc_long_side=(200, 300), texture=False)


def test_write_index_check_and_load_from_s3(s3_server):
    bucket = s3_server.make_bucket("ps3-data-test")
    sources = generate(f"{bucket}/synth", 10, seed=2, samples_per_shard=4, config=SMALL)
    assert sources["scene"].startswith("s3://")
    assert read_index(sources["scene"])["samples"] == 10
    assert build_index(sources["document"])["samples"] == 10  # rebuild over S3 from the offset tables
    report = check_source(sources["scene"])
    assert report["ok"] == 10 and report["bad"] == {} and report["index"] == "ok"
    views = ViewConfig((32, 64, 128), 16, (4, 16), 64, 6)
    expected = None
    for workers in (0, 2):
        loader = PS3Loader([DataSource(k, v) for k, v in sorted(sources.items())], views, tokenize, rank=0,
                           world_size=1, config=LoaderConfig(8, 4, num_workers=workers))
        batches = [next(loader) for _ in range(4)]
        got = [i for b in batches for i in b["sample_id"].tolist()]
        assert loader.bad_sample_counts() == {}
        expected = expected or got
        assert got == expected
        loader.close()


def test_missing_s3_source_fails_naming_uri(s3_server):
    from ps3.data.index import DataSourceError

    bucket = s3_server.make_bucket("ps3-data-empty")
    with pytest.raises(DataSourceError, match="ps3-data-empty/nothing"):
        PS3Loader([DataSource("x", f"{bucket}/nothing")], ViewConfig((32, 64), 16, (4,), 64, 6), tokenize,
                  rank=0, world_size=1, config=LoaderConfig(4, 4))
