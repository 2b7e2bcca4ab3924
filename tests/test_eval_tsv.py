"""MMBench-style TSV evaluation: answer extraction, scoring, TSV reading, the shapes TSV and `openspeed eval`."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _runs import untrained_run_dir
from PIL import Image

from openspeed.data.shapes import answer_choices, make_shapes_dataset, write_shapes_tsv
from openspeed.errors import DataError
from openspeed.eval.tsv import (
    CHOICE_INSTRUCTION,
    TsvRow,
    build_prompt,
    extract_choice,
    judge,
    load_row_image,
    read_tsv,
    run_tsv_eval,
    summarize,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "image_path"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B) green", "B"),
        ("B. green", "B"),
        ("C: blue", "C"),
        ("B green", "B"),  # a bare letter is read when the rest is that option's text
        ("The answer is B", "B"),
        ("Answer: (D)", "D"),
        ("The correct option is C.", "C"),
        ("green", "B"),  # the text of exactly one option
        ("Yellow.", "D"),
        ("Blue", "C"),  # a word starting with an option letter is not that letter
        ("It is red", "A"),  # one option's text inside the reply
        ("A blue one", "C"),  # "A" as an article: the rest names blue
        ("E", None),  # not an option
        ("red or blue", None),  # two options named
        ("purple", None),
        ("", None),
        ("a", None),  # an article, not a capital letter
        ("the answer is a circle", None),
    ],
)
def test_extract_choice(reply, expected):
    assert extract_choice(reply, COLOURS) == expected


def _row(index, answer, category, options=None, row=1):
    return TsvRow(row=row, index=str(index), question="q?", answer=answer, category=category,
                  options=dict(options or {}))


def test_scoring_fixed_predictions():
    rows = [
        _row(1, "B", "colour", COLOURS),  # "B." -> right
        _row(2, "C", "colour", COLOURS),  # "blue" -> right
        _row(3, "A", "colour", COLOURS),  # "green" -> wrong (parsed)
        _row(4, "D", "colour", COLOURS),  # "no idea" -> wrong, unparseable
        _row(5, "A", "count", {"A": "one", "B": "two", "C": "three"}),  # "(A) one" -> right
        _row(6, "B", "count", {"A": "one", "B": "two", "C": "three"}),  # "one or two" -> unparseable
        _row(7, "top left", "position"),  # short answer "The top-left." -> right
        _row(8, "circle", "position"),  # short answer "square" -> wrong
    ]
    predictions = ["B.", "blue", "green", "no idea", "(A) one", "one or two", "The top-left.", "square"]
    judgements = [judge(r, p) for r, p in zip(rows, predictions)]
    assert [j["correct"] for j in judgements] == [True, True, False, False, True, False, True, False]
    assert [j["extracted"] for j in judgements] == ["B", "C", "B", None, "A", None, "top left", "square"]
    assert [j["parsed"] for j in judgements] == [True, True, True, False, True, False, True, True]

    scores = summarize(judgements, rows)
    assert (scores["correct"], scores["n"], scores["unparseable"]) == (4, 8, 2)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["per_category"] == {
        "colour": {"accuracy": 0.5, "correct": 2, "n": 4, "unparseable": 1},
        "count": {"accuracy": 0.5, "correct": 1, "n": 2, "unparseable": 1},
        "position": {"accuracy": 0.5, "correct": 1, "n": 2, "unparseable": 0},
    }
    assert (scores["multiple_choice"], scores["short_answer"]) == (6, 2)
    # 4 rows of 4 options, 2 of 3, 2 short-answer rows that guessing never gets right.
    assert scores["random_choice_accuracy"] == pytest.approx((4 / 4 + 2 / 3) / 8)
    assert summarize([])["accuracy"] == 0.0


def test_prompts():
    row = TsvRow(row=1, index="1", question="What colour is it?", answer="B", hint="Look closely.",
                 options={"A": "red", "B": "green", "D": "yellow"})
    assert build_prompt(row) == ("Look closely.\nWhat colour is it?\nA. red\nB. green\nD. yellow\n"
                                 + CHOICE_INSTRUCTION)
    assert build_prompt(row, "question") == "What colour is it?"
    short = TsvRow(row=2, index="2", question="How many?", answer="two", hint="a hint")
    assert build_prompt(short) == "How many?"


def _png(colour, size=(28, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_tsv(path, rows, header=HEADER):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def test_read_tsv_images_options_and_malformed_rows(tmp_path):
    red, blue = _png((200, 0, 0)), _png((0, 0, 200), size=(30, 16))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "blue.png").write_bytes(blue)
    b64 = base64.b64encode(red).decode()
    rows = [
        # index, question, hint, A, B, C, D, answer, category, image, image_path
        [10, "What colour?\nLook at it.", "nan", "red", "blue", "", "", "A", "colour", b64, ""],
        [11, "Which shape?", "A hint", "circle", "square", "cross", "", "cross", "shape", "", "imgs/blue.png"],
        [12, "Same picture?", "", "yes", "no", "", "", "B", "", "10", ""],  # MMBench image reference
        [13, "How many?", "", "nan", "", "", "", "two", "count", "", "imgs/blue.png"],  # short answer
        [14, "Bad answer", "", "red", "blue", "", "", "C", "colour", b64, ""],
        [15, "Missing file", "", "red", "blue", "", "", "A", "colour", "", "imgs/none.png"],
        [16, "Bad base64", "", "red", "blue", "", "", "A", "colour", "not base64 at all!" * 5, ""],
        [17, "", "", "red", "blue", "", "", "A", "colour", b64, ""],
        [10, "Repeated index", "", "red", "blue", "", "", "A", "colour", b64, ""],
        [18, "Too few fields"],
        [19, "No image", "", "red", "blue", "", "", "A", "colour", "", ""],
        [20, "Dangling reference", "", "red", "blue", "", "", "A", "colour", "99", ""],
    ]
    path = tmp_path / "set.tsv"
    _write_tsv(path, rows)
    data = read_tsv(path)

    assert [r.index for r in data.rows] == ["10", "11", "12", "13"]
    first, second, third, short = data.rows
    assert first.question == "What colour?\nLook at it." and first.hint is None
    assert first.options == {"A": "red", "B": "blue"} and first.answer == "A" and first.category == "colour"
    assert second.answer == "C" and second.hint == "A hint"  # answer given as option text
    assert third.category == "all" and third.image_bytes == red
    assert not short.is_choice and short.answer == "two"
    assert np.array_equal(np.asarray(load_row_image(first)), np.asarray(Image.open(io.BytesIO(red))))
    assert np.array_equal(np.asarray(load_row_image(second)), np.asarray(Image.open(io.BytesIO(blue))))

    problems = {s.row: s.problem for s in data.skipped}
    assert sorted(problems) == [5, 6, 7, 8, 9, 10, 11, 12]
    assert "answer 'C' is not one of the options A, B" in problems[5]
    assert "image file not found" in problems[6]
    assert "not valid base64" in problems[7]
    assert problems[8] == "empty question"
    assert "repeats" in problems[9]
    assert problems[10] == "has 2 fields, the header has 11"
    assert "no image" in problems[11]
    assert "names no row" in problems[12]
    assert data.skipped[0].describe() == "row 5 (index 14): answer 'C' is not one of the options A, B"


def test_read_tsv_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_tsv(tmp_path / "missing.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_tsv(empty)
    no_question = tmp_path / "noq.tsv"
    _write_tsv(no_question, [[1, "A", "x"]], header=["index", "answer", "image"])
    with pytest.raises(DataError, match="no 'question' column"):
        read_tsv(no_question)
    no_image = tmp_path / "noimg.tsv"
    _write_tsv(no_image, [[1, "q", "A"]], header=["index", "question", "answer"])
    with pytest.raises(DataError, match="neither an 'image'"):
        read_tsv(no_image)
    binary = tmp_path / "bin.tsv"
    binary.write_bytes(b"index\tquestion\n\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8") as info:
        read_tsv(binary)
    assert "\n" not in str(info.value)


def test_shapes_tsv_round_trip(tmp_path):
    info = make_shapes_dataset(tmp_path / "a", num=40, seed=3)
    again = make_shapes_dataset(tmp_path / "b", num=40, seed=3)
    assert info["eval_tsv"].read_bytes() == again["eval_tsv"].read_bytes()
    val = [json.loads(line) for line in info["val"].read_text().splitlines()]
    data = read_tsv(info["eval_tsv"])
    assert data.skipped == [] and len(data.rows) == len(val) == info["num_val"] == 4
    choices = answer_choices(grid_size=2, max_shapes=3)
    for row, rec in zip(data.rows, val, strict=True):
        assert row.index == str(int(rec["id"].split("-")[-1]))
        assert row.question == rec["messages"][0]["content"].replace("<image>", "")
        assert row.category == rec["qtype"] and row.hint is None
        assert list(row.options) == ["A", "B", "C", "D"]
        assert row.options[row.answer] == rec["answer"]
        assert len(set(row.options.values())) == 4 and set(row.options.values()) <= set(choices[rec["qtype"]])
        assert row.image_bytes == (info["root"] / rec["images"][0]).read_bytes()

    # Over many records the right option lands on every letter.
    records = [json.loads(line) for line in info["train"].read_text().splitlines()]
    write_shapes_tsv(records, info["root"], tmp_path / "all.tsv", seed=3)
    letters = [row.answer for row in read_tsv(tmp_path / "all.tsv").rows]
    assert len(letters) == 36 and set(letters) == {"A", "B", "C", "D"}


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A run dir over a small shapes set with a random-init model saved as a step-1 DCP checkpoint."""
    return untrained_run_dir(tmp_path_factory.mktemp("evalrun"), num=60, rope_theta=10.0)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openspeed", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_openspeed_eval_end_to_end(untrained_run, tmp_path):
    from openspeed.data.collator import VLCollator
    from openspeed.inference.generate import build_prompt_sample, greedy_generate
    from openspeed.training.run_loading import load_trained_model

    info, run_dir = untrained_run
    tsv = tmp_path / "eval.tsv"
    lines = info["eval_tsv"].read_text().splitlines()
    # The shapes rows, one malformed row, and the first row again as a short-answer question.
    header, rows = lines[0], [line.split("\t") for line in lines[1:]]
    assert len(rows) == 6
    malformed = ["900", "Where?", "", "red", "blue", "", "", "Z", "colour", rows[0][-1]]
    short = ["901", rows[0][1], "", "", "", "", "", "anything", "short", rows[0][-1]]
    body = rows[:2] + [malformed] + rows[2:] + [short]
    tsv.write_text("\n".join([header, *("\t".join(r) for r in body)]) + "\n")

    out = tmp_path / "out"
    result = _cli("eval", "--checkpoint", str(run_dir), "--data", str(tsv), "--out", str(out),
                  "--batch-size", "3", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped row 3 (index 900): answer 'Z' is not one of the options A, B" in result.stderr

    summary = json.loads((out / "results.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == len(predictions) == 7 and summary["step"] == 1
    assert (summary["multiple_choice"], summary["short_answer"]) == (6, 1)
    assert summary["skipped"] == 1 and summary["skipped_rows"][0]["row"] == 3
    assert [p["index"] for p in predictions] == [r[0] for r in rows] + ["901"]
    assert summary["correct"] == sum(p["correct"] for p in predictions)
    assert summary["unparseable"] == sum(not p["parsed"] for p in predictions)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / 7)
    assert sum(c["n"] for c in summary["per_category"].values()) == 7
    assert f"accuracy: {summary['accuracy']:.3f} ({summary['correct']}/7" in result.stdout

    # Each batched answer equals the answer to that prompt alone, and is scored as judge() scores it.
    model, processor, _, _ = load_trained_model(str(run_dir))
    collate = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)
    data = read_tsv(tsv)
    for row, pred in zip(data.rows, predictions, strict=True):
        sample = build_prompt_sample(processor, [{"role": "user", "content": "<image>" + build_prompt(row)}],
                                     [load_row_image(row)])
        tokens = greedy_generate(model, collate([sample]), 4, processor.eos_token_id, processor.pad_token_id)[0]
        assert pred["prediction"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert pred == judge(row, pred["prediction"])

    # limit keeps the first usable rows (and the skipped rows before them); "question" prompts.
    limited = run_tsv_eval(str(run_dir), str(tsv), str(tmp_path / "lim"), limit=2, max_new_tokens=4,
                           prompt_style="question", progress=False)
    assert limited["n"] == 2 and limited["skipped_rows"] == []
    assert json.loads((tmp_path / "lim" / "results.json").read_text())["prompt"] == "question"
    for row, pred in zip(data.rows[:2], limited["predictions"], strict=True):
        sample = build_prompt_sample(processor, [{"role": "user", "content": "<image>" + row.question}],
                                     [load_row_image(row)])
        tokens = greedy_generate(model, collate([sample]), 4, processor.eos_token_id, processor.pad_token_id)[0]
        assert pred["prediction"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    # User errors are one line with exit status 2.
    for bad in (["--data", str(tmp_path / "none.tsv")], ["--data", str(tsv), "--limit", "0"]):
        failed = _cli("eval", "--checkpoint", str(run_dir), *bad)
        assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: ")
