"""compactor command line: compress, inspect, generate, eval."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import CompactorError

METHOD_CHOICES = ["am", "eviction", "streaming", "random"]
SCORE_CHOICES = ("rms", "max", "kvzip", "kvzip_wo", "kvgrad", "kvzip_rms", "kvzip_wo_rms", "kvgrad_rms")
DEFAULT_PRESET = "quality"


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


def _calibration_bits(path: str | None, model_name: str) -> dict | None:
    """Per-layer bits from a calibration JSON: the given file, or artifacts/calibration/<model>.json if present."""
    if path is None:
        default = Path("artifacts") / "calibration" / f"{Path(model_name).name}.json"
        if not default.is_file():
            return None
        path = str(default)
        click.echo(f"using per-layer bits from {path}", err=True)
    try:
        data = json.loads(Path(path).read_text())
        layers = data["layers"]
        if not isinstance(layers, dict):
            raise TypeError("'layers' must be an object")
        return {int(k): str(v) for k, v in layers.items()}
    except FileNotFoundError:
        raise CompactorError(f"calibration file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CompactorError(f"calibration file {path} is not valid ({e}); expected {{\"layers\": "
                             f"{{\"0\": \"K8V8\", ...}}}}") from None


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
    """A method from its name; AM and eviction take the preset's parameters unless given explicitly (not None)."""
    from .methods import make_method
    from .pipeline import preset

    params = dict(preset(preset_name)["method"])
    if score is not None:
        params["score"] = score
    try:
        if name == "am":
            params.update({k: v for k, v in am_options.items() if v is not None})
            return make_method("am", context=context, ridge=ridge, **params)
        if name == "eviction":
            return make_method("eviction", score=params["score"], context=context)
    except ValueError as e:
        raise CompactorError(str(e)) from None
    if name == "random":
        return make_method("random", seed=seed)
    return make_method(name)


def _capture_opts(preset_name, budget, budget_floor, query_sources, self_study, on_policy, split_share) -> dict:
    """CompressOptions fields from the preset, overridden by the options given explicitly (not None)."""
    from .pipeline import preset

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
    f = click.option("--preset", type=click.Choice(["fast", "quality"]), default=DEFAULT_PRESET,
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
    f = click.option("--budget", type=click.Choice(["uniform", "global", "layer", "split"]), default=None,
                     help="Per-head budgets (default: the preset's): equal; one budget shared by all heads and "
                          "layers; that shared budget split equally within each layer; or split: --split-share "
                          "by RMS attention with layer budgets, the rest by the key score with one global budget.")(f)
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
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
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
              help="JSON with per-layer bits {\"layers\": {\"0\": \"K8V8\", ...}} (default: "
                   "artifacts/calibration/<model>.json when present).")
@method_options
@capture_options
def compress(documents, play, ratio, max_tokens, stored_dtype, out, report, kv_bits, hi_layers, hi_bits,
             calibration, method, context, score, ridge, preset, source_weights, beta_floor, beta_ridge, value_anchor,
             value_fit, selection, omp_keys, omp_refit, model_name, budget, split_share, budget_floor, query_sources,
             self_study, on_policy, chunk_size, max_queries, repeat_fraction, seed, device, quiet):
    """Compress DOCUMENTS (.txt/.md paths, or - for stdin) into artifacts/<name>.h5 each."""
    from .storage.artifact import read_meta
    from .capture.documents import bundled_play, read_document
    from .models import load_model
    from .pipeline import CompressOptions, codec_plan, compress as run_compress, prepare

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
    opts = CompressOptions(ratio=ratio, chunk_size=chunk_size, max_queries=max_queries,
                           repeat_fraction=repeat_fraction, seed=seed, max_tokens=max_tokens,
                           stored_dtype=stored_dtype, kv_bits=kv_bits,
                           hi_layers=_int_list(hi_layers, "--hi-layers"), hi_bits=hi_bits,
                           layer_bits=_calibration_bits(calibration, model_name),
                           **_capture_opts(preset, budget, budget_floor, query_sources, self_study, on_policy,
                                          split_share))
    m = _method(method, seed, context, score, ridge, preset,
                **_am_options(source_weights, beta_floor, value_anchor, value_fit, selection, omp_keys, omp_refit,
                             beta_ridge))
    lm = load_model(model_name, device=_device(device))
    prepared = [prepare(lm, doc, opts) for doc in docs]  # every document is checked before any work starts
    for doc, doc_ids in zip(docs, prepared):
        if out and Path(out).suffix == ".h5":
            path = Path(out)
        else:
            path = Path(out or "artifacts") / f"{doc.name}.h5"
        written, layers, capture, ids = run_compress(lm, doc, m, path, opts, progress=not quiet, ids=doc_ids)
        click.echo(f"wrote {written} ({written.stat().st_size:,} bytes; T={capture.length} tokens, "
                   f"{method} at {ratio:g}x)")
        if report:
            seconds = read_meta(written)["seconds"]["compact"]
            _report(lm, doc, capture, layers, method, ratio, codec_plan(len(layers), opts), opts, seconds)


def _report(lm, doc, capture, layers, method, ratio, codecs, opts, seconds):
    from .evaluation.harness import Evaluator, format_table

    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    C = min(256, ids.numel() - capture.length)
    if C < 16:
        click.echo("report: the document has no text after the compressed prefix, so cKL cannot be measured; "
                   "use --max-tokens to hold some back")
        return
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=C)
    row = ev.score(layers, method, ratio, seconds, codecs, opts.stored_dtype, opts.seed)
    click.echo(f"\nquality report ({doc.name}: T={capture.length}, continuation C={C}):")
    click.echo(format_table([row]))
    click.echo(f"recall CE (nats/token): full {ev.ce_full:.3f}, compressed {row.ce:.3f}, no prefix {ev.ce_none:.3f}")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip the payload digest check.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def inspect(artifact, no_verify, as_json):
    """Summarise an artifact and verify its integrity (per-chunk checksums and payload digest)."""
    from .storage.artifact import read_artifact
    from .evaluation.metrics import full_cache_bytes

    art = read_artifact(artifact, verify=not no_verify)
    meta = art.meta
    if as_json:
        click.echo(json.dumps({k: v for k, v in meta.items() if k != "model_weights_signature"}, indent=2,
                              default=str))
        return
    from .storage.kv_codec import byte_breakdown
    from .serving.loader import decode_layers

    layers = decode_layers(art)  # also checks that every layer decodes
    lengths = [int(x) for layer in layers for x in layer.lengths]
    memory = sum(layer.memory_bytes() for layer in layers)
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
    click.echo("  integrity  " + ("per-chunk checksums and payload digest OK" if not no_verify
                                  else "per-chunk checksums OK (digest not checked)"))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="Text that follows the document.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--model", "model_name", default=None, help="Model (default: the artifact's model id).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def generate(artifact, prompt, max_new_tokens, model_name, device):
    """Continue after the compacted document with PROMPT (greedy) and print the continuation."""
    from .storage.artifact import read_artifact
    from .models import load_model
    from .serving.loader import load_cache

    art = read_artifact(artifact)
    lm = load_model(model_name or art.meta["model_id"], device=_device(device))
    cache = load_cache(art, lm.model, lm.tokenizer)
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
def eval_cmd(document, play, T, C, ratios, methods, json_out, kv_bits, method, context, score, ridge, preset,
             source_weights, beta_floor, beta_ridge, value_anchor, value_fit, selection, omp_keys, omp_refit,
             model_name, budget, split_share, budget_floor, query_sources, self_study, on_policy, chunk_size,
             max_queries, repeat_fraction, seed, device, quiet):
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
    from .pipeline import probe_for

    opts = _capture_opts(preset, budget, budget_floor, query_sources, self_study, on_policy, split_share)
    am_opts = _am_options(source_weights, beta_floor, value_anchor, value_fit, selection, omp_keys, omp_refit,
                          beta_ridge)
    ms = [_method(n, seed, context, score, ridge, preset, **am_opts) for n in names]
    probes = {probe_for(m) for m in ms}
    probe = "gradient" if "gradient" in probes else ("attention" if "attention" in probes else "none")
    doc = bundled_play(play) if play else read_document(document)
    lm = load_model(model_name, device=_device(device))
    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    if ids.numel() < T + C:
        raise CompactorError(f"document {doc.name!r} has {ids.numel()} tokens; eval needs T+C={T + C}")
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids[:T], chunk_size=chunk_size, max_queries=max_queries,
                                  repeat_fraction=repeat_fraction, seed=seed, progress=not quiet, probe=probe,
                                  sources=opts.get("sources"), self_study=opts.get("self_study", 4))
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=C)
    rows = ev.run(ms, _ratios(ratios), opts["budget"], opts["budget_floor"], progress=not quiet, kv_bits=bits,
                  seed=seed, on_policy=opts.get("on_policy", 0), split_share=opts.get("split_share", 0.5))
    click.echo(format_table(rows))
    click.echo(f"recall CE (nats/token): full {ev.ce_full:.3f}, no prefix {ev.ce_none:.3f}")
    if json_out:
        Path(json_out).write_text(json.dumps([r.as_dict() for r in rows], indent=2))


@cli.command()
def plays():
    """List the bundled Shakespeare plays."""
    from .capture.documents import list_plays

    click.echo("\n".join(list_plays()))


def main():
    cli()
