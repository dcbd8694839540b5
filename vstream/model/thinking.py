"""The thinking format: reasoning inside `<think> ... </think>`, the answer after it.

One home for the markers and for reading the answer back, so every consumer (live worker,
evaluation, UI, TaYS protocol and training) splits a trace the same way.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
END_OF_STEP = "<|eot|>"  # closes one reasoning step in the TaYS streaming format
END_OF_TURN = "<|im_end|>"


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
        return "", tail.split(END_OF_TURN)[0].strip()
    return _strip_markers(head), tail.split(END_OF_TURN)[0].strip()


def _strip_markers(text: str) -> str:
    return text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, spaces collapsed: the form answers are compared in."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", str(text).lower()).split())
