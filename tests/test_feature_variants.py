"""Feature variants (vstream.attr.features) against a direct eager computation, the default left
unchanged, variants carried through labels, estimators, evaluation and the live worker, and
refused where they do not match.

The oracle is ONE full eager forward over prompt + generated tokens with `output_attentions=True`
on a second copy of the model, plus the value vectors the layers' `v_proj` produce in that forward
and the `o_proj` weights; every variant is then written out from its definition (float64, loops
over heads for the output projection), independent of the library's arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.attr import capture as C
from vstream.attr import estimator as E
from vstream.attr import evaluate as EV
from vstream.attr import features as FV
from vstream.attr import labels as LB
from vstream.attr.estimator import LinearEstimator
from vstream.attr.methods import AttributionContext, attribute
from vstream.attr.spans import FixedSpans
from vstream.attr.worker import SpanEvent, attribute_stream
from vstream.model import VLMError, load_vlm
from vstream.world.shapes import VAL_SEEDS

N_NEW = 12
TOL = dict(atol=1e-4, rtol=1e-4)
CHECKED = [
    "mean",
    "vnorm",
    "vonorm",
    "tnorm",
    "max",
    "last",
    "rmean",
    "log",
    "vnorm+tnorm+max",
    "vonorm+last+rmean+log",
    "tnorm+max+log",
    "vonorm+raw",
    "vnorm+tnorm+max+raw",
]


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tiny_qwen2_5_vl_dir):
    live = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    oracle = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    oracle.model.set_attn_implementation("eager")
    return live, oracle


def _eager(oracle, inputs, seq: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(T, L, H, N) eager attention of each generated position over the image tokens, and the
    value weights {vnorm, vonorm: (L, H, N)} written out per head from v_proj's outputs."""
    p, t = inputs.prompt_len, seq.shape[1] - inputs.prompt_len
    kw = dict(inputs.model_kwargs)
    kw["input_ids"] = seq
    kw["attention_mask"] = torch.ones_like(seq)
    kw["mm_token_type_ids"] = torch.cat(
        [inputs.model_kwargs["mm_token_type_ids"], torch.zeros(1, t, dtype=torch.long)], dim=1
    )
    mods = C.text_attention_modules(oracle)
    values: dict[int, torch.Tensor] = {}
    hooks = [
        m.v_proj.register_forward_hook(lambda mod, args, out, li=li: values.__setitem__(li, out.detach()))
        for li, m in enumerate(mods)
    ]
    try:
        with oracle.lock, torch.no_grad():
            out = oracle.model(**kw, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    pos = inputs.image_token_positions
    att = torch.stack(out.attentions)[:, 0, :, p : p + t][..., pos].permute(2, 0, 1, 3).double()  # (T, L, H, N)
    _, n_layers, n_heads, n = att.shape
    vnorm = torch.zeros(n_layers, n_heads, n, dtype=torch.float64)
    vonorm = torch.zeros_like(vnorm)
    with torch.no_grad():
        _value_norms(mods, values, pos, n_heads, vnorm, vonorm)
    return att, {"vnorm": vnorm, "vonorm": vonorm}


def _value_norms(mods, values, pos, n_heads, vnorm, vonorm) -> None:
    for li, m in enumerate(mods):
        w_o = m.o_proj.weight.double()  # (hidden, H*D)
        d = w_o.shape[1] // n_heads
        v = values[li][0].double()  # (S, Hkv*D)
        hkv = v.shape[1] // d
        for h in range(n_heads):
            kv = h // (n_heads // hkv)  # repeat_kv: query head h reads kv head h // G
            for j, q in enumerate(pos.tolist()):
                vec = v[q, kv * d : (kv + 1) * d]
                vnorm[li, h, j] = vec.norm()
                vonorm[li, h, j] = (w_o[:, h * d : (h + 1) * d] @ vec).norm()


def _oracle_features(att: torch.Tensor, assign: torch.Tensor, name: str, weights: dict[str, torch.Tensor]):
    """(K, L*H) features of variant `name` from its definition (module doc of features.py);
    "raw": the weighted and the unweighted design side by side, (K, 2*L*H)."""
    v = FV.parse(name)
    if v.raw:
        unweighted = "+".join(t for t in v.tokens if t not in (v.values, "raw"))
        return torch.cat(
            [
                _oracle_features(att, assign, name.replace("+raw", ""), weights),
                _oracle_features(att, assign, unweighted, weights),
            ],
            -1,
        )
    r = att.double()
    if v.values:
        r = r * weights[v.values][None]
    if v.token_norm:
        r = r / r.sum(-1, keepdim=True)
    a = assign.double()
    per_token = torch.einsum("tlhn,kn->tklh", r, a)  # (T, K, L, H): each token's region mass
    pooled = {"mean": lambda x: x.mean(0), "max": lambda x: x.max(0).values, "last": lambda x: x[-1]}[v.pool](per_token)
    if v.region_mean:
        pooled = pooled / a.sum(1)[:, None, None]
    if v.log:
        pooled = torch.log(pooled + 1e-6)
    return pooled.reshape(a.shape[0], -1)


def _assignment(n: int, k: int = 5, seed: int = 0) -> torch.Tensor:
    """(K, N) one-hot with regions of different sizes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(k), torch.randint(0, 2, (n - k,), generator=g)])  # regions 0, 1 large
    return torch.nn.functional.one_hot(labels[torch.randperm(n, generator=g)], k).T.float()


# ----------------------------------------------------------------------------------------------
# names


def test_variant_names_parse_and_derive():
    assert FV.parse(None).is_default and FV.parse("").name == "mean" == FV.DEFAULT
    assert FV.parse("max+tnorm+vnorm").name == "vnorm+tnorm+max"
    assert FV.parse("mean+vnorm").name == "vnorm" and FV.parse("rmean+mean").name == "rmean"
    assert FV.parse("log+rmean+last").name == "last+rmean+log"
    for bad in ("max+last", "vnorm+vonorm", "sum", "mean+foo"):
        with pytest.raises(ValueError):
            FV.parse(bad)
    mean, log, vn = FV.parse("mean"), FV.parse("log"), FV.parse("vnorm")
    assert FV.can_derive(mean, log) and FV.can_derive(mean, FV.parse("rmean+log"))
    assert not FV.can_derive(mean, vn) and not FV.can_derive(log, mean) and not FV.can_derive(mean, FV.parse("max"))
    f = np.abs(np.random.default_rng(0).normal(size=(2, 3, 4))).astype(np.float32)
    a = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    np.testing.assert_allclose(FV.derive(f, a, mean, FV.parse("rmean")), f / np.array([2, 1, 1])[:, None], rtol=1e-6)
    np.testing.assert_allclose(FV.derive(f, a, mean, log), np.log(f + 1e-6), rtol=1e-6)
    with pytest.raises(ValueError):
        FV.derive(f, a, mean, vn)
    both = FV.parse("raw+vonorm")  # the value-weighted design and the same without, side by side
    assert both.name == "vonorm+raw" and both.blocks == 2 and both.linear
    assert [p.name for p in both.parts] == ["vonorm", "mean"]
    assert [p.name for p in FV.parse("vnorm+max+raw").parts] == ["vnorm+max", "max"]
    with pytest.raises(ValueError, match="beside a value weighting"):
        FV.parse("mean+raw")


# ----------------------------------------------------------------------------------------------
# the oracle


def test_every_variant_matches_the_eager_oracle(pair):
    live, oracle = pair
    inputs = live.build_inputs("What is in the image?", image=_noise(120, 100))
    gc = live.generation_kwargs(N_NEW, False, 1.0)["generation_config"]
    gc.min_new_tokens, gc.return_dict_in_generate = N_NEW, True
    rec = C.AttentionRecorder.for_vlm(live, keep_cpu=True, values=FV.VALUE_WEIGHTS)
    with live.lock, torch.no_grad(), C.capturing(live, inputs.image_token_positions, rec):
        out = live.model.generate(**inputs.model_kwargs, generation_config=gc)
    seq = out.sequences
    C.finalize(live, rec, inputs.image_token_positions, out.past_key_values, int(seq[0, -1]))
    att, weights = _eager(oracle, inputs, seq)
    got_rows = rec.stack(cpu=True)
    t, n = got_rows.shape[0], got_rows.shape[-1]
    assert t == N_NEW
    torch.testing.assert_close(got_rows.double(), att, **TOL)
    for kind in FV.VALUE_WEIGHTS:  # taken once, at prefill
        torch.testing.assert_close(rec.value_weights(kind, cpu=True).double(), weights[kind], **TOL)
        assert float(weights[kind].std()) > 0  # the weighting is not a constant
    assign = _assignment(n)
    for lo, hi in ((0, 4), (3, t)):  # the default: the live worker's running sum, as before variants
        a_np = assign.numpy()
        assert np.array_equal(
            C.span_features(rec, lo, hi, a_np, "mean"), C.features_from_sum(rec.row_sum(lo, hi), hi - lo, a_np)
        )
        assert np.array_equal(C.span_features(rec, lo, hi, a_np), C.span_features(rec, lo, hi, a_np, "mean"))
    for name in CHECKED:
        v = FV.parse(name)
        w_got = rec.value_weights(v.values, cpu=True) if v.values else None
        for lo, hi in ((0, 4), (3, t), (5, 6)):
            want = _oracle_features(att[lo:hi], assign, name, weights)
            via_torch = C.variant_features(got_rows[lo:hi], assign, v, w_got)
            via_numpy = C.variant_features(got_rows[lo:hi].numpy(), assign.numpy(), v, w_got)
            via_recorder = C.span_features(rec, lo, hi, assign.numpy(), v)  # the live worker's call
            assert isinstance(via_torch, torch.Tensor) and isinstance(via_numpy, np.ndarray)
            for got in (via_torch, via_numpy, via_recorder):
                torch.testing.assert_close(torch.as_tensor(got).double(), want, **TOL, msg=f"{name} [{lo}, {hi})")
        # every span of the trace at once (what `evaluate` times per span), overlapping spans included
        spans = ((0, 4), (3, t), (5, 6), (4, 4))
        for in_numpy in (True, False):  # numpy on CPU rows; torch where the rows are on an accelerator
            batched = C.pool_spans(got_rows, spans, assign, v, w_got, in_numpy=in_numpy)
            assert batched.shape == (len(spans), assign.shape[0], v.blocks * got_rows.shape[1] * got_rows.shape[2])
            for (lo, hi), got in zip(spans, batched, strict=True):
                want = (
                    _oracle_features(att[lo:hi], assign, name, weights) if hi > lo else torch.zeros_like(got).double()
                )
                torch.testing.assert_close(got.double(), want, **TOL, msg=f"{name} batched [{lo}, {hi})")
    # the variants differ from one another (a variant that silently computed the default would pass above only
    # if the oracle did too)
    base = _oracle_features(att, assign, "mean", weights)
    for name in CHECKED[1:]:
        if name != "rmean":
            got = _oracle_features(att, assign, name, weights)[:, : base.shape[1]]  # a raw variant's first block
            assert not torch.allclose(got, base, atol=1e-3), name


@pytest.mark.parametrize("name", ["mean", "vnorm", "vonorm", "rmean", "vonorm+rmean", "vonorm+raw", "vnorm+rmean+raw"])
def test_linear_scores_fold_into_the_pooling(name):
    """Scores of a linear design without materialising features = pool_spans, then the estimator."""
    g = np.random.default_rng(5)
    rows = g.random((9, 3, 2, 10), dtype=np.float32)
    a = np.zeros((4, 10), np.float32)
    a[g.integers(0, 3, 10), np.arange(10)] = 1  # region 3 stays empty
    vw = g.random((3, 2, 10), dtype=np.float32)
    lo, hi = np.array([0, 3, 5, 5, 8]), np.array([3, 5, 5, 8, 9])  # one empty span
    v = FV.parse(name)
    w, c = g.normal(size=6 * v.blocks).astype(np.float32), np.float32(0.3)
    want = FV.pool_spans(rows, lo, hi, a, v, vw if v.values else None) @ w + c
    got = FV.linear_span_scores(rows, lo, hi, a, v, w, c, vw if v.values else None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[2] == pytest.approx(np.full(4, c)) and want[0, 3] == pytest.approx(c)
    for bad in ("tnorm", "max", "last", "log"):
        assert not FV.parse(bad).linear
        with pytest.raises(ValueError, match="not linear"):
            FV.linear_span_scores(rows, lo, hi, a, FV.parse(bad), w, c)


def test_default_features_are_unchanged():
    """The default goes through the pre-variant functions: bit-identical results."""
    g = torch.Generator().manual_seed(2)
    rows = torch.rand(6, 3, 2, 10, generator=g)
    a = (torch.rand(4, 10, generator=g) > 0.5).float()
    assert torch.equal(C.variant_features(rows, a, "mean"), C.region_features(rows, a))
    total = C.features_from_sum(rows.numpy().sum(0), 6, a.numpy())
    assert np.array_equal(
        C.variant_features(rows.numpy(), a.numpy(), "mean"),
        C.features_from_sum(
            rows.numpy()[0] + rows.numpy()[1] + rows.numpy()[2] + rows.numpy()[3] + rows.numpy()[4] + rows.numpy()[5],
            6,
            a.numpy(),
        ),
    )
    np.testing.assert_allclose(total, C.region_features(rows, a).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="value weights"):
        C.variant_features(rows, a, "vnorm")
    with pytest.raises(ValueError, match="not made to record"):
        C.AttentionRecorder(3).value_weights("vnorm")  # a recorder made without values= cannot give them


# ----------------------------------------------------------------------------------------------
# labels and estimators


@pytest.fixture(scope="module")
def own_tiny(tiny_qwen2_5_vl_dir):
    return load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")


@pytest.fixture(scope="module")
def val_labels(own_tiny, tmp_path_factory):
    """Validation-split labels holding mean (primary), vnorm and max."""
    out = tmp_path_factory.mktemp("labels") / "val"
    kw = dict(masks_per_example=6, max_new_tokens=8, out=out, progress=False)
    LB.collect(own_tiny, 3, split="val", feature_variants=("mean", "vnorm", "max"), **kw)
    return out


def test_collect_val_split_stores_variants(own_tiny, val_labels, tmp_path):
    cfg, exs = LB.load_labels(val_labels)
    assert cfg["split"] == "val" and all(e.seed in VAL_SEEDS for e in exs) and len(exs) == 3
    assert cfg["feature_variant"] == "mean" and cfg["feature_variants"] == ["mean", "vnorm", "max"]
    assert all(e.feature_variant == "mean" for e in exs)
    # the default is unchanged: a default-only collection of the same scenes has the same features
    plain = LB.collect(own_tiny, 3, split="val", masks_per_example=6, max_new_tokens=8, progress=False)
    for a, b in zip(plain, exs):
        assert torch.equal(a.features, b.features) and torch.equal(a.effects, b.effects)
    # a stored variant, and ones derived from the default
    _, vn = LB.load_labels(val_labels, "vnorm")
    assert all(e.feature_variant == "vnorm" for e in vn)
    assert not torch.allclose(vn[0].features, exs[0].features)
    _, lg = LB.load_labels(val_labels, "rmean+log")
    for e, d in zip(exs, lg):
        size = e.assignment.float().sum(1)[:, None]
        torch.testing.assert_close(d.features, torch.log(e.features / size + 1e-6))
    _, vlog = LB.load_labels(val_labels, "vnorm+log")
    torch.testing.assert_close(vlog[0].features, torch.log(vn[0].features + 1e-6))
    for missing in ("tnorm", "vonorm", "max+vnorm"):
        with pytest.raises(VLMError, match="collect labels with --features"):
            LB.load_labels(val_labels, missing)
    # resuming the same folder with the same variants is fine, with others refused
    assert LB.collect(own_tiny, 3, split="val", feature_variants=("mean", "vnorm", "max"), **_kw(val_labels)) == []
    with pytest.raises(VLMError, match="different setup"):
        LB.collect(own_tiny, 3, split="val", feature_variants=("mean",), **_kw(val_labels))


def _kw(out):
    return dict(masks_per_example=6, max_new_tokens=8, out=out, progress=False)


def test_labels_written_before_variants_read_as_the_default(own_tiny, val_labels, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(val_labels, old)
    for side in old.glob("labels-*.json"):
        meta = json.loads(side.read_text())
        for key in ("feature_variant", "feature_variants"):
            meta["config"].pop(key)
        side.write_text(json.dumps(meta))
    cfg, exs = LB.load_labels(old)
    assert cfg["feature_variant"] == "mean" and exs[0].feature_variant == "mean"
    assert LB.collect(own_tiny, 3, split="val", **_kw(old)) == []  # resumes: nothing new, nothing refused


def test_estimator_records_its_variant_and_refuses_others(val_labels, tmp_path):
    est, _ = E.train(val_labels, epochs=2, val_fraction=0, progress=False, feature_variant="vnorm")
    assert est.feature_variant == "vnorm" and est.meta["feature_variant"] == "vnorm"
    back = E.load(est.save(tmp_path / "v.safetensors"))
    assert back.feature_variant == "vnorm" and FV.variant_of(back).values == "vnorm"
    _, mean_ex = LB.load_labels(val_labels)
    _, vn_ex = LB.load_labels(val_labels, "vnorm")
    assert np.isfinite(E.evaluate(back, vn_ex)["lds"])
    with pytest.raises(VLMError, match="feature variant 'vnorm'"):
        E.evaluate(back, mean_ex)  # applied to the default features: refused
    with pytest.raises(VLMError, match="collect labels with --features"):
        E.train(val_labels, epochs=1, val_fraction=0, progress=False, feature_variant="tnorm")
    with pytest.raises(VLMError, match="cannot be derived|collect labels"):
        E.train(mean_ex, epochs=1, val_fraction=0, progress=False, feature_variant="vnorm")
    with pytest.raises(VLMError, match="different feature variants"):
        E.train(mean_ex[:2] + vn_ex[2:], epochs=1, val_fraction=0, progress=False)
    # derived from stored examples: the same as reading the derived variant
    est_log, _ = E.train(mean_ex, epochs=1, val_fraction=0, progress=False, feature_variant="log")
    assert est_log.feature_variant == "log"
    # an estimator file written before variants existed reads the default
    plain = LinearEstimator(2, 4)
    assert plain.feature_variant == "mean" and FV.variant_of(E.RawAttention()).is_default


def test_raw_variant_reads_its_parts_side_by_side(val_labels, tmp_path):
    """vnorm+raw from labels holding vnorm and mean: both blocks, read or derived, in column order;
    its estimator has two weights per (layer, head) and keeps them through its file."""
    _, mean_ex = LB.load_labels(val_labels)
    _, vn_ex = LB.load_labels(val_labels, "vnorm")
    cfg, both = LB.load_labels(val_labels, "vnorm+raw")
    assert cfg["feature_variant"] == "vnorm+raw" and all(e.feature_variant == "vnorm+raw" for e in both)
    for b, v, m in zip(both, vn_ex, mean_ex, strict=True):
        assert torch.equal(b.features, torch.cat([v.features, m.features], -1))
    _, log_both = LB.load_labels(val_labels, "vnorm+log+raw")  # each block derived (log) from a stored one
    assert torch.allclose(log_both[0].features, torch.log(both[0].features + FV.LOG_EPS))
    assert [e.features.shape for e in LB.derive_examples(vn_ex + [], "vnorm")] == [e.features.shape for e in vn_ex]
    with pytest.raises(VLMError, match="collect labels with --features mean"):
        LB.derive_examples(vn_ex, "vnorm+raw")  # no unweighted block in these examples
    with pytest.raises(VLMError, match="collect labels with --features vonorm"):
        LB.load_labels(val_labels, "vonorm+raw")
    est, _ = E.train(
        val_labels, epochs=2, val_fraction=0, progress=False, feature_variant="vnorm+raw", columns="layers=1"
    )
    lh = est.num_layers * est.num_heads
    assert est.num_features == 2 * lh and est.feature_variant == "vnorm+raw"
    w = est.weight.detach()
    kept = [g * lh + est.num_heads + h for g in (0, 1) for h in range(est.num_heads)]  # layer 1 in both blocks
    assert torch.count_nonzero(w).item() <= len(kept) and all(w[i] == 0 for i in range(2 * lh) if i not in kept)
    back = E.load(est.save(tmp_path / "raw.safetensors"))
    assert back.feature_variant == "vnorm+raw" and torch.equal(back.weight, est.weight)
    assert np.isfinite(E.evaluate(back, both)["lds"])
    with pytest.raises(VLMError, match=r"expects 2 x L\*H"):
        back.predict(vn_ex[0].features)


# ----------------------------------------------------------------------------------------------
# evaluation and the live worker compute the estimator's variant


def _linear(vlm, variant: str, seed: int = 0) -> LinearEstimator:
    est = LinearEstimator(vlm.num_layers, vlm.num_heads, {"feature_variant": variant})
    with torch.no_grad():
        est.weight.copy_(torch.randn(est.num_features, generator=torch.Generator().manual_seed(seed)))
        est.region_bias.fill_(0.1)
    return est


@pytest.mark.parametrize("variant", ["vonorm+tnorm+max", "vonorm+rmean", "vonorm+raw"])  # predict; folded; folded
def test_evaluate_scores_the_estimators_variant(own_tiny, monkeypatch, variant):
    seen = []
    real = EV.attribute_timed

    def spy(method, ctx):
        out = real(method, ctx)
        seen.append((method, ctx, out[0]))
        return out

    monkeypatch.setattr(EV, "attribute_timed", spy)
    est = _linear(own_tiny, variant)
    res = EV.evaluate(own_tiny, est, n=1, methods=("vstream", "raw_attention"), max_new_tokens=8, progress=False)
    assert res["feature_variant"] == variant
    first = {m: (c, out) for m, c, out in reversed(seen)}  # each method runs twice (the second call is timed)
    assert [m for m, _, _ in seen] == ["vstream", "vstream", "raw_attention", "raw_attention"]
    (ctx, scores), (_, raw) = first["vstream"], first["raw_attention"]
    assert set(ctx.value_weights) == {"vonorm"}
    want = np.stack(
        [
            est.predict(
                torch.as_tensor(
                    C.variant_features(
                        ctx.token_attn[s.token_start : s.token_end],
                        ctx.assignment,
                        est.feature_variant,
                        ctx.value_weights["vonorm"],
                    )
                )
            )
            .detach()
            .numpy()
            for s in ctx.spans
        ]
    )
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw, ctx.span_features().sum(-1).numpy(), rtol=1e-6)  # raw attention: default features
    given = AttributionContext(
        ctx.vlm, ctx.inputs, ctx.generated_ids, ctx.spans, ctx.assignment, features=ctx.span_features(), estimator=est
    )
    with pytest.raises(ValueError, match="variant 'mean' given"):
        attribute("vstream", given)


@pytest.mark.parametrize("variant", ["vnorm+tnorm+max", "vonorm+last+log", "mean", "vonorm+raw"])
def test_live_worker_scores_the_estimators_variant(own_tiny, variant):

    est = _linear(own_tiny, variant)
    runs = {}
    for process in (None, False):
        s = attribute_stream(
            own_tiny,
            _noise(120, 100),
            "What is in the image?",
            est,
            max_new_tokens=13,
            splitter=FixedSpans(4),
            process=process,
        )
        events = [e for e in s if isinstance(e, SpanEvent)]
        runs[s.worker_mode] = (s, events)
    assert set(runs) == {"process", "thread"}
    v = FV.parse(variant)
    for mode, (s, events) in runs.items():
        assert len(events) == 4, mode  # [0, 4), [4, 8), [8, 12), [12, 13): the last on row 11
        rec, a = s.recorder, s.regions.assignment
        for ev in events:
            lo, hi = ev.rows
            w = rec.value_weights(v.values) if v.values else None
            feats = C.variant_features(rec.stack(lo, hi), a, v, w)
            want = est.predict(torch.as_tensor(feats)).detach().numpy()
            np.testing.assert_allclose(ev.scores, want, rtol=1e-4, atol=1e-5, err_msg=f"{mode} span {ev.span.index}")
            if not v.is_default and not v.raw:  # the default features would give other scores
                other = est.predict(C.region_features(rec.stack(lo, hi), a)).detach().numpy()
                assert not np.allclose(ev.scores, other, atol=1e-4)


def test_watching_video_refuses_an_estimator_of_another_variant():
    """tays' step features are the default ones: another variant's estimator would read them wrongly."""
    from tays.watch import StreamAttributor

    with pytest.raises(VLMError, match="feature variant 'vnorm'"):
        StreamAttributor(LinearEstimator(2, 4, {"feature_variant": "vnorm"}))
    assert StreamAttributor(LinearEstimator(2, 4)).predict is not None
