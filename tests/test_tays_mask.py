"""TaYS streaming mask and decoupled positions on hand-checked cases (pure torch, no model),
plus the positions against Qwen2.5-VL's own get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tays.mask import FRAME, PROMPT, TEXT, Segment, additive_mask, streaming_mask
from tays.positions import frame_position_ids, streaming_position_ids, text_position_ids, time_interval

# prompt(2) | frame g0 (2 tokens, t=1) | reasoning(2, t=1) | frame g1 (2 tokens, t=2) | reasoning(1, t=2)
CHRONO = [
    Segment(PROMPT, 2),
    Segment(FRAME, 2, time=1.0, grid=(1, 2)),
    Segment(TEXT, 2, time=1.0),
    Segment(FRAME, 2, time=2.0, grid=(1, 2)),
    Segment(TEXT, 1, time=2.0),
]
#                  P P  F0  R R  F1  R
EXPECTED = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0],  # prompt: causal
    [1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0],  # frame g0: prompt + causal in group
    [1, 1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # reasoning at t=1: prompt + g0, causal reasoning, never g1
    [1, 1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 0],  # frame g1: prompt + g0 + itself, never reasoning
    [1, 1, 1, 1, 0, 0, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1],  # reasoning at t=2: everything before
]


def _m(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_mask_hand_checked():
    assert torch.equal(streaming_mask(CHRONO), _m(EXPECTED))


def test_mask_visual_window_one():
    exp = [r[:] for r in EXPECTED]
    exp[6][2:4] = [0, 0]  # g1 no longer sees g0
    exp[7][2:4] = [0, 0]
    exp[8][2:4] = [0, 0]  # reasoning at t=2 sees only the newest group
    assert torch.equal(streaming_mask(CHRONO, visual_window=1), _m(exp))
    # a window as large as the stream changes nothing
    assert torch.equal(streaming_mask(CHRONO, visual_window=2), _m(EXPECTED))


def test_mask_does_not_depend_on_segment_order():
    # frames first, reasoning last: same pattern after undoing the permutation
    grouped = [CHRONO[0], CHRONO[1], CHRONO[3], CHRONO[2], CHRONO[4]]
    perm = [0, 1, 2, 3, 6, 7, 4, 5, 8]  # grouped token k is chronological token perm[k]
    m = streaming_mask(grouped)
    ref = _m(EXPECTED)[perm][:, perm]
    assert torch.equal(m, ref)


def test_mask_reasoning_before_any_frame_and_frames_seen_override():
    segs = [
        Segment(PROMPT, 1),
        Segment(TEXT, 1, time=0.0),
        Segment(FRAME, 1, time=0.5, grid=(1, 1)),
        Segment(TEXT, 1, time=0.2, frames_seen=1),
    ]
    m = streaming_mask(segs).int().tolist()
    assert m == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],  # decoded at t=0: no frame yet
        [1, 0, 1, 0],  # the frame never sees reasoning
        [1, 1, 1, 1],  # frames_seen=1 wins over its time
    ]


def test_mask_rejects_bad_input():
    with pytest.raises(ValueError):
        streaming_mask([Segment(FRAME, 1, time=2.0, grid=(1, 1)), Segment(FRAME, 1, time=1.0, grid=(1, 1))])
    with pytest.raises(ValueError):
        Segment("audio", 1)
    with pytest.raises(ValueError):
        Segment(FRAME, 3, grid=(1, 2))
    with pytest.raises(ValueError):
        streaming_mask(CHRONO, visual_window=0)


def test_additive_mask():
    a = additive_mask(_m(EXPECTED), torch.float32)
    assert a.shape == (1, 1, 9, 9)
    assert (a[0, 0][_m(EXPECTED)] == 0).all()
    assert (a[0, 0][~_m(EXPECTED)] == torch.finfo(torch.float32).min).all()


# -- positions -------------------------------------------------------------------------------------


def test_positions_hand_checked():
    segs = [
        Segment(PROMPT, 3),
        Segment(FRAME, 4, time=1.0, grid=(2, 2)),
        Segment(TEXT, 2, time=1.0),
        Segment(FRAME, 4, time=2.0, grid=(2, 2)),
        Segment(TEXT, 1, time=2.0),
    ]
    pos = streaming_position_ids(segs, interval=time_interval(2, 1.0))  # 2 temporal ids per group
    assert pos.tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 4, 5, 5, 5, 5, 5],
        [0, 1, 2, 3, 3, 4, 4, 3, 4, 3, 3, 4, 4, 5],
        [0, 1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 5],
    ]
    # explicit bases
    pos = streaming_position_ids(segs, interval=2.0, reasoning_base=10, vision_base=20)
    assert pos[:, 7:9].tolist() == [[10, 11]] * 3 and pos[0, 3] == 20 and pos[0, 9] == 22


def test_reasoning_positions_do_not_move_as_video_grows():
    def seq(n_frames: int) -> list[Segment]:
        segs = [Segment(PROMPT, 5)]
        segs += [Segment(FRAME, 6, time=float(i), grid=(2, 3)) for i in range(n_frames)]
        return segs + [Segment(TEXT, 4, time=100.0)]

    iv = time_interval(2, 1.0)
    texts = [streaming_position_ids(seq(n), iv)[:, -4:] for n in (0, 1, 7)]
    for t in texts:
        assert torch.equal(t, texts[0])
        assert torch.equal(t, text_position_ids(5, 0, 4))
    # frames keep their positions too, wherever they sit in the list
    a = streaming_position_ids(seq(3), iv)[:, 5:11]
    b = streaming_position_ids([Segment(PROMPT, 5), Segment(TEXT, 2, time=0.0)] + seq(3)[1:], iv)[:, 7:13]
    assert torch.equal(a, b) and torch.equal(a, frame_position_ids(5, 0, (2, 3), iv))


@pytest.mark.parametrize("fps,n_frames", [(2.0, 6), (3.0, 12), (1.0, 4)])
def test_frame_positions_match_get_rope_index(tiny_qwen2_5_vl, fps, n_frames):
    vlm = tiny_qwen2_5_vl
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(n_frames)]
    inp = vlm.build_inputs("What happens?", video=frames, fps=fps)
    kw = inp.model_kwargs
    ref, _ = vlm.model.model.get_rope_index(
        kw["input_ids"],
        mm_token_type_ids=kw["mm_token_type_ids"],
        video_grid_thw=kw["video_grid_thw"],
        second_per_grid_ts=kw["second_per_grid_ts"],
    )
    ref = ref[:, 0]
    vpos = inp.video_token_positions
    v0 = int(vpos[0])
    g, th, tw = inp.video_grid
    iv = time_interval(vlm.model.config.vision_config.tokens_per_second, vlm.temporal_patch_size / fps)
    ours = torch.cat([frame_position_ids(v0, i, (th, tw), iv) for i in range(g)], dim=1)
    assert torch.equal(ours, ref[:, vpos])
    assert torch.equal(ref[:, :v0], text_position_ids(0, 0, v0))  # prompt text: 0..P-1
