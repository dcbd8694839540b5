"""--data: the user's own rows in every format, bad rows counted not fatal, runs resumable.

Small sample sets are written here in each format the commands take (JSONL, CSV, a datasets
`save_to_disk` folder, an image folder with metadata.jsonl), each with good rows and bad ones (no
question, a missing image, an unreadable image, a line that is not JSON). The end-to-end tests run
collect -> train-estimator -> evaluate, and eval-model, through their command lines on a tiny
random Qwen2.5-VL.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vstream.attr.answers import answer_matches
from vstream.attr.labels import load_labels
from vstream.attr.userdata import read_data
from vstream.model import VLMError

FORMATS = ["jsonl", "csv", "datasets", "imagefolder"]
GOOD = [
    {"image": "img/a.png", "question": "What is in the image?", "answer": "red", "family": "color"},
    {"image": "img/b.png", "question": "How many objects are there?", "answer": "3", "family": "count"},
    {"image": "img/c.png", "question": "Describe the picture.", "family": "open"},
]
BAD = [
    {"image": "img/missing.png", "question": "Where is it?"},  # the image does not exist
    {"image": "img/a.png", "question": ""},  # no question
    {"image": "img/broken.png", "question": "What color is it?", "answer": "blue"},  # not an image
]


def _images(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate("abc"):
        arr = np.random.default_rng(i).integers(0, 256, (90 + 10 * i, 110, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{name}.png")
    (root / "img" / "broken.png").write_bytes(b"not a png at all")


def write_sample(root: Path, fmt: str) -> Path:
    """A sample data set in `fmt` under `root`; rows: GOOD + BAD (+ one non-JSON line for jsonl)."""
    _images(root)
    rows = GOOD + BAD
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows[:3]] + ["{this is not json"] + [json.dumps(r) for r in rows[3:]]
        (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
        return root / "rows.jsonl"
    if fmt == "csv":
        with (root / "rows.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "question", "answer", "family"])
            w.writeheader()
            w.writerows(rows)
        return root / "rows.csv"
    if fmt == "imagefolder":
        folder = root / "img"
        meta = [{**{k: v for k, v in r.items() if k != "image"}, "file_name": Path(r["image"]).name} for r in rows]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
        return folder
    import datasets

    def image(r):  # stored inside the Arrow file, as save_to_disk does with an Image feature
        p = root / r["image"]
        return {"bytes": p.read_bytes(), "path": None} if p.is_file() else None

    ds = datasets.Dataset.from_dict(
        {
            "image": [image(r) for r in rows],
            "question": [r["question"] for r in rows],
            "answer": [r.get("answer") for r in rows],
            "family": [r.get("family", "") for r in rows],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "family": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "ds"))
    return root / "ds"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_good_rows_and_counts_bad_ones(tmp_path, fmt):
    src = read_data(write_sample(tmp_path, fmt))
    assert src.kind == fmt
    # read time catches a missing question and a missing image (and a non-JSON line)
    questions = [r.question for r in src.rows]
    assert questions[:3] == [g["question"] for g in GOOD]
    assert [r.answer for r in src.rows[:3]] == ["red", "3", None]
    assert [r.family for r in src.rows[:3]] == ["color", "count", "open"]
    whys = " | ".join(s["why"] for s in src.skipped)
    assert "no question" in whys
    assert ("not found" in whys) or ("no image" in whys)
    assert len(src.skipped) == (3 if fmt == "jsonl" else 2)
    if fmt == "jsonl":
        assert "not JSON" in whys
    # the good rows' images open; the broken one is only found when used, with its row number
    assert src.rows[0].image().mode == "RGB" and src.rows[2].image().size == (110, 110)
    broken = src.rows[-1]
    with pytest.raises(VLMError, match=f"row {broken.index}"):
        broken.image()


def test_bad_paths_are_one_line_errors(tmp_path):
    for bad, why in [
        (tmp_path / "nope.jsonl", "does not exist"),
        (tmp_path, "neither a datasets"),
    ]:
        with pytest.raises(VLMError, match=why):
            read_data(bad)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(VLMError, match="unknown data format"):
        read_data(tmp_path / "x.parquet")
    (tmp_path / "empty.jsonl").write_text("\n{oops\n")
    with pytest.raises(VLMError, match="no usable rows"):
        read_data(tmp_path / "empty.jsonl")


def test_answer_matching():
    assert answer_matches("Red.", "red")
    assert answer_matches("It is red", "red") and not answer_matches("reddish", "red")
    assert not answer_matches("anything", "")


def _run(module, argv: list[str], capsys) -> dict:
    import importlib

    rc = importlib.import_module(f"vstream.cli.{module}").main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return json.loads(out.out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_collect_train_evaluate_end_to_end(tmp_path, fmt, tiny_qwen2_5_vl_dir, capsys):
    data = str(write_sample(tmp_path, fmt))
    model, labels, est = str(tiny_qwen2_5_vl_dir), tmp_path / "labels", tmp_path / "est.safetensors"
    common = ["--model", model, "--data", data, "--out", str(labels), "--masks", "4", "--max-new-tokens", "10"]
    first = _run("collect", common + ["--shard-size", "2"], capsys)
    src = read_data(data)
    assert first["bad_rows"] == len(src.skipped)
    cfg, exs = load_labels(labels)
    assert cfg["split"] == src.name and first["examples"] == len(exs) >= 2
    sides = [json.loads(p.read_text()) for p in labels.glob("labels-*.json")]
    skipped = {s["index"]: s["why"] for side in sides for s in side["skipped"]}
    # every usable row is labelled or skipped with a reason (a random model may write an image
    # placeholder, which cannot be teacher-forced); the unreadable image is one of the skipped
    assert sorted([e.index for e in exs] + list(skipped)) == [r.index for r in src.rows]
    assert "could not read image" in skipped[src.rows[-1].index]
    assert {e.question for e in exs} <= {g["question"] for g in GOOD}
    again = _run("collect", common, capsys)  # resumed: nothing redone
    assert again["this_process"]["new_examples"] == 0 and again["examples"] == len(exs)

    rep = _run(
        "train_estimator",
        ["--labels", str(labels), "--out", str(est), "--epochs", "5", "--val-fraction", "0.34"],
        capsys,
    )
    assert rep
    res = _run(
        "evaluate",
        ["--model", model, "--estimator", str(est), "--data", data, "--masks", "4", "--max-new-tokens", "10", "--json"],
        capsys,
    )
    assert res["n"] == 4 and res["n_examples_bad_image"] == 1 and res["split"].startswith("data:")
    assert res["n_spans"] > 0
    assert res["lds"]["vstream"] is not None and res["pointing"]["vstream"] is None


@pytest.mark.slow
def test_eval_model_on_data_resumes(tmp_path, tiny_qwen2_5_vl_dir, capsys):
    data = str(write_sample(tmp_path, "jsonl"))
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(tiny_qwen2_5_vl_dir), "--data", data, "--out", str(out), "--max-new-tokens", "6"]
    res = _run("eval_model", argv, capsys)
    assert res["n"] == 2 and res["n_without_answer"] == 1 and res["n_bad_image"] == 1 and res["n_bad_rows"] == 3
    assert res["accuracy"] is not None and len(out.read_text().splitlines()) == 2
    again = _run("eval_model", argv, capsys)
    assert again["n_resumed"] == 2 and len(out.read_text().splitlines()) == 2
