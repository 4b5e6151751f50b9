"""An OpenAI-compatible HTTP server that answers from compacted document artifacts (FastAPI + uvicorn).

`compactor serve artifacts/ --port 8000` serves one model and the `.h5` artifacts of one folder:
- POST /v1/chat/completions {"document": "macbeth", "messages": [...], ...}: after a chat artifact the messages
  continue the document's user turn (capture/chat.py); after a raw-text one they open a chat of their own;
- POST /v1/completions {"document": "macbeth", "prompt": "...", ...}: raw text that continues the document;
- "stream": true answers with server-sent events (OpenAI's chunk objects, then `data: [DONE]`);
- GET /v1/models, GET /health.
A document name is a file stem in the folder (letters, digits, '.', '_', '-'; no path separators, no '..'); its
resolved path must stay inside the folder. Artifacts are loaded on first use and kept in memory, least recently
used first out beyond `max_documents` or `max_bytes`. Every request generates on its own fork of the loaded cache;
one lock serialises the tokenizer and the model's forward calls (one CPU model computes one request at a time;
requests queue). Errors are JSON {"error": {"message", "type", "code"}} with a 4xx status.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import ArtifactError, CompactorError
from ..storage.artifact import read_artifact, read_meta
from .answer import Sampling, generate, messages_ids, text_ids
from .cache import CompactedCache
from .loader import cache_from_artifact, check_compatible, model_limits

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_BODY_BYTES = 1 << 20


class ServeError(Exception):
    """A request the server refuses: HTTP status, one-line message, OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class DocumentStore:
    """The artifacts of one folder, loaded on first use and kept in memory (least recently used evicted first)."""

    def __init__(self, folder: str | Path, model, tokenizer, max_documents: int = 4, max_bytes: int | None = None):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise CompactorError(f"artifact folder not found: {folder}")
        if max_documents < 1:
            raise CompactorError("max_documents must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_documents, self.max_bytes = max_documents, max_bytes
        self.loaded: OrderedDict[str, CompactedCache] = OrderedDict()
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.h5") if NAME_PATTERN.match(p.stem) and ".." not in p.stem)

    def path_of(self, name) -> Path:
        """The artifact file a request names, refused unless it is a plain name that stays inside the folder."""
        if not isinstance(name, str) or not name:
            raise ServeError(400, "'document' must name an artifact of the served folder (e.g. \"macbeth\")")
        stem = name[:-3] if name.endswith(".h5") else name
        if not NAME_PATTERN.match(stem) or ".." in stem:
            raise ServeError(400, f"invalid document name {name!r}: letters, digits, '.', '_' and '-' only, no "
                                  "path separators or '..'")
        path = self.folder / f"{stem}.h5"
        if not path.resolve().is_relative_to(self.folder):
            raise ServeError(400, f"document {name!r} resolves outside the served folder")
        if not path.is_file():
            raise ServeError(404, f"no document named {stem!r} (see GET /v1/models)", "not_found_error")
        return path

    def get(self, name) -> CompactedCache:
        """The loaded cache of a document (shared: generate on a fork)."""
        path = self.path_of(name)
        with self.lock:
            if path.stem in self.loaded:
                self.loaded.move_to_end(path.stem)
                return self.loaded[path.stem]
            where = f"document {path.stem!r}"
            try:
                meta = read_meta(path)  # fields validated, no dataset read yet
            except ArtifactError as e:
                raise ServeError(422, f"{where} cannot be served: {e}", "artifact_error") from None
            try:
                model_limits(self.model).check(meta, where)  # another model's layout: a conflict, not damage
            except ArtifactError as e:
                raise ServeError(409, str(e), "model_mismatch_error") from None
            try:  # sizes bounded by the model before any dataset is read; digest verified
                art = read_artifact(path, limits=model_limits(self.model))
            except ArtifactError as e:
                raise ServeError(422, f"{where} cannot be served: {e}", "artifact_error") from None
            try:
                check_compatible(art.meta, self.model, self.tokenizer, where=where)
            except ArtifactError as e:
                raise ServeError(409, str(e), "model_mismatch_error") from None
            try:
                cache = cache_from_artifact(art, self.model)
            except CompactorError as e:
                raise ServeError(422, f"document {path.stem!r} cannot be served: {e}", "artifact_error") from None
            self.loaded[path.stem] = cache
            self._evict(keep=path.stem)
            return cache

    def memory_bytes(self) -> int:
        return sum(c.memory_bytes() for c in self.loaded.values())

    def _evict(self, keep: str) -> None:
        def over() -> bool:
            return len(self.loaded) > self.max_documents or (
                self.max_bytes is not None and self.memory_bytes() > self.max_bytes)

        while over() and len(self.loaded) > 1:
            oldest = next(iter(self.loaded))
            if oldest == keep:
                break
            del self.loaded[oldest]


def _check_body(data) -> dict:
    if not isinstance(data, dict):
        raise ServeError(400, "the request body must be a JSON object")
    return data


def _field(data: dict, key: str, kind, default=None, required: bool = False):
    value = data.get(key, default)
    if value is None:
        if required:
            raise ServeError(400, f"missing field {key!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ServeError(400, f"field {key!r} must be {kind.__name__}")
    return value


def sampling_from(data: dict, default_max: int, max_new_tokens: int) -> Sampling:
    n = _field(data, "max_completion_tokens", int) or _field(data, "max_tokens", int, default_max)
    if not 1 <= n <= max_new_tokens:
        raise ServeError(400, f"max_tokens must be between 1 and {max_new_tokens} (got {n})")
    if _field(data, "n", int, 1) != 1:
        raise ServeError(400, "only n = 1 is supported")
    if data.get("stop") is not None:
        raise ServeError(400, "'stop' sequences are not supported")
    sampling = Sampling(n, _field(data, "temperature", float, 0.0), _field(data, "top_p", float, 1.0),
                        _field(data, "seed", int), _field(data, "min_tokens", int, 0))
    try:
        return sampling.check()
    except CompactorError as e:
        raise ServeError(400, str(e)) from None


def create_app(store: DocumentStore, model_id: str, max_new_tokens: int = 1024, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application serving `store` with its model."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    app = FastAPI(title="compactor", version="1")
    model, tokenizer = store.model, store.tokenizer
    model_lock = threading.Lock()

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return error(exc.status, exc.message, exc.kind)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ServeError(413, f"request body larger than {max_body_bytes} bytes", "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ServeError(413, f"request body larger than {max_body_bytes} bytes", "request_too_large")
        try:
            return _check_body(json.loads(body))
        except (ValueError, UnicodeDecodeError):
            raise ServeError(400, "the request body is not valid JSON") from None

    def check_model(data: dict) -> None:
        name = data.get("model")
        if name is not None and name != model_id:
            raise ServeError(404, f"model {name!r} is not served here; this server serves {model_id!r}",
                             "not_found_error")

    def prepare(data: dict, chat: bool):
        """(cache, prompt ids, sampling) for a request, or a ServeError."""
        check_model(data)
        sampling = sampling_from(data, min(128 if chat else 16, max_new_tokens), max_new_tokens)
        cache = store.get(data.get("document"))
        try:
            with model_lock:  # the fast tokenizer is not safe to share between threads
                if chat:
                    ids = messages_ids(cache.metadata, tokenizer, data.get("messages"))
                else:
                    ids = text_ids(tokenizer, _field(data, "prompt", str, required=True))
        except CompactorError as e:
            raise ServeError(400, str(e)) from None
        if ids.numel() == 0:
            raise ServeError(400, "the prompt has no tokens")
        limit = getattr(model.config, "max_position_embeddings", 0) or 0
        need = cache.get_seq_length() + ids.numel() + sampling.max_new_tokens
        if limit and need > limit:
            raise ServeError(400, f"document ({cache.get_seq_length()} tokens) + prompt ({ids.numel()}) + max_tokens "
                                  f"({sampling.max_new_tokens}) = {need} tokens exceeds the model's context of "
                                  f"{limit}", "context_length_exceeded")
        return cache, ids, sampling

    def run(cache, ids, sampling, streamer=None, stopping=None):
        with model_lock:
            return generate(model, tokenizer, cache, ids, sampling, streamer=streamer, stopping_criteria=stopping)

    def completion_body(kind: str, result, rid: str, created: int) -> dict:
        choice = {"index": 0, "finish_reason": result.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"], choice["logprobs"] = result.text, None
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model_id, "choices": [choice],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens}}

    class Cancelled(StoppingCriteria):
        def __init__(self, event: threading.Event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    def stream(kind: str, cache, ids, sampling, rid: str, created: int):
        """Server-sent events: OpenAI chunk objects as text arrives, a last one with finish_reason, [DONE]."""
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, outcome = threading.Event(), {}

        def work():
            try:
                outcome["result"] = run(cache, ids, sampling, streamer, StoppingCriteriaList([Cancelled(cancel)]))
            except Exception as e:  # reported in the stream; the client already has a 200
                outcome["error"] = str(e)
                streamer.end()

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_id,
                                          "choices": [choice]}) + "\n\n"

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            if kind == "chat":
                yield chunk(None, role=True)
            for text in streamer:
                if text:
                    yield chunk(text)
            thread.join()
            if "error" in outcome:
                yield "data: " + json.dumps({"error": {"message": outcome["error"], "type": "server_error",
                                                       "code": 500}}) + "\n\n"
            else:
                yield chunk(None, outcome["result"].finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client that went away stops the generation at the next token

    async def complete(request: Request, kind: str):
        data = await read_json(request)
        cache, ids, sampling = await run_in_threadpool(prepare, data, kind == "chat")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if _field(data, "stream", bool, False):
            return StreamingResponse(stream(kind, cache, ids, sampling, rid, created), media_type="text/event-stream")
        result = await run_in_threadpool(run, cache, ids, sampling)
        return completion_body(kind, result, rid, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "text")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "compactor"}],
                "documents": store.names()}

    @app.get("/health")
    async def health():
        with store.lock:
            loaded = {name: c.memory_bytes() for name, c in store.loaded.items()}
        return {"status": "ok", "model": model_id, "documents": len(store.names()), "loaded": loaded,
                "memory_bytes": sum(loaded.values())}

    return app
