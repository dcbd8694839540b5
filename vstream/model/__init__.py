"""The model adapter: the ground floor both libraries stand on.

Load a supported VLM (`load_vlm`), build its chat inputs with the position and pixel box of every
vision token (`VLM.build_inputs`), stream tokens (`VLM.stream`); every user-facing failure is a
one-line `VLMError`.
"""

from vstream.model.decoding import IncrementalDecoder, event_stop, token_streamer
from vstream.model.errors import VLMError
from vstream.model.identity import model_identity, model_name
from vstream.model.images import normalize_image, normalize_image_with_size
from vstream.model.inputs import VLMInputs
from vstream.model.loading import (
    LOAD_LOCK,
    load_vlm,
    read_model_config,
    resolve_device,
    resolve_model_path,
)
from vstream.model.thinking import (
    END_OF_STEP,
    THINK_CLOSE,
    THINK_OPEN,
    normalize_answer,
    split_thinking,
)
from vstream.model.vlm import SUPPORTED_MODEL_TYPES, VLM

__all__ = [
    "END_OF_STEP",
    "LOAD_LOCK",
    "THINK_CLOSE",
    "THINK_OPEN",
    "SUPPORTED_MODEL_TYPES",
    "VLM",
    "IncrementalDecoder",
    "VLMError",
    "VLMInputs",
    "event_stop",
    "load_vlm",
    "model_identity",
    "model_name",
    "normalize_answer",
    "normalize_image",
    "normalize_image_with_size",
    "read_model_config",
    "resolve_device",
    "resolve_model_path",
    "split_thinking",
    "token_streamer",
]
