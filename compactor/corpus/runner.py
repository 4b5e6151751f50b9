"""One rank's share of a corpus run: skip what is done, compress the rest, record every document, sum up.

A document is done when OUTDIR/<id>.h5 exists, reads back with its digest verified, and was made from the same
text (document_sha256), with the same options (extra.corpus.options_sha256: sha256 of every compression option
and the method's parameters) and the same model (config, tokenizer and weights identity digests); it is then
skipped. Anything else (no file, a damaged one, other options, an edited document) is compressed again and the
artifact replaced atomically (storage/output.py). A document that fails (unreadable, too long, a bad id, an error
while compressing, out of GPU memory) is recorded as failed and the run goes on.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import CompactorError
from ..methods import Method
from ..models import LoadedModel, config_fingerprint, tokenizer_fingerprint, weights_identity
from ..pipeline import CompressOptions, build_artifact, estimate_artifact_bytes, prepare
from ..storage.artifact import read_artifact, write_artifact
from ..storage.output import check_output
from . import manifest
from .distributed import World
from .listing import Entry, listing_digest, read_entry
from .sharding import lpt_assign

#: test hook: "RANK:N" makes that rank exit at once (os._exit, like a kill) after compressing N documents, when its
#: next document is compacted but not yet written
EXIT_HOOK = "COMPACTOR_CORPUS_TEST_EXIT"
#: bytes-per-token sample (with --max-tokens): this many documents, this many characters of each
SAMPLE_DOCS, SAMPLE_CHARS = 8, 1 << 16


def options_digest(method: Method, opts: CompressOptions) -> str:
    """sha256 of every compression option and the method's name and parameters (canonical JSON)."""
    fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
    if fields.get("calibration") is not None:  # a loaded calibration file: its digest (its repr holds an address)
        fields["calibration"] = fields["calibration"].digest
    if fields.get("layer_bits"):
        fields["layer_bits"] = {str(k): v for k, v in sorted(fields["layer_bits"].items())}
    blob = json.dumps({"options": fields, "method": method.name, "params": method.params()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact must record to have been made by this model."""

    config_sha256: str
    tokenizer_sha256: str
    weights_sha256: dict

    @classmethod
    def of(cls, lm: LoadedModel) -> "ModelIdentity":
        return cls(config_fingerprint(lm.config), tokenizer_fingerprint(lm.tokenizer),
                   dict(weights_identity(lm.model)["sha256"]))

    def matches(self, meta: dict) -> bool:
        return (meta.get("model_config_sha256") == self.config_sha256
                and meta.get("tokenizer_sha256") == self.tokenizer_sha256
                and dict((meta.get("model_weights") or {}).get("sha256") or {}) == self.weights_sha256)


def finished_artifact(path: Path, doc_sha256: str, options_sha256: str, identity: ModelIdentity) -> dict | None:
    """The verified meta of the artifact at `path` when it is this document compressed with these options by this
    model; None otherwise (missing, damaged, or made differently)."""
    if not path.is_file():
        return None
    try:
        meta = read_artifact(path).meta  # digest verified
    except CompactorError:
        return None
    corpus = (meta.get("extra") or {}).get("corpus") or {}
    if (meta.get("document_sha256") != doc_sha256 or corpus.get("options_sha256") != options_sha256
            or not identity.matches(meta)):
        return None
    return meta


def cost_caps(entries: list[Entry], tokenizer, max_tokens: int | None) -> list[int]:
    """Each entry's cost for the assignment: its bytes, capped with max_tokens at max_tokens x the bytes per token
    of a fixed sample (the first SAMPLE_DOCS readable documents, SAMPLE_CHARS characters each), the same on every
    rank."""
    costs = [e.cost for e in entries]
    if max_tokens is None:
        return costs
    n_bytes = n_tokens = sampled = 0
    for e in entries:
        if sampled == SAMPLE_DOCS:
            break
        if e.error:
            continue
        try:
            text = read_entry(e).text[:SAMPLE_CHARS]
        except CompactorError:
            continue
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer(text, add_special_tokens=False).input_ids)
        sampled += 1
    if not n_tokens:
        return costs
    cap = math.ceil(max_tokens * n_bytes / n_tokens)
    return [min(c, cap) for c in costs]


@dataclass
class RankTotals:
    rank: int
    assigned: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0          # of the documents compressed in this run
    skipped_tokens: int = 0
    seconds: float = 0.0     # this rank's loop, wall clock
    errors: list = field(default_factory=list)


def _exit_hook(rank: int) -> int | None:
    spec = os.environ.get(EXIT_HOOK, "")
    if ":" in spec:
        r, n = spec.split(":", 1)
        if r.strip() == str(rank):
            return int(n)
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(e, CompactorError) else f"{type(e).__name__}: {msg}"


def run_rank(lm: LoadedModel, entries: list[Entry], method: Method, opts: CompressOptions, out_dir: Path,
             world: World, run_id: str, progress: bool = True) -> RankTotals:
    """Compress this rank's share of `entries` into out_dir, appending to its manifest file."""
    out_dir = Path(out_dir)
    costs = cost_caps(entries, lm.tokenizer, opts.max_tokens)
    rank_of = lpt_assign(costs, world.size)
    mine = sorted((e for e, r in zip(entries, rank_of) if r == world.rank), key=lambda e: (-costs[e.index], e.index))
    options_sha256 = options_digest(method, opts)
    identity = ModelIdentity.of(lm)
    totals = RankTotals(world.rank, assigned=len(mine))
    exit_after = _exit_hook(world.rank)
    records = manifest.RankManifest(out_dir, world.rank, run_id)
    bar = tqdm(total=len(mine), desc=f"rank {world.rank}", unit="doc", position=world.local_rank,
               disable=not progress, dynamic_ncols=True, leave=True)
    t_start = time.perf_counter()
    try:
        for entry in mine:
            t0 = time.perf_counter()
            path = out_dir / f"{entry.id}.h5"
            try:
                doc = read_entry(entry)
                meta = finished_artifact(path, doc.sha256, options_sha256, identity)
                if meta is not None:
                    records.record(entry, "skipped", path=path, T=int(meta["T"]), nbytes=path.stat().st_size,
                                   seconds=time.perf_counter() - t0)
                    totals.skipped += 1
                    totals.skipped_tokens += int(meta["T"])
                    continue
                ids = prepare(lm, doc, opts)
                check_output(path, estimate_artifact_bytes(lm, ids.numel(), opts))
                done = build_artifact(lm, doc, method, opts, progress=False, ids=ids)
                if exit_after is not None and totals.done >= exit_after:
                    os._exit(75)
                art = done.artifact
                art.meta["corpus"] = {"id": entry.id, "options_sha256": options_sha256}
                write_artifact(path, art.meta, art.layers, art.codebooks)
                del done, art
                records.record(entry, "done", path=path, T=int(ids.numel()), nbytes=path.stat().st_size,
                               seconds=time.perf_counter() - t0)
                totals.done += 1
                totals.tokens += int(ids.numel())
            except Exception as e:  # one bad document must not stop the run: record it and go on
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                error = _one_line(e)
                records.record(entry, "failed", seconds=time.perf_counter() - t0, error=error)
                totals.failed += 1
                totals.errors.append(f"{entry.id}: {error}")
            finally:
                elapsed = time.perf_counter() - t_start
                bar.set_postfix_str(f"{totals.tokens:,} tok, {totals.tokens / max(elapsed, 1e-9):,.0f} tok/s, "
                                    f"{totals.skipped} skipped, {totals.failed} failed", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        records.close()
    totals.seconds = time.perf_counter() - t_start
    return totals


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def run_corpus(lm: LoadedModel, entries: list[Entry], method: Method, opts: CompressOptions, out_dir: str | Path,
               world: World, progress: bool = True) -> dict:
    """The whole run on this rank: agree on the run and the listing, compress this rank's share, wait for every
    rank, merge the manifests (rank 0). Returns the summary (every rank gets it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest, options = listing_digest(entries), options_digest(method, opts)
    run_id, digest0, options0 = world.broadcast((new_run_id(), digest, options))
    if digest0 != digest:
        raise CompactorError(f"rank {world.rank} lists the corpus differently from rank 0 (do all hosts see the same "
                             "files?)")
    if options0 != options:
        raise CompactorError(f"rank {world.rank} was given other compression options than rank 0")
    t0 = time.perf_counter()
    totals = run_rank(lm, entries, method, opts, out_dir, world, run_id, progress)
    world.barrier()
    wall = time.perf_counter() - t0
    counts = manifest.merge(out_dir, entries) if world.rank == 0 else None
    all_totals = world.gather(dataclasses.asdict(totals))
    counts = world.broadcast(counts)
    return summarize(all_totals, counts, wall, len(entries), out_dir)


def summarize(ranks: list[dict], counts: dict, wall: float, n_entries: int, out_dir: Path) -> dict:
    done = sum(r["done"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    return {"documents": n_entries, "done": done, "skipped": sum(r["skipped"] for r in ranks),
            "failed": sum(r["failed"] for r in ranks), "tokens": tokens, "seconds": round(wall, 3),
            "documents_per_s": done / wall if wall > 0 else 0.0, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "manifest": str(out_dir / manifest.MERGED), "manifest_counts": counts, "ranks": ranks}


def format_summary(s: dict) -> str:
    lines = [f"compressed {s['done']} of {s['documents']} documents ({s['tokens']:,} tokens) in {s['seconds']:.1f} s "
             f"on {len(s['ranks'])} rank(s): {s['documents_per_s']:.3g} documents/s, {s['tokens_per_s']:,.0f} "
             f"tokens/s; skipped {s['skipped']} (already done), failed {s['failed']}"]
    if len(s["ranks"]) > 1:
        for r in s["ranks"]:
            lines.append(f"  rank {r['rank']}: {r['assigned']} assigned, {r['done']} compressed ({r['tokens']:,} "
                         f"tokens, {r['seconds']:.1f} s), {r['skipped']} skipped, {r['failed']} failed")
    for r in s["ranks"]:
        for err in r["errors"][:20]:
            lines.append(f"  failed: {err}")
    lines.append(f"manifest: {s['manifest']}")
    return "\n".join(lines)
