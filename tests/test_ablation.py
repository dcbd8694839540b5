"""THE ablation operator (vstream.attr.ablation) against its oracle: the model's own forward pass
on the painted image.

Ablating image tokens = painting their patches with the image's mean colour and re-running the
vision encoder, with the unablated mRoPE positions passed explicitly. That must equal the
model's plain forward on prompt + trace with the painted `pixel_values` (within 1e-4 on per-token
log-probabilities), whatever the batching. Ablating nothing must give exactly the unablated model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.attr import ablation as A
from vstream.attr.spans import Span
from vstream.model import VLM, load_vlm
from vstream.world.assets import DEMO_MODEL_DIR

ATOL = 1e-4


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _demo_vlm() -> VLM:
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not trained yet (assets/demo-model/model.safetensors missing)")
    return load_vlm(str(DEMO_MODEL_DIR), device="cpu")


@pytest.fixture(scope="module", params=["tiny_qwen2_5_vl", "tiny_qwen3_vl", "demo"])
def case(request):
    """(vlm, inputs, generated ids): a real greedy trace for the demo, random ids otherwise."""
    if request.param == "demo":
        from vstream.world.shapes import make_scene

        vlm = _demo_vlm()
        scene = make_scene(5)
        inputs = vlm.build_inputs(scene.question, image=scene.image())
        gc = vlm.generation_kwargs(24, False, 1.0)["generation_config"]
        with vlm.lock, torch.no_grad():
            out = vlm.model.generate(**inputs.model_kwargs, generation_config=gc)
        gen = out[0, inputs.prompt_len :]
        gen = gen[~torch.isin(gen, torch.tensor(vlm.eos_token_ids))]
    else:
        vlm = request.getfixturevalue(request.param)
        inputs = vlm.build_inputs("What is in the image?", image=_noise(120, 100))
        gen = torch.randint(10, len(vlm.tokenizer) - 20, (9,), generator=torch.Generator().manual_seed(0))
    return vlm, inputs, gen, request.param


def _plain_logprobs(vlm: VLM, inputs, gen: torch.Tensor) -> torch.Tensor:
    """The model's own forward (its own mRoPE positions) on prompt + trace: (T,)."""
    kw = dict(inputs.model_kwargs)
    seq = torch.cat([kw["input_ids"], gen[None]], dim=1)
    kw["input_ids"], kw["attention_mask"] = seq, torch.ones_like(seq)
    kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros(1, gen.numel(), dtype=torch.long)], 1)
    with vlm.lock, torch.no_grad():
        vlm.model.model.rope_deltas = None
        logits = vlm.model(**kw).logits[0].float()
    p, t = inputs.prompt_len, gen.numel()
    return torch.log_softmax(logits[p - 1 : p + t - 1], -1).gather(-1, gen[:, None])[:, 0]


def _painted_logprobs(vlm: VLM, inputs, gen: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Oracle: paint the ablated tokens' patches by hand, then the model's own forward: (T,)."""
    kw = dict(inputs.model_kwargs)
    n, m2 = token_mask.numel(), vlm.merge_size**2
    pv = kw["pixel_values"].reshape(n, m2, 3, -1).clone()  # token, patch in token, channel, pixels
    pv[token_mask] = pv.mean(dim=(0, 1, 3))[None, :, None]
    inputs = dataclasses.replace(inputs, model_kwargs={**kw, "pixel_values": pv.reshape(n * m2, -1)})
    return _plain_logprobs(vlm, inputs, gen)


def _masks(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    m = torch.rand(4, n, generator=g) < 0.5
    m[0] = False  # nothing
    m[3] = True  # everything
    return m


def test_ablation_equals_forward_on_painted_image(case):
    vlm, inputs, gen, _ = case
    n = inputs.image_token_positions.numel()
    masks = _masks(n)
    lp = A.span_logprobs(vlm, inputs, gen, masks)
    assert lp.shape == (4, gen.numel()) and lp.dtype == torch.float32
    # unablated == the model's own forward with its own positions
    torch.testing.assert_close(lp[0], _plain_logprobs(vlm, inputs, gen), atol=ATOL, rtol=0)
    for m in range(4):
        torch.testing.assert_close(lp[m], _painted_logprobs(vlm, inputs, gen, masks[m]), atol=ATOL, rtol=0)
    # ablating everything changes the prediction (the operator really does something)
    assert (lp[3] - lp[0]).abs().max() > 1e-4
    # batching does not matter
    torch.testing.assert_close(A.span_logprobs(vlm, inputs, gen, masks, batch_size=1), lp, atol=ATOL, rtol=0)


def test_empty_set_has_zero_effect_and_shapes(case):
    vlm, inputs, gen, _ = case
    n = inputs.image_token_positions.numel()
    k = 4
    assignment = torch.zeros(k, n)
    assignment[torch.arange(n) % k, torch.arange(n)] = 1
    t = gen.numel()
    spans = [Span(0, "thought", "a", 0, max(1, t // 2)), Span(1, "thought", "b", max(1, t // 2), t)]
    region_masks = torch.zeros(5, k, dtype=torch.bool)
    region_masks[1, 0] = True
    region_masks[2, :2] = True
    region_masks[3] = True
    eff, base = A.ablation_effects(vlm, inputs, gen, spans, region_masks, assignment, return_base=True)
    assert eff.shape == (5, 2) and base.shape == (2,)
    assert eff[0].abs().max() < 1e-6 and eff[4].abs().max() < 1e-6  # the empty set, twice
    # effects are sums of per-token log-prob drops over each span
    lp = A.span_logprobs(vlm, inputs, gen, A.region_token_masks(region_masks, assignment))
    full = A.span_logprobs(vlm, inputs, gen, torch.zeros(1, n, dtype=torch.bool))[0]
    want = torch.stack([(full - lp)[:, s.token_start : s.token_end].sum(1) for s in spans], 1)
    torch.testing.assert_close(eff, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        base, torch.stack([full[s.token_start : s.token_end].sum() for s in spans]), atol=ATOL, rtol=0
    )
    assert eff[3].abs().max() > 1e-4


def test_model_state_untouched(tiny_qwen2_5_vl):
    vlm = tiny_qwen2_5_vl
    inputs = vlm.build_inputs("What is in the image?", image=_noise(64, 64))
    inner = vlm.model.model
    sentinel = torch.tensor([[7]])
    inner.rope_deltas = sentinel
    A.span_logprobs(vlm, inputs, [276, 279, 23], torch.ones(1, inputs.image_token_positions.numel(), dtype=torch.bool))
    assert inner.rope_deltas is sentinel
    with pytest.raises(ValueError):
        A.span_logprobs(vlm, inputs, [276, 279], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        A.ablation_effects(
            vlm,
            inputs,
            [276, 279],
            [Span(0, "thought", "x", 0, 5)],
            torch.ones(1, 2, dtype=torch.bool),
            torch.ones(2, inputs.image_token_positions.numel()),
        )


def test_trace_with_an_image_placeholder_is_refused_clearly(tiny_qwen2_5_vl):
    """A (random) model may write <|image_pad|>; teacher-forced it would be one more image slot."""
    vlm = tiny_qwen2_5_vl
    inputs = vlm.build_inputs("What is in the image?", image=_noise(64, 64))
    n = inputs.image_token_positions.numel()
    with pytest.raises(A.PlaceholderInTrace, match="1 image/video placeholder"):
        A.ablation_effects(
            vlm,
            inputs,
            [276, vlm.image_token_id, 23],
            [Span(0, "thought", "x", 0, 3)],
            torch.ones(1, 1, dtype=torch.bool),
            torch.ones(1, n),
        )
    assert A.span_logprobs(vlm, inputs, [276, 279, 23], torch.zeros(1, n, dtype=torch.bool)).shape == (1, 3)
