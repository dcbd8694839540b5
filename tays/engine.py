"""TaYS streaming engine: think while watching, with a real parallel dual KV cache (issue item 3).

    eng = StreamingEngine(vlm, visual_window=None, fps=2.0)
    eng.start("What happens in the video?")      # prompt -> video cache (prefill)
    eng.play(stream.frames(2.0))                  # or eng.push_frame(img, t) from any thread
    for ev in eng.generate(max_new_tokens=64):    # decodes while frames keep arriving
        print(ev.text, end="", flush=True)
    eng.stop()                                    # joins every thread (also on `with` exit)

Two caches, two writers:

* video cache: per layer K/V (post-RoPE) of the prompt and of every frame group. Only the
  ingestion thread (``tays-ingest``) writes it: it encodes a frame group with the vision tower,
  runs the group's tokens through the decoder layers attending to [prompt + earlier groups] (and
  causally to itself), never to reasoning, and appends the group's K/V.
  With ``ingest="process"`` (the default on CPU) the encoding and the decoder-layer pass run in a
  worker process instead (`tays.ingest`: its own interpreter, so no GIL contention with decoding,
  and one torch thread), against the worker's own copy of the video cache (same eviction); the
  ``tays-ingest`` thread then only appends the K/V the worker sends. ``ingest="thread"`` (the
  default on CUDA, with its own stream) computes in the thread.
* text cache: per layer K/V of the reasoning tokens (assistant header + generated tokens).
  Only decoding writes it.

A decode step attends to (video cache as of now) + (text cache). Nothing is concatenated or
copied: attention runs over each segment separately (views into the buffers) and the partial
results are merged by their log-sum-exp, as flash-attention merges its blocks.

Buffers are preallocated per layer as (1, kv_heads, capacity, head_dim) and grow by doubling.
The ingestion thread publishes an immutable `VideoView` (buffer references + the token spans a
reader may see + how many groups) after each group is complete, under a lock; a decode step
takes one view for all layers, so every layer sees the same frames. Ingestion never writes memory
a published view can read: new K/V go past the published spans, and growing or compacting
allocates fresh buffers (a reader still holding the old ones keeps them alive). On CUDA the
ingestion thread runs on its own stream; a view carries an event the decoder waits on, and the
decoder marks the buffers it reads with `record_stream`.

Visual window (`visual_window=W` frame groups): a decode step sees the prompt + the newest W
groups, a new group sees the prompt + the W-1 groups before it. Old groups stay in the buffer
(invisible) until it is full; then the prompt and the visible groups are compacted into a fresh
buffer of twice their size, so memory stays bounded and the copying is amortised.

Positions are the decoupled ones of `tays.positions` (frames: 3-D mRoPE after the prompt, by
absolute group index; reasoning: R0 + i on all three axes), so the logits equal one full forward
with `tays.mask.streaming_mask` (see `segments()` and tests/test_tays_engine.py).

The engine drives the decoder layers itself with the model's own weights (norms, q/k/v/o
projections, rotary embedding, GQA, MLP); it never calls `model.forward`, so it does not touch
the model's `rope_deltas` state and needs no `vlm.lock`.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tays.forward import check_supported, encode_frames, video_interval
from tays.mask import FRAME, PROMPT, TEXT, Segment
from tays.positions import frame_position_ids, text_position_ids

__all__ = ["INGEST_MODES", "FrameRecord", "StreamingEngine", "TokenEvent", "VideoView", "attend_segments"]

_STOP = object()
_FLUSH = object()
THREAD_PREFIX = "tays-"
INGEST_MODES = ("thread", "process", "inline")  # inline: no concurrency (the worker process's own engine)


# ----------------------------------------------------------------------------------------------
# attention over several K/V segments, merged by log-sum-exp (no concatenation)


def attend_segments(
    q: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    scale: float,
) -> torch.Tensor:
    """softmax(q K^T * scale) V over the union of `segments`, without concatenating them.

    q: (B, Hq, Lq, D). Each segment: keys/values (B, Hkv, Lk, D) (any strides, e.g. a slice of a
    preallocated buffer) and an optional boolean (Lq, Lk) mask (True = attend). GQA: query head
    h uses kv head h // (Hq // Hkv), as transformers' repeat_kv, without repeating K/V.
    Per segment we keep the row max m, the sum l of exp(s - m) and the unnormalised output, and
    merge them with the running ones (the flash-attention recurrence), in float32.
    Returns (B, Lq, Hq * D) in q's dtype.
    """
    B, Hq, Lq, D = q.shape
    acc = m_run = l_run = None
    for k, v, mask in segments:
        Lk = k.shape[-2]
        if Lk == 0:
            continue
        Hkv = k.shape[1]
        G = Hq // Hkv
        qg = q.reshape(B, Hkv, G * Lq, D)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G*Lq, Lk)
        if mask is not None:
            s = s.view(B, Hkv, G, Lq, Lk).masked_fill(~mask, -math.inf).view(B, Hkv, G * Lq, Lk)
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p.to(v.dtype), v).float()  # (B, Hkv, G*Lq, D)
        if acc is None:
            acc, m_run, l_run = o, m, l
            continue
        m_new = torch.maximum(m_run, m)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        a, b = torch.exp(m_run - m_safe), torch.exp(m - m_safe)
        acc = acc * a + o * b
        l_run = l_run * a + l * b
        m_run = m_new
    if acc is None:
        raise ValueError("attention over no keys")
    out = acc / l_run.clamp_min(torch.finfo(torch.float32).tiny)
    return out.view(B, Hq, Lq, D).transpose(1, 2).reshape(B, Lq, Hq * D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# public records


@dataclass(frozen=True)
class VideoView:
    """What a decode step may read of the video cache: immutable, published by ingestion."""

    keys: tuple[torch.Tensor, ...]  # per layer (1, Hkv, capacity, D)
    values: tuple[torch.Tensor, ...]
    spans: tuple[tuple[int, int], ...]  # token ranges of the buffers that are visible
    n_groups: int  # frame groups committed so far (absolute count)
    first_group: int  # absolute index of the oldest visible group (== n_groups if none)
    time: float  # arrival time of the newest group (-inf if none)
    event: Any = None  # CUDA event the reader waits on

    @property
    def length(self) -> int:
        return sum(e - s for s, e in self.spans)


@dataclass(frozen=True)
class FrameRecord:
    index: int  # absolute frame-group index
    time: float  # stream time of the group (its last frame's time)
    tokens: int
    encode_s: float  # vision tower
    ingest_s: float  # vision tower + decoder layers
    committed_at: float  # seconds since start()


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # decoded piece ("" while a multi-byte character is incomplete)
    index: int  # 0-based among the generated tokens
    time: float  # wall seconds since start() when the token was produced
    frames_seen: int  # frame groups committed when the step that produced it ran
    stream_time: float  # stream time of the newest frame group it saw (-inf: none)


# ----------------------------------------------------------------------------------------------
# the engine


def _alloc(n_layers: int, hkv: int, cap: int, d: int, dtype, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ks = [torch.empty(1, hkv, cap, d, dtype=dtype, device=device) for _ in range(n_layers)]
    vs = [torch.empty(1, hkv, cap, d, dtype=dtype, device=device) for _ in range(n_layers)]
    return ks, vs


def project_qkv(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """(B, heads, L, D) queries and (B, kv_heads, L, D) keys/values of one decoder layer, with
    the model's own RoPE applied: keys are cached post-RoPE, as transformers does."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    B, L, _ = x.shape
    q = attn.q_proj(x).view(B, L, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, L, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def chat_ids(vlm: Any, question: str, system: str | None = None, assistant_prefix: str = "") -> tuple[list[int], list[int]]:
    """(user-turn ids, assistant-header ids): the prompt goes to the video cache, the header
    is the first thing decoding feeds."""
    tok = vlm.tokenizer
    msgs: list[dict[str, Any]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": [{"type": "text", "text": question}]})
    base = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    full = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + assistant_prefix
    if not full.startswith(base):
        raise ValueError("the chat template's generation prompt does not extend the user turn")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return enc(base), enc(full[len(base):])


class StreamingEngine:
    """Think-as-you-see decoding on a Qwen2.5-VL `vstream.model.VLM` (see the module docstring).

    visual_window: frame groups a step may see (None: all). fps: frame rate of the stream, for
    the temporal mRoPE spacing (``temporal_patch_size / fps`` seconds per group) and the default
    frame times. reasoning_base: R0 of the reasoning positions (default: prompt length).
    ingest: where frame groups are encoded and prefilled: "process" (a worker process forked from
    the `tays.ingest` server when the engine is built; CPU only), "thread" (a thread of this
    process), or "auto" (the ``TAYS_INGEST`` environment variable if set, else "process" on CPU
    and "thread" on CUDA; falls back to "thread" with a warning if no worker can be started).
    ingest_threads: torch threads of the worker process (this process keeps its own setting).
    """

    def __init__(
        self,
        vlm: Any,
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

        model = vlm.model
        self._lm = model.model.language_model
        self._layers = list(self._lm.layers)
        self._lm_head = model.lm_head
        self._embed = model.get_input_embeddings()
        attn0 = self._layers[0].self_attn
        self._head_dim = int(attn0.head_dim)
        self._hkv = int(vlm.text_config.num_key_value_heads)
        self._device = vlm.device
        self._dtype = vlm.dtype
        self._cuda = self._device.type == "cuda"

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._decode_lock = threading.RLock()
        self._started = False
        self._stopped = False
        self._reset_state()
        self.ingest = self._resolve_ingest(ingest)
        self._worker = None
        if self.ingest == "process":
            self._spawn_worker(ingest, int(ingest_threads))

    def _resolve_ingest(self, ingest: str) -> str:
        if ingest == "auto":
            ingest = os.environ.get("TAYS_INGEST", "").strip().lower() or "auto"
            if ingest == "auto":
                return "process" if self._device.type == "cpu" else "thread"
        if ingest not in INGEST_MODES:
            raise ValueError(f"ingest must be one of auto, {', '.join(INGEST_MODES)}; got {ingest!r}")
        if ingest == "process" and self._device.type != "cpu":
            raise ValueError(f"ingest='process' runs on CPU only (the model is on {self._device}); use 'thread'")
        return ingest

    def _spawn_worker(self, requested: str, threads: int) -> None:
        from tays import ingest as ingest_mod

        cfg = dict(visual_window=self.visual_window, fps=self.fps, initial_capacity=self._initial_capacity,
                   threads=max(1, threads))
        try:
            self._worker = ingest_mod.spawn_worker(self.vlm, cfg)
        except ingest_mod.IngestProcessError as e:
            if requested == "process":
                raise
            warnings.warn(f"frame ingestion falls back to a thread: {e}", RuntimeWarning, stacklevel=3)
            self.ingest = "thread"
            return
        # an engine dropped without stop() still takes its worker with it
        self._worker_finalizer = weakref.finalize(self, self._worker.close, 0.5)

    # -- state -----------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.prompt_ids: list[int] = []
        self.header_ids: list[int] = []
        self.prompt_len = 0
        self.reasoning_base = 0
        self.vision_base = 0
        self.frame_log: list[FrameRecord] = []
        self._history: list[Segment] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._pushed = 0  # items put on the queue (frames + flushes)
        self._done = 0  # items the ingestion thread finished
        self._n_frames_pushed = 0
        self._ended = False  # end_of_stream() processed: no more frames will come
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = time.perf_counter()
        # video cache (written by start() before the thread starts, then by the thread only)
        self._vk: list[torch.Tensor] = []
        self._vv: list[torch.Tensor] = []
        self._vcap = 0
        self._vn = 0
        self._groups: list[tuple[int, int, int, float]] = []  # (index, start, length, time) in buffer
        self._n_groups = 0
        self._last_group_time = -math.inf
        self._view: VideoView | None = None
        self._ingest_stream = None
        # text cache (decoder only)
        self._tk: list[torch.Tensor] = []
        self._tv: list[torch.Tensor] = []
        self._tcap = 0
        self._tn = 0
        self._last_logits: torch.Tensor | None = None
        self._last_view: VideoView | None = None
        self._pending: int | None = None  # generated but not yet fed
        self.generated: list[int] = []

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
        """Prefill the prompt into the video cache and start the ingestion thread.

        With a question: prompt = the chat-templated user turn (system + question, no video
        placeholder); the text cache later starts with the generation prompt
        ("<|im_start|>assistant\\n" + assistant_prefix), teacher-forced by the first decode.
        Frames thus sit between the user turn and the assistant turn. Or pass token ids directly.
        """
        if self._started:
            raise RuntimeError("engine already started; create a new StreamingEngine per stream")
        if self._stopping.is_set():
            raise RuntimeError("the engine was stopped")
        if self.ingest == "inline":
            raise RuntimeError("an ingest='inline' engine is driven by tays.ingest, not started")
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
        self._t0 = time.perf_counter()
        self._started = True

        cap = max(self._initial_capacity, 2 * P)
        self._vk, self._vv = _alloc(len(self._layers), self._hkv, cap, self._head_dim, self._dtype, self._device)
        self._vcap = cap
        with torch.inference_mode():
            ids = torch.tensor(self.prompt_ids, dtype=torch.long, device=self._device)
            h = self._embed(ids)[None]
            pos = text_position_ids(0, 0, P, self._device)[:, None]
            causal = torch.ones(P, P, dtype=torch.bool, device=self._device).tril()

            def store(li: int, k: torch.Tensor, v: torch.Tensor) -> None:
                self._vk[li][:, :, :P] = k
                self._vv[li][:, :, :P] = v

            self._run(h, pos, lambda li, k, v: [(k, v, causal)], store, need_logits=False)
        self._vn = P
        self._history.append(Segment(PROMPT, P))
        if self._cuda:
            self._ingest_stream = torch.cuda.Stream(device=self._device)
            self._ingest_stream.wait_stream(torch.cuda.current_stream(self._device))
        self._publish()
        if self.ingest == "process":
            L = len(self._layers)
            prompt_kv = torch.stack([self._vk[li][0, :, :P] for li in range(L)] + [self._vv[li][0, :, :P] for li in range(L)])
            targets = [(self._send_loop, "ingest-send", (prompt_kv,)), (self._recv_loop, "ingest", ())]
        else:
            targets = [(self._ingest_loop, "ingest", ())]
        for fn, name, args in targets:
            t = threading.Thread(target=fn, args=args, name=THREAD_PREFIX + name, daemon=True)
            self._threads.append(t)
            t.start()

    def _adopt_prompt(self, keys: torch.Tensor, values: torch.Tensor, vision_base: int) -> None:
        """(ingest="inline", in the worker process) the engine's prompt K/V, (layers, Hkv, P, D)
        each, as the video cache's start: what start() computes, without computing it."""
        self.prompt_len = P = int(keys.shape[2])
        self.vision_base = int(vision_base)
        cap = max(self._initial_capacity, 2 * P)
        self._vk, self._vv = _alloc(len(self._layers), self._hkv, cap, self._head_dim, self._dtype, self._device)
        self._vcap = cap
        for li in range(len(self._layers)):
            self._vk[li][0, :, :P] = keys[li]
            self._vv[li][0, :, :P] = values[li]
        self._vn = P
        self._groups, self._n_groups = [], 0
        self._started = True
        self._publish()

    def stop(self, timeout: float | None = None) -> None:
        """Stop ingestion (queued frames are dropped) and the feeder; join every engine thread
        and, in process mode, make sure the worker process is gone."""
        self._stopping.set()
        self._queue.put(_STOP)
        with self._cv:
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.shutdown()  # unblocks the engine's ingest threads; the worker exits
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        if self._worker is not None:
            self._worker.close(timeout)
        self._stopped = True

    def __enter__(self) -> StreamingEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def close(self) -> None:
        self.stop()

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
        self._queue.put(_FLUSH)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every pushed frame was ingested (a group still missing frames waits for
        them). False on timeout. Re-raises an ingestion error."""
        with self._cv:
            ok = self._cv.wait_for(lambda: self._done >= self._pushed or self._error is not None
                                   or self._stopping.is_set(), timeout)
        self._raise_error()
        return ok

    def wait_frames(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least n frame groups are committed (or the stream ended / stopped)."""
        with self._cv:
            ok = self._cv.wait_for(
                lambda: self._n_groups >= n or self._error is not None or self._stopping.is_set()
                or (self._ended and self._done >= self._pushed), timeout)
        self._raise_error()
        return ok and self._n_groups >= n

    def play(self, frames: Iterable[Any], realtime: bool = True, speed: float = 1.0,
             end: bool = True) -> threading.Thread:
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

    # -- ingestion in a worker process (ingest="process"; see tays.ingest) ------------------------
    def _count_done(self) -> None:
        """One queue item fully handled (what wait_ingested() counts)."""
        with self._cv:
            self._done += 1
            self._cv.notify_all()

    def _set_error(self, e: BaseException) -> None:
        with self._cv:
            if self._error is None and not self._stopping.is_set():
                self._error = e
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.shutdown()  # the worker exits (no process outlives a failed ingestion)

    def _send_loop(self, prompt_kv: torch.Tensor) -> None:
        """``tays-ingest-send``: prompt K/V, then the queued frames, to the worker. A frame that
        does not complete a group counts as done once sent (as the ingestion thread counts it
        once taken); a completed group counts when the worker's K/V are committed."""
        from tays import ingest as ingest_mod

        conn, tp, pending = self._worker.conn, self.vlm.temporal_patch_size, 0
        try:
            ingest_mod.send(conn, ("prompt", self.vision_base, ingest_mod.pack(prompt_kv)))
            while True:
                item = self._queue.get()
                if item is _STOP or self._stopping.is_set():
                    break
                if item is _FLUSH:
                    if pending:
                        ingest_mod.send(conn, ("flush",))
                        pending = 0
                        continue
                else:
                    ingest_mod.send(conn, ("frame", item[0], item[1]))
                    pending += 1
                    if pending == tp:
                        pending = 0
                        continue
                self._count_done()
        except OSError:
            return  # the worker hung up: `_recv_loop` reports why (its error, or that it died)
        except BaseException as e:  # e.g. a frame that cannot be pickled
            self._set_error(e)

    def _recv_loop(self) -> None:
        """``tays-ingest``: commits each group the worker sends, as `_ingest_group` does."""
        from tays import ingest as ingest_mod

        conn = self._worker.conn
        try:
            while True:
                try:
                    msg = ingest_mod.recv(conn)
                except (EOFError, OSError):
                    if not self._stopping.is_set():
                        self._set_error(RuntimeError("the ingestion worker process exited unexpectedly"))
                    return
                if msg[0] == "error":
                    self._set_error(msg[1])
                    return
                if msg[0] == "group" and not self._stopping.is_set():
                    with torch.inference_mode():
                        self._commit_group(msg[1], msg[2], ingest_mod.unpack(msg[3]))
                    self._count_done()
        except BaseException as e:
            self._set_error(e)

    def _commit_group(self, seg: Segment, rec: FrameRecord, kv: torch.Tensor) -> None:
        """Append a group ingested elsewhere: kv (2 * layers, Hkv, k, D), keys then values;
        rec's times are absolute perf_counter stamps of the worker."""
        g, k, L = seg.index, seg.length, len(self._layers)
        if g != self._n_groups or kv.shape[0] != 2 * L or kv.shape[2] != k:
            raise RuntimeError(f"the ingestion worker sent group {g} ({tuple(kv.shape)}), expected group {self._n_groups}")
        self._ensure_video_capacity(k)
        n = self._vn
        for li in range(L):
            self._vk[li][0, :, n:n + k] = kv[li]
            self._vv[li][0, :, n:n + k] = kv[L + li]
        self._vn = n + k
        self._groups.append((g, n, k, rec.time))
        self._n_groups = g + 1
        now = time.perf_counter()
        t_in = rec.committed_at - rec.ingest_s
        self._publish(seg, FrameRecord(g, rec.time, k, rec.encode_s, now - t_in, now - self._t0))

    # -- ingestion thread ------------------------------------------------------------------------
    def _ingest_loop(self) -> None:
        pending: list[tuple[Any, float]] = []
        tp = self.vlm.temporal_patch_size
        stream_ctx = torch.cuda.stream(self._ingest_stream) if self._ingest_stream is not None else _nullctx()
        try:
            with torch.inference_mode(), stream_ctx:
                while True:
                    item = self._queue.get()
                    if item is _STOP or self._stopping.is_set():
                        break
                    if item is _FLUSH:
                        if pending:
                            self._ingest_group(pending)
                            pending = []
                    else:
                        pending.append(item)
                        if len(pending) == tp:
                            self._ingest_group(pending)
                            pending = []
                    self._count_done()
        except BaseException as e:  # re-raised by the next push/decode/wait
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _ingest_group(self, items: list[tuple[Any, float]]) -> None:
        t_in = time.perf_counter()
        frames, t = [f for f, _ in items], items[-1][1]
        emb, grid = encode_frames(self.vlm, frames)
        t_enc = time.perf_counter()
        g, k = self._n_groups, emb.shape[0]
        pos = frame_position_ids(self.vision_base, g, grid, self._interval, self._device)[:, None]
        self._ensure_video_capacity(k)
        n, W = self._vn, self.visual_window
        ctx_groups = self._groups if W is None else (self._groups[-(W - 1):] if W > 1 else [])
        spans = self._spans(ctx_groups)
        causal = torch.ones(k, k, dtype=torch.bool, device=self._device).tril()
        vk, vv = self._vk, self._vv

        def store(li: int, kk: torch.Tensor, v: torch.Tensor) -> None:
            vk[li][:, :, n:n + k] = kk
            vv[li][:, :, n:n + k] = v

        def ctx(li: int, kk: torch.Tensor, v: torch.Tensor):
            return [(vk[li][:, :, s:e], vv[li][:, :, s:e], None) for s, e in spans] + [(kk, v, causal)]

        self._run(emb[None], pos, ctx, store, need_logits=False)
        self._vn = n + k
        self._groups.append((g, n, k, t))
        self._n_groups = g + 1
        now = time.perf_counter()
        seg = Segment(FRAME, k, time=t, grid=tuple(grid), index=g)
        rec = FrameRecord(g, t, k, t_enc - t_in, now - t_in, now - self._t0)
        self._publish(seg, rec)

    def _spans(self, groups: Sequence[tuple[int, int, int, float]]) -> list[tuple[int, int]]:
        """Prompt + the given groups (contiguous, newest last) as at most two buffer ranges."""
        P = self.prompt_len
        if not groups:
            return [(0, P)]
        s, e = groups[0][1], groups[-1][1] + groups[-1][2]
        return [(0, e)] if s == P else [(0, P), (s, e)]

    def _ensure_video_capacity(self, extra: int) -> None:
        """Room for `extra` more tokens; else a fresh buffer holding the prompt + the groups a
        reader may still need (all, or the newest W), with twice that room."""
        if self._vn + extra <= self._vcap:
            return
        W, P = self.visual_window, self.prompt_len
        keep = self._groups if W is None else self._groups[-W:]
        live = P + sum(g[2] for g in keep)
        cap = max(self._initial_capacity, 2 * (live + extra))
        nk, nv = _alloc(len(self._layers), self._hkv, cap, self._head_dim, self._dtype, self._device)
        s = keep[0][1] if keep else P
        for li in range(len(self._layers)):
            nk[li][:, :, :P] = self._vk[li][:, :, :P]
            nv[li][:, :, :P] = self._vv[li][:, :, :P]
            if keep:
                nk[li][:, :, P:live] = self._vk[li][:, :, s:self._vn]
                nv[li][:, :, P:live] = self._vv[li][:, :, s:self._vn]
        shift = s - P
        self._groups = [(i, st - shift, ln, t) for i, st, ln, t in keep]
        self._vk, self._vv, self._vcap, self._vn = nk, nv, cap, live
        self._publish()  # same visible frames, new buffers

    def _publish(self, seg: Segment | None = None, rec: FrameRecord | None = None) -> None:
        W = self.visual_window
        vis = self._groups if W is None else self._groups[-W:]
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
        view = VideoView(
            keys=tuple(self._vk), values=tuple(self._vv), spans=tuple(self._spans(vis)),
            n_groups=self._n_groups, first_group=vis[0][0] if vis else self._n_groups,
            time=vis[-1][3] if vis else -math.inf, event=event,
        )
        with self._cv:
            self._view = view
            if seg is not None:
                self._history.append(seg)
            if rec is not None:
                self.frame_log.append(rec)
            self._cv.notify_all()

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
        with self._decode_lock, torch.inference_mode():
            view = self.video_view()
            if view.event is not None:
                cur = torch.cuda.current_stream(self._device)
                cur.wait_event(view.event)
                for buf in (*view.keys, *view.values):
                    buf.record_stream(cur)
            n, T = len(ids), self._tn
            self._ensure_text_capacity(n)
            tk, tv = self._tk, self._tv
            h = self._embed(torch.tensor(ids, dtype=torch.long, device=self._device))[None]
            pos = text_position_ids(self.reasoning_base, T, n, self._device)[:, None]
            tmask = None
            if n > 1:
                tmask = (torch.arange(T + n, device=self._device)[None, :]
                         <= (torch.arange(n, device=self._device)[:, None] + T))

            def store(li: int, k: torch.Tensor, v: torch.Tensor) -> None:
                tk[li][:, :, T:T + n] = k
                tv[li][:, :, T:T + n] = v

            def ctx(li: int, k: torch.Tensor, v: torch.Tensor):
                segs = [(view.keys[li][:, :, s:e], view.values[li][:, :, s:e], None) for s, e in view.spans]
                return segs + [(tk[li][:, :, :T + n], tv[li][:, :, :T + n], tmask)]

            logits = self._run(h, pos, ctx, store, need_logits=True)[0].float()
            self._tn = T + n
            with self._cv:
                self._history.append(Segment(TEXT, n, time=view.time, frames_seen=view.n_groups))
            self._last_logits = logits[-1]
            self._last_view = view
            return logits

    def _ensure_text_capacity(self, extra: int) -> None:
        if self._tn + extra <= self._tcap:
            return
        cap = max(self._initial_capacity, 2 * (self._tn + extra))
        nk, nv = _alloc(len(self._layers), self._hkv, cap, self._head_dim, self._dtype, self._device)
        for li in range(len(self._layers)):
            if self._tn:
                nk[li][:, :, :self._tn] = self._tk[li][:, :, :self._tn]
                nv[li][:, :, :self._tn] = self._tv[li][:, :, :self._tn]
        self._tk, self._tv, self._tcap = nk, nv, cap

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
        from vstream.model import IncrementalDecoder

        self._check_running()
        eos = set(self.vlm.eos_token_ids if eos_token_ids is None else eos_token_ids)
        waits = set(int(t) for t in wait_tokens)
        if min_frames > 0:
            self.wait_frames(min_frames)
        if self._tn == 0 or self._last_logits is None:
            first = self.header_ids or self.prompt_ids[-1:]
            logits = self.decode_step(first)[-1]
        elif self._pending is not None:  # the last token of a previous generate() was not fed yet
            logits = self.decode_step([self._pending])[-1]
        else:
            logits = self._last_logits
        self._pending = None
        decoder = IncrementalDecoder(self.vlm.tokenizer)
        for i in range(int(max_new_tokens)):
            if stop_event is not None and stop_event.is_set():
                return
            if do_sample:
                probs = torch.softmax(logits / max(float(temperature), 1e-6), dim=-1)
                tok = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            else:
                tok = int(logits.argmax())
            if tok in eos:
                return
            view = self._last_view
            self.generated.append(tok)
            yield TokenEvent(tok, decoder.push(tok), i, time.perf_counter() - self._t0, view.n_groups, view.time)
            if tok in waits:
                with self._cv:
                    self._cv.wait_for(lambda: self._n_groups > view.n_groups or self._error is not None
                                      or self._stopping.is_set() or (stop_event is not None and stop_event.is_set())
                                      or (self._ended and self._done >= self._pushed))
            if i + 1 < max_new_tokens:
                logits = self.decode_step([tok])[-1]
            else:
                self._pending = tok

    # -- the shared layer loop -------------------------------------------------------------------
    def _run(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        context: Callable[[int, torch.Tensor, torch.Tensor], list],
        store: Callable[[int, torch.Tensor, torch.Tensor], None],
        need_logits: bool,
    ) -> torch.Tensor | None:
        """Run (1, L, hidden) embeddings through the decoder layers with our own attention:
        per layer, K/V (post-RoPE) go to `store`, and the queries attend to `context(layer, k, v)`
        segments. The last layer's attention/MLP is skipped when no logits are needed."""
        cos, sin = self._lm.rotary_emb(h, pos)
        B, L, _ = h.shape
        D = self._head_dim
        last = len(self._layers) - 1
        for li, layer in enumerate(self._layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = project_qkv(attn, x, cos, sin, D)
            store(li, k, v)
            if li == last and not need_logits:
                return None
            o = attend_segments(q, context(li, k, v), attn.scaling)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._lm_head(self._lm.norm(h))

    # -- introspection ---------------------------------------------------------------------------
    @property
    def frames_ingested(self) -> int:
        """Frame groups committed to the video cache."""
        return self._n_groups

    @property
    def text_len(self) -> int:
        return self._tn

    @property
    def video_capacity(self) -> int:
        return self._vcap

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


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
