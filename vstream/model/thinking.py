"""The thinking format: reasoning inside `<think> ... </think>`, the answer after it.

GLM-4.1V-Thinking writes its answer as `<answer> ... <|begin_of_box|>X<|end_of_box|> ... </answer>`
and ends its turn with `<|user|>`; those markers are read the same way.

One home for the markers and for reading the answer back, so every consumer (live worker,
evaluation, UI, TaYS protocol and training) splits a trace the same way.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
END_OF_STEP = "<|eot|>"  # closes one reasoning step in the TaYS streaming format
END_OF_TURN = "<|im_end|>"
END_OF_TURN_MARKERS = (END_OF_TURN, "<|user|>", "<|endoftext|>", "<|observation|>")
ANSWER_MARKERS = ("<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>")


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a generated text.

    The answer is what follows the last `</think>` (what the model finally committed to), up to
    an end-of-turn marker; the reasoning is everything before it, markers removed. A text that
    opened `<think>` but never closed it is all reasoning; a text with no marker at all (a
    model that does not think) is all answer.
    """
    head, close, tail = text.rpartition(THINK_CLOSE)
    if not close:
        if THINK_OPEN in text:
            return _strip_markers(text), ""
        return "", _answer(tail)
    return _strip_markers(head), _answer(tail)


def _answer(tail: str) -> str:
    """The answer text up to the end of the turn, its answer/box markers removed."""
    cut = min((i for i in (tail.find(m) for m in END_OF_TURN_MARKERS) if i >= 0), default=len(tail))
    tail = tail[:cut]
    for m in ANSWER_MARKERS:
        tail = tail.replace(m, "")
    return tail.strip()


def _strip_markers(text: str) -> str:
    return text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, spaces collapsed: the form answers are compared in."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", str(text).lower()).split())
