"""The OpenAI-compatible HTTP server (FastAPI) over an `engine.Engine`.

  POST /v1/chat/completions  schema.parse_chat_request -> engine.submit -> the reply (its n
                             choices, each with its log-probs if asked), or with "stream": true
                             server-sent events in OpenAI's chunk format, then `data: [DONE]`
  GET  /v1/models            the one model this server runs
  GET  /health               {"status": "ok"}, or 503 {"status": "error", "reason"} once the
                             engine cannot serve; never behind the API key (load balancers)
  GET  /metrics              Prometheus text (metrics.py)
  GET  /                     page.html, a static page to try the model (it sends the key itself)

A refused request gets an OpenAI error body and touches nothing else: 400 bad request, 401
missing or wrong key, 404/405 no such endpoint or method, 413 body or image over a limit, 429
the engine's queue is full, 503 shutting down; an unexpected failure is a 500 with that body
too, its details in the log only. Each request's events come from a thread that blocks on its `Handle.events()` (so
the event loop never blocks); a client that goes away mid-answer cancels its request, which
frees its slot. The lifespan's end drains the engine, after uvicorn's graceful shutdown (SIGTERM)
has stopped accepting connections and let the running requests finish.
"""

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import importlib.resources
import json
import threading
import time
import uuid

import logging

import fastapi
from fastapi import responses
from starlette import exceptions as starlette_exceptions
from starlette.concurrency import run_in_threadpool

from paligemma_jax import errors
from paligemma_jax import tasks
from paligemma_jax.serving import engine as engine_lib
from paligemma_jax.serving import metrics as metrics_lib
from paligemma_jax.serving import schema

DISCONNECT_POLL_S = 0.5  # How often a non-streaming request checks that its client is still there.
INTERNAL = "The server failed while handling this request."  # A 500's message; details logged.
MIN_LOGPROB = -9999.0  # The least log-prob written: OpenAI's "very unlikely"; JSON has no -inf.


def _error(status: int, message: str, *, type: str = "invalid_request_error", code=None,
           param=None) -> responses.JSONResponse:
  body = schema.APIError(status, message, type=type, code=code, param=param).body()
  return responses.JSONResponse(body, status_code=status)


class _Events:
  """A handle's events on the event loop: a thread blocks on `handle.events()` and hands each
  one over; `get()` returns the next Event, or raises what the engine raised."""

  def __init__(self, handle):
    self.handle = handle
    self._loop = asyncio.get_running_loop()
    self._queue = asyncio.Queue()
    threading.Thread(target=self._pump, daemon=True, name="paligemma-events").start()

  def _put(self, item):
    try:
      self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
    except RuntimeError:  # The loop has closed: nobody is waiting any more.
      pass

  def _pump(self):
    try:
      for event in self.handle.events():
        self._put(event)
    except BaseException as e:  # noqa: BLE001  Delivered to the request, which answers 500.
      self._put(e)

  async def get(self, timeout: float | None = None):
    item = await asyncio.wait_for(self._queue.get(), timeout)
    if isinstance(item, BaseException):
      raise item
    return item


class _ClosingStream(responses.StreamingResponse):
  """Closes its generator however the response ends, so its `finally` (cancel) always runs."""

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      await self.body_iterator.aclose()


def _finish_reason(reason: str | None) -> str | None:
  """The engine's end reason (generate's words) in OpenAI's: <eos> and a stop string are "stop"."""
  return {"eos": "stop"}.get(reason, reason)


class _Logprobs:
  """OpenAI's `logprobs.content` entries of an event's tokens: {"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}, ...]}; a token's text and bytes are
  `Tokenizer.piece`'s (decoded alone; a byte-fallback piece's bytes are its raw byte)."""

  def __init__(self, engine):
    self._piece = functools.lru_cache(maxsize=1 << 16)(lambda i: engine.tokenizer.piece(i))

  def _entry(self, token_id: int, logprob: float) -> dict:
    text, raw = self._piece(token_id)
    if not logprob >= MIN_LOGPROB:  # Also NaN (never expected), which JSON lacks too.
      logprob = MIN_LOGPROB
    return {"token": text, "logprob": logprob, "bytes": list(raw)}

  def content(self, event, top_logprobs: int) -> list[dict]:
    alternatives = event.top_logprobs or [[]] * len(event.token_ids)
    return [{**self._entry(i, logprob), "top_logprobs": [
        self._entry(j, value) for j, value in top[:top_logprobs]]}
            for i, logprob, top in zip(event.token_ids, event.logprobs, alternatives)]


def _choice_logprobs(content: list | None) -> dict | None:
  """A choice's (or a chunk's) `logprobs` field: None unless asked."""
  return None if content is None else {"content": content, "refusal": None}


def create_app(engine, *, model_name: str, api_key: str | None = None,
               limits: schema.Limits = schema.Limits(), vae_params=None,
               default_max_tokens: int = 32, on_ready=None) -> fastapi.FastAPI:
  """The server app for a started `engine` (its lifespan's end calls engine.shutdown(drain=True)).

  api_key: every endpoint but /health and the static page needs `Authorization: Bearer KEY`.
  vae_params: the mask decoder (segmentation_format.load_vae_npz), for "task": "segment".
  on_ready: called once the app has started (the CLI prints the URL).
  """
  limits = dataclasses.replace(limits, segment=vae_params is not None,
                               max_top_k=engine.vocab_size,
                               max_n=min(limits.max_n, engine.num_rows),
                               max_images=engine.max_images)
  metrics = metrics_lib.Metrics(engine)
  logprobs = _Logprobs(engine)
  object_tasks = {name: tasks.get(name, vae_params) for name in tasks.OBJECT_TASKS}
  page = importlib.resources.files("paligemma_jax.serving").joinpath("page.html").read_text()
  created = int(time.time())
  key = api_key.encode() if api_key else None

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if on_ready is not None:
      on_ready()
    yield
    await run_in_threadpool(engine.shutdown, True)

  def authorize(request: fastapi.Request):
    if key is None:
      return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
      raise schema.APIError(401, "Missing or wrong API key: send the header 'Authorization: "
                            "Bearer KEY'.", code="invalid_api_key")

  app = fastapi.FastAPI(title="paligemma-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                        openapi_url=None)
  keyed = dict(dependencies=[fastapi.Depends(authorize)])

  @app.exception_handler(schema.APIError)
  async def refused(request, error: schema.APIError):
    if request.url.path == "/v1/chat/completions":
      metrics.requests.labels(str(error.status)).inc()
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return responses.JSONResponse(error.body(), status_code=error.status, headers=headers)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def not_routed(request, error: starlette_exceptions.HTTPException):
    """404 and 405 (no such endpoint or method) in OpenAI's body, as every other refusal."""
    return await refused(request, schema.APIError(error.status_code, str(error.detail),
                                                  code="not_found" if error.status_code == 404
                                                  else "invalid_request"))

  @app.exception_handler(Exception)
  async def failed(request, error: Exception):
    """A bug: 500 in OpenAI's body, with no internals (the traceback goes to the log)."""
    logging.getLogger(__name__).error("request failed", exc_info=error)
    return await refused(request, schema.APIError(500, INTERNAL, type="server_error"))

  @app.get("/health")
  async def health():
    reason = engine.health()
    if reason:
      return responses.JSONResponse({"status": "error", "reason": reason}, status_code=503)
    return {"status": "ok"}

  @app.get("/", response_class=responses.HTMLResponse)
  async def index():
    return page

  @app.get("/metrics", **keyed)
  async def get_metrics():
    body, content_type = metrics.render()
    return responses.Response(body, media_type=content_type)

  @app.get("/v1/models", **keyed)
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "paligemma-jax"}]}

  async def read_body(request: fastapi.Request) -> bytes:
    """The body, refused (413) as soon as it passes the limit, before it is all read."""
    limit = limits.max_body_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 18 or int(length) > limit):
      raise schema.APIError(413, f"The request body is over {limit} bytes.",
                            code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > limit:
        raise schema.APIError(413, f"The request body is over {limit} bytes.",
                              code="request_too_large")
      chunks.append(chunk)
    return b"".join(chunks)

  async def submit(chat: schema.ChatRequest):
    request = engine_lib.Request(prompt=chat.prompt, images=chat.images,
                                 max_tokens=chat.max_tokens, sampler=chat.sampler, seed=chat.seed,
                                 stop=chat.stop, n=chat.n,
                                 top_logprobs=chat.top_logprobs if chat.logprobs else 0)
    try:
      return await run_in_threadpool(engine.submit, request)  # Decodes the images: not here.
    except errors.InputError as e:
      raise schema.APIError(400, " ".join(str(e).split()), param="messages",
                            code="invalid_value") from None
    except engine_lib.QueueFull:
      raise schema.APIError(429, "The server is busy (its queue is full); retry shortly.",
                            type="rate_limit_error", code="queue_full") from None
    except engine_lib.Closed:
      raise schema.APIError(503, "The server is shutting down.", type="server_error",
                            code="shutting_down") from None

  async def task_fields(chat: schema.ChatRequest, text: str) -> dict:
    if chat.task is None:
      return {}
    return await run_in_threadpool(object_tasks[chat.task].answer_fields, text, *chat.image_size)

  @app.post("/v1/chat/completions", **keyed)
  async def chat_completions(request: fastapi.Request):
    arrival = time.monotonic()
    body = schema.parse_json(await read_body(request))
    chat = await run_in_threadpool(schema.parse_chat_request, body, limits, default_max_tokens)
    if chat.max_tokens > getattr(engine, "max_tokens_limit", chat.max_tokens):
      raise schema.APIError(400, f"max_tokens must be at most {engine.max_tokens_limit} on this "
                            f"server, got {chat.max_tokens}.", param="max_tokens",
                            code="invalid_value")
    handle = await submit(chat)
    reply = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name)
    timing = _Timing(metrics, arrival, chat.n)
    if chat.stream:
      metrics.requests.labels("200").inc()
      return _ClosingStream(_stream(chat, handle, reply, timing, task_fields, logprobs),
                            media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events, finals, failed = _Events(handle), {}, None
    texts, contents = collections.defaultdict(list), collections.defaultdict(list)
    checked = time.monotonic()
    try:
      while len(finals) < chat.n and failed is None:
        try:
          event = await events.get(DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
          event = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:  # Also while events keep coming.
          checked = time.monotonic()
          if await request.is_disconnected():
            metrics.requests.labels("499").inc()  # Client closed the request (nginx's code).
            return responses.Response(status_code=499)  # Nobody reads it; the rows are freed.
        if event is None:
          continue
        timing.event(event)
        texts[event.index].append(event.text)
        if chat.logprobs:
          contents[event.index] += logprobs.content(event, chat.top_logprobs)
        if event.finish_reason == "error":
          failed = event
        elif event.finish_reason is not None:
          finals[event.index] = event
    finally:
      if len(finals) < chat.n:  # Left early (a disconnect, an error): the other choices stop.
        handle.cancel()
    if failed is not None:
      metrics.requests.labels("500").inc()
      return _error(500, failed.error or "The request failed.", type="server_error")
    choices = []
    for i in range(chat.n):
      content = "".join(texts[i])
      message = {"role": "assistant", "content": content, **await task_fields(chat, content)}
      choices.append({"index": i, "message": message,
                      "logprobs": _choice_logprobs(contents[i] if chat.logprobs else None),
                      "finish_reason": _finish_reason(finals[i].finish_reason)})
    metrics.requests.labels("200").inc()
    return {**reply, "object": "chat.completion", "choices": choices,
            "usage": _usage(list(finals.values()))}

  return app


class _Timing:
  """One request's token times, reported to the metrics when its n choices have ended."""

  def __init__(self, metrics, arrival, n: int = 1):
    self.metrics, self.arrival, self.first, self.n = metrics, arrival, None, n
    self.finals = []

  def event(self, event):
    now = time.monotonic()
    if event.token_ids and self.first is None:
      self.first = now
    self.metrics.tokens(len(event.token_ids))
    if event.finish_reason is not None:
      self.finals.append(event)
      if len(self.finals) == self.n:  # Choices decode side by side: the longest one's pace.
        self.metrics.finished(self.arrival, self.first, now,
                              max(e.completion_tokens for e in self.finals), event.prompt_tokens)


def _usage(finals: list) -> dict:
  """OpenAI's usage of a request: its prompt once, the tokens of every choice."""
  prompt, completion = finals[0].prompt_tokens, sum(e.completion_tokens for e in finals)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def _sse(data) -> str:
  return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(chat, handle, reply, timing, task_fields, logprobs):
  """OpenAI's chunks: the role of each choice, then content deltas (with their tokens'
  log-probs if asked), each choice's finish_reason (with the task's fields) as it ends, then
  usage if asked, then [DONE]. Each chunk holds one choice, by its index. Cancels the request if
  the client leaves."""
  chunk = {**reply, "object": "chat.completion.chunk"}

  def choice(index, delta, finish_reason=None, content=None):
    return _sse({**chunk, "choices": [{"index": index, "delta": delta,
                                       "logprobs": _choice_logprobs(content),
                                       "finish_reason": finish_reason}]})

  finals = {}
  try:
    for i in range(chat.n):
      yield choice(i, {"role": "assistant", "content": ""})
    events, texts = _Events(handle), collections.defaultdict(list)
    while len(finals) < chat.n:
      event = await events.get()
      timing.event(event)
      content = logprobs.content(event, chat.top_logprobs) if chat.logprobs else None
      if event.text or content:  # Tokens whose text is held back still bring their log-probs.
        texts[event.index].append(event.text)
        yield choice(event.index, {"content": event.text}, content=content)
      if event.finish_reason == "error":
        yield _sse(schema.APIError(500, event.error or "The request failed.",
                                   type="server_error").body())
        break
      if event.finish_reason is not None:
        finals[event.index] = event
        yield choice(event.index, await task_fields(chat, "".join(texts[event.index])),
                     _finish_reason(event.finish_reason))
    else:
      if chat.include_usage:
        yield _sse({**chunk, "choices": [], "usage": _usage(list(finals.values()))})
    yield "data: [DONE]\n\n"
  finally:
    if len(finals) < chat.n:
      handle.cancel()
