"""The one teacher-forced forward over prompt + trace that the model-internal baselines share.

input_x_gradient and attnlrp both need the span log-probs with a graph back to the language
model's input embeddings (image features already in); TAM needs the decoder's last hidden
states. All of them run the model once over `VLMInputs.teacher_forced(trace)` while holding
`vlm.lock`, and leave the base model's cached `rope_deltas` as they found them (a live stream
may rely on it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vstream.model import VLM, VLMInputs


@dataclass
class GradPass:
    """What one teacher-forced forward with grad leaves for backward passes.

    `logp`: (T,) log p(y_t | x, y<t) of the trace, with the graph.
    `logits`: (T, V) the rows that predict the trace (float32 or wider), with the graph.
    `embeds`: (1, S, D) leaf: the language model's `inputs_embeds` over prompt + trace.
    `deepstack`: Qwen3-VL's visual features added inside the decoder, one (n_visual, D) leaf per
    injected layer, detached from the vision tower ([] on other architectures).
    `visual_positions`: (n_visual,) the sequence positions the deepstack rows are added at.
    """

    logp: torch.Tensor
    logits: torch.Tensor
    embeds: torch.Tensor
    deepstack: list[torch.Tensor]
    visual_positions: torch.Tensor


@contextmanager
def _guarded(vlm: VLM) -> Iterator[None]:
    """Hold the model's lock; put back `rope_deltas`, which a forward without cache overwrites."""
    inner = getattr(vlm.model, "model", None)
    with vlm.lock:
        saved = getattr(inner, "rope_deltas", None)
        try:
            yield
        finally:
            if hasattr(inner, "rope_deltas"):
                inner.rope_deltas = saved


@contextmanager
def forward_with_input_grad(vlm: VLM, inputs: VLMInputs, generated_ids: torch.Tensor) -> Iterator[GradPass]:
    """One teacher-forced forward whose LLM input embeddings are a leaf that requires grad.

    Inside the `with` block the lock and grad mode are held, so the caller can run as many
    `torch.autograd.grad(..., retain_graph=True)` calls as it has spans. Only the trace's
    predicting positions P-1 .. P+T-2 go through the vocabulary head."""
    gen = torch.as_tensor(generated_ids).reshape(-1)
    t = int(gen.numel())
    kw = inputs.teacher_forced(gen)
    grabbed: dict[str, Any] = {}

    def pre_hook(module, args, kwargs):  # the LLM's inputs_embeds, image features already in
        leaf = kwargs["inputs_embeds"].detach().requires_grad_(True)
        grabbed["emb"] = leaf
        kwargs["inputs_embeds"] = leaf
        stack = kwargs.get("deepstack_visual_embeds")
        if stack is not None:
            stack = [d.detach().requires_grad_(True) for d in stack]
            kwargs["deepstack_visual_embeds"] = stack
            grabbed["stack"] = stack
            grabbed["vis"] = kwargs["visual_pos_masks"][0].nonzero()[:, 0]
        return args, kwargs

    handle = vlm.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with _guarded(vlm), torch.inference_mode(False), torch.enable_grad():
            kw = {name: v.clone() for name, v in kw.items()}  # normal tensors even if built under inference_mode
            out = vlm.model(**kw, use_cache=False, logits_to_keep=t + 1)
            handle.remove()
            logits = out.logits[0, :t]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            target = gen.to(logits.device)
            logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]  # (T,)
            emb = grabbed["emb"]
            vis = grabbed.get("vis", torch.zeros(0, dtype=torch.long, device=emb.device))
            yield GradPass(logp, logits, emb, grabbed.get("stack", []), vis)
    finally:
        handle.remove()


def final_hidden_states(vlm: VLM, inputs: VLMInputs, generated_ids: torch.Tensor) -> torch.Tensor:
    """(S, D) the decoder's last hidden states (after its final norm, i.e. what the vocabulary
    head reads) over prompt + trace, from one teacher-forced forward without grad."""
    gen = torch.as_tensor(generated_ids).reshape(-1)
    kw = inputs.teacher_forced(gen)
    grabbed: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        grabbed["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = vlm.language_model.register_forward_hook(hook)
    try:
        with _guarded(vlm), torch.no_grad():
            vlm.model(**kw, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return grabbed["h"][0]
