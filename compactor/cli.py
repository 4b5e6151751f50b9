"""compactor command line: compress, inspect, generate, eval."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import CompactorError

METHOD_CHOICES = ["am", "eviction", "streaming", "random"]


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


def _method(name: str, seed: int, context: str, score: str, ridge: float):
    from .methods import make_method

    if name == "am":
        return make_method("am", score=score, context=context, ridge=ridge)
    if name == "eviction":
        return make_method("eviction", score=score, context=context)
    if name == "random":
        return make_method("random", seed=seed)
    return make_method(name)


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
    f = click.option("--score", type=click.Choice(["rms", "max"]), default="rms", show_default=True,
                     help="Key score: RMS or max over reference queries of the attention weight.")(f)
    f = click.option("--ridge", type=float, default=1e-3, show_default=True,
                     help="AM value fit: relative ridge strength (toward the original values).")(f)
    return f


def capture_options(f):
    f = click.option("--model", "model_name", default="smollm2-135m", show_default=True,
                     help="Bundled name, local Hugging Face folder, or hub id.")(f)
    f = click.option("--budget", type=click.Choice(["uniform", "global", "layer"]), default="layer",
                     show_default=True, help="Per-head budgets: equal; one budget shared by all heads and layers; "
                                             "or that shared budget split equally within each layer.")(f)
    f = click.option("--budget-floor", type=click.FloatRange(0, 1), default=0.75, show_default=True,
                     help="global/layer budgets: share of the uniform budget every head keeps at least.")(f)
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


@cli.command()
@click.argument("documents", nargs=-1)
@click.option("--play", multiple=True, help="A bundled Shakespeare play by name (e.g. macbeth), instead of a path.")
@click.option("--ratio", type=float, default=10.0, show_default=True, help="Compression ratio r: keep ceil(T/r).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Compress only the first N tokens of each document.")
@click.option("--dtype", "stored_dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Stored dtype of compact keys and values.")
@click.option("-o", "--out", "out", type=click.Path(), default=None,
              help="Output file (one document) or folder (default: artifacts/).")
@click.option("--report", is_flag=True, help="Print a quality report (cKL, recall retention, fidelity, bytes).")
@click.option("--kv-bits", default="16", show_default=True,
              help="Quantize stored keys/values: K<b>V<b> Lloyd-Max bits (e.g. K4V3), q4_0, q8_0; 16 = none.")
@click.option("--hi-layers", default="", help="Comma-separated layers (negative from the end, e.g. 0,-1) stored "
                                              "at --hi-bits instead.")
@click.option("--hi-bits", default="K8V8", show_default=True, help="Storage of the --hi-layers.")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration file from `make calibrate` (default: artifacts/calibration/<model>.h5 when present): "
                   "fitted codebooks, measured per-layer/per-phase bits, head budgets.")
@click.option("--no-calibration", is_flag=True, help="Do not use a calibration file, even the default one.")
@click.option("--no-clobber", is_flag=True, help="Refuse to overwrite an existing artifact.")
@method_options
@capture_options
@click.pass_context
def compress(ctx, documents, play, ratio, max_tokens, stored_dtype, out, report, kv_bits, hi_layers, hi_bits,
             calibration, no_calibration, no_clobber, method, context, score, ridge, model_name, budget, budget_floor,
             chunk_size,
             max_queries, repeat_fraction, seed, device, quiet):
    """Compress DOCUMENTS (.txt/.md paths, or - for stdin) into artifacts/<name>.h5 each."""
    from .storage.artifact import read_meta
    from .capture.documents import bundled_play, read_document
    from .models import load_model
    from .pipeline import CompressOptions, compress as run_compress, estimate_artifact_bytes, plan_for, prepare
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
    opts = CompressOptions(ratio=ratio, budget=budget, budget_floor=budget_floor, chunk_size=chunk_size,
                           max_queries=max_queries, repeat_fraction=repeat_fraction, seed=seed,
                           max_tokens=max_tokens, stored_dtype=stored_dtype, kv_bits=kv_bits,
                           hi_layers=_int_list(hi_layers, "--hi-layers"), hi_bits=hi_bits,
                           calibration=_load_calibration(calibration, no_calibration, model_name))
    lm = load_model(model_name, device=_device(device))
    if opts.calibration is not None:
        from .storage.calibration_file import check_calibration_model

        check_calibration_model(opts.calibration, lm)
        de = opts.calibration.meta["defaults"]
        if de["head_budgets"] and ctx.get_parameter_source("budget") == click.core.ParameterSource.DEFAULT:
            opts.budget = de["budget"]
    m = _method(method, seed, context, score, ridge)
    prepared = [prepare(lm, doc, opts) for doc in docs]  # every document is checked before any work starts
    paths = [Path(out) if out and Path(out).suffix == ".h5" else Path(out or "artifacts") / f"{d.name}.h5"
             for d in docs]
    existing = check_outputs(paths, [estimate_artifact_bytes(lm, ids.numel(), opts) for ids in prepared],
                             clobber=not no_clobber)  # and every output location
    for doc, doc_ids, path in zip(docs, prepared, paths):
        written, layers, capture, ids = run_compress(lm, doc, m, path, opts, progress=not quiet, ids=doc_ids)
        click.echo(f"{'overwrote' if path in existing else 'wrote'} {written} ({written.stat().st_size:,} bytes; "
                   f"T={capture.length} tokens, {method} at {ratio:g}x)")
        if report:
            seconds = read_meta(written)["seconds"]["compact"]
            _report(lm, doc, capture, layers, method, ratio, plan_for(lm, doc, capture.length, opts), opts, seconds)


def _report(lm, doc, capture, layers, method, ratio, plan, opts, seconds):
    from .evaluation.harness import Evaluator, format_table

    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    C = min(256, ids.numel() - capture.length)
    if C < 16:
        click.echo("report: the document has no text after the compressed prefix, so cKL cannot be measured; "
                   "use --max-tokens to hold some back")
        return
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=C)
    row = ev.score(layers, method, ratio, seconds, plan.codecs, opts.stored_dtype, opts.seed, plan.codebooks)
    click.echo(f"\nquality report ({doc.name}: T={capture.length}, continuation C={C}):")
    click.echo(format_table([row]))
    click.echo(f"recall CE (nats/token): full {ev.ce_full:.3f}, compressed {row.ce:.3f}, no prefix {ev.ce_none:.3f}")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Forensics: skip the digest comparison (structure, sizes and "
              "attributes are still checked; the cache may have been altered).")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def inspect(artifact, no_verify, as_json):
    """Summarise an artifact and verify its integrity (digest over every attribute and dataset)."""
    from .storage.artifact import read_artifact
    from .evaluation.metrics import full_cache_bytes

    art = read_artifact(artifact, verify=not no_verify)
    meta = art.meta
    if as_json:
        shown = {k: v for k, v in meta.items() if k not in ("model_weights_signature", "codecs")}
        if "model_weights" in shown:
            shown["model_weights"] = {k: v for k, v in shown["model_weights"].items() if k != "kept"}
        click.echo(json.dumps(shown, indent=2, default=str))
        return
    from .storage.kv_codec import byte_breakdown
    from .serving.loader import decode_layers

    layers = decode_layers(art)  # also checks that every layer decodes
    lengths = [int(x) for layer in layers for x in layer.lengths]
    memory = max(1, sum(layer.memory_bytes() for layer in layers))  # a cache whose heads keep nothing: no 0 division
    full = full_cache_bytes(len(layers), int(meta["num_kv_heads"]), art.T, int(meta["head_dim"]))
    size = Path(artifact).stat().st_size
    payload = art.payload_bytes
    click.echo(f"{artifact}: {meta['format']} v{meta['format_version']} (compactor {meta['compactor_version']}, "
               f"{meta['created']})")
    click.echo(f"  model      {meta['model_id']} ({meta.get('model_type', '?')}), config sha256 "
               f"{meta['model_config_sha256'][:12]}, tokenizer sha256 {meta['tokenizer_sha256'][:12]}")
    click.echo(f"  document   {meta.get('document_name', '?')} sha256 {meta['document_sha256'][:12]}, "
               f"T={art.T} tokens")
    click.echo(f"  method     {meta['method']} at {meta['ratio']:g}x {json.dumps(meta['method_params'])}")
    click.echo(f"  layout     {len(layers)} layers x {meta['num_kv_heads']} KV heads x d={meta['head_dim']}, "
               f"K/V stored as {meta.get('kv_bits', '?')}; kept per head min {min(lengths)} / mean "
               f"{sum(lengths) / len(lengths):.1f} / max {max(lengths)} ({sum(lengths)} entries)")
    parts = ", ".join(f"{k} {v:,}" for k, v in byte_breakdown(art).items())
    click.echo(f"  stored     {payload:,} bytes ({parts}); file {size:,} bytes")
    click.echo(f"  vs full    full 16-bit cache {full:,} bytes: {full / payload:.1f}x smaller stored, "
               f"{full / size:.1f}x on disk, {full / memory:.1f}x in memory when served "
               f"(16-bit keys/values padded per layer + beta: {memory:,} bytes)")
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
@click.option("--prompt", required=True, help="Text that follows the document.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--model", "model_name", default=None,
              help="Model (default: the artifact's model, only when that is a bundled name).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def generate(artifact, prompt, max_new_tokens, model_name, device):
    """Continue after the compacted document with PROMPT (greedy) and print the continuation."""
    from .storage.artifact import read_meta
    from .models import load_model
    from .serving.loader import artifact_model, load_cache

    lm = load_model(artifact_model(read_meta(artifact), model_name), device=_device(device))
    cache = load_cache(artifact, lm.model, lm.tokenizer)
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(lm.device)
    out = lm.model.generate(**cache.generation_inputs(ids), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.eos_token_id)
    click.echo(lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@cli.command(name="eval")
@click.argument("document", required=False)
@click.option("--play", default=None, help="A bundled play instead of a path.")
@click.option("-T", "T", type=click.IntRange(min=2), default=2048, show_default=True, help="Prefix tokens.")
@click.option("-C", "C", type=click.IntRange(min=1), default=256, show_default=True, help="Continuation tokens.")
@click.option("--ratios", default="2,5,10,20,50", show_default=True, help="Comma-separated ratios.")
@click.option("--methods", default=",".join(METHOD_CHOICES), show_default=True, help="Comma-separated methods.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the rows as JSON here.")
@click.option("--kv-bits", "kv_bits", default="16", show_default=True,
              help="Comma-separated storages to evaluate, e.g. 16,K4V3,q4_0 (see compress --kv-bits).")
@method_options
@capture_options
def eval_cmd(document, play, T, C, ratios, methods, json_out, kv_bits, method, context, score, ridge, model_name,
             budget, budget_floor, chunk_size, max_queries, repeat_fraction, seed, device, quiet):
    """Compare AM and the baselines on one document: cKL, recall retention, attention fidelity, bytes."""
    from .capture.documents import bundled_play, read_document
    from .evaluation.harness import Evaluator, format_table
    from .models import load_model
    from .capture.prefill import prefill_and_capture

    if bool(document) == bool(play):
        raise click.UsageError("give exactly one of DOCUMENT or --play")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for n in names:
        if n not in METHOD_CHOICES:
            raise click.BadParameter(f"unknown method {n!r}; choose from {', '.join(METHOD_CHOICES)}")
    from .storage.kv_codec import parse_kv_bits

    bits = [b.strip() for b in kv_bits.split(",") if b.strip()]
    for b in bits:
        try:
            parse_kv_bits(b)
        except ValueError as e:
            raise CompactorError(str(e)) from None
    doc = bundled_play(play) if play else read_document(document)
    lm = load_model(model_name, device=_device(device))
    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    if ids.numel() < T + C:
        raise CompactorError(f"document {doc.name!r} has {ids.numel()} tokens; eval needs T+C={T + C}")
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids[:T], chunk_size=chunk_size, max_queries=max_queries,
                                  repeat_fraction=repeat_fraction, seed=seed, progress=not quiet)
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=C)
    rows = ev.run([_method(n, seed, context, score, ridge) for n in names], _ratios(ratios), budget, budget_floor,
                  progress=not quiet, kv_bits=bits, seed=seed)
    click.echo(format_table(rows))
    click.echo(f"recall CE (nats/token): full {ev.ce_full:.3f}, no prefix {ev.ce_none:.3f}")
    if json_out:
        Path(json_out).write_text(json.dumps([r.as_dict() for r in rows], indent=2))


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
