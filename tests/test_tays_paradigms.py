"""TaYS paradigms and metrics on the tiny random Qwen2.5-VL: the three paradigms produce tokens and
honest wall-clock metrics in the expected order; bad frames, early stops and broken sources end
cleanly with a message and no thread left; a visual window keeps the video cache flat; the CLI
prints its JSON last line."""

from __future__ import annotations

import json
import math
import threading

import pytest
from PIL import Image

from tays.bench import measure_decode_contention
from tays.metrics import (
    DecodeCall,
    GroupRecord,
    RunResult,
    StepRecord,
    TokenRecord,
    compute_metrics,
    event_deviation,
    match_event,
    percentile,
)
from tays.paradigms import CausalSequence, run_paradigm
from tays.protocol import PARADIGMS, chat_ids
from tays.sources import EventTruth, IterableSource, PushSource, ShapesSource, StreamError
from vstream.world.shapes_video import make_stream

SPEED = 5.0  # 5 s streams replayed in 1 s


def _tays_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tays-") and t.is_alive()]


def _answered(r) -> bool:
    """At least one answer token (the random model's pieces may decode to "")."""
    return r.metrics["answer_tokens"] > 0


@pytest.fixture(scope="module")
def stream():
    return make_stream(5, duration=5.0)


@pytest.fixture(scope="module")
def runs(tiny_qwen2_5_vl, stream):
    out = {}
    for p in PARADIGMS:
        src = ShapesSource(stream, fps=2.0, realtime=True, speed=SPEED)
        out[p] = run_paradigm(
            tiny_qwen2_5_vl, src, paradigm=p, max_new_tokens=40, step_tokens=4, answer_tokens=3, question_at=0.1
        )
        assert not _tays_threads(), p
    return out


def test_paradigms_produce_tokens_and_metrics(runs, stream):
    for p, r in runs.items():
        m = r.metrics
        assert _answered(r) and any(t.phase == "reasoning" for t in r.tokens), p
        phases = [t.phase for t in r.tokens]
        k = phases.index("answer")
        assert set(phases[:k]) == {"reasoning"} and set(phases[k:]) == {"answer"}, p
        assert len(r.tokens) <= 40 and m["answer_tokens"] == 3
        for k in ("ttft_s", "ttft_question_s", "delay_s", "decode_tokens_per_s", "frames_per_s"):
            assert m[k] is not None and m[k] > 0, (p, k)
        assert m["frames"] == 10 and m["frame_groups"] == 5, p
        assert m["ttft_question_s"] == pytest.approx(m["ttft_s"] - r.question_at)
        assert r.question_at >= 0.1
        # the answer comes after the stream ended and after every frame was ingested
        assert m["delay_s"] >= r.stream_end >= stream.duration / SPEED - 0.01
        assert m["delay_s"] >= max(g.end for g in r.groups)
        assert all(b.wall >= a.wall for a, b in zip(r.tokens, r.tokens[1:]))
        assert r.messages == [], (p, r.messages)


def test_paradigm_ordering(runs, stream):
    b, i, t = runs["batch"].metrics, runs["interleaved"].metrics, runs["tays"].metrics
    # batch watches everything first
    assert b["ttft_s"] >= stream.duration / SPEED
    assert all(tok.frames_seen == 5 for tok in runs["batch"].tokens)
    # TaYS answers the question at once (prefill + one decode step), without waiting for frames;
    # how fast that is in seconds is `python -m tays bench`'s job (a busy machine makes it slow)
    assert t["ttft_question_s"] < b["ttft_question_s"]
    assert runs["tays"].tokens[0].frames_seen <= 1
    # streaming paradigms reason while watching: steps see more and more frames
    for p in ("interleaved", "tays"):
        seen = [s.frames_seen for s in runs[p].steps]
        assert seen == sorted(seen) and seen[-1] == 5 and len(set(seen)) > 1, (p, seen)
    assert i["ttft_s"] < b["ttft_s"]


def test_tays_decoding_overlaps_ingestion_records(runs):
    r = runs["tays"]
    assert all(g.end >= g.start >= g.arrived - 1e-3 for g in r.groups)
    assert [g.index for g in r.groups] == list(range(5))
    assert all(c.end >= c.start for c in r.decode_calls)


def test_bad_frame_mid_stream_is_rejected(tiny_qwen2_5_vl, stream):
    for p in PARADIGMS:
        frames = stream.frames(2.0)[:8]
        frames[3] = (frames[3][0], Image.new("RGB", (100, 80)))
        frames.insert(5, (2.2, "not an image"))
        r = run_paradigm(
            tiny_qwen2_5_vl,
            IterableSource(frames, fps=2.0),
            "What happens?",
            p,
            max_new_tokens=10,
            step_tokens=3,
            answer_tokens=2,
        )
        assert r.frames_rejected == 2 and r.metrics["frames"] == 7, p
        assert any("rejected" in m and "100x80" in m and "224x224" in m for m in r.messages), r.messages
        assert _answered(r) and r.metrics["frame_groups"] == 4
        assert not _tays_threads()


def test_stream_that_stops_early(tiny_qwen2_5_vl, stream):
    """A webcam that stops sending (no end()): the run ends with a message and an answer."""
    frames = [f for _, f in stream.frames(2.0)[:3]]
    for p in PARADIGMS:
        src = PushSource(fps=2.0, idle_timeout=0.3)

        def producer(src=src):
            for i, f in enumerate(frames):
                src.push(f, t=i * 0.5)

        threading.Thread(target=producer).start()
        r = run_paradigm(tiny_qwen2_5_vl, src, "What happens?", p, max_new_tokens=10, step_tokens=3, answer_tokens=2)
        assert any("stopped early" in m for m in r.messages), (p, r.messages)
        assert r.metrics["frames"] == 3 and r.metrics["frame_groups"] == 2  # the last one padded
        assert _answered(r), p
        assert not _tays_threads()


def test_iterable_shorter_than_its_duration(tiny_qwen2_5_vl, stream):
    src = IterableSource(stream.frames(2.0)[:4], fps=2.0, duration=5.0)
    r = run_paradigm(tiny_qwen2_5_vl, src, "What happens?", "tays", max_new_tokens=6, answer_tokens=2)
    assert any("stopped early" in m and "1.50 s" in m for m in r.messages), r.messages
    assert _answered(r) and not _tays_threads()


def test_push_source_bad_frame_engine_keeps_working(tiny_qwen2_5_vl, stream):
    """The webcam pushes a frame of another size mid-stream: push() refuses it, the engine
    goes on with the later good frames."""
    src = PushSource(fps=2.0)
    frames = [f for _, f in stream.frames(2.0)[:6]]
    errors = []

    def producer():
        for i, f in enumerate(frames):
            if i == 3:
                try:
                    src.push(Image.new("RGB", (320, 240)), t=1.5)
                except StreamError as e:
                    errors.append(str(e))
            src.push(f, t=i * 0.5)
        src.end()

    th = threading.Thread(target=producer)
    th.start()
    r = run_paradigm(tiny_qwen2_5_vl, src, "What happens?", "tays", max_new_tokens=10, step_tokens=3, answer_tokens=2)
    th.join()
    assert len(errors) == 1 and "320x240" in errors[0]
    assert r.metrics["frames"] == 6 and r.metrics["frame_groups"] == 3 and _answered(r)
    assert not _tays_threads()


def test_failing_source_ends_the_stream(tiny_qwen2_5_vl, stream):
    def frames():
        yield from stream.frames(2.0)[:3]
        raise StreamError("video clip.mp4 ended early: could not decode frame 3")

    r = run_paradigm(
        tiny_qwen2_5_vl,
        IterableSource(frames(), fps=2.0),
        "What happens?",
        "interleaved",
        max_new_tokens=6,
        answer_tokens=2,
    )
    assert "video clip.mp4 ended early: could not decode frame 3" in r.messages
    assert r.metrics["frames"] == 3 and _answered(r) and not _tays_threads()


def test_stop_event_ends_a_run(tiny_qwen2_5_vl, stream):
    stop = threading.Event()
    src = ShapesSource(stream, fps=2.0, realtime=True)  # 5 s in real time
    threading.Timer(0.3, stop.set).start()
    r = run_paradigm(tiny_qwen2_5_vl, src, paradigm="tays", max_new_tokens=200, step_tokens=2, stop_event=stop)
    assert r.stopped and r.metrics["answer_tokens"] == 0 and r.stream_end < 2.0
    assert not _tays_threads()


def test_visual_window_keeps_memory_flat(tiny_qwen2_5_vl, stream):
    """The video cache of a 4x longer stream is no bigger with a window (and is without one)."""
    cap = {}
    for n, window in ((16, 2), (64, 2), (64, None)):
        frames = [stream.frame_at((i % 10) / 2) for i in range(n)]
        r = run_paradigm(
            tiny_qwen2_5_vl,
            IterableSource(frames, fps=2.0),
            "What happens?",
            "tays",
            max_new_tokens=6,
            step_tokens=2,
            answer_tokens=2,
            visual_window=window,
        )
        assert r.metrics["frame_groups"] == n // 2
        cap[n, window] = r.video_capacity_max
    assert cap[64, 2] == cap[16, 2]
    assert cap[64, None] > 2 * cap[64, 2]


def test_causal_sequence_matches_model_forward(tiny_qwen2_5_vl, stream):
    """The batch/interleaved cache == transformers' own forward of the same batch sequence
    (prompt, one video block, header) with get_rope_index positions."""
    import torch

    vlm = tiny_qwen2_5_vl
    frames = [f for _, f in stream.frames(2.0)[:4]]
    inp = vlm.build_inputs("What happens?", video=frames)
    ids = inp.input_ids[0].tolist()
    vpos = inp.video_token_positions
    v0, v1 = int(vpos[0]), int(vpos[-1]) + 1
    with torch.no_grad():
        ref = vlm.model(**inp.model_kwargs).logits[0, v1:].float()
    seq = CausalSequence(vlm, fps=2.0)
    seq.add_text(ids[:v0], logits=False)
    base = seq.next_pos
    for g in range(2):
        seq.add_frames(frames[2 * g : 2 * g + 2], time_s=g + 0.5, base=base, group_index=g)
    got = seq.add_text(ids[v1:])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_chat_ids_match_the_engine(tiny_qwen2_5_vl):
    from tays.engine import StreamingEngine

    with StreamingEngine(tiny_qwen2_5_vl) as eng:
        eng.start("What happens?", assistant_prefix="<think>")
        assert (eng.prompt_ids, eng.header_ids) == tuple(
            chat_ids(tiny_qwen2_5_vl, "What happens?", assistant_prefix="<think>")
        )


def test_decode_contention_measure(tiny_qwen2_5_vl, stream):
    m = measure_decode_contention(
        tiny_qwen2_5_vl, [f for _, f in stream.frames(2.0)[:6]], n_steps=32, block=8, visual_window=2
    )
    # every step is classified once; how many overlap ingestion depends on the machine's speed
    # (a fast one ingests a tiny-model group in a few ms, so few of 16 steps overlap it)
    assert m["steps_idle"] + m["steps_ingesting"] + m["steps_partial"] == 32, m
    assert m["steps_idle"] >= 8 and m["steps_ingesting"] + m["steps_partial"] >= 1, m
    assert m["decode_step_ms_p95_idle"] > 0
    assert m["steps_ingesting"] == 0 or m["decode_step_ms_p95_ingesting"] > 0
    assert not _tays_threads()


def test_bad_paradigm_arguments(tiny_qwen2_5_vl, stream):
    src = ShapesSource(stream, fps=2.0, realtime=False)
    with pytest.raises(ValueError, match="paradigm"):
        run_paradigm(tiny_qwen2_5_vl, src, paradigm="eager")
    with pytest.raises(ValueError, match="fps"):
        run_paradigm(tiny_qwen2_5_vl, src, fps=3.0)
    with pytest.raises(ValueError, match="question"):
        run_paradigm(tiny_qwen2_5_vl, IterableSource([]), paradigm="tays")
    assert not _tays_threads()


# -- metrics ------------------------------------------------------------------------------------


EVENTS = [
    EventTruth(1.0, "A red circle appears.", "appear", "circle", ("red",)),
    EventTruth(2.5, "A blue square appears.", "appear", "square", ("blue",)),
    EventTruth(4.0, "The red circle turns green.", "recolor", "circle", ("green", "red")),
    EventTruth(6.0, "The green circle moves up.", "move", "circle", ("green",)),
]


def test_match_event_rule():
    assert match_event("I see a blue square.", 9.0, EVENTS).time == 2.5  # shape decides
    assert match_event("The circle turns green.", 9.0, EVENTS).time == 4.0  # verb decides
    assert match_event("The green circle is here.", 5.5, EVENTS).time == 6.0  # nearest of the green ones
    assert match_event("A red circle appears.", 5.0, EVENTS).time == 1.0
    assert match_event("Two circles.", 3.9, EVENTS).time == 4.0  # plural, nearest
    assert match_event("Nothing yet.", 1.0, EVENTS) is None
    steps = [
        StepRecord(0, "A red circle appears.", 1.0, 1.5, 4, 1, 1.0, "period"),
        StepRecord(1, "Hmm.", 2.0, 2.2, 2, 1, 1.0, "period"),
        StepRecord(2, "The blue square appears.", 2.8, 3.0, 4, 2, 2.5, "period"),
    ]
    dev, n = event_deviation(steps, EVENTS)
    assert n == 2 and dev == pytest.approx((0.5 + 0.5) / 2)
    assert event_deviation(steps, EVENTS, speed=2.0)[0] == pytest.approx((2.0 + 3.5) / 2)
    assert event_deviation(steps, None) == (None, 0)


def test_compute_metrics_from_records():
    r = RunResult("tays", 2.0, "q", question_at=1.0, stream_end=10.0)
    r.tokens = [
        TokenRecord(0, 5, "A", 1.02, "reasoning", 0, -math.inf),
        TokenRecord(1, 6, ".", 1.03, "reasoning", 0, -math.inf),
        TokenRecord(2, 7, "2", 10.2, "answer", 10, 9.5),
    ]
    r.decode_calls = [
        DecodeCall(1.01, 1.02, 4),
        DecodeCall(1.02, 1.03, 1),
        DecodeCall(10.19, 10.2, 3),
        DecodeCall(10.2, 10.21, 1, produced=False),
    ]
    r.groups = [GroupRecord(0, 0.5, 2, 0.5, 0.5, 0.6), GroupRecord(1, 1.5, 1, 1.5, 1.6, 1.7)]
    m = compute_metrics(r)
    assert m["ttft_s"] == pytest.approx(1.02) and m["ttft_question_s"] == pytest.approx(0.02)
    assert m["delay_s"] == pytest.approx(10.2)
    assert m["decode_tokens_per_s"] == pytest.approx(3 / 0.03)
    assert m["frames_per_s"] == pytest.approx(3 / 0.2)
    assert m["ingest_lag_max_s"] == pytest.approx(0.2)
    assert m["decode_step_ms_p50"] == pytest.approx(10.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 95) is None
    json.dumps(r.to_dict(full=True))  # JSON-safe (no inf)


# -- CLI ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_bench_json_last_line(tiny_qwen2_5_vl_dir, capsys):
    from tays.__main__ import main

    rc = main(
        [
            "bench",
            "--json",
            "--fps",
            "2",
            "4",
            "--duration",
            "5",
            "--speed",
            str(SPEED),
            "--model",
            str(tiny_qwen2_5_vl_dir),
            "--paradigms",
            "batch",
            "tays",
            "--contention-steps",
            "16",
            "--max-new-tokens",
            "12",
            "--step-tokens",
            "3",
            "--answer-tokens",
            "2",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for p in ("batch", "tays"):
        assert set(out[p]) == {"2", "4"}
        for m in out[p].values():
            for k in ("ttft_s", "delay_s", "decode_tokens_per_s", "frames_per_s"):
                assert m[k] is not None and m[k] > 0
    assert out["decode_step_ms_p95_idle"] > 0 and out["decode_step_ms_p95_ingesting"] > 0
    assert "tays_delay_within_10pct" in out["acceptance"]
    assert not _tays_threads()


@pytest.mark.slow
def test_cli_memory_run(tiny_qwen2_5_vl_dir, capsys):
    from tays.__main__ import main

    assert (
        main(
            [
                "memory-run",
                "--duration",
                "6",
                "--window",
                "2",
                "--max-new-tokens",
                "6",
                "--model",
                str(tiny_qwen2_5_vl_dir),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["frames"] == 12 and out["peak_rss_mb"] > 0 and out["video_capacity_max_tokens"] > 0
    assert not _tays_threads()
