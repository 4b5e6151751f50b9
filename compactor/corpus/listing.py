"""What a corpus holds: its documents' ids, where each one is, and what it costs, listed identically on every rank.

A corpus is one of
- a folder: its .txt and .md files (not recursive), id = the file name without its extension;
- a glob (`docs/**/*.txt`, recursive `**` allowed): the regular files it matches, id = file name stem;
- a .jsonl file: one JSON object {"id": ..., "text": ...} per line (blank lines ignored).
Entries come in a fixed order (sorted paths; JSONL line order). An id names the artifact `<id>.h5`, so it must be a
name `compactor serve` accepts (letters, digits, `.`, `_`, `-`, starting with a letter or digit, at most 128
characters) and unique in the corpus. A bad id, a repeated id (every occurrence after the first) or a bad JSONL
line is not an error of the run: it becomes an entry with `error` set, which the run records as a failed document.

The cost of a document is the UTF-8 byte length of its text (the file size; for JSONL, of the decoded `text`), the
proxy for its token count that every rank can compute without tokenizing the corpus; see sharding.py for why.
Texts are not kept: a JSONL entry remembers its line's byte offset and length and is read again when compressed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..capture.documents import Document, read_document
from ..errors import DocumentError

#: the same rule as the server's document names (serving/server.py NAME_PATTERN)
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FOLDER_SUFFIXES = (".txt", ".md")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Entry:
    """One document of a corpus (or a line that could not become one: `error` says why)."""

    index: int               # position in the listing
    id: str                  # artifact name; "#line-<n>" / "#file-<n>" for an entry without a usable id
    source: str              # the file, or "<corpus>.jsonl:<line number>"
    cost: int                # UTF-8 bytes of the text; 0 for an entry with an error
    error: str | None = None
    offset: int = -1         # JSONL: byte offset and length of the line
    length: int = 0


def id_error(doc_id) -> str | None:
    """Why `doc_id` cannot name an artifact, or None."""
    if not isinstance(doc_id, str):
        return f"id must be a string, got {type(doc_id).__name__}"
    if not ID_PATTERN.match(doc_id):
        return (f"id {doc_id[:60]!r} is not a valid artifact name (letters, digits, '.', '_', '-', starting with a "
                "letter or digit, at most 128 characters)")
    return None


def _files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file())
    if GLOB_CHARS & set(spec):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if path.is_file():
        return [path]
    raise DocumentError(f"corpus not found: {spec} (expected a folder, a glob or a .jsonl file)")


def _jsonl(path: Path) -> list[Entry]:
    """Entries of a JSONL corpus; a line that is not an object with a string id and a non-empty string text
    becomes an entry with an error."""
    out = []
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            here, length = offset, len(raw)
            offset += length
            if not raw.strip():
                continue
            source = f"{path}:{number}"
            doc_id, error, cost = f"#line-{number}", None, 0
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                error = f"line {number} is not valid JSON ({str(e).splitlines()[0][:80]})"
            else:
                if not isinstance(obj, dict) or "id" not in obj or "text" not in obj:
                    error = f"line {number} must be a JSON object with \"id\" and \"text\""
                else:
                    error = id_error(obj["id"])
                    if error is None:
                        doc_id = obj["id"]
                        text = obj["text"]
                        if not isinstance(text, str):
                            error = f"text must be a string, got {type(text).__name__}"
                        elif not text.strip():
                            error = "text is empty"
                        else:
                            try:
                                cost = len(text.encode("utf-8"))
                            except UnicodeEncodeError:
                                error = "text holds unpaired surrogates (\\ud800-\\udfff); expected Unicode text"
            out.append(Entry(len(out), doc_id, source, 0 if error else cost, error, here, length))
    return out


def list_corpus(spec: str | os.PathLike) -> list[Entry]:
    """The entries of a corpus (see the module docstring), repeated ids marked as errors. Raises DocumentError
    when the corpus does not exist or holds nothing."""
    spec = str(spec)
    if spec.endswith(".jsonl") and Path(spec).is_file():
        entries = _jsonl(Path(spec))
    else:
        entries = []
        for p in _files(spec):
            error = id_error(p.stem)
            entries.append(Entry(len(entries), p.stem if error is None else f"#file-{len(entries)}", str(p),
                                 0 if error else p.stat().st_size, error))
    if not entries:
        raise DocumentError(f"corpus {spec} holds no documents")
    first: dict[str, str] = {}  # every id taken from the data, even of an entry with another error
    out = []
    for e in entries:
        if e.id.startswith("#"):
            pass
        elif e.id in first:
            e = Entry(e.index, e.id, e.source, 0, f"duplicate id {e.id!r} (first at {first[e.id]})", e.offset,
                      e.length)
        else:
            first[e.id] = e.source
        out.append(e)
    return out


def listing_digest(entries: list[Entry]) -> str:
    """sha256 of the listing (ids, sources, costs, errors): equal on every rank that sees the same corpus."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.id, e.source, e.cost, e.error]).encode() + b"\n")
    return h.hexdigest()


def read_entry(entry: Entry) -> Document:
    """The document of an entry (raises DocumentError for an entry with an error, or a file that is missing,
    empty, binary or not UTF-8)."""
    if entry.error:
        raise DocumentError(entry.error)
    if entry.offset < 0:
        doc = read_document(entry.source)
        return Document(entry.id, doc.text)
    path = entry.source.rsplit(":", 1)[0]
    with open(path, "rb") as fh:
        fh.seek(entry.offset)
        raw = fh.read(entry.length)
    try:
        obj = json.loads(raw.decode("utf-8"))
        text = obj["text"]
        if obj["id"] != entry.id or not isinstance(text, str):
            raise ValueError("changed")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise DocumentError(f"{entry.source} changed since the corpus was listed") from None
    if "\x00" in text:
        raise DocumentError(f"{entry.source} looks binary (contains NUL characters); expected text")
    return Document(entry.id, text)
