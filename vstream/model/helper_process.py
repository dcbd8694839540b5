"""A helper Python process run as a server and spoken to over one Unix SEQPACKET socketpair.

The live attribution worker and the video ingestion both run this way: in their own interpreter,
their compute never holds the GIL of the process that decodes and serves the page.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


NICE = 5  # a helper's nice increment: the process it serves (and torch's OpenMP team) goes first


def lower_priority() -> None:
    """Run a helper below the process it serves: no preemption on wake-up (SCHED_BATCH) and a
    smaller share when the cores are contended (nice +NICE)."""
    with contextlib.suppress(AttributeError, OSError, PermissionError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(NICE)


class HelperProcess:
    """`python -m <module> <fd>` with the other end of a socketpair as `fd`; `sock` is ours.
    BLAS runs single-threaded there: small GEMMs, where a thread team only waits at barriers for
    busy cores (a helper that wants more threads sets torch's count itself)."""

    def __init__(self, module: str) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, str(b.fileno())],
                pass_fds=[b.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=str(ROOT),
            )
        finally:
            b.close()
        self.sock = a
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
