"""Safe to publish: what a visitor of the page can and cannot make the server do.

* models: only the operator's list (`--models`); traversal, absolute paths, symlinks and hub ids
  get the one "not available" message, before anything touches the disk or the network; with
  `--allow-any-model` a missing path and a folder without a config still read the same;
* saved files: names are made by the server, each session and the whole folder are capped;
* annotation records: without logins a visitor reads and exports only what their own session
  saved; with logins, their own login's; everyone's only for the `--admin` login;
* the HTTP side (slow): a file path the visitor did not upload is refused by the page.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from ui import explorer as ex
from ui.access import Identity, ModelPolicy, check_admin, not_available
from ui.storage import QuotaError, SavedFiles, safe_name
from vstream.model import VLMError
from vstream.world.assets import DEMO_MODEL_DIR, ROOT

ALLOWED = str(DEMO_MODEL_DIR)


@pytest.fixture
def policy(monkeypatch):
    """The server's list is the demo model only; `load_vlm` records every load it is asked for."""
    loads: list[str] = []
    monkeypatch.setattr(ex, "POLICY", ModelPolicy.of([ALLOWED], root=ROOT))
    monkeypatch.setattr(ex, "load_vlm", lambda name: loads.append(name) or types.SimpleNamespace(name=name))
    ex.forget_models()
    yield loads
    ex.forget_models()


def _refusals(tmp_path: Path) -> list[str]:
    link = tmp_path / "link-to-demo"
    link.symlink_to(DEMO_MODEL_DIR, target_is_directory=True)
    return [
        "assets/../assets/demo-model",  # traversal to an allowed folder, spelled differently
        "../../etc",
        "/etc",
        "/",
        str(tmp_path),  # a folder that exists
        str(tmp_path / "missing"),  # one that does not
        str(link),  # a symlink to the allowed model
        "Qwen/Qwen2.5-VL-7B-Instruct",  # a hub id
        "no-such-org/no-such-model",
        "~root",
        "C:\\Windows",
        "x" * 5000,
        "assets/demo-model\x00",
    ]


def test_only_listed_models_load_and_refusals_read_the_same(policy, tmp_path):
    for name in _refusals(tmp_path):
        with pytest.raises(VLMError) as err:
            ex.get_model(name)
        msg = str(err.value)
        assert msg == not_available(name), msg
        assert "\n" not in msg and len(msg) < 200
    assert policy == []  # nothing was loaded for any of them
    ex.get_model("")  # the default, its shown name and its full name are the same model
    ex.get_model("assets/demo-model")
    ex.get_model(ALLOWED)
    assert policy == [ALLOWED]  # one key: loaded once, shared


def test_refusal_never_touches_the_disk(policy, monkeypatch, tmp_path):
    names = _refusals(tmp_path)

    def no_disk(*a, **k):
        raise AssertionError("the disk was probed for a visitor's model name")

    for fn in ("exists", "is_dir", "is_file", "stat", "resolve", "iterdir"):
        monkeypatch.setattr(Path, fn, no_disk)
    monkeypatch.setattr(os, "stat", no_disk)
    monkeypatch.setattr(os.path, "exists", no_disk)
    for name in names:
        with pytest.raises(VLMError, match="not available"):
            ex.model_key(name)


def test_allow_any_model_still_says_one_thing(monkeypatch, tmp_path):
    """A local lab's opt-in: typed names load, but a missing path, a folder without a config and
    a file all read the same, so the page still cannot map the disk."""
    monkeypatch.setattr(ex, "POLICY", ModelPolicy.of([ALLOWED], allow_any=True))
    ex.forget_models()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    msgs = set()
    for name in (tmp_path / "missing", tmp_path / "empty", tmp_path / "file.txt"):
        with pytest.raises(VLMError) as err:
            ex.get_model(str(name))
        msgs.add(str(err.value).replace(str(name), "NAME"))
    assert len(msgs) == 1, msgs


def test_menu_shows_names_not_server_paths():
    p = ModelPolicy.of([ALLOWED, "Qwen/Qwen2.5-VL-3B-Instruct"], root=ROOT)
    assert p.choices() == [("assets/demo-model", "assets/demo-model"), ("Qwen/Qwen2.5-VL-3B-Instruct",) * 2]
    assert p.resolve("assets/demo-model") == ALLOWED and p.resolve("") == ALLOWED


# --------------------------------------------------------------------------- saved files


def test_saved_file_names_are_made_by_the_server(tmp_path):
    for bad in ("../../etc/passwd", "/abs/path.json", "..", ".hidden", "a/b\\c", "\x00", ""):
        name = safe_name(bad, ".json", "run")
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".json")
    files = SavedFiles(tmp_path / "runs")
    p = files.write("s1", "runs", safe_name("../../x", ".json", "run"), b"{}")
    assert p.resolve().is_relative_to((tmp_path / "runs").resolve())
    with pytest.raises(ValueError):
        files.write("s1", "runs", "../escape.json", b"{}")
    with pytest.raises(ValueError):
        files.write("s1", "../x", "a.json", b"{}")


def test_caps_per_session_per_file_and_for_everyone(tmp_path):
    files = SavedFiles(tmp_path / "runs", per_session=3, max_bytes=10_000, max_file=4_000)
    for _ in range(3):
        files.write("a", "runs", "r.json", b"x" * 1000)
    with pytest.raises(QuotaError, match="per session"):
        files.write("a", "runs", "r.json", b"x")
    with pytest.raises(QuotaError, match="limit"):
        files.write("b", "runs", "r.json", b"x" * 5000)
    files.write("b", "runs", "r.json", b"x" * 3500)
    files.write("c", "runs", "r.json", b"x" * 3000)
    with pytest.raises(QuotaError, match="full"):  # 9,500 bytes held: the folder cap, whoever asks
        files.write("d", "runs", "r.json", b"x" * 1000)
    assert files.used_bytes() <= 10_000
    assert len(list((tmp_path / "runs").rglob("*"))) == 6  # the folder + five files; nothing partial left


# --------------------------------------------------------------------------- annotation records


def _req(user: str | None = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(username=user, session_hash=None)


@pytest.fixture
def annot(tmp_path, monkeypatch):
    """The Annotation tab's handlers on a temp store, with one run shown in each of two sessions."""
    import numpy as np
    import torch
    from PIL import Image

    import app
    from vstream.attr.record import RunRecord, SpanRecord
    from vstream.attr.regions import Regions

    def session(run_id: str) -> app.Session:
        rec = RunRecord(run_id, "assets/demo-model", "q?", Image.new("RGB", (28, 28)))
        rec.regions = Regions(np.zeros((2, 2), dtype=np.int64), torch.ones(1, 4), (2, 2), (28, 28))
        rec.image_size = (28, 28)
        rec.spans = [SpanRecord(0, "thought", "A span.", 0, 2, np.zeros(1, np.float32), [0])]
        st = app.Session()
        st.add_run(ex.RunView(rec))
        return st

    monkeypatch.setattr(app.SERVING, "admin", None)
    annotate, show, export = app.annotation_handlers(str(tmp_path / "a.db"))
    return app, annotate, show, export, session("run-a"), session("run-b")


def test_without_logins_a_visitor_sees_and_exports_only_their_own(annot):
    app, annotate, show, export, a, b = annot
    annotate("alice", 0, "grounded", "", a, _req())
    annotate("bob", 0, "not_visual", "", b, _req())
    rows = show("bob", a, _req())  # alice's session typing bob's name sees only her own rows
    assert [r[0] for r in rows] == ["run-a"]
    text = Path(export("jsonl", "bob", a, _req())).read_text()
    assert "alice" in text and "bob" not in text
    text = Path(export("csv", "", a, _req())).read_text()  # no name: still only her own, not the store
    assert "alice" in text and "bob" not in text
    fresh = app.Session()
    with pytest.raises(Exception, match="Nothing to export"):
        export("jsonl", "", fresh, _req())


def test_with_logins_the_login_is_the_annotator_and_only_admin_exports_all(annot, monkeypatch):
    app, annotate, show, export, a, b = annot
    monkeypatch.setattr(app.SERVING, "admin", "boss")
    annotate("someone-else", 0, "grounded", "", a, _req("ann1"))  # the typed name is ignored
    annotate("", 0, "wrong_region", "", b, _req("ann2"))
    text = Path(export("jsonl", "ann2", a, _req("ann1"))).read_text()
    assert '"ann1"' in text and "ann2" not in text and "someone-else" not in text
    everything = Path(export("jsonl", "", a, _req("boss"))).read_text()
    assert '"ann1"' in everything and '"ann2"' in everything
    only = Path(export("csv", "ann2", a, _req("boss"))).read_text()
    assert "ann2" in only and "ann1" not in only


def test_admin_must_be_a_login():
    assert check_admin(None, []) is None
    assert check_admin("boss", ["boss", "ann"]) == "boss"
    with pytest.raises(ValueError, match="--auth"):
        check_admin("boss", [])
    assert not Identity(None, "boss").is_admin and not Identity("ann", "boss").is_admin
    assert Identity("boss", "boss").is_admin and Identity("ann", None).annotator("typed") == "ann"


def test_cli_refuses_an_admin_without_login():
    import app

    with pytest.raises(SystemExit, match="--admin"):
        app.main(["--admin", "boss", "--port", "1"])


def test_annotation_caps(annot, monkeypatch):
    app, annotate, show, export, a, b = annot
    monkeypatch.setattr(app.SERVING, "annotations_per_session", 2)
    annotate("alice", 0, "grounded", "", a, _req())
    annotate("alice", 0, "not_visual", "", a, _req())
    with pytest.raises(Exception, match="per session"):
        annotate("alice", 0, "grounded", "", a, _req())
    monkeypatch.setattr(app.SERVING, "annotations_max_bytes", 1)
    with pytest.raises(Exception, match="store is full"):
        annotate("bob", 0, "grounded", "", b, _req())
    assert [r[0] for r in show("", b, _req())] == []  # nothing was written for bob


def test_a_model_loading_does_not_hold_up_sessions_on_a_loaded_one(monkeypatch):
    """A large model loading for one visitor blocks only requests for that model; a model that is
    already in memory is handed out at once, and a first use is visible (is_loaded)."""
    import threading
    import time

    slow, fast = "org/slow-model", "org/fast-model"
    monkeypatch.setattr(ex, "POLICY", ModelPolicy.of([slow, fast]))
    release, started = threading.Event(), threading.Event()
    loads: list[str] = []

    def fake_load(name):
        loads.append(name)
        if name == slow:
            started.set()
            release.wait(10)
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(ex, "load_vlm", fake_load)
    ex.forget_models()
    try:
        assert ex.get_model(fast).name == fast and ex.is_loaded(fast) and not ex.is_loaded(slow)
        t = threading.Thread(target=ex.get_model, args=(slow,))
        t.start()
        assert started.wait(5)
        t0 = time.perf_counter()
        assert ex.get_model(fast).name == fast  # while the slow one is still loading
        assert time.perf_counter() - t0 < 1.0
        release.set()
        t.join(5)
        assert ex.is_loaded(slow) and loads == [fast, slow]  # each loaded once
    finally:
        release.set()
        ex.forget_models()
