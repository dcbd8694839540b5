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
* `tays.capture`, `tays.watch`: attribution while watching (each reasoning step's attention on
  the frame groups and regions it could see, scored by a vSTREAM estimator as the stream plays);
  `tays.watch_eval` measures it (``python -m tays attribute-eval``).
* `tays.data`, `tays.train`, `tays.evaluate`, `tays.bench`: streaming CoT trajectories, SFT of the
  three paradigms, held-out evaluation, benchmarks (``python -m tays data | train | evaluate | bench
  | memory``).
"""

from tays.engine import StreamingEngine, TokenEvent
from tays.forward import StreamingSequence, streaming_forward
from tays.ipc import prewarm
from tays.metrics import RunResult, TokenRecord
from tays.paradigms import run_paradigm
from tays.protocol import PARADIGMS, TRAINED, run_options
from tays.sources import IterableSource, PushSource, ShapesSource, StreamError, VideoFileSource

# the names a notebook or the app needs; the mask, positions, caches and decoder loop are
# imported from their modules (tays.mask, tays.positions, tays.cache, tays.decoder)
__all__ = [
    "PARADIGMS",
    "TRAINED",
    "IterableSource",
    "PushSource",
    "RunResult",
    "ShapesSource",
    "StreamError",
    "StreamingEngine",
    "StreamingSequence",
    "TokenEvent",
    "TokenRecord",
    "VideoFileSource",
    "prewarm",
    "run_options",
    "run_paradigm",
    "streaming_forward",
]
