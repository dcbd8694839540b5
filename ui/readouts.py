"""What the explorer says: status lines, readouts and tables as Markdown, one function per message.

Kept apart from app.py so the handlers there only wire widgets to library calls, and apart from
Gradio so every message can be checked without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tays import RunResult
from ui.explorer import RunView
from ui.video import clean
from vstream.model import split_thinking


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def _3(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


# ----------------------------------------------------------------------------------------------
# Reasoning


def reasoning_markdown(text: str, done: bool) -> str:
    """The plain (no attribution) stream: thinking with a cursor while it runs, then the answer."""
    thinking, answer = split_thinking(text)
    out = f"**Thinking**\n\n{thinking}{'' if done or answer else ' ▍'}"
    if answer or done:
        out += f"\n\n**Answer:** {answer.strip() or '(none)'}"
    return out


def attribution_running(run: RunView, n_tokens: int, secs: float, notice: str = "") -> str:
    """`notice`: a message for a click the running job ignored (shown in bold)."""
    extra = f" **{notice}**" if notice else ""
    return f"Running… {n_tokens} tokens, {len(run.spans)} spans attributed ({secs:.1f} s). {run.note}{extra}"


def attribution_final(run: RunView, n_tokens: int, secs: float) -> str:
    if run.error:
        return f"**Error:** {run.error}"
    if run.cancelled or not run.done:
        return f"Stopped after {n_tokens} tokens and {len(run.spans)} spans ({secs:.1f} s)."
    return (
        f"Done in {secs:.1f} s: answer **{run.answer or '(none)'}** · {len(run.spans)} spans · "
        f"{n_tokens} tokens. {run.note}"
    )


def loading_model(label: str) -> str:
    """Status while a model loads for its first use on this server."""
    return (
        f"Loading {label} (its first use on this server; a large model can take minutes). "
        "Other sessions keep working meanwhile."
    )


NO_SPANS = "No span yet: run the model, or open a saved run, then pick a span here."


def span_view_info(run: RunView, i: int, shared: bool) -> str:
    """What the large view shows: the span, its top regions and the scale's meaning."""
    s = run.spans[i]
    lo, hi = run.scale(i, shared)
    scale = f"shared across the run's {len(run.spans)} spans" if shared else "this span's own range"
    return (
        f"**Span {i}** of {len(run.spans)} [{s.kind}]: {s.text}\n\n"
        f"Top regions: {', '.join(map(str, s.top_regions[:5]))} · heatmap ready {s.latency_ms:.1f} ms after the "
        f"sentence closed.\n\nColour scale {lo:.3g} to {hi:.3g} ({scale}); a score is the predicted drop in the "
        "sentence's log-probability when the region is removed."
    )


def run_shown(run: RunView) -> str:
    """Status line when a kept or reopened run is shown."""
    where = "opened from a file" if run.opened else "from this tab"
    return (
        f"Run `{run.run_id}` ({where}): answer **{run.answer or '(none)'}** · {len(run.spans)} spans · "
        f"model `{run.model}`."
    )


# ----------------------------------------------------------------------------------------------
# Video


def ttft_markdown(ttft: float | None, waiting_s: float | None = None) -> str:
    if ttft is not None:
        return f"**TTFT** {ttft:.2f} s"
    return f"**TTFT** waiting… {waiting_s or 0.0:.1f} s since the question"


def delay_markdown(delay: float | None, final: bool) -> str:
    if delay is None:
        return "**Delay** –"
    what = "last answer token after stream start" if final else "latest token after stream start (running)"
    return f"**Delay** {delay:.2f} s ({what})"


def video_running(fps: float, webcam: bool, secs: float, frame_t: float | None = None) -> str:
    if frame_t is not None:
        waiting = f"seeing the frame at {frame_t:.1f} s"
    else:
        waiting = "waiting for webcam frames (start the webcam)" if webcam else "playing the file"
    return f"Running TaYS at {fps:g} FPS, {waiting}… {secs:.1f} s"


def video_done(res: RunResult) -> str:
    m = res.metrics
    notes = " ".join(dict.fromkeys(res.messages))[:400]
    return (
        ("Stopped. " if res.stopped else "Done. ")
        + f"{m.get('frames', 0)} frames in {m.get('frame_groups', 0)} groups, "
        f"{m.get('tokens', 0)} tokens, answer **{clean(res.answer) or '(none)'}**."
        + (f" Messages: {notes}" if notes else "")
    )


def comparison_markdown(rows: Sequence[dict[str, Any]], other: str) -> str:
    """`rows`: `RunResult.metrics` of TaYS, then of `other`, with 'paradigm' and 'answer' added."""
    lines = ["| paradigm | TTFT | delay | tokens | answer |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['paradigm']} | {_secs(r.get('ttft_question_s'))} | {_secs(r.get('delay_s'))} | "
            f"{r.get('tokens')} | {clean(r['answer']) or '(none)'} |"
        )
    if len(rows) == 2 and rows[0].get("ttft_question_s") is not None and rows[1].get("ttft_question_s") is not None:
        d = rows[1]["ttft_question_s"] - rows[0]["ttft_question_s"]
        lines.append(
            f"\nTaYS's first token came {abs(d):.2f} s {'earlier' if d >= 0 else 'later'} than {other}'s "
            "(same file, model and FPS; the runs were played one after the other)."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Estimator lab


def collected_markdown(got: int, secs: float, n_scenes: int, n_spans: int, model: str) -> str:
    return (
        f"Collected {got} labelled scenes in {secs:.1f} s "
        f"(the others had no thinking span or were collected before). This session now holds {n_scenes} "
        f"scenes, {n_spans} spans, for model `{model}`."
    )


def trained_markdown(report: dict[str, Any], model: str) -> str:
    """`report`: what `vstream.attr.estimator.train` returns."""
    val, raw = report.get("val", {}), report.get("val_raw_attention", {})
    lines = [
        f"Trained in {report.get('seconds', 0)} s (best epoch {report.get('best_epoch')}); "
        f"examples {report.get('examples')}. The Reasoning tab now uses this estimator for `{model}`."
    ]
    if val:
        lines.append("| validation | LDS | R^2 |\n| --- | --- | --- |")
        lines.append(f"| estimator | {_3(val.get('lds'))} | {_3(val.get('r2'))} |")
        lines.append(f"| raw attention | {_3(raw.get('lds'))} | {_3(raw.get('r2'))} |")
    return "\n".join(lines)


def evaluated_summary(res: dict[str, Any]) -> str:
    """`res`: what `vstream.attr.evaluate.evaluate` returns."""
    return (
        f"{res['n']} held-out scenes, {res['n_spans']} spans ({res['n_spans_lds']} scored for LDS), {res['seconds']} s."
    )


# ----------------------------------------------------------------------------------------------
# Annotation

NO_RUN_YET = "Run the model in the Reasoning tab first; its spans show up here."


def span_info(run: RunView, i: int, region: int | None) -> str:
    """Span i of the run, its top regions and the region under the annotator's click (if any)."""
    s = run.spans[i]
    return (
        f"**Span {i}** ({i + 1} of {len(run.spans)}, {s.kind}): {s.text}\n\n"
        f"Top regions: {', '.join(map(str, s.top_regions))}"
        + (f" · your click: region {region}" if region is not None else " · click the image to mark the right region")
    )


RECORD_HEADERS = ["run", "span", "verdict", "region", "span text", "note"]


def record_rows(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """`AnnotationStore.records` as rows under RECORD_HEADERS."""
    return [
        [r.get("run_id"), r.get("span_index"), r.get("verdict"), r.get("region"), r.get("span_text"), r.get("note")]
        for r in records
    ]
