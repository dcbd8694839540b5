"""Attribution while watching: which frame group and which region each TaYS reasoning step rests on.

    est = load_estimator("assets/estimator-demo.safetensors", vlm, allow_model_mismatch=True)
    with watch(vlm, ShapesSource(make_stream(7)), estimator=est, **run_options(vlm)) as run:
        for ev in run:
            if isinstance(ev, StepScores):   # one per closed reasoning step, while the video plays
                print(ev.text, "-> frame group", ev.top_group, "region", ev.top_region)

The pieces: `tays.capture.StreamRecorder` rides on the engine's decode calls (references only);
`StreamAttributor` is a `tays.paradigms.RunObserver`. When a step closes (its end-of-step token,
or the step cap), the decoding thread queues it. A worker thread (``tays-attr``) then computes, per
frame group the step could see, vSTREAM's region features (the mean over the step's tokens of
each (layer, head)'s attention mass on each region's tokens, `vstream.attr.capture.features_from_sum`),
with the regions from the same clustering as still images (`vstream.attr.regions.compute_regions`
on the group's last frame, pixel backbone at the still images' 6x6 patches per token; identical
frames, as from a still camera, are clustered once). It scores them with an estimator (region scores; a group's score is
its summed region effect) and emits a `StepScores` event.

Why this module may import vstream.attr while the engine core may not: the clustering and the
estimator are vSTREAM's, and attribution over a stream is where the two halves meet. vstream.attr
never imports tays, so the graph stays acyclic (contract in pyproject.toml).
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tays import regions_proc
from tays.capture import AttentionRow, StreamRecorder
from tays.engine import THREAD_PREFIX, StreamingEngine
from tays.mask import FRAME
from tays.metrics import RunResult, StepRecord, TokenRecord
from tays.paradigms import run_paradigm
from tays.sources import FrameSource
from vstream.attr.capture import features_from_sum
from vstream.attr.estimator import LinearEstimator
from vstream.attr.features import DEFAULT, variant_of
from vstream.attr.regions import Backbone, PixelBackbone, Regions, compute_regions, load_backbone
from vstream.model import VLM, VLMError

__all__ = [
    "GroupSeen",
    "StepScores",
    "StreamAttributor",
    "WatchDone",
    "first_score_lead",
    "predictor",
    "raw_attention_scores",
    "step_features",
    "watch",
]

Predictor = Callable[[np.ndarray], np.ndarray]  # (K, L*H) features -> (K,) region scores
MAX_FRAMES_KEPT = 512  # frame groups whose frame stays available for heatmaps (newest kept)


@dataclass(frozen=True)
class GroupSeen:
    """A frame group the worker has regions for (emitted before the first step that uses it)."""

    index: int
    time: float  # stream time of the group (its last frame)
    regions: Regions
    frame: Any  # the group's last frame (PIL image or array), for heatmaps


@dataclass(frozen=True)
class StepScores:
    """One closed reasoning step's attribution over the frame groups it could see."""

    step: int
    text: str
    start: float  # wall seconds since stream start of its first token
    end: float  # ... of its last token (the step closed)
    ready: float  # ... when these scores were emitted
    stream_time: float  # newest frame group its first token saw (-inf: none)
    groups: tuple[int, ...]  # frame groups it could see (absolute indices, oldest first)
    group_times: tuple[float, ...]
    group_scores: np.ndarray  # (G,) summed region effect per group (estimator)
    region_scores: tuple[np.ndarray, ...]  # per group (K_g,) estimator region scores
    raw_group_scores: np.ndarray  # (G,) attention mass per group (raw attention baseline)
    features: tuple[np.ndarray, ...] = ()  # per group (K_g, L*H), when kept
    n_rows: int = 0
    compute_ms: float = 0.0

    @property
    def top_group(self) -> int | None:
        """Absolute index of the frame group the step relied on most (None: it saw none)."""
        return self.groups[int(np.argmax(self.group_scores))] if self.groups else None

    @property
    def top_region(self) -> int | None:
        """Best region of the top group."""
        if not self.groups:
            return None
        return int(np.argmax(self.region_scores[int(np.argmax(self.group_scores))]))

    def scores_of(self, group: int) -> np.ndarray | None:
        return self.region_scores[self.groups.index(group)] if group in self.groups else None


@dataclass(frozen=True)
class WatchDone:
    """Last event: the run's result and every step's scores."""

    result: RunResult | None
    steps: list[StepScores] = field(default_factory=list)
    error: str | None = None


Event = GroupSeen | StepScores | WatchDone


def step_features(rows: list[AttentionRow], regions: dict[int, Regions]) -> dict[int, np.ndarray]:
    """{group: (K_g, L*H) features}: per (layer, head), the mean over the step's rows of the
    attention mass on each region of each group (a row that could not see a group adds 0)."""
    totals: dict[int, np.ndarray] = {}
    for row in rows:
        for g, lo, hi in row.columns():
            part = row.mass[:, :, lo:hi]
            totals[g] = part.copy() if g not in totals else totals[g] + part
    n = len(rows)
    return {
        g: np.asarray(features_from_sum(tot, n, regions[g].assignment.numpy()), dtype=np.float32)
        for g, tot in sorted(totals.items())
        if g in regions
    }


def raw_attention_scores(features: np.ndarray) -> np.ndarray:
    """The raw-attention baseline's region scores: mass summed over layers and heads."""
    return features.sum(-1)


def _pixels(grid: tuple[int, int]) -> PixelBackbone:
    """The default backbone at the still images' patch density: 6x6 colour patches per VLM
    token (the still default, 48 patches across a 448 px, 8-token-wide image). A 224 px frame
    of 4x4 tokens gets a 24x24 grid: Ward costs about a third of the 48x48 one there, and it
    runs while the model decodes."""
    return PixelBackbone(grid=int(min(PixelBackbone.grid, max(8, round(6 * math.sqrt(grid[0] * grid[1]))))))


def _warm_imports() -> None:
    import scipy.sparse  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.feature_extraction.image  # noqa: F401


def predictor(estimator: Any) -> Predictor:
    """Region scores from a group's (K, L*H) features: the estimator's, or raw attention's for None."""
    if estimator is None:
        return raw_attention_scores
    variant = variant_of(estimator)
    if not variant.is_default:  # step_features computes the paper's features only
        raise VLMError(
            f"the estimator reads feature variant {variant.name!r}; attribution while watching computes the "
            f"default ({DEFAULT!r}) only: use an estimator trained on default features"
        )
    if isinstance(estimator, LinearEstimator):
        return estimator.numpy_predictor()
    return lambda f: np.asarray(estimator.predict(f), dtype=np.float32)


class StreamAttributor:
    """`tays.paradigms.RunObserver` that scores every closed reasoning step (module docstring).

    estimator: a `LinearEstimator` (None: raw attention). on_event: called from the worker
    thread with every event (besides `events`, a queue). keep_features: keep each step's
    per-group features on its event (evaluation)."""

    def __init__(
        self,
        estimator: Any = None,
        backbone: Backbone | str | None = None,
        k: int | None = None,
        on_event: Callable[[Event], Any] | None = None,
        keep_features: bool = False,
    ):
        self.predict = predictor(estimator)
        self.backbone = load_backbone(backbone) if isinstance(backbone, str) else backbone  # None: _pixels
        self.k = k
        self.on_event = on_event
        self.keep_features = bool(keep_features)
        self.events: queue.Queue[Event] = queue.Queue()
        self.steps: list[StepScores] = []
        self.regions: dict[int, Regions] = {}
        self.frames: dict[int, Any] = {}
        self.recorder: StreamRecorder | None = None
        self.engine: StreamingEngine | None = None
        self.t0 = 0.0
        self._token_calls: dict[int, int] = {}
        self.step_tokens: dict[int, list[int]] = {}  # step index -> its generated-token indices
        self.step_calls: dict[int, list[int]] = {}  # step index -> the decode calls that produced them
        self.history: list[Any] = []  # the engine's segments, once finished (teacher forcing)
        self.prompt_ids: list[int] = []
        self._reasoning: list[int] = []  # token indices of reasoning tokens, in order
        self._todo: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._grids: dict[int, tuple[int, int]] = {}
        self._by_content: dict[tuple[bytes, tuple[int, int]], Regions] = {}
        self._times: dict[int, float] = {}
        self.error: BaseException | None = None

    # -- RunObserver (decoding thread, except attach) -------------------------------------------
    def attach(self, engine: StreamingEngine, t0: float) -> None:
        _warm_imports()  # before the question: the clustering's first call would import them
        if self.backbone is None:
            regions_proc.prewarm()
        self.engine, self.t0 = engine, t0
        self.recorder = StreamRecorder.for_engine(engine)
        engine.attach(self.recorder)
        self._thread = threading.Thread(target=self._work, name=THREAD_PREFIX + "attr", daemon=True)
        self._thread.start()

    def on_token(self, rec: TokenRecord) -> None:
        self._token_calls[rec.index] = self.recorder.n_calls - 1
        if rec.phase == "reasoning":
            self._reasoning.append(rec.index)

    def on_step(self, step: StepRecord) -> None:
        toks = self._reasoning[-step.n_tokens :]
        calls = [self._token_calls[i] for i in toks]
        self.step_tokens[step.index], self.step_calls[step.index] = toks, calls
        self._todo.put((step, calls))

    def finish(self, engine: StreamingEngine) -> None:
        """Score the steps still queued, then stop the worker (joined here)."""
        self._todo.put(None)
        if self._thread is not None:
            self._thread.join()
        self.history, self.prompt_ids = engine.segments(), list(engine.prompt_ids)

    # -- worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._score(*item)
            except BaseException as e:  # reported on WatchDone; the run itself goes on
                self.error = e

    def _emit(self, ev: Event) -> None:
        self.events.put(ev)
        if self.on_event is not None:
            self.on_event(ev)

    def _grid(self, g: int) -> tuple[tuple[int, int], float]:
        if g not in self._grids:
            for s in self.engine.segments():
                if s.kind == FRAME and s.index is not None:
                    self._grids[s.index], self._times[s.index] = tuple(s.grid), float(s.time)
        return self._grids[g], self._times[g]

    def _regions(self, g: int) -> Regions | None:
        if g in self.regions:
            return self.regions[g]
        got = self.recorder.take_frame(g)
        if got is None:
            return None
        frame, _ = got
        grid, t = self._grid(g)
        # a still camera repeats frames: cluster each distinct frame once (Ward costs ~0.2 s)
        key = (hashlib.blake2b(np.asarray(frame).tobytes(), digest_size=16).digest(), grid)
        r = self._by_content.get(key)
        if r is None:
            if self.backbone is None:  # the default pixels: clustered off this interpreter (tays.regions_proc)
                r = regions_proc.regions(frame, grid, self.k, _pixels(grid).grid)
            else:
                r = compute_regions(frame, grid, k=self.k, backbone=self.backbone)
            self._by_content[key] = r
            while len(self._by_content) > MAX_FRAMES_KEPT:
                del self._by_content[next(iter(self._by_content))]
        self.regions[g] = r
        self.frames[g] = frame
        for old in [i for i in self.frames if i <= g - MAX_FRAMES_KEPT]:
            del self.frames[old]
        self._emit(GroupSeen(g, t, r, frame))
        return r

    def _score(self, step: StepRecord, calls: list[int]) -> None:
        t_start = time.perf_counter()
        rows = self.recorder.rows(calls)
        seen = sorted({g.index for row in rows for g in row.groups})
        regions = {g: r for g in seen if (r := self._regions(g)) is not None}
        feats = step_features(rows, regions)
        groups = tuple(feats)
        scores = tuple(np.asarray(self.predict(feats[g]), dtype=np.float32).reshape(-1) for g in groups)
        ev = StepScores(
            step=step.index,
            text=step.text,
            start=step.start,
            end=step.end,
            ready=time.perf_counter() - self.t0,
            stream_time=step.stream_time,
            groups=groups,
            group_times=tuple(self._grid(g)[1] for g in groups),
            group_scores=np.array([s.sum() for s in scores], dtype=np.float32),
            region_scores=scores,
            raw_group_scores=np.array([raw_attention_scores(feats[g]).sum() for g in groups], dtype=np.float32),
            features=tuple(feats[g] for g in groups) if self.keep_features else (),
            n_rows=len(rows),
            compute_ms=(time.perf_counter() - t_start) * 1000,
        )
        self.steps.append(ev)
        self._emit(ev)


@contextmanager
def watch(
    vlm: VLM,
    source: FrameSource,
    question: str | None = None,
    estimator: Any = None,
    backbone: Backbone | str | None = None,
    stop_event: threading.Event | None = None,
    **run_kw: Any,
) -> Iterator[Iterator[Event]]:
    """Run TaYS over `source` with attribution; yields an iterator of events (`GroupSeen`,
    `StepScores`, then one `WatchDone`) that ends with the run. Leaving the block early stops the
    run and joins its threads. run_kw: `tays.paradigms.run_paradigm` options."""
    stop = stop_event or threading.Event()
    att = StreamAttributor(estimator, backbone=backbone)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = run_paradigm(
                vlm, source, question, paradigm="tays", observer=att, stop_event=stop, **run_kw
            )
        except BaseException as e:
            box["error"] = f"{type(e).__name__}: {e}"
        finally:
            att.events.put(
                WatchDone(
                    box.get("result"),
                    list(att.steps),
                    box.get("error") or (None if att.error is None else f"attribution: {att.error}"),
                )
            )

    th = threading.Thread(target=run, name=THREAD_PREFIX + "watch", daemon=True)
    th.start()

    def events() -> Iterator[Event]:
        while True:
            ev = att.events.get()
            yield ev
            if isinstance(ev, WatchDone):
                return

    try:
        yield events()
    finally:
        stop.set()
        th.join()


def first_score_lead(done: WatchDone) -> float:
    """Seconds between the first step's scores and the end of the stream (> 0: while it played)."""
    r = done.result
    if r is None or not done.steps or not math.isfinite(r.stream_end):
        return math.nan
    return r.stream_end - done.steps[0].ready
