"""Real-browser test of the Video tab's webcam path with attribution while watching.

Chromium's fake camera plays a shapes-world stream (written as a Y4M file) into the page's
webcam component; the page streams those frames to the app, TaYS reasons over them and the
attribution shows up live: the heatmap, the timeline, the step table (a click shows that
step's heatmap). Then Stop mid-run: the page says so, the timeline and the table stay
consistent, and the tab takes a new run (the run released its job; the library-level tests
check that no thread is left behind).

Same needs as tests/test_browser.py (playwright, a chromium binary on PATH).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
START_S = 300
WAIT_MS = 400_000

_TEXT_JS = """(sel) => {
  const el = document.querySelector(sel);
  if (!el) return null;
  const vals = [...el.querySelectorAll('input:not([type=file]), textarea')].map(i => i.value);
  return [el.innerText, ...vals].join(' \\n');
}"""


# the step table's rows from its cells' data-row / data-col (step, stream time, said at,
# relied-on frame time, best region, text)
ROWS_JS = """() => { const rows = {};
  document.querySelectorAll('#video-steps [data-row][data-col]').forEach(c => {
    const r = +c.dataset.row, k = +c.dataset.col;
    if (r >= 0 && k >= 0) { (rows[r] = rows[r] || [])[k] = c.innerText.trim(); } });
  return Object.keys(rows).map(Number).sort((a, b) => a - b).map(r => rows[r]); }"""
STOPPED_JS = f"() => /^(Done|Stopped)/.test((({_TEXT_JS})('#video-status') || '').trim())"
RUNNING_JS = "() => /running/i.test(document.querySelector('#video-status')?.innerText || '')"


def write_y4m(path: Path, frames: list, fps: int = 2) -> Path:
    """Frames (PIL RGB, one size) -> a 4:2:0 Y4M file (what chromium's fake camera plays)."""
    w, h = frames[0].size
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for img in frames:
            ycc = np.asarray(img.convert("YCbCr"))
            f.write(b"FRAME\n")
            f.write(ycc[:, :, 0].tobytes())
            for c in (1, 2):
                plane = ycc[:, :, c].astype(np.float32)
                f.write(plane.reshape(h // 2, 2, w // 2, 2).mean((1, 3)).round().astype(np.uint8).tobytes())
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    logs = tmp_path_factory.mktemp("webcam_app")
    port = _port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env["VSTREAM_ANNOTATIONS"] = str(logs / "annotations.db")
    env["VSTREAM_RUNS_DIR"] = str(logs / "runs")
    with open(logs / "out.log", "wb") as fo, open(logs / "err.log", "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env, stdout=fo, stderr=fe
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app did not serve {url}:\n{(logs / 'err.log').read_text()[-3000:]}", pytrace=False)
            time.sleep(0.5)
        yield url, logs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def camera_page(app_url, tmp_path_factory, playwright_sync):
    from vstream.world.shapes_video import make_stream

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("no chromium binary on PATH (apt-get install chromium)", pytrace=False)
    y4m = write_y4m(tmp_path_factory.mktemp("cam") / "stream.y4m", [f for _, f in make_stream(7).frames(2.0)])
    args = [
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={y4m}",
    ]
    url, logs = app_url
    b = playwright_sync.chromium.launch(executable_path=exe, headless=True, args=args)
    ctx = b.new_context(viewport={"width": 1400, "height": 1400}, permissions=["camera"])
    ctx.set_default_timeout(120_000)
    page = ctx.new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("[role=tab]")
    yield page, logs
    b.close()


def _text(page, sel: str) -> str:
    return page.evaluate(_TEXT_JS, sel) or ""


def _wait(page, logs: Path, what: str, js: str) -> None:
    from playwright.sync_api import TimeoutError as PWTimeout

    try:
        page.wait_for_function(js, timeout=WAIT_MS, polling=250)
    except PWTimeout:
        shown = {s: _text(page, s)[:500] for s in ("#video-status", "#video-steps")}
        pytest.fail(
            f"timed out waiting for {what}; page: {shown}\napp stderr: {(logs / 'err.log').read_text()[-2500:]}",
            pytrace=False,
        )


def _rows(page) -> list[list[str]]:
    """The step table's rows (step, stream time, said at, relied-on frame time, best region, text)."""
    return page.evaluate(ROWS_JS)


def test_webcam_run_shows_attribution_and_stops_cleanly(camera_page):
    page, logs = camera_page
    page.get_by_role("tab", name="Video", exact=True).click()
    page.locator("#video-source").get_by_text("Webcam", exact=True).click()
    cam = page.locator("#video-webcam")
    cam.get_by_text("Click to Access Webcam").click()
    cam.locator("[title='start recording']").click()  # the page now streams camera frames
    page.locator("#video-question").locator("textarea, input").first.fill("What happens?")
    page.locator("#video-run").click()
    _wait(page, logs, "the live frame", "() => !!document.querySelector('#video-frame img[src]')")
    _wait(
        page,
        logs,
        "a scored step with the frame it relied on",
        f"() => ({ROWS_JS})().some(r => /^\\d+(\\.\\d+)?$/.test(r[3] || ''))",
    )
    _wait(page, logs, "the step heatmap", "() => !!document.querySelector('#video-heatmap img[src]')")
    _wait(
        page,
        logs,
        "the timeline with frames and steps",
        """() => { const el = document.querySelector('#video-timeline .js-plotly-plot');
                  return !!el && !!el._fullData && el._fullData.filter(t => (t.x || []).length > 0).length >= 2; }""",
    )
    # click a step that relied on a frame: its heatmap appears
    rows = _rows(page)
    idx = next(i for i, r in enumerate(rows) if re.fullmatch(r"\d+(\.\d+)?", r[3]))
    page.locator(f"#video-steps [data-row='{idx}'][data-col='5']").first.click()
    _wait(page, logs, "the clicked step's heatmap", "() => !!document.querySelector('#video-pick img[src]')")

    # stop mid-run: the page says so and what it shows stays consistent
    page.locator("#video-stop").click()
    _wait(page, logs, "the run to stop", STOPPED_JS)
    rows = _rows(page)
    assert rows and [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        if re.fullmatch(r"\d+(\.\d+)?", r[3]):
            # a step relies on a frame group that had arrived when it was said (+1 s: a group's
            # time is its last frame, the stream clock starts with the first webcam frame)
            assert float(r[3]) <= float(r[2]) + 1.0, r
    assert "<|" not in _text(page, "#video-steps")
    # the tab takes a new run (the stopped one released it)
    page.locator("#video-run").click()
    _wait(
        page,
        logs,
        "a second run to start",
        "() => /running|Running/.test(document.querySelector('#video-status')?.innerText || '')",
    )
    page.locator("#video-stop").click()
    _wait(
        page,
        logs,
        "the second run to stop",
        f"() => /^(Done|Stopped)/.test((({_TEXT_JS})('#video-status') || '').trim())",
    )
