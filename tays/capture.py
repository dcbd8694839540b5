"""Attention capture in the TaYS engine: per decode call, each (layer, head)'s attention mass on
every visible frame-group token, with no second pass and no eager attention.

A decode step already computes softmax(q K^T) over (video cache + text cache), segment by
segment (`tays.decoder.attend_segments`), without materialising the weights. As vSTREAM's
still-image capture does, the recorder only takes references on the decoding thread: the
step's `VideoView` (immutable), the text cache's key buffers with the length it had, and each
layer's post-RoPE queries (`Decoder.run(probe=...)`). A consumer (the attribution worker)
computes the rows later, on its own thread, in numpy, from the same keys. This works because the
caches never overwrite what a published view or a committed text length covers (see
`tays.cache`). So the decoding thread does no arithmetic for attribution and holds no lock for it.

Alignment: a decode call's row is the attention of its LAST fed token's query, the query whose
logits picked the next generated token. A TaYS step's tokens t1..tn come from the calls that
fed [the previous step's last token (or the header), t1, ..., t_{n-1}]. So all n rows exist the
moment the step closes, and the first row already sees the frames that came in before the step.
(vSTREAM's still-image capture uses each token's own position instead. There the next row comes
one token later; here it would come only after the next frame group.)

Rows are float32 (layers, heads, N): the probability mass over the N tokens of the frame groups
the call could see, normalised over everything it attended to (prompt, frames, reasoning).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tays.cache import FrameGroup, VideoView

__all__ = ["AttentionRow", "StreamRecorder"]


@dataclass(frozen=True)
class AttentionRow:
    """One decode call's attention on the frame groups it could see."""

    mass: np.ndarray  # (L, H, N) float32: N = tokens of `groups`, in their order
    groups: tuple[FrameGroup, ...]  # visible groups, oldest first (`start` is a buffer offset)

    def columns(self) -> list[tuple[int, int, int]]:
        """(group index, first column, last column + 1) of each visible group in `mass`."""
        out, c = [], 0
        for g in self.groups:
            out.append((g.index, c, c + g.length))
            c += g.length
        return out


class _Call:
    __slots__ = ("view", "text_keys", "text_len", "ids", "queries")

    def __init__(self, view: VideoView, text_keys: Sequence[torch.Tensor], text_len: int, ids: list[int], layers: int):
        self.view, self.text_keys, self.text_len, self.ids = view, tuple(text_keys), int(text_len), ids
        self.queries: list[torch.Tensor | None] = [None] * layers


def _np(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy view (or copy, off the CPU / other dtypes) of a tensor."""
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return t.detach().numpy()
    return t.detach().float().cpu().numpy()


class StreamRecorder:
    """References per decode call (producer: the engine's decoding thread) and attention rows on
    demand (consumer: any other thread). Also keeps the last frame of each frame group the engine
    was handed, for regions and heatmaps, until `take_frame` collects it."""

    def __init__(self, num_layers: int, scaling: float, temporal_patch_size: int = 2):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.scaling = float(scaling)
        self.tp = max(1, int(temporal_patch_size))
        self._calls: list[_Call] = []  # complete calls, in order (appended by the producer only)
        self._cur: _Call | None = None
        self._rows: dict[int, AttentionRow] = {}
        self._lock = threading.Lock()  # consumers compute rows one at a time
        self._frames: dict[int, tuple[Any, float]] = {}
        self._n_frames = 0

    @classmethod
    def for_engine(cls, engine: Any) -> StreamRecorder:
        """A recorder sized for a `StreamingEngine` (its decoder's layers and attention scale)."""
        dec = engine.decoder
        return cls(len(dec.layers), float(dec.layers[0].self_attn.scaling), engine.vlm.temporal_patch_size)

    # -- producer side (decoding thread; references only) -------------------------------------
    def begin_call(
        self, view: VideoView, text_keys: Sequence[torch.Tensor], text_len: int, ids: Sequence[int] = ()
    ) -> None:
        """A decode call feeding token `ids` starts: it reads `view` and text keys [0, text_len)
        (its own included)."""
        self._cur = _Call(view, text_keys, text_len, list(ids), self.num_layers)

    def record_query(self, layer: int, q: torch.Tensor) -> None:
        """`tays.decoder.Probe`: one layer's (1, H, n, D) queries of the current call."""
        cur = self._cur
        if cur is None:
            return
        cur.queries[layer] = q
        if layer == self.num_layers - 1:
            self._calls.append(cur)  # list.append is atomic: readers see whole calls only
            self._cur = None

    def on_frame(self, frame: Any, t: float) -> None:
        """The engine was handed a frame: keep it as its group's latest (the group's own frame)."""
        self._frames[self._n_frames // self.tp] = (frame, float(t))
        self._n_frames += 1

    # -- consumer side ----------------------------------------------------------------------
    @property
    def n_calls(self) -> int:
        """Decode calls recorded so far (call i's row is `row(i)`)."""
        return len(self._calls)

    def fed_ids(self, call: int) -> list[int]:
        """The token ids a decode call fed (teacher forcing the trajectory replays them)."""
        return list(self._calls[call].ids)

    def take_frame(self, group: int) -> tuple[Any, float] | None:
        """(frame, stream time) of a frame group's last frame, forgotten here once taken."""
        return self._frames.pop(int(group), None)

    def row(self, call: int) -> AttentionRow:
        return self.rows([call])[0]

    def rows(self, calls: Sequence[int]) -> list[AttentionRow]:
        """The rows of the given calls (computed once, batched per video view)."""
        calls = [int(c) for c in calls]
        with self._lock:
            todo = sorted({c for c in calls if c not in self._rows})
            if todo:
                if todo[-1] >= len(self._calls) or todo[0] < 0:
                    raise IndexError(f"call {todo[-1]} not recorded ({len(self._calls)} calls)")
                batch: list[int] = []
                for c in todo:
                    if batch and self._calls[c].view is not self._calls[batch[0]].view:
                        self._compute(batch)
                        batch = []
                    batch.append(c)
                self._compute(batch)
            return [self._rows[c] for c in calls]

    def _compute(self, idx: list[int]) -> None:
        """Rows of calls that share one video view: per layer, one GEMM for the video keys and
        one for the text keys (the last call's buffers hold every earlier call's tokens too),
        softmax over both in float32, then the frame-group columns."""
        calls = [self._calls[i] for i in idx]
        view = calls[0].view
        groups = view.groups
        lens = np.array([c.text_len for c in calls])
        t_max = int(lens.max())
        text_bias = np.where(np.arange(t_max)[None, :] < lens[:, None], np.float32(0), np.float32(-np.inf))  # (T, S)
        cols = np.concatenate([np.arange(g.start, g.start + g.length) for g in groups] or [np.zeros(0, dtype=np.int64)])
        spans = [(s, e) for s, e in view.spans if e > s]
        t = len(calls)
        out = []
        for li in range(self.num_layers):
            q = np.stack([_np(c.queries[li])[0, :, -1] for c in calls])  # (T, H, D)
            kv = _np(view.keys[li])[0]  # (Hkv, capacity, D)
            kvid = np.concatenate([kv[:, s:e] for s, e in spans], axis=1)  # (Hkv, Lv, D)
            ktext = _np(calls[-1].text_keys[li])[0, :, :t_max]  # (Hkv, S, D)
            hkv, _, d = kvid.shape
            h = q.shape[1]
            g = h // hkv
            qg = q.reshape(t, hkv, g, d).transpose(1, 0, 2, 3).reshape(hkv, t * g, d)
            sv = np.matmul(qg, kvid.transpose(0, 2, 1)) * np.float32(self.scaling)  # (Hkv, T*G, Lv)
            st = np.matmul(qg, ktext.transpose(0, 2, 1)) * np.float32(self.scaling)  # (Hkv, T*G, S)
            st = st.reshape(hkv, t, g, t_max) + text_bias[None, :, None, :]
            sv = sv.reshape(hkv, t, g, -1)
            m = np.maximum(sv.max(-1, initial=-np.inf), st.max(-1, initial=-np.inf))[..., None]
            z = np.exp(sv - m).sum(-1, keepdims=True) + np.exp(st - m).sum(-1, keepdims=True)
            # video columns: buffer offsets -> positions in the concatenated spans
            pos = np.concatenate([np.arange(s, e) for s, e in spans])
            where = np.searchsorted(pos, cols)
            p = np.exp(sv[..., where] - m) / z  # (Hkv, T, G, N)
            out.append(p.transpose(1, 0, 2, 3).reshape(t, h, -1))  # (T, H, N)
        mass = np.stack(out, axis=1).astype(np.float32)  # (T, L, H, N)
        for j, i in enumerate(idx):
            self._rows[i] = AttentionRow(np.ascontiguousarray(mass[j]), groups)
