"""The supported model families: their transformers class, image processor, chat tokens and template.

One table, so the adapter, the random-weight builder (`vstream.model.random_init`) and the tests
agree on what a Qwen or GLM checkpoint looks like. The chat templates are the released ones'
layout for one user turn with images (what `VLM.build_inputs` renders); a real checkpoint's own
template always wins when it ships one.
"""

from __future__ import annotations

from dataclasses import dataclass

from vstream.model.thinking import END_OF_STEP, THINK_CLOSE, THINK_OPEN

_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# GLM-4.1V-Thinking: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>question
# <|assistant|>\n", the answer written as <think>...</think><answer>...</answer>
_GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """What the adapter needs to know about one family of checkpoints."""

    name: str
    model_types: tuple[str, ...]
    image_processor: str  # transformers class, resolved under transformers.models
    special_tokens: tuple[str, ...]
    chat_template: str
    eos_tokens: tuple[str, ...]  # generation stops at any of these
    pad_token: str
    image_pad: str
    video_pad: str
    video: bool  # build_inputs takes video frames for this family
    config_ids: tuple[tuple[str, str], ...]  # (config attribute, token) pairs of the multimodal ids


# the Qwen chat/vision special tokens plus the thinking and step markers (the demo tokenizer has them too)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    THINK_OPEN,
    THINK_CLOSE,
    END_OF_STEP,
)
_QWEN_IDS = (
    ("image_token_id", "<|image_pad|>"),
    ("video_token_id", "<|video_pad|>"),
    ("vision_start_token_id", "<|vision_start|>"),
    ("vision_end_token_id", "<|vision_end|>"),
)
_QWEN_PROC = "qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil"

QWEN = Family(
    name="qwen",
    model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"),
    image_processor=_QWEN_PROC,
    special_tokens=QWEN_SPECIAL_TOKENS,
    chat_template=_QWEN_TEMPLATE,
    eos_tokens=("<|im_end|>", "<|endoftext|>"),
    pad_token="<|endoftext|>",
    image_pad="<|image_pad|>",
    video_pad="<|video_pad|>",
    video=True,
    config_ids=_QWEN_IDS,
)

GLM = Family(
    name="glm",
    model_types=("glm4v",),
    image_processor="glm4v.image_processing_pil_glm4v.Glm4vImageProcessorPil",
    special_tokens=(
        "<|endoftext|>",
        "[gMASK]",
        "<sop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
        "<|begin_of_image|>",
        "<|end_of_image|>",
        "<|begin_of_video|>",
        "<|end_of_video|>",
        "<|image|>",
        "<|video|>",
        "<|begin_of_box|>",
        "<|end_of_box|>",
        THINK_OPEN,
        THINK_CLOSE,
        "<answer>",
        "</answer>",
    ),
    chat_template=_GLM_TEMPLATE,
    eos_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
    pad_token="<|endoftext|>",
    image_pad="<|image|>",
    video_pad="<|video|>",
    # GLM-4.1V writes a video as frames of image tokens with timestamps between them; the
    # adapter does not build that layout yet (TaYS runs on Qwen2.5-VL only anyway)
    video=False,
    config_ids=(
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"),
    ),
)

FAMILIES: tuple[Family, ...] = (QWEN, GLM)


def family_of(model_type: str) -> Family:
    """The family of a supported `config.model_type` (KeyError otherwise)."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise KeyError(model_type)


def image_processor_class(model_type: str) -> type:
    """The PIL image processor class of a family (no torchvision needed)."""
    import importlib

    module, _, cls = family_of(model_type).image_processor.rpartition(".")
    return getattr(importlib.import_module(f"transformers.models.{module}"), cls)
