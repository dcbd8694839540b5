"""The annotation store: what a user is promised (nothing acknowledged is ever lost, annotators
never overwrite each other, bad input is refused clearly) checked by behaviour, including real
concurrent processes and a SIGKILLed writer."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ui.annotations import VERDICTS, AnnotationError, AnnotationStore  # noqa: E402


@pytest.fixture()
def store(tmp_path) -> AnnotationStore:
    return AnnotationStore(tmp_path / "nested" / "dir" / "ann.db")


def _add_many(path: str, annotator: str, n: int) -> list[int]:
    """Worker for the multi-process test (top level so the spawn context can import it)."""
    s = AnnotationStore(path)
    return [s.add(annotator, "run-c", i, VERDICTS[i % 3], note=f"{annotator}:{i}") for i in range(n)]


# ---------------------------------------------------------------------------- basics


def test_round_trip_and_schema(store):
    assert store.path.parent.is_dir() and store.count() == 0
    rid = store.add(
        "  Alice ",
        "run-1",
        2,
        "wrong_region",
        span_text="The red square is left.",
        region=4,
        point=(0.25, 1.0),
        model="demo",
        image_ref="scene:7",
        note="off by one",
    )
    assert isinstance(rid, int)
    (rec,) = store.records()
    assert rec["id"] == rid and rec["annotator"] == "Alice"  # stripped
    assert (rec["run_id"], rec["span_index"], rec["verdict"], rec["region"]) == ("run-1", 2, "wrong_region", 4)
    assert rec["point"] == (0.25, 1.0)
    assert (rec["span_text"], rec["model"], rec["image_ref"], rec["note"]) == (
        "The red square is left.",
        "demo",
        "scene:7",
        "off by one",
    )
    assert rec["created_at"].endswith("+00:00")  # UTC ISO timestamp
    rid2 = store.add("bob", "run-1", 0, "not_visual")
    rec2 = store.records(annotator="bob")[0]
    assert rec2["id"] == rid2 and rec2["point"] is None and rec2["region"] is None and rec2["note"] == ""

    con = sqlite3.connect(store.path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_every_connection_is_durable_and_patient(store):
    """synchronous is per connection, so each call's connection must set it (FULL = 2)."""
    with store._connect() as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert con.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopen_keeps_records(tmp_path):
    path = tmp_path / "ann.db"
    s1 = AnnotationStore(path)
    ids = [s1.add("a", "r", i, "grounded", note=str(i)) for i in range(5)]
    before = s1.records()
    del s1
    s2 = AnnotationStore(str(path))  # str or Path
    assert s2.records() == before and [r["id"] for r in before] == ids
    assert s2.add("a", "r", 0, "not_visual") > max(ids)
    assert s2.count() == 6


def test_filters_and_latest_only(store):
    store.add("alice", "r1", 0, "grounded")
    store.add("alice", "r1", 1, "grounded")
    store.add("bob", "r1", 0, "not_visual")
    remark = store.add("alice", "r1", 0, "wrong_region", point=(0.1, 0.9))  # a re-mark: new row
    store.add("alice", "r2", 0, "grounded")
    assert store.count() == 5  # append-only: nothing replaced

    latest = store.records(latest_only=True)
    keyed = {(r["annotator"], r["run_id"], r["span_index"]): r for r in latest}
    assert len(latest) == len(keyed) == 4
    assert keyed[("alice", "r1", 0)]["id"] == remark and keyed[("alice", "r1", 0)]["verdict"] == "wrong_region"
    assert keyed[("bob", "r1", 0)]["verdict"] == "not_visual"  # bob untouched by alice's re-mark

    assert [r["verdict"] for r in store.records(annotator="alice", run_id="r1")] == [
        "grounded",
        "grounded",
        "wrong_region",
    ]
    assert len(store.records(annotator="alice", run_id="r1", latest_only=True)) == 2
    assert [r["annotator"] for r in store.records(run_id="r1", latest_only=True)] == ["alice", "bob", "alice"]
    assert store.records(annotator="nobody") == []


# ---------------------------------------------------------------------------- validation

GOOD = dict(annotator="alice", run_id="run-1", span_index=0, verdict="grounded")


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(annotator=""), "annotator is empty"),
        (dict(annotator="   \t"), "annotator is empty"),
        (dict(annotator=None), "annotator is empty"),
        (dict(annotator=42), "annotator must be text"),
        (dict(annotator="x" * 81), "annotator is too long"),
        (dict(annotator="a\nb"), "single line"),
        (dict(run_id=" "), "run_id is empty"),
        (dict(run_id=b"run"), "run_id must be text"),
        (dict(span_index=-1), "span_index must be 0 or more"),
        (dict(span_index="3"), "span_index must be a whole number"),
        (dict(span_index=1.0), "span_index must be a whole number"),
        (dict(span_index=True), "span_index must be a whole number"),
        (dict(span_index=2**70), "span_index is too large"),
        (dict(verdict="maybe"), "unknown verdict"),
        (dict(verdict=None), "verdict must be one of"),
        (dict(region=1.5), "region must be a whole number"),
        (dict(region="2"), "region must be a whole number"),
        (dict(region=-3), "region must be 0 or more"),
        (dict(point=(0.5,)), "point must be two numbers"),
        (dict(point=(0.1, 0.2, 0.3)), "point must be two numbers"),
        (dict(point="0.5,0.5"), "point must be two numbers"),
        (dict(point=(float("nan"), 0.5)), "point must be two numbers"),
        (dict(point=(0.5, float("inf"))), "point must be two numbers"),
        (dict(point=(1.5, 0.5)), "between 0 and 1"),
        (dict(point=(-0.1, 0.5)), "between 0 and 1"),
        (dict(point=("a", 0.5)), "point must be two numbers"),
        (dict(point=(True, 0.5)), "point must be two numbers"),
        (dict(note="n" * 10_001), "note is too long"),
        (dict(span_text="s" * 10_001), "span_text is too long"),
        (dict(note="bad\x00nul"), "NUL"),
        (dict(note="\ud800 lone surrogate"), "not valid Unicode"),
        (dict(model=["m"]), "model must be text"),
    ],
)
def test_bad_input_is_refused_clearly_and_saves_nothing(store, change, words):
    store.add(**GOOD, note="kept")
    kwargs = {**GOOD, **change}
    with pytest.raises(AnnotationError) as err:
        store.add(**kwargs)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and len(msg) < 300
    assert isinstance(err.value, ValueError)
    assert [r["note"] for r in store.records()] == ["kept"]  # nothing else written, old row intact
    assert store.add(**GOOD) > 0  # the store keeps working


def test_limits_and_friendly_normalisation_are_accepted(store):
    store.add("x" * 80, "r", 0, "Wrong Region", note="n" * 10_000, span_text="s" * 10_000, point=[0, 1], region=0)
    store.add("y", "r", 3, " not-visual ", point=(0.0, 0.0))
    recs = store.records()
    assert [r["verdict"] for r in recs] == ["wrong_region", "not_visual"]
    assert recs[0]["point"] == (0.0, 1.0) and len(recs[0]["note"]) == 10_000 and recs[0]["region"] == 0
    rid = store.add("z", "r", 0, "grounded", note="multi\nline\tnote")  # notes may span lines
    assert store.records(annotator="z")[0]["note"] == "multi\nline\tnote" and rid


def test_bad_filter_arguments(store):
    with pytest.raises(AnnotationError, match="annotator must be text"):
        store.records(annotator=3)
    with pytest.raises(AnnotationError, match="run_id is empty"):
        store.records(run_id="  ")


# ---------------------------------------------------------------------------- files that are not ours


def test_non_sqlite_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "notes.db"
    data = b"these are my precious notes, not a database\n" * 50
    path.write_bytes(data)
    with pytest.raises(AnnotationError) as err:
        AnnotationStore(path)
    assert str(path) in str(err.value) and "not a SQLite database" in str(err.value)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no -wal / -shm created


def test_other_apps_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    con.execute("INSERT INTO invoices (total) VALUES (9.5)")
    con.commit()
    con.close()
    data = path.read_bytes()
    with pytest.raises(AnnotationError, match="another application"):
        AnnotationStore(path)
    assert path.read_bytes() == data


def test_corrupt_store_gives_clear_error(tmp_path):
    path = tmp_path / "ann.db"
    s = AnnotationStore(path)
    for i in range(20):
        s.add("a", "r", i, "grounded", note="x" * 500)
    del s
    raw = bytearray(path.read_bytes())
    raw[100:4096] = b"\xff" * (4096 - 100)  # smash the schema page, keep the SQLite header
    path.write_bytes(bytes(raw))
    with pytest.raises(AnnotationError) as err:
        AnnotationStore(path)
    assert str(path) in str(err.value) and "corrupt" in str(err.value)
    assert path.read_bytes() == bytes(raw)


def test_directory_path_and_empty_path(tmp_path):
    with pytest.raises(AnnotationError, match="is a directory"):
        AnnotationStore(tmp_path)
    with pytest.raises(AnnotationError, match="non-empty file path"):
        AnnotationStore("  ")
    with pytest.raises(AnnotationError, match="non-empty file path"):
        AnnotationStore(None)  # type: ignore[arg-type]


def test_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "ann.db"
    path.touch()
    s = AnnotationStore(path)
    assert s.add("a", "r", 0, "grounded") == 1 and s.count() == 1


# ---------------------------------------------------------------------------- export


def _fill(store: AnnotationStore) -> None:
    store.add(
        "alice",
        "r1",
        0,
        "grounded",
        point=(0.5, 0.25),
        region=2,
        note='says "hi", then\nleaves',
        span_text="The cube, é ü 日本, is red.",
        model="m",
        image_ref="img.png",
    )
    store.add("bob", "r1", 0, "not_visual")
    store.add("alice", "r1", 0, "wrong_region", note="=SUM(A1)")  # re-mark


def test_export_jsonl(store, tmp_path):
    _fill(store)
    out = tmp_path / "exports" / "ann.jsonl"  # parent does not exist yet
    assert store.export_jsonl(out) == 3
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert rows[0]["point"] == [0.5, 0.25] and rows[0]["region"] == 2
    assert rows[0]["note"] == 'says "hi", then\nleaves' and rows[0]["span_text"] == "The cube, é ü 日本, is red."
    assert rows[1]["point"] is None and rows[1]["region"] is None
    assert [r["id"] for r in rows] == [r["id"] for r in store.records()]
    assert store.export_jsonl(out, latest_only=True) == 2  # overwrites atomically
    assert [json.loads(x)["verdict"] for x in out.read_text().splitlines()] == ["not_visual", "wrong_region"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ann.jsonl"]  # no temp file left


def test_export_csv(store, tmp_path):
    _fill(store)
    out = tmp_path / "ann.csv"
    assert store.export_csv(out) == 3
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert rows[0]["annotator"] == "alice" and rows[0]["span_index"] == "0" and rows[0]["region"] == "2"
    assert float(rows[0]["point_x"]) == 0.5 and float(rows[0]["point_y"]) == 0.25
    assert rows[0]["note"] == 'says "hi", then\nleaves' and rows[0]["span_text"] == "The cube, é ü 日本, is red."
    assert rows[1]["point_x"] == "" and rows[1]["region"] == "" and rows[1]["verdict"] == "not_visual"
    assert rows[2]["note"] == "=SUM(A1)"
    assert store.export_csv(out, annotator="bob") == 1
    with open(out, newline="", encoding="utf-8") as fh:
        assert [r["annotator"] for r in csv.DictReader(fh)] == ["bob"]


def test_export_of_empty_store_and_bad_targets(store, tmp_path):
    out = tmp_path / "e.csv"
    assert store.export_csv(out) == 0
    assert out.read_text().strip().startswith("id,created_at,annotator")
    assert store.export_jsonl(tmp_path / "e.jsonl") == 0 and (tmp_path / "e.jsonl").read_text() == ""
    store.add("a", "r", 0, "grounded")
    before = store.path.read_bytes()
    with pytest.raises(AnnotationError, match="annotation store itself"):
        store.export_csv(store.path)
    with pytest.raises(AnnotationError, match="annotation store itself"):
        store.export_jsonl(str(store.path) + "-wal")
    with pytest.raises(AnnotationError, match="is a directory"):
        store.export_jsonl(tmp_path)
    assert store.path.read_bytes() == before and store.count() == 1


# ---------------------------------------------------------------------------- concurrency + durability


@pytest.mark.slow
def test_concurrent_processes_and_threads_lose_nothing(tmp_path):
    path = tmp_path / "ann.db"
    store = AnnotationStore(path)
    n = 50
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[int]] = {}

    def thread_worker(name: str) -> None:  # the shared store object, as Gradio workers use it
        results[name] = [store.add(name, "run-c", i, VERDICTS[i % 3], note=f"{name}:{i}") for i in range(n)]

    with ctx.Pool(3) as pool:
        async_res = pool.starmap_async(_add_many, [(str(path), f"proc{k}", n) for k in range(3)])
        threads = [threading.Thread(target=thread_worker, args=(f"thread{k}",)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        proc_ids = async_res.get(timeout=120)

    all_ids = [i for ids in proc_ids for i in ids] + [i for ids in results.values() for i in ids]
    assert len(all_ids) == 6 * n and len(set(all_ids)) == 6 * n  # distinct acknowledgements
    recs = store.records()
    assert store.count() == 6 * n and {r["id"] for r in recs} == set(all_ids)
    names = [f"proc{k}" for k in range(3)] + [f"thread{k}" for k in range(3)]
    for name in names:  # every annotator has exactly their own rows, in their own order
        mine = store.records(annotator=name)
        assert [r["note"] for r in mine] == [f"{name}:{i}" for i in range(n)]
    assert len(store.records(latest_only=True)) == 6 * n


_KILLED_WRITER = r"""
import sqlite3, sys
sys.path.insert(0, sys.argv[1])
from ui.annotations import AnnotationStore
s = AnnotationStore(sys.argv[2])
hold = sqlite3.connect(sys.argv[2])  # keeps the WAL from being checkpointed away on close
hold.execute("SELECT 1").fetchall()
i = 0
while True:
    rid = s.add("writer", "run-k", i, "grounded", note=f"acked {i}")
    print(rid, flush=True)  # printed only after commit: an acknowledgement
    i += 1
"""


def _read_line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "writer subprocess printed nothing"
    return proc.stdout.readline()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "ann.db"
    AnnotationStore(path).add("before", "run-k", 0, "grounded")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(ROOT), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        acked = [int(_read_line(proc)) for _ in range(15)]
        os.kill(proc.pid, signal.SIGKILL)  # most likely mid-write of the next row
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    acked += [int(x) for x in rest.split()]  # anything printed was committed before the kill
    assert proc.returncode == -signal.SIGKILL

    reopened = AnnotationStore(path)
    recs = {r["id"]: r for r in reopened.records()}
    assert set(acked) <= set(recs)
    assert [recs[i]["note"] for i in acked] == [f"acked {k}" for k in range(len(acked))]
    assert reopened.records(annotator="before")[0]["span_index"] == 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    assert reopened.add("after", "run-k", 0, "grounded") > max(acked)
