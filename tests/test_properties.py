"""Property tests (hypothesis) of every input check a visitor can reach: questions, images,
videos, run files, model names and the numbers of the lab and video forms.

The property, each time: the check returns a valid value or raises its one-line error type
(VLMError, StreamError, RunFileError); and through the page's handlers the only exception that
leaves is `gr.Error` (a message in the page), never anything that would print a traceback.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from tays import StreamError, VideoFileSource
from ui import explorer as ex
from vstream.attr.record import RunFileError, RunRecord
from vstream.model import VLMError

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


def _one_line(e: BaseException) -> None:
    assert str(e) and "\n" not in str(e) and "Traceback" not in str(e), repr(e)


# --------------------------------------------------------------------------- questions


@FAST
@given(st.one_of(st.text(max_size=3000), st.none(), st.integers(), st.binary(max_size=50), json_values))
def test_question_check(q):
    try:
        out = ex.check_question(q)
    except VLMError as e:
        _one_line(e)
        return
    assert out == out.strip() and 0 < len(out) <= ex.MAX_QUESTION_CHARS


# --------------------------------------------------------------------------- images


@FAST
@given(st.binary(max_size=2000))
def test_image_bytes(data):
    try:
        img = ex.load_image(data)
    except VLMError as e:
        _one_line(e)
        return
    assert img.mode == "RGB" and min(img.size) >= 28


@FAST
@given(st.binary(max_size=400))
def test_image_files_that_look_like_png(tmp_path_factory, tail):
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + tail)
    with pytest.raises(VLMError) as err:
        ex.load_image(str(path))
    _one_line(err.value)


@FAST
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.bool_, np.int32, np.int64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=40),
    )
)
def test_image_arrays(arr):
    try:
        img = ex.load_image(arr)
    except VLMError as e:
        _one_line(e)
        return
    assert img.mode == "RGB" and min(img.size) >= 28


@FAST
@given(
    st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"]),
    st.integers(1, 300),
    st.integers(1, 300),
)
def test_image_modes_and_sizes(mode, w, h):
    img = Image.new(mode, (w, h))
    try:
        out = ex.load_image(img)
    except VLMError as e:
        _one_line(e)
        return
    assert out.mode == "RGB" and min(out.size) >= 28


# --------------------------------------------------------------------------- videos


@SLOWER
@given(st.binary(max_size=3000), st.sampled_from([b"", b"\x00\x00\x00\x18ftypmp42", b"\x1aE\xdf\xa3", b"RIFF"]))
def test_video_files(tmp_path_factory, data, head):
    path = tmp_path_factory.mktemp("vid") / "x.mp4"
    path.write_bytes(head + data)
    try:
        VideoFileSource(str(path), fps=2).close()
    except StreamError as e:
        _one_line(e)


@FAST
@given(
    st.one_of(
        st.floats(),
        st.sampled_from([float("inf"), float("-inf"), float("nan")]),
        st.integers(),
        st.text(max_size=10),
        st.none(),
    )
)
def test_fps_and_number_fields(v):
    for check in (ex.check_fps, lambda x: ex.as_number(x, int), lambda x: ex.as_number(x, float)):
        try:
            check(v)
        except VLMError as e:
            _one_line(e)
        except OverflowError:  # int(inf): as_number must not let this out
            pytest.fail(f"{v!r} raised OverflowError")


# --------------------------------------------------------------------------- run files


def _valid_record() -> dict:
    """A small, valid run (no model needed): 2x2 regions, two spans."""
    import torch

    from vstream.attr.record import SpanRecord
    from vstream.attr.regions import Regions

    rec = RunRecord.new("assets/demo-model", "What is it?", Image.new("RGB", (56, 56), (200, 10, 10)))
    rec.regions = Regions(np.array([[0, 1], [1, 1]]), torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 1]]), (2, 2), (56, 56))
    rec.image_size = (56, 56)
    rec.tokens = ["A", " b.", " C", "."]
    rec.token_ids = [1, 2, 3, 4]
    scores = np.array([0.5, -0.2], np.float32)
    rec.spans = [
        SpanRecord(0, "thought", "A b.", 0, 2, scores, [0, 1], methods={"vstream": {"scores": scores, "ms": 0.1}}),
        SpanRecord(1, "answer", "C.", 2, 4, -scores, [1, 0], methods={"raw_attention": {"scores": scores, "ms": 0}}),
    ]
    rec.path = np.zeros((2, 3))
    return json.loads(rec.to_json())


VALID = _valid_record()


def test_the_valid_record_parses():
    assert RunRecord.from_dict(copy.deepcopy(VALID)).to_dict() == VALID


@FAST
@given(st.binary(max_size=3000))
def test_run_file_bytes(data):
    with pytest.raises(RunFileError) as err:
        RunRecord.from_bytes(data)
    _one_line(err.value)


@FAST
@given(json_values)
def test_run_file_any_json(value):
    with pytest.raises(RunFileError) as err:
        RunRecord.from_dict(value)
    _one_line(err.value)


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:4]):
            yield from _paths(v, (*prefix, i))


PATHS = [p for p in _paths(VALID) if p]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), json_values | st.integers(-(2**70), 2**70) | st.floats())
def test_run_file_one_field_changed(path, value):
    d = copy.deepcopy(VALID)
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        rec = RunRecord.from_dict(d)
    except RunFileError as e:
        _one_line(e)
        return
    # whatever was accepted is a consistent run: it re-serialises and reparses to itself
    again = RunRecord.from_dict(json.loads(rec.to_json()))
    assert again.to_dict() == rec.to_dict()
    for s in rec.spans:
        assert s.scores.shape == (rec.k,) and all(0 <= r < rec.k for r in s.top_regions)


# --------------------------------------------------------------------------- through the page's handlers


@pytest.fixture(scope="module")
def app_module():
    import app

    app.build_ui(annotations=None)
    return app


@SLOWER
@given(data=st.binary(max_size=2000) | st.just(json.dumps(VALID).encode()))
def test_open_run_handler_only_says_gr_error(app_module, tmp_path_factory, data):
    import gradio as gr

    path = tmp_path_factory.mktemp("run") / "run.json"
    path.write_bytes(data)
    s = app_module.Session()
    try:
        out = app_module.open_run(str(path), s, None)
    except gr.Error as e:
        _one_line(e)
        return
    assert out[5]["run_id"] == VALID["run_id"]


@FAST
@given(
    q=st.text(max_size=3000) | st.none(),
    image=st.none() | st.binary(max_size=300) | st.just(""),
    model=st.text(max_size=300),
)
def test_attribute_handler_refuses_bad_input_with_a_message(app_module, q, image, model):
    """Bad image, bad question or a model not on the list: a gr.Error before any model runs."""
    import gradio as gr

    valid_q = q is not None and 0 < len(q.strip()) <= ex.MAX_QUESTION_CHARS
    valid_img = False
    if isinstance(image, bytes) and image:
        try:
            ex.load_image(image)
            valid_img = True
        except VLMError:
            pass
    assume(not (valid_q and valid_img and ex.POLICY.is_listed(model)))  # those would run the model
    s = app_module.Session()
    with pytest.raises(gr.Error) as err:
        list(app_module.attribute(image, q, model, s, None))
    _one_line(err.value)


@FAST
@given(v=json_values | st.floats())
def test_span_picker_handler(app_module, v):
    import gradio as gr

    s = app_module.Session()
    try:
        app_module.select_span(v, s, None)
    except gr.Error as e:
        _one_line(e)


def test_a_png_round_trips_through_the_checks():
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), (1, 2, 3)).save(buf, format="PNG")
    assert ex.load_image(buf.getvalue()).size[0] >= 28
