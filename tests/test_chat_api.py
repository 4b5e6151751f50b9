"""Chat wrapping, the Python API (compress / save / load_cache / ask / answer) and the CLI's JSON outputs, on tiny
models. References are plain transformers: the chat template applied to the whole conversation, generated without
any compaction."""
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import compactor
from compactor.capture import chat
from compactor.cli import cli
from compactor.errors import CompactorError
from compactor.models import load_model
from compactor.storage.artifact import read_artifact, read_meta

from conftest import CORPUS

DOC = (CORPUS * 3).strip()
QUESTIONS = ["Who jumps over the lazy dog?", "What is the question?"]


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_model(str(tiny_llama))


def conversation_ids(tok, question: str) -> torch.Tensor:
    """The template applied to [user: document + blank line + question] with the assistant header: (n,)."""
    return torch.tensor(tok.apply_chat_template([{"role": "user", "content": DOC + "\n\n" + question}],
                                                add_generation_prompt=True, tokenize=True, return_dict=True)
                        ["input_ids"])


def greedy(model, ids: torch.Tensor, n: int = 10) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.numel():].tolist()


def test_chat_wrapping_is_the_templates_conversation(lm):
    """document_ids + chat_ids are exactly the tokens of the template applied to the whole conversation."""
    digest = chat.template_digest(lm.tokenizer)
    for q in QUESTIONS:
        ours = torch.cat([chat.document_ids(lm.tokenizer, DOC), chat_ids := chat.chat_ids(
            lm.tokenizer, [{"role": "user", "content": q}], digest)])
        assert ours.tolist() == conversation_ids(lm.tokenizer, q).tolist()
        assert chat_ids.numel() < 60  # the question part only, not the document (hundreds of tokens) again
    follow_up = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "The fox."},
                 {"role": "user", "content": QUESTIONS[1]}]
    full = lm.tokenizer.apply_chat_template([{"role": "user", "content": DOC + "\n\n" + QUESTIONS[0]},
                                             *follow_up[1:]], add_generation_prompt=True, tokenize=False)
    head = lm.tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False).split("X")[0]
    assert head + DOC + chat.continuation_text(lm.tokenizer, follow_up) == full


def test_chat_errors(lm):
    with pytest.raises(CompactorError, match="chat template sha256"):
        chat.chat_ids(lm.tokenizer, [{"role": "user", "content": "q"}], "0" * 64)
    with pytest.raises(CompactorError, match="alternate"):
        chat.check_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(CompactorError, match="last message"):
        chat.check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(CompactorError, match="role"):
        chat.check_messages([{"role": "system", "content": "a"}])


def test_ask_and_answer_match_plain_generation(lm):
    """At ratio 1 (float32 storage) the compressed chat document answers exactly as the uncompressed conversation."""
    cache = compactor.compress(DOC, lm.model, lm.tokenizer, ratio=1, chat=True, stored_dtype="float32")
    assert cache.metadata["chat"]["template_sha256"] == chat.template_digest(lm.tokenizer)
    answers = compactor.ask(cache, QUESTIONS, lm.model, lm.tokenizer, max_new_tokens=10)
    expected = [lm.tokenizer.decode(greedy(lm.model, conversation_ids(lm.tokenizer, q)), skip_special_tokens=True)
                .strip() for q in QUESTIONS]
    assert answers == expected
    assert compactor.answer(DOC, QUESTIONS, lm.model, lm.tokenizer, ratio=1, stored_dtype="float32",
                            max_new_tokens=10) == expected


def test_api_save_writes_the_clis_artifact(lm, tiny_llama, tmp_path):
    doc = tmp_path / "story.txt"
    doc.write_text(DOC)
    r = run("compress", doc, "--model", tiny_llama, "--ratio", 4, "--max-queries", 256, "--kv-bits", "K4V3",
            "--chat", "-o", tmp_path / "cli.h5", "--quiet")
    assert r.exit_code == 0, r.output
    cache = compactor.compress(DOC, lm.model, lm.tokenizer, ratio=4, max_queries=256, kv_bits="K4V3", chat=True,
                               name="story")
    path = cache.save(tmp_path / "api.h5")
    cli_art, api_art = read_artifact(tmp_path / "cli.h5"), read_artifact(path)
    # the same cache: every dataset and every field but the time stamps (the digest covers those too)
    assert set(cli_art.layers[0].arrays) == set(api_art.layers[0].arrays)
    for a, b in zip(cli_art.layers, api_art.layers):
        assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert cli_art.codebooks.keys() == api_art.codebooks.keys()
    assert all(np.array_equal(cli_art.codebooks[k], api_art.codebooks[k]) for k in cli_art.codebooks)
    volatile = {"created", "seconds", "digest_sha256", "_fields", "model_weights"}
    assert ({k: v for k, v in api_art.meta.items() if k not in volatile}
            == {k: v for k, v in cli_art.meta.items() if k not in volatile})
    a_id, c_id = api_art.meta["model_weights"], cli_art.meta["model_weights"]
    assert {k: v for k, v in a_id.items() if k != "kept"} == {k: v for k, v in c_id.items() if k != "kept"}
    assert np.array_equal(a_id["kept"], c_id["kept"])
    assert api_art.meta["chat"] == cli_art.meta["chat"] and "template_sha256" in api_art.meta["chat"]
    # the in-memory cache is the one loading the file gives (quantized storage round trip included)
    loaded = compactor.load_cache(path, lm.model, lm.tokenizer)
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.prefix_keys, b.prefix_keys) and torch.equal(a.beta, b.beta)
    assert cache.memory_bytes() == loaded.memory_bytes() > 0
    with pytest.raises(CompactorError, match="copy the file"):
        loaded.save(tmp_path / "again.h5")


def test_api_from_token_ids_and_bad_options(lm):
    ids = lm.tokenizer(DOC).input_ids
    cache = compactor.compress(ids, lm.model, lm.tokenizer, ratio=4, max_queries=128)
    assert cache.get_seq_length() == len(ids) and cache.metadata["document_name"] == "tokens"
    with pytest.raises(TypeError, match="unknown option"):
        compactor.compress(DOC, lm.model, lm.tokenizer, ratio=4, max_querys=128)
    with pytest.raises(CompactorError, match=">= 1"):
        compactor.compress(DOC, lm.model, lm.tokenizer, ratio=0.5)
    with pytest.raises(CompactorError, match="as text"):
        compactor.compress(ids, lm.model, lm.tokenizer, chat=True)
    with pytest.raises(CompactorError, match="exceeds the model's context"):
        compactor.ask(cache, "q", lm.model, lm.tokenizer, max_new_tokens=1000)


def test_cli_chat_compress_and_several_questions(lm, tiny_llama, tmp_path):
    """compress --chat, then two --question in one generate: each answer is the uncompressed conversation's (ratio 1,
    float32), streamed."""
    doc = tmp_path / "story.txt"
    doc.write_text(DOC)
    art = tmp_path / "story.h5"
    r = run("compress", doc, "--model", tiny_llama, "--ratio", 1, "--dtype", "float32", "--chat", "-o", art,
            "--quiet")
    assert r.exit_code == 0, r.output
    args = ["generate", art, "--model", tiny_llama, "--max-new-tokens", 10]
    r = run(*args, *[x for q in QUESTIONS for x in ("--question", q)])
    assert r.exit_code == 0, r.output
    for q in QUESTIONS:
        answer = lm.tokenizer.decode(greedy(lm.model, conversation_ids(lm.tokenizer, q)), skip_special_tokens=True)
        assert f"### {q}\n{answer}\n" in r.stdout
    sampled = [run(*args, "--question", QUESTIONS[0], "--temperature", 1.5, "--top-p", 0.9, "--seed", s,
                   "--no-stream").stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_json_outputs(tiny_llama, tmp_path):
    doc = tmp_path / "story.txt"
    doc.write_text(CORPUS * 6)
    r = run("compress", doc, "--model", tiny_llama, "--ratio", 4, "--max-queries", 128, "-o", tmp_path, "--quiet",
            "--json")
    assert r.exit_code == 0, r.output
    (item,) = json.loads(r.stdout)["artifacts"]
    art = read_artifact(item["path"])
    assert item["bytes"]["file"] == (tmp_path / "story.h5").stat().st_size
    assert item["bytes"]["payload"] == art.payload_bytes == sum(item["bytes"]["payload_by_kind"].values())
    assert item["T"] == art.T and item["kept_per_head"]["total"] == sum(
        int(x) for layer in art.layers for x in layer.arrays["lengths"])
    assert set(item["seconds"]) == {"prefill", "compact", "total"}

    r = run("inspect", tmp_path / "story.h5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["integrity"]["ok"] and out["bytes"] == item["bytes"] and out["meta"]["T"] == art.T

    bad = tmp_path / "bad.h5"
    bad.write_bytes((tmp_path / "story.h5").read_bytes())
    with h5py.File(bad) as f:
        off = f["keys"].id.get_offset()
    data = bytearray(bad.read_bytes())
    data[off + 3] ^= 0x55
    bad.write_bytes(bytes(data))
    r = run("inspect", bad, "--json")
    assert r.exit_code == 1
    verdict = json.loads(r.stdout)["integrity"]
    assert not verdict["ok"] and "corrupted" in verdict["error"]

    r = run("eval", doc, "--model", tiny_llama, "-T", 200, "-C", 32, "--methods", "am", "--ratios", 4,
            "--max-queries", 128, "--quiet", "--json", "-")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(row["method"], row["ratio"]) for row in rows] == [("am", 4.0)] and rows[0]["ckl"] >= 0

