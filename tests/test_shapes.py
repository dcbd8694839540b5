import time

import numpy as np
import pytest

from vstream.world.shapes import (
    CELL,
    COLORS,
    FAMILIES,
    HELDOUT_SEEDS,
    LONG_FAMILIES,
    SHAPES,
    SHORT_FAMILIES,
    SIZE,
    TRAIN_SEEDS,
    make_scene,
    scenes,
    split_of,
)


def test_deterministic_and_seed_sensitive():
    a, b, c = make_scene(123), make_scene(123), make_scene(129)
    assert a.to_dict() == b.to_dict()
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert a.to_dict() != c.to_dict()


def test_families_cycle_and_every_family_has_questions():
    got = [s.family for s in scenes("train", 0, 2 * len(FAMILIES))]
    assert got == list(FAMILIES) * 2
    assert set(SHORT_FAMILIES) | set(LONG_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", LONG_FAMILIES)
def test_long_families_reason_in_8_to_20_grounded_steps(family):
    items = scenes("train", 0, 100, family=family)
    steps = [len(s.steps) for s in items]
    assert min(steps) >= 8 and max(steps) <= 20
    # at least half the steps read the image (the others add, count or conclude)
    grounded = [st.obj is not None for s in items for st in s.steps]
    assert np.mean(grounded) >= 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_format_and_ground_truth(family):
    for s in scenes("train", 0, 60, family=family):
        assert s.trace.startswith("<think> ") and " </think> " in s.trace
        assert s.trace.endswith(" </think> " + s.answer)
        assert len(s.steps) >= 1 and all(st.text.endswith(".") for st in s.steps)
        for st in s.steps:
            if st.obj is not None:
                o = s.objects[st.obj]
                # the step names the object it relies on
                assert o.color in st.text or o.shape in st.text
                m = s.mask(st.obj)
                assert m.shape == (s.image_size, s.image_size) == s.image().size
                x0, y0, x1, y1 = s.box(st.obj)
                assert m.any() and not m[:y0].any() and not m[y1:].any()
                assert not m[:, :x0].any() and not m[:, x1:].any()
                assert 0 <= x0 < x1 <= s.image_size and 0 <= y0 < y1 <= s.image_size
                assert o.box[2] <= SIZE and o.box[3] <= SIZE  # world coordinates


def _pixel(s, o):
    img = np.asarray(s.image())
    x0, y0, x1, y1 = s.box(s.objects.index(o))
    return tuple(int(v) for v in img[(y0 + y1) // 2, (x0 + x1) // 2])


def test_answers_follow_from_the_objects():
    """An independent oracle recomputes each answer from the object list."""
    for s in scenes("train", 1000, 1100):
        objs = s.objects
        q = s.question
        if s.family == "counting":
            color = q.split()[2]
            assert s.answer == str(sum(o.color == color for o in objs))
        elif s.family == "attribute" and s.kind == "color":
            shape = q.rstrip("?").split()[-1]
            (o,) = [o for o in objs if o.shape == shape]
            assert s.answer == o.color and _pixel(s, o) == COLORS[o.color]
        elif s.family == "existence":
            words = q.rstrip("?").split()
            assert (s.answer == "yes") == any(o.color == words[-2] and o.shape == words[-1] for o in objs)
        elif s.family == "spatial":
            a = next(o for o in objs if f"{o.color} {o.shape}" in q.split(" the ")[1])
            b = next(o for o in objs if q.rstrip("?").endswith(f"{o.color} {o.shape}"))
            (ra, ca), (rb, cb) = a.cell, b.cell
            truth = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[s.kind]
            assert s.answer == ("yes" if truth else "no")
        elif s.family == "chart" and s.kind == "value":
            color = q.split()[6]
            (o,) = [o for o in objs if o.color == color]
            assert s.answer == str((o.box[3] - o.box[1]) // 28)
        elif s.family == "reading":
            color = q.split()[-2]
            (o,) = [o for o in objs if o.color == color]
            assert s.answer == o.label
        elif s.family == "compare_counts":
            a, b = q.split()[3], q.split()[6]
            na, nb = (sum(o.color == c for o in objs) for c in (a, b))
            assert s.answer == ("yes" if na > nb else "no")
        elif s.family == "chain":
            start, moves = q.split(" and go ")
            (o,) = [o for o in objs if start.endswith(f"{o.color} {o.shape}")]
            r, c = o.cell
            for m in moves.split(".")[0].split(", "):
                dr, dc = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}[m]
                r, c = r + dr, c + dc
            (end,) = [o for o in objs if o.cell == (r, c)]
            assert s.answer == end.color and _pixel(s, end) == COLORS[end.color]
        elif s.family == "sum_boxes":
            assert s.answer == str(sum(int(o.label) for o in objs))
        elif s.family == "rank_bars":
            tallest_first = sorted(objs, key=lambda o: o.box[1])
            assert s.answer == " ".join(o.color for o in tallest_first)
        elif s.family == "odd_one_out":
            traits = [o.color for o in objs] if s.kind == "colour" else [o.shape for o in objs]
            (odd,) = [o for o, t in zip(objs, traits) if traits.count(t) == 1]
            assert s.answer == f"{odd.color} {odd.shape}"
            other = [o.shape for o in objs] if s.kind == "colour" else [o.color for o in objs]
            assert min(other.count(t) for t in other) >= 2  # nothing else stands out: one right answer
            common = max(set(traits), key=traits.count)
            assert s.steps[-3].text.startswith(f"Most are {common}") and s.steps[-3].obj is None
            odd_value = odd.color if s.kind == "colour" else f"a {odd.shape}"
            assert s.steps[-2].text == f"Only one is {odd_value}." and s.steps[-1].text == f"It is the {s.answer}."
            assert s.steps[-1].obj == s.steps[-2].obj == objs.index(odd)


def test_objects_do_not_overlap_cells():
    for s in scenes("train", 0, 300):
        if s.family in ("chart", "rank_bars"):
            continue
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells)
        for o in s.objects:
            assert o.box[2] - o.box[0] <= CELL


def test_splits_are_enforced():
    assert split_of(5) == "train" and split_of(HELDOUT_SEEDS.start) == "heldout"
    with pytest.raises(ValueError):
        scenes("train", len(TRAIN_SEEDS) - 5, 10)
    with pytest.raises(ValueError):
        scenes("validation", 0, 1)
    held = {s.seed for s in scenes("heldout", 0, 50)}
    assert all(seed in HELDOUT_SEEDS and seed not in TRAIN_SEEDS for seed in held)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        make_scene(1, family="poetry")


def test_speed_at_least_200_scenes_per_second():
    t = time.perf_counter()
    for s in scenes("train", 0, 200):
        s.image()
    assert time.perf_counter() - t < 1.0  # 200/s including rendering, with slack for a busy CI core


def test_vocabulary():
    for s in scenes("train", 0, 120):
        for o in s.objects:
            assert o.color in COLORS and (o.shape in SHAPES or o.kind != "shape")
