"""Clean shutdown: `python app.py` stopped by SIGTERM (a service manager, `docker stop`) or
SIGINT (Ctrl-C) in the middle of a video run exits 0, prints no traceback, leaves no TaYS
ingestion process behind, and a restart finds every annotation the page acknowledged.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two app starts per signal

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    err = tmp / f"stderr-{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--annotations", str(tmp / "a.db")]
        + ["--runs-dir", str(tmp / "runs"), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(err, "wb"),  # the child owns it
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, err.read_text()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url, err
        except OSError:
            assert time.time() < deadline, "the app did not start"
            time.sleep(1)


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_mid_video_is_clean_and_restart_keeps_annotations(tmp_path, sig):
    import json

    proc, url, err = _start(tmp_path)
    try:
        client = Client(url, verbose=False, httpx_kwargs={"timeout": 120})
        index = json.loads((EXAMPLES / "index.json").read_text())
        scene = index["scenes"][0]
        client.predict(handle_file(str(EXAMPLES / scene["file"])), scene["question"], "", api_name="/attribute")
        acked = []
        for i, verdict in enumerate(("grounded", "not_visual", "wrong_region")):
            status, _ = client.predict("alice", 0, verdict, f"note {i}", api_name="/annotate")
            acked.append(int(status.split("#")[1].split(":")[0]))
        stream = sorted(index["streams"], key=lambda s: -s["duration"])[0]
        job = client.submit(
            "Video file", handle_file(str(EXAMPLES / stream["file"])), 2, stream["question"], "", api_name="/video"
        )
        deadline = time.time() + 120
        while not _descendants(proc.pid) and time.time() < deadline:  # the ingestion server is up
            time.sleep(0.5)
        time.sleep(3.0)  # mid-run
        kids = _descendants(proc.pid)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        del job  # its server is gone; nothing to cancel
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err.read_text(errors="replace")
    assert rc == 0, f"exit code {rc}\n{log[-3000:]}"
    assert "Traceback" not in log and "BrokenPipeError" not in log, log[-4000:]
    deadline = time.time() + 10
    while any(_alive(p) for p in kids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in kids if _alive(p)], "worker processes outlived the app"

    proc, url, err = _start(tmp_path, "--auth", "alice:pw,boss:pw", "--admin", "boss")
    try:
        admin = Client(url, auth=("boss", "pw"), verbose=False, httpx_kwargs={"timeout": 120})
        rows = [
            json.loads(line)
            for line in Path(admin.predict("", api_name="/annotations_export")).read_text().splitlines()
        ]
        assert {r["id"] for r in rows} >= set(acked)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_ingestion_server_exits_quietly_when_its_parent_hangs_up_mid_request():
    """The app stopping while the ingestion server answers (a load, a spawn): its reply meets a
    closed socket. The server must end without a BrokenPipeError traceback."""
    import pickle

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tays.server", str(b.fileno())],
        pass_fds=[b.fileno()],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    b.close()
    a.send(pickle.dumps({"op": "ping"}))
    a.close()  # gone before the answer
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode(errors="replace")[-2000:]
