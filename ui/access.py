"""Who may do what on a published page: which models a visitor may pick, whose annotation
records they may read, who is the admin.

Why a rule object and not checks in each handler: every model name a visitor sends, from any tab
or API client, passes `ModelPolicy.resolve` before anything touches the disk or the network, and
every refusal reads the same, so a visitor cannot tell a missing folder from a forbidden one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vstream.model import VLMError

MAX_MODEL_NAME = 300


def not_available(name: str) -> str:
    """The one message for a model that is not allowed, not found or not loadable."""
    shown = " ".join(str(name).split())[:80]
    return f"Model {shown!r} is not available on this server; pick one from the list."


@dataclass
class ModelPolicy:
    """The models a visitor may pick: `allowed` (the operator's names, in menu order) and, only
    with `allow_any` (a local lab's opt-in), any name typed into the box. The first allowed
    model is what an empty choice means."""

    allowed: list[str] = field(default_factory=list)
    allow_any: bool = False
    labels: dict[str, str] = field(default_factory=dict)  # shown name -> allowed name

    @classmethod
    def of(cls, names: Iterable[str], allow_any: bool = False, root: Path | None = None) -> ModelPolicy:
        """`root`: folders under it are shown relative to it ("assets/demo-model"), so the page
        does not show the server's directory layout; both spellings are accepted."""
        seen = list(dict.fromkeys(str(n).strip() for n in names if str(n or "").strip()))
        if not seen:
            raise ValueError("the model list is empty: name at least one model")
        labels = {}
        for n in seen:
            label = n
            if root is not None and Path(n).is_absolute():
                try:
                    label = Path(n).relative_to(root).as_posix()
                except ValueError:
                    pass
            labels.setdefault(label, n)
        return cls(seen, bool(allow_any), labels)

    @property
    def default(self) -> str:
        return self.allowed[0]

    def label(self, name: str) -> str:
        """The name a visitor sees (and a saved run records) for an allowed model."""
        return next((lab for lab, n in self.labels.items() if n == name), name)

    def choices(self) -> list[tuple[str, str]]:
        """(shown name, value) pairs for a menu; the value is the shown name too."""
        return [(self.label(n), self.label(n)) for n in self.allowed]

    def resolve(self, name: str | None) -> str:
        """The model key to load for a visitor's choice ("" = the default), or a VLMError with
        `not_available`. Names are compared as given: nothing is resolved against the disk."""
        n = str(name or "").strip()
        if not n:
            return self.default
        if n in self.allowed:
            return n
        if n in self.labels:
            return self.labels[n]
        if self.allow_any and len(n) <= MAX_MODEL_NAME and "\x00" not in n:
            return n
        raise VLMError(not_available(n))

    def is_listed(self, name: str) -> bool:
        return str(name or "").strip() in self.allowed or not str(name or "").strip()


def parse_models(spec: str | None) -> list[str]:
    """'a,b' -> ['a', 'b'] (empty entries dropped)."""
    return [s.strip() for s in str(spec or "").split(",") if s.strip()]


@dataclass
class Identity:
    """Who is asking, for the annotation store: the login name when the page has logins
    (`--auth`), else nobody in particular (the visitor's own session only)."""

    username: str | None = None
    admin: str | None = None

    @property
    def is_admin(self) -> bool:
        return bool(self.admin) and self.username == self.admin

    def annotator(self, typed: str | None) -> str:
        """The name records are saved under: the login name when there is one (a visitor cannot
        write as someone else), else the typed name."""
        return self.username or str(typed or "").strip()


def check_admin(admin: str | None, users: Sequence[str]) -> str | None:
    """`--admin NAME` must name one of the `--auth` logins (an admin nobody can log in as, or an
    admin on a page without logins, would let anyone claim the name)."""
    if not admin:
        return None
    if admin not in users:
        raise ValueError(f"--admin {admin!r} must be one of the --auth users ({', '.join(users) or 'none given'})")
    return admin
