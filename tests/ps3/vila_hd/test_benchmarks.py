"""Benchmarks in their three public layouts read into one form; bad lines become located
problems, never crashes; letters come out of free text; scores split by category and bucket."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ps3.vila_hd.benchmarks import (
    BenchmarkError,
    Question,
    check_image,
    extract_letter,
    problems_summary,
    prompt_text,
    read_benchmark,
    score,
    split_inline_options,
)


def _jpeg(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def _jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _row(**overrides) -> dict:
    row = {"id": "q1", "image": "images/a.jpg", "question": "What colour?", "options": ["red", "blue"],
           "answer": "A", "category": "mark", "bucket": "4K", "box": [1, 2, 10, 12]}
    return {**row, **overrides}


def test_4kpro_lines_become_questions_and_every_bad_line_a_located_problem(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg())
    _jsonl(tmp_path / "q.jsonl", [
        _row(),
        _row(id="q2", answer="blue", bucket=None, box=None),  # the answer as the option's text
        "{not json",
        _row(id="q4", answer="C"),  # only two options
        _row(id="q5", question=""),
        _row(id="q6", category="other"),
        _row(id="q7", options=["only one"]),
        _row(id="q8", box=[5, 5, 5, 9]),
        _row(id="q1"),  # a duplicate id
    ])
    questions, problems = read_benchmark(f"file://{tmp_path}/q.jsonl", "4kpro", categories=["mark"])
    assert [q.qid for q in questions] == ["q1", "q2"]
    first = questions[0]
    assert first.image == f"file://{tmp_path}/images/a.jpg" and first.boxes == [[1.0, 2.0, 10.0, 12.0]]
    assert questions[1].answer == "B" and questions[1].boxes == []
    kinds = {p.where: p.kind for p in problems}
    assert kinds == {"q.jsonl:3": "bad_json", "q.jsonl:4": "answer_not_option", "q.jsonl:5": "missing_field",
                     "q.jsonl:6": "unknown_category", "q.jsonl:7": "bad_options", "q.jsonl:8": "bad_box",
                     "q.jsonl:9": "duplicate_id"}
    summary = problems_summary(problems)
    assert summary["count"] == 7 and summary["by_kind"]["bad_json"] == 1
    assert summary["first"][0].startswith("q.jsonl:3: bad_json")


def test_a_benchmark_that_cannot_be_read_at_all_is_one_error(tmp_path):
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark(str(tmp_path / "missing.jsonl"), "4kpro")
    _jsonl(tmp_path / "junk.jsonl", ["garbage", "[1, 2]"])
    with pytest.raises(BenchmarkError, match="no line is a JSON object"):
        read_benchmark(str(tmp_path / "junk.jsonl"), "4kpro")
    with pytest.raises(BenchmarkError, match="unknown format"):
        read_benchmark(str(tmp_path / "junk.jsonl"), "mmbench")


def test_images_are_checked_and_buckets_filled_from_their_size(tmp_path):
    question = Question("q", "4kpro", "x.jpg", "Q?", ["a", "b"], "A", "c", boxes=[[0, 0, 40, 30]])
    assert check_image(question, _jpeg((40, 30))) is None and question.bucket == "1K"
    assert check_image(question, None).kind == "image_decode"
    assert check_image(question, b"not an image").kind == "image_decode"
    assert check_image(question, _jpeg()[:200]).kind == "image_decode"  # truncated
    question.boxes = [[0, 0, 60, 30]]
    assert check_image(question, _jpeg((40, 30))).kind == "bad_box"


def test_vstar_folders_give_shuffled_options_whose_answer_is_the_authors_first(tmp_path):
    for category in ("direct_attributes", "relative_position"):
        (tmp_path / category).mkdir()
    for i in range(6):
        (tmp_path / "direct_attributes" / f"sa_{i}.jpg").write_bytes(_jpeg())
        (tmp_path / "direct_attributes" / f"sa_{i}.json").write_text(json.dumps(
            {"question": f"What is the colour of the cup {i}?", "options": ["red", "blue", "green", "white"],
             "bbox": [[2, 3, 10, 5]], "target_object": ["cup"]}))
    (tmp_path / "relative_position" / "sa_9.json").write_text(json.dumps({"question": "Left?", "options": ["a", "b"]}))
    (tmp_path / "relative_position" / "sa_8.png").write_bytes(_jpeg())
    (tmp_path / "relative_position" / "sa_8.json").write_text("{broken")
    questions, problems = read_benchmark(str(tmp_path), "vstar")
    assert len(questions) == 6
    for q in questions:
        assert q.options[ord(q.answer) - ord("A")] == "red" and q.boxes == [[2.0, 3.0, 12.0, 8.0]]
        assert q.category == "direct_attributes" and q.image.endswith(".jpg")
    assert len({q.answer for q in questions}) > 1  # not always (A)
    again, _ = read_benchmark(str(tmp_path), "vstar")
    assert [q.options for q in again] == [q.options for q in questions]  # the same order every run
    assert sorted(p.kind for p in problems) == ["bad_json", "image_decode"]


def test_vstar_lmms_rows_with_inline_options_jsonl_and_parquet(tmp_path):
    text = "Is the cup on the left or right of the man?\n(A) left\n(B) right\nAnswer with the option's letter."
    rows = [{"image": "a.jpg", "text": text, "label": "B", "category": "relative_position", "question_id": 7},
            {"image": "a.jpg", "text": "No options here", "label": "A", "category": "direct_attributes"}]
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    _jsonl(tmp_path / "vstar.jsonl", rows)
    questions, problems = read_benchmark(str(tmp_path / "vstar.jsonl"), "vstar_lmms")
    assert len(questions) == 1 and problems[0].kind == "bad_options" and problems[0].where == "vstar.jsonl:2"
    q = questions[0]
    assert (q.qid, q.question, q.options, q.answer) == ("7", "Is the cup on the left or right of the man?",
                                                        ["left", "right"], "B")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pyarrow.Table.from_pylist([{**rows[0], "image": {"bytes": _jpeg(), "path": "x.jpg"}}])
    pq.write_table(table, tmp_path / "vstar.parquet")
    (from_parquet,), problems = read_benchmark(str(tmp_path / "vstar.parquet"), "vstar_lmms")
    assert isinstance(from_parquet.image, bytes) and from_parquet.answer == "B" and not problems


def test_inline_options_keep_the_question_and_drop_a_trailing_instruction():
    assert split_inline_options("Q? (A) red (B) dark blue") == ("Q?", ["red", "dark blue"])
    assert split_inline_options("Q?\n(A) a\n(B) b\nAnswer now.") == ("Q?", ["a", "b"])


@pytest.mark.parametrize(("text", "letter"), [
    ("B", "B"), ("(C)", "C"), ("B. white", "B"), ("  a", None), ("The answer is C.", "C"),
    ("Answer: (B) white", "B"), ("I think (D) is right", "D"), ("It is cyan.", "D"),
    ("dark red", "C"), ("A red sign", "B"), ("A cat.", None), ("Option A is right", "A"), ("E", None), ("", None), ("no idea", None),
    ("either A or B", None), ("The colour is B", "B"),
])
def test_letters_are_extracted_from_free_text(text, letter):
    assert extract_letter(text, ["black", "red", "dark red", "cyan"]) == letter


def test_prompt_text_matches_the_training_questions_format():
    q = Question("q", "4kpro", "x", "What colour is the dot on the red sign?", ["black", "white"], "A", "mark")
    assert prompt_text(q, "Answer with the option's letter.") == (
        "What colour is the dot on the red sign?\n(A) black\n(B) white\nAnswer with the option's letter.")


def test_scores_split_by_category_and_bucket():
    def q(category, bucket, answer="A"):
        return Question("q", "4kpro", "x", "Q", ["a", "b"], answer, category, bucket)

    result = score([(q("ui", "4K"), "A"), (q("ui", "2K"), "B"), (q("gaming", "4K"), None), (q("gaming", "4K"), "A")])
    assert (result["accuracy"], result["n"], result["correct"], result["no_letter"]) == (0.5, 4, 2, 1)
    assert result["per_category"] == {"gaming": {"accuracy": 0.5, "n": 2}, "ui": {"accuracy": 0.5, "n": 2}}
    assert result["per_bucket"] == {"2K": {"accuracy": 0.0, "n": 1}, "4K": {"accuracy": 0.6667, "n": 3}}
