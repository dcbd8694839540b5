"""Estimator labels: per thinking span, attention features and measured region-ablation effects.

    python -m vstream collect --n 2000 --out runs/labels                       # train split
    python -m vstream collect --n 200 --split heldout --out runs/labels-heldout
    python -m vstream collect --n 200 --split val --out runs/labels-val     # for choosing settings
    python -m vstream collect --n 2000 --features mean,vnorm,tnorm,max --out runs/labels-variants
    accelerate launch --multi_gpu --num_processes 2 -m vstream collect --n 2000 --out runs/labels  # 2 CPU procs (gloo)

For each shapes-world scene: generate the trace greedily while `vstream.attr.capture` records the
attention of every generated token on the image tokens; cut it into thinking spans
(`vstream.attr.spans`, thought spans only); cluster the image into K regions (`vstream.attr.regions`);
per span, pool the recorded rows into (K, L*H) features (`capture.region_features`; with
`feature_variants`, one (K, L*H) array per `vstream.attr.features` variant, all from the same
trace, the first one the folder's primary); draw
`masks_per_example` random region masks (each region kept with probability `keep_prob`,
True = ablated, seeded by (seed, scene seed)); measure every mask's effect on every span with
THE ablation operator (`vstream.attr.ablation`, all masks + the unablated pass in one batched
forward).

Storage (never pickle): shards `labels-<first index>.safetensors` holding, per example i,
`e<i>.features` (S, K, L*H) float32, `e<i>.masks` (M, K) bool, `e<i>.effects` (M, S) float32,
`e<i>.base` (S,) unablated span log-probs, `e<i>.assignment` (K, N) uint8, `e<i>.tokens` (T,)
int64, and per further feature variant V `e<i>.features.V` (S, K, L*H); plus a JSON sidecar
`labels-<first index>.json` with the run config and per-example metadata (scene seed, family,
span texts and token ranges, K). The sidecar is written last, so a shard counts only once both
exist. Example index = offset of the scene in its split. The config names the stored variants
(`feature_variant`: the primary, `feature_variants`: all); files written before variants existed
hold the default ("mean"). Reading asks for one variant (`load_labels(..., feature_variant=)`):
a stored one, or one derived from a stored one (`features.derive`: the per-region tokens rmean /
log); anything else is refused, so an estimator never trains on features of another design than
it will be applied to.

Sharding: with `accelerate launch`, process r of R takes the examples i with i % R == r and
writes its own shards. Resuming: examples listed in existing sidecars of `--out` (labelled or
skipped because their trace had no thinking span) are not redone; a sidecar from a different
setup (model, split, K rule, masks, ...) in `--out` is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstream.attr import capture as C
from vstream.attr import features as FV
from vstream.attr.ablation import OPERATOR, PlaceholderInTrace, ablation_effects
from vstream.attr.capture import region_features
from vstream.attr.regions import (
    K_MAX,
    K_MIN,
    TOKENS_PER_REGION,
    Backbone,
    load_backbone,
    regions_for,
)
from vstream.attr.spans import Span, SpanSplitter
from vstream.attr.userdata import DataRow, DataSource
from vstream.model import VLM, IncrementalDecoder, VLMError, VLMInputs, model_identity
from vstream.world.shapes import Scene, scenes

__all__ = [
    "FORMAT",
    "CapturedTrace",
    "LabeledExample",
    "collect",
    "derivation",
    "derive_examples",
    "features_by_plan",
    "done_indices",
    "draw_masks",
    "features_description",
    "folder_config",
    "label_example",
    "load_labels",
    "normalised_config",
    "read_shard",
    "span_region_features",
    "trace_with_attention",
    "trace_with_capture",
    "write_shard",
]

FORMAT = "vstream-labels/1"
FEATURES = (
    "per (layer, head), layer-major: mean over the span's generated tokens of the attention mass of "
    "the token's own decode query on the region's image tokens (vstream.attr.capture convention)"
)
# config keys that must agree for shards to be mixed / resumed in one folder
_CONFIG_KEYS = (
    "format",
    "model",
    "model_type",
    "num_layers",
    "num_heads",
    "split",
    "backbone",
    "k_rule",
    "masks_per_example",
    "keep_prob",
    "seed",
    "max_new_tokens",
    "span_kinds",
    "feature_variant",
    "feature_variants",
)


def features_description(variant: FV.FeatureVariant) -> str:
    """The config's human-readable "features" entry for a variant (the default: FEATURES)."""
    return FEATURES if variant.is_default else f"{FEATURES}; variant {variant.name}: {variant.describe()}"


def normalised_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A sidecar's config with the feature-variant keys filled in for files written before
    variants existed (they hold the default)."""
    out = dict(cfg)
    out.setdefault("feature_variant", FV.DEFAULT)
    out.setdefault("feature_variants", [out["feature_variant"]])
    return out


def k_rule(k: int | None) -> str:

    if k is None:
        return f"auto: one region per {TOKENS_PER_REGION} image tokens, clamped to [{K_MIN}, {K_MAX}]"
    return f"k={int(k)}"


# ----------------------------------------------------------------------------------------------
# one example


@dataclass
class LabeledExample:
    index: int  # offset of the scene in its split
    seed: int  # scene seed
    family: str
    features: torch.Tensor  # (S, K, L*H) float32 (a "raw" variant: 2*L*H)
    masks: torch.Tensor  # (M, K) bool, True = region ablated
    effects: torch.Tensor  # (M, S) float32, nats
    base: torch.Tensor  # (S,) unablated span log-probability
    assignment: torch.Tensor  # (K, N) uint8
    tokens: torch.Tensor  # (T,) int64 generated (visible) trace
    span_texts: list[str] = field(default_factory=list)
    span_ranges: list[tuple[int, int]] = field(default_factory=list)
    trace: str = ""
    question: str = ""
    feature_variant: str = FV.DEFAULT  # the variant `features` holds
    extra_features: dict[str, torch.Tensor] = field(default_factory=dict)  # {variant: (S, K, L*H)}

    @property
    def k(self) -> int:
        return int(self.masks.shape[1])

    @property
    def n_spans(self) -> int:
        return int(self.effects.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        p = f"e{self.index}."
        return {
            p + "features": self.features.float().contiguous(),
            p + "masks": self.masks.bool().contiguous(),
            p + "effects": self.effects.float().contiguous(),
            p + "base": self.base.float().contiguous(),
            p + "assignment": self.assignment.to(torch.uint8).contiguous(),
            p + "tokens": self.tokens.long().contiguous(),
            **{f"{p}features.{v}": f.float().contiguous() for v, f in self.extra_features.items()},
        }

    def meta(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "family": self.family,
            "k": self.k,
            "n_tokens": int(self.tokens.numel()),
            "question": self.question,
            "trace": self.trace,
            "spans": [
                {"text": t, "token_start": s, "token_end": e} for t, (s, e) in zip(self.span_texts, self.span_ranges)
            ],
        }


@dataclass
class CapturedTrace:
    """A greedy trace with what its features are computed from."""

    tokens: list[int]  # visible generated token ids
    rows: torch.Tensor  # (T, L, H, N) CPU attention rows, row i = token i
    value_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # {vnorm|vonorm: (L, H, N) CPU}


def trace_with_attention(vlm: VLM, inputs: VLMInputs, max_new_tokens: int = 192) -> tuple[list[int], torch.Tensor]:
    """Greedy-generate with attention capture: (visible token ids, (T, L, H, N) CPU rows).

    Visible = up to the first eos. Row i belongs to generated token i (capture's convention);
    when generation was cut by `max_new_tokens` the last token's row is completed by
    `capture.finalize`, so every visible token has one.
    """
    tr = trace_with_capture(vlm, inputs, max_new_tokens)
    return tr.tokens, tr.rows


def trace_with_capture(
    vlm: VLM, inputs: VLMInputs, max_new_tokens: int = 192, values: Sequence[str] = ()
) -> CapturedTrace:
    """`trace_with_attention`, plus the value weights of `values` (features.VALUE_WEIGHTS) that
    value-weighted feature variants need (recorded at prefill)."""

    rec = C.AttentionRecorder.for_vlm(vlm, keep_cpu=True, values=values)
    gc = vlm.generation_kwargs(max_new_tokens, False, 1.0)["generation_config"]
    gc.return_dict_in_generate = True
    pos = inputs.image_token_positions
    stop = set(vlm.eos_token_ids) | {int(gc.pad_token_id)}
    with vlm.lock, torch.no_grad():
        with C.capturing(vlm, pos, rec):
            out = vlm.model.generate(**inputs.model_kwargs, generation_config=gc)
        new = out.sequences[0, inputs.prompt_len :].tolist()
        visible: list[int] = []
        for t in new:
            if t in stop:
                break
            visible.append(int(t))
        if visible and rec.tokens < len(visible):
            C.finalize(vlm, rec, pos, out.past_key_values, visible[-1])
    if not visible:
        return CapturedTrace([], torch.zeros(0))
    weights = {v: rec.value_weights(v, cpu=True) for v in rec.values}
    return CapturedTrace(visible, rec.stack(0, len(visible), cpu=True), weights)


def span_region_features(
    trace: CapturedTrace, span: tuple[int, int], assignment: torch.Tensor, variant: str | FV.FeatureVariant
) -> torch.Tensor:
    """(K, L*H) float32 features of `variant` for the trace's tokens [lo, hi)."""
    lo, hi = span
    v = FV.parse(variant)
    if v.is_default:
        return region_features(trace.rows[lo:hi], assignment).float()
    w = trace.value_weights.get(v.values) if v.values else None
    return torch.as_tensor(C.variant_features(trace.rows[lo:hi], assignment, v, w)).float()


def thought_spans(vlm: VLM, tokens: Sequence[int], kinds: Sequence[str] = ("thought",)) -> tuple[list[Span], str]:
    """Split the trace like the live pipeline does (token by token); keep spans of `kinds`."""

    dec = IncrementalDecoder(vlm.tokenizer)
    sp = SpanSplitter()
    text = ""
    for i, t in enumerate(tokens):
        piece = dec.push(int(t))
        text += piece
        sp.push(i, piece)
    sp.finish()
    return [s for s in sp.spans if s.kind in kinds], text


def draw_masks(
    n_regions: int, masks: int = 32, keep_prob: float = 0.5, seed: int = 0, scene_seed: int = 0
) -> torch.Tensor:
    """(masks, K) bool, True = ablated; each region kept independently with `keep_prob`."""
    rng = np.random.default_rng([int(seed), int(scene_seed)])
    return torch.from_numpy(rng.random((int(masks), int(n_regions))) >= float(keep_prob))


def label_example(
    vlm: VLM,
    scene: Scene | DataRow,
    index: int = 0,
    masks_per_example: int = 32,
    keep_prob: float = 0.5,
    k: int | None = None,
    backbone: Backbone | str | None = None,
    seed: int = 0,
    max_new_tokens: int = 192,
    span_kinds: Sequence[str] = ("thought",),
    batch_size: int | None = None,
    feature_variants: Sequence[str] = (FV.DEFAULT,),
) -> LabeledExample | None:
    """Label one scene (see the module doc). None when its trace has no span of `span_kinds`.
    `feature_variants`: the variants to store, the first in `features`, the others in
    `extra_features` (all from the one trace)."""

    variants = FV.names(feature_variants) or [FV.DEFAULT]
    values = sorted({FV.parse(v).values for v in variants} - {""})
    inputs = vlm.build_inputs(scene.question, image=scene.image())
    trace = trace_with_capture(vlm, inputs, max_new_tokens, values)
    tokens = trace.tokens
    if not tokens:
        return None
    spans, text = thought_spans(vlm, tokens, span_kinds)
    if not spans:
        return None
    regions = regions_for(inputs, k=k, backbone=backbone)
    a = regions.assignment
    per_variant = {
        v: torch.stack([span_region_features(trace, (s.token_start, s.token_end), a, v) for s in spans])
        for v in variants
    }
    feats = per_variant.pop(variants[0])
    masks = draw_masks(a.shape[0], masks_per_example, keep_prob, seed, scene.seed)
    effects, base = ablation_effects(vlm, inputs, tokens, spans, masks, a, batch_size=batch_size, return_base=True)
    return LabeledExample(
        index=int(index),
        seed=int(scene.seed),
        family=str(getattr(scene, "family", "")),
        features=feats.cpu(),
        masks=masks,
        effects=effects.float().cpu(),
        base=base.float().cpu(),
        assignment=(a > 0).to(torch.uint8).cpu(),
        tokens=torch.tensor(tokens, dtype=torch.long),
        span_texts=[s.text for s in spans],
        span_ranges=[(s.token_start, s.token_end) for s in spans],
        trace=text,
        question=scene.question,
        feature_variant=variants[0],
        extra_features={v: f.cpu() for v, f in per_variant.items()},
    )


def derivation(
    stored: Sequence[FV.FeatureVariant], want: FV.FeatureVariant, where: str
) -> list[tuple[FV.FeatureVariant, FV.FeatureVariant]]:
    """How to get `want`'s features from stored ones: [(stored variant, the part it gives)], the
    variant itself when stored, else each of its `parts`, stored or derived (`features.derive`);
    VLMError naming what to collect when a part cannot be had."""
    if want in stored:
        return [(want, want)]
    plan = []
    for part in want.parts:
        src = part if part in stored else next((v for v in stored if FV.can_derive(v, part)), None)
        if src is None:
            raise VLMError(
                f"{where} holds features of {', '.join(v.name for v in stored)}, not {want.name!r} "
                f"(nor ones it can be derived from): collect labels with --features {part.pooled.name}"
            )
        plan.append((src, part))
    return plan


def features_by_plan(
    plan: Sequence[tuple[FV.FeatureVariant, FV.FeatureVariant]],
    stored_features: Callable[[FV.FeatureVariant], torch.Tensor],
    assignment: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """One example's features following a `derivation` plan: each part read as stored or derived
    from its stored variant, side by side. Getters, so a shard reads only what the plan names."""
    blocks, a = [], None
    for src, part in plan:
        f = stored_features(src)
        if src != part:
            a = assignment().float().numpy() if a is None else a  # read once, for every derived part
            f = torch.from_numpy(FV.derive(f.float().numpy(), a, src, part))
        blocks.append(f)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1)


def derive_examples(examples: Sequence[LabeledExample], variant: str | FV.FeatureVariant) -> list[LabeledExample]:
    """The examples with `features` of `variant`: as held when they hold it (primary or extra),
    else derived (`features.derive`) from a held variant; VLMError when neither is possible."""
    want = FV.parse(variant)
    out = []
    for e in examples:
        held = {FV.parse(e.feature_variant): e.features}
        held.update({FV.parse(v): f for v, f in e.extra_features.items()})
        plan = derivation(list(held), want, f"example {e.index}")
        f = features_by_plan(plan, held.__getitem__, lambda e=e: e.assignment)
        out.append(replace(e, features=f, feature_variant=want.name, extra_features={}))
    return out


# ----------------------------------------------------------------------------------------------
# shards


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(
    out: Path, config: dict[str, Any], examples: Sequence[LabeledExample], skipped: Sequence[dict[str, Any]] = ()
) -> Path:
    """Write one shard (safetensors + JSON sidecar, the sidecar last). Returns the sidecar path."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    idx = [e.index for e in examples] + [int(s["index"]) for s in skipped]
    if not idx:
        raise ValueError("empty shard")
    stem = f"labels-{min(idx):07d}"
    tensors: dict[str, torch.Tensor] = {}
    for e in examples:
        tensors.update(e.tensors())
    meta = {"config": config, "examples": [e.meta() for e in examples], "skipped": list(skipped)}
    st = out / f"{stem}.safetensors"
    tmp = st.with_name(st.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "vstream_labels": json.dumps({"config": config})})
    os.replace(tmp, st)
    side = out / f"{stem}.json"
    _atomic_write_text(side, json.dumps(meta, indent=1))
    return side


def _sidecars(out: Path) -> list[Path]:
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob("labels-*.json") if p.with_suffix(".safetensors").is_file())


def _check_config(have: dict[str, Any], want: dict[str, Any], where: Path) -> None:
    diff = [k for k in _CONFIG_KEYS if k in want and have.get(k) != want.get(k)]
    if diff:
        d = ", ".join(f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in diff)
        raise VLMError(f"{where} holds labels from a different setup ({d}); use another output folder")


def done_indices(out: Path, config: dict[str, Any] | None = None) -> set[int]:
    """Example indices already labelled or skipped in `out` (refusing a different setup)."""
    done: set[int] = set()
    for side in _sidecars(out):
        meta = json.loads(side.read_text())
        if config is not None:
            _check_config(normalised_config(meta.get("config", {})), config, side)
        done.update(int(e["index"]) for e in meta.get("examples", []))
        done.update(int(s["index"]) for s in meta.get("skipped", []))
    return done


def folder_config(dirs: str | Path | Iterable[str | Path]) -> dict[str, Any]:
    """The (normalised) config of the first shard in the first label folder: what was collected
    and which feature variants it holds, without reading any tensor."""
    first = next(iter([dirs] if isinstance(dirs, (str, Path)) else dirs), None)
    d = Path(first) if first is not None else None
    sides = [] if d is None else ([d.with_suffix(".json")] if d.is_file() else _sidecars(d))
    if not sides:
        raise VLMError(f"no label shards (labels-*.json + .safetensors) in {d}")
    return normalised_config(json.loads(sides[0].read_text()).get("config", {}))


def read_shard(
    side: Path, feature_variant: str | FV.FeatureVariant | None = None
) -> tuple[dict[str, Any], list[LabeledExample]]:
    """(config, examples) of one shard, given its JSON sidecar (or its .safetensors), with
    `features` of `feature_variant` (None: the shard's primary; see the module doc). The
    returned config names the variant read in `feature_variant` and describes it in `features`."""
    from safetensors import safe_open

    side = Path(side)
    if side.suffix == ".safetensors":
        side = side.with_suffix(".json")
    meta = json.loads(side.read_text())
    cfg = normalised_config(meta.get("config", {}))
    stored = [FV.parse(v) for v in cfg["feature_variants"]]
    want = FV.parse(cfg["feature_variant"] if feature_variant is None else feature_variant)
    plan = derivation(stored, want, str(side))
    primary = FV.parse(cfg["feature_variant"])
    key = lambda src: "features" if src == primary else f"features.{src.name}"  # noqa: E731
    cfg.update(feature_variant=want.name, features=features_description(want))
    st = side.with_suffix(".safetensors")
    out = []
    with safe_open(str(st), framework="pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise VLMError(f"{st} is not a vSTREAM label shard ({FORMAT})")
        for m in meta.get("examples", []):
            p = f"e{m['index']}."
            g = lambda name, p=p: f.get_tensor(p + name)
            feats = features_by_plan(plan, lambda src, g=g: g(key(src)), lambda g=g: g("assignment"))
            out.append(
                LabeledExample(
                    index=int(m["index"]),
                    seed=int(m["seed"]),
                    family=m.get("family", ""),
                    features=feats,
                    masks=g("masks").bool(),
                    effects=g("effects"),
                    base=g("base"),
                    assignment=g("assignment"),
                    tokens=g("tokens"),
                    span_texts=[s["text"] for s in m["spans"]],
                    span_ranges=[(int(s["token_start"]), int(s["token_end"])) for s in m["spans"]],
                    trace=m.get("trace", ""),
                    question=m.get("question", ""),
                    feature_variant=want.name,
                )
            )
    return cfg, out


def load_labels(
    dirs: str | Path | Iterable[str | Path], feature_variant: str | FV.FeatureVariant | None = None
) -> tuple[dict[str, Any], list[LabeledExample]]:
    """All examples from one or more label folders (or shard files), sorted by index, with
    features of `feature_variant` (None: the first shard's primary variant; stored or derived,
    else refused). The folders must come from the same model and setup (refused otherwise)."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    config: dict[str, Any] | None = None
    seen: dict[tuple[str, int], LabeledExample] = {}
    for d in dirs:
        d = Path(d)
        sides = [d] if d.is_file() else _sidecars(d)
        if not sides:
            raise VLMError(f"no label shards (labels-*.json + .safetensors) in {d}")
        for side in sides:
            cfg, exs = read_shard(side, feature_variant)
            if config is None:
                config = cfg
                feature_variant = cfg["feature_variant"]  # every later shard reads the same variant
            else:
                keys = ("model", "model_type", "num_layers", "num_heads", "masks_per_example")
                _check_config(cfg, {k: config.get(k) for k in keys}, side)
            for e in exs:
                seen[(cfg.get("split", ""), e.index)] = e
    return config or {}, [seen[k] for k in sorted(seen)]


# ----------------------------------------------------------------------------------------------
# collection


def run_config(
    vlm: VLM,
    split: str,
    masks_per_example: int,
    keep_prob: float,
    k: int | None,
    backbone_name: str,
    seed: int,
    max_new_tokens: int,
    span_kinds: Sequence[str] = ("thought",),
    feature_variants: Sequence[str] = (FV.DEFAULT,),
) -> dict[str, Any]:
    variants = FV.names(feature_variants) or [FV.DEFAULT]
    return {
        "format": FORMAT,
        **model_identity(vlm),
        "split": split,
        "backbone": backbone_name,
        "k_rule": k_rule(k),
        "masks_per_example": int(masks_per_example),
        "keep_prob": float(keep_prob),
        "seed": int(seed),
        "max_new_tokens": int(max_new_tokens),
        "span_kinds": list(span_kinds),
        "ablation": OPERATOR,
        "features": features_description(FV.parse(variants[0])),
        "feature_variant": variants[0],
        "feature_variants": variants,
    }


def collect(
    vlm: VLM,
    n: int | None,
    split: str = "train",
    start: int = 0,
    masks_per_example: int = 32,
    keep_prob: float = 0.5,
    k: int | None = None,
    backbone: Backbone | str | None = None,
    seed: int = 0,
    max_new_tokens: int = 192,
    out: str | Path | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    shard_size: int = 25,
    progress: bool = True,
    span_kinds: Sequence[str] = ("thought",),
    data: DataSource | None = None,
    feature_variants: Sequence[str] = (FV.DEFAULT,),
) -> list[LabeledExample]:
    """Label shapes-world scenes `start .. start+n-1` of `split` (this process's share), or with
    `data` the user's rows `start .. start+n-1` (n None: all; `split` becomes the data's name).
    `feature_variants`: the `vstream.attr.features` variants to store (the first is primary).

    Returns this call's new examples. With `out`, they are also written as shards of
    `shard_size` examples, and examples already in `out` are skipped (resume). A user row whose
    image turns out unreadable is recorded as skipped with its reason, like a trace without spans.
    """
    from tqdm.auto import tqdm

    if not 0 < float(keep_prob) < 1:
        raise VLMError(f"keep_prob must be in (0, 1), got {keep_prob}")
    if int(masks_per_example) < 2:
        raise VLMError(f"masks_per_example must be >= 2, got {masks_per_example}")
    if not 0 <= int(process_index) < int(num_processes):
        raise VLMError(f"process_index {process_index} outside [0, {num_processes})")
    bb = load_backbone(backbone) if (backbone is None or isinstance(backbone, str)) else backbone
    by_index: dict[int, DataRow] = {}
    if data is not None:
        split = data.name
        chosen = data.rows[int(start) :] if n is None else data.rows[int(start) : int(start) + int(n)]
        by_index = {r.index: r for r in chosen}
        mine = [r.index for i, r in enumerate(chosen) if i % int(num_processes) == int(process_index)]
    else:
        mine = [start + i for i in range(int(n)) if i % int(num_processes) == int(process_index)]
    try:
        variants = FV.names(feature_variants) or [FV.DEFAULT]
    except ValueError as e:
        raise VLMError(str(e)) from e
    config = run_config(
        vlm, split, masks_per_example, keep_prob, k, bb.name, seed, max_new_tokens, span_kinds, variants
    )
    done = done_indices(Path(out), config) if out is not None else set()
    todo = [i for i in mine if i not in done]

    results: list[LabeledExample] = []
    buf: list[LabeledExample] = []
    skipped: list[dict[str, Any]] = []

    def flush() -> None:
        if out is not None and (buf or skipped):
            write_shard(Path(out), config, buf, skipped)
        buf.clear()
        skipped.clear()

    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        disable=not progress,
        desc=f"collect {split}" + (f" [{process_index}/{num_processes}]" if num_processes > 1 else ""),
        unit="ex",
    )
    try:
        for idx in todo:
            scene = by_index[idx] if data is not None else scenes(split, idx, 1)[0]
            try:
                ex = label_example(
                    vlm,
                    scene,
                    idx,
                    masks_per_example,
                    keep_prob,
                    k,
                    bb,
                    seed,
                    max_new_tokens,
                    span_kinds,
                    feature_variants=variants,
                )
                why = "no thinking span in the trace"
            except PlaceholderInTrace as e:
                ex, why = None, str(e)
            except VLMError as e:  # a user row's image that cannot be used
                if data is None:
                    raise
                ex, why = None, str(e)
            if ex is None:
                skipped.append({"index": idx, "seed": int(scene.seed), "why": why})
            else:
                results.append(ex)
                buf.append(ex)
            if len(buf) + len(skipped) >= int(shard_size):
                flush()
            bar.update(1)
        flush()
    finally:
        bar.close()
    return results
