"""Attribution while watching: scores arrive while the stream plays, events are consistent, a
stop mid-step leaves no thread, and the evaluation pipeline produces its figures."""

from __future__ import annotations

import threading
import time

import numpy as np

from tays import PushSource
from tays.engine import THREAD_PREFIX
from tays.watch import GroupSeen, StepScores, WatchDone, first_score_lead, watch
from vstream.world.shapes_video import make_stream


def _engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def _stream():
    return make_stream(11, duration=8.0)


class Webcam:
    """Pushes a shapes-world stream's frames into a PushSource in real time, looping, until
    `end()` (the way the app's webcam feeds the engine)."""

    def __init__(self, source: PushSource, fps: float = 2.0, limit_s: float = 300.0):
        self.source, self.fps, self.limit_s = source, fps, limit_s
        self.frames = [f for _, f in _stream().frames(fps)]
        self.pushed = 0
        self.ended_at: float | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set() and time.perf_counter() - t0 < self.limit_s:
            self.source.push(self.frames[self.pushed % len(self.frames)], self.pushed / self.fps)
            self.pushed += 1
            self._stop.wait(1.0 / self.fps)
        self.end()

    def end(self) -> None:
        self._stop.set()
        if self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.source.end()


def test_first_scores_arrive_while_the_stream_plays(tiny_qwen2_5_vl):
    src = PushSource(fps=2.0)
    cam = Webcam(src)
    events, stamps = [], []
    with watch(tiny_qwen2_5_vl, src, question="What happens?", max_new_tokens=64, step_tokens=4) as run:
        cam.thread.start()
        for ev in run:
            events.append(ev)
            stamps.append((time.perf_counter(), cam.pushed, cam.ended_at))
            if isinstance(ev, StepScores) and ev.groups and cam.ended_at is None:
                scored_while_playing = stamps[-1]
                cam.end()  # the stream ends only after the first scores came
    cam.thread.join()
    done = events[-1]
    assert isinstance(done, WatchDone) and done.error is None
    t_first, pushed, ended = scored_while_playing
    assert ended is None and pushed >= 2 and t_first < cam.ended_at
    steps = [e for e in events if isinstance(e, StepScores)]
    first = next(s for s in steps if s.groups)
    assert first.ready < done.result.stream_end and first_score_lead(done) > 0  # on the run's own clock
    assert [s.step for s in steps] == sorted(s.step for s in steps)
    seen = {e.index for e in events if isinstance(e, GroupSeen)}
    committed = {g.index for g in done.result.groups}
    for s in steps:
        assert set(s.groups) <= seen <= committed  # regions were sent before the step that uses them
        assert s.end <= s.ready
        if s.groups:
            assert len(s.group_scores) == len(s.groups) == len(s.region_scores)
            np.testing.assert_allclose(s.group_scores, [r.sum() for r in s.region_scores], rtol=1e-5)
            assert s.top_group in s.groups and 0 <= s.top_region < len(s.region_scores[0])
    assert not _engine_threads()


def test_stop_mid_step_leaves_timeline_consistent_and_no_thread(tiny_qwen2_5_vl):
    stop = threading.Event()
    src = PushSource(fps=2.0)
    cam = Webcam(src)
    events = []
    with watch(
        tiny_qwen2_5_vl, src, question="What happens?", max_new_tokens=400, step_tokens=6, stop_event=stop
    ) as run:
        cam.thread.start()
        for ev in run:
            events.append(ev)
            if isinstance(ev, StepScores) and ev.groups:
                stop.set()  # the user stops while the next step is being written
    cam.end()
    cam.thread.join()
    done = events[-1]
    assert isinstance(done, WatchDone) and done.error is None
    assert done.result.stopped
    steps = [e for e in events if isinstance(e, StepScores)]
    # every closed step was scored exactly once; the step cut off is not half-scored
    assert [s.step for s in steps] == [s.index for s in done.result.steps]
    assert not _engine_threads()


def test_attribute_eval_on_one_stream(tiny_qwen2_5_vl):
    from tays.watch_eval import METHODS, evaluate_stream, summarize
    from vstream.attr.estimator import LinearEstimator

    vlm = tiny_qwen2_5_vl
    ones = LinearEstimator(vlm.num_layers, vlm.num_heads)  # w = 1, c = 0: raw attention's scores
    rec = evaluate_stream(
        vlm, _stream(), None, masks=4, max_new_tokens=40, speed=4.0, plain_first=True, compare={"ones": ones}
    )
    out = summarize([rec])
    assert set(out["temporal_pointing"]) == {*METHODS, "ones"} == set(out["lds"]) == set(out["spatial_pointing"])
    # a compared estimator is scored on the same steps: all ones ranks exactly as raw attention
    assert rec["hits"]["ones"] == rec["hits"]["raw_attention"]
    np.testing.assert_allclose(rec["lds"]["ones"], rec["lds"]["raw_attention"])
    assert set(out["chance"]) == {"temporal_pointing", "spatial_pointing"}
    assert out["overhead_ratio"] is not None and out["overhead_ratio"] > 0
    assert rec["steps"] >= 1 and all(np.isfinite(x) for m in METHODS for x in rec["lds"][m])


def test_benchattribution_acceptance():
    """The promises `tays bench --attribute` checks, on made-up figures."""
    from tays.bench import attribution_acceptance

    plain = {f: {"delay_s": 10.0, "decode_tokens_per_s": 100.0, "ttft_question_s": 0.05} for f in ("1", "2", "3")}
    good = {
        f: {"delay_s": 10.0 + i * 0.3, "decode_tokens_per_s": 95.0, "ttft_question_s": 0.06}
        for i, f in enumerate(plain)
    }
    acc = attribution_acceptance(plain, good, {"decode_step_ms_p50_idle": 20.0})
    assert acc["attributed_delay_within_10pct"] and acc["attributed_decode_at_least_0_9x"]
    assert acc["attributed_ttft_within_one_step"]
    bad = {f: dict(v, decode_tokens_per_s=80.0, ttft_question_s=0.2) for f, v in good.items()}
    acc = attribution_acceptance(plain, bad, {"decode_step_ms_p50_idle": 20.0})
    assert not acc["attributed_decode_at_least_0_9x"] and not acc["attributed_ttft_within_one_step"]


def test_bench_replays_are_summarised_by_their_median():
    """`tays bench --repeat`: each number is the median over the replays; every replay's decode
    speed and TTFT stay beside it; one replay is left as it is."""
    from tays.bench import median_of_replays

    runs = [
        {"decode_tokens_per_s": v, "ttft_question_s": t, "tokens": n, "messages": ["m"], "score_latency_ms": [v]}
        for v, t, n in ((100.0, 0.05, 20), (300.0, 0.01, 22), (200.0, 0.02, 21))
    ]
    m = median_of_replays(runs)
    assert m["decode_tokens_per_s"] == 200.0 and m["ttft_question_s"] == 0.02 and m["tokens"] == 21
    assert m["decode_tokens_per_s_runs"] == [100.0, 300.0, 200.0] and m["replays"] == 3
    assert m["score_latency_ms"] == [100.0, 300.0, 200.0] and m["messages"] == ["m"]
    assert median_of_replays(runs[:1]) == runs[0]


def test_regions_process_matches_in_process_clustering():
    """Frame regions clustered in the helper process (off the decoding interpreter) are those of
    the same call made here; a frame the clustering refuses is a VLMError from there too; with
    the server gone, clustering falls back to this process."""
    import pytest

    from tays import regions_proc
    from vstream.attr.regions import PixelBackbone, compute_regions
    from vstream.model import VLMError

    frame = make_stream(3).frame_at(2.0)
    regions_proc.shutdown()
    assert regions_proc.prewarm() is not None
    deadline = time.monotonic() + 120
    while not regions_proc.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert regions_proc.ready(), "the regions process never said it was ready"
    got = regions_proc.regions(frame, (4, 4), None, 24)
    want = compute_regions(frame, (4, 4), backbone=PixelBackbone(grid=24))
    assert np.array_equal(got.labels, want.labels) and bool((got.assignment == want.assignment).all())
    assert got.k == want.k and got.image_size == want.image_size and got.backbone == want.backbone
    with pytest.raises(VLMError):
        regions_proc.regions(np.zeros((0, 5, 3), dtype=np.uint8), (4, 4), None, 24)
    pid = regions_proc.server_pid()
    regions_proc.shutdown()
    assert regions_proc.server_pid() is None and pid is not None
    again = regions_proc.regions(frame, (4, 4), None, 24)  # no server: clustered here
    assert np.array_equal(again.labels, want.labels)
