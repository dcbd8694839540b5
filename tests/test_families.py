"""Every supported family on a tiny random config: capture oracle, live path, ablation operator.

The same three checks run on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and GLM-4.1V:
* capture: the rows recorded inside `generate` on `vstream_sdpa` equal eager attention of one
  full forward over prompt + trace, and the tokens equal plain sdpa's;
* live path: `attribute_stream` gives one SpanEvent per span, with finite scores equal to the
  estimator applied to the span's recorded features;
* ablation: `span_logprobs` equals the model's own forward on a hand-painted image.
GLM-4.1V's own format (its chat template, its <answer> tags, no video yet) is checked last.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.attr import ablation as A
from vstream.attr import capture as C
from vstream.attr.capture import region_features
from vstream.attr.estimator import LinearEstimator
from vstream.attr.spans import FixedSpans
from vstream.attr.worker import DoneEvent, SpanEvent, attribute_stream
from vstream.model import VLM, VLMError, load_vlm, split_thinking

FAMILIES = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_qwen3_vl_moe", "tiny_glm4v"]
N_NEW = 10
ATOL = 1e-4


def _noise(w: int = 120, h: int = 100, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[VLM, VLM]:
    """(live copy, eager oracle copy) of one family's tiny model."""
    path = request.getfixturevalue(request.param + "_dir")
    live = load_vlm(str(path), device="cpu")
    oracle = load_vlm(str(path), device="cpu")
    oracle.model.set_attn_implementation("eager")
    return live, oracle


def _gen_config(vlm: VLM, cache: bool = False):
    gc = vlm.generation_kwargs(N_NEW, False, 1.0)["generation_config"]
    gc.min_new_tokens = N_NEW
    gc.return_dict_in_generate = cache
    return gc


def test_capture_matches_eager_attention(family):
    live, oracle = family
    inputs = live.build_inputs("What is in the image?", image=_noise())
    with live.lock, torch.no_grad():
        plain = live.model.generate(**inputs.model_kwargs, generation_config=_gen_config(live))
    rec = C.AttentionRecorder.for_vlm(live, keep_cpu=True)
    pos = inputs.image_token_positions
    with live.lock, torch.no_grad(), C.capturing(live, pos, rec):
        out = live.model.generate(**inputs.model_kwargs, generation_config=_gen_config(live, cache=True))
    seq = out.sequences
    assert torch.equal(seq, plain)  # capture never changes the tokens
    assert all(m.config._attn_implementation == C.ATTN_NAME for m in C.text_attention_modules(live))
    C.finalize(live, rec, pos, out.past_key_values, int(seq[0, -1]))
    got = rec.stack()

    p, t = inputs.prompt_len, seq.shape[1] - inputs.prompt_len
    kw = inputs.teacher_forced(seq[0, p:])
    with oracle.lock, torch.no_grad():
        oracle.base_model.rope_deltas = None
        att = torch.stack(oracle.model(**kw, output_attentions=True).attentions)  # (L, 1, H, S, S)
    want = att[:, 0, :, p : p + t][..., pos].permute(2, 0, 1, 3).float()
    assert got.shape == (t, live.num_layers, live.num_heads, pos.numel())
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert want.sum() > 0


def test_live_path_gives_spans_with_scores(family):
    live, _ = family
    est = LinearEstimator(live.num_layers, live.num_heads)
    with torch.no_grad():
        est.weight.copy_(torch.randn(est.num_features, generator=torch.Generator().manual_seed(0)))
    with attribute_stream(
        live, _noise(), "What is in the image?", est, max_new_tokens=12, splitter=FixedSpans(4)
    ) as run:
        events = list(run)
    spans = [e for e in events if isinstance(e, SpanEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.error is None and done.n_tokens == 12
    assert [(s.span.token_start, s.span.token_end) for s in spans] == [(0, 4), (4, 8), (8, 12)]
    rec = run.recorder
    for s in spans:
        assert s.scores.shape == (events[0].regions.k,) and np.isfinite(s.scores).all()
        lo, hi = s.rows
        want = est.predict(region_features(rec.stack(lo, hi), events[0].regions.assignment)).detach().numpy()
        np.testing.assert_allclose(s.scores, want, rtol=1e-5, atol=1e-6)
    assert np.ptp(spans[0].scores) > 0  # regions are told apart


def test_ablation_equals_forward_on_painted_image(family):
    vlm, _ = family
    inputs = vlm.build_inputs("What is in the image?", image=_noise())
    gen = torch.randint(40, len(vlm.tokenizer) - 1, (7,), generator=torch.Generator().manual_seed(0))
    n, m2 = inputs.image_token_positions.numel(), vlm.merge_size**2
    masks = torch.rand(3, n, generator=torch.Generator().manual_seed(1)) < 0.5
    masks[0] = False
    lp = A.span_logprobs(vlm, inputs, gen, masks)
    for m in range(3):
        kw = dict(inputs.model_kwargs)
        pv = kw["pixel_values"].reshape(n, m2, 3, -1).clone()
        pv[masks[m]] = pv.mean(dim=(0, 1, 3))[None, :, None]
        painted = dataclasses.replace(inputs, model_kwargs={**kw, "pixel_values": pv.reshape(n * m2, -1)})
        tf = painted.teacher_forced(gen)
        with vlm.lock, torch.no_grad():
            vlm.base_model.rope_deltas = None
            logits = vlm.model(**tf).logits[0].float()
        p = inputs.prompt_len
        want = torch.log_softmax(logits[p - 1 : p + gen.numel() - 1], -1).gather(-1, gen[:, None])[:, 0]
        torch.testing.assert_close(lp[m], want, atol=ATOL, rtol=0)
    assert (lp[1:] - lp[0]).abs().max() > 1e-5


def test_glm4v_chat_format_and_limits(tiny_glm4v):
    vlm = tiny_glm4v
    inputs = vlm.build_inputs("What is in the image?", image=_noise())
    assert inputs.prompt.startswith("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>")
    assert inputs.prompt.endswith("<|assistant|>\n")
    assert inputs.token_grid == (4, 4) and inputs.image_token_positions.numel() == 16
    ids = inputs.input_ids[0]
    begin = vlm.tokenizer.convert_tokens_to_ids("<|begin_of_image|>")
    assert int(ids[inputs.image_token_positions[0] - 1]) == begin
    assert set(vlm.eos_token_ids) >= {vlm.tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|endoftext|>")}
    with pytest.raises(VLMError, match="video input is not supported for glm4v"):
        vlm.build_inputs("q", video=[_noise(), _noise()])


def test_glm_thinking_format():
    text = (
        "<think>The cube is red. It sits left.</think><answer>It is <|begin_of_box|>red<|end_of_box|>.</answer><|user|>"
    )
    assert split_thinking(text) == ("The cube is red. It sits left.", "It is red.")
    assert split_thinking("<think>a</think> blue<|im_end|>") == ("a", "blue")
