"""Gradio explorer for vision-language thinking models (vSTREAM attribution + TaYS video).

Four tabs: Reasoning (live per-span heatmaps and a 3-D reliance path), Video (TaYS streaming
reasoning on a file or a webcam, with latency readouts and a side-by-side comparison),
Estimator lab (collect labels, train, evaluate, save/load) and Annotation (mark each span's
heatmap; SQLite with JSONL/CSV export). Runs can be saved, reopened and exported as HTML reports.
This file only wires widgets to library calls.

    python app.py                       # embedded demo model on http://127.0.0.1:7860
    python app.py --models assets/demo-model,Qwen/Qwen2.5-VL-3B-Instruct --host 0.0.0.0 --auth ann:secret
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from PIL import Image

from tays import PushSource, StreamError, TokenRecord, VideoFileSource, run_options, run_paradigm
from tays.ipc import shutdown_server
from tays.watch import StreamAttributor
from ui import explorer as ex
from ui import figures, readouts
from ui import video as vid
from ui.access import Identity, ModelPolicy, check_admin, parse_models
from ui.annotations import AnnotationError, shared_store
from ui.report import report_html
from ui.storage import SavedFiles, safe_name
from vstream.attr.estimator import LinearEstimator, RawAttention
from vstream.attr.estimator import load as load_estimator
from vstream.attr.estimator import train as train_estimator
from vstream.attr.evaluate import evaluate
from vstream.attr.labels import LabeledExample, collect
from vstream.attr.methods import METHODS
from vstream.attr.record import RunRecord, score_span
from vstream.attr.worker import AttributionSession, PathEvent, TokenEvent, attribute_stream
from vstream.model import VLMError, model_identity
from vstream.world.assets import DEMO_MODEL_DIR, ROOT
from vstream.world.examples import scene_examples, stream_examples

MAX_NEW_TOKENS = 256
VIDEO_MAX_NEW_TOKENS = 160  # as `python -m tays evaluate`: a step per frame group on 20 s streams
WEBCAM_IDLE_S = 5.0  # a webcam that sends nothing for this long ends the stream
DEFAULT_ANNOTATIONS = "annotations/annotations.db"
DEFAULT_RUNS_DIR = "runs"
MAX_UPLOAD = "200mb"  # one uploaded file (image, video, run, estimator); Gradio refuses bigger ones
SESSION_RUNS = 12  # runs one tab keeps in memory (live and reopened); the oldest is dropped
_TOKEN_YIELD_S = 0.1  # stream text to the page at most this often (span events always go at once)


# ----------------------------------------------------------------------------------------------
# the page

CSS = """
#reason-text .textfield { font-size: 1.05em; line-height: 1.6; }
#reason-text .textspan { cursor: pointer; }
"""


@dataclass
class Serving:
    """What the operator decided when starting the page: the annotation store, where saved
    files go and their caps, the admin login. One per process (`build_ui` sets it)."""

    db_path: str = DEFAULT_ANNOTATIONS
    files: SavedFiles = field(default_factory=lambda: SavedFiles(Path(DEFAULT_RUNS_DIR)))
    admin: str | None = None
    logins: bool = False
    annotations_per_session: int = 2000
    annotations_max_bytes: int = 1024 * 1024 * 1024


SERVING = Serving()


def build_ui(
    default_model: str | None = None,
    annotations: str | None = None,
    concurrency: int = 2,
    video_model: str | None = None,
    models: list[str] | None = None,
    allow_any_model: bool = False,
    admin: str | None = None,
    logins: bool = False,
    runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR,
    files_per_session: int = 20,
    files_max_mb: float = 512,
) -> gr.Blocks:
    """The whole explorer. `models`: the models a visitor may pick (default: the shipped ones;
    `default_model` and `video_model` are added); `allow_any_model`: also any typed name.
    `annotations`: SQLite path of the annotation store; `admin`: the login that may export
    everyone's records; `runs_dir` and the caps: where saved runs, reports and estimators go."""
    allowed = list(models or ex.shipped_models())
    default_model = default_model or allowed[0]
    video_model = video_model or ex.default_video_model()
    policy = ModelPolicy.of([default_model, *allowed, video_model], allow_any_model, root=ROOT)
    ex.configure_models(policy)
    db_path = str(annotations or os.environ.get("VSTREAM_ANNOTATIONS") or DEFAULT_ANNOTATIONS)
    SERVING.db_path, SERVING.admin, SERVING.logins = db_path, admin, bool(logins or admin)
    SERVING.files = SavedFiles(Path(runs_dir), int(files_per_session), int(files_max_mb * 1024 * 1024))
    model_limit = dict(concurrency_limit=concurrency, concurrency_id="model")  # model jobs share one queue
    with gr.Blocks(title="Thinking-VLM Explorer", delete_cache=(1800, 3600)) as demo:
        state = gr.State(Session, delete_callback=lambda s: s.close() if isinstance(s, Session) else None)
        gr.Markdown(
            "# Thinking-VLM Explorer\nWatch a vision-language model think, with live per-sentence visual "
            "attribution (vSTREAM) and streaming video reasoning (TaYS). The default model is a tiny "
            "Qwen2.5-VL-architecture model trained on our procedural shapes world; the model menus list "
            "what this server offers."
        )
        with gr.Tabs():
            runs = reasoning_tab(state, policy, default_model, model_limit)
            video_tab(state, policy, video_model, model_limit)
            lab_tab(state, policy, default_model, model_limit)
            annotation_tab(state, db_path, runs)
        demo.unload(_on_unload)
    for fn in demo.fns.values():  # the State's per-page-load initialiser is no API endpoint
        if getattr(fn, "fn", None) is Session:
            fn.api_visibility = "private"
    return demo


def model_menu(policy: ModelPolicy, value: str, label: str, elem_id: str) -> gr.Dropdown:
    """A model picker offering the server's list; free text only with `--allow-any-model`.
    Whatever an API client sends is handed to the policy as is (its preprocess is wrapped, as
    in `image_input`), so "" means the default and every refusal is the policy's one message."""
    comp = gr.Dropdown(
        choices=policy.choices(),
        value=policy.label(policy.resolve(value)),
        label=label,
        allow_custom_value=policy.allow_any,
        elem_id=elem_id,
    )
    comp.preprocess = lambda payload: "" if payload is None else str(payload)
    return comp


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
        self.key = uuid.uuid4().hex  # names this session for the storage caps
        self.lock = threading.Lock()
        self.attr: AttributionSession | None = None  # running attribution
        self.runs: OrderedDict[str, ex.RunView] = OrderedDict()  # this tab's runs, live and reopened
        self.run: ex.RunView | None = None  # the run the Reasoning tab shows
        self.annot_run: ex.RunView | None = None  # the run the Annotation tab marks (default: the latest)
        self.span = 0  # selected span of `run`
        self.span_pinned = False  # the visitor picked a span while the run streams: stop following the latest
        self.shared_scale = True
        self.segment_span: list[int | None] = []  # HighlightedText segment -> span index
        self.annotation_ids: list[int] = []  # rows this session saved (what it may export without logins)
        self.video_stop: threading.Event | None = None
        self.push: PushSource | None = None  # fed by the webcam
        self.video_watch: vid.WatchLog | None = None  # attribution of the latest video run
        self.video_log: vid.StepLog | None = None  # its steps as the table shows them
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

    def add_run(self, view: ex.RunView) -> None:
        """Keep `view` (newest last) and show it; beyond SESSION_RUNS the oldest is dropped."""
        with self.lock:
            old = self.runs.pop(view.run_id, None)
            if old is not None and old is not view:  # the same run reopened from its file
                old.cleanup()
            self.runs[view.run_id] = view
            self.runs.move_to_end(view.run_id)
            while len(self.runs) > SESSION_RUNS:
                _, old = self.runs.popitem(last=False)
                old.cleanup()
            self.run, self.annot_run, self.span, self.point = view, view, 0, None
            self.span_pinned = False

    def close(self) -> None:
        attr, self.attr = self.attr, None
        if attr is not None:
            attr.close()
        if self.video_stop is not None:
            self.video_stop.set()
        if self.push is not None:
            self.push.close()
        for view in list(self.runs.values()):
            view.cleanup()


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


def close_all_sessions() -> None:
    """Server stopping: stop every tab's generation, video run and webcam feed."""
    for st in list(_SESSIONS.values()):
        st.close()


def _identity(request: gr.Request | None) -> Identity:
    return Identity(getattr(request, "username", None) or None, SERVING.admin)


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


def reasoning_tab(
    state: gr.State, policy: ModelPolicy, default_model: str, model_limit: dict[str, Any]
) -> list[gr.events.Dependency]:
    """Returns the events after which a run is in the session's list (runs, reopened files);
    the Annotation tab refreshes after each."""
    with gr.Tab("Reasoning", id="reasoning"):
        with gr.Row():
            with gr.Column(scale=2):
                r_image = image_input(type="filepath", label="Image", height=300, elem_id="reason-image")
                r_question = gr.Textbox(
                    label="Question", placeholder="What color is the circle?", elem_id="reason-question"
                )
                r_model = model_menu(policy, default_model, "Model", "reason-model")
                with gr.Row():
                    r_run = gr.Button("Run", variant="primary", elem_id="reason-run")
                    r_stop = gr.Button("Stop", variant="stop", elem_id="reason-stop")
                r_truth = gr.Textbox(
                    label="Ground truth (of the gallery example picked)",
                    interactive=False,
                    elem_id="reason-truth",
                )
                r_status = gr.Markdown("Pick an example or upload an image, then press Run.", elem_id="reason-status")
            with gr.Column(scale=3):
                r_text = gr.HighlightedText(
                    label="Reasoning (the span being written is highlighted; when done, click a sentence to see it)",
                    color_map={"current": "#ffd54f", "selected span": "#ffb74d", "span": "#e3f2fd"},
                    combine_adjacent=False,
                    show_legend=False,
                    show_inline_category=False,
                    elem_id="reason-text",
                )
                r_gallery = gr.Gallery(
                    label="Span heatmaps (click one to enlarge; region outlines in white, top regions numbered)",
                    columns=4,
                    height=260,
                    allow_preview=False,
                    elem_id="reason-heatmaps",
                )
        with gr.Row():
            with gr.Column(scale=3):
                r_view = gr.Plot(label="Selected span (hover a region for its score)", elem_id="reason-span-view")
            with gr.Column(scale=2):
                r_pick = gr.Dropdown(choices=[], label="Selected span", elem_id="reason-span-pick")
                r_scale = gr.Radio(
                    ["shared", "per span"],
                    value="shared",
                    label="Colour scale",
                    info="shared: one range for every span of the run, so spans compare; per span: each its own",
                    elem_id="reason-scale",
                )
                r_span_info = gr.Markdown(elem_id="reason-span-info")
        with gr.Accordion("Compare methods for the selected span", open=False, elem_id="reason-compare-box"):
            gr.Markdown(
                "vSTREAM and raw attention come from the run itself; occlusion ablates each region in turn "
                "(K extra forward passes), so it runs only when asked. All on one colour scale per method."
            )
            with gr.Row():
                r_occ = gr.Button("Compute occlusion for this span", elem_id="reason-occlusion")
            r_cmp_gallery = gr.Gallery(
                label="vSTREAM · raw attention · occlusion",
                columns=3,
                height=380,
                object_fit="contain",
                elem_id="reason-compare",
            )
            r_cmp_table = gr.Dataframe(
                headers=["method", "time (ms)", "top 3 regions", "rank agreement with the run's method"],
                label="runtimes and agreement",
                elem_id="reason-compare-table",
            )
        with gr.Row():
            with gr.Column(scale=3):
                r_pca = gr.Plot(label="Visual reliance path (PCA, coloured by step)", elem_id="reason-pca")
            with gr.Column(scale=2):
                r_dyn = gr.Markdown(figures.dynamics_markdown(0.0, None, "stable", 0), elem_id="reason-dynamics")
                with gr.Accordion("Runs: keep, share, reopen", open=True, elem_id="reason-runs-box"):
                    r_runs = gr.Dropdown(choices=[], label="This tab's runs", elem_id="reason-runs")
                    with gr.Row():
                        r_save = gr.Button("Save run (.json)", elem_id="reason-save")
                        r_report = gr.Button("Export HTML report", elem_id="reason-report")
                    r_file = gr.File(label="download", elem_id="reason-file")
                    r_open = gr.File(
                        label="Open a saved run (.json)", file_types=[".json"], type="filepath", elem_id="reason-open"
                    )
                with gr.Accordion("Raw attribution (JSON)", open=False):
                    r_json = gr.JSON(label="the run record (the same as a saved file)", elem_id="reason-json")
        photos = ex.photo_examples()
        rows = scene_examples() + photos
        if rows:
            gr.Examples(
                rows,
                inputs=[r_image, r_question, r_truth],
                label="Examples: shapes-world scenes of every family with their ground truth (a run on one "
                "says whether the model got it right), and two photos shipped with scikit-learn",
                examples_per_page=24,
                elem_id="reason-examples",
            )
        # the truth belongs to the example only: a new image or question of the visitor's clears it
        for ev in (r_image.upload, r_image.clear, r_question.input):
            ev(lambda: "", None, r_truth, queue=False, show_progress="hidden")
        with gr.Accordion("Reasoning only (no attribution)", open=False):
            r_plain_run = gr.Button("Run without attribution", elem_id="reason-plain-run")
            r_plain_out = gr.Markdown(elem_id="reason-plain-out")
    r_outputs = [state, r_text, r_gallery, r_pca, r_dyn, r_status, r_json]
    span_outputs = [r_text, r_pick, r_view, r_span_info, r_cmp_gallery, r_cmp_table, r_runs]
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
    after = []
    for ev in (run_ev, sub_ev):
        ev.failure(_error_status("reason"), [state], [r_status], api_visibility="private")
        after.append(ev.then(show_selected, [state], span_outputs, api_visibility="private"))
    r_stop.click(stop_reasoning, [state], [r_status], api_name="stop", concurrency_limit=None)
    r_plain_run.click(reason, [r_image, r_question, r_model], r_plain_out, api_name="reason", **model_limit)
    r_gallery.change(
        follow_latest,
        [state],
        [r_pick, r_view, r_span_info],
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    r_text.select(select_sentence, [state], span_outputs, api_visibility="private")
    r_gallery.select(select_gallery, [state], span_outputs, api_visibility="private")
    r_pick.input(select_span, [r_pick, state], span_outputs, api_name="span")
    r_scale.input(set_scale, [r_scale, state], [r_gallery, *span_outputs], api_visibility="private")
    r_occ.click(compare_occlusion, [state], span_outputs, api_name="span_occlusion", **model_limit).failure(
        _error_status("reason"), [state], [r_status], api_visibility="private"
    )
    run_outputs = [r_text, r_gallery, r_pca, r_dyn, r_status, r_json, *span_outputs[1:]]
    r_runs.input(switch_run, [r_runs, state], run_outputs, api_visibility="private")
    for btn, fn, name in ((r_save, save_run, "run_save"), (r_report, export_report, "run_report")):
        btn.click(fn, [state], [r_file, r_status], api_name=name).failure(
            _error_status("reason"), [state], [r_status], api_visibility="private"
        )
    open_ev = r_open.upload(open_run, [r_open, state], run_outputs, api_name="run_open")
    open_ev.failure(_error_status("reason"), [state], [r_status], api_visibility="private")
    return [*after, open_ev]


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
    if not ex.is_loaded(model_name):
        yield st, skip, skip, skip, skip, readouts.loading_model(ex.model_label(model_name)), skip
    try:
        vlm = ex.get_model(model_name)
        est, note = ex.estimator_for(vlm, model_name, st.lab_estimator)
        risk = ex.risk_for(model_name)
        session = attribute_stream(vlm, img, q, est, max_new_tokens=MAX_NEW_TOKENS, risk=risk)
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
    run = ex.RunView(RunRecord.new(ex.model_label(model_name), q, img, ex.image_ref(image), vlm, est), note)
    st.add_run(run)
    text = ex.LiveText()
    t0, last = time.perf_counter(), 0.0

    def status() -> str:
        return readouts.attribution_running(run, text.n_tokens, time.perf_counter() - t0, st.recent_notice())

    def path(final: bool = False) -> tuple[go.Figure, str]:
        return (
            figures.path_figure(run.path, [s.text for s in run.spans], label=run.label, risks=run.risk),
            run.dynamics(final, risk.heldout_auc if risk is not None else None),
        )

    try:
        yield (
            st,
            [],
            [],
            figures.path_figure(None),
            figures.dynamics_markdown(0.0, None, "stable", 0),
            status(),
            run.live_dict(),
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
                yield st, text.segments(), run.gallery(st.shared_scale), *path(), status(), run.live_dict()
        run.record.add_raw_attention(session)  # the compare view's second method, from the recorded rows
        final = readouts.attribution_final(run, text.n_tokens, time.perf_counter() - t0)
        if run.done and not run.cancelled and not run.error:
            final = " ".join(filter(None, [final, ex.example_verdict(img, q, run.answer)]))
        run.record.done = True
        yield st, text.segments(done=True), run.gallery(st.shared_scale), *path(final=True), final, run.to_dict()
    finally:
        session.close()
        with st.lock:
            if st.attr is session:
                st.attr = None


# -- the selected span, the compare view, the run list ---------------------------------------


def _span_outputs(st: Session, compare: bool = True) -> tuple[Any, ...]:
    """(text, span menu, large view, span info, compare gallery, compare table, run menu) for
    the session's shown run and selected span (`compare=False`: the compare view is skipped)."""
    run = st.run
    runs_menu = gr.update(
        choices=[(v.title(), k) for k, v in reversed(st.runs.items())], value=run.run_id if run else None
    )
    if run is None or not run.spans:
        st.segment_span = []
        return gr.skip(), gr.update(choices=[], value=None), None, readouts.NO_SPANS, [], [], runs_menu
    i = st.span = max(0, min(int(st.span), len(run.spans) - 1))
    segs, st.segment_span = ex.spans_segments(run, i)
    pick = gr.update(choices=[(f"{j}: {s.text[:70]}", j) for j, s in enumerate(run.spans)], value=i)
    methods = [m for m in ("vstream", "raw_attention", "occlusion") if compare and m in run.spans[i].methods]
    gallery = [
        (run.overlay_file(i, shared=True, method=m, colorbar=True), f"{m} · {run.spans[i].methods[m]['ms']:.3g} ms")
        for m in methods
    ]
    return (
        segs,
        pick,
        run.span_figure(i, st.shared_scale),
        readouts.span_view_info(run, i, st.shared_scale),
        gallery if compare else gr.skip(),
        ex.compare_rows(run, i) if compare else gr.skip(),
        runs_menu,
    )


@handler()
def show_selected(st: Session | None, request: gr.Request = None) -> tuple[Any, ...]:
    """After a run: its spans become clickable and the first one (or the one the visitor picked
    while it streamed) is shown large."""
    if not st.span_pinned:
        st.span = 0
    return _span_outputs(st)


@handler()
def select_sentence(st: Session | None, evt: gr.SelectData, request: gr.Request = None) -> tuple[Any, ...]:
    """A click on a sentence of a finished run selects its span."""
    if st.reasoning_busy() or evt is None:
        return (gr.skip(),) * 7
    idx = evt.index if isinstance(evt.index, int) else (evt.index or [None])[0]
    owner = st.segment_span
    if isinstance(idx, int) and 0 <= idx < len(owner) and owner[idx] is not None:
        st.span = owner[idx]
    return _span_outputs(st)


@handler()
def follow_latest(st: Session | None, request: gr.Request = None) -> tuple[Any, ...]:
    """While a run streams, the large view follows the newest span (until the visitor picks one)."""
    run = st.run
    if not st.reasoning_busy() or run is None or not run.spans:
        return gr.skip(), gr.skip(), gr.skip()
    if not st.span_pinned:
        st.span = len(run.spans) - 1
    _, pick, view, info, *_ = _span_outputs(st, compare=False)
    return pick, view, info


@handler()
def select_gallery(st: Session | None, evt: gr.SelectData, request: gr.Request = None) -> tuple[Any, ...]:
    """A click on a heatmap thumbnail selects its span."""
    if evt is not None and isinstance(evt.index, int):
        st.span, st.span_pinned = evt.index, True
    if st.reasoning_busy():  # the text is still streaming: leave it alone
        return (gr.skip(), *_span_outputs(st)[1:])
    return _span_outputs(st)


@handler(VLMError)
def select_span(span: float | None, st: Session | None = None, request: gr.Request = None) -> tuple[Any, ...]:
    """Show span `span` (0 = first) of the shown run (api_name="span")."""
    if span is not None:
        st.span, st.span_pinned = ex.as_number(span, int), True
    return _span_outputs(st)


@handler()
def set_scale(scale: str, st: Session | None, request: gr.Request = None) -> tuple[Any, ...]:
    """Shared colour scale across spans, or each span's own range."""
    st.shared_scale = scale != "per span"
    gallery = st.run.gallery(st.shared_scale) if st.run is not None else []
    return gallery, *_span_outputs(st)


@handler(VLMError, status="reason")
def compare_occlusion(st: Session | None = None, request: gr.Request = None) -> tuple[Any, ...]:
    """Score the selected span by occlusion (one ablated pass per region) with the run's model
    (api_name="span_occlusion")."""
    run = st.run
    if run is None or not run.spans:
        raise VLMError("Run the model (or open a saved run) first.")
    vlm = ex.get_model(run.model)
    try:
        score_span(vlm, run.record, st.span, "occlusion")
    except VLMError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that cannot re-score this run: say so
        raise VLMError(f"occlusion failed: {type(e).__name__}: {e}") from None
    return _span_outputs(st)


def _show_run(st: Session, status: str) -> tuple[Any, ...]:
    """Everything the Reasoning tab shows for the session's current run (switch, reopen)."""
    run = st.run
    segs, pick, view, info, cmp, rows, menu = _span_outputs(st)
    return (
        segs,
        run.gallery(st.shared_scale),
        figures.path_figure(run.path, [s.text for s in run.spans], label=run.label, risks=run.risk),
        run.dynamics(final=True),
        status,
        run.to_dict(),
        pick,
        view,
        info,
        cmp,
        rows,
        menu,
    )


@handler(VLMError)
def switch_run(run_id: str, st: Session | None = None, request: gr.Request = None) -> tuple[Any, ...]:
    """Show another of this tab's runs."""
    view = st.runs.get(str(run_id or ""))
    if view is None:
        raise VLMError(f"That run is no longer in this tab (at most {SESSION_RUNS} are kept); open its saved file.")
    st.run, st.annot_run, st.span, st.point = view, view, 0, None
    return _show_run(st, readouts.run_shown(view))


@handler(VLMError, status="reason")
def open_run(file: str | None, st: Session | None = None, request: gr.Request = None) -> tuple[Any, ...]:
    """Reopen a saved run file (.json) in this tab: view it, compare, annotate (api_name="run_open")."""
    if not file:
        raise VLMError("Choose a saved run file (.json).")
    record = ex.open_run_file(str(file))
    st.add_run(ex.RunView(record, opened=True))
    return _show_run(st, readouts.run_shown(st.run))


def _current(st: Session) -> ex.RunView:
    run = st.run
    if run is None or not run.spans:
        raise VLMError("Nothing to save yet: run the model first (or open a saved run).")
    if st.reasoning_busy() and not run.done:
        raise VLMError("The run is still going: wait for it to finish, or press Stop.")
    return run


@handler(VLMError, OSError, status="reason")
def save_run(st: Session | None = None, request: gr.Request = None) -> tuple[str, str]:
    """Save the shown run as one JSON file (server copy under the caps, and a download)
    (api_name="run_save")."""
    run = _current(st)
    data = run.record.to_json().encode("utf-8")
    path = SERVING.files.write(st.key, "runs", f"run-{run.run_id}.json", data)
    return str(path), f"Saved run `{run.run_id}` ({len(data) / 1e3:.0f} kB): download it below; reopen it any time."


@handler(VLMError, OSError, status="reason")
def export_report(st: Session | None = None, request: gr.Request = None) -> tuple[str, str]:
    """The shown run as a self-contained HTML report (api_name="run_report")."""
    run = _current(st)
    data = report_html(run.record).encode("utf-8")
    path = SERVING.files.write(st.key, "reports", f"report-{run.run_id}.html", data)
    return str(path), f"Report for run `{run.run_id}` ({len(data) / 1e6:.1f} MB, works offline): download it below."


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


def video_tab(state: gr.State, policy: ModelPolicy, video_model: str, model_limit: dict[str, Any]) -> None:
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
                v_model = model_menu(
                    policy, video_model, "Video model (the default is our TaYS-trained demo model)", "video-model"
                )
                with gr.Row():
                    v_run = gr.Button("Run TaYS", variant="primary", elem_id="video-run")
                    v_stop = gr.Button("Stop", variant="stop", elem_id="video-stop")
            with gr.Column(scale=3):
                with gr.Row():
                    v_frame = gr.Image(
                        label="The frame the model is seeing", interactive=False, height=220, elem_id="video-frame"
                    )
                    v_heat = gr.Image(
                        label="Heatmap of the latest step on that frame",
                        interactive=False,
                        height=220,
                        elem_id="video-heatmap",
                    )
                    with gr.Column():
                        v_ttft = gr.Markdown("**TTFT** –", elem_id="video-ttft")
                        v_delay = gr.Markdown("**Delay** –", elem_id="video-delay")
                        v_status = gr.Markdown(elem_id="video-status")
                with gr.Row():
                    v_steps = gr.Dataframe(
                        headers=vid.STEP_HEADERS,
                        label="Reasoning steps (stream time: the newest frame the step could see; said at: seconds "
                        "after the stream started; relied on: the frame it rested on most, and its best region "
                        "there). Click a step for its heatmap",
                        wrap=True,
                        elem_id="video-steps",
                        scale=3,
                    )
                    v_pick = gr.Image(
                        label="Heatmap of the step clicked", interactive=False, elem_id="video-pick", scale=1
                    )
                v_text = gr.Textbox(label="Reasoning (streams while frames arrive)", lines=4, elem_id="video-text")
                v_timeline = gr.Plot(label="Timeline: frames, steps and what each relied on", elem_id="video-timeline")
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
        [state, v_text, v_ttft, v_delay, v_status, v_frame, v_steps, v_heat, v_timeline],
        api_name="video",
        **model_limit,
    )
    v_ev.failure(_error_status("video"), [state], [v_status], api_visibility="private")
    v_stop.click(stop_video, [state], [v_status], api_name="video_stop", concurrency_limit=None)
    v_steps.select(video_step_heatmap, [state], [v_pick], api_visibility="private", concurrency_limit=None)
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
    """Run the TaYS engine on a file or the webcam; stream text, live TTFT / delay, the frame
    being seen and the steps with their stream times, and attribution while watching (the latest
    step's heatmap, the timeline, the frame each step relied on; `tays.watch`) (api_name="video").
    Yields (state, text, ttft, delay, status, frame, step table, heatmap, timeline)."""
    fps = ex.check_fps(fps)
    q = ex.check_question(question)
    with st.job("video"):
        if not ex.is_loaded(model_name):
            skip = gr.skip()
            status = readouts.loading_model(ex.model_label(model_name))
            yield st, skip, skip, skip, status, skip, skip, skip, skip
        vlm = ex.get_model(model_name)
        src = vid.TappedSource(_video_source(kind, file, fps, st))
        stop = threading.Event()
        st.video_stop = stop
        tokens: queue.Queue[TokenRecord] = queue.Queue()
        box: dict[str, Any] = {}
        estimator, attr_note = vid.video_estimator(vlm)
        att = StreamAttributor(estimator)
        wl = st.video_watch = vid.WatchLog(src.events, getattr(src, "speed", 1.0))

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
                    observer=att,
                    **run_options(vlm),
                )
            except BaseException as e:  # shown in the status line; the app keeps serving
                box["error"] = f"{type(e).__name__}: {e}"

        th = threading.Thread(target=work, name="app-video-run", daemon=True)
        t0 = time.perf_counter()
        th.start()
        log = st.video_log = vid.StepLog()
        first, latest, shown_t = None, None, None
        skip = gr.skip()
        try:
            while True:
                th.join(0.25)
                while True:
                    try:
                        rec = tokens.get_nowait()
                    except queue.Empty:
                        break
                    log.add(rec)
                    first = rec.wall if first is None else first
                    latest = rec.wall
                n_scored = len(wl.steps)
                while True:
                    try:
                        wl.add(att.events.get_nowait())
                    except queue.Empty:
                        break
                alive = th.is_alive()
                frame = src.last_frame()
                new_frame = frame is not None and frame[0] != shown_t
                shown_t = frame[0] if frame is not None else shown_t
                yield (
                    st,
                    log.text(),
                    readouts.ttft_markdown(first, time.perf_counter() - t0),
                    readouts.delay_markdown(latest, False),
                    readouts.video_running(fps, kind == "Webcam", time.perf_counter() - t0, shown_t),
                    frame[1] if new_frame else skip,
                    vid.step_table(log, wl)[0],
                    *(_watch_outputs(wl) if len(wl.steps) != n_scored or not alive else (skip, skip)),
                )
                if not alive:
                    break
            res = box.get("res")
            if res is None:
                msg = box.get("error", "the run ended without a result")
                yield (
                    st,
                    log.text(),
                    readouts.ttft_markdown(first, 0.0),
                    readouts.delay_markdown(latest, False),
                    f"**Error:** {msg}",
                    skip,
                    vid.step_table(log, wl)[0],
                    *_watch_outputs(wl),
                )
                return
            m = res.metrics
            yield (
                st,
                log.text(),
                readouts.ttft_markdown(m.get("ttft_question_s"), 0.0),
                readouts.delay_markdown(m.get("delay_s"), True),
                readouts.video_done(res) + f"; {attr_note}" + (f" ({wl.error})" if wl.error else ""),
                skip,
                vid.step_table(log, wl)[0],
                *_watch_outputs(wl),
            )
        finally:
            stop.set()
            if st.push is not None and kind == "Webcam":
                st.push.close()
            th.join(10.0)


def _watch_outputs(wl: vid.WatchLog) -> tuple[Any, go.Figure]:
    heat = wl.live_heatmap()
    return (heat if heat is not None else gr.skip(), wl.timeline())


@handler()
def video_step_heatmap(st: Session | None, evt: gr.SelectData, request: gr.Request = None) -> Any:
    """A click on a step row: that step's heatmap on the frame group it relied on most."""
    wl, log = st.video_watch, st.video_log
    if wl is None or log is None or evt is None:
        return gr.skip()
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    ids = vid.step_table(log, wl)[1]
    if not 0 <= int(row) < len(ids) or ids[int(row)] is None:
        return gr.skip()
    img = wl.heatmap(ids[int(row)])
    return img if img is not None else gr.skip()


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


def lab_tab(state: gr.State, policy: ModelPolicy, default_model: str, model_limit: dict[str, Any]) -> None:
    with gr.Tab("Estimator lab", id="lab"):
        gr.Markdown(
            "Run the cells top to bottom. Defaults are small so each step takes a minute or two on "
            "a CPU; the estimator you train or load here is used by this tab's Reasoning runs."
        )
        l_model = model_menu(policy, default_model, "Model", "lab-model")
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
                ["vstream", *sorted(m for m in METHODS if m != "vstream")],
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
                    label="file name (kept on the server under the saved-files caps, and offered for download)",
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
    """Cell 4a: save the session's estimator (under the saved-files caps) and offer it for download."""
    if st.lab_estimator is None:
        raise VLMError("No estimator in this session yet: train one first (cell 2).")
    base = safe_name(str(name or ""), ".safetensors", "lab-estimator")  # no paths from the web
    with tempfile.TemporaryDirectory(prefix="vstream-estimator-") as tmp:
        data = st.lab_estimator.save(Path(tmp) / base).read_bytes()
    path = SERVING.files.write(st.key, "estimators", base, data)
    return str(path), f"Saved `{path.name}`."


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
    """`runs`: the Reasoning tab's events after which a run joins the session's list."""
    annotate, show_records, export = annotation_handlers(db_path)
    with gr.Tab("Annotation", id="annotation"):
        gr.Markdown(
            "Mark each span's heatmap of any run of this tab: the latest, an earlier one, or a saved run "
            "you reopened (Reasoning tab, *Open a saved run*). Click the image to point at the region that "
            "should have lit up."
            + (" You are logged in: records are saved under your login name." if SERVING.logins else "")
        )
        with gr.Row():
            with gr.Column(scale=3):
                a_image = gr.Image(
                    label="Span heatmap (click the right region)", interactive=False, type="pil", elem_id="annot-image"
                )
            with gr.Column(scale=2):
                a_run = gr.Dropdown(choices=[], label="Run", elem_id="annot-run")
                a_name = gr.Textbox(
                    label="Annotator" + (" (your login is used)" if SERVING.logins else ""),
                    placeholder="your name",
                    elem_id="annot-name",
                )
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
    view = [a_image, a_info, a_span, a_run]
    for ev in runs:
        ev.then(annot_refresh, [state], view, api_visibility="private")
    a_run.input(annot_pick_run, [a_run, state], view, api_name="annotate_run")
    a_span.release(annot_span_changed, [a_span, state], view, api_visibility="private")
    a_image.select(annot_click, [a_span, state], view, api_visibility="private")
    a_ev = a_save.click(
        annotate, [a_name, a_span, a_verdict, a_note, state], [a_status, a_records], api_name="annotate"
    )
    a_ev.failure(_error_status("annot"), [state], [a_status], api_visibility="private")
    a_name.blur(show_records, [a_name, state], [a_records], api_visibility="private")
    a_jsonl.click(export_jsonl_of(export), [a_name, state], a_file, api_name="annotations_export")
    a_csv.click(export_csv_of(export), [a_name, state], a_file, api_name="annotations_export_csv")


def export_jsonl_of(export: Callable[..., str]) -> Callable[..., str]:
    def annotations_export(name: str, st: Session | None = None, request: gr.Request = None) -> str:
        """Your records as JSONL (everyone's: only for the admin login, with no name typed)."""
        return export("jsonl", name, st, request)

    return annotations_export


def export_csv_of(export: Callable[..., str]) -> Callable[..., str]:
    def annotations_export_csv(name: str, st: Session | None = None, request: gr.Request = None) -> str:
        """Your records as CSV (everyone's: only for the admin login, with no name typed)."""
        return export("csv", name, st, request)

    return annotations_export_csv


AnnotView = tuple[Image.Image | None, str, dict[str, Any], dict[str, Any]]  # overlay, text, span slider, run menu


def _annot_view(span: float, st: Session) -> AnnotView:
    """Show span `span` of the run being annotated (overlay, text, top regions)."""
    run = st.annot_run
    menu = gr.update(choices=[(v.title(), k) for k, v in reversed(st.runs.items())], value=run.run_id if run else None)
    if run is None or not run.spans:
        return None, readouts.NO_RUN_YET, gr.update(maximum=1, value=0), menu
    i = max(0, min(int(span or 0), len(run.spans) - 1))
    region = run.region_at(st.point) if st.point else None
    return (
        run.overlay(i, st.point),
        readouts.span_info(run, i, region),
        gr.update(maximum=max(1, len(run.spans) - 1), value=i),
        menu,
    )


@handler()
def annot_refresh(st: Session | None, request: gr.Request = None) -> AnnotView:
    """After a run (or a reopened file): reset the click and show its first span."""
    st.point = None
    return _annot_view(0, st)


@handler(VLMError)
def annot_pick_run(run_id: str, st: Session | None = None, request: gr.Request = None) -> AnnotView:
    """Annotate another of this tab's runs (api_name="annotate_run")."""
    view = st.runs.get(str(run_id or ""))
    if view is None:
        raise VLMError("That run is not in this tab: run it, or open its saved file in the Reasoning tab.")
    st.annot_run, st.point = view, None
    return _annot_view(0, st)


@handler()
def annot_click(span: float, st: Session | None, evt: gr.SelectData, request: gr.Request = None) -> AnnotView:
    run = st.annot_run
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
    page is built. The store opens on first use, so a bad path shows in the tab.

    Whose records a visitor sees and exports: with logins, their own login's (the admin login
    may export everyone's); without logins, only the rows this browser session saved, whatever
    name is typed, so nobody can read another annotator's work by typing their name."""

    def records(ident: Identity, st: Session) -> list[list[Any]]:
        store = shared_store(db_path)
        if ident.username:
            return readouts.record_rows(store.records(annotator=ident.username, latest_only=True))
        return readouts.record_rows(store.records(ids=st.annotation_ids, latest_only=True))

    @handler(VLMError, AnnotationError, ValueError, status="annot")
    def annotate(
        name: str, span: float, verdict: str, note: str, st: Session | None = None, request: gr.Request = None
    ) -> tuple[str, list[list[Any]]]:
        """Save one verdict for a span of the run chosen in the tab (default: the latest)
        (api_name="annotate")."""
        ident = _identity(request)
        who = ident.annotator(name)
        if not who:
            raise VLMError("Type your annotator name first.")
        run = st.annot_run
        if run is None or not run.spans:
            raise VLMError("Nothing to annotate yet: run the model in the Reasoning tab first (or open a saved run).")
        i = ex.as_number(span if span is not None else 0, int)
        if not 0 <= i < len(run.spans):
            raise VLMError(f"span {i} does not exist (this run has {len(run.spans)})")
        if not verdict:
            raise VLMError("Pick a verdict: grounded, wrong region or not visual.")
        if len(st.annotation_ids) >= SERVING.annotations_per_session:
            raise VLMError(
                f"This session has saved {SERVING.annotations_per_session} verdicts, the most this server allows "
                "per session: open the page again to go on."
            )
        if _store_bytes(db_path) >= SERVING.annotations_max_bytes:
            raise VLMError("The annotation store is full: ask the operator to export and archive it.")
        point = st.point
        region = run.region_at(point) if point else None
        rid = shared_store(db_path).add(
            who,
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
        st.annotation_ids.append(rid)
        where = f" at region {region}" if region is not None else ""
        return f"Saved #{rid}: span {i} of run {run.run_id} is {verdict}{where}.", records(ident, st)

    @handler(VLMError, ValueError)  # AnnotationError is a ValueError
    def show_records(name: str, st: Session | None = None, request: gr.Request = None) -> list[list[Any]]:
        return records(_identity(request), st)

    @handler(VLMError, OSError, ValueError)
    def export(fmt: str, name: str = "", st: Session | None = None, request: gr.Request = None) -> str:
        """Download records as JSONL or CSV: your own; everyone's (or a named annotator's) only
        for the admin login."""
        store = shared_store(db_path)
        ident = _identity(request)
        typed = str(name or "").strip()
        kw: dict[str, Any]
        if ident.is_admin:
            kw = {"annotator": typed or None}
        elif ident.username:
            kw = {"annotator": ident.username}
        else:
            if not st.annotation_ids:
                raise VLMError("Nothing to export: this session has saved no verdicts yet.")
            kw = {"ids": list(st.annotation_ids)}
        out = Path(tempfile.mkdtemp(prefix="vstream-annotations-")) / f"annotations.{fmt}"
        (store.export_jsonl if fmt == "jsonl" else store.export_csv)(out, **kw)
        return str(out)

    return annotate, show_records, export


def _store_bytes(db_path: str) -> int:
    """The annotation store's size on disk, its write-ahead log included."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(db_path + suffix)
    return total


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
    ap.add_argument(
        "--model",
        default=env("VSTREAM_MODEL"),
        help="the default model of the Reasoning and lab tabs (env VSTREAM_MODEL; default: the first of --models)",
    )
    ap.add_argument(
        "--video-model",
        default=env("TAYS_MODEL", ex.default_video_model()),
        help="the Video tab's model (env TAYS_MODEL; default: assets/tays-model if shipped)",
    )
    ap.add_argument(
        "--models",
        default=env("VSTREAM_MODELS"),
        help="comma-separated models a visitor may pick, folders or hub ids (env VSTREAM_MODELS; default: the "
        "shipped demo and TaYS models); --model and --video-model are always on the list",
    )
    ap.add_argument(
        "--allow-any-model",
        action="store_true",
        default=env("VSTREAM_ALLOW_ANY_MODEL") == "1",
        help="also load any folder or hub id a visitor types (a local lab only: it lets visitors read the "
        "server's disk and download models; env VSTREAM_ALLOW_ANY_MODEL=1)",
    )
    ap.add_argument(
        "--auth",
        default=env("VSTREAM_AUTH"),
        help="logins: user:pass[,user2:pass2] (env VSTREAM_AUTH); annotations are saved under the login name",
    )
    ap.add_argument(
        "--admin",
        default=env("VSTREAM_ADMIN"),
        help="the --auth user who may export everyone's annotation records (env VSTREAM_ADMIN)",
    )
    ap.add_argument(
        "--annotations",
        default=env("VSTREAM_ANNOTATIONS", DEFAULT_ANNOTATIONS),
        help="SQLite file of the annotation store (env VSTREAM_ANNOTATIONS)",
    )
    ap.add_argument(
        "--runs-dir",
        default=env("VSTREAM_RUNS_DIR", DEFAULT_RUNS_DIR),
        help="where saved runs, reports and lab estimators go (env VSTREAM_RUNS_DIR)",
    )
    ap.add_argument(
        "--files-per-session",
        type=int,
        default=int(env("VSTREAM_FILES_PER_SESSION", "20")),
        help="saved runs, reports and estimators one browser session may write (env VSTREAM_FILES_PER_SESSION)",
    )
    ap.add_argument(
        "--files-max-mb",
        type=float,
        default=float(env("VSTREAM_FILES_MAX_MB", "512")),
        help="the most --runs-dir may hold, in MB; saving stops there (env VSTREAM_FILES_MAX_MB)",
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
    models = parse_models(args.models) or ex.shipped_models()
    default_model = args.model or models[0]
    if default_model == str(DEMO_MODEL_DIR) and not Path(default_model).exists():
        raise SystemExit(
            f"error: the demo model is missing at {DEMO_MODEL_DIR}; train it with python -m vstream train-demo"
        )
    if args.concurrency < 1:
        raise SystemExit("error: --concurrency must be at least 1")
    if args.files_per_session < 0 or args.files_max_mb < 0:
        raise SystemExit("error: --files-per-session and --files-max-mb must not be negative")
    auth = parse_auth(args.auth)
    try:
        admin = check_admin(args.admin, [u for u, _ in auth or []])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    demo = build_ui(
        default_model,
        args.annotations,
        args.concurrency,
        args.video_model,
        models=models,
        allow_any_model=args.allow_any_model,
        admin=admin,
        logins=bool(auth),
        runs_dir=args.runs_dir,
        files_per_session=args.files_per_session,
        files_max_mb=args.files_max_mb,
    )
    threading.Thread(
        target=ex.warm_up, args=(default_model, args.video_model), name="vstream-warm-up", daemon=True
    ).start()
    stop_on_signals()
    try:
        demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue).launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            auth_message="Log in with the account you were given." if auth else None,
            css=CSS,
            max_file_size=MAX_UPLOAD,
        )
    except KeyboardInterrupt:
        pass
    finally:
        shut_down(demo)


def stop_on_signals() -> None:
    """SIGTERM (a service manager, `docker stop`) ends the app like Ctrl-C does: through
    KeyboardInterrupt in the main thread, so `shut_down` runs and nothing prints a traceback."""

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal while shutting down: ignore
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def shut_down(demo: gr.Blocks) -> None:
    """Stop serving, end every tab's generation, video run and webcam feed (joining their
    threads), then the TaYS ingestion server and its worker processes. Annotations need nothing:
    every acknowledged one is already committed (`ui.annotations`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        demo.close()
    close_all_sessions()
    with contextlib.suppress(Exception):
        shutdown_server()
    print("Stopped.", file=sys.stderr)


if __name__ == "__main__":
    main()
