"""The embedded demo model: a tiny Qwen2.5-VL-architecture thinking model for the shapes world.

No weights can be downloaded here, so we train our own: same architecture and processor as
Qwen2.5-VL (2x2 merge, 3-D mRoPE; 28 px patches instead of 14), scaled down to a few million
parameters.
This module holds what training and evaluation share: the tokenizer corpus, the config,
and turning scenes into model batches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from vstream.world.shapes import COLORS, FAMILIES, SCALE, SHAPES, SIZE, Scene, scenes
from vstream.world.tokenizer import build_tokenizer, special_ids

SYSTEM = None  # the demo model needs no system prompt
IGNORE = -100


def tokenizer_corpus(n: int = 6000) -> list[str]:
    """Text the BPE is trained on: shapes-world questions and traces plus plain words,
    so the demo vocabulary covers the world and still byte-encodes anything else."""
    texts = [s.question + " " + s.trace for s in scenes("train", 0, n)]
    texts += [" ".join(COLORS), " ".join(SHAPES), " ".join(FAMILIES), "0 1 2 3 4 5 6 7 8 9 yes no"]
    return texts


def make_tokenizer(vocab_size: int = 640):
    return build_tokenizer(tokenizer_corpus(), vocab_size=vocab_size)


PATCH = 28  # vision patch side in pixels
MERGE = 2  # MERGE x MERGE patches make one LLM token (56 px)


def make_image_processor(patch: int = PATCH) -> Qwen2VLImageProcessorPil:
    # Dynamic resolution between 224x224 (4x4 = 16 LLM tokens: video frames, kept small so
    # streaming stays fast) and 448x448 (8x8 = 64 tokens: still scenes, an object ~2x2 tokens).
    return Qwen2VLImageProcessorPil(
        min_pixels=SIZE * SIZE, max_pixels=(SIZE * SCALE) ** 2, patch_size=patch, merge_size=MERGE
    )


def demo_config(tokenizer, hidden: int = 192, layers: int = 4, heads: int = 6, patch: int = PATCH) -> Qwen2_5_VLConfig:
    ids = special_ids(tokenizer)
    head_dim = hidden // heads
    t = head_dim // 2  # mRoPE sections (t, h, w) split the rotary half-dimension
    section = [t - 2 * (t * 3 // 8), t * 3 // 8, t * 3 // 8]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    vision = dict(
        depth=4,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        out_hidden_size=hidden,
        fullatt_block_indexes=[1, 3],
        window_size=112,
        patch_size=patch,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True,
    )


def build_demo_model(tokenizer, **kw) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration(demo_config(tokenizer, **kw))


def warm_start(model: Qwen2_5_VLForConditionalGeneration, tokenizer, init: Path) -> dict:
    """Copy a saved model's weights into `model`: every tensor of the same name and shape, and
    token embeddings row by row where the token's text exists in both vocabularies (a new world
    adds words, so the tokenizer is rebuilt). Returns what was copied, for the training record."""
    init = Path(init)
    old = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32).state_dict()
    old_vocab = json.loads((init / "tokenizer.json").read_text())["model"]["vocab"]
    own = model.state_dict()
    copied, rows = 0, 0
    for name, value in old.items():
        if name in own and "embed_tokens" not in name and own[name].shape == value.shape:
            own[name].copy_(value.to(own[name].dtype))
            copied += 1
    emb = model.get_input_embeddings().weight
    old_emb = old["model.language_model.embed_tokens.weight"]
    with torch.no_grad():
        for text, new_id in tokenizer.get_vocab().items():
            if text in old_vocab and old_vocab[text] < old_emb.shape[0]:
                emb[new_id] = old_emb[old_vocab[text]].to(emb.dtype)
                rows += 1
    digest = hashlib.sha256((init / "model.safetensors").read_bytes()).hexdigest()[:16]
    training = init / "training.json"
    return {
        "from": str(init),
        "weights_sha256": digest,
        "tensors_copied": copied,
        "embedding_rows_copied": rows,
        "its_training": json.loads(training.read_text()) if training.exists() else None,
    }


def prompt_text(tokenizer, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


class Collator:
    """Scenes -> a padded training batch; loss only on the assistant's trace and answer."""

    def __init__(self, tokenizer, image_processor, padding_side: str = "right"):
        self.tok = tokenizer
        self.ip = image_processor
        self.padding_side = padding_side
        self.image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad_id = tokenizer.pad_token_id
        self.eos = tokenizer.eos_token

    def _image_tokens(self, grid) -> int:
        return int(grid.prod()) // self.ip.merge_size**2

    def __call__(self, batch: list[Scene], with_targets: bool = True) -> dict[str, torch.Tensor]:
        vis = self.ip(images=[s.image() for s in batch], return_tensors="pt")
        seqs, labels = [], []
        for s, grid in zip(batch, vis["image_grid_thw"]):
            prompt = prompt_text(self.tok, s.question)
            prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * self._image_tokens(grid))
            p_ids = self.tok(prompt, add_special_tokens=False).input_ids
            t_ids = self.tok(s.trace + self.eos, add_special_tokens=False).input_ids if with_targets else []
            seqs.append(p_ids + t_ids)
            labels.append([IGNORE] * len(p_ids) + t_ids)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (q, l) in enumerate(zip(seqs, labels)):
            sl = slice(0, len(q)) if self.padding_side == "right" else slice(width - len(q), width)
            ids[i, sl], lab[i, sl], att[i, sl] = torch.tensor(q), torch.tensor(l), 1
        out = {
            "input_ids": ids,
            "attention_mask": att,
            "mm_token_type_ids": (ids == self.image_id).int(),
            "pixel_values": vis["pixel_values"],
            "image_grid_thw": vis["image_grid_thw"],
        }
        if with_targets:
            out["labels"] = lab
        return out
