"""Frame-group regions clustered in a helper process, off the decoding interpreter.

Why: Ward clustering (scikit-learn's merge loop) holds the GIL for most of its run, tens of
milliseconds per frame. Run by the attribution worker thread in the decoding process, it made
each of a decode step's small torch calls wait for the GIL: a loop of small torch ops ran about
20x slower while a clustering thread ran beside it, against about 1.2x beside the worker's numpy
rows (which release the GIL). So the worker sends the frame here and waits on the socket, GIL
released, until the regions come back.

* the server (``python -m tays.regions_proc FD``, one per Python process, started by
  `prewarm()` when a watch attaches): receives its data socket on FD, imports the clustering,
  says it is ready, then answers one frame at a time; below the decoding process in priority
  (nice +5, SCHED_BATCH); exits when its parent does (end of file).
* messages: a 4-byte length and a pickle of plain data (arrays, numbers, strings), both ways.

Until the server has said it is ready (its imports take a few seconds), or if it fails,
`regions()` clusters in the calling thread: the same function, so the same regions.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

import numpy as np

from vstream.attr.liveproc import recv_msg, send_msg
from vstream.attr.regions import PixelBackbone, Regions, compute_regions
from vstream.model import VLMError
from vstream.model.helper_process import HelperProcess, lower_priority

__all__ = ["prewarm", "ready", "regions", "server_pid", "shutdown"]


def _answer(msg: dict[str, Any]) -> dict[str, Any]:
    try:
        r = _in_process(msg["frame"], msg["grid"], msg["k"], msg["patch_grid"])
    except VLMError as e:
        return {"error": str(e), "bad_input": True}
    except Exception as e:  # noqa: BLE001 - reported to the caller, who clusters itself
        return {"error": f"{type(e).__name__}: {e}", "bad_input": False}
    return {
        "labels": r.labels,
        "assignment": r.assignment.numpy(),
        "token_grid": r.token_grid,
        "image_size": r.image_size,
        "backbone": r.backbone,
        "k_requested": r.k_requested,
        "notes": list(r.notes),
    }


def serve(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    lower_priority()
    ctrl = socket.socket(fileno=fd)
    try:
        _, fds, _, _ = socket.recv_fds(ctrl, 16, 1)
        if not fds:
            return
        sock = socket.socket(fileno=fds[0])
        # warm the clustering (imports, first-call caches) before saying ready
        compute_regions(np.zeros((32, 32, 3), dtype=np.uint8), (2, 2), backbone=PixelBackbone(grid=8))
        send_msg(sock, {"ready": True, "pid": os.getpid()})
        while True:
            send_msg(sock, _answer(recv_msg(sock)))
    except (EOFError, OSError):  # the parent hung up (or is gone): nothing to say to anyone
        return


class _Server(HelperProcess):
    def __init__(self) -> None:
        super().__init__("tays.regions_proc")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.sock, [b"data"], [theirs.fileno()])
        finally:
            theirs.close()
        self.data = ours
        self.ready = False

    def poll_ready(self) -> bool:
        """True once the server has said it is ready (never blocks)."""
        if not self.ready and select.select([self.data], [], [], 0)[0]:
            self.ready = bool(recv_msg(self.data).get("ready"))
        return self.ready

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.data.close()
        super().close(timeout)


_server: _Server | None = None
_broken = False  # the server failed once: cluster in-process from then on
_lock = threading.Lock()


def prewarm() -> int | None:
    """Start the server now (if it is not running) and return its pid; None if it cannot run."""
    global _server, _broken
    with _lock:
        if _broken:
            return None
        if _server is None or not _server.alive():
            if _server is not None:
                _server.close(0.1)
            try:
                _server = _Server()
            except (OSError, AttributeError) as e:  # no AF_UNIX SEQPACKET (not Linux)
                print(f"regions process unavailable, clustering in-process: {e}", file=sys.stderr)
                _broken, _server = True, None
                return None
        return _server.proc.pid


def _usable() -> _Server | None:
    """The server if it runs and has not failed (call with `_lock` held)."""
    return _server if _server is not None and not _broken and _server.alive() else None


def ready() -> bool:
    """Whether the server is up and has said it is ready (never blocks)."""
    with _lock:
        try:
            return (srv := _usable()) is not None and srv.poll_ready()
        except (EOFError, OSError):
            return False


def server_pid() -> int | None:
    return _server.proc.pid if _server is not None and _server.alive() else None


def shutdown() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.close()
            _server = None


def _in_process(frame: Any, grid: tuple[int, int], k: int | None, patch_grid: int) -> Regions:
    return compute_regions(frame, grid, k=k, backbone=PixelBackbone(grid=patch_grid))


def regions(frame: Any, grid: tuple[int, int], k: int | None, patch_grid: int) -> Regions:
    """`compute_regions(frame, grid, k, PixelBackbone(grid=patch_grid))`, run in the server when
    it is ready, else here. A frame the clustering refuses raises VLMError either way."""
    global _broken
    with _lock:
        srv = _usable()
        if srv is not None:
            try:
                if srv.poll_ready():
                    msg = {"frame": np.asarray(frame), "grid": tuple(grid), "k": k, "patch_grid": patch_grid}
                    send_msg(srv.data, msg)
                    rep = recv_msg(srv.data)
                else:
                    srv = None
            except (EOFError, OSError) as e:
                print(f"regions process failed, clustering in-process from now on: {e}", file=sys.stderr)
                _broken, srv = True, None
    if srv is None:
        return _in_process(frame, grid, k, patch_grid)
    if "error" in rep:
        if rep.get("bad_input"):
            raise VLMError(rep["error"])
        print(f"regions process error, clustering in-process: {rep['error']}", file=sys.stderr)
        return _in_process(frame, grid, k, patch_grid)
    import torch

    return Regions(
        labels=rep["labels"],
        assignment=torch.from_numpy(rep["assignment"]),
        token_grid=tuple(rep["token_grid"]),
        image_size=tuple(rep["image_size"]),
        backbone=rep["backbone"],
        k_requested=rep["k_requested"],
        notes=rep["notes"],
    )


if __name__ == "__main__":
    serve(int(sys.argv[1]))
