"""Three ways to reason over a live video on the same model (issue item 5), timed honestly.

    src = ShapesSource(make_stream(7), fps=2.0, realtime=True)
    res = run_paradigm(vlm, src, paradigm="tays", max_new_tokens=96)
    res.metrics["ttft_question_s"], res.metrics["delay_s"], res.text

* ``batch``: watch all, then think. Frames are buffered until the stream ends; then the prompt
  and every frame group are prefilled into one causal sequence (the frames as one video) and the
  reasoning and the answer are decoded.
* ``interleaved``: one causal sequence and one KV cache, frames and reasoning alternating. A frame
  group that arrives while a reasoning step is being decoded waits until the step is done
  (decoding blocks ingestion); the next step starts only once every waiting group has been
  prefilled (ingestion blocks decoding).
* ``tays``: the `tays.engine.StreamingEngine`: frames are ingested by its own thread into the
  video cache while the caller's thread decodes from (video cache + text cache); neither waits
  for the other.

One reasoning protocol for all three, so that only the scheduling differs:

* the answer is `assistant_prefix` ("<think>") + reasoning steps + `answer_prefix` (" </think>")
  + the answer, greedy. A reasoning step ends at a '.' or the end-of-step token ``<|eot|>`` or
  after `step_tokens` tokens; eos and "</think>" are suppressed while reasoning (the protocol,
  not the model, decides when reasoning ends), and eos ends the answer (at least one answer token).
* streaming paradigms (interleaved, tays) decode the first step as soon as the question arrives
  (with whatever frames are in), then one step per new evidence: after a step they wait for a new
  frame group; groups that arrived meanwhile are covered by one step. Reasoning stops when
  `max_new_tokens - answer_tokens` tokens are spent (the text cache stays bounded on long
  streams); when the stream has ended and every frame is ingested, the answer is decoded.
* batch decodes, after the stream, as many reasoning tokens as the streaming paradigms may:
  ``min(max_new_tokens - answer_tokens, (frame groups + 1) * step_tokens)``, back to back.

The question arrives `question_at` seconds after the stream starts; frames that came before it are
buffered (the TaYS video cache starts with the prompt, so frames are ingested after it). Interleaved
prefills them before its first token; TaYS decodes first and hands them to its ingestion thread
right after the first token (decode-first scheduling: they could not be ingested in time for the
first token anyway, and this keeps them from competing with it for the CPU).
Sequence layout (all three): user turn (question) | frames | assistant header | reasoning. The
batch / interleaved sequence uses standard mRoPE positions (a vision block at the next free
position, text after it at max + 1, as `get_rope_index`); each interleaved group is its own block.
TaYS uses the engine's decoupled positions.

Every wall-clock stamp is a `time.perf_counter()` reading in seconds since stream start (see
`tays.metrics`). Bad input never breaks a run: a frame of another size or an unreadable frame is
rejected with a message in `RunResult.messages` (the engine never sees it); a source that fails or
stops early ends the stream (message) and the answer is decoded from what was seen; every thread
the run started (``tays-source``, the engine's ``tays-ingest``) is joined before returning.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from tays.cache import KVCache
from tays.decoder import Decoder
from tays.engine import THREAD_PREFIX, StreamingEngine
from tays.forward import check_supported, encode_frames, video_interval
from tays.mask import TEXT
from tays.metrics import DecodeCall, GroupRecord, RunResult, StepRecord, TokenRecord, compute_metrics, overlap
from tays.positions import frame_position_ids, text_position_ids
from tays.protocol import PARADIGMS, chat_ids
from tays.sampling import next_token
from tays.sources import FrameChecker, FrameSource, StreamError
from vstream.model import END_OF_STEP, THINK_CLOSE, THINK_OPEN, VLM, IncrementalDecoder

__all__ = [
    "CausalSequence",
    "RunObserver",
    "run_paradigm",
]


def _now() -> float:
    return time.perf_counter()


def _single_id(tok: Any, text: str) -> int | None:
    """The id of `text` if it is exactly one token, else None."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


# ----------------------------------------------------------------------------------------------
# one causal sequence with one KV cache (batch and interleaved)


class CausalSequence:
    """A standard single-cache decoder over an interleaved sequence of text and frame groups.

    The TaYS engine's layer loop and KV growth (`tays.decoder.Decoder`, `tays.cache.KVCache`), but
    every token attends to everything before it: frames see earlier reasoning, and text positions
    follow the vision blocks. Not thread-safe (one caller drives it).
    """

    def __init__(self, vlm: VLM, fps: float = 2.0, initial_capacity: int = 512):
        check_supported(vlm)
        self.vlm = vlm
        self.decoder = Decoder(vlm)
        self.cache = KVCache(self.decoder.kv_spec, max(16, int(initial_capacity)))
        self._interval = video_interval(vlm, fps)
        self.next_pos = 0  # next free position
        self.n_groups = 0
        self.last_group_time = -math.inf

    @property
    def n(self) -> int:
        """Tokens in the cache."""
        return self.cache.length

    def add_text(self, ids: Sequence[int], logits: bool = True) -> torch.Tensor | None:
        """Append text tokens; returns float32 logits (n, vocab) when asked."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("add_text needs at least one token")
        with torch.inference_mode():
            h = self.decoder.embed(ids)
            pos = text_position_ids(self.next_pos, 0, len(ids), self.vlm.device)
            out = self._forward(h, pos, logits)
        self.next_pos += len(ids)
        return None if out is None else out[0].float()

    def add_frames(self, frames: Sequence[Any], time_s: float, base: int | None = None, group_index: int = 0) -> float:
        """Encode and append one frame group as (part of) a vision block starting at position
        `base` (default: the next free position) with temporal index `group_index`.
        Returns the vision-tower seconds."""
        t = _now()
        with torch.inference_mode():
            emb, grid = encode_frames(self.vlm, frames)
            t_enc = _now() - t
            base = self.next_pos if base is None else int(base)
            pos = frame_position_ids(base, group_index, grid, self._interval, self.vlm.device)
            self._forward(emb[None].to(self.vlm.dtype), pos, False)
        self.next_pos = max(self.next_pos, int(pos.max()) + 1)
        self.n_groups += 1
        self.last_group_time = float(time_s)
        return t_enc

    def _forward(self, h: torch.Tensor, pos: torch.Tensor, need_logits: bool) -> torch.Tensor | None:
        """(1, L, hidden) at (3, L) positions: attends to the cache and, causally, to itself."""
        L = h.shape[1]
        cache = self.cache
        cache.reserve(L)
        n = cache.length
        causal = torch.ones(L, L, dtype=torch.bool, device=self.vlm.device).tril()

        def context(li: int, k: torch.Tensor, v: torch.Tensor):
            return [(*cache.segment(li, 0, n), None), (k, v, causal)]

        out = self.decoder.run(h, pos[:, None], context, cache.put, need_logits)
        cache.advance(L)
        return out


# ----------------------------------------------------------------------------------------------
# shared pieces of a run


class _Writer:
    """Decodes reasoning steps and the answer with one protocol (module docstring) on top of a
    `forward(ids) -> (last logits, frames seen, newest frame time)` function, recording tokens,
    steps and timed decode calls into the RunResult."""

    def __init__(
        self,
        vlm: VLM,
        res: RunResult,
        t0: float,
        forward: Callable,
        *,
        step_tokens: int,
        reasoning_budget: int,
        answer_tokens: int,
        answer_prefix_ids: list[int],
        on_token: Callable[[TokenRecord], Any] | None,
        stopped: Callable[[], bool],
        period_ends_step: bool = True,
        model_ends_reasoning: bool = False,
    ):
        tok = vlm.tokenizer
        self.res, self.t0, self._forward = res, t0, forward
        self.step_tokens = max(1, int(step_tokens))
        self.left = max(0, int(reasoning_budget))
        self.answer_tokens = max(1, int(answer_tokens))
        self.answer_prefix_ids = list(answer_prefix_ids)
        self.on_token, self.stopped = on_token, stopped
        self.period_ends_step, self.model_ends_reasoning = bool(period_ends_step), bool(model_ends_reasoning)
        self.eos = set(vlm.eos_token_ids)
        think_end = _single_id(tok, THINK_CLOSE)
        self.eot = _single_id(tok, END_OF_STEP)
        self.no_reasoning = self.eos | ({think_end} if think_end is not None else set())
        self.no_answer = {think_end} if think_end is not None else set()
        self._dec = IncrementalDecoder(tok)
        self.pending: list[int] = []  # fed before the next token is picked
        self.logits: torch.Tensor | None = None
        self.seen, self.seen_time = 0, -math.inf
        self.after_first_token: Callable[[], Any] | None = None  # called once, after the first token
        self.on_step: Callable[[StepRecord], Any] | None = None  # called when a reasoning step closes

    def feed(self, ids: list[int], produces: bool = True) -> None:
        a = _now()
        logits, seen, seen_t = self._forward(ids)
        b = _now()
        self.res.decode_calls.append(DecodeCall(a - self.t0, b - self.t0, len(ids), produces))
        self.logits, self.seen, self.seen_time = logits, int(seen), float(seen_t)

    def _emit(self, tok: int, phase: str) -> TokenRecord:
        rec = TokenRecord(
            len(self.res.tokens), tok, self._dec.push(tok), _now() - self.t0, phase, self.seen, self.seen_time
        )
        self.res.tokens.append(rec)
        if self.on_token is not None:
            self.on_token(rec)
        if self.after_first_token is not None:
            hook, self.after_first_token = self.after_first_token, None
            hook()
        return rec

    def step(self) -> StepRecord | None:
        """One reasoning step (feeds what is pending first). None when the budget is spent."""
        if self.left <= 0 or self.stopped():
            return None
        self.feed(self.pending)
        self.pending = []
        if self.model_ends_reasoning and next_token(self.logits) in self.no_reasoning:
            self.left = 0  # the model closes its reasoning: the answer comes next
            return None
        recs, closed = [], "cap"
        while True:
            tok = next_token(self.logits, self.no_reasoning)
            rec = self._emit(tok, "reasoning")
            recs.append(rec)
            self.left -= 1
            if tok == self.eot:
                closed = "eot"
            elif self.period_ends_step and "." in rec.text:
                closed = "period"
            elif self.left <= 0:
                closed = "budget"
            elif len(recs) >= self.step_tokens or self.stopped():
                closed = "cap"
            else:
                self.feed([tok])
                continue
            self.pending = [tok]  # fed when the next step or the answer starts (sees newer frames)
            break
        s = StepRecord(
            len(self.res.steps),
            "".join(r.text for r in recs).strip(),
            recs[0].wall,
            recs[-1].wall,
            len(recs),
            recs[0].frames_seen,
            recs[0].stream_time,
            closed,
        )
        self.res.steps.append(s)
        if self.on_step is not None:
            self.on_step(s)
        return s

    def answer(self) -> None:
        if self.stopped():
            return
        self.feed(self.pending + self.answer_prefix_ids)
        self.pending = []
        for k in range(self.answer_tokens):
            tok = next_token(self.logits, self.no_answer | (self.eos if k == 0 else set()))
            if tok in self.eos:
                # the eos decision ends the answer; that forward produced no emitted token
                self.res.decode_calls[-1].produced = False
                return
            self._emit(tok, "answer")
            if k + 1 < self.answer_tokens:
                self.feed([tok])


class _Feed(threading.Thread):
    """Plays the source in a ``tays-source`` thread: checks every frame (size, readability),
    stamps its arrival and hands it on; ends the stream exactly once (also on errors / stop)."""

    def __init__(
        self,
        source: FrameSource,
        res: RunResult,
        t0: float,
        stop: threading.Event,
        on_frame: Callable[[float, Any, float], None],
        on_end: Callable[[], None],
    ):
        super().__init__(name=THREAD_PREFIX + "source", daemon=True)
        self.source, self.res, self.t0, self.stop = source, res, t0, stop
        self.on_frame, self.on_end = on_frame, on_end
        self.error: BaseException | None = None

    def run(self) -> None:
        checker = FrameChecker()
        last_t = None
        src = self.source
        try:
            for t, frame in src.iter_frames(stop=self.stop, t0=self.t0):
                arrived = _now() - self.t0
                try:
                    img = checker(frame, t)
                except StreamError as e:
                    self.res.frames_rejected += 1
                    self.res.messages.append(str(e))
                    continue
                self.res.frames_received += 1
                last_t = t
                self.on_frame(float(t), img, arrived)
                if self.stop.is_set():
                    break
            if not self.stop.is_set() and src.duration is not None:
                expected_last = src.duration - 1.0 / src.fps
                if last_t is None or last_t < expected_last - 1e-6:
                    got = "no frame" if last_t is None else f"the last frame at t={last_t:.2f} s"
                    self.res.messages.append(
                        f"the stream stopped early: {got}, but it should last {src.duration:.2f} s"
                    )
        except StreamError as e:
            self.res.messages.append(str(e))
        except BaseException as e:  # e.g. the engine refused a push: recorded, the run goes on
            self.error = e
            self.res.messages.append(f"the stream failed: {type(e).__name__}: {' '.join(str(e).split())}")
        finally:
            self.res.stream_end = _now() - self.t0
            try:
                self.on_end()
            except BaseException as e:
                self.res.messages.append(f"could not end the stream: {type(e).__name__}: {e}")


class _Inbox:
    """Frames waiting for the decoding thread (batch / interleaved)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.items: list[tuple[float, Any, float]] = []
        self.ended = False

    def on_frame(self, t: float, img: Any, arrived: float) -> None:
        with self.cv:
            self.items.append((t, img, arrived))
            self.cv.notify_all()

    def on_end(self) -> None:
        with self.cv:
            self.ended = True
            self.cv.notify_all()

    def take(self) -> tuple[list[tuple[float, Any, float]], bool]:
        with self.cv:
            items, self.items = self.items, []
            return items, self.ended

    def wait(self, timeout: float) -> None:
        """Until a frame is waiting or the stream ended (or the timeout)."""
        with self.cv:
            if not self.items and not self.ended:
                self.cv.wait(timeout)

    def wait_end(self, timeout: float) -> bool:
        with self.cv:
            if not self.ended:
                self.cv.wait(timeout)
            return self.ended


def _sleep_until(t_wall: float, stopped: Callable[[], bool]) -> None:
    while not stopped():
        d = t_wall - _now()
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


# ----------------------------------------------------------------------------------------------
# the paradigms


def _grouper(seq: CausalSequence, res: RunResult, t0: float, tp: int):
    """Returns ingest(items, final, block_base) that appends complete frame groups to `seq`."""
    pend: list[tuple[float, Any, float]] = []

    def ingest(items, final: bool, one_block: bool) -> int:
        pend.extend(items)
        groups = []
        while len(pend) >= tp:
            groups.append(pend[:tp])
            del pend[:tp]
        if final and pend:
            groups.append(list(pend))
            pend.clear()
        base = seq.next_pos
        for gi, grp in enumerate(groups):
            start = _now() - t0
            t_enc = seq.add_frames(
                [f for _, f, _ in grp], grp[-1][0], base=base if one_block else None, group_index=gi if one_block else 0
            )
            end = _now() - t0
            res.groups.append(
                GroupRecord(len(res.groups), grp[-1][0], len(grp), max(a for _, _, a in grp), start, end, t_enc)
            )
        return len(groups)

    return ingest


def _run_batch(vlm, source, res, t0, stop, stopped, question, kw) -> None:
    inbox = _Inbox()
    feed = _Feed(source, res, t0, stop, inbox.on_frame, inbox.on_end)
    feed.start()
    try:
        _sleep_until(t0 + kw["question_at"], stopped)
        res.question_at = _now() - t0
        while not stopped() and not inbox.wait_end(0.05):
            pass
        if stopped():
            return
        items, _ = inbox.take()
        seq = CausalSequence(vlm, res.fps)
        prompt, header = chat_ids(vlm, question, assistant_prefix=kw["assistant_prefix"])
        seq.add_text(prompt, logits=False)
        _grouper(seq, res, t0, vlm.temporal_patch_size)(items, True, True)
        budget = min(kw["reasoning_budget"], (seq.n_groups + 1) * kw["step_tokens"])
        w = _writer(
            vlm, res, t0, lambda ids: (seq.add_text(ids)[-1], seq.n_groups, seq.last_group_time), kw, budget, stopped
        )
        w.pending = list(header)
        while w.step() is not None:
            pass
        w.answer()
    finally:
        stop.set()
        feed.join()


def _run_interleaved(vlm, source, res, t0, stop, stopped, question, kw) -> None:
    inbox = _Inbox()
    feed = _Feed(source, res, t0, stop, inbox.on_frame, inbox.on_end)
    feed.start()
    try:
        _sleep_until(t0 + kw["question_at"], stopped)
        res.question_at = _now() - t0
        seq = CausalSequence(vlm, res.fps)
        prompt, header = chat_ids(vlm, question, assistant_prefix=kw["assistant_prefix"])
        seq.add_text(prompt, logits=False)
        ingest = _grouper(seq, res, t0, vlm.temporal_patch_size)
        items, ended = inbox.take()
        ingest(items, ended, True)  # the backlog: one vision block, before the first token
        w = _writer(
            vlm,
            res,
            t0,
            lambda ids: (seq.add_text(ids)[-1], seq.n_groups, seq.last_group_time),
            kw,
            kw["reasoning_budget"],
            stopped,
        )
        w.pending = list(header)
        w.step()
        over = False
        while not stopped():
            items, ended = inbox.take()
            new = ingest(items, ended, False)  # blocks decoding
            if new == 0:
                if ended:
                    over = True
                    break
                inbox.wait(0.05)
                continue
            w.step()  # blocks ingestion (returns at once when the budget is spent)
        if over:
            w.answer()
    finally:
        stop.set()
        feed.join()


class _TaysSink:
    """Frames -> engine: buffered until the question arrives, then pushed as they come."""

    def __init__(self, eng: StreamingEngine, stop: threading.Event, max_backlog: int | None, tp: int):
        self.eng, self.stop, self.max_backlog, self.tp = eng, stop, max_backlog, tp
        self.lock = threading.Lock()
        self.started = False
        self.ended = False  # end_of_stream() handed to the engine
        self._source_ended = False
        self.buffer: list[tuple[float, Any, float]] = []
        self.arrivals: list[float] = []  # per pushed frame
        self.capacity_max = 0

    def _push(self, t: float, img: Any, arrived: float) -> None:
        self.eng.push_frame(img, t)
        self.arrivals.append(arrived)

    def on_frame(self, t: float, img: Any, arrived: float) -> None:
        with self.lock:
            if not self.started:
                self.buffer.append((t, img, arrived))
                return
            self._push(t, img, arrived)
        self.capacity_max = max(self.capacity_max, self.eng.video_capacity)
        if self.max_backlog is not None:  # back-pressure for as-fast-as-possible sources
            target = len(self.arrivals) // self.tp - self.max_backlog
            while target > 0 and self.eng.frames_ingested < target and not self.stop.is_set():
                self.eng.wait_frames(target, timeout=0.1)

    def on_end(self) -> None:
        with self.lock:
            self._source_ended = True
            if self.started and not self.ended:
                self.eng.end_of_stream()
                self.ended = True

    def begin(self) -> None:
        with self.lock:
            if self.started:
                return
            self.started = True
            for item in self.buffer:
                self._push(*item)
            self.buffer.clear()
            if self._source_ended and not self.ended:
                self.eng.end_of_stream()
                self.ended = True


def _last_text(eng: StreamingEngine):
    for s in reversed(eng.segments()):
        if s.kind == TEXT:
            return s
    return None


def _run_tays(vlm, source, res, t0, stop, stopped, question, kw) -> None:
    eng = StreamingEngine(vlm, visual_window=kw["visual_window"], fps=res.fps)
    observer = kw.get("observer")
    if observer is not None:
        observer.attach(eng, t0)
    tp = vlm.temporal_patch_size
    sink = _TaysSink(eng, stop, kw["max_backlog"], tp)
    feed = _Feed(source, res, t0, stop, sink.on_frame, sink.on_end)

    def forward(ids):
        logits = eng.decode_step(ids)[-1]
        s = _last_text(eng)
        res.video_capacity_max = max(res.video_capacity_max, eng.video_capacity)
        return logits, s.frames_seen, s.time

    w = _writer(vlm, res, t0, forward, kw, kw["reasoning_budget"], stopped)  # question-independent set-up
    if observer is not None:
        w.on_step = observer.on_step
    feed.start()
    try:
        _sleep_until(t0 + kw["question_at"], stopped)
        res.question_at = _now() - t0
        eng.start(question, assistant_prefix=kw["assistant_prefix"])
        # decode first: frames that came before the question go to the ingestion thread right after
        # the first token (they could not be ingested in time for it anyway); later frames go at once
        w.after_first_token = sink.begin
        w.pending = list(eng.header_ids)
        w.step()
        sink.begin()  # (no-op if the first token did it)
        seen = w.seen  # frame groups the last step saw
        over = False

        def next_step() -> int:
            if w.left > 0:
                w.step()
                return w.seen
            return eng.frames_ingested  # budget spent: just keep watching

        while not stopped():
            if eng.wait_frames(seen + 1, timeout=0.05):
                seen = next_step()
                continue
            if sink.ended and eng.wait_idle(timeout=0):
                if eng.frames_ingested > seen:
                    seen = next_step()
                    continue
                over = True
                break
        if over:
            w.answer()
    finally:
        stop.set()
        feed.join()
        eng.stop()
        _tays_groups(eng, sink, res, t0)
        res.video_capacity_max = max(res.video_capacity_max, sink.capacity_max)
        _mark_ingesting(res)
        if observer is not None:
            observer.finish(eng)


def _tays_groups(eng: StreamingEngine, sink: _TaysSink, res: RunResult, t0: float) -> None:
    """The engine's frame log as the run's GroupRecords (empty if the engine never started)."""
    off = eng.start_time - t0
    tp = sink.tp
    n = len(sink.arrivals)
    for rec in list(eng.frame_log):
        lo = rec.index * tp
        if lo >= n:
            break
        hi = min(lo + tp, n)
        res.groups.append(
            GroupRecord(
                rec.index,
                rec.time,
                hi - lo,
                max(sink.arrivals[lo:hi]),
                off + rec.committed_at - rec.ingest_s,
                off + rec.committed_at,
                rec.encode_s,
            )
        )


def _mark_ingesting(res: RunResult) -> None:
    """DecodeCall.ingesting: at least half of the call overlapped the ingestion of a group."""
    spans = sorted((g.start, g.end) for g in res.groups)
    for c in res.decode_calls:
        c.ingesting = overlap(c.start, c.end, spans) >= 0.5 * max(c.end - c.start, 1e-9)


def _writer(vlm, res, t0, forward, kw, budget, stopped) -> _Writer:
    return _Writer(
        vlm,
        res,
        t0,
        forward,
        step_tokens=kw["step_tokens"],
        reasoning_budget=budget,
        answer_tokens=kw["answer_tokens"],
        answer_prefix_ids=kw["answer_prefix_ids"],
        on_token=kw["on_token"],
        stopped=stopped,
        period_ends_step=kw.get("period_ends_step", True),
        model_ends_reasoning=kw.get("model_ends_reasoning", False),
    )


class RunObserver(Protocol):
    """Watches one TaYS run from inside (all calls but `attach` come from the decoding thread,
    so they must be quick: hand work to another thread)."""

    def attach(self, engine: StreamingEngine, t0: float) -> None:
        """The engine is built (not started); t0: the run's stream-start clock reading."""

    def on_token(self, rec: TokenRecord) -> None:
        """A token was picked (the engine's last decode call produced it)."""

    def on_step(self, step: StepRecord) -> None:
        """A reasoning step closed (its tokens were the last `step.n_tokens` on_token calls)."""

    def finish(self, engine: StreamingEngine) -> None:
        """The run is over and the engine stopped (also after an error or a stop)."""


def _both(first: Callable[[TokenRecord], Any], second: Callable[[TokenRecord], Any] | None):
    if second is None:
        return first

    def call(rec: TokenRecord) -> None:
        first(rec)
        second(rec)

    return call


_RUNNERS = {"batch": _run_batch, "interleaved": _run_interleaved, "tays": _run_tays}


def run_paradigm(
    vlm: VLM,
    source: FrameSource,
    question: str | None = None,
    paradigm: str = "tays",
    fps: float | None = None,
    max_new_tokens: int = 96,
    *,
    step_tokens: int = 8,
    answer_tokens: int = 8,
    question_at: float = 0.0,
    visual_window: int | None = None,
    assistant_prefix: str = THINK_OPEN,
    answer_prefix: str = " " + THINK_CLOSE,
    max_backlog: int | None = None,
    on_token: Callable[[TokenRecord], Any] | None = None,
    stop_event: threading.Event | None = None,
    period_ends_step: bool = True,
    model_ends_reasoning: bool = False,
    observer: RunObserver | None = None,
) -> RunResult:
    """Play `source` from now (stream start) and reason over it with `paradigm` (see the module
    docstring). Returns the RunResult with its metrics (`tays.metrics.compute_metrics`).

    question: default `source.question` (shapes-world streams carry one). fps: the source's frame
    rate (default `source.fps`; must agree with it). max_new_tokens: all generated tokens
    (reasoning + answer). question_at: seconds after stream start when the question arrives.
    visual_window: TaYS only, frame groups a step may see (bounded memory on long streams).
    max_backlog: TaYS only, frame groups the source may run ahead of ingestion (default: none for
    real-time sources, 4 otherwise). on_token: called in the decoding thread for every token.
    stop_event: set it to end the run early (no answer; `RunResult.stopped`).
    period_ends_step: False: only the end-of-step token (or the step cap) ends a step, for models
    trained to close every sentence with ``<|eot|>`` (`tays.train`). model_ends_reasoning: True:
    when the model's top choice at the start of a step is eos or "</think>", reasoning ends there
    (the answer follows at the end of the stream); the default leaves that to the protocol.
    observer: TaYS only, watches the engine while it runs (`RunObserver`; attribution while
    watching, `tays.watch`).
    """
    if paradigm not in _RUNNERS:
        raise ValueError(f"unknown paradigm {paradigm!r}; choose from {', '.join(PARADIGMS)}")
    check_supported(vlm)
    fps = float(source.fps if fps is None else fps)
    if abs(fps - float(source.fps)) > 1e-9:
        raise ValueError(f"fps {fps} does not match the source's {source.fps}")
    if question is None:
        question = getattr(source, "question", None)
        if question is None:
            raise ValueError("run_paradigm needs a question (this source carries none)")
    if observer is not None and paradigm != "tays":
        raise ValueError("an observer watches the TaYS engine: paradigm must be 'tays'")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    answer_tokens = max(1, min(int(answer_tokens), int(max_new_tokens)))
    if max_backlog is None and not source.realtime:
        max_backlog = 4
    kw = dict(
        step_tokens=int(step_tokens),
        answer_tokens=answer_tokens,
        question_at=max(0.0, float(question_at)),
        visual_window=visual_window,
        assistant_prefix=assistant_prefix,
        answer_prefix_ids=vlm.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else [],
        reasoning_budget=int(max_new_tokens) - answer_tokens,
        max_backlog=max_backlog,
        on_token=on_token if observer is None else _both(observer.on_token, on_token),
        observer=observer,
        period_ends_step=bool(period_ends_step),
        model_ends_reasoning=bool(model_ends_reasoning),
    )
    res = RunResult(
        paradigm, fps, question, speed=float(getattr(source, "speed", 1.0)), events=getattr(source, "events", None)
    )
    stop = threading.Event()

    def stopped() -> bool:
        if stop_event is not None and stop_event.is_set():
            res.stopped = True
            return True
        return False

    t0 = _now()
    _RUNNERS[paradigm](vlm, source, res, t0, stop, stopped, question, kw)
    compute_metrics(res)
    return res
