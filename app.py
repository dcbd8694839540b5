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
import contextlib
import functools
import inspect
import os
import queue
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from PIL import Image

from tays import PushSource, StreamError, TokenRecord, VideoFileSource, run_options, run_paradigm
from ui import explorer as ex
from ui import figures, readouts
from ui.annotations import AnnotationError, shared_store
from vstream.attr.estimator import LinearEstimator, RawAttention
from vstream.attr.estimator import load as load_estimator
from vstream.attr.estimator import train as train_estimator
from vstream.attr.evaluate import evaluate
from vstream.attr.labels import LabeledExample, collect
from vstream.attr.worker import AttributionSession, PathEvent, TokenEvent, attribute_stream
from vstream.model import VLMError, model_identity
from vstream.world.assets import DEMO_MODEL_DIR
from vstream.world.examples import scene_examples, stream_examples

MAX_NEW_TOKENS = 256
VIDEO_MAX_NEW_TOKENS = 160  # as `python -m tays evaluate`: a step per frame group on 20 s streams
WEBCAM_IDLE_S = 5.0  # a webcam that sends nothing for this long ends the stream
DEFAULT_ANNOTATIONS = "annotations/annotations.db"
ESTIMATOR_DIR = Path("runs") / "estimators"
_TOKEN_YIELD_S = 0.1  # stream text to the page at most this often (span events always go at once)


# ----------------------------------------------------------------------------------------------
# the page

CSS = """
#reason-text .textfield { font-size: 1.05em; line-height: 1.6; }
"""


def build_ui(
    default_model: str = str(DEMO_MODEL_DIR),
    annotations: str | None = None,
    concurrency: int = 2,
    video_model: str | None = None,
) -> gr.Blocks:
    """The whole explorer. `annotations`: SQLite path of the annotation store; `video_model`:
    the Video tab's model (default: `ex.default_video_model()`)."""
    video_model = video_model or ex.default_video_model()
    db_path = str(annotations or os.environ.get("VSTREAM_ANNOTATIONS") or DEFAULT_ANNOTATIONS)
    model_limit = dict(concurrency_limit=concurrency, concurrency_id="model")  # model jobs share one queue
    with gr.Blocks(title="Thinking-VLM Explorer") as demo:
        state = gr.State(Session, delete_callback=lambda s: s.close() if isinstance(s, Session) else None)
        gr.Markdown(
            "# Thinking-VLM Explorer\nWatch a vision-language model think, with live per-sentence visual "
            "attribution (vSTREAM) and streaming video reasoning (TaYS). The default model is a tiny "
            "Qwen2.5-VL-architecture model trained on our procedural shapes world; any Qwen2.5-VL / Qwen3-VL "
            "Hugging Face id or folder works where weights are available."
        )
        with gr.Tabs():
            runs = reasoning_tab(state, default_model, model_limit)
            video_tab(state, video_model, model_limit)
            lab_tab(state, default_model, model_limit)
            annotation_tab(state, db_path, runs)
        demo.unload(_on_unload)
    for fn in demo.fns.values():  # the State's per-page-load initialiser is no API endpoint
        if getattr(fn, "fn", None) is Session:
            fn.api_visibility = "private"
    return demo


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


# ----------------------------------------------------------------------------------------------
# per-session state and the guard every handler wears

_NOTICE_S = 5.0  # how long the running status line shows a notice
_BUSY = {
    "video": "A video run is already in progress in this tab: press Stop or wait for it.",
    "lab": "A lab step is already running in this tab: wait for it to finish.",
}


class Session:
    """Everything one browser tab (or one gradio_client) owns: its running jobs, its last run,
    its lab estimator. Sessions never share these, so two users never see each other's results.
    `close()` stops whatever still runs; it is called when the tab closes (`demo.unload`) and
    when Gradio drops the state (`gr.State(delete_callback=...)`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attr: AttributionSession | None = None  # running attribution
        self.run: ex.RunRecord | None = None  # last attributed run
        self.video_stop: threading.Event | None = None
        self.push: PushSource | None = None  # fed by the webcam
        self.lab_examples: list[LabeledExample] = []
        self.lab_model: str = ""
        self.lab_estimator: LinearEstimator | None = None
        self.jobs: set[str] = set()  # running "video" / "lab" jobs (see `job`)
        self.point: tuple[float, float] | None = None  # annotator's click (x, y in [0, 1])
        self.errors: dict[str, str] = {}
        self.notice: tuple[str, float] = ("", 0.0)  # shown in the running status line for a few seconds

    def __deepcopy__(self, memo: dict) -> Session:  # gr.State deep-copies its value
        return self

    @property
    def video_busy(self) -> bool:
        return "video" in self.jobs

    def reasoning_busy(self) -> bool:
        return self.attr is not None and self.attr.running

    def recent_notice(self) -> str:
        msg, when = self.notice
        return msg if msg and time.perf_counter() - when < _NOTICE_S else ""

    @contextlib.contextmanager
    def job(self, kind: str) -> Iterator[None]:
        """One video run and one lab step at a time per tab (a click while one runs gets a
        one-line error); the slot frees however the job ends."""
        with self.lock:
            if kind in self.jobs:
                raise VLMError(_BUSY[kind])
            self.jobs.add(kind)
        try:
            yield
        finally:
            self.jobs.discard(kind)

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


_SESSIONS: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()


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


F = TypeVar("F", bound=Callable[..., Any])


def handler(*errors: type[Exception], status: str = "") -> Callable[[F], F]:
    """The guard every event handler wears, so none repeats the per-session opening.

    `st` (if the handler has it) becomes this tab's Session: Gradio passes the raw gr.State
    value. The `errors` listed become the one-line gr.Error a user sees as a toast and
    gradio_client as AppError; with `status` the message also waits for that tab's status line
    (`_error_status`). Signature, name and docstring are kept because Gradio reads gr.Request,
    gr.Progress, the API's parameter names and its description from them; a generator stays a
    generator function because Gradio only streams those."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        takes_session = "st" in sig.parameters

        def enter(args: tuple, kwargs: dict) -> tuple[Session | None, tuple, dict]:
            if not takes_session:
                return None, args, kwargs
            bound = sig.bind(*args, **kwargs)
            st = bound.arguments["st"] = _session(bound.arguments.get("st"), bound.arguments.get("request"))
            return st, bound.args, bound.kwargs

        def fail(st: Session | None, e: Exception) -> gr.Error:
            if st is not None and status:
                st.errors[status] = str(e)
            return gr.Error(str(e))

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def guarded_stream(*args: Any, **kwargs: Any) -> Any:
                st, args, kwargs = enter(args, kwargs)
                try:
                    return (yield from fn(*args, **kwargs))
                except errors as e:
                    raise fail(st, e) from None

            return guarded_stream  # type: ignore[return-value]

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            st, args, kwargs = enter(args, kwargs)
            try:
                return fn(*args, **kwargs)
            except errors as e:
                raise fail(st, e) from None

        return guarded  # type: ignore[return-value]

    return wrap


def _error_status(where: str) -> Callable[[Session | None], str]:
    def show(st: Session | None) -> str:
        msg = st.errors.pop(where, "") if isinstance(st, Session) else ""
        return f"**Error:** {msg}" if msg else gr.skip()

    return show


# ----------------------------------------------------------------------------------------------
# Reasoning tab


def reasoning_tab(state: gr.State, default_model: str, model_limit: dict[str, Any]) -> list[gr.events.Dependency]:
    """Returns the run events (button and Enter), after which the Annotation tab refreshes."""
    with gr.Tab("Reasoning", id="reasoning"):
        with gr.Row():
            with gr.Column(scale=2):
                r_image = image_input(type="filepath", label="Image", height=300, elem_id="reason-image")
                r_question = gr.Textbox(
                    label="Question", placeholder="What color is the circle?", elem_id="reason-question"
                )
                r_model = gr.Textbox(
                    label="Model (Hugging Face id or folder; empty = demo model)",
                    value=default_model,
                    elem_id="reason-model",
                )
                with gr.Row():
                    r_run = gr.Button("Run", variant="primary", elem_id="reason-run")
                    r_stop = gr.Button("Stop", variant="stop", elem_id="reason-stop")
                r_status = gr.Markdown("Pick an example or upload an image, then press Run.", elem_id="reason-status")
            with gr.Column(scale=3):
                r_text = gr.HighlightedText(
                    label="Reasoning (the span being written is highlighted)",
                    color_map={"current": "#ffd54f"},
                    combine_adjacent=True,
                    elem_id="reason-text",
                )
                r_gallery = gr.Gallery(
                    label="Span heatmaps (one per closed span; region outlines in white, top regions numbered)",
                    columns=4,
                    height=300,
                    elem_id="reason-heatmaps",
                )
        with gr.Row():
            with gr.Column(scale=3):
                r_pca = gr.Plot(label="Visual reliance path (PCA, coloured by step)", elem_id="reason-pca")
            with gr.Column(scale=2):
                r_dyn = gr.Markdown(figures.dynamics_markdown(0.0, None, "stable", 0), elem_id="reason-dynamics")
                with gr.Accordion("Raw attribution (JSON)", open=False):
                    r_json = gr.JSON(label="spans, scores, top regions", elem_id="reason-json")
        rows = scene_examples() + ex.photo_examples()
        if rows:
            gr.Examples(
                rows,
                inputs=[r_image, r_question],
                label="Examples: shapes-world scenes of every family, and two photos shipped with scikit-learn",
                examples_per_page=24,
                elem_id="reason-examples",
            )
        with gr.Accordion("Reasoning only (no attribution)", open=False):
            r_plain_run = gr.Button("Run without attribution", elem_id="reason-plain-run")
            r_plain_out = gr.Markdown(elem_id="reason-plain-out")
    r_outputs = [state, r_text, r_gallery, r_pca, r_dyn, r_status, r_json]
    run_ev = r_run.click(
        attribute,
        [r_image, r_question, r_model, state],
        r_outputs,
        api_name="attribute",
        trigger_mode="multiple",
        **model_limit,
    )
    sub_ev = r_question.submit(
        attribute, [r_image, r_question, r_model, state], r_outputs, api_visibility="private", **model_limit
    )
    for ev in (run_ev, sub_ev):
        ev.failure(_error_status("reason"), [state], [r_status], api_visibility="private")
    r_stop.click(stop_reasoning, [state], [r_status], api_name="stop", concurrency_limit=None)
    r_plain_run.click(reason, [r_image, r_question, r_model], r_plain_out, api_name="reason", **model_limit)
    return [run_ev, sub_ev]


@handler(VLMError, status="reason")
def attribute(
    image: ex.ImageInput | None, question: str, model_name: str, st: Session | None = None, request: gr.Request = None
) -> Iterator[tuple]:
    """Stream the reasoning with live per-span attribution (api_name="attribute").

    Yields (state, text, heatmaps, path plot, dynamics, status, raw JSON). Closing the
    generator (Stop, a closed tab, a dropped client) closes the attribution session."""
    img = ex.load_image(image)
    q = ex.check_question(question)
    skip = gr.skip()
    with st.lock:
        busy = st.reasoning_busy()
        if busy:
            msg = "A run is already in progress in this tab: press Stop or wait for it to finish."
            st.notice = (msg, time.perf_counter())
    if busy:  # a second click: say so in the status line, leave the running outputs alone
        yield st, skip, skip, skip, skip, msg, skip
        return
    try:
        vlm = ex.get_model(model_name)
        est, note = ex.estimator_for(vlm, model_name, st.lab_estimator)
        session = attribute_stream(vlm, img, q, est, max_new_tokens=MAX_NEW_TOKENS)
    except VLMError:
        raise
    except Exception as e:  # a model that loads but cannot run: keep serving
        raise VLMError(f"the model could not run: {type(e).__name__}: {e}") from None
    with st.lock:
        busy = st.reasoning_busy()  # lost a race with another click of this tab?
        if not busy:
            st.attr = session.start()
    if busy:
        session.close()
        yield st, skip, skip, skip, skip, "A run is already in progress in this tab.", skip
        return
    run = ex.RunRecord(
        uuid.uuid4().hex[:12], ex.model_key(model_name), q, img, ex.image_ref(image), estimator_note=note
    )
    if st.run is not None:
        st.run.cleanup()
    st.run, st.point = run, None
    text = ex.LiveText()
    t0, last = time.perf_counter(), 0.0

    def status() -> str:
        return readouts.attribution_running(run, text.n_tokens, time.perf_counter() - t0, st.recent_notice())

    def path(final: bool = False) -> tuple[go.Figure, str]:
        return (
            figures.path_figure(run.path, [s.text for s in run.spans]),
            figures.dynamics_markdown(run.path_length, run.tortuosity, run.label, len(run.spans), final=final),
        )

    try:
        yield (
            st,
            [],
            [],
            figures.path_figure(None),
            figures.dynamics_markdown(0.0, None, "stable", 0),
            status(),
            run.to_dict(),
        )
        for ev in session:
            run.apply(ev)
            if isinstance(ev, TokenEvent):
                text.add(ev.index, ev.text)
                now = time.perf_counter()
                if now - last >= _TOKEN_YIELD_S:
                    last = now
                    yield st, text.segments(), skip, skip, skip, status(), skip
            elif isinstance(ev, PathEvent):
                last = time.perf_counter()
                yield st, text.segments(), run.gallery(), *path(), status(), run.to_dict()
        final = readouts.attribution_final(run, text.n_tokens, time.perf_counter() - t0)
        run.done = True
        yield st, text.segments(done=True), run.gallery(), *path(final=True), final, run.to_dict()
    finally:
        session.close()
        with st.lock:
            if st.attr is session:
                st.attr = None


@handler()
def stop_reasoning(st: Session | None, request: gr.Request = None) -> str:
    """Stop button: ends generation and the attribution worker at once (joins both threads)."""
    attr, st.attr = st.attr, None
    if attr is None:
        return "Nothing is running."
    attr.close()
    return "Stopped."


@handler(VLMError)
def reason(image: ex.ImageInput | None, question: str, model_name: str) -> Iterator[str]:
    """Plain reasoning stream, no attribution (api_name="reason", kept for API users)."""
    img = ex.load_image(image)
    q = ex.check_question(question)
    vlm = ex.get_model(model_name)
    inputs = vlm.build_inputs(q, image=img)
    text = ""
    for _, piece in vlm.stream(inputs, max_new_tokens=MAX_NEW_TOKENS):
        text += piece
        yield readouts.reasoning_markdown(text, done=False)
    yield readouts.reasoning_markdown(text, done=True)


# ----------------------------------------------------------------------------------------------
# Video tab


def video_tab(state: gr.State, video_model: str, model_limit: dict[str, Any]) -> None:
    with gr.Tab("Video", id="video"):
        with gr.Row():
            with gr.Column(scale=2):
                v_source = gr.Radio(
                    ["Video file", "Webcam"],
                    value="Video file",
                    label="Source",
                    info="Webcam: start the camera below, then Run; a camera that "
                    f"sends nothing for {WEBCAM_IDLE_S:g} s ends the stream.",
                    elem_id="video-source",
                )
                v_file = gr.Video(label="Video file", sources=["upload"], height=240, elem_id="video-file")
                v_cam = gr.Image(
                    sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="video-webcam"
                )
                v_fps = gr.Slider(
                    0.5, 4, value=2, step=0.5, label="Frames per second fed to the model", elem_id="video-fps"
                )
                v_question = gr.Textbox(label="Question", value="How many objects appeared?", elem_id="video-question")
                v_model = gr.Textbox(
                    label="Video model (folder or Hugging Face id; the default is our TaYS-trained demo model)",
                    value=video_model,
                    elem_id="video-model",
                )
                with gr.Row():
                    v_run = gr.Button("Run TaYS", variant="primary", elem_id="video-run")
                    v_stop = gr.Button("Stop", variant="stop", elem_id="video-stop")
            with gr.Column(scale=3):
                v_text = gr.Textbox(label="Reasoning (streams while frames arrive)", lines=6, elem_id="video-text")
                with gr.Row():
                    v_ttft = gr.Markdown("**TTFT** –", elem_id="video-ttft")
                    v_delay = gr.Markdown("**Delay** –", elem_id="video-delay")
                v_status = gr.Markdown(elem_id="video-status")
                with gr.Group():
                    v_other = gr.Radio(
                        ["interleaved", "batch"],
                        value="interleaved",
                        label="Compare TaYS against",
                        elem_id="video-compare-with",
                    )
                    v_compare = gr.Button("Compare on the same file", elem_id="video-compare")
                v_compare_out = gr.Markdown(elem_id="video-compare-out")
                v_compare_plot = gr.Plot(label="Latency: TaYS vs the other paradigm", elem_id="video-compare-plot")
        vrows = stream_examples()
        if vrows:
            gr.Examples(
                vrows,
                inputs=[v_file, v_question],
                label="Example videos (shapes-world streams)",
                elem_id="video-examples",
            )
    v_ev = v_run.click(
        video_run,
        [v_source, v_file, v_fps, v_question, v_model, state],
        [state, v_text, v_ttft, v_delay, v_status],
        api_name="video",
        **model_limit,
    )
    v_ev.failure(_error_status("video"), [state], [v_status], api_visibility="private")
    v_stop.click(stop_video, [state], [v_status], api_name="video_stop", concurrency_limit=None)
    v_cam.stream(
        push_webcam_frame, [v_cam, state], None, stream_every=0.25, concurrency_limit=None, api_visibility="private"
    )
    c_ev = v_compare.click(
        video_compare,
        [v_file, v_fps, v_question, v_other, v_model, state],
        [v_compare_out, v_compare_plot],
        api_name="video_compare",
        **model_limit,
    )
    c_ev.failure(_error_status("video"), [state], [v_status], api_visibility="private")


def _video_source(kind: str, file: str | None, fps: float, st: Session) -> PushSource | VideoFileSource:
    if kind == "Webcam":
        st.push = PushSource(fps=fps, idle_timeout=WEBCAM_IDLE_S, name="webcam")
        return st.push
    if not file:
        raise VLMError("Upload a video file or pick an example video first.")
    return VideoFileSource(str(file), fps=fps, realtime=True)


@handler(VLMError, status="video")
def video_run(
    kind: str,
    file: str | None,
    fps: float,
    question: str,
    model_name: str,
    st: Session | None = None,
    request: gr.Request = None,
) -> Iterator[tuple]:
    """Run the TaYS engine on a file or the webcam; stream text and live TTFT / delay
    (api_name="video"). Yields (state, text, ttft, delay, status)."""
    fps = ex.check_fps(fps)
    q = ex.check_question(question)
    with st.job("video"):
        vlm = ex.get_model(model_name)
        src = _video_source(kind, file, fps, st)
        stop = threading.Event()
        st.video_stop = stop
        tokens: queue.Queue[TokenRecord] = queue.Queue()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["res"] = run_paradigm(
                    vlm,
                    src,
                    q,
                    "tays",
                    max_new_tokens=VIDEO_MAX_NEW_TOKENS,
                    on_token=tokens.put,
                    stop_event=stop,
                    **run_options(vlm),
                )
            except BaseException as e:  # shown in the status line; the app keeps serving
                box["error"] = f"{type(e).__name__}: {e}"

        th = threading.Thread(target=work, name="app-video-run", daemon=True)
        t0 = time.perf_counter()
        th.start()
        text, first, latest = "", None, None
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
                yield (
                    st,
                    text,
                    readouts.ttft_markdown(first, time.perf_counter() - t0),
                    readouts.delay_markdown(latest, False),
                    readouts.video_running(fps, kind == "Webcam", time.perf_counter() - t0),
                )
                if not alive:
                    break
            res = box.get("res")
            if res is None:
                msg = box.get("error", "the run ended without a result")
                yield (
                    st,
                    text,
                    readouts.ttft_markdown(first, 0.0),
                    readouts.delay_markdown(latest, False),
                    f"**Error:** {msg}",
                )
                return
            m = res.metrics
            yield (
                st,
                res.text,
                readouts.ttft_markdown(m.get("ttft_question_s"), 0.0),
                readouts.delay_markdown(m.get("delay_s"), True),
                readouts.video_done(res),
            )
        finally:
            stop.set()
            if st.push is not None and kind == "Webcam":
                st.push.close()
            th.join(10.0)


@handler()
def stop_video(st: Session | None, request: gr.Request = None) -> str:
    if not st.video_busy:
        return "Nothing is running."
    if st.video_stop is not None:
        st.video_stop.set()
    if st.push is not None:
        st.push.close()
    return "Stopping…"


@handler()
def push_webcam_frame(frame: np.ndarray | None, st: Session | None, request: gr.Request = None) -> None:
    """Webcam stream handler: hand the frame to this session's running TaYS source (if any);
    frames arriving with no run, or faster than the chosen FPS, are dropped."""
    src = st.push
    if frame is None or src is None or src.ended:
        return
    try:
        src.push(frame)
    except StreamError:
        pass  # e.g. the camera changed resolution: the run reports rejected frames


@handler(VLMError, status="video")
def video_compare(
    file: str | None,
    fps: float,
    question: str,
    other: str,
    model_name: str,
    st: Session | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, go.Figure]:
    """TaYS vs interleaved or batch on the same file, one after the other (api_name="video_compare")."""
    fps = ex.check_fps(fps)
    q = ex.check_question(question)
    if other not in ("interleaved", "batch"):
        raise VLMError(f"compare with 'interleaved' or 'batch', not {other!r}")
    if not file:
        raise VLMError("The comparison needs a video file (upload one or pick an example).")
    VideoFileSource(str(file), fps=fps).close()  # refuse a corrupt file before the first run
    with st.job("video"):
        vlm = ex.get_model(model_name)
        rows = []
        stop = threading.Event()
        st.video_stop = stop
        for i, paradigm in enumerate(("tays", other)):
            progress((i, 2), desc=f"running {paradigm} (plays the file in real time)")
            res = run_paradigm(
                vlm,
                VideoFileSource(str(file), fps=fps, realtime=True),
                q,
                paradigm,
                max_new_tokens=VIDEO_MAX_NEW_TOKENS,
                stop_event=stop,
                **run_options(vlm),
            )
            rows.append(dict(res.metrics, paradigm=paradigm, answer=res.answer.strip()))
            if stop.is_set():
                break
    return readouts.comparison_markdown(rows, other), figures.latency_figure(rows)


# ----------------------------------------------------------------------------------------------
# Estimator lab


def lab_tab(state: gr.State, default_model: str, model_limit: dict[str, Any]) -> None:
    with gr.Tab("Estimator lab", id="lab"):
        gr.Markdown(
            "Run the cells top to bottom. Defaults are small so each step takes a minute or two on "
            "a CPU; the estimator you train or load here is used by this tab's Reasoning runs."
        )
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
            l_methods = gr.CheckboxGroup(
                ["vstream", "raw_attention", "input_x_gradient", "occlusion"],
                value=["vstream", "raw_attention"],
                label="methods",
                elem_id="lab-methods",
            )
            l_which = gr.Radio(["session", "shipped"], value="shipped", label="estimator", elem_id="lab-which")
        l_eval = gr.Button("Evaluate", elem_id="lab-evaluate")
        l_eval_summary = gr.Markdown(elem_id="lab-eval-summary")
        l_table = gr.Dataframe(headers=figures.EVAL_HEADERS, label="LDS / R^2 per method", elem_id="lab-table")
        l_plot = gr.Plot(elem_id="lab-plot")
        gr.Markdown("### 4. Save or load an estimator")
        with gr.Row():
            with gr.Column():
                l_name = gr.Textbox(
                    "lab-estimator.safetensors",
                    label="file name (saved under runs/estimators/)",
                    elem_id="lab-save-name",
                )
                l_save = gr.Button("Save", elem_id="lab-save")
                l_saved = gr.File(label="saved estimator", elem_id="lab-saved")
            with gr.Column():
                l_upload = gr.File(
                    label="estimator to load (.safetensors)",
                    file_types=[".safetensors"],
                    type="filepath",
                    elem_id="lab-load-file",
                )
                l_load = gr.Button("Load", elem_id="lab-load")
    for ev in (
        l_collect.click(
            lab_collect, [l_model, l_n, l_masks, l_start, state], l_collect_out, api_name="lab_collect", **model_limit
        ),
        l_train.click(lab_train, [l_epochs, l_lr, state], l_train_out, api_name="lab_train", **model_limit),
        l_eval.click(
            lab_evaluate,
            [l_model, l_eval_n, l_methods, l_which, state],
            [l_table, l_plot, l_eval_summary],
            api_name="lab_evaluate",
            **model_limit,
        ),
        l_save.click(lab_save, [l_name, state], [l_saved, l_status], api_name="lab_save"),
        l_load.click(lab_load, [l_upload, l_model, state], l_status, api_name="lab_load"),
    ):
        ev.failure(_error_status("lab"), [state], [l_status], api_visibility="private")


@handler(VLMError, status="lab")
def lab_collect(
    model_name: str,
    n: float,
    masks: float,
    start: float,
    st: Session | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),
) -> str:
    """Cell 1: label n training scenes with region ablations (api_name="lab_collect")."""
    n, masks, start = ex.as_number(n, int), ex.as_number(masks, int), ex.as_number(start, int)
    if not 1 <= n <= 500:
        raise VLMError(f"scenes must be between 1 and 500, got {n}")
    if not 2 <= masks <= 256:
        raise VLMError(f"masks per scene must be between 2 and 256, got {masks}")
    with st.job("lab"):
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
    spans = sum(e.n_spans for e in st.lab_examples)
    return readouts.collected_markdown(got, time.perf_counter() - t0, len(st.lab_examples), spans, st.lab_model)


@handler(VLMError, status="lab")
def lab_train(
    epochs: float,
    lr: float,
    st: Session | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(track_tqdm=True),
) -> str:
    """Cell 2: fit the linear estimator on the session's labels (api_name="lab_train")."""
    if len(st.lab_examples) < 2:
        raise VLMError("Collect at least 2 labelled scenes first (cell 1).")
    epochs, lr = ex.as_number(epochs, int), ex.as_number(lr, float)
    if not 1 <= epochs <= 2000 or not 0 < lr < 10:
        raise VLMError(f"epochs must be 1..2000 and the learning rate in (0, 10); got {epochs}, {lr}")
    with st.job("lab"):
        vlm = ex.get_model(st.lab_model)
        progress(0, desc="train estimator")
        est, report = train_estimator(
            list(st.lab_examples),
            epochs=epochs,
            lr=lr,
            progress=True,
            num_layers=int(vlm.num_layers),
            num_heads=int(vlm.num_heads),
        )
        est.meta.update(model_identity(vlm))
        st.lab_estimator = est
    return readouts.trained_markdown(report, st.lab_model)


@handler(VLMError, ValueError, status="lab")
def lab_evaluate(
    model_name: str,
    n: float,
    methods: list[str],
    which: str,
    st: Session | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(track_tqdm=True),
) -> tuple[list[list[Any]], go.Figure, str]:
    """Cell 3: LDS / R^2 against the baselines on held-out scenes (api_name="lab_evaluate")."""
    n = ex.as_number(n, int)
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
        if isinstance(est, RawAttention):
            raise VLMError("The shipped estimator does not fit this model: train one in cells 1-2.")
    with st.job("lab"):
        progress(0, desc="evaluate")
        res = evaluate(vlm, est, n=n, methods=tuple(methods), progress=True)
    return figures.eval_rows(res), figures.eval_figure(res), readouts.evaluated_summary(res)


@handler(VLMError, OSError, status="lab")
def lab_save(name: str, st: Session | None = None, request: gr.Request = None) -> tuple[str, str]:
    """Cell 4a: save the session's estimator under runs/estimators/ and offer it for download."""
    if st.lab_estimator is None:
        raise VLMError("No estimator in this session yet: train one first (cell 2).")
    base = Path(str(name or "").strip() or "lab-estimator.safetensors").name  # no paths from the web
    if not base.endswith(".safetensors"):
        base += ".safetensors"
    path = st.lab_estimator.save(ESTIMATOR_DIR / base)
    return str(path), f"Saved `{path}`."


@handler(VLMError, status="lab")
def lab_load(file: str | None, model_name: str, st: Session | None = None, request: gr.Request = None) -> str:
    """Cell 4b: load an estimator file (.safetensors only) as this session's estimator."""
    if not file:
        raise VLMError("Choose an estimator file (.safetensors).")
    vlm = ex.get_model(model_name)
    st.lab_estimator = load_estimator(str(file), vlm)
    st.lab_model = ex.model_key(model_name)
    return f"Loaded `{Path(str(file)).name}` for `{st.lab_model}`; the Reasoning tab uses it now."


# ----------------------------------------------------------------------------------------------
# Annotation tab


def annotation_tab(state: gr.State, db_path: str, runs: list[gr.events.Dependency]) -> None:
    """`runs`: the Reasoning tab's run events; each finished run shows up here."""
    annotate, show_records, export = annotation_handlers(db_path)
    with gr.Tab("Annotation", id="annotation"):
        gr.Markdown(
            "Mark each span's heatmap of your last Reasoning run. Click the image to point at the "
            f"region that should have lit up. Records go to `{db_path}`."
        )
        with gr.Row():
            with gr.Column(scale=3):
                a_image = gr.Image(
                    label="Span heatmap (click the right region)", interactive=False, type="pil", elem_id="annot-image"
                )
            with gr.Column(scale=2):
                a_name = gr.Textbox(label="Annotator", placeholder="your name", elem_id="annot-name")
                a_span = gr.Slider(0, 1, value=0, step=1, label="span (0 = first)", elem_id="annot-span")
                a_info = gr.Markdown(elem_id="annot-info")
                a_verdict = gr.Radio(
                    [("grounded", "grounded"), ("wrong region", "wrong_region"), ("not visual", "not_visual")],
                    label="verdict",
                    elem_id="annot-verdict",
                )
                a_note = gr.Textbox(label="note (optional)", elem_id="annot-note")
                a_save = gr.Button("Save verdict", variant="primary", elem_id="annot-save")
                a_status = gr.Markdown(elem_id="annot-status")
        a_records = gr.Dataframe(
            headers=readouts.RECORD_HEADERS, label="your records (latest per span)", elem_id="annot-records"
        )
        with gr.Row():
            a_jsonl = gr.Button("Export JSONL", elem_id="annot-export-jsonl")
            a_csv = gr.Button("Export CSV", elem_id="annot-export-csv")
            a_file = gr.File(label="export", elem_id="annot-export-file")
    for ev in runs:
        ev.then(annot_refresh, [state], [a_image, a_info, a_span], api_visibility="private")
    a_span.release(annot_span_changed, [a_span, state], [a_image, a_info, a_span], api_visibility="private")
    a_image.select(annot_click, [a_span, state], [a_image, a_info, a_span], api_visibility="private")
    a_ev = a_save.click(
        annotate, [a_name, a_span, a_verdict, a_note, state], [a_status, a_records], api_name="annotate"
    )
    a_ev.failure(_error_status("annot"), [state], [a_status], api_visibility="private")
    a_name.blur(show_records, [a_name], [a_records], api_visibility="private")
    a_jsonl.click(lambda name: export("jsonl", name), [a_name], a_file, api_name="annotations_export")
    a_csv.click(lambda name: export("csv", name), [a_name], a_file, api_name="annotations_export_csv")


AnnotView = tuple[Image.Image | None, str, dict[str, Any]]  # span overlay, its text, the span slider


def _annot_view(span: float, st: Session) -> AnnotView:
    """Show span `span` of this session's last run (overlay, text, top regions)."""
    run = st.run
    if run is None or not run.spans:
        return None, readouts.NO_RUN_YET, gr.update(maximum=1, value=0)
    i = max(0, min(int(span or 0), len(run.spans) - 1))
    region = run.region_at(st.point) if st.point else None
    return (
        run.overlay(i, st.point),
        readouts.span_info(run, i, region),
        gr.update(maximum=max(1, len(run.spans) - 1), value=i),
    )


@handler()
def annot_refresh(st: Session | None, request: gr.Request = None) -> AnnotView:
    """After a run: reset the click and show its first span."""
    st.point = None
    return _annot_view(0, st)


@handler()
def annot_click(span: float, st: Session | None, evt: gr.SelectData, request: gr.Request = None) -> AnnotView:
    run = st.run
    if run is not None and evt is not None and evt.index is not None:
        x, y = evt.index[:2]
        st.point = run.point_at(x, y)
    return _annot_view(span, st)


@handler()
def annot_span_changed(span: float, st: Session | None, request: gr.Request = None) -> AnnotView:
    st.point = None
    return _annot_view(span, st)


def annotation_handlers(db_path: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """(annotate, show_records, export) on the store at `db_path`, which is only known when the
    page is built. The store opens on first use, so a bad path shows in the tab."""

    def records(name: str) -> list[list[Any]]:
        if not name or not name.strip():
            return []
        return readouts.record_rows(shared_store(db_path).records(annotator=name.strip(), latest_only=True))

    @handler(VLMError, AnnotationError, ValueError, status="annot")
    def annotate(
        name: str, span: float, verdict: str, note: str, st: Session | None = None, request: gr.Request = None
    ) -> tuple[str, list[list[Any]]]:
        """Save one verdict for a span of this session's last run (api_name="annotate")."""
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
        rid = shared_store(db_path).add(
            name,
            run.run_id,
            i,
            verdict,
            span_text=run.spans[i].text,
            region=region,
            point=point,
            model=run.model,
            image_ref=run.image_ref,
            note=str(note or "")[:2000],
        )
        where = f" at region {region}" if region is not None else ""
        return f"Saved #{rid}: span {i} is {verdict}{where}.", records(name)

    @handler(VLMError, ValueError)  # AnnotationError is a ValueError
    def show_records(name: str) -> list[list[Any]]:
        return records(name)

    @handler(VLMError, OSError, ValueError)
    def export(fmt: str, name: str = "") -> str:
        """Download the records as JSONL or CSV: the named annotator's, or all when no name is
        given (api_name="annotations_export" / "annotations_export_csv")."""
        store = shared_store(db_path)
        who = str(name or "").strip() or None
        out = Path(tempfile.mkdtemp(prefix="vstream-annotations-")) / f"annotations.{fmt}"
        (store.export_jsonl if fmt == "jsonl" else store.export_csv)(out, annotator=who)
        return str(out)

    return annotate, show_records, export


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
    ap.add_argument(
        "--share",
        action="store_true",
        default=env("VSTREAM_SHARE") == "1",
        help="public gradio.live link (env VSTREAM_SHARE=1)",
    )
    ap.add_argument("--model", default=env("VSTREAM_MODEL", str(DEMO_MODEL_DIR)), help="env VSTREAM_MODEL")
    ap.add_argument(
        "--video-model",
        default=env("TAYS_MODEL", ex.default_video_model()),
        help="the Video tab's model (env TAYS_MODEL; default: assets/tays-model if shipped)",
    )
    ap.add_argument(
        "--auth",
        default=env("VSTREAM_AUTH"),
        help="login for annotator links: user:pass[,user2:pass2] (env VSTREAM_AUTH)",
    )
    ap.add_argument(
        "--annotations",
        default=env("VSTREAM_ANNOTATIONS", DEFAULT_ANNOTATIONS),
        help="SQLite file of the annotation store (env VSTREAM_ANNOTATIONS)",
    )
    ap.add_argument(
        "--concurrency",
        type=int,
        default=int(env("VSTREAM_CONCURRENCY", "2")),
        help="model jobs run at once across all users; others queue (env VSTREAM_CONCURRENCY)",
    )
    ap.add_argument(
        "--max-queue",
        type=int,
        default=int(env("VSTREAM_MAX_QUEUE", "64")),
        help="queued jobs before new ones are refused (env VSTREAM_MAX_QUEUE)",
    )
    args = ap.parse_args(argv)
    if args.model == str(DEMO_MODEL_DIR) and not Path(args.model).exists():
        raise SystemExit(
            f"error: the demo model is missing at {DEMO_MODEL_DIR}; train it with python -m vstream train-demo"
        )
    if args.concurrency < 1:
        raise SystemExit("error: --concurrency must be at least 1")
    auth = parse_auth(args.auth)
    demo = build_ui(args.model, args.annotations, args.concurrency, args.video_model)
    threading.Thread(
        target=ex.warm_up, args=(args.model, args.video_model), name="vstream-warm-up", daemon=True
    ).start()
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        auth_message="Log in with the annotator account you were given." if auth else None,
        css=CSS,
    )


if __name__ == "__main__":
    main()
