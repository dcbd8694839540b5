"""TaYS (Think-as-You-See): streaming chain-of-thought over a live video on Qwen2.5-VL.

    from tays import StreamingEngine, run_paradigm, ShapesSource
    res = run_paradigm(vlm, ShapesSource(stream), paradigm="tays")   # or "batch", "interleaved"

* `tays.mask`, `tays.positions`: the streaming attention mask (reasoning sees only frames that have
  arrived) and decoupled 3-D mRoPE positions (reasoning on its own counter).
* `tays.forward`: one full forward over a streaming sequence (training / the engine's oracle).
* `tays.engine`: `StreamingEngine`, decoding while frames are ingested, with a parallel dual KV
  cache (`tays.cache`: video cache written by frames only, text cache by decoding only), on the
  shared layer loop of `tays.decoder`; `tays.ingest` / `tays.ipc`: frame ingestion in a thread or
  a worker process.
* `tays.paradigms`: batch, interleaved and TaYS runs over a `tays.sources` frame source, timed
  (`tays.metrics`); `tays.protocol`: the chat layout and the trained reasoning protocol.
* `tays.data`, `tays.train`, `tays.evaluate`, `tays.bench`: streaming CoT trajectories, SFT of the
  three paradigms, held-out evaluation, benchmarks (``python -m tays data | train | evaluate | bench
  | memory``).
"""

from tays.cache import VideoView
from tays.decoder import attend_segments
from tays.engine import StreamingEngine, TokenEvent
from tays.forward import StreamingSequence, encode_frames, streaming_forward
from tays.ingest import FrameRecord
from tays.ipc import prewarm
from tays.mask import FRAME, PROMPT, TEXT, Segment, additive_mask, streaming_mask
from tays.metrics import RunResult, TokenRecord
from tays.paradigms import run_paradigm
from tays.positions import frame_position_ids, streaming_position_ids, text_position_ids, time_interval
from tays.protocol import PARADIGMS, TRAINED, chat_ids, run_options
from tays.sources import IterableSource, PushSource, ShapesSource, StreamError, VideoFileSource

__all__ = [
    "FRAME",
    "PARADIGMS",
    "PROMPT",
    "TEXT",
    "TRAINED",
    "FrameRecord",
    "IterableSource",
    "PushSource",
    "RunResult",
    "Segment",
    "ShapesSource",
    "StreamError",
    "StreamingEngine",
    "StreamingSequence",
    "TokenEvent",
    "TokenRecord",
    "VideoFileSource",
    "VideoView",
    "additive_mask",
    "attend_segments",
    "chat_ids",
    "encode_frames",
    "frame_position_ids",
    "prewarm",
    "run_options",
    "run_paradigm",
    "streaming_forward",
    "streaming_mask",
    "streaming_position_ids",
    "text_position_ids",
    "time_interval",
]
