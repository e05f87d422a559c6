"""The curation driver: shards committed whole, resumed exactly once, failures counted by kind."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ps3.curation.inputs import InputError
from ps3.curation.pipeline import curate, plan_inputs
from ps3.curation.writer import committed_shards
from ps3.data.index import read_index
from ps3.data.shards import iter_webdataset

from .conftest import curation_config, in_process_stream


def outputs(output: str, source: str) -> dict[str, dict]:
    """{sample key: json} of every sample in a source's indexed shards (through webdataset's reader)."""
    uri = f"{output}/{source}"
    names = [s["name"] for s in read_index(uri)["shards"]]
    samples = {}
    for sample in iter_webdataset(uri, names):
        assert sample["__key__"] not in samples, f"{sample['__key__']} written twice"
        samples[sample["__key__"]] = json.loads(sample["json"])
    return samples


@pytest.fixture(scope="module")
def clean_run(raw_inputs, tmp_path_factory):
    output = f"file://{tmp_path_factory.mktemp('clean')}/out"
    config = curation_config(output, raw_inputs)
    summary = curate(config, stream=in_process_stream)
    return output, summary


def test_curated_shards_hold_boxes_captions_and_provenance(clean_run):
    output, summary = clean_run
    scenes, docs = outputs(output, "scene"), outputs(output, "document")
    assert len(scenes) + summary["sources"]["scene"]["inputs"] - summary["sources"]["scene"]["images"] == 4
    assert len(docs) == 4  # two 2-page PDFs
    for sample in [*scenes.values(), *docs.values()]:
        assert sample["boxes"] and len(sample["boxes"]) == len(sample["captions"])
        for x0, y0, x1, y1 in sample["boxes"]:
            assert 0 <= x0 < x1 <= sample["width"] and 0 <= y0 < y1 <= sample["height"]
        assert sample["provenance"]["captions"]["name"] in ("tesseract", "ocr")
    scene = next(iter(scenes.values()))
    assert scene["provenance"]["masks"]["name"] == "classical" and len(scene["box_scores"]) == len(scene["boxes"])
    doc = next(iter(docs.values()))
    assert "global_caption" not in doc and "#page=" in doc["input"]
    assert all(len(c.split()) <= 15 for c in doc["captions"])


def test_summary_has_the_paper_table_columns(clean_run):
    _, summary = clean_run
    docs = summary["sources"]["document"]
    assert docs["images"] == 4 and docs["boxes_per_image"] > 0 and docs["mean_box_w"] > docs["mean_box_h"] > 0
    assert set(summary["sources"]["scene"]) >= {"images", "boxes_per_image", "mean_box_w", "mean_box_h",
                                                "captions_per_image"}


def test_a_rerun_writes_nothing_twice(clean_run, raw_inputs):
    output, summary = clean_run
    before = {name: marker for name, marker in committed_shards(f"{output}/scene").items()}
    again = curate(curation_config(output, raw_inputs), stream=in_process_stream)
    assert again["sources"] == summary["sources"]
    assert committed_shards(f"{output}/scene") == before


def test_killed_run_resumes_to_the_clean_result(clean_run, raw_inputs, tmp_path):
    """A run that dies after its first shard is finished by the next run, input by input."""
    output = f"file://{tmp_path}/out"
    config = curation_config(output, raw_inputs)

    def dies_after_three(rows, kind, cfg):
        for n, row in enumerate(in_process_stream(rows, kind, cfg)):
            if n == 3:
                raise KeyboardInterrupt("killed")
            yield row

    with pytest.raises(KeyboardInterrupt):
        curate(config, stream=dies_after_three)
    assert len(committed_shards(f"{output}/scene")) == 1  # shards of 2: one whole, one half-done (not committed)
    curate(config, stream=in_process_stream)
    clean_output, _ = clean_run
    for source in ("scene", "document"):
        got, want = outputs(output, source), outputs(clean_output, source)
        assert got.keys() == want.keys()
        assert {k: v["boxes"] for k, v in got.items()} == {k: v["boxes"] for k, v in want.items()}


def test_planning_is_stable_and_names_shards_by_content(raw_inputs, tmp_path):
    config = curation_config(f"file://{tmp_path}/out", raw_inputs)
    first, second = plan_inputs(config), plan_inputs(config)
    assert first.shards == second.shards
    assert sorted(len(v) for v in first.shards["document"].values()) == [2, 2]


def _jpeg(size, colour=(120, 120, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_inputs_are_counted_by_kind_and_never_stop_the_run(tmp_path, raw_inputs, caplog):
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    (raw / "docs").mkdir()
    good = (tmp_path / "good.jpg")
    good.write_bytes(open(raw_inputs["scene"].removeprefix("file://") + "/scene00000000.jpg", "rb").read())
    (raw / "img" / "good.jpg").write_bytes(good.read_bytes())
    (raw / "img" / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (raw / "img" / "noise.png").write_bytes(b"\x89PNG not really")
    (raw / "img" / "tiny.jpg").write_bytes(_jpeg((100, 80)))
    (raw / "img" / "blank.jpg").write_bytes(_jpeg((1024, 768)))
    (raw / "docs" / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (raw / "docs" / "page.png").write_bytes(b"")  # replaced below by a real page with bad OCR JSON
    page = Image.new("RGB", (800, 1000), "white")
    buf = io.BytesIO()
    page.save(buf, "PNG")
    (raw / "docs" / "page.png").write_bytes(buf.getvalue())
    (raw / "docs" / "page.png.ocr.json").write_text('{"words": [{"text": "x", "box": [1, 2]}')
    index = tmp_path / "index.txt"
    index.write_text(f"file://{raw}/img/good.jpg\nfile://{raw}/img/missing.jpg\nfile://{raw}/img/good.jpg\n")
    config = curation_config(f"file://{tmp_path}/out", {}, sources=[
        {"name": "img", "kind": "natural", "uri": f"file://{raw}/img"},
        {"name": "listed", "kind": "natural", "uri": f"file://{raw}/img", "index": f"file://{index}"},
        {"name": "docs", "kind": "document", "uri": f"file://{raw}/docs", "ocr": "json"},
    ])
    summary = curate(config, stream=in_process_stream)
    failures = summary["failures"]
    assert failures["bad_image"] == 2  # truncated + not an image
    assert failures["too_small"] == 1 and failures["no_masks"] == 1
    assert failures["pdf_error"] == 1 and failures["bad_ocr_json"] == 1 and failures["read_error"] == 1
    assert summary["sources"]["img"]["images"] == 1 and summary["sources"]["listed"]["images"] == 1
    assert summary["sources"]["listed"]["inputs"] == 2  # listed twice, curated once
    logged = caplog.text
    assert "truncated.jpg" in logged and "broken.pdf" in logged and "missing.jpg" in logged


def test_an_unreachable_source_is_one_line_at_start(tmp_path):
    config = curation_config(f"file://{tmp_path}/out", {}, sources=[
        {"name": "gone", "kind": "natural", "uri": f"file://{tmp_path}/nowhere"}])
    with pytest.raises(InputError, match="gone: .*nowhere") as err:
        plan_inputs(config)
    assert "\n" not in str(err.value)


def test_webdataset_shards_and_globs_are_inputs_too(tmp_path, raw_inputs):
    """Existing shards are re-curated member by member; a glob picks files out of a directory."""
    from ps3.data import synth

    from .conftest import SMALL

    synth.generate(f"file://{tmp_path}/shards", 3, seed=4, kinds=["scene"], samples_per_shard=2, config=SMALL)
    config = curation_config(f"file://{tmp_path}/out", {}, sources=[
        {"name": "wds", "kind": "natural", "uri": f"file://{tmp_path}/shards/scene", "format": "webdataset"},
        {"name": "globbed", "kind": "natural", "uri": raw_inputs["scene"] + "/scene0000000[01].jpg"}])
    plan = plan_inputs(config)
    assert sum(len(v) for v in plan.shards["wds"].values()) == 3
    assert sum(len(v) for v in plan.shards["globbed"].values()) == 2
    summary = curate(config, plan, stream=in_process_stream)
    assert summary["sources"]["wds"]["inputs"] == 3 and summary["sources"]["globbed"]["inputs"] == 2
    samples = outputs(f"file://{tmp_path}/out", "wds")
    assert samples and all(".tar#offset=" in s["input"] for s in samples.values())


def _one_scene(raw_inputs) -> Image.Image:
    return Image.open(raw_inputs["scene"].removeprefix("file://") + "/scene00000000.jpg").convert("RGB")


def test_webp_and_tiff_inputs_are_re_encoded_and_curated(tmp_path, raw_inputs):
    """The shard format holds jpg/png: a WebP and a TIFF input are stored as JPEG, with their boxes."""
    raw = tmp_path / "raw"
    raw.mkdir()
    scene = _one_scene(raw_inputs).reduce(2)  # 512 x 640: small, and its signs still read
    scene.save(raw / "scene.webp", "WEBP", quality=95)
    scene.save(raw / "scene.tiff", "TIFF")
    config = curation_config(f"file://{tmp_path}/out", {}, sources=[
        {"name": "formats", "kind": "natural", "uri": f"file://{raw}"}])
    summary = curate(config, stream=in_process_stream)
    assert summary["sources"]["formats"]["images"] == 2, summary
    names = [s["name"] for s in read_index(f"file://{tmp_path}/out/formats")["shards"]]
    samples = list(iter_webdataset(f"file://{tmp_path}/out/formats", names))
    assert sorted(json.loads(s["json"])["input"].rsplit(".", 1)[1] for s in samples) == ["tiff", "webp"]
    for sample in samples:
        record = json.loads(sample["json"])
        assert record["boxes"] and len(record["boxes"]) == len(record["captions"])
        stored = Image.open(io.BytesIO(sample["jpg"]))
        assert stored.format == "JPEG" and stored.size == scene.size == (record["width"], record["height"])


def test_inputs_under_another_fsspec_uri_are_listed_and_read():
    """memory:// (fsspec's in-process store) stands for any non-file URI. Ray Data runs the stages
    in worker processes, which would not share this store, so the test covers what touches the
    input URI: listing (directory, glob, PDF pages) and reading."""
    from ps3.curation.inputs import InputItem, SourceSpec, list_inputs
    from ps3.curation.stages import read_input
    from ps3.data.fs import filesystem

    root = "memory://curation-test-inputs"
    fs, path = filesystem(root)
    page = Image.new("RGB", (300, 200), "white")
    buf = io.BytesIO()
    page.save(buf, "PDF", resolution=100.0, save_all=True, append_images=[page])
    fs.pipe_file(f"{path}/doc.pdf", buf.getvalue())
    fs.pipe_file(f"{path}/broken.pdf", b"%PDF-1.4 this is not a pdf")
    fs.pipe_file(f"{path}/img.jpg", _jpeg((320, 240)))
    try:
        failures: list = []
        items = list_inputs(SourceSpec("mem", "document", root), failures)
        assert sorted(i.name for i in items) == [f"memory://{path}/doc.pdf#page=1", f"memory://{path}/doc.pdf#page=2",
                                                 f"memory://{path}/img.jpg"]
        assert [(name, kind) for name, kind, _ in failures] == [(f"memory://{path}/broken.pdf", "pdf_error")]
        assert [i.name for i in list_inputs(SourceSpec("glob", "natural", f"{root}/*.jpg"), [])] == [
            f"memory://{path}/img.jpg"]
        config = curation_config(f"{root}/out", {}, sources=[{"name": "mem", "kind": "document", "uri": root}])
        gone = InputItem("gone", "mem", "document", f"memory://{path}/gone.jpg")
        for item in [*items, gone]:
            row = read_input({**item.to_row(), "image": b"", "masks": b""}, config)
            meta = json.loads(row["meta"])
            if item is gone:
                assert meta["failed"] == "read_error"
                continue
            assert "failed" not in meta
            assert Image.open(io.BytesIO(row["image"])).size == (meta["width"], meta["height"])
            assert (meta["width"], meta["height"]) == ((450, 300) if item.page is not None else (320, 240))
    finally:
        fs.rm(path, recursive=True)


def test_a_document_page_image_curates_to_ocr_boxes_and_text(tesseract, tmp_path):
    """A document source given as page images (no PDF): Tesseract's lines become boxes with their text."""
    from ps3.data import synth

    data, ext, _ = synth.sample("document", 5, 0, synth.SynthConfig(doc_long_side=(1024, 1024), texture=False))
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / f"page.{ext}").write_bytes(data)
    config = curation_config(f"file://{tmp_path}/out", {}, sources=[
        {"name": "pages", "kind": "document", "uri": f"file://{tmp_path}/pages", "documentMode": "sentence"}])
    summary = curate(config, stream=in_process_stream)
    assert summary["failures"] == {} and summary["sources"]["pages"]["images"] == 1
    (sample,) = outputs(f"file://{tmp_path}/out", "pages").values()
    assert sample["input"].endswith(f"page.{ext}") and sample["provenance"]["captions"]["name"] == "tesseract"
    assert len(sample["boxes"]) == len(sample["captions"]) == 4 and "global_caption" not in sample
    words = [w for caption in sample["captions"] for w in caption.split()]
    assert sum(w in synth.DOC_WORDS for w in words) >= 0.9 * len(words)  # the page's own words, read back


class _FirstBoxHangs:
    """A captioner whose first box hangs past the timeout on every try; every other box gets a caption."""

    def __init__(self):
        self.provenance, self.stuck = {"name": "first-box-hangs"}, None

    def caption(self, requests):
        import time

        self.stuck = self.stuck or requests[0].box
        if any(r.box == self.stuck for r in requests):
            time.sleep(0.5)
        return [f"caption of {r.box}" for r in requests]


def test_a_caption_that_keeps_timing_out_is_counted_in_the_summary(tmp_path, raw_inputs):
    from ps3.curation.actors import Caption, CaptionCalls, Segment
    from ps3.curation.stages import read_input, select_boxes

    config = curation_config(f"file://{tmp_path}/out", {}, sources=[
        {"name": "scene", "kind": "natural", "uri": raw_inputs["scene"] + "/scene0000000[0].jpg"}],  # a glob of one
        captions={"captioner": "ocr", "timeoutS": 0.2, "retries": 1})
    boxes = []

    def stream(rows, kind, cfg):
        segmenter, caption = Segment(cfg), Caption(cfg)
        caption.calls = CaptionCalls(_FirstBoxHangs(), cfg.captions)  # what the Caption actor calls, scripted
        for row in rows:
            row = select_boxes(segmenter([read_input(row, cfg)])[0], cfg)
            boxes.append(len(json.loads(row["meta"])["boxes"]))
            yield caption([row])[0]

    summary = curate(config, stream=stream)
    assert summary["failures"] == {"caption_dropped": 1} and summary["sources"]["scene"]["captions_dropped"] == 1
    (sample,) = outputs(f"file://{tmp_path}/out", "scene").values()
    assert len(sample["boxes"]) == len(sample["captions"]) == boxes[0] - 1
