"""Supported architectures with random weights: at their published size, or reduced for a CPU.

No full-size weights can be downloaded where this project is built, so speed and memory at real
scale are measured on the real architectures with random weights (`--random-init NAME`). The
hyperparameters are copied from the released config files into `vstream/model/configs/NAME.json`
(a `reduced` block in each shrinks widths and depth, same architecture, for tests on a CPU).
The tokenizer is a small byte-level BPE with the family's special tokens and chat template: the
text it produces means nothing, but every id the model sees is a real id of its vocabulary.

    vlm = random_init_vlm("qwen2.5-vl-7b", device="cuda")      # bf16, the full 8.3 B parameters
    vlm = random_init_vlm("glm-4.1v-9b", reduced=True)          # a few MB, CPU float32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vstream.model.errors import VLMError
from vstream.model.families import Family, family_of, image_processor_class
from vstream.model.loading import resolve_device, resolve_dtype
from vstream.model.vlm import SUPPORTED_MODEL_TYPES, VLM

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# a little text so the BPE has merges; any string still tokenizes (byte level)
_CORPUS = [
    "What is in the image? A red square next to a blue circle. Let me look at the picture step by step.",
    "The answer is 42. There are 3 objects: 0.5 seconds, 1.5 seconds, 2.0 seconds. Count, compare, reason.",
    "Describe the video. The cat sat on the mat, then it jumped. You are a helpful assistant.",
] * 8


def random_init_names() -> list[str]:
    """Names `--random-init` accepts (one config file each)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def read_spec(name: str) -> dict[str, Any]:
    """The config file of `name`, or a VLMError listing the names there are."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise VLMError(f"no random-init config {name!r}; choose from {', '.join(random_init_names())}")
    return json.loads(path.read_text())


def reduce_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with its `reduced` block merged in (sub-dicts merged one level deep); the
    vocabulary shrinks to the tokenizer's own unless the block names a size."""
    out = json.loads(json.dumps(spec))
    out["text_config"].pop("vocab_size", None)
    for key, over in spec.get("reduced", {}).items():
        if isinstance(over, dict) and isinstance(out.get(key), dict):
            out[key].update(over)
        else:
            out[key] = over
    out["name"] = f"{spec.get('name', out['model_type'])}-reduced"
    return out


def build_tokenizer(family: Family, vocab_size: int = 400):
    """A byte-level BPE with the family's special tokens and chat template (saves and reloads
    with AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=family.eos_tokens[0],
        pad_token=family.pad_token,
        additional_special_tokens=[
            t for t in family.special_tokens if t not in (family.eos_tokens[0], family.pad_token)
        ],
    )
    fast.chat_template = family.chat_template
    return fast


def build_config(spec: dict[str, Any], tokenizer) -> Any:
    """The transformers config of `spec`, its multimodal ids taken from `tokenizer`. The vocabulary
    keeps its published size when the spec gives one (the embedding is part of the memory)."""
    from transformers import AutoConfig

    model_type = spec["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise VLMError(f"unsupported architecture {model_type!r}")
    fam = family_of(model_type)
    text = dict(spec["text_config"])
    text["vocab_size"] = max(int(text.get("vocab_size") or 0), len(tokenizer))
    ids = {attr: tokenizer.convert_tokens_to_ids(tok) for attr, tok in fam.config_ids}
    text["pad_token_id"] = tokenizer.convert_tokens_to_ids(fam.pad_token)
    text["eos_token_id"] = tokenizer.convert_tokens_to_ids(fam.eos_tokens[0])
    text["bos_token_id"] = text["pad_token_id"]  # the released ids would lie outside a reduced vocabulary
    extra = {"tie_word_embeddings": spec["tie_word_embeddings"]} if "tie_word_embeddings" in spec else {}
    return AutoConfig.for_model(model_type, text_config=text, vision_config=dict(spec["vision_config"]), **ids, **extra)


def build_image_processor(spec: dict[str, Any]):
    """The family's PIL image processor with the spec's patch sizes and pixel budget."""
    p = dict(spec.get("processor", {}))
    lo, hi = int(p.pop("min_pixels", 56 * 56)), int(p.pop("max_pixels", 28 * 28 * 1280))
    cls = image_processor_class(spec["model_type"])
    if spec["model_type"] == "glm4v":  # its budget counts the two temporal copies of an image
        return cls(size={"shortest_edge": lo, "longest_edge": 2 * hi}, **p)
    return cls(min_pixels=lo, max_pixels=hi, **p)


def build_model(spec: dict[str, Any], seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32):
    """(model, tokenizer, image processor) of `spec` with random weights, built on `device`."""
    import transformers

    fam = family_of(spec["model_type"])
    tokenizer = build_tokenizer(fam)
    cfg = build_config(spec, tokenizer)
    cls = getattr(transformers, SUPPORTED_MODEL_TYPES[spec["model_type"]])
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in fam.eos_tokens]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(fam.pad_token)
    model.name_or_path = f"random-init:{spec.get('name', spec['model_type'])}"
    return model, tokenizer, build_image_processor(spec)


def save_model_folder(out: Path, model, tokenizer, image_processor) -> Path:
    """Write a folder that looks like a downloaded checkpoint (safetensors, tokenizer, processor)."""
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def random_init_vlm(
    name: str,
    reduced: bool = False,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    silence_eos: bool = True,
) -> VLM:
    """A supported architecture at its published size (or reduced) with random weights, in memory
    (nothing is written: a full-size model would be tens of GB on disk). With `silence_eos` the
    output head's rows for the end-of-turn, pad and vision placeholder tokens are zeroed, so
    generation always runs to `max_new_tokens` (what a benchmark of trace lengths needs) and the
    trace can be teacher-forced (a placeholder in it could not)."""
    spec = read_spec(name)
    if reduced:
        spec = reduce_spec(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        model, tokenizer, proc = build_model(spec, seed, dev, dt)
    except torch.OutOfMemoryError as e:
        raise VLMError(f"{name} does not fit on {dev} in {dt}: {str(e).splitlines()[0]}") from e
    if silence_eos:  # and the vision placeholders, which a trained model never writes either
        fam = family_of(spec["model_type"])
        with torch.no_grad():
            for tok in set(fam.eos_tokens) | {fam.pad_token} | {t for _, t in fam.config_ids}:
                model.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(tok)].zero_()
    return VLM(model=model, tokenizer=tokenizer, image_processor=proc, arch=spec["model_type"], device=dev, dtype=dt)


def parameter_count(name: str) -> int:
    """Parameters of the full-size architecture, counted without allocating it (meta device)."""
    spec = read_spec(name)
    model, _, _ = build_model(spec, device="meta")
    return sum(p.numel() for p in model.parameters())
