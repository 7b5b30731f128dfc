"""``elastiq serve``: an OpenAI-compatible HTTP server on one engine, for the programs of the device.

Editors, chat front-ends and scripts speak OpenAI's API to local models (llama.cpp's server and
Ollama do the same); this serves ``/v1/chat/completions`` and ``/v1/completions`` (streamed as
server-sent events or not), ``/v1/models`` and ``/v1/elastiq/status`` on Starlette and uvicorn.
The engine is not thread-safe, so one worker thread runs every generation, one request after
another; the requests waiting for it are bounded (``Limits.max_queue``, then 503 with a
Retry-After), as are the body, ``max_tokens`` and the prompt (the context), so that no request
makes the process grow beyond the KV cache it reserved at load. A client that goes away stops its
generation at the next token. With a ``Governor`` the serving rate follows the free memory,
switched at the next token boundary (an in-flight request's context is re-filled at the new
widths); a request may pin a more-pruned rate (``"elastiq": {"rate": R}`` or the model
``NAME@R``), within what memory allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import ElastiqError
from .chat import stop_ids, template_ids
from .floor import DEFAULT_MAX_KL, check_floor, within_floor
from .generate import Sampling
from .governor import Governor
from ..machine import free_memory

MAX_BODY = 1 << 20  # bytes of a request body
MAX_QUEUE = 16  # requests waiting for the engine, beside the one it runs


@dataclass(frozen=True)
class Limits:
    """What one request may ask: ``max_body`` bytes, and a reply of ``max_tokens`` by default
    (a request's ``max_tokens`` may go up to the context); ``max_queue`` requests wait at most."""

    max_body: int = MAX_BODY
    max_queue: int = MAX_QUEUE
    max_tokens: int = 256


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


@dataclass
class Job:
    """One admitted request, as the worker runs it."""

    ids: list[int]
    pin: float | None  # a rate the request asked for
    max_tokens: int
    sampling: Sampling
    stops: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str  # stop (a stop token or string), length (max_tokens or the context), cancelled
    prompt_tokens: int
    completion_tokens: int
    rate: float


class _Abort(Exception):
    """Raised from the token callback to end a generation early (a stop string, a cancel)."""


def visible(text: str, stops: list[str]) -> tuple[int, bool]:
    """How much of ``text`` may be shown: up to the first stop string (True: it was hit), else all
    but a tail that could be the start of one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - hold, False


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
          dict: "an object"}


def _get(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    """``body[name]`` checked to be of ``kind`` (an int is a number; a bool is neither), or ``default``."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_field")
        return default
    ok = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and ok and not math.isfinite(value):
        ok = False  # JSON's NaN and Infinity, which Python's parser accepts
    if not ok:
        what = " or ".join(_TYPES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:40]}", param=name,
                       code="invalid_type")
    return float(value) if kind is float else value


class Server:
    """The ASGI app (``app``) serving ``engine``. Fields a request leaves out take ``defaults``
    (the command line's temperature, top-k and seed); ``api_key``, when set, is required as a
    bearer token. The serving rate is the ``governor``'s target, or the rate loaded without one; a
    pinned rate must be offered, within the quality floor ``max_kl``, and no less pruned than it."""

    def __init__(self, engine, limits: Limits = Limits(), api_key: str | None = None,
                 defaults: Sampling = Sampling(), max_kl: float = DEFAULT_MAX_KL, name: str | None = None,
                 governor: Governor | None = None):
        self.engine, self.limits, self.api_key, self.defaults, self.max_kl = engine, limits, api_key, defaults, max_kl
        self.governor = governor
        if governor is not None:
            governor.on_change = lambda _: self._settle_soon()
        self.home = engine.rate
        self.name = name or engine.ckpt.path.name.removesuffix(".elastiq")
        self.stops = stop_ids(engine.tokenizer)
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="elastiq-engine")
        self.closing = threading.Event()
        self.admitted = 0  # requests running or waiting (changed on the event loop only)
        self.served = self.tokens = self.switches = 0
        self.busy_s = self.decode_s = 0.0
        self.last_tok_s = 0.0
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/elastiq/status", self.status, methods=["GET"])]
        handlers = {ApiError: lambda _, err: err.response(), HTTPException: _http_error, Exception: _internal_error}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        if self.governor is not None:
            self.governor.start()
        yield
        if self.governor is not None:
            self.governor.stop()
        self.closing.set()  # a generation still running ends at its next token
        self.worker.shutdown(wait=True, cancel_futures=True)
        print(f"elastiq: stopped after serving {self.served} requests ({self.tokens} tokens)", file=sys.stderr)

    # --- requests --------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """Refuse a request without the bearer token ``api_key`` (when one is set)."""
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key: send the header Authorization: Bearer KEY "
                                    "(elastiq serve --api-key)", code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        """The request's JSON object, after the API key and the body's size are checked."""
        self._authorize(request)
        too_big = ApiError(413, f"the request body exceeds {self.limits.max_body} bytes (elastiq serve --max-body)",
                           code="body_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _serving(self) -> float:
        """The rate a request that pins none runs at."""
        return self.home if self.governor is None else self.governor.rate

    def _target(self, job: Job) -> float:
        """The rate ``job`` runs at now: its pin, unless memory asks for a more-pruned one."""
        return self._serving() if job.pin is None else max(job.pin, self._serving())

    def _rate(self, body: dict) -> float | None:
        """The rate the request pins by ``elastiq.rate`` or ``model: NAME@R``, if any."""
        model = _get(body, "model", str, self.name)
        name, _, pinned = model.partition("@")
        if name != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server runs {self.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        rates = []
        if pinned:
            try:
                rates.append(("model", float(pinned)))
            except ValueError:
                raise ApiError(400, f"the model {model!r} pins no rate: use NAME@R with R a number like 0.25",
                               param="model", code="invalid_rate") from None
        extra = _get(body, "elastiq", dict, {})
        if extra.get("rate") is not None:
            rates.append(("elastiq.rate", _get(extra, "rate", float)))
        if not rates:
            return None
        if len({r for _, r in rates}) > 1:
            raise ApiError(400, f"the model name pins rate {rates[0][1]} and elastiq.rate {rates[1][1]}",
                           param="elastiq.rate", code="invalid_rate")
        param, rate = rates[0]
        ckpt = self.engine.ckpt
        try:
            ckpt.rate_entry(rate)
            rate = next(r for r in ckpt.rates if abs(r - rate) < 1e-9)
            check_floor(ckpt, rate, self.max_kl)
        except ElastiqError as err:
            raise ApiError(400, str(err), param=param, code="invalid_rate") from None
        if rate < self._serving():
            raise ApiError(400, f"rate {rate} is less pruned than the rate {self._serving()} this server runs (the "
                                "least-pruned that fits the memory, or --rate); a request may pin a rate of "
                                f"{self._serving()} or more", param=param, code="invalid_rate")
        return rate

    def _job(self, body: dict, ids: list[int]) -> Job:
        """The request's generation, its fields checked against the limits and the context."""
        ctx = self.engine.ctx
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {ctx} (elastiq serve --ctx)",
                           param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
        max_tokens = _get(body, "max_completion_tokens", int) or _get(body, "max_tokens", int, self.limits.max_tokens)
        if not 1 <= max_tokens <= ctx:
            raise ApiError(400, f"max_tokens must be 1 to the context, {ctx}; got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if _get(body, "n", int, 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
        stop = _get(body, "stop", (str, list), [])
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "'stop' must be a string or up to 4 non-empty strings", param="stop",
                           code="invalid_type")
        d = self.defaults
        temperature, seed = _get(body, "temperature", float, d.temperature), _get(body, "seed", int, d.seed)
        if not -2**63 <= seed < 2**64:
            raise ApiError(400, f"seed must be a 64-bit integer, got {seed}", param="seed", code="invalid_value")
        try:
            sampling = Sampling(temperature, _get(body, "top_k", int, d.top_k), seed,
                                _get(body, "top_p", float, d.top_p))
        except ElastiqError as err:
            raise ApiError(400, str(err), code="invalid_value") from None
        if temperature > 2:
            raise ApiError(400, f"temperature must be 0 to 2, got {temperature}", param="temperature",
                           code="invalid_value")
        return Job(ids, self._rate(body), max_tokens, sampling, stops)

    def _encode(self, render: Callable[[], list[int]], param: str) -> list[int]:
        with self.tokenizer_lock:
            try:
                ids = render()
            except Exception as err:  # a chat template's own raise (roles out of order ...) or a bad token id
                raise ApiError(400, f"cannot tokenize {param}: {err}", param=param, code="invalid_value") from None
        if not ids:
            raise ApiError(400, f"'{param}' has no tokens", param=param, code="invalid_value")
        return ids

    async def chat(self, request: Request):
        body = await self._body(request)
        messages = _get(body, "messages", list, required=True)
        plain = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: the text ones are kept
                content = "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"
                                  and isinstance(p.get("text"), str))
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and a string 'content'",
                               param=f"messages[{i}]", code="invalid_type")
            plain.append({"role": m["role"], "content": content})
        if not plain:
            raise ApiError(400, "'messages' is empty", param="messages", code="invalid_value")
        ids = self._encode(lambda: template_ids(self.engine.tokenizer, plain, add_generation_prompt=True), "messages")
        return await self._answer(request, body, ids, chat=True)

    async def completions(self, request: Request):
        body = await self._body(request)
        prompt = _get(body, "prompt", (str, list), required=True)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            ids = self._encode(lambda: tokenizer.encode(prompt), "prompt")
        elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer) for t in prompt):
            ids = self._encode(lambda: list(prompt), "prompt")
        else:
            raise ApiError(400, "'prompt' must be a string, one string in an array, or an array of token ids",
                           param="prompt", code="invalid_type")
        return await self._answer(request, body, ids, chat=False)

    async def _answer(self, request: Request, body: dict, ids: list[int], chat: bool):
        stream = _get(body, "stream", bool, False)
        usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
        job = self._job(body, ids)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": _get(body, "model", str, self.name)}
        if not stream:
            outcome = await self._wait(request, job, self._admit(job, lambda _: None))
            choice = ({"message": {"role": "assistant", "content": outcome.text}} if chat else
                      {"text": outcome.text, "logprobs": None})
            return JSONResponse({**head, "object": kind, "choices": [{"index": 0, **choice,
                                 "finish_reason": outcome.finish_reason}], "usage": _usage(outcome),
                                 "elastiq": {"rate": outcome.rate}})
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        done = self._admit(job, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        done.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))

        def chunk(text: str | None, end: Outcome | None = None, role: bool = False) -> dict:
            delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            choice = {"delta": delta} if chat else {"text": text or "", "logprobs": None}
            data = {**head, "object": kind + (".chunk" if chat else ""),
                    "choices": [{"index": 0, **choice, "finish_reason": end and end.finish_reason}]}
            return {"data": json.dumps(data | ({"elastiq": {"rate": end.rate}} if end else {}))}

        async def events():
            try:
                if chat:
                    yield chunk("", role=True)
                while (text := await pieces.get()) is not None:
                    yield chunk(text)
                try:
                    outcome = done.result()
                except Exception as err:  # the status line is sent: the error is the stream's last event
                    yield {"data": json.dumps((err if isinstance(err, ApiError) else _internal(err)).body())}
                    return
                yield chunk(None, outcome)
                if usage:
                    yield {"data": json.dumps({**head, "object": kind + (".chunk" if chat else ""), "choices": [],
                                               "usage": _usage(outcome)})}
                yield {"data": "[DONE]"}
            finally:
                job.cancel.set()  # the client went away (or all was sent): the worker stops at its next token

        return EventSourceResponse(events(), ping=15)

    def _admit(self, job: Job, emit: Callable[[str], None]) -> Future:
        """Queue ``job`` for the worker, or refuse it when the queue is full (503, Retry-After)."""
        if self.closing.is_set():
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.governor is not None and self.governor.starved:
            raise ApiError(503, f"not enough free memory for any rate: {self.governor.starved}; retry later",
                           "server_error", code="memory_pressure",
                           headers={"Retry-After": str(max(1, math.ceil(self.governor.hold_s)))})
        waiting = self.admitted - 1  # beside the one running
        if waiting >= self.limits.max_queue:
            per_request = self.busy_s / self.served if self.served else 1.0
            raise ApiError(503, f"{waiting} requests are waiting for the engine, the most this server queues "
                                "(elastiq serve --max-queue); retry later", "server_error", code="queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(per_request * waiting)))})
        self.admitted += 1
        future = self.worker.submit(self._run, job, emit)
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return future

    def _release(self) -> None:
        self.admitted -= 1

    async def _wait(self, request: Request, job: Job, done: Future) -> Outcome:
        """The outcome of a non-streamed ``job``; a client that disconnects meanwhile cancels it."""
        waiting = asyncio.wrap_future(done)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                job.cancel.set()
        return waiting.result()

    # --- the worker thread -----------------------------------------------------------------------

    def _run(self, job: Job, emit: Callable[[str], None]) -> Outcome:
        """Generate ``job`` on the engine (the worker thread only), passing new text to ``emit``."""
        engine, start = self.engine, time.perf_counter()
        tokens: list[int] = []
        shown, hit = 0, False

        def on_token(token: int) -> None:
            nonlocal shown, hit
            if job.cancel.is_set() or self.closing.is_set():
                raise _Abort
            if self._target(job) != engine.rate and engine.backend == "torch":  # an export's switch replaces
                self._switch(self._target(job), "the governor")  # its generator: it waits for the next request
                engine.generator.prefill(job.ids + tokens)  # the context so far, at the new widths
            tokens.append(token)
            with self.tokenizer_lock:
                text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
            end, hit = visible(text, job.stops)
            if end > shown and not text[:end].endswith("\ufffd"):
                emit(text[shown:end])
                shown = end
            if hit:
                raise _Abort

        if job.cancel.is_set() or self.closing.is_set():
            return Outcome("", "cancelled", len(job.ids), 0, engine.rate)
        try:
            if engine.rate != self._target(job):
                self._switch(self._target(job), "the governor" if job.pin is None else "a request pinned it")
            decode_start = time.perf_counter()
            try:
                engine.generator.generate(job.ids, job.max_tokens, job.sampling, self.stops, on_token)
            except _Abort:
                pass
            decode_s = time.perf_counter() - decode_start
        except ElastiqError as err:
            raise ApiError(400, str(err), code="invalid_value") from None
        with self.tokenizer_lock:
            text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        end, _ = visible(text, job.stops) if hit else (len(text), False)
        if end > shown:
            emit(text[shown:end])
        finish = ("stop" if hit or (tokens and tokens[-1] in self.stops) else
                  "cancelled" if job.cancel.is_set() or self.closing.is_set() else "length")
        self.served += 1
        self.tokens += len(tokens)
        self.decode_s += decode_s
        self.last_tok_s = len(tokens) / decode_s if decode_s else 0.0
        self.busy_s += time.perf_counter() - start
        return Outcome(text[:end], finish, len(job.ids), len(tokens), engine.rate)

    def _switch(self, rate: float, why: str) -> None:
        """Move the engine to ``rate`` (the worker thread only), logging the switch's cost."""
        done = self.engine.set_rate(rate)
        self.switches += 1
        print(f"elastiq: rate {done.old_rate} -> {done.new_rate} in {done.seconds:.2f} s, "
              f"{done.bytes_read / 1e6:.1f} MB read ({why})", file=sys.stderr)

    def _settle_soon(self) -> None:
        """Have the worker move an idle engine to the governor's target (a busy one moves at its next token)."""
        def settle():
            if self.engine.rate != self._serving() and not self.closing.is_set():
                self._switch(self._serving(), "the governor")

        with contextlib.suppress(RuntimeError):  # the worker is shut down
            self.worker.submit(settle)

    # --- what the server holds -------------------------------------------------------------------

    async def models(self, request: Request):
        self._authorize(request)
        ckpt = self.engine.ckpt
        names = [self.name] + [f"{self.name}@{r}" for r in ckpt.rates if r >= self._serving() and
                               within_floor(ckpt, r, self.max_kl)]
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                                         "owned_by": "elastiq"} for n in names]})

    async def status(self, request: Request):
        self._authorize(request)
        free = free_memory(self.engine.device)
        return JSONResponse({
            "model": self.name, "rate": self.engine.rate, "loaded_rate": self.home, "rates": self.engine.ckpt.rates,
            "backend": self.engine.backend, "ctx": self.engine.ctx,
            "free_memory_bytes": free.bytes, "free_memory_source": free.source,
            "requests_served": self.served, "requests_waiting": max(self.admitted - 1, 0), "switches": self.switches,
            "tokens_generated": self.tokens,
            "tokens_per_second": self.tokens / self.decode_s if self.decode_s else 0.0,
            "last_tokens_per_second": self.last_tok_s,
            "governor": None if self.governor is None else self.governor.status()})


def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, a wrong method) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code).response()


def _internal(err: Exception) -> ApiError:
    return ApiError(500, f"internal error: {type(err).__name__}: {err}", "server_error", code="internal_error")


def _internal_error(_request: Request, err: Exception) -> JSONResponse:
    return _internal(err).response()


def _usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def serve(server: Server, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run ``server`` with uvicorn until SIGINT or SIGTERM (uvicorn's handlers: connections still
    open get 5 s to finish, then the generation in flight stops at its next token)."""
    import uvicorn

    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
