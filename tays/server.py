"""The ingestion server process: ``python -m tays.server FD`` (started by `tays.ipc`, never imported).

It imports torch and transformers once, keeps up to `MAX_MODELS` model snapshots it is sent, and
forks one worker per engine (`tays.ingest.run_worker`), handing it the engine's socket. Requests
come over the socket FD as pickled dicts: ``ping``, ``load`` (a snapshot folder) and ``spawn`` (with
the engine's socket as a passed file descriptor); replies are pickled dicts.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import signal
import socket
import sys
import traceback
from typing import Any

from tays.ingest import run_worker
from tays.ipc import read_snapshot

MAX_MODELS = 4  # model snapshots the server keeps


def serve(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped at once (no zombies)
    # what the workers run, imported once here (not at the top: it takes seconds, and a Ctrl-C meant
    # for the parent must not interrupt it)
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401

    sock = socket.socket(fileno=fd)
    models: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def reply(obj: dict[str, Any]) -> None:
        sock.send(pickle.dumps(obj))

    # the parent hanging up mid-request (the app stopped during a load or a spawn) ends the server
    # quietly: there is nobody left to answer, and a BrokenPipeError traceback would only alarm
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _loop(sock, models, reply)


def _loop(sock: socket.socket, models: collections.OrderedDict[str, dict[str, Any]], reply: Any) -> None:
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
                while len(models) > MAX_MODELS:
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
                    run_worker(fds[0], models[key], req["cfg"])
                except BaseException:
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
    serve(int(sys.argv[1]))
