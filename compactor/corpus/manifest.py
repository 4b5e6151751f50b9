"""The corpus manifest: what happened to each document, one JSON object per line.

Each rank appends to its own file, OUTDIR/manifest/rank-<rank>.jsonl, one record per document as soon as the
document is finished (written, flushed and fsynced, so a killed rank loses at most the document it was on); the
files grow across runs. A record: id, source (the file or JSONL line), path (the artifact), T (tokens), bytes (of
the artifact), seconds, status (done | skipped | failed), error (one line, or null), rank, run (the run's id: its
start time in UTC, the same on every rank of a run).

At the end of a run, rank 0 merges every rank file (of this run and earlier ones, whatever their world size) into
OUTDIR/manifest.jsonl, written atomically: one record per document of the current listing, in listing order, the
latest one for that document (latest run; within a run, the last line); a document no run has finished yet (its
rank died before it) is listed with status "pending". A rank file cut in the middle of a line by a kill is read up
to its last complete line (the next writer starts on a fresh line).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..storage.output import atomic_target
from .listing import Entry

STATUSES = ("done", "skipped", "failed")
MERGED = "manifest.jsonl"
RANK_FOLDER = "manifest"


def rank_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / RANK_FOLDER / f"rank-{rank:05d}.jsonl"


class RankManifest:
    """The append-only record file of one rank."""

    def __init__(self, out_dir: Path, rank: int, run: str):
        self.path = rank_path(out_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.run = rank, run
        self._fh = open(self.path, "ab")
        if self._fh.tell() > 0:  # a record cut by a kill: start on a fresh line
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def record(self, entry: Entry, status: str, *, path: Path | None = None, T: int | None = None,
               nbytes: int | None = None, seconds: float = 0.0, error: str | None = None) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        rec = {"id": entry.id, "source": entry.source, "path": None if path is None else str(path), "T": T,
               "bytes": nbytes, "seconds": round(float(seconds), 3), "status": status, "error": error,
               "rank": self.rank, "run": self.run}
        self._write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        return rec

    def close(self) -> None:
        self._fh.close()


def read_records(out_dir: Path) -> list[dict]:
    """Every complete record of every rank file, in (run, file, line) order; undecodable lines are ignored."""
    out = []
    for path in sorted((Path(out_dir) / RANK_FOLDER).glob("rank-*.jsonl")):
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    rec = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    continue  # cut by a kill
                if isinstance(rec, dict) and isinstance(rec.get("run"), str) and rec.get("status") in STATUSES:
                    out.append(rec)
    out.sort(key=lambda r: r["run"])  # stable: within a run, file then line order
    return out


def merge(out_dir: Path, entries: list[Entry]) -> dict[str, int]:
    """Write OUTDIR/manifest.jsonl (see the module docstring); returns the count of each status in it."""
    latest = {}
    for rec in read_records(out_dir):
        latest[(rec.get("id"), rec.get("source"))] = rec
    counts = dict.fromkeys((*STATUSES, "pending"), 0)
    lines = []
    for e in entries:
        rec = latest.get((e.id, e.source))
        if rec is None:
            rec = {"id": e.id, "source": e.source, "path": None, "T": None, "bytes": None, "seconds": None,
                   "status": "pending", "error": e.error, "rank": None, "run": None}
        counts[rec["status"]] += 1
        lines.append(json.dumps(rec, ensure_ascii=False))
    target = Path(out_dir) / MERGED
    with atomic_target(target) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return counts
