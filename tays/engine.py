"""TaYS streaming engine: think while watching, with a parallel dual KV cache.

    eng = StreamingEngine(vlm, visual_window=None, fps=2.0)
    eng.start("What happens in the video?")      # prompt -> video cache (prefill)
    eng.play(stream.frames(2.0))                  # or eng.push_frame(img, t) from any thread
    for ev in eng.generate(max_new_tokens=64):    # decodes while frames keep arriving
        print(ev.text, end="", flush=True)
    eng.stop()                                    # joins every thread (also on `with` exit)

Two caches, two writers:

* video cache (`tays.cache.VideoCache`): K/V of the prompt and of every frame group. Only
  ingestion writes it (`tays.ingest`): a frame group attends to the prompt and earlier groups,
  never to reasoning. With ``ingest="process"`` (the default on CPU) the work runs in a worker
  process (no GIL contention with decoding) that sends each group's K/V back; with
  ``ingest="thread"`` (the default on CUDA, on its own stream) in a thread of this process.
* text cache (`tays.cache.KVCache`): K/V of the reasoning tokens (assistant header + generated
  tokens). Only decoding writes it.

A decode step attends to (video cache as of now) + (text cache) without concatenating or copying
either: `tays.decoder.attend_segments` merges the per-segment results by their log-sum-exp.
Ingestion publishes an immutable `VideoView` after each group, under a lock, and a decode step
takes one view for all layers, so every layer sees the same frames. Ingestion never writes memory
a published view can read (new K/V go past the published spans; growing or compacting allocates
fresh buffers). On CUDA a view carries an event the decoder waits on, and the decoder marks the
buffers it reads with `record_stream`.

Positions are the decoupled ones of `tays.positions` (frames: 3-D mRoPE after the prompt, by
absolute group index; reasoning: R0 + i on all three axes), so the logits equal one full forward
with `tays.mask.streaming_mask` (see `segments()` and tests/test_tays_engine.py).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tays.cache import KVCache, VideoCache, VideoView
from tays.capture import StreamRecorder
from tays.decoder import Decoder
from tays.forward import check_supported, video_interval
from tays.ingest import (
    FLUSH,
    STOP,
    FrameRecord,
    Hooks,
    Ingestor,
    ingest_frames,
    ingest_mode,
    receive_groups,
    send_frames,
)
from tays.ipc import IngestProcessError, WorkerHandle, spawn_worker
from tays.mask import PROMPT, TEXT, Segment
from tays.positions import text_position_ids
from tays.protocol import chat_ids
from tays.sampling import next_token
from vstream.model import VLM, IncrementalDecoder

__all__ = ["THREAD_PREFIX", "StreamingEngine", "TokenEvent"]

THREAD_PREFIX = "tays-"  # every thread the engine (or a paradigm run) starts is named so


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # decoded piece ("" while a multi-byte character is incomplete)
    index: int  # 0-based among the generated tokens
    time: float  # wall seconds since start() when the token was produced
    frames_seen: int  # frame groups committed when the step that produced it ran
    stream_time: float  # stream time of the newest frame group it saw (-inf: none)


class StreamingEngine:
    """Think-as-you-see decoding on a Qwen2.5-VL `VLM` (see the module docstring).

    visual_window: frame groups a step may see (None: all). fps: frame rate of the stream, for
    the temporal mRoPE spacing (``temporal_patch_size / fps`` seconds per group) and the default
    frame times. reasoning_base: R0 of the reasoning positions (default: prompt length).
    ingest: where frame groups are encoded and prefilled: "process" (a worker process forked from
    the ingestion server when the engine is built; CPU only), "thread" (a thread of this
    process), or "auto" (the ``TAYS_INGEST`` environment variable if set, else "process" on CPU
    and "thread" on CUDA; falls back to "thread" with a warning if no worker can be started).
    ingest_threads: torch threads of the worker process (this process keeps its own setting).
    """

    def __init__(
        self,
        vlm: VLM,
        visual_window: int | None = None,
        fps: float = 2.0,
        reasoning_base: int | None = None,
        initial_capacity: int = 256,
        ingest: str = "auto",
        ingest_threads: int = 1,
    ):
        check_supported(vlm)
        if visual_window is not None and int(visual_window) < 1:
            raise ValueError(f"visual_window must be >= 1 or None, got {visual_window}")
        self.vlm = vlm
        self.visual_window = None if visual_window is None else int(visual_window)
        self.fps = float(fps)
        self._interval = video_interval(vlm, self.fps)
        self._reasoning_base_arg = reasoning_base
        self._initial_capacity = max(1, int(initial_capacity))
        self.decoder = Decoder(vlm)
        self._cuda = vlm.device.type == "cuda"

        self._cv = threading.Condition(threading.Lock())
        self._decode_lock = threading.RLock()
        self._started = False
        self.prompt_ids: list[int] = []
        self.header_ids: list[int] = []
        self.prompt_len = 0
        self.reasoning_base = 0
        self.vision_base = 0
        self.start_time = time.perf_counter()  # reset by start(); TokenEvent.time and frame_log count from it
        self.frame_log: list[FrameRecord] = []
        self.generated: list[int] = []
        self._history: list[Segment] = []
        # frames in: the queue, and how far ingestion got (under _cv)
        self._queue: queue.Queue = queue.Queue()
        self._pushed = 0  # items put on the queue (frames + flushes)
        self._done = 0  # items ingestion finished
        self._n_frames_pushed = 0
        self._ended = False  # end_of_stream() processed: no more frames will come
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # the two caches; _view is what ingestion last published
        self._video = VideoCache(self.decoder.kv_spec, self._initial_capacity, self.visual_window)
        self._view: VideoView | None = None
        self._text = KVCache(self.decoder.kv_spec, self._initial_capacity)
        self._last_logits: torch.Tensor | None = None
        self._last_view: VideoView | None = None
        self._pending: int | None = None  # generated but not yet fed
        self._recorder: StreamRecorder | None = None  # attention capture (attach)

        self.ingest = ingest_mode(ingest, vlm.device)
        self._worker: WorkerHandle | None = None
        if self.ingest == "process":
            cfg = dict(
                visual_window=self.visual_window,
                fps=self.fps,
                initial_capacity=self._initial_capacity,
                threads=max(1, int(ingest_threads)),
            )
            try:
                self._worker = spawn_worker(vlm, cfg)
            except IngestProcessError as e:
                if ingest == "process":
                    raise
                warnings.warn(f"frame ingestion falls back to a thread: {e}", RuntimeWarning, stacklevel=2)
                self.ingest = "thread"
            else:  # an engine dropped without stop() still takes its worker with it
                weakref.finalize(self, self._worker.close, 0.5)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(
        self,
        question: str | None = None,
        *,
        system: str | None = None,
        assistant_prefix: str = "",
        prompt_ids: Sequence[int] | None = None,
        header_ids: Sequence[int] | None = None,
    ) -> None:
        """Prefill the prompt into the video cache and start ingestion.

        With a question: prompt and header come from `tays.protocol.chat_ids` (the header,
        "<|im_start|>assistant\\n" + assistant_prefix, is teacher-forced by the first decode), so
        frames sit between the user turn and the assistant turn. Or pass token ids directly.
        """
        if self._started:
            raise RuntimeError("engine already started; create a new StreamingEngine per stream")
        if self._stopping.is_set():
            raise RuntimeError("the engine was stopped")
        if prompt_ids is None:
            if question is None:
                raise ValueError("start() needs a question or prompt_ids")
            prompt_ids, hdr = chat_ids(self.vlm, question, system, assistant_prefix)
            header_ids = hdr if header_ids is None else header_ids
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.header_ids = [int(i) for i in (header_ids or [])]
        if not self.prompt_ids:
            raise ValueError("the prompt must have at least one token")
        self.prompt_len = P = len(self.prompt_ids)
        self.reasoning_base = P if self._reasoning_base_arg is None else int(self._reasoning_base_arg)
        self.vision_base = P
        self.start_time = time.perf_counter()
        self._started = True

        dev = self.vlm.device
        self._video.begin(P)
        with torch.inference_mode():
            h = self.decoder.embed(self.prompt_ids)
            pos = text_position_ids(0, 0, P, dev)[:, None]
            causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
            self.decoder.run(h, pos, lambda li, k, v: [(k, v, causal)], self._video.put, need_logits=False)
        self._video.advance(P)
        self._history.append(Segment(PROMPT, P))
        stream = None
        if self._cuda:
            stream = torch.cuda.Stream(device=dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
        self._publish()
        if self._worker is not None:
            hooks = Hooks(self._publish, self._item_done, self._worker_failed, self._stopping)
            conn, tp = self._worker.conn, self.vlm.temporal_patch_size
            targets = [
                (send_frames, "ingest-send", (conn, self._video.stacked(0, P), P, self._queue, tp, hooks)),
                (receive_groups, "ingest", (conn, self._video, hooks, self.start_time)),
            ]
        else:
            hooks = Hooks(self._publish, self._item_done, self._ingest_failed, self._stopping)
            ingestor = Ingestor(self.vlm, self.decoder, self._video, self._interval, P, self.start_time)
            targets = [(ingest_frames, "ingest", (ingestor, self._queue, hooks, stream))]
        for fn, name, args in targets:
            t = threading.Thread(target=fn, args=args, name=THREAD_PREFIX + name, daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop ingestion (queued frames are dropped) and the feeder; join every engine thread
        and, in process mode, make sure the worker process is gone."""
        self._stopping.set()
        self._queue.put(STOP)
        with self._cv:
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.shutdown()  # unblocks the engine's ingest threads; the worker exits
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        if self._worker is not None:
            self._worker.close(timeout)

    def __enter__(self) -> StreamingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def close(self) -> None:
        self.stop()

    def attach(self, recorder: StreamRecorder | None) -> None:
        """Capture attention from now on (`tays.capture`): every decode call hands `recorder`
        references to its view, text keys and queries, and every pushed frame is handed to it.
        None detaches. Costs the decoding thread a few list operations per layer."""
        self._recorder = recorder

    # -- frames ----------------------------------------------------------------------------------
    def push_frame(self, frame: Any, t: float | None = None) -> None:
        """Queue one frame (PIL image / HxWx3 array) at stream time t (default: count / fps).
        Every `temporal_patch_size` frames make one group, whose time is its last frame's."""
        self._check_running()
        self._raise_error()
        if self._ended:
            raise RuntimeError("end_of_stream() was called: no more frames")
        if t is None:
            t = self._n_frames_pushed / self.fps
        self._n_frames_pushed += 1
        if self._recorder is not None:
            self._recorder.on_frame(frame, float(t))
        with self._cv:
            self._pushed += 1
        self._queue.put((frame, float(t)))

    def push_frames(self, frames: Iterable[Any], times: Iterable[float] | None = None) -> None:
        frames = list(frames)
        times = [None] * len(frames) if times is None else list(times)
        for f, t in zip(frames, times, strict=True):
            self.push_frame(f, t)

    def end_of_stream(self) -> None:
        """No more frames: an incomplete last group is padded (last frame repeated) and ingested."""
        self._check_running()
        if self._ended:
            return
        self._ended = True
        with self._cv:
            self._pushed += 1
        self._queue.put(FLUSH)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every pushed frame was ingested (a group still missing frames waits for
        them). False on timeout. Re-raises an ingestion error."""
        with self._cv:
            ok = self._cv.wait_for(
                lambda: self._done >= self._pushed or self._error is not None or self._stopping.is_set(), timeout
            )
        self._raise_error()
        return ok

    def wait_frames(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least n frame groups are committed (or the stream ended / stopped)."""
        with self._cv:
            ok = self._cv.wait_for(
                lambda: (
                    self._video.n_groups >= n
                    or self._error is not None
                    or self._stopping.is_set()
                    or (self._ended and self._done >= self._pushed)
                ),
                timeout,
            )
        self._raise_error()
        return ok and self._video.n_groups >= n

    def play(
        self, frames: Iterable[Any], realtime: bool = True, speed: float = 1.0, end: bool = True
    ) -> threading.Thread:
        """Feed frames from a thread (``tays-feeder``): items are (t, frame) pairs (as
        `vstream.world.shapes_video.Stream.frames` yields) or bare frames (t = count / fps). With
        realtime, each frame is pushed at its time (wall clock since this call, / speed).
        Calls end_of_stream() at the end unless end=False."""
        self._check_running()
        t_start = time.perf_counter()

        def feed() -> None:
            try:
                for i, item in enumerate(frames):
                    if self._stopping.is_set():
                        return
                    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, float)):
                        t, frame = float(item[0]), item[1]
                    else:
                        t, frame = i / self.fps, item
                    if realtime:
                        delay = t_start + t / speed - time.perf_counter()
                        if delay > 0 and self._stopping.wait(delay):
                            return
                    self.push_frame(frame, t)
                if end and not self._stopping.is_set():
                    self.end_of_stream()
            except BaseException as e:  # surfaces in the decoder
                with self._cv:
                    if self._error is None:
                        self._error = e
                    self._cv.notify_all()

        th = threading.Thread(target=feed, name=THREAD_PREFIX + "feeder", daemon=True)
        self._threads.append(th)
        th.start()
        return th

    # -- what the ingestion threads call (tays.ingest.Hooks) --------------------------------------
    def _publish(self, seg: Segment | None = None, rec: FrameRecord | None = None) -> None:
        """Make the video cache's current state the view decode steps read (with a committed
        group's segment and record, if given)."""
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.vlm.device))
        view = self._video.view(event)
        with self._cv:
            self._view = view
            if seg is not None:
                self._history.append(seg)
            if rec is not None:
                self.frame_log.append(rec)
            self._cv.notify_all()

    def _item_done(self) -> None:
        with self._cv:
            self._done += 1
            self._cv.notify_all()

    def _ingest_failed(self, e: BaseException) -> None:
        """Thread mode: the ingestion thread's error is the one to re-raise."""
        with self._cv:
            self._error = e
            self._cv.notify_all()

    def _worker_failed(self, e: BaseException) -> None:
        """Process mode: the first error is re-raised (a stopping engine ignores the worker hanging
        up), and the worker exits (no process outlives a failed ingestion)."""
        with self._cv:
            if self._error is None and not self._stopping.is_set():
                self._error = e
            self._cv.notify_all()
        self._worker.shutdown()

    # -- decoding --------------------------------------------------------------------------------
    def video_view(self) -> VideoView:
        """The current published view of the video cache (consistent across layers)."""
        self._check_started()
        with self._cv:
            return self._view

    def decode_step(self, token_ids: int | Sequence[int]) -> torch.Tensor:
        """Feed reasoning token(s) (teacher-forced): they attend to the video cache as of now plus
        the text cache, and append their K/V to the text cache only. Returns float32 logits
        (n, vocab), one row per fed token. (The last token `generate` yielded is fed by the next
        `generate` call; feed it yourself if you continue with decode_step.)"""
        self._check_running()
        self._raise_error()
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        self._pending = None  # tokens fed by hand supersede an unfed generated one
        if not ids:
            raise ValueError("decode_step needs at least one token")
        dev, text = self.vlm.device, self._text
        with self._decode_lock, torch.inference_mode():
            view = self.video_view()
            if view.event is not None:
                cur = torch.cuda.current_stream(dev)
                cur.wait_event(view.event)
                for buf in (*view.keys, *view.values):
                    buf.record_stream(cur)
            n, T = len(ids), text.length
            text.reserve(n)
            h = self.decoder.embed(ids)
            pos = text_position_ids(self.reasoning_base, T, n, dev)[:, None]
            tmask = None  # (n, T + n): causal among the fed tokens
            if n > 1:
                tmask = torch.arange(T + n, device=dev)[None, :] <= (torch.arange(n, device=dev)[:, None] + T)

            def context(li: int, k: torch.Tensor, v: torch.Tensor):
                segs = [(view.keys[li][:, :, s:e], view.values[li][:, :, s:e], None) for s, e in view.spans]
                return [*segs, (*text.segment(li, 0, T + n), tmask)]

            rec = self._recorder
            probe = None
            if rec is not None:
                rec.begin_call(view, text.keys, T + n, ids)
                probe = rec.record_query
            logits = self.decoder.run(h, pos, context, text.put, need_logits=True, probe=probe)[0].float()
            text.advance(n)
            with self._cv:
                self._history.append(Segment(TEXT, n, time=view.time, frames_seen=view.n_groups))
            self._last_logits = logits[-1]
            self._last_view = view
            return logits

    def generate(
        self,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        stop_event: threading.Event | None = None,
        wait_tokens: Iterable[int] = (),
        min_frames: int = 0,
        eos_token_ids: Iterable[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield tokens while frames keep arriving (decoding runs in the caller's thread; frames
        are ingested concurrently). Starts by teacher-forcing the assistant header if the text
        cache is empty. Ends at eos (not yielded), max_new_tokens or stop_event.

        min_frames: first wait until that many frame groups are in (or the stream ended).
        wait_tokens: after emitting one of these (e.g. the end-of-step token), wait for a new
        frame group before decoding on (think as you see: one step per new evidence), unless
        the stream has ended.
        """
        self._check_running()
        eos = set(self.vlm.eos_token_ids if eos_token_ids is None else eos_token_ids)
        waits = set(int(t) for t in wait_tokens)
        if min_frames > 0:
            self.wait_frames(min_frames)
        if self._text.length == 0 or self._last_logits is None:
            logits = self.decode_step(self.header_ids or self.prompt_ids[-1:])[-1]
        elif self._pending is not None:  # the last token of a previous generate() was not fed yet
            logits = self.decode_step([self._pending])[-1]
        else:
            logits = self._last_logits
        self._pending = None
        decoder = IncrementalDecoder(self.vlm.tokenizer)
        for i in range(int(max_new_tokens)):
            if stop_event is not None and stop_event.is_set():
                return
            tok = next_token(logits, do_sample=do_sample, temperature=temperature, generator=generator)
            if tok in eos:
                return
            view = self._last_view
            self.generated.append(tok)
            yield TokenEvent(tok, decoder.push(tok), i, time.perf_counter() - self.start_time, view.n_groups, view.time)
            if tok in waits:
                with self._cv:
                    self._cv.wait_for(  # the predicate runs here, in this iteration
                        lambda: (
                            self._video.n_groups > view.n_groups  # noqa: B023
                            or self._error is not None
                            or self._stopping.is_set()
                            or (stop_event is not None and stop_event.is_set())
                            or (self._ended and self._done >= self._pushed)
                        )
                    )
            if i + 1 < max_new_tokens:
                logits = self.decode_step([tok])[-1]
            else:
                self._pending = tok

    # -- introspection ---------------------------------------------------------------------------
    @property
    def frames_ingested(self) -> int:
        """Frame groups committed to the video cache."""
        return self._video.n_groups

    @property
    def text_len(self) -> int:
        return self._text.length

    @property
    def video_capacity(self) -> int:
        return self._video.capacity

    def segments(self) -> list[Segment]:
        """Chronological history (prompt, frame groups as committed, decode steps with the frames
        they saw): `tays.mask.streaming_mask` / `tays.positions.streaming_position_ids` of it
        reproduce exactly what the engine computed."""
        with self._cv:
            return list(self._history)

    def threads(self) -> list[threading.Thread]:
        return [t for t in self._threads if t.is_alive()]

    @property
    def worker_pid(self) -> int | None:
        """pid of the ingestion worker process (ingest="process"), None otherwise."""
        return None if self._worker is None else self._worker.pid

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.alive()

    # -- helpers ---------------------------------------------------------------------------------
    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("call start() first")

    def _check_running(self) -> None:
        self._check_started()
        if self._stopping.is_set():
            raise RuntimeError("the engine was stopped")

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"frame ingestion failed: {type(self._error).__name__}: {self._error}") from self._error
