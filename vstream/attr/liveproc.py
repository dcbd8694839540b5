"""The attribution process: live attribution's per-span arithmetic on another interpreter.

Why a process: with the span worker as a thread of the generating process, every span's numpy
work (rows from the captured queries, features, scores, PCA path: ~0.3 ms on the demo model)
held the GIL that `generate`'s Python needs between its small torch ops, and the worker woke on
every decode step to look for rows; decoding ran at 0.84-0.93 of plain on a 2-core machine.
Here the generation thread only copies a span's decode queries and the new key columns into
shared memory (`AttentionRecorder.export`, tens of microseconds per span) and sends a short
message; the process computes the rest at a lower scheduling priority with one BLAS thread and
answers with the scores, top regions and path point, and counts its answers in the shared
memory, so the parent finds them without a system call or a thread waiting on the socket. The
heatmap is painted by whoever reads it (`SpanEvent.heatmap`), not here: shipping 800 KB per
span cost more than painting.

* the server (``python -m vstream.attr.liveproc FD``, started by the first `Channel`, one per
  Python process; `prewarm()` starts it early): imports numpy, `rowmath`, `features` and
  `dynamics` only (no torch, so it is up in a fraction of a second), ignores SIGINT, and exits when its parent does
  (end of file on FD). It serves any number of sessions, each on its own socket, one message at
  a time.
* a session (`Channel`): a memfd shared with the server holds the queries (T_max, L, H, D), the
  key cache (L, Hkv, S_max, D) and the rows the server computes (T_max, L, H, N), float32, and
  the count of answers sent (int64); faulted in when the session opens, up to `POPULATE_MAX`.
  Closing the channel (or the parent exiting) ends the session in the server; nothing else is
  left behind.

Scheduling. On a 2-core machine a decode step keeps both cores busy: the generation thread on
one, torch's OpenMP helper on the other (it spins between the step's parallel regions, and the
step waits for it at each region's end). So the server runs below generation (SCHED_BATCH: no
preemption on wake-up; nice +5), keeps off the core the generation thread last ran on (each span
message says which; otherwise the socket's sync wake-up puts it right there), and yields the
core between pieces of a span's work (its rows, the scores, the path), so the helper is never
kept off its core for more than one piece. These choices follow from how
Linux places and preempts tasks; they were made on a machine busy with other jobs, where their
effect on decode speed could not be measured.

Messages on a session socket: a 4-byte length and a pickled dict. Parent to server: "config"
(once), "span", "finish"; server to parent: "ready", "span", "done", "error". Nothing executable
travels: numpy arrays, numbers, strings, and the `DynamicsTracker` / `PathPoint` dataclasses.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vstream.attr import features as FV
from vstream.attr import rowmath
from vstream.attr.dynamics import DynamicsTracker, PathPoint
from vstream.model.helper_process import HelperProcess, lower_priority

__all__ = ["Channel", "LiveProcessError", "Shapes", "current_cpu", "prewarm", "server_pid", "shutdown"]

_HEADER = struct.Struct("!I")
_RECV_BYTES = 1 << 16
ANSWERED = "answered"  # answers the server has sent, counted in the shared memory: the parent
# looks for one without a system call (each one hands the GIL to the generation thread and back)
POPULATE_MAX = 256 << 20  # larger buffers (big models, long traces) are faulted in as written
_READY_TIMEOUT_S = 120.0  # the first session waits for the server's imports (slow on a busy machine)


class LiveProcessError(RuntimeError):
    """The attribution process could not be started or answered wrongly."""


# ----------------------------------------------------------------------------------------------
# framing


def send_msg(sock: socket.socket, obj: dict[str, Any]) -> None:
    head = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(head)) + head)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the socket")
        got += n


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(_HEADER.size)
    _recv_into(sock, memoryview(head))
    (n,) = _HEADER.unpack(head)
    body = bytearray(n)
    _recv_into(sock, memoryview(body))
    return pickle.loads(body)


# ----------------------------------------------------------------------------------------------
# shared buffers


@dataclass(frozen=True)
class Shapes:
    """Sizes of a session's shared buffers: rows (tokens) t_max, layers l, query heads h, key
    heads hkv, head size d, key positions s_max, image tokens n."""

    t_max: int
    l: int  # noqa: E741
    h: int
    hkv: int
    d: int
    s_max: int
    n: int

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Float32 arrays, in order; then the answer counter (one int64, `ANSWERED`)."""
        return [
            ("queries", (self.t_max, self.l, self.h, self.d)),
            ("keys", (self.l, self.hkv, self.s_max, self.d)),
            ("rows", (self.t_max, self.l, self.h, self.n)),
        ]

    def nbytes(self) -> int:
        return sum(4 * int(np.prod(shape)) for _, shape in self.layout()) + 16  # counter, aligned


def _map(fd: int, nbytes: int) -> mmap.mmap:
    """Map the session's buffers, pages faulted in now (MAP_POPULATE) up to `POPULATE_MAX`: a
    first touch costs 2-3.5 us per 4 KB page in a VM, which the generation thread would otherwise
    pay while copying queries in the middle of decoding."""
    flags = mmap.MAP_SHARED
    if nbytes <= POPULATE_MAX:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, nbytes, flags=flags)


def _views(buf: mmap.mmap, shapes: Shapes) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape in shapes.layout():
        count = int(np.prod(shape))
        out[name] = np.frombuffer(buf, dtype=np.float32, count=count, offset=offset).reshape(shape)
        offset += 4 * count
    out[ANSWERED] = np.frombuffer(buf, dtype=np.int64, count=1, offset=offset + (-offset) % 8)
    return out


# ----------------------------------------------------------------------------------------------
# the server process


class _Session:
    """The server's state for one session: its buffers, the scoring inputs, its path tracker."""

    def __init__(self, sock: socket.socket, mem_fd: int):
        self.sock = sock
        self.mem_fd = mem_fd
        self.bufs: dict[str, np.ndarray] = {}
        self.tracker = DynamicsTracker()
        self.computed = 0  # rows [0, computed) are in bufs["rows"]

    def close(self) -> None:
        self.bufs = {}
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.mem_fd)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "config":
            self.configure(msg)
            send_msg(self.sock, {"op": "ready", "pid": os.getpid()})
        elif op == "span":
            self.span(msg)
        elif op == "finish":
            send_msg(self.sock, {"op": "done", "tracker": self.tracker, "rows": self.computed})
        else:
            raise ValueError(f"unknown message {op!r}")

    def configure(self, cfg: dict[str, Any]) -> None:
        shapes = Shapes(**cfg["shapes"])
        self.map = _map(self.mem_fd, shapes.nbytes())
        self.bufs = _views(self.map, shapes)
        self.positions = np.asarray(cfg["positions"], dtype=np.int64)
        self.assignment = np.asarray(cfg["assignment"], dtype=np.float32)
        self.weight = np.asarray(cfg["weight"], dtype=np.float32)
        self.bias = np.float32(cfg["bias"])
        self.top = int(cfg["top"])
        # the estimator's feature variant (features.py); value-weighted ones get their (L, H, N)
        # weights with the first span (they are taken at prefill, after the session opened)
        self.variant = FV.parse(cfg.get("feature_variant", FV.DEFAULT))
        self.value_weights: np.ndarray | None = None
        self.fold: FV.LinearFold | None = None

    def span(self, msg: dict[str, Any]) -> None:
        _avoid_cpu(msg.get("cpu", -1))
        t0, c0 = time.perf_counter(), time.thread_time()
        a, b = msg["new_rows"]
        rows = self.bufs["rows"]
        if b > a and not msg["rows_given"]:  # one call for the span's new rows: fewer numpy calls
            lens = np.asarray(msg["lens"], dtype=np.int64)
            rows[a:b] = rowmath.image_rows(
                self.bufs["queries"][a:b], self.bufs["keys"], lens, msg["scaling"], self.positions
            )
            _yield()
        self.computed = max(self.computed, b)
        if "value_weights" in msg:
            self.value_weights, self.fold = np.asarray(msg["value_weights"], dtype=np.float32), None
        lo, hi = msg["rows"]
        if hi > lo:
            if self.variant.is_default:
                total = rowmath.sum_rows([rows[i] for i in range(lo, hi)])
                features = rowmath.span_features(total, hi - lo, self.assignment)
                scores = rowmath.linear_scores(features, self.weight, self.bias)
            elif self.variant.linear:  # the weights fold into the pooling: no (K, L*H) features
                if self.fold is None:  # once per session (the value weights come with span 0)
                    self.fold = FV.LinearFold(self.assignment, self.variant, self.weight, self.bias, self.value_weights)
                scores = self.fold.scores(rows[lo:hi], np.zeros(1, np.int64), np.full(1, hi - lo))[0]
            else:
                features = FV.pool_rows(rows[lo:hi], self.assignment, self.variant, self.value_weights)
                scores = rowmath.linear_scores(features, self.weight, self.bias)
        else:
            scores = np.zeros(self.assignment.shape[0], dtype=np.float32)
        t_scores = time.perf_counter()
        top = rowmath.top_regions(scores, self.top)
        _yield()
        point = self.tracker.add(scores)
        t1, c1 = time.perf_counter(), time.thread_time()
        # plain values and bytes only: pickling numpy arrays and dataclasses costs the parent
        # (which unpickles on its token thread) several times more, most of all with cold caches
        reply = {
            "op": "span",
            "index": msg["index"],
            "scores": scores.astype(np.float32, copy=False).tobytes(),
            "top": top,
            "point": _point_fields(point),
            "t0": t0,
            "t_scores": t_scores,
            "t1": t1,
            "cpu_s": c1 - c0,
        }
        send_msg(self.sock, reply)
        self.bufs[ANSWERED][0] += 1


def _point_fields(p: PathPoint) -> tuple:
    """A path point as plain values and float64 bytes, for the answer message."""
    return (p.span_index, p.coords.tobytes(), p.path.tobytes(), p.path_length, p.tortuosity, p.concentration, p.label)


def _point_from(fields: tuple) -> PathPoint:
    index, coords, path, length, tortuosity, conc, label = fields
    c, p = np.frombuffer(coords, dtype=np.float64).copy(), np.frombuffer(path, dtype=np.float64).copy()
    return PathPoint(index, c, p.reshape(-1, c.size), length, tortuosity, conc, label)


_CPUS: set[int] = set()  # the server's CPUs as started
_avoided = -1


def _avoid_cpu(cpu: int) -> None:
    """Keep off the CPU the generation thread last ran on (it says which with each span): the
    socket wake-up would otherwise put us on its core (a sync wake-up onto a core running one
    task), where every microsecond we run is one it waits. On the other core we only share
    with torch's OpenMP helper, mostly spinning between the decode step's parallel regions."""
    global _avoided
    if cpu < 0 or cpu == _avoided or len(_CPUS) < 2:
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, (_CPUS - {cpu}) or _CPUS)
        _avoided = cpu


def _yield() -> None:
    """Between pieces of a span's work: let a runnable task on this core (torch's OpenMP helper,
    which the decode step's next parallel region waits for) go first. The longest stretch
    generation can wait for us is then one piece (tens of microseconds), not the whole span.
    A no-op when nothing else wants the core."""
    os.sched_yield()


def serve(fd: int) -> None:
    """The server loop: new sessions arrive on `fd` as (socket, memfd) pairs; end of file on it
    means the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    lower_priority()  # below generation: it and torch's OpenMP team on the other core go first
    with contextlib.suppress(OSError):
        _CPUS.update(os.sched_getaffinity(0))
    ctrl = socket.socket(fileno=fd)
    sessions: dict[socket.socket, _Session] = {}
    try:
        while True:
            ready, _, _ = select.select([ctrl, *sessions], [], [])
            for sock in ready:
                if sock is ctrl:
                    try:
                        data, fds, _, _ = socket.recv_fds(ctrl, 64, 2)
                    except OSError:
                        return
                    if not data:
                        return
                    if len(fds) == 2:
                        s = socket.socket(fileno=fds[0])
                        sessions[s] = _Session(s, fds[1])
                    else:
                        for f in fds:
                            os.close(f)
                    continue
                sess = sessions[sock]
                try:
                    msg = recv_msg(sock)
                    sess.handle(msg)
                except (EOFError, OSError):  # the session closed (or its parent went away)
                    sess.close()
                    del sessions[sock]
                except Exception as e:  # reported to that session, which stops
                    with contextlib.suppress(OSError):
                        send_msg(sock, {"op": "error", "error": f"{type(e).__name__}: {e}"})
                        if ANSWERED in sess.bufs:
                            sess.bufs[ANSWERED][0] += 1
                    sess.close()
                    del sessions[sock]
    finally:
        for sess in sessions.values():
            sess.close()


# ----------------------------------------------------------------------------------------------
# the parent's side


class _Server(HelperProcess):
    def __init__(self) -> None:
        super().__init__("vstream.attr.liveproc")

    def open(self, session_fd: int, mem_fd: int) -> None:
        with self.lock:
            socket.send_fds(self.sock, [b"open"], [session_fd, mem_fd])


_server: _Server | None = None
_server_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or not _server.alive():
            if _server is not None:
                _server.close(0.1)
            try:
                _server = _Server()
            except (OSError, AttributeError) as e:  # (no AF_UNIX SOCK_SEQPACKET: not Linux)
                raise LiveProcessError(f"could not start the attribution process: {e}") from e
        return _server


_sched_getcpu: Any = None


def current_cpu() -> int:
    """The CPU the calling thread runs on (libc's sched_getcpu through ctypes, ~1 us), or -1.
    Called per token on the generation thread, so without releasing the GIL: a release there
    lets another thread in between two decode steps."""
    global _sched_getcpu
    if _sched_getcpu is None:
        try:
            import ctypes

            _sched_getcpu = ctypes.PyDLL(None).sched_getcpu  # keeps the GIL: CDLL drops and retakes it
        except (OSError, AttributeError):
            _sched_getcpu = lambda: -1  # noqa: E731
    return int(_sched_getcpu())


def prewarm() -> int:
    """Start the attribution process now (its imports take a moment), so that the first live
    session does not wait for it. Returns its pid."""
    return _get_server().proc.pid


def server_pid() -> int | None:
    return _server.proc.pid if _server is not None and _server.alive() else None


def shutdown() -> None:
    """Stop the attribution process (sessions still open get end of file and stop)."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


class Channel:
    """One live session's link to the attribution process.

    Constructed before generation starts (it waits until the server has mapped the buffers);
    `queries`, `keys` and `rows` are the shared arrays. One thread at a time writes queries and
    keys and calls `send_span` / `finish`, and reads answers with `has_answer` / `receive`.
    `close()` ends the session (a blocked `receive` then raises EOFError)."""

    def __init__(self, shapes: Shapes, config: dict[str, Any]):
        self.shapes = shapes
        server = _get_server()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mem_fd = -1
        try:
            mem_fd = os.memfd_create("vstream-attr", os.MFD_CLOEXEC)
            os.ftruncate(mem_fd, shapes.nbytes())
            self._map = _map(mem_fd, shapes.nbytes())
            server.open(theirs.fileno(), mem_fd)
            ours.settimeout(_READY_TIMEOUT_S)
            send_msg(ours, dict(config, op="config", shapes=asdict(shapes)))  # plain data: no class travels
            reply = recv_msg(ours)
            if reply.get("op") != "ready":
                why = reply.get("error", reply)
                raise LiveProcessError(f"the attribution process did not start the session: {why}")
            ours.settimeout(None)
        except BaseException as e:
            ours.close()
            if isinstance(e, (OSError, EOFError, AttributeError, pickle.UnpicklingError)):  # (no memfd: not Linux)
                raise LiveProcessError(f"no attribution process session: {type(e).__name__}: {e}") from e
            raise
        finally:
            theirs.close()
            if mem_fd >= 0:
                os.close(mem_fd)
        self.sock = ours
        self.pid = int(reply["pid"])
        bufs = _views(self._map, shapes)
        self.queries, self.keys, self.rows = bufs["queries"], bufs["keys"], bufs["rows"]
        self._answered, self._received = bufs[ANSWERED], 0
        self._inbox = bytearray()  # answers' bytes received but not parsed yet
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        self._closed = False

    def send_span(self, msg: dict[str, Any]) -> None:
        send_msg(self.sock, dict(msg, op="span"))

    def finish(self) -> None:
        """No more spans: the server answers "done" with its tracker once the queued spans are answered."""
        send_msg(self.sock, {"op": "finish"})

    def has_answer(self) -> bool:
        """Whether a span's answer (or an error) is waiting: a look at the server's counter in the
        shared memory (no system call). "done" is not counted: `receive` waits for it."""
        return int(self._answered[0]) > self._received

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next answer ("span", "done" or "error"); waits at most `timeout` seconds for it
        (None: no limit; TimeoutError past it)."""
        while (msg := self._next_frame()) is None:  # one recv for what has arrived, usually all of it
            if timeout is not None and not self._poll.poll(max(0.0, timeout) * 1000.0):
                raise TimeoutError(f"no answer from the attribution process in {timeout:g} s")
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise EOFError("the attribution process closed the session")
            self._inbox += data
        op = msg.get("op")
        if op in ("span", "error"):
            self._received += 1
        if op == "span":
            msg["scores"] = np.frombuffer(msg["scores"], dtype=np.float32).copy()
            msg["point"] = _point_from(msg["point"])
        return msg

    def _next_frame(self) -> dict[str, Any] | None:
        if len(self._inbox) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack_from(self._inbox)
        if len(self._inbox) < _HEADER.size + n:
            return None
        body = bytes(self._inbox[_HEADER.size : _HEADER.size + n])
        del self._inbox[: _HEADER.size + n]
        return pickle.loads(body)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the session: wakes a blocked `receive`, the server drops its state. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
