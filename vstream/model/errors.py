"""The adapter's one exception type."""

from __future__ import annotations

from typing import Any


class VLMError(Exception):
    """Bad input for the VLM adapter (path, model, image). The message is always one line,
    because it is shown verbatim in the UI."""

    def __init__(self, message: Any):
        super().__init__(" ".join(str(message).split()))
