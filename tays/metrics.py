"""Wall-clock metrics of a streaming run (issue item 6), computed from what the runner recorded.

Every time here is a `time.perf_counter()` reading taken by the runner at the moment something
happened, expressed in seconds since the stream started (stream time 0 = wall time 0 of the run).
Nothing is computed from two timestamps taken inside one call: the time of a token is read after
the forward pass that produced its logits and the argmax, so TTFT includes the real work (prompt
prefill, frame ingestion where the paradigm waits for it, the decode step).

* ``ttft_s``: stream start -> first generated token.
* ``ttft_question_s``: question arrival (the moment the runner is handed the question, before
  any prefill) -> first generated token.
* ``delay_s``: stream start -> the final answer token (the last token of the answer phase).
* ``decode_tokens_per_s``: generated tokens / wall seconds spent in the decode forward passes
  that produced them (waiting for frames is not decoding, so it is excluded).
* ``frames_per_s``: frames ingested / wall seconds spent ingesting them (vision tower + LLM
  prefill of each frame group, as timed around the work; TaYS: by the ingestion thread).
* ``ingest_lag_max_s``: the longest time from a frame group's last frame arriving (or, for frames
  that came before the question, from the question's arrival) to the group being usable by
  decoding: whether ingestion kept up with the stream (batch: it waits for the end by design).
* ``event_deviation_s``: mean |emission time - event time| over reasoning steps matched to a
  ground-truth event (rule in `match_event`), in stream seconds (wall seconds x replay speed).
* ``decode_step_ms_p50/p95``: latency of single-token decode forward passes of the run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tays.sources import EventTruth

__all__ = [
    "DecodeCall",
    "GroupRecord",
    "RunResult",
    "StepRecord",
    "TokenRecord",
    "compute_metrics",
    "event_deviation",
    "match_event",
    "overlap",
    "percentile",
]


@dataclass
class TokenRecord:
    index: int  # 0-based among generated tokens
    token_id: int
    text: str  # decoded piece ("" inside a multi-byte character)
    wall: float  # seconds since stream start, after the step that produced it
    phase: str  # "reasoning" or "answer"
    frames_seen: int  # frame groups visible to the step that produced it
    stream_time: float  # stream time of the newest visible group (-inf: none)


@dataclass
class StepRecord:
    """A reasoning step: a sentence closed by '.', the end-of-step token, or the step cap."""

    index: int
    text: str
    start: float  # wall (s since stream start) of its first token
    end: float  # wall of its last token
    n_tokens: int
    frames_seen: int
    stream_time: float
    closed_by: str  # "period", "eot", "cap" or "budget"


@dataclass
class DecodeCall:
    start: float
    end: float
    n_fed: int  # tokens fed (1 for a plain decode step)
    produced: bool = True  # its logits gave a generated token
    ingesting: bool = False  # an ingestion of a frame group overlapped it (TaYS)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class GroupRecord:
    index: int
    time: float  # stream time of the group (its last frame)
    n_frames: int  # real frames (a padded last group has 1)
    arrived: float  # wall when its last frame arrived
    start: float  # wall when ingestion of it began
    end: float  # wall when decoding could use it
    encode_s: float = math.nan  # vision tower part


@dataclass
class RunResult:
    paradigm: str
    fps: float
    question: str
    speed: float = 1.0
    question_at: float = 0.0  # wall (s since stream start) when the question arrived
    stream_end: float = math.nan  # wall when the source ended
    tokens: list[TokenRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    decode_calls: list[DecodeCall] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    frames_received: int = 0
    frames_rejected: int = 0
    messages: list[str] = field(default_factory=list)  # rejected frames, early stops, ...
    events: list[EventTruth] | None = None
    stopped: bool = False
    video_capacity_max: int = 0  # TaYS: largest video-cache buffer (tokens) seen
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def reasoning(self) -> str:
        return "".join(t.text for t in self.tokens if t.phase == "reasoning")

    @property
    def answer(self) -> str:
        return "".join(t.text for t in self.tokens if t.phase == "answer")

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = {
            "paradigm": self.paradigm,
            "fps": self.fps,
            "question": self.question,
            "speed": self.speed,
            "question_at": self.question_at,
            "stream_end": self.stream_end,
            "text": self.text,
            "answer": self.answer,
            "frames_received": self.frames_received,
            "frames_rejected": self.frames_rejected,
            "messages": list(self.messages),
            "stopped": self.stopped,
            "metrics": dict(self.metrics),
        }
        if full:
            d["tokens"] = [asdict(t) for t in self.tokens]
            d["steps"] = [asdict(s) for s in self.steps]
            d["decode_calls"] = [asdict(c) for c in self.decode_calls]
            d["groups"] = [asdict(g) for g in self.groups]
        return finite_json(d)


def finite_json(x: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def overlap(a: float, b: float, spans: Sequence[tuple[float, float]]) -> float:
    """Seconds of [a, b] covered by the (disjoint) `spans`."""
    return sum(max(0.0, min(b, e) - max(a, s)) for s, e in spans if s < b and e > a)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    v = sorted(float(x) for x in values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------
# reasoning-event deviation

_WORD = re.compile(r"[a-z]+")
_VERBS = {
    "appear": "appear",
    "appears": "appear",
    "appeared": "appear",
    "move": "move",
    "moves": "move",
    "moved": "move",
    "turn": "recolor",
    "turns": "recolor",
    "turned": "recolor",
    "disappear": "disappear",
    "disappears": "disappear",
    "disappeared": "disappear",
}


def _words(text: str) -> set[str]:
    out = set()
    for w in _WORD.findall(text.lower()):
        out.add(w)
        if len(w) > 3 and w.endswith("s"):
            out.add(w[:-1])  # "circles" -> "circle"
    return out


def match_event(step_text: str, step_time: float, events: Sequence[EventTruth]) -> EventTruth | None:
    """The ground-truth event a reasoning step describes, by the words that name its object.

    Rule: (1) candidates are the events whose object's shape word occurs in the step (shapes are
    unique within a shapes-world stream); none -> the step is unmatched. (2) If the step names a
    colour, keep the candidates whose object had that colour around the event (before or after
    it), unless that leaves none. (3) If the step has an event verb (appear(s), move(s), turn(s),
    disappear(s)), keep candidates of that kind, unless that leaves none. (4) Of what remains,
    the event nearest in time to the step.
    """
    words = _words(step_text)
    cands = [e for e in events if e.shape and e.shape.lower() in words]
    if not cands:
        return None
    named = {c for e in events for c in e.colors if c in words}
    if named:
        by_color = [e for e in cands if named & set(e.colors)]
        cands = by_color or cands
    kinds = {_VERBS[w] for w in words if w in _VERBS}
    if kinds:
        by_kind = [e for e in cands if e.kind in kinds]
        cands = by_kind or cands
    return min(cands, key=lambda e: (abs(e.time - step_time), e.time))


def event_deviation(
    steps: Sequence[StepRecord], events: Sequence[EventTruth] | None, speed: float = 1.0
) -> tuple[float | None, int]:
    """(mean |step emission - event time| in stream seconds, number of matched steps)."""
    if not events:
        return None, 0
    devs = []
    for s in steps:
        t = s.end * speed
        e = match_event(s.text, t, events)
        if e is not None:
            devs.append(abs(t - e.time))
    return (sum(devs) / len(devs) if devs else None), len(devs)


# ----------------------------------------------------------------------------------------------


def compute_metrics(r: RunResult) -> dict[str, Any]:
    """The metrics of one run (see the module docstring); also stored in `r.metrics`."""
    first = r.tokens[0].wall if r.tokens else None
    answer = [t for t in r.tokens if t.phase == "answer"]
    last = answer[-1].wall if answer else (r.tokens[-1].wall if r.tokens else None)
    dec_s = sum(c.seconds for c in r.decode_calls if c.produced)
    single = [c.seconds * 1000 for c in r.decode_calls if c.n_fed == 1]
    frames = sum(g.n_frames for g in r.groups)
    ingest_s = sum(g.end - g.start for g in r.groups)
    dev, n_matched = event_deviation(r.steps, r.events, r.speed)
    m = {
        "ttft_s": first,
        "ttft_question_s": None if first is None else first - r.question_at,
        "delay_s": last,
        "decode_tokens_per_s": (len(r.tokens) / dec_s) if dec_s > 0 else None,
        "frames_per_s": (frames / ingest_s) if ingest_s > 0 else None,
        "event_deviation_s": dev,
        "steps_matched": n_matched,
        "tokens": len(r.tokens),
        "answer_tokens": len(answer),
        "reasoning_steps": len(r.steps),
        "frames": frames,
        "frame_groups": len(r.groups),
        "frames_rejected": r.frames_rejected,
        "question_at_s": r.question_at,
        "stream_end_s": r.stream_end,
        "ingest_lag_max_s": max((g.end - max(g.arrived, r.question_at) for g in r.groups), default=None),
        "decode_step_ms_p50": percentile(single, 50),
        "decode_step_ms_p95": percentile(single, 95),
    }
    r.metrics = finite_json(m)
    return r.metrics
