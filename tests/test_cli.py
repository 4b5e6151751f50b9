"""The command line on tiny local models: the happy path, and every bad input giving a one-line error,
a non-zero exit, and no partial artifact."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compactor.cli import cli


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def doc(tmp_path_factory, doc_text):
    p = tmp_path_factory.mktemp("docs") / "story.txt"
    p.write_text(doc_text)
    return p


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama, doc):
    out = tmp_path_factory.mktemp("out")
    r = run("compress", doc, "--model", tiny_llama, "--ratio", 4, "-o", out, "--quiet", "--max-queries", 256)
    assert r.exit_code == 0, r.output
    return out / "story.h5"


def one_line_error(r, pattern):
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:") and pattern in lines[-1], r.output


def test_compress_inspect_generate(artifact, tiny_llama):
    assert artifact.exists()
    r = run("inspect", artifact)
    assert r.exit_code == 0, r.output
    assert "digest over every attribute and dataset OK" in r.output and "am at 4x" in r.output
    r = run("generate", artifact, "--prompt", "The quick", "--model", tiny_llama, "--max-new-tokens", 5)
    assert r.exit_code == 0, r.output
    assert r.output.strip()


def test_stdin_and_several_documents(tmp_path, tiny_llama, doc_text):
    a, b = tmp_path / "a.md", tmp_path / "b.txt"
    a.write_text(doc_text)
    b.write_text(doc_text[: len(doc_text) // 2])
    r = run("compress", a, b, "-", "--model", tiny_llama, "--ratio", 8, "-o", tmp_path / "out", "--quiet",
            "--max-queries", 128, input=doc_text)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.h5", "b.h5", "stdin.h5"]


def test_missing_file(tmp_path, tiny_llama):
    one_line_error(run("compress", tmp_path / "nope.txt", "--model", tiny_llama), "document not found")


def test_empty_file(tmp_path, tiny_llama):
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    one_line_error(run("compress", p, "--model", tiny_llama, "-o", tmp_path), "is empty")
    assert not list(tmp_path.glob("*.h5"))


def test_binary_file(tmp_path, tiny_llama):
    p = tmp_path / "blob.txt"
    p.write_bytes(bytes(range(256)) * 4)
    one_line_error(run("compress", p, "--model", tiny_llama, "-o", tmp_path), "binary")
    assert not list(tmp_path.glob("*.h5"))


@pytest.mark.parametrize("ratio,msg", [(0.5, ">= 1"), (100000, "larger than the document")])
def test_bad_ratio(tmp_path, tiny_llama, doc, ratio, msg):
    one_line_error(run("compress", doc, "--model", tiny_llama, "--ratio", ratio, "-o", tmp_path), msg)
    assert not list(tmp_path.glob("*.h5"))


def test_unknown_model(tmp_path, doc):
    one_line_error(run("compress", doc, "--model", "no-such-model", "-o", tmp_path), "unknown model")


def test_unreachable_hub_model(tmp_path, doc, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(run("compress", doc, "--model", "someorg/some-model", "-o", tmp_path), "could not fetch")


def test_document_longer_than_context(tmp_path, tiny_llama, doc, doc_text):
    p = tmp_path / "long.txt"
    p.write_text(doc_text * 4)
    r = run("compress", doc, p, "--model", tiny_llama, "-o", tmp_path)  # checked before the first is compressed
    one_line_error(r, "model's context is 1024 tokens")
    assert "document 'long' is" in r.output
    assert not list(tmp_path.glob("*.h5"))


def test_corrupted_artifact(tmp_path, artifact):
    import h5py

    bad = tmp_path / "bad.h5"
    bad.write_bytes(artifact.read_bytes())
    with h5py.File(bad) as f:
        off = f["keys"].id.get_offset()
    data = bytearray(bad.read_bytes())
    data[off + 3] ^= 0x55
    bad.write_bytes(bytes(data))
    one_line_error(run("inspect", bad), "digest")
    r = run("inspect", bad, "--no-verify")  # forensics: summarised, and says what it did not check
    assert r.exit_code == 0 and "digest NOT checked" in r.output


def test_truncated_artifact(tmp_path, artifact):
    bad = tmp_path / "cut.h5"
    bad.write_bytes(artifact.read_bytes()[:5000])
    one_line_error(run("inspect", bad), "truncated or corrupted")


def test_artifact_from_another_model(artifact, tiny_models):
    r = run("generate", artifact, "--prompt", "hi", "--model", tiny_models["qwen3"])
    one_line_error(r, "was made for model")


def test_artifact_from_same_architecture_other_weights(tmp_path, artifact):
    from conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "llama", seed=123)
    one_line_error(run("generate", artifact, "--prompt", "hi", "--model", other), "different weights")


def test_interrupted_compress_leaves_no_artifact(tmp_path, tiny_llama, doc, monkeypatch):
    import compactor.storage.artifact as art

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(art, "_write_attr", die)  # inside the open temporary file
    r = run("compress", doc, "--model", tiny_llama, "-o", tmp_path, "--quiet")
    assert r.exit_code != 0
    assert not list(tmp_path.iterdir())


def test_real_process_exit_code(tmp_path):
    """Through the installed entry point: stderr holds one line, the exit status is non-zero."""
    p = subprocess.run([sys.executable, "-m", "compactor", "inspect", str(tmp_path / "missing.h5")],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"Error: artifact not found: {tmp_path / 'missing.h5'}"]


def test_quantized_artifact_end_to_end(tmp_path, tiny_llama, doc):
    """K4V3 Lloyd-Max storage, first and last layers at 8 bits; inspect counts every byte; it loads and runs."""
    out = tmp_path / "q.h5"
    r = run("compress", doc, "--model", tiny_llama, "--ratio", 4, "--kv-bits", "K4V3", "--hi-layers", "0,-1",
            "--hi-bits", "K8V8", "-o", out, "--quiet", "--max-queries", 256)
    assert r.exit_code == 0, r.output
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    assert "K/V stored as K8V8" in r.output and "codes" in r.output and "codebooks" in r.output
    raw = tmp_path / "raw.h5"
    assert run("compress", doc, "--model", tiny_llama, "--ratio", 4, "-o", raw, "--quiet",
               "--max-queries", 256).exit_code == 0
    from compactor.storage.artifact import read_artifact

    assert read_artifact(out).payload_bytes < read_artifact(raw).payload_bytes
    r = run("generate", out, "--prompt", "The quick", "--model", tiny_llama, "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output


def test_quantization_without_compaction(tmp_path, doc):
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "d32", "llama", head_dim=32)  # q8_0 blocks need a multiple of 32
    out = tmp_path / "q1.h5"
    r = run("compress", doc, "--model", model, "--ratio", 1, "--kv-bits", "q8_0", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert "q-blocks" in run("inspect", out).output


def test_old_per_layer_bits_json_is_refused(tmp_path, tiny_llama, doc):
    """Calibration files are .h5 now (make calibrate; tests/test_calibrated_compress.py); the per-layer bits JSON
    the first codec issue read is refused in one line that says what to use instead, and nothing is written."""
    cal = tmp_path / "cal.json"
    cal.write_text('{"layers": {"1": "K2V2"}}')
    one_line_error(run("compress", doc, "--model", tiny_llama, "--kv-bits", "K6V6", "--calibration", cal, "-o",
                       tmp_path / "c.h5"), "no longer read")
    assert not list(tmp_path.glob("*.h5"))


@pytest.mark.parametrize("bits,msg", [("K9V4", "bad --kv-bits"), ("K4", "bad --kv-bits")])
def test_bad_kv_bits(tmp_path, tiny_llama, doc, bits, msg):
    one_line_error(run("compress", doc, "--model", tiny_llama, "--kv-bits", bits, "-o", tmp_path), msg)
    assert not list(tmp_path.glob("*.h5"))


def test_block_codec_on_unsupported_head_dim(tmp_path, tiny_llama, doc):
    # the tiny models have head dim 16: q4_0 blocks need a multiple of 32
    one_line_error(run("compress", doc, "--model", tiny_llama, "--kv-bits", "q4_0", "-o", tmp_path),
                   "multiple of 32")


def test_output_checked_before_any_work(tmp_path, tiny_llama, doc, monkeypatch):
    """A directory as output, an unwritable folder, or --no-clobber on an existing file: one line, before prefill."""
    import compactor.pipeline as pipeline

    def no_prefill(*a, **k):
        raise AssertionError("prefill ran before the output was checked")

    monkeypatch.setattr(pipeline, "prefill_and_capture", no_prefill)
    (tmp_path / "dir.h5").mkdir()
    one_line_error(run("compress", doc, "--model", tiny_llama, "-o", tmp_path / "dir.h5"), "is a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind, use a path under a file
            target = tmp_path / "afile" / "x.h5"
            (tmp_path / "afile").write_text("")
            one_line_error(run("compress", doc, "--model", tiny_llama, "-o", target), "cannot create output folder")
        else:
            one_line_error(run("compress", doc, "--model", tiny_llama, "-o", locked / "x.h5"), "cannot write")
    finally:
        locked.chmod(0o700)
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"old")
    one_line_error(run("compress", doc, "--model", tiny_llama, "-o", existing, "--no-clobber"), "--no-clobber")
    assert existing.read_bytes() == b"old"


def test_not_enough_space_refused_before_work(tmp_path, tiny_llama, doc, monkeypatch):
    import shutil

    import compactor.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prefill_and_capture", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    one_line_error(run("compress", doc, "--model", tiny_llama, "-o", tmp_path / "x.h5"), "not enough free space")


def test_overwrite_is_reported(tmp_path, tiny_llama, doc):
    out = tmp_path / "x.h5"
    args = ("compress", doc, "--model", tiny_llama, "-o", out, "--quiet", "--max-queries", 64, "--ratio", 8)
    assert f"wrote {out}" in run(*args).output
    r = run(*args)
    assert r.exit_code == 0 and f"overwrote {out}" in r.output


def test_generate_never_loads_a_model_named_only_by_the_artifact(artifact, tiny_llama):
    """The artifact names a local folder: without --model, generate refuses and says which model it wants."""
    r = run("generate", artifact, "--prompt", "hi")
    one_line_error(r, "was made with model")
    assert str(tiny_llama) in r.output and "--model" in r.output


def test_sigterm_during_write_cleans_up(tmp_path):
    """SIGTERM while the artifact is being written: no temporary file, no partial artifact (like Ctrl-C)."""
    import signal
    import time

    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import compactor.storage.artifact as a
from test_artifact import write
real = a._write_attr
def slow(*x, **k):
    time.sleep(0.5); return real(*x, **k)
a._write_attr = slow
print("start", flush=True)
write({str(tmp_path / 't.h5')!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_of_dead_writer_removed_by_next_write(tmp_path, tiny_llama, doc):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".story.h5.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"partial")
    alive = tmp_path / f".other.h5.tmp-{os.getpid()}"  # a live writer's file is left alone
    alive.write_bytes(b"in progress")
    r = run("compress", doc, "--model", tiny_llama, "-o", tmp_path, "--quiet", "--max-queries", 64, "--ratio", 8)
    assert r.exit_code == 0, r.output
    assert not stale.exists() and alive.exists()
