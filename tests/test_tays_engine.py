"""TaYS engine: the oracle (engine logits == one full forward with the streaming mask and
decoupled positions, within 1e-4), the dual cache under concurrency, eviction, threads."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch

from tays.decoder import attend_segments
from tays.engine import THREAD_PREFIX, StreamingEngine
from tays.forward import StreamingSequence, encode_frames, streaming_forward
from tays.ipc import pid_alive
from tays.mask import FRAME, PROMPT, TEXT
from vstream.model import VLMError, load_vlm
from vstream.world.shapes_video import make_stream

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
ATOL = 1e-4


@pytest.fixture(scope="module")
def demo_vlm():
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("assets/demo-model/model.safetensors not there (demo model not trained yet)")
    return load_vlm(str(DEMO_DIR), device="cpu")


@pytest.fixture(scope="module")
def demo_arch_vlm(tmp_path_factory, tiny_tokenizer):
    """The shipped TaYS model's shape: the demo architecture (4 layers, 6 heads / 3 kv, tied
    embeddings) with its earlier 14 px patches, so 224 px frames -> 8x8 tokens per group (the
    demo model itself now has 4x4). Randomly initialised and saved in float16 like the shipped
    ones, so the oracle covers that shape whether or not the models are there."""
    from vstream.world.demo_model import build_demo_model, make_image_processor

    path = tmp_path_factory.mktemp("demo_arch")
    torch.manual_seed(0)
    model = build_demo_model(tiny_tokenizer, patch=14).eval()
    model.to(torch.float16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    make_image_processor(patch=14).save_pretrained(path)
    return load_vlm(str(path), device="cpu")


@pytest.fixture(params=["tiny", "demo_arch", "demo"])
def vlm(request):
    return request.getfixturevalue(
        {"tiny": "tiny_qwen2_5_vl", "demo_arch": "demo_arch_vlm", "demo": "demo_vlm"}[request.param]
    )


@pytest.fixture(params=["thread", "process"])
def ingest(request):
    """Both ingestion modes: a thread of this process, or a worker process (the CPU default)."""
    return request.param


@pytest.fixture(scope="module")
def frames():
    """(t, frame) pairs at 2 FPS from a shapes-world stream: 8 frames = 4 frame groups."""
    return make_stream(3).frames(2.0)[:8]


def _ids(vlm, text: str) -> list[int]:
    return vlm.tokenizer(text, add_special_tokens=False)["input_ids"]


def _no_engine_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def _worker_gone(eng: StreamingEngine) -> bool:
    """No ingestion worker process left (trivially true in thread mode)."""
    return eng.worker_pid is None or (not eng.worker_alive() and not pid_alive(eng.worker_pid))


def _oracle(
    vlm,
    eng: StreamingEngine,
    frames,
    text_ids: list[list[int]],
    *,
    order: str = "history",
    visual_window=None,
    reasoning_base=None,
) -> torch.Tensor:
    """Rebuild the engine's sequence from its history (frames re-encoded independently) and run
    one full forward through transformers' decoder. Returns the logits of the text rows, in
    decode order. order="grouped" lists all frame groups before all reasoning."""
    hist = eng.segments()
    seq = StreamingSequence(vlm)
    texts = iter(text_ids)
    items = []
    for s in hist:
        if s.kind == PROMPT:
            items.append(("p", eng.prompt_ids, s))
        elif s.kind == FRAME:
            grp = [f for _, f in frames[2 * s.index : 2 * s.index + 2]]
            items.append(("f", grp, s))
        else:
            ids = next(texts)
            assert len(ids) == s.length
            items.append(("t", ids, s))
    if order == "grouped":
        items = [i for i in items if i[0] != "t"] + [i for i in items if i[0] == "t"]
    with torch.no_grad():
        for kind, x, s in items:
            if kind == "p":
                seq.add_prompt(x)
            elif kind == "f":
                seq.add_frames(x, time=s.time, index=s.index)
            else:
                seq.add_text(x, time=s.time, frames_seen=s.frames_seen)
        logits = streaming_forward(vlm, seq, fps=eng.fps, visual_window=visual_window, reasoning_base=reasoning_base)[0]
    rows, start = [], 0
    for s in seq.segments:
        if s.kind == TEXT:
            rows.append(logits[start : start + s.length])
        start += s.length
    return torch.cat(rows).float()


# -- the oracle --------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["history", "grouped"])
def test_engine_matches_full_forward(vlm, frames, order, ingest):
    """prompt -> header (no frame yet) -> group 0 -> 2 tokens -> group 1 -> 2 + 1 tokens."""
    r = _ids(vlm, "The red circle appears. Then it moves to the left.")
    with StreamingEngine(vlm, fps=2.0, ingest=ingest) as eng:
        assert eng.ingest == ingest and (eng.worker_pid is not None) == (ingest == "process")
        eng.start("What happens in the video?")
        fed = [eng.header_ids]
        outs = [eng.decode_step(eng.header_ids)]
        eng.push_frames([f for _, f in frames[:2]], [t for t, _ in frames[:2]])
        assert eng.wait_idle(60) and eng.frames_ingested == 1
        for tok in r[:2]:
            fed.append([tok])
            outs.append(eng.decode_step(tok))
        eng.push_frames([f for _, f in frames[2:4]], [t for t, _ in frames[2:4]])
        assert eng.wait_idle(60) and eng.frames_ingested == 2
        fed.append(r[2:4])
        outs.append(eng.decode_step(r[2:4]))  # a multi-token step (teacher forcing)
        fed.append(r[4:5])
        outs.append(eng.decode_step(r[4]))
        got = torch.cat(outs)
        hist = eng.segments()
    assert [s.kind for s in hist] == [PROMPT, TEXT, FRAME, TEXT, TEXT, FRAME, TEXT, TEXT]
    assert [s.frames_seen for s in hist if s.kind == TEXT] == [0, 1, 1, 2, 2]
    assert hist[2].time == frames[1][0] and hist[5].time == frames[3][0]  # a group's time: its last frame
    ref = _oracle(vlm, eng, frames, fed, order=order)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert _no_engine_threads() and _worker_gone(eng)


def test_streaming_mask_hides_later_frames(tiny_qwen2_5_vl, frames, ingest):
    """The reasoning right after group 0 is unchanged by later frames; later reasoning is not."""
    vlm = tiny_qwen2_5_vl
    r = _ids(vlm, "A red circle appears.")[:3]
    res = {}
    for n_groups in (1, 3):
        with StreamingEngine(vlm, ingest=ingest) as eng:
            eng.start("What happens?")
            eng.push_frames([f for _, f in frames[:2]])
            eng.wait_idle(60)
            a = eng.decode_step(eng.header_ids + r[:1])
            eng.push_frames([f for _, f in frames[2 : 2 * n_groups]])
            eng.wait_idle(60)
            b = eng.decode_step(r[1:])
            res[n_groups] = (a, b)
    torch.testing.assert_close(res[1][0], res[3][0], atol=1e-6, rtol=0)
    assert not torch.allclose(res[1][1], res[3][1], atol=1e-3)


def test_batch_layout_sanity(tiny_qwen2_5_vl, frames):
    """The oracle machinery itself: with a plain causal pattern and get_rope_index's positions,
    streaming_forward over per-group encoded frames equals the model's own batch forward."""
    vlm = tiny_qwen2_5_vl
    vid = [f for _, f in frames[:4]]
    inp = vlm.build_inputs("What happens?", video=vid)
    ids = inp.input_ids[0].tolist()
    vpos = inp.video_token_positions
    v0, v1 = int(vpos[0]), int(vpos[-1]) + 1
    g, th, tw = inp.video_grid
    with torch.no_grad():
        ref = vlm.model(**inp.model_kwargs).logits[0]
        seq = StreamingSequence(vlm)
        seq.add_prompt(ids[:v0])
        for i in range(g):
            seq.add_frames(vid[2 * i : 2 * i + 2], time=float(i))
        seq.add_text(ids[v1:], time=math.inf)
        # transformers 5.23 puts text after a video block at V0 + max(th, tw)
        ours = streaming_forward(vlm, seq, fps=2.0, reasoning_base=v0 + max(th, tw))[0]
        whole = vlm.model.model.get_video_features(
            inp.model_kwargs["pixel_values_videos"], inp.model_kwargs["video_grid_thw"]
        ).pooler_output[0]
        per_group = torch.cat([encode_frames(vlm, vid[2 * i : 2 * i + 2])[0] for i in range(g)])
    torch.testing.assert_close(per_group, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("window", [1, 2])
def test_visual_window_eviction_matches_oracle(tiny_qwen2_5_vl, frames, ingest, window):
    """A visual window with a tiny initial buffer: growth + compaction happen (in the engine and,
    in process mode, in the worker's own copy), logits still match the windowed streaming mask,
    and the video buffer stays bounded."""
    vlm = tiny_qwen2_5_vl
    r = _ids(vlm, "The red circle appears. Then it moves.")
    fed, outs, caps = [], [], []
    with StreamingEngine(vlm, visual_window=window, initial_capacity=1, ingest=ingest) as eng:
        eng.start("What happens?")
        fed.append(eng.header_ids)
        outs.append(eng.decode_step(eng.header_ids))
        for gi in range(4):
            eng.push_frames([f for _, f in frames[2 * gi : 2 * gi + 2]], [t for t, _ in frames[2 * gi : 2 * gi + 2]])
            assert eng.wait_idle(60)
            v = eng.video_view()
            assert v.n_groups == gi + 1 and v.first_group == max(0, gi + 1 - window)
            caps.append(eng.video_capacity)
            fed.append(r[gi : gi + 1])
            outs.append(eng.decode_step(r[gi]))
        got = torch.cat(outs)
    P, k = eng.prompt_len, 16
    assert max(caps) <= 2 * (P + (window + 1) * k)  # bounded, not growing with the stream
    ref = _oracle(vlm, eng, frames, fed, visual_window=window)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # without the window the oracle differs (the window really evicts)
    assert not torch.allclose(got, _oracle(vlm, eng, frames, fed), atol=1e-3)
    assert _worker_gone(eng)


def test_concurrent_ingestion_is_consistent(tiny_qwen2_5_vl, frames, ingest):
    """Frames are fed from a thread while decode steps run: every step saw one consistent set of
    frame groups (the same on all layers), and matches the oracle built from what it saw."""
    vlm = tiny_qwen2_5_vl
    r = _ids(vlm, "The red circle appears. Then it moves to the left. The blue square turns red.")
    fed, outs = [], []
    with StreamingEngine(vlm, initial_capacity=8, ingest=ingest) as eng:
        eng.start("What happens?")
        eng.play(frames, realtime=False)
        fed.append(eng.header_ids)
        outs.append(eng.decode_step(eng.header_ids))
        for tok in r[:12]:
            fed.append([tok])
            outs.append(eng.decode_step(tok))
        eng.wait_frames(4, 60)
        for tok in r[12:14]:
            fed.append([tok])
            outs.append(eng.decode_step(tok))
        got = torch.cat(outs)
    seen = [s.frames_seen for s in eng.segments() if s.kind == TEXT]
    assert seen == sorted(seen) and seen[-1] == 4
    ref = _oracle(vlm, eng, frames, fed)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert _no_engine_threads() and _worker_gone(eng)


def test_decoding_is_not_blocked_by_ingestion(tiny_qwen2_5_vl, frames, monkeypatch):
    """Ingestion is held in the middle of a group (layer 0's K/V already written past the
    published spans): a decode step still runs, sees none of that group, and matches the
    oracle; once released, the next step sees the group."""
    import tays.decoder as decoder_mod

    vlm = tiny_qwen2_5_vl
    gate, entered = threading.Event(), threading.Event()
    orig = decoder_mod.attend_segments

    def held(q, segs, scale):
        if threading.current_thread().name == THREAD_PREFIX + "ingest" and not gate.is_set():
            entered.set()
            gate.wait(60)
        return orig(q, segs, scale)

    monkeypatch.setattr(decoder_mod, "attend_segments", held)
    r = _ids(vlm, "A red circle appears.")
    with StreamingEngine(vlm, ingest="thread") as eng:
        eng.start("What happens?")
        eng.push_frames([f for _, f in frames[:2]])
        assert entered.wait(60)
        outs = [eng.decode_step(eng.header_ids)]  # would deadlock if decoding waited for ingestion
        assert eng.frames_ingested == 0 and eng.video_view().n_groups == 0
        gate.set()
        assert eng.wait_idle(60)
        outs.append(eng.decode_step(r[0]))
    assert [s.frames_seen for s in eng.segments() if s.kind == TEXT] == [0, 1]
    ref = _oracle(vlm, eng, frames, [eng.header_ids, r[:1]])
    torch.testing.assert_close(torch.cat(outs), ref, atol=ATOL, rtol=0)


def test_generate_streams_greedy_tokens(tiny_qwen2_5_vl, frames):
    vlm = tiny_qwen2_5_vl
    with StreamingEngine(vlm) as eng:
        eng.start("What happens?")
        eng.play(frames[:4], realtime=False)
        events = list(eng.generate(max_new_tokens=6, min_frames=2))
        assert [e.index for e in events] == list(range(6))
        assert all(e.frames_seen == 2 for e in events) and events[0].stream_time == frames[3][0]
        assert all(b.time >= a.time for a, b in zip(events, events[1:]))
        toks = [e.token_id for e in events]
        assert eng.generated == toks
        # more tokens continue from the text cache
        more = list(eng.generate(max_new_tokens=2))
        assert [e.index for e in more] == [0, 1]
    # greedy: each token is the argmax of the oracle at the previous position
    fed = [eng.header_ids] + [[t] for t in toks[:-1]] + [[toks[-1]]] + [[more[0].token_id]]
    ref = _oracle(vlm, eng, frames, fed)
    assert ref.argmax(-1)[len(eng.header_ids) - 1 :].tolist() == toks + [e.token_id for e in more]


def test_generate_waits_for_frames_after_wait_tokens(tiny_qwen2_5_vl, frames):
    """After a wait token, decoding pauses until a new frame group is in (or the stream ends)."""
    vlm = tiny_qwen2_5_vl
    with StreamingEngine(vlm) as eng:
        eng.start("What happens?")
        gen = eng.generate(max_new_tokens=4, wait_tokens=range(len(vlm.tokenizer)))  # every token waits
        e0 = next(gen)
        assert e0.frames_seen == 0
        eng.push_frames([f for _, f in frames[:2]])
        assert next(gen).frames_seen == 1
        box = []
        th = threading.Thread(target=lambda: box.append(next(gen)))
        th.start()
        th.join(0.5)
        assert th.is_alive() and not box  # blocked: no new evidence yet
        eng.push_frames([f for _, f in frames[2:4]])
        th.join(60)
        assert box and box[0].frames_seen == 2
        eng.end_of_stream()  # nothing pending: the stream is over, decoding goes on
        assert next(gen).frames_seen == 2
        assert list(gen) == []


def test_threads_are_joined_and_stopped_engine_refuses(tiny_qwen2_5_vl, frames, ingest):
    vlm = tiny_qwen2_5_vl
    eng = StreamingEngine(vlm, ingest=ingest)
    eng.start("What happens?")
    eng.play(frames, realtime=True, speed=0.5)  # slow feeder, still running at stop()
    eng.decode_step(eng.header_ids)
    assert eng.threads()
    if ingest == "process":
        assert eng.worker_alive() and pid_alive(eng.worker_pid)
    eng.stop()
    assert not eng.threads() and _no_engine_threads() and _worker_gone(eng)
    eng.stop()  # idempotent
    with pytest.raises(RuntimeError):
        eng.push_frame(frames[0][1])
    with pytest.raises(RuntimeError):
        eng.decode_step(1)
    with pytest.raises(RuntimeError):
        StreamingEngine(vlm).decode_step(1)  # not started


def test_ingestion_error_surfaces(tiny_qwen2_5_vl, ingest):
    with StreamingEngine(tiny_qwen2_5_vl, ingest=ingest) as eng:
        eng.start("What happens?")
        eng.push_frames(["not an image", "nor this"])
        with pytest.raises(RuntimeError, match="frame ingestion failed: VLMError: video frame 0"):
            eng.wait_idle(60)
        with pytest.raises(RuntimeError, match="frame ingestion failed"):
            eng.decode_step(eng.header_ids)
        if ingest == "process":  # the worker exits after reporting the error, before stop()
            deadline = time.monotonic() + 10
            while eng.worker_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _worker_gone(eng)
    assert _no_engine_threads() and _worker_gone(eng)


def test_bad_frames_leave_earlier_state_intact(tiny_qwen2_5_vl, frames, ingest):
    """A corrupt frame after good groups: a clear error, the committed groups and the text cache
    are untouched (the video view still serves the frames that were in), nothing is left running."""
    vlm = tiny_qwen2_5_vl
    with StreamingEngine(vlm, ingest=ingest) as eng:
        eng.start("What happens?")
        eng.push_frames([f for _, f in frames[:4]])
        assert eng.wait_idle(60) and eng.frames_ingested == 2
        eng.decode_step(eng.header_ids)
        eng.push_frames([frames[4][1], b"\x89PNG corrupt"])
        with pytest.raises(RuntimeError, match="frame ingestion failed"):
            eng.wait_idle(60)
        assert eng.frames_ingested == 2 and eng.video_view().n_groups == 2
        assert [s.kind for s in eng.segments()] == [PROMPT, FRAME, FRAME, TEXT]
    assert _no_engine_threads() and _worker_gone(eng)


def test_frame_size_change_mid_stream(tiny_qwen2_5_vl, frames, ingest):
    """Within a group frames must share a size (clear error); a new size from one group to the
    next is a new token grid, and the logits still match the oracle."""
    vlm = tiny_qwen2_5_vl
    small = [(t, f.resize((56, 56))) for t, f in frames]
    with StreamingEngine(vlm, ingest=ingest) as eng:
        eng.start("What happens?")
        eng.push_frames([frames[0][1], small[1][1]])
        with pytest.raises(RuntimeError, match="same size"):
            eng.wait_idle(60)
    assert _no_engine_threads() and _worker_gone(eng)
    mixed = frames[:2] + small[2:4]
    with StreamingEngine(vlm, ingest=ingest) as eng:
        eng.start("What happens?")
        eng.push_frames([f for _, f in mixed], [t for t, _ in mixed])
        assert eng.wait_idle(60) and eng.frames_ingested == 2
        got = eng.decode_step(eng.header_ids)
    torch.testing.assert_close(got, _oracle(vlm, eng, mixed, [eng.header_ids]), atol=ATOL, rtol=0)
    assert _no_engine_threads() and _worker_gone(eng)


def test_stream_that_stops_early_pads_the_last_group(tiny_qwen2_5_vl, frames, ingest):
    """end_of_stream() after an odd number of frames: the last group is padded and ingested;
    the logits match the oracle (which pads the same way)."""
    vlm = tiny_qwen2_5_vl
    with StreamingEngine(vlm, ingest=ingest) as eng:
        eng.start("What happens?")
        eng.push_frames([f for _, f in frames[:3]], [t for t, _ in frames[:3]])
        eng.end_of_stream()
        assert eng.wait_idle(60) and eng.frames_ingested == 2
        assert eng.wait_frames(3, timeout=1) is False  # the stream is over: no third group
        got = eng.decode_step(eng.header_ids)
        hist = eng.segments()
    assert hist[2].time == frames[2][0]
    ref = _oracle(vlm, eng, frames[:3], [eng.header_ids])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert _no_engine_threads() and _worker_gone(eng)


def test_worker_process_lifecycle(tiny_qwen2_5_vl, frames):
    """The worker is gone after stop() without start(), after an engine is dropped without
    stop(), and a worker that dies under the engine is reported as an ingestion failure."""
    import gc
    import os
    import signal

    vlm = tiny_qwen2_5_vl
    eng = StreamingEngine(vlm, ingest="process")
    pid = eng.worker_pid
    assert pid_alive(pid)
    eng.stop()
    assert _worker_gone(eng)

    eng = StreamingEngine(vlm, ingest="process")
    pid = eng.worker_pid
    del eng
    gc.collect()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(pid)

    with StreamingEngine(vlm, ingest="process") as eng:
        eng.start("What happens?")
        eng.push_frames([f for _, f in frames[:2]])
        assert eng.wait_idle(60) and eng.frames_ingested == 1
        os.kill(eng.worker_pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            eng.wait_frames(2, timeout=30)
        with pytest.raises(RuntimeError, match="frame ingestion failed"):
            eng.push_frame(frames[2][1])
    assert _no_engine_threads() and _worker_gone(eng)


def test_ingest_mode_selection(tiny_qwen2_5_vl, monkeypatch):
    with StreamingEngine(tiny_qwen2_5_vl) as eng:
        assert eng.ingest == "process"  # CPU default
    monkeypatch.setenv("TAYS_INGEST", "thread")
    with StreamingEngine(tiny_qwen2_5_vl) as eng:
        assert eng.ingest == "thread" and eng.worker_pid is None
    with pytest.raises(ValueError, match="ingest must be"):
        StreamingEngine(tiny_qwen2_5_vl, ingest="fork")


def test_qwen3_is_refused(tiny_qwen3_vl):
    with pytest.raises(VLMError, match="qwen2_5_vl"):
        StreamingEngine(tiny_qwen3_vl)


def test_attend_segments_equals_one_softmax():
    """LSE merge over three segments (one masked, one empty) == softmax over the concatenation."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g)
    ks = [torch.randn(1, 2, n, 8, generator=g) for n in (5, 0, 3)]
    vs = [torch.randn(1, 2, n, 8, generator=g) for n in (5, 0, 3)]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    out = attend_segments(q, [(ks[0], vs[0], None), (ks[1], vs[1], None), (ks[2], vs[2], causal)], 8**-0.5)
    K = torch.cat(ks, 2).repeat_interleave(2, dim=1)
    V = torch.cat(vs, 2).repeat_interleave(2, dim=1)
    mask = torch.cat([torch.ones(3, 5, dtype=torch.bool), causal], 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(1, 3, 32), atol=1e-5, rtol=0)


def test_streaming_forward_is_differentiable(demo_arch_vlm, frames):
    """Training path: the streaming forward keeps the graph; a masked-out later frame gets no
    gradient from earlier reasoning."""
    vlm = demo_arch_vlm
    seq = StreamingSequence(vlm)
    seq.add_prompt(_ids(vlm, "What happens?"))
    with torch.no_grad():
        e0, grid = encode_frames(vlm, [f for _, f in frames[:2]])
        e1, _ = encode_frames(vlm, [f for _, f in frames[2:4]])
    e0, e1 = e0.clone().requires_grad_(), e1.clone().requires_grad_()
    seq.add_frame_embeds(e0, grid, time=0.5)
    r = _ids(vlm, "A red circle appears.")
    seq.add_text(r, time=0.5)  # decoded before group 1 arrived
    seq.add_frame_embeds(e1, grid, time=1.5)
    try:
        logits = streaming_forward(vlm, seq)
        assert logits.requires_grad
        n_r = len(r)
        start = len(seq) - e1.shape[0] - n_r
        logits[0, start : start + n_r].logsumexp(-1).sum().backward()
        assert e0.grad is not None and e0.grad.abs().sum() > 0
        assert e1.grad is None or e1.grad.abs().sum() == 0
    finally:
        vlm.model.zero_grad(set_to_none=True)


def test_prewarm_starts_the_server_and_loads_the_model(tiny_qwen2_5_vl):
    from tays import ipc

    pid = ipc.prewarm(tiny_qwen2_5_vl)
    assert pid == ipc.server_pid() and pid_alive(pid)
    with StreamingEngine(tiny_qwen2_5_vl, ingest="process") as eng:
        assert eng.worker_pid != pid and eng.worker_alive()
    assert _worker_gone(eng) and pid_alive(pid)  # the server stays for the next engine
