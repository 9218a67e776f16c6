r"""Load generator: the server under open-loop Poisson load against static batches, in one run.

  python -m paligemma_jax.serving.loadgen --checkpoint=/ckpt/model --slots=8 --requests=48 \
      --rate=4

1. Starts `python -m paligemma_jax.serve` on a free loopback port (or uses --url, loopback only)
   and sends the request set: arrivals at Poisson times (--rate per second, open loop: a slow
   server does not slow the arrivals), max_tokens uniform in [--min_tokens, --max_tokens],
   questions about --images shared images (many questions per image), streamed, greedy.
2. The same arrivals and lengths with a distinct image per request: the image cache's effect.
3. Stops the server; runs the same (shared-image) request set through `inference.Predictor` as
   `generate` does, in static batches of --slots examples in arrival order, each batch decoding
   to its longest max_tokens (tokens past a request's own max_tokens are not counted). Each
   distinct batch shape is compiled before the timing.

Reports requests/s, output tokens/s, time to first token (TTFT) and time per output token
(TPOT) p50/p99, the throughput ratio (server / static) and TTFT p50 against one static batch's
duration; --output_json writes them. Every phase ends within --max_seconds.
"""

import asyncio
import base64
import io
import ipaddress
import json
import logging as std_logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse

from absl import flags
from absl import logging
import numpy as np
from PIL import Image, ImageDraw

from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import inference

PROMPTS = ("caption en", "answer en what is in the image?", "answer en what color is it?",
           "detect circle ; square", "ocr", "answer en how many shapes are there?")


def define_flags():
  flags.DEFINE_string("checkpoint", None, "The checkpoint the server runs (the static baseline "
                      "loads it too).", required=True)
  flags.DEFINE_string("url", None, "A server already running on this machine (loopback); "
                      "default: start one.")
  flags.DEFINE_integer("slots", 8, "Server slots = static batch size.", lower_bound=1,
                       upper_bound=1024)  # serve's --slots.
  flags.DEFINE_integer("requests", 48, "Requests per phase.", lower_bound=1, upper_bound=10000)
  flags.DEFINE_float("rate", 4.0, "Mean arrivals per second (Poisson).", lower_bound=1e-3)
  flags.DEFINE_integer("images", 4, "Distinct images the shared phase's questions are about.",
                       lower_bound=1)
  flags.DEFINE_integer("image_px", 256, "Side of the generated test images.", lower_bound=8,
                       upper_bound=4096)
  flags.DEFINE_integer("min_tokens", 4, "Smallest max_tokens.", lower_bound=1)
  flags.DEFINE_integer("max_tokens", 64, "Largest max_tokens.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the arrivals, lengths, prompts and images "
                       "(numpy's default_rng: not negative).", lower_bound=0)
  flags.DEFINE_float("max_seconds", 600, "Most seconds per phase.", lower_bound=1)
  flags.DEFINE_string("dtype", "auto", "Passed to the server and the baseline.")
  flags.DEFINE_string("output_json", None, "Write the results here.")
  flags.DEFINE_bool("static", True, "Also run the static-batch baseline.")


def make_images(count: int, size: int, seed: int) -> list[bytes]:
  """PNG files of random shapes on noise: distinct bytes, image-like content."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + rng.integers(0, 150, 3,
                                                                                  dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
      x, y = rng.integers(0, size * 3 // 4, 2)
      r = int(rng.integers(size // 10, size // 4))
      shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
      shape((x, y, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    out.append(buffer.getvalue())
  return out


def request_set(n: int, rate: float, min_tokens: int, max_tokens: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"arrival": np.cumsum(rng.exponential(1 / rate, n)) - 0.0,
          "max_tokens": rng.integers(min_tokens, max_tokens + 1, n),
          "prompt": [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), n)],
          "image_choice": rng.integers(0, 1 << 30, n)}


def percentiles(values) -> dict:
  values = np.asarray(values, np.float64)
  if not values.size:
    return {"p50": None, "p99": None}
  return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


async def _one(client, body: dict, start: float, at: float, out: list):
  await asyncio.sleep(max(0.0, start + at - time.monotonic()))
  sent = time.monotonic()
  first = last = None
  tokens = 0
  async with client.stream("POST", "/v1/chat/completions", json=body) as response:
    if response.status_code != 200:
      await response.aread()
      out.append({"status": response.status_code})
      return
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[len("data: "):])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      for choice in chunk.get("choices", []):
        if choice["delta"].get("content"):
          now = time.monotonic()
          first = first or now
          last = now
  end = time.monotonic()
  out.append({"status": 200, "sent": sent, "first": first, "last": last or end, "end": end,
              "tokens": tokens})


async def run_phase(url: str, requests: dict, images: list[bytes], image_of, max_seconds: float,
                    api_key: str | None) -> dict:
  """Sends the request set open loop; returns its measurements."""
  import httpx
  std_logging.getLogger("httpx").setLevel(std_logging.WARNING)  # Not a line per request.
  urls = ["data:image/png;base64," + base64.b64encode(b).decode() for b in images]
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  limits = httpx.Limits(max_connections=len(requests["prompt"]) + 4)
  out = []
  async with httpx.AsyncClient(base_url=url, timeout=max_seconds, limits=limits,
                               headers=headers) as client:
    before = await _scrape(client)
    start = time.monotonic()
    tasks = []
    for i, prompt in enumerate(requests["prompt"]):
      body = {"model": "x", "stream": True, "stream_options": {"include_usage": True},
              "max_tokens": int(requests["max_tokens"][i]), "temperature": 0,
              "messages": [{"role": "user", "content": [
                  {"type": "text", "text": prompt},
                  {"type": "image_url", "image_url": {"url": urls[image_of(i)]}}]}]}
      tasks.append(asyncio.create_task(_one(client, body, start, float(requests["arrival"][i]),
                                            out)))
    done, pending = await asyncio.wait(tasks, timeout=max_seconds)
    for task in pending:
      task.cancel()
    for task in done:
      if task.exception() is not None:
        out.append({"status": type(task.exception()).__name__})
    after = await _scrape(client)
  ok = [r for r in out if r["status"] == 200]
  span = (max(r["end"] for r in ok) - start) if ok else float("nan")
  tokens = sum(r["tokens"] for r in ok)
  ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
  tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok
          if r["first"] is not None and r["tokens"] > 1]
  return {"requests": len(requests["prompt"]), "completed": len(ok),
          "refused": sum(r["status"] != 200 for r in out), "unfinished": len(pending),
          "seconds": span, "requests_per_s": len(ok) / span, "output_tokens": tokens,
          "output_tokens_per_s": tokens / span, "ttft_s": percentiles(ttft),
          "tpot_s": percentiles(tpot),
          **{k: after.get(k, 0) - before.get(k, 0) for k in ("image_cache_hits",
                                                             "image_cache_misses")}}


async def _scrape(client) -> dict:
  text = (await client.get("/metrics")).text
  return {m.group(1): float(m.group(2)) for m in
          re.finditer(r"^paligemma_engine_(\w+) ([0-9.e+-]+)$", text, re.M)}


def run_static(checkpoint: str, dtype: str, requests: dict, image_paths: list[str], image_of,
               slots: int) -> dict:
  """The request set through Predictor in static batches of `slots`, arrival order."""
  predictor = inference.Predictor(*loading.load_model(checkpoint, dtype=dtype), batch_size=slots)
  n = len(requests["prompt"])
  batches = [list(range(i, min(i + slots, n))) for i in range(0, n, slots)]
  examples = [inference.Example(image_paths[image_of(i)], requests["prompt"][i]) for i in range(n)]
  longest = [int(max(requests["max_tokens"][i] for i in b)) for b in batches]
  for m in sorted(set(longest)):  # Compile each shape first: the server was warmed up too.
    logging.info("Compiling the static batch for max_new_tokens=%d", m)
    list(predictor.predict(examples[:slots], max_new_tokens=m))
  durations, tokens = [], 0
  start = time.monotonic()
  for batch, m in zip(batches, longest):
    t = time.monotonic()
    results = list(predictor.predict([examples[i] for i in batch], max_new_tokens=m))
    durations.append(time.monotonic() - t)
    for i, r in zip(batch, results):
      tokens += min(len(r.get("tokens", [])), int(requests["max_tokens"][i]))
  seconds = time.monotonic() - start
  return {"batches": len(batches), "seconds": seconds, "requests_per_s": n / seconds,
          "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
          "batch_seconds": {"mean": float(np.mean(durations)), **percentiles(durations)}}


def _check_loopback(url: str):
  host = urllib.parse.urlsplit(url).hostname or ""
  try:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:
    loopback = False
  if not loopback:
    raise errors.InputError(f"--url={url}: the load generator only targets this machine "
                            "(127.0.0.1, ::1 or localhost).")


def start_server(f) -> tuple[subprocess.Popen, str]:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  command = [sys.executable, "-m", "paligemma_jax.serve", f"--checkpoint={f.checkpoint}",
             f"--port={port}", f"--slots={f.slots}", f"--max_queue={f.requests}",
             f"--max_tokens_limit={max(f.max_tokens, 1)}", f"--default_max_tokens={f.min_tokens}",
             "--max_prompt_tokens=32",  # PROMPTS are short: fewer prompt buckets to compile.
             f"--dtype={f.dtype}"]
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  deadline = time.monotonic() + f.max_seconds
  for line in proc.stdout:
    if "http://" in line:
      return proc, f"http://127.0.0.1:{port}"
    if time.monotonic() > deadline:
      break
  proc.kill()
  raise errors.InputError(f"The server did not start: {' '.join(command)} (exit {proc.wait()}).")


def table(results: dict) -> str:
  def ms(x):
    return "-" if x is None else f"{1000 * x:.0f}"
  rows = ["| run | requests/s | output tokens/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "image cache hits / misses |", "|---|---|---|---|---|---|"]
  for name in ("server_shared_images", "server_distinct_images"):
    r = results.get(name)
    if r:
      rows.append(f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                  f"{ms(r['ttft_s']['p50'])} / {ms(r['ttft_s']['p99'])} | "
                  f"{ms(r['tpot_s']['p50'])} / {ms(r['tpot_s']['p99'])} | "
                  f"{r['image_cache_hits']:.0f} / {r['image_cache_misses']:.0f} |")
  s = results.get("static")
  if s:
    rows.append(f"| static batches of {results['slots']} | {s['requests_per_s']:.2f} | "
                f"{s['output_tokens_per_s']:.1f} | batch {ms(s['batch_seconds']['p50'])} (p50) | "
                "- | - |")
  return "\n".join(rows)


def main(argv):
  f = flags.FLAGS
  if f.min_tokens > f.max_tokens:
    raise errors.InputError(f"--min_tokens={f.min_tokens} is over --max_tokens={f.max_tokens}.")
  files.check_writable("output_json", f.output_json)
  if f.url:
    _check_loopback(f.url)
  dtype = loading.default_dtype() if f.dtype == "auto" else f.dtype
  requests = request_set(f.requests, f.rate, f.min_tokens, f.max_tokens, f.seed)
  shared = make_images(f.images, f.image_px, f.seed)
  distinct = make_images(f.requests, f.image_px, f.seed + 1)
  shared_of = lambda i: int(requests["image_choice"][i] % f.images)
  results = {"slots": f.slots, "requests": f.requests, "rate": f.rate, "images": f.images,
             "max_tokens": [f.min_tokens, f.max_tokens], "checkpoint": f.checkpoint}
  proc = None
  try:
    if f.url:
      url = f.url
    else:
      proc, url = start_server(f)
    api_key = os.environ.get("PALIGEMMA_API_KEY") if f.url else None
    # One request first: the server's first answer pays for lazy set-up, not the measurement.
    warm = request_set(1, 1.0, f.min_tokens, f.min_tokens, f.seed + 2)
    asyncio.run(run_phase(url, warm, make_images(1, f.image_px, f.seed + 3), lambda i: 0,
                          f.max_seconds, api_key))
    results["server_shared_images"] = asyncio.run(run_phase(url, requests, shared, shared_of,
                                                            f.max_seconds, api_key))
    print(json.dumps({"server_shared_images": results["server_shared_images"]}), flush=True)
    results["server_distinct_images"] = asyncio.run(run_phase(url, requests, distinct,
                                                              lambda i: i, f.max_seconds, api_key))
    print(json.dumps({"server_distinct_images": results["server_distinct_images"]}), flush=True)
  finally:
    if proc is not None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(f.max_seconds)
  if f.static:
    directory = tempfile.mkdtemp(prefix="loadgen-")
    paths = []
    for i, data in enumerate(shared):
      paths.append(os.path.join(directory, f"image{i}.png"))
      with open(paths[-1], "wb") as out:
        out.write(data)
    results["static"] = run_static(f.checkpoint, dtype, requests, paths, shared_of, f.slots)
    server, static = results["server_shared_images"], results["static"]
    results["throughput_ratio"] = server["output_tokens_per_s"] / static["output_tokens_per_s"]
    results["ttft_p50_over_static_batch"] = (server["ttft_s"]["p50"] or float("nan")) / (
        static["batch_seconds"]["p50"])
  print(table(results))
  if "throughput_ratio" in results:
    print(f"throughput server / static: {results['throughput_ratio']:.2f}x; TTFT p50 / static "
          f"batch p50: {results['ttft_p50_over_static_batch']:.2f}")
  if f.output_json:
    files.write_atomically(f.output_json, json.dumps(results, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
