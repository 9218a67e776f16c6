"""OpenAI chat-completions requests -> what the engine runs, with every check a client can fail.

  body (bytes, at most Limits.max_body_bytes) -> JSON -> one user message: text parts (the
  PaliGemma prompt) + one image part (data: URL; http(s) or a local path only where allowed)
  -> image bytes, header-checked (format, pixel count, upright size) -> ChatRequest

Every failure is an `APIError` carrying the HTTP status (400, or 413 for a body or image over a
limit) and OpenAI's error body {"error": {"message", "type", "param", "code"}}, so a bad request
is answered alone and never reaches the engine. Sampling follows OpenAI's fields: temperature 0
(the default here, PaliGemma's own decoding) is greedy; otherwise top_k (an extension) or top_p
below 1 truncates, else plain temperature sampling.
"""

import base64
import binascii
import dataclasses
import io
import ipaddress
import json
import math
import os
import socket
import urllib.parse
import urllib.request

from PIL import ExifTags, Image

from paligemma_jax import sampling
from paligemma_jax import tasks

_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image.


class APIError(Exception):
  """A request the server refuses: the HTTP status and OpenAI's error fields."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold, and where its image may come from."""
  max_body_bytes: int = 32 << 20  # A data: URL is base64, 4/3 of the image file.
  max_image_bytes: int = 20 << 20  # An image file, inline or fetched.
  max_image_pixels: int = 50_000_000  # Decoded width * height (a 7000 x 7000 photo).
  max_prompt_chars: int = 4000  # The engine bounds the prompt's tokens too.
  allow_image_urls: bool = False  # Fetch http(s) URLs: lets clients make the server reach hosts.
  allow_local_images: bool = False  # Read paths on the server's disk.
  url_timeout_s: float = 10.0
  segment: bool = False  # The server has the mask decoder (--vae_npz), so task "segment" runs.


@dataclasses.dataclass
class ChatRequest:
  """One validated request."""
  prompt: str
  image: bytes
  image_size: tuple[int, int]  # Upright (width, height), to read boxes into pixels.
  max_tokens: int
  sampler: sampling.Sampler
  seed: int
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool  # stream_options.include_usage: a last chunk with the usage.
  task: str | None  # "detect" | "segment": add boxes, labels (and masks) to the reply.
  model: str | None


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
  return APIError(400, message, param=param, code=code)


def parse_json(body: bytes) -> dict:
  try:
    value = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"The request body is not valid JSON: {e}", code="invalid_json") from None
  if not isinstance(value, dict):
    raise bad("The request body must be a JSON object.", code="invalid_json")
  return value


def parse_chat_request(body: dict, limits: Limits, default_max_tokens: int = 32) -> ChatRequest:
  """Validates a chat-completions body (already JSON) and loads its image; raises APIError."""
  prompt, image_url = _message(body.get("messages"))
  if len(prompt) > limits.max_prompt_chars:
    raise bad(f"The prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} are "
              "accepted.", "messages", "prompt_too_long")
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  max_tokens = default_max_tokens if max_tokens is None else _integer(body, "max_tokens", 1)
  if body.get("n", 1) != 1:
    raise bad("Only n=1 is supported.", "n")
  task = body.get("task")
  if task is not None and task not in tasks.OBJECT_TASKS:
    raise bad(f"task must be one of {', '.join(tasks.OBJECT_TASKS)}, got {task!r}.", "task")
  if task == "segment" and not limits.segment:
    raise bad("task 'segment' needs the mask decoder: start the server with --vae_npz.", "task",
              "unsupported")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise bad("stream must be true or false.", "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise bad("stream_options must be an object.", "stream_options")
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise bad("model must be a string.", "model")
  image, size = load_image(image_url, limits)
  return ChatRequest(prompt=prompt, image=image, image_size=size, max_tokens=max_tokens,
                     sampler=_sampler(body), seed=_integer(body, "seed", None, default=0),
                     stop=_stop(body.get("stop")), stream=stream,
                     include_usage=bool(options.get("include_usage")), task=task, model=model)


def _message(messages) -> tuple[str, str]:
  """(prompt, image URL) of the one user message."""
  if not isinstance(messages, list) or not messages:
    raise bad("messages must be a non-empty list.", "messages", "missing" if messages is None
              else "invalid_value")
  if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
    raise bad("messages must hold exactly one user message (PaliGemma answers one prompt about "
              "one image; it has no system prompt or chat history).", "messages")
  content = messages[0].get("content")
  if isinstance(content, str):
    raise bad("The message has no image: give content as a list of parts, one "
              '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.',
              "messages", "missing_image")
  if not isinstance(content, list):
    raise bad("content must be a list of parts.", "messages")
  texts, images = [], []
  for part in content:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      texts.append(part["text"].strip())
    elif kind == "image_url":
      url = part.get("image_url")
      url = url.get("url") if isinstance(url, dict) else url
      if not isinstance(url, str):
        raise bad("image_url must be {\"url\": \"data:image/...;base64,...\"}.", "messages")
      images.append(url)
    else:
      raise bad('Each content part must be {"type": "text", "text": ...} or {"type": '
                '"image_url", "image_url": {"url": ...}}.', "messages")
  if not images:
    raise bad("The message has no image part.", "messages", "missing_image")
  if len(images) > 1:
    raise bad(f"The message has {len(images)} images; PaliGemma takes one.", "messages")
  prompt = " ".join(t for t in texts if t)
  if not prompt:
    raise bad('The message has no text: give a prompt such as "caption en" or "detect cat".',
              "messages", "missing_prompt")
  return prompt, images[0]


def _number(body: dict, name: str, default: float) -> float:
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise bad(f"{name} must be a number, got {value!r}.", name)
  return float(value)


def _integer(body: dict, name: str, minimum: int | None, default: int | None = None) -> int:
  value = body.get(name)
  if name == "max_tokens" and value is None:
    value = body.get("max_completion_tokens")
  if value is None and default is not None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise bad(f"{name} must be an integer, got {value!r}.", name)
  if minimum is not None and value < minimum:
    raise bad(f"{name} must be >= {minimum}, got {value}.", name)
  return value


def _sampler(body: dict) -> sampling.Sampler:
  temperature = _number(body, "temperature", 0.0)
  top_p = _number(body, "top_p", 1.0)
  top_k = body.get("top_k")
  if temperature < 0:
    raise bad(f"temperature must be >= 0, got {temperature}.", "temperature")
  if not 0 < top_p <= 1:
    raise bad(f"top_p must be in (0, 1], got {top_p}.", "top_p")
  if top_k is not None:
    top_k = _integer(body, "top_k", 0)
  if temperature == 0:
    return sampling.Sampler()  # Greedy, as OpenAI's temperature 0: top_p, top_k do not apply.
  if top_k and top_p < 1:
    raise bad("Give top_k or top_p, not both (one truncation per request).", "top_k")
  if top_k:
    return sampling.Sampler("top_k", temperature, top_k=top_k)
  if top_p < 1:
    return sampling.Sampler("top_p", temperature, top_p=top_p)
  return sampling.Sampler("temperature", temperature)


def _stop(stop) -> tuple[str, ...]:
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(
      stops) > 4:
    raise bad("stop must be a non-empty string or a list of at most 4 of them.", "stop")
  return tuple(stops)


def load_image(url: str, limits: Limits) -> tuple[bytes, tuple[int, int]]:
  """(image file bytes, upright (width, height)) of an image_url; the header is checked here
  (a readable format, at most max_image_pixels), the pixels are decoded by the engine."""
  if url.startswith("data:"):
    data = _data_url(url, limits)
  elif url.startswith(("http://", "https://")):
    if not limits.allow_image_urls:
      raise bad("This server does not fetch image URLs (start it with --allow_image_urls); send "
                "the image inline as a data:image/...;base64, URL.", "messages", "url_not_allowed")
    data = _fetch(url, limits)
  else:
    path = url[len("file://"):] if url.startswith("file://") else url
    if not limits.allow_local_images:
      raise bad("image_url must be a data:image/...;base64, URL (local paths need "
                "--allow_local_images, http(s) URLs --allow_image_urls).", "messages",
                "url_not_allowed")
    try:
      if os.path.getsize(path) > limits.max_image_bytes:
        raise _too_large(f"The image file {path} is over {limits.max_image_bytes} bytes.")
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise bad(f"Cannot read image {path}: {e.strerror or e}", "messages", "invalid_image") from None
  return data, _image_size(data, limits)


def _too_large(message: str) -> APIError:
  return APIError(413, message, param="messages", code="request_too_large")


def _data_url(url: str, limits: Limits) -> bytes:
  header, comma, payload = url.partition(",")
  if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
    raise bad("A data URL image must read data:image/<format>;base64,<data>.", "messages",
              "invalid_image")
  if len(payload) * 3 // 4 > limits.max_image_bytes:
    raise _too_large(f"The image is over {limits.max_image_bytes} bytes.")
  try:
    return base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise bad("The data URL's image is not valid base64.", "messages", "invalid_image") from None


def _fetch(url: str, limits: Limits) -> bytes:
  """GET with a timeout and a size limit; only public addresses (not this host or its network)."""
  host = urllib.parse.urlsplit(url).hostname or ""
  try:
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
  except OSError as e:
    raise bad(f"Cannot resolve the image URL's host {host!r}: {e}", "messages",
              "invalid_image") from None
  if any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
    raise bad(f"The image URL's host {host!r} is not a public address.", "messages",
              "url_not_allowed")
  try:
    with urllib.request.urlopen(url, timeout=limits.url_timeout_s) as response:
      data = response.read(limits.max_image_bytes + 1)
  except (OSError, ValueError) as e:
    raise bad(f"Cannot fetch the image URL: {e}", "messages", "invalid_image") from None
  if len(data) > limits.max_image_bytes:
    raise _too_large(f"The image at the URL is over {limits.max_image_bytes} bytes.")
  return data


def _image_size(data: bytes, limits: Limits) -> tuple[int, int]:
  """Upright (width, height) read from the header; refuses non-images and too many pixels."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      if width * height > limits.max_image_pixels:
        raise _too_large(f"The image is {width}x{height} pixels; at most "
                         f"{limits.max_image_pixels} pixels are accepted.")
      if image.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_AXES:
        width, height = height, width
  except APIError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise bad(f"The image cannot be decoded: {' '.join(str(e).split())}", "messages",
              "invalid_image") from None
  return width, height
