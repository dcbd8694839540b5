"""Shapes-world samples (PNG scenes, MP4 streams) in examples/ for the gallery: render and list them.

python -m vstream render-examples --per-family 3 --streams 2
"""

from __future__ import annotations

import json
from pathlib import Path

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
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def scene_examples() -> list[list[str]]:
    """[[image path, question], ...] from examples/index.json (shapes-world scenes)."""
    return [[str(EXAMPLES_DIR / s["file"]), s["question"]] for s in _index().get("scenes", [])]


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
