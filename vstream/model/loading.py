"""Load a supported VLM from a folder or hub id: safetensors only, one-line errors."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch

from vstream.model.errors import VLMError
from vstream.model.families import image_processor_class
from vstream.model.vlm import SUPPORTED_MODEL_TYPES, VLM

# transformers builds models on the meta device under process-wide patches and imports its
# classes lazily; two threads loading at once (the explorer warming one model while a tab loads
# another) corrupt each other, so every load in this process takes this lock.
LOAD_LOCK = threading.RLock()

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def load_vlm(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    load_in: str | None = None,
) -> VLM:
    """Load a supported VLM from a local folder or a Hugging Face id (safetensors only).

    dtype "auto" = bfloat16 on CUDA, float32 otherwise; device "auto" = cuda if available.
    `device_map="auto"` spreads the layers over every GPU through accelerate (the VLM's device
    is then the one its input embeddings sit on; attention capture gathers rows there).
    `load_in` "4bit" / "8bit" quantises the weights with bitsandbytes (a CUDA GPU and the
    package needed). Every user-facing failure (missing path, offline hub id, unsupported
    architecture, no safetensors, a model that does not fit) is a one-line VLMError.
    """
    with LOAD_LOCK:
        return _load(name_or_path, dtype, device, trust_remote_code, device_map, load_in)


def _load(
    name_or_path: str,
    dtype: str | torch.dtype,
    device: str | torch.device,
    trust_remote_code: bool,
    device_map: str | dict | None,
    load_in: str | None,
) -> VLM:
    path = resolve_model_path(str(name_or_path), trust_remote_code)
    raw = read_model_config(path)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise VLMError(
            f"unsupported architecture {model_type!r} in {path}; supported model_types: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    if not any(path.glob("*.safetensors")):
        found = sorted({p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pat)})
        raise VLMError(
            f"no .safetensors weights in {path}"
            + (f" (found {', '.join(found[:3])})" if found else "")
            + "; only safetensors are loaded (never pickled .bin/.pt): convert the checkpoint first"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise VLMError(f"{path} has no preprocessor_config.json (the image processor settings)")

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    remote = {"trust_remote_code": True} if trust_remote_code else {}

    import transformers
    from transformers import AutoTokenizer

    cls_name = SUPPORTED_MODEL_TYPES[model_type]
    cls = getattr(transformers, cls_name, None)
    if trust_remote_code and raw.get("auto_map"):
        cls = transformers.AutoModelForImageTextToText
    if cls is None:
        raise VLMError(f"transformers {transformers.__version__} has no {cls_name}; upgrade transformers")
    load_kw: dict[str, Any] = dict(dtype=dt, attn_implementation="sdpa", use_safetensors=True, **remote)
    if dev.type == "cuda" or device_map is not None:
        load_kw["device_map"] = device_map if device_map is not None else str(dev)
    if load_in is not None:
        load_kw["quantization_config"] = _quantization(load_in, dev, dt)
    try:
        model = cls.from_pretrained(str(path), **load_kw)
        if "device_map" not in load_kw:
            model = model.to(dev)
    except torch.OutOfMemoryError as e:
        raise VLMError(_does_not_fit(path, dev, dt)) from e
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        if "out of memory" in str(e).lower():
            raise VLMError(_does_not_fit(path, dev, dt)) from e
        raise VLMError(f"could not load model weights from {path}: {type(e).__name__}: {_first_line(e)}") from e
    model.eval()
    if "device_map" in load_kw:
        dev = model.get_input_embeddings().weight.device

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **remote)
        image_processor = image_processor_class(model_type).from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VLMError(f"could not load tokenizer/image processor from {path}: {_first_line(e)}") from e
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _find_chat_template(path)

    vc = model.config.vision_config
    for name, want in (
        ("patch_size", vc.patch_size),
        ("merge_size", vc.spatial_merge_size),
        ("temporal_patch_size", vc.temporal_patch_size),
    ):
        have = getattr(image_processor, name)
        if int(have) != int(want):
            raise VLMError(f"{path}: preprocessor_config {name}={have} does not match the model's {want}")

    return VLM(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        arch=model_type,
        device=dev,
        dtype=dt,
        path=path,
    )


def _quantization(load_in: str, dev: torch.device, dt: torch.dtype) -> Any:
    """bitsandbytes 4- or 8-bit settings, or a one-line VLMError saying what is missing."""
    import importlib.util

    if load_in not in ("4bit", "8bit"):
        raise VLMError(f"load_in must be 4bit or 8bit, got {load_in!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise VLMError(f"{load_in} loading needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    if dev.type != "cuda":
        raise VLMError(f"{load_in} loading needs a CUDA GPU; this run is on {dev}")
    from transformers import BitsAndBytesConfig

    if load_in == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dt, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def _does_not_fit(path: Path, dev: torch.device, dt: torch.dtype) -> str:
    free = ""
    if dev.type == "cuda":
        f, total = torch.cuda.mem_get_info(dev)
        free = f" ({f / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
    return (
        f"{path.name} does not fit on {dev}{free} in {str(dt).replace('torch.', '')}: spread it over several GPUs "
        "(device_map auto) or load it in 4bit/8bit (bitsandbytes)"
    )


def read_model_config(path: Path, what: str = "model") -> dict:
    """config.json of a model folder as a dict, or a one-line VLMError."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise VLMError(f"{path} has no config.json: not a {what} folder")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise VLMError(f"could not read {cfg_file}: {e}") from e


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def resolve_model_path(name: str, trust_remote_code: bool) -> Path:
    """Local folder as is; otherwise a hub id downloaded (or found in the cache) to a folder."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise VLMError(f"model path is not a folder: {p}")
        return p
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") != 1 or name.endswith("/")
    if not looks_like_path:
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name)
        except Exception:
            looks_like_path = True
    if looks_like_path:
        raise VLMError(f"model path does not exist: {name}")
    return _download(name, trust_remote_code)


def _download(repo_id: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = (
        bool(constants.HF_HUB_OFFLINE)
        or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        or os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    )
    patterns = _WEIGHT_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise VLMError(
            f"could not download {repo_id}: no such model on the Hugging Face Hub, or it is "
            f"gated/private ({type(e).__name__}); pass a local path"
        ) from e
    except Exception as e:  # offline, no network, DNS, timeouts, cache misses
        why = "offline mode (HF_HUB_OFFLINE)" if offline else "no network"
        raise VLMError(
            f"could not download {repo_id}: {why} / not in local cache; pass a local path ({type(e).__name__})"
        ) from e


def _find_chat_template(path: Path) -> str | None:
    """Real Qwen repos sometimes keep the template only for the processor."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except ValueError:
            return None
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise VLMError(f"bad device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VLMError(f"device {device!r} requested but CUDA is not available")
    return dev


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype, dev: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise VLMError(f"unsupported dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[dtype]
