"""Generation plumbing shared by every decoding loop: streamer, stop criteria, incremental text."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


def token_streamer(on_tokens: Callable[[list[int]], Any]):
    """transformers streamer calling `on_tokens(new token ids)` synchronously inside generate();
    the prompt (generate's first put) is skipped, and the end is left to the caller, which
    signals it itself, also on errors."""
    # subclassed lazily so importing this module does not import the generation stack
    from transformers.generation.streamers import BaseStreamer

    class TokenStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            on_tokens(value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    return TokenStreamer()


def event_stop(*events: threading.Event | None):
    """StoppingCriteria that ends generation as soon as any of `events` is set."""
    from transformers import StoppingCriteria

    evs = [e for e in events if e is not None]

    class EventStop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs) -> torch.BoolTensor:
            stop = any(e.is_set() for e in evs)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return EventStop()


class IncrementalDecoder:
    """Decode token by token without splitting multi-byte characters.

    A token may end in the middle of a UTF-8 character (byte-level BPE); decoding it alone gives
    U+FFFD. We decode a short window and only emit text once it no longer ends in U+FFFD
    (the prefix/read offset scheme used by text-generation-inference), which is O(n) overall.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = lambda ids: self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        prefix_text = dec(self.ids[self.prefix : self.read])
        new_text = dec(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""
