"""Image -> K connected semantic regions, mapped onto a VLM's image tokens.

vSTREAM attributes a thinking span to *regions* rather than to single tokens: a region is an
interpretable unit (an object, a text block) and K of them keep the estimator and the random
ablation masks small. Following the paper, regions are Ward agglomerative clusters of a vision
backbone's patch features under a grid connectivity constraint, so every region is one
connected piece of the image. They are then mapped to the VLM's N image tokens as a 0/1 matrix
M (K x N): each token belongs to the region covering most of its area.

The backbone is pluggable because DINOv3 (the paper's choice) has gated weights:

* `PixelBackbone` ("pixels", the default): colour statistics of the image itself, offline,
  deterministic and fast. Enough for flat-colour worlds such as `vstream.world.shapes`.
* `DinoV3Backbone`: DINOv3 ViT patch tokens through transformers, from a local folder or a hub
  id (safetensors only). Its image processor needs torchvision, so we preprocess with PIL.

The library never imports gradio.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from vstream.attr.partitions import PARTITIONS
from vstream.model import (
    LOAD_LOCK,
    VLMError,
    VLMInputs,
    normalize_image_with_size,
    read_model_config,
    resolve_device,
    resolve_model_path,
)

__all__ = [
    "K_MAX",
    "K_MIN",
    "Backbone",
    "DinoV3Backbone",
    "PixelBackbone",
    "Regions",
    "VLMError",
    "auto_k",
    "compute_regions",
    "load_backbone",
    "regions_for",
    "rgb_to_lab",
]

log = logging.getLogger(__name__)

K_MIN, K_MAX = 16, 128  # the paper's range of region counts
TOKENS_PER_REGION = 4  # auto K: about one region per 2x2 block of VLM tokens


# ----------------------------------------------------------------------------------------------
# backbones


@runtime_checkable
class Backbone(Protocol):
    """Anything that turns an image into a grid of patch features.

    Features must be comparable by Euclidean distance (Ward minimises within-region variance).
    The grid covers the whole image uniformly: patch (i, j) is the [i/h, (i+1)/h) x
    [j/w, (j+1)/w) fraction of it, whatever resizing the backbone does internally.
    """

    name: str

    def patch_features(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """(h, w, D) float32 features and the grid (h, w)."""
        ...


_V = np.arange(256, dtype=np.float64) / 255.0
_SRGB_LINEAR = np.where(_V <= 0.04045, _V / 12.92, ((_V + 0.055) / 1.055) ** 2.4).astype(np.float32)
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=np.float32,
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) sRGB -> float32 CIE Lab (D65): L in [0, 100], a/b roughly [-128, 127].

    Lab is roughly perceptually uniform, so Euclidean distances between colours mean what Ward
    assumes they mean (RGB distances overweight green and bright colours)."""
    lin = _SRGB_LINEAR[np.asarray(rgb, dtype=np.uint8)]
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    d = 6.0 / 29.0
    f = np.where(xyz > d**3, np.cbrt(np.maximum(xyz, 0)), xyz / (3 * d * d) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


@dataclass
class PixelBackbone:
    """The offline default: per-patch colour statistics, no weights.

    Each patch of an about `grid` x `grid` grid (same area for other aspect ratios) gets
    [mean Lab / 100, std Lab / 100 * std_weight, (y, x) / longer side * pos_weight]. The mean separates
    objects from background; the std (weighted low, so object outlines do not become their own
    rings) tells texture from flat colour; the small position term breaks ties, so uniform
    areas (or a blank image) split into compact blobs instead of arbitrary snakes.
    Statistics come from `sub` x `sub` area-averaged samples per patch. ~10 ms for 224x224.
    """

    grid: int = 48  # 224 px -> ~4.7 px patches, 6x6 per 28 px Qwen2.5-VL token
    sub: int = 4
    std_weight: float = 0.25
    pos_weight: float = 0.5
    name: str = "pixels"

    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) patch grid for an image of (w, h) pixels: ~grid^2 patches, at most 1 px each."""
        w_px, h_px = size
        s = self.grid / float(np.sqrt(w_px * h_px))
        h = int(min(h_px, max(1, round(h_px * s))))
        w = int(min(w_px, max(1, round(w_px * s))))
        return h, w

    def patch_features(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        img = image if image.mode == "RGB" else image.convert("RGB")
        h, w = self.grid_for(img.size)
        sub = max(1, int(self.sub))
        # BOX = exact area average, so sample (i, j) covers a uniform fraction of the image
        small = np.asarray(img.resize((w * sub, h * sub), Image.Resampling.BOX))
        lab = rgb_to_lab(small).reshape(h, sub, w, sub, 3) / 100.0
        mean = lab.mean(axis=(1, 3))
        std = lab.std(axis=(1, 3))
        side = float(max(h, w))
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / side, (np.arange(w) + 0.5) / side, indexing="ij")
        pos = np.stack([ys, xs], axis=-1) * self.pos_weight
        feats = np.concatenate([mean, std * self.std_weight, pos], axis=-1).astype(np.float32)
        return feats, (h, w)


_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


class DinoV3Backbone:
    """DINOv3 ViT patch tokens (the paper's backbone), loaded with transformers.AutoModel.

    The sequence is [CLS, registers (config.num_register_tokens), patches row-major]; we keep
    the patches. `normalize` L2-normalises each patch feature, so Ward works on cosine geometry
    (DINO feature norms vary with content and would otherwise dominate). Preprocessing follows
    preprocessor_config.json (rescale -> resize -> normalise, like DINOv3ViTImageProcessor) with
    PIL + numpy, since transformers' processor needs torchvision. `image_size`, if given,
    overrides the processor's fixed size: the image keeps its aspect ratio at about
    image_size^2 pixels (DINOv3 handles any patch-multiple size thanks to RoPE).
    """

    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        image_size: int | None = None,
        normalize: bool = True,
    ):

        try:
            path = resolve_model_path(str(name_or_path), trust_remote_code=False)
        except VLMError as e:
            raise VLMError(f"DINOv3 backbone: {e}") from e
        raw = read_model_config(path, "DINOv3 model")
        if raw.get("model_type") != "dinov3_vit":
            raise VLMError(f"{path} is not a DINOv3 ViT (model_type {raw.get('model_type')!r}, expected 'dinov3_vit')")
        if not any(path.glob("*.safetensors")):
            raise VLMError(f"no .safetensors weights in {path}; only safetensors are loaded (never pickled .bin/.pt)")
        dev = resolve_device(device)

        from transformers import AutoModel

        try:
            with LOAD_LOCK:
                model = AutoModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VLMError(f"could not load DINOv3 weights from {path}: {type(e).__name__}: {msg}") from e
        self.model = model.to(dev).eval()
        self.device, self.dtype = dev, dtype
        self.path = path
        self.name = f"dinov3:{name_or_path}"
        cfg = self.model.config
        ps = cfg.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (list, tuple)) else ps)
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.normalize = bool(normalize)
        if image_size is not None and int(image_size) < self.patch_size:
            raise VLMError(f"image_size must be >= the patch size {self.patch_size}, got {image_size}")
        self.image_size = None if image_size is None else int(image_size)
        self.proc = self._read_processor_config(path)

    @staticmethod
    def _read_processor_config(path: Path) -> dict[str, Any]:
        proc: dict[str, Any] = {
            "do_resize": True,
            "size": {"height": 224, "width": 224},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": _IMAGENET_MEAN,
            "image_std": _IMAGENET_STD,
        }
        f = path / "preprocessor_config.json"
        if f.is_file():
            try:
                proc.update({k: v for k, v in json.loads(f.read_text()).items() if v is not None})
            except (OSError, ValueError) as e:
                raise VLMError(f"could not read {f}: {e}") from e
        return proc

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) pixels the model sees for an image of `size` (w, h): patch multiples."""
        p, (w, h) = self.patch_size, size
        snap = lambda v: max(p, int(round(v / p)) * p)
        if self.image_size is not None:
            s = self.image_size / float(np.sqrt(w * h))
            return snap(w * s), snap(h * s)
        sz = self.proc.get("size") or {}
        if not self.proc.get("do_resize", True):
            return snap(w), snap(h)
        if "height" in sz and "width" in sz:
            return snap(sz["width"]), snap(sz["height"])
        if "shortest_edge" in sz:
            s = float(sz["shortest_edge"]) / min(w, h)
            return snap(w * s), snap(h * s)
        raise VLMError(f"unsupported 'size' in preprocessor_config.json: {sz}")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W) float32 pixel values, H and W multiples of the patch size."""
        img = image if image.mode == "RGB" else image.convert("RGB")
        W, H = self.input_size(img.size)
        arr = np.asarray(img, dtype=np.float32)
        if self.proc.get("do_rescale", True):
            arr = arr * float(self.proc.get("rescale_factor", 1 / 255))
        if (W, H) != img.size:  # per channel in float, bilinear with antialiasing like the processor
            arr = np.stack(
                [
                    np.asarray(
                        Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F").resize(
                            (W, H), Image.Resampling.BILINEAR
                        )
                    )
                    for c in range(3)
                ],
                axis=-1,
            )
        if self.proc.get("do_normalize", True):
            mean = np.asarray(self.proc.get("image_mean", _IMAGENET_MEAN), dtype=np.float32)
            std = np.asarray(self.proc.get("image_std", _IMAGENET_STD), dtype=np.float32)
            arr = (arr - mean) / std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None].float()

    @torch.inference_mode()
    def patch_features(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        pv = self.preprocess(image)
        h, w = pv.shape[2] // self.patch_size, pv.shape[3] // self.patch_size
        out = self.model(pixel_values=pv.to(self.device, self.dtype)).last_hidden_state
        prefix = 1 + self.num_register_tokens
        if out.shape[1] != prefix + h * w:
            raise VLMError(
                f"DINOv3 returned {out.shape[1]} tokens, expected 1 CLS + {self.num_register_tokens} "
                f"registers + {h}x{w} patches"
            )
        feats = out[0, prefix:].float()
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().reshape(h, w, -1).astype(np.float32), (h, w)


def load_backbone(spec: str | Backbone | None = None, **kwargs: Any) -> Backbone:
    """None / "pixels" -> the offline default; any other string -> DINOv3 by hub id or path.

    Extra keyword arguments (device, dtype, image_size, ...) go to the backbone's constructor.
    """
    if spec is not None and not isinstance(spec, str):
        if isinstance(spec, Backbone):
            return spec
        raise VLMError(f"backbone must be a name/path or a Backbone, got {type(spec).__name__}")
    if spec is None or spec.strip().lower() in {"", "pixels", "pixel", "default"}:
        return PixelBackbone(**kwargs)
    if spec.strip().lower() in PARTITIONS:  # content-free baselines (random blocks, Voronoi cells)
        return PARTITIONS[spec.strip().lower()]()
    return DinoV3Backbone(spec.strip(), **kwargs)


# ----------------------------------------------------------------------------------------------
# regions


@dataclass
class Regions:
    """K connected regions of one image and their map onto the VLM's N image tokens.

    `labels[i, j]` is the region of backbone patch (i, j); patches tile the image uniformly
    (see `Backbone`). `assignment` is M (K, N), float32 0/1, tokens row-major in the order of
    `VLMInputs.image_token_positions`; every column has exactly one 1 and every row at least
    one, so ablating any region set always removes whole tokens. Region ids run in reading
    order (row-major order of each region's first patch).
    """

    labels: np.ndarray  # (h, w) int64
    assignment: torch.Tensor  # (K, N) float32 in {0, 1}
    token_grid: tuple[int, int]  # (tokens high, tokens wide)
    image_size: tuple[int, int]  # (w, h) default drawing size: the image as the user gave it
    backbone: str = ""
    k_requested: int = 0
    notes: list[str] = field(default_factory=list)  # why K differs from what was asked, etc.

    @property
    def k(self) -> int:
        return int(self.assignment.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    @property
    def token_labels(self) -> np.ndarray:
        """(N,) region id of each image token."""
        return self.assignment.argmax(dim=0).cpu().numpy()

    @property
    def tokens_per_region(self) -> np.ndarray:
        return self.assignment.sum(dim=1).cpu().numpy().astype(np.int64)

    def token_mask(self, regions: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N,) bool: the tokens of the given region ids (or of a (K,) boolean keep/ablate mask)."""
        r = torch.as_tensor(np.asarray(regions))
        if r.dtype == torch.bool:
            if r.shape != (self.k,):
                raise VLMError(f"boolean region mask must have shape ({self.k},), got {tuple(r.shape)}")
            sel = r
        else:
            sel = torch.zeros(self.k, dtype=torch.bool)
            if r.numel():
                if int(r.min()) < 0 or int(r.max()) >= self.k:
                    raise VLMError(f"region ids must be in [0, {self.k}), got {r.tolist()}")
                sel[r.long().flatten()] = True
        return self.assignment[sel].sum(dim=0) > 0  # (0, N) sums to zeros: an empty set

    def pixel_labels(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) region id per pixel of an image of `size` (w, h), default `image_size`."""
        row_labels, cols = self.pixel_index(size)
        return row_labels[:, cols]

    def pixel_index(self, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The pixel map in separable form: (H, w) region ids of each pixel row at the grid's
        columns, and the (W,) grid column of each pixel column, so `values[row_labels][:, cols]`
        paints an (H, W) map with a third of the memory traffic of indexing with `pixel_labels`."""
        w_px, h_px = size or self.image_size
        h, w = self.grid
        rows = np.minimum(((np.arange(h_px) + 0.5) * h / h_px).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(w_px) + 0.5) * w / w_px).astype(np.int64), w - 1)
        return self.labels[rows], cols

    def outlines(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) bool: pixels on a region boundary (label differs from the right/lower pixel)."""
        lab = self.pixel_labels(size)
        edge = np.zeros(lab.shape, dtype=bool)
        dx = lab[:, 1:] != lab[:, :-1]
        dy = lab[1:, :] != lab[:-1, :]
        edge[:, :-1] |= dx
        edge[:-1, :] |= dy
        return edge

    def scores_to_heatmap(self, scores: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) float32 map painting each region with its score (e.g. attribution per region)."""
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu().numpy()
        s = np.asarray(scores, dtype=np.float32).reshape(-1)
        if s.shape[0] != self.k:
            raise VLMError(f"expected {self.k} region scores, got {s.shape[0]}")
        return s[self.pixel_labels(size)]


def auto_k(n_tokens: int) -> int:
    """The default K: one region per ~4 image tokens (a 2x2 token block), clamped to the
    paper's [16, 128]. E.g. 64 tokens (224 px on Qwen2.5-VL) -> 16, 256 -> 64, >= 512 -> 128.
    `compute_regions` further caps it at the number of tokens and of backbone patches."""
    return int(min(K_MAX, max(K_MIN, round(n_tokens / TOKENS_PER_REGION))))


def _overlap(n_cells: int, n_bins: int) -> np.ndarray:
    """(n_cells, n_bins) fraction of [0, 1] shared by cell i = [i/n, (i+1)/n) and bin b."""
    c = np.arange(n_cells + 1) / n_cells
    b = np.arange(n_bins + 1) / n_bins
    lo = np.maximum(c[:-1, None], b[None, :-1])
    hi = np.minimum(c[1:, None], b[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def _cut(children: np.ndarray, n: int, c: int) -> np.ndarray:
    """Leaf labels after the first n - c merges of a Ward tree (== cutting it at c clusters,
    exactly what AgglomerativeClustering(n_clusters=c) returns up to label names)."""
    parent = np.arange(2 * n - 1)
    m = n - c
    parent[children[:m].ravel()] = np.repeat(n + np.arange(m), 2)
    root = parent
    while True:  # pointer jumping: O(log depth) vectorised passes
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return np.unique(root[:n], return_inverse=True)[1].astype(np.int64)


def _settle(
    labels: np.ndarray, X: np.ndarray, grid: tuple[int, int], patch_token: Any, k_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge regions until every region owns >= 1 token and there are at most `k_max`.

    A token is owned by the region covering most of its area. Regions owning none (orphans)
    are merged, all at once, each into the neighbour owning most of the token area the orphan
    covers (so ablating the merged region removes the orphan's pixels), ties broken by the Ward
    cost |a||b|/(|a|+|b|) |mu_a - mu_b|^2. While there are too many regions, the adjacent pair
    with the smallest Ward cost is merged. Merging adjacent connected regions keeps every region
    connected. Returns (labels, owning region per token).
    """
    from scipy.sparse import csr_matrix

    h, w = grid
    n = labels.size
    while True:
        labels = np.unique(labels, return_inverse=True)[1].reshape(-1)
        c = int(labels.max()) + 1
        onehot = csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(c, n))
        area = np.asarray((onehot @ patch_token).todense())  # (c, N) token area per region
        owner = np.argmax(area, axis=0)
        orphan = np.ones(c, dtype=bool)
        orphan[owner] = False
        if c == 1 or (not orphan.any() and c <= k_max):
            return labels, owner
        lab = labels.reshape(h, w)
        pa = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
        pb = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
        keep = pa != pb
        pairs = np.unique(np.sort(np.stack([pa[keep], pb[keep]], axis=1), axis=1), axis=0)
        sizes = np.bincount(labels, minlength=c).astype(np.float64)
        mu = np.asarray(onehot @ X) / sizes[:, None]
        if orphan.any():  # directed (orphan -> neighbour) candidates, both directions
            src = np.concatenate([pairs[:, 0], pairs[:, 1]])
            dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
            sel = orphan[src]
            src, dst = src[sel], dst[sel]
            cost = sizes[src] * sizes[dst] / (sizes[src] + sizes[dst]) * ((mu[src] - mu[dst]) ** 2).sum(axis=1)
            owned_by_dst = owner[None, :] == dst[:, None]
            shared = (area[src] * owned_by_dst).sum(axis=1)
            order = np.lexsort((cost, -shared, src))
            src, dst = src[order], dst[order]
            first = np.r_[True, src[1:] != src[:-1]]  # best candidate per orphan
            parent = np.arange(c)

            def find(x: int) -> int:  # called only in this iteration
                while parent[x] != x:  # noqa: B023
                    parent[x] = parent[parent[x]]  # noqa: B023
                    x = parent[x]  # noqa: B023
                return x

            for o, d in zip(src[first].tolist(), dst[first].tolist()):
                ro, rd = find(o), find(d)
                if ro != rd:
                    parent[ro] = rd
            labels = np.array([find(i) for i in range(c)])[labels]
        else:  # too many regions: one Ward step among adjacent regions
            pa, pb = pairs[:, 0], pairs[:, 1]
            cost = sizes[pa] * sizes[pb] / (sizes[pa] + sizes[pb]) * ((mu[pa] - mu[pb]) ** 2).sum(axis=1)
            i = int(np.argmin(cost))
            labels = np.where(labels == pb[i], pa[i], labels)


def _regions_at(
    children: np.ndarray, n: int, kk: int, X: np.ndarray, grid: tuple[int, int], patch_token: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the Ward tree so that, after orphans are absorbed, exactly `kk` regions remain.

    Cutting at kk clusters usually leaves a few regions smaller than a token; then the tree is
    cut finer (doubling, then bisecting the cut) and the excess is merged back in Ward order.
    If even single patches cannot give kk token-owning regions, the most found is returned.
    """
    tries: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def attempt(c: int) -> int:
        if c not in tries:
            tries[c] = _settle(_cut(children, n, c), X, grid, patch_token, n)
        return int(tries[c][0].max()) + 1

    lo, hi = kk, kk
    while attempt(hi) < kk and hi < n:
        lo, hi = hi, min(n, hi * 2)
    if attempt(hi) >= kk:
        while hi - lo > 1:  # smallest cut (roughly: count is not monotone) that yields >= kk
            mid = (lo + hi) // 2
            if attempt(mid) >= kk:
                hi = mid
            else:
                lo = mid
    labels, owner = tries[hi] if attempt(hi) >= kk else max(tries.values(), key=lambda t: int(t[0].max()))
    if int(labels.max()) + 1 > kk:
        labels, owner = _settle(labels, X, grid, patch_token, kk)
    return labels, owner


def compute_regions(
    image: Any,
    token_grid: tuple[int, int],
    k: int | None = None,
    backbone: Backbone | str | None = None,
) -> Regions:
    """Cluster `image` into K connected regions and map them onto a (th, tw) VLM token grid.

    K: `auto_k(th * tw)` by default; an explicit `k` is clamped to [16, 128]. Either way K is
    capped at the number of tokens and of backbone patches (a region needs both), and regions
    that own no token are merged into a neighbour; when that leaves fewer than K we cut the
    same Ward tree finer and try again, so K is met whenever the image allows. Anything that
    changed K is said in `Regions.notes` (and logged). `image` is anything
    `vstream.model.normalize_image` takes; tiny images are upscaled by it first.
    """
    try:
        th, tw = (int(v) for v in token_grid)
    except (TypeError, ValueError) as e:
        raise VLMError(f"token_grid must be (tokens high, tokens wide), got {token_grid!r}") from e
    if th < 1 or tw < 1:
        raise VLMError(f"token_grid must be positive, got {token_grid!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))):
        raise VLMError(f"k must be an integer or None, got {k!r}")
    bb = load_backbone(backbone) if (backbone is None or isinstance(backbone, str)) else backbone
    img, original = normalize_image_with_size(image)

    if hasattr(bb, "partition"):  # a content-free baseline partition of the token grid
        kk = min(auto_k(th * tw) if k is None else min(K_MAX, max(K_MIN, int(k))), th * tw)
        return _from_token_labels(bb.partition(img, (th, tw), kk), original, bb.name, kk)
    feats, grid = bb.patch_features(img)
    h, w = (int(v) for v in grid)
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 3 or feats.shape[:2] != (h, w):
        raise VLMError(f"backbone {bb.name!r} returned features of shape {feats.shape} for a {h}x{w} grid")
    if not np.isfinite(feats).all():
        raise VLMError(f"backbone {bb.name!r} returned NaN/inf features")
    n, n_tok = h * w, th * tw

    notes: list[str] = []
    k_req = auto_k(n_tok) if k is None else int(k)
    kk = k_req
    if k is not None and not K_MIN <= kk <= K_MAX:
        kk = min(K_MAX, max(K_MIN, kk))
        notes.append(f"k={k_req} clamped to {kk} (allowed range [{K_MIN}, {K_MAX}])")
    if kk > min(n, n_tok):
        lim = min(n, n_tok)
        what = f"{n_tok} image token(s)" if n_tok <= n else f"{n} backbone patch(es) ({h}x{w})"
        notes.append(f"K reduced from {kk} to {lim}: only {what}")
        kk = lim

    from scipy.sparse import csr_matrix, kron

    # (n, N) area of each token covered by each patch (in patch units): separable overlaps
    patch_token = kron(csr_matrix(_overlap(h, th)), csr_matrix(_overlap(w, tw)), format="csr") * float(n)
    X = feats.reshape(n, -1)
    if n == 1 or kk == 1:
        labels, owner = np.zeros(n, dtype=np.int64), np.zeros(n_tok, dtype=np.int64)
    else:
        from sklearn.cluster import ward_tree
        from sklearn.feature_extraction.image import grid_to_graph

        # the tree AgglomerativeClustering(linkage="ward", connectivity=grid_to_graph(h, w))
        # builds; built once in full so it can be cut finer when regions own no token
        children = ward_tree(X, connectivity=grid_to_graph(h, w))[0]
        labels, owner = _regions_at(children, n, kk, X, (h, w), patch_token)
    if (got := len(np.unique(labels))) < kk:
        notes.append(f"K reduced from {kk} to {got}: the other regions were smaller than a VLM token")

    # reading order: relabel by each region's first patch (row-major)
    uniq, first = np.unique(labels, return_index=True)
    order = uniq[np.argsort(first)]
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    labels, owner = remap[labels], remap[owner]
    kf = len(order)
    assignment = torch.zeros(kf, n_tok, dtype=torch.float32)
    assignment[torch.from_numpy(owner), torch.arange(n_tok)] = 1.0
    for note in notes:
        log.info("regions: %s", note)
    return Regions(
        labels=labels.reshape(h, w),
        assignment=assignment,
        token_grid=(th, tw),
        image_size=original,
        backbone=bb.name,
        k_requested=k_req,
        notes=notes,
    )


def _from_token_labels(labels: np.ndarray, image_size: tuple[int, int], name: str, k: int) -> Regions:
    """Regions whose grid is the token grid itself (ids relabelled in reading order)."""
    th, tw = labels.shape
    uniq, first = np.unique(labels, return_index=True)
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    remap[uniq[np.argsort(first)]] = np.arange(len(uniq))
    labels = remap[labels]
    assignment = torch.zeros(len(uniq), th * tw, dtype=torch.float32)
    assignment[torch.from_numpy(labels.ravel()), torch.arange(th * tw)] = 1.0
    return Regions(
        labels=labels, assignment=assignment, token_grid=(th, tw), image_size=image_size, backbone=name, k_requested=k
    )


def regions_for(vlm_inputs: VLMInputs, k: int | None = None, backbone: Backbone | str | None = None) -> Regions:
    """`compute_regions` for the image of a `VLMInputs`; drawing size = the user's original image."""
    if getattr(vlm_inputs, "image", None) is None or getattr(vlm_inputs, "token_grid", None) is None:
        raise VLMError("these inputs have no image: build them with VLM.build_inputs(question, image=...)")
    r = compute_regions(vlm_inputs.image, vlm_inputs.token_grid, k=k, backbone=backbone)
    if vlm_inputs.original_size is not None:
        r.image_size = tuple(int(v) for v in vlm_inputs.original_size)
    n_pos = int(vlm_inputs.image_token_positions.numel())
    if n_pos != r.assignment.shape[1]:
        raise VLMError(f"token grid {r.token_grid} does not match the {n_pos} image tokens of the inputs")
    return r
