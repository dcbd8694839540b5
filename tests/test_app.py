"""The explorer over HTTP, as API users see it: gradio_client against a live server (in-process,
free port, demo model, annotation store in a temp folder).

Covers: /attribute returns per-span scores and heatmaps for an example, /reason streams, bad
input (no image, 10,000-char question, corrupt image or video, unknown model id) gives a clear
AppError and the server keeps answering, two concurrent clients get their own results, the
video endpoint reports TTFT, the lab cells run, and annotations stay per session.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

EXAMPLES = ROOT / "examples"
INDEX = json.loads((EXAMPLES / "index.json").read_text())
SCENES = INDEX["scenes"]
STREAMS = sorted(INDEX["streams"], key=lambda s: s["duration"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"  # an unknown hub id must fail fast, not try the network
    import app

    db = tmp_path_factory.mktemp("annotations") / "annotations.db"
    demo = app.build_ui(annotations=str(db))
    port = _free_port()
    demo.queue(default_concurrency_limit=2).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        yield f"http://127.0.0.1:{port}/", db
    finally:
        demo.close()


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def _client(url: str) -> Client:
    # generous HTTP timeout: on a busy CI machine the in-process server can be slow to answer
    return Client(url, verbose=False, httpx_kwargs={"timeout": 120}, analytics_enabled=False)


def _scene(i: int) -> tuple[str, str]:
    s = SCENES[i]
    return str(EXAMPLES / s["file"]), s["question"]


def _attribute(client: Client, i: int | tuple[str, str]) -> dict:
    path, q = _scene(i) if isinstance(i, int) else i
    out = client.predict(handle_file(path), q, "", api_name="/attribute")
    text, gallery, _pca, dynamics, status, raw = out
    assert "Done" in status, status
    assert "Path length" in dynamics
    raw["_gallery"] = gallery
    raw["_text"] = text
    return raw


@pytest.mark.slow
def test_attribute_returns_span_heatmaps_and_scores(url):
    raw = _attribute(_client(url), 0)
    k = raw["k"]
    assert k and k >= 2
    assert raw["spans"], raw
    for s in raw["spans"]:
        assert len(s["scores"]) == k
        assert s["top_regions"] and all(0 <= r < k for r in s["top_regions"])
        assert s["text"]
    assert len(raw["_gallery"]) == len(raw["spans"])  # one overlay per closed span
    assert raw["label"] in ("Fixation", "Wandering", "stable")
    assert raw["done"] and not raw["cancelled"]
    assert raw["question"] == SCENES[0]["question"]


@pytest.mark.slow
def test_reason_streams(url):
    path, q = _scene(1)
    job = _client(url).submit(handle_file(path), q, "", api_name="/reason")
    final = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 2  # partial updates, then the final one
    assert "**Thinking**" in outputs[0]
    assert "**Answer:**" in final


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no image", "Pick an example or upload an image"),
        ("long question", "10000 characters"),
        ("corrupt image", "could not read image"),
        ("unknown model", "Model 'no-such-org/no-such-model' is not available on this server"),
        ("empty question", "Type a question"),
    ],
)
@pytest.mark.slow
def test_bad_input_gives_clear_error_and_server_keeps_serving(url, tmp_path, case, expected):
    client = _client(url)
    path, q = _scene(2)
    image, model = handle_file(path), ""
    if case == "no image":
        image = None
    elif case == "long question":
        q = "x" * 10_000
    elif case == "corrupt image":
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
        image = handle_file(str(bad))
    elif case == "unknown model":
        model = "no-such-org/no-such-model"
    elif case == "empty question":
        q = "   "
    with pytest.raises(AppError) as err:
        client.predict(image, q, model, api_name="/attribute")
    assert expected in str(err.value)
    # the same client (same session) and the server still work
    out = client.predict(handle_file(path), "What is shown?", "", api_name="/reason")
    assert "**Answer:**" in out


@pytest.mark.slow
def test_two_concurrent_clients_get_their_own_results(url):
    """A shapes scene and a real photo (scikit-learn's china.jpg) at the same time."""
    from ui.explorer import photo_examples

    photo = photo_examples()[0]
    a, b = _client(url), _client(url)
    picks = {a: 3, b: tuple(photo[:2])}
    with ThreadPoolExecutor(2) as pool:
        futs = {c: pool.submit(_attribute, c, i) for c, i in picks.items()}
        res = {c: f.result(timeout=300) for c, f in futs.items()}
    assert res[a]["question"] == SCENES[3]["question"]
    assert res[a]["image_ref"] == f"examples/{SCENES[3]['file']}"
    assert res[b]["question"] == photo[1]
    assert res[b]["image_ref"] == f"examples/{Path(photo[0]).name}"
    assert res[b]["spans"] and len(res[b]["spans"][0]["scores"]) == res[b]["k"]
    assert res[a]["run_id"] != res[b]["run_id"]


@pytest.mark.slow
def test_annotations_are_per_session(server):
    pytest.importorskip("ui.annotations")
    url, db = server
    a, b = _client(url), _client(url)
    _attribute(a, 4)
    status, records = a.predict("alice", 0, "grounded", "looks right", api_name="/annotate")
    assert "Saved" in status
    assert records["data"][0][2] == "grounded"
    with pytest.raises(AppError, match="Nothing to annotate"):  # b never ran anything
        b.predict("bob", 0, "grounded", "", api_name="/annotate")
    with pytest.raises(AppError, match="verdict"):
        a.predict("alice", 0, None, "", api_name="/annotate")
    exported = a.predict("alice", api_name="/annotations_export")
    rows = [json.loads(line) for line in Path(exported).read_text().strip().splitlines()]
    assert rows and all(r["annotator"] == "alice" for r in rows)
    assert rows[-1]["verdict"] == "grounded" and rows[-1]["span_index"] == 0
    csv_path = a.predict("", api_name="/annotations_export_csv")  # no logins: this session's own records
    assert "alice" in Path(csv_path).read_text()
    # another visitor typing alice's name (or none) gets nothing of hers: no logins, no admin
    for name in ("alice", ""):
        with pytest.raises(AppError, match="Nothing to export"):
            b.predict(name, api_name="/annotations_export")
    assert db.exists()


@pytest.mark.slow
def test_video_run_reports_ttft_and_rejects_corrupt_video(url, tmp_path):
    client = _client(url)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(AppError, match="broken"):
        client.predict("Video file", handle_file(str(bad)), 2, "How many objects appeared?", "", api_name="/video")
    with pytest.raises(AppError, match="Upload a video file"):
        client.predict("Video file", None, 2, "How many objects appeared?", "", api_name="/video")
    s = STREAMS[0]
    text, ttft, delay, status, _frame, steps, *_ = client.predict(
        "Video file", handle_file(str(EXAMPLES / s["file"])), 2, s["question"], "", api_name="/video"
    )
    assert "TTFT" in ttft and ttft.rstrip().endswith(" s"), ttft
    assert "Delay" in delay and " s " in delay, delay
    assert "Done" in status and text.strip(), status
    assert "<|" not in text and "|>" not in text, text  # no raw special tokens
    from ui.video import STEP_HEADERS

    assert steps["data"] and steps["headers"] == STEP_HEADERS
    relied = [r[3] for r in steps["data"]]
    assert any(isinstance(v, (int, float)) for v in relied), steps["data"]  # steps joined with their frame


@pytest.mark.slow
def test_lab_cells(url):
    client = _client(url)
    with pytest.raises(AppError, match="Collect at least 2"):
        client.predict(5, 0.02, api_name="/lab_train")
    out = client.predict("", 2, 4, 0, api_name="/lab_collect")
    assert "Collected" in out
    out = client.predict(5, 0.02, api_name="/lab_train")
    assert "Trained" in out
    table, _plot, summary = client.predict("", 1, ["vstream", "raw_attention"], "session", api_name="/lab_evaluate")
    methods = [row[0] for row in table["data"]]
    assert methods == ["vstream", "raw_attention"]
    assert "held-out scenes" in summary


def _attr_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("vstream-attr") and t.is_alive()]


@pytest.mark.slow
def test_stop_ends_generation_and_worker(url):
    """Stop from the same session while the run streams: the final status says so and no
    attribution thread is left (the server runs in this process, so we can look)."""
    client = _client(url)
    path, q = _scene(5)
    job = client.submit(handle_file(path), q, "", api_name="/attribute")
    stopped = client.predict(api_name="/stop")
    assert stopped in ("Stopped.", "Nothing is running.")
    *_, status, raw = job.result(timeout=120)
    if stopped == "Stopped.":
        assert "Stopped" in status
    assert not _attr_threads()


@pytest.mark.slow
def test_click_while_running_says_so_and_keeps_the_run(url):
    """Two runs from one session at once: one streams to the end, the other (whichever came
    second) only says a run is in progress; nothing fails."""
    client = _client(url)
    path, q = _scene(6)
    first = client.submit(handle_file(path), q, "", api_name="/attribute")
    second = client.submit(handle_file(path), q, "", api_name="/attribute")
    statuses = [first.result(timeout=120)[4], second.result(timeout=120)[4]]
    assert any("Done" in s for s in statuses), statuses
    assert all("Done" in s or "already in progress" in s for s in statuses), statuses


def test_unload_closes_the_session():
    import types

    import app

    st = app.Session()
    closed = []
    st.close = lambda: closed.append(True)
    app._session(st, types.SimpleNamespace(session_hash="tab-1"))
    app._on_unload(types.SimpleNamespace(session_hash="tab-1"))
    assert closed == [True]
    app._on_unload(types.SimpleNamespace(session_hash="tab-1"))  # a second unload is a no-op
    assert closed == [True]


def test_webcam_that_stops_ends_the_run_with_a_message(monkeypatch):
    """Frames pushed as the webcam stream handler does, then none: the run ends on its own,
    with the idle-timeout message, a TTFT readout and no thread left behind."""
    import threading
    import time

    import numpy as np

    import app
    from vstream.world.shapes_video import make_stream

    monkeypatch.setattr(app, "WEBCAM_IDLE_S", 1.0)
    st = app.Session()
    gen = app.video_run("Webcam", None, 2, "How many objects appeared?", "", st, None)
    outs = [next(gen)]
    frames = [np.asarray(f) for _, f in make_stream(1_000_000_123).frames(2)[:4]]

    def feed():
        for f in frames:
            app.push_webcam_frame(f, st, None)
            time.sleep(0.5)

    th = threading.Thread(target=feed)
    th.start()
    outs += list(gen)
    th.join()
    _, text, ttft, delay, status, *_ = outs[-1]  # then the frame, steps and attribution views
    assert "stopped early" in status, status
    assert "TTFT" in ttft
    assert not st.video_busy
    assert not [t for t in threading.enumerate() if t.name.startswith("tays-") and t.is_alive()]


@pytest.mark.slow
def test_compare_tays_against_interleaved(url):
    s = STREAMS[0]
    table, plot = _client(url).predict(
        handle_file(str(EXAMPLES / s["file"])), 2, s["question"], "interleaved", "", api_name="/video_compare"
    )
    assert "| tays |" in table and "| interleaved |" in table
    assert "TTFT" in table


def test_pure_helpers_overlay_path_and_checks():
    """The drawing and input rules behind the page, without a server."""
    import numpy as np
    from PIL import Image

    from ui import figures
    from ui.explorer import check_question, load_image
    from vstream.model import VLMError

    img = Image.new("RGB", (40, 30), (10, 20, 30))
    heat = np.zeros((30, 40), dtype=np.float32)
    heat[:, 20:] = 1.0
    labels = np.zeros((30, 40), dtype=np.int64)
    labels[:, 20:] = 1
    edges = np.zeros((30, 40), dtype=bool)
    edges[:, 19] = True
    out = figures.overlay(img, heat, edges, [1, 0], figures.region_centres(labels, 2), point=(0.5, 0.5))
    assert out.size == (40, 30)
    px = np.asarray(out)
    assert (px[0, 19] == 255).all()  # outline drawn in white
    assert px[0, 35].sum() > px[0, 5].sum()  # the high-score region is brighter
    fig = figures.path_figure(np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0]]), ["a.", "b.", "c."])
    assert fig.data[0].type == "scatter3d" and len(fig.data[0].x) == 3
    assert not figures.path_figure(None).data
    fig = figures.path_figure(np.zeros((3, 3)), ["a.", "b.", "c."], label="Wandering", risks=[0.1, 0.25])
    hover = list(fig.data[0].hovertext)
    assert "failure risk 10%" in hover[0] and "failure risk 25%" in hover[1] and "risk" not in hover[2]
    assert fig.data[0].line.color == figures.LABEL_COLOURS["Wandering"]
    assert "Tortuosity** n/a" in figures.dynamics_markdown(0.0, None, "stable", 1)
    with pytest.raises(VLMError, match="10000 characters"):
        check_question("y" * 10_000)
    with pytest.raises(VLMError, match="Type a question"):
        check_question("  ")
    with pytest.raises(VLMError, match="Pick an example"):
        load_image(None)
    with pytest.raises(VLMError, match="could not read image"):
        load_image(b"not an image")


@pytest.mark.slow
def test_cli_serves_with_login(tmp_path):
    """`python app.py --port P --auth user:pass` (as a subprocess): the API needs the login."""
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "--port",
            str(port),
            "--auth",
            "ann:secret",
            "--annotations",
            str(tmp_path / "a.db"),
        ],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, "app.py exited early"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        with pytest.raises(Exception):
            Client(url, verbose=False, httpx_kwargs={"timeout": 60})
        client = Client(url, auth=("ann", "secret"), verbose=False, httpx_kwargs={"timeout": 120})
        path, q = _scene(7)
        assert "**Answer:**" in client.predict(handle_file(path), q, "", api_name="/reason")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- runs to keep, safe to publish


@pytest.mark.slow
def test_runs_save_reopen_report_and_compare_through_the_api(url, tmp_path):
    from vstream.attr.record import RunRecord

    client = _client(url)
    raw = _attribute(client, 8)
    again = RunRecord.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})  # /attribute = the record
    assert again.run_id == raw["run_id"] and len(again.spans) == len(raw["spans"])
    saved, status = client.predict(api_name="/run_save")
    assert "Saved run" in status and json.loads(Path(saved).read_text())["run_id"] == raw["run_id"]
    report, status = client.predict(api_name="/run_report")
    page = Path(report).read_text()
    assert page.startswith("<!DOCTYPE html>") and "scatter3d" in page
    # a different client (session) reopens the file, selects a span, compares methods, annotates it
    other = _client(url)
    out = other.predict(handle_file(saved), api_name="/run_open")
    assert "opened from a file" in out[4] and out[5]["run_id"] == raw["run_id"]
    _text, pick, _view, info, _gallery, table, _runs = other.predict(0, api_name="/span")
    assert "Span 0" in info and {r[0] for r in table["data"]} >= {again.method, "raw_attention"}
    *_, table, _runs = other.predict(api_name="/span_occlusion")
    assert "occlusion" in {r[0] for r in table["data"]}
    status, _ = other.predict("carol", 0, "grounded", "", api_name="/annotate")
    assert f"of run {raw['run_id']}" in status
    with pytest.raises(AppError, match="not a readable vSTREAM run|not JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"format": "vstream-run", "version": 1}')
        other.predict(handle_file(str(bad)), api_name="/run_open")


@pytest.mark.parametrize(
    "name", ["../../etc", "/etc", "assets/../assets/demo-model", "Qwen/Qwen2.5-VL-7B-Instruct", "link"]
)
@pytest.mark.slow
def test_a_visitor_cannot_load_or_probe_other_models(url, tmp_path, name):
    if name == "link":
        (tmp_path / "link").symlink_to(ROOT / "assets" / "demo-model", target_is_directory=True)
        name = str(tmp_path / "link")
    client = _client(url)
    path, q = _scene(0)
    for api in ("/attribute", "/reason"):
        with pytest.raises(AppError) as err:
            client.predict(handle_file(path), q, name, api_name=api)
        assert str(err.value).strip() == f"Model {name!r} is not available on this server; pick one from the list."


@pytest.mark.slow
def test_a_visitor_cannot_read_server_files_through_the_page(url):
    """Gradio refuses a file path the visitor did not upload, as an input or from its file route."""
    import httpx

    for route in ("gradio_api/file=/etc/passwd", f"gradio_api/file={ROOT / 'app.py'}"):
        r = httpx.get(url + route, timeout=60)
        assert r.status_code in (403, 404), (route, r.status_code)
        assert "root:" not in r.text
    data = {"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "q?", ""]}
    r = httpx.post(url + "gradio_api/call/attribute", json=data, timeout=60)
    if r.status_code == 200:  # queued: the refusal comes as the event's error
        ev = httpx.get(url + f"gradio_api/call/attribute/{r.json()['event_id']}", timeout=120).text
        assert "error" in ev and "root:" not in ev, ev
    else:
        assert r.status_code in (400, 403, 422), r.status_code


@pytest.mark.slow
def test_saved_files_hit_the_caps(url, tmp_path, monkeypatch):
    import app
    from ui.storage import SavedFiles

    monkeypatch.setattr(app.SERVING, "files", SavedFiles(tmp_path / "runs", per_session=2, max_bytes=10**9))
    client = _client(url)
    _attribute(client, 9)
    client.predict(api_name="/run_save")
    client.predict(api_name="/run_save")
    with pytest.raises(AppError, match="per session"):
        client.predict(api_name="/run_save")
    monkeypatch.setattr(app.SERVING, "files", SavedFiles(tmp_path / "runs", per_session=99, max_bytes=1000))
    with pytest.raises(AppError, match="full"):
        client.predict(api_name="/run_report")
    assert sum(p.stat().st_size for p in (tmp_path / "runs").rglob("*") if p.is_file()) < 10**6
