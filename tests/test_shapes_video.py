"""Tests for the shapes-world video streams (vstream.world.shapes_video)."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from vstream.world.shapes import CELL, COLORS, HELDOUT_SEEDS, SHAPES, SIZE, TRAIN_SEEDS, VAL_SEEDS, background
from vstream.world.shapes_video import (
    EVENT_SPAN,
    MIN_GAP,
    QUESTION_KINDS,
    Stream,
    make_stream,
    streams,
)

N_ORACLE = 200
SEEDS = range(40)


def centre(box) -> tuple[int, int]:
    return (box[0] + box[2] - 1) // 2, (box[1] + box[3] - 1) // 2


def pixel(img, box) -> tuple[int, int, int]:
    return img.getpixel(centre(box))


def bg(box) -> tuple[int, int, int]:
    return background().getpixel(centre(box))


# ----------------------------------------------------------------------------- an independent oracle

_STEP_RES = [
    ("appear", re.compile(r"^An? (\w+) (\w+) appears\.$")),
    ("move", re.compile(r"^The (\w+) (\w+) moves (up|down|to the left|to the right)\.$")),
    ("recolor", re.compile(r"^The (\w+) (\w+) turns (\w+)\.$")),
    ("disappear", re.compile(r"^The (\w+) (\w+) disappears\.$")),
]


def parse_steps(steps: list[str]) -> list[tuple]:
    """(kind, shape, colour-after, extra) per step text, checking the names stay consistent."""
    colour: dict[str, str] = {}  # shape -> current colour of the visible object with that shape
    out = []
    for text in steps:
        for kind, rx in _STEP_RES:  # noqa: B007 (kind is read after the break)
            m = rx.match(text)
            if m:
                break
        else:
            raise AssertionError(f"unparseable step {text!r}")
        c, s = m.group(1), m.group(2)
        assert c in COLORS and s in SHAPES, text
        if kind == "appear":
            assert s not in colour, f"{s} appears twice: {steps}"
            if text.startswith("An "):
                assert c[0] in "aeiou"
            colour[s] = c
            out.append((kind, s, c, None))
            continue
        assert colour.get(s) == c, f"{text!r} names a colour the {s} does not have: {steps}"
        if kind == "move":
            out.append((kind, s, c, m.group(3).split()[-1]))
        elif kind == "recolor":
            new = m.group(3)
            assert new in COLORS and new != c, text
            colour[s] = new
            out.append((kind, s, new, None))
        else:
            del colour[s]
            out.append((kind, s, c, None))
    return out


def oracle(question: str, steps: list[str]) -> str:
    ev = parse_steps(steps)
    if question == "How many objects appeared?":
        return str(sum(k == "appear" for k, *_ in ev))
    if question == "What shape is the last object to appear?":
        return [s for k, s, *_ in ev if k == "appear"][-1]
    if m := re.match(r"^What color did the (\w+) turn\?$", question):
        hits = [c for k, s, c, _ in ev if k == "recolor" and s == m.group(1)]
        assert len(hits) == 1, (question, steps)
        return hits[0]
    if m := re.match(r"^Where did the (\w+) move\?$", question):
        hits = [d for k, s, _, d in ev if k == "move" and s == m.group(1)]
        assert len(hits) == 1, (question, steps)
        return hits[0]
    gone = [f"{c} {s}" for k, s, c, _ in ev if k == "disappear"]
    if question == "Which object disappeared?":
        assert len(gone) == 1, (question, steps)
        return gone[0]
    if question == "Which object disappeared first?":
        assert len(gone) >= 2, (question, steps)
        return gone[0]
    raise AssertionError(f"unknown question {question!r}")


# ----------------------------------------------------------------------------- structure


def test_deterministic():
    for seed in (0, 7, 123456):
        a, b = make_stream(seed), make_stream(seed)
        assert a.to_dict() == b.to_dict()
        for (ta, fa), (tb, fb) in zip(a.frames(2), b.frames(2)):
            assert ta == tb
            assert np.array_equal(np.asarray(fa), np.asarray(fb))
    assert make_stream(1).to_dict() != make_stream(2).to_dict()


def test_events_sorted_spaced_and_inside():
    for seed in range(N_ORACLE):
        s = make_stream(seed)
        assert 8.0 <= s.duration <= 20.0
        assert 3 <= len(s.events) <= 6
        assert 2 <= len(s.objects) <= 4
        times = [e.time for e in s.events]
        assert times == sorted(times)
        assert times[0] >= 1.0
        assert all(b - a >= MIN_GAP - 1e-9 for a, b in zip(times, times[1:])), times
        for e in s.events:
            assert 0 <= e.time < s.duration
            assert e.interval[0] <= e.time <= e.interval[1] <= s.duration + 1e-9
            assert e.interval[1] - e.interval[0] == pytest.approx(EVENT_SPAN)
        assert [t for t, _, _ in s.steps] == times
        assert len({o.shape for o in s.objects}) == len(s.objects)  # names are unambiguous


def test_event_fields_match_step_text():
    for seed in range(N_ORACLE):
        s = make_stream(seed)
        parsed = parse_steps([e.step for e in s.events])
        for e, (kind, shape, colour, direction) in zip(s.events, parsed):
            assert (e.kind, e.shape, e.color) == (kind, shape, colour)
            assert s.objects[e.obj].shape == shape
            if kind == "move":
                assert e.direction == direction
        # every object enters with exactly one appear event, in index order
        assert [e.obj for e in s.events if e.kind == "appear"] == list(range(len(s.objects)))


def test_boxes_in_canvas_and_on_grid_cells():
    for seed in range(N_ORACLE):
        s = make_stream(seed)
        for e in s.events:
            for box in filter(None, (e.box, e.from_box)):
                x0, y0, x1, y1 = box
                assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
                assert x0 // CELL == (x1 - 1) // CELL and y0 // CELL == (y1 - 1) // CELL, box
            if e.kind == "move":
                (fx, fy), (tx, ty) = (
                    (e.from_box[0] // CELL, e.from_box[1] // CELL),
                    (e.box[0] // CELL, e.box[1] // CELL),
                )
                assert abs(fx - tx) + abs(fy - ty) == 1  # a neighbouring cell
                dx, dy = tx - fx, ty - fy
                assert e.direction == {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}[(dx, dy)]


def test_state_never_overlaps_and_matches_pixels():
    for seed in SEEDS:
        s = make_stream(seed)
        for t, img in s.frames(4):
            st = s.state_at(t)
            for i, a in enumerate(st):
                assert pixel(img, a.box) == COLORS[a.color], (seed, t, a)
                for b in st[i + 1 :]:
                    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


# ----------------------------------------------------------------------------- pixels around events


def test_appear_and_disappear_pixels():
    n_app = n_dis = 0
    for seed in SEEDS:
        s = make_stream(seed)
        for e in s.events:
            before, after = s.frame_at(e.time - 0.05), s.frame_at(e.time + 0.05)
            if e.kind == "appear":
                n_app += 1
                assert pixel(before, e.box) == bg(e.box)
                assert pixel(after, e.box) == COLORS[e.color]
                assert e.obj in {o.obj for o in s.state_at(e.time + 0.05)}
            elif e.kind == "disappear":
                n_dis += 1
                assert pixel(before, e.box) == COLORS[e.color]
                assert pixel(after, e.box) == bg(e.box)
                assert e.obj not in {o.obj for o in s.state_at(e.time + 0.05)}
                assert e.obj not in {o.obj for o in s.state_at(s.duration)}
    assert n_app and n_dis


def test_recolor_changes_pixel():
    n = 0
    for seed in SEEDS:
        s = make_stream(seed)
        for e in s.events:
            if e.kind == "recolor":
                n += 1
                old, new = pixel(s.frame_at(e.time - 0.05), e.box), pixel(s.frame_at(e.time + 0.05), e.box)
                assert new == COLORS[e.color] and old != new and old in COLORS.values()
    assert n


def test_move_interpolates():
    n = 0
    for seed in SEEDS:
        s = make_stream(seed)
        for e in s.events:
            if e.kind != "move":
                continue
            n += 1
            col = COLORS[e.color]
            start, end = s.frame_at(e.time - 0.05), s.frame_at(e.time + EVENT_SPAN + 0.05)
            assert pixel(start, e.from_box) == col and pixel(start, e.box) == bg(e.box)
            assert pixel(end, e.box) == col and pixel(end, e.from_box) == bg(e.from_box)
            mid = next(o for o in s.state_at(e.time + EVENT_SPAN / 2) if o.obj == e.obj).box
            want = [(a + b) / 2 for a, b in zip(e.from_box, e.box)]
            assert all(abs(m - w) <= 1 for m, w in zip(mid, want)), (mid, want)
    assert n


# ----------------------------------------------------------------------------- frames, questions, splits


@pytest.mark.parametrize("duration,fps", [(8.5, 3), (20.0, 2), (10.0, 10), (12.3, 2.5)])
def test_frame_count(duration, fps):
    s = make_stream(5, duration)
    fr = s.frames(fps)
    assert len(fr) == math.ceil(duration * fps - 1e-9)
    assert fr[0][0] == 0 and all(t < duration for t, _ in fr)
    assert all(img.size == (SIZE, SIZE) and img.mode == "RGB" for _, img in fr)


def test_short_duration_refused():
    with pytest.raises(ValueError):
        make_stream(0, 3.0)
    assert len(make_stream(0, 5.0).events) == 3


def test_questions_match_oracle_for_every_kind():
    seen = set()
    for seed in range(N_ORACLE):
        s = make_stream(seed)
        assert s.kind in QUESTION_KINDS
        seen.add(s.kind)
        assert oracle(s.question, [e.step for e in s.events]) == s.answer, s.to_dict()
        assert s.trace == "<think> " + " ".join(e.step for e in s.events) + " </think> " + s.answer
    assert seen == set(QUESTION_KINDS)
    for kind in QUESTION_KINDS:  # and when forced
        for seed in range(20):
            s = make_stream(seed, kind=kind)
            assert s.kind == kind
            assert oracle(s.question, [e.step for e in s.events]) == s.answer


def test_dict_round_trip():
    s = make_stream(11)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["trace"] == s.trace and len(d["events"]) == len(s.events)
    back = Stream.from_dict(d)
    assert back.to_dict() == s.to_dict()
    assert np.array_equal(np.asarray(back.frame_at(7.3)), np.asarray(s.frame_at(7.3)))


def test_splits():
    tr = streams("train", 0, 3)
    assert [s.seed for s in tr] == [TRAIN_SEEDS[0], TRAIN_SEEDS[1], TRAIN_SEEDS[2]]
    ho = streams("heldout", 5, 2)
    assert [s.seed for s in ho] == [HELDOUT_SEEDS[5], HELDOUT_SEEDS[6]]
    assert ho[0].to_dict() == make_stream(HELDOUT_SEEDS[5]).to_dict()
    with pytest.raises(ValueError):
        streams("train", len(TRAIN_SEEDS) - 1, 2)  # would cross into validation
    va = streams("val", 0, 2)
    assert [s.seed for s in va] == [VAL_SEEDS[0], VAL_SEEDS[1]] and VAL_SEEDS[0] == TRAIN_SEEDS.stop
    assert VAL_SEEDS.stop == HELDOUT_SEEDS.start  # three disjoint, adjacent ranges
    with pytest.raises(ValueError):
        streams("val", len(VAL_SEEDS) - 1, 2)  # would cross into heldout
    with pytest.raises(ValueError):
        streams("heldout", -1, 2)
    with pytest.raises(ValueError):
        streams("heldout", len(HELDOUT_SEEDS), 1)
    with pytest.raises(ValueError):
        streams("test", 0, 1)


def test_render_speed():
    s = make_stream(3, 20.0)
    s.frame_at(0.0)  # warm the background cache
    t0 = time.perf_counter()
    fr = s.frames(10)
    dt = time.perf_counter() - t0
    assert len(fr) == 200
    assert dt < 2.0, dt
    t0 = time.perf_counter()
    s.frames(2)
    assert time.perf_counter() - t0 < 0.5


def test_mp4_round_trip(tmp_path):
    decord = pytest.importorskip("decord")
    pytest.importorskip("av")
    s = make_stream(4)
    fps = 10
    path = s.to_mp4(tmp_path / "s.mp4", fps=fps)
    vr = decord.VideoReader(str(path))
    n = math.ceil(s.duration * fps - 1e-9)
    assert len(vr) == n
    first = vr[0].asnumpy().astype(np.float32)
    assert first.shape == (SIZE, SIZE, 3)
    ref = np.asarray(s.frame_at(0.0), np.float32)
    assert np.abs(first.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)).max() < 3
    # A frame after the first appearance shows the object where frame_at puts it.
    e = s.events[0]
    k = math.ceil(e.time * fps) + 2
    got = vr[k].asnumpy().astype(np.float32)
    want = np.asarray(s.frame_at(k / fps), np.float32)
    assert np.abs(got - want).mean() < 4
    cx, cy = centre(e.box)
    assert np.abs(got[cy, cx] - np.asarray(COLORS[e.color])).max() < 30
    assert np.abs(np.asarray(s.frame_at(0.0), np.float32) - want).mean() > 1  # the object is visible
