"""vSTREAM: live visual attribution of a thinking VLM's reasoning, span by span.

The names a notebook needs:

    from vstream import load_vlm, load_estimator, attribute_stream, SpanEvent

Subpackages, lowest layer first: `vstream.model` (the model adapter both libraries stand on),
`vstream.world` (the shapes world, the demo model and its trainers), `vstream.attr` (regions,
attention capture, spans, ablation, labels, the estimator, the live worker, dynamics, methods,
evaluation), `vstream.cli` (`python -m vstream ...`).

Names are imported on first use, so `import vstream.model` (what `tays` does) does not pull in
the attribution stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "VLM": ("vstream.model", "VLM"),
    "VLMError": ("vstream.model", "VLMError"),
    "load_vlm": ("vstream.model", "load_vlm"),
    "LinearEstimator": ("vstream.attr.estimator", "LinearEstimator"),
    "load_estimator": ("vstream.attr.estimator", "load"),
    "regions_for": ("vstream.attr.regions", "regions_for"),
    "attribute": ("vstream.attr.methods", "attribute"),
    "AttributionContext": ("vstream.attr.methods", "AttributionContext"),
    "attribute_stream": ("vstream.attr.worker", "attribute_stream"),
    "AttributionSession": ("vstream.attr.worker", "AttributionSession"),
    "RegionsEvent": ("vstream.attr.worker", "RegionsEvent"),
    "TokenEvent": ("vstream.attr.worker", "TokenEvent"),
    "SpanEvent": ("vstream.attr.worker", "SpanEvent"),
    "PathEvent": ("vstream.attr.worker", "PathEvent"),
    "DoneEvent": ("vstream.attr.worker", "DoneEvent"),
    "RunRecord": ("vstream.attr.record", "RunRecord"),
    "attribute_run": ("vstream.attr.record", "attribute_run"),
    "load_run": ("vstream.attr.record", "load_run"),
}
__all__ = [
    "AttributionContext",
    "AttributionSession",
    "DoneEvent",
    "LinearEstimator",
    "PathEvent",
    "RegionsEvent",
    "RunRecord",
    "SpanEvent",
    "TokenEvent",
    "VLM",
    "VLMError",
    "attribute",
    "attribute_run",
    "attribute_stream",
    "load_estimator",
    "load_run",
    "load_vlm",
    "regions_for",
]

if TYPE_CHECKING:
    from vstream.attr.estimator import LinearEstimator
    from vstream.attr.estimator import load as load_estimator
    from vstream.attr.methods import AttributionContext, attribute
    from vstream.attr.record import RunRecord, attribute_run, load_run
    from vstream.attr.regions import regions_for
    from vstream.attr.worker import (
        AttributionSession,
        DoneEvent,
        PathEvent,
        RegionsEvent,
        SpanEvent,
        TokenEvent,
        attribute_stream,
    )
    from vstream.model import VLM, VLMError, load_vlm


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vstream' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
