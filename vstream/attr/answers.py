"""Answer accuracy of a model on the user's own rows (eval-model --data).

    python -m vstream eval-model --model Qwen/Qwen3-VL-8B-Thinking --data my/rows.csv --out runs/answers.jsonl

Each row with an `answer` is asked greedily; the model's answer (after its thinking, as
`split_thinking` reads it) counts as right when its normalised form equals the row's, or when
the row's normalised answer appears in it as whole words. With `--out`, one JSON line per row
is appended as it is done, and rows already there are not asked again (resume). A row whose
image cannot be used is counted and skipped.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vstream.attr.userdata import DataSource
from vstream.model import VLM, VLMError, normalize_answer, split_thinking

__all__ = ["answer_matches", "evaluate_answers"]


def answer_matches(predicted: str, truth: str) -> bool:
    """Normalised equality, or the truth as whole words inside a longer answer."""
    p, t = normalize_answer(predicted), normalize_answer(truth)
    return bool(t) and (p == t or f" {t} " in f" {p} ")


def _done(out: Path | None) -> dict[int, dict[str, Any]]:
    if out is None or not out.is_file():
        return {}
    done = {}
    for line in out.read_text().splitlines():
        try:
            rec = json.loads(line)
            done[int(rec["index"])] = rec
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run: that row is asked again
    return done


def evaluate_answers(
    vlm: VLM,
    data: DataSource,
    n: int | None = None,
    start: int = 0,
    max_new_tokens: int = 512,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy over the rows [start, start + n) of `data` that have an answer (see the module doc)."""
    rows = data.rows[int(start) :] if n is None else data.rows[int(start) : int(start) + int(n)]
    out_path = Path(out) if out is not None else None
    done = _done(out_path)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    no_answer = bad = 0
    records: list[dict[str, Any]] = []
    for row in tqdm(rows, desc="eval-model", disable=not progress, file=sys.stderr):
        if row.answer is None:
            no_answer += 1
            continue
        if row.index in done:
            records.append(done[row.index])
            continue
        try:
            inputs = vlm.build_inputs(row.question, image=row.image())
        except VLMError as e:
            bad += 1
            print(f"row {row.index} skipped: {e}", file=sys.stderr)
            continue
        text = vlm.generate_text(inputs, max_new_tokens)
        pred = split_thinking(text)[1]
        rec = {
            "index": row.index,
            "family": row.family,
            "question": row.question,
            "truth": row.answer,
            "predicted": pred,
            "correct": answer_matches(pred, row.answer),
            "output": text,
        }
        records.append(rec)
        if out_path is not None:
            with out_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    per_family: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_family[r.get("family") or ""].append(bool(r["correct"]))
    acc = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "accuracy": acc([bool(r["correct"]) for r in records]),
        "per_family": {f: acc(v) for f, v in sorted(per_family.items())},
        "n": len(records),
        "n_resumed": sum(1 for r in rows if r.index in done and r.answer is not None),
        "n_without_answer": no_answer,
        "n_bad_image": bad,
        "n_bad_rows": len(data.skipped),
        "data": str(data.path),
        "data_format": data.kind,
        "seconds": round(time.time() - t0, 1),
        "failed_examples": [r for r in records if not r["correct"]][:12],
    }
