"""`tunesmith serve RUN`: a finished run behind HTTP (FastAPI + uvicorn).

- chat runs (causal-lm, preference, or any causal LM directory or packaged name): OpenAI's
  `POST /v1/chat/completions` (streaming as server-sent events) and `GET /v1/models`, so the
  `openai` client works unchanged;
- classifier runs (text and image): `POST /v1/classify`, batched dynamically across requests;
- `GET /health`, and FastAPI's own `/openapi.json` and `/docs`.

One worker thread owns the model: one forward pass at a time. Bad requests get a 4xx with an
OpenAI-style `{"error": {...}}` body; nothing a client sends takes the server down.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith.errors import UserError
from tunesmith.serve_chat import ApiError, ChatStream, ChatWorker


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB; image servers get `max_image_bytes` per request instead
    max_image_bytes: int = 16 << 20
    max_inputs: int = 256  # texts or images in one classify request
    max_tokens: int = 1024  # the largest max_tokens a chat request may ask for
    max_batch: int = 32  # inputs one batch of requests may hold
    # A text batch runs as length-sorted forward passes of this many texts: less padding. Measured on the
    # MiniLM demo run (2 cores): 16 texts as one padded pass 142 texts/s, as two passes of 8 164/s.
    text_pass: int = 8
    window_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # chat requests waiting; beyond it, 503
    chat_batch: int = 16  # answers generated together
    chat_window_ms: float = 20.0


# ---- requests ---------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's optional `name` and friends
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]]) -> str:
        if isinstance(v, str):
            return v
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(p["text"] for p in v)


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields it defines that change nothing here are accepted at
    their neutral values, anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=512)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)  # vLLM's extension
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extension
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] = 1
    seed: int | None = None
    user: str | None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logprobs: Literal[False] = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    texts: list[str] = Field(min_length=1)


# ---- the model behind the server ---------------------------------------------------------------

def model_kind(source: str | Path) -> str:
    """'chat', 'text' or 'image' for a run directory, a model directory or a packaged model name."""
    path = Path(source)
    model_dir = path / "model" if (path / "model" / "config.json").exists() else path
    cfg_file = model_dir / "config.json"
    if not cfg_file.exists():
        if path.exists():
            raise UserError(f"{source} is not a finished run or a model directory (no model/config.json)")
        return "chat"  # a packaged or hub name: ChatModel resolves it or says what is wrong
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_file} cannot be read: {e}") from None
    if "architecture" in cfg:
        return "image"
    archs = cfg.get("architectures") or []
    if cfg.get("is_decoder") or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "chat"
    return "text"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ---- the app -------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413 before it is read whole."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _error_body(413, f"the request body is over the limit of {self.max_bytes:,} bytes")
        try:
            if length is not None and int(length) > self.max_bytes:
                return await JSONResponse(too_big, status_code=413)(scope, receive, send)
        except ValueError:
            return await JSONResponse(_error_body(400, "Content-Length is not a number"), status_code=400)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, too_big["error"]["message"])
            return message

        await self.app(scope, limited, send)


class ApiKey:
    """ASGI middleware: /v1/ routes need `Authorization: Bearer KEY` (the OpenAI client sends its api_key
    so); /health and the API docs stay open, as vLLM's and llama.cpp's servers do."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        import hmac

        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(auth, b"Bearer " + self.key):
                from starlette.responses import JSONResponse

                body = _error_body(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                        "(the openai client's api_key)", kind="authentication_error")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def _error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _validation_message(exc: Any) -> tuple[str, str | None]:
    """One line from FastAPI's validation errors: where, and what is wrong."""
    parts, param = [], None
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "json_invalid":
            msg, loc = f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", ""
        param = param or loc or None
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", param


def _install_errors(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    @app.exception_handler(ApiError)
    async def api_error(_request: Any, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.status, exc.message, exc.param, exc.kind), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(_error_body(400, message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Any, exc: HTTPException) -> JSONResponse:
        return JSONResponse(_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(UserError)
    async def user_error(_request: Any, exc: UserError) -> JSONResponse:
        return JSONResponse(_error_body(400, str(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(500, f"{type(exc).__name__}: {str(exc)[:300]}", kind="server_error"), status_code=500)


class Served:
    """What a server holds: the model, its kind and name, and the worker that runs it."""

    def __init__(self, source: str | Path, *, name: str | None = None, onnx: bool = False, quantized: bool = False,
                 limits: Limits | None = None, device: str | None = None):
        self.limits = limits or Limits()
        self.kind = model_kind(source)
        self.name = name or Path(str(source).rstrip("/")).name or str(source)
        self.created = now()
        if self.kind == "chat":
            if onnx or quantized:
                raise UserError("--onnx serves classifiers; a chat model runs in PyTorch (or export it with --format gguf)")
            from tunesmith.generate import ChatModel

            self.model = ChatModel(source, device=device)
            self.context = int(getattr(self.model.model.config, "max_position_embeddings", 0) or 0)
            self.chat = ChatWorker(self.model, self.limits.max_queue, self.context, self.limits.chat_batch,
                                   self.limits.chat_window_ms)
        else:
            from tunesmith.batcher import DynamicBatcher
            from tunesmith.predict import load

            self.model = load(source, device=device, onnx=onnx, quantized=quantized)
            if self.kind == "image":
                run = self.model.predict_images
            else:
                run = lambda texts: self.model.predict(texts, self.limits.text_pass)  # noqa: E731
            self.batcher = DynamicBatcher(run, self.limits.max_batch, self.limits.window_ms)

    def check_model(self, requested: str | None) -> None:
        if requested not in (None, "", self.name):
            raise ApiError(404, f"the model '{requested}' does not exist here; this server serves '{self.name}'",
                           "model", "model_not_found")

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "model": self.name, "kind": self.kind}
        if self.kind == "chat":
            out["waiting"] = self.chat.jobs.qsize()
            c = self.chat
            out["batching"] = {"max_batch": self.limits.chat_batch, "window_ms": self.limits.chat_window_ms,
                               "batches": c.batches, "items": c.rows, "decoding_steps": c.steps,
                               "mean_batch": round(c.row_steps / c.steps, 2) if c.steps else 0.0}
        else:
            out["labels"] = self.model.labels
            out["batching"] = {"max_batch": self.limits.max_batch, "window_ms": self.limits.window_ms,
                               **self.batcher.stats.as_dict()}
            out["backend"] = getattr(self.model, "backend", "pytorch")
        return out


def build_app(source: str | Path, api_key: str | None = None, **kwargs: Any) -> Any:
    """The FastAPI app serving `source` (a run directory, a model directory or a packaged name); with
    `api_key`, the /v1/ routes need it as a bearer token."""
    import importlib.util

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"tunesmith serve needs the '{package}' package: pip install 'tunesmith[serve]'")
    from fastapi import FastAPI

    served = Served(source, **kwargs)
    app = FastAPI(title=f"tunesmith: {served.name}", version=__import__("tunesmith").__version__,
                  description=f"A {served.kind} model fine-tuned with tunesmith.")
    app.state.served = served
    limit = served.limits.max_image_bytes if served.kind == "image" else served.limits.max_body_bytes
    app.add_middleware(BodyLimit, max_bytes=limit)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)  # added last: it runs first, before a body is read
    _install_errors(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return served.health()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "tunesmith"}]}

    if served.kind == "chat":
        _chat_routes(app, served)
    elif served.kind == "image":
        _image_routes(app, served)
    else:
        _text_routes(app, served)
    return app


def _wrong_kind(app: Any, served: Served) -> None:
    """The other kind's endpoint answers 404 with what to use instead."""
    other = "/v1/classify" if served.kind == "chat" else "/v1/chat/completions"
    use = "POST /v1/chat/completions" if served.kind == "chat" else "POST /v1/classify"

    @app.post(other, include_in_schema=False)
    def wrong() -> None:
        raise ApiError(404, f"this server holds a {served.kind} model ('{served.name}'); use {use}")


def _chat_routes(app: Any, served: Served) -> None:
    from fastapi.responses import StreamingResponse

    _wrong_kind(app, served)
    limits = served.limits

    @app.post("/v1/chat/completions")
    async def completions(req: ChatRequest) -> Any:
        served.check_model(req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(256, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens")
        options = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                   "repetition_penalty": req.repetition_penalty, "seed": req.seed}
        stream = ChatStream(served.chat, [m.model_dump() for m in req.messages], options, list(req.stop or []))
        await stream.start()
        cid, created = new_id("chatcmpl"), now()
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(stream, cid, created, served.name, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, finish, usage_counts = [], "stop", {}
        try:
            async for event in stream:
                if event[0] == "text":
                    pieces.append(event[1])
                else:
                    finish, usage_counts = event[1], event[2]
        finally:
            stream.close()
        return {"id": cid, "object": "chat.completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage_counts}


async def _sse(stream: ChatStream, cid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: chat.completion.chunk events, then `data: [DONE]`. A client that disconnects
    cancels this generator, and with it the generation."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in stream:
            if event[0] == "text":
                yield chunk({"content": event[1]})
            else:
                yield chunk({}, event[1])
                if include_usage:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": event[2]}
                    yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(_error_body(e.status, e.message, e.param, e.kind))}\n\n"
    except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream, which then ends
        yield f"data: {json.dumps(_error_body(500, f'{type(e).__name__}: {str(e)[:300]}', kind='server_error'))}\n\n"
    finally:
        stream.close()


def _results(served: Served, preds: list[Any]) -> dict[str, Any]:
    return {"object": "classification", "model": served.name,
            "results": [{"label": p.label, "probabilities": p.probabilities} for p in preds],
            "usage": {"inputs": len(preds)}}


def _text_routes(app: Any, served: Served) -> None:
    _wrong_kind(app, served)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        served.check_model(req.model)
        if len(req.texts) > served.limits.max_inputs:
            raise ApiError(400, f"{len(req.texts)} texts is over this server's limit of {served.limits.max_inputs} "
                                "per request", "texts")
        return _results(served, await served.batcher.submit(req.texts))


def _image_routes(app: Any, served: Served) -> None:
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    _wrong_kind(app, served)
    limits = served.limits

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        """Images as multipart/form-data: `curl -F image=@photo.jpg` (several `image` fields for several)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "send images as multipart/form-data, e.g. curl -F image=@photo.jpg URL/v1/classify")
        try:
            form = await request.form(max_files=limits.max_inputs, max_fields=limits.max_inputs)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart's parse errors: the client's form is broken
            raise ApiError(400, f"the multipart form cannot be read: {e}") from None
        uploads = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise ApiError(400, "no image in the form; send one or more files as `image` fields", "image")
        images = []
        for i, (_field, up) in enumerate(uploads):
            data = await up.read()
            try:
                images.append(await run_in_threadpool(served.model.load_image, data))
            except UserError as e:
                name = up.filename or f"file {i + 1}"
                raise ApiError(400, f"{name}: {str(e).split(': ', 1)[-1]}", "image") from None
        return _results(served, await served.batcher.submit(images))


def serve(source: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Build the app and run it with uvicorn until Ctrl-C."""
    import socket

    import uvicorn

    try:  # a clear error before the model loads, where uvicorn would log and exit 1
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server using it? "
                        "choose another --port") from None
    app = build_app(source, **kwargs)
    served = app.state.served
    print(f"tunesmith: serving {served.kind} model '{served.name}' on http://{host}:{port} "
          f"(API docs at /docs; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not kwargs.get("api_key"):
        print(f"tunesmith: warning: listening on {host} without --api-key: anyone who can reach this port can use "
              "the model", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
