"""Big-model loading: device_map through accelerate, bitsandbytes, a model that does not fit.

Only what a CPU can show: `device_map="auto"` places every layer on the CPU here, so the test
checks that the placement path loads and captures exactly like the plain one; several GPUs,
4-/8-bit weights and real out-of-memory are not available on this machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vstream.attr import capture as C
from vstream.model import VLMError, load_vlm


def _captured(vlm) -> torch.Tensor:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    inputs = vlm.build_inputs("What is in the image?", image=image)
    rec = C.AttentionRecorder.for_vlm(vlm)
    gc = vlm.generation_kwargs(6, False, 1.0)["generation_config"]
    with vlm.lock, torch.no_grad(), C.capturing(vlm, inputs.image_token_positions, rec):
        vlm.model.generate(**inputs.model_kwargs, generation_config=gc)
    return rec.stack()


def test_device_map_auto_loads_and_captures_like_the_plain_load(tiny_glm4v_dir):
    mapped = load_vlm(str(tiny_glm4v_dir), device_map="auto")
    plain = load_vlm(str(tiny_glm4v_dir), device="cpu")
    assert mapped.device == torch.device("cpu")
    torch.testing.assert_close(_captured(mapped), _captured(plain), atol=1e-6, rtol=0)


def test_quantised_loading_says_what_is_missing(tiny_qwen2_5_vl_dir):
    with pytest.raises(VLMError, match="bitsandbytes|CUDA GPU"):
        load_vlm(str(tiny_qwen2_5_vl_dir), load_in="4bit")
    with pytest.raises(VLMError, match="4bit or 8bit"):
        load_vlm(str(tiny_qwen2_5_vl_dir), load_in="2bit")


def test_a_model_that_does_not_fit_is_one_clear_line(tiny_qwen2_5_vl_dir, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", oom)
    with pytest.raises(VLMError, match="does not fit on cpu in float32: spread it over several GPUs"):
        load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
