"""Your own data: (image, question, optional answer and family) rows for collect, evaluate, eval-model.

    python -m vstream collect --model Qwen/Qwen3-VL-8B-Thinking --data my/rows.jsonl --out runs/my-labels

`--data PATH` takes any of:
* a JSONL file (one object per line) or a CSV file with columns `image` (a path relative to
  the file), `question`, and optionally `answer` and `family`;
* a folder written by Hugging Face `datasets` (`Dataset.save_to_disk`; a DatasetDict's `train`
  split, else its first) with an `image` column (an Image feature or a path) and `question`;
* an image folder in the `datasets` layout: images beside a `metadata.jsonl` (or `metadata.csv`)
  whose `file_name` column names each image.

A row that is malformed (no question, no image), or whose image is missing or unreadable, is
skipped: it is counted, its reason logged, and the run goes on. Rows keep their position in the
source as `index`, which is what resuming a run keys on. Images are opened only when used and
user files are never unpickled (datasets folders are Arrow files).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vstream.model import VLMError, normalize_image

log = logging.getLogger("vstream.data")

__all__ = ["DataRow", "DataSource", "read_data"]


@dataclass
class DataRow:
    """One usable row; shaped like a shapes-world Scene where collect and evaluate read one."""

    index: int  # position in the source (0-based data row)
    question: str
    answer: str | None = None
    family: str = ""
    image_path: Path | None = None
    image_bytes: bytes | None = None  # an image stored inside a datasets folder
    steps: tuple = ()  # no reference reasoning: pointing is not scored on user data

    @property
    def seed(self) -> int:
        """Seeds the row's random region masks (as a scene's seed does)."""
        return self.index

    def image(self) -> Image.Image:
        """The row's image as RGB; a one-line VLMError when it is missing or unreadable."""
        src: Any = self.image_path if self.image_bytes is None else io.BytesIO(self.image_bytes)
        if self.image_path is not None and self.image_bytes is None and not self.image_path.is_file():
            raise VLMError(f"row {self.index}: image not found: {self.image_path}")
        try:
            return normalize_image(src)
        except VLMError as e:
            raise VLMError(f"row {self.index}: {e}") from e


@dataclass
class DataSource:
    """The usable rows of a data path and the ones skipped while reading it (with why)."""

    path: Path
    kind: str  # jsonl, csv, datasets, imagefolder
    rows: list[DataRow]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """What a label folder records as its split (resuming needs the same source)."""
        return f"data:{self.path.resolve()}"


def read_data(path: str | Path) -> DataSource:
    """Read `path` (see the module doc). Bad rows are skipped and logged; a path that is not data
    at all (missing, empty, an unknown format, no usable row) is a one-line VLMError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VLMError(f"data path does not exist: {p}")
    if p.is_dir():
        if (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file():
            meta = p / "metadata.jsonl" if (p / "metadata.jsonl").is_file() else p / "metadata.csv"
            src = DataSource(p, "imagefolder", [])
            _collect(src, _records(meta), base=p, image_key="file_name")
        elif (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            src = DataSource(p, "datasets", [])
            _collect(src, _datasets_records(p), base=p, image_key="image")
        else:
            raise VLMError(
                f"{p} is a folder but neither a datasets save_to_disk folder (dataset_info.json) nor an "
                "image folder with metadata.jsonl / metadata.csv"
            )
    elif p.suffix.lower() in (".jsonl", ".csv"):
        src = DataSource(p, p.suffix.lower()[1:], [])
        _collect(src, _records(p), base=p.parent, image_key="image")
    else:
        raise VLMError(f"unknown data format {p.suffix or p.name!r}: use .jsonl, .csv or a datasets folder")
    if not src.rows:
        raise VLMError(f"no usable rows in {p} ({len(src.skipped)} skipped: {_reasons(src.skipped)})")
    if src.skipped:
        log.warning("%s: %d of %d rows skipped", p, len(src.skipped), len(src.skipped) + len(src.rows))
    return src


def _reasons(skipped: list[dict[str, Any]]) -> str:
    return "; ".join(f"row {s['index']}: {s['why']}" for s in skipped[:3]) or "empty"


def _records(path: Path) -> Iterator[dict[str, Any] | str]:
    """Rows of a JSONL or CSV file as dicts; a line that is not an object comes back as its reason."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise VLMError(f"could not read {path}: {e}") from e
    if path.suffix.lower() == ".csv":
        yield from csv.DictReader(io.StringIO(text))
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            yield f"not JSON ({e.msg})"
            continue
        yield rec if isinstance(rec, dict) else f"a JSON {type(rec).__name__}, not an object"


def _datasets_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a `save_to_disk` folder, images undecoded (bytes or a path)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises its own types for a broken folder
        raise VLMError(f"could not open datasets folder {path}: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise VLMError(f"datasets folder {path} holds no split")
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "image" in ds.features and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    yield from ds


def _collect(src: DataSource, records: Iterator[dict[str, Any] | str], base: Path, image_key: str) -> None:
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, str):
                raise VLMError(rec)
            src.rows.append(_row(i, rec, base, image_key))
        except VLMError as e:
            src.skipped.append({"index": i, "why": str(e)})
            log.warning("%s row %d skipped: %s", src.path, i, e)


def _text(rec: dict[str, Any], key: str) -> str | None:
    v = rec.get(key)
    if v is None or (isinstance(v, float) and v != v):  # missing or NaN
        return None
    return str(v).strip() or None


def _row(i: int, rec: dict[str, Any], base: Path, image_key: str) -> DataRow:
    question = _text(rec, "question")
    if question is None:
        raise VLMError("no question")
    img = rec.get(image_key)
    path, data = None, None
    if isinstance(img, dict):  # datasets Image feature, undecoded
        data, img = img.get("bytes"), img.get("path")
    if data is None:
        if not isinstance(img, str) or not img.strip():
            raise VLMError(f"no {image_key}")
        path = (base / img.strip()).expanduser()
        if not path.is_file():
            raise VLMError(f"image not found: {path}")
    return DataRow(
        index=i,
        question=question,
        answer=_text(rec, "answer"),
        family=_text(rec, "family") or "",
        image_path=path,
        image_bytes=data,
    )
