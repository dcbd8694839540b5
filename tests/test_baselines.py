"""Attribution baselines (vstream.attr.methods) and the evaluation (vstream.attr.evaluate), on tiny
random Qwen2.5-VL / Qwen3-VL models with a stand-in estimator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vstream.attr import evaluate as E
from vstream.attr.ablation import ablation_effects
from vstream.attr.capture import region_features
from vstream.attr.labels import trace_with_attention
from vstream.attr.methods import METHODS, AttributionContext, attribute
from vstream.attr.methods.attnlrp import lrp_rules, span_relevance
from vstream.attr.methods.tam import activations, eci, rank_gaussian_filter, token_maps
from vstream.attr.methods.teacher_forced import forward_with_input_grad
from vstream.attr.regions import regions_for
from vstream.attr.spans import Span
from vstream.cli import evaluate as evaluate_cli
from vstream.model import load_vlm
from vstream.world.shapes import Scene, Step, make_scene

N_NEW = 10


class StandIn:
    """Any fixed linear map of the L*H features (what a trained estimator looks like)."""

    def __init__(self, lh: int):
        self.w = torch.linspace(-1.0, 2.0, lh)
        self.bias = torch.tensor(0.0)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(features).float() @ self.w


def _spans(t: int) -> list[Span]:
    cut = max(1, t // 2)
    return [Span(0, "thought", "first.", 0, cut), Span(1, "thought", "second.", cut, t)]


def _context(vlm, scene_seed: int = 3) -> AttributionContext:
    scene = make_scene(scene_seed)
    inputs = vlm.build_inputs(scene.question, image=scene.image())
    tokens, rows = trace_with_attention(vlm, inputs, max_new_tokens=N_NEW)
    assert len(tokens) == N_NEW and rows.shape[0] == N_NEW  # eos is silenced in the tiny models
    regions = regions_for(inputs)
    est = StandIn(vlm.num_layers * vlm.num_heads)
    return AttributionContext(
        vlm,
        inputs,
        torch.tensor(tokens),
        _spans(N_NEW),
        regions.assignment,
        token_attn=rows,
        estimator=est,
        regions=regions,
    )


@pytest.fixture(scope="module", params=["tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def ctx(request) -> AttributionContext:
    # an own copy: capture switches the text attention implementation
    vlm = load_vlm(str(request.getfixturevalue(request.param + "_dir")), device="cpu")
    return _context(vlm)


def test_every_method_returns_finite_spans_by_regions(ctx):
    assert set(METHODS) == {"vstream", "raw_attention", "input_x_gradient", "occlusion", "tam", "attnlrp"}
    for m in METHODS:
        out = attribute(m, ctx)
        assert out.shape == (ctx.n_spans, ctx.k), m
        assert np.isfinite(out).all(), m
        assert np.abs(out).sum() > 0, m
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute("lime", ctx)


def test_raw_attention_and_vstream_read_the_span_features(ctx):
    feats = torch.stack(
        [region_features(ctx.token_attn[s.token_start : s.token_end], ctx.assignment) for s in ctx.spans]
    )
    np.testing.assert_allclose(attribute("raw_attention", ctx), feats.sum(-1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(attribute("vstream", ctx), (feats @ ctx.estimator.w).numpy(), rtol=1e-5, atol=1e-6)


def test_occlusion_equals_one_region_ablation(ctx):
    occ = attribute("occlusion", ctx)
    for k in (0, ctx.k // 2, ctx.k - 1):
        mask = torch.zeros(1, ctx.k, dtype=torch.bool)
        mask[0, k] = True
        one = ablation_effects(ctx.vlm, ctx.inputs, ctx.generated_ids, ctx.spans, mask, ctx.assignment)
        np.testing.assert_allclose(occ[:, k], one[0].numpy(), atol=1e-4, rtol=1e-4)


def _span_logps(vlm, inputs, gen, spans, positions=None, alpha=1.0) -> np.ndarray:
    """Teacher-forced span log-prob sums with the LLM input embeddings at `positions` x alpha."""
    kw = inputs.teacher_forced(gen)

    def pre(module, args, kwargs):
        e = kwargs["inputs_embeds"].clone()
        if positions is not None:
            e[0, positions] = e[0, positions] * alpha
        kwargs["inputs_embeds"] = e
        return args, kwargs

    h = vlm.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = vlm.model(**kw, use_cache=False).logits[0].double()
    finally:
        h.remove()
    p, t = inputs.prompt_len, int(gen.numel())
    lp = torch.log_softmax(logits[p - 1 : p - 1 + t], -1).gather(1, gen[:, None])[:, 0]
    return np.array([float(lp[s.token_start : s.token_end].sum()) for s in spans])


def _full_precision_norms(vlm, monkeypatch) -> None:
    """RMSNorm computes in float32 whatever the model dtype; make it stay in float64 (test only)
    so that finite differences are not drowned in float32 rounding."""

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for cls in {type(m) for m in vlm.model.modules() if type(m).__name__.endswith("RMSNorm")}:
        monkeypatch.setattr(cls, "forward", forward)


def test_input_x_gradient_matches_finite_differences(tiny_qwen2_5_vl_dir, monkeypatch):
    # float64 copy: d/da logp(span | region embeddings x a) at a = 1 is exactly sum_i e_i . grad_i
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu", dtype=torch.float64)
    _full_precision_norms(vlm, monkeypatch)
    ctx = _context(vlm, scene_seed=5)
    scores = attribute("input_x_gradient", ctx)
    # the forward it differentiates is the ablation operator's unablated teacher-forced pass
    _, base = ablation_effects(
        vlm,
        ctx.inputs,
        ctx.generated_ids,
        ctx.spans,
        torch.zeros(1, ctx.k, dtype=torch.bool),
        ctx.assignment,
        return_base=True,
    )
    np.testing.assert_allclose(
        _span_logps(vlm, ctx.inputs, ctx.generated_ids, ctx.spans), base.numpy(), rtol=1e-5, atol=1e-4
    )
    eps = 1e-4
    pos_all = ctx.inputs.image_token_positions
    for k in range(ctx.k):
        pos = pos_all[ctx.assignment[k] > 0]
        up = _span_logps(vlm, ctx.inputs, ctx.generated_ids, ctx.spans, pos, 1 + eps)
        down = _span_logps(vlm, ctx.inputs, ctx.generated_ids, ctx.spans, pos, 1 - eps)
        np.testing.assert_allclose(scores[:, k], (up - down) / (2 * eps), rtol=1e-4, atol=1e-6)
    # all regions together: the per-region scores add up to the whole image's x . grad
    up = _span_logps(vlm, ctx.inputs, ctx.generated_ids, ctx.spans, pos_all, 1 + eps)
    down = _span_logps(vlm, ctx.inputs, ctx.generated_ids, ctx.spans, pos_all, 1 - eps)
    np.testing.assert_allclose(scores.sum(1), (up - down) / (2 * eps), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# TAM


def test_tam_reads_the_models_own_logits_of_each_predicted_token(ctx):
    # raw map of token y_t = relu(logit of class y_t) at the image tokens, from the model's own head
    a = activations(ctx)
    gen = torch.as_tensor(ctx.generated_ids)
    kw = ctx.inputs.teacher_forced(gen)
    with torch.no_grad():
        logits = ctx.vlm.model(**kw, use_cache=False).logits[0].double()  # (S, V)
    img = ctx.inputs.image_token_positions
    np.testing.assert_allclose(a.raw.numpy(), logits[img][:, gen].T.clamp_min(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.scores.numpy(), logits[a.context][:, gen].T.clamp_min(0).numpy(), rtol=1e-4, atol=1e-5)
    ids = torch.cat([ctx.inputs.input_ids[0], gen])
    np.testing.assert_allclose(
        a.context_maps.numpy(), logits[img][:, ids[a.context]].T.clamp_min(0).numpy(), rtol=1e-4, atol=1e-5
    )
    # context: text after the image, before the position that predicted the token
    p = ctx.inputs.prompt_len
    assert a.context.numel() > 0 and bool((a.context > img.max()).all())
    assert not bool(torch.isin(a.context, img).any())
    for t in range(len(gen)):
        assert a.visible[t].tolist() == (a.context < p + t - 1).tolist()
        assert a.same[t].tolist() == (ids[a.context] == gen[t]).tolist()
    in_trace = a.context >= p  # the trace's own earlier tokens join the context
    assert a.visible[-1, in_trace].any() and not a.visible[0, in_trace].any()


def test_tam_span_score_sums_its_tokens_maps_over_the_region(ctx):
    maps = token_maps(ctx)  # (T, N)
    assert maps.shape == (len(ctx.generated_ids), ctx.assignment.shape[1])
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    want = np.stack([(ctx.assignment.double() @ maps[s.token_start : s.token_end].sum(0)).numpy() for s in ctx.spans])
    np.testing.assert_allclose(attribute("tam", ctx), want, rtol=1e-12)


def test_eci_removes_what_earlier_context_explains():
    ctx_maps = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 1.0]])  # (Q=2, N=4)
    raw = torch.stack([3 * ctx_maps[0], 3 * ctx_maps[0] + torch.tensor([0.0, 0.0, 0.0, 5.0]), ctx_maps[1]])
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # token 2 has no context
    out = eci(raw, ctx_maps, w)
    np.testing.assert_allclose(out[0].numpy(), 0.0, atol=1e-6)  # wholly explained by the context
    np.testing.assert_allclose(out[1].numpy(), [0, 0, 0, 5.0], atol=1e-6)  # what the context lacks stays
    np.testing.assert_allclose(out[2].numpy(), raw[2].numpy())  # no context: unchanged
    # a mix of two context maps, weighted by how strongly each scores the token
    out = eci(ctx_maps.sum(0, keepdim=True) * 2, ctx_maps, torch.tensor([[4.0, 4.0]]))
    np.testing.assert_allclose(out.numpy(), 0.0, atol=1e-6)
    assert (eci(torch.rand(5, 4), ctx_maps, torch.rand(5, 2)) >= 0).all()


def _rank_gaussian_by_definition(img: np.ndarray) -> np.ndarray:
    """The rank Gaussian filter, one pixel at a time, as the TAM paper defines it."""
    padded = np.pad(img, 1, mode="reflect" if min(img.shape) > 1 else "edge")
    ax = np.arange(9) - 4
    out = np.zeros_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            win = np.sort(padded[i : i + 3, j : j + 3].ravel())
            mean = win.mean()
            if mean <= 0:
                continue
            sigma = win.std() / mean
            if sigma == 0:
                out[i, j] = mean
                continue
            k = np.exp(-(ax**2) / (2 * sigma**2))
            out[i, j] = (win * k / k.sum()).sum()
    return out


def test_rank_gaussian_filter_matches_its_per_pixel_definition():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 6))
    maps[1, :2] = 0.0  # empty windows
    maps[2] = 0.25  # a constant map stays constant
    maps[0, 2, 3] = 40.0  # a lone spike is damped (ranked to the end of every window it is in)
    got = rank_gaussian_filter(torch.from_numpy(maps)).numpy()
    want = np.stack([_rank_gaussian_by_definition(m) for m in maps])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[2], 0.25)
    assert got[0, 2, 3] < 4.0
    row = rng.random((1, 1, 7))  # one-row token grid
    np.testing.assert_allclose(
        rank_gaussian_filter(torch.from_numpy(row)).numpy()[0], _rank_gaussian_by_definition(row[0]), rtol=1e-10
    )


# ----------------------------------------------------------------------------------------------
# AttnLRP


def _relevance_at(vlm, ctx, rules: bool) -> dict[str, float]:
    """Relevance (activation . backward signal, summed) of the first span's log-prob sum at the
    decoder's sublayer boundaries and attention projections, with or without the LRP rules."""
    lm = vlm.language_model
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, out=None: acts.__setitem__(name, args[0] if out is None else out)

    hooks = [lm.norm.register_forward_pre_hook(keep("final"))]
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(keep(f"mid{i}")))
        hooks.append(layer.register_forward_hook(keep(f"out{i}")))
        att = layer.self_attn
        hooks.append(att.o_proj.register_forward_pre_hook(keep(f"o{i}")))
        for proj in ("q", "k", "v"):  # registered before the rules: sees the output before their scaling
            hooks.append(getattr(att, f"{proj}_proj").register_forward_hook(keep(f"{proj}{i}")))
    gen = torch.as_tensor(ctx.generated_ids)
    s = ctx.spans[0]
    try:
        with lrp_rules(vlm) if rules else vlm.lock, forward_with_input_grad(vlm, ctx.inputs, gen) as fp:
            names = list(acts)
            grads = torch.autograd.grad(fp.logp[s.token_start : s.token_end].sum(), [acts[n] for n in names])
            rel = {n: float((acts[n].detach() * g).sum()) for n, g in zip(names, grads)}
            z = fp.logits.detach().double()
            at_logits = z.gather(1, gen[:, None])[:, 0] - (torch.softmax(z, -1) * z).sum(-1)
            rel["explained"] = float(at_logits[s.token_start : s.token_end].sum())
    finally:
        for h in hooks:
            h.remove()
    return rel


@pytest.mark.parametrize("arch", ["tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_attnlrp_rules_conserve_relevance(arch, request):
    vlm = load_vlm(str(request.getfixturevalue(arch + "_dir")), device="cpu", dtype=torch.float64)
    ctx = _context(vlm, scene_seed=5)
    plain = _relevance_at(vlm, ctx, rules=False)
    r = _relevance_at(vlm, ctx, rules=True)
    close = lambda a, b: abs(a - b) <= 1e-6 * max(1.0, abs(b))  # noqa: E731
    assert abs(r["explained"]) > 0.1
    # vocabulary head + final norm: all of the explained log-prob reaches the residual stream
    assert close(r["final"], r["explained"]), r
    for i in range(vlm.num_layers):
        assert close(r[f"out{i}"], r[f"mid{i}"]), (i, r)  # the MLP sublayer conserves exactly
        assert close(r[f"v{i}"], r[f"o{i}"] / 2), (i, r)  # uniform rule: half of softmax(qk) v to v
        assert close(r[f"q{i}"], r[f"k{i}"]), (i, r)  # and q k^T splits the other half evenly
    # end to end, only the attention softmax and the biases keep some relevance back
    rel, explained = span_relevance(ctx)
    ratio = (rel.sum(1) / explained).numpy()
    assert ((ratio > 0.6) & (ratio < 1.05)).all(), ratio
    np.testing.assert_allclose(explained[0].item(), r["explained"], rtol=1e-9)
    # the plain gradient (input x gradient) conserves none of this
    assert not close(plain["final"], plain["explained"])
    assert not all(close(plain[f"out{i}"], plain[f"mid{i}"]) for i in range(vlm.num_layers))
    # the rules are gone after the calls: gradients are plain again
    assert _relevance_at(vlm, ctx, rules=False) == plain


def test_attnlrp_scores_are_image_token_relevance_per_region(ctx):
    rel, _ = span_relevance(ctx)
    img = ctx.inputs.image_token_positions
    want = (rel[:, img] @ ctx.assignment.double().T).numpy()
    np.testing.assert_allclose(attribute("attnlrp", ctx), want, rtol=1e-12)
    assert rel.shape == (ctx.n_spans, ctx.inputs.prompt_len + len(ctx.generated_ids))
    # from the span's last token's own position on, nothing can change its log-probs (causal)
    for i, s in enumerate(ctx.spans):
        assert float(rel[i, ctx.inputs.prompt_len + s.token_end - 1 :].abs().max()) == 0.0
        assert float(rel[i, : ctx.inputs.prompt_len + s.token_end - 1].abs().max()) > 0


def test_evaluate_reports_time_and_memory_of_tam_and_attnlrp(tiny_qwen2_5_vl_dir):
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    est = StandIn(vlm.num_layers * vlm.num_heads)
    res = E.evaluate(vlm, est, n=1, methods=("tam", "attnlrp"), max_new_tokens=12, progress=False)
    assert res["n_spans"] >= 1
    for m in ("tam", "attnlrp"):
        assert res["n_per_method"][m] == 1
        assert res["seconds_per_span"][m] > 0
        mb = res["peak_memory_mb_per_span"][m]
        assert isinstance(mb, float) and mb >= 0
        assert res["lds"][m] is None or -1 <= res["lds"][m] <= 1
    assert "peak_memory_mb_per_span" in res["definitions"]
    assert set(E.SLOW_METHODS) >= {"tam", "attnlrp"} and set(E.ALL_METHODS) >= {"tam", "attnlrp"}


def test_evaluate_scores_validation_scenes_when_asked(tiny_qwen2_5_vl_dir, monkeypatch):
    """split="val" draws validation seeds (for choosing settings); the train split is refused."""
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    asked = []
    real = E.scenes
    monkeypatch.setattr(E, "scenes", lambda split, start, n: asked.append((split, start, n)) or real(split, start, n))
    res = E.evaluate(vlm, None, n=1, start=0, methods=("raw_attention",), max_new_tokens=8, progress=False, split="val")
    assert asked == [("val", 0, 1)] and res["split"] == "val"
    with pytest.raises(ValueError, match="held-out or validation"):
        E.evaluate(vlm, None, n=1, methods=("raw_attention",), max_new_tokens=8, progress=False, split="train")


# ----------------------------------------------------------------------------------------------
# metrics


def test_lds_of_exact_predictions_is_one():
    rng = np.random.default_rng(0)
    k, s_n, m = 16, 5, 32
    truth = rng.normal(size=(s_n, k))  # additive region effects per span
    ablated = rng.random((m, k)) >= 0.5
    actual = E.subset_predictions(truth, ablated)  # (M, S)
    lds, r2, const = E.span_scores(E.subset_predictions(truth, ablated), actual)
    assert const == 0 and len(lds) == s_n
    np.testing.assert_allclose(lds, 1.0)
    np.testing.assert_allclose(r2, 1.0)
    # scale- and offset-free; reversed scores give -1 (LDS) but R^2 1
    lds2, r2b, _ = E.span_scores(E.subset_predictions(-3.0 * truth, ablated), actual)
    np.testing.assert_allclose(lds2, -1.0)
    np.testing.assert_allclose(r2b, 1.0)
    # constant measured effects are skipped and counted; constant predictions score 0
    actual2 = actual.copy()
    actual2[:, 0] = 0.7
    lds3, _, const3 = E.span_scores(E.subset_predictions(np.zeros((s_n, k)), ablated), actual2)
    assert const3 == 1 and len(lds3) == s_n - 1 and np.allclose(lds3, 0.0)
    # same numbers as the estimator's own LDS where nothing is constant
    from vstream.attr.estimator import lds as est_lds

    noisy = actual + rng.normal(scale=0.5, size=actual.shape)
    mine, _, _ = E.span_scores(E.subset_predictions(truth, ablated), noisy)
    assert np.isclose(np.mean(mine), est_lds(E.subset_predictions(truth, ablated).T, noisy.T))
    assert 0.3 < np.mean(mine) < 1.0


def test_top_masks_and_step_matching():
    s = np.array([[0.1, 5, 3, -1, 4, 2, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=float)
    top = E.top_masks(s)
    assert top.sum(1).tolist() == [5, 5]
    assert top[0].tolist() == [True, True, True, False, True, True, False]
    assert E.top_masks(s[:, :3]).all()  # fewer than 5 regions: all of them
    scene = Scene(
        1,
        "counting",
        "q?",
        [Step("I see a red circle.", 0), Step("I see a red circle.", 2), Step("So there are 2 red objects.", None)],
        "2",
        [],
    )
    spans = [
        Span(0, "thought", "i see a Red circle. ", 0, 3),
        Span(1, "thought", "I see a red circle.", 3, 6),
        Span(2, "thought", "Something else.", 6, 8),
        Span(3, "thought", "So there are 2 red objects.", 8, 9),
        Span(4, "answer", "I see a red circle.", 9, 10),
    ]
    assert E.match_steps(spans, scene) == [0, 1, None, 2, None]


@pytest.mark.slow
def test_evaluate_json_has_every_key(tiny_qwen2_5_vl_dir, tmp_path, monkeypatch, capsys):
    est_file = tmp_path / "stand-in.safetensors"
    est_file.write_bytes(b"")  # main only checks that it exists; loading is monkeypatched
    monkeypatch.setattr(evaluate_cli, "load_estimator", lambda path, vlm: StandIn(vlm.num_layers * vlm.num_heads))
    rc = evaluate_cli.main(
        [
            "--json",
            "--n",
            "3",
            "--model",
            str(tiny_qwen2_5_vl_dir),
            "--estimator",
            str(est_file),
            "--max-new-tokens",
            "12",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "lds",
        "r2",
        "top5_drop",
        "pointing",
        "seconds_per_span",
        "seconds_per_span_first_call",
        "peak_memory_mb_per_span",
    ):
        assert set(res[key]) == set(E.ALL_METHODS), key
    assert res["n"] == 3 and res["split"] == "heldout" and res["start"] == E.DEFAULT_START
    for key in (
        "n_spans",
        "n_spans_matched",
        "n_pointing_spans",
        "n_spans_constant",
        "top5_drop_random",
        "pointing_chance",
        "n_per_method",
        "ablation",
        "definitions",
        "r2_calibrated_vstream",
    ):
        assert key in res, key
    assert res["n_spans"] >= 1
    for m in E.ALL_METHODS:
        assert res["seconds_per_span"][m] > 0
        assert res["lds"][m] is None or -1 <= res["lds"][m] <= 1
