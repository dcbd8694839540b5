"""The decoder layer loop that the TaYS engine, its ingestion and the interleaved baseline share.

We drive the language model's layers ourselves with its own weights (norms, q/k/v/o projections,
rotary embedding, GQA, MLP) instead of calling `model.forward`, because each caller decides what
a chunk of tokens attends to: the engine reads two caches (video + text) without concatenating
them, a frame group must not see reasoning, and the batch / interleaved baselines use one causal
cache. Not calling `model.forward` also leaves the model's `rope_deltas` state alone, so no
`vlm.lock` is needed. Keys are cached post-RoPE, as transformers does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tays.cache import KVSpec
from vstream.model import VLM

__all__ = ["Context", "Decoder", "KVSegment", "Probe", "Store", "attend_segments"]

# keys / values (B, Hkv, Lk, D), any strides, and an optional bool (Lq, Lk) mask (True = attend)
KVSegment = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Context = Callable[[int, torch.Tensor, torch.Tensor], list[KVSegment]]  # (layer, k, v) -> what q attends to
Store = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, k, v): keep the chunk's K/V
Probe = Callable[[int, torch.Tensor], None]  # (layer, q): sees the chunk's post-RoPE queries (attention capture)


def attend_segments(q: torch.Tensor, segments: Sequence[KVSegment], scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V over the union of `segments`, without concatenating them.

    q: (B, Hq, Lq, D). GQA: query head h uses kv head h // (Hq // Hkv), as transformers' repeat_kv,
    without repeating K/V. Per segment we keep the row max m, the sum l of exp(s - m) and the
    unnormalised output, and merge them with the running ones (the flash-attention recurrence), in
    float32, so a segment can be a slice of a cache buffer that another thread keeps appending to.
    Returns (B, Lq, Hq * D) in q's dtype.
    """
    B, Hq, Lq, D = q.shape
    acc = m_run = l_run = None
    for k, v, mask in segments:
        Lk = k.shape[-2]
        if Lk == 0:
            continue
        Hkv = k.shape[1]
        G = Hq // Hkv
        qg = q.reshape(B, Hkv, G * Lq, D)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G*Lq, Lk)
        if mask is not None:
            s = s.view(B, Hkv, G, Lq, Lk).masked_fill(~mask, -math.inf).view(B, Hkv, G * Lq, Lk)
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p.to(v.dtype), v).float()  # (B, Hkv, G*Lq, D)
        if acc is None:
            acc, m_run, l_run = o, m, l
            continue
        m_new = torch.maximum(m_run, m)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        a, b = torch.exp(m_run - m_safe), torch.exp(m - m_safe)
        acc = acc * a + o * b
        l_run = l_run * a + l * b
        m_run = m_new
    if acc is None:
        raise ValueError("attention over no keys")
    out = acc / l_run.clamp_min(torch.finfo(torch.float32).tiny)
    return out.view(B, Hq, Lq, D).transpose(1, 2).reshape(B, Lq, Hq * D).to(q.dtype)


class Decoder:
    """The language model of a Qwen2.5-VL `VLM`, run one chunk of tokens at a time."""

    def __init__(self, vlm: VLM):
        # imported here, not at the top: transformers' model module takes seconds to import, and
        # by the time a decoder is built the loaded model has imported it already
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        self.apply_rope = apply_rotary_pos_emb
        self.lm = vlm.language_model
        self.layers = list(self.lm.layers)
        self.lm_head = vlm.model.lm_head
        self.embed_tokens = vlm.model.get_input_embeddings()
        self.device = vlm.device
        self.kv_spec = KVSpec(
            len(self.layers),
            int(vlm.text_config.num_key_value_heads),
            int(self.layers[0].self_attn.head_dim),
            vlm.dtype,
            vlm.device,
        )

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """(1, n, hidden) input embeddings of token ids."""
        return self.embed_tokens(torch.tensor(list(ids), dtype=torch.long, device=self.device))[None]

    def run(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        context: Context,
        store: Store,
        need_logits: bool,
        probe: Probe | None = None,
    ) -> torch.Tensor | None:
        """Run (1, L, hidden) embeddings at (3, 1, L) positions through the layers: per layer the
        chunk's K/V go to `store` and its queries attend to `context(layer, k, v)`. Returns the
        (1, L, vocab) logits, or None (the last layer's attention and MLP are then skipped: only
        its K/V are needed). `probe(layer, q)` gets each layer's (1, heads, L, D) queries by
        reference (no arithmetic here: `tays.capture` computes attention rows from them later)."""
        cos, sin = self.lm.rotary_emb(h, pos)
        B, L, _ = h.shape
        D = self.kv_spec.head_dim
        last = len(self.layers) - 1
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, L, -1, D).transpose(1, 2)  # (B, heads, L, D)
            k = attn.k_proj(x).view(B, L, -1, D).transpose(1, 2)  # (B, kv_heads, L, D)
            v = attn.v_proj(x).view(B, L, -1, D).transpose(1, 2)
            q, k = self.apply_rope(q, k, cos, sin)
            store(li, k, v)
            if probe is not None:
                probe(li, q)
            if li == last and not need_logits:
                return None
            o = attend_segments(q, context(li, k, v), attn.scaling)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.lm.norm(h))
