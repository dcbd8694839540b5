"""Shapes-world samples (PNG scenes, MP4 streams) in examples/ for the gallery: render and list them.

python -m vstream render-examples --per-family 3 --streams 2
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vstream.model import normalize_answer
from vstream.world.assets import EXAMPLES_DIR
from vstream.world.shapes import FAMILIES, scenes
from vstream.world.shapes_video import streams


def render_examples(out: Path = EXAMPLES_DIR, per_family: int = 3, n_streams: int = 2, fps: int = 10) -> dict:
    """Write `per_family` held-out scenes of every family and `n_streams` streams; return the index."""
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"scenes": [], "streams": []}
    pool = scenes("heldout", 10_000, per_family * len(FAMILIES) * 2)
    for fam in FAMILIES:
        for s in [s for s in pool if s.family == fam][:per_family]:
            name = f"{fam}_{s.seed}.png"
            s.image().save(out / name)
            index["scenes"].append({"file": name} | s.to_dict())
    for st in streams("heldout", 10_000, n_streams):
        name = f"stream_{st.seed}.mp4"
        st.to_mp4(out / name, fps=fps)
        index["streams"].append({"file": name} | st.to_dict())
    old = out / "index.json"
    if old.exists():  # drop what an earlier render listed and this one does not
        keep = {e["file"] for e in index["scenes"] + index["streams"]}
        before = json.loads(old.read_text())
        for e in [*before.get("scenes", []), *before.get("streams", [])]:
            if e["file"] not in keep and (out / Path(e["file"]).name).is_file():
                (out / Path(e["file"]).name).unlink()
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def scene_examples() -> list[list[str]]:
    """[[image path, question, ground truth], ...] from examples/index.json (shapes-world scenes);
    the truth reads "answer · family" so the gallery shows it before anything runs."""
    return [
        [str(EXAMPLES_DIR / s["file"]), s["question"], f"{s['answer']} · {s['family']}"]
        for s in _index().get("scenes", [])
    ]


def example_truth(image: Image.Image, question: str) -> dict | None:
    """The gallery scene this (image, question) pair is, if any: its index entry (answer,
    family, trace, ...). Matched on the question and the pixels, so a copy the browser uploaded
    back is still recognised; None for anything else."""
    want = np.asarray(image.convert("RGB"))
    for s in _index().get("scenes", []):
        if s["question"].strip() != question.strip():
            continue
        path = EXAMPLES_DIR / s["file"]
        if not path.is_file():
            continue
        with Image.open(path) as im:
            have = np.asarray(im.convert("RGB"))
        if have.shape == want.shape and np.array_equal(have, want):
            return s
    return None


def answer_verdict(truth: dict, answer: str) -> str:
    """One line comparing the model's answer with an example's ground truth."""
    ok = normalize_answer(answer) == normalize_answer(truth["answer"])
    return f"{'✓ right' if ok else '✗ wrong'}: ground truth {truth['answer']!r}, model {answer.strip()!r}"


def stream_examples() -> list[list[str]]:
    """[[video path, question], ...] from examples/index.json (shapes-world streams)."""
    return [
        [str(EXAMPLES_DIR / s["file"]), s["question"]]
        for s in _index().get("streams", [])
        if (EXAMPLES_DIR / s["file"]).is_file()
    ]


def _index() -> dict:
    """examples/index.json as `render_examples` wrote it ({} before anything was rendered)."""
    index = EXAMPLES_DIR / "index.json"
    return json.loads(index.read_text()) if index.exists() else {}
