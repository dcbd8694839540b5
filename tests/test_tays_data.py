"""TaYS data construction: 2 FPS alignment on hand-checked cases, step placement and strict
causality, the consistency filter, bad-input skips (counted, logged, the run goes on), the
VideoEspresso-style annotation file and the `data` CLI."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from tays.data import (
    DEFAULT_THRESHOLD,
    EncoderError,
    HFEncoder,
    Keyframe,
    SkipSample,
    TfidfEncoder,
    VideoSample,
    align_frames,
    build_trajectories,
    build_trajectory,
    consistency_filter,
    content_words,
    load_videoespresso,
    place_steps,
    resample_times,
    shapes_sample,
    shapes_samples,
)
from vstream.world.shapes_video import make_stream

DATA = Path(__file__).resolve().parent / "data" / "videoespresso"


# -- 1. frame alignment ----------------------------------------------------------------------------


def test_resample_times_2fps():
    assert resample_times(5.0) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    assert resample_times(5.2)[-1] == 5.0  # every k/2 strictly before the end
    assert resample_times(1.0, fps=4.0) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError):
        resample_times(3.0, fps=0)


def test_align_frames_hand_checked():
    """Native frames every 0.3 s; keyframes [1.0, 2.0] @ 1.3 and [1.8, 3.0] @ 2.9 (overlapping)."""
    native = [round(0.3 * k, 1) for k in range(15)]  # 0.0 .. 4.2
    kfs = [Keyframe(1.0, 2.0, 1.3, "first"), Keyframe(1.8, 3.0, 2.9, "second")]
    times = resample_times(4.0)  # 0.0 .. 3.5
    src, kfo = align_frames(times, kfs, native)
    # t:    0.0  0.5  1.0  1.5  2.0  2.5  3.0  3.5
    assert src == [0.0, 0.6, 1.3, 1.3, 1.3, 2.9, 2.9, 3.6]
    assert kfo == [None, None, 0, 0, 0, 1, 1, None]
    # 0.5: nearest of 0.3 / 0.6 is 0.6; 2.0: in both intervals -> the one that starts first;
    # 1.0 and 3.0: interval ends are inclusive; 3.5: nearest of 3.3 / 3.6 is 3.6


def test_align_frames_ties_and_continuous_sources():
    src, _ = align_frames([0.5, 1.5], [], [0.0, 1.0, 2.0])
    assert src == [0.0, 1.0]  # exact ties go to the earlier frame
    src, kfo = align_frames([0.0, 0.5, 1.0], [Keyframe(0.4, 0.6, 0.45, "x")], None)
    assert src == [0.0, 0.45, 1.0] and kfo == [None, 0, None]  # rendered on demand: the time itself


def test_place_steps_hand_checked():
    times = resample_times(5.0)  # groups of 2: (0, .5) (1, 1.5) (2, 2.5) (3, 3.5) (4, 4.5)
    kfs = [
        Keyframe(1.0, 1.2, 1.0, "a"),
        Keyframe(2.0, 3.0, 2.9, "b"),
        Keyframe(3.6, 4.0, 3.7, "c"),
        Keyframe(4.4, 5.0, 4.9, "d"),
    ]
    src, _ = align_frames(times, kfs, None)
    assert src == [0.0, 0.5, 1.0, 1.5, 2.9, 2.9, 2.9, 3.5, 3.7, 4.9]
    places = place_steps(kfs, times, src, 2)
    # a: group (1, 1.5); b: group (2, 2.5) shows 2.9 > 2.5 -> the next one, (3, 3.5);
    # c: 3.7 -> group (4, 4.5) but that shows 4.9, and it is the last group: the step waits for 4.9;
    # d: nothing left after that group -> None
    assert places == [(1, 1.5), (3, 3.5), (4, 4.9), None]


def test_shapes_stream_trajectory_hand_checked():
    """make_stream(5, 5 s): appear 1.0 [1, 2], appear 2.5 [2.5, 3.5], disappear 4.0 [4, 5]."""
    s = make_stream(5, duration=5.0)
    assert [(e.time, e.kind) for e in s.events] == [(1.0, "appear"), (2.5, "appear"), (4.0, "disappear")]
    t = build_trajectory(shapes_sample(s), TfidfEncoder())
    assert t.sample_times == resample_times(5.0)
    assert t.source_times == [0.0, 0.5, 1.0, 1.0, 1.0, 2.5, 2.5, 2.5, 4.0, 4.0]
    assert [(st.group, st.time) for st in t.steps] == [(1, 1.5), (2, 2.5), (4, 4.5)]
    assert [st.text for st in t.steps] == [e.step for e in s.events]
    assert [st.answer for st in t.steps] == ["yellow", "blue", "yellow"]
    assert t.steps[0].question == "What color is the triangle that appears at 1.0 s?"
    frames = t.frames()
    assert len(frames) == 10 and frames[3][1].size == (224, 224)
    assert frames[3][1].tobytes() == s.frame_at(1.0).tobytes()  # 1.5 shows the keyframe


def test_move_keyframe_is_the_half_way_frame():
    s = next(st for st in (make_stream(i) for i in range(200)) if any(e.kind == "move" for e in st.events))
    smp = shapes_sample(s)
    for e, kf in zip(s.events, smp.keyframes):
        assert (kf.start, kf.end) == tuple(e.interval)
        assert kf.time == pytest.approx(e.time + 0.5 if e.kind == "move" else e.time)


# -- 2. causality ----------------------------------------------------------------------------------


def _check_causal(t):
    last_group = -1
    for st in t.steps:
        assert st.group > last_group  # one step per group at most, in time order
        last_group = st.group
        seen = t.visible_frames(st)
        assert seen
        for i in seen:
            assert t.sample_times[i] <= st.time + 1e-9
            assert t.source_times[i] <= st.time + 1e-9
        assert t.group_time(st.group) <= st.time + 1e-9


def test_every_step_only_uses_frames_at_or_before_its_time():
    samples = shapes_samples("train", 0, 60)
    trajs, skipped = build_trajectories(samples)
    assert len(trajs) == 60 and not skipped
    for t, smp in zip(trajs, samples):
        _check_causal(t)
        for st in t.steps:  # and no step comes before its keyframe
            assert st.time >= smp.keyframes[st.keyframe].time - 1e-9
    ve, _ = load_videoespresso(DATA / "annotations.json")
    for t in build_trajectories(ve)[0]:
        _check_causal(t)


# -- 3. consistency filter -------------------------------------------------------------------------


def test_content_words():
    assert content_words("Where does the circle move at 3.0 s?") == ["circle", "move"]
    assert content_words("The red circle moves to the left.") == ["red", "circle", "move", "left"]


def test_filter_removes_planted_inconsistent_steps():
    s = make_stream(11)
    smp = shapes_sample(s)
    assert len(smp.keyframes) >= 3
    kfs = list(smp.keyframes)
    # unrelated sentence, and a step about another object of the same stream
    kfs[1] = replace(kfs[1], description="The purple star turns green.")
    other = next(e for e in s.events if e.shape != s.events[2].shape)  # a step about another object
    kfs[2] = replace(kfs[2], description=other.step)
    trajs, skipped = build_trajectories([replace(smp, keyframes=kfs)])
    t = trajs[0]
    assert not skipped
    assert {d.keyframe for d in t.dropped} == {1, 2}
    assert {st.keyframe for st in t.steps} == set(range(len(kfs))) - {1, 2}
    assert all(d.consistency < DEFAULT_THRESHOLD <= st.consistency for d in t.dropped for st in t.steps)
    # nothing planted: nothing dropped
    t0 = build_trajectories([smp])[0][0]
    assert not t0.dropped and len(t0.steps) == len(smp.keyframes)


def test_filter_scores_and_encoders():
    enc = TfidfEncoder(["Where does the circle move?", "The red circle moves up.", "A blue star appears."])
    keep, cos = consistency_filter(
        [
            ("Where does the circle move at 3.0 s?", "The red circle moves up."),
            ("Where does the circle move at 3.0 s?", "A blue star appears."),
        ],
        enc,
        0.4,
    )
    assert keep == [True, False] and cos[1] == 0.0
    again = TfidfEncoder(["Where does the circle move?", "The red circle moves up.", "A blue star appears."])
    assert (again.encode(["The red circle moves up."]) == enc.encode(["The red circle moves up."])).all()
    with pytest.raises(EncoderError) as e:
        HFEncoder("/definitely/not/a/model/folder")
    assert "\n" not in str(e.value) and "could not load sentence encoder" in str(e.value)


def test_hf_encoder_on_a_tiny_local_model(tmp_path, tiny_tokenizer):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    enc = HFEncoder(str(tmp_path))
    v = enc.encode(["A red circle appears.", "What color is the circle?", "The cat sat."])
    assert v.shape == (3, 32)
    keep, cos = consistency_filter([("A red circle appears.", "A red circle appears.")], enc, 0.99)
    assert keep == [True] and cos[0] == pytest.approx(1.0, abs=1e-5)


# -- bad input -------------------------------------------------------------------------------------


def test_videoespresso_file_skips_are_counted_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="tays.data")
    samples, skipped = load_videoespresso(DATA / "annotations.json")
    assert skipped == Counter({"unreadable_video": 2, "missing_field:question": 1, "missing_field:keyframes": 1})
    assert [s.video_id for s in samples] == ["shapes-5", "out-of-order", "beyond-the-end"]
    trajs, more = build_trajectories(samples)
    assert more == Counter({"keyframes_out_of_order": 1, "timestamp_beyond_video": 1})
    assert [t.video_id for t in trajs] == ["shapes-5"]
    text = caplog.text
    for reason in (
        "unreadable_video",
        "missing_field:question",
        "keyframes_out_of_order",
        "timestamp_beyond_video",
        "broken.mp4",
        "not-there.mp4",
    ):
        assert reason in text


def test_videoespresso_trajectory_hand_checked():
    samples, _ = load_videoespresso(DATA / "annotations.json")
    t = build_trajectories(samples[:1])[0][0]
    assert t.duration == pytest.approx(5.0)
    # native frames every 0.25 s; keyframes [1.1, 1.9] @ 1.25, [2.6, 3.4] @ 2.75, [4.0, 4.9] @ 4.25
    assert t.source_times == [0.0, 0.5, 1.0, 1.25, 2.0, 2.5, 2.75, 3.5, 4.25, 4.25]
    assert t.keyframe_of == [None, None, None, 0, None, None, 1, None, 2, 2]
    assert [(st.text, st.group, st.time) for st in t.steps] == [
        ("A yellow triangle appears.", 1, 1.5),
        ("A blue square appears.", 3, 3.5),
        ("The yellow triangle disappears.", 4, 4.5),
    ]
    frames = t.frames()
    assert len(frames) == 10 and frames[0][1].mode == "RGB" and frames[0][1].size == (224, 224)


def test_bad_samples_never_stop_the_run(tmp_path):
    good = shapes_sample(make_stream(3, duration=6.0))
    kf = good.keyframes
    bad = [
        replace(good, video_id="late", keyframes=kf[:-1] + [replace(kf[-1], end=9.0)]),
        replace(good, video_id="order", keyframes=list(reversed(kf))),
        replace(good, video_id="outside", keyframes=[replace(kf[0], time=kf[0].end + 0.5)]),
        replace(good, video_id="empty", keyframes=[]),
        SkipSample("unreadable_video"),
    ]
    trajs, skipped = build_trajectories([bad[0], good, *bad[1:]])
    assert [t.video_id for t in trajs] == [good.video_id]
    assert skipped == Counter(
        {
            "timestamp_beyond_video": 1,
            "keyframes_out_of_order": 1,
            "bad_interval": 1,
            "no_keyframes": 1,
            "unreadable_video": 1,
        }
    )
    # a planted step that is the only one: nothing left -> skipped, counted
    lone = VideoSample(
        "lone", "q?", "a", 4.0, [Keyframe(1.0, 2.0, 1.0, "Bananas are yellow.", "Where is the car?")], good.read_frame
    )
    assert build_trajectories([lone])[1] == Counter({"no_consistent_steps": 1})
    # an unreadable annotation file
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    assert load_videoespresso(p) == ([], Counter({"unreadable_annotations": 1}))


@pytest.mark.slow
def test_data_cli_prints_counts(capsys):
    from tays.__main__ import main

    assert main(["data", "--annotations", str(DATA / "annotations.json")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["trajectories"] == 1 and out["skipped_total"] == 6 and out["steps"] == 3
