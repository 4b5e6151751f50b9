"""The calibration corpus: plain documents (by default the bundled plays) and, optionally, reasoning traces.

`load_corpus(spec)`: None -> the bundled plays; a folder -> every .txt/.md file in it (sorted, recursively); a .jsonl
file -> one text per line (a JSON string, or an object with a "text" field). `load_traces(path)`: a .jsonl of saved
reasoning traces in the same format (each text carries the phase markers, e.g. `<think>` ... `</think>`).
Every text is checked like a document (UTF-8, not empty, no NUL bytes); any problem is one DocumentError line.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..capture.documents import Document, _decode, list_plays
from ..errors import DocumentError

MAX_TEXTS = 100_000


def _jsonl(path: Path) -> list[Document]:
    out = []
    data = path.read_bytes()
    for i, line in enumerate(_decode(data, str(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DocumentError(f"{path}:{i} is not valid JSON ({e.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str) or not text.strip():
            raise DocumentError(f"{path}:{i}: expected a JSON string or an object with a non-empty \"text\" field")
        if "\x00" in text:
            raise DocumentError(f"{path}:{i}: text contains NUL characters")
        out.append(Document(f"{path.stem}-{i}", text))
        if len(out) > MAX_TEXTS:
            raise DocumentError(f"{path} holds more than {MAX_TEXTS} texts")
    if not out:
        raise DocumentError(f"{path} holds no texts")
    return out


def load_corpus(spec: str | Path | None = None) -> list[Document]:
    """Documents of the corpus (module docstring)."""
    if spec is None or str(spec) == "":
        plays = list_plays()
        return [Document(name, path.read_text(encoding="utf-8")) for name, path in plays.items()]
    path = Path(spec)
    if not path.exists():
        raise DocumentError(f"corpus not found: {spec}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise DocumentError(f"corpus folder {spec} holds no .txt or .md files")
        return [Document(p.stem, _decode(p.read_bytes(), str(p))) for p in files[:MAX_TEXTS]]
    if path.suffix.lower() == ".jsonl":
        return _jsonl(path)
    raise DocumentError(f"corpus {spec} is neither a folder of .txt/.md files nor a .jsonl file")


def load_traces(path: str | Path) -> list[Document]:
    """Saved reasoning traces from a .jsonl file (module docstring)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".jsonl":
        raise DocumentError(f"traces must be a .jsonl file of texts: {path}")
    return _jsonl(path)
