"""compress-corpus: listing and ids, the LPT assignment, manifests, resuming, device maps, and two CPU ranks under
torchrun (gloo) with a bad document and a killed rank, against a single-process run."""
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compactor.cli import cli
from compactor.corpus import manifest
from compactor.corpus.distributed import World, placement, rank_gpus, read_device_map
from compactor.corpus.listing import list_corpus, listing_digest, read_entry
from compactor.corpus.runner import EXIT_HOOK, cost_caps, options_digest, run_corpus
from compactor.corpus.sharding import lpt_assign, shares
from compactor.errors import CompactorError, DocumentError
from compactor.methods import make_method
from compactor.models import load_model, model_devices
from compactor.pipeline import CompressOptions, layer_groups

OPTS = dict(ratio=4.0, max_queries=96, chunk_size=64)
CLI_OPTS = ["--ratio", "4", "--max-queries", "96", "--chunk-size", "64", "--quiet"]


# ---- listing ------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_listing_validates_ids_and_lines(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "text": "héllo world"}, "", {"id": "../etc", "text": "x"}, "{broken", {"id": "b"},
        {"id": 7, "text": "x"}, {"id": "c", "text": "  \n"}, {"id": "a", "text": "again"}, ["id", "text"],
        '{"id": "d", "text": "\\ud800 lone"}', {"id": "e.v2_final-1", "text": "ok"}])
    entries = list_corpus(p)
    by_line = {int(e.source.rsplit(":", 1)[1]): e for e in entries}
    assert sorted(by_line) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # the blank line 2 is no document
    assert by_line[1].error is None and by_line[1].id == "a" and by_line[1].cost == len("héllo world".encode())
    assert "not a valid artifact name" in by_line[3].error and by_line[3].id == "#line-3"
    assert "not valid JSON" in by_line[4].error
    assert '"id" and "text"' in by_line[5].error and '"id" and "text"' in by_line[9].error
    assert "must be a string" in by_line[6].error
    assert by_line[7].error == "text is empty"
    assert "duplicate id 'a'" in by_line[8].error and by_line[8].cost == 0
    assert "surrogates" in by_line[10].error
    assert by_line[11].error is None
    assert read_entry(by_line[1]).text == "héllo world" and read_entry(by_line[11]).name == "e.v2_final-1"
    with pytest.raises(DocumentError, match="duplicate"):
        read_entry(by_line[8])
    assert len({e.id for e in entries}) == len(entries) - 1  # only the duplicate repeats an id
    # a line edited in place is read as it is now; one that moved is refused
    p.write_text(p.read_text().replace("world", "WORLD"))
    assert read_entry(by_line[1]).text == "héllo WORLD"
    p.write_text(p.read_text().replace("WORLD", "wide world"))
    with pytest.raises(DocumentError, match="changed since"):
        read_entry(by_line[11])


def test_folder_and_glob_listing(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    for name, text in [("b.txt", "bb"), ("a.md", "aaa"), ("skip.pdf", "x"), ("bad name.txt", "x"),
                       ("sub/c.txt", "c"), ("a.txt", "dup")]:
        (tmp_path / "docs" / name).write_text(text)
    entries = list_corpus(tmp_path / "docs")  # not recursive, .txt/.md only, sorted
    assert [(Path(e.source).name, e.id, e.cost, e.error is None) for e in entries] == [
        ("a.md", "a", 3, True), ("a.txt", "a", 0, False), ("b.txt", "b", 2, True), ("bad name.txt", "#file-3", 0,
                                                                                      False)]
    assert "duplicate id 'a'" in entries[1].error
    entries = list_corpus(str(tmp_path / "docs" / "**" / "*.txt"))
    assert [e.id for e in entries if e.error is None] == ["a", "b", "c"]
    assert read_entry(entries[0]).text == "dup"
    assert listing_digest(entries) == listing_digest(list_corpus(str(tmp_path / "docs" / "**" / "*.txt")))
    with pytest.raises(DocumentError, match="corpus not found"):
        list_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="holds no documents"):
        list_corpus(tmp_path / "empty")


# ---- sharding -----------------------------------------------------------------------------------------------------
def brute_force_makespan(costs, world):
    best = None
    for assign in itertools.product(range(world), repeat=len(costs)):
        loads = [0] * world
        for c, r in zip(costs, assign):
            loads[r] += c
        best = max(loads) if best is None else min(best, max(loads))
    return best


def test_lpt_within_grahams_bound_of_the_optimum():
    rng = random.Random(0)
    for _ in range(40):
        world = rng.randint(2, 3)
        costs = [rng.randint(1, 100) for _ in range(rng.randint(1, 8))]
        rank_of = lpt_assign(costs, world)
        assert rank_of == lpt_assign(list(costs), world)  # deterministic
        opt = brute_force_makespan(costs, world)
        assert max(shares(costs, rank_of, world)) <= (4 / 3 - 1 / (3 * world)) * opt + 1e-9
    # Graham's tight example for m=2: LPT gives 7, the optimum 6 (3+3 / 2+2+2)
    assert max(shares([3, 3, 2, 2, 2], lpt_assign([3, 3, 2, 2, 2], 2), 2)) == 7
    # longest first, each to the least loaded rank, ties to the lowest rank and the earlier document
    assert lpt_assign([5, 9, 5, 1], 2) == [1, 0, 1, 0]
    assert lpt_assign([], 3) == [] and lpt_assign([4, 4], 1) == [0, 0]


def test_cost_caps_with_max_tokens(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "The quick brown fox jumps over the lazy dog. " * 50
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "long", "text": text * 4}, {"id": "short", "text": text[:40]},
                                           {"id": "bad id", "text": "x"}])
    entries = list_corpus(p)
    assert cost_caps(entries, tok, None) == [e.cost for e in entries]
    per_token = (len(text * 4)) / len(tok(text * 4, add_special_tokens=False).input_ids)
    long_cap, short, bad = cost_caps(entries, tok, 10)
    assert short == 40 and bad == 0
    assert abs(long_cap - 10 * per_token) <= 0.2 * 10 * per_token  # the sample's bytes/token (two documents)


# ---- manifests ----------------------------------------------------------------------------------------------------
def test_manifest_append_survives_a_cut_line_and_merge_takes_the_latest(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"},
                                           {"id": "c", "text": "z"}])
    a, b, c = list_corpus(p)
    m = manifest.RankManifest(tmp_path / "out", 1, "2026-01-01T00:00:00.000000+00:00")
    m.record(a, "failed", error="boom")
    m.close()
    with open(manifest.rank_path(tmp_path / "out", 1), "ab") as fh:
        fh.write(b'{"id": "b", "status": "do')  # killed mid-line
    m = manifest.RankManifest(tmp_path / "out", 1, "2026-01-02T00:00:00.000000+00:00")
    m.record(a, "done", path=tmp_path / "out" / "a.h5", T=5, nbytes=100, seconds=1.23456)
    m.close()
    m0 = manifest.RankManifest(tmp_path / "out", 0, "2026-01-01T00:00:00.000000+00:00")
    m0.record(b, "done", T=3, nbytes=10)
    m0.close()
    lines = manifest.rank_path(tmp_path / "out", 1).read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["status"] == "done"
    counts = manifest.merge(tmp_path / "out", [a, b, c])
    assert counts == {"done": 2, "skipped": 0, "failed": 0, "pending": 1}
    merged = [json.loads(x) for x in (tmp_path / "out" / manifest.MERGED).read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in merged] == [("a", "done"), ("b", "done"), ("c", "pending")]
    assert merged[0]["seconds"] == 1.235 and merged[0]["rank"] == 1 and merged[0]["T"] == 5
    assert set(merged[0]) == {"id", "source", "path", "T", "bytes", "seconds", "status", "error", "rank", "run"}


# ---- options, placement -------------------------------------------------------------------------------------------
def test_options_digest_covers_every_option_and_the_method():
    base = options_digest(make_method("am"), CompressOptions(**OPTS))
    assert base == options_digest(make_method("am"), CompressOptions(**OPTS))
    for change in [dict(ratio=5.0), dict(seed=1), dict(kv_bits="K4V4"), dict(hi_layers=(0,)), dict(chat=True),
                   dict(max_tokens=100), dict(layer_bits={0: "K8V8"}), dict(budget="global")]:
        assert options_digest(make_method("am"), CompressOptions(**{**OPTS, **change})) != base, change
    assert options_digest(make_method("am", ridge=0.1), CompressOptions(**OPTS)) != base
    assert options_digest(make_method("eviction"), CompressOptions(**OPTS)) != base


def test_rank_gpus_and_device_maps(tmp_path):
    assert rank_gpus(World(rank=3, size=4, local_rank=1, local_size=2), 8) == [4, 5, 6, 7]
    assert rank_gpus(World(rank=1, size=2, local_rank=1, local_size=2), 2, per_rank=1) == [1]
    with pytest.raises(CompactorError, match="only 1 GPU"):
        rank_gpus(World(rank=1, size=2, local_rank=1, local_size=2), 1)
    with pytest.raises(CompactorError, match="needs GPU 1"):
        rank_gpus(World(rank=1, size=2, local_rank=1, local_size=2), 1, per_rank=1)
    assert read_device_map("auto") == "auto"
    (tmp_path / "m.json").write_text('{"model.embed_tokens": "cpu", "": 0}')
    assert read_device_map(str(tmp_path / "m.json")) == {"model.embed_tokens": "cpu", "": 0}
    (tmp_path / "bad.json").write_text('["cpu"]')
    with pytest.raises(CompactorError, match="must map module names"):
        read_device_map(str(tmp_path / "bad.json"))
    with pytest.raises(CompactorError, match="does not exist"):
        read_device_map(str(tmp_path / "none.json"))
    assert placement(World(), "cpu", None) == {"device": "cpu"}
    assert placement(World(), "cpu", "auto") == {"device_map": "auto"}
    with pytest.raises(CompactorError, match="one rank per host"):
        placement(World(rank=0, size=2, local_rank=0, local_size=2), "cpu", {"": "cpu"})


def test_layer_groups_never_mix_devices():
    budgets = torch.tensor([[10, 12], [70, 60], [11, 9], [65, 66]])
    devices = ["cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    groups = layer_groups(budgets, 100, devices=devices)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3]
    assert all(len({devices[l] for l in g}) == 1 for g in groups) and len(groups) == 2
    assert layer_groups(budgets, 100) == [[2, 0, 3, 1]]


# ---- runs on the tiny model ---------------------------------------------------------------------------------------
def corpus_rows(doc_text):
    words = doc_text.split()
    rows = [{"id": f"doc-{i}", "text": " ".join(words[: n])} for i, n in enumerate([180, 60, 120, 90, 150])]
    rows.insert(2, {"id": "too/far", "text": "a path in an id"})  # a bad document
    return rows


def content(path: Path) -> tuple[dict, dict]:
    """An artifact's datasets and its meta minus the time stamps (created, seconds): v2's digest covers those too,
    so two runs are compared on everything else, array by array and field by field."""
    with h5py.File(path, "r") as f:
        datasets = {k: (f[k].dtype.str, f[k][()]) for k in f}
        meta = json.loads(f.attrs["meta"])
    meta.pop("created")
    meta.pop("seconds")
    return datasets, meta


def assert_same_artifacts(a: Path, b: Path, names):
    for name in names:
        (da, ma), (db, mb) = content(a / f"{name}.h5"), content(b / f"{name}.h5")
        assert ma == mb, name
        assert da.keys() == db.keys(), name
        for k in da:
            assert da[k][0] == db[k][0] and np.array_equal(da[k][1], db[k][1]), (name, k)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs (OMP_NUM_THREADS=1): the same float sums
    yield
    torch.set_num_threads(n)


def test_run_resumes_and_redoes_what_changed(tmp_path, tiny_llama, doc_text, one_thread):
    rows = corpus_rows(doc_text)
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    lm = load_model(str(tiny_llama))
    am = make_method("am")
    out = tmp_path / "out"

    def run(opts=CompressOptions(**OPTS)):
        s = run_corpus(lm, list_corpus(corpus), am, opts, out, World(), progress=False)
        merged = [json.loads(x) for x in (out / manifest.MERGED).read_text().splitlines()]
        return s, {r["id"]: r["status"] for r in merged}

    s, status = run()
    good = [r["id"] for r in rows if r["id"] != "too/far"]
    assert status == {**dict.fromkeys(good, "done"), "#line-3": "failed"}
    assert s["done"] == 5 and s["failed"] == 1 and s["tokens"] > 0 and s["documents"] == 6
    meta = content(out / "doc-0.h5")[1]
    assert meta["extra"]["corpus"] == {"id": "doc-0", "options_sha256": options_digest(am, CompressOptions(**OPTS))}
    assert meta["document_name"] == "doc-0"
    s, status = run()
    assert s["skipped"] == 5 and s["done"] == 0 and set(status.values()) == {"skipped", "failed"}
    # a damaged artifact, an edited document, other options: compressed again
    data = bytearray((out / "doc-1.h5").read_bytes())
    data[-100] ^= 0xFF
    (out / "doc-1.h5").write_bytes(bytes(data))
    rows[0]["text"] += " more"
    write_jsonl(corpus, rows)
    s, status = run()
    assert {k for k, v in status.items() if v == "done"} == {"doc-0", "doc-1"} and s["skipped"] == 3
    s, status = run(CompressOptions(**{**OPTS, "ratio": 5.0}))
    assert s["done"] == 5 and s["skipped"] == 0
    # every record of every run is in the rank file; the merged manifest has one line per document
    assert len(manifest.rank_path(out, 0).read_text().splitlines()) == 4 * 6
    assert not list(out.glob(".*tmp*"))


def test_device_map_path_gives_the_same_artifacts(tmp_path, tiny_llama, doc_text, one_thread):
    """--device-map through the CLI (a module map, all on the CPU here, and accelerate's auto) against the plain
    device: the same model, so the same artifacts."""
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_rows(doc_text)[:2])
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
            "model.norm": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(dmap))
    for name, extra in [("plain", ["--device", "cpu"]), ("map", ["--device-map", str(tmp_path / "map.json")]),
                        ("auto", ["--device-map", "auto"])]:
        r = CliRunner().invoke(cli, ["compress-corpus", str(corpus), "-o", str(tmp_path / name), "--model",
                                     str(tiny_llama), *CLI_OPTS, *extra])
        assert r.exit_code == 0, r.output
        assert "compressed 2 of 2 documents" in r.output
    assert_same_artifacts(tmp_path / "plain", tmp_path / "map", ["doc-0", "doc-1"])
    assert_same_artifacts(tmp_path / "plain", tmp_path / "auto", ["doc-0", "doc-1"])
    lm = load_model(str(tiny_llama), device_map=dmap)
    assert model_devices(lm.model) == [torch.device("cpu")]
    r = CliRunner().invoke(cli, ["compress-corpus", str(corpus), "-o", str(tmp_path / "x"), "--model",
                                 str(tiny_llama), "--device", "cpu", "--device-map", "auto"])
    assert r.exit_code != 0 and "not both" in r.output


def torchrun(args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    exe = str(Path(sys.executable).with_name("compactor"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           exe, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_with_a_bad_document_and_a_killed_rank(tmp_path, tiny_llama, doc_text, one_thread):
    rows = corpus_rows(doc_text)
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    good = [r["id"] for r in rows if r["id"] != "too/far"]
    args = ["compress-corpus", str(corpus), "--model", str(tiny_llama), *CLI_OPTS]
    # the reference: one process
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "single")])
    assert r.exit_code == 1 and "Error: 1 of 6 documents failed" in r.output, r.output
    entries = list_corpus(corpus)
    rank_of = lpt_assign([e.cost for e in entries], 2)
    mine = [e.id for e, rk in sorted(zip(entries, rank_of), key=lambda x: (-x[0].cost, x[0].index))
            if rk == 1 and not e.error]  # in the order rank 1 takes them: longest first
    assert len(mine) >= 2  # rank 1 has at least two documents: it is killed on its second

    out = tmp_path / "ranks"
    p = torchrun([*args, "-o", str(out)], {EXIT_HOOK: "1:1"})
    assert p.returncode != 0
    recs = [json.loads(x) for x in manifest.rank_path(out, 1).read_text().splitlines()]
    done1 = [r["id"] for r in recs if r["status"] == "done"]
    assert done1 == mine[:1] and not (out / f"{mine[1]}.h5").exists()  # finished its first, died on the next
    first_run = {r["id"] for i in (0, 1) if manifest.rank_path(out, i).exists()
                 for r in map(json.loads, manifest.rank_path(out, i).read_text().splitlines()) if r["status"] == "done"}

    p = torchrun([*args, "-o", str(out)])
    assert p.returncode != 0 and "Error: 1 of 6 documents failed" in p.stdout + p.stderr, p.stdout + p.stderr
    assert "on 2 rank(s)" in p.stdout + p.stderr
    merged = {r["id"]: r for r in map(json.loads, (out / manifest.MERGED).read_text().splitlines())}
    assert merged["#line-3"]["status"] == "failed" and "not a valid artifact name" in merged["#line-3"]["error"]
    assert {k for k, v in merged.items() if v["status"] == "skipped"} >= first_run
    assert {k for k, v in merged.items() if v["status"] in ("done", "skipped")} == set(good)
    assert {merged[k]["rank"] for k in good} == {0, 1}
    assert_same_artifacts(tmp_path / "single", out, good)
    assert not list(out.glob(".*tmp*"))


def test_cli_bad_inputs_and_json_summary(tmp_path, tiny_llama, doc_text, one_thread):
    """Bad input: one `Error:` line and a non-zero exit, no artifact; --json: the summary as one object."""
    base = ["compress-corpus", "--model", str(tiny_llama), *CLI_OPTS]
    (tmp_path / "empty").mkdir()
    (tmp_path / "map.json").write_text("[1, 2]")
    for args, message in [([str(tmp_path / "nope"), "-o", str(tmp_path / "o1")], "Error: corpus not found"),
                          ([str(tmp_path / "empty"), "-o", str(tmp_path / "o2")], "Error: corpus"),
                          ([str(tmp_path / "empty"), "-o", str(tmp_path / "o3"), "--device-map",
                            str(tmp_path / "map.json")], "must map module names to devices")]:
        r = CliRunner().invoke(cli, [*base, *args])
        assert r.exit_code != 0 and message in r.output, r.output
        assert "Traceback" not in r.output
    assert not list(tmp_path.glob("o*/*.h5"))
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_rows(doc_text)[:2])
    r = CliRunner().invoke(cli, [*base, str(corpus), "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)  # the progress of loading the weights goes to stderr
    assert (s["documents"], s["done"], s["failed"], s["skipped"]) == (2, 2, 0, 0)
    tokens = sum(json.loads(x)["T"] for x in (tmp_path / "out" / manifest.MERGED).read_text().splitlines())
    assert s["tokens"] == tokens and s["tokens_per_s"] == pytest.approx(tokens / s["seconds"], rel=1e-2)
