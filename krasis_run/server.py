"""An OpenAI-compatible HTTP server over one Runtime: `krasis-run ART --serve`.

Starlette on uvicorn. One engine thread owns the Runtime and runs one generation at a time; requests
wait in a bounded queue (429 when it is full). Everything about a request is checked on the event
loop before it is queued (types, ranges, the model name, the prompt length against the context), so
a bad request never reaches prefill. The engine thread turns tokens into text (multi-byte safe, stop
strings matched on the text) and hands text deltas back to the request's coroutine; a client that
goes away sets the job's cancel flag, and the engine drops the generator at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .format import KrsError
from .tokenizer import StopStrings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 64
MAX_BODY_BYTES = 32 << 20
MAX_STOP_STRINGS = 16
ROLES = {"system", "developer", "user", "assistant", "tool"}


class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------- request validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(body: dict, name: str, low: float, high: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(400, f"'{name}' must be a number, not {type(value).__name__}", name, "invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, not {value}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise ApiError(400, f"'{name}' must be an integer, not {type(value).__name__}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {bound}, not {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, not {type(value).__name__}", name, "invalid_type")
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop", "invalid_value")
    return [s for s in stop if s]


def _message_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...] as newer clients send it
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported",
                               f"messages[{index}].content", "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   f"messages[{index}].content", "invalid_type")


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    presence_penalty: float
    frequency_penalty: float


@dataclass
class Job:
    """One queued generation. The engine thread fills `events`; the request's coroutine drains them."""

    ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Penalties:
    """OpenAI presence/frequency penalties over the tokens generated so far (the prompt does not count)."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency
        self.counts = None
        self.pending: list[int] = []

    def add(self, token: int) -> None:
        self.pending.append(token)

    def __call__(self, logits):
        import torch

        if self.counts is None:
            self.counts = torch.zeros(logits.shape[-1], dtype=torch.float32)
        for token in self.pending:
            if token < self.counts.shape[0]:
                self.counts[token] += 1
        self.pending.clear()
        return logits.float() - self.frequency * self.counts - self.presence * (self.counts > 0).float()


# ---------------------------------------------------------------- the engine thread


class Engine:
    """Owns the Runtime: one generation at a time, from a bounded queue of jobs."""

    def __init__(self, runtime, max_queue: int = DEFAULT_MAX_QUEUE):
        self.rt = runtime
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.busy = False
        self.served = 0
        self._thread = threading.Thread(target=self._loop, name="krasis-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           None, "queue_full", "server_busy") from None

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                job.emit(("done", "cancelled", len(job.ids), 0))
                continue
            self.busy = True
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - reported to the client, the engine keeps serving
                job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self.served += 1

    def _run(self, job: Job) -> None:
        rt, s = self.rt, job.sampling
        limit = min(s.max_tokens, rt.context_length - len(job.ids))
        penalties = Penalties(s.presence_penalty, s.frequency_penalty) \
            if (s.presence_penalty or s.frequency_penalty) else None
        decoder, stops = rt.tokenizer.stream(), StopStrings(s.stop)
        generator = rt.generate(job.ids, max_new_tokens=limit, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, seed=s.seed, logits_processor=penalties)
        job.started.set()
        count, finish = 0, None
        try:
            for token in generator:
                count += 1
                if penalties is not None:
                    penalties.add(token)
                text, stopped = stops.feed(decoder.push(token))
                if text:
                    job.emit(("delta", text))
                if stopped:
                    finish = "stop"
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
        finally:
            generator.close()  # frees the KV cache; the engine is free for the next job
        if finish is None:
            tail, stopped = stops.feed(decoder.flush())
            tail += "" if stopped else stops.flush()
            if tail:
                job.emit(("delta", tail))
            finish = "stop" if stopped or count < limit else "length"
        job.emit(("done", finish, len(job.ids), count))


# ---------------------------------------------------------------- the HTTP application


class KrasisServer:
    def __init__(self, runtime, model_name: str, api_key: str | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        self.rt, self.model_name, self.api_key = runtime, model_name, api_key or None
        self.engine = Engine(runtime, max_queue)
        self.created = int(time.time())
        gen = getattr(runtime, "generation_config", None) or {}
        sampling = bool(gen.get("do_sample", False))
        self.default_temperature = float(gen.get("temperature", 1.0)) if sampling else 0.0
        self.default_top_p = float(gen.get("top_p", 1.0)) if sampling else 1.0
        self.default_top_k = int(gen.get("top_k", 0) or 0) if sampling else 0
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error},
                             lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.engine.stop()

    # ------------------------------------------------------------ plumbing

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, None, code).response()

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(401, "no API key given: send 'Authorization: Bearer KEY'", None, "invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", None, "invalid_api_key")

    async def _body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", None, "request_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", None, "request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if model is None:
            raise ApiError(400, "missing required parameter: 'model'", "model", "missing_required_parameter")
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")
        return body

    def _sampling(self, body: dict, prompt_tokens: int) -> Sampling:
        context = self.rt.context_length
        if prompt_tokens >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{prompt_tokens} tokens, leaving no room to generate",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        max_tokens = _integer(body, "max_completion_tokens", 1, context)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1, context)
        else:
            _integer(body, "max_tokens", 1, context)  # still type-checked when both are given
        n = _integer(body, "n", 1, 1)
        del n
        top_k = body.get("top_k")
        if top_k == -1:  # vLLM's spelling of "no top-k"
            body = {**body, "top_k": 0}
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise ApiError(400, "'seed' must be an integer", "seed", "invalid_type")
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
            raise ApiError(400, "logprobs are not supported by this server", "logprobs", "unsupported_parameter")
        return Sampling(
            max_tokens=max_tokens if max_tokens is not None else context - prompt_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0, self.default_temperature),
            top_p=_number(body, "top_p", 0.0, 1.0, self.default_top_p),
            top_k=_integer(body, "top_k", 0) if body.get("top_k") is not None else self.default_top_k,
            seed=None if seed is None else seed & 0xFFFFFFFFFFFFFFFF,
            stop=_stop_strings(body),
            presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
            frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        )

    def _stream_options(self, body: dict, stream: bool) -> bool:
        options = body.get("stream_options")
        if options is None:
            return False
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                           "invalid_value")
        return _boolean(options, "include_usage")

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if messages is None:
            raise ApiError(400, "missing required parameter: 'messages'", "messages", "missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
            role = m.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise ApiError(400, f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}",
                               f"messages[{i}].role", "invalid_value")
            if "content" not in m and role != "assistant":
                raise ApiError(400, f"messages[{i}] has no 'content'", f"messages[{i}].content",
                               "missing_required_parameter")
            clean.append({"role": "system" if role == "developer" else role,
                          "content": _message_text(m.get("content"), i)})
        try:
            text = self.rt.tokenizer.apply_chat_template(clean, add_generation_prompt=True)
        except KrsError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        ids = self.rt.tokenizer.encode(text)
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "messages", "invalid_value")
        return ids

    def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "missing required parameter: 'prompt'", "prompt", "missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self.rt.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            vocab = self.rt.args.vocab_size
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_value")
            ids = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, "this server takes one prompt per request", "prompt", "invalid_value")
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt", "invalid_type")
        for name in ("suffix",):
            if body.get(name) is not None:
                raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
        if _boolean(body, "echo"):
            raise ApiError(400, "'echo' is not supported by this server", "echo", "unsupported_parameter")
        if body.get("best_of") not in (None, 1):
            raise ApiError(400, "'best_of' must be 1", "best_of", "invalid_value")
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt", "invalid_value")
        return ids

    # ------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, "busy": self.engine.busy,
                             "queued": self.engine.queue.qsize(), "served": self.engine.served})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "krasis",
                "context_length": self.rt.context_length}

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._check_key(request)
            name = request.path_params["model"]
            if name != self.model_name:
                raise ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        except ApiError as e:
            return e.response()
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        try:
            self._check_key(request)
            body = await self._body(request)
            stream = _boolean(body, "stream")
            include_usage = self._stream_options(body, stream)
            ids = self._chat_prompt(body) if chat else self._completion_prompt(body)
            sampling = self._sampling(body, len(ids))
            job = Job(ids, sampling, asyncio.get_running_loop())
            self.engine.submit(job)
        except ApiError as e:
            return e.response()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return StreamingResponse(self._sse(job, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, rid, chat)

    def _usage(self, prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _collect(self, request: Request, job: Job, rid: str, chat: bool) -> Response:
        """Non-streaming: gather the text; a client that disconnects meanwhile cancels the job."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        parts: list[str] = []
        try:
            while True:
                getter = asyncio.ensure_future(job.events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    job.cancelled.set()
                    return Response(status_code=499)
                event = getter.result()
                if event[0] == "delta":
                    parts.append(event[1])
                elif event[0] == "error":
                    return ApiError(500, event[1], None, "generation_failed", "server_error").response()
                else:
                    _, finish, prompt_tokens, completion_tokens = event
                    break
        finally:
            watcher.cancel()
        text = "".join(parts)
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                             "system_fingerprint": None, "choices": [choice],
                             "usage": self._usage(prompt_tokens, completion_tokens)})

    async def _sse(self, job: Job, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None, with_usage: bool = include_usage) -> str:
            data = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                    "system_fingerprint": None, "choices": choices}
            if with_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {} if text is None and not role else {"content": text or ""}
            if role:
                delta = {"role": "assistant", "content": ""}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        try:
            if chat:
                yield chunk([choice(None, None, role=True)])
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    yield chunk([choice(event[1], None)])
                elif event[0] == "error":
                    error = ApiError(500, event[1], None, "generation_failed", "server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                else:
                    _, finish, prompt_tokens, completion_tokens = event
                    yield chunk([choice(None, finish)])
                    if include_usage:
                        yield chunk([], self._usage(prompt_tokens, completion_tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # no-op when it finished; stops the engine when the client went away


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------- running it


def build_app(runtime, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
    return KrasisServer(runtime, model_name, api_key, max_queue)


def model_name_for(artifact: str | Path) -> str:
    return Path(str(artifact)).name.removesuffix(".krs")


def uvicorn_config(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info"):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=5, lifespan="on")


def serve(server: KrasisServer, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_level: str = "info") -> None:
    """Run until interrupted (uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(server.app, host, port, log_level)).run()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_server(runtime, artifact: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, log_level: str = "info") -> None:
    """`krasis-run ART --serve` and the `krasis` launcher: serve until Ctrl-C."""
    import sys

    name = model_name_for(artifact)
    if not is_loopback(host) and not api_key:
        print(f"krasis: warning: serving on {host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving '{name}' at http://{shown}:{port}/v1 (OpenAI-compatible: /v1/chat/completions, "
          f"/v1/completions, /v1/models; /health); context {runtime.context_length} tokens, queue {max_queue}"
          f"{', API key required' if api_key else ''}; Ctrl-C stops", file=sys.stderr, flush=True)
    serve(KrasisServer(runtime, name, api_key, max_queue), host, port, log_level)


class ServerThread:
    """uvicorn in a background thread on a free loopback port: for tests and embedding."""

    def __init__(self, server: KrasisServer, host: str = DEFAULT_HOST, port: int = 0):
        import uvicorn

        self.krasis = server
        self.server = uvicorn.Server(uvicorn_config(server.app, host, port, "warning"))
        self.thread = threading.Thread(target=self.server.run, name="krasis-http", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
