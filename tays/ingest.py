"""Frame ingestion: frame groups from the engine's queue into its video cache.

An `Ingestor` encodes one frame group with the vision tower and runs its tokens through the decoder
layers against a `tays.cache.VideoCache` (the group attends to the prompt, the visible groups
before it and, causally, itself; never to reasoning), then commits the group's K/V. Where it runs
is the engine's ``ingest`` mode:

* ``thread``: `ingest_frames` is the engine's ``tays-ingest`` thread (on CUDA with its own stream).
* ``process``: a worker process (`run_worker`, forked by `tays.server`) runs the same `Ingestor`
  against its own copy of the video cache (same window and compaction) and sends each group's K/V
  back; in the engine `send_frames` (``tays-ingest-send``) forwards the queued frames and
  `receive_groups` (``tays-ingest``) appends what comes back to the engine's cache.

Messages between engine and worker, in order: ("prompt", vision_base, prompt K/V), then ("frame",
image, time) and ("flush",) from the engine; ("ready", pid), ("group", segment, record, K/V) and
("error", exception) from the worker. The worker exits when the engine's socket closes, after
reporting an error, or when the engine's process is gone.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from tays.cache import VideoCache
from tays.decoder import Decoder
from tays.forward import check_supported, encode_frames, video_interval
from tays.ipc import pack, picklable_error, recv, send, unpack
from tays.mask import FRAME, Segment
from tays.positions import frame_position_ids
from vstream.model import VLM

__all__ = [
    "FLUSH",
    "INGEST_MODES",
    "STOP",
    "FrameRecord",
    "Hooks",
    "Ingestor",
    "ingest_frames",
    "ingest_mode",
    "receive_groups",
    "run_worker",
    "send_frames",
]

INGEST_MODES = ("thread", "process")
STOP = object()  # queue item: stop ingesting
FLUSH = object()  # queue item: end of stream, ingest an incomplete group (padded)


def ingest_mode(requested: str, device: torch.device) -> str:
    """ "thread" or "process" for an engine's ``ingest`` argument ("auto": the ``TAYS_INGEST``
    environment variable if set, else "process" on CPU and "thread" on CUDA)."""
    mode = requested
    if mode == "auto":
        mode = os.environ.get("TAYS_INGEST", "").strip().lower() or "auto"
        if mode == "auto":
            return "process" if device.type == "cpu" else "thread"
    if mode not in INGEST_MODES:
        raise ValueError(f"ingest must be one of auto, {', '.join(INGEST_MODES)}; got {mode!r}")
    if mode == "process" and device.type != "cpu":
        raise ValueError(f"ingest='process' runs on CPU only (the model is on {device}); use 'thread'")
    return mode


@dataclass(frozen=True)
class FrameRecord:
    index: int  # absolute frame-group index
    time: float  # stream time of the group (its last frame's time)
    tokens: int
    encode_s: float  # vision tower
    ingest_s: float  # vision tower + decoder layers
    committed_at: float  # seconds since the engine's start()


class Ingestor:
    """Frame groups into a video cache (module docstring). vision_base: V0 of the frame positions;
    t0: the perf_counter origin of `FrameRecord.committed_at`."""

    def __init__(
        self, vlm: VLM, decoder: Decoder, cache: VideoCache, interval: torch.Tensor, vision_base: int, t0: float
    ):
        self.vlm, self.decoder, self.cache = vlm, decoder, cache
        self.interval, self.vision_base, self.t0 = interval, vision_base, t0

    def ingest(
        self, items: list[tuple[Any, float]], on_new_buffers: Callable[[], None] | None = None
    ) -> tuple[Segment, FrameRecord]:
        """Ingest one group of (frame, time) items and commit it; `on_new_buffers` is called if
        the cache had to replace its buffers first (the visible frames are the same)."""
        t_in = time.perf_counter()
        frames, t = [f for f, _ in items], items[-1][1]
        emb, grid = encode_frames(self.vlm, frames)  # (k, hidden)
        t_enc = time.perf_counter()
        cache, dev = self.cache, self.decoder.device
        g, k = cache.n_groups, emb.shape[0]
        pos = frame_position_ids(self.vision_base, g, grid, self.interval, dev)[:, None]
        if cache.reserve(k) and on_new_buffers is not None:
            on_new_buffers()
        spans = cache.context_spans()
        causal = torch.ones(k, k, dtype=torch.bool, device=dev).tril()

        def context(li: int, kk: torch.Tensor, v: torch.Tensor):
            return [(*cache.segment(li, s, e), None) for s, e in spans] + [(kk, v, causal)]

        self.decoder.run(emb[None], pos, context, cache.put, need_logits=False)
        cache.add_group(g, k, t)
        now = time.perf_counter()
        seg = Segment(FRAME, k, time=t, grid=tuple(grid), index=g)
        return seg, FrameRecord(g, t, k, t_enc - t_in, now - t_in, now - self.t0)


@dataclass(frozen=True)
class Hooks:
    """How the ingestion threads report to their engine (every call comes from such a thread)."""

    publish: Callable[..., None]  # (segment, record) of a committed group, or () after new buffers
    item_done: Callable[[], None]  # one queue item fully handled (what the engine's wait_idle counts)
    fail: Callable[[BaseException], None]  # re-raised by the engine's next push / decode / wait
    stopping: threading.Event  # the engine is stopping: leave at once


def ingest_frames(ingestor: Ingestor, frames: queue.Queue, hooks: Hooks, stream: Any = None) -> None:
    """The ``tays-ingest`` thread (ingest="thread"): every `temporal_patch_size` queued frames
    (or fewer at FLUSH) make a group, ingested and published; `stream`: its CUDA stream."""
    pending: list[tuple[Any, float]] = []
    tp = ingestor.vlm.temporal_patch_size
    on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), on_stream:
            while True:
                item = frames.get()
                if item is STOP or hooks.stopping.is_set():
                    break
                if item is FLUSH:
                    if pending:
                        hooks.publish(*ingestor.ingest(pending, hooks.publish))
                        pending = []
                else:
                    pending.append(item)
                    if len(pending) == tp:
                        hooks.publish(*ingestor.ingest(pending, hooks.publish))
                        pending = []
                hooks.item_done()
    except BaseException as e:
        hooks.fail(e)


def send_frames(
    conn: Connection, prompt_kv: torch.Tensor, vision_base: int, frames: queue.Queue, tp: int, hooks: Hooks
) -> None:
    """``tays-ingest-send`` (ingest="process"): the prompt's K/V, then the queued frames, to the
    worker. A frame that does not complete a group counts as done once sent (as the ingestion
    thread counts it once taken); a completed group counts when its K/V are committed."""
    pending = 0
    try:
        send(conn, ("prompt", vision_base, pack(prompt_kv)))
        while True:
            item = frames.get()
            if item is STOP or hooks.stopping.is_set():
                break
            if item is FLUSH:
                if pending:
                    send(conn, ("flush",))
                    pending = 0
                    continue
            else:
                send(conn, ("frame", item[0], item[1]))
                pending += 1
                if pending == tp:
                    pending = 0
                    continue
            hooks.item_done()
    except OSError:
        return  # the worker hung up: `receive_groups` reports why (its error, or that it died)
    except BaseException as e:  # e.g. a frame that cannot be pickled
        hooks.fail(e)


def receive_groups(conn: Connection, cache: VideoCache, hooks: Hooks, t0: float) -> None:
    """``tays-ingest`` (ingest="process"): appends each group the worker sends to `cache`, as
    the worker appended it to its own copy, and publishes it. t0: the engine's start()."""
    try:
        while True:
            try:
                msg = recv(conn)
            except (EOFError, OSError):
                if not hooks.stopping.is_set():
                    hooks.fail(RuntimeError("the ingestion worker process exited unexpectedly"))
                return
            if msg[0] == "error":
                hooks.fail(msg[1])
                return
            if msg[0] == "group" and not hooks.stopping.is_set():
                with torch.inference_mode():
                    _commit(cache, hooks, t0, msg[1], msg[2], unpack(msg[3]))
                hooks.item_done()
    except BaseException as e:
        hooks.fail(e)


def _commit(cache: VideoCache, hooks: Hooks, t0: float, seg: Segment, rec: FrameRecord, kv: torch.Tensor) -> None:
    """Append a group ingested by the worker: kv (2 * layers, Hkv, k, D), keys then values; rec's
    times are the worker's absolute perf_counter stamps (one clock system-wide)."""
    g, k = seg.index, seg.length
    if g != cache.n_groups or kv.shape[0] != 2 * cache.spec.layers or kv.shape[2] != k:
        raise RuntimeError(f"the ingestion worker sent group {g} ({tuple(kv.shape)}), expected group {cache.n_groups}")
    if cache.reserve(k):
        hooks.publish()
    cache.put_stacked(kv)
    cache.add_group(g, k, rec.time)
    now = time.perf_counter()
    t_in = rec.committed_at - rec.ingest_s
    hooks.publish(seg, FrameRecord(g, rec.time, k, rec.encode_s, now - t_in, now - t0))


def run_worker(fd: int, snapshot: dict[str, Any], cfg: dict[str, Any]) -> None:
    """A worker process's life: its own video cache, fed by the engine over socket `fd`.
    snapshot: the model (`tays.ipc.read_snapshot`); cfg: the engine's visual_window, fps,
    initial_capacity and torch threads."""
    torch.set_num_threads(int(cfg.get("threads", 1)))
    conn = Connection(fd)
    try:
        vlm = VLM(
            model=snapshot["model"],
            tokenizer=None,
            image_processor=snapshot["image_processor"],
            arch=snapshot["arch"],
            device=torch.device("cpu"),
            dtype=snapshot["dtype"],
        )
        check_supported(vlm)
        decoder = Decoder(vlm)
        cache = VideoCache(decoder.kv_spec, cfg["initial_capacity"], cfg["visual_window"])
        interval = video_interval(vlm, cfg["fps"])
        send(conn, ("ready", os.getpid()))
    except BaseException as e:
        with contextlib.suppress(OSError):
            send(conn, ("error", picklable_error(e)))
        return
    tp = vlm.temporal_patch_size
    ingestor: Ingestor | None = None
    pending: list[tuple[Any, float]] = []

    def ingest() -> bool:
        try:
            seg, rec = ingestor.ingest(pending)
        except BaseException as e:
            send(conn, ("error", picklable_error(e)))
            return False
        pending.clear()
        g = cache.groups[-1]
        send(conn, ("group", seg, rec, pack(cache.stacked(g.start, g.start + g.length))))
        return True

    with torch.inference_mode():
        while True:
            try:
                msg = recv(conn)
            except (EOFError, OSError):
                return
            op = msg[0]
            try:
                if op == "prompt":
                    cache.load_prompt(unpack(msg[2]))
                    # records carry absolute perf_counter stamps (CLOCK_MONOTONIC, system-wide)
                    ingestor = Ingestor(vlm, decoder, cache, interval, vision_base=int(msg[1]), t0=0.0)
                elif op == "frame":
                    pending.append((msg[1], float(msg[2])))
                    if len(pending) == tp and not ingest():
                        return
                elif op == "flush":
                    if pending and not ingest():
                        return
            except OSError:  # the engine hung up
                return
