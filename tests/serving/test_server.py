"""The HTTP server (paligemma_jax/serving/server.py) against a fake engine, then the real one.

The fake engine has the real one's interface (submit/Handle/Event/stats/shutdown) and answers
from a script, so each HTTP behaviour is checked alone and fast: the reply and chunk formats,
every bad-request class, the API key, a full queue, a client that leaves mid-stream, metrics
and shutdown. The last test serves the tiny converted checkpoint with the real engine through
`python -m paligemma_jax.serve`, checks its greedy answers equal `generate`'s and that SIGTERM
lets a running request finish.
"""

import asyncio
import base64
import collections
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import zlib

import fastapi.testclient
import numpy as np
from PIL import Image
import pytest

from paligemma_jax import errors
from paligemma_jax.decoding import sampling
from paligemma_jax.serving import engine as engine_lib
from paligemma_jax.serving import schema
from paligemma_jax.serving import server
from helpers import ROOT, assert_expected_failure



class FakeHandle:
  """Each of n choices sends the pieces in turn: piece k is token 100 + k with logprob
  -k - choice / 10, its top_logprobs that token then ids 200 + j with logprob -k - 1 - j."""

  def __init__(self, pieces, prompt_tokens, finish, hold, n=1, top_logprobs=0):
    self.pieces, self.prompt_tokens, self.finish, self.hold = pieces, prompt_tokens, finish, hold
    self.n, self.top_logprobs = n, top_logprobs
    self.cancelled = threading.Event()

  def events(self, timeout=None):
    count = 0
    for i, piece in enumerate(self.pieces):
      count += 1
      for index in range(self.n):
        logprob = -count - index / 10
        top = [[(100 + count, logprob)] + [(200 + j, -count - 1 - j) for j in range(
            self.top_logprobs - 1)]] if self.top_logprobs else []
        yield engine_lib.Event(piece, [100 + count], None, self.prompt_tokens, count,
                               logprobs=[logprob], index=index, top_logprobs=top)
      if self.hold and i == 0:  # Waits for the client to leave.
        self.cancelled.wait(10)
      if self.cancelled.is_set():
        for index in range(self.n):
          yield engine_lib.Event("", [], "cancelled", self.prompt_tokens, count, index=index)
        return
    for index in range(self.n):
      yield engine_lib.Event("", [], self.finish, self.prompt_tokens, count, index=index)

  def cancel(self):
    self.cancelled.set()


class FakeTokenizer:
  @staticmethod
  def piece(i):
    return f"<{i}>", f"<{i}>".encode() if i < 200 else bytes([i - 200 + 0xE0])


class FakeEngine:
  """Answers `script[prompt]` (a text split into pieces) or echoes the prompt."""

  def __init__(self, script=None, hold=False):
    self.script, self.hold = script or {}, hold
    self.requests, self.handles = [], []
    self.full = False
    self.shut_down = None
    self.max_tokens_limit = 100
    self.vocab_size = 1000
    self.num_rows = 8
    self.max_images = 4
    self.tokenizer = FakeTokenizer()
    self.failed = None  # What health() says.

  def submit(self, request):
    if self.shut_down is not None:
      raise engine_lib.Closed()
    if "tokens too long" in request.prompt:
      raise errors.InputError("prompt of 300 tokens exceeds max_prompt_tokens=256")
    if self.full:
      raise engine_lib.QueueFull()
    self.requests.append(request)
    text = self.script.get(request.prompt, f"echo {request.prompt}")
    pieces = text.split("|") if "|" in text else [w + " " for w in text.split()]
    pieces = pieces[:request.max_tokens]
    finish = "length" if len(pieces) == request.max_tokens else "stop"
    self.handles.append(FakeHandle(pieces, 260, finish, self.hold, request.n,
                                   request.top_logprobs))
    return self.handles[-1]

  def stats(self):
    return {"queue_depth": 3, "running_slots": 2, "slots": 8, "image_cache_hits": 5,
            "name": "not a number"}

  def shutdown(self, drain=True):
    self.shut_down = drain

  def health(self):
    return self.failed


def png(size=(20, 10), color=(0, 128, 255)) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size, color).save(out, format="PNG")
  return out.getvalue()


def data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def body(prompt="caption en", image=None, **fields):
  """A chat body: image parts (one image, or a list of them: bytes or URLs), then the prompt."""
  url = lambda image: image if isinstance(image, str) else data_url(image or png())
  parts = [{"type": "image_url", "image_url": {"url": url(i)}}
           for i in (image if isinstance(image, list) else [image])]
  return {"model": "anything", "messages": [{"role": "user", "content": [
      *parts, {"type": "text", "text": prompt}]}], **fields}


def client(engine, **kwargs):
  app = server.create_app(engine, model_name="tiny-pg", **kwargs)
  return fastapi.testclient.TestClient(app)


def sse_chunks(text: str) -> list:
  blocks = [b for b in text.split("\n\n") if b]
  assert all(b.startswith("data: ") for b in blocks), text
  assert blocks[-1] == "data: [DONE]"
  return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def test_reply_models_health_metrics_and_shutdown():
  engine = FakeEngine({"caption en": "a| blue| sky"})
  with client(engine) as c:
    r = c.post("/v1/chat/completions", json=body(max_tokens=7, seed=3, stop="\n"))
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-pg"
    assert reply["id"].startswith("chatcmpl-")
    assert reply["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "a blue sky"}}]
    assert reply["usage"] == {"prompt_tokens": 260, "completion_tokens": 3, "total_tokens": 263}
    request = engine.requests[0]
    assert (request.prompt, request.sources(), request.max_tokens, request.seed, request.stop) == (
        "caption en", [png()], 7, 3, ("\n",))
    assert request.sampler == sampling.Sampler()  # temperature defaults to 0: greedy.
    r = c.post("/v1/chat/completions", json=body("answer en why", max_tokens=2))
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "echo answer "

    models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-pg"] and models["object"] == "list"
    assert c.get("/health").json() == {"status": "ok"}
    page = c.get("/").text
    assert "<canvas" in page and '<input id="image" type="file" accept="image/*" multiple>' in page
    text = c.get("/metrics").text
    assert 'paligemma_requests_total{status="200"} 2.0' in text
    assert "paligemma_engine_queue_depth 3.0" in text and "paligemma_engine_running_slots 2.0" in text
    assert "paligemma_engine_image_cache_hits 5.0" in text and "engine_name" not in text
    assert "paligemma_time_to_first_token_seconds_count 2.0" in text
    assert "paligemma_completion_tokens_total 5.0" in text
    assert "paligemma_output_tokens_per_second 0.5" in text  # 5 tokens in the 10 s window.
    assert engine.shut_down is None
  assert engine.shut_down is True  # The lifespan's end drains the engine.


def test_sampler_fields_map_to_the_engine():
  engine = FakeEngine()
  with client(engine) as c:
    for fields, want in [({"temperature": 0, "top_k": 5}, sampling.Sampler()),
                         ({"temperature": 0.7}, sampling.Sampler("temperature", 0.7)),
                         ({"temperature": 1, "top_p": 1}, sampling.Sampler("temperature", 1.0)),
                         ({"temperature": 0.5, "top_k": 4}, sampling.Sampler("top_k", 0.5, top_k=4)),
                         ({"temperature": 1, "top_p": 0.9}, sampling.Sampler("top_p", 1.0, top_p=.9))]:
      assert c.post("/v1/chat/completions", json=body(**fields)).status_code == 200
      assert engine.requests[-1].sampler == want, fields


def error_of(response, status, code=None, param=None):
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["message"]
  assert code is None or error["code"] == code, error
  assert param is None or error["param"] == param, error
  return error


def post_chat(c, payload):
  """A chat request: a body to send as JSON, or raw bytes (malformed JSON) sent as they are."""
  if isinstance(payload, bytes):
    return c.post("/v1/chat/completions", content=payload,
                  headers={"Content-Type": "application/json"})
  return c.post("/v1/chat/completions", json=payload)


def test_every_bad_request_class_is_refused_alone(tmp_path):
  engine = FakeEngine()
  limits = schema.Limits(max_body_bytes=200_000, max_image_pixels=100_000, max_prompt_chars=50)
  good = body()
  text_only = {"messages": [{"role": "user", "content": "caption en"}]}
  five_images = body("caption en", [png()] * 5)  # The fake engine's max_images is 4.
  no_text = body("")
  system = {"messages": [{"role": "system", "content": "be nice"}, good["messages"][0]]}
  cases = [  # (json or raw bytes, status, code, param)
      (b"{not json", 400, "invalid_json", None),
      (b"[1, 2]", 400, "invalid_json", None),
      ({"model": "x"}, 400, "missing", "messages"),
      (system, 400, None, "messages"),
      (text_only, 400, "missing_image", "messages"),
      (body("caption en", "data:image/png;base64,"), 400, "invalid_image", "messages"),
      ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, 400,
       "missing_image", "messages"),
      (five_images, 400, "too_many_images", "messages"),
      (no_text, 400, "missing_prompt", "messages"),
      (body(image="data:text/plain;base64,aGk="), 400, "invalid_image", "messages"),
      (body(image="data:image/png;base64,@@@@"), 400, "invalid_image", "messages"),
      (body(image=data_url(b"not an image at all")), 400, "invalid_image", "messages"),
      (body(image="https://example.com/cat.png"), 400, "url_not_allowed", "messages"),
      (body(image=str(tmp_path / "cat.png")), 400, "url_not_allowed", "messages"),
      (body(max_tokens=0), 400, None, "max_tokens"),
      (body(max_tokens="3"), 400, None, "max_tokens"),
      (body(max_tokens=101), 400, None, "max_tokens"),  # Over the engine's max_tokens_limit.
      (body(temperature=-1), 400, None, "temperature"),
      (body(temperature="hot"), 400, None, "temperature"),
      (body(top_p=0), 400, None, "top_p"),
      (body(temperature=1, top_k=-1), 400, None, "top_k"),
      (body(temperature=1, top_k=3, top_p=0.5), 400, None, "top_k"),
      (body(stop=[""]), 400, None, "stop"),
      (body(stream="yes"), 400, None, "stream"),
      (body(task="ocr"), 400, None, "task"),
      (body(task="segment"), 400, "unsupported", "task"),  # No mask decoder given.
      (body(n=9), 400, None, "n"),  # Over Limits.max_n.
      (body("x" * 51), 400, "prompt_too_long", "messages"),
      (body("tokens too long"), 400, "invalid_value", "messages"),  # The engine's InputError.
      (body(image=png((400, 300))), 413, "request_too_large", "messages"),  # 120,000 pixels.
      (body(image=np.random.RandomState(0).bytes(210_000).hex()), 413, "request_too_large", None),
  ]
  with client(engine, limits=limits) as c:
    for payload, status, code, param in cases:
      r = post_chat(c, payload)
      error_of(r, status, code, param)
    assert engine.requests == []  # None reached the engine ...
    r = c.post("/v1/chat/completions", json=good)  # ... and the server still answers.
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo caption en "
    assert 'paligemma_requests_total{status="400"} 29.0' in c.get("/metrics").text


def png_header(width: int, height: int) -> bytes:
  """A PNG that declares width x height pixels (its header is all a size check reads)."""
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +
                              struct.pack(">I", zlib.crc32(kind + data)))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_hostile_values_are_400s_with_openai_bodies(tmp_path):
  """Each value the engine cannot hold, each malformed body, is refused before the engine."""
  engine = FakeEngine()
  deep = ("[" * 100_000 + "]" * 100_000).encode()
  huge_integer = b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}"
  os.mkfifo(tmp_path / "fifo")
  cases = [  # (json or raw bytes, status, code, param)
      (deep, 400, "invalid_json", None),
      (huge_integer, 400, "invalid_json", None),
      (body(temperature=1, top_k=2**31), 400, None, "top_k"),
      (body(temperature=1, top_k=1e20), 400, None, "top_k"),
      (body(temperature=1, top_k=1001), 400, None, "top_k"),  # Past the vocabulary.
      (body(temperature=10**400), 400, None, "temperature"),
      (body(seed=2**63), 400, None, "seed"),
      (body(seed=-2**63 - 1), 400, None, "seed"),
      (body(seed=1e20), 400, None, "seed"),
      (body(n=True), 400, None, "n"),
      (body(n=1.0), 400, None, "n"),
      (body(n=0), 400, None, "n"),
      (body(n=10**30), 400, None, "n"),
      (body(n="2"), 400, None, "n"),
      (body(logprobs="yes"), 400, None, "logprobs"),
      (body(logprobs=1), 400, None, "logprobs"),
      (body(logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
      (body(logprobs=True, top_logprobs=-1), 400, None, "top_logprobs"),
      (body(logprobs=True, top_logprobs=2.0), 400, None, "top_logprobs"),
      (body(logprobs=True, top_logprobs=True), 400, None, "top_logprobs"),
      (body(top_logprobs=2), 400, None, "top_logprobs"),  # Only with logprobs: true.
      (body(logprobs=False, top_logprobs=0), 400, None, "top_logprobs"),
      (body(max_tokens=5, max_completion_tokens=0), 400, None, "max_completion_tokens"),
      (body(max_tokens=5, max_completion_tokens="x"), 400, None, "max_completion_tokens"),
      (body(max_tokens=5, max_completion_tokens=6), 400, None, "max_completion_tokens"),
      (body(image="/dev/zero"), 400, "invalid_image", "messages"),  # Not a regular file.
      (body(image=str(tmp_path / "fifo")), 400, "invalid_image", "messages"),  # Never blocks.
      (body(image=str(tmp_path / "a\0b.png")), 400, "invalid_image", "messages"),
      (body(image=str(tmp_path)), 400, "invalid_image", "messages"),
      (body(image=data_url(png_header(50_000, 50_000))), 413, "request_too_large", "messages"),
      (body(image=data_url(png_header(10_000, 10_000))), 413, "request_too_large", "messages"),
  ]
  limits = schema.Limits(allow_local_images=True, max_image_bytes=1 << 20)
  with client(engine, limits=limits) as c:
    for payload, status, code, param in cases:
      r = post_chat(c, payload)
      error = error_of(r, status, code, param)
      assert " at 0x" not in error["message"] and len(error["message"]) < 300, error
    assert engine.requests == []
    (tmp_path / "big.png").write_bytes(png() + b"\0" * (2 << 20))
    error_of(c.post("/v1/chat/completions", json=body(image=str(tmp_path / "big.png"))), 413,
             "request_too_large")
    error = error_of(c.post("/v1/chat/completions", json=body(image=data_url(b"GIF89a nope"))),
                     400, "invalid_image")
    assert "BytesIO" not in error["message"]
    error_of(c.get("/v1/nothing"), 404)
    error_of(c.get("/v1/chat/completions"), 405)
    # What is accepted: the values' whole ranges, any case of a data URL's scheme and type.
    for fields in [dict(temperature=1, top_k=1000, seed=2**63 - 1), dict(seed=-2**63, n=1),
                   dict(temperature=1e-45), dict(temperature=1e308), dict(logprobs=False),
                   dict(n=8), dict(logprobs=True, top_logprobs=20),
                   dict(logprobs=True, top_logprobs=None),
                   dict(max_tokens=5, max_completion_tokens=5)]:
      assert c.post("/v1/chat/completions", json=body(**fields)).status_code == 200, fields
    upper = "DATA:IMAGE/PNG;BASE64," + data_url(png()).partition(",")[2]
    assert c.post("/v1/chat/completions", json=body(image=upper)).status_code == 200
    assert engine.requests[-1].sources() == [png()]
    assert engine.requests[0].sampler.top_k == 1000 and engine.requests[0].seed == 2**63 - 1


def test_an_unexpected_failure_is_a_500_body_and_a_failed_engine_fails_health():
  engine = FakeEngine()
  engine.submit = lambda request: (_ for _ in ()).throw(RuntimeError("<secret object at 0x7f>"))
  app = server.create_app(engine, model_name="tiny-pg")
  with fastapi.testclient.TestClient(app, raise_server_exceptions=False) as c:
    error = error_of(c.post("/v1/chat/completions", json=body()), 500)
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert 'paligemma_requests_total{status="500"} 1.0' in c.get("/metrics").text
    assert c.get("/health").json() == {"status": "ok"}
    engine.failed = "the engine failed: RuntimeError"
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "error"


def test_local_images_only_when_allowed_and_urls_only_to_public_hosts(tmp_path):
  (tmp_path / "cat.png").write_bytes(png((30, 40)))
  engine = FakeEngine({"detect cat": "<loc0000><loc0000><loc0512><loc1023> cat"})
  limits = schema.Limits(allow_local_images=True, allow_image_urls=True)
  with client(engine, limits=limits) as c:
    r = c.post("/v1/chat/completions", json=body("detect cat", str(tmp_path / "cat.png"),
                                                 task="detect"))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    # Boxes in pixels of the 30x40 image, as generate --task=detect reads them.
    assert message["boxes"] == [[0.0, 0.0, 30.0, 20.02]] and message["labels"] == ["cat"]
    assert engine.requests[0].sources() == [png((30, 40))]
    error_of(c.post("/v1/chat/completions", json=body(image=str(tmp_path / "none.png"))), 400,
             "invalid_image")
    error_of(c.post("/v1/chat/completions", json=body(image="http://127.0.0.1:9/x.png")), 400,
             "url_not_allowed")  # Never the server's own host or network.


def test_several_image_parts_reach_the_engine_in_order():
  """Image parts among text parts: the images in their order, the texts joined; boxes are in
  pixels of the first image. No image, more than max_images, a bad image among two (named by its
  position) and images over the request's total bytes or pixels are refused alone; it serves on
  after each."""
  engine = FakeEngine({"detect cat": "<loc0000><loc0000><loc0512><loc1023> cat"})
  first, second = png((30, 40)), png((100, 50), (9, 9, 9))
  assert len(second) > len(first)
  limits = schema.Limits(max_request_image_bytes=2 * len(first) + 2 * len(second))
  part = lambda image: {"type": "image_url", "image_url": {"url": data_url(image)}}
  with client(engine, limits=limits) as c:
    content = [{"type": "text", "text": "detect"}, part(first), {"type": "text", "text": "cat"},
               part(second)]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                             "task": "detect"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["boxes"] == [[0.0, 0.0, 30.0, 20.02]]  # 30 x 40.
    assert engine.requests[-1].prompt == "detect cat"
    assert engine.requests[-1].sources() == [first, second]
    assert c.post("/v1/chat/completions", json=body("ocr", [second, first, first, second])
                  ).status_code == 200
    assert engine.requests[-1].sources() == [second, first, first, second]
    cases = [  # (body, status, code, the message's start)
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "ocr"}]}]}, 400,
         "missing_image", "The message has no image"),
        (body("ocr", [first] * 5), 400, "too_many_images", "The message has 5 images; this "
         "server takes at most 4"),
        (body("ocr", [first, data_url(b"not an image")]), 400, "invalid_image", "Image 2 of 2: "),
        (body("ocr", [first, "data:image/png;base64,@@@@", second]), 400, "invalid_image",
         "Image 2 of 3: "),
        (body("ocr", [second] * 4), 413, "request_too_large", "The request's images are over"),
    ]
    for payload, status, code, start in cases:
      served = len(engine.requests)
      error = error_of(c.post("/v1/chat/completions", json=payload), status, code, "messages")
      assert error["message"].startswith(start), error
      assert len(engine.requests) == served  # Refused before the engine ...
      assert c.post("/v1/chat/completions", json=body()).status_code == 200  # ... which serves on.
  with client(FakeEngine(), limits=schema.Limits(max_request_image_pixels=6000)) as c:
    error = error_of(c.post("/v1/chat/completions", json=body("ocr", [first, second])), 413,
                     "request_too_large", "messages")  # 30 x 40 + 100 x 50 pixels.
    assert error["message"] == "The request's images are over 6000 pixels together.", error
    assert c.post("/v1/chat/completions", json=body("ocr", [first, first])).status_code == 200


def test_api_key():
  engine = FakeEngine()
  with client(engine, api_key="s3cret") as c:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
      error_of(c.post("/v1/chat/completions", json=body(), headers=headers), 401, "invalid_api_key")
      error_of(c.get("/v1/models", headers=headers), 401)
      error_of(c.get("/metrics", headers=headers), 401)
    assert engine.requests == []
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # Static page.
    ok = {"Authorization": "Bearer s3cret"}
    assert c.post("/v1/chat/completions", json=body(), headers=ok).status_code == 200
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert c.get("/metrics", headers=ok).status_code == 200


def test_full_queue_is_429_and_shutting_down_is_503():
  engine = FakeEngine()
  with client(engine) as c:
    engine.full = True
    error_of(c.post("/v1/chat/completions", json=body()), 429, "queue_full")
    engine.full = False
    assert c.post("/v1/chat/completions", json=body()).status_code == 200
    engine.shut_down = True
    error_of(c.post("/v1/chat/completions", json=body()), 503, "shutting_down")


def test_streaming_chunks():
  engine = FakeEngine({"caption en": "a| cat| on a mat", "detect cat": "<loc0000><loc0000>|"
                                                                      "<loc1023><loc1023> cat"})
  with client(engine) as c:
    r = c.post("/v1/chat/completions", json=body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(r.text)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny-pg" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert deltas == ["a", " cat", " on a mat"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3

    r = c.post("/v1/chat/completions", json=body("detect cat", png((100, 50)), stream=True,
                                                 task="detect"))
    chunks = sse_chunks(r.text)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and "usage" not in chunks[-1]
    assert last["delta"]["boxes"] == [[0.0, 0.0, 100.0, 50.0]] and last["delta"]["labels"] == ["cat"]


def entry(token_id, logprob):
  """One `logprobs.content` or `top_logprobs` entry as the fake's tokenizer writes it."""
  return {"token": f"<{token_id}>", "logprob": logprob,
          "bytes": list(FakeTokenizer.piece(token_id)[1])}


def test_logprobs_and_n_choices_in_openai_shape():
  """n choices by index, each with OpenAI's logprobs.content (and refusal null); usage counts the
  prompt once and every choice's tokens; without logprobs the field is null."""
  engine = FakeEngine({"caption en": "a| blue| sky"})
  with client(engine) as c:
    r = c.post("/v1/chat/completions", json=body(n=2, logprobs=True, top_logprobs=2, seed=4,
                                                 temperature=1))
    assert r.status_code == 200, r.text
    reply = r.json()
    request = engine.requests[-1]
    assert (request.n, request.top_logprobs, request.seed) == (2, 2, 4)
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for index, choice in enumerate(reply["choices"]):
      assert choice["message"] == {"role": "assistant", "content": "a blue sky"}
      assert choice["finish_reason"] == "stop"
      assert choice["logprobs"] == {"refusal": None, "content": [
          {**entry(100 + k, -k - index / 10),
           "top_logprobs": [entry(100 + k, -k - index / 10), entry(200, -k - 1)]}
          for k in (1, 2, 3)]}
    assert reply["usage"] == {"prompt_tokens": 260, "completion_tokens": 6, "total_tokens": 266}
    assert entry(200, -2)["bytes"] == [0xE0]  # A byte-fallback piece: its raw byte.

    r = c.post("/v1/chat/completions", json=body(logprobs=True))  # No alternatives asked.
    assert engine.requests[-1].top_logprobs == 0
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in content] == [[]] * 3 and content[0]["logprob"] == -1
    r = c.post("/v1/chat/completions", json=body(n=3))
    assert [c["logprobs"] for c in r.json()["choices"]] == [None] * 3
    assert r.json()["usage"]["completion_tokens"] == 9


def test_streamed_choices_and_logprobs_add_up_to_the_reply():
  """Also the log-probs of a token whose text is held back (the empty piece): a chunk with empty
  content carries them."""
  engine = FakeEngine({"caption en": "a| blue|| sky"})
  fields = dict(n=2, logprobs=True, top_logprobs=1, stream_options={"include_usage": True})
  with client(engine) as c:
    reply = c.post("/v1/chat/completions", json=body(**fields)).json()
    chunks = sse_chunks(c.post("/v1/chat/completions", json=body(stream=True, **fields)).text)
  assert all(len(chunk["choices"]) == 1 for chunk in chunks[:-1])
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == reply["usage"]
  for index, want in enumerate(reply["choices"]):
    mine = [chunk["choices"][0] for chunk in chunks[:-1] if chunk["choices"][0]["index"] == index]
    assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[0]["logprobs"] is None
    assert "".join(m["delta"].get("content") or "" for m in mine) == want["message"]["content"]
    assert sum((m["logprobs"]["content"] for m in mine if m["logprobs"]), []) == \
        want["logprobs"]["content"]
    assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + ["stop"]
    assert len(want["logprobs"]["content"]) == 4
    assert {"content": ""} in [m["delta"] for m in mine[1:]]  # The held-back token's chunk.


def test_the_openai_client_reads_logprobs_and_choices():
  """The `openai` package parses the reply and the stream of a request with n and logprobs."""
  openai = pytest.importorskip("openai")
  engine = FakeEngine({"caption en": "a| blue| sky"})
  with serving(server.create_app(engine, model_name="tiny-pg")) as url:
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    messages = body()["messages"]
    reply = api.chat.completions.create(model="tiny-pg", messages=messages, logprobs=True,
                                        top_logprobs=2, n=2, max_tokens=5, temperature=1)
    assert [c.index for c in reply.choices] == [0, 1]
    first = reply.choices[1].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("<101>", -1.1, list(b"<101>"))
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("<101>", -1.1), ("<200>", -2)]
    assert reply.usage.completion_tokens == 6 and reply.choices[0].message.content == "a blue sky"
    stream = api.chat.completions.create(model="tiny-pg", messages=messages, logprobs=True,
                                         top_logprobs=2, n=2, max_tokens=5, stream=True)
    tokens = collections.defaultdict(list)
    for chunk in stream:
      for choice in chunk.choices:
        tokens[choice.index] += [t.token for t in (choice.logprobs.content if choice.logprobs
                                                   else [])]
    assert tokens == {0: ["<101>", "<102>", "<103>"], 1: ["<101>", "<102>", "<103>"]}
    with pytest.raises(openai.BadRequestError) as refused:
      api.chat.completions.create(model="tiny-pg", messages=messages, top_logprobs=2)
    assert refused.value.body["param"] == "top_logprobs"


def asgi_call(app, payload: dict, leave_after_chunks: int):
  """Drives the ASGI app as uvicorn would; the client disconnects after some body chunks."""
  sent, chunk_seen = [], asyncio.Event()
  raw = json.dumps(payload).encode()

  async def receive():
    if not sent:
      sent.append(None)
      return {"type": "http.request", "body": raw, "more_body": False}
    if leave_after_chunks:
      await chunk_seen.wait()
    return {"type": "http.disconnect"}

  messages = []

  async def send(message):
    messages.append(message)
    if sum(m["type"] == "http.response.body" for m in messages) >= leave_after_chunks:
      chunk_seen.set()

  scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
           "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
           "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("t", 80),
           "headers": [(b"content-type", b"application/json"),
                       (b"content-length", str(len(raw)).encode())]}

  async def main():
    await asyncio.wait_for(app(scope, receive, send), 10)
  asyncio.run(main())
  return messages


@pytest.mark.parametrize("stream,n", [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_a_client_that_leaves_cancels_its_request(stream, n, monkeypatch):
  monkeypatch.setattr(server, "DISCONNECT_POLL_S", 0.05)
  engine = FakeEngine({"caption en": "a|b|c|d"}, hold=True)
  app = server.create_app(engine, model_name="tiny-pg")
  start = time.monotonic()
  messages = asgi_call(app, body(stream=stream, n=n), leave_after_chunks=n + 1 if stream else 0)
  assert time.monotonic() - start < 5  # Not the fake's 10 s wait: cancel() released it.
  assert engine.handles[0].cancelled.is_set()
  bodies = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
  assert b"[DONE]" not in bodies


def test_a_client_that_leaves_while_tokens_flow_is_noticed(monkeypatch):
  """Not only when the engine is silent: a long answer streaming into a non-streaming request
  whose client left is cancelled within about DISCONNECT_POLL_S."""
  monkeypatch.setattr(server, "DISCONNECT_POLL_S", 0.1)

  class Flowing(FakeHandle):
    def events(self, timeout=None):
      for i in range(300):  # 3 s of tokens, one every 10 ms.
        if self.cancelled.is_set():
          yield engine_lib.Event("", [], "cancelled", 260, i)
          return
        time.sleep(0.01)
        yield engine_lib.Event("x", [100], None, 260, i + 1)
      yield engine_lib.Event("", [], "length", 260, 300)

  engine = FakeEngine()
  engine.submit = lambda request: engine.handles.append(Flowing([], 260, "length", False)) or \
      engine.handles[-1]
  start = time.monotonic()
  asgi_call(server.create_app(engine, model_name="tiny-pg"), body(), leave_after_chunks=0)
  assert time.monotonic() - start < 1.5 and engine.handles[0].cancelled.is_set()


def test_serve_flags_are_checked_before_loading(tmp_path):
  from paligemma_jax import serve
  flags = types.SimpleNamespace(slots=3, default_max_tokens=8, max_tokens_limit=16, vae_npz=None,
                                checkpoint=str(tmp_path))
  with pytest.raises(errors.InputError, match="--slots=3"):
    serve.validate_flags(flags)
  flags.slots, flags.default_max_tokens = 4, 32
  with pytest.raises(errors.InputError, match="--default_max_tokens=32"):
    serve.validate_flags(flags)
  flags.default_max_tokens, flags.vae_npz = 8, str(tmp_path / "missing.npz")
  with pytest.raises(errors.InputError, match="vae_npz"):
    serve.validate_flags(flags)
  flags.vae_npz = None
  with pytest.raises(errors.InputError, match="neither a converted checkpoint"):
    serve.validate_flags(flags)
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with pytest.raises(errors.InputError, match="cannot listen"):
      serve.listen("127.0.0.1", taken.getsockname()[1])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
  """`app` on a loopback port in a thread, as the CLI serves it (uvicorn); yields its URL."""
  import uvicorn
  port = free_port()
  uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 20
  while not uv.started:
    assert time.monotonic() < deadline and thread.is_alive()
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    uv.should_exit = True
    thread.join(10)


def test_loadgen_measures_a_streaming_server():
  from paligemma_jax.serving import loadgen
  engine = FakeEngine()
  requests = loadgen.request_set(6, 50.0, 2, 5, seed=0)
  images = loadgen.make_images(2, 32, seed=0)
  assert len(set(images)) == 2
  with serving(server.create_app(engine, model_name="tiny-pg")) as url:
    result = asyncio.run(loadgen.run_phase(url, requests, images, lambda i: i % 2, 30, None))
  assert result["completed"] == 6 and result["refused"] == 0 and result["unfinished"] == 0
  sent = sorted((r.max_tokens, *r.sources(), r.prompt) for r in engine.requests)  # Any order.
  assert sent == sorted((int(m), images[i % 2], p) for i, (m, p) in enumerate(
      zip(requests["max_tokens"], requests["prompt"])))
  want = sum(min(len(p.split()) + 1, m) for p, m in zip(requests["prompt"], requests["max_tokens"]))
  assert result["output_tokens"] == want  # Counted from the streamed usage.
  assert result["ttft_s"]["p50"] > 0 and result["output_tokens_per_s"] > 0
  assert 0 < result["client_cpu_s"] < 60  # The client's own CPU time, not the clock's.
  assert result["image_cache_hits"] == 0  # The fake's stats do not change.
  with pytest.raises(errors.InputError, match="only targets this machine"):
    loadgen._check_loopback("http://10.0.0.1:8000")
  loadgen._check_loopback("http://localhost:8000")


def test_loadgen_refuses_out_of_range_flags_on_one_line():
  """A negative --seed ended in numpy's ValueError (default_rng takes no negative seed)."""
  proc = subprocess.run([sys.executable, "-m", "paligemma_jax.serving.loadgen",
                         "--checkpoint=/nonexistent", "--seed=-1"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert assert_expected_failure(proc) == [
      "loadgen.py: error: flag --seed=-1: -1 is not a non-negative integer"], proc.stderr


def test_soak_mixed_good_and_hostile_clients(converted_checkpoint):
  """4 clients send 240 requests, good and bad mixed, at a real engine behind uvicorn: every
  good one is answered as generate answers it, every bad one gets its 4xx (a top_k past int32,
  which once ended the engine, among them), nothing hangs, and the counters add up."""
  import httpx
  from paligemma_jax.decoding import inference
  from paligemma_jax.checkpoints import loading
  model = loading.load_model(converted_checkpoint(1)[0])
  images = [png((40, 30), (200, 30, 30)), png((17, 50), (10, 200, 90)), png((64, 64), (9, 9, 9))]
  prompts = ["caption en", "answer en what is this?"]
  pairs = [(i, p) for i in range(len(images)) for p in prompts]
  predictor = inference.Predictor(*model, batch_size=8)
  want = [r["text"] for r in predictor.predict(
      [inference.Example(images[i], p) for i, p in pairs], max_new_tokens=6)]
  engine = engine_lib.Engine(model, rows=4, max_queue=64, steps_per_call=2, max_prompt_tokens=16,
                             max_tokens_limit=8)
  engine.start()
  limits = schema.Limits(max_body_bytes=256 << 10)
  vocab = model.tokenizer.vocab_size
  hostile = [{"temperature": 1, "top_k": 2**31}, {"temperature": 1, "top_k": vocab + 1},
             {"seed": 2**64}, {"temperature": "x"}, {"n": 5}, {"max_tokens": 9}]  # 4 rows.
  counts = collections.Counter()

  async def one(c, k):
    pair = k % len(pairs)
    good = body(pairs[pair][1], images[pairs[pair][0]], max_tokens=6)
    kind = k % 8
    if kind in (0, 1, 2):
      r = await c.post("/v1/chat/completions", json=good)
      assert r.status_code == 200, r.text
      assert r.json()["choices"][0]["message"]["content"] == want[pair]
    elif kind in (3, 7):
      async with c.stream("POST", "/v1/chat/completions", json={**good, "stream": True}) as r:
        assert r.status_code == 200
        text = []
        async for line in r.aiter_lines():
          if kind == 7:
            break  # Leaves mid-stream: its request is cancelled.
          if line.startswith("data: {"):
            text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        if kind == 3:
          assert "".join(text) == want[pair]
    elif kind == 4:
      r = await c.post("/v1/chat/completions", content=b'{"messages": [',
                       headers={"Content-Type": "application/json"})
      error_of(r, 400, "invalid_json")
    elif kind == 5:
      error_of(await c.post("/v1/chat/completions", json={**good, **hostile[k % len(hostile)]}),
               400)
    else:
      error_of(await c.post("/v1/chat/completions", json=body(image=png() + b"\0" * (300 << 10))),
               413)
    counts[{4: 400, 5: 400, 6: 413}.get(kind, 200)] += 1

  async def client_loop(url, first):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
      for k in range(first, 240, 4):
        await one(c, k)

  with serving(server.create_app(engine, model_name="tiny-pg", limits=limits)) as url:
    async def main():
      await asyncio.wait_for(asyncio.gather(*(client_loop(url, i) for i in range(4))), 300)
    asyncio.run(main())
    stats = engine.stats()
    with httpx.Client(base_url=url) as c:
      text = c.get("/metrics").text
      assert c.get("/health").json() == {"status": "ok"}
  assert sum(counts.values()) == 240 and counts == {200: 150, 400: 60, 413: 30}
  for status, count in counts.items():
    assert f'paligemma_requests_total{{status="{status}"}} {count}.0' in text, text
  assert stats["requests_total"] == 150 and not stats["error"]  # Only good ones reached it.
  stats = engine.stats()  # The engine has drained (the app's end): every request finished.
  assert stats["requests_finished"] == 150 and stats["running_slots"] == 0
  assert stats["queue_depth"] == 0 and stats["finish_cancelled"] <= 30


def test_served_logprobs_and_choices_equal_generate(converted_checkpoint):
  """Through HTTP with the real engine: greedy log-probs are generate's and the greedy token
  heads its top_logprobs; the stream's log-probs add up to the reply's; n=2 sampled choices are
  generate's two examples with the seed; hostile n and top_logprobs are 400s, then it serves."""
  import httpx
  from paligemma_jax.decoding import inference
  from paligemma_jax.checkpoints import loading
  model = loading.load_model(converted_checkpoint(1)[0])
  image, prompt = png((40, 30), (200, 30, 30)), "caption en"
  predictor = inference.Predictor(*model, batch_size=2)
  example = inference.Example(image, prompt)
  [greedy] = predictor.predict([example], max_new_tokens=6)
  hot = sampling.Sampler("temperature", temperature=3.0)
  sampled = list(predictor.predict([example] * 2, max_new_tokens=6, sampler=hot, seed=11))
  engine = engine_lib.Engine(model, rows=2, max_queue=4, steps_per_call=2, max_prompt_tokens=16,
                             max_tokens_limit=8)
  engine.start()
  with serving(server.create_app(engine, model_name="tiny-pg")) as url, \
      httpx.Client(base_url=url, timeout=60) as c:
    fields = dict(max_tokens=6, logprobs=True, top_logprobs=3)
    reply = c.post("/v1/chat/completions", json=body(prompt, image, **fields)).json()
    [choice] = reply["choices"]
    content = choice["logprobs"]["content"]
    assert choice["message"]["content"] == greedy["text"] and len(content) == 6
    np.testing.assert_allclose([e["logprob"] for e in content], greedy["logprobs"], rtol=1e-5,
                               atol=1e-5)
    for e, token in zip(content, greedy["tokens"]):
      text, raw = model.tokenizer.piece(token)
      assert (e["token"], e["bytes"]) == (text, list(raw)) and len(e["top_logprobs"]) == 3
      assert e["top_logprobs"][0] == {k: e[k] for k in ("token", "logprob", "bytes")}
      values = [t["logprob"] for t in e["top_logprobs"]]
      assert values == sorted(values, reverse=True)
    chunks = sse_chunks(c.post("/v1/chat/completions",
                               json=body(prompt, image, stream=True, **fields)).text)
    assert sum((ch["choices"][0]["logprobs"]["content"] for ch in chunks
                if ch["choices"][0]["logprobs"]), []) == content

    before = engine.stats()["prefilled_prompts"]
    reply = c.post("/v1/chat/completions", json=body(prompt, image, n=2, temperature=3.0,
                                                     seed=11, **fields)).json()
    assert engine.stats()["prefilled_prompts"] == before + 1
    for choice, want in zip(reply["choices"], sampled):
      assert choice["message"]["content"] == want["text"]
      np.testing.assert_allclose([e["logprob"] for e in choice["logprobs"]["content"]],
                                 want["logprobs"], rtol=1e-5, atol=1e-5)
    assert reply["usage"]["completion_tokens"] == sum(len(w["tokens"]) for w in sampled)
    assert [ch["index"] for ch in reply["choices"]] == [0, 1]

    for hostile in [dict(n=0), dict(n=10**30), dict(n="2"), dict(n=3),  # 3: over the 2 rows.
                    dict(logprobs=True, top_logprobs=21), dict(top_logprobs=2)]:
      error_of(c.post("/v1/chat/completions", json=body(prompt, image, **hostile)), 400, None,
               next(k for k in ("n", "top_logprobs") if k in hostile))
    reply = c.post("/v1/chat/completions", json=body(prompt, image, max_tokens=6)).json()
    assert reply["choices"][0]["message"]["content"] == greedy["text"]
  assert engine.stats()["requests_finished"] == engine.stats()["requests_total"] == 4


def jpeg(size, seed: int) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size[::-1], 3), np.uint8)).save(
      out, format="JPEG")
  return out.getvalue()


def test_served_several_images_equal_generate_and_bad_image_lists_are_400s(converted_checkpoint):
  """2 image_url parts through HTTP and the real engine: generate's answer to those images in that
  order (greedy, with log-probs; sampled n=2 choices too). No image, 5 images (max_images 4), and
  an image among two that the header check passes but the engine cannot decode (named) are
  400s; the server serves on after each."""
  import httpx
  from paligemma_jax.decoding import inference
  from paligemma_jax.checkpoints import loading
  from test_engine import louder  # Answers that vary with the images.
  model = louder(loading.load_model(converted_checkpoint(1)[0]))
  images, prompt = [png((40, 30), (200, 30, 30)), png((17, 50), (10, 200, 90))], "caption en"
  predictor = inference.Predictor(*model, batch_size=2)
  examples = [inference.Example(images=images, prompt=prompt),
              inference.Example(images=images[::-1], prompt=prompt)]
  want = list(predictor.predict(examples, max_new_tokens=6))
  hot = sampling.Sampler("temperature", temperature=3.0)
  sampled = list(predictor.predict(examples[:1] * 2, max_new_tokens=6, sampler=hot, seed=11))
  engine = engine_lib.Engine(model, rows=2, max_queue=4, steps_per_call=2, max_prompt_tokens=16,
                             max_tokens_limit=8, max_images=4)
  engine.start()
  truncated = jpeg((40, 30), 0)[:-200]  # Its header reads; its pixels do not decode.
  with serving(server.create_app(engine, model_name="tiny-pg")) as url, \
      httpx.Client(base_url=url, timeout=60) as c:
    post = lambda payload: c.post("/v1/chat/completions", json=payload)

    def assert_serves():
      reply = post(body(prompt, images, max_tokens=6, logprobs=True)).json()
      [choice] = reply["choices"]
      assert choice["message"]["content"] == want[0]["text"]
      np.testing.assert_allclose([e["logprob"] for e in choice["logprobs"]["content"]],
                                 want[0]["logprobs"], rtol=1e-5, atol=1e-4)
      assert reply["usage"]["prompt_tokens"] == len(predictor.prompt_tokens(prompt, 2)[0])

    assert_serves()
    reply = post(body(prompt, images[::-1], max_tokens=6)).json()
    assert reply["choices"][0]["message"]["content"] == want[1]["text"] != want[0]["text"]
    reply = post(body(prompt, images, max_tokens=6, n=2, temperature=3.0, seed=11)).json()
    assert [ch["message"]["content"] for ch in reply["choices"]] == [w["text"] for w in sampled]
    assert engine.stats()["image_cache_misses"] == 2  # Each image once, whatever its order.
    for payload, code, start in [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]},
         "missing_image", "The message has no image"),
        (body(prompt, images * 2 + images[:1], max_tokens=6), "too_many_images",
         "The message has 5 images"),
        (body(prompt, [images[0], truncated], max_tokens=6), "invalid_value",
         "image 2 of 2: Cannot decode"),
    ]:
      error = error_of(post(payload), 400, code, "messages")
      assert error["message"].startswith(start), error
      assert_serves()
  stats = engine.stats()
  assert stats["requests_finished"] == stats["requests_total"] == 6 and not stats["error"]


def test_served_answers_equal_generate_and_sigterm_finishes_running_requests(converted_checkpoint,
                                                                             tmp_path):
  import httpx
  from paligemma_jax.decoding import inference
  from paligemma_jax.checkpoints import loading
  directory, _ = converted_checkpoint(1)
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "paligemma_jax.serve", f"--checkpoint={directory}", f"--port={port}",
       "--slots=2", "--max_tokens_limit=16", "--default_max_tokens=8", "--max_prompt_tokens=32",
       "--max_images=2", "--nowarmup"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    images = [png((40, 30), (200, 30, 30)), png((17, 50), (10, 200, 90))]
    for image, path in zip(images, ("a.png", "b.png")):
      (tmp_path / path).write_bytes(image)
    params, config, tokenizer = loading.load_model(directory)
    predictor = inference.Predictor(params, config, tokenizer, batch_size=2)
    prompts = ["caption en", "answer en what is this?"]
    want = list(predictor.predict([inference.Example(str(tmp_path / p), q) for p, q in
                                   zip(("a.png", "b.png"), prompts)] + [inference.Example(
                                       images=[str(tmp_path / "b.png"), str(tmp_path / "a.png")],
                                       prompt=prompts[1])], max_new_tokens=6))
    deadline = time.monotonic() + 120
    url = f"http://127.0.0.1:{port}"
    output = [proc.stdout.readline()]
    while "http://" not in output[-1]:  # The CLI prints the URL once it serves.
      assert output[-1] and time.monotonic() < deadline, "".join(output)
      output.append(proc.stdout.readline())
    line = output[-1]
    assert url in line
    with httpx.Client(base_url=url, timeout=60) as c:
      got = c.post("/v1/chat/completions", json=body(prompts[0], images[0], max_tokens=6)).json()
      assert got["choices"][0]["message"]["content"] == want[0]["text"]
      assert got["usage"]["completion_tokens"] == len(want[0]["tokens"])
      got = c.post("/v1/chat/completions", json=body(prompts[1], images[::-1], max_tokens=6)).json()
      assert got["choices"][0]["message"]["content"] == want[2]["text"]
      error_of(c.post("/v1/chat/completions", json=body(prompts[1], images * 2, max_tokens=6)),
               400, "too_many_images", "messages")  # --max_images=2.
      with c.stream("POST", "/v1/chat/completions",
                    json=body(prompts[1], images[1], max_tokens=6, stream=True)) as r:
        lines = r.iter_lines()
        first = next(lines)
        proc.send_signal(signal.SIGTERM)  # While this request runs: it still completes.
        text = "\n\n".join(line for line in [first, *lines] if line)
    chunks = sse_chunks(text)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == want[1]["text"]
    assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done.
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
