"""Evaluate a model on held-out shapes-world scenes.

    python -m vstream eval-model --json            # the shipped demo model, 600 scenes
    python -m vstream eval-model --split val --model DIR   # validation scenes, to choose a recipe

Scenes come from one split only: held-out (`shapes.scenes("heldout", ...)`, the reported figures)
or, with --split val, validation (for choosing a recipe without looking at held-out). A model whose
training record claims seeds from the chosen split is refused. The last output line is JSON.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vstream.model import THINK_CLOSE, THINK_OPEN, VLM, VLMError, normalize_answer, split_thinking
from vstream.world.demo_model import Collator
from vstream.world.shapes import FAMILIES, SHORT_FAMILIES, SPLITS, Scene, scenes

SENTENCE = re.compile(r"[.!?](?!\d)")  # a sentence end, as the live span splitter cuts them


def count_spans(text: str) -> int:
    """Thinking sentences in a generated text (what the live pipeline attributes one by one)."""
    thinking = split_thinking(text)[0] if THINK_CLOSE in text else text
    thinking = thinking.replace(THINK_OPEN, " ")
    return sum(1 for part in SENTENCE.split(thinking) if part.strip())


def parse_answer(text: str) -> str:
    """The normalised answer after `</think>`; '' if thinking never ended."""
    if THINK_CLOSE not in text:
        return ""
    return normalize_answer(split_thinking(text)[1])


def check_heldout(model_dir: Path, split: str = "heldout") -> None:
    """Refuse a checkpoint whose training.json says it was trained on seeds of `split`."""
    record = model_dir / "training.json"
    if not record.exists():
        return
    lo, hi = json.loads(record.read_text()).get("train_seeds", [0, 0])
    r = SPLITS[split]
    if hi > r.start and lo < r.stop:
        name = {"heldout": "held-out", "val": "validation"}.get(split, split)
        raise VLMError(f"{model_dir} was trained on seeds {lo}..{hi}, which overlap the {name} split")


@torch.inference_mode()
def generate_batch(vlm: VLM, batch: list[Scene], max_new_tokens: int = 192) -> list[str]:
    col = Collator(vlm.tokenizer, vlm.image_processor, padding_side="left")
    inputs = {k: v.to(vlm.device) for k, v in col(batch, with_targets=False).items()}
    out = vlm.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=vlm.tokenizer.pad_token_id,
        eos_token_id=vlm.tokenizer.eos_token_id,
    )
    new = out[:, inputs["input_ids"].shape[1] :]
    return [vlm.tokenizer.decode(row, skip_special_tokens=False).replace("<|endoftext|>", "") for row in new]


def evaluate(
    vlm: VLM, n: int = 600, start: int = 0, batch_size: int = 50, progress: bool = True, split: str = "heldout"
) -> dict:
    items = scenes(split, start, n)
    per_family: dict[str, list[bool]] = defaultdict(list)
    per_kind: dict[str, list[bool]] = defaultdict(list)
    spans: dict[str, list[int]] = defaultdict(list)
    wrong: Counter = Counter()
    examples: list[dict] = []
    t0 = time.time()
    for i in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, file=sys.stderr):
        batch = items[i : i + batch_size]
        for s, text in zip(batch, generate_batch(vlm, batch)):
            pred = parse_answer(text)
            ok = pred == s.answer
            per_family[s.family].append(ok)
            spans[s.family].append(count_spans(text))
            per_kind[f"{s.family}/{s.kind}"].append(ok)
            if not ok:
                wrong[(s.family, s.answer, pred)] += 1
                if len(examples) < 12:
                    examples.append({"seed": s.seed, "question": s.question, "truth": s.trace, "output": text})
    acc = lambda xs: round(sum(xs) / max(1, len(xs)), 4)  # noqa: E731
    return {
        "accuracy": acc([x for v in per_family.values() for x in v]),
        "per_family": {f: acc(per_family[f]) for f in FAMILIES if f in per_family},
        "short_families_mean": acc([acc(per_family[f]) for f in SHORT_FAMILIES if f in per_family]),
        "spans_per_family": {f: round(sum(spans[f]) / len(spans[f]), 2) for f in FAMILIES if f in spans},
        "per_kind": {k: acc(v) for k, v in sorted(per_kind.items())},
        "n": n,
        "split": split,
        "seeds": [SPLITS[split][start], SPLITS[split][start + n - 1]],
        "seconds": round(time.time() - t0, 1),
        "top_confusions": [
            {"family": f, "truth": t, "predicted": p, "count": c} for (f, t, p), c in wrong.most_common(8)
        ],
        "failed_examples": examples,
    }
