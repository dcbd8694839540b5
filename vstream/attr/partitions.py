"""Region baselines without image content: random blocks and Voronoi cells of random seeds.

The paper compares its semantic regions (Ward clusters of backbone features) with these two on
the same label budget. Each partition works on the VLM's token grid directly and is seeded by
the image's bytes, so the same image always gets the same regions (labels stay reproducible).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image


def image_rng(image: Image.Image, salt: str) -> np.random.Generator:
    digest = hashlib.sha256(salt.encode() + image.tobytes()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class RandomBlocks:
    """K axis-aligned blocks: the grid cut into r x c bands at random positions (r * c = K)."""

    name = "blocks"

    def partition(self, image: Image.Image, token_grid: tuple[int, int], k: int) -> np.ndarray:
        th, tw = token_grid
        rng = image_rng(image, self.name)
        r = max(d for d in range(1, int(np.sqrt(k)) + 1) if k % d == 0 and d <= th and k // d <= tw)
        c = k // r
        rows = np.sort(rng.choice(np.arange(1, th), size=r - 1, replace=False)) if r > 1 else []
        cols = np.sort(rng.choice(np.arange(1, tw), size=c - 1, replace=False)) if c > 1 else []
        band_r = np.searchsorted(rows, np.arange(th), side="right")
        band_c = np.searchsorted(cols, np.arange(tw), side="right")
        return (band_r[:, None] * c + band_c[None, :]).astype(np.int64)


class RandomVoronoi:
    """K cells: every token goes to the nearest of K random seed tokens."""

    name = "voronoi"

    def partition(self, image: Image.Image, token_grid: tuple[int, int], k: int) -> np.ndarray:
        th, tw = token_grid
        rng = image_rng(image, self.name)
        seeds = rng.choice(th * tw, size=k, replace=False)
        sy, sx = np.divmod(seeds, tw)
        yy, xx = np.mgrid[0:th, 0:tw]
        d = (yy[..., None] - sy) ** 2 + (xx[..., None] - sx) ** 2  # (th, tw, k)
        return d.argmin(-1).astype(np.int64)


PARTITIONS = {"blocks": RandomBlocks, "voronoi": RandomVoronoi}
