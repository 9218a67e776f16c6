r"""Load generator: the server under open-loop load against static batches and against the
ideal of continuous batching, in one run.

  python -m paligemma_jax.serving.loadgen --checkpoint=/ckpt/model --slots=8 --requests=32 \
      --rate=0 --rate=0.3

For each --rate (arrivals per second, Poisson; 0: all at once, the saturated case):

1. Starts `python -m paligemma_jax.serve` on a free loopback port (or uses --url, loopback only)
   and sends the request set: arrivals open loop (a slow server does not slow them), max_tokens
   uniform in [--min_tokens, --max_tokens], questions about --images shared images (many
   questions per image), streamed, greedy.
2. With --distinct_images, the same arrivals and lengths with a distinct image per request: the
   image cache's effect.
3. After the server stops: the same (shared-image) request set through `inference.Predictor` as
   `generate` runs it, in static batches given the SAME arrival times (`static_timeline`): a
   batch starts when the previous one has ended, with the requests that have arrived by then (at
   most --slots, in arrival order; none arrived: it waits for the next), and decodes to the
   set's longest max_tokens, as `generate --max_new_tokens` runs each batch (tokens past a
   request's own max_tokens are not counted). The idle waits are counted, not slept. A batch
   that compiled is run again, timed.
4. The ideal of continuous batching on the same hardware (`ideal_seconds`), from the engine's own
   programs timed here (`measure_costs`: a prefill of --slots prompts with their image features,
   an image-tower batch, a decode chunk at the full batch): every prompt prefilled in full
   batches, the images the server encoded in full tower batches, and (useful tokens - requests)
   / slots decode steps at the full batch (each request's first token comes from its prefill);
   or, where later, the last arrival plus its own prefill and decode. Reported as engine / ideal
   (output tokens per second). Beside it, the same costs served in order of arrival
   (`first_come_seconds`): a slot refilled the step it frees, so a burst's last requests end
   with slots empty, which no first-come-first-served server avoids; engine / that is what the
   engine's own losses (chunks, the prefill bound, the host) leave.

Per phase: requests/s, output tokens/s, time to first token (TTFT) and time per output token
(TPOT) p50/p99, and the stall: the longest gap between two streamed chunks of one request
(p99 and max over requests, also in decode chunks), which is what prefills of arriving requests
cost the running ones; in the JSON also the load generator's own CPU seconds (client_cpu_s: on
a machine of few cores the client competes with the server it measures). --output_json writes
everything. Every phase ends within --max_seconds.
"""

import asyncio
import base64
import collections
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
import jax
import numpy as np
from PIL import Image, ImageDraw

from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.preprocess import processor

PROMPTS = ("caption en", "answer en what is in the image?", "answer en what color is it?",
           "detect circle ; square", "ocr", "answer en how many shapes are there?")
MAX_PROMPT_TOKENS = 64  # The server's --max_prompt_tokens: PROMPTS fit with a small tokenizer.


def define_flags():
  flags.DEFINE_string("checkpoint", None, "The checkpoint the server runs (the static baseline "
                      "and the ideal load it too).", required=True)
  flags.DEFINE_string("url", None, "A server already running on this machine (loopback); "
                      "default: start one.")
  flags.DEFINE_integer("slots", 8, "Server slots = static batch size.", lower_bound=1,
                       upper_bound=1024)  # serve's --slots.
  flags.DEFINE_integer("requests", 48, "Requests per phase.", lower_bound=1, upper_bound=10000)
  flags.DEFINE_multi_float("rate", [0.0, 1.0], "Mean arrivals per second (Poisson), one run each; "
                           "0: every request at once (saturated).", lower_bound=0)
  flags.DEFINE_integer("images", 4, "Distinct images the shared phase's questions are about.",
                       lower_bound=1)
  flags.DEFINE_integer("image_px", 256, "Side of the generated test images.", lower_bound=8,
                       upper_bound=4096)
  flags.DEFINE_integer("min_tokens", 4, "Smallest max_tokens.", lower_bound=1)
  flags.DEFINE_integer("max_tokens", 64, "Largest max_tokens.", lower_bound=1)
  flags.DEFINE_integer("steps_per_call", 4, "The server's --steps_per_call (decode steps per "
                       "chunk).", lower_bound=1)
  flags.DEFINE_integer("max_prefill_tokens", None, "The server's --max_prefill_tokens; default "
                       "the server's.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the arrivals, lengths, prompts and images "
                       "(numpy's default_rng: not negative).", lower_bound=0)
  flags.DEFINE_float("max_seconds", 600, "Most seconds per phase.", lower_bound=1)
  flags.DEFINE_string("dtype", "auto", "Passed to the server and the baseline.")
  flags.DEFINE_string("output_json", None, "Write the results here.")
  flags.DEFINE_bool("distinct_images", True, "Also run each rate with a distinct image per "
                    "request.")
  flags.DEFINE_bool("static", True, "Also run the static-batch baseline (the ideal's costs are "
                    "measured either way).")


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
  """n requests: arrival times (s from the start, the first at 0; rate 0: all at 0),
  max_tokens, prompts, image choices; the same lengths and prompts at every rate."""
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1 / rate if rate > 0 else 1.0, n) * (rate > 0)
  return {"arrival": np.cumsum(gaps) - gaps[0],
          "max_tokens": rng.integers(min_tokens, max_tokens + 1, n),
          "prompt": [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), n)],
          "image_choice": rng.integers(0, 1 << 30, n)}


def percentiles(values) -> dict:
  values = np.asarray(values, np.float64)
  if not values.size:
    return {"p50": None, "p99": None}
  return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


async def _one(client, body: dict, start: float, at: float, out: list, index: int):
  await asyncio.sleep(max(0.0, start + at - time.monotonic()))
  sent = time.monotonic()
  times = []  # Of the chunks that carried text.
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
          times.append(time.monotonic())
  end = time.monotonic()
  out.append({"status": 200, "index": index, "sent": sent, "first": times[0] if times else None,
              "last": times[-1] if times else end, "end": end, "tokens": tokens,
              "gap": float(np.max(np.diff(times))) if len(times) > 1 else None})


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
    start, cpu = time.monotonic(), time.process_time()
    tasks = []
    for i, prompt in enumerate(requests["prompt"]):
      body = {"model": "x", "stream": True, "stream_options": {"include_usage": True},
              "max_tokens": int(requests["max_tokens"][i]), "temperature": 0,
              "messages": [{"role": "user", "content": [
                  {"type": "text", "text": prompt},
                  {"type": "image_url", "image_url": {"url": urls[image_of(i)]}}]}]}
      tasks.append(asyncio.create_task(_one(client, body, start, float(requests["arrival"][i]),
                                            out, i)))
    done, pending = await asyncio.wait(tasks, timeout=max_seconds)
    for task in pending:
      task.cancel()
    for task in done:
      if task.exception() is not None:
        out.append({"status": type(task.exception()).__name__})
    cpu = time.process_time() - cpu  # This client's share of the machine the server runs on.
    after = await _scrape(client)
  ok = [r for r in out if r["status"] == 200]
  span = (max(r["end"] for r in ok) - start) if ok else float("nan")
  tokens = sum(r["tokens"] for r in ok)
  ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
  tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok
          if r["first"] is not None and r["tokens"] > 1]
  gaps = [r["gap"] for r in ok if r["gap"] is not None]
  tokens_by_request = [0] * len(requests["prompt"])
  for r in ok:
    tokens_by_request[r["index"]] = r["tokens"]
  return {"requests": len(requests["prompt"]), "completed": len(ok),
          "refused": sum(r["status"] != 200 for r in out), "unfinished": len(pending),
          "seconds": span, "requests_per_s": len(ok) / span, "output_tokens": tokens,
          "output_tokens_per_s": tokens / span, "ttft_s": percentiles(ttft),
          "tpot_s": percentiles(tpot),
          "stall_s": {**percentiles(gaps), "max": max(gaps) if gaps else None},
          "tokens_by_request": tokens_by_request, "client_cpu_s": cpu,
          **{k: after.get(k, 0) - before.get(k, 0) for k in (
              "image_cache_hits", "image_cache_misses", "decode_calls", "decode_rows",
              "prefill_calls", "prefilled_prompts")}}


async def _scrape(client) -> dict:
  text = (await client.get("/metrics")).text
  return {m.group(1): float(m.group(2)) for m in
          re.finditer(r"^paligemma_engine_(\w+) ([0-9.e+-]+)$", text, re.M)}


def static_timeline(arrival, slots: int, run_batch) -> list[tuple[list[int], float, float]]:
  """Static batches given arrival times: each starts when the previous one has ended (or at the
  next arrival, if none is waiting) with the requests arrived by then, at most `slots`, in
  arrival order. run_batch(indices) runs one and returns its seconds. -> [(indices, start,
  end)], times on the arrivals' clock (idle waits are counted, not slept)."""
  order = [int(i) for i in np.argsort(np.asarray(arrival), kind="stable")]
  timeline, now = [], 0.0
  while order:
    now = max(now, float(arrival[order[0]]))
    batch = [i for i in order[:slots] if arrival[i] <= now]
    order = order[len(batch):]
    start, now = now, now + run_batch(batch)
    timeline.append((batch, start, now))
  return timeline


class _Compiles:
  """Counts jit cache misses (lowerings) while it is registered."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    self.count += event == "/jax/core/compile/jaxpr_to_mlir_module_duration"


def run_static(model, requests: dict, image_paths: list[str], image_of, slots: int,
               compiles: _Compiles) -> dict:
  """The request set through Predictor in static batches of `slots` formed as the requests
  arrive (`static_timeline`), each decoding to the set's longest max_tokens, as `generate
  --max_new_tokens` runs every batch of a run (random weights never stop early)."""
  predictor = inference.Predictor(*model, batch_size=slots)
  n = len(requests["prompt"])
  examples = [inference.Example(image_paths[image_of(i)], requests["prompt"][i]) for i in range(n)]
  tokens = [0] * n
  longest = int(max(requests["max_tokens"]))

  def run_batch(batch):
    while True:  # A shape compiled here is run again: the server was warmed up too.
      before, t = compiles.count, time.monotonic()
      results = list(predictor.predict([examples[i] for i in batch], max_new_tokens=longest))
      seconds = time.monotonic() - t
      if compiles.count == before:
        break
      logging.info("Static batch: compiled; again, timed")
    for i, r in zip(batch, results):
      tokens[i] = min(len(r.get("tokens", [])), int(requests["max_tokens"][i]))
    return seconds

  timeline = static_timeline(requests["arrival"], slots, run_batch)
  span = timeline[-1][2]
  latency = [end - requests["arrival"][i] for batch, _, end in timeline for i in batch]
  durations = [end - start for _, start, end in timeline]
  return {"batches": len(timeline), "seconds": span, "requests_per_s": n / span,
          "output_tokens": sum(tokens), "output_tokens_per_s": sum(tokens) / span,
          "latency_s": percentiles(latency),
          "batch_seconds": {"mean": float(np.mean(durations)), **percentiles(durations)}}


def _median_seconds(run, repeats: int) -> float:
  jax.block_until_ready(run())  # Compiles.
  times = []
  for _ in range(repeats):
    t = time.monotonic()
    jax.block_until_ready(run())
    times.append(time.monotonic() - t)
  return float(np.median(times))


def measure_costs(model, slots: int, steps_per_call: int, max_tokens: int, image_size: int,
                  repeats: int = 3) -> dict:
  """The engine's own programs at the server's settings, each timed alone at the full batch:
  an image-tower batch of `slots` images, a prefill + insert of `slots` prompts (image features
  given) for each prompt-text bucket of PROMPTS, a decode chunk of `slots` rows. Medians of
  `repeats` after a compiling call."""
  from paligemma_jax.serving import engine as engine_lib
  engine = engine_lib.Engine(model, rows=slots, steps_per_call=steps_per_call,
                             max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens_limit=max_tokens,
                             max_images=1)
  params, n = engine._params, engine.num_image_tokens
  pixels = np.zeros((slots, image_size, image_size, 3), np.float32)
  costs = {"tower_s": _median_seconds(lambda: engine._embed(params, pixels), repeats)}
  features = engine._embed(params, pixels)
  buckets = {}
  for prompt in PROMPTS:
    tokens, prefix_mask, _ = processor.build_prompt(
        engine.tokenizer, prompt, n, engine.config.image_token_id)
    buckets.setdefault(engine._text_bucket(len(tokens) - n) + n, (tokens, prefix_mask))
  costs["prefill_s"] = {}
  rows = np.arange(slots, dtype=np.int32)
  for length, (tokens, prefix_mask) in sorted(buckets.items()):
    ids, mask = batching.right_pad([tokens] * slots, length)
    prefix, _ = batching.right_pad([prefix_mask] * slots, length, bool)

    def prefill():
      engine._state, token, _, _ = engine._prefill(
          params, engine._state, ids, features, mask, prefix, None, rows,
          np.zeros((slots, 2), np.uint32), sampling.per_row([sampling.Sampler()] * slots),
          np.full((slots,), max_tokens, np.int32))
      return token
    costs["prefill_s"][length] = _median_seconds(prefill, repeats)
  active = np.ones((slots,), bool)

  def chunk():
    engine._state, out, _, _ = engine._decode(params, engine._state, active, top=False,
                                                  width=slots)
    return out
  costs["chunk_s"] = _median_seconds(chunk, repeats)
  costs["step_s"] = costs["chunk_s"] / steps_per_call
  costs["prompt_length"] = {p: engine._text_bucket(len(processor.build_prompt(
      engine.tokenizer, p, n, engine.config.image_token_id)[0]) - n) + n for p in PROMPTS}
  return costs


def ideal_seconds(*, requests: int, useful_tokens: int, slots: int, prefill_s: float,
                  step_s: float, images: int = 0, tower_s: float = 0.0,
                  last_arrival: float = 0.0, last_tokens: int = 1) -> float:
  """Continuous batching with nothing lost, on the measured costs: every prompt prefilled in
  full batches (prefill_s: one batch of `slots`, mean over the prompts), `images` encoded in
  full tower batches (tower_s each), and the tokens after each request's first (which its
  prefill chose) in decode steps at the full batch (step_s); or, where later, the last arrival
  plus its own prefill and its last_tokens - 1 steps."""
  work = (requests * prefill_s + images * tower_s +
          max(useful_tokens - requests, 0) * step_s) / slots
  return max(work, last_arrival + prefill_s / slots + (last_tokens - 1) * step_s)


def first_come_seconds(arrival, tokens, *, slots: int, prefill_s, step_s: float,
                       images: int = 0, tower_s: float = 0.0) -> float:
  """Continuous batching that loses only what serving in order of arrival must: on the ideal's
  costs (a prompt's prefill prefill_s[i] / slots, its share of a full batch; every decode step
  step_s, the full batch's, however few rows run; `images` in full tower batches, shared out
  over the requests' prefills), request i takes a free slot at the first step by which it has
  arrived and decodes its tokens[i] - 1 later tokens (its prefill chose the first) one a step
  beside the others, its slot free again the step it ends; the device waits only when nothing
  has arrived. Requests that answered nothing (tokens 0: refused, unfinished) are left out.
  What it adds to `ideal_seconds`: slots that empty as the last requests end (a burst drains),
  and the steps a slot waits for an arrival. (An engine that decodes only the rows in use pays
  less than step_s for a draining step, so it may come out above this bound.)"""
  served = [i for i in np.argsort(np.asarray(arrival), kind="stable") if tokens[i] > 0]
  order = collections.deque(int(i) for i in served)
  tower = images * tower_s / max(len(served), 1)  # Each prompt's share of the image batches.
  now, running = 0.0, []  # Tokens each running request has yet to decode.
  while order or running:
    while order and len(running) < slots and arrival[order[0]] <= now:
      i = order.popleft()
      now += (prefill_s[i] + tower) / slots
      if tokens[i] > 1:
        running.append(tokens[i] - 1)
    if running:
      now += step_s
      running = [left - 1 for left in running if left > 1]
    elif order:
      now = max(now, float(arrival[order[0]]))
  return now


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
             f"--max_prompt_tokens={MAX_PROMPT_TOKENS}", f"--steps_per_call={f.steps_per_call}",
             "--max_images=1", "--warmup_every_shape", f"--dtype={f.dtype}"]
  if f.max_prefill_tokens:
    command.append(f"--max_prefill_tokens={f.max_prefill_tokens}")
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
  """The results as a Markdown table, a row per phase of each rate."""
  ms = lambda x: "-" if x is None else f"{1000 * x:.0f}"
  pair = lambda d: f"{ms(d['p50'])} / {ms(d['p99'])}"
  chunk = results.get("costs", {}).get("chunk_s")
  rows = ["| rate | run | requests/s | output tokens/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "stall p99 / max ms (chunks) | image cache hits / misses |",
          "|---|---|---|---|---|---|---|---|"]
  for run in results["runs"]:
    rate = "all at once" if run["rate"] == 0 else f"{run['rate']:g}/s"
    for name in ("server_shared_images", "server_distinct_images"):
      r = run.get(name)
      if r:
        stall = f"{ms(r['stall_s']['p99'])} / {ms(r['stall_s']['max'])}"
        if chunk and r["stall_s"]["max"] is not None:
          stall += f" ({r['stall_s']['p99'] / chunk:.1f} / {r['stall_s']['max'] / chunk:.1f})"
        rows.append(f"| {rate} | {name.replace('_', ' ')} | {r['requests_per_s']:.2f} | "
                    f"{r['output_tokens_per_s']:.2f} | {pair(r['ttft_s'])} | {pair(r['tpot_s'])} | "
                    f"{stall} | {r['image_cache_hits']:.0f} / {r['image_cache_misses']:.0f} |")
    s = run.get("static")
    if s:
      rows.append(f"| {rate} | static batches of {results['slots']}, same arrivals | "
                  f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.2f} | "
                  f"{pair(s['latency_s'])} (whole answer) | - | - | - |")
    if run.get("ideal_tokens_per_s"):
      rows.append(f"| {rate} | ideal continuous batching | - | {run['ideal_tokens_per_s']:.2f} | "
                  "- | - | - | - |")
      rows.append(f"| {rate} | ideal, in order of arrival | - | "
                  f"{run['first_come_tokens_per_s']:.2f} | - | - | - | - |")
  lines = ["\n".join(rows)]
  costs = results.get("costs")
  if costs:
    prefill = ", ".join(f"{ms(v)} ({k} tokens)" for k, v in costs["prefill_s"].items())
    lines.append(f"measured at {results['slots']} rows: prefill {prefill} ms, image tower "
                 f"{ms(costs['tower_s'])} ms, decode chunk {ms(costs['chunk_s'])} ms "
                 f"({results['steps_per_call']} steps)")
  for run in results["runs"]:
    if "engine_over_ideal" in run:
      lines.append(f"rate {run['rate']:g}: server / ideal {run['engine_over_ideal']:.2f}, "
                   f"server / ideal in order of arrival {run['engine_over_first_come']:.2f}" + (
          f", server / static {run['server_over_static']:.2f}" if "static" in run else ""))
  return "\n".join(lines)


def main(argv):
  f = flags.FLAGS
  if f.min_tokens > f.max_tokens:
    raise errors.InputError(f"--min_tokens={f.min_tokens} is over --max_tokens={f.max_tokens}.")
  files.check_writable("output_json", f.output_json)
  if f.url:
    _check_loopback(f.url)
  dtype = loading.default_dtype() if f.dtype == "auto" else f.dtype
  shared = make_images(f.images, f.image_px, f.seed)
  distinct = make_images(f.requests, f.image_px, f.seed + 1)
  results = {"slots": f.slots, "requests": f.requests, "images": f.images,
             "steps_per_call": f.steps_per_call, "max_tokens": [f.min_tokens, f.max_tokens],
             "checkpoint": f.checkpoint, "runs": []}
  for rate in f.rate:
    requests = request_set(f.requests, rate, f.min_tokens, f.max_tokens, f.seed)
    shared_of = lambda i, r=requests: int(r["image_choice"][i] % f.images)
    results["runs"].append({"rate": rate, "requests": requests, "shared_of": shared_of})
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
    for run in results["runs"]:
      phases = [("server_shared_images", shared, run["shared_of"])]
      if f.distinct_images:
        phases.append(("server_distinct_images", distinct, lambda i: i))
      for name, images, image_of in phases:
        run[name] = asyncio.run(run_phase(url, run["requests"], images, image_of, f.max_seconds,
                                          api_key))
        print(json.dumps({"rate": run["rate"], name: run[name]}), flush=True)
  finally:
    if proc is not None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(f.max_seconds)
  model = loading.load_model(f.checkpoint, dtype=dtype)
  costs = measure_costs(model, f.slots, f.steps_per_call, f.max_tokens,
                        model.config.vision.image_size)
  results["costs"] = {k: v for k, v in costs.items() if k != "prompt_length"}
  print(json.dumps({"costs": results["costs"]}), flush=True)
  for run in results["runs"]:
    requests, server = run["requests"], run["server_shared_images"]
    prefill_each = [costs["prefill_s"][costs["prompt_length"][p]] for p in requests["prompt"]]
    last = int(np.argmax(requests["arrival"]))
    seconds = ideal_seconds(
        requests=server["completed"], useful_tokens=server["output_tokens"], slots=f.slots,
        prefill_s=float(np.mean(prefill_each)), step_s=costs["step_s"],
        images=server["image_cache_misses"], tower_s=costs["tower_s"],
        last_arrival=float(requests["arrival"][last]),
        last_tokens=int(requests["max_tokens"][last]))
    first_come = first_come_seconds(
        requests["arrival"], server["tokens_by_request"], slots=f.slots,
        prefill_s=prefill_each, step_s=costs["step_s"], images=server["image_cache_misses"],
        tower_s=costs["tower_s"])
    for name, bound in (("ideal", seconds), ("first_come", first_come)):
      per_s = server["output_tokens"] / bound if bound > 0 else 0.0  # Nothing answered: 0.
      run[f"{name}_tokens_per_s"] = per_s
      run[f"engine_over_{name}"] = server["output_tokens_per_s"] / per_s if per_s else float("nan")
  if f.static:
    directory = tempfile.mkdtemp(prefix="loadgen-")
    paths = []
    for i, data in enumerate(shared):
      paths.append(os.path.join(directory, f"image{i}.png"))
      with open(paths[-1], "wb") as out:
        out.write(data)
    compiles = _Compiles()
    for run in results["runs"]:
      run["static"] = run_static(model, run["requests"], paths, run["shared_of"], f.slots,
                                 compiles)
      run["server_over_static"] = (run["server_shared_images"]["output_tokens_per_s"] /
                                   run["static"]["output_tokens_per_s"])
      print(json.dumps({"rate": run["rate"], "static": run["static"]}), flush=True)
  for run in results["runs"]:
    del run["shared_of"]
    run["requests"] = {k: np.asarray(v).tolist() for k, v in run["requests"].items()}
  print(table(results))
  if f.output_json:
    files.write_atomically(f.output_json, json.dumps(results, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
