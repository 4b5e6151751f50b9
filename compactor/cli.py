"""compactor command line: compress, compress-corpus, inspect, generate, eval, serve, plays."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .errors import CompactorError
from .fitting.presets import DEFAULT_PRESET, PRESETS

# the names of compactor.methods.METHODS, the one registry (spelled out so that the CLI starts without importing
# torch; tests/test_sweep.py checks the two agree)
METHOD_CHOICES = ["am", "eviction", "streaming", "random", "snapkv", "pyramidkv", "h2o", "tova", "knorm",
                  "expected_attention", "kvzip", "prototype"]
EVAL_METHODS = ["am", "eviction", "streaming", "random"]  # eval's default comparison; --sweep's default is all
SWEEP_RATIOS, SWEEP_KV = "2,5,10,20,50,100", "16,K4V4,q4_0"
SCORE_CHOICES = ("rms", "max", "kvzip", "kvzip_wo", "kvgrad", "kvzip_rms", "kvzip_wo_rms", "kvgrad_rms")


def _ratios(value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CompactorError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _load_calibration(path: str | None, disabled: bool, model_name: str):
    """The calibration file for compress: --calibration PATH, else artifacts/calibration/<model>.h5 when present;
    None with --no-calibration. Validated (fields, datasets, digest) before use."""
    from .storage.calibration_file import default_path, read_calibration

    if disabled:
        if path:
            raise click.UsageError("--calibration and --no-calibration exclude each other")
        return None
    if path is None:
        found = default_path(model_name)
        if not found.is_file():
            return None
        path = str(found)
    if Path(path).suffix.lower() == ".json":
        raise CompactorError(f"{path}: per-layer bits JSON files are no longer read; calibration files are .h5 "
                             "(make calibrate MODEL=...); for manual per-layer bits use --hi-layers/--hi-bits")
    cal = read_calibration(path)
    click.echo(f"using calibration {path} (sha256 {cal.digest[:12]})", err=True)
    return cal


def _shares(text: str | None, what: str) -> dict | None:
    """'context=0.5,repeat=0.5' -> {"context": 0.5, "repeat": 0.5}."""
    if text is None:
        return None
    out = {}
    try:
        for part in text.split(","):
            if part.strip():
                name, value = part.split("=")
                out[name.strip()] = float(value)
    except ValueError:
        raise CompactorError(f"{what}: expected name=number pairs separated by commas, got {text!r}") from None
    return out


def _method(name: str, seed: int, context: str, score: str | None, ridge: float, preset_name: str = "fast",
            **am_options):
    from .methods import method_from_options

    try:
        return method_from_options(name, seed, context, score, ridge, preset_name, **am_options)
    except ValueError as e:
        raise CompactorError(str(e)) from None


def _capture_opts(preset_name, budget, budget_floor, query_sources, self_study, on_policy, split_share) -> dict:
    """CompressOptions fields from the preset, overridden by the options given explicitly (not None)."""
    from .fitting.presets import preset

    opts = {"preset": preset_name, **preset(preset_name)["options"]}
    given = {"budget": budget, "budget_floor": budget_floor, "sources": _shares(query_sources, "--query-sources"),
             "self_study": self_study, "on_policy": on_policy, "split_share": split_share}
    opts.update({k: v for k, v in given.items() if v is not None})
    opts.setdefault("budget", "layer")
    opts.setdefault("budget_floor", 0.75)
    if opts.get("sources") is not None:
        from .capture.prefill import source_shares

        try:
            source_shares(opts["sources"], 0.5)
        except ValueError as e:
            raise CompactorError(f"--query-sources: {e}") from None
    return opts


def _am_options(source_weights, beta_floor, value_anchor, value_fit, selection, omp_keys, omp_refit,
                beta_ridge=None) -> dict:
    return {"source_weights": _shares(source_weights, "--source-weights"), "beta_floor": beta_floor,
            "beta_ridge": beta_ridge,
            "value_anchor": value_anchor, "value_fit": value_fit, "selection": selection, "omp_keys": omp_keys,
            "omp_refit": omp_refit}


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CompactorError("--device cuda asked for, but no CUDA device is available")
    return name


def method_options(f):
    f = click.option("--method", type=click.Choice(METHOD_CHOICES), default="am", show_default=True,
                     help="Compaction method (am = Attention Matching; the others are baselines).")(f)
    f = click.option("--context", type=click.Choice(["full", "causal"]), default="full", show_default=True,
                     help="AM: whether a document query is matched over the whole prefix or its causal past.")(f)
    f = click.option("--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET,
                     show_default=True, help="Defaults for the options below: fast = highest RMS attention and "
                                             "layer budgets; quality = the best recall + continuation combination "
                                             "(benchmarks/results_quality.md). Explicit options override.")(f)
    f = click.option("--score", type=click.Choice(list(SCORE_CHOICES)), default=None,
                     help="Key score (default: the preset's): rms/max over reference queries; kvzip, kvzip_wo, "
                          "kvgrad from a reconstruction probe; *_rms mixes with rms.")(f)
    f = click.option("--ridge", type=float, default=1e-3, show_default=True,
                     help="AM value fit: relative ridge strength (toward the original values).")(f)
    f = click.option("--source-weights", default=None,
                     help="AM fits: per-source query weights, e.g. repeat=2,context=1.")(f)
    f = click.option("--beta-ridge", type=click.FloatRange(min=0), default=None,
                     help="AM: pull the NNLS weights toward 1 (beta toward 0), relative strength (quality: 0.01).")(f)
    f = click.option("--beta-floor", type=float, default=None,
                     help="AM: keep every selected key with beta >= this (default: drop keys with weight 0).")(f)
    f = click.option("--value-anchor", type=float, default=None,
                     help="AM: extra ridge toward the original values of copy-like keys (needs a probe score).")(f)
    f = click.option("--value-fit", type=click.Choice(["all", "check", "select", "none"]), default=None,
                     help="AM: refit values everywhere, only where held-out queries improve (check; select also "
                          "falls back to eviction of the same keys where that is better), or never.")(f)
    f = click.option("--selection", type=click.Choice(["top", "omp"]), default=None,
                     help="AM key selection: highest score, or OMP on the attention mass.")(f)
    f = click.option("--omp-keys", type=click.IntRange(min=1), default=None, help="OMP: keys added per step.")(f)
    f = click.option("--omp-refit", type=click.IntRange(min=1), default=None, help="OMP: NNLS refit every N steps.")(f)
    return f


def capture_options(f):
    f = click.option("--model", "model_name", default="smollm2-135m", show_default=True,
                     help="Bundled name, local Hugging Face folder, or hub id.")(f)
    f = click.option("--budget", type=click.Choice(["uniform", "global", "layer", "split", "pyramid"]), default=None,
                     help="Per-head budgets (default: the preset's): equal; one budget shared by all heads and "
                          "layers; that shared budget split equally within each layer; split: --split-share "
                          "by RMS attention with layer budgets, the rest by the key score with one global budget; "
                          "or pyramid: PyramidKV's layer budgets, falling linearly from the first layer to the "
                          "last.")(f)
    f = click.option("--split-share", type=click.FloatRange(0, 1), default=None,
                     help="--budget split: share of the entries chosen by RMS attention (default 0.5).")(f)
    f = click.option("--budget-floor", type=click.FloatRange(0, 1), default=None,
                     help="global/layer budgets: share of the uniform budget every head keeps at least "
                          "(default: the preset's).")(f)
    f = click.option("--query-sources", default=None,
                     help="Reference-query shares, e.g. context=0.4,repeat=0.4,self_study=0.2,random=0 "
                          "(default: the preset's, else context/repeat by --repeat-fraction).")(f)
    f = click.option("--self-study", type=click.IntRange(min=0), default=None,
                     help="Question/answer texts the model writes for self_study queries (default 4).")(f)
    f = click.option("--on-policy", type=click.IntRange(min=0), default=None,
                     help="AM: refit in N layer groups on queries recaptured through the compacted earlier layers "
                          "(0 = off).")(f)
    f = click.option("--chunk-size", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Prefill chunk (tokens).")(f)
    f = click.option("--max-queries", type=click.IntRange(min=1), default=4096, show_default=True,
                     help="Reference queries per KV head (random subsample, seeded).")(f)
    f = click.option("--repeat-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                     help="Share of reference queries from the repeat pass (the rest from the document).")(f)
    f = click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    return f


class _Group(click.Group):
    """Turns CompactorError (bad input the user can fix) into a one-line `Error: ...` and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CompactorError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group)
@click.version_option(package_name="compactor")
def cli():
    """Compress a document's KV cache into a small .h5 artifact, inspect it, and generate from it."""


def compression_options(f):
    """What is compressed and how it is stored (`compress` and `compress-corpus`); read back by
    `_compress_options`. Applied last option first, so that --help lists them in this order."""
    f = click.option("--no-calibration", is_flag=True, help="Do not use a calibration file, even the default one.")(f)
    f = click.option("--calibration", type=click.Path(), default=None,
                     help="Calibration file from `make calibrate` (default: artifacts/calibration/<model>.h5 when "
                          "present): fitted codebooks, measured per-layer/per-phase bits, head budgets.")(f)
    f = click.option("--hi-bits", default="K8V8", show_default=True, help="Storage of the --hi-layers.")(f)
    f = click.option("--hi-layers", default="", help="Comma-separated layers (negative from the end, e.g. 0,-1) "
                                                     "stored at --hi-bits instead.")(f)
    f = click.option("--kv-bits", default="16", show_default=True,
                     help="Quantize stored keys/values: K<b>V<b> Lloyd-Max bits (e.g. K4V3), q4_0, q8_0; "
                          "16 = none.")(f)
    f = click.option("--chat", is_flag=True, help="Wrap each document in the model's chat template as the opening "
                                                  "of the first user turn, for `generate --question` (see README, "
                                                  "Chat).")(f)
    f = click.option("--dtype", "stored_dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
                     default="bfloat16", show_default=True, help="Stored dtype of compact keys and values.")(f)
    f = click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Compress only the first N tokens of each document.")(f)
    f = click.option("--ratio", type=float, default=10.0, show_default=True,
                     help="Compression ratio r: keep ceil(T/r).")(f)
    return f


def _compress_options(ratio, max_tokens, stored_dtype, chat, kv_bits, hi_layers, hi_bits, calibration, no_calibration,
                      model_name, budget, budget_floor, chunk_size, max_queries, repeat_fraction, seed, preset,
                      query_sources, self_study, on_policy, split_share):
    """CompressOptions from the values of compression_options, method_options and capture_options (the preset
    fills in what is not given)."""
    from .pipeline import CompressOptions

    if ratio < 1:
        raise CompactorError(f"--ratio must be >= 1 (got {ratio})")
    return CompressOptions(ratio=ratio, chunk_size=chunk_size, max_queries=max_queries,
                           repeat_fraction=repeat_fraction, seed=seed, max_tokens=max_tokens,
                           stored_dtype=stored_dtype, kv_bits=kv_bits,
                           hi_layers=_int_list(hi_layers, "--hi-layers"), hi_bits=hi_bits,
                           calibration=_load_calibration(calibration, no_calibration, model_name), chat=chat,
                           **_capture_opts(preset, budget, budget_floor, query_sources, self_study, on_policy,
                                          split_share))


@cli.command()
@click.argument("documents", nargs=-1)
@click.option("--play", multiple=True, help="A bundled Shakespeare play by name (e.g. macbeth), instead of a path.")
@click.option("-o", "--out", "out", type=click.Path(), default=None,
              help="Output file (one document) or folder (default: artifacts/).")
@click.option("--report", is_flag=True, help="Print a quality report (cKL, recall retention, fidelity, bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (artifacts, sizes, timings) instead "
                                                      "of text.")
@click.option("--no-clobber", is_flag=True, help="Refuse to overwrite an existing artifact.")
@compression_options
@method_options
@capture_options
def compress(documents, play, ratio, max_tokens, stored_dtype, out, report, chat, as_json, kv_bits, hi_layers, hi_bits,
             calibration, no_calibration, no_clobber, method, context, score, ridge, preset, source_weights,
             beta_floor, beta_ridge, value_anchor, value_fit, selection, omp_keys, omp_refit, model_name, budget,
             split_share, budget_floor, query_sources, self_study, on_policy, chunk_size, max_queries,
             repeat_fraction, seed, device, quiet):
    """Compress DOCUMENTS (.txt/.md paths, or - for stdin) into artifacts/<name>.h5 each."""
    from .storage.artifact import read_artifact, read_meta
    from .capture.documents import bundled_play, read_document
    from .models import load_model
    from .pipeline import compress as run_compress, estimate_artifact_bytes, plan_for, prepare
    from .storage.output import check_outputs

    if not documents and not play:
        raise click.UsageError("give at least one document path, '-' for stdin, or --play NAME")
    if ratio < 1:
        raise CompactorError(f"--ratio must be >= 1 (got {ratio})")
    docs = [read_document(p) for p in documents] + [bundled_play(p) for p in play]
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise CompactorError(f"two documents share the name {next(n for n in names if names.count(n) > 1)!r}; "
                             "compress them in separate calls with -o")
    if out and len(docs) > 1 and Path(out).suffix == ".h5":
        raise CompactorError("-o names one file but several documents were given; pass a folder")
    opts = _compress_options(ratio, max_tokens, stored_dtype, chat, kv_bits, hi_layers, hi_bits, calibration,
                             no_calibration, model_name, budget, budget_floor, chunk_size, max_queries,
                             repeat_fraction, seed, preset, query_sources, self_study, on_policy, split_share)
    m = _method(method, seed, context, score, ridge, preset,
                **_am_options(source_weights, beta_floor, value_anchor, value_fit, selection, omp_keys, omp_refit,
                             beta_ridge))
    lm = load_model(model_name, device=_device(device))
    if opts.calibration is not None:
        from .pipeline import calibrated_budget_mode
        from .storage.calibration_file import check_calibration_model

        check_calibration_model(opts.calibration, lm)
        if budget is None:  # the preset's mode, which the calibration's head budgets may replace
            opts.budget = calibrated_budget_mode(opts.calibration, opts.budget)
    prepared = [prepare(lm, doc, opts) for doc in docs]  # every document is checked before any work starts
    paths = [Path(out) if out and Path(out).suffix == ".h5" else Path(out or "artifacts") / f"{d.name}.h5"
             for d in docs]
    existing = check_outputs(paths, [estimate_artifact_bytes(lm, ids.numel(), opts) for ids in prepared],
                             clobber=not no_clobber)  # and every output location
    results = []
    for doc, doc_ids, path in zip(docs, prepared, paths):
        t0 = time.perf_counter()
        written, layers, capture, ids = run_compress(lm, doc, m, path, opts, progress=not quiet, ids=doc_ids)
        wall = time.perf_counter() - t0
        if not as_json:
            click.echo(f"{'overwrote' if path in existing else 'wrote'} {written} ({written.stat().st_size:,} bytes; "
                       f"T={capture.length} tokens, {method} at {ratio:g}x{', chat-wrapped' if chat else ''})")
        row = None
        if report:
            seconds = read_meta(written)["seconds"]["compact"]
            row = _report(lm, doc, capture, layers, method, ratio, plan_for(lm, doc, capture.length, opts), opts,
                          seconds, echo=not as_json)
        if as_json:
            summary = _artifact_summary(read_artifact(written, verify=False), written)
            summary["seconds"]["total"] = round(wall, 3)
            results.append({**summary, "report": row.as_dict() if row is not None else None})
    if as_json:
        click.echo(json.dumps({"artifacts": results}, indent=2))


@cli.command(name="compress-corpus")
@click.argument("corpus")
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), required=True,
              help="Output folder: <id>.h5 per document, manifest.jsonl, manifest/rank-*.jsonl.")
@click.option("--device-map", default=None,
              help="Spread one model over devices (accelerate): auto, balanced, sequential (over this host's GPUs, "
                   "split among its ranks under torchrun), or a JSON file {module name: device}.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object instead of text.")
@compression_options
@method_options
@capture_options
def compress_corpus(corpus, out, device_map, as_json, ratio, max_tokens, stored_dtype, chat, kv_bits, hi_layers,
                    hi_bits, calibration, no_calibration, method, context, score, ridge, preset, source_weights,
                    beta_floor, beta_ridge, value_anchor, value_fit, selection, omp_keys, omp_refit, model_name,
                    budget, split_share, budget_floor, query_sources, self_study, on_policy, chunk_size, max_queries,
                    repeat_fraction, seed, device, quiet):
    """Compress every document of CORPUS (a folder of .txt/.md, a glob, or a .jsonl of {"id", "text"}) into
    OUT/<id>.h5, skipping those already done; one process, or many under torchrun (see README, Corpus)."""
    from .corpus import distributed
    from .corpus.listing import list_corpus
    from .corpus.runner import format_summary, run_corpus
    from .models import load_model

    if device_map is not None and device != "auto":
        raise click.UsageError("give --device or --device-map, not both")
    opts = _compress_options(ratio, max_tokens, stored_dtype, chat, kv_bits, hi_layers, hi_bits, calibration,
                             no_calibration, model_name, budget, budget_floor, chunk_size, max_queries,
                             repeat_fraction, seed, preset, query_sources, self_study, on_policy, split_share)
    m = _method(method, seed, context, score, ridge, preset,
                **_am_options(source_weights, beta_floor, value_anchor, value_fit, selection, omp_keys, omp_refit,
                             beta_ridge))
    dmap = None if device_map is None else distributed.read_device_map(device_map)
    dev = _device(device)
    world = distributed.init_world(cuda=dev == "cuda")
    try:
        entries = list_corpus(corpus)
        lm = load_model(model_name, **distributed.placement(world, dev, dmap))
        summary = run_corpus(lm, entries, m, opts, out, world, progress=not quiet)
    finally:
        world.close()
    if world.rank != 0:  # rank 0 reports (and alone exits non-zero: torchrun then stops no rank mid-way)
        return
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if summary["failed"]:
        raise CompactorError(f"{summary['failed']} of {summary['documents']} documents failed (see "
                             f"{summary['manifest']})")


def _artifact_summary(art, path) -> dict:
    """Sizes and layout of an artifact: file, stored payload (by kind), the full 16-bit cache of the same prefix,
    and the serving memory, measured from the tensors each load path builds: dequantized (16-bit keys/values
    padded per layer + float32 beta) and as stored (ragged, codes kept; per-phase layers are served dequantized)."""
    from .evaluation.metrics import full_cache_bytes
    from .serving.loader import artifact_is_phased, decode_layers, served_bytes
    from .storage.kv_codec import byte_breakdown

    meta = art.meta
    layers = decode_layers(art)  # also checks that every layer decodes
    lengths = [int(x) for layer in layers for x in layer.lengths]
    full = full_cache_bytes(len(layers), int(meta["num_kv_heads"]), art.T, int(meta["head_dim"]))
    padded, as_stored = served_bytes([(layer.arrays, layer.attrs) for layer in art.layers], layers, art.codebooks,
                                     int(meta["head_dim"]), art.T)
    return {
        "path": str(path), "document": meta.get("document_name"), "model_id": meta["model_id"],
        "T": art.T, "ratio": meta["ratio"], "method": meta["method"], "kv_bits": meta.get("kv_bits"),
        "chat": meta.get("chat") is not None,
        "bytes": {"file": Path(path).stat().st_size, "payload": art.payload_bytes,
                  "payload_by_kind": byte_breakdown(art), "full_cache": full,
                  "memory": max(1, padded),  # heads keeping nothing: no 0
                  "memory_as_stored": max(1, as_stored),
                  "servable_as_stored": not artifact_is_phased(art)},
        "kept_per_head": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
                          "total": sum(lengths)},
        "seconds": dict(meta.get("seconds") or {}),
    }


def _report(lm, doc, capture, layers, method, ratio, plan, opts, seconds, echo=True):
    from .evaluation.harness import Evaluator, format_table

    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    C = min(256, ids.numel() - capture.length)
    if opts.chat:
        click.echo("report: not measured for a chat-wrapped document (the continuation follows the plain text)",
                   err=not echo)
        return None
    if C < 16:
        click.echo("report: the document has no text after the compressed prefix, so cKL cannot be measured; "
                   "use --max-tokens to hold some back", err=not echo)
        return None
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=C)
    row = ev.score(layers, method, ratio, seconds, plan.codecs, opts.stored_dtype, opts.seed, plan.codebooks)
    if echo:
        click.echo(f"\nquality report ({doc.name}: T={capture.length}, continuation C={C}):")
        click.echo(format_table([row]))
        click.echo(f"recall CE (nats/token): full {ev.ce_full:.3f}, compressed {row.ce:.3f}, no prefix "
                   f"{ev.ce_none:.3f}")
    return row


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Forensics: skip the digest comparison (structure, sizes and "
              "attributes are still checked; the cache may have been altered).")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata, sizes and integrity verdict as JSON "
                                                      "(exit status 1 when the integrity check fails).")
def inspect(artifact, no_verify, as_json):
    """Summarise an artifact and verify its integrity (digest over every attribute and dataset)."""
    from .storage.artifact import read_artifact

    checked = ("digest over every attribute and dataset" if not no_verify
               else "structure and sizes only (digest NOT checked: the content may have been altered)")
    try:
        art = read_artifact(artifact, verify=not no_verify)
        summary = _artifact_summary(art, artifact)
    except CompactorError as e:
        if not as_json:
            raise
        click.echo(json.dumps({"path": str(artifact), "integrity": {"ok": False, "checked": checked,
                                                                     "error": str(e)}}, indent=2))
        raise SystemExit(1) from None
    meta = art.meta
    if as_json:
        shown = {k: v for k, v in meta.items() if k not in ("model_weights_signature", "codecs")}
        if "model_weights" in shown:
            shown["model_weights"] = {k: v for k, v in shown["model_weights"].items() if k != "kept"}
        click.echo(json.dumps({**summary, "integrity": {"ok": True, "checked": checked}, "meta": shown},
                              indent=2, default=str))
        return
    size, payload, full, memory = (summary["bytes"][k] for k in ("file", "payload", "full_cache", "memory"))
    kept = summary["kept_per_head"]
    click.echo(f"{artifact}: {meta['format']} v{meta['format_version']} (compactor {meta['compactor_version']}, "
               f"{meta['created']})")
    click.echo(f"  model      {meta['model_id']} ({meta.get('model_type', '?')}), config sha256 "
               f"{meta['model_config_sha256'][:12]}, tokenizer sha256 {meta['tokenizer_sha256'][:12]}")
    click.echo(f"  document   {meta.get('document_name', '?')} sha256 {meta['document_sha256'][:12]}, "
               f"T={art.T} tokens" + (", chat-wrapped (first user turn)" if summary["chat"] else ""))
    click.echo(f"  method     {meta['method']} at {meta['ratio']:g}x {json.dumps(meta['method_params'])}")
    click.echo(f"  layout     {len(art.layers)} layers x {meta['num_kv_heads']} KV heads x d={meta['head_dim']}, "
               f"K/V stored as {meta.get('kv_bits', '?')}; kept per head min {kept['min']} / mean "
               f"{kept['mean']:.1f} / max {kept['max']} ({kept['total']} entries)")
    parts = ", ".join(f"{k} {v:,}" for k, v in summary["bytes"]["payload_by_kind"].items())
    click.echo(f"  stored     {payload:,} bytes ({parts}); file {size:,} bytes")
    click.echo(f"  vs full    full 16-bit cache {full:,} bytes: {full / payload:.1f}x smaller stored, "
               f"{full / size:.1f}x on disk, {full / memory:.1f}x in memory when served "
               f"(dequantized: 16-bit keys/values padded per layer + beta, {memory:,} bytes)")
    as_stored = summary["bytes"]["memory_as_stored"]
    if not summary["bytes"]["servable_as_stored"]:
        click.echo("  served     dequantized (per-phase codecs: load_cache serves them with keep_quantized=False)")
    else:
        click.echo(f"  served     as stored (load_cache keep_quantized=True, ragged heads, codes kept): "
                   f"{as_stored:,} bytes, {full / as_stored:.1f}x smaller than the full cache")
    click.echo("             (both memory figures measured from the tensors each load path builds)")
    if art.version == 1:
        integrity = ("v1 file: per-chunk checksums and payload digest OK; v1 does not cover attributes, "
                     "re-compress to get a v2 file" if not no_verify else "v1 file: per-chunk checksums OK, "
                     "digest NOT checked (--no-verify)")
    else:
        integrity = ("digest over every attribute and dataset OK" if not no_verify else
                     "digest NOT checked (--no-verify): structure and sizes valid, content may have been altered")
    click.echo("  integrity  " + integrity)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, help="Raw text that continues the document (repeatable).")
@click.option("--question", "questions", multiple=True,
              help="A user question (repeatable): after a --chat artifact it continues the document's user turn, "
                   "followed by the assistant header; after a raw-text artifact it opens a chat of its own.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True,
              help="Sampling temperature; 0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling (with --temperature > 0).")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--no-stream", is_flag=True, help="Print each answer when it is complete instead of token by token.")
@click.option("--model", "model_name", default=None,
              help="Model (default: the artifact's model, only when that is a bundled name).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def generate(artifact, prompts, questions, max_new_tokens, temperature, top_p, seed, no_stream, model_name, device):
    """Continue after the compacted document with each --prompt / --question (one model load) and print the
    answers as they are generated."""
    from .storage.artifact import read_meta
    from .models import load_model
    from .serving.answer import Sampling, generate as run_generate, is_chat, messages_ids, text_ids
    from .serving.loader import artifact_model, load_cache

    if not prompts and not questions:
        raise click.UsageError("give at least one --prompt or --question")
    meta = read_meta(artifact)
    if questions and not is_chat(meta):
        click.echo("note: this artifact holds raw text; a question opens a chat of its own after it. Compress with "
                   "--chat to ask questions about the document in its own user turn.", err=True)
    lm = load_model(artifact_model(meta, model_name), device=_device(device))
    cache = load_cache(artifact, lm.model, lm.tokenizer)  # checked against the model, digest verified
    sampling = Sampling(max_new_tokens, temperature, top_p, seed).check()
    jobs = [(p, text_ids(lm.tokenizer, p)) for p in prompts]
    jobs += [(q, messages_ids(cache.metadata, lm.tokenizer, [{"role": "user", "content": q}])) for q in questions]
    for i, (text, ids) in enumerate(jobs):
        if len(jobs) > 1:
            click.echo(("\n" if i else "") + f"### {text.strip()}")
        streamer = None if no_stream else echo_streamer(lm.tokenizer)
        result = run_generate(lm.model, lm.tokenizer, cache, ids, sampling, streamer=streamer)
        if no_stream:
            click.echo(result.text)


def echo_streamer(tokenizer):
    """transformers' TextStreamer, printing through click (so it lands wherever click's output goes)."""
    from transformers import TextStreamer

    class EchoStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            click.echo(text, nl=stream_end)

    return EchoStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@cli.command(name="eval")
@click.argument("documents", nargs=-1)
@click.option("--play", "plays_", multiple=True, help="A bundled play instead of a path (repeatable with --sweep).")
@click.option("-T", "T", type=click.IntRange(min=2), default=2048, show_default=True, help="Prefix tokens.")
@click.option("-C", "C", type=click.IntRange(min=1), default=256, show_default=True, help="Continuation tokens.")
@click.option("--ratios", default=None, help="Comma-separated ratios (default 2,5,10,20,50; --sweep: "
                                             f"{SWEEP_RATIOS}).")
@click.option("--methods", default=None, help=f"Comma-separated methods of {', '.join(METHOD_CHOICES)} (default "
                                              f"{','.join(EVAL_METHODS)}; --sweep: all).")
@click.option("--json", "json_out", type=click.Path(allow_dash=True), default=None,
              help="Also write the rows as JSON to this file; '-' prints only the JSON on stdout (table on stderr).")
@click.option("--kv-bits", "kv_bits", default=None,
              help="Comma-separated storages to evaluate, e.g. 16,K4V3,q4_0 (see compress --kv-bits; default 16; "
                   f"--sweep: {SWEEP_KV}).")
@click.option("--sweep", is_flag=True, help="Every method x ratio x storage x document x --lengths into --out: "
                                            "CSV, Markdown, PNG; resumable (rerun the same command) and seeded.")
@click.option("--out", "sweep_out", type=click.Path(file_okay=False), default="sweep", show_default=True,
              help="--sweep: output folder (rows/, sweep.csv, sweep.md, sweep_T<T>.png).")
@click.option("--lengths", default=None, help="--sweep: comma-separated prefix lengths T (default: -T).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="--sweep: (document, T) units measured at once, each in its own process with its own model.")
@click.option("--model-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="--sweep: model weights (float32 keeps GPU rows comparable with CPU rows).")
@method_options
@capture_options
def eval_cmd(documents, plays_, T, C, ratios, methods, json_out, kv_bits, sweep, sweep_out, lengths, jobs,
             model_dtype, method, context, score, ridge, preset, source_weights, beta_floor, beta_ridge, value_anchor,
             value_fit, selection, omp_keys, omp_refit, model_name, budget, split_share, budget_floor, query_sources,
             self_study, on_policy, chunk_size, max_queries, repeat_fraction, seed, device, quiet):
    """Compare AM and the baselines on one document: cKL, recall retention, attention fidelity, bytes.
    With --sweep, over many documents, lengths, methods, ratios and storages (the methods take --preset's defaults
    and budget; the other method and capture options are not used)."""
    from .capture.documents import bundled_play, read_document
    from .evaluation.harness import Evaluator, format_table
    from .models import load_model
    from .capture.prefill import prefill_and_capture

    names = [m.strip() for m in (methods or ",".join(METHOD_CHOICES if sweep else EVAL_METHODS)).split(",")
             if m.strip()]
    for n in names:
        if n not in METHOD_CHOICES:
            raise click.BadParameter(f"unknown method {n!r}; choose from {', '.join(METHOD_CHOICES)}")
    from .storage.kv_codec import parse_kv_bits

    bits = [b.strip() for b in (kv_bits or (SWEEP_KV if sweep else "16")).split(",") if b.strip()]
    for b in bits:
        try:
            parse_kv_bits(b)
        except ValueError as e:
            raise CompactorError(str(e)) from None
    ratio_list = _ratios(ratios or (SWEEP_RATIOS if sweep else "2,5,10,20,50"))
    if any(not r >= 1 for r in ratio_list) or not ratio_list:
        raise CompactorError("--ratios: give ratios >= 1")
    if sweep:
        from .evaluation.sweep import SweepSpec, run_sweep

        docs = list(plays_) + list(documents)
        if not docs:
            raise click.UsageError("--sweep needs documents or --play names")
        Ts = list(_int_list(lengths, "--lengths")) if lengths else [T]
        if not Ts or min(Ts) < 2:
            raise CompactorError("--lengths: give prefix lengths >= 2")
        spec = SweepSpec(docs, Ts, names, ratio_list, bits, C=C, seed=seed, model=model_name, dtype=model_dtype,
                         device=_device(device), preset=preset, max_queries=max_queries)
        rows = run_sweep(spec, sweep_out, jobs=jobs, progress=not quiet)
        click.echo(f"{len(rows)} rows in {Path(sweep_out) / 'sweep.csv'}; summary in "
                   f"{Path(sweep_out) / 'sweep.md'}", err=quiet)
        return
    if len(documents) + len(plays_) != 1:
        raise click.UsageError("give exactly one of DOCUMENT or --play")
    from .pipeline import probe_for

    opts = _capture_opts(preset, budget, budget_floor, query_sources, self_study, on_policy, split_share)
    am_opts = _am_options(source_weights, beta_floor, value_anchor, value_fit, selection, omp_keys, omp_refit,
                          beta_ridge)
    ms = [_method(n, seed, context, score, ridge, preset, **am_opts) for n in names]
    probes = {probe_for(m) for m in ms}
    probe = "gradient" if "gradient" in probes else ("attention" if "attention" in probes else "none")
    doc = bundled_play(plays_[0]) if plays_ else read_document(documents[0])
    lm = load_model(model_name, device=_device(device))
    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    if ids.numel() < T + C:
        raise CompactorError(f"document {doc.name!r} has {ids.numel()} tokens; eval needs T+C={T + C}")
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids[:T], chunk_size=chunk_size, max_queries=max_queries,
                                  repeat_fraction=repeat_fraction, seed=seed, progress=not quiet, probe=probe,
                                  sources=opts.get("sources"), self_study=opts.get("self_study", 4))
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=C)
    rows = ev.run(ms, ratio_list, opts["budget"], opts["budget_floor"], progress=not quiet, kv_bits=bits,
                  seed=seed, on_policy=opts.get("on_policy", 0), split_share=opts.get("split_share", 0.5))
    to_stderr = json_out == "-"
    click.echo(format_table(rows), err=to_stderr)
    click.echo(f"recall CE (nats/token): full {ev.ce_full:.3f}, no prefix {ev.ce_none:.3f}", err=to_stderr)
    if json_out:
        text = json.dumps([r.as_dict() for r in rows], indent=2)
        if to_stderr:
            click.echo(text)
        else:
            Path(json_out).write_text(text)


@cli.command()
@click.argument("folder", type=click.Path(), default="artifacts")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="The one model served; artifacts made for another are refused (409).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-documents", type=click.IntRange(min=1), default=4, show_default=True,
              help="Artifacts kept loaded in memory (least recently used evicted first).")
@click.option("--max-memory-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Also evict while the loaded caches hold more than this (MiB of keys, values and beta).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Largest max_tokens a request may ask for.")
def serve(folder, host, port, model_name, device, max_documents, max_memory_mb, max_new_tokens):
    """Serve the artifacts of FOLDER over an OpenAI-compatible HTTP API (see README, Server)."""
    import uvicorn

    from .models import load_model
    from .serving.loader import prepare_model
    from .serving.server import DocumentStore, create_app

    lm = load_model(model_name, device=_device(device))
    prepare_model(lm.model)
    max_bytes = None if max_memory_mb is None else int(max_memory_mb * 2**20)
    store = DocumentStore(folder, lm.model, lm.tokenizer, max_documents, max_bytes)
    click.echo(f"serving {len(store.names())} document(s) from {store.folder} with {model_name} on "
               f"http://{host}:{port}", err=True)
    uvicorn.run(create_app(store, model_name, max_new_tokens), host=host, port=port, log_level="warning")


@cli.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Bundled name, local Hugging Face folder, or hub id.")
@click.option("--corpus", default=None, help="Folder of .txt/.md files or a .jsonl of texts (default: the bundled "
                                             "plays).")
@click.option("--traces", "traces_path", default=None, help="A .jsonl of saved reasoning traces to use instead of "
                                                            "generating them (phases from their markers).")
@click.option("-o", "--out", default=None, help="Calibration file (default: artifacts/calibration/<model>.h5).")
@click.option("--report-dir", default=None, help="Report folder (default: beside the file, <model>_report/).")
@click.option("--docs", type=click.IntRange(min=1), default=None, help="Calibration documents (one more is held out).")
@click.option("--doc-tokens", type=click.IntRange(min=32), default=None, help="Prefix tokens per document.")
@click.option("--n-traces", type=click.IntRange(min=2), default=None, help="Reasoning traces to generate.")
@click.option("--think-tokens", type=click.IntRange(min=1), default=None,
              help="A forced </think> after this many thinking tokens.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def calibrate(model_name, corpus, traces_path, out, report_dir, docs, doc_tokens, n_traces, think_tokens, seed, device,
              quiet):
    """Calibrate a model once: ρ per phase, fitted codebooks, bit allocations, head budgets -> an .h5 file that
    compress then uses, and a report. Stages are cached: a rerun resumes."""
    from dataclasses import replace

    from .calibrate import Settings, calibrate as run_calibration
    from .models import load_model

    s = Settings(seed=seed)
    for name, value in (("docs", docs), ("doc_tokens", doc_tokens), ("traces", n_traces),
                        ("think_tokens", think_tokens)):
        if value is not None:
            s = replace(s, **{name: value})
    lm = load_model(model_name, device=_device(device))
    path, md = run_calibration(lm, corpus, traces_path, out, report_dir, s, progress=not quiet)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes) and {md}")


@cli.command()
def plays():
    """List the bundled Shakespeare plays."""
    from .capture.documents import list_plays

    click.echo("\n".join(list_plays()))


def main():
    cli()
