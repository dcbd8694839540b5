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

SIZE = 224  # 4x4 LLM tokens for the demo Qwen2.5-VL (56 px each)
GRID = 4  # objects sit in a 4x4 grid of 56 px cells (one demo-model token each)
CELL = SIZE // GRID

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
FAMILIES = ("attribute", "counting", "spatial", "reading", "chart", "existence")
# The paper's task categories these stand in for.
PAPER_CATEGORY = {
    "attribute": "General",
    "counting": "Math",
    "spatial": "Science",
    "reading": "Document",
    "chart": "Code",
    "existence": "Hallucination probe",
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

    @property
    def trace(self) -> str:
        """The target assistant text: `<think> step. step. </think> answer`."""
        return "<think> " + " ".join(s.text for s in self.steps) + " </think> " + self.answer

    def image(self) -> Image.Image:
        return render(self.objects, chart=self.family == "chart")

    def mask(self, i: int) -> np.ndarray:
        """Boolean (SIZE, SIZE) mask of object i."""
        m = Image.new("L", (SIZE, SIZE), 0)
        _draw_obj(ImageDraw.Draw(m), self.objects[i], fill=255, outline=255)
        return np.asarray(m) > 0

    def step_boxes(self) -> list[tuple[int, int, int, int] | None]:
        return [None if s.obj is None else self.objects[s.obj].box for s in self.steps]

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "family": self.family,
            "kind": self.kind,
            "question": self.question,
            "trace": self.trace,
            "answer": self.answer,
            "steps": [{"text": s.text, "obj": s.obj} for s in self.steps],
            "objects": [vars(o) | {"box": list(o.box)} for o in self.objects],
        }


# ----------------------------------------------------------------------------- rendering


@functools.cache
def background() -> Image.Image:
    # A gentle gradient: red grows to the right, green grows downwards. It gives the vision
    # encoder an absolute position cue (like lighting in a real photo).
    x = np.linspace(0, 1, SIZE, dtype=np.float32)
    bg = np.empty((SIZE, SIZE, 3), np.float32)
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


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill=None, outline=None) -> None:
    rgb = COLORS[o.color]
    x0, y0, x1, y1 = o.box
    if o.kind == "shape":
        draw_shape(draw, o.shape, o.box, fill=fill or rgb, outline=outline)
    elif o.kind == "bar":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill or rgb)
    else:  # a coloured frame with a digit inside; the mask is the whole box
        if fill is not None:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            return
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(250, 250, 250), outline=rgb, width=5)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), o.label, fill=(0, 0, 0), font=_font(34), anchor="mm")


def render(objects: list[Obj], chart: bool = False) -> Image.Image:
    img = background().copy()
    draw = ImageDraw.Draw(img)
    if chart:
        for v in range(1, 7):
            y = CHART_BASE - v * CHART_UNIT
            draw.line((8, y, SIZE - 8, y), fill=(170, 170, 170), width=1)
        draw.line((8, CHART_BASE, SIZE - 8, CHART_BASE), fill=(40, 40, 40), width=3)
    for o in objects:
        _draw_obj(draw, o)
    return img


# ----------------------------------------------------------------------------- scenes


def _place(rng: np.random.Generator, n: int, shapes=None, colors=None, kind="shape") -> list[Obj]:
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


def _chart(rng, seed) -> Scene:
    n = int(rng.integers(3, 5))
    colors = list(rng.choice(list(COLORS), size=n, replace=False))
    slot = (SIZE - 16) // n
    objs = []
    for i, c in enumerate(colors):
        v = int(rng.integers(1, 7))
        w = int(rng.integers(slot // 2, slot * 3 // 4))
        x0 = 8 + i * slot + (slot - w) // 2
        objs.append(Obj("bar", "bar", str(c), (x0, CHART_BASE - v * CHART_UNIT, x0 + w, CHART_BASE), str(v)))
    vals = [int(o.label) for o in objs]
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


_MAKERS = {
    "attribute": _attribute,
    "counting": _counting,
    "spatial": _spatial,
    "reading": _reading,
    "chart": _chart,
    "existence": _existence,
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
