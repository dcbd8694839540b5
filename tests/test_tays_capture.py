"""Attention capture in the TaYS engine against one full masked forward with explicit (eager)
attention weights, in both ingestion modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tays.capture import StreamRecorder
from tays.engine import StreamingEngine
from tays.forward import StreamingSequence, video_interval
from tays.mask import FRAME, PROMPT, additive_mask, streaming_mask
from tays.positions import streaming_position_ids
from vstream.world.shapes_video import make_stream

ATOL = 1e-4


@pytest.fixture(scope="module")
def frames():
    return make_stream(3).frames(2.0)[:8]


def _ids(vlm, text: str) -> list[int]:
    return vlm.tokenizer(text, add_special_tokens=False)["input_ids"]


def eager_attention(vlm, eng: StreamingEngine, frames, fed: list[list[int]]):
    """Rebuild the engine's sequence from its history and run transformers' decoder once with
    eager attention and output_attentions. Returns (attentions (L, H, S, S), text segment
    (start, length) per decode call, {group index: (start, length)})."""
    seq = StreamingSequence(vlm)
    texts = iter(fed)
    texts_at, groups_at, pos = [], {}, 0
    with torch.no_grad():
        for s in eng.segments():
            if s.kind == PROMPT:
                seq.add_prompt(eng.prompt_ids)
            elif s.kind == FRAME:
                seq.add_frames([f for _, f in frames[2 * s.index : 2 * s.index + 2]], time=s.time, index=s.index)
                groups_at[s.index] = (pos, s.length)
            else:
                ids = next(texts)
                seq.add_text(ids, time=s.time, frames_seen=s.frames_seen)
                texts_at.append((pos, s.length))
            pos += s.length
        lm = vlm.model.model.language_model
        embeds = torch.cat([e.to(vlm.dtype) for e in seq.embeds])[None]
        p = streaming_position_ids(seq.segments, video_interval(vlm, eng.fps), device=vlm.device)
        mask = additive_mask(streaming_mask(seq.segments, device=vlm.device), dtype=vlm.dtype)
        before = lm.config._attn_implementation
        lm.config._attn_implementation = "eager"
        try:
            types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
            out = lm(
                inputs_embeds=embeds,
                position_ids=p[:, None],
                attention_mask={t: mask for t in types},
                use_cache=False,
                output_attentions=True,
            )
        finally:
            lm.config._attn_implementation = before
    att = torch.stack([a[0] for a in out.attentions]).float().numpy()  # (L, H, S, S)
    return att, texts_at, groups_at


def run_engine(vlm, frames, ingest: str):
    """prompt -> header (no frame) -> group 0 -> 2 tokens -> group 1 -> 2 tokens at once -> 1."""
    r = _ids(vlm, "The red circle appears. Then it moves to the left.")
    eng = StreamingEngine(vlm, fps=2.0, ingest=ingest)
    rec = StreamRecorder.for_engine(eng)
    eng.attach(rec)
    with eng:
        eng.start("What happens in the video?")
        fed = [eng.header_ids]
        eng.decode_step(eng.header_ids)
        eng.push_frames([f for _, f in frames[:2]], [t for t, _ in frames[:2]])
        assert eng.wait_idle(60) and eng.frames_ingested == 1
        for tok in r[:2]:
            fed.append([tok])
            eng.decode_step(tok)
        eng.push_frames([f for _, f in frames[2:4]], [t for t, _ in frames[2:4]])
        assert eng.wait_idle(60) and eng.frames_ingested == 2
        fed.append(r[2:4])
        eng.decode_step(r[2:4])
        fed.append(r[4:5])
        eng.decode_step(r[4])
    return eng, rec, fed


@pytest.mark.parametrize("ingest", ["thread", "process"])
def test_captured_rows_equal_eager_attention(tiny_qwen2_5_vl, frames, ingest):
    vlm = tiny_qwen2_5_vl
    eng, rec, fed = run_engine(vlm, frames, ingest)
    assert rec.n_calls == len(fed) == 5
    att, texts_at, groups_at = eager_attention(vlm, eng, frames, fed)
    rows = rec.rows(range(rec.n_calls))
    assert [len(r.groups) for r in rows] == [0, 1, 1, 2, 2]
    for row, (start, length) in zip(rows, texts_at, strict=True):
        q = start + length - 1  # the call's last fed token
        assert row.mass.shape[:2] == att.shape[:2]
        for g, lo, hi in row.columns():
            s, n = groups_at[g]
            np.testing.assert_allclose(row.mass[:, :, lo:hi], att[:, :, q, s : s + n], atol=ATOL, rtol=0)
    # frames handed to the engine are kept per group (its last frame) until taken
    frame, t = rec.take_frame(1)
    assert t == frames[3][0] and frame is frames[3][1]
    assert rec.take_frame(1) is None


def test_capture_leaves_logits_alone(tiny_qwen2_5_vl, frames):
    """Decoding with a recorder attached gives the same logits as without."""
    vlm = tiny_qwen2_5_vl
    r = _ids(vlm, "The red circle appears.")
    out = []
    for attach in (False, True):
        with StreamingEngine(vlm, fps=2.0, ingest="thread") as eng:
            if attach:
                eng.attach(StreamRecorder.for_engine(eng))
            eng.start("What happens?")
            eng.push_frames([f for _, f in frames[:2]], [t for t, _ in frames[:2]])
            assert eng.wait_idle(60)
            out.append(torch.cat([eng.decode_step(eng.header_ids), eng.decode_step(r)]))
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)


@pytest.mark.parametrize("ingest", ["thread", "process"])
def test_region_features_equal_eager(tiny_qwen2_5_vl, frames, ingest):
    """Per frame group and region, the span features the attribution uses (mean over the span's
    rows of each (layer, head)'s mass on the region's tokens) equal those from eager weights."""
    from tays.watch import step_features
    from vstream.attr.regions import compute_regions

    vlm = tiny_qwen2_5_vl
    eng, rec, fed = run_engine(vlm, frames, ingest)
    att, texts_at, groups_at = eager_attention(vlm, eng, frames, fed)
    grids = {s.index: s.grid for s in eng.segments() if s.kind == FRAME}
    regions = {g: compute_regions(frames[2 * g + 1][1], grids[g]) for g in grids}
    calls = [1, 2, 3, 4]  # a span: the calls that produced its tokens
    got = step_features(rec.rows(calls), regions)
    assert sorted(got) == [0, 1]
    L, H = att.shape[:2]
    for g, feats in got.items():
        s, n = groups_at[g]
        a = regions[g].assignment.numpy()  # (K, n)
        rows = [att[:, :, texts_at[c][0] + texts_at[c][1] - 1, s : s + n] for c in calls]  # (L, H, n) each
        want = np.mean([(a @ r.reshape(L * H, n).T) for r in rows], axis=0)  # (K, L*H)
        np.testing.assert_allclose(feats, want, atol=ATOL, rtol=0)
