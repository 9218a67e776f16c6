r"""Serves a PaliGemma checkpoint over an OpenAI-compatible HTTP API (see docs/serving.md).

  python -m paligemma_jax.serve --checkpoint=/ckpt/pg2-3b-224 --port=8000
then POST /v1/chat/completions (OpenAI's chat schema, a prompt + one image or several, at most
--max_images), GET / for a page to try it, GET /metrics, GET /health. The engine
(serving/engine.py) batches the requests continuously over --slots decode rows; the server
(serving/server.py) is FastAPI on uvicorn.
SIGTERM (or Ctrl-C) stops accepting connections, finishes the running requests, then exits.

Security defaults: listens on 127.0.0.1; --api_key (or $PALIGEMMA_API_KEY) makes every endpoint
but /health and the static page require `Authorization: Bearer KEY`; images come inline (data:
URLs) unless --allow_image_urls (the server fetches public http(s) URLs for its clients) or
--allow_local_images (clients name files on the server's disk).
"""

import os
import socket

from absl import flags
from absl import logging
import uvicorn

from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax.checkpoints import loading
from paligemma_jax.serving import engine as engine_lib
from paligemma_jax.serving import schema
from paligemma_jax.serving import server
from paligemma_jax.tasks import segmentation_format

API_KEY_ENV = "PALIGEMMA_API_KEY"
MAX_POSITIONS = 8192  # Every PaliGemma (1 and 2) has 8192; the model's own limit is checked too.


def define_flags():
  cli.define_model_flags()
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface; "
                      "give --api_key then).")
  flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535)
  flags.DEFINE_integer("slots", 8, "Decode rows run together (a power of two); requests join "
                       "and leave the running batch one by one.", lower_bound=1, upper_bound=1024)
  flags.DEFINE_integer("max_queue", 64, "Requests that may wait beyond the running rows; more "
                       "get HTTP 429.", lower_bound=0, upper_bound=1_000_000)
  flags.DEFINE_integer("steps_per_call", 4, "Decode steps per device call.", lower_bound=1,
                       upper_bound=1024)
  flags.DEFINE_integer("max_prefill_tokens", None, "Most prompt tokens (image tokens included) "
                       "prefilled between two decode chunks while requests run: bounds how long "
                       "arrivals stall them; default two one-image prompts.", lower_bound=1)
  flags.DEFINE_integer("max_prompt_tokens", 256, "Longest prompt in tokens (image tokens not "
                       "counted).", lower_bound=1, upper_bound=MAX_POSITIONS)
  flags.DEFINE_integer("max_tokens_limit", 256, "Largest max_tokens a request may ask for.",
                       lower_bound=1, upper_bound=MAX_POSITIONS)
  flags.DEFINE_integer("default_max_tokens", 32, "max_tokens of a request that gives none.",
                       lower_bound=1, upper_bound=MAX_POSITIONS)
  flags.DEFINE_integer("max_n", 8, "Most choices (`n`) one request may ask for; each takes a "
                       "slot, so at most --slots apply.", lower_bound=1, upper_bound=1024)
  flags.DEFINE_integer("max_images", engine_lib.DEFAULT_MAX_IMAGES, "Most images one request "
                       "may hold. Every slot's cache holds this many images' tokens + "
                       "--max_prompt_tokens + --max_tokens_limit (see docs/serving.md for the "
                       "memory); when not given, lowered to what the model's positions hold (1 at "
                       "896 px).", lower_bound=1, upper_bound=MAX_POSITIONS)
  flags.DEFINE_integer("image_cache_size", 64, "Images whose encoding is kept for reuse.",
                       lower_bound=0, upper_bound=1_000_000)
  flags.DEFINE_string("api_key", None, f"Require 'Authorization: Bearer KEY'; default "
                      f"${API_KEY_ENV}.")
  flags.DEFINE_string("model_name", None, "The name /v1/models lists and replies carry; default "
                      "the checkpoint directory's name.")
  flags.DEFINE_bool("allow_image_urls", False, "Fetch http(s) image URLs for clients (public "
                    "addresses only, with a timeout and a size limit).")
  flags.DEFINE_bool("allow_local_images", False, "Let clients name image files on this machine.")
  flags.DEFINE_integer("max_body_mib", 32, "Largest request body, MiB.", lower_bound=1,
                       upper_bound=4096)
  flags.DEFINE_integer("max_image_pixels", 50_000_000, "Largest image, width x height.",
                       lower_bound=1, upper_bound=1 << 31)
  flags.DEFINE_bool("warmup", True, "Compile the common programs before serving (the rest, and "
                    "with --nowarmup all, compile when first needed; the compilation cache makes "
                    "a restart's warmup cheap).")
  flags.DEFINE_bool("warmup_every_shape", False, "With --warmup, compile one-image prefills "
                    "of every batch size for every prompt bucket too (the load generator's "
                    "timings must not include compiles).")
  flags.DEFINE_string("vae_npz", None, 'Mask decoder weights (big_vision\'s vae-oid.npz), for '
                      'requests with "task": "segment".')


def validate_flags(f):
  """What can be checked before the model loads."""
  if f.slots & (f.slots - 1):
    raise errors.InputError(f"--slots={f.slots}: give a power of two (1, 2, 4, 8, ...).")
  if f.default_max_tokens > f.max_tokens_limit:
    raise errors.InputError(f"--default_max_tokens={f.default_max_tokens} is over "
                            f"--max_tokens_limit={f.max_tokens_limit}.")
  files.check_readable("vae_npz", f.vae_npz)
  loading.checkpoint_kind(f.checkpoint)


def listen(host: str, port: int) -> socket.socket:
  """The listening socket, bound before the model loads: a busy port fails at once."""
  try:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
  except OSError as e:
    raise errors.InputError(f"--host={host} --port={port}: cannot listen: {e.strerror or e}") from None
  return sock


def main(argv):
  f = flags.FLAGS
  validate_flags(f)
  api_key = f.api_key or os.environ.get(API_KEY_ENV) or None
  if f.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
    logging.warning("Listening on %s without --api_key: anyone who reaches it can use it.", f.host)
  sock = listen(f.host, f.port)
  mesh = cli.mesh_from_flags()
  vae = segmentation_format.load_vae_npz(f.vae_npz) if f.vae_npz else None
  model = cli.load_model_from_flags(mesh)
  engine = engine_lib.Engine(model, rows=f.slots, max_queue=f.max_queue,
                             steps_per_call=f.steps_per_call, max_prompt_tokens=f.max_prompt_tokens,
                             max_tokens_limit=f.max_tokens_limit,
                             image_cache_size=f.image_cache_size,
                             max_images=f.max_images if f["max_images"].present else None,
                             mesh=mesh, cache_dtype=cli.kv_cache_dtype_from_flags(),
                             max_prefill_tokens=f.max_prefill_tokens)
  engine.start()
  if f.warmup:
    logging.info("Compiling the engine's programs ...")
    engine.warmup(every_shape=f.warmup_every_shape)
  limits = schema.Limits(max_body_bytes=f.max_body_mib << 20, max_image_pixels=f.max_image_pixels,
                         max_n=f.max_n,
                         allow_image_urls=f.allow_image_urls,
                         allow_local_images=f.allow_local_images)
  name = f.model_name or os.path.basename(os.path.normpath(f.checkpoint))
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  ready = lambda: print(f"Serving {name} at http://{shown}:{port}/ (OpenAI API: "
                        f"http://{shown}:{port}/v1)", flush=True)
  app = server.create_app(engine, model_name=name, api_key=api_key, limits=limits,
                          vae_params=vae, default_max_tokens=f.default_max_tokens, on_ready=ready)
  config = uvicorn.Config(app, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=None)
  uvicorn.Server(config).run(sockets=[sock])  # The app's lifespan drains the engine at the end.
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags)
