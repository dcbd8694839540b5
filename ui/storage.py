"""Where the page may write on the server: one folder, with a cap per session and one for all.

Why: every file a visitor can make the server write (a saved run, its HTML report, a lab
estimator) goes through `SavedFiles.write`, so a visitor can neither pick the path (names are
made here, never taken from the request) nor fill the disk (each session may write `per_session`
files, and the folder never grows past `max_bytes`).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vstream.model import VLMError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class QuotaError(VLMError):
    """A write refused by a cap; the message says which cap and what to do."""


def safe_name(name: str, suffix: str, default: str) -> str:
    """A file name made of letters, digits, '.', '-' and '_' ending in `suffix`; no folders."""
    base = Path(str(name or "").strip().replace("\\", "/")).name
    base = _SAFE.sub("-", base).strip(".-") or default
    base = base[:80]
    return base if base.endswith(suffix) else base + suffix


@dataclass
class SavedFiles:
    """Capped writes under `root` (created on first write). `per_session`: files one session may
    write; `max_bytes`: the whole folder, counted from the disk before each write; `max_file`:
    one file."""

    root: Path
    per_session: int = 20
    max_bytes: int = 512 * 1024 * 1024
    max_file: int = 32 * 1024 * 1024
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def used_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
        return total

    def written(self, session: str) -> int:
        return self._counts.get(session, 0)

    def write(self, session: str, kind: str, name: str, data: bytes) -> Path:
        """Write `data` as root/kind/<unique>-name for `session`; QuotaError when a cap is hit.
        `kind` and `name` must already be safe (see `safe_name`); the unique prefix means no
        write ever replaces another session's file."""
        if not re.fullmatch(r"[a-z]+", kind) or _SAFE.search(name) or name.startswith("."):
            raise ValueError(f"unsafe kind or name: {kind!r}, {name!r}")
        size = len(data)
        if size > self.max_file:
            raise QuotaError(f"The file would be {size / 1e6:.1f} MB; the limit is {self.max_file / 1e6:.1f} MB.")
        with self._lock:
            if self._counts.get(session, 0) >= self.per_session:
                raise QuotaError(
                    f"This session has saved {self.per_session} files, the most this server allows per session; "
                    "download what you need, then open the page again."
                )
            if self.used_bytes() + size > self.max_bytes:
                raise QuotaError("The server's storage for saved files is full; ask the operator to clear it.")
            folder = self.root / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{uuid.uuid4().hex[:8]}-{name}"
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)
            self._counts[session] = self._counts.get(session, 0) + 1
        return path
