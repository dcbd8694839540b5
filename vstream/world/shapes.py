"""The shapes world: seeded, procedurally generated still scenes with questions and traces.

Every scene comes with a multi-step thinking trace whose steps name the object they rely on,
plus that object's ground-truth box and mask, so attributions can be checked against truth.
Five task families mirror the paper's General/Math/Science/Document/Code spread, and a sixth,
`existence`, asks about absent objects (hallucination probes).

Seeds decide everything. Training, validation and held-out scenes come from disjoint seed
ranges, and `scenes()` refuses to hand out a range that crosses into another split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 224  # the world's coordinates: boxes, cells and video frames are in these pixels
GRID = 4  # objects sit in a 4x4 grid of 56 px cells
CELL = SIZE // GRID
# Still images are drawn SCALE times larger than the world: 448 px, 8x8 = 64 demo-model tokens,
# so an object covers about 2x2 tokens and a region can group several. Video frames stay at 224.
SCALE = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHORT_FAMILIES = ("attribute", "counting", "spatial", "reading", "chart", "existence")
# Multi-step reasoning (8-20 steps), each step grounded in one object.
LONG_FAMILIES = ("compare_counts", "chain", "sum_boxes", "rank_bars", "odd_one_out")
FAMILIES = SHORT_FAMILIES + LONG_FAMILIES
# The paper's task categories these stand in for.
PAPER_CATEGORY = {
    "attribute": "General",
    "counting": "Math",
    "spatial": "Science",
    "reading": "Document",
    "chart": "Code",
    "existence": "Hallucination probe",
    "compare_counts": "Math",
    "chain": "Science",
    "sum_boxes": "Document",
    "rank_bars": "Code",
    "odd_one_out": "General",
}

TRAIN_SEEDS = range(0, 900_000_000)
# Never trained on and never reported: for choosing training settings without looking at held-out.
VAL_SEEDS = range(900_000_000, 1_000_000_000)
HELDOUT_SEEDS = range(1_000_000_000, 2_000_000_000)
SPLITS = {"train": TRAIN_SEEDS, "val": VAL_SEEDS, "heldout": HELDOUT_SEEDS}

CHART_UNIT = 28  # one bar unit is one token row
CHART_BASE = 196


@dataclass
class Obj:
    kind: str  # "shape", "box" (reading) or "bar" (chart)
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end
    label: str = ""  # digit in a box, value of a bar

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the grid cell holding the object's centre, 0-based."""
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        return int(cy // CELL), int(cx // CELL)


@dataclass
class Step:
    text: str
    obj: int | None  # index of the object the step relies on; None when it names none


@dataclass
class Scene:
    seed: int
    family: str
    question: str
    steps: list[Step]
    answer: str
    objects: list[Obj]
    kind: str = field(default="")  # question variant within the family
    scale: int = SCALE  # image pixels per world pixel

    @property
    def trace(self) -> str:
        """The target assistant text: `<think> step. step. </think> answer`."""
        return "<think> " + " ".join(s.text for s in self.steps) + " </think> " + self.answer

    @property
    def image_size(self) -> int:
        return SIZE * self.scale

    def image(self) -> Image.Image:
        return render(self.objects, chart=any(o.kind == "bar" for o in self.objects), scale=self.scale)

    def mask(self, i: int) -> np.ndarray:
        """Boolean (image_size, image_size) mask of object i, in image pixels."""
        m = Image.new("L", (self.image_size, self.image_size), 0)
        _draw_obj(ImageDraw.Draw(m), self.objects[i], fill=255, outline=255, scale=self.scale)
        return np.asarray(m) > 0

    def box(self, i: int) -> tuple[int, int, int, int]:
        """Object i's box in image pixels."""
        return tuple(v * self.scale for v in self.objects[i].box)

    def step_boxes(self) -> list[tuple[int, int, int, int] | None]:
        return [None if s.obj is None else self.box(s.obj) for s in self.steps]

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "family": self.family,
            "kind": self.kind,
            "question": self.question,
            "trace": self.trace,
            "answer": self.answer,
            "steps": [{"text": s.text, "obj": s.obj} for s in self.steps],
            "image_size": self.image_size,
            "objects": [vars(o) | {"box": list(self.box(i))} for i, o in enumerate(self.objects)],
        }


# ----------------------------------------------------------------------------- rendering


@functools.cache
def background(size: int = SIZE) -> Image.Image:
    # A gentle gradient: red grows to the right, green grows downwards. It gives the vision
    # encoder an absolute position cue (like lighting in a real photo).
    x = np.linspace(0, 1, size, dtype=np.float32)
    bg = np.empty((size, size, 3), np.float32)
    bg[..., 0] = 205 + 40 * x[None, :]
    bg[..., 1] = 205 + 40 * x[:, None]
    bg[..., 2] = 225
    return Image.fromarray(bg.astype(np.uint8))


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0 - 1, y1 - y0 - 1
    cx, cy = x0 + w / 2, y0 + h / 2
    if shape == "triangle":
        return [(cx, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    if shape == "diamond":
        return [(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)]
    if shape == "cross":
        t = w / 6
        return [
            (cx - t, y0),
            (cx + t, y0),
            (cx + t, cy - t),
            (x0 + w, cy - t),
            (x0 + w, cy + t),
            (cx + t, cy + t),
            (cx + t, y0 + h),
            (cx - t, y0 + h),
            (cx - t, cy + t),
            (x0, cy + t),
            (x0, cy - t),
            (cx - t, cy - t),
        ]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill, outline=None) -> None:
    """Draw one of SHAPES filling `box` (x0, y0, x1, y1, exclusive end)."""
    x0, y0, x1, y1 = box
    inner = (x0, y0, x1 - 1, y1 - 1)
    if shape == "circle":
        draw.ellipse(inner, fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle(inner, fill=fill, outline=outline)
    else:
        draw.polygon(_polygon(shape, box), fill=fill, outline=outline)


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill=None, outline=None, scale: int = 1) -> None:
    rgb = COLORS[o.color]
    box = tuple(v * scale for v in o.box)
    x0, y0, x1, y1 = box
    if o.kind == "shape":
        draw_shape(draw, o.shape, box, fill=fill or rgb, outline=outline)
    elif o.kind == "bar":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill or rgb)
    else:  # a coloured frame with a digit inside; the mask is the whole box
        if fill is not None:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            return
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(250, 250, 250), outline=rgb, width=5 * scale)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), o.label, fill=(0, 0, 0), font=_font(34 * scale), anchor="mm")


def render(objects: list[Obj], chart: bool = False, scale: int = 1) -> Image.Image:
    """The scene drawn at `scale` image pixels per world pixel."""
    img = background(SIZE * scale).copy()
    draw = ImageDraw.Draw(img)
    if chart:
        for v in range(1, 7):
            y = (CHART_BASE - v * CHART_UNIT) * scale
            draw.line((8 * scale, y, (SIZE - 8) * scale, y), fill=(170, 170, 170), width=scale)
        y = CHART_BASE * scale
        draw.line((8 * scale, y, (SIZE - 8) * scale, y), fill=(40, 40, 40), width=3 * scale)
    for o in objects:
        _draw_obj(draw, o, scale=scale)
    return img


# ----------------------------------------------------------------------------- scenes


def _place(rng: np.random.Generator, n: int, shapes=None, colors=None, kind="shape", cells=None) -> list[Obj]:
    """`n` objects in distinct grid cells (random ones unless `cells`, raster indices, are given)."""
    if cells is None:
        cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs = []
    for i, c in enumerate(cells):
        r, col = divmod(int(c), GRID)
        s = int(rng.integers(34, 49)) if kind == "shape" else int(rng.integers(46, 53))
        jx, jy = (int(rng.integers(0, CELL - s + 1)) for _ in range(2))
        x0, y0 = col * CELL + jx, r * CELL + jy
        shape = shapes[i] if shapes else str(rng.choice(SHAPES))
        color = colors[i] if colors else str(rng.choice(list(COLORS)))
        objs.append(Obj(kind, str(shape) if kind == "shape" else kind, str(color), (x0, y0, x0 + s, y0 + s)))
    return objs


def _reading_order(objs: list[Obj], idx) -> list[int]:
    return sorted(idx, key=lambda i: objs[i].cell)


def _attribute(rng, seed) -> Scene:
    n = int(rng.integers(3, 7))
    if rng.random() < 0.5:  # "What color is the <shape>?" with a unique shape
        shapes = list(rng.choice(SHAPES, size=min(n, len(SHAPES)), replace=False))
        n = len(shapes)
        objs = _place(rng, n, shapes=shapes)
        t = int(rng.integers(n))
        o = objs[t]
        steps = [Step(f"I look for the {o.shape}.", t), Step(f"The {o.shape} is {o.color}.", t)]
        return Scene(seed, "attribute", f"What color is the {o.shape}?", steps, o.color, objs, "color")
    colors = list(rng.choice(list(COLORS), size=n, replace=False))
    objs = _place(rng, n, colors=colors)
    t = int(rng.integers(n))
    o = objs[t]
    steps = [Step(f"I look for the {o.color} object.", t), Step(f"The {o.color} object is a {o.shape}.", t)]
    return Scene(seed, "attribute", f"What shape is the {o.color} object?", steps, o.shape, objs, "shape")


def _counting(rng, seed) -> Scene:
    n = int(rng.integers(3, 8))
    target = str(rng.choice(list(COLORS)))
    k = int(rng.integers(0, min(n, 4) + 1))
    others = [c for c in COLORS if c != target]
    colors = [target] * k + [str(c) for c in rng.choice(others, size=n - k)]
    rng.shuffle(colors)
    objs = _place(rng, n, colors=colors)
    hits = _reading_order(objs, [i for i, o in enumerate(objs) if o.color == target])
    steps = [Step(f"I see a {target} {objs[i].shape}.", i) for i in hits]
    if not hits:
        steps.append(Step(f"I see no {target} object.", None))
    steps.append(Step(f"So there are {k} {target} objects.", None))
    return Scene(seed, "counting", f"How many {target} objects are there?", steps, str(k), objs, "count")


def _unique_pairs(rng, n) -> tuple[list[str], list[str]]:
    combos = [(s, c) for s in SHAPES for c in COLORS]
    pick = rng.choice(len(combos), size=n, replace=False)
    return [combos[i][0] for i in pick], [combos[i][1] for i in pick]


def _spatial(rng, seed) -> Scene:
    n = int(rng.integers(2, 6))
    shapes, colors = _unique_pairs(rng, n)
    objs = _place(rng, n, shapes=shapes, colors=colors)
    rel = str(rng.choice(["left of", "right of", "above", "below"]))
    axis = 1 if rel in ("left of", "right of") else 0
    word = "column" if axis else "row"
    pairs = [(a, b) for a in range(n) for b in range(n) if objs[a].cell[axis] != objs[b].cell[axis]]
    if not pairs:  # all in one row/column: move the second object
        return _spatial(rng, seed)
    a, b = pairs[int(rng.integers(len(pairs)))]
    pa, pb = objs[a].cell[axis], objs[b].cell[axis]
    truth = pa < pb if rel in ("left of", "above") else pa > pb
    na, nb = f"{objs[a].color} {objs[a].shape}", f"{objs[b].color} {objs[b].shape}"
    steps = [Step(f"The {na} is in {word} {pa + 1}.", a), Step(f"The {nb} is in {word} {pb + 1}.", b)]
    ans = "yes" if truth else "no"
    return Scene(seed, "spatial", f"Is the {na} {rel} the {nb}?", steps, ans, objs, rel)


def _reading(rng, seed) -> Scene:
    n = int(rng.integers(2, 5))
    colors = list(rng.choice(list(COLORS), size=n, replace=False))
    objs = _place(rng, n, colors=colors, kind="box")
    for o in objs:
        o.label = str(int(rng.integers(10)))
    t = int(rng.integers(n))
    o = objs[t]
    steps = [Step(f"I find the {o.color} box.", t), Step(f"The {o.color} box shows {o.label}.", t)]
    return Scene(seed, "reading", f"What number is in the {o.color} box?", steps, o.label, objs, "digit")


def _bars(rng, colors: list[str], values: list[int]) -> list[Obj]:
    slot = (SIZE - 16) // len(colors)
    objs = []
    for i, (c, v) in enumerate(zip(colors, values)):
        w = int(rng.integers(slot // 2, slot * 3 // 4))
        x0 = 8 + i * slot + (slot - w) // 2
        objs.append(Obj("bar", "bar", str(c), (x0, CHART_BASE - v * CHART_UNIT, x0 + w, CHART_BASE), str(v)))
    return objs


def _chart(rng, seed) -> Scene:
    n = int(rng.integers(3, 5))
    colors = list(rng.choice(list(COLORS), size=n, replace=False))
    vals = [int(v) for v in rng.integers(1, 7, size=n)]
    objs = _bars(rng, colors, vals)
    read = [Step(f"The {o.color} bar reaches {o.label}.", i) for i, o in enumerate(objs)]
    kind = str(rng.choice(["value", "tallest", "compare"]))
    if kind == "tallest" and vals.count(max(vals)) == 1:
        t = int(np.argmax(vals))
        steps = read + [Step(f"The tallest bar is {objs[t].color}.", t)]
        return Scene(seed, "chart", "Which bar is the tallest?", steps, objs[t].color, objs, kind)
    if kind == "compare":
        a, b = (int(i) for i in rng.choice(n, size=2, replace=False))
        steps = [read[a], read[b]]
        ans = "yes" if vals[a] > vals[b] else "no"
        q = f"Is the {objs[a].color} bar taller than the {objs[b].color} bar?"
        return Scene(seed, "chart", q, steps, ans, objs, kind)
    t = int(rng.integers(n))
    q = f"What is the value of the {objs[t].color} bar?"
    return Scene(seed, "chart", q, [read[t]], objs[t].label, objs, "value")


def _existence(rng, seed) -> Scene:
    n = int(rng.integers(2, 6))
    shapes, colors = _unique_pairs(rng, n)
    objs = _place(rng, n, shapes=shapes, colors=colors)
    present = {(o.shape, o.color) for o in objs}
    if rng.random() < 0.5:
        t = int(rng.integers(n))
        name = f"{objs[t].color} {objs[t].shape}"
        steps = [Step(f"I look for a {name}.", t), Step(f"I see the {name}.", t)]
        return Scene(seed, "existence", f"Is there a {name}?", steps, "yes", objs, "present")
    # An absent object that shares its colour or shape with one present: a tempting lure.
    lure = objs[int(rng.integers(n))]
    if rng.random() < 0.5:
        options = [(s, lure.color) for s in SHAPES if (s, lure.color) not in present]
    else:
        options = [(lure.shape, c) for c in COLORS if (lure.shape, c) not in present]
    s, c = options[int(rng.integers(len(options)))]
    steps = [Step(f"I look for a {c} {s}.", None), Step(f"There is no {c} {s}.", None)]
    return Scene(seed, "existence", f"Is there a {c} {s}?", steps, "no", objs, "absent")


# ----------------------------------------------------------------------------- long families
# Each trace takes 8-20 steps; every step that reads the image names the object it relies on.


def _compare_counts(rng, seed) -> Scene:
    a, b = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    ka, kb = 0, 0
    while ka + kb < 5:
        ka, kb = (int(k) for k in rng.integers(1, 6, size=2))
    others = [c for c in COLORS if c not in (a, b)]
    colors = [a] * ka + [b] * kb + [str(c) for c in rng.choice(others, size=int(rng.integers(0, 3)))]
    rng.shuffle(colors)
    objs = _place(rng, len(colors), colors=colors)
    steps = []
    for color, k in ((a, ka), (b, kb)):
        hits = _reading_order(objs, [i for i, o in enumerate(objs) if o.color == color])
        steps += [Step(f"I see a {color} {objs[i].shape}.", i) for i in hits]
        steps.append(Step(f"So there are {k} {color} objects.", None))
    more = ka > kb
    steps.append(Step(f"{ka} is {'more' if more else 'not more'} than {kb}.", None))
    q = f"Are there more {a} objects than {b} objects?"
    return Scene(seed, "compare_counts", q, steps, "yes" if more else "no", objs, "more")


MOVES = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def _walk(rng, hops: int) -> tuple[list[tuple[int, int]], list[str]]:
    """A self-avoiding walk of `hops` moves between neighbouring grid cells."""
    while True:
        path, moves = [(int(rng.integers(GRID)), int(rng.integers(GRID)))], []
        while len(moves) < hops:
            r, c = path[-1]
            options = [
                (m, (r + dr, c + dc))
                for m, (dr, dc) in MOVES.items()
                if 0 <= r + dr < GRID and 0 <= c + dc < GRID and (r + dr, c + dc) not in path
            ]
            if not options:
                break
            m, cell = options[int(rng.integers(len(options)))]
            moves.append(m)
            path.append(cell)
        if len(moves) == hops:
            return path, moves


def _chain(rng, seed) -> Scene:
    path, moves = _walk(rng, int(rng.integers(6, 9)))
    free = [c for c in range(GRID * GRID) if divmod(c, GRID) not in path]
    extra = [int(c) for c in rng.choice(free, size=min(len(free), int(rng.integers(0, 4))), replace=False)]
    cells = [r * GRID + c for r, c in path] + extra
    shapes, colors = _unique_pairs(rng, len(cells))
    objs = _place(rng, len(cells), shapes=shapes, colors=colors, cells=cells)
    name = lambda i: f"{objs[i].color} {objs[i].shape}"  # noqa: E731
    where = lambda i: f"row {path[i][0] + 1}, column {path[i][1] + 1}"  # noqa: E731
    steps = [Step(f"The {name(0)} is in {where(0)}.", 0)]
    steps += [Step(f"Going {m}, I reach the {name(i)} in {where(i)}.", i) for i, m in enumerate(moves, 1)]
    last = len(moves)
    steps.append(Step(f"The object I reach is {objs[last].color}.", last))
    q = f"Start at the {name(0)} and go {', '.join(moves)}. What color is the object you reach?"
    return Scene(seed, "chain", q, steps, objs[last].color, objs, f"{len(moves)} moves")


def _sum_boxes(rng, seed) -> Scene:
    n = int(rng.integers(4, 6))
    colors = list(rng.choice(list(COLORS), size=n, replace=False))
    objs = _place(rng, n, colors=colors, kind="box")
    for o in objs:
        o.label = str(int(rng.integers(10)))
    order = _reading_order(objs, range(n))
    read = lambda i: Step(f"The {objs[i].color} box shows {objs[i].label}.", i)  # noqa: E731
    steps, total = [read(order[0])], int(objs[order[0]].label)
    for i in order[1:]:
        v = int(objs[i].label)
        steps += [read(i), Step(f"{total} plus {v} is {total + v}.", None)]
        total += v
    steps.append(Step(f"So the sum is {total}.", None))
    q = "What is the sum of the numbers in the boxes?"
    return Scene(seed, "sum_boxes", q, steps, str(total), objs, f"{n} boxes")


def _rank_bars(rng, seed) -> Scene:
    n = int(rng.integers(4, 6))
    colors = [str(c) for c in rng.choice(list(COLORS), size=n, replace=False)]
    vals = [int(v) for v in rng.choice(np.arange(1, 7), size=n, replace=False)]
    objs = _bars(rng, colors, vals)
    steps = [Step(f"The {o.color} bar reaches {o.label}.", i) for i, o in enumerate(objs)]
    order = sorted(range(n), key=lambda i: -vals[i])
    steps.append(Step(f"The tallest is the {colors[order[0]]} bar.", order[0]))
    steps += [Step(f"Next is the {colors[i]} bar.", i) for i in order[1:]]
    q = "Order the bars from tallest to shortest."
    return Scene(seed, "rank_bars", q, steps, " ".join(colors[i] for i in order), objs, f"{n} bars")


def _no_singletons(rng, values, n: int) -> list[str]:
    """`n` draws from 1-3 of `values`, each drawn at least twice: no object is unique in this trait."""
    pool = [str(v) for v in rng.choice(list(values), size=int(rng.integers(1, min(3, n // 2) + 1)), replace=False)]
    out = pool * 2 + [str(rng.choice(pool)) for _ in range(n - 2 * len(pool))]
    rng.shuffle(out)
    return out


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _odd_one_out(rng, seed) -> Scene:
    n = int(rng.integers(7, 10))
    by_color = rng.random() < 0.5
    common, odd = rng.choice(list(COLORS) if by_color else list(SHAPES), size=2, replace=False)
    same = [str(common)] * (n - 1) + [str(odd)]
    rng.shuffle(same)
    # the other trait repeats (every value at least twice), so only one object stands out
    other = _no_singletons(rng, SHAPES if by_color else COLORS, n)
    objs = _place(rng, n, colors=same, shapes=other) if by_color else _place(rng, n, shapes=same, colors=other)
    t = same.index(str(odd))
    steps = [Step(f"I see a {objs[i].color} {objs[i].shape}.", i) for i in _reading_order(objs, range(n))]
    trait = "colour" if by_color else "shape"
    # the majority first, then the odd value, then the object: each step one lookup (the colour of
    # "the one circle" is a lookup in the image; naming the object at once needed two hops)
    steps.append(Step(f"Most are {common if by_color else _plural(str(common))}.", None))
    steps.append(Step(f"Only one is {odd if by_color else f'a {odd}'}.", t))
    steps.append(Step(f"It is the {objs[t].color} {objs[t].shape}.", t))
    q = "Which object is the odd one out?"
    return Scene(seed, "odd_one_out", q, steps, f"{objs[t].color} {objs[t].shape}", objs, trait)


_MAKERS = {
    "attribute": _attribute,
    "counting": _counting,
    "spatial": _spatial,
    "reading": _reading,
    "chart": _chart,
    "existence": _existence,
    "compare_counts": _compare_counts,
    "chain": _chain,
    "sum_boxes": _sum_boxes,
    "rank_bars": _rank_bars,
    "odd_one_out": _odd_one_out,
}


def make_inventory(seed: int) -> Scene:
    """A training-only task: list every object with its attributes, in reading order.

    It supervises the grounding of every object in a scene at once (the six families only
    ground one or two per question), which gets a model trained from scratch past the
    plateau where it ignores the image. Never used for evaluation.
    """
    rng = np.random.default_rng([seed, 99])
    layout = str(rng.choice(["counting", "reading", "chart"], p=[0.5, 0.25, 0.25]))
    objs = _MAKERS[layout](rng, seed).objects
    order = list(range(len(objs))) if layout == "chart" else _reading_order(objs, range(len(objs)))
    steps = []
    for i in order:
        o = objs[i]
        r, c = o.cell
        if o.kind == "bar":
            steps.append(Step(f"The {o.color} bar reaches {o.label}.", i))
        elif o.kind == "box":
            steps.append(Step(f"The {o.color} box in row {r + 1}, column {c + 1} shows {o.label}.", i))
        else:
            steps.append(Step(f"A {o.color} {o.shape} is in row {r + 1}, column {c + 1}.", i))
    return Scene(seed, "inventory", "List every object.", steps, str(len(objs)), objs, layout)


def make_scene(seed: int, family: str | None = None) -> Scene:
    """The scene for `seed`; the family cycles with the seed unless one is named."""
    if family is None:
        family = FAMILIES[seed % len(FAMILIES)]
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    return _MAKERS[family](rng, seed)


def split_of(seed: int) -> str:
    for name, r in SPLITS.items():
        if seed in r:
            return name
    raise ValueError(f"seed {seed} is outside every split")


def scenes(split: str, start: int, n: int, family: str | None = None) -> list[Scene]:
    """`n` scenes from `split`, starting `start` seeds into it. Never crosses splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    r = SPLITS[split]
    if start < 0 or start + n > len(r):
        raise ValueError(f"seeds {start}..{start + n} fall outside the {split} split ({len(r)} seeds)")
    return [make_scene(r[start + i], family) for i in range(n)]
