"""OpenAI chat-completions requests -> what the engine runs, with every check a client can fail.

  body (bytes, at most Limits.max_body_bytes) -> JSON -> one user message: text parts (the
  PaliGemma prompt) + 1 to Limits.max_images image parts, in the order the prompt reads them
  (data: URLs; http(s) or a local path only where allowed) -> each image's bytes, header-checked
  (format, pixel count, upright size), all of them together at most
  Limits.max_request_image_bytes -> ChatRequest

Every value is checked against the range the engine can hold (docs/serving.md lists them):
integers are JSON integers (not 1.0 or true), top_k at most the vocabulary, seed an int64.

Every failure is an `APIError` carrying the HTTP status (400, or 413 for a body or images over a
limit; an image's error names it by its position where there are several) and OpenAI's error
body {"error": {"message", "type", "param", "code"}}, so a bad request is answered alone and
never reaches the engine. Sampling follows OpenAI's fields: temperature 0
(the default here, PaliGemma's own decoding) is greedy; otherwise top_k (an extension) or top_p
below 1 truncates, else plain temperature sampling. `n` asks for that many choices (at most
Limits.max_n), `logprobs: true` for each token's log-probability and `top_logprobs` (0..20, only
with logprobs: true, as OpenAI rules) for that many alternatives per token.
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
import stat
import urllib.parse
import urllib.request

from PIL import ExifTags, Image

from paligemma_jax import errors
from paligemma_jax import tasks
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import settings

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
  max_top_k: int = sampling.MAX_TOP_K  # The server sets its vocabulary size.
  max_n: int = 8  # Choices per request (`n`); the server also bounds it by the engine's rows.
  max_images: int = 4  # Image parts per message; the server sets its engine's max_images.
  # A request's image files together; None: max_images x max_image_bytes.
  max_request_image_bytes: int | None = None
  # A request's pixels together (each image is decoded, then resized, in turn), so that several
  # images cost at most twice the decoding of the largest one; None: 2 x max_image_pixels.
  max_request_image_pixels: int | None = None


@dataclasses.dataclass
class ChatRequest:
  """One validated request."""
  prompt: str
  images: tuple[bytes, ...]  # Image files, in prompt order.
  image_sizes: tuple[tuple[int, int], ...]  # Upright (width, height) of each.
  max_tokens: int
  sampler: sampling.Sampler
  seed: int
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool  # stream_options.include_usage: a last chunk with the usage.
  n: int  # Choices.
  logprobs: bool  # Each token's log-probability in choices[i].logprobs.
  top_logprobs: int  # With logprobs: alternatives per token (0..MAX_TOP_LOGPROBS).
  task: str | None  # "detect" | "segment": add boxes, labels (and masks) to the reply.
  model: str | None

  @property
  def image_size(self) -> tuple[int, int]:
    """The first image's size: the one boxes and masks refer to (as generate reads them)."""
    return self.image_sizes[0]


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
  return APIError(400, message, param=param, code=code)


def parse_json(body: bytes) -> dict:
  try:
    value = json.loads(body)
  except RecursionError:
    raise bad("The request body is nested too deeply.", code="invalid_json") from None
  except ValueError as e:  # Also UnicodeDecodeError, and an integer of over 4300 digits.
    raise bad(f"The request body is not valid JSON: {e}", code="invalid_json") from None
  if not isinstance(value, dict):
    raise bad("The request body must be a JSON object.", code="invalid_json")
  return value


def parse_chat_request(body: dict, limits: Limits, default_max_tokens: int = 32) -> ChatRequest:
  """Validates a chat-completions body (already JSON) and loads its images; raises APIError."""
  prompt, image_urls = _message(body.get("messages"), limits.max_images)
  if len(prompt) > limits.max_prompt_chars:
    raise bad(f"The prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} are "
              "accepted.", "messages", "prompt_too_long")
  given = {name: _integer(body, name, 1) for name in ("max_completion_tokens", "max_tokens")
           if body.get(name) is not None}
  if len(set(given.values())) > 1:
    raise bad("max_completion_tokens and max_tokens differ: give one of them.",
              "max_completion_tokens")
  max_tokens = next(iter(given.values()), default_max_tokens)
  n = _integer(body, "n", 1, default=1)
  if n > limits.max_n:
    raise bad(f"n must be at most {limits.max_n} on this server (its --max_n, and no more than "
              f"its --slots), got {_shown(n)}.", "n")
  logprobs = body.get("logprobs")
  if logprobs is not None and not isinstance(logprobs, bool):
    raise bad(f"logprobs must be true or false, got {_shown(logprobs)}.", "logprobs")
  top_logprobs = _integer(body, "top_logprobs", 0, default=0, maximum=sampling.MAX_TOP_LOGPROBS)
  if body.get("top_logprobs") is not None and not logprobs:
    raise bad("top_logprobs needs logprobs: true.", "top_logprobs")
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
  images, sizes = load_images(image_urls, limits)
  return ChatRequest(prompt=prompt, images=images, image_sizes=sizes, max_tokens=max_tokens,
                     sampler=_sampler(body, limits.max_top_k), seed=_seed(body),
                     stop=_stop(body.get("stop")), stream=stream,
                     include_usage=bool(options.get("include_usage")), n=n,
                     logprobs=bool(logprobs), top_logprobs=top_logprobs, task=task, model=model)


def _message(messages, max_images: int) -> tuple[str, list[str]]:
  """(prompt, image URLs in order) of the one user message."""
  if not isinstance(messages, list) or not messages:
    raise bad("messages must be a non-empty list.", "messages", "missing" if messages is None
              else "invalid_value")
  if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
    raise bad("messages must hold exactly one user message (PaliGemma answers one prompt about "
              "its images; it has no system prompt or chat history).", "messages")
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
  if len(images) > max_images:
    raise bad(f"The message has {len(images)} images; this server takes at most {max_images} "
              "(its --max_images).", "messages", "too_many_images")
  prompt = " ".join(t for t in texts if t)
  if not prompt:
    raise bad('The message has no text: give a prompt such as "caption en" or "detect cat".',
              "messages", "missing_prompt")
  return prompt, images


def _number(body: dict, name: str, default: float) -> float:
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise bad(f"{name} must be a number, got {_shown(value)}.", name)
  try:
    value = float(value)  # An integer past float's range raises OverflowError.
  except OverflowError:
    value = math.inf
  if not math.isfinite(value):
    raise bad(f"{name} must be a finite number.", name)
  return value


def _integer(body: dict, name: str, minimum: int, default: int | None = None,
             maximum: int = 2**63 - 1) -> int:
  """A JSON integer in [minimum, maximum] (not 1.0 or true): the int64s clients send."""
  value = body.get(name)
  if value is None and default is not None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise bad(f"{name} must be an integer, got {_shown(value)}.", name)
  if not minimum <= value <= maximum:
    raise bad(f"{name} must be in [{minimum}, {maximum}], got {_shown(value)}.", name)
  return value


def _shown(value) -> str:
  """A client's value in a message, cut short (a huge number or string stays out of it)."""
  text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
  return text if len(text) <= 80 else text[:77] + "..."


def _seed(body: dict) -> int:
  return _integer(body, "seed", sampling.SEED_RANGE[0], 0, sampling.SEED_RANGE[1])


def _sampler(body: dict, max_top_k: int) -> sampling.Sampler:
  """JSON types and the vocabulary's bound here; the rest as every caller's (settings.py)."""
  temperature, top_p = _number(body, "temperature", 0.0), _number(body, "top_p", 1.0)
  top_k = None if body.get("top_k") is None else _integer(body, "top_k", 0, maximum=max_top_k)
  try:
    return settings.decoder(None, temperature=temperature, top_k=top_k, top_p=top_p,
                            flag_names=False)
  except errors.InputError as e:
    raise bad(str(e), e.param) from None


def _stop(stop) -> tuple[str, ...]:
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(
      stops) > 4:
    raise bad("stop must be a non-empty string or a list of at most 4 of them.", "stop")
  return tuple(stops)


def load_images(urls: list[str], limits: Limits) -> tuple[tuple[bytes, ...], tuple]:
  """(image files, upright (width, height) of each) of a message's image_urls, in order, each
  as `load_image` checks it; an error names the image where there are several, and images over
  the request's totals (max_request_image_bytes, max_request_image_pixels) are a 413 before the
  next one is read."""
  total = limits.max_request_image_bytes
  total = limits.max_images * limits.max_image_bytes if total is None else total
  pixels = limits.max_request_image_pixels
  pixels = 2 * limits.max_image_pixels if pixels is None else pixels
  images, sizes = [], []
  for i, url in enumerate(urls):
    try:
      data, size = load_image(url, limits)
    except APIError as e:
      if len(urls) == 1:
        raise
      raise APIError(e.status, f"Image {i + 1} of {len(urls)}: {e.message}", param=e.param,
                     code=e.code, type=e.type) from None
    images.append(data)
    sizes.append(size)
    if sum(map(len, images)) > total:
      raise _too_large(f"The request's images are over {total} bytes together.")
    if sum(w * h for w, h in sizes) > pixels:
      raise _too_large(f"The request's images are over {pixels} pixels together.")
  return tuple(images), tuple(sizes)


def load_image(url: str, limits: Limits) -> tuple[bytes, tuple[int, int]]:
  """(image file bytes, upright (width, height)) of an image_url; the header is checked here
  (a readable format, at most max_image_pixels), the pixels are decoded by the engine."""
  scheme = url.partition(":")[0].lower()  # URL schemes are case-insensitive (RFC 3986).
  if scheme == "data":
    data = _data_url(url, limits)
  elif scheme in ("http", "https"):
    if not limits.allow_image_urls:
      raise bad("This server does not fetch image URLs (start it with --allow_image_urls); send "
                "the image inline as a data:image/...;base64, URL.", "messages", "url_not_allowed")
    data = _fetch(url, limits)
  else:
    if not limits.allow_local_images:
      raise bad("image_url must be a data:image/...;base64, URL (local paths need "
                "--allow_local_images, http(s) URLs --allow_image_urls).", "messages",
                "url_not_allowed")
    data = _read_local(url[len("file://"):] if scheme == "file" else url, limits)
  return data, _image_size(data, limits)


def _read_local(path: str, limits: Limits) -> bytes:
  """A regular file's bytes, at most max_image_bytes: never a device (/dev/zero has no end), a
  FIFO (opened without blocking, then refused) or a directory."""
  shown = _shown(path)
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path.
    reason = getattr(e, "strerror", None) or "not a valid path"
    raise bad(f"Cannot read image {shown}: {reason}", "messages", "invalid_image") from None
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise bad(f"The image path {shown} is not a regular file.", "messages", "invalid_image")
    data = b""
    while len(data) <= limits.max_image_bytes:  # Never more than the limit + 1 bytes.
      chunk = os.read(fd, limits.max_image_bytes + 1 - len(data))
      if not chunk:
        break
      data += chunk
  except OSError as e:
    raise bad(f"Cannot read image {shown}: {e.strerror or e}", "messages",
              "invalid_image") from None
  finally:
    os.close(fd)
  if len(data) > limits.max_image_bytes:
    raise _too_large(f"The image file {shown} is over {limits.max_image_bytes} bytes.")
  return data


def _too_large(message: str) -> APIError:
  return APIError(413, message, param="messages", code="request_too_large")


def _data_url(url: str, limits: Limits) -> bytes:
  header, comma, payload = url.partition(",")
  header = header.lower()  # Media types and "base64" are case-insensitive.
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
  except Image.DecompressionBombError:  # Pillow's own refusal, past 2 x its MAX_IMAGE_PIXELS.
    raise _too_large(f"The image has over {limits.max_image_pixels} pixels.") from None
  except Image.UnidentifiedImageError:  # Its message holds the repr of our buffer.
    raise bad("The image is not in a format Pillow can read.", "messages",
              "invalid_image") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise bad(f"The image cannot be decoded: {' '.join(str(e).split())}", "messages",
              "invalid_image") from None
  return width, height
