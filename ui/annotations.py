"""Durable SQLite store for human annotations of attribution heatmaps.

An annotator marks each thinking span's heatmap as grounded / wrong region / not visual and may
click the right region. The store is append-only (a re-mark is a new row, so no annotator can ever
overwrite anyone's work, their own included); `latest_only` reads the current verdicts. Every
`add` is one committed transaction in WAL mode with synchronous=FULL, so a returned row id is an
acknowledgement that survives a crash or SIGKILL. A fresh connection per call makes one store
object safe to share between Gradio worker threads, and many processes may open the same file.

Bad input never reaches the database: it raises `AnnotationError` (a `ValueError`) with a
one-line message a person can act on, and leaves the file and every saved record as they were.
Files that are not our SQLite store (any other file, another application's database, a
corrupt one) are refused without being written to.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import numbers
import operator
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERDICTS = ("grounded", "wrong_region", "not_visual")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x56535441  # "VSTA": marks the file as ours in the SQLite header
SQLITE_MAGIC = b"SQLite format 3\x00"

MAX_ANNOTATOR = 80
MAX_LONG_TEXT = 10_000  # note, span_text
MAX_ID_TEXT = 500  # run_id, model
MAX_IMAGE_REF = 2_000
MAX_INT = 2**63 - 1  # SQLite INTEGER
MAX_IDS = 10_000  # ids one query may name (SQLite allows 32,766 parameters)

COLUMNS = (
    "id",
    "created_at",
    "annotator",
    "run_id",
    "span_index",
    "verdict",
    "region",
    "point_x",
    "point_y",
    "model",
    "image_ref",
    "span_text",
    "note",
)
# CSV keeps the flat point_x / point_y; records() and JSONL give "point": [x, y] or None.
RECORD_KEYS = (
    "id",
    "created_at",
    "annotator",
    "run_id",
    "span_index",
    "verdict",
    "region",
    "point",
    "model",
    "image_ref",
    "span_text",
    "note",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    annotator TEXT NOT NULL,
    run_id TEXT NOT NULL,
    span_index INTEGER NOT NULL CHECK (span_index >= 0),
    verdict TEXT NOT NULL CHECK (verdict IN ('grounded', 'wrong_region', 'not_visual')),
    region INTEGER CHECK (region IS NULL OR region >= 0),
    point_x REAL CHECK (point_x IS NULL OR (point_x >= 0 AND point_x <= 1)),
    point_y REAL CHECK (point_y IS NULL OR (point_y >= 0 AND point_y <= 1)),
    model TEXT NOT NULL DEFAULT '',
    image_ref TEXT NOT NULL DEFAULT '',
    span_text TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS annotations_key ON annotations (annotator, run_id, span_index, id);
CREATE INDEX IF NOT EXISTS annotations_run ON annotations (run_id, id);
"""

_INSERT = f"INSERT INTO annotations ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AnnotationError(ValueError):
    """Bad input or an unusable store file; the message is one line, fit to show a user."""


# ----------------------------------------------------------------------------- validation


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _text(name: str, value: Any, limit: int, *, required: bool = False, single_line: bool = False) -> str:
    """Checked, stripped text; None counts as empty so optional UI fields may send it."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise AnnotationError(f"{name} must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise AnnotationError(f"{name} is empty; please fill it in")
    if len(value) > limit:
        raise AnnotationError(f"{name} is too long ({len(value):,} characters, at most {limit:,})")
    if "\x00" in value:
        raise AnnotationError(f"{name} contains a NUL character")
    if single_line and _CONTROL.search(value):
        raise AnnotationError(f"{name} must be a single line without control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AnnotationError(f"{name} contains characters that are not valid Unicode") from None
    return value


def _int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """A non-negative integer; bools and floats are refused (3.0 from a slider is a UI bug)."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, (bool, float)):  # True is not span 1, and 2.0 hides a UI bug
            raise TypeError
        value = int(operator.index(value))  # int, numpy integers and the like
    except TypeError:
        raise AnnotationError(f"{name} must be a whole number, got {type(value).__name__} {value!r:.40}") from None
    if value < 0:
        raise AnnotationError(f"{name} must be 0 or more, got {value}")
    if value > MAX_INT:
        raise AnnotationError(f"{name} is too large ({value})")
    return value


def _verdict(value: Any) -> str:
    if not isinstance(value, str):
        raise AnnotationError(f"verdict must be one of {', '.join(VERDICTS)}; got {type(value).__name__}")
    key = value.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in VERDICTS:
        raise AnnotationError(f"unknown verdict {_one_line(value)[:40]!r}; use one of {', '.join(VERDICTS)}")
    return key


def _point(value: Any) -> tuple[float, float] | None:
    """Normalised image coordinates (x, y), both in [0, 1], so they survive image resizing."""
    if value is None:
        return None
    msg = "point must be two numbers (x, y) between 0 and 1 (normalised image coordinates)"
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or not hasattr(value, "__getitem__"):
        raise AnnotationError(f"{msg}; got {type(value).__name__}")
    if len(value) != 2:
        raise AnnotationError(f"{msg}; got {len(value)} values")
    out = []
    for v in (value[0], value[1]):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise AnnotationError(f"{msg}; got {type(v).__name__} {v!r:.40}")
        f = float(v)
        if not math.isfinite(f) or not 0.0 <= f <= 1.0:
            raise AnnotationError(f"{msg}; got {f!r}")
        out.append(f)
    return out[0], out[1]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- store


class AnnotationStore:
    """Append-only annotation records in one SQLite file (WAL, synchronous=FULL).

    Holds no open connection: each call opens its own, so threads, forked workers and separate
    processes can all share the file; SQLite's locking plus `timeout` (busy_timeout) serialise
    writers.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
            raise AnnotationError(f"annotation store path must be a non-empty file path, got {path!r:.80}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise AnnotationError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.path: Path = Path(os.fspath(path)).expanduser().absolute()
        self.timeout = float(timeout)
        self.journal_mode = ""
        self._check_file()
        self._init_schema()

    def __repr__(self) -> str:
        return f"AnnotationStore({str(self.path)!r})"

    # -- opening ------------------------------------------------------------------------------

    def _check_file(self) -> None:
        """Refuse, without touching it, anything at the path that is not a SQLite file."""
        p = self.path
        if p.is_dir():
            raise AnnotationError(f"annotation store {p} is a directory, not a file")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = _one_line(exc.strerror or exc)
            raise AnnotationError(f"cannot create folder for annotation store {p}: {reason}") from None
        if not p.exists():
            return
        try:
            with open(p, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise AnnotationError(f"cannot read annotation store {p}: {_one_line(exc.strerror or exc)}") from None
        if head and head != SQLITE_MAGIC:  # an empty file is a valid, empty database
            raise AnnotationError(
                f"{p} is not a SQLite database; choose another annotation store path (the file was left untouched)"
            )

    def _init_schema(self) -> None:
        with self._connect() as con:
            self._check_ownership(con)  # read-only checks first: never write to a foreign file
            ok = con.execute("PRAGMA quick_check(1)").fetchone()
            if not ok or ok[0] != "ok":
                detail = _one_line(ok[0] if ok else "no result")[:120]
                raise AnnotationError(
                    f"annotation store {self.path} is corrupt ({detail});"
                    " restore it from a backup or choose another path"
                )
            self.journal_mode = self._set_wal(con)
            con.execute("BEGIN IMMEDIATE")
            try:
                if self._check_ownership(con):  # again, inside the lock: another process may have won
                    con.execute("COMMIT")  # already ours and current: opening writes nothing
                    return
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    con.execute(stmt)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise

    def _check_ownership(self, con: sqlite3.Connection) -> bool:
        """True for our current store, False for an empty database; anything else belongs to
        someone else (or a newer app) and is refused."""
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if "annotations" not in tables:
            if tables - {"sqlite_sequence"}:
                raise AnnotationError(
                    f"{self.path} is a SQLite database of another application;"
                    " choose another annotation store path (the file was left untouched)"
                )
            return False
        if version > SCHEMA_VERSION:
            raise AnnotationError(
                f"annotation store {self.path} was written by a newer version"
                f" (schema {version}, this one reads {SCHEMA_VERSION}); upgrade the app"
            )
        cols = {r[1] for r in con.execute("PRAGMA table_info(annotations)")}
        missing = [c for c in COLUMNS if c not in cols]
        if missing:
            raise AnnotationError(
                f"{self.path} has an 'annotations' table that is not ours"
                f" (missing {', '.join(missing)}); choose another annotation store path"
            )
        return version == SCHEMA_VERSION

    def _set_wal(self, con: sqlite3.Connection) -> str:
        """Switch to WAL (persistent in the file). The switch needs a moment with no other
        connection mid-transaction, and SQLite may answer BUSY without waiting, so retry."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                mode = str(con.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if mode != "wal":
            log.warning(
                "annotation store %s: WAL not available on this filesystem, using journal_mode=%s", self.path, mode
            )
        return mode

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection with our pragmas; SQLite errors become one-line AnnotationErrors."""
        con = None
        try:
            con = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            con.execute("PRAGMA synchronous = FULL")  # per connection: fsync the WAL on every commit
            yield con
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        finally:
            if con is not None:
                con.close()

    def _translate(self, exc: sqlite3.Error) -> AnnotationError:
        text = _one_line(exc)
        low = text.lower()
        p = self.path
        if "locked" in low or "busy" in low:
            return AnnotationError(
                f"annotation store {p} is busy (another writer held it over {self.timeout:g} s);"
                " nothing was saved, please try again"
            )
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return AnnotationError(
                f"annotation store {p} is corrupt or not a SQLite database ({text});"
                " restore it from a backup or choose another path"
            )
        if "disk is full" in low or "disk full" in low:
            return AnnotationError(f"no space left for annotation store {p}; nothing was saved")
        if "readonly" in low or "read-only" in low:
            return AnnotationError(f"annotation store {p} is read-only; nothing was saved")
        if "unable to open" in low:
            return AnnotationError(f"cannot open annotation store {p} (check the path and permissions)")
        return AnnotationError(f"annotation store {p}: {text}")

    # -- writing --------------------------------------------------------------------------------

    def add(
        self,
        annotator: str,
        run_id: str,
        span_index: int,
        verdict: str,
        *,
        span_text: str = "",
        region: int | None = None,
        point: tuple[float, float] | None = None,
        model: str = "",
        image_ref: str = "",
        note: str = "",
    ) -> int:
        """Validate, insert in one committed transaction, return the new row id.

        The id is the acknowledgement: once it is returned the row is on disk (WAL fsynced).
        Nothing is written when validation fails.
        """
        row = (
            _now(),
            _text("annotator", annotator, MAX_ANNOTATOR, required=True, single_line=True),
            _text("run_id", run_id, MAX_ID_TEXT, required=True, single_line=True),
            _int("span_index", span_index),
            _verdict(verdict),
            _int("region", region, optional=True),
            *(_point(point) or (None, None)),
            _text("model", model, MAX_ID_TEXT, single_line=True),
            _text("image_ref", image_ref, MAX_IMAGE_REF, single_line=True),
            _text("span_text", span_text, MAX_LONG_TEXT),
            _text("note", note, MAX_LONG_TEXT),
        )
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute(_INSERT, row)
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    # -- reading --------------------------------------------------------------------------------

    def _query(
        self, annotator: str | None, run_id: str | None, latest_only: bool, ids: Collection[int] | None = None
    ) -> tuple[str, list[Any]]:
        where, args = [], []
        if ids is not None:  # only these rows (a visitor's own, when the page has no logins)
            ids = sorted({int(i) for i in ids})[-MAX_IDS:]
            where.append(f"id IN ({', '.join('?' * len(ids))})" if ids else "0")
            args.extend(ids)
        if annotator is not None:
            where.append("annotator = ?")
            args.append(_text("annotator", annotator, MAX_ANNOTATOR, required=True, single_line=True))
        if run_id is not None:
            where.append("run_id = ?")
            args.append(_text("run_id", run_id, MAX_ID_TEXT, required=True, single_line=True))
        if latest_only:  # highest id, not timestamp: ids are monotonic even if clocks are not
            where.append("id IN (SELECT MAX(id) FROM annotations GROUP BY annotator, run_id, span_index)")
        sql = f"SELECT {', '.join(COLUMNS)} FROM annotations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return sql + " ORDER BY id", args

    @staticmethod
    def _record(row: tuple) -> dict[str, Any]:
        d = dict(zip(COLUMNS, row))
        px, py = d.pop("point_x"), d.pop("point_y")
        d["point"] = None if px is None or py is None else (px, py)
        return {k: d[k] for k in RECORD_KEYS}

    def records(
        self,
        annotator: str | None = None,
        run_id: str | None = None,
        latest_only: bool = False,
        ids: Collection[int] | None = None,
    ) -> list[dict]:
        """Rows in insertion order, optionally one annotator's / one run's / only the row `ids`;
        `latest_only` keeps each (annotator, run_id, span_index)'s newest row, i.e. the current
        verdicts."""
        sql, args = self._query(annotator, run_id, latest_only, ids)
        with self._connect() as con:
            return [self._record(r) for r in con.execute(sql, args)]

    def count(self) -> int:
        """All rows, re-marks included."""
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])

    # -- export ---------------------------------------------------------------------------------

    def export_jsonl(
        self,
        path: str | os.PathLike[str],
        *,
        annotator: str | None = None,
        run_id: str | None = None,
        latest_only: bool = False,
        ids: Collection[int] | None = None,
    ) -> int:
        """One JSON object per line (point as [x, y] or null); returns rows written."""

        def write(fh, rows) -> int:
            n = 0
            for row in rows:
                fh.write(json.dumps(self._record(row), ensure_ascii=False) + "\n")
                n += 1
            return n

        return self._export(path, write, annotator, run_id, latest_only, ids)

    def export_csv(
        self,
        path: str | os.PathLike[str],
        *,
        annotator: str | None = None,
        run_id: str | None = None,
        latest_only: bool = False,
        ids: Collection[int] | None = None,
    ) -> int:
        """UTF-8 CSV with a header row and flat point_x / point_y; empty cell = no value.
        Cells are written verbatim (no spreadsheet-formula escaping) so the data round-trips."""

        def write(fh, rows) -> int:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            n = 0
            for row in rows:
                w.writerow(["" if v is None else v for v in row])
                n += 1
            return n

        return self._export(path, write, annotator, run_id, latest_only, ids)

    def _export(
        self,
        path: Any,
        write,
        annotator: str | None,
        run_id: str | None,
        latest_only: bool,
        ids: Collection[int] | None = None,
    ) -> int:
        """Write to a temp file beside the target, fsync, then os.replace: a reader (or a crash)
        sees the old file or the complete new one, never half of one."""
        if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
            raise AnnotationError(f"export path must be a non-empty file path, got {path!r:.80}")
        target = Path(os.fspath(path)).expanduser().absolute()
        own = {str(self.path) + suffix for suffix in ("", "-wal", "-shm", "-journal")}
        if str(target) in own or (target.exists() and self.path.exists() and os.path.samefile(target, self.path)):
            raise AnnotationError(f"refusing to export over the annotation store itself ({target})")
        if target.is_dir():
            raise AnnotationError(f"export path {target} is a directory, not a file")
        sql, args = self._query(annotator, run_id, latest_only, ids)
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with self._connect() as con, os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                con.execute("BEGIN")  # one snapshot: the count matches the rows written
                n = write(fh, con.execute(sql, args))
                con.execute("COMMIT")
                fh.flush()
                os.fsync(fh.fileno())
            mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
            os.chmod(tmp, mode)
            os.replace(tmp, target)
            tmp = None
            with contextlib.suppress(OSError):  # make the rename itself durable
                dfd = os.open(target.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return n
        except OSError as exc:
            raise AnnotationError(f"cannot write export {target}: {_one_line(exc.strerror or exc)}") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


# ----------------------------------------------------------------------------- sharing

_SHARED: dict[str, AnnotationStore] = {}
_SHARED_LOCK = threading.Lock()


def shared_store(path: str) -> AnnotationStore:
    """The process's one store for `path`, opened on first use (a store holds no connection, so
    every session and worker thread may share it)."""
    with _SHARED_LOCK:
        if path not in _SHARED:
            _SHARED[path] = AnnotationStore(path)
        return _SHARED[path]
