"""Find the estimator that fits the loaded model in a folder of estimators (`--estimators DIR`).

An estimator is trained on one model's attention, so it only means something for that model.
Each estimator records the identity of its model (`vstream.model.model_identity`: name,
architecture, sizes, a fingerprint of the weights). Among the `.safetensors` estimators in the
folders, one fits when it has the model's layer and head count and either the same weights
fingerprint (best) or, for estimators without one, the same model name and architecture; the
newest such wins. When none fits, the note says so and gives the exact commands that train one
for this model on the user's own data.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vstream.attr.estimator import LinearEstimator, load
from vstream.model import VLM, VLMError, model_identity

__all__ = ["Lookup", "find_estimator", "train_commands"]


@dataclass
class Lookup:
    """The estimator chosen (None when none fits), its file, and a note saying which or why none."""

    estimator: LinearEstimator | None
    path: Path | None
    note: str
    considered: list[tuple[str, str]] = field(default_factory=list)  # (file, why it did or did not fit)


def train_commands(vlm: VLM, model_arg: str | None = None, out_dir: str | Path = "estimators") -> list[str]:
    """The commands that collect labels for this model on the user's rows and train its estimator."""
    ident = model_identity(vlm)
    model = model_arg or (str(vlm.path) if vlm.path is not None else ident["model"])
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in ident["model"].split("/")[-1]) or "model"
    labels, out = f"runs/labels-{slug}", shlex.quote(str(Path(out_dir) / f"{slug}.safetensors"))
    return [
        f"python -m vstream collect --model {shlex.quote(model)} --data YOUR_ROWS.jsonl --out {labels}",
        f"python -m vstream train-estimator --labels {labels} --out {out}",
    ]


def _score(est: LinearEstimator, ident: dict) -> tuple[int, str]:
    meta = est.meta
    mine = f"{meta.get('model', '?')!r} ({meta.get('model_type', '?')})"
    if (est.num_layers, est.num_heads) != (ident["num_layers"], ident["num_heads"]):
        return 0, f"trained for {mine} with {est.num_layers} layers x {est.num_heads} heads"
    if meta.get("weights") and meta["weights"] == ident["weights"]:
        return 3, f"trained for these weights ({ident['weights']})"
    same_name = (
        meta.get("model") == ident["model"] and meta.get("model_type", ident["model_type"]) == ident["model_type"]
    )
    if same_name and not meta.get("weights"):
        return 2, f"trained for {mine} (no weights fingerprint recorded)"
    if same_name:
        return 0, f"trained for {mine} but other weights ({meta['weights']}, loaded {ident['weights']})"
    return 0, f"trained for another model, {mine}"


def find_estimator(vlm: VLM, dirs: str | Path | Iterable[str | Path], model_arg: str | None = None) -> Lookup:
    """Search `dirs` (folders or files) for the estimator that fits `vlm` (see the module doc)."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    dirs = [Path(d).expanduser() for d in dirs]
    ident = model_identity(vlm)
    files: list[Path] = []
    for d in dirs:
        if d.is_file():
            files.append(d)
        elif d.is_dir():
            files += sorted(d.glob("*.safetensors"))
    best: tuple[int, str, Path, LinearEstimator] | None = None
    considered: list[tuple[str, str]] = []
    for f in files:
        try:
            est = load(f)
        except VLMError as e:
            considered.append((f.name, f"not usable: {e}"))
            continue
        score, why = _score(est, ident)
        considered.append((f.name, why))
        key = (score, str(est.meta.get("created", "")))
        if score and (best is None or key > (best[0], best[1])):
            best = (score, key[1], f, est)
    if best is not None:
        _, _, path, est = best
        return Lookup(est, path, f"estimator: {path.name}, {dict(considered)[path.name]}", considered)
    where = ", ".join(str(d) for d in dirs)
    seen = f"{len(files)} estimator file(s) there" if files else "no estimator files there"
    cmds = train_commands(vlm, model_arg, dirs[0] if dirs and dirs[0].is_dir() else "estimators")
    note = (
        f"no estimator in {where} fits {ident['model']!r} ({ident['model_type']}, {ident['num_layers']} layers x "
        f"{ident['num_heads']} heads, weights {ident['weights']}; {seen}). Train one on your data: " + " && ".join(cmds)
    )
    return Lookup(None, None, note, considered)
