"""Attention capture during generation, without eager attention and without a second pass.

vSTREAM's features are attention weights "already computed during generation". transformers 5.x's
`sdpa` never returns them, and switching the model to `eager` is slow and can change outputs.
So we register our own attention function, `vstream_sdpa`, for the text decoder only:

* the output always comes from transformers' own `sdpa_attention_forward`, so logits (and the
  generated tokens) are exactly those of plain sdpa;
* when a recorder is attached and the call is a decode step (query length 1), it hands the
  recorder that step's query (already RoPE'd) and a reference to the layer's key cache: no
  arithmetic on the generation thread. The recorder turns queries into softmax rows over all
  keys, restricted to the image-token positions ((H, N) per layer per step), lazily and in
  batches on the consumer's thread (the attribution worker), one matmul per layer for a
  whole span. The cache only ever grows, so the latest key tensor serves every earlier step
  (each step is masked to its own key length). The full (S x S) attention matrix is never
  materialised; the vision tower stays on sdpa.

Registration (transformers 5.23), done once by `install`:
    AttentionInterface.register("vstream_sdpa", fn)       # the attention function
    AttentionMaskInterface.register("vstream_sdpa", sdpa_mask)
        # without it masking_utils treats the name as "custom attention, no mask" and drops it
    model.set_attn_implementation({"text_config": "vstream_sdpa", "vision_config": "sdpa"})

Alignment convention (which attention row belongs to which generated token)
--------------------------------------------------------------------------
`generate` produces y_1 from the prefill's last position; y_t is fed back as the input of
decode step t, whose single query sits at y_t's own position. We record the row of each
generated token's OWN position: row i (0-based) of the recorder is the attention of y_{i+1}
(the query at position prompt_len + i) over the image tokens. The last generated token is never
fed back, so after `generate` the recorder holds one row per generated token except the last.
When generation ends at eos (dropped from the visible trace) every visible token has its row;
when it is cut by `max_new_tokens` or a stop event, the last visible token has none. Span
features are defined over the recorded rows of the span's tokens. A caller that kept the KV
cache (`return_dict_in_generate=True`) can complete the record with `finalize`, which feeds the
last token once more, exactly as the next decode step would have.

Features (vSTREAM / AT2): for span S and region k, per (layer, head), the mean over the span's
tokens of the attention mass on region k's tokens, flattened layer-major into L*H numbers.
Other feature designs (`vstream.attr.features`: value-norm weighting, per-token normalisation,
max / last-token pooling, ...) are computed from the same rows by `variant_features`; those
weighted by value norms need, once per trace, each image token's value norm per (layer, head),
which a recorder made with `values=` computes at prefill (the only time the attention function
does arithmetic on the generation thread, once per layer; decode steps are untouched).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from vstream.attr import features as FV
from vstream.attr import rowmath
from vstream.model import VLM

__all__ = [
    "ATTN_NAME",
    "AttentionRecorder",
    "capturing",
    "features_from_sum",
    "finalize",
    "install",
    "is_capturing",
    "pool_spans",
    "region_features",
    "span_features",
    "text_attention_modules",
    "uninstall",
    "variant_features",
]

ATTN_NAME = "vstream_sdpa"
_STATE_ATTR = "_vstream_capture"  # set on each text attention module while capturing
_register_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# recording


class AttentionRecorder:
    """Per generated token, the (L, H, N) attention mass of its query on the N image tokens.

    Filled layer by layer from the generation thread (`record_query`), read from any other
    thread (`tokens`, `per_token`, `stack`, `wait_for`). Rows are float32 on the model's device;
    with `keep_cpu=True` a CPU copy of each finished row is kept too (for consumers that must not
    touch the accelerator). A finished row is never modified afterwards, so readers may keep it.
    Rows computed from float32 CPU tensors are held as numpy arrays (see `_pending_rows`);
    `per_token` and `stack` still hand out tensors, `row_sum` hands out what is held.
    """

    def __init__(self, num_layers: int, keep_cpu: bool = False, values: Iterable[str] = ()):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.keep_cpu = bool(keep_cpu)
        # value weightings (features.VALUE_WEIGHTS) computed at prefill: {kind: per layer (H, N)}
        self.values = tuple(sorted(set(values)))
        bad = [v for v in self.values if v not in FV.VALUE_WEIGHTS]
        if bad:
            raise ValueError(f"unknown value weighting {bad}; choose from {', '.join(FV.VALUE_WEIGHTS)}")
        self._value_weights: dict[str, list[torch.Tensor | None]] = {v: [None] * self.num_layers for v in self.values}
        self._cond = threading.Condition()
        self._compute = threading.Lock()  # one consumer materialises pending steps at a time
        self._rows: list[torch.Tensor] = []
        self._cpu_rows: list[torch.Tensor] = []
        self._epoch = 0  # bumped by reset()
        # deferred path: finished steps whose rows are not computed yet, and the step being filled
        self._pending: list[_PendingStep] = []
        self._step: list[Any] = [None] * self.num_layers
        self._keys: list[torch.Tensor | None] = [None] * self.num_layers  # latest key cache per layer

    @classmethod
    def for_vlm(cls, vlm: VLM, keep_cpu: bool = False, values: Iterable[str] = ()) -> AttentionRecorder:
        return cls(int(vlm.num_layers), keep_cpu=keep_cpu, values=values)

    # -- producer side (generation thread) -----------------------------------------------------
    def record_query(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        positions: torch.Tensor,
    ) -> None:
        """Keep references to one layer's decode query (B, H, 1, D),
        key cache (B, Hkv, S, D) and attention mask (B, 1 or H, 1, S') or None, as the attention
        function got them; batch row 0's (H, N) mass is computed when a consumer asks. Costs a
        few list operations on the generation thread (no tensor op: even slicing one costs
        decode speed at the sizes of the demo model)."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} outside [0, {self.num_layers})")
        with self._cond:
            if self._step[layer_idx] is not None:  # previous step cut short: drop it
                self._step = [None] * self.num_layers
            self._step[layer_idx] = (query, key.shape[2], mask)
            self._keys[layer_idx] = key
            if None in self._step:  # (C-level scan: this runs per layer per token)
                return
            self._pending.append(_PendingStep(self._step, float(scaling), positions))
            self._step = [None] * self.num_layers
            self._cond.notify_all()

    def record_values(self, module: torch.nn.Module, value: torch.Tensor, positions: torch.Tensor) -> None:
        """At prefill: each image token's value weight per query head, for every kind this
        recorder was made for, from the layer's values (B, Hkv, S, D) (batch row 0) -> (H, N)
        float32. vnorm: ||v_j|| of the key/value head the query head reads (`repeat_kv`'s
        pairing: query head h reads kv head h // G). vonorm: ||W_O^h v_j||, W_O^h the columns of
        the output projection that head h's output meets, as v^T (W_O^h^T W_O^h) v (a (D, D)
        Gram matrix per head instead of an (N, hidden) product)."""
        li = int(module.layer_idx)
        v = value[0].index_select(1, positions.to(value.device)).float()  # (Hkv, N, D)
        hkv, _, d = v.shape
        w_o = module.o_proj.weight.float()  # (hidden, H*D)
        h = w_o.shape[1] // d
        v = v.repeat_interleave(h // hkv, dim=0)  # (H, N, D)
        for kind in self.values:
            if kind == "vnorm":
                w = v.norm(dim=-1)
            else:
                per_head = w_o.reshape(w_o.shape[0], h, d).transpose(0, 1)  # (H, hidden, D)
                gram = per_head.transpose(1, 2) @ per_head  # (H, D, D)
                w = ((v @ gram) * v).sum(-1).clamp_min(0).sqrt()
            self._value_weights[kind][li] = w.detach()

    def value_weights(self, kind: str, cpu: bool = False) -> torch.Tensor:
        """(L, H, N) float32 value weights of `kind` recorded at prefill."""
        layers = self._value_weights.get(kind)
        if layers is None:
            raise ValueError(f"this recorder was not made to record {kind!r} value weights (values={self.values})")
        if any(w is None for w in layers):
            raise RuntimeError(f"no {kind} value weights recorded yet (they are taken at prefill)")
        out = torch.stack([w.to(layers[0].device) for w in layers])
        return out.cpu() if cpu else out

    def _materialise(self, upto: int) -> None:
        """Compute the rows of pending steps until `upto` rows exist (batched per layer)."""
        with self._compute:
            with self._cond:
                need = upto - len(self._rows)
                if need <= 0 or not self._pending:
                    return
                steps, keys, epoch = list(self._pending), list(self._keys), self._epoch
            rows = _pending_rows(steps, keys)  # outside _cond: the generation thread goes on
            numpy_rows = isinstance(rows, np.ndarray)  # already on the CPU
            cpu = (rows if numpy_rows else rows.to("cpu")) if self.keep_cpu else None
            with self._cond:
                if epoch != self._epoch:
                    return
                del self._pending[: len(steps)]
                self._rows.extend(rows if numpy_rows else rows.unbind(0))
                if cpu is not None:
                    self._cpu_rows.extend(cpu if numpy_rows else cpu.unbind(0))

    # -- consumer side -------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """Number of generated tokens whose row is complete (or ready to be computed)."""
        with self._cond:
            return len(self._rows) + len(self._pending)

    def per_token(self, i: int, cpu: bool = False) -> torch.Tensor:
        """(L, H, N) row of generated token i (0-based; see the alignment convention)."""
        self._materialise(i + 1 if i >= 0 else self.tokens)
        with self._cond:
            row = _tensor(self._cpu_rows[i] if cpu and self.keep_cpu else self._rows[i])
        return row.to("cpu") if cpu else row

    def stack(self, start: int = 0, end: int | None = None, cpu: bool = False) -> torch.Tensor:
        """(T, L, H, N) rows of tokens [start, end)."""
        rows = self._rows_between(start, end, cpu)
        if all(isinstance(r, np.ndarray) for r in rows):
            return torch.from_numpy(np.stack(rows))
        out = torch.stack([_tensor(r) for r in rows])
        return out.to("cpu") if cpu else out

    def row_sum(self, start: int, end: int) -> np.ndarray | torch.Tensor:
        """(L, H, N) float32 sum of the rows of tokens [start, end), in the form they are held
        (numpy for the CPU path: no torch call, so no GIL hand-over with the generation thread,
        which torch's small ops cost), summed in place so memory stays one row."""
        rows = self._rows_between(start, end)
        if all(isinstance(r, np.ndarray) for r in rows):
            return rowmath.sum_rows(rows)
        total = None
        for i in range(0, len(rows), _ROW_BLOCK):
            part = torch.stack([_tensor(r) for r in rows[i : i + _ROW_BLOCK]]).sum(0)
            total = part if total is None else total + part
        return total

    def rows(self, start: int, end: int) -> np.ndarray | torch.Tensor:
        """(T, L, H, N) rows of tokens [start, end) in the form they are held (numpy for the CPU
        path, as `row_sum`): what the pooled feature variants read."""
        rows = self._rows_between(start, end)
        if all(isinstance(r, np.ndarray) for r in rows):
            return np.stack(rows)
        return torch.stack([_tensor(r) for r in rows])

    def _rows_between(self, start: int, end: int | None, cpu: bool = False) -> list:
        self._materialise(self.tokens if end is None or end < 0 else end)
        with self._cond:
            rows = (self._cpu_rows if cpu and self.keep_cpu else self._rows)[start:end]
        if not rows:
            raise ValueError(f"no recorded tokens in [{start}, {end})")
        return rows

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least n rows are recorded (True) or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._rows) + len(self._pending) >= n, timeout)

    # -- computing rows in another process -------------------------------------------------------
    def export(
        self, start: int, end: int, queries: np.ndarray, keys: np.ndarray, keys_from: int
    ) -> tuple[list[int], int, float] | None:
        """Copy what the rows of tokens [start, end) are computed from into another process's
        buffers: each step's queries into `queries[start:end]` ((T_max, L, H, D) float32) and the
        key cache columns [keys_from, S) of every layer into `keys` ((L, Hkv, S_max, D)), S the
        longest cache these steps read. Returns the steps' key lengths (a list), S and the score scaling; None
        when these rows cannot be computed elsewhere (one already computed here, a mask, a batch,
        not float32 on the CPU, layers of different shapes, buffers too small): compute them here.

        Meant for the generation thread, once per span: one concatenation for the queries and a
        slice copy per layer for the keys the consumer has not seen yet."""
        with self._cond:
            base = len(self._rows)
            if end <= start or start < base or end > base + len(self._pending):
                return None
            steps = self._pending[start - base : end - base]
            latest = list(self._keys)
        k0 = latest[0]
        if k0 is None or k0.device.type != "cpu" or k0.dtype != torch.float32 or k0.dim() != 4 or k0.shape[0] != 1:
            return None
        # the key columns these steps read (the last step's: the cache only grows); all layers
        # have them (the generation thread may be half-way through the next step, some layers'
        # caches a column longer than others)
        s = max(int(n) for _, n, _ in steps[-1].layers)
        b0, h0, _, d0 = k0.shape
        for k in latest:
            if k is None or k.dtype != torch.float32 or k.dim() != 4:
                return None
            b, h, n, d = k.shape
            if b != b0 or h != h0 or d != d0 or n < s:
                return None
        if tuple(keys.shape[:2]) != (len(latest), k0.shape[1]) or keys.shape[3] != k0.shape[3] or s > keys.shape[2]:
            return None
        flat = [q for st in steps for q, _, m in st.layers if m is None]  # T*L of (1, H, 1, D)
        if len(flat) != len(steps) * self.num_layers:
            return None
        q0 = flat[0]
        if q0.shape[0] != 1 or q0.dtype != torch.float32:
            return None
        if end > queries.shape[0] or tuple(queries.shape[2:]) != (q0.shape[1], q0.shape[3]):
            return None
        torch.cat(flat, out=torch.from_numpy(queries[start:end]).view(len(flat), q0.shape[1], 1, q0.shape[3]))
        for li, k in enumerate(latest):
            keys[li, :, keys_from:s] = k.numpy()[0, :, keys_from:s]
        return [st.layers[0][1] for st in steps], s, steps[0].scaling

    def adopt(self, rows: np.ndarray) -> int:
        """Take (T, L, H, N) float32 rows computed elsewhere from `export`ed steps, for the first
        T tokens, in place of the pending steps they answer (copied: the buffer is not ours), so
        later reads return the very numbers the other process used. Returns how many were taken."""
        with self._compute, self._cond:
            base = len(self._rows)
            take = min(len(self._pending), len(rows) - base)
            if take <= 0:
                return 0
            got = np.array(rows[base : base + take], dtype=np.float32)
            del self._pending[:take]
            self._rows.extend(got)
            if self.keep_cpu:
                self._cpu_rows.extend(got)
            return take

    def reset(self) -> None:
        """Forget all rows (and any half-filled step), e.g. before the next generation."""
        with self._cond:
            self._rows.clear()
            self._cpu_rows.clear()
            self._pending.clear()
            self._step = [None] * self.num_layers
            self._keys = [None] * self.num_layers
            self._value_weights = {v: [None] * self.num_layers for v in self.values}
            self._epoch += 1


class _PendingStep:
    """One decode step's per-layer (query (B, H, 1, D), key length S, mask (B, ., 1, S') or
    None) awaiting its row."""

    __slots__ = ("layers", "scaling", "positions")

    def __init__(self, layers: list[Any], scaling: float, positions: torch.Tensor):
        self.layers, self.scaling, self.positions = layers, scaling, positions


_ROW_BLOCK = 16  # rows summed per torch op (bounded memory on long spans)


def _tensor(row: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(row) if isinstance(row, np.ndarray) else row


def _pending_rows(steps: list[_PendingStep], keys: list[torch.Tensor | None]) -> np.ndarray | torch.Tensor:
    """(T, L, H, N) softmax mass on the image positions for T pending steps: one batched matmul
    of the T queries with the latest key caches (all layers at once when their shapes agree),
    each row masked to its own key length (and mask row), softmax in float32 as eager does.

    Float32 CPU tensors are computed in numpy on views of the same memory: every torch call
    releases and re-takes the GIL, and at a small model's sizes each such hand-over lets the
    worker hold up the generation thread, while numpy keeps the GIL through its small calls."""
    if all(k is not None and k.device.type == "cpu" and k.dtype == torch.float32 for k in keys) and all(
        q.dtype == torch.float32 for q, _, _ in steps[0].layers
    ):
        return _pending_rows_numpy(steps, keys)
    lens = torch.tensor([st.layers[0][1] for st in steps])
    s = int(lens.max())
    n_layers = len(keys)
    # layers split over devices (device_map="auto") are computed where their keys are and the
    # rows gathered on the first layer's device
    same = all(k.shape == keys[0].shape and k.device == keys[0].device for k in keys)
    groups = [list(range(n_layers))] if same else [[li] for li in range(n_layers)]
    valid = torch.arange(s).unsqueeze(0) < lens.unsqueeze(1)  # (T, S)
    t = len(steps)
    out = []
    for group in groups:
        qq = torch.stack([torch.stack([st.layers[li][0] for li in group]) for st in steps])  # (T, L', B, H, 1, D)
        qq = qq[:, :, 0, :, 0]  # (T, L', H, D): batch row 0
        kk = torch.stack([keys[li][0, :, :s] for li in group])  # (L', Hkv, S, D)
        nl, hkv, _, d = kk.shape
        h = qq.shape[2]
        g = h // hkv
        # the T steps go into each GEMM's rows: L'*Hkv products of (T*G, D) x (D, S), not T times more
        q = qq.reshape(t, nl, hkv, g, d).permute(1, 2, 0, 3, 4).reshape(nl, hkv, t * g, d)
        scores = torch.matmul(q, kk.transpose(-1, -2)).reshape(nl, hkv, t, g, s).permute(2, 0, 1, 3, 4)
        scores = (scores * steps[0].scaling).reshape(t, nl, h, s).float()  # (T, L', H, S)
        scores = scores.masked_fill(~valid.to(scores.device)[:, None, None, :], float("-inf"))
        for i, st in enumerate(steps):
            for j, li in enumerate(group):
                m = st.layers[li][2]
                if m is None:
                    continue
                m = m[0, :, -1]  # (1 or H, S')
                n = min(m.shape[-1], s)
                if m.dtype == torch.bool:
                    scores[i, j, :, :n] = scores[i, j, :, :n].masked_fill(~m[..., :n], float("-inf"))
                else:
                    scores[i, j, :, :n] = scores[i, j, :, :n] + m[..., :n].float()
        probs = torch.softmax(scores, dim=-1)
        out.append(probs.index_select(3, steps[0].positions.to(probs.device)).to(keys[0].device))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)  # (T, L, H, N)


def _pending_rows_numpy(steps: list[_PendingStep], keys: list[torch.Tensor]) -> np.ndarray:
    """`_pending_rows` for float32 CPU tensors, in numpy (`rowmath`, the arithmetic the
    attribution process runs too) on views of the same memory; one torch call gathers the
    queries. (T, L, H, N) float32."""
    lens = np.array([st.layers[0][1] for st in steps])
    s, t, n_layers = int(lens.max()), len(steps), len(keys)
    k_np = [k.numpy()[0, :, :s] for k in keys]  # (Hkv, S, D) views
    same = all(k.shape == k_np[0].shape for k in k_np)
    groups = [list(range(n_layers))] if same else [[li] for li in range(n_layers)]
    positions = steps[0].positions.numpy()
    out = []
    for group in groups:
        flat = [st.layers[li][0] for st in steps for li in group]  # T*L' of (B, H, 1, D)
        b, h, _, d = flat[0].shape
        qq = torch.cat(flat).numpy().reshape(t, len(group), b, h, d)[:, :, 0]  # (T, L', H, D)
        kk = np.stack([k_np[li] for li in group])  # (L', Hkv, S, D)
        scores = rowmath.decode_scores(qq, kk, lens, steps[0].scaling)  # (T, L', H, S)
        for i, st in enumerate(steps):
            for j, li in enumerate(group):
                m = st.layers[li][2]
                if m is None:
                    continue
                m = m.numpy()[0, :, -1]  # (1 or H, S')
                n = min(m.shape[-1], s)
                if m.dtype == np.bool_:
                    scores[i, j, :, :n] = np.where(m[..., :n], scores[i, j, :, :n], -np.inf)
                else:
                    scores[i, j, :, :n] += m[..., :n].astype(np.float32)
        out.append(rowmath.image_mass(scores, positions))
    return out[0] if len(out) == 1 else np.concatenate(out, axis=1)


class _CaptureState:
    """What the attention function needs while capturing: where the image keys are, and who
    gets the rows. Shared by all text attention modules of one model."""

    def __init__(self, image_positions: torch.Tensor, recorder: AttentionRecorder):
        self.positions = image_positions.reshape(-1).long()
        self.recorder = recorder
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def positions_on(self, device: torch.device) -> torch.Tensor:
        pos = self._on_device.get(device)
        if pos is None:
            pos = self._on_device[device] = self.positions.to(device)
        return pos


_SDPA: Any = None


def _sdpa() -> Any:
    """transformers' sdpa attention function, imported once (this runs per layer per token)."""
    global _SDPA
    if _SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _SDPA = sdpa_attention_forward
    return _SDPA


def _vstream_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa for the output; plus, on decode steps under capture, one score row
    (and at prefill, for a recorder made with `values=`, the image tokens' value weights)."""
    out = (_SDPA or _sdpa())(module, query, key, value, attention_mask, **kwargs)
    # the instance dict, not getattr: a miss on an nn.Module goes through its __getattr__, which
    # raises and catches an AttributeError (1.5 us per layer per token)
    state: _CaptureState | None = module.__dict__.get(_STATE_ATTR)
    if state is not None:
        if query.shape[2] == 1:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            state.recorder.record_query(
                module.layer_idx, query, key, attention_mask, scaling, state.positions_on(key.device)
            )
        elif state.recorder.values:  # prefill: the image tokens' values are final from here on
            state.recorder.record_values(module, value, state.positions_on(value.device))
    return out


# ----------------------------------------------------------------------------------------------
# installing


def _register() -> None:
    """Register `vstream_sdpa` with transformers (idempotent, process-wide)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        sdpa_mask,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _register_lock:
        if ALL_ATTENTION_FUNCTIONS.get(ATTN_NAME) is not _vstream_sdpa_forward:
            AttentionInterface.register(ATTN_NAME, _vstream_sdpa_forward)
        if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def text_attention_modules(vlm: VLM) -> list[torch.nn.Module]:
    """The text decoder's self-attention modules, ordered by layer (those that dispatch through
    `config._attn_implementation` and know their `layer_idx`)."""
    text_cfg = vlm.text_config
    found = {}
    for mod in vlm.model.modules():
        cfg = getattr(mod, "config", None)
        idx = getattr(mod, "layer_idx", None)
        if (
            idx is not None
            and hasattr(mod, "o_proj")
            and cfg is not None
            and getattr(cfg, "model_type", None) == getattr(text_cfg, "model_type", None)
        ):
            found[int(idx)] = mod
    mods = [found[i] for i in sorted(found)]
    if len(mods) != vlm.num_layers or sorted(found) != list(range(vlm.num_layers)):
        raise RuntimeError(
            f"found text attention layers {sorted(found)}, expected 0..{vlm.num_layers - 1}: "
            "unsupported model layout for attention capture"
        )
    return mods


def install(vlm: VLM) -> None:
    """Make the text decoder run on `vstream_sdpa` (vision stays on sdpa). Idempotent.

    Harmless when nothing is captured: the output path is transformers' sdpa either way.
    """
    _register()
    mods = text_attention_modules(vlm)
    if all(m.config._attn_implementation == ATTN_NAME for m in mods):
        return
    with vlm.lock:
        vlm.model.set_attn_implementation({"text_config": ATTN_NAME, "vision_config": "sdpa"})
    bad = [m.layer_idx for m in mods if m.config._attn_implementation != ATTN_NAME]
    if bad:
        raise RuntimeError(f"could not switch text attention layers {bad} to {ATTN_NAME}")


def uninstall(vlm: VLM) -> None:
    """Back to plain sdpa for the text decoder (and drop any capture still attached)."""
    with vlm.lock:
        for m in text_attention_modules(vlm):
            if hasattr(m, _STATE_ATTR):
                delattr(m, _STATE_ATTR)
        vlm.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})


def is_capturing(vlm: VLM) -> bool:
    """Whether a capture is attached to any of the model's text attention modules."""
    return _attached(text_attention_modules(vlm))


def _attached(mods: list[torch.nn.Module]) -> bool:
    return any(getattr(m, _STATE_ATTR, None) is not None for m in mods)


@contextmanager
def capturing(vlm: VLM, image_positions: torch.Tensor, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """While inside, every decode step of this model hands its per-layer (H, N) image mass to
    `recorder` (N = len(image_positions), key positions in the sequence = cache positions).

    The capture is attached to the model's attention modules, so it is seen by the background
    generation thread. One capture per model at a time; hold `vlm.lock` around the generation
    (VLM.stream / generate_text already do) so nothing else runs on the model meanwhile.
    Single sequence: with a batch, batch row 0 is recorded.
    """
    install(vlm)
    mods = text_attention_modules(vlm)
    if recorder.num_layers != len(mods):
        raise ValueError(f"recorder has {recorder.num_layers} layers, model has {len(mods)}")
    pos = torch.as_tensor(image_positions).reshape(-1).long()
    if pos.numel() == 0:
        raise ValueError("no image token positions to capture attention on")
    if _attached(mods):  # the modules found above: no second walk over the model
        raise RuntimeError("attention capture is already active on this model")
    state = _CaptureState(pos, recorder)
    for m in mods:
        setattr(m, _STATE_ATTR, state)
    try:
        yield recorder
    finally:
        for m in mods:
            if getattr(m, _STATE_ATTR, None) is state:
                delattr(m, _STATE_ATTR)


def finalize(
    vlm: VLM,
    recorder: AttentionRecorder,
    image_positions: torch.Tensor,
    past_key_values: Any,
    last_token_id: int,
) -> torch.Tensor:
    """Record the row of the last generated token (the one `generate` never feeds back).

    Runs the decode step `generate` would have run next: one token, on the cache returned by
    `generate(..., return_dict_in_generate=True)` (which it extends by that token). The model
    infers the token's mRoPE position from its stored `rope_deltas`, so call this right after
    that generate, under the same `vlm.lock` hold or at least before another prompt runs.
    Returns the new (L, H, N) row.
    """
    n = recorder.tokens
    ids = torch.tensor([[int(last_token_id)]], dtype=torch.long, device=vlm.device)
    with vlm.lock, torch.no_grad(), capturing(vlm, image_positions, recorder):
        vlm.model(input_ids=ids, past_key_values=past_key_values, use_cache=True)
    if recorder.tokens != n + 1:
        raise RuntimeError("finalize did not record a row (was the cache empty?)")
    return recorder.per_token(n)


# ----------------------------------------------------------------------------------------------
# features


def features_from_sum(
    total: np.ndarray | torch.Tensor, count: int, assignment: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """(L, H, N) attention summed over a span's `count` tokens, (K, N) region assignment ->
    (K, L*H) span features, layer-major (column l*H + h is layer l, head h).

    The one place span features are computed. Numpy in, numpy out: the live worker's CPU path
    stays in numpy (no torch call, so no GIL hand-over with the generation thread, and no tiny
    matrix handed to a threaded BLAS that stalls when the cores are busy)."""
    if count < 1:
        raise ValueError("a span needs at least one recorded token")
    l, h, n = total.shape
    if tuple(assignment.shape[1:]) != (n,) or assignment.ndim != 2:
        raise ValueError(f"assignment must be (K, {n}), got {tuple(assignment.shape)}")
    if isinstance(total, np.ndarray) and isinstance(assignment, np.ndarray):
        return rowmath.span_features(total, count, assignment)
    t = torch.as_tensor(total).float()
    a = torch.as_tensor(assignment).to(device=t.device, dtype=torch.float32)
    return torch.mm(a, t.reshape(l * h, n).T).div_(count)


def region_features(token_attn: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Span features from its tokens' rows: (T, L, H, N) attention, (K, N) region assignment
    (one-hot or soft) -> (K, L*H): the mean over the T tokens of each region's summed mass."""
    if token_attn.ndim != 4:
        raise ValueError(f"token_attn must be (T, L, H, N), got {tuple(token_attn.shape)}")
    return features_from_sum(token_attn.float().sum(0), token_attn.shape[0], torch.as_tensor(assignment))


def span_features(
    recorder: AttentionRecorder,
    lo: int,
    hi: int,
    assignment: np.ndarray | torch.Tensor,
    variant: str | FV.FeatureVariant = FV.DEFAULT,
) -> np.ndarray | torch.Tensor:
    """Features of recorded rows [lo, hi), in the form the recorder holds them (see `row_sum`).
    The default variant sums rows one at a time; the others read the span's rows (`rows`) and,
    for value weighting, the recorder's value weights."""
    v = FV.parse(variant)
    if v.is_default:
        return features_from_sum(recorder.row_sum(lo, hi), hi - lo, assignment)
    rows = recorder.rows(lo, hi)
    weights = recorder.value_weights(v.values, cpu=isinstance(rows, np.ndarray)) if v.values else None
    return variant_features(rows, assignment, v, weights)


def variant_features(
    rows: np.ndarray | torch.Tensor,
    assignment: np.ndarray | torch.Tensor,
    variant: str | FV.FeatureVariant,
    value_weights: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray | torch.Tensor:
    """(T, L, H, N) rows of a span's tokens, (K, N) assignment -> (K, L*H) features of `variant`
    (`vstream.attr.features`); `value_weights` (L, H, N) for vnorm / vonorm. The default goes
    through `region_features` / `features_from_sum` (unchanged). numpy in, numpy out (the
    arithmetic is `features.pool_rows`, as in the attribution process); torch tensors stay
    torch, on their device (a GPU's rows are not copied to the host)."""
    v = FV.parse(variant)
    if v.is_default:
        if isinstance(rows, np.ndarray):
            return features_from_sum(rowmath.sum_rows(list(rows)), rows.shape[0], np.asarray(assignment))
        return region_features(rows, torch.as_tensor(assignment))
    if isinstance(rows, np.ndarray):
        w = None if value_weights is None else np.asarray(torch.as_tensor(value_weights).cpu(), dtype=np.float32)
        return FV.pool_rows(rows, np.asarray(torch.as_tensor(assignment).cpu(), dtype=np.float32), v, w)
    if rows.ndim != 4 or rows.shape[0] < 1:
        raise ValueError(f"rows must be (T >= 1, L, H, N), got {tuple(rows.shape)}")
    return pool_spans(rows, [(0, rows.shape[0])], assignment, v, value_weights)[0]


def pool_spans(
    rows: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    assignment: np.ndarray | torch.Tensor,
    variant: str | FV.FeatureVariant = FV.DEFAULT,
    value_weights: np.ndarray | torch.Tensor | None = None,
    in_numpy: bool | None = None,
) -> torch.Tensor:
    """Features of many spans of one trace at once: (T, L, H, N) rows, spans as [lo, hi) token
    bounds (clipped to T; an empty span gets zeros), (K, N) assignment -> (S, K, L*H) float32
    of `variant`, on the rows' device. The rows are weighted once for the trace and the spans
    pooled in a few batched ops, not one chain of small ops per span: what attributing a
    finished trace (`evaluate`, the methods' `span_features`) costs per span. `in_numpy`: pool
    in numpy (`features.pool_spans`; the default for CPU rows, where torch's per-call dispatch
    costs more than the arithmetic) or in torch on the rows' device (the default elsewhere)."""
    if rows.ndim != 4:
        raise ValueError(f"rows must be (T, L, H, N), got {tuple(rows.shape)}")
    v = FV.parse(variant)
    if v.raw:  # its parts side by side (S, K, 2*L*H)
        return torch.cat([pool_spans(rows, bounds, assignment, p, value_weights, in_numpy) for p in v.parts], -1)
    t, l, h, n = rows.shape
    lo, hi = FV.clip_bounds(np.asarray(bounds), t)
    if rows.device.type == "cpu" if in_numpy is None else in_numpy:
        a_np = np.asarray(torch.as_tensor(assignment).cpu(), dtype=np.float32)
        if a_np.ndim != 2 or a_np.shape[1] != n:
            raise ValueError(f"assignment must be (K, {n}), got {tuple(a_np.shape)}")
        w = None if value_weights is None else np.asarray(torch.as_tensor(value_weights).cpu(), dtype=np.float32)
        return torch.from_numpy(FV.pool_spans(rows.detach().float().numpy(), lo, hi, a_np, v, w))
    r = rows.float()
    a = torch.as_tensor(assignment).to(device=r.device, dtype=torch.float32)
    if tuple(a.shape) != (a.shape[0], n) or a.ndim != 2:
        raise ValueError(f"assignment must be (K, {n}), got {tuple(a.shape)}")
    weigh_pooled = v.pool == "mean" and not v.token_norm  # one value weight per column: weigh the means
    vw = None
    if v.values:
        if value_weights is None:
            raise ValueError(f"feature variant {v.name!r} needs the value weights ({v.values})")
        vw = torch.as_tensor(value_weights).to(device=r.device, dtype=torch.float32)  # (L, H, N)
        if not weigh_pooled:
            r = r * vw[None]
    if v.token_norm:
        total = r.sum(-1, keepdim=True)
        r = torch.where(total > 0, r / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(r))
    r = r.reshape(t, l * h, n)
    count = hi - lo  # (S,)
    s, k = len(lo), a.shape[0]
    if v.pool == "mean":
        weights = torch.from_numpy(FV.span_mean_weights(lo, hi, t)).to(r.device)
        mean = torch.mm(weights, r.reshape(t, l * h * n)).reshape(s, l * h, n)
        if vw is not None and weigh_pooled:
            mean = mean * vw.reshape(1, l * h, n)
        f = torch.matmul(mean, a.T)  # (S, L*H, K)
    elif v.pool == "last":
        f = (
            torch.matmul(r[torch.from_numpy(np.maximum(hi - 1, 0)).to(r.device)], a.T)
            if t
            else r.new_zeros(s, l * h, k)
        )
    else:  # max over the span's tokens of each token's own region features
        per_token = torch.matmul(r, a.T)  # (T, L*H, K)
        pooled = [per_token[i:j].amax(0) if j > i else per_token.new_zeros(l * h, k) for i, j in zip(lo, hi)]
        f = torch.stack(pooled) if pooled else r.new_zeros(0, l * h, k)
    f = f.transpose(1, 2)  # (S, K, L*H)
    if v.region_mean:
        size = a.sum(1)[:, None]  # (K, 1)
        f = torch.where(size > 0, f / torch.where(size > 0, size, torch.ones_like(size)), torch.zeros_like(f))
    if v.log:
        f = torch.log(f + FV.LOG_EPS)
    f = f.contiguous()
    if (count == 0).any():  # an empty span's features are zeros, whatever the variant
        f[torch.from_numpy(count == 0).to(f.device)] = 0.0
    return f
