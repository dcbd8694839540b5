"""Gradio explorer for vision-language thinking models (vSTREAM attribution + TaYS video).

Four tabs: Reasoning (live per-span heatmaps and a 3-D reliance path), Video (TaYS streaming
reasoning on a file or a webcam, with latency readouts and a side-by-side comparison),
Estimator lab (collect labels, train, evaluate, save/load) and Annotation (mark each span's
heatmap; SQLite with JSONL/CSV export). This file only wires widgets to library calls.

    python app.py                       # embedded demo model on http://127.0.0.1:7860
    python app.py --model Qwen/Qwen2.5-VL-3B-Instruct --host 0.0.0.0 --share --auth ann:secret
"""
from __future__ import annotations

import argparse
import os
import queue
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import gradio as gr

from tays.protocol import run_options
from ui import explorer as ex
from ui import figures
from vstream.world.assets import DEMO_MODEL_DIR, TAYS_MODEL_DIR
from vstream.model import VLMError, split_thinking

MAX_QUESTION_CHARS = ex.MAX_QUESTION_CHARS
MAX_NEW_TOKENS = 256
VIDEO_MAX_NEW_TOKENS = 160  # as `python -m tays evaluate`: a step per frame group on 20 s streams
WEBCAM_IDLE_S = 5.0  # a webcam that sends nothing for this long ends the stream
DEFAULT_ANNOTATIONS = "annotations/annotations.db"
ESTIMATOR_DIR = Path("runs") / "estimators"
_TOKEN_YIELD_S = 0.1  # stream text to the page at most this often (span events always go at once)


# ----------------------------------------------------------------------------------------------
# per-session state


class Session:
    """Everything one browser tab (or one gradio_client) owns: its running jobs, its last run,
    its lab estimator. Sessions never share these, so two users never see each other's results.
    `close()` stops whatever still runs; it is called when the tab closes (`demo.unload`) and
    when Gradio drops the state (`gr.State(delete_callback=...)`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attr: Any = None  # running vstream AttributionSession
        self.run: ex.RunRecord | None = None  # last attributed run
        self.video_stop: threading.Event | None = None
        self.video_busy = False
        self.push: Any = None  # tays PushSource fed by the webcam
        self.lab_examples: list[Any] = []
        self.lab_model: str = ""
        self.lab_estimator: Any = None
        self.lab_busy = False
        self.point: tuple[float, float] | None = None  # annotator's click (x, y in [0, 1])
        self.errors: dict[str, str] = {}
        self.notice: tuple[str, float] = ("", 0.0)  # shown in the running status line for a few seconds

    def __deepcopy__(self, memo: dict) -> "Session":  # gr.State deep-copies its value
        return self

    def reasoning_busy(self) -> bool:
        return self.attr is not None and self.attr.running

    def close(self) -> None:
        attr, self.attr = self.attr, None
        if attr is not None:
            attr.close()
        if self.video_stop is not None:
            self.video_stop.set()
        if self.push is not None:
            self.push.close()
        if self.run is not None:
            self.run.cleanup()


_SESSIONS: "weakref.WeakValueDictionary[str, Session]" = weakref.WeakValueDictionary()


def _session(st: Session | None, request: gr.Request | None) -> Session:
    st = st if isinstance(st, Session) else Session()
    h = getattr(request, "session_hash", None)
    if h:
        _SESSIONS[h] = st
    return st


def _on_unload(request: gr.Request) -> None:
    """Tab closed: stop its generation, video run and webcam feed at once."""
    st = _SESSIONS.pop(getattr(request, "session_hash", "") or "", None)
    if st is not None:
        st.close()


def _fail(st: Session, where: str, msg: str) -> gr.Error:
    """Remember the message for the tab's status line (shown by a .failure() step) and build the
    error that shows as a toast / reaches gradio_client as AppError."""
    st.errors[where] = msg
    return gr.Error(msg)


def _error_status(where: str):
    def show(st: Session | None) -> str:
        msg = st.errors.pop(where, "") if isinstance(st, Session) else ""
        return f"**Error:** {msg}" if msg else gr.skip()

    return show


# ----------------------------------------------------------------------------------------------
# Reasoning tab


def _segments(pieces: list[str], closed_upto: int, done: bool) -> list[tuple[str, str | None]]:
    """HighlightedText value: closed spans plain, the span being written marked 'current'."""
    closed = "".join(pieces[:closed_upto])
    current = "".join(pieces[closed_upto:])
    out: list[tuple[str, str | None]] = []
    if closed:
        out.append((closed, None))
    if current:
        out.append((current, None if done else "current"))
    return out


def _gallery(run: ex.RunRecord) -> list[tuple[Any, str]]:
    items = []
    for i, s in enumerate(run.spans):
        top = ", ".join(str(r) for r in s.top_regions[:3])
        items.append((run.overlay_file(i), f"span {i} [{s.kind}] {s.text[:80]} | top regions {top}"))
    return items


def attribute(image: Any, question: str, model_name: str, st: Session | None = None,
              request: gr.Request = None):
    """Stream the reasoning with live per-span attribution (api_name="attribute").

    Yields (state, text, heatmaps, path plot, dynamics, status, raw JSON). Closing the
    generator (Stop, a closed tab, a dropped client) closes the attribution session."""
    from vstream.attr.spans import SpanSplitter
    from vstream.attr.worker import DoneEvent, PathEvent, RegionsEvent, SpanEvent, TokenEvent, attribute_stream

    st = _session(st, request)
    try:
        img = ex.load_image(image)
        q = ex.check_question(question)
    except VLMError as e:
        raise _fail(st, "reason", str(e)) from None
    with st.lock:
        busy = st.reasoning_busy()
        if busy:
            msg = "A run is already in progress in this tab: press Stop or wait for it to finish."
            st.notice = (msg, time.perf_counter())
    if busy:  # a second click: say so in the status line, leave the running outputs alone
        skip = gr.skip()
        yield st, skip, skip, skip, skip, msg, skip
        return
    try:
        vlm = ex.get_model(model_name)
        est, note = ex.estimator_for(vlm, model_name, st.lab_estimator)
        session = attribute_stream(vlm, img, q, est, max_new_tokens=MAX_NEW_TOKENS)
    except VLMError as e:
        raise _fail(st, "reason", str(e)) from None
    except Exception as e:  # a model that loads but cannot run: keep serving
        raise _fail(st, "reason", f"the model could not run: {type(e).__name__}: {e}") from None
    with st.lock:
        busy = st.reasoning_busy()  # lost a race with another click of this tab?
        if not busy:
            st.attr = session.start()
    if busy:
        session.close()
        skip = gr.skip()
        yield st, skip, skip, skip, skip, "A run is already in progress in this tab.", skip
        return
    run = ex.RunRecord(uuid.uuid4().hex[:12], ex.model_key(model_name), q, img, ex.image_ref(image),
                       estimator_note=note)
    if st.run is not None:
        st.run.cleanup()
    st.run, st.point = run, None
    skip = gr.skip()
    pieces: list[str] = []
    splitter = SpanSplitter()  # the page's own split: highlights the span as soon as it closes
    closed_upto = 0
    t0, last = time.perf_counter(), 0.0
    n_tokens = 0

    def status() -> str:
        msg, when = st.notice
        extra = f" **{msg}**" if msg and time.perf_counter() - when < 5.0 else ""
        return (f"Running… {n_tokens} tokens, {len(run.spans)} spans attributed "
                f"({time.perf_counter() - t0:.1f} s). {run.estimator_note}{extra}")

    try:
        yield (st, [], [], figures.path_figure(None), figures.dynamics_markdown(0.0, None, "stable", 0),
               status(), run.to_dict())
        for ev in session:
            if isinstance(ev, RegionsEvent):
                run.set_regions(ev.regions, ev.image_size)
            elif isinstance(ev, TokenEvent):
                pieces.append(ev.text)
                n_tokens += 1
                for sp in splitter.push(ev.index, ev.text):
                    closed_upto = max(closed_upto, sp.token_end)
                now = time.perf_counter()
                if now - last >= _TOKEN_YIELD_S:
                    last = now
                    yield st, _segments(pieces, closed_upto, False), skip, skip, skip, status(), skip
            elif isinstance(ev, SpanEvent):
                run.spans.append(ex.SpanRecord(ev.span.index, ev.span.kind, ev.span.text, ev.scores,
                                               ev.heatmap, list(ev.top_regions), ev.latency_ms))
            elif isinstance(ev, PathEvent):
                p = ev.point
                run.path, run.path_length, run.tortuosity, run.label = p.path, p.path_length, p.tortuosity, p.label
                last = time.perf_counter()
                yield (st, _segments(pieces, closed_upto, False), _gallery(run),
                       figures.path_figure(p.path, [s.text for s in run.spans]),
                       figures.dynamics_markdown(p.path_length, p.tortuosity, p.label, len(run.spans)),
                       status(), run.to_dict())
            elif isinstance(ev, DoneEvent):
                run.text, run.answer, run.label = ev.text, ev.answer, ev.label
                run.cancelled, run.error, run.done = ev.cancelled, ev.error, True
        secs = time.perf_counter() - t0
        if run.error:
            final = f"**Error:** {run.error}"
        elif run.cancelled or not run.done:
            final = f"Stopped after {n_tokens} tokens and {len(run.spans)} spans ({secs:.1f} s)."
        else:
            final = (f"Done in {secs:.1f} s: answer **{run.answer or '(none)'}** · {len(run.spans)} spans · "
                     f"{n_tokens} tokens. {run.estimator_note}")
        run.done = True
        yield (st, _segments(pieces, len(pieces), True), _gallery(run),
               figures.path_figure(run.path, [s.text for s in run.spans]),
               figures.dynamics_markdown(run.path_length, run.tortuosity, run.label, len(run.spans), final=True),
               final, run.to_dict())
    finally:
        session.close()
        with st.lock:
            if st.attr is session:
                st.attr = None


def stop_reasoning(st: Session | None, request: gr.Request = None) -> str:
    """Stop button: ends generation and the attribution worker at once (joins both threads)."""
    st = _session(st, request)
    attr, st.attr = st.attr, None
    if attr is None:
        return "Nothing is running."
    attr.close()
    return "Stopped."


def reason(image: Any, question: str, model_name: str):
    """Plain reasoning stream, no attribution (api_name="reason", kept for API users)."""
    try:
        img = ex.load_image(image)
        q = ex.check_question(question)
        vlm = ex.get_model(model_name)
        inputs = vlm.build_inputs(q, image=img)
    except VLMError as e:
        raise gr.Error(str(e)) from None
    text = ""
    for _, piece in vlm.stream(inputs, max_new_tokens=MAX_NEW_TOKENS):
        text += piece
        yield _format(text, done=False)
    yield _format(text, done=True)


def _format(text: str, done: bool) -> str:
    thinking, answer = split_thinking(text)
    out = f"**Thinking**\n\n{thinking}{'' if done or answer else ' ▍'}"
    if answer or done:
        out += f"\n\n**Answer:** {answer.strip() or '(none)'}"
    return out


# ----------------------------------------------------------------------------------------------
# Video tab


def _ttft_text(ttft: float | None, waiting_s: float | None = None) -> str:
    if ttft is not None:
        return f"**TTFT** {ttft:.2f} s"
    return f"**TTFT** waiting… {waiting_s or 0.0:.1f} s since the question"


def _delay_text(delay: float | None, final: bool) -> str:
    if delay is None:
        return "**Delay** –"
    what = "last answer token after stream start" if final else "latest token after stream start (running)"
    return f"**Delay** {delay:.2f} s ({what})"


def _video_source(kind: str, file: Any, fps: float, st: Session):
    from tays.sources import PushSource, VideoFileSource

    if kind == "Webcam":
        st.push = PushSource(fps=fps, idle_timeout=WEBCAM_IDLE_S, name="webcam")
        return st.push
    if not file:
        raise VLMError("Upload a video file or pick an example video first.")
    return VideoFileSource(str(file), fps=fps, realtime=True)


def _check_fps(fps: Any) -> float:
    try:
        f = float(fps)
    except (TypeError, ValueError):
        raise VLMError(f"FPS must be a number, got {fps!r}") from None
    if not 0.25 <= f <= 8:
        raise VLMError(f"FPS must be between 0.25 and 8, got {f:g}")
    return f


def video_run(kind: str, file: Any, fps: float, question: str, model_name: str,
              st: Session | None = None, request: gr.Request = None):
    """Run the TaYS engine on a file or the webcam; stream text and live TTFT / delay
    (api_name="video"). Yields (state, text, ttft, delay, status)."""
    from tays.paradigms import run_paradigm

    st = _session(st, request)
    try:
        fps = _check_fps(fps)
        q = ex.check_question(question)
        with st.lock:
            if st.video_busy:
                raise VLMError("A video run is already in progress in this tab: press Stop or wait for it.")
            st.video_busy = True
        try:
            vlm = ex.get_model(model_name)
            src = _video_source(kind, file, fps, st)
        except BaseException:
            st.video_busy = False
            raise
    except VLMError as e:
        raise _fail(st, "video", str(e)) from None
    stop = threading.Event()
    st.video_stop = stop
    tokens: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["res"] = run_paradigm(vlm, src, q, "tays", max_new_tokens=VIDEO_MAX_NEW_TOKENS,
                                      on_token=tokens.put, stop_event=stop, **run_options(vlm))
        except BaseException as e:  # shown in the status line; the app keeps serving
            box["error"] = f"{type(e).__name__}: {e}"

    th = threading.Thread(target=work, name="app-video-run", daemon=True)
    t0 = time.perf_counter()
    th.start()
    text, first, latest = "", None, None
    waiting = "waiting for webcam frames (start the webcam)" if kind == "Webcam" else "playing the file"
    try:
        while True:
            th.join(0.25)
            while True:
                try:
                    rec = tokens.get_nowait()
                except queue.Empty:
                    break
                text += rec.text
                first = rec.wall if first is None else first
                latest = rec.wall
            alive = th.is_alive()
            yield (st, text, _ttft_text(first, time.perf_counter() - t0), _delay_text(latest, False),
                   f"Running TaYS at {fps:g} FPS, {waiting}… {time.perf_counter() - t0:.1f} s")
            if not alive:
                break
        res = box.get("res")
        if res is None:
            msg = box.get("error", "the run ended without a result")
            yield st, text, _ttft_text(first, 0.0), _delay_text(latest, False), f"**Error:** {msg}"
            return
        m = res.metrics
        notes = " ".join(dict.fromkeys(res.messages))[:400]
        status = (("Stopped. " if res.stopped else "Done. ")
                  + f"{m.get('frames', 0)} frames in {m.get('frame_groups', 0)} groups, "
                  f"{m.get('tokens', 0)} tokens, answer **{res.answer.strip() or '(none)'}**."
                  + (f" Messages: {notes}" if notes else ""))
        yield (st, res.text, _ttft_text(m.get("ttft_question_s"), 0.0), _delay_text(m.get("delay_s"), True), status)
    finally:
        stop.set()
        if st.push is not None and kind == "Webcam":
            st.push.close()
        th.join(10.0)
        st.video_busy = False


def stop_video(st: Session | None, request: gr.Request = None) -> str:
    st = _session(st, request)
    if not st.video_busy:
        return "Nothing is running."
    if st.video_stop is not None:
        st.video_stop.set()
    if st.push is not None:
        st.push.close()
    return "Stopping…"


def push_webcam_frame(frame: Any, st: Session | None, request: gr.Request = None) -> None:
    """Webcam stream handler: hand the frame to this session's running TaYS source (if any);
    frames arriving with no run, or faster than the chosen FPS, are dropped."""
    from tays.sources import StreamError

    st = _session(st, request)
    src = st.push
    if frame is None or src is None or src.ended:
        return
    try:
        src.push(frame)
    except StreamError:
        pass  # e.g. the camera changed resolution: the run reports rejected frames


def video_compare(file: Any, fps: float, question: str, other: str, model_name: str,
                  st: Session | None = None, request: gr.Request = None, progress=gr.Progress()):
    """TaYS vs interleaved or batch on the same file, one after the other (api_name="video_compare")."""
    from tays.paradigms import run_paradigm
    from tays.sources import VideoFileSource

    st = _session(st, request)
    try:
        fps = _check_fps(fps)
        q = ex.check_question(question)
        if other not in ("interleaved", "batch"):
            raise VLMError(f"compare with 'interleaved' or 'batch', not {other!r}")
        if not file:
            raise VLMError("The comparison needs a video file (upload one or pick an example).")
        VideoFileSource(str(file), fps=fps).close()  # refuse a corrupt file before the first run
        with st.lock:
            if st.video_busy:
                raise VLMError("A video run is already in progress in this tab: press Stop or wait for it.")
            st.video_busy = True
    except VLMError as e:
        raise _fail(st, "video", str(e)) from None
    try:
        vlm = ex.get_model(model_name)
        rows = []
        stop = threading.Event()
        st.video_stop = stop
        for i, paradigm in enumerate(("tays", other)):
            progress((i, 2), desc=f"running {paradigm} (plays the file in real time)")
            res = run_paradigm(vlm, VideoFileSource(str(file), fps=fps, realtime=True), q, paradigm,
                               max_new_tokens=VIDEO_MAX_NEW_TOKENS, stop_event=stop, **run_options(vlm))
            rows.append(dict(res.metrics, paradigm=paradigm, answer=res.answer.strip()))
            if stop.is_set():
                break
    except VLMError as e:
        raise _fail(st, "video", str(e)) from None
    finally:
        st.video_busy = False
    fmt = lambda v: "–" if v is None else f"{v:.2f} s"  # noqa: E731
    lines = ["| paradigm | TTFT | delay | tokens | answer |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['paradigm']} | {fmt(r.get('ttft_question_s'))} | {fmt(r.get('delay_s'))} | "
                     f"{r.get('tokens')} | {r['answer'] or '(none)'} |")
    if len(rows) == 2 and rows[0].get("ttft_question_s") is not None and rows[1].get("ttft_question_s") is not None:
        d = rows[1]["ttft_question_s"] - rows[0]["ttft_question_s"]
        lines.append(f"\nTaYS's first token came {abs(d):.2f} s {'earlier' if d >= 0 else 'later'} than {other}'s "
                     "(same file, model and FPS; the runs were played one after the other).")
    return "\n".join(lines), figures.latency_figure(rows)


# ----------------------------------------------------------------------------------------------
# Estimator lab


def _lab_begin(st: Session) -> None:
    with st.lock:
        if st.lab_busy:
            raise VLMError("A lab step is already running in this tab: wait for it to finish.")
        st.lab_busy = True


def lab_collect(model_name: str, n: float, masks: float, start: float, st: Session | None = None,
                request: gr.Request = None, progress=gr.Progress()):
    """Cell 1: label n training scenes with region ablations (api_name="lab_collect")."""
    from vstream.attr.labels import collect

    st = _session(st, request)
    try:
        n, masks, start = int(n), int(masks), int(start)
        if not 1 <= n <= 500:
            raise VLMError(f"scenes must be between 1 and 500, got {n}")
        if not 2 <= masks <= 256:
            raise VLMError(f"masks per scene must be between 2 and 256, got {masks}")
        _lab_begin(st)
    except (VLMError, TypeError, ValueError) as e:
        raise _fail(st, "lab", str(e)) from None
    try:
        vlm = ex.get_model(model_name)
        if ex.model_key(model_name) != st.lab_model:
            st.lab_examples, st.lab_model = [], ex.model_key(model_name)
        t0, got = time.perf_counter(), 0
        have = {int(e.index) for e in st.lab_examples}
        for i in progress.tqdm(range(n), desc="collect labels"):
            if start + i in have:  # collected before in this session: keep one copy
                continue
            new = collect(vlm, 1, "train", start + i, masks_per_example=masks, progress=False)
            st.lab_examples += new
            got += len(new)
    except VLMError as e:
        raise _fail(st, "lab", str(e)) from None
    finally:
        st.lab_busy = False
    spans = sum(e.n_spans for e in st.lab_examples)
    return (f"Collected {got} labelled scenes in {time.perf_counter() - t0:.1f} s "
            f"(the others had no thinking span or were collected before). This session now holds {len(st.lab_examples)} scenes, "
            f"{spans} spans, for model `{st.lab_model}`.")


def lab_train(epochs: float, lr: float, st: Session | None = None, request: gr.Request = None,
              progress=gr.Progress(track_tqdm=True)):
    """Cell 2: fit the linear estimator on the session's labels (api_name="lab_train")."""
    from vstream.attr.estimator import train

    st = _session(st, request)
    try:
        if len(st.lab_examples) < 2:
            raise VLMError("Collect at least 2 labelled scenes first (cell 1).")
        epochs, lr = int(epochs), float(lr)
        if not 1 <= epochs <= 2000 or not 0 < lr < 10:
            raise VLMError(f"epochs must be 1..2000 and the learning rate in (0, 10); got {epochs}, {lr}")
        _lab_begin(st)
    except (VLMError, TypeError, ValueError) as e:
        raise _fail(st, "lab", str(e)) from None
    try:
        vlm = ex.get_model(st.lab_model)
        progress(0, desc="train estimator")
        est, report = train(list(st.lab_examples), epochs=epochs, lr=lr, progress=True,
                            num_layers=int(vlm.num_layers), num_heads=int(vlm.num_heads))
        from vstream.attr.labels import model_identity

        est.meta.update(model_identity(vlm))
        st.lab_estimator = est
    except VLMError as e:
        raise _fail(st, "lab", str(e)) from None
    finally:
        st.lab_busy = False
    val, raw = report.get("val", {}), report.get("val_raw_attention", {})
    lines = [f"Trained in {report.get('seconds', 0)} s (best epoch {report.get('best_epoch')}); "
             f"examples {report.get('examples')}. The Reasoning tab now uses this estimator for `{st.lab_model}`."]
    if val:
        lines.append("| validation | LDS | R^2 |\n| --- | --- | --- |")
        f3 = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| estimator | {f3(val.get('lds'))} | {f3(val.get('r2'))} |")
        lines.append(f"| raw attention | {f3(raw.get('lds'))} | {f3(raw.get('r2'))} |")
    return "\n".join(lines)


def lab_evaluate(model_name: str, n: float, methods: list[str], which: str, st: Session | None = None,
                 request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    """Cell 3: LDS / R^2 against the baselines on held-out scenes (api_name="lab_evaluate")."""
    from vstream.attr.evaluate import evaluate

    st = _session(st, request)
    try:
        n = int(n)
        if not 1 <= n <= 200:
            raise VLMError(f"scenes must be between 1 and 200, got {n}")
        methods = [m for m in (methods or []) if m]
        if not methods:
            raise VLMError("Pick at least one method.")
        vlm = ex.get_model(model_name)
        if which == "session":
            if st.lab_estimator is None:
                raise VLMError("No estimator in this session yet: train one (cell 2) or load one (cell 4).")
            st.lab_estimator.check_compatible(vlm, where="the lab's estimator")
            est = st.lab_estimator
        else:
            est, _ = ex.estimator_for(vlm, model_name, None)
            if isinstance(est, ex.RawAttention):
                raise VLMError("The shipped estimator does not fit this model: train one in cells 1-2.")
        _lab_begin(st)
    except (VLMError, TypeError, ValueError) as e:
        raise _fail(st, "lab", str(e)) from None
    try:
        progress(0, desc="evaluate")
        res = evaluate(vlm, est, n=n, methods=tuple(methods), progress=True)
    except (VLMError, ValueError) as e:
        raise _fail(st, "lab", str(e)) from None
    finally:
        st.lab_busy = False
    summary = (f"{res['n']} held-out scenes, {res['n_spans']} spans ({res['n_spans_lds']} scored for LDS), "
               f"{res['seconds']} s.")
    return figures.eval_rows(res), figures.eval_figure(res), summary


def lab_save(name: str, st: Session | None = None, request: gr.Request = None):
    """Cell 4a: save the session's estimator under runs/estimators/ and offer it for download."""
    st = _session(st, request)
    try:
        if st.lab_estimator is None:
            raise VLMError("No estimator in this session yet: train one first (cell 2).")
        base = Path(str(name or "").strip() or "lab-estimator.safetensors").name  # no paths from the web
        if not base.endswith(".safetensors"):
            base += ".safetensors"
        path = st.lab_estimator.save(ESTIMATOR_DIR / base)
    except (VLMError, OSError) as e:
        raise _fail(st, "lab", str(e)) from None
    return str(path), f"Saved `{path}`."


def lab_load(file: Any, model_name: str, st: Session | None = None, request: gr.Request = None) -> str:
    """Cell 4b: load an estimator file (.safetensors only) as this session's estimator."""
    from vstream.attr.estimator import load

    st = _session(st, request)
    try:
        if not file:
            raise VLMError("Choose an estimator file (.safetensors).")
        vlm = ex.get_model(model_name)
        st.lab_estimator = load(str(file), vlm)
        st.lab_model = ex.model_key(model_name)
    except VLMError as e:
        raise _fail(st, "lab", str(e)) from None
    return f"Loaded `{Path(str(file)).name}` for `{st.lab_model}`; the Reasoning tab uses it now."


# ----------------------------------------------------------------------------------------------
# Annotation tab


_STORES: dict[str, Any] = {}
_STORES_LOCK = threading.Lock()


def _store(path: str) -> Any:
    """One AnnotationStore per path (it opens a connection per call, so sharing it is safe)."""
    from ui.annotations import AnnotationError, AnnotationStore

    with _STORES_LOCK:
        if path not in _STORES:
            try:
                _STORES[path] = AnnotationStore(path)
            except AnnotationError as e:
                raise VLMError(str(e)) from None
        return _STORES[path]


def annot_view(span: float, st: Session | None, request: gr.Request = None):
    """Show span `span` of this session's last run (overlay, text, top regions)."""
    st = _session(st, request)
    run = st.run
    if run is None or not run.spans:
        return None, "Run the model in the Reasoning tab first; its spans show up here.", gr.update(maximum=1, value=0)
    i = max(0, min(int(span or 0), len(run.spans) - 1))
    s = run.spans[i]
    region = run.region_at(st.point) if st.point else None
    info = (f"**Span {i}** ({i + 1} of {len(run.spans)}, {s.kind}): {s.text}\n\n"
            f"Top regions: {', '.join(map(str, s.top_regions))}"
            + (f" · your click: region {region}" if region is not None else " · click the image to mark the right region"))
    return run.overlay(i, st.point), info, gr.update(maximum=max(1, len(run.spans) - 1), value=i)


def annot_refresh(st: Session | None, request: gr.Request = None):
    """After a run: reset the click and show its first span."""
    st = _session(st, request)
    st.point = None
    return annot_view(0, st, request)


def annot_click(span: float, st: Session | None, evt: gr.SelectData, request: gr.Request = None):
    st = _session(st, request)
    run = st.run
    if run is not None and evt is not None and evt.index is not None:
        x, y = evt.index[:2]
        # the overlay is drawn at the image's original size, which is the heatmaps' size
        h, w = run.pixel_labels.shape if run.pixel_labels is not None else (run.image.height, run.image.width)
        st.point = (min(1.0, max(0.0, x / w)), min(1.0, max(0.0, y / h)))
    return annot_view(span, st, request)


def annot_span_changed(span: float, st: Session | None, request: gr.Request = None):
    st = _session(st, request)
    st.point = None
    return annot_view(span, st, request)


def make_annotation_handlers(db_path: str):
    def records(name: str) -> list[list[Any]]:
        rows = _store(db_path).records(annotator=name.strip(), latest_only=True) if name and name.strip() else []
        return [[r.get("run_id"), r.get("span_index"), r.get("verdict"), r.get("region"), r.get("span_text"),
                 r.get("note")] for r in rows]

    def annotate(name: str, span: float, verdict: str, note: str, st: Session | None = None,
                 request: gr.Request = None):
        """Save one verdict for a span of this session's last run (api_name="annotate")."""
        st = _session(st, request)
        from ui.annotations import AnnotationError

        try:
            name = str(name or "").strip()
            if not name:
                raise VLMError("Type your annotator name first.")
            run = st.run
            if run is None or not run.spans:
                raise VLMError("Nothing to annotate yet: run the model in the Reasoning tab first.")
            i = int(span or 0)
            if not 0 <= i < len(run.spans):
                raise VLMError(f"span {i} does not exist (this run has {len(run.spans)})")
            if not verdict:
                raise VLMError("Pick a verdict: grounded, wrong region or not visual.")
            point = st.point
            region = run.region_at(point) if point else None
            rid = _store(db_path).add(name, run.run_id, i, verdict, span_text=run.spans[i].text, region=region,
                                      point=point, model=run.model, image_ref=run.image_ref,
                                      note=str(note or "")[:2000])
        except (VLMError, AnnotationError, ValueError) as e:
            raise _fail(st, "annot", str(e)) from None
        where = f" at region {region}" if region is not None else ""
        return f"Saved #{rid}: span {i} is {verdict}{where}.", records(name)

    def show_records(name: str):
        try:
            return records(name)
        except (VLMError, ValueError) as e:  # AnnotationError is a ValueError
            raise gr.Error(str(e)) from None

    def export(fmt: str, name: str = ""):
        """Download the records as JSONL or CSV: the named annotator's, or all when no name is
        given (api_name="annotations_export" / "annotations_export_csv")."""
        try:
            store = _store(db_path)
            who = str(name or "").strip() or None
            out = Path(tempfile.mkdtemp(prefix="vstream-annotations-")) / f"annotations.{fmt}"
            (store.export_jsonl if fmt == "jsonl" else store.export_csv)(out, annotator=who)
        except (VLMError, OSError, ValueError) as e:
            raise gr.Error(str(e)) from None
        return str(out)

    return annotate, show_records, export


# ----------------------------------------------------------------------------------------------
# layout


def image_input(**kwargs: Any) -> gr.Image:
    """gr.Image whose unreadable uploads become a one-line message instead of a bare server
    error. The instance's preprocess is wrapped (a gr.Image subclass would make Gradio write a
    .pyi stub next to this file)."""
    comp = gr.Image(**kwargs)
    inner = comp.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return inner(payload)
        except Exception as e:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"could not read image ({name}): corrupt or unsupported file ({type(e).__name__})") from None

    comp.preprocess = preprocess
    return comp


CSS = """
#reason-text .textfield { font-size: 1.05em; line-height: 1.6; }
"""


def default_video_model() -> str:
    """The shipped TaYS checkpoint when present, else the image demo model."""
    return str(TAYS_MODEL_DIR) if (TAYS_MODEL_DIR / "config.json").is_file() else str(DEMO_MODEL_DIR)


def build_ui(default_model: str = str(DEMO_MODEL_DIR), annotations: str | None = None,
             concurrency: int = 2, video_model: str | None = None) -> gr.Blocks:
    """The whole explorer. `annotations`: SQLite path of the annotation store; `video_model`:
    the Video tab's model (default: `default_video_model()`)."""
    video_model = video_model or default_video_model()
    db_path = str(annotations or os.environ.get("VSTREAM_ANNOTATIONS") or DEFAULT_ANNOTATIONS)
    annotate, show_records, export = make_annotation_handlers(db_path)
    model_limit = dict(concurrency_limit=concurrency, concurrency_id="model")
    with gr.Blocks(title="Thinking-VLM Explorer") as demo:
        state = gr.State(Session, delete_callback=lambda s: s.close() if isinstance(s, Session) else None)
        gr.Markdown(
            "# Thinking-VLM Explorer\nWatch a vision-language model think, with live per-sentence visual "
            "attribution (vSTREAM) and streaming video reasoning (TaYS). The default model is a tiny "
            "Qwen2.5-VL-architecture model trained on our procedural shapes world; any Qwen2.5-VL / Qwen3-VL "
            "Hugging Face id or folder works where weights are available."
        )
        with gr.Tabs():
            # ---------------------------------------------------------------- Reasoning
            with gr.Tab("Reasoning", id="reasoning"):
                with gr.Row():
                    with gr.Column(scale=2):
                        r_image = image_input(type="filepath", label="Image", height=300, elem_id="reason-image")
                        r_question = gr.Textbox(label="Question", placeholder="What color is the circle?",
                                                elem_id="reason-question")
                        r_model = gr.Textbox(label="Model (Hugging Face id or folder; empty = demo model)",
                                             value=default_model, elem_id="reason-model")
                        with gr.Row():
                            r_run = gr.Button("Run", variant="primary", elem_id="reason-run")
                            r_stop = gr.Button("Stop", variant="stop", elem_id="reason-stop")
                        r_status = gr.Markdown("Pick an example or upload an image, then press Run.",
                                               elem_id="reason-status")
                    with gr.Column(scale=3):
                        r_text = gr.HighlightedText(label="Reasoning (the span being written is highlighted)",
                                                    color_map={"current": "#ffd54f"}, combine_adjacent=True,
                                                    elem_id="reason-text")
                        r_gallery = gr.Gallery(label="Span heatmaps (one per closed span; region outlines in white, "
                                               "top regions numbered)", columns=4, height=300,
                                               elem_id="reason-heatmaps")
                with gr.Row():
                    with gr.Column(scale=3):
                        r_pca = gr.Plot(label="Visual reliance path (PCA, coloured by step)", elem_id="reason-pca")
                    with gr.Column(scale=2):
                        r_dyn = gr.Markdown(figures.dynamics_markdown(0.0, None, "stable", 0),
                                            elem_id="reason-dynamics")
                        with gr.Accordion("Raw attribution (JSON)", open=False):
                            r_json = gr.JSON(label="spans, scores, top regions", elem_id="reason-json")
                rows = ex.scene_examples() + ex.photo_examples()
                if rows:
                    gr.Examples(rows, inputs=[r_image, r_question], label="Examples: shapes-world scenes of every "
                                "family, and two photos shipped with scikit-learn", examples_per_page=24,
                                elem_id="reason-examples")
                with gr.Accordion("Reasoning only (no attribution)", open=False):
                    r_plain_run = gr.Button("Run without attribution", elem_id="reason-plain-run")
                    r_plain_out = gr.Markdown(elem_id="reason-plain-out")

            # ---------------------------------------------------------------- Video
            with gr.Tab("Video", id="video"):
                with gr.Row():
                    with gr.Column(scale=2):
                        v_source = gr.Radio(["Video file", "Webcam"], value="Video file", label="Source",
                                            info="Webcam: start the camera below, then Run; a camera that "
                                            f"sends nothing for {WEBCAM_IDLE_S:g} s ends the stream.",
                                            elem_id="video-source")
                        v_file = gr.Video(label="Video file", sources=["upload"], height=240, elem_id="video-file")
                        v_cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam",
                                         elem_id="video-webcam")
                        v_fps = gr.Slider(0.5, 4, value=2, step=0.5, label="Frames per second fed to the model",
                                          elem_id="video-fps")
                        v_question = gr.Textbox(label="Question", value="How many objects appeared?",
                                                elem_id="video-question")
                        v_model = gr.Textbox(label="Video model (folder or Hugging Face id; the default is our "
                                             "TaYS-trained demo model)", value=video_model, elem_id="video-model")
                        with gr.Row():
                            v_run = gr.Button("Run TaYS", variant="primary", elem_id="video-run")
                            v_stop = gr.Button("Stop", variant="stop", elem_id="video-stop")
                    with gr.Column(scale=3):
                        v_text = gr.Textbox(label="Reasoning (streams while frames arrive)", lines=6,
                                            elem_id="video-text")
                        with gr.Row():
                            v_ttft = gr.Markdown("**TTFT** –", elem_id="video-ttft")
                            v_delay = gr.Markdown("**Delay** –", elem_id="video-delay")
                        v_status = gr.Markdown(elem_id="video-status")
                        with gr.Group():
                            v_other = gr.Radio(["interleaved", "batch"], value="interleaved",
                                               label="Compare TaYS against", elem_id="video-compare-with")
                            v_compare = gr.Button("Compare on the same file", elem_id="video-compare")
                        v_compare_out = gr.Markdown(elem_id="video-compare-out")
                        v_compare_plot = gr.Plot(label="Latency: TaYS vs the other paradigm",
                                                 elem_id="video-compare-plot")
                vrows = ex.stream_examples()
                if vrows:
                    gr.Examples(vrows, inputs=[v_file, v_question], label="Example videos (shapes-world streams)",
                                elem_id="video-examples")

            # ---------------------------------------------------------------- Estimator lab
            with gr.Tab("Estimator lab", id="lab"):
                gr.Markdown("Run the cells top to bottom. Defaults are small so each step takes a minute or two on "
                            "a CPU; the estimator you train or load here is used by this tab's Reasoning runs.")
                l_model = gr.Textbox(label="Model", value=default_model, elem_id="lab-model")
                l_status = gr.Markdown(elem_id="lab-status")
                gr.Markdown("### 1. Collect labels (region-ablation effects on training scenes)")
                with gr.Row():
                    l_n = gr.Number(4, label="scenes", precision=0, elem_id="lab-n")
                    l_masks = gr.Number(8, label="masks per scene", precision=0, elem_id="lab-masks")
                    l_start = gr.Number(0, label="first training scene", precision=0, elem_id="lab-start")
                l_collect = gr.Button("Collect labels", elem_id="lab-collect")
                l_collect_out = gr.Markdown(elem_id="lab-collect-out")
                gr.Markdown("### 2. Train the estimator")
                with gr.Row():
                    l_epochs = gr.Number(40, label="epochs", precision=0, elem_id="lab-epochs")
                    l_lr = gr.Number(0.02, label="learning rate", elem_id="lab-lr")
                l_train = gr.Button("Train", elem_id="lab-train")
                l_train_out = gr.Markdown(elem_id="lab-train-out")
                gr.Markdown("### 3. Evaluate against the baselines (held-out scenes)")
                with gr.Row():
                    l_eval_n = gr.Number(2, label="scenes", precision=0, elem_id="lab-eval-n")
                    l_methods = gr.CheckboxGroup(["vstream", "raw_attention", "input_x_gradient", "occlusion"],
                                                 value=["vstream", "raw_attention"], label="methods",
                                                 elem_id="lab-methods")
                    l_which = gr.Radio(["session", "shipped"], value="shipped", label="estimator",
                                       elem_id="lab-which")
                l_eval = gr.Button("Evaluate", elem_id="lab-evaluate")
                l_eval_summary = gr.Markdown(elem_id="lab-eval-summary")
                l_table = gr.Dataframe(headers=figures.EVAL_HEADERS, label="LDS / R^2 per method",
                                       elem_id="lab-table")
                l_plot = gr.Plot(elem_id="lab-plot")
                gr.Markdown("### 4. Save or load an estimator")
                with gr.Row():
                    with gr.Column():
                        l_name = gr.Textbox("lab-estimator.safetensors", label="file name (saved under runs/estimators/)",
                                            elem_id="lab-save-name")
                        l_save = gr.Button("Save", elem_id="lab-save")
                        l_saved = gr.File(label="saved estimator", elem_id="lab-saved")
                    with gr.Column():
                        l_upload = gr.File(label="estimator to load (.safetensors)", file_types=[".safetensors"],
                                           type="filepath", elem_id="lab-load-file")
                        l_load = gr.Button("Load", elem_id="lab-load")

            # ---------------------------------------------------------------- Annotation
            with gr.Tab("Annotation", id="annotation"):
                gr.Markdown("Mark each span's heatmap of your last Reasoning run. Click the image to point at the "
                            f"region that should have lit up. Records go to `{db_path}`.")
                with gr.Row():
                    with gr.Column(scale=3):
                        a_image = gr.Image(label="Span heatmap (click the right region)", interactive=False,
                                           type="pil", elem_id="annot-image")
                    with gr.Column(scale=2):
                        a_name = gr.Textbox(label="Annotator", placeholder="your name", elem_id="annot-name")
                        a_span = gr.Slider(0, 1, value=0, step=1, label="span (0 = first)", elem_id="annot-span")
                        a_info = gr.Markdown(elem_id="annot-info")
                        a_verdict = gr.Radio([("grounded", "grounded"), ("wrong region", "wrong_region"),
                                              ("not visual", "not_visual")], label="verdict", elem_id="annot-verdict")
                        a_note = gr.Textbox(label="note (optional)", elem_id="annot-note")
                        a_save = gr.Button("Save verdict", variant="primary", elem_id="annot-save")
                        a_status = gr.Markdown(elem_id="annot-status")
                a_records = gr.Dataframe(headers=["run", "span", "verdict", "region", "span text", "note"],
                                         label="your records (latest per span)", elem_id="annot-records")
                with gr.Row():
                    a_jsonl = gr.Button("Export JSONL", elem_id="annot-export-jsonl")
                    a_csv = gr.Button("Export CSV", elem_id="annot-export-csv")
                    a_file = gr.File(label="export", elem_id="annot-export-file")

        # ---------------------------------------------------------------- events
        r_outputs = [state, r_text, r_gallery, r_pca, r_dyn, r_status, r_json]
        run_ev = r_run.click(attribute, [r_image, r_question, r_model, state], r_outputs, api_name="attribute",
                             trigger_mode="multiple", **model_limit)
        sub_ev = r_question.submit(attribute, [r_image, r_question, r_model, state], r_outputs,
                                   api_visibility="private", **model_limit)
        for ev in (run_ev, sub_ev):
            ev.failure(_error_status("reason"), [state], [r_status], api_visibility="private")
            ev.then(annot_refresh, [state], [a_image, a_info, a_span], api_visibility="private")
        r_stop.click(stop_reasoning, [state], [r_status], api_name="stop", concurrency_limit=None)
        r_plain_run.click(reason, [r_image, r_question, r_model], r_plain_out, api_name="reason", **model_limit)

        v_ev = v_run.click(video_run, [v_source, v_file, v_fps, v_question, v_model, state],
                           [state, v_text, v_ttft, v_delay, v_status], api_name="video", **model_limit)
        v_ev.failure(_error_status("video"), [state], [v_status], api_visibility="private")
        v_stop.click(stop_video, [state], [v_status], api_name="video_stop", concurrency_limit=None)
        v_cam.stream(push_webcam_frame, [v_cam, state], None, stream_every=0.25, concurrency_limit=None,
                     api_visibility="private")
        c_ev = v_compare.click(video_compare, [v_file, v_fps, v_question, v_other, v_model, state],
                               [v_compare_out, v_compare_plot], api_name="video_compare", **model_limit)
        c_ev.failure(_error_status("video"), [state], [v_status], api_visibility="private")

        for ev in (
            l_collect.click(lab_collect, [l_model, l_n, l_masks, l_start, state], l_collect_out,
                            api_name="lab_collect", **model_limit),
            l_train.click(lab_train, [l_epochs, l_lr, state], l_train_out, api_name="lab_train", **model_limit),
            l_eval.click(lab_evaluate, [l_model, l_eval_n, l_methods, l_which, state],
                         [l_table, l_plot, l_eval_summary], api_name="lab_evaluate", **model_limit),
            l_save.click(lab_save, [l_name, state], [l_saved, l_status], api_name="lab_save"),
            l_load.click(lab_load, [l_upload, l_model, state], l_status, api_name="lab_load"),
        ):
            ev.failure(_error_status("lab"), [state], [l_status], api_visibility="private")

        a_span.release(annot_span_changed, [a_span, state], [a_image, a_info, a_span], api_visibility="private")
        a_image.select(annot_click, [a_span, state], [a_image, a_info, a_span], api_visibility="private")
        a_ev = a_save.click(annotate, [a_name, a_span, a_verdict, a_note, state], [a_status, a_records],
                            api_name="annotate")
        a_ev.failure(_error_status("annot"), [state], [a_status], api_visibility="private")
        a_name.blur(show_records, [a_name], [a_records], api_visibility="private")
        a_jsonl.click(lambda name: export("jsonl", name), [a_name], a_file, api_name="annotations_export")
        a_csv.click(lambda name: export("csv", name), [a_name], a_file, api_name="annotations_export_csv")

        demo.unload(_on_unload)
    for fn in demo.fns.values():  # the State's per-page-load initialiser is no API endpoint
        if getattr(fn, "fn", None) is Session:
            fn.api_visibility = "private"
    return demo


# ----------------------------------------------------------------------------------------------
# serving


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """'user:pass[,user2:pass2]' -> [(user, pass), ...]; None when empty."""
    if not spec or not spec.strip():
        return None
    out = []
    for item in spec.split(","):
        user, sep, pw = item.strip().partition(":")
        if not sep or not user or not pw:
            raise SystemExit(f"error: --auth expects user:password[,user2:password2], got {item.strip()!r}")
        out.append((user, pw))
    return out


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="env GRADIO_SERVER_NAME")
    ap.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="env GRADIO_SERVER_PORT")
    ap.add_argument("--share", action="store_true", default=env("VSTREAM_SHARE") == "1",
                    help="public gradio.live link (env VSTREAM_SHARE=1)")
    ap.add_argument("--model", default=env("VSTREAM_MODEL", str(DEMO_MODEL_DIR)), help="env VSTREAM_MODEL")
    ap.add_argument("--video-model", default=env("TAYS_MODEL", default_video_model()),
                    help="the Video tab's model (env TAYS_MODEL; default: assets/tays-model if shipped)")
    ap.add_argument("--auth", default=env("VSTREAM_AUTH"),
                    help="login for annotator links: user:pass[,user2:pass2] (env VSTREAM_AUTH)")
    ap.add_argument("--annotations", default=env("VSTREAM_ANNOTATIONS", DEFAULT_ANNOTATIONS),
                    help="SQLite file of the annotation store (env VSTREAM_ANNOTATIONS)")
    ap.add_argument("--concurrency", type=int, default=int(env("VSTREAM_CONCURRENCY", "2")),
                    help="model jobs run at once across all users; others queue (env VSTREAM_CONCURRENCY)")
    ap.add_argument("--max-queue", type=int, default=int(env("VSTREAM_MAX_QUEUE", "64")),
                    help="queued jobs before new ones are refused (env VSTREAM_MAX_QUEUE)")
    args = ap.parse_args(argv)
    if args.model == str(DEMO_MODEL_DIR) and not Path(args.model).exists():
        raise SystemExit(f"error: the demo model is missing at {DEMO_MODEL_DIR}; train it with python -m vstream train-demo")
    if args.concurrency < 1:
        raise SystemExit("error: --concurrency must be at least 1")
    auth = parse_auth(args.auth)
    demo = build_ui(args.model, args.annotations, args.concurrency, args.video_model)
    threading.Thread(target=ex.warm_up, args=(args.model, args.video_model), name="vstream-warm-up",
                     daemon=True).start()
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        auth_message="Log in with the annotator account you were given." if auth else None,
        css=CSS,
    )


if __name__ == "__main__":
    main()
