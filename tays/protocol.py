"""How a model is prompted and expected to reason over a stream.

The chat layout every paradigm and the training share (`chat_ids`): the user turn (system +
question, no video placeholder) is the prompt; the generation prompt ("<|im_start|>assistant\\n" +
assistant prefix) is the header that decoding feeds first. Frames sit between the two.

A checkpoint trained by `tays.train` closes every reasoning step with ``<|eot|>``, opens the
answer with ``</think>`` and says so in its training.json ("format"); it must be run with the
same protocol it was trained and evaluated with (`tays.evaluate`). Any other model (the image
demo model, a Hugging Face VLM) keeps `run_paradigm`'s defaults: a sentence end closes a step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vstream.model import THINK_CLOSE, THINK_OPEN, VLM

if TYPE_CHECKING:  # annotation only: importing transformers costs seconds at start-up
    from transformers import PreTrainedTokenizerBase

__all__ = ["PARADIGMS", "TRAINED", "chat_ids", "chat_template_ids", "run_options"]

# the three ways of reasoning over a stream, trained (tays.train) and run (tays.paradigms) alike
PARADIGMS = ("batch", "interleaved", "tays")


# the SFT protocol of `tays.train` (its assistant and answer prefixes), and the
# step and answer lengths `python -m tays evaluate` runs it with
TRAINED: dict[str, Any] = {
    "assistant_prefix": THINK_OPEN,
    "answer_prefix": THINK_CLOSE,
    "period_ends_step": False,
    "step_tokens": 24,
    "answer_tokens": 6,
}


def chat_template_ids(
    tok: PreTrainedTokenizerBase, question: str, system: str | None = None, assistant_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """(user-turn ids, assistant-header ids) from the tokenizer's chat template."""
    msgs: list[dict[str, Any]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": [{"type": "text", "text": question}]})
    base = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    full = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + assistant_prefix
    if not full.startswith(base):
        raise ValueError("the chat template's generation prompt does not extend the user turn")

    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"] if s else []

    return enc(base), enc(full[len(base) :])


def chat_ids(
    vlm: VLM, question: str, system: str | None = None, assistant_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """`chat_template_ids` with `vlm`'s tokenizer."""
    return chat_template_ids(vlm.tokenizer, question, system, assistant_prefix)


def run_options(vlm: VLM) -> dict[str, Any]:
    """`run_paradigm` keyword options for `vlm`: TRAINED when the folder it was loaded from has
    a training.json with a "format" section (a `tays.train` checkpoint), else {} (defaults)."""
    meta_file = Path(vlm.path) / "training.json" if vlm.path else None
    if meta_file is None or not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {}
    return dict(TRAINED) if isinstance(meta, dict) and isinstance(meta.get("format"), dict) else {}
