"""The shapes world in motion: seeded video streams with timestamped events and a trace.

A stream starts on the empty shapes-world background. Objects then appear, move to a
neighbouring grid cell, change colour and disappear at known times. Every event carries its
timestamp, the object's box, a keyframe interval (the second after the event, in which a
streaming viewer first sees evidence of it) and one reasoning step naming the object, e.g.
"A red circle appears." / "The red circle moves to the right." / "The red circle turns blue." /
"The blue circle disappears." The stream's trace is those steps in time order, then the answer.

Frames are rendered on demand with PIL from the event list (`frame_at(t)`), so a stream is a few
hundred bytes until it is looked at. Drawing primitives, colours, shapes, the 4x4 grid and the
seed splits all come from `vstream.world.shapes`; train and held-out streams come from the same
disjoint seed ranges as the still scenes, and `streams()` refuses a range that crosses them.

Conventions (what the rest of the project may rely on):
- Events are at least `MIN_GAP` (1.5 s) apart, the first at or after `FIRST_EVENT` (1.0 s), and
  every event's interval `[time, time + EVENT_SPAN]` ends within the duration.
- The state changes *at* the event time: an object is visible at `t >= appear.time`, shows the new
  colour at `t >= recolor.time`, is gone at `t >= disappear.time`; a move interpolates the box
  linearly over `[time, time + EVENT_SPAN]`.
- Each stream's objects have distinct shapes, so "the circle" is unambiguous; objects are
  numbered in order of appearance and every object enters with an "appear" event.
- Start and end positions sit in distinct 4x4 grid cells (the shapes-world jitter inside the
  cell is kept); a move goes to a free neighbouring cell, so objects never overlap.

MP4 export (`Stream.to_mp4`) encodes H.264 (libx264, yuv420p) with PyAV, whose wheels bundle
ffmpeg with libx264; the files read back with decord 0.6.0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image

from vstream.world.shapes import CELL, COLORS, GRID, SHAPES, SIZE, SPLITS, Obj, render

EVENT_KINDS = ("appear", "move", "recolor", "disappear")
QUESTION_KINDS = ("count", "recolor", "disappear", "move", "last_shape")
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_MOVE_WORDS = {"up": "up", "down": "down", "left": "to the left", "right": "to the right"}

EVENT_SPAN = 1.0  # seconds: a move lasts this long; every event's keyframe interval is this long
MIN_GAP = 1.5  # seconds between consecutive events, at least
FIRST_EVENT = 1.0  # the first event happens at or after this time
MIN_DURATION = FIRST_EVENT + 2 * MIN_GAP + EVENT_SPAN  # room for three events
DURATION_RANGE = (8.0, 20.0)  # random durations, in steps of 0.5 s
N_EVENTS = (3, 6)
N_OBJECTS = (2, 4)
_SALT = 1_000  # decorrelates a stream from the still scene with the same seed

Box = tuple[int, int, int, int]


@dataclass
class Event:
    time: float
    kind: str  # one of EVENT_KINDS
    obj: int  # index into Stream.objects
    step: str  # the reasoning step this event contributes to the trace
    box: Box  # the object's box at the event; for a move, where it ends up
    interval: tuple[float, float]  # keyframe interval [start, end] in which the event shows
    color: str = ""  # the object's colour after the event (at disappearance: its last colour)
    shape: str = ""
    direction: str = ""  # moves only: up / down / left / right
    from_box: Box | None = None  # moves only: the box the object leaves

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box)
        d["interval"] = list(self.interval)
        d["from_box"] = None if self.from_box is None else list(self.from_box)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Event:
        d = dict(d)
        d["box"] = tuple(d["box"])
        d["interval"] = tuple(d["interval"])
        d["from_box"] = None if d.get("from_box") is None else tuple(d["from_box"])
        return cls(**d)


@dataclass
class ObjSpec:
    """An object as it appears: shape, colour and box at its "appear" event."""

    shape: str
    color: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class ObjState:
    """A visible object at some time: ground truth for one frame."""

    obj: int
    shape: str
    color: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Stream:
    seed: int
    duration: float
    events: list[Event]
    question: str
    answer: str
    objects: list[ObjSpec]
    kind: str = field(default="")  # one of QUESTION_KINDS

    # ------------------------------------------------------------------ text

    @property
    def steps(self) -> list[tuple[float, str, int]]:
        """(time, text, obj) per event, in time order."""
        return [(e.time, e.step, e.obj) for e in self.events]

    @property
    def trace(self) -> str:
        """The target assistant text: `<think> step. step. </think> answer`."""
        return "<think> " + " ".join(e.step for e in self.events) + " </think> " + self.answer

    # ------------------------------------------------------------------ state and frames

    def state_at(self, t: float) -> list[ObjState]:
        """Visible objects at time t (in object order), with their colour and box then."""
        st: dict[int, list] = {}
        for e in self.events:
            if e.time > t:
                break
            if e.kind == "appear":
                st[e.obj] = [e.color, e.box]
            elif e.kind == "move":
                a = min(1.0, (t - e.time) / EVENT_SPAN)
                st[e.obj][1] = tuple(int(round(f + (b - f) * a)) for f, b in zip(e.from_box, e.box))
            elif e.kind == "recolor":
                st[e.obj][0] = e.color
            elif e.kind == "disappear":
                del st[e.obj]
        return [ObjState(i, self.objects[i].shape, c, b) for i, (c, b) in sorted(st.items())]

    def frame_at(self, t: float) -> Image.Image:
        """The 224x224 RGB frame at time t."""
        return render([Obj("shape", s.shape, s.color, s.box) for s in self.state_at(t)])

    def frame_times(self, fps: float) -> list[float]:
        """0, 1/fps, 2/fps, ... strictly before the end of the stream."""
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        n = math.ceil(self.duration * fps - 1e-9)
        return [k / fps for k in range(n)]

    def frames(self, fps: float) -> list[tuple[float, Image.Image]]:
        return [(t, self.frame_at(t)) for t in self.frame_times(fps)]

    # ------------------------------------------------------------------ export

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "duration": self.duration,
            "kind": self.kind,
            "question": self.question,
            "answer": self.answer,
            "trace": self.trace,
            "steps": [{"time": t, "text": s, "obj": o} for t, s, o in self.steps],
            "events": [e.to_dict() for e in self.events],
            "objects": [{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stream:
        return cls(
            seed=d["seed"],
            duration=d["duration"],
            events=[Event.from_dict(e) for e in d["events"]],
            question=d["question"],
            answer=d["answer"],
            objects=[ObjSpec(o["shape"], o["color"], tuple(o["box"])) for o in d["objects"]],
            kind=d.get("kind", ""),
        )

    def to_mp4(self, path, fps: float = 10) -> str:
        """Write the stream as an H.264 MP4 (PyAV / libx264, yuv420p); returns the path.

        Holds `ceil(duration * fps)` frames sampled like `frames(fps)`; decord 0.6.0 reads it.
        """
        import av  # imported lazily: only export needs it

        path = str(path)
        with av.open(path, "w") as out:
            vs = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = SIZE, SIZE, "yuv420p"
            vs.options = {"crf": "18", "preset": "veryfast"}
            for _, img in self.frames(fps):
                for pkt in vs.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                    out.mux(pkt)
            for pkt in vs.encode():
                out.mux(pkt)
        return path


# ----------------------------------------------------------------------------- generation


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _cell_box(cell: int, size: int, jitter: tuple[int, int]) -> Box:
    r, c = divmod(cell, GRID)
    x0, y0 = c * CELL + jitter[0], r * CELL + jitter[1]
    return (x0, y0, x0 + size, y0 + size)


def _event_times(rng: np.random.Generator, duration: float, n: int) -> list[float]:
    """n times, >= MIN_GAP apart, in [FIRST_EVENT, duration - EVENT_SPAN], on a 0.1 s grid."""
    lo = int(round(FIRST_EVENT * 10))
    hi = int(math.floor((duration - EVENT_SPAN) * 10 + 1e-6))
    gap = int(round(MIN_GAP * 10))
    slack = hi - lo - gap * (n - 1)
    offsets = np.sort(rng.integers(0, slack + 1, size=n))
    return [round((lo + gap * i + int(o)) / 10, 1) for i, o in enumerate(offsets)]


def _max_events(duration: float) -> int:
    return int((duration - FIRST_EVENT - EVENT_SPAN) // MIN_GAP) + 1


def _events(rng: np.random.Generator, times: list[float], n_obj: int) -> tuple[list[ObjSpec], list[Event]]:
    n = len(times)
    shapes = [str(s) for s in rng.choice(SHAPES, size=n_obj, replace=False)]
    colors = list(COLORS)
    sizes = [int(rng.integers(34, 49)) for _ in range(n_obj)]
    jitters = [tuple(int(rng.integers(0, CELL - s + 1)) for _ in range(2)) for s in sizes]
    objects: list[ObjSpec] = []
    events: list[Event] = []
    cell: dict[int, int] = {}  # visible object -> grid cell
    color: dict[int, str] = {}  # visible object -> current colour

    def free_neighbours(i: int) -> list[tuple[str, int]]:
        r, c = divmod(cell[i], GRID)
        taken = set(cell.values())
        out = []
        for d, (dr, dc) in DIRECTIONS.items():
            rr, cc = r + dr, c + dc
            if 0 <= rr < GRID and 0 <= cc < GRID and rr * GRID + cc not in taken:
                out.append((d, rr * GRID + cc))
        return out

    for k, t in enumerate(times):
        to_appear = n_obj - len(objects)
        spare = (n - k) > to_appear  # a slot that need not be an appearance
        options: dict[str, float] = {}  # kind -> weight
        if to_appear:
            options["appear"] = 1.5
        if spare and cell:
            if any(free_neighbours(i) for i in cell):
                options["move"] = 1.0
            options["recolor"] = 1.0
            if len(cell) > 1 or to_appear:  # never leave an empty scene with nothing to come
                options["disappear"] = 0.7
        names = list(options)
        p = np.asarray([options[k] for k in names]) / sum(options.values())
        kind = names[int(rng.choice(len(names), p=p))]
        interval = (t, round(t + EVENT_SPAN, 1))

        if kind == "appear":
            i = len(objects)
            free = [c for c in range(GRID * GRID) if c not in cell.values()]
            cell[i] = int(free[int(rng.integers(len(free)))])
            color[i] = str(colors[int(rng.integers(len(colors)))])
            box = _cell_box(cell[i], sizes[i], jitters[i])
            objects.append(ObjSpec(shapes[i], color[i], box))
            step = f"{_article(color[i])} {color[i]} {shapes[i]} appears."
            events.append(Event(t, kind, i, step, box, interval, color[i], shapes[i]))
            continue
        movable = [i for i in sorted(cell) if free_neighbours(i)]
        pool = movable if kind == "move" else sorted(cell)
        i = pool[int(rng.integers(len(pool)))]
        name = f"{color[i]} {shapes[i]}"
        box = _cell_box(cell[i], sizes[i], jitters[i])
        if kind == "move":
            nb = free_neighbours(i)
            d, dest = nb[int(rng.integers(len(nb)))]
            cell[i] = dest
            to = _cell_box(dest, sizes[i], jitters[i])
            step = f"The {name} moves {_MOVE_WORDS[d]}."
            events.append(Event(t, kind, i, step, to, interval, color[i], shapes[i], d, box))
        elif kind == "recolor":
            new = [c for c in colors if c != color[i]]
            color[i] = str(new[int(rng.integers(len(new)))])
            step = f"The {name} turns {color[i]}."
            events.append(Event(t, kind, i, step, box, interval, color[i], shapes[i]))
        else:
            step = f"The {name} disappears."
            events.append(Event(t, kind, i, step, box, interval, color[i], shapes[i]))
            del cell[i], color[i]
    return objects, events


def _question(rng: np.random.Generator, kind: str, objects: list[ObjSpec], events: list[Event]):
    """(question, answer) of `kind` for these events, or None when its premise fails."""

    def once(k: str) -> list[int]:
        counts = {}
        for e in events:
            if e.kind == k:
                counts[e.obj] = counts.get(e.obj, 0) + 1
        return sorted(i for i, c in counts.items() if c == 1)

    if kind == "count":
        return "How many objects appeared?", str(sum(e.kind == "appear" for e in events))
    if kind == "last_shape":
        last = [e for e in events if e.kind == "appear"][-1]
        return "What shape is the last object to appear?", last.shape
    if kind in ("recolor", "move"):
        cands = once(kind)
        if not cands:
            return None
        i = cands[int(rng.integers(len(cands)))]
        e = next(e for e in events if e.kind == kind and e.obj == i)
        if kind == "recolor":
            return f"What color did the {e.shape} turn?", e.color
        return f"Where did the {e.shape} move?", e.direction
    if kind == "disappear":
        gone = [e for e in events if e.kind == "disappear"]
        if not gone:
            return None
        q = "Which object disappeared?" if len(gone) == 1 else "Which object disappeared first?"
        return q, f"{gone[0].color} {gone[0].shape}"
    raise ValueError(f"unknown question kind {kind!r}; choose from {', '.join(QUESTION_KINDS)}")


def make_stream(seed: int, duration: float | None = None, kind: str | None = None) -> Stream:
    """The stream for `seed`: 3-6 events over 2-4 objects and one question about them.

    `duration` defaults to a seeded 8-20 s (0.5 s steps); a given one must be at least
    MIN_DURATION (5 s). `kind` forces the question kind; by default it is drawn uniformly from
    QUESTION_KINDS and the events are redrawn until its premise holds.
    """
    if kind is not None and kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {', '.join(QUESTION_KINDS)}")
    rng = np.random.default_rng([seed, _SALT])
    if duration is None:
        duration = float(rng.integers(int(DURATION_RANGE[0] * 2), int(DURATION_RANGE[1] * 2) + 1)) / 2
    duration = float(duration)
    if duration < MIN_DURATION:
        raise ValueError(f"duration {duration} s is shorter than the minimum {MIN_DURATION} s")
    if kind is None:
        kind = str(QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))])
    max_n = min(N_EVENTS[1], _max_events(duration))
    for _ in range(100):
        # Objects first, so that "how many appeared" is not dominated by 2; every object enters
        # with an event and at least one event is something other than an appearance.
        n_obj = int(rng.integers(N_OBJECTS[0], min(N_OBJECTS[1], max_n - 1) + 1))
        n = int(rng.integers(max(N_EVENTS[0], n_obj + 1), max_n + 1))
        times = _event_times(rng, duration, n)
        objects, events = _events(rng, times, n_obj)
        qa = _question(rng, kind, objects, events)
        if qa is not None:
            return Stream(seed, duration, events, qa[0], qa[1], objects, kind)
    # Practically unreachable; counting is always answerable.
    qa = _question(rng, "count", objects, events)
    return Stream(seed, duration, events, qa[0], qa[1], objects, "count")


def streams(split: str, start: int, n: int, duration: float | None = None) -> list[Stream]:
    """`n` streams from `split`, starting `start` seeds into it. Never crosses splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    r = SPLITS[split]
    if start < 0 or n < 0 or start + n > len(r):
        raise ValueError(f"seeds {start}..{start + n} fall outside the {split} split ({len(r)} seeds)")
    return [make_stream(r[start + i], duration) for i in range(n)]
