"""Shared fixtures: tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4.1V models saved as real model folders.

The folders look exactly like a downloaded checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer files + chat_template.jinja, preprocessor_config.json), so
tests exercise the same `load_vlm` path a real model takes, on CPU, in about a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vstream.world.tokenizer import build_tokenizer, special_ids  # noqa: E402

TINY_TEXTS = [
    "What is in the image? A red square next to a blue circle.",
    "Describe the video. The cat sat on the mat, then it jumped.",
    "<think> Let me look at the picture step by step. </think> The answer is 42.",
    "How many objects are there? There are 3 objects: 0.5 seconds, 1.5 seconds, 2.0 seconds.",
    "You are a helpful assistant. Count, compare, reason and answer briefly.",
] * 4


def _silence_eos(model, ids: dict[str, int]) -> None:
    """Zero the lm_head rows of eos/pad so greedy decoding of a random model never stops
    early: tests of max_new_tokens / stop events then mean what they say."""
    with torch.no_grad():
        for key in ("eos_token_id", "pad_token_id"):
            model.lm_head.weight[ids[key]].zero_()


def make_tiny_tokenizer():
    return build_tokenizer(TINY_TEXTS, vocab_size=320)


def _tiny_text(tokenizer) -> dict:
    """The Qwen2(.5)-VL text tower of the tiny models: 64 wide x 2 layers, 4 heads (2 kv)."""
    ids = special_ids(tokenizer)
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # head_dim 16 -> mrope sections must sum to 8
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )


def save_tiny_qwen2_5_vl(path: Path, tokenizer, side: int = 112) -> Path:
    """Qwen2.5-VL: text 64 wide x 2 layers (4 heads, 2 kv), vision 32 wide x 2 blocks;
    processor fixed at side x side pixels (112 -> 4x4 LLM tokens)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = special_ids(tokenizer)
    cfg = Qwen2_5_VLConfig(
        text_config=_tiny_text(tokenizer),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=56,
            tokens_per_second=2,
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _silence_eos(model, ids)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side).save_pretrained(path)
    return path


def save_tiny_qwen3_vl(path: Path, tokenizer, side: int = 128) -> Path:
    """Qwen3-VL: patch 16 (32 px per LLM token), deepstack from vision block 0,
    interleaved mrope; processor fixed at side x side pixels (128 -> 4x4 LLM tokens)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = special_ids(tokenizer)
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            pad_token_id=ids["pad_token_id"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    _silence_eos(model, ids)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(
        min_pixels=side * side,
        max_pixels=side * side,
        patch_size=16,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tiny_qwen2_5_vl_dir):
    """Loaded through the public adapter (CPU, float32). Shared: do not mutate."""
    from vstream.model import load_vlm

    return load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tiny_qwen3_vl_dir):
    from vstream.model import load_vlm

    return load_vlm(str(tiny_qwen3_vl_dir), device="cpu")


def save_tiny_family(path: Path, name: str, side: int, **text_overrides) -> Path:
    """A supported architecture at its reduced size (vstream/model/configs/NAME.json, `reduced`),
    random weights, eos silenced, processor fixed at side x side pixels. `model_type` and text
    config entries can be overridden (a MoE variant of a dense config)."""
    from vstream.model.families import family_of
    from vstream.model.random_init import build_model, read_spec, reduce_spec, save_model_folder

    spec = reduce_spec(read_spec(name))
    spec["model_type"] = text_overrides.pop("model_type", spec["model_type"])
    spec["text_config"].update(text_overrides)
    spec["processor"]["min_pixels"] = spec["processor"]["max_pixels"] = side * side
    model, tok, proc = build_model(spec, seed=0)
    fam = family_of(spec["model_type"])
    with torch.no_grad():
        for t in set(fam.eos_tokens) | {fam.pad_token}:
            model.lm_head.weight[tok.convert_tokens_to_ids(t)].zero_()
    return save_model_folder(path, model, tok, proc)


def save_tiny_qwen2_vl(path: Path, tokenizer, side: int = 112) -> Path:
    """Qwen2-VL: text 64 wide x 2 layers, vision 32 wide x 2 blocks; 112 px -> 4x4 LLM tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = special_ids(tokenizer)
    cfg = Qwen2VLConfig(
        text_config=_tiny_text(tokenizer),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    _silence_eos(model, ids)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_glm4v_dir(tmp_path_factory) -> Path:
    """GLM-4.1V at its reduced size (4 layers, 64 wide, partial RoPE), 112 px -> 4x4 LLM tokens."""
    return save_tiny_family(tmp_path_factory.mktemp("tiny_glm4v"), "glm-4.1v-9b", 112)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_moe_dir(tmp_path_factory) -> Path:
    """Qwen3-VL-MoE: the reduced Qwen3-VL-8B config with 4 experts (2 per token) in every layer."""
    return save_tiny_family(
        tmp_path_factory.mktemp("tiny_qwen3_vl_moe"),
        "qwen3-vl-8b",
        128,
        model_type="qwen3_vl_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
    )


@pytest.fixture(scope="session")
def tiny_glm4v(tiny_glm4v_dir):
    from vstream.model import load_vlm

    return load_vlm(str(tiny_glm4v_dir), device="cpu")


@pytest.fixture(scope="session")
def playwright_sync():
    """One Playwright driver for the whole run: the browser test files share it (a second
    `sync_playwright()` started while the first is open fails with "Sync API inside the asyncio loop")."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: pip install -r requirements-dev.txt", pytrace=False)
    with sync_playwright() as pw:
        yield pw


def synthetic_examples(n: int, w, k: int = 12, m: int = 32, seed: int = 0, c: float = 0.0, noise: float = 0.05) -> list:
    """Estimator labels whose effects are a known linear function `w` of the features (+ `c` per
    ablated region, + noise): what training must recover."""
    import numpy as np

    from vstream.attr.labels import LabeledExample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = int(rng.integers(1, 4))
        f = rng.dirichlet(np.ones(k), size=(s, w.size)).transpose(0, 2, 1) * rng.uniform(0.5, 2, size=w.size)
        masks = rng.random((m, k)) >= 0.5
        eff = np.einsum("mk,skl,l->ms", masks.astype(float), f, w) + c * masks.sum(1, keepdims=True)
        eff += noise * rng.normal(size=eff.shape) * eff.std()
        out.append(
            LabeledExample(
                index=i,
                seed=i,
                family="synthetic",
                features=torch.tensor(f, dtype=torch.float32),
                masks=torch.from_numpy(masks),
                effects=torch.tensor(eff, dtype=torch.float32),
                base=torch.zeros(s),
                assignment=torch.zeros(k, 1, dtype=torch.uint8),
                tokens=torch.zeros(1, dtype=torch.long),
            )
        )
    return out


@pytest.fixture(scope="session")
def synthetic_labels():
    return synthetic_examples
