"""Live attribution: typed events while the model is still writing (vSTREAM's async worker).

    session = attribute_stream(vlm, image, question, estimator)
    for ev in session:            # RegionsEvent, then TokenEvent / SpanEvent / PathEvent, DoneEvent
        ...

Producer-consumer, three threads, one output queue:

* the generation thread (`vstream-attr-generate`) runs `model.generate` under `vlm.lock` with
  attention capture on (`vstream.attr.capture`). Its streamer callback, called synchronously
  inside `generate` for every new token, only puts the token ids on a queue, as plain
  `vlm.stream` does: on a small model decoding is bound by Python under the GIL, and any work
  between two decode steps is decode time. It hands them over in groups of up to
  `TOKEN_BATCH`, at once for the first token and around tokens that can end a span, so the
  token thread wakes (and takes the GIL and a core) about half as often. Holding `vlm.lock`
  around both the capture and the generation is what keeps a concurrent generation on the
  same model (another user, another session) out of our recorder: it waits for the lock instead.
* the token thread (`vstream-attr-tokens`) takes the ids in order, decodes their text, emits a
  `TokenEvent` and feeds the `SpanSplitter`; every span a token closes goes, with its close
  time, to the span worker. When generation ends, the generation thread waits for it before
  closing the last span.
* the span worker turns a closed span into region scores: mean of the span's (L, H, N) rows x
  assignment (N, K) -> (K, L*H) features (`capture.features_from_sum`; for an estimator trained
  on another `vstream.attr.features` variant, that variant, from the span's rows and the value
  weights the recorder took at prefill) -> `estimator.predict` -> (K,) scores; then one
  `DynamicsTracker.add`. The heatmap (a separable lookup of precomputed region ids,
  `Regions.pixel_index`) is painted when a consumer first reads `SpanEvent.heatmap`: the
  explorer draws from the scores, and painting every span was a third of this process's
  per-span work. It runs in one of two places (`session.worker_mode`):

  - "process" (a float32 model on the CPU with a `LinearEstimator`: the demo setup): the
    attribution process (`vstream.attr.liveproc`), so that none of it holds the GIL that
    `generate`'s Python needs. The token thread keeps a closed span until the decode step
    that records its last row, then copies the span's decode queries and the new key columns
    into memory shared with the process (`AttentionRecorder.export`) and sends a short message.
    No thread here waits for the answers: after each token the token thread looks at a counter
    the process keeps in the shared memory and turns the answers that came into events (so an
    answer wakes nobody and waits at most one decode step); after generation the generation
    thread takes the rest. Per span this interpreter does tens of microseconds of copying
    instead of ~0.5 ms of arithmetic, and nothing but the token thread wakes per token. When
    generation ends the recorder adopts the rows the process computed (`AttentionRecorder.adopt`),
    so `compute_span` replays to the same numbers.
  - "thread" (anything else: a GPU, another estimator, or when the process cannot start): the
    worker thread (`vstream-attr-worker`) takes spans off a queue, waits until the recorder holds
    the span's rows and computes there. It runs its torch ops on one thread
    (`_one_torch_thread_here`), so they do not wait at OpenMP barriers for the cores generation
    holds. On the demo model that is ~1.4 ms of CPU per span (bench:
    `vstream_inflight_cpu_s_per_span`).

  (`vlm.stream` is not used because its generation thread takes `vlm.lock` itself, after our
  capture would already be attached.)
* the consumer iterates the session; the output queue is filled by the threads as things
  happen, so events arrive in time order. After generation ends the generation thread closes
  the open span, waits for the worker and emits the `DoneEvent` last.

Which attention rows a span uses (see `vstream.attr.capture`'s alignment convention): row i is the
attention of generated token i's own query, recorded at the decode step that feeds token i back,
i.e. one step after the token itself. So a span closed by token t waits for one more decode step
(row t) before it is scored: span latency = that step + the compute. The last generated token is
never fed back: when generation ends at eos every visible token has its row, but when it is cut
(max_new_tokens, a stop) the last token has none, and the final span uses the rows that exist.
If none of the final span's tokens has a row (a one-token last span), it borrows the last
recorded row (the attention at the step that produced that token) and says so in `note`; with no
row at all (a single generated token) its scores are zeros, also noted.

Stopping: `stop_event` (or `session.cancel()`) stops generation at the next token; the spans
closed so far and the open one are still scored (no waiting then, a few ms), and the DoneEvent
says `cancelled=True`. `session.close()` (also on `with` exit and when the iterator is closed
early) aborts: generation stops, queued spans are dropped, and both threads are joined before it
returns, so nothing is left running (the attribution process is one per Python process, idle
between sessions, and exits with it); a session dropped without close() aborts its threads when it
is garbage-collected (they hold only its inner state, never the session). Setup (inputs,
regions, an estimator probe) runs when the session is created, so bad input raises a one-line
`VLMError` before any thread exists. Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from vstream.attr import rowmath
from vstream.attr.capture import AttentionRecorder, capturing, install, span_features
from vstream.attr.dynamics import DynamicsTracker, PathPoint, label_trace
from vstream.attr.estimator import Estimator, LinearEstimator
from vstream.attr.features import variant_of
from vstream.attr.liveproc import Channel, LiveProcessError, Shapes, current_cpu, prewarm
from vstream.attr.regions import Backbone, Regions, regions_for
from vstream.attr.risk import RiskModel, point_features
from vstream.attr.spans import Span, SpanSplitter, span_end_tokens
from vstream.model import VLM, IncrementalDecoder, VLMError, event_stop, split_thinking, token_streamer

__all__ = [
    "AttributionSession",
    "DoneEvent",
    "Event",
    "PathEvent",
    "RegionsEvent",
    "SpanEvent",
    "TokenEvent",
    "attribute_stream",
]

TOP_REGIONS = 5  # SpanEvent.top_regions length (at most K)
TOKEN_BATCH = 4  # generated ids handed to the token thread at a time, between span ends
_END = object()
_POLL_S = 0.01  # how often a worker waiting for rows re-checks "generation over / aborted"


# ----------------------------------------------------------------------------------------------
# events


@dataclass
class RegionsEvent:
    """First event: the K regions (draw `regions.outlines(image_size)`), before any token."""

    regions: Regions
    image_size: tuple[int, int]  # (w, h) of the image as the user gave it
    start_time: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. why K is smaller than asked


@dataclass
class TokenEvent:
    index: int  # 0-based generated token index (eos never appears)
    token_id: int
    text: str  # decoded piece ("" while a multi-byte character is incomplete)
    time: float


class HeatmapPainter:
    """(K,) scores -> (H, W) float32 map at the image's size, each pixel its region's score, from
    the separable pixel map (`Regions.pixel_index`): the small (H, w) gather in numpy, the column
    gather as one torch op, which releases the GIL while it fills the fresh (H, W) array. Its page
    faults are most of the cost (800 KB for a 448 px map), and numpy keeps the GIL through a
    gather of fewer than 500 columns."""

    def __init__(self, regions: Regions, size: tuple[int, int]):
        self.row_labels, cols = regions.pixel_index(size)
        self.cols = torch.from_numpy(cols)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return torch.index_select(torch.from_numpy(scores[self.row_labels]), 1, self.cols).numpy()


@dataclass
class SpanEvent:
    """One scored span. `heatmap` is painted when first read: the explorer draws its overlays
    from `scores`, and painting every span (an image-sized array each) while generation runs
    was a third of this process's per-span work."""

    span: Span  # text, kind, token_start/token_end, ...
    scores: np.ndarray  # (K,) float32 predicted ablation effect per region
    top_regions: list[int]  # region ids, highest score first (at most TOP_REGIONS)
    span_end_time: float  # when the token closing the span arrived
    emitted_time: float  # when the scores were put on the output queue
    latency_ms: float  # emitted_time - span_end_time (includes waiting one step for the rows)
    compute_ms: float = 0.0  # worker compute only (features + predict + dynamics; not the heatmap)
    scores_ms: float = 0.0  # of which the attribution itself (features + predict)
    compute_cpu_ms: float = 0.0  # CPU time of the worker (thread or process) for it (excludes GIL/lock waits)
    n_rows: int = 0  # attention rows (tokens) the features average over
    rows: tuple[int, int] = (0, 0)  # [lo, hi) recorder rows used (= the span's tokens unless noted)
    note: str = ""  # set when the rows are not exactly the span's tokens
    painter: HeatmapPainter | None = field(default=None, repr=False, compare=False)

    @cached_property
    def heatmap(self) -> np.ndarray:
        """(H, W) float32 at the original image size: each pixel is its region's score."""
        if self.painter is None:
            raise ValueError("this SpanEvent was made without a painter: no heatmap")
        return self.painter(self.scores)


@dataclass
class PathEvent:
    point: PathPoint  # coords (3,), path (n, 3), path_length, tortuosity, concentration, label
    time: float
    risk: float | None = None  # P(failure) from the dynamics so far, when a risk model is given


@dataclass
class DoneEvent:
    """Last event. `tokens_per_s` is the decode rate: (n_tokens - 1) / (last - first token time)."""

    text: str
    answer: str  # text after </think> ("" if thinking never ended; all text for non-thinking output)
    label: str  # Fixation / Wandering / stable (vstream.attr.dynamics.label_trace over all spans)
    n_tokens: int
    n_spans: int
    tokens_per_s: float
    cancelled: bool
    error: str | None = None
    risk: float | None = None  # P(failure) after the last span, when a risk model is given
    token_ids: list[int] = field(default_factory=list)
    gen_start_time: float = 0.0  # generate() called (prefill starts)
    first_token_time: float = 0.0
    gen_end_time: float = 0.0  # generate() returned
    time: float = 0.0


Event = RegionsEvent | TokenEvent | SpanEvent | PathEvent | DoneEvent


# ----------------------------------------------------------------------------------------------
# helpers


def _estimator_target(estimator: Estimator) -> tuple[torch.device, torch.dtype]:
    """Device and float dtype of a torch estimator's weights (CPU float32 for anything else)."""
    if isinstance(estimator, torch.nn.Module):
        for t in list(estimator.parameters()) + list(estimator.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.float32


_threads_lock = threading.Lock()


def _one_torch_thread_here() -> None:
    """Run this thread's torch ops on one core, leaving the process default alone.

    The worker's ops are tiny. With torch's default OpenMP team (all cores) each one waits at a
    barrier for a core the generation thread holds: on 2 busy cores, materialising 6 attention
    rows took 1.3-3 ms of CPU and 5-9 ms of wall time instead of 0.4 ms, and slowed decoding.
    `torch.set_num_threads` is per-thread for OpenMP and MKL, but it also sets the default that
    threads starting later adopt, so a short-lived thread puts the default back."""
    with _threads_lock:
        default = torch.get_num_threads()  # this thread's count, initialised from the default
        if default == 1:
            return
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="vstream-threads")
        restore.start()
        restore.join()


def _linear_on_cpu(estimator: Estimator) -> bool:
    """A `LinearEstimator` (or a subclass keeping its predict) on the CPU: scored in numpy."""
    return (
        isinstance(estimator, LinearEstimator)
        and type(estimator).predict is LinearEstimator.predict
        and estimator.weight.device.type == "cpu"
    )


def _process_can_score(vlm: VLM, estimator: Estimator) -> bool:
    """Whether the attribution process can score this session's spans: everything it needs is
    numpy (a float32 model on the CPU, a linear estimator on the CPU)."""
    return _linear_on_cpu(estimator) and vlm.device.type == "cpu" and vlm.dtype == torch.float32


def _rows_for(span: Span, have: int) -> tuple[int, int, str]:
    """The recorder rows [lo, hi) a span is scored on when `have` rows exist, and why they
    differ from the span's tokens, if they do (see the module docstring)."""
    lo, hi = span.token_start, min(span.token_end, have)
    if hi <= lo:
        if have == 0:
            return 0, 0, "no attention row was recorded (a single generated token): scores are zeros"
        return (
            have - 1,
            have,
            f"tokens {span.token_start}..{span.token_end - 1} have no recorded row (generation "
            f"stopped before feeding them back): used the last recorded row ({have - 1})",
        )
    if hi < span.token_end:
        missing = span.token_end - hi
        return lo, hi, f"{missing} last token(s) without a recorded row (generation stopped): {hi - lo} used"
    return lo, hi, ""


# ----------------------------------------------------------------------------------------------
# the session


class _Run:
    """The state both threads share. The consumer-facing `AttributionSession` wraps it, so the
    threads never reference the session object itself and dropping a session can stop them."""

    def __init__(
        self,
        vlm: VLM,
        image: Any,
        question: str,
        estimator: Estimator,
        k: int | None = None,
        backbone: Backbone | str | None = None,
        max_new_tokens: int = 256,
        stop_event: threading.Event | None = None,
        *,
        regions: Regions | None = None,
        splitter: Any = None,
        system: str | None = None,
        row_timeout: float = 30.0,
        risk: RiskModel | None = None,
        process: bool | None = None,
    ):
        if not callable(getattr(estimator, "predict", None)):
            raise VLMError(f"estimator must have a predict(features) method, got {type(estimator).__name__}")
        if image is None:
            raise VLMError("live attribution needs an image")
        self.vlm = vlm
        self.estimator = estimator
        self.max_new_tokens = int(max_new_tokens)
        self._gen_kwargs = vlm.generation_kwargs(self.max_new_tokens, False, 1.0)  # validates
        self.inputs = vlm.build_inputs(question, image=image, system=system)
        if process is not False and _process_can_score(vlm, estimator):
            with contextlib.suppress(LiveProcessError):
                prewarm()  # its imports overlap the region clustering below
        self.regions = regions if regions is not None else regions_for(self.inputs, k=k, backbone=backbone)
        n = int(self.inputs.image_token_positions.numel())
        if tuple(self.regions.assignment.shape) != (self.regions.k, n):
            raise VLMError(f"regions map onto {self.regions.assignment.shape[1]} tokens, the inputs have {n}")
        self.image_size = tuple(int(v) for v in self.regions.image_size)
        assignment = self.regions.assignment.to(vlm.device, torch.float32)  # (K, N)
        # numpy on the CPU: the span's features and scores then need no torch call at all
        self._assignment = assignment.numpy() if assignment.device.type == "cpu" else assignment
        self.painter = HeatmapPainter(self.regions, self.image_size)
        self._est_device, self._est_dtype = _estimator_target(estimator)
        self._linear_np = None  # the probe goes through estimator.predict and its own checks
        self.variant = variant_of(estimator)  # the features the estimator was trained on
        self.feature_dim = self.variant.blocks * int(vlm.num_layers) * int(vlm.num_heads)
        try:
            self._predict(np.zeros((self.regions.k, self.feature_dim), dtype=np.float32))
        except VLMError as e:
            raise VLMError(f"the estimator does not fit this model: {e}") from e
        except Exception as e:
            raise VLMError(
                f"the estimator does not fit this model ({self.regions.k} regions x {self.feature_dim} = "
                f"{self.variant.name} features of {vlm.num_layers} layers x {vlm.num_heads} heads): "
                f"{type(e).__name__}: {e}"
            ) from e
        if _linear_on_cpu(estimator):
            self._linear_np = estimator.numpy_predictor()  # shapes checked by the probe above
        can = _process_can_score(vlm, estimator)
        if process and not can:
            raise VLMError("process=True needs a float32 model on the CPU and a LinearEstimator on the CPU")
        self.worker_mode = "process" if (can if process is None else process) else "thread"
        self.worker_note = ""

        self.recorder = AttentionRecorder.for_vlm(vlm, values=[self.variant.values] if self.variant.values else [])
        self.tracker = DynamicsTracker()
        self.risk_model = risk
        self._points: list[PathPoint] = []
        self._risk: float | None = None
        self._splitter = splitter if splitter is not None else SpanSplitter()
        # generation -> token thread: ids gathered since the last hand-over (`_hand_over`)
        self._batch: list[int] = []
        self._span_ends = span_end_tokens(vlm.tokenizer) if type(self._splitter) is SpanSplitter else None
        self._flush, self._handed, self._n_ids = 0, False, 0
        self._user_stop = stop_event
        self._stop = threading.Event()  # cancel(): stop generating, still score what closed
        self._abort = threading.Event()  # close(): stop everything, drop queued spans
        self._gen_done = threading.Event()
        self._worker_ready = threading.Event()
        # SimpleQueue: a put is one C call, where queue.Queue's takes a Condition in Python
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._spans: queue.SimpleQueue = queue.SimpleQueue()
        self.row_timeout = float(row_timeout)
        self._eos = set(vlm.eos_token_ids)
        self._saw_eos = False
        self.token_ids: list[int] = []
        self._pieces: list[str] = []
        self._n_spans = 0
        self._token_times: list[float] = []
        self._gen_start = self._gen_end = 0.0
        self._error: str | None = None
        self._started = self._finished = False
        self._gen_thread: threading.Thread | None = None
        self._worker_thread: threading.Thread | None = None
        self._token_thread: threading.Thread | None = None
        self._ids: queue.SimpleQueue = queue.SimpleQueue()  # generation -> token thread: new ids
        self._gen_cpu = -1  # the core generation last ran on
        # process mode: spans closed but not yet sent (their last row comes one step later),
        # rows [0, _sent_rows) and key positions [0, _sent_keys) already in the shared buffers
        self._channel: Channel | None = None
        self._waiting: collections.deque[tuple[Span, float]] = collections.deque()
        self._inflight: dict[int, tuple[Span, float, int, int, str]] = {}
        self._sent_rows = self._sent_keys = self._rows_done = 0
        self._sent_values = False  # the value weights (taken at prefill) go with the first span

    # -- public control ------------------------------------------------------------------------
    def start(self) -> _Run:
        if self._started:
            return self
        self._started = True
        self._out.put(RegionsEvent(self.regions, self.image_size, time.perf_counter(), list(self.regions.notes)))
        if self.worker_mode == "process":
            try:
                self._channel = self._open_channel()
            except LiveProcessError as e:  # scored here instead, slower but the same events
                self.worker_mode, self.worker_note = "thread", str(e)
                print(f"vstream: live attribution runs in a thread: {e}", file=sys.stderr)
        if self._channel is None:  # process mode needs no thread here: the token thread relays
            self._worker_thread = threading.Thread(target=self._work, name="vstream-attr-worker", daemon=True)
            self._worker_thread.start()
            self._worker_ready.wait(5.0)  # its thread setting is done before generation starts
        self._gen_thread = threading.Thread(target=self._generate, name="vstream-attr-generate", daemon=True)
        self._token_thread = threading.Thread(target=self._tokens, name="vstream-attr-tokens", daemon=True)
        self._token_thread.start()
        self._gen_thread.start()
        return self

    def cancel(self) -> None:
        """Stop generating at the next token; closed spans are still scored, then DoneEvent."""
        self._stop.set()

    def close(self) -> None:
        """Abort and join both threads (idempotent). Pending events are discarded."""
        if self._started and not self._finished:
            self._abort.set()
            self._stop.set()
        self._join()
        self._finished = True

    @property
    def running(self) -> bool:
        return any(t is not None and t.is_alive() for t in (self._gen_thread, self._token_thread, self._worker_thread))

    # -- iteration -----------------------------------------------------------------------------
    def next_event(self) -> Event:
        if self._finished:
            raise StopIteration
        self.start()
        item = self._out.get()
        if item is _END:
            self._finished = True
            self._join()
            raise StopIteration
        return item

    def abandon(self) -> None:
        """Like close() without joining (for a session dropped without close())."""
        if self._started and not self._finished:
            self._abort.set()
            self._stop.set()

    def _join(self) -> None:
        for t in (self._gen_thread, self._token_thread, self._worker_thread):
            if t is not None and t is not threading.current_thread():
                t.join()

    # -- generation thread ---------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self._stop.is_set() or (self._user_stop is not None and self._user_stop.is_set())

    def _generate(self) -> None:
        from transformers import StoppingCriteriaList

        self._decoder = IncrementalDecoder(self.vlm.tokenizer)
        kw = dict(self._gen_kwargs)
        kw["stopping_criteria"] = StoppingCriteriaList([event_stop(self._stop, self._user_stop)])
        kw["streamer"] = token_streamer(self._hand_over)
        try:
            if not self._stopped():
                with self.vlm.lock:  # nothing else runs on the model while we capture
                    install(self.vlm)
                    with torch.no_grad(), capturing(self.vlm, self.inputs.image_token_positions, self.recorder):
                        self._gen_start = time.perf_counter()
                        self.vlm.model.generate(**self.inputs.model_kwargs, **kw)
        except BaseException as e:  # reported in the DoneEvent
            self._error = self._error or f"generation failed: {type(e).__name__}: {e}"
        finally:
            self._gen_end = time.perf_counter()
            if self._batch:
                self._ids.put(self._batch)
            self._ids.put(_END)
            if self._token_thread is not None:
                self._token_thread.join()  # every token is decoded and split before the last spans
            self._gen_done.set()
            try:
                if not self._abort.is_set():
                    now = time.perf_counter()
                    for span in self._splitter.finish():
                        self._waiting.append((span, now))
                    if self._channel is None:
                        self._send_ready(final=True)
            except BaseException as e:
                self._error = self._error or f"span splitting failed: {type(e).__name__}: {e}"
            self._spans.put(_END)
            try:
                if self._channel is not None:
                    self._finish_channel()
                if self._worker_thread is not None:
                    self._worker_thread.join()
                if self._channel is not None:
                    if not self._channel.closed:
                        self._relay(until_done=True)
                    self._channel.close()
                    if not self._abort.is_set():  # later reads give the numbers the spans used
                        self.recorder.adopt(self._channel.rows[: self._rows_done])
                self._out.put(self._done_event())
            finally:
                self._out.put(_END)  # the consumer never blocks forever

    def _hand_over(self, ids: list[int]) -> None:
        """Streamer callback, on the generation thread: only hand the ids to the token thread
        (decoding, events, span splitting and sending spans all run there, so that their Python
        never sits between two decode steps, as with `vlm.stream`'s queue). Ids go over in
        groups of up to `TOKEN_BATCH`: each hand-over wakes the token thread, which then takes
        the interpreter and a core from generation. The first token goes at once, and so do
        the two after a token that can end a span (`span_end_tokens`), whose rows they bring,
        and the last one (eos or the token limit)."""
        batch = self._batch
        batch += ids
        self._n_ids += len(ids)
        ends = self._span_ends
        due = (
            self._flush > 0
            or len(batch) >= TOKEN_BATCH
            or ends is None
            or not self._handed
            or self._n_ids >= self.max_new_tokens  # the last token: generate's own wrap-up is not its delay
            or not self._eos.isdisjoint(ids)
        )
        self._flush = 2 if ends is not None and not ends.isdisjoint(ids) else max(0, self._flush - 1)
        if due:
            self._gen_cpu = current_cpu()
            self._handed = True
            self._ids.put(batch)
            self._batch = []

    def _tokens(self) -> None:
        """The token thread: everything that happens per token, in token order, until `_END`."""
        while True:
            ids = self._ids.get()
            if ids is _END:
                return
            if self._error is not None or self._abort.is_set():
                continue  # drain: generation is being stopped
            try:
                self._on_tokens(ids)
            except BaseException as e:
                self._error = self._error or f"token handling failed: {type(e).__name__}: {e}"
                self._stop.set()

    def _on_tokens(self, ids: list[int]) -> None:
        for tid in ids:
            if self._saw_eos:
                break
            if tid in self._eos:
                self._saw_eos = True
                break
            index = len(self.token_ids)
            piece = self._decoder.push(int(tid))
            now = time.perf_counter()
            self.token_ids.append(int(tid))
            self._pieces.append(piece)
            self._token_times.append(now)
            self._out.put(TokenEvent(index, int(tid), piece, now))
            if self._waiting:  # spans closed by earlier tokens whose last row is now recorded
                self._send_ready(final=False)
            for span in self._splitter.push(index, piece):
                self._close_span(span, now)
        if self._channel is not None:
            self._relay(until_done=False)

    def _close_span(self, span: Span, now: float) -> None:
        """Hold a closed span until the decode step that records its last row: the worker then
        never has to wake on every step to look for rows."""
        self._waiting.append((span, now))
        self._send_ready(final=False)

    # -- process mode: the token thread's side ------------------------------------------------
    def _open_channel(self) -> Channel:
        tc = self.vlm.text_config
        heads = int(self.vlm.num_heads)
        shapes = Shapes(
            t_max=self.max_new_tokens + 1,
            l=int(self.vlm.num_layers),
            h=heads,
            hkv=int(getattr(tc, "num_key_value_heads", None) or heads),
            d=int(getattr(tc, "head_dim", None) or tc.hidden_size // heads),
            s_max=self.inputs.prompt_len + self.max_new_tokens + 1,
            n=int(self.inputs.image_token_positions.numel()),
        )
        weight, bias = self.estimator.numpy_weights()
        config = {
            "positions": self.inputs.image_token_positions.reshape(-1).cpu().numpy(),
            "assignment": self._assignment,
            "weight": weight,
            "bias": bias,
            "top": TOP_REGIONS,
            "feature_variant": self.variant.name,
        }
        return Channel(shapes, config)

    def _send_ready(self, final: bool) -> None:
        """Hand the worker the waiting spans whose rows are all recorded (all when `final`)."""
        have = self.recorder.tokens
        while self._waiting and (final or self._waiting[0][0].token_end <= have):
            span, t_end = self._waiting.popleft()
            if self._channel is None:
                self._spans.put((span, t_end))
                continue
            if self._abort.is_set() or self._error is not None:
                continue
            try:
                self._send_span(span, t_end, have)
            except (OSError, LiveProcessError) as e:
                self._error = self._error or f"attribution process lost on span {span.index}: {type(e).__name__}: {e}"
                self._stop.set()

    def _send_span(self, span: Span, t_end: float, have: int) -> None:
        """One span to the attribution process: the queries and new keys of its rows not sent
        yet (or the rows themselves when they cannot be computed there), then the message."""
        ch = self._channel
        lo, hi, note = _rows_for(span, have)
        a, b = self._sent_rows, max(self._sent_rows, hi)
        msg: dict[str, Any] = {"index": span.index, "rows": (lo, hi), "new_rows": (a, b), "rows_given": False}
        if b > a:
            got = self.recorder.export(a, b, ch.queries, ch.keys, self._sent_keys)
            if got is None:
                ch.rows[a:b] = self.recorder.stack(a, b, cpu=True).float().numpy()
                msg["rows_given"] = True
            else:
                msg["lens"], self._sent_keys, msg["scaling"] = got
            self._sent_rows = b
        if self.variant.values and not self._sent_values:
            msg["value_weights"] = self.recorder.value_weights(self.variant.values, cpu=True).numpy()
            self._sent_values = True
        self._inflight[span.index] = (span, t_end, lo, hi, note)
        msg["cpu"] = self._gen_cpu  # the process keeps off the generation thread's core
        ch.send_span(msg)

    def _finish_channel(self) -> None:
        if not self._abort.is_set() and self._error is None:
            self._send_ready(final=True)
            try:
                self._channel.finish()
                return
            except OSError as e:
                self._error = self._error or f"attribution process lost: {type(e).__name__}: {e}"
        self._channel.close()  # nothing more to relay

    # -- process mode: answers into events ----------------------------------------------------
    def _relay(self, until_done: bool) -> None:
        """Turn the attribution process's answers into events: on the token thread after each
        token, those already arrived (no thread here waits on the process, so an answer wakes
        nobody and waits at most one decode step); after generation, on the generation thread,
        all of them until the process says done."""
        ch = self._channel
        while not self._abort.is_set() and (until_done or ch.has_answer()):
            try:
                msg = ch.receive(timeout=self.row_timeout if until_done else None)
            except (EOFError, OSError, LiveProcessError) as e:
                if not self._abort.is_set() and self._error is None:
                    self._error = f"the attribution process stopped answering: {type(e).__name__}: {e}"
                    self._stop.set()
                return
            op = msg.get("op")
            if op == "done":
                self.tracker, self._rows_done = msg["tracker"], int(msg["rows"])
                return
            if op != "span":
                self._error = self._error or f"attribution failed: {msg.get('error', msg)}"
                self._stop.set()
                return
            self._emit_answer(msg)

    def _emit_answer(self, msg: dict[str, Any]) -> None:
        span, t_end, lo, hi, note = self._inflight.pop(msg["index"])
        scores, point = msg["scores"], msg["point"]
        self.tracker.raw.append(np.asarray(scores, dtype=np.float64))  # (replaced by the process's at the end)
        self._update_risk(point)
        t1 = time.perf_counter()
        sev = SpanEvent(
            span=span,
            scores=scores,
            top_regions=list(msg["top"]),
            span_end_time=t_end,
            emitted_time=t1,
            latency_ms=(t1 - t_end) * 1000.0,
            compute_ms=(msg["t1"] - msg["t0"]) * 1000.0,  # in the process
            scores_ms=(msg["t_scores"] - msg["t0"]) * 1000.0,
            compute_cpu_ms=msg["cpu_s"] * 1000.0,
            n_rows=hi - lo,
            rows=(lo, hi),
            note=note,
            painter=self.painter,
        )
        self._n_spans += 1
        self._out.put(sev)
        self._out.put(PathEvent(point, t1, self._risk))

    def _done_event(self) -> DoneEvent:
        text = "".join(self._pieces)
        tt = self._token_times
        rate = (len(tt) - 1) / (tt[-1] - tt[0]) if len(tt) >= 2 and tt[-1] > tt[0] else 0.0
        return DoneEvent(
            text=text,
            answer=split_thinking(text)[1],
            label=label_trace(self.tracker.raw),
            risk=self._risk,
            n_tokens=len(self.token_ids),
            n_spans=self._n_spans,
            tokens_per_s=float(rate),
            cancelled=self._stopped() or self._abort.is_set(),
            error=self._error,
            token_ids=list(self.token_ids),
            gen_start_time=self._gen_start,
            first_token_time=tt[0] if tt else 0.0,
            gen_end_time=self._gen_end,
            time=time.perf_counter(),
        )

    # -- worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            _one_torch_thread_here()
        finally:
            self._worker_ready.set()
        while True:
            item = self._spans.get()
            if item is _END:
                return
            if self._abort.is_set() or self._error is not None:
                continue  # drain
            span, t_end = item
            try:
                events = self._attribute(span, t_end)
            except BaseException as e:
                self._error = f"attribution failed on span {span.index}: {type(e).__name__}: {e}"
                self._stop.set()  # no point generating further
                continue
            if events is not None and not self._abort.is_set():
                self._n_spans += 1
                for ev in events:
                    self._out.put(ev)

    def _predict(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        k = features.shape[0]
        if self._linear_np is not None and isinstance(features, np.ndarray):
            return self._linear_np(features)
        features = torch.as_tensor(features)
        if features.device != self._est_device or features.dtype != self._est_dtype:
            features = features.to(self._est_device, self._est_dtype)
        with torch.no_grad():
            out = self.estimator.predict(features)
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        scores = np.asarray(out, dtype=np.float32).reshape(-1)
        if scores.shape != (k,):
            raise VLMError(f"estimator.predict returned {scores.shape[0]} scores for {k} regions")
        return scores

    def compute_span(
        self, lo: int, hi: int, tracker: DynamicsTracker | None = None
    ) -> tuple[np.ndarray, list[int], PathPoint | None, float]:
        """The worker's per-span work on recorded rows [lo, hi): scores, top regions, path point
        (when a tracker is given) and the time the scores were ready (the heatmap is painted
        when read: `SpanEvent.heatmap`). Public so the benchmark can replay it alone, after
        generation."""
        if hi > lo:
            scores = self._predict(span_features(self.recorder, lo, hi, self._assignment, self.variant))
        else:
            scores = np.zeros(self.regions.k, dtype=np.float32)
        t_scores = time.perf_counter()
        top = rowmath.top_regions(scores, TOP_REGIONS)
        point = tracker.add(scores) if tracker is not None else None
        return scores, top, point, t_scores

    def _attribute(self, span: Span, t_end: float) -> tuple[SpanEvent, PathEvent] | None:
        rec, need = self.recorder, span.token_end
        # wait for the row of the span's last token (one decode step after it arrived)
        # (not once generation is over: then what is recorded is all there will be)
        while not (self._gen_done.is_set() or self._abort.is_set()):
            if rec.wait_for(need, _POLL_S) or time.perf_counter() - t_end > self.row_timeout:
                break
        if self._abort.is_set():
            return None
        t0, c0 = time.perf_counter(), time.thread_time()
        lo, hi, note = _rows_for(span, rec.tokens)
        scores, top, point, t_scores = self.compute_span(lo, hi, self.tracker)
        t1, c1 = time.perf_counter(), time.thread_time()
        sev = SpanEvent(
            span=span,
            scores=scores,
            top_regions=top,
            span_end_time=t_end,
            emitted_time=t1,
            latency_ms=(t1 - t_end) * 1000.0,
            compute_ms=(t1 - t0) * 1000.0,
            scores_ms=(t_scores - t0) * 1000.0,
            compute_cpu_ms=(c1 - c0) * 1000.0,
            n_rows=hi - lo,
            rows=(lo, hi),
            note=note,
            painter=self.painter,
        )
        if point is not None:
            self._update_risk(point)
        return sev, PathEvent(point, t1, self._risk)

    def _update_risk(self, point: PathPoint) -> None:
        """P(failure) from the dynamics so far, after the span whose path point this is (with a risk model)."""
        if self.risk_model is not None:
            self._points.append(point)
            feats = point_features(self._points, np.stack(self.tracker.raw))
            self._risk = float(self.risk_model.probability(feats))


class AttributionSession:
    """One live-attributed generation; iterate it for events (see the module docstring).

    Setup (inputs, regions, an estimator probe) runs in the constructor, so bad input raises a
    one-line `VLMError` at once; the threads start on the first `next()` (or `start()`).
    `cancel()` stops generating (closed spans are still scored, then the DoneEvent);
    `close()` (also `with` exit) aborts and joins both threads; a session dropped without
    either aborts its threads when garbage-collected. Attributes of the run: `inputs`,
    `regions`, `recorder`, `tracker` (in process mode: complete once the DoneEvent is out),
    `image_size`, `token_ids`, `feature_dim`, `worker_mode` ("process" or "thread") and
    `worker_note` (why the process was not used, if it was meant to be).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._run = _Run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_run":  # constructor failed
            raise AttributeError(name)
        return getattr(self._run, name)

    def start(self) -> AttributionSession:
        self._run.start()
        return self

    def compute_span(self, lo: int, hi: int, tracker: DynamicsTracker | None = None):
        """Replay the worker's per-span computation on recorded rows [lo, hi) (benchmarks)."""
        return self._run.compute_span(lo, hi, tracker)

    def cancel(self) -> None:
        self._run.cancel()

    def close(self) -> None:
        self._run.close()

    @property
    def running(self) -> bool:
        return self._run.running

    def __iter__(self) -> AttributionSession:
        return self

    def __next__(self) -> Event:
        return self._run.next_event()

    def __enter__(self) -> AttributionSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        run = self.__dict__.get("_run")
        if run is not None:
            run.abandon()


def attribute_stream(
    vlm: VLM,
    image: Any,
    question: str,
    estimator: Estimator,
    k: int | None = None,
    backbone: Backbone | str | None = None,
    max_new_tokens: int = 256,
    stop_event: threading.Event | None = None,
    **kwargs: Any,
) -> AttributionSession:
    """Generate an answer to `question` about `image` and attribute every thinking span live.

    Returns an `AttributionSession`: iterate it for `RegionsEvent`, then `TokenEvent`s,
    `SpanEvent` + `PathEvent` per closed span (while generation continues) and a final
    `DoneEvent`; `.close()` it (or use `with`) to stop early with nothing left running.
    `estimator` is anything with `predict((K, L*H) features) -> (K,)` (a `LinearEstimator`).
    Keyword extras: `regions=` (precomputed), `splitter=` (span policy with push/finish),
    `system=`, `row_timeout=`, `risk=` (a `vstream.attr.risk.RiskModel`: each PathEvent then
    carries the failure probability so far), `process=` (True / False: score spans in the
    attribution process / in a thread here; default: the process where it can run, see the
    module docstring). Bad input raises `VLMError` here, before any thread starts.
    """
    return AttributionSession(
        vlm,
        image,
        question,
        estimator,
        k=k,
        backbone=backbone,
        max_new_tokens=max_new_tokens,
        stop_event=stop_event,
        **kwargs,
    )
