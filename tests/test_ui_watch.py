"""The Video tab's attribution views (ui.video.WatchLog) from made-up events: the step table,
the heatmap of a step on the frame it relied on most, and the timeline's traces."""

from __future__ import annotations

import numpy as np

from tays import TokenRecord
from tays.sources import EventTruth
from tays.watch import GroupSeen, StepScores
from ui.video import StepLog, WatchLog, align_steps, step_table
from vstream.attr.regions import compute_regions
from vstream.world.shapes_video import make_stream


def _step(i: int, groups: tuple[int, ...], scores: list[np.ndarray], text: str) -> StepScores:
    return StepScores(
        step=i,
        text=text,
        start=float(i),
        end=float(i) + 0.5,
        ready=float(i) + 0.6,
        stream_time=float(max(groups, default=0)),
        groups=groups,
        group_times=tuple(float(g) + 0.5 for g in groups),
        group_scores=np.array([s.sum() for s in scores], dtype=np.float32),
        region_scores=tuple(scores),
        raw_group_scores=np.zeros(len(groups), dtype=np.float32),
    )


def test_watch_log_table_heatmap_and_timeline():
    stream = make_stream(4)
    frames = [stream.frame_at(t) for t in (0.5, 1.5)]
    log = WatchLog([EventTruth(1.0, "A red circle appears.")])
    for g, f in enumerate(frames):
        log.add(GroupSeen(g, g + 0.5, compute_regions(f, (4, 4)), f))
    low, high = np.zeros(16, dtype=np.float32), np.arange(16, dtype=np.float32)
    log.add(_step(0, (), [], "<|eot|>"))
    log.add(_step(1, (0, 1), [low, high], "A red circle appears.<|eot|>"))
    assert log.relied_on(log.steps[0]) == ("–", "–")
    assert log.relied_on(log.steps[1]) == (1.5, 15)  # relied on group 1, region 15
    img = log.heatmap(1)
    assert img is not None and img.size == frames[1].size
    assert log.heatmap(0) is None  # a step that saw no frame has no heatmap
    fig = log.timeline()
    names = [t.name for t in fig.data]
    assert names == ["frame groups", "relied on", "reasoning steps", "events (ground truth)"]
    assert list(fig.data[0].x) == [0.5, 1.5] and list(fig.data[2].x) == [0.5, 1.5]
    assert list(fig.data[1].x)[:2] == [1.5, 1.5]  # step 1 -> the group it relied on


def _tokens(log: StepLog, text: str, wall: float) -> None:
    for i, piece in enumerate(text.split(" ")):
        log.add(TokenRecord(i, 0, piece + " ", wall, "reasoning", 1, 0.5))


def test_one_step_table_joins_steps_with_what_they_relied_on():
    watch = WatchLog()
    watch.add(GroupSeen(0, 0.5, compute_regions(make_stream(4).frame_at(0.5), (4, 4)), None))
    scores = [np.arange(16, dtype=np.float32)]
    steps = StepLog()
    _tokens(steps, "A red circle appears.", 1.0)
    _tokens(steps, "It moves.", 2.0)
    _tokens(steps, "Still", 2.5)  # being written
    table, ids = step_table(steps, watch)
    assert [r[:3] for r in table] == [[1, 0.5, 1.0], [2, 0.5, 2.0], [3, 0.5, 2.5]]
    assert [r[3:5] for r in table] == [["…", "…"]] * 3 and ids == [None] * 3  # nothing scored yet
    assert table[2][5].endswith("…")
    watch.add(_step(0, (0,), scores, "A red circle appears.<|eot|>"))
    watch.add(_step(1, (), [], "<|eot|>"))  # a step with nothing new, waiting for frames
    watch.add(_step(2, (0,), scores, " It moves."))
    table, ids = step_table(steps, watch)
    assert ids == [0, 2, None] and table[0][3:5] == [0.5, 15] and table[1][3:5] == [0.5, 15]


def test_align_steps_in_order_when_sentences_repeat_or_share_a_step():
    texts = ["Nothing yet.", "Nothing yet.", "A circle.", "It is red."]
    steps = [
        _step(0, (), [], "Nothing yet."),
        _step(1, (), [], "Nothing yet."),
        _step(2, (), [], "A circle. It is red."),
    ]
    assert [s.step if s else None for s in align_steps(texts, steps)] == [0, 1, 2, 2]
    assert align_steps(["Something else."], steps) == [None]
