"""Live attribution worker (vstream.attr.worker): events, timing, cancellation, bad input.

Runs on own copies of the tiny random models (capture switches their attention implementation)
with a stand-in estimator (a random L*H weight vector, the LinearEstimator interface), and on
the demo model when it is present (with the shipped estimator if that exists too).
A random model rarely writes sentence ends, so the mechanics tests use a fixed-length splitter
(a span every 4 tokens); the demo-model test uses the real sentence splitter.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.attr.capture import region_features
from vstream.attr.estimator import LinearEstimator
from vstream.attr.spans import FixedSpans, Span
from vstream.attr.worker import (
    DoneEvent,
    PathEvent,
    RegionsEvent,
    SpanEvent,
    TokenEvent,
    attribute_stream,
)
from vstream.model import VLMError, load_vlm
from vstream.world.assets import ASSETS, DEMO_MODEL_DIR


class StandIn:
    """LinearEstimator-compatible: predict((K, L*H)) -> (K,)."""

    def __init__(self, dim: int, seed: int = 0):
        self.w = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
        self.meta = {"kind": "stand-in"}

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.w


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _live_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vstream-")]


def _no_threads_left(timeout: float = 0.0) -> bool:
    deadline = time.time() + timeout
    while _live_threads() and time.time() < deadline:
        time.sleep(0.02)
    return not _live_threads()


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_5_vl_dir):
    return load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny3(tiny_qwen3_vl_dir):
    return load_vlm(str(tiny_qwen3_vl_dir), device="cpu")


def _est(vlm, seed: int = 0) -> StandIn:
    return StandIn(vlm.num_layers * vlm.num_heads, seed)


def _split(events):
    kinds = {RegionsEvent: [], TokenEvent: [], SpanEvent: [], PathEvent: [], DoneEvent: []}
    for ev in events:
        kinds[type(ev)].append(ev)
    return kinds


def _linear(vlm, seed: int = 0) -> LinearEstimator:
    """A real LinearEstimator (the worker scores it with numpy) with random weights and bias."""
    est = LinearEstimator(vlm.num_layers, vlm.num_heads)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        est.weight.copy_(torch.randn(est.num_features, generator=g))
        est.region_bias.fill_(0.25)
    return est


@contextlib.contextmanager
def _paced(vlm):
    """10 ms per forward: small models can decode a whole short trace before the (lower-priority)
    attribution process scores its first span, which would make the "live" checks untestable."""
    slow = vlm.model.register_forward_hook(lambda *_: time.sleep(0.01))
    try:
        yield
    finally:
        slow.remove()


@pytest.mark.parametrize("which,kind", [("tiny", "stand-in"), ("tiny3", "stand-in"), ("tiny", "linear")])
def test_events_order_types_and_values(which, kind, request):
    vlm = request.getfixturevalue(which)
    est = _est(vlm) if kind == "stand-in" else _linear(vlm)
    image = _noise(120, 100)
    session = attribute_stream(vlm, image, "What is in the image?", est, max_new_tokens=24, splitter=FixedSpans(4))
    with _paced(vlm):
        events = list(session)
    assert _no_threads_left()
    assert isinstance(events[0], RegionsEvent) and isinstance(events[-1], DoneEvent)
    assert sum(isinstance(e, (RegionsEvent, DoneEvent)) for e in events) == 2
    ev = _split(events)
    reg, done = ev[RegionsEvent][0], ev[DoneEvent][0]
    k = reg.regions.k
    assert reg.image_size == (120, 100)
    assert done.error is None and not done.cancelled
    assert done.n_tokens == 24 == len(ev[TokenEvent])  # eos is silenced in the tiny models
    assert [t.index for t in ev[TokenEvent]] == list(range(24))
    assert done.text == "".join(t.text for t in ev[TokenEvent])
    assert done.token_ids == [t.token_id for t in ev[TokenEvent]]
    spans = ev[SpanEvent]
    assert done.n_spans == len(spans) == 6 and len(ev[PathEvent]) == 6
    assert [(s.span.token_start, s.span.token_end) for s in spans] == [(i, i + 4) for i in range(0, 24, 4)]

    # every span: scores (K,), heatmap in the original image size, rows = the span's tokens
    rec = session.recorder
    assert rec.tokens == 23  # cut by max_new_tokens: the last token was never fed back
    for s in spans:
        assert s.scores.shape == (k,) and s.scores.dtype == np.float32
        assert "heatmap" not in vars(s)  # painted when first read, then kept
        assert s.heatmap.shape == (100, 120) and s.heatmap.dtype == np.float32 and s.heatmap is s.heatmap
        assert s.top_regions[0] == int(np.argmax(s.scores)) and len(s.top_regions) == min(5, k)
        assert s.latency_ms == pytest.approx((s.emitted_time - s.span_end_time) * 1000)
        assert 0 <= s.compute_ms <= s.latency_ms
        lo, hi = s.span.token_start, min(s.span.token_end, rec.tokens)
        want = est.predict(region_features(rec.stack(lo, hi), reg.regions.assignment)).detach().numpy()
        np.testing.assert_allclose(s.scores, want, rtol=1e-5, atol=1e-6)
        assert s.rows == (lo, hi) and s.n_rows == hi - lo
        np.testing.assert_array_equal(session.compute_span(lo, hi)[0], s.scores)  # replayable
        assert set(np.unique(s.heatmap)) <= set(s.scores.tolist())
        np.testing.assert_array_equal(s.heatmap, reg.regions.scores_to_heatmap(s.scores, (120, 100)))
    assert [s.n_rows for s in spans] == [4, 4, 4, 4, 4, 3]
    assert spans[-1].note and not any(s.note for s in spans[:-1])

    # path events grow one point per span
    for i, p in enumerate(ev[PathEvent]):
        assert p.point.span_index == i and p.point.path.shape == (i + 1, 3)
        assert p.point.path_length >= 0 and 0 <= p.point.concentration <= 1
    assert done.label in {"Fixation", "Wandering", "stable"}

    # live: the first span's scores arrive while generation is still running
    first = spans[0]
    assert first.emitted_time < done.gen_end_time
    assert first.emitted_time < ev[TokenEvent][-1].time
    assert done.tokens_per_s > 0


def test_stop_event_stops_both_threads(tiny):
    stop = threading.Event()
    session = attribute_stream(
        tiny,
        _noise(120, 100),
        "What is in the image?",
        _est(tiny),
        max_new_tokens=400,
        stop_event=stop,
        splitter=FixedSpans(4),
    )
    events = []
    for e in session:
        events.append(e)
        if isinstance(e, TokenEvent) and e.index == 9:
            stop.set()
    assert _no_threads_left()
    ev = _split(events)
    done = ev[DoneEvent][0]
    assert done.cancelled and done.error is None
    assert 10 <= done.n_tokens < 100  # stops within a few steps (the consumer may lag a little)
    # the closed spans and the open one are still scored
    assert len(ev[SpanEvent]) == done.n_spans >= 2
    assert ev[SpanEvent][-1].span.token_end == done.n_tokens


def test_cancel_method(tiny):
    session = attribute_stream(
        tiny, _noise(120, 100), "What is in the image?", _est(tiny), max_new_tokens=400, splitter=FixedSpans(4)
    )
    n = 0
    for e in session:
        if isinstance(e, TokenEvent):
            n += 1
            if n == 6:
                session.cancel()
        if isinstance(e, DoneEvent):
            assert e.cancelled and 6 <= e.n_tokens < 100
    assert _no_threads_left()


def test_closing_the_iterator_early_leaves_nothing_running(tiny):
    session = attribute_stream(
        tiny, _noise(120, 100), "What is in the image?", _est(tiny), max_new_tokens=400, splitter=FixedSpans(2)
    )
    it = iter(session)
    for e in it:
        if isinstance(e, SpanEvent):
            break
    assert session.running
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 5
    assert not session.running and _no_threads_left()
    assert list(session) == []  # closed: no more events
    # the model is free again: the lock is released and a new session runs to the end
    assert tiny.lock.acquire(blocking=False)
    tiny.lock.release()
    events = list(attribute_stream(tiny, _noise(120, 100), "What?", _est(tiny), max_new_tokens=5))
    assert isinstance(events[-1], DoneEvent) and events[-1].error is None and events[-1].n_tokens == 5


def test_with_block_and_dropped_session(tiny):
    with attribute_stream(tiny, _noise(120, 100), "What?", _est(tiny), max_new_tokens=400) as s:
        next(s), next(s)
    assert _no_threads_left()
    s = attribute_stream(tiny, _noise(120, 100), "What?", _est(tiny), max_new_tokens=400)
    next(s), next(s)
    del s
    gc.collect()
    assert _no_threads_left(timeout=10)  # dropped without close: the threads run out by themselves


def test_two_sessions_on_one_model_do_not_mix(tiny):
    """The second waits for the model lock: each recorder holds only its own rows."""
    a = attribute_stream(tiny, _noise(120, 100, 1), "What?", _est(tiny), max_new_tokens=15, splitter=FixedSpans(5))
    b = attribute_stream(tiny, _noise(120, 100, 2), "Why?", _est(tiny), max_new_tokens=9, splitter=FixedSpans(3))
    next(a), next(b)  # both started
    ea, eb = list(a), list(b)
    for s, events, n in ((a, ea, 15), (b, eb, 9)):
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.error is None and done.n_tokens == n
        assert s.recorder.tokens == n - 1
    assert _no_threads_left()


class ThreadCounting(FixedSpans):
    """FixedSpans that notes which thread feeds it and torch's thread count there."""

    def __init__(self, n: int):
        super().__init__(n)
        self.seen: set[int] = set()
        self.names: set[str] = set()

    def push(self, i: int, piece: str) -> list[Span]:
        self.seen.add(torch.get_num_threads())
        self.names.add(threading.current_thread().name)
        return super().push(i, piece)


class ThreadCountingEstimator(StandIn):
    def __init__(self, dim: int):
        super().__init__(dim)
        self.seen: set[int] = set()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        if threading.current_thread().name == "vstream-attr-worker":
            self.seen.add(torch.get_num_threads())
        return super().predict(features)


def test_worker_runs_one_torch_thread_and_generation_keeps_the_default(tiny):
    default = torch.get_num_threads()
    if default < 2:
        torch.set_num_threads(2)
    try:
        want = torch.get_num_threads()
        split = ThreadCounting(3)
        est = ThreadCountingEstimator(tiny.num_layers * tiny.num_heads)
        gen: set[tuple[str, int]] = set()  # (thread, torch threads) of every forward
        hook = tiny.model.register_forward_hook(
            lambda *_: gen.add((threading.current_thread().name, torch.get_num_threads()))
        )
        try:
            done = list(attribute_stream(tiny, _noise(120, 100), "What?", est, max_new_tokens=10, splitter=split))[-1]
        finally:
            hook.remove()
        assert done.error is None and done.n_spans >= 2
        assert est.seen == {1}  # the worker's own ops
        assert gen == {("vstream-attr-generate", want)}  # generation keeps all threads
        # text pieces and span splitting run beside generation, not between its decode steps
        assert split.names == {"vstream-attr-tokens"} and split.seen == {want}
        later = []  # threads started afterwards still get the process default
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start(), t.join()
        assert later == [want] and torch.get_num_threads() == want
    finally:
        torch.set_num_threads(default)


def test_no_sentence_end_still_yields_one_span(tiny_qwen2_5_vl_dir):
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    tok = vlm.tokenizer
    banned = [i for i in range(len(tok)) if any(c in tok.decode([i]) for c in ".!?") or "think>" in tok.decode([i])]
    vlm.model.generation_config.suppress_tokens = banned
    events = list(attribute_stream(vlm, _noise(120, 100), "What is in the image?", _est(vlm), max_new_tokens=12))
    ev = _split(events)
    done = ev[DoneEvent][0]
    assert done.error is None and done.n_tokens == 12
    assert not any(c in done.text for c in ".!?")
    assert len(ev[SpanEvent]) == 1 == done.n_spans
    s = ev[SpanEvent][0]
    assert s.span.closed_by == "end" and s.span.token_end == 12
    assert s.n_rows == 12 - s.span.token_start - 1 and s.note  # the last token has no row
    assert len(ev[PathEvent]) == 1 and ev[PathEvent][0].point.tortuosity is None


def test_one_token_generation(tiny):
    events = list(attribute_stream(tiny, _noise(120, 100), "What?", _est(tiny), max_new_tokens=1))
    ev = _split(events)
    assert ev[DoneEvent][0].n_tokens == 1
    if ev[SpanEvent]:  # a whitespace-only token makes no span
        s = ev[SpanEvent][0]
        assert s.n_rows == 0 and "no attention row" in s.note and not s.scores.any()


def test_blank_image(tiny):
    img = Image.new("RGB", (150, 90), (255, 255, 255))
    events = list(
        attribute_stream(tiny, img, "What is in the image?", _est(tiny), max_new_tokens=8, splitter=FixedSpans(4))
    )
    ev = _split(events)
    assert ev[DoneEvent][0].error is None
    k = ev[RegionsEvent][0].regions.k
    assert k >= 1
    for s in ev[SpanEvent]:
        assert s.heatmap.shape == (90, 150) and s.scores.shape == (k,) and np.isfinite(s.scores).all()


def test_fewer_patches_than_k(tiny):
    # the tiny processor makes 4x4 = 16 image tokens: K=64 is reduced (and said so)
    events = list(
        attribute_stream(tiny, _noise(120, 100), "What?", _est(tiny), k=64, max_new_tokens=8, splitter=FixedSpans(4))
    )
    ev = _split(events)
    reg = ev[RegionsEvent][0]
    assert reg.regions.k <= 16 and reg.notes and any("reduced" in n for n in reg.notes)
    assert all(s.scores.shape == (reg.regions.k,) for s in ev[SpanEvent])
    # a 10x10 image (upscaled for the processor); heatmap still in the original size
    events = list(
        attribute_stream(tiny, _noise(10, 10), "What?", _est(tiny), k=16, max_new_tokens=4, splitter=FixedSpans(4))
    )
    ev = _split(events)
    assert ev[DoneEvent][0].error is None
    assert ev[SpanEvent][0].heatmap.shape == (10, 10)


def test_bad_input_fails_clearly_before_any_thread(tiny):
    with pytest.raises(VLMError, match="needs an image"):
        attribute_stream(tiny, None, "What?", _est(tiny))
    with pytest.raises(VLMError, match="predict"):
        attribute_stream(tiny, _noise(64, 64), "What?", object())
    with pytest.raises(VLMError, match="does not fit"):
        attribute_stream(tiny, _noise(64, 64), "What?", StandIn(5))
    with pytest.raises(VLMError, match="max_new_tokens"):
        attribute_stream(tiny, _noise(64, 64), "What?", _est(tiny), max_new_tokens=0)
    with pytest.raises(VLMError):
        attribute_stream(tiny, "/no/such/image.png", "What?", _est(tiny))
    assert _no_threads_left()


def test_estimator_error_is_reported_and_stops(tiny):
    class Flaky(StandIn):
        calls = 0

        def predict(self, f):
            Flaky.calls += 1
            if Flaky.calls > 2:  # the setup probe, then one span
                raise RuntimeError("boom")
            return super().predict(f)

    events = list(
        attribute_stream(tiny, _noise(120, 100), "What?", Flaky(8), max_new_tokens=400, splitter=FixedSpans(3))
    )
    done = events[-1]
    assert isinstance(done, DoneEvent) and "boom" in done.error and done.n_tokens < 400
    assert _no_threads_left()


# ----------------------------------------------------------------------------------------------
# the demo model (real sentences)


def _demo():
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not trained yet (assets/demo-model/model.safetensors missing)")
    return load_vlm(str(DEMO_MODEL_DIR), device="cpu")


def test_demo_model_live_sentences():
    from vstream.world.shapes import scenes

    vlm = _demo()
    est_file = ASSETS / "estimator-demo.safetensors"
    if est_file.is_file():
        from vstream.attr.estimator import load

        est = load(str(est_file), vlm)
    else:
        est = _est(vlm)
    scene = scenes("heldout", 300_000, 1)[0]
    with _paced(vlm):
        events = list(attribute_stream(vlm, scene.image(), scene.question, est, max_new_tokens=128))
    ev = _split(events)
    done = ev[DoneEvent][0]
    assert done.error is None and not done.cancelled
    spans = ev[SpanEvent]
    assert len(spans) >= 2 and done.n_spans == len(spans)
    assert spans[0].span.kind == "thought" and spans[0].span.closed_by in ".!?"
    assert spans[0].emitted_time < ev[TokenEvent][-1].time < done.gen_end_time
    assert all(s.heatmap.shape == scene.image().size[::-1] for s in spans)
    assert done.n_tokens < 128, "the demo model should end its trace with eos"
    assert all(s.n_rows == s.span.n_tokens for s in spans)  # ended at eos: every token has its row
    assert done.answer and "</think>" in done.text
    assert _no_threads_left()


def test_risk_readout_follows_the_dynamics(tiny):
    """With a risk model, each PathEvent carries P(failure) computed from the path so far: the
    same number the offline features give on the spans' scores."""
    from vstream.attr.dynamics import DynamicsTracker
    from vstream.attr.risk import FEATURES, RiskModel, point_features

    n = len(FEATURES)
    risk = RiskModel(np.zeros(n), np.ones(n), np.linspace(-1, 1, n), 0.2)
    est = _linear(tiny)
    events = list(
        attribute_stream(tiny, _noise(96, 96), "Why?", est, max_new_tokens=16, splitter=FixedSpans(4), risk=risk)
    )
    ev = _split(events)
    tracker, points = DynamicsTracker(), []
    for s, p in zip(ev[SpanEvent], ev[PathEvent]):
        points.append(tracker.add(s.scores))
        want = float(risk.probability(point_features(points, np.stack(tracker.raw))))
        assert p.risk == pytest.approx(want) and 0 < p.risk < 1
    assert ev[DoneEvent][0].risk == ev[PathEvent][-1].risk
    plain = _split(list(attribute_stream(tiny, _noise(96, 96), "Why?", est, max_new_tokens=8, splitter=FixedSpans(4))))
    assert all(p.risk is None for p in plain[PathEvent]) and plain[DoneEvent][0].risk is None
