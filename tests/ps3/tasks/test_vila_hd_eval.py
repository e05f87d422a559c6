"""The `vila_hd_eval` stage as users run it: an exported model over a 4KPro file and a V*
folder at a sweep of selection settings, with the bad lines counted, never scored."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ps3.data.synth import SynthConfig
from ps3.vila_hd.export import export_vila_hd
from ps3.vila_hd.synth import BENCHMARK_FILE, vqa_sample, write_benchmark
from ps3_platform.cli import main

SPEC = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: bench}}
spec:
  task: vila_hd_eval
  resources: {{pool: cpu}}
  checkpoint: {{initFrom: "file://{root}/vila-hd"}}
  params:
    benchmarks:
      - {{name: pro, format: 4kpro, uri: "file://{root}/data/{bench_file}", categories: [mark]}}
      - {{name: vstar, format: vstar, uri: "file://{root}/vstar"}}
    modes: [after_prompt, after_image, random]
    patchFractions: [0.0, 0.125]
    selectNumEachScale: [8, 32]
    answer: generate
    maxNewTokens: 2
    batchSize: 4
    pictures: 1
"""


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory, tiny_vila_hd):
    root = tmp_path_factory.mktemp("eval")
    model, tokenizer, _ = tiny_vila_hd
    export_vila_hd(model, tokenizer, str(root / "vila-hd"))
    cfg = SynthConfig(scene_size=(300, 400))
    write_benchmark(f"file://{root}/data", 5, cfg=cfg, question="mark")
    with open(root / "data" / BENCHMARK_FILE, "a") as questions:  # lines 6-8: not scorable
        questions.write("{broken\n")
        questions.write(json.dumps({"id": "x", "image": "images/none.jpg", "question": "Q?", "options": ["a", "b"],
                                    "answer": "A", "category": "mark"}) + "\n")
        questions.write(json.dumps({"id": "y", "image": "images/none.jpg", "question": "Q?", "options": ["a", "b"],
                                    "answer": "A", "category": "shape"}) + "\n")
    folder = root / "vstar" / "direct_attributes"
    folder.mkdir(parents=True)
    for i in range(2):
        (folder / f"sa_{i}.jpg").write_bytes(vqa_sample(0, i, cfg, question="mark")[2][0][1])
        (folder / f"sa_{i}.json").write_text(json.dumps({"question": "What colour is the dot?", "bbox": [[4, 4, 30, 30]],
                                                         "options": ["black", "white", "magenta", "cyan"]}))
    return root


def test_eval_stage_sweeps_settings_and_reports_through_status(platform_home, benchmark_root, capsys, monkeypatch):
    spec = benchmark_root / "bench.yaml"
    spec.write_text(SPEC.format(root=benchmark_root, bench_file=BENCHMARK_FILE))
    assert main(["submit", str(spec), "--backend", "local", "--wait", "-q"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    assert main(["status", "bench", "-o", "json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)["eval"]
    pro = evaluation["benchmarks"]["pro"]
    assert pro["n_questions"] == 5
    assert pro["problems"]["by_kind"] == {"bad_json": 1, "image_decode": 1, "unknown_category": 1}
    assert any("questions.jsonl:7: image_decode" in line for line in pro["problems"]["first"])
    rows = {(r["benchmark"], r["setting"]): r for r in evaluation["sweep"]}
    settings = ["lowres", "topdown@12%", "bottomup@12%", "random@12%"]
    assert set(rows) == {(b, s) for b in ("pro", "vstar") for s in settings}
    # the summary the quickstart is judged by, pooled over both benchmarks (5 + 2 questions)
    assert evaluation["n_questions"] == 7 and evaluation["headline_setting"] == "topdown@12%"

    def pooled(setting: str) -> float:
        return round(sum(rows[b, setting]["accuracy"] * rows[b, setting]["n"] for b in ("pro", "vstar")) / 7, 4)

    assert evaluation["accuracy_highres"] == pytest.approx(pooled("topdown@12%"), abs=1e-3)
    assert evaluation["accuracy_lowres"] == pytest.approx(pooled("lowres"), abs=1e-3)
    assert evaluation["accuracy_chance"] == 0.25  # four options each
    for key in ("accuracy_highres", "accuracy_lowres", "recall_topdown", "recall_bottomup"):
        assert 0.0 <= evaluation[key] <= 1.0, key
    for key, setting in (("recall_topdown", "topdown@12%"), ("recall_bottomup", "bottomup@12%")):
        summaries = [evaluation["benchmarks"][b]["settings"][setting] for b in ("pro", "vstar")]
        boxed = sum(x["n_with_boxes"] for x in summaries)
        assert evaluation[key] == pytest.approx(sum(x["recall"] * x["n_with_boxes"] for x in summaries) / boxed,
                                                abs=1e-3)
    assert rows["pro", "lowres"]["recall"] is None and rows["pro", "lowres"]["patches_pct"] == 0.0
    for setting in settings[1:]:
        row = rows["pro", setting]
        assert row["patches_pct"] == 12.5 and 0.0 <= row["recall"] <= 1.0
        assert row["tokens_per_image"] >= rows["pro", "lowres"]["tokens_per_image"]  # whole 2x2 blocks only
        assert 0.0 <= row["accuracy"] <= 1.0 and row["latency_s_per_question"] > 0
    assert rows["vstar", "lowres"]["n"] == 2
    categories = pro["settings"]["lowres"]["per_category"]
    assert list(categories) == ["mark"] and categories["mark"]["n"] == 5
    assert set(pro["settings"]["lowres"]["per_bucket"]) <= {"1K", "2K", "4K"}
    run = platform_home / "runs" / "bench" / "train"
    assert Image.open(run / "sweep.png").format == "PNG" and Image.open(pro["pictures"][0]).format == "PNG"
    published = platform_home / "runs" / "bench" / "checkpoints" / "bench" / "train" / "eval.json"
    assert json.loads(published.read_text()) == evaluation  # beside the checkpoints: what a cluster's status reads
    answers = (run / "answers-pro.jsonl").read_text().splitlines()
    assert len(answers) == 5 * len(settings)
    monkeypatch.setenv("COLUMNS", "160")  # rich folds a wide table into a narrow terminal
    assert main(["status", "bench"]) == 0
    table = capsys.readouterr().out
    assert "topdown@12%" in table and "3 questions not scored" in table


def test_eval_stage_bad_benchmark_is_one_line(platform_home, benchmark_root, tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.format(root=benchmark_root, bench_file="eval/4kpro/missing.jsonl"))
    assert main(["submit", str(spec), "--backend", "local", "--wait", "-q"]) != 0
    log = "".join(p.read_text() for p in (platform_home / "runs" / "bench" / "logs").rglob("stderr.log"))
    assert "spec params.benchmarks pro:" in log and "missing.jsonl does not exist" in log
    assert "Traceback" not in log
