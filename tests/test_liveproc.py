"""The attribution process (vstream.attr.liveproc): same events as the in-process worker, and
nothing left behind (a closed session, a killed server, a parent that dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vstream.attr import liveproc
from vstream.attr.estimator import LinearEstimator
from vstream.attr.spans import FixedSpans
from vstream.attr.worker import DoneEvent, PathEvent, SpanEvent, TokenEvent, attribute_stream
from vstream.model import VLMError, load_vlm

ROOT = Path(__file__).resolve().parents[1]


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _linear(vlm, seed: int = 0) -> LinearEstimator:
    est = LinearEstimator(vlm.num_layers, vlm.num_heads)
    with torch.no_grad():
        est.weight.copy_(torch.randn(est.num_features, generator=torch.Generator().manual_seed(seed)))
        est.region_bias.fill_(0.1)
    return est


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_5_vl_dir):
    return load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")


def _run(vlm, est, process):
    img = _noise(120, 100)
    s = attribute_stream(
        vlm, img, "What is in the image?", est, max_new_tokens=21, splitter=FixedSpans(4), process=process
    )
    return s, list(s)


def test_process_and_thread_give_the_same_events(tiny):
    est = _linear(tiny)
    sp, ep = _run(tiny, est, None)  # auto: a float32 CPU model with a LinearEstimator
    st, et = _run(tiny, est, False)
    assert sp.worker_mode == "process" and st.worker_mode == "thread"
    assert liveproc.server_pid() is not None
    spans_p = [e for e in ep if isinstance(e, SpanEvent)]
    spans_t = [e for e in et if isinstance(e, SpanEvent)]
    assert len(spans_p) == len(spans_t) == 6
    for a, b in zip(spans_p, spans_t):
        assert (a.span, a.rows, a.n_rows, a.note, a.top_regions) == (b.span, b.rows, b.n_rows, b.note, b.top_regions)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.heatmap, b.heatmap, rtol=1e-5, atol=1e-6)
        assert a.heatmap.flags.writeable and a.heatmap.dtype == np.float32
        assert 0 <= a.compute_ms <= a.latency_ms and a.compute_cpu_ms >= 0
        # replay: the same rows, scored here (numpy's float rounding may differ in the last bit)
        np.testing.assert_allclose(sp.compute_span(*a.rows)[0], a.scores, rtol=1e-6, atol=1e-7)
    for a, b in zip([e for e in ep if isinstance(e, PathEvent)], [e for e in et if isinstance(e, PathEvent)]):
        np.testing.assert_allclose(a.point.path, b.point.path, rtol=1e-4, atol=1e-6)
    dp, dt = ep[-1], et[-1]
    assert isinstance(dp, DoneEvent) and dp.error is None and dp.n_spans == 6 and dp.label == dt.label
    assert len(sp.tracker.raw) == 6  # the process's tracker came back
    # the recorder holds the rows the process computed, equal to its own computation
    rec_p, rec_t = sp.recorder, st.recorder
    assert rec_p.tokens == rec_t.tokens == 20
    torch.testing.assert_close(rec_p.stack(), rec_t.stack(), atol=1e-6, rtol=0)


def test_process_refused_where_it_cannot_run(tiny):
    class StandIn:
        def predict(self, f):
            return torch.as_tensor(f).float().sum(-1)

    with pytest.raises(VLMError, match="process=True"):
        attribute_stream(tiny, _noise(64, 64), "What?", StandIn(), process=True)
    s = attribute_stream(tiny, _noise(64, 64), "What?", StandIn(), max_new_tokens=3)
    assert s.worker_mode == "thread"  # any other estimator: the in-process worker
    list(s)


def test_close_mid_run_ends_the_session_but_not_the_server(tiny):
    s = attribute_stream(
        tiny, _noise(120, 100), "What?", _linear(tiny), max_new_tokens=400, splitter=FixedSpans(2), process=True
    )
    for e in s:
        if isinstance(e, SpanEvent):
            break
    pid = liveproc.server_pid()
    t0 = time.perf_counter()
    s.close()
    assert time.perf_counter() - t0 < 5 and not s.running
    assert liveproc.server_pid() == pid  # one server per Python process, reused
    again = list(attribute_stream(tiny, _noise(120, 100), "What?", _linear(tiny), max_new_tokens=6, process=True))
    assert again[-1].error is None


def test_server_killed_mid_run_is_an_error_not_a_hang(tiny):
    s = attribute_stream(
        tiny, _noise(120, 100), "What?", _linear(tiny), max_new_tokens=400, splitter=FixedSpans(2), process=True
    )
    killed = False
    events = []
    for e in s:
        events.append(e)
        if isinstance(e, TokenEvent) and e.index == 5 and not killed:
            os.kill(liveproc.server_pid(), signal.SIGKILL)
            killed = True
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.error and "attribution process" in done.error
    assert done.n_tokens < 400 and not s.running
    # the next session starts a new server
    again = list(attribute_stream(tiny, _noise(120, 100), "What?", _linear(tiny), max_new_tokens=6, process=True))
    assert again[-1].error is None


def test_server_exits_with_its_parent(tiny_qwen2_5_vl_dir, tmp_path):
    """A parent killed outright (no cleanup at all) leaves no attribution process behind."""
    script = textwrap.dedent(
        f"""
        import sys, time
        import numpy as np
        from PIL import Image
        from vstream.attr import liveproc
        from vstream.attr.estimator import LinearEstimator
        from vstream.attr.worker import attribute_stream
        from vstream.model import load_vlm
        vlm = load_vlm({str(tiny_qwen2_5_vl_dir)!r}, device="cpu")
        est = LinearEstimator(vlm.num_layers, vlm.num_heads)
        img = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
        s = attribute_stream(vlm, img, "What?", est, max_new_tokens=400, process=True)
        next(s), next(s)
        print(liveproc.server_pid(), flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert _alive(pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_no_process_falls_back_to_the_thread(tiny, monkeypatch, capsys):
    import vstream.attr.worker as worker

    def refuse(*a, **k):
        raise liveproc.LiveProcessError("no memfd here")

    monkeypatch.setattr(worker, "Channel", refuse)
    s, events = _run(tiny, _linear(tiny), None)
    assert s.worker_mode == "thread" and "no memfd" in s.worker_note
    assert "runs in a thread" in capsys.readouterr().err
    assert events[-1].error is None and len([e for e in events if isinstance(e, SpanEvent)]) == 6


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 3), (8, 1)])
def test_image_rows_equal_the_masked_path_to_the_bit(heads, kv_heads):
    """The attribution process's fused rows are the capture path's `image_mass(decode_scores)`
    (which masks in between), bit for bit, also for steps that see fewer keys than the last."""
    from vstream.attr import rowmath

    rng = np.random.default_rng(heads)
    t, nl, d, s_max = 5, 3, 16, 40
    queries = rng.standard_normal((t, nl, heads, d)).astype(np.float32)
    keys = rng.standard_normal((nl, kv_heads, s_max, d)).astype(np.float32)
    positions = np.array([1, 4, 5, 9, 20])
    for lens in (np.arange(30, 35), np.full(t, 33), np.array([21, 22, 22, 30, 31])):
        want = rowmath.image_mass(rowmath.decode_scores(queries, keys, lens, d**-0.5), positions)
        got = rowmath.image_rows(queries, keys, lens, d**-0.5, positions)
        assert got.shape == (t, nl, heads, len(positions)) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
