"""THE region-ablation operator of vSTREAM, teacher-forced on an already generated trace.

Every ablation effect in this project (estimator labels, baselines, evaluation) comes from here.

The operator
------------
Ablating a set of image tokens = masking them out of attention as KEYS for every query: the
2-D `attention_mask` is 0 at those image positions and 1 everywhere else, so no later position
(prompt text, other image tokens, the trace) can read anything from them. Everything else is
left exactly as in the unablated run:

* the 3-D mRoPE `position_ids` are computed ONCE, from the unablated sequence (prompt + trace)
  with the full mask, by the model's own `get_rope_index`, and passed explicitly, so no
  position shifts when tokens are ablated (a padding-style mask would otherwise renumber them);
* the vision encoder runs once on the unablated image (its own attention is not touched), its
  outputs are reused for every mask (`mm_encoder_outputs`), and on Qwen3-VL the DeepStack
  features are still injected at the image positions, which nobody can read once masked.

This is the precursor's (AT2) default choice and it equals physically deleting the ablated
tokens from the sequence while keeping every other token's position id (tested to 1e-4).

Effect of a region set v on span S (nats):
    sum_{t in S} log p(y_t | x, y_<t) - log p(y_t | ablate(x, v), y_<t)
with y the generated trace (teacher forcing), both terms computed in the same batch.

Cost: one batched forward of the text decoder over prompt + trace per chunk of masks; the
vocabulary projection is applied only to the trace positions, in chunks, so long traces of
large-vocabulary models do not materialise (masks x tokens x vocab) logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

__all__ = [
    "OPERATOR",
    "TeacherForced",
    "ablation_effects",
    "prepare",
    "region_token_masks",
    "span_logprobs",
]

OPERATOR = (
    "attention-key masking: the ablated image tokens are removed as keys for every query "
    "(2-D attention mask 0 there); mRoPE position ids computed once from the unablated input and "
    "passed explicitly; vision encoder run once, unablated; teacher-forced on the generated trace"
)
LOGIT_CHUNK = 256  # trace positions per vocabulary projection


@dataclass
class TeacherForced:
    """Prompt + trace as one sequence, with everything an ablated forward reuses."""

    input_ids: torch.Tensor  # (1, P+T)
    mm_token_type_ids: torch.Tensor  # (1, P+T)
    position_ids: torch.Tensor  # (3, 1, P+T) from the unablated input
    encoder_outputs: dict[str, Any]  # "image"/"video" -> the vision tower's outputs (once)
    generated: torch.Tensor  # (T,) long
    prompt_len: int
    token_positions: torch.Tensor  # (N,) sequence positions the masks' columns refer to

    @property
    def n_tokens(self) -> int:
        return int(self.generated.numel())


def _inner(vlm: Any) -> Any:
    """The multimodal base model (Qwen*VLModel) under the ...ForConditionalGeneration head."""
    inner = getattr(vlm.model, "model", None)
    if inner is None or not hasattr(inner, "get_rope_index"):
        raise RuntimeError(f"unsupported model layout for ablation: {type(vlm.model).__name__}")
    return inner


def _as_generated(generated_ids: Any, device: torch.device) -> torch.Tensor:
    g = torch.as_tensor(generated_ids, dtype=torch.long).reshape(-1)
    if g.numel() == 0:
        raise ValueError("no generated tokens to teacher-force")
    return g.to(device)


@torch.no_grad()
def prepare(vlm: Any, inputs: Any, generated_ids: Any, token_positions: torch.Tensor | None = None) -> TeacherForced:
    """Build the teacher-forced sequence, its unablated mRoPE positions and the vision outputs.

    `token_positions` (default: the image tokens, `inputs.image_token_positions`) are the
    sequence positions that the columns of the ablation masks refer to; pass
    `inputs.video_token_positions` to ablate video tokens instead.
    """
    inner = _inner(vlm)
    kw = inputs.model_kwargs
    dev = kw["input_ids"].device
    gen = _as_generated(generated_ids, dev)
    p = int(kw["input_ids"].shape[1])
    ids = torch.cat([kw["input_ids"], gen[None]], dim=1)
    mm = torch.cat([kw["mm_token_type_ids"], torch.zeros(1, gen.numel(), dtype=kw["mm_token_type_ids"].dtype, device=dev)], dim=1)
    rope_kw = {k: kw[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in kw}
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=mm, attention_mask=torch.ones_like(ids), **rope_kw)
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise RuntimeError(f"unexpected mRoPE position ids of shape {tuple(pos.shape)}")
    enc: dict[str, Any] = {}
    if "pixel_values" in kw:
        enc["image"] = inner.get_image_features(kw["pixel_values"], kw["image_grid_thw"], return_dict=True)
    if "pixel_values_videos" in kw:
        enc["video"] = inner.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"], return_dict=True)
    if token_positions is None:
        token_positions = inputs.image_token_positions
    tp = torch.as_tensor(token_positions, dtype=torch.long).reshape(-1).to(dev)
    if tp.numel() and (int(tp.min()) < 0 or int(tp.max()) >= p):
        raise ValueError("token_positions must lie inside the prompt")
    return TeacherForced(ids, mm, pos, enc, gen, p, tp)


def _repeat_encoder_outputs(enc: dict[str, Any], b: int) -> dict[str, Any]:
    """The same vision outputs for b identical batch rows (the model concatenates them)."""
    out = {}
    for key, o in enc.items():
        ns = SimpleNamespace(pooler_output=tuple(o.pooler_output) * b)
        ds = getattr(o, "deepstack_features", None)
        if ds is not None:  # Qwen3-VL: one tuple per DeepStack layer
            ns.deepstack_features = [tuple(f) * b for f in ds]
        out[key] = ns
    return out


def _forward_logprobs(vlm: Any, tf: TeacherForced, key_keep: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 key mask -> (B, T) log p(y_t) teacher-forced."""
    inner = _inner(vlm)
    b = key_keep.shape[0]
    out = inner(
        input_ids=tf.input_ids.expand(b, -1),
        attention_mask=key_keep,
        position_ids=tf.position_ids.expand(-1, b, -1),
        mm_token_type_ids=tf.mm_token_type_ids.expand(b, -1),
        mm_encoder_outputs=_repeat_encoder_outputs(tf.encoder_outputs, b),
        use_cache=False,
    )
    p, t = tf.prompt_len, tf.n_tokens
    hidden = out.last_hidden_state[:, p - 1 : p + t - 1]  # position i predicts token i+1
    head = vlm.model.get_output_embeddings()
    lps = []
    for s in range(0, t, LOGIT_CHUNK):
        logits = head(hidden[:, s : s + LOGIT_CHUNK]).float()
        tgt = tf.generated[s : s + LOGIT_CHUNK]
        lp = logits.gather(-1, tgt[None, :, None].expand(b, -1, 1))[..., 0] - torch.logsumexp(logits, dim=-1)
        lps.append(lp)
    return torch.cat(lps, dim=1)


@torch.no_grad()
def span_logprobs(
    vlm: Any,
    inputs: Any,
    generated_ids: Any,
    ablate_token_masks: Any,
    batch_size: int | None = None,
    token_positions: torch.Tensor | None = None,
    prepared: TeacherForced | None = None,
) -> torch.Tensor:
    """Per-token teacher-forced log p(y_t) under each ablation: (M, N) bool -> (M, T) float32.

    Row m ablates the tokens where `ablate_token_masks[m]` is True (columns = image tokens in
    the order of `inputs.image_token_positions`, or of `token_positions`). An all-False row is
    the unablated model. Masks are run `batch_size` at a time (default: all) in one batched
    forward each.
    Holds `vlm.lock`; the model's cached `rope_deltas` is left as it was.
    """
    with vlm.lock:
        inner = _inner(vlm)
        saved = getattr(inner, "rope_deltas", None)
        try:
            tf = prepared if prepared is not None else prepare(vlm, inputs, generated_ids, token_positions)
            n = int(tf.token_positions.numel())
            masks = torch.as_tensor(ablate_token_masks)
            if masks.ndim == 1:
                masks = masks[None]
            if masks.ndim != 2 or masks.shape[1] != n:
                raise ValueError(f"ablate_token_masks must be (M, {n}), got {tuple(masks.shape)}")
            masks = masks.to(device=tf.input_ids.device, dtype=torch.bool)
            seq = tf.input_ids.shape[1]
            rows = []
            for chunk in masks.split(max(1, int(batch_size or len(masks) or 1))):
                keep = torch.ones(chunk.shape[0], seq, dtype=torch.long, device=chunk.device)
                keep[:, tf.token_positions] = (~chunk).long()
                rows.append(_forward_logprobs(vlm, tf, keep))
            return torch.cat(rows, dim=0).float() if rows else torch.zeros(0, tf.n_tokens)
        finally:
            if hasattr(inner, "rope_deltas"):
                inner.rope_deltas = saved


def region_token_masks(region_masks: Any, assignment: torch.Tensor) -> torch.Tensor:
    """(M, K) region masks (True = ablated) x (K, N) assignment -> (M, N) token masks: a token
    is ablated when any region it belongs to is (hard assignments: exactly its region)."""
    r = torch.as_tensor(region_masks)
    a = torch.as_tensor(assignment)
    if r.ndim == 1:
        r = r[None]
    if r.ndim != 2 or a.ndim != 2 or r.shape[1] != a.shape[0]:
        raise ValueError(f"region masks {tuple(r.shape)} do not match assignment {tuple(a.shape)}")
    return (r.to(torch.float32) @ (a.to(torch.float32).cpu() > 0).to(torch.float32)) > 0


def _span_bounds(spans: Sequence[Any], t: int) -> list[tuple[int, int]]:
    out = []
    for s in spans:
        lo, hi = (s.token_start, s.token_end) if hasattr(s, "token_start") else (int(s[0]), int(s[1]))
        if not 0 <= lo < hi <= t:
            raise ValueError(f"span [{lo}, {hi}) outside the {t} generated tokens")
        out.append((int(lo), int(hi)))
    return out


@torch.no_grad()
def ablation_effects(
    vlm: Any,
    inputs: Any,
    generated_ids: Any,
    spans: Sequence[Any],
    region_masks: Any,
    assignment: torch.Tensor,
    batch_size: int | None = None,
    return_base: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Effects (M, n_spans) of ablating each region set on each span.

    `spans`: `vstream.spans.Span`s (or (token_start, token_end) pairs) over generated-token
    indices; `region_masks` (M, K) bool, True = region ablated; `assignment` (K, N) from
    `vstream.regions`. effect[m, s] = sum over span s's tokens of log p(orig) - log p(ablated m).
    The unablated pass runs in the same batch as the first masks. With `return_base`, also
    the (n_spans,) unablated span log-probabilities.
    """
    gen = torch.as_tensor(generated_ids).reshape(-1)
    bounds = _span_bounds(spans, int(gen.numel()))
    tok = region_token_masks(region_masks, assignment)
    allm = torch.cat([torch.zeros(1, tok.shape[1], dtype=torch.bool), tok], dim=0)
    lp = span_logprobs(vlm, inputs, gen, allm, batch_size=batch_size).cpu()  # (1+M, T)
    per_span = torch.stack([lp[:, lo:hi].sum(1) for lo, hi in bounds], dim=1) if bounds else lp[:, :0]
    effects = per_span[:1] - per_span[1:]
    return (effects, per_span[0]) if return_base else effects
