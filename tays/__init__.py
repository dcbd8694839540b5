"""TaYS (Think-as-You-See): streaming chain-of-thought over a live video on Qwen2.5-VL.

* `tays.mask`: the streaming attention mask (reasoning sees only frames that have arrived).
* `tays.positions`: decoupled 3-D mRoPE positions (reasoning on its own counter).
* `tays.forward`: one full forward over a streaming sequence (training / oracle).
* `tays.engine`: `StreamingEngine`, decoding while frames are ingested, with a parallel
  dual KV cache (video cache written by frames only, text cache by decoding only).
* `tays.data`: streaming CoT trajectories from (video, keyframes, question) at 2 FPS, with the
  consistency filter and skip counts; `tays.train` / `tays.evaluate`: SFT of the three
  paradigms and their held-out evaluation (`python -m tays train | evaluate`).
"""
from tays.engine import FrameRecord, StreamingEngine, TokenEvent, VideoView, attend_segments
from tays.forward import StreamingSequence, encode_frames, streaming_forward
from tays.mask import FRAME, PROMPT, TEXT, Segment, additive_mask, streaming_mask
from tays.positions import frame_position_ids, streaming_position_ids, text_position_ids, time_interval

__all__ = [
    "FRAME",
    "PROMPT",
    "TEXT",
    "FrameRecord",
    "Segment",
    "StreamingEngine",
    "StreamingSequence",
    "TokenEvent",
    "VideoView",
    "additive_mask",
    "attend_segments",
    "encode_frames",
    "frame_position_ids",
    "streaming_forward",
    "streaming_mask",
    "streaming_position_ids",
    "text_position_ids",
    "time_interval",
]
