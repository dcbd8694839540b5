"""Frame ingestion in a separate process: ``StreamingEngine(vlm, ingest="process")`` (the CPU default).

Why: with ingestion in a thread of the decoding process, the decoder and the ingestion thread
contend for the GIL (transformers/torch run Python per op) and for torch's intra-op threads, so a
decode step gets slower while a frame group is being ingested. A worker process with its own
interpreter and one torch thread leaves the decoder its core.

Processes:

* the *ingest server* (``python -m tays.ingest FD``): one per Python process, started on the
  first process-mode engine (``prewarm()`` starts it ahead of time). It imports torch and
  transformers once, keeps a read-only copy of each model it is sent (a snapshot of the in-memory
  model: ``torch.save`` to a file in /dev/shm, loaded with ``mmap=True``, then unlinked; forward
  hooks are left out), and forks one worker per engine (milliseconds: nothing to import, the
  weights are shared copy-on-write). It holds no engine state, ignores SIGINT, reaps its children
  at once (SIGCHLD ignored) and exits when its parent does (end of file on its socket).
* a *worker*: one per engine, forked when the engine is built, talks to the engine over its own
  socket. It runs a `tays.engine.StreamingEngine` in ``ingest="inline"`` mode with the same
  weights, visual window and capacity rules: it gets the prompt's K/V from the engine, encodes each
  frame group with the vision tower, runs it through the decoder layers against its own video cache
  (the prompt and the earlier groups' K/V, with the same eviction), and sends the group's per-layer
  K/V and record back; the engine appends them to its own video cache exactly as the ingestion
  thread does. It exits when the engine stops (end of file), after reporting an ingestion error,
  or when the engine's process is gone.

Messages are plain pickles over `multiprocessing.connection.Connection` byte frames (never
multiprocessing's ForkingPickler, which would move tensors to shared memory); K/V travel as raw
bytes.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from vstream.world.assets import ROOT

__all__ = ["IngestProcessError", "WorkerHandle", "prewarm", "server_pid", "shutdown_server", "spawn_worker"]

_MAX_MODELS = 4  # model snapshots the server keeps
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


def model_key(model: Any) -> str:
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


def write_snapshot(vlm: Any) -> str:
    """The model for the ingestion server as data only: a folder with its weights (safetensors)
    and a JSON of config, class names (resolved in the `transformers` namespace only), arch and
    dtype. Nothing in it is unpickled; hooks on the live model are not part of it."""
    from safetensors.torch import save_model

    path = tempfile.mkdtemp(prefix="tays-ingest-", dir=_snapshot_dir())
    try:
        save_model(vlm.model, os.path.join(path, "model.safetensors"))
        ip = vlm.image_processor
        meta = {"model_class": type(vlm.model).__name__, "config_class": type(vlm.model.config).__name__,
                "config": vlm.model.config.to_dict(), "image_processor_class": type(ip).__name__,
                "image_processor": ip.to_dict(), "arch": vlm.arch, "dtype": str(vlm.dtype).removeprefix("torch.")}
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


class _Server:
    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"  # workers set their own torch thread count; the server computes nothing
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "tays.ingest", str(b.fileno())],
                                         pass_fds=[b.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, env=env, cwd=str(ROOT))
        finally:
            b.close()
        self.sock = a
        self.sock.settimeout(_REPLY_TIMEOUT_S)
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, req: dict, fds: list[int] = ()) -> dict:
        with self.lock:
            try:
                socket.send_fds(self.sock, [pickle.dumps(req)], list(fds))
                data = self.sock.recv(1 << 20)
            except (OSError, socket.timeout) as e:
                raise IngestProcessError(f"the ingestion server did not answer: {type(e).__name__}: {e}") from e
            if not data:
                code = self.proc.poll()
                raise IngestProcessError(f"the ingestion server exited (exit code {code}); its error is on stderr")
            return pickle.loads(data)

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


def prewarm(vlm: Any | None = None) -> int:
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
            for close in (self.conn.close, self.sock.close):
                with contextlib.suppress(OSError):
                    close()
            if self.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.pidfd)
                self.pidfd = None


def spawn_worker(vlm: Any, cfg: dict) -> WorkerHandle:
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
                raise IngestProcessError(f"could not snapshot the model for the ingestion process: "
                                         f"{type(e).__name__}: {e}") from e
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


# ----------------------------------------------------------------------------------------------
# server / worker side


def _worker_main(fd: int, snap: dict, cfg: dict) -> None:
    torch.set_num_threads(int(cfg.get("threads", 1)))
    conn = Connection(fd)
    try:
        from tays.engine import StreamingEngine
        from vstream.model import VLM

        vlm = VLM(model=snap["model"], tokenizer=None, image_processor=snap["image_processor"],
                  arch=snap["arch"], device=torch.device("cpu"), dtype=snap["dtype"])
        eng = StreamingEngine(vlm, visual_window=cfg["visual_window"], fps=cfg["fps"],
                              initial_capacity=cfg["initial_capacity"], ingest="inline")
        eng._t0 = 0.0  # records carry absolute time.perf_counter() stamps (CLOCK_MONOTONIC, system-wide)
        send(conn, ("ready", os.getpid()))
    except BaseException as e:
        with contextlib.suppress(OSError):
            send(conn, ("error", picklable_error(e)))
        return
    tp = vlm.temporal_patch_size
    L = len(eng._layers)
    pending: list[tuple[Any, float]] = []

    def ingest() -> bool:
        try:
            eng._ingest_group(pending)
        except BaseException as e:
            send(conn, ("error", picklable_error(e)))
            return False
        pending.clear()
        g, start, k, _ = eng._groups[-1]
        kv = torch.stack([eng._vk[li][0, :, start:start + k] for li in range(L)]
                         + [eng._vv[li][0, :, start:start + k] for li in range(L)])
        seg, rec = eng._history[-1], eng.frame_log[-1]
        eng._history.clear()
        eng.frame_log.clear()
        send(conn, ("group", seg, rec, pack(kv)))
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
                    kv = unpack(msg[2])
                    eng._adopt_prompt(kv[:L], kv[L:], vision_base=int(msg[1]))
                elif op == "frame":
                    pending.append((msg[1], float(msg[2])))
                    if len(pending) == tp and not ingest():
                        return
                elif op == "flush":
                    if pending and not ingest():
                        return
                elif op == "stop":
                    return
            except OSError:  # the engine hung up
                return


def _server_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped at once (no zombies)
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401  (what workers run)

    import tays.engine  # noqa: F401
    import vstream.model  # noqa: F401

    sock = socket.socket(fileno=fd)
    models: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def reply(obj: dict) -> None:
        sock.send(pickle.dumps(obj))

    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
        except OSError:
            break
        if not data:
            break
        req = pickle.loads(data)
        op = req.get("op")
        try:
            if op == "ping":
                reply({"pid": os.getpid()})
                continue
            key = req["key"]
            if key not in models:
                if not req.get("path"):
                    reply({"need_snapshot": True})
                    continue
                try:
                    models[key] = read_snapshot(req["path"])
                except BaseException as e:
                    reply({"error": f"{type(e).__name__}: {e}"})
                    continue
                while len(models) > _MAX_MODELS:
                    models.popitem(last=False)
            models.move_to_end(key)
            if op == "load":
                reply({"pid": os.getpid()})
                continue
            if op != "spawn" or len(fds) != 1:
                reply({"error": f"bad request {op!r}"})
                continue
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    sock.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    _worker_main(fds[0], models[key], req["cfg"])
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            reply({"pid": pid})
        finally:
            for f in fds:
                with contextlib.suppress(OSError):
                    os.close(f)


if __name__ == "__main__":
    _server_main(int(sys.argv[1]))
