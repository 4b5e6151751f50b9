"""Resumable stages: each stage's output is cached on disk under a digest of its inputs, so a rerun (after an
interrupt, or with a changed setting) recomputes only the stages whose inputs changed.

A stage output is a dict of numpy arrays and JSON-able values, stored as `<folder>/<stage>.safetensors` (arrays:
a format that holds only tensors, so reading a cache never runs code) and `<folder>/<stage>.json` ({"inputs": digest, "values": ...}), both written to a temporary
name and renamed, the JSON last: a stage counts as done only when its JSON names the current input digest.
The digest covers the stage name, its version, its parameters and the digests of the stages it reads.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..storage.schema import canonical_json


def inputs_digest(stage: str, version: int, params: dict, upstream: list[str]) -> str:
    return hashlib.sha256(canonical_json({"stage": stage, "version": version, "params": params,
                                          "upstream": upstream}).encode()).hexdigest()


class StageCache:
    def __init__(self, folder: str | Path, log: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.log = log
        self.digests: dict[str, str] = {}
        self.resumed: list[str] = []

    def run(self, stage: str, version: int, params: dict, upstream: list[str], fn: Callable[[], dict]) -> dict:
        """fn() -> {name: np.ndarray | JSON value}; cached under the digest of (stage, version, params, the digests
        of the `upstream` stages)."""
        digest = inputs_digest(stage, version, params, [self.digests[u] for u in upstream])
        self.digests[stage] = digest
        cached = self._load(stage, digest)
        if cached is not None:
            self.resumed.append(stage)
            self.log(f"stage {stage}: done before (inputs {digest[:12]}), reusing it")
            return cached
        out = fn()
        self._save(stage, digest, out)
        return out

    def _paths(self, stage: str) -> tuple[Path, Path]:
        return self.folder / f"{stage}.safetensors", self.folder / f"{stage}.json"

    def _load(self, stage: str, digest: str) -> dict | None:
        tensors, meta = self._paths(stage)
        try:
            head = json.loads(meta.read_text())
            if head.get("inputs") != digest:
                return None
            arrays = load_file(str(tensors))
            if sorted(arrays) != sorted(head.get("arrays", [])):
                return None
            return {**head["values"], **arrays}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None

    def _save(self, stage: str, digest: str, out: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._paths(stage)
        arrays = {k: np.ascontiguousarray(v) for k, v in out.items() if isinstance(v, np.ndarray)}
        values = {k: v for k, v in out.items() if not isinstance(v, np.ndarray)}
        tmp = tensors.with_name(f".{tensors.name}.tmp-{os.getpid()}")
        save_file(arrays, str(tmp))
        os.replace(tmp, tensors)
        tmp = meta.with_name(f".{meta.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"inputs": digest, "arrays": sorted(arrays), "values": values}, indent=1))
        os.replace(tmp, meta)
