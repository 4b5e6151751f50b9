"""The HTTP server, end to end: uvicorn on a free localhost port (in a thread, and once as `compactor serve` in a
subprocess), a real HTTP client (httpx). Answers are checked against the same generation done in-process."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import compactor
from compactor.models import load_model
from compactor.serving.answer import Sampling, generate, messages_ids, text_ids
from compactor.serving.loader import prepare_model
from compactor.serving.server import DocumentStore, create_app

from conftest import CORPUS

DOC = (CORPUS * 3).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on a free port in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_llama, tiny_models):
    """Artifacts: a chat one and a raw-text one for the served model, one for another model, a damaged one, and a
    symlink that points outside the folder."""
    root = tmp_path_factory.mktemp("served")
    docs = root / "docs"
    docs.mkdir()
    lm = load_model(str(tiny_llama))
    compactor.compress(DOC, lm.model, lm.tokenizer, ratio=4, chat=True, max_queries=256).save(docs / "story.h5")
    compactor.compress(DOC, lm.model, lm.tokenizer, ratio=4, max_queries=256).save(docs / "raw.h5")
    other = load_model(str(tiny_models["qwen3"]))
    compactor.compress(DOC, other.model, other.tokenizer, ratio=4, max_queries=128).save(docs / "other.h5")
    (docs / "broken.h5").write_bytes((docs / "raw.h5").read_bytes()[:3000])
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.h5").write_bytes((docs / "raw.h5").read_bytes())
    os.symlink(outside / "secret.h5", docs / "escape.h5")
    return docs


@pytest.fixture(scope="module")
def served(folder, tiny_llama):
    lm = load_model(str(tiny_llama))
    prepare_model(lm.model)
    store = DocumentStore(folder, lm.model, lm.tokenizer, max_documents=2)
    server = Server(create_app(store, "tiny", max_new_tokens=64, max_body_bytes=4096))
    yield server, lm, store
    server.stop()


def expected(lm, store, name, question=None, prompt=None, n=8):
    """The same generation in-process, on the artifact the server holds."""
    cache = store.get(name)
    ids = (messages_ids(cache.metadata, lm.tokenizer, [{"role": "user", "content": question}]) if question
           else text_ids(lm.tokenizer, prompt))
    return generate(lm.model, lm.tokenizer, cache, ids, Sampling(n))


def chat(client, url, question, document="story", **extra):
    return client.post(f"{url}/v1/chat/completions", json={"model": "tiny", "document": document, "max_tokens": 8,
                                                           "messages": [{"role": "user", "content": question}],
                                                           **extra})


def test_health_and_models(served):
    server, _, _ = served
    with httpx.Client() as c:
        assert c.get(f"{server.url}/health").json()["status"] == "ok"
        models = c.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    assert set(models["documents"]) == {"story", "raw", "other", "broken", "escape"}


def test_chat_completion(served):
    server, lm, store = served
    with httpx.Client(timeout=60) as c:
        r = chat(c, server.url, "Who jumps over the dog?")
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(lm, store, "story", question="Who jumps over the dog?")
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": want.completion_tokens,
                             "total_tokens": want.prompt_tokens + want.completion_tokens}


def test_streaming_chat_and_completion(served):
    server, lm, store = served
    with httpx.Client(timeout=60) as c:
        for kind, body in (("chat", None), ("text", {"document": "raw", "prompt": " The quick", "max_tokens": 8,
                                                      "stream": True})):
            if kind == "chat":
                req = c.build_request("POST", f"{server.url}/v1/chat/completions",
                                      json={"document": "story", "max_tokens": 8, "stream": True,
                                            "messages": [{"role": "user", "content": "What is the question?"}]})
                want = expected(lm, store, "story", question="What is the question?")
            else:
                req = c.build_request("POST", f"{server.url}/v1/completions", json=body)
                want = expected(lm, store, "raw", prompt=" The quick")
            r = c.send(req, stream=True)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            if kind == "chat":
                text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
                assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
                assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
            else:
                text = "".join(ch["choices"][0]["text"] for ch in chunks)
            assert text == want.text
            assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason


def test_completion_continues_raw_text(served):
    server, lm, store = served
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{server.url}/v1/completions", json={"document": "raw", "prompt": " To be, or", "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(lm, store, "raw", prompt=" To be, or").text
    with httpx.Client(timeout=60) as c:  # min_tokens holds the end-of-sequence token back
        r = c.post(f"{server.url}/v1/completions", json={"document": "raw", "prompt": ".", "max_tokens": 12,
                                                         "min_tokens": 12})
    assert r.json()["usage"]["completion_tokens"] == 12 and r.json()["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_each_on_their_own_fork(served):
    server, lm, store = served
    questions = ["Who jumps?", "What is the question?", "Whose fortune?", "Who is lazy?"] * 2
    with httpx.Client(timeout=120) as c, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: chat(c, server.url, q), questions))
    assert all(r.status_code == 200 for r in replies)
    for q, r in zip(questions, replies):
        assert r.json()["choices"][0]["message"]["content"] == expected(lm, store, "story", question=q).text
    assert store.get("story").get_seq_length() == store.get("story").logical_length


@pytest.mark.parametrize("name,status", [("nope", 404), ("../docs/story", 400), ("sub/story", 400), ("..", 400),
                                         ("/etc/passwd", 400), ("escape", 400), ("other", 409), ("broken", 422),
                                         ("", 400), (7, 400)])
def test_document_errors(served, name, status):
    server, _, _ = served
    with httpx.Client(timeout=60) as c:
        r = chat(c, server.url, "hi", document=name)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]


@pytest.mark.parametrize("body,status,text", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"document": "story", "messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"document": "story", "messages": [{"role": "user", "content": "q"}], "max_tokens": 0}).encode(),
     400, "max_tokens"),
    (json.dumps({"document": "story", "messages": [{"role": "user", "content": "q"}], "max_tokens": 65}).encode(),
     400, "max_tokens"),
    (json.dumps({"document": "story", "messages": [{"role": "user", "content": "q"}], "n": 2}).encode(), 400, "n = 1"),
    (json.dumps({"document": "story", "messages": [{"role": "user", "content": "q"}], "temperature": "hot"}).encode(),
     400, "temperature"),
    (json.dumps({"document": "story", "model": "gpt-4", "messages": [{"role": "user", "content": "q"}]}).encode(),
     404, "not served"),
    (json.dumps({"document": "story", "messages": [{"role": "user", "content": "q " * 3000}]}).encode(), 413,
     "larger than"),
])
def test_bad_requests(served, body, status, text):
    server, _, _ = served
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"]


def test_prompt_beyond_the_context(served):
    server, lm, store = served
    T = store.get("story").logical_length
    room = lm.model.config.max_position_embeddings - T
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{server.url}/v1/completions", json={"document": "raw", "prompt": " fox" * room, "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"


def test_loaded_documents_are_bounded(served):
    server, _, store = served
    with httpx.Client(timeout=60) as c:
        for name in ("story", "raw", "story"):
            assert chat(c, server.url, "hi", document=name).status_code == 200
        health = c.get(f"{server.url}/health").json()
    assert set(health["loaded"]) == {"story", "raw"}  # max_documents=2
    assert health["memory_bytes"] == sum(store.get(n).memory_bytes() for n in ("story", "raw")) > 0
    bounded = DocumentStore(store.folder, store.model, store.tokenizer, max_documents=5,
                            max_bytes=store.get("story").memory_bytes())
    bounded.get("story")
    bounded.get("raw")
    assert list(bounded.loaded) == ["raw"]  # the byte bound evicted the older one


def test_compactor_serve_subprocess(folder, tiny_llama):
    """The command line starts a real server process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "compactor", "serve", str(folder), "--port", str(port),
                             "--model", str(tiny_llama), "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"document": "story", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(30)
