"""The vSTREAM estimator: one linear map from a region's L*H attention features to its effect.

    python -m vstream train-estimator --labels runs/labels --out assets/estimator-demo.safetensors \
        --eval runs/labels-heldout

Model. For a span S and region k with features f_k in R^{L*H} (`vstream.attr.capture`), the
predicted ablation effect of region k is s_k = w . f_k + c (`predict`; w and the region bias c
are shared by all regions), and the predicted effect of ablating a region set v is
sum_{k in v} s_k + b (`predict_subsets`; the calibration intercept b once per set). The region
scores s_k are the attribution map. c matters because every ablated region costs the span
something on average (painting over half of an image is itself a shift, even where it held
background), so measured effects grow with the number of ablated regions |v|; c|v| models that
part, w . f the region-specific part. c shifts all regions of a span equally, so it never changes a map's ranking.

Training (`train`). Labels from `vstream.attr.labels` (32 random masks per example, keep p = 0.5).
Loss: minus the Pearson correlation, across the masks of each span, between predicted and
measured effects, averaged over spans (`pearson_loss`); spans whose measured effects do not
vary are left out. AdamW on mini-batches of spans; a validation share of the examples picks
the best epoch count (and gives the reported validation LDS), then the estimator is refit on
all examples for that many epochs. Details that the loss leaves open:

* Feature scaling: each feature column is divided by its root-mean-square over the training
  (span, region) rows while training, and that scale is folded back into `weight` afterwards,
  so the saved estimator takes raw features. Only scaling, no centring (a per-column offset
  would be one more constant per ablated region: the region bias's job).
* Initialisation: w = 1 (all ones in raw-feature space), c = 0, which is exactly the
  raw-attention baseline (features summed over all layers and heads); training starts from it.
* Anchor (`anchor`, default 0): adds anchor * |w/|w| - w0|^2 to the loss, w0 raw attention's
  direction (unit, in the scaled space): a prior that the map stays near raw attention unless
  the labels pull it away. With few labels (video spans) the free map can fit ablation effects
  in ways that do not carry over to new streams; the strength is chosen on validation data.
* Calibration: Pearson is blind to scale and offset, so after training one least-squares fit
  a * (sum_{k in v} s_k) + b ~ measured effect over all training (span, mask) pairs sets the
  scale (folded into `weight` and `region_bias`) and `bias`, making predictions comparable to
  effects in nats.

Options that the variant study (`vstream.attr.variant_study`) compares, all on stored labels:
`loss` ("pearson", the above; "mse" or "huber": squared or Huber error of the subset predictions
in nats, with one learned intercept, starting from raw attention scaled by least squares),
`weight_decay` (AdamW's, on the scaled weights), `region_bias`, `scaling` ("rms" above, or
"zscore": columns also centred, the centring folded into the region bias, so it needs one),
`columns` ("all"; "layers=A-B": only those layers' heads; "top=N": the N columns whose subset
sums correlate best with the measured effects on the training labels; the others' weights stay
0, so the estimator is still the same L*H map), `balance` (spans weighted 1 / their scene
family's span count in the Pearson loss, so that each family weighs the same: multi-step
families write several times more spans per scene than one-question ones and otherwise set the
map), and `feature_variant` (which
`vstream.attr.features` design the labels are read in; recorded in the file, so evaluation and
the live worker compute the same design, and applying it to other features is refused).

Evaluation: `lds` (linear datamodeling score) = mean over spans of the Spearman correlation,
across masks, of predicted and measured subset effects.

Files: safetensors (`weight` (L*H,), `region_bias` (1,), `bias` (1,)) with the metadata as JSON
in the safetensors header (`feature_variant` among it; a file without it reads the default
features); `load` refuses anything else (pickled .pt/.bin are never read) and refuses an
estimator made for another layer/head count, or (unless overridden) another model.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vstream.attr import features as FV
from vstream.attr import rowmath
from vstream.attr.labels import derive_examples, load_labels
from vstream.model import VLM, VLMError, model_name

__all__ = [
    "COLUMN_RULES",
    "FORMAT",
    "LOSSES",
    "SCALINGS",
    "LinearEstimator",
    "evaluate",
    "family_weights",
    "in_ranges",
    "lds",
    "load",
    "pearson_loss",
    "r2_score",
    "RawAttention",
    "check_options",
    "check_variant",
    "seed_ranges",
    "select_columns",
    "subset_design",
    "train",
]

FORMAT = "vstream-estimator/1"
HUBER_DELTA = 1.0  # nats: errors beyond it count linearly
LOSSES = {
    "pearson": "-mean Pearson r across masks per span",
    "mse": "mean squared error of the subset predictions (nats), one intercept",
    "huber": f"Huber loss (delta {HUBER_DELTA:g} nats) of the subset predictions, one intercept",
}
SCALINGS = {
    "rms": "column RMS, folded into weight",
    "zscore": "column mean and standard deviation over the training rows, folded into weight and region_bias",
}
COLUMN_RULES = ("all", "layers=A-B", "top=N")
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npy", ".npz"}


class Estimator(Protocol):
    """Anything that maps a span's (K, L*H) region features to (K,) predicted ablation effects:
    a `LinearEstimator`, raw attention, or a stand-in in a benchmark or test."""

    def predict(self, features: torch.Tensor) -> torch.Tensor: ...


class LinearEstimator(torch.nn.Module):
    """Region scores = features @ w + c (w: one weight per feature column, L*H for most feature
    variants, 2*L*H for a "raw" one; c: `region_bias`, both shared by all regions); subset
    prediction = masks @ scores + b (`bias`, once per subset). The variant is `meta`'s
    "feature_variant"."""

    def __init__(self, num_layers: int, num_heads: int, meta: dict[str, Any] | None = None):
        super().__init__()
        if int(num_layers) < 1 or int(num_heads) < 1:
            raise ValueError(f"need num_layers, num_heads >= 1, got {num_layers}, {num_heads}")
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.meta: dict[str, Any] = dict(meta or {})
        blocks = FV.parse(self.meta.get("feature_variant", FV.DEFAULT)).blocks
        self.weight = torch.nn.Parameter(torch.ones(blocks * self.num_layers * self.num_heads))
        self.region_bias = torch.nn.Parameter(torch.zeros(()))
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.meta.update(num_layers=self.num_layers, num_heads=self.num_heads)

    @property
    def num_features(self) -> int:
        return int(self.weight.numel())

    @property
    def feature_variant(self) -> str:
        """The `vstream.attr.features` variant this estimator reads (the default for files
        written before variants existed)."""
        return FV.parse(self.meta.get("feature_variant", FV.DEFAULT)).name

    def extra_repr(self) -> str:
        return f"L={self.num_layers}, H={self.num_heads}, model={self.meta.get('model')!r}"

    def _check(self, features: torch.Tensor) -> torch.Tensor:
        f = torch.as_tensor(features)
        if f.shape[-1] != self.num_features:
            n = FV.parse(self.feature_variant).blocks
            blocks = f"{n} x " if n > 1 else ""
            raise VLMError(
                f"features have {f.shape[-1]} columns but this estimator expects {blocks}L*H = "
                f"{blocks}{self.num_layers}*{self.num_heads} = {self.num_features} ({self.feature_variant} features)"
            )
        return f.to(device=self.weight.device, dtype=self.weight.dtype)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(..., K, L*H) features -> (..., K) per-region predicted effects (the attribution)."""
        return self._check(features) @ self.weight + self.region_bias

    def numpy_weights(self) -> tuple[np.ndarray, np.float32]:
        """A snapshot of (w (L*H,) float32, c) for numpy scoring (`rowmath.linear_scores`): the
        live worker's CPU path, here or in the attribution process."""
        w = self.weight.detach().float().cpu().numpy().copy()
        return w, np.float32(self.region_bias.detach().float().item())

    def numpy_predictor(self) -> Callable[[np.ndarray], np.ndarray]:
        """`predict` as a numpy function of (K, L*H) float32 features, on a snapshot of the
        weights: the live worker's CPU path, where torch's per-call dispatch costs more than the
        arithmetic (and each torch call hands the GIL back and forth with generation)."""
        w, c = self.numpy_weights()
        return lambda features: rowmath.linear_scores(features, w, c)

    def predict_subsets(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(K, L*H) features, (M, K) masks (True = ablated) -> (M,) predicted subset effects."""
        s = self.predict(features)
        return torch.as_tensor(masks).to(s.dtype) @ s + self.bias

    forward = predict

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise VLMError(f"estimator files are .safetensors, got {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format=FORMAT, num_layers=self.num_layers, num_heads=self.num_heads)
        tensors = {
            "weight": self.weight.detach().float().cpu().contiguous(),
            "region_bias": self.region_bias.detach().float().cpu().reshape(1).contiguous(),
            "bias": self.bias.detach().float().cpu().reshape(1).contiguous(),
        }
        header = {
            "format": FORMAT,
            "vstream_estimator": json.dumps(meta, sort_keys=True),
            "model": str(meta.get("model", "")),
            "num_layers": str(self.num_layers),
            "num_heads": str(self.num_heads),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)
        path.chmod(0o644)  # safetensors writes 0600
        return path

    def check_compatible(self, vlm: VLM, allow_model_mismatch: bool = False, where: str = "estimator") -> None:
        """Raise a one-line VLMError if this estimator cannot read `vlm`'s attention features."""

        name, arch = model_name(vlm), str(vlm.arch)
        mine = self.meta.get("model", "?")
        if (int(vlm.num_layers), int(vlm.num_heads)) != (self.num_layers, self.num_heads):
            raise VLMError(
                f"{where} was trained for {mine!r} with {self.num_layers} layers x {self.num_heads} heads, "
                f"but the loaded model {name!r} has {vlm.num_layers} layers x {vlm.num_heads} heads: "
                "train an estimator for this model (python -m vstream collect, then train-estimator)"
            )
        if not allow_model_mismatch and (mine != name or self.meta.get("model_type", arch) != arch):
            raise VLMError(
                f"{where} was trained for model {mine!r} ({self.meta.get('model_type', '?')}), not for the loaded "
                f"{name!r} ({arch}); allow a model mismatch to use it anyway"
            )


def load(path: str | Path, vlm: VLM | None = None, allow_model_mismatch: bool = False) -> LinearEstimator:
    """Read an estimator file, refusing non-safetensors files and, given `vlm`, an estimator
    for another layer/head count or (unless `allow_model_mismatch`) another model."""
    path = Path(path)
    if not path.is_file():
        raise VLMError(f"estimator file not found: {path}")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise VLMError(
            f"{path.name} is not a safetensors file: pickled checkpoints (.pt/.bin/...) are never "
            "loaded; save the estimator as .safetensors"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise VLMError(
            f"{path.name} is not a readable safetensors file ({type(e).__name__}); pickled checkpoints are never loaded"
        ) from e
    if header.get("format") != FORMAT or "vstream_estimator" not in header:
        raise VLMError(f"{path.name} is a safetensors file but not a vSTREAM estimator ({FORMAT})")
    try:
        meta = json.loads(header["vstream_estimator"])
        L, H = int(meta["num_layers"]), int(meta["num_heads"])
        variant = FV.parse(meta.get("feature_variant", FV.DEFAULT))
    except (ValueError, KeyError, TypeError) as e:
        raise VLMError(f"{path.name}: broken estimator metadata ({type(e).__name__}: {e})") from e
    w, b = tensors.get("weight"), tensors.get("bias")
    c = tensors.get("region_bias", torch.zeros(1))
    n = variant.blocks * L * H
    if w is None or b is None or tuple(w.shape) != (n,) or b.numel() != 1 or c.numel() != 1:
        raise VLMError(
            f"{path.name}: expected weight ({n},) and bias (1,) for {variant.name} features of {L} layers x {H} heads"
        )
    est = LinearEstimator(L, H, meta)
    with torch.no_grad():
        est.weight.copy_(w.float())
        est.bias.copy_(b.float().reshape(()))
        est.region_bias.copy_(c.float().reshape(()))
    est.eval()
    if vlm is not None:
        est.check_compatible(vlm, allow_model_mismatch, where=f"estimator {path.name}")
    return est


# ----------------------------------------------------------------------------------------------
# metrics and losses


def pearson_loss(
    pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """-mean over spans of Pearson r across masks: pred, target (S, M); `weights` (S,) makes it
    a weighted mean. Spans whose target does not vary are left out (0 if none is left)."""
    p = pred - pred.mean(dim=-1, keepdim=True)
    t = target - target.mean(dim=-1, keepdim=True)
    ts = t.pow(2).sum(-1).sqrt()
    r = (p * t).sum(-1) / (p.pow(2).sum(-1).sqrt() * ts + eps)
    ok = ts > eps
    if not bool(ok.any()):
        return pred.sum() * 0.0
    if weights is None:
        return -r[ok].mean()
    w = weights[ok]
    return -(r[ok] * w).sum() / w.sum().clamp_min(eps)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def lds(pred_subset_effects: Any, actual: Any, return_per_span: bool = False) -> float | tuple[float, np.ndarray]:
    """Linear datamodeling score: mean over spans of Spearman rho (across masks) between
    predicted and measured subset effects. Inputs (S, M) (or lists of (M,) rows, any M).

    Spearman = Pearson of average ranks (what scipy.stats.spearmanr computes), vectorised.
    Spans whose measured effects are constant are left out (NaN per span); a constant
    prediction scores 0.
    """
    rows_p = [np.asarray(p, dtype=np.float64).reshape(-1) for p in pred_subset_effects]
    rows_a = [np.asarray(a, dtype=np.float64).reshape(-1) for a in actual]
    if len(rows_p) != len(rows_a):
        raise ValueError(f"{len(rows_p)} predicted rows vs {len(rows_a)} measured")
    rho = np.full(len(rows_a), np.nan)
    by_m: dict[int, list[int]] = {}
    for i, (p, a) in enumerate(zip(rows_p, rows_a)):
        if p.shape != a.shape:
            raise ValueError(f"span {i}: {p.shape} predictions vs {a.shape} measurements")
        by_m.setdefault(a.size, []).append(i)
    for m, idx in by_m.items():
        if m < 2:
            continue
        rp = _ranks(np.stack([rows_p[i] for i in idx]))
        ra = _ranks(np.stack([rows_a[i] for i in idx]))
        rp -= rp.mean(-1, keepdims=True)
        ra -= ra.mean(-1, keepdims=True)
        sp, sa = np.sqrt((rp**2).sum(-1)), np.sqrt((ra**2).sum(-1))
        r = np.where(sp > 0, (rp * ra).sum(-1) / np.where(sp > 0, sp, 1) / np.where(sa > 0, sa, 1), 0.0)
        r[sa == 0] = np.nan
        rho[idx] = r
    score = float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
    return (score, rho) if return_per_span else score


def r2_score(pred: Any, actual: Any) -> float:
    """1 - SSE/SST over all (span, mask) pairs."""
    p = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in pred])
    a = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in actual])
    sst = ((a - a.mean()) ** 2).sum()
    return float(1 - ((a - p) ** 2).sum() / sst) if sst > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# data


def subset_design(examples: Sequence[Any], count_column: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per span, the features summed over each mask's ablated regions: X (S, M, L*H), and the
    measured effects Y (S, M); plus each span's example position. The prediction for all masks
    of all spans is then X @ w + b. With `count_column`, X gets one more column: the number of
    ablated regions (the feature that the region bias multiplies)."""
    xs, ys, owner = [], [], []
    for i, e in enumerate(examples):
        m = e.masks.float()  # (M, K)
        for s in range(e.n_spans):
            f = e.features[s].float()
            if count_column:
                f = torch.cat([f, torch.ones(f.shape[0], 1)], dim=1)
            xs.append(m @ f)
            ys.append(e.effects[:, s].float())
            owner.append(i)
    if not xs:
        raise VLMError("no labelled spans to train on")
    ms = {x.shape[0] for x in xs}
    if len(ms) != 1:
        raise VLMError(f"label sets with different mask counts {sorted(ms)} cannot be mixed")
    return torch.stack(xs), torch.stack(ys), owner


def family_weights(examples: Sequence[Any], owner: Sequence[int]) -> torch.Tensor:
    """(S,) per-span weights, 1 / (spans of the span's scene family), for the spans of
    `subset_design(examples)` (`owner`: each span's example): every family then weighs the same,
    however many spans its traces have."""
    fam = [str(getattr(examples[i], "family", "")) for i in owner]
    counts = collections.Counter(fam)
    return torch.tensor([1.0 / counts[f] for f in fam])


class RawAttention:
    """The raw-attention baseline as an estimator: region score = features summed over all
    layers and heads (what a `LinearEstimator` starts from); the fallback for a model that has
    no trained estimator yet."""

    meta = {"model": "raw attention"}

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(features).float().sum(-1)


def check_variant(estimator: LinearEstimator, examples: Sequence[Any]) -> None:
    """Refuse examples whose features are another variant than the estimator reads."""
    want = estimator.feature_variant
    other = sorted({FV.parse(getattr(e, "feature_variant", FV.DEFAULT)).name for e in examples} - {want})
    if other:
        raise VLMError(
            f"the estimator reads feature variant {want!r}, these labels hold {', '.join(map(repr, other))}: "
            "load them with load_labels(..., feature_variant=estimator.feature_variant)"
        )


def evaluate(estimator: LinearEstimator | None, examples: Sequence[Any]) -> dict[str, float]:
    """LDS / R^2 of the estimator (or, with None, of raw attention) on labelled examples; an
    estimator refuses examples of another feature variant."""
    if estimator is not None:
        check_variant(estimator, examples)
    x, y, _ = subset_design(examples, count_column=True)
    with torch.no_grad():
        if estimator is None:
            pred = x[..., :-1].sum(-1)
        else:
            w = torch.cat([estimator.weight.detach().float().cpu(), estimator.region_bias.detach().float().cpu()[None]])
            pred = x @ w + estimator.bias.detach().float().cpu()
    score, per = lds(pred.numpy(), y.numpy(), return_per_span=True)
    out = {
        "lds": score,
        "spans": int(y.shape[0]),
        "spans_scored": int(np.isfinite(per).sum()),
        "pearson": float(-pearson_loss(pred, y)),
    }
    if estimator is not None:
        out["r2"] = r2_score(pred.numpy(), y.numpy())
    return out


# ----------------------------------------------------------------------------------------------
# training


def seed_ranges(seeds: Iterable[int]) -> list[list[int]]:
    """Sorted seeds as half-open runs [[lo, hi), ...] (compact metadata)."""
    out: list[list[int]] = []
    for s in sorted(set(int(v) for v in seeds)):
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def in_ranges(seed: int, ranges: Sequence[Sequence[int]]) -> bool:
    return any(lo <= int(seed) < hi for lo, hi in ranges)


def check_options(loss: str, scaling: str, region_bias: bool, anchor: float, balance: bool) -> None:
    """Refuse `train` options that do not go together, before any label is read (a variant
    study checks all its variants this way before training the first)."""
    if loss not in LOSSES:
        raise VLMError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    if scaling not in SCALINGS:
        raise VLMError(f"unknown feature scaling {scaling!r}; choose from {', '.join(SCALINGS)}")
    if scaling == "zscore" and not region_bias:
        raise VLMError("zscore scaling folds the column means into the region bias: it needs the region bias")
    if not (anchor >= 0 and math.isfinite(anchor)):
        raise VLMError(f"anchor must be a finite number >= 0, got {anchor}")
    if balance and loss != "pearson":
        raise VLMError("family balancing weighs the Pearson loss: use it with loss='pearson'")


def train(
    label_dirs: str | Path | Iterable[str | Path] | Sequence[Any],
    epochs: int = 200,
    lr: float = 0.02,
    val_fraction: float = 0.1,
    seed: int = 0,
    batch_spans: int = 512,
    weight_decay: float = 1e-4,
    progress: bool = True,
    num_layers: int | None = None,
    num_heads: int | None = None,
    refit: bool = True,
    region_bias: bool = True,
    loss: str = "pearson",
    scaling: str = "rms",
    columns: str = "all",
    feature_variant: str | None = None,
    anchor: float = 0.0,
    balance: bool = False,
) -> tuple[LinearEstimator, dict[str, Any]]:
    """Fit the estimator on label folders (or a list of `LabeledExample`s); see the module doc.

    Validation examples (a `val_fraction` of the examples, whole examples, seeded) pick the
    best epoch and are reported (with the raw-attention baseline); with `refit` the final
    estimator is then trained on all examples for that many epochs. `region_bias`: learn the
    per-region constant c (else c = 0). `loss`, `scaling`, `columns`: see the module doc.
    `feature_variant`: read the labels in this variant (None: as stored, the primary); one that
    the labels neither hold nor derive is refused. `anchor`: weight of a penalty on the
    direction of w moving away from raw attention's (see the module doc). `balance`: every
    scene family weighs the same in the Pearson loss (see the module doc)."""

    check_options(loss, scaling, region_bias, anchor, balance)
    try:
        variant = None if feature_variant is None else FV.parse(feature_variant).name
    except ValueError as e:
        raise VLMError(str(e)) from e
    if isinstance(label_dirs, (str, Path)) or (
        isinstance(label_dirs, (list, tuple)) and label_dirs and isinstance(label_dirs[0], (str, Path))
    ):
        config, examples = load_labels(label_dirs, variant)
        sources = [str(d) for d in ([label_dirs] if isinstance(label_dirs, (str, Path)) else label_dirs)]
    else:
        examples = list(label_dirs)
        config, sources = {}, []
        held = sorted({FV.parse(getattr(e, "feature_variant", FV.DEFAULT)).name for e in examples})
        if len(held) > 1:
            raise VLMError(f"examples of different feature variants {held} cannot be trained together")
        if variant is not None and held and held != [variant]:
            examples = derive_examples(examples, variant)  # VLMError when they cannot give it
    if not examples:
        raise VLMError("no labelled examples")
    variant = FV.parse(getattr(examples[0], "feature_variant", FV.DEFAULT)).name
    L = int(num_layers or config.get("num_layers", 0) or 0)
    H = int(num_heads or config.get("num_heads", 0) or 0)
    lh = int(examples[0].features.shape[-1])
    blocks = FV.parse(variant).blocks
    if not L or not H:
        L, H = 1, lh // blocks
    if blocks * L * H != lh:
        raise VLMError(
            f"{variant} features have {lh} columns, not {blocks} x num_layers x num_heads = {blocks} x {L} x {H}"
        )

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))
    n_val = int(round(len(examples) * float(val_fraction))) if len(examples) > 1 else 0
    n_val = min(n_val, len(examples) - 1)
    val_ex = [examples[i] for i in sorted(order[:n_val])]
    tr_ex = [examples[i] for i in sorted(order[n_val:])]

    kept = select_columns(columns, examples, L, H)
    t0 = time.perf_counter()
    opts = _FitOptions(lr, weight_decay, batch_spans, seed, region_bias, loss, scaling, kept, anchor, balance)
    fit = lambda exs, val, n_ep, desc: _fit(exs, val, lh, n_ep, opts, progress, desc)
    est = LinearEstimator(L, H, {"feature_variant": variant})
    w_raw, b, best_ep = fit(tr_ex, val_ex, epochs, "train estimator")
    _set(est, w_raw, b)
    report: dict[str, Any] = {"best_epoch": best_ep, "examples": {"train": len(tr_ex), "val": len(val_ex)}}
    report["train"], report["train_raw_attention"] = evaluate(est, tr_ex), evaluate(None, tr_ex)
    if val_ex:
        report["val"], report["val_raw_attention"] = evaluate(est, val_ex), evaluate(None, val_ex)
    final = tr_ex
    if val_ex and refit:  # the validation examples only chose the epoch count: train on everything
        final = examples
        w_raw, b, _ = fit(examples, [], best_ep + 1, "refit on all")
        _set(est, w_raw, b)
        report["refit_on_all"] = {"examples": len(examples), "epochs": best_ep + 1, "train": evaluate(est, examples)}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    est.meta.update(
        {
            **{
                k: config[k]
                for k in (
                    "model",
                    "model_type",
                    "hidden_size",
                    "vocab_size",
                    "weights",
                    "backbone",
                    "k_rule",
                    "split",
                    "ablation",
                    "features",
                    "masks_per_example",
                    "keep_prob",
                )
                if k in config
            },
            "num_layers": L,
            "num_heads": H,
            "trained_examples": len(final),
            "validation_examples": len(val_ex),
            "refit_on_all": bool(final is examples),
            "train_seeds": seed_ranges(int(e.seed) for e in final),  # [[lo, hi), ...] runs
            "label_dirs": sources,
            "epochs": int(epochs),
            "best_epoch": best_ep,
            "lr": float(lr),
            "loss": LOSSES[loss],
            "loss_name": loss,
            "weight_decay": float(weight_decay),
            "anchor": float(anchor),
            "family_balance": bool(balance),
            "feature_scaling": SCALINGS[scaling],
            "columns": columns,
            **({"kept_columns": kept} if kept is not None else {}),
            "feature_variant": variant,
            "init": "raw attention (w = 1)",
            "calibration": "least squares a*(subset sum)+b, a folded into weight and region_bias, b = bias",
            "region_bias": bool(region_bias),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return est, report


def _set(est: LinearEstimator, w: torch.Tensor, b: float) -> None:
    """w: (L*H + 1,) = weights then the region bias."""
    with torch.no_grad():
        est.weight.copy_(w[:-1].float())
        est.region_bias.fill_(float(w[-1]))
        est.bias.fill_(float(b))
    est.eval()


class _FitOptions:
    """What one optimisation run is configured with (see `train`)."""

    def __init__(
        self,
        lr: float,
        weight_decay: float,
        batch_spans: int,
        seed: int,
        region_bias: bool = True,
        loss: str = "pearson",
        scaling: str = "rms",
        columns: list[int] | None = None,
        anchor: float = 0.0,
        balance: bool = False,
    ):
        self.lr, self.weight_decay, self.batch_spans, self.seed = float(lr), float(weight_decay), int(batch_spans), seed
        self.region_bias, self.loss, self.scaling, self.columns = region_bias, loss, scaling, columns
        self.anchor, self.balance = float(anchor), bool(balance)


def _loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(S, M) predictions, (S, M) measured effects -> scalar loss."""
    if name == "pearson":
        return pearson_loss
    if name == "mse":
        return torch.nn.functional.mse_loss
    return lambda p, t: torch.nn.functional.huber_loss(p, t, delta=HUBER_DELTA)


def _fit(
    tr_ex: Sequence[Any],
    val_ex: Sequence[Any],
    lh: int,
    epochs: int,
    opts: _FitOptions,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, float, int]:
    """One optimisation run: (calibrated raw-space [weight, region bias] (L*H+1,), bias, best epoch).

    The region bias is the weight of a constant-1 region feature (its subset sum = the number
    of ablated regions); without `region_bias` that column is kept at 0, and so are the columns
    outside `opts.columns`. The best epoch is the one with the lowest loss on `val_ex`."""
    from tqdm.auto import tqdm

    x, y, owner = subset_design(tr_ex, count_column=True)
    keep = y.std(-1) > 1e-8
    x, y = x[keep], y[keep]
    if x.shape[0] == 0:
        raise VLMError("every training span has constant measured effects: nothing to learn")
    sw = family_weights(tr_ex, owner)[keep] if opts.balance else None
    xv, yv, owner_v = subset_design(val_ex, count_column=True) if val_ex else (None, None, [])
    swv = family_weights(val_ex, owner_v) if opts.balance and val_ex else None

    feats = torch.cat([e.features.reshape(-1, lh).float() for e in tr_ex])
    if opts.scaling == "zscore":  # x' = (x - |v| mu) / sd on the subset sums; |v| = the count column
        mu = torch.cat([feats.mean(0), torch.zeros(1)])
        scale = torch.cat([feats.std(0, unbiased=False).clamp_min(1e-12), torch.ones(1)])
    else:
        mu = torch.zeros(lh + 1)
        scale = torch.cat([feats.pow(2).mean(0).sqrt().clamp_min(1e-12), torch.ones(1)])  # column RMS
    live = torch.ones(lh + 1)
    if not opts.region_bias:
        live[-1] = 0.0
    if opts.columns is not None:
        live[:lh] = 0.0
        live[opts.columns] = 1.0
    xs = (x - x[..., -1:] * mu) / scale * live
    xvs = (xv - xv[..., -1:] * mu) / scale * live if xv is not None else None

    torch.manual_seed(opts.seed)
    init = scale.clone() * live  # == raw attention (w = 1) in raw space, up to scale
    init[-1] = float((mu[:lh] * live[:lh]).sum()) if opts.scaling == "zscore" else 0.0  # (zscore: c = sum mu)
    norm = init[:lh].norm().clamp_min(1e-12)
    w = torch.nn.Parameter(init / norm)
    intercept = torch.nn.Parameter(torch.zeros(()))  # mse / huber only: the subset prediction's offset
    params = [w] if opts.loss == "pearson" else [w, intercept]
    if opts.loss != "pearson":  # start from raw attention calibrated in nats (a * X w + b), not only its direction
        with torch.no_grad():
            p = (xs @ w).reshape(-1).double()
            a, b = torch.linalg.lstsq(torch.stack([p, torch.ones_like(p)], 1), y.reshape(-1, 1).double()).solution[:, 0]
            w.mul_(float(a))
            intercept.fill_(float(b))
    base_loss = _loss_fn(opts.loss)
    loss_fn = lambda p, t, sw=None: base_loss(p, t) if sw is None else pearson_loss(p, t, weights=sw)  # noqa: E731
    predict = lambda xx: xx @ (w * live) + (intercept if opts.loss != "pearson" else 0.0)
    w0 = (init / norm)[:lh].clone()  # raw attention's direction (scaled space, region bias aside)

    def drift() -> torch.Tensor:  # squared distance of w's direction from raw attention's
        wl = (w * live)[:lh]
        return (wl / wl.norm().clamp_min(1e-12) - w0).pow(2).sum()

    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    best = (float("inf"), w.detach().clone(), 0)
    bar = tqdm(range(int(epochs)), disable=not progress, desc=desc, unit="epoch")
    g = torch.Generator().manual_seed(opts.seed)
    for ep in bar:
        perm = torch.randperm(xs.shape[0], generator=g)
        for s in range(0, xs.shape[0], opts.batch_spans):
            idx = perm[s : s + opts.batch_spans]
            loss = loss_fn(predict(xs[idx]), y[idx], None if sw is None else sw[idx])
            if opts.anchor > 0:
                loss = loss + opts.anchor * drift()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            tl = float(loss_fn(predict(xs), y, sw))
            vl = float(loss_fn(predict(xvs), yv, swv)) if xvs is not None else tl
        if vl < best[0] or xvs is None:  # without validation: the last epoch
            best = (vl, w.detach().clone(), ep)
        if opts.loss == "pearson":
            bar.set_postfix(train_r=f"{-tl:.3f}", val_r=f"{-vl:.3f}")
        else:
            bar.set_postfix(train_loss=f"{tl:.3f}", val_loss=f"{vl:.3f}")
    bar.close()

    w_raw = best[1] * live / scale  # fold the feature scaling back in ...
    w_raw[-1] = w_raw[-1] - (w_raw[:lh] * mu[:lh]).sum()  # ... and the centring into the region bias
    with torch.no_grad():  # calibration: effect ~ a * (X w) + b
        p = (x @ w_raw).reshape(-1).double()
        t = y.reshape(-1).double()
        A = torch.stack([p, torch.ones_like(p)], 1)
        a, b = torch.linalg.lstsq(A, t[:, None]).solution[:, 0].tolist()
    return w_raw * a, float(b), int(best[2])


def select_columns(spec: str, examples: Sequence[Any], num_layers: int, num_heads: int) -> list[int] | None:
    """The feature columns an estimator may use (None: all), by rule (`COLUMN_RULES`):
    "all"; "layers=A-B" (or "layers=A"): the heads of layers A..B; "top=N": the N columns whose
    subset sums (over each mask's ablated regions) have the highest |Pearson r| with the measured
    effects across masks, averaged over the examples' spans (chosen on the labels given: the
    training labels). With a "raw" feature variant (two L*H blocks) a layer rule keeps those
    layers' heads in both blocks."""
    spec = (spec or "all").strip()
    lh = int(examples[0].features.shape[-1]) if examples else num_layers * num_heads
    blocks = max(1, lh // (num_layers * num_heads))
    if spec == "all":
        return None
    rule, _, arg = spec.partition("=")
    try:
        if rule == "layers":
            lo, _, hi = arg.partition("-")
            a, b = int(lo), int(hi or lo)
            if not 0 <= a <= b < num_layers:
                raise ValueError
            step = num_layers * num_heads
            return [g * step + c for g in range(blocks) for c in range(a * num_heads, (b + 1) * num_heads)]
        if rule == "top":
            n = int(arg)
            if not 0 < n <= lh:
                raise ValueError
            x, y, _ = subset_design(examples)
            xc, yc = x - x.mean(1, keepdim=True), (y - y.mean(1, keepdim=True))[..., None]
            den = (xc.pow(2).sum(1) * yc.pow(2).sum(1)).sqrt()  # (S, L*H)
            r = torch.where(den > 0, (xc * yc).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))
            ok = y.std(-1) > 1e-8
            score = r[ok].abs().mean(0) if bool(ok.any()) else torch.zeros(lh)
            return sorted(int(i) for i in torch.argsort(-score, stable=True)[:n])
    except ValueError:
        pass
    raise VLMError(f"bad column rule {spec!r}: use all, layers=A-B (0 <= A <= B < {num_layers}) or top=N (1..{lh})")


def heldout_report(est: LinearEstimator, label_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """LDS / R^2 of `est` and of raw attention on held-out label folders, recorded in the
    estimator's metadata too; refuses labels of another model or sharing training seeds, and
    reads them in the estimator's feature variant (refused when they cannot give it)."""
    cfg, held = load_labels(label_dirs, est.feature_variant)
    if cfg.get("model") != est.meta.get("model") or cfg.get("num_heads") != est.num_heads:
        raise VLMError(f"--eval labels come from {cfg.get('model')!r}, the estimator from {est.meta.get('model')!r}")
    overlap = [e.seed for e in held if in_ranges(int(e.seed), est.meta["train_seeds"])]
    if overlap:
        raise VLMError(f"--eval labels share {len(overlap)} scene seeds with the training labels")
    report = {"heldout": evaluate(est, held), "heldout_raw_attention": evaluate(None, held)}
    est.meta["heldout"] = {
        "label_dirs": [str(d) for d in label_dirs],
        **report["heldout"],
        "raw_attention_lds": report["heldout_raw_attention"]["lds"],
    }
    return report
