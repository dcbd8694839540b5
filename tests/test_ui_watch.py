"""The Video tab's attribution views (ui.video.WatchLog) from made-up events: the step table,
the heatmap of a step on the frame it relied on most, and the timeline's traces."""

from __future__ import annotations

import numpy as np

from tays.sources import EventTruth
from tays.watch import GroupSeen, StepScores
from ui.video import WatchLog
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
    rows = log.rows()
    assert rows[0][2] == "–" and rows[1][2] == 1.5 and rows[1][3] == 15  # relied on group 1, region 15
    assert "<|" not in rows[1][4]
    img = log.heatmap(1)
    assert img is not None and img.size == frames[1].size
    assert log.heatmap(0) is None  # a step that saw no frame has no heatmap
    fig = log.timeline()
    names = [t.name for t in fig.data]
    assert names == ["frame groups", "relied on", "reasoning steps", "events (ground truth)"]
    assert list(fig.data[0].x) == [0.5, 1.5] and list(fig.data[2].x) == [0.5, 1.5]
    assert list(fig.data[1].x)[:2] == [1.5, 1.5]  # step 1 -> the group it relied on
