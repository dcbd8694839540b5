"""The ingestion worker processes, seen from the engine's process: the server that forks them,
model snapshots, the wire format.

Why processes: with ingestion in a thread of the decoding process, the decoder and the ingestion
thread contend for the GIL (transformers/torch run Python per op) and for torch's intra-op threads,
so a decode step gets slower while a frame group is being ingested. A worker process with its own
interpreter and one torch thread leaves the decoder its core.

* the *ingest server* (``python -m tays.server FD``, `tays.server`): one per Python process,
  started on the first process-mode engine (``prewarm()`` starts it ahead of time). It imports
  torch and transformers once, keeps a read-only copy of each model it is sent (`write_snapshot`:
  the in-memory model's weights and config in /dev/shm, loaded there, then removed; forward hooks
  are left out), and forks one worker per engine (milliseconds: nothing to import, the weights are
  shared copy-on-write). It holds no engine state, ignores SIGINT, reaps its children at once and
  exits when its parent does (end of file on its socket).
* a *worker*: one per engine, forked when the engine is built, talks to the engine over its own
  socket (`WorkerHandle`); what they say is `tays.ingest`'s business.

Messages are plain pickles over `multiprocessing.connection.Connection` byte frames (never
multiprocessing's ForkingPickler, which would move tensors to shared memory); K/V travel as raw
bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from vstream.model import VLM
from vstream.model.helper_process import HelperProcess

__all__ = [
    "IngestProcessError",
    "WorkerHandle",
    "pack",
    "picklable_error",
    "pid_alive",
    "prewarm",
    "read_snapshot",
    "recv",
    "send",
    "server_pid",
    "shutdown_server",
    "spawn_worker",
    "unpack",
]

_REPLY_TIMEOUT_S = 600.0  # the first request waits for the server's imports (slow on a busy machine)


class IngestProcessError(RuntimeError):
    """The ingestion server/worker could not be started."""


# ----------------------------------------------------------------------------------------------
# wire format


def send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def pack(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    t = t.detach().contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def unpack(p: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    dtype, shape, raw = p
    if not raw:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).view(shape)


def picklable_error(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------
# model snapshots


def model_key(model: torch.nn.Module) -> str:
    """Identifies a model *and its current weights* (tensor addresses and version counters)."""
    sig = []
    for t in (*model.parameters(), *model.buffers()):
        try:
            v = t._version
        except RuntimeError:  # inference tensors have no version counter
            v = 0
        sig.append((t.data_ptr(), v))
    return f"{os.getpid()}-{id(model):x}-{hash(tuple(sig)) & 0xFFFFFFFFFFFF:x}"


def _snapshot_dir() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def write_snapshot(vlm: VLM) -> str:
    """The model for the ingestion server as data only: a folder with its weights (safetensors)
    and a JSON of config, class names (resolved in the `transformers` namespace only), arch and
    dtype. Nothing in it is unpickled; hooks on the live model are not part of it."""
    from safetensors.torch import save_model

    path = tempfile.mkdtemp(prefix="tays-ingest-", dir=_snapshot_dir())
    try:
        save_model(vlm.model, os.path.join(path, "model.safetensors"))
        ip = vlm.image_processor
        meta = {
            "model_class": type(vlm.model).__name__,
            "config_class": type(vlm.model.config).__name__,
            "config": vlm.model.config.to_dict(),
            "image_processor_class": type(ip).__name__,
            "image_processor": ip.to_dict(),
            "arch": vlm.arch,
            "dtype": str(vlm.dtype).removeprefix("torch."),
        }
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)
    except BaseException:
        remove_snapshot(path)
        raise
    return path


def remove_snapshot(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _transformers_class(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{name!r} is not a transformers class")
    return cls


def read_snapshot(path: str) -> dict[str, Any]:
    """Inverse of `write_snapshot` (in the server): build the model from its config, load weights."""
    from safetensors.torch import load_model

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    config = _transformers_class(meta["config_class"]).from_dict(meta["config"])
    dtype = getattr(torch, meta["dtype"])
    model = _transformers_class(meta["model_class"])(config).to(dtype)
    load_model(model, os.path.join(path, "model.safetensors"))
    model.eval()
    ip_cls = _transformers_class(meta["image_processor_class"])
    ip = ip_cls(**{k: v for k, v in meta["image_processor"].items() if k != "image_processor_type"})
    return {"model": model, "image_processor": ip, "arch": meta["arch"], "dtype": dtype}


# ----------------------------------------------------------------------------------------------
# the server (client side)


class _Server(HelperProcess):
    def __init__(self) -> None:
        super().__init__("tays.server")
        self.sock.settimeout(_REPLY_TIMEOUT_S)

    def request(self, req: dict, fds: list[int] = ()) -> dict:
        with self.lock:
            try:
                socket.send_fds(self.sock, [pickle.dumps(req)], list(fds))
                data = self.sock.recv(1 << 20)
            except (TimeoutError, OSError) as e:
                raise IngestProcessError(f"the ingestion server did not answer: {type(e).__name__}: {e}") from e
            if not data:
                code = self.proc.poll()
                raise IngestProcessError(f"the ingestion server exited (exit code {code}); its error is on stderr")
            return pickle.loads(data)


_server: _Server | None = None
_server_lock = threading.Lock()
_loaded: set[str] = set()


def _get_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or not _server.alive():
            if _server is not None:
                _server.close(0.1)
            _loaded.clear()
            _server = _Server()
        return _server


def prewarm(vlm: VLM | None = None) -> int:
    """Start the ingestion server now (its imports take seconds) and, with a model, load its
    snapshot there, so that the first process-mode engine starts at once. Returns its pid."""
    srv = _get_server()
    rep = srv.request({"op": "ping"})
    if vlm is not None:
        key = model_key(vlm.model)
        if key not in _loaded:
            path = write_snapshot(vlm)
            try:
                rep = srv.request({"op": "load", "key": key, "path": path})
            finally:
                remove_snapshot(path)
            if "error" in rep:
                raise IngestProcessError(f"the ingestion server could not load the model: {rep['error']}")
            _loaded.add(key)
    return int(rep.get("pid", srv.proc.pid))


def server_pid() -> int | None:
    return _server.proc.pid if _server is not None and _server.alive() else None


def shutdown_server() -> None:
    """Stop the ingestion server (running workers are not affected)."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None
        _loaded.clear()


# ----------------------------------------------------------------------------------------------
# one worker per engine


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerHandle:
    """The engine's end of its worker: the connection, the pid, and a way to make sure it is gone."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.conn = Connection(os.dup(sock.fileno()))
        self.pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.pidfd = os.pidfd_open(pid)
        self._lock = threading.Lock()
        self._closed = False

    def alive(self) -> bool:
        if self.pidfd is not None:
            return not select.select([self.pidfd], [], [], 0)[0]
        return pid_alive(self.pid)

    def shutdown(self) -> None:
        """Wake everyone blocked on the socket; the worker reads end of file and exits."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        if self.pidfd is not None:
            return bool(select.select([self.pidfd], [], [], max(0.0, timeout))[0])
        while pid_alive(self.pid):
            if time.monotonic() >= end:
                return False
            time.sleep(0.005)
        return True

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)

    def close(self, timeout: float | None = None) -> None:
        """Shut the socket, give the worker `timeout` seconds (default 2) to exit, then kill it;
        returns once it is gone. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.shutdown()
            if not self._wait(2.0 if timeout is None else float(timeout)):
                self._kill()
                self._wait(5.0)
            # the pidfd is readable at exit, a moment before the server's auto-reap frees the pid
            end = time.monotonic() + 5.0
            while pid_alive(self.pid) and time.monotonic() < end:
                time.sleep(0.002)
            for close in (self.conn.close, self.sock.close):
                with contextlib.suppress(OSError):
                    close()
            if self.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.pidfd)
                self.pidfd = None


def spawn_worker(vlm: VLM, cfg: dict[str, Any]) -> WorkerHandle:
    """Fork a worker for one engine from the ingestion server (started if needed)."""
    srv = _get_server()
    key = model_key(vlm.model)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        req = {"op": "spawn", "key": key, "cfg": cfg}
        rep = srv.request(req, [b.fileno()])
        if rep.get("need_snapshot"):
            try:
                path = write_snapshot(vlm)
            except Exception as e:
                raise IngestProcessError(
                    f"could not snapshot the model for the ingestion process: {type(e).__name__}: {e}"
                ) from e
            try:
                rep = srv.request({**req, "path": path}, [b.fileno()])
            finally:
                remove_snapshot(path)
        if "error" in rep:
            raise IngestProcessError(f"the ingestion server could not start a worker: {rep['error']}")
        _loaded.add(key)
        return WorkerHandle(int(rep["pid"]), a)
    except BaseException:
        a.close()
        raise
    finally:
        b.close()
